//! Incremental `WatchRollout` streams: a client that asks `RolloutRef.incremental` gets a full
//! status first and then deltas (`RolloutStatus.incremental`); [`RolloutStatus::merge_watch_update`]
//! applies them, so that callers still see full statuses.

use crate::control::RolloutStatus;

impl RolloutStatus {
    /// Applies the next message of a `WatchRollout` stream to the status built so far. A full
    /// status (`incremental: false`) replaces it; a delta replaces the scalars, replaces the
    /// node entries it carries (by id; an unknown id is added), appends its events and inputs,
    /// and keeps the spec and policy unless it carries them.
    pub fn merge_watch_update(&mut self, update: RolloutStatus) {
        if !update.incremental {
            *self = update;
            return;
        }
        // Every field by name: a field added later does not compile until it is merged here.
        let RolloutStatus {
            id,
            version,
            phase,
            awaiting_promotion,
            error,
            nodes,
            events,
            created_at_ms,
            requested_by,
            spec_json,
            inputs_json,
            min_healthy_ms,
            healthy_deadline_ms,
            bake_ms,
            policy,
            incremental: _,
        } = update;
        self.id = id;
        self.version = version;
        self.phase = phase;
        self.awaiting_promotion = awaiting_promotion;
        self.error = error;
        self.created_at_ms = created_at_ms;
        self.requested_by = requested_by;
        self.min_healthy_ms = min_healthy_ms;
        self.healthy_deadline_ms = healthy_deadline_ms;
        self.bake_ms = bake_ms;
        if policy.is_some() {
            self.policy = policy;
        }
        if !spec_json.is_empty() {
            self.spec_json = spec_json;
        }
        append_json_array(&mut self.inputs_json, inputs_json);
        self.events.extend(events);
        // Both lists are in the rollout's node order: searching on from the last match makes a
        // delta cost its own size, not the rollout's.
        let mut at = 0;
        for n in nodes {
            let len = self.nodes.len();
            match (0..len)
                .map(|k| (at + k) % len)
                .find(|&i| self.nodes[i].id == n.id)
            {
                Some(i) => {
                    self.nodes[i] = n;
                    at = i + 1;
                }
                None => self.nodes.push(n),
            }
        }
        // What the caller holds is a full status.
        self.incremental = false;
    }
}

/// Appends the items of the JSON array `more` to the JSON array `into` (text as the
/// coordinator sent it); `more` empty: nothing to append. Anything that is not an array
/// replaces `into` rather than being spliced into it.
fn append_json_array(into: &mut String, more: String) {
    let added = more.trim();
    if added.is_empty() {
        return;
    }
    let Some(items) = added
        .strip_prefix('[')
        .and_then(|a| a.strip_suffix(']'))
        .map(str::trim)
    else {
        *into = more;
        return;
    };
    if items.is_empty() {
        return;
    }
    let held = into.trim_end();
    match held.strip_suffix(']').map(str::trim_end) {
        Some(head) if head.trim_start() != "[" => {
            let head_len = head.len();
            into.truncate(head_len);
            into.push(',');
            into.push_str(items);
            into.push(']');
        }
        _ => *into = format!("[{items}]"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{AuditEvent, NodeProgress, RolloutPolicy};

    fn node(id: &str, step: &str) -> NodeProgress {
        NodeProgress {
            id: id.into(),
            step: step.into(),
            ..Default::default()
        }
    }

    fn event(message: &str) -> AuditEvent {
        AuditEvent {
            message: message.into(),
            ..Default::default()
        }
    }

    fn full() -> RolloutStatus {
        RolloutStatus {
            id: "r000001".into(),
            version: "4.2.1".into(),
            phase: "staging".into(),
            nodes: vec![
                node("n1", "staging"),
                node("n2", "staging"),
                node("n3", "pending"),
            ],
            events: vec![event("created")],
            spec_json: r#"{"id":"r000001"}"#.into(),
            inputs_json: r#"[{"a":1}]"#.into(),
            min_healthy_ms: 5000,
            policy: Some(RolloutPolicy {
                batch: "1".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_delta_replaces_scalars_and_changed_nodes_and_appends_the_rest() {
        let mut st = full();
        st.merge_watch_update(RolloutStatus {
            id: "r000001".into(),
            version: "4.2.1".into(),
            phase: "upgrading".into(),
            error: "n3: disk full".into(),
            nodes: vec![node("n3", "failed"), node("n1", "staged")],
            events: vec![event("n1: staged"), event("n3: failed")],
            inputs_json: r#"[{"b":2}, {"c":3}]"#.into(),
            min_healthy_ms: 0,
            incremental: true,
            ..Default::default()
        });
        let steps: Vec<_> = st.nodes.iter().map(|n| (&*n.id, &*n.step)).collect();
        assert_eq!(
            steps,
            [("n1", "staged"), ("n2", "staging"), ("n3", "failed")]
        );
        let msgs: Vec<_> = st.events.iter().map(|e| &*e.message).collect();
        assert_eq!(msgs, ["created", "n1: staged", "n3: failed"]);
        assert_eq!((&*st.phase, &*st.error), ("upgrading", "n3: disk full"));
        assert_eq!(st.min_healthy_ms, 0, "scalars are sent in full");
        // Unchanged unless sent.
        assert_eq!(st.spec_json, r#"{"id":"r000001"}"#);
        assert_eq!(st.policy.as_ref().map(|p| &*p.batch), Some("1"));
        assert_eq!(st.inputs_json, r#"[{"a":1},{"b":2}, {"c":3}]"#);
        assert!(!st.incremental);
        // A node the status did not hold is added.
        st.merge_watch_update(RolloutStatus {
            nodes: vec![node("n4", "pending")],
            incremental: true,
            ..st.clone()
        });
        assert_eq!(st.nodes.len(), 4);
    }

    #[test]
    fn a_full_status_replaces_everything() {
        let mut st = full();
        let next = RolloutStatus {
            id: "r000002".into(),
            nodes: vec![node("n9", "pending")],
            ..Default::default()
        };
        st.merge_watch_update(next.clone());
        assert_eq!(st, next);
    }

    #[test]
    fn inputs_append_to_empty_or_empty_arrays() {
        for (held, more, want) in [
            ("", "[1]", "[1]"),
            ("[]", "[1,2]", "[1,2]"),
            ("[1]", "", "[1]"),
            ("[1]", "[]", "[1]"),
            ("[1]", "[2]", "[1,2]"),
            ("[1] ", " [2,3] ", "[1,2,3]"),
            ("[1]", "{\"x\":1}", "{\"x\":1}"),
        ] {
            let mut into = held.to_string();
            append_json_array(&mut into, more.to_string());
            assert_eq!(into, want, "{held:?} + {more:?}");
        }
    }
}
