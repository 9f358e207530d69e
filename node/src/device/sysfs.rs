//! What the kernel says about /dev/nbdN in sysfs: the backend identifier
//! given at CONNECT, the size, and the pid of the task that connected it.

use std::io;
use std::path::{Path, PathBuf};

/// /sys/block/nbdN (or the same layout under another root, for tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdSysfs {
    dir: PathBuf,
}

impl NbdSysfs {
    /// /sys/block/nbd`index`.
    pub fn new(index: u32) -> Self {
        Self::under(Path::new("/sys/block"), index)
    }

    /// `root`/nbd`index`, for tests against a fake tree.
    pub fn under(root: &Path, index: u32) -> Self {
        NbdSysfs {
            dir: root.join(format!("nbd{index}")),
        }
    }

    /// The device's sysfs directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the kernel has this device at all.
    pub fn exists(&self) -> bool {
        self.dir.is_dir()
    }

    fn read(&self, name: &str) -> io::Result<Option<String>> {
        match std::fs::read_to_string(self.dir.join(name)) {
            Ok(s) => Ok(Some(s.trim_end_matches('\n').to_string())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `NBD_ATTR_BACKEND_IDENTIFIER` as given at CONNECT; None when the
    /// device was connected without one or is not connected (the kernel
    /// creates the `backend` file only for a configured device with an
    /// identifier).
    pub fn backend(&self) -> io::Result<Option<String>> {
        self.read("backend")
    }

    /// Size in bytes (`size` counts 512-byte sectors); 0 when not connected.
    pub fn size_bytes(&self) -> io::Result<u64> {
        let s = self.read("size")?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{}/size: no such device", self.dir.display()),
            )
        })?;
        let sectors: u64 = s.trim().parse().map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}/size: {s:?}: {e}", self.dir.display()),
            )
        })?;
        Ok(sectors * 512)
    }

    /// The pid of the task that connected the device (the kernel keeps the
    /// connecting task as `task_recv`; RECONFIGURE does not change it, so
    /// after a restart it names the *first* server process). None when the
    /// device is not connected.
    pub fn pid(&self) -> io::Result<Option<u32>> {
        match self.read("pid")? {
            None => Ok(None),
            Some(s) => s.trim().parse().map(Some).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}/pid: {s:?}: {e}", self.dir.display()),
                )
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_fake_tree() {
        let root = tempfile::tempdir().unwrap();
        let d = root.path().join("nbd3");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("backend"), "pvc-9\n").unwrap();
        std::fs::write(d.join("size"), "131072\n").unwrap();
        std::fs::write(d.join("pid"), "4242\n").unwrap();
        let s = NbdSysfs::under(root.path(), 3);
        assert!(s.exists());
        assert_eq!(s.backend().unwrap().as_deref(), Some("pvc-9"));
        assert_eq!(s.size_bytes().unwrap(), 64 << 20);
        assert_eq!(s.pid().unwrap(), Some(4242));

        // A disconnected device: no backend, no pid, size 0.
        std::fs::remove_file(d.join("backend")).unwrap();
        std::fs::remove_file(d.join("pid")).unwrap();
        std::fs::write(d.join("size"), "0\n").unwrap();
        assert_eq!(s.backend().unwrap(), None);
        assert_eq!(s.pid().unwrap(), None);
        assert_eq!(s.size_bytes().unwrap(), 0);

        // No such device.
        let none = NbdSysfs::under(root.path(), 9);
        assert!(!none.exists());
        assert_eq!(
            none.size_bytes().unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }
}
