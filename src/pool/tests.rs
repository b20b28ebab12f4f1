//! The engine, leases and the hold queue against a scripted factory of fake
//! instances: no processes, paused time, and every wait is on the engine's
//! stats watch (or a claim's own result), never on sleeps or yields.

use std::collections::VecDeque;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::engine::{backoff, Blame, Engine, ExitEvent, Factory, Instance, Observer, Sizing};
use super::engine::{StartError, StartFailure, Stats, StopReason, Tasks};
use super::hold::ClaimError;
use crate::vmm::VmId;

/// A fake instance: "dies" when its `exit` token is cancelled. `silent`
/// deaths are seen only by a check, never by the exit event (a process
/// that died a moment before its event was handled).
struct Fake {
    name: String,
    exit: CancellationToken,
    silent: Arc<AtomicBool>,
}

impl Instance for Fake {
    type Address = String;
    fn name(&self) -> String {
        self.name.clone()
    }
    fn address(&self) -> String {
        format!("addr-of-{}", self.name)
    }
    fn has_exited(&mut self) -> Option<ExitStatus> {
        let dead = self.exit.is_cancelled() || self.silent.load(Ordering::SeqCst);
        dead.then(|| ExitStatus::from_raw(9))
    }
    fn exited(&self) -> ExitEvent {
        Box::pin(self.exit.clone().cancelled_owned())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("scripted failure of {id}{}", if *.app { " (the app's)" } else { "" })]
struct Scripted {
    id: String,
    app: bool,
}

impl StartError for Scripted {
    fn blame(&self) -> Blame {
        if self.app {
            Blame::App
        } else {
            Blame::Host
        }
    }
}

/// What one start does.
#[derive(Clone, Copy)]
enum Step {
    Fail,
    AppFault,
    Panic,
    Hang,
}

struct Script {
    delay: Duration,
    /// Steps of the first starts in order; afterwards starts succeed.
    steps: Mutex<VecDeque<Step>>,
    starts: AtomicUsize,
    stops: AtomicUsize,
    /// (exit token, silent-death flag) of every instance started.
    made: Mutex<Vec<(String, CancellationToken, Arc<AtomicBool>)>>,
}

impl Script {
    fn new(delay: Duration, steps: &[Step]) -> Arc<Script> {
        Arc::new(Script {
            delay,
            steps: Mutex::new(steps.iter().copied().collect()),
            starts: AtomicUsize::new(0),
            stops: AtomicUsize::new(0),
            made: Mutex::new(Vec::new()),
        })
    }
    fn starts(&self) -> usize {
        self.starts.load(Ordering::SeqCst)
    }
    fn stops(&self) -> usize {
        self.stops.load(Ordering::SeqCst)
    }
    fn kill(&self, name: &str, silently: bool) {
        let made = self.made.lock().unwrap();
        let (_, exit, silent) = made.iter().find(|(n, ..)| n == name).unwrap();
        if silently {
            silent.store(true, Ordering::SeqCst);
        } else {
            exit.cancel();
        }
    }
}

#[async_trait]
impl Factory for Arc<Script> {
    type Instance = Fake;
    type Error = Scripted;

    async fn start(&self, id: VmId) -> Result<Fake, Scripted> {
        self.starts.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        let step = self.steps.lock().unwrap().pop_front();
        let id = id.to_string();
        match step {
            Some(Step::Fail) => return Err(Scripted { id, app: false }),
            Some(Step::AppFault) => return Err(Scripted { id, app: true }),
            Some(Step::Panic) => panic!("scripted panic in {id}"),
            Some(Step::Hang) => std::future::pending::<()>().await,
            None => {}
        }
        let (exit, silent) = (CancellationToken::new(), Arc::new(AtomicBool::new(false)));
        let made = (id.clone(), exit.clone(), silent.clone());
        self.made.lock().unwrap().push(made);
        Ok(Fake {
            name: id,
            exit,
            silent,
        })
    }

    async fn stop(&self, _: Fake) -> Result<(), Scripted> {
        self.stops.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[derive(Default)]
struct Events {
    restored: AtomicUsize,
    failed: AtomicUsize,
    /// The reason of each failed start, in order.
    reasons: Mutex<Vec<&'static str>>,
    reaped: AtomicUsize,
    /// The reason of each stop, in order.
    stopped: Mutex<Vec<StopReason>>,
    died: AtomicUsize,
}

impl Observer for Events {
    fn publish(&self, _: &Stats) {}
    fn restored(&self, _: Duration) {
        self.restored.fetch_add(1, Ordering::SeqCst);
    }
    fn restore_failed(&self, failure: &StartFailure, _: Duration) {
        self.failed.fetch_add(1, Ordering::SeqCst);
        self.reasons.lock().unwrap().push(failure.reason());
    }
    fn stopped(&self, why: StopReason, _: Duration) {
        if why == StopReason::Idle {
            self.reaped.fetch_add(1, Ordering::SeqCst);
        }
        self.stopped.lock().unwrap().push(why);
    }
    fn instance_failed(&self) {
        self.died.fetch_add(1, Ordering::SeqCst);
    }
}

fn sizing(min_warm: usize, max_instances: usize, max_concurrency: usize) -> Sizing {
    Sizing {
        min_warm,
        max_instances,
        max_concurrency,
        idle_timeout: Some(Duration::from_secs(30)),
        start_timeout: Duration::from_secs(60),
        hold_queue: 100,
        hold_timeout: Duration::from_secs(10),
    }
}

type TestEngine = Engine<Arc<Script>>;

fn engine(sizing: Sizing, script: &Arc<Script>) -> (TestEngine, Arc<Events>) {
    let events = Arc::new(Events::default());
    let engine = Engine::new(
        "app",
        sizing,
        script.clone(),
        events.clone(),
        &Tasks::default(),
    );
    (engine, events)
}

/// Waits (in paused time: at once, or the clock jumps) until the stats
/// satisfy `cond`; fails after a virtual minute.
async fn until(engine: &TestEngine, what: &str, cond: impl FnMut(&Stats) -> bool) -> Stats {
    let mut watch = engine.watch();
    let waited = tokio::time::timeout(Duration::from_secs(60), watch.wait_for(cond)).await;
    match waited {
        Ok(Ok(stats)) => *stats,
        _ => panic!("{what}: stats stayed {:?}", engine.stats()),
    }
}

#[tokio::test(start_paused = true)]
async fn one_restore_per_instance_needed_not_per_request() {
    let s = Script::new(Duration::from_millis(200), &[]);
    let (engine, _) = engine(sizing(0, 4, 4), &s);
    let claims: Vec<_> = (0..6).map(|_| engine.claim()).collect();
    let leases = futures::future::join_all(claims).await;
    // ceil(6 / 4) = 2 instances needed; 2 restores, not 6.
    assert_eq!(s.starts(), 2);
    assert!(leases.iter().all(|l| matches!(l, Ok((_, true)))));
    let names: std::collections::HashSet<_> = leases
        .iter()
        .map(|l| l.as_ref().unwrap().0.instance().to_owned())
        .collect();
    assert_eq!(names.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn never_more_instances_than_max_and_every_claim_served() {
    let s = Script::new(Duration::from_millis(100), &[]);
    let (engine, _) = engine(sizing(0, 2, 1), &s);
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let engine = engine.clone();
            tokio::spawn(async move {
                let lease = engine.claim().await?;
                tokio::time::sleep(Duration::from_millis(50)).await;
                drop(lease);
                Ok::<(), ClaimError>(())
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(s.starts(), 2);
    assert_eq!(engine.stats().peak, 2);
}

#[tokio::test(start_paused = true)]
async fn full_queue_and_hold_timeout_answer_at_once_and_at_the_deadline() {
    let s = Script::new(Duration::from_millis(10), &[]);
    let mut c = sizing(0, 1, 1);
    c.hold_queue = 1;
    c.hold_timeout = Duration::from_secs(2);
    let (engine, _) = engine(c, &s);
    let busy = engine.claim().await.unwrap();
    let queued = tokio::spawn({
        let engine = engine.clone();
        async move {
            let started = Instant::now();
            (engine.claim().await, started.elapsed())
        }
    });
    until(&engine, "one claim queued", |s| s.queued == 1).await;
    let err = engine.claim().await.unwrap_err();
    assert!(matches!(err, ClaimError::QueueFull { .. }), "{err}");
    assert_eq!(err.retry_after(), 1);
    let (result, waited) = queued.await.unwrap();
    let err = result.unwrap_err();
    assert!(matches!(err, ClaimError::HoldTimeout { .. }), "{err}");
    assert_eq!(waited, Duration::from_secs(2));
    assert_eq!(engine.stats().queued, 0);
    // The instance was busy, not broken: once free, it serves again.
    drop(busy);
    assert!(matches!(engine.claim().await, Ok((_, false))));
    assert_eq!(s.starts(), 1);
}

#[tokio::test(start_paused = true)]
async fn held_claims_whose_clients_give_up_leave_the_queue_at_once() {
    let s = Script::new(Duration::from_secs(5), &[]);
    let (engine, _) = engine(sizing(0, 1, 1), &s);
    let claims: Vec<_> = (0..3)
        .map(|_| {
            let engine = engine.clone();
            tokio::spawn(async move { engine.claim().await.map(drop) })
        })
        .collect();
    until(&engine, "three claims held", |s| s.queued == 3).await;
    // The clients go away: their request futures are dropped.
    for claim in &claims {
        claim.abort();
    }
    for claim in claims {
        assert!(claim.await.unwrap_err().is_cancelled());
    }
    // At once: no clock moved, no later claim was needed.
    assert_eq!(engine.stats().queued, 0);
    // The restore they asked for still completes, for the next request.
    until(&engine, "the instance joined", |s| s.instances == 1).await;
    assert!(matches!(engine.claim().await, Ok((_, false))));
}

#[tokio::test(start_paused = true)]
async fn failed_restore_fails_its_waiters_then_retries_after_backoff() {
    let s = Script::new(Duration::from_millis(10), &[Step::Fail]);
    let (engine, events) = engine(sizing(0, 2, 1), &s);
    let err = engine.claim().await.unwrap_err();
    match &err {
        ClaimError::Unavailable {
            reason,
            retry_after,
            blame,
            ..
        } => {
            assert!(reason.contains("scripted failure of app-"), "{reason}");
            assert_eq!(*retry_after, backoff(1));
            assert_eq!(*blame, Blame::Host);
        }
        other => panic!("{other}"),
    }
    assert_eq!(
        err.public_message(),
        "app app: cannot start an instance right now"
    );
    // During the backoff, new claims are told at once, not held.
    let err = engine.claim().await.unwrap_err();
    assert!(matches!(err, ClaimError::Unavailable { .. }), "{err}");
    assert_eq!(s.starts(), 1);
    tokio::time::sleep(backoff(1)).await;
    assert!(engine.claim().await.is_ok());
    assert_eq!(s.starts(), 2);
    assert_eq!(events.failed.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn a_start_that_panics_gives_its_capacity_back() {
    let s = Script::new(Duration::from_millis(10), &[Step::Panic]);
    let (engine, _) = engine(sizing(0, 1, 1), &s);
    let err = engine.claim().await.unwrap_err();
    let ClaimError::Unavailable { reason, .. } = &err else {
        panic!("{err}")
    };
    assert!(
        reason.contains("panicked: scripted panic in app-"),
        "{reason}"
    );
    assert_eq!(engine.stats().restoring, 0, "the slot came back");
    // With max_instances 1, a lost slot would leave the app at 503 for
    // good; the next start (after the backoff) serves.
    tokio::time::sleep(backoff(1)).await;
    assert!(engine.claim().await.is_ok());
    assert_eq!(s.starts(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_start_that_never_ends_fails_at_start_timeout() {
    let s = Script::new(Duration::from_millis(10), &[Step::Hang]);
    let mut c = sizing(0, 1, 1);
    c.start_timeout = Duration::from_secs(3);
    c.hold_timeout = Duration::from_secs(30);
    let (engine, _) = engine(c, &s);
    let started = Instant::now();
    let err = engine.claim().await.unwrap_err();
    assert_eq!(started.elapsed(), Duration::from_secs(3));
    let ClaimError::Unavailable { reason, .. } = &err else {
        panic!("{err}")
    };
    assert!(reason.contains("within 3s (start_timeout)"), "{reason}");
    assert_eq!(engine.stats().restoring, 0);
    tokio::time::sleep(backoff(1)).await;
    let (_lease, held) = engine.claim().await.unwrap();
    assert!(held, "served by a fresh instance");
    assert_eq!(s.starts(), 2);
}

#[tokio::test(start_paused = true)]
async fn idle_instances_are_reaped_from_their_last_completion_down_to_min_warm() {
    let s = Script::new(Duration::from_millis(10), &[]);
    let mut c = sizing(1, 3, 1);
    c.idle_timeout = Some(Duration::from_secs(10));
    let (engine, events) = engine(c, &s);
    until(&engine, "min_warm pre-warms", |s| s.instances == 1).await;
    let a = engine.claim().await.unwrap();
    assert!(!a.1, "served warm");
    let b = engine.claim().await.unwrap();
    assert_eq!(engine.stats().instances, 2);
    // Busy for 20 s: longer than idle_timeout, but leased members stay.
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(engine.stats().instances, 2);
    drop(a);
    drop(b);
    let freed = Instant::now();
    // The idle clock starts at the last completion.
    until(&engine, "down to min_warm", |s| s.instances == 1).await;
    assert_eq!(freed.elapsed(), Duration::from_secs(10));
    until(&engine, "stopped", |s| s.stopping == 0).await;
    assert_eq!(s.stops(), 1);
    assert_eq!(events.reaped.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn an_instance_in_steady_use_is_reaped_idle_timeout_after_its_last_use() {
    // Releases do not wake maintenance while its own deadline comes
    // first (engine step 5): it must still find the newest idle time.
    let s = Script::new(Duration::from_millis(10), &[]);
    let mut c = sizing(0, 1, 1);
    c.idle_timeout = Some(Duration::from_secs(5));
    let (engine, events) = engine(c, &s);
    for _ in 0..6 {
        drop(engine.claim().await.unwrap());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(engine.stats().instances, 1, "not reaped while in use");
    }
    drop(engine.claim().await.unwrap());
    let last = Instant::now();
    until(&engine, "scaled to zero", Stats::is_empty).await;
    assert_eq!(last.elapsed(), Duration::from_secs(5));
    assert_eq!(events.reaped.load(Ordering::SeqCst), 1);
    assert_eq!(*events.stopped.lock().unwrap(), [StopReason::Idle]);
    assert_eq!(events.restored.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn scale_to_zero_and_back() {
    let s = Script::new(Duration::from_millis(10), &[]);
    let mut c = sizing(0, 1, 1);
    c.idle_timeout = Some(Duration::from_secs(5));
    let (engine, events) = engine(c, &s);
    drop(engine.claim().await.unwrap());
    until(&engine, "scaled to zero", Stats::is_empty).await;
    assert_eq!(s.stops(), 1);
    drop(engine.claim().await.unwrap());
    assert_eq!(events.restored.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn an_exit_event_replaces_the_instance_and_ends_its_leases() {
    let s = Script::new(Duration::from_millis(10), &[]);
    let (engine, events) = engine(sizing(1, 2, 2), &s);
    until(&engine, "warm", |s| s.instances == 1).await;
    let (lease, _) = engine.claim().await.unwrap();
    let dead = lease.instance().to_owned();
    s.kill(&dead, false);
    // The exit waiter ends the lease's requests at once...
    tokio::time::timeout(Duration::from_millis(1), lease.gone().cancelled())
        .await
        .expect("gone is cancelled by the exit event");
    // ...and a replacement restores without any tick.
    until(&engine, "replaced", |s| s.instances == 2 && s.draining == 1).await;
    drop(lease);
    until(&engine, "the dead one stopped", |s| {
        s.instances == 1 && s.stopping == 0
    })
    .await;
    let (next, _) = engine.claim().await.unwrap();
    assert_ne!(next.instance(), dead);
    assert_eq!(events.died.load(Ordering::SeqCst), 1);
    assert_eq!(*events.stopped.lock().unwrap(), [StopReason::Failed]);
}

#[tokio::test(start_paused = true)]
async fn an_instance_found_dead_at_lease_time_is_never_leased() {
    let s = Script::new(Duration::from_millis(10), &[]);
    let (engine, _) = engine(sizing(1, 2, 1), &s);
    until(&engine, "warm", |s| s.instances == 1).await;
    let first = engine.each(|f| f.name.clone()).remove(0);
    // Dead, and its exit event not yet handled.
    s.kill(&first, true);
    let (lease, held) = engine.claim().await.unwrap();
    assert!(held, "served by a new instance");
    assert!(lease.held().is_some() && lease.fresh());
    assert_ne!(lease.instance(), first);
    assert_eq!(s.starts(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_broken_lease_drains_its_instance() {
    let s = Script::new(Duration::from_millis(10), &[]);
    let (engine, events) = engine(sizing(1, 2, 2), &s);
    until(&engine, "warm", |s| s.instances == 1).await;
    let (mut lease, _) = engine.claim().await.unwrap();
    let (other, _) = engine.claim().await.unwrap();
    assert_eq!(lease.instance(), other.instance());
    // Warm hits: neither held nor fresh.
    assert_eq!((lease.held(), lease.fresh()), (None, false));
    assert_eq!((other.held(), other.fresh()), (None, false));
    lease.mark_broken();
    drop(lease);
    let (fresh, _) = engine.claim().await.unwrap();
    assert_ne!(
        fresh.instance(),
        other.instance(),
        "draining takes no leases"
    );
    drop(other);
    until(&engine, "the broken one stopped", |s| {
        s.draining == 0 && s.stopping == 0
    })
    .await;
    assert_eq!(s.stops(), 1);
    assert_eq!(*events.stopped.lock().unwrap(), [StopReason::Failed]);
}

#[tokio::test(start_paused = true)]
async fn close_fails_the_queue_cancels_restores_and_stops_everything() {
    let s = Script::new(Duration::from_millis(10), &[]);
    let (engine, events) = engine(sizing(1, 2, 1), &s);
    let (lease, _) = engine.claim().await.unwrap();
    let queued = tokio::spawn({
        let engine = engine.clone();
        async move { engine.claim().await.map(drop) }
    });
    until(&engine, "queued, restoring", |s| {
        s.queued == 1 && s.restoring == 1
    })
    .await;
    let closing = tokio::spawn({
        let engine = engine.clone();
        async move { engine.close(Duration::from_secs(5)).await }
    });
    let err = queued.await.unwrap().unwrap_err();
    assert!(matches!(err, ClaimError::ShuttingDown { .. }), "{err}");
    assert!(matches!(
        engine.claim().await,
        Err(ClaimError::ShuttingDown { .. })
    ));
    until(&engine, "restore cancelled", |s| s.restoring == 0).await;
    assert_eq!(s.starts(), 2, "the second never finished");
    // The in-flight lease finishes; then its instance goes too.
    drop(lease);
    closing.await.unwrap();
    assert!(engine.stats().is_empty());
    assert_eq!(s.stops(), 1);
    assert_eq!(*events.stopped.lock().unwrap(), [StopReason::Closed]);
}

#[tokio::test(start_paused = true)]
async fn an_app_that_fails_to_start_is_named_as_the_cause() {
    let s = Script::new(Duration::from_millis(10), &[Step::AppFault]);
    let (engine, _) = engine(sizing(0, 2, 1), &s);
    let err = engine.claim().await.unwrap_err();
    assert!(
        matches!(
            err,
            ClaimError::Unavailable {
                blame: Blame::App,
                ..
            }
        ),
        "{err}"
    );
    // The client hears whose fault it is, not the details.
    assert_eq!(
        err.public_message(),
        "app app: the app failed to start; the operator has the details"
    );
    let (kept, blame) = engine.last_error().unwrap();
    assert!(
        kept.contains("(the app's)") && kept.contains("scripted failure of app-"),
        "{kept}"
    );
    assert_eq!(blame, Blame::App);
    let again = engine.claim().await.unwrap_err();
    assert!(
        matches!(
            again,
            ClaimError::Unavailable {
                blame: Blame::App,
                ..
            }
        ),
        "{again}"
    );
    assert_eq!(s.starts(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_detached_instance_leaves_and_the_engine_refills() {
    let s = Script::new(Duration::from_millis(10), &[]);
    let mut c = sizing(2, usize::MAX, 1);
    c.idle_timeout = None;
    let (engine, _) = engine(c, &s);
    until(&engine, "stocked", |s| s.instances == 2).await;
    let (lease, held) = engine.claim().await.unwrap();
    assert!(!held);
    let taken = lease.detach().expect("alive");
    assert_eq!(engine.stats().instances, 1);
    until(&engine, "refilled", |s| s.instances == 2).await;
    assert!(!engine.each(|f| f.name.clone()).contains(&taken.name));
    // A detached instance is the taker's: the engine never stops it.
    engine.close(Duration::from_secs(1)).await;
    assert_eq!(s.stops(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_can_end_on_a_thread_without_a_runtime() {
    let s = Script::new(Duration::from_millis(1), &[]);
    let (engine, _) = engine(sizing(0, 2, 1), &s);
    let (mut lease, _) = engine.claim().await.unwrap();
    // Broken: its end stops the member and starts a replacement, both
    // spawned from a thread that has no runtime of its own.
    lease.mark_broken();
    let ended = std::thread::spawn(move || drop(lease));
    let joined = tokio::task::spawn_blocking(move || ended.join());
    tokio::time::timeout(Duration::from_secs(10), joined)
        .await
        .expect("the lease's end does not hang")
        .unwrap()
        .unwrap();
    let mut watch = engine.watch();
    let stopped = watch.wait_for(|s| s.instances == 0 && s.stopping == 0);
    tokio::time::timeout(Duration::from_secs(10), stopped)
        .await
        .expect("the broken member stops")
        .unwrap();
    assert_eq!(s.stops(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_stock_keeps_no_instance_whose_claimer_gave_up() {
    let s = Script::new(Duration::from_secs(5), &[]);
    let mut c = sizing(0, usize::MAX, 1);
    c.idle_timeout = None;
    let (engine, _) = engine(c, &s);
    let claims: Vec<_> = (0..3)
        .map(|_| {
            let engine = engine.clone();
            tokio::spawn(async move { engine.claim().await.map(drop) })
        })
        .collect();
    until(&engine, "three restoring", |s| s.restoring == 3).await;
    for claim in &claims {
        claim.abort();
    }
    until(&engine, "all started and stopped", |s| {
        s.restoring == 0 && s.instances == 0 && s.stopping == 0
    })
    .await;
    assert_eq!((s.starts(), s.stops()), (3, 3));
}

#[tokio::test(start_paused = true)]
async fn restores_that_fail_together_back_off_once() {
    let s = Script::new(Duration::from_millis(10), &[Step::Fail; 8]);
    let (engine, _) = engine(sizing(0, 8, 1), &s);
    let claims: Vec<_> = (0..8).map(|_| engine.claim()).collect();
    let results = futures::future::join_all(claims).await;
    assert_eq!(s.starts(), 8, "one round of eight restores");
    for r in &results {
        let Err(ClaimError::Unavailable { retry_after, .. }) = r else {
            panic!("{r:?}")
        };
        assert!(*retry_after <= backoff(1), "{retry_after:?}");
    }
    // The next round starts after the first backoff, not after eight.
    tokio::time::sleep(backoff(1)).await;
    assert!(engine.claim().await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn resize_serves_held_claims_that_now_fit_and_warms_and_reaps_to_the_new_min_warm() {
    let s = Script::new(Duration::from_millis(10), &[]);
    let (engine, _) = engine(sizing(0, 1, 1), &s);
    let first = engine.claim().await.unwrap().0;
    let held = tokio::spawn({
        let engine = engine.clone();
        async move { engine.claim().await }
    });
    until(&engine, "one claim held", |s| s.queued == 1).await;
    // Room for two requests per instance: the held claim gets the busy
    // member at once, no restore.
    engine.resize(sizing(0, 1, 2));
    let (second, was_held) = held.await.unwrap().unwrap();
    assert!(was_held);
    assert_eq!(second.instance(), first.instance());
    assert_eq!(s.starts(), 1);
    drop((first, second));
    // A larger min_warm is restored at once ...
    engine.resize(sizing(3, 4, 2));
    until(&engine, "three warm", |s| {
        s.instances == 3 && s.restoring == 0
    })
    .await;
    // ... and a smaller one with a short idle_timeout is reaped down to.
    let mut small = sizing(1, 4, 2);
    small.idle_timeout = Some(Duration::from_secs(1));
    engine.resize(small);
    until(&engine, "reaped to one", |s| {
        s.instances == 1 && s.stopping == 0
    })
    .await;
    assert_eq!(engine.sizing(), small);
}

#[tokio::test(start_paused = true)]
async fn a_drained_instance_finishes_its_leases_then_stops_and_is_replaced() {
    let s = Script::new(Duration::from_millis(10), &[]);
    let (engine, events) = engine(sizing(1, 2, 2), &s);
    until(&engine, "warm", |s| s.instances == 1).await;
    let (lease, _) = engine.claim().await.unwrap();
    let drained = lease.instance().to_owned();
    assert_eq!(engine.drain(&drained), super::Drained::Draining);
    assert_eq!(engine.drain("no-such-instance"), super::Drained::NotFound);
    // Its lease goes on: drained is not dead.
    assert!(!lease.gone().is_cancelled());
    // A replacement warms for min_warm; the drained one takes no lease.
    until(&engine, "replaced", |s| s.instances == 2 && s.draining == 1).await;
    let (next, held) = engine.claim().await.unwrap();
    assert!(!held);
    assert_ne!(next.instance(), drained);
    assert_eq!(s.stops(), 0, "not stopped while its lease runs");
    drop(lease);
    until(&engine, "the drained one stopped", |s| {
        s.instances == 1 && s.draining == 0 && s.stopping == 0
    })
    .await;
    assert_eq!(s.stops(), 1);
    assert_eq!(
        events.died.load(Ordering::SeqCst),
        0,
        "a drain is no failure"
    );
    // An idle instance drained stops at once.
    drop(next);
    let idle = engine.each(|f| f.name.clone()).remove(0);
    assert_eq!(engine.drain(&idle), super::Drained::Draining);
    until(&engine, "the idle one stopped and replaced", |s| {
        s.instances == 1 && s.stopping == 0 && s.draining == 0
    })
    .await;
    assert_eq!(s.stops(), 2);
    assert_ne!(engine.each(|f| f.name.clone()).remove(0), idle);
    assert_eq!(
        *events.stopped.lock().unwrap(),
        [StopReason::Drained, StopReason::Drained]
    );
}

#[tokio::test(start_paused = true)]
async fn prewarm_brings_free_instances_to_the_number_asked_within_max_then_they_are_reaped() {
    let s = Script::new(Duration::from_millis(10), &[]);
    let mut c = sizing(0, 3, 1);
    c.idle_timeout = Some(Duration::from_secs(30));
    let (engine, events) = engine(c, &s);
    let started = |started, over_max| Ok(super::Prewarmed { started, over_max });
    assert_eq!(engine.prewarm(2), started(2, 0));
    // Asked again while they restore: they count, nothing more starts.
    assert_eq!(engine.prewarm(2), started(0, 0));
    until(&engine, "two warm", |s| {
        s.instances == 2 && s.restoring == 0
    })
    .await;
    // Past max_instances: only what fits, and what did not is said.
    assert_eq!(engine.prewarm(5), started(1, 2));
    until(&engine, "three warm", |s| {
        s.instances == 3 && s.restoring == 0
    })
    .await;
    assert_eq!(s.starts(), 3);
    let listed = engine.members(|f| f.name.clone());
    assert_eq!(listed.len(), 3);
    assert!(listed
        .iter()
        .all(|m| m.state == super::MemberState::Warm && m.in_flight == 0));
    // Beyond min_warm (0) they are reaped after idle_timeout.
    until(&engine, "reaped", Stats::is_empty).await;
    assert_eq!(events.reaped.load(Ordering::SeqCst), 3);
    engine.begin_close();
    assert_eq!(engine.prewarm(1), Err(super::Prewarm::Closed));
}

#[tokio::test(start_paused = true)]
async fn prewarm_starts_nothing_while_starts_back_off() {
    let s = Script::new(Duration::from_millis(10), &[Step::Fail]);
    let (engine, _) = engine(sizing(0, 2, 1), &s);
    assert_eq!(engine.prewarm(1).map(|p| p.started), Ok(1));
    until(&engine, "the start failed", |s| s.restoring == 0).await;
    match engine.prewarm(1) {
        Err(super::Prewarm::BackingOff { reason, .. }) => {
            assert!(reason.contains("scripted failure"), "{reason}")
        }
        other => panic!("expected a backoff, got {other:?}"),
    }
    assert_eq!(s.starts(), 1);
}

#[tokio::test(start_paused = true)]
async fn members_lists_restores_in_flight_and_each_members_state_age_and_idle_time() {
    let s = Script::new(Duration::from_secs(2), &[]);
    let (engine, _) = engine(sizing(2, 2, 1), &s);
    until(&engine, "restoring", |s| s.restoring == 2).await;
    let restoring = engine.members(|f| f.name.clone());
    assert_eq!(restoring.len(), 2);
    assert!(restoring
        .iter()
        .all(|m| m.state == super::MemberState::Restoring && m.detail.is_none()));
    assert_eq!(engine.drain(&restoring[0].name), super::Drained::Restoring);
    until(&engine, "warm", |s| s.instances == 2 && s.restoring == 0).await;
    let (lease, _) = engine.claim().await.unwrap();
    tokio::time::advance(Duration::from_secs(5)).await;
    let listed = engine.members(|f| f.name.clone());
    let leased = listed
        .iter()
        .find(|m| &*m.name == lease.instance())
        .unwrap();
    assert_eq!(leased.state, super::MemberState::Leased);
    assert_eq!(leased.in_flight, 1);
    assert_eq!(leased.idle_for, None);
    assert_eq!(leased.detail.as_deref(), Some(lease.instance()));
    assert!(leased.age >= Duration::from_secs(5));
    let warm = listed
        .iter()
        .find(|m| &*m.name != lease.instance())
        .unwrap();
    assert_eq!(warm.state, super::MemberState::Warm);
    assert!(warm.idle_for.unwrap() >= Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn a_drained_instance_that_dies_counts_as_failed_once_and_ends_its_leases() {
    let s = Script::new(Duration::from_millis(10), &[]);
    let (engine, events) = engine(sizing(1, 2, 1), &s);
    until(&engine, "warm", |s| s.instances == 1).await;
    let (mut lease, _) = engine.claim().await.unwrap();
    let name = lease.instance().to_owned();
    assert_eq!(engine.drain(&name), super::Drained::Draining);
    s.kill(&name, false);
    tokio::time::timeout(Duration::from_millis(1), lease.gone().cancelled())
        .await
        .expect("its lease ends with it");
    // The lease then breaks on it: still one failure.
    lease.mark_broken();
    drop(lease);
    until(&engine, "gone and replaced", |s| {
        s.instances == 1 && s.draining == 0 && s.stopping == 0
    })
    .await;
    assert_eq!(events.died.load(Ordering::SeqCst), 1);
    // Drained, then dead: it stopped as a failure.
    assert_eq!(*events.stopped.lock().unwrap(), [StopReason::Failed]);
}

#[tokio::test(start_paused = true)]
async fn failed_starts_are_reported_with_their_reason() {
    let s = Script::new(
        Duration::from_millis(10),
        &[Step::AppFault, Step::Fail, Step::Panic, Step::Hang],
    );
    let mut c = sizing(1, 1, 1);
    c.start_timeout = Duration::from_secs(5);
    let (engine, events) = engine(c, &s);
    // Each failure backs off, then the next start runs: four in a row.
    let mut watch = engine.watch();
    let four = async {
        while events.failed.load(Ordering::SeqCst) < 4 {
            watch.changed().await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(120), four)
        .await
        .expect("four failed starts");
    assert_eq!(
        *events.reasons.lock().unwrap(),
        ["app", "host", "panic", "timeout"]
    );
}

#[tokio::test(start_paused = true)]
async fn claims_held_for_a_start_get_fresh_leases_and_one_held_for_room_does_not() {
    let s = Script::new(Duration::from_millis(10), &[]);
    let (engine, _) = engine(sizing(0, 1, 3), &s);
    // Three claims at zero: one start serves them all (max_concurrency 3).
    let claims: Vec<_> = (0..3)
        .map(|_| {
            let engine = engine.clone();
            tokio::spawn(async move { engine.claim().await.unwrap() })
        })
        .collect();
    let mut leases = Vec::new();
    for c in claims {
        let (lease, held) = c.await.unwrap();
        assert!(held && lease.fresh() && lease.held().is_some());
        leases.push(lease);
    }
    assert_eq!(s.starts(), 1);
    // A fourth waits for room on the busy instance: held, not fresh.
    let fourth = tokio::spawn({
        let engine = engine.clone();
        async move { engine.claim().await.unwrap() }
    });
    until(&engine, "the fourth held", |s| s.queued == 1).await;
    drop(leases.pop());
    let (lease, held) = fourth.await.unwrap();
    assert!(held && !lease.fresh());
    // And a warm hit is neither.
    drop(lease);
    let (warm, held) = engine.claim().await.unwrap();
    assert!(!held && !warm.fresh() && warm.held().is_none());
}
