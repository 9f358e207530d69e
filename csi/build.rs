//! Generates the CSI gRPC code (servers and clients) from proto/csi.proto,
//! the CSI v1 wire contract. The google/protobuf imports are
//! vendored beside it (from protobuf 3.21.12), so the build needs protoc
//! but not its include files; the well-known types map to prost-types.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&["proto/csi.proto", "proto/r3map_node.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
