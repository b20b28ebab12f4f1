//! The front door: listener -> connection caps -> the request stack
//! ([`stack`]) -> app -> lease -> forward.
//!
//! Protocol for a connection:
//! 1. An accept loop (one per listener on each edge worker, [`edge`])
//!    takes a connection slot for it (503 and close when over
//!    `max_connections` or `max_connections_per_client`); the connection
//!    is served on that worker to its end.
//! 2. On the TLS listener, the handshake comes first, bounded by
//!    `header_read_timeout` (its SNI goes with each request). The
//!    connection then speaks HTTP/2 or HTTP/1.1 (`conn.rs` step 1): HTTP/1.1
//!    with keep-alive, `header_read_timeout`, `max_header_bytes` and
//!    `max_headers` (431 over either) and upgrades; HTTP/2 with
//!    `http2.max_concurrent_streams`, a header list of at most
//!    `max_header_bytes`, PINGs every `http2.keep_alive_interval`, and
//!    extended CONNECT. Idle connections are parked, then close (`conn.rs` step 2). A write
//!    to the client blocked for `send_timeout` ends the connection (the
//!    client stopped reading).
//! 3. Each request gets the connection's [`Peer`] and goes through the
//!    stack, whose layers are listed in [`stack`].
//! 4. On stop, the listener closes and each connection finishes
//!    gracefully (`conn.rs` step 3): in-flight requests complete with
//!    `Connection: close` (HTTP/1.1) or after a GOAWAY (HTTP/2), idle
//!    kept-alive connections are closed; after `grace`, what is left is
//!    aborted.

pub mod access;
mod app;
mod authority;
mod body;
mod conn;
pub mod edge;
mod error;
mod forwarded;
mod framing;
mod limits;
mod metrics;
mod park;
mod router;
pub mod stack;
pub mod tls;
mod tunnel;
mod upstream;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, warn};

pub use app::{AppLimits, Apps, RoutedTo, Table, Target};
pub use error::{ErrorKind, ProxyError};
pub use forwarded::{ClientAddr, Peer};
pub use limits::ConnectionSlots;
pub use metrics::{ProxyMetrics, RoutedApp};
pub use router::Router;
pub use stack::{Redirect, Stack, StackConfig};
pub use upstream::{InstanceUpstreams, Upstream, UpstreamConfig, CONNECT_TIMEOUT};

/// Errors a response body may end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every response snapgate sends.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// How the listener serves connections (protocol steps 1 and 2).
#[derive(Clone)]
pub struct Listening {
    /// Longest a client may take to send a request head.
    pub header_read_timeout: Duration,
    /// Longest a write to the client may stay blocked.
    pub send_timeout: Duration,
    /// Largest request head in bytes (431 over it).
    pub max_header_bytes: usize,
    /// Most header lines (431 over it).
    pub max_headers: usize,
    /// The connection counts and caps, shared with the other listener.
    pub slots: ConnectionSlots,
    /// Peers exempt from the per-client cap (they carry many clients).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// The cluster, whose nodes (by the addresses in its catalog) are
    /// exempt from the per-client cap too: a node's forwards carry many
    /// clients.
    pub cluster: Option<crate::cluster::Cluster>,
    /// How long open connections may finish after stop.
    pub grace: Duration,
    /// HTTP/2 settings; `None`: HTTP/1.1 only.
    pub http2: Option<crate::config::Http2Config>,
    /// Where HTTP/2 stream tasks run.
    pub tasks: crate::pool::Tasks,
}

/// Client connections ended or parked since start: each frees its HTTP
/// state. Read by [`connections_released`].
static RELEASED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many client connections have ended or been parked since start
/// (each freed its HTTP state): the edge workers hand freed memory back
/// to the system only after this moved, so steady traffic on
/// kept-alive connections never pays for it.
pub fn connections_released() -> u64 {
    RELEASED.load(std::sync::atomic::Ordering::Relaxed)
}

fn released() {
    RELEASED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Resolves once `stop` turns true (or its sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns must not live across an await.
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}

/// Accepts connections on `listener` until `stop` turns true (over TLS
/// with `tls`, its handshake bounded by `header_read_timeout`), serving
/// each request with `stack`; then lets open connections finish for at
/// most `listening.grace`.
pub async fn serve(
    listener: TcpListener,
    stack: Stack,
    listening: Listening,
    metrics: ProxyMetrics,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stop: watch::Receiver<bool>,
) {
    let mut stop_accepting = stop.clone();
    let mut connections = tokio::task::JoinSet::new();
    let slots = listening.slots.clone();
    let local = listener
        .local_addr()
        .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
    // Shared: each connection's task holds a pointer, not the builders.
    let builders = std::sync::Arc::new(Builders::new(&listening));
    loop {
        // Forget connections that have finished.
        while connections.try_join_next().is_some() {}
        // `edge` step 2: the worker lets its connections run between two
        // accepts, so the other workers, woken too, take their share of
        // a burst.
        tokio::task::yield_now().await;
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of fds and the like: back off briefly, keep serving.
                    warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop_accepting) => break,
        };
        let ip = remote.ip().to_canonical();
        let trusted = listening.trusted_proxies.iter().any(|n| n.contains(&ip))
            || listening.cluster.as_ref().is_some_and(|c| c.is_node(ip));
        let slot = match slots.take(ip, trusted) {
            Ok(slot) => slot,
            Err(over) => {
                metrics.shed(over.key());
                debug!(%remote, "connection refused: over {}", over.key());
                // Protocol step 2 of `limits`: a bounded number of answers,
                // none on TLS.
                let permit = match tls {
                    None => slots.refusing.clone().try_acquire_owned().ok(),
                    Some(_) => None,
                };
                if let Some(permit) = permit {
                    connections.spawn(async move {
                        limits::refuse(stream, over).await;
                        drop(permit);
                    });
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let peer = Peer {
            addr: remote,
            local,
        };
        let gauge = metrics.connections().clone();
        let parked = metrics.parked().clone();
        gauge.inc();
        // Uncounted however the connection ends (an abort at the end of
        // the grace period included), and not before a tunnel it was
        // upgraded to ends (conn step 4).
        let held = conn::Held::new(scopeguard(move || {
            gauge.dec();
            drop(slot);
            released();
        }));
        let (stack, builders, tls, stop) =
            (stack.clone(), builders.clone(), tls.clone(), stop.clone());
        let handshakes = tls.as_ref().map(|_| metrics.clone());
        let (send_timeout, first_bytes) = (listening.send_timeout, listening.header_read_timeout);
        let h2_on = listening.http2.is_some();
        connections.spawn(async move {
            let served = async {
                // The handshake is bounded by header_read_timeout, and the
                // request head after it by the same again.
                let (io, sni, h2) = match tls {
                    None => {
                        let h2 = match h2_on {
                            false => false,
                            true => {
                                match Box::pin(conn::starts_http2(&stream, first_bytes)).await {
                                    Some(h2) => h2,
                                    None => return Ok(()),
                                }
                            }
                        };
                        (Io::Plain(stream), None, h2)
                    }
                    Some(acceptor) => {
                        let handshakes = handshakes.expect("set with the acceptor");
                        // Boxed, as the connections below: the task of an
                        // idle connection holds pointers, not their states.
                        let accept =
                            Box::pin(tokio::time::timeout(first_bytes, acceptor.accept(stream)));
                        let stream = match accept.await {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(e)) => {
                                // rustls's own errors come wrapped in an
                                // io::Error of kind InvalidData.
                                let tls_error =
                                    e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>());
                                handshakes.tls_failed(if tls_error { "tls" } else { "io" });
                                return Err(format!("TLS handshake: {e}").into());
                            }
                            Err(_) => {
                                handshakes.tls_failed("timeout");
                                return Err("TLS handshake: timed out".into());
                            }
                        };
                        let tls = stream.get_ref().1;
                        handshakes.tls_handshake(tls.protocol_version());
                        if tls.alpn_protocol() == Some(tls::ACME_TLS_ALPN) {
                            // A CA's TLS-ALPN-01 validation: the handshake
                            // was all (RFC 8737 section 3).
                            return Ok(());
                        }
                        let sni = tls.server_name().map(std::sync::Arc::from);
                        let h2 = tls.alpn_protocol() == Some(b"h2") && h2_on;
                        (Io::Tls(Box::new(stream)), sni, h2)
                    }
                };
                let mut stream = tokio_io_timeout::TimeoutStream::new(io);
                stream.set_write_timeout(Some(send_timeout));
                let streams = std::sync::Arc::new(conn::Streams::default());
                let counting = streams.clone();
                let in_flight = park::InFlight::default();
                let requests = in_flight.clone();
                let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                    req.extensions_mut().insert(peer);
                    if sni.is_some() {
                        req.extensions_mut().insert(stack::Sni(sni.clone()));
                    }
                    req.extensions_mut().insert(held.clone());
                    // An HTTP/2 stream counts open until its body is sent;
                    // an HTTP/1.1 request counts in flight as long (park
                    // step 1).
                    let guard = match h2 {
                        true => conn::Guard::Stream(counting.open()),
                        false => conn::Guard::Request(requests.start()),
                    };
                    let answer = stack.serve(req);
                    async move {
                        let resp = answer.await;
                        if let conn::Guard::Request(request) = &guard {
                            if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                                request.upgraded();
                            }
                        }
                        Ok::<_, std::convert::Infallible>(conn::counted(resp, guard))
                    }
                });
                match h2 {
                    true => {
                        let io = TokioIo::new(Box::pin(stream));
                        let mut conn = Box::pin(builders.h2.serve_connection(io, service));
                        Box::pin(conn::drive(
                            conn.as_mut(),
                            stop,
                            Some((streams, first_bytes)),
                        ))
                        .await
                    }
                    false => {
                        park::serve(
                            Box::pin(stream),
                            in_flight,
                            &builders.h1,
                            service,
                            stop,
                            first_bytes,
                            &parked,
                        )
                        .await
                    }
                }
            };
            if let Err(e) = served.await {
                debug!(%remote, "connection: {e}");
            }
        });
    }
    drop(listener);
    // Each connection saw the stop itself (conn step 3).
    let all_done = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(listening.grace, all_done)
        .await
        .is_err()
    {
        warn!(
            open = connections.len(),
            "connections still open after the {:?} grace period; closing them", listening.grace
        );
        connections.abort_all();
    }
    while connections.join_next().await.is_some() {}
}

/// The number of header lines hyper takes when not told
/// (`hyper::server::conn::http1::Builder::max_headers`).
const HYPER_MAX_HEADERS: usize = 100;

/// hyper's connection builders, set up by protocol step 2.
#[derive(Clone)]
struct Builders {
    h1: hyper::server::conn::http1::Builder,
    h2: hyper::server::conn::http2::Builder<TrackedExecutor>,
}

impl Builders {
    fn new(listening: &Listening) -> Builders {
        let mut h1 = hyper::server::conn::http1::Builder::new();
        // The timer is what makes header_read_timeout work at all.
        h1.timer(TokioTimer::new())
            .header_read_timeout(listening.header_read_timeout)
            .max_buf_size(listening.max_header_bytes)
            .keep_alive(true);
        // hyper's own limit is 100 header lines, in room on the stack;
        // any other limit costs it a fill of that many slots per request.
        if listening.max_headers != HYPER_MAX_HEADERS {
            h1.max_headers(listening.max_headers);
        }
        let mut h2 =
            hyper::server::conn::http2::Builder::new(TrackedExecutor(listening.tasks.clone()));
        h2.timer(TokioTimer::new());
        if let Some(cfg) = &listening.http2 {
            let list_size = u32::try_from(listening.max_header_bytes).unwrap_or(u32::MAX);
            let interval = (!cfg.keep_alive_interval.is_zero()).then_some(cfg.keep_alive_interval);
            h2.max_concurrent_streams(cfg.max_concurrent_streams)
                .max_header_list_size(list_size)
                .keep_alive_interval(interval)
                .keep_alive_timeout(cfg.keep_alive_timeout)
                // WebSocket over HTTP/2 (RFC 8441), tunnelled as an
                // HTTP/1.1 upgrade to the app.
                .enable_connect_protocol();
        }
        Builders { h1, h2 }
    }
}

impl park::Socket for tokio_io_timeout::TimeoutStream<Io> {
    fn tcp(&self) -> &tokio::net::TcpStream {
        match self.get_ref() {
            Io::Plain(s) => s,
            Io::Tls(s) => s.get_ref().0,
        }
    }
}

/// A client connection's byte stream: plain TCP or TLS over it.
enum Io {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>),
}

impl tokio::io::AsyncRead for Io {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Io {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            Io::Tls(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Spawns HTTP/2 stream tasks on the gateway's task tracker, so they are
/// waited for (and cancelled) with every other task.
#[derive(Clone)]
pub struct TrackedExecutor(pub crate::pool::Tasks);

impl<F> hyper::rt::Executor<F> for TrackedExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        let cancel = self.0.cancel.clone();
        self.0.tracker.spawn(async move {
            tokio::select! {
                _ = fut => {}
                _ = cancel.cancelled() => {}
            }
        });
    }
}

/// Runs `f` when dropped.
pub(crate) fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
