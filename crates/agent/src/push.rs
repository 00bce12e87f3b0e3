//! Receiving a pushed package: written to a temp file in `ROOT/releases/` while hashing, checked
//! against the header's size and digest, then renamed into place with its `.sha256` beside it.
//! Any mismatch or truncation discards the file.

use std::path::{Path, PathBuf};

use orch_release::fsutil::write_atomic;
use orch_release::incoming::IncomingFile;
use orch_release::package::{normalize_digest, sha256_file, sidecar_path};
use orch_types::{Version, validate_package_name};

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

/// An upload in progress: an [`IncomingFile`] plus the sidecar digest written on success.
pub struct Upload {
    header: Header,
    dest: PathBuf,
    file: IncomingFile,
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
        let file = IncomingFile::create(&dest, &header.sha256, header.size)?;
        Ok(Some(Upload { header, dest, file }))
    }

    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        Ok(self.file.write(data)?)
    }

    /// Checks size and digest, writes the `.sha256` sidecar, then renames into place.
    pub fn finish(self) -> Result<PathBuf> {
        // Sidecar first: the package is never in place without the digest that guards it.
        let sidecar = sidecar_path(&self.dest);
        write_atomic(
            &sidecar,
            format!("{}  {}\n", self.header.sha256, self.header.file_name()).as_bytes(),
        )?;
        self.file.finish().map_err(|e| {
            let _ = std::fs::remove_file(&sidecar);
            e.into()
        })
    }
}
