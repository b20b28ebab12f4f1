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
//!    each) each interval and writes only when they differ from the last
//!    entry written. Each entry carries the run's start (`epoch`) and a
//!    `version` counting its writes.
//! 3. Each node reads every entry once (one consistent `Range`) and then
//!    watches the prefix from the revision after it; each event replaces
//!    its copy ([`Catalog`], swapped whole). The copy is what routing
//!    reads, on every request, without a lock.
//! 4. Any failure talking to etcd (a refused connection, an expired
//!    lease, a watch cancelled or broken) ends that side's session: the
//!    node marks itself degraded (`/readyz` says so,
//!    `snapgate_cluster_etcd_up` is 0), keeps its copy of the catalog and
//!    goes on routing from it, and starts a new session after a backoff
//!    (100 ms doubling to 2 s): a fresh client, a new lease and entry, a
//!    fresh read and watch. A member of etcd lost mid-session is such a
//!    failure only while the client cannot reach another one.
//! 5. On shutdown the node revokes its lease (its entry goes at once),
//!    within a second.
//!
//! # Routing a request (`crate::proxy`, app step 4)
//! 1. A request that carries a valid hop marker (`Snapgate-Hop`, proven
//!    with the shared secret, [`Cluster::verify`]) was forwarded by a
//!    peer: it is served here, from this node's pool, and never forwarded
//!    again. Every other request loses any `Snapgate-Hop` it came with, so
//!    a client cannot make a node skip routing.
//! 2. A free local instance serves the request at once.
//! 3. Else the request follows [`plan`]: peers with a free warm instance
//!    (a cluster-wide warm hit), then the live nodes in the app's
//!    rendezvous order, the first being the app's home node (which
//!    restores it, so one app's cold starts land where its snapshot and
//!    code are in the page cache). This node in that order is its own
//!    pool, held there as on a single node.
//! 4. The next place in the plan is tried when a peer cannot be connected
//!    to (nothing was sent), or refuses with a 503 of its own making
//!    (marked `Snapgate-Refused`, not an app's 503) to a request with no
//!    body (so nothing of it was sent but its head), or this node's own
//!    pool refuses such a request. Any other answer, and any failure after
//!    the request went out, is the client's (a broken exchange is 502).
//! 5. A peer that could not be connected to is skipped (not in plans)
//!    until a health check (a TCP connect, each second) reaches it, or
//!    its catalog entry changes, or it leaves the catalog.
//!
//! Peer forwards use the proxy's kept-alive upstream connections, one set
//! per peer address.

pub mod catalog;
mod etcd;
pub mod metrics;
pub mod placement;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{HeaderName, HeaderValue};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

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
        if line.len() < crate::config::MIN_SECRET_LEN {
            anyhow::bail!(
                "{}: the secret's first line has {} characters; at least {} are needed \
                 (say, `openssl rand -hex 32`)",
                path.display(),
                line.len(),
                crate::config::MIN_SECRET_LEN
            );
        }
        Ok(Secret(line.as_bytes().to_vec()))
    }

    /// The proof a hop marker carries: SHA-256 of a fixed label and the
    /// secret, in hex. The same on every node of the cluster.
    fn proof(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"snapgate-hop\0");
        h.update(&self.0);
        hex::encode(h.finalize())
    }
}

/// Whether etcd is current for this node (protocol step 4).
#[derive(Default)]
struct Health {
    /// Registered under a live lease.
    registered: AtomicBool,
    /// The watch is open.
    watching: AtomicBool,
    /// The last time etcd answered a keep-alive or sent a watch event.
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
    /// What this node's forwards carry.
    marker: HeaderValue,
    /// What a valid marker's proof is.
    proof: String,
    catalog: arc_swap::ArcSwap<Catalog>,
    health: Health,
    /// Peers skipped (routing step 5), with the revision of their entry
    /// when they were.
    down: dashmap::DashMap<Arc<str>, i64>,
    metrics: ClusterMetrics,
    /// Ends the sessions with etcd (a child of the gateway's token).
    leave: tokio_util::sync::CancellationToken,
    /// The registration session, which revokes the lease as it ends.
    registration: Mutex<Option<tokio::task::JoinHandle<()>>>,
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
        let proof = secret.proof();
        let marker = HeaderValue::from_str(&format!("{} {proof}", config.node))
            .map_err(|_| anyhow::anyhow!("cluster.node: not a header value"))?;
        Ok(Cluster(Arc::new(Inner {
            node: config.node.as_str().into(),
            config: config.clone(),
            marker,
            proof,
            catalog: Default::default(),
            health: Health::default(),
            down: Default::default(),
            metrics,
            leave: Default::default(),
            registration: Default::default(),
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

    /// The hop marker this node's forwards carry.
    pub fn marker(&self) -> &HeaderValue {
        &self.0.marker
    }

    /// The peer that forwarded a request carrying `marker`, if the marker
    /// is valid (its proof is the shared secret's, compared in constant
    /// time).
    pub fn verify(&self, marker: &HeaderValue) -> Option<Arc<str>> {
        let text = marker.to_str().ok()?;
        let (node, proof) = text.split_once(' ')?;
        let ok: bool = proof.as_bytes().ct_eq(self.0.proof.as_bytes()).into();
        ok.then(|| node.into())
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
                .is_some_and(|at| *at == known.revision)
        })
    }

    /// `peer` could not be connected to: skipped from now on (routing
    /// step 5).
    pub fn peer_unreachable(&self, peer: &Arc<str>) {
        let revision = self
            .0
            .catalog
            .load()
            .nodes
            .get(peer)
            .map_or(0, |k| k.revision);
        if self.0.down.insert(peer.clone(), revision).is_none() {
            tracing::warn!(%peer, "peer not answering: skipped until it does");
        }
        self.0.metrics.peer_error(peer, "connect");
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
    /// that left it or whose entry changed (routing step 5).
    fn store(&self, catalog: Catalog) {
        self.0
            .down
            .retain(|node, at| catalog.nodes.get(node).is_some_and(|k| k.revision == *at));
        let peers = catalog.nodes.keys().filter(|n| **n != self.0.node).count();
        self.0.metrics.peers.set(peers as i64);
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
            let catalog = self.0.catalog.load_full();
            let down: Vec<(Arc<str>, SocketAddr)> = self
                .0
                .down
                .iter()
                .filter_map(|e| {
                    let known = catalog.nodes.get(e.key())?;
                    Some((e.key().clone(), known.entry.address))
                })
                .collect();
            for (peer, address) in down {
                let within = self.0.config.peer_connect_timeout;
                let reached = tokio::time::timeout(within, tokio::net::TcpStream::connect(address))
                    .await
                    .is_ok_and(|c| c.is_ok());
                if reached && self.0.down.remove(&peer).is_some() {
                    tracing::info!(%peer, "peer answers again");
                }
            }
            self.0.metrics.peers_down.set(self.0.down.len() as i64);
        }
    }
}
