//! The request path's metrics, registered on the gateway's registry.
//!
//! An app's series are resolved once per config load, into its
//! [`RoutedApp`]: a request touches handles, not label lookups (a status
//! outside [`STATUSES`] is looked up once per request that has it).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::StatusCode;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// The request path's metric families.
#[derive(Clone)]
pub struct ProxyMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    upstream_errors: IntCounterVec,
    tls_handshakes: [IntCounter; 2],
    tls_failures: [IntCounter; 3],
    /// Requests answered before they were routed (app "").
    unrouted: Arc<RoutedApp>,
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
        let requests = IntCounterVec::new(
                Opts::new(
                    "snapgate_requests_total",
                    "Requests by app, response status and whether the request was held for an instance (held \"true\": it waited for a cold start or a busy instance; app \"\" for requests not routed to an app).",
                ),
                &["app", "status", "held"],
            )?;
        let duration = HistogramVec::new(
                HistogramOpts::new(
                    "snapgate_request_duration_seconds",
                    "Time from request to response headers, holds included, by app and whether the request was held for an instance.",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    5.0, 10.0, 30.0,
                ]),
                &["app", "held"],
            )?;
        let upstream_errors = IntCounterVec::new(
                Opts::new(
                    "snapgate_upstream_errors_total",
                    "Requests the app or its instance failed, by kind: connect (no connection could be made), reset (the connection broke before a whole response head), protocol (an answer snapgate cannot pass on), timeout (no response head within response_timeout), vm_exited (the instance's VMM died during the exchange), body (the response body broke off, stalled or the VMM died after the head was sent).",
                ),
                &["app", "kind"],
            )?;
        let m = ProxyMetrics {
            tls_handshakes: {
                let v = IntCounterVec::new(
                    Opts::new(
                        "snapgate_tls_handshakes_total",
                        "TLS handshakes completed on the TLS listener, by protocol version.",
                    ),
                    &["version"],
                )?;
                registry.register(Box::new(v.clone()))?;
                TLS_VERSIONS.map(|l| v.with_label_values(&[l]))
            },
            tls_failures: {
                let v = IntCounterVec::new(
                    Opts::new(
                        "snapgate_tls_handshake_failures_total",
                        "TLS handshakes that failed, by reason: tls (a TLS error: no certificate for the name asked, no common version or cipher, a bad message; the client got an alert), io (the connection closed or broke mid-handshake), timeout (not done within header_read_timeout).",
                    ),
                    &["reason"],
                )?;
                registry.register(Box::new(v.clone()))?;
                TLS_FAILURES.map(|l| v.with_label_values(&[l]))
            },
            unrouted: Arc::new(RoutedApp::new(&requests, &duration, &upstream_errors, "")),
            requests,
            duration,
            upstream_errors,
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
        registry.register(Box::new(m.upstream_errors.clone()))?;
        registry.register(Box::new(m.shed.clone()))?;
        registry.register(Box::new(m.retries.clone()))?;
        registry.register(Box::new(m.connections.clone()))?;
        registry.register(Box::new(m.parked.clone()))?;
        registry.register(Box::new(m.upgraded.clone()))?;
        registry.register(Box::new(m.upgrades.clone()))?;
        // Every cap's series from zero, for dashboards and alerts.
        for reason in [
            "max_requests_in_flight",
            "max_connections",
            "max_connections_per_client",
        ] {
            m.shed.with_label_values(&[reason]);
        }
        Ok(m)
    }

    /// `app`'s series, resolved once (its [`RoutedApp`]) and created at
    /// zero where a dashboard needs them before the first request.
    pub fn for_app(&self, app: &str) -> RoutedApp {
        for reason in ["connect", "closed"] {
            self.retries.with_label_values(&[app, reason]);
        }
        RoutedApp::new(&self.requests, &self.duration, &self.upstream_errors, app)
    }

    /// Requests answered before routing (app "").
    pub fn unrouted(&self) -> &Arc<RoutedApp> {
        &self.unrouted
    }

    /// One TLS handshake done with `version`
    /// ([`rustls::ProtocolVersion`]).
    pub fn tls_handshake(&self, version: Option<rustls::ProtocolVersion>) {
        let i = match version {
            Some(rustls::ProtocolVersion::TLSv1_2) => 0,
            _ => 1,
        };
        self.tls_handshakes[i].inc();
    }

    /// One TLS handshake failed: `tls`, `io` or `timeout`.
    pub fn tls_failed(&self, reason: &str) {
        if let Some(i) = TLS_FAILURES.iter().position(|r| *r == reason) {
            self.tls_failures[i].inc();
        }
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

/// The `version` label values of `snapgate_tls_handshakes_total` (rustls
/// offers no other).
const TLS_VERSIONS: [&str; 2] = ["TLSv1.2", "TLSv1.3"];

/// The `reason` label values of `snapgate_tls_handshake_failures_total`.
const TLS_FAILURES: [&str; 3] = ["tls", "io", "timeout"];

/// The `kind` label values of `snapgate_upstream_errors_total`.
const UPSTREAM_ERRORS: [&str; 6] = [
    "connect",
    "reset",
    "protocol",
    "timeout",
    "vm_exited",
    "body",
];

/// The status codes whose series an app resolves once, as it first
/// answers with each: the codes of RFC 9110's registry (section 16.2.1)
/// and 429 (RFC 6585). Sorted.
const STATUSES: [u16; 46] = [
    100, 101, 200, 201, 202, 203, 204, 205, 206, 300, 301, 302, 303, 304, 305, 307, 308, 400, 401,
    402, 403, 404, 405, 406, 407, 408, 409, 410, 411, 412, 413, 414, 415, 416, 417, 421, 422, 426,
    429, 431, 500, 501, 502, 503, 504, 505,
];

/// An app as the request path knows it: its name and its request
/// series, resolved once per config load.
pub struct RoutedApp {
    name: Arc<str>,
    requests: IntCounterVec,
    /// `snapgate_requests_total` by [`STATUSES`] index, not held then
    /// held; each resolved on first use.
    statuses: Box<[OnceLock<IntCounter>]>,
    /// `snapgate_request_duration_seconds`, not held and held.
    duration: [Histogram; 2],
    /// `snapgate_upstream_errors_total` by [`UPSTREAM_ERRORS`] index.
    upstream_errors: [IntCounter; 6],
}

impl RoutedApp {
    fn new(
        requests: &IntCounterVec,
        duration: &HistogramVec,
        upstream_errors: &IntCounterVec,
        app: &str,
    ) -> RoutedApp {
        RoutedApp {
            name: app.into(),
            requests: requests.clone(),
            statuses: (0..STATUSES.len() * 2).map(|_| OnceLock::new()).collect(),
            duration: ["false", "true"].map(|h| duration.with_label_values(&[app, h])),
            upstream_errors: UPSTREAM_ERRORS.map(|k| upstream_errors.with_label_values(&[app, k])),
        }
    }

    /// The app's name.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// One answered request: its status, whether it was held for an
    /// instance, and the time to its response headers.
    pub fn observe(&self, status: StatusCode, held: bool, took: Duration) {
        let code = status.as_u16();
        let label = ["false", "true"][held as usize];
        match STATUSES.binary_search(&code) {
            Ok(i) => self.statuses[i * 2 + held as usize]
                .get_or_init(|| {
                    self.requests
                        .with_label_values(&[&self.name, status.as_str(), label])
                })
                .inc(),
            Err(_) => self
                .requests
                .with_label_values(&[&self.name, status.as_str(), label])
                .inc(),
        }
        self.duration[held as usize].observe(took.as_secs_f64());
    }

    /// One request failed by the app or its instance, of `kind` (one of
    /// `UPSTREAM_ERRORS`: connect, reset, protocol, timeout, vm_exited,
    /// body).
    pub fn upstream_error(&self, kind: &str) {
        if let Some(i) = UPSTREAM_ERRORS.iter().position(|k| *k == kind) {
            self.upstream_errors[i].inc();
        }
    }
}

impl std::fmt::Display for RoutedApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

impl std::fmt::Debug for RoutedApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("RoutedApp").field(&self.name).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_status_and_held_has_its_series_looked_up_or_not() {
        assert!(STATUSES.windows(2).all(|w| w[0] < w[1]), "sorted");
        let registry = Registry::new();
        let m = ProxyMetrics::new(&registry).unwrap();
        let app = m.for_app("a");
        let ms = Duration::from_millis(1);
        app.observe(StatusCode::OK, false, ms);
        app.observe(StatusCode::OK, false, ms);
        app.observe(StatusCode::OK, true, ms);
        // Not in the table: looked up, counted all the same.
        app.observe(StatusCode::from_u16(418).unwrap(), false, ms);
        app.upstream_error("timeout");
        let get =
            |status: &str, held: &str| m.requests.with_label_values(&["a", status, held]).get();
        assert_eq!(get("200", "false"), 2);
        assert_eq!(get("200", "true"), 1);
        assert_eq!(get("418", "false"), 1);
        assert_eq!(
            m.upstream_errors.with_label_values(&["a", "timeout"]).get(),
            1
        );
        assert_eq!(
            m.duration
                .with_label_values(&["a", "false"])
                .get_sample_count(),
            3
        );
    }
}
