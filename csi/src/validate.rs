//! Argument checks shared by both plugins, each failing with a clear
//! INVALID_ARGUMENT.

use std::path::{Component, Path};

use crate::CsiError;

/// Longest volume or node id (the CSI spec's string size limit).
pub const MAX_ID_LEN: usize = 128;

/// The kubelet's directory, the usual allowed root of staging and target
/// paths.
pub const KUBELET_DIR: &str = "/var/lib/kubelet";

fn invalid(msg: String) -> CsiError {
    CsiError::InvalidArgument(msg)
}

/// A REQUIRED string field: present (non-empty).
pub fn required<'a>(field: &str, value: &'a str) -> Result<&'a str, CsiError> {
    if value.is_empty() {
        return Err(invalid(format!("{field} is required")));
    }
    Ok(value)
}

fn id(field: &str, value: &str, extra: &[u8]) -> Result<(), CsiError> {
    required(field, value)?;
    if value.len() > MAX_ID_LEN {
        return Err(invalid(format!(
            "{field} is {} bytes long; at most {MAX_ID_LEN}",
            value.len()
        )));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || c.is_ascii() && extra.contains(&(*c as u8))))
    {
        return Err(invalid(format!(
            "{field} {value:?} has the character {c:?}; use A-Z a-z 0-9 and {}",
            String::from_utf8_lossy(extra)
        )));
    }
    if value.starts_with('.') {
        return Err(invalid(format!("{field} {value:?} starts with '.'")));
    }
    Ok(())
}

/// A volume id: 1 to 128 of `A-Z a-z 0-9 . _ -`, not starting with `.`
/// (the rules of r3map region ids, which volume ids are).
pub fn volume_id(value: &str) -> Result<(), CsiError> {
    id("volume_id", value, b"._-")
}

/// A node id: 1 to 128 of `A-Z a-z 0-9 . _ -`, not starting with `.`
/// (Kubernetes node names are DNS subdomains, which fit). Whether the node
/// exists cannot be known without Kubernetes; only the syntax is checked.
pub fn node_id(value: &str) -> Result<(), CsiError> {
    id("node_id", value, b"._-")
}

/// A path from the CO: absolute, without `.` or `..` components, and
/// under one of `roots` (e.g. [`KUBELET_DIR`]).
pub fn path_under(field: &str, value: &str, roots: &[&Path]) -> Result<(), CsiError> {
    required(field, value)?;
    if value.contains('\0') {
        return Err(invalid(format!("{field} contains a NUL byte")));
    }
    let p = Path::new(value);
    if !p.is_absolute() {
        return Err(invalid(format!("{field} {value:?} is not absolute")));
    }
    if value.split('/').any(|c| c == ".." || c == ".")
        || p.components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return Err(invalid(format!(
            "{field} {value:?} has a '..' or '.' component"
        )));
    }
    if !roots.iter().any(|r| p.starts_with(r) && p != *r) {
        return Err(invalid(format!(
            "{field} {value:?} is not under {}",
            roots
                .iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(" or ")
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for ok in ["csi-pvc-1a2b", "node-1.example.com", "a", &"x".repeat(128)] {
            volume_id(ok).unwrap();
            node_id(ok).unwrap();
        }
        for (bad, why) in [
            ("", "required"),
            (&"x".repeat(129) as &str, "at most"),
            ("a/b", "character"),
            ("a b", "character"),
            ("é", "character"),
            (".hidden", "starts with"),
        ] {
            let e = volume_id(bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.to_string().contains(why), "{bad}: {e}");
            assert!(node_id(bad).unwrap_err().to_string().contains("node_id"));
        }
    }

    #[test]
    fn paths() {
        let roots = [Path::new(KUBELET_DIR)];
        path_under(
            "target_path",
            "/var/lib/kubelet/plugins/kubernetes.io/csi/volumeDevices/publish/pv/pod",
            &roots,
        )
        .unwrap();
        for (bad, why) in [
            ("", "required"),
            ("var/lib/kubelet/x", "absolute"),
            ("/var/lib/kubelet/../etc/passwd", ".."),
            ("/var/lib/kubelet/./x", ".."),
            ("/etc/passwd", "not under"),
            ("/var/lib/kubeletX/y", "not under"),
            ("/var/lib/kubelet", "not under"),
            ("/var/lib/kubelet/a\0b", "NUL"),
        ] {
            let e = path_under("target_path", bad, &roots).unwrap_err();
            assert!(e.to_string().contains(why), "{bad:?}: {e}");
            assert!(e.to_string().contains("target_path"));
        }
    }
}
