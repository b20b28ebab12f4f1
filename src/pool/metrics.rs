//! The pool's metrics, registered on the gateway's own registry.

use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

/// Metric families shared by every pool; each pool uses its app label.
#[derive(Clone)]
pub struct PoolMetrics {
    instances: IntGaugeVec,
    queue: IntGaugeVec,
    claims: IntCounterVec,
    hold: HistogramVec,
    restores: IntCounterVec,
    restore_failures: IntCounterVec,
    restore_duration: HistogramVec,
    reaped: IntCounterVec,
    failed: IntCounterVec,
    drained: IntCounterVec,
}

/// Buckets from 5 ms (a warm claim) to a minute (a slow cold start).
const SECONDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

impl PoolMetrics {
    /// Registers the families on `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<PoolMetrics> {
        let m = PoolMetrics {
            instances: IntGaugeVec::new(
                Opts::new("snapgate_instances", "VM instances by app and state (restoring, warm, leased, draining)."),
                &["app", "state"],
            )?,
            queue: IntGaugeVec::new(
                Opts::new("snapgate_hold_queue_depth", "Requests held waiting for an instance."),
                &["app"],
            )?,
            claims: IntCounterVec::new(
                Opts::new(
                    "snapgate_claims_total",
                    "Instance claims by outcome: warm (an instance was free), held (waited for one), queue_full, hold_timeout, unavailable, shutting_down, abandoned (the client went away while held).",
                ),
                &["app", "outcome"],
            )?,
            hold: HistogramVec::new(
                HistogramOpts::new("snapgate_hold_duration_seconds", "Time held requests waited for an instance (cold starts).")
                    .buckets(SECONDS.to_vec()),
                &["app"],
            )?,
            restores: IntCounterVec::new(
                Opts::new("snapgate_restores_total", "Instances restored from a snapshot and ready."),
                &["app"],
            )?,
            restore_failures: IntCounterVec::new(
                Opts::new(
                    "snapgate_restore_failures_total",
                    "Restores that failed, by reason: app (the app's fault: it did not load, crashed or never answered), host (the host's, the VMM's or the guest's below the app), timeout (start_timeout passed), panic.",
                ),
                &["app", "reason"],
            )?,
            restore_duration: HistogramVec::new(
                HistogramOpts::new("snapgate_restore_duration_seconds", "Time from restore start to a ready instance.")
                    .buckets(SECONDS.to_vec()),
                &["app"],
            )?,
            reaped: IntCounterVec::new(
                Opts::new("snapgate_reaped_total", "Instances destroyed after idle_timeout."),
                &["app"],
            )?,
            failed: IntCounterVec::new(
                Opts::new("snapgate_instance_failures_total", "Instances whose VMM died or that broke a request."),
                &["app"],
            )?,
            drained: IntCounterVec::new(
                Opts::new("snapgate_instance_drains_total", "Instances drained by an operator (the admin API)."),
                &["app"],
            )?,
        };
        registry.register(Box::new(m.instances.clone()))?;
        registry.register(Box::new(m.queue.clone()))?;
        registry.register(Box::new(m.claims.clone()))?;
        registry.register(Box::new(m.hold.clone()))?;
        registry.register(Box::new(m.restores.clone()))?;
        registry.register(Box::new(m.restore_failures.clone()))?;
        registry.register(Box::new(m.restore_duration.clone()))?;
        registry.register(Box::new(m.reaped.clone()))?;
        registry.register(Box::new(m.failed.clone()))?;
        registry.register(Box::new(m.drained.clone()))?;
        Ok(m)
    }

    /// Creates `app`'s series at zero, so dashboards and alerts see them
    /// before the first event.
    pub(super) fn init(&self, app: &str) {
        for reason in ["app", "host", "timeout", "panic"] {
            self.restore_failures.with_label_values(&[app, reason]);
        }
        for counter in [&self.restores, &self.reaped, &self.failed, &self.drained] {
            counter.with_label_values(&[app]);
        }
        for outcome in [
            "warm",
            "held",
            "queue_full",
            "hold_timeout",
            "unavailable",
            "abandoned",
        ] {
            self.claims.with_label_values(&[app, outcome]);
        }
        self.hold.with_label_values(&[app]);
        self.restore_duration.with_label_values(&[app]);
        self.set_queue(app, 0);
    }

    pub(super) fn set_instances(&self, app: &str, state: &str, n: i64) {
        self.instances.with_label_values(&[app, state]).set(n);
    }

    pub(super) fn set_queue(&self, app: &str, n: i64) {
        self.queue.with_label_values(&[app]).set(n);
    }

    pub(super) fn claim(&self, app: &str, outcome: &str) {
        self.claims.with_label_values(&[app, outcome]).inc();
    }

    pub(super) fn hold_duration(&self, app: &str, took: Duration) {
        self.hold
            .with_label_values(&[app])
            .observe(took.as_secs_f64());
    }

    pub(super) fn restored(&self, app: &str, took: Duration) {
        self.restores.with_label_values(&[app]).inc();
        self.restore_duration
            .with_label_values(&[app])
            .observe(took.as_secs_f64());
    }

    pub(super) fn restore_failed(&self, app: &str, reason: &str) {
        self.restore_failures
            .with_label_values(&[app, reason])
            .inc();
    }

    pub(super) fn reaped(&self, app: &str) {
        self.reaped.with_label_values(&[app]).inc();
    }

    pub(super) fn instance_failed(&self, app: &str) {
        self.failed.with_label_values(&[app]).inc();
    }

    /// Restores so far for `app` (for tests and logs).
    pub fn restores(&self, app: &str) -> u64 {
        self.restores.with_label_values(&[app]).get()
    }

    /// Claims so far for `app` with `outcome`.
    pub fn claims(&self, app: &str, outcome: &str) -> u64 {
        self.claims.with_label_values(&[app, outcome]).get()
    }

    pub(super) fn drained(&self, app: &str) {
        self.drained.with_label_values(&[app]).inc();
    }
}
