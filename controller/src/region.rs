//! Reaching the region service: connection options from the command line,
//! or credentials from a request's CSI secrets, and the region id a
//! volume name maps to.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use r3map::auth::ClientTls;
use r3map::remote::client::{Client, ConnectOptions};
use tokio::sync::Mutex;

use csi::{Credentials, CsiError};

/// Prefix of every region id the controller makes.
pub const ID_PREFIX: &str = "csi-";

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// FNV-1a, 64 bits, from `seed`: stable across builds and Rust versions
/// (unlike `DefaultHasher`), which region ids must be.
fn fnv1a(seed: u64, data: &[u8]) -> u64 {
    let mut h = seed;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The region id of a volume name: `csi-` + up to 40 characters of the
/// name (others replaced by `-`) + `-` + 128 bits of hash of the whole
/// name. Deterministic, so a repeated CreateVolume finds its region; the
/// hash keeps names that sanitize alike apart. Always passes
/// `r3map::remote::check_id` (at most 77 characters).
pub fn region_id(name: &str) -> String {
    let readable: String = name
        .chars()
        .take(40)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let a = fnv1a(0xcbf2_9ce4_8422_2325, name.as_bytes());
    let b = fnv1a(0x84222325_cbf29ce4 ^ 0x9e37_79b9_7f4a_7c15, name.as_bytes());
    format!("{ID_PREFIX}{readable}-{a:016x}{b:016x}")
}

/// Connections to the region service, one per set of credentials.
pub struct Regions {
    base: ConnectOptions,
    creds_dir: PathBuf,
    clients: Mutex<HashMap<u64, Client>>,
}

impl Regions {
    /// Options from the command line; `creds_dir` holds credentials from
    /// secrets written out (mode 0600), as the engine's client reads files.
    pub fn new(base: ConnectOptions, creds_dir: PathBuf) -> Arc<Regions> {
        Arc::new(Regions {
            base,
            creds_dir,
            clients: Mutex::new(HashMap::new()),
        })
    }

    fn write_secret(dir: &Path, name: &str, value: &str) -> Result<PathBuf, CsiError> {
        let p = dir.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&p)
            .map_err(|e| CsiError::Internal(format!("writing credential {}: {e}", p.display())))?;
        f.write_all(value.as_bytes())
            .map_err(|e| CsiError::Internal(format!("writing credential {}: {e}", p.display())))?;
        Ok(p)
    }

    /// Options for `creds`: the command line's when empty; otherwise the
    /// secrets replace the token and TLS settings.
    fn options(&self, creds: &Credentials) -> Result<(u64, ConnectOptions), CsiError> {
        if creds.is_empty() {
            return Ok((0, self.base.clone()));
        }
        let mut key = String::new();
        for s in [&creds.token, &creds.ca, &creds.cert, &creds.key]
            .into_iter()
            .flatten()
        {
            key.push_str(s.expose());
            key.push('\0');
        }
        key.push_str(creds.server_name.as_deref().unwrap_or(""));
        let h = fnv1a(0xcbf2_9ce4_8422_2325, key.as_bytes()) | 1;
        let dir = self.creds_dir.join(format!("{h:016x}"));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| CsiError::Internal(format!("creating {}: {e}", dir.display())))?;
        let mut o = ConnectOptions::plain(self.base.addr.clone());
        if let Some(t) = &creds.token {
            o.token_file = Some(Self::write_secret(&dir, "token", t.expose())?);
        }
        if let Some(ca) = &creds.ca {
            let mut tls = ClientTls {
                ca: Self::write_secret(&dir, "ca.crt", ca.expose())?,
                server_name: creds.server_name.clone(),
                ..ClientTls::default()
            };
            if let (Some(c), Some(k)) = (&creds.cert, &creds.key) {
                tls.cert = Some(Self::write_secret(&dir, "tls.crt", c.expose())?);
                tls.key = Some(Self::write_secret(&dir, "tls.key", k.expose())?);
            }
            o.tls = Some(tls);
        }
        Ok((h, o))
    }

    /// A client for `creds` (connected once, then reused).
    pub async fn client(&self, creds: &Credentials) -> Result<Client, CsiError> {
        let (key, opts) = self.options(creds)?;
        let mut clients = self.clients.lock().await;
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let c = tokio::time::timeout(CONNECT_TIMEOUT, Client::connect(&opts))
            .await
            .map_err(|_| {
                CsiError::Unavailable(format!("region service {}: connect timed out", opts.addr))
            })?
            .map_err(|e| match e.code() {
                Some(code) => CsiError::from(tonic::Status::new(code, e.to_string())),
                None => CsiError::Unavailable(format!("region service {}: {e}", opts.addr)),
            })?;
        clients.insert(key, c.clone());
        Ok(c)
    }

    /// Whether the region service answers with the command line's options.
    pub async fn reachable(&self) -> bool {
        match self.client(&Credentials::default()).await {
            Ok(c) => tokio::time::timeout(CONNECT_TIMEOUT, c.list_regions())
                .await
                .is_ok_and(|r| r.is_ok()),
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_valid_deterministic_and_distinct() {
        for name in [
            "pvc-0a1b2c3d-1111-2222-3333-444455556666",
            "a/b",
            "a:b",
            "é",
            ".hidden",
            &"x".repeat(300),
            " ",
        ] {
            let id = region_id(name);
            r3map::remote::check_id(&id).unwrap();
            csi::validate::volume_id(&id).unwrap();
            assert_eq!(id, region_id(name));
        }
        assert_ne!(region_id("a/b"), region_id("a:b"));
        assert!(region_id("pvc-1").starts_with("csi-pvc-1-"));
    }
}
