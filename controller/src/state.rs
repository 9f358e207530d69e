//! The controller's records: every volume it provisioned (name, region id,
//! size, parameters) and the nodes it is published to, kept in one JSON
//! file under `--state-dir`, rewritten crash-safely on every change
//! (write a temporary file, fsync it, rename it over the old one, fsync
//! the directory): after a crash the file is the old or the new state,
//! never a torn one.
//!
//! In a cluster the `R3mapVolume` custom resource replaces this file
//! (`--records kubernetes`, [`crate::records::KubeRecords`]), so that a
//! controller rescheduled to another node keeps its records.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use csi::CsiError;

/// Name of the state file inside the state directory.
pub const FILE: &str = "controller-state.json";

/// One provisioned volume.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// The CreateVolume name it was made for.
    pub name: String,
    /// Size in bytes (the region's).
    pub size: u64,
    /// Parameters in canonical volume-context form.
    pub params: BTreeMap<String, String>,
    /// Node id -> published read-only.
    #[serde(default)]
    pub published: BTreeMap<String, bool>,
    /// CSI access mode it was created for (absent in older files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_mode: Option<String>,
    /// The node that writes the region, or wrote it last and may keep it
    /// for the next node after being unpublished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// A migration between nodes in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<Migration>,
}

/// A migration of the region from one node to another
/// (docs/migration.md, "Driven by attach and detach").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migration {
    /// Node pulled from.
    pub source: String,
    /// Node pulling.
    pub target: String,
    /// Live (the source writes until finalize) or a hand-over from a
    /// node that was unpublished already.
    pub live: bool,
    /// PreCopy until finalize, PostCopy after.
    pub phase: crate::crd::MigrationPhase,
    /// Chunks on the target, at the last look.
    #[serde(default)]
    pub chunks_present: u64,
    /// Chunks of the region.
    #[serde(default)]
    pub chunks_total: u64,
    /// The epoch the target took the region over at (after finalize).
    #[serde(default)]
    pub epoch: u64,
}

/// Every record, by volume id (= region id).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Format version of the file.
    pub version: u32,
    /// Volume id -> record.
    pub volumes: BTreeMap<String, VolumeRecord>,
}

/// The state file and its directory.
pub struct StateFile {
    dir: PathBuf,
}

fn internal(what: &str, path: &Path, e: impl std::fmt::Display) -> CsiError {
    CsiError::Internal(format!("{what} {}: {e}", path.display()))
}

impl StateFile {
    /// The state file in `dir` (created if missing).
    pub fn open(dir: &Path) -> Result<StateFile, CsiError> {
        std::fs::create_dir_all(dir).map_err(|e| internal("creating", dir, e))?;
        Ok(StateFile {
            dir: dir.to_path_buf(),
        })
    }

    /// Path of the state file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// Reads the state; an absent file is the empty state.
    pub fn load(&self) -> Result<State, CsiError> {
        let p = self.path();
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| internal("parsing", &p, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State {
                version: 1,
                ..State::default()
            }),
            Err(e) => Err(internal("reading", &p, e)),
        }
    }

    /// Replaces the state, crash-safely.
    pub fn save(&self, st: &State) -> Result<(), CsiError> {
        let p = self.path();
        let tmp = self.dir.join(format!("{FILE}.tmp"));
        let body = serde_json::to_vec_pretty(st).map_err(|e| internal("encoding", &p, e))?;
        let mut f = std::fs::File::create(&tmp).map_err(|e| internal("creating", &tmp, e))?;
        f.write_all(&body)
            .and_then(|_| f.sync_all())
            .map_err(|e| internal("writing", &tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, &p).map_err(|e| internal("renaming onto", &p, e))?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| internal("syncing", &self.dir, e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_no_tmp_left() {
        let d = tempfile::tempdir().unwrap();
        let f = StateFile::open(d.path()).unwrap();
        assert!(f.load().unwrap().volumes.is_empty());
        let mut st = f.load().unwrap();
        st.volumes.insert(
            "csi-a".into(),
            VolumeRecord {
                name: "a".into(),
                size: 1 << 20,
                params: BTreeMap::from([("chunkSize".into(), "1048576".into())]),
                published: BTreeMap::from([("node1".into(), false)]),
                access_mode: None,
                ..VolumeRecord::default()
            },
        );
        f.save(&st).unwrap();
        assert_eq!(StateFile::open(d.path()).unwrap().load().unwrap(), st);
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(FILE)]);
    }

    #[test]
    fn corrupt_file_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(FILE), b"{not json").unwrap();
        let e = StateFile::open(d.path()).unwrap().load().unwrap_err();
        assert_eq!(e.code(), tonic::Code::Internal);
    }
}
