//! Package bytes, content-addressed by SHA-256 under `DATA/blobs/`, and the `Blobs` peer
//! service that copies them between coordinators. Bytes never enter the Raft log: the log only
//! records which coordinators hold which digest. A package's detached signature, when it has
//! one, is kept beside its bytes as `<sha256>.sig` and travels with them (to other
//! coordinators and to agents); with trusted keys, unsigned bytes are refused before storing.
//!
//! A package whose chunks a coordinator mostly holds already (the release it patches) arrives
//! as a delta ([`orch_package::delta`]): only the chunks none of the stored packages holds
//! cross the wire, the rest is copied from those packages, and the rebuilt file is checked
//! (size, SHA-256, signature) exactly as a whole one. The chunk index of each stored package
//! is cached beside it (`<sha256>.chunks`). Peers that do not know the delta calls, and any
//! failure of a delta, get the whole package.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::Stream;
use orch_package::chunks::Chunk;
use orch_package::delta::{self, ChunkId};
use orch_package::digest::normalize_digest;
use orch_package::incoming::IncomingFile;
use orch_package::signing::{self, MAX_SIG_BYTES, TrustedKeys};
use orch_proto::raft::{
    BlobChunk, BlobChunkRef, BlobChunksReply, BlobChunksRequest, BlobDeltaChunk, BlobReply,
    BlobRequest, blobs_client::BlobsClient, blobs_server,
};
use orch_tls::{Role, Security, party_domain};
use tokio::io::AsyncReadExt;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::error::{Error, Result};

pub const CHUNK: usize = 256 << 10;
/// Largest gRPC message of the `Blobs` service, either way (chunks are [`CHUNK`] bytes).
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

/// A `Blobs` client for coordinator `peer_id` at `peer_addr`; under mTLS the peer must present
/// that coordinator's certificate.
async fn blobs_client(
    security: &Security,
    peer_id: u64,
    peer_addr: &str,
) -> Result<BlobsClient<tonic::transport::Channel>> {
    let unreachable =
        |e: String| Error::Unavailable(format!("coordinator {peer_id} at {peer_addr}: {e}"));
    let ch = security
        .endpoint(
            peer_addr,
            &party_domain(Role::Coordinator, &peer_id.to_string()),
        )
        .map_err(|e| unreachable(e.to_string()))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .http2_keep_alive_interval(std::time::Duration::from_secs(10))
        .keep_alive_timeout(std::time::Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| unreachable(orch_tls::connect_error(&e)))?;
    Ok(BlobsClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
    max_size: u64,
    /// Empty: signatures are kept when present but not required.
    trusted: TrustedKeys,
    /// Held by the blob sweep while it decides on and deletes a file, and by a transfer while
    /// it finds the bytes already stored and refreshes their time: a re-upload of old bytes is
    /// then never deleted under it.
    gc_lock: Arc<Mutex<()>>,
}

/// What one blob sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Blob files deleted (their signatures go with them).
    pub deleted: usize,
    /// Bytes freed.
    pub bytes: u64,
    /// Blob files kept (named by a package record, or younger than the grace period).
    pub kept: usize,
}

/// A chunk for the blocking writer of [`BlobStore::receive`].
enum Piece {
    Data(Vec<u8>),
    /// The stream ended normally: check, store the signature, rename into place.
    End,
}

/// How many chunks may wait for the blocking writer (each up to [`CHUNK`] bytes).
const WRITE_QUEUE: usize = 4;

/// What a delta transfer carries besides its bytes: the package's chunk list (checked by
/// [`checked_list`]) and the indexes of the chunks sent.
#[derive(Debug, Clone)]
pub struct Delta {
    pub list: Vec<ChunkId>,
    pub sent: Vec<u32>,
}

/// A chunk list as received (size and digest bytes of each), checked against the file's size.
pub fn checked_list<'a>(
    raw: impl ExactSizeIterator<Item = (u32, &'a [u8])>,
    size: u64,
) -> Result<Vec<ChunkId>> {
    delta::checked_list(raw, size).map_err(delta_error)
}

/// A failed delta transfer as this crate's error: the sender's fault, or (a chunk gone, a
/// package unreadable) a refusal after which the sender sends the whole file.
fn delta_error(e: delta::Error) -> Error {
    match e {
        delta::Error::File(e) => Error::Package(e),
        e @ (delta::Error::Missing { .. } | delta::Error::Local { .. }) => {
            Error::Refused(e.to_string())
        }
        e => Error::BadRequest(e.to_string()),
    }
}

/// Reads the chunks `sent` (indexes into `chunks`) of the file at `path`, in order, handing
/// each to `emit` until it returns false. Blocking.
pub fn read_sent(
    path: &Path,
    chunks: &[Chunk],
    sent: &[u32],
    mut emit: impl FnMut(Vec<u8>) -> bool,
) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f =
        std::fs::File::open(path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
    for &i in sent {
        let c = chunks.get(i as usize).ok_or_else(|| {
            Error::BadRequest(format!(
                "chunk {i} was asked for, the package has {} chunks",
                chunks.len()
            ))
        })?;
        let mut buf = vec![0u8; c.len as usize];
        f.read_exact_at(&mut buf, c.offset)
            .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
        if !emit(buf) {
            break;
        }
    }
    Ok(())
}

impl BlobStore {
    pub fn open(dir: PathBuf, max_size: u64) -> Result<BlobStore> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        // Transfers interrupted by a crash are incomplete by definition (as are the temp files
        // of atomic signature writes).
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(".incoming-")
                    || (name.starts_with('.') && name.contains(".tmp-"))
                {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(BlobStore {
            dir,
            max_size,
            trusted: TrustedKeys::default(),
            gc_lock: Arc::default(),
        })
    }

    /// Requires a valid signature from one of `trusted` (when not empty) on every package.
    pub fn with_trusted(mut self, trusted: TrustedKeys) -> BlobStore {
        self.trusted = trusted;
        self
    }

    pub fn trusted(&self) -> &TrustedKeys {
        &self.trusted
    }

    /// With trusted keys, refuses `what` unless `sig` verifies over `sha256`.
    pub fn check_signature(&self, what: &str, sig: Option<&[u8]>, sha256: &str) -> Result<()> {
        if self.trusted.is_empty() {
            return Ok(());
        }
        self.trusted.verify_package(what, sig, sha256)?;
        Ok(())
    }

    fn sig_path(&self, sha256: &str) -> Result<PathBuf> {
        Ok(signing::sig_path(&self.path(sha256)?))
    }

    /// The stored signature of a blob, if it has one.
    pub fn signature(&self, sha256: &str) -> Result<Option<Vec<u8>>> {
        let blob = self.path(sha256)?;
        signing::read_sig(&blob).map_err(|e| Error::io(format!("signature of {sha256}"), e))
    }

    fn store_signature(&self, sha256: &str, sig: &[u8]) -> Result<()> {
        let path = self.sig_path(sha256)?;
        orch_package::fsutil::write_atomic(&path, sig)?;
        Ok(())
    }

    /// The path of a digest's bytes (the digest is validated, so it cannot escape the dir).
    pub fn path(&self, sha256: &str) -> Result<PathBuf> {
        let d = normalize_digest(sha256)
            .ok_or_else(|| Error::BadRequest(format!("{sha256:?} is not a hex SHA-256")))?;
        Ok(self.dir.join(d))
    }

    pub fn has(&self, sha256: &str) -> bool {
        self.path(sha256).map(|p| p.is_file()).unwrap_or(false)
    }

    /// Every chunk of the packages stored here but `except`, by digest. Blocking: a package
    /// without a valid chunk index (`<sha256>.chunks`) is read once and cut.
    fn local_index(&self, except: &str) -> HashMap<[u8; 32], delta::Located> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return HashMap::new();
        };
        let files = rd.flatten().filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let blob = normalize_digest(&name).as_deref() == Some(name.as_str());
            (blob && name != except).then(|| e.path())
        });
        delta::index(files)
    }

    /// The chunks of `list` that no package stored here holds; `None` when the package itself
    /// (`sha256`) is stored.
    pub async fn missing_chunks(
        &self,
        sha256: &str,
        list: Vec<ChunkId>,
    ) -> Result<Option<Vec<u32>>> {
        self.path(sha256)?;
        let sha = normalize_digest(sha256).unwrap_or_default();
        let store = self.clone();
        blocking(move || {
            if store.has(&sha) {
                return Ok(None);
            }
            Ok(Some(delta::missing(&store.local_index(&sha), &list)))
        })
        .await
    }

    /// The chunk list of a stored package (from its cached index when valid). Blocking.
    fn chunks_of(&self, sha256: &str) -> Result<Vec<Chunk>> {
        Ok(orch_package::chunks::of_file(&self.path(sha256)?)?)
    }

    /// Receives a stream of data chunks for `sha256`/`size` (and its signature, kept beside
    /// the bytes); `Ok(true)` if the bytes were already here. The caller checks the signature
    /// first ([`BlobStore::check_signature`]).
    ///
    /// The file is written and hashed on a blocking thread fed through a short queue, never on
    /// the async runtime; a stream that ends early or fails discards the partial file.
    pub async fn receive<S, E>(
        &self,
        sha256: &str,
        size: u64,
        signature: Option<Vec<u8>>,
        first: Vec<u8>,
        rest: S,
    ) -> Result<bool>
    where
        S: Stream<Item = std::result::Result<Vec<u8>, E>> + Unpin,
        E: std::fmt::Display,
    {
        self.receive_with(sha256, size, signature, None, first, rest)
            .await
    }

    /// [`BlobStore::receive`] of a delta transfer: the stream carries the chunks
    /// `delta.sent` of `delta.list`, the others are copied from the packages stored here. The
    /// rebuilt file is checked as a whole one; its list becomes its chunk index.
    pub async fn receive_delta<S, E>(
        &self,
        sha256: &str,
        size: u64,
        signature: Option<Vec<u8>>,
        delta: Delta,
        first: Vec<u8>,
        rest: S,
    ) -> Result<bool>
    where
        S: Stream<Item = std::result::Result<Vec<u8>, E>> + Unpin,
        E: std::fmt::Display,
    {
        self.receive_with(sha256, size, signature, Some(delta), first, rest)
            .await
    }

    async fn receive_with<S, E>(
        &self,
        sha256: &str,
        size: u64,
        signature: Option<Vec<u8>>,
        delta: Option<Delta>,
        first: Vec<u8>,
        mut rest: S,
    ) -> Result<bool>
    where
        S: Stream<Item = std::result::Result<Vec<u8>, E>> + Unpin,
        E: std::fmt::Display,
    {
        let dest = self.path(sha256)?;
        if size > self.max_size {
            return Err(Error::BadRequest(format!(
                "package of {size} bytes exceeds the limit of {} bytes",
                self.max_size
            )));
        }
        if signature.as_ref().is_some_and(|s| s.len() > MAX_SIG_BYTES) {
            return Err(Error::BadRequest(format!(
                "the signature exceeds {MAX_SIG_BYTES} bytes: it is not a signature file"
            )));
        }
        // A signature that is not even well-formed is not kept (a valid one was checked above).
        let signature = signature.filter(|s| signing::Signature::parse(s).is_ok());
        let sha = normalize_digest(sha256).unwrap_or_default();
        let store = self.clone();
        let digest = sha.clone();
        let sig = signature.clone();
        let already = blocking(move || store.keep_existing(&digest, sig.as_deref())).await?;
        if already {
            while let Some(c) = rest.next().await {
                c.map_err(|e| Error::BadRequest(format!("upload interrupted: {e}")))?;
            }
            return Ok(true);
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<Piece>(WRITE_QUEUE);
        let store = self.clone();
        let writer = tokio::task::spawn_blocking(move || {
            store.write_blob(&dest, &sha, size, signature.as_deref(), delta, rx)
        });
        let mut fed = tx.send(Piece::Data(first)).await.is_ok();
        let mut interrupted = None;
        while fed && let Some(c) = rest.next().await {
            match c {
                Ok(c) => fed = tx.send(Piece::Data(c)).await.is_ok(),
                Err(e) => {
                    interrupted = Some(e.to_string());
                    break;
                }
            }
        }
        if fed && interrupted.is_none() {
            // If the writer already stopped, its own error is the answer.
            let _ = tx.send(Piece::End).await;
        }
        // Without `End`, the writer discards the partial file.
        drop(tx);
        let written = writer.await.map_err(|e| Error::Task {
            context: format!("writing package {sha256}"),
            source: e,
        })?;
        if let Some(e) = interrupted {
            return Err(Error::BadRequest(format!(
                "upload interrupted: {e}; discarded"
            )));
        }
        written?;
        Ok(false)
    }

    /// When the bytes are already stored: keeps a new signature and refreshes the file's time
    /// (so the blob sweep counts its grace period from this upload); `false` when not stored.
    fn keep_existing(&self, sha256: &str, signature: Option<&[u8]>) -> Result<bool> {
        let dest = self.path(sha256)?;
        let _gc = self.gc_lock.lock().unwrap_or_else(|p| p.into_inner());
        if !dest.is_file() {
            return Ok(false);
        }
        let touched = std::fs::File::options()
            .write(true)
            .open(&dest)
            .and_then(|f| f.set_modified(SystemTime::now()));
        if let Err(e) = touched {
            tracing::warn!(file = %dest.display(), "cannot refresh the blob's time: {e}");
        }
        // The same bytes, perhaps newly signed (a key rotation): keep the new signature.
        if let Some(sig) = signature
            && self.signature(sha256).ok().flatten().as_deref() != Some(sig)
        {
            self.store_signature(sha256, sig)?;
        }
        Ok(true)
    }

    /// The blocking half of [`BlobStore::receive`]: writes and hashes what arrives on `rx`
    /// (with a delta, interleaved with the chunks held here) into a temp file, and on
    /// [`Piece::End`] checks it and moves it into place.
    fn write_blob(
        &self,
        dest: &Path,
        sha: &str,
        size: u64,
        signature: Option<&[u8]>,
        delta: Option<Delta>,
        mut rx: tokio::sync::mpsc::Receiver<Piece>,
    ) -> Result<()> {
        let mut file = IncomingFile::create(dest, sha, size)?;
        let mut assembly = match &delta {
            Some(d) => Some(
                delta::Assembly::plan(&self.local_index(sha), &d.list, &d.sent)
                    .map_err(delta_error)?,
            ),
            None => None,
        };
        loop {
            match rx.blocking_recv() {
                Some(Piece::Data(d)) => match assembly.as_mut() {
                    Some(a) => a.feed(&mut file, &d).map_err(delta_error)?,
                    None => file.write(&d)?,
                },
                Some(Piece::End) => {
                    if let Some(a) = assembly.as_mut() {
                        a.finish(&mut file).map_err(delta_error)?;
                    }
                    break;
                }
                // The sender went away without `End`: dropping `file` discards it.
                None => {
                    return Err(Error::BadRequest(
                        "upload interrupted; discarded".to_string(),
                    ));
                }
            }
        }
        // Signature first: the bytes are never stored without the signature that came with them.
        let sig_path = self.sig_path(sha)?;
        match signature {
            Some(sig) => self.store_signature(sha, sig)?,
            None => {
                let _ = std::fs::remove_file(&sig_path);
            }
        }
        if let Err(e) = file.finish() {
            let _ = std::fs::remove_file(&sig_path);
            return Err(e.into());
        }
        // Every chunk was checked (sent ones by their digest, the others copied from chunks
        // of that digest) and the whole file too: the list is how this file is cut.
        if let Some(d) = &delta {
            delta::remember(dest, &d.list);
        }
        Ok(())
    }

    /// Deletes blob files (and their signatures) that `named` does not list and whose time is
    /// older than `grace`; signatures left without their blob go too. Files under temp names
    /// (transfers in progress) are never touched. Blocking.
    pub fn sweep(&self, named: &BTreeSet<String>, grace: Duration) -> Result<Sweep> {
        let mut out = Sweep::default();
        let rd = std::fs::read_dir(&self.dir)
            .map_err(|e| Error::io(format!("list {}", self.dir.display()), e))?;
        let now = SystemTime::now();
        let old = |m: &std::fs::Metadata| {
            m.modified()
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age >= grace)
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let (digest, is_sig) = match name.strip_suffix(".sig") {
                Some(d) => (d.to_string(), true),
                None => (name.clone(), false),
            };
            // Only what this store names: `<sha256>` and `<sha256>.sig`.
            if normalize_digest(&digest).as_deref() != Some(digest.as_str()) {
                continue;
            }
            if named.contains(&digest) {
                if !is_sig {
                    out.kept += 1;
                }
                continue;
            }
            let _gc = self.gc_lock.lock().unwrap_or_else(|p| p.into_inner());
            let path = e.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if is_sig {
                // A signature whose blob is gone (a sweep interrupted between the two).
                if !self.dir.join(&digest).exists() && old(&meta) {
                    let _ = std::fs::remove_file(&path);
                }
                continue;
            }
            if !old(&meta) {
                out.kept += 1;
                continue;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    out.deleted += 1;
                    out.bytes += meta.len();
                    let _ = std::fs::remove_file(signing::sig_path(&path));
                    orch_package::chunks::forget(&path);
                }
                Err(e) => tracing::warn!(file = %path.display(), "package GC: cannot delete: {e}"),
            }
        }
        Ok(out)
    }

    /// Streams a stored blob as chunks (the first carries digest and size).
    pub async fn read_chunks(
        &self,
        sha256: &str,
    ) -> Result<impl Stream<Item = std::result::Result<BlobChunk, Status>> + Send + 'static> {
        let path = self.path(sha256)?;
        let sha = normalize_digest(sha256).unwrap_or_default();
        let store = self.clone();
        let digest = sha.clone();
        let mut signature = blocking(move || store.signature(&digest))
            .await?
            .unwrap_or_default();
        let mut f = tokio::fs::File::open(&path)
            .await
            .map_err(|e| Error::NotFound(format!("package {sha} is not stored here ({e})")))?;
        let size = f
            .metadata()
            .await
            .map_err(|e| Error::io(format!("stat {}", path.display()), e))?
            .len();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let mut first = true;
            loop {
                let mut buf = vec![0u8; CHUNK];
                let n = match f.read(&mut buf).await {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(format!("read: {e}")))).await;
                        return;
                    }
                };
                if n == 0 && !first {
                    return;
                }
                buf.truncate(n);
                let chunk = BlobChunk {
                    sha256: if first { sha.clone() } else { String::new() },
                    size: if first { size } else { 0 },
                    data: buf,
                    signature: std::mem::take(&mut signature),
                };
                first = false;
                if tx.send(Ok(chunk)).await.is_err() || n == 0 {
                    return;
                }
            }
        });
        Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
    }

    /// Copies a stored blob to another coordinator: as a delta (only the chunks it lacks)
    /// when it can take one, else whole.
    pub async fn copy_to(
        &self,
        security: &Security,
        peer_id: u64,
        peer_addr: &str,
        sha256: &str,
    ) -> Result<()> {
        let mut c = blobs_client(security, peer_id, peer_addr).await?;
        match self.copy_delta(&mut c, sha256).await {
            Ok(()) => return Ok(()),
            Err(e) => tracing::info!(
                peer = peer_addr,
                package = sha256,
                "delta copy failed, copying the whole package: {e}"
            ),
        }
        let chunks = self.read_chunks(sha256).await?;
        c.put_blob(chunks.filter_map(|c| c.ok()))
            .await
            .map_err(|e| {
                Error::Unavailable(format!("copy to coordinator {peer_addr}: {}", e.message()))
            })?;
        Ok(())
    }

    /// Asks the peer which chunks of a stored blob it lacks and sends only those.
    async fn copy_delta(
        &self,
        c: &mut BlobsClient<tonic::transport::Channel>,
        sha256: &str,
    ) -> Result<()> {
        let sha = normalize_digest(sha256)
            .ok_or_else(|| Error::BadRequest(format!("{sha256:?} is not a hex SHA-256")))?;
        let store = self.clone();
        let digest = sha.clone();
        let (chunks, signature) =
            blocking(move || Ok((store.chunks_of(&digest)?, store.signature(&digest)?))).await?;
        let refs: Vec<BlobChunkRef> = chunks
            .iter()
            .map(|c| BlobChunkRef {
                size: c.len,
                sha256: c.sha256.to_vec(),
            })
            .collect();
        let size = chunks.iter().map(|c| u64::from(c.len)).sum();
        let peer = |e: Status| Error::Unavailable(format!("delta copy: {}", e.message()));
        let reply = c
            .missing_chunks(BlobChunksRequest {
                sha256: sha.clone(),
                size,
                chunks: refs.clone(),
            })
            .await
            .map_err(peer)?
            .into_inner();
        if reply.already {
            return Ok(());
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let first = BlobDeltaChunk {
            sha256: sha.clone(),
            size,
            signature: signature.unwrap_or_default(),
            chunks: refs,
            sent: reply.missing.clone(),
            data: Vec::new(),
        };
        let _ = tx.send(first).await;
        let path = self.path(&sha)?;
        let reader = tokio::task::spawn_blocking(move || {
            read_sent(&path, &chunks, &reply.missing, |data| {
                tx.blocking_send(BlobDeltaChunk {
                    data,
                    ..Default::default()
                })
                .is_ok()
            })
        });
        let sent = c
            .put_blob_delta(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(peer);
        reader.await.map_err(|e| Error::Task {
            context: format!("reading package {sha}"),
            source: e,
        })??;
        sent?;
        Ok(())
    }

    /// Fetches a blob this coordinator lacks from one that holds it.
    pub async fn fetch_from(
        &self,
        security: &Security,
        peer_id: u64,
        peer_addr: &str,
        sha256: &str,
    ) -> Result<()> {
        let mut c = blobs_client(security, peer_id, peer_addr).await?;
        let mut stream = c
            .get_blob(BlobRequest {
                sha256: sha256.to_string(),
            })
            .await
            .map_err(|e| Error::Unavailable(format!("fetch from {peer_addr}: {}", e.message())))?
            .into_inner();
        let first = stream
            .next()
            .await
            .ok_or_else(|| Error::Unavailable(format!("{peer_addr} sent nothing")))?
            .map_err(|e| Error::Unavailable(e.message().to_string()))?;
        let sig = (!first.signature.is_empty()).then_some(first.signature);
        self.check_signature(sha256, sig.as_deref(), sha256)?;
        let rest = stream.map(|c| c.map(|c| c.data));
        self.receive(sha256, first.size, sig, first.data, rest)
            .await?;
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Runs blocking file work off the async runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Task {
            context: "package store task failed".to_string(),
            source: e,
        })?
}

/// The `Blobs` service: other coordinators put and get package bytes.
#[derive(Clone)]
pub struct BlobsService {
    pub store: BlobStore,
}

type ChunkStream = Pin<Box<dyn Stream<Item = std::result::Result<BlobChunk, Status>> + Send>>;

#[tonic::async_trait]
impl blobs_server::Blobs for BlobsService {
    async fn put_blob(
        &self,
        req: Request<Streaming<BlobChunk>>,
    ) -> std::result::Result<Response<BlobReply>, Status> {
        let mut s = req.into_inner();
        let first = s
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("empty blob stream"))??;
        let sig = (!first.signature.is_empty()).then_some(first.signature);
        self.store
            .check_signature(&first.sha256, sig.as_deref(), &first.sha256)?;
        let rest = s.map(|c| c.map(|c| c.data));
        let already = self
            .store
            .receive(&first.sha256, first.size, sig, first.data, rest)
            .await?;
        Ok(Response::new(BlobReply { already }))
    }

    type GetBlobStream = ChunkStream;

    async fn missing_chunks(
        &self,
        req: Request<BlobChunksRequest>,
    ) -> std::result::Result<Response<BlobChunksReply>, Status> {
        let r = req.into_inner();
        let list = checked_list(
            r.chunks.iter().map(|c| (c.size, c.sha256.as_slice())),
            r.size,
        )?;
        let reply = match self.store.missing_chunks(&r.sha256, list).await? {
            None => BlobChunksReply {
                missing: vec![],
                already: true,
            },
            Some(missing) => BlobChunksReply {
                missing,
                already: false,
            },
        };
        Ok(Response::new(reply))
    }

    async fn put_blob_delta(
        &self,
        req: Request<Streaming<BlobDeltaChunk>>,
    ) -> std::result::Result<Response<BlobReply>, Status> {
        let mut s = req.into_inner();
        let first = s
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("empty blob stream"))??;
        let sig = (!first.signature.is_empty()).then_some(first.signature);
        self.store
            .check_signature(&first.sha256, sig.as_deref(), &first.sha256)?;
        let list = checked_list(
            first.chunks.iter().map(|c| (c.size, c.sha256.as_slice())),
            first.size,
        )?;
        let delta = Delta {
            list,
            sent: first.sent,
        };
        let rest = s.map(|c| c.map(|c| c.data));
        let already = self
            .store
            .receive_delta(&first.sha256, first.size, sig, delta, first.data, rest)
            .await?;
        Ok(Response::new(BlobReply { already }))
    }

    async fn get_blob(
        &self,
        req: Request<BlobRequest>,
    ) -> std::result::Result<Response<Self::GetBlobStream>, Status> {
        let s = self.store.read_chunks(&req.into_inner().sha256).await?;
        Ok(Response::new(Box::pin(s)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, SystemTime};

    use sha2::{Digest, Sha256};

    use super::*;

    fn digest(data: &[u8]) -> String {
        Sha256::digest(data)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Stores `data` through `receive`; returns its digest.
    fn put(rt: &tokio::runtime::Runtime, store: &BlobStore, data: &[u8]) -> String {
        let sha = digest(data);
        let rest = futures::stream::iter(Vec::<std::result::Result<Vec<u8>, String>>::new());
        rt.block_on(store.receive(&sha, data.len() as u64, None, data.to_vec(), rest))
            .unwrap();
        sha
    }

    fn age(path: &Path, by: Duration) {
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(SystemTime::now() - by)
            .unwrap();
    }

    #[test]
    fn the_sweep_deletes_only_old_blobs_no_record_names() {
        let rt = rt();
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().join("blobs"), 1 << 20).unwrap();
        let named = put(&rt, &store, b"named");
        let old = put(&rt, &store, b"old and unnamed");
        let young = put(&rt, &store, b"young and unnamed");
        let again = put(&rt, &store, b"old, uploaded again");
        let hour = Duration::from_secs(3600);
        for sha in [&named, &old, &again] {
            age(&store.path(sha).unwrap(), 2 * hour);
        }
        // A signature beside the old blob, and one whose blob is already gone.
        let old_sig = store.sig_path(&old).unwrap();
        std::fs::write(&old_sig, b"sig").unwrap();
        age(&old_sig, 2 * hour);
        let orphan_sig = store.sig_path(&digest(b"gone")).unwrap();
        std::fs::write(&orphan_sig, b"sig").unwrap();
        age(&orphan_sig, 2 * hour);
        // A transfer in progress (temp name), old.
        let incoming = store.dir().join(format!(".incoming-{old}-1-2"));
        std::fs::write(&incoming, b"partial").unwrap();
        age(&incoming, 2 * hour);
        // A re-upload of stored bytes restarts their grace period.
        assert!(
            rt.block_on(store.receive(
                &again,
                19,
                None,
                b"old, uploaded again".to_vec(),
                futures::stream::iter(Vec::<std::result::Result<Vec<u8>, String>>::new()),
            ))
            .unwrap(),
            "already stored"
        );

        let r = store.sweep(&BTreeSet::from([named.clone()]), hour).unwrap();
        assert_eq!(r.deleted, 1, "{r:?}");
        assert_eq!(r.bytes, b"old and unnamed".len() as u64);
        assert_eq!(r.kept, 3);
        assert!(!store.has(&old));
        assert!(!old_sig.exists(), "the signature goes with its blob");
        assert!(!orphan_sig.exists());
        assert!(store.has(&named) && store.has(&young) && store.has(&again));
        assert!(incoming.exists(), "transfers in progress are never swept");
        // Nothing named and no grace: everything stored goes, temp files stay.
        let r = store.sweep(&BTreeSet::new(), Duration::ZERO).unwrap();
        assert_eq!(r.deleted, 3);
        assert!(incoming.exists());
    }

    /// Incompressible bytes, the same for the same seed.
    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect()
    }

    fn list_of(bytes: &[u8]) -> Vec<ChunkId> {
        orch_package::chunks::chunk_reader(bytes, Path::new("new"))
            .unwrap()
            .iter()
            .map(|c| (c.len, c.sha256))
            .collect()
    }

    /// The bytes of chunks `sent` of `bytes`, one item per chunk.
    fn sent_bytes(bytes: &[u8], list: &[ChunkId], sent: &[u32]) -> Vec<Vec<u8>> {
        let cs = delta::as_chunks(list);
        sent.iter()
            .map(|&i| {
                let c = cs[i as usize];
                bytes[c.offset as usize..(c.offset + u64::from(c.len)) as usize].to_vec()
            })
            .collect()
    }

    fn stream(
        items: Vec<Vec<u8>>,
    ) -> impl Stream<Item = std::result::Result<Vec<u8>, String>> + Unpin {
        futures::stream::iter(items.into_iter().map(Ok))
    }

    #[test]
    fn a_delta_is_rebuilt_from_stored_packages_and_a_lie_or_a_gap_stores_nothing() {
        let rt = rt();
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().join("blobs"), 1 << 30).unwrap();
        let old = noise(2 << 20, 1);
        put(&rt, &store, &old);
        let mut new = old.clone();
        new[1 << 20..(1 << 20) + 100].copy_from_slice(&noise(100, 2));
        let sha = digest(&new);
        let size = new.len() as u64;
        let list = list_of(&new);
        let missing = rt
            .block_on(store.missing_chunks(&sha, list.clone()))
            .unwrap()
            .unwrap();
        assert!(!missing.is_empty() && missing.len() <= 2, "{missing:?}");

        // A lying list: a sent chunk's bytes are not those its digest names.
        let mut lied = sent_bytes(&new, &list, &missing);
        lied[0][0] ^= 1;
        let delta = Delta {
            list: list.clone(),
            sent: missing.clone(),
        };
        let e = rt
            .block_on(store.receive_delta(&sha, size, None, delta.clone(), vec![], stream(lied)))
            .unwrap_err();
        assert!(matches!(e, Error::BadRequest(_)), "{e}");
        assert!(!store.has(&sha));

        // A chunk neither sent nor stored here: refused before anything is written, with the
        // advice to send the whole package.
        let gap = Delta {
            list: list.clone(),
            sent: vec![],
        };
        let e = rt
            .block_on(store.receive_delta(&sha, size, None, gap, vec![], stream(vec![])))
            .unwrap_err();
        assert!(e.to_string().contains("send the whole package"), "{e}");
        assert!(!store.has(&sha));

        // The honest delta: rebuilt, checked whole, its list kept as its chunk index.
        let sent = sent_bytes(&new, &list, &missing);
        assert!(sent.iter().map(Vec::len).sum::<usize>() < new.len() / 4);
        let already = rt
            .block_on(store.receive_delta(&sha, size, None, delta, vec![], stream(sent)))
            .unwrap();
        assert!(!already);
        let path = store.path(&sha).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), new);
        assert!(orch_package::chunks::cache_path(&path).is_file());
        assert_eq!(store.chunks_of(&sha).unwrap(), delta::as_chunks(&list));
        // Stored now: nothing is missing.
        assert_eq!(rt.block_on(store.missing_chunks(&sha, list)).unwrap(), None);
    }

    /// The runtime thread is free while a package is written and hashed: other tasks run
    /// between its chunks. (Before, the writes and the hashing ran inside the async handler,
    /// and a stream that always had the next chunk ready held the thread until the end.)
    #[test]
    fn receive_leaves_the_runtime_thread_to_other_tasks_while_writing() {
        let rt = rt();
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().join("blobs"), 1 << 30).unwrap();
        let chunks: Vec<Vec<u8>> = (0..300u32)
            .map(|i| {
                let mut c = vec![0u8; 16 << 10];
                c[..4].copy_from_slice(&i.to_le_bytes());
                c
            })
            .collect();
        let sha = digest(&chunks.concat());
        let size = chunks.iter().map(|c| c.len() as u64).sum();
        let ticks = std::sync::Arc::new(AtomicU64::new(0));
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        rt.block_on(async {
            let t = ticks.clone();
            let ticker = tokio::spawn(async move {
                loop {
                    t.fetch_add(1, Ordering::Relaxed);
                    tokio::task::yield_now().await;
                }
            });
            let mut it = chunks.into_iter();
            let first = it.next().unwrap();
            let (t, s) = (ticks.clone(), seen.clone());
            let rest = futures::stream::iter(it.map(move |c| {
                s.lock().unwrap().push(t.load(Ordering::Relaxed));
                Ok::<_, String>(c)
            }));
            let already = store.receive(&sha, size, None, first, rest).await.unwrap();
            assert!(!already);
            ticker.abort();
        });
        assert!(store.has(&sha));
        let seen = seen.lock().unwrap();
        assert!(
            seen.last() > seen.first(),
            "no other task ran while 299 chunks were written: {:?}..{:?}",
            seen.first(),
            seen.last()
        );
    }
}
