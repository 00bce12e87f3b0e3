//! Compiles proto/*.proto with protox (pure Rust), so no machine needs protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = ["agent.proto", "control.proto", "raft.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={}", dir.join(f).display());
    }
    let fds = protox::compile(files, [&dir])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // Kept for server reflection, so `grpcurl` can list and call the services.
    std::fs::write(
        out.join("descriptors.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
