//! Generates the CSI gRPC code (server and client) from proto/csi.proto.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&["proto/csi.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
