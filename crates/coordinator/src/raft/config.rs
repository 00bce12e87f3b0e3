//! A coordinator's Raft settings and the openraft configuration made from them.

use std::collections::BTreeMap;
use std::path::PathBuf;

use openraft::SnapshotPolicy;
use orch_tls::Security;

use super::Error;

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

    pub(super) fn openraft_config(&self) -> Result<openraft::Config, Error> {
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
