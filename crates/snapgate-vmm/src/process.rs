//! VMM processes: spawning with inherited fds, pid files, clean-up.
//!
//! Each VM gets `<state_dir>/run/<id>/` (control socket, VMM log, serial
//! console) and `<state_dir>/vms/<id>.pid` holding `<pid> <start time>
//! <tap or -> <owner pid> <owner start time>`, the owner being the process
//! that spawned the VMM. A start time (field 22 of `/proc/<pid>/stat`)
//! guards against taking an unrelated process that reused a recorded pid
//! for the VMM or its owner. [`kill_stale`] kills only VMMs whose owner is
//! gone.
//!
//! A VMM's exit is an event: each process has a pidfd (pidfd_open(2)),
//! readable once it has exited ([`VmProcess::exit_event`]); any number of
//! waiters can wait on it without reaping or polling. Whether it is
//! exiting already (killed, its threads winding down) is read, when asked
//! ([`VmProcess::is_exiting`]: every lease asks), from its
//! `/proc/<pid>/status`, held open from spawn and read with one `pread`.
//!
//! VMMs run in their own process group, so a Ctrl-C at the gateway's terminal
//! reaches only the gateway, which then stops its VMs itself. Each VMM also
//! gets `PR_SET_PDEATHSIG(SIGKILL)`: if the gateway dies without stopping
//! them (SIGKILL, a crash), the kernel kills them, and their taps go with
//! them. Pid files cover what that cannot (a VMM spawned from a thread that
//! has since exited; another process that reuses the state directory).
//!
//! A VMM may run without transparent huge pages (`PR_SET_THP_DISABLE`,
//! prctl(2): inherited across execve): see
//! [`Launch::transparent_huge_pages`].

use std::ffi::OsString;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use command_fds::{CommandFdExt, FdMapping};
use tokio::io::unix::AsyncFd;
use tokio::process::{Child, Command};

use super::jail::Confinement;
use super::{VmId, VmmError};

/// A VMM process owned by one [`super::Vm`].
#[derive(Debug)]
pub struct VmProcess {
    id: VmId,
    child: Child,
    pid: u32,
    run_dir: PathBuf,
    pid_file: PathBuf,
    exit: Option<ExitStatus>,
    /// The process's pidfd (pidfd_open(2)): readable once it has exited.
    pidfd: Option<Arc<AsyncFd<OwnedFd>>>,
    /// Its uid, cgroup and root (`None`: not jailed), released once the
    /// process is reaped (crate::jail, protocol step 5).
    confinement: Option<Confinement>,
    /// Its `/proc/<pid>/status`, held open: [`VmProcess::is_exiting`]
    /// reads it with one `pread` (every lease asks). Tied to this process,
    /// not to its pid: once it is reaped, reads fail (`ESRCH`), whoever
    /// gets the pid next. `None` if it could not be opened.
    status: Option<std::fs::File>,
}

/// A VM's run directory until its VMM process owns it ([`VmProcess`]
/// removes it when dropped): removed when this is dropped before
/// [`PendingRunDir::owned`], so a
/// start that fails before its VMM runs (its jail or its spawn) leaves
/// nothing behind, not even a directory the jail gave the VMM's uid.
#[derive(Debug)]
pub struct PendingRunDir(Option<PathBuf>);

impl PendingRunDir {
    /// Guards `dir`.
    pub fn new(dir: &Path) -> PendingRunDir {
        PendingRunDir(Some(dir.to_owned()))
    }

    /// The VMM process owns the directory now.
    pub fn owned(mut self) {
        self.0 = None;
    }
}

impl Drop for PendingRunDir {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The run directory of `id` under `state_dir`, emptied and created.
pub fn make_run_dir(state_dir: &Path, id: &VmId) -> Result<PathBuf, VmmError> {
    let dir = state_dir.join("run").join(id.as_str());
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|source| VmmError::Io {
            what: "cannot clear run directory",
            path: dir.clone(),
            source,
        })?;
    }
    std::fs::create_dir_all(&dir).map_err(|source| VmmError::Io {
        what: "cannot create run directory",
        path: dir.clone(),
        source,
    })?;
    Ok(dir)
}

/// What [`VmProcess::spawn`] starts.
pub struct Launch<'a> {
    /// The VMM binary.
    pub binary: &'a Path,
    /// Its arguments.
    pub args: &'a [OsString],
    /// Each `(fd, n)` is inherited as fd `n`.
    pub fds: Vec<(OwnedFd, i32)>,
    /// The VM's tap, recorded in the pid file.
    pub tap: Option<&'a str>,
    /// `false`: the VMM runs with transparent huge pages disabled for all
    /// its mappings (`PR_SET_THP_DISABLE`), best effort (a kernel that
    /// refuses costs only memory); `true`: as the gateway runs. Off for a
    /// clone, whose guest RAM is a private file mapping: THP does not back
    /// the pages it copies on write, and QEMU's own buffers would
    /// otherwise be rounded up to 2 MiB pages touched in part (3 MiB a
    /// clone of the test guest under TCG; BENCHMARKS.md). The cost: where
    /// snapshots sit on a `huge=` tmpfs, a clone maps their shared pages
    /// 4 KiB at a time (more TLB misses), not 2 MiB.
    pub transparent_huge_pages: bool,
    /// The jail the VMM enters between fork and exec (crate::jail), or
    /// `None` to run it as the gateway runs.
    pub confinement: Option<Confinement>,
}

impl VmProcess {
    /// Starts `launch.binary launch.args...` with each `(fd, n)` of
    /// `launch.fds` inherited as fd `n`, stdout and stderr to
    /// `<run_dir>/vmm.log`, and records its pid and the VM's tap (so a later
    /// start-up can remove exactly this tap if the process outlives its
    /// gateway).
    pub fn spawn(
        id: &VmId,
        launch: Launch<'_>,
        run_dir: &Path,
        state_dir: &Path,
    ) -> Result<VmProcess, VmmError> {
        let Launch {
            binary,
            args,
            fds,
            tap,
            transparent_huge_pages,
            mut confinement,
        } = launch;
        let plan = confinement.as_mut().and_then(Confinement::take_plan);
        let (log, log2) = open_log(run_dir)?;
        let mut cmd = Command::new(binary);
        cmd.args(args)
            // A gateway under systemd (Type=notify) has the service
            // manager's socket in its environment: the VMM is not the
            // service and must not speak for it (sd_notify(3)).
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .current_dir(run_dir)
            .process_group(0)
            .kill_on_drop(true);
        // Every other fd the gateway has (some inherited from whatever
        // started it) is closed in the VMM.
        let first_unmapped = fds.iter().map(|(_, n)| n + 1).max().unwrap_or(3).max(3) as u32;
        let mappings = fds
            .into_iter()
            .map(|(parent_fd, child_fd)| FdMapping {
                parent_fd,
                child_fd,
            })
            .collect();
        cmd.fd_mappings(mappings).map_err(|e| VmmError::FdMapping {
            problem: e.to_string(),
        })?;
        let parent = std::process::id();
        #[allow(unsafe_code)]
        // SAFETY: runs in the forked child before exec and only makes
        // async-signal-safe calls (prctl, getppid, _exit), allocating nothing.
        unsafe {
            cmd.pre_exec(move || {
                // The VMM needs no capability: the tap it is given is open.
                // A gateway run with ambient capabilities (a systemd unit's
                // AmbientCapabilities=CAP_NET_ADMIN) would otherwise hand
                // them on through exec (capabilities(7), "Ambient").
                if nix::libc::prctl(
                    nix::libc::PR_CAP_AMBIENT,
                    nix::libc::PR_CAP_AMBIENT_CLEAR_ALL as nix::libc::c_ulong,
                    0 as nix::libc::c_ulong,
                    0 as nix::libc::c_ulong,
                    0 as nix::libc::c_ulong,
                ) != 0
                {
                    // EINVAL: a kernel before 4.3, which has no ambient set.
                    let e = std::io::Error::last_os_error();
                    if e.raw_os_error() != Some(nix::libc::EINVAL) {
                        return Err(e);
                    }
                }
                if !transparent_huge_pages {
                    // Best effort: without it the VMM only uses more memory.
                    let _ = nix::sys::prctl::set_thp_disable(true);
                }
                if let Some(plan) = &plan {
                    plan.enter()?;
                }
                // close_range(2) (Linux 5.9): a kernel without it leaves
                // them (they are close-on-exec where the gateway opened them).
                nix::libc::syscall(nix::libc::SYS_close_range, first_unmapped, u32::MAX, 0);
                // After the jail: a uid change clears the death signal.
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
                // The parent may have died before prctl took effect.
                if nix::unistd::getppid().as_raw() as u32 != parent {
                    nix::libc::_exit(1);
                }
                Ok(())
            });
        }
        let child = match cmd.spawn() {
            Ok(child) => child,
            Err(source) => {
                // A jail step that failed in the child wrote its name to
                // the log (crate::jail::Plan::enter).
                let log = read_vm_file(&run_dir.join("vmm.log"));
                if let Some(step) = log.lines().rev().find_map(|l| {
                    l.strip_prefix("snapgate jail: ")
                        .map(|s| s.trim_end_matches(" failed").to_owned())
                }) {
                    return Err(VmmError::JailEntry {
                        vm: id.clone(),
                        step,
                        source,
                    });
                }
                return Err(VmmError::Spawn {
                    binary: binary.to_owned(),
                    source,
                });
            }
        };
        // The parent's copies of the mapped fds were moved into `cmd` and are
        // closed when it drops here, so the tap lives only in the child.
        drop(cmd);
        let pid = child.id().unwrap_or(0);
        let pidfd = exit_fd(pid);
        let status = std::fs::File::open(format!("/proc/{pid}/status")).ok();
        let pid_file = state_dir.join("vms").join(format!("{id}.pid"));
        let record = record_pid(&pid_file, pid, tap);
        let process = VmProcess {
            id: id.clone(),
            child,
            pid,
            run_dir: run_dir.to_owned(),
            pid_file: pid_file.clone(),
            exit: None,
            pidfd,
            status,
            confinement,
        };
        record.map_err(|source| VmmError::Io {
            what: "cannot record pid in",
            path: pid_file,
            source,
        })?;
        Ok(process)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The VM's run directory.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The serial console log (drivers point the guest's console here).
    pub fn console_path(&self) -> PathBuf {
        self.run_dir.join("console.log")
    }

    /// Whether the process is exiting or has exited: [`VmProcess::exited`],
    /// or its main thread is a zombie while other threads still wind down
    /// (a VMM killed a moment ago cannot be waited on until the last of its
    /// threads is gone). One `wait4` and one read of `/proc/<pid>/status`.
    pub fn is_exiting(&mut self) -> bool {
        if self.exited().is_some() {
            return true;
        }
        // Our child is in /proc until reaped: an unreadable entry says
        // nothing about it, so only a zombie main thread counts.
        let liveness = match &self.status {
            Some(file) => liveness_of_file(file, self.pid),
            None => liveness(self.pid),
        };
        liveness == Liveness::Dying
    }

    /// `Some(status)` once the process has exited (a non-blocking check).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exit = Some(status);
            }
        }
        self.exit
    }

    /// A future that completes when the process exits: it waits on the
    /// process's pidfd, so any number of them can wait without reaping the
    /// process or polling. Pends for ever if the kernel gave no pidfd
    /// (Linux before 5.3; logged at spawn).
    pub fn exit_event(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let fd = self.pidfd.clone();
        async move {
            match fd {
                Some(fd) => {
                    if let Err(e) = fd.readable().await {
                        tracing::warn!("waiting on a VMM's pidfd: {e}");
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending().await,
            }
        }
    }

    /// Waits until the process exits; its status. Cancel-safe: dropping
    /// the future loses nothing. An error means the process cannot be
    /// waited on (it is not known to have exited).
    pub async fn exit(&mut self) -> std::io::Result<ExitStatus> {
        if let Some(status) = self.exit {
            return Ok(status);
        }
        let status = self.child.wait().await?;
        self.exit = Some(status);
        self.confinement = None;
        Ok(status)
    }

    /// After a control-socket error: if the process exits within `grace`,
    /// the exit (with its last output) explains the failure better than the
    /// broken socket does.
    pub async fn explain(&mut self, err: VmmError, during: &'static str) -> VmmError {
        // A timeout came while the process ran; an exit explains itself.
        if matches!(err, VmmError::Timeout { .. } | VmmError::Exited { .. }) {
            return err;
        }
        if self.exited_within(Duration::from_secs(1)).await {
            self.exited_error(during)
        } else {
            err
        }
    }

    /// Whether the process exits within `grace` (or has already).
    pub async fn exited_within(&mut self, grace: Duration) -> bool {
        let _ = tokio::time::timeout(grace, self.exit()).await;
        self.exited().is_some()
    }

    /// An error for a VMM that exited `during` a step, with its last output.
    pub fn exited_error(&mut self, during: &'static str) -> VmmError {
        VmmError::Exited {
            vm: self.id.clone(),
            status: self.exited(),
            during,
            log_tail: self.log_tail(),
        }
    }

    /// The last lines of the VMM's own log and of the guest console.
    pub fn log_tail(&self) -> String {
        let mut out = String::new();
        for (label, path) in [
            ("vmm", self.run_dir.join("vmm.log")),
            ("console", self.console_path()),
        ] {
            let text = read_vm_file(&path);
            let lines: Vec<&str> = text.lines().collect();
            for line in &lines[lines.len().saturating_sub(15)..] {
                out.push_str(&format!("  [{label}] {line}\n"));
            }
        }
        out
    }

    /// The guest's own last error line on its console, if any: the most
    /// recent line that tells of a panic, a fatal error, an assertion, an
    /// error, abort, oops, bug or failure, else of a halt, looking first at
    /// the last few lines, then at the console's final
    /// [`ERROR_SCAN_LINES`]. A guest that stops often prints a stack trace
    /// after the line that explains it, so the last lines alone may miss it.
    pub fn console_error_line(&self) -> Option<String> {
        error_line(&read_vm_file(&self.console_path()))
    }

    /// Waits up to `grace` for the process to exit by itself, then kills it,
    /// and waits until it is gone.
    pub async fn stop(&mut self, grace: Duration) -> Result<(), VmmError> {
        if self.exit.is_none() {
            let status = match tokio::time::timeout(grace, self.child.wait()).await {
                Ok(status) => status,
                Err(_) => {
                    let _ = self.child.start_kill();
                    self.child.wait().await
                }
            };
            let status = status.map_err(|source| VmmError::Io {
                what: "cannot wait for VMM of",
                path: PathBuf::from(self.id.as_str()),
                source,
            })?;
            self.exit = Some(status);
        }
        self.confinement = None;
        Ok(())
    }

    /// The process's jail, while it runs jailed.
    pub fn confinement(&self) -> Option<&Confinement> {
        self.confinement.as_ref()
    }

    /// Resolves once the VMM is in its cgroup: at once if it joined before
    /// exec or has none; otherwise the move starts now, on a blocking
    /// thread, so that the caller waits for it while the VMM starts
    /// (crate::jail, protocol step 4). A driver gives the guest its first
    /// instruction only after this resolved `Ok`.
    ///
    /// Errors: [`VmmError::JailEntry`] (step "joining the VMM's cgroup")
    /// if the move fails; the caller then drops the process, which kills
    /// it.
    pub fn join_cgroup(
        &self,
    ) -> impl std::future::Future<Output = Result<(), VmmError>> + Send + 'static {
        let vm = self.id.clone();
        let failed = move |source: std::io::Error| VmmError::JailEntry {
            vm: vm.clone(),
            step: "joining the VMM's cgroup".into(),
            source,
        };
        let mover = self.confinement.as_ref().and_then(|c| c.mover(self.pid));
        let moving = mover.map(|m| m.map(tokio::task::spawn_blocking));
        async move {
            match moving {
                None => Ok(()),
                Some(Err(e)) => Err(failed(e)),
                Some(Ok(task)) => task
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()))
                    .and_then(|r| r)
                    .map_err(failed),
            }
        }
    }

    /// Kills the process and waits until it is gone.
    pub async fn kill(&mut self) -> Result<(), VmmError> {
        self.stop(Duration::ZERO).await
    }
}

/// The tasks that release the jails of VMM processes dropped while they
/// still ran (each waits for its process to exit, then drops its
/// [`Confinement`]): one tracker for the whole process, always closed, so
/// that [`jails_released`] resolves whenever none is pending.
fn releases() -> &'static tokio_util::task::TaskTracker {
    static RELEASES: std::sync::OnceLock<tokio_util::task::TaskTracker> =
        std::sync::OnceLock::new();
    RELEASES.get_or_init(|| {
        let tracker = tokio_util::task::TaskTracker::new();
        tracker.close();
        tracker
    })
}

/// Resolves once no jail of a dropped VMM process is waiting to be
/// released (its cgroup removed, its uid back in the range), or after
/// `within`: a gateway awaits this when it stops, before it takes down
/// what the jails sit in. Whether everything was released.
pub async fn jails_released(within: Duration) -> bool {
    tokio::time::timeout(within, releases().wait())
        .await
        .is_ok()
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        // kill_on_drop sends SIGKILL if the process still runs; tokio reaps it.
        // Its uid and cgroup are released once it has exited, never before
        // (crate::jail, protocol step 5).
        if let Some(confinement) = self.confinement.take() {
            if self.exited().is_some() {
                drop(confinement);
            } else if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let _ = self.child.start_kill();
                let exited = self.exit_event();
                releases().spawn_on(
                    async move {
                        exited.await;
                        drop(confinement);
                    },
                    &runtime,
                );
            } else {
                // No runtime to wait on: the uid stays taken, and the
                // cgroup is removed at the next start.
                std::mem::forget(confinement);
            }
        }
        let _ = std::fs::remove_file(&self.pid_file);
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

/// Opens `path`, a file in a VM's run directory, which a jailed VMM can
/// write to: never through a symlink (`O_NOFOLLOW`), never blocking on a
/// FIFO (`O_NONBLOCK`), and only if it is a regular file with one link.
/// What the gateway reads from or writes to there goes through this.
pub fn open_vm_file(path: &Path, write: bool) -> std::io::Result<File> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() || meta.nlink() != 1 {
        return Err(std::io::Error::other(format!(
            "{} is not a plain file of its own",
            path.display()
        )));
    }
    Ok(file)
}

/// The text of `path` in a run directory, through [`open_vm_file`]: empty
/// if it cannot be read, at most its last `MAX_READ` bytes.
pub fn read_vm_file(path: &Path) -> String {
    use std::io::{Read, Seek};
    const MAX_READ: u64 = 1 << 20;
    let Ok(mut file) = open_vm_file(path, false) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len > MAX_READ {
        let _ = file.seek(std::io::SeekFrom::Start(len - MAX_READ));
    }
    let mut bytes = Vec::new();
    let _ = file.take(MAX_READ).read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// How many console lines, from the end, [`VmProcess::console_error_line`]
/// looks at.
pub const ERROR_SCAN_LINES: usize = 200;

/// How many of the last console lines count as "what the guest said last".
const RECENT_LINES: usize = 10;

/// The line [`VmProcess::console_error_line`] picks from console text
/// (stack frames, lines that start with an address, never count): the most
/// recent error line among the last [`RECENT_LINES`]; else the most recent
/// halt line among them (a guest's own error line comes before the line
/// that tells of its halt); else the most recent of either kind in the
/// whole tail.
fn error_line(console: &str) -> Option<String> {
    const ERRORS: &[&str] = &[
        "panic", "fatal", "assert", "error", "abort", "oops", "bug:", "failed",
    ];
    const HALTS: &[&str] = &["halt"];
    let lines: Vec<&str> = console
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("0x"))
        .collect();
    let tail = &lines[lines.len().saturating_sub(ERROR_SCAN_LINES)..];
    let recent = &tail[tail.len().saturating_sub(RECENT_LINES)..];
    let last = |lines: &[&str], words: &[&str]| {
        lines
            .iter()
            .rev()
            .find(|l| {
                let l = l.to_ascii_lowercase();
                words.iter().any(|w| l.contains(w))
            })
            .map(|l| (*l).to_owned())
    };
    last(recent, ERRORS)
        .or_else(|| last(recent, HALTS))
        .or_else(|| last(tail, ERRORS))
        .or_else(|| last(tail, HALTS))
}

/// `<run_dir>/vmm.log`, twice (the VMM's stdout and stderr).
fn open_log(run_dir: &Path) -> Result<(File, File), VmmError> {
    let path = run_dir.join("vmm.log");
    let io = |what| {
        let path = path.clone();
        move |source| VmmError::Io { what, path, source }
    };
    let log = File::create(&path).map_err(io("cannot create"))?;
    let log2 = log.try_clone().map_err(io("cannot duplicate"))?;
    Ok((log, log2))
}

/// Writes the pid file of VMM `pid` (module doc).
fn record_pid(pid_file: &Path, pid: u32, tap: Option<&str>) -> std::io::Result<()> {
    if let Some(dir) = pid_file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let me = std::process::id();
    std::fs::write(
        pid_file,
        format!(
            "{pid} {} {} {me} {}\n",
            start_time(pid).unwrap_or(0),
            tap.unwrap_or("-"),
            start_time(me).unwrap_or(0),
        ),
    )
}

/// A pidfd for `pid`, registered with the tokio reactor.
fn exit_fd(pid: u32) -> Option<Arc<AsyncFd<OwnedFd>>> {
    let opened = rustix::process::Pid::from_raw(pid as i32)
        .ok_or_else(|| std::io::Error::other("no pid"))
        .and_then(|pid| {
            rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
                .map_err(std::io::Error::from)
        })
        .and_then(|fd| {
            #[allow(unsafe_code)]
            // SAFETY: the pidfd is an OwnedFd moved into the AsyncFd, which
            // owns it until it is dropped and deregistered: nothing else can
            // close it while it is registered.
            unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
                .map_err(|e| std::io::Error::other(e.to_string()))
        });
    match opened {
        Ok(fd) => Some(Arc::new(fd)),
        Err(e) => {
            tracing::warn!(
                pid,
                "no pidfd for the VMM ({e}): its exit is noticed only when checked"
            );
            None
        }
    }
}

/// Field 22 of `/proc/<pid>/stat`: the process start time in clock ticks.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count from its closing ')'.
    let after = &stat[stat.rfind(')')? + 2..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// What [`kill_stale`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Stale {
    /// VMMs killed.
    pub killed: Vec<u32>,
    /// Taps recorded for the VMs found (killed or already gone).
    pub taps: Vec<String>,
}

/// Kills VMMs recorded under `<state_dir>/vms/` by an earlier run that died,
/// and removes their pid files and run directories.
pub fn kill_stale(state_dir: &Path) -> Stale {
    let mut stale = Stale::default();
    let Ok(entries) = std::fs::read_dir(state_dir.join("vms")) else {
        return stale;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("pid") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let fields: Vec<&str> = text.split_whitespace().collect();
        let number = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        // The VM of a process that still runs (a `snapshot build` next to
        // the gateway, or this very process) is not stale.
        if let (Some(owner), Some(owner_started)) = (number(3), number(4)) {
            let owner = owner as u32;
            if owner > 0 && start_time(owner) == Some(owner_started) {
                continue;
            }
        }
        if let (Some(pid), Some(started)) = (number(0), number(1)) {
            let pid = pid as u32;
            if pid > 0 && start_time(pid) == Some(started) {
                // One already dying (killed with its gateway) is not
                // counted as killed here, but waited for all the same.
                let target = nix::unistd::Pid::from_raw(pid as i32);
                if liveness(pid) == Liveness::Running
                    && nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGKILL).is_ok()
                {
                    stale.killed.push(pid);
                }
                wait_gone(pid);
            }
        }
        if let Some(tap) = fields.get(2).filter(|t| **t != "-") {
            stale.taps.push((*tap).to_owned());
        }
        let _ = std::fs::remove_file(&path);
        if let Some(stem) = path.file_stem() {
            let _ = std::fs::remove_dir_all(state_dir.join("run").join(stem));
        }
    }
    stale
}

/// How far `pid` is from gone, from `/proc/<pid>/status`.
#[derive(Debug, PartialEq, Eq)]
pub enum Liveness {
    /// Running (or sleeping, stopped...).
    Running,
    /// A SIGKILL is pending for it, or its main thread has exited (a
    /// zombie) but other threads have not yet: it is dying, and still
    /// holds its fds (threads share one fd table, released with the last
    /// of them). A killed QEMU tears its memory down for tens of
    /// milliseconds before its main thread becomes a zombie.
    Dying,
    /// Gone, or a zombie alone: its fds (and taps) are closed.
    Gone,
}

/// Whether `pid` runs, is dying or is gone (see [`Liveness`]).
pub fn liveness(pid: u32) -> Liveness {
    match std::fs::read_to_string(format!("/proc/{pid}/status")) {
        Ok(status) => liveness_in(&status),
        Err(_) => Liveness::Gone,
    }
}

/// [`liveness`] from `file`, the process's `/proc/<pid>/status` held open:
/// read whole with one `pread` from its start (procfs makes the text
/// afresh at offset 0), where a path's read takes an `open`, a `close`
/// and a read per doubling of the buffer. A text that fills the buffer is
/// read again by path.
fn liveness_of_file(file: &std::fs::File, pid: u32) -> Liveness {
    use std::os::unix::fs::FileExt;
    // The text is about 1.5 KiB; its CPU lists grow with the host's CPUs.
    let mut buf = [0u8; 8192];
    match file.read_at(&mut buf, 0) {
        Ok(n) if n < buf.len() => match std::str::from_utf8(&buf[..n]) {
            Ok(status) => liveness_in(status),
            Err(_) => liveness(pid),
        },
        Ok(_) => liveness(pid),
        // ESRCH: the process was reaped.
        Err(_) => Liveness::Gone,
    }
}

/// [`Liveness`] from the text of a `/proc/<pid>/status` (proc(5)).
fn liveness_in(status: &str) -> Liveness {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or("")
    };
    // Pending signals, shared (ShdPnd) and the main thread's (SigPnd): a
    // hex mask, bit n-1 for signal n (proc(5)).
    let sigkill = 1u64 << (nix::sys::signal::Signal::SIGKILL as u64 - 1);
    let pending = |name: &str| u64::from_str_radix(field(name), 16).unwrap_or(0) & sigkill != 0;
    match (field("State:").starts_with('Z'), field("Threads:")) {
        (true, "1") => Liveness::Gone,
        (true, _) => Liveness::Dying,
        _ if pending("ShdPnd:") || pending("SigPnd:") => Liveness::Dying,
        (false, _) => Liveness::Running,
    }
}

/// Waits (up to 5 s) until `pid` is gone, so its fds (and taps) are closed.
/// The process is not our child, so it cannot be waited on; nor has it an
/// exit event here; this polls its /proc entry with a deadline.
fn wait_gone(pid: u32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline && liveness(pid) != Liveness::Gone {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A stand-in VMM for tests: `sleep <secs>` spawned as `id` (its run
/// directory made under `state`), with `tap` recorded and THP as given.
#[cfg(test)]
pub(crate) fn sleeping(
    state: &Path,
    id: &VmId,
    secs: &str,
    tap: Option<&str>,
    transparent_huge_pages: bool,
) -> VmProcess {
    let run = make_run_dir(state, id).unwrap();
    VmProcess::spawn(
        id,
        Launch {
            binary: Path::new("/bin/sleep"),
            args: &[secs.into()],
            fds: vec![],
            tap,
            transparent_huge_pages,
            confinement: None,
        },
        &run,
        state,
    )
    .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guests_own_error_line_is_found_behind_its_stack_trace() {
        let osv = "OSv v0.57\nAssertion failed: dentry (fs/procfs/procfs.cc: 42)\n\n[backtrace]\n"
            .to_owned()
            + &"0x0000000040223fdc <abort+0>\n".repeat(30);
        assert_eq!(
            error_line(&osv).as_deref(),
            Some("Assertion failed: dentry (fs/procfs/procfs.cc: 42)")
        );
        let halted = "booting\nNeither paravirtual clock nor HPET is available. Halting.\n";
        assert_eq!(
            error_line(halted).as_deref(),
            Some("Neither paravirtual clock nor HPET is available. Halting.")
        );
        // The guest's own line, not the kernel's halt notice after it.
        let linux = "[    0.42] PCI: Fatal: No config space access function found\n\
                     snapgate-guest: fatal: stop; halting\n[    1.53] reboot: System halted\n";
        assert_eq!(
            error_line(linux).as_deref(),
            Some("snapgate-guest: fatal: stop; halting")
        );
        // An old error far above the halt is not what the guest said last.
        let old = "early error\n".to_owned() + &"ok\n".repeat(20) + "Halting.\n";
        assert_eq!(error_line(&old).as_deref(), Some("Halting."));
        assert_eq!(error_line("all good\n"), None);
    }

    #[test]
    fn start_time_of_self_is_stable() {
        let me = std::process::id();
        let a = start_time(me).expect("own start time");
        assert_eq!(Some(a), start_time(me));
    }

    /// `sleep 30` launched in `jail` with `confinement`.
    fn jailed_sleep(jail: &crate::jail::Jail, confinement: crate::jail::Confinement) -> Launch<'_> {
        static ARGS: std::sync::OnceLock<Vec<OsString>> = std::sync::OnceLock::new();
        Launch {
            binary: jail.binary(),
            args: ARGS.get_or_init(|| vec!["30".into()]),
            fds: vec![],
            tap: None,
            transparent_huge_pages: true,
            confinement: Some(confinement),
        }
    }

    #[tokio::test]
    async fn a_jailed_process_runs_as_its_uid_in_its_cgroup_and_root_and_both_go_with_it() {
        use crate::jail::{Access, Jail, JailParams, Needs};
        let state = tempfile::tempdir().unwrap();
        // A range of one uid: a second VMM gets it only once the first is
        // reaped.
        let params = JailParams {
            first_uid: 0x7100_0000,
            uids: 1,
            ..JailParams::default()
        };
        let jail = match Jail::new(
            params,
            Path::new("sleep"),
            state.path(),
            &format!("unit{}", std::process::id()),
        ) {
            Ok(jail) => jail,
            Err(e) => panic!("this host (root, cgroups) jails: {e}"),
        };
        let id = VmId::new("jailed");
        let run = make_run_dir(state.path(), &id).unwrap();
        let needs = Needs {
            paths: vec![
                (run.clone(), Access::ReadWrite),
                (PathBuf::from("/dev/null"), Access::Device),
            ],
            memory_mib: 16,
            paused: false,
        };
        let confinement = jail.confine(&id, &run, &needs).unwrap();
        let uid = confinement.uid().unwrap();
        assert!(
            matches!(
                jail.confine(&VmId::new("second"), &run, &needs),
                Err(crate::jail::JailError::NoUid { .. })
            ),
            "the range's one uid is taken"
        );
        let cgroup = confinement.cgroup().unwrap().dirs().to_vec();
        let mut p =
            VmProcess::spawn(&id, jailed_sleep(&jail, confinement), &run, state.path()).unwrap();
        let status = std::fs::read_to_string(format!("/proc/{}/status", p.pid())).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap()
                .trim()
                .to_owned()
        };
        assert_eq!(field("Uid:"), format!("{uid}\t{uid}\t{uid}\t{uid}"));
        assert_eq!(field("NoNewPrivs:"), "1");
        assert_eq!(field("CapEff:"), "0000000000000000");
        // Its root: no /etc/passwd, its run directory, the device.
        let root = PathBuf::from(format!("/proc/{}/root", p.pid()));
        assert!(!root.join("etc/passwd").exists());
        assert!(root.join(run.strip_prefix("/").unwrap()).is_dir());
        assert!(root.join("dev/null").exists());
        assert!(!root.join("dev/zero").exists());
        let procs = std::fs::read_to_string(cgroup[0].join("cgroup.procs")).unwrap();
        assert_eq!(procs.trim(), p.pid().to_string());
        assert!(p.confinement().is_some());
        p.kill().await.unwrap();
        // Reaped: its cgroup is gone, its uid free again (the next VMM of
        // this process may get it).
        assert!(p.confinement().is_none());
        for dir in &cgroup {
            assert!(!dir.exists(), "{}", dir.display());
        }
        let again = VmId::new("again");
        let run = make_run_dir(state.path(), &again).unwrap();
        let next = jail.confine(&again, &run, &needs).unwrap();
        assert_eq!(next.uid(), Some(uid));
    }

    #[test]
    fn a_run_directory_no_process_took_goes_with_the_failed_start() {
        let state = tempfile::tempdir().unwrap();
        let failed = make_run_dir(state.path(), &VmId::new("failed")).unwrap();
        std::fs::write(failed.join("vmm.log"), "").unwrap();
        drop(PendingRunDir::new(&failed));
        assert!(!failed.exists());
        let started = make_run_dir(state.path(), &VmId::new("started")).unwrap();
        PendingRunDir::new(&started).owned();
        assert!(started.is_dir());
    }

    #[tokio::test]
    async fn a_paused_vmm_is_moved_into_its_cgroup_after_exec_by_join_cgroup() {
        use crate::jail::{Access, Jail, JailParams, Needs};
        let state = tempfile::tempdir().unwrap();
        let params = JailParams {
            first_uid: 0x7100_1000,
            uids: 4,
            ..JailParams::default()
        };
        let jail = Jail::new(
            params,
            Path::new("sleep"),
            state.path(),
            &format!("unitp{}", std::process::id()),
        )
        .unwrap();
        let id = VmId::new("paused");
        let run = make_run_dir(state.path(), &id).unwrap();
        let needs = Needs {
            paths: vec![(run.clone(), Access::ReadWrite)],
            memory_mib: 16,
            paused: true,
        };
        let confinement = jail.confine(&id, &run, &needs).unwrap();
        let uid = confinement.uid().unwrap();
        let procs_file = confinement.cgroup().unwrap().dirs()[0].join("cgroup.procs");
        let mut p =
            VmProcess::spawn(&id, jailed_sleep(&jail, confinement), &run, state.path()).unwrap();
        // Jailed from exec (its uid), but not yet in its cgroup.
        let status = std::fs::read_to_string(format!("/proc/{}/status", p.pid())).unwrap();
        assert!(status.contains("NoNewPrivs:\t1"), "{status}");
        assert!(
            status.contains(&format!("Uid:\t{uid}\t{uid}\t{uid}\t{uid}")),
            "{status}"
        );
        let procs = || std::fs::read_to_string(&procs_file).unwrap();
        assert_eq!(procs().trim(), "", "moved only by join_cgroup");
        p.join_cgroup().await.unwrap();
        assert_eq!(procs().trim(), p.pid().to_string());
        p.kill().await.unwrap();
        // A move that fails (its cgroup removed before it) names the step.
        let id = VmId::new("paused-2");
        let run = make_run_dir(state.path(), &id).unwrap();
        let needs = Needs {
            paths: vec![(run.clone(), Access::ReadWrite)],
            ..needs
        };
        let confinement = jail.confine(&id, &run, &needs).unwrap();
        let dirs = confinement.cgroup().unwrap().dirs().to_vec();
        let mut p =
            VmProcess::spawn(&id, jailed_sleep(&jail, confinement), &run, state.path()).unwrap();
        for dir in &dirs {
            std::fs::remove_dir(dir).unwrap();
        }
        let err = p.join_cgroup().await.unwrap_err();
        assert!(
            matches!(&err, VmmError::JailEntry { step, .. } if step == "joining the VMM's cgroup"),
            "{err}"
        );
        // What a driver does with the error: the process goes, and its
        // jail with it.
        let pid = p.pid();
        p.kill().await.unwrap();
        assert!(p.confinement().is_none());
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }

    #[tokio::test]
    async fn a_jail_step_that_fails_in_the_child_is_named_in_the_error() {
        use crate::jail::{Access, Jail, JailParams, Needs};
        let state = tempfile::tempdir().unwrap();
        let params = JailParams {
            cgroup: false,
            ..JailParams::default()
        };
        let jail = Jail::new(params, Path::new("sleep"), state.path(), "unitf").unwrap();
        let id = VmId::new("jailfail");
        let run = make_run_dir(state.path(), &id).unwrap();
        let needs = Needs {
            paths: vec![(run.clone(), Access::ReadWrite)],
            memory_mib: 16,
            paused: false,
        };
        let confinement = jail.confine(&id, &run, &needs).unwrap();
        // The run directory vanishes between the plan and the spawn: the
        // child cannot bind it.
        std::fs::remove_dir_all(&run).unwrap();
        let run_parent = state.path().join("run");
        let err = VmProcess::spawn(
            &id,
            jailed_sleep(&jail, confinement),
            &run_parent,
            state.path(),
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, VmmError::JailEntry { .. })
                && text.contains("binding a path into the root"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_vmm_launched_without_transparent_huge_pages_runs_with_thp_disabled() {
        // The kernel reports the flag in a process's status (Linux >= 5.0);
        // with it set, `THP_enabled: 0`, else as this process has it.
        fn thp_enabled(pid: &str) -> String {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            let line = status
                .lines()
                .find(|l| l.starts_with("THP_enabled:"))
                .expect("THP_enabled in /proc/PID/status");
            line.split_whitespace().nth(1).unwrap().to_owned()
        }
        let own = thp_enabled("self");
        if own != "1" {
            // Disabled for this process already (a sandbox or service
            // manager): a child would show 0 either way.
            eprintln!("skipped: this test process runs with THP_enabled {own}");
            return;
        }
        let state = tempfile::tempdir().unwrap();
        for transparent_huge_pages in [false, true] {
            let id = VmId::new(format!("thp-{transparent_huge_pages}"));
            let mut p = sleeping(state.path(), &id, "30", None, transparent_huge_pages);
            // Set before exec and kept across it (prctl(2)).
            let want = if transparent_huge_pages { "1" } else { "0" };
            assert_eq!(thp_enabled(&p.pid().to_string()), want);
            p.kill().await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_killed_process_is_exiting_by_its_held_status_file_until_reaped() {
        let state = tempfile::tempdir().unwrap();
        let mut p = sleeping(state.path(), &VmId::new("held-1"), "30", None, true);
        let pid = p.pid();
        let file = p.status.take().expect("its status file opened at spawn");
        assert_eq!(liveness_of_file(&file, pid), Liveness::Running);
        p.status = Some(file);
        assert!(!p.is_exiting());
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        // The same open file, read again from its start, shows the change
        // (dying, then a zombie: not reaped, it stays readable).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while liveness_of_file(p.status.as_ref().unwrap(), pid) == Liveness::Running {
            assert!(std::time::Instant::now() < deadline, "never seen leaving");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(p.is_exiting());
        p.exit().await.unwrap();
        // Reaped: the open file reads nothing (ESRCH), whatever the pid
        // names next.
        let file = p.status.as_ref().unwrap();
        assert_eq!(liveness_of_file(file, pid), Liveness::Gone);
    }

    #[tokio::test]
    async fn stale_processes_are_killed_and_unrelated_ones_spared() {
        let state = tempfile::tempdir().unwrap();
        let mut p = sleeping(
            state.path(),
            &VmId::new("stale-1"),
            "30",
            Some("sgtest0"),
            true,
        );
        let pid = p.pid();
        // A pid file whose start time does not match must not be acted on.
        std::fs::write(
            state.path().join("vms/other.pid"),
            format!("{} 1\n", std::process::id()),
        )
        .unwrap();
        // While its owner (this process) lives, it is not stale.
        assert_eq!(kill_stale(state.path()).killed, Vec::<u32>::new());
        assert!(state.path().join("vms/stale-1.pid").exists());
        // Its owner "died": rewrite the owner's start time as another's.
        let file = state.path().join("vms/stale-1.pid");
        let text = std::fs::read_to_string(&file).unwrap();
        let mut fields: Vec<&str> = text.split_whitespace().collect();
        fields[4] = "1";
        std::fs::write(&file, fields.join(" ")).unwrap();
        let stale = kill_stale(state.path());
        assert_eq!(stale.killed, vec![pid]);
        assert_eq!(stale.taps, vec!["sgtest0".to_string()]);
        p.stop(Duration::from_secs(5)).await.unwrap();
        assert!(
            p.exited().unwrap().to_string().contains("SIGKILL"),
            "{:?}",
            p.exited()
        );
        assert!(!state.path().join("vms/stale-1.pid").exists());
        assert!(!state.path().join("vms/other.pid").exists());
    }
}
