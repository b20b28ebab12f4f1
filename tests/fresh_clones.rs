//! Every clone its own, end to end with VM apps: the test guest (Linux,
//! real QEMU clones on real taps) behind the real gateway. What each
//! instance drew from its kernel's generator and read from its clock at
//! its first request is compared across ten instances; guests that halt
//! while their VMM runs on are caught within seconds.
#![cfg(feature = "vm-tests")]

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use snapgate::gateway;
use snapgate::net::Network;
use snapgate::testing::{
    gateway_config, gateway_config_of, linux_spec, shared_snapshot_dir, test_guest_on_restore,
    vmgenid_spec,
};
use snapgate::vmm::ImageSpec;

/// Ten instances, each kept busy by one request.
const TEN: usize = 10;
const TEN_POOL: &str =
    "{ min_warm: 10, max_instances: 10, max_concurrency: 1, hold_timeout: 60s, idle_timeout: 10m }";

type Gw = AppGw;

impl AppGw {
    /// A gateway serving `app` on `app.test` from `spec`, snapshots in
    /// `snapshots` (the shared cache, or a directory of the test's own for
    /// a spec no other test uses).
    async fn start(prefix: &str, spec: Option<&ImageSpec>, pool: &str, snapshots: &Path) -> Gw {
        let state = tempfile::tempdir().unwrap();
        let cfg = match spec {
            Some(spec) => gateway_config_of(spec, state.path(), prefix, pool, snapshots),
            None => gateway_config(state.path(), prefix, pool, snapshots),
        };
        Gw::with_state(state, &cfg).await
    }
}

/// What the test guest reported at an instance's first request.
#[derive(Debug)]
struct Report {
    instance: String,
    random: String,
    now_ms: u64,
    /// Whether the kernel had logged a reseed for a new VM generation ID.
    vmfork: bool,
    requests: u64,
    /// `resumed:` fields: calls, requests_before, before (what getrandom
    /// gave right before the message was applied), now_ms, set_at (the
    /// guest's clock right after), entropy.
    resumed_calls: u64,
    resumed_requests_before: Option<u64>,
    resumed_before: Option<String>,
    resumed_now_ms: Option<u64>,
    resumed_set_at: Option<u64>,
    resumed_entropy: Option<String>,
    /// The host's clock when the request was sent.
    sent_ms: u64,
}

fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
}

fn parse(body: &str, sent_ms: u64) -> Report {
    let line = |prefix: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix} line in {body}"))
    };
    let first = line("first: ");
    let resumed = line("resumed: ");
    let num = |v: Option<&str>| v.map(|v| v.parse::<u64>().unwrap());
    Report {
        instance: line("instance: ").to_owned(),
        random: field(first, "random").unwrap().to_owned(),
        now_ms: num(field(first, "now_ms")).unwrap(),
        vmfork: field(first, "vmfork").unwrap() == "true",
        requests: line("requests: ").parse().unwrap(),
        resumed_calls: num(field(resumed, "calls")).unwrap(),
        resumed_requests_before: num(field(resumed, "requests_before")),
        resumed_before: field(resumed, "before").map(str::to_owned),
        resumed_now_ms: num(field(resumed, "now_ms")),
        resumed_set_at: num(field(resumed, "set_at")),
        resumed_entropy: field(resumed, "entropy").map(str::to_owned),
        sent_ms,
    }
}

fn host_ms() -> u64 {
    snapgate::vmm::resumed::now_ms()
}

/// Waits for ten warm instances, then sends ten requests at once, each
/// held 2 s by the guest so that each lands on an instance of its own
/// (max_concurrency 1), and returns what each instance reported.
async fn ten_first_requests(gw: &Gw) -> Vec<Report> {
    wait_for("ten warm instances", Duration::from_secs(120), async || {
        let s = gw.pool().stats();
        s.instances == TEN && s.restoring == 0
    })
    .await;
    let asks = (0..TEN).map(|_| async {
        let sent_ms = host_ms();
        let (status, body) = gw.text("/sleep/2000").await;
        assert_eq!(status, 200, "{body}");
        parse(&body, sent_ms)
    });
    let reports = futures::future::join_all(asks).await;
    let instances: HashSet<&str> = reports.iter().map(|r| r.instance.as_str()).collect();
    assert_eq!(
        instances.len(),
        TEN,
        "one request per instance: {reports:#?}"
    );
    for r in &reports {
        assert_eq!(r.requests, 1, "each instance's first request: {r:?}");
    }
    reports
}

fn distinct<T: std::hash::Hash + Eq>(values: impl Iterator<Item = T>) -> usize {
    values.collect::<HashSet<_>>().len()
}

/// Console lines of the VM `id` under `state`, and when `needle` first
/// appeared there: polled every 10 ms from now on, for at most `within`.
async fn console_line_appears(
    state: &Path,
    id: &str,
    needle: &str,
    within: Duration,
) -> Option<Instant> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        // The VM's id is `<prefix><n>`: look in every run dir it may be.
        let runs = std::fs::read_dir(state.join("run"))
            .into_iter()
            .flatten()
            .flatten();
        for run in runs.filter(|r| r.file_name().to_string_lossy().starts_with(id)) {
            let text = std::fs::read_to_string(run.path().join("console.log")).unwrap_or_default();
            if text.contains(needle) {
                return Some(Instant::now());
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_instances_of_a_vm_app_with_on_restore_are_each_their_own() {
    let gw = Gw::start("sgfo", None, TEN_POOL, &shared_snapshot_dir()).await;
    let reports = ten_first_requests(&gw).await;
    for r in &reports {
        // on_restore was called exactly once, before the first request,
        // with the host's time, which the guest's clock took ...
        assert_eq!(r.resumed_calls, 1, "{r:?}");
        assert_eq!(r.resumed_requests_before, Some(0), "{r:?}");
        let (told, set_at) = (r.resumed_now_ms.unwrap(), r.resumed_set_at.unwrap());
        assert!(
            told.abs_diff(set_at) < 1000,
            "told {told}, clock then {set_at}: {r:?}"
        );
        // ... and kept: at its first request the guest's clock is the host's.
        assert!(
            r.now_ms.abs_diff(r.sent_ms) < 1000,
            "guest clock {} vs host {}: {r:?}",
            r.now_ms,
            r.sent_ms
        );
        assert!(!r.vmfork, "microvm has no VM generation ID: {r:?}");
    }
    // 32 bytes of its own for each clone ...
    assert_eq!(
        distinct(reports.iter().map(|r| r.resumed_entropy.clone().unwrap())),
        TEN
    );
    assert!(reports
        .iter()
        .all(|r| r.resumed_entropy.as_ref().unwrap().len() == 64));
    // ... and each clone's kernel generator gives its own bytes. (What it
    // gave right before the message is reported, not asserted: a clone's
    // kernel also mixes in what virtio-rng and interrupt timings bring
    // after the resume, and may reseed from them on its own, sooner or
    // later; the message makes the reseed certain and immediate.)
    assert_eq!(
        distinct(reports.iter().map(|r| &r.random)),
        TEN,
        "{reports:#?}"
    );
    eprintln!(
        "right before their on_restore call, 10 clones' kernels gave {} distinct values",
        distinct(reports.iter().map(|r| r.resumed_before.clone().unwrap()))
    );

    // The hook is snapgate's: a client cannot reach it, however spelled.
    let http = reqwest::Client::new();
    for path in [
        "/snapgate/resumed",
        "/Snapgate//%72esumed/",
        "/x/../snapgate/resumed?a=1",
    ] {
        let resp = http
            .post(format!("http://{}{path}", gw.running().listen))
            .header("host", "app.test")
            .body(r#"{"now_ms": 0, "entropy": ""}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404, "{path}");
    }
    let (status, body) = gw.text("/").await;
    assert_eq!(status, 200);
    assert!(body.contains("resumed: calls=1 "), "{body}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_on_restore_a_microvm_clone_keeps_the_snapshots_generator_and_clock() {
    // What the README documents for a VM app with neither on_restore nor a
    // VM generation ID (QEMU microvm): nothing in the clone is renewed. Its
    // clock resumes at the snapshot's moment, and its kernel's generator
    // where the template's stood: clones draw the same bytes until the
    // kernel reseeds on its own schedule (which depends on the guest's
    // uptime, interrupt timings and virtio-rng, so the test reports how
    // many values the clones drew rather than asserting it).
    let snapshots = tempfile::tempdir().unwrap();
    let spec = linux_spec();
    // The first gateway takes the snapshot; the clones come from a second
    // one, started 3 s later.
    Gw::start("sgfn", Some(&spec), "{}", snapshots.path())
        .await
        .stop()
        .await;
    let snapshot_ms = {
        let current = snapshots.path().join("app/current");
        let name = std::fs::read_link(&current).unwrap();
        name.to_str().unwrap().parse::<u64>().unwrap()
    };
    let age = Duration::from_secs(3);
    tokio::time::sleep(age.saturating_sub(Duration::from_millis(host_ms() - snapshot_ms))).await;
    let pool = "{ min_warm: 3, max_instances: 3, max_concurrency: 1, hold_timeout: 60s }";
    let gw = Gw::start("sgfn", Some(&spec), pool, snapshots.path()).await;
    wait_for(
        "three warm instances",
        Duration::from_secs(60),
        async || gw.pool().stats().instances == 3,
    )
    .await;
    let asks = (0..3).map(|_| async {
        let sent_ms = host_ms();
        let (status, body) = gw.text("/sleep/1500").await;
        assert_eq!(status, 200, "{body}");
        parse(&body, sent_ms)
    });
    let reports = futures::future::join_all(asks).await;
    assert_eq!(distinct(reports.iter().map(|r| &r.instance)), 3);
    for r in &reports {
        assert_eq!(r.resumed_calls, 0, "no on_restore: {r:?}");
        assert!(!r.vmfork, "microvm has no VM generation ID: {r:?}");
        assert!(
            r.now_ms + 2000 < r.sent_ms,
            "the clock stayed at the snapshot's moment: guest {} host {}: {r:?}",
            r.now_ms,
            r.sent_ms
        );
    }
    eprintln!(
        "without on_restore on microvm, 3 clones drew {} distinct first values from getrandom(2): {:?}",
        distinct(reports.iter().map(|r| &r.random)),
        reports.iter().map(|r| &r.random).collect::<Vec<_>>()
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_generation_id_reseeds_each_clones_kernel_on_the_pc_machine() {
    // The generic Debian kernel has the VMGenID driver; on QEMU's pc
    // machine each clone's vmgenid device shows a new ID at restore, and
    // the kernel reseeds from it. No on_restore: the clock is not set.
    let snapshots = tempfile::tempdir().unwrap();
    let spec = vmgenid_spec();
    let gw = Gw::start("sgfv", Some(&spec), TEN_POOL, snapshots.path()).await;
    let reports = ten_first_requests(&gw).await;
    assert!(reports.iter().all(|r| r.resumed_calls == 0));
    // Each clone's kernel logged the reseed its new generation ID caused.
    assert!(reports.iter().all(|r| r.vmfork), "{reports:#?}");
    assert_eq!(
        distinct(reports.iter().map(|r| &r.random)),
        TEN,
        "{reports:#?}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_that_fails_on_restore_is_not_used_and_the_error_says_why() {
    let pool = "{ min_warm: 0, max_instances: 1, hold_timeout: 30s }";
    for (hook, said) in [
        // The test guest answers /status/503 with a 503.
        (
            "path: /status/503",
            "was not made its own: POST /status/503 on 169.254.100.2:8080 answered HTTP 503",
        ),
        // A guest that never answers fails at the hook's timeout.
        (
            "path: /sleep/30000\ntimeout: 1s",
            "was not made its own: POST /sleep/30000 on 169.254.100.2:8080 no answer within 1.0s",
        ),
    ] {
        let snapshots = tempfile::tempdir().unwrap();
        let mut spec = linux_spec();
        spec.on_restore = Some(serde_yaml_ng::from_str(hook).unwrap());
        let gw = Gw::start("sgff", Some(&spec), pool, snapshots.path()).await;
        let (status, body) = gw.text("/").await;
        assert_eq!(status, 503, "{body}");
        let err = gw.pool().last_error().expect("the failure is kept");
        assert!(err.contains(said), "{err}");
        assert_eq!(gw.pool().stats().instances, 0, "the clone was not kept");
        gw.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_halts_at_boot_fails_within_two_seconds_quoting_its_error_line() {
    let snapshots = tempfile::tempdir().unwrap();
    let mut spec = linux_spec();
    spec.cmdline.push_str(" snapgate.halt=boot");
    spec.ready_timeout = Duration::from_secs(120);
    let state = tempfile::tempdir().unwrap();
    let cfg = gateway_config_of(&spec, state.path(), "sgfh", "{}", snapshots.path());
    let net = Network::new(cfg.network.clone()).unwrap();
    let needle = "fatal: snapgate.halt=boot asks this guest to stop at boot";
    let template = format!("app-template-{}-", std::process::id());
    let (started, said) = tokio::join!(
        async {
            let result = gateway::start(&cfg, &mut std::io::sink()).await;
            (result, Instant::now())
        },
        console_line_appears(state.path(), &template, needle, Duration::from_secs(120)),
    );
    let (result, failed_at) = started;
    let err = match result {
        Ok(_) => panic!("a template that halts must fail the start"),
        Err(e) => snapgate::display_chain(e.as_ref()),
    };
    let said = said.expect("the guest printed its fatal line");
    let after = failed_at.saturating_duration_since(said);
    assert!(
        after < Duration::from_secs(2),
        "failed {after:?} after the guest's fatal line: {err}"
    );
    assert!(err.contains("stopped while waiting for readiness"), "{err}");
    assert!(
        err.contains(&format!(
            "the guest's last error line: \"snapgate-guest: {needle}; halting\""
        )),
        "{err}"
    );
    eprintln!("halted template detected {after:?} after its fatal line");
    assert_all_gone(&net, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_that_halts_at_restore_fails_within_two_seconds_quoting_its_error_line() {
    let snapshots = tempfile::tempdir().unwrap();
    let mut spec = linux_spec();
    // Halts when its on_restore hook is called: only clones get that.
    spec.cmdline.push_str(" snapgate.halt=restore");
    spec.ready_timeout = Duration::from_secs(60);
    spec.on_restore = Some(test_guest_on_restore());
    let pool = "{ min_warm: 0, max_instances: 1, hold_timeout: 60s }";
    let gw = Gw::start("sgfr", Some(&spec), pool, snapshots.path()).await;
    let needle = "fatal: snapgate.halt=restore asks this guest to stop once restored";
    let clone = format!("app-{}-", std::process::id());
    let (answer, said) = tokio::join!(
        async {
            let answer = gw.text("/").await;
            (answer, Instant::now())
        },
        console_line_appears(gw.state_dir(), &clone, needle, Duration::from_secs(60)),
    );
    let ((status, body), answered_at) = answer;
    assert_eq!(status, 503, "{body}");
    let said = said.expect("the clone printed its fatal line");
    let after = answered_at.saturating_duration_since(said);
    assert!(
        after < Duration::from_secs(2),
        "answered {after:?} after the fatal line"
    );
    let err = gw.pool().last_error().expect("the failure is kept");
    assert!(
        err.contains(&format!("guest of {clone}"))
            && err.contains("stopped while taking its resumed message"),
        "{err}"
    );
    assert!(
        err.contains("every vCPU is halted with interrupts off"),
        "{err}"
    );
    assert!(err.contains(needle), "{err}");
    eprintln!("halted clone detected {after:?} after its fatal line");
    gw.stop().await;
}
