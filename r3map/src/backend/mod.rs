//! Storage backends: a region of bytes with positional read, write, flush
//! and trim. Every backend reads never-written and trimmed ranges as zeros.

use std::sync::Arc;

use async_trait::async_trait;

pub mod dir;
pub mod file;
pub mod memory;
pub mod redis;
pub mod s3;

/// Default chunk size for chunked backends (`dir`, `redis`, `memory`).
pub const DEFAULT_CHUNK_SIZE: u64 = 1 << 20;

pub use crate::error::{Error, ErrorKind, Result};

/// A region of `size()` bytes. Implementations are shared between many
/// concurrent NBD requests, so every method takes `&self`.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Size of the region in bytes; fixed for the life of the value.
    fn size(&self) -> u64;

    /// Fills `buf` with the bytes at `offset`. Never-written bytes read as zeros.
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// Reads `offset..offset+len` as pieces that tile it in order, for a
    /// caller that moves the bytes on (a managed mount writing them into
    /// its cache) and needs no buffer of its own. The default reads one
    /// piece with [`Backend::read_at`]; a backend that receives its bytes in
    /// pieces anyway (a remote region) hands those over without copying them.
    async fn read_pieces(&self, offset: u64, len: u64) -> Result<Vec<bytes::Bytes>> {
        let mut buf = vec![0u8; len as usize];
        self.read_at(offset, &mut buf).await?;
        Ok(vec![buf.into()])
    }

    /// True when [`Backend::read_pieces`] lends bytes the backend holds
    /// anyway (RAM) rather than reading into a new buffer: then a server
    /// sends them as they are (the NBD server's READ replies do) instead of
    /// copying them into a buffer of its own. A wrapper forwards it along
    /// with `read_pieces`.
    fn lends_pieces(&self) -> bool {
        false
    }

    /// Writes `data` at `offset`. Durable only after [`Backend::flush`].
    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()>;

    /// Makes every write that completed before this call durable.
    async fn flush(&self) -> Result<()>;

    /// Discards a range; it reads as zeros afterwards and may free space.
    async fn trim(&self, offset: u64, len: u64) -> Result<()>;

    /// Zeros a range. The default discards it, which every backend here
    /// guarantees to read back as zeros.
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.trim(offset, len).await
    }

    /// Hint that a range will be read soon (NBD_CMD_CACHE). No-op by default.
    async fn cache(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }

    /// True when a flush makes the writes of every connection durable, which
    /// is what NBD_FLAG_CAN_MULTI_CONN promises to a client.
    fn flush_is_global(&self) -> bool {
        true
    }

    /// The fencing epoch this value writes with, when its store fences
    /// writers (a region of `r3map backend`); `None` when it cannot
    /// (direct `memory:`, `file:`, `dir:`, `redis://`: see docs/fencing.md).
    fn epoch(&self) -> Option<u64> {
        None
    }

    /// Takes the region over for `owner` at `epoch` (see `Fence` in
    /// proto/remote.proto) and writes with `epoch` from then on. Fails with
    /// [`crate::ErrorKind::Fenced`] when the region is already further on,
    /// and [`crate::ErrorKind::FailedPrecondition`] where the store cannot fence.
    async fn fence(&self, epoch: u64, owner: &str) -> Result<()> {
        let _ = (epoch, owner);
        Err(Error::FailedPrecondition(
            "this backend has no fencing (only regions of `r3map backend` do)".into(),
        ))
    }
}

/// Checks that `offset..offset+len` lies inside a region of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange { offset, len, size }),
    }
}

/// Splits `offset..offset+len` at chunk boundaries: yields
/// (chunk index, offset inside the chunk, position in the caller's range, length).
pub fn chunk_spans(
    offset: u64,
    len: u64,
    chunk: u64,
) -> impl Iterator<Item = (u64, u64, u64, u64)> {
    let end = offset + len;
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let idx = pos / chunk;
        let within = pos % chunk;
        let n = (chunk - within).min(end - pos);
        let item = (idx, within, pos - offset, n);
        pos += n;
        Some(item)
    })
}

#[async_trait]
impl<B: Backend + ?Sized> Backend for Arc<B> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        (**self).read_at(offset, buf).await
    }
    async fn read_pieces(&self, offset: u64, len: u64) -> Result<Vec<bytes::Bytes>> {
        (**self).read_pieces(offset, len).await
    }
    fn lends_pieces(&self) -> bool {
        (**self).lends_pieces()
    }
    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        (**self).write_at(offset, data).await
    }
    async fn flush(&self) -> Result<()> {
        (**self).flush().await
    }
    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        (**self).trim(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        (**self).write_zeroes(offset, len).await
    }
    async fn cache(&self, offset: u64, len: u64) -> Result<()> {
        (**self).cache(offset, len).await
    }
    fn flush_is_global(&self) -> bool {
        (**self).flush_is_global()
    }
    fn epoch(&self) -> Option<u64> {
        (**self).epoch()
    }
    async fn fence(&self, epoch: u64, owner: &str) -> Result<()> {
        (**self).fence(epoch, owner).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_split_at_chunk_edges() {
        let v: Vec<_> = chunk_spans(10, 30, 16).collect();
        assert_eq!(v, vec![(0, 10, 0, 6), (1, 0, 6, 16), (2, 0, 22, 8)]);
        assert_eq!(chunk_spans(0, 0, 16).count(), 0);
    }

    #[test]
    fn range_overflow_is_rejected() {
        assert!(check_range(u64::MAX, 2, 100).is_err());
        assert!(check_range(90, 11, 100).is_err());
        assert!(check_range(90, 10, 100).is_ok());
    }
}
