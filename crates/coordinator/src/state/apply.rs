//! Applying a [`Command`] to the [`ClusterState`]: one function per command family (nodes,
//! packages, rollouts, retention, wrappers). Deterministic: no clock, no I/O.

use std::sync::Arc;

use orch_rollout::{Action, LogEntry, Rollout};
use orch_types::rollout::RolloutSpec;
use orch_types::{NodeId, RolloutId, VersionEntry, VersionStamp, stale_report};

use super::{ClusterState, Command, NodeRecord, PackageRecord, Response};

impl ClusterState {
    pub fn apply(&mut self, cmd: &Command) -> Response {
        match cmd {
            Command::Batch(cmds) => self.apply_batch(cmds),
            Command::Request {
                request_id,
                at_ms,
                command,
            } => self.apply_request(request_id, *at_ms, command),
            Command::SetClusterId { id } => self.set_cluster_id(id),
            Command::RegisterNode {
                id,
                address,
                labels,
                versions,
                at_ms,
                stamp,
                activate_timeout_ms,
            } => self.register_node(NodeRecord {
                id: id.clone(),
                address: address.clone(),
                labels: labels.clone(),
                versions: versions.clone(),
                registered_at_ms: *at_ms,
                stamp: *stamp,
                activate_timeout_ms: *activate_timeout_ms,
                // A registering agent answers: it is not unresponsive (any more).
                unresponsive: None,
                conflict: None,
            }),
            Command::NodeVersions {
                id,
                versions,
                stamp,
            } => self.node_versions(id, versions, *stamp),
            Command::NodeConflict { id, conflict } => {
                self.update_node(id, |n| n.conflict = conflict.clone())
            }
            Command::NodeLiveness { id, unresponsive } => {
                self.update_node(id, |n| n.unresponsive = unresponsive.clone())
            }
            Command::RemoveNode { id } => self.remove_node(id),
            Command::AddPackage(p) => self.add_package(p),
            Command::CreateRollout { spec, at_ms } => self.create_rollout(spec, *at_ms),
            Command::Rollout { id, entry, term } => self.apply_rollout_event(*id, entry, *term),
            Command::RolloutIfInFlight {
                id,
                action,
                entry,
                term,
            } => self.apply_if_in_flight(*id, action, entry, *term),
            Command::ArchiveRollouts {
                rollouts,
                packages,
                grace_ms,
                at_ms,
            } => self.archive(rollouts, packages, *grace_ms, *at_ms),
        }
    }

    // ----- wrappers -----

    fn apply_batch(&mut self, cmds: &[Command]) -> Response {
        Response::Batch(
            cmds.iter()
                .map(|c| match c {
                    Command::Batch(_) => Response::Rejected("batches do not nest".to_string()),
                    Command::ArchiveRollouts { .. } => {
                        Response::Rejected("archiving is not batched".to_string())
                    }
                    c => self.apply(c),
                })
                .collect(),
        )
    }

    fn apply_request(&mut self, request_id: &str, at_ms: u64, command: &Command) -> Response {
        if let Some(first) = self.requests.get(request_id) {
            return first.clone();
        }
        let response = match command {
            Command::Request { .. } | Command::Batch(_) => {
                Response::Rejected("a request wraps one plain command".to_string())
            }
            c => self.apply(c),
        };
        self.requests.remember(request_id, at_ms, response.clone());
        response
    }

    fn set_cluster_id(&mut self, id: &str) -> Response {
        if let Some(existing) = &self.cluster_id {
            return Response::Rejected(format!("the cluster already has id {existing}"));
        }
        if id.is_empty() || id.len() > 64 {
            return Response::Rejected("a cluster id has 1-64 characters".to_string());
        }
        self.cluster_id = Some(id.to_string());
        Response::Ok
    }

    // ----- nodes -----

    /// Records an agent's registration, `new` as it reported itself.
    fn register_node(&mut self, mut new: NodeRecord) -> Response {
        if let Some(n) = self.nodes.get(&new.id) {
            // A registration read before the recorded report (it raced a step) keeps the
            // newer versions.
            if stale_report(new.stamp, n.stamp) {
                new.versions = n.versions.clone();
                new.stamp = n.stamp;
            }
            // A conflict stays with the agent it concerns (same address); a node that moved
            // starts clean.
            if n.address == new.address {
                new.conflict = n.conflict.clone();
            }
        }
        self.nodes.insert(new.id.clone(), new);
        Response::Ok
    }

    fn node_versions(
        &mut self,
        id: &NodeId,
        versions: &[VersionEntry],
        stamp: Option<VersionStamp>,
    ) -> Response {
        self.update_node(id, |n| {
            if !stale_report(stamp, n.stamp) {
                n.versions = versions.to_vec();
                n.stamp = stamp;
            }
        })
    }

    /// Changes a registered node's record.
    fn update_node(&mut self, id: &NodeId, change: impl FnOnce(&mut NodeRecord)) -> Response {
        match self.nodes.get_mut(id) {
            Some(n) => {
                change(n);
                Response::Ok
            }
            None => Response::Rejected(format!("node {id} is not registered")),
        }
    }

    fn remove_node(&mut self, id: &NodeId) -> Response {
        if let Some(r) = self.active_rollout()
            && r.spec().nodes.contains(id)
        {
            return Response::Rejected(format!(
                "node {id} is part of rollout {} which is not finished ({}): wait for it to end, or abort it first",
                r.id(),
                r.phase()
            ));
        }
        match self.nodes.remove(id) {
            Some(_) => Response::Ok,
            None => Response::Rejected(format!("node {id} is not registered")),
        }
    }

    // ----- packages -----

    fn add_package(&mut self, p: &PackageRecord) -> Response {
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

    // ----- rollouts -----

    fn create_rollout(&mut self, spec: &RolloutSpec, at_ms: u64) -> Response {
        if let Some(why) = self.refuse_rollout(spec) {
            return Response::Rejected(why);
        }
        let id = RolloutId(self.rollout_seq + 1);
        let mut spec = spec.clone();
        spec.id = id.to_string();
        match Rollout::new(spec) {
            Ok(r) => {
                self.rollout_seq += 1;
                self.created_at.insert(id, at_ms);
                self.rollouts.insert(id, Arc::new(r));
                Response::Created { id: id.to_string() }
            }
            Err(e) => Response::Rejected(e.to_string()),
        }
    }

    fn apply_rollout_event(&mut self, id: RolloutId, entry: &LogEntry, term: u64) -> Response {
        // Retrying the rollback of a rollout that ended `rollback_failed` makes it run again:
        // only while no newer rollout exists (one rollout at a time, never an older one over
        // a newer one's nodes).
        if let orch_rollout::Event::Command(orch_rollout::Command::Rollback) = entry.event
            && self.rollouts.get(&id).is_some_and(|r| r.is_finished())
            && let Some(newer) = self.rollouts.keys().next_back().filter(|n| **n > id)
        {
            return Response::Rejected(format!(
                "cannot roll back {id} again: rollout {newer} came after it; roll the nodes back with a new rollout to their previous version instead"
            ));
        }
        let Some(r) = self.rollouts.get_mut(&id) else {
            return Response::Rejected(format!("no rollout {id}"));
        };
        // Copies the rollout only if a snapshot being built still shares it.
        let r = Arc::make_mut(r);
        match r.apply_in_term(&entry.event, entry.at_ms, &entry.by, term) {
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

    fn apply_if_in_flight(
        &mut self,
        id: RolloutId,
        action: &Action,
        entry: &LogEntry,
        term: u64,
    ) -> Response {
        let Some(r) = self.rollouts.get(&id) else {
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
        self.apply_rollout_event(id, entry, term)
    }

    // ----- retention -----

    fn archive(
        &mut self,
        rollouts: &[RolloutId],
        packages: &[String],
        grace_ms: u64,
        at_ms: u64,
    ) -> Response {
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
                .is_some_and(|p| at_ms.saturating_sub(p.uploaded_at_ms) >= grace_ms);
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
}
