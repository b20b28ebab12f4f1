//! Sets of instances: one generic instance engine ([`engine`]) with leases
//! and a hold queue ([`hold`]) on top, used by every app's [`Pool`] and by
//! every runtime's stock of clones ([`crate::runtime::Runtime`]).
//!
//! - [`engine`]: members, restores in flight (each bounded by
//!   `start_timeout`), backoff, one exit waiter per instance, reaping,
//!   close. Its protocol opens that module.
//! - [`hold`]: claim -> [`hold::Lease`], the hold queue, and how leases
//!   end. Its protocol opens that module.
//! - [`vm`]: VMs as instances, and instances restored from a snapshot.
//! - This module: an app's [`Pool`], which adds the app's metrics.
//!
//! The pool knows nothing of HTTP: a lease names an instance and its
//! address; the proxy owns the clients that reach it.

pub mod engine;
pub mod hold;
mod metrics;
mod traits;
pub mod vm;

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

pub use engine::{
    Blame, Drained, Engine, Factory, Instance, MemberInfo, MemberState, Prewarm, Prewarmed, Sizing,
    StartError, Stats, StopReason, Tasks,
};
pub use hold::ClaimError;
use metrics::AppMetrics;
pub use metrics::{ColdStart, PoolMetrics, Recent, RestoreFailure};
pub use vm::{AppFactory, InstanceError, SnapshotFactory, StartPath, StartsVms};

use crate::config::PoolConfig;

/// A lease on one of an app's instances: its address, and the right to
/// send it requests until dropped.
pub type Lease = hold::Lease<AppFactory>;

/// One app's pool. Cheap to clone.
#[derive(Clone)]
pub struct Pool {
    engine: Engine<AppFactory>,
    metrics: Arc<AppMetrics>,
}

/// The engine's events as the app's metrics.
struct AppObserver(Arc<AppMetrics>);

impl engine::Observer for AppObserver {
    fn publish(&self, s: &Stats) {
        for (state, n) in [
            (MemberState::Restoring, s.restoring),
            (MemberState::Warm, s.warm()),
            (MemberState::Leased, s.leased),
            (MemberState::Draining, s.draining),
        ] {
            self.0.set_instances(state, n as i64);
        }
        self.0.set_queue(s.queued as i64);
    }
    fn restored(&self, took: Duration) {
        self.0.restored(took);
    }
    fn restore_failed(&self, failure: &engine::StartFailure, took: Duration) {
        self.0
            .restore_failed(failure.reason(), crate::display_chain(failure), took);
    }
    fn stopped(&self, why: StopReason, _lived: Duration) {
        self.0.stopped(why);
    }
    fn instance_failed(&self) {
        self.0.instance_failed();
    }
    fn drained(&self) {
        self.0.drained();
    }
}

/// An app's sizing from its config.
fn sizing(cfg: &PoolConfig) -> Sizing {
    Sizing {
        min_warm: cfg.min_warm,
        max_instances: cfg.max_instances,
        max_concurrency: cfg.max_concurrency,
        idle_timeout: Some(cfg.idle_timeout),
        start_timeout: cfg.start_timeout,
        hold_queue: cfg.hold_queue,
        hold_timeout: cfg.hold_timeout,
    }
}

impl Pool {
    /// A pool for `app` whose tasks run on `tasks`; it at once restores
    /// `min_warm` instances.
    pub fn new(
        app: impl Into<String>,
        cfg: &PoolConfig,
        factory: AppFactory,
        metrics: PoolMetrics,
        tasks: &Tasks,
    ) -> Pool {
        let app = app.into();
        let metrics = Arc::new(metrics.for_app(&app, factory.path()));
        let observer = Arc::new(AppObserver(metrics.clone()));
        let engine = Engine::new(app, sizing(cfg), factory, observer, tasks);
        Pool { engine, metrics }
    }

    /// Whether `other` is a handle on this same pool.
    pub fn same_as(&self, other: &Pool) -> bool {
        Arc::ptr_eq(&self.engine.shared, &other.engine.shared)
    }

    /// The app's name.
    pub fn app(&self) -> &str {
        self.engine.name()
    }

    /// Current counts.
    pub fn stats(&self) -> Stats {
        self.engine.stats()
    }

    /// A watch of the counts.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<Stats> {
        self.engine.watch()
    }

    /// The error of the last failed start, while starts keep failing.
    pub fn last_error(&self) -> Option<String> {
        self.engine.last_error().map(|(e, _)| e)
    }

    /// VMM process ids of the current instances.
    pub fn pids(&self) -> Vec<u32> {
        self.engine.each(|vm| vm.pid())
    }

    /// (VMM process id, tap) of each current instance.
    pub fn instances(&self) -> Vec<(u32, String)> {
        self.engine.each(|vm| (vm.pid(), vm.endpoint().tap.clone()))
    }

    /// The names of the current instances.
    pub fn instance_names(&self) -> Vec<String> {
        self.engine.each(|vm| vm.id().to_string())
    }

    /// Leases an instance, holding the request while none is free
    /// ([`hold`]); records the claim's outcome, how long it waited and,
    /// for a held claim, the path that gave it its instance. A claim
    /// dropped before it ends (its client went away while held) counts as
    /// `abandoned`.
    ///
    /// Errors: the [`ClaimError`], with how long the claim was held before
    /// it failed (`None`: it failed at once, not queued).
    pub async fn claim(&self) -> Result<Lease, (ClaimError, Option<Duration>)> {
        let started = Instant::now();
        let mut abandoned = Abandoned {
            pool: self,
            armed: true,
        };
        let result = self.engine.claim_held().await;
        abandoned.armed = false;
        match result {
            Ok((lease, held)) => {
                self.metrics.leased(started.elapsed(), held, lease.fresh());
                Ok(lease)
            }
            Err((e, held)) => {
                self.metrics.claim(e.outcome());
                Err((e, held))
            }
        }
    }

    /// A free instance leased at once, counted as a claim that did not
    /// wait; `None` if none is free now (nothing is restored, nothing
    /// counted). A cluster node asks this before it looks to its peers.
    pub fn try_claim(&self) -> Option<Lease> {
        let started = Instant::now();
        let lease = self.engine.try_claim()?;
        self.metrics.leased(started.elapsed(), false, lease.fresh());
        Some(lease)
    }

    /// Its instances and restores in flight, each with its VMM's pid,
    /// tap and the snapshot it was restored from ([`Engine::members`]).
    pub fn members(&self) -> Vec<MemberInfo<VmDetail>> {
        self.engine.members(|vm| VmDetail {
            pid: vm.pid(),
            tap: vm.endpoint().tap.clone(),
            snapshot: vm.restored_from().map(|p| p.display().to_string()),
        })
    }

    /// The sizing it runs with.
    pub fn sizing(&self) -> Sizing {
        self.engine.sizing()
    }

    /// Drains the instance `name` ([`Engine::drain`]).
    pub fn drain(&self, name: &str) -> Drained {
        self.engine.drain(name)
    }

    /// Brings the pool to `warm` free instances, restores counted
    /// ([`Engine::prewarm`]).
    pub fn prewarm(&self, warm: usize) -> Result<Prewarmed, Prewarm> {
        self.engine.prewarm(warm)
    }

    /// Applies `cfg`'s sizing to the running pool ([`Engine::resize`]).
    pub fn resize(&self, cfg: &PoolConfig) {
        self.engine.resize(sizing(cfg));
    }

    /// Starts closing ([`Engine::begin_close`]).
    pub fn begin_close(&self) {
        self.engine.begin_close();
    }

    /// Closes and waits at most `within` ([`Engine::close`]).
    pub async fn close(&self, within: Duration) {
        self.engine.close(within).await;
    }
}

/// What the admin API shows of a pool's VM.
#[derive(Clone, Debug)]
pub struct VmDetail {
    /// The VMM's process id.
    pub pid: u32,
    /// The tap the VM is reached on.
    pub tap: String,
    /// The snapshot directory it was restored from (`None`: booted).
    pub snapshot: Option<String>,
}

/// Counts a claim dropped before it ended (its client went away while it
/// was held) as `abandoned` in `snapgate_claims_total`.
struct Abandoned<'a> {
    pool: &'a Pool,
    armed: bool,
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.pool.metrics.claim("abandoned");
        }
    }
}

#[cfg(test)]
mod tests;
