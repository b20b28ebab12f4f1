//! Snapshots on disk: a directory of VMM files plus `manifest.json`.
//!
//! The manifest is written last, atomically (write to a temporary name, then
//! rename): a directory without one is an unfinished snapshot. It records
//! which VMM and mode made the snapshot, the resolved image spec and kernel
//! command line (a restore must recreate the template's devices exactly,
//! whatever the config says today), and the size of every file, so a missing
//! or truncated file is reported by name before any VMM is started.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::{ImageSpec, SnapshotMode, VmmError, VmmKind};
use crate::net::NetParams;

const MANIFEST: &str = "manifest.json";
/// The manifest format. 2: VMs on QEMU's `pc` machine have a `vmgenid`
/// device, so snapshots of format 1 lack a device their clones would have.
/// 3: the spec's extra disk and prepared step have their own names
/// (`extra_disk_mib`, `prepared`). Older formats are refused and, at
/// start-up, rebuilt.
const FORMAT: u32 = 3;

/// One file of a snapshot and its size when the snapshot was taken.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Name inside the snapshot directory.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
}

/// What `manifest.json` holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format version.
    pub format: u32,
    /// The VMM that took the snapshot.
    pub vmm: VmmKind,
    /// How guest memory is stored.
    pub mode: SnapshotMode,
    /// Accelerator the template ran under (`kvm` or `tcg`); a restore uses the
    /// same.
    pub accel: String,
    /// The image spec the template booted from.
    pub spec: ImageSpec,
    /// The kernel command line, placeholders filled in.
    pub cmdline: String,
    /// Files, with sizes.
    pub files: Vec<FileEntry>,
    /// Seconds since the Unix epoch when the snapshot was completed.
    pub created_unix: u64,
    /// Size and modification time of each image file when the template
    /// booted: a rebuilt kernel or disk makes the snapshot stale.
    #[serde(default)]
    pub image_files: Vec<FileStamp>,
    /// The guest's network as the snapshot froze it (addresses, MACs): a
    /// clone keeps it, so a changed `network` setting makes the snapshot
    /// stale.
    #[serde(default)]
    pub guest_net: String,
}

/// Where a snapshot comes from: what [`Snapshot::write`] records.
#[derive(Clone, Copy, Debug)]
pub struct Origin<'a> {
    /// The VMM that took it.
    pub vmm: VmmKind,
    /// How memory is stored.
    pub mode: SnapshotMode,
    /// `kvm` or `tcg`.
    pub accel: &'a str,
    /// The template's image spec.
    pub spec: &'a ImageSpec,
    /// Its rendered kernel command line.
    pub cmdline: &'a str,
    /// The tap addressing it booted with.
    pub net: &'a NetParams,
}

/// The parts of `net` a guest keeps in a snapshot.
pub fn guest_net(net: &NetParams) -> String {
    format!(
        "{}/{} via {} guest-mac {} host-mac {}",
        net.guest_ip, net.prefix_len, net.host_ip, net.guest_mac, net.host_mac
    )
}

/// An image file as it was when a template booted from it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    /// The path, as the spec names it.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: u128,
}

/// Stamps of the kernel, initramfs and disks of `spec` (missing files are
/// stamped as size 0).
pub fn image_files(spec: &ImageSpec) -> Vec<FileStamp> {
    let mut paths = vec![spec.kernel.clone()];
    paths.extend(spec.initramfs.clone());
    paths.extend(spec.disks.iter().map(|d| d.path.clone()));
    paths
        .into_iter()
        .map(|path| {
            let meta = std::fs::metadata(&path).ok();
            FileStamp {
                size: meta.as_ref().map_or(0, |m| m.len()),
                mtime_ns: meta
                    .and_then(|m| m.modified().ok())
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos()),
                path,
            }
        })
        .collect()
}

/// A file's name and its sealed in-memory copy ([`Snapshot::sealed`]).
type Sealed = (String, Arc<OwnedFd>);

/// A snapshot whose manifest was read and whose files were checked.
#[derive(Clone, Debug)]
pub struct Snapshot {
    dir: PathBuf,
    manifest: Manifest,
    /// Sealed in-memory copies of its files ([`Snapshot::sealed`]), shared
    /// by every clone of this value.
    sealed: Arc<Mutex<Vec<Sealed>>>,
}

impl Snapshot {
    /// Reads `dir/manifest.json` and checks that every recorded file exists
    /// with its recorded size.
    pub fn open(dir: &Path) -> Result<Snapshot, VmmError> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|e| VmmError::SnapshotFile {
            path: path.clone(),
            problem: format!("cannot read ({e}); is this a finished snapshot?"),
        })?;
        let manifest: Manifest =
            serde_json::from_str(&text).map_err(|e| VmmError::SnapshotFile {
                path: path.clone(),
                problem: format!("not a snapshot manifest: {e}"),
            })?;
        if manifest.format != FORMAT {
            return Err(VmmError::SnapshotFile {
                path,
                problem: format!(
                    "format {} is not the supported format {FORMAT}",
                    manifest.format
                ),
            });
        }
        let snapshot = Snapshot {
            dir: dir.to_owned(),
            manifest,
            sealed: Arc::default(),
        };
        snapshot.verify()?;
        Ok(snapshot)
    }

    /// Checks every file against the manifest again (cheap: one stat each).
    pub fn verify(&self) -> Result<(), VmmError> {
        for f in &self.manifest.files {
            let path = self.dir.join(&f.name);
            let meta = std::fs::metadata(&path).map_err(|e| VmmError::SnapshotFile {
                path: path.clone(),
                problem: format!("missing ({e})"),
            })?;
            if meta.len() != f.size {
                return Err(VmmError::SnapshotFile {
                    path,
                    problem: format!(
                        "truncated or changed: {} bytes, the manifest recorded {}",
                        meta.len(),
                        f.size
                    ),
                });
            }
        }
        Ok(())
    }

    /// Records `files` (which must exist in `dir`) and writes the manifest.
    pub fn write(dir: &Path, origin: Origin<'_>, files: &[&str]) -> Result<Snapshot, VmmError> {
        let mut entries = Vec::new();
        for name in files {
            let path = dir.join(name);
            let size = std::fs::metadata(&path)
                .map_err(|e| VmmError::SnapshotFile {
                    path: path.clone(),
                    problem: format!("the VMM did not write it ({e})"),
                })?
                .len();
            entries.push(FileEntry {
                name: (*name).to_owned(),
                size,
            });
        }
        let manifest = Manifest {
            format: FORMAT,
            vmm: origin.vmm,
            mode: origin.mode,
            accel: origin.accel.to_owned(),
            spec: origin.spec.clone(),
            cmdline: origin.cmdline.to_owned(),
            files: entries,
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            image_files: image_files(origin.spec),
            guest_net: guest_net(origin.net),
        };
        let tmp = dir.join(format!("{MANIFEST}.tmp"));
        let text = serde_json::to_string_pretty(&manifest).expect("manifest serializes");
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, dir.join(MANIFEST)))
            .map_err(|source| VmmError::Io {
                what: "cannot write manifest in",
                path: dir.to_owned(),
                source,
            })?;
        Ok(Snapshot {
            dir: dir.to_owned(),
            manifest,
            sealed: Arc::default(),
        })
    }

    /// Whether this snapshot was taken by `vmm` under `accel` from `spec`,
    /// as its files are now, with the guest network of `net`.
    pub fn is_current_for(
        &self,
        vmm: VmmKind,
        accel: &str,
        spec: &ImageSpec,
        net: &NetParams,
    ) -> bool {
        let m = &self.manifest;
        m.vmm == vmm
            && m.accel == accel
            && m.spec == *spec
            && m.image_files == image_files(spec)
            && m.guest_net == guest_net(net)
    }

    /// The snapshot directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A file of the snapshot.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// A sealed copy of file `name` in memory (memfd_create(2) with
    /// `F_SEAL_WRITE`, `F_SEAL_SHRINK`, `F_SEAL_GROW` and `F_SEAL_SEAL`;
    /// fcntl(2), "File seals"), made on the first call and shared after.
    /// Anyone may open it read-write (through `/proc/self/fd/<n>`), map it
    /// privately and write to the private copy, but no one can change its
    /// contents: what lets a jailed VMM that insists on opening its memory
    /// file read-write (QEMU before 8.2 has no `rom=off`) map the snapshot's
    /// memory copy-on-write without being able to change it for the other
    /// clones. Holes stay holes. The memfd is named after the file's path.
    /// Blocking: one copy of the file's data.
    pub fn sealed(&self, name: &str) -> Result<Arc<OwnedFd>, VmmError> {
        let mut sealed = self.sealed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, fd)) = sealed.iter().find(|(n, _)| n == name) {
            return Ok(fd.clone());
        }
        let path = self.file(name);
        let fd = shared_sealed_copy(&path).map_err(|source| VmmError::Io {
            what: "cannot make a sealed in-memory copy of",
            path,
            source,
        })?;
        sealed.push((name.to_owned(), fd.clone()));
        Ok(fd)
    }

    /// Total size of the snapshot's files in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.manifest.files.iter().map(|f| f.size).sum()
    }
}

/// The sealed copy of `path` that this process holds already (every
/// gateway of a process that opened the same snapshot file, by device,
/// inode, size and modification time), or a new one. One copy per file
/// per process, for as long as a snapshot value holds it.
fn shared_sealed_copy(path: &Path) -> std::io::Result<Arc<OwnedFd>> {
    use std::os::unix::fs::MetadataExt;
    type Key = (u64, u64, u64, i64, i64);
    static COPIES: Mutex<Vec<(Key, std::sync::Weak<OwnedFd>)>> = Mutex::new(Vec::new());
    let meta = std::fs::symlink_metadata(path)?;
    let key = (
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
    );
    // Held while copying: a second restore of the same file waits for the
    // first copy rather than making its own.
    let mut copies = COPIES.lock().unwrap_or_else(|p| p.into_inner());
    copies.retain(|(_, weak)| weak.strong_count() > 0);
    if let Some(fd) = copies
        .iter()
        .find(|(k, _)| *k == key)
        .and_then(|(_, weak)| weak.upgrade())
    {
        return Ok(fd);
    }
    let fd = Arc::new(sealed_copy(path)?);
    copies.push((key, Arc::downgrade(&fd)));
    Ok(fd)
}

/// A sealed memfd holding the data of `path` (see [`Snapshot::sealed`]).
fn sealed_copy(path: &Path) -> std::io::Result<OwnedFd> {
    use rustix::fs::{MemfdFlags, SealFlags, SeekFrom};
    use std::os::unix::fs::FileExt;

    let file = crate::process::open_vm_file(path, false)?;
    let len = file.metadata()?.len();
    // Named after the file, so `/proc/<pid>/fd` of a VMM says which
    // snapshot it maps (`/memfd:<path> (deleted)`); memfd_create(2) takes
    // at most 249 bytes: the end of a longer path, which names the
    // snapshot.
    let name = path.as_os_str().as_encoded_bytes();
    let name = &name[name.len().saturating_sub(249)..];
    let name = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
    let memfd = rustix::fs::memfd_create(&name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    rustix::fs::ftruncate(&memfd, len)?;
    let out = std::fs::File::from(memfd);
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < len {
        // Only the data extents: holes read as zeros and stay unallocated.
        let start = match rustix::fs::seek(&file, SeekFrom::Data(at)) {
            Ok(start) => start,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let end = rustix::fs::seek(&file, SeekFrom::Hole(start))?.min(len);
        let mut pos = start;
        while pos < end {
            let want = ((end - pos) as usize).min(buf.len());
            let n = file.read_at(&mut buf[..want], pos)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            out.write_all_at(&buf[..n], pos)?;
            pos += n as u64;
        }
        at = end;
    }
    rustix::fs::fcntl_add_seals(
        &out,
        SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL,
    )?;
    Ok(OwnedFd::from(out))
}

/// Makes `path`, a file a jailed VMM wrote and the gateway moved into a
/// snapshot, the gateway's: opened as a plain file of its own (never
/// through a link the VMM put in its place: `process::open_vm_file`), then
/// given to the gateway's uid and group with permissions `mode`. A later
/// VMM given the writer's uid cannot change it.
pub fn take_ownership(path: &Path, mode: u32) -> Result<(), VmmError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::PermissionsExt;
    let err = |source: std::io::Error| VmmError::SnapshotFile {
        path: path.to_owned(),
        problem: format!("the VMM left no plain file here: {source}"),
    };
    let file = crate::process::open_vm_file(path, false).map_err(err)?;
    nix::unistd::fchown(
        file.as_raw_fd(),
        Some(nix::unistd::geteuid()),
        Some(nix::unistd::getegid()),
    )
    .map_err(|e| err(e.into()))?;
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(err)
}

/// Creates the directory a new snapshot goes into; it must not exist yet, so
/// a snapshot is never written over one that clones may be using.
pub fn create_dest(dest: &Path) -> Result<(), VmmError> {
    if dest.exists() {
        return Err(VmmError::SnapshotFile {
            path: dest.to_owned(),
            problem: "already exists; remove it or choose another destination".into(),
        });
    }
    std::fs::create_dir_all(dest).map_err(|source| VmmError::Io {
        what: "cannot create snapshot directory",
        path: dest.to_owned(),
        source,
    })
}

/// Moves `from` to `to`, copying when they are on different filesystems.
pub fn move_file(from: &Path, to: &Path) -> Result<(), VmmError> {
    let io = |source| VmmError::Io {
        what: "cannot move into the snapshot",
        path: from.to_owned(),
        source,
    };
    match std::fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(nix::libc::EXDEV) => {
            std::fs::copy(from, to).map_err(io)?;
            std::fs::remove_file(from).map_err(io)
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ImageSpec {
        serde_yaml_ng::from_str("kernel: /k\ncmdline: x\n").unwrap()
    }

    #[test]
    fn missing_truncated_and_unfinished_snapshots_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert!(Snapshot::open(d)
            .unwrap_err()
            .to_string()
            .contains("manifest.json"));
        std::fs::write(d.join("state"), vec![0u8; 100]).unwrap();
        std::fs::write(d.join("memory"), vec![0u8; 4096]).unwrap();
        let net = NetParams::default();
        let origin = Origin {
            vmm: VmmKind::Qemu,
            mode: SnapshotMode::Template,
            accel: "tcg",
            spec: &spec(),
            cmdline: "x",
            net: &net,
        };
        let s = Snapshot::write(d, origin, &["state", "memory"]).unwrap();
        assert!(s.is_current_for(VmmKind::Qemu, "tcg", &spec(), &net));
        assert!(
            !s.is_current_for(VmmKind::Qemu, "kvm", &spec(), &net),
            "accelerator changed"
        );
        let moved = NetParams {
            guest_ip: "169.254.100.3".parse().unwrap(),
            ..NetParams::default()
        };
        assert!(
            !s.is_current_for(VmmKind::Qemu, "tcg", &spec(), &moved),
            "guest address changed"
        );
        assert_eq!(s.size_bytes(), 4196);
        assert!(Snapshot::open(d).is_ok());

        std::fs::write(d.join("memory"), vec![0u8; 10]).unwrap();
        let err = Snapshot::open(d).unwrap_err().to_string();
        assert!(err.contains("memory") && err.contains("truncated"), "{err}");

        std::fs::remove_file(d.join("state")).unwrap();
        let err = Snapshot::open(d).unwrap_err().to_string();
        assert!(err.contains("/state") && err.contains("missing"), "{err}");

        std::fs::write(d.join("manifest.json"), "{").unwrap();
        let err = Snapshot::open(d).unwrap_err().to_string();
        assert!(err.contains("not a snapshot manifest"), "{err}");
    }

    #[test]
    fn dest_must_not_exist() {
        let dir = tempfile::tempdir().unwrap();
        assert!(create_dest(dir.path())
            .unwrap_err()
            .to_string()
            .contains("already exists"));
        assert!(create_dest(&dir.path().join("new")).is_ok());
    }
}
