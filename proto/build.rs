//! Compiles `denoised/v1/*.proto` with protox (pure Rust), so no system `protoc` is needed.
use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let fds = protox::compile(["denoised/v1/denoised.proto"], ["."])?;
    // The encoded descriptor set feeds the reflection service.
    fs::write(
        out.join("denoised_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure().compile_fds(fds)?;
    println!("cargo:rerun-if-changed=denoised");
    Ok(())
}
