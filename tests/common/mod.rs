//! Helpers for tests that boot real VMs on real taps.
#![allow(dead_code)]

pub mod runtime;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use snapgate::net::NetParams;
use snapgate::vmm::Endpoint;

/// Network parameters with a tap prefix of the test's own, so parallel tests
/// never see each other's taps.
pub fn net_params(prefix: &str) -> NetParams {
    NetParams {
        tap_prefix: prefix.into(),
        ..NetParams::default()
    }
}

/// Polls `cond` every 10 ms until it holds or `within` passes.
pub async fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[allow(unused_imports)]
pub use snapgate::testing::{alive, assert_all_gone, TestGateway};

/// Polls the async `cond` every 20 ms until it holds; panics naming `what`
/// after `within`.
pub async fn wait_for(what: &str, within: Duration, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `GET path` on a guest; returns the body as text. Panics on non-200.
pub async fn get_text(endpoint: &Endpoint, path: &str) -> String {
    let (status, body) = snapgate::vmm::ready::get(endpoint, path)
        .await
        .unwrap_or_else(|e| panic!("GET {path} via {}: {e}", endpoint.tap));
    assert_eq!(status, 200, "GET {path} via {}", endpoint.tap);
    String::from_utf8(body.to_vec()).expect("utf-8 body")
}

/// The `instance:` line of the test guest's answer.
pub fn instance_of(body: &str) -> String {
    body.lines()
        .find_map(|l| l.strip_prefix("instance: "))
        .unwrap_or_else(|| panic!("no instance line in {body:?}"))
        .to_owned()
}

/// Reports a test as skipped, by name, on stderr and in `$SNAPGATE_SKIP_LOG`
/// (which `scripts/test` prints at the end of the run).
pub fn skip(test: &str, reason: &str) {
    let line = format!("SKIPPED {test}: {reason}");
    eprintln!("{line}");
    if let Some(log) = std::env::var_os("SNAPGATE_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            // One write of the whole line: parallel tests append to the
            // same file (O_APPEND keeps each write whole).
            let _ = f.write_all(format!("{line}\n").as_bytes());
        }
    }
}

/// The smallest guest Cloud Hypervisor can boot: an ELF64 with a PVH entry
/// note whose code halts forever (`hlt; jmp .-1`), loaded at 1 MiB.
pub fn halting_pvh_kernel(path: &Path) {
    const LOAD: u64 = 0x10_0000;
    let mut elf = vec![0u8; 0x1010];
    let put = |buf: &mut Vec<u8>, at: usize, bytes: &[u8]| {
        buf[at..at + bytes.len()].copy_from_slice(bytes)
    };
    // ELF header.
    put(&mut elf, 0, b"\x7fELF\x02\x01\x01");
    put(&mut elf, 16, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut elf, 18, &62u16.to_le_bytes()); // EM_X86_64
    put(&mut elf, 20, &1u32.to_le_bytes()); // EV_CURRENT
    put(&mut elf, 24, &LOAD.to_le_bytes()); // e_entry
    put(&mut elf, 32, &64u64.to_le_bytes()); // e_phoff
    put(&mut elf, 52, &64u16.to_le_bytes()); // e_ehsize
    put(&mut elf, 54, &56u16.to_le_bytes()); // e_phentsize
    put(&mut elf, 56, &2u16.to_le_bytes()); // e_phnum
                                            // PT_LOAD: 16 bytes of code at file offset 0x1000 -> 1 MiB.
    let mut ph = 64;
    put(&mut elf, ph, &1u32.to_le_bytes());
    put(&mut elf, ph + 4, &5u32.to_le_bytes()); // R+X
    put(&mut elf, ph + 8, &0x1000u64.to_le_bytes());
    put(&mut elf, ph + 16, &LOAD.to_le_bytes());
    put(&mut elf, ph + 24, &LOAD.to_le_bytes());
    put(&mut elf, ph + 32, &16u64.to_le_bytes());
    put(&mut elf, ph + 40, &16u64.to_le_bytes());
    put(&mut elf, ph + 48, &0x1000u64.to_le_bytes());
    // PT_NOTE: Xen note type 18 (PHYS32_ENTRY) = the 32-bit PVH entry.
    ph += 56;
    let note_at = 0xb0usize;
    put(&mut elf, ph, &4u32.to_le_bytes());
    put(&mut elf, ph + 4, &4u32.to_le_bytes()); // R
    put(&mut elf, ph + 8, &(note_at as u64).to_le_bytes());
    put(&mut elf, ph + 32, &20u64.to_le_bytes());
    put(&mut elf, ph + 40, &20u64.to_le_bytes());
    put(&mut elf, ph + 48, &4u64.to_le_bytes());
    put(&mut elf, note_at, &4u32.to_le_bytes()); // namesz
    put(&mut elf, note_at + 4, &4u32.to_le_bytes()); // descsz
    put(&mut elf, note_at + 8, &18u32.to_le_bytes()); // type
    put(&mut elf, note_at + 12, b"Xen\0");
    put(&mut elf, note_at + 16, &(LOAD as u32).to_le_bytes());
    // Code: hlt; jmp back to hlt.
    put(&mut elf, 0x1000, &[0xf4, 0xeb, 0xfd]);
    std::fs::write(path, elf).expect("write the halting kernel");
}

/// The Cloud Hypervisor binary: `$SNAPGATE_CH_BIN`, else `cloud-hypervisor`
/// on PATH.
pub fn cloud_hypervisor_bin() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("SNAPGATE_CH_BIN") {
        let bin = PathBuf::from(bin);
        return bin.exists().then_some(bin);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("cloud-hypervisor"))
            .find(|p| p.exists())
    })
}

/// A real Prometheus (Debian package `prometheus`) scraping `target` every
/// second; killed on drop.
pub struct Prometheus {
    port: u16,
    _dir: tempfile::TempDir,
    _child: tokio::process::Child,
}

impl Prometheus {
    /// Starts Prometheus on a free loopback port.
    pub fn start(target: std::net::SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        std::fs::write(
            dir.path().join("prometheus.yml"),
            format!(
                "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\n\
                 scrape_configs:\n  - job_name: snapgate\n    static_configs: [{{ targets: ['{target}'] }}]\n",
            ),
        )
        .unwrap();
        let child = tokio::process::Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("prometheus (Debian package prometheus; scripts/test installs it)");
        Prometheus {
            port,
            _dir: dir,
            _child: child,
        }
    }

    /// An instant query; `Null` while Prometheus is not up yet.
    pub async fn query(&self, expr: &str) -> serde_json::Value {
        let url = format!("http://127.0.0.1:{}/api/v1/query", self.port);
        match reqwest::Client::new()
            .get(url)
            .query(&[("query", expr)])
            .send()
            .await
        {
            Ok(r) => r.json().await.unwrap_or_default(),
            Err(_) => serde_json::Value::Null,
        }
    }

    /// Whether `expr` has at least one series now.
    pub async fn has_series(&self, expr: &str) -> bool {
        self.query(expr).await["data"]["result"]
            .as_array()
            .is_some_and(|r| !r.is_empty())
    }
}

/// Every query of every dashboard in `dashboards/`, as (panel title, expression), with
/// its variables set to match everything and rates over 1m.
pub fn dashboard_queries() -> Vec<(String, String)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/dashboards");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no dashboard in {dir}");
    let mut out = Vec::new();
    for file in files {
        let dashboard: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"]
                    .as_str()
                    .unwrap()
                    .replace("$app", ".*")
                    .replace("$runtime", ".*")
                    .replace("$__rate_interval", "1m");
                out.push((panel["title"].as_str().unwrap().to_owned(), expr));
            }
        }
    }
    out
}

/// The shared harness ([`TestGateway`]) for a gateway whose one app is
/// `app` on `app.test`.
pub struct AppGw(pub TestGateway);

impl std::ops::Deref for AppGw {
    type Target = TestGateway;
    fn deref(&self) -> &TestGateway {
        &self.0
    }
}

impl AppGw {
    /// Starts `cfg`, whose `state_dir` is `state` (removed on drop).
    pub async fn with_state(state: tempfile::TempDir, cfg: &snapgate::config::Config) -> AppGw {
        AppGw(TestGateway::start(state, cfg).await)
    }

    /// Starts `cfg` in a `state_dir` the test keeps.
    pub async fn in_dir(cfg: &snapgate::config::Config) -> AppGw {
        AppGw(TestGateway::start_in(cfg).await)
    }

    /// The app's pool.
    pub fn pool(&self) -> snapgate::pool::Pool {
        self.0.pool("app")
    }

    /// `GET path` for the app, to send.
    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.0.request("app.test", path)
    }

    /// `GET path` for the app: the status and the body.
    pub async fn text(&self, path: &str) -> (u16, String) {
        self.0.get("app.test", path).await
    }

    /// Shuts the gateway down and checks that every VM and tap is gone.
    pub async fn stop(self) {
        self.0.stop().await;
    }
}
