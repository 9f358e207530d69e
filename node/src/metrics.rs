//! The node plugin's per-volume metrics (docs/metrics.md): a snapshot of
//! every staged volume taken on each scrape ([`VolumeMetrics`], from
//! `NodeService::volume_metrics`) and a prometheus-client [`Collector`]
//! that encodes it. Nothing is counted twice: the engine's own counters
//! ([`r3map::VolumeStats`]) are read as they are, so `/metrics` always
//! agrees with the engine.
//!
//! The engine's NBD latency histograms have fixed log2 bounds
//! ([`r3map::nbd::stats::LATENCY_BOUNDS_US`]: 1 µs, 2 µs, ... 2^22 µs)
//! and are exported as they are, without rebucketing: bucket
//! `le=2^i * 1e-6` seconds counts the requests whose latency, rounded up
//! to a whole microsecond, is at most 2^i µs; `+Inf` counts them all.
//! `_sum` is the sum of the latencies truncated to whole microseconds.

use std::borrow::Cow;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use r3map::nbd::stats::{CommandStats, LATENCY_BOUNDS_US};
use r3map::{Volume, VolumeStats};

/// One staged volume as of one instant.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VolumeMetrics {
    /// The CSI volume id (the `volume` label).
    pub volume: String,
    /// The fencing epoch this node holds for the volume's region.
    pub epoch: u64,
    /// Served to its device: false when recorded but not re-attached
    /// after a restart, or after a failed unstage.
    pub attached: bool,
    /// The region service fenced this node off (another node writes the
    /// region now).
    pub fenced: bool,
    /// The engine's counters; None when not served.
    pub stats: Option<VolumeStats>,
    /// Migration phase, when a migration of this volume runs or ran here
    /// (the `phase` label).
    pub migration_phase: Option<String>,
    /// How long the migration has run, or took.
    pub migration_duration: Option<Duration>,
    /// Chunks the migration target holds.
    pub migration_chunks_present: Option<u64>,
    /// Chunks the migration has to move in all.
    pub migration_chunks_total: Option<u64>,
}

impl VolumeMetrics {
    /// The metrics of volume `volume` at `epoch`, served by `vol` (None:
    /// recorded but not served). Migration fields stay None.
    pub fn of(volume: &str, epoch: u64, vol: Option<&Volume>) -> VolumeMetrics {
        VolumeMetrics {
            volume: volume.to_string(),
            epoch,
            attached: vol.is_some(),
            fenced: vol
                .and_then(|v| v.managed())
                .and_then(|m| m.fenced())
                .is_some(),
            stats: vol.map(Volume::stats),
            ..VolumeMetrics::default()
        }
    }
}

/// A registry holding one [`NodeCollector`] over `volumes`: what the node
/// plugin adds to `/metrics` on each scrape.
pub fn registry(volumes: Vec<VolumeMetrics>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(NodeCollector { volumes }));
    r
}

/// Encodes a snapshot of the staged volumes (see the module docs).
#[derive(Debug)]
pub struct NodeCollector {
    /// The volumes, in the order their samples appear.
    pub volumes: Vec<VolumeMetrics>,
}

/// A label value as the text format needs it: prometheus-client writes
/// label values verbatim, so `\`, `"` and newlines are escaped here (volume
/// ids cannot hold them, but a phase string comes from elsewhere).
fn esc(s: &str) -> Cow<'_, str> {
    if !s.contains(['\\', '"', '\n']) {
        return Cow::Borrowed(s);
    }
    Cow::Owned(
        s.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n"),
    )
}

/// The NBD commands in the `command` label, with their counters.
fn commands(s: &VolumeStats) -> [(&'static str, &CommandStats); 6] {
    let n = &s.nbd;
    [
        ("read", &n.read),
        ("write", &n.write),
        ("flush", &n.flush),
        ("trim", &n.trim),
        ("write_zeroes", &n.write_zeroes),
        ("cache", &n.cache),
    ]
}

type Fmt = Result<(), std::fmt::Error>;

impl NodeCollector {
    /// One gauge per volume for which `f` has a value.
    fn gauges<T: EncodeGaugeValue>(
        &self,
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        unit: Option<&Unit>,
        f: impl Fn(&VolumeMetrics) -> Option<T>,
    ) -> Fmt {
        let mut m = enc.encode_descriptor(name, help, unit, MetricType::Gauge)?;
        for v in &self.volumes {
            if let Some(x) = f(v) {
                let l = [("volume", esc(&v.volume))];
                m.encode_family(&l)?.encode_gauge(&x)?;
            }
        }
        Ok(())
    }

    /// One counter per served volume, from its engine counters.
    fn counters(
        &self,
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        unit: Option<&Unit>,
        f: impl Fn(&VolumeStats) -> Option<u64>,
    ) -> Fmt {
        let mut m = enc.encode_descriptor(name, help, unit, MetricType::Counter)?;
        for v in &self.volumes {
            if let Some(x) = v.stats.as_ref().and_then(&f) {
                let l = [("volume", esc(&v.volume))];
                m.encode_family(&l)?
                    .encode_counter::<NoLabelSet, u64, u64>(&x, None)?;
            }
        }
        Ok(())
    }

    /// One counter per served volume and NBD command.
    fn per_command(
        &self,
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        unit: Option<&Unit>,
        f: impl Fn(&CommandStats) -> u64,
    ) -> Fmt {
        let mut m = enc.encode_descriptor(name, help, unit, MetricType::Counter)?;
        for v in &self.volumes {
            let Some(s) = &v.stats else { continue };
            for (cmd, c) in commands(s) {
                let l = [("volume", esc(&v.volume)), ("command", Cow::Borrowed(cmd))];
                m.encode_family(&l)?
                    .encode_counter::<NoLabelSet, u64, u64>(&f(c), None)?;
            }
        }
        Ok(())
    }

    fn latency(&self, enc: &mut DescriptorEncoder) -> Fmt {
        let mut m = enc.encode_descriptor(
            "r3map_node_nbd_request_duration",
            "Time from reading an NBD request off the kernel's socket to queueing its reply, \
             by command (log2 buckets from 1 us; latencies rounded up to whole microseconds)",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for v in &self.volumes {
            let Some(s) = &v.stats else { continue };
            for (cmd, c) in commands(s) {
                let h = &c.latency;
                // The engine's buckets are per interval, as
                // encode_histogram wants them; f64::MAX is its +Inf.
                let buckets: Vec<(f64, u64)> = h
                    .buckets
                    .iter()
                    .enumerate()
                    .map(|(i, &n)| {
                        let le = LATENCY_BOUNDS_US
                            .get(i)
                            .map_or(f64::MAX, |&us| us as f64 / 1e6);
                        (le, n)
                    })
                    .collect();
                let l = [("volume", esc(&v.volume)), ("command", Cow::Borrowed(cmd))];
                m.encode_family(&l)?.encode_histogram::<NoLabelSet>(
                    h.sum_us as f64 / 1e6,
                    h.count(),
                    &buckets,
                    None,
                )?;
            }
        }
        Ok(())
    }

    fn chunks(&self, enc: &mut DescriptorEncoder) -> Fmt {
        let mut m = enc.encode_descriptor(
            "r3map_node_volume_chunks",
            "Chunks of the volume's cache by state: local (same as the region), dirty \
             (written here, not pushed yet), missing (not fetched yet); they add up to \
             r3map_node_volume_region_chunks",
            None,
            MetricType::Gauge,
        )?;
        for v in &self.volumes {
            let Some(p) = v.stats.as_ref().and_then(|s| s.managed.as_ref()) else {
                continue;
            };
            for (state, n) in [
                ("local", p.chunks_local),
                ("dirty", p.chunks_dirty),
                ("missing", p.chunks_missing),
            ] {
                let l = [("volume", esc(&v.volume)), ("state", Cow::Borrowed(state))];
                m.encode_family(&l)?.encode_gauge(&n)?;
            }
        }
        Ok(())
    }

    fn migration_phase(&self, enc: &mut DescriptorEncoder) -> Fmt {
        let mut m = enc.encode_descriptor(
            "r3map_node_volume_migration_phase",
            "1 for the phase of the volume's migration on this node (absent when none ran)",
            None,
            MetricType::Gauge,
        )?;
        for v in &self.volumes {
            if let Some(p) = &v.migration_phase {
                let l = [("volume", esc(&v.volume)), ("phase", esc(p))];
                m.encode_family(&l)?.encode_gauge(&1u64)?;
            }
        }
        Ok(())
    }
}

impl Collector for NodeCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Fmt {
        let e = &mut enc;
        let bytes = Some(&Unit::Bytes);
        let mut m = e.encode_descriptor(
            "r3map_node_staged_volumes",
            "Volumes staged on this node (recorded, served or not)",
            None,
            MetricType::Gauge,
        )?;
        m.encode_gauge(&(self.volumes.len() as u64))?;

        self.gauges(
            e,
            "r3map_node_volume_attached",
            "1 when the volume is served to its device, 0 when recorded but not served \
             (re-attach after a restart or an unstage failed)",
            None,
            |v| Some(u64::from(v.attached)),
        )?;
        self.gauges(
            e,
            "r3map_node_volume_fenced",
            "1 when the region service fenced this node off the volume's region",
            None,
            |v| Some(u64::from(v.fenced)),
        )?;
        self.gauges(
            e,
            "r3map_node_volume_epoch",
            "The fencing epoch this node holds for the volume's region",
            None,
            |v| Some(v.epoch),
        )?;
        self.gauges(
            e,
            "r3map_node_volume_size",
            "Size of the volume",
            bytes,
            |v| v.stats.as_ref().map(|s| s.size),
        )?;
        self.gauges(
            e,
            "r3map_node_volume_connections",
            "NBD connections being served (the kernel's sockets)",
            None,
            |v| v.stats.as_ref().map(|s| s.connections),
        )?;
        self.chunks(e)?;
        let managed = |v: &VolumeMetrics| v.stats.as_ref().and_then(|s| s.managed.clone());
        self.gauges(
            e,
            "r3map_node_volume_region_chunks",
            "Chunks of the volume's region",
            None,
            |v| managed(v).map(|p| p.chunks_total),
        )?;
        self.gauges(
            e,
            "r3map_node_volume_fetching_chunks",
            "Missing chunks being fetched now",
            None,
            |v| managed(v).map(|p| p.chunks_in_flight),
        )?;
        self.counters(
            e,
            "r3map_node_volume_pulled",
            "Bytes fetched from the region (or a migration source) into the cache",
            bytes,
            |s| s.managed.as_ref().map(|p| p.bytes_pulled),
        )?;
        self.counters(
            e,
            "r3map_node_volume_pushed",
            "Bytes pushed from the cache to the region",
            bytes,
            |s| s.managed.as_ref().map(|p| p.bytes_pushed),
        )?;
        self.counters(
            e,
            "r3map_node_volume_pushed_chunks",
            "Chunks pushed to the region",
            None,
            |s| s.managed.as_ref().map(|p| p.chunks_pushed),
        )?;
        self.counters(
            e,
            "r3map_node_volume_on_demand_fetches",
            "Chunk fetches started by a read or write rather than the background pull",
            None,
            |s| s.managed.as_ref().map(|p| p.on_demand_fetches),
        )?;
        self.counters(
            e,
            "r3map_node_volume_fetch_errors",
            "Failed chunk fetches (each retried)",
            None,
            |s| s.managed.as_ref().map(|p| p.fetch_errors),
        )?;
        self.counters(
            e,
            "r3map_node_volume_push_errors",
            "Failed chunk pushes (each retried)",
            None,
            |s| s.managed.as_ref().map(|p| p.push_errors),
        )?;
        self.per_command(
            e,
            "r3map_node_nbd_requests",
            "NBD requests answered, successfully or not, by command",
            None,
            |c| c.requests,
        )?;
        self.per_command(
            e,
            "r3map_node_nbd_request",
            "Bytes covered by successful NBD requests (read, written, trimmed, zeroed, \
             cached), by command",
            bytes,
            |c| c.bytes,
        )?;
        self.per_command(
            e,
            "r3map_node_nbd_errors",
            "NBD requests answered with an error, by command",
            None,
            |c| c.errors,
        )?;
        self.latency(e)?;
        self.migration_phase(e)?;
        self.gauges(
            e,
            "r3map_node_volume_migration_duration",
            "How long the volume's migration to this node has run, or took",
            Some(&Unit::Seconds),
            |v| v.migration_duration.map(|d| d.as_secs_f64()),
        )?;
        self.gauges(
            e,
            "r3map_node_volume_migration_present_chunks",
            "Chunks the migration target holds",
            None,
            |v| v.migration_chunks_present,
        )?;
        self.gauges(
            e,
            "r3map_node_volume_migration_region_chunks",
            "Chunks the migration moves in all",
            None,
            |v| v.migration_chunks_total,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_label_values() {
        assert_eq!(esc("pvc-1"), "pvc-1");
        assert_eq!(esc("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    /// A volume without engine stats (not served) still has its gauges,
    /// and every family is valid text.
    #[tokio::test]
    async fn unserved_and_migrating() {
        let v = VolumeMetrics {
            volume: "vol-b".into(),
            epoch: 7,
            migration_phase: Some("PostCopy".into()),
            migration_duration: Some(Duration::from_millis(1500)),
            migration_chunks_present: Some(3),
            migration_chunks_total: Some(16),
            ..VolumeMetrics::default()
        };
        let text = csi::metrics::Exporter::new(registry(vec![v]))
            .render()
            .await
            .unwrap();
        let e = csi::metrics::parse(&text).unwrap();
        let vol = [("volume", "vol-b")];
        assert_eq!(e.value("r3map_node_staged_volumes", &[]), Some(1.0));
        assert_eq!(e.value("r3map_node_volume_attached", &vol), Some(0.0));
        assert_eq!(e.value("r3map_node_volume_epoch", &vol), Some(7.0));
        assert_eq!(
            e.value(
                "r3map_node_volume_migration_phase",
                &[("volume", "vol-b"), ("phase", "PostCopy")]
            ),
            Some(1.0)
        );
        assert_eq!(
            e.value("r3map_node_volume_migration_duration_seconds", &vol),
            Some(1.5)
        );
        assert_eq!(e.samples("r3map_node_nbd_requests_total", &vol).count(), 0);
    }
}
