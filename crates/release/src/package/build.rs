//! Building a package from a directory (`orchestrator package build`).

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use orch_types::{Version, validate_package_name};

use super::{MANIFEST, parse_manifest, sha256_file, sidecar_path};
use orch_package::error::IoContext;

use crate::error::{Error, Result};
use crate::fsutil::{unique_suffix, write_atomic};

/// Builds `<out>/<name>-<version>.zip` and its `.sha256` from a directory. A `release.toml` in
/// the directory must agree with name and version; without one, it is generated. File modes are
/// kept (so `hooks/activate` stays executable); links and special files are refused.
///
/// The zip is deterministic: entries in path order, every time stamp 1980-01-01 00:00 (the
/// files' own times and the build's are left out), one compression level. The same directory
/// gives the same bytes, and two builds of releases that share files share those entries'
/// bytes, so that content-defined chunks of consecutive builds match.
pub fn build(src: &Path, name: &str, version: Version, out: &Path) -> Result<(PathBuf, String)> {
    validate_package_name(name).map_err(|e| Error::refused(e.to_string()))?;
    let meta = fs::metadata(src).ctx("read", src)?;
    if !meta.is_dir() {
        return Err(Error::refused(format!(
            "{} is not a directory",
            src.display()
        )));
    }
    let manifest_path = src.join(MANIFEST);
    let manifest = match fs::read_to_string(&manifest_path) {
        Ok(text) => {
            let (n, v) = parse_manifest(&text).map_err(|e| Error::refused(e.to_string()))?;
            if n != name || v != version {
                return Err(Error::refused(format!(
                    "{} says {n} {v}, but --name {name} --version {version} was given",
                    manifest_path.display()
                )));
            }
            None
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Some(format!("name = \"{name}\"\nversion = \"{version}\"\n"))
        }
        Err(e) => return Err(e).ctx("read", &manifest_path).map_err(Error::from),
    };
    let mut files = Vec::new();
    walk(src, Path::new(""), &mut files)?;
    files.sort();

    fs::create_dir_all(out).ctx("create", out)?;
    let zip_name = format!("{name}-{version}.zip");
    let zip_path = out.join(&zip_name);
    let tmp = out.join(format!(".{zip_name}.tmp-{}", unique_suffix()));
    let result = (|| {
        let f = File::create(&tmp).ctx("create", &tmp)?;
        let mut w = zip::ZipWriter::new(BufWriter::new(f));
        let zerr = |e: zip::result::ZipError| Error::Io {
            op: "write zip",
            path: tmp.clone(),
            source: io::Error::other(e),
        };
        let base = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .compression_level(Some(6))
            .last_modified_time(zip::DateTime::default())
            .large_file(false);
        if let Some(m) = &manifest {
            w.start_file(MANIFEST, base.unix_permissions(0o644))
                .map_err(zerr)?;
            w.write_all(m.as_bytes()).ctx("write", &tmp)?;
        }
        for (rel, is_dir, mode, len) in &files {
            let zname = rel.to_string_lossy().replace('\\', "/");
            if *is_dir {
                w.add_directory(format!("{zname}/"), base.unix_permissions(*mode))
                    .map_err(zerr)?;
            } else {
                let opts = base
                    .unix_permissions(*mode)
                    .large_file(*len >= u32::MAX as u64);
                w.start_file(zname, opts).map_err(zerr)?;
                let path = src.join(rel);
                let mut input = File::open(&path).ctx("open", &path)?;
                io::copy(&mut input, &mut w).ctx("read", &path)?;
            }
        }
        let mut inner = w.finish().map_err(zerr)?;
        inner.flush().ctx("write", &tmp)?;
        let f = inner
            .into_inner()
            .map_err(|e| e.into_error())
            .ctx("write", &tmp)?;
        f.sync_all().ctx("fsync", &tmp)?;
        fs::rename(&tmp, &zip_path).ctx("rename into place", &zip_path)?;
        let (digest, _) = sha256_file(&zip_path)?;
        write_atomic(
            &sidecar_path(&zip_path),
            format!("{digest}  {zip_name}\n").as_bytes(),
        )?;
        Ok((zip_path.clone(), digest))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

type WalkEntry = (PathBuf, bool, u32, u64);

fn walk(root: &Path, rel: &Path, out: &mut Vec<WalkEntry>) -> Result<()> {
    let dir = root.join(rel);
    for entry in fs::read_dir(&dir).ctx("read directory", &dir)? {
        let entry = entry.ctx("read directory", &dir)?;
        let path = entry.path();
        let meta = fs::symlink_metadata(&path).ctx("stat", &path)?;
        let child = rel.join(entry.file_name());
        let mode = meta.permissions().mode() & 0o755;
        if meta.file_type().is_symlink() {
            return Err(Error::refused(format!(
                "{} is a symbolic link; packages may only hold regular files and directories",
                path.display()
            )));
        } else if meta.is_dir() {
            out.push((child.clone(), true, mode | 0o700, 0));
            walk(root, &child, out)?;
        } else if meta.is_file() {
            out.push((child, false, mode | 0o600, meta.len()));
        } else {
            return Err(Error::refused(format!(
                "{} is not a regular file; packages may only hold regular files and directories",
                path.display()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_directory_builds_the_same_bytes_whatever_the_file_times() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir_all(src.join("bin")).unwrap();
        fs::write(src.join("bin/app"), b"binary".repeat(1000)).unwrap();
        fs::write(src.join("config.toml"), b"a = 1\n").unwrap();
        let v: Version = "1.2.3".parse().unwrap();
        let (first, d1) = build(&src, "app", v, &tmp.path().join("one")).unwrap();
        // Other modification times on every file: the zip must not carry them.
        let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        for f in ["bin/app", "config.toml"] {
            File::options()
                .write(true)
                .open(src.join(f))
                .unwrap()
                .set_modified(old)
                .unwrap();
        }
        let (second, d2) = build(&src, "app", v, &tmp.path().join("two")).unwrap();
        assert_eq!(d1, d2);
        assert_eq!(fs::read(&first).unwrap(), fs::read(&second).unwrap());
        // Every entry's time is the fixed one, not the build's (which tests in the same two
        // seconds could not tell apart from it otherwise).
        let mut z = zip::ZipArchive::new(File::open(&first).unwrap()).unwrap();
        for i in 0..z.len() {
            let e = z.by_index(i).unwrap();
            assert_eq!(
                e.last_modified(),
                Some(zip::DateTime::default()),
                "{:?}",
                e.name()
            );
        }
    }
}
