//! A gateway's exclusive hold on its `state_dir`.
//!
//! `<state_dir>/gateway.lock` carries an exclusive `flock(2)` for the
//! gateway's whole life and holds its pid. A second gateway on the same
//! `state_dir` finds the lock taken and stops before it touches anything
//! (no clean-up of "stale" VMMs that are the first one's, no taps, no
//! snapshots). The kernel drops the lock when the holder dies, so a crash
//! never leaves it stuck.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// Held while the gateway runs; dropping it releases `state_dir`.
#[derive(Debug)]
pub struct StateLock {
    _lock: Flock<File>,
}

/// Why `state_dir` cannot be taken.
#[derive(Debug, thiserror::Error)]
pub enum StateLockError {
    /// Another gateway holds it.
    #[error("state_dir {} is in use by another gateway (pid {holder}): it holds the lock {}", .state_dir.display(), .lock.display())]
    Held {
        /// The state directory.
        state_dir: PathBuf,
        /// The lock file.
        lock: PathBuf,
        /// The holder's pid, as it wrote it (`unknown` if unreadable).
        holder: String,
    },
    /// `state_dir` cannot be created (it is a file, or not writable).
    #[error("state_dir {}: cannot create it", .state_dir.display())]
    StateDir {
        /// The state directory.
        state_dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The lock file cannot be opened or written.
    #[error("cannot use the lock {}", .lock.display())]
    Io {
        /// The lock file.
        lock: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Takes `<state_dir>/gateway.lock` (module doc), creating `state_dir` if
/// needed, and writes this process's pid into it.
pub fn lock(state_dir: &Path) -> Result<StateLock, StateLockError> {
    let path = state_dir.join("gateway.lock");
    let io = |source| StateLockError::Io {
        lock: path.clone(),
        source,
    };
    std::fs::create_dir_all(state_dir).map_err(|source| StateLockError::StateDir {
        state_dir: state_dir.to_owned(),
        source,
    })?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io)?;
    let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((_, errno)) if errno != nix::errno::Errno::EWOULDBLOCK => {
            return Err(io(std::io::Error::from(errno)));
        }
        Err((mut file, _)) => {
            // The holder writes its pid right after it locks: read again a
            // few times if it is not there yet.
            let mut holder = String::new();
            for _ in 0..10 {
                holder.clear();
                let _ = file
                    .rewind()
                    .and_then(|()| file.read_to_string(&mut holder));
                if !holder.trim().is_empty() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            let holder = holder.trim();
            return Err(StateLockError::Held {
                state_dir: state_dir.to_owned(),
                lock: path.clone(),
                holder: if holder.is_empty() { "unknown" } else { holder }.to_owned(),
            });
        }
    };
    lock.set_len(0).map_err(io)?;
    lock.rewind().map_err(io)?;
    writeln!(lock, "{}", std::process::id()).map_err(io)?;
    Ok(StateLock { _lock: lock })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock(dir.path()).unwrap();
        let err = lock(dir.path()).unwrap_err().to_string();
        let pid = std::process::id().to_string();
        assert!(err.contains(&format!("(pid {pid})")), "{err}");
        assert!(err.contains("gateway.lock"), "{err}");
        drop(first);
        lock(dir.path()).unwrap();
    }
}
