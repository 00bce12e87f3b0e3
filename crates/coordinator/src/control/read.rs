//! Reads: whether this coordinator may answer one (so a client's reads never go backwards),
//! and finding a rollout, in the replicated state or in the history file.

use std::time::Duration;

use orch_proto::control as pb;
use tonic::{Request, Response, Status};

use super::status::with_gates;
use super::{ControlService, shown, status_of, status_of_archived};
use crate::error::Error;
use crate::history::HistoryRecord;

impl ControlService {
    /// Decides whether this coordinator may answer a read, so that reads never go backwards
    /// for a client: the leader answers after confirming its leadership with a quorum; a
    /// follower answers when it has applied at least the index the client last saw
    /// (`orch-min-index`, waiting briefly for it), else sends the client to the leader. With
    /// `orch-stale: 1` any coordinator answers when no leader can be reached, saying so.
    pub(super) async fn read_gate<T>(&self, req: &Request<T>) -> Result<ReadAt, Status> {
        let md = req.metadata();
        let stale_ok = md.get("orch-stale").is_some_and(|v| v == "1");
        let min_index: u64 = md
            .get("orch-min-index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let raft = &self.shared.raft;
        let here = || *raft.applied().borrow();
        if raft.is_leader() {
            match raft.ensure_linearizable().await {
                Ok(()) => {
                    return Ok(ReadAt {
                        index: here(),
                        stale: false,
                        no_leader_ms: None,
                    });
                }
                Err(e) if !stale_ok => return Err(e.into()),
                Err(_) => {}
            }
        } else if min_index > 0 && caught_up(raft.applied(), min_index).await {
            return Ok(ReadAt {
                index: here(),
                stale: false,
                no_leader_ms: None,
            });
        }
        if stale_ok {
            let since = raft.leadership().borrow().leaderless_since_ms;
            return Ok(ReadAt {
                index: here(),
                stale: true,
                no_leader_ms: (since > 0 && raft.leader().is_none())
                    .then(|| crate::driver::now_ms().saturating_sub(since)),
            });
        }
        Err(Error::NotLeader {
            leader: raft.leader(),
        }
        .into())
    }

    pub(super) fn find(&self, id: &str) -> Result<pb::RolloutStatus, Status> {
        let found = self.find_here(id);
        // A follower applies a new rollout a heartbeat after the leader created it: rather than
        // deny what the caller just started, send it to the leader (the client follows).
        if found.is_err() && !self.shared.raft.is_leader() {
            let leader = self.shared.raft.leader();
            if leader.is_some() {
                return Err(Error::NotLeader { leader }.into());
            }
        }
        found
    }

    /// An archived rollout's status (with its events) from this coordinator's history file.
    pub(super) async fn archived_status(
        &self,
        id: &str,
    ) -> Result<Option<pb::RolloutStatus>, Status> {
        let Ok(id) = id.parse::<orch_types::RolloutId>() else {
            return Ok(None);
        };
        let history = self.shared.history.clone();
        let found: Option<HistoryRecord> = tokio::task::spawn_blocking(move || history.find(id))
            .await
            .map_err(|e| Status::internal(format!("reading the history: {e}")))?
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(found.as_ref().map(|h| status_of_archived(h, true)))
    }

    pub(super) fn find_here(&self, id: &str) -> Result<pb::RolloutStatus, Status> {
        let st = self.shared.read(|s| {
            let r = if id.is_empty() {
                s.active_rollout().or_else(|| s.latest_rollout())
            } else {
                s.find_rollout(id)
            };
            r.map(|r| status_of(s, r, true)).ok_or_else(|| {
                if id.is_empty() {
                    Status::not_found(
                        "no rollout yet: start one with `orchestrator rollout VERSION`",
                    )
                } else {
                    Status::not_found(format!(
                        "no rollout {}: `orchestrator rollouts --all` lists them",
                        shown(id)
                    ))
                }
            })
        })?;
        Ok(with_gates(st, &self.shared.gates))
    }
}

/// What a read answer reflects: the applied index (sent back as `orch-applied`, which the
/// client returns as `orch-min-index`) and whether it may be stale.
#[derive(Debug, Clone, Copy)]
pub(super) struct ReadAt {
    index: u64,
    stale: bool,
    /// A stale answer from a coordinator that knows no leader: for how long it has known none.
    no_leader_ms: Option<u64>,
}

impl ReadAt {
    pub(super) fn answer<T>(self, msg: T) -> Response<T> {
        let mut r = Response::new(msg);
        let md = r.metadata_mut();
        if let Ok(v) = self.index.to_string().parse() {
            md.insert("orch-applied", v);
        }
        if self.stale {
            md.insert(
                "orch-stale",
                tonic::metadata::MetadataValue::from_static("1"),
            );
        }
        if let Some(ms) = self.no_leader_ms
            && let Ok(v) = ms.to_string().parse()
        {
            md.insert("orch-no-leader-ms", v);
        }
        r
    }
}

/// How long a follower waits to apply the index a client has already seen before sending it
/// to the leader.
const CATCH_UP_WAIT: Duration = Duration::from_secs(1);

/// True once `applied` reaches `index` (within [`CATCH_UP_WAIT`]).
async fn caught_up(mut applied: tokio::sync::watch::Receiver<u64>, index: u64) -> bool {
    tokio::time::timeout(CATCH_UP_WAIT, applied.wait_for(|a| *a >= index))
        .await
        .is_ok_and(|r| r.is_ok())
}
