//! Receiving a pushed package: written to a temp file in `ROOT/releases/` while hashing, checked
//! against the header's size and digest, then renamed into place with its `.sha256` (and its
//! `.sig`, when the header carries one) beside it. Any mismatch or truncation discards the file.
//!
//! With trusted keys the header's signature is checked over the announced digest before a byte
//! is written; the received bytes must then hash to that digest, so only signed bytes land.
//!
//! All disk work (hashing an existing package, writing and hashing chunks, the final fsync and
//! rename) runs on the blocking pool: [`Upload::start`] is called there, and a [`Writer`] is
//! fed the chunks through a bounded channel.

use std::path::{Path, PathBuf};

use orch_package::digest::{normalize_digest, sha256_file, sidecar_path};
use orch_package::fsutil::write_atomic;
use orch_package::incoming::IncomingFile;
use orch_package::signing::{self, MAX_SIG_BYTES, TrustedKeys};
use orch_types::{Version, validate_package_name};

use crate::error::{Error, Result};

/// A validated push header.
#[derive(Debug, Clone)]
pub struct Header {
    pub name: String,
    pub version: Version,
    pub sha256: String,
    pub size: u64,
    /// The `.sig` file's bytes, when the pusher sent one.
    pub signature: Option<Vec<u8>>,
}

impl Header {
    pub fn validate(
        name: &str,
        version: &str,
        sha256: &str,
        size: u64,
        signature: Vec<u8>,
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
        if signature.len() > MAX_SIG_BYTES {
            return Err(Error::BadRequest(format!(
                "push refused: a signature of {} bytes is not a signature file (limit {MAX_SIG_BYTES})",
                signature.len()
            )));
        }
        Ok(Header {
            name: name.to_string(),
            version,
            sha256,
            size,
            signature: (!signature.is_empty()).then_some(signature),
        })
    }

    /// With trusted keys: refuses unless the signature verifies over the announced digest.
    /// Without: a signature that is not even well-formed is dropped (not stored), as before
    /// signatures existed nothing is refused.
    pub fn check_signature(&mut self, trusted: &TrustedKeys) -> Result<()> {
        if trusted.is_empty() {
            if let Some(sig) = &self.signature
                && let Err(e) = signing::Signature::parse(sig)
            {
                tracing::warn!(package = %self.file_name(), "ignoring the pushed signature: {e}");
                self.signature = None;
            }
            return Ok(());
        }
        trusted.verify_package(&self.file_name(), self.signature.as_deref(), &self.sha256)?;
        Ok(())
    }

    pub fn file_name(&self) -> String {
        format!("{}-{}.zip", self.name, self.version)
    }
}

/// Whether `path` holds a package with this digest (from its verification record when it has
/// one, else hashed). Blocking.
pub fn holds(path: &Path, sha256: &str) -> bool {
    digest_of(path).is_ok_and(|d| d == sha256)
}

/// The digest of the package at `path`: from its verification record while the file is the
/// one verified, else hashed. Blocking.
fn digest_of(path: &Path) -> Result<String> {
    let known = std::fs::File::open(path)
        .ok()
        .and_then(|f| orch_package::verified::recorded(path, &f));
    match known {
        Some(d) => Ok(d),
        None => Ok(sha256_file(path)?.0),
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
    /// Blocking (it may hash the existing package): call it on the blocking pool.
    pub fn start(releases: &Path, header: Header) -> Result<Option<Upload>> {
        let dest = releases.join(header.file_name());
        if dest.exists() {
            // Verified when it arrived and unchanged since: no need to hash it again.
            let existing = digest_of(&dest)?;
            if existing == header.sha256 {
                // The same bytes, perhaps newly signed (a rotation): keep the pushed signature.
                if let Some(sig) = &header.signature
                    && signing::read_sig(&dest).ok().flatten().as_deref() != Some(sig.as_slice())
                {
                    write_atomic(&signing::sig_path(&dest), sig)?;
                }
                return Ok(None);
            }
            return Err(Error::Refused(format!(
                "push refused: a different {} (sha256 {existing}) is already on this node; remove it first",
                header.file_name()
            )));
        }
        let file = IncomingFile::create(&dest, &header.sha256, header.size)?.record_verified();
        Ok(Some(Upload { header, dest, file }))
    }

    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        Ok(self.file.write(data)?)
    }

    /// The file being written (a delta assembly writes into it directly).
    pub fn incoming(&mut self) -> &mut IncomingFile {
        &mut self.file
    }

    /// Checks size and digest, writes the `.sha256` and `.sig` sidecars, then renames into
    /// place.
    pub fn finish(self) -> Result<PathBuf> {
        // Sidecars first: the package is never in place without the digest and signature that
        // guard it. A stale `.sig` from an earlier package of that name must not stay beside it.
        let sidecar = sidecar_path(&self.dest);
        let sig_path = signing::sig_path(&self.dest);
        let undo = || {
            let _ = std::fs::remove_file(&sidecar);
            let _ = std::fs::remove_file(&sig_path);
        };
        write_atomic(
            &sidecar,
            format!("{}  {}\n", self.header.sha256, self.header.file_name()).as_bytes(),
        )?;
        let sig = match &self.header.signature {
            Some(sig) => write_atomic(&sig_path, sig),
            None => match std::fs::remove_file(&sig_path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(orch_package::Error::Io {
                        op: "remove stale signature",
                        path: sig_path.clone(),
                        source: e,
                    })
                }
                _ => Ok(()),
            },
        };
        if let Err(e) = sig {
            undo();
            return Err(e.into());
        }
        self.file.finish().map_err(|e| {
            undo();
            e.into()
        })
    }
}

/// Chunks queued between the stream and the disk: enough to overlap the network with the disk,
/// bounded so a slow disk slows the sender (HTTP/2 flow control) instead of filling memory.
const WRITE_QUEUE: usize = 4;

enum Chunk {
    Data(Vec<u8>),
    /// The stream ended: check and rename into place.
    Finish,
}

/// An [`Upload`] written by a task on the blocking pool, fed through a bounded channel.
/// Dropping it without [`Writer::finish`] discards the upload (the temp file is removed).
pub struct Writer {
    tx: tokio::sync::mpsc::Sender<Chunk>,
    task: tokio::task::JoinHandle<Result<PathBuf>>,
}

impl Writer {
    /// With an assembly (a delta push), the stream's bytes fill the chunks it sends and the
    /// others are copied from the packages here.
    pub fn spawn(upload: Upload, assembly: Option<crate::delta::Assembly>) -> Writer {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Chunk>(WRITE_QUEUE);
        let task = tokio::task::spawn_blocking(move || {
            let mut upload = upload;
            let mut assembly = assembly;
            loop {
                match rx.blocking_recv() {
                    Some(Chunk::Data(d)) => match assembly.as_mut() {
                        Some(a) => a.feed(&mut upload, &d)?,
                        None => upload.write(&d)?,
                    },
                    Some(Chunk::Finish) => {
                        if let Some(a) = assembly.as_mut() {
                            a.finish(&mut upload)?;
                        }
                        let path = upload.finish()?;
                        if let Some(a) = &assembly {
                            a.remember(&path);
                        }
                        return Ok(path);
                    }
                    // The request went away: `upload` is dropped, removing its temp file.
                    None => return Err(Error::Abandoned),
                }
            }
        });
        Writer { tx, task }
    }

    /// Queues a chunk. `false` when the writer has stopped (on an error, which
    /// [`Writer::finish`] returns).
    pub async fn write(&self, data: Vec<u8>) -> bool {
        self.tx.send(Chunk::Data(data)).await.is_ok()
    }

    /// Ends the upload: the size and digest checks, the sidecars, the rename. Also returns the
    /// error that stopped the writer early.
    pub async fn finish(self) -> Result<PathBuf> {
        let _ = self.tx.send(Chunk::Finish).await;
        drop(self.tx);
        self.task.await.map_err(Error::task("the push writer"))?
    }

    /// Discards the upload and waits until its temp file is gone.
    pub async fn abort(self) {
        drop(self.tx);
        let _ = self.task.await;
    }
}
