//! Idle HTTP/1.1 connections parked outside hyper, so that a kept-alive
//! connection nobody uses costs its socket and little else.
//!
//! hyper's HTTP/1.1 connection holds a read buffer and a buffer for
//! response heads (8 KiB each) for as long as it lives, and has no setting
//! to release them between requests; 10,000 idle kept-alive clients would
//! hold 160 MiB of buffers. So a connection idle for [`PARK_AFTER`] ends its
//! hyper connection, keeps the socket, and gets a new hyper connection
//! when the client sends again. hyper offers no hook for this, so it is
//! done in the byte stream hyper reads ([`Parkable`]).
//!
//! Protocol (one connection, HTTP/1.1, plain or TLS):
//! 1. hyper serves the connection over a [`Parkable`] stream. Requests are
//!    counted in flight from the call of the service until their response
//!    body is dropped (hyper drops it once sent, or when the exchange ends).
//! 2. When hyper reads and the client has nothing to read, the stream is
//!    idle if no request is in flight, no write is blocked, and some
//!    response was written since the client's bytes last arrived (so no
//!    request is half read). Then a timer of [`PARK_AFTER`] starts; bytes
//!    from the client, a request or a blocked write stop it.
//! 3. When the timer fires, the stream tells hyper the client closed (a
//!    read of 0 bytes). hyper, between requests, ends the connection
//!    cleanly; the stream ignores the shutdown hyper then asks for (the
//!    socket stays open) and the loop of [`serve`] takes the stream back
//!    from hyper, whose buffers are freed with its connection.
//! 4. Parked, the connection waits for the socket to become readable, for
//!    the stop, or for the rest of `header_read_timeout` (counted from when
//!    it went idle: an idle connection lives that long, parked or not).
//!    Readable: back to step 1 with a new hyper connection on the same
//!    stream, still idle since the same time until bytes reach hyper (a
//!    TLS stream may be readable with part of a record only: it parks
//!    again at once, its deadline unchanged). Stop or timeout: the socket
//!    closes.
//! 5. A connection hyper ends any other way (the client closed, an error,
//!    an upgrade, which takes the stream with it) is not parked; once a
//!    request is answered `101`, the stream (the tunnel's now) never
//!    reads as closed. Bytes hyper had read but not used when told of the
//!    close (a client pipelined part of its next request head, then
//!    paused) are not lost: a new hyper connection reads them first, at
//!    once, and the stream parks no more until that request starts, so
//!    hyper's header timer bounds the rest of the head. Each new hyper
//!    connection's header timer starts afresh: a head begun after a park
//!    has `header_read_timeout` from its first byte.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use super::conn::{drive, Graceful};
use super::{stopped, BoxError};

/// How long an HTTP/1.1 connection stays idle in hyper before it is
/// parked (step 2): long enough that a client sending its next request
/// right after an answer never pays for a new hyper connection.
pub const PARK_AFTER: Duration = Duration::from_secs(1);

/// Requests in flight on one connection (step 1), and whether it was
/// upgraded (step 5).
#[derive(Clone, Default)]
pub struct InFlight(Arc<Counts>);

#[derive(Default)]
struct Counts {
    requests: AtomicUsize,
    /// Requests ever started.
    started: AtomicUsize,
    upgraded: AtomicBool,
}

impl InFlight {
    /// One request more, until the guard drops.
    pub fn start(&self) -> InFlightGuard {
        self.0.requests.fetch_add(1, Ordering::Relaxed);
        self.0.started.fetch_add(1, Ordering::Relaxed);
        InFlightGuard(self.0.clone())
    }

    fn started(&self) -> usize {
        self.0.started.load(Ordering::Relaxed)
    }

    fn busy(&self) -> bool {
        self.0.requests.load(Ordering::Relaxed) > 0 || self.0.upgraded.load(Ordering::Relaxed)
    }
}

/// A request counted in flight while it lives.
pub struct InFlightGuard(Arc<Counts>);

impl InFlightGuard {
    /// The request's connection switched protocols (a `101`): the stream
    /// is the tunnel's from now on and is never parked.
    pub fn upgraded(&self) {
        self.0.upgraded.store(true, Ordering::Relaxed);
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.requests.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What [`Parkable`] needs of its stream: the socket under it, to wait on
/// while parked (step 4).
pub trait Socket {
    /// The TCP socket the stream reads from.
    fn tcp(&self) -> &tokio::net::TcpStream;
}

/// A client's byte stream that can end its hyper connection when idle
/// (steps 2 and 3).
pub struct Parkable<T> {
    inner: Pin<Box<T>>,
    in_flight: InFlight,
    /// The timer of steps 2 and 4, made on first use and reused: step 4
    /// sets it to the parked deadline, step 2 moves it back to its own.
    timer: Option<Pin<Box<Sleep>>>,
    /// In an idle spell: `idle_since` is its start (kept across a park
    /// until bytes reach hyper, step 4).
    armed: bool,
    /// When the connection last went idle (step 4 counts from it).
    idle_since: Instant,
    /// The client's bytes arrived after the last write: a request is
    /// being read.
    unanswered: bool,
    /// The last write or flush could not complete.
    write_blocked: bool,
    /// Step 3 happened: hyper was told the client closed.
    parked: bool,
    /// Bytes hyper had read but not used when it ended (step 5): read
    /// again first.
    replay: bytes::Bytes,
    /// Not parked again until a request starts after this many have
    /// (step 5).
    hold_until: Option<usize>,
}

impl<T> Parkable<T> {
    /// `inner`, its requests counted by `in_flight`.
    pub fn new(inner: Pin<Box<T>>, in_flight: InFlight) -> Self {
        Parkable {
            inner,
            in_flight,
            timer: None,
            armed: false,
            idle_since: Instant::now(),
            unanswered: false,
            write_blocked: false,
            parked: false,
            replay: bytes::Bytes::new(),
            hold_until: None,
        }
    }

    /// A write's outcome: bytes out answer the client's last bytes; a
    /// blocked write or flush keeps the connection from parking. (hyper
    /// flushes on every pass, with nothing to write too: a flush answers
    /// nothing.)
    fn wrote(&mut self, r: &Poll<io::Result<usize>>) {
        self.write_blocked = r.is_pending();
        if matches!(r, Poll::Ready(Ok(n)) if *n > 0) {
            self.unanswered = false;
        }
    }
}

impl<T: AsyncRead> AsyncRead for Parkable<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.replay.is_empty() {
            let n = this.replay.len().min(buf.remaining());
            buf.put_slice(&this.replay.split_to(n));
            if this.replay.is_empty() {
                // An empty slice of hyper's buffer still holds all of it.
                this.replay = bytes::Bytes::new();
            }
            this.unanswered = true;
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match this.inner.as_mut().poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.unanswered = true;
                    this.armed = false;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                // Step 2.
                let held = this
                    .hold_until
                    .is_some_and(|n| this.in_flight.started() <= n);
                if this.unanswered || this.write_blocked || held || this.in_flight.busy() {
                    this.armed = false;
                    return Poll::Pending;
                }
                if !this.armed {
                    this.idle_since = Instant::now();
                    this.armed = true;
                }
                let due = this.idle_since + PARK_AFTER;
                // The timer is moved only when it fires early (it was set
                // in an earlier idle spell): at most once per PARK_AFTER,
                // not once per request; or when step 4 left it later than
                // this spell's due (once per park).
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
                if timer.deadline() > due {
                    timer.as_mut().reset(due);
                }
                loop {
                    match timer.as_mut().poll(cx) {
                        Poll::Pending => return Poll::Pending,
                        // The clock is read only when the timer fires.
                        Poll::Ready(()) if Instant::now() < due => timer.as_mut().reset(due),
                        // Step 3: nothing filled reads as the client's close.
                        Poll::Ready(()) => {
                            this.armed = false;
                            this.parked = true;
                            return Poll::Ready(Ok(()));
                        }
                    }
                }
            }
        }
    }
}

impl<T: AsyncWrite> AsyncWrite for Parkable<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = this.inner.as_mut().poll_write(cx, buf);
        this.wrote(&r);
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = this.inner.as_mut().poll_flush(cx);
        this.write_blocked = r.is_pending();
        r
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.parked {
            // Step 3: the socket stays open for the next request.
            return Poll::Ready(Ok(()));
        }
        this.inner.as_mut().poll_shutdown(cx)
    }
}

/// Serves an HTTP/1.1 connection over `stream` with a clone of `service`
/// per hyper connection, parking it while idle (the module's protocol);
/// shut gracefully on `stop` (`conn` step 3). `idle` is
/// `header_read_timeout`, the longest an idle connection stays open;
/// `parked` counts the connections in step 4.
pub async fn serve<T, S>(
    stream: Pin<Box<T>>,
    in_flight: InFlight,
    builder: &hyper::server::conn::http1::Builder,
    service: S,
    mut stop: watch::Receiver<bool>,
    idle: Duration,
    parked: &prometheus::IntGauge,
) -> Result<(), BoxError>
where
    T: AsyncRead + AsyncWrite + Socket + Send + 'static,
    S: hyper::service::HttpService<Incoming> + Clone + Unpin + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    S::ResBody: Send + 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<BoxError>,
    hyper::server::conn::http1::UpgradeableConnection<TokioIo<Parkable<T>>, S>: Graceful + Unpin,
{
    let mut stream = Parkable::new(stream, in_flight);
    loop {
        // Boxed, and freed when it returns: parked, the connection's task
        // holds no HTTP state at all, and no room for it.
        let (back, done) = Box::pin(hyper_phase(stream, builder, service.clone(), &stop)).await;
        // Step 5: an upgrade took the stream.
        let Some((back, unread)) = back else {
            return done;
        };
        stream = back;
        if !stream.parked {
            return done;
        }
        stream.parked = false;
        if !unread.is_empty() {
            // Step 5: hyper held part of the next request (pipelined with
            // the last one) and ended on the close it was told of. A new
            // connection gets those bytes first, and the stream parks no
            // more before that request starts: hyper's header timer
            // bounds it.
            stream.replay = unread;
            stream.hold_until = Some(stream.in_flight.started());
            continue;
        }
        // Even empty, it holds hyper's whole read buffer: freed before the
        // wait, or a parked connection would keep 8 KiB.
        drop(unread);
        done?;
        // Step 4, on step 2's timer (the stream's own: no second one; step
        // 3 fired it, so it exists).
        let deadline = stream.idle_since + idle;
        parked.inc();
        super::released();
        let _counted = super::scopeguard(|| parked.dec());
        let timer = stream
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        timer.as_mut().reset(deadline);
        tokio::select! {
            readable = stream.inner.tcp().readable() => readable?,
            () = stopped(&mut stop) => return Ok(()),
            () = timer.as_mut() => return Ok(()),
        }
        stream.unanswered = false;
        // The idle spell goes on until bytes reach hyper (a read that
        // fills any clears it): the socket may have been readable with
        // part of a TLS record only, which must not restart the count to
        // header_read_timeout (a byte every few seconds would hold the
        // connection open for ever). Step 2 then parks again at once.
        stream.armed = true;
    }
}

/// One hyper connection over `stream`, until it ends: the stream back
/// with the bytes hyper read but did not use (`None`: an upgrade took
/// it), and how the connection ended.
async fn hyper_phase<T, S>(
    stream: Parkable<T>,
    builder: &hyper::server::conn::http1::Builder,
    service: S,
    stop: &watch::Receiver<bool>,
) -> (Option<(Parkable<T>, bytes::Bytes)>, Result<(), BoxError>)
where
    T: AsyncRead + AsyncWrite + Socket + Send + 'static,
    S: hyper::service::HttpService<Incoming> + Unpin + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    S::ResBody: Send + 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<BoxError>,
    hyper::server::conn::http1::UpgradeableConnection<TokioIo<Parkable<T>>, S>: Graceful + Unpin,
{
    let mut conn = builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    let done = drive(Pin::new(&mut conn), stop.clone(), None).await;
    match conn.into_parts() {
        Some(parts) => (Some((parts.io.into_inner(), parts.read_buf)), done),
        None => (None, done),
    }
}
