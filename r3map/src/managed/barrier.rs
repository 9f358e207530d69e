//! A barrier in front of durability: while it is pending, flushes and
//! pushes wait, reads and writes do not.
//!
//! A migration destination releases its held export as soon as the
//! hand-over is applied in memory, so the application resumes without
//! waiting for the fsyncs that make the hand-over durable (on a busy disk
//! those took 5-15 ms of a 10 ms downtime budget). Until the hand-over's
//! record is durable, a crash would make the restarted destination apply
//! the hand-over again, which re-fetches the chunks it names and so drops
//! later writes to them; that is allowed only for writes nobody flushed.
//! So no flush is acknowledged, and nothing is pushed to the region's
//! store, before the owner opens the barrier ([`FlushBarrier::open`]).

use std::sync::Arc;

use tokio::sync::watch;

use super::Managed;
use crate::{Error, Result};

/// Whether flushes may go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum State {
    Open,
    Pending,
    /// Making the owner's state durable failed: no flush can promise
    /// durability any more.
    Failed(String),
}

/// The pending barrier [`Managed::release_before_durable`] returns. Dropped
/// without [`FlushBarrier::open`], it fails every flush from then on.
#[must_use = "flushes wait until the barrier is opened"]
pub struct FlushBarrier {
    tx: Option<Arc<watch::Sender<State>>>,
}

impl FlushBarrier {
    /// The owner's state is durable: flushes and pushes go on.
    pub fn open(mut self) {
        if let Some(tx) = self.tx.take() {
            tx.send_replace(State::Open);
        }
    }

    /// The owner's state could not be made durable: flushes fail with an
    /// I/O error naming `why`.
    pub fn fail(mut self, why: &str) {
        if let Some(tx) = self.tx.take() {
            tx.send_replace(State::Failed(why.to_string()));
        }
    }
}

impl Drop for FlushBarrier {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            tx.send_replace(State::Failed("the flush barrier was abandoned".into()));
        }
    }
}

/// Waits while the barrier is pending; fails once it failed.
pub(super) async fn pass(tx: &watch::Sender<State>) -> Result<()> {
    let mut rx = tx.subscribe();
    loop {
        match &*rx.borrow_and_update() {
            State::Open => return Ok(()),
            State::Failed(why) => {
                return Err(Error::io(format!("flush refused: {why}")));
            }
            State::Pending => {}
        }
        if rx.changed().await.is_err() {
            return Err(Error::io("flush refused: the mount is gone".to_string()));
        }
    }
}

impl Managed {
    /// Opens the gate closed by [`Managed::hold`] for reads and writes,
    /// while flushes and pushes wait until the returned barrier is opened
    /// (see the module docs). The barrier is set before the gate opens, so
    /// no flush queued behind the hold slips through.
    pub async fn release_before_durable(&self) -> FlushBarrier {
        let tx = self.inner.barrier.clone();
        tx.send_replace(State::Pending);
        self.release().await;
        FlushBarrier { tx: Some(tx) }
    }
}
