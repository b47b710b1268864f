//! Compiles the `.proto` files with the protoc shipped inside the
//! `protoc-bin-vendored` crate, so a fresh machine needs nothing installed.
//! Messages are always generated; the gRPC clients and servers only with
//! the `grpc-client` and `grpc-server` features, so a crate that speaks the
//! client protocol alone compiles no gRPC code.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let client = std::env::var_os("CARGO_FEATURE_GRPC_CLIENT").is_some();
    let server = std::env::var_os("CARGO_FEATURE_GRPC_SERVER").is_some();
    let builder = || {
        tonic_prost_build::configure()
            .build_client(client)
            .build_server(server)
            // Clients are made over a channel the caller builds, so the
            // generated code needs no `tonic::transport`.
            .build_transport(false)
    };

    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(&protoc);
    // A media message is the largest content by far: boxed, it does not
    // size every Message (and every value that holds one) after it.
    config.boxed(".parley.v1.Content.body.media");
    builder()
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
    builder()
        .extern_path(".parley.v1", "crate::pb")
        .compile_with_config(
            config,
            &["proto/parley/internal/v1/internal.proto"],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
