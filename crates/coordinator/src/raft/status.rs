//! What a node knows of the group: leadership (watched for the driver), roles, members and
//! their liveness, as read from openraft's metrics.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::{RaftMetrics, ServerState};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{Raft, TypeConfig};

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
    /// Since when (ms since the epoch) this node has known no leader (since it started, if it
    /// never knew one); 0 while it knows one. Stale reads say how long that has been.
    #[serde(default)]
    pub leaderless_since_ms: u64,
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

pub(super) async fn watch_leadership(raft: Raft, id: u64, tx: watch::Sender<Leadership>) {
    let mut rx = raft.metrics();
    drop(raft);
    loop {
        let (mut l, shutdown) = {
            let g = rx.borrow_watched();
            (leadership_of(&g, id), g.state == ServerState::Shutdown)
        };
        tx.send_if_modified(|cur| {
            l.leaderless_since_ms = match (l.leader, cur.leaderless_since_ms) {
                (Some(_), _) => 0,
                (None, 0) => crate::driver::now_ms(),
                (None, since) => since,
            };
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

pub(super) fn leadership_of(m: &RaftMetrics<TypeConfig>, id: u64) -> Leadership {
    let term = m.current_term;
    let is_leader = m.state == ServerState::Leader
        && m.last_applied
            .as_ref()
            .is_some_and(|l| l.leader_id.term == term && l.leader_id.node_id == id);
    Leadership {
        term,
        is_leader,
        leader: m.current_leader,
        leaderless_since_ms: 0,
    }
}

pub(super) fn status_of(m: &RaftMetrics<TypeConfig>) -> RaftStatus {
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
