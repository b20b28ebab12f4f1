//! Jails for VMM processes: each VMM runs as an unprivileged user of its
//! own, in a mount namespace that shows it only what it needs, in a cgroup
//! of its own with a memory ceiling, a CPU weight and a pids limit, and
//! under its VMM's own seccomp filter (the drivers turn that on).
//!
//! Hand-written rather than taken from a sandboxing crate or tool
//! (bubblewrap, hakoniwa, cgroups-rs): the jail is entered in the VMM's own
//! process, between fork and exec, so that the pid snapgate spawns, waits
//! on (pidfd) and kills is the VMM itself, the parent-death signal holds,
//! and the VMM runs no instruction without its uid, namespaces and
//! `no_new_privs`, and no guest instruction outside its cgroup. The tools
//! above start the confined program as a child of a process of their own.
//!
//! # Protocol
//! 1. At start-up, [`Jail::new`] checks that the host can do each part that
//!    is on: capabilities for the user switch and the mount namespace, a
//!    cgroup hierarchy with the memory controller, a uid range that no
//!    account in `/etc/passwd` uses. A part the host cannot do fails
//!    start-up with an error naming it and the `vmm.jail` key that turns it
//!    off: never a silent downgrade. It also removes the empty cgroups a
//!    previous run of the same gateway left (after `kill_stale` killed their
//!    VMMs).
//! 2. Per VMM, in the gateway, [`Jail::confine`]: a uid is taken from the
//!    range (no two live VMMs of this process share one; the gid is the
//!    same number, a group of its own); the cgroup is created, its limits
//!    written and its `cgroup.procs` opened; the run directory is given to
//!    the uid; every path of the new root is turned into a C string.
//! 3. In the forked child, before exec ([`Plan::enter`], allocating
//!    nothing): join the cgroup (write `0` to each `cgroup.procs`) unless
//!    the VMM starts paused (step 4), unshare
//!    the mount, network and IPC namespaces and make the mounts private (no
//!    mount propagates back; the VMM has no network but its tap's fd),
//!    build the root on a tmpfs (read-only binds of the system paths, the
//!    VMM binary and the image files; the run directory read-write; the
//!    device nodes; a `/proc` that shows only the VMM's own processes),
//!    pivot into it, set umask 007, drop supplementary groups, gid and uid,
//!    and set `no_new_privs`. The caller sets the parent-death signal after this:
//!    a uid change clears it (prctl(2)).
//! 4. exec: the VMM starts confined. Its tap and any snapshot state come
//!    as inherited fds, opened by the gateway, so the VMM needs no
//!    capability and no access to the files they come from. A VMM that
//!    starts paused ([`Needs::paused`], set by its driver: no guest code
//!    runs until the driver loads or creates the VM) is moved into its
//!    cgroup now, by the gateway writing its pid to each `cgroup.procs` on
//!    a thread of its own, while the driver waits for the VMM's control
//!    socket; the driver gives the guest its first instruction only once
//!    both are done ([`crate::process::VmProcess::join_cgroup`]). Why: a
//!    move into a cgroup waits for an RCU grace period (the kernel takes
//!    `cgroup_threadgroup_rwsem` for writing), 8 to 16 ms on the hosts
//!    measured, which before exec would add to every cold start; after exec
//!    it overlaps the VMM's own start. Until the move the VMM runs only its
//!    own start-up code, under its uid and namespaces (its seccomp filter,
//!    if on, comes partway through that start). What it allocates
//!    meanwhile (up to about 15 MiB for QEMU under TCG; under KVM also the
//!    kernel's allocations for creating the VM) stays charged to the
//!    gateway's cgroup for the VMM's life: neither v1 nor v2 moves charges
//!    with a process. Only where the kernel lets the gateway move the VMM
//!    (cgroup v2, or v1 with the gateway root: see `may_move_others`);
//!    elsewhere a paused VMM too joins before exec. Where the host's
//!    cgroup v2 would let the child be created in its cgroup
//!    (`clone3(CLONE_INTO_CGROUP)`), that needs a spawn of snapgate's own
//!    rather than the standard library's: not done yet.
//! 5. Once the process is reaped, [`Confinement`] is dropped: the cgroup is
//!    removed and the uid goes back to the range. A uid is never handed out
//!    again while a process that had it may live. A process dropped while
//!    it runs (a start cancelled) is killed, and a task on a process-wide
//!    tracker drops its confinement once it has exited; a stopping gateway
//!    waits for those tasks ([`crate::process::jails_released`]) before it
//!    exits.

mod cgroup;
mod plan;

use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

pub use cgroup::{Cgroup, CgroupVersion};
pub use plan::Plan;

use crate::{FieldError, ImageSpec, VmId};

/// `vmm.jail` in `proxy.yaml`: how VMM processes are confined. Every part
/// is on by default; turning one off is the operator's explicit choice
/// (start-up refuses a host that lacks a part that is on).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JailParams {
    /// Each VMM runs as a uid of its own from `first_uid` ..
    /// `first_uid + uids`, with the same number as its only group. Needs
    /// CAP_SETUID, CAP_SETGID, CAP_CHOWN and CAP_KILL (to stop VMMs of
    /// other uids).
    pub user: bool,
    /// The first uid of the range. The default, 0x70000000, is above the
    /// ranges systemd hands to users, dynamic users and containers.
    pub first_uid: u32,
    /// How many uids the range has: at most that many VMMs at once.
    pub uids: u32,
    /// The VMM sees only a root of its own (a mount namespace): its run
    /// directory, its image files, `system_paths` read-only, the device
    /// nodes it needs; and no network (a network namespace of its own: it
    /// gets its tap as an fd) and no IPC objects but its own. Needs
    /// CAP_SYS_ADMIN. Refused without `user` (a root VMM could leave it).
    pub filesystem: bool,
    /// Host paths every VMM sees read-only: what a dynamically linked VMM
    /// binary needs (its libraries, firmware, the loader's cache).
    pub system_paths: Vec<PathBuf>,
    /// The VMM's own seccomp filter: QEMU's `-sandbox on` with obsolete,
    /// elevateprivileges, spawn and resourcecontrol denied; Cloud
    /// Hypervisor's built-in filter (`--seccomp true`, its default).
    pub seccomp: bool,
    /// A cgroup per VMM (v2, or v1 on hosts that still mount the memory
    /// controller there), removed with the VMM.
    pub cgroup: bool,
    /// The memory ceiling is the guest's `memory_mib` plus this, in MiB:
    /// the VMM's own memory (under software emulation, TCG's code cache),
    /// and the pages a clone's first touch of guest memory its template
    /// never used adds to the shared snapshot memory.
    pub memory_overhead_mib: u32,
    /// CPU weight, 1 to 10000 (cgroup v2 `cpu.weight`; v1 `cpu.shares` is
    /// this times 1024 / 100).
    pub cpu_weight: u32,
    /// Most tasks (threads) the VMM may have (`pids.max`).
    pub pids_max: u32,
}

impl Default for JailParams {
    fn default() -> Self {
        JailParams {
            user: true,
            first_uid: 0x7000_0000,
            uids: 65536,
            filesystem: true,
            system_paths: vec!["/usr".into(), "/etc/ld.so.cache".into()],
            seccomp: true,
            cgroup: true,
            memory_overhead_mib: 256,
            cpu_weight: 100,
            pids_max: 256,
        }
    }
}

impl JailParams {
    /// Checks ranges and paths; the error names the field.
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.user {
            if self.first_uid == 0 {
                return Err(FieldError::new("first_uid", "must not be 0 (root)"));
            }
            if self.uids == 0 {
                return Err(FieldError::new("uids", "must be at least 1"));
            }
            if self
                .first_uid
                .checked_add(self.uids - 1)
                .is_none_or(|last| last == u32::MAX)
            {
                return Err(FieldError::new(
                    "uids",
                    format!(
                        "{} uids from {} go past the largest uid",
                        self.uids, self.first_uid
                    ),
                ));
            }
        }
        if self.filesystem && !self.user {
            return Err(FieldError::new(
                "filesystem",
                "needs user: a VMM that runs as root can leave its mount namespace",
            ));
        }
        if !(1..=10000).contains(&self.cpu_weight) {
            return Err(FieldError::new(
                "cpu_weight",
                format!("{} must be between 1 and 10000", self.cpu_weight),
            ));
        }
        if self.pids_max == 0 {
            return Err(FieldError::new("pids_max", "must be at least 1"));
        }
        if let Some(p) = self.system_paths.iter().find(|p| !p.is_absolute()) {
            return Err(FieldError::new(
                "system_paths",
                format!("{} is not an absolute path", p.display()),
            ));
        }
        Ok(())
    }

    /// Whether any part is on.
    pub fn any(&self) -> bool {
        self.user || self.filesystem || self.seccomp || self.cgroup
    }
}

/// Errors from setting up jails. Each names the part and, for a host that
/// lacks something, the key that turns the part off.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// The host cannot do a part of the jail that is on.
    #[error("vmm.jail.{part}: {problem}; set vmm.jail.{part}: false to run VMMs without it")]
    Unsupported {
        /// The `vmm.jail` key of the part.
        part: &'static str,
        /// What the host lacks.
        problem: String,
    },
    /// A setting is out of range.
    #[error("vmm.jail.{}: {}", .0.field, .0.message)]
    Invalid(FieldError),
    /// The VMM binary cannot be found.
    #[error("vmm.binary: {problem}")]
    Binary {
        /// Why.
        problem: String,
    },
    /// Every uid of the range is taken by a live VMM.
    #[error("vmm.jail.uids: all {uids} uids from {first} are in use by live VMMs")]
    NoUid {
        /// The first uid of the range.
        first: u32,
        /// The size of the range.
        uids: u32,
    },
    /// A file the VMM must read is not readable by its unprivileged user.
    #[error(
        "{path} is not readable by the VMMs' unprivileged users (mode {mode:o}); \
         make it and its directories readable by others, or set vmm.jail.user: false"
    )]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A file or cgroup operation failed.
    #[error("jail: cannot {what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl JailError {
    fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> JailError + 'a {
        move |source| JailError::Io {
            what,
            path: path.to_owned(),
            source,
        }
    }
}

/// How a path is shown in a VMM's root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Read-only, with no device nodes or set-uid binaries honoured.
    ReadOnly,
    /// Read-write (the VM's run directory).
    ReadWrite,
    /// A device node.
    Device,
}

/// What one VMM needs in its root, besides the jail's system paths.
#[derive(Debug, Default)]
pub struct Needs {
    /// Host paths, each shown at the same path in the root.
    pub paths: Vec<(PathBuf, Access)>,
    /// The guest's memory, in MiB (for the memory ceiling).
    pub memory_mib: u32,
    /// The VMM starts with no guest code running until its driver says so
    /// (a QEMU clone waiting for its incoming snapshot; a Cloud Hypervisor
    /// process before its VM is created or restored): it may join its
    /// cgroup while it starts (protocol, step 4) rather than before exec.
    pub paused: bool,
}

impl Needs {
    /// What a VMM running `spec` needs: the kernel and initramfs when it
    /// `boots` (a clone's kernel is in its snapshot), the disks read-only,
    /// `run_dir` read-write, `/dev/null`, `/dev/urandom` and, with `kvm`,
    /// `/dev/kvm`.
    pub fn image(spec: &ImageSpec, boots: bool, run_dir: &Path, kvm: bool) -> Needs {
        let mut paths = Vec::new();
        if boots {
            paths.push((spec.kernel.clone(), Access::ReadOnly));
            paths.extend(spec.initramfs.iter().map(|p| (p.clone(), Access::ReadOnly)));
        }
        paths.extend(
            spec.disks
                .iter()
                .map(|d| (d.path.clone(), Access::ReadOnly)),
        );
        paths.push((run_dir.to_owned(), Access::ReadWrite));
        let devices = ["/dev/null", "/dev/urandom", "/dev/kvm"];
        let devices = &devices[..if kvm { 3 } else { 2 }];
        paths.extend(devices.iter().map(|d| (PathBuf::from(d), Access::Device)));
        Needs {
            paths,
            memory_mib: spec.memory_mib,
            // A driver whose VMM starts paused says so.
            paused: false,
        }
    }
}

/// The jail of every VMM of one gateway (see the module doc).
#[derive(Debug)]
pub struct Jail {
    params: JailParams,
    binary: PathBuf,
    /// Where each VMM's new root is mounted (in its own namespace only).
    root: PathBuf,
    uids: Arc<Mutex<Uids>>,
    cgroups: Option<cgroup::Hierarchy>,
    /// `/lib` -> `usr/lib` and the like: the host's top-level symlinks
    /// into a system path, recreated in each root.
    symlinks: Vec<(PathBuf, PathBuf)>,
    /// The group of `/dev/kvm`, given to VMMs that use it.
    kvm_gid: Option<u32>,
    /// The kernel lets this gateway move its VMMs into their cgroups after
    /// exec ([`may_move_others`]).
    moves_vmms: bool,
}

#[derive(Debug)]
struct Uids {
    in_use: BTreeSet<u32>,
    next: u32,
}

/// The bits of `CapEff` in `/proc/self/status` (capabilities(7)).
const CAP_CHOWN: u32 = 0;
const CAP_KILL: u32 = 5;
const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;
const CAP_SYS_ADMIN: u32 = 21;

impl Jail {
    /// Checks the host for each part that is on (module doc, step 1) and
    /// prepares the jail of the VMMs of `binary`, keeping its files under
    /// `state_dir`; `scope` names this gateway's cgroups (its tap prefix).
    pub fn new(
        params: JailParams,
        binary: &Path,
        state_dir: &Path,
        scope: &str,
    ) -> Result<Jail, JailError> {
        params.validate().map_err(JailError::Invalid)?;
        let caps = effective_caps();
        let need = |part: &'static str, caps_needed: &[(u32, &str)]| {
            let missing: Vec<&str> = caps_needed
                .iter()
                .filter(|(bit, _)| caps & (1u64 << bit) == 0)
                .map(|(_, name)| *name)
                .collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(JailError::Unsupported {
                    part,
                    problem: format!("snapgate lacks {}", missing.join(", ")),
                })
            }
        };
        if params.user {
            need(
                "user",
                &[
                    (CAP_SETUID, "CAP_SETUID"),
                    (CAP_SETGID, "CAP_SETGID"),
                    (CAP_CHOWN, "CAP_CHOWN"),
                    (CAP_KILL, "CAP_KILL"),
                ],
            )?;
            check_uid_range(params.first_uid, params.uids)?;
        }
        if params.filesystem {
            need("filesystem", &[(CAP_SYS_ADMIN, "CAP_SYS_ADMIN")])?;
        }
        let binary = resolve_binary(binary).map_err(|problem| JailError::Binary { problem })?;
        let root = state_dir.join("jail");
        if params.filesystem {
            std::fs::create_dir_all(&root).map_err(JailError::io("create", &root))?;
        }
        let cgroups = if params.cgroup {
            let h = cgroup::Hierarchy::find(scope).map_err(|problem| JailError::Unsupported {
                part: "cgroup",
                problem,
            })?;
            h.remove_stale();
            Some(h)
        } else {
            None
        };
        let symlinks = top_level_symlinks(&params.system_paths);
        let kvm_gid = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata("/dev/kvm").ok().map(|m| m.gid())
        };
        let seed = (std::process::id().wrapping_mul(64)) % params.uids.max(1);
        let moves_vmms = cgroups.as_ref().is_some_and(|h| {
            may_move_others(h.version(), nix::unistd::geteuid().is_root(), params.user)
        });
        Ok(Jail {
            moves_vmms,
            uids: process_uids(seed),
            params,
            binary,
            root,
            cgroups,
            symlinks,
            kvm_gid,
        })
    }

    /// The settings.
    pub fn params(&self) -> &JailParams {
        &self.params
    }

    /// The VMM binary, resolved to an absolute path.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// Which cgroup version VMMs are put in, if any.
    pub fn cgroup_version(&self) -> Option<CgroupVersion> {
        self.cgroups.as_ref().map(|h| h.version())
    }

    /// Prepares the confinement of VMM `id` (module doc, step 2): its uid,
    /// its cgroup, its run directory's owner and the plan of its root.
    pub fn confine(
        &self,
        id: &VmId,
        run_dir: &Path,
        needs: &Needs,
    ) -> Result<Confinement, JailError> {
        let uid = if self.params.user {
            Some(self.take_uid()?)
        } else {
            None
        };
        let mut confinement = Confinement {
            cgroup: None,
            uid,
            plan: None,
            join_after_exec: false,
        };
        if let Some(lease) = &confinement.uid {
            // The run directory is the VMM's to write in, and the gateway's
            // group's (set-group-ID, so what the VMM creates there is the
            // gateway's group's too; the VMM runs with umask 007): the
            // gateway reaches the VMM's sockets and logs without any
            // override of file permissions. What the gateway put there
            // (the extra disk, the VMM's log) stays the gateway's.
            use std::os::unix::fs::PermissionsExt;
            // The mode first, while the gateway owns it (a directory keeps
            // set-group-ID through chown).
            let id = Some(nix::unistd::Uid::from_raw(lease.uid));
            std::fs::set_permissions(run_dir, std::fs::Permissions::from_mode(0o2770))
                .map_err(JailError::io("set the mode of", run_dir))?;
            nix::unistd::chown(run_dir, id, Some(nix::unistd::getegid()))
                .map_err(|e| JailError::io("give the VMM's uid", run_dir)(e.into()))?;
            for (path, access) in &needs.paths {
                if *access == Access::ReadOnly {
                    // In its own root the VMM reaches a file through
                    // directories of the jail's: only the host's own
                    // directories matter when there is no root of its own.
                    check_readable(path, !self.params.filesystem)?;
                }
            }
        }
        if let Some(h) = &self.cgroups {
            let mib = u64::from(needs.memory_mib) + u64::from(self.params.memory_overhead_mib);
            confinement.cgroup = Some(h.create(
                id,
                cgroup::Limits {
                    memory_bytes: mib << 20,
                    cpu_weight: self.params.cpu_weight,
                    pids_max: self.params.pids_max,
                },
            )?);
        }
        let mut groups = Vec::new();
        if needs
            .paths
            .iter()
            .any(|(p, a)| *a == Access::Device && p == Path::new("/dev/kvm"))
        {
            groups.extend(self.kvm_gid);
        }
        // A paused VMM is moved into its cgroup by the gateway while it
        // starts, where the gateway may move it (protocol, step 4); any
        // other joins it before exec.
        confinement.join_after_exec =
            needs.paused && confinement.cgroup.is_some() && self.moves_vmms;
        let procs: Vec<&OwnedFd> = match &confinement.cgroup {
            Some(c) if !confinement.join_after_exec => c.procs().collect(),
            _ => Vec::new(),
        };
        let mut paths: Vec<(PathBuf, Access)> = Vec::new();
        if self.params.filesystem {
            paths.extend(
                self.params
                    .system_paths
                    .iter()
                    .filter(|p| p.exists())
                    .map(|p| (p.clone(), Access::ReadOnly)),
            );
            if !self
                .params
                .system_paths
                .iter()
                .any(|s| self.binary.starts_with(s))
            {
                paths.push((self.binary.clone(), Access::ReadOnly));
            }
            paths.extend(needs.paths.iter().cloned());
        }
        confinement.plan = Some(Plan::new(plan::Spec {
            root: self.params.filesystem.then_some(self.root.as_path()),
            paths: &paths,
            symlinks: &self.symlinks,
            cwd: run_dir,
            ids: confinement.uid.as_ref().map(|l| (l.uid, l.uid)),
            groups: &groups,
            procs: &procs,
        })?);
        Ok(confinement)
    }

    fn take_uid(&self) -> Result<UidLease, JailError> {
        let mut uids = self.uids.lock().unwrap_or_else(|p| p.into_inner());
        let count = self.params.uids;
        for _ in 0..count {
            let offset = uids.next % count;
            uids.next = (offset + 1) % count;
            let uid = self.params.first_uid + offset;
            if uids.in_use.insert(uid) {
                return Ok(UidLease {
                    uid,
                    pool: self.uids.clone(),
                });
            }
        }
        drop(uids);
        Err(JailError::NoUid {
            first: self.params.first_uid,
            uids: count,
        })
    }
}

/// One VMM's uid, its cgroup and the plan of its root. Dropped only once
/// its process is reaped (module doc, step 5): the cgroup goes first, and
/// the uid goes back to the range only if the cgroup went (a cgroup that
/// still holds a process keeps its uid taken).
#[derive(Debug)]
pub struct Confinement {
    cgroup: Option<Cgroup>,
    uid: Option<UidLease>,
    plan: Option<Plan>,
    /// The gateway moves the VMM into its cgroup after exec (protocol,
    /// step 4).
    join_after_exec: bool,
}

impl Drop for Confinement {
    fn drop(&mut self) {
        if let Some(cgroup) = self.cgroup.take() {
            if !cgroup.remove() {
                if let Some(lease) = self.uid.take() {
                    tracing::warn!(
                        uid = lease.uid,
                        "a VMM's cgroup still holds a process: its uid stays taken"
                    );
                    std::mem::forget(lease);
                }
            }
        }
    }
}

impl Confinement {
    /// The uid the VMM runs as, if the user part is on.
    pub fn uid(&self) -> Option<u32> {
        self.uid.as_ref().map(|l| l.uid)
    }

    /// The VMM's cgroup, if the cgroup part is on.
    pub fn cgroup(&self) -> Option<&Cgroup> {
        self.cgroup.as_ref()
    }

    /// For a VMM that joins its cgroup after exec (protocol, step 4): what
    /// moves process `pid` in, to run on a thread of its own (the move
    /// waits for an RCU grace period). `None`: nothing to move (it joined
    /// before exec, or has no cgroup).
    pub fn mover(
        &self,
        pid: u32,
    ) -> Option<std::io::Result<impl FnOnce() -> std::io::Result<()> + Send + 'static>> {
        match (&self.cgroup, self.join_after_exec) {
            (Some(cgroup), true) => Some(cgroup.mover(pid)),
            _ => None,
        }
    }

    /// The plan the forked child follows, taken once for the spawn.
    pub fn take_plan(&mut self) -> Option<Plan> {
        self.plan.take()
    }
}

#[derive(Debug)]
struct UidLease {
    uid: u32,
    pool: Arc<Mutex<Uids>>,
}

impl Drop for UidLease {
    fn drop(&mut self) {
        let mut uids = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        uids.in_use.remove(&self.uid);
    }
}

/// The uids in use by this process's VMMs, whichever gateway (and jail)
/// started them: two jails of one process never hand out the same uid.
/// Another process on the host drawing from the same range is told apart
/// by its pid-derived starting point only: give each gateway on a host a
/// range of its own (`first_uid`).
fn process_uids(seed: u32) -> Arc<Mutex<Uids>> {
    static UIDS: std::sync::OnceLock<Arc<Mutex<Uids>>> = std::sync::OnceLock::new();
    UIDS.get_or_init(|| {
        Arc::new(Mutex::new(Uids {
            in_use: BTreeSet::new(),
            next: seed,
        }))
    })
    .clone()
}

/// Whether a gateway may move its VMMs into their cgroups after exec
/// (protocol, step 4). cgroup v2 asks only for write access to the
/// `cgroup.procs` of the common ancestor, which the delegated subtree
/// gives; cgroup v1 also asks the writer to be root or to have the
/// target's uid (the kernel's `__cgroup1_procs_write`), which a gateway run
/// as a user of its own (`dist/snapgate.service`) has not once the VMM
/// runs as its own uid: such a VMM joins before exec.
fn may_move_others(version: CgroupVersion, euid_root: bool, own_uid: bool) -> bool {
    match version {
        CgroupVersion::V2 => true,
        CgroupVersion::V1 => euid_root || !own_uid,
    }
}

/// `CapEff` of this process (capabilities(7)), 0 if unreadable.
fn effective_caps() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// Fails if an account in `/etc/passwd` or a group in `/etc/group` has a
/// number in the range: a VMM must not share its uid with anything else.
fn check_uid_range(first: u32, count: u32) -> Result<(), JailError> {
    let last = u64::from(first) + u64::from(count) - 1;
    for file in ["/etc/passwd", "/etc/group"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines() {
            let mut fields = line.split(':');
            let name = fields.next().unwrap_or("");
            let Some(id) = fields.nth(1).and_then(|f| f.parse::<u64>().ok()) else {
                continue;
            };
            if (u64::from(first)..=last).contains(&id) {
                return Err(JailError::Unsupported {
                    part: "user",
                    problem: format!(
                        "{name} in {file} has id {id}, inside the range of {count} uids from \
                         {first}; choose vmm.jail.first_uid elsewhere"
                    ),
                });
            }
        }
    }
    Ok(())
}

/// `binary` as an absolute, symlink-free path (looked up on `PATH` when it
/// has no slash).
fn resolve_binary(binary: &Path) -> Result<PathBuf, String> {
    let found = if binary.components().count() > 1 || binary.is_absolute() {
        Some(binary.to_owned())
    } else {
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(binary))
                .find(|p| p.is_file())
        })
    };
    let found = found.ok_or_else(|| format!("{} is not on PATH", binary.display()))?;
    std::fs::canonicalize(&found).map_err(|e| format!("{}: {e}", found.display()))
}

/// The host's top-level symlinks into a system path (`/lib` -> `usr/lib`
/// on a merged-/usr system), so that paths a binary has compiled in
/// (its ELF interpreter, `/lib64/ld-linux-x86-64.so.2`) resolve in the root.
fn top_level_symlinks(system: &[PathBuf]) -> Vec<(PathBuf, PathBuf)> {
    let Ok(entries) = std::fs::read_dir("/") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let path = e.path();
            let target = std::fs::read_link(&path).ok()?;
            let resolved = Path::new("/").join(&target);
            system
                .iter()
                .any(|s| resolved.starts_with(s))
                .then_some((path, target))
        })
        .collect()
}

/// Fails unless `path` is readable by others and, with `ancestors`, each
/// of its directories searchable by others: what an unprivileged VMM needs
/// to open it.
fn check_readable(path: &Path, ancestors: bool) -> Result<(), JailError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(JailError::io("look at", path))?;
    let mode = meta.permissions().mode();
    let need = if meta.is_dir() { 0o005 } else { 0o004 };
    if mode & need != need {
        return Err(JailError::Unreadable {
            path: path.to_owned(),
            mode: mode & 0o7777,
        });
    }
    for dir in path.ancestors().skip(1).filter(|_| ancestors) {
        let Ok(meta) = std::fs::metadata(dir) else {
            continue;
        };
        let mode = meta.permissions().mode();
        if mode & 0o001 == 0 {
            return Err(JailError::Unreadable {
                path: dir.to_owned(),
                mode: mode & 0o7777,
            });
        }
    }
    Ok(())
}

/// `path` as a C string (paths hold no NUL).
fn cstr(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("paths hold no NUL byte")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_on_and_valid() {
        let p = JailParams::default();
        assert!(p.user && p.filesystem && p.seccomp && p.cgroup);
        p.validate().unwrap();
    }

    #[test]
    fn validation_names_the_field() {
        let bad = |f: fn(&mut JailParams)| {
            let mut p = JailParams::default();
            f(&mut p);
            p.validate().unwrap_err().field
        };
        assert_eq!(bad(|p| p.first_uid = 0), "first_uid");
        assert_eq!(bad(|p| p.uids = 0), "uids");
        assert_eq!(
            bad(|p| {
                p.first_uid = u32::MAX - 10;
                p.uids = 11
            }),
            "uids"
        );
        assert_eq!(bad(|p| p.cpu_weight = 0), "cpu_weight");
        assert_eq!(bad(|p| p.pids_max = 0), "pids_max");
        assert_eq!(bad(|p| p.system_paths = vec!["usr".into()]), "system_paths");
    }

    #[test]
    fn only_a_gateway_the_kernel_lets_move_its_vmms_moves_them_after_exec() {
        use CgroupVersion::{V1, V2};
        // v2: the delegated subtree is enough, whoever runs the gateway.
        assert!(may_move_others(V2, false, true));
        assert!(may_move_others(V2, true, true));
        // v1: root may move any process; a gateway of another uid only
        // VMMs that kept its uid.
        assert!(may_move_others(V1, true, true));
        assert!(!may_move_others(V1, false, true));
        assert!(may_move_others(V1, false, false));
    }

    #[test]
    fn a_uid_range_that_holds_an_account_is_refused() {
        // root (0) is in every /etc/passwd.
        let err = check_uid_range(0, 10).unwrap_err().to_string();
        assert!(err.contains("root"), "{err}");
        check_uid_range(0x7000_0000, 65536).unwrap();
    }

    #[test]
    fn uids_are_unique_among_live_vmms_and_come_back() {
        let jail = Jail {
            params: JailParams {
                uids: 2,
                ..JailParams::default()
            },
            binary: "/bin/true".into(),
            root: "/nonexistent".into(),
            uids: Arc::new(Mutex::new(Uids {
                in_use: BTreeSet::new(),
                next: 0,
            })),
            cgroups: None,
            symlinks: Vec::new(),
            kvm_gid: None,
            moves_vmms: false,
        };
        let a = jail.take_uid().unwrap();
        let b = jail.take_uid().unwrap();
        assert_ne!(a.uid, b.uid);
        assert!(matches!(jail.take_uid(), Err(JailError::NoUid { .. })));
        let freed = a.uid;
        drop(a);
        assert_eq!(jail.take_uid().unwrap().uid, freed);
    }

    #[test]
    fn binaries_resolve_on_path_to_real_files() {
        let sh = resolve_binary(Path::new("sh")).unwrap();
        assert!(sh.is_absolute() && sh.is_file(), "{}", sh.display());
        assert!(resolve_binary(Path::new("no-such-vmm-binary")).is_err());
    }
}
