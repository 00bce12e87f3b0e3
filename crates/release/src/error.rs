//! The release crate's error type. Every message says what failed and what to do about it.

use std::path::PathBuf;

use orch_types::Version;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A state rule forbids the operation; nothing was changed.
    #[error("{0}")]
    Refused(String),

    /// The package is malformed, hostile or does not match its digest; nothing was changed.
    #[error("package {file} refused: {reason}; nothing was changed")]
    BadPackage { file: String, reason: String },

    /// Signatures are required (trusted keys are configured) and this package's is missing,
    /// from an untrusted key, or does not verify; nothing was changed.
    #[error("package {file} refused: signature check failed: {reason}; nothing was changed")]
    Signature {
        file: String,
        reason: crate::signing::Error,
    },

    #[error(
        "no package for version {version} in {dir} (expected <name>-{version}.zip); pass --package FILE"
    )]
    PackageNotFound { version: Version, dir: PathBuf },

    /// The activation hook failed or timed out; release states are unchanged.
    #[error("activation {from} -> {to} failed: {reason}; release states are unchanged")]
    Activation {
        from: String,
        to: Version,
        reason: String,
    },

    #[error(
        "the release store {root} is locked by another process ({holder}); waited {waited_ms} ms. Retry when it finishes"
    )]
    Locked {
        root: PathBuf,
        holder: String,
        waited_ms: u128,
    },

    /// The on-disk state contradicts itself in a way that cannot be repaired automatically.
    #[error("release store {root} is inconsistent: {reason}")]
    Corrupt { root: PathBuf, reason: String },

    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches the operation and path to an I/O error so the message is actionable.
pub(crate) trait IoContext<T> {
    fn ctx(self, op: &'static str, path: &std::path::Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, op: &'static str, path: &std::path::Path) -> Result<T> {
        self.map_err(|source| Error::Io {
            op,
            path: path.to_path_buf(),
            source,
        })
    }
}
