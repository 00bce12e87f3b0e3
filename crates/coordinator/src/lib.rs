//! The coordinator: holds the cluster's state in a Raft log (openraft, persisted in redb),
//! serves the control API to operators and registration to agents, stores package bytes
//! content-addressed, and, on the Raft leader only, drives rollouts through the agents.
//!
//! `serve(config, listener, shutdown)` is the whole daemon, so tests can run clusters in-process.

pub mod agents;
pub mod blobs;
pub mod control;
pub mod driver;
pub mod error;
pub mod history;
pub mod raft;
pub mod retention;
pub mod state;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use orch_proto::control::control_server::ControlServer;
use orch_proto::raft::blobs_server::BlobsServer;
use orch_tls::{Role, Security, ServerLimits};
use serde::Deserialize;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;

use crate::agents::AgentPool;
use crate::blobs::BlobStore;
use crate::raft::{RaftConfig, RaftNode};
use crate::state::ClusterState;

pub use error::{Error, Result};

#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub id: u64,
    pub listen: SocketAddr,
    /// The address other coordinators and clients dial (defaults to `listen`).
    pub advertise: Option<String>,
    pub data_dir: PathBuf,
    /// The other coordinators: id -> address.
    pub peers: BTreeMap<u64, String>,
    pub bootstrap: bool,
    /// Mutual TLS (the default) or the explicitly requested plain text.
    pub security: Security,
    /// Allow `Security::Insecure` on a non-loopback listen address.
    pub insecure_allow_remote: bool,
    pub limits: ServerLimits,
    pub max_package_bytes: u64,
    /// `signing.pub` files: when any is given, package uploads and rollouts need a valid
    /// signature from one of them.
    pub trusted_keys: Vec<PathBuf>,
    /// Finished rollouts kept in the replicated state (at least 1); older ones move to
    /// `DATA/history.jsonl`. Only the leader's setting counts.
    pub retain_rollouts: usize,
    /// How long an unreferenced package record or blob file is kept after its upload.
    pub gc_grace: Duration,
}

impl CoordinatorConfig {
    pub fn new(id: u64, listen: SocketAddr, data_dir: PathBuf, security: Security) -> Self {
        CoordinatorConfig {
            id,
            listen,
            advertise: None,
            data_dir,
            peers: BTreeMap::new(),
            bootstrap: false,
            security,
            insecure_allow_remote: false,
            limits: ServerLimits::default(),
            max_package_bytes: 4 << 30,
            trusted_keys: Vec::new(),
            retain_rollouts: retention::DEFAULT_RETAIN_ROLLOUTS,
            gc_grace: retention::DEFAULT_GC_GRACE,
        }
    }

    pub fn address(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| self.listen.to_string())
    }
}

/// The `--config FILE` format: the same keys as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct CoordinatorFileConfig {
    pub id: Option<u64>,
    pub listen: Option<String>,
    pub advertise: Option<String>,
    pub data_dir: Option<PathBuf>,
    /// `ID=ADDR` entries.
    #[serde(default)]
    pub peer: Vec<String>,
    pub bootstrap: Option<bool>,
    /// A party folder holding ca.pem, cert.pem and key.pem (`orchestrator certs init`).
    pub tls_dir: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub insecure: Option<bool>,
    /// `trusted-key = ["/etc/orchestrator/signing.pub"]`
    #[serde(default)]
    pub trusted_key: Vec<PathBuf>,
    pub insecure_allow_remote: Option<bool>,
    /// Finished rollouts kept in the replicated state (`--retain-rollouts`).
    pub retain_rollouts: Option<usize>,
}

impl CoordinatorFileConfig {
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        toml::from_str(text).map_err(|e| e.message().to_string())
    }
}

/// Parses `ID=ADDR`.
pub fn parse_peer(s: &str) -> std::result::Result<(u64, String), String> {
    let (id, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("--peer {s:?} is not ID=HOST:PORT"))?;
    let id = id
        .parse()
        .map_err(|_| format!("--peer {s:?}: the id must be a number"))?;
    if addr.is_empty() {
        return Err(format!("--peer {s:?}: the address is empty"));
    }
    Ok((id, addr.to_string()))
}

/// A member that answered the leader within this long counts as reachable (heartbeats go out
/// every 100 ms).
const REACHABLE_WITHIN: Duration = Duration::from_secs(3);

/// What the services and the driver share.
pub struct Shared {
    /// How this coordinator dials peers and agents, and checks its callers.
    pub security: Security,
    pub raft: RaftNode,
    pub blobs: BlobStore,
    pub agents: AgentPool,
    /// Rollouts archived out of the replicated state (read-only here; the state machine
    /// appends).
    pub history: history::History,
}

impl Shared {
    /// Reads the replicated state.
    pub fn read<T>(&self, f: impl FnOnce(&ClusterState) -> T) -> T {
        let view = self.raft.state();
        let guard = view.read().unwrap_or_else(|p| p.into_inner());
        f(&guard)
    }

    /// Copies a blob to every other member it can reach; returns the holders (including this
    /// one). Fails unless a majority of voters hold it.
    pub async fn replicate_blob(&self, sha: &str) -> Result<Vec<u64>> {
        let status = self.raft.metrics();
        let me = self.raft.id();
        let mut holders = vec![me];
        let mut failures = Vec::new();
        let copies = futures::future::join_all(status.members.iter().filter(|m| m.id != me).map(
            |m| async move {
                (
                    m.id,
                    self.blobs.copy_to(&self.security, m.id, &m.addr, sha).await,
                )
            },
        ))
        .await;
        for (id, r) in copies {
            match r {
                Ok(()) => holders.push(id),
                Err(e) => failures.push(format!("coordinator {id}: {e}")),
            }
        }
        holders.sort_unstable();
        let voters: std::collections::BTreeSet<u64> = status
            .members
            .iter()
            .filter(|m| m.voter)
            .map(|m| m.id)
            .collect();
        if !control::enough_holders(&voters, &holders) {
            return Err(Error::Unavailable(format!(
                "the package reached only coordinators {holders:?}; a majority must hold it ({})",
                failures.join("; ")
            )));
        }
        if !failures.is_empty() {
            tracing::warn!(
                ?failures,
                "package not copied everywhere; it will be fetched on demand"
            );
        }
        Ok(holders)
    }

    /// Makes sure this coordinator has a blob, fetching it from a holder when missing.
    pub async fn ensure_blob(&self, sha: &str) -> Result<()> {
        if self.blobs.has(sha) {
            return Ok(());
        }
        let holders: Vec<u64> = self.read(|s| {
            s.packages
                .get(sha)
                .map(|p| p.holders.iter().copied().collect())
                .unwrap_or_default()
        });
        let members = self.raft.metrics().members;
        let mut last = String::from("no coordinator holds it");
        for h in holders {
            if let Some(m) = members.iter().find(|m| m.id == h && m.id != self.raft.id()) {
                match self
                    .blobs
                    .fetch_from(&self.security, m.id, &m.addr, sha)
                    .await
                {
                    Ok(()) => return Ok(()),
                    Err(e) => last = e.to_string(),
                }
            }
        }
        Err(Error::Unavailable(format!("package {sha}: {last}")))
    }

    /// The boot id of the agent that answers at `addr` as node `node` (within 2 s), if one
    /// does: `None` when nothing answers there, or something else does.
    pub async fn live_agent(&self, node: &orch_types::NodeId, addr: &str) -> Option<u64> {
        let mut c = self.agents.client(node.as_str(), addr).ok()?;
        let mut req = tonic::Request::new(orch_proto::agent::NodeInfoRequest {});
        req.set_timeout(Duration::from_secs(2));
        let info = tokio::time::timeout(Duration::from_secs(2), c.node_info(req))
            .await
            .ok()?
            .ok()?
            .into_inner();
        (info.node_id == node.as_str()).then_some(info.boot_id)
    }

    /// Probes an agent's health for `nodes --json`.
    pub async fn probe_node(&self, node: &str, addr: &str) -> (bool, String) {
        let mut c = match self.agents.client(node, addr) {
            Ok(c) => c,
            Err(e) => return (false, e),
        };
        let req = orch_proto::agent::HealthRequest {
            expect_version: String::new(),
        };
        match tokio::time::timeout(Duration::from_secs(3), c.health(req)).await {
            Ok(Ok(r)) => {
                let r = r.into_inner();
                (r.healthy, format!("{}: {}", r.check, r.detail))
            }
            Ok(Err(s)) => (false, format!("agent unreachable: {}", s.message())),
            Err(_) => (false, "agent did not answer within 3s".into()),
        }
    }

    /// `cluster status` as this coordinator sees it: the members, and from the leader also
    /// when each last answered and how far behind it is, and whether a majority answers.
    pub fn cluster_status(&self) -> orch_proto::control::ClusterStatusReply {
        let m = self.raft.metrics();
        let me = self.raft.id();
        let leading = m.role == raft::Role::Leader;
        let recent = |d: &Option<Duration>| d.is_some_and(|d| d <= REACHABLE_WITHIN);
        let (quorum, note) = if leading {
            match m.quorum_acked {
                Some(d) if d <= REACHABLE_WITHIN => (
                    true,
                    format!(
                        "a majority acknowledged this leader {} ms ago",
                        d.as_millis()
                    ),
                ),
                Some(d) => (
                    false,
                    format!(
                        "quorum lost: no majority has answered this leader for {}s; writes and rollouts stop until a majority of the voters is back",
                        d.as_secs()
                    ),
                ),
                None => (
                    false,
                    "quorum not confirmed: no majority has answered this leader in its term".into(),
                ),
            }
        } else {
            match &m.leader {
                Some((id, addr)) => (
                    true,
                    format!(
                        "answered by follower {me}; the leader is coordinator {id} at {addr} (ask it for every member's liveness)"
                    ),
                ),
                None => (
                    false,
                    format!(
                        "no leader elected (term {}): a majority of the voters may be down or cut off from each other",
                        m.term
                    ),
                ),
            }
        };
        let leader_id = m.leader.as_ref().map(|l| l.0).unwrap_or(0);
        orch_proto::control::ClusterStatusReply {
            leader_id,
            leader_address: m.leader.clone().map(|l| l.1).unwrap_or_default(),
            term: m.term,
            members: m
                .members
                .iter()
                .map(|x| {
                    let this = x.id == me;
                    let live = m.liveness.get(&x.id).copied().unwrap_or_default();
                    orch_proto::control::Member {
                        id: x.id,
                        address: x.addr.clone(),
                        role: if x.voter { "voter" } else { "learner" }.into(),
                        reachable: this
                            || recent(&live.last_ack)
                            || (!leading && x.id == leader_id),
                        last_contact_ms_ago: if this {
                            Some(0)
                        } else {
                            live.last_ack.map(|d| d.as_millis() as u64)
                        },
                        lag: if this {
                            Some(0)
                        } else {
                            live.matched.map(|i| m.last_log_index.saturating_sub(i))
                        },
                    }
                })
                .collect(),
            last_applied: m.last_applied,
            answered_by: me,
            cluster_id: self.read(|s| s.cluster_id.clone()).unwrap_or_default(),
            quorum,
            note,
        }
    }
}

/// Binds `config.listen` and serves until `shutdown` resolves.
pub async fn run(
    config: CoordinatorConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| Error::Io(format!("cannot listen on {}: {e}", config.listen)))?;
    serve(config, listener, shutdown).await
}

/// Serves the control, Raft and blob services on one listener until `shutdown` resolves.
pub async fn serve(
    config: CoordinatorConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let security = config.security.clone();
    let refused = |e: orch_tls::Error| Error::Refused(e.to_string());
    security
        .expect_identity(Role::Coordinator, &config.id.to_string())
        .map_err(refused)?;
    let local = listener.local_addr().unwrap_or(config.listen);
    security
        .check_listen(local, config.insecure_allow_remote)
        .map_err(refused)?;
    let mut server = security.server(&config.limits).map_err(refused)?;
    if security.is_insecure() {
        tracing::warn!(
            "coordinator serving plain-text gRPC (--insecure): anyone who can reach it can run rollouts"
        );
    }
    // A peer at this coordinator's own address would be this coordinator answering Raft
    // messages meant for another member (seen as a Raft core panic): refuse the typo.
    let own = config.address();
    if let Some((id, _)) = config
        .peers
        .iter()
        .find(|(id, addr)| **id != config.id && **addr == own)
    {
        return Err(Error::Refused(format!(
            "--peer {id}={own} is this coordinator's own address (coordinator {}): every coordinator needs its own address; fix the peer list",
            config.id
        )));
    }
    if config.retain_rollouts == 0 {
        return Err(Error::Refused(
            "--retain-rollouts 0 would archive every rollout as soon as it finishes: keep at least 1 (default 100)".to_string(),
        ));
    }
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| Error::Io(format!("create {}: {e}", config.data_dir.display())))?;
    claim_data_dir(&config.data_dir, config.id)?;
    let blobs = BlobStore::open(config.data_dir.join("blobs"), config.max_package_bytes)?
        .with_trusted(load_trusted_keys(&config.trusted_keys)?);
    let mut raft_cfg = RaftConfig::new(
        config.id,
        config.address(),
        config.data_dir.join("raft"),
        config.peers.clone(),
        config.bootstrap,
    );
    raft_cfg.security = security.clone();
    let history_path = config.data_dir.join(history::HISTORY_FILE);
    raft_cfg.history_path = history_path.clone();
    let raft = RaftNode::start(raft_cfg)
        .await
        .map_err(|e| Error::Internal(format!("starting Raft: {e}")))?;
    {
        // The membership is known once the stored log has been read: check in the background.
        let (config, raft) = (config.clone(), raft.clone());
        tokio::spawn(async move {
            for _ in 0..100 {
                let m = raft.metrics();
                if !m.members.is_empty() {
                    warn_on_peer_mismatch(&config, &m);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }
    let shared = Arc::new(Shared {
        security: security.clone(),
        raft: raft.clone(),
        blobs: blobs.clone(),
        agents: AgentPool::new(security.clone()),
        history: history::History::new(history_path),
    });
    let stop = tokio_util::sync::CancellationToken::new();
    let leadership = tokio::spawn(lead_when_leader(shared.clone(), stop.clone()));
    // The retention jobs take a watch; the driver a cancellation token.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let retention_cfg = retention::RetentionConfig {
        keep: config.retain_rollouts,
        grace: config.gc_grace,
    };
    let retention = tokio::spawn(retention::run(
        shared.clone(),
        retention_cfg,
        stop_rx.clone(),
    ));
    let sweeper = tokio::spawn(retention::sweep_blobs(
        shared.clone(),
        retention_cfg,
        stop_rx.clone(),
    ));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(orch_proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Internal(format!("reflection: {e}")))?;
    tracing::info!(id = config.id, addr = %config.address(), "coordinator listening");
    // Package bytes move between coordinators only: no other role may read or plant them.
    let blobs_svc = InterceptedService::new(
        BlobsServer::new(blobs::BlobsService { store: blobs })
            .max_decoding_message_size(blobs::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(blobs::MAX_MESSAGE_BYTES),
        security.mode().interceptor(&[Role::Coordinator]),
    );
    let result = server
        .add_service(reflection)
        .add_service(raft.peer_service())
        .add_service(blobs_svc)
        .add_service(
            ControlServer::new(control::ControlService {
                shared: shared.clone(),
            })
            .max_decoding_message_size(control::MAX_REQUEST_BYTES)
            .max_encoding_message_size(control::MAX_REPLY_BYTES),
        )
        .serve_with_incoming_shutdown(orch_tls::incoming(listener), shutdown)
        .await;
    stop.cancel();
    let _ = stop_tx.send(true);
    let _ = leadership.await;
    let _ = retention.await;
    let _ = sweeper.await;
    raft.shutdown().await;
    result.map_err(|e| Error::Internal(format!("server: {e}")))
}

/// The file in a data directory that names the coordinator it belongs to.
pub const DATA_DIR_ID_FILE: &str = "coordinator-id";

/// Records which coordinator a data directory belongs to, and refuses to start another one
/// on it: coordinator 2 serving coordinator 3's log would vote and answer as 3 does.
fn claim_data_dir(dir: &std::path::Path, id: u64) -> Result<()> {
    let path = dir.join(DATA_DIR_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let owner: u64 = text.trim().parse().map_err(|_| {
                Error::Refused(format!(
                    "{} does not hold a coordinator id ({:?}); restore it (it names the coordinator this data directory belongs to)",
                    path.display(),
                    text.chars().take(32).collect::<String>()
                ))
            })?;
            if owner != id {
                return Err(Error::Refused(format!(
                    "data directory {} belongs to coordinator {owner}, not {id}: start it with --id {owner}, or give coordinator {id} its own --data-dir",
                    dir.display()
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            orch_package::fsutil::write_atomic(&path, format!("{id}\n").as_bytes()).map_err(|e| {
                Error::Io(format!(
                    "record {}: {}",
                    path.display(),
                    orch_tls::error_chain(&e)
                ))
            })
        }
        Err(e) => Err(Error::Io(format!("read {}: {e}", path.display()))),
    }
}

/// The Raft membership decides who the peers are once the cluster exists; a `--peer` list
/// that says otherwise is ignored, so say so (a typo there is otherwise silent).
fn warn_on_peer_mismatch(config: &CoordinatorConfig, status: &raft::RaftStatus) {
    if status.members.is_empty() {
        return;
    }
    let mut given: BTreeMap<u64, String> = config.peers.clone();
    given.insert(config.id, config.address());
    let actual: BTreeMap<u64, String> = status
        .members
        .iter()
        .map(|m| (m.id, m.addr.clone()))
        .collect();
    if config.peers.is_empty() || given == actual {
        return;
    }
    let show = |m: &BTreeMap<u64, String>| {
        m.iter()
            .map(|(id, a)| format!("{id}={a}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    tracing::warn!(
        "the --peer list ({}) differs from the cluster's Raft membership ({}); the membership wins: change it with `orchestrator cluster add|remove`, or fix --peer",
        show(&given),
        show(&actual)
    );
}

/// Loads `--trusted-key` files; one that cannot be read stops the daemon (a typo must not
/// silently turn signature checks off or lock out good packages).
fn load_trusted_keys(paths: &[PathBuf]) -> Result<orch_package::TrustedKeys> {
    let keys = orch_package::TrustedKeys::load(paths).map_err(|e| {
        Error::Refused(format!(
            "cannot load a --trusted-key: {}; fix the path or the file and restart",
            orch_tls::error_chain(&e)
        ))
    })?;
    if !keys.is_empty() {
        tracing::info!(keys = ?keys.ids(), "package uploads and rollouts need a trusted signature");
    }
    Ok(keys)
}

/// Starts a driver for each term in which this coordinator leads, and stops it (waiting until
/// every task of that term is gone) when the term ends.
async fn lead_when_leader(shared: Arc<Shared>, stop: tokio_util::sync::CancellationToken) {
    let mut leadership = shared.raft.leadership();
    let mut driver: Option<(
        u64,
        tokio_util::sync::CancellationToken,
        tokio::task::JoinHandle<()>,
    )> = None;
    loop {
        let leading = shared.raft.is_leader();
        let term = shared.raft.current_term();
        match &driver {
            Some((t, _, h)) if h.is_finished() || !leading || *t != term => {
                if let Some((_, token, h)) = driver.take() {
                    token.cancel();
                    let _ = h.await;
                }
                continue;
            }
            None if leading => {
                let token = stop.child_token();
                let h = tokio::spawn(driver::run(shared.clone(), term, token.clone()));
                driver = Some((term, token, h));
            }
            _ => {}
        }
        tokio::select! {
            r = leadership.changed() => if r.is_err() { break },
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
    if let Some((_, token, h)) = driver {
        token.cancel();
        let _ = h.await;
    }
}
