//! The bodies on both sides of a forwarded exchange.
//!
//! [`RequestBody`] is the client's body on its way to the app: bounded in
//! size (413) and in the wait between two reads (408); cut off once the
//! app has answered in full without reading it all (what is left is not
//! forwarded, so an upload cannot go on into an instance whose lease has
//! ended); and, when it is dropped unread (an early answer: 404, 413, 503,
//! an app that answered before reading), drained in the background within
//! bounds of time and size so the client sees the answer rather than a
//! reset (lingering close). A body the client held back for `Expect:
//! 100-continue` and that was never asked for is not drained: the client
//! sends nothing, and hyper closes the connection after the answer.
//!
//! [`ResponseBody`] is the app's body on its way to the client: it holds
//! the instance's lease and the upstream connection until its end, bounds
//! the wait between two reads, and returns the connection to its pool only
//! once the body has been read to its end.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::upstream::Checkin;
use super::{BoxError, RoutedApp};
use crate::pool::{Lease, Tasks};

/// Longest a dropped, unread request body is drained (nginx's
/// `lingering_time` default).
const LINGER_TIME: Duration = Duration::from_secs(30);
/// Longest wait for more of it while draining (nginx's
/// `lingering_timeout` default).
const LINGER_IDLE: Duration = Duration::from_secs(5);
/// Most bytes drained from one body; the connection closes after.
const LINGER_BYTES: u64 = 64 << 20;

/// How a client's request body failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    /// No data arrived for the `body_read_timeout`.
    #[error("no request body data for {0:?}")]
    Timeout(Duration),
    /// The body grew past the app's `max_body_size`, in bytes.
    #[error("the request body is over {0} bytes")]
    TooLarge(u64),
    /// The client's connection failed or sent a malformed body.
    #[error("reading the request body")]
    Read(#[source] hyper::Error),
    /// The app answered in full without reading the rest.
    #[error("the app answered before reading the whole request body")]
    Cut,
}

/// A restartable idle timer: armed when a read would wait, cleared when
/// data arrives.
struct Idle {
    limit: Duration,
    timer: Option<Pin<Box<Sleep>>>,
}

impl Idle {
    fn new(limit: Duration) -> Idle {
        Idle { limit, timer: None }
    }

    /// Data arrived: the next wait starts afresh.
    fn reset(&mut self) {
        self.timer = None;
    }

    /// A read is waiting: ready once it has waited `limit`.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let limit = self.limit;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        timer.as_mut().poll(cx)
    }
}

/// The client's request body, as the app is sent it.
///
/// An empty body (most requests) allocates nothing: it has no tokens, as
/// it is sent whole at once and there is nothing of it to cut off.
pub struct RequestBody {
    /// `None` once finished, failed in a way that ends the connection, or
    /// for a made-up empty body.
    inner: Option<Incoming>,
    idle: Idle,
    limit: Option<u64>,
    received: u64,
    /// What a body with data reports through; `None` for an empty one.
    tokens: Option<Box<Tokens>>,
    /// Whether the client sent `Expect: 100-continue`.
    expects_continue: bool,
    /// Whether the body was ever asked for (hyper sends the `100
    /// Continue` then).
    polled: bool,
}

/// What a request body with data reports through, and what it needs.
struct Tokens {
    /// Cancelled once the body has been read to its end.
    sent: CancellationToken,
    /// Cancelled to cut the body off (the app answered in full).
    cut: CancellationToken,
    /// Waits for `cut`: made when the body is first read.
    cut_wait: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    /// Where a drain runs, and what ends it early (shutdown).
    tasks: Tasks,
}

impl RequestBody {
    /// Wraps a client's body; a wait for data over `read_timeout` fails
    /// it. `expects_continue`: the request had `Expect: 100-continue`. A
    /// drain runs on `tasks` and ends with their cancellation.
    pub fn new(
        inner: Incoming,
        read_timeout: Duration,
        expects_continue: bool,
        tasks: &Tasks,
    ) -> RequestBody {
        let mut body = RequestBody::empty();
        if !inner.is_end_stream() {
            body.tokens = Some(Box::new(Tokens {
                sent: CancellationToken::new(),
                cut: CancellationToken::new(),
                cut_wait: None,
                tasks: tasks.clone(),
            }));
            body.inner = Some(inner);
            body.idle = Idle::new(read_timeout);
            body.expects_continue = expects_continue;
        }
        body
    }

    /// An empty body (a replayed request that had none).
    pub fn empty() -> RequestBody {
        RequestBody {
            inner: None,
            idle: Idle::new(Duration::MAX),
            limit: None,
            received: 0,
            tokens: None,
            expects_continue: false,
            polled: false,
        }
    }

    /// Cancelled once the body has been read to its end: its connection
    /// may then carry another request, and the wait for the answer begins.
    /// `None`: the body is empty, sent whole already.
    pub fn sent(&self) -> Option<CancellationToken> {
        self.tokens.as_ref().map(|t| t.sent.clone())
    }

    /// Cancelling it cuts the body off: the next read fails with
    /// [`RequestBodyError::Cut`]. `None`: the body is empty.
    pub fn cut(&self) -> Option<CancellationToken> {
        self.tokens.as_ref().map(|t| t.cut.clone())
    }

    /// Fails the body once more than `max` bytes have arrived.
    pub fn set_limit(&mut self, max: u64) {
        self.limit = Some(max);
    }

    /// Whether the body is known to be empty (no data will arrive).
    pub fn is_empty(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let (Some(inner), Some(tokens)) = (this.inner.as_mut(), this.tokens.as_mut()) else {
            return Poll::Ready(None);
        };
        this.polled = true;
        let cut = &tokens.cut;
        let cut_wait = tokens
            .cut_wait
            .get_or_insert_with(|| Box::pin(cut.clone().cancelled_owned()));
        if cut_wait.as_mut().poll(cx).is_ready() {
            // Kept: dropped, it is drained.
            return Poll::Ready(Some(Err(RequestBodyError::Cut.into())));
        }
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.idle.reset();
                if let Some(data) = frame.data_ref() {
                    this.received += data.remaining() as u64;
                    if let Some(max) = this.limit.filter(|&max| this.received > max) {
                        // Kept: dropped, it is drained, so the client
                        // reads its 413.
                        return Poll::Ready(Some(Err(RequestBodyError::TooLarge(max).into())));
                    }
                }
                // The last frame, after which hyper polls no further: a
                // sized body's last data, or trailers (always last).
                if frame.is_trailers() || this.inner.as_ref().is_some_and(|b| b.is_end_stream()) {
                    tokens.sent.cancel();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.inner = None;
                tokens.sent.cancel();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.inner = None;
                Poll::Ready(Some(Err(RequestBodyError::Read(e).into())))
            }
            Poll::Pending => match this.idle.poll_expired(cx) {
                Poll::Ready(()) => {
                    // A client that stalls is not waited for again.
                    this.inner = None;
                    let limit = this.idle.limit;
                    Poll::Ready(Some(Err(RequestBodyError::Timeout(limit).into())))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Some(b) => b.size_hint(),
            None => SizeHint::with_exact(0),
        }
    }
}

impl Drop for RequestBody {
    /// A body dropped before its end is drained in the background, for at
    /// most 30 s in all and 5 s between reads (nginx's lingering defaults)
    /// and 64 MiB: closing a socket with unread data makes the kernel send
    /// a reset, which can destroy the answer before the client reads it
    /// (RFC 9112 section 9.6). Not a body held back for `Expect:
    /// 100-continue` and never asked for (RFC 9110 section 10.1.1: the
    /// client sends none; hyper closes the connection after the answer).
    fn drop(&mut self) {
        let Some(inner) = self.inner.take().filter(|b| !b.is_end_stream()) else {
            return;
        };
        if self.expects_continue && !self.polled {
            return;
        }
        if let Some(Tokens { tasks, .. }) = self.tokens.as_deref() {
            let cancel = tasks.cancel.clone();
            tasks.tracker.spawn(async move {
                tokio::select! {
                    _ = drain(inner) => {}
                    _ = cancel.cancelled() => {}
                }
            });
        }
    }
}

/// Reads and discards `body` until its end, an error, or the linger
/// bounds.
async fn drain(mut body: Incoming) {
    use http_body_util::BodyExt;
    let deadline = Instant::now() + LINGER_TIME;
    let mut drained = 0u64;
    while drained <= LINGER_BYTES {
        let next =
            tokio::time::timeout_at(deadline.min(Instant::now() + LINGER_IDLE), body.frame());
        match next.await {
            Ok(Some(Ok(frame))) => {
                drained += frame.data_ref().map_or(0, |d| d.remaining() as u64);
            }
            _ => return,
        }
    }
}

/// An app's response body on its way to the client, holding what it
/// needs until its end: the instance's lease (so the reaper cannot cut a
/// streaming response, and the idle clock starts at the real completion)
/// and the upstream connection (returned to its pool only after a clean
/// end; dropped, and so closed, otherwise).
pub struct ResponseBody {
    inner: Incoming,
    checkin: Option<Checkin>,
    lease: Option<Lease>,
    /// Fires if the instance's VMM dies mid-body.
    gone: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    idle: Idle,
    /// Counts a failure mid-body (`snapgate_upstream_errors_total`,
    /// kind `body`).
    app: Arc<RoutedApp>,
}

impl ResponseBody {
    /// Wraps `inner`, `app`'s; a wait for data over `read_timeout` cuts it
    /// off.
    pub fn new(
        inner: Incoming,
        checkin: Checkin,
        lease: Option<Lease>,
        read_timeout: Duration,
        app: Arc<RoutedApp>,
    ) -> ResponseBody {
        let gone = lease
            .as_ref()
            .map(|l| Box::pin(l.gone().clone().cancelled_owned()));
        ResponseBody {
            inner,
            checkin: Some(checkin),
            lease,
            gone,
            idle: Idle::new(read_timeout),
            app,
        }
    }

    /// The app's body ended: the connection goes back to its pool, the
    /// lease is returned.
    fn ended(&mut self) {
        if let Some(checkin) = self.checkin.take() {
            checkin.put_back();
        }
        self.lease = None;
        self.gone = None;
    }

    /// The exchange failed mid-body: the connection is closed, the lease
    /// returned (an instance is broken only by its VMM's exit: see the
    /// module doc of `proxy::app`).
    fn fail(&mut self) {
        self.app.upstream_error("body");
        self.checkin = None;
        self.lease = None;
        self.gone = None;
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(gone) = this.gone.as_mut() {
            if gone.as_mut().poll(cx).is_ready() {
                if let Some(lease) = this.lease.as_mut() {
                    lease.mark_broken();
                }
                this.fail();
                let vm_gone = std::io::Error::other("the instance's VMM exited mid-response");
                return Poll::Ready(Some(Err(vm_gone.into())));
            }
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.ended();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.fail();
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(Some(Ok(frame))) => {
                this.idle.reset();
                if frame.is_trailers() {
                    // Always the last frame; hyper polls no further.
                    this.ended();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => match this.idle.poll_expired(cx) {
                Poll::Ready(()) => {
                    this.fail();
                    let stalled = std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("the app sent no response data for {:?}", this.idle.limit),
                    );
                    Poll::Ready(Some(Err(stalled.into())))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ResponseBody {
    /// hyper stops polling a body once [`Body::is_end_stream`] says it is
    /// done (a sized body read whole, an empty one never polled): the
    /// connection goes back to its pool if the app's body did end.
    fn drop(&mut self) {
        if let Some(checkin) = self.checkin.take() {
            if self.inner.is_end_stream() {
                checkin.put_back();
            }
        }
    }
}
