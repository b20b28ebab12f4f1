//! The request path's metrics, registered on the gateway's registry.

use std::time::Duration;

use http::StatusCode;
use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// The request path's metric families.
#[derive(Clone)]
pub struct ProxyMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    pub(super) shed: IntCounterVec,
    retries: IntCounterVec,
    connections: IntGauge,
    parked: IntGauge,
    upgraded: IntGaugeVec,
    upgrades: IntCounterVec,
}

impl ProxyMetrics {
    /// Registers the families on `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<ProxyMetrics> {
        let m = ProxyMetrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "snapgate_requests_total",
                    "Requests by app and response status (app \"\" for requests not routed to an app).",
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
            shed: IntCounterVec::new(
                Opts::new(
                    "snapgate_load_shed_total",
                    "Connections and requests refused with 503 by a cap of `limits`, by the cap's key.",
                ),
                &["reason"],
            )?,
            retries: IntCounterVec::new(
                Opts::new(
                    "snapgate_upstream_retries_total",
                    "Requests sent a second time: no connection could be made (reason \"connect\"), or a reused connection closed before any response to an idempotent bodiless request (\"closed\").",
                ),
                &["app", "reason"],
            )?,
            connections: IntGauge::new(
                "snapgate_client_connections",
                "Client connections open on the listener.",
            )?,
            parked: IntGauge::new(
                "snapgate_client_connections_parked",
                "Idle HTTP/1.1 client connections parked: kept open with their HTTP state freed until the client sends again (counted in snapgate_client_connections too).",
            )?,
            upgraded: IntGaugeVec::new(
                Opts::new(
                    "snapgate_upgraded_connections",
                    "Connections switched to another protocol (WebSocket and other upgrades) open now, by app; each holds its instance.",
                ),
                &["app"],
            )?,
            upgrades: IntCounterVec::new(
                Opts::new(
                    "snapgate_upgrades_total",
                    "Connections switched to another protocol, by app and protocol (websocket: the one protocol passed on).",
                ),
                &["app", "protocol"],
            )?,
        };
        registry.register(Box::new(m.requests.clone()))?;
        registry.register(Box::new(m.duration.clone()))?;
        registry.register(Box::new(m.shed.clone()))?;
        registry.register(Box::new(m.retries.clone()))?;
        registry.register(Box::new(m.connections.clone()))?;
        registry.register(Box::new(m.parked.clone()))?;
        registry.register(Box::new(m.upgraded.clone()))?;
        registry.register(Box::new(m.upgrades.clone()))?;
        Ok(m)
    }

    /// One answered request.
    pub fn observe(&self, app: &str, status: StatusCode, took: Duration) {
        self.requests
            .with_label_values(&[app, status.as_str()])
            .inc();
        self.duration
            .with_label_values(&[app])
            .observe(took.as_secs_f64());
    }

    /// One connection or request refused by the cap `reason`.
    pub fn shed(&self, reason: &str) {
        self.shed.with_label_values(&[reason]).inc();
    }

    /// One request sent again.
    pub fn retried(&self, app: &str, reason: &str) {
        self.retries.with_label_values(&[app, reason]).inc();
    }

    /// The counter of `app`'s replays on a fresh connection (reason
    /// `closed`), for its upstreams.
    pub fn replays(&self, app: &str) -> prometheus::IntCounter {
        self.retries.with_label_values(&[app, "closed"])
    }

    /// One connection of `app` upgraded to `protocol`: counted, and open
    /// in the gauge until the returned guard drops.
    pub fn upgraded(&self, app: &str, protocol: &str) -> impl Drop + Send {
        let protocol = protocol.to_ascii_lowercase();
        // Tokens are free text: an unknown one never becomes a label value.
        let protocol = match protocol.as_str() {
            "websocket" => "websocket",
            _ => "other",
        };
        self.upgrades.with_label_values(&[app, protocol]).inc();
        let gauge = self.upgraded.with_label_values(&[app]);
        gauge.inc();
        super::scopeguard(move || gauge.dec())
    }

    /// The open client connections gauge.
    pub fn connections(&self) -> &IntGauge {
        &self.connections
    }

    /// The gauge of parked client connections.
    pub fn parked(&self) -> &IntGauge {
        &self.parked
    }
}
