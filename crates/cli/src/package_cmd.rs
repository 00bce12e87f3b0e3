//! `orchestrator package build|verify|keygen|sign`.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use orch_release::{Limits, TrustedKeys, package, signing, store};
use orch_types::parse_package_file_name;

use serde_json::json;

use crate::args::{GlobalOpts, PackageCmd};

pub fn run(cmd: PackageCmd, g: &GlobalOpts) -> Result<()> {
    let json = g.json;
    match cmd {
        PackageCmd::Build {
            dir,
            name,
            version,
            out,
        } => {
            let (zip, digest) = package::build(&dir, &name, version, &out)?;
            if json {
                println!("{}", json!({"package": zip, "sha256": digest}));
            } else {
                println!("Built package: {}", zip.display());
                println!("sha256: {digest}");
            }
        }
        PackageCmd::Verify {
            file,
            sha256,
            trusted_keys,
        } => verify(&file, sha256.as_deref(), &trusted_keys, json)?,
        PackageCmd::Keygen { out } => {
            let (key, public, id) = signing::keygen(&out)?;
            if json {
                let v = json!({"key_id": id.to_string(), "private_key": key, "public_key": public});
                println!("{v}");
                return Ok(());
            }
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
            if json {
                println!("{}", json!({"signature": sig, "key_id": id.to_string()}));
                return Ok(());
            }
            println!("Signed {} with key {id}: {}", file.display(), sig.display());
        }
    }
    Ok(())
}

/// `package verify`: the signature first (with trusted keys an unsigned package is not even
/// parsed), then digest, structure, limits and manifest.
fn verify(file: &Path, sha256: Option<&str>, trusted_keys: &[PathBuf], json: bool) -> Result<()> {
    let file_name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if parse_package_file_name(file_name).is_none() {
        bail!("package {file_name} refused: its file name is not <name>-<x.y.z>.zip");
    }
    let had_digest = sha256.is_some() || package::sidecar_path(file).exists();
    // The signature first: with trusted keys an unsigned package is not even parsed.
    let signed = if trusted_keys.is_empty() {
        None
    } else {
        let trusted = TrustedKeys::load(trusted_keys)?;
        Some(store::check_signature(file, sha256, &trusted)?.1)
    };
    let info = package::verify(file, sha256, None, &Limits::default())?;
    if json {
        let v = json!({
            "name": info.name,
            "version": info.version.to_string(),
            "entries": info.entries,
            "uncompressed_bytes": info.uncompressed_bytes,
            "size": info.size,
            "sha256": info.sha256,
            "digest_verified": had_digest,
            "signed_by": signed.map(|k| k.to_string()),
        });
        println!("{v}");
        return Ok(());
    }
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
    Ok(())
}
