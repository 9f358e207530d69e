//! The node plugin's records: one JSON file per staged volume under
//! `--state-dir/volumes/`, each rewritten crash-safely (temporary file,
//! fsync, rename, fsync of the directory): after a crash a file is the old
//! or the new record, never a torn one. A restarted plugin re-attaches
//! every volume recorded here (see [`crate::plugin::node`]).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use csi::CsiError;

/// Format version of a record.
pub const VERSION: u32 = 1;

/// One staged volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// Format version ([`VERSION`]).
    pub version: u32,
    /// The CSI volume id.
    pub volume_id: String,
    /// The region of the region service behind it.
    pub region: String,
    /// N of /dev/nbdN; None between the record's first write and the
    /// kernel's CONNECT answer (a restart then looks the device up by its
    /// identifier).
    pub device_index: Option<u32>,
    /// `NBD_ATTR_BACKEND_IDENTIFIER` the device was connected with (the
    /// volume id), compared with /sys/block/nbdN/backend before any
    /// re-attach.
    pub identifier: String,
    /// The managed cache file.
    pub cache_path: PathBuf,
    /// The fencing epoch this node holds for the region (0 until known).
    pub epoch: u64,
    /// Size in bytes the device was connected with.
    pub size: u64,
    /// Socketpairs handed to the kernel.
    pub connections: usize,
    /// staging_target_path of NodeStageVolume.
    pub staging_path: String,
    /// Parameters in canonical volume-context form.
    pub params: BTreeMap<String, String>,
    /// Directory of credential files written from the stage secrets, if
    /// any (0600); None: the command line's credentials.
    pub creds_dir: Option<PathBuf>,
    /// Target path -> published read-only.
    #[serde(default)]
    pub published: BTreeMap<String, bool>,
    /// While this node pulls the volume from another node (a migration
    /// target before every chunk is here): where from. A restarted plugin
    /// resumes the pull from the record beside the cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrate_from: Option<PeerSource>,
    /// Unstaged, but the region is kept here (no device) so that the next
    /// node can take it over without a round trip through the region
    /// service; closed at this time (unix seconds) unless released first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retained_until: Option<u64>,
}

/// The node a migration target pulls from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerSource {
    /// Its migration service, HOST:PORT.
    pub endpoint: String,
    /// Its node id.
    pub node: String,
    /// Live (the source writes until finalize) or a hand-over.
    pub live: bool,
}

/// The directory of records.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

fn internal(what: &str, path: &Path, e: impl std::fmt::Display) -> CsiError {
    CsiError::Internal(format!("{what} {}: {e}", path.display()))
}

impl StateDir {
    /// `state_dir/volumes`, created if missing.
    pub fn open(state_dir: &Path) -> Result<StateDir, CsiError> {
        let dir = state_dir.join("volumes");
        std::fs::create_dir_all(&dir).map_err(|e| internal("creating", &dir, e))?;
        Ok(StateDir { dir })
    }

    /// Path of the record of `volume_id` (a validated id: no `/`, no
    /// leading `.`).
    pub fn path(&self, volume_id: &str) -> PathBuf {
        self.dir.join(format!("{volume_id}.json"))
    }

    /// Writes `rec` crash-safely.
    pub fn save(&self, rec: &VolumeRecord) -> Result<(), CsiError> {
        let p = self.path(&rec.volume_id);
        let tmp = self.dir.join(format!(".{}.json.tmp", rec.volume_id));
        let body = serde_json::to_vec_pretty(rec).map_err(|e| internal("encoding", &p, e))?;
        let mut f = std::fs::File::create(&tmp).map_err(|e| internal("creating", &tmp, e))?;
        f.write_all(&body)
            .and_then(|_| f.sync_all())
            .map_err(|e| internal("writing", &tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, &p).map_err(|e| internal("renaming onto", &p, e))?;
        self.sync_dir()
    }

    fn sync_dir(&self) -> Result<(), CsiError> {
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| internal("syncing", &self.dir, e))
    }

    /// Removes the record of `volume_id` (absent is fine).
    pub fn remove(&self, volume_id: &str) -> Result<(), CsiError> {
        let p = self.path(volume_id);
        match std::fs::remove_file(&p) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(internal("removing", &p, e)),
        }
    }

    /// Every record. A file that does not parse is reported, not skipped
    /// silently: its volume may be attached, and guessing is worse.
    pub fn load_all(&self) -> Vec<Result<VolumeRecord, CsiError>> {
        let mut out = Vec::new();
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) => return vec![Err(internal("listing", &self.dir, e))],
        };
        let mut names: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().is_some_and(|x| x == "json")
                    && !p
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect();
        names.sort();
        for p in names {
            out.push(
                std::fs::read(&p)
                    .map_err(|e| internal("reading", &p, e))
                    .and_then(|b| {
                        serde_json::from_slice::<VolumeRecord>(&b)
                            .map_err(|e| internal("parsing", &p, e))
                    }),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str) -> VolumeRecord {
        VolumeRecord {
            version: VERSION,
            volume_id: id.into(),
            region: id.into(),
            device_index: Some(3),
            identifier: id.into(),
            cache_path: "/var/state/cache/x".into(),
            epoch: 7,
            size: 32 << 20,
            connections: 1,
            staging_path: "/var/lib/kubelet/plugins/x".into(),
            params: BTreeMap::from([("chunkSize".into(), "1048576".into())]),
            creds_dir: None,
            published: BTreeMap::from([("/var/lib/kubelet/pods/p/dev".into(), false)]),
            migrate_from: None,
            retained_until: None,
        }
    }

    #[test]
    fn round_trip_remove_and_no_tmp_left() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(d.path()).unwrap();
        assert!(s.load_all().is_empty());
        s.save(&rec("b")).unwrap();
        s.save(&rec("a")).unwrap();
        let mut r = rec("a");
        r.epoch = 8;
        s.save(&r).unwrap();
        let all: Vec<_> = s.load_all().into_iter().map(Result::unwrap).collect();
        assert_eq!(all, vec![r, rec("b")]);
        let names: Vec<_> = std::fs::read_dir(d.path().join("volumes"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        s.remove("a").unwrap();
        s.remove("a").unwrap();
        assert_eq!(s.load_all().len(), 1);
    }

    #[test]
    fn corrupt_record_is_reported() {
        let d = tempfile::tempdir().unwrap();
        let s = StateDir::open(d.path()).unwrap();
        std::fs::write(s.path("bad"), b"{nope").unwrap();
        let all = s.load_all();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].as_ref().unwrap_err().code(), tonic::Code::Internal);
    }
}
