//! `orchestrator package build|verify|keygen|sign`.

use anyhow::{Result, bail};
use orch_release::{Limits, TrustedKeys, package, signing, store};
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
        PackageCmd::Verify {
            file,
            sha256,
            trusted_keys,
        } => {
            let file_name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if parse_package_file_name(file_name).is_none() {
                bail!("package {file_name} refused: its file name is not <name>-<x.y.z>.zip");
            }
            let had_digest = sha256.is_some() || package::sidecar_path(&file).exists();
            // The signature first: with trusted keys an unsigned package is not even parsed.
            let signed = if trusted_keys.is_empty() {
                None
            } else {
                let trusted = TrustedKeys::load(&trusted_keys)?;
                Some(store::check_signature(&file, sha256.as_deref(), &trusted)?.1)
            };
            let info = package::verify(&file, sha256.as_deref(), None, &Limits::default())?;
            println!(
                "Package OK: {} {} ({} entries, {} bytes unpacked, sha256 {}{}{})",
                info.name,
                info.version,
                info.entries,
                info.uncompressed_bytes,
                info.sha256,
                if had_digest {
                    ", digest verified"
                } else {
                    ", no digest to check"
                },
                match signed {
                    Some(k) => format!(", signed by trusted key {k}"),
                    None => String::new(),
                }
            );
        }
        PackageCmd::Keygen { out } => {
            let (key, public, id) = signing::keygen(&out)?;
            println!("Created signing key {id}:");
            println!(
                "  private key: {} (mode 0600; keep it offline)",
                key.display()
            );
            println!(
                "  public key:  {} (give to agents and coordinators as --trusted-key)",
                public.display()
            );
        }
        PackageCmd::Sign { file, key } => {
            // Only sign what is a well-formed package: a signature vouches for its contents.
            let key = signing::SigningKey::load(&key)?;
            package::verify(&file, None, None, &Limits::default())?;
            let (sig, id) = signing::sign_file(&file, &key)?;
            println!("Signed {} with key {id}: {}", file.display(), sig.display());
        }
    }
    Ok(())
}
