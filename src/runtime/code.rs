//! An app's code as a read-only disk image.
//!
//! A code source is a directory or a ready ext4 image file. A directory is
//! packed with `mke2fs -d` (e2fsprogs: no root, no loop mounts) into
//! `<cache>/<hash>.img`, where `<hash>` covers every entry's relative path,
//! type, permission bits and content (or link target): the same code always
//! maps to the same image, and a change gives a new one. Before hashing,
//! [`CodeSource::current`] compares a cheap fingerprint of the tree (paths,
//! sizes, modification times, modes) with the last one, so an unchanged
//! tree costs one walk of `stat` calls, not a read of every file.
//!
//! One call at a time packs (a lock per source): concurrent starts of one
//! app wait for the image rather than build it twice. Images are written
//! under a temporary name unique to the writer and renamed, so a crash never
//! leaves a half image under a final name, and another process packing the
//! same code ends with the same complete file. The newest [`KEEP`] images of
//! an app (by packing time) are kept, and any image a gateway pins
//! ([`crate::snapshot::pin`]): a per-app snapshot's clones open their image
//! at every restore; a runtime clone has its own copy in its extra disk.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use sha2::{Digest, Sha256};

/// Images kept per app.
pub const KEEP: usize = 3;

/// A packed (or ready) code image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CodeImage {
    /// The image file.
    pub path: PathBuf,
    /// Hex SHA-256 of the source (first 16 digits name the image).
    pub hash: String,
    /// Size of the image file in bytes.
    pub bytes: u64,
}

/// Why code could not be packed.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum CodeError {
    /// Reading the source failed.
    #[error("code of app {app}: cannot read {}", .path.display())]
    Read {
        app: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The source holds something an image cannot carry.
    #[error("code of app {app}: {}: {problem}", .path.display())]
    Unsupported {
        app: String,
        path: PathBuf,
        problem: String,
    },
    /// The image would not fit the runtime's code disk.
    #[error(
        "code of app {app} needs a {need_mib} MiB image; the runtime's code_disk_mib is {max_mib}"
    )]
    TooLarge {
        app: String,
        need_mib: u64,
        max_mib: u32,
    },
    /// `mke2fs` could not be started.
    #[error("code of app {app}: cannot run mke2fs (install e2fsprogs)")]
    MkfsMissing {
        app: String,
        #[source]
        source: std::io::Error,
    },
    /// `mke2fs` failed; `output` is its stderr.
    #[error("code of app {app}: mke2fs failed ({status}): {output}")]
    Mkfs {
        app: String,
        status: std::process::ExitStatus,
        output: String,
    },
    /// Writing the image failed.
    #[error("code of app {app}: cannot write {}", .path.display())]
    Write {
        app: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One app's code source and its image cache.
#[derive(Debug)]
pub struct CodeSource {
    app: String,
    source: PathBuf,
    cache: PathBuf,
    max_mib: u32,
    /// The last image and the fingerprint of the source it was made from.
    /// Held for the whole of [`CodeSource::current`]: one packer at a time.
    last: Mutex<Option<(u64, CodeImage)>>,
}

struct Entry {
    rel: String,
    meta: std::fs::Metadata,
}

impl CodeSource {
    /// The code of `app` at `source`, packed into `cache`, at most
    /// `max_mib` MiB.
    pub fn new(app: &str, source: &Path, cache: &Path, max_mib: u32) -> CodeSource {
        CodeSource {
            app: app.to_owned(),
            source: source.to_owned(),
            cache: cache.to_owned(),
            max_mib,
            last: Mutex::new(None),
        }
    }

    /// The code of runtime app `app`, configured as `cfg`, packed into the
    /// config's code cache within its runtime's code disk.
    pub fn for_app(
        config: &crate::config::Config,
        app: &str,
        cfg: &crate::config::RuntimeAppConfig,
    ) -> CodeSource {
        let max_mib = config.runtimes[&cfg.name].code_disk_mib;
        CodeSource::new(app, &cfg.code, &config.code_cache(app), max_mib)
    }

    /// The image of the code as it is now, packing it if it changed.
    /// Blocking (file reads, `mke2fs`): call it off the async workers.
    pub fn current(&self) -> Result<CodeImage, CodeError> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let meta = std::fs::metadata(&self.source).map_err(|e| self.read_err(&self.source, e))?;
        let entries = if meta.is_file() {
            vec![Entry {
                rel: String::new(),
                meta,
            }]
        } else {
            self.walk()?
        };
        let fingerprint = fingerprint(&entries);
        if let Some((fp, image)) = &*last {
            if *fp == fingerprint && image.path.exists() {
                return Ok(image.clone());
            }
        }
        let image = if entries.len() == 1 && entries[0].rel.is_empty() {
            self.ready_image(entries[0].meta.len())?
        } else {
            let hash = self.hash(&entries)?;
            let path = self.cache.join(format!("{}.img", &hash[..16]));
            match std::fs::metadata(&path) {
                // Used again: left as it is. A per-app snapshot records its
                // image's modification time, so touching it would make the
                // snapshot stale at every start; an image a gateway uses is
                // pinned, not kept by recency.
                Ok(m) => CodeImage {
                    path,
                    hash,
                    bytes: m.len(),
                },
                Err(_) => self.pack(&entries, hash, path)?,
            }
        };
        *last = Some((fingerprint, image.clone()));
        Ok(image)
    }

    fn read_err(&self, path: &Path, source: std::io::Error) -> CodeError {
        CodeError::Read {
            app: self.app.clone(),
            path: path.to_owned(),
            source,
        }
    }

    /// A ready image file: used where it is, hashed for the record.
    fn ready_image(&self, bytes: u64) -> Result<CodeImage, CodeError> {
        let need_mib = bytes.div_ceil(1 << 20);
        if need_mib > u64::from(self.max_mib) {
            return Err(CodeError::TooLarge {
                app: self.app.clone(),
                need_mib,
                max_mib: self.max_mib,
            });
        }
        let mut hasher = Sha256::new();
        let mut file =
            std::fs::File::open(&self.source).map_err(|e| self.read_err(&self.source, e))?;
        std::io::copy(&mut file, &mut hasher).map_err(|e| self.read_err(&self.source, e))?;
        Ok(CodeImage {
            path: self.source.clone(),
            hash: hex(&hasher.finalize()),
            bytes,
        })
    }

    /// Every entry under the source, sorted by path.
    fn walk(&self) -> Result<Vec<Entry>, CodeError> {
        let mut out = Vec::new();
        for entry in walkdir::WalkDir::new(&self.source)
            .min_depth(1)
            .sort_by_file_name()
        {
            let entry = entry.map_err(|e| {
                let path = e.path().unwrap_or(&self.source).to_owned();
                self.read_err(&path, e.into())
            })?;
            let meta = entry
                .path()
                .symlink_metadata()
                .map_err(|e| self.read_err(entry.path(), e))?;
            let t = meta.file_type();
            if !(t.is_file() || t.is_dir() || t.is_symlink()) {
                return Err(CodeError::Unsupported {
                    app: self.app.clone(),
                    path: entry.path().to_owned(),
                    problem: "only files, directories and symlinks can go on a code disk".into(),
                });
            }
            let rel = entry
                .path()
                .strip_prefix(&self.source)
                .expect("walkdir stays under its root")
                .to_string_lossy()
                .into_owned();
            out.push(Entry { rel, meta });
        }
        Ok(out)
    }

    fn hash(&self, entries: &[Entry]) -> Result<String, CodeError> {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        for e in entries {
            let t = e.meta.file_type();
            let kind = if t.is_dir() {
                'd'
            } else if t.is_symlink() {
                'l'
            } else {
                'f'
            };
            h.update(format!(
                "{kind} {:o} {}\0",
                e.meta.permissions().mode() & 0o7777,
                e.rel
            ));
            let path = self.source.join(&e.rel);
            if t.is_symlink() {
                let target = std::fs::read_link(&path).map_err(|err| self.read_err(&path, err))?;
                h.update(target.as_os_str().as_encoded_bytes());
            } else if t.is_file() {
                let mut f = std::fs::File::open(&path).map_err(|err| self.read_err(&path, err))?;
                h.update(e.meta.len().to_le_bytes());
                loop {
                    let n = f.read(&mut buf).map_err(|err| self.read_err(&path, err))?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                }
            }
            h.update(b"\n");
        }
        Ok(hex(&h.finalize()))
    }

    fn pack(&self, entries: &[Entry], hash: String, path: PathBuf) -> Result<CodeImage, CodeError> {
        let write_err = |p: &Path, source| CodeError::Write {
            app: self.app.clone(),
            path: p.to_owned(),
            source,
        };
        // ext4 with 4 KiB blocks: each file's data rounded up to a block,
        // an inode (256 B) per entry, metadata and slack; at least 2 MiB.
        let data: u64 = entries
            .iter()
            .map(|e| e.meta.len().div_ceil(4096) * 4096 + 4096)
            .sum();
        let need_mib = (data + data / 4).div_ceil(1 << 20) + 2;
        if need_mib > u64::from(self.max_mib) {
            return Err(CodeError::TooLarge {
                app: self.app.clone(),
                need_mib,
                max_mib: self.max_mib,
            });
        }
        std::fs::create_dir_all(&self.cache).map_err(|e| write_err(&self.cache, e))?;
        // Unique to this writer; removed if packing fails.
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".{}.", &hash[..16]))
            .suffix(".tmp")
            .tempfile_in(&self.cache)
            .map_err(|e| write_err(&self.cache, e))?
            .into_temp_path();
        let inodes = (entries.len() as u64 + 64).to_string();
        let out = Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-O", "^has_journal", "-L", "code"])
            .args([
                "-m",
                "0",
                "-b",
                "4096",
                "-N",
                &inodes,
                "-E",
                "root_owner=0:0",
            ])
            .arg("-d")
            .arg(&self.source)
            .arg(&tmp)
            .arg(format!("{need_mib}M"))
            .output()
            .map_err(|source| CodeError::MkfsMissing {
                app: self.app.clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(CodeError::Mkfs {
                app: self.app.clone(),
                status: out.status,
                output: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        // Readable by the VMMs' own users (`vmm.jail.user`), whatever the
        // gateway's umask: only the jails of this app's VMs hold it.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644))
                .map_err(|e| write_err(&path, e))?;
        }
        tmp.persist(&path).map_err(|e| write_err(&path, e.error))?;
        prune(&self.cache, KEEP);
        let bytes = std::fs::metadata(&path)
            .map_err(|e| write_err(&path, e))?
            .len();
        Ok(CodeImage { path, hash, bytes })
    }
}

/// Removes all but the newest `keep` images in `cache`, skipping those a
/// process pins ([`crate::snapshot::pin`]).
fn prune(cache: &Path, keep: usize) {
    let mut images: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(cache)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".img"))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    images.sort();
    let old = images.len().saturating_sub(keep);
    for (_, path) in images.into_iter().take(old) {
        // A per-app snapshot a gateway serves opens its image at every
        // restore: the gateway pins it.
        crate::snapshot::pin::unless_pinned(&path, || std::fs::remove_file(&path).is_ok());
    }
}

fn fingerprint(entries: &[Entry]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for e in entries {
        (
            &e.rel,
            e.meta.len(),
            e.meta.mtime(),
            e.meta.mtime_nsec(),
            e.meta.mode(),
        )
            .hash(&mut h);
    }
    h.finish()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn debugfs_cat(image: &Path, file: &str) -> String {
        let out = Command::new("debugfs")
            .args(["-R", &format!("cat /{file}")])
            .arg(image)
            .output()
            .expect("debugfs (e2fsprogs)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn same_code_same_image_and_a_change_makes_a_new_one() {
        let src = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("server.js"), "console.log(1)\n").unwrap();
        std::fs::create_dir(src.path().join("lib")).unwrap();
        std::fs::write(src.path().join("lib/a.js"), "module.exports = 2\n").unwrap();
        let code = CodeSource::new("a", src.path(), cache.path(), 64);
        let first = code.current().unwrap();
        assert!(first.path.starts_with(cache.path()));
        assert_eq!(debugfs_cat(&first.path, "lib/a.js"), "module.exports = 2\n");
        // Unchanged: the same image, not packed again.
        let mtime = std::fs::metadata(&first.path).unwrap().modified().unwrap();
        let again = code.current().unwrap();
        assert_eq!(again, first);
        assert_eq!(
            std::fs::metadata(&again.path).unwrap().modified().unwrap(),
            mtime
        );
        // A fresh source object over the same tree (a restarted gateway)
        // finds the cached image and leaves it as it is: a per-app
        // snapshot records its image's modification time.
        let other = CodeSource::new("a", src.path(), cache.path(), 64);
        assert_eq!(other.current().unwrap().path, first.path);
        assert_eq!(
            std::fs::metadata(&first.path).unwrap().modified().unwrap(),
            mtime
        );
        // Changed content: a new hash and a new image with the new content.
        std::fs::write(src.path().join("lib/a.js"), "module.exports = 3\n").unwrap();
        let changed = code.current().unwrap();
        assert_ne!(changed.hash, first.hash);
        assert_ne!(changed.path, first.path);
        assert_eq!(
            debugfs_cat(&changed.path, "lib/a.js"),
            "module.exports = 3\n"
        );
    }

    #[test]
    fn concurrent_starts_get_one_complete_image() {
        let src = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        for i in 0..50 {
            std::fs::write(src.path().join(format!("m{i}.js")), format!("// {i}\n")).unwrap();
        }
        let code = std::sync::Arc::new(CodeSource::new("c", src.path(), cache.path(), 64));
        let images: Vec<CodeImage> = (0..4)
            .map(|_| {
                let code = code.clone();
                std::thread::spawn(move || code.current().unwrap())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        assert!(images.iter().all(|i| *i == images[0]), "{images:?}");
        assert_eq!(debugfs_cat(&images[0].path, "m49.js"), "// 49\n");
        // Only the image: no temporary file left behind.
        let names: Vec<_> = std::fs::read_dir(cache.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn too_large_and_unsupported_sources_are_named() {
        let src = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let big = std::fs::File::create(src.path().join("big.bin")).unwrap();
        big.set_len(3 << 20).unwrap();
        let err = CodeSource::new("big", src.path(), cache.path(), 2)
            .current()
            .unwrap_err();
        assert!(
            matches!(err, CodeError::TooLarge { max_mib: 2, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("code_disk_mib is 2"), "{err}");

        let fifo = tempfile::tempdir().unwrap();
        nix::unistd::mkfifo(&fifo.path().join("pipe"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let err = CodeSource::new("f", fifo.path(), cache.path(), 64)
            .current()
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("only files, directories and symlinks"),
            "{err}"
        );
    }

    #[test]
    fn a_ready_image_file_is_used_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("app.img");
        std::fs::write(&img, b"not really ext4").unwrap();
        let image = CodeSource::new("r", &img, dir.path(), 64)
            .current()
            .unwrap();
        assert_eq!(image.path, img);
        assert_eq!(image.bytes, 15);
        assert_eq!(image.hash.len(), 64);
    }
}
