//! Release packages: `<name>-<version>.zip` with a `release.toml` at its root and an optional
//! `<file>.sha256` beside it. Verification refuses anything hostile (digest mismatch, non-zip or
//! truncated data, escaping paths, links, device files, zip bombs, a manifest that disagrees);
//! extraction writes into a fresh directory that the caller renames into place.
//!
//! The format's pieces that are not about zip files (manifest, digests) come from
//! `orch-package` and are re-exported here.

mod build;
mod check;
mod extract;
pub mod files;

pub use build::build;
pub use extract::{ExtractedFile, Extraction, Reuse, extract, extract_reusing, extract_tree};

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::path::Path;

use orch_package::digest::{check_digest, sha256_reader};
pub use orch_package::digest::{
    digest_checked, expected_digest, hex, normalize_digest, sha256_file, sidecar_digest,
    sidecar_path,
};
use orch_package::manifest::check_identity;
pub use orch_package::manifest::{
    MANIFEST, Manifest, ManifestError, file_identity, parse_manifest,
};
use orch_types::Version;

use orch_package::error::IoContext;

use crate::error::{Error, Result};
use check::{Kind, classify, open_checked, safe_relative_path};

/// Caps that bound what a package may expand to (zip-bomb protection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Total uncompressed bytes over all entries.
    pub max_total_bytes: u64,
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_total_bytes: 4 << 30,
            max_entries: 100_000,
        }
    }
}

/// What a verified package contains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageInfo {
    pub name: String,
    pub version: Version,
    /// Hex SHA-256 of the zip file.
    pub sha256: String,
    /// Size of the zip file.
    pub size: u64,
    pub entries: u64,
    pub uncompressed_bytes: u64,
}

fn bad(zip: &Path, reason: impl Into<String>) -> Error {
    orch_package::Error::bad(zip, reason).into()
}

/// Opens the package and verifies the digest (the given one, else the sidecar's, if any) of
/// that very handle, rewound for reading: the bytes checked are the bytes extracted, even if
/// the path is replaced meanwhile.
fn open_verified(zip: &Path, expected_sha256: Option<&str>) -> Result<(File, String, u64)> {
    let expected = expected_digest(zip, expected_sha256)?;
    let mut file = File::open(zip).ctx("open package", zip)?;
    let (actual, size) = sha256_reader(&mut file, zip)?;
    check_digest(zip, expected.as_deref(), &actual)?;
    file.seek(io::SeekFrom::Start(0)).ctx("rewind", zip)?;
    Ok((file, actual, size))
}

/// Copies at most `budget` bytes; reading more means the entry lied about its size.
fn copy_capped(
    zip: &Path,
    name: &str,
    mut r: impl Read,
    w: &mut impl Write,
    budget: u64,
) -> Result<u64> {
    let mut limited = (&mut r).take(budget + 1);
    let n = io::copy(&mut limited, w).map_err(|e| bad(zip, format!("entry {name:?}: {e}")))?;
    if n > budget {
        return Err(bad(
            zip,
            "its contents expand past the size limit (zip bomb?)".to_string(),
        ));
    }
    Ok(n)
}

fn short_entry(zip: &Path, name: &str, n: u64, declared: u64) -> Error {
    bad(
        zip,
        format!("entry {name:?} holds {n} bytes but declares {declared}"),
    )
}

/// Fully verifies a package without extracting it: digest, structure, every entry's data and
/// CRC, the limits, and the manifest against the file name.
pub fn verify(
    zip: &Path,
    expected_sha256: Option<&str>,
    expected_version: Option<Version>,
    limits: &Limits,
) -> Result<PackageInfo> {
    let (file, sha256, size) = open_verified(zip, expected_sha256)?;
    let c = check_entries(zip, file, expected_version, limits)?;
    Ok(PackageInfo {
        name: c.name,
        version: c.version,
        sha256,
        size,
        entries: c.entries,
        uncompressed_bytes: c.uncompressed_bytes,
    })
}

/// What [`verify_entries`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contents {
    pub name: String,
    pub version: Version,
    pub entries: u64,
    pub uncompressed_bytes: u64,
}

/// Everything [`verify`] checks but the digest (structure, every entry's data and CRC, the
/// limits, the manifest against the file name), for a caller that hashes the file in a pass of
/// its own at the same time (`rollout --package`: its digest and its chunks in one thread, this
/// in another). Whoever uses the bytes checks their digest again: this is not evidence that a
/// later read of the path yields these bytes.
pub fn verify_entries(
    zip: &Path,
    expected_version: Option<Version>,
    limits: &Limits,
) -> Result<Contents> {
    let file = File::open(zip).ctx("open package", zip)?;
    check_entries(zip, file, expected_version, limits)
}

/// The checks of [`verify`] after the digest, on the open package.
fn check_entries(
    zip: &Path,
    file: File,
    expected_version: Option<Version>,
    limits: &Limits,
) -> Result<Contents> {
    let mut archive = open_checked(zip, file, limits)?;
    let mut total = 0u64;
    let mut manifest = None;
    for i in 0..archive.len() {
        let mut f = archive
            .by_index(i)
            .map_err(|e| bad(zip, format!("entry {i} is unreadable ({e})")))?;
        let name = f.name().map(|n| n.into_owned()).unwrap_or_default();
        // The same classification as extraction (name or mode), so both read the same entries.
        if matches!(classify(zip, &f, &name)?, Kind::Dir) {
            continue;
        }
        let budget = limits.max_total_bytes - total;
        let declared = f.size();
        let n = if safe_relative_path(&name).as_deref() == Some(Path::new(MANIFEST)) {
            let mut buf = Vec::new();
            let n = copy_capped(zip, &name, &mut f, &mut buf, budget.min(1 << 20))?;
            manifest =
                Some(String::from_utf8(buf).map_err(|_| bad(zip, "release.toml is not UTF-8"))?);
            n
        } else {
            copy_capped(zip, &name, &mut f, &mut io::sink(), budget)?
        };
        // The same rule as extraction: an entry yields exactly what it declares.
        if n != declared {
            return Err(short_entry(zip, &name, n, declared));
        }
        total += n;
    }
    let manifest = manifest.ok_or_else(|| bad(zip, format!("it has no {MANIFEST}")))?;
    let (name, version) = check_identity(zip, &manifest, expected_version)?;
    Ok(Contents {
        name,
        version,
        entries: archive.len() as u64,
        uncompressed_bytes: total,
    })
}
