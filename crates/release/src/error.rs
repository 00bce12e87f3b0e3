//! The release crate's error type. Every message says what failed and what to do about it; a
//! wrapped cause is returned by `source()` and not repeated in the message, so a chain printer
//! shows it exactly once.

use std::path::PathBuf;

use orch_types::Version;

use crate::activate::HookError;
use crate::rules::Refusal;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A state rule forbids the operation; nothing was changed.
    #[error("{0}")]
    Refused(Refusal),

    /// The package is malformed, hostile or does not match its digest; nothing was changed.
    #[error("package {file} refused: {reason}; nothing was changed")]
    BadPackage { file: String, reason: String },

    /// Signatures are required (trusted keys are configured) and this package's is missing,
    /// from an untrusted key, or does not verify; nothing was changed. The verdict is part of
    /// the sentence, so it is not also a `source()`.
    #[error("package {file} refused: signature check failed: {reason}; nothing was changed")]
    Signature {
        file: String,
        reason: orch_package::signing::Error,
    },

    #[error(
        "no package for version {version} in {dir} (expected <name>-{version}.zip); pass --package FILE"
    )]
    PackageNotFound { version: Version, dir: PathBuf },

    /// The activation hook failed or timed out; release states are unchanged. What the hook
    /// did is part of the sentence (the advice comes after it), so it is not also a `source()`.
    #[error("activation {from} -> {to} failed: {reason}; release states are unchanged")]
    Activation {
        from: String,
        to: Version,
        /// Boxed: the hook's output tail would make every `Result` of this crate large.
        reason: Box<HookError>,
    },

    /// The pre-step (drain) hook failed or timed out before a switch: the switch was not
    /// attempted.
    #[error(
        "pre-step hook for {from} -> {to} failed: {reason}; the switch was not attempted and release states are unchanged (the node still runs {from}): fix the hook or what it drains, then retry"
    )]
    PreSwitch {
        from: String,
        to: Version,
        reason: Box<HookError>,
    },

    /// The post-step hook failed after the node passed its health gate: the node runs `to`
    /// but was not put back in service. Its drain stays recorded, so a retry runs it again.
    #[error(
        "post-step hook after the health gate on {to} (switched from {from}) failed: {reason}; the node runs {to} but was not put back in service: fix the hook and retry it, or put the node back by hand"
    )]
    PostSwitch {
        from: String,
        to: Version,
        reason: Box<HookError>,
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
    Corrupt {
        root: PathBuf,
        reason: String,
        /// The decoder's complaint, when `state.json` does not parse.
        #[source]
        source: Option<serde_json::Error>,
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
    /// A refusal that is not one of the state rules' (a build input, an ambiguous lookup).
    pub(crate) fn refused(msg: impl Into<String>) -> Error {
        Error::Refused(Refusal(msg.into()))
    }
}

/// The package format's errors are this crate's too, variant for variant, so callers match one
/// type whether a package was refused by its digest, its signature or its zip structure.
impl From<orch_package::Error> for Error {
    fn from(e: orch_package::Error) -> Error {
        use orch_package::Error as P;
        match e {
            P::BadPackage { file, reason } => Error::BadPackage { file, reason },
            P::Signature { file, reason } => Error::Signature { file, reason },
            P::Io { op, path, source } => Error::Io { op, path, source },
        }
    }
}

impl From<Refusal> for Error {
    fn from(r: Refusal) -> Error {
        Error::Refused(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_prints_its_cause_once() {
        let dir = tempfile::tempdir().unwrap();
        let e: Error = crate::package::sha256_file(&dir.path().join("gone.zip"))
            .unwrap_err()
            .into();
        let mut all = vec![e.to_string()];
        let mut cur = std::error::Error::source(&e);
        while let Some(c) = cur {
            all.push(c.to_string());
            cur = c.source();
        }
        let all = all.join(": ");
        assert_eq!(all.matches("os error 2").count(), 1, "{all}");
    }
}
