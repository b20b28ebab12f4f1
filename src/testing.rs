//! Fixtures for the end-to-end tests and benchmarks (feature `vm-tests`):
//! the test guest built by `scripts/build-guest`, as an image spec and as a
//! one-app gateway config.

use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::vmm::ImageSpec;

/// A build output directory: `$<var>`, else `target/guest/<default>`.
/// Panics, naming the script that builds it, if `file` is not in it.
fn built(var: &str, default: &str, file: &str, script: &str) -> PathBuf {
    let dir = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target/guest")
            .join(default)
    });
    assert!(
        dir.join(file).exists(),
        "no {file} in {}: run {script} (scripts/test does)",
        dir.display()
    );
    dir
}

/// The test guest: `$SNAPGATE_GUEST_DIR`, else `target/guest/current`.
pub fn guest_dir() -> PathBuf {
    built(
        "SNAPGATE_GUEST_DIR",
        "current",
        "vmlinuz",
        "scripts/build-guest",
    )
}

/// The Linux test guest as an image spec.
pub fn linux_spec() -> ImageSpec {
    let g = guest_dir();
    serde_yaml_ng::from_str(&format!(
        "kernel: {}\ninitramfs: {}\n\
         cmdline: 'console=ttyS0 quiet panic=-1 tsc_early_khz={{tsc_khz}} tsc=reliable cryptomgr.notests \
         ip={{guest_ip}}::{{host_ip}}:{{netmask}}::eth0:off snapgate.port={{guest_port}}'\n\
         ready_timeout: 60s\n",
        g.join("vmlinuz").display(),
        g.join("initramfs.cpio.gz").display()
    ))
    .expect("test spec parses")
}

/// [`linux_spec`] with [`test_guest_on_restore`], as the JSON a config's
/// `image:` takes inline (JSON is YAML).
pub fn test_guest_image() -> String {
    let mut spec = linux_spec();
    spec.on_restore = Some(test_guest_on_restore());
    serde_json::to_string(&spec).expect("a spec serializes")
}

/// The test guest's resume hook: it serves the resumed message at
/// `POST /snapgate/resumed` (reseeds its kernel, sets its clock).
pub fn test_guest_on_restore() -> crate::vmm::resumed::OnRestore {
    serde_yaml_ng::from_str("path: /snapgate/resumed").expect("hook parses")
}

/// The test guest on Debian's generic kernel (`generic/` of the build),
/// which has the VM generation ID driver, on QEMU's `pc` machine, which
/// gives VMs a `vmgenid` device: no `on_restore`.
pub fn vmgenid_spec() -> ImageSpec {
    let g = guest_dir().join("generic");
    let mut spec = linux_spec();
    spec.kernel = g.join("vmlinuz");
    spec.initramfs = Some(g.join("initramfs.cpio.gz"));
    spec.machine = crate::vmm::Machine::Pc;
    spec
}

/// Where tests and benchmarks keep the test guest's snapshots between runs
/// (rebuilt whenever the guest changes).
pub fn shared_snapshot_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-snapshots")
}

/// Writes `<state>/proxy.yaml` for one app, `app` on host `app.test`,
/// served by the test guest (with its `on_restore` hook) with `pool` (a
/// YAML flow map), on any free ports, taps named `<tap_prefix>*`, snapshots
/// in `snapshots`, and loads it.
pub fn gateway_config(state: &Path, tap_prefix: &str, pool: &str, snapshots: &Path) -> Config {
    let mut spec = linux_spec();
    spec.on_restore = Some(test_guest_on_restore());
    gateway_config_of(&spec, state, tap_prefix, pool, snapshots)
}

/// [`gateway_config`] with the app's image `spec`.
pub fn gateway_config_of(
    spec: &ImageSpec,
    state: &Path,
    tap_prefix: &str,
    pool: &str,
    snapshots: &Path,
) -> Config {
    // JSON is YAML: the spec goes in as one flow mapping.
    let image = serde_json::to_string(spec).expect("spec serializes");
    let text = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nshutdown_grace: 5s\n\
         state_dir: {}\nsnapshot_dir: {}\n\
         network: {{ tap_prefix: {tap_prefix} }}\n\
         apps:\n  app:\n    hosts: [app.test]\n    image: {image}\n    pool: {pool}\n",
        state.display(),
        snapshots.display(),
    );
    let file = state.join("proxy.yaml");
    std::fs::write(&file, text).expect("write proxy.yaml");
    Config::load(&file).unwrap_or_else(|e| panic!("{e}"))
}

/// The Node.js runtime root disk: `$SNAPGATE_NODE_RUNTIME_DIR`, else
/// `target/guest/node-current`. Panics, saying how to build it, if missing.
pub fn node_runtime_dir() -> PathBuf {
    let dir = std::env::var_os("SNAPGATE_NODE_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/guest/node-current"));
    assert!(
        dir.join("root.img").exists(),
        "no Node.js runtime in {}: run scripts/build-node-runtime (scripts/test does)",
        dir.display()
    );
    dir
}

/// The Node.js runtime's image: the test guest's kernel and initramfs (its
/// /init is the agent), the runtime root disk, the agent on port 8081.
pub fn node_runtime_spec() -> ImageSpec {
    let g = guest_dir();
    serde_yaml_ng::from_str(&format!(
        "kernel: {}\ninitramfs: {}\ndisks: [{{path: {}}}]\n\
         cmdline: 'console=ttyS0 quiet panic=-1 tsc_early_khz={{tsc_khz}} tsc=reliable cryptomgr.notests \
         ip={{guest_ip}}::{{host_ip}}:{{netmask}}::eth0:off snapgate.agent={{guest_port}} \
         snapgate.exec=/usr/bin/node,--openssl-config=/opt/snapgate/openssl.cnf,/opt/snapgate/loader.js'\n\
         guest_port: 8081\nready_timeout: 120s\n",
        g.join("vmlinuz").display(),
        g.join("initramfs.cpio.gz").display(),
        node_runtime_dir().join("root.img").display(),
    ))
    .expect("runtime spec parses")
}

/// Writes `<state>/proxy.yaml` with the Node.js runtime `node` (its
/// `min_warm` given) and `apps` (YAML text of the `apps:` map, indented by
/// two spaces), on any free ports, taps named `<tap_prefix>*`, snapshots in
/// `snapshots`, and loads it.
pub fn runtime_gateway_config(
    state: &Path,
    tap_prefix: &str,
    runtime_min_warm: usize,
    apps: &str,
    snapshots: &Path,
) -> Config {
    let image = serde_json::to_string(&node_runtime_spec()).expect("spec serializes");
    let text = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nshutdown_grace: 5s\n\
         state_dir: {}\nsnapshot_dir: {}\n\
         network: {{ tap_prefix: {tap_prefix} }}\n\
         runtimes:\n  node:\n    image: {image}\n    code_disk_mib: 16\n    min_warm: {runtime_min_warm}\n\
         apps:\n{apps}",
        state.display(),
        snapshots.display(),
    );
    let file = state.join("proxy.yaml");
    std::fs::write(&file, text).expect("write proxy.yaml");
    Config::load(&file).unwrap_or_else(|e| panic!("{e}"))
}

/// A gateway started for a test or a benchmark, with its state directory:
/// the one end-to-end harness both use. Dropping it (a test that failed)
/// still kills every VM: dropping the gateway cancels its tasks and drops
/// every VM value, and each kills its VMM. [`TestGateway::stop`] shuts it
/// down and checks that every VM and tap is gone.
pub struct TestGateway {
    /// The gateway's `state_dir`, removed on drop if the harness owns it.
    state: Option<tempfile::TempDir>,
    state_dir: PathBuf,
    /// A handle on the gateway's taps, for the final check.
    pub net: crate::net::Network,
    running: Option<crate::gateway::Running>,
    http: reqwest::Client,
}

impl TestGateway {
    /// Starts the gateway of `cfg`, whose `state_dir` is `state` (removed
    /// when the harness is dropped); its progress lines go to stderr.
    /// Panics with the whole error chain.
    pub async fn start(state: tempfile::TempDir, cfg: &Config) -> TestGateway {
        let mut gw = TestGateway::start_in(cfg).await;
        gw.state = Some(state);
        gw
    }

    /// [`TestGateway::start`] in a `state_dir` the caller keeps (a test
    /// that starts gateways one after another on one directory).
    pub async fn start_in(cfg: &Config) -> TestGateway {
        let net = crate::net::Network::new(cfg.network.clone()).expect("netlink");
        let running = crate::gateway::start(cfg, &mut std::io::stderr())
            .await
            .unwrap_or_else(|e| panic!("gateway start: {}", crate::display_chain(e.as_ref())));
        TestGateway {
            state: None,
            state_dir: cfg.state_dir.clone(),
            net,
            running: Some(running),
            http: reqwest::Client::new(),
        }
    }

    /// The gateway's `state_dir`.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The running gateway.
    pub fn running(&self) -> &crate::gateway::Running {
        self.running.as_ref().expect("running until stopped")
    }

    /// The pool of `app`.
    pub fn pool(&self, app: &str) -> crate::pool::Pool {
        self.running().proxy.pool(app).expect("a VM or runtime app")
    }

    /// The test's HTTP client (keeps its connections alive).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// A request for `path` on `host`, through the gateway, on a client
    /// that keeps its connections alive.
    pub fn request(&self, host: &str, path: &str) -> reqwest::RequestBuilder {
        self.http
            .get(format!("http://{}{path}", self.running().listen))
            .header("host", host)
    }

    /// `GET path` on `host`: the status and the body.
    pub async fn get(&self, host: &str, path: &str) -> (u16, String) {
        let resp = self
            .request(host, path)
            .send()
            .await
            .expect("the gateway answers");
        (resp.status().as_u16(), resp.text().await.expect("a body"))
    }

    /// The admin listener's `/metrics` text.
    pub async fn metrics(&self) -> String {
        let url = format!("http://{}/metrics", self.running().admin);
        let resp = reqwest::get(url).await.expect("the admin listener answers");
        resp.text().await.expect("a body")
    }

    /// The sum of the samples of `name{labels}` whose labels include
    /// every one given (`name{a="x"}` sums over the other labels), 0 when
    /// there are none.
    pub async fn metric(&self, sample: &str) -> f64 {
        let (name, want) = match sample.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (sample, ""),
        };
        let want: Vec<&str> = want.split(',').filter(|p| !p.is_empty()).collect();
        self.metrics()
            .await
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let (n, labels) = series.split_once('{').unwrap_or((series, "}"));
                let labels: Vec<&str> = labels.trim_end_matches('}').split(',').collect();
                (n == name && want.iter().all(|w| labels.contains(w)))
                    .then(|| value.parse::<f64>().expect("a number"))
            })
            .sum()
    }

    /// Waits until `app`'s pool stats satisfy `cond` (on the pool's stats
    /// watch); panics naming `what` after `within`.
    pub async fn until(
        &self,
        app: &str,
        what: &str,
        within: std::time::Duration,
        cond: impl FnMut(&crate::pool::Stats) -> bool,
    ) -> crate::pool::Stats {
        let mut watch = self.pool(app).watch();
        let waited = tokio::time::timeout(within, watch.wait_for(cond)).await;
        match waited {
            Ok(Ok(stats)) => *stats,
            _ => panic!(
                "{app}: {what}: stats stayed {:?}; last start error: {:?}",
                self.pool(app).stats(),
                self.pool(app).last_error()
            ),
        }
    }

    /// Shuts the gateway down and checks that every VM it had and every
    /// tap of its prefix are gone.
    pub async fn stop(mut self) {
        let running = self.running.take().expect("running until stopped");
        let pids = running.pids();
        running.shutdown().await;
        assert_all_gone(&self.net, &pids).await;
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        // The gateway first (its VMs die with it), then its directory.
        drop(self.running.take());
        drop(self.state.take());
    }
}

/// Whether a process with this pid still runs or is still dying (a
/// zombie whose other threads have not exited yet still holds its fds).
pub fn alive(pid: u32) -> bool {
    crate::vmm::process::liveness(pid) != crate::vmm::process::Liveness::Gone
}

/// Asserts that none of `pids` runs and no tap of `net`'s prefix remains,
/// waiting up to 10 s for exits to finish. Process exits and tap removals
/// have no event a test can wait on from here, so this polls, with a
/// deadline.
pub async fn assert_all_gone(net: &crate::net::Network, pids: &[u32]) {
    use std::time::{Duration, Instant};
    let deadline = Instant::now() + Duration::from_secs(10);
    for &pid in pids {
        while alive(pid) {
            assert!(Instant::now() < deadline, "VMM pid {pid} still runs");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    loop {
        let taps = net.list_taps().await.expect("list taps");
        if taps.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "taps left behind: {taps:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The children of `pid` whose command name (`/proc/PID/comm`) contains
/// `name`: a gateway's VMMs, say. Read from `/proc/PID/task/*/children`
/// (a kernel built with `CONFIG_PROC_CHILDREN`, as Debian's are), which
/// proc(5) calls reliable only while the children do not change: a
/// child started or reaped meanwhile may be missed.
pub fn children_named(pid: u32, name: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let text = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for child in text
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
        {
            let comm = std::fs::read_to_string(format!("/proc/{child}/comm")).unwrap_or_default();
            if comm.contains(name) {
                out.push(child);
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}
