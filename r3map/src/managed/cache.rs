//! The cache file and its chunk-state file: opened as they were left, or
//! created empty, under the cache's lock. Blocking (open, fsync): callers
//! run it off the runtime.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::lock::CacheLock;
use super::state::{self, state_path, ChunkState};
use crate::{Error, Result};

/// An opened cache: its lock, data file, state file and chunk states.
pub(super) struct Opened {
    pub lock: CacheLock,
    pub file: File,
    pub state: state::StateFile,
    pub states: Vec<ChunkState>,
    /// The cache belongs to a migration source that handed its region
    /// over: the mount must never push again.
    pub handed_over: bool,
}

/// Locks the cache at `cache` ([`CacheLock`]), then opens it and its state
/// file for a region of `size` bytes in chunks of `chunk`, or creates both.
/// A state file made for another geometry is refused, as is a cache holding
/// data but no state file (nothing would say which bytes are valid).
pub(super) fn open(cache: &Path, chunk: u64, size: u64) -> Result<Opened> {
    // First: nothing of the cache may be read while another mount may be
    // changing it.
    let lock = CacheLock::acquire(cache)?;
    let (file, state, states) = open_locked(cache, chunk, size)?;
    Ok(Opened {
        lock,
        file,
        state,
        states,
        handed_over: crate::migration::record::source_finalized(cache),
    })
}

fn open_locked(
    cache: &Path,
    chunk: u64,
    size: u64,
) -> Result<(File, state::StateFile, Vec<ChunkState>)> {
    let spath = state_path(cache);
    if spath.exists() {
        let (st, states) = state::StateFile::open_existing(&spath, chunk, size)?;
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(cache)
            .map_err(|e| {
                Error::FailedPrecondition(format!(
                    "state file {} exists but its cache {} cannot be opened: {e}",
                    spath.display(),
                    cache.display()
                ))
            })?;
        let len = f.metadata()?.len();
        if len != size {
            return Err(Error::FailedPrecondition(format!(
                "cache {} holds {len} bytes, its state file describes {size}",
                cache.display()
            )));
        }
        Ok((f, st, states))
    } else {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(cache)?;
        let md = f.metadata()?;
        // Without a state file nothing says which bytes are valid: only
        // an empty (all-hole) file, e.g. one we made before a crash, is taken.
        if md.blocks() > 0 {
            return Err(Error::FailedPrecondition(format!(
                "cache {} holds data but has no state file {}; remove it to start over",
                cache.display(),
                spath.display()
            )));
        }
        f.set_len(size)?;
        f.sync_all()?;
        let st = state::StateFile::create(&spath, chunk, size)?;
        let count = size.div_ceil(chunk) as usize;
        Ok((f, st, vec![ChunkState::Missing; count]))
    }
}
