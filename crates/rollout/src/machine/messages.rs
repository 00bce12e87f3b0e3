//! The audit sentences that summarize many nodes (preflight passed, success, abort).

use super::*;

impl Rollout {
    /// How many nodes ended (or start) in each way, for the summaries.
    pub(super) fn tally(&self) -> Tally {
        let mut t = Tally::default();
        for n in &self.nodes {
            match n.step() {
                NodeStep::Committed if n.route == Route::SwitchBack => t.switched_back += 1,
                NodeStep::Committed => t.committed += 1,
                NodeStep::Upgraded => t.not_permanent += 1,
                NodeStep::Skipped => match n.start {
                    Some(Start { current: None, .. }) => t.had_permanent += 1,
                    Some(_) => t.had_current += 1,
                    None => t.had_unknown += 1,
                },
                // Not at a successful end: nothing to count.
                _ => {}
            }
        }
        t
    }

    /// The event that ends preflight when nodes need work: how many and what each needs.
    pub(super) fn preflight_passed_message(&self, todo: &[usize]) -> String {
        let target = self.spec.version;
        let count = |r: Route| todo.iter().filter(|&&i| self.nodes[i].route == r).count();
        let n = todo.len();
        let (stage, install, adopt, switch) = (
            count(Route::Stage),
            count(Route::Install),
            count(Route::Adopt),
            count(Route::SwitchBack),
        );
        let mut what = if stage == n {
            format!("{n} node{} to upgrade", plural(n))
        } else {
            let parts: Vec<String> = [
                (stage, "to stage and install"),
                (install, "to install from their disk"),
                (adopt, "already running it, to gate and make permanent"),
                (switch, "to switch back to it with a downgrade"),
            ]
            .into_iter()
            .filter(|(k, _)| *k > 0)
            .map(|(k, s)| format!("{k} {s}"))
            .collect();
            format!(
                "{n} node{} to move to {target} ({})",
                plural(n),
                parts.join(", ")
            )
        };
        let t = self.tally();
        let skipped = t.had_permanent + t.had_current + t.had_unknown;
        if skipped > 0 {
            what.push_str(&format!(" ({skipped} already on {target}, skipped)"));
        }
        if stage > 0 {
            format!(
                "preflight passed: {what}; staging {target}, {} at a time",
                self.spec.max_parallel_staging
            )
        } else {
            format!("preflight passed: {what}; nothing to stage")
        }
    }

    /// The final event when preflight found nothing to do. True of every node.
    pub(super) fn nothing_to_do_message(&self) -> String {
        let target = self.spec.version;
        let t = self.tally();
        if t.had_unknown == self.nodes.len() {
            // Answers without release lists: whether permanently is not known.
            return format!("every node already runs {target}: nothing to do");
        }
        if t.had_permanent == self.nodes.len() {
            return format!("every node already runs {target} permanently: nothing to do");
        }
        let parts: Vec<String> = [
            (t.had_permanent, "permanently"),
            (
                t.had_current,
                "not permanently, where a rollout without making it permanent leaves it",
            ),
            (t.had_unknown, "not known whether permanently"),
        ]
        .into_iter()
        .filter(|(k, _)| *k > 0)
        .map(|(k, s)| format!("{k} {s}"))
        .collect();
        format!(
            "every node already runs {target} ({}): nothing to do",
            parts.join("; ")
        )
    }

    /// The final event of a successful rollout: true of every node, saying how each got there.
    pub(super) fn success_message(&self) -> String {
        let target = self.spec.version;
        let t = self.tally();
        let total = self.nodes.len();
        let everyone_permanent = t.not_permanent == 0 && t.had_current == 0 && t.had_unknown == 0;
        if everyone_permanent {
            let mut msg = format!("all {total} node{} run {target} permanently", plural(total));
            if t.committed != total {
                let parts: Vec<String> = [
                    (t.committed, "made permanent by this rollout"),
                    (t.switched_back, "switched back to it with a downgrade"),
                    (t.had_permanent, "already did: skipped"),
                ]
                .into_iter()
                .filter(|(k, _)| *k > 0)
                .map(|(k, s)| format!("{k} {s}"))
                .collect();
                msg.push_str(&format!(" ({})", parts.join(", ")));
            }
            return msg;
        }
        let parts: Vec<String> = [
            (
                t.committed,
                "made permanent by this rollout".to_string(),
            ),
            (
                t.not_permanent,
                "healthy, not made permanent (no-permanent): a restart boots their previous release"
                    .to_string(),
            ),
            (
                t.had_current,
                "already ran it without it being permanent: skipped".to_string(),
            ),
            (
                t.switched_back,
                "switched back to it with a downgrade, which made it permanent".to_string(),
            ),
            (t.had_permanent, "already ran it permanently: skipped".to_string()),
            (
                t.had_unknown,
                "already ran it (their preflight did not list releases, so whether permanently is not known): skipped".to_string(),
            ),
        ]
        .into_iter()
        .filter(|(k, _)| *k > 0)
        .map(|(k, s)| format!("{k} {s}"))
        .collect();
        format!(
            "all {total} node{} run {target}: {}",
            plural(total),
            parts.join("; ")
        )
    }

    /// For the abort event: what each node runs now, grouped, so the operator knows what to check.
    pub(super) fn describe_nodes_left(&self) -> String {
        let target = self.spec.version;
        let mut groups: Vec<(String, Vec<&NodeId>)> = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let in_flight = self
                .in_flight
                .iter()
                .find(|a| &a.node == n.id() && a.kind.changes_node());
            let desc = if let Some(a) = in_flight {
                format!("{} was in flight, outcome unknown (check the node)", a.kind)
            } else {
                let (program, back_to) = self.undo_program(i);
                let back =
                    back_to.map_or_else(|| "its previous version".to_string(), |v| v.to_string());
                // After a switch back the target is permanent already.
                let how = if n.route == Route::SwitchBack {
                    "permanently"
                } else {
                    "not permanent"
                };
                let unless_refused = |what: &str, otherwise: String| {
                    if n.refused {
                        format!("untouched ({what} refused)")
                    } else {
                        otherwise
                    }
                };
                match n.step() {
                    NodeStep::Pending
                    | NodeStep::PreflightOk
                    | NodeStep::Skipped
                    | NodeStep::Staging
                    | NodeStep::Staged => "untouched".to_string(),
                    NodeStep::Installing | NodeStep::Committing => {
                        "outcome of the last step unknown (check the node)".to_string()
                    }
                    NodeStep::Installed | NodeStep::Verifying => {
                        format!("run {target}, {how}, health not confirmed")
                    }
                    NodeStep::Upgraded => format!("run {target}, not permanent"),
                    NodeStep::Committed => format!("run {target} permanently"),
                    NodeStep::Failed => match n.retry {
                        Some(Retry::Stage) | None => "untouched".to_string(),
                        Some(Retry::Install) => unless_refused(
                            "install",
                            "install failed, state unknown (check the node)".to_string(),
                        ),
                        Some(Retry::SwitchBack) => unless_refused(
                            "downgrade",
                            format!("downgrade to {target} failed, state unknown (check the node)"),
                        ),
                        Some(Retry::HealthGate) => format!("run {target}, {how}, unhealthy"),
                        Some(Retry::Commit) if n.refused => {
                            format!("run {target}, not permanent (commit refused)")
                        }
                        Some(Retry::Commit) => {
                            format!("run {target}, not permanent (commit failed)")
                        }
                    },
                    NodeStep::RollingBack if n.downgraded => {
                        format!("back on {back}, health not confirmed")
                    }
                    NodeStep::RollingBack if n.undone > 0 => {
                        let on = program
                            .get(usize::from(n.undone) - 1)
                            .map_or_else(|| "?".to_string(), |k| k.to_string());
                        format!("rolled back part way (did: {on}), not yet back on {back}")
                    }
                    NodeStep::RollingBack => format!("run {target}, not rolled back"),
                    NodeStep::RolledBack => format!("back on {back}"),
                    NodeStep::RollbackFailed => "rollback failed, needs a person".to_string(),
                }
            };
            match groups.iter_mut().find(|(d, _)| *d == desc) {
                Some((_, ids)) => ids.push(n.id()),
                None => groups.push((desc, vec![n.id()])),
            }
        }
        groups
            .into_iter()
            .map(|(desc, ids)| format!("{}: {desc}", join_ids(ids)))
            .collect::<Vec<_>>()
            .join("; ")
    }
}
