//! Compiles the `.proto` files with the protoc shipped inside the
//! `protoc-bin-vendored` crate, so a fresh machine needs nothing installed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let protoc = protoc_bin_vendored::protoc_bin_path()?;

    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(&protoc);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("parley_descriptor.bin"))
        .compile_with_config(
            config,
            &[
                "proto/parley/v1/client.proto",
                "proto/parley/v1/admin.proto",
            ],
            &["proto"],
        )?;

    // The internal package refers to the public one's types, which live in
    // `crate::pb`.
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(&protoc);
    tonic_prost_build::configure()
        .extern_path(".parley.v1", "crate::pb")
        .compile_with_config(
            config,
            &["proto/parley/internal/v1/internal.proto"],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
