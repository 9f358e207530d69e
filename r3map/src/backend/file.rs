//! `file:PATH` — a sparse file: pread/pwrite, fdatasync on flush, punched
//! holes on trim.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use nix::errno::Errno;
use nix::fcntl::{fallocate, FallocateFlags};

use super::{check_range, Backend, Error, Result};

/// A region stored in one file of exactly `size` bytes, at the same
/// offsets. Reads and writes are positional (no seek, no lock), so
/// concurrent requests never contend; flush is fdatasync; trim punches holes
/// so a trimmed range frees its blocks and reads as zeros.
pub struct FileBackend {
    file: Arc<File>,
    size: u64,
}

impl FileBackend {
    /// Opens or creates `path` as a region of `size` bytes. A smaller file is
    /// extended (sparsely); a larger one is refused rather than truncated.
    pub fn open(path: &Path, size: u64) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let len = file.metadata()?.len();
        if len > size {
            return Err(Error::FailedPrecondition(format!(
                "{} holds {len} bytes, more than the requested size {size}; refusing to truncate",
                path.display()
            )));
        }
        if len < size {
            file.set_len(size)?;
        }
        Ok(FileBackend {
            file: Arc::new(file),
            size,
        })
    }
}

#[async_trait]
impl Backend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    // pread/pwrite run inline: on the page cache they cost a memcpy, less
    // than a hop to the blocking pool. Only fdatasync, which waits for the
    // disk, goes to the blocking pool.
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0); // someone shrank the file under us
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        check_range(offset, data.len() as u64, self.size)?;
        // A pwrite that allocates blocks holds the inode lock for tens of
        // microseconds; on a multi-thread runtime let the worker hand its
        // other tasks (the connection's reader, the reply writer) to
        // another thread meanwhile.
        let write = || self.file.write_all_at(data, offset);
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(write)?,
            _ => write()?,
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || file.sync_data())
            .await
            .map_err(|e| Error::Io(std::io::Error::other(e)))??;
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        punch_hole(&self.file, offset, len)
    }
}

/// Makes `len` bytes at `offset` of `file` read as zeros, freeing their
/// blocks. Where the filesystem cannot punch holes, writes zeros instead:
/// a trim must read back as zeros either way.
pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> Result<()> {
    let res = fallocate(
        std::os::fd::AsRawFd::as_raw_fd(file),
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        offset as i64,
        len as i64,
    );
    match res {
        Ok(()) => Ok(()),
        Err(Errno::EOPNOTSUPP | Errno::ENOSYS) => write_zeros(file, offset, len),
        Err(e) => Err(Error::Io(e.into())),
    }
}

/// Writes zeros over a range, never past the file's end (a short chunk
/// file already reads as zeros there).
fn write_zeros(file: &File, offset: u64, len: u64) -> Result<()> {
    const PIECE: u64 = 1 << 20;
    let end = (offset + len).min(file.metadata()?.len());
    let zeros = vec![0u8; PIECE.min(len) as usize];
    let mut pos = offset;
    while pos < end {
        let n = PIECE.min(end - pos);
        file.write_all_at(&zeros[..n as usize], pos)?;
        pos += n;
    }
    Ok(())
}
