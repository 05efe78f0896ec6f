//! Compiles `proto/*.proto` with protox (a pure-Rust protobuf compiler, so no
//! system `protoc` is needed) and generates prost messages plus tonic clients
//! and servers from the resulting descriptor set.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "compute_driver.proto",
    "extension.proto",
    "sandbox.proto",
    "compute_logs.proto",
    "gateway.proto",
    "options.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let proto_dir = manifest_dir.join("../../proto");
    for file in PROTOS {
        println!("cargo:rerun-if-changed={}", proto_dir.join(file).display());
    }

    let mut compiler = protox::Compiler::new([&proto_dir])?;
    compiler
        .include_imports(true)
        .include_source_info(true)
        .open_files(PROTOS)?;
    // The encoded form keeps extension options such as `secret`, which the
    // prost_types structs drop; codegen itself only needs the structs.
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("descriptor_set.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    let fds = compiler.file_descriptor_set();

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .emit_rerun_if_changed(false)
        .compile_fds(fds)?;
    Ok(())
}
