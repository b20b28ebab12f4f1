//! The runtime tests' harness: the Node.js runtime `node` and JS apps.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use snapgate::testing::{runtime_gateway_config, TestGateway};

/// A JS app that answers with its name, version and environment. A
/// CommonJS module that listens only when it is the main module (as Node's
/// own entry point would run it), or with `esm` an ES module package.
pub fn write_app(dir: &Path, name: &str, version: u32) {
    write_js_app(dir, name, version, false)
}

pub fn write_js_app(dir: &Path, name: &str, version: u32, esm: bool) {
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
pub fn app_entry(name: &str, code: &Path, extra: &str, pool: &str) -> String {
    format!(
        "  {name}:\n    hosts: [{name}.test]\n    runtime: {{ name: node, code: {}, main: server.js{extra} }}\n    pool: {pool}\n",
        code.display()
    )
}

/// The shared harness ([`TestGateway`]) with the Node.js runtime `node`;
/// apps are on `<app>.test`.
pub struct Gw {
    gw: TestGateway,
    pub snapshots: PathBuf,
}

impl std::ops::Deref for Gw {
    type Target = TestGateway;
    fn deref(&self) -> &TestGateway {
        &self.gw
    }
}

impl Gw {
    pub async fn start(prefix: &str, runtime_min_warm: usize, apps: &str, snapshots: &Path) -> Gw {
        let state = tempfile::tempdir().unwrap();
        let cfg = runtime_gateway_config(state.path(), prefix, runtime_min_warm, apps, snapshots);
        Gw {
            gw: TestGateway::start(state, &cfg).await,
            snapshots: snapshots.to_owned(),
        }
    }

    pub async fn get(&self, app: &str, path: &str) -> (u16, String) {
        self.gw.get(&format!("{app}.test"), path).await
    }

    /// Waits, at most `within`, until `app` has `n` instances and no
    /// restore in flight.
    pub async fn wait_warm(&self, app: &str, n: usize, within: Duration) {
        let what = format!("{n} warm instances");
        self.until(app, &what, within, |s| s.instances == n && s.restoring == 0)
            .await;
    }

    pub fn runtime_stock(&self) -> (usize, usize) {
        self.running()
            .runtime("node")
            .expect("the node runtime")
            .stock()
    }

    /// Shuts the gateway down and checks that every VM and tap is gone.
    pub async fn stop(self) {
        self.gw.stop().await;
    }
}

/// Asserts that the `now=` an app answered (its `Date.now()`) is within a
/// second of the host's clock: a clone's clock resumes from the snapshot's
/// moment unless snapgate sets it.
pub fn assert_clock_is_set(body: &str) {
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
pub fn current_snapshot(snapshots: &Path, name: &str) -> PathBuf {
    std::fs::canonicalize(snapshots.join(name).join("current"))
        .unwrap_or_else(|e| panic!("{name}: no current snapshot: {e}"))
}
