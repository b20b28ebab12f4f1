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
//!    expired and is not closed, else connects afresh. hyper hands a request
//!    back when its connection turned out closed before a byte of it was
//!    written: it is then sent on the next connection, as many times as
//!    that happens (nothing was sent).
//! 3. A request that failed on a reused connection before its response
//!    headers arrived (the app closed or reset it, as the request went
//!    out), and that is idempotent with an empty body (RFC 9110 section
//!    9.2.2), is sent once more on a fresh connection, and counted. Nothing
//!    else is replayed; a request with a body (a POST) never is once its
//!    bytes went out.
//! 4. A connection goes back to the pool ([`Checkin::put_back`]) only
//!    when both messages are done: its response body was read to its end
//!    and its request body was sent whole (an app may answer before it has
//!    read an upload, and the connection is busy until the upload ends).
//!    One dropped earlier is closed. A connect failure hands the request
//!    back to the caller ([`SendError::NotSent`]), which may try another
//!    instance.
//! 5. Each connection's task ends with its connection: when the app
//!    closes it, or when snapgate drops its sender. A sweeper task per
//!    upstream drops idle connections past their deadline every half
//!    `upstream_idle_timeout` (so connections to a destroyed VM do not
//!    linger), and ends once the upstream is dropped (the proxy's pruning
//!    of instances gone, or the proxy itself).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{header, HeaderMap, Method, Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use prometheus::IntCounter;
use tokio::net::TcpSocket;
use tokio::time::Instant;
use tracing::debug;

use super::body::RequestBody;

/// Connect timeout: upstreams are local (a tap or a nearby host).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a pooled connection to turn idle (it should be at
/// once: both its messages ended); past it, the connection is not used.
const READY_TIMEOUT: Duration = Duration::from_secs(1);
/// How much earlier than an app's `Keep-Alive: timeout=N` snapgate stops
/// using a connection.
const KEEP_ALIVE_MARGIN: Duration = Duration::from_millis(500);

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
    /// The exchange failed after the request (or part of it) went out.
    Failed(hyper::Error),
}

/// One upstream address and its idle connections.
pub struct Upstream {
    addr: SocketAddr,
    interface: Option<String>,
    idle_timeout: Duration,
    idle: Mutex<Vec<Idle>>,
    /// Counts the replays of step 3.
    replays: IntCounter,
}

struct Idle {
    sender: SendRequest<RequestBody>,
    expires: Instant,
}

/// A connection whose response is being read; [`Checkin::put_back`]
/// returns it to its pool.
pub struct Checkin {
    sender: SendRequest<RequestBody>,
    upstream: Arc<Upstream>,
    idle_for: Duration,
    /// Set once the request body was sent whole.
    request_sent: Arc<AtomicBool>,
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
    /// request, until its idle deadline.
    pub fn put_back(self) {
        if !self.request_sent.load(Ordering::Acquire) {
            // Step 4: still busy with the upload; dropped, it closes.
            return;
        }
        let expires = Instant::now() + self.idle_for;
        let mut idle = self.upstream.idle.lock().unwrap_or_else(|p| p.into_inner());
        if !self.idle_for.is_zero() {
            idle.push(Idle {
                sender: self.sender,
                expires,
            });
        }
    }
}

impl Upstream {
    /// An upstream at `addr`, through `interface` (or the routing table
    /// when `None`), whose idle connections close after `idle_timeout`.
    /// `replays` counts the replays of step 3. Must be called within a
    /// tokio runtime: a task closes expired idle connections (module doc,
    /// step 5) until the upstream is dropped.
    pub fn new(
        addr: SocketAddr,
        interface: Option<String>,
        idle_timeout: Duration,
        replays: IntCounter,
    ) -> Arc<Self> {
        let upstream = Arc::new(Upstream {
            addr,
            interface,
            idle_timeout,
            idle: Mutex::new(Vec::new()),
            replays,
        });
        let weak = Arc::downgrade(&upstream);
        let period = (idle_timeout / 2).max(Duration::from_millis(100));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
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
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|c| c.expires > now && !c.sender.is_closed());
    }

    /// The address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The newest idle connection that has not expired, if any.
    fn checkout(&self) -> Option<SendRequest<RequestBody>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        while let Some(c) = idle.pop() {
            if c.expires > now && !c.sender.is_closed() {
                return Some(c.sender);
            }
        }
        None
    }

    /// A new connection, its task spawned.
    async fn connect(&self) -> std::io::Result<SendRequest<RequestBody>> {
        let socket = match self.addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let Some(interface) = &self.interface {
            socket.bind_device(Some(interface.as_bytes()))?;
        }
        socket.set_nodelay(true)?;
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(self.addr))
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connect timed out after {CONNECT_TIMEOUT:?}"),
                )
            })??;
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%addr, "upstream connection: {e}");
            }
        });
        Ok(sender)
    }

    /// Sends `req` (origin-form target, `Host` set) and waits for the
    /// response headers, as the module doc's steps 2 and 3 say.
    pub async fn send(
        self: &Arc<Self>,
        req: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Checkin), SendError> {
        let replay = replayable(&req).then(|| head_of(&req));
        let mut req = req;
        // Step 2: idle connections, then a fresh one.
        while let Some(mut sender) = self.checkout() {
            // Put back as its messages ended, it may not be idle yet: wait
            // for that, briefly (an error: it closed meanwhile).
            match tokio::time::timeout(READY_TIMEOUT, sender.ready()).await {
                Ok(Ok(())) => {}
                _ => continue,
            }
            let request_sent = req.body().sent_flag();
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(self.answered(resp, sender, request_sent)),
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => {
                        let error = e.into_error();
                        // Step 3: the app closed it as the request went out.
                        let Some(head) = &replay else {
                            return Err(SendError::Failed(error));
                        };
                        debug!(addr = %self.addr, "reused connection failed ({error}); sending once more");
                        self.replays.inc();
                        return self.fresh(rebuild(head)).await;
                    }
                },
            }
        }
        self.fresh(req).await
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
        let request_sent = req.body().sent_flag();
        match sender.send_request(req).await {
            Ok(resp) => Ok(self.answered(resp, sender, request_sent)),
            Err(e) => Err(SendError::Failed(e)),
        }
    }

    fn answered(
        self: &Arc<Self>,
        resp: Response<Incoming>,
        sender: SendRequest<RequestBody>,
        request_sent: Arc<AtomicBool>,
    ) -> (Response<Incoming>, Checkin) {
        let idle_for = match keep_alive_timeout(resp.headers()) {
            Some(t) => self.idle_timeout.min(t.saturating_sub(KEEP_ALIVE_MARGIN)),
            None => self.idle_timeout,
        };
        let checkin = Checkin {
            sender,
            upstream: self.clone(),
            idle_for,
            request_sent,
        };
        (resp, checkin)
    }
}

/// Whether a request may be sent again after its connection closed before
/// a response: idempotent (RFC 9110 section 9.2.2) and without a body.
fn replayable(req: &Request<RequestBody>) -> bool {
    let idempotent = matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    );
    idempotent && req.body().is_empty()
}

/// What a bodiless request is rebuilt from.
struct Head {
    method: Method,
    uri: http::Uri,
    headers: HeaderMap,
}

fn head_of(req: &Request<RequestBody>) -> Head {
    Head {
        method: req.method().clone(),
        uri: req.uri().clone(),
        headers: req.headers().clone(),
    }
}

fn rebuild(head: &Head) -> Request<RequestBody> {
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
    idle_timeout: Duration,
    replays: IntCounter,
    upstreams: dashmap::DashMap<Arc<str>, Arc<Upstream>>,
}

impl InstanceUpstreams {
    /// Upstreams whose idle connections close after `idle_timeout`;
    /// `replays` counts their replays.
    pub fn new(idle_timeout: Duration, replays: IntCounter) -> Self {
        InstanceUpstreams {
            idle_timeout,
            replays,
            upstreams: Default::default(),
        }
    }

    /// The upstream of the instance `lease` names. Making a new one also
    /// drops those of instances `pool` no longer has.
    pub fn for_lease(&self, pool: &crate::pool::Pool, lease: &crate::pool::Lease) -> Arc<Upstream> {
        if let Some(u) = self.upstreams.get(lease.instance()) {
            return u.clone();
        }
        let address = lease.address();
        let made = Upstream::new(
            address.addr.into(),
            Some(address.tap.clone()),
            self.idle_timeout,
            self.replays.clone(),
        );
        self.upstreams
            .insert(Arc::from(lease.instance()), made.clone());
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
