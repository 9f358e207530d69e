//! A per-volume in-flight guard (as Mayastor's): a second call on a volume
//! while one runs is answered ABORTED, as the CSI spec allows, instead of
//! racing it.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::CsiError;

/// The set of volume ids with a call in flight. Cheap to clone; clones
/// share the set.
#[derive(Clone, Default)]
pub struct InFlight(Arc<Mutex<HashSet<String>>>);

/// Holds one volume id; dropping it frees the id.
#[must_use = "the id is freed when the guard is dropped"]
pub struct InFlightGuard {
    set: InFlight,
    id: String,
}

impl InFlight {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes `id`, or fails with ABORTED when a call holds it already.
    pub fn try_lock(&self, id: &str) -> Result<InFlightGuard, CsiError> {
        let mut set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !set.insert(id.to_string()) {
            return Err(CsiError::Aborted(format!(
                "an operation on volume {id:?} is already in progress"
            )));
        }
        Ok(InFlightGuard {
            set: self.clone(),
            id: id.to_string(),
        })
    }

    /// Whether a call holds `id`.
    pub fn is_locked(&self, id: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }
}

impl InFlightGuard {
    /// The id this guard holds.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut set = self.set.0.lock().unwrap_or_else(|p| p.into_inner());
        set.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_aborted_until_drop() {
        let f = InFlight::new();
        let g = f.try_lock("v1").unwrap();
        assert_eq!(g.id(), "v1");
        assert!(f.is_locked("v1"));
        let e = f.try_lock("v1").err().unwrap();
        assert_eq!(e.code(), tonic::Code::Aborted);
        assert!(e.to_string().contains("v1"));
        // Another volume is independent.
        let _g2 = f.try_lock("v2").unwrap();
        drop(g);
        assert!(!f.is_locked("v1"));
        let _g3 = f.clone().try_lock("v1").unwrap();
    }

    #[test]
    fn threads_get_exactly_one_guard() {
        let f = InFlight::new();
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
        let won: Vec<_> = (0..8)
            .map(|_| {
                let (f, b) = (f.clone(), barrier.clone());
                std::thread::spawn(move || {
                    b.wait();
                    let g = f.try_lock("same");
                    // Hold the guard until every thread has tried.
                    b.wait();
                    g.is_ok()
                })
            })
            .collect();
        let wins = won
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|&ok| ok)
            .count();
        assert_eq!(wins, 1);
        assert!(!f.is_locked("same"));
    }
}
