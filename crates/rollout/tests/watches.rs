//! Watches that hold a rollout without a clock of their own: `--wave-pause DUR` (every node
//! upgraded so far stays healthy for DUR before the next wave starts) and
//! `--watch-after-commit DUR` (every node probed for DUR after the commit; a failure rolls the
//! committed rollout back). Each is a health gate of DUR issued to every watched node at once.

mod common;

use common::*;
use orch_rollout::{Action, ActionKind, Command, Rollout};
use orch_types::rollout::{NodeStep, OnFailure, Phase, RolloutSpec, Wave};

fn waves(s: &mut RolloutSpec, groups: &[(&str, &[&str])]) {
    s.wave_by = Some("zone".into());
    s.waves = groups
        .iter()
        .map(|(value, ids)| Wave {
            label_value: value.to_string(),
            nodes: ids.iter().map(|i| n(i)).collect(),
        })
        .collect();
}

fn gate(node: &str, ms: u64) -> (String, u64, u64, u32) {
    (node.to_string(), ms, ms + 1_000, 1)
}

/// Answers every issued action `Done` until `stop` holds, returning everything issued.
fn run_until(h: &mut H, stop: impl Fn(&H) -> bool) -> Vec<Action> {
    let mut all = Vec::new();
    while !stop(h) {
        let a = h.issue();
        assert!(!a.is_empty(), "stalled: {:#?}", h.messages());
        for x in &a {
            h.done(x.seq);
        }
        all.extend(a);
    }
    all
}

/// Three waves (a: n1 n2, b: n3, c: n4), one node at a time, a 30 s wave pause.
fn paused_waves() -> H {
    let mut s = spec(4);
    waves(
        &mut s,
        &[("a", &["n1", "n2"]), ("b", &["n3"]), ("c", &["n4"])],
    );
    s.wave_pause_ms = 30_000;
    H::new(s)
}

#[test]
fn a_wave_pause_watches_every_upgraded_node_before_the_next_wave_starts() {
    let mut h = paused_waves();
    h.run_to_upgrading();
    // Wave a, node by node.
    run_until(&mut h, |h| h.step("n2") == NodeStep::Upgraded);
    assert!(h.has_event(
        "wave zone=a upgraded and healthy on 4.2.1; wave pause 30s before wave zone=b: the 2 nodes upgraded so far must stay healthy"
    ));
    assert_eq!(h.r.holding_wave(), Some(1));
    let hold = h.issue();
    assert_eq!(gates(&hold), [gate("n1", 30_000), gate("n2", 30_000)]);
    // n3 does not start while any node of wave a is still held.
    h.done(hold[0].seq);
    assert!(h.issue().is_empty(), "{:#?}", h.messages());
    assert_eq!(h.step("n3"), NodeStep::Staged);
    h.done(hold[1].seq);
    assert!(h.has_event("n2: stayed healthy on 4.2.1 through the wave pause (30s)"));
    assert!(h.has_event(
        "wave pause over: every upgraded node stayed healthy for 30s; starting wave zone=b"
    ));
    assert_eq!(h.r.holding_wave(), None);
    let install = h.issue();
    assert_eq!(kinds(&install), [("n3".to_string(), "install")]);
    h.done(install[0].seq);
    // After wave b, the pause holds all three nodes upgraded so far.
    run_until(&mut h, |h| h.step("n3") == NodeStep::Upgraded);
    let hold = h.issue();
    assert_eq!(
        gates(&hold),
        [gate("n1", 30_000), gate("n2", 30_000), gate("n3", 30_000)]
    );
    for a in &hold {
        h.done(a.seq);
    }
    // No pause after the last wave: the commit follows.
    run_until(&mut h, |h| h.phase() == Phase::Succeeded);
    assert_eq!(h.steps(), vec![NodeStep::Committed; 4]);
    let pauses = h
        .messages()
        .iter()
        .filter(|m| m.starts_with("wave pause over"))
        .count();
    assert_eq!(pauses, 2, "{:#?}", h.messages());
    h.check();
}

#[test]
fn a_node_failing_its_wave_pause_rolls_back_every_touched_node() {
    let mut h = paused_waves();
    h.run_to_upgrading();
    run_until(&mut h, |h| h.step("n2") == NodeStep::Upgraded);
    let hold = h.issue();
    h.fail(
        hold[0].seq,
        "unhealthy on 1 probes in a row; last: http check: 503",
    );
    assert_eq!(h.phase(), Phase::RollingBack);
    assert!(h.has_event(
        "n1: wave pause on 4.2.1 (30s) failed: unhealthy on 1 probes in a row; last: http check: 503"
    ));
    // n2's hold was cancelled; wave b never started.
    assert!(h.r.in_flight().iter().all(|a| a.seq != hold[1].seq));
    h.run_ok();
    assert_eq!(h.phase(), Phase::RolledBack, "{:#?}", h.messages());
    assert_eq!(h.step("n1"), NodeStep::RolledBack);
    assert_eq!(h.step("n2"), NodeStep::RolledBack);
    assert_eq!(h.step("n3"), NodeStep::Staged);
    h.check();
}

#[test]
fn a_paused_wave_pause_failure_is_retried_and_the_pause_completes_before_the_next_wave() {
    let mut h = paused_waves();
    h.r = Rollout::new(RolloutSpec {
        on_failure: OnFailure::Pause,
        ..h.r.spec().clone()
    })
    .unwrap();
    h.run_to_upgrading();
    run_until(&mut h, |h| h.step("n2") == NodeStep::Upgraded);
    let hold = h.issue();
    h.done(hold[0].seq);
    h.fail(hold[1].seq, "unhealthy on 1 probes in a row");
    assert_eq!(h.phase(), Phase::Paused);
    h.cmd(Command::Resume).unwrap();
    // n2 gets its own gate again, then the pause it missed; n1's pause stands.
    let again = h.issue();
    assert_eq!(gates(&again), [("n2".to_string(), 0, 1_000, 3)]);
    h.done(again[0].seq);
    let hold = h.issue();
    assert_eq!(gates(&hold), [gate("n2", 30_000)]);
    h.done(hold[0].seq);
    assert_eq!(kinds(&h.issue()), [("n3".to_string(), "install")]);
    h.check();
}

#[test]
fn with_promote_each_wave_the_pause_comes_first_then_the_promotion() {
    let mut h = paused_waves();
    h.r = Rollout::new(RolloutSpec {
        promote_each_wave: true,
        ..h.r.spec().clone()
    })
    .unwrap();
    h.run_to_upgrading();
    run_until(&mut h, |h| h.step("n2") == NodeStep::Upgraded);
    assert!(!h.r.awaiting_promotion(), "the pause comes first");
    for a in h.issue() {
        h.done(a.seq);
    }
    assert!(h.has_event(
        "wave pause before wave zone=b over: every upgraded node stayed healthy for 30s"
    ));
    assert!(h.r.awaiting_promotion());
    assert!(h.issue().is_empty());
    h.cmd(Command::Promote).unwrap();
    assert_eq!(kinds(&h.issue()), [("n3".to_string(), "install")]);
    h.check();
}

#[test]
fn a_wave_pause_needs_waves_and_a_watch_needs_a_commit() {
    let mut s = spec(2);
    s.wave_pause_ms = 1_000;
    let err = Rollout::new(s).unwrap_err().to_string();
    assert!(err.contains("a wave pause needs waves"), "{err}");
    let mut s = spec(2);
    s.watch_after_commit_ms = 1_000;
    s.permanent = false;
    let err = Rollout::new(s).unwrap_err().to_string();
    assert!(
        err.contains("watching after the commit needs a commit"),
        "{err}"
    );
    let mut s = spec(2);
    s.watch_after_commit_ms = orch_types::rollout::MAX_BAKE_MS + 1;
    let err = Rollout::new(s).unwrap_err().to_string();
    assert!(err.contains("watch after commit"), "{err}");
}

fn watched(count: usize) -> H {
    let mut s = spec(count);
    s.watch_after_commit_ms = 300_000;
    H::new(s)
}

#[test]
fn after_the_commit_every_node_is_watched_before_the_rollout_succeeds() {
    let mut h = watched(3);
    h.run_to_upgrading();
    run_until(&mut h, |h| h.phase() == Phase::Watching);
    assert_eq!(h.steps(), vec![NodeStep::Committed; 3]);
    assert!(h.has_event(
        "watching every upgraded node for 5m after the commit: a failure rolls every node back to its previous release"
    ));
    let watch = h.issue();
    assert_eq!(
        gates(&watch),
        [
            gate("n1", 300_000),
            gate("n2", 300_000),
            gate("n3", 300_000)
        ]
    );
    h.done(watch[0].seq);
    h.done(watch[1].seq);
    assert_eq!(h.phase(), Phase::Watching, "n3 is still watched");
    h.done(watch[2].seq);
    assert!(h.has_event("n3: stayed healthy on 4.2.1 for the watch after the commit (5m)"));
    assert_eq!(h.phase(), Phase::Succeeded, "{:#?}", h.messages());
    assert_eq!(h.steps(), vec![NodeStep::Committed; 3]);
    h.check();
}

#[test]
fn a_watch_failure_downgrades_every_committed_node_to_its_previous_release() {
    let mut h = watched(3);
    h.run_to_upgrading();
    run_until(&mut h, |h| h.phase() == Phase::Watching);
    let watch = h.issue();
    h.done(watch[0].seq);
    h.fail(
        watch[2].seq,
        "unhealthy on 1 probes in a row; last: http check: 500",
    );
    assert_eq!(h.phase(), Phase::RollingBack);
    assert!(h.has_event(
        "n3: watch after the commit on 4.2.1 (5m) failed: unhealthy on 1 probes in a row"
    ));
    assert!(h.has_event(
        "rolling back 3 touched nodes (4.2.1 was committed: this rolls back a committed rollout) one at a time, most recently touched first: n3, n2, n1"
    ));
    // Every node gets the seed's downgrade to what it ran, then a gate on it.
    let undo = h.run_ok();
    let downgrades: Vec<String> = undo
        .iter()
        .filter_map(|a| match &a.kind {
            ActionKind::Downgrade { to } => Some(format!("{} {to}", a.node)),
            _ => None,
        })
        .collect();
    assert_eq!(downgrades, ["n3 4.2.0", "n2 4.2.0", "n1 4.2.0"]);
    assert_eq!(h.phase(), Phase::RolledBack, "{:#?}", h.messages());
    assert_eq!(h.steps(), vec![NodeStep::RolledBack; 3]);
    h.check();
}

#[test]
fn a_paused_watch_failure_is_watched_again_after_resume() {
    let mut s = spec(2);
    s.watch_after_commit_ms = 10_000;
    s.on_failure = OnFailure::Pause;
    let mut h = H::new(s);
    h.run_to_upgrading();
    run_until(&mut h, |h| h.phase() == Phase::Watching);
    let watch = h.issue();
    h.fail(watch[0].seq, "unhealthy on 1 probes in a row");
    h.done(watch[1].seq);
    assert_eq!(h.phase(), Phase::Paused);
    assert_eq!(h.r.working_phase(), Phase::Watching);
    h.cmd(Command::Resume).unwrap();
    let again = h.issue();
    assert_eq!(gates(&again), [gate("n1", 10_000)]);
    h.done(again[0].seq);
    assert_eq!(h.phase(), Phase::Succeeded, "{:#?}", h.messages());
    assert_eq!(h.steps(), vec![NodeStep::Committed; 2]);
    h.check();
}

#[test]
fn pruning_waits_for_the_watch() {
    let mut h = watched(2);
    h.r = Rollout::new(RolloutSpec {
        keep_releases: Some(2),
        ..h.r.spec().clone()
    })
    .unwrap();
    h.run_to_upgrading();
    run_until(&mut h, |h| h.phase() == Phase::Watching);
    let watch = h.issue();
    assert!(watch.iter().all(|a| a.kind.name() == "health_gate"));
    for a in &watch {
        h.done(a.seq);
    }
    assert_eq!(h.phase(), Phase::Pruning);
    h.check();
}
