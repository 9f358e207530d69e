//! [`VolumeStats`]: the counters of a volume, for status and metrics.

use super::Volume;
use crate::managed::Progress;
use crate::nbd::NbdStats;

/// Counters of a volume as of one instant; cheap to take (atomics, and one
/// short mutex for a managed volume's chunk counts). Serialisable, so a
/// status endpoint can hand it out as it is; latency buckets have the
/// fixed bounds [`crate::nbd::stats::LATENCY_BOUNDS_US`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VolumeStats {
    /// The volume's name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Connections being served (kernel streams and handshake clients).
    pub connections: u64,
    /// The managed mount's progress: chunks total/local/dirty/missing/in
    /// flight, bytes pulled and pushed, fetch and push errors. None for a
    /// direct volume.
    pub managed: Option<Progress>,
    /// Per NBD command: requests, bytes, errors, latency histogram.
    pub nbd: NbdStats,
}

impl VolumeStats {
    /// One JSON object.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("plain numbers and strings serialise")
    }
}

impl Volume {
    /// The volume's counters now.
    pub fn stats(&self) -> VolumeStats {
        VolumeStats {
            name: self.name.clone(),
            size: self.size(),
            connections: self.server.connections() as u64,
            managed: self.managed.as_ref().map(|m| m.progress()),
            nbd: self.export.stats.snapshot(),
        }
    }
}
