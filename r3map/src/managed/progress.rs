//! Counters of a mount, cheap to read (atomics and four numbers under the
//! state mutex), serialisable for status files and metrics.

use std::sync::atomic::Ordering::Relaxed;

use super::*;

/// Counters of a mount, as of one instant.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    /// Chunks of the region.
    pub chunks_total: u64,
    /// Chunks in the cache, same as the sink's.
    pub chunks_local: u64,
    /// Chunks written here and not yet pushed.
    pub chunks_dirty: u64,
    /// Chunks not in the cache yet.
    pub chunks_missing: u64,
    /// Chunks being fetched now.
    pub chunks_in_flight: u64,
    /// Chunks pushed to the sink and recorded Local.
    pub chunks_pushed: u64,
    /// Bytes fetched from the source and installed.
    pub bytes_pulled: u64,
    /// Bytes pushed to the sink.
    pub bytes_pushed: u64,
    /// Fetches started by a read or write rather than the background pull.
    pub on_demand_fetches: u64,
    /// Failed fetches (each retried).
    pub fetch_errors: u64,
    /// Failed pushes (each retried).
    pub push_errors: u64,
    /// Background fetches allowed at once now (the pull's window).
    #[serde(default)]
    pub pull_window: u64,
    /// Lowest background fetch time seen recently, in microseconds (the
    /// round trip the window is sized from); 0 before the first.
    #[serde(default)]
    pub pull_rtt_us: u64,
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
            pull_window: if self.opts.pull_workers == 0 {
                0
            } else {
                self.window.size() as u64
            },
            pull_rtt_us: self.window.rtt().map_or(0, |d| d.as_micros() as u64),
        }
    }
}
