//! `orchestrator package build|verify`.

use anyhow::{Result, bail};
use orch_release::{Limits, package};
use orch_types::parse_package_file_name;

use crate::args::PackageCmd;

pub fn run(cmd: PackageCmd) -> Result<()> {
    match cmd {
        PackageCmd::Build {
            dir,
            name,
            version,
            out,
        } => {
            let (zip, digest) = package::build(&dir, &name, version, &out)?;
            println!("Built package: {}", zip.display());
            println!("sha256: {digest}");
        }
        PackageCmd::Verify { file, sha256 } => {
            let file_name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if parse_package_file_name(file_name).is_none() {
                bail!("package {file_name} refused: its file name is not <name>-<x.y.z>.zip");
            }
            let had_digest = sha256.is_some() || package::sidecar_path(&file).exists();
            let info = package::verify(&file, sha256.as_deref(), None, &Limits::default())?;
            println!(
                "Package OK: {} {} ({} entries, {} bytes unpacked, sha256 {}{})",
                info.name,
                info.version,
                info.entries,
                info.uncompressed_bytes,
                info.sha256,
                if had_digest {
                    ", digest verified"
                } else {
                    ", no digest to check"
                }
            );
        }
    }
    Ok(())
}
