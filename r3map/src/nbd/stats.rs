//! Per-command counters of the transmission phase: requests, bytes,
//! errors and a latency histogram for each NBD command.
//!
//! Recording is a handful of relaxed atomic adds per request (no lock on
//! the hot path); [`NbdCounters::snapshot`] copies them into plain,
//! serialisable [`NbdStats`]. The histogram has fixed log2 buckets
//! ([`LATENCY_BOUNDS_US`]) so the CSI layer can export it as a Prometheus
//! histogram without rebucketing.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use super::proto::{CMD_CACHE, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES};

/// Number of finite latency buckets: upper bounds 1 µs, 2 µs, ... 2^22 µs.
pub const LATENCY_BUCKETS: usize = 23;

/// Inclusive upper bounds of the finite latency buckets, in microseconds:
/// `1 << i` for bucket `i`, from 1 µs to 4,194,304 µs (~4.2 s). A last,
/// unbounded bucket (+Inf) counts slower requests.
pub const LATENCY_BOUNDS_US: [u64; LATENCY_BUCKETS] = {
    let mut b = [0u64; LATENCY_BUCKETS];
    let mut i = 0;
    while i < LATENCY_BUCKETS {
        b[i] = 1 << i;
        i += 1;
    }
    b
};

/// Bucket of a latency: the first `i` with `latency <= LATENCY_BOUNDS_US[i]`,
/// or [`LATENCY_BUCKETS`] (the +Inf bucket).
pub fn latency_bucket(latency: Duration) -> usize {
    // Rounded up to whole microseconds, so a bucket's bound is inclusive
    // (Prometheus `le`) at microsecond resolution.
    let us = latency.as_nanos().div_ceil(1000).min(u64::MAX as u128) as u64;
    if us <= 1 {
        return 0;
    }
    // ceil(log2(us)): 2 -> 1, 3..=4 -> 2, 5..=8 -> 3 ...
    let i = (64 - (us - 1).leading_zeros()) as usize;
    i.min(LATENCY_BUCKETS)
}

/// The commands counted, in the order of [`NbdStats`]'s fields.
const COMMANDS: [u16; 6] = [
    CMD_READ,
    CMD_WRITE,
    CMD_FLUSH,
    CMD_TRIM,
    CMD_WRITE_ZEROES,
    CMD_CACHE,
];

fn slot(cmd: u16) -> Option<usize> {
    COMMANDS.iter().position(|&c| c == cmd)
}

/// Live counters of one command.
#[derive(Default)]
struct CommandCounters {
    requests: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    latency_sum_us: AtomicU64,
    buckets: [AtomicU64; LATENCY_BUCKETS + 1],
}

impl CommandCounters {
    fn snapshot(&self) -> CommandStats {
        CommandStats {
            requests: self.requests.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
            errors: self.errors.load(Relaxed),
            latency: Histogram {
                buckets: self.buckets.iter().map(|b| b.load(Relaxed)).collect(),
                sum_us: self.latency_sum_us.load(Relaxed),
            },
        }
    }
}

/// Live counters of an export, shared by all its connections; see the
/// module docs.
#[derive(Default)]
pub struct NbdCounters {
    cmds: [CommandCounters; COMMANDS.len()],
}

impl NbdCounters {
    /// Records one answered request of command `cmd` moving `bytes` bytes
    /// (0 for commands without payload), `ok` or not, which took `latency`
    /// from being read off the socket to its reply being queued. Unknown
    /// commands and DISC are not counted.
    pub fn record(&self, cmd: u16, bytes: u64, ok: bool, latency: Duration) {
        let Some(i) = slot(cmd) else { return };
        let c = &self.cmds[i];
        c.requests.fetch_add(1, Relaxed);
        if ok {
            c.bytes.fetch_add(bytes, Relaxed);
        } else {
            c.errors.fetch_add(1, Relaxed);
        }
        c.latency_sum_us
            .fetch_add(latency.as_micros().min(u64::MAX as u128) as u64, Relaxed);
        c.buckets[latency_bucket(latency)].fetch_add(1, Relaxed);
    }

    /// The counters as of now (each counter read once; not one atomic
    /// snapshot across counters, which metrics do not need).
    pub fn snapshot(&self) -> NbdStats {
        let s = |cmd| self.cmds[slot(cmd).expect("counted command")].snapshot();
        NbdStats {
            read: s(CMD_READ),
            write: s(CMD_WRITE),
            flush: s(CMD_FLUSH),
            trim: s(CMD_TRIM),
            write_zeroes: s(CMD_WRITE_ZEROES),
            cache: s(CMD_CACHE),
        }
    }
}

/// Counters of every NBD command of an export, as of one instant.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NbdStats {
    /// NBD_CMD_READ; bytes are bytes read.
    pub read: CommandStats,
    /// NBD_CMD_WRITE (with or without FUA); bytes are bytes written.
    pub write: CommandStats,
    /// NBD_CMD_FLUSH; no bytes.
    pub flush: CommandStats,
    /// NBD_CMD_TRIM; bytes are bytes discarded.
    pub trim: CommandStats,
    /// NBD_CMD_WRITE_ZEROES; bytes are bytes zeroed.
    pub write_zeroes: CommandStats,
    /// NBD_CMD_CACHE; bytes are bytes asked to be cached.
    pub cache: CommandStats,
}

/// Counters of one NBD command.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CommandStats {
    /// Requests answered, successfully or not.
    pub requests: u64,
    /// Bytes moved by the successful requests (the request lengths).
    pub bytes: u64,
    /// Requests answered with an error (refused or failed).
    pub errors: u64,
    /// Time from reading the request to queueing its reply.
    pub latency: Histogram,
}

/// A latency histogram with the fixed bounds [`LATENCY_BOUNDS_US`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Histogram {
    /// `buckets[i]` (not cumulative) counts latencies in
    /// `(LATENCY_BOUNDS_US[i-1], LATENCY_BOUNDS_US[i]]` µs; the last,
    /// `buckets[LATENCY_BUCKETS]`, those above the last bound (+Inf).
    pub buckets: Vec<u64>,
    /// Sum of all latencies, in microseconds (Prometheus `_sum`).
    pub sum_us: u64,
}

impl Histogram {
    /// Number of latencies recorded (Prometheus `_count`).
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Cumulative counts per upper bound in microseconds, `None` for +Inf:
    /// the shape of a Prometheus histogram's `_bucket{le=...}` series.
    pub fn cumulative(&self) -> Vec<(Option<u64>, u64)> {
        let mut acc = 0;
        self.buckets
            .iter()
            .enumerate()
            .map(|(i, n)| {
                acc += n;
                (LATENCY_BOUNDS_US.get(i).copied(), acc)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_log2_with_inclusive_bounds() {
        let us = Duration::from_micros;
        assert_eq!(latency_bucket(Duration::ZERO), 0);
        assert_eq!(latency_bucket(Duration::from_nanos(1)), 0);
        assert_eq!(latency_bucket(us(1)), 0);
        assert_eq!(latency_bucket(Duration::from_nanos(1001)), 1);
        assert_eq!(latency_bucket(us(2)), 1);
        assert_eq!(latency_bucket(us(3)), 2);
        assert_eq!(latency_bucket(us(4)), 2);
        assert_eq!(latency_bucket(us(5)), 3);
        assert_eq!(latency_bucket(us(1 << 22)), 22);
        assert_eq!(latency_bucket(us((1 << 22) + 1)), LATENCY_BUCKETS);
        assert_eq!(latency_bucket(Duration::from_secs(3600)), LATENCY_BUCKETS);
        for (i, &b) in LATENCY_BOUNDS_US.iter().enumerate() {
            assert_eq!(latency_bucket(us(b)), i, "bound {b} µs");
        }
    }

    #[test]
    fn record_and_snapshot() {
        let c = NbdCounters::default();
        c.record(CMD_READ, 4096, true, Duration::from_micros(3));
        c.record(CMD_READ, 4096, false, Duration::from_secs(10));
        c.record(CMD_FLUSH, 0, true, Duration::from_millis(1));
        c.record(super::super::proto::CMD_DISC, 0, true, Duration::ZERO);
        let s = c.snapshot();
        assert_eq!(s.read.requests, 2);
        assert_eq!(s.read.bytes, 4096, "only successful bytes");
        assert_eq!(s.read.errors, 1);
        assert_eq!(s.read.latency.count(), 2);
        assert_eq!(s.read.latency.buckets[2], 1);
        assert_eq!(s.read.latency.buckets[LATENCY_BUCKETS], 1);
        assert_eq!(s.read.latency.sum_us, 10_000_003);
        let cum = s.read.latency.cumulative();
        assert_eq!(cum[1], (Some(2), 0));
        assert_eq!(cum[2], (Some(4), 1));
        assert_eq!(*cum.last().unwrap(), (None, 2));
        assert_eq!(s.flush.requests, 1);
        assert_eq!(
            s.write,
            CommandStats {
                latency: Histogram {
                    buckets: vec![0; LATENCY_BUCKETS + 1],
                    sum_us: 0
                },
                ..Default::default()
            }
        );
    }
}
