//! Runtime apps' clones each their own: ten instances of a runtime app,
//! and ten clones of a per-app snapshot, draw their own random values and
//! read the host's clock; per-app clones run no code of the app before
//! they are made their own. Real QEMU clones of the Node.js runtime guest
//! on real taps, through the real gateway.
#![cfg(feature = "vm-tests")]

mod common;

use std::path::Path;
use std::time::Duration;

use common::runtime::*;
use snapgate::testing::shared_snapshot_dir;

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
