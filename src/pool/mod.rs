//! Per-app pools of VM instances: claim -> [`Lease`], hold queue, restores,
//! reaper.
//!
//! # Protocol
//! 1. One `std::sync::Mutex` guards a pool's [`State`]: its instances, the
//!    number of restores in flight, the hold queue, and the restore backoff.
//!    It is never held across an `.await`; VM starts and stops run outside it.
//! 2. [`Pool::claim`] takes the lock and leases the busiest instance that
//!    still has room (`in_flight < max_concurrency`), packing requests so the
//!    others can go idle and be reaped. With no room anywhere it queues the
//!    request (bounded by `hold_queue`) and starts as many restores as the
//!    queue needs (`ceil(queued / max_concurrency)`, minus restores already
//!    in flight, within `max_instances`): one restore per VM needed, never
//!    one per request. The request then waits at most `hold_timeout`.
//! 3. A [`Lease`] is a value; dropping it (when the response body has been
//!    streamed to the end, or dropped) takes the lock, decrements the
//!    instance's `in_flight`, stamps `idle_since` when it reaches zero, and
//!    hands freed capacity to queued requests in order.
//! 4. A restore task, on success, adds the instance and serves the queue; on
//!    failure it arms a backoff (0.5 s doubling to 30 s) and, if nothing else
//!    can serve the queued requests, fails them with the restore's error.
//! 5. The maintenance task (one per pool) wakes on a notification or at the
//!    next idle deadline (at least every 500 ms): it removes instances whose
//!    VMM died, reaps instances idle for `idle_timeout` down to `min_warm`,
//!    and restores up to `min_warm`. Reaping and leasing both happen under
//!    the lock and reaping only takes instances with `in_flight == 0`, so a
//!    new request and the reaper never both win the same instance.
//! 6. An instance whose lease was marked broken (its VM failed mid-request)
//!    takes no new leases and is destroyed when its last lease ends. When the
//!    maintenance task finds an instance's VMM dead, it also cancels the
//!    instance's `gone` token: requests in flight on it end with 502 instead
//!    of waiting on connections whose peer vanished without a reset.
//! 7. [`Pool::close`] fails queued requests, destroys idle instances, and
//!    destroys the rest as their leases end.

mod metrics;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub use metrics::PoolMetrics;

use crate::config::PoolConfig;
use crate::net::Network;
use crate::upstream::{self, UpstreamClient};
use crate::vmm::resumed::{self, Hook};
use crate::vmm::{Endpoint, Snapshot, Vm, VmId, Vmm, VmmError};

/// Starts and stops an app's instances. The real one restores from a
/// snapshot onto a fresh tap; tests script their own.
#[async_trait]
pub trait Factory: Send + Sync + 'static {
    /// Starts one instance and returns it once it is ready to serve.
    async fn start(&self, id: VmId) -> Result<Vm, VmmError>;
    /// Stops an instance and waits until it is gone.
    async fn stop(&self, vm: Vm) -> Result<(), VmmError>;
}

/// Restores instances from a snapshot, each on its own tap, and makes each
/// its own before it joins the pool: its resume [`Hook`] (if any: a VM
/// app's `on_restore`, a runtime agent's `/resumed`) gets the resumed
/// message as soon as the hook's service is ready
/// ([`resumed::ready_and_resumed`]).
pub struct SnapshotFactory {
    vmm: Arc<dyn Vmm>,
    net: Network,
    snapshot: Snapshot,
    hook: Option<Hook>,
}

impl SnapshotFactory {
    /// Instances of `snapshot`, restored by `vmm` onto taps from `net`,
    /// each sent its resumed message at `hook` first.
    pub fn new(
        vmm: Arc<dyn Vmm>,
        net: Network,
        snapshot: Snapshot,
        hook: Option<Hook>,
    ) -> SnapshotFactory {
        SnapshotFactory {
            vmm,
            net,
            snapshot,
            hook,
        }
    }
}

#[async_trait]
impl Factory for SnapshotFactory {
    async fn start(&self, id: VmId) -> Result<Vm, VmmError> {
        let tap = self.net.create_tap().await?;
        let mut vm = self.vmm.restore(id, &self.snapshot, tap).await?;
        let ready_timeout = self.snapshot.manifest().spec.ready_timeout;
        let vmm = self.vmm.as_ref();
        match resumed::ready_and_resumed(vmm, &mut vm, self.hook.as_ref(), ready_timeout).await {
            Ok(()) => Ok(vm),
            Err(e) => Err(crate::vmm::discard(vmm, vm, e).await),
        }
    }

    async fn stop(&self, vm: Vm) -> Result<(), VmmError> {
        self.vmm.destroy(vm).await
    }
}

/// Why a claim got no instance. Each maps to a 503 with `Retry-After`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClaimError {
    /// The hold queue is full.
    #[error("app {app}: no instance free ({instances} running, {restoring} starting) and {queued} requests already waiting")]
    QueueFull {
        /// The app.
        app: String,
        /// Instances running.
        instances: usize,
        /// Restores in flight.
        restoring: usize,
        /// Requests in the hold queue.
        queued: usize,
    },
    /// The request waited `hold_timeout` without getting an instance.
    #[error("app {app}: no instance became free within {:.1}s", .waited.as_secs_f64())]
    HoldTimeout {
        /// The app.
        app: String,
        /// How long it waited.
        waited: Duration,
    },
    /// Instances cannot be started right now.
    #[error("app {app}: cannot start an instance: {reason}")]
    Unavailable {
        /// The app.
        app: String,
        /// The last restore error.
        reason: String,
        /// The app itself failed to start (its code or its process), not
        /// the VM or the host.
        app_failed: bool,
        /// When the next attempt is due.
        retry_after: Duration,
    },
    /// The gateway is shutting down.
    #[error("app {app}: shutting down")]
    ShuttingDown {
        /// The app.
        app: String,
    },
}

impl ClaimError {
    /// What a client is told: no internals (paths, VMM output), which go to
    /// the log and [`Pool::last_error`] instead.
    pub fn public_message(&self) -> String {
        match self {
            ClaimError::Unavailable {
                app,
                app_failed: true,
                ..
            } => format!("app {app}: the app failed to start; the operator has the details"),
            ClaimError::Unavailable { app, .. } => {
                format!("app {app}: cannot start an instance right now")
            }
            other => other.to_string(),
        }
    }

    /// The `outcome` label of `snapgate_claims_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            ClaimError::QueueFull { .. } => "queue_full",
            ClaimError::HoldTimeout { .. } => "hold_timeout",
            ClaimError::Unavailable { .. } => "unavailable",
            ClaimError::ShuttingDown { .. } => "shutting_down",
        }
    }

    /// Seconds a client should wait before retrying.
    pub fn retry_after(&self) -> u64 {
        match self {
            ClaimError::Unavailable { retry_after, .. } => retry_after.as_secs().max(1),
            ClaimError::ShuttingDown { .. } => 5,
            _ => 1,
        }
    }
}

/// What an instance is doing, for metrics and logs. Transitions happen in
/// `State` methods only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstanceState {
    /// Being restored; not yet in the pool.
    Restoring,
    /// Ready with no request in flight.
    Warm,
    /// Serving at least one request.
    Leased,
    /// Marked broken or being closed: takes no new requests.
    Draining,
}

impl InstanceState {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Restoring => "restoring",
            InstanceState::Warm => "warm",
            InstanceState::Leased => "leased",
            InstanceState::Draining => "draining",
        }
    }
}

struct Instance {
    vm: Vm,
    client: UpstreamClient,
    in_flight: usize,
    idle_since: Instant,
    draining: bool,
    /// Cancelled when the VMM is found dead: in-flight requests stop
    /// waiting on connections whose peer is gone and will never reset them.
    gone: CancellationToken,
}

impl Instance {
    fn state(&self) -> InstanceState {
        if self.draining {
            InstanceState::Draining
        } else if self.in_flight > 0 {
            InstanceState::Leased
        } else {
            InstanceState::Warm
        }
    }
}

struct Waiter {
    id: u64,
    tx: oneshot::Sender<Result<Lease, ClaimError>>,
}

#[derive(Default)]
struct State {
    instances: Vec<Instance>,
    restoring: usize,
    waiters: VecDeque<Waiter>,
    next_waiter: u64,
    failures: u32,
    retry_at: Option<Instant>,
    last_error: Option<String>,
    /// Whether the last failed start was the app's own fault.
    last_app_failed: bool,
    closed: bool,
    peak: usize,
}

/// Counts for tests and the admin API.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Instances ready, serving or draining.
    pub instances: usize,
    /// Instances serving at least one request.
    pub leased: usize,
    /// Restores in flight.
    pub restoring: usize,
    /// Requests in the hold queue.
    pub queued: usize,
    /// The most instances (including restores) there ever were at once.
    pub peak: usize,
}

struct Shared {
    app: String,
    cfg: PoolConfig,
    factory: Arc<dyn Factory>,
    state: Mutex<State>,
    wake: Notify,
    metrics: PoolMetrics,
    seq: AtomicU64,
    /// Stops running on their own tasks.
    stopping: AtomicUsize,
}

/// One app's pool. Cheap to clone.
#[derive(Clone)]
pub struct Pool {
    shared: Arc<Shared>,
}

/// The right to send requests to one instance. Dropping it returns the
/// capacity to the pool.
pub struct Lease {
    shared: Arc<Shared>,
    vm: VmId,
    endpoint: Endpoint,
    client: UpstreamClient,
    gone: CancellationToken,
    broken: bool,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("app", &self.shared.app)
            .field("vm", &self.vm)
            .finish()
    }
}

impl Lease {
    /// The instance's id.
    pub fn vm(&self) -> &VmId {
        &self.vm
    }

    /// Where the instance serves.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// A client whose kept-alive connections reach this instance.
    pub fn client(&self) -> &UpstreamClient {
        &self.client
    }

    /// Cancelled if the instance's VMM dies while leased.
    pub fn gone(&self) -> &CancellationToken {
        &self.gone
    }

    /// Marks the instance as failed (its VM broke a request): it takes no
    /// new requests and is destroyed when its last lease ends.
    pub fn mark_broken(&mut self) {
        self.broken = true;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.shared.release(&self.vm, self.broken);
    }
}

const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const MAINTENANCE_TICK: Duration = Duration::from_millis(500);

/// How long to wait after `failures` failed starts in a row: 0.5 s,
/// doubling, at most 30 s. Runtime stocks back off the same way.
pub(crate) fn backoff(failures: u32) -> Duration {
    BACKOFF_BASE
        .saturating_mul(1u32 << failures.saturating_sub(1).min(10))
        .min(BACKOFF_MAX)
}

impl Pool {
    /// A pool for `app`; its maintenance task starts on the current runtime
    /// and at once restores `min_warm` instances.
    pub fn new(
        app: impl Into<String>,
        cfg: PoolConfig,
        factory: Arc<dyn Factory>,
        metrics: PoolMetrics,
    ) -> Pool {
        let app = app.into();
        metrics.init(&app);
        let shared = Arc::new(Shared {
            app,
            cfg,
            factory,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            metrics,
            seq: AtomicU64::new(1),
            stopping: AtomicUsize::new(0),
        });
        tokio::spawn(maintain(shared.clone()));
        Pool { shared }
    }

    /// The app's name.
    pub fn app(&self) -> &str {
        &self.shared.app
    }

    /// Current counts.
    pub fn stats(&self) -> PoolStats {
        let st = self.shared.lock();
        PoolStats {
            instances: st.instances.len(),
            leased: st.instances.iter().filter(|i| i.in_flight > 0).count(),
            restoring: st.restoring,
            queued: st.waiters.len(),
            peak: st.peak,
        }
    }

    /// The error of the last failed restore, while restores keep failing.
    pub fn last_error(&self) -> Option<String> {
        self.shared.lock().last_error.clone()
    }

    /// VMM process ids of the current instances.
    pub fn pids(&self) -> Vec<u32> {
        self.instances().into_iter().map(|(pid, _)| pid).collect()
    }

    /// (VMM process id, tap) of each current instance.
    pub fn instances(&self) -> Vec<(u32, String)> {
        self.shared
            .lock()
            .instances
            .iter()
            .map(|i| (i.vm.pid(), i.vm.endpoint().tap.clone()))
            .collect()
    }

    /// Leases an instance, holding the request while none is free (see the
    /// module doc).
    pub async fn claim(&self) -> Result<Lease, ClaimError> {
        let shared = &self.shared;
        let started = Instant::now();
        let result = self.lease_or_wait(started).await;
        let outcome = match &result {
            Ok((_, false)) => "warm",
            Ok((_, true)) => {
                shared.metrics.hold_duration(&shared.app, started.elapsed());
                "held"
            }
            Err(e) => e.outcome(),
        };
        shared.metrics.claim(&shared.app, outcome);
        result.map(|(lease, _)| lease)
    }

    /// The lease, and whether the request had to wait for it.
    async fn lease_or_wait(&self, started: Instant) -> Result<(Lease, bool), ClaimError> {
        let shared = &self.shared;
        let (id, mut rx) = {
            let mut st = shared.lock();
            if st.closed {
                return Err(shared.shutting_down());
            }
            if let Some(lease) = shared.try_lease(&mut st) {
                shared.publish(&st);
                return Ok((lease, false));
            }
            // Requests that gave up (client went away) free their place.
            st.waiters.retain(|w| !w.tx.is_closed());
            if st.waiters.len() >= shared.cfg.hold_queue {
                return Err(ClaimError::QueueFull {
                    app: shared.app.clone(),
                    instances: st.instances.len(),
                    restoring: st.restoring,
                    queued: st.waiters.len(),
                });
            }
            if let Some(err) = shared.unavailable(&st) {
                return Err(err);
            }
            let (tx, rx) = oneshot::channel();
            let id = st.next_waiter;
            st.next_waiter += 1;
            st.waiters.push_back(Waiter { id, tx });
            shared.start_restores(&mut st, 0);
            shared.publish(&st);
            (id, rx)
        };
        let result = match tokio::time::timeout(shared.cfg.hold_timeout, &mut rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(shared.shutting_down()),
            Err(_) => {
                let removed = {
                    let mut st = shared.lock();
                    let before = st.waiters.len();
                    st.waiters.retain(|w| w.id != id);
                    shared.publish(&st);
                    st.waiters.len() < before
                };
                if removed {
                    Err(ClaimError::HoldTimeout {
                        app: shared.app.clone(),
                        waited: started.elapsed(),
                    })
                } else {
                    // Taken off the queue at the very deadline: its lease (or
                    // error) is on the way, never lost.
                    rx.await.unwrap_or_else(|_| Err(shared.shutting_down()))
                }
            }
        };
        result.map(|lease| (lease, true))
    }

    /// Starts closing: no new leases or restores, queued requests fail now
    /// with 503, idle instances are destroyed, busy ones as their last lease
    /// ends.
    pub fn begin_close(&self) {
        let shared = &self.shared;
        let (waiters, idle) = {
            let mut st = shared.lock();
            st.closed = true;
            let waiters: Vec<Waiter> = st.waiters.drain(..).collect();
            let (idle, busy): (Vec<Instance>, Vec<Instance>) =
                st.instances.drain(..).partition(|i| i.in_flight == 0);
            st.instances = busy;
            for i in &mut st.instances {
                i.draining = true;
            }
            shared.publish(&st);
            (waiters, idle)
        };
        for w in waiters {
            let _ = w.tx.send(Err(shared.shutting_down()));
        }
        for instance in idle {
            shared.stop_in_background(instance.vm);
        }
        shared.wake.notify_one();
    }

    /// Closes the pool ([`Pool::begin_close`]) and waits, at most `within`,
    /// until every instance and restore is gone.
    pub async fn close(&self, within: Duration) {
        self.begin_close();
        let shared = &self.shared;
        let deadline = Instant::now() + within;
        loop {
            let left = {
                let st = shared.lock();
                st.instances.len() + st.restoring
            };
            if left == 0 || Instant::now() >= deadline {
                if left > 0 {
                    warn!(app = %shared.app, left, "instances still running after close");
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Stops run on their own tasks; wait for them too.
        while shared.stopping.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves counts that may be off by
        // one; serving on is better than poisoning every later request.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn shutting_down(&self) -> ClaimError {
        ClaimError::ShuttingDown {
            app: self.app.clone(),
        }
    }

    /// The error for new requests while restores are failing and nothing
    /// can serve them.
    fn unavailable(&self, st: &State) -> Option<ClaimError> {
        let retry_at = st.retry_at?;
        let now = Instant::now();
        let serving = st.instances.iter().any(|i| !i.draining);
        if retry_at > now && !serving && st.restoring == 0 {
            Some(ClaimError::Unavailable {
                app: self.app.clone(),
                reason: st.last_error.clone().unwrap_or_default(),
                app_failed: st.last_app_failed,
                retry_after: retry_at - now,
            })
        } else {
            None
        }
    }

    /// Leases the busiest instance with room (packing), if any.
    fn try_lease(self: &Arc<Self>, st: &mut State) -> Option<Lease> {
        let max = self.cfg.max_concurrency;
        let instance = st
            .instances
            .iter_mut()
            .filter(|i| !i.draining && i.in_flight < max)
            .max_by_key(|i| i.in_flight)?;
        instance.in_flight += 1;
        Some(Lease {
            shared: self.clone(),
            vm: instance.vm.id().clone(),
            endpoint: instance.vm.endpoint().clone(),
            client: instance.client.clone(),
            gone: instance.gone.clone(),
            broken: false,
        })
    }

    /// Hands free capacity to queued requests, in order. Returns leases whose
    /// requester went away: the caller drops them after unlocking.
    fn dispatch(self: &Arc<Self>, st: &mut State) -> Vec<Lease> {
        let mut undelivered = Vec::new();
        while !st.waiters.is_empty() {
            let Some(lease) = self.try_lease(st) else {
                break;
            };
            let waiter = st.waiters.pop_front().expect("checked non-empty");
            if let Err(Ok(lease)) = waiter.tx.send(Ok(lease)) {
                undelivered.push(lease);
            }
        }
        undelivered
    }

    /// Starts restores: enough for the queue, plus enough to reach
    /// `min_warm + extra`, within `max_instances` and outside backoff.
    fn start_restores(self: &Arc<Self>, st: &mut State, extra: usize) {
        if st.closed || st.retry_at.is_some_and(|t| t > Instant::now()) {
            return;
        }
        let per = self.cfg.max_concurrency.max(1);
        let for_queue = st.waiters.len().div_ceil(per);
        let live = st.instances.iter().filter(|i| !i.draining).count();
        let for_warm = (self.cfg.min_warm + extra).saturating_sub(live);
        let need = for_queue.max(for_warm).saturating_sub(st.restoring);
        let room = self
            .cfg
            .max_instances
            .saturating_sub(st.instances.len() + st.restoring);
        for _ in 0..need.min(room) {
            st.restoring += 1;
            st.peak = st.peak.max(st.instances.len() + st.restoring);
            let id = VmId::new(format!(
                "{}-{}",
                self.app,
                self.seq.fetch_add(1, Ordering::Relaxed)
            ));
            tokio::spawn(restore(self.clone(), id));
        }
    }

    fn release(self: &Arc<Self>, vm: &VmId, broken: bool) {
        let (undelivered, doomed) = {
            let mut st = self.lock();
            let mut doomed = None;
            if let Some(pos) = st.instances.iter().position(|i| i.vm.id() == vm) {
                let instance = &mut st.instances[pos];
                instance.in_flight -= 1;
                if broken && !instance.draining {
                    warn!(app = %self.app, vm = %vm, "instance failed a request; replacing it");
                    instance.draining = true;
                    self.metrics.instance_failed(&self.app);
                }
                if instance.in_flight == 0 {
                    instance.idle_since = Instant::now();
                    if instance.draining || st.closed {
                        doomed = Some(st.instances.remove(pos));
                    }
                }
            }
            let undelivered = self.dispatch(&mut st);
            if doomed.is_some() {
                self.start_restores(&mut st, 0);
            }
            self.publish(&st);
            (undelivered, doomed)
        };
        drop(undelivered);
        if let Some(instance) = doomed {
            self.stop_in_background(instance.vm);
        }
        self.wake.notify_one();
    }

    async fn stop(&self, vm: Vm) {
        let id = vm.id().clone();
        if let Err(e) = self.factory.stop(vm).await {
            error!(app = %self.app, vm = %id, "stopping instance: {}", crate::display_chain(&e));
        }
    }

    fn stop_in_background(self: &Arc<Self>, vm: Vm) {
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let me = self.clone();
                me.stopping.fetch_add(1, Ordering::SeqCst);
                rt.spawn(async move {
                    me.stop(vm).await;
                    me.stopping.fetch_sub(1, Ordering::SeqCst);
                });
            }
            // No runtime (process exit): dropping the VM kills its VMM.
            Err(_) => drop(vm),
        }
    }

    fn publish(&self, st: &State) {
        let count = |state| st.instances.iter().filter(|i| i.state() == state).count();
        let counts = [
            (InstanceState::Restoring, st.restoring),
            (InstanceState::Warm, count(InstanceState::Warm)),
            (InstanceState::Leased, count(InstanceState::Leased)),
            (InstanceState::Draining, count(InstanceState::Draining)),
        ];
        for (state, n) in counts {
            self.metrics
                .set_instances(&self.app, state.as_str(), n as i64);
        }
        self.metrics.set_queue(&self.app, st.waiters.len() as i64);
    }
}

/// One restore: start the instance, then add it to the pool or record the
/// failure (module doc, step 4).
async fn restore(shared: Arc<Shared>, id: VmId) {
    let started = Instant::now();
    info!(app = %shared.app, vm = %id, "restoring");
    let result = shared.factory.start(id.clone()).await;
    let took = started.elapsed();
    match result {
        Ok(vm) => {
            shared.metrics.restored(&shared.app, took);
            info!(app = %shared.app, vm = %id, pid = vm.pid(), timings = %vm.timings(), "ready after {:.0} ms", took.as_secs_f64() * 1e3);
            let client = upstream::client(Some(&vm.endpoint().tap));
            let (undelivered, rejected) = {
                let mut st = shared.lock();
                st.restoring -= 1;
                st.failures = 0;
                st.retry_at = None;
                st.last_error = None;
                if st.closed {
                    shared.publish(&st);
                    (Vec::new(), Some(vm))
                } else {
                    st.instances.push(Instance {
                        vm,
                        client,
                        in_flight: 0,
                        idle_since: Instant::now(),
                        draining: false,
                        gone: CancellationToken::new(),
                    });
                    let undelivered = shared.dispatch(&mut st);
                    shared.publish(&st);
                    (undelivered, None)
                }
            };
            drop(undelivered);
            if let Some(vm) = rejected {
                shared.stop(vm).await;
            }
        }
        Err(e) => {
            shared.metrics.restore_failed(&shared.app);
            error!(app = %shared.app, vm = %id, "restore failed: {}", crate::display_chain(&e));
            let failed = {
                let mut st = shared.lock();
                st.restoring -= 1;
                st.failures += 1;
                let wait = backoff(st.failures);
                st.retry_at = Some(Instant::now() + wait);
                st.last_error = Some(crate::display_chain(&e));
                st.last_app_failed = matches!(e, VmmError::App { .. });
                let serving = st.instances.iter().any(|i| !i.draining);
                // Nothing else will serve the queue: fail it now, clearly.
                let failed: Vec<Waiter> = if !serving && st.restoring == 0 {
                    st.waiters.drain(..).collect()
                } else {
                    Vec::new()
                };
                shared.publish(&st);
                (failed, wait)
            };
            let (waiters, wait) = failed;
            for w in waiters {
                let _ = w.tx.send(Err(ClaimError::Unavailable {
                    app: shared.app.clone(),
                    reason: e.to_string(),
                    app_failed: matches!(e, VmmError::App { .. }),
                    retry_after: wait,
                }));
            }
        }
    }
    shared.wake.notify_one();
}

/// The maintenance task (module doc, step 5).
async fn maintain(shared: Arc<Shared>) {
    loop {
        let now = Instant::now();
        let (to_stop, next) = {
            let mut st = shared.lock();
            let mut to_stop = Vec::new();
            // VMMs that died: gone at once if idle, else drained.
            let mut i = 0;
            while i < st.instances.len() {
                let instance = &mut st.instances[i];
                if let Some(status) = instance.vm.process_mut().exited() {
                    instance.gone.cancel();
                    if !instance.draining {
                        warn!(app = %shared.app, vm = %instance.vm.id(), "VMM exited ({status}); replacing it");
                        shared.metrics.instance_failed(&shared.app);
                        instance.draining = true;
                    }
                    if instance.in_flight == 0 {
                        to_stop.push(st.instances.remove(i));
                        continue;
                    }
                }
                i += 1;
            }
            // Reap instances idle for idle_timeout, oldest first, down to min_warm.
            let idle_timeout = shared.cfg.idle_timeout;
            let mut live = st.instances.iter().filter(|i| !i.draining).count();
            let mut next = now + MAINTENANCE_TICK;
            loop {
                if live <= shared.cfg.min_warm || st.closed {
                    break;
                }
                let oldest = st
                    .instances
                    .iter()
                    .enumerate()
                    .filter(|(_, i)| !i.draining && i.in_flight == 0)
                    .min_by_key(|(_, i)| i.idle_since);
                let Some((pos, instance)) = oldest else { break };
                let due = instance.idle_since + idle_timeout;
                if due > now {
                    next = next.min(due);
                    break;
                }
                let instance = st.instances.remove(pos);
                info!(app = %shared.app, vm = %instance.vm.id(), "reaped after {:.1}s idle", (now - instance.idle_since).as_secs_f64());
                shared.metrics.reaped(&shared.app);
                to_stop.push(instance);
                live -= 1;
            }
            if let Some(t) = st.retry_at {
                if t > now {
                    next = next.min(t);
                }
            }
            shared.start_restores(&mut st, 0);
            shared.publish(&st);
            let done = st.closed && st.instances.is_empty() && st.restoring == 0;
            if done && to_stop.is_empty() {
                return;
            }
            (to_stop, next)
        };
        // Stops run on their own tasks: a slow VMM exit must not delay
        // noticing dead VMMs or restores due after a backoff.
        for instance in to_stop {
            shared.stop_in_background(instance.vm);
        }
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = shared.wake.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests;
