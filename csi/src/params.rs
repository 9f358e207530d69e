//! StorageClass parameters, parsed into [`Params`], and their round trip
//! through a volume's `volume_context` (the controller puts them there so
//! the node plugin gets them without asking the controller).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use r3map::managed::{
    Durability, DEFAULT_CHUNK_SIZE, DEFAULT_PULL_WORKERS, DEFAULT_PUSH_INTERVAL,
    DEFAULT_PUSH_WORKERS,
};

use crate::CsiError;

/// StorageClass key: chunk size of the managed mount, e.g. `1MiB`.
pub const CHUNK_SIZE: &str = "chunkSize";
/// StorageClass key: background pull workers.
pub const PULL_WORKERS: &str = "pullWorkers";
/// StorageClass key: background push workers.
pub const PUSH_WORKERS: &str = "pushWorkers";
/// StorageClass key: interval between background pushes, e.g. `20s`.
pub const PUSH_INTERVAL: &str = "pushInterval";
/// StorageClass key: `flush` (a flush reaches the region service) or `async`.
pub const DURABILITY: &str = "durability";
/// Every key [`Params::parse`] accepts.
pub const KEYS: &[&str] = &[
    CHUNK_SIZE,
    PULL_WORKERS,
    PUSH_WORKERS,
    PUSH_INTERVAL,
    DURABILITY,
];

/// Prefix the external-provisioner reserves; its keys never reach us, but
/// a `csi.storage.k8s.io/...` key that does (e.g. secret names passed in
/// by the sidecar) is not ours to refuse.
const RESERVED_PREFIX: &str = "csi.storage.k8s.io/";

/// Largest worker count accepted: more only costs memory.
pub const MAX_WORKERS: usize = 65536;

/// Tuning of a volume's managed mount, from its StorageClass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    /// Chunk size in bytes: a power of two from 4 KiB to 64 MiB.
    pub chunk_size: u64,
    /// Background pull workers (0 pulls only on demand).
    pub pull_workers: usize,
    /// Background push workers (at least 1).
    pub push_workers: usize,
    /// Interval between background pushes (at least 1 s).
    pub push_interval: Duration,
    /// What a flush promises.
    pub durability: Durability,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            chunk_size: DEFAULT_CHUNK_SIZE,
            pull_workers: DEFAULT_PULL_WORKERS,
            push_workers: DEFAULT_PUSH_WORKERS,
            push_interval: DEFAULT_PUSH_INTERVAL,
            durability: Durability::Flush,
        }
    }
}

fn bad(key: &str, value: &str, why: impl std::fmt::Display) -> CsiError {
    CsiError::InvalidArgument(format!("parameter {key}={value:?}: {why}"))
}

fn workers(key: &str, v: &str, min: usize) -> Result<usize, CsiError> {
    let n: usize = v
        .trim()
        .parse()
        .map_err(|_| bad(key, v, "not a whole number"))?;
    if n < min || n > MAX_WORKERS {
        return Err(bad(key, v, format!("must be {min} to {MAX_WORKERS}")));
    }
    Ok(n)
}

impl Params {
    /// Parses StorageClass parameters (or a volume context); absent keys
    /// take the engine's defaults. Unknown keys and bad values are
    /// INVALID_ARGUMENT naming the key and the value.
    pub fn parse<'a, I>(map: I) -> Result<Params, CsiError>
    where
        I: IntoIterator<Item = (&'a String, &'a String)>,
    {
        let mut p = Params::default();
        for (k, v) in map {
            match k.as_str() {
                CHUNK_SIZE => {
                    let n = r3map::size::parse(v).map_err(|e| bad(k, v, e))?;
                    if !n.is_power_of_two() || !(4096..=64 << 20).contains(&n) {
                        return Err(bad(k, v, "must be a power of two from 4KiB to 64MiB"));
                    }
                    p.chunk_size = n;
                }
                PULL_WORKERS => p.pull_workers = workers(k, v, 0)?,
                PUSH_WORKERS => p.push_workers = workers(k, v, 1)?,
                PUSH_INTERVAL => {
                    let d = humantime::parse_duration(v.trim()).map_err(|e| bad(k, v, e))?;
                    if d < Duration::from_secs(1) {
                        return Err(bad(k, v, "must be at least 1s"));
                    }
                    p.push_interval = d;
                }
                DURABILITY => {
                    p.durability = match v.trim() {
                        "flush" => Durability::Flush,
                        "async" => Durability::Async,
                        _ => return Err(bad(k, v, "must be flush or async")),
                    }
                }
                _ if k.starts_with(RESERVED_PREFIX) => {}
                _ => {
                    return Err(CsiError::InvalidArgument(format!(
                        "unknown parameter {k}={v:?}; known: {}",
                        KEYS.join(", ")
                    )))
                }
            }
        }
        Ok(p)
    }

    /// Parses the parameters a CreateVolumeRequest carries.
    pub fn from_map(map: &HashMap<String, String>) -> Result<Params, CsiError> {
        Params::parse(map)
    }

    /// Every parameter, explicit, in canonical form: what the controller
    /// returns in `volume_context` and stores.
    pub fn to_context(&self) -> BTreeMap<String, String> {
        let d = match self.durability {
            Durability::Flush => "flush",
            Durability::Async => "async",
        };
        BTreeMap::from([
            (CHUNK_SIZE.to_string(), self.chunk_size.to_string()),
            (PULL_WORKERS.to_string(), self.pull_workers.to_string()),
            (PUSH_WORKERS.to_string(), self.push_workers.to_string()),
            (
                PUSH_INTERVAL.to_string(),
                humantime::format_duration(self.push_interval).to_string(),
            ),
            (DURABILITY.to_string(), d.to_string()),
        ])
    }

    /// The parameters from a `volume_context` made by [`Params::to_context`],
    /// ignoring the keys that are not parameters (e.g. the region id).
    pub fn from_context(ctx: &HashMap<String, String>) -> Result<Params, CsiError> {
        Params::parse(ctx.iter().filter(|(k, _)| KEYS.contains(&k.as_str())))
    }

    /// The engine's tuning for a managed mount of this volume.
    pub fn managed_options(&self) -> r3map::managed::Options {
        r3map::managed::Options {
            chunk_size: self.chunk_size,
            pull_workers: self.pull_workers,
            push_workers: self.push_workers,
            push_interval: self.push_interval,
            durability: self.durability,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults() {
        let p = Params::from_map(&HashMap::new()).unwrap();
        assert_eq!(p, Params::default());
        assert_eq!(p.chunk_size, DEFAULT_CHUNK_SIZE);
        assert_eq!(p.push_interval, DEFAULT_PUSH_INTERVAL);
    }

    #[test]
    fn parses_every_key() {
        let p = Params::from_map(&map(&[
            ("chunkSize", "256KiB"),
            ("pullWorkers", "0"),
            ("pushWorkers", "4"),
            ("pushInterval", "1m 5s"),
            ("durability", "async"),
            ("csi.storage.k8s.io/pv/name", "pv1"),
        ]))
        .unwrap();
        assert_eq!(p.chunk_size, 256 << 10);
        assert_eq!(p.pull_workers, 0);
        assert_eq!(p.push_workers, 4);
        assert_eq!(p.push_interval, Duration::from_secs(65));
        assert_eq!(p.durability, Durability::Async);
        assert_eq!(p.managed_options().chunk_size, 256 << 10);
    }

    #[test]
    fn bad_values_name_key_and_value() {
        for (k, v) in [
            ("chunkSize", "lots"),
            ("chunkSize", "3000"),
            ("chunkSize", "1GiB"),
            ("pullWorkers", "-1"),
            ("pushWorkers", "0"),
            ("pushWorkers", "many"),
            ("pushInterval", "soon"),
            ("pushInterval", "10ms"),
            ("durability", "sometimes"),
            ("colour", "blue"),
        ] {
            let e = Params::from_map(&map(&[(k, v)])).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            let m = e.to_string();
            assert!(m.contains(k) && m.contains(v), "{m}");
        }
    }

    #[test]
    fn context_round_trip() {
        let p = Params::from_map(&map(&[("chunkSize", "64KiB"), ("pushInterval", "90s")])).unwrap();
        let mut ctx: HashMap<String, String> = p.to_context().into_iter().collect();
        ctx.insert("regionId".into(), "csi-x".into());
        let q = Params::from_context(&ctx).unwrap();
        assert_eq!(p, q);
        // Canonical: a second round gives the same map.
        assert_eq!(q.to_context(), p.to_context());
        assert_eq!(ctx["pushInterval"], "1m 30s");
    }
}
