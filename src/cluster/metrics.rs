//! The cluster's metrics, registered on the gateway's registry.

use prometheus::{Gauge, IntCounterVec, IntGauge, Opts, Registry};

/// Metric families of the cluster mode.
#[derive(Clone)]
pub struct ClusterMetrics {
    /// Seconds since etcd last confirmed the catalog current.
    pub catalog_age: Gauge,
    /// 1 while this node is registered and watching the catalog.
    pub etcd_up: IntGauge,
    /// Peers in the catalog.
    pub peers: IntGauge,
    /// Peers skipped as not answering.
    pub peers_down: IntGauge,
    forwarded: IntCounterVec,
    peer_errors: IntCounterVec,
    /// Catalog entries this node wrote.
    pub publishes: prometheus::IntCounter,
    /// Requests with a hop marker that is not valid.
    pub bad_markers: prometheus::IntCounter,
}

impl ClusterMetrics {
    /// Registers the families on `registry`, every series at zero.
    pub fn new(registry: &Registry) -> prometheus::Result<ClusterMetrics> {
        let m = ClusterMetrics {
            catalog_age: Gauge::new(
                "snapgate_cluster_catalog_age_seconds",
                "Seconds since etcd last confirmed this node's copy of the catalog current (the open watch sent an event, or the progress asked for each third of the lease TTL); NaN until it first did.",
            )?,
            etcd_up: IntGauge::new(
                "snapgate_cluster_etcd_up",
                "1 while this node is registered in etcd under a live lease and watches the catalog; 0 while it routes from the last catalog it saw.",
            )?,
            peers: IntGauge::new(
                "snapgate_cluster_peers",
                "Peers (other nodes) in this node's catalog.",
            )?,
            peers_down: IntGauge::new(
                "snapgate_cluster_peers_down",
                "Peers skipped because they stopped answering, until a health check or their catalog entry says they are back.",
            )?,
            forwarded: IntCounterVec::new(
                Opts::new(
                    "snapgate_cluster_forwarded_requests_total",
                    "Requests sent to a peer, by reason (warm: the peer had a warm instance that would take it; home: the peer is the app's home node; spillover: the nodes before it refused or did not answer); a request refused by one peer and sent to the next counts at each.",
                ),
                &["reason"],
            )?,
            peer_errors: IntCounterVec::new(
                Opts::new(
                    "snapgate_cluster_peer_errors_total",
                    "Forwards to a peer that failed, by peer and kind (connect: no connection, the request went elsewhere; refused: the peer answered 503 before the request's body was sent; failed: the exchange broke after the request went out).",
                ),
                &["peer", "kind"],
            )?,
            publishes: prometheus::IntCounter::new(
                "snapgate_cluster_catalog_writes_total",
                "Catalog entries this node wrote to etcd.",
            )?,
            bad_markers: prometheus::IntCounter::new(
                "snapgate_cluster_invalid_hop_markers_total",
                "Requests that came with a Snapgate-Hop marker that is not valid (a client's, or a peer's with another secret or a clock off by over 30 s); each was routed as any other.",
            )?,
        };
        registry.register(Box::new(m.catalog_age.clone()))?;
        registry.register(Box::new(m.etcd_up.clone()))?;
        registry.register(Box::new(m.peers.clone()))?;
        registry.register(Box::new(m.peers_down.clone()))?;
        registry.register(Box::new(m.forwarded.clone()))?;
        registry.register(Box::new(m.peer_errors.clone()))?;
        registry.register(Box::new(m.publishes.clone()))?;
        registry.register(Box::new(m.bad_markers.clone()))?;
        m.catalog_age.set(f64::NAN);
        for reason in ["warm", "home", "spillover"] {
            m.forwarded.with_label_values(&[reason]);
        }
        Ok(m)
    }

    /// A request went to a peer for `reason`.
    pub fn forwarded(&self, reason: super::Reason) {
        self.forwarded.with_label_values(&[reason.as_str()]).inc();
    }

    /// A forward to `peer` failed, `kind` being `connect`, `refused` or
    /// `failed`.
    pub fn peer_error(&self, peer: &str, kind: &'static str) {
        self.peer_errors.with_label_values(&[peer, kind]).inc();
    }
}
