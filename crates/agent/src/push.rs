//! Receiving a pushed package: written to a temp file in `ROOT/releases/` while hashing, checked
//! against the header's size and digest, then renamed into place with its `.sha256` beside it.
//! Any mismatch or truncation discards the file.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use orch_release::fsutil::{fsync_dir, write_atomic};
use orch_release::package::{hex, normalize_digest, sha256_file, sidecar_path};
use orch_types::{Version, validate_package_name};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// A validated push header.
#[derive(Debug, Clone)]
pub struct Header {
    pub name: String,
    pub version: Version,
    pub sha256: String,
    pub size: u64,
}

impl Header {
    pub fn validate(
        name: &str,
        version: &str,
        sha256: &str,
        size: u64,
        max: u64,
    ) -> Result<Header> {
        validate_package_name(name).map_err(|e| Error::BadRequest(e.to_string()))?;
        let version = version
            .parse::<Version>()
            .map_err(|e| Error::BadRequest(e.to_string()))?;
        let sha256 = normalize_digest(sha256).ok_or_else(|| {
            Error::BadRequest("push refused: sha256 is not a hex SHA-256 digest".into())
        })?;
        if size > max {
            return Err(Error::BadRequest(format!(
                "push refused: package of {size} bytes exceeds the limit of {max}"
            )));
        }
        Ok(Header {
            name: name.to_string(),
            version,
            sha256,
            size,
        })
    }

    pub fn file_name(&self) -> String {
        format!("{}-{}.zip", self.name, self.version)
    }
}

/// An upload in progress. Dropping it without `finish` removes the temp file.
pub struct Upload {
    header: Header,
    dir: PathBuf,
    tmp: PathBuf,
    file: Option<fs::File>,
    hasher: Sha256,
    written: u64,
}

impl Upload {
    /// Starts an upload, or returns `Ok(None)` when the identical package is already there.
    pub fn start(releases: &Path, header: Header) -> Result<Option<Upload>> {
        let dest = releases.join(header.file_name());
        if dest.exists() {
            let (existing, _) = sha256_file(&dest)?;
            if existing == header.sha256 {
                return Ok(None);
            }
            return Err(Error::Refused(format!(
                "push refused: a different {} (sha256 {existing}) is already on this node; remove it first",
                header.file_name()
            )));
        }
        let tmp = releases.join(format!(
            ".push-{}-{}",
            header.file_name(),
            orch_release::fsutil::unique_suffix()
        ));
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| Error::Internal(format!("create {}: {e}", tmp.display())))?;
        Ok(Some(Upload {
            header,
            dir: releases.to_path_buf(),
            tmp,
            file: Some(file),
            hasher: Sha256::new(),
            written: 0,
        }))
    }

    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        self.written += data.len() as u64;
        if self.written > self.header.size {
            return Err(Error::BadRequest(format!(
                "push refused: more data than the announced {} bytes; package discarded",
                self.header.size
            )));
        }
        self.hasher.update(data);
        if let Some(f) = &mut self.file {
            f.write_all(data)
                .map_err(|e| Error::Internal(format!("write {}: {e}", self.tmp.display())))?;
        }
        Ok(())
    }

    /// Checks size and digest, then renames into place. Returns the final path.
    pub fn finish(mut self) -> Result<PathBuf> {
        if self.written != self.header.size {
            return Err(Error::BadRequest(format!(
                "push refused: stream ended after {} of {} bytes (truncated); package discarded",
                self.written, self.header.size
            )));
        }
        let digest = hex(&std::mem::take(&mut self.hasher).finalize());
        if digest != self.header.sha256 {
            return Err(Error::BadRequest(format!(
                "push refused: SHA-256 mismatch (announced {}, received {digest}); package discarded",
                self.header.sha256
            )));
        }
        let file = self.file.take();
        if let Some(f) = file {
            f.sync_all()
                .map_err(|e| Error::Internal(format!("fsync {}: {e}", self.tmp.display())))?;
        }
        let dest = self.dir.join(self.header.file_name());
        // Sidecar first: the package is never in place without the digest that guards it.
        write_atomic(
            &sidecar_path(&dest),
            format!("{digest}  {}\n", self.header.file_name()).as_bytes(),
        )?;
        fs::rename(&self.tmp, &dest)
            .map_err(|e| Error::Internal(format!("rename {}: {e}", dest.display())))?;
        fsync_dir(&self.dir)?;
        Ok(dest)
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        // Still present only if the upload was not finished: discard it.
        let _ = fs::remove_file(&self.tmp);
    }
}
