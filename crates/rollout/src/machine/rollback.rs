//! Entering a rollback, and a node whose rollback failed.

use super::*;

impl Rollout {
    pub(super) fn rollback_failed(&mut self, i: usize, msg: String, cx: &mut Ctx<'_>) {
        let node = &mut self.nodes[i];
        node.progress.step = NodeStep::RollbackFailed;
        node.progress.error = Some(msg.clone());
        let id = node.id().clone();
        self.record(
            cx,
            format!("{id}: {msg}; this node needs a person, rollback continues with the others"),
        );
    }

    /// Enters `rolling_back` (or `aborted` when no node was touched: nothing to undo).
    pub(super) fn start_rollback(&mut self, cause: String, cx: &mut Ctx<'_>) {
        self.awaiting_promotion = false;
        self.error.get_or_insert(cause.clone());
        let order = self.rollback_order();
        if order.is_empty() {
            self.terminate(
                Phase::Aborted,
                format!(
                    "{cause}; no node was installed, so there is nothing to roll back: rollout aborted (the service was never touched; staged releases stay unpacked)"
                ),
                cx,
            );
            return;
        }
        // Keep only actions that change a node: their outcome must be known before the node is
        // downgraded. Health gates and unpacks no longer matter.
        let (keep, drop): (Vec<Action>, Vec<Action>) = std::mem::take(&mut self.in_flight)
            .into_iter()
            .partition(|a| a.kind.changes_node());
        self.in_flight = keep;
        for a in &drop {
            if let Some(j) = self.index_of(&a.node) {
                let n = &mut self.nodes[j];
                n.progress.step = match n.step() {
                    NodeStep::Verifying => NodeStep::Installed,
                    NodeStep::Staging => NodeStep::PreflightOk,
                    other => other,
                };
            }
        }
        cx.cancelled.extend(drop);
        for &j in &order {
            if self.undo_program(j).1.is_none() {
                // Cannot happen (a touch needs a preflight), but never guess a version to run.
                self.rollback_failed(
                    j,
                    "previous version unknown, cannot roll back".to_string(),
                    cx,
                );
            }
        }
        let committed = if self.phase == Phase::Watching {
            format!(
                " ({} was committed: this rolls back a committed rollout)",
                self.spec.version
            )
        } else {
            String::new()
        };
        self.phase = Phase::RollingBack;
        let ids: Vec<&NodeId> = order.iter().map(|&j| self.nodes[j].id()).collect();
        let mut msg = format!(
            "{cause}; rolling back {} touched node{}{committed} one at a time, most recently touched first: {}",
            ids.len(),
            plural(ids.len()),
            join_ids(ids)
        );
        if self.paused {
            msg.push_str(" (the rollout is paused: resume or rollback starts it)");
        }
        self.record(cx, msg);
    }
}
