//! Building snapshots: `snapgate snapshot build`, and `snapgate run` for apps
//! whose snapshot is missing or stale.
//!
//! Builds of one app's snapshots take an exclusive lock on
//! `<snapshot_dir>/<app>/.lock` (flock), held from the staleness check to
//! the switch of `current`: two gateways, or a gateway and `snapgate
//! snapshot build`, never build the same snapshot twice at once, and the
//! second finds the first's result.
//!
//! Snapshots go to `<snapshot_dir>/<app>/<unix ms>/`, and the symlink
//! `<snapshot_dir>/<app>/current` is switched to the new one atomically, so
//! clones of the previous snapshot keep running from files that stay in
//! place. The newest [`KEEP`] snapshots of an app are kept; older ones are
//! removed after a build (a clone still mapping a removed memory file keeps
//! its pages: Linux frees the file when the last mapping goes).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;

use crate::config::Config;
use crate::net::Network;
use crate::vmm::cloud_hypervisor::CloudHypervisor;
use crate::vmm::qemu::Qemu;
use crate::vmm::{ImageSpec, Snapshot, Vm, VmId, Vmm, VmmError, VmmKind};

/// A step between a template's readiness and its snapshot: a per-app
/// snapshot of a runtime app starts the app here.
#[async_trait]
pub trait Prepare: Send + Sync {
    /// Runs on the ready template; may change what it serves
    /// ([`Vm::serve_at`]): the snapshot records the spec as it is after.
    async fn prepare(&self, vmm: &dyn Vmm, vm: &mut Vm) -> Result<(), VmmError>;
    /// The spec a snapshot prepared from `boot` records.
    fn prepared_spec(&self, boot: &ImageSpec) -> ImageSpec;
}

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

/// Snapshots kept per app: the current one and the one before it.
pub const KEEP: usize = 2;

/// Removes all but the newest `keep` snapshot directories (named by their
/// creation time in ms) of one app; returns what it removed.
pub fn prune(app_dir: &Path, keep: usize) -> Vec<PathBuf> {
    let mut dirs: Vec<(u128, PathBuf)> = std::fs::read_dir(app_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path())))
        .collect();
    dirs.sort();
    let old = dirs.len().saturating_sub(keep);
    dirs.into_iter()
        .take(old)
        .filter(|(_, dir)| std::fs::remove_dir_all(dir).is_ok())
        .map(|(_, dir)| dir)
        .collect()
}

/// The link to the snapshot in use for `app`.
pub fn current_snapshot(snapshot_dir: &Path, app: &str) -> PathBuf {
    snapshot_dir.join(app).join("current")
}

/// Takes the build lock of `app`'s snapshots, waiting while another
/// process holds it (see the module doc).
async fn lock(snapshot_dir: &Path, app: &str) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    let dir = snapshot_dir.join(app);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)?;
    tokio::task::spawn_blocking(move || {
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| anyhow::anyhow!("locking {}: {e}", path.display()))
    })
    .await?
}

/// Boots `app`'s template from `spec`, waits until ready, runs `prepare`
/// if given, snapshots it into a new directory and points `current` at it.
/// Progress goes to `out`.
pub async fn build_one(
    vmm: &dyn Vmm,
    net: &Network,
    snapshot_dir: &Path,
    app: &str,
    spec: &ImageSpec,
    prepare: Option<&dyn Prepare>,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<Snapshot> {
    let _lock = lock(snapshot_dir, app).await?;
    build_locked(vmm, net, snapshot_dir, app, spec, prepare, out).await
}

async fn build_locked(
    vmm: &dyn Vmm,
    net: &Network,
    snapshot_dir: &Path,
    app: &str,
    spec: &ImageSpec,
    prepare: Option<&dyn Prepare>,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<Snapshot> {
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
    if let Some(prepare) = prepare {
        let t = Instant::now();
        prepare.prepare(vmm, &mut vm).await?;
        writeln!(
            out,
            "{app}: prepared in {:.2}s; GET {} on {} answers 200",
            t.elapsed().as_secs_f64(),
            vm.ready_path(),
            vm.endpoint().addr
        )?;
    }
    let app_dir = snapshot_dir.join(app);
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis()
        .to_string();
    let dest = app_dir.join(&stamp);
    let t = Instant::now();
    let snapshot = vmm.snapshot(vm, &dest).await?;
    let snapshot_secs = t.elapsed().as_secs_f64();
    // Switch `current` atomically: a new link, renamed over the old.
    let tmp = app_dir.join(format!(".current.{}.{stamp}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&stamp, &tmp)?;
    std::fs::rename(&tmp, current_snapshot(snapshot_dir, app))?;
    for removed in prune(&app_dir, KEEP) {
        writeln!(out, "{app}: removed old snapshot {}", removed.display())?;
    }
    writeln!(
        out,
        "{app}: snapshot {} ({:.1} MiB) in {snapshot_secs:.2}s; {:.2}s in all",
        dest.display(),
        snapshot.size_bytes() as f64 / (1024.0 * 1024.0),
        started.elapsed().as_secs_f64()
    )?;
    Ok(snapshot)
}

/// The current snapshot of `app` if it was taken from `spec` (and
/// `prepare`) as they are now, else a freshly built one.
pub async fn ensure(
    vmm: &dyn Vmm,
    net: &Network,
    snapshot_dir: &Path,
    app: &str,
    spec: &ImageSpec,
    prepare: Option<&dyn Prepare>,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<Snapshot> {
    let _lock = lock(snapshot_dir, app).await?;
    let current = current_snapshot(snapshot_dir, app);
    let recorded = match prepare {
        Some(p) => p.prepared_spec(spec),
        None => spec.clone(),
    };
    match Snapshot::open(&current) {
        Ok(s) if s.is_current_for(vmm.kind(), vmm.accel(), &recorded, vmm.net()) => {
            writeln!(out, "{app}: using snapshot {}", current.display())?;
            return Ok(s);
        }
        Ok(_) => writeln!(
            out,
            "{app}: snapshot is stale (image, spec, network, VMM or accelerator changed)"
        )?,
        Err(_) if !current.exists() => writeln!(out, "{app}: no snapshot yet")?,
        Err(e) => writeln!(out, "{app}: snapshot unusable: {e}")?,
    }
    build_locked(vmm, net, snapshot_dir, app, spec, prepare, out).await
}

/// `snapgate snapshot build`: builds the snapshots `apps` start from (every
/// VM and runtime app when empty): a VM app's own; for a runtime app, its
/// runtime's shared snapshot, or with `snapshot: app` the app's own.
pub async fn build(
    config: &Config,
    apps: &[String],
    out: &mut (dyn Write + Send),
) -> anyhow::Result<Vec<Snapshot>> {
    use crate::config::{StartFrom, Upstream};
    use crate::runtime::{self, AppTemplate, CodeSource, StartSpec};
    let vm_apps: Vec<&String> = config
        .apps
        .iter()
        .filter(|(_, a)| !matches!(a.upstream(), Upstream::Static(_)))
        .map(|(n, _)| n)
        .collect();
    for name in apps {
        if !vm_apps.contains(&name) {
            let known: Vec<&str> = vm_apps.iter().map(|s| s.as_str()).collect();
            anyhow::bail!(
                "no VM or runtime app {name:?} in the config (they are: {})",
                known.join(", ")
            );
        }
    }
    let selected: Vec<&String> = if apps.is_empty() {
        vm_apps
    } else {
        apps.iter().collect()
    };
    let net = Network::new(config.network.clone())?;
    let vmm = driver(config)?;
    let dir = config.snapshot_dir();
    let mut built = Vec::new();
    let mut runtimes_built = Vec::new();
    for app in selected {
        let snapshot = match config.apps[app].upstream() {
            Upstream::Vm(spec, _) => {
                build_one(vmm.as_ref(), &net, &dir, app, spec, None, out).await?
            }
            Upstream::Runtime(rt_app, _) => {
                let rt = &config.runtimes[&rt_app.name];
                match rt_app.snapshot {
                    StartFrom::Runtime if runtimes_built.contains(&rt_app.name) => continue,
                    StartFrom::Runtime => {
                        runtimes_built.push(rt_app.name.clone());
                        let name = runtime::snapshot_name(&rt_app.name);
                        build_one(vmm.as_ref(), &net, &dir, &name, &rt.spec(), None, out).await?
                    }
                    StartFrom::App => {
                        let code = CodeSource::new(
                            app,
                            &rt_app.code,
                            &config.code_cache(app),
                            rt.code_disk_mib,
                        )
                        .current()?;
                        let spec = runtime::app_image(rt, &code.path);
                        let template = AppTemplate {
                            start: StartSpec::new(app, rt_app, rt),
                        };
                        build_one(vmm.as_ref(), &net, &dir, app, &spec, Some(&template), out)
                            .await?
                    }
                }
            }
            Upstream::Static(_) => unreachable!("filtered above"),
        };
        built.push(snapshot);
    }
    Ok(built)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_keeps_the_newest_snapshots_and_nothing_else_is_touched() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["100", "20", "3000", "400"] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
        }
        std::os::unix::fs::symlink("3000", dir.path().join("current")).unwrap();
        std::fs::create_dir(dir.path().join("notes")).unwrap();
        let mut removed = prune(dir.path(), 2);
        removed.sort();
        assert_eq!(removed, vec![dir.path().join("100"), dir.path().join("20")]);
        for kept in ["400", "3000", "current", "notes"] {
            assert!(dir.path().join(kept).exists(), "{kept}");
        }
    }
}
