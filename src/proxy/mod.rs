//! The front door: listener -> connection caps -> the request stack
//! ([`stack`]) -> app -> lease -> forward.
//!
//! Protocol for a connection:
//! 1. The accept loop takes a connection slot for it (503 and close when
//!    over `max_connections` or `max_connections_per_client`).
//! 2. On the TLS listener, the handshake comes first, bounded by
//!    `header_read_timeout` (its SNI goes with each request); ALPN picks
//!    HTTP/2 (`h2`) or HTTP/1.1. On the plain listener, a connection that
//!    opens with the HTTP/2 preface is HTTP/2 (h2c with prior knowledge,
//!    RFC 9113 section 3.3), any other HTTP/1.1. hyper serves it:
//!    HTTP/1.1 with keep-alive, `header_read_timeout`, `max_header_bytes`
//!    and `max_headers` (431 over either) and upgrades; HTTP/2 with
//!    `http2.max_concurrent_streams`, a header list of at most
//!    `max_header_bytes`, and PINGs every `http2.keep_alive_interval`. A
//!    write to the client blocked for `send_timeout` ends the connection
//!    (the client stopped reading).
//! 3. Each request gets the connection's [`Peer`] and goes through the
//!    stack, whose layers are listed in [`stack`].
//! 4. On stop, the listener closes and open connections get `grace` to
//!    finish: in-flight requests complete with `Connection: close`
//!    (HTTP/1.1) or after a GOAWAY (HTTP/2), idle kept-alive connections
//!    are closed; then what is left is aborted.

mod app;
mod authority;
mod body;
mod error;
mod forwarded;
mod framing;
mod limits;
mod metrics;
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
use hyper_util::server::conn::auto::Builder as AutoBuilder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, warn};

pub use app::{AppLimits, Apps, RoutedTo, Table, Target};
pub use error::{ErrorKind, ProxyError};
pub use forwarded::{ClientAddr, Peer};
pub use limits::ConnectionSlots;
pub use metrics::ProxyMetrics;
pub use router::Router;
pub use stack::{Redirect, Stack, StackConfig};
pub use upstream::{InstanceUpstreams, Upstream, UpstreamConfig};

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
    /// How long open connections may finish after stop.
    pub grace: Duration,
    /// HTTP/2 settings; `None`: HTTP/1.1 only.
    pub http2: Option<crate::config::Http2Config>,
    /// Where HTTP/2 stream tasks run.
    pub tasks: crate::pool::Tasks,
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
    mut stop: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let mut connections = tokio::task::JoinSet::new();
    let slots = listening.slots.clone();
    let local = listener
        .local_addr()
        .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
    let http = builder(&listening);
    loop {
        // Forget connections that have finished.
        while connections.try_join_next().is_some() {}
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
            _ = stopped(&mut stop) => break,
        };
        let ip = remote.ip().to_canonical();
        let slot = match slots.take(
            ip,
            listening.trusted_proxies.iter().any(|n| n.contains(&ip)),
        ) {
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
        let stack = stack.clone();
        let service = move |sni: Option<std::sync::Arc<str>>| {
            let service = tower::ServiceBuilder::new()
                .map_request(move |mut req: Request<Incoming>| {
                    req.extensions_mut().insert(peer);
                    req.extensions_mut().insert(stack::Sni(sni.clone()));
                    req
                })
                .service(stack.clone());
            TowerToHyperService::new(service)
        };
        let (mut http, watcher, tls) = (http.clone(), graceful.watcher(), tls.clone());
        let (send_timeout, handshake_timeout) =
            (listening.send_timeout, listening.header_read_timeout);
        let gauge = metrics.connections().clone();
        connections.spawn(async move {
            // Uncounted however the task ends (an abort at the end of the
            // grace period included).
            gauge.inc();
            let _counted = scopeguard(move || {
                gauge.dec();
                drop(slot);
            });
            let served = match tls {
                None => {
                    let mut io = tokio_io_timeout::TimeoutStream::new(stream);
                    io.set_write_timeout(Some(send_timeout));
                    let io = TokioIo::new(Box::pin(io));
                    let conn = http.serve_connection_with_upgrades(io, service(None));
                    watcher.watch(conn.into_owned()).await
                }
                // The handshake is bounded by header_read_timeout, and the
                // request head after it by the same again.
                Some(acceptor) => {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let tls = stream.get_ref().1;
                            if tls.alpn_protocol() == Some(tls::ACME_TLS_ALPN) {
                                // A CA's TLS-ALPN-01 validation: the
                                // handshake was all (RFC 8737 section 3).
                                return;
                            }
                            let sni = tls.server_name().map(std::sync::Arc::from);
                            // ALPN chose the protocol (step 2).
                            http = match tls.alpn_protocol() {
                                Some(b"h2") => http.http2_only(),
                                _ => http.http1_only(),
                            };
                            let mut io = tokio_io_timeout::TimeoutStream::new(stream);
                            io.set_write_timeout(Some(send_timeout));
                            let io = TokioIo::new(Box::pin(io));
                            let conn = http.serve_connection_with_upgrades(io, service(sni));
                            watcher.watch(conn.into_owned()).await
                        }
                        Ok(Err(e)) => Err(format!("TLS handshake: {e}").into()),
                        Err(_) => Err("TLS handshake: timed out".into()),
                    }
                }
            };
            if let Err(e) = served {
                debug!(%remote, "connection: {e}");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(listening.grace, graceful.shutdown())
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

/// The connection builder of protocol step 2: HTTP/1.1 always, HTTP/2
/// when `listening.http2` allows it.
fn builder(listening: &Listening) -> AutoBuilder<TrackedExecutor> {
    let mut http = AutoBuilder::new(TrackedExecutor(listening.tasks.clone()));
    // The timer is what makes header_read_timeout work at all.
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(listening.header_read_timeout)
        .max_buf_size(listening.max_header_bytes)
        .max_headers(listening.max_headers)
        .keep_alive(true);
    let Some(h2) = &listening.http2 else {
        return http.http1_only();
    };
    let list_size = u32::try_from(listening.max_header_bytes).unwrap_or(u32::MAX);
    let interval = (!h2.keep_alive_interval.is_zero()).then_some(h2.keep_alive_interval);
    http.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(h2.max_concurrent_streams)
        .max_header_list_size(list_size)
        .keep_alive_interval(interval)
        .keep_alive_timeout(h2.keep_alive_timeout);
    http
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
