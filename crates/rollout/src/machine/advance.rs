//! Phase transitions: once results are in, the phase the state now calls for.

use super::*;

impl Rollout {
    /// Ends the rollout. Whatever is in flight is cancelled: late results are ignored.
    pub(super) fn terminate(&mut self, phase: Phase, message: String, cx: &mut Ctx<'_>) {
        cx.cancelled.append(&mut self.in_flight);
        self.phase = phase;
        self.paused = false;
        self.awaiting_promotion = false;
        self.record(cx, message);
    }

    /// Takes every phase transition the state now calls for.
    pub(super) fn advance(&mut self, cx: &mut Ctx<'_>) {
        // Each step moves strictly forward through the phases, so a handful always suffices.
        for _ in 0..Phase::ALL.len() {
            if !self.advance_once(cx) {
                return;
            }
        }
    }

    /// Takes the phase transition the state calls for, if any; `true` if it took one.
    pub(super) fn advance_once(&mut self, cx: &mut Ctx<'_>) -> bool {
        match self.phase {
            Phase::Preflight => self.preflight_ended(cx),
            Phase::Staging => self.staging_ended(cx),
            Phase::Upgrading => self.upgrading_ended(cx),
            Phase::Baking => self.baking_ended(cx),
            Phase::Committing => self.committing_ended(cx),
            Phase::Watching => self.watching_ended(cx),
            Phase::RollingBack => self.rolling_back_ended(cx),
            Phase::Pruning => self.pruning_ended(cx),
            _ => false,
        }
    }

    /// Preflight: once every node answered, refuses the rollout, ends it with nothing to do,
    /// or starts staging.
    fn preflight_ended(&mut self, cx: &mut Ctx<'_>) -> bool {
        let waiting = self.nodes.iter().any(|n| n.step() == NodeStep::Pending)
            || self
                .in_flight
                .iter()
                .any(|a| a.kind == ActionKind::Preflight);
        if waiting {
            return false;
        }
        let failures: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.step() == NodeStep::Failed)
            .map(|n| {
                format!(
                    "{}: {}",
                    n.id(),
                    n.progress.error.as_deref().unwrap_or("failed")
                )
            })
            .collect();
        if !failures.is_empty() {
            let msg = format!(
                "preflight refused the rollout, nothing was touched: {}",
                failures.join("; ")
            );
            self.error = Some(msg.clone());
            self.terminate(Phase::Aborted, msg, cx);
            return true;
        }
        let todo = self.targets();
        if todo.is_empty() {
            let msg = self.nothing_to_do_message();
            self.terminate(Phase::Succeeded, msg, cx);
            return true;
        }
        self.phase = Phase::Staging;
        let msg = self.preflight_passed_message(&todo);
        self.record(cx, msg);
        true
    }

    /// Staging: once every target is ready, starts upgrading.
    fn staging_ended(&mut self, cx: &mut Ctx<'_>) -> bool {
        let target = self.spec.version;
        let targets = self.targets();
        if !targets.iter().all(|&i| self.ready(i)) {
            return false;
        }
        self.phase = Phase::Upgrading;
        let canary = if self.spec.canary > 0 {
            format!(
                ", waiting for promote after the first {}",
                (self.spec.canary as usize).min(targets.len())
            )
        } else {
            String::new()
        };
        let n = targets.len();
        let staged = targets
            .iter()
            .filter(|&&i| self.nodes[i].route == Route::Stage)
            .count();
        let ready = if staged == n {
            format!("all {n} node{} staged", plural(n))
        } else {
            format!(
                "all {n} node{} ready ({staged} staged, {} already had {target})",
                plural(n),
                n - staged
            )
        };
        let msg = format!("{ready}; upgrading {}{canary}", self.batch_words());
        self.record(cx, msg);
        true
    }

    /// Upgrading: waits for promotion after the canary; once every target is upgraded,
    /// commits or succeeds.
    fn upgrading_ended(&mut self, cx: &mut Ctx<'_>) -> bool {
        let target = self.spec.version;
        let targets = self.targets();
        if let Some(k) = self.wave_hold() {
            return self.hold_wave(k, cx);
        }
        if let Some(k) = self.wave_gate() {
            return self.await_wave(k, cx);
        }
        if self.canary_pending() {
            let canary = (self.spec.canary as usize).min(targets.len());
            let head = &targets[..canary];
            if self.awaiting_promotion || !head.iter().all(|&i| self.upgraded(i)) {
                return false;
            }
            self.awaiting_promotion = true;
            let ids = join_ids(head.iter().map(|&i| self.nodes[i].id()));
            self.record(
                cx,
                format!("canary {ids} upgraded and healthy on {target}; waiting for promote"),
            );
            return true;
        }
        if !targets.iter().all(|&i| self.upgraded(i)) {
            return false;
        }
        if self.bakes() {
            let n = targets.len();
            let bake = self.spec.bake_ms;
            self.phase = Phase::Baking;
            let msg = if bake > 0 {
                format!(
                    "all {n} node{} upgraded and healthy; baking {target} for {}: every node must stay healthy before it is made permanent",
                    plural(n),
                    ms(bake)
                )
            } else {
                format!(
                    "all {n} node{} upgraded and healthy; checking that every node still runs {target} (not permanent: a node that restarted meanwhile boots its previous release)",
                    plural(n)
                )
            };
            self.record(cx, msg);
            return true;
        }
        self.after_upgrade(cx);
        true
    }

    /// The pause before wave `k`: announced once, over when every node upgraded before it
    /// stayed healthy through it; `true` when either happens now.
    fn hold_wave(&mut self, k: usize, cx: &mut Ctx<'_>) -> bool {
        let pause = ms(self.spec.wave_pause_ms);
        let (done, next) = (self.wave_name(k - 1), self.wave_name(k));
        let target = self.spec.version;
        if self.waves_holding < k {
            self.waves_holding = k;
            let n = self.held_by(k).len();
            let msg = format!(
                "wave {done} upgraded and healthy on {target}; wave pause {pause} before wave {next}: the {n} node{} upgraded so far must stay healthy",
                plural(n)
            );
            self.record(cx, msg);
            return true;
        }
        if !self.held_by(k).iter().all(|&i| self.nodes[i].held >= k) {
            return false;
        }
        self.waves_held = k;
        let msg = if self.wave_gate() == Some(k) {
            format!(
                "wave pause before wave {next} over: every upgraded node stayed healthy for {pause}"
            )
        } else {
            format!(
                "wave pause over: every upgraded node stayed healthy for {pause}; starting wave {next}"
            )
        };
        self.record(cx, msg);
        true
    }

    /// Watching after the commit: once every target passed its watch, prunes or succeeds.
    fn watching_ended(&mut self, cx: &mut Ctx<'_>) -> bool {
        if !self.targets().iter().all(|&i| self.nodes[i].watched) {
            return false;
        }
        self.committed(cx);
        true
    }

    /// Baking: once every target passed its bake gate, commits or succeeds.
    fn baking_ended(&mut self, cx: &mut Ctx<'_>) -> bool {
        if !self.targets().iter().all(|&i| self.nodes[i].baked) {
            return false;
        }
        self.after_upgrade(cx);
        true
    }

    /// Every target upgraded (and baked): the commit, or the end.
    fn after_upgrade(&mut self, cx: &mut Ctx<'_>) {
        let target = self.spec.version;
        let targets = self.targets();
        let n = targets.len();
        let to_commit = targets
            .iter()
            .filter(|&&i| self.nodes[i].step() == NodeStep::Upgraded)
            .count();
        if self.spec.permanent && to_commit > 0 {
            self.phase = Phase::Committing;
            let msg = if to_commit == n {
                format!(
                    "all {n} node{} upgraded and healthy; making {target} permanent",
                    plural(n)
                )
            } else {
                format!(
                    "all {n} node{} upgraded and healthy; making {target} permanent on {to_commit} ({} already run it permanently)",
                    plural(n),
                    n - to_commit
                )
            };
            self.record(cx, msg);
        } else {
            self.committed(cx);
        }
    }

    /// Committing: once every target is committed, prunes or succeeds.
    fn committing_ended(&mut self, cx: &mut Ctx<'_>) -> bool {
        let targets = self.targets();
        if !targets
            .iter()
            .all(|&i| self.nodes[i].step() == NodeStep::Committed)
        {
            return false;
        }
        self.committed(cx);
        true
    }

    /// Rolling back: once every touched node is back (or given up on), ends the rollout.
    fn rolling_back_ended(&mut self, cx: &mut Ctx<'_>) -> bool {
        let order = self.rollback_order();
        if order.is_empty() {
            // The steps that touched nodes were all refused after the rollback began
            // (it waits for steps in flight): no node changed, nothing to undo.
            self.terminate(
                Phase::Aborted,
                "no node was changed after all (their agents refused the steps in flight), so there is nothing to roll back: rollout aborted".to_string(),
                cx,
            );
            return true;
        }
        let done = |&i: &usize| {
            matches!(
                self.nodes[i].step(),
                NodeStep::RolledBack | NodeStep::RollbackFailed
            )
        };
        if !order.iter().all(done) {
            return false;
        }
        let failed: Vec<String> = order
            .iter()
            .filter(|&&i| self.nodes[i].step() == NodeStep::RollbackFailed)
            .map(|&i| {
                let n = &self.nodes[i];
                format!(
                    "{} ({})",
                    n.id(),
                    n.progress.error.as_deref().unwrap_or("failed")
                )
            })
            .collect();
        if failed.is_empty() {
            let n = order.len();
            self.terminate(
                Phase::RolledBack,
                format!(
                    "all {n} touched node{} rolled back to their previous version and healthy",
                    plural(n)
                ),
                cx,
            );
        } else {
            let msg = format!(
                "rollback failed on {}: {} need{} a person",
                failed.join(", "),
                if failed.len() == 1 {
                    "this node"
                } else {
                    "these nodes"
                },
                if failed.len() == 1 { "s" } else { "" }
            );
            self.error = Some(match self.error.take() {
                Some(cause) => format!("{cause}; {msg}"),
                None => msg.clone(),
            });
            self.terminate(Phase::RollbackFailed, msg, cx);
        }
        true
    }
}
