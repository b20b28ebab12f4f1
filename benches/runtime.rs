//! Runtime-app benchmark with real VMs (the Node.js runtime guest): claim
//! to first byte for
//! 1. a warm runtime clone + code attach + app start (through the gateway,
//!    app at zero, one runtime clone warm);
//! 2. a clone of the app's own snapshot (through the gateway, app at zero);
//! 3. a cold boot of the runtime image with the app's code disk, to the
//!    app's first 200 (no snapshot at all).
//!
//! Then the steps of (1), from the instance's own timings. Prints tables.
//!
//!     SNAPGATE_GUEST_DIR=$(scripts/build-guest) \
//!     SNAPGATE_NODE_RUNTIME_DIR=$(scripts/build-node-runtime) \
//!     cargo bench --features vm-tests --bench runtime
//!
//! `SNAPGATE_BENCH_RUNS` sets the number of runs (default 12; at least 5);
//! `SNAPGATE_BENCH_SKIP_COLD=1` leaves out the cold boots.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use snapgate::config::StartFrom;
use snapgate::net::Network;
use snapgate::pool::Factory;
use snapgate::runtime::{self, CodeSource, RuntimeFactory, StartSpec};
use snapgate::testing::{runtime_gateway_config, shared_snapshot_dir};
use snapgate::vmm::{VmId, Vmm};

/// Runs of each measure: `SNAPGATE_BENCH_RUNS` (default 12; at least 5).
fn runs() -> usize {
    std::env::var("SNAPGATE_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12)
        .max(5)
}

fn stats(name: &str, mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    format!(
        "| {name:<52} | {:>8.0} | {:>8.0} | {:>8.0} | {:>4} |",
        v[0],
        v[v.len() / 2],
        v[v.len() - 1],
        v.len()
    )
}

fn header(title: &str) {
    println!(
        "| {title:<52} | {:>8} | {:>8} | {:>8} | {:>4} |",
        "min", "median", "max", "runs"
    );
    println!(
        "|{:-<54}|{:-<10}|{:-<10}|{:-<10}|{:-<6}|",
        "", "", "", "", ""
    );
}

fn write_app(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("server.js"),
        "require('http').createServer((req, res) => res.end('hello ' + req.url + '\\n'))\
         .listen(Number(process.env.PORT));\n",
    )
    .unwrap();
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs = runs();
    let code = tempfile::tempdir().unwrap();
    let app_dir = code.path().join("bench");
    write_app(&app_dir);
    let state = tempfile::tempdir().unwrap();
    let pool = "{ min_warm: 0, max_instances: 1, idle_timeout: 1s, hold_timeout: 60s }";
    let apps = format!(
        "  shared:\n    hosts: [shared.test]\n    runtime: {{ name: node, code: {d}, main: server.js }}\n    pool: {pool}\n\
         \x20 solo:\n    hosts: [solo.test]\n    runtime: {{ name: node, code: {d}, main: server.js, snapshot: app }}\n    pool: {pool}\n",
        d = app_dir.display()
    );
    let cfg = runtime_gateway_config(state.path(), "sgbr", 1, &apps, &shared_snapshot_dir());
    let state_path = state.path().to_owned();
    let gw = snapgate::testing::TestGateway::start(state, &cfg).await;
    let stock = gw.running().runtime("node").unwrap();
    let mut rows = Vec::new();

    for (app, label) in [
        ("shared", "warm runtime clone + code attach + app start"),
        ("solo", "per-app snapshot clone"),
    ] {
        let pool = gw.pool(app).clone();
        let mut v = Vec::new();
        for _ in 0..runs {
            wait_until("the app at zero and a warm runtime clone", || {
                pool.stats().instances + pool.stats().restoring == 0 && stock.stock().0 == 1
            })
            .await;
            // A fresh client: no kept-alive connection to the gateway either.
            let client = reqwest::Client::new();
            let t = Instant::now();
            let resp = client
                .get(format!("http://{}/", gw.running().listen))
                .header("host", format!("{app}.test"))
                .send()
                .await
                .unwrap();
            v.push(t.elapsed().as_secs_f64() * 1e3);
            assert_eq!(resp.status(), 200);
            resp.bytes().await.unwrap();
        }
        rows.push(stats(label, v));
    }

    // The steps of a runtime-clone start, from the instance's timings.
    let rt_cfg = &cfg.runtimes["node"];
    let app_cfg = cfg.apps["shared"].runtime.clone().unwrap();
    assert_eq!(app_cfg.snapshot, StartFrom::Runtime);
    let start = StartSpec::new("shared", &app_cfg, rt_cfg);
    let factory = RuntimeFactory::new(
        stock.clone(),
        CodeSource::new(
            "shared",
            &app_dir,
            &state_path.join("code/bench-direct"),
            16,
        ),
        start.clone(),
    );
    let mut steps: Vec<(&str, Vec<f64>)> = ["attach", "start", "ready"]
        .into_iter()
        .map(|s| (s, Vec::new()))
        .collect();
    let mut whole = Vec::new();
    for i in 0..runs {
        wait_until("a warm runtime clone", || stock.stock().0 == 1).await;
        let t = Instant::now();
        let vm = factory
            .start(VmId::new(format!("direct-{i}")))
            .await
            .unwrap();
        whole.push(t.elapsed().as_secs_f64() * 1e3);
        let timings = vm.timings();
        for (name, v) in &mut steps {
            // `ready` is recorded twice (runtime clone, then app): the app's
            // is the last.
            let d = timings.last(name).expect("step recorded");
            v.push(d.as_secs_f64() * 1e3);
        }
        factory.stop(vm).await.unwrap();
    }

    // Cold boot: the runtime image with the app's code disk, no snapshot
    // (left out with SNAPGATE_BENCH_SKIP_COLD=1: it takes minutes).
    let skip_cold = std::env::var_os("SNAPGATE_BENCH_SKIP_COLD").is_some_and(|v| v == "1");
    let vmm: Arc<dyn Vmm> = snapgate::gateway::driver(&cfg).unwrap();
    let net = Network::new(cfg.network.clone()).unwrap();
    let image = CodeSource::new("cold", &app_dir, &state_path.join("code/cold"), 16)
        .current()
        .unwrap();
    let spec = runtime::app_image(rt_cfg, &image.path);
    if !skip_cold {
        let mut cold = Vec::new();
        for i in 0..runs {
            let t = Instant::now();
            let tap = net.create_tap().await.unwrap();
            let mut vm = vmm
                .boot(VmId::new(format!("cold-{i}")), &spec, tap)
                .await
                .unwrap();
            snapgate::vmm::ready::wait_ready(vmm.as_ref(), &mut vm, spec.ready_timeout)
                .await
                .unwrap();
            runtime::start_app(vmm.as_ref(), &mut vm, None, &start)
                .await
                .unwrap();
            cold.push(t.elapsed().as_secs_f64() * 1e3);
            vmm.destroy(vm).await.unwrap();
        }
        rows.push(stats("cold boot + runtime load + app start", cold));
    }
    gw.stop().await;

    println!();
    println!(
        "snapgate runtime-app benchmark: QEMU {}, Node.js runtime guest (256 MiB, 1 vCPU), 2 host cores",
        vmm.accel()
    );
    header("claim to first byte (ms)");
    for row in rows {
        println!("{row}");
    }
    println!();
    println!(
        "| {:<52} | {:>8} | {:>8} | {:>8} | {:>4} |",
        "steps of a runtime-clone start (ms)", "min", "median", "max", "runs"
    );
    println!(
        "|{:-<54}|{:-<10}|{:-<10}|{:-<10}|{:-<6}|",
        "", "", "", "", ""
    );
    println!(
        "{}",
        stats("factory start, warm clone taken (all steps)", whole)
    );
    for (name, v) in steps {
        let label = match name {
            "attach" => "  attach: code image copied into the clone's slot",
            "start" => "  start: agent flushes, mounts, hands over main",
            _ => "  ready: app loaded, first 200 on its ready_path",
        };
        println!("{}", stats(label, v));
    }
}
