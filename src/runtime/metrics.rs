//! A runtime stock's metrics, registered on the gateway's own registry.

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};

/// Metric families shared by every runtime; each uses its runtime label.
#[derive(Clone)]
pub struct RuntimeMetrics {
    clones: IntGaugeVec,
    takes: IntCounterVec,
    failures: IntCounterVec,
    /// Where failed restores are kept for the status page.
    recent: Option<std::sync::Arc<crate::pool::Recent>>,
}

impl RuntimeMetrics {
    /// Registers the families on `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<RuntimeMetrics> {
        let m = RuntimeMetrics {
            clones: IntGaugeVec::new(
                Opts::new(
                    "snapgate_runtime_clones",
                    "Runtime clones in a runtime's stock, by state (warm, restoring).",
                ),
                &["runtime", "state"],
            )?,
            takes: IntCounterVec::new(
                Opts::new(
                    "snapgate_runtime_takes_total",
                    "Runtime clones taken by an app, by outcome (warm: from the stock; restored: restored on demand).",
                ),
                &["runtime", "outcome"],
            )?,
            failures: IntCounterVec::new(
                Opts::new(
                    "snapgate_runtime_clone_failures_total",
                    "Runtime clones that failed: restores (in the background or on demand), VMMs that died in the stock, and clones that failed while an app started in them for reasons not the app's.",
                ),
                &["runtime"],
            )?,
            recent: None,
        };
        registry.register(Box::new(m.clones.clone()))?;
        registry.register(Box::new(m.takes.clone()))?;
        registry.register(Box::new(m.failures.clone()))?;
        Ok(m)
    }

    /// These metrics, keeping failed restores in `recent` too (for the
    /// admin status page).
    pub fn with_recent(mut self, recent: std::sync::Arc<crate::pool::Recent>) -> RuntimeMetrics {
        self.recent = Some(recent);
        self
    }

    /// A restore of `runtime` failed, for `reason`, with `error`.
    pub(super) fn restore_failed(
        &self,
        runtime: &str,
        reason: &'static str,
        error: String,
        took: std::time::Duration,
    ) {
        self.failed(runtime);
        if let Some(recent) = &self.recent {
            recent.failure(&runtime.into(), reason, error, took);
        }
    }

    /// Creates every series of `runtime` at zero.
    pub(super) fn init(&self, runtime: &str) {
        self.set(runtime, 0, 0);
        for outcome in ["warm", "restored"] {
            self.takes.with_label_values(&[runtime, outcome]);
        }
        self.failures.with_label_values(&[runtime]);
    }

    pub(super) fn set(&self, runtime: &str, warm: i64, restoring: i64) {
        self.clones.with_label_values(&[runtime, "warm"]).set(warm);
        self.clones
            .with_label_values(&[runtime, "restoring"])
            .set(restoring);
    }

    pub(super) fn took(&self, runtime: &str, outcome: &str) {
        self.takes.with_label_values(&[runtime, outcome]).inc();
    }

    pub(super) fn failed(&self, runtime: &str) {
        self.failures.with_label_values(&[runtime]).inc();
    }

    /// Clones taken so far from `runtime` with `outcome` (for tests).
    pub fn takes(&self, runtime: &str, outcome: &str) -> u64 {
        self.takes.with_label_values(&[runtime, outcome]).get()
    }

    /// Failed clones of `runtime` so far (for tests).
    pub fn failures(&self, runtime: &str) -> u64 {
        self.failures.with_label_values(&[runtime]).get()
    }
}
