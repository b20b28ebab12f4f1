//! Pool logic against a scripted factory: its "VMs" are `sleep` processes,
//! started after a scripted delay or failing on cue. Timers run on paused
//! time.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::AtomicUsize;

use super::*;
use crate::vmm::process::make_run_dir;
use crate::vmm::{ImageSpec, VmProcess};

struct Scripted {
    state: tempfile::TempDir,
    delay: Duration,
    /// Outcome of each start in order (true = fail); afterwards, succeed.
    failures: Mutex<VecDeque<bool>>,
    /// Scripted failures are the app's own (a runtime app that crashed).
    app_fault: std::sync::atomic::AtomicBool,
    starts: AtomicUsize,
    stops: AtomicUsize,
}

impl Scripted {
    fn new(delay: Duration) -> Arc<Scripted> {
        Arc::new(Scripted {
            state: tempfile::tempdir().unwrap(),
            delay,
            failures: Mutex::new(VecDeque::new()),
            app_fault: Default::default(),
            starts: AtomicUsize::new(0),
            stops: AtomicUsize::new(0),
        })
    }
    fn starts(&self) -> usize {
        self.starts.load(Ordering::SeqCst)
    }
    fn stops(&self) -> usize {
        self.stops.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Factory for Scripted {
    async fn start(&self, id: VmId) -> Result<Vm, VmmError> {
        self.starts.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        if self.failures.lock().unwrap().pop_front() == Some(true) {
            if self.app_fault.load(Ordering::SeqCst) {
                return Err(VmmError::App {
                    app: "app".into(),
                    reason: format!("scripted crash in {id}"),
                    output: "Error: boom\n".into(),
                });
            }
            return Err(VmmError::Invalid(format!("scripted failure of {id}")));
        }
        let run = make_run_dir(self.state.path(), &id)?;
        let process = VmProcess::spawn(
            &id,
            std::path::Path::new("/bin/sleep"),
            &["3600".into()],
            vec![],
            None,
            &run,
            self.state.path(),
        )?;
        let spec: ImageSpec = serde_yaml_ng::from_str("kernel: /fake\ncmdline: x\n").unwrap();
        let endpoint = Endpoint {
            tap: "lo".into(),
            addr: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9),
        };
        Ok(Vm::new(id, endpoint, spec, String::new(), process))
    }

    async fn stop(&self, mut vm: Vm) -> Result<(), VmmError> {
        self.stops.fetch_add(1, Ordering::SeqCst);
        vm.process_mut().kill().await
    }
}

fn cfg(min_warm: usize, max_instances: usize, max_concurrency: usize) -> PoolConfig {
    PoolConfig {
        min_warm,
        max_instances,
        max_concurrency,
        idle_timeout: Duration::from_secs(30),
        hold_queue: 100,
        hold_timeout: Duration::from_secs(10),
    }
}

fn pool(cfg: PoolConfig, factory: &Arc<Scripted>) -> (Pool, PoolMetrics) {
    let metrics = PoolMetrics::new(&prometheus::Registry::new()).unwrap();
    let pool = Pool::new("app", cfg, factory.clone(), metrics.clone());
    (pool, metrics)
}

/// Lets spawned tasks run until they wait on timers.
async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn one_restore_per_instance_needed_not_per_request() {
    let f = Scripted::new(Duration::from_millis(200));
    let (pool, metrics) = pool(cfg(0, 4, 4), &f);
    let claims: Vec<_> = (0..6).map(|_| pool.claim()).collect();
    let leases = futures::future::join_all(claims).await;
    assert!(leases.iter().all(Result::is_ok));
    // ceil(6 / 4) = 2 instances needed; 2 restores, not 6.
    assert_eq!(f.starts(), 2);
    assert_eq!(metrics.claims("app", "held"), 6);
    let vms: std::collections::HashSet<_> = leases
        .iter()
        .map(|l| l.as_ref().unwrap().vm().clone())
        .collect();
    assert_eq!(vms.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn never_more_instances_than_max_and_every_request_served() {
    let f = Scripted::new(Duration::from_millis(100));
    let (pool, _) = pool(cfg(0, 2, 1), &f);
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let lease = pool.claim().await?;
                tokio::time::sleep(Duration::from_millis(50)).await;
                drop(lease);
                Ok::<(), ClaimError>(())
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(f.starts(), 2);
    assert_eq!(pool.stats().peak, 2);
}

#[tokio::test(start_paused = true)]
async fn full_queue_and_hold_timeout_answer_at_once_and_at_the_deadline() {
    let f = Scripted::new(Duration::from_millis(10));
    let mut c = cfg(0, 1, 1);
    c.hold_queue = 1;
    c.hold_timeout = Duration::from_secs(2);
    let (pool, metrics) = pool(c, &f);
    let busy = pool.claim().await.unwrap();
    let queued = tokio::spawn({
        let pool = pool.clone();
        async move {
            let started = Instant::now();
            (pool.claim().await, started.elapsed())
        }
    });
    settle().await;
    assert_eq!(pool.stats().queued, 1);
    let err = pool.claim().await.unwrap_err();
    assert!(matches!(err, ClaimError::QueueFull { .. }), "{err}");
    assert_eq!(err.retry_after(), 1);
    let (result, waited) = queued.await.unwrap();
    let err = result.unwrap_err();
    assert!(matches!(err, ClaimError::HoldTimeout { .. }), "{err}");
    assert_eq!(waited, Duration::from_secs(2));
    assert_eq!(metrics.claims("app", "queue_full"), 1);
    assert_eq!(metrics.claims("app", "hold_timeout"), 1);
    // The instance was busy, not broken: once free, it serves again.
    drop(busy);
    assert!(pool.claim().await.is_ok());
    assert_eq!(f.starts(), 1);
}

#[tokio::test(start_paused = true)]
async fn failed_restore_fails_its_waiters_then_retries_after_backoff() {
    let f = Scripted::new(Duration::from_millis(10));
    f.failures.lock().unwrap().push_back(true);
    let (pool, metrics) = pool(cfg(0, 2, 1), &f);
    let err = pool.claim().await.unwrap_err();
    match &err {
        ClaimError::Unavailable {
            reason,
            retry_after,
            app_failed,
            ..
        } => {
            assert!(reason.contains("scripted failure of app-1"), "{reason}");
            assert_eq!(*retry_after, BACKOFF_BASE);
            assert!(!app_failed);
        }
        other => panic!("{other}"),
    }
    assert_eq!(
        err.public_message(),
        "app app: cannot start an instance right now"
    );
    // During the backoff, new requests are told at once, not held.
    let err = pool.claim().await.unwrap_err();
    assert!(matches!(err, ClaimError::Unavailable { .. }), "{err}");
    assert_eq!(f.starts(), 1);
    tokio::time::sleep(BACKOFF_BASE).await;
    assert!(pool.claim().await.is_ok());
    assert_eq!(f.starts(), 2);
    assert_eq!(metrics.claims("app", "unavailable"), 2);
}

#[tokio::test(start_paused = true)]
async fn idle_instances_are_reaped_from_their_last_completion_down_to_min_warm() {
    let f = Scripted::new(Duration::from_millis(10));
    let mut c = cfg(1, 3, 1);
    c.idle_timeout = Duration::from_secs(10);
    let (pool, metrics) = pool(c, &f);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(pool.stats().instances, 1, "min_warm pre-warms");
    let a = pool.claim().await.unwrap();
    assert_eq!(metrics.claims("app", "warm"), 1);
    let b = pool.claim().await.unwrap();
    assert_eq!(pool.stats().instances, 2);
    // Busy for 20 s: longer than idle_timeout, but leased instances are never reaped.
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(pool.stats().instances, 2);
    drop(a);
    drop(b);
    // The idle clock starts at the last completion.
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert_eq!(pool.stats().instances, 2);
    tokio::time::sleep(Duration::from_secs(2)).await;
    settle().await;
    assert_eq!(pool.stats().instances, 1, "down to min_warm");
    assert_eq!(f.stops(), 1);
}

#[tokio::test(start_paused = true)]
async fn scale_to_zero_and_back() {
    let f = Scripted::new(Duration::from_millis(10));
    let mut c = cfg(0, 1, 1);
    c.idle_timeout = Duration::from_secs(5);
    let (pool, metrics) = pool(c, &f);
    drop(pool.claim().await.unwrap());
    tokio::time::sleep(Duration::from_secs(6)).await;
    settle().await;
    assert_eq!(pool.stats().instances, 0);
    assert_eq!(f.stops(), 1);
    drop(pool.claim().await.unwrap());
    assert_eq!(metrics.restores("app"), 2);
}

#[tokio::test(start_paused = true)]
async fn dead_vmm_is_replaced_and_broken_instance_is_drained() {
    let f = Scripted::new(Duration::from_millis(10));
    let (pool, _) = pool(cfg(1, 2, 2), &f);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let pid = pool.pids()[0];
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // The kill lands in real time while this test's clock is paused: wait
    // (really) until the process is a zombie before letting virtual time run.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.is_empty() || stat[stat.rfind(')').unwrap_or(0)..].starts_with(") Z") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "SIGKILL did not take");
        std::thread::sleep(Duration::from_millis(1));
    }
    // The maintenance tick notices, removes it and restores a replacement.
    let mut replaced = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let pids = pool.pids();
        if pids.len() == 1 && pids[0] != pid {
            replaced = true;
            break;
        }
    }
    assert!(replaced, "pids now {:?}", pool.pids());
    // A lease marked broken retires its instance when it ends.
    let mut lease = pool.claim().await.unwrap();
    let other = pool.claim().await.unwrap();
    assert_eq!(lease.vm(), other.vm());
    lease.mark_broken();
    drop(lease);
    assert!(
        pool.claim().await.is_ok(),
        "a draining instance takes no leases; a new one does"
    );
    drop(other);
    settle().await;
    assert!(f.stops() >= 2);
}

#[tokio::test(start_paused = true)]
async fn close_fails_queued_requests_and_stops_everything() {
    let f = Scripted::new(Duration::from_millis(10));
    let (pool, _) = pool(cfg(1, 1, 1), &f);
    let lease = pool.claim().await.unwrap();
    let queued = tokio::spawn({
        let pool = pool.clone();
        async move { pool.claim().await }
    });
    settle().await;
    let closing = tokio::spawn({
        let pool = pool.clone();
        async move { pool.close(Duration::from_secs(5)).await }
    });
    let err = queued.await.unwrap().unwrap_err();
    assert!(matches!(err, ClaimError::ShuttingDown { .. }), "{err}");
    assert!(matches!(
        pool.claim().await,
        Err(ClaimError::ShuttingDown { .. })
    ));
    // The in-flight request finishes; then its instance goes too.
    drop(lease);
    closing.await.unwrap();
    assert_eq!(pool.stats().instances, 0);
    assert_eq!(f.stops(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_app_that_fails_to_start_is_named_as_the_cause() {
    let f = Scripted::new(Duration::from_millis(10));
    f.app_fault.store(true, Ordering::SeqCst);
    f.failures.lock().unwrap().push_back(true);
    let (pool, _metrics) = pool(cfg(0, 2, 1), &f);
    let err = pool.claim().await.unwrap_err();
    assert!(
        matches!(
            err,
            ClaimError::Unavailable {
                app_failed: true,
                ..
            }
        ),
        "{err}"
    );
    // The client hears whose fault it is, not the app's output.
    assert_eq!(
        err.public_message(),
        "app app: the app failed to start; the operator has the details"
    );
    // The operator gets the app's output.
    let kept = pool.last_error().unwrap();
    assert!(kept.contains("scripted crash in app-1"), "{kept}");
    assert!(kept.contains("app output:\nError: boom"), "{kept}");
    // New requests during the backoff are told the same, at once.
    let again = pool.claim().await.unwrap_err();
    assert!(
        matches!(
            again,
            ClaimError::Unavailable {
                app_failed: true,
                ..
            }
        ),
        "{again}"
    );
    assert_eq!(f.starts(), 1);
}
