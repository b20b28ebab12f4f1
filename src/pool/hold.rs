//! Leases and the hold queue, on top of the engine's state.
//!
//! # Protocol
//! 1. [`Engine::claim`] takes the lock and leases the busiest member that
//!    still has room (`in_flight < max_concurrency`) and whose process
//!    still runs, packing requests so the others can go idle and be
//!    reaped. With no room anywhere it queues the claim (bounded by
//!    `hold_queue`) and starts the restores the queue needs; the claim
//!    then waits at most `hold_timeout`. During a backoff with nothing
//!    serving and nothing starting, a claim fails at once (`Unavailable`).
//! 2. A queued claim owns a `Queued` guard: when the claim is dropped (its
//!    client went away) or times out, the guard takes it off the queue and
//!    publishes the new depth at once.
//! 3. A [`Lease`] is a value; dropping it takes the lock, decrements its
//!    member's `in_flight`, stamps `idle_since` when it reaches zero, and
//!    hands freed capacity to queued claims in order. A lease marked
//!    broken drains its member: no new leases, stopped when its last
//!    lease ends. [`Lease::detach`] takes the member out of the engine
//!    for good (a runtime clone handed to an app).
//! 4. Capacity is handed to the queue (`dispatch`) under the lock; leases
//!    whose claimer went away in the meantime come back and are dropped
//!    after the lock is released.
//! 5. A lease knows how it came: `fresh` when handed out by the dispatch
//!    of its member's join (engine step 3: the claims the queue held for
//!    that start, however many `max_concurrency` lets it take), and, for a
//!    claim that waited in the queue, how long it was `held` (set once the
//!    wait ends). The pool's metrics read both: a held claim with a fresh
//!    lease was a cold start.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::engine::{Blame, Engine, Factory, Instance, Shared, State, StopReason};

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
        /// The last start's error.
        reason: Arc<str>,
        /// Whose fault the last failed start was.
        blame: Blame,
        /// When the next attempt is due.
        retry_after: Duration,
    },
    /// The gateway is shutting down.
    #[error("app {app}: shutting down")]
    ShuttingDown {
        /// The app.
        app: String,
    },
    /// No instance was free, and the claim asked not to wait (a cluster
    /// peer's forward to a warm instance it saw in the catalog).
    #[error("app {app}: no instance free now")]
    NoneFree {
        /// The app.
        app: String,
    },
}

impl ClaimError {
    /// What a client is told: no internals (instance, restore and queue
    /// counts, paths, VMM output), which go to the log and
    /// [`Engine::last_error`] instead.
    pub fn public_message(&self) -> String {
        match self {
            ClaimError::QueueFull { app, .. } => {
                format!("app {app}: no instance free and too many requests waiting")
            }
            ClaimError::HoldTimeout { app, .. } => {
                format!("app {app}: no instance became free in time")
            }
            ClaimError::Unavailable {
                app,
                blame: Blame::App,
                ..
            } => format!("app {app}: the app failed to start; the operator has the details"),
            ClaimError::Unavailable { app, .. } => {
                format!("app {app}: cannot start an instance right now")
            }
            ClaimError::ShuttingDown { .. } | ClaimError::NoneFree { .. } => self.to_string(),
        }
    }

    /// The `outcome` label of `snapgate_claims_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            ClaimError::QueueFull { .. } => "queue_full",
            ClaimError::HoldTimeout { .. } => "hold_timeout",
            ClaimError::Unavailable { .. } => "unavailable",
            ClaimError::ShuttingDown { .. } => "shutting_down",
            // Only a claim that does not wait fails so; none is counted.
            ClaimError::NoneFree { .. } => "none_free",
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

/// A claim waiting in the hold queue.
pub(super) struct Waiter<F: Factory> {
    id: u64,
    app: String,
    tx: oneshot::Sender<Result<Lease<F>, ClaimError>>,
}

impl<F: Factory> Waiter<F> {
    /// Fails the claim: the engine is closing.
    pub(super) fn shutting_down(self) {
        let _ = self
            .tx
            .send(Err(ClaimError::ShuttingDown { app: self.app }));
    }

    /// Fails the claim with a start's failure.
    pub(super) fn unavailable(self, reason: &Arc<str>, blame: Blame, retry_after: Duration) {
        let _ = self.tx.send(Err(ClaimError::Unavailable {
            app: self.app,
            reason: reason.clone(),
            blame,
            retry_after,
        }));
    }
}

/// The right to use one member: send it requests (the pool's leases), or
/// take it for good ([`Lease::detach`]). Dropping it gives the capacity
/// back (module doc, step 3).
pub struct Lease<F: Factory> {
    shared: Arc<Shared<F>>,
    key: u64,
    name: Arc<str>,
    address: <F::Instance as Instance>::Address,
    gone: CancellationToken,
    broken: bool,
    detached: bool,
    /// How long its claim was held; `None`: an instance was free.
    held: Option<Duration>,
    /// Handed out as its member joined, to a claim held for it.
    fresh: bool,
}

impl<F: Factory> std::fmt::Debug for Lease<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("engine", &self.shared.name)
            .field("instance", &self.name)
            .finish()
    }
}

impl<F: Factory> Lease<F> {
    /// The instance's name.
    pub fn instance(&self) -> &str {
        &self.name
    }

    /// The instance's name, shared.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// How long its claim was held in the queue; `None` if an instance
    /// was free at once.
    pub fn held(&self) -> Option<Duration> {
        self.held
    }

    /// Whether it was handed out as its instance joined (module doc, step
    /// 5): a held claim with a fresh lease waited for that instance's
    /// start, not for room on one already running.
    pub fn fresh(&self) -> bool {
        self.fresh
    }

    /// Where the instance serves.
    pub fn address(&self) -> &<F::Instance as Instance>::Address {
        &self.address
    }

    /// Cancelled if the instance's process dies while leased.
    pub fn gone(&self) -> &CancellationToken {
        &self.gone
    }

    /// Marks the instance as failed (it broke a request): it takes no new
    /// leases and is stopped when its last lease ends.
    pub fn mark_broken(&mut self) {
        self.broken = true;
    }

    /// Takes the instance out of the engine for good, which then starts
    /// another if `min_warm` asks for one. `None` if its process is exiting
    /// (the engine stops it), or if other leases share the member (then
    /// this lease just ends): only a sole lease can take its instance.
    pub fn detach(mut self) -> Option<F::Instance> {
        let shared = self.shared.clone();
        let mut st = shared.lock();
        let pos = st.members.iter().position(|m| m.key == self.key)?;
        if st.members[pos].in_flight > 1 {
            drop(st);
            return None;
        }
        self.detached = true;
        let mut member = st.members.remove(pos);
        member.left.cancel();
        let instance = if member.instance.is_exiting() {
            let status = member.instance.has_exited();
            shared.mark_dead(&mut member, status);
            shared.stop(&mut st, member, StopReason::Failed);
            None
        } else {
            let lived_ms = member.joined.elapsed().as_millis() as u64;
            info!(parent: &member.span, lived_ms, "taken out: handed on");
            Some(member.instance)
        };
        shared.start_restores(&mut st);
        shared.settle(st);
        shared.wake.notify_one();
        instance
    }
}

impl<F: Factory> Drop for Lease<F> {
    fn drop(&mut self) {
        if !self.detached {
            self.shared.release(self.key, self.broken);
        }
    }
}

/// A claim in the queue; dropping it takes the claim off the queue
/// (module doc, step 2).
struct Queued<F: Factory> {
    shared: Arc<Shared<F>>,
    id: u64,
}

impl<F: Factory> Queued<F> {
    /// Takes the claim off the queue; whether it was still there.
    fn leave(&self) -> bool {
        let mut st = self.shared.lock();
        let before = st.waiters.len();
        st.waiters.retain(|w| w.id != self.id);
        let removed = st.waiters.len() < before;
        if removed {
            self.shared.publish(&st);
        }
        removed
    }
}

impl<F: Factory> Drop for Queued<F> {
    fn drop(&mut self) {
        self.leave();
    }
}

impl<F: Factory> Engine<F> {
    /// Leases a member, holding the claim while none is free (module doc,
    /// step 1); also whether it had to wait.
    pub async fn claim(&self) -> Result<(Lease<F>, bool), ClaimError> {
        self.claim_held().await.map_err(|(e, _)| e)
    }

    /// A member free now, leased without waiting; `None` if there is none
    /// (or the engine is closed). Nothing is restored for it.
    pub fn try_claim(&self) -> Option<Lease<F>> {
        let shared = &self.shared;
        let mut st = shared.lock();
        if st.closed {
            return None;
        }
        let lease = shared.try_lease(&mut st, None)?;
        shared.publish(&st);
        Some(lease)
    }

    /// [`Engine::claim`], its error with how long the claim was held
    /// before it failed (`None`: it failed without being queued).
    pub async fn claim_held(&self) -> Result<(Lease<F>, bool), (ClaimError, Option<Duration>)> {
        let shared = &self.shared;
        let (queued, mut rx, hold_timeout, started) = {
            let mut st = shared.lock();
            if st.closed {
                return Err((shared.shutting_down(), None));
            }
            if let Some(lease) = shared.try_lease(&mut st, None) {
                shared.publish(&st);
                return Ok((lease, false));
            }
            if st.waiters.len() >= st.sizing.hold_queue {
                return Err((
                    ClaimError::QueueFull {
                        app: shared.name.clone(),
                        instances: st.members.len(),
                        restoring: st.restoring(),
                        queued: st.waiters.len(),
                    },
                    None,
                ));
            }
            if let Some(err) = shared.unavailable(&st) {
                return Err((err, None));
            }
            // The wait is timed from here: a warm claim reads no clock.
            let started = Instant::now();
            let (tx, rx) = oneshot::channel();
            let id = st.next_waiter;
            st.next_waiter += 1;
            st.waiters.push_back(Waiter {
                id,
                app: shared.name.clone(),
                tx,
            });
            let hold_timeout = st.sizing.hold_timeout;
            shared.start_restores(&mut st);
            shared.settle(st);
            let queued = Queued {
                shared: shared.clone(),
                id,
            };
            (queued, rx, hold_timeout, started)
        };
        let result = match tokio::time::timeout(hold_timeout, &mut rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(shared.shutting_down()),
            Err(_) if queued.leave() => Err(ClaimError::HoldTimeout {
                app: shared.name.clone(),
                waited: started.elapsed(),
            }),
            // Taken off the queue at the very deadline: its lease (or
            // error) is on the way, never lost.
            Err(_) => rx.await.unwrap_or_else(|_| Err(shared.shutting_down())),
        };
        drop(queued);
        let held = started.elapsed();
        match result {
            Ok(mut lease) => {
                lease.held = Some(held);
                Ok((lease, true))
            }
            Err(e) => Err((e, Some(held))),
        }
    }
}

impl<F: Factory> Shared<F> {
    pub(super) fn shutting_down(&self) -> ClaimError {
        ClaimError::ShuttingDown {
            app: self.name.clone(),
        }
    }

    /// The error for new claims while starts are failing and nothing can
    /// serve them.
    fn unavailable(&self, st: &State<F>) -> Option<ClaimError> {
        let retry_at = st.retry_at?;
        let now = Instant::now();
        let serving = st.members.iter().any(|m| !m.draining);
        if retry_at > now && !serving && st.starting.is_empty() {
            let (reason, blame) = st
                .last_error
                .clone()
                .unwrap_or((String::new(), Blame::Host));
            Some(ClaimError::Unavailable {
                app: self.name.clone(),
                reason: reason.into(),
                blame,
                retry_after: retry_at - now,
            })
        } else {
            None
        }
    }

    /// Leases the busiest member with room whose process still runs
    /// (members found dead are marked so and skipped).
    /// A lease of member `joined` is fresh (module doc, step 5).
    fn try_lease(self: &Arc<Self>, st: &mut State<F>, joined: Option<u64>) -> Option<Lease<F>> {
        let max = st.sizing.max_concurrency;
        loop {
            let m = st
                .members
                .iter_mut()
                .filter(|m| !m.draining && m.in_flight < max)
                .max_by_key(|m| m.in_flight)?;
            if m.instance.is_exiting() {
                let status = m.instance.has_exited();
                self.mark_dead(m, status);
                self.wake.notify_one();
                continue;
            }
            let first = m.leases == 0;
            let fresh = joined == Some(m.key);
            if m.in_flight == 0 {
                let now = Instant::now();
                m.busy_since = now;
                // Once per idle spell, not per lease: a member already
                // busy logs nothing more.
                let idle_ms = (now - m.idle_since).as_millis() as u64;
                if first {
                    info!(parent: &m.span, idle_ms, "leased");
                } else {
                    debug!(parent: &m.span, idle_ms, "leased");
                }
            }
            m.in_flight += 1;
            m.leases += 1;
            return Some(Lease {
                shared: self.clone(),
                key: m.key,
                name: m.name.clone(),
                address: m.instance.address(),
                gone: m.gone.clone(),
                broken: false,
                detached: false,
                held: None,
                fresh,
            });
        }
    }

    /// Hands free capacity to queued claims, in order (module doc, step
    /// 4). Returns leases whose claimer went away: the caller drops them
    /// after unlocking. Called as member `joined` joins, its leases are
    /// fresh (step 5).
    pub(super) fn dispatch(
        self: &Arc<Self>,
        st: &mut State<F>,
        joined: Option<u64>,
    ) -> Vec<Lease<F>> {
        let mut undelivered = Vec::new();
        while !st.waiters.is_empty() {
            let Some(lease) = self.try_lease(st, joined) else {
                break;
            };
            let waiter = st.waiters.pop_front().expect("checked non-empty");
            if let Err(Ok(lease)) = waiter.tx.send(Ok(lease)) {
                undelivered.push(lease);
            }
        }
        undelivered
    }

    /// A lease of member `key` ended (module doc, step 3). Maintenance is
    /// woken only when it has work the release made (engine step 5): a
    /// member to stop, or an idle one it could reap before it next runs by
    /// itself. A warm instance serving request after request wakes it
    /// none of the times (a wake per request cost a thread switch each).
    fn release(self: &Arc<Self>, key: u64, broken: bool) {
        let (undelivered, wake) = {
            let mut st = self.lock();
            let mut doomed = None;
            let mut idle_since = None;
            let closed = st.closed;
            if let Some(pos) = st.members.iter().position(|m| m.key == key) {
                let m = &mut st.members[pos];
                m.in_flight -= 1;
                if broken && !m.failed {
                    let lived_ms = m.joined.elapsed().as_millis() as u64;
                    warn!(parent: &m.span, lived_ms, "failed: the instance broke a request");
                    m.draining = true;
                    m.failed = true;
                    self.observer.instance_failed();
                }
                if m.in_flight == 0 {
                    let now = Instant::now();
                    m.idle_since = now;
                    let busy_ms = (now - m.busy_since).as_millis() as u64;
                    debug!(parent: &m.span, busy_ms, "idle");
                    if m.draining || closed {
                        let why = m.leaving(closed);
                        doomed = Some((st.members.remove(pos), why));
                    } else {
                        idle_since = Some(now);
                    }
                }
            }
            let wake = broken
                || doomed.is_some()
                || idle_since.is_some_and(|t| reapable_before_maintenance(&st, t));
            let undelivered = self.dispatch(&mut st, None);
            if let Some((member, why)) = doomed {
                self.stop(&mut st, member, why);
                self.start_restores(&mut st);
            }
            self.settle(st);
            (undelivered, wake)
        };
        drop(undelivered);
        if wake {
            self.wake.notify_one();
        }
    }
}

/// Whether a member idle since `t` could be reaped before maintenance
/// next runs by itself (`State::maintenance_due`): reaping is on, more
/// members live than `min_warm`, and its idle deadline comes first.
fn reapable_before_maintenance<F: Factory>(st: &State<F>, t: Instant) -> bool {
    let Some(idle_timeout) = st.sizing.idle_timeout else {
        return false;
    };
    let live = st.members.iter().filter(|m| !m.draining).count();
    if live <= st.sizing.min_warm {
        return false;
    }
    match (st.maintenance_due, t.checked_add(idle_timeout)) {
        (None, _) => true,
        (Some(due), Some(reap_at)) => reap_at < due,
        (Some(_), None) => false,
    }
}
