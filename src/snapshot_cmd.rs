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

use crate::config::{Config, RuntimeAppConfig, RuntimeConfig, StartFrom, Upstream};
use crate::net::Network;
use crate::runtime::{self, AppTemplate, CodeImage, CodeSource, StartSpec};
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

/// One snapshot to take: where it goes (`<snapshot_dir>/<name>/`), what
/// the template boots, and what runs on the ready template first.
pub struct Job {
    /// The directory name under `snapshot_dir`.
    pub name: String,
    /// What the template boots.
    pub spec: ImageSpec,
    /// What runs on the ready template before the snapshot.
    pub prepare: Option<Box<dyn Prepare>>,
}

impl Job {
    /// A VM app's own snapshot. Its `on_restore` hook is not part of it:
    /// clones take the hook from the config, so changing it rebuilds
    /// nothing.
    pub fn vm_app(app: &str, spec: &ImageSpec) -> Job {
        let mut spec = spec.clone();
        spec.on_restore = None;
        Job {
            name: app.to_owned(),
            spec,
            prepare: None,
        }
    }

    /// A runtime's shared snapshot.
    pub fn runtime(name: &str, runtime: &RuntimeConfig) -> Job {
        Job {
            name: runtime::snapshot_name(name),
            spec: runtime.spec(),
            prepare: None,
        }
    }

    /// The own snapshot of runtime app `app` (`snapshot: app`), with its
    /// code packed as `code`.
    pub fn app_in_runtime(
        app: &str,
        cfg: &RuntimeAppConfig,
        runtime: &RuntimeConfig,
        code: &CodeImage,
    ) -> Job {
        Job {
            name: app.to_owned(),
            spec: runtime::app_image(runtime, &code.path),
            prepare: Some(Box::new(AppTemplate {
                start: StartSpec::new(app, cfg, runtime),
            })),
        }
    }

    /// The snapshot `app` starts from (packing its code if it needs it), or
    /// `None` for a static app.
    pub fn for_app(config: &Config, app: &str) -> anyhow::Result<Option<Job>> {
        Ok(Some(match config.apps[app].upstream() {
            Upstream::Static(_) => return Ok(None),
            Upstream::Vm(spec, _) => Job::vm_app(app, spec),
            Upstream::Runtime(cfg, _) => {
                let rt = &config.runtimes[&cfg.name];
                match cfg.snapshot {
                    StartFrom::Runtime => Job::runtime(&cfg.name, rt),
                    StartFrom::App => {
                        let code = CodeSource::for_app(config, app, cfg).current()?;
                        Job::app_in_runtime(app, cfg, rt, &code)
                    }
                }
            }
        }))
    }

    /// The spec the snapshot records: what `prepare` leaves, or the boot spec.
    fn recorded_spec(&self) -> ImageSpec {
        match &self.prepare {
            Some(p) => p.prepared_spec(&self.spec),
            None => self.spec.clone(),
        }
    }
}

/// Takes snapshots with one VMM driver, into one `snapshot_dir`.
pub struct Builder<'a> {
    vmm: &'a dyn Vmm,
    net: &'a Network,
    snapshot_dir: PathBuf,
}

impl<'a> Builder<'a> {
    /// Snapshots taken by `vmm` on taps of `net`, kept in `snapshot_dir`.
    pub fn new(vmm: &'a dyn Vmm, net: &'a Network, snapshot_dir: PathBuf) -> Builder<'a> {
        Builder {
            vmm,
            net,
            snapshot_dir,
        }
    }

    /// Boots the job's template, waits until ready, runs its `prepare`,
    /// snapshots it into a new directory and points `current` at it.
    /// Progress goes to `out`.
    pub async fn build(&self, job: &Job, out: &mut (dyn Write + Send)) -> anyhow::Result<Snapshot> {
        let _lock = lock(&self.snapshot_dir, &job.name).await?;
        self.build_locked(job, out).await
    }

    /// The job's current snapshot if it was taken from the job as it is
    /// now, else a freshly built one.
    pub async fn ensure(
        &self,
        job: &Job,
        out: &mut (dyn Write + Send),
    ) -> anyhow::Result<Snapshot> {
        let name = &job.name;
        let _lock = lock(&self.snapshot_dir, name).await?;
        let current = current_snapshot(&self.snapshot_dir, name);
        let vmm = self.vmm;
        match Snapshot::open(&current) {
            Ok(s) if s.is_current_for(vmm.kind(), vmm.accel(), &job.recorded_spec(), vmm.net()) => {
                writeln!(out, "{name}: using snapshot {}", current.display())?;
                return Ok(s);
            }
            Ok(_) => writeln!(
                out,
                "{name}: snapshot is stale (image, spec, network, VMM or accelerator changed)"
            )?,
            Err(_) if !current.exists() => writeln!(out, "{name}: no snapshot yet")?,
            Err(e) => writeln!(out, "{name}: snapshot unusable: {e}")?,
        }
        self.build_locked(job, out).await
    }

    async fn build_locked(
        &self,
        job: &Job,
        out: &mut (dyn Write + Send),
    ) -> anyhow::Result<Snapshot> {
        let (vmm, app, spec) = (self.vmm, &job.name, &job.spec);
        let started = Instant::now();
        writeln!(out, "{app}: booting template with {}", vmm.kind())?;
        let tap = self.net.create_tap().await?;
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
        if let Err(e) = crate::vmm::ready::wait_ready(vmm, &mut vm, spec.ready_timeout).await {
            return Err(crate::vmm::discard(vmm, vm, e).await.into());
        }
        let boot_to_ready = started.elapsed().as_secs_f64();
        writeln!(
            out,
            "{app}: ready after {boot_to_ready:.2}s ({})",
            vm.timings()
        )?;
        if let Some(prepare) = &job.prepare {
            let t = Instant::now();
            if let Err(e) = prepare.prepare(vmm, &mut vm).await {
                return Err(crate::vmm::discard(vmm, vm, e).await.into());
            }
            writeln!(
                out,
                "{app}: prepared in {:.2}s; GET {} on {} answers 200",
                t.elapsed().as_secs_f64(),
                vm.ready_path(),
                vm.endpoint().addr
            )?;
        }
        let app_dir = self.snapshot_dir.join(app);
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
        std::fs::rename(&tmp, current_snapshot(&self.snapshot_dir, app))?;
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
}

/// `snapgate snapshot build`: builds the snapshots `apps` start from (every
/// VM and runtime app when empty): a VM app's own; for a runtime app, its
/// runtime's shared snapshot (once), or with `snapshot: app` the app's own.
pub async fn build(
    config: &Config,
    apps: &[String],
    out: &mut (dyn Write + Send),
) -> anyhow::Result<Vec<Snapshot>> {
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
    let builder = Builder::new(vmm.as_ref(), &net, config.snapshot_dir());
    let mut built = Vec::new();
    let mut done = std::collections::HashSet::new();
    for app in selected {
        let job = Job::for_app(config, app)?.expect("static apps were filtered out");
        // Apps of one runtime share its snapshot: built once.
        if done.insert(job.name.clone()) {
            built.push(builder.build(&job, out).await?);
        }
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
