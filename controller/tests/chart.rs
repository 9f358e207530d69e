//! The Helm chart without Helm: its plain YAML files (Chart.yaml,
//! values.yaml, crds/, examples/) parse and carry the fields Kubernetes
//! and the driver rely on, the CRD matches the one the code generates, and
//! the templates keep the settings that protect the data path.

use std::path::{Path, PathBuf};

use serde_yaml::Value;

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/r3map-csi")
}

fn load(rel: &str) -> Value {
    let p = chart().join(rel);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn s<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    let mut cur = v;
    for k in path {
        cur = &cur[*k];
    }
    cur.as_str()
        .unwrap_or_else(|| panic!("{path:?} is not a string: {cur:?}"))
}

const REGEN: &str = "cargo run -p r3map-csi-controller --bin r3map-csi-crdgen > charts/r3map-csi/crds/r3mapvolumes.r3map.io.yaml";

#[test]
fn crd_file_matches_the_generated_one() {
    let want = r3map_csi_controller::crd::crd_yaml().unwrap();
    let p = chart().join("crds/r3mapvolumes.r3map.io.yaml");
    let have = std::fs::read_to_string(&p).unwrap_or_default();
    assert!(
        have == want,
        "{} differs from the CRD the code generates; regenerate it with\n  {REGEN}",
        p.display()
    );
    let v = load("crds/r3mapvolumes.r3map.io.yaml");
    assert_eq!(s(&v, &["kind"]), "CustomResourceDefinition");
    assert_eq!(s(&v, &["metadata", "name"]), "r3mapvolumes.r3map.io");
    assert_eq!(s(&v, &["spec", "scope"]), "Cluster");
}

#[test]
fn chart_and_values_parse_with_the_expected_keys() {
    let c = load("Chart.yaml");
    assert_eq!(s(&c, &["apiVersion"]), "v2");
    assert_eq!(s(&c, &["name"]), "r3map-csi");
    assert!(!s(&c, &["version"]).is_empty());
    let v = load("values.yaml");
    assert_eq!(s(&v, &["driverName"]), "r3map.csi.r3map.io");
    assert_eq!(s(&v, &["node", "kubeletDir"]), "/var/lib/kubelet");
    assert_eq!(s(&v, &["controller", "records"]), "kubernetes");
    for (side, tag) in [
        ("provisioner", ":v6.3."),
        ("attacher", ":v4.12."),
        ("resizer", ":v2.2."),
        ("livenessProbe", ":v2.19."),
        ("nodeDriverRegistrar", ":v2.17."),
    ] {
        let img = s(&v, &["sidecars", side, "image"]);
        assert!(img.contains(tag), "{side}: {img}");
    }
    // The example StorageClass parameters are ones CreateVolume accepts.
    let params: std::collections::HashMap<String, String> =
        serde_yaml::from_value(v["storageClass"]["parameters"].clone()).unwrap();
    csi::Params::from_map(&params).unwrap();
}

#[test]
fn examples_are_a_block_claim_a_device_pod_and_a_valid_storage_class() {
    let sc = load("examples/storageclass.yaml");
    assert_eq!(s(&sc, &["provisioner"]), "r3map.csi.r3map.io");
    let params: std::collections::HashMap<String, String> =
        serde_yaml::from_value(sc["parameters"].clone()).unwrap();
    csi::Params::from_map(&params).unwrap();
    let pvc = load("examples/pvc.yaml");
    assert_eq!(s(&pvc, &["spec", "volumeMode"]), "Block");
    assert_eq!(
        s(&pvc, &["spec", "storageClassName"]),
        s(&sc, &["metadata", "name"])
    );
    let pod = load("examples/pod.yaml");
    let dev = &pod["spec"]["containers"][0]["volumeDevices"][0];
    assert_eq!(dev["name"], pod["spec"]["volumes"][0]["name"]);
    let claim = pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"].as_str();
    assert_eq!(claim, Some(s(&pvc, &["metadata", "name"])));
}

#[test]
fn templates_keep_the_data_path_safe() {
    let read = |f: &str| std::fs::read_to_string(chart().join("templates").join(f)).unwrap();
    let node = read("node.yaml");
    assert!(
        node.contains("type: OnDelete"),
        "node DaemonSet must not roll"
    );
    assert!(node.contains("mountPropagation: Bidirectional"));
    assert!(node.contains("privileged: true"));
    let drv = read("csidriver.yaml");
    for want in [
        "attachRequired: true",
        "podInfoOnMount: false",
        "fsGroupPolicy: None",
        "- Persistent",
    ] {
        assert!(drv.contains(want), "CSIDriver lacks {want}");
    }
    let ctl = read("controller.yaml");
    assert_eq!(ctl.matches("- --leader-election\n").count(), 4, "{ctl}");
    let rbac = read("rbac.yaml");
    assert!(rbac.contains("r3mapvolumes/status"));
    assert!(rbac.contains("coordination.k8s.io"));
}
