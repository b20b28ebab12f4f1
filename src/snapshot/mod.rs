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
//! `<snapshot_dir>/<app>/current` is switched to the new one atomically.
//! A gateway opens the snapshot `current` names at its own directory and
//! pins it ([`pin`]) for as long as it runs, so a later build changes
//! nothing for it. After a build the newest [`KEEP`] snapshots of the app
//! are kept, and any older one a gateway pins; the rest are removed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use async_trait::async_trait;

use crate::net::Network;
use crate::vmm::{ImageSpec, Snapshot, Vm, VmId, Vmm};

/// Why a [`Prepare`] step failed: its own layer's error.
pub type PrepareError = Box<dyn std::error::Error + Send + Sync>;

/// A step between a template's readiness and its snapshot: a per-app
/// snapshot of a runtime app starts the app here.
#[async_trait]
pub trait Prepare: Send + Sync {
    /// Runs on the ready template; may change what it serves
    /// ([`Vm::serve_at`]): the snapshot records the spec as it is after.
    async fn prepare(&self, vmm: &dyn Vmm, vm: &mut Vm) -> Result<(), PrepareError>;
    /// The spec a snapshot prepared from `boot` records.
    fn prepared_spec(&self, boot: &ImageSpec) -> ImageSpec;
}

pub mod pin;

pub use pin::Pin;

/// Snapshots kept per app: the current one and the one before it (and any
/// older one a gateway still serves: see [`pin`]).
pub const KEEP: usize = 2;

/// Removes all but the newest `keep` snapshot directories (named by their
/// creation time in ms) of one app, skipping those a process pins (its
/// `manifest.json`: [`pin_snapshot`]); returns what it removed.
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
        .filter(|(_, dir)| {
            let manifest = dir.join("manifest.json");
            if !manifest.exists() {
                // Unfinished (a build that died): nobody can serve it.
                return std::fs::remove_dir_all(dir).is_ok();
            }
            pin::unless_pinned(&manifest, || std::fs::remove_dir_all(dir).is_ok())
        })
        .map(|(_, dir)| dir)
        .collect()
}

/// Pins `snapshot` for this process: no prune removes it while the pin
/// lives ([`pin`]).
pub fn pin_snapshot(snapshot: &Snapshot) -> std::io::Result<Pin> {
    pin::pin(&snapshot.dir().join("manifest.json"))
}

/// The directory `current` points at, so a gateway keeps restoring from
/// the snapshot it chose even when a later build switches `current`.
fn resolve_current(current: &Path) -> PathBuf {
    match std::fs::read_link(current) {
        Ok(target) => current.parent().map_or(target.clone(), |p| p.join(target)),
        Err(_) => current.to_owned(),
    }
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
    // flock(2) gives no event to await, and a blocking wait on a thread
    // would keep the process alive past a signal: try without blocking,
    // pausing between tries, so dropping this future ends the wait.
    let mut file = file;
    loop {
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((back, nix::errno::Errno::EWOULDBLOCK)) => {
                file = back;
                tokio::time::sleep(LOCK_RETRY).await;
            }
            Err((_, e)) => anyhow::bail!("locking {}: {e}", path.display()),
        }
    }
}

/// How often a build waiting for another's lock tries again.
const LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(50);

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
    /// now, else a freshly built one; pinned for this process (taken under
    /// the build lock, so no prune can slip in between), and opened at its
    /// own directory, not through `current`: a later build that switches
    /// `current` changes nothing for this process.
    pub async fn ensure(
        &self,
        job: &Job,
        out: &mut (dyn Write + Send),
    ) -> anyhow::Result<(Snapshot, Pin)> {
        let name = &job.name;
        let _lock = lock(&self.snapshot_dir, name).await?;
        let current = current_snapshot(&self.snapshot_dir, name);
        let vmm = self.vmm;
        let snapshot = match Snapshot::open(&resolve_current(&current)) {
            Ok(s) if s.is_current_for(vmm.kind(), vmm.accel(), &job.recorded_spec(), vmm.net()) => {
                writeln!(out, "{name}: using snapshot {}", s.dir().display())?;
                s
            }
            stale => {
                match stale {
                    Ok(_) => writeln!(
                        out,
                        "{name}: snapshot is stale (image, spec, network, VMM or accelerator changed)"
                    )?,
                    Err(_) if !current.exists() => writeln!(out, "{name}: no snapshot yet")?,
                    Err(e) => writeln!(out, "{name}: snapshot unusable: {e}")?,
                }
                self.build_locked(job, out).await?
            }
        };
        let pin = pin_snapshot(&snapshot)
            .with_context(|| format!("{name}: pinning {}", snapshot.dir().display()))?;
        Ok((snapshot, pin))
    }

    async fn build_locked(
        &self,
        job: &Job,
        out: &mut (dyn Write + Send),
    ) -> anyhow::Result<Snapshot> {
        let (vmm, app, spec) = (self.vmm, &job.name, &job.spec);
        let started = Instant::now();
        // Under systemd (Type=notify), each build extends the start-up
        // timeout by what it may take: its boot's ready_timeout and two
        // minutes for the rest (sd_notify(3), EXTEND_TIMEOUT_USEC).
        let may_take = spec.ready_timeout + std::time::Duration::from_secs(120);
        let usec = u32::try_from(may_take.as_micros()).unwrap_or(u32::MAX);
        if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::ExtendTimeoutUsec(usec)]) {
            tracing::warn!("telling the service manager the build may take {may_take:?}: {e}");
        }
        writeln!(out, "{app}: booting template with {}", vmm.kind())?;
        let tap = self.net.create_tap().await?;
        let mut vm = vmm
            .boot(VmId::unique(&format!("{app}-template")), spec, tap)
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
        let ready = crate::vmm::ready::wait_ready(vmm, &mut vm, spec.ready_timeout);
        if let Err(e) = progress(format!("{app}: booting, waiting for ready"), ready).await {
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
            let prepared = prepare.prepare(vmm, &mut vm);
            if let Err(e) = progress(format!("{app}: preparing"), prepared).await {
                let e = crate::vmm::discard(vmm, vm, e).await;
                return Err(anyhow::anyhow!("{}", crate::display_chain(&*e)));
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
        let snapshot = progress(
            format!("{app}: taking the snapshot"),
            vmm.snapshot(vm, &dest),
        )
        .await?;
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

/// Runs `step`, showing `label`, a spinner and the time taken on stderr
/// while it runs, if stderr is a terminal (`indicatif` draws nothing
/// otherwise: logs and pipes get only the step lines).
async fn progress<T>(label: String, step: impl std::future::Future<Output = T>) -> T {
    let bar = indicatif::ProgressBar::new_spinner().with_message(label);
    if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
        bar.set_style(style);
    }
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let out = step.await;
    bar.finish_and_clear();
    out
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
