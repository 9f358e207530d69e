//! `memory:` — a sparse region in RAM, one lock per chunk so concurrent
//! requests on different chunks never contend.
//!
//! Chunks are immutable-when-shared buffers ([`Bytes`]): a streamed read
//! ([`Backend::read_pieces`], what the region server sends) hands out
//! slices of them without copying, and a write changes a chunk in place
//! unless such a slice is still out, in which case it writes a copy.

use std::sync::{OnceLock, RwLock};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use super::{check_range, chunk_spans, Backend, Result};

/// A region held in RAM: a chunk is allocated on its first write and
/// freed when a trim covers it whole, so an unwritten region costs nothing.
/// Nothing survives the process.
///
/// The chunk slots themselves come in blocks made on first write too, so
/// opening a 1 TiB region costs a few KiB, not a slot per chunk (40 MiB
/// and tens of milliseconds for a million 1 MiB chunks).
pub struct Memory {
    size: u64,
    chunk: u64,
    count: u64,
    blocks: Vec<OnceLock<Box<[Slot]>>>,
}

type Slot = RwLock<Option<Bytes>>;

/// Chunk slots per block.
const BLOCK: u64 = 1024;

impl Memory {
    /// An all-zero region of `size` bytes, allocated `chunk` bytes at a time.
    ///
    /// # Panics
    /// If `chunk` is zero.
    pub fn new(size: u64, chunk: u64) -> Self {
        assert!(chunk > 0, "chunk size must be positive");
        let count = size.div_ceil(chunk);
        Memory {
            size,
            chunk,
            count,
            blocks: (0..count.div_ceil(BLOCK))
                .map(|_| OnceLock::new())
                .collect(),
        }
    }

    /// The slot of chunk `idx`, if its block was ever written.
    fn slot(&self, idx: u64) -> Option<&Slot> {
        let b = self.blocks[(idx / BLOCK) as usize].get()?;
        Some(&b[(idx % BLOCK) as usize])
    }

    /// The slot of chunk `idx`, making its block if needed.
    fn slot_mut(&self, idx: u64) -> &Slot {
        let b = (idx / BLOCK) as usize;
        let block = self.blocks[b].get_or_init(|| {
            let n = (self.count - b as u64 * BLOCK).min(BLOCK);
            (0..n).map(|_| RwLock::new(None)).collect()
        });
        &block[(idx % BLOCK) as usize]
    }

    fn chunk_len(&self, idx: u64) -> usize {
        (self.size - idx * self.chunk).min(self.chunk) as usize
    }

    /// Bytes of RAM held by written chunks.
    pub fn allocated(&self) -> u64 {
        self.blocks
            .iter()
            .filter_map(|b| b.get())
            .flat_map(|b| b.iter())
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
            // Copied under the lock: a clone would make a concurrent
            // write copy the chunk.
            match self.slot(idx).map(|c| c.read().unwrap()) {
                Some(g) => match &*g {
                    Some(data) => {
                        out.copy_from_slice(&data[within as usize..(within + n) as usize])
                    }
                    None => out.fill(0),
                },
                None => out.fill(0),
            }
        }
        Ok(())
    }

    async fn read_pieces(&self, offset: u64, len: u64) -> Result<Vec<Bytes>> {
        check_range(offset, len, self.size)?;
        let mut pieces = Vec::new();
        for (idx, within, _, n) in chunk_spans(offset, len, self.chunk) {
            match self.slot(idx).and_then(|c| c.read().unwrap().clone()) {
                Some(data) => pieces.push(data.slice(within as usize..(within + n) as usize)),
                None => zeros(n as usize, &mut pieces),
            }
        }
        Ok(pieces)
    }

    fn lends_pieces(&self) -> bool {
        true
    }

    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        check_range(offset, data.len() as u64, self.size)?;
        for (idx, within, pos, n) in chunk_spans(offset, data.len() as u64, self.chunk) {
            let mut slot = self.slot_mut(idx).write().unwrap();
            let mut chunk = match slot.take() {
                // In place, unless a read still holds a slice of it.
                Some(b) => b.try_into_mut().unwrap_or_else(|b| BytesMut::from(&b[..])),
                None => BytesMut::zeroed(self.chunk_len(idx)),
            };
            chunk[within as usize..(within + n) as usize]
                .copy_from_slice(&data[pos as usize..(pos + n) as usize]);
            *slot = Some(chunk.freeze());
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.size)?;
        for (idx, within, _, n) in chunk_spans(offset, len, self.chunk) {
            // A block never written reads as zeros already.
            let Some(slot) = self.slot(idx) else { continue };
            let mut slot = slot.write().unwrap();
            if n as usize == self.chunk_len(idx) {
                *slot = None; // whole chunk: give the memory back
            } else if let Some(b) = slot.take() {
                let mut chunk = b.try_into_mut().unwrap_or_else(|b| BytesMut::from(&b[..]));
                chunk[within as usize..(within + n) as usize].fill(0);
                *slot = Some(chunk.freeze());
            }
        }
        Ok(())
    }
}

/// Zeros for never-written chunks, shared by every read of one.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// Appends `n` zero bytes as slices of [`ZEROS`].
fn zeros(mut n: usize, out: &mut Vec<Bytes>) {
    while n > 0 {
        let k = n.min(ZEROS.len());
        out.push(Bytes::from_static(&ZEROS[..k]));
        n -= k;
    }
}
