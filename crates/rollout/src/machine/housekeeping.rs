//! Pruning (pure): after a successful rollout with `keep_releases`, every node the rollout
//! upgraded (skipped nodes are left alone entirely) is asked to uninstall its releases beyond
//! the newest N. What to remove is the driver's
//! [`crate::prune_candidates`] over the node's releases at that moment; the machine decides
//! when, on which nodes, what is protected, and records the outcome. A failure to prune is
//! reported in the events and never fails the committed rollout.

use super::*;

/// `keeping the newest 3 releases`, `keeping the newest release`.
pub(super) fn keeping(keep: u32) -> String {
    match keep {
        0 => "keeping only the current and permanent releases".to_string(),
        1 => "keeping the newest release".to_string(),
        n => format!("keeping the newest {n} releases"),
    }
}

impl Rollout {
    /// Prune actions for nodes not pruned yet, at most `max_parallel_staging` in flight.
    pub(super) fn plan_prune(&self) -> Vec<(usize, ActionKind)> {
        let Some(keep) = self.spec.keep_releases else {
            return Vec::new();
        };
        let running = self
            .in_flight
            .iter()
            .filter(|a| matches!(a.kind, ActionKind::Prune { .. }))
            .count();
        let budget = (self.spec.max_parallel_staging as usize).saturating_sub(running);
        if budget == 0 {
            return Vec::new();
        }
        let busy = self.busy_nodes();
        self.targets()
            .into_iter()
            .filter(|&i| !self.nodes[i].pruned && !busy[i])
            .take(budget)
            .map(|i| {
                let protect = self.protected(i);
                (i, ActionKind::Prune { keep, protect })
            })
            .collect()
    }

    /// What node `i` must keep whatever its age: the target, and what it ran and booted
    /// before the rollout (where a rollback, which stays possible until the rollout ends,
    /// takes it back).
    fn protected(&self, i: usize) -> Vec<Version> {
        let n = &self.nodes[i];
        let mut v = vec![self.spec.version];
        if let Some(s) = n.start {
            v.push(s.permanent);
            v.extend(s.current);
        }
        v.extend(n.progress.from_version);
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Everything upgraded (and committed): prune when asked to, else succeed.
    pub(super) fn committed(&mut self, cx: &mut Ctx<'_>) {
        let watch = self.spec.watch_after_commit_ms;
        if watch > 0 && self.targets().iter().any(|&i| !self.nodes[i].watched) {
            self.phase = Phase::Watching;
            let msg = format!(
                "{}; watching every upgraded node for {} after the commit: a failure rolls every node back to its previous release",
                self.success_message(),
                ms(watch)
            );
            self.record(cx, msg);
            return;
        }
        match self.spec.keep_releases {
            Some(keep) if self.targets().iter().any(|&i| !self.nodes[i].pruned) => {
                self.phase = Phase::Pruning;
                let msg = format!(
                    "{}; pruning on every upgraded node ({})",
                    self.success_message(),
                    keeping(keep)
                );
                self.record(cx, msg);
            }
            _ => {
                let msg = self.success_message();
                self.terminate(Phase::Succeeded, msg, cx);
            }
        }
    }

    /// Pruning: once every node answered, succeeds.
    pub(super) fn pruning_ended(&mut self, cx: &mut Ctx<'_>) -> bool {
        if self.targets().iter().any(|&i| !self.nodes[i].pruned) || !self.in_flight.is_empty() {
            return false;
        }
        let msg = self.success_message();
        self.terminate(Phase::Succeeded, msg, cx);
        true
    }

    /// A node's prune answer: what went, and what could not.
    pub(super) fn prune_answered(
        &mut self,
        i: usize,
        removed: &[Version],
        failed: &[String],
        cx: &mut Ctx<'_>,
    ) {
        let keep = self.spec.keep_releases.unwrap_or(0);
        let node = &mut self.nodes[i];
        node.pruned = true;
        let id = node.id().clone();
        let mut msg = if removed.is_empty() {
            format!("{id}: nothing to prune ({})", keeping(keep))
        } else {
            let list: Vec<String> = removed.iter().map(|v| v.to_string()).collect();
            format!("{id}: pruned {} ({})", list.join(", "), keeping(keep))
        };
        if !failed.is_empty() {
            let why: Vec<String> = failed.iter().take(16).map(|f| clip(f)).collect();
            msg.push_str(&format!(
                "; could not uninstall {}: the rollout succeeded regardless (retry with `orchestrator node prune`)",
                why.join("; ")
            ));
        }
        self.record(cx, msg);
    }

    /// A node's prune failed as a whole (agent unreachable, ...): reported, not a failure of
    /// the rollout.
    pub(super) fn prune_failed(&mut self, i: usize, error: &str, cx: &mut Ctx<'_>) {
        let node = &mut self.nodes[i];
        node.pruned = true;
        let id = node.id().clone();
        self.record(
            cx,
            format!(
                "{id}: pruning failed: {error}; the rollout succeeded regardless (retry with `orchestrator node prune`)"
            ),
        );
    }
}
