//! `memory:` — a sparse region in RAM, one lock per chunk so concurrent
//! requests on different chunks never contend.

use std::sync::RwLock;

use async_trait::async_trait;

use super::{check_range, chunk_spans, Backend, Result};

/// A region held in RAM: a chunk is allocated on its first write and
/// freed when a trim covers it whole, so an unwritten region costs nothing.
/// Nothing survives the process.
pub struct Memory {
    size: u64,
    chunk: u64,
    chunks: Vec<RwLock<Option<Box<[u8]>>>>,
}

impl Memory {
    /// An all-zero region of `size` bytes, allocated `chunk` bytes at a time.
    ///
    /// # Panics
    /// If `chunk` is zero.
    pub fn new(size: u64, chunk: u64) -> Self {
        assert!(chunk > 0, "chunk size must be positive");
        let n = size.div_ceil(chunk) as usize;
        Memory {
            size,
            chunk,
            chunks: (0..n).map(|_| RwLock::new(None)).collect(),
        }
    }

    fn chunk_len(&self, idx: u64) -> usize {
        (self.size - idx * self.chunk).min(self.chunk) as usize
    }

    /// Bytes of RAM held by written chunks.
    pub fn allocated(&self) -> u64 {
        self.chunks
            .iter()
            .filter_map(|c| c.read().unwrap().as_ref().map(|b| b.len() as u64))
            .sum()
    }
}

#[async_trait]
impl Backend for Memory {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        for (idx, within, pos, n) in chunk_spans(offset, buf.len() as u64, self.chunk) {
            let out = &mut buf[pos as usize..(pos + n) as usize];
            match &*self.chunks[idx as usize].read().unwrap() {
                Some(data) => out.copy_from_slice(&data[within as usize..(within + n) as usize]),
                None => out.fill(0),
            }
        }
        Ok(())
    }

    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        check_range(offset, data.len() as u64, self.size)?;
        for (idx, within, pos, n) in chunk_spans(offset, data.len() as u64, self.chunk) {
            let mut slot = self.chunks[idx as usize].write().unwrap();
            let chunk =
                slot.get_or_insert_with(|| vec![0u8; self.chunk_len(idx)].into_boxed_slice());
            chunk[within as usize..(within + n) as usize]
                .copy_from_slice(&data[pos as usize..(pos + n) as usize]);
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.size)?;
        for (idx, within, _, n) in chunk_spans(offset, len, self.chunk) {
            let mut slot = self.chunks[idx as usize].write().unwrap();
            if n as usize == self.chunk_len(idx) {
                *slot = None; // whole chunk: give the memory back
            } else if let Some(chunk) = slot.as_mut() {
                chunk[within as usize..(within + n) as usize].fill(0);
            }
        }
        Ok(())
    }
}
