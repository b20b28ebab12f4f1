//! Gateway benchmark with real VMs: cold start through the gateway (app at
//! zero), warm request latency, and throughput with concurrent clients.
//! Prints a table.
//!
//!     SNAPGATE_GUEST_DIR=$(scripts/build-guest) cargo bench --features vm-tests --bench gateway

use std::time::{Duration, Instant};

use snapgate::testing::{gateway_config, shared_snapshot_dir};

fn stats(name: &str, unit: &str, mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    let pct = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    format!(
        "| {name:<40} | {:>8.2} | {:>8.2} | {:>8.2} | {:>8.2} | {unit:<4} | {:>5} |",
        v[0],
        pct(0.5),
        pct(0.95),
        v[v.len() - 1],
        v.len()
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let state = tempfile::tempdir().unwrap();
    let cfg = gateway_config(
        state.path(),
        "sgbg",
        "{ min_warm: 0, max_instances: 2, max_concurrency: 16, idle_timeout: 1s, hold_timeout: 60s }",
            &shared_snapshot_dir(),
    );
    let gw = snapgate::testing::TestGateway::start(state, &cfg).await;
    let pool = gw.pool("app").clone();
    let http = reqwest::Client::new();
    let url = format!("http://{}/", gw.running().listen);
    let get = || http.get(&url).header("host", "app.test").send();
    let mut rows = Vec::new();

    // Cold start: app at zero, one request, full answer.
    let mut cold = Vec::new();
    for _ in 0..10 {
        let deadline = Instant::now() + Duration::from_secs(30);
        while pool.stats().instances + pool.stats().restoring > 0 {
            assert!(Instant::now() < deadline, "not reaped");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // A fresh client: no kept-alive connection to the gateway either.
        let client = reqwest::Client::new();
        let t = Instant::now();
        let resp = client
            .get(&url)
            .header("host", "app.test")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.bytes().await.unwrap();
        cold.push(t.elapsed().as_secs_f64() * 1e3);
    }
    rows.push(stats("cold start via gateway (app at zero)", "ms", cold));

    // Warm: sequential requests on a kept-alive connection.
    get().await.unwrap().bytes().await.unwrap();
    let mut warm = Vec::new();
    for _ in 0..300 {
        let t = Instant::now();
        let resp = get().await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.bytes().await.unwrap();
        warm.push(t.elapsed().as_secs_f64() * 1e3);
    }
    rows.push(stats("warm request, sequential", "ms", warm));

    // Throughput: 32 clients x 30 requests.
    let t = Instant::now();
    let clients = (0..32).map(|_| {
        let http = http.clone();
        let url = url.clone();
        async move {
            for _ in 0..30 {
                let r = http
                    .get(&url)
                    .header("host", "app.test")
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                r.bytes().await.unwrap();
            }
        }
    });
    futures::future::join_all(clients).await;
    let rps = 960.0 / t.elapsed().as_secs_f64();
    let peak = pool.stats().peak;
    gw.stop().await;

    println!();
    println!("snapgate gateway benchmark: QEMU, test guest, 2 host cores");
    println!(
        "| {:<40} | {:>8} | {:>8} | {:>8} | {:>8} | {:<4} | {:>5} |",
        "measure", "min", "median", "p95", "max", "unit", "runs"
    );
    println!(
        "|{:-<42}|{:-<10}|{:-<10}|{:-<10}|{:-<10}|{:-<6}|{:-<7}|",
        "", "", "", "", "", "", ""
    );
    for row in rows {
        println!("{row}");
    }
    println!("throughput, 32 concurrent clients: {rps:.0} requests/s on at most {peak} VMs");
}
