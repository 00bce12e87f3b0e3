//! Package bytes, content-addressed by SHA-256 under `DATA/blobs/`, and the `Blobs` peer
//! service that copies them between coordinators. Bytes never enter the Raft log: the log only
//! records which coordinators hold which digest. A package's detached signature, when it has
//! one, is kept beside its bytes as `<sha256>.sig` and travels with them (to other
//! coordinators and to agents); with trusted keys, unsigned bytes are refused before storing.

use std::path::{Path, PathBuf};
use std::pin::Pin;

use futures::Stream;
use orch_proto::raft::{
    BlobChunk, BlobReply, BlobRequest, blobs_client::BlobsClient, blobs_server,
};
use orch_release::incoming::IncomingFile;
use orch_release::package::normalize_digest;
use orch_release::signing::{self, MAX_SIG_BYTES, TrustedKeys};
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
}

impl BlobStore {
    pub fn open(dir: PathBuf, max_size: u64) -> Result<BlobStore> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::Io(format!("create {}: {e}", dir.display())))?;
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
        self.trusted
            .verify(sig, sha256)
            .map(|_| ())
            .map_err(|reason| {
                Error::Release(orch_release::Error::Signature {
                    file: what.to_string(),
                    reason,
                })
            })
    }

    fn sig_path(&self, sha256: &str) -> Result<PathBuf> {
        Ok(signing::sig_path(&self.path(sha256)?))
    }

    /// The stored signature of a blob, if it has one.
    pub fn signature(&self, sha256: &str) -> Result<Option<Vec<u8>>> {
        let blob = self.path(sha256)?;
        signing::read_sig(&blob).map_err(|e| Error::Io(format!("signature of {sha256}: {e}")))
    }

    fn store_signature(&self, sha256: &str, sig: &[u8]) -> Result<()> {
        let path = self.sig_path(sha256)?;
        orch_release::fsutil::write_atomic(&path, sig)?;
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

    /// Receives a stream of data chunks for `sha256`/`size` (and its signature, kept beside
    /// the bytes); `Ok(true)` if the bytes were already here. The caller checks the signature
    /// first ([`BlobStore::check_signature`]).
    pub async fn receive<S, E>(
        &self,
        sha256: &str,
        size: u64,
        signature: Option<Vec<u8>>,
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
        if dest.is_file() {
            while let Some(c) = rest.next().await {
                c.map_err(|e| Error::BadRequest(format!("upload interrupted: {e}")))?;
            }
            // The same bytes, perhaps newly signed (a key rotation): keep the new signature.
            if let Some(sig) = &signature
                && self.signature(sha256).ok().flatten().as_deref() != Some(sig.as_slice())
            {
                self.store_signature(sha256, sig)?;
            }
            return Ok(true);
        }
        let sha = normalize_digest(sha256).unwrap_or_default();
        let mut file = IncomingFile::create(&dest, &sha, size)?;
        file.write(&first)?;
        while let Some(c) = rest.next().await {
            let c =
                c.map_err(|e| Error::BadRequest(format!("upload interrupted: {e}; discarded")))?;
            file.write(&c)?;
        }
        // Signature first: the bytes are never stored without the signature that came with them.
        let sig_path = self.sig_path(sha256)?;
        match &signature {
            Some(sig) => self.store_signature(sha256, sig)?,
            None => {
                let _ = std::fs::remove_file(&sig_path);
            }
        }
        let finished = tokio::task::spawn_blocking(move || file.finish())
            .await
            .map_err(|e| Error::Io(format!("finishing upload: {e}")))?;
        if let Err(e) = finished {
            let _ = std::fs::remove_file(&sig_path);
            return Err(e.into());
        }
        Ok(false)
    }

    /// Streams a stored blob as chunks (the first carries digest and size).
    pub async fn read_chunks(
        &self,
        sha256: &str,
    ) -> Result<impl Stream<Item = std::result::Result<BlobChunk, Status>> + Send + 'static> {
        let path = self.path(sha256)?;
        let sha = normalize_digest(sha256).unwrap_or_default();
        let mut signature = self.signature(sha256)?.unwrap_or_default();
        let mut f = tokio::fs::File::open(&path)
            .await
            .map_err(|e| Error::NotFound(format!("package {sha} is not stored here ({e})")))?;
        let size = f
            .metadata()
            .await
            .map_err(|e| Error::Io(format!("stat {}: {e}", path.display())))?
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

    /// Copies a stored blob to another coordinator.
    pub async fn copy_to(
        &self,
        security: &Security,
        peer_id: u64,
        peer_addr: &str,
        sha256: &str,
    ) -> Result<()> {
        let chunks = self.read_chunks(sha256).await?;
        let mut c = blobs_client(security, peer_id, peer_addr).await?;
        c.put_blob(chunks.filter_map(|c| c.ok()))
            .await
            .map_err(|e| {
                Error::Unavailable(format!("copy to coordinator {peer_addr}: {}", e.message()))
            })?;
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

    async fn get_blob(
        &self,
        req: Request<BlobRequest>,
    ) -> std::result::Result<Response<Self::GetBlobStream>, Status> {
        let s = self.store.read_chunks(&req.into_inner().sha256).await?;
        Ok(Response::new(Box::pin(s)))
    }
}
