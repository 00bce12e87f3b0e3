//! The baking phase: `--bake DUR` before the commit, and the final check of a rollout that
//! does not commit (`--no-permanent`).

mod common;

use common::*;
use orch_rollout::Command;
use orch_types::rollout::{NodeStep, OnFailure, Phase};

/// Upgrades every node (install + gate, all `Done`) and stops when the phase leaves upgrading.
fn upgrade_all(h: &mut H) {
    h.run_to_upgrading();
    while h.r.working_phase() == Phase::Upgrading {
        let a = h.issue();
        assert!(!a.is_empty(), "upgrading stalled: {:#?}", h.messages());
        for x in a {
            h.done(x.seq);
        }
    }
}

/// Regression (container chaos seed 12139822500439127983): a `--no-permanent` rollout ended
/// `succeeded` although a node had restarted after its gate and booted its permanent (old)
/// release. Now every node is checked again, all at once, before the rollout ends, and a node
/// that no longer runs the target fails the rollout by its failure policy.
#[test]
fn no_permanent_checks_every_node_again_before_it_ends() {
    let mut s = spec(3);
    s.permanent = false;
    let mut h = H::new(s);
    upgrade_all(&mut h);
    assert_eq!(h.phase(), Phase::Baking);
    assert!(
        h.has_event("all 3 nodes upgraded and healthy; checking that every node still runs 4.2.1")
    );
    let checks = h.issue();
    // One healthy probe with the spec's failure threshold, on every node at once.
    assert_eq!(
        gates(&checks),
        ["n1", "n2", "n3"].map(|n| (n.to_string(), 0, 1_000, 3))
    );
    h.done(checks[0].seq);
    h.done(checks[2].seq);
    assert_eq!(h.phase(), Phase::Baking, "n2's check is still out");
    h.fail(
        checks[1].seq,
        "unhealthy on 3 probes in a row; last: version check: runs 4.2.0, expected 4.2.1",
    );
    assert_eq!(h.phase(), Phase::RollingBack);
    assert!(h.has_event(
        "n2: final check that it still runs 4.2.1 failed: unhealthy on 3 probes in a row"
    ));
    h.run_ok();
    assert_eq!(h.phase(), Phase::RolledBack, "{:#?}", h.messages());
    assert_eq!(h.steps(), vec![NodeStep::RolledBack; 3]);
    h.check();
}

#[test]
fn no_permanent_succeeds_once_every_final_check_passed() {
    let mut s = spec(2);
    s.permanent = false;
    let mut h = H::new(s);
    upgrade_all(&mut h);
    let checks = h.issue();
    assert_eq!(checks.len(), 2);
    h.done(checks[1].seq);
    assert_eq!(h.phase(), Phase::Baking);
    h.done(checks[0].seq);
    assert_eq!(h.phase(), Phase::Succeeded, "{:#?}", h.messages());
    assert!(h.has_event("n1: still runs 4.2.1, healthy"));
    assert_eq!(h.steps(), vec![NodeStep::Upgraded; 2]);
    h.check();
}

#[test]
fn a_bake_probes_every_node_for_its_whole_length_before_the_commit() {
    let mut s = spec(3);
    s.bake_ms = 90_000;
    s.batch_size = 2;
    let mut h = H::new(s);
    upgrade_all(&mut h);
    assert_eq!(h.phase(), Phase::Baking);
    assert!(h.has_event(
        "all 3 nodes upgraded and healthy; baking 4.2.1 for 1m30s: every node must stay healthy before it is made permanent"
    ));
    let bake = h.issue();
    // The whole bake healthy, any unhealthy answer fails at once, deadline bake + gate deadline.
    assert_eq!(
        gates(&bake),
        ["n1", "n2", "n3"].map(|n| (n.to_string(), 90_000, 91_000, 1))
    );
    // Nothing is committed while any node still bakes.
    for a in &bake[..2] {
        h.done(a.seq);
        assert!(h.issue().is_empty());
    }
    h.done(bake[2].seq);
    assert!(h.has_event("n3: stayed healthy on 4.2.1 for the bake (1m30s)"));
    assert_eq!(h.phase(), Phase::Committing);
    let all = h.run_ok();
    assert_eq!(all.len(), 3);
    assert!(all.iter().all(|a| a.kind.name() == "commit"));
    assert_eq!(h.phase(), Phase::Succeeded);
    assert_eq!(h.steps(), vec![NodeStep::Committed; 3]);
    h.check();
}

#[test]
fn a_bake_failure_rolls_back_every_node_and_cancels_the_other_bakes() {
    let mut s = spec(3);
    s.bake_ms = 60_000;
    let mut h = H::new(s);
    upgrade_all(&mut h);
    let bake = h.issue();
    h.done(bake[0].seq);
    h.fail(
        bake[1].seq,
        "unhealthy on 1 probes in a row; last: http check: 503",
    );
    assert_eq!(h.phase(), Phase::RollingBack);
    assert!(h.has_event("n2: bake on 4.2.1 (1m) failed: unhealthy on 1 probes in a row"));
    // n3's bake was cancelled: its late answer changes nothing.
    assert!(h.r.in_flight().iter().all(|a| a.seq != bake[2].seq));
    h.run_ok();
    assert_eq!(h.phase(), Phase::RolledBack, "{:#?}", h.messages());
    assert_eq!(h.steps(), vec![NodeStep::RolledBack; 3]);
    h.check();
}

#[test]
fn a_paused_bake_failure_is_retried_by_resume_and_the_bake_goes_on() {
    let mut s = spec(2);
    s.bake_ms = 5_000;
    s.on_failure = OnFailure::Pause;
    let mut h = H::new(s);
    upgrade_all(&mut h);
    let bake = h.issue();
    h.fail(bake[0].seq, "unhealthy on 1 probes in a row");
    assert_eq!(h.phase(), Phase::Paused);
    assert_eq!(h.r.working_phase(), Phase::Baking);
    // The other node's bake goes on while paused; its answer is taken.
    h.done(bake[1].seq);
    assert!(h.issue().is_empty(), "nothing is issued while paused");
    h.cmd(Command::Resume).unwrap();
    let again = h.issue();
    assert_eq!(gates(&again), [("n1".to_string(), 5_000, 6_000, 1)]);
    h.done(again[0].seq);
    assert_eq!(h.phase(), Phase::Committing);
    h.run_ok();
    assert_eq!(h.phase(), Phase::Succeeded);
    h.check();
}

#[test]
fn a_bake_that_is_unreasonably_long_is_refused() {
    let mut s = spec(1);
    s.bake_ms = orch_types::rollout::MAX_BAKE_MS + 1;
    let err = orch_rollout::Rollout::new(s).unwrap_err();
    assert!(err.to_string().contains("bake time"), "{err}");
}
