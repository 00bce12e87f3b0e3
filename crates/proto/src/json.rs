//! The JSON shapes of the control API's answers, shared by the CLI's `--json` output and the
//! coordinators' HTTP API (docs/cli-json.md, docs/api.md): empty strings and zero times become
//! `null`, times are milliseconds since the Unix epoch.

use serde_json::{Value, json};

use crate::control as pb;

/// `null` for an empty string.
pub fn opt_str(s: &str) -> Value {
    if s.is_empty() { Value::Null } else { json!(s) }
}

/// `null` for 0.
pub fn opt_ms(ms: u64) -> Value {
    if ms == 0 { Value::Null } else { json!(ms) }
}

/// A rollout's status as JSON (see docs/cli-json.md).
pub fn status_json(s: &pb::RolloutStatus) -> Value {
    json!({
        "id": s.id,
        "version": s.version,
        "phase": s.phase,
        "awaiting_promotion": s.awaiting_promotion,
        "error": opt_str(&s.error),
        "requested_by": s.requested_by,
        "created_at_ms": s.created_at_ms,
        "gate": {
            "min_healthy_ms": s.min_healthy_ms,
            "healthy_deadline_ms": s.healthy_deadline_ms,
            "bake_ms": s.bake_ms,
        },
        "policy": policy_json(s.policy.as_ref()),
        "nodes": s.nodes.iter().map(|n| json!({
            "id": n.id,
            "from_version": opt_str(&n.from_version),
            "step": n.step,
            "step_since_ms": opt_ms(n.step_since_ms),
            "error": opt_str(&n.error),
            "unresponsive_since_ms": opt_ms(n.unresponsive_since_ms),
            "unresponsive_detail": opt_str(&n.unresponsive_detail),
            // Known only to the leader, which probes the gate: null elsewhere.
            "healthy_since_ms": if n.gate_watched { json!(n.healthy_since_ms) } else { Value::Null },
        })).collect::<Vec<_>>(),
        "events": s.events.iter().map(|e| json!({"at_ms": e.at_ms, "by": e.by, "message": e.message, "term": e.term})).collect::<Vec<_>>(),
        // For replay (null in listings): orch_rollout::replay(spec, inputs) gives this status.
        "spec": raw_json(&s.spec_json),
        "inputs": raw_json(&s.inputs_json),
    })
}

/// A rollout's policy as JSON (see docs/cli-json.md): `null` from a coordinator that does not
/// send one.
pub fn policy_json(p: Option<&pb::RolloutPolicy>) -> Value {
    let Some(p) = p else {
        return Value::Null;
    };
    json!({
        "wave_by": opt_str(&p.wave_by),
        "waves": p.waves.iter().map(|w| json!({"label_value": w.label_value, "nodes": w.nodes})).collect::<Vec<_>>(),
        "batch": p.batch,
        "selector": p.selector.iter().collect::<std::collections::BTreeMap<_, _>>(),
        "max_unavailable": opt_str(&p.max_unavailable),
        "max_unavailable_nodes": if p.max_unavailable_nodes == 0 { Value::Null } else { json!(p.max_unavailable_nodes) },
        "unhealthy_at_start": p.unhealthy_at_start,
        "promote_each_wave": p.promote_each_wave,
        "wave_pause_ms": p.wave_pause_ms,
        "watch_after_commit_ms": p.watch_after_commit_ms,
        "gate_prometheus": opt_str(&p.gate_prometheus),
        "gates": p.gates,
    })
}

/// JSON the coordinator sent as text, as a value; `null` when empty (or unreadable).
fn raw_json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::Null)
}

/// A registered node as JSON.
pub fn node_json(n: &pb::NodeEntry) -> Value {
    json!({
        "id": n.id,
        "address": n.address,
        "labels": n.labels,
        "versions": n.versions.iter().map(|e| json!({"version": e.version, "state": e.state})).collect::<Vec<_>>(),
        "healthy": n.healthy,
        "health_detail": n.health_detail,
        "conflict": opt_str(&n.conflict),
        "conflict_at_ms": opt_ms(n.conflict_at_ms),
    })
}

/// The coordinator cluster's status as JSON.
pub fn cluster_json(s: &pb::ClusterStatusReply) -> Value {
    json!({
        "leader_id": if s.leader_id == 0 { Value::Null } else { json!(s.leader_id) },
        "leader_address": s.leader_address,
        "cluster_id": s.cluster_id,
        "term": s.term,
        "last_applied": s.last_applied,
        "quorum": s.quorum,
        "note": s.note,
        "answered_by": s.answered_by,
        "members": s.members.iter().map(|m| json!({
            "id": m.id,
            "address": m.address,
            "role": m.role,
            "reachable": m.reachable,
            "last_contact_ms_ago": m.last_contact_ms_ago,
            "lag": m.lag,
        })).collect::<Vec<_>>(),
    })
}
