//! A file arriving over the network: written to a temp file beside its destination while being
//! hashed, then checked against the announced size and SHA-256 and renamed into place. Any
//! mismatch, truncation or early drop discards it, so a partial file is never visible.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::digest::hex;
use crate::error::{Error, IoContext, Result};
use crate::fsutil::{fsync_dir, unique_suffix};

pub struct IncomingFile {
    dest: PathBuf,
    tmp: PathBuf,
    file: fs::File,
    hasher: Sha256,
    sha256: String,
    size: u64,
    written: u64,
    /// Record the verified digest beside the file ([`IncomingFile::record_verified`]).
    record: bool,
}

impl IncomingFile {
    /// Starts receiving into a temp file next to `dest`. `sha256` must be lower-case hex.
    pub fn create(dest: &Path, sha256: &str, size: u64) -> Result<IncomingFile> {
        let dir = dest.parent().unwrap_or(Path::new("."));
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(".incoming-{name}-{}", unique_suffix()));
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .ctx("create", &tmp)?;
        Ok(IncomingFile {
            dest: dest.to_path_buf(),
            tmp,
            file,
            hasher: Sha256::new(),
            sha256: sha256.to_string(),
            size,
            written: 0,
            record: false,
        })
    }

    /// Once in place, record the digest it was verified with beside it
    /// ([`crate::verified`]), so that whoever unpacks it does not hash it again. For files
    /// kept where their reader looks for the record (an agent's `releases/`).
    pub fn record_verified(mut self) -> IncomingFile {
        self.record = true;
        self
    }

    fn refuse(&self, reason: String) -> Error {
        Error::bad(&self.dest, reason)
    }

    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        self.written += data.len() as u64;
        if self.written > self.size {
            return Err(self.refuse(format!(
                "more data than the announced {} bytes; discarded",
                self.size
            )));
        }
        self.hasher.update(data);
        self.file.write_all(data).ctx("write", &self.tmp)
    }

    /// Checks size and digest, fsyncs, renames into place and fsyncs the directory; with
    /// [`IncomingFile::record_verified`], records the digest beside it.
    pub fn finish(mut self) -> Result<PathBuf> {
        if self.written != self.size {
            return Err(self.refuse(format!(
                "the stream ended after {} of {} bytes (truncated); discarded",
                self.written, self.size
            )));
        }
        let digest = hex(&std::mem::take(&mut self.hasher).finalize());
        if digest != self.sha256 {
            return Err(self.refuse(format!(
                "SHA-256 mismatch (announced {}, received {digest}); discarded",
                self.sha256
            )));
        }
        self.file.sync_all().ctx("fsync", &self.tmp)?;
        fs::rename(&self.tmp, &self.dest).ctx("rename into place", &self.dest)?;
        let dir = self.dest.parent().unwrap_or(Path::new("."));
        fsync_dir(dir)?;
        // After the rename (which changes the file's change time). Only an optimisation: a
        // file without evidence is hashed again where it is used.
        if self.record {
            let _ = crate::verified::record(&self.dest, &self.file, &digest);
        }
        Ok(self.dest.clone())
    }
}

impl Drop for IncomingFile {
    fn drop(&mut self) {
        // Present only when the transfer was not finished: discard the partial file.
        let _ = fs::remove_file(&self.tmp);
    }
}
