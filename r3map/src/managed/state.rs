//! The chunk-state file beside the cache: `<cache>.state`.
//!
//! Layout (little endian): a 64-byte header — magic `R3MAPST1`, version
//! (u32), reserved (u32), chunk size (u64), region size (u64), chunk count
//! (u64), zero padding — then one byte per chunk (see [`ChunkState`]).
//! Each transition is one positional write of one byte, so a process killed
//! at any point leaves a file that says, per chunk, the last state it
//! recorded; the page cache keeps those writes across a `kill -9`, and
//! `fdatasync` at flush keeps them across a host crash.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::backend::{Error, Result};

const MAGIC: &[u8; 8] = b"R3MAPST1";
const VERSION: u32 = 1;
/// Bytes before the first chunk byte.
pub const HEADER_LEN: u64 = 64;

/// What the cache holds for one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ChunkState {
    /// Not in the cache: must be fetched from the source before use.
    Missing = 0,
    /// In the cache, and the sink holds the same bytes (or there is no sink).
    Local = 1,
    /// In the cache, written since it was last pushed to the sink.
    Dirty = 2,
}

impl ChunkState {
    fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(ChunkState::Missing),
            1 => Some(ChunkState::Local),
            2 => Some(ChunkState::Dirty),
            _ => None,
        }
    }
}

/// The open state file.
pub struct StateFile {
    file: File,
    path: PathBuf,
}

/// Path of the state file of a cache file.
pub fn state_path(cache: &Path) -> PathBuf {
    let mut s = cache.as_os_str().to_owned();
    s.push(".state");
    PathBuf::from(s)
}

fn header(chunk: u64, size: u64, count: u64) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[0..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&chunk.to_le_bytes());
    h[24..32].copy_from_slice(&size.to_le_bytes());
    h[32..40].copy_from_slice(&count.to_le_bytes());
    h
}

fn u64_at(h: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(h[at..at + 8].try_into().unwrap())
}

impl StateFile {
    /// Creates a state file with every chunk Missing. It is written under a
    /// temporary name and renamed, so a crash never leaves a half header.
    pub fn create(path: &Path, chunk: u64, size: u64) -> Result<Self> {
        let count = size.div_ceil(chunk);
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&header(chunk, size, count))?;
            // Every chunk byte is 0 (Missing): extending the file writes them.
            f.set_len(HEADER_LEN + count)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        sync_dir(path)?;
        Self::open_existing(path, chunk, size).map(|(s, _)| s)
    }

    /// Opens an existing state file, checking that it describes a region of
    /// `size` bytes in chunks of `chunk`; returns the per-chunk states.
    pub fn open_existing(path: &Path, chunk: u64, size: u64) -> Result<(Self, Vec<ChunkState>)> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let bad = |why: String| {
            Error::FailedPrecondition(format!(
                "state file {} does not match this mount: {why}; use the cache with the \
                 settings it was made with, or remove the cache and its state file to start over",
                path.display()
            ))
        };
        let len = file.metadata()?.len();
        if len < HEADER_LEN {
            return Err(bad(format!("{len} bytes is shorter than its header")));
        }
        let mut h = [0u8; HEADER_LEN as usize];
        file.read_exact_at(&mut h, 0)?;
        if &h[0..8] != MAGIC {
            return Err(bad("bad magic (not an r3map state file)".into()));
        }
        let version = u32::from_le_bytes(h[8..12].try_into().unwrap());
        if version != VERSION {
            return Err(bad(format!("version {version}, expected {VERSION}")));
        }
        let (fchunk, fsize, fcount) = (u64_at(&h, 16), u64_at(&h, 24), u64_at(&h, 32));
        if fchunk != chunk {
            return Err(bad(format!(
                "it was made with chunk size {fchunk}, not {chunk}"
            )));
        }
        if fsize != size {
            return Err(bad(format!(
                "it was made for a region of {fsize} bytes, not {size}"
            )));
        }
        let count = size.div_ceil(chunk);
        if fcount != count || len != HEADER_LEN + count {
            return Err(bad(format!(
                "it holds {} chunk bytes for {fcount} chunks, expected {count}",
                len - HEADER_LEN
            )));
        }
        let mut raw = vec![0u8; count as usize];
        file.read_exact_at(&mut raw, HEADER_LEN)?;
        let mut states = Vec::with_capacity(raw.len());
        for (i, b) in raw.iter().enumerate() {
            states.push(
                ChunkState::from_byte(*b)
                    .ok_or_else(|| bad(format!("chunk {i} has unknown state byte {b}")))?,
            );
        }
        Ok((
            StateFile {
                file,
                path: path.to_path_buf(),
            },
            states,
        ))
    }

    /// Records the state of chunk `idx` (one byte; durable after [`StateFile::sync`]).
    pub fn set(&self, idx: u64, st: ChunkState) -> Result<()> {
        self.file.write_all_at(&[st as u8], HEADER_LEN + idx)?;
        Ok(())
    }

    /// fdatasync.
    pub fn sync(&self) -> Result<()> {
        self.file.sync_data()?;
        Ok(())
    }

    /// Where the state file lives.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// fsyncs the directory holding `path`, so a rename or create in it survives a crash.
pub fn sync_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_mismatch() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.state");
        let s = StateFile::create(&p, 4096, 10_000).unwrap();
        s.set(1, ChunkState::Dirty).unwrap();
        s.set(2, ChunkState::Local).unwrap();
        drop(s);
        let (_, st) = StateFile::open_existing(&p, 4096, 10_000).unwrap();
        assert_eq!(
            st,
            vec![ChunkState::Missing, ChunkState::Dirty, ChunkState::Local]
        );
        let e = StateFile::open_existing(&p, 8192, 10_000).err().unwrap();
        assert!(e.to_string().contains("chunk size 4096"), "{e}");
        let e = StateFile::open_existing(&p, 4096, 20_000).err().unwrap();
        assert!(e.to_string().contains("10000 bytes"), "{e}");
        std::fs::write(&p, [b'x'; 80]).unwrap();
        let e = StateFile::open_existing(&p, 4096, 10_000).err().unwrap();
        assert!(e.to_string().contains("magic"), "{e}");
        std::fs::write(&p, [b'x'; 10]).unwrap();
        let e = StateFile::open_existing(&p, 4096, 10_000).err().unwrap();
        assert!(e.to_string().contains("shorter than its header"), "{e}");
    }
}
