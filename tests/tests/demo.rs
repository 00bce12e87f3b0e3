//! `orchestrator demo` end to end (the smallest cluster, plain text): both rollouts, the
//! timestamps and step durations, the totals, and the commands to try next with the binary's
//! real path.

use std::time::Duration;

use orch_tests::{orch_cmd, orchestrator, run_bounded, stderr, stdout};

#[test]
fn demo_runs_a_good_and_a_broken_rollout_and_says_what_to_try_next() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let mut cmd = orch_cmd(&[
        "demo",
        "--nodes",
        "2",
        "--coordinators",
        "1",
        "--insecure",
        "--dir",
    ]);
    cmd.arg(&dir);
    let o = run_bounded(cmd, Duration::from_secs(240));
    let out = stdout(&o);
    assert!(o.status.success(), "{out}\n{}", stderr(&o));
    // Each line stamped HH:MM:SS.mmm; node steps with how long they took.
    let stamped = out
        .lines()
        .filter(|l| l.len() > 13 && l.as_bytes()[2] == b':' && l.as_bytes()[8] == b'.')
        .count();
    assert!(stamped > 10, "{out}");
    assert!(out.contains("n1: healthy on 4.2.1  (+"), "{out}");
    assert!(out.contains("Rollout r000001 succeeded in "), "{out}");
    assert!(out.contains("Rollout r000002 rolled_back in "), "{out}");
    assert!(out.contains("0 failed (hot swaps drop nothing)"), "{out}");
    let bin = orchestrator().display().to_string();
    assert!(
        out.contains(&format!("{bin} demo --keep --dir {}", dir.display())),
        "{out}"
    );
    // The daemons logged at info into the demo directory.
    let log = std::fs::read_to_string(dir.join("agent1.log")).unwrap_or_default();
    assert!(log.contains("INFO"), "{log}");
}
