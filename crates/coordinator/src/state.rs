//! The replicated cluster state and the commands that change it. `ClusterState::apply` is
//! deterministic (no clock, no I/O: times come inside commands), so every coordinator applying
//! the same Raft log holds the same state, and a snapshot is just this struct as JSON.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use orch_rollout::{Action, LogEntry, Rollout};
use orch_types::rollout::{Phase, RolloutSpec};
use orch_types::{NodeId, RolloutId, VersionEntry, VersionStamp, stale_report};
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
    Rollout {
        id: RolloutId,
        entry: LogEntry,
    },
    /// Like `Rollout`, but only if `action` (seq, node and kind) is exactly in flight in that
    /// rollout; otherwise ignored. Lets the driver record, in the same entry that issues an
    /// action, a result it predicted for it (an early health-gate probe), without any risk of
    /// the result landing on a different action should the issue have gone differently.
    RolloutIfInFlight {
        id: RolloutId,
        action: Action,
        entry: LogEntry,
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
}

impl ClusterState {
    /// The rollout that is not finished, if any (at most one at a time).
    pub fn active_rollout(&self) -> Option<&Rollout> {
        self.active().map(|(_, r)| r)
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

    pub fn apply(&mut self, cmd: &Command) -> Response {
        match cmd {
            Command::Batch(cmds) => Response::Batch(
                cmds.iter()
                    .map(|c| match c {
                        Command::Batch(_) => Response::Rejected("batches do not nest".to_string()),
                        Command::ArchiveRollouts { .. } => {
                            Response::Rejected("archiving is not batched".to_string())
                        }
                        c => self.apply(c),
                    })
                    .collect(),
            ),
            Command::RegisterNode {
                id,
                address,
                labels,
                versions,
                at_ms,
                stamp,
            } => {
                // A registration read before the recorded report (it raced a step) keeps the
                // newer versions.
                let (versions, stamp) = match self.nodes.get(id) {
                    Some(n) if stale_report(*stamp, n.stamp) => (n.versions.clone(), n.stamp),
                    _ => (versions.clone(), *stamp),
                };
                self.nodes.insert(
                    id.clone(),
                    NodeRecord {
                        id: id.clone(),
                        address: address.clone(),
                        labels: labels.clone(),
                        versions,
                        registered_at_ms: *at_ms,
                        stamp,
                    },
                );
                Response::Ok
            }
            Command::NodeVersions {
                id,
                versions,
                stamp,
            } => match self.nodes.get_mut(id) {
                Some(n) if stale_report(*stamp, n.stamp) => Response::Ok,
                Some(n) => {
                    n.versions = versions.clone();
                    n.stamp = *stamp;
                    Response::Ok
                }
                None => Response::Rejected(format!("node {id} is not registered")),
            },
            Command::RemoveNode { id } => {
                if let Some(r) = self.active_rollout()
                    && r.spec().nodes.contains(id)
                {
                    return Response::Rejected(format!(
                        "node {id} is part of rollout {} which is not finished",
                        r.id()
                    ));
                }
                match self.nodes.remove(id) {
                    Some(_) => Response::Ok,
                    None => Response::Rejected(format!("node {id} is not registered")),
                }
            }
            Command::AddPackage(p) => {
                match self.packages.get_mut(&p.sha256) {
                    Some(existing) => {
                        existing.holders.extend(p.holders.iter().copied());
                        // A new upload restarts the grace period package GC waits.
                        existing.uploaded_at_ms = existing.uploaded_at_ms.max(p.uploaded_at_ms);
                    }
                    None => {
                        self.packages.insert(p.sha256.clone(), p.clone());
                    }
                }
                Response::Ok
            }
            Command::CreateRollout { spec, at_ms } => {
                if let Some(r) = self.active_rollout() {
                    return Response::Rejected(format!(
                        "rollout {} ({} on {} node(s)) is {}; one rollout at a time: wait for it, or abort it",
                        r.id(),
                        r.spec().version,
                        r.spec().nodes.len(),
                        r.phase()
                    ));
                }
                for n in &spec.nodes {
                    if !self.nodes.contains_key(n) {
                        return Response::Rejected(format!("node {n} is not registered"));
                    }
                }
                if let Some(p) = &spec.package
                    && !self.packages.contains_key(&p.sha256)
                {
                    return Response::Rejected(format!(
                        "package {}-{} (sha256 {}) is not stored on the coordinators",
                        p.name, p.version, p.sha256
                    ));
                }
                let id = RolloutId(self.rollout_seq + 1);
                let mut spec = spec.clone();
                spec.id = id.to_string();
                match Rollout::new(spec) {
                    Ok(r) => {
                        self.rollout_seq += 1;
                        self.created_at.insert(id, *at_ms);
                        self.rollouts.insert(id, Arc::new(r));
                        Response::Created { id: id.to_string() }
                    }
                    Err(e) => Response::Rejected(e.to_string()),
                }
            }
            Command::RolloutIfInFlight { id, action, entry } => {
                let Some(r) = self.rollouts.get(id) else {
                    return Response::Rejected(format!("no rollout {id}"));
                };
                if !r.in_flight().contains(action) {
                    return Response::Rollout {
                        phase: r.phase(),
                        issued: Vec::new(),
                        cancelled: Vec::new(),
                        ignored: Some(format!("{action} is not in flight")),
                    };
                }
                self.apply(&Command::Rollout {
                    id: *id,
                    entry: entry.clone(),
                })
            }
            Command::ArchiveRollouts {
                rollouts,
                packages,
                grace_ms,
                at_ms,
            } => {
                let mut archived = Vec::new();
                for id in rollouts {
                    if self.archivable(*id) {
                        self.rollouts.remove(id);
                        self.created_at.remove(id);
                        archived.push(id.to_string());
                    }
                }
                let mut dropped = Vec::new();
                for sha in packages {
                    let old_enough = self
                        .packages
                        .get(sha)
                        .is_some_and(|p| at_ms.saturating_sub(p.uploaded_at_ms) >= *grace_ms);
                    if old_enough && !self.package_in_use(sha) {
                        self.packages.remove(sha);
                        dropped.push(sha.clone());
                    }
                }
                Response::Archived {
                    rollouts: archived,
                    packages: dropped,
                }
            }
            Command::Rollout { id, entry } => {
                let Some(r) = self.rollouts.get_mut(id) else {
                    return Response::Rejected(format!("no rollout {id}"));
                };
                // Copies the rollout only if a snapshot being built still shares it.
                let r = Arc::make_mut(r);
                match r.apply(&entry.event, entry.at_ms, &entry.by) {
                    Ok(o) => Response::Rollout {
                        phase: r.phase(),
                        issued: o.issued().to_vec(),
                        cancelled: o.cancelled().to_vec(),
                        ignored: match o {
                            orch_rollout::Outcome::Ignored { reason } => Some(reason),
                            _ => None,
                        },
                    },
                    Err(e) => Response::Rejected(e.to_string()),
                }
            }
        }
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
            },
        };
        let r = s.apply(&Command::RolloutIfInFlight {
            id: RolloutId(1),
            action: other,
            entry: entry(done.clone()),
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
}
