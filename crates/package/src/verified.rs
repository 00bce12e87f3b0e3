//! Evidence that a package file's digest was already verified, so it is hashed once per node:
//! a `<file>.verified` sidecar naming the digest and the identity of the file when its bytes
//! were checked (device, inode, size, modification and change times to the nanosecond).
//!
//! Whoever hashed the bytes records it ([`crate::IncomingFile`] as they arrive, extraction as it
//! reads a local file); whoever would hash them again asks [`recorded`] with the file it opened.
//! Any write to the file, a replacement (another inode) or a `touch` changes its identity (the
//! change time cannot be set from user space), and then the evidence does not apply: the bytes
//! are hashed as before. The evidence is an optimisation only; a missing, stale or unreadable
//! sidecar never refuses anything.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::digest::normalize_digest;
use crate::error::Result;
use crate::fsutil::write_atomic;

/// `<file>.verified`.
pub fn sidecar_path(file: &Path) -> PathBuf {
    let mut s = file.as_os_str().to_owned();
    s.push(".verified");
    PathBuf::from(s)
}

/// The identity of an open file, as the sidecar stores it.
pub(crate) fn identity(file: &File) -> Option<String> {
    Some(identity_of(&file.metadata().ok()?))
}

/// The identity of a file from its metadata: device, inode, size, modification and change times
/// to the nanosecond. Any write, replacement or `touch` changes it (see the module's note).
pub fn identity_of(m: &std::fs::Metadata) -> String {
    format!(
        "{} {} {} {}.{:09} {}.{:09}",
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec()
    )
}

/// Records that `file` (open on `path`, whose bytes were just checked) has digest `sha256`.
/// Call it once the file is in its final place: a rename changes the change time.
pub fn record(path: &Path, file: &File, sha256: &str) -> Result<()> {
    let Some(id) = identity(file) else {
        return Ok(());
    };
    write_atomic(&sidecar_path(path), format!("{sha256} {id}\n").as_bytes())
}

/// The digest recorded for `path`, if the evidence matches `file` (opened on `path`) as it is
/// now; `None` otherwise (no evidence, another file, or the file changed since).
pub fn recorded(path: &Path, file: &File) -> Option<String> {
    let text = std::fs::read_to_string(sidecar_path(path)).ok()?;
    let (digest, id) = text.trim_end().split_once(' ')?;
    let digest = normalize_digest(digest)?;
    (identity(file)? == id).then_some(digest)
}

/// Removes the evidence (with the file it vouches for).
pub fn forget(path: &Path) {
    let _ = std::fs::remove_file(sidecar_path(path));
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    const D: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn evidence_holds_until_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p-1.0.0.zip");
        std::fs::write(&path, b"bytes").unwrap();
        let f = File::open(&path).unwrap();
        assert_eq!(recorded(&path, &f), None, "no evidence yet");
        record(&path, &f, D).unwrap();
        assert_eq!(
            recorded(&path, &File::open(&path).unwrap()).as_deref(),
            Some(D)
        );
        // Appended to: size, times and change time differ.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"!")
            .unwrap();
        assert_eq!(recorded(&path, &File::open(&path).unwrap()), None);
    }

    #[test]
    fn a_replaced_file_or_a_bad_sidecar_is_not_vouched_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p-1.0.0.zip");
        std::fs::write(&path, b"bytes").unwrap();
        record(&path, &File::open(&path).unwrap(), D).unwrap();
        // The same bytes in another file renamed over it: another inode.
        let other = dir.path().join("other");
        std::fs::write(&other, b"bytes").unwrap();
        std::fs::rename(&other, &path).unwrap();
        assert_eq!(recorded(&path, &File::open(&path).unwrap()), None);
        let f = File::open(&path).unwrap();
        for junk in ["", "nonsense", "zz 1 2 3 4.0 5.0", D] {
            std::fs::write(sidecar_path(&path), junk).unwrap();
            assert_eq!(recorded(&path, &f), None, "{junk:?}");
        }
        forget(&path);
        assert!(!sidecar_path(&path).exists());
    }
}
