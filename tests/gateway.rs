//! The gateway end to end: a real client, the real gateway, real QEMU VMs on
//! real taps. Snapshots are cached in `target/test-snapshots` (rebuilt when
//! the test guest changes), so only the first run boots a template.
#![cfg(feature = "vm-tests")]

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use snapgate::config::Config;

use snapgate::net::Network;
use snapgate::testing::{gateway_config, shared_snapshot_dir};

/// The gateway config of [`snapgate::testing::gateway_config`], with the
/// shared snapshot cache.
fn config(state: &Path, prefix: &str, pool: &str) -> Config {
    gateway_config(state, prefix, pool, &shared_snapshot_dir())
}

type Gw = AppGw;

impl AppGw {
    async fn start(prefix: &str, pool: &str) -> Gw {
        let state = tempfile::tempdir().unwrap();
        let cfg = config(state.path(), prefix, pool);
        Gw::with_state(state, &cfg).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_at_zero_is_held_and_served_by_a_fresh_restore() {
    let gw = Gw::start("sggz", "{ min_warm: 0, max_instances: 2 }").await;
    assert_eq!(gw.pool().stats().instances, 0, "at zero");
    let resp = gw
        .get("/hello?x=1")
        .header("x-forwarded-for", "10.9.8.7")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.unwrap();
    assert!(body.contains("request: GET /hello?x=1 HTTP/1.1"), "{body}");
    assert!(body.contains("header: host: app.test"), "{body}");
    // The client's own X-Forwarded-For is not believed (no trusted_proxies).
    assert!(
        body.contains("header: x-forwarded-for: 127.0.0.1\n"),
        "{body}"
    );
    assert!(!body.contains("10.9.8.7"), "{body}");
    assert!(body.contains("header: x-forwarded-proto: http"), "{body}");
    assert!(
        body.contains("header: x-forwarded-host: app.test"),
        "{body}"
    );
    assert_eq!(
        gw.metric("snapgate_claims_total{app=\"app\",outcome=\"held\"}")
            .await,
        1.0
    );
    assert_eq!(gw.metric("snapgate_restores_total{app=\"app\"}").await, 1.0);
    assert_eq!(
        gw.metric("snapgate_hold_duration_seconds_count{app=\"app\"}")
            .await,
        1.0
    );

    // Bodies stream both ways: 1 MiB up, echoed back.
    let upload: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    let resp = gw
        .http()
        .post(format!("http://{}/upload", gw.running().listen))
        .header("host", "app.test")
        .body(upload.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let bytes = resp.bytes().await.unwrap();
    let marker = b"body: 1048576 bytes\n";
    let at = bytes
        .windows(marker.len())
        .position(|w| w == marker)
        .expect("body line");
    assert_eq!(&bytes[at + marker.len()..], &upload[..]);

    // Kept-alive connections to the VM are reused: same peer port.
    let peer = |b: &str| {
        b.lines()
            .find(|l| l.starts_with("peer: "))
            .unwrap()
            .to_owned()
    };
    let a = peer(&gw.get("/a").send().await.unwrap().text().await.unwrap());
    let b = peer(&gw.get("/b").send().await.unwrap().text().await.unwrap());
    assert_eq!(a, b);

    // Unknown host: 404 with a short body.
    let resp = gw
        .http()
        .get(format!("http://{}/", gw.running().listen))
        .header("host", "nope.test")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert!(resp
        .text()
        .await
        .unwrap()
        .contains("no app serves host \"nope.test\""));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prewarmed_instance_serves_the_first_request_without_a_restore() {
    let gw = Gw::start("sggw", "{ min_warm: 1, max_instances: 2 }").await;
    wait_for("the warm instance", Duration::from_secs(60), async || {
        gw.pool().stats().instances == 1
    })
    .await;
    assert_eq!(gw.metric("snapgate_restores_total{app=\"app\"}").await, 1.0);
    let resp = gw.get("/").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        gw.metric("snapgate_claims_total{app=\"app\",outcome=\"warm\"}")
            .await,
        1.0
    );
    assert_eq!(
        gw.metric("snapgate_claims_total{app=\"app\",outcome=\"held\"}")
            .await,
        0.0
    );
    assert_eq!(
        gw.metric("snapgate_restores_total{app=\"app\"}").await,
        1.0,
        "no restore on the request path"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_requests_at_zero_all_succeed_on_at_most_two_vms() {
    let gw = Gw::start(
        "sgg5",
        "{ min_warm: 0, max_instances: 2, max_concurrency: 4, hold_timeout: 60s }",
    )
    .await;
    let requests = (0..50).map(|i| {
        let req = gw.get(&format!("/sleep/20?n={i}"));
        async move {
            let resp = req.send().await.unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        }
    });
    let answers = futures::future::join_all(requests).await;
    let statuses: Vec<u16> = answers.iter().map(|(s, _)| *s).collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let instances: HashSet<String> = answers.iter().map(|(_, b)| instance_of(b)).collect();
    assert!(instances.len() <= 2, "{instances:?}");
    assert!(
        gw.pool().stats().peak <= 2,
        "peak {}",
        gw.pool().stats().peak
    );
    assert!(gw.metric("snapgate_restores_total{app=\"app\"}").await <= 2.0);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_and_hold_timeout_get_503_with_retry_after_and_the_rest_are_served() {
    let gw = Gw::start(
        "sggq",
        "{ min_warm: 1, max_instances: 1, max_concurrency: 1, hold_queue: 2, hold_timeout: 1s }",
    )
    .await;
    wait_for("the warm instance", Duration::from_secs(60), async || {
        gw.pool().stats().instances == 1
    })
    .await;
    // A holds the only instance for 4 s.
    let a = tokio::spawn(gw.get("/sleep/4000").send());
    wait_for("A to be in flight", Duration::from_secs(10), async || {
        gw.pool().stats().leased == 1
    })
    .await;
    // B and C fill the hold queue.
    let timed = |req: reqwest::RequestBuilder| async move {
        let t = Instant::now();
        let resp = req.send().await.unwrap();
        (
            resp.status().as_u16(),
            resp.headers().get("retry-after").cloned(),
            t.elapsed(),
        )
    };
    let b = tokio::spawn(timed(gw.get("/b")));
    let c = tokio::spawn(timed(gw.get("/c")));
    wait_for("B and C to be held", Duration::from_secs(10), async || {
        gw.pool().stats().queued == 2
    })
    .await;
    // D finds the queue full: 503 at once.
    let (status, retry, took) = timed(gw.get("/d")).await;
    assert_eq!(status, 503);
    assert_eq!(retry.unwrap(), "1");
    assert!(took < Duration::from_secs(1), "{took:?}");
    // B and C are held for hold_timeout (1 s), then get 503 too, well
    // before A frees the instance.
    for held in [b, c] {
        let (status, retry, took) = held.await.unwrap();
        assert_eq!(status, 503);
        assert!(retry.is_some());
        assert!(
            took >= Duration::from_secs(1) && took < Duration::from_secs(3),
            "{took:?}"
        );
    }
    let a = a.await.unwrap().unwrap();
    assert_eq!(a.status(), 200);
    assert_eq!(gw.get("/e").send().await.unwrap().status(), 200);
    assert_eq!(
        gw.metric("snapgate_claims_total{app=\"app\",outcome=\"queue_full\"}")
            .await,
        1.0
    );
    assert_eq!(
        gw.metric("snapgate_claims_total{app=\"app\",outcome=\"hold_timeout\"}")
            .await,
        2.0
    );
    assert_eq!(
        gw.metric("snapgate_requests_total{app=\"app\",status=\"503\"}")
            .await,
        3.0
    );
    // The two that timed out were held; the one refused at once was not.
    assert_eq!(
        gw.metric("snapgate_requests_total{app=\"app\",held=\"true\",status=\"503\"}")
            .await,
        2.0
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_instances_go_after_idle_timeout_and_the_next_request_brings_one_back() {
    let gw = Gw::start(
        "sggi",
        "{ min_warm: 0, max_instances: 1, idle_timeout: 2s }",
    )
    .await;
    assert_eq!(gw.get("/").send().await.unwrap().status(), 200);
    let instances = gw.pool().instances();
    let [(pid, tap)] = &instances[..] else {
        panic!("one instance: {instances:?}")
    };
    let (pid, tap) = (*pid, tap.clone());
    wait_for("the reaper", Duration::from_secs(20), async || {
        gw.pool().stats().instances == 0
    })
    .await;
    assert!(
        eventually(Duration::from_secs(10), || !alive(pid)).await,
        "VMM {pid} still runs"
    );
    assert_all_gone(&gw.net, &[pid]).await;
    assert!(!gw
        .net
        .list_taps()
        .await
        .unwrap()
        .iter()
        .any(|(_, t)| *t == tap));
    assert_eq!(
        gw.metric("snapgate_reaped_total{app=\"app\",reason=\"idle\"}")
            .await,
        1.0
    );
    assert_eq!(gw.get("/").send().await.unwrap().status(), 200);
    assert_eq!(gw.metric("snapgate_restores_total{app=\"app\"}").await, 2.0);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_vmm_is_replaced_when_idle_and_fails_only_its_own_request_when_busy() {
    let gw = Gw::start("sggk", "{ min_warm: 1, max_instances: 2 }").await;
    wait_for("the warm instance", Duration::from_secs(60), async || {
        gw.pool().stats().instances == 1
    })
    .await;
    let kill = |pid: u32| {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap()
    };
    // Killed while idle: replaced.
    let first = gw.pool().pids()[0];
    kill(first);
    wait_for("a replacement", Duration::from_secs(60), async || {
        let pids = gw.pool().pids();
        pids.len() == 1 && pids[0] != first && gw.pool().stats().restoring == 0
    })
    .await;
    assert_eq!(gw.get("/").send().await.unwrap().status(), 200);

    // Killed while serving: that client gets 502, later requests succeed.
    let slow = tokio::spawn(gw.get("/sleep/5000").send());
    wait_for("the slow request", Duration::from_secs(10), async || {
        gw.pool().stats().leased == 1
    })
    .await;
    kill(gw.pool().pids()[0]);
    let resp = slow.await.unwrap().unwrap();
    assert_eq!(resp.status(), 502);
    assert!(resp.text().await.unwrap().contains("failed"));
    for _ in 0..3 {
        assert_eq!(gw.get("/").send().await.unwrap().status(), 200);
    }
    assert_eq!(
        gw.metric("snapgate_instance_failures_total{app=\"app\"}")
            .await,
        2.0
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_check() {
    let gw = Gw::start("sggm", "{ min_warm: 0, max_instances: 1 }").await;
    assert_eq!(gw.get("/").send().await.unwrap().status(), 200);
    let _ = gw
        .http()
        .get(format!("http://{}/", gw.running().listen))
        .header("host", "x.test")
        .send()
        .await
        .unwrap();
    let text = gw.metrics().await;
    // The first request came from zero: held while a clone restored.
    assert_eq!(
        gw.metric("snapgate_cold_start_duration_seconds_count{app=\"app\",path=\"clone\"}")
            .await,
        1.0
    );
    assert_eq!(
        gw.metric("snapgate_requests_total{app=\"app\",held=\"true\",status=\"200\"}")
            .await,
        1.0
    );
    for family in [
        "snapgate_requests_total",
        "snapgate_request_duration_seconds",
        "snapgate_hold_duration_seconds",
        "snapgate_cold_start_duration_seconds",
        "snapgate_reaped_total",
        "snapgate_upstream_errors_total",
        "snapgate_tls_handshakes_total",
        "snapgate_tls_handshake_failures_total",
        "snapgate_config_reloads_total",
        "snapgate_instances",
        "snapgate_restores_total",
        "snapgate_restore_failures_total",
        "snapgate_hold_queue_depth",
        "snapgate_build_info",
        "snapgate_process_resident_memory_bytes",
        "snapgate_process_open_fds",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "{family} missing"
        );
    }
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/test installs it)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_restores_answer_503_naming_the_problem_and_recover_after_backoff() {
    // A snapshot of this test's own, so damaging it touches no other test.
    let state = tempfile::tempdir().unwrap();
    let snapshots = state.path().join("snapshots");
    let cfg = gateway_config(
        state.path(),
        "sggf",
        "{ min_warm: 0, max_instances: 1, idle_timeout: 1s }",
        &snapshots,
    );
    let gw = Gw::with_state(state, &cfg).await;
    let state_file = snapshots.join("app/current/state");
    let good = std::fs::read(&state_file).unwrap();
    // Damage it the way a full disk would: same name, half the bytes.
    let tmp = state_file.with_extension("tmp");
    std::fs::write(&tmp, &good[..good.len() / 2]).unwrap();
    std::fs::rename(&tmp, &state_file).unwrap();

    let resp = gw.get("/").send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().get("retry-after").is_some());
    let body = resp.text().await.unwrap();
    assert_eq!(
        body,
        "snapgate: app app: cannot start an instance right now\n"
    );
    // The client learns nothing internal; the operator gets the cause.
    let cause = gw.pool().last_error().expect("the restore error");
    assert!(
        cause.contains("/state") && cause.contains("truncated"),
        "{cause}"
    );
    assert_eq!(
        gw.metric("snapgate_restore_failures_total{app=\"app\",reason=\"host\"}")
            .await,
        1.0
    );

    // Repaired: after the backoff the next request restores and is served.
    std::fs::write(&tmp, &good).unwrap();
    std::fs::rename(&tmp, &state_file).unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let resp = gw.get("/").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(gw.metric("snapgate_restores_total{app=\"app\"}").await, 1.0);
    gw.stop().await;
}

/// Processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(needle) && alive(pid) {
            found.push(pid);
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish_then_removes_every_vm_and_exits_0() {
    use tokio::io::AsyncBufReadExt;
    let state = tempfile::tempdir().unwrap();
    let cfg = config(state.path(), "sggs", "{ min_warm: 1, max_instances: 2 }");
    let net = Network::new(cfg.network.clone()).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_snapgate"))
        .args(["run", "--config"])
        .arg(state.path().join("proxy.yaml"))
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let serving = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .expect("snapgate exited before serving");
            if let Some(rest) = line.strip_prefix("serving on http://") {
                return rest.to_owned();
            }
        }
    })
    .await
    .expect("serving within 120 s");
    // "ADDR, metrics on http://ADMIN/metrics"
    let (listen, admin) = serving.split_once(", metrics on http://").unwrap();
    let admin = admin.trim_end_matches("/metrics").to_owned();
    let http = reqwest::Client::new();
    let get = |path: &str| {
        http.get(format!("http://{listen}{path}"))
            .header("host", "app.test")
    };
    let leased = async || {
        let text = reqwest::get(format!("http://{admin}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.contains("snapgate_instances{app=\"app\",state=\"leased\"} 1")
    };
    assert_eq!(get("/").send().await.unwrap().status(), 200);

    let slow = tokio::spawn(get("/sleep/2000").send());
    wait_for("the slow request", Duration::from_secs(10), leased).await;
    let state_dir = state.path().to_string_lossy().into_owned();
    assert!(
        !processes_mentioning(&state_dir).is_empty(),
        "the VMM runs under the state dir"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();

    // The request in flight finishes; new connections are refused.
    let resp = slow.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp
        .text()
        .await
        .unwrap()
        .contains("request: GET /sleep/2000"));
    let refused = tokio::net::TcpStream::connect(listen).await.is_err();
    assert!(refused, "still accepting after SIGTERM");
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("exit within 30 s")
        .unwrap();
    assert!(status.success(), "{status}");
    let mut rest = String::new();
    while let Ok(Some(line)) = lines.next_line().await {
        rest.push_str(&line);
        rest.push('\n');
    }
    assert!(rest.contains("SIGTERM: draining"), "{rest}");
    assert!(
        processes_mentioning(&state_dir).is_empty(),
        "VMMs left: {:?}",
        processes_mentioning(&state_dir)
    );
    assert_all_gone(&net, &[]).await;
    assert_eq!(
        std::fs::read_dir(state.path().join("vms")).unwrap().count(),
        0,
        "pid files left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_queries_run_on_a_real_prometheus_scraping_the_gateway() {
    let gw = Gw::start("sggp", "{ min_warm: 1, max_instances: 1 }").await;
    wait_for("the warm instance", Duration::from_secs(60), async || {
        gw.pool().stats().instances == 1
    })
    .await;
    let prometheus = Prometheus::start(gw.running().admin);
    let query = async |expr: &str| prometheus.query(expr).await;
    // Traffic while Prometheus scrapes: rates need two samples or more.
    wait_for(
        "prometheus to scrape the gateway",
        Duration::from_secs(60),
        async || {
            let _ = gw.get("/").send().await;
            query("snapgate_requests_total").await["data"]["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
        },
    )
    .await;
    for _ in 0..20 {
        let _ = gw.get("/").send().await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let mut checked = 0;
    for (title, expr) in dashboard_queries() {
        let answer = query(&expr).await;
        assert_eq!(answer["status"], "success", "{title}: {expr}: {answer}");
        checked += 1;
    }
    assert!(checked >= 8);
    // The series the panels draw are there, with the values the pool has:
    // once traffic stops, a scrape finds the one instance warm (a scrape
    // during a request found it leased).
    let warm_expr = "sum(snapgate_instances{app=\"app\",state=\"warm\"})";
    wait_for(
        "prometheus to see the instance warm",
        Duration::from_secs(60),
        async || query(warm_expr).await["data"]["result"][0]["value"][1] == "1",
    )
    .await;
    let rate = query("sum(rate(snapgate_requests_total{app=\"app\",status=\"200\"}[1m]))").await;
    let rate: f64 = rate["data"]["result"][0]["value"][1]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(rate > 0.0);
    gw.stop().await;
}
