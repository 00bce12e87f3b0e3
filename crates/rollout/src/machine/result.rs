//! Issuing actions and taking their results: what each result does to its node.

use super::*;

impl Rollout {
    pub(super) fn issue(&mut self, cx: &mut Ctx<'_>) -> Outcome {
        if self.paused || self.phase.is_terminal() {
            return Outcome::Ignored {
                reason: self.idle_reason(),
            };
        }
        let mut changed = false;
        if self.phase == Phase::Pending {
            self.phase = Phase::Preflight;
            changed = true;
            let s = &self.spec;
            let msg = format!(
                "rollout {} started: {} on {} node{} in order {}; batch size {}, canary {}, {}, on failure {}; requested by {}",
                s.id,
                s.version,
                s.nodes.len(),
                plural(s.nodes.len()),
                join_ids(&s.nodes),
                s.batch_size,
                s.canary,
                if s.permanent {
                    "permanent"
                } else {
                    "not permanent"
                },
                s.on_failure,
                s.requested_by,
            );
            self.record(cx, msg);
        }
        let plan = self.plan();
        if plan.is_empty() && !changed {
            return Outcome::Ignored {
                reason: self.idle_reason(),
            };
        }
        let mut issued = Vec::with_capacity(plan.len());
        let rolling_back = self.phase == Phase::RollingBack;
        for (i, kind) in plan {
            let seq = self.next_seq;
            self.next_seq += 1;
            let node = &mut self.nodes[i];
            match &kind {
                ActionKind::Preflight => {}
                ActionKind::Stage { .. } => node.progress.step = NodeStep::Staging,
                ActionKind::Install { .. } | ActionKind::Downgrade { .. } if rolling_back => {
                    node.progress.step = NodeStep::RollingBack;
                }
                ActionKind::Install { .. } | ActionKind::Downgrade { .. } => {
                    node.progress.step = NodeStep::Installing;
                    node.touch_seq.get_or_insert(seq);
                }
                ActionKind::HealthGate { .. } => {
                    // A rollback gate leaves the node `rolling_back`; a bake or watch gate leaves
                    // the node as it is (all of them are watched at once: none is switching).
                    if node.progress.step == NodeStep::Installed
                        && !matches!(self.phase, Phase::Baking | Phase::Watching)
                    {
                        node.progress.step = NodeStep::Verifying;
                    }
                }
                ActionKind::Commit { .. } => {
                    node.progress.step = NodeStep::Committing;
                    node.touch_seq.get_or_insert(seq);
                    node.commit_seq.get_or_insert(seq);
                }
                ActionKind::Prune { .. } => {}
            }
            let action = Action {
                seq,
                node: node.id().clone(),
                kind,
            };
            self.in_flight.push(action.clone());
            issued.push(action);
        }
        if !issued.is_empty() {
            let list: Vec<String> = issued.iter().map(|a| a.to_string()).collect();
            self.record(cx, format!("started {}", list.join("; ")));
        }
        Outcome::Applied {
            phase: self.phase(),
            issued,
            cancelled: Vec::new(),
        }
    }

    pub(super) fn on_result(
        &mut self,
        seq: u64,
        result: &ActionResult,
        cx: &mut Ctx<'_>,
    ) -> Result<Outcome, Rejected> {
        let Some(pos) = self.in_flight.iter().position(|a| a.seq == seq) else {
            let reason = if seq == 0 || seq >= self.next_seq {
                format!("result ignored: action {seq} was never issued")
            } else {
                format!(
                    "result ignored: action {seq} is not in flight (already answered, or cancelled)"
                )
            };
            return Ok(Outcome::Ignored { reason });
        };
        let action = &self.in_flight[pos];
        let mismatch = match (&action.kind, result) {
            (ActionKind::Preflight, ActionResult::Done) => {
                Some("a preflight is answered with the running version and free disk, or a failure")
            }
            (kind, ActionResult::Preflight { .. }) if *kind != ActionKind::Preflight => {
                Some("only a preflight is answered with a running version")
            }
            (kind, ActionResult::Pruned { .. }) if !matches!(kind, ActionKind::Prune { .. }) => {
                Some("only a prune is answered with the releases it removed")
            }
            _ => None,
        };
        if let Some(detail) = mismatch {
            return Err(Rejected::MismatchedResult {
                seq,
                node: action.node.clone(),
                kind: action.kind.name(),
                detail,
            });
        }
        let Some(i) = self.index_of(&action.node) else {
            // Only reachable with a hand-edited state; leave it untouched rather than guess.
            return Ok(Outcome::Ignored {
                reason: format!(
                    "result ignored: action {seq} names node {} which is not in this rollout",
                    action.node
                ),
            });
        };
        let action = self.in_flight.remove(pos);
        match result {
            ActionResult::Preflight {
                running,
                free_disk,
                releases,
            } => self.preflight_answered(i, *running, *free_disk, releases, cx),
            ActionResult::Done => self.action_done(i, &action, cx),
            ActionResult::Failed { error } => {
                self.action_failed(i, &action, &clip(error), false, cx)
            }
            ActionResult::Refused { error } => self.action_refused(i, &action, &clip(error), cx),
            ActionResult::Pruned { removed, failed } => self.prune_answered(i, removed, failed, cx),
        }
        self.advance(cx);
        Ok(Outcome::Applied {
            phase: self.phase(),
            issued: Vec::new(),
            cancelled: std::mem::take(&mut cx.cancelled),
        })
    }

    pub(super) fn action_done(&mut self, i: usize, action: &Action, cx: &mut Ctx<'_>) {
        if self.nodes[i].step() == NodeStep::RollingBack && action.kind.changes_node() {
            return self.undo_step_done(i, action, cx);
        }
        let hold = self.is_hold_gate(i).then(|| self.wave_hold()).flatten();
        let node = &mut self.nodes[i];
        let id = node.id().clone();
        let msg = match &action.kind {
            // Answered with `Done`: refused before this point (MismatchedResult).
            ActionKind::Preflight => return,
            ActionKind::Stage { version } => {
                node.progress.step = NodeStep::Staged;
                format!("{id}: staged {version}")
            }
            ActionKind::Install { version } => {
                node.progress.step = NodeStep::Installed;
                format!("{id}: installed {version} (not permanent yet)")
            }
            ActionKind::Downgrade { to } => {
                node.progress.step = NodeStep::Installed;
                format!("{id}: switched back to {to} with a downgrade ({to} is permanent)")
            }
            ActionKind::HealthGate { expect, .. } if self.phase == Phase::Baking => {
                node.baked = true;
                node.progress.step = if node.route == Route::SwitchBack {
                    NodeStep::Committed
                } else {
                    NodeStep::Upgraded
                };
                let bake = self.spec.bake_ms;
                if bake > 0 {
                    format!(
                        "{id}: stayed healthy on {expect} for the bake ({})",
                        ms(bake)
                    )
                } else {
                    format!("{id}: still runs {expect}, healthy")
                }
            }
            ActionKind::HealthGate { expect, .. } if self.phase == Phase::Watching => {
                node.watched = true;
                node.progress.step = NodeStep::Committed;
                let watch = ms(self.spec.watch_after_commit_ms);
                format!("{id}: stayed healthy on {expect} for the watch after the commit ({watch})")
            }
            ActionKind::HealthGate { expect, .. } if hold.is_some() => {
                node.held = node.held.max(hold.unwrap_or(0));
                let pause = ms(self.spec.wave_pause_ms);
                format!("{id}: stayed healthy on {expect} through the wave pause ({pause})")
            }
            ActionKind::HealthGate { expect, .. } => {
                if node.downgraded && node.progress.step == NodeStep::RollingBack {
                    node.progress.step = NodeStep::RolledBack;
                    format!("{id}: rolled back to {expect} and healthy")
                } else if node.route == Route::SwitchBack {
                    // Its downgrade made the target permanent already: nothing to commit.
                    node.progress.step = NodeStep::Committed;
                    format!("{id}: healthy on {expect}, which is permanent")
                } else {
                    node.progress.step = NodeStep::Upgraded;
                    format!("{id}: healthy on {expect}")
                }
            }
            ActionKind::Commit { version } => {
                node.progress.step = NodeStep::Committed;
                format!("{id}: {version} is permanent")
            }
            ActionKind::Prune { keep, .. } => {
                node.pruned = true;
                format!("{id}: nothing to prune ({})", housekeeping::keeping(*keep))
            }
        };
        self.record(cx, msg);
    }

    /// An undo step of node `i`'s rollback succeeded; after the last one, its gate is next.
    pub(super) fn undo_step_done(&mut self, i: usize, action: &Action, cx: &mut Ctx<'_>) {
        let steps = self.undo_program(i).0.len();
        let node = &mut self.nodes[i];
        node.undone = node.undone.saturating_add(1);
        if usize::from(node.undone) >= steps {
            node.downgraded = true;
        }
        let id = node.id().clone();
        let msg = match &action.kind {
            ActionKind::Install { version } => {
                format!("{id}: {version} installed again (current, not permanent, as before)")
            }
            ActionKind::Downgrade { to } => format!("{id}: downgraded to {to}"),
            other => format!("{id}: {other} done"),
        };
        self.record(cx, msg);
    }

    pub(super) fn action_failed(
        &mut self,
        i: usize,
        action: &Action,
        error: &str,
        refused: bool,
        cx: &mut Ctx<'_>,
    ) {
        let error = if error.trim().is_empty() {
            "no detail given"
        } else {
            error
        };
        let failed = if refused {
            "refused, nothing changed"
        } else {
            "failed"
        };
        if let ActionKind::Prune { .. } = action.kind {
            return self.prune_failed(i, &format!("{failed}: {error}"), cx);
        }
        let undoing = self.nodes[i].step() == NodeStep::RollingBack;
        if !undoing {
            self.nodes[i].refused = refused;
        }
        match &action.kind {
            ActionKind::Preflight => {
                self.preflight_failed(i, format!("preflight {failed}: {error}"), cx);
            }
            ActionKind::Stage { version } => {
                self.node_failed(
                    i,
                    Retry::Stage,
                    format!("staging {version} {failed}: {error}"),
                    cx,
                );
            }
            ActionKind::Install { version } if undoing => {
                self.rollback_failed(
                    i,
                    format!("installing {version} again {failed}: {error}"),
                    cx,
                );
            }
            ActionKind::Install { version } => {
                self.node_failed(
                    i,
                    Retry::Install,
                    format!("install of {version} {failed}: {error}"),
                    cx,
                );
            }
            ActionKind::HealthGate { expect, .. } => {
                self.gate_failed(i, *expect, failed, error, cx)
            }
            ActionKind::Commit { version } => {
                self.node_failed(
                    i,
                    Retry::Commit,
                    format!("making {version} permanent {failed}: {error}"),
                    cx,
                );
            }
            ActionKind::Downgrade { to } if undoing => {
                self.rollback_failed(i, format!("downgrade to {to} {failed}: {error}"), cx);
            }
            ActionKind::Downgrade { to } => {
                self.node_failed(
                    i,
                    Retry::SwitchBack,
                    format!("downgrade to {to} {failed}: {error}"),
                    cx,
                );
            }
            // Answered above.
            ActionKind::Prune { .. } => {}
        }
    }

    /// A health gate failed on node `i`: its rollback gate (the rollback fails there), its
    /// bake or final check, or its upgrade gate (a node failure by `on_failure`).
    fn gate_failed(
        &mut self,
        i: usize,
        expect: Version,
        failed: &str,
        error: &str,
        cx: &mut Ctx<'_>,
    ) {
        let n = &self.nodes[i];
        if n.downgraded && n.step() == NodeStep::RollingBack {
            let after = match self.undo_program(i).0.last() {
                Some(ActionKind::Install { .. }) => "installing it again",
                _ => "downgrade",
            };
            self.rollback_failed(
                i,
                format!("health gate on {expect} after {after} {failed}: {error}"),
                cx,
            );
        } else if self.phase == Phase::Watching {
            let watch = ms(self.spec.watch_after_commit_ms);
            self.node_failed(
                i,
                Retry::HealthGate,
                format!("watch after the commit on {expect} ({watch}) {failed}: {error}"),
                cx,
            );
        } else if self.is_hold_gate(i) {
            let pause = ms(self.spec.wave_pause_ms);
            self.node_failed(
                i,
                Retry::HealthGate,
                format!("wave pause on {expect} ({pause}) {failed}: {error}"),
                cx,
            );
        } else if self.phase == Phase::Baking {
            let what = if self.spec.bake_ms > 0 {
                format!("bake on {expect} ({})", ms(self.spec.bake_ms))
            } else {
                format!("final check that it still runs {expect}")
            };
            self.node_failed(
                i,
                Retry::HealthGate,
                format!("{what} {failed}: {error}"),
                cx,
            );
        } else {
            self.node_failed(
                i,
                Retry::HealthGate,
                format!("health gate on {expect} {failed}: {error}"),
                cx,
            );
        }
    }

    /// A gate on node `i` in `upgrading` is its wave-pause gate when the node had passed its
    /// own gate already (an upgrade gate runs on a node that is `verifying`).
    fn is_hold_gate(&self, i: usize) -> bool {
        self.phase == Phase::Upgrading && self.spec.wave_pause_ms > 0 && self.upgraded(i)
    }

    /// The agent refused the step: nothing changed, so a step that would have touched the node
    /// no longer does (unless an earlier attempt may have), then it fails like any step.
    pub(super) fn action_refused(
        &mut self,
        i: usize,
        action: &Action,
        error: &str,
        cx: &mut Ctx<'_>,
    ) {
        let node = &mut self.nodes[i];
        if node.touch_seq == Some(action.seq) {
            node.touch_seq = None;
        }
        if node.commit_seq == Some(action.seq) {
            node.commit_seq = None;
        }
        self.action_failed(i, action, error, true, cx);
    }

    /// A forward step failed on node `i`: mark it and apply the spec's `on_failure`.
    pub(super) fn node_failed(&mut self, i: usize, retry: Retry, msg: String, cx: &mut Ctx<'_>) {
        let node = &mut self.nodes[i];
        node.progress.step = NodeStep::Failed;
        node.progress.error = Some(msg.clone());
        node.retry = Some(retry);
        let cause = format!("{}: {msg}", node.id());
        self.record(cx, cause.clone());
        if !matches!(
            self.phase,
            Phase::Staging | Phase::Upgrading | Phase::Baking | Phase::Committing | Phase::Watching
        ) {
            // Rolling back already (an install or commit that was in flight failed): the node
            // is downgraded like every touched node; nothing else to decide.
            return;
        }
        match self.spec.on_failure {
            OnFailure::Rollback => self.start_rollback(cause, cx),
            OnFailure::Pause => {
                self.error.get_or_insert(cause.clone());
                if self.paused {
                    self.record(
                        cx,
                        format!(
                            "rollout stays paused: resume retries the failed {}, rollback rolls back every touched node, abort stops here",
                            retry.name()
                        ),
                    );
                } else {
                    self.paused = true;
                    self.record(
                        cx,
                        format!(
                            "paused after a failure (on failure: pause): {cause}; resume retries the failed {}, rollback rolls back every touched node, abort stops here",
                            retry.name()
                        ),
                    );
                }
            }
        }
    }
}
