//! The HTTP/1.1 front: listener -> router (Host) -> app -> lease -> forward.
//!
//! Each request: route by `Host` (404 for an unknown host); for a VM app,
//! claim a lease from its pool (held while no instance is free; 503 with
//! `Retry-After` when the queue is full, the hold times out or instances
//! cannot start); forward with hop-by-hop headers removed and
//! `X-Forwarded-For/-Proto/-Host` set, over the instance's kept-alive
//! connections; stream the answer back, the lease held until its body ends.
//! An instance that fails the request gives the client a 502 and is
//! replaced. A VM app's `on_restore` path is snapgate's to call, never a
//! client's: requests that could reach it, under any reading a guest's
//! router may give them ([`crate::path`]), get a 404 and claim nothing.

mod body;
mod router;
mod upstream;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info_span, warn, Instrument};

pub use body::LeasedBody;
pub use router::{host_name, Router};

use crate::pool::Pool;
pub use upstream::{client as upstream_client, InstanceClients, UpstreamClient};

/// Errors a response body may end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every response snapgate sends.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// Where an app's requests go.
pub enum Target {
    /// Instances from the app's pool.
    Pool {
        /// The pool.
        pool: Pool,
        /// Clients of the pool's instances.
        clients: InstanceClients,
        /// Longest wait for response headers.
        response_timeout: Duration,
        /// A path of the guest's that only snapgate calls (the image's
        /// `on_restore` path), as [`crate::path::normalize`] makes it;
        /// client requests that may reach it get a 404.
        internal_path: Option<Vec<Vec<u8>>>,
    },
    /// A fixed upstream address.
    Static {
        /// The address.
        addr: SocketAddr,
        /// Its client.
        client: UpstreamClient,
        /// Longest wait for response headers.
        response_timeout: Duration,
    },
}

/// How forwarding one request to an upstream failed.
enum Failure {
    /// The connection could not be made: the upstream is not accepting.
    Connect(String),
    /// The client's own request body failed (it went away or sent garbage).
    ClientBody(String),
    /// The upstream broke off the exchange.
    Upstream(String),
    /// The instance's VMM died.
    VmGone,
    /// No response headers within the app's response_timeout.
    Timeout(Duration),
}

impl Failure {
    fn of(e: hyper_util::client::legacy::Error) -> Failure {
        let chain = crate::display_chain(&e);
        if e.is_connect() {
            return Failure::Connect(chain);
        }
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            if let Some(h) = cause.downcast_ref::<hyper::Error>() {
                if h.is_user() {
                    return Failure::ClientBody(chain);
                }
            }
            source = cause.source();
        }
        Failure::Upstream(chain)
    }

    /// Whether the instance should be replaced: it refused connections or
    /// its VMM died. A reset or a slow answer alone says nothing about the VM.
    fn breaks_instance(&self) -> bool {
        matches!(self, Failure::Connect(_) | Failure::VmGone)
    }

    fn detail(&self) -> String {
        match self {
            Failure::Connect(e) | Failure::ClientBody(e) | Failure::Upstream(e) => e.clone(),
            Failure::VmGone => "its VMM exited".into(),
            Failure::Timeout(t) => format!("no response headers within {t:?}"),
        }
    }

    /// The response for the client, which names no internals.
    fn response(&self, app: &str) -> Response<ProxyBody> {
        match self {
            Failure::ClientBody(_) => text(
                StatusCode::BAD_REQUEST,
                "snapgate: the request body could not be read\n".into(),
            ),
            Failure::Timeout(t) => text(
                StatusCode::GATEWAY_TIMEOUT,
                format!("snapgate: app {app}: no response within {}s\n", t.as_secs()),
            ),
            _ => text(
                StatusCode::BAD_GATEWAY,
                format!("snapgate: app {app}: the upstream failed the request\n"),
            ),
        }
    }
}

/// Sends `req` with `client`, giving up when `gone` fires or after `timeout`.
async fn send(
    client: &UpstreamClient,
    req: Request<Incoming>,
    gone: Option<&tokio_util::sync::CancellationToken>,
    timeout: Duration,
) -> Result<Response<Incoming>, Failure> {
    let vm_gone = async {
        match gone {
            Some(token) => token.cancelled().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        answer = client.request(req) => answer.map_err(Failure::of),
        _ = vm_gone => Err(Failure::VmGone),
        _ = tokio::time::sleep(timeout) => Err(Failure::Timeout(timeout)),
    }
}

/// The request metrics.
#[derive(Clone)]
pub struct ProxyMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
}

impl ProxyMetrics {
    /// Registers the families on `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<ProxyMetrics> {
        let m = ProxyMetrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "snapgate_requests_total",
                    "Requests by app and response status (app \"\" for unknown hosts).",
                ),
                &["app", "status"],
            )?,
            duration: HistogramVec::new(
                HistogramOpts::new(
                    "snapgate_request_duration_seconds",
                    "Time from request to response headers, holds included.",
                )
                .buckets(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ]),
                &["app"],
            )?,
        };
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.duration.clone()))?;
        Ok(m)
    }

    fn observe(&self, app: &str, status: StatusCode, took: Duration) {
        self.requests
            .with_label_values(&[app, status.as_str()])
            .inc();
        self.duration
            .with_label_values(&[app])
            .observe(took.as_secs_f64());
    }
}

/// Everything a request needs: the router and each app's target.
pub struct Proxy {
    router: Router,
    targets: HashMap<String, Target>,
    metrics: ProxyMetrics,
}

impl Proxy {
    /// A proxy over `targets`, routed by `router`.
    pub fn new(router: Router, targets: HashMap<String, Target>, metrics: ProxyMetrics) -> Proxy {
        Proxy {
            router,
            targets,
            metrics,
        }
    }

    /// The pool of `app`, if it is a VM app.
    pub fn pool(&self, app: &str) -> Option<&Pool> {
        match self.targets.get(app) {
            Some(Target::Pool { pool, .. }) => Some(pool),
            _ => None,
        }
    }

    /// Every pool.
    pub fn pools(&self) -> impl Iterator<Item = &Pool> {
        self.targets.values().filter_map(|t| match t {
            Target::Pool { pool, .. } => Some(pool),
            Target::Static { .. } => None,
        })
    }

    /// Serves one request.
    pub async fn handle(&self, remote: SocketAddr, req: Request<Incoming>) -> Response<ProxyBody> {
        let started = Instant::now();
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()))
            .unwrap_or("")
            .to_owned();
        let Some(app) = self.router.route(&host).map(str::to_owned) else {
            let resp = text(
                StatusCode::NOT_FOUND,
                format!("snapgate: no app serves host {host:?}\n"),
            );
            self.metrics.observe("", resp.status(), started.elapsed());
            return resp;
        };
        let resp = match &self.targets[&app] {
            Target::Pool { internal_path, .. }
                if internal_path
                    .as_deref()
                    .is_some_and(|p| crate::path::reaches(req.uri().path(), p)) =>
            {
                debug!(
                    app,
                    path = req.uri().path(),
                    "refused: the guest's internal path"
                );
                text(StatusCode::NOT_FOUND, "snapgate: not found\n".into())
            }
            Target::Pool {
                pool,
                clients,
                response_timeout,
                ..
            } => match pool.claim().await {
                Err(e) => {
                    debug!(app, "no instance: {e}");
                    let mut resp = text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("snapgate: {}\n", e.public_message()),
                    );
                    resp.headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from(e.retry_after()));
                    resp
                }
                Ok(mut lease) => {
                    let upstream = prepare(req, remote, &host, lease.address().addr.into());
                    let gone = lease.gone().clone();
                    let client = clients.for_lease(pool, &lease);
                    match send(&client, upstream, Some(&gone), *response_timeout).await {
                        Ok(resp) => relay(resp, Some(lease)),
                        Err(failure) => {
                            warn!(app, vm = %lease.instance(), "request failed: {}", failure.detail());
                            if failure.breaks_instance() {
                                lease.mark_broken();
                            }
                            failure.response(&app)
                        }
                    }
                }
            },
            Target::Static {
                addr,
                client,
                response_timeout,
            } => {
                let upstream = prepare(req, remote, &host, *addr);
                match send(client, upstream, None, *response_timeout).await {
                    Ok(resp) => relay(resp, None),
                    Err(failure) => {
                        warn!(app, %addr, "request failed: {}", failure.detail());
                        failure.response(&app)
                    }
                }
            }
        };
        self.metrics.observe(&app, resp.status(), started.elapsed());
        resp
    }
}

/// The upstream's answer for the client: hop-by-hop headers removed, the
/// body streamed with `lease` held until it ends.
fn relay(resp: Response<Incoming>, lease: Option<crate::pool::Lease>) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, LeasedBody::new(body, lease).boxed())
}

/// A short plain-text response.
pub fn text(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut resp = Response::new(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Headers that describe one connection, not the message (RFC 9110 7.6.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop headers, including those named by `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
}

/// Turns the client's request into the upstream request for `addr`.
fn prepare(
    req: Request<Incoming>,
    remote: SocketAddr,
    host: &str,
    addr: SocketAddr,
) -> Request<Incoming> {
    let (mut parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    parts.uri = Uri::builder()
        .scheme("http")
        .authority(addr.to_string())
        .path_and_query(path)
        .build()
        .expect("an address and a path make a URI");
    parts.version = http::Version::HTTP_11;
    let h = &mut parts.headers;
    strip_hop_by_hop(h);
    let client_ip = remote.ip().to_string();
    let forwarded_for = match h.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prior) => format!("{prior}, {client_ip}"),
        None => client_ip,
    };
    if let Ok(v) = HeaderValue::from_str(&forwarded_for) {
        h.insert("x-forwarded-for", v);
    }
    h.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    if let Ok(v) = HeaderValue::from_str(host) {
        h.insert("x-forwarded-host", v);
    }
    Request::from_parts(parts, body)
}

/// Resolves once `stop` turns true (or its sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns must not live across an await.
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}

/// Accepts connections on `listener` until `stop` turns true, then lets
/// open connections finish for at most `grace`.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    header_read_timeout: Duration,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    let mut connections = tokio::task::JoinSet::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    // The timer is what makes header_read_timeout work at all.
    http.timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .keep_alive(true);
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
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let proxy = proxy.clone();
            let span = info_span!("request", %remote, method = %req.method(), uri = %req.uri());
            async move { Ok::<_, Infallible>(proxy.handle(remote, req).await) }.instrument(span)
        });
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        connections.spawn(async move {
            if let Err(e) = conn.await {
                debug!(%remote, "connection: {e}");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        warn!(
            open = connections.len(),
            "connections still open after the {grace:?} grace period; closing them"
        );
        connections.abort_all();
    }
    while connections.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go_including_those_named_in_connection() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
    }
}
