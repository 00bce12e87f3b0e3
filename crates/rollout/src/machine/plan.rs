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
    /// canary part is chunked separately so that no batch straddles the promotion point, no
    /// batch straddles two waves, and every batch respects its wave's batch size.
    pub(super) fn batches(&self) -> Vec<(bool, Vec<usize>)> {
        let mut out = Vec::new();
        self.find_batch(|after_canary, b| {
            out.push((after_canary, b.to_vec()));
            false
        });
        out
    }

    /// The first batch of [`Rollout::batches`] with a node not upgraded yet, without building
    /// the others: planning asks on every entry, and batches of one node would otherwise cost
    /// an allocation per node each time.
    pub(super) fn current_batch(&self) -> Option<(bool, Vec<usize>)> {
        let mut found = None;
        self.find_batch(|after_canary, b| {
            let pending = b.iter().any(|&i| !self.upgraded(i));
            if pending {
                found = Some((after_canary, b.to_vec()));
            }
            pending
        });
        found
    }

    /// Calls `stop` on each batch in order (after the canary?, its nodes) until it says `true`.
    fn find_batch(&self, mut stop: impl FnMut(bool, &[usize]) -> bool) {
        let canary = self.spec.canary as usize;
        let mut seen = 0;
        for wave in self.wave_ranges() {
            let size = self.spec.batch_size_in(wave.len());
            let targets: Vec<usize> = wave
                .filter(|&i| self.nodes[i].step() != NodeStep::Skipped)
                .collect();
            let head = canary.saturating_sub(seen).min(targets.len());
            seen += targets.len();
            let (head, tail) = targets.split_at(head);
            let mut chunks = head
                .chunks(size)
                .map(|c| (false, c))
                .chain(tail.chunks(size).map(|c| (true, c)));
            if chunks.any(|(after_canary, c)| stop(after_canary, c)) {
                return;
            }
        }
    }

    /// The waves as ranges of node indexes, in order (one wave of every node without waves).
    /// The spec validated that the waves list its nodes in order.
    pub(super) fn wave_ranges(&self) -> Vec<std::ops::Range<usize>> {
        if self.spec.waves.is_empty() {
            return std::iter::once(0..self.nodes.len()).collect();
        }
        let mut start = 0;
        self.spec
            .waves
            .iter()
            .map(|w| {
                let r = start..start + w.nodes.len();
                start = r.end;
                r
            })
            .collect()
    }

    /// With `promote_each_wave`: the wave that waits for `promote` before it starts, once every
    /// earlier wave is upgraded and healthy; `None` when nothing waits (the last wave done,
    /// or its successor promoted already).
    pub(super) fn wave_gate(&self) -> Option<usize> {
        if !self.spec.promote_each_wave {
            return None;
        }
        let next = self.wave_ranges().iter().position(|r| {
            r.clone()
                .any(|i| self.nodes[i].step() != NodeStep::Skipped && !self.upgraded(i))
        })?;
        (next > self.waves_promoted).then_some(next)
    }

    /// With `wave_pause_ms`: the wave `k` whose pause (before it starts) is not over yet, once
    /// every earlier wave is upgraded and healthy; `None` when no pause holds (the last wave
    /// done, or the pause before the next one over).
    pub(super) fn wave_hold(&self) -> Option<usize> {
        if self.spec.wave_pause_ms == 0 {
            return None;
        }
        let next = self.wave_ranges().iter().position(|r| {
            r.clone()
                .any(|i| self.nodes[i].step() != NodeStep::Skipped && !self.upgraded(i))
        })?;
        (next > 0 && self.waves_held < next).then_some(next)
    }

    /// The targets the pause before wave `k` watches: every one of the earlier waves.
    pub(super) fn held_by(&self, k: usize) -> Vec<usize> {
        let end = self.wave_ranges().get(k).map_or(0, |r| r.start);
        (0..end)
            .filter(|&i| self.nodes[i].step() != NodeStep::Skipped)
            .collect()
    }

    /// The pause before wave `k`: a gate for the whole pause on every node upgraded so far that
    /// has not stayed healthy through it yet, all at once (the pause watches them together).
    pub(super) fn plan_hold(&self, k: usize) -> Vec<(usize, ActionKind)> {
        let pause = self.spec.wave_pause_ms;
        let busy = self.busy_nodes();
        self.held_by(k)
            .into_iter()
            .filter(|&i| self.upgraded(i) && self.nodes[i].held < k && !busy[i])
            .map(|i| (i, self.watch_gate(pause)))
            .collect()
    }

    /// Waits for `promote` before wave `k` (with `promote_each_wave`); `true` when it starts
    /// waiting now.
    pub(super) fn await_wave(&mut self, k: usize, cx: &mut Ctx<'_>) -> bool {
        if self.awaiting_promotion {
            return false;
        }
        self.awaiting_promotion = true;
        let msg = format!(
            "wave {} upgraded and healthy on {}; waiting for promote before wave {}",
            self.wave_name(k - 1),
            self.spec.version,
            self.wave_name(k)
        );
        self.record(cx, msg);
        true
    }

    /// The label value of wave `k`, for the audit trail.
    pub(super) fn wave_name(&self, k: usize) -> String {
        match (&self.spec.wave_by, self.spec.waves.get(k)) {
            (Some(label), Some(w)) => format!("{label}={}", w.label_value),
            _ => format!("{}", k + 1),
        }
    }

    /// The wave node `i` belongs to (0 without waves).
    pub(super) fn wave_of(&self, i: usize) -> usize {
        self.wave_ranges()
            .iter()
            .position(|r| r.contains(&i))
            .unwrap_or(0)
    }

    /// Node `i` counts against `max_unavailable`: switching, verifying, failed its gate or
    /// being put back; or touched (a switch may have changed it) and not healthy on the target
    /// since; or unhealthy when the rollout started and not upgraded (and healthy) since.
    pub(super) fn unavailable(&self, i: usize) -> bool {
        let n = &self.nodes[i];
        match n.step() {
            NodeStep::Upgraded
            | NodeStep::Committing
            | NodeStep::Committed
            | NodeStep::RolledBack => false,
            NodeStep::Installing
            | NodeStep::Verifying
            | NodeStep::RollingBack
            | NodeStep::RollbackFailed => true,
            NodeStep::Failed if n.retry == Some(Retry::HealthGate) => true,
            _ => n.touch_seq.is_some() || self.spec.unhealthy_at_start.contains(n.id()),
        }
    }

    /// How many nodes count against `max_unavailable` now, the rollout's own and the
    /// registered nodes outside it that were unhealthy when it started.
    pub fn unavailable_count(&self) -> usize {
        let outside = self
            .spec
            .unhealthy_at_start
            .iter()
            .filter(|n| self.index_of(n).is_none())
            .count();
        outside
            + (0..self.nodes.len())
                .filter(|&i| self.unavailable(i))
                .count()
    }

    /// The batch rule and waves in words, for the audit trail: `2 at a time`, or `50% of each
    /// wave at a time, wave by wave (zone: a, b, c)`.
    pub(super) fn batch_words(&self) -> String {
        let mut s = match self.spec.batch_percent {
            Some(p) if self.spec.waves.is_empty() => format!("{p}% of the nodes at a time"),
            Some(p) => format!("{p}% of each wave at a time"),
            None => format!("{} at a time", self.spec.batch_size),
        };
        if let Some(label) = &self.spec.wave_by {
            let values: Vec<&str> = self
                .spec
                .waves
                .iter()
                .map(|w| w.label_value.as_str())
                .collect();
            s.push_str(&format!(", wave by wave ({label}: {})", values.join(", ")));
        }
        if let Some(m) = self.spec.max_unavailable {
            s.push_str(&format!(", at most {m} unavailable"));
        }
        s
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
        if budget == 0 {
            return Vec::new();
        }
        let busy = self.busy_nodes();
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].step() == step && !busy[i])
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
            Phase::Pending | Phase::Preflight => {
                let busy = self.busy_nodes();
                (0..self.nodes.len())
                    .filter(|&i| self.nodes[i].step() == NodeStep::Pending && !busy[i])
                    .map(|i| (i, ActionKind::Preflight))
                    .collect()
            }
            Phase::Staging => {
                self.plan_bounded(NodeStep::PreflightOk, ActionKind::Stage { version: target })
            }
            Phase::Upgrading => self.plan_upgrade(),
            Phase::Baking => self.plan_bake(),
            Phase::Committing => {
                self.plan_bounded(NodeStep::Upgraded, ActionKind::Commit { version: target })
            }
            Phase::Watching => self.plan_watch(),
            Phase::RollingBack => self.plan_rollback(),
            Phase::Pruning => self.plan_prune(),
            _ => Vec::new(),
        }
    }

    pub(super) fn plan_upgrade(&self) -> Vec<(usize, ActionKind)> {
        if self.awaiting_promotion {
            return Vec::new();
        }
        if let Some(k) = self.wave_hold() {
            return self.plan_hold(k);
        }
        if self.wave_gate().is_some() {
            return Vec::new();
        }
        let Some((after_canary, batch)) = self.current_batch() else {
            return Vec::new();
        };
        if after_canary && self.canary_pending() {
            return Vec::new();
        }
        let busy = self.busy_nodes();
        let target = self.spec.version;
        // Starting a switch on a node that does not count as unavailable yet takes one unit of
        // the bound; a node already counted (unhealthy from the start, or mid-step) takes none.
        let mut room = self
            .spec
            .max_unavailable_nodes()
            .map(|max| max.saturating_sub(self.unavailable_count()));
        batch
            .into_iter()
            .filter(|&i| !busy[i])
            .filter_map(|i| {
                let kind = match self.nodes[i].step() {
                    NodeStep::Staged if self.nodes[i].route == Route::SwitchBack => {
                        ActionKind::Downgrade { to: target }
                    }
                    NodeStep::Staged => ActionKind::Install { version: target },
                    NodeStep::Installed => self.gate(target),
                    _ => return None,
                };
                // A switch, or the gate of a node that already ran the target (adopted), takes
                // one unit of the bound; a node already counted takes none.
                if let Some(room) = room.as_mut()
                    && !self.unavailable(i)
                {
                    if *room == 0 {
                        return None;
                    }
                    *room -= 1;
                }
                Some((i, kind))
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
        let busy = self.busy_nodes();
        self.targets()
            .into_iter()
            .filter(|&i| !self.nodes[i].baked && !busy[i])
            .filter(|&i| {
                matches!(
                    self.nodes[i].step(),
                    NodeStep::Installed | NodeStep::Upgraded | NodeStep::Committed
                )
            })
            .map(|i| (i, self.bake_gate()))
            .collect()
    }

    /// After the commit (`watch_after_commit_ms`): every target not watched yet gets the watch
    /// gate at once (a node that failed it and is retried after `resume` is `installed`).
    pub(super) fn plan_watch(&self) -> Vec<(usize, ActionKind)> {
        let watch = self.spec.watch_after_commit_ms;
        let busy = self.busy_nodes();
        self.targets()
            .into_iter()
            .filter(|&i| !self.nodes[i].watched && !busy[i])
            .filter(|&i| {
                matches!(
                    self.nodes[i].step(),
                    NodeStep::Installed | NodeStep::Upgraded | NodeStep::Committed
                )
            })
            .map(|i| (i, self.watch_gate(watch)))
            .collect()
    }

    /// A gate that watches a node for `watch_ms` (wave pause, watch after commit): healthy on
    /// the target all along, one probe answered unhealthy fails it, as for the bake.
    pub(super) fn watch_gate(&self, watch_ms: u64) -> ActionKind {
        ActionKind::HealthGate {
            min_healthy_time_ms: watch_ms,
            healthy_deadline_ms: self.spec.watch_deadline_ms(watch_ms),
            expect: self.spec.version,
            failure_threshold: 1,
        }
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
        } else if let Some(k) = self.wave_gate() {
            format!(
                "nothing to issue: waiting for promote before wave {}",
                self.wave_name(k)
            )
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
