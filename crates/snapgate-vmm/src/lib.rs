//! snapgate's VMM layer: one [`Vmm`] trait, two drivers (QEMU, Cloud
//! Hypervisor), snapshots on disk, and the taps VMs sit behind ([`net`]).
//!
//! A crate of its own so that it cannot reach anything above it: it knows
//! nothing of pools, runtimes, agents, apps or HTTP routing. What a layer
//! above needs of a VM it asks through generic means: an extra disk of
//! each VM's own ([`ImageSpec::extra_disk_mib`], [`Vm::extra_disk`]), a
//! record of what ran on a template before its snapshot
//! ([`ImageSpec::prepared`]), a resume hook ([`resumed::Hook`]).
//!
//! # Lifecycle
//! ```text
//!  boot(spec, tap) ──> wait_ready ──> snapshot(dest) ──> Snapshot (files on disk)
//!                                                          │
//!                        restore(snapshot, tap) <──────────┘  (many times)
//!                               │
//!               wait_ready ──> on_restore ──> serve ──> destroy
//! ```
//! 1. Every VM runs in its own VMM process, started by the driver with the
//!    VM's tap fd inherited. The [`Vm`] value owns that process: dropping it
//!    kills the process (the tap goes with it) and removes its run directory;
//!    [`Vmm::destroy`] does the same but waits for the exit and reports errors.
//! 2. A process id file per VM sits in `<state_dir>/vms/` while the VM lives,
//!    so a gateway restarted after a crash can kill VMMs it no longer owns
//!    ([`process::kill_stale`]).
//! 3. Drivers time each step and keep the figures in [`Vm::timings`].
//! 4. A [`Snapshot`] is a directory with a `manifest.json` written last; a
//!    snapshot without one, or whose files differ in size from what the
//!    manifest recorded, is refused before any VMM is started.
//! 5. Every wait on a guest ([`ready::wait_ready`], a resumed message) runs
//!    under [`watch::guarded`]: a VMM that exits or a guest that stops
//!    (halts, panics) while its VMM runs on ends the wait at once.
//! 6. A clone with a resume hook ([`resumed::Hook`]: a VM app's
//!    [`resumed::OnRestore`], a runtime's agent) gets the host's time and
//!    fresh entropy before it serves ([`resumed`]). Where the VMM and
//!    machine can, every VM also has a VM generation ID device that changes
//!    at each restore (QEMU `pc`: `vmgenid`), from which guest kernels with
//!    a VMGenID driver reseed their generator on their own, asynchronously.

#![deny(unsafe_code)]
#![warn(missing_docs)]
// Errors here carry context (paths, log tails) and are returned on cold
// paths next to VM starts that take milliseconds; boxing them buys nothing.
#![allow(clippy::result_large_err)]

pub mod cloud_hypervisor;
pub mod jail;
pub mod net;
pub mod process;
pub mod qemu;
mod qmp;
pub mod ready;
pub mod resumed;
pub mod snapshot;
pub mod spec;
pub mod watch;

use std::fmt;
use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use process::VmProcess;
pub use snapshot::Snapshot;
pub use spec::{ImageSpec, Machine, SnapshotMode};

use crate::net::{NetError, NetParams, Tap};

/// Identifies one VM (a template or a clone) in logs, file names and metrics.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VmId(String);

impl VmId {
    /// Makes an id; only `[A-Za-z0-9_-]` are kept so it is safe in paths.
    pub fn new(s: impl AsRef<str>) -> VmId {
        VmId(
            s.as_ref()
                .chars()
                .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                .collect(),
        )
    }

    /// A new id unique among every process on this host: `<prefix>-<pid>-<n>`,
    /// `n` counting from 1 in each process. Run directories and pid files
    /// are named by id, so two processes (a gateway and a `snapshot build`,
    /// or a gateway and its predecessor's leftovers) never share one.
    pub fn unique(prefix: &str) -> VmId {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        VmId::new(format!("{prefix}-{}-{n}", std::process::id()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which VMM drives the VMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmmKind {
    /// QEMU, over QMP.
    Qemu,
    /// Cloud Hypervisor, over its REST API.
    CloudHypervisor,
}

impl fmt::Display for VmmKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VmmKind::Qemu => "qemu",
            VmmKind::CloudHypervisor => "cloud-hypervisor",
        })
    }
}

/// Durations of a driver's steps, in order.
#[derive(Clone, Debug, Default)]
pub struct Timings(Vec<(&'static str, Duration)>);

impl Timings {
    /// Records one step.
    pub fn record(&mut self, step: &'static str, took: Duration) {
        self.0.push((step, took));
    }

    /// The duration of `step`, if it was recorded (the first, if it was
    /// recorded more than once).
    pub fn get(&self, step: &str) -> Option<Duration> {
        self.0.iter().find(|(s, _)| *s == step).map(|(_, d)| *d)
    }

    /// The duration of the last `step` recorded.
    pub fn last(&self, step: &str) -> Option<Duration> {
        self.0
            .iter()
            .rev()
            .find(|(s, _)| *s == step)
            .map(|(_, d)| *d)
    }
}

impl fmt::Display for Timings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (step, d)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{step}={:.1}ms", d.as_secs_f64() * 1e3)?;
        }
        Ok(())
    }
}

/// Where a VM's guest serves: its address, reached through its own tap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The tap the guest sits behind; client sockets bind to it.
    pub tap: String,
    /// The guest's address and port.
    pub addr: SocketAddrV4,
}

impl Endpoint {
    /// Where a guest of `spec` on `tap` serves, with the addressing of `net`.
    pub fn of(tap: &Tap, net: &NetParams, spec: &ImageSpec) -> Endpoint {
        Endpoint {
            tap: tap.name().to_owned(),
            addr: SocketAddrV4::new(net.guest_ip, spec.guest_port),
        }
    }
}

/// Checks `spec` and renders its kernel command line: what every driver
/// does before it boots a template.
pub fn boot_cmdline(spec: &ImageSpec, net: &NetParams, tsc_khz: u64) -> Result<String, VmmError> {
    let mut problems = spec.validate();
    problems.extend(spec.check_files());
    if !problems.is_empty() {
        return Err(VmmError::InvalidSpec { problems });
    }
    spec.render_cmdline(net, tsc_khz)
        .map_err(|problem| VmmError::Cmdline { problem })
}

/// Destroys `vm`, whose start failed with `err`, and returns `err`: when
/// the failure is reported, the VMM process is gone and its tap with it
/// (dropping the `Vm` would kill it without waiting). A failure to destroy
/// is logged; `err` (of whichever layer) says what matters.
pub async fn discard<E>(vmm: &dyn Vmm, vm: Vm, err: E) -> E {
    let id = vm.id().clone();
    if let Err(e) = vmm.destroy(vm).await {
        tracing::warn!(vm = %id, "destroying a VM that failed to start: {}", crate::display_chain(&e));
    }
    err
}

/// Where a VM's extra disk file lives in its run directory.
pub fn extra_disk_path(run_dir: &std::path::Path) -> PathBuf {
    run_dir.join("extra.img")
}

/// Creates the empty (sparse) extra disk file of `spec` in `run_dir`, if
/// the spec has one ([`ImageSpec::extra_disk_mib`]); every VM gets its own.
pub fn create_extra_disk(
    spec: &ImageSpec,
    run_dir: &std::path::Path,
) -> Result<Option<PathBuf>, VmmError> {
    let Some(mib) = spec.extra_disk_mib else {
        return Ok(None);
    };
    let path = extra_disk_path(run_dir);
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(u64::from(mib) << 20))
        .map_err(|source| VmmError::Io {
            what: "cannot create the extra disk",
            path: path.clone(),
            source,
        })?;
    Ok(Some(path))
}

/// A running VM. Dropping it kills its VMM process (see the module doc).
#[derive(Debug)]
pub struct Vm {
    id: VmId,
    endpoint: Endpoint,
    spec: ImageSpec,
    cmdline: String,
    process: VmProcess,
    timings: Timings,
    restored_from: Option<PathBuf>,
    /// Its tap's slot in the fence (`net::Fence`), if fenced.
    fence_slot: Option<net::FenceSlot>,
}

impl Vm {
    /// Wraps a started VMM process running `spec` with the kernel command
    /// line `cmdline` (placeholders filled in).
    pub fn new(
        id: VmId,
        endpoint: Endpoint,
        spec: ImageSpec,
        cmdline: String,
        process: VmProcess,
    ) -> Vm {
        Vm {
            id,
            endpoint,
            spec,
            cmdline,
            process,
            timings: Timings::default(),
            restored_from: None,
            fence_slot: None,
        }
    }

    /// Keeps `slot` (its tap's place in the fence) for as long as the VM
    /// lives.
    pub fn keep_fence_slot(&mut self, slot: net::FenceSlot) {
        self.fence_slot = Some(slot);
    }

    /// Waits for its tap's fence admission, if any ([`net::Admitting`]),
    /// keeps the slot and records the wait as the step `admit`: a driver
    /// calls this before the guest's first instruction.
    pub async fn admitted(&mut self, admitting: Option<net::Admitting>) -> Result<(), VmmError> {
        if let Some(admitting) = admitting {
            let waited = std::time::Instant::now();
            self.keep_fence_slot(admitting.finish().await?);
            self.record("admit", waited.elapsed());
        }
        Ok(())
    }

    /// Its tap's place in the fence, if fenced.
    pub fn fence_slot_mut(&mut self) -> Option<&mut net::FenceSlot> {
        self.fence_slot.as_mut()
    }

    /// The snapshot directory the VM was restored from; `None` for a VM
    /// booted afresh.
    pub fn restored_from(&self) -> Option<&Path> {
        self.restored_from.as_deref()
    }

    /// Records the snapshot directory the VM was restored from (drivers
    /// call it as they restore).
    pub fn set_restored_from(&mut self, dir: &Path) {
        self.restored_from = Some(dir.to_owned());
    }

    /// The image spec the VM runs.
    pub fn spec(&self) -> &ImageSpec {
        &self.spec
    }

    /// The kernel command line the VM booted with.
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// The VM's id.
    pub fn id(&self) -> &VmId {
        &self.id
    }

    /// The VMM process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Where the guest serves.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The path the readiness probe asks for.
    pub fn ready_path(&self) -> &str {
        &self.spec.ready_path
    }

    /// The file behind this VM's extra disk ([`ImageSpec::extra_disk_mib`]):
    /// empty until the layer above writes into it. The VMM reads it through
    /// its own descriptor and the host page cache, so what is written here
    /// before the guest reads the disk is what the guest sees.
    pub fn extra_disk(&self) -> Option<PathBuf> {
        self.spec
            .extra_disk_mib
            .map(|_| extra_disk_path(self.process.run_dir()))
    }

    /// Records what ran on this template before its snapshot
    /// ([`ImageSpec::prepared`]).
    pub fn set_prepared(&mut self, message: String) {
        self.spec.prepared = Some(message);
    }

    /// Points the endpoint and the readiness probe at what the guest serves
    /// now: a runtime clone first answers on its agent port, then, once its
    /// app has started, on the app's port and ready path.
    pub fn serve_at(&mut self, port: u16, ready_path: &str, ready_timeout: Duration) {
        self.endpoint.addr.set_port(port);
        self.spec.guest_port = port;
        self.spec.ready_path = ready_path.to_owned();
        self.spec.ready_timeout = ready_timeout;
    }

    /// Driver step durations so far.
    pub fn timings(&self) -> &Timings {
        &self.timings
    }

    /// Records a step duration.
    pub fn record(&mut self, step: &'static str, took: Duration) {
        self.timings.record(step, took);
    }

    /// The VMM process.
    pub fn process(&self) -> &VmProcess {
        &self.process
    }

    /// The VMM process, mutably (to wait on or kill it).
    pub fn process_mut(&mut self) -> &mut VmProcess {
        &mut self.process
    }
}

/// Errors from the VMM layer. Messages name the VM, file or call at fault;
/// where the VMM or guest printed something, its last lines are attached.
// Variant docs say when each happens; field names say the rest.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The VMM binary could not be started.
    #[error("cannot start {binary}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The VMM process exited while we still needed it; `status` is `None`
    /// if it was found unusable while still running.
    #[error("VMM of {vm} exited ({}) while {during}{}", status_text(.status), tail_suffix(.log_tail))]
    Exited {
        vm: VmId,
        status: Option<std::process::ExitStatus>,
        during: &'static str,
        log_tail: String,
    },
    /// A QMP command failed.
    #[error("QMP {command} on {vm}: {message}")]
    Qmp {
        vm: VmId,
        command: String,
        message: String,
    },
    /// A Cloud Hypervisor API call failed; `chain` is CH's own error chain.
    #[error("cloud-hypervisor {endpoint} on {vm}: HTTP {status}: {}", .chain.join(": "))]
    Api {
        vm: VmId,
        endpoint: String,
        status: u16,
        chain: Vec<String>,
    },
    /// Talking to the VMM's control socket failed.
    #[error("control socket of {vm}: {what}")]
    Control {
        vm: VmId,
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A snapshot file is missing, truncated or unreadable.
    #[error("snapshot file {}: {problem}", .path.display())]
    SnapshotFile { path: PathBuf, problem: String },
    /// The guest stopped (halted, panicked, shut down) while its VMM ran
    /// on; `error_line` is the guest's own last error line on its console.
    #[error("guest of {vm} stopped while {during}: {why}{}{}", error_line_suffix(.error_line), tail_suffix(.console_tail))]
    GuestStopped {
        vm: VmId,
        during: &'static str,
        why: String,
        error_line: Option<String>,
        console_tail: String,
    },
    /// A clone did not take its resumed message ([`resumed::send`]): `call`
    /// names the request, `problem` what went wrong.
    #[error("{vm} was not made its own: {call} {problem}")]
    Resume {
        vm: VmId,
        call: String,
        problem: String,
    },
    /// The host could not draw fresh entropy for a resumed message.
    #[error("cannot draw fresh entropy from the host's getrandom(2)")]
    Entropy {
        #[source]
        source: std::io::Error,
    },
    /// The guest did not answer its readiness probe in time.
    #[error("{vm} not ready after {:.1}s: GET {path} on {addr} via {tap}: {last_error}{}", .after.as_secs_f64(), tail_suffix(.console_tail))]
    NotReady {
        vm: VmId,
        after: Duration,
        path: String,
        addr: SocketAddrV4,
        tap: String,
        last_error: ready::GuestHttpError,
        console_tail: String,
    },
    /// A step did not finish in time.
    #[error("{vm}: {step} did not finish within {:.1}s", .after.as_secs_f64())]
    Timeout {
        vm: VmId,
        step: &'static str,
        after: Duration,
    },
    /// A file or directory operation failed.
    #[error("{what} {}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The image spec cannot be used: every problem, each naming its field.
    #[error("invalid image spec: {}", join_problems(.problems))]
    InvalidSpec { problems: Vec<crate::FieldError> },
    /// The kernel command line's placeholders cannot be filled in.
    #[error("kernel command line: {problem}")]
    Cmdline { problem: String },
    /// `accel: kvm` on a host without hardware KVM.
    #[error("accel: kvm needs /dev/kvm and a CPU with vmx or svm; use tcg or auto")]
    NoKvm,
    /// A snapshot taken by another VMM, or under another accelerator,
    /// than the driver asked to restore it.
    #[error("snapshot {} was taken {taken}, this driver runs {runs}", .dir.display())]
    ForeignSnapshot {
        dir: PathBuf,
        /// What took it (`by qemu`, `under tcg`).
        taken: String,
        /// What this driver is.
        runs: String,
    },
    /// The VMM's inherited file descriptors cannot be arranged.
    #[error("passing file descriptors to the VMM: {problem}")]
    FdMapping { problem: String },
    /// Host networking failed.
    #[error(transparent)]
    Net(#[from] NetError),
    /// A VMM's jail could not be prepared.
    #[error(transparent)]
    Jail(#[from] jail::JailError),
    /// The VMM process could not enter its jail: `step` is what the forked
    /// child wrote to its log (`snapgate jail: <step> failed`), or the
    /// gateway's move of it into its cgroup (crate::jail, protocol step 4).
    #[error("{vm}: the VMM could not enter its jail: {step}")]
    JailEntry {
        vm: VmId,
        step: String,
        #[source]
        source: std::io::Error,
    },
}

fn join_problems(problems: &[crate::FieldError]) -> String {
    let texts: Vec<String> = problems.iter().map(ToString::to_string).collect();
    texts.join("; ")
}

fn status_text(status: &Option<std::process::ExitStatus>) -> String {
    status.map_or_else(|| "still running".into(), |s| s.to_string())
}

fn error_line_suffix(line: &Option<String>) -> String {
    match line {
        Some(line) => format!("; the guest's last error line: {line:?}"),
        None => String::new(),
    }
}

fn tail_suffix(tail: &str) -> String {
    if tail.trim().is_empty() {
        String::new()
    } else {
        format!("; last output:\n{}", tail.trim_end())
    }
}

/// The lifecycle every VMM driver implements (see the module doc).
#[async_trait]
pub trait Vmm: Send + Sync + 'static {
    /// Which VMM this is.
    fn kind(&self) -> VmmKind;

    /// The accelerator VMs run under: `kvm` or `tcg`.
    fn accel(&self) -> &str;

    /// The tap addressing this driver's guests get.
    fn net(&self) -> &NetParams;

    /// Boots a template VM from `spec` on `tap`. Returns once the VMM runs the
    /// guest, not when the guest is ready ([`ready::wait_ready`]). The tap's
    /// fence admission, if any ([`net::Admitting`]), is done before the
    /// guest runs, and its slot kept with the VM; its error fails the boot.
    async fn boot(&self, id: VmId, spec: &ImageSpec, tap: Tap) -> Result<Vm, VmmError>;

    /// Whether the guest of `vm` has stopped while its VMM runs on, and
    /// why: it halted every vCPU with interrupts off, panicked, or shut
    /// down. `Ok(None)` when it runs, or when the driver cannot tell; an
    /// error when the VMM could not be asked (the [`watch`] bounds the
    /// call's time and treats both as "runs"). One sample: a caller
    /// confirms with a second.
    async fn guest_stopped(&self, vm: &Vm) -> Result<Option<String>, VmmError>;

    /// Snapshots a ready template into the directory `dest` (created, must
    /// not exist) and stops the template for good.
    async fn snapshot(&self, vm: Vm, dest: &std::path::Path) -> Result<Snapshot, VmmError>;

    /// Restores a new VM from `snapshot` onto `tap`. Returns once the guest
    /// runs again, not when it is ready. The tap's fence admission, if any
    /// ([`net::Admitting`]), overlaps the VMM's start and is done before the
    /// guest runs; its slot is kept with the VM, its error fails the
    /// restore.
    async fn restore(&self, id: VmId, snapshot: &Snapshot, tap: Tap) -> Result<Vm, VmmError>;

    /// Stops the VM and waits until its VMM process is gone.
    async fn destroy(&self, vm: Vm) -> Result<(), VmmError>;
}

/// An error and its `source()` chain on one line: `outer: cause: root`.
pub fn display_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        // Some errors repeat their source in their own message.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// A setting that cannot be used: which field, and why. Validators return
/// these; a config layer puts its own key path in front of `field`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The field, relative to the struct checked (`disks[0].path`).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl FieldError {
    /// A problem with `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> FieldError {
        FieldError {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}
