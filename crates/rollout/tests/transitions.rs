//! Every phase transition and every failure point of the rollout machine, one scenario each.

mod common;

use common::node::Node;
use common::*;
use orch_rollout::{
    Action, ActionKind, ActionResult, Command, Event, LogEntry, Outcome, Rejected, Rollout,
};
use orch_types::Version;
use orch_types::rollout::{NodeCount, NodeStep, OnFailure, PackageRef, Phase, SpecError, Wave};

fn seqs(actions: &[Action]) -> Vec<u64> {
    actions.iter().map(|a| a.seq).collect()
}

fn k(node: &str, kind: &'static str) -> (String, &'static str) {
    (node.to_string(), kind)
}

// ----- creation -----

#[test]
fn new_refuses_an_invalid_spec() {
    let mut s = spec(2);
    s.batch_size = 0;
    assert_eq!(Rollout::new(s).unwrap_err(), SpecError::ZeroBatchSize);
    let mut s = spec(2);
    s.nodes.push(n("n1"));
    assert_eq!(
        Rollout::new(s).unwrap_err(),
        SpecError::DuplicateNode(n("n1"))
    );
}

#[test]
fn a_new_rollout_is_pending_and_idle() {
    let h = H::new(spec(3));
    assert_eq!(h.phase(), Phase::Pending);
    assert!(h.r.in_flight().is_empty());
    assert!(h.r.events().is_empty());
    assert!(!h.r.awaiting_promotion());
    assert_eq!(h.steps(), vec![NodeStep::Pending; 3]);
    assert!(h.r.nodes().all(|p| p.from_version.is_none()));
    assert_eq!(h.r.next_seq(), 1);
}

// ----- preflight -----

#[test]
fn first_issue_starts_preflight_on_every_node() {
    let mut h = H::new(spec(3));
    let a = h.issue();
    assert_eq!(h.phase(), Phase::Preflight);
    assert_eq!(seqs(&a), vec![1, 2, 3]);
    assert!(a.iter().all(|a| a.kind == ActionKind::Preflight));
    assert_eq!(
        a.iter().map(|a| a.node.as_str()).collect::<Vec<_>>(),
        ["n1", "n2", "n3"]
    );
    assert!(h.has_event("rollout r1 started: 4.2.1 on 3 nodes in order n1, n2, n3"));
    assert!(h.has_event("requested by alice"));
    // Everything is in flight: nothing more to issue until answers come.
    assert!(h.r.next_actions().is_empty());
    assert!(h.apply(Event::IssueActions).unwrap().is_ignored());
    h.check();
}

#[test]
fn preflight_ok_records_from_version_and_moves_to_staging() {
    let mut h = H::new(spec(2));
    let a = h.issue();
    h.preflight(a[0].seq, "4.2.0");
    assert_eq!(h.phase(), Phase::Preflight);
    assert_eq!(h.step("n1"), NodeStep::PreflightOk);
    assert_eq!(h.r.node(&n("n1")).unwrap().from_version, Some(v("4.2.0")));
    h.preflight(a[1].seq, "4.2.0");
    assert_eq!(h.phase(), Phase::Staging);
    assert!(h.has_event("n1: preflight ok: runs 4.2.0"));
    assert!(h.has_event("preflight passed: 2 nodes to upgrade; staging 4.2.1"));
    h.check();
}

#[test]
fn preflight_failure_aborts_touching_nothing_and_names_node_and_reason() {
    let mut h = H::new(spec(3));
    let a = h.issue();
    h.preflight(a[0].seq, "4.2.0");
    h.fail(a[1].seq, "agent unreachable: connection refused");
    // Waits for every answer so that the refusal lists every problem at once.
    assert_eq!(h.phase(), Phase::Preflight);
    h.preflight(a[2].seq, "4.2.0");
    assert_eq!(h.phase(), Phase::Aborted);
    let err = h.r.error().unwrap();
    assert!(err.contains("nothing was touched"), "{err}");
    assert!(
        err.contains("n2: preflight failed: agent unreachable: connection refused"),
        "{err}"
    );
    assert_eq!(h.step("n2"), NodeStep::Failed);
    assert!(h.r.next_actions().is_empty());
    assert!(h.r.touched().is_empty());
    h.check();
}

#[test]
fn preflight_lists_every_refusal() {
    let mut h = H::new(spec(3));
    let a = h.issue();
    h.fail(a[0].seq, "timeout");
    h.preflight(a[1].seq, "4.2.0");
    h.preflight(a[2].seq, "4.1.9");
    assert_eq!(h.phase(), Phase::Aborted);
    let err = h.r.error().unwrap();
    assert!(err.contains("n1: preflight failed: timeout"), "{err}");
    assert!(err.contains("n3: cannot hop from 4.1.9 to 4.2.1"), "{err}");
    h.check();
}

#[test]
fn wrong_hop_aborts_naming_both_versions() {
    for running in ["4.1.0", "5.2.0", "3.2.1"] {
        let mut h = H::new(spec(1));
        h.preflight_all(&[running]);
        assert_eq!(h.phase(), Phase::Aborted);
        let err = h.r.error().unwrap();
        assert!(
            err.contains(&format!("cannot hop from {running} to 4.2.1")),
            "{err}"
        );
        assert!(err.contains("patch-level"), "{err}");
        let node = h.r.node(&n("n1")).unwrap();
        assert_eq!(node.from_version, Some(v(running)));
        assert!(node.error.as_deref().unwrap().contains(running));
        h.check();
    }
}

#[test]
fn lower_patch_target_is_a_valid_hop() {
    let mut h = H::new(spec(1));
    h.preflight_all(&["4.2.5"]);
    assert_eq!(h.phase(), Phase::Staging);
}

#[test]
fn not_enough_disk_aborts() {
    let mut s = spec(2);
    s.package = Some(PackageRef {
        name: "emqx".into(),
        version: v(TARGET),
        sha256: "0".repeat(64),
        size: 100,
    });
    let mut h = H::new(s);
    assert_eq!(h.r.required_free_disk(), Some(200));
    let a = h.issue();
    h.result(
        a[0].seq,
        ActionResult::Preflight {
            running: v(FROM),
            free_disk: 200,
            releases: entries(&[(FROM, "permanent")]),
        },
    );
    h.result(
        a[1].seq,
        ActionResult::Preflight {
            running: v(FROM),
            free_disk: 199,
            releases: entries(&[(FROM, "permanent")]),
        },
    );
    assert_eq!(h.phase(), Phase::Aborted);
    assert_eq!(h.step("n1"), NodeStep::PreflightOk);
    let err = h.r.error().unwrap();
    assert!(
        err.contains("n2: not enough free disk: 199 bytes free, 200 needed"),
        "{err}"
    );
    h.check();
}

#[test]
fn nodes_already_on_target_are_skipped() {
    let mut h = H::new(spec(3));
    h.preflight_all(&["4.2.1", "4.2.0", "4.2.1"]);
    assert_eq!(h.phase(), Phase::Staging);
    assert_eq!(
        h.steps(),
        [NodeStep::Skipped, NodeStep::PreflightOk, NodeStep::Skipped]
    );
    assert!(h.has_event("n1: already runs 4.2.1 permanently: skipped"));
    assert!(h.has_event("1 node to upgrade (2 already on 4.2.1, skipped)"));
    let all = h.run_ok();
    assert_eq!(h.phase(), Phase::Succeeded);
    // Skipped nodes never get anything but their preflight.
    assert!(all.iter().all(|a| a.node.as_str() == "n2"));
    assert_eq!(
        h.steps(),
        [NodeStep::Skipped, NodeStep::Committed, NodeStep::Skipped]
    );
    h.check();
}

#[test]
fn all_skipped_succeeds_immediately() {
    let mut h = H::new(spec(3));
    h.preflight_all(&["4.2.1"; 3]);
    assert_eq!(h.phase(), Phase::Succeeded);
    assert!(h.has_event("every node already runs 4.2.1 permanently: nothing to do"));
    assert!(h.r.next_actions().is_empty());
    assert!(h.r.error().is_none());
    h.check();
}

/// Preflight answers without a release list (the Raft log of older clusters holds them) are
/// planned as before lists existed: a node on the target is skipped, the others staged.
#[test]
fn answers_without_releases_are_planned_as_before() {
    let mut h = H::new(spec(3));
    let a = h.issue();
    h.preflight_legacy(a[0].seq, "4.2.1");
    h.preflight_legacy(a[1].seq, "4.2.0");
    h.preflight_legacy(a[2].seq, "4.2.1");
    assert_eq!(
        h.steps(),
        [NodeStep::Skipped, NodeStep::PreflightOk, NodeStep::Skipped]
    );
    assert!(h.has_event("n1: already runs 4.2.1: skipped"));
    assert!(h.has_event("n2: preflight ok: runs 4.2.0, 1099511627776 bytes free"));
    // Its rollback is a downgrade to the version it ran.
    h.stage_all();
    let a = h.issue();
    h.fail(a[0].seq, "boom");
    let d = h.issue();
    assert_eq!(d[0].kind, ActionKind::Downgrade { to: v(FROM) });
    h.run_ok();
    assert_eq!(h.phase(), Phase::RolledBack);
    // Whether the skipped ones run it permanently is not known: the summary does not claim it.
    let mut h = H::new(spec(2));
    let a = h.issue();
    h.preflight_legacy(a[0].seq, "4.2.1");
    h.preflight_legacy(a[1].seq, "4.2.1");
    assert!(h.has_event("every node already runs 4.2.1: nothing to do"));
    let mut h = H::new(spec(2));
    let a = h.issue();
    h.preflight_legacy(a[0].seq, "4.2.1");
    h.preflight_legacy(a[1].seq, "4.2.0");
    h.run_ok();
    assert_eq!(h.phase(), Phase::Succeeded);
    let last = h.messages().pop().unwrap();
    assert_eq!(
        last,
        "all 2 nodes run 4.2.1: 1 made permanent by this rollout; 1 already ran it (their preflight did not list releases, so whether permanently is not known): skipped"
    );
    h.check();
}

#[test]
fn preflight_answered_with_done_is_rejected_without_change() {
    let mut h = H::new(spec(1));
    let a = h.issue();
    let err = h.apply(Event::Result {
        seq: a[0].seq,
        result: ActionResult::Done,
    });
    assert!(matches!(
        err,
        Err(Rejected::MismatchedResult { seq: 1, .. })
    ));
    assert_eq!(h.r.in_flight().len(), 1);
    // The real answer still counts.
    h.preflight(a[0].seq, FROM);
    assert_eq!(h.phase(), Phase::Staging);
    h.check();
}

#[test]
fn version_answer_for_a_non_preflight_is_rejected() {
    let mut h = H::new(spec(1));
    h.preflight_all(&[FROM]);
    let a = h.issue();
    let err = h
        .apply(Event::Result {
            seq: a[0].seq,
            result: ActionResult::Preflight {
                running: v(FROM),
                free_disk: 1,
                releases: Vec::new(),
            },
        })
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "result for action 2 (stage on n1) does not fit it: only a preflight is answered with a running version"
    );
    h.check();
}

// ----- waves, percentage batches, max unavailable -----

fn waves(s: &mut orch_types::rollout::RolloutSpec, groups: &[(&str, &[&str])]) {
    s.wave_by = Some("zone".into());
    s.waves = groups
        .iter()
        .map(|(value, ids)| Wave {
            label_value: value.to_string(),
            nodes: ids.iter().map(|i| n(i)).collect(),
        })
        .collect();
}

#[test]
fn waves_go_one_after_another_in_percentage_batches() {
    // Wave a: 4 nodes at 50% = 2 at a time; wave b: 1 node (50% of 1 rounds up to 1).
    let mut s = spec(5);
    waves(&mut s, &[("a", &["n1", "n2", "n3", "n4"]), ("b", &["n5"])]);
    s.batch_percent = Some(50);
    let mut h = H::new(s);
    h.run_to_upgrading();
    assert!(h.has_event(
        "all 5 nodes staged; upgrading 50% of each wave at a time, wave by wave (zone: a, b)"
    ));
    let a = h.issue();
    assert_eq!(kinds(&a), [k("n1", "install"), k("n2", "install")]);
    h.done(a[0].seq);
    h.done(a[1].seq);
    let g = h.issue();
    assert_eq!(kinds(&g), [k("n1", "health_gate"), k("n2", "health_gate")]);
    h.done(g[0].seq);
    assert!(h.issue().is_empty(), "n2 of the batch is not healthy yet");
    h.done(g[1].seq);
    let b = h.issue();
    assert_eq!(kinds(&b), [k("n3", "install"), k("n4", "install")]);
    h.done(b[0].seq);
    h.done(b[1].seq);
    let g = h.issue();
    h.done(g[0].seq);
    assert!(h.issue().is_empty(), "wave b waits for all of wave a");
    h.done(g[1].seq);
    assert_eq!(kinds(&h.issue()), [k("n5", "install")]);
    h.run_ok();
    assert_eq!(h.phase(), Phase::Succeeded);
    h.check();
}

#[test]
fn promote_each_wave_waits_between_waves_but_not_after_the_last() {
    let mut s = spec(3);
    waves(&mut s, &[("a", &["n1"]), ("b", &["n2"]), ("c", &["n3"])]);
    s.promote_each_wave = true;
    let mut h = H::new(s);
    h.run_to_upgrading();
    assert_eq!(
        kinds(&h.run_ok()),
        [k("n1", "install"), k("n1", "health_gate")]
    );
    assert!(h.r.awaiting_promotion());
    assert!(h.has_event(
        "wave zone=a upgraded and healthy on 4.2.1; waiting for promote before wave zone=b"
    ));
    match h.apply(Event::IssueActions).unwrap() {
        Outcome::Ignored { reason } => assert_eq!(
            reason,
            "nothing to issue: waiting for promote before wave zone=b"
        ),
        other => panic!("issued while waiting: {other:?}"),
    }
    h.cmd(Command::Promote).unwrap();
    assert!(h.has_event("wave zone=b promoted by alice: starting it"));
    assert_eq!(
        kinds(&h.run_ok()),
        [k("n2", "install"), k("n2", "health_gate")]
    );
    h.cmd(Command::Promote).unwrap();
    // After the last wave: straight to committing.
    h.run_ok();
    assert_eq!(h.phase(), Phase::Succeeded);
    assert!(!h.has_event("before wave zone=d"));
    h.check();
}

#[test]
fn max_unavailable_counts_mid_step_and_already_unhealthy_nodes() {
    // One batch of all 4, but at most 3 unavailable, and n4 (in the rollout) and x9 (not in
    // it) are unhealthy from the start: room for one healthy node (n1) besides n4 itself,
    // which is already counted. n2 starts once n4 is healthy on the target.
    let mut s = spec(4);
    s.batch_size = 4;
    s.max_unavailable = Some(NodeCount::Count(3));
    s.unhealthy_at_start = vec![n("n4"), n("x9")];
    let mut h = H::new(s.clone());
    h.run_to_upgrading();
    assert_eq!(h.r.unavailable_count(), 2);
    let a = h.issue();
    assert_eq!(kinds(&a), [k("n1", "install"), k("n4", "install")]);
    assert_eq!(h.r.unavailable_count(), 3);
    h.done(a[1].seq);
    let g = h.issue();
    assert_eq!(
        kinds(&g),
        [k("n4", "health_gate")],
        "n2 and n3 wait for room"
    );
    h.done(g[0].seq);
    assert_eq!(
        h.r.unavailable_count(),
        2,
        "n4 is healthy on the target now"
    );
    assert_eq!(kinds(&h.issue()), [k("n2", "install")]);
    h.run_ok();
    assert_eq!(h.phase(), Phase::Succeeded);
    h.check();

    // As many unhealthy as allowed: no node could ever start, so the spec is refused.
    s.max_unavailable = Some(NodeCount::Percent(50));
    assert!(matches!(
        orch_rollout::Rollout::new(s),
        Err(SpecError::NoRoomUnavailable { allowed: 2, .. })
    ));
}

// ----- staging -----

#[test]
fn staging_is_bounded_and_skips_skipped_nodes() {
    let mut s = spec(6);
    s.max_parallel_staging = 2;
    let mut h = H::new(s);
    h.preflight_all(&["4.2.0", "4.2.1", "4.2.0", "4.2.0", "4.2.0", "4.2.0"]);
    let a = h.issue();
    assert_eq!(kinds(&a), [k("n1", "stage"), k("n3", "stage")]);
    assert_eq!(h.step("n1"), NodeStep::Staging);
    assert!(h.issue().is_empty(), "bound reached");
    h.done(a[1].seq);
    assert_eq!(h.step("n3"), NodeStep::Staged);
    let b = h.issue();
    assert_eq!(kinds(&b), [k("n4", "stage")]);
    h.done(a[0].seq);
    h.done(b[0].seq);
    let c = h.issue();
    assert_eq!(kinds(&c), [k("n5", "stage"), k("n6", "stage")]);
    h.done(c[0].seq);
    assert_eq!(h.phase(), Phase::Staging);
    h.done(c[1].seq);
    assert_eq!(h.phase(), Phase::Upgrading);
    assert!(h.has_event("all 5 nodes staged; upgrading 1 at a time"));
    assert!(h.has_event("n5: staged 4.2.1"));
    h.check();
}

#[test]
fn stage_failure_with_rollback_policy_aborts_nothing_to_undo() {
    let mut h = H::new(spec(3));
    h.preflight_all(&[FROM; 3]);
    let a = h.issue();
    h.done(a[0].seq);
    let out = h.fail(a[1].seq, "no space left on device");
    assert_eq!(h.phase(), Phase::Aborted);
    // The stage still in flight is cancelled.
    assert_eq!(seqs(out.cancelled()), vec![a[2].seq]);
    let err = h.r.error().unwrap();
    assert!(
        err.contains("n2: staging 4.2.1 failed: no space left on device"),
        "{err}"
    );
    assert!(h.has_event("nothing to roll back"));
    assert!(h.r.touched().is_empty());
    // A late result for the cancelled stage changes nothing.
    assert!(h.done(a[2].seq).is_ignored());
    h.check();
}

#[test]
fn stage_failure_with_pause_policy_pauses_and_resume_retries_the_stage() {
    let mut s = spec(2);
    s.on_failure = OnFailure::Pause;
    let mut h = H::new(s);
    h.preflight_all(&[FROM; 2]);
    let a = h.issue();
    h.fail(a[0].seq, "disk full");
    assert_eq!(h.phase(), Phase::Paused);
    assert_eq!(h.r.working_phase(), Phase::Staging);
    assert!(
        h.r.error()
            .unwrap()
            .contains("n1: staging 4.2.1 failed: disk full")
    );
    // The other stage still completes while paused.
    h.done(a[1].seq);
    assert_eq!(h.step("n2"), NodeStep::Staged);
    assert!(h.issue().is_empty());
    h.cmd(Command::Resume).unwrap();
    assert!(h.has_event("retrying n1 (stage)"));
    assert!(h.r.error().is_none());
    assert_eq!(h.step("n1"), NodeStep::PreflightOk);
    let b = h.issue();
    assert_eq!(kinds(&b), [k("n1", "stage")]);
    h.done(b[0].seq);
    assert_eq!(h.phase(), Phase::Upgrading);
    h.run_ok();
    assert_eq!(h.phase(), Phase::Succeeded);
    h.check();
}

// ----- upgrading -----

#[test]
fn batch_size_one_upgrades_node_by_node_then_commits() {
    let mut h = H::new(spec(3));
    h.run_to_upgrading();
    for node in ["n1", "n2", "n3"] {
        let a = h.issue();
        assert_eq!(kinds(&a), [k(node, "install")]);
        assert_eq!(a[0].kind, ActionKind::Install { version: v(TARGET) });
        assert_eq!(h.step(node), NodeStep::Installing);
        h.done(a[0].seq);
        assert_eq!(h.step(node), NodeStep::Installed);
        let g = h.issue();
        assert_eq!(
            g[0].kind,
            ActionKind::HealthGate {
                min_healthy_time_ms: 0,
                healthy_deadline_ms: 1_000,
                expect: v(TARGET),
                failure_threshold: 3,
            }
        );
        assert_eq!(h.step(node), NodeStep::Verifying);
        h.done(g[0].seq);
        assert_eq!(h.step(node), NodeStep::Upgraded);
        assert!(h.has_event(&format!("{node}: installed 4.2.1 (not permanent yet)")));
        assert!(h.has_event(&format!("{node}: healthy on 4.2.1")));
    }
    assert_eq!(h.phase(), Phase::Committing);
    let c = h.issue();
    assert_eq!(
        kinds(&c),
        [k("n1", "commit"), k("n2", "commit"), k("n3", "commit")]
    );
    for a in &c {
        h.done(a.seq);
    }
    assert_eq!(h.phase(), Phase::Succeeded);
    assert_eq!(h.steps(), vec![NodeStep::Committed; 3]);
    assert!(h.has_event("all 3 nodes run 4.2.1 permanently"));
    assert!(h.r.error().is_none());
    assert_eq!(h.r.touched(), vec![n("n1"), n("n2"), n("n3")]);
    h.check();
}

#[test]
fn batch_size_two_waits_for_the_whole_batch() {
    let mut s = spec(5);
    s.batch_size = 2;
    let mut h = H::new(s);
    h.run_to_upgrading();
    let a = h.issue();
    assert_eq!(kinds(&a), [k("n1", "install"), k("n2", "install")]);
    h.done(a[0].seq);
    let g1 = h.issue();
    assert_eq!(kinds(&g1), [k("n1", "health_gate")]);
    h.done(g1[0].seq);
    // n1 healthy, n2 still installing: the next batch must not start.
    assert!(h.issue().is_empty());
    h.done(a[1].seq);
    let g2 = h.issue();
    assert_eq!(kinds(&g2), [k("n2", "health_gate")]);
    h.done(g2[0].seq);
    let b = h.issue();
    assert_eq!(kinds(&b), [k("n3", "install"), k("n4", "install")]);
    for x in &b {
        h.done(x.seq);
    }
    let g = h.issue();
    assert_eq!(kinds(&g), [k("n3", "health_gate"), k("n4", "health_gate")]);
    for x in &g {
        h.done(x.seq);
    }
    assert_eq!(kinds(&h.issue()), [k("n5", "install")]);
    h.check();
}

#[test]
fn batch_size_larger_than_cluster_installs_everything_at_once() {
    let mut s = spec(4);
    s.batch_size = 100;
    let mut h = H::new(s);
    h.run_to_upgrading();
    let a = h.issue();
    assert_eq!(a.len(), 4);
    assert!(a.iter().all(|a| a.kind.name() == "install"));
    h.run_ok();
    assert_eq!(h.phase(), Phase::Succeeded);
    h.check();
}

#[test]
fn skipped_nodes_do_not_take_a_batch_slot() {
    let mut s = spec(4);
    s.batch_size = 2;
    let mut h = H::new(s);
    h.preflight_all(&["4.2.1", "4.2.0", "4.2.1", "4.2.0"]);
    h.stage_all();
    assert_eq!(kinds(&h.issue()), [k("n2", "install"), k("n4", "install")]);
}

fn install_fail_at(position: usize) {
    let mut h = H::new(spec(4));
    h.run_to_upgrading();
    let nodes = ["n1", "n2", "n3", "n4"];
    for node in &nodes[..position] {
        let a = h.issue();
        h.done(a[0].seq);
        let g = h.issue();
        h.done(g[0].seq);
        assert_eq!(h.step(node), NodeStep::Upgraded);
    }
    let failing = nodes[position];
    let a = h.issue();
    assert_eq!(kinds(&a), [k(failing, "install")]);
    h.fail(a[0].seq, "activation hook exited with 1");
    assert_eq!(h.phase(), Phase::RollingBack);
    let err = h.r.error().unwrap();
    assert!(
        err.contains(&format!(
            "{failing}: install of 4.2.1 failed: activation hook exited with 1"
        )),
        "{err}"
    );
    // Every touched node, failed one first (newest install), one at a time, each gated.
    let mut downgraded = Vec::new();
    loop {
        let d = h.issue();
        if d.is_empty() {
            break;
        }
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].kind, ActionKind::Downgrade { to: v(FROM) });
        assert_eq!(h.step(d[0].node.as_str()), NodeStep::RollingBack);
        h.done(d[0].seq);
        let g = h.issue();
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].node, d[0].node);
        assert_eq!(
            g[0].kind,
            ActionKind::HealthGate {
                min_healthy_time_ms: 0,
                healthy_deadline_ms: 1_000,
                expect: v(FROM),
                failure_threshold: 3,
            }
        );
        h.done(g[0].seq);
        downgraded.push(d[0].node.to_string());
    }
    let expected: Vec<String> = nodes[..=position]
        .iter()
        .rev()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(downgraded, expected);
    assert_eq!(h.phase(), Phase::RolledBack);
    for node in &nodes[..=position] {
        assert_eq!(h.step(node), NodeStep::RolledBack);
    }
    for node in &nodes[position + 1..] {
        assert_eq!(
            h.step(node),
            NodeStep::Staged,
            "untouched nodes stay staged"
        );
    }
    assert!(h.has_event(&format!("all {} touched node", position + 1)));
    h.check();
}

#[test]
fn install_failure_on_first_node_rolls_back_only_it() {
    install_fail_at(0);
}

#[test]
fn install_failure_on_middle_node_rolls_back_in_reverse_order() {
    install_fail_at(2);
}

#[test]
fn install_failure_on_last_node_rolls_back_everything() {
    install_fail_at(3);
}

#[test]
fn health_gate_failure_rolls_back_with_the_probe_message() {
    let mut h = H::new(spec(2));
    h.run_to_upgrading();
    let a = h.issue();
    h.done(a[0].seq);
    let g = h.issue();
    h.fail(g[0].seq, "probe reported 4.2.0");
    assert_eq!(h.phase(), Phase::RollingBack);
    assert_eq!(h.step("n1"), NodeStep::Failed);
    assert!(h.has_event("n1: health gate on 4.2.1 failed: probe reported 4.2.0"));
    assert!(
        h.has_event("rolling back 1 touched node one at a time, most recently touched first: n1")
    );
    h.run_ok();
    assert_eq!(h.phase(), Phase::RolledBack);
    assert_eq!(h.step("n1"), NodeStep::RolledBack);
    assert_eq!(h.step("n2"), NodeStep::Staged);
    assert!(h.has_event("n1: rolled back to 4.2.0 and healthy"));
    // The error keeps the original cause.
    assert!(h.r.error().unwrap().contains("probe reported 4.2.0"));
    h.check();
}

#[test]
fn failure_in_a_batch_cancels_gates_and_waits_for_installs() {
    let mut s = spec(3);
    s.batch_size = 3;
    let mut h = H::new(s);
    h.run_to_upgrading();
    let a = h.issue();
    h.done(a[0].seq); // n1 installed
    h.done(a[1].seq); // n2 installed
    let g = h.issue(); // gates on n1, n2; n3 still installing
    assert_eq!(kinds(&g), [k("n1", "health_gate"), k("n2", "health_gate")]);
    let out = h.fail(g[0].seq, "probe failing");
    assert_eq!(h.phase(), Phase::RollingBack);
    // n2's gate no longer matters; n3's install must finish before anything is downgraded.
    assert_eq!(seqs(out.cancelled()), vec![g[1].seq]);
    assert_eq!(h.step("n2"), NodeStep::Installed);
    assert_eq!(h.r.in_flight().len(), 1);
    assert!(h.issue().is_empty(), "waits for n3's install");
    assert!(
        h.done(g[1].seq).is_ignored(),
        "cancelled gate result ignored"
    );
    h.done(a[2].seq);
    assert_eq!(h.step("n3"), NodeStep::Installed);
    let mut order = Vec::new();
    while h.phase() == Phase::RollingBack {
        let d = h.issue();
        order.push(d[0].node.to_string());
        h.done(d[0].seq);
        let g = h.issue();
        h.done(g[0].seq);
    }
    assert_eq!(order, ["n3", "n2", "n1"]);
    assert_eq!(h.phase(), Phase::RolledBack);
    h.check();
}

#[test]
fn failed_in_flight_install_during_rollback_is_still_rolled_back() {
    let mut s = spec(2);
    s.batch_size = 2;
    let mut h = H::new(s);
    h.run_to_upgrading();
    let a = h.issue();
    h.fail(a[0].seq, "boom");
    assert_eq!(h.phase(), Phase::RollingBack);
    h.fail(a[1].seq, "boom too");
    assert_eq!(h.phase(), Phase::RollingBack, "no second policy decision");
    assert_eq!(h.step("n2"), NodeStep::Failed);
    let d = h.issue();
    assert_eq!(kinds(&d), [k("n2", "downgrade")]);
    h.run_ok();
    assert_eq!(h.phase(), Phase::RolledBack);
    h.check();
}

// ----- committing -----

#[test]
fn commit_failure_rolls_back_every_touched_node_including_committed_ones() {
    let mut h = H::new(spec(3));
    h.run_to_upgrading();
    for _ in 0..3 {
        let a = h.issue();
        h.done(a[0].seq);
        let g = h.issue();
        h.done(g[0].seq);
    }
    assert_eq!(h.phase(), Phase::Committing);
    let c = h.issue();
    h.done(c[0].seq);
    h.done(c[2].seq);
    h.fail(c[1].seq, "fsync: input/output error");
    assert_eq!(h.phase(), Phase::RollingBack);
    assert!(
        h.r.error()
            .unwrap()
            .contains("n2: making 4.2.1 permanent failed: fsync: input/output error")
    );
    let all = h.run_ok();
    let downgrades: Vec<&str> = all
        .iter()
        .filter(|a| a.kind.name() == "downgrade")
        .map(|a| a.node.as_str())
        .collect();
    assert_eq!(downgrades, ["n3", "n2", "n1"]);
    assert_eq!(h.phase(), Phase::RolledBack);
    h.check();
}

#[test]
fn commit_failure_with_pause_policy_retries_the_commit() {
    let mut s = spec(2);
    s.on_failure = OnFailure::Pause;
    let mut h = H::new(s);
    h.run_to_upgrading();
    for _ in 0..2 {
        let a = h.issue();
        h.done(a[0].seq);
        let g = h.issue();
        h.done(g[0].seq);
    }
    let c = h.issue();
    h.fail(c[0].seq, "read-only file system");
    assert_eq!(h.phase(), Phase::Paused);
    assert_eq!(h.r.working_phase(), Phase::Committing);
    h.done(c[1].seq);
    h.cmd(Command::Resume).unwrap();
    assert_eq!(h.step("n1"), NodeStep::Upgraded);
    let r = h.issue();
    assert_eq!(kinds(&r), [k("n1", "commit")]);
    h.done(r[0].seq);
    assert_eq!(h.phase(), Phase::Succeeded);
    h.check();
}

#[test]
fn no_permanent_succeeds_after_upgrading_without_commits() {
    let mut s = spec(2);
    s.permanent = false;
    let mut h = H::new(s);
    let all = h.run_ok();
    assert_eq!(h.phase(), Phase::Succeeded);
    assert!(all.iter().all(|a| a.kind.name() != "commit"));
    assert_eq!(h.steps(), vec![NodeStep::Upgraded; 2]);
    assert!(h.has_event("not made permanent"));
    h.check();
}

// ----- rollback failures -----

#[test]
fn downgrade_failure_continues_and_ends_rollback_failed_naming_the_node() {
    let mut h = H::new(spec(3));
    h.run_to_upgrading();
    for _ in 0..2 {
        let a = h.issue();
        h.done(a[0].seq);
        let g = h.issue();
        h.done(g[0].seq);
    }
    let a = h.issue();
    h.done(a[0].seq);
    let g = h.issue();
    h.fail(g[0].seq, "probe timeout");
    // n3 first: its downgrade fails; n2 and n1 are still rolled back.
    let d3 = h.issue();
    assert_eq!(kinds(&d3), [k("n3", "downgrade")]);
    h.fail(d3[0].seq, "release 4.2.0 missing");
    assert_eq!(h.step("n3"), NodeStep::RollbackFailed);
    assert_eq!(h.phase(), Phase::RollingBack);
    let d2 = h.issue();
    assert_eq!(kinds(&d2), [k("n2", "downgrade")]);
    h.done(d2[0].seq);
    let g2 = h.issue();
    h.done(g2[0].seq);
    let d1 = h.issue();
    assert_eq!(kinds(&d1), [k("n1", "downgrade")]);
    h.done(d1[0].seq);
    let g1 = h.issue();
    h.done(g1[0].seq);
    assert_eq!(h.phase(), Phase::RollbackFailed);
    let err = h.r.error().unwrap();
    assert!(
        err.contains("n3: health gate on 4.2.1 failed: probe timeout"),
        "{err}"
    );
    assert!(
        err.contains("rollback failed on n3 (downgrade to 4.2.0 failed: release 4.2.0 missing): this node needs a person"),
        "{err}"
    );
    assert_eq!(
        h.steps(),
        [
            NodeStep::RolledBack,
            NodeStep::RolledBack,
            NodeStep::RollbackFailed
        ]
    );
    h.check();
}

/// `rollback` again after `rollback_failed` (someone fixed the node): only the failed node's
/// undo step is issued again; when it succeeds the rollout ends `rolled_back`, its error the
/// original cause. A second failure ends `rollback_failed` again, and a retry is possible
/// again.
#[test]
fn rollback_failed_is_retried_by_rollback_again() {
    let mut h = H::new(spec(2));
    h.run_to_upgrading();
    let a = h.issue();
    h.done(a[0].seq);
    let g = h.issue();
    h.done(g[0].seq);
    let a = h.issue();
    h.done(a[0].seq);
    let g = h.issue();
    h.fail(g[0].seq, "probe timeout");
    let d2 = h.issue();
    assert_eq!(kinds(&d2), [k("n2", "downgrade")]);
    h.fail(d2[0].seq, "agent unreachable");
    let d1 = h.issue();
    assert_eq!(kinds(&d1), [k("n1", "downgrade")]);
    h.done(d1[0].seq);
    let g1 = h.issue();
    h.done(g1[0].seq);
    assert_eq!(h.phase(), Phase::RollbackFailed);
    assert!(h.issue().is_empty());

    for attempt in 0..2 {
        h.cmd(Command::Rollback).unwrap();
        assert_eq!(h.phase(), Phase::RollingBack);
        assert_eq!(h.step("n1"), NodeStep::RolledBack);
        assert!(h.has_event("rollback retried by alice: rolling back n2 again"));
        let err = h.r.error().unwrap();
        assert!(!err.contains("rollback failed on"), "{err}");
        assert!(err.contains("probe timeout"), "{err}");
        let d = h.issue();
        assert_eq!(kinds(&d), [k("n2", "downgrade")], "only n2 again");
        if attempt == 0 {
            h.fail(d[0].seq, "still unreachable");
            assert_eq!(h.phase(), Phase::RollbackFailed);
            assert!(
                h.r.error().unwrap().contains(
                    "rollback failed on n2 (downgrade to 4.2.0 failed: still unreachable)"
                )
            );
            continue;
        }
        h.done(d[0].seq);
        let g = h.issue();
        assert_eq!(kinds(&g), [k("n2", "health_gate")]);
        h.done(g[0].seq);
    }
    assert_eq!(h.phase(), Phase::RolledBack);
    assert_eq!(h.steps(), [NodeStep::RolledBack, NodeStep::RolledBack]);
    assert!(h.r.error().unwrap().contains("probe timeout"));
    // Ended for good now.
    assert!(matches!(
        h.cmd(Command::Rollback),
        Err(Rejected::Ended { .. })
    ));
    h.check();
}

#[test]
fn rollback_health_gate_failure_is_a_rollback_failure() {
    let mut s = spec(2);
    s.batch_size = 2;
    let mut h = H::new(s);
    h.run_to_upgrading();
    let a = h.issue();
    h.done(a[0].seq);
    h.fail(a[1].seq, "x");
    let d = h.issue();
    assert_eq!(kinds(&d), [k("n2", "downgrade")]);
    h.done(d[0].seq);
    let g = h.issue();
    h.fail(g[0].seq, "probe reported 4.2.1");
    let d = h.issue();
    assert_eq!(kinds(&d), [k("n1", "downgrade")]);
    h.done(d[0].seq);
    let g = h.issue();
    h.fail(g[0].seq, "connection refused");
    assert_eq!(h.phase(), Phase::RollbackFailed);
    let err = h.r.error().unwrap();
    assert!(err.contains("rollback failed on n2 (health gate on 4.2.0 after downgrade failed: probe reported 4.2.1), n1 (health gate on 4.2.0 after downgrade failed: connection refused): these nodes need a person"), "{err}");
    h.check();
}

// ----- canary -----

#[test]
fn canary_waits_for_promote_then_continues() {
    let mut s = spec(4);
    s.canary = 1;
    s.batch_size = 2;
    let mut h = H::new(s);
    h.run_to_upgrading();
    assert!(h.has_event("waiting for promote after the first 1"));
    let a = h.issue();
    assert_eq!(
        kinds(&a),
        [k("n1", "install")],
        "the canary is its own batch"
    );
    h.done(a[0].seq);
    let g = h.issue();
    assert!(!h.r.awaiting_promotion());
    h.done(g[0].seq);
    assert!(h.r.awaiting_promotion());
    assert_eq!(h.phase(), Phase::Upgrading);
    assert!(h.has_event("canary n1 upgraded and healthy on 4.2.1; waiting for promote"));
    assert!(h.r.next_actions().is_empty());
    assert!(h.apply(Event::IssueActions).unwrap().is_ignored());
    assert!(h.r.summary().contains("waiting for promote"));
    h.cmd(Command::Promote).unwrap();
    assert!(!h.r.awaiting_promotion());
    assert!(h.has_event("canary promoted by alice: continuing with the remaining 3 nodes"));
    assert_eq!(kinds(&h.issue()), [k("n2", "install"), k("n3", "install")]);
    h.run_ok();
    assert_eq!(h.phase(), Phase::Succeeded);
    // Promote is a one-time thing.
    assert!(matches!(
        h.cmd(Command::Promote),
        Err(Rejected::Ended { .. })
    ));
    h.check();
}

#[test]
fn canary_larger_than_a_batch_is_chunked_by_batch_size() {
    let mut s = spec(5);
    s.canary = 3;
    s.batch_size = 2;
    let mut h = H::new(s);
    h.run_to_upgrading();
    let mut batches = Vec::new();
    while !h.r.awaiting_promotion() {
        let a = h.issue();
        batches.push(a.iter().map(|a| a.node.to_string()).collect::<Vec<_>>());
        for x in &a {
            h.done(x.seq);
        }
        for x in &h.issue() {
            h.done(x.seq);
        }
    }
    assert_eq!(batches, [vec!["n1", "n2"], vec!["n3"]]);
    h.cmd(Command::Promote).unwrap();
    assert_eq!(kinds(&h.issue()), [k("n4", "install"), k("n5", "install")]);
}

#[test]
fn canary_covering_every_node_waits_before_committing() {
    let mut s = spec(2);
    s.canary = 2;
    s.batch_size = 2;
    let mut h = H::new(s);
    h.run_ok();
    assert_eq!(h.phase(), Phase::Upgrading);
    assert!(h.r.awaiting_promotion());
    h.cmd(Command::Promote).unwrap();
    assert_eq!(h.phase(), Phase::Committing);
    h.run_ok();
    assert_eq!(h.phase(), Phase::Succeeded);
    h.check();
}

#[test]
fn canary_counts_only_nodes_that_need_the_upgrade() {
    let mut s = spec(3);
    s.canary = 1;
    let mut h = H::new(s);
    h.preflight_all(&["4.2.1", "4.2.0", "4.2.0"]);
    h.stage_all();
    let a = h.issue();
    assert_eq!(kinds(&a), [k("n2", "install")]);
    h.done(a[0].seq);
    let g = h.issue();
    h.done(g[0].seq);
    assert!(h.r.awaiting_promotion());
}

#[test]
fn canary_failure_rolls_back_without_waiting_for_promote() {
    let mut s = spec(3);
    s.canary = 1;
    let mut h = H::new(s);
    h.run_to_upgrading();
    let a = h.issue();
    h.done(a[0].seq);
    let g = h.issue();
    h.fail(g[0].seq, "unhealthy");
    assert_eq!(h.phase(), Phase::RollingBack);
    assert!(!h.r.awaiting_promotion());
    h.run_ok();
    assert_eq!(h.phase(), Phase::RolledBack);
    h.check();
}

#[test]
fn rollback_while_awaiting_promotion() {
    let mut s = spec(3);
    s.canary = 1;
    let mut h = H::new(s);
    h.run_ok();
    assert!(h.r.awaiting_promotion());
    h.cmd(Command::Rollback).unwrap();
    assert!(!h.r.awaiting_promotion());
    assert_eq!(h.phase(), Phase::RollingBack);
    assert!(matches!(
        h.cmd(Command::Promote),
        Err(Rejected::NotAwaitingPromotion)
    ));
    h.run_ok();
    assert_eq!(h.phase(), Phase::RolledBack);
    assert_eq!(h.r.touched(), vec![n("n1")]);
    h.check();
}

#[test]
fn promote_is_rejected_unless_awaiting() {
    let mut h = H::new(spec(2));
    let want = "cannot promote: rollout is not waiting for canary promotion";
    assert_eq!(h.cmd(Command::Promote).unwrap_err().to_string(), want);
    h.preflight_all(&[FROM; 2]);
    assert_eq!(h.cmd(Command::Promote).unwrap_err().to_string(), want);
    h.stage_all();
    assert_eq!(h.cmd(Command::Promote).unwrap_err().to_string(), want);
    h.check();
}

// ----- pause / resume -----

/// Drives a fresh 3-node rollout until `reached` holds (answering everything `Done`).
fn drive_until(h: &mut H, reached: impl Fn(&H) -> bool) {
    for _ in 0..100 {
        if reached(h) {
            return;
        }
        let issued = h.issue();
        if issued.is_empty() {
            let a = h.r.in_flight()[0].clone();
            if a.kind == ActionKind::Preflight {
                h.preflight(a.seq, FROM);
            } else {
                h.done(a.seq);
            }
        }
    }
    panic!("never reached the wanted state: {}", h.r.summary());
}

type Reached = fn(&H) -> bool;

fn checkpoints() -> Vec<(&'static str, Reached)> {
    vec![
        ("pending", |h| h.phase() == Phase::Pending),
        ("preflight", |h| {
            h.phase() == Phase::Preflight && !h.r.in_flight().is_empty()
        }),
        ("staging", |h| {
            h.phase() == Phase::Staging && !h.r.in_flight().is_empty()
        }),
        ("upgrading, install in flight", |h| {
            h.r.in_flight().iter().any(|a| a.kind.name() == "install")
        }),
        ("upgrading, gate in flight", |h| {
            h.r.in_flight()
                .iter()
                .any(|a| a.kind.name() == "health_gate")
        }),
        ("committing", |h| {
            h.phase() == Phase::Committing && !h.r.in_flight().is_empty()
        }),
    ]
}

#[test]
fn pause_and_resume_at_each_phase() {
    for (name, reached) in checkpoints() {
        let mut h = H::new(spec(3));
        drive_until(&mut h, reached);
        let working = h.r.working_phase();
        let in_flight = h.r.in_flight().to_vec();
        h.cmd(Command::Pause).unwrap();
        assert_eq!(h.phase(), Phase::Paused, "{name}");
        assert_eq!(h.r.working_phase(), working, "{name}");
        assert!(h.r.next_actions().is_empty(), "{name}");
        assert!(h.apply(Event::IssueActions).unwrap().is_ignored(), "{name}");
        assert!(
            h.r.summary()
                .contains(&format!("paused (during {working})"))
        );
        // In-flight actions still complete and are recorded.
        for a in &in_flight {
            if a.kind == ActionKind::Preflight {
                h.preflight(a.seq, FROM);
            } else {
                h.done(a.seq);
            }
        }
        assert!(h.r.in_flight().is_empty(), "{name}");
        if name == "committing" {
            // The last commits landed while paused: the work is done, and a terminal phase
            // overrides the pause (there is nothing left to resume).
            assert_eq!(h.phase(), Phase::Succeeded);
            assert!(matches!(
                h.cmd(Command::Resume),
                Err(Rejected::Ended { .. })
            ));
            h.check();
            continue;
        }
        assert_eq!(h.phase(), Phase::Paused, "{name}: still paused");
        assert!(h.issue().is_empty(), "{name}");
        h.cmd(Command::Resume).unwrap();
        assert_ne!(h.phase(), Phase::Paused, "{name}");
        h.run_ok();
        assert_eq!(h.phase(), Phase::Succeeded, "{name}");
        h.check();
    }
}

#[test]
fn pause_and_resume_while_rolling_back() {
    let mut h = H::new(spec(2));
    h.run_to_upgrading();
    let a = h.issue();
    h.done(a[0].seq);
    let g = h.issue();
    h.done(g[0].seq);
    let a = h.issue();
    h.fail(a[0].seq, "bad");
    let d = h.issue();
    assert_eq!(kinds(&d), [k("n2", "downgrade")]);
    h.cmd(Command::Pause).unwrap();
    assert_eq!(h.r.working_phase(), Phase::RollingBack);
    h.done(d[0].seq);
    assert!(h.issue().is_empty());
    h.cmd(Command::Resume).unwrap();
    assert_eq!(h.phase(), Phase::RollingBack);
    h.run_ok();
    assert_eq!(h.phase(), Phase::RolledBack);
    h.check();
}

#[test]
fn pause_during_preflight_still_refuses_on_failure() {
    let mut h = H::new(spec(2));
    let a = h.issue();
    h.cmd(Command::Pause).unwrap();
    h.preflight(a[0].seq, FROM);
    h.fail(a[1].seq, "unreachable");
    assert_eq!(
        h.phase(),
        Phase::Aborted,
        "a terminal phase overrides the pause"
    );
    h.check();
}

#[test]
fn results_while_paused_can_complete_the_working_phase() {
    let mut h = H::new(spec(1));
    h.run_to_upgrading();
    let a = h.issue();
    h.done(a[0].seq);
    let g = h.issue();
    h.cmd(Command::Pause).unwrap();
    h.done(g[0].seq);
    assert_eq!(h.phase(), Phase::Paused);
    assert_eq!(h.r.working_phase(), Phase::Committing);
    h.cmd(Command::Resume).unwrap();
    assert_eq!(h.phase(), Phase::Committing);
    h.check();
}

#[test]
fn failure_while_operator_paused_defers_the_rollback_to_resume() {
    let mut h = H::new(spec(2));
    h.run_to_upgrading();
    let a = h.issue();
    h.done(a[0].seq);
    let g = h.issue();
    h.cmd(Command::Pause).unwrap();
    h.fail(g[0].seq, "unhealthy");
    assert_eq!(h.phase(), Phase::Paused);
    assert_eq!(h.r.working_phase(), Phase::RollingBack);
    assert!(h.has_event("the rollout is paused: resume or rollback starts it"));
    assert!(h.issue().is_empty(), "nothing starts while paused");
    assert!(matches!(
        h.cmd(Command::Promote),
        Err(Rejected::NotAwaitingPromotion)
    ));
    h.cmd(Command::Resume).unwrap();
    assert_eq!(kinds(&h.issue()), [k("n1", "downgrade")]);
    h.check();
}

#[test]
fn rollback_command_continues_a_paused_rollback() {
    let mut h = H::new(spec(1));
    h.run_to_upgrading();
    let a = h.issue();
    h.cmd(Command::Pause).unwrap();
    h.fail(a[0].seq, "x");
    assert_eq!(h.r.working_phase(), Phase::RollingBack);
    h.cmd(Command::Rollback).unwrap();
    assert_eq!(h.phase(), Phase::RollingBack);
    assert!(h.has_event("continuing the paused rollback"));
    assert_eq!(
        h.cmd(Command::Rollback).unwrap_err(),
        Rejected::AlreadyRollingBack
    );
    h.run_ok();
    assert_eq!(h.phase(), Phase::RolledBack);
    h.check();
}

#[test]
fn pause_policy_health_failure_resume_retries_the_gate_not_the_install() {
    let mut s = spec(2);
    s.on_failure = OnFailure::Pause;
    let mut h = H::new(s);
    h.run_to_upgrading();
    let a = h.issue();
    h.done(a[0].seq);
    let g = h.issue();
    h.fail(g[0].seq, "probe reported 4.2.0");
    assert_eq!(h.phase(), Phase::Paused);
    assert!(h.has_event("paused after a failure (on failure: pause): n1: health gate on 4.2.1 failed: probe reported 4.2.0; resume retries the failed health gate"));
    assert!(h.r.error().is_some());
    assert_eq!(
        h.r.node(&n("n1")).unwrap().error.as_deref(),
        Some("health gate on 4.2.1 failed: probe reported 4.2.0")
    );
    h.cmd(Command::Resume).unwrap();
    assert_eq!(h.step("n1"), NodeStep::Installed);
    assert!(h.r.node(&n("n1")).unwrap().error.is_none());
    let r = h.issue();
    assert_eq!(kinds(&r), [k("n1", "health_gate")]);
    h.done(r[0].seq);
    let all = h.run_ok();
    assert_eq!(h.phase(), Phase::Succeeded);
    assert_eq!(
        all.iter()
            .filter(|a| a.node.as_str() == "n1" && a.kind.name() == "install")
            .count(),
        0,
        "n1 is not installed again"
    );
    h.check();
}

#[test]
fn pause_policy_install_failure_resume_retries_the_install() {
    let mut s = spec(1);
    s.on_failure = OnFailure::Pause;
    let mut h = H::new(s);
    h.run_to_upgrading();
    let a = h.issue();
    h.fail(a[0].seq, "hook timed out");
    assert_eq!(h.phase(), Phase::Paused);
    h.cmd(Command::Resume).unwrap();
    let r = h.issue();
    assert_eq!(kinds(&r), [k("n1", "install")]);
    assert!(r[0].seq > a[0].seq);
    // The node was touched by its first attempt; the rollback position does not move.
    assert_eq!(h.r.touched(), vec![n("n1")]);
    h.run_ok();
    assert_eq!(h.phase(), Phase::Succeeded);
    h.check();
}

#[test]
fn pause_policy_then_rollback_command_rolls_back() {
    let mut s = spec(3);
    s.on_failure = OnFailure::Pause;
    let mut h = H::new(s);
    h.run_to_upgrading();
    for _ in 0..2 {
        let a = h.issue();
        h.done(a[0].seq);
        let g = h.issue();
        h.done(g[0].seq);
    }
    let a = h.issue();
    h.fail(a[0].seq, "bad");
    assert_eq!(h.phase(), Phase::Paused);
    h.cmd(Command::Rollback).unwrap();
    assert_eq!(h.phase(), Phase::RollingBack);
    let all = h.run_ok();
    let d: Vec<&str> = all
        .iter()
        .filter(|a| a.kind.name() == "downgrade")
        .map(|a| a.node.as_str())
        .collect();
    assert_eq!(d, ["n3", "n2", "n1"]);
    assert_eq!(h.phase(), Phase::RolledBack);
    h.check();
}

#[test]
fn pause_policy_then_abort_leaves_nodes_as_they_are() {
    let mut s = spec(3);
    s.on_failure = OnFailure::Pause;
    let mut h = H::new(s);
    h.run_to_upgrading();
    let a = h.issue();
    h.done(a[0].seq);
    let g = h.issue();
    h.done(g[0].seq);
    let a = h.issue();
    h.done(a[0].seq);
    let g = h.issue();
    h.fail(g[0].seq, "unhealthy");
    h.cmd(Command::Abort).unwrap();
    assert_eq!(h.phase(), Phase::Aborted);
    let last = h.messages().pop().unwrap();
    assert_eq!(
        last,
        "aborted by alice; nodes are left as they are: n1: run 4.2.1, not permanent; n2: run 4.2.1, not permanent, unhealthy; n3: untouched"
    );
    h.check();
}

#[test]
fn second_pause_and_stray_resume_are_rejected() {
    let mut h = H::new(spec(1));
    assert_eq!(
        h.cmd(Command::Resume).unwrap_err().to_string(),
        "cannot resume: rollout is not paused (it is pending)"
    );
    h.cmd(Command::Pause).unwrap();
    assert_eq!(h.cmd(Command::Pause).unwrap_err(), Rejected::AlreadyPaused);
    // Paused before it started: nothing happens until resume.
    assert!(h.apply(Event::IssueActions).unwrap().is_ignored());
    assert_eq!(h.r.working_phase(), Phase::Pending);
    h.cmd(Command::Resume).unwrap();
    assert_eq!(h.phase(), Phase::Pending);
    h.run_ok();
    assert_eq!(h.phase(), Phase::Succeeded);
    h.check();
}

// ----- abort -----

#[test]
fn abort_at_each_phase_is_terminal_and_cancels_in_flight() {
    let mut points = checkpoints();
    points.push(("rolling back", |h: &H| h.phase() == Phase::RollingBack));
    for (name, reached) in points {
        let mut h = H::new(spec(3));
        if name == "rolling back" {
            h.run_to_upgrading();
            let a = h.issue();
            h.done(a[0].seq);
            let g = h.issue();
            h.fail(g[0].seq, "x");
            h.issue();
        }
        drive_until(&mut h, reached);
        let in_flight = h.r.in_flight().to_vec();
        let out = h.cmd(Command::Abort).unwrap();
        assert_eq!(h.phase(), Phase::Aborted, "{name}");
        assert_eq!(out.cancelled(), in_flight.as_slice(), "{name}");
        assert!(h.r.in_flight().is_empty());
        assert!(h.r.next_actions().is_empty());
        assert!(
            h.has_event("aborted by alice; nodes are left as they are"),
            "{name}"
        );
        for a in &in_flight {
            assert!(h.done(a.seq).is_ignored(), "{name}: late result ignored");
        }
        assert!(h.r.error().is_some(), "{name}");
        h.check();
    }
}

#[test]
fn abort_message_says_what_each_node_runs() {
    let mut s = spec(4);
    s.batch_size = 2;
    let mut h = H::new(s);
    h.run_to_upgrading();
    let a = h.issue();
    h.done(a[0].seq);
    h.done(a[1].seq);
    let g = h.issue();
    h.done(g[0].seq);
    h.done(g[1].seq);
    let b = h.issue();
    h.done(b[0].seq);
    h.cmd(Command::Abort).unwrap();
    assert_eq!(
        h.messages().pop().unwrap(),
        "aborted by alice; nodes are left as they are: n1, n2: run 4.2.1, not permanent; n3: run 4.2.1, not permanent, health not confirmed; n4: install 4.2.1 was in flight, outcome unknown (check the node)"
    );
    assert_eq!(h.r.error(), Some("aborted by alice"));
    h.check();
}

#[test]
fn commands_on_terminal_phases_are_rejected() {
    let mut finished = Vec::new();
    // succeeded
    let mut h = H::new(spec(1));
    h.run_ok();
    finished.push(h);
    // aborted
    let mut h = H::new(spec(1));
    h.cmd(Command::Abort).unwrap();
    finished.push(h);
    // rolled back
    let mut h = H::new(spec(1));
    h.run_to_upgrading();
    let a = h.issue();
    h.fail(a[0].seq, "x");
    h.run_ok();
    finished.push(h);
    // rollback failed
    let mut h = H::new(spec(1));
    h.run_to_upgrading();
    let a = h.issue();
    h.fail(a[0].seq, "x");
    let d = h.issue();
    h.fail(d[0].seq, "y");
    finished.push(h);
    let phases: Vec<Phase> = finished.iter().map(|h| h.phase()).collect();
    assert_eq!(
        phases,
        [
            Phase::Succeeded,
            Phase::Aborted,
            Phase::RolledBack,
            Phase::RollbackFailed
        ]
    );
    for mut h in finished {
        let phase = h.phase();
        for c in [
            Command::Pause,
            Command::Resume,
            Command::Abort,
            Command::Rollback,
            Command::Promote,
        ] {
            if c == Command::Rollback && phase == Phase::RollbackFailed {
                // Retried instead (rollback_failed_is_retried_by_rollback_again).
                continue;
            }
            let err = h.cmd(c).unwrap_err();
            assert_eq!(
                err,
                Rejected::Ended {
                    command: c,
                    id: "r1".into(),
                    phase
                }
            );
            assert_eq!(
                err.to_string(),
                format!("cannot {c}: rollout r1 has already ended ({phase})")
            );
        }
        assert!(h.apply(Event::IssueActions).unwrap().is_ignored());
        h.check();
    }
}

// ----- rollback command -----

#[test]
fn rollback_command_before_any_install_aborts() {
    for (name, reached) in checkpoints().into_iter().take(3) {
        let mut h = H::new(spec(2));
        drive_until(&mut h, reached);
        h.cmd(Command::Rollback).unwrap();
        assert_eq!(h.phase(), Phase::Aborted, "{name}");
        assert!(h.has_event("rollback requested by alice; no node was installed, so there is nothing to roll back"), "{name}");
        h.check();
    }
}

#[test]
fn rollback_command_from_upgrading_waits_for_the_install() {
    let mut h = H::new(spec(3));
    h.run_to_upgrading();
    let a = h.issue();
    h.done(a[0].seq);
    let g = h.issue();
    h.done(g[0].seq);
    let b = h.issue();
    h.cmd(Command::Rollback).unwrap();
    assert_eq!(h.phase(), Phase::RollingBack);
    assert!(h.issue().is_empty(), "n2's install is still in flight");
    h.done(b[0].seq);
    let all = h.run_ok();
    let d: Vec<&str> = all
        .iter()
        .filter(|a| a.kind.name() == "downgrade")
        .map(|a| a.node.as_str())
        .collect();
    assert_eq!(d, ["n2", "n1"]);
    assert_eq!(h.phase(), Phase::RolledBack);
    assert_eq!(h.r.error(), Some("rollback requested by alice"));
    h.check();
}

#[test]
fn rollback_command_from_committing_downgrades_committed_nodes() {
    let mut h = H::new(spec(2));
    drive_until(&mut h, |h| {
        h.phase() == Phase::Committing && !h.r.in_flight().is_empty()
    });
    let c = h.r.in_flight().to_vec();
    h.done(c[0].seq);
    h.cmd(Command::Rollback).unwrap();
    assert_eq!(h.phase(), Phase::RollingBack);
    // n2's commit is in flight: its outcome is needed before n2 is downgraded.
    assert!(h.issue().is_empty());
    h.done(c[1].seq);
    assert_eq!(h.step("n2"), NodeStep::Committed);
    h.run_ok();
    assert_eq!(h.phase(), Phase::RolledBack);
    h.check();
}

#[test]
fn rollback_command_from_paused_upgrading() {
    let mut h = H::new(spec(2));
    h.run_to_upgrading();
    let a = h.issue();
    h.done(a[0].seq);
    h.cmd(Command::Pause).unwrap();
    h.cmd(Command::Rollback).unwrap();
    assert_eq!(h.phase(), Phase::RollingBack);
    assert_eq!(kinds(&h.issue()), [k("n1", "downgrade")]);
    h.check();
}

// ----- stale, duplicate, unknown -----

#[test]
fn stale_duplicate_and_unknown_results_are_ignored() {
    let mut h = H::new(spec(2));
    h.run_to_upgrading();
    let a = h.issue();
    h.done(a[0].seq);
    // Duplicate, even with a different outcome: the first result stands.
    let dup = h.fail(a[0].seq, "late failure");
    assert_eq!(
        dup,
        Outcome::Ignored {
            reason: format!(
                "result ignored: action {} is not in flight (already answered, or cancelled)",
                a[0].seq
            )
        }
    );
    assert_eq!(h.step("n1"), NodeStep::Installed);
    // Never issued.
    for seq in [0, h.r.next_seq(), u64::MAX] {
        let out = h.done(seq);
        assert_eq!(
            out,
            Outcome::Ignored {
                reason: format!("result ignored: action {seq} was never issued")
            }
        );
    }
    // An old preflight answer long after preflight.
    assert!(h.preflight(1, "4.1.0").is_ignored());
    assert_eq!(h.phase(), Phase::Upgrading);
    h.run_ok();
    assert_eq!(h.phase(), Phase::Succeeded);
    h.check();
}

#[test]
fn issue_with_nothing_to_do_is_ignored() {
    let mut h = H::new(spec(1));
    h.issue();
    let out = h.apply(Event::IssueActions).unwrap();
    assert_eq!(
        out,
        Outcome::Ignored {
            reason: "nothing to issue: waiting for 1 in-flight action(s)".into()
        }
    );
    h.check();
}

#[test]
fn seqs_are_unique_and_strictly_increasing() {
    let mut s = spec(5);
    s.batch_size = 2;
    let mut h = H::new(s);
    let all = h.run_ok();
    let seqs = seqs(&all);
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(seqs.first(), Some(&1));
    assert_eq!(h.r.next_seq(), seqs.last().unwrap() + 1);
}

// ----- audit, text, serde, replay -----

#[test]
fn audit_events_record_time_and_who() {
    let mut h = H::new(spec(1));
    h.issue();
    h.cmd(Command::Pause).unwrap();
    let ev = h.r.events();
    assert_eq!(ev[0].by, "coord-1");
    assert_eq!(ev[0].at_ms, 1_001);
    let last = ev.last().unwrap();
    assert_eq!(last.by, "alice");
    assert!(last.message.starts_with("paused by alice during preflight"));
}

#[test]
fn long_errors_are_clipped() {
    let mut h = H::new(spec(1));
    let a = h.issue();
    let long = "x".repeat(10_000);
    h.fail(a[0].seq, &long);
    let err = h.r.node(&n("n1")).unwrap().error.clone().unwrap();
    assert!(err.len() < 2_200, "{}", err.len());
    assert!(err.ends_with("..."));
    let blank = {
        let mut h = H::new(spec(1));
        let a = h.issue();
        h.fail(a[0].seq, "  ");
        h.r.node(&n("n1")).unwrap().error.clone().unwrap()
    };
    assert_eq!(blank, "preflight failed: no detail given");
}

#[test]
fn wire_shapes_are_stable() {
    let e = Event::Result {
        seq: 3,
        result: ActionResult::Done,
    };
    assert_eq!(
        serde_json::to_string(&e).unwrap(),
        r#"{"result":{"seq":3,"result":"done"}}"#
    );
    assert_eq!(
        serde_json::to_string(&Event::Command(Command::Promote)).unwrap(),
        r#"{"command":"promote"}"#
    );
    assert_eq!(
        serde_json::to_string(&Event::IssueActions).unwrap(),
        r#""issue_actions""#
    );
    let a = Action {
        seq: 7,
        node: n("n2"),
        kind: ActionKind::Downgrade { to: v("4.2.0") },
    };
    assert_eq!(
        serde_json::to_string(&a).unwrap(),
        r#"{"seq":7,"node":"n2","kind":{"downgrade":{"to":"4.2.0"}}}"#
    );
    assert_eq!(a.to_string(), "n2: downgrade to 4.2.0 [seq 7]");
    // A preflight answer from before release lists: still decodes, and encodes as it did.
    let p = ActionResult::Preflight {
        running: v("4.2.0"),
        free_disk: 5,
        releases: Vec::new(),
    };
    let json = serde_json::to_string(&p).unwrap();
    assert_eq!(json, r#"{"preflight":{"running":"4.2.0","free_disk":5}}"#);
    assert_eq!(serde_json::from_str::<ActionResult>(&json).unwrap(), p);
    let p = ActionResult::Preflight {
        running: v("4.2.0"),
        free_disk: 5,
        releases: entries(&[("4.2.1", "unpacked"), ("4.2.0", "permanent")]),
    };
    let json = serde_json::to_string(&p).unwrap();
    assert_eq!(
        json,
        r#"{"preflight":{"running":"4.2.0","free_disk":5,"releases":[{"version":"4.2.1","state":"unpacked"},{"version":"4.2.0","state":"permanent"}]}}"#
    );
    assert_eq!(serde_json::from_str::<ActionResult>(&json).unwrap(), p);
    let r = ActionResult::Refused { error: "no".into() };
    let json = serde_json::to_string(&r).unwrap();
    assert_eq!(json, r#"{"refused":{"error":"no"}}"#);
    assert_eq!(serde_json::from_str::<ActionResult>(&json).unwrap(), r);
    // A health gate issued before the failure threshold existed has none.
    let old_gate =
        r#"{"health_gate":{"min_healthy_time_ms":1,"healthy_deadline_ms":2,"expect":"4.2.1"}}"#;
    assert_eq!(
        serde_json::from_str::<ActionKind>(old_gate).unwrap(),
        ActionKind::HealthGate {
            min_healthy_time_ms: 1,
            healthy_deadline_ms: 2,
            expect: v("4.2.1"),
            failure_threshold: 0,
        }
    );
    let entry = LogEntry {
        event: Event::Command(Command::Abort),
        at_ms: 1,
        by: "bob".into(),
    };
    let json = serde_json::to_string(&entry).unwrap();
    assert_eq!(serde_json::from_str::<LogEntry>(&json).unwrap(), entry);
}

#[test]
fn status_has_the_documented_json_shape() {
    let mut h = H::new(spec(2));
    h.preflight_all(&["4.2.1", "4.2.0"]);
    let mut status = serde_json::to_value(h.r.status()).unwrap();
    // When each node entered its step: the recorded time of the entry that moved it there.
    for n in status["nodes"].as_array_mut().unwrap() {
        let since = n.as_object_mut().unwrap().remove("step_since_ms");
        assert!(
            since.and_then(|v| v.as_u64()).is_some_and(|t| t > 1_000),
            "{n}"
        );
    }
    assert_eq!(status["id"], "r1");
    assert_eq!(status["version"], "4.2.1");
    assert_eq!(status["phase"], "staging");
    assert_eq!(status["awaiting_promotion"], false);
    assert_eq!(
        status["nodes"],
        serde_json::json!([
            {"id": "n1", "from_version": "4.2.1", "step": "skipped", "error": null},
            {"id": "n2", "from_version": "4.2.0", "step": "preflight_ok", "error": null}
        ])
    );
    assert!(status["events"][0]["message"].is_string());
    assert!(status["events"][0]["at_ms"].is_u64());
    assert!(status["events"][0]["by"].is_string());
}

#[test]
fn summary_reads_well() {
    let mut s = spec(3);
    s.batch_size = 2;
    let mut h = H::new(s);
    h.run_to_upgrading();
    h.issue();
    assert_eq!(
        h.r.summary(),
        "r1 -> 4.2.1: upgrading; 1 staged, 2 installing; 2 action(s) in flight"
    );
    h.cmd(Command::Abort).unwrap();
    assert_eq!(
        h.r.summary(),
        "r1 -> 4.2.1: aborted; 1 staged, 2 installing; aborted by alice"
    );
}

#[test]
fn replay_of_a_log_with_rejections_gives_the_same_state() {
    let mut h = H::new(spec(3));
    h.cmd(Command::Promote).unwrap_err();
    h.run_to_upgrading();
    let a = h.issue();
    h.cmd(Command::Resume).unwrap_err();
    h.done(a[0].seq);
    h.done(a[0].seq);
    h.cmd(Command::Pause).unwrap();
    h.cmd(Command::Pause).unwrap_err();
    h.cmd(Command::Resume).unwrap();
    let g = h.issue();
    h.fail(g[0].seq, "nope");
    h.run_ok();
    assert_eq!(h.phase(), Phase::RolledBack);
    h.check();
    // Replaying a prefix gives the state at that point: the log is the rollout.
    let half = Rollout::replay(h.r.spec().clone(), &h.log[..h.log.len() / 2]).unwrap();
    assert!(!half.phase().is_terminal());
    // And serializing the state mid-way then continuing gives the same end.
    let json = serde_json::to_string(&half).unwrap();
    let mut resumed: Rollout = serde_json::from_str(&json).unwrap();
    for e in &h.log[h.log.len() / 2..] {
        let _ = resumed.apply(&e.event, e.at_ms, &e.by);
    }
    assert_eq!(resumed, h.r);
}

#[test]
fn long_caller_identity_is_clipped() {
    let mut h = H::new(spec(1));
    let who = "w".repeat(5_000);
    h.apply_by(Event::Command(Command::Pause), &who).unwrap();
    assert!(h.r.events()[0].by.len() < 2_100);
}

#[test]
fn pause_in_committing_stops_further_commits_until_resume() {
    let mut s = spec(3);
    s.max_parallel_staging = 1;
    let mut h = H::new(s);
    drive_until(&mut h, |h| {
        h.phase() == Phase::Committing && !h.r.in_flight().is_empty()
    });
    let c = h.r.in_flight().to_vec();
    assert_eq!(kinds(&c), [k("n1", "commit")]);
    h.cmd(Command::Pause).unwrap();
    h.done(c[0].seq);
    assert_eq!(h.phase(), Phase::Paused);
    assert!(h.issue().is_empty());
    h.cmd(Command::Resume).unwrap();
    assert_eq!(kinds(&h.issue()), [k("n2", "commit")]);
    h.run_ok();
    assert_eq!(h.phase(), Phase::Succeeded);
    h.check();
}

// ----- nodes in every state (issue 11) -----

/// What a node with store `w` answers to `a`, by the node layer's real rules: a preflight lists
/// its releases, a gate passes when it runs what is expected, a step it refuses is `Refused`.
fn agent(a: &Action, w: &mut Node) -> ActionResult {
    match &a.kind {
        ActionKind::Preflight => ActionResult::Preflight {
            running: w.running().expect("something runs"),
            free_disk: 1 << 40,
            releases: w.entries(),
        },
        ActionKind::HealthGate { expect, .. } if w.running() == Some(*expect) => ActionResult::Done,
        ActionKind::HealthGate { .. } => ActionResult::Failed {
            error: format!("probe reported {:?}", w.running()),
        },
        kind => match w.perform(kind) {
            Ok(_) => ActionResult::Done,
            Err(e) => ActionResult::Refused { error: e.0 },
        },
    }
}

/// Runs the rollout to its end against nodes n1..nN with stores `worlds`, answering as
/// [`agent`] unless `answer` says otherwise for an action. Returns every action issued.
fn drive(
    h: &mut H,
    worlds: &mut [Node],
    mut answer: impl FnMut(&Action, &mut Node) -> Option<ActionResult>,
) -> Vec<Action> {
    let mut all = Vec::new();
    for _ in 0..200 {
        if h.r.is_finished() {
            h.check();
            return all;
        }
        if h.r.awaiting_promotion() {
            h.cmd(Command::Promote).unwrap();
            continue;
        }
        all.extend(h.issue());
        let Some(a) = h.r.in_flight().first().cloned() else {
            panic!("stuck: {}", h.r.summary());
        };
        let i: usize = a.node.as_str()[1..].parse().unwrap();
        let w = &mut worlds[i - 1];
        let result = answer(&a, w).unwrap_or_else(|| agent(&a, w));
        h.result(a.seq, result);
    }
    panic!("did not end: {}", h.r.summary());
}

fn on(node: &str, all: &[Action]) -> Vec<String> {
    all.iter()
        .filter(|a| a.node.as_str() == node)
        .map(|a| a.kind.to_string())
        .collect()
}

fn vv(s: &str) -> Option<Version> {
    Some(v(s))
}

/// Bug 1: a node that runs the target only as `current` was skipped ("already runs 4.2.1"),
/// never made permanent, and the rollout still said every node ran it permanently.
#[test]
fn a_node_running_the_target_not_permanently_is_gated_and_committed() {
    let mut worlds = [
        Node::with(&[("4.2.0", "permanent")]),
        Node::with(&[("4.2.1", "current"), ("4.2.0", "permanent")]),
    ];
    let mut h = H::new(spec(2));
    let all = drive(&mut h, &mut worlds, |_, _| None);
    assert!(h.has_event(
        "n2: preflight ok: runs 4.2.1 (current; 4.2.0 permanent): it already runs 4.2.1, not permanently; health gate, then make it permanent with the others"
    ));
    assert_eq!(
        on("n2", &all),
        ["preflight", "health gate on 4.2.1", "make 4.2.1 permanent"]
    );
    assert_eq!(h.phase(), Phase::Succeeded);
    assert_eq!(h.steps(), [NodeStep::Committed, NodeStep::Committed]);
    for w in &worlds {
        assert_eq!(w.shape(), (vv("4.2.1"), vv("4.2.1"), None), "{w:?}");
    }
    assert_eq!(
        h.messages().pop().unwrap(),
        "all 2 nodes run 4.2.1 permanently"
    );
}

/// Bug 1, second form: after an abort left every node `current` on the target, a rollout of it
/// said "nothing to do" and succeeded. Every node is gated and committed.
#[test]
fn a_cluster_left_current_everywhere_is_committed_not_nothing_to_do() {
    let mut worlds = vec![Node::with(&[("4.2.1", "current"), ("4.2.0", "permanent")]); 3];
    let mut h = H::new(spec(3));
    let all = drive(&mut h, &mut worlds, |_, _| None);
    assert!(!h.has_event("nothing to do"));
    assert!(h.has_event("preflight passed: 3 nodes to move to 4.2.1 (3 already running it, to gate and make permanent); nothing to stage"));
    assert!(all.iter().all(|a| !matches!(
        a.kind,
        ActionKind::Stage { .. } | ActionKind::Install { .. }
    )));
    assert_eq!(h.phase(), Phase::Succeeded);
    assert!(worlds.iter().all(|w| w.permanent() == vv("4.2.1")));
    assert_eq!(
        h.messages().pop().unwrap(),
        "all 3 nodes run 4.2.1 permanently"
    );
}

/// With `--no-permanent`, a node running the target without it being permanent is already
/// where the rollout leaves it: skipped, and the summary says so instead of "permanently".
#[test]
fn no_permanent_skips_a_node_already_running_the_target_and_says_so() {
    let mut worlds = [
        Node::with(&[("4.2.0", "permanent")]),
        Node::with(&[("4.2.1", "current"), ("4.2.0", "permanent")]),
        Node::with(&[("4.2.1", "permanent")]),
    ];
    let mut s = spec(3);
    s.permanent = false;
    let mut h = H::new(s);
    let all = drive(&mut h, &mut worlds, |_, _| None);
    assert_eq!(on("n2", &all), ["preflight"]);
    assert_eq!(on("n3", &all), ["preflight"]);
    assert!(h.has_event("n2: already runs 4.2.1, not permanently (4.2.0 is permanent), which is where a rollout without making it permanent leaves it: skipped"));
    assert_eq!(
        h.messages().pop().unwrap(),
        "all 3 nodes run 4.2.1: 1 healthy, not made permanent (no-permanent): a restart boots their previous release; 1 already ran it without it being permanent: skipped; 1 already ran it permanently: skipped"
    );
    // And when that is every node: nothing to do, truthfully.
    let mut worlds = [
        Node::with(&[("4.2.1", "current"), ("4.2.0", "permanent")]),
        Node::with(&[("4.2.1", "permanent")]),
    ];
    let mut s = spec(2);
    s.permanent = false;
    let mut h = H::new(s);
    drive(&mut h, &mut worlds, |_, _| None);
    assert_eq!(
        h.messages().pop().unwrap(),
        "every node already runs 4.2.1 (1 permanently; 1 not permanently, where a rollout without making it permanent leaves it): nothing to do"
    );
}

/// A node that ran the target not permanently, once committed, is rolled back to its
/// permanent release (a rollback moves away from the target); before its commit it is
/// untouched (only its health was checked) and left alone.
#[test]
fn a_committed_formerly_current_node_rolls_back_to_its_permanent_release() {
    let mut worlds = [
        Node::with(&[("4.2.1", "current"), ("4.2.0", "permanent")]),
        Node::with(&[("4.2.0", "permanent")]),
    ];
    let mut s = spec(2);
    s.max_parallel_staging = 1;
    let mut h = H::new(s);
    // n1's commit succeeds, n2's commit fails.
    let all = drive(&mut h, &mut worlds, |a, _| {
        (a.node.as_str() == "n2" && matches!(a.kind, ActionKind::Commit { .. })).then(|| {
            ActionResult::Failed {
                error: "fsync failed".into(),
            }
        })
    });
    assert_eq!(h.phase(), Phase::RolledBack, "{:#?}", h.messages());
    assert_eq!(
        on("n1", &all),
        [
            "preflight",
            "health gate on 4.2.1",
            "make 4.2.1 permanent",
            "downgrade to 4.2.0",
            "health gate on 4.2.0"
        ]
    );
    assert_eq!(worlds[0].shape(), (vv("4.2.0"), vv("4.2.0"), None));
    assert_eq!(
        worlds[0].state(v("4.2.1")),
        Some(orch_types::ReleaseState::Old)
    );
    assert_eq!(worlds[1].shape(), (vv("4.2.0"), vv("4.2.0"), None));

    // Failing before any commit: n1 was only gated, so it is not touched and stays as it was.
    let mut worlds = [
        Node::with(&[("4.2.1", "current"), ("4.2.0", "permanent")]),
        Node::with(&[("4.2.0", "permanent")]),
    ];
    let mut h = H::new(spec(2));
    let all = drive(&mut h, &mut worlds, |a, _| {
        (a.node.as_str() == "n2"
            && matches!(a.kind, ActionKind::HealthGate { expect, .. } if expect == v(TARGET)))
        .then(|| ActionResult::Failed {
            error: "unhealthy".into(),
        })
    });
    assert_eq!(h.phase(), Phase::RolledBack);
    assert_eq!(on("n1", &all), ["preflight", "health gate on 4.2.1"]);
    assert_eq!(h.r.touched(), vec![n("n2")]);
    assert_eq!(worlds[0].shape(), (vv("4.2.1"), vv("4.2.0"), vv("4.2.1")));
}

/// Bug 2: after an abort left n1 on `4.2.2 current, 4.2.0 permanent`, `rollout 4.2.0` passed
/// preflight, its install was refused by the node, then the rollback "downgraded to 4.2.2" (the
/// release already running) and ended `rollback_failed`. The forward step is a downgrade to
/// 4.2.0, gated; nothing to stage or commit.
#[test]
fn a_permanent_target_behind_a_current_release_is_switched_back_to_with_a_downgrade() {
    let mut worlds = [
        Node::with(&[("4.2.2", "current"), ("4.2.0", "permanent")]),
        Node::with(&[("4.2.0", "permanent")]),
    ];
    let mut s = spec(2);
    s.version = v("4.2.0");
    let mut h = H::new(s);
    let all = drive(&mut h, &mut worlds, |_, _| None);
    assert!(h.has_event("n1: preflight ok: runs 4.2.2 (current; 4.2.0 permanent): 4.2.0 is its permanent release; switch back to it with a downgrade (it stays permanent), then health gate"));
    assert!(h.has_event("n2: already runs 4.2.0 permanently: skipped"));
    assert_eq!(
        on("n1", &all),
        ["preflight", "downgrade to 4.2.0", "health gate on 4.2.0"]
    );
    assert_eq!(h.phase(), Phase::Succeeded);
    assert_eq!(h.steps(), [NodeStep::Committed, NodeStep::Skipped]);
    assert_eq!(worlds[0].shape(), (vv("4.2.0"), vv("4.2.0"), None));
    assert_eq!(
        h.messages().pop().unwrap(),
        "all 2 nodes run 4.2.0 permanently (1 switched back to it with a downgrade, 1 already did: skipped)"
    );
}

/// Bug 2's rollback: the switch back is undone by installing the release that was current
/// (it is `old` then), which restores exactly `4.2.2 current, 4.2.0 permanent`.
#[test]
fn a_switch_back_is_undone_by_installing_the_formerly_current_release() {
    let mut worlds = [Node::with(&[("4.2.2", "current"), ("4.2.0", "permanent")])];
    let start = worlds[0].clone();
    let mut s = spec(1);
    s.version = v("4.2.0");
    let mut h = H::new(s);
    let all = drive(&mut h, &mut worlds, |a, _| {
        matches!(a.kind, ActionKind::HealthGate { expect, .. } if expect == v("4.2.0")).then(|| {
            ActionResult::Failed {
                error: "unhealthy".into(),
            }
        })
    });
    assert_eq!(h.phase(), Phase::RolledBack);
    assert_eq!(
        on("n1", &all),
        [
            "preflight",
            "downgrade to 4.2.0",
            "health gate on 4.2.0",
            "install 4.2.2",
            "health gate on 4.2.2"
        ]
    );
    assert_eq!(worlds[0].shape(), start.shape());
    assert!(h.has_event("n1: 4.2.2 installed again (current, not permanent, as before)"));
    assert!(h.has_event("n1: rolled back to 4.2.2 and healthy"));
}

/// Bug 2's other half: a step the agent refused changed nothing, so it does not make its node
/// touched, and a rollback never targets what a node runs: the rollout ends `aborted` (nothing
/// to undo), not `rollback_failed`.
#[test]
fn a_refused_step_leaves_its_node_untouched_and_nothing_to_roll_back() {
    let mut worlds = [Node::with(&[("4.2.2", "current"), ("4.2.0", "permanent")])];
    let mut s = spec(1);
    s.version = v("4.2.0");
    let mut h = H::new(s);
    let all = drive(&mut h, &mut worlds, |a, _| {
        matches!(a.kind, ActionKind::Downgrade { .. }).then(|| ActionResult::Refused {
            error: "the node is held by another rollout".into(),
        })
    });
    assert_eq!(h.phase(), Phase::Aborted);
    assert_eq!(on("n1", &all), ["preflight", "downgrade to 4.2.0"]);
    assert!(h.r.touched().is_empty());
    let err = h.r.error().unwrap();
    assert!(
        err.contains(
            "n1: downgrade to 4.2.0 refused, nothing changed: the node is held by another rollout"
        ),
        "{err}"
    );
    assert!(h.has_event("nothing to roll back"));
    assert!(!h.has_event("rollback failed"));

    // Next to a node that did change: only that one is rolled back.
    let mut worlds = [
        Node::with(&[("4.2.0", "permanent")]),
        Node::with(&[("4.2.0", "permanent")]),
    ];
    let mut h = H::new(spec(2));
    let all = drive(&mut h, &mut worlds, |a, _| {
        (a.node.as_str() == "n2" && matches!(a.kind, ActionKind::Install { .. })).then(|| {
            ActionResult::Refused {
                error: "refused to install 4.2.1: no package".into(),
            }
        })
    });
    assert_eq!(h.phase(), Phase::RolledBack);
    assert_eq!(h.r.touched(), vec![n("n1")]);
    assert_eq!(
        on("n2", &all),
        ["preflight", "stage 4.2.1", "install 4.2.1"]
    );
    assert!(h.has_event("all 1 touched node rolled back"));
    assert_eq!(h.step("n2"), NodeStep::Failed);
}

/// A refusal of an install still in flight when the rollback started: the node drops out of
/// the rollback; when it was the only touched one, nothing is left to undo.
#[test]
fn a_refusal_arriving_during_the_rollback_untouches_its_node() {
    let mut s = spec(2);
    s.batch_size = 2;
    let mut h = H::new(s);
    h.run_to_upgrading();
    let a = h.issue();
    h.refuse(a[0].seq, "no");
    // n2's install is still in flight: the rollout waits for it.
    assert_eq!(h.phase(), Phase::RollingBack);
    assert_eq!(h.r.touched(), vec![n("n2")]);
    h.refuse(a[1].seq, "no either");
    assert_eq!(h.phase(), Phase::Aborted);
    assert!(h.r.touched().is_empty());
    assert!(h.has_event("no node was changed after all"));
    h.check();
}

/// A node on another release C current over its permanent P, upgraded to a target it did not
/// have: the rollback installs C again (not permanent); if a commit may have made the target
/// permanent, it first downgrades to P. Either way the node ends `C current, P permanent`.
#[test]
fn a_node_with_another_current_release_gets_it_back_on_rollback() {
    for fail_commit in [false, true] {
        let mut worlds = [Node::with(&[("4.2.5", "current"), ("4.2.0", "permanent")])];
        let start = worlds[0].clone();
        let mut h = H::new(spec(1));
        let all = drive(&mut h, &mut worlds, |a, w| {
            if fail_commit && matches!(a.kind, ActionKind::Commit { .. }) {
                // Made permanent, but the answer was lost.
                w.perform(&a.kind).unwrap();
                return Some(ActionResult::Failed {
                    error: "connection reset".into(),
                });
            }
            (!fail_commit
                && matches!(a.kind, ActionKind::HealthGate { expect, .. } if expect == v(TARGET)))
            .then(|| ActionResult::Failed {
                error: "unhealthy".into(),
            })
        });
        assert_eq!(h.phase(), Phase::RolledBack, "{}", h.r.summary());
        // What came after the last step on 4.2.1: the rollback.
        let steps = on("n1", &all);
        let last_forward = steps.iter().rposition(|k| k.contains("4.2.1")).unwrap();
        let undo = &steps[last_forward + 1..];
        if fail_commit {
            assert_eq!(
                undo,
                [
                    "downgrade to 4.2.0",
                    "install 4.2.5",
                    "health gate on 4.2.5"
                ]
            );
        } else {
            assert_eq!(undo, ["install 4.2.5", "health gate on 4.2.5"]);
        }
        assert_eq!(
            worlds[0].shape(),
            start.shape(),
            "fail_commit {fail_commit}"
        );
    }
}

/// The target on disk already (unpacked, or old: even an older patch release taken back) is
/// installed without staging; an `old` target is installed (health gate before permanent),
/// not downgraded to.
#[test]
fn a_target_on_disk_is_installed_without_staging() {
    for state in ["unpacked", "old"] {
        let mut worlds = [
            Node::with(&[("4.2.5", "permanent"), ("4.2.1", state)]),
            Node::with(&[("4.2.5", "permanent")]),
        ];
        let mut s = spec(2);
        s.package = Some(PackageRef {
            name: "emqx".into(),
            version: v(TARGET),
            sha256: "0".repeat(64),
            size: 1 << 50,
        });
        let mut h = H::new(s);
        let a = h.issue();
        // n1 needs no disk for a package it does not need; n2 does.
        h.result(a[0].seq, agent(&a[0], &mut worlds[0]));
        assert_eq!(h.step("n1"), NodeStep::Staged);
        assert!(h.has_event(&format!("n1: preflight ok: runs 4.2.5 permanently: 4.2.1 is already on its disk ({state}), nothing to stage; install, gate, make permanent")));
        h.result(a[1].seq, agent(&a[1], &mut worlds[1]));
        assert_eq!(h.phase(), Phase::Aborted);
        assert!(h.r.error().unwrap().contains("n2: not enough free disk"));

        let mut worlds = [Node::with(&[("4.2.5", "permanent"), ("4.2.1", state)])];
        let mut h = H::new(spec(1));
        let all = drive(&mut h, &mut worlds, |_, _| None);
        assert_eq!(
            on("n1", &all),
            [
                "preflight",
                "install 4.2.1",
                "health gate on 4.2.1",
                "make 4.2.1 permanent"
            ]
        );
        assert!(h.has_event("all 1 node ready (0 staged, 1 already had 4.2.1)"));
        assert_eq!(worlds[0].shape(), (vv("4.2.1"), vv("4.2.1"), None));
    }
}

/// A release list that does not add up (two permanent releases, a running version it does not
/// list) is refused in preflight, naming the node and what is wrong.
#[test]
fn a_release_list_that_does_not_add_up_is_refused_in_preflight() {
    let mut h = H::new(spec(2));
    let a = h.issue();
    h.preflight_with(a[0].seq, &[("4.2.0", "permanent"), ("4.1.0", "permanent")]);
    h.result(
        a[1].seq,
        ActionResult::Preflight {
            running: v("4.2.3"),
            free_disk: 1 << 40,
            releases: entries(&[("4.2.0", "permanent")]),
        },
    );
    assert_eq!(h.phase(), Phase::Aborted);
    let err = h.r.error().unwrap();
    assert!(err.contains("n1: its releases do not add up (both 4.2.0 and 4.1.0 are permanent: 4.2.0 permanent, 4.1.0 permanent); nothing was touched, check `orchestrator node versions --agent n1`"), "{err}");
    assert!(err.contains("n2: its releases do not add up (it reports 4.2.3 running, but its releases say 4.2.0 runs"), "{err}");
    h.check();
}

/// An `abort` half-way leaves some nodes on the target not permanently, others on the old
/// release: a rollout of either version repairs the cluster.
#[test]
fn a_rollout_of_either_version_repairs_a_half_way_abort() {
    let half_way = || {
        [
            Node::with(&[("4.2.1", "current"), ("4.2.0", "permanent")]),
            Node::with(&[("4.2.1", "current"), ("4.2.0", "permanent")]),
            Node::with(&[("4.2.1", "unpacked"), ("4.2.0", "permanent")]),
        ]
    };
    let mut worlds = half_way();
    let mut h = H::new(spec(3));
    drive(&mut h, &mut worlds, |_, _| None);
    assert_eq!(h.phase(), Phase::Succeeded);
    assert!(
        worlds
            .iter()
            .all(|w| w.shape() == (vv("4.2.1"), vv("4.2.1"), None))
    );

    let mut worlds = half_way();
    let mut s = spec(3);
    s.version = v("4.2.0");
    let mut h = H::new(s);
    drive(&mut h, &mut worlds, |_, _| None);
    assert_eq!(h.phase(), Phase::Succeeded);
    assert!(
        worlds
            .iter()
            .all(|w| w.shape() == (vv("4.2.0"), vv("4.2.0"), None))
    );
    assert_eq!(
        h.messages().pop().unwrap(),
        "all 3 nodes run 4.2.0 permanently (2 switched back to it with a downgrade, 1 already did: skipped)"
    );
}

/// Bug 4: the failure threshold is in the spec (default 3, 0 disables, validated) and in every
/// health gate the machine issues, forward and rollback, so the driver can fail a gate after
/// that many failed probes in a row instead of waiting out the deadline.
#[test]
fn the_failure_threshold_travels_in_every_health_gate() {
    assert_eq!(spec(1).failure_threshold, 3);
    let mut s = spec(1);
    s.failure_threshold = 30_000;
    assert_eq!(
        Rollout::new(s).unwrap_err(),
        SpecError::FailureThresholdTooLarge(30_000)
    );
    for threshold in [0, 1, 5] {
        let mut s = spec(1);
        s.failure_threshold = threshold;
        let mut h = H::new(s);
        h.run_to_upgrading();
        let a = h.issue();
        h.done(a[0].seq);
        let g = h.issue();
        assert_eq!(
            g[0].kind,
            ActionKind::HealthGate {
                min_healthy_time_ms: 0,
                healthy_deadline_ms: 1_000,
                expect: v(TARGET),
                failure_threshold: threshold,
            }
        );
        h.fail(g[0].seq, "3 probes in a row answered HTTP 500");
        let d = h.issue();
        h.done(d[0].seq);
        let g = h.issue();
        assert!(matches!(
            g[0].kind,
            ActionKind::HealthGate { failure_threshold, expect, .. } if failure_threshold == threshold && expect == v(FROM)
        ));
        h.check();
    }
}

/// Snapshots of the coordinators' state hold every rollout ever run: a rollout serialized
/// before release lists (no route, start, undo count or threshold fields) still decodes and
/// continues as it would have.
#[test]
fn a_rollout_serialized_before_release_lists_decodes_and_continues() {
    let mut h = H::new(spec(2));
    let a = h.issue();
    h.preflight_legacy(a[0].seq, FROM);
    h.preflight_legacy(a[1].seq, FROM);
    h.stage_all();
    let i = h.issue();
    h.done(i[0].seq);
    let g = h.issue();
    h.fail(g[0].seq, "unhealthy");
    let d = h.issue();
    h.done(d[0].seq);
    let g = h.issue(); // the rollback gate, in flight
    let mut old = serde_json::to_value(&h.r).unwrap();
    old["spec"]
        .as_object_mut()
        .unwrap()
        .remove("failure_threshold");
    for node in old["nodes"].as_array_mut().unwrap() {
        let node = node.as_object_mut().unwrap();
        for field in ["route", "start", "commit_seq", "undone", "refused"] {
            assert!(node.remove(field).is_some(), "{field}");
        }
        assert!(node.contains_key("install_seq"));
    }
    for a in old["in_flight"].as_array_mut().unwrap() {
        a["kind"]["health_gate"]
            .as_object_mut()
            .unwrap()
            .remove("failure_threshold");
    }
    let mut back: Rollout = serde_json::from_value(old).unwrap();
    assert_eq!(back.next_actions(), h.r.next_actions());
    assert_eq!(back.touched(), vec![n("n1")]);
    back.apply(
        &Event::Result {
            seq: g[0].seq,
            result: ActionResult::Done,
        },
        1,
        "c",
    )
    .unwrap();
    assert_eq!(back.phase(), Phase::RolledBack);
}

/// The abort message says, per node and route, what each node runs.
#[test]
fn abort_message_names_switched_back_and_refused_nodes() {
    let mut worlds = [
        Node::with(&[("4.2.1", "permanent"), ("4.2.0", "current")]),
        Node::with(&[("4.2.0", "permanent")]),
    ];
    let mut s = spec(2);
    s.on_failure = OnFailure::Pause;
    let mut h = H::new(s);
    let a = h.issue();
    for x in &a {
        let i: usize = x.node.as_str()[1..].parse().unwrap();
        h.result(x.seq, agent(x, &mut worlds[i - 1]));
    }
    h.stage_all();
    let d = h.issue();
    assert_eq!(kinds(&d), [k("n1", "downgrade")]);
    h.result(d[0].seq, agent(&d[0], &mut worlds[0]));
    let g = h.issue();
    h.done(g[0].seq);
    let i = h.issue();
    h.refuse(i[0].seq, "no");
    assert_eq!(h.phase(), Phase::Paused);
    h.cmd(Command::Abort).unwrap();
    assert_eq!(
        h.messages().pop().unwrap(),
        "aborted by alice; nodes are left as they are: n1: run 4.2.1 permanently; n2: untouched (install refused)"
    );
    h.check();
}

/// Each node's `step_since_ms` is the time of the recorded entry that moved it into its step:
/// entries that leave a node's step alone keep it, and a replay of the log gives the same.
#[test]
fn a_node_entered_its_step_at_the_entry_that_moved_it() {
    let mut h = H::new(spec(2));
    h.preflight_all(&["4.2.0", "4.2.0"]);
    let times =
        |h: &H| -> Vec<u64> { h.r.status().nodes.iter().map(|n| n.step_since_ms).collect() };
    let before = times(&h);
    for t in &before {
        assert!(
            h.log.iter().any(|e| e.at_ms == *t),
            "{t} is an entry's time: {before:?}"
        );
    }
    h.apply(Event::Command(Command::Pause)).unwrap();
    assert_eq!(times(&h), before, "a pause moves no node");
    let replayed = Rollout::replay(h.r.spec().clone(), &h.log).unwrap();
    assert_eq!(replayed.status(), h.r.status());
}

// ----- pruning (keep_releases) -----

/// Drives a rollout of `count` nodes from 4.2.0 to committing's end, every step succeeding.
fn committed_with_keep(count: usize, keep: Option<u32>) -> H {
    let mut s = spec(count);
    s.keep_releases = keep;
    let mut h = H::new(s);
    h.run_to_upgrading();
    while !matches!(h.phase(), Phase::Pruning | Phase::Succeeded) {
        let issued = h.issue();
        assert!(!issued.is_empty() || !h.r.in_flight().is_empty(), "stalled");
        for a in issued {
            h.done(a.seq);
        }
    }
    h
}

#[test]
fn after_committing_every_node_is_pruned_and_failures_do_not_fail_the_rollout() {
    let mut h = committed_with_keep(3, Some(2));
    assert_eq!(h.phase(), Phase::Pruning);
    assert!(h.has_event(
        "run 4.2.1 permanently; pruning on every upgraded node (keeping the newest 2 releases)"
    ));
    let prunes = h.issue();
    assert_eq!(
        kinds(&prunes),
        [k("n1", "prune"), k("n2", "prune"), k("n3", "prune")]
    );
    for a in &prunes {
        assert_eq!(
            a.kind,
            ActionKind::Prune {
                keep: 2,
                // What a rollback would go back to, and the target, are never pruned.
                protect: vec![v(FROM), v(TARGET)],
            }
        );
    }
    // A prune is answered with what it removed; nothing else is.
    h.done(prunes[0].seq);
    assert!(h.has_event("n1: nothing to prune (keeping the newest 2 releases)"));
    h.result(
        prunes[1].seq,
        ActionResult::Pruned {
            removed: vec![v("4.1.9"), v("4.1.8")],
            failed: vec!["4.1.7: refused: busy".into()],
        },
    );
    assert!(h.has_event("n2: pruned 4.1.9, 4.1.8 (keeping the newest 2 releases); could not uninstall 4.1.7: refused: busy"));
    assert_eq!(h.phase(), Phase::Pruning);
    h.fail(prunes[2].seq, "agent unreachable");
    assert!(h.has_event(
        "n3: pruning failed: failed: agent unreachable; the rollout succeeded regardless"
    ));
    assert_eq!(h.phase(), Phase::Succeeded);
    assert_eq!(h.r.error(), None);
    assert!(h.steps().iter().all(|s| *s == NodeStep::Committed));
    assert_eq!(
        h.messages().last().unwrap(),
        "all 3 nodes run 4.2.1 permanently"
    );
    h.check();
}

#[test]
fn without_keep_releases_there_is_no_pruning_and_a_pruned_answer_elsewhere_is_rejected() {
    let h = committed_with_keep(2, None);
    assert_eq!(h.phase(), Phase::Succeeded);
    assert!(!h.has_event("prune"));

    let mut s = spec(1);
    s.keep_releases = Some(3);
    let mut h = H::new(s);
    h.run_to_upgrading();
    let install = h.issue();
    let out = h.apply(Event::Result {
        seq: install[0].seq,
        result: ActionResult::Pruned {
            removed: Vec::new(),
            failed: Vec::new(),
        },
    });
    assert!(
        matches!(out, Err(Rejected::MismatchedResult { .. })),
        "{out:?}"
    );
}

#[test]
fn a_pause_during_pruning_holds_it_and_a_rollback_keeps_what_it_needs() {
    let mut h = committed_with_keep(2, Some(1));
    h.cmd(Command::Pause).unwrap();
    assert!(h.issue().is_empty());
    h.cmd(Command::Resume).unwrap();
    let prunes = h.issue();
    assert_eq!(prunes.len(), 2);
    // An operator rolls back while the prunes run: they are cancelled (they change nothing
    // a rollback needs: its destinations are protected) and the nodes go back to 4.2.0.
    h.cmd(Command::Rollback).unwrap();
    assert_eq!(h.phase(), Phase::RollingBack);
    assert!(h.r.in_flight().is_empty());
    let undo = h.issue();
    assert_eq!(kinds(&undo), [k("n2", "downgrade")]);
}
