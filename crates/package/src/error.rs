//! The package crate's error type. Every message says what failed and what to do about it; a
//! wrapped cause is returned by `source()` and never repeated in the message itself, so a chain
//! printer (`{:#}` of anyhow, `orch_tls::error_chain`) shows each cause exactly once.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The package is malformed, hostile or does not match its digest; nothing was changed.
    #[error("package {file} refused: {reason}; nothing was changed")]
    BadPackage { file: String, reason: String },

    /// Signatures are required (trusted keys are configured) and this package's is missing,
    /// from an untrusted key, or does not verify; nothing was changed. The verdict is part of
    /// the sentence ("signature check failed: missing"), so it is not also a `source()`.
    #[error("package {file} refused: signature check failed: {reason}; nothing was changed")]
    Signature {
        file: String,
        reason: crate::signing::Error,
    },

    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A refusal of the package file `zip` (named by its file name).
    pub fn bad(zip: &Path, reason: impl Into<String>) -> Error {
        Error::BadPackage {
            file: display_name(zip),
            reason: reason.into(),
        }
    }

    /// The refusal of a package whose bytes do not have the expected digest.
    pub fn digest_mismatch(zip: &Path, expected: &str, actual: &str) -> Error {
        Error::bad(
            zip,
            format!("SHA-256 mismatch: expected {expected}, the file has {actual}"),
        )
    }
}

/// A path's file name for messages (the whole path when it has none).
pub fn display_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// Attaches the operation and path to an I/O error so the message is actionable.
pub trait IoContext<T> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T> {
        self.map_err(|source| Error::Io {
            op,
            path: path.to_path_buf(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    /// Every message of the chain, outermost first, as a chain printer walks it.
    fn chain(e: &(dyn std::error::Error + 'static)) -> Vec<String> {
        let mut out = vec![e.to_string()];
        let mut cur = e.source();
        while let Some(c) = cur {
            out.push(c.to_string());
            cur = c.source();
        }
        out
    }

    #[test]
    fn a_missing_file_prints_its_cause_once() {
        let dir = tempfile::tempdir().unwrap();
        let e = crate::digest::sha256_file(&dir.path().join("absent.zip")).unwrap_err();
        let all = chain(&e).join(": ");
        assert_eq!(all.matches("os error 2").count(), 1, "{all}");
        assert!(all.starts_with("open "), "{all}");
        assert!(all.contains("absent.zip"), "{all}");
    }
}
