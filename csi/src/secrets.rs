//! Credentials for the region service, taken only from the CSI `secrets`
//! map of a request (filled by the sidecars from the StorageClass's
//! `csi.storage.k8s.io/provisioner-secret-*` or `node-stage-secret-*`),
//! never from a volume context. Their Debug output never shows a value.

use std::collections::HashMap;
use std::fmt;

use crate::CsiError;

/// Secret key: bearer token of the region service.
pub const TOKEN: &str = "token";
/// Secret key: PEM of the CA the region service's certificate chains to.
pub const CA: &str = "ca.crt";
/// Secret key: PEM client certificate (mutual TLS).
pub const CERT: &str = "tls.crt";
/// Secret key: PEM client key (mutual TLS).
pub const KEY: &str = "tls.key";
/// Secret key: name the region service's certificate carries.
pub const SERVER_NAME: &str = "serverName";

/// One secret value; prints as `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The value, for the code that must use it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Region-service credentials from a request's secrets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// Bearer token.
    pub token: Option<Secret>,
    /// CA PEM: TLS to the region service when present.
    pub ca: Option<Secret>,
    /// Client certificate PEM.
    pub cert: Option<Secret>,
    /// Client key PEM.
    pub key: Option<Secret>,
    /// TLS server name, when not the host dialled (not secret, but kept
    /// with the rest).
    pub server_name: Option<String>,
}

impl Credentials {
    /// Reads the known keys of a `secrets` map. Unknown keys are refused
    /// (INVALID_ARGUMENT, naming the key, never the value), as are a
    /// certificate without its key, or either without a CA.
    pub fn from_secrets(secrets: &HashMap<String, String>) -> Result<Credentials, CsiError> {
        let mut c = Credentials::default();
        for (k, v) in secrets {
            let s = Some(Secret(v.clone()));
            match k.as_str() {
                TOKEN => c.token = s,
                CA => c.ca = s,
                CERT => c.cert = s,
                KEY => c.key = s,
                SERVER_NAME => c.server_name = Some(v.clone()),
                _ => {
                    return Err(CsiError::InvalidArgument(format!(
                    "unknown secret key {k:?}; known: {TOKEN}, {CA}, {CERT}, {KEY}, {SERVER_NAME}"
                )))
                }
            }
        }
        if c.cert.is_some() != c.key.is_some() {
            return Err(CsiError::InvalidArgument(format!(
                "secrets {CERT} and {KEY} go together"
            )));
        }
        if (c.cert.is_some() || c.server_name.is_some()) && c.ca.is_none() {
            return Err(CsiError::InvalidArgument(format!(
                "secrets {CERT}/{KEY}/{SERVER_NAME} need {CA} (TLS)"
            )));
        }
        Ok(c)
    }

    /// Whether no credential was given.
    pub fn is_empty(&self) -> bool {
        self == &Credentials::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET_TOKEN: &str = "tok-0123456789abcdef-SECRET";
    const SECRET_KEY: &str = "-----BEGIN PRIVATE KEY-----\nSECRETKEYBYTES\n";

    fn all() -> HashMap<String, String> {
        HashMap::from([
            (TOKEN.to_string(), SECRET_TOKEN.to_string()),
            (CA.to_string(), "CA-PEM-SECRET".to_string()),
            (CERT.to_string(), "CERT-PEM-SECRET".to_string()),
            (KEY.to_string(), SECRET_KEY.to_string()),
        ])
    }

    #[test]
    fn parsed() {
        let c = Credentials::from_secrets(&all()).unwrap();
        assert_eq!(c.token.as_ref().unwrap().expose(), SECRET_TOKEN);
        assert_eq!(c.key.as_ref().unwrap().expose(), SECRET_KEY);
        assert!(!c.is_empty());
        assert!(Credentials::from_secrets(&HashMap::new())
            .unwrap()
            .is_empty());
    }

    #[test]
    fn debug_never_shows_a_secret() {
        let c = Credentials::from_secrets(&all()).unwrap();
        for s in [format!("{c:?}"), format!("{c:#?}")] {
            for v in all().values() {
                assert!(!s.contains(v.as_str()), "{s}");
            }
            assert!(!s.contains("SECRET"), "{s}");
            assert!(s.contains("<redacted>"), "{s}");
        }
    }

    #[test]
    fn refused() {
        let mut m = all();
        m.insert("password".into(), "hunter2-SECRET".into());
        let e = Credentials::from_secrets(&m).unwrap_err().to_string();
        assert!(e.contains("password") && !e.contains("hunter2"), "{e}");
        let mut m = all();
        m.remove(KEY);
        assert!(Credentials::from_secrets(&m).is_err());
        let mut m = all();
        m.remove(CA);
        assert!(Credentials::from_secrets(&m).is_err());
    }
}
