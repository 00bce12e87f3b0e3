//! Shared presentation: clocks and durations, colours (`--color`, `NO_COLOR`), JSON shapes of
//! the control API's answers, and the plain-text rollout status.

use std::time::Duration;

use std::io::IsTerminal;

use orch_client::control as pb;
use serde_json::json;

use crate::args::ColorChoice;

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `HH:MM:SS` (UTC) of a time in ms since the epoch.
pub fn clock(at_ms: u64) -> String {
    let secs = at_ms / 1000;
    format!(
        "{:02}:{:02}:{:02}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60
    )
}

/// `HH:MM:SS.mmm` (UTC).
pub fn clock_ms(at_ms: u64) -> String {
    format!("{}.{:03}", clock(at_ms), at_ms % 1000)
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of a time in ms since the epoch; `-` for 0.
pub fn date_time(at_ms: u64) -> String {
    if at_ms == 0 {
        return "-".into();
    }
    let days = (at_ms / 86_400_000) as i64;
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02} {}", clock(at_ms))
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar (Howard
/// Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// `850ms`, `2.4s`, `1m05s`, `2h03m`.
pub fn human_duration(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    if ms < 1_000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{}.{}s", ms / 1000, (ms % 1000) / 100)
    } else if ms < 3_600_000 {
        format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60)
    } else {
        format!("{}h{:02}m", ms / 3_600_000, (ms / 60_000) % 60)
    }
}

/// Whole seconds, compactly: `7s`, `1m05s`.
pub fn secs(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, (s / 60) % 60)
    }
}

/// Whether to colour output written to stdout: `--color`, then `NO_COLOR` (any non-empty value
/// turns colour off), then whether stdout is a terminal (and not a dumb one).
pub fn use_color(choice: ColorChoice) -> bool {
    match choice {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => {
            std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
                && std::env::var("TERM").map_or(true, |t| t != "dumb")
                && std::io::stdout().is_terminal()
        }
    }
}

/// ANSI styling that is a no-op when colour is off.
#[derive(Debug, Clone, Copy)]
pub struct Paint {
    pub on: bool,
}

impl Paint {
    fn wrap(&self, code: &str, s: &str) -> String {
        if self.on {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }

    pub fn bold(&self, s: &str) -> String {
        self.wrap("1", s)
    }

    pub fn dim(&self, s: &str) -> String {
        self.wrap("2", s)
    }

    pub fn red(&self, s: &str) -> String {
        self.wrap("31", s)
    }

    /// A rollout phase, coloured by how it stands.
    pub fn phase(&self, phase: &str) -> String {
        let code = match phase {
            "succeeded" => "1;32",
            "rolled_back" | "aborted" => "1;33",
            "rollback_failed" => "1;31",
            "paused" => "1;35",
            "rolling_back" => "33",
            _ => "1;36",
        };
        self.wrap(code, phase)
    }

    pub fn green(&self, s: &str) -> String {
        self.wrap("32", s)
    }

    /// `text` (a node's step, maybe padded) coloured by how the step stands.
    pub fn step_padded(&self, step: &str, text: &str) -> String {
        let code = match step {
            "committed" | "upgraded" => "32",
            "failed" | "rollback_failed" => "31",
            "rolled_back" | "rolling_back" => "33",
            "skipped" | "pending" | "preflight_ok" | "staged" => "2",
            s if s.starts_with("untouched") => "2",
            _ => "36",
        };
        self.wrap(code, text)
    }
}

/// Whether to colour log lines on stderr (already known to be a terminal): `--color`, then
/// `NO_COLOR`.
pub fn use_color_stderr(choice: ColorChoice) -> bool {
    match choice {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
    }
}

/// A registered node's releases: `4.2.1 permanent, 4.2.0 old`.
pub fn releases(n: &pb::NodeEntry) -> String {
    let v: Vec<String> = n
        .versions
        .iter()
        .map(|e| format!("{} {}", e.version, e.state))
        .collect();
    v.join(", ")
}

pub use orch_proto::json::{cluster_json, node_json, opt_str, policy_json, status_json};

/// A release store's versions: the EMQX-style listing, or JSON `[{"version", "state"}]`.
pub fn print_versions(entries: &[orch_types::VersionEntry], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(entries)?);
    } else {
        print!("{}", orch_types::format_versions(entries));
    }
    Ok(())
}

/// The node's root directory: unquoted (for `$(orchestrator node root_dir)`), or JSON.
pub fn print_root_dir(root: &str, json: bool) {
    if json {
        println!("{}", json!({ "root_dir": root }));
    } else {
        println!("{root}");
    }
}

/// A store step's lines: EMQX's words on stdout and anything else on stderr, or JSON
/// `{"messages": [...], "notes": [...]}`.
pub fn print_messages(lines: &[String], notes: &[String], json: bool) {
    if json {
        println!("{}", json!({ "messages": lines, "notes": notes }));
    } else {
        for l in lines {
            println!("{l}");
        }
        for n in notes {
            eprintln!("{n}");
        }
    }
}

/// A node's error column: its agent's unresponsiveness (and for how long), then its error.
pub fn node_problem(n: &pb::NodeProgress) -> String {
    let mut out = Vec::new();
    if n.unresponsive_since_ms > 0 {
        let secs = now_ms().saturating_sub(n.unresponsive_since_ms) / 1000;
        out.push(format!(
            "agent unresponsive for {secs}s ({})",
            n.unresponsive_detail
        ));
    }
    if !n.error.is_empty() {
        out.push(n.error.clone());
    }
    out.join("; ")
}

/// A node's step as the views show it. Once a rollout has ended without succeeding, a node it
/// never switched is not "staged" or "preflight_ok" any more: it was left untouched on the
/// version it ran, and a release this rollout unpacked there stays unpacked, not installed.
pub fn step_shown(s: &pb::RolloutStatus, n: &pb::NodeProgress) -> String {
    let ended_badly = matches!(
        s.phase.as_str(),
        "rolled_back" | "rollback_failed" | "aborted"
    );
    let untouched = matches!(
        n.step.as_str(),
        "pending" | "preflight_ok" | "staging" | "staged"
    );
    if !ended_badly || !untouched {
        return n.step.clone();
    }
    let mut out = if n.from_version.is_empty() {
        "untouched".to_string()
    } else {
        format!("untouched (on {})", n.from_version)
    };
    if n.step == "staged" {
        out.push_str(&format!("; staged {}, not installed", s.version));
    }
    out
}

/// The policy a rollout runs with, in one line: how it moves through the nodes (waves, batch
/// rule, selector, bound on unavailable nodes), then the rest of its spec (canary, failure
/// policy, gates, bake, pruning), e.g. `policy: waves by zone (a, b, c), batches of 50%, at
/// most 1 unavailable, on failure rollback, min healthy 10.0s, ...`. `None` without a spec
/// (listings carry none).
fn policy_line(s: &pb::RolloutStatus) -> Option<String> {
    let spec: serde_json::Value = serde_json::from_str(&s.spec_json).ok()?;
    let num = |k: &str| spec.get(k).and_then(serde_json::Value::as_u64);
    let dur = |k: &str| num(k).map(|ms| human_duration(Duration::from_millis(ms)));
    let mut parts = Vec::new();
    match &s.policy {
        Some(p) => {
            if !p.wave_by.is_empty() {
                let values: Vec<&str> = p.waves.iter().map(|w| w.label_value.as_str()).collect();
                parts.push(format!("waves by {} ({})", p.wave_by, values.join(", ")));
            }
            if p.batch.ends_with('%') || !parts.is_empty() {
                parts.push(format!("batches of {}", p.batch));
            } else {
                parts.push(format!("batch {}", p.batch));
            }
            if !p.selector.is_empty() {
                let mut pairs: Vec<String> =
                    p.selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
                pairs.sort();
                parts.push(format!("selector {}", pairs.join(",")));
            }
            if !p.max_unavailable.is_empty() {
                parts.push(format!("at most {} unavailable", p.max_unavailable));
            }
            if p.wave_pause_ms > 0 {
                let d = human_duration(Duration::from_millis(p.wave_pause_ms));
                parts.push(format!("wave pause {d}"));
            }
            if p.promote_each_wave {
                parts.push("promote after each wave".to_string());
            }
            if !p.gates.is_empty() {
                parts.push(metric_gates_words(&p.gate_prometheus, &p.gates));
            }
        }
        None => parts.push(format!("batch {}", num("batch_size")?)),
    }
    if let Some(c) = num("canary").filter(|&c| c > 0) {
        parts.push(format!("canary {c}"));
    }
    if let Some(f) = spec.get("on_failure").and_then(|v| v.as_str()) {
        parts.push(format!("on failure {f}"));
    }
    if spec.get("permanent").and_then(|v| v.as_bool()) == Some(false) {
        parts.push("not permanent".to_string());
    }
    if let Some(d) = dur("min_healthy_time_ms") {
        parts.push(format!("min healthy {d}"));
    }
    if let Some(d) = dur("healthy_deadline_ms") {
        parts.push(format!("healthy deadline {d}"));
    }
    if let Some(n) = num("failure_threshold") {
        parts.push(format!("failure threshold {n}"));
    }
    if let Some(d) = dur("bake_ms") {
        parts.push(format!("bake {d}"));
    }
    if let Some(d) = dur("watch_after_commit_ms") {
        parts.push(format!("watch after commit {d}"));
    }
    if let Some(n) = num("keep_releases") {
        parts.push(format!("keep {n} releases"));
    }
    Some(format!("policy: {}", parts.join(", ")))
}

/// `metric gates (Prometheus URL): `Q1`; `Q2``, as `status` and the plan show them.
pub fn metric_gates_words(prometheus: &str, gates: &[String]) -> String {
    let queries: Vec<String> = gates.iter().map(|q| format!("`{q}`")).collect();
    format!("metric gates ({prometheus}): {}", queries.join("; "))
}

/// What a rollout waiting for `promote` waits after: its canary, or (with
/// `--promote-each-wave`) a wave, as its latest event about the wait says.
pub fn awaiting_words(s: &pb::RolloutStatus) -> &'static str {
    let wave = s
        .events
        .iter()
        .rev()
        .find(|e| e.message.contains("waiting for promote"))
        .is_some_and(|e| e.message.contains("before wave"));
    if wave {
        " (wave done: waiting for `orchestrator promote`)"
    } else {
        " (canary done: waiting for `orchestrator promote`)"
    }
}

/// The plain-text status of one rollout; `events`: how many of the last events to show (`None`:
/// all of them), saying how many were left out.
pub fn print_status(s: &pb::RolloutStatus, events: Option<usize>) {
    let mut head = format!("Rollout {} to {}: {}", s.id, s.version, s.phase);
    if s.awaiting_promotion {
        head.push_str(awaiting_words(s));
    }
    println!("{head}");
    if !s.requested_by.is_empty() {
        println!("requested by {}", s.requested_by);
    }
    if let Some(line) = policy_line(s) {
        println!("{line}");
    }
    if !s.error.is_empty() {
        println!("error: {}", s.error);
    }
    let w = s.nodes.iter().map(|n| n.id.len()).max().unwrap_or(4).max(4);
    let steps: Vec<String> = s.nodes.iter().map(|n| step_shown(s, n)).collect();
    let sw = steps.iter().map(String::len).max().unwrap_or(0).max(16);
    println!("  {:<w$}  {:<10}  {:<sw$}  ERROR", "NODE", "FROM", "STEP");
    for (n, step) in s.nodes.iter().zip(&steps) {
        let from = if n.from_version.is_empty() {
            "-"
        } else {
            &n.from_version
        };
        println!(
            "  {:<w$}  {:<10}  {:<sw$}  {}",
            n.id,
            from,
            step,
            node_problem(n)
        );
    }
    if s.events.is_empty() {
        return;
    }
    let total = s.events.len();
    let shown = events.unwrap_or(total).min(total);
    println!("events:");
    if shown < total {
        println!(
            "  ({} earlier event{} left out; --events N shows more, --events all every one)",
            total - shown,
            if total - shown == 1 { "" } else { "s" }
        );
    }
    for e in &s.events[total - shown..] {
        println!("  {} {} ({})", clock(e.at_ms), e.message, e.by);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(human_duration(Duration::from_millis(850)), "850ms");
        assert_eq!(human_duration(Duration::from_millis(2_450)), "2.4s");
        assert_eq!(human_duration(Duration::from_secs(65)), "1m05s");
        assert_eq!(human_duration(Duration::from_secs(7_380)), "2h03m");
        assert_eq!(secs(Duration::from_millis(40_900)), "40s");
    }

    #[test]
    fn dates() {
        assert_eq!(date_time(0), "-");
        // 2026-12-03 07:36:27 UTC
        assert_eq!(date_time(1_796_283_387_000), "2026-12-03 07:36:27");
        assert_eq!(date_time(951_782_400_000), "2000-02-29 00:00:00");
    }

    #[test]
    fn paint_off_is_plain() {
        let p = Paint { on: false };
        assert_eq!(p.phase("succeeded"), "succeeded");
        let p = Paint { on: true };
        assert!(p.phase("succeeded").starts_with("\x1b["));
    }
}
