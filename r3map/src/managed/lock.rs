//! The cache's exclusive lock: `<cache>.lock`, flock'ed (LOCK_EX|LOCK_NB)
//! before the state file is read or created, and held until the last task
//! that can touch the cache has ended. Two mounts writing one cache would
//! corrupt it silently (each believes its own chunk states); a second open,
//! in this process or another, fails with [`Error::Busy`] instead.
//!
//! A separate file rather than the state file itself: the state file is
//! created by rename, so there is nothing to lock before it exists. The
//! lock file is never removed; removing it would let two openers lock two
//! different inodes of the same name.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::{Error, Result};

/// Path of the lock file of a cache file.
pub fn lock_path(cache: &Path) -> PathBuf {
    let mut s = cache.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

/// A held lock on a cache; released when dropped (or when the process
/// dies: the kernel drops flocks with their last descriptor).
#[derive(Debug)]
pub struct CacheLock {
    _lock: Flock<File>,
}

impl CacheLock {
    /// Takes the lock of the cache at `cache`, without waiting. Blocking
    /// (opens a file): run it off the runtime.
    pub fn acquire(cache: &Path) -> Result<CacheLock> {
        let path = lock_path(cache);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::Io(e).context(format!("opening lock file {}", path.display())))?;
        // flock locks belong to the open file description: a second open of
        // the same file in this process conflicts just like another process.
        match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(l) => Ok(CacheLock { _lock: l }),
            Err((_, Errno::EWOULDBLOCK)) => Err(Error::Busy(format!(
                "cache {} is in use by another mount (its lock {} is held); \
                 stop that mount first",
                cache.display(),
                path.display()
            ))),
            Err((_, e)) => {
                Err(Error::Io(std::io::Error::from(e))
                    .context(format!("locking {}", path.display())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn second_lock_is_busy_until_the_first_is_dropped() {
        let d = tempfile::tempdir().unwrap();
        let cache = d.path().join("c");
        let a = CacheLock::acquire(&cache).unwrap();
        let e = CacheLock::acquire(&cache).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Busy, "{e}");
        assert!(e.to_string().contains(&cache.display().to_string()), "{e}");
        drop(a);
        CacheLock::acquire(&cache).unwrap();
    }
}
