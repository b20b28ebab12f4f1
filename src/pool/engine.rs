//! The instance engine: one state machine for every set of instances
//! snapgate keeps (an app's pool, a runtime's stock of clones), generic
//! over what an instance is ([`Instance`]) and how one starts ([`Factory`]).
//!
//! # Protocol
//! 1. One `std::sync::Mutex` guards an engine's `State`: its members, the
//!    restores in flight, the hold queue (see `hold.rs`) and the backoff. It
//!    is never held across an `.await`; starts and stops run outside it.
//!    Every change ends in `Shared::settle`: it publishes the counts (to
//!    the [`Observer`] and the [`Stats`] watch that tests and close wait
//!    on), releases the lock, and only then spawns the restores and stops
//!    decided under it (a task spawned onto a runtime that is shutting
//!    down is dropped at once, and its guard takes the lock). Tasks are
//!    spawned on the runtime the engine was made on, whichever thread
//!    decides them (a lease may end on any thread).
//! 2. Restores: `start_restores` starts enough for the hold queue
//!    (`ceil(queued / max_concurrency)`) and for `min_warm`, minus those in
//!    flight, within `max_instances`, never during a backoff. Each restore
//!    is a task on the engine's tracker, owned by a `Restoring` guard that
//!    takes its slot back on drop, so a panicking or cancelled start never
//!    loses capacity. A start that does not finish within `start_timeout`
//!    is dropped (an instance half made is destroyed with it: dropping a
//!    `Vm` kills its VMM) and counts as a failure. Close cancels restores
//!    in flight.
//! 3. A started instance joins as a member, the hold queue is served from
//!    it at once (those leases are `fresh`: `hold` step 5), and it gets one
//!    exit waiter: a
//!    task that waits on the instance's exit event ([`Instance::exited`])
//!    and, when it fires, cancels the member's `gone` token (requests in
//!    flight on it end at once), marks it draining and wakes maintenance.
//!    Leasing also checks, under the lock, that the process still runs
//!    ([`Instance::is_exiting`]), so a VMM that died a moment ago is never
//!    leased.
//! 4. A failure (error, timeout, panic) arms a backoff (0.5 s doubling to
//!    30 s; failures while a backoff runs, such as the other restores of
//!    the same round, do not double it) and, if nothing can serve the
//!    queue, fails the queue with it.
//! 5. Maintenance (one task per engine) wakes on a notification (a
//!    member to stop or replace, restores ended, a resize, a close, or a
//!    lease ended that left a member idle with an idle deadline before
//!    maintenance's own next run; not every ended lease), at the next
//!    idle deadline or when the backoff ends: it stops draining
//!    members with nothing in flight, reaps members idle for `idle_timeout`
//!    down to `min_warm`, and restores up to `min_warm`. Reaping and leasing
//!    both run under the lock and reaping only takes members with nothing
//!    in flight, so a lease and the reaper never both win a member.
//! 6. Stops run as tasks on the tracker, counted in `State::stopping` from
//!    the moment the member leaves (so `Stats::is_empty` never sees a gap).
//!    Every stop is decided under the lock with its [`StopReason`] (idle,
//!    drained, failed, closed, surplus), logged once in the member's span
//!    and reported to the [`Observer`] there.
//!    A set that never reaps (a runtime's stock: `idle_timeout: None`)
//!    stops a started instance at once when no claim waits for it and
//!    `min_warm` is met: its claimer gave up while it started.
//! 7. Close: no new leases or restores; the queue fails at once; restores
//!    in flight are cancelled; idle members stop; busy ones stop as their
//!    last lease ends. [`Engine::close`] then waits on the stats watch
//!    until nothing is left (or its deadline) and cancels the engine's
//!    tasks (maintenance, exit waiters); the owner of the tracker (the
//!    gateway) waits for every task on it.
//! 8. Resize ([`Engine::resize`], a config reload): the new sizing
//!    replaces the old under the lock; held claims that now fit a member
//!    are leased, restores start for the queue and a larger `min_warm`,
//!    and maintenance wakes to reap by the new `min_warm` and
//!    `idle_timeout`. Nothing running is stopped for it: instances over a
//!    lowered `max_instances` stay until the reaper takes them (idle for
//!    `idle_timeout`, down to `min_warm`), and no restore starts while the
//!    set is at or over the cap; leases above a lowered `max_concurrency`
//!    end in their own time. Restores in flight keep the `start_timeout`
//!    they began with.
//! 9. Operators ([`Engine::drain`], [`Engine::prewarm`], from the admin
//!    API): a drained member is marked draining under the lock like a dead
//!    one, but its leases in flight run to their end (its `gone` token is
//!    not cancelled); it stops at once if it has none, else when the last
//!    ends (`release`), and `start_restores` replaces it if `min_warm`
//!    wants one. If its VMM dies meanwhile, step 3 applies as to any
//!    member (a member's failure is counted once, drained or not).
//!    Prewarm starts restores until free members plus restores in flight
//!    (less those the hold queue waits for) reach the number asked for,
//!    within `max_instances`, and never while closed or backing off; maintenance reaps the surplus
//!    over `min_warm` after `idle_timeout` as usual (a set that never
//!    reaps stops a surplus instance as it joins: step 6).

use std::collections::VecDeque;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, info_span, warn, Instrument, Span};

use super::hold::Waiter;
pub use super::traits::{
    Blame, ExitEvent, Factory, Instance, Observer, Sizing, StartError, StartFailure, Stats,
    StopReason, Tasks,
};

pub(super) struct Member<I: Instance> {
    pub(super) instance: I,
    pub(super) key: u64,
    /// The instance's name, made once: every lease carries it.
    pub(super) name: Arc<str>,
    pub(super) in_flight: usize,
    pub(super) idle_since: Instant,
    /// When `in_flight` last went from 0 to 1.
    pub(super) busy_since: Instant,
    /// When it joined (ready to serve).
    pub(super) joined: Instant,
    /// Leases it has had.
    pub(super) leases: u64,
    pub(super) draining: bool,
    /// Drained by an operator ([`Engine::drain`]).
    pub(super) drained: bool,
    /// Its span (`vm`, with the engine and its name): the parent of every
    /// lifecycle event logged for it.
    pub(super) span: Span,
    /// Counted as failed (its VMM died or it broke a request): counted
    /// once, drained or not.
    pub(super) failed: bool,
    /// Cancelled when its process dies.
    pub(super) gone: CancellationToken,
    /// Cancelled when it leaves the engine: ends its exit waiter.
    pub(super) left: CancellationToken,
}

/// A member or a restore in flight, as [`Engine::members`] lists it.
#[derive(Clone, Debug)]
pub struct MemberInfo<T> {
    /// The instance's name (a VM's id).
    pub name: Arc<str>,
    /// Where it stands.
    pub state: MemberState,
    /// Since it joined, or, while restoring, since its restore began.
    pub age: Duration,
    /// Leases in flight on it.
    pub in_flight: usize,
    /// How long it has had nothing in flight; `None` while it serves or
    /// restores.
    pub idle_for: Option<Duration>,
    /// The caller's details of the instance; `None` while restoring.
    pub detail: Option<T>,
}

/// The state of a [`MemberInfo`]: the `state` label values of the
/// `snapgate_instances` metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberState {
    /// Being restored (or started).
    Restoring,
    /// Ready, nothing in flight.
    Warm,
    /// Serving at least one lease.
    Leased,
    /// Taking no new lease; stops once its leases end.
    Draining,
}

impl MemberState {
    /// Its name, as the metric's label writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Restoring => "restoring",
            MemberState::Warm => "warm",
            MemberState::Leased => "leased",
            MemberState::Draining => "draining",
        }
    }
}

/// What [`Engine::drain`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drained {
    /// The member drains (or drained already), and stops once its leases
    /// end.
    Draining,
    /// That name is a restore in flight: nothing to drain yet.
    Restoring,
    /// No member or restore has that name.
    NotFound,
}

/// What [`Engine::prewarm`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prewarmed {
    /// Restores it started.
    pub started: usize,
    /// Restores it would have started but for `max_instances`.
    pub over_max: usize,
}

/// Why [`Engine::prewarm`] started nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prewarm {
    /// The engine is closed (a reload retired it, or shutdown).
    Closed,
    /// Starts failed lately; the next is allowed after `for_`.
    BackingOff {
        /// Until the backoff ends.
        for_: Duration,
        /// The last start's error.
        reason: String,
    },
}

impl<F: Factory> State<F> {
    /// Restores in flight.
    pub(super) fn restoring(&self) -> usize {
        self.starting.len()
    }
}

impl<I: Instance> Member<I> {
    /// Why it stops, when it leaves for no reason of the caller's own:
    /// failed, drained, or its engine closed (`closed`).
    pub(super) fn leaving(&self, closed: bool) -> StopReason {
        if self.failed {
            StopReason::Failed
        } else if self.drained {
            StopReason::Drained
        } else if closed {
            StopReason::Closed
        } else {
            // A member drains only by failing, by an operator or by a
            // close; a bare draining flag is a failure.
            StopReason::Failed
        }
    }

    /// Where it stands (its `snapgate_instances` state).
    pub(super) fn state(&self) -> MemberState {
        match (self.draining, self.in_flight) {
            (true, _) => MemberState::Draining,
            (false, 0) => MemberState::Warm,
            (false, _) => MemberState::Leased,
        }
    }
}

pub(super) struct State<F: Factory> {
    /// How many instances to keep and hand out; changed by
    /// [`Engine::resize`].
    pub(super) sizing: Sizing,
    pub(super) members: Vec<Member<F::Instance>>,
    /// The restores in flight: their ids and when each began.
    pub(super) starting: Vec<(Arc<str>, Instant)>,
    pub(super) stopping: usize,
    pub(super) waiters: VecDeque<Waiter<F>>,
    pub(super) next_waiter: u64,
    pub(super) failures: u32,
    pub(super) retry_at: Option<Instant>,
    pub(super) last_error: Option<(String, Blame)>,
    pub(super) closed: bool,
    pub(super) peak: usize,
    /// When maintenance next runs by itself, as it last decided (`None`:
    /// only when woken); a release wakes it for an idle member due
    /// earlier (step 5).
    pub(super) maintenance_due: Option<Instant>,
    /// Starts and stops decided under the lock, spawned once it is
    /// released ([`Shared::settle`]).
    pub(super) work: Work<F>,
}

/// Tasks to spawn once the lock is released: a task spawned onto a
/// runtime that is shutting down is dropped inside `spawn`, and its guard
/// then takes the lock (module doc, step 1).
pub(super) struct Work<F: Factory> {
    restores: Vec<(Restoring<F>, crate::vmm::VmId)>,
    stops: Vec<(Stopping<F>, Member<F::Instance>)>,
}

impl<F: Factory> Default for Work<F> {
    fn default() -> Self {
        Work {
            restores: Vec::new(),
            stops: Vec::new(),
        }
    }
}

pub(super) struct Shared<F: Factory> {
    pub(super) name: String,
    pub(super) factory: F,
    pub(super) state: Mutex<State<F>>,
    pub(super) wake: Notify,
    pub(super) observer: Arc<dyn Observer>,
    seq: AtomicU64,
    pub(super) tracker: TaskTracker,
    /// The runtime tasks are spawned on, whichever thread decides them.
    runtime: tokio::runtime::Handle,
    /// Cancels every task of this engine.
    cancel: CancellationToken,
    /// Cancels restores in flight (on close).
    restores: CancellationToken,
    stats: watch::Sender<Stats>,
}

/// A set of instances of one factory (module doc). Cheap to clone.
pub struct Engine<F: Factory> {
    pub(super) shared: Arc<Shared<F>>,
}

impl<F: Factory> Clone for Engine<F> {
    fn clone(&self) -> Self {
        Engine {
            shared: self.shared.clone(),
        }
    }
}

const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How long to wait after `failures` failed starts in a row: 0.5 s,
/// doubling, at most 30 s.
pub fn backoff(failures: u32) -> Duration {
    BACKOFF_BASE
        .saturating_mul(1u32 << failures.saturating_sub(1).min(10))
        .min(BACKOFF_MAX)
}

impl<F: Factory> Engine<F> {
    /// An engine named `name` (its instances are `<name>-<n>`), whose
    /// tasks run on `tasks`; maintenance starts at once and restores
    /// `min_warm` instances.
    pub fn new(
        name: impl Into<String>,
        sizing: Sizing,
        factory: F,
        observer: Arc<dyn Observer>,
        tasks: &Tasks,
    ) -> Engine<F> {
        let cancel = tasks.cancel.child_token();
        let shared = Arc::new(Shared {
            name: name.into(),
            factory,
            state: Mutex::new(State {
                sizing,
                members: Vec::new(),
                starting: Vec::new(),
                stopping: 0,
                waiters: VecDeque::new(),
                next_waiter: 0,
                failures: 0,
                retry_at: None,
                last_error: None,
                closed: false,
                maintenance_due: None,
                peak: 0,
                work: Work::default(),
            }),
            wake: Notify::new(),
            observer,
            seq: AtomicU64::new(1),
            tracker: tasks.tracker.clone(),
            runtime: tokio::runtime::Handle::current(),
            restores: cancel.child_token(),
            cancel,
            stats: watch::channel(Stats::default()).0,
        });
        shared.publish(&shared.lock());
        shared
            .tracker
            .spawn_on(maintain(shared.clone()), &shared.runtime);
        Engine { shared }
    }

    /// The factory it starts instances with.
    pub fn factory(&self) -> &F {
        &self.shared.factory
    }

    /// The engine's name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Current counts.
    pub fn stats(&self) -> Stats {
        *self.shared.stats.borrow()
    }

    /// A watch of the counts, updated on every change.
    pub fn watch(&self) -> watch::Receiver<Stats> {
        self.shared.stats.subscribe()
    }

    /// The last failed start's error, while starts keep failing, and
    /// whose fault it was.
    pub fn last_error(&self) -> Option<(String, Blame)> {
        self.shared.lock().last_error.clone()
    }

    /// Applies `f` to every member.
    pub fn each<T>(&self, mut f: impl FnMut(&F::Instance) -> T) -> Vec<T> {
        let st = self.shared.lock();
        st.members.iter().map(|m| f(&m.instance)).collect()
    }

    /// Every member and restore in flight, as the admin API lists them;
    /// `f` gives each member's own details (a VM's pid and tap). `f` runs
    /// under the engine's lock: it must be quick and must not call the
    /// engine.
    pub fn members<T>(&self, mut f: impl FnMut(&F::Instance) -> T) -> Vec<MemberInfo<T>> {
        let st = self.shared.lock();
        let now = Instant::now();
        let mut out: Vec<MemberInfo<T>> = st
            .members
            .iter()
            .map(|m| MemberInfo {
                name: m.name.clone(),
                state: m.state(),
                age: now.saturating_duration_since(m.joined),
                in_flight: m.in_flight,
                idle_for: (m.in_flight == 0).then(|| now.saturating_duration_since(m.idle_since)),
                detail: Some(f(&m.instance)),
            })
            .collect();
        out.extend(st.starting.iter().map(|(name, began)| MemberInfo {
            name: name.clone(),
            state: MemberState::Restoring,
            age: now.saturating_duration_since(*began),
            in_flight: 0,
            idle_for: None,
            detail: None,
        }));
        out
    }

    /// Drains the member `name` (module doc, step 9): it takes no new
    /// lease, stops once its leases in flight end, and a replacement
    /// starts if `min_warm` wants one. A restore in flight of that name is
    /// not drained (it joins as any other); nor is a name unknown.
    pub fn drain(&self, name: &str) -> Drained {
        let shared = &self.shared;
        let mut st = shared.lock();
        let Some(pos) = st.members.iter().position(|m| &*m.name == name) else {
            return match st.starting.iter().any(|(n, _)| &**n == name) {
                true => Drained::Restoring,
                false => Drained::NotFound,
            };
        };
        let m = &mut st.members[pos];
        if !m.draining {
            info!(parent: &m.span, in_flight = m.in_flight, "drained by an operator");
            m.draining = true;
            m.drained = true;
            shared.observer.drained();
        }
        if m.in_flight == 0 {
            let member = st.members.remove(pos);
            let why = member.leaving(false);
            shared.stop(&mut st, member, why);
        }
        shared.start_restores(&mut st);
        shared.settle(st);
        shared.wake.notify_one();
        Drained::Draining
    }

    /// Starts what it takes to have `warm` members free to lease,
    /// counting restores in flight (less those the hold queue waits for),
    /// within `max_instances` and never while closed or backing off after
    /// failures (module doc, step 9). Members beyond `min_warm` are reaped
    /// after `idle_timeout` like any other.
    pub fn prewarm(&self, warm: usize) -> Result<Prewarmed, Prewarm> {
        let shared = &self.shared;
        let mut st = shared.lock();
        if st.closed {
            return Err(Prewarm::Closed);
        }
        let now = Instant::now();
        if let Some(t) = st.retry_at.filter(|t| *t > now) {
            let reason = st
                .last_error
                .as_ref()
                .map_or_else(String::new, |e| e.0.clone());
            return Err(Prewarm::BackingOff {
                for_: t - now,
                reason,
            });
        }
        let free = st
            .members
            .iter()
            .filter(|m| m.state() == MemberState::Warm)
            .count();
        // Restores the held claims wait for will not be free.
        let for_queue = st.waiters.len().div_ceil(st.sizing.max_concurrency.max(1));
        let coming = (free + st.restoring()).saturating_sub(for_queue);
        let room = st
            .sizing
            .max_instances
            .saturating_sub(st.members.len() + st.restoring());
        let wanted = warm.saturating_sub(coming);
        let started = wanted.min(room);
        shared.add_restores(&mut st, started);
        shared.settle(st);
        Ok(Prewarmed {
            started,
            over_max: wanted - started,
        })
    }

    /// Applies new sizing to the running set (module doc, step 8).
    pub fn resize(&self, sizing: Sizing) {
        let shared = &self.shared;
        let undelivered = {
            let mut st = shared.lock();
            if st.closed {
                return;
            }
            st.sizing = sizing;
            // Claims held for want of room may fit now; the queue and
            // min_warm may want more restores.
            let undelivered = shared.dispatch(&mut st, None);
            shared.start_restores(&mut st);
            shared.settle(st);
            undelivered
        };
        drop(undelivered);
        // Maintenance reaps down to the new min_warm, by the new
        // idle_timeout.
        shared.wake.notify_one();
    }

    /// The current sizing.
    pub fn sizing(&self) -> Sizing {
        self.shared.lock().sizing
    }

    /// Starts closing (module doc, step 7).
    pub fn begin_close(&self) {
        let shared = &self.shared;
        let waiters = {
            let mut st = shared.lock();
            st.closed = true;
            let waiters: Vec<Waiter<F>> = st.waiters.drain(..).collect();
            let (idle, busy): (Vec<_>, Vec<_>) =
                st.members.drain(..).partition(|m| m.in_flight == 0);
            st.members = busy;
            for m in &mut st.members {
                m.draining = true;
            }
            for member in idle {
                // One found dead and not yet taken out stops as failed.
                let why = member.leaving(true);
                shared.stop(&mut st, member, why);
            }
            shared.settle(st);
            waiters
        };
        shared.restores.cancel();
        for w in waiters {
            w.shutting_down();
        }
        shared.wake.notify_one();
    }

    /// Closes ([`Engine::begin_close`]) and waits, at most `within`, until
    /// every member, restore and stop is gone; then cancels the engine's
    /// tasks (module doc, step 7). Members still leased at the deadline
    /// are stopped when their leases end.
    pub async fn close(&self, within: Duration) {
        self.begin_close();
        let mut stats = self.watch();
        let emptied = tokio::time::timeout(within, stats.wait_for(Stats::is_empty)).await;
        if emptied.is_err() {
            warn!(engine = %self.shared.name, stats = ?self.stats(), "instances still running after close");
        }
        self.shared.cancel.cancel();
    }
}

impl<F: Factory> Shared<F> {
    pub(super) fn lock(&self) -> MutexGuard<'_, State<F>> {
        // A panic while holding the lock leaves counts that may be off by
        // one; serving on is better than poisoning every later request.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes the counts (module doc, step 1).
    pub(super) fn publish(&self, st: &State<F>) {
        let count = |state| st.members.iter().filter(|m| m.state() == state).count();
        let stats = Stats {
            instances: st.members.len(),
            leased: count(MemberState::Leased),
            open: st
                .members
                .iter()
                .filter(|m| !m.draining && m.in_flight < st.sizing.max_concurrency)
                .count(),
            draining: count(MemberState::Draining),
            restoring: st.restoring(),
            queued: st.waiters.len(),
            stopping: st.stopping,
            peak: st.peak,
            closed: st.closed,
        };
        self.observer.publish(&stats);
        self.stats.send_replace(stats);
    }

    /// Starts restores (module doc, step 2).
    pub(super) fn start_restores(self: &Arc<Self>, st: &mut State<F>) {
        if st.closed || st.retry_at.is_some_and(|t| t > Instant::now()) {
            return;
        }
        let sizing = st.sizing;
        let for_queue = st.waiters.len().div_ceil(sizing.max_concurrency.max(1));
        let live = st.members.iter().filter(|m| !m.draining).count();
        let for_warm = sizing.min_warm.saturating_sub(live);
        let need = for_queue.max(for_warm).saturating_sub(st.restoring());
        let room = sizing
            .max_instances
            .saturating_sub(st.members.len() + st.restoring());
        self.add_restores(st, need.min(room));
    }

    /// Starts `n` restores, which the caller has checked fit.
    fn add_restores(self: &Arc<Self>, st: &mut State<F>, n: usize) {
        for _ in 0..n {
            let id = crate::vmm::VmId::unique(&self.name);
            let name: Arc<str> = id.to_string().into();
            st.starting.push((name.clone(), Instant::now()));
            st.peak = st.peak.max(st.members.len() + st.restoring());
            let guard = Restoring {
                shared: self.clone(),
                armed: true,
                name,
            };
            st.work.restores.push((guard, id));
        }
    }

    /// Stops `member`, just taken out of `st` (which the caller has
    /// locked), `why`, on a tracked task counted in `stopping` from this
    /// moment and spawned by [`Shared::settle`] (module doc, step 6).
    pub(super) fn stop(
        self: &Arc<Self>,
        st: &mut State<F>,
        member: Member<F::Instance>,
        why: StopReason,
    ) {
        let now = Instant::now();
        let lived = now - member.joined;
        info!(
            parent: &member.span,
            reason = why.as_str(),
            lived_ms = lived.as_millis() as u64,
            idle_ms = (now - member.idle_since).as_millis() as u64,
            leases = member.leases,
            "stopped"
        );
        self.observer.stopped(why, lived);
        member.left.cancel();
        st.stopping += 1;
        let guard = Stopping {
            shared: self.clone(),
        };
        st.work.stops.push((guard, member));
    }

    /// Publishes `st`, releases the lock, then spawns the work decided
    /// under it. Every change of the state ends here.
    pub(super) fn settle(self: &Arc<Self>, mut st: MutexGuard<'_, State<F>>) {
        self.publish(&st);
        let work = std::mem::take(&mut st.work);
        drop(st);
        for (guard, id) in work.restores {
            self.tracker.spawn_on(restore(guard, id), &self.runtime);
        }
        for (guard, member) in work.stops {
            let task = async move {
                let span = member.span.clone();
                if let Err(e) = guard.shared.factory.stop(member.instance).await {
                    error!(parent: &span, "stopping instance: {}", crate::display_chain(&e));
                }
                drop(guard);
            };
            self.tracker.spawn_on(task, &self.runtime);
        }
    }

    /// Marks the member `key` dead (module doc, step 3).
    fn on_exit(self: &Arc<Self>, key: u64) {
        let mut st = self.lock();
        if let Some(m) = st.members.iter_mut().find(|m| m.key == key) {
            let status = m.instance.has_exited();
            self.mark_dead(m, status);
        }
        self.settle(st);
        self.wake.notify_one();
    }

    /// A member whose process exited: no new leases, leases in flight end.
    pub(super) fn mark_dead(&self, m: &mut Member<F::Instance>, status: Option<ExitStatus>) {
        m.gone.cancel();
        // A drained member that dies is a failure too (its requests in
        // flight end here); one already counted is not counted again.
        if !m.failed {
            let status = status.map_or_else(|| "exit event".into(), |s| s.to_string());
            let lived_ms = m.joined.elapsed().as_millis() as u64;
            warn!(parent: &m.span, draining = m.draining, lived_ms, "failed: VMM exited ({status})");
            self.observer.instance_failed();
            m.failed = true;
        }
        m.draining = true;
    }

    /// Records a failed start (module doc, step 4); returns the waiters to
    /// fail and the backoff.
    fn failed(
        self: &Arc<Self>,
        st: &mut State<F>,
        err: &StartFailure,
    ) -> (Vec<Waiter<F>>, Duration) {
        // One round of restores that fail together (eight started for
        // eight requests) is one failure: only a failure after the backoff
        // ran out doubles it.
        let now = Instant::now();
        let retry_at = match st.retry_at {
            Some(t) if t > now => t,
            _ => {
                st.failures += 1;
                now + backoff(st.failures)
            }
        };
        st.retry_at = Some(retry_at);
        let wait = retry_at - now;
        st.last_error = Some((crate::display_chain(err), err.blame()));
        let serving = st.members.iter().any(|m| !m.draining);
        // Nothing else will serve the queue: fail it now, clearly.
        let failed = if !serving && st.starting.is_empty() {
            st.waiters.drain(..).collect()
        } else {
            Vec::new()
        };
        (failed, wait)
    }
}

/// A restore slot; dropping it (cancelled, panicked) gives the slot back
/// and wakes maintenance. A restore that ends normally gives it back under
/// the same lock as its outcome ([`Restoring::settle`]).
struct Restoring<F: Factory> {
    shared: Arc<Shared<F>>,
    armed: bool,
    /// Its entry in `State::starting`.
    name: Arc<str>,
}

impl<F: Factory> Restoring<F> {
    /// Gives the slot back in `st`, which the caller has locked.
    fn settle(mut self, st: &mut State<F>) {
        self.give_back(st);
        self.armed = false;
    }

    fn give_back(&self, st: &mut State<F>) {
        st.starting.retain(|(n, _)| !Arc::ptr_eq(n, &self.name));
    }
}

impl<F: Factory> Drop for Restoring<F> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut st = self.shared.lock();
        self.give_back(&mut st);
        self.shared.publish(&st);
        drop(st);
        self.shared.wake.notify_one();
    }
}

/// A stop in flight, undone on drop.
struct Stopping<F: Factory> {
    shared: Arc<Shared<F>>,
}

impl<F: Factory> Drop for Stopping<F> {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.stopping -= 1;
        self.shared.publish(&st);
    }
}

/// One start, bounded by `start_timeout`, cancelled on close, its panic
/// caught (module doc, steps 2 to 4).
async fn start_one<F: Factory>(
    shared: &Arc<Shared<F>>,
    id: crate::vmm::VmId,
) -> Option<Result<F::Instance, StartFailure>> {
    let timeout = shared.lock().sizing.start_timeout;
    let start = std::panic::AssertUnwindSafe(shared.factory.start(id)).catch_unwind();
    tokio::select! {
        _ = shared.restores.cancelled() => None,
        r = tokio::time::timeout(timeout, start) => Some(match r {
            Err(_) => Err(StartFailure::TimedOut(timeout)),
            Ok(Err(panic)) => Err(StartFailure::Panicked(panic_message(&panic))),
            Ok(Ok(Err(e))) => {
                let blame = e.blame();
                Err(StartFailure::Failed { error: Box::new(e), blame })
            }
            Ok(Ok(Ok(instance))) => Ok(instance),
        }),
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

async fn restore<F: Factory>(guard: Restoring<F>, id: crate::vmm::VmId) {
    let shared = guard.shared.clone();
    let started = Instant::now();
    // The VM's span: its start's logs (the factory's and the VMM
    // driver's) and every later event of the member are inside it.
    let span = info_span!("vm", engine = %shared.name, vm = %id);
    info!(parent: &span, "restoring");
    let Some(result) = start_one(&shared, id.clone())
        .instrument(span.clone())
        .await
    else {
        info!(parent: &span, "restore cancelled: closing");
        return;
    };
    let took = started.elapsed();
    let took_ms = took.as_millis() as u64;
    match result {
        Ok(instance) => {
            shared.observer.restored(took);
            // An instance named otherwise than its start (a runtime clone
            // an app started in) lives in a span of its own name, which
            // says what it was started as.
            let name = instance.name();
            let span = match name == id.to_string() {
                true => span,
                false => info_span!("vm", engine = %shared.name, vm = %name, started_as = %id),
            };
            info!(parent: &span, took_ms, "ready");
            join(&shared, guard, instance, span);
        }
        Err(e) => {
            shared.observer.restore_failed(&e, took);
            error!(parent: &span, reason = e.reason(), took_ms, "restore failed: {}", crate::display_chain(&e));
            let (waiters, wait) = {
                let mut st = shared.lock();
                // The slot goes back before the queue hears of the failure.
                guard.settle(&mut st);
                let failed = shared.failed(&mut st, &e);
                shared.settle(st);
                failed
            };
            let reason: Arc<str> = crate::display_chain(&e).into();
            for w in waiters {
                w.unavailable(&reason, e.blame(), wait);
            }
            shared.wake.notify_one();
        }
    }
}

/// Adds a started instance as a member, with its exit waiter, and serves
/// the queue (module doc, step 3).
fn join<F: Factory>(
    shared: &Arc<Shared<F>>,
    guard: Restoring<F>,
    instance: F::Instance,
    span: Span,
) {
    let key = shared.seq.fetch_add(1, Ordering::Relaxed);
    let left = shared.cancel.child_token();
    let exited = instance.exited();
    let (undelivered, joined) = {
        let mut st = shared.lock();
        guard.settle(&mut st);
        st.failures = 0;
        st.retry_at = None;
        st.last_error = None;
        let member = Member {
            name: instance.name().into(),
            instance,
            key,
            in_flight: 0,
            idle_since: Instant::now(),
            busy_since: Instant::now(),
            joined: Instant::now(),
            leases: 0,
            draining: false,
            drained: false,
            span,
            failed: false,
            gone: CancellationToken::new(),
            left: left.clone(),
        };
        // A set that never reaps (a runtime's stock) keeps no instance
        // nobody waits for beyond min_warm: its taker gave up meanwhile.
        let live = st.members.iter().filter(|m| !m.draining).count();
        let surplus =
            st.sizing.idle_timeout.is_none() && st.waiters.is_empty() && live >= st.sizing.min_warm;
        if st.closed || surplus {
            let why = match st.closed {
                true => StopReason::Closed,
                false => StopReason::Surplus,
            };
            shared.stop(&mut st, member, why);
            shared.settle(st);
            (Vec::new(), false)
        } else {
            st.members.push(member);
            let undelivered = shared.dispatch(&mut st, Some(key));
            shared.settle(st);
            (undelivered, true)
        }
    };
    drop(undelivered);
    if joined {
        let waiter = shared.clone();
        let watch = async move {
            tokio::select! {
                _ = exited => waiter.on_exit(key),
                _ = left.cancelled() => {}
            }
        };
        shared.tracker.spawn_on(watch, &shared.runtime);
    }
    shared.wake.notify_one();
}

/// The maintenance task (module doc, step 5).
async fn maintain<F: Factory>(shared: Arc<Shared<F>>) {
    loop {
        let next = {
            let mut st = shared.lock();
            let now = Instant::now();
            let mut to_stop = Vec::new();
            let mut i = 0;
            while i < st.members.len() {
                let m = &st.members[i];
                if m.draining && m.in_flight == 0 {
                    let why = m.leaving(st.closed);
                    to_stop.push((st.members.remove(i), why));
                } else {
                    i += 1;
                }
            }
            let next = reap(&mut st, now, &mut to_stop);
            st.maintenance_due = next;
            for (member, why) in to_stop {
                shared.stop(&mut st, member, why);
            }
            shared.start_restores(&mut st);
            shared.settle(st);
            next
        };
        let sleep = async {
            match next {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sleep => {}
            _ = shared.wake.notified() => {}
            _ = shared.cancel.cancelled() => return,
        }
    }
}

/// Reaps members idle for `idle_timeout`, oldest first, down to
/// `min_warm`; returns when maintenance is next due.
fn reap<F: Factory>(
    st: &mut State<F>,
    now: Instant,
    to_stop: &mut Vec<(Member<F::Instance>, StopReason)>,
) -> Option<Instant> {
    let mut next = st.retry_at.filter(|t| *t > now);
    let Some(idle_timeout) = st.sizing.idle_timeout else {
        return next;
    };
    let mut live = st.members.iter().filter(|m| !m.draining).count();
    while live > st.sizing.min_warm && !st.closed {
        let oldest = st
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| !m.draining && m.in_flight == 0)
            .min_by_key(|(_, m)| m.idle_since);
        let Some((pos, member)) = oldest else { break };
        // Bounded by validation; saturate all the same rather than panic.
        let due = member
            .idle_since
            .checked_add(idle_timeout)
            .unwrap_or_else(|| now + Duration::from_secs(86400 * 365));
        if due > now {
            next = Some(next.map_or(due, |n| n.min(due)));
            break;
        }
        let member = st.members.remove(pos);
        to_stop.push((member, StopReason::Idle));
        live -= 1;
    }
    next
}
