//! What the services and the driver share ([`Shared`]): the Raft node and its state, the
//! package store, the agent channels, the history; and the work on them that more than one
//! service needs (copying packages between coordinators, probing agents, cluster status).

use std::time::Duration;

use orch_tls::Security;

use crate::agents::AgentPool;
use crate::blobs::BlobStore;
use crate::error::{Error, Result};
use crate::raft::{self, RaftNode};
use crate::state::ClusterState;
use crate::{control, history};

/// A member that answered the leader within this long counts as reachable (heartbeats go out
/// every 100 ms).
const REACHABLE_WITHIN: Duration = Duration::from_secs(3);

/// What the services and the driver share.
/// How long a read that accepts cached probes waits for a new one.
pub const CACHED_PROBE_WAIT: Duration = Duration::from_millis(500);

pub struct Shared {
    /// How this coordinator dials peers and agents, and checks its callers.
    pub security: Security,
    pub raft: RaftNode,
    pub blobs: BlobStore,
    pub agents: AgentPool,
    /// Rollouts archived out of the replicated state (read-only here; the state machine
    /// appends).
    pub history: history::History,
    /// What `/metrics` shows (counters are fed from the code paths they count).
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
    /// How long the nodes in this leader's health gates have been healthy (volatile).
    pub gates: crate::agents::GateBoard,
    /// The last health probe of each node (volatile), reused by reads that accept an age.
    pub probes: ProbeCache,
}

/// The last health probe of each node, and when it answered.
#[derive(Default)]
pub struct ProbeCache {
    last: std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, bool, String)>>,
    /// Nodes with a probe running for a cached read, so looks every second start one at most.
    in_flight: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl ProbeCache {
    /// The last answer and its age.
    fn last(&self, node: &str) -> Option<(Duration, bool, String)> {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let (at, healthy, detail) = last.get(node)?;
        Some((at.elapsed(), *healthy, detail.clone()))
    }

    /// Marks a probe of `node` as running; false when one already is.
    fn start(&self, node: &str) -> bool {
        let mut f = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        f.insert(node.to_string())
    }

    fn done(&self, node: &str) {
        let mut f = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        f.remove(node);
    }

    fn put(&self, node: &str, healthy: bool, detail: &str) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.insert(
            node.to_string(),
            (std::time::Instant::now(), healthy, detail.to_string()),
        );
    }

    /// Forgets nodes no longer registered (bounded by the node table).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.retain(|n, _| keep(n));
    }
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
    /// The last probe's answer when it is at most `max_age` old; otherwise a new probe's,
    /// waiting for it at most [`CACHED_PROBE_WAIT`]: a node that does not answer quickly keeps
    /// being probed in the background and meanwhile shows its last answer (or that it is being
    /// probed), so a view refreshed every second never stalls on a dead node.
    pub async fn probe_node_within(
        self: &std::sync::Arc<Self>,
        node: &str,
        addr: &str,
        max_age: Duration,
    ) -> (bool, String) {
        let last = self.probes.last(node);
        let shown = |last: Option<(Duration, bool, String)>| {
            last.map_or((false, "being probed".to_string()), |(_, h, d)| (h, d))
        };
        if let Some((age, healthy, detail)) = &last
            && *age <= max_age
        {
            return (*healthy, detail.clone());
        }
        if !self.probes.start(node) {
            return shown(last);
        }
        let me = self.clone();
        let (n, a) = (node.to_string(), addr.to_string());
        // Bounded by probe_node's own 3 s timeout.
        let probe = tokio::spawn(async move {
            // Cleared however the probe ends (a panic included), or the node would never be
            // probed again.
            struct Done<'a>(&'a ProbeCache, &'a str);
            impl Drop for Done<'_> {
                fn drop(&mut self) {
                    self.0.done(self.1);
                }
            }
            let _done = Done(&me.probes, &n);
            me.probe_node(&n, &a).await
        });
        match tokio::time::timeout(CACHED_PROBE_WAIT, probe).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) | Err(_) => shown(last),
        }
    }

    pub async fn probe_node(&self, node: &str, addr: &str) -> (bool, String) {
        let (healthy, detail) = self.probe_node_uncached(node, addr).await;
        self.probes.put(node, healthy, &detail);
        (healthy, detail)
    }

    async fn probe_node_uncached(&self, node: &str, addr: &str) -> (bool, String) {
        // The 3 s below is the probe's own; waiting for a turn is bounded by the probes ahead.
        let _turn = self.agents.probe_turn().await;
        let mut c = match self.agents.client(node, addr) {
            Ok(c) => c,
            Err(e) => return (false, orch_types::error_chain(&e)),
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
        let voters = m.members.iter().filter(|x| x.voter).count();
        let (quorum, note) = if leading && voters <= 1 {
            // A lone voter is its own majority; openraft does not refresh its quorum-ack time.
            (true, "this coordinator is the only voter".to_string())
        } else if leading {
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
