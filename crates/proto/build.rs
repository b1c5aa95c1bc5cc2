//! Compiles `proto/rekey/v1/*.proto` with protox (pure Rust), so a machine
//! without `protoc` can build rekey.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = ["rekey/v1/agent.proto", "rekey/v1/admin.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    let fds = protox::compile(files, [&root])?;
    tonic_prost_build::configure()
        // Secret material: Debug is written by hand so it can never print a value.
        .skip_debug(["rekey.v1.SecretField"])
        .compile_fds(fds)?;
    Ok(())
}
