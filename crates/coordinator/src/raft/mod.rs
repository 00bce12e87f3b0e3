//! The coordinators' Raft group (openraft, pinned alpha), persisted in redb.
//!
//! - [`log_store`]: the Raft log (`DATA/raft-log.redb`).
//! - [`state_machine`]: the applied [`ClusterState`] (`DATA/state.redb`) and snapshots.
//! - [`network`]: RPCs to peers over tonic, one long-lived channel per peer.
//! - [`service`]: the `RaftPeer` service peers call.
//! - [`RaftNode`]: the handle the rest of the coordinator uses: writes, leadership, membership,
//!   the read view of the state and a watch of the applied index.
//!
//! Timing defaults (loopback/LAN): heartbeat 100 ms, election timeout 300-600 ms. A follower
//! campaigns once the leader lease (= election_timeout_max) plus its random election timeout
//! passed without a heartbeat, so a dead leader is replaced after roughly 0.9-1.2 s.

pub mod error;
pub mod log_store;
pub mod network;
pub mod service;
pub mod state_machine;
pub mod types;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::error::{ClientWriteError, InitializeError, LinearizableReadError, RaftError};
use openraft::{BasicNode, ChangeMembers, RaftMetrics, ReadPolicy, ServerState, SnapshotPolicy};
use orch_proto::raft::raft_peer_server::RaftPeerServer;
use orch_tls::{RoleInterceptor, Security};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;

pub use error::{Error, WriteError};
pub use log_store::LogStore;
pub use network::Network;
pub use service::RaftPeerService;
pub use state_machine::{StateMachineStore, StateView};
pub use types::{Raft, RaftCommand, TypeConfig};

use crate::state::{ClusterState, Command, Response};

/// How long `add_member` waits for a new member to catch up before giving up.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a new learner has to confirm the entry that added it before it may become a voter
/// (a live coordinator does so within a heartbeat or a snapshot transfer).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `shutdown` waits for openraft's tasks to release the storage files.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

/// Configuration of one coordinator's Raft node.
#[derive(Debug, Clone)]
pub struct RaftConfig {
    /// This coordinator's Raft node id (stable across restarts).
    pub id: u64,
    /// This coordinator's gRPC address "HOST:PORT" as the other coordinators dial it.
    pub addr: String,
    /// Holds `raft-log.redb` and `state.redb`.
    pub data_dir: PathBuf,
    /// The other coordinators (id -> "HOST:PORT"); used only when bootstrapping.
    pub peers: BTreeMap<u64, String>,
    /// Initialise a new cluster of {self} ∪ peers if this node's log is empty. Set it on one
    /// coordinator only; restarting it later does not re-initialise.
    pub bootstrap: bool,
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot (and purge the log before it) every this many applied entries.
    pub snapshot_every: u64,
    /// Entries kept in the log behind the last snapshot.
    pub logs_to_keep: u64,
    /// How long `write` and `ensure_linearizable` wait for a quorum.
    pub write_timeout_ms: u64,
    /// How peers are dialed (each as `coordinator-<id>` under mTLS) and who may call this
    /// node's Raft service (coordinators only). `new` starts with `Insecure`; the coordinator
    /// daemon sets its own.
    pub security: Security,
    /// Where the state machine appends archived rollouts (`new`: `history.jsonl` in
    /// `data_dir`; the coordinator daemon uses its own data directory's).
    pub history_path: PathBuf,
}

impl RaftConfig {
    /// A configuration with the default timings and snapshot policy.
    pub fn new(
        id: u64,
        addr: impl Into<String>,
        data_dir: impl Into<PathBuf>,
        peers: BTreeMap<u64, String>,
        bootstrap: bool,
    ) -> RaftConfig {
        let data_dir: PathBuf = data_dir.into();
        RaftConfig {
            id,
            addr: addr.into(),
            history_path: data_dir.join(crate::history::HISTORY_FILE),
            data_dir,
            peers,
            bootstrap,
            heartbeat_ms: 100,
            election_timeout_min_ms: 300,
            election_timeout_max_ms: 600,
            snapshot_every: 500,
            logs_to_keep: 50,
            write_timeout_ms: 5_000,
            security: Security::Insecure,
        }
    }

    fn openraft_config(&self) -> Result<openraft::Config, Error> {
        let cfg = openraft::Config {
            cluster_name: "orchestrator".to_string(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            install_snapshot_timeout: 30_000,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_every.max(1)),
            max_in_snapshot_log_to_keep: self.logs_to_keep,
            replication_lag_threshold: (self.snapshot_every * 2).max(1_000),
            // A restarted leader must win a new election instead of resuming leadership: the
            // state machine and the committed id are persisted lazily (see state_machine.rs),
            // and `Leadership::is_leader` relies on an entry of the leader's own, new term.
            enable_leader_restore: Some(false),
            // Replicate entries as soon as they are in the local log, in parallel with the local
            // fsync (see log_store.rs): saves one fsync on the commit path.
            broadcast_submitted_on_append: Some(true),
            ..Default::default()
        };
        cfg.validate().map_err(|e| {
            Error::Config(format!(
                "{e} (heartbeat {} ms, election timeout {}-{} ms: need heartbeat < min < max)",
                self.heartbeat_ms, self.election_timeout_min_ms, self.election_timeout_max_ms
            ))
        })
    }
}

/// This node's view of leadership. The leader-only driver runs while `is_leader` holds; restart
/// it whenever `term` changes (a new term may be a new leadership of the same node).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leadership {
    pub term: u64,
    /// This node is the leader AND has applied an entry of its own term, so the state view
    /// holds everything committed before it took over.
    pub is_leader: bool,
    /// The leader this node knows of (may be itself).
    pub leader: Option<u64>,
}

/// A node's Raft role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Leader,
    Follower,
    Candidate,
    Learner,
    Shutdown,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Candidate => "candidate",
            Role::Learner => "learner",
            Role::Shutdown => "shutdown",
        })
    }
}

/// A member of the Raft group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: u64,
    /// "HOST:PORT" the coordinators dial.
    pub addr: String,
    /// A voter (`false`: a learner, receiving the log without voting).
    pub voter: bool,
}

/// How a member answers the leader (known on the leader only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct MemberLiveness {
    /// How long ago it last acknowledged a heartbeat or an append (`None`: never).
    pub last_ack: Option<Duration>,
    /// The last log index it is known to hold.
    pub matched: Option<u64>,
}

/// A point-in-time copy of a node's Raft metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftStatus {
    /// This node.
    pub id: u64,
    pub role: Role,
    pub term: u64,
    /// The leader this node knows of: (id, address).
    pub leader: Option<(u64, String)>,
    /// Index of the last entry in this node's log (0: empty).
    pub last_log_index: u64,
    /// Index of the last entry known committed (0: none).
    pub committed: u64,
    /// Index of the last entry applied to the state (0: none).
    pub last_applied: u64,
    /// Last entry included in the current snapshot.
    pub snapshot: Option<u64>,
    /// Last entry purged from the log.
    pub purged: Option<u64>,
    /// Voters and learners of the effective membership, by id.
    pub members: Vec<Member>,
    /// A membership change is half-way (joint configuration).
    pub joint: bool,
    /// On the leader: how long ago a quorum last acknowledged it (`None`: not the leader, or
    /// never acknowledged in this term).
    #[serde(default)]
    pub quorum_acked: Option<Duration>,
    /// On the leader: how each other member answers it, by id.
    #[serde(default)]
    pub liveness: BTreeMap<u64, MemberLiveness>,
}

impl RaftStatus {
    /// Voter ids.
    pub fn voters(&self) -> BTreeSet<u64> {
        self.members
            .iter()
            .filter(|m| m.voter)
            .map(|m| m.id)
            .collect()
    }

    /// Learner ids.
    pub fn learners(&self) -> BTreeSet<u64> {
        self.members
            .iter()
            .filter(|m| !m.voter)
            .map(|m| m.id)
            .collect()
    }

    /// A member's address.
    pub fn addr_of(&self, id: u64) -> Option<&str> {
        self.members
            .iter()
            .find(|m| m.id == id)
            .map(|m| m.addr.as_str())
    }
}

/// A running Raft node. Cheap to clone.
#[derive(Clone)]
pub struct RaftNode {
    inner: Arc<Inner>,
}

struct Inner {
    id: u64,
    raft: Raft,
    auth: orch_tls::AuthMode,
    view: StateView,
    applied: watch::Receiver<u64>,
    leadership: watch::Receiver<Leadership>,
    write_timeout: Duration,
    membership_lock: tokio::sync::Mutex<()>,
    watcher: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    stopped: tokio::sync::Mutex<bool>,
    closers: tokio::sync::Mutex<Vec<log_store::DbCloser>>,
}

impl RaftNode {
    /// Opens the storage under `cfg.data_dir`, starts Raft and, with `cfg.bootstrap` on an empty
    /// log, initialises the cluster as {self} ∪ `cfg.peers` (all voters).
    pub async fn start(cfg: RaftConfig) -> Result<RaftNode, Error> {
        if cfg.addr.trim().is_empty() {
            return Err(Error::Config(format!(
                "coordinator {} has no address: set the address other coordinators dial (HOST:PORT)",
                cfg.id
            )));
        }
        if let Some(a) = cfg.peers.get(&cfg.id)
            && a != &cfg.addr
        {
            return Err(Error::Config(format!(
                "peer list names this coordinator's id {} with address {a}, but it listens as {}; fix --peer or --id",
                cfg.id, cfg.addr
            )));
        }
        let config = cfg.openraft_config()?;
        let storage_err = |context: &'static str| {
            let dir = cfg.data_dir.clone();
            move |e: Box<dyn std::error::Error + Send + Sync>| Error::Storage {
                dir,
                context,
                source: e,
            }
        };
        std::fs::create_dir_all(&cfg.data_dir)
            .map_err(|e| storage_err(": cannot create the data directory")(e.into()))?;
        let log_path = cfg.data_dir.join(log_store::LOG_FILE);
        let sm_path = cfg.data_dir.join(state_machine::STATE_FILE);
        let log = LogStore::open(&log_path)
            .await
            .map_err(|e| storage_err("")(e.into()))?;
        let history = crate::history::History::new(cfg.history_path.clone());
        let sm = StateMachineStore::open_with_history(&sm_path, history)
            .await
            .map_err(|e| storage_err("")(e.into()))?;
        let view = sm.view();
        let applied = sm.applied();
        let closers = vec![sm.closer(), log.closer()];

        let network = Network::new(
            cfg.id,
            cfg.security.clone(),
            Duration::from_millis(cfg.election_timeout_max_ms),
        );
        let raft = openraft::Raft::new(cfg.id, Arc::new(config), network, log, sm)
            .await
            .map_err(|e| {
                storage_err(": cannot start Raft from the stored log and state")(e.into())
            })?;

        if cfg.bootstrap {
            let initialized = raft
                .is_initialized()
                .await
                .map_err(|e| Error::Stopped(e.to_string()))?;
            if initialized {
                tracing::info!(
                    id = cfg.id,
                    "bootstrap requested but the log is not empty: joining the existing cluster"
                );
            } else {
                let mut members: BTreeMap<u64, BasicNode> = cfg
                    .peers
                    .iter()
                    .map(|(id, addr)| (*id, BasicNode::new(addr)))
                    .collect();
                members.insert(cfg.id, BasicNode::new(&cfg.addr));
                tracing::info!(id = cfg.id, voters = ?members.keys().collect::<Vec<_>>(), "initialising a new Raft cluster");
                match raft.initialize(members).await {
                    Ok(()) => {}
                    Err(RaftError::APIError(InitializeError::NotAllowed(e))) => {
                        tracing::info!(id = cfg.id, "already initialised: {e}");
                    }
                    Err(e) => {
                        let _ = raft.shutdown().await;
                        return Err(Error::Config(format!("cannot initialise the cluster: {e}")));
                    }
                }
            }
        }

        let (lead_tx, lead_rx) = watch::channel(Leadership::default());
        let watcher = tokio::spawn(watch_leadership(raft.clone(), cfg.id, lead_tx));

        Ok(RaftNode {
            inner: Arc::new(Inner {
                id: cfg.id,
                raft,
                auth: cfg.security.mode(),
                view,
                applied,
                leadership: lead_rx,
                write_timeout: Duration::from_millis(cfg.write_timeout_ms.max(1)),
                membership_lock: tokio::sync::Mutex::new(()),
                watcher: std::sync::Mutex::new(Some(watcher)),
                stopped: tokio::sync::Mutex::new(false),
                closers: tokio::sync::Mutex::new(closers),
            }),
        })
    }

    /// This node's id.
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// The openraft handle, for what this wrapper does not cover.
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// Proposes `cmd` and waits until it is committed and applied here; returns what applying
    /// it gave. On a follower: `WriteError::NotLeader` with the leader to forward to.
    pub async fn write(&self, cmd: Command) -> Result<Response, WriteError> {
        let fut = self.inner.raft.client_write(RaftCommand(cmd));
        match tokio::time::timeout(self.inner.write_timeout, fut).await {
            Err(_) => Err(WriteError::Other(format!(
                "the write was not committed within {:?}: is a majority of the coordinators up and reachable? It may still be applied later: read the state before retrying",
                self.inner.write_timeout
            ))),
            Ok(Ok(r)) => Ok(r.data),
            Ok(Err(e)) => Err(self.write_err(e)),
        }
    }

    fn write_err(&self, e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> WriteError {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f))
            | RaftError::APIError(ClientWriteError::LogEntryDiscarded(f)) => {
                WriteError::NotLeader {
                    leader: self.resolve_leader(f.leader_id, f.leader_node),
                }
            }
            RaftError::APIError(other) => WriteError::Other(other.to_string()),
            RaftError::Fatal(f) => WriteError::Other(format!(
                "the Raft node is stopped ({f}); check this coordinator's log and restart it"
            )),
        }
    }

    fn resolve_leader(&self, id: Option<u64>, node: Option<BasicNode>) -> Option<(u64, String)> {
        let id = id?;
        let addr = match node {
            Some(n) => n.addr,
            None => self.addr_of(id)?,
        };
        Some((id, addr))
    }

    fn addr_of(&self, id: u64) -> Option<String> {
        let m = self.inner.raft.metrics();
        let g = m.borrow_watched();
        g.membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone())
    }

    /// The leader this node knows of, with its address.
    pub fn leader(&self) -> Option<(u64, String)> {
        let m = self.inner.raft.metrics();
        let g = m.borrow_watched();
        let id = g.current_leader?;
        let addr = g.membership_config.membership().get_node(&id)?.addr.clone();
        Some((id, addr))
    }

    /// This node leads and has applied an entry of its own term (see [`Leadership`]).
    pub fn is_leader(&self) -> bool {
        let m = self.inner.raft.metrics();
        let g = m.borrow_watched();
        leadership_of(&g, self.inner.id).is_leader
    }

    /// The current Raft term as this node knows it.
    pub fn current_term(&self) -> u64 {
        self.inner.raft.metrics().borrow_watched().current_term
    }

    /// A copy of this node's Raft metrics.
    pub fn metrics(&self) -> RaftStatus {
        let m = self.inner.raft.metrics();
        let g = m.borrow_watched();
        status_of(&g)
    }

    /// A watch of this node's [`Leadership`]; changes on every term change, leader change and
    /// when this node becomes (ready) or stops being the leader.
    pub fn leadership(&self) -> watch::Receiver<Leadership> {
        self.inner.leadership.clone()
    }

    /// Confirms with a quorum that this node is still the leader and waits until everything
    /// committed before the call is applied here, so a read of [`Self::state`] that follows is
    /// linearizable.
    pub async fn ensure_linearizable(&self) -> Result<(), WriteError> {
        let fut = self.inner.raft.ensure_linearizable(ReadPolicy::ReadIndex);
        match tokio::time::timeout(self.inner.write_timeout, fut).await {
            Err(_) => Err(WriteError::Other(format!(
                "could not confirm leadership with a majority within {:?}: are the other coordinators up?",
                self.inner.write_timeout
            ))),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f)))) => {
                Err(WriteError::NotLeader {
                    leader: self.resolve_leader(f.leader_id, f.leader_node),
                })
            }
            Ok(Err(RaftError::APIError(e))) => Err(WriteError::Other(format!(
                "{e}; a majority of the coordinators must be up and reachable"
            ))),
            Ok(Err(RaftError::Fatal(f))) => Err(WriteError::Other(format!(
                "the Raft node is stopped ({f}); check this coordinator's log and restart it"
            ))),
        }
    }

    /// Adds coordinator `id` at `addr`: first as a learner, waiting until it has caught up,
    /// then as a voter. Must run on the leader; one membership change at a time.
    pub async fn add_member(&self, id: u64, addr: impl Into<String>) -> Result<(), Error> {
        let addr = addr.into();
        let _one_at_a_time = self.inner.membership_lock.lock().await;
        let st = self.metrics();
        let existing = st.members.iter().find(|m| m.id == id);
        if existing.is_some_and(|m| m.voter && m.addr == addr) {
            return Ok(());
        }
        if let Some(other) = existing.map(|m| &m.addr)
            && other != &addr
        {
            return Err(Error::Membership(format!(
                "coordinator {id} is already a member with address {other}; remove it first to change its address"
            )));
        }
        let raft = &self.inner.raft;
        let added = tokio::time::timeout(
            CATCH_UP_TIMEOUT,
            raft.add_learner(id, BasicNode::new(&addr), true),
        )
        .await;
        let added = match added {
            Err(_) => {
                return Err(Error::Membership(format!(
                    "coordinator {id} at {addr} did not catch up within {CATCH_UP_TIMEOUT:?}; is it running and reachable from the leader? It stays a learner: add it again, or remove it"
                )));
            }
            Ok(r) => r.map_err(|e| self.membership_err(e))?,
        };
        // openraft's blocking add_learner may return before the learner ever answered (it
        // counts a short log as caught up). Promoting a silent node would count it towards the
        // quorum and could stall the cluster for good, so wait until it has replicated the entry
        // that added it.
        let target = added.log_id.index;
        let deadline = tokio::time::Instant::now() + CONFIRM_TIMEOUT;
        loop {
            let metrics = raft.metrics();
            let matched = metrics
                .borrow_watched()
                .replication
                .as_ref()
                .and_then(|r| r.get(&id).cloned().flatten())
                .map(|l| l.index);
            if matched.is_some_and(|m| m >= target) {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Membership(format!(
                    "coordinator {id} at {addr} never confirmed the log within {CONFIRM_TIMEOUT:?}; is it running and reachable from the leader? It stays a learner (not counted for quorum): start it and add it again, or remove it"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map_err(|e| self.membership_err(e))?;
        tracing::info!(id, addr, "coordinator added as a voter");
        Ok(())
    }

    /// Removes coordinator `id` (voter or learner) from the cluster. Must run on the leader;
    /// removing the leader itself hands leadership to another voter.
    pub async fn remove_member(&self, id: u64) -> Result<(), Error> {
        let _one_at_a_time = self.inner.membership_lock.lock().await;
        let st = self.metrics();
        let (voters, learners) = (st.voters(), st.learners());
        let change = if voters.contains(&id) {
            if voters.len() == 1 {
                return Err(Error::Membership(format!(
                    "coordinator {id} is the only voter; a cluster cannot remove its last voter"
                )));
            }
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else if learners.contains(&id) {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        } else {
            return Err(Error::Membership(format!(
                "coordinator {id} is not a member (voters: {voters:?}, learners: {learners:?})"
            )));
        };
        self.inner
            .raft
            .change_membership(change, false)
            .await
            .map_err(|e| self.membership_err(e))?;
        tracing::info!(id, "coordinator removed");
        Ok(())
    }

    fn membership_err(&self, e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> Error {
        match self.write_err(e) {
            WriteError::NotLeader { leader } => Error::NotLeader { leader },
            WriteError::Other(m) => Error::Membership(m),
        }
    }

    /// The read view of the applied state (updated on every apply and snapshot install).
    pub fn state(&self) -> StateView {
        self.inner.view.clone()
    }

    /// A copy of the applied state.
    pub fn state_snapshot(&self) -> ClusterState {
        self.inner
            .view
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A watch of the last applied log index; wakes on every apply.
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.inner.applied.clone()
    }

    /// The `RaftPeer` service to mount on this coordinator's tonic server. Under mTLS only
    /// coordinators may call it: a vote or an AppendEntries from anyone else could depose the
    /// leader or rewrite the log.
    pub fn peer_service(
        &self,
    ) -> InterceptedService<RaftPeerServer<RaftPeerService>, RoleInterceptor> {
        InterceptedService::new(
            RaftPeerService::new(self.inner.raft.clone()).into_server(),
            self.inner.auth.interceptor(&[orch_tls::Role::Coordinator]),
        )
    }

    /// Stops Raft, makes the storage durable and waits until the files are closed, so the same
    /// data directory can be opened again. Idempotent.
    pub async fn shutdown(&self) {
        let mut stopped = self.inner.stopped.lock().await;
        if *stopped {
            return;
        }
        *stopped = true;
        if let Err(e) = self.inner.raft.shutdown().await {
            tracing::warn!(id = self.inner.id, "Raft shutdown: {e}");
        }
        let watcher = self
            .inner
            .watcher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(w) = watcher {
            // The watcher ends by itself when the metrics channel closes; bounded wait.
            if tokio::time::timeout(Duration::from_secs(2), w)
                .await
                .is_err()
            {
                tracing::warn!(id = self.inner.id, "leadership watcher did not stop");
            }
        }
        // Make the lazily persisted apply batches and the committed id durable, then wait
        // until openraft's tasks dropped the files (so the data directory can be reopened).
        let mut closers = self.inner.closers.lock().await;
        for c in closers.iter_mut() {
            if let Err(e) = c.flush().await {
                tracing::warn!(id = self.inner.id, "flush on shutdown: {e}");
            }
        }
        for c in closers.iter_mut() {
            if !c.wait_closed(RELEASE_TIMEOUT).await {
                tracing::warn!(
                    id = self.inner.id,
                    "{} still open {RELEASE_TIMEOUT:?} after shutdown",
                    c.path().display()
                );
            }
        }
        tracing::info!(id = self.inner.id, "Raft node stopped");
    }
}

async fn watch_leadership(raft: Raft, id: u64, tx: watch::Sender<Leadership>) {
    let mut rx = raft.metrics();
    drop(raft);
    loop {
        let (l, shutdown) = {
            let g = rx.borrow_watched();
            (leadership_of(&g, id), g.state == ServerState::Shutdown)
        };
        tx.send_if_modified(|cur| {
            if *cur != l {
                *cur = l;
                true
            } else {
                false
            }
        });
        if shutdown || rx.changed().await.is_err() {
            break;
        }
    }
    tx.send_modify(|l| l.is_leader = false);
}

fn leadership_of(m: &RaftMetrics<TypeConfig>, id: u64) -> Leadership {
    let term = m.current_term;
    let is_leader = m.state == ServerState::Leader
        && m.last_applied
            .as_ref()
            .is_some_and(|l| l.leader_id.term == term && l.leader_id.node_id == id);
    Leadership {
        term,
        is_leader,
        leader: m.current_leader,
    }
}

fn status_of(m: &RaftMetrics<TypeConfig>) -> RaftStatus {
    let membership = m.membership_config.membership();
    let addr = |id: &u64| {
        membership
            .get_node(id)
            .map(|n| n.addr.clone())
            .unwrap_or_default()
    };
    let last_ack = |id: &u64| {
        m.heartbeat
            .as_ref()?
            .get(id)?
            .as_ref()
            .map(|t| openraft::Instant::elapsed(&**t))
    };
    let matched = |id: &u64| Some(m.replication.as_ref()?.get(id)?.as_ref()?.index);
    let member = |id: u64, voter: bool| Member {
        id,
        addr: addr(&id),
        voter,
    };
    let mut members: Vec<Member> = membership
        .voter_ids()
        .map(|id| member(id, true))
        .chain(membership.learner_ids().map(|id| member(id, false)))
        .collect();
    members.sort_by_key(|m| m.id);
    let liveness: BTreeMap<u64, MemberLiveness> = members
        .iter()
        .map(|x| {
            let l = MemberLiveness {
                last_ack: last_ack(&x.id),
                matched: matched(&x.id),
            };
            (x.id, l)
        })
        .collect();
    RaftStatus {
        id: m.id,
        role: match m.state {
            ServerState::Leader => Role::Leader,
            ServerState::Follower => Role::Follower,
            ServerState::Candidate => Role::Candidate,
            ServerState::Learner => Role::Learner,
            ServerState::Shutdown => Role::Shutdown,
        },
        term: m.current_term,
        leader: m
            .current_leader
            .and_then(|id| membership.get_node(&id).map(|n| (id, n.addr.clone()))),
        last_log_index: m.last_log_index.unwrap_or(0),
        committed: m.local_committed.as_ref().map_or(0, |l| l.index),
        last_applied: m.last_applied.as_ref().map_or(0, |l| l.index),
        snapshot: m.snapshot.as_ref().map(|l| l.index),
        purged: m.purged.as_ref().map(|l| l.index),
        members,
        joint: membership.get_joint_config().len() > 1,
        quorum_acked: m
            .last_quorum_acked
            .as_ref()
            .map(|t| openraft::Instant::elapsed(&**t)),
        liveness,
    }
}
