//! The background pull's window: how many chunks it fetches at once,
//! sized from the bandwidth-delay product it measures.
//!
//! A fixed number of fetches in flight is either too few for a long link
//! (1 MiB chunks, 32 at a time, 50 ms away: 640 MB/s at most) or more than
//! needed on a short one, where every extra fetch queues in the one HTTP/2
//! connection ahead of the on-demand fetch a reader waits for. So the
//! window follows the link, as BBR sizes a TCP window: twice the highest
//! pull rate seen times the lowest fetch time seen (the round trip without
//! queueing), rounded up to chunks, between [`MIN`] and the mount's
//! `pull_workers`. While the window itself limits the rate, that product
//! is twice the window, so it doubles each period until the link or the
//! CPU is the limit.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Fewest fetches kept in flight (unless `pull_workers` is lower).
pub(super) const MIN: usize = 8;
/// Window at start: small, so the first fetch times are near the bare
/// round trip.
const START: usize = 16;
/// How often the window is recomputed.
const PERIOD: Duration = Duration::from_millis(100);
/// The lowest fetch time and highest rate are forgotten after this long
/// (a link that got slower or faster is followed within it).
const MEMORY: Duration = Duration::from_secs(10);

pub(super) struct Window {
    max: usize,
    chunk: u64,
    size: AtomicUsize,
    /// Notified when the window grows.
    pub grown: Notify,
    stats: Mutex<Stats>,
}

struct Stats {
    period_start: Instant,
    period_bytes: u64,
    /// Lowest fetch time and highest rate: in this memory epoch, and the
    /// one before (so the estimate never drops to nothing at a boundary).
    min_rtt: [Option<Duration>; 2],
    max_rate: [f64; 2],
    epoch_start: Instant,
}

impl Window {
    pub fn new(max: usize, chunk: u64) -> Window {
        let now = Instant::now();
        Window {
            max,
            chunk,
            size: AtomicUsize::new(START.min(max)),
            grown: Notify::new(),
            stats: Mutex::new(Stats {
                period_start: now,
                period_bytes: 0,
                min_rtt: [None; 2],
                max_rate: [0.0; 2],
                epoch_start: now,
            }),
        }
    }

    /// Fetches the background pull may have in flight now.
    pub fn size(&self) -> usize {
        self.size.load(Relaxed)
    }

    /// The lowest fetch time in memory, if any fetch completed.
    pub fn rtt(&self) -> Option<Duration> {
        let st = self.stats.lock().unwrap();
        st.min_rtt.iter().flatten().min().copied()
    }

    /// Records a fetch of `bytes` (background or on demand: both move the
    /// same link) that took `took`, from request to last byte; every
    /// [`PERIOD`] resizes the window.
    pub fn record(&self, bytes: u64, took: Duration) {
        let mut st = self.stats.lock().unwrap();
        let now = Instant::now();
        st.period_bytes += bytes;
        st.min_rtt[0] = Some(st.min_rtt[0].map_or(took, |m| m.min(took)));
        let elapsed = now - st.period_start;
        if elapsed < PERIOD {
            return;
        }
        let rate = st.period_bytes as f64 / elapsed.as_secs_f64();
        st.max_rate[0] = st.max_rate[0].max(rate);
        st.period_start = now;
        st.period_bytes = 0;
        if now - st.epoch_start >= MEMORY {
            st.epoch_start = now;
            st.min_rtt = [None, st.min_rtt[0]];
            st.max_rate = [0.0, st.max_rate[0]];
        }
        let rtt = st.min_rtt.iter().flatten().min().copied().unwrap_or(took);
        let rate = st.max_rate[0].max(st.max_rate[1]);
        drop(st);
        let want = target(rate, rtt, self.chunk, self.max);
        if self.size.swap(want, Relaxed) < want {
            self.grown.notify_waiters();
        }
    }
}

/// Twice the bandwidth-delay product in chunks, within [`MIN`] and `max`.
fn target(rate: f64, rtt: Duration, chunk: u64, max: usize) -> usize {
    let bdp = rate * rtt.as_secs_f64();
    let chunks = (2.0 * bdp / chunk as f64).ceil() as usize;
    chunks.clamp(MIN.min(max), max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_is_twice_the_bdp_in_chunks_within_bounds() {
        let ms = Duration::from_millis;
        const MIB: u64 = 1 << 20;
        // 1 GB/s x 10 ms = 10 MB: 20 chunks of 1 MiB after doubling.
        assert_eq!(target(1e9, ms(10), MIB, 256), 20);
        assert_eq!(target(1e9, ms(10), MIB, 16), 16);
        assert_eq!(target(1e9, ms(0), MIB, 256), MIN);
        assert_eq!(target(1e9, ms(0), MIB, 2), 2);
        // Window-limited: 16 chunks per 50 ms is a BDP of 16: grows to 32.
        let rate = 16.0 * MIB as f64 / 0.05;
        assert_eq!(target(rate, ms(50), MIB, 256), 32);
    }

    #[test]
    fn a_long_link_grows_the_window() {
        let w = Window::new(64, 1 << 20);
        assert_eq!(w.size(), START);
        // 16 fetches of 1 MiB every 50 ms: the window is the limit.
        {
            let mut st = w.stats.lock().unwrap();
            st.period_start -= PERIOD;
            st.period_bytes = 32 << 20;
        }
        w.record(1 << 20, Duration::from_millis(50));
        assert!(w.size() > START, "window {}", w.size());
        assert_eq!(w.rtt(), Some(Duration::from_millis(50)));
    }
}
