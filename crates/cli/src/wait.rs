//! Waiting for a rollout to end (`rollout` without --detach, `status --watch`): follows it
//! through any coordinator, reconnects for as long as it takes when they are lost, and ends on
//! its outcome, a pause (--exit-on-pause), --timeout or Ctrl-C. What is shown meanwhile is a
//! [`View`]: the live view on a terminal, one line per event otherwise, or JSON.

use std::io::Write;
use std::time::Duration;

use std::collections::HashSet;

use anyhow::Result;
use orch_client::{Client, ClientError, control as pb};
use tokio::sync::mpsc;

use crate::args::StatusArgs;
use crate::exit::Exit;
use crate::live::{Gate, LiveState, phase_is_terminal};
use crate::output::{Paint, clock, human_duration, now_ms, secs, status_json};

/// How long one attempt to reach the coordinators may take before the view says it is
/// reconnecting (and the attempt starts over).
const RECONNECT_PATIENCE: Duration = Duration::from_secs(5);

/// What the waiting shows.
pub enum Mode {
    /// Redraw the live view in place (stdout is a terminal).
    Live { paint: Paint, gate: Option<Gate> },
    /// One line per event, with its time, after the first `skip` (already shown).
    Lines { skip: usize },
    /// JSON: every status as one line (`status --watch --json`), or nothing until the end.
    Json { every: bool },
}

/// How the wait ended.
pub enum End {
    /// The rollout reached a terminal phase.
    Finished(pb::RolloutStatus),
    /// It paused or waits for promotion (--exit-on-pause).
    Paused(pb::RolloutStatus),
    /// --timeout passed; the rollout may still be running.
    TimedOut {
        waited: Duration,
        last: Option<pb::RolloutStatus>,
    },
    /// Ctrl-C: this command stops waiting; the rollout goes on.
    Interrupted,
}

enum Update {
    Status(Box<pb::RolloutStatus>),
    /// The coordinators could not be reached for a while; the follower tries again.
    Lost(String),
    Fatal(ClientError),
}

/// Follows rollout `id` in a task of its own, sending every status, and retrying forever
/// (with the client's short patience) when the coordinators are unreachable or leaderless.
fn spawn_follower(mut c: Client, id: String, tx: mpsc::UnboundedSender<Update>) -> Follower {
    c.patience = RECONNECT_PATIENCE;
    Follower(tokio::spawn(async move {
        loop {
            let sink = tx.clone();
            let r = c
                .follow(
                    &id,
                    move |s| {
                        let _ = sink.send(Update::Status(Box::new(s.clone())));
                    },
                    phase_is_terminal,
                )
                .await;
            match r {
                Ok(_) => return,
                Err(e @ (ClientError::Unreachable { .. } | ClientError::NoLeader { .. })) => {
                    if tx.send(Update::Lost(e.to_string())).is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => {
                    let _ = tx.send(Update::Fatal(e));
                    return;
                }
            }
        }
    }))
}

/// Aborts the follower task when the wait ends, however it ends.
struct Follower(tokio::task::JoinHandle<()>);

impl Drop for Follower {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Waits for rollout `id` to end, showing it as `mode` says.
pub async fn wait(
    c: &Client,
    id: &str,
    mode: Mode,
    timeout: Option<Duration>,
    exit_on_pause: bool,
) -> Result<End> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _follower = spawn_follower(c.clone(), id.to_string(), tx);
    let mut view = View::new(mode);
    let started = tokio::time::Instant::now();
    let deadline = async {
        match timeout {
            Some(t) => tokio::time::sleep_until(started + t).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let end = loop {
        tokio::select! {
            u = rx.recv() => match u {
                Some(Update::Status(s)) => {
                    view.status(&s);
                    if phase_is_terminal(&s.phase) {
                        break End::Finished(*s);
                    }
                    if exit_on_pause && (s.phase == "paused" || s.awaiting_promotion) {
                        break End::Paused(*s);
                    }
                }
                Some(Update::Lost(why)) => view.lost(&why),
                Some(Update::Fatal(e)) => {
                    view.close();
                    return Err(e.into());
                }
                None => {
                    view.close();
                    anyhow::bail!("stopped following rollout {id} before it ended");
                }
            },
            _ = tick.tick() => view.tick(),
            () = &mut deadline => break End::TimedOut {
                waited: started.elapsed(),
                last: view.last.take(),
            },
            _ = &mut ctrl_c => break End::Interrupted,
        }
    };
    view.close();
    Ok(end)
}

/// What the wait shows, and the last status it saw.
struct View {
    mode: Mode,
    last: Option<pb::RolloutStatus>,
    live: LiveState,
    screen: Screen,
    /// Events already printed (line mode).
    printed: usize,
    /// Whether the coordinators are currently lost.
    lost: bool,
}

impl View {
    fn new(mode: Mode) -> View {
        let gate = match &mode {
            Mode::Live { gate, .. } => *gate,
            _ => None,
        };
        let printed = match &mode {
            Mode::Lines { skip } => *skip,
            _ => 0,
        };
        View {
            mode,
            last: None,
            live: LiveState::new(gate),
            screen: Screen::default(),
            printed,
            lost: false,
        }
    }

    fn status(&mut self, s: &pb::RolloutStatus) {
        let was_lost = std::mem::take(&mut self.lost);
        match &self.mode {
            Mode::Live { .. } => {
                self.live.note = None;
                self.live.observe(s, now_ms());
            }
            Mode::Lines { .. } => {
                if was_lost {
                    eprintln!("{} reconnected", clock(now_ms()));
                }
                for e in s.events.iter().skip(self.printed) {
                    println!("{} {}", clock(e.at_ms), e.message);
                }
                self.printed = self.printed.max(s.events.len());
            }
            Mode::Json { every } => {
                if was_lost {
                    eprintln!("{} reconnected", clock(now_ms()));
                }
                if *every {
                    println!("{}", status_json(s));
                }
            }
        }
        self.last = Some(s.clone());
        self.draw();
    }

    fn lost(&mut self, why: &str) {
        match &self.mode {
            Mode::Live { .. } => {
                self.live.note = Some(format!("reconnecting: {why}"));
                self.draw();
            }
            _ if !self.lost => eprintln!("{} reconnecting: {why}", clock(now_ms())),
            _ => {}
        }
        self.lost = true;
    }

    /// Redraws the live view (its clocks move on).
    fn tick(&mut self) {
        self.draw();
    }

    fn draw(&mut self) {
        let Mode::Live { paint, .. } = &self.mode else {
            return;
        };
        let Some(s) = &self.last else {
            return;
        };
        let (width, height) = Screen::size();
        let mut lines = self.live.render(s, now_ms(), width, *paint);
        // A frame taller than the terminal would scroll, and the cursor cannot move back
        // above the screen's top: cut it to fit.
        if lines.len() >= height && height > 2 {
            let cut = lines.len() - (height - 2);
            lines.truncate(height - 2);
            lines.push(format!(
                "... {cut} more lines: enlarge the terminal to see them"
            ));
        }
        self.screen.draw(&lines);
    }

    fn close(&mut self) {
        if let Mode::Live { .. } = self.mode {
            self.screen.close();
        }
    }
}

/// The terminal the live view is redrawn on: it remembers how many lines it drew, moves the
/// cursor back up over them and clears below before drawing again.
#[derive(Default)]
struct Screen {
    drawn: usize,
    cursor_hidden: bool,
}

impl Screen {
    /// The terminal's width (less one column, so that no line wraps) and height.
    fn size() -> (usize, usize) {
        let (cols, rows) = rustix::termios::tcgetwinsize(std::io::stdout())
            .ok()
            .map(|w| (w.ws_col as usize, w.ws_row as usize))
            .filter(|&(c, r)| c > 0 && r > 0)
            .unwrap_or((100, 40));
        (cols.saturating_sub(1), rows)
    }

    fn draw(&mut self, lines: &[String]) {
        let mut buf = String::new();
        if !self.cursor_hidden {
            buf.push_str("\x1b[?25l");
            self.cursor_hidden = true;
        }
        if self.drawn > 0 {
            // Back to the first line of the previous frame, column 1.
            buf.push_str(&format!("\x1b[{}F", self.drawn));
        }
        for l in lines {
            // Clear each line's rest, then the lines a shorter frame leaves below.
            buf.push_str(l);
            buf.push_str("\x1b[K\n");
        }
        buf.push_str("\x1b[J");
        self.drawn = lines.len();
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(buf.as_bytes());
        let _ = out.flush();
    }

    fn close(&mut self) {
        if self.cursor_hidden {
            print!("\x1b[?25h");
            let _ = std::io::stdout().flush();
            self.cursor_hidden = false;
        }
    }
}

/// The rollout `status --watch` follows: the one named, else the running one; when none runs,
/// with --next the next one to start, else the latest (said on stderr). `None`: interrupted.
pub async fn first_watched(c: &mut Client, a: &StatusArgs) -> Result<Option<pb::RolloutStatus>> {
    if let Some(id) = &a.id {
        return Ok(Some(c.rollout(id).await?));
    }
    let latest = match c.rollout("").await {
        Ok(s) => Some(s),
        Err(orch_client::ClientError::Refused(m)) if a.next && m.starts_with("no rollout") => None,
        Err(e) => return Err(e.into()),
    };
    match latest {
        Some(s) if !phase_is_terminal(&s.phase) => Ok(Some(s)),
        Some(s) if !a.next => {
            eprintln!(
                "No rollout is running: showing the latest, {}, which ended {} (--next waits for the next one)",
                s.id, s.phase
            );
            Ok(Some(s))
        }
        latest => {
            let known: HashSet<String> = match &latest {
                Some(_) => c.rollouts(false).await?.into_iter().map(|r| r.id).collect(),
                None => HashSet::new(),
            };
            next_rollout(c, &known, a.cluster.timeout).await
        }
    }
}

/// Waits for a rollout whose id is not in `known`; reconnects while coordinators are away.
async fn next_rollout(
    c: &mut Client,
    known: &HashSet<String>,
    timeout: Option<Duration>,
) -> Result<Option<pb::RolloutStatus>> {
    eprintln!("No rollout is running: waiting for the next one (Ctrl-C stops waiting)");
    let start = std::time::Instant::now();
    c.patience = Duration::from_secs(5);
    let mut lost = false;
    loop {
        if timeout.is_some_and(|t| start.elapsed() >= t) {
            return Err(Exit::new(
                5,
                "timeout",
                format!(
                    "gave up waiting for a rollout to start after {}",
                    human_duration(start.elapsed())
                ),
            )
            .into());
        }
        let poll = async {
            match c.rollouts(false).await {
                Ok(list) => Ok(list.into_iter().find(|r| !known.contains(&r.id))),
                Err(e) => Err(e),
            }
        };
        let found = tokio::select! {
            r = poll => r,
            _ = tokio::signal::ctrl_c() => return Ok(None),
        };
        match found {
            Ok(Some(r)) => return Ok(Some(c.rollout(&r.id).await?)),
            Ok(None) => lost = false,
            Err(
                e @ (orch_client::ClientError::Unreachable { .. }
                | orch_client::ClientError::NoLeader { .. }),
            ) => {
                if !lost {
                    eprintln!("reconnecting: {e}");
                }
                lost = true;
            }
            Err(e) => return Err(e.into()),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Turns how a wait ended into the command's result: prints the final status (text or JSON)
/// and returns the exit code's error for anything but success.
pub fn conclude(end: End, id: &str, json: bool, printed_every: bool) -> Result<()> {
    let follow = format!("follow it with `orchestrator status {id} --watch`");
    match end {
        End::Finished(s) => {
            print_final(&s, json, printed_every);
            match finished_exit(&s) {
                None => Ok(()),
                Some(e) => Err(e.into()),
            }
        }
        End::Paused(s) => {
            print_final(&s, json, printed_every);
            let next = if s.awaiting_promotion {
                format!("awaits promotion: continue with `orchestrator promote {}`", s.id)
            } else {
                format!("is paused: continue with `orchestrator resume {}`", s.id)
            };
            Err(Exit::new(4, "paused", format!("rollout {} {next}", s.id)).into())
        }
        End::TimedOut { waited, last } => {
            let seen = last
                .map(|s| format!(" (last seen: {})", s.phase))
                .unwrap_or_default();
            Err(Exit::new(
                5,
                "timeout",
                format!(
                    "gave up waiting after {}: rollout {id} may still be running{seen}; {follow}",
                    secs(waited)
                ),
            )
            .into())
        }
        End::Interrupted => Err(Exit::new(
            130,
            "interrupted",
            format!(
                "stopped waiting: rollout {id} continues on the coordinators; {follow}, or stop it with `orchestrator abort {id}`"
            ),
        )
        .into()),
    }
}

/// The exit of a rollout that ended: none for success, 3 when its rollback failed, else 1.
fn finished_exit(s: &pb::RolloutStatus) -> Option<Exit> {
    match s.phase.as_str() {
        "succeeded" => None,
        "rollback_failed" => Some(Exit::new(3, "rollback_failed", ended(s))),
        _ => Some(Exit::new(1, "rollout_failed", ended(s))),
    }
}

fn ended(s: &pb::RolloutStatus) -> String {
    let cause = if s.error.is_empty() {
        String::new()
    } else {
        format!(": {}", s.error)
    };
    format!("rollout {} ended {}{cause}", s.id, s.phase)
}

fn print_final(s: &pb::RolloutStatus, json: bool, printed_every: bool) {
    if json {
        if !printed_every {
            println!("{}", status_json(s));
        }
    } else {
        println!("Rollout {} {}", s.id, s.phase);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended_as(phase: &str, error: &str) -> pb::RolloutStatus {
        pb::RolloutStatus {
            id: "r000007".into(),
            phase: phase.into(),
            error: error.into(),
            ..Default::default()
        }
    }

    #[test]
    fn outcomes_map_to_the_exit_code_table() {
        assert!(finished_exit(&ended_as("succeeded", "")).is_none());
        for (phase, code, kind) in [
            ("rolled_back", 1, "rollout_failed"),
            ("aborted", 1, "rollout_failed"),
            ("rollback_failed", 3, "rollback_failed"),
        ] {
            let e = finished_exit(&ended_as(phase, "n1: boom")).expect("an exit");
            assert_eq!((e.code, e.kind), (code, kind), "{phase}");
            assert_eq!(
                e.message,
                format!("rollout r000007 ended {phase}: n1: boom")
            );
        }
        let paused = conclude(End::Paused(ended_as("paused", "")), "r000007", true, true);
        let e = paused.expect_err("paused is not success");
        assert_eq!(crate::exit::classify(&e), (4, "paused"));
        let timed = conclude(
            End::TimedOut {
                waited: Duration::from_secs(3),
                last: None,
            },
            "r000007",
            true,
            true,
        );
        let e = timed.expect_err("a timeout is not success");
        assert_eq!(crate::exit::classify(&e), (5, "timeout"));
        assert!(
            e.to_string()
                .contains("orchestrator status r000007 --watch"),
            "{e}"
        );
    }
}
