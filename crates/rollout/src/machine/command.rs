//! Operator commands: pause, resume, abort, rollback, promote.

use super::*;

impl Rollout {
    /// Applies an operator command, or refuses it (the state untouched) when it makes no sense
    /// now.
    pub(super) fn on_command(
        &mut self,
        command: Command,
        cx: &mut Ctx<'_>,
    ) -> Result<Outcome, Rejected> {
        let by = cx.by.to_string();
        if command == Command::Rollback && self.retry_rollback(&by, cx) {
            return Ok(Outcome::Applied {
                phase: self.phase(),
                issued: Vec::new(),
                cancelled: std::mem::take(&mut cx.cancelled),
            });
        }
        if self.phase.is_terminal() {
            return Err(Rejected::Ended {
                command,
                id: self.spec.id.clone(),
                phase: self.phase,
            });
        }
        match command {
            Command::Pause => self.pause(&by, cx)?,
            Command::Resume => self.resume(&by, cx)?,
            Command::Abort => self.abort(&by, cx),
            Command::Rollback => self.rollback(&by, cx)?,
            Command::Promote => self.promote(&by, cx)?,
        }
        Ok(Outcome::Applied {
            phase: self.phase(),
            issued: Vec::new(),
            cancelled: std::mem::take(&mut cx.cancelled),
        })
    }

    fn pause(&mut self, by: &str, cx: &mut Ctx<'_>) -> Result<(), Rejected> {
        if self.paused {
            return Err(Rejected::AlreadyPaused);
        }
        self.paused = true;
        let n = self.in_flight.len();
        self.record(
            cx,
            format!(
                "paused by {by} during {}: no new action starts; {n} in flight finish and are recorded; resume continues",
                self.phase
            ),
        );
        Ok(())
    }

    /// Unpauses; in a forward phase, every failed node goes back to retry its failed step.
    fn resume(&mut self, by: &str, cx: &mut Ctx<'_>) -> Result<(), Rejected> {
        if !self.paused {
            return Err(Rejected::NotPaused {
                phase: self.phase(),
            });
        }
        self.paused = false;
        let mut retried = Vec::new();
        if matches!(
            self.phase,
            Phase::Staging | Phase::Upgrading | Phase::Baking | Phase::Committing | Phase::Watching
        ) {
            for n in &mut self.nodes {
                if n.progress.step == NodeStep::Failed
                    && let Some(r) = n.retry.take()
                {
                    n.progress.step = r.step_before();
                    n.progress.error = None;
                    n.refused = false;
                    retried.push(format!("{} ({})", n.id(), r.name()));
                }
            }
            // The failure that paused the rollout is being retried: no longer current.
            self.error = None;
        }
        let msg = if retried.is_empty() {
            format!("resumed by {by}: continuing {}", self.phase)
        } else {
            format!(
                "resumed by {by}: continuing {}, retrying {}",
                self.phase,
                retried.join(", ")
            )
        };
        self.record(cx, msg);
        self.advance(cx);
        Ok(())
    }

    fn abort(&mut self, by: &str, cx: &mut Ctx<'_>) {
        self.error.get_or_insert(format!("aborted by {by}"));
        let left = self.describe_nodes_left();
        self.terminate(
            Phase::Aborted,
            format!("aborted by {by}; nodes are left as they are: {left}"),
            cx,
        );
    }

    fn rollback(&mut self, by: &str, cx: &mut Ctx<'_>) -> Result<(), Rejected> {
        if self.phase == Phase::RollingBack {
            if !self.paused {
                return Err(Rejected::AlreadyRollingBack);
            }
            self.paused = false;
            self.record(
                cx,
                format!("rollback requested by {by}: continuing the paused rollback"),
            );
        } else {
            self.paused = false;
            self.start_rollback(format!("rollback requested by {by}"), cx);
            self.advance(cx);
        }
        Ok(())
    }

    /// `rollback` of a rollout that ended `rollback_failed`: the nodes that need a person get
    /// their failed undo step (or health gate) again, once someone fixed what stopped it (an
    /// agent back on the network, a release restored). Nodes whose previous version is unknown
    /// stay failed. `false` (nothing changed) when there is nothing to retry.
    fn retry_rollback(&mut self, by: &str, cx: &mut Ctx<'_>) -> bool {
        if self.phase != Phase::RollbackFailed {
            return false;
        }
        let retry: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| {
                self.nodes[i].step() == NodeStep::RollbackFailed && self.undo_program(i).1.is_some()
            })
            .collect();
        if retry.is_empty() {
            return false;
        }
        for &i in &retry {
            // `undone` and `downgraded` stay: the step that failed is the one issued again.
            let n = &mut self.nodes[i];
            n.progress.step = NodeStep::RollingBack;
            n.progress.error = None;
        }
        // The cause stays; the verdict of the failed attempt goes (a new end writes its own).
        if let Some(e) = &mut self.error
            && let Some(at) = e.find("rollback failed on ")
        {
            e.truncate(at);
            let kept = e.trim_end_matches([';', ' ']).len();
            e.truncate(kept);
        }
        if self.error.as_deref() == Some("") {
            self.error = None;
        }
        self.phase = Phase::RollingBack;
        let ids: Vec<&NodeId> = retry.iter().map(|&i| self.nodes[i].id()).collect();
        let msg = format!(
            "rollback retried by {by}: rolling back {} again",
            join_ids(ids)
        );
        self.record(cx, msg);
        self.advance(cx);
        true
    }

    fn promote(&mut self, by: &str, cx: &mut Ctx<'_>) -> Result<(), Rejected> {
        if !self.awaiting_promotion {
            return Err(Rejected::NotAwaitingPromotion);
        }
        self.awaiting_promotion = false;
        if let Some(k) = self.wave_gate() {
            // A wave's promotion; the canary's (if any) comes when its nodes are done.
            self.waves_promoted = k;
            let msg = format!("wave {} promoted by {by}: starting it", self.wave_name(k));
            self.record(cx, msg);
            self.advance(cx);
            return Ok(());
        }
        self.promoted = true;
        let rest = self
            .targets()
            .len()
            .saturating_sub(self.spec.canary as usize);
        self.record(
            cx,
            format!(
                "canary promoted by {by}: continuing with the remaining {rest} node{}",
                plural(rest)
            ),
        );
        self.advance(cx);
        Ok(())
    }
}
