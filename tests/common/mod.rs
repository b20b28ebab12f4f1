//! Helpers for tests that boot real VMs on real taps.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use snapgate::net::{NetParams, Network};
use snapgate::vmm::{Endpoint, ImageSpec};

/// The test guest built by `scripts/build-guest`.
pub fn guest_dir() -> PathBuf {
    let dir = std::env::var_os("SNAPGATE_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/guest/current"));
    assert!(
        dir.join("vmlinuz").exists(),
        "no test guest in {}: run scripts/build-guest (scripts/test does)",
        dir.display()
    );
    dir
}

/// The Linux test guest as an image spec.
pub fn linux_spec() -> ImageSpec {
    let g = guest_dir();
    serde_yaml_ng::from_str(&format!(
        "kernel: {}\ninitramfs: {}\n\
         cmdline: 'console=ttyS0 quiet panic=-1 tsc_early_khz={{tsc_khz}} cryptomgr.notests \
         ip={{guest_ip}}::{{host_ip}}:{{netmask}}::eth0:off snapgate.port={{guest_port}}'\n\
         ready_timeout: 60s\n",
        g.join("vmlinuz").display(),
        g.join("initramfs.cpio.gz").display()
    ))
    .expect("test spec parses")
}

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

/// Whether a process with this pid still runs (zombies count as gone).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s[s.rfind(')').unwrap_or(0)..].starts_with(") Z"),
        Err(_) => false,
    }
}

/// Asserts that no tap with the network's prefix and none of `pids` remain
/// (waiting up to 10 s for exits to finish).
pub async fn assert_all_gone(net: &Network, pids: &[u32]) {
    for &pid in pids {
        assert!(
            eventually(Duration::from_secs(10), || !alive(pid)).await,
            "VMM pid {pid} still runs"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let taps = net.list_taps().await.expect("list taps");
        if taps.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "taps left behind: {taps:?}");
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
