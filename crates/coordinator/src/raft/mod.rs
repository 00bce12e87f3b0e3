//! The coordinators' Raft group (openraft, pinned alpha), persisted in redb.
//!
//! - [`log_store`]: the Raft log (`DATA/raft-log.redb`).
//! - [`state_machine`]: the applied [`ClusterState`] (`DATA/state.redb`) and snapshots.
//! - [`network`]: RPCs to peers over tonic, one long-lived channel per peer.
//! - [`service`]: the `RaftPeer` service peers call.
//! - [`RaftNode`]: the handle the rest of the coordinator uses: writes, leadership, membership
//!   (`membership`), the read view of the state and a watch of the applied index; its
//!   settings are a [`RaftConfig`], what it knows of the group a [`RaftStatus`].
//!
//! Timing defaults (loopback/LAN): heartbeat 100 ms, election timeout 300-600 ms. A follower
//! campaigns once the leader lease (= election_timeout_max) plus its random election timeout
//! passed without a heartbeat, so a dead leader is replaced after roughly 0.9-1.2 s.

mod config;
pub mod error;
pub mod log_store;
mod membership;
pub mod network;
pub mod service;
pub mod state_machine;
mod status;
pub mod types;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::error::{ClientWriteError, InitializeError, LinearizableReadError, RaftError};
use openraft::{BasicNode, ReadPolicy};
use orch_proto::raft::raft_peer_server::RaftPeerServer;
use orch_tls::RoleInterceptor;
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;

pub use config::RaftConfig;
pub use error::{Error, WriteError};
pub use log_store::LogStore;
pub use network::Network;
pub use service::RaftPeerService;
pub use state_machine::{StateMachineStore, StateView};
pub use status::{Leadership, Member, MemberLiveness, RaftStatus, Role};
use status::{leadership_of, status_of, watch_leadership};
pub use types::{Raft, RaftCommand, TypeConfig};

use crate::state::{ClusterState, Command, Response};

/// How long `shutdown` waits for openraft's tasks to release the storage files.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

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
