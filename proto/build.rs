//! Compiles `xlb.proto` with protox (pure Rust: the build host has no `protoc`) and writes
//! the tonic/prost code and the encoded file descriptor set that gRPC reflection serves.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=xlb.proto");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let fds = protox::compile([manifest.join("xlb.proto")], [&manifest])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("xlb_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
