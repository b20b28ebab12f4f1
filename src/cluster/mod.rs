//! Many snapgate nodes serving one set of apps, sharing one catalog in
//! etcd: which node holds which instances, so that DNS may point at any
//! node and every node routes alike.
//!
//! # The catalog, and this node's part in it
//! 1. Each node writes one entry, `<prefix>nodes/<node>` (a JSON
//!    [`NodeEntry`]: its address, and per app its instances by state and
//!    its `max_instances`), under a lease of `lease_ttl` that it keeps
//!    alive (a keep-alive every third of the TTL). A node that dies stops
//!    the keep-alives and leaves the catalog when its lease expires.
//! 2. The entry is rewritten when the node's pools change, at most once
//!    per `publish_interval`: a task reads every pool's counts (one lock
//!    each) each interval and writes when what routing reads changed (the
//!    apps listed, and whether each has instances free or open), or when
//!    other counts changed and the last write is ten intervals old. A
//!    busy node's leases come and go without a write each. Each entry
//!    carries the run's start (`epoch`) and a `version` counting its
//!    writes.
//! 3. Each node reads every entry once (one consistent `Range`) and then
//!    watches the prefix from the revision after it; each event replaces
//!    its copy ([`Catalog`], swapped whole). The copy is what routing
//!    reads, on every request, without a lock.
//! 4. Any failure talking to etcd (a refused connection, an expired
//!    lease, a keep-alive unanswered within a third of the TTL, a watch
//!    cancelled, broken, or silent for a whole TTL though progress was
//!    asked for each third of it, a member without a leader) ends that
//!    side's session: the node marks itself degraded (`/readyz` says so,
//!    `snapgate_cluster_etcd_up` is 0), keeps its copy of the catalog and
//!    goes on routing from it, and starts a new session after a backoff
//!    (100 ms doubling to 2 s): a fresh client, a new lease and entry, a
//!    fresh read and watch. A session is a client of one member: the
//!    first of the endpoints, from the one last used, that answers a
//!    status request with a leader. Losing that member ends the session,
//!    and the next one goes to another member.
//! 5. A name is one node's: a session that finds an entry under its name
//!    from another address fails (and so retries) until that entry's lease
//!    is gone.
//! 6. On shutdown the node revokes its lease first (its entry goes at
//!    once; at most 1 s is waited for etcd's answer), then drains.
//!
//! # Routing a request (`crate::proxy`, app step 4)
//! 1. A request that carries a valid hop marker (`Snapgate-Hop`,
//!    [`Cluster::verify`]: an HMAC with the shared secret over the
//!    forwarding node, the time, the mode and the request's method, `Host`
//!    and target, within [`MARKER_WINDOW`]) from the address of a node in
//!    the catalog was forwarded by a peer: it is served here, from this
//!    node's pool, and never forwarded again.
//!    Every request loses its `Snapgate-Hop` before the app sees it, so a
//!    client that sends one cannot make a node skip routing (it is
//!    counted as not valid).
//! 2. A free local instance serves the request at once.
//! 3. Else the request follows [`plan`]: peers with a warm instance that
//!    would take it (a cluster-wide warm hit), then the live nodes that
//!    have the app in its rendezvous order, the first being the app's
//!    home node (which restores it, so one app's cold starts land where its
//!    snapshot and code are in the page cache). This node in that order is
//!    its own pool, held there as on a single node. A request without a
//!    body goes to a warm peer in mode `now`: that peer serves it from an
//!    instance free now or refuses at once, without a restore. Otherwise
//!    (mode `hold`) the peer holds it as its own, and the wait for its
//!    answer is `hold_timeout` longer.
//! 4. The next place in the plan is tried when a peer cannot be connected
//!    to (nothing was sent), or refuses with a 503 of its own making
//!    (marked `Snapgate-Refused`, which snapgate removes from every app's
//!    answer) to a request with no body (so nothing of it was sent but its
//!    head), or this node's own pool refuses such a request. Any other
//!    answer, and any failure after the request went out, is the
//!    client's: a broken exchange is a 502, and the request is not sent to
//!    another node (it may have reached the app).
//! 5. A peer that could not be connected to, or that gave no answer
//!    within the wait (a hung process: the kernel still takes its
//!    connections), is skipped (not in plans) until a health check
//!    ([`probe`], each second) gets its listener's answer, or its entry
//!    shows a new run of it (`epoch`) or a new address, or it leaves the
//!    catalog. A peer that answers, even with errors, is not skipped.
//! 6. A request whose `Via` already names snapgate twice went round
//!    (nodes whose markers do not verify each other's): it is served where
//!    it is, not forwarded again.
//!
//! Peer forwards use the proxy's kept-alive upstream connections: one
//! upstream per peer node, made anew when its address changes.

pub mod catalog;
mod etcd;
pub mod metrics;
pub mod placement;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::Mac;
use http::{HeaderName, HeaderValue};
use sha2::Sha256;

pub use catalog::{plan, AppLoad, Catalog, Hop, Known, NodeEntry, Reason};
pub use metrics::ClusterMetrics;

use crate::config::ClusterConfig;
use crate::pool::{Pool, Tasks};

/// The hop marker: `Snapgate-Hop: <node> <proof>`, set by a node on a
/// request it forwards to a peer (routing step 1).
pub const HOP_MARKER: HeaderName = HeaderName::from_static("snapgate-hop");

/// On a 503 a node made itself (no instance for the app), to a request
/// with a valid hop marker: the sending node may try the next node
/// (routing step 4). An app's own 503 never carries it.
pub const REFUSED: HeaderName = HeaderName::from_static("snapgate-refused");

/// The cluster's shared secret, read from `cluster.secret_file`.
pub struct Secret(Vec<u8>);

impl Secret {
    /// The first line of `path`, at least
    /// [`crate::config::MIN_SECRET_LEN`] characters.
    ///
    /// Errors: the file cannot be read, or the line is too short; the
    /// message names the file.
    pub fn from_file(path: &Path) -> anyhow::Result<Secret> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let line = text.lines().next().unwrap_or("").trim();
        if line.chars().count() < crate::config::MIN_SECRET_LEN {
            anyhow::bail!(
                "{}: the secret's first line has {} characters; at least {} are needed \
                 (say, `openssl rand -hex 32`)",
                path.display(),
                line.chars().count(),
                crate::config::MIN_SECRET_LEN
            );
        }
        Ok(Secret(line.as_bytes().to_vec()))
    }

    /// The proof a hop marker carries for a request: HMAC-SHA-256 (RFC
    /// 2104) keyed with the secret, over the forwarding node, the time
    /// (Unix seconds), the mode and the request's method, `Host` and
    /// target, in hex.
    fn proof(
        &self,
        node: &str,
        at: u64,
        mode: &str,
        method: &str,
        host: &[u8],
        target: &str,
    ) -> Vec<u8> {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key");
        for part in [
            b"snapgate-hop".as_slice(),
            node.as_bytes(),
            at.to_string().as_bytes(),
            mode.as_bytes(),
            method.as_bytes(),
            host,
            target.as_bytes(),
        ] {
            mac.update(part);
            mac.update(b"\n");
        }
        mac.finalize().into_bytes().to_vec()
    }
}

type HmacSha256 = hmac::Hmac<Sha256>;

/// How far a hop marker's time may be from this node's clock: nodes keep
/// their clocks within this of each other (NTP does far better).
pub const MARKER_WINDOW: Duration = Duration::from_secs(30);

/// Whether a snapgate listener answers at `address` within `within`: a
/// request for a host no app has (`snapgate-probe.invalid`, RFC 6761
/// section 6.4) gets its 404 naming the host. A TCP connect alone is not
/// enough: the kernel completes handshakes for a stopped process.
pub async fn probe(address: SocketAddr, within: Duration) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
        stream
            .write_all(
                b"GET / HTTP/1.1\r\nHost: snapgate-probe.invalid\r\nConnection: close\r\n\r\n",
            )
            .await
            .ok()?;
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        while answer.len() < 8192 {
            let n = stream.read(&mut buf).await.ok()?;
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&answer);
        Some(text.starts_with("HTTP/1.1 404") && text.contains("snapgate-probe.invalid"))
    };
    tokio::time::timeout(within, exchange)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether etcd is current for this node (protocol step 4).
#[derive(Default)]
struct Health {
    /// Registered under a live lease.
    registered: AtomicBool,
    /// The watch is open.
    watching: AtomicBool,
    /// The last time the open watch said something (an event, or the
    /// progress asked for): the catalog was current then.
    confirmed: Mutex<Option<Instant>>,
}

/// The cluster mode of one node: its catalog, health and peers. Cloning
/// is one pointer.
#[derive(Clone)]
pub struct Cluster(Arc<Inner>);

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.0.node)
            .finish_non_exhaustive()
    }
}

struct Inner {
    config: ClusterConfig,
    node: Arc<str>,
    /// Proves hop markers.
    secret: Secret,
    catalog: arc_swap::ArcSwap<Catalog>,
    /// The IP addresses of the catalog's nodes.
    node_ips: arc_swap::ArcSwap<std::collections::HashSet<std::net::IpAddr>>,
    health: Health,
    /// Peers skipped (routing step 5), with the run (`epoch`) and address
    /// of their entry when they were.
    down: dashmap::DashMap<Arc<str>, (u64, SocketAddr)>,
    metrics: ClusterMetrics,
    /// Ends the sessions with etcd (a child of the gateway's token).
    leave: tokio_util::sync::CancellationToken,
    /// The registration session, which revokes the lease as it ends.
    registration: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The etcd endpoint (its index) the last session connected to.
    endpoint: std::sync::atomic::AtomicUsize,
    /// When a node's invalid marker was last warned of (Unix seconds).
    warned: std::sync::atomic::AtomicU64,
}

/// Where a [`Cluster`] reads this node's pools: the gateway's current
/// table (a reload changes it).
pub type Pools = Arc<dyn Fn() -> Vec<Pool> + Send + Sync>;

impl Cluster {
    /// This node's cluster mode from `config`, its secret read; nothing
    /// runs until [`Cluster::spawn`].
    ///
    /// Errors: the secret file (see [`Secret::from_file`]).
    pub fn new(config: &ClusterConfig, metrics: ClusterMetrics) -> anyhow::Result<Cluster> {
        let secret = Secret::from_file(&config.secret_file)
            .map_err(|e| anyhow::anyhow!("cluster.secret_file: {e:#}"))?;
        Ok(Cluster(Arc::new(Inner {
            node: config.node.as_str().into(),
            config: config.clone(),
            secret,
            catalog: Default::default(),
            node_ips: Default::default(),
            health: Health::default(),
            down: Default::default(),
            metrics,
            leave: Default::default(),
            registration: Default::default(),
            endpoint: Default::default(),
            warned: Default::default(),
        })))
    }

    /// Starts the catalog's sessions with etcd (protocol steps 1 to 4) and
    /// the peers' health checks on `tasks`, reading this node's pools from
    /// `pools`. They end with [`Cluster::leave`] or `tasks`' cancellation,
    /// the lease revoked.
    pub fn spawn(&self, pools: Pools, tasks: &Tasks) {
        let cancel = tasks.cancel.clone();
        let leave = self.0.leave.clone();
        tasks.tracker.spawn({
            let (cancel, leave) = (cancel.clone(), leave.clone());
            async move {
                tokio::select! {
                    _ = cancel.cancelled() => leave.cancel(),
                    _ = leave.cancelled() => {}
                }
            }
        });
        let registration = tasks
            .tracker
            .spawn(etcd::register(self.clone(), pools, leave.clone()));
        *self.0.registration.lock().unwrap() = Some(registration);
        tasks
            .tracker
            .spawn(etcd::watch(self.clone(), leave.clone()));
        tasks.tracker.spawn(self.clone().check_peers(leave));
    }

    /// Leaves the cluster (protocol step 5): the sessions end and the
    /// lease is revoked, so peers stop sending requests here; waits at
    /// most 2 s for it. A gateway's shutdown begins with this.
    pub async fn leave(&self) {
        self.0.leave.cancel();
        let registration = self.0.registration.lock().unwrap().take();
        if let Some(task) = registration {
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
    }

    /// This node's name.
    pub fn node(&self) -> &Arc<str> {
        &self.0.node
    }

    /// The hop marker this node's forward of a request carries:
    /// `<node> <unix seconds> <mode> <proof>`, the proof over the
    /// request's `method`, `host` (its `Host` field) and `target` (its
    /// path and query). `now`: the peer serves it only from an instance
    /// free now, else refuses at once (mode `now`); else it may hold it
    /// and restore (mode `hold`).
    pub fn marker(
        &self,
        now: bool,
        method: &http::Method,
        host: &[u8],
        target: &str,
    ) -> HeaderValue {
        let at = unix_now();
        let mode = if now { "now" } else { "hold" };
        let node = &self.0.node;
        let proof = self
            .0
            .secret
            .proof(node, at, mode, method.as_str(), host, target);
        let text = format!("{node} {at} {mode} {}", hex::encode(proof));
        HeaderValue::from_str(&text).expect("a node name, digits and hex are a field value")
    }

    /// The peer that forwarded a request carrying `marker`, and whether
    /// it asked for a free instance only (mode `now`), if the marker is
    /// valid: made with the shared secret for this method, `Host` and
    /// target, within [`MARKER_WINDOW`] of now (the HMAC compared in
    /// constant time).
    pub fn verify(
        &self,
        marker: &HeaderValue,
        method: &http::Method,
        host: &[u8],
        target: &str,
    ) -> Option<(Arc<str>, bool)> {
        let text = marker.to_str().ok()?;
        let mut parts = text.split(' ');
        let (node, at, mode, proof) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let at: u64 = at.parse().ok()?;
        let now = match mode {
            "now" => true,
            "hold" => false,
            _ => return None,
        };
        if parts.next().is_some() || unix_now().abs_diff(at) > MARKER_WINDOW.as_secs() {
            return None;
        }
        let proof = hex::decode(proof).ok()?;
        let expected = self
            .0
            .secret
            .proof(node, at, mode, method.as_str(), host, target);
        let ok: bool = subtle::ConstantTimeEq::ct_eq(expected.as_slice(), proof.as_slice()).into();
        ok.then(|| (node.into(), now))
    }

    /// A request came with a hop marker that is not valid (a client's, or
    /// a peer's with another secret or a clock off by more than
    /// [`MARKER_WINDOW`]): counted; it is routed as any other.
    /// `from` is where the request came from: a node of the catalog's
    /// invalid marker is a misconfigured cluster (another secret, clocks
    /// apart), said at WARN at most once a minute.
    pub fn bad_marker(&self, from: Option<std::net::IpAddr>) {
        self.0.metrics.bad_markers.inc();
        if !from.is_some_and(|ip| self.is_node(ip)) {
            tracing::debug!("a request's hop marker is not valid: removed, the request routed");
            return;
        }
        let now = unix_now();
        let last = self.0.warned.load(std::sync::atomic::Ordering::Relaxed);
        if now >= last + 60
            && self
                .0
                .warned
                .compare_exchange(
                    last,
                    now,
                    std::sync::atomic::Ordering::Relaxed,
                    std::sync::atomic::Ordering::Relaxed,
                )
                .is_ok()
        {
            tracing::warn!(
                from = ?from,
                "a node's hop marker is not valid here: do the nodes share one cluster secret, and clocks within 30 s?"
            );
        }
    }

    /// Whether `ip` is the address of a node in the catalog.
    pub fn is_node(&self, ip: std::net::IpAddr) -> bool {
        self.0.node_ips.load().contains(&ip)
    }

    /// Longest wait for a connection to a peer.
    pub fn peer_connect_timeout(&self) -> Duration {
        self.0.config.peer_connect_timeout
    }

    /// Where a request for `app` goes when this node has no free instance
    /// ([`plan`]), peers skipped by routing step 5 left out.
    pub fn plan(&self, app: &str) -> Vec<Hop> {
        let catalog = self.0.catalog.load();
        plan(&catalog, &self.0.node, app, |node, known| {
            self.0
                .down
                .get(node)
                .is_some_and(|at| *at == (known.entry.epoch, known.entry.address))
        })
    }

    /// `peer` took no connection, or accepted one and gave no answer in
    /// time: skipped from now on (routing step 5).
    pub fn skip(&self, peer: &Arc<str>) {
        let Some(run) = self
            .0
            .catalog
            .load()
            .nodes
            .get(peer)
            .map(|k| (k.entry.epoch, k.entry.address))
        else {
            return;
        };
        if self.0.down.insert(peer.clone(), run).is_none() {
            tracing::warn!(%peer, "peer not answering: skipped until it does");
        }
        self.0.metrics.peers_down.set(self.0.down.len() as i64);
    }

    /// The metrics.
    pub fn metrics(&self) -> &ClusterMetrics {
        &self.0.metrics
    }

    /// The catalog as this node last saw it.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.0.catalog.load_full()
    }

    /// Why this node is degraded (protocol step 4), if it is: etcd is not
    /// current for it, and it routes from the last catalog it saw.
    pub fn degraded(&self) -> Option<String> {
        let h = &self.0.health;
        let registered = h.registered.load(Ordering::Relaxed);
        let watching = h.watching.load(Ordering::Relaxed);
        if registered && watching {
            return None;
        }
        let age = self.catalog_age().map_or("never read".to_owned(), |a| {
            format!("{:.1} s old", a.as_secs_f64())
        });
        let missing = match (registered, watching) {
            (false, false) => "not registered and not watching",
            (false, true) => "not registered",
            _ => "not watching",
        };
        Some(format!(
            "etcd unreachable ({missing}): routing from the last catalog seen ({age})"
        ))
    }

    /// How long ago etcd last confirmed the catalog; `None`: never.
    pub fn catalog_age(&self) -> Option<Duration> {
        self.0.health.confirmed.lock().unwrap().map(|t| t.elapsed())
    }

    /// The peers this node skips (routing step 5).
    pub fn peers_down(&self) -> Vec<Arc<str>> {
        self.0.down.iter().map(|e| e.key().clone()).collect()
    }

    fn confirm(&self) {
        *self.0.health.confirmed.lock().unwrap() = Some(Instant::now());
    }

    fn set_registered(&self, on: bool) {
        self.0.health.registered.store(on, Ordering::Relaxed);
        self.update_up();
    }

    fn set_watching(&self, on: bool) {
        self.0.health.watching.store(on, Ordering::Relaxed);
        self.update_up();
    }

    fn update_up(&self) {
        let h = &self.0.health;
        let up = h.registered.load(Ordering::Relaxed) && h.watching.load(Ordering::Relaxed);
        self.0.metrics.etcd_up.set(up as i64);
    }

    /// Replaces the catalog copy (protocol step 3); forgets skipped peers
    /// that left it or came back as a new run or at a new address
    /// (routing step 5).
    fn store(&self, catalog: Catalog) {
        self.0.down.retain(|node, at| {
            catalog
                .nodes
                .get(node)
                .is_some_and(|k| (k.entry.epoch, k.entry.address) == *at)
        });
        let peers = catalog.nodes.keys().filter(|n| **n != self.0.node).count();
        self.0.metrics.peers.set(peers as i64);
        let ips = catalog
            .nodes
            .values()
            .map(|k| k.entry.address.ip().to_canonical())
            .collect();
        self.0.node_ips.store(Arc::new(ips));
        self.0.metrics.peers_down.set(self.0.down.len() as i64);
        self.0.catalog.store(Arc::new(catalog));
    }

    /// Routing step 5's health checks, each second, and the age gauge.
    async fn check_peers(self, cancel: tokio_util::sync::CancellationToken) {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = every.tick() => {}
            }
            if let Some(age) = self.catalog_age() {
                self.0.metrics.catalog_age.set(age.as_secs_f64());
            }
            let down: Vec<(Arc<str>, SocketAddr)> = self
                .0
                .down
                .iter()
                .map(|e| (e.key().clone(), e.value().1))
                .collect();
            // All at once, each within the connect timeout; a shutdown
            // does not wait for them.
            let within = self.0.config.peer_connect_timeout;
            let checks = down
                .into_iter()
                .map(|(peer, address)| async move { (peer, probe(address, within).await) });
            let results = tokio::select! {
                _ = cancel.cancelled() => return,
                results = futures::future::join_all(checks) => results,
            };
            for (peer, reached) in results {
                if reached && self.0.down.remove(&peer).is_some() {
                    tracing::info!(%peer, "peer answers again");
                }
            }
            self.0.metrics.peers_down.set(self.0.down.len() as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(node: &str, secret: &str) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, secret).unwrap();
        let config: ClusterConfig = serde_yaml_ng::from_str(&format!(
            "node: {node}\nadvertise: 10.0.0.1:8080\nsecret_file: {}\n\
             etcd: {{ endpoints: [\"http://10.0.0.9:2379\"] }}\n",
            file.display()
        ))
        .unwrap();
        let metrics = ClusterMetrics::new(&prometheus::Registry::new()).unwrap();
        Cluster::new(&config, metrics).unwrap()
    }

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn a_marker_is_valid_for_its_request_only() {
        let (a, b) = (cluster("node-a", SECRET), cluster("node-b", SECRET));
        let get = http::Method::GET;
        let marker = a.marker(true, &get, b"app.test", "/x?y=1");
        assert_eq!(
            b.verify(&marker, &get, b"app.test", "/x?y=1"),
            Some(("node-a".into(), true))
        );
        let hold = a.marker(false, &get, b"app.test", "/x?y=1");
        assert_eq!(
            b.verify(&hold, &get, b"app.test", "/x?y=1"),
            Some(("node-a".into(), false))
        );
        // Another request, another host, another target: not valid.
        assert_eq!(
            b.verify(&marker, &http::Method::POST, b"app.test", "/x?y=1"),
            None
        );
        assert_eq!(b.verify(&marker, &get, b"other.test", "/x?y=1"), None);
        assert_eq!(b.verify(&marker, &get, b"app.test", "/x?y=2"), None);
        // Another secret.
        let c = cluster("node-c", "another-secret-0123456789abcdef-xx");
        assert_eq!(c.verify(&marker, &get, b"app.test", "/x?y=1"), None);
    }

    #[test]
    fn a_changed_or_stale_marker_is_not_valid() {
        let (a, b) = (cluster("node-a", SECRET), cluster("node-b", SECRET));
        let get = http::Method::GET;
        let marker = a
            .marker(false, &get, b"h", "/")
            .to_str()
            .unwrap()
            .to_owned();
        let parts: Vec<&str> = marker.split(' ').collect();
        let check =
            |text: String| b.verify(&HeaderValue::from_str(&text).unwrap(), &get, b"h", "/");
        // Another node named, the mode flipped, the time moved: the proof fails.
        assert_eq!(
            check(format!("node-x {} {} {}", parts[1], parts[2], parts[3])),
            None
        );
        assert_eq!(
            check(format!("{} {} now {}", parts[0], parts[1], parts[3])),
            None
        );
        let at: u64 = parts[1].parse().unwrap();
        assert_eq!(
            check(format!("{} {} {} {}", parts[0], at - 1, parts[2], parts[3])),
            None
        );
        // Made with the right secret, but outside the window.
        let old = at - MARKER_WINDOW.as_secs() - 5;
        let proof = hex::encode(a.0.secret.proof("node-a", old, "hold", "GET", b"h", "/"));
        assert_eq!(check(format!("node-a {old} hold {proof}")), None);
        let fresh = hex::encode(a.0.secret.proof("node-a", at, "hold", "GET", b"h", "/"));
        assert!(check(format!("node-a {at} hold {fresh}")).is_some());
        // Garbage.
        assert_eq!(check("node-a".into()), None);
        assert_eq!(check(format!("{marker} extra")), None);
    }

    #[tokio::test]
    async fn a_probe_needs_a_listeners_answer_not_a_handshake() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let within = Duration::from_millis(300);
        // Takes connections (the kernel would for a stopped process) and
        // never answers.
        let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hung_at = hung.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let mut kept = Vec::new();
            while let Ok((s, _)) = hung.accept().await {
                kept.push(s);
            }
        });
        assert!(!probe(hung_at, within).await);
        // Answers as snapgate does for a host no app has.
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live_at = live.local_addr().unwrap();
        let answering = tokio::spawn(async move {
            while let Ok((mut s, _)) = live.accept().await {
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                let body = "snapgate: no app serves host \"snapgate-probe.invalid\"\n";
                let head = format!(
                    "HTTP/1.1 404 Not Found\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(format!("{head}{body}").as_bytes()).await;
            }
        });
        assert!(probe(live_at, within).await);
        // Nothing listening.
        drop(answering);
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed_at = closed.local_addr().unwrap();
        drop(closed);
        assert!(!probe(closed_at, within).await);
        held.abort();
    }

    #[test]
    fn a_short_secret_is_refused_naming_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s");
        std::fs::write(&file, "short\n").unwrap();
        let e = Secret::from_file(&file).err().unwrap().to_string();
        assert!(
            e.contains("at least 32") && e.contains(&file.display().to_string()),
            "{e}"
        );
    }
}
