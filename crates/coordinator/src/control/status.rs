//! A rollout's status as the control API answers it, from the replicated state or from a
//! history line.

use orch_proto::control as pb;
use orch_rollout::{Input, Rollout};
use orch_types::rollout::RolloutSpec;

use crate::history::HistoryRecord;
use crate::state::ClusterState;

/// A rollout's status for the control API; `with_events: false` (listings) copies nothing of
/// its audit trail, which is most of its size.
pub fn status_of(s: &ClusterState, r: &Rollout, with_events: bool) -> pb::RolloutStatus {
    pb::RolloutStatus {
        id: r.id().to_string(),
        version: r.spec().version.to_string(),
        phase: r.phase().to_string(),
        awaiting_promotion: r.awaiting_promotion(),
        error: r.error().unwrap_or_default().to_string(),
        nodes: r
            .nodes()
            .map(|n| {
                let mut p = node_progress(n);
                if let Some(u) = s.nodes.get(&n.id).and_then(|rec| rec.unresponsive.as_ref()) {
                    p.unresponsive_since_ms = u.since_ms;
                    p.unresponsive_detail = u.detail.clone();
                }
                p
            })
            .collect(),
        events: if with_events {
            r.events().iter().map(audit_event).collect()
        } else {
            Vec::new()
        },
        created_at_ms: r
            .id()
            .parse()
            .ok()
            .and_then(|id| s.created_at.get(&id).copied())
            .unwrap_or(0),
        requested_by: r.spec().requested_by.clone(),
        ..replay_data(r.spec(), r.inputs(), with_events)
    }
}

/// A status holding only what replays the rollout, as JSON (`spec_json`, `inputs_json`); the
/// rest default. Nothing without events (listings).
fn replay_data(spec: &RolloutSpec, inputs: &[Input], with_events: bool) -> pb::RolloutStatus {
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

fn node_progress(n: &orch_types::rollout::NodeProgress) -> pb::NodeProgress {
    pb::NodeProgress {
        id: n.id.to_string(),
        from_version: n.from_version.map(|v| v.to_string()).unwrap_or_default(),
        step: n.step.to_string(),
        error: n.error.clone().unwrap_or_default(),
        ..Default::default()
    }
}

fn audit_event(e: &orch_types::rollout::AuditEvent) -> pb::AuditEvent {
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
        ..replay_data(&h.spec, &h.inputs, with_events)
    }
}
