//! `snapgate snapshot build`: boot an app's template, wait until it is
//! ready, snapshot it, and report.
//!
//! Snapshots go to `<snapshot_dir>/<app>/<unix time>/`, and the symlink
//! `<snapshot_dir>/<app>/current` is switched to the new one atomically, so
//! clones of the previous snapshot keep running from files that stay in
//! place.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::config::Config;
use crate::net::Network;
use crate::vmm::cloud_hypervisor::CloudHypervisor;
use crate::vmm::qemu::Qemu;
use crate::vmm::{Snapshot, VmId, Vmm, VmmError, VmmKind};

/// The VMM driver the config asks for.
pub fn driver(config: &Config) -> Result<Arc<dyn Vmm>, VmmError> {
    let binary = config.vmm.binary();
    Ok(match config.vmm.kind {
        VmmKind::Qemu => Arc::new(Qemu::new(
            binary,
            config.vmm.accel,
            &config.state_dir,
            config.network.clone(),
        )?),
        VmmKind::CloudHypervisor => Arc::new(CloudHypervisor::new(
            binary,
            &config.state_dir,
            config.network.clone(),
            config.vmm.memory_restore_mode,
        )),
    })
}

/// The snapshot `current` points at for `app`, if any.
pub fn current_snapshot(snapshot_dir: &Path, app: &str) -> PathBuf {
    snapshot_dir.join(app).join("current")
}

/// What one build produced.
#[derive(Debug)]
pub struct Built {
    /// The app.
    pub app: String,
    /// The snapshot.
    pub snapshot: Snapshot,
    /// Seconds from start of boot to guest ready.
    pub boot_to_ready: f64,
    /// Seconds the snapshot took.
    pub snapshot_secs: f64,
}

/// Builds snapshots for `apps` (all apps when empty), printing progress to
/// `out`.
pub async fn build(
    config: &Config,
    apps: &[String],
    out: &mut (dyn Write + Send),
) -> anyhow::Result<Vec<Built>> {
    for name in apps {
        if !config.apps.contains_key(name) {
            let known: Vec<&str> = config.apps.keys().map(String::as_str).collect();
            anyhow::bail!("no app {name:?} in the config (apps: {})", known.join(", "));
        }
    }
    let selected: Vec<&String> = if apps.is_empty() {
        config.apps.keys().collect()
    } else {
        apps.iter().collect()
    };
    let net = Network::new(config.network.clone())?;
    let vmm = driver(config)?;
    let mut built = Vec::new();
    for app in selected {
        let spec = &config.apps[app].image;
        let started = Instant::now();
        writeln!(out, "{app}: booting template with {}", vmm.kind())?;
        let tap = net.create_tap().await?;
        let mut vm = vmm
            .boot(VmId::new(format!("{app}-template")), spec, tap)
            .await?;
        writeln!(
            out,
            "{app}: VMM pid {}; waiting up to {:?} for GET {} on {} via {}",
            vm.pid(),
            spec.ready_timeout,
            spec.ready_path,
            vm.endpoint().addr,
            vm.endpoint().tap
        )?;
        vmm.wait_ready(&mut vm, spec.ready_timeout).await?;
        let boot_to_ready = started.elapsed().as_secs_f64();
        writeln!(
            out,
            "{app}: ready after {boot_to_ready:.2}s ({})",
            vm.timings()
        )?;
        let app_dir = config.snapshot_dir().join(app);
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis();
        let dest = app_dir.join(stamp.to_string());
        let t = Instant::now();
        let snapshot = vmm.snapshot(vm, &dest).await?;
        let snapshot_secs = t.elapsed().as_secs_f64();
        // Switch `current` atomically: a new link, renamed over the old.
        let tmp = app_dir.join(".current.tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(stamp.to_string(), &tmp)?;
        std::fs::rename(&tmp, current_snapshot(&config.snapshot_dir(), app))?;
        writeln!(
            out,
            "{app}: snapshot {} ({:.1} MiB) in {snapshot_secs:.2}s; {:.2}s in all",
            dest.display(),
            snapshot.size_bytes() as f64 / (1024.0 * 1024.0),
            started.elapsed().as_secs_f64()
        )?;
        built.push(Built {
            app: app.clone(),
            snapshot,
            boot_to_ready,
            snapshot_secs,
        });
    }
    Ok(built)
}
