//! The replicated cluster state and the commands that change it. `ClusterState::apply` is
//! deterministic (no clock, no I/O: times come inside commands), so every coordinator applying
//! the same Raft log holds the same state, and a snapshot is just this struct as JSON.

mod apply;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use orch_rollout::{Action, LogEntry, Rollout};
use orch_types::rollout::{Phase, RolloutSpec};
use orch_types::{NodeId, RolloutId, VersionEntry, VersionStamp};
use serde::{Deserialize, Serialize};

/// A registered node (agent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: NodeId,
    /// Where coordinators dial the agent.
    pub address: String,
    pub labels: BTreeMap<String, String>,
    /// What the agent last reported (registration, preflight, each step).
    pub versions: Vec<VersionEntry>,
    pub registered_at_ms: u64,
    /// When `versions` was read on the agent; a report older than this one is dropped.
    #[serde(default)]
    pub stamp: Option<VersionStamp>,
    /// The agent's `--activate-timeout` in ms as it reported it (0: unknown, an older agent).
    #[serde(default)]
    pub activate_timeout_ms: u64,
    /// Set while the leader cannot reach the agent during one of its steps: since when (the
    /// leader's clock) and what it saw.
    #[serde(default)]
    pub unresponsive: Option<Unresponsive>,
    /// Another agent tried to register under this node's id while this one was alive.
    #[serde(default)]
    pub conflict: Option<Conflict>,
}

/// A registration refused because a live agent already has the node's id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    pub detail: String,
    /// When it was last seen (the leader's clock; refreshed at most every minute).
    pub at_ms: u64,
}

/// An agent the leader could not reach while a step of it was outstanding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unresponsive {
    pub since_ms: u64,
    pub detail: String,
}

/// A package whose bytes live in the coordinators' content stores.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageRecord {
    pub name: String,
    pub version: orch_types::Version,
    pub sha256: String,
    pub size: u64,
    /// Coordinator ids that hold the bytes.
    pub holders: BTreeSet<u64>,
    /// When it was last uploaded (the proposer's clock, ms since the epoch): package GC keeps
    /// an unreferenced record for a grace period after this, so an upload followed by
    /// `rollout` is never raced. 0 in records written before this field existed.
    #[serde(default)]
    pub uploaded_at_ms: u64,
}

/// A state change, proposed through Raft.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// An agent registered (or re-registered after a restart or address change).
    /// `versions` replace the recorded ones unless `stamp` shows they were read before them
    /// (address and labels are updated either way).
    RegisterNode {
        id: NodeId,
        address: String,
        labels: BTreeMap<String, String>,
        versions: Vec<VersionEntry>,
        at_ms: u64,
        #[serde(default)]
        stamp: Option<VersionStamp>,
        /// The agent's `--activate-timeout` (0: not reported).
        #[serde(default)]
        activate_timeout_ms: u64,
    },
    /// What a node reported running after a step; dropped if `stamp` shows it was read before
    /// the recorded versions.
    NodeVersions {
        id: NodeId,
        versions: Vec<VersionEntry>,
        #[serde(default)]
        stamp: Option<VersionStamp>,
    },
    RemoveNode {
        id: NodeId,
    },
    /// A package is stored on `holders` (content-addressed by sha256).
    AddPackage(PackageRecord),
    /// Starts a rollout. Its id is assigned here (`r000001`, ...), so ids are ordered and the
    /// same on every coordinator. Refused while another rollout is not finished.
    CreateRollout {
        spec: RolloutSpec,
        at_ms: u64,
    },
    /// An event of one rollout (issue actions, an action's result, an operator command).
    /// `term`: the Raft term of the driver that recorded it (0: not a driver); a result from
    /// an older term than the rollout's driver term is ignored (see `Rollout::apply_in_term`).
    Rollout {
        id: RolloutId,
        entry: LogEntry,
        #[serde(default)]
        term: u64,
    },
    /// Like `Rollout`, but only if `action` (seq, node and kind) is exactly in flight in that
    /// rollout; otherwise ignored. Lets the driver record, in the same entry that issues an
    /// action, a result it predicted for it (an early health-gate probe), without any risk of
    /// the result landing on a different action should the issue have gone differently.
    RolloutIfInFlight {
        id: RolloutId,
        action: Action,
        entry: LogEntry,
        #[serde(default)]
        term: u64,
    },
    /// Names the cluster, once: applied only while it has no id yet (the first leader
    /// proposes a random one). Agents bind to it through their fences.
    SetClusterId {
        id: String,
    },
    /// Another agent claims a live node's id (`Some`), or has stopped doing so (`None`).
    NodeConflict {
        id: NodeId,
        conflict: Option<Conflict>,
    },
    /// Whether a node's agent answers the leader while one of its steps is outstanding.
    NodeLiveness {
        id: NodeId,
        unresponsive: Option<Unresponsive>,
    },
    /// A client's mutating request, identified by the id the client keeps across retries:
    /// applied once; a retry (the same id again, within the remembered window) gets the first
    /// attempt's response without being applied again.
    Request {
        request_id: String,
        at_ms: u64,
        command: Box<Command>,
    },
    /// Moves finished rollouts out of the replicated state and drops package records that no
    /// rollout left in it names (retention; proposed by the leader's `retention` job). Every
    /// coordinator's state machine appends the archived rollouts to its history file before
    /// applying this. Each item is checked again here, so a late or repeated command changes
    /// nothing it should not: a rollout is archived only if it is present and finished, a
    /// package record dropped only if no rollout still in the state names it and it was last
    /// uploaded at least `grace_ms` before `at_ms` (the proposer's clock). Not allowed in a
    /// [`Command::Batch`] (the state machine looks for it at the top level only).
    ArchiveRollouts {
        rollouts: Vec<RolloutId>,
        #[serde(default)]
        packages: Vec<String>,
        #[serde(default)]
        grace_ms: u64,
        at_ms: u64,
    },
    /// Several commands applied in order as one log entry (one Raft round trip). The driver
    /// records an action's result, the node's reported versions and the issuing of whatever that
    /// result enables together, so one upgraded node costs two commits instead of five. Each
    /// command is applied (or refused) on its own, exactly as if it had its own entry; batches
    /// do not nest.
    Batch(Vec<Command>),
}

/// What applying a command gave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    #[default]
    Ok,
    /// The command was refused; the state is unchanged.
    Rejected(String),
    Created {
        id: String,
    },
    Rollout {
        phase: Phase,
        issued: Vec<Action>,
        cancelled: Vec<Action>,
        /// Set when the event changed nothing (stale result, duplicate).
        ignored: Option<String>,
    },
    /// One response per command of a [`Command::Batch`], in order.
    Batch(Vec<Response>),
    /// What [`Command::ArchiveRollouts`] removed (rollout ids, package digests).
    Archived {
        rollouts: Vec<String>,
        packages: Vec<String>,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    pub packages: BTreeMap<String, PackageRecord>,
    /// By id, which orders by number (creation order). Shared (`Arc`) so that a snapshot copies
    /// pointers, not audit trails; a change copies only the rollout it changes, and only while
    /// a snapshot still holds it.
    pub rollouts: BTreeMap<RolloutId, Arc<Rollout>>,
    /// Counter behind rollout ids.
    pub rollout_seq: u64,
    /// When each rollout was accepted (the proposer's clock).
    pub created_at: BTreeMap<RolloutId, u64>,
    /// This cluster's id (created by the first leader; `None` only before that).
    #[serde(default)]
    pub cluster_id: Option<String>,
    /// Recently applied client requests and their responses (see [`Command::Request`]).
    #[serde(default)]
    pub requests: RequestWindow,
}

/// How many client request ids are remembered, and for how long (by the requests' own
/// times): a client retries for at most its patience (30 s by default), far less than this.
pub const REQUEST_WINDOW_ENTRIES: usize = 1024;
pub const REQUEST_WINDOW_MS: u64 = 15 * 60 * 1000;

/// The remembered client requests: bounded by count and age, evicted oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestWindow {
    responses: BTreeMap<String, Response>,
    order: VecDeque<(u64, String)>,
}

impl RequestWindow {
    pub fn get(&self, request_id: &str) -> Option<&Response> {
        self.responses.get(request_id)
    }

    pub fn len(&self) -> usize {
        self.responses.len()
    }

    pub fn is_empty(&self) -> bool {
        self.responses.is_empty()
    }

    fn remember(&mut self, request_id: &str, at_ms: u64, response: Response) {
        self.responses.insert(request_id.to_string(), response);
        self.order.push_back((at_ms, request_id.to_string()));
        let newest = self.order.iter().map(|(t, _)| *t).max().unwrap_or(at_ms);
        while let Some((t, id)) = self.order.front() {
            let too_many = self.order.len() > REQUEST_WINDOW_ENTRIES;
            let too_old = newest.saturating_sub(*t) > REQUEST_WINDOW_MS;
            if !too_many && !too_old {
                break;
            }
            self.responses.remove(id);
            self.order.pop_front();
        }
    }
}

impl ClusterState {
    /// Whether any registered node is unresponsive: usually none, and then a watch message
    /// needs no map of them.
    pub fn any_unresponsive(&self) -> bool {
        self.nodes.values().any(|n| n.unresponsive.is_some())
    }

    /// The rollout that is not finished, if any (at most one at a time).
    pub fn active_rollout(&self) -> Option<&Rollout> {
        self.active().map(|(_, r)| r)
    }

    /// Why a rollout of `spec` cannot be created now (another one runs, a node is not
    /// registered, the package is not stored), or `None`. Applying `CreateRollout` checks it,
    /// and so does the leader before it runs preflight and proposes the entry.
    pub fn refuse_rollout(&self, spec: &RolloutSpec) -> Option<String> {
        if let Some(r) = self.active_rollout() {
            return Some(format!(
                "rollout {} ({} on {} node(s)) is {}; one rollout at a time: wait for it, or abort it",
                r.id(),
                r.spec().version,
                r.spec().nodes.len(),
                r.phase()
            ));
        }
        if let Some(n) = spec.nodes.iter().find(|n| !self.nodes.contains_key(*n)) {
            return Some(format!("node {n} is not registered"));
        }
        match &spec.package {
            Some(p) if !self.packages.contains_key(&p.sha256) => Some(format!(
                "package {}-{} (sha256 {}) is not stored on the coordinators",
                p.name, p.version, p.sha256
            )),
            _ => None,
        }
    }

    /// The rollout that is not finished, with its id.
    pub fn active(&self) -> Option<(RolloutId, &Rollout)> {
        self.rollouts
            .iter()
            .rev()
            .find(|(_, r)| !r.is_finished())
            .map(|(id, r)| (*id, &**r))
    }

    pub fn latest_rollout(&self) -> Option<&Rollout> {
        self.rollouts.values().next_back().map(|r| &**r)
    }

    /// Finds a rollout by id; `42` and `r42` also find `r000042`.
    pub fn find_rollout(&self, id: &str) -> Option<&Rollout> {
        self.rollouts
            .get(&id.parse::<RolloutId>().ok()?)
            .map(|r| &**r)
    }

    /// Whether [`Command::ArchiveRollouts`] would archive rollout `id` now: present and
    /// finished.
    pub fn archivable(&self, id: RolloutId) -> bool {
        self.rollouts.get(&id).is_some_and(|r| r.is_finished())
    }

    /// Whether a rollout in the state names package `sha256`.
    pub fn package_in_use(&self, sha256: &str) -> bool {
        self.rollouts.values().any(|r| {
            r.spec()
                .package
                .as_ref()
                .is_some_and(|p| p.sha256 == sha256)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use orch_rollout::{ActionResult, Event};
    use orch_types::rollout::RolloutSpec;

    fn entry(event: Event) -> LogEntry {
        LogEntry {
            event,
            at_ms: 1,
            by: "test".into(),
        }
    }

    fn rollout_cmd(event: Event) -> Command {
        Command::Rollout {
            id: RolloutId(1),
            entry: entry(event),
            term: 1,
        }
    }

    /// A cluster with one registered node and a created rollout of 4.2.1 on it.
    fn cluster() -> ClusterState {
        let mut s = ClusterState::default();
        let n1: NodeId = "n1".parse().unwrap();
        assert_eq!(
            s.apply(&Command::RegisterNode {
                id: n1.clone(),
                address: "127.0.0.1:1".into(),
                labels: BTreeMap::new(),
                versions: Vec::new(),
                at_ms: 0,
                stamp: None,
                activate_timeout_ms: 0,
            }),
            Response::Ok
        );
        let spec = RolloutSpec::new("r000001", "4.2.1".parse().unwrap(), vec![n1], "test");
        assert!(matches!(
            s.apply(&Command::CreateRollout { spec, at_ms: 0 }),
            Response::Created { .. }
        ));
        s
    }

    #[test]
    fn a_batch_applies_each_command_in_order_and_does_not_nest() {
        let mut s = cluster();
        let r = s.apply(&Command::Batch(vec![
            rollout_cmd(Event::IssueActions),
            Command::Batch(vec![]),
            Command::NodeVersions {
                id: "n9".parse().unwrap(),
                versions: Vec::new(),
                stamp: None,
            },
        ]));
        let Response::Batch(rs) = r else {
            panic!("{r:?}")
        };
        assert_eq!(rs.len(), 3);
        assert!(matches!(&rs[0], Response::Rollout { issued, .. } if issued.len() == 1));
        assert_eq!(rs[1], Response::Rejected("batches do not nest".into()));
        assert!(matches!(&rs[2], Response::Rejected(m) if m.contains("n9")));
        // The first command took effect although a later one was refused.
        assert_eq!(s.rollouts[&RolloutId(1)].in_flight().len(), 1);
    }

    /// Drives rollout r000001 (one node) to `rollback_failed`: its health gate and then its
    /// downgrade fail.
    fn rollback_failed_cluster() -> ClusterState {
        let mut s = cluster();
        for _ in 0..20 {
            if s.rollouts[&RolloutId(1)].is_finished() {
                break;
            }
            s.apply(&rollout_cmd(Event::IssueActions));
            for a in s.rollouts[&RolloutId(1)].in_flight().to_vec() {
                let result = match a.kind {
                    orch_rollout::ActionKind::Preflight => ActionResult::Preflight {
                        running: "4.2.0".parse().unwrap(),
                        free_disk: u64::MAX,
                        releases: Vec::new(),
                    },
                    orch_rollout::ActionKind::HealthGate { .. }
                    | orch_rollout::ActionKind::Downgrade { .. } => ActionResult::Failed {
                        error: "unreachable".into(),
                    },
                    _ => ActionResult::Done,
                };
                s.apply(&rollout_cmd(Event::Result { seq: a.seq, result }));
            }
        }
        assert_eq!(
            s.rollouts[&RolloutId(1)].phase(),
            orch_types::rollout::Phase::RollbackFailed
        );
        s
    }

    #[test]
    fn rollback_again_retries_a_rollback_failed_rollout_unless_a_newer_one_exists() {
        let retry = rollout_cmd(Event::Command(orch_rollout::Command::Rollback));
        let mut s = rollback_failed_cluster();
        assert!(
            matches!(
                s.apply(&retry),
                Response::Rollout {
                    phase: orch_types::rollout::Phase::RollingBack,
                    ..
                }
            ),
            "retried"
        );
        let mut s = rollback_failed_cluster();
        let n1: NodeId = "n1".parse().unwrap();
        let spec = RolloutSpec::new("r000002", "4.2.2".parse().unwrap(), vec![n1], "test");
        assert!(matches!(
            s.apply(&Command::CreateRollout { spec, at_ms: 0 }),
            Response::Created { .. }
        ));
        match s.apply(&retry) {
            Response::Rejected(why) => assert!(
                why.contains("cannot roll back r000001 again: rollout r000002 came after it"),
                "{why}"
            ),
            other => panic!("not refused: {other:?}"),
        }
        assert_eq!(
            s.rollouts[&RolloutId(1)].phase(),
            orch_types::rollout::Phase::RollbackFailed
        );
    }

    #[test]
    fn a_conditional_result_lands_only_on_exactly_that_action() {
        let mut s = cluster();
        s.apply(&rollout_cmd(Event::IssueActions));
        let preflight = s.rollouts[&RolloutId(1)].in_flight()[0].clone();
        let before = s.clone();
        // Same seq, other kind: ignored, nothing changes.
        let mut other = preflight.clone();
        other.kind = orch_rollout::ActionKind::Commit {
            version: "4.2.1".parse().unwrap(),
        };
        let done = Event::Result {
            seq: preflight.seq,
            result: ActionResult::Preflight {
                running: "4.2.0".parse().unwrap(),
                free_disk: u64::MAX,
                releases: Vec::new(),
            },
        };
        let r = s.apply(&Command::RolloutIfInFlight {
            id: RolloutId(1),
            action: other,
            entry: entry(done.clone()),
            term: 1,
        });
        assert!(
            matches!(
                r,
                Response::Rollout {
                    ignored: Some(_),
                    ..
                }
            ),
            "{r:?}"
        );
        assert_eq!(s, before);
        // Exactly the action in flight: applied.
        let r = s.apply(&Command::RolloutIfInFlight {
            id: RolloutId(1),
            action: preflight,
            entry: entry(done),
            term: 1,
        });
        assert!(
            matches!(r, Response::Rollout { ignored: None, .. }),
            "{r:?}"
        );
        assert!(s.rollouts[&RolloutId(1)].in_flight().is_empty());
    }

    fn vers(v: &str, state: &str) -> Vec<VersionEntry> {
        vec![VersionEntry {
            version: v.parse().unwrap(),
            state: state.parse().unwrap(),
        }]
    }

    fn stamp(boot: u64, rev: u64) -> Option<VersionStamp> {
        Some(VersionStamp { boot, rev })
    }

    fn register(versions: Vec<VersionEntry>, zone: &str, st: Option<VersionStamp>) -> Command {
        Command::RegisterNode {
            id: "n1".parse().unwrap(),
            address: "127.0.0.1:1".into(),
            labels: BTreeMap::from([("zone".to_string(), zone.to_string())]),
            versions,
            at_ms: 1,
            stamp: st,
            activate_timeout_ms: 0,
        }
    }

    fn node_versions(versions: Vec<VersionEntry>, st: Option<VersionStamp>) -> Command {
        Command::NodeVersions {
            id: "n1".parse().unwrap(),
            versions,
            stamp: st,
        }
    }

    /// A periodic registration read just before a step but applied just after the step's own
    /// report must not put the old releases back; a newer report, another agent process, or
    /// an unstamped report (an older agent) do replace them.
    #[test]
    fn reports_of_one_agent_process_apply_in_the_order_they_were_read() {
        let mut s = ClusterState::default();
        let n1: NodeId = "n1".parse().unwrap();
        s.apply(&register(vers("4.2.0", "permanent"), "a", stamp(7, 1)));
        // The step's report (rev 2), then the registration read at rev 1 arrives late.
        s.apply(&node_versions(vers("4.2.1", "current"), stamp(7, 2)));
        s.apply(&register(vers("4.2.0", "permanent"), "b", stamp(7, 1)));
        assert_eq!(s.nodes[&n1].versions, vers("4.2.1", "current"));
        assert_eq!(s.nodes[&n1].stamp, stamp(7, 2));
        assert_eq!(s.nodes[&n1].labels["zone"], "b", "labels still update");
        // A late step report is dropped the same way.
        s.apply(&node_versions(vers("4.2.0", "permanent"), stamp(7, 1)));
        assert_eq!(s.nodes[&n1].versions, vers("4.2.1", "current"));
        // Same count: the newest arrival wins (nothing changed in between on the agent).
        s.apply(&register(vers("4.2.1", "permanent"), "b", stamp(7, 2)));
        assert_eq!(s.nodes[&n1].versions, vers("4.2.1", "permanent"));
        // A newer count replaces.
        s.apply(&node_versions(vers("4.2.2", "current"), stamp(7, 3)));
        assert_eq!(s.nodes[&n1].versions, vers("4.2.2", "current"));
        // A restarted agent (another boot) starts counting again: accepted.
        s.apply(&register(vers("4.2.1", "permanent"), "b", stamp(9, 0)));
        assert_eq!(s.nodes[&n1].versions, vers("4.2.1", "permanent"));
        assert_eq!(s.nodes[&n1].stamp, stamp(9, 0));
        // Unstamped reports always apply.
        s.apply(&node_versions(vers("4.2.0", "permanent"), None));
        assert_eq!(s.nodes[&n1].versions, vers("4.2.0", "permanent"));
        s.apply(&register(vers("4.2.1", "permanent"), "b", stamp(9, 5)));
        assert_eq!(s.nodes[&n1].versions, vers("4.2.1", "permanent"));
    }

    fn pause(at_ms: u64) -> Command {
        Command::Rollout {
            id: RolloutId(1),
            entry: LogEntry {
                event: Event::Command(orch_rollout::Command::Pause),
                at_ms,
                by: "operator/alice".into(),
            },
            term: 0,
        }
    }

    fn request(id: &str, at_ms: u64, command: Command) -> Command {
        Command::Request {
            request_id: id.into(),
            at_ms,
            command: Box::new(command),
        }
    }

    /// A client retrying a write whose outcome it did not learn (its first attempt timed out
    /// but was applied later) gets the first attempt's answer, not a refusal of the retry
    /// (today a retried `pause` answered "already paused" after pausing).
    #[test]
    fn a_retried_request_returns_the_first_answer_and_applies_once() {
        let mut s = cluster();
        s.apply(&rollout_cmd(Event::IssueActions));
        let first = s.apply(&request("req-1", 10, pause(10)));
        assert!(
            matches!(first, Response::Rollout { ignored: None, .. }),
            "{first:?}"
        );
        let paused = s.clone();
        let retry = s.apply(&request("req-1", 11, pause(11)));
        assert_eq!(retry, first, "the retry gets the first answer");
        assert_eq!(s.rollouts, paused.rollouts, "and is not applied again");
        // The same command under a new id is a new request: refused as it should be.
        let again = s.apply(&request("req-2", 12, pause(12)));
        assert!(
            matches!(&again, Response::Rejected(m) if m.contains("already paused")),
            "{again:?}"
        );
        // A creation retried after it succeeded names the same rollout.
        let mut s = ClusterState::default();
        s.apply(&register(vers("4.2.0", "permanent"), "a", None));
        let spec = RolloutSpec::new(
            "r0",
            "4.2.1".parse().unwrap(),
            vec!["n1".parse().unwrap()],
            "t",
        );
        let create = Command::CreateRollout { spec, at_ms: 1 };
        let a = s.apply(&request("c-1", 1, create.clone()));
        let b = s.apply(&request("c-1", 2, create));
        assert_eq!(
            a,
            Response::Created {
                id: "r000001".into()
            }
        );
        assert_eq!(b, a);
        assert_eq!(s.rollouts.len(), 1);
    }

    #[test]
    fn the_request_window_is_bounded_by_count_and_age() {
        let mut s = ClusterState::default();
        s.apply(&register(vers("4.2.0", "permanent"), "a", None));
        let nv = || node_versions(vers("4.2.0", "permanent"), None);
        for i in 0..(REQUEST_WINDOW_ENTRIES as u64 + 10) {
            s.apply(&request(&format!("r{i}"), 1_000 + i, nv()));
        }
        assert_eq!(s.requests.len(), REQUEST_WINDOW_ENTRIES);
        assert!(s.requests.get("r0").is_none(), "the oldest went first");
        assert!(
            s.requests
                .get(&format!("r{}", REQUEST_WINDOW_ENTRIES + 9))
                .is_some()
        );
        // Much later: everything older than the window goes.
        s.apply(&request("late", 1_000 + REQUEST_WINDOW_MS + 100_000, nv()));
        assert_eq!(s.requests.len(), 1);
        // Nested requests and batches are refused.
        let r = s.apply(&request("n", 5, request("m", 5, nv())));
        assert!(matches!(r, Response::Rejected(_)), "{r:?}");
    }

    #[test]
    fn the_cluster_id_is_set_once() {
        let mut s = ClusterState::default();
        assert_eq!(
            s.apply(&Command::SetClusterId { id: "abc".into() }),
            Response::Ok
        );
        let r = s.apply(&Command::SetClusterId { id: "def".into() });
        assert!(
            matches!(&r, Response::Rejected(m) if m.contains("abc")),
            "{r:?}"
        );
        assert_eq!(s.cluster_id.as_deref(), Some("abc"));
    }

    #[test]
    fn liveness_is_recorded_and_a_registration_clears_it() {
        let mut s = ClusterState::default();
        let n1: NodeId = "n1".parse().unwrap();
        s.apply(&register(vers("4.2.0", "permanent"), "a", None));
        let u = Unresponsive {
            since_ms: 5,
            detail: "no answer".into(),
        };
        s.apply(&Command::NodeLiveness {
            id: n1.clone(),
            unresponsive: Some(u.clone()),
        });
        assert_eq!(s.nodes[&n1].unresponsive, Some(u));
        s.apply(&register(vers("4.2.0", "permanent"), "a", None));
        assert_eq!(s.nodes[&n1].unresponsive, None);
    }

    /// `any_unresponsive` follows every change of the registry:
    /// liveness, registration, removal, and a state read back from a snapshot.
    #[test]
    fn any_unresponsive_follows_the_registry() {
        let mut s = ClusterState::default();
        let n1: NodeId = "n1".parse().unwrap();
        assert!(!s.any_unresponsive());
        s.apply(&register(vers("4.2.0", "permanent"), "a", None));
        assert!(!s.any_unresponsive());
        let down = |s: &mut ClusterState| {
            s.apply(&Command::NodeLiveness {
                id: n1.clone(),
                unresponsive: Some(Unresponsive {
                    since_ms: 5,
                    detail: "no answer".into(),
                }),
            })
        };
        down(&mut s);
        assert!(s.any_unresponsive());
        let json = serde_json::to_string(&s).unwrap();
        let read: ClusterState = serde_json::from_str(&json).unwrap();
        assert!(read.any_unresponsive(), "after a snapshot");
        assert_eq!(read, s);
        s.apply(&Command::NodeLiveness {
            id: n1.clone(),
            unresponsive: None,
        });
        assert!(!s.any_unresponsive());
        down(&mut s);
        assert!(s.any_unresponsive());
        s.apply(&register(vers("4.2.0", "permanent"), "a", None));
        assert!(!s.any_unresponsive(), "a registration clears it");
        down(&mut s);
        assert!(s.any_unresponsive());
        s.apply(&Command::RemoveNode { id: n1.clone() });
        assert!(!s.any_unresponsive(), "removed");
    }

    /// "The latest rollout" and "the active one" go by number: after r999999 comes r1000000
    /// (as strings it would sort first).
    #[test]
    fn rollouts_are_ordered_by_number() {
        let mut s = ClusterState::default();
        s.apply(&register(vers("4.2.0", "permanent"), "a", None));
        s.rollout_seq = 999_998;
        for _ in 0..2 {
            let spec = RolloutSpec::new(
                "x",
                "4.2.1".parse().unwrap(),
                vec!["n1".parse().unwrap()],
                "t",
            );
            let r = s.apply(&Command::CreateRollout { spec, at_ms: 1 });
            let Response::Created { id } = r else {
                panic!("{r:?}")
            };
            s.apply(&Command::Rollout {
                id: id.parse().unwrap(),
                entry: entry(Event::Command(orch_rollout::Command::Abort)),
                term: 0,
            });
        }
        assert_eq!(s.latest_rollout().unwrap().id(), "r1000000");
        assert!(s.find_rollout("r999999").is_some());
        assert!(s.find_rollout("1000000").is_some());
    }
}
