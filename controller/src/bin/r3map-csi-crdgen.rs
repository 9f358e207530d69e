//! `r3map-csi-crdgen`: prints the R3mapVolume CustomResourceDefinition as
//! YAML. The chart's copy is made with
//! `cargo run -p r3map-csi-controller --bin r3map-csi-crdgen > charts/r3map-csi/crds/r3mapvolumes.r3map.io.yaml`.

fn main() -> std::process::ExitCode {
    match r3map_csi_controller::crd::crd_yaml() {
        Ok(y) => {
            print!("{y}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("r3map-csi-crdgen: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
