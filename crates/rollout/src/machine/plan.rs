//! Planning (pure): which actions the state calls for next.

use super::*;

impl Rollout {
    pub(super) fn busy(&self, i: usize) -> bool {
        let id = self.nodes[i].id();
        self.in_flight.iter().any(|a| &a.node == id)
    }

    /// Nodes that take part in the upgrade: all but the skipped ones (meaningful after preflight).
    pub(super) fn targets(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].step() != NodeStep::Skipped)
            .collect()
    }

    pub(super) fn canary_pending(&self) -> bool {
        self.spec.canary > 0 && !self.promoted
    }

    /// The upgrade batches, in order, each flagged with whether it comes after the canary. The
    /// canary part is chunked separately so that no batch straddles the promotion point, and
    /// every batch respects `batch_size`.
    pub(super) fn batches(&self) -> Vec<(bool, Vec<usize>)> {
        let targets = self.targets();
        let size = (self.spec.batch_size as usize).max(1);
        let canary = (self.spec.canary as usize).min(targets.len());
        let (head, tail) = targets.split_at(canary);
        let mut out: Vec<(bool, Vec<usize>)> =
            head.chunks(size).map(|c| (false, c.to_vec())).collect();
        out.extend(tail.chunks(size).map(|c| (true, c.to_vec())));
        out
    }

    /// Touched nodes, most recently touched first.
    pub(super) fn rollback_order(&self) -> Vec<usize> {
        let mut v: Vec<(u64, usize)> = self
            .nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| n.touch_seq.map(|s| (s, i)))
            .collect();
        v.sort_unstable_by(|a, b| b.cmp(a));
        v.into_iter().map(|(_, i)| i).collect()
    }

    /// Up to `max_parallel_staging` in flight of one kind, over idle nodes at `step`, in order.
    pub(super) fn plan_bounded(
        &self,
        step: NodeStep,
        kind: ActionKind,
    ) -> Vec<(usize, ActionKind)> {
        let running = self
            .in_flight
            .iter()
            .filter(|a| a.kind.name() == kind.name())
            .count();
        let budget = (self.spec.max_parallel_staging as usize).saturating_sub(running);
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].step() == step && !self.busy(i))
            .take(budget)
            .map(|i| (i, kind.clone()))
            .collect()
    }

    pub(super) fn plan(&self) -> Vec<(usize, ActionKind)> {
        if self.paused || self.phase.is_terminal() {
            return Vec::new();
        }
        let target = self.spec.version;
        match self.phase {
            Phase::Pending | Phase::Preflight => (0..self.nodes.len())
                .filter(|&i| self.nodes[i].step() == NodeStep::Pending && !self.busy(i))
                .map(|i| (i, ActionKind::Preflight))
                .collect(),
            Phase::Staging => {
                self.plan_bounded(NodeStep::PreflightOk, ActionKind::Stage { version: target })
            }
            Phase::Upgrading => self.plan_upgrade(),
            Phase::Baking => self.plan_bake(),
            Phase::Committing => {
                self.plan_bounded(NodeStep::Upgraded, ActionKind::Commit { version: target })
            }
            Phase::RollingBack => self.plan_rollback(),
            Phase::Pruning => self.plan_prune(),
            _ => Vec::new(),
        }
    }

    pub(super) fn plan_upgrade(&self) -> Vec<(usize, ActionKind)> {
        if self.awaiting_promotion {
            return Vec::new();
        }
        let batches = self.batches();
        let Some((after_canary, batch)) = batches
            .iter()
            .find(|(_, b)| b.iter().any(|&i| !self.upgraded(i)))
        else {
            return Vec::new();
        };
        if *after_canary && self.canary_pending() {
            return Vec::new();
        }
        let target = self.spec.version;
        batch
            .iter()
            .filter(|&&i| !self.busy(i))
            .filter_map(|&i| match self.nodes[i].step() {
                NodeStep::Staged if self.nodes[i].route == Route::SwitchBack => {
                    Some((i, ActionKind::Downgrade { to: target }))
                }
                NodeStep::Staged => Some((i, ActionKind::Install { version: target })),
                NodeStep::Installed => Some((i, self.gate(target))),
                _ => None,
            })
            .collect()
    }

    /// Node `i` runs the target and passed its gate: `upgraded`, or `committed` already (a
    /// switch back to a permanent target needs no commit).
    pub(super) fn upgraded(&self, i: usize) -> bool {
        matches!(
            self.nodes[i].step(),
            NodeStep::Upgraded | NodeStep::Committed
        )
    }

    /// Node `i` has the target on disk (or running) and waits for its upgrade batch.
    pub(super) fn ready(&self, i: usize) -> bool {
        matches!(self.nodes[i].step(), NodeStep::Staged | NodeStep::Installed)
    }

    /// The steps that undo what the forward path may have done to node `i`, in order, and the
    /// release the node runs once they are done (its rollback gate expects it); `None` when the
    /// node's starting point is unknown. Every step is valid, or already holds, whichever of
    /// the node's possible states it finds (a failed step may or may not have changed it):
    ///
    /// - target installed over a permanent P (nothing else current): downgrade P.
    /// - target installed over C current on a permanent P: install C again (not permanent),
    ///   preceded by a downgrade to P if a commit may have made the target permanent.
    /// - target was already current over P (only gated and committed): downgrade P. Not quite
    ///   the start (the target ran, not permanently), but a rollback moves away from the
    ///   target instead of installing it again; the target stays on disk (`old`).
    /// - target was permanent behind C current (switched back to with a downgrade): install C
    ///   again (not permanent), which restores exactly C current, target permanent.
    pub(super) fn undo_program(&self, i: usize) -> (Vec<ActionKind>, Option<Version>) {
        let n = &self.nodes[i];
        let Some(start) = n.start else {
            // Preflight answered without releases: as before release lists existed.
            return match n.progress.from_version {
                Some(from) => (vec![ActionKind::Downgrade { to: from }], Some(from)),
                None => (Vec::new(), None),
            };
        };
        let p = start.permanent;
        let down = ActionKind::Downgrade { to: p };
        match (n.route, start.current) {
            (Route::Stage | Route::Install, None) | (Route::Adopt, _) => (vec![down], Some(p)),
            (Route::Stage | Route::Install, Some(c)) => {
                let reinstall = ActionKind::Install { version: c };
                if n.commit_seq.is_some() {
                    (vec![down, reinstall], Some(c))
                } else {
                    (vec![reinstall], Some(c))
                }
            }
            (Route::SwitchBack, Some(c)) => (vec![ActionKind::Install { version: c }], Some(c)),
            // Preflight never plans a switch back without a current release.
            (Route::SwitchBack, None) => (Vec::new(), None),
        }
    }

    pub(super) fn plan_rollback(&self) -> Vec<(usize, ActionKind)> {
        // Strictly one node at a time, most recently touched first: the next node waits until the
        // previous one is back and healthy (or given up on).
        let order = self.rollback_order();
        let Some(&i) = order.iter().find(|&&i| {
            !matches!(
                self.nodes[i].step(),
                NodeStep::RolledBack | NodeStep::RollbackFailed
            )
        }) else {
            return Vec::new();
        };
        if self.busy(i) {
            // Typically an install or commit still in flight: its outcome must be known first.
            return Vec::new();
        }
        let n = &self.nodes[i];
        let (program, back_to) = self.undo_program(i);
        let Some(back_to) = back_to else {
            // start_rollback marks such nodes rollback_failed; nothing sensible to issue.
            return Vec::new();
        };
        match program.get(usize::from(n.undone)) {
            Some(step) if !n.downgraded => vec![(i, step.clone())],
            _ => vec![(i, self.gate(back_to))],
        }
    }

    /// Every target not baked yet gets the bake gate at once: the bake watches the whole
    /// cluster together, which is the point of it.
    pub(super) fn plan_bake(&self) -> Vec<(usize, ActionKind)> {
        self.targets()
            .into_iter()
            .filter(|&i| !self.nodes[i].baked && !self.busy(i))
            .filter(|&i| {
                matches!(
                    self.nodes[i].step(),
                    NodeStep::Installed | NodeStep::Upgraded | NodeStep::Committed
                )
            })
            .map(|i| (i, self.bake_gate()))
            .collect()
    }

    /// Whether the rollout probes every node again once all are upgraded: a bake was asked
    /// for, or the rollout does not commit (nothing else would notice a node that restarted
    /// onto its permanent release after its gate).
    pub(super) fn bakes(&self) -> bool {
        self.spec.bake_ms > 0 || !self.spec.permanent
    }

    /// The bake gate: healthy on the target for the whole bake, and any probe answered
    /// unhealthy fails it at once ("any failure in that window"). The final check of a
    /// rollout without bake is one healthy probe, with the spec's failure threshold.
    pub(super) fn bake_gate(&self) -> ActionKind {
        let bake = self.spec.bake_ms;
        ActionKind::HealthGate {
            min_healthy_time_ms: bake,
            healthy_deadline_ms: self.spec.bake_deadline_ms(),
            expect: self.spec.version,
            failure_threshold: if bake > 0 {
                1
            } else {
                self.spec.failure_threshold
            },
        }
    }

    pub(super) fn gate(&self, expect: Version) -> ActionKind {
        ActionKind::HealthGate {
            min_healthy_time_ms: self.spec.min_healthy_time_ms,
            healthy_deadline_ms: self.spec.healthy_deadline_ms,
            expect,
            failure_threshold: self.spec.failure_threshold,
        }
    }

    pub(super) fn idle_reason(&self) -> String {
        if self.phase.is_terminal() {
            format!("nothing to issue: rollout has ended ({})", self.phase)
        } else if self.paused {
            "nothing to issue: rollout is paused".to_string()
        } else if self.awaiting_promotion {
            "nothing to issue: waiting for canary promotion".to_string()
        } else {
            format!(
                "nothing to issue: waiting for {} in-flight action(s)",
                self.in_flight.len()
            )
        }
    }
}
