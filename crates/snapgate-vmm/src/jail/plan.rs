//! The steps a forked child takes to enter its jail (module doc of
//! [`super`], step 3), prepared in the gateway so that the child only makes
//! system calls: after fork in a multi-threaded process, only
//! async-signal-safe calls are sound, and allocation is not one.

#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use nix::sys::stat::Mode;
use nix::unistd::{Gid, Uid};

use super::{cstr, Access, JailError};

/// What [`Plan::new`] is built from.
pub(super) struct Spec<'a> {
    /// Where the new root is mounted; `None`: no mount namespace.
    pub root: Option<&'a Path>,
    /// Host paths shown at the same path in the root.
    pub paths: &'a [(PathBuf, Access)],
    /// Top-level symlinks to recreate in the root.
    pub symlinks: &'a [(PathBuf, PathBuf)],
    /// The VMM's working directory.
    pub cwd: &'a Path,
    /// uid and gid to switch to.
    pub ids: Option<(u32, u32)>,
    /// Supplementary groups to keep.
    pub groups: &'a [u32],
    /// `cgroup.procs` files to join.
    pub procs: &'a [&'a OwnedFd],
}

#[derive(Debug)]
enum Op {
    Mkdir(CString),
    Touch(CString),
    Bind {
        src: CString,
        dst: CString,
        recursive: bool,
        remount: MsFlags,
    },
    Symlink {
        target: CString,
        link: CString,
    },
    Proc(CString),
}

/// A prepared jail entry: run by the forked child with [`Plan::enter`].
/// The `cgroup.procs` fds it names belong to the [`super::Confinement`] it
/// came from, which must outlive the spawn.
#[derive(Debug)]
pub struct Plan {
    procs: Vec<RawFd>,
    root: Option<CString>,
    ops: Vec<Op>,
    cwd: CString,
    ids: Option<(u32, u32)>,
    groups: Vec<Gid>,
}

impl Plan {
    pub(super) fn new(spec: Spec<'_>) -> Result<Plan, JailError> {
        let mut ops = Vec::new();
        if let Some(root) = spec.root {
            let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
            let mut made: Vec<PathBuf> = Vec::new();
            let mut mkdirs = |p: &Path, ops: &mut Vec<Op>| {
                let mut chain: Vec<&Path> = p.ancestors().skip(1).collect();
                chain.reverse();
                for dir in chain {
                    if dir == Path::new("/") || made.iter().any(|m| m == dir) {
                        continue;
                    }
                    made.push(dir.to_owned());
                    ops.push(Op::Mkdir(cstr(&inside(dir))));
                }
            };
            for (path, access) in spec.paths {
                let meta = std::fs::metadata(path).map_err(|source| JailError::Io {
                    what: "look at",
                    path: path.clone(),
                    source,
                })?;
                mkdirs(path, &mut ops);
                let dst = cstr(&inside(path));
                if meta.is_dir() {
                    ops.push(Op::Mkdir(dst.clone()));
                } else {
                    ops.push(Op::Touch(dst.clone()));
                }
                let (recursive, remount) = match access {
                    Access::ReadOnly => (
                        true,
                        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                    ),
                    Access::ReadWrite => (false, MsFlags::MS_NOSUID | MsFlags::MS_NODEV),
                    Access::Device => (false, MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC),
                };
                ops.push(Op::Bind {
                    src: cstr(path),
                    dst,
                    recursive,
                    remount,
                });
            }
            for (link, target) in spec.symlinks {
                ops.push(Op::Symlink {
                    target: cstr(target),
                    link: cstr(&inside(link)),
                });
            }
            let proc = inside(Path::new("/proc"));
            ops.push(Op::Mkdir(cstr(&proc)));
            ops.push(Op::Proc(cstr(&proc)));
        }
        Ok(Plan {
            procs: spec.procs.iter().map(|fd| fd.as_raw_fd()).collect(),
            root: spec.root.map(cstr),
            ops,
            cwd: cstr(spec.cwd),
            ids: spec.ids,
            groups: spec.groups.iter().map(|&g| Gid::from_raw(g)).collect(),
        })
    }

    /// Enters the jail: to be called in the forked child before exec, and
    /// nowhere else. Allocates nothing; on failure writes which step failed
    /// to stderr (the VMM's log) and returns the OS error.
    pub fn enter(&self) -> std::io::Result<()> {
        for &fd in &self.procs {
            // SAFETY: writes one byte from a static buffer to an fd the
            // Confinement keeps open for the spawn.
            if unsafe { nix::libc::write(fd, b"0".as_ptr().cast(), 1) } != 1 {
                return Err(fail(b"joining the VMM's cgroup"));
            }
        }
        if let Some(root) = &self.root {
            self.build_root(root)?;
        }
        if let Some((uid, gid)) = self.ids {
            // What it creates in its run directory stays the gateway's
            // group's to read and write (the directory is set-group-ID).
            nix::sys::stat::umask(Mode::from_bits_truncate(0o007));
            nix::unistd::setgroups(&self.groups).map_err(|_| fail(b"setgroups"))?;
            let gid = Gid::from_raw(gid);
            nix::unistd::setresgid(gid, gid, gid).map_err(|_| fail(b"setresgid"))?;
            let uid = Uid::from_raw(uid);
            nix::unistd::setresuid(uid, uid, uid).map_err(|_| fail(b"setresuid"))?;
        }
        nix::sys::prctl::set_no_new_privs().map_err(|_| fail(b"no_new_privs"))?;
        Ok(())
    }

    fn build_root(&self, root: &CStr) -> std::io::Result<()> {
        const NONE: Option<&CStr> = None;
        // A network namespace of its own: the VMM reaches no address, not
        // even the host's loopback (its tap comes as an fd, its control
        // socket is a path); an IPC namespace: no SysV object outlives it.
        use nix::sched::CloneFlags;
        nix::sched::unshare(
            CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWIPC,
        )
        .map_err(|_| fail(b"unsharing the mount, network and IPC namespaces"))?;
        nix::mount::mount(
            NONE,
            c"/",
            NONE,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            NONE,
        )
        .map_err(|_| fail(b"making mounts private"))?;
        nix::mount::mount(
            Some(c"tmpfs"),
            root,
            Some(c"tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(c"mode=0755,size=1m"),
        )
        .map_err(|_| fail(b"mounting the root's tmpfs"))?;
        let dir_mode = Mode::from_bits_truncate(0o755);
        for op in &self.ops {
            match op {
                Op::Mkdir(path) => match nix::unistd::mkdir(path.as_c_str(), dir_mode) {
                    Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                    Err(_) => return Err(fail(b"creating a directory in the root")),
                },
                Op::Touch(path) => {
                    let fd = nix::fcntl::open(
                        path.as_c_str(),
                        nix::fcntl::OFlag::O_CREAT
                            | nix::fcntl::OFlag::O_WRONLY
                            | nix::fcntl::OFlag::O_CLOEXEC,
                        Mode::from_bits_truncate(0o644),
                    )
                    .map_err(|_| fail(b"creating a mount point in the root"))?;
                    let _ = nix::unistd::close(fd);
                }
                Op::Bind {
                    src,
                    dst,
                    recursive,
                    remount,
                } => {
                    let mut flags = MsFlags::MS_BIND;
                    if *recursive {
                        flags |= MsFlags::MS_REC;
                    }
                    nix::mount::mount(Some(src.as_c_str()), dst.as_c_str(), NONE, flags, NONE)
                        .map_err(|_| fail(b"binding a path into the root"))?;
                    nix::mount::mount(
                        NONE,
                        dst.as_c_str(),
                        NONE,
                        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | *remount,
                        NONE,
                    )
                    .map_err(|_| fail(b"remounting a bound path"))?;
                }
                Op::Symlink { target, link } => {
                    nix::unistd::symlinkat(target.as_c_str(), None, link.as_c_str())
                        .map_err(|_| fail(b"creating a symlink in the root"))?;
                }
                Op::Proc(path) => {
                    // Only the VMM's own processes (hidepid), and no
                    // /proc/sys and the like (subset=pid): proc(5).
                    nix::mount::mount(
                        Some(c"proc"),
                        path.as_c_str(),
                        Some(c"proc"),
                        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                        Some(c"hidepid=invisible,subset=pid"),
                    )
                    .map_err(|_| fail(b"mounting /proc in the root"))?;
                }
            }
        }
        nix::mount::mount(
            NONE,
            root,
            NONE,
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            NONE,
        )
        .map_err(|_| fail(b"making the root read-only"))?;
        nix::unistd::chdir(root).map_err(|_| fail(b"entering the root"))?;
        // pivot_root(2): "." onto itself, then the old root, stacked on
        // top, is detached: nothing of the host's tree stays reachable.
        nix::unistd::pivot_root(c".", c".").map_err(|_| fail(b"pivot_root"))?;
        nix::mount::umount2(c".", MntFlags::MNT_DETACH)
            .map_err(|_| fail(b"detaching the old root"))?;
        nix::unistd::chdir(self.cwd.as_c_str()).map_err(|_| fail(b"entering the run directory"))?;
        Ok(())
    }
}

/// The OS error of the call that just failed, after writing
/// `snapgate jail: <step> failed` to stderr. Allocates nothing.
fn fail(step: &[u8]) -> std::io::Error {
    let err = std::io::Error::last_os_error();
    for part in [b"snapgate jail: ".as_slice(), step, b" failed\n"] {
        // SAFETY: write(2) from a borrowed buffer to fd 2; the result is
        // irrelevant (the error is returned either way).
        unsafe {
            nix::libc::write(2, part.as_ptr().cast(), part.len());
        }
    }
    err
}
