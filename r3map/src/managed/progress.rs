//! Counters of a mount, cheap to read (atomics and four numbers under the
//! state mutex), serialisable for status files and metrics.

use std::sync::atomic::Ordering::Relaxed;

use super::*;

/// Counters of a mount, as of one instant.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    pub chunks_total: u64,
    pub chunks_local: u64,
    pub chunks_dirty: u64,
    pub chunks_missing: u64,
    pub chunks_in_flight: u64,
    /// Chunks pushed to the sink and recorded Local.
    pub chunks_pushed: u64,
    pub bytes_pulled: u64,
    pub bytes_pushed: u64,
    /// Fetches started by a read or write rather than the background pull.
    pub on_demand_fetches: u64,
    pub fetch_errors: u64,
    pub push_errors: u64,
}

impl Progress {
    /// One JSON object, for status files and logs.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("plain numbers serialise")
    }
}

impl Inner {
    pub(super) fn progress(&self) -> Progress {
        let (local, dirty, missing, in_flight) = {
            let sh = self.shared.lock().unwrap();
            (sh.local, sh.dirty, sh.missing, sh.in_flight)
        };
        let c = &self.counters;
        Progress {
            chunks_total: self.count,
            chunks_local: local,
            chunks_dirty: dirty,
            chunks_missing: missing,
            chunks_in_flight: in_flight,
            chunks_pushed: c.chunks_pushed.load(Relaxed),
            bytes_pulled: c.bytes_pulled.load(Relaxed),
            bytes_pushed: c.bytes_pushed.load(Relaxed),
            on_demand_fetches: c.on_demand.load(Relaxed),
            fetch_errors: c.fetch_errors.load(Relaxed),
            push_errors: c.push_errors.load(Relaxed),
        }
    }
}
