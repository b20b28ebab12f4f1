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
