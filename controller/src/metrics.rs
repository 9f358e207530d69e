//! The controller's metrics (docs/metrics.md), besides the CSI calls
//! ([`csi::metrics::CallMetrics`]): whether this replica leads, volumes by
//! migration phase, and writes of `R3mapVolume` records retried after a
//! conflict or a passing server error.
//!
//! Volumes and leadership are read on each scrape (a [`Collector`] over a
//! snapshot): from the records' store and the [`Leader`], never kept in a
//! second copy that could disagree with them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kube::api::ListParams;
use kube::{Api, Client};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::crd::{MigrationPhase, R3mapVolume};
use crate::leader::Leader;
use crate::records::Records;

/// How long a scrape may spend listing volumes.
const LIST_TIMEOUT: Duration = Duration::from_secs(5);

/// Every phase, in the order exported (all are exported, 0 included, so
/// that a phase with no volume is a 0 rather than a gap).
pub const PHASES: [MigrationPhase; 7] = [
    MigrationPhase::None,
    MigrationPhase::PreCopy,
    MigrationPhase::Finalizing,
    MigrationPhase::PostCopy,
    MigrationPhase::Complete,
    MigrationPhase::RolledBack,
    MigrationPhase::Failed,
];

/// The `phase` label: the name the CRD's status carries.
pub fn phase_name(p: MigrationPhase) -> &'static str {
    // Exhaustive: a new phase does not compile until it has a label.
    match p {
        MigrationPhase::None => "None",
        MigrationPhase::PreCopy => "PreCopy",
        MigrationPhase::Finalizing => "Finalizing",
        MigrationPhase::PostCopy => "PostCopy",
        MigrationPhase::Complete => "Complete",
        MigrationPhase::RolledBack => "RolledBack",
        MigrationPhase::Failed => "Failed",
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabels {
    reason: &'static str,
}

/// Writes of records retried, by reason; handed to
/// [`crate::records::KubeOptions`], which counts each retry.
#[derive(Clone, Debug, Default)]
pub struct WriteRetries(Family<RetryLabels, Counter>);

impl WriteRetries {
    /// Counts one retry after `code` (HTTP status of the refused write).
    pub fn record(&self, code: u16) {
        let reason = match code {
            409 => "conflict",
            404 => "not_found",
            429 => "throttled",
            _ => "server_error",
        };
        self.0.get_or_create(&RetryLabels { reason }).inc();
    }

    /// Adds `r3map_controller_record_write_retries_total` to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "r3map_controller_record_write_retries",
            "Writes of R3mapVolume records refused and retried after reading the object \
             again, by reason (conflict: 409, another writer got there first)",
            self.0.clone(),
        );
    }
}

/// Where the scrape counts volumes.
#[derive(Clone)]
pub enum VolumeSource {
    /// The records (the state file): every volume in phase None.
    Records(Arc<dyn Records>),
    /// `R3mapVolume` objects, by their `status.phase`.
    Kube(Client),
}

/// Volumes by phase now.
async fn count(src: &VolumeSource) -> Result<BTreeMap<&'static str, u64>, String> {
    let mut by: BTreeMap<&'static str, u64> = PHASES.iter().map(|&p| (phase_name(p), 0)).collect();
    match src {
        VolumeSource::Records(r) => {
            let n = r.list().await.map_err(|e| e.to_string())?.len() as u64;
            *by.entry(phase_name(MigrationPhase::None)).or_default() += n;
        }
        VolumeSource::Kube(c) => {
            let api: Api<R3mapVolume> = Api::all(c.clone());
            let mut lp = ListParams::default().limit(500);
            loop {
                let page = api.list(&lp).await.map_err(|e| e.to_string())?;
                for o in &page.items {
                    let p = o.status.as_ref().map(|s| s.phase).unwrap_or_default();
                    *by.entry(phase_name(p)).or_default() += 1;
                }
                match page.metadata.continue_ {
                    Some(c) if !c.is_empty() => lp = lp.continue_token(&c),
                    _ => break,
                }
            }
        }
    }
    Ok(by)
}

/// What one scrape found.
#[derive(Debug)]
pub struct ControllerCollector {
    /// Whether this replica leads (always with no election).
    pub leader: bool,
    /// Volumes by phase; None when listing failed.
    pub volumes: Option<BTreeMap<&'static str, u64>>,
}

impl Collector for ControllerCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let g = ConstGauge::new(u64::from(self.leader));
        let m = enc.encode_descriptor(
            "r3map_controller_leader",
            "1 when this replica holds the leader Lease and serves mutating calls \
             (always 1 without --leader-election)",
            None,
            g.metric_type(),
        )?;
        g.encode(m)?;
        let mut m = enc.encode_descriptor(
            "r3map_controller_volumes",
            "Volumes (R3mapVolume records) by migration phase; absent when listing them \
             failed at this scrape",
            None,
            MetricType::Gauge,
        )?;
        for (phase, n) in self.volumes.iter().flatten() {
            m.encode_family(&[("phase", *phase)])?.encode_gauge(n)?;
        }
        Ok(())
    }
}

/// The per-scrape registry: leadership and volumes by phase. A listing
/// that fails or takes longer than 5 s leaves the volume gauges out and
/// counts in `list_errors`.
pub async fn snapshot(src: VolumeSource, leader: Option<Leader>, list_errors: Counter) -> Registry {
    let volumes = match tokio::time::timeout(LIST_TIMEOUT, count(&src)).await {
        Ok(Ok(v)) => Some(v),
        Ok(Err(e)) => {
            tracing::warn!("metrics: listing volumes: {e}");
            list_errors.inc();
            None
        }
        Err(_) => {
            tracing::warn!("metrics: listing volumes timed out");
            list_errors.inc();
            None
        }
    };
    let mut r = Registry::default();
    r.register_collector(Box::new(ControllerCollector {
        leader: leader.is_none_or(|l| l.is_leader()),
        volumes,
    }));
    r
}

/// Registers the live counters of the controller (besides the CSI calls):
/// record write retries and failed volume listings.
pub fn register(registry: &mut Registry, retries: &WriteRetries, list_errors: &Counter) {
    retries.register(registry);
    registry.register(
        "r3map_controller_volume_list_errors",
        "Scrapes at which listing the volumes failed or timed out",
        list_errors.clone(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_names_are_the_crds() {
        for p in PHASES {
            assert_eq!(
                serde_json::to_value(p).unwrap(),
                serde_json::json!(phase_name(p))
            );
        }
    }
}
