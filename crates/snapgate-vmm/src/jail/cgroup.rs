//! One cgroup per VMM, under a directory of this gateway's own.
//!
//! - **v2** (a `cgroup2` mount whose `cgroup.controllers` has `memory`,
//!   `cpu` and `pids`): VMMs go in `<own>/snapgate-vms-<scope>/<vm>`, where
//!   `<own>` is the gateway's cgroup. v2 lets a cgroup hand controllers to
//!   its children only while it holds no process itself
//!   (cgroup-v2.rst, "No Internal Process Constraint"), so unless `<own>`
//!   is the root the gateway first moves itself into
//!   `<own>/snapgate-gateway`. Under systemd the unit needs `Delegate=yes`.
//!   Limits: `memory.max`, `memory.swap.max` 0, `memory.oom.group` 1,
//!   `cpu.weight`, `pids.max`.
//! - **v1** (hosts that mount the memory controller on a v1 hierarchy, as
//!   hybrid set-ups do): `<mount>/<own>/snapgate-vms-<scope>/<vm>` in each
//!   of the memory, cpu and pids hierarchies. Limits:
//!   `memory.limit_in_bytes` (and `memory.memsw.limit_in_bytes` to the same,
//!   where swap accounting is on), `cpu.shares`, `pids.max`.
//!
//! Over its memory ceiling, the kernel's OOM killer kills within the
//! cgroup: the VMM alone, never the gateway or another VM.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use super::JailError;
use crate::VmId;

/// Which cgroup interface VMMs are put in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupVersion {
    /// The legacy per-controller hierarchies.
    V1,
    /// The unified hierarchy.
    V2,
}

impl std::fmt::Display for CgroupVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CgroupVersion::V1 => "v1",
            CgroupVersion::V2 => "v2",
        })
    }
}

/// The limits of one VMM's cgroup.
pub(super) struct Limits {
    pub memory_bytes: u64,
    pub cpu_weight: u32,
    pub pids_max: u32,
}

/// Where this gateway's VMM cgroups go.
#[derive(Debug)]
pub(super) struct Hierarchy {
    version: CgroupVersion,
    /// v2: one directory; v1: memory, cpu, pids, in that order.
    bases: Vec<PathBuf>,
}

const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

impl Hierarchy {
    /// Finds a hierarchy with the memory, cpu and pids controllers (v2
    /// first) and creates this gateway's directory in it. The error says
    /// what the host lacks.
    pub fn find(scope: &str) -> Result<Hierarchy, String> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
        let mounts = parse_mounts(&mountinfo);
        let dir_name = format!("snapgate-vms-{scope}");
        if let Some((mount, _)) = mounts.iter().find(|(_, fs)| fs == "cgroup2") {
            let controllers =
                std::fs::read_to_string(mount.join("cgroup.controllers")).unwrap_or_default();
            if CONTROLLERS
                .iter()
                .all(|c| controllers.split_whitespace().any(|w| w == *c))
            {
                let path = own_path(&own, None).unwrap_or("/");
                let base = v2_base(mount, path, &dir_name)?;
                return Ok(Hierarchy {
                    version: CgroupVersion::V2,
                    bases: vec![base],
                });
            }
        }
        let mut bases = Vec::new();
        for controller in CONTROLLERS {
            let mount = mounts
                .iter()
                .find(|(_, fs)| fs.split(',').any(|o| o == controller) && fs.starts_with("cgroup,"))
                .map(|(m, _)| m)
                .ok_or_else(|| {
                    format!(
                        "no cgroup v2 hierarchy with the memory, cpu and pids controllers, \
                         and no v1 hierarchy with {controller}"
                    )
                })?;
            let path = own_path(&own, Some(controller)).unwrap_or("/");
            let base = mount.join(path.trim_start_matches('/')).join(&dir_name);
            std::fs::create_dir_all(&base)
                .map_err(|e| format!("cannot create {}: {e}", base.display()))?;
            bases.push(base);
        }
        Ok(Hierarchy {
            version: CgroupVersion::V1,
            bases,
        })
    }

    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// Removes the VM cgroups a previous run left; a cgroup that still
    /// holds a process is kept and logged.
    pub fn remove_stale(&self) {
        for base in &self.bases {
            let Ok(entries) = std::fs::read_dir(base) else {
                continue;
            };
            for dir in entries.flatten().filter(|e| e.path().is_dir()) {
                if let Err(e) = std::fs::remove_dir(dir.path()) {
                    tracing::warn!(
                        cgroup = %dir.path().display(),
                        "a VMM cgroup left by an earlier run cannot be removed: {e}"
                    );
                }
            }
        }
    }

    /// Creates VMM `id`'s cgroup with `limits` and opens its
    /// `cgroup.procs`.
    pub fn create(&self, id: &VmId, limits: Limits) -> Result<Cgroup, JailError> {
        let mut cgroup = Cgroup {
            dirs: Vec::new(),
            procs: Vec::new(),
            version: self.version,
        };
        for base in &self.bases {
            let dir = base.join(id.as_str());
            let mut made = std::fs::create_dir(&dir);
            if made
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
            {
                // The directory of this gateway's VMMs went with an earlier
                // gateway of the same scope that stopped meanwhile.
                self.make_base(base).map_err(|source| JailError::Io {
                    what: "create",
                    path: base.clone(),
                    source,
                })?;
                made = std::fs::create_dir(&dir);
            }
            match made {
                Ok(()) => {}
                // Left by a VMM of the same id that died with its gateway.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(source) => {
                    return Err(JailError::Io {
                        what: "create cgroup",
                        path: dir,
                        source,
                    })
                }
            }
            cgroup.dirs.push(dir);
        }
        let write = |dir: &Path, file: &str, value: String| {
            let path = dir.join(file);
            std::fs::write(&path, value).map_err(|source| JailError::Io {
                what: "set",
                path,
                source,
            })
        };
        match self.version {
            CgroupVersion::V2 => {
                let dir = &cgroup.dirs[0];
                write(dir, "memory.max", limits.memory_bytes.to_string())?;
                if dir.join("memory.swap.max").exists() {
                    write(dir, "memory.swap.max", "0".into())?;
                }
                write(dir, "memory.oom.group", "1".into())?;
                write(dir, "cpu.weight", limits.cpu_weight.to_string())?;
                write(dir, "pids.max", limits.pids_max.to_string())?;
            }
            CgroupVersion::V1 => {
                let (memory, cpu, pids) = (&cgroup.dirs[0], &cgroup.dirs[1], &cgroup.dirs[2]);
                write(
                    memory,
                    "memory.limit_in_bytes",
                    limits.memory_bytes.to_string(),
                )?;
                if memory.join("memory.memsw.limit_in_bytes").exists() {
                    write(
                        memory,
                        "memory.memsw.limit_in_bytes",
                        limits.memory_bytes.to_string(),
                    )?;
                }
                let shares = (u64::from(limits.cpu_weight) * 1024 / 100).max(2);
                write(cpu, "cpu.shares", shares.to_string())?;
                write(pids, "pids.max", limits.pids_max.to_string())?;
            }
        }
        for dir in &cgroup.dirs {
            let path = dir.join("cgroup.procs");
            let file = File::options()
                .write(true)
                .open(&path)
                .map_err(|source| JailError::Io {
                    what: "open",
                    path: path.clone(),
                    source,
                })?;
            // Above the fds a VMM inherits (3, 4, 5...): the child writes to
            // it after they were put in place.
            let high = rustix::io::fcntl_dupfd_cloexec(&file, 64).map_err(|e| JailError::Io {
                what: "duplicate",
                path,
                source: e.into(),
            })?;
            cgroup.procs.push(high);
        }
        Ok(cgroup)
    }
}

impl Hierarchy {
    /// Creates `base` again (and, in v2, hands it the controllers).
    fn make_base(&self, base: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(base)?;
        if self.version == CgroupVersion::V2 {
            std::fs::write(base.join("cgroup.subtree_control"), "+memory +cpu +pids")?;
        }
        Ok(())
    }
}

impl Drop for Hierarchy {
    /// The directory of this gateway's VMMs goes with its jail, once empty
    /// (a VMM not reaped yet keeps it; a gateway of the same scope creates
    /// it again as it needs it).
    fn drop(&mut self) {
        for base in &self.bases {
            let _ = std::fs::remove_dir(base);
        }
    }
}

/// The v2 directory VMM cgroups go in, under the gateway's own cgroup
/// `path` on `mount` (module doc).
fn v2_base(mount: &Path, path: &str, dir_name: &str) -> Result<PathBuf, String> {
    const GATEWAY: &str = "snapgate-gateway";
    let enable = "+memory +cpu +pids";
    let mut own = mount.join(path.trim_start_matches('/'));
    // A second gateway in a process that moved itself already.
    if own.file_name().is_some_and(|n| n == GATEWAY) {
        own.pop();
    }
    if own != mount {
        let leaf = own.join(GATEWAY);
        std::fs::create_dir_all(&leaf)
            .map_err(|e| format!("cannot create {}: {e}", leaf.display()))?;
        std::fs::write(leaf.join("cgroup.procs"), std::process::id().to_string())
            .map_err(|e| format!("cannot move snapgate into {}: {e}", leaf.display()))?;
    }
    std::fs::write(own.join("cgroup.subtree_control"), enable).map_err(|e| {
        format!(
            "cannot hand the memory, cpu and pids controllers down from {} ({e}); run \
             snapgate in a cgroup of its own (systemd: Delegate=yes)",
            own.display()
        )
    })?;
    let base = own.join(dir_name);
    std::fs::create_dir_all(&base).map_err(|e| format!("cannot create {}: {e}", base.display()))?;
    std::fs::write(base.join("cgroup.subtree_control"), enable).map_err(|e| {
        format!(
            "cannot hand the memory, cpu and pids controllers down to {}: {e}",
            base.display()
        )
    })?;
    Ok(base)
}

/// `(mount point, fstype,super options)` of each cgroup mount in
/// `/proc/self/mountinfo` text (proc(5)): v1 mounts read `cgroup,<opts>`,
/// v2 mounts `cgroup2`.
fn parse_mounts(mountinfo: &str) -> Vec<(PathBuf, String)> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount = left.split(' ').nth(4)?;
            let mut right = right.split(' ');
            let fstype = right.next()?;
            let options = right.nth(1).unwrap_or("");
            match fstype {
                "cgroup2" => Some((PathBuf::from(mount), "cgroup2".to_owned())),
                "cgroup" => Some((PathBuf::from(mount), format!("cgroup,{options}"))),
                _ => None,
            }
        })
        .collect()
}

/// The gateway's cgroup path in `/proc/self/cgroup` text (cgroups(7)):
/// for `controller` in v1, else the v2 entry (`0::<path>`).
fn own_path<'a>(text: &'a str, controller: Option<&str>) -> Option<&'a str> {
    text.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let matches = match controller {
            None => controllers.is_empty(),
            Some(c) => controllers.split(',').any(|x| x == c),
        };
        matches.then_some(path)
    })
}

/// One VMM's cgroup: its directories (one in v2, three in v1) and their
/// open `cgroup.procs`. Removed when dropped, which happens once the VMM
/// is reaped.
#[derive(Debug)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
    procs: Vec<OwnedFd>,
    version: CgroupVersion,
}

impl Cgroup {
    /// The `cgroup.procs` files, for the child to join.
    pub(super) fn procs(&self) -> impl Iterator<Item = &OwnedFd> {
        self.procs.iter()
    }

    /// A mover of process `pid` into this cgroup, for a thread of its own
    /// (jail protocol, step 4): it writes the pid to each `cgroup.procs`
    /// (cgroups(7), "Creating cgroups and moving processes"), through
    /// copies of the files opened at [`Hierarchy::create`].
    pub(super) fn mover(&self, pid: u32) -> std::io::Result<impl FnOnce() -> std::io::Result<()>> {
        if pid == 0 {
            // "0" moves the writer: the gateway itself.
            return Err(std::io::Error::other("no pid to move"));
        }
        let procs = self
            .procs
            .iter()
            .map(|fd| fd.try_clone())
            .collect::<std::io::Result<Vec<OwnedFd>>>()?;
        Ok(move || {
            let text = pid.to_string();
            for fd in &procs {
                let wrote =
                    nix::unistd::write(fd, text.as_bytes()).map_err(std::io::Error::from)?;
                if wrote != text.len() {
                    return Err(std::io::Error::other("a short write to cgroup.procs"));
                }
            }
            Ok(())
        })
    }

    /// The cgroup's directories: v2 one; v1 memory, cpu, pids.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Which interface it is in.
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// The memory ceiling file: `memory.max` (v2) or
    /// `memory.limit_in_bytes` (v1).
    pub fn memory_limit_file(&self) -> PathBuf {
        match self.version {
            CgroupVersion::V2 => self.dirs[0].join("memory.max"),
            CgroupVersion::V1 => self.dirs[0].join("memory.limit_in_bytes"),
        }
    }
}

impl Cgroup {
    /// Removes the cgroup; whether it is gone (a cgroup that still holds a
    /// process cannot be removed, and is logged).
    pub(super) fn remove(mut self) -> bool {
        self.remove_dirs()
    }

    fn remove_dirs(&mut self) -> bool {
        self.procs.clear();
        let mut gone = true;
        for dir in std::mem::take(&mut self.dirs) {
            if let Err(e) = std::fs::remove_dir(&dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    gone = false;
                    tracing::warn!(cgroup = %dir.display(), "cannot remove a VMM's cgroup: {e}");
                }
            }
        }
        gone
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        self.remove_dirs();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_mounts_and_own_paths_are_read_from_proc() {
        let mountinfo = "\
29 23 0:26 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs rw,mode=755
33 29 0:30 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
34 29 0:31 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
40 29 0:37 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        let mounts = parse_mounts(mountinfo);
        assert_eq!(mounts.len(), 3);
        assert_eq!(mounts[0].0, Path::new("/sys/fs/cgroup/memory"));
        assert_eq!(mounts[1].1, "cgroup,rw,cpu,cpuacct");
        assert_eq!(mounts[2].1, "cgroup2");
        let own = "4:memory:/a/b\n1:cpu,cpuacct:/\n0::/user.slice\n";
        assert_eq!(own_path(own, Some("memory")), Some("/a/b"));
        assert_eq!(own_path(own, Some("cpu")), Some("/"));
        assert_eq!(own_path(own, None), Some("/user.slice"));
        assert_eq!(own_path(own, Some("pids")), None);
    }
}
