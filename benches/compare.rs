//! snapgate side by side with nginx, with real clients and real VMs: the
//! benchmark `scripts/bench` runs. Prints each table as it is measured and
//! writes them all, with the method, to `$SNAPGATE_BENCH_REPORT` (default
//! `target/bench/BENCHMARKS.md`).
//!
//! Sections (`SNAPGATE_BENCH_SECTIONS`, comma-separated, default all):
//! 1. `warm`: the warm path. A backend (nginx, one worker, a fixed
//!    `200 ok`) direct, through nginx as a keep-alive reverse proxy with as
//!    many workers as snapgate has threads and the same forwarding headers
//!    snapgate sets, through snapgate (a static app), and, as a
//!    reference on HTTP/1.1, through the least a hyper-based proxy does
//!    ([`bare_forward`]). Closed loop
//!    (wrk, h2load) and open loop at a fixed rate (oha, latency corrected);
//!    HTTP/1.1, HTTPS and HTTP/2. Then one connection, one request at a
//!    time, to a static app and to a VM app's warm instance.
//! 2. `cold`: claim to first byte (a fresh client connection) for a warm
//!    hit, a clone restored on the request path, a runtime app (a warm
//!    runtime clone plus the app's start) and a cold boot (the VMM layer:
//!    boot, readiness, first byte), and the gateway's own share of the
//!    first two: the client's time less the start-to-ready time the pool
//!    recorded (`snapgate_restore_duration_seconds`).
//! 3. `burst`: 100 and 500 concurrent requests from 10 client addresses
//!    onto an app at zero with `max_instances: 4`.
//! 4. `density`: 10, 25, 50 warm clones (`SNAPGATE_BENCH_DENSITY`).
//! 5. `idle`: 10,000 idle kept-alive client connections.
//! 6. `isolation`: claim to first byte for a clone restored on the request
//!    path with the VMM jail and the fence on (the defaults) and with every
//!    part of both off, alternating between the two gateways run by run.
//! 7. `cluster`: two nodes on loopback sharing a catalog in one etcd
//!    member (Debian's `etcd-server`); one warm instance on node B. One
//!    connection, one request at a time, to B (a local warm hit) and to
//!    A, which forwards to B's instance (a cluster-wide warm hit): what
//!    the forward to a peer adds, p50 and p99.
//!
//! Run through `scripts/bench`, which installs the tools and builds the
//! guests; by hand:
//!
//!     SNAPGATE_OHA=target/tools/bin/oha cargo bench --features vm-tests --bench compare
//!
//! Knobs: `SNAPGATE_BENCH_RUNS` (warm-path runs per row, default 3),
//! `SNAPGATE_BENCH_SECONDS` (per run, default 8), `SNAPGATE_BENCH_COLD_RUNS`
//! (default 20), `SNAPGATE_BENCH_BOOT_RUNS` (cold boots, default 20),
//! `SNAPGATE_BENCH_RATE` (the open loop's requests per second, default
//! 10000), `SNAPGATE_BENCH_DENSITY` (clone counts, default `10,25,50`),
//! `SNAPGATE_BENCH_IDLE` (idle connections, default 10000).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use snapgate::testing::{
    linux_spec, node_runtime_spec, shared_snapshot_dir, test_guest_on_restore,
};

// ---------------------------------------------------------------- knobs

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn section_on(name: &str) -> bool {
    match std::env::var("SNAPGATE_BENCH_SECTIONS") {
        Ok(list) if !list.trim().is_empty() => list.split(',').any(|s| s.trim() == name),
        _ => true,
    }
}

fn oha() -> String {
    std::env::var("SNAPGATE_OHA").unwrap_or_else(|_| "oha".into())
}

// ---------------------------------------------------------------- stats

/// Sorted samples.
struct Samples(Vec<f64>);

impl Samples {
    fn new(mut v: Vec<f64>) -> Samples {
        v.sort_by(f64::total_cmp);
        Samples(v)
    }
    /// Nearest-rank percentile, `p` in 0..=100.
    fn pct(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * self.0.len() as f64).ceil() as usize;
        self.0[rank.clamp(1, self.0.len()) - 1]
    }
    fn median(&self) -> f64 {
        self.pct(50.0)
    }
    fn min(&self) -> f64 {
        self.0.first().copied().unwrap_or(f64::NAN)
    }
    fn max(&self) -> f64 {
        self.0.last().copied().unwrap_or(f64::NAN)
    }
    /// `median (min–max)` of the runs.
    fn spread(&self, digits: usize) -> String {
        if self.0.iter().any(|v| v.is_nan()) {
            return "–".to_owned();
        }
        if self.0.len() == 1 {
            return format!("{:.digits$}", self.0[0]);
        }
        format!(
            "{:.digits$} ({:.digits$}–{:.digits$})",
            self.median(),
            self.min(),
            self.max()
        )
    }
}

// ---------------------------------------------------------------- processes

/// A child process, stopped (SIGTERM, then SIGKILL after 30 s) on drop.
struct Proc {
    child: std::process::Child,
    name: &'static str,
}

impl Proc {
    fn spawn(name: &'static str, cmd: &mut Command, log: &Path) -> Proc {
        let out = std::fs::File::create(log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Proc { child, name }
    }
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} did not stop on SIGTERM: killed", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `N` distinct free loopback ports (each held until all are chosen, then
/// released for the servers to take).
fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    std::array::from_fn(|i| held[i].local_addr().expect("addr").port())
}

/// Waits until `port` accepts connections, or panics after `within`
/// (naming the log to read). Polls: a port has no event to wait on.
fn wait_port(port: u16, within: Duration, log: &Path) {
    let deadline = Instant::now() + within;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nothing listens on {port} after {within:?}; see {}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Children of `pid` (its threads' children).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let text = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// The processes whose CPU time is a server's: the one process, or it
/// and its children (nginx's master and workers; not the gateway's, whose
/// children are its VMs).
#[derive(Clone, Copy, Debug)]
enum Server {
    Alone(u32),
    WithChildren(u32),
}

/// User and system CPU time of `server` so far, in clock ticks
/// (`/proc/<pid>/stat` fields 14 and 15, proc(5)).
fn cpu_ticks(server: Server) -> u64 {
    let pids = match server {
        Server::Alone(pid) => vec![pid],
        Server::WithChildren(pid) => {
            let mut v = children(pid);
            v.push(pid);
            v
        }
    };
    pids.iter()
        .map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // The fields after the command, which is in parentheses and
            // may hold spaces: state is field 3, utime 14, stime 15.
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<u64> = rest
                .split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|v| v.parse().ok())
                .collect();
            f.iter().sum::<u64>()
        })
        .sum()
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux).
fn clock_ticks_per_second() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// A `kB` field of `/proc/<pid>/<file>` in MiB (0 when absent).
fn proc_mib(pid: u32, file: &str, field: &str) -> f64 {
    kb_field_mib(&format!("/proc/{pid}/{file}"), field)
}

/// A `kB` field of `/proc/meminfo` in MiB.
fn meminfo_mib(field: &str) -> f64 {
    kb_field_mib("/proc/meminfo", field)
}

/// The sum of the `field` lines (`name: N kB`) of file `path`, in MiB.
fn kb_field_mib(path: &str, field: &str) -> f64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with(field))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .sum::<f64>()
        / 1024.0
}

/// A table printed as measured and added to the report.
fn emit(report: &mut String, table: &str) {
    println!("{table}");
    report.push_str(table);
    report.push('\n');
}

fn command_version(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines().next().unwrap_or("").trim().to_owned()
        })
        .unwrap_or_else(|e| format!("{cmd}: {e}"))
}

// ---------------------------------------------------------------- peers

/// The bench's working directory with its certificate.
struct Dir {
    path: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Dir {
    fn new(path: PathBuf) -> Dir {
        std::fs::create_dir_all(&path).expect("bench dir");
        let ck = rcgen::generate_simple_self_signed(vec!["site.test".to_owned()]).expect("cert");
        let (cert, key) = (path.join("site.pem"), path.join("site.key"));
        std::fs::write(&cert, ck.cert.pem()).expect("write cert");
        std::fs::write(&key, ck.signing_key.serialize_pem()).expect("write key");
        Dir { path, cert, key }
    }
}

/// nginx with `conf` (its `http` block body), `workers` worker processes.
fn nginx(dir: &Dir, name: &'static str, workers: usize, http: &str) -> Proc {
    let conf = dir.path.join(format!("{name}.conf"));
    let prefix = dir.path.join(name);
    std::fs::create_dir_all(prefix.join("logs")).expect("nginx prefix");
    std::fs::write(
        &conf,
        format!(
            "worker_processes {workers};\ndaemon off;\npid {p}/nginx.pid;\n\
             error_log {p}/logs/error.log warn;\nworker_rlimit_nofile 65536;\n\
             events {{ worker_connections 20000; }}\n\
             http {{\n  access_log off;\n  keepalive_requests 1000000;\n  keepalive_timeout 120s;\n{http}\n}}\n",
            p = prefix.display()
        ),
    )
    .expect("nginx conf");
    let log = dir.path.join(format!("{name}.log"));
    Proc::spawn(
        name,
        Command::new("nginx")
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(&prefix),
        &log,
    )
}

/// The backend every warm-path row ends at: `200 ok` from one nginx worker.
fn backend(dir: &Dir, port: u16) -> Proc {
    let p = nginx(
        dir,
        "backend",
        1,
        &format!(
            "  server {{ listen 127.0.0.1:{port} backlog=4096; location / {{ return 200 \"ok\\n\"; }} }}"
        ),
    );
    wait_port(port, Duration::from_secs(10), &dir.path.join("backend.log"));
    p
}

/// nginx as the peer: a keep-alive reverse proxy to `backend`, on `http`
/// (plain) and `https` (TLS, HTTP/2 by ALPN), setting the forwarding
/// headers snapgate sets.
fn nginx_proxy(dir: &Dir, workers: usize, backend: u16, http: u16, https: u16) -> Proc {
    let p = nginx(
        dir,
        "nginx-proxy",
        workers,
        &format!(
            "  upstream app {{ server 127.0.0.1:{backend}; keepalive 64; }}\n\
             \x20 server {{\n\
             \x20   listen 127.0.0.1:{http} backlog=4096;\n\
             \x20   listen 127.0.0.1:{https} ssl http2 backlog=4096;\n\
             \x20   ssl_certificate {cert};\n    ssl_certificate_key {key};\n\
             \x20   ssl_protocols TLSv1.2 TLSv1.3;\n\
             \x20   location / {{\n\
             \x20     proxy_pass http://app;\n      proxy_http_version 1.1;\n\
             \x20     proxy_set_header Connection \"\";\n      proxy_set_header Host $host;\n\
             \x20     proxy_set_header X-Forwarded-For $remote_addr;\n\
             \x20     proxy_set_header X-Real-IP $remote_addr;\n\
             \x20     proxy_set_header X-Forwarded-Proto $scheme;\n\
             \x20     proxy_set_header X-Forwarded-Host $host;\n\
             \x20     proxy_set_header X-Forwarded-Port $server_port;\n\
             \x20     proxy_set_header Forwarded \"for=$remote_addr;host=$host;proto=$scheme\";\n\
             \x20     add_header Via \"1.1 nginx\";\n\
             \x20   }}\n  }}",
            cert = dir.cert.display(),
            key = dir.key.display(),
        ),
    );
    wait_port(
        http,
        Duration::from_secs(10),
        &dir.path.join("nginx-proxy.log"),
    );
    p
}

/// A running snapgate binary and its ports.
struct Gateway {
    proc: Proc,
    listen: u16,
    admin: u16,
    tls: Option<u16>,
    log: PathBuf,
    http: reqwest::Client,
}

/// The test guest as a VM app's `image:` (one YAML flow map).
fn vm_image() -> String {
    let mut spec = linux_spec();
    spec.on_restore = Some(test_guest_on_restore());
    serde_json::to_string(&spec).expect("spec")
}

impl Gateway {
    /// Starts `snapgate run` on a config of `body` (settings and `apps:`)
    /// with its own ports, state directory and taps; waits (up to 15 min:
    /// a first run builds snapshots) until it listens.
    fn start(dir: &Dir, name: &'static str, tls: bool, body: &str) -> Gateway {
        Gateway::start_on(dir, name, tls, "{ tap_prefix: sgcmp }", body)
    }

    /// [`Gateway::start`] with `network` (a YAML flow map) as its network
    /// settings.
    fn start_on(dir: &Dir, name: &'static str, tls: bool, network: &str, body: &str) -> Gateway {
        let [listen] = free_ports();
        Gateway::start_with(dir, name, tls, listen, network, body)
    }

    /// [`Gateway::start_on`], listening on `listen` (a port chosen before
    /// the config is written: a cluster node advertises it).
    fn start_on_port(
        dir: &Dir,
        name: &'static str,
        listen: u16,
        network: &str,
        body: &str,
    ) -> Gateway {
        Gateway::start_with(dir, name, false, listen, network, body)
    }

    fn start_with(
        dir: &Dir,
        name: &'static str,
        tls: bool,
        listen: u16,
        network: &str,
        body: &str,
    ) -> Gateway {
        let [admin, tls_any] = free_ports();
        let tls_port = tls.then_some(tls_any);
        let state = dir.path.join(format!("{name}-state"));
        let _ = std::fs::remove_dir_all(&state);
        let mut text = format!(
            "listen: 127.0.0.1:{listen}\nadmin: 127.0.0.1:{admin}\nshutdown_grace: 5s\naccess_log: false\n\
             state_dir: {}\nsnapshot_dir: {}\nnetwork: {network}\n",
            state.display(),
            shared_snapshot_dir().display()
        );
        if let Some(port) = tls_port {
            write!(
                text,
                "tls:\n  listen: 127.0.0.1:{port}\n  default_host: site.test\n  certificates:\n    - {{ hosts: [site.test], cert: {}, key: {} }}\n",
                dir.cert.display(),
                dir.key.display()
            )
            .unwrap();
        }
        text.push_str(body);
        let file = dir.path.join(format!("{name}.yaml"));
        std::fs::write(&file, text).expect("write config");
        let log = dir.path.join(format!("{name}.log"));
        let proc = Proc::spawn(
            "snapgate",
            Command::new(env!("CARGO_BIN_EXE_snapgate"))
                .arg("run")
                .arg("--config")
                .arg(&file),
            &log,
        );
        wait_port(admin, Duration::from_secs(900), &log);
        wait_port(listen, Duration::from_secs(60), &log);
        Gateway {
            proc,
            listen,
            admin,
            tls: tls_port,
            log,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("client"),
        }
    }

    async fn metrics(&self) -> String {
        self.try_metrics()
            .await
            .expect("the admin listener answers")
    }

    /// The metrics, or why there are none yet (a gateway still building
    /// its snapshots answers nothing).
    async fn try_metrics(&self) -> reqwest::Result<String> {
        self.http
            .get(format!("http://127.0.0.1:{}/metrics", self.admin))
            .send()
            .await?
            .text()
            .await
    }

    /// The sum of every sample whose name and labels start with `prefix`.
    async fn metric(&self, prefix: &str) -> f64 {
        sum_samples(&self.metrics().await, prefix)
    }

    /// Waits until `metric(prefix) == want`, or panics after `within`.
    /// Polls the metrics: they are what an operator sees, and the
    /// gateway is another process.
    async fn until(&self, prefix: &str, want: f64, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let got = match self.try_metrics().await {
                Ok(text) => sum_samples(&text, prefix),
                Err(_) => f64::NAN,
            };
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{prefix} stayed {got}, not {want}, for {within:?}; see {}",
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn sum_samples(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// ---------------------------------------------------------------- load tools

/// One load run's figures; latencies in ms.
#[derive(Clone, Debug, Default)]
struct Load {
    rps: f64,
    p50: f64,
    p99: f64,
    max: f64,
    errors: u64,
    /// The server's CPU time (user and system) per request, in µs, where
    /// it was measured.
    cpu_us: Option<f64>,
}

/// A duration as wrk prints it (`812.00us`, `1.20ms`, `2.00s`) in ms.
fn wrk_ms(s: &str) -> f64 {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
    let n: f64 = num.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => f64::NAN,
    }
}

/// wrk closed loop on `host`: `threads` threads, `conns` connections,
/// `seconds`.
fn wrk(url: &str, host: &str, threads: usize, conns: usize, seconds: u64) -> Load {
    let out = Command::new("wrk")
        .args([
            &format!("-t{threads}"),
            &format!("-c{conns}"),
            &format!("-d{seconds}s"),
            "--latency",
            "-H",
            &format!("Host: {host}"),
            url,
        ])
        .output()
        .expect("run wrk");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut load = Load::default();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["Requests/sec:", v] => load.rps = v.parse().unwrap_or(f64::NAN),
            ["Latency", _avg, _sd, max, ..] => load.max = wrk_ms(max),
            ["50%", v] => load.p50 = wrk_ms(v),
            ["99%", v] => load.p99 = wrk_ms(v),
            ["Non-2xx", "or", "3xx", "responses:", n] => load.errors += n.parse().unwrap_or(0),
            ["Socket", "errors:", rest @ ..] => {
                load.errors += rest
                    .iter()
                    .filter_map(|t| t.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>()
            }
            _ => {}
        }
    }
    assert!(load.rps > 0.0, "wrk {url} measured nothing:\n{text}");
    load
}

/// h2load over TLS (HTTP/2 by ALPN): `conns` connections, `streams`
/// concurrent streams each, for `seconds`.
fn h2load(url: &str, conns: usize, streams: usize, seconds: u64) -> Load {
    let out = Command::new("h2load")
        .args([
            "-t2",
            &format!("-c{conns}"),
            &format!("-m{streams}"),
            "-D",
            &seconds.to_string(),
            "-H",
            ":authority: site.test",
            url,
        ])
        .output()
        .expect("run h2load");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut load = Load::default();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["finished", "in", _, rps, "req/s,", ..] => {
                load.rps = rps.trim_end_matches(',').parse().unwrap_or(f64::NAN)
            }
            ["requests:", .., failed, "failed,", errored, "errored,", _, "timeout"] => {
                load.errors =
                    failed.parse::<u64>().unwrap_or(0) + errored.parse::<u64>().unwrap_or(0)
            }
            // h2load gives min/max/mean/sd of request times, no percentiles.
            ["time", "for", "request:", _min, max, mean, ..] => {
                load.p50 = wrk_ms(mean);
                load.max = wrk_ms(max);
                load.p99 = f64::NAN;
            }
            _ => {}
        }
    }
    assert!(load.rps > 0.0, "h2load {url} measured nothing:\n{text}");
    load
}

/// oha open loop: `rate` requests per second over `conns` connections for
/// `seconds`, latencies corrected for coordinated omission; with the CPU
/// time `server` took per request over the run.
fn oha_rate(url: &str, rate: u64, conns: usize, seconds: u64, server: Server) -> Load {
    let ticks_before = cpu_ticks(server);
    let out = Command::new(oha())
        .args([
            "-z",
            &format!("{seconds}s"),
            "-q",
            &rate.to_string(),
            "-c",
            &conns.to_string(),
            "--latency-correction",
            "--no-tui",
            "--output-format",
            "json",
            "-H",
            "Host: site.test",
            url,
        ])
        .output()
        .expect("run oha (SNAPGATE_OHA)");
    let ticks = cpu_ticks(server).saturating_sub(ticks_before);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "oha output ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let ms = |p: &str| v["latencyPercentiles"][p].as_f64().unwrap_or(f64::NAN) * 1000.0;
    let codes = v["statusCodeDistribution"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let non_200: u64 = codes
        .iter()
        .filter(|(k, _)| k.as_str() != "200")
        .filter_map(|(_, n)| n.as_u64())
        .sum();
    // Requests cut off by the run's end are not errors.
    let errors: u64 = v["errorDistribution"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| !k.contains("aborted due to deadline"))
                .filter_map(|(_, n)| n.as_u64())
                .sum()
        })
        .unwrap_or(0);
    let answered: u64 = codes.values().filter_map(|n| n.as_u64()).sum();
    Load {
        rps: v["summary"]["requestsPerSec"].as_f64().unwrap_or(f64::NAN),
        p50: ms("p50"),
        p99: ms("p99"),
        max: v["summary"]["slowest"].as_f64().unwrap_or(f64::NAN) * 1000.0,
        errors: non_200 + errors,
        cpu_us: (answered > 0)
            .then(|| ticks as f64 / clock_ticks_per_second() * 1e6 / answered as f64),
    }
}

/// Rows of one table: name -> runs.
type Runs = BTreeMap<(usize, String), Vec<Load>>;

fn load_table(title: &str, note: &str, runs: &Runs, ratio_of: Option<(&str, &str)>) -> String {
    // The server's CPU time per request, where the runs measured it.
    let cpu = runs.values().flatten().any(|l| l.cpu_us.is_some());
    let (cpu_head, cpu_rule) = match cpu {
        true => (" server CPU µs/req |", "---|"),
        false => ("", ""),
    };
    let mut t = format!(
        "### {title}\n\n{note}\n\n| through | req/s | p50 ms | p99 ms | max ms | errors |{cpu_head}\n|---|---|---|---|---|---|{cpu_rule}\n"
    );
    let col = |v: &[Load], f: fn(&Load) -> f64, d: usize| {
        Samples::new(v.iter().map(f).collect()).spread(d)
    };
    let cpu_of = |l: &Load| l.cpu_us.unwrap_or(f64::NAN);
    for ((_, name), v) in runs {
        let errors: u64 = v.iter().map(|l| l.errors).sum();
        write!(
            t,
            "| {name} | {} | {} | {} | {} | {errors} |",
            col(v, |l| l.rps, 0),
            col(v, |l| l.p50, 3),
            col(v, |l| l.p99, 3),
            col(v, |l| l.max, 2),
        )
        .unwrap();
        if cpu {
            write!(t, " {} |", col(v, cpu_of, 1)).unwrap();
        }
        t.push('\n');
    }
    if let Some((ours, peer)) = ratio_of {
        let row = |name: &str| runs.iter().find(|((_, n), _)| n == name).map(|(_, v)| v);
        let median = |name: &str, f: fn(&Load) -> f64| {
            row(name)
                .map(|v| Samples::new(v.iter().map(f).collect()).median())
                .unwrap_or(f64::NAN)
        };
        let shown = |r: f64| {
            if r.is_finite() {
                format!("{r:.2}")
            } else {
                "–".to_owned()
            }
        };
        let ratio = |f: fn(&Load) -> f64| shown(median(ours, f) / median(peer, f));
        write!(
            t,
            "\nsnapgate/nginx (medians): req/s {}, p50 {}, p99 {}",
            ratio(|l| l.rps),
            ratio(|l| l.p50),
            ratio(|l| l.p99),
        )
        .unwrap();
        if cpu {
            write!(t, ", server CPU per request {}", ratio(cpu_of)).unwrap();
        }
        t.push_str(".\n");
        // Runs are interleaved, so run i of each row was measured in the
        // same round: the ratio within a round is spared most of the drift
        // between rounds.
        if let (Some(a), Some(b)) = (row(ours), row(peer)) {
            if a.len() > 1 {
                let by_round = |f: fn(&Load) -> f64| {
                    a.iter()
                        .zip(b)
                        .map(|(a, b)| shown(f(a) / f(b)))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                writeln!(
                    t,
                    "snapgate/nginx round by round: req/s {}; p99 {}.",
                    by_round(|l| l.rps),
                    by_round(|l| l.p99),
                )
                .unwrap();
            }
        }
    }
    t
}

// ---------------------------------------------------------------- sections

async fn warm(dir: &Dir, report: &mut String) {
    let runs = env_or("SNAPGATE_BENCH_RUNS", 3usize).max(1);
    let secs = env_or("SNAPGATE_BENCH_SECONDS", 8u64).max(1);
    let rate = env_or("SNAPGATE_BENCH_RATE", 10_000u64);
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let [be, nx_http, nx_https, bare] = free_ports();
    let backend = backend(dir, be);
    let nginx = nginx_proxy(dir, workers, be, nx_http, nx_https);
    let bare_log = dir.path.join("bare-forward.log");
    let bare_forward = Proc::spawn(
        "bare forward",
        Command::new(std::env::current_exe().expect("own path"))
            .env(BARE_FORWARD, format!("127.0.0.1:{bare} 127.0.0.1:{be}")),
        &bare_log,
    );
    wait_port(bare, Duration::from_secs(10), &bare_log);
    let gw = Gateway::start(
        dir,
        "warm",
        true,
        &format!(
            "apps:\n  site:\n    hosts: [site.test]\n    upstream: 127.0.0.1:{be}\n\
             \x20 vm:\n    hosts: [vm.test]\n    image: {}\n    pool: {{ min_warm: 1, max_instances: 1, idle_timeout: 1h }}\n",
            vm_image()
        ),
    );
    gw.until(
        "snapgate_instances{app=\"vm\",state=\"warm\"}",
        1.0,
        Duration::from_secs(900),
    )
    .await;
    let sg_tls = gw.tls.expect("tls");
    // With the processes whose CPU time each row's server is.
    let targets = [
        (
            0,
            "backend direct",
            format!("http://127.0.0.1:{be}/"),
            Server::WithChildren(backend.pid()),
        ),
        (
            1,
            "nginx",
            format!("http://127.0.0.1:{nx_http}/"),
            Server::WithChildren(nginx.pid()),
        ),
        (
            2,
            "snapgate (static app)",
            format!("http://127.0.0.1:{}/", gw.listen),
            Server::Alone(gw.proc.pid()),
        ),
        (
            3,
            "bare hyper forward (reference)",
            format!("http://127.0.0.1:{bare}/"),
            Server::Alone(bare_forward.pid()),
        ),
    ];
    let tls_targets = [
        (1, "nginx", format!("https://127.0.0.1:{nx_https}/")),
        (
            2,
            "snapgate (static app)",
            format!("https://127.0.0.1:{sg_tls}/"),
        ),
    ];
    let (mut h1, mut h1s, mut h2, mut open) = (Runs::new(), Runs::new(), Runs::new(), Runs::new());
    for run in 0..runs {
        eprintln!("warm path: run {}/{runs}", run + 1);
        for (i, name, url, _) in &targets {
            h1.entry((*i, name.to_string()))
                .or_default()
                .push(wrk(url, "site.test", 2, 32, secs));
        }
        for (i, name, url) in &tls_targets {
            h1s.entry((*i, name.to_string()))
                .or_default()
                .push(wrk(url, "site.test", 2, 32, secs));
            h2.entry((*i, name.to_string()))
                .or_default()
                .push(h2load(url, 32, 10, secs));
        }
        for (i, name, url, server) in &targets {
            open.entry((*i, name.to_string()))
                .or_default()
                .push(oha_rate(url, rate, 32, secs, *server));
        }
    }
    let ratio = Some(("snapgate (static app)", "nginx"));
    let each = format!("{runs} runs of {secs} s each, interleaved; median (min–max) of the runs.");
    let reference = "The bare hyper forward is a reference, not a product: a hyper HTTP/1.1 server handing each request to a kept-alive hyper client connection, with nothing else (no routing, limits, forwarding headers, timeouts, metrics or logs), with the runtime model (a single-threaded runtime per core) and the allocator snapgate has.";
    for (title, note, table) in [
        ("HTTP/1.1, closed loop", format!("`wrk -t2 -c32 -d{secs}s`; {each} {reference}"), &h1),
        ("HTTPS (HTTP/1.1 over TLS 1.3), closed loop", format!("`wrk -t2 -c32 -d{secs}s`; {each}"), &h1s),
        (
            "HTTP/2 over TLS, closed loop",
            format!("`h2load -t2 -c32 -m10 -D {secs}`; h2load reports no percentiles: the p50 column is its mean. {each}"),
            &h2,
        ),
        (
            "HTTP/1.1, open loop at a fixed rate",
            format!("`oha -q {rate} -c32 -z {secs}s --latency-correction` (latency counted from when each request was due); {each} Server CPU is the user and system time the row's server took over the run (`/proc/PID/stat`; nginx: its master and workers; the backend direct: the backend itself, whose own time every other row also includes outside this column), per request answered. {reference}"),
            &open,
        ),
    ] {
        let t = load_table(title, &note, table, ratio);
        emit(report, &t);
    }

    // A warm hit against the static path: one connection, one request at
    // a time, so the figure is the latency each adds. And the same warm
    // instance asked directly over its tap, without the gateway: what the
    // guest itself takes, which no gateway can take away.
    let instance = warm_instance();
    let mut one = Runs::new();
    for run in 0..runs {
        eprintln!("warm hit: run {}/{runs}", run + 1);
        one.entry((0, "snapgate, static app".into()))
            .or_default()
            .push(wrk(
                &format!("http://127.0.0.1:{}/", gw.listen),
                "site.test",
                1,
                1,
                secs,
            ));
        one.entry((1, "snapgate, VM app (warm instance)".into()))
            .or_default()
            .push(wrk(
                &format!("http://127.0.0.1:{}/", gw.listen),
                "vm.test",
                1,
                1,
                secs,
            ));
        if let Some(endpoint) = &instance {
            one.entry((
                2,
                "the warm instance direct, over its tap (no gateway)".into(),
            ))
            .or_default()
            .push(direct(endpoint, secs));
        }
    }
    let median = |k: usize| {
        let v = one
            .iter()
            .find(|((i, _), _)| *i == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        Samples::new(v.iter().map(|l| l.p50).collect()).median()
    };
    let mut t = load_table(
        "Warm hit: a VM app's warm instance against the static path",
        &format!("`wrk -t1 -c1 -d{secs}s`: one connection, one request at a time; the direct row's client is this harness's own (hyper on a single-threaded runtime, one kept-alive connection bound to the tap, as the gateway's upstream connections are), not wrk, and it goes over no loopback hop. The VM runs under QEMU with {}. {each}", accel_name()),
        &one,
        None,
    );
    writeln!(
        t,
        "\nA warm hit adds {:.3} ms at p50 over the static path (medians).",
        median(1) - median(0)
    )
    .unwrap();
    if instance.is_some() {
        writeln!(
            t,
            "The guest answers in {:.3} ms at p50 when asked directly; through the \
             gateway a warm hit takes {:.3} ms more (the two clients differ: see above).",
            median(2),
            median(1) - median(2)
        )
        .unwrap();
    }
    emit(report, &t);
}

/// The one warm instance of the warm section's gateway: its tap (the
/// only one named `sgcmp*`) and the guest's address. `None`, with a
/// note, if there is not exactly one such tap.
fn warm_instance() -> Option<snapgate::vmm::Endpoint> {
    let taps: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with("sgcmp"))
                .collect()
        })
        .unwrap_or_default();
    let [tap] = taps.as_slice() else {
        eprintln!(
            "warm hit: {} taps named sgcmp*, not one: no direct row",
            taps.len()
        );
        return None;
    };
    Some(snapgate::vmm::Endpoint {
        tap: tap.clone(),
        addr: std::net::SocketAddrV4::new(
            snapgate::net::NetParams::default().guest_ip,
            linux_spec().guest_port,
        ),
    })
}

/// One kept-alive HTTP/1.1 connection to `endpoint` (bound to its tap),
/// one `GET /` at a time for `seconds`: the guest's own latency. Run on a
/// thread of its own with a single-threaded runtime, so that the
/// connection and the requests on it wake no other thread (as wrk's own
/// loop wakes none). A failure (no connection, an error answer) ends the
/// run and is counted, and named on stderr.
fn direct(endpoint: &snapgate::vmm::Endpoint, seconds: u64) -> Load {
    let endpoint = endpoint.clone();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(direct_on(&endpoint, seconds))
    })
    .join()
    .expect("the direct client")
}

async fn direct_on(endpoint: &snapgate::vmm::Endpoint, seconds: u64) -> Load {
    use hyper_util::rt::TokioIo;
    let mut took = Vec::new();
    let mut errors = 0;
    let start = Instant::now();
    let connected = match snapgate::vmm::ready::connect(endpoint).await {
        Ok(stream) => hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match connected {
        Err(e) => {
            eprintln!("warm hit: no connection to the warm instance: {e}");
            errors += 1;
        }
        Ok((mut sender, conn)) => {
            let conn = tokio::spawn(conn);
            let host = endpoint.addr.to_string();
            while start.elapsed() < Duration::from_secs(seconds) {
                match get_once(&mut sender, &host).await {
                    Ok(ms) => took.push(ms),
                    Err(e) => {
                        eprintln!("warm hit: the warm instance direct failed: {e}");
                        errors += 1;
                        break;
                    }
                }
            }
            conn.abort();
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let took = Samples::new(took);
    Load {
        rps: took.0.len() as f64 / elapsed,
        p50: took.median(),
        p99: took.pct(99.0),
        max: took.max(),
        errors,
        cpu_us: None,
    }
}

/// One `GET /` on `sender`'s connection, once it is ready for it (hyper
/// takes the next request when the last has ended): the time from then
/// to the whole answer, in ms, or what failed.
async fn get_once(
    sender: &mut hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    host: &str,
) -> Result<f64, String> {
    use http_body_util::BodyExt;
    sender.ready().await.map_err(|e| e.to_string())?;
    let req = http::Request::get("/")
        .header(http::header::HOST, host)
        .body(http_body_util::Empty::new())
        .expect("request");
    let t = Instant::now();
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()));
    }
    resp.into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(t.elapsed().as_secs_f64() * 1000.0)
}

/// One request on a fresh connection: time to the response headers (ms)
/// and the status.
async fn first_byte(port: u16, host: &str) -> (f64, u16) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let t = Instant::now();
    let resp = client
        .get(format!("http://127.0.0.1:{port}/"))
        .header("host", host)
        .send()
        .await
        .expect("the gateway answers");
    let took = t.elapsed().as_secs_f64() * 1000.0;
    let status = resp.status().as_u16();
    let _ = resp.bytes().await;
    (took, status)
}

async fn cold(dir: &Dir, report: &mut String) {
    let runs = env_or("SNAPGATE_BENCH_COLD_RUNS", 20usize).max(1);
    let code = dir.path.join("rt-app");
    std::fs::create_dir_all(&code).expect("app dir");
    std::fs::write(
        code.join("server.js"),
        "require('http').createServer((q, s) => s.end('hi\\n')).listen(Number(process.env.PORT));\n",
    )
    .expect("app");
    let runtime = serde_json::to_string(&node_runtime_spec()).expect("spec");
    let at_zero = "{ min_warm: 0, max_instances: 1, idle_timeout: 1s, hold_timeout: 60s }";
    let gw = Gateway::start(
        dir,
        "cold",
        false,
        &format!(
            "runtimes:\n  node:\n    image: {runtime}\n    code_disk_mib: 16\n    min_warm: 1\n\
             apps:\n  warm:\n    hosts: [warm.test]\n    image: {img}\n    pool: {{ min_warm: 1, max_instances: 1, idle_timeout: 1h }}\n\
             \x20 cold:\n    hosts: [cold.test]\n    image: {img}\n    pool: {at_zero}\n\
             \x20 rt:\n    hosts: [rt.test]\n    runtime: {{ name: node, code: {code}, main: server.js }}\n    pool: {at_zero}\n",
            img = vm_image(),
            code = code.display()
        ),
    );
    gw.until(
        "snapgate_instances{app=\"warm\",state=\"warm\"}",
        1.0,
        Duration::from_secs(900),
    )
    .await;
    let mut rows = String::from(
        "| path | runs | p50 ms | p90 ms | max ms | start-to-ready p50 ms | outside it, p50 | errors |\n|---|---|---|---|---|---|---|---|\n",
    );
    for (app, name) in [
        ("warm", "warm hit (an idle warm instance)"),
        ("cold", "clone restored on the request path (pool empty)"),
        ("rt", "runtime app (warm runtime clone + app start)"),
    ] {
        let (mut took, mut ready, mut outside, mut share, mut errors) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), 0);
        for run in 0..runs {
            eprintln!("cold start {app}: run {}/{runs}", run + 1);
            if app != "warm" {
                // At zero again (idle_timeout 1s), and for the runtime app a
                // warm runtime clone in stock.
                gw.until(
                    &format!("snapgate_instances{{app=\"{app}\""),
                    0.0,
                    Duration::from_secs(60),
                )
                .await;
                if app == "rt" {
                    gw.until(
                        "snapgate_runtime_clones{runtime=\"node\",state=\"warm\"}",
                        1.0,
                        Duration::from_secs(300),
                    )
                    .await;
                }
            }
            let sum = format!("snapgate_restore_duration_seconds_sum{{app=\"{app}\"}}");
            let count = format!("snapgate_restore_duration_seconds_count{{app=\"{app}\"}}");
            let (s0, c0) = (gw.metric(&sum).await, gw.metric(&count).await);
            let (ms, status) = first_byte(gw.listen, &format!("{app}.test")).await;
            if status != 200 {
                errors += 1;
            }
            took.push(ms);
            let (s1, c1) = (gw.metric(&sum).await, gw.metric(&count).await);
            if app != "warm" {
                assert_eq!(c1 - c0, 1.0, "{app}: one start per run");
                let r = (s1 - s0) * 1000.0;
                ready.push(r);
                outside.push(ms - r);
                share.push((ms - r) / ms * 100.0);
            }
        }
        let t = Samples::new(took);
        let (ready, outside, share) = (
            Samples::new(ready),
            Samples::new(outside),
            Samples::new(share),
        );
        let dash = |s: &Samples, f: String| if s.0.is_empty() { "–".to_owned() } else { f };
        writeln!(
            rows,
            "| {name} | {runs} | {:.1} | {:.1} | {:.1} | {} | {} | {errors} |",
            t.median(),
            t.pct(90.0),
            t.max(),
            dash(&ready, format!("{:.1}", ready.median())),
            dash(
                &share,
                format!("{:.1} ms, {:.1}%", outside.median(), share.median())
            ),
        )
        .unwrap();
    }
    drop(gw);

    // A cold boot, at the VMM layer: boot, readiness, first byte.
    let boot = cold_boot(runs.min(env_or("SNAPGATE_BENCH_BOOT_RUNS", 20usize))).await;
    let b = Samples::new(boot);
    writeln!(
        rows,
        "| cold boot (no snapshot: boot, readiness, first byte; VMM layer) | {} | {:.1} | {:.1} | {:.1} | – | – | 0 |",
        b.0.len(),
        b.median(),
        b.pct(90.0),
        b.max()
    )
    .unwrap();
    let t = format!(
        "### Cold start: claim to first byte\n\nA fresh client connection per run; the time to the response headers. \
         Start-to-ready is what the pool recorded for that run's start (`snapgate_restore_duration_seconds`: \
         restore, readiness probe, `on_restore`; for a runtime app, taking the runtime clone and starting the app in it); \
         outside it is the client's time less it, per run (the gateway's share: accepting the connection, routing, \
         holding, forwarding, and the fresh clone answering that first request), in ms and as a share of the run's time. \
         With {runs} runs, p90 is the second slowest. VMs run under QEMU with {accel}.\n\n{rows}",
        accel = accel_name()
    );
    emit(report, &t);
}

/// Section 6: what the jail and the fence add to a clone's cold start.
async fn cluster(dir: &Dir, report: &mut String) {
    let (runs, secs) = (
        env_or("SNAPGATE_BENCH_RUNS", 3usize),
        env_or("SNAPGATE_BENCH_SECONDS", 8u64),
    );
    let [client_port, peer_port] = free_ports();
    let etcd_log = dir.path.join("etcd.log");
    let etcd = Proc::spawn(
        "etcd",
        Command::new("etcd")
            .args(["--name", "bench", "--data-dir"])
            .arg(dir.path.join("etcd"))
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{client_port}"),
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{client_port}"),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer_port}"),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer_port}"),
                "--initial-cluster",
                &format!("bench=http://127.0.0.1:{peer_port}"),
            ]),
        &etcd_log,
    );
    wait_port(client_port, Duration::from_secs(30), &etcd_log);
    let secret = dir.path.join("cluster.secret");
    std::fs::write(&secret, "bench-cluster-secret-0123456789abcdef").expect("secret");
    // The app's home is B: A's only way to it is B's warm instance.
    let app = "cold";
    let home = snapgate::cluster::placement::home(app, ["node-a", "node-b"]).unwrap();
    let (a_name, b_name) = match home {
        "node-b" => ("node-a", "node-b"),
        _ => ("node-b", "node-a"),
    };
    let [a_listen, b_listen] = free_ports();
    let node = |name: &str, listen: u16| {
        format!(
            "cluster:\n  node: {name}\n  advertise: 127.0.0.1:{listen}\n  secret_file: {}\n  \
             etcd: {{ endpoints: [\"http://127.0.0.1:{client_port}\"] }}\n\
             apps:\n  {app}:\n    hosts: [{app}.test]\n    image: {img}\n    \
             pool: {{ min_warm: 0, max_instances: 1, idle_timeout: 1h }}\n",
            secret.display(),
            img = vm_image()
        )
    };
    let b = Gateway::start_on_port(
        dir,
        "cluster-b",
        b_listen,
        "{ tap_prefix: sgclb }",
        &node(b_name, b_listen),
    );
    let a = Gateway::start_on_port(
        dir,
        "cluster-a",
        a_listen,
        "{ tap_prefix: sgcla }",
        &node(a_name, a_listen),
    );
    // The admin API answers 503 until B's apps are up.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let resp = b
            .http
            .post(format!(
                "http://127.0.0.1:{}/apps/{app}/prewarm?count=1",
                b.admin
            ))
            .send()
            .await
            .expect("prewarm");
        let status = resp.status();
        if status.is_success() {
            break;
        }
        let text = resp.text().await.unwrap_or_default();
        assert!(Instant::now() < deadline, "prewarm on B: {status} {text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    b.until(
        &format!("snapgate_instances{{app=\"{app}\",state=\"warm\""),
        1.0,
        Duration::from_secs(120),
    )
    .await;
    // A knows B's instance once its catalog has B's entry with it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let view: serde_json::Value = a
            .http
            .get(format!("http://127.0.0.1:{}/cluster", a.admin))
            .send()
            .await
            .expect("/cluster")
            .json()
            .await
            .expect("JSON");
        if view["nodes"][b_name]["apps"][app]["open"].as_u64() == Some(1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A never saw B's warm instance: {view}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let restores = "snapgate_restores_total{app=\"cold\"}";
    let a_restores = a.metric(restores).await;
    let forwarded = "snapgate_cluster_forwarded_requests_total{reason=\"warm\"}";
    let forwarded_before = a.metric(forwarded).await;
    let mut one = Runs::new();
    for run in 0..runs {
        eprintln!("cluster: run {}/{runs}", run + 1);
        for (k, name, port) in [
            (
                0,
                "node B, its own warm instance (local)".to_string(),
                b.listen,
            ),
            (
                1,
                "node A, forwarded to B's warm instance".to_string(),
                a.listen,
            ),
        ] {
            one.entry((k, name)).or_default().push(wrk(
                &format!("http://127.0.0.1:{port}/"),
                "cold.test",
                1,
                1,
                secs,
            ));
        }
    }
    let a_restored = a.metric(restores).await - a_restores;
    let sent_on = a.metric(forwarded).await - forwarded_before;
    drop((a, b, etcd));
    let median = |k: usize, f: fn(&Load) -> f64| {
        let v: Vec<f64> = one
            .iter()
            .find(|((i, _), _)| *i == k)
            .map(|(_, v)| v.iter().map(f).collect())
            .unwrap_or_default();
        Samples::new(v).median()
    };
    let mut t = load_table(
        "A forward to a peer's warm instance",
        &format!(
            "Two nodes on loopback sharing a catalog in one etcd member; the app's one warm instance on node B \
             (its home). `wrk -t1 -c1 -d{secs}s`: one connection, one request at a time, to B and to A, which \
             forwards each request to B with the hop marker over a kept-alive connection. The VM runs under \
             QEMU with {}. Each row: the median of {runs} runs.",
            accel_name()
        ),
        &one,
        None,
    );
    writeln!(
        t,
        "\nThe forward adds {:.3} ms at p50 and {:.3} ms at p99 (medians of the runs). A forwarded \
         {sent_on:.0} requests to B's instance and restored {a_restored:.0} instances of its own.",
        median(1, |l| l.p50) - median(0, |l| l.p50),
        median(1, |l| l.p99) - median(0, |l| l.p99),
    )
    .unwrap();
    emit(report, &t);
}

async fn isolation(dir: &Dir, report: &mut String) {
    let runs = env_or("SNAPGATE_BENCH_COLD_RUNS", 20usize).max(1);
    let at_zero = "{ min_warm: 0, max_instances: 1, idle_timeout: 1s, hold_timeout: 60s }";
    let app = |jail: &str| {
        format!(
            "{jail}apps:\n  cold:\n    hosts: [cold.test]\n    image: {img}\n    pool: {at_zero}\n",
            img = vm_image()
        )
    };
    let off = "vmm:\n  jail: { user: false, filesystem: false, seccomp: false, cgroup: false }\n";
    let gateways = [
        (
            "jail and fence on (the defaults)",
            Gateway::start_on(dir, "iso-on", false, "{ tap_prefix: sgison }", &app("")),
        ),
        (
            "jail and fence off",
            Gateway::start_on(
                dir,
                "iso-off",
                false,
                "{ tap_prefix: sgisof, fence: false }",
                &app(off),
            ),
        ),
    ];
    let mut took: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut ready: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut errors = [0; 2];
    for run in 0..runs {
        for (i, (_, gw)) in gateways.iter().enumerate() {
            eprintln!("isolation {i}: run {}/{runs}", run + 1);
            gw.until(
                "snapgate_instances{app=\"cold\"",
                0.0,
                Duration::from_secs(60),
            )
            .await;
            let sum = "snapgate_restore_duration_seconds_sum{app=\"cold\"}";
            let s0 = gw.metric(sum).await;
            let (ms, status) = first_byte(gw.listen, "cold.test").await;
            if status != 200 {
                errors[i] += 1;
            }
            took[i].push(ms);
            ready[i].push((gw.metric(sum).await - s0) * 1000.0);
        }
    }
    drop(gateways);
    let mut rows = String::from(
        "| clone restored on the request path | runs | p50 ms | p90 ms | max ms | start-to-ready p50 ms | errors |\n|---|---|---|---|---|---|---|\n",
    );
    let names = ["jail and fence on (the defaults)", "jail and fence off"];
    let medians: Vec<f64> = (0..2)
        .map(|i| Samples::new(took[i].clone()).median())
        .collect();
    for i in 0..2 {
        let t = Samples::new(took[i].clone());
        let r = Samples::new(ready[i].clone());
        writeln!(
            rows,
            "| {} | {runs} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
            names[i],
            t.median(),
            t.pct(90.0),
            t.max(),
            r.median(),
            errors[i]
        )
        .unwrap();
    }
    let added = medians[0] - medians[1];
    let t = format!(
        "### Isolation: what the jail and the fence cost a cold start\n\nThe same VM app at zero on two gateways, \
         one with the VMM jail (a uid of its own, QEMU's seccomp sandbox, a mount namespace, a cgroup) and the \
         nftables fence on, one with every part of both off; runs alternate between them. A fresh client \
         connection per run; the time to the response headers. VMs run under QEMU with {accel}.\n\n{rows}\n\
         The jail and the fence add {added:.1} ms at p50 ({:.1}%).\n",
        added / medians[1] * 100.0,
        accel = accel_name()
    );
    emit(report, &t);
}

/// What `accel: auto` runs VMs with on this host, for the report.
fn accel_name() -> &'static str {
    match snapgate::vmm::qemu::Accel::Auto.resolve() {
        Ok("kvm") => "KVM",
        Ok(_) => "TCG (software emulation)",
        Err(_) => "no accelerator",
    }
}

async fn cold_boot(runs: usize) -> Vec<f64> {
    use snapgate::net::{NetParams, Network};
    use snapgate::vmm::qemu::{Accel, Qemu};
    use snapgate::vmm::{VmId, Vmm};
    let state = tempfile::tempdir().expect("tempdir");
    let net = Network::new(NetParams {
        tap_prefix: "sgcmb".into(),
        ..NetParams::default()
    })
    .expect("network");
    let qemu = Qemu::new(
        "qemu-system-x86_64",
        Accel::Auto,
        state.path(),
        net.params().clone(),
    )
    .expect("qemu");
    let spec = linux_spec();
    let mut out = Vec::new();
    for i in 0..runs {
        eprintln!("cold boot: run {}/{runs}", i + 1);
        let t = Instant::now();
        let tap = net.create_tap().await.expect("tap");
        let mut vm = qemu
            .boot(VmId::new(format!("boot-{i}")), &spec, tap)
            .await
            .expect("boot");
        snapgate::vmm::ready::wait_ready(&qemu, &mut vm, spec.ready_timeout)
            .await
            .expect("ready");
        let (status, _) = snapgate::vmm::ready::get(vm.endpoint(), "/")
            .await
            .expect("GET /");
        assert_eq!(status, 200);
        out.push(t.elapsed().as_secs_f64() * 1000.0);
        qemu.destroy(vm).await.expect("destroy");
    }
    out
}

async fn burst(dir: &Dir, report: &mut String) {
    let defaults = snapgate::config::PoolConfig::default();
    let mut rows = String::from(
        "| concurrent | 200 | errors (by status) | p50 ms | p99 ms | max ms | instances started | gateway RSS before → peak MiB |\n|---|---|---|---|---|---|---|---|\n",
    );
    for n in [100usize, 500] {
        eprintln!("burst of {n}");
        let gw = Gateway::start(
            dir,
            "burst",
            false,
            &format!(
                "apps:\n  app:\n    hosts: [app.test]\n    image: {}\n    pool: {{ min_warm: 0, max_instances: 4 }}\n",
                vm_image()
            ),
        );
        // The snapshot is built and the pool empty: the app is at zero.
        gw.until(
            "snapgate_instances{app=\"app\"",
            0.0,
            Duration::from_secs(60),
        )
        .await;
        let rss = proc_mib(gw.proc.pid(), "status", "VmRSS:");
        // Ten client addresses (127.0.0.2-11), as many clients would be.
        let clients: Vec<reqwest::Client> = (0..10u8)
            .map(|i| {
                reqwest::Client::builder()
                    .local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i)))
                    .timeout(Duration::from_secs(120))
                    .build()
                    .expect("client")
            })
            .collect();
        let url = format!("http://127.0.0.1:{}/", gw.listen);
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..n {
            let req = clients[i % 10].get(&url).header("host", "app.test");
            tasks.spawn(async move {
                let t = Instant::now();
                let status = match req.send().await {
                    Ok(r) => {
                        let s = r.status().as_u16();
                        let _ = r.bytes().await;
                        s
                    }
                    Err(_) => 0,
                };
                (status, t.elapsed().as_secs_f64() * 1000.0)
            });
        }
        let (mut ok, mut by_status, mut took) = (0, BTreeMap::<u16, usize>::new(), Vec::new());
        while let Some(done) = tasks.join_next().await {
            let (status, ms) = done.expect("request task");
            took.push(ms);
            if status == 200 {
                ok += 1;
            } else {
                *by_status.entry(status).or_default() += 1;
            }
        }
        let started = gw.metric("snapgate_restores_total{app=\"app\"}").await;
        let peak = proc_mib(gw.proc.pid(), "status", "VmHWM:");
        let errors = if by_status.is_empty() {
            "0".to_owned()
        } else {
            by_status
                .iter()
                .map(|(s, k)| {
                    if *s == 0 {
                        format!("{k} × no response")
                    } else {
                        format!("{k} × {s}")
                    }
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let t = Samples::new(took);
        writeln!(
            rows,
            "| {n} | {ok} | {errors} | {:.0} | {:.0} | {:.0} | {started} | {rss:.1} → {peak:.1} |",
            t.median(),
            t.pct(99.0),
            t.max()
        )
        .unwrap();
    }
    let t = format!(
        "### Burst onto an app at zero\n\nAll requests at once from 10 client addresses onto a VM app with `min_warm: 0, max_instances: 4` \
         and the other pool settings at their defaults (`max_concurrency: {}`, `hold_queue: {}`, `hold_timeout: {:?}`); a fresh gateway per row.\n\n{rows}",
        defaults.max_concurrency,
        defaults.hold_queue,
        defaults.hold_timeout
    );
    emit(report, &t);
}

async fn density(dir: &Dir, report: &mut String) {
    let sizes: Vec<usize> = std::env::var("SNAPGATE_BENCH_DENSITY")
        .unwrap_or_else(|_| "10,25,50".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let guest_mib = linux_spec().memory_mib as f64;
    let mut rows = String::from(
        "| warm clones | time to fill s | RSS total MiB | PSS total MiB | per clone: RSS | PSS | private MiB | private / guest RAM |\n|---|---|---|---|---|---|---|---|\n",
    );
    for n in sizes {
        let available = meminfo_mib("MemAvailable:");
        if available < n as f64 * guest_mib * 0.5 {
            writeln!(
                rows,
                "| {n} | not run: {available:.0} MiB available | | | | | | |"
            )
            .unwrap();
            continue;
        }
        eprintln!("density: {n} clones");
        let gw = Gateway::start(
            dir,
            "density",
            false,
            &format!(
                "apps:\n  app:\n    hosts: [app.test]\n    image: {}\n    pool: {{ min_warm: {n}, max_instances: {n}, idle_timeout: 1h, start_timeout: 5m }}\n",
                vm_image()
            ),
        );
        let t = Instant::now();
        gw.until(
            "snapgate_instances{app=\"app\",state=\"warm\"}",
            n as f64,
            Duration::from_secs(900),
        )
        .await;
        let fill = t.elapsed().as_secs_f64();
        // Settled: the clones' first minutes of paging in are over.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let vmms = children(gw.proc.pid());
        assert_eq!(vmms.len(), n, "one VMM process per clone");
        let (mut rss, mut pss, mut private) = (0.0, 0.0, 0.0);
        for pid in &vmms {
            rss += proc_mib(*pid, "smaps_rollup", "Rss:");
            pss += proc_mib(*pid, "smaps_rollup", "Pss:");
            private += proc_mib(*pid, "smaps_rollup", "Private_Clean:")
                + proc_mib(*pid, "smaps_rollup", "Private_Dirty:");
        }
        let k = n as f64;
        writeln!(
            rows,
            "| {n} | {fill:.1} | {rss:.0} | {pss:.0} | {:.1} | {:.1} | {:.1} | {:.1}% |",
            rss / k,
            pss / k,
            private / k,
            private / k / guest_mib * 100.0
        )
        .unwrap();
        println!("{rows}");
    }
    let t = format!(
        "### Density: warm clones of one snapshot\n\nThe test guest ({guest_mib:.0} MiB of guest RAM, `snapshot_mode: template`: \
         clones map the snapshot's memory copy-on-write), a fresh gateway per row filling `min_warm`; the time to fill counts from the \
         gateway listening to the last clone warm. Memory of the QEMU processes from `/proc/PID/smaps_rollup` 3 s later; private \
         is `Private_Clean + Private_Dirty` (what a clone costs beyond what it shares).\n\n{rows}"
    );
    emit(report, &t);
}

/// Opens `n` connections to `port` from 40 client addresses
/// (127.0.1.1-40), each carrying one answered request, and keeps them open.
async fn open_idle(port: u16, n: usize) -> Vec<tokio::net::TcpStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        let src = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 1, 1 + (i % 40) as u8)), 0);
        socket.bind(src).expect("bind source");
        let mut s = socket
            .connect(SocketAddr::from(([127, 0, 0, 1], port)))
            .await
            .expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\nHost: site.test\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 1024];
        let got = s.read(&mut buf).await.expect("read");
        assert!(
            buf[..got].starts_with(b"HTTP/1.1 200"),
            "connection {i}: {}",
            String::from_utf8_lossy(&buf[..got])
        );
        conns.push(s);
    }
    conns
}

async fn idle(dir: &Dir, report: &mut String) {
    let n = env_or("SNAPGATE_BENCH_IDLE", 10_000usize);
    let [be, nx_http, nx_https] = free_ports();
    let _backend = backend(dir, be);
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let nginx = nginx_proxy(dir, workers, be, nx_http, nx_https);
    let gw = Gateway::start(
        dir,
        "idle",
        false,
        &format!(
            "header_read_timeout: 120s\nlimits: {{ max_connections: {}, max_connections_per_client: {} }}\n\
             apps:\n  site:\n    hosts: [site.test]\n    upstream: 127.0.0.1:{be}\n",
            n * 2,
            n
        ),
    );
    let nginx_rss = |pid: u32| -> f64 {
        proc_mib(pid, "status", "VmRSS:")
            + children(pid)
                .iter()
                .map(|c| proc_mib(*c, "status", "VmRSS:"))
                .sum::<f64>()
    };
    let mut rows = String::from("| server | RSS before MiB | RSS with connections MiB | per connection KiB |\n|---|---|---|---|\n");
    for (name, port, rss) in [
        ("nginx", nx_http, &nginx_rss as &dyn Fn(u32) -> f64),
        ("snapgate", gw.listen, &|pid| {
            proc_mib(pid, "status", "VmRSS:")
        }),
    ] {
        let pid = if name == "nginx" {
            nginx.pid()
        } else {
            gw.proc.pid()
        };
        let before = rss(pid);
        let conns = open_idle(port, n).await;
        // Idle a while: snapgate parks idle connections after a second
        // and its workers hand freed memory back once idle.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let after = rss(pid);
        writeln!(
            rows,
            "| {name} | {before:.1} | {after:.1} | {:.1} |",
            (after - before) * 1024.0 / n as f64
        )
        .unwrap();
        drop(conns);
    }
    let t = format!(
        "### {n} idle kept-alive client connections\n\nEach connection from one of 40 loopback client addresses, after one answered request, measured 5 s after the last one opened, \
         then idle; resident memory of the whole server (nginx: master and {workers} workers). snapgate runs with \
         `header_read_timeout: 120s` (idle connections live that long) and `max_connections` and `max_connections_per_client` raised for the run. \
         nginx sets up its `worker_connections` (20000 per worker) at start, so part of its cost per connection is in its RSS before: \
         compare the totals with connections.\n\n{rows}"
    );
    emit(report, &t);
}

// ---------------------------------------------------------------- main

fn method(report: &mut String) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = meminfo_mib("MemTotal:") / 1024.0;
    writeln!(
        report,
        "## Method\n\n\
         - Machine: {cores} cores ({cpu}), {mem:.0} GiB, Linux {kernel}; everything (clients, peers, backend, VMs) on the same machine and loopback, no CPU pinning.\n\
         - snapgate {version} (release build, one edge worker per core: {cores}); nginx: `{nginx}`; wrk: `{wrk}`; h2load: `{h2load}`; oha: `{oha}`; QEMU: `{qemu}`.\n\
         - VMs: the test guest built by `scripts/build-guest`, under QEMU with {accel} (`accel: auto`); under TCG every guest-side time is far above a hardware KVM host's.\n\
         - Absolute figures move between runs on a shared machine; ratios within one run hold better. Runs are interleaved so that drift hits every row alike.\n",
        kernel = command_version("uname", &["-r"]),
        version = env!("CARGO_PKG_VERSION"),
        nginx = command_version("nginx", &["-v"]),
        wrk = command_version("wrk", &["-v"]),
        h2load = command_version("h2load", &["--version"]),
        oha = command_version(&oha(), &["--version"]),
        qemu = command_version("qemu-system-x86_64", &["--version"]),
        accel = accel_name(),
    )
    .unwrap();
}

/// The allocator snapgate runs with, for the harness's own bare forward
/// too (the reference row compares paths, not allocators).
#[global_allocator]
static ALLOCATOR: snapgate::alloc::Mimalloc = snapgate::alloc::Mimalloc;

/// The environment variable that makes this binary the bare forward
/// ([`bare_forward`]): `"<listen address> <backend address>"`.
const BARE_FORWARD: &str = "SNAPGATE_BENCH_BARE_FORWARD";

/// The reference row of the warm path: the least a proxy built on hyper
/// does. A hyper HTTP/1.1 server hands each request, as it came, to a
/// kept-alive hyper client connection to the backend (from its worker's
/// pool, back into it once the response headers are in: hyper holds the
/// next request until the body has been read) and streams the response
/// back; no routing, limits, forwarding headers, timeouts, metrics or
/// logs. Run as this binary with [`BARE_FORWARD`] set, with the runtime
/// model snapgate has: a single-threaded runtime per core, each accepting
/// on its own duplicate of the listening socket. What snapgate costs
/// beyond it is its own path's cost.
fn bare_forward(listen: SocketAddr, backend: SocketAddr) {
    let listener = std::net::TcpListener::bind(listen).expect("bare forward: bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads: Vec<_> = (0..cores)
        .map(|_| {
            let socket = listener.try_clone().expect("bare forward: dup");
            std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime")
                    .block_on(bare_worker(socket, backend))
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

/// One worker of [`bare_forward`], with its own pool.
async fn bare_worker(socket: std::net::TcpListener, backend: SocketAddr) {
    use hyper::body::Incoming;
    use hyper::client::conn::http1::SendRequest;
    use hyper_util::rt::TokioIo;
    type Pool = std::rc::Rc<std::cell::RefCell<Vec<SendRequest<Incoming>>>>;
    let listener = tokio::net::TcpListener::from_std(socket).expect("bare forward: listener");
    let pool = Pool::default();
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let pool = pool.clone();
                tokio::task::spawn_local(async move {
                    let service =
                        hyper::service::service_fn(move |req: http::Request<Incoming>| {
                            let pool = pool.clone();
                            async move {
                                // A pooled connection that closed meanwhile
                                // (the backend closed it, or a response body
                                // was dropped unread as its client left) is
                                // dropped: its error is no client's.
                                let mut sender = loop {
                                    let pooled = pool.borrow_mut().pop();
                                    match pooled {
                                        Some(mut sender) => {
                                            if sender.ready().await.is_ok() {
                                                break sender;
                                            }
                                        }
                                        None => {
                                            let up =
                                                tokio::net::TcpStream::connect(backend).await?;
                                            up.set_nodelay(true)?;
                                            let (mut sender, conn) =
                                                hyper::client::conn::http1::handshake(
                                                    TokioIo::new(up),
                                                )
                                                .await
                                                .map_err(std::io::Error::other)?;
                                            tokio::task::spawn_local(conn);
                                            sender.ready().await.map_err(std::io::Error::other)?;
                                            break sender;
                                        }
                                    }
                                };
                                let resp = sender
                                    .send_request(req)
                                    .await
                                    .map_err(std::io::Error::other);
                                pool.borrow_mut().push(sender);
                                resp
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        })
        .await;
}

fn main() {
    if let Ok(spec) = std::env::var(BARE_FORWARD) {
        let (listen, backend) = spec.split_once(' ').expect("<listen> <backend>");
        let (listen, backend) = (
            listen.parse().expect("listen address"),
            backend.parse().expect("backend address"),
        );
        bare_forward(listen, backend);
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(run());
}

async fn run() {
    // 10,000 client sockets here, and as many in the servers (inherited).
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::env::var_os("SNAPGATE_BENCH_REPORT")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/bench/BENCHMARKS.md"));
    let work = tempfile::Builder::new()
        .prefix("snapgate-bench")
        .tempdir()
        .expect("tempdir");
    let dir = Dir::new(work.path().to_owned());
    let started = Instant::now();
    let mut report = String::new();
    if section_on("warm") {
        report.push_str("## 1. Warm path\n\n");
        warm(&dir, &mut report).await;
    }
    if section_on("cold") {
        report.push_str("## 2. Cold start\n\n");
        cold(&dir, &mut report).await;
    }
    if section_on("burst") {
        report.push_str("## 3. Burst\n\n");
        burst(&dir, &mut report).await;
    }
    if section_on("density") {
        report.push_str("## 4. Density\n\n");
        density(&dir, &mut report).await;
    }
    if section_on("idle") {
        report.push_str("## 5. Idle connections\n\n");
        idle(&dir, &mut report).await;
    }
    if section_on("isolation") {
        report.push_str("## 6. Isolation\n\n");
        isolation(&dir, &mut report).await;
    }
    if section_on("cluster") {
        report.push_str("## 7. Many nodes\n\n");
        cluster(&dir, &mut report).await;
    }
    method(&mut report);
    writeln!(
        report,
        "\nThe whole run took {:.0} s.",
        started.elapsed().as_secs_f64()
    )
    .unwrap();
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent).expect("report dir");
    }
    std::fs::write(&out, &report).expect("write report");
    eprintln!("report written to {}", out.display());
}
