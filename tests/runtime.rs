//! Runtime apps end to end: the Node.js runtime guest (built from Debian
//! packages by scripts/build-node-runtime), real QEMU clones on real taps,
//! the real gateway and a real client. The runtime's snapshot is cached in
//! `target/test-snapshots` (rebuilt when the guest or runtime changes).
#![cfg(feature = "vm-tests")]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use snapgate::testing::{runtime_gateway_config, shared_snapshot_dir};

/// A JS app that answers with its name, version and environment. A
/// CommonJS module that listens only when it is the main module (as Node's
/// own entry point would run it), or with `esm` an ES module package.
fn write_app(dir: &Path, name: &str, version: u32) {
    write_js_app(dir, name, version, false)
}

fn write_js_app(dir: &Path, name: &str, version: u32, esm: bool) {
    std::fs::create_dir_all(dir).unwrap();
    let handler = format!(
        "(req, res) => {{\n\
         \x20 res.setHeader('content-type', 'text/plain');\n\
         \x20 res.end(`app={name} version={version} greeting=${{process.env.GREETING}} port=${{process.env.PORT}} node=${{process.version}} url=${{req.url}} now=${{Date.now()}}\\n`);\n\
         }}"
    );
    let js = if esm {
        std::fs::write(dir.join("package.json"), r#"{ "type": "module" }"#).unwrap();
        format!(
            "import http from 'node:http';\n\
             http.createServer({handler}).listen(Number(process.env.PORT));\n"
        )
    } else {
        format!(
            "const http = require('http');\n\
             if (require.main === module) {{\n\
             \x20 http.createServer({handler}).listen(Number(process.env.PORT));\n\
             }}\n"
        )
    };
    std::fs::write(dir.join("server.js"), js).unwrap();
}

/// An app entry of `apps:` for the `node` runtime.
fn app_entry(name: &str, code: &Path, extra: &str, pool: &str) -> String {
    format!(
        "  {name}:\n    hosts: [{name}.test]\n    runtime: {{ name: node, code: {}, main: server.js{extra} }}\n    pool: {pool}\n",
        code.display()
    )
}

/// The shared harness ([`TestGateway`]) with the Node.js runtime `node`;
/// apps are on `<app>.test`.
struct Gw {
    gw: TestGateway,
    snapshots: PathBuf,
}

impl std::ops::Deref for Gw {
    type Target = TestGateway;
    fn deref(&self) -> &TestGateway {
        &self.gw
    }
}

impl Gw {
    async fn start(prefix: &str, runtime_min_warm: usize, apps: &str, snapshots: &Path) -> Gw {
        let state = tempfile::tempdir().unwrap();
        let cfg = runtime_gateway_config(state.path(), prefix, runtime_min_warm, apps, snapshots);
        Gw {
            gw: TestGateway::start(state, &cfg).await,
            snapshots: snapshots.to_owned(),
        }
    }

    async fn get(&self, app: &str, path: &str) -> (u16, String) {
        self.gw.get(&format!("{app}.test"), path).await
    }

    /// Waits, at most `within`, until `app` has `n` instances and no
    /// restore in flight.
    async fn wait_warm(&self, app: &str, n: usize, within: Duration) {
        let what = format!("{n} warm instances");
        self.until(app, &what, within, |s| s.instances == n && s.restoring == 0)
            .await;
    }

    fn runtime_stock(&self) -> (usize, usize) {
        self.running().runtimes["node"].stock()
    }

    /// Shuts the gateway down and checks that every VM and tap is gone.
    async fn stop(self) {
        self.gw.stop().await;
    }
}

/// Asserts that the `now=` an app answered (its `Date.now()`) is within a
/// second of the host's clock: a clone's clock resumes from the snapshot's
/// moment unless snapgate sets it.
fn assert_clock_is_set(body: &str) {
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let guest_now: i64 = body
        .split_whitespace()
        .find_map(|w| w.strip_prefix("now="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no now= in {body}"));
    assert!(
        (host_now - guest_now).abs() < 1000,
        "guest clock {guest_now} vs host {host_now}: {body}"
    );
}

/// The snapshot directory `current` points at, for `name`.
fn current_snapshot(snapshots: &Path, name: &str) -> PathBuf {
    std::fs::canonicalize(snapshots.join(name).join("current"))
        .unwrap_or_else(|e| panic!("{name}: no current snapshot: {e}"))
}

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
    let images: Vec<_> = std::fs::read_dir(gw.state.path().join("code/alpha"))
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
    assert!(gw.running().runtimes["node"].last_error().is_none());
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
    assert!(gw.running().runtimes.is_empty());

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

/// A JS app that reports what it drew at its first request: 16 bytes of
/// crypto.randomBytes, Math.random(), crypto.randomUUID(),
/// crypto.randomInt(), 16 bytes of /dev/urandom (the kernel generator that
/// getrandom(2) also draws from) and Date.now(). It also draws
/// Math.random, randomUUID and randomInt when it loads, which fills the
/// runtime's and Node's caches of random bytes: for a per-app snapshot,
/// before the snapshot. `?hold=<ms>` holds the answer.
fn write_random_app(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("server.js"),
        r#"const http = require('http');
const crypto = require('crypto');
const fs = require('fs');
const atLoad = { math: Math.random(), uuid: crypto.randomUUID(), int: crypto.randomInt(2 ** 47) };
function kernel() {
  const fd = fs.openSync('/dev/urandom', 'r');
  const b = Buffer.alloc(16);
  fs.readSync(fd, b, 0, 16, null);
  fs.closeSync(fd);
  return b.toString('hex');
}
let first = null;
let served = 0;
http.createServer((req, res) => {
  if (req.url === '/healthz') { res.end('ok\n'); return; }
  served += 1;
  if (first === null) {
    first = {
      bytes: crypto.randomBytes(16).toString('hex'),
      math: Math.random(),
      uuid: crypto.randomUUID(),
      int: crypto.randomInt(2 ** 47),
      kernel: kernel(),
      now: Date.now(),
    };
  }
  const hold = Number(new URL(req.url, 'http://app').searchParams.get('hold') || 0);
  const body = JSON.stringify({ served, first, atLoad });
  setTimeout(() => res.end(body), hold);
}).listen(Number(process.env.PORT));
"#,
    )
    .unwrap();
}

/// Ten warm instances of `app`, ten requests at once (each held 2 s, so
/// each lands on an instance of its own), and what each instance drew at
/// its first request, checked to be its own. Returns the reports.
async fn ten_instances_draw_their_own_values(gw: &Gw, app: &str) -> Vec<serde_json::Value> {
    gw.wait_warm(app, 10, Duration::from_secs(240)).await;
    let asks = (0..10).map(|_| async {
        let sent = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let (status, body) = gw.get(app, "/draw?hold=2000").await;
        assert_eq!(status, 200, "{body}");
        let report: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            report["served"], 1,
            "each instance's first request: {report}"
        );
        let now = report["first"]["now"].as_u64().unwrap();
        assert!(
            now.abs_diff(sent) < 1000,
            "guest clock {now} vs host {sent}: {report}"
        );
        report
    });
    let reports = futures::future::join_all(asks).await;
    for key in ["bytes", "math", "uuid", "int", "kernel"] {
        let values: std::collections::HashSet<String> = reports
            .iter()
            .map(|r| r["first"][key].to_string())
            .collect();
        assert_eq!(values.len(), 10, "{key} at the first request: {values:?}");
    }
    reports
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_instances_of_a_runtime_app_each_draw_their_own_values() {
    let code = tempfile::tempdir().unwrap();
    let app = code.path().join("draw");
    write_random_app(&app);
    let apps = app_entry(
        "draw",
        &app,
        ", ready_path: /healthz",
        "{ min_warm: 10, max_instances: 10, max_concurrency: 1, hold_timeout: 60s }",
    );
    let gw = Gw::start("sgrd", 1, &apps, &shared_snapshot_dir()).await;
    let reports = ten_instances_draw_their_own_values(&gw, "draw").await;
    // Each app loaded in its own clone, after the clone was made its own:
    // what it drew while loading is its own too.
    for key in ["math", "uuid", "int"] {
        let values: std::collections::HashSet<String> = reports
            .iter()
            .map(|r| r["atLoad"][key].to_string())
            .collect();
        assert_eq!(values.len(), 10, "{key} at load: {values:?}");
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_clones_of_a_per_app_snapshot_each_draw_their_own_values() {
    let code = tempfile::tempdir().unwrap();
    let app = code.path().join("drawsnap");
    write_random_app(&app);
    let snapshots = tempfile::tempdir().unwrap();
    let apps = app_entry(
        "drawsnap",
        &app,
        ", ready_path: /healthz, snapshot: app",
        "{ min_warm: 10, max_instances: 10, max_concurrency: 1, hold_timeout: 60s }",
    );
    let gw = Gw::start("sgrs", 1, &apps, snapshots.path()).await;
    let reports = ten_instances_draw_their_own_values(&gw, "drawsnap").await;
    // The app loaded once, in the template: what it drew then is part of
    // the snapshot, the same in every clone (as the README says). What it
    // draws once resumed is its own, though Math.random's pool and Node's
    // randomUUID and randomInt caches were filled before the snapshot.
    let at_load: std::collections::HashSet<String> =
        reports.iter().map(|r| r["atLoad"].to_string()).collect();
    assert_eq!(at_load.len(), 1, "{at_load:?}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_app_snapshot_drops_caches_an_es_module_filled_through_named_imports() {
    // An ES module app fills Node's randomUUID and randomInt caches before
    // the snapshot through named imports of node:crypto (which the loader's
    // wrappers must reach too).
    let code = tempfile::tempdir().unwrap();
    let app = code.path().join("esm");
    std::fs::create_dir_all(&app).unwrap();
    std::fs::write(app.join("package.json"), r#"{ "type": "module" }"#).unwrap();
    std::fs::write(
        app.join("server.js"),
        r#"import http from 'node:http';
import { randomUUID, randomInt } from 'node:crypto';
randomUUID();
randomInt(10);
let first = null;
http.createServer((req, res) => {
  if (req.url === '/healthz') { res.end('ok\n'); return; }
  first ??= { uuid: randomUUID(), int: randomInt(2 ** 47) };
  const hold = Number(new URL(req.url, 'http://app').searchParams.get('hold') || 0);
  setTimeout(() => res.end(JSON.stringify(first)), hold);
}).listen(Number(process.env.PORT));
"#,
    )
    .unwrap();
    let snapshots = tempfile::tempdir().unwrap();
    let apps = app_entry(
        "esm",
        &app,
        ", ready_path: /healthz, snapshot: app",
        "{ min_warm: 3, max_instances: 3, max_concurrency: 1, hold_timeout: 60s }",
    );
    let gw = Gw::start("sgre", 0, &apps, snapshots.path()).await;
    gw.wait_warm("esm", 3, Duration::from_secs(120)).await;
    let asks = (0..3).map(|_| gw.get("esm", "/?hold=2000"));
    let reports: Vec<serde_json::Value> = futures::future::join_all(asks)
        .await
        .into_iter()
        .map(|(status, body)| {
            assert_eq!(status, 200, "{body}");
            serde_json::from_str(&body).unwrap()
        })
        .collect();
    for key in ["uuid", "int"] {
        let values: std::collections::HashSet<String> =
            reports.iter().map(|r| r[key].to_string()).collect();
        assert_eq!(values.len(), 3, "{key}: {reports:?}");
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_app_clone_runs_no_timer_of_the_app_before_it_is_made_its_own() {
    // The app draws on a 5 ms timer from the moment it starts. The template
    // is frozen before its snapshot: in a clone, the first tick after the
    // snapshot comes after the clone was made its own, so every draw since
    // the snapshot is the clone's own. (Without the freeze, ticks between
    // the restore and the resumed message would draw the snapshot's bytes,
    // the same in every clone.)
    let code = tempfile::tempdir().unwrap();
    let app = code.path().join("ticks");
    std::fs::create_dir_all(&app).unwrap();
    std::fs::write(
        app.join("server.js"),
        r#"const http = require('http');
const crypto = require('crypto');
const samples = [];
setInterval(() => {
  samples.push({ at: Date.now(), uuid: crypto.randomUUID(), math: Math.random() });
  if (samples.length > 400) samples.shift();
}, 5);
http.createServer((req, res) => {
  if (req.url === '/healthz') { res.end('ok\n'); return; }
  const url = new URL(req.url, 'http://app');
  const since = Number(url.searchParams.get('since'));
  const mine = samples.filter((s) => s.at >= since);
  setTimeout(() => res.end(JSON.stringify(mine)), Number(url.searchParams.get('hold') || 0));
}).listen(Number(process.env.PORT));
"#,
    )
    .unwrap();
    let snapshots = tempfile::tempdir().unwrap();
    let apps = app_entry(
        "ticks",
        &app,
        ", ready_path: /healthz, snapshot: app",
        "{ min_warm: 3, max_instances: 3, max_concurrency: 1, hold_timeout: 60s }",
    );
    let gw = Gw::start("sgrt", 0, &apps, snapshots.path()).await;
    // When the snapshot was taken (its directory is named by the time,
    // taken once the template was frozen).
    let taken: u64 = current_snapshot(snapshots.path(), "ticks")
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .expect("a snapshot named by its time");
    gw.wait_warm("ticks", 3, Duration::from_secs(120)).await;
    let path = format!("/?hold=2000&since={taken}");
    let asks = (0..3).map(|_| gw.get("ticks", &path));
    let mut seen = std::collections::HashMap::new();
    for (clone, (status, body)) in futures::future::join_all(asks)
        .await
        .into_iter()
        .enumerate()
    {
        assert_eq!(status, 200, "{body}");
        let samples: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
        assert!(
            !samples.is_empty(),
            "clone {clone} drew nothing since the snapshot"
        );
        for sample in samples {
            for key in ["uuid", "math"] {
                let value = sample[key].to_string();
                if let Some(other) = seen.insert(value.clone(), clone) {
                    assert_eq!(
                        other, clone,
                        "clones {other} and {clone} drew the same {key} {value} after the snapshot"
                    );
                }
            }
        }
    }
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
    let stock = &gw.running().runtimes["node"];
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
