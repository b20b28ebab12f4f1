//! The innermost service: route, claim, forward.
//!
//! Steps for one request (its [`Authority`] set by the stack):
//! 1. Route the authority's name to an app (404 if none).
//! 2. A VM app's `on_restore` path is snapgate's to call, never a client's:
//!    a request that could reach it under any reading a guest's router may
//!    give it ([`crate::path`]) gets a 404 and claims nothing.
//! 3. A body whose `Content-Length` is over the app's `max_body_size` gets
//!    413 at once; any other body is cut off there as it streams.
//! 4. Claim a lease from the app's pool (held while none is free; 503 with
//!    `Retry-After` when the queue is full, the hold times out or no
//!    instance can start). A static app has one fixed upstream. In a
//!    cluster, a request no peer forwarded takes a free local instance if
//!    there is one, else follows the cluster's plan: peers with a warm
//!    instance, then the app's home node and the nodes after it, this
//!    node's pool among them (`crate::cluster`, routing steps 2 to 5). A
//!    request a peer forwarded ([`FromPeer`]) is served from this node's
//!    pool, and a 503 for want of an instance tells the peer so.
//! 5. Forward with [`Upstream::send`], waiting at most `response_timeout`
//!    for response headers once the request is sent whole (504), and
//!    giving up if the instance's VMM dies. A request of which no byte was
//!    written (the connection could not be made) is sent once more: on
//!    another instance for a VM app (the failed one marked broken if it
//!    refused the connection), on a fresh connection for a static one.
//!    With the upstream's own resend (its step 3), a request is sent at
//!    most twice.
//! 6. The answer streams back in a [`ResponseBody`], which holds the lease
//!    and the upstream connection until its end.
//! 7. A request that asks to upgrade (a WebSocket handshake, over HTTP/1.1
//!    or as HTTP/2's extended `CONNECT`) goes with its `Upgrade`; the
//!    app's `101` starts a tunnel that holds the lease for the
//!    connection's life ([`super::tunnel`]). A `101` nobody asked for is a
//!    502.
//!
//! One rule breaks an instance: its VMM exited, or it refused a
//! connection (refused, unreachable, its tap gone; not a connect timeout,
//! which a full backlog gives). A reset or a timeout of one exchange,
//! before or during the body, fails only that request: the next one gets
//! a fresh connection.

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Body;
use hyper::upgrade::OnUpgrade;
use tracing::{debug, warn};

use super::authority::Authority;
use super::body::{RequestBody, ResponseBody};
use super::error::{ErrorKind, ProxyError};
use super::forwarded::{strip_hop_by_hop, FromPeer, Hop};
use super::router::Router;
use super::upstream::{Checkin, InstanceUpstreams, SendError, Upstream, UpstreamConfig};
use super::{ProxyBody, ProxyMetrics, RoutedApp};
use crate::cluster::{Cluster, Hop as ClusterHop};
use crate::pool::{Lease, Pool, Tasks};

/// A request routed (steps 1 to 3, and the client's side of step 7),
/// ready to go on.
struct Routed {
    app: Arc<RoutedApp>,
    target: Arc<Target>,
    req: Request<RequestBody>,
    upgrade: Option<Switch>,
    /// The table it routed on, kept until it ends (see [`Table`]).
    table: Arc<Table>,
}

/// A request's upgrade (step 7): the protocol, the client's side of the
/// connection once switched, and what the connection holds.
struct Switch {
    protocol: HeaderValue,
    client: OnUpgrade,
    extended_connect: bool,
    held: Option<super::conn::Held>,
}

/// What an app's requests need besides its upstreams.
#[derive(Clone, Debug)]
pub struct AppLimits {
    /// Longest wait for response headers (504 after).
    pub response_timeout: Duration,
    /// Longest wait between two reads of the response body (and for a
    /// blocked write of the request to the app).
    pub upstream_read_timeout: Duration,
    /// Largest request body, in bytes (413 over it).
    pub max_body_size: u64,
}

/// Where an app's requests go.
// Each target lives behind an `Arc` in the routing table, made once per
// config load: a static app's larger size costs nothing per request.
#[allow(clippy::large_enum_variant)]
pub enum Target {
    /// Instances from the app's pool.
    Pool {
        /// The app, and its request metrics.
        app: Arc<RoutedApp>,
        /// The pool.
        pool: Pool,
        /// The upstreams of the pool's instances.
        upstreams: InstanceUpstreams,
        /// A path of the guest's that only snapgate calls (the image's
        /// `on_restore` path), as [`crate::path::normalize`] makes it.
        internal_path: Option<Vec<Vec<u8>>>,
        /// Timeouts and size limits.
        limits: AppLimits,
    },
    /// A fixed upstream address.
    Static {
        /// The app, and its request metrics.
        app: Arc<RoutedApp>,
        /// The upstream.
        upstream: Arc<Upstream>,
        /// Timeouts and size limits.
        limits: AppLimits,
    },
}

impl Target {
    fn limits(&self) -> &AppLimits {
        match self {
            Target::Pool { limits, .. } | Target::Static { limits, .. } => limits,
        }
    }

    /// The app.
    pub fn app(&self) -> &Arc<RoutedApp> {
        match self {
            Target::Pool { app, .. } | Target::Static { app, .. } => app,
        }
    }
}

/// Whose answer a response is: a response extension the metrics and the
/// access log read.
#[derive(Clone, Debug)]
pub struct RoutedTo {
    /// The app.
    pub app: Arc<RoutedApp>,
    /// The instance that answered (a pool's app, once one was leased).
    pub instance: Option<Arc<str>>,
    /// How long the request was held for an instance; `None`: not held.
    pub held: Option<Duration>,
}

impl RoutedTo {
    /// For an answer of `app` not from an instance.
    pub fn app(app: Arc<RoutedApp>) -> RoutedTo {
        RoutedTo {
            app,
            instance: None,
            held: None,
        }
    }
}

/// One routing table: the router and every app's target. A request
/// routes on the table current when it arrives and keeps it (its target
/// included) until it ends; a reload swaps in a whole new table at once.
pub struct Table {
    router: Router,
    targets: HashMap<Arc<str>, Arc<Target>>,
}

impl Table {
    /// The apps of `targets`, routed by `router`.
    pub fn new(router: Router, targets: HashMap<Arc<str>, Arc<Target>>) -> Table {
        Table { router, targets }
    }

    /// Every app's target, by name.
    pub fn targets(&self) -> &HashMap<Arc<str>, Arc<Target>> {
        &self.targets
    }
}

/// Every app's target, and the router to them, as one table swapped whole
/// on reload.
pub struct Apps {
    table: arc_swap::ArcSwap<Table>,
    metrics: ProxyMetrics,
    tasks: Tasks,
    /// Ends every tunnel ([`Apps::end_tunnels`]).
    tunnels: tokio_util::sync::CancellationToken,
    /// The tunnels open, to wait for at shutdown.
    tunnel_tasks: tokio_util::task::TaskTracker,
    /// The cluster this node routes in, and its peers' upstreams.
    cluster: Option<Peers>,
}

/// A cluster node's routing: the cluster, and one kept-alive upstream per
/// peer address.
struct Peers {
    cluster: Cluster,
    /// By node: its address now, and the upstream there (replaced when
    /// the address changes; one per node, whatever its addresses were).
    upstreams: dashmap::DashMap<Arc<str>, (std::net::SocketAddr, Arc<Upstream>)>,
    config: UpstreamConfig,
}

impl Peers {
    /// The upstream of `node` at `address`: made on first use, and anew
    /// when the node's address changed.
    fn upstream(&self, node: &Arc<str>, address: std::net::SocketAddr) -> Arc<Upstream> {
        let make = || (address, Upstream::new(address, None, self.config.clone()));
        let mut slot = self.upstreams.entry(node.clone()).or_insert_with(make);
        if slot.0 != address {
            *slot = make();
        }
        slot.1.clone()
    }
}

/// What answered a pool's request: an instance of this node's (its lease
/// with it), or a peer node.
struct Served {
    resp: Response<hyper::body::Incoming>,
    checkin: Checkin,
    lease: Option<Lease>,
    /// The instance's name, or `peer:<node>`.
    instance: Arc<str>,
    held: Option<Duration>,
}

impl Apps {
    /// The apps of `table`; upgraded connections' tunnels run on `tasks`.
    pub fn new(table: Table, metrics: ProxyMetrics, tasks: Tasks) -> Apps {
        Apps {
            table: arc_swap::ArcSwap::from_pointee(table),
            metrics,
            tunnels: tasks.cancel.child_token(),
            tunnel_tasks: tokio_util::task::TaskTracker::new(),
            tasks,
            cluster: None,
        }
    }

    /// These apps, routed in `cluster` (module doc, step 4); forwards to
    /// peers use upstreams made with `config`.
    pub fn with_cluster(mut self, cluster: Cluster, config: UpstreamConfig) -> Apps {
        self.cluster = Some(Peers {
            cluster,
            upstreams: Default::default(),
            config,
        });
        self
    }

    /// At shutdown: lets open tunnels (upgraded connections) run until
    /// `deadline` (the end of the grace period), then ends those left,
    /// releasing their leases.
    pub async fn end_tunnels(&self, deadline: tokio::time::Instant) {
        self.tunnel_tasks.close();
        let _ = tokio::time::timeout_at(deadline, self.tunnel_tasks.wait()).await;
        self.tunnels.cancel();
    }

    /// The current table.
    pub fn table(&self) -> Arc<Table> {
        self.table.load_full()
    }

    /// Makes `table` current, atomically: requests that arrive from now on
    /// route on it; those in flight keep the one they routed on.
    pub fn swap(&self, table: Table) {
        self.table.store(Arc::new(table));
    }

    /// The pool of `app`, if it is a VM or runtime app.
    pub fn pool(&self, app: &str) -> Option<Pool> {
        match self.table.load().targets.get(app).map(|t| &**t) {
            Some(Target::Pool { pool, .. }) => Some(pool.clone()),
            _ => None,
        }
    }

    /// Every pool of the current table.
    pub fn pools(&self) -> Vec<Pool> {
        let table = self.table.load();
        table
            .targets
            .values()
            .filter_map(|t| match &**t {
                Target::Pool { pool, .. } => Some(pool.clone()),
                Target::Static { .. } => None,
            })
            .collect()
    }

    /// The module doc's steps for one request.
    ///
    /// Not an `async fn`: the steps before the forward run before its
    /// future exists, so that the future holds none of their locals (a
    /// future keeps room for every local in scope at an await, moved or
    /// not, and is moved whole; a request is 328 bytes).
    fn serve(
        self: &Arc<Self>,
        req: Request<RequestBody>,
    ) -> impl std::future::Future<Output = Result<Response<ProxyBody>, ProxyError>> + Send + 'static
    {
        match self.route(req) {
            Err(e) => futures::future::Either::Left(std::future::ready(Err(e))),
            Ok(routed) => futures::future::Either::Right(self.clone().forward(routed)),
        }
    }

    /// Steps 1, 2, 3 and the client's side of step 7: where `req` goes.
    fn route(&self, mut req: Request<RequestBody>) -> Result<Routed, ProxyError> {
        let Some(authority) = req.extensions().get::<Authority>().cloned() else {
            return Err(ProxyError::new(ErrorKind::BadRequest(
                "the request names no host",
            )));
        };
        // Step 1, on the table current now.
        let table = self.table.load_full();
        let Some(target) = table
            .router
            .route(&authority.name)
            .and_then(|app| table.targets.get(app))
        else {
            return Err(ProxyError::new(ErrorKind::UnknownHost(authority.name)));
        };
        let app = target.app();
        // Step 3.
        let limits = target.limits();
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limits.max_body_size) {
            return Err(ErrorKind::BodyTooLarge(limits.max_body_size).of(app));
        }
        req.body_mut().set_limit(limits.max_body_size);
        // Step 7: the client's side of an upgrade, taken before the
        // request goes on.
        let hop = req.extensions().get::<Hop>().cloned().unwrap_or_default();
        let websocket = |p: &HeaderValue| p.as_bytes().eq_ignore_ascii_case(b"websocket");
        if hop.extended_connect && !hop.upgrade.as_ref().is_some_and(websocket) {
            return Err(ErrorKind::NotImplemented(
                "extended CONNECT for a protocol other than websocket",
            )
            .of(app));
        }
        let upgrade = hop.upgrade.clone().map(|protocol| Switch {
            protocol,
            held: req.extensions().get::<super::conn::Held>().cloned(),
            client: hyper::upgrade::on(&mut req),
            extended_connect: hop.extended_connect,
        });
        let req = to_origin(req, &authority, &hop).map_err(|k| k.of(app))?;
        if let Target::Pool {
            internal_path: Some(internal),
            ..
        } = &**target
        {
            if crate::path::reaches(req.uri().path(), internal) {
                // Step 2.
                debug!(%app, path = req.uri().path(), "refused: the guest's internal path");
                return Err(ErrorKind::InternalPath.of(app));
            }
        }
        Ok(Routed {
            app: app.clone(),
            target: target.clone(),
            req,
            upgrade,
            table,
        })
    }

    /// Steps 4 to 7 for a routed request. Not an `async fn`, for the
    /// reason [`Apps::serve`] gives: its future holds `routed` once.
    #[allow(clippy::manual_async_fn)]
    fn forward(
        self: Arc<Self>,
        routed: Routed,
    ) -> impl std::future::Future<Output = Result<Response<ProxyBody>, ProxyError>> + Send + 'static
    {
        async move {
            let app = &routed.app;
            let asked = routed.upgrade.is_some();
            let resp = match &*routed.target {
                Target::Pool {
                    pool,
                    upstreams,
                    limits,
                    ..
                } => {
                    let from_peer = routed.req.extensions().get::<FromPeer>().cloned();
                    if let Some(FromPeer { node, now }) = &from_peer {
                        debug!(%app, peer = %node, now, "forwarded by a peer: served here");
                    }
                    // Boxed: a static app's request does not carry this
                    // path's state in its future.
                    let sent = match (&self.cluster, &from_peer) {
                        (Some(peers), None) => {
                            Box::pin(self.via_cluster(
                                peers, app, pool, upstreams, limits, routed.req, asked,
                            ))
                            .await
                        }
                        // Served here. A peer's forward to a warm
                        // instance it saw (mode `now`): a free one now,
                        // or a refusal at once.
                        (_, from_peer) => {
                            let now = matches!(from_peer, Some(FromPeer { now: true, .. }));
                            let first = if now { pool.try_claim() } else { None };
                            let sent = if now && first.is_none() {
                                Err(ErrorKind::NoInstance(crate::pool::ClaimError::NoneFree {
                                    app: app.name().to_string(),
                                })
                                .of(app))
                            } else {
                                Box::pin(self.via_pool(
                                    app, pool, upstreams, limits, routed.req, asked, first,
                                ))
                                .await
                            };
                            sent.map_err(|mut e| {
                                e.refused_to_peer = from_peer.is_some();
                                e
                            })
                        }
                    };
                    let served = sent.inspect_err(|e| count(app, e))?;
                    let mut resp = self.answer(
                        app,
                        served.resp,
                        served.checkin,
                        served.lease,
                        limits,
                        routed.upgrade,
                    );
                    resp.extensions_mut().insert(RoutedTo {
                        app: app.clone(),
                        instance: Some(served.instance),
                        held: served.held,
                    });
                    resp
                }
                Target::Static {
                    upstream, limits, ..
                } => {
                    let timeout = limits.response_timeout;
                    let mut sent = exchange(upstream, routed.req, None, timeout, asked).await;
                    if let Err(Retry::NotSent { req, cause }) = sent {
                        debug!(%app, "connect failed ({cause}); trying a fresh connection");
                        self.metrics.retried(app.name(), "connect");
                        sent = exchange(upstream, *req, None, timeout, asked).await;
                    }
                    let (resp, checkin) = sent
                        .map_err(|e| e.into_error(app))
                        .inspect_err(|e| count(app, e))?;
                    let mut resp = self.answer(app, resp, checkin, None, limits, routed.upgrade);
                    resp.extensions_mut().insert(RoutedTo::app(app.clone()));
                    resp
                }
            };
            drop(routed.table);
            Ok(resp)
        }
    }

    /// Step 6, or step 7 for a `101` to an upgrade.
    fn answer(
        &self,
        app: &Arc<RoutedApp>,
        resp: Response<hyper::body::Incoming>,
        checkin: Checkin,
        lease: Option<Lease>,
        limits: &AppLimits,
        upgrade: Option<Switch>,
    ) -> Response<ProxyBody> {
        let extended_connect = upgrade.as_ref().is_some_and(|s| s.extended_connect);
        let Some(Switch {
            protocol,
            client,
            held: connection,
            ..
        }) = upgrade.filter(|_| resp.status() == StatusCode::SWITCHING_PROTOCOLS)
        else {
            if extended_connect && resp.status().is_success() {
                // A 2xx would tell an HTTP/2 client its tunnel is open
                // (RFC 8441 section 5); the app did not switch.
                let e = ErrorKind::BadAnswer("the app did not accept the WebSocket".into()).of(app);
                count(app, &e);
                return e.response();
            }
            return relay(resp, checkin, lease, limits.upstream_read_timeout, app);
        };
        let switched_to = resp.headers().get(header::UPGRADE);
        if switched_to.is_some_and(|p| !p.as_bytes().eq_ignore_ascii_case(protocol.as_bytes())) {
            let e = ErrorKind::BadAnswer("the app switched to another protocol than asked".into())
                .of(app);
            count(app, &e);
            return e.response();
        }
        let (mut parts, body) = resp.into_parts();
        let upstream = parts
            .extensions
            .remove::<OnUpgrade>()
            .unwrap_or_else(|| hyper::upgrade::on(Response::new(())));
        // The app's own Upgrade (what it switched to) and Connection go
        // to the client; other hop-by-hop fields do not.
        let switched = parts
            .headers
            .get(header::UPGRADE)
            .cloned()
            .unwrap_or(protocol);
        strip_hop_by_hop(&mut parts.headers);
        strip_cluster_fields(&mut parts.headers);
        if extended_connect {
            // HTTP/2: the tunnel opens with a 200 and none of HTTP/1.1's
            // handshake fields (RFC 8441 section 5).
            parts.status = StatusCode::OK;
            parts.headers.remove("sec-websocket-accept");
        } else {
            parts.headers.insert(header::UPGRADE, switched.clone());
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        let counted = self
            .metrics
            .upgraded(app.name(), switched.to_str().unwrap_or("other"));
        debug!(%app, protocol = ?switched, "switching protocols");
        let held = (lease, checkin, body, counted, connection);
        let tunnel = super::tunnel::run(
            client,
            upstream,
            limits.upstream_read_timeout,
            self.tunnels.clone(),
            held,
        );
        // On the gateway's tracker, and counted among the tunnels.
        self.tasks
            .tracker
            .spawn(self.tunnel_tasks.track_future(tunnel));
        Response::from_parts(
            parts,
            http_body_util::Empty::new().map_err(|e| match e {}).boxed(),
        )
    }

    /// Steps 4 and 5 for a pool's instance, with step 5's one retry on
    /// another instance.
    ///
    /// `first`: a lease already taken (a cluster's free local instance),
    /// used for the first attempt.
    #[allow(clippy::too_many_arguments)]
    async fn via_pool(
        &self,
        app: &Arc<RoutedApp>,
        pool: &Pool,
        upstreams: &InstanceUpstreams,
        limits: &AppLimits,
        req: Request<RequestBody>,
        asked: bool,
        mut first: Option<Lease>,
    ) -> Result<Served, ProxyError> {
        let mut req = req;
        // For the warnings below: the request span is DEBUG (an INFO one
        // costs a fifth of the warm path's instructions).
        let (method, uri) = (req.method().clone(), req.uri().clone());
        // How long it was held, over both attempts.
        let mut held: Option<Duration> = None;
        let add = |held: Option<Duration>, more: Option<Duration>| match (held, more) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
        for attempt in 0..2 {
            let claimed = match first.take() {
                Some(lease) => Ok(lease),
                None => pool.claim().await,
            };
            let mut lease = match claimed {
                Ok(lease) => lease,
                Err((e, waited)) => {
                    return Err(ErrorKind::NoInstance(e).of(app).on(None, add(held, waited)))
                }
            };
            held = add(held, lease.held());
            let upstream = upstreams.for_lease(pool, &lease);
            let gone = lease.gone().clone();
            match exchange(&upstream, req, Some(&gone), limits.response_timeout, asked).await {
                Ok((resp, checkin)) => {
                    return Ok(Served {
                        resp,
                        checkin,
                        instance: lease.name().clone(),
                        lease: Some(lease),
                        held,
                    })
                }
                Err(Retry::NotSent { req: unsent, cause }) => {
                    warn!(%app, vm = %lease.instance(), %method, %uri, "no connection to the instance: {cause}");
                    if unreachable(&cause) {
                        lease.mark_broken();
                    }
                    if attempt == 1 {
                        return Err(ErrorKind::Connect(cause.to_string())
                            .of(app)
                            .on(Some(lease.name().clone()), held));
                    }
                    self.metrics.retried(app.name(), "connect");
                    req = *unsent;
                }
                Err(Retry::Failed(kind)) => {
                    if matches!(kind, ErrorKind::VmGone) {
                        lease.mark_broken();
                    }
                    warn!(%app, vm = %lease.instance(), %method, %uri, "request failed: {kind}");
                    return Err(kind.of(app).on(Some(lease.name().clone()), held));
                }
            }
        }
        unreachable!("the loop returns on its second attempt")
    }

    /// Step 4 in a cluster, for a request no peer forwarded
    /// (`crate::cluster`, routing steps 2 to 5), then step 5 wherever it
    /// went.
    #[allow(clippy::too_many_arguments)]
    async fn via_cluster(
        &self,
        peers: &Peers,
        app: &Arc<RoutedApp>,
        pool: &Pool,
        upstreams: &InstanceUpstreams,
        limits: &AppLimits,
        req: Request<RequestBody>,
        asked: bool,
    ) -> Result<Served, ProxyError> {
        // Routing step 2.
        if let Some(lease) = pool.try_claim() {
            return self
                .via_pool(app, pool, upstreams, limits, req, asked, Some(lease))
                .await;
        }
        // A request that came through two snapgates before this one went
        // round (nodes whose hop markers do not verify: another secret, or
        // clocks apart): it is served here, not sent round again.
        if snapgate_hops(req.headers()) > 2 {
            warn!(%app, "a request passed through snapgate three times: served here (do the nodes share one cluster secret and clock?)");
            return self
                .via_pool(app, pool, upstreams, limits, req, asked, None)
                .await;
        }
        let cluster = &peers.cluster;
        let plan = cluster.plan(app.name());
        // Routing step 4: only a request with no body goes on after a
        // refusal, rebuilt from its head.
        let head = req
            .body()
            .is_empty()
            .then(|| super::upstream::head_of(&req));
        let mut req = Some(req);
        let mut last_error = None;
        for (i, hop) in plan.iter().enumerate() {
            let more = i + 1 < plan.len();
            let this = match req.take() {
                Some(r) => r,
                None => match &head {
                    Some(head) => super::upstream::rebuild(head),
                    None => break,
                },
            };
            match hop {
                ClusterHop::Local => {
                    match self
                        .via_pool(app, pool, upstreams, limits, this, asked, None)
                        .await
                    {
                        Err(e)
                            if more
                                && head.is_some()
                                && matches!(e.kind, ErrorKind::NoInstance(_)) =>
                        {
                            debug!(%app, "no local instance ({}); the next node", e.kind);
                            last_error = Some(e);
                        }
                        other => return other,
                    }
                }
                ClusterHop::Peer {
                    node,
                    address,
                    reason,
                } => {
                    let upstream = peers.upstream(node, *address);
                    let mut this = this;
                    // To a warm instance: refused at once if it is gone, so
                    // the request goes on to the home node without a wait
                    // (it can, having no body).
                    let now = *reason == crate::cluster::Reason::Warm && head.is_some() && more;
                    // The peer may hold the request for an instance first.
                    let timeout = match now {
                        true => limits.response_timeout,
                        false => limits.response_timeout + pool.sizing().hold_timeout,
                    };
                    let marker = cluster.marker(
                        now,
                        this.method(),
                        this.headers()
                            .get(header::HOST)
                            .map_or(&b""[..], |h| h.as_bytes()),
                        this.uri().path_and_query().map_or("", |p| p.as_str()),
                    );
                    this.headers_mut()
                        .insert(crate::cluster::HOP_MARKER, marker);
                    let sent = exchange(&upstream, this, None, timeout, asked).await;
                    match sent {
                        Ok((resp, checkin)) => {
                            cluster.metrics().forwarded(*reason);
                            let refused = resp.status() == StatusCode::SERVICE_UNAVAILABLE
                                && resp.headers().contains_key(crate::cluster::REFUSED);
                            if refused {
                                cluster.metrics().peer_error(node, "refused");
                            }
                            if refused && more && head.is_some() {
                                debug!(%app, peer = %node, "the peer has no instance; the next node");
                                drop((resp, checkin));
                                continue;
                            }
                            let mut resp = resp;
                            resp.headers_mut().remove(crate::cluster::REFUSED);
                            return Ok(Served {
                                resp,
                                checkin,
                                lease: None,
                                instance: format!("peer:{node}").into(),
                                held: None,
                            });
                        }
                        // A peer that takes no connection: nothing was
                        // sent, the request goes to the next node.
                        Err(Retry::NotSent { req: back, cause }) => {
                            warn!(%app, peer = %node, "no connection to the peer: {cause}");
                            cluster.metrics().peer_error(node, "connect");
                            cluster.skip(node);
                            let mut back = *back;
                            back.headers_mut().remove(crate::cluster::HOP_MARKER);
                            req = Some(back);
                            // A refusal seen before says more than this.
                            last_error = last_error
                                .or_else(|| Some(ErrorKind::Connect(cause.to_string()).of(app)));
                        }
                        Err(Retry::Failed(kind)) => {
                            warn!(%app, peer = %node, "forward to the peer failed: {kind}");
                            cluster.metrics().peer_error(node, "failed");
                            // No answer in time: a hung node is skipped
                            // until it answers a probe.
                            if matches!(kind, ErrorKind::ResponseTimeout(_)) {
                                cluster.skip(node);
                            }
                            return Err(kind.of(app));
                        }
                    }
                }
            }
        }
        Err(last_error.unwrap_or_else(|| ErrorKind::Internal.of(app)))
    }
}

/// Whether a connect error says the instance cannot take connections at
/// all (the module doc's rule): refused, unreachable, or its tap gone. A
/// connect timeout may be a full backlog under load, and breaks nothing.
fn unreachable(e: &std::io::Error) -> bool {
    use nix::errno::Errno;
    e.kind() == std::io::ErrorKind::ConnectionRefused
        || matches!(
            e.raw_os_error().map(Errno::from_raw),
            Some(Errno::EHOSTUNREACH | Errno::ENETUNREACH | Errno::ENODEV)
        )
}

/// Counts `e` in `snapgate_upstream_errors_total` if the app or its
/// instance failed the request.
fn count(app: &RoutedApp, e: &ProxyError) {
    if let Some(kind) = e.kind.upstream_kind() {
        app.upstream_error(kind);
    }
}

/// What a failed exchange was: an answer hyper could not parse is the
/// app's bad answer; anything else broke the exchange off.
fn upstream_failure(e: &(dyn std::error::Error + 'static)) -> ErrorKind {
    let mut source = Some(e);
    while let Some(cause) = source {
        if let Some(h) = cause.downcast_ref::<hyper::Error>() {
            if h.is_parse() || h.is_parse_status() || h.is_parse_too_large() {
                return ErrorKind::BadAnswer(crate::display_chain(e));
            }
        }
        source = cause.source();
    }
    ErrorKind::Upstream(crate::display_chain(e))
}

/// How one exchange failed.
enum Retry {
    /// Nothing was written; the request is back.
    NotSent {
        req: Box<Request<RequestBody>>,
        cause: std::io::Error,
    },
    /// It failed for good.
    Failed(ErrorKind),
}

impl Retry {
    fn into_error(self, app: &Arc<RoutedApp>) -> ProxyError {
        match self {
            Retry::NotSent { cause, .. } => ErrorKind::Connect(cause.to_string()).of(app),
            Retry::Failed(kind) => kind.of(app),
        }
    }
}

/// One exchange with `upstream`: response headers within `timeout` of
/// the request's end, or how it failed; `gone` fires if the instance's VMM
/// dies. A `101` is an answer only when the request `asked` to upgrade.
///
/// Not an `async fn`, so that its future holds `req` once (see
/// [`Upstream::send`]).
#[allow(clippy::manual_async_fn)]
fn exchange<'a>(
    upstream: &'a Arc<Upstream>,
    req: Request<RequestBody>,
    gone: Option<&'a tokio_util::sync::CancellationToken>,
    timeout: Duration,
    asked: bool,
) -> impl std::future::Future<Output = Result<(Response<hyper::body::Incoming>, Checkin), Retry>>
       + Send
       + 'a {
    async move {
        let vm_gone = async {
            match gone {
                Some(token) => token.cancelled().await,
                None => std::future::pending().await,
            }
        };
        // The wait for the answer starts once the request is sent whole: an
        // upload's own pace is bounded by body_read_timeout, not this.
        let sent_whole = req.body().sent();
        let answer_overdue = async {
            if let Some(sent_whole) = sent_whole {
                sent_whole.cancelled().await;
            }
            tokio::time::sleep(timeout).await
        };
        // Biased, in the order written: an answer that came in the same wake
        // as the deadline or the VM's end is taken, and no random number is
        // drawn at each poll (as an unbiased select does).
        let sent = tokio::select! {
            biased;
            sent = upstream.send(req) => sent.map_err(|e| match e {
                SendError::NotSent { req, cause } => Retry::NotSent { req, cause },
                SendError::Failed(e) => Retry::Failed(
                    ErrorKind::from_body_error(e.as_ref())
                        .unwrap_or_else(|| upstream_failure(e.as_ref())),
                ),
            }),
            _ = vm_gone => Err(Retry::Failed(ErrorKind::VmGone)),
            _ = answer_overdue => Err(Retry::Failed(ErrorKind::ResponseTimeout(timeout))),
        };
        if let Ok((resp, _)) = &sent {
            // A transfer coding that would be lost on the way (framing.rs,
            // rule 3): the connection is dropped with its checkin, the
            // client gets a 502.
            if let Some(coding) = super::framing::response_coding(resp.headers()) {
                return Err(Retry::Failed(ErrorKind::BadAnswer(format!(
                    "the app's response has a transfer coding snapgate does not decode: {coding}"
                ))));
            }
        }
        match sent {
            // Nothing asked to switch protocols: the connection is not HTTP any
            // more (dropped with its checkin), and the client gets a 502.
            Ok((resp, _)) if resp.status() == StatusCode::SWITCHING_PROTOCOLS && !asked => {
                Err(Retry::Failed(ErrorKind::BadAnswer(
                    "the app switched protocols unasked".into(),
                )))
            }
            other => other,
        }
    }
}

/// The request as the app is sent it: an origin-form target (`*` kept for
/// `OPTIONS *`; an absolute-form target's empty path sent as `/`, its
/// query kept), HTTP/1.1, `Host` the routed authority, and
/// `Transfer-Encoding: chunked` for a body of unknown length, so the body
/// reaches the app as framed whatever the method (RFC 9112 section 6).
fn to_origin(
    req: Request<RequestBody>,
    authority: &Authority,
    hop: &Hop,
) -> Result<Request<RequestBody>, ErrorKind> {
    let (mut parts, body) = req.into_parts();
    // An origin-form or asterisk-form target goes as it came; only an
    // absolute-form one is rewritten.
    if parts.uri.authority().is_some() {
        let target = match parts.uri.path_and_query().map(|p| p.as_str()) {
            Some(t) if t.starts_with('/') => t.to_owned(),
            // `http://a.test?q`: the path is empty.
            Some(t) => format!("/{t}"),
            None => "/".into(),
        };
        parts.uri = Uri::try_from(target)
            .map_err(|_| ErrorKind::BadRequest("the request target is malformed"))?;
    }
    parts.headers.insert(header::HOST, authority.value.clone());
    // Step 7: an upgrade asked for goes on (forwarding removed the fields).
    if let Some(protocol) = &hop.upgrade {
        parts.headers.insert(header::UPGRADE, protocol.clone());
    }
    // A client that takes trailers gets the app's (RFC 9110 section
    // 10.1.4): snapgate passes them on.
    if hop.te_trailers {
        parts
            .headers
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
    let connection = match (hop.upgrade.is_some(), hop.te_trailers) {
        (true, true) => Some("upgrade, te"),
        (true, false) => Some("upgrade"),
        (false, true) => Some("te"),
        (false, false) => None,
    };
    if let Some(c) = connection {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static(c));
    }
    let mut body = body;
    if hop.extended_connect {
        // RFC 8441 section 5, the other way: an HTTP/1.1 WebSocket
        // handshake (RFC 6455 section 4.1) carrying the client's version,
        // protocols and extensions, with a key of its own.
        parts.method = http::Method::GET;
        let mut key = [0u8; 16];
        getrandom::fill(&mut key).map_err(|_| ErrorKind::Internal)?;
        let key = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, key);
        if let Ok(v) = HeaderValue::from_str(&key) {
            parts.headers.insert("sec-websocket-key", v);
        }
        parts.extensions.remove::<hyper::ext::Protocol>();
        body = RequestBody::empty();
    }
    // A gateway "MUST send an appropriate Via header field in each inbound
    // request message" (RFC 9110 section 7.6.3).
    // The version is the one received (section 7.6.3).
    let received = match parts.version {
        Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2",
        _ => "1.1",
    };
    // HTTP/2 clients may send each cookie in a field of its own; they are
    // one field again for HTTP/1.1 (RFC 9113 section 8.2.3).
    if parts.version == Version::HTTP_2 && parts.headers.get_all(header::COOKIE).iter().count() > 1
    {
        let joined = parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .map(|v| v.as_bytes())
            .collect::<Vec<_>>()
            .join(&b"; "[..]);
        if let Ok(v) = HeaderValue::from_bytes(&joined) {
            parts.headers.insert(header::COOKIE, v);
        }
    }
    let via = match super::forwarded::joined(&parts.headers, &header::VIA) {
        Some(prior) => HeaderValue::from_str(&format!("{prior}, {received} snapgate")).ok(),
        None => Some(HeaderValue::from_static(match received {
            "1.0" => "1.0 snapgate",
            "2" => "2 snapgate",
            _ => "1.1 snapgate",
        })),
    };
    if let Some(v) = via {
        parts.headers.insert(header::VIA, v);
    }
    parts.version = Version::HTTP_11;
    if !body.is_empty() && body.size_hint().exact().is_none() {
        parts.headers.remove(header::CONTENT_LENGTH);
        parts.headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
    Ok(Request::from_parts(parts, body))
}

/// The app's answer for the client: hop-by-hop headers removed, snapgate's
/// own HTTP version (RFC 9110 section 6.2: an intermediary sends its own),
/// the body streamed in a [`ResponseBody`].
fn relay(
    resp: Response<hyper::body::Incoming>,
    checkin: Checkin,
    lease: Option<Lease>,
    read_timeout: Duration,
    app: &Arc<RoutedApp>,
) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    // hyper read a body framed both ways as chunked (RFC 9112 section 6.3):
    // its Content-Length is not the client's framing.
    if parts.headers.contains_key(header::TRANSFER_ENCODING) {
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    strip_hop_by_hop(&mut parts.headers);
    strip_cluster_fields(&mut parts.headers);
    parts.version = Version::HTTP_11;
    let body = ResponseBody::new(body, checkin, lease, read_timeout, app.clone());
    Response::from_parts(parts, body.boxed())
}

/// How many `Via` entries name snapgate (this one's included, once
/// [`to_origin`] added it).
fn snapgate_hops(headers: &http::HeaderMap) -> usize {
    headers
        .get_all(header::VIA)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter(|entry| entry.split_whitespace().nth(1) == Some("snapgate"))
        .count()
}

/// Removes the cluster's own fields from an answer: only a node sets them
/// (its refusal, `crate::cluster` routing step 4), never an app, and no
/// client sees them. A peer's refusal is read before this.
fn strip_cluster_fields(headers: &mut http::HeaderMap) {
    headers.remove(crate::cluster::REFUSED);
    headers.remove(crate::cluster::HOP_MARKER);
}

/// [`Apps`] as a tower service: the stack's innermost.
#[derive(Clone)]
pub struct AppService(pub Arc<Apps>);

impl tower::Service<Request<RequestBody>> for AppService {
    type Response = Response<ProxyBody>;
    type Error = tower::BoxError;
    type Future = BoxFuture<'static, Result<Response<ProxyBody>, tower::BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), tower::BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<RequestBody>) -> Self::Future {
        use futures::TryFutureExt;
        Box::pin(self.0.serve(req).map_err(Into::into))
    }
}
