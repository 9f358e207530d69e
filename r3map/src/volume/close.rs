//! Closing a volume within a deadline.

use std::time::Instant;

use tracing::{info, warn};

use super::Volume;
use crate::{Error, Result};

impl Volume {
    /// Closes the volume: stops taking requests on every connection,
    /// answers the requests in flight, pushes every written chunk and
    /// flushes the remote (a managed volume, whatever its durability mode)
    /// or flushes the backend (a direct one), then stops the background
    /// tasks and waits for every task the volume started, on-demand fetches
    /// included.
    ///
    /// All within `deadline`. Past it, returns an [`Error::Unavailable`]
    /// saying which step was still busy and what was still running; what
    /// was flushed before stays flushed, and the cache stays locked until
    /// the last of those tasks ends (they were told to stop). A failed push
    /// or flush is returned as it is, after the tasks were stopped.
    pub async fn close(self, deadline: Instant) -> Result<()> {
        let at = tokio::time::Instant::from_std(deadline);
        let name = self.name.clone();
        let busy = |v: &Volume, step: &str| {
            let tasks = v.managed.as_ref().map_or(0, |m| m.tasks_running());
            let msg = format!(
                "closing volume {name}: deadline passed while {step}; still running: \
                 {} connection(s), {tasks} cache task(s) (told to stop; the cache \
                 stays locked until they end)",
                v.server.connections(),
            );
            warn!("{msg}");
            if let Some(m) = &v.managed {
                // Background pull and push stop at their next step; a
                // fetch in flight ends with its source call.
                let m = m.clone();
                tokio::spawn(async move { m.close().await });
            }
            Error::Unavailable(msg)
        };

        // 1. No new requests; the ones read already are answered.
        self.server.shutdown();
        if tokio::time::timeout_at(at, self.server.wait())
            .await
            .is_err()
        {
            return Err(busy(&self, "draining requests in flight"));
        }

        // 2. Make it durable where it belongs.
        let synced = match &self.managed {
            Some(m) => tokio::time::timeout_at(at, m.sync()).await,
            None => tokio::time::timeout_at(at, self.export.backend.flush()).await,
        };
        let Ok(synced) = synced else {
            return Err(busy(&self, "pushing and flushing"));
        };

        // 3. Stop the background tasks and wait for each of them.
        if let Some(m) = &self.managed {
            if tokio::time::timeout_at(at, m.close()).await.is_err() {
                return Err(busy(&self, "stopping the cache's tasks"));
            }
        }
        match &synced {
            Ok(()) => info!(volume = %self.name, "closed"),
            Err(e) => {
                warn!(volume = %self.name, error = %e, "closed, but the final push or flush failed")
            }
        }
        synced.map_err(|e| e.context(format!("closing volume {}", self.name)))
    }
}
