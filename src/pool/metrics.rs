//! The pool's metrics, registered on the gateway's own registry, and the
//! recent events the admin status page shows ([`Recent`]).
//!
//! Each pool resolves its app's series once, when it is made
//! ([`AppMetrics`]): a claim or a lease touches handles, never a label
//! lookup.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use super::engine::{MemberState, StopReason};
use super::vm::StartPath;

/// Metric families shared by every pool; each pool uses its app label.
#[derive(Clone)]
pub struct PoolMetrics {
    instances: IntGaugeVec,
    queue: IntGaugeVec,
    claims: IntCounterVec,
    hold: HistogramVec,
    cold_start: HistogramVec,
    restores: IntCounterVec,
    restore_failures: IntCounterVec,
    restore_duration: HistogramVec,
    reaped: IntCounterVec,
    failed: IntCounterVec,
    drained: IntCounterVec,
    recent: Arc<Recent>,
}

/// Buckets from 5 ms (a warm claim) to a minute (a slow cold start).
const SECONDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Buckets of a claim's wait, from 50 µs (a warm hit) to a minute.
const WAIT_SECONDS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The `outcome` label values of `snapgate_claims_total`, in the order of
/// [`AppMetrics`]'s handles.
const OUTCOMES: [&str; 7] = [
    "warm",
    "held",
    "queue_full",
    "hold_timeout",
    "unavailable",
    "shutting_down",
    "abandoned",
];

/// The `reason` label values of `snapgate_restore_failures_total`
/// ([`super::engine::StartFailure::reason`]).
const FAILURE_REASONS: [&str; 4] = ["app", "host", "timeout", "panic"];

/// The `state` label values of `snapgate_instances`.
const STATES: [MemberState; 4] = [
    MemberState::Restoring,
    MemberState::Warm,
    MemberState::Leased,
    MemberState::Draining,
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
            cold_start: HistogramVec::new(
                HistogramOpts::new(
                    "snapgate_cold_start_duration_seconds",
                    "Time a request waited for its instance, by the path that gave it one: warm (an instance was free), busy (held until a busy instance had room), clone (held while a VM was restored from the app's snapshot), runtime_clone (held while a runtime clone was taken and the app started in it). No path boots a VM: snapshots are built before an app is served.",
                )
                .buckets(WAIT_SECONDS.to_vec()),
                &["app", "path"],
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
                Opts::new(
                    "snapgate_reaped_total",
                    "Instances stopped, by reason: idle (idle_timeout passed, above min_warm), drained (an operator drained it), failed (its VMM died or it broke a request), closed (its app left the config, or shutdown), surplus (started after its claimer left).",
                ),
                &["app", "reason"],
            )?,
            failed: IntCounterVec::new(
                Opts::new("snapgate_instance_failures_total", "Instances whose VMM died or that broke a request."),
                &["app"],
            )?,
            drained: IntCounterVec::new(
                Opts::new("snapgate_instance_drains_total", "Instances drained by an operator (the admin API)."),
                &["app"],
            )?,
            recent: Arc::new(Recent::default()),
        };
        registry.register(Box::new(m.instances.clone()))?;
        registry.register(Box::new(m.queue.clone()))?;
        registry.register(Box::new(m.claims.clone()))?;
        registry.register(Box::new(m.hold.clone()))?;
        registry.register(Box::new(m.cold_start.clone()))?;
        registry.register(Box::new(m.restores.clone()))?;
        registry.register(Box::new(m.restore_failures.clone()))?;
        registry.register(Box::new(m.restore_duration.clone()))?;
        registry.register(Box::new(m.reaped.clone()))?;
        registry.register(Box::new(m.failed.clone()))?;
        registry.register(Box::new(m.drained.clone()))?;
        Ok(m)
    }

    /// `app`'s series, resolved once and created at zero so dashboards
    /// and alerts see them before the first event (of the cold-start
    /// paths, `warm`, `busy` and the app's own `path`).
    pub(super) fn for_app(&self, app: &str, path: StartPath) -> AppMetrics {
        let one = |v: &IntCounterVec| v.with_label_values(&[app]);
        let wait = |p: &str| self.cold_start.with_label_values(&[app, p]);
        AppMetrics {
            app: app.into(),
            path,
            instances: STATES.map(|s| self.instances.with_label_values(&[app, s.as_str()])),
            queue: {
                let q = self.queue.with_label_values(&[app]);
                q.set(0);
                q
            },
            claims: OUTCOMES.map(|o| self.claims.with_label_values(&[app, o])),
            hold: self.hold.with_label_values(&[app]),
            wait_warm: wait("warm"),
            wait_busy: wait("busy"),
            wait_started: wait(path.as_str()),
            restores: one(&self.restores),
            restore_failures: FAILURE_REASONS
                .map(|r| self.restore_failures.with_label_values(&[app, r])),
            restore_duration: self.restore_duration.with_label_values(&[app]),
            reaped: StopReason::ALL.map(|r| self.reaped.with_label_values(&[app, r.as_str()])),
            failed: one(&self.failed),
            drained: one(&self.drained),
            recent: self.recent.clone(),
        }
    }

    /// Recent cold starts and restore failures, of every pool.
    pub fn recent(&self) -> &Arc<Recent> {
        &self.recent
    }

    /// Restores so far for `app` (for tests and logs).
    pub fn restores(&self, app: &str) -> u64 {
        self.restores.with_label_values(&[app]).get()
    }

    /// Claims so far for `app` with `outcome`.
    pub fn claims(&self, app: &str, outcome: &str) -> u64 {
        self.claims.with_label_values(&[app, outcome]).get()
    }
}

/// One app's series of [`PoolMetrics`], resolved once.
pub(super) struct AppMetrics {
    app: Arc<str>,
    path: StartPath,
    instances: [IntGauge; 4],
    queue: IntGauge,
    claims: [IntCounter; 7],
    hold: Histogram,
    wait_warm: Histogram,
    wait_busy: Histogram,
    wait_started: Histogram,
    restores: IntCounter,
    restore_failures: [IntCounter; 4],
    restore_duration: Histogram,
    reaped: [IntCounter; 5],
    failed: IntCounter,
    drained: IntCounter,
    recent: Arc<Recent>,
}

impl AppMetrics {
    pub(super) fn set_instances(&self, state: MemberState, n: i64) {
        let i = STATES.iter().position(|s| *s == state).unwrap_or(0);
        self.instances[i].set(n);
    }

    pub(super) fn set_queue(&self, n: i64) {
        self.queue.set(n);
    }

    /// A claim that ended with `outcome` (one of [`OUTCOMES`]).
    pub(super) fn claim(&self, outcome: &str) {
        if let Some(i) = OUTCOMES.iter().position(|o| *o == outcome) {
            self.claims[i].inc();
        }
    }

    /// A lease had after waiting `waited`: held (`held`) or not, `fresh`
    /// or not (handed out as its instance joined). A held claim's fresh
    /// lease is on an instance started for the queue: a cold start by the
    /// app's path, kept among [`Recent`]'s cold starts too.
    pub(super) fn leased(&self, waited: Duration, held: bool, fresh: bool) {
        let secs = waited.as_secs_f64();
        match (held, fresh) {
            (false, _) => {
                self.claims[0].inc();
                self.wait_warm.observe(secs);
            }
            (true, started) => {
                self.claims[1].inc();
                self.hold.observe(secs);
                if started {
                    self.wait_started.observe(secs);
                    self.recent
                        .cold_start(&self.app, self.path.as_str(), waited);
                } else {
                    self.wait_busy.observe(secs);
                }
            }
        }
    }

    pub(super) fn restored(&self, took: Duration) {
        self.restores.inc();
        self.restore_duration.observe(took.as_secs_f64());
    }

    /// A failed restore, for `reason` (one of [`FAILURE_REASONS`]), with
    /// its error.
    pub(super) fn restore_failed(&self, reason: &'static str, error: String, took: Duration) {
        if let Some(i) = FAILURE_REASONS.iter().position(|r| *r == reason) {
            self.restore_failures[i].inc();
        }
        self.recent.failure(&self.app, reason, error, took);
    }

    pub(super) fn stopped(&self, why: StopReason) {
        let i = StopReason::ALL.iter().position(|r| *r == why).unwrap_or(0);
        self.reaped[i].inc();
    }

    pub(super) fn instance_failed(&self) {
        self.failed.inc();
    }

    pub(super) fn drained(&self) {
        self.drained.inc();
    }
}

/// How many of each kind of event [`Recent`] keeps.
const RECENT: usize = 20;

/// The latest cold starts and restore failures of every pool, newest
/// first, for the admin status page. A short ring: its lock is taken once
/// per cold start or failure, never on a warm request.
#[derive(Default)]
pub struct Recent {
    cold_starts: Mutex<VecDeque<ColdStart>>,
    failures: Mutex<VecDeque<RestoreFailure>>,
}

/// A request held while an instance started for it.
#[derive(Clone, Debug)]
pub struct ColdStart {
    /// When its instance was leased to it.
    pub at: SystemTime,
    /// The app.
    pub app: Arc<str>,
    /// How the instance started: a [`StartPath`] label value.
    pub path: &'static str,
    /// How long the request was held.
    pub waited: Duration,
}

/// A restore that failed.
#[derive(Clone, Debug)]
pub struct RestoreFailure {
    /// When it failed.
    pub at: SystemTime,
    /// The app (or runtime) whose restore it was.
    pub app: Arc<str>,
    /// The `reason` label of `snapgate_restore_failures_total`.
    pub reason: &'static str,
    /// The error, its causes joined.
    pub error: String,
    /// How long the restore ran.
    pub took: Duration,
}

impl Recent {
    fn cold_start(&self, app: &Arc<str>, path: &'static str, waited: Duration) {
        push(
            &self.cold_starts,
            ColdStart {
                at: SystemTime::now(),
                app: app.clone(),
                path,
                waited,
            },
        );
    }

    /// Keeps a failed restore of `app` (an app, or a runtime's stock).
    pub(crate) fn failure(
        &self,
        app: &Arc<str>,
        reason: &'static str,
        error: String,
        took: Duration,
    ) {
        push(
            &self.failures,
            RestoreFailure {
                at: SystemTime::now(),
                app: app.clone(),
                reason,
                error,
                took,
            },
        );
    }

    /// The latest cold starts, newest first.
    pub fn cold_starts(&self) -> Vec<ColdStart> {
        lock(&self.cold_starts).iter().cloned().collect()
    }

    /// The latest restore failures, newest first.
    pub fn failures(&self) -> Vec<RestoreFailure> {
        lock(&self.failures).iter().cloned().collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn push<T>(ring: &Mutex<VecDeque<T>>, event: T) {
    let mut ring = lock(ring);
    ring.push_front(event);
    ring.truncate(RECENT);
}
