//! The cache file and its chunk-state file: opened as they were left, or
//! created empty. Blocking (open, fsync): callers run it off the runtime.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::state::{self, state_path, ChunkState};
use crate::{Error, Result};

/// Opens the cache at `cache` and its state file for a region of `size`
/// bytes in chunks of `chunk`, or creates both. A state file made for
/// another geometry is refused, as is a cache holding data but no state
/// file (nothing would say which bytes are valid).
pub(super) fn open(
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
