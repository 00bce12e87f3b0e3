//! A client for the coordinators' control API that hides which coordinator leads: it tries the
//! known addresses, follows `orch-leader` redirects from followers, retries while no leader is
//! elected (bounded), and re-establishes watch streams after a failover.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use orch_proto::control::{self as pb, control_client::ControlClient};
use orch_retry::Backoff;
use orch_tls::{COORDINATOR_DOMAIN, Security};
use tonic::codegen::{Service, http};
use tonic::transport::Channel;

pub use orch_proto::control;

/// Largest message the client accepts or sends (status replies with long event lists; upload
/// chunks are 256 KiB).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The coordinators answered: this is their one-line reason.
    #[error("{0}")]
    Refused(String),
    #[error(
        "no coordinator reachable at {addrs}: {last}; check ORCHESTRATOR_COORDINATORS / --coordinator"
    )]
    Unreachable { addrs: String, last: String },
    /// Every coordinator refused the TLS handshake, its certificate was refused, or (plain
    /// text against TLS) the connection broke at the protocol level: retrying cannot help,
    /// the command's TLS settings must change.
    #[error("TLS with every coordinator failed ({last}); {hint}")]
    Tls { last: String, hint: &'static str },
    #[error(
        "no leader elected among {addrs} within {waited:?} ({last}); is a majority of coordinators up?"
    )]
    NoLeader {
        addrs: String,
        waited: Duration,
        last: String,
    },
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Talks to a coordinator cluster.
#[derive(Clone)]
pub struct Client {
    addrs: Vec<String>,
    /// Mutual TLS (coordinators are dialed as [`COORDINATOR_DOMAIN`]) or plain text.
    security: Security,
    /// Index of the address that last answered (the leader, for writes).
    current: usize,
    /// How long to keep retrying while no leader is known or coordinators are unreachable.
    pub patience: Duration,
    consistency: Consistency,
}

/// What keeps this client's reads from going backwards: the newest applied index an answer
/// reflected, sent with every request (see proto/control.proto).
#[derive(Clone)]
struct Consistency {
    seen: Arc<AtomicU64>,
    /// Accept a plain read from any coordinator when no leader can be reached.
    allow_stale: bool,
    /// An answer said it may be stale.
    got_stale: Arc<AtomicBool>,
    /// A stale answer's coordinator knew no leader for this long (ms; `u64::MAX`: not said).
    no_leader_ms: Arc<AtomicU64>,
}

impl Default for Consistency {
    fn default() -> Self {
        Consistency {
            seen: Arc::default(),
            allow_stale: false,
            got_stale: Arc::default(),
            no_leader_ms: Arc::new(AtomicU64::new(u64::MAX)),
        }
    }
}

/// A channel to one coordinator that sends `orch-min-index` (and `orch-stale`) with every
/// request and keeps the newest `orch-applied` of the answers.
#[derive(Clone)]
pub struct Tracked {
    inner: Channel,
    consistency: Consistency,
}

impl Service<http::Request<tonic::body::Body>> for Tracked {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future =
        Pin<Box<dyn Future<Output = std::result::Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<tonic::body::Body>) -> Self::Future {
        let c = self.consistency.clone();
        let seen = c.seen.load(Ordering::SeqCst);
        if seen > 0
            && let Ok(v) = http::HeaderValue::from_str(&seen.to_string())
        {
            req.headers_mut().insert("orch-min-index", v);
        }
        if c.allow_stale {
            req.headers_mut()
                .insert("orch-stale", http::HeaderValue::from_static("1"));
        }
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            let h = resp.headers();
            if let Some(i) = h
                .get("orch-applied")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
            {
                c.seen.fetch_max(i, Ordering::SeqCst);
            }
            if h.get("orch-stale").is_some_and(|v| v == "1") {
                c.got_stale.store(true, Ordering::SeqCst);
                let ms = h
                    .get("orch-no-leader-ms")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(u64::MAX);
                c.no_leader_ms.store(ms, Ordering::SeqCst);
            }
            Ok(resp)
        })
    }
}

/// Pauses between attempts while no coordinator answers or none leads (up to the client's
/// patience). A redirect to the leader is followed at once.
pub const CALL_BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(50), Duration::from_millis(500));

/// What one attempt at one coordinator came to.
enum Attempt<T> {
    Answered(T),
    /// The coordinators answered with a refusal: no retry.
    Refused(String),
    /// A follower named the leader: try there at once.
    Redirected(String),
    /// Try again after a pause: why; whether TLS failed; whether no leader is elected.
    Failed {
        why: String,
        tls: bool,
        no_leader: bool,
    },
}

fn is_transport(s: &tonic::Status) -> bool {
    s.metadata().get("orch-error").is_none()
        && matches!(
            s.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
        )
}

impl Client {
    /// A client for the coordinators at `addrs`. Under mTLS every coordinator must present a
    /// coordinator certificate (they carry [`COORDINATOR_DOMAIN`]), so an agent's or an
    /// attacker's key cannot pose as one.
    pub fn new(addrs: Vec<String>, security: Security) -> Client {
        Client {
            addrs,
            security,
            current: 0,
            patience: Duration::from_secs(30),
            consistency: Consistency::default(),
        }
    }

    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    /// Accept reads from any coordinator when no leader can be reached (`--stale`); such
    /// answers may be older than the cluster's state, and [`Client::saw_stale`] says so.
    pub fn allow_stale(&mut self, yes: bool) {
        self.consistency.allow_stale = yes;
    }

    /// True when an answer came from a coordinator that could not confirm it is up to date.
    pub fn saw_stale(&self) -> bool {
        self.consistency.got_stale.load(Ordering::SeqCst)
    }

    /// For the last stale answer: how long its coordinator had known no leader, when it said.
    pub fn stale_no_leader_for(&self) -> Option<Duration> {
        match self.consistency.no_leader_ms.load(Ordering::SeqCst) {
            u64::MAX => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// The newest Raft index an answer reflected (0: none yet).
    pub fn seen_index(&self) -> u64 {
        self.consistency.seen.load(Ordering::SeqCst)
    }

    /// Connects to one coordinator; the error says whether it was a TLS failure.
    async fn connect(&self, addr: &str) -> Result<ControlClient<Tracked>, (String, bool)> {
        let ch = self
            .security
            .endpoint(addr, COORDINATOR_DOMAIN)
            .map_err(|e| (e.to_string(), false))?
            .connect_timeout(Duration::from_secs(2))
            // A frozen coordinator (SIGSTOP, partition) must not hang a call or a watch: its
            // connection is declared dead when pings go unanswered, and the next one is tried.
            .http2_keep_alive_interval(Duration::from_secs(2))
            .keep_alive_timeout(Duration::from_secs(2))
            .keep_alive_while_idle(true)
            .connect()
            .await
            .map_err(|e| {
                (
                    format!("{addr}: {}", orch_tls::connect_error(&e)),
                    orch_tls::is_tls_failure(&e),
                )
            })?;
        let tracked = Tracked {
            inner: ch,
            consistency: self.consistency.clone(),
        };
        Ok(ControlClient::new(tracked)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    /// Runs `f` against the leader (or any coordinator, for reads), following redirects and
    /// retrying while coordinators are unreachable or leaderless ([`CALL_BACKOFF`]), up to
    /// `patience`.
    pub async fn call<T, F, Fut>(&mut self, mut f: F) -> Result<T>
    where
        F: FnMut(ControlClient<Tracked>) -> Fut,
        Fut: Future<Output = std::result::Result<T, tonic::Status>>,
    {
        let mut attempts = CALL_BACKOFF.with_deadline(self.patience).start();
        let mut last: String;
        let mut leaderless = false;
        // Addresses whose last attempt failed in TLS; when that is all of them, stop at once.
        let mut tls_failed = std::collections::BTreeSet::new();
        loop {
            let idx = self.current % self.addrs.len();
            let tls = match self.attempt(idx, &mut f).await {
                Attempt::Answered(v) => return Ok(v),
                Attempt::Refused(why) => return Err(ClientError::Refused(why)),
                Attempt::Redirected(why) => {
                    last = why;
                    // A redirect is immediate; no back-off.
                    if !attempts.expired() {
                        continue;
                    }
                    false
                }
                Attempt::Failed {
                    why,
                    tls,
                    no_leader,
                } => {
                    last = why;
                    leaderless |= no_leader;
                    tls
                }
            };
            if tls {
                tls_failed.insert(idx);
                if tls_failed.len() >= self.addrs.len() {
                    return Err(ClientError::Tls {
                        last,
                        hint: self.tls_hint(),
                    });
                }
            } else {
                tls_failed.remove(&idx);
            }
            if !attempts.wait().await {
                let addrs = self.addrs.join(", ");
                return Err(if leaderless {
                    ClientError::NoLeader {
                        addrs,
                        waited: attempts.elapsed(),
                        last,
                    }
                } else {
                    ClientError::Unreachable { addrs, last }
                });
            }
        }
    }

    /// One attempt of `f` at address `idx`. Moves [`Client::current`] to where the next
    /// attempt should go: the leader a follower named, or the next address.
    async fn attempt<T, F, Fut>(&mut self, idx: usize, f: &mut F) -> Attempt<T>
    where
        F: FnMut(ControlClient<Tracked>) -> Fut,
        Fut: Future<Output = std::result::Result<T, tonic::Status>>,
    {
        let addr = self.addrs[idx].clone();
        let s = match self.connect(&addr).await {
            Ok(c) => match f(c).await {
                Ok(v) => return Attempt::Answered(v),
                Err(s) => s,
            },
            Err((why, tls)) => {
                self.current += 1;
                return Attempt::Failed {
                    why,
                    tls,
                    no_leader: false,
                };
            }
        };
        if s.metadata().get("orch-error").and_then(|v| v.to_str().ok()) == Some("not-leader") {
            let why = s.message().to_string();
            let leader = s
                .metadata()
                .get("orch-leader")
                .and_then(|v| v.to_str().ok());
            return match leader {
                Some(leader) => {
                    self.current = self.index_of(leader);
                    Attempt::Redirected(why)
                }
                None => {
                    self.current += 1;
                    Attempt::Failed {
                        why,
                        tls: false,
                        no_leader: true,
                    }
                }
            };
        }
        let why = format!("{addr}: {}", s.message());
        let tls = if is_transport(&s) {
            // Under TLS 1.3 a refused client certificate shows up on the first call.
            orch_tls::is_tls_failure(&s)
        } else if s.code() == tonic::Code::Internal
            && s.metadata().get("orch-error").is_none()
            && std::error::Error::source(&s).is_some()
        {
            // Not an answer but the connection failing at the HTTP/2 level (a TLS server
            // spoken to in plain text): counted like a TLS failure.
            true
        } else {
            return Attempt::Refused(s.message().to_string());
        };
        self.current += 1;
        Attempt::Failed {
            why,
            tls,
            no_leader: false,
        }
    }

    /// The index of address `addr`, added to the known ones if it is new (a leader named by a
    /// follower).
    fn index_of(&mut self, addr: &str) -> usize {
        match self.addrs.iter().position(|a| a == addr) {
            Some(i) => i,
            None => {
                self.addrs.push(addr.to_string());
                self.addrs.len() - 1
            }
        }
    }

    /// What to change when every coordinator failed TLS.
    fn tls_hint(&self) -> &'static str {
        match self.security {
            Security::Insecure => {
                "this command used --insecure: if the coordinators serve mutual TLS, drop it and pass --tls-dir (or set ORCHESTRATOR_TLS_DIR)"
            }
            Security::Mtls(_) => {
                "check the certificate this command uses (--tls-dir, --ca/--cert/--key or ORCHESTRATOR_TLS_DIR): it must be issued by the cluster's CA, not expired, and be an operator's or viewer's"
            }
        }
    }

    /// Starts a rollout. A request without a `request_id` gets one here, kept across retries.
    pub async fn start_rollout(
        &mut self,
        mut req: pb::StartRolloutRequest,
    ) -> Result<pb::RolloutStatus> {
        if req.request_id.is_empty() {
            req.request_id = request_id();
        }
        self.call(|mut c| {
            let req = req.clone();
            async move { c.start_rollout(req).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// A rollout's plan without creating it: preflight run by the coordinators, nothing
    /// recorded (see `PlanRollout` in control.proto).
    pub async fn plan_rollout(&mut self, req: pb::PlanRolloutRequest) -> Result<pb::RolloutPlan> {
        self.call(|mut c| {
            let req = req.clone();
            async move { c.plan_rollout(req).await.map(|r| r.into_inner()) }
        })
        .await
    }

    pub async fn rollout(&mut self, id: &str) -> Result<pb::RolloutStatus> {
        let id = id.to_string();
        self.call(|mut c| {
            let req = pb::RolloutRef {
                id: id.clone(),
                ..Default::default()
            };
            async move { c.get_rollout(req).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// The rollouts in the replicated state (the newest ones), or with `all` also those moved
    /// to the coordinators' history files.
    pub async fn rollouts(&mut self, all: bool) -> Result<Vec<pb::RolloutStatus>> {
        self.call(|mut c| async move {
            c.list_rollouts(pb::ListRolloutsRequest { all })
                .await
                .map(|r| r.into_inner().rollouts)
        })
        .await
    }

    pub async fn command(
        &mut self,
        id: &str,
        command: &str,
        by: &str,
    ) -> Result<pb::RolloutStatus> {
        let req = pb::RolloutCommandRequest {
            id: id.to_string(),
            command: command.to_string(),
            requested_by: by.to_string(),
            request_id: request_id(),
        };
        self.call(|mut c| {
            let req = req.clone();
            async move { c.rollout_command(req).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// Removes node `id` from the registry.
    pub async fn forget_node(&mut self, id: &str, by: &str) -> Result<()> {
        let req = pb::ForgetNodeRequest {
            id: id.to_string(),
            requested_by: by.to_string(),
            request_id: request_id(),
        };
        self.call(|mut c| {
            let req = req.clone();
            async move { c.forget_node(req).await.map(drop) }
        })
        .await
    }

    pub async fn nodes(&mut self, probe: bool) -> Result<Vec<pb::NodeEntry>> {
        self.call(|mut c| async move {
            c.list_nodes(pb::ListNodesRequest {
                probe,
                probe_max_age_ms: 0,
            })
            .await
            .map(|r| r.into_inner().nodes)
        })
        .await
    }

    pub async fn cluster_status(&mut self) -> Result<pb::ClusterStatusReply> {
        self.call(|mut c| async move {
            c.cluster_status(pb::ClusterStatusRequest {})
                .await
                .map(|r| r.into_inner())
        })
        .await
    }

    pub async fn add_member(&mut self, id: u64, address: &str) -> Result<pb::ClusterStatusReply> {
        let req = pb::MemberRequest {
            id,
            address: address.to_string(),
        };
        self.call(|mut c| {
            let req = req.clone();
            async move { c.add_member(req).await.map(|r| r.into_inner()) }
        })
        .await
    }

    pub async fn remove_member(&mut self, id: u64) -> Result<pb::ClusterStatusReply> {
        self.call(|mut c| async move {
            c.remove_member(pb::MemberRequest {
                id,
                address: String::new(),
            })
            .await
            .map(|r| r.into_inner())
        })
        .await
    }

    pub async fn register_node(&mut self, req: pb::RegisterNodeRequest) -> Result<bool> {
        self.call(|mut c| {
            let req = req.clone();
            async move { c.register_node(req).await.map(|r| r.into_inner().changed) }
        })
        .await
    }

    /// Uploads a package file (streamed in chunks) to the leader.
    pub async fn upload(
        &mut self,
        path: &std::path::Path,
        header: pb::UploadHeader,
    ) -> Result<pb::UploadReply> {
        let path = path.to_path_buf();
        self.call(|mut c| {
            let path = path.clone();
            let header = header.clone();
            async move {
                let chunks = file_chunks(path, header).await?;
                c.upload_package(chunks).await.map(|r| r.into_inner())
            }
        })
        .await
    }

    /// Uploads a package as the chunks the leader lacks: `chunks` is the file's chunk list, in
    /// order (`orch_package::chunks`). Asks the leader which chunks none of its stored packages
    /// holds, then streams only those; the leader rebuilds the file and checks size, sha256 and
    /// signature of the whole. Returns the reply and the bytes sent. An error (a leader that
    /// predates delta uploads, a chunk gone meanwhile) stores nothing: upload the whole file
    /// then ([`Client::upload`]).
    pub async fn upload_delta(
        &mut self,
        path: &std::path::Path,
        header: pb::UploadHeader,
        chunks: Vec<pb::PackageChunkRef>,
    ) -> Result<(pb::UploadReply, u64)> {
        let path = path.to_path_buf();
        self.call(|mut c| {
            let path = path.clone();
            let header = header.clone();
            let chunks = chunks.clone();
            async move {
                let ask = pb::MissingPackageChunksRequest {
                    sha256: header.sha256.clone(),
                    size: header.size,
                    chunks: chunks.clone(),
                };
                let missing = c.missing_package_chunks(ask).await?.into_inner();
                let sent = if missing.stored {
                    Vec::new()
                } else {
                    missing.missing
                };
                let bytes = sent
                    .iter()
                    .filter_map(|&i| chunks.get(i as usize))
                    .map(|c| u64::from(c.size))
                    .sum();
                let stream = delta_chunks(path, header, chunks, sent);
                let reply = c.upload_package_delta(stream).await?.into_inner();
                Ok((reply, bytes))
            }
        })
        .await
    }

    /// Calls `on_status` with the rollout's status now and at every change, until it reaches a
    /// terminal phase; re-subscribes (through any coordinator) when a stream breaks. The stream
    /// carries deltas after its first status (its cost stays flat however large the rollout);
    /// they are merged here, so `on_status` always sees the full status.
    pub async fn follow(
        &mut self,
        id: &str,
        mut on_status: impl FnMut(&pb::RolloutStatus),
        is_terminal: impl Fn(&str) -> bool,
    ) -> Result<pb::RolloutStatus> {
        use tokio_stream::StreamExt;
        loop {
            let id_s = id.to_string();
            let mut stream = self
                .call(|mut c| {
                    let req = pb::RolloutRef {
                        id: id_s.clone(),
                        incremental: true,
                    };
                    async move { c.watch_rollout(req).await.map(|r| r.into_inner()) }
                })
                .await?;
            // A new stream starts with a full status, which replaces what an earlier one built.
            let mut st = pb::RolloutStatus::default();
            loop {
                match stream.next().await {
                    Some(Ok(update)) => {
                        st.merge_watch_update(update);
                        on_status(&st);
                        if is_terminal(&st.phase) {
                            return Ok(st);
                        }
                    }
                    Some(Err(s)) if !is_transport(&s) => {
                        return Err(ClientError::Refused(s.message().to_string()));
                    }
                    // The coordinator went away: watch again through another one.
                    Some(Err(_)) | None => {
                        self.current += 1;
                        break;
                    }
                }
            }
        }
    }
}

/// A new id for one mutating request, sent unchanged with each of its retries (128 random bits
/// as hex: unique across clients without coordination).
pub fn request_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let n = COUNT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    // RandomState is seeded from the OS's randomness, differently in every process.
    let half = |salt: u64| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(nanos);
        h.write_u64(n);
        h.write_u64(salt);
        h.write_u32(std::process::id());
        h.finish()
    };
    format!("{:016x}{:016x}", half(1), half(2))
}

/// The stream of a delta upload: the header, list and indexes, then the bytes of the chunks
/// `sent` read from the file. A read failure ends the stream early, which the leader refuses
/// as truncated (nothing is stored).
fn delta_chunks(
    path: std::path::PathBuf,
    header: pb::UploadHeader,
    chunks: Vec<pb::PackageChunkRef>,
    sent: Vec<u32>,
) -> tokio_stream::wrappers::ReceiverStream<pb::UploadDeltaChunk> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::FileExt;
        let mut offsets = Vec::with_capacity(chunks.len());
        let mut at = 0u64;
        for c in &chunks {
            offsets.push(at);
            at += u64::from(c.size);
        }
        let first = pb::UploadDeltaChunk {
            header: Some(header),
            chunks: chunks.clone(),
            sent: sent.clone(),
            data: Vec::new(),
        };
        if tx.blocking_send(first).is_err() {
            return;
        }
        let Ok(f) = std::fs::File::open(&path) else {
            return;
        };
        for i in sent {
            let (Some(c), Some(&offset)) = (chunks.get(i as usize), offsets.get(i as usize)) else {
                return;
            };
            let mut data = vec![0u8; c.size as usize];
            if f.read_exact_at(&mut data, offset).is_err() {
                return;
            }
            let chunk = pb::UploadDeltaChunk {
                data,
                ..Default::default()
            };
            if tx.blocking_send(chunk).is_err() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

async fn file_chunks(
    path: std::path::PathBuf,
    header: pb::UploadHeader,
) -> std::result::Result<tokio_stream::wrappers::ReceiverStream<pb::UploadChunk>, tonic::Status> {
    use tokio::io::AsyncReadExt;
    let mut f = tokio::fs::File::open(&path)
        .await
        .map_err(|e| tonic::Status::internal(format!("open {}: {e}", path.display())))?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let mut header = Some(header);
        loop {
            let mut buf = vec![0u8; 256 << 10];
            let Ok(n) = f.read(&mut buf).await else {
                return;
            };
            if n == 0 && header.is_none() {
                return;
            }
            buf.truncate(n);
            let chunk = pb::UploadChunk {
                header: header.take(),
                data: buf,
            };
            if tx.send(chunk).await.is_err() || n == 0 {
                return;
            }
        }
    });
    Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
}
