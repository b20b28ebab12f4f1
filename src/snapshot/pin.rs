//! Pins: a file that a running process uses, marked with a shared
//! `flock(2)` held as long as the process uses it. Pruning asks for an
//! exclusive lock without waiting and skips what it cannot lock, so a
//! snapshot or code image any gateway still restores from is never removed,
//! and a pin ends by itself when its process dies (the kernel drops flocks
//! with the last descriptor).

use std::fs::File;
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};

/// A pin on one file; dropping it unpins.
#[derive(Debug)]
pub struct Pin {
    _lock: Flock<File>,
}

/// Pins `path` for this process. Errors: the file cannot be opened, or is
/// being removed right now (a prune holds its exclusive lock).
pub fn pin(path: &Path) -> std::io::Result<Pin> {
    use std::os::unix::fs::MetadataExt;
    let file = File::open(path)?;
    let lock = Flock::lock(file, FlockArg::LockSharedNonblock).map_err(|(_, errno)| {
        std::io::Error::new(
            std::io::Error::from(errno).kind(),
            format!("pinning {}: {errno}", path.display()),
        )
    })?;
    // A prune may have removed the file between the open and the lock:
    // the pin holds only if `path` still names the file locked.
    let (locked, named) = (lock.metadata()?, std::fs::metadata(path)?);
    if (locked.dev(), locked.ino()) != (named.dev(), named.ino()) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("pinning {}: removed while it was pinned", path.display()),
        ));
    }
    Ok(Pin { _lock: lock })
}

/// Runs `remove` on `path` unless some process pins it; while `remove`
/// runs, `path` holds an exclusive lock, so no one pins it meanwhile.
/// Whether it ran (`false`: pinned, or `path` cannot be opened).
pub fn unless_pinned(path: &Path, remove: impl FnOnce() -> bool) -> bool {
    let Ok(file) = File::open(path) else {
        return false;
    };
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(_held) => remove(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pinned_file_is_not_removed_until_unpinned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "x").unwrap();
        let p = pin(&path).unwrap();
        let remove = || std::fs::remove_file(&path).is_ok();
        assert!(!unless_pinned(&path, remove));
        assert!(path.exists());
        drop(p);
        assert!(unless_pinned(&path, || std::fs::remove_file(&path).is_ok()));
        assert!(!path.exists());
    }
}
