//! Shared presentation: clocks and durations, JSON shapes of the control API's answers, and the
//! plain-text rollout status.

use std::time::Duration;

use orch_client::control as pb;
use serde_json::{Value, json};

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `HH:MM:SS` (UTC) of a time in ms since the epoch.
pub fn clock(at_ms: u64) -> String {
    let secs = at_ms / 1000;
    format!(
        "{:02}:{:02}:{:02}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60
    )
}

/// `HH:MM:SS.mmm` (UTC).
pub fn clock_ms(at_ms: u64) -> String {
    format!("{}.{:03}", clock(at_ms), at_ms % 1000)
}

/// `850ms`, `2.4s`, `1m05s`, `2h03m`.
pub fn human_duration(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    if ms < 1_000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{}.{}s", ms / 1000, (ms % 1000) / 100)
    } else if ms < 3_600_000 {
        format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60)
    } else {
        format!("{}h{:02}m", ms / 3_600_000, (ms / 60_000) % 60)
    }
}

/// `null` for an empty string.
fn opt_str(s: &str) -> Value {
    if s.is_empty() { Value::Null } else { json!(s) }
}

/// `null` for 0.
fn opt_ms(ms: u64) -> Value {
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
        "nodes": s.nodes.iter().map(|n| json!({
            "id": n.id,
            "from_version": opt_str(&n.from_version),
            "step": n.step,
            "error": opt_str(&n.error),
            "unresponsive_since_ms": opt_ms(n.unresponsive_since_ms),
            "unresponsive_detail": opt_str(&n.unresponsive_detail),
        })).collect::<Vec<_>>(),
        "events": s.events.iter().map(|e| json!({"at_ms": e.at_ms, "by": e.by, "message": e.message, "term": e.term})).collect::<Vec<_>>(),
    })
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

/// A node's error column: its agent's unresponsiveness (and for how long), then its error.
pub fn node_problem(n: &pb::NodeProgress) -> String {
    let mut out = Vec::new();
    if n.unresponsive_since_ms > 0 {
        let secs = now_ms().saturating_sub(n.unresponsive_since_ms) / 1000;
        out.push(format!(
            "agent unresponsive for {secs}s ({})",
            n.unresponsive_detail
        ));
    }
    if !n.error.is_empty() {
        out.push(n.error.clone());
    }
    out.join("; ")
}

/// The plain-text status of one rollout; `events`: how many of the last events to show (`None`:
/// all of them), saying how many were left out.
pub fn print_status(s: &pb::RolloutStatus, events: Option<usize>) {
    let mut head = format!("Rollout {} to {}: {}", s.id, s.version, s.phase);
    if s.awaiting_promotion {
        head.push_str(" (canary done: waiting for `orchestrator promote`)");
    }
    println!("{head}");
    if !s.requested_by.is_empty() {
        println!("requested by {}", s.requested_by);
    }
    if !s.error.is_empty() {
        println!("error: {}", s.error);
    }
    let w = s.nodes.iter().map(|n| n.id.len()).max().unwrap_or(4).max(4);
    println!("  {:<w$}  {:<10}  {:<16}  ERROR", "NODE", "FROM", "STEP");
    for n in &s.nodes {
        let from = if n.from_version.is_empty() {
            "-"
        } else {
            &n.from_version
        };
        println!(
            "  {:<w$}  {:<10}  {:<16}  {}",
            n.id,
            from,
            n.step,
            node_problem(n)
        );
    }
    if s.events.is_empty() {
        return;
    }
    let total = s.events.len();
    let shown = events.unwrap_or(total).min(total);
    println!("events:");
    if shown < total {
        println!(
            "  ({} earlier event{} left out; --events N shows more, --events all every one)",
            total - shown,
            if total - shown == 1 { "" } else { "s" }
        );
    }
    for e in &s.events[total - shown..] {
        println!("  {} {} ({})", clock(e.at_ms), e.message, e.by);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(human_duration(Duration::from_millis(850)), "850ms");
        assert_eq!(human_duration(Duration::from_millis(2_450)), "2.4s");
        assert_eq!(human_duration(Duration::from_secs(65)), "1m05s");
        assert_eq!(human_duration(Duration::from_secs(7_380)), "2h03m");
    }
}
