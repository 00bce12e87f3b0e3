//! The `release.toml` manifest at a package's root, and the package file name
//! `<name>-<x.y.z>.zip` that must agree with it.

use std::path::Path;

use orch_types::{ParseError, Version, parse_package_file_name, validate_package_name};
use serde::Deserialize;

use crate::error::{Error, Result};

pub const MANIFEST: &str = "release.toml";

/// The `release.toml` manifest. Unknown keys are allowed (tools may add their own).
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub version: String,
}

/// Why a manifest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// Not TOML, or a required key is missing. Only the parser's one-line message is kept: its
    /// full form quotes the text over several lines, and refusals are one line.
    #[error("{MANIFEST} is not valid: {message}")]
    Invalid { message: String },
    /// The name or version is not acceptable; the reason is part of the sentence.
    #[error("{MANIFEST}: {0}")]
    Field(ParseError),
}

/// Parses and validates a manifest's text.
pub fn parse_manifest(text: &str) -> std::result::Result<(String, Version), ManifestError> {
    let m: Manifest = toml::from_str(text).map_err(|e| ManifestError::Invalid {
        message: e.message().to_string(),
    })?;
    validate_package_name(&m.name).map_err(ManifestError::Field)?;
    let v = m.version.parse::<Version>().map_err(ManifestError::Field)?;
    Ok((m.name, v))
}

const BAD_FILE_NAME: &str = "its file name is not <name>-<x.y.z>.zip with a valid name and version";

/// Name and version from a package's file name `<name>-<x.y.z>.zip`.
pub fn file_identity(zip: &Path) -> Result<(String, Version)> {
    let file_name = zip.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    parse_package_file_name(file_name).ok_or_else(|| Error::bad(zip, BAD_FILE_NAME))
}

/// Checks a manifest against the package's file name and an expected version.
pub fn check_identity(
    zip: &Path,
    manifest_text: &str,
    expected: Option<Version>,
) -> Result<(String, Version)> {
    let (name, version) =
        parse_manifest(manifest_text).map_err(|e| Error::bad(zip, e.to_string()))?;
    let (fname, fversion) = file_identity(zip)?;
    if fname != name || fversion != version {
        return Err(Error::bad(
            zip,
            format!("{MANIFEST} says {name} {version} but the file name says {fname} {fversion}"),
        ));
    }
    if let Some(e) = expected
        && e != version
    {
        return Err(Error::bad(
            zip,
            format!("it holds version {version}, not {e}"),
        ));
    }
    Ok((name, version))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests() {
        assert!(parse_manifest("name = \"emqx\"\nversion = \"4.2.1\"\nextra = 1\n").is_ok());
        assert!(parse_manifest("name = \"emqx\"\n").is_err());
        assert!(parse_manifest("name = \"emqx\"\nversion = \"4.2\"\n").is_err());
        assert!(parse_manifest("name = \"../x\"\nversion = \"4.2.1\"\n").is_err());
        assert!(parse_manifest("not toml [").is_err());
    }

    #[test]
    fn identity() {
        let zip = Path::new("/x/emqx-4.2.1.zip");
        let text = "name = \"emqx\"\nversion = \"4.2.1\"\n";
        assert!(check_identity(zip, text, None).is_ok());
        assert!(check_identity(zip, text, Some("4.2.2".parse().unwrap())).is_err());
        assert!(check_identity(Path::new("/x/other-4.2.1.zip"), text, None).is_err());
        assert!(file_identity(Path::new("/x/emqx.zip")).is_err());
    }
}
