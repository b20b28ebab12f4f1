//! Runtime apps end to end: the Node.js runtime guest (built from Debian
//! packages by scripts/build-node-runtime), real QEMU clones on real taps,
//! the real gateway and a real client. The runtime's snapshot is cached in
//! `target/test-snapshots` (rebuilt when the guest or runtime changes).
#![cfg(feature = "vm-tests")]

mod common;

use std::time::Duration;

use common::runtime::*;
use common::*;
use snapgate::testing::shared_snapshot_dir;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_apps_share_one_runtime_snapshot_and_new_code_needs_no_rebuild() {
    let code = tempfile::tempdir().unwrap();
    let (alpha, beta) = (code.path().join("alpha"), code.path().join("beta"));
    write_app(&alpha, "alpha", 1);
    write_js_app(&beta, "beta", 1, true);
    // alpha scales to zero; beta keeps one started instance warm.
    let apps = app_entry(
        "alpha",
        &alpha,
        ", env: { GREETING: hi-alpha }",
        "{ min_warm: 0, max_instances: 2, idle_timeout: 1s }",
    ) + &app_entry(
        "beta",
        &beta,
        ", env: { GREETING: hi-beta }",
        "{ min_warm: 1, max_instances: 2 }",
    );
    let gw = Gw::start("sgrt", 1, &apps, &shared_snapshot_dir()).await;
    let runtime_snapshot = current_snapshot(&gw.snapshots, "runtime.node");
    let metrics = gw.running().runtime_metrics.clone();
    // A real Prometheus scrapes the gateway throughout (checked at the end).
    let prometheus = Prometheus::start(gw.running().admin);
    wait_for(
        "prometheus to scrape",
        Duration::from_secs(60),
        async || prometheus.has_series("snapgate_runtime_clones").await,
    )
    .await;
    wait_for(
        "a warm runtime clone",
        Duration::from_secs(60),
        async || gw.runtime_stock().0 == 1,
    )
    .await;

    // Each host answers with its own app, both from the one runtime snapshot.
    let (status, body) = gw.get("alpha", "/a").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.starts_with("app=alpha version=1 greeting=hi-alpha port=8080 node=v18."),
        "{body}"
    );
    assert!(body.contains("url=/a"), "{body}");
    let (status, body) = gw.get("beta", "/b").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.starts_with("app=beta version=1 greeting=hi-beta"),
        "{body}"
    );
    // No image was rebuilt: no per-app snapshot, the runtime's is the same.
    assert!(!gw.snapshots.join("alpha").exists());
    assert!(!gw.snapshots.join("beta").exists());
    assert_eq!(
        current_snapshot(&gw.snapshots, "runtime.node"),
        runtime_snapshot
    );
    // beta's warm instance and alpha's first one each took a warm clone
    // (the stock refills between them, or restores on demand).
    assert_eq!(
        metrics.takes("node", "warm") + metrics.takes("node", "restored"),
        2
    );
    assert!(metrics.takes("node", "warm") >= 1);
    wait_for("the stock to refill", Duration::from_secs(60), async || {
        gw.runtime_stock().0 == 1
    })
    .await;

    // New code for alpha: once its instance is reaped (idle 1s), the next
    // instance runs it, from the same runtime snapshot.
    write_app(&alpha, "alpha", 2);
    wait_for(
        "alpha to scale to zero",
        Duration::from_secs(30),
        async || gw.pool("alpha").stats().instances == 0,
    )
    .await;
    let (status, body) = gw.get("alpha", "/").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("app=alpha version=2"), "{body}");
    // This clone was restored seconds after the snapshot was taken; its
    // clock was set to the host's when its app started.
    assert_clock_is_set(&body);
    assert_eq!(
        current_snapshot(&gw.snapshots, "runtime.node"),
        runtime_snapshot
    );
    let images: Vec<_> = std::fs::read_dir(gw.state_dir().join("code/alpha"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(images.len(), 2, "one image per code version: {images:?}");
    assert_eq!(metrics.failures("node"), 0);

    // The dashboard's runtime panels draw these series from Prometheus.
    let runtime_panels: Vec<(String, String)> = dashboard_queries()
        .into_iter()
        .filter(|(_, expr)| expr.contains("snapgate_runtime_"))
        .collect();
    assert_eq!(runtime_panels.len(), 3, "{runtime_panels:?}");
    wait_for(
        "Prometheus to see the takes",
        Duration::from_secs(30),
        async || {
            let answer = prometheus.query(&runtime_panels[1].1).await;
            answer["data"]["result"].as_array().is_some_and(|series| {
                series.iter().any(|s| {
                    s["metric"]["outcome"] == "warm"
                        && s["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()) > Some(0.0)
                })
            })
        },
    )
    .await;
    // The stock refills after alpha's new instance took its clone.
    wait_for(
        "Prometheus to see one warm clone",
        Duration::from_secs(60),
        async || {
            let stock = prometheus.query(&runtime_panels[0].1).await;
            stock["data"]["result"].as_array().is_some_and(|series| {
                series.iter().any(|s| {
                    s["metric"]["runtime"] == "node"
                        && s["metric"]["state"] == "warm"
                        && s["value"][1] == "1"
                })
            })
        },
    )
    .await;
    let failed = prometheus.query(&runtime_panels[2].1).await;
    assert_eq!(failed["status"], "success", "{failed}");
    // Every query of every dashboard is valid and draws at least one
    // series, after traffic with cold starts (alpha's, from zero).
    let queries = dashboard_queries();
    assert!(queries.len() >= 25, "{}", queries.len());
    for (title, expr) in &queries {
        let answer = prometheus.query(expr).await;
        assert_eq!(answer["status"], "success", "{title}: {expr}: {answer}");
        // A rate needs two scrapes of a series: wait for them, not a fixed
        // time.
        wait_for(
            &format!("{title}: {expr} to return a series"),
            Duration::from_secs(30),
            async || {
                let answer = prometheus.query(expr).await;
                answer["data"]["result"]
                    .as_array()
                    .is_some_and(|s| !s.is_empty())
            },
        )
        .await;
    }
    // The cold-start panel saw alpha's held requests by their path.
    wait_for(
        "Prometheus to see alpha's two cold starts",
        Duration::from_secs(30),
        async || {
            let cold = prometheus
                .query("snapgate_cold_start_duration_seconds_count{app=\"alpha\",path=\"runtime_clone\"}")
                .await;
            cold["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok())
                == Some(2.0)
        },
    )
    .await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_that_fail_to_start_get_clear_errors_and_spare_the_runtime() {
    let code = tempfile::tempdir().unwrap();
    let good = code.path().join("good");
    write_app(&good, "good", 1);
    let crash = code.path().join("crash");
    std::fs::create_dir_all(&crash).unwrap();
    std::fs::write(
        crash.join("server.js"),
        "console.log('connecting to the database');\n\
         throw new Error('boom: DATABASE_URL is not set');\n",
    )
    .unwrap();
    // Asks for a variable Node reads only at its own start.
    let late = code.path().join("late");
    write_app(&late, "late", 1);
    // A code "image" that is no file system at all.
    let garbage = code.path().join("garbage.img");
    std::fs::write(&garbage, vec![0x5a; 1 << 20]).unwrap();
    let pool = "{ min_warm: 0, max_instances: 1 }";
    let apps = app_entry("good", &good, "", pool)
        + &app_entry("crash", &crash, "", pool)
        + &app_entry(
            "late",
            &late,
            ", env: { NODE_OPTIONS: '--max-old-space-size=64' }",
            pool,
        )
        + &app_entry("garbage", &garbage, "", pool);
    let gw = Gw::start("sgrf", 1, &apps, &shared_snapshot_dir()).await;
    let metrics = gw.running().runtime_metrics.clone();
    wait_for(
        "a warm runtime clone",
        Duration::from_secs(60),
        async || gw.runtime_stock().0 == 1,
    )
    .await;

    // The app crashes at start: 503 naming the app, and the app's own
    // output (its log line and its error) in the error the gateway logs.
    let (status, body) = gw.get("crash", "/").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("app crash: the app failed to start"),
        "{body}"
    );
    let err = gw.pool("crash").last_error().expect("an error is kept");
    assert!(err.contains("the app exited while starting"), "{err}");
    assert!(err.contains("connecting to the database"), "{err}");
    assert!(
        err.contains("Error: boom: DATABASE_URL is not set"),
        "{err}"
    );

    // A per-app NODE_OPTIONS cannot work in a runtime started long ago.
    let (status, body) = gw.get("late", "/").await;
    assert_eq!(status, 503, "{body}");
    let err = gw.pool("late").last_error().expect("an error is kept");
    assert!(
        err.contains("NODE_OPTIONS: Node.js reads these only when it starts"),
        "{err}"
    );

    // The code disk does not mount: 503, and the agent's reason.
    let (status, body) = gw.get("garbage", "/").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("app garbage: the app failed to start"),
        "{body}"
    );
    let err = gw.pool("garbage").last_error().expect("an error is kept");
    assert!(err.contains("refused the start (HTTP 422)"), "{err}");
    assert!(err.contains("does not mount as ext4"), "{err}");

    // The runtime is not poisoned: the good app starts, the stock refills,
    // and no runtime clone failed.
    let (status, body) = gw.get("good", "/").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("app=good version=1"), "{body}");
    wait_for("the stock to refill", Duration::from_secs(60), async || {
        gw.runtime_stock().0 == 1
    })
    .await;
    assert_eq!(metrics.failures("node"), 0);
    assert!(gw.running().runtime("node").unwrap().last_error().is_none());
    // The failed apps' clones were destroyed, not left running.
    assert_eq!(gw.pool("crash").stats().instances, 0);
    assert_eq!(gw.pool("garbage").stats().instances, 0);
    assert_eq!(gw.pool("late").stats().instances, 0);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_can_have_its_own_snapshot_taken_after_it_started() {
    let code = tempfile::tempdir().unwrap();
    let solo = code.path().join("solo");
    write_app(&solo, "solo", 1);
    // Its own snapshot directory: the test checks it is built here.
    let snapshots = tempfile::tempdir().unwrap();
    let apps = app_entry(
        "solo",
        &solo,
        ", snapshot: app, env: { GREETING: frozen }",
        "{ min_warm: 0, max_instances: 2 }",
    );
    let gw = Gw::start("sgpa", 1, &apps, snapshots.path()).await;
    // The app's own snapshot, and no runtime stock (no app needs one).
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(current_snapshot(snapshots.path(), "solo").join("manifest.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["spec"]["guest_port"], 8080, "{manifest}");
    assert_eq!(manifest["spec"]["ready_path"], "/");
    // How the app was started is part of what the snapshot was taken from.
    let start = manifest["spec"]["prepared"].as_str().unwrap_or_default();
    assert!(start.contains(r#""GREETING":"frozen""#), "{manifest}");
    assert!(!snapshots.path().join("runtime.node").exists());
    assert!(gw.running().runtime_names().is_empty());

    let (status, body) = gw.get("solo", "/x").await;
    assert_eq!(status, 200, "{body}");
    // Restored from a snapshot taken seconds ago, its clock set after.
    assert_clock_is_set(&body);
    assert!(
        body.starts_with("app=solo version=1 greeting=frozen"),
        "{body}"
    );
    // It was restored from the app's snapshot: no runtime clone was taken.
    assert_eq!(gw.pool("solo").stats().instances, 1);
    let first = current_snapshot(snapshots.path(), "solo");
    gw.stop().await;

    // New code: the next start of the gateway takes a new snapshot of the
    // app, which serves the new code.
    write_app(&solo, "solo", 2);
    let gw = Gw::start("sgpa", 1, &apps, snapshots.path()).await;
    let second = current_snapshot(snapshots.path(), "solo");
    assert_ne!(first, second, "the snapshot was rebuilt");
    let (status, body) = gw.get("solo", "/").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("app=solo version=2"), "{body}");
    assert_clock_is_set(&body);
    gw.stop().await;
}

/// The tap a VMM process holds: the `iff:` line of its tun fd's
/// `/proc/<pid>/fdinfo` entry.
fn tap_of(pid: u32) -> Option<String> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fdinfo")).ok()?;
    fds.flatten().find_map(|fd| {
        let info = std::fs::read_to_string(fd.path()).ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("iff:"))
            .map(|name| name.trim().to_owned())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_that_never_becomes_ready_fails_at_start_timeout_and_the_next_is_fresh() {
    // The app's main module blocks its thread for ever while it loads,
    // asleep (not spinning): the guest agent takes the start, but the app
    // never listens. Its ready_timeout (600 s) and the hold_timeout (60 s)
    // are far off: only the pool's start_timeout (8 s) ends the start.
    let code = tempfile::tempdir().unwrap();
    let app = code.path().join("hang");
    std::fs::create_dir_all(&app).unwrap();
    std::fs::write(
        app.join("server.js"),
        "console.log('loading for ever');\n\
         Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0);\n\
         require('http').createServer((req, res) => res.end('never\\n')).listen(Number(process.env.PORT));\n",
    )
    .unwrap();
    let start_timeout = Duration::from_secs(8);
    let apps = app_entry(
        "hang",
        &app,
        ", ready_timeout: 600s",
        "{ min_warm: 0, max_instances: 1, start_timeout: 8s, hold_timeout: 60s }",
    );
    let gw = Gw::start("sgrh", 1, &apps, &shared_snapshot_dir()).await;
    let stock = gw.running().runtime("node").unwrap();
    wait_for(
        "one warm runtime clone",
        Duration::from_secs(60),
        async || gw.runtime_stock() == (1, 0),
    )
    .await;
    // The app's start takes the stock's one warm clone: its VMM and tap.
    let hung = match stock.pids()[..] {
        [pid] => pid,
        ref pids => panic!("one warm clone, pids {pids:?}"),
    };
    let tap = tap_of(hung).unwrap_or_else(|| panic!("no tap held by VMM pid {hung}"));
    assert!(tap.starts_with("sgrh"), "{tap}");

    let t = std::time::Instant::now();
    let request = async {
        let resp = gw
            .http()
            .get(format!("http://{}/", gw.running().listen))
            .header("host", "hang.test")
            .send()
            .await
            .unwrap();
        let took = t.elapsed();
        let retry_after = resp.headers().get("retry-after").cloned();
        (
            resp.status().as_u16(),
            retry_after,
            resp.text().await.unwrap(),
            took,
        )
    };
    let starting = async {
        wait_for(
            "the app's start in the warm clone",
            Duration::from_secs(5),
            async || {
                let s = gw.pool("hang").stats();
                s.restoring == 1 && s.queued == 1 && !stock.pids().contains(&hung)
            },
        )
        .await;
        assert!(alive(hung), "the clone taken runs while the app starts");
        assert!(gw.pool("hang").pids().is_empty());
    };
    let ((status, retry_after, body, took), ()) = tokio::join!(request, starting);
    eprintln!("the held request was answered {status} after {took:?}: {body}");
    assert_eq!(status, 503, "{body}");
    assert!(
        took >= start_timeout && took < Duration::from_secs(30),
        "answered after {took:?}, start_timeout {start_timeout:?}, hold_timeout 60s"
    );
    assert!(body.contains("app hang"), "{body}");
    assert!(retry_after.is_some(), "no Retry-After");
    let err = gw.pool("hang").last_error().expect("an error is kept");
    assert!(err.contains("start_timeout"), "{err}");
    // The slot came back before the request heard of the failure.
    let s = gw.pool("hang").stats();
    assert_eq!((s.restoring, s.instances, s.queued), (0, 0, 0), "{s:?}");
    // The clone that hung was destroyed: its VMM and its tap are gone.
    assert!(
        eventually(Duration::from_secs(10), || !alive(hung)).await,
        "VMM pid {hung} of the hung start still runs"
    );
    wait_for(
        &format!("tap {tap} to go"),
        Duration::from_secs(10),
        async || {
            let taps = gw.net.list_taps().await.expect("list taps");
            !taps.iter().any(|(_, name)| *name == tap)
        },
    )
    .await;
    eprintln!(
        "the hung clone (pid {hung}, tap {tap}) is gone after {:?}",
        t.elapsed()
    );

    // Good code: once the backoff ends, a fresh instance serves it.
    write_app(&app, "hang", 2);
    wait_for("the stock to refill", Duration::from_secs(60), async || {
        gw.runtime_stock() == (1, 0)
    })
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let body = loop {
        let (status, body) = gw.get("hang", "/").await;
        if status == 200 {
            break body;
        }
        assert_eq!(status, 503, "{body}");
        assert!(
            std::time::Instant::now() < deadline,
            "no 200 within 60s; last: {body}; last error: {:?}",
            gw.pool("hang").last_error()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(body.starts_with("app=hang version=2"), "{body}");
    let fresh = match gw.pool("hang").pids()[..] {
        [pid] => pid,
        ref pids => panic!("one instance, pids {pids:?}"),
    };
    assert_ne!(fresh, hung);
    assert!(gw.pool("hang").last_error().is_none());
    eprintln!(
        "a fresh instance (pid {fresh}) answered after {:?}",
        t.elapsed()
    );
    gw.stop().await;
}
