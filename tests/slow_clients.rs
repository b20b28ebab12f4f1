//! Slow clients against the real gateway: Debian's `slowhttptest` (which
//! `scripts/test` installs) attacks a static app on a loopback upstream in
//! its three modes, one after another: slow headers (Slowloris), slow
//! body (R-U-Dead-Yet) and slow read. Meanwhile a well-behaved client
//! sends fresh requests on new connections, 5 a second; every one must
//! succeed within 2 s. Only loopback traffic.
//!
//! Routing: slowhttptest has no flag for the Host header; it sends the
//! URL's host. Told to go through an HTTP proxy (`-d`), it connects to the
//! proxy's address and sends absolute-form requests (`GET http://slow.test/
//! HTTP/1.1` with `Host: slow.test`), and never resolves the URL's host.
//! The gateway is that "proxy": it routes by the request's authority, so
//! the app is an ordinary named host, `slow.test`, with no DNS and no IP
//! literal among its hosts.
//!
//! The well-behaved client connects from the attacker's own address,
//! 127.0.0.1, and the per-client connection cap is raised out of the way
//! (`limits.max_connections_per_client: 100000`): every attacking
//! connection is admitted, so what keeps the gateway serving is its
//! timeouts (`header_read_timeout`, `body_read_timeout`, `send_timeout`)
//! and its cost per idle connection, not the cap (which, at its default of
//! 256, would refuse most of the attack outright).
//!
//! Gated on `vm-tests` with the VM tests: only `scripts/test` installs
//! slowhttptest.
#![cfg(feature = "vm-tests")]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;

/// How long each mode runs.
const LENGTH_S: u64 = 20;
/// slowhttptest's connections per mode.
const CONNECTIONS: u32 = 500;
/// The well-behaved client's requests per second, and its timeout.
const GOOD_PER_SECOND: u64 = 5;
const GOOD_TIMEOUT: Duration = Duration::from_secs(5);
/// The slowest a well-behaved request may be.
const GOOD_MAX: Duration = Duration::from_secs(2);
/// What the app answers slowhttptest's `/`: large enough that a client
/// reading slowly blocks the gateway's writes.
const PAGE: usize = 1 << 20;

/// Requests the upstream served, by kind.
#[derive(Default)]
struct Served {
    /// slowhttptest's (its `Referer: TESTING_PURPOSES_ONLY`).
    attack: AtomicU64,
    /// The well-behaved client's (`/ping`).
    good: AtomicU64,
}

/// The app: reads every request body whole (as an app would), then
/// answers `/ping` with `pong` and anything else with a 1 MiB page.
async fn upstream(served: Arc<Served>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let page = bytes::Bytes::from(vec![b'x'; PAGE]);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (served, page) = (served.clone(), page.clone());
            let service =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (served, page) = (served.clone(), page.clone());
                    async move {
                        let attack = req
                            .headers()
                            .get("referer")
                            .is_some_and(|r| r == "TESTING_PURPOSES_ONLY");
                        let ping = req.uri().path() == "/ping";
                        if attack {
                            served.attack.fetch_add(1, Ordering::Relaxed);
                        } else if ping {
                            served.good.fetch_add(1, Ordering::Relaxed);
                        }
                        // A body cut off by the gateway: answer anyway
                        // (nobody reads it).
                        let _ = req.into_body().collect().await;
                        let body = if ping {
                            bytes::Bytes::from_static(b"pong\n")
                        } else {
                            page
                        };
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(body),
                        ))
                    }
                });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    addr
}

/// A gateway with small timeouts and the static app `slow` on
/// `slow.test`.
async fn gateway(
    upstream: std::net::SocketAddr,
) -> (tempfile::TempDir, snapgate::gateway::Running) {
    let state = tempfile::tempdir().unwrap();
    let file = state.path().join("proxy.yaml");
    std::fs::write(
        &file,
        format!(
            "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\n\
             header_read_timeout: 2s\nbody_read_timeout: 2s\nsend_timeout: 2s\n\
             limits: {{ max_connections_per_client: 100000 }}\n\
             state_dir: {}\nnetwork: {{ tap_prefix: sgsl }}\n\
             apps:\n  slow:\n    hosts: [slow.test]\n    upstream: {upstream}\n",
            state.path().display()
        ),
    )
    .unwrap();
    let config = snapgate::config::Config::load(&file).unwrap_or_else(|e| panic!("{e}"));
    let running = snapgate::gateway::start(&config, &mut std::io::sink())
        .await
        .unwrap();
    (state, running)
}

/// slowhttptest runs 500 connections from one process, the gateway holds
/// both their ends' worth of sockets: raise the soft limit on open files
/// to the hard one (with util-linux's prlimit) if it is low.
fn raise_open_files() {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let nums: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    let soft: u64 = nums[0].parse().unwrap_or(u64::MAX);
    if soft >= 8192 {
        return;
    }
    let hard = nums[1];
    let ok = std::process::Command::new("prlimit")
        .arg(format!("--pid={}", std::process::id()))
        .arg(format!("--nofile={hard}:{hard}"))
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "open files limited to {soft}; prlimit could not raise it"
    );
}

/// One slowhttptest run, killed if dropped.
struct Attack {
    child: tokio::process::Child,
}

impl Attack {
    fn start(
        mode: &str,
        gateway: std::net::SocketAddr,
        stats: &std::path::Path,
        secs: u64,
    ) -> Attack {
        let mut cmd = tokio::process::Command::new("slowhttptest");
        cmd.arg(mode)
            .args(["-c", &CONNECTIONS.to_string()])
            .args(["-r", "200"])
            .args(["-l", &secs.to_string()])
            .args(["-p", "3"])
            .args(["-u", "http://slow.test/"])
            .args(["-d", &gateway.to_string()])
            .arg("-g")
            .arg("-o")
            .arg(stats);
        match mode {
            // A header line, or a few body bytes, every second: inside the
            // gateway's 2 s timeouts between reads.
            "-H" => {
                cmd.args(["-i", "1"]);
            }
            "-B" => {
                cmd.args(["-i", "1", "-s", "8192", "-x", "10"]);
            }
            // Three pipelined requests per connection, a 512-1024 byte
            // receive window, 32 bytes read every 5 s.
            "-X" => {
                cmd.args(["-k", "3", "-w", "512", "-y", "1024", "-n", "5", "-z", "32"]);
            }
            _ => unreachable!(),
        }
        let child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start slowhttptest");
        Attack { child }
    }
}

/// slowhttptest's last status block and exit status, on one line.
fn final_status(output: &str) -> String {
    let mut plain = String::new();
    let mut chars = output.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ params final-byte.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    let Some(at) = plain.rfind("slow HTTP test status on") else {
        return format!("(no status in {plain:?})");
    };
    let mut fields = Vec::new();
    for line in plain[at..].lines() {
        let line = line.trim();
        if let Some(sec) = line
            .strip_prefix("slow HTTP test status on ")
            .and_then(|l| l.strip_suffix(':'))
        {
            fields.push(format!("at {}", sec.trim_end_matches(" second")));
        } else if let Some((k, v)) = line.split_once(':') {
            if [
                "initializing",
                "pending",
                "connected",
                "error",
                "closed",
                "service available",
            ]
            .contains(&k.trim())
            {
                fields.push(format!("{} {}", k.trim(), v.trim()));
            } else if k.trim() == "Exit status" {
                fields.push(v.trim().to_owned());
            }
        }
    }
    fields.join(", ")
}

/// The most connections slowhttptest held open at once, from its CSV
/// (`Seconds,Closed,Pending,Connected,Service Available`).
fn peak_connected(csv: &std::path::Path) -> Option<u64> {
    let text = std::fs::read_to_string(csv).ok()?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next()?.split(',').map(str::trim).collect();
    let col = header
        .iter()
        .position(|h| h.eq_ignore_ascii_case("connected"))?;
    lines
        .filter_map(|l| l.split(',').nth(col)?.trim().parse().ok())
        .max()
}

/// What the well-behaved client saw in one mode.
struct Good {
    sent: usize,
    ok: usize,
    /// Every request's time, failed ones included, sorted.
    times: Vec<Duration>,
    errors: Vec<String>,
}

impl Good {
    fn percentile(&self, p: f64) -> Duration {
        if self.times.is_empty() {
            return Duration::ZERO;
        }
        let at = ((self.times.len() as f64 * p).ceil() as usize).clamp(1, self.times.len());
        self.times[at - 1]
    }

    fn max(&self) -> Duration {
        self.times.last().copied().unwrap_or_default()
    }
}

/// Sends a fresh `GET /ping` on a new connection every
/// 1/5 s until `stop` fires, each with a 5 s timeout; then waits for them
/// all.
async fn well_behaved(
    gateway: std::net::SocketAddr,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Good {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(GOOD_TIMEOUT)
        .build()
        .unwrap();
    let url = format!("http://{gateway}/ping");
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / GOOD_PER_SECOND));
    let mut sent = Vec::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {}
        }
        let req = client.get(&url).header("host", "slow.test");
        sent.push(tokio::spawn(async move {
            let started = Instant::now();
            let result = match req.send().await {
                Ok(resp) => {
                    let status = resp.status();
                    match resp.text().await {
                        Ok(body) if status == 200 && body == "pong\n" => Ok(()),
                        Ok(body) => Err(format!("{status}: {body:?}")),
                        Err(e) => Err(format!("{status}, body: {e}")),
                    }
                }
                Err(e) => Err(chain(&e)),
            };
            (started.elapsed(), result)
        }));
    }
    let mut good = Good {
        sent: sent.len(),
        ok: 0,
        times: Vec::new(),
        errors: Vec::new(),
    };
    for handle in sent {
        let (took, result) = handle.await.unwrap();
        good.times.push(took);
        match result {
            Ok(()) => good.ok += 1,
            Err(e) => good.errors.push(format!("after {took:?}: {e}")),
        }
    }
    good.times.sort();
    good
}

/// The gateway's `snapgate_load_shed_total` samples, on one line.
async fn load_shed(admin: std::net::SocketAddr) -> String {
    let text = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let samples: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("snapgate_load_shed_total"))
        .map(|l| l.replace("{reason=", "").replace(['}', '"'], ""))
        .collect();
    if samples.is_empty() {
        "-".into()
    } else {
        samples.join(" ")
    }
}

/// An error and its sources, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

/// One mode's results.
struct Row {
    name: &'static str,
    mode: &'static str,
    runs: u32,
    status: String,
    peak: String,
    reached_app: u64,
    shed: String,
    sent: usize,
    ok: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

fn ms(d: Duration) -> String {
    format!("{}", d.as_millis())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_clients_do_not_starve_a_well_behaved_one() {
    let on_path = std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|p| p.join("slowhttptest").exists())
    });
    assert!(on_path, "run scripts/test, which installs slowhttptest");
    raise_open_files();

    let served = Arc::new(Served::default());
    let (state, gw) = gateway(upstream(served.clone()).await).await;
    let stats = tempfile::tempdir().unwrap();

    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for (mode, name) in [
        ("-H", "slow headers"),
        ("-B", "slow body"),
        ("-X", "slow read"),
    ] {
        let attack_before = served.attack.load(Ordering::Relaxed);
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let good = tokio::spawn(well_behaved(gw.listen, stopped));
        // slowhttptest opens its connections once and ends when none is
        // left (the gateway cuts slow headers at 2 s): run it again until
        // the mode's time is up.
        let started = Instant::now();
        let mut runs = 0;
        let mut peak = None;
        let out = loop {
            runs += 1;
            let left = Duration::from_secs(LENGTH_S).saturating_sub(started.elapsed());
            let prefix = stats.path().join(format!("{}-{runs}", &mode[1..]));
            let attack = Attack::start(mode, gw.listen, &prefix, left.as_secs().max(1));
            let out = tokio::time::timeout(
                left + Duration::from_secs(60),
                attack.child.wait_with_output(),
            )
            .await
            .unwrap_or_else(|_| panic!("slowhttptest {mode} still runs a minute after its length"))
            .expect("slowhttptest runs");
            peak = peak.max(peak_connected(&prefix.with_extension("csv")));
            if !out.status.success()
                || started.elapsed() + Duration::from_secs(1) >= Duration::from_secs(LENGTH_S)
            {
                break out;
            }
        };
        let _ = stop.send(());
        let good = good.await.unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let status = final_status(&stdout);
        let peak = peak.map_or("?".into(), |p| p.to_string());
        let reached_app = served.attack.load(Ordering::Relaxed) - attack_before;
        rows.push(Row {
            name,
            mode,
            runs,
            status,
            peak,
            reached_app,
            shed: load_shed(gw.admin).await,
            sent: good.sent,
            ok: good.ok,
            p50: good.percentile(0.5),
            p99: good.percentile(0.99),
            max: good.max(),
        });
        if !out.status.success() {
            failures.push(format!(
                "{name}: slowhttptest exited {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        if good.sent == 0 || good.ok != good.sent {
            failures.push(format!(
                "{name}: {} of {} well-behaved requests failed: {:#?}",
                good.sent - good.ok,
                good.sent,
                good.errors
            ));
        }
        if good.max() > GOOD_MAX {
            failures.push(format!(
                "{name}: a well-behaved request took {:?} (p50 {:?}, p99 {:?})",
                good.max(),
                good.percentile(0.5),
                good.percentile(0.99)
            ));
        }
    }
    // The slow-read attack is only one if its requests reached the app and
    // got its page to read slowly.
    let slow_read_served = rows[2].reached_app;

    eprintln!("\nslow clients against snapgate (header_read_timeout, body_read_timeout, send_timeout 2 s; {CONNECTIONS} slowhttptest connections per run, {LENGTH_S} s per mode):");
    eprintln!(
        "{:<13} {:<4} {:>4} {:>8} {:>6} | {:>5} {:>4} {:>6} {:>6} {:>6} {:>6} | {:<30} | slowhttptest's final status (last run)",
        "mode", "flag", "runs", "peak con", "at app", "sent", "ok", "ok %", "p50", "p99", "max", "load shed"
    );
    for r in &rows {
        eprintln!(
            "{:<13} {:<4} {:>4} {:>8} {:>6} | {:>5} {:>4} {:>6.1} {:>6} {:>6} {:>6} | {:<30} | {}",
            r.name,
            r.mode,
            r.runs,
            r.peak,
            r.reached_app,
            r.sent,
            r.ok,
            if r.sent == 0 {
                0.0
            } else {
                r.ok as f64 * 100.0 / r.sent as f64
            },
            ms(r.p50),
            ms(r.p99),
            ms(r.max),
            r.shed,
            r.status,
        );
    }
    eprintln!("(runs: slowhttptest runs in the mode's time; peak con: most connections a run held at once (its CSV); at app: its requests that reached the app; sent..max: the well-behaved client, times in ms; load shed: snapgate_load_shed_total so far)\n");

    assert!(failures.is_empty(), "{failures:#?}");
    assert!(
        slow_read_served > 0,
        "no slow-read request reached the app: the attack tested nothing"
    );
    assert!(served.good.load(Ordering::Relaxed) > 0);
    gw.shutdown().await;
    drop(state);
}
