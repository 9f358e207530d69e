//! Migration state persisted beside the cache (`CACHE.migration`), so
//! either side can be restarted: a source restarted after finalize stays
//! closed to writes and repeats its answer; a destination restarted mid-pull
//! resumes from the chunks it has, one restarted after finalize keeps the
//! epoch it took the region over at.
//!
//! Written aside, fsynced and renamed (then the directory fsynced), so a
//! crash leaves the old record or the new one, never a torn one.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Path of the migration record of the cache at `cache`.
pub fn record_path(cache: &Path) -> PathBuf {
    let mut s = cache.as_os_str().to_owned();
    s.push(".migration");
    PathBuf::from(s)
}

/// What the source handed over at finalize.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handover {
    /// The tracking session finalized.
    pub session: u64,
    /// Chunks written since Track, as `(first, count)` runs.
    pub dirty: Vec<(u64, u64)>,
    /// Chunks written at the source but never pushed to the region's store.
    pub unpushed: Vec<(u64, u64)>,
    /// The source's fencing epoch, if its region is fenced.
    pub epoch: Option<u64>,
}

/// The source's record: present only once it finalized.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceRecord {
    /// Always "source".
    pub role: String,
    /// The answer to Finalize.
    pub handover: Handover,
}

/// The destination's record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeechRecord {
    /// Always "destination".
    pub role: String,
    /// The seed's endpoint, as given.
    pub from: String,
    /// The seed's tracking session this pull belongs to.
    pub session: u64,
    /// This destination's name as a writer of a fenced region.
    pub owner: String,
    /// Set once the seed answered Finalize.
    pub handover: Option<Handover>,
    /// The epoch this destination took the region over at (fenced stores).
    pub epoch: Option<u64>,
    /// Set once the hand-over was applied to the cache (dirty chunks made
    /// Missing, unpushed ones Dirty) and the export released: from then on
    /// local writes exist and the hand-over must not be applied again.
    pub applied: bool,
    /// The last pre-copy round applied: its dirty chunks were made Missing
    /// and that made durable. Sent with Finalize, so the seed folds in a
    /// round answered but not applied (a crash between the two).
    #[serde(default)]
    pub round: u64,
    /// An older copy of the region this destination started from (checked
    /// by hash, see `Hashes`), as given.
    #[serde(default)]
    pub reuse: Option<PathBuf>,
    /// The older copy became the cache, with a fresh state file (every
    /// chunk Missing): from here on no chunk of it is trusted unchecked.
    #[serde(default)]
    pub adopted: bool,
    /// The hash check of the older copy ran to its end.
    #[serde(default)]
    pub delta_done: bool,
}

/// True when the cache at `cache` belongs to a migration source that
/// finalized: its region lives elsewhere now, so the mount must never push
/// again (checked by [`crate::managed::Managed::open`] before its push
/// loop starts). An unreadable record counts as finalized: refusing to
/// push is the safe side.
pub fn source_finalized(cache: &Path) -> bool {
    match load::<serde_json::Value>(&record_path(cache)) {
        Ok(None) => false,
        Ok(Some(v)) => v.get("role").and_then(|r| r.as_str()) != Some("destination"),
        Err(_) => true,
    }
}

/// Reads a record; `None` when there is none.
pub fn load<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Error::io(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    PathBuf::from(tmp)
}

/// Writes a record crash-safely (blocking: call off the runtime threads).
pub fn store<T: Serialize>(path: &Path, rec: &T) -> Result<()> {
    prepare(path, rec)?;
    commit(path)
}

/// The first half of [`store`]: the new record, written aside and synced.
/// Until [`commit`], the old record is the one in force.
pub fn prepare<T: Serialize>(path: &Path, rec: &T) -> Result<()> {
    let body = serde_json::to_vec_pretty(rec).map_err(|e| Error::io(e.to_string()))?;
    let mut f = std::fs::File::create(tmp_path(path))?;
    std::io::Write::write_all(&mut f, &body)?;
    f.sync_all()?;
    Ok(())
}

/// The second half of [`store`]: the prepared record replaces the old one
/// (rename, then the directory synced).
pub fn commit(path: &Path) -> Result<()> {
    std::fs::rename(tmp_path(path), path)?;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    std::fs::File::open(dir.unwrap_or(Path::new(".")))?.sync_all()?;
    Ok(())
}

/// [`prepare`] on a blocking thread.
pub async fn prepare_async<T: Serialize + Send + 'static>(path: PathBuf, rec: T) -> Result<()> {
    tokio::task::spawn_blocking(move || prepare(&path, &rec))
        .await
        .map_err(|e| Error::io(e.to_string()))?
}

/// [`commit`] on a blocking thread.
pub async fn commit_async(path: PathBuf) -> Result<()> {
    tokio::task::spawn_blocking(move || commit(&path))
        .await
        .map_err(|e| Error::io(e.to_string()))?
}

/// [`store`] on a blocking thread.
pub async fn store_async<T: Serialize + Send + 'static>(path: PathBuf, rec: T) -> Result<()> {
    tokio::task::spawn_blocking(move || store(&path, &rec))
        .await
        .map_err(|e| Error::io(e.to_string()))?
}

/// [`remove`] on a blocking thread.
pub async fn remove_async(path: PathBuf) -> Result<()> {
    tokio::task::spawn_blocking(move || remove(&path))
        .await
        .map_err(|e| Error::io(e.to_string()))?
}

/// Removes a record (and a leftover temporary), if present.
pub fn remove(path: &Path) -> Result<()> {
    for p in [path.to_path_buf(), {
        let mut t = path.as_os_str().to_owned();
        t.push(".tmp");
        PathBuf::from(t)
    }] {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_remove() {
        let d = tempfile::tempdir().unwrap();
        let p = record_path(&d.path().join("c"));
        assert_eq!(load::<LeechRecord>(&p).unwrap(), None);
        let r = LeechRecord {
            role: "destination".into(),
            from: "127.0.0.1:1".into(),
            session: 7,
            owner: "node-b".into(),
            handover: Some(Handover {
                session: 7,
                dirty: vec![(1, 2)],
                unpushed: vec![(5, 1)],
                epoch: Some(3),
            }),
            epoch: Some(4),
            applied: true,
            round: 3,
            reuse: Some(PathBuf::from("/var/old.cache")),
            adopted: true,
            delta_done: false,
        };
        store(&p, &r).unwrap();
        assert_eq!(load::<LeechRecord>(&p).unwrap(), Some(r));
        // A record written before rounds and delta existed still loads.
        let old = r#"{"role":"destination","from":"x","session":1,"owner":"o","handover":null,"epoch":null,"applied":false}"#;
        std::fs::write(&p, old).unwrap();
        let o = load::<LeechRecord>(&p).unwrap().unwrap();
        assert_eq!((o.round, o.adopted, o.reuse), (0, false, None));
        std::fs::write(&p, b"{not json").unwrap();
        assert!(
            load::<LeechRecord>(&p).is_err(),
            "a torn record is an error, not nothing"
        );
        remove(&p).unwrap();
        remove(&p).unwrap();
        assert_eq!(load::<LeechRecord>(&p).unwrap(), None);
    }
}
