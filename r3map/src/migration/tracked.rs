//! `Tracked`: a backend wrapper that records, once tracking starts, every
//! chunk written, trimmed or zeroed, and that can be finalized: flushed,
//! closed to writes, and its record handed over in one atomic step.
//!
//! Atomicity comes from one gate: every mutating call holds the gate shared
//! for its whole duration (write, then record); `track()` and `finalize()`
//! take it exclusively, so they wait for writes in flight and no write can
//! slip between "done" and "recorded" on either side of them.
//!
//! A write is recorded *after* its bytes landed, so a pre-copy round
//! ([`Tracked::take_round`]) can hand the record over without the gate: a
//! chunk in a round's answer holds the bytes of every write recorded in it,
//! and a write still in flight is recorded in the next round.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::RwLock;

use crate::backend::{check_range, Backend, Error, Result};

/// A set of chunk indices as a bitmap, one bit per chunk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChunkSet {
    words: Vec<u64>,
    len: u64,
    count: u64,
}

impl ChunkSet {
    /// An empty set over `len` chunks.
    pub fn new(len: u64) -> Self {
        ChunkSet {
            words: vec![0; len.div_ceil(64) as usize],
            len,
            count: 0,
        }
    }

    /// Number of chunks the set ranges over.
    pub fn capacity(&self) -> u64 {
        self.len
    }

    /// Number of chunks in the set.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Whether no chunk is in the set.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether chunk `i` is in the set.
    pub fn contains(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Adds chunk `i`; returns true if it was not there. Out-of-range
    /// indices are ignored (they cannot name a chunk of the region).
    pub fn insert(&mut self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let w = &mut self.words[(i / 64) as usize];
        let bit = 1 << (i % 64);
        let new = *w & bit == 0;
        *w |= bit;
        self.count += new as u64;
        new
    }

    /// Adds every chunk of `first..first+count`.
    pub fn insert_range(&mut self, first: u64, count: u64) {
        for i in first..first.saturating_add(count).min(self.len) {
            self.insert(i);
        }
    }

    /// Chunk indices in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros() as u64;
                w &= w - 1;
                Some(wi as u64 * 64 + b)
            })
        })
    }

    /// The set as maximal runs `(first, count)`, ascending: compact on the
    /// wire when writes are sequential.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for i in self.iter() {
            match out.last_mut() {
                Some((f, c)) if *f + *c == i => *c += 1,
                _ => out.push((i, 1)),
            }
        }
        out
    }
}

#[derive(Debug)]
struct State {
    tracking: bool,
    /// Written since the last round (since Track before round 1).
    dirty: ChunkSet,
    /// The last round answered, and its answer (kept until the next round
    /// confirms it was applied, or finalize folds it in).
    round: u64,
    last: Option<Arc<ChunkSet>>,
    /// Set once by `finalize`: the record handed over, kept so a repeated
    /// finalize returns the same answer.
    finalized: Option<Arc<ChunkSet>>,
}

/// Wraps a backend; see the module docs. After [`Tracked::finalize`] every
/// write, trim and zeroing fails with EIO (the source application is being
/// stopped; failing is chosen over blocking so it cannot hang in D-state on
/// a device that will never accept writes again). Reads keep working: the
/// destination pulls the chunks it lacks from here after finalize.
pub struct Tracked {
    inner: Arc<dyn Backend>,
    chunk: u64,
    gate: RwLock<()>,
    state: Mutex<State>,
}

impl Tracked {
    /// Tracks `inner` at a granularity of `chunk` bytes.
    pub fn new(inner: Arc<dyn Backend>, chunk: u64) -> Self {
        assert!(chunk > 0, "chunk size must be positive");
        let n = inner.size().div_ceil(chunk);
        Tracked {
            inner,
            chunk,
            gate: RwLock::new(()),
            state: Mutex::new(State {
                tracking: false,
                dirty: ChunkSet::new(n),
                round: 0,
                last: None,
                finalized: None,
            }),
        }
    }

    /// Chunk size the writes are recorded in.
    pub fn chunk_size(&self) -> u64 {
        self.chunk
    }

    /// The backend underneath.
    pub fn inner(&self) -> &Arc<dyn Backend> {
        &self.inner
    }

    /// Starts recording writes. Waits for writes in flight, so every write
    /// that completes after this returns is recorded. Idempotent: a second
    /// call keeps the record so far.
    pub async fn track(&self) {
        let _x = self.gate.write().await;
        self.state.lock().unwrap().tracking = true;
    }

    /// Whether writes are being recorded.
    pub fn is_tracking(&self) -> bool {
        self.state.lock().unwrap().tracking
    }

    /// Whether finalize closed the region to writes.
    pub fn is_finalized(&self) -> bool {
        self.state.lock().unwrap().finalized.is_some()
    }

    /// Chunks recorded so far (a snapshot; for progress reports).
    pub fn dirty_count(&self) -> u64 {
        self.state.lock().unwrap().dirty.count()
    }

    /// The last pre-copy round answered (0: none).
    pub fn round(&self) -> u64 {
        self.state.lock().unwrap().round
    }

    /// One pre-copy round: returns the chunks written since the previous
    /// round (since [`Tracked::track`] for round 1) and starts a new record.
    /// `round` must be the next round (`self.round() + 1`), or the last one
    /// again (its answer is repeated: the caller may have lost it). Needs
    /// no gate: writes are recorded after they landed (see the module docs).
    pub fn take_round(&self, round: u64) -> Result<Arc<ChunkSet>> {
        let mut st = self.state.lock().unwrap();
        if st.finalized.is_some() {
            return Err(Error::FailedPrecondition(
                "finalized: no more pre-copy rounds".into(),
            ));
        }
        if !st.tracking {
            return Err(Error::FailedPrecondition("not tracking".into()));
        }
        if round == st.round && round > 0 {
            if let Some(last) = &st.last {
                return Ok(last.clone());
            }
        }
        if round != st.round + 1 {
            return Err(Error::InvalidArgument(format!(
                "pre-copy round {round} asked; the last one answered is {}",
                st.round
            )));
        }
        let n = st.dirty.capacity();
        let set = Arc::new(std::mem::replace(&mut st.dirty, ChunkSet::new(n)));
        st.round = round;
        st.last = Some(set.clone());
        Ok(set)
    }

    /// Waits for writes in flight, flushes the backend, closes it to writes
    /// and returns the chunks written since the destination's last applied
    /// round `applied` (0: since [`Tracked::track`]). If the destination is
    /// one round behind (it never applied the last answer), that answer is
    /// folded in; further behind cannot happen with one destination, and
    /// then every chunk is returned (correct, if slow). Idempotent: later
    /// calls return the same set. If the flush fails the region stays open
    /// and the error is returned, so the caller can retry or abort.
    pub async fn finalize(&self, applied: u64) -> Result<Arc<ChunkSet>> {
        let _x = self.gate.write().await;
        if let Some(f) = &self.state.lock().unwrap().finalized {
            return Ok(f.clone());
        }
        {
            let st = self.state.lock().unwrap();
            if applied > st.round {
                return Err(Error::InvalidArgument(format!(
                    "the destination applied round {applied}; the last one answered is {}",
                    st.round
                )));
            }
        }
        self.inner.flush().await?;
        let mut st = self.state.lock().unwrap();
        let mut set = std::mem::replace(&mut st.dirty, ChunkSet::new(0));
        if applied + 1 == st.round {
            if let Some(last) = &st.last {
                for i in last.iter() {
                    set.insert(i);
                }
            }
        } else if applied + 1 < st.round {
            tracing::warn!(
                applied,
                round = st.round,
                "migration: the destination is rounds behind; handing over every chunk as dirty"
            );
            set.insert_range(0, set.capacity());
        }
        let set = Arc::new(set);
        st.last = None;
        st.finalized = Some(set.clone());
        Ok(set)
    }

    /// Stops tracking and forgets the record (a migration given up before
    /// finalize); writes go on as before. Refused after finalize: the
    /// region already belongs to the destination.
    pub async fn abort(&self) -> Result<()> {
        let _x = self.gate.write().await;
        let mut st = self.state.lock().unwrap();
        if st.finalized.is_some() {
            return Err(Error::FailedPrecondition(
                "the migration was finalized: the region belongs to the destination".into(),
            ));
        }
        st.tracking = false;
        st.dirty = ChunkSet::new(st.dirty.capacity());
        st.round = 0;
        st.last = None;
        Ok(())
    }

    /// Marks the region finalized with `set` as its record, without a
    /// flush: a source restarted after finalize stays closed to writes and
    /// answers a repeated finalize with the same set.
    pub fn restore_finalized(&self, set: ChunkSet) {
        let mut st = self.state.lock().unwrap();
        st.tracking = true;
        st.finalized = Some(Arc::new(set));
    }

    /// Refuses a mutation once finalized. Called with the gate held shared.
    fn check_open(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.inner.size())?;
        if self.state.lock().unwrap().finalized.is_some() {
            return Err(Error::Io(std::io::Error::other(
                "region finalized for migration: writes are closed",
            )));
        }
        Ok(())
    }

    /// Records `offset..offset+len` if tracking, after the mutation ran
    /// (whether or not it succeeded: a failed write may have changed some
    /// bytes). Called with the gate still held shared.
    fn record(&self, offset: u64, len: u64) {
        let mut st = self.state.lock().unwrap();
        if st.tracking && len > 0 {
            let first = offset / self.chunk;
            let last = (offset + len - 1) / self.chunk;
            st.dirty.insert_range(first, last - first + 1);
        }
    }
}

#[async_trait]
impl Backend for Tracked {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.read_at(offset, buf).await
    }

    // Reads need no tracking: a lent piece is the bytes as of the read,
    // and a later write to them is recorded like any other.
    async fn read_pieces(&self, offset: u64, len: u64) -> Result<Vec<bytes::Bytes>> {
        self.inner.read_pieces(offset, len).await
    }

    fn lends_pieces(&self) -> bool {
        self.inner.lends_pieces()
    }

    async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let _g = self.gate.read().await;
        self.check_open(offset, data.len() as u64)?;
        let r = self.inner.write_at(offset, data).await;
        self.record(offset, data.len() as u64);
        r
    }

    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        let _g = self.gate.read().await;
        self.check_open(offset, len)?;
        let r = self.inner.trim(offset, len).await;
        self.record(offset, len);
        r
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let _g = self.gate.read().await;
        self.check_open(offset, len)?;
        let r = self.inner.write_zeroes(offset, len).await;
        self.record(offset, len);
        r
    }

    async fn cache(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.cache(offset, len).await
    }

    fn flush_is_global(&self) -> bool {
        self.inner.flush_is_global()
    }

    fn epoch(&self) -> Option<u64> {
        self.inner.epoch()
    }

    async fn fence(&self, epoch: u64, owner: &str) -> Result<()> {
        self.inner.fence(epoch, owner).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::memory::Memory;

    #[test]
    fn chunk_set_ranges_and_count() {
        let mut s = ChunkSet::new(200);
        assert!(s.insert(3));
        assert!(!s.insert(3));
        s.insert_range(63, 3);
        s.insert(199);
        s.insert(500); // out of range: ignored
        assert_eq!(s.count(), 5);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![3, 63, 64, 65, 199]);
        assert_eq!(s.ranges(), vec![(3, 1), (63, 3), (199, 1)]);
        assert!(s.contains(64) && !s.contains(66) && !s.contains(500));
    }

    /// The seed's `Read` sends what a RAM backend lends (no buffer to fill):
    /// the wrapper must pass the lending on, and a write after a lend is
    /// still recorded.
    #[tokio::test]
    async fn lends_the_inner_backends_pieces_and_still_tracks() {
        let t = Tracked::new(Arc::new(Memory::new(4 * 4096, 4096)), 4096);
        t.write_at(4096, &[7; 4096]).await.unwrap();
        assert!(t.lends_pieces());
        t.track().await;
        let p = t.read_pieces(4096, 4096).await.unwrap();
        t.write_at(4096, &[8; 10]).await.unwrap();
        let got: Vec<u8> = p.iter().flat_map(|b| b.iter().copied()).collect();
        assert_eq!(
            got,
            vec![7; 4096],
            "a lent piece keeps the bytes as of the read"
        );
        let set = t.finalize(0).await.unwrap();
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![1]);
    }

    #[tokio::test]
    async fn records_only_after_track_and_closes_on_finalize() {
        let t = Tracked::new(Arc::new(Memory::new(10 * 4096, 4096)), 4096);
        t.write_at(0, &[1; 10]).await.unwrap(); // before track: not recorded
        t.track().await;
        t.write_at(4096 * 2 + 100, &[2; 4096]).await.unwrap(); // spans 2 and 3
        t.trim(4096 * 7, 4096).await.unwrap();
        t.write_zeroes(4096 * 9, 1).await.unwrap();
        t.track().await; // idempotent: keeps the record
        let set = t.finalize(0).await.unwrap();
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![2, 3, 7, 9]);
        assert!(t.abort().await.is_err(), "no abort after finalize");
        let err = t.write_at(0, &[3; 4]).await.unwrap_err();
        assert_eq!(
            crate::nbd::proto::errno_of(&err),
            crate::nbd::proto::NBD_EIO
        );
        assert!(t.trim(0, 4096).await.is_err());
        // Reads still work (post-copy pulls them), and finalize repeats.
        let mut b = [0u8; 4];
        t.read_at(0, &mut b).await.unwrap();
        assert_eq!(b, [1; 4]);
        assert_eq!(*t.finalize(0).await.unwrap(), *set);
    }

    #[tokio::test]
    async fn abort_forgets_the_record_and_keeps_writes_open() {
        let t = Tracked::new(Arc::new(Memory::new(10 * 4096, 4096)), 4096);
        t.track().await;
        t.write_at(4096, &[1; 10]).await.unwrap();
        assert_eq!(t.dirty_count(), 1);
        t.abort().await.unwrap();
        assert!(!t.is_tracking());
        assert_eq!(t.dirty_count(), 0);
        t.write_at(0, &[2; 10]).await.unwrap();
        assert_eq!(t.dirty_count(), 0, "not tracking after abort");
        t.track().await;
        t.write_at(8192, &[3; 1]).await.unwrap();
        let set = t.finalize(0).await.unwrap();
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![2]);
    }

    #[tokio::test]
    async fn finalize_waits_for_writes_in_flight() {
        // A backend whose writes take a while: finalize must not return
        // before the write it raced with is done and recorded.
        struct Slow(Memory);
        #[async_trait]
        impl Backend for Slow {
            fn size(&self) -> u64 {
                self.0.size()
            }
            async fn read_at(&self, o: u64, b: &mut [u8]) -> Result<()> {
                self.0.read_at(o, b).await
            }
            async fn write_at(&self, o: u64, d: &[u8]) -> Result<()> {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                self.0.write_at(o, d).await
            }
            async fn flush(&self) -> Result<()> {
                Ok(())
            }
            async fn trim(&self, o: u64, l: u64) -> Result<()> {
                self.0.trim(o, l).await
            }
        }
        let t = Arc::new(Tracked::new(Arc::new(Slow(Memory::new(8 * 512, 512))), 512));
        t.track().await;
        let w = {
            let t = t.clone();
            tokio::spawn(async move { t.write_at(512 * 5, &[9; 512]).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let set = t.finalize(0).await.unwrap();
        assert!(w.await.unwrap().is_ok(), "the write in flight completes");
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![5]);
        let mut b = [0u8; 512];
        t.read_at(512 * 5, &mut b).await.unwrap();
        assert_eq!(b, [9; 512]);
    }

    #[tokio::test]
    async fn rounds_hand_over_and_finalize_folds_an_unapplied_round() {
        let t = Tracked::new(Arc::new(Memory::new(10 * 4096, 4096)), 4096);
        assert!(t.take_round(1).is_err(), "no rounds before track");
        t.track().await;
        t.write_at(0, &[1; 1]).await.unwrap();
        t.write_at(4096 * 3, &[1; 1]).await.unwrap();
        let ids = |s: Arc<ChunkSet>| s.iter().collect::<Vec<_>>();
        assert_eq!(ids(t.take_round(1).unwrap()), vec![0, 3]);
        t.write_at(4096 * 5, &[1; 1]).await.unwrap();
        assert_eq!(ids(t.take_round(1).unwrap()), vec![0, 3], "a repeat");
        assert!(t.take_round(3).is_err(), "rounds go one at a time");
        assert_eq!(ids(t.take_round(2).unwrap()), vec![5]);
        // Chunk 0 written again after its round: it must be handed over.
        t.write_at(0, &[2; 1]).await.unwrap();
        t.write_at(4096 * 7, &[2; 1]).await.unwrap();
        assert!(t.finalize(3).await.is_err(), "a round never answered");
        // The destination applied round 1 only: round 2 is folded in.
        assert_eq!(ids(t.finalize(1).await.unwrap()), vec![0, 5, 7]);
        assert!(t.take_round(3).is_err(), "no rounds after finalize");
        assert_eq!(ids(t.finalize(2).await.unwrap()), vec![0, 5, 7], "repeat");
    }

    #[tokio::test]
    async fn a_round_names_only_writes_that_landed() {
        // A write in flight while a round is taken: if the round named its
        // chunk before the bytes landed, the destination would pull the old
        // bytes and never hear of the chunk again.
        struct Slow(Memory);
        #[async_trait]
        impl Backend for Slow {
            fn size(&self) -> u64 {
                self.0.size()
            }
            async fn read_at(&self, o: u64, b: &mut [u8]) -> Result<()> {
                self.0.read_at(o, b).await
            }
            async fn write_at(&self, o: u64, d: &[u8]) -> Result<()> {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                self.0.write_at(o, d).await
            }
            async fn flush(&self) -> Result<()> {
                Ok(())
            }
            async fn trim(&self, o: u64, l: u64) -> Result<()> {
                self.0.trim(o, l).await
            }
        }
        let t = Arc::new(Tracked::new(Arc::new(Slow(Memory::new(8 * 512, 512))), 512));
        t.track().await;
        let w = {
            let t = t.clone();
            tokio::spawn(async move { t.write_at(512 * 5, &[9; 512]).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let r1 = t.take_round(1).unwrap();
        let mut b = [0u8; 512];
        t.read_at(512 * 5, &mut b).await.unwrap();
        assert!(
            !r1.contains(5) || b == [9; 512],
            "round 1 names chunk 5 while it still holds the old bytes"
        );
        w.await.unwrap().unwrap();
        let r2 = t.take_round(2).unwrap();
        assert!(
            r1.contains(5) || r2.contains(5),
            "the write was never named"
        );
    }
}
