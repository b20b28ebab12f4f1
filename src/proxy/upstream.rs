//! Connections to upstreams, kept alive between requests.
//!
//! Forwarding is what snapgate exists for, and no client crate lets a
//! proxy see what it needs here: whether a failed request had a byte
//! written, whether its connection was a reused one, and a per-connection
//! idle deadline taken from the app's `Keep-Alive: timeout=N`. So each
//! upstream has its own small pool of hyper HTTP/1.1 connections.
//!
//! Protocol:
//! 1. An [`Upstream`] is one address (for a VM, reached through its tap:
//!    every clone of a snapshot has the same address, so its sockets are
//!    bound to the tap with `SO_BINDTODEVICE`). It keeps idle connections,
//!    newest last, each with a deadline: the app's `upstream_idle_timeout`,
//!    lowered by the app's own `Keep-Alive: timeout=N` (less a margin, so
//!    snapgate stops using a connection before the app closes it).
//! 2. [`Upstream::send`] takes the newest idle connection that has not
//!    expired and is not closed, else connects afresh. Idle connections
//!    are kept per edge worker (`edge.rs`, step 3), each in the slot of
//!    the worker whose reactor drives it: a worker takes its own first,
//!    then another's, and only then connects; a connection goes back to
//!    its own slot, whichever worker used it. hyper hands a request
//!    back when its connection turned out closed before a byte of it was
//!    written: it then goes to the next connection (nothing was sent, so
//!    this is no resend).
//! 3. A request that failed on a reused connection before its response
//!    headers arrived (the app closed or reset it as the request went out,
//!    the race every keep-alive client has), and that is idempotent with an
//!    empty body (RFC 9110 section 9.2.2: such a request may be repeated),
//!    is sent once more on a fresh connection, and counted. That is its one
//!    resend: if the fresh connection fails too, the request fails. Nothing
//!    else is resent; a request with a body (a POST) never is once its
//!    bytes went out.
//! 4. A connection goes back to the pool ([`Checkin::put_back`]) only
//!    when both messages are done: its response body was read to its end
//!    and its request body was sent whole. An app that answered in full
//!    before reading all of an upload gets no more of it: the request body
//!    is cut off and the connection closed, so an upload never goes on
//!    into an instance whose lease has ended. One dropped earlier is
//!    closed. A connect failure before any resend hands the request back
//!    to the caller ([`SendError::NotSent`]), which may try another
//!    instance.
//! 5. Each connection's task ends with its connection: when the app
//!    closes it, when snapgate drops its sender, when a write to the app
//!    stays blocked for the app's `upstream_read_timeout` (the app stopped
//!    reading), or at shutdown. A sweeper task per upstream drops idle
//!    connections past their deadline every half `upstream_idle_timeout`
//!    (so connections to a destroyed VM do not linger), and ends once the
//!    upstream is dropped (the proxy's pruning of instances gone, or the
//!    proxy itself) or at shutdown. Both run on the gateway's task tracker.
//! 6. An app with `upstream_protocol: h2c` gets one HTTP/2 connection per
//!    upstream (prior knowledge, RFC 9113 section 3.3), shared by every
//!    request of every edge worker as concurrent streams (its frames are
//!    handled on the worker that opened it); it is made on first use and again
//!    once it closes. A request hyper hands back unsent (the connection had
//!    closed) goes on a new connection, once; if that one is closed too,
//!    the request goes back to the caller unsent (another instance may
//!    take it). A request that failed after it went out (a reset stream
//!    included: hyper does not tell a refused stream apart) is sent once
//!    more on a fresh connection under step 3's rule, else fails; its
//!    connection is dropped only if it closed. Nothing goes back to a
//!    pool: a stream ends with its response body, and an unfinished upload
//!    is cut off as in step 4. `upstream_idle_timeout` does not apply: the
//!    connection stays while the app keeps it open.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{header, HeaderMap, Method, Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::client::conn::http2;
use hyper_util::rt::TokioIo;
use prometheus::IntCounter;
use tokio::net::TcpSocket;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::body::RequestBody;
use crate::pool::Tasks;

/// Connect timeout of an app's upstreams: they are local (a tap or a
/// nearby host).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a pooled connection to turn idle (it should be at
/// once: both its messages ended); past it, the connection is not used.
const READY_TIMEOUT: Duration = Duration::from_secs(1);
/// How much earlier than an app's `Keep-Alive: timeout=N` snapgate stops
/// using a connection.
const KEEP_ALIVE_MARGIN: Duration = Duration::from_millis(500);

type TimeoutIo = tokio_io_timeout::TimeoutStream<tokio::net::TcpStream>;

/// How sending a request failed.
pub enum SendError {
    /// No byte of the request was written: no connection could be made.
    /// The request comes back, to be sent elsewhere.
    NotSent {
        /// The request, untouched.
        req: Box<Request<RequestBody>>,
        /// Why (the connect error).
        cause: std::io::Error,
    },
    /// The exchange failed after the request (or part of it) went out, or
    /// its one resend could not connect.
    Failed(Box<dyn std::error::Error + Send + Sync>),
}

/// What every upstream of an app shares.
#[derive(Clone)]
pub struct UpstreamConfig {
    /// Idle connections close after this (0: connections are not reused).
    pub idle_timeout: Duration,
    /// A write to the app blocked this long ends the connection.
    pub write_timeout: Duration,
    /// Counts the resends of step 3.
    pub replays: IntCounter,
    /// Where connection and sweeper tasks run; their cancellation ends them.
    pub tasks: Tasks,
    /// HTTP/2 with prior knowledge (h2c) instead of HTTP/1.1 (step 6).
    pub h2c: bool,
    /// Longest wait for a connection ([`CONNECT_TIMEOUT`] for an app's
    /// upstreams, `cluster.peer_connect_timeout` for a peer).
    pub connect_timeout: Duration,
}

/// One upstream address and its idle connections.
pub struct Upstream {
    addr: SocketAddr,
    interface: Option<String>,
    config: UpstreamConfig,
    /// Idle connections by edge worker slot (`edge.rs`, step 3): each is
    /// driven by the reactor of the worker that opened it.
    idle: Box<[Slot]>,
    /// The h2c connection, shared by every request (step 6).
    /// With a generation number, so a failure forgets only its own.
    h2: tokio::sync::Mutex<Option<(u64, http2::SendRequest<RequestBody>)>>,
}

struct Idle {
    sender: SendRequest<RequestBody>,
    expires: Instant,
}

/// One worker's idle connections, on a cache line of its own: another
/// worker takes from it only when its own is empty, and the sweeper
/// visits it.
#[repr(align(64))]
#[derive(Default)]
struct Slot(Mutex<Vec<Idle>>);

impl Slot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A connection whose response is being read; [`Checkin::put_back`]
/// returns it to its pool. Dropped otherwise, it closes, and cuts off a
/// request body still being sent (step 4).
pub struct Checkin {
    sender: Option<SendRequest<RequestBody>>,
    /// The slot of the worker whose reactor drives the connection.
    home: usize,
    upstream: Arc<Upstream>,
    idle_for: Duration,
    /// Cancelled once the request body was sent whole; `None`: it was
    /// empty.
    sent: Option<CancellationToken>,
    /// Cancelling it cuts the request body off; `None`: it was empty.
    cut: Option<CancellationToken>,
}

impl Checkin {
    /// Whether the request's body went out whole.
    fn sent_whole(&self) -> bool {
        self.sent
            .as_ref()
            .is_none_or(CancellationToken::is_cancelled)
    }
}

impl std::fmt::Debug for Checkin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkin")
            .field("addr", &self.upstream.addr)
            .finish()
    }
}

impl Checkin {
    /// The response was read to its end: the connection may serve another
    /// request, until its idle deadline, if its request was sent whole.
    pub fn put_back(mut self) {
        if !self.sent_whole() || self.idle_for.is_zero() {
            return;
        }
        if let Some(sender) = self.sender.take() {
            let expires = Instant::now() + self.idle_for;
            self.upstream.idle[self.home]
                .lock()
                .push(Idle { sender, expires });
        }
    }
}

impl Drop for Checkin {
    fn drop(&mut self) {
        if !self.sent_whole() {
            if let Some(cut) = &self.cut {
                cut.cancel();
            }
        }
    }
}

impl Upstream {
    /// The address it forwards to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// An upstream at `addr`, through `interface` (or the routing table
    /// when `None`). Must be called within a tokio runtime: a task closes
    /// expired idle connections (module doc, step 5) until the upstream is
    /// dropped.
    pub fn new(addr: SocketAddr, interface: Option<String>, config: UpstreamConfig) -> Arc<Self> {
        let upstream = Arc::new(Upstream {
            addr,
            interface,
            config,
            idle: (0..super::edge::slots()).map(|_| Slot::default()).collect(),
            h2: tokio::sync::Mutex::new(None),
        });
        let idle_timeout = upstream.config.idle_timeout;
        if idle_timeout.is_zero() {
            return upstream;
        }
        let weak = Arc::downgrade(&upstream);
        let period = (idle_timeout / 2).max(Duration::from_millis(100));
        let tasks = upstream.config.tasks.clone();
        tasks.tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(period) => {}
                    _ = tasks.cancel.cancelled() => return,
                }
                match weak.upgrade() {
                    Some(upstream) => upstream.sweep(),
                    None => return,
                }
            }
        });
        upstream
    }

    /// Drops idle connections past their deadline or closed: dropping a
    /// connection's sender ends its task, which closes it.
    fn sweep(&self) {
        let now = Instant::now();
        for slot in &self.idle {
            slot.lock()
                .retain(|c| c.expires > now && !c.sender.is_closed());
        }
    }

    /// The newest idle connection that has not expired, and the slot it
    /// lives in: the calling worker's own first, then another worker's
    /// (edge.rs, step 3).
    fn checkout(&self) -> Option<(SendRequest<RequestBody>, usize)> {
        let own = super::edge::slot();
        let now = Instant::now();
        let others = (0..self.idle.len()).filter(|&s| s != own);
        for slot in std::iter::once(own).chain(others) {
            let mut idle = self.idle[slot].lock();
            while let Some(c) = idle.pop() {
                if c.expires > now && !c.sender.is_closed() {
                    return Some((c.sender, slot));
                }
            }
        }
        None
    }

    /// A new HTTP/1.1 connection, its task spawned.
    async fn connect(&self) -> std::io::Result<SendRequest<RequestBody>> {
        let io = self.dial().await?;
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(io)
            .await
            .map_err(std::io::Error::other)?;
        self.run(conn.with_upgrades());
        Ok(sender)
    }

    /// A new h2c connection (prior knowledge: the preface at once), its
    /// task spawned.
    async fn connect_h2(&self) -> std::io::Result<http2::SendRequest<RequestBody>> {
        let io = self.dial().await?;
        let executor = super::TrackedExecutor(self.config.tasks.clone());
        let (sender, conn) = http2::Builder::new(executor)
            .timer(hyper_util::rt::TokioTimer::new())
            // One stream until the app's SETTINGS say how many it takes
            // (RFC 9113 section 6.5.2 leaves the start unlimited, and an
            // app with a small limit refuses the rest: REFUSED_STREAM).
            .initial_max_send_streams(1)
            .handshake(io)
            .await
            .map_err(std::io::Error::other)?;
        self.run(conn);
        Ok(sender)
    }

    /// Drives a connection on the tracker until it ends or shutdown.
    fn run<C, E>(&self, conn: C)
    where
        C: std::future::Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let addr = self.addr;
        let cancel = self.config.tasks.cancel.clone();
        self.config.tasks.tracker.spawn(async move {
            // Biased, the connection first: polled at every wake of the
            // connection (an unbiased select draws a random number each
            // time).
            tokio::select! {
                biased;
                ended = conn => if let Err(e) = ended {
                    debug!(%addr, "upstream connection: {e}");
                },
                _ = cancel.cancelled() => {}
            }
        });
    }

    /// A TCP connection to the upstream (through its tap), with the write
    /// timeout of step 5.
    async fn dial(&self) -> std::io::Result<TokioIo<std::pin::Pin<Box<TimeoutIo>>>> {
        let socket = match self.addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let Some(interface) = &self.interface {
            socket.bind_device(Some(interface.as_bytes()))?;
        }
        socket.set_nodelay(true)?;
        let within = self.config.connect_timeout;
        let stream = tokio::time::timeout(within, socket.connect(self.addr))
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connect timed out after {within:?}"),
                )
            })??;
        let mut io = tokio_io_timeout::TimeoutStream::new(stream);
        io.set_write_timeout(Some(self.config.write_timeout));
        Ok(TokioIo::new(Box::pin(io)))
    }

    /// Sends `req` (origin-form target, `Host` set) and waits for the
    /// response headers, as the module doc's steps 2 and 3 say.
    ///
    /// Not an `async fn`: its future holds `req` once, as a capture (an
    /// `async fn` copies each argument into a local of its own, and the
    /// future keeps room for both).
    #[allow(clippy::manual_async_fn)]
    pub fn send(
        self: &Arc<Self>,
        mut req: Request<RequestBody>,
    ) -> impl std::future::Future<Output = Result<(Response<Incoming>, Checkin), SendError>> + Send + '_
    {
        async move {
            // The paths a warm forward does not take are boxed: the future
            // of every request is moved whole, so it stays small.
            if self.config.h2c {
                return Box::pin(self.send_h2(req)).await;
            }
            // What a resend is made from: only needed on a reused connection.
            let mut replay = None;
            // Step 2: idle connections, then a fresh one.
            while let Some((mut sender, home)) = self.checkout() {
                // Put back as its messages ended, it may not be idle yet: wait
                // for that, briefly (an error: it closed meanwhile). No timer
                // when it is (the usual case).
                if !sender.is_ready() {
                    match tokio::time::timeout(READY_TIMEOUT, sender.ready()).await {
                        Ok(Ok(())) => {}
                        _ => continue,
                    }
                }
                if replay.is_none() && replayable(&req) {
                    replay = Some(head_of(&req));
                }
                let tokens = (req.body().sent(), req.body().cut());
                match sender.try_send_request(req).await {
                    Ok(resp) => return Ok(self.answered(resp, Some((sender, home)), tokens)),
                    Err(mut e) => match e.take_message() {
                        Some(unsent) => req = unsent,
                        None => {
                            let error = e.into_error();
                            // Step 3: the app closed it as the request went out.
                            let Some(head) = &replay else {
                                return Err(SendError::Failed(Box::new(error)));
                            };
                            debug!(addr = %self.addr, "reused connection failed ({error}); sending once more");
                            self.config.replays.inc();
                            // The one resend: a connect failure now fails it.
                            return match Box::pin(self.fresh(rebuild(head))).await {
                                Err(SendError::NotSent { cause, .. }) => {
                                    Err(SendError::Failed(Box::new(cause)))
                                }
                                other => other,
                            };
                        }
                    },
                }
            }
            Box::pin(self.fresh(req)).await
        }
    }

    /// Step 6: `req` as an HTTP/2 request on the shared connection (made
    /// if there is none, or it closed).
    async fn send_h2(
        self: &Arc<Self>,
        req: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Checkin), SendError> {
        let mut req = to_h2(req);
        let mut replay = replayable(&req).then(|| head_of(&req));
        // Connections found closed before the request went out: one more
        // is made at most, then the caller may try another instance.
        let mut closed_before = 0;
        loop {
            let (generation, mut sender, fresh) = match self.h2_sender().await {
                Ok(s) => s,
                Err(cause) => {
                    return Err(SendError::NotSent {
                        req: Box::new(req),
                        cause,
                    })
                }
            };
            let unsent = match sender.ready().await {
                Err(_) => Some(req),
                Ok(()) => {
                    let tokens = (req.body().sent(), req.body().cut());
                    match sender.try_send_request(req).await {
                        // Nothing goes back to a pool (step 6).
                        Ok(resp) => return Ok(self.answered(resp, None, tokens)),
                        Err(mut e) => match e.take_message() {
                            Some(unsent) => Some(unsent),
                            None => {
                                let error = e.into_error();
                                if sender.is_closed() {
                                    self.forget_h2(generation).await;
                                }
                                match replay.take() {
                                    // Step 3, once, on a fresh connection.
                                    Some(head) if !fresh => {
                                        debug!(addr = %self.addr, "h2c request failed ({error}); sending once more");
                                        self.config.replays.inc();
                                        self.forget_h2(generation).await;
                                        req = rebuild(&head);
                                        continue;
                                    }
                                    _ => return Err(SendError::Failed(Box::new(error))),
                                }
                            }
                        },
                    }
                }
            };
            // Not sent: the connection had closed.
            let unsent = unsent.expect("the request is back");
            self.forget_h2(generation).await;
            closed_before += 1;
            if closed_before > 1 {
                return Err(SendError::NotSent {
                    req: Box::new(unsent),
                    cause: std::io::Error::new(
                        std::io::ErrorKind::ConnectionAborted,
                        "the app's HTTP/2 connections closed before the request went out",
                    ),
                });
            }
            req = unsent;
        }
    }

    /// The shared h2c connection (made now if there is none, or it
    /// closed): its generation, a sender, and whether it is new.
    async fn h2_sender(&self) -> std::io::Result<(u64, http2::SendRequest<RequestBody>, bool)> {
        let mut slot = self.h2.lock().await;
        if let Some((generation, sender)) = slot.as_ref().filter(|(_, s)| !s.is_closed()) {
            return Ok((*generation, sender.clone(), false));
        }
        let sender = self.connect_h2().await?;
        let generation = slot.as_ref().map_or(0, |(g, _)| g + 1);
        *slot = Some((generation, sender.clone()));
        Ok((generation, sender, true))
    }

    /// Drops the shared connection if it is still `generation`'s (a newer
    /// one made meanwhile is kept).
    async fn forget_h2(&self, generation: u64) {
        let mut slot = self.h2.lock().await;
        if slot.as_ref().is_some_and(|(g, _)| *g == generation) {
            *slot = None;
        }
    }

    /// Sends `req` on a new connection.
    async fn fresh(
        self: &Arc<Self>,
        req: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Checkin), SendError> {
        let mut sender = match self.connect().await {
            Ok(s) => s,
            Err(cause) => {
                return Err(SendError::NotSent {
                    req: Box::new(req),
                    cause,
                })
            }
        };
        let tokens = (req.body().sent(), req.body().cut());
        match sender.send_request(req).await {
            Ok(resp) => Ok(self.answered(resp, Some((sender, super::edge::slot())), tokens)),
            Err(e) => Err(SendError::Failed(Box::new(e))),
        }
    }

    /// The checkin of `resp`, whose request went on `sender`'s HTTP/1.1
    /// connection (to be put back in the slot it lives in) or on the h2c
    /// connection (`None`).
    fn answered(
        self: &Arc<Self>,
        resp: Response<Incoming>,
        sender: Option<(SendRequest<RequestBody>, usize)>,
        (sent, cut): (Option<CancellationToken>, Option<CancellationToken>),
    ) -> (Response<Incoming>, Checkin) {
        let idle_timeout = self.config.idle_timeout;
        let idle_for = match (&sender, keep_alive_timeout(resp.headers())) {
            (None, _) => Duration::ZERO,
            (Some(_), Some(t)) => idle_timeout.min(t.saturating_sub(KEEP_ALIVE_MARGIN)),
            (Some(_), None) => idle_timeout,
        };
        let (sender, home) = match sender {
            Some((sender, home)) => (Some(sender), home),
            None => (None, 0),
        };
        let checkin = Checkin {
            sender,
            home,
            upstream: self.clone(),
            idle_for,
            sent,
            cut,
        };
        (resp, checkin)
    }
}

/// Whether a request may be sent again after its connection closed before
/// a response: idempotent (RFC 9110 section 9.2.2) and without a body.
fn replayable(req: &Request<RequestBody>) -> bool {
    let idempotent = matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    );
    idempotent && req.body().is_empty()
}

/// `req` (origin-form, `Host` set, as [`super::app`] makes it) as an
/// HTTP/2 request: the target absolute (`:scheme` and `:authority` from
/// `Host`, RFC 9113 section 8.3.1), no connection-specific fields
/// (section 8.2.2), `TE: trailers` kept when the client sent it.
fn to_h2(req: Request<RequestBody>) -> Request<RequestBody> {
    let (mut parts, body) = req.into_parts();
    let authority = parts
        .headers
        .remove(header::HOST)
        .and_then(|h| http::uri::Authority::try_from(h.as_bytes()).ok());
    let mut uri = http::uri::Parts::from(std::mem::take(&mut parts.uri));
    uri.scheme = Some(http::uri::Scheme::HTTP);
    uri.authority = authority.or_else(|| Some(http::uri::Authority::from_static("localhost")));
    if uri.path_and_query.is_none() {
        uri.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    if let Ok(u) = http::Uri::from_parts(uri) {
        parts.uri = u;
    }
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::TE,
    ] {
        parts.headers.remove(name);
    }
    let hop = parts.extensions.get::<super::forwarded::Hop>();
    if hop.is_some_and(|h| h.te_trailers) {
        parts
            .headers
            .insert(header::TE, header::HeaderValue::from_static("trailers"));
    }
    parts.version = http::Version::HTTP_2;
    Request::from_parts(parts, body)
}

/// What a bodiless request is rebuilt from.
pub(super) struct Head {
    method: Method,
    uri: http::Uri,
    headers: HeaderMap,
}

pub(super) fn head_of(req: &Request<RequestBody>) -> Head {
    Head {
        method: req.method().clone(),
        uri: req.uri().clone(),
        headers: req.headers().clone(),
    }
}

pub(super) fn rebuild(head: &Head) -> Request<RequestBody> {
    let mut req = Request::new(RequestBody::empty());
    *req.method_mut() = head.method.clone();
    *req.uri_mut() = head.uri.clone();
    *req.headers_mut() = head.headers.clone();
    req
}

/// The `timeout` parameter of a `Keep-Alive` response header
/// (RFC 2068 section 19.7.1.1; Node.js and Apache send it), in seconds.
pub fn keep_alive_timeout(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get_all(header::HeaderName::from_static("keep-alive"))
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|p| p.trim().split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("timeout"))
        .and_then(|(_, v)| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// The upstreams of one pool's instances, one per instance (bound to its
/// tap), made on an instance's first lease. The proxy owns them; a lease
/// only names its instance.
pub struct InstanceUpstreams {
    config: UpstreamConfig,
    upstreams: dashmap::DashMap<Arc<str>, Arc<Upstream>>,
}

impl InstanceUpstreams {
    /// Upstreams made with `config`.
    pub fn new(config: UpstreamConfig) -> Self {
        InstanceUpstreams {
            config,
            upstreams: Default::default(),
        }
    }

    /// The upstream of the instance `lease` names. Making a new one also
    /// drops those of instances `pool` no longer has.
    pub fn for_lease(&self, pool: &crate::pool::Pool, lease: &crate::pool::Lease) -> Arc<Upstream> {
        if let Some(u) = self.upstreams.get(lease.instance()) {
            return u.clone();
        }
        let made = self
            .upstreams
            .entry(Arc::from(lease.instance()))
            .or_insert_with(|| {
                let address = lease.address();
                Upstream::new(
                    address.addr.into(),
                    Some(address.tap.clone()),
                    self.config.clone(),
                )
            })
            .clone();
        let live = pool.instance_names();
        self.upstreams
            .retain(|name, _| live.iter().any(|l| **l == **name));
        made
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_idempotent_requests_without_a_body_are_replayable() {
        let req = |m: Method| {
            let mut r = Request::new(RequestBody::empty());
            *r.method_mut() = m;
            r
        };
        for m in [
            Method::GET,
            Method::HEAD,
            Method::OPTIONS,
            Method::PUT,
            Method::DELETE,
        ] {
            assert!(replayable(&req(m.clone())), "{m}");
        }
        for m in [Method::POST, Method::PATCH, Method::TRACE, Method::CONNECT] {
            assert!(!replayable(&req(m.clone())), "{m}");
        }
    }

    #[test]
    fn keep_alive_timeout_is_read_from_any_parameter_position() {
        let mut h = HeaderMap::new();
        h.insert("keep-alive", "max=100, timeout=5".parse().unwrap());
        assert_eq!(keep_alive_timeout(&h), Some(Duration::from_secs(5)));
        h.insert("keep-alive", "Timeout = 2".parse().unwrap());
        assert_eq!(keep_alive_timeout(&h), Some(Duration::from_secs(2)));
        h.insert("keep-alive", "max=3".parse().unwrap());
        assert_eq!(keep_alive_timeout(&h), None);
    }
}
