//! Watching and scripting rollouts from the terminal (issue #12, the CLI's side): the live view
//! on a pseudo-terminal, the exit-code table of the waiting commands, reconnecting when every
//! coordinator is lost, Ctrl-C, --timeout, one-shot commands failing fast, and JSON errors.

use std::time::{Duration, Instant};

use orch_tests::cluster::{Cluster, ClusterOpts, V1, step_of};
use orch_tests::pty::{PtyRun, render};
use orch_tests::{free_port, orch_cmd, run_bounded, stderr, stdout};

const COLS: u16 = 160;
const ROWS: u16 = 48;

/// How long a waiting command may take in these scenarios.
const WAIT: Duration = Duration::from_secs(120);

fn code(o: &std::process::Output) -> Option<i32> {
    o.status.code()
}

/// A rollout started with --detach; returns its id.
fn start_detached(c: &Cluster, version: &str, extra: &[&str]) -> String {
    let pkg = c.package(version, false).display().to_string();
    let mut args = vec!["rollout", version, "--package", &pkg, "--detach"];
    args.extend_from_slice(extra);
    c.cli_ok(&args).trim().to_string()
}

/// Whether the output moves the cursor up to a previous line (`ESC [ N F`): a redraw.
fn moves_cursor_up(text: &str) -> bool {
    text.split("\x1b[").skip(1).any(|rest| {
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        digits > 0 && rest[digits..].starts_with('F')
    })
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

#[test]
fn live_view_redraws_one_table_in_place_on_a_terminal() {
    let c = Cluster::start(ClusterOpts::state_only(1, 3));

    // `status --watch --next` before any rollout: it waits for the next one.
    let mut cmd = c.cli_cmd(&["status", "--watch", "--next"]);
    cmd.env("TERM", "xterm-256color").env_remove("NO_COLOR");
    let mut watch = PtyRun::spawn(cmd, COLS, ROWS);
    std::thread::sleep(Duration::from_millis(500));
    let id = start_detached(&c, V1, &["--min-healthy-time", "3s"]);
    let status = watch
        .wait(WAIT)
        .expect("status --watch ends with the rollout");
    let raw = watch.output();
    let text = String::from_utf8_lossy(&raw);
    let screen = render(&raw, COLS, ROWS);
    assert_eq!(status.code(), Some(0), "succeeded exits 0\n{screen}");
    // Many frames were drawn, by moving the cursor back up over the last one...
    assert!(count(&text, "FROM -> TO") > 1, "{text:?}");
    assert!(moves_cursor_up(&text), "{text:?}");
    // ...so the screen shows one table, with every node done.
    assert_eq!(
        count(&screen, "FROM -> TO"),
        1,
        "one table on screen:\n{screen}"
    );
    assert!(screen.contains(&format!("Rollout {id}")), "{screen}");
    assert!(screen.contains("succeeded"), "{screen}");
    assert!(screen.contains("3/3 nodes done"), "{screen}");
    for n in ["n1", "n2", "n3"] {
        assert!(
            screen.lines().any(|l| l.trim_start().starts_with(n)
                && l.contains("4.2.0 -> 4.2.1")
                && l.contains("committed")),
            "{n} committed on screen:\n{screen}"
        );
    }
    // While a node was in its health gate, the view counted its healthy time, as the leader
    // (which probes the gate) reported it.
    assert!(
        [
            "healthy 1s of 3s, deadline in",
            "healthy 2s of 3s, deadline in"
        ]
        .iter()
        .any(|t| text.contains(t)),
        "{text:?}"
    );
    assert!(screen.contains("Last events:"), "{screen}");
    println!("{screen}");

    // The waiting `rollout` draws the same view, with the gate's countdown, and exits 0.
    let pkg = c.package("4.2.2", false).display().to_string();
    let cmd = c.cli_cmd(&[
        "rollout",
        "4.2.2",
        "--package",
        &pkg,
        "--min-healthy-time",
        "2s",
        "--color",
        "never",
    ]);
    let mut run = PtyRun::spawn(cmd, COLS, ROWS);
    let status = run.wait(WAIT).expect("rollout ends");
    let raw = run.output();
    let text = String::from_utf8_lossy(&raw);
    let screen = render(&raw, COLS, ROWS);
    assert_eq!(status.code(), Some(0), "{screen}");
    assert!(text.contains(" of 2s, deadline in"), "{text:?}");
    assert!(
        !text.contains("\x1b[3"),
        "--color never: no colours: {text:?}"
    );
    assert_eq!(count(&screen, "FROM -> TO"), 1, "{screen}");
    assert!(screen.contains("3/3 nodes done"), "{screen}");
}

#[test]
fn waiting_commands_exit_with_the_rollouts_outcome() {
    let mut c = Cluster::start(ClusterOpts::state_only(3, 2));

    // Succeeded: 0; `status --watch` after it shows the finished one and exits with its code.
    let pkg = c.package(V1, false).display().to_string();
    let o = c.cli(&[
        "rollout",
        V1,
        "--package",
        &pkg,
        "--min-healthy-time",
        "300ms",
    ]);
    assert_eq!(code(&o), Some(0), "{}{}", stdout(&o), stderr(&o));
    let o = c.cli(&["status", "--watch"]);
    assert_eq!(code(&o), Some(0), "{}", stderr(&o));
    assert!(
        stderr(&o)
            .contains("No rollout is running: showing the latest, r000001, which ended succeeded"),
        "{}",
        stderr(&o)
    );

    // History: start, duration, outcome, who; the last N events, saying how many are left out.
    let list = c.cli_ok(&["rollouts"]);
    assert!(
        list.contains("STARTED (UTC)") && list.contains("DURATION"),
        "{list}"
    );
    let row = list
        .lines()
        .find(|l| l.starts_with("r000001"))
        .expect("r000001 listed");
    assert!(
        row.contains("succeeded") && row.contains("operator"),
        "{row}"
    );
    let listed = c.cli_json(&["rollouts", "--json"]);
    assert!(listed[0]["duration_ms"].as_u64().is_some(), "{listed}");
    let shown = c.cli_ok(&["status", "r000001", "--events", "2"]);
    assert!(shown.contains("earlier events left out"), "{shown}");
    let trimmed = c.cli_json(&["status", "r000001", "--events", "2", "--json"]);
    assert_eq!(
        trimmed["events"].as_array().map(Vec::len),
        Some(2),
        "{trimmed}"
    );
    assert!(
        trimmed["events_left_out"].as_u64().is_some_and(|n| n > 0),
        "{trimmed}"
    );

    // Awaiting promotion with --exit-on-pause: 4, on `rollout` and on `status --watch`.
    let pkg = c.package("4.2.2", false).display().to_string();
    let o = c.cli(&[
        "rollout",
        "4.2.2",
        "--package",
        &pkg,
        "--canary",
        "1",
        "--exit-on-pause",
        "--min-healthy-time",
        "300ms",
    ]);
    assert_eq!(code(&o), Some(4), "{}{}", stdout(&o), stderr(&o));
    assert!(
        stderr(&o).contains("orchestrator promote r000002"),
        "{}",
        stderr(&o)
    );
    let o = c.cli(&["status", "--watch", "--exit-on-pause"]);
    assert_eq!(code(&o), Some(4), "{}", stderr(&o));
    // Aborted: 1 (JSON on both streams with --json); `abort --json` prints the status.
    let aborted = c.cli_json(&["abort", "r000002", "--json"]);
    assert_eq!(aborted["id"], "r000002", "{aborted}");
    let o = c.cli(&["status", "r000002", "--watch", "--json"]);
    assert_eq!(code(&o), Some(1), "{}", stderr(&o));
    let last: serde_json::Value =
        serde_json::from_str(stdout(&o).lines().last().unwrap_or_default()).expect("JSON status");
    assert_eq!(last["phase"], "aborted");
    let err: serde_json::Value = serde_json::from_str(stderr(&o).trim()).expect("JSON error");
    assert_eq!(err["error"]["kind"], "rollout_failed", "{err}");

    // --timeout: 5, leaving the rollout running, and saying how to follow it.
    let id = start_detached(&c, "4.2.3", &["--min-healthy-time", "30s"]);
    let start = Instant::now();
    let o = c.cli(&["status", &id, "--watch", "--timeout", "2s"]);
    assert_eq!(code(&o), Some(5), "{}", stderr(&o));
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "{:?}",
        start.elapsed()
    );
    let err = stderr(&o);
    assert!(
        err.contains("may still be running")
            && err.contains(&format!("orchestrator status {id} --watch")),
        "{err}"
    );
    let left = c.ctl_status(&id).expect("the rollout's status");
    assert!(
        !live_phase_ended(&left.phase),
        "--timeout left it running: {}",
        left.phase
    );

    // Ctrl-C on a waiting rollout: it stops waiting and says the rollout goes on.
    c.cli_ok(&["abort", &id]);
    let pkg = c.package("4.2.4", false).display().to_string();
    let mut bg = c.spawn_cli(&[
        "rollout",
        "4.2.4",
        "--package",
        &pkg,
        "--min-healthy-time",
        "30s",
    ]);
    c.wait_rollout(Duration::from_secs(30), "rollout 4.2.4 upgrading", |s| {
        s.version == "4.2.4" && s.nodes.iter().any(|n| n.step == "verifying")
    });
    // SAFETY: kill(2) on our own child, which has not been waited for.
    unsafe { libc::kill(bg_pid(&bg), libc::SIGINT) };
    let out = bg.wait(Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(130), "{}", out.stderr);
    assert!(
        out.stderr.contains("continues on the coordinators") && out.stderr.contains("--watch"),
        "{}",
        out.stderr
    );
    let running = c.ctl_status("").expect("status");
    assert!(
        !running.phase.contains("abort"),
        "Ctrl-C left the rollout alone: {}",
        running.phase
    );
    c.cli_ok(&["abort"]);

    // Every coordinator lost mid-rollout: the waiting rollout reconnects and reports success.
    let pkg = c.package("4.2.5", false).display().to_string();
    let mut bg = c.spawn_cli(&[
        "rollout",
        "4.2.5",
        "--package",
        &pkg,
        "--min-healthy-time",
        "3s",
    ]);
    let s = c.wait_rollout(Duration::from_secs(30), "rollout 4.2.5 upgrading", |s| {
        s.version == "4.2.5" && s.nodes.iter().any(|n| n.step == "verifying")
    });
    println!(
        "killing every coordinator while n1 is {}",
        step_of(&s, "n1")
    );
    for id in 1..=3 {
        c.coord(id).kill9();
    }
    std::thread::sleep(Duration::from_secs(8));
    for id in 1..=3 {
        c.coord(id).restart();
    }
    let out = bg.wait(WAIT);
    assert_eq!(
        out.status.code(),
        Some(0),
        "the rollout resumed and succeeded: {}\n{}",
        out.stderr,
        out.stdout
    );
    assert!(out.stderr.contains("reconnecting"), "{}", out.stderr);
    assert!(out.stdout.contains("succeeded"), "{}", out.stdout);
}

fn live_phase_ended(phase: &str) -> bool {
    matches!(
        phase,
        "succeeded" | "rolled_back" | "rollback_failed" | "aborted"
    )
}

fn bg_pid(bg: &orch_tests::cluster::BgCmd) -> libc::pid_t {
    bg.pid() as libc::pid_t
}

#[test]
fn one_shot_commands_fail_fast_and_bound_the_wait_for_a_leader() {
    // Nothing listens: refused at once, in words (and in JSON with --json).
    let dead = format!("127.0.0.1:{}", free_port());
    let start = Instant::now();
    let mut cmd = orch_cmd(&["status", "--insecure", "--coordinator", &dead]);
    cmd.env_remove("ORCHESTRATOR_COORDINATORS");
    let o = run_bounded(cmd, Duration::from_secs(30));
    assert_eq!(code(&o), Some(1));
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert!(
        stderr(&o).contains("no coordinator reachable")
            && stderr(&o).contains("connection refused"),
        "{}",
        stderr(&o)
    );
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    let mut cmd = orch_cmd(&["nodes", "--insecure", "--json", "--coordinator", &dead]);
    cmd.env_remove("ORCHESTRATOR_COORDINATORS");
    let o = run_bounded(cmd, Duration::from_secs(30));
    let err: serde_json::Value = serde_json::from_str(stderr(&o).trim()).expect("JSON error");
    assert_eq!(err["error"]["kind"], "unreachable", "{err}");
    assert!(stdout(&o).is_empty());

    // No quorum: the wait for a leader is bounded by --timeout.
    // One coordinator of three, alone after a restart: it cannot elect anyone.
    let mut c = Cluster::start(ClusterOpts::state_only(3, 1));
    for id in 1..=3 {
        c.coord(id).kill9();
    }
    c.coord(3).restart();
    let start = Instant::now();
    let o = c.cli(&["nodes", "--timeout", "2s"]);
    assert_eq!(code(&o), Some(1), "{}", stdout(&o));
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "{:?}",
        start.elapsed()
    );
    println!("without a quorum: {}", stderr(&o).trim());
}

/// The JSON log lines of `log` that were written inside a `step` span, as parsed objects.
fn step_lines(log: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| {
            v["spans"]
                .as_array()
                .is_some_and(|s| s.iter().any(|sp| sp["name"] == "step"))
        })
        .collect()
}

/// The `step` span's fields of a JSON log line.
fn step_span(v: &serde_json::Value) -> &serde_json::Value {
    v["spans"]
        .as_array()
        .and_then(|s| s.iter().find(|sp| sp["name"] == "step"))
        .expect("a step span")
}

/// One span per rollout and per node step: the leader's log lines about a step (json format)
/// carry the rollout id, the node and the fence, inside the rollout's span; the agent's step
/// handler carries the same rollout and fence.
#[test]
fn daemon_logs_carry_rollout_node_and_fence_in_step_spans() {
    let c = Cluster::start(
        ClusterOpts::state_only(1, 2)
            .coordinator_args(&["--log-format", "json"])
            .agent_args(1, &["--log-format", "json"]),
    );
    let id = start_detached(&c, V1, &[]);
    c.wait_for(WAIT, "the rollout to succeed", |c| {
        c.ctl_status(&id).is_some_and(|s| s.phase == "succeeded")
    });
    let log = c.coords[0].log();
    let steps = step_lines(&log);
    assert!(
        !steps.is_empty(),
        "no step lines in the coordinator log:\n{log}"
    );
    for node in ["n1", "n2"] {
        let mine: Vec<&serde_json::Value> = steps
            .iter()
            .filter(|v| step_span(v)["node"] == node)
            .collect();
        assert!(!mine.is_empty(), "no step line for {node}:\n{log}");
        for v in mine {
            let span = step_span(v);
            assert_eq!(span["rollout"], id.as_str(), "{v}");
            assert!(span["fence"].as_u64().is_some_and(|f| f > 0), "{v}");
            // Inside the rollout's own span.
            let spans = v["spans"].as_array().unwrap();
            assert!(
                spans
                    .iter()
                    .any(|s| s["name"] == "rollout" && s["rollout"] == id.as_str()),
                "{v}"
            );
        }
    }
    // The agent's step handler: the same rollout id and a fence on its fenced steps.
    let agent_log = c.nodes[0].agent.as_ref().expect("agent n1").log();
    let fenced: Vec<serde_json::Value> = step_lines(&agent_log)
        .into_iter()
        .filter(|v| step_span(v)["rollout"] == id.as_str())
        .collect();
    assert!(!fenced.is_empty(), "no fenced step lines:\n{agent_log}");
    for v in &fenced {
        let span = step_span(v);
        assert_eq!(span["node"], "n1", "{v}");
        assert!(span["fence"].as_u64().is_some_and(|f| f > 0), "{v}");
    }
}

/// Reads from a follower that knows no leader (`--stale`) say so on stderr, with for how long,
/// and carry `"stale": true` in their JSON; with a leader, neither.
#[test]
fn stale_reads_say_how_long_there_has_been_no_leader() {
    let mut c = Cluster::start(ClusterOpts::state_only(3, 1));
    let id = start_detached(&c, V1, &[]);
    c.wait_for(WAIT, "the rollout to succeed", |c| {
        c.ctl_status(&id).is_some_and(|s| s.phase == "succeeded")
    });
    // With a leader: no notice, no flag.
    for args in [&["status", "--json"][..], &["nodes", "--json"][..]] {
        let o = c.cli(args);
        assert_eq!(code(&o), Some(0), "{args:?}: {}", stderr(&o));
        assert!(
            !stdout(&o).contains("\"stale\""),
            "{args:?}: {}",
            stdout(&o)
        );
        assert!(!stderr(&o).contains("stale"), "{args:?}: {}", stderr(&o));
    }
    // Kill the leader and one follower: the survivor knows no leader once its election fails.
    let leader = c.leader().expect("a leader");
    let other = (1..=3).find(|i| *i != leader).unwrap();
    let survivor = (1..=3).find(|i| *i != leader && *i != other).unwrap();
    c.coord(leader).kill9();
    c.coord(other).kill9();
    let addr = c.coord(survivor).addr.clone();
    c.wait_for(
        Duration::from_secs(30),
        "the survivor to know no leader",
        |c| c.ctl_cluster_via(&addr).is_some_and(|s| s.leader_id == 0),
    );
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.push("--stale");
        run_bounded(c.cli_cmd_via(std::slice::from_ref(&addr), &all), WAIT)
    };
    let seconds = |err: &str| -> u64 {
        let rest = err
            .split("no leader for ")
            .nth(1)
            .unwrap_or_else(|| panic!("no notice: {err:?}"));
        assert!(
            rest.contains("s; this view may be stale"),
            "the notice: {err:?}"
        );
        rest.split('s').next().unwrap().parse().expect("seconds")
    };
    for args in [&["status", &id][..], &["nodes"][..]] {
        let o = run(args);
        assert_eq!(code(&o), Some(0), "{args:?}: {}", stderr(&o));
        seconds(&stderr(&o));
    }
    let o = run(&["status", &id, "--json"]);
    assert_eq!(code(&o), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).expect("JSON");
    assert_eq!(v["stale"], true, "{v}");
    assert_eq!(v["phase"], "succeeded", "{v}");
    seconds(&stderr(&o));
    let o = run(&["nodes", "--json"]);
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).expect("JSON");
    assert!(
        v.as_array()
            .is_some_and(|a| !a.is_empty() && a.iter().all(|n| n["stale"] == true)),
        "{v}"
    );
    // The count grows with the time without a leader.
    let first = seconds(&stderr(&run(&["nodes"])));
    c.wait_for(Duration::from_secs(10), "a second to pass", |_| {
        seconds(&stderr(&run(&["nodes"]))) > first
    });
}

/// A rollout that fails on its first node (batch size 1) leaves the others untouched: `status`
/// shows them on the version they run, with the release it staged there not installed, instead
/// of "staged".
#[test]
fn a_failed_rollout_shows_untouched_nodes_and_what_it_staged() {
    // n1's health check points at a port where nothing listens: its gate fails.
    let dead = format!("http://127.0.0.1:{}/health", free_port());
    let c = Cluster::start(ClusterOpts::state_only(1, 3).agent_args(1, &["--health-url", &dead]));
    let pkg = c.package(V1, false).display().to_string();
    let o = c.cli(&[
        "rollout",
        V1,
        "--package",
        &pkg,
        "--batch-size",
        "1",
        "--min-healthy-time",
        "300ms",
        "--healthy-deadline",
        "10s",
    ]);
    assert!(
        matches!(code(&o), Some(1) | Some(3)),
        "a failed rollout: {}{}",
        stdout(&o),
        stderr(&o)
    );
    let text = c.cli_ok(&["status", "r000001"]);
    let row = |id: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(&format!("{id} ")))
            .unwrap_or_else(|| panic!("{id} in {text}"))
            .to_string()
    };
    assert!(!row("n1").contains("untouched"), "{text}");
    for n in ["n2", "n3"] {
        assert!(
            row(n).contains("untouched (on 4.2.0); staged 4.2.1, not installed"),
            "{text}"
        );
    }
}
