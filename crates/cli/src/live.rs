//! The live view of a rollout that `rollout` (waiting) and `status --watch` redraw in place on a
//! terminal: a header (id, version, phase, who started it, elapsed time, ETA), a progress bar,
//! one row per node (from -> to, step, health, time in step, health-gate countdown, last error)
//! and the last events. Rendering is a pure function of the status, what this view has seen of
//! each node's step, and the time, so it is tested without a terminal.

use std::collections::HashMap;
use std::time::Duration;

use orch_client::control as pb;

use crate::output::{Paint, clock, node_problem, secs, step_shown};

/// How many of the last events the view shows.
const EVENTS_SHOWN: usize = 6;

/// The health gate's settings: from the status (coordinators that send them), else what this
/// command knows (the rollout it started).
#[derive(Debug, Clone, Copy)]
pub struct Gate {
    pub min_healthy: Duration,
    pub deadline: Duration,
}

/// What the view remembers between statuses.
#[derive(Debug, Default)]
pub struct LiveState {
    /// Per node: its step and since when (ms since the epoch) it has been in it.
    steps: HashMap<String, (String, u64)>,
    /// The health gate's settings, if known.
    pub gate: Option<Gate>,
    /// A line shown under the view (e.g. "reconnecting ...").
    pub note: Option<String>,
}

/// Steps a node ends a forward rollout or a rollback in.
fn node_done(step: &str) -> bool {
    matches!(
        step,
        "committed" | "skipped" | "rolled_back" | "rollback_failed" | "failed"
    )
}

pub fn phase_is_terminal(phase: &str) -> bool {
    matches!(
        phase,
        "succeeded" | "rolled_back" | "rollback_failed" | "aborted"
    )
}

/// The time of the newest event about `node` (its messages start `NODE: `).
fn last_event_of(s: &pb::RolloutStatus, node: &str) -> Option<u64> {
    let prefix = format!("{node}: ");
    s.events
        .iter()
        .rev()
        .find(|e| e.message.starts_with(&prefix))
        .map(|e| e.at_ms)
}

impl LiveState {
    pub fn new(gate: Option<Gate>) -> LiveState {
        LiveState {
            gate,
            ..Default::default()
        }
    }

    /// Notes each node's step change: it entered its step at its newest event, or now when
    /// that is older than what was seen before.
    pub fn observe(&mut self, s: &pb::RolloutStatus, now: u64) {
        for n in &s.nodes {
            let changed = self
                .steps
                .get(&n.id)
                .is_none_or(|(step, _)| *step != n.step);
            if changed {
                let since = last_event_of(s, &n.id)
                    .filter(|&at| at <= now)
                    .unwrap_or(now);
                self.steps.insert(n.id.clone(), (n.step.clone(), since));
            }
        }
    }

    /// How long `n` has been in its step: since the recorded time the coordinators send, else
    /// since this view saw it change.
    fn in_step(&self, n: &pb::NodeProgress, now: u64) -> Option<Duration> {
        let seen = self.steps.get(&n.id).map(|(_, since)| *since);
        let since = Some(n.step_since_ms).filter(|&ms| ms > 0).or(seen)?;
        Some(Duration::from_millis(now.saturating_sub(since)))
    }

    /// The gate's settings: the status's, else this command's.
    fn gate_of(&self, s: &pb::RolloutStatus) -> Option<Gate> {
        if s.min_healthy_ms > 0 || s.healthy_deadline_ms > 0 {
            return Some(Gate {
                min_healthy: Duration::from_millis(s.min_healthy_ms),
                deadline: Duration::from_millis(s.healthy_deadline_ms),
            });
        }
        self.gate
    }

    /// The view's lines, each at most `width` columns wide.
    pub fn render(&self, s: &pb::RolloutStatus, now: u64, width: usize, p: Paint) -> Vec<String> {
        let mut lines = vec![header(s, now, p)];
        lines.push(progress(s, width, p));
        lines.push(String::new());
        lines.extend(self.table(s, now, p));
        if !s.events.is_empty() {
            lines.push(String::new());
            lines.push(p.bold("Last events:"));
            let skip = s.events.len().saturating_sub(EVENTS_SHOWN);
            for e in &s.events[skip..] {
                lines.push(format!("  {} {}", p.dim(&clock(e.at_ms)), e.message));
            }
        }
        if !s.error.is_empty() {
            lines.push(format!("{} {}", p.red("error:"), s.error));
        }
        if let Some(note) = &self.note {
            lines.push(p.bold(note));
        }
        lines.into_iter().map(|l| fit(&l, width)).collect()
    }

    fn table(&self, s: &pb::RolloutStatus, now: u64, p: Paint) -> Vec<String> {
        let rows: Vec<[String; 7]> = s
            .nodes
            .iter()
            .map(|n| {
                let from = if n.from_version.is_empty() {
                    "-"
                } else {
                    &n.from_version
                };
                // Once the rollout has ended, no node is in a step any more.
                let in_step = if phase_is_terminal(&s.phase) {
                    String::new()
                } else {
                    self.in_step(n, now).map(secs).unwrap_or_default()
                };
                [
                    n.id.clone(),
                    format!("{from} -> {}", s.version),
                    step_shown(s, n),
                    health(n).to_string(),
                    in_step,
                    self.gate_text(n, self.gate_of(s), now),
                    node_problem(n),
                ]
            })
            .collect();
        let head = [
            "NODE",
            "FROM -> TO",
            "STEP",
            "HEALTH",
            "IN STEP",
            "GATE",
            "LAST ERROR",
        ];
        let mut w = head.map(str::len);
        for r in &rows {
            for (i, c) in r.iter().enumerate() {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let cells = |r: &[String; 7], style: &dyn Fn(usize, String) -> String| {
            let mut line = String::from("  ");
            for (i, c) in r.iter().enumerate() {
                let padded = format!("{c:<width$}", width = w[i]);
                if c.is_empty() {
                    // Nothing to colour: plain padding keeps the line's end trimmable.
                    line.push_str(&padded);
                } else {
                    line.push_str(&style(i, padded));
                }
                line.push_str("  ");
            }
            line.trim_end().to_string()
        };
        let mut out = vec![cells(&head.map(String::from), &|_, c| p.bold(&c))];
        for r in &rows {
            out.push(cells(r, &|i, c| match i {
                2 => p.step_padded(&r[2], &c),
                6 => p.red(&c),
                _ => c,
            }));
        }
        out
    }

    /// The health gate's countdown for a node in its gate: how long it has been healthy (the
    /// leader, which probes it, says), else how long it has been in the gate.
    fn gate_text(&self, n: &pb::NodeProgress, gate: Option<Gate>, now: u64) -> String {
        if n.step != "verifying" {
            return String::new();
        }
        let Some(in_gate) = self.in_step(n, now) else {
            return String::new();
        };
        match gate {
            Some(g) if n.gate_watched => {
                let healthy = match n.healthy_since_ms {
                    0 => Duration::ZERO,
                    since => Duration::from_millis(now.saturating_sub(since)),
                };
                format!(
                    "healthy {} of {}, deadline in {}",
                    secs(healthy),
                    secs(g.min_healthy),
                    secs(g.deadline.saturating_sub(in_gate))
                )
            }
            Some(g) => format!(
                "{} in gate, needs {} healthy, deadline in {}",
                secs(in_gate),
                secs(g.min_healthy),
                secs(g.deadline.saturating_sub(in_gate))
            ),
            None => format!("{} in gate", secs(in_gate)),
        }
    }
}

/// What is known of a node's health from its step.
fn health(n: &pb::NodeProgress) -> &'static str {
    if n.unresponsive_since_ms > 0 {
        return "unreachable";
    }
    match n.step.as_str() {
        "verifying" => "checking",
        "upgraded" | "committing" | "committed" | "rolled_back" => "healthy",
        "failed" | "rollback_failed" => "failed",
        _ => "-",
    }
}

fn header(s: &pb::RolloutStatus, now: u64, p: Paint) -> String {
    let start = if s.created_at_ms > 0 {
        s.created_at_ms
    } else {
        s.events.first().map_or(now, |e| e.at_ms)
    };
    let end = if phase_is_terminal(&s.phase) {
        s.events.last().map_or(now, |e| e.at_ms)
    } else {
        now
    };
    let elapsed = Duration::from_millis(end.saturating_sub(start));
    let mut phase = p.phase(&s.phase);
    if s.awaiting_promotion {
        phase.push_str(crate::output::awaiting_words(s));
    }
    let mut line = format!(
        "{} {}  {}  {phase}",
        p.bold("Rollout"),
        p.bold(&s.id),
        s.version
    );
    if !s.requested_by.is_empty() {
        line.push_str(&format!("  by {}", s.requested_by));
    }
    line.push_str(&format!("  elapsed {}", secs(elapsed)));
    let (done, total) = counts(s);
    if done > 0 && done < total && !phase_is_terminal(&s.phase) {
        let per_node = elapsed / done as u32;
        line.push_str(&format!(
            "  ETA ~{}",
            secs(per_node * (total - done) as u32)
        ));
    }
    line
}

/// Nodes done and in all.
fn counts(s: &pb::RolloutStatus) -> (usize, usize) {
    let total = s.nodes.len();
    let done = if s.phase == "succeeded" {
        total
    } else {
        s.nodes.iter().filter(|n| node_done(&n.step)).count()
    };
    (done, total)
}

fn progress(s: &pb::RolloutStatus, width: usize, p: Paint) -> String {
    let (done, total) = counts(s);
    let label = format!("  {done}/{total} nodes done");
    let bar_w = width.saturating_sub(label.len() + 3).clamp(10, 40);
    let filled = (done * bar_w).checked_div(total).unwrap_or(0);
    format!(
        "[{}{}]{label}",
        p.green(&"█".repeat(filled)),
        p.dim(&"░".repeat(bar_w - filled))
    )
}

/// Cuts `line` to `width` visible columns (ANSI escapes cost none), so that no line wraps and
/// the view can be redrawn by moving the cursor up as many lines as it printed.
pub fn fit(line: &str, width: usize) -> String {
    let mut out = String::new();
    let mut visible = 0;
    let mut chars = line.chars().peekable();
    let mut cut = false;
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            out.push(c);
            // CSI: ESC [ params final-byte (0x40..=0x7e)
            for d in chars.by_ref() {
                out.push(d);
                if ('@'..='~').contains(&d) && d != '[' {
                    break;
                }
            }
            continue;
        }
        if visible + 1 > width {
            cut = true;
            continue;
        }
        visible += 1;
        out.push(c);
    }
    if cut && out.contains('\x1b') {
        out.push_str("\x1b[0m");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(phase: &str, steps: &[(&str, &str)], events: &[(u64, &str)]) -> pb::RolloutStatus {
        pb::RolloutStatus {
            id: "r000001".into(),
            version: "4.2.1".into(),
            phase: phase.into(),
            requested_by: "operator alice".into(),
            created_at_ms: 1_000,
            nodes: steps
                .iter()
                .map(|(id, step)| pb::NodeProgress {
                    id: (*id).into(),
                    from_version: "4.2.0".into(),
                    step: (*step).into(),
                    ..Default::default()
                })
                .collect(),
            events: events
                .iter()
                .map(|(at, m)| pb::AuditEvent {
                    at_ms: *at,
                    message: (*m).into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn renders_progress_table_and_countdown() {
        let s = status(
            "upgrading",
            &[("n1", "committed"), ("n2", "verifying"), ("n3", "staged")],
            &[
                (2_000, "n1: healthy on 4.2.1"),
                (9_000, "n2: installed 4.2.1 (not permanent yet)"),
            ],
        );
        let mut v = LiveState {
            gate: Some(Gate {
                min_healthy: Duration::from_secs(5),
                deadline: Duration::from_secs(60),
            }),
            ..Default::default()
        };
        v.observe(&s, 10_000);
        let lines = v.render(&s, 12_000, 200, Paint { on: false });
        let text = lines.join("\n");
        assert!(
            lines[0]
                .starts_with("Rollout r000001  4.2.1  upgrading  by operator alice  elapsed 11s"),
            "{text}"
        );
        assert!(lines[0].contains("ETA ~22s"), "{text}");
        assert!(lines[1].ends_with("1/3 nodes done"), "{text}");
        let n2 = lines
            .iter()
            .find(|l| l.trim_start().starts_with("n2"))
            .expect("n2 row");
        assert!(n2.contains("4.2.0 -> 4.2.1"), "{n2}");
        assert!(n2.contains("checking"), "{n2}");
        assert!(
            n2.contains("3s in gate, needs 5s healthy, deadline in 57s"),
            "{n2}"
        );
        assert!(text.contains("Last events:"), "{text}");
        assert!(lines.iter().all(|l| l.chars().count() <= 200));
    }

    /// With what the leader sends (the recorded step time, the gate's settings, how long its
    /// probes have seen the node healthy), the countdown counts healthy time; a follower's
    /// answer (no gate progress) falls back to the time in the gate.
    #[test]
    fn countdown_from_the_leaders_gate() {
        let mut s = status(
            "upgrading",
            &[("n1", "verifying"), ("n2", "verifying")],
            &[],
        );
        s.min_healthy_ms = 5_000;
        s.healthy_deadline_ms = 60_000;
        for n in &mut s.nodes {
            n.step_since_ms = 20_000;
        }
        s.nodes[0].gate_watched = true;
        s.nodes[0].healthy_since_ms = 38_000;
        // This view never saw the steps change: the recorded time counts.
        let v = LiveState::default();
        let lines = v.render(&s, 40_000, 200, Paint { on: false });
        let row = |id: &str| {
            lines
                .iter()
                .find(|l| l.trim_start().starts_with(id))
                .cloned()
                .unwrap_or_else(|| panic!("{id} row in {lines:?}"))
        };
        assert!(
            row("n1").contains("healthy 2s of 5s, deadline in 40s"),
            "{}",
            row("n1")
        );
        assert!(row("n1").contains("20s"), "time in step: {}", row("n1"));
        assert!(
            row("n2").contains("20s in gate, needs 5s healthy, deadline in 40s"),
            "{}",
            row("n2")
        );
        // Probed but not healthy (yet): 0s of 5s.
        s.nodes[0].healthy_since_ms = 0;
        let lines = v.render(&s, 40_000, 200, Paint { on: false });
        assert!(
            lines
                .iter()
                .any(|l| l.contains("healthy 0s of 5s, deadline in 40s")),
            "{lines:?}"
        );
    }

    /// After a rollback, nodes the rollout never switched show where they were left, and the
    /// release it staged there as not installed.
    #[test]
    fn untouched_nodes_show_their_end_state() {
        let s = status(
            "rolled_back",
            &[
                ("n1", "rolled_back"),
                ("n2", "staged"),
                ("n3", "preflight_ok"),
            ],
            &[],
        );
        let v = LiveState::default();
        let lines = v.render(&s, 99_000, 200, Paint { on: false });
        let row = |id: &str| {
            lines
                .iter()
                .find(|l| l.trim_start().starts_with(id))
                .cloned()
                .unwrap_or_default()
        };
        assert!(row("n1").contains("rolled_back"), "{lines:?}");
        assert!(
            row("n2").contains("untouched (on 4.2.0); staged 4.2.1, not installed"),
            "{lines:?}"
        );
        assert!(row("n3").contains("untouched (on 4.2.0)"), "{lines:?}");
        assert!(!row("n3").contains("staged"), "{lines:?}");
        // While the rollout runs, a staged node is just staged.
        let running = status("upgrading", &[("n2", "staged")], &[]);
        let lines = v.render(&running, 99_000, 200, Paint { on: false });
        assert!(
            lines
                .iter()
                .any(|l| l.contains("staged") && !l.contains("untouched")),
            "{lines:?}"
        );
    }

    #[test]
    fn success_is_n_of_n() {
        let s = status(
            "succeeded",
            &[("n1", "committed"), ("n2", "skipped")],
            &[(5_000, "done")],
        );
        let v = LiveState::default();
        let lines = v.render(&s, 99_000, 80, Paint { on: true });
        assert!(lines[1].contains("2/2 nodes done"), "{lines:?}");
        // Elapsed stops at the last event once the rollout has ended.
        assert!(lines[0].contains("elapsed 4s"), "{lines:?}");
    }

    #[test]
    fn fit_cuts_visible_columns_only() {
        assert_eq!(fit("abcdef", 4), "abcd");
        assert_eq!(fit("\x1b[1mabcdef\x1b[0m", 3), "\x1b[1mabc\x1b[0m\x1b[0m");
        assert_eq!(fit("ab", 10), "ab");
    }
}
