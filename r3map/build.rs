//! Generates the gRPC code from r3map/proto/*.proto (needs protoc).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // `bytes` fields decode as `Bytes`, slices of the received buffer,
    // instead of a fresh Vec each: one copy less per byte of chunk data.
    tonic_build::configure()
        .bytes(["."])
        .compile_protos(&["proto/migration.proto", "proto/remote.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
