//! A rollout's status as the control API answers it, from the replicated state or from a
//! history line.

use orch_proto::control as pb;
use orch_rollout::{Input, Rollout};
use orch_types::rollout::{Phase, RolloutSpec};

use crate::agents::GateBoard;
use crate::history::HistoryRecord;
use crate::state::ClusterState;

/// A rollout's status for the control API; `with_events: false` (listings) copies nothing of
/// its audit trail, which is most of its size.
pub fn status_of(s: &ClusterState, r: &Rollout, with_events: bool) -> pb::RolloutStatus {
    let replay = replay_data(r.spec(), r.inputs(), with_events);
    pb::RolloutStatus {
        nodes: r.nodes().map(|n| node_of(s, n)).collect(),
        events: if with_events {
            r.events().iter().map(audit_event).collect()
        } else {
            Vec::new()
        },
        policy: Some(policy_of(r.spec())),
        spec_json: replay.spec_json,
        inputs_json: replay.inputs_json,
        ..head_of(s, r)
    }
}

/// A rollout's scalars (no nodes, events, policy or replay data): what an incremental watch
/// sends in full with every delta.
pub(super) fn head_of(s: &ClusterState, r: &Rollout) -> pb::RolloutStatus {
    let (min_healthy_ms, healthy_deadline_ms) = gate_of(r);
    pb::RolloutStatus {
        id: r.id().to_string(),
        version: r.spec().version.to_string(),
        phase: r.phase().to_string(),
        awaiting_promotion: r.awaiting_promotion(),
        error: r.error().unwrap_or_default().to_string(),
        created_at_ms: r
            .id()
            .parse()
            .ok()
            .and_then(|id| s.created_at.get(&id).copied())
            .unwrap_or(0),
        requested_by: r.spec().requested_by.clone(),
        min_healthy_ms,
        healthy_deadline_ms,
        bake_ms: r.spec().bake_ms,
        ..Default::default()
    }
}

/// One node's entry, with what the registry knows of its agent (unresponsive); the gate fields
/// are left to [`with_gates`].
pub(super) fn node_of(s: &ClusterState, n: &orch_types::rollout::NodeProgress) -> pb::NodeProgress {
    let mut p = node_progress(n);
    if let Some(u) = unresponsive(s, &n.id) {
        p.unresponsive_since_ms = u.since_ms;
        p.unresponsive_detail = u.detail.clone();
    }
    p
}

pub(super) fn unresponsive<'a>(
    s: &'a ClusterState,
    id: &orch_types::NodeId,
) -> Option<&'a crate::state::Unresponsive> {
    s.nodes.get(id).and_then(|rec| rec.unresponsive.as_ref())
}

/// Adds what this coordinator's own health gates know (only the leader runs them): whether it
/// probes each node's gate, and since when the node has been healthy.
pub fn with_gates(mut st: pb::RolloutStatus, board: &GateBoard) -> pb::RolloutStatus {
    for n in &mut st.nodes {
        let Ok(id) = n.id.parse::<orch_types::NodeId>() else {
            continue;
        };
        if let Some(since) = board.healthy_since(&id) {
            n.gate_watched = true;
            n.healthy_since_ms = since;
        }
    }
    st
}

/// A status holding only what replays the rollout, as JSON (`spec_json`, `inputs_json`); the
/// rest default. Nothing without events (listings).
pub(super) fn replay_data(
    spec: &RolloutSpec,
    inputs: &[Input],
    with_events: bool,
) -> pb::RolloutStatus {
    if !with_events {
        return pb::RolloutStatus::default();
    }
    // Neither type can fail to serialize (plain data, string keys).
    pb::RolloutStatus {
        spec_json: serde_json::to_string(spec).unwrap_or_default(),
        inputs_json: serde_json::to_string(inputs).unwrap_or_default(),
        ..Default::default()
    }
}

/// How a rollout moves through its nodes (waves, batch rule, selector, max unavailable), as
/// its spec records it.
pub fn policy_of(spec: &RolloutSpec) -> pb::RolloutPolicy {
    pb::RolloutPolicy {
        wave_by: spec.wave_by.clone().unwrap_or_default(),
        waves: spec
            .waves
            .iter()
            .map(|w| pb::RolloutWave {
                label_value: w.label_value.clone(),
                nodes: w.nodes.iter().map(|n| n.to_string()).collect(),
            })
            .collect(),
        batch: spec.batch_rule(),
        selector: spec.selector.clone().into_iter().collect(),
        max_unavailable: spec
            .max_unavailable
            .map(|m| m.to_string())
            .unwrap_or_default(),
        // Bounded by the node count, which fits in u32 wherever a rollout fits in memory.
        max_unavailable_nodes: spec
            .max_unavailable_nodes()
            .map_or(0, |m| u32::try_from(m).unwrap_or(u32::MAX)),
        unhealthy_at_start: spec
            .unhealthy_at_start
            .iter()
            .map(|n| n.to_string())
            .collect(),
        promote_each_wave: spec.promote_each_wave,
        wave_pause_ms: spec.wave_pause_ms,
        watch_after_commit_ms: spec.watch_after_commit_ms,
        gate_prometheus: spec
            .metric_gates
            .as_ref()
            .map(|g| g.prometheus.clone())
            .unwrap_or_default(),
        gates: spec
            .metric_gates
            .as_ref()
            .map(|g| g.queries.clone())
            .unwrap_or_default(),
    }
}

fn node_progress(n: &orch_types::rollout::NodeProgress) -> pb::NodeProgress {
    pb::NodeProgress {
        id: n.id.to_string(),
        from_version: n.from_version.map(|v| v.to_string()).unwrap_or_default(),
        step: n.step.to_string(),
        error: n.error.clone().unwrap_or_default(),
        step_since_ms: n.step_since_ms,
        ..Default::default()
    }
}

pub(super) fn audit_event(e: &orch_types::rollout::AuditEvent) -> pb::AuditEvent {
    pb::AuditEvent {
        at_ms: e.at_ms,
        by: e.by.clone(),
        message: e.message.clone(),
        term: e.term,
    }
}

/// An archived rollout's status, from its history line; `with_events: false` (listings, read
/// without the audit trail) leaves out the replay data too.
pub fn status_of_archived(h: &HistoryRecord, with_events: bool) -> pb::RolloutStatus {
    let st = &h.status;
    pb::RolloutStatus {
        id: h.id.to_string(),
        version: st.version.to_string(),
        phase: st.phase.to_string(),
        awaiting_promotion: st.awaiting_promotion,
        error: st.error.clone().unwrap_or_default(),
        nodes: st.nodes.iter().map(node_progress).collect(),
        events: st.events.iter().map(audit_event).collect(),
        created_at_ms: h.created_at_ms,
        requested_by: h.spec.requested_by.clone(),
        min_healthy_ms: h.spec.min_healthy_time_ms,
        healthy_deadline_ms: h.spec.healthy_deadline_ms,
        bake_ms: h.spec.bake_ms,
        policy: Some(policy_of(&h.spec)),
        ..replay_data(&h.spec, &h.inputs, with_events)
    }
}

/// The gate the rollout's nodes are in now: `(min healthy, deadline)` in ms, the bake gate's
/// while it bakes (the wave pause's, the watch's), so that a countdown shows the bake.
fn gate_of(r: &Rollout) -> (u64, u64) {
    let spec = r.spec();
    let watch = |ms: u64| (ms, spec.watch_deadline_ms(ms));
    if r.working_phase() == Phase::Baking {
        (spec.bake_ms, spec.bake_deadline_ms())
    } else if r.working_phase() == Phase::Watching {
        watch(spec.watch_after_commit_ms)
    } else if r.holding_wave().is_some() {
        watch(spec.wave_pause_ms)
    } else {
        (spec.min_healthy_time_ms, spec.healthy_deadline_ms)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use orch_rollout::{ActionKind, ActionResult, Event, LogEntry};
    use orch_types::rollout::RolloutStatus;
    use orch_types::{RolloutId, VersionEntry};

    use super::*;
    use crate::state::Command;

    fn register(s: &mut ClusterState, id: &str) {
        s.apply(&Command::RegisterNode {
            id: id.parse().unwrap(),
            address: "127.0.0.1:1".into(),
            labels: BTreeMap::new(),
            versions: Vec::new(),
            at_ms: 0,
            stamp: None,
            activate_timeout_ms: 0,
        });
    }

    fn event(s: &mut ClusterState, event: Event, at_ms: u64, term: u64) {
        s.apply(&Command::Rollout {
            id: RolloutId(1),
            entry: LogEntry {
                event,
                at_ms,
                by: "coordinator-1".into(),
            },
            term,
        });
    }

    /// What `status --json` carries replays to what it shows: the spec and inputs of the
    /// status, parsed back, give the same phase, nodes, error and audit trail, through a
    /// change of driver term, a failure and the rollback it causes.
    #[test]
    fn the_status_replays_from_its_spec_and_inputs() {
        let mut s = ClusterState::default();
        register(&mut s, "n1");
        register(&mut s, "n2");
        let mut spec = RolloutSpec::new(
            "x",
            "4.2.1".parse().unwrap(),
            vec!["n1".parse().unwrap(), "n2".parse().unwrap()],
            "operator/alice",
        );
        spec.min_healthy_time_ms = 0;
        s.apply(&Command::CreateRollout { spec, at_ms: 1 });
        let mut t = 1;
        while let Some(r) = s.find_rollout("r000001").filter(|r| !r.is_finished()) {
            t += 1;
            let term = if t > 6 { 3 } else { 2 };
            let in_flight = r.in_flight().to_vec();
            if in_flight.is_empty() {
                event(&mut s, Event::IssueActions, t, term);
                continue;
            }
            for a in in_flight {
                let result = match &a.kind {
                    ActionKind::Preflight => ActionResult::Preflight {
                        running: "4.2.0".parse().unwrap(),
                        free_disk: u64::MAX,
                        releases: vec![VersionEntry {
                            version: "4.2.0".parse().unwrap(),
                            state: orch_types::ReleaseState::Permanent,
                        }],
                    },
                    ActionKind::HealthGate { expect, .. }
                        if a.node.as_str() == "n2" && expect.to_string() == "4.2.1" =>
                    {
                        ActionResult::Failed {
                            error: "probe reported 4.2.0".into(),
                        }
                    }
                    _ => ActionResult::Done,
                };
                let seq = a.seq;
                event(&mut s, Event::Result { seq, result }, t, term);
            }
        }
        let r = s.find_rollout("r000001").unwrap();
        assert_eq!(r.phase().as_str(), "rolled_back", "{}", r.summary());
        let st = status_of(&s, r, true);
        let spec: RolloutSpec = serde_json::from_str(&st.spec_json).unwrap();
        let inputs: Vec<Input> = serde_json::from_str(&st.inputs_json).unwrap();
        let replayed: RolloutStatus = orch_rollout::replay(spec, &inputs).unwrap().status();
        assert_eq!(replayed, r.status());
        assert_eq!(replayed.phase.as_str(), st.phase);
        assert_eq!(replayed.events.len(), st.events.len());
        // Listings carry none of it.
        let listed = status_of(&s, r, false);
        assert!(listed.spec_json.is_empty() && listed.inputs_json.is_empty());
    }
}
