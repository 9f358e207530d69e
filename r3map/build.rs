//! Generates the gRPC code from r3map/proto/*.proto (needs protoc).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_build::compile_protos("proto/migration.proto")?;
    tonic_build::compile_protos("proto/remote.proto")?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
