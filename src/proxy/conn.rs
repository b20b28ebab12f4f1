//! One client connection, from its first byte to its close (the listener's
//! protocol steps 2 and 4, in [`super`]).
//!
//! 1. The protocol: on TLS, ALPN's choice (`h2` for HTTP/2, else
//!    HTTP/1.1); on the plain listener with HTTP/2 on, the first bytes,
//!    awaited for at most `header_read_timeout` (a connection that sends
//!    nothing is closed): the HTTP/2 preface opens with `PRI`, a method
//!    HTTP/1.1 reserves for it (RFC 9113 section 3.4); anything else is
//!    HTTP/1.1. hyper's own builders serve each, so every setting applies.
//! 2. HTTP/1.1 connections close when idle for `header_read_timeout`;
//!    idle for [`super::park::PARK_AFTER`] already, they are parked outside
//!    hyper until the client sends again (`park.rs`). An HTTP/2 connection with no stream open for
//!    `header_read_timeout` (streams count until their response body
//!    ends) is shut down gracefully (GOAWAY).
//! 3. On stop: `Connection: close` after the request in flight (HTTP/1.1)
//!    or GOAWAY (HTTP/2); the listener waits out the grace period for the
//!    connection to finish, then aborts it.
//! 4. The connection's slot and gauge count stay taken while a tunnel it
//!    was upgraded to lives ([`Held`] goes with the request).

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use hyper::body::{Body, Frame, Incoming};
use tokio::sync::{watch, Notify};

use super::{stopped, BoxError, ProxyBody};

/// What a connection holds while open (its slot, its count in the
/// gauge); a tunnel it was upgraded to keeps it too (step 4).
#[derive(Clone)]
pub struct Held {
    /// Dropped with the last holder.
    _guard: Arc<dyn Send + Sync>,
}

impl Held {
    /// Holds `guard` until the connection and any tunnel of it are gone.
    pub fn new(guard: impl Send + Sync + 'static) -> Held {
        Held {
            _guard: Arc::new(guard),
        }
    }
}

/// A connection that can be asked to finish gracefully.
pub trait Graceful: Future<Output = Result<(), hyper::Error>> {
    /// Finish what is in flight, take nothing new.
    fn shut(self: Pin<&mut Self>);
}

impl<I, S, B> Graceful for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: Body + 'static,
    B::Error: Into<BoxError>,
{
    fn shut(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<G: Graceful + ?Sized> Graceful for Pin<&mut G> {
    fn shut(self: Pin<&mut Self>) {
        self.get_mut().as_mut().shut();
    }
}

impl<I, S, B, E> Graceful for hyper::server::conn::http2::Connection<I, S, E>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: Body + 'static,
    B::Error: Into<BoxError>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn shut(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Streams open on an HTTP/2 connection (step 2).
#[derive(Default)]
pub struct Streams {
    open: AtomicUsize,
    changed: Notify,
}

impl Streams {
    /// One stream more, until the returned guard drops.
    pub fn open(self: &Arc<Self>) -> StreamGuard {
        self.open.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
        StreamGuard(self.clone())
    }

    /// Resolves once no stream has been open for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let mut changed = pin!(self.changed.notified());
            changed.as_mut().enable();
            if self.open.load(Ordering::SeqCst) == 0 {
                tokio::select! {
                    () = tokio::time::sleep(idle) => return,
                    () = changed => {}
                }
            } else {
                changed.await;
            }
        }
    }
}

/// A stream counted open in its [`Streams`] while it lives.
pub struct StreamGuard(Arc<Streams>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }
}

/// What a response body holds while hyper sends it: an HTTP/2 stream
/// counted open (step 2), or an HTTP/1.1 request counted in flight
/// (`park` step 1).
#[allow(dead_code)] // Each guard is held for its drop, never read.
pub enum Guard {
    /// An HTTP/2 stream.
    Stream(StreamGuard),
    /// An HTTP/1.1 request.
    Request(super::park::InFlightGuard),
}

/// `body`, counted by `guard` until it is dropped (hyper drops a response
/// body once sent, or when its exchange ends or its stream is reset).
pub fn counted(resp: Response<ProxyBody>, guard: Guard) -> Response<Counted> {
    resp.map(|body| Counted {
        inner: body,
        _guard: guard,
    })
}

/// A response body counted until it is dropped ([`counted`]).
pub struct Counted {
    inner: ProxyBody,
    _guard: Guard,
}

impl Body for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Drives `conn` until it ends: shut gracefully on stop (step 3) or, for
/// HTTP/2, when `idle` says so (step 2).
pub async fn drive<C: Graceful>(
    conn: C,
    mut stop: watch::Receiver<bool>,
    idle: Option<(Arc<Streams>, Duration)>,
) -> Result<(), BoxError> {
    let mut conn = pin!(conn);
    // Whichever comes first: the stop, or (HTTP/2) the idle limit.
    let shut_when = async {
        let idle = async {
            match &idle {
                Some((streams, after)) => streams.idle_for(*after).await,
                None => std::future::pending().await,
            }
        };
        // Biased: polled at every wake of the connection (below).
        tokio::select! {
            biased;
            () = stopped(&mut stop) => {}
            () = idle => {}
        }
    };
    let mut shut_when = pin!(shut_when);
    let mut shutting = false;
    loop {
        // Biased (polled in order, the connection first): this select is
        // polled at every wake of the connection, and an unbiased one
        // draws a random number each time to pick which to poll first.
        tokio::select! {
            biased;
            done = conn.as_mut() => return done.map_err(BoxError::from),
            () = shut_when.as_mut(), if !shutting => {
                conn.as_mut().shut();
                shutting = true;
            }
        }
    }
}

/// Step 1 on the plain listener: whether `stream`'s first bytes are the
/// HTTP/2 preface's, waiting at most `within`; `None` if nothing came.
pub async fn starts_http2(stream: &tokio::net::TcpStream, within: Duration) -> Option<bool> {
    let peek = async {
        let mut buf = [0u8; 3];
        loop {
            match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) if n >= 3 => return Some(&buf == b"PRI"),
                // Fewer than 3 bytes: wait for more, a little at a time
                // (the socket stays readable, so there is no event to
                // wait on until more arrive).
                Ok(n) if buf[..n] != b"PRI"[..n] => return Some(false),
                Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    };
    tokio::time::timeout(within, peek).await.ok().flatten()
}
