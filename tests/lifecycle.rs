//! A gateway's life next to other processes and among dying VMMs, end to
//! end on real QEMU VMs and real taps: a second gateway on the same
//! `state_dir`, `snapgate snapshot build` next to a serving gateway, a VMM
//! killed between two checks, held requests whose clients give up.
#![cfg(feature = "vm-tests")]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use common::*;
use snapgate::config::Config;
use snapgate::net::Network;
use snapgate::testing::{gateway_config, shared_snapshot_dir};
use snapgate::vmm::process::{liveness, Liveness};

type Gw = AppGw;

impl AppGw {
    async fn start(cfg: &Config) -> Gw {
        Gw::in_dir(cfg).await
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.running().listen)
    }

    /// The status of `GET path`.
    async fn status(&self, path: &str) -> u16 {
        self.get(path).send().await.unwrap().status().as_u16()
    }
}

/// How a run of the `snapgate` binary ended.
struct Run {
    /// `None`: still running at the deadline, so it was killed.
    status: Option<ExitStatus>,
    took: Duration,
    stdout: String,
    stderr: String,
}

/// Runs the `snapgate` binary with `args`, its output into files under
/// `dir`; kills it if it still runs after `within` (or if the test fails
/// meanwhile: `kill_on_drop`).
async fn snapgate_bin(args: &[&std::ffi::OsStr], dir: &Path, within: Duration) -> Run {
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (out, err) = (
        dir.join(format!("run{n}.out")),
        dir.join(format!("run{n}.err")),
    );
    let started = Instant::now();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_snapgate"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let status = match tokio::time::timeout(within, child.wait()).await {
        Ok(status) => Some(status.unwrap()),
        Err(_) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            None
        }
    };
    Run {
        status,
        took: started.elapsed(),
        stdout: std::fs::read_to_string(&out).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err).unwrap_or_default(),
    }
}

/// The file names in `<state_dir>/vms/` (the pid files of live VMs).
fn pid_files(state: &Path) -> BTreeSet<String> {
    std::fs::read_dir(state.join("vms"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

async fn tap_names(net: &Network) -> BTreeSet<String> {
    net.list_taps()
        .await
        .unwrap()
        .into_iter()
        .map(|(_, t)| t)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_gateway_on_one_state_dir_refuses_and_touches_nothing() {
    let state = tempfile::tempdir().unwrap();
    let cfg = gateway_config(
        state.path(),
        "sglk",
        "{ min_warm: 1, max_instances: 2 }",
        &shared_snapshot_dir(),
    );
    let a = Gw::start(&cfg).await;
    a.until("app", "A's warm instance", Duration::from_secs(60), |s| {
        s.instances == 1 && s.restoring == 0
    })
    .await;
    let pids = a.running().pids();
    assert_eq!(pids.len(), 1, "{pids:?}");
    assert_eq!(a.status("/").await, 200);
    let files = pid_files(state.path());
    let taps = tap_names(&a.net).await;
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(taps.len(), 1, "{taps:?}");

    // The same config (listen and admin on 127.0.0.1:0: other ports), run
    // by the real binary.
    let file = state.path().join("second.yaml");
    std::fs::copy(state.path().join("proxy.yaml"), &file).unwrap();
    let run = snapgate_bin(
        &["run".as_ref(), "--config".as_ref(), file.as_os_str()],
        state.path(),
        Duration::from_secs(20),
    )
    .await;
    let a_alive: Vec<(u32, bool)> = pids.iter().map(|&p| (p, alive(p))).collect();
    let report = format!(
        "second gateway: {:?} after {:?}; A's VMMs (pid, alive): {a_alive:?}\n\
         stdout:\n{}\nstderr:\n{}",
        run.status, run.took, run.stdout, run.stderr
    );
    let status = run
        .status
        .unwrap_or_else(|| panic!("the second gateway still ran after 20 s: {report}"));
    assert!(!status.success(), "{report}");
    assert!(run.took < Duration::from_secs(10), "{report}");
    let lock = state.path().join("gateway.lock");
    assert!(
        run.stderr.contains(&lock.display().to_string()),
        "the lock file is not named: {report}"
    );
    let me = std::process::id();
    assert!(
        run.stderr.contains(&format!("pid {me}")),
        "A's pid {me} is not named: {report}"
    );
    assert!(
        !run.stdout.contains("serving on"),
        "the second gateway served: {report}"
    );

    // A: same VMs, all alive, its pid files and taps in place, serving.
    assert_eq!(a.running().pids(), pids, "{report}");
    for &pid in &pids {
        assert!(alive(pid), "A's VMM {pid} died: {report}");
    }
    assert_eq!(pid_files(state.path()), files);
    assert_eq!(tap_names(&a.net).await, taps);
    assert_eq!(a.status("/").await, 200);
    assert_eq!(a.running().pids(), pids);
    a.stop().await;
}

/// The snapshot directory (its name under `app_dir`) that VMM `pid` was
/// restored from, read from its command line or, for a jailed clone, from
/// the name of the sealed memory it maps (through `current` if that is
/// what it names: no build runs between a restore and this check).
fn restored_from(pid: u32, app_dir: &Path) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_else(|e| panic!("cmdline of VMM {pid}: {e}"));
    let mut cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        if let Ok(target) = std::fs::read_link(fd.path()) {
            cmdline.push(' ');
            cmdline.push_str(&target.to_string_lossy());
        }
    }
    let prefix = format!("{}/", app_dir.display());
    let at = cmdline
        .find(&prefix)
        .unwrap_or_else(|| panic!("VMM {pid} names no snapshot under {prefix}: {cmdline}"));
    let dir = cmdline[at + prefix.len()..]
        .split(['/', ' ', ','])
        .next()
        .unwrap();
    match dir {
        "current" => current(app_dir),
        dir => dir.to_owned(),
    }
}

/// The snapshot directory `<app_dir>/current` points at.
fn current(app_dir: &Path) -> String {
    let target = std::fs::read_link(app_dir.join("current")).unwrap();
    target.file_name().unwrap().to_string_lossy().into_owned()
}

/// The snapshot directories of the app.
fn snapshots(app_dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(app_dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Sends a slow request and, while its instance serves it, names the
/// snapshot that instance was restored from; checks the answer is 200.
async fn serve_one(gw: &Gw, app_dir: &Path) -> String {
    let slow = tokio::spawn(gw.get("/sleep/1500").send());
    gw.until(
        "app",
        "the request to be served",
        Duration::from_secs(60),
        |s| s.leased == 1,
    )
    .await;
    let pids = gw.pool().pids();
    let [pid] = pids[..] else {
        panic!("one instance: {pids:?}")
    };
    let from = restored_from(pid, app_dir);
    let resp = slow.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    from
}

async fn scaled_to_zero(gw: &Gw) {
    gw.until(
        "app",
        "the pool to scale to zero",
        Duration::from_secs(30),
        |s| s.instances == 0 && s.restoring == 0 && s.stopping == 0,
    )
    .await;
}

/// `snapgate snapshot build --config file`, which must succeed.
async fn build(file: &Path, dir: &Path) {
    let run = snapgate_bin(
        &[
            "snapshot".as_ref(),
            "build".as_ref(),
            "--config".as_ref(),
            file.as_os_str(),
        ],
        dir,
        Duration::from_secs(300),
    )
    .await;
    assert!(
        run.status.is_some_and(|s| s.success()),
        "snapshot build: {:?} after {:?}\nstdout:\n{}\nstderr:\n{}",
        run.status,
        run.took,
        run.stdout,
        run.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_builds_next_to_a_serving_gateway_change_nothing_until_restart() {
    let state = tempfile::tempdir().unwrap();
    // Snapshots of this test's own: builds happen here.
    let snapshot_dir: PathBuf = state.path().join("snapshots");
    let cfg = gateway_config(
        state.path(),
        "sgsb",
        "{ min_warm: 0, max_instances: 1, idle_timeout: 1s }",
        &snapshot_dir,
    );
    let file = state.path().join("proxy.yaml");
    let app_dir = snapshot_dir.join("app");
    build(&file, state.path()).await;
    let d0 = current(&app_dir);
    let gw = Gw::start(&cfg).await;
    assert_eq!(serve_one(&gw, &app_dir).await, d0);
    scaled_to_zero(&gw).await;

    build(&file, state.path()).await;
    let d1 = current(&app_dir);
    assert_ne!(d1, d0);
    assert_eq!(
        serve_one(&gw, &app_dir).await,
        d0,
        "a clone after the build of {d1}"
    );
    scaled_to_zero(&gw).await;

    build(&file, state.path()).await;
    let d2 = current(&app_dir);
    assert!(d2 != d1 && d2 != d0, "{d0} {d1} {d2}");
    // Prune keeps the 2 newest and the one the gateway serves.
    assert_eq!(
        snapshots(&app_dir),
        BTreeSet::from([d0.clone(), d1.clone(), d2.clone()])
    );
    assert_eq!(
        serve_one(&gw, &app_dir).await,
        d0,
        "a clone after the builds of {d1} and {d2}"
    );
    gw.stop().await;

    // A new gateway starts from the newest.
    let gw = Gw::start(&cfg).await;
    assert_eq!(serve_one(&gw, &app_dir).await, d2);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmm_killed_between_checks_is_never_leased() {
    let state = tempfile::tempdir().unwrap();
    let cfg = gateway_config(
        state.path(),
        "sgkv",
        "{ min_warm: 2, max_instances: 3, max_concurrency: 4 }",
        &shared_snapshot_dir(),
    );
    let gw = Gw::start(&cfg).await;
    gw.until("app", "2 warm instances", Duration::from_secs(120), |s| {
        s.instances == 2 && s.restoring == 0
    })
    .await;
    let pids = gw.pool().pids();
    // The last member is the one a lease takes first among idle ones.
    let victim = *pids.last().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // As soon as its main thread is a zombie: its other threads may still
    // be winding down, so it cannot be waited on and has sent no exit
    // event yet; the check at lease time must see it all the same.
    let deadline = Instant::now() + Duration::from_secs(10);
    while liveness(victim) == Liveness::Running {
        assert!(Instant::now() < deadline, "VMM {victim} survived SIGKILL");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // At once: no time for any periodic check in between.
    let mut statuses = Vec::new();
    for i in 0..10 {
        let resp = gw.get(&format!("/?n={i}")).send().await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap();
        statuses.push((status, body.lines().next().unwrap_or_default().to_owned()));
    }
    assert!(
        statuses.iter().all(|(s, _)| *s == 200),
        "after VMM {victim} of {pids:?} was killed: {statuses:?}"
    );
    wait_for(
        "2 live instances again, with a new one",
        Duration::from_secs(120),
        async || {
            let s = gw.pool().stats();
            let now = gw.pool().pids();
            s.instances == 2
                && s.restoring == 0
                && s.draining == 0
                && !now.contains(&victim)
                && now.iter().any(|p| !pids.contains(p))
                && now.iter().all(|&p| alive(p))
        },
    )
    .await;
    assert_eq!(gw.status("/").await, 200);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_requests_whose_clients_give_up_leave_the_queue_at_once() {
    let state = tempfile::tempdir().unwrap();
    // A restore under TCG can be quicker than the clients' patience: this
    // app's readiness probe takes 450 ms, so each restore takes longer than
    // that. Its own snapshots: the probe is part of what a snapshot records.
    let mut spec = snapgate::testing::linux_spec();
    spec.on_restore = Some(snapgate::testing::test_guest_on_restore());
    spec.ready_path = "/sleep/450".into();
    let cfg = snapgate::testing::gateway_config_of(
        &spec,
        state.path(),
        "sghq",
        "{ min_warm: 0, max_instances: 1 }",
        &state.path().join("snapshots"),
    );
    let gw = Gw::start(&cfg).await;
    assert_eq!(gw.pool().stats().instances, 0, "at zero");
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let requests = (0..3).map(|i| {
        impatient
            .get(gw.url(&format!("/?n={i}")))
            .header("host", "app.test")
            .send()
    });
    let sent = Instant::now();
    let answers = futures::future::join_all(requests).await;
    let gave_up = Instant::now();
    for answer in &answers {
        match answer {
            Err(e) => assert!(e.is_timeout(), "{e}"),
            Ok(resp) => panic!("answered while cold: {}", resp.status()),
        }
    }
    // The queue is empty soon after, before the restore is done.
    let queue = "snapgate_hold_queue_depth{app=\"app\"}";
    let mut seen = Vec::new();
    let stats = loop {
        let stats = gw.pool().stats();
        let depth = gw.metric(queue).await;
        // (queued, depth, how many polls in a row saw them)
        match seen.last_mut() {
            Some((q, d, n)) if (*q, *d) == (stats.queued, depth) => *n += 1,
            _ => seen.push((stats.queued, depth, 1)),
        }
        if stats.queued == 0 && depth == 0.0 {
            break stats;
        }
        assert!(
            gave_up.elapsed() < Duration::from_secs(1),
            "(queued, {queue}, polls) over 1 s after the clients gave up: {seen:?}; now {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let emptied = sent.elapsed();
    assert_eq!(
        stats.instances, 0,
        "the queue emptied only once an instance joined: {stats:?}, \
         {emptied:?} after the requests; (queued, depth, polls) seen: {seen:?}"
    );
    // Each counts as an abandoned claim.
    let abandoned = "snapgate_claims_total{app=\"app\",outcome=\"abandoned\"}";
    assert_eq!(gw.metric(abandoned).await, 3.0);
    // The restore the queue started ends (joins, or is cancelled).
    gw.until("app", "the restore to end", Duration::from_secs(60), |s| {
        s.restoring == 0
    })
    .await;
    eprintln!(
        "queue empty {emptied:?} after the requests; the restore ended after {:?}",
        sent.elapsed()
    );
    // Served normally after.
    let resp = gw.get("/").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    gw.stop().await;
}
