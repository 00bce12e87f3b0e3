//! `rollout --bake DUR` on real processes: every node is probed again, together, after the
//! last upgrade and before the commit; a node that fails in that window rolls every node back.

use std::time::Duration;

use orch_tests::cluster::*;

#[test]
fn a_node_that_fails_during_the_bake_rolls_every_node_back() {
    let c = Cluster::start(ClusterOpts::demo(1, 3));
    let pkg = c.package("4.2.1", false);
    let started = c.cli_json(&[
        "rollout",
        "4.2.1",
        "--package",
        pkg.to_str().unwrap(),
        "--min-healthy-time",
        "0s",
        "--healthy-deadline",
        "20s",
        "--bake",
        "60s",
        "--detach",
        "--json",
    ]);
    let id = started["id"].as_str().unwrap().to_string();
    c.wait_for(Duration::from_secs(60), "the bake", |c| {
        rollout_phase(c, &id) == "baking"
    });
    // The bake gate is what the status shows while baking.
    let st = c.status_json(&id);
    assert_eq!(st["gate"]["bake_ms"], 60_000);
    assert_eq!(st["gate"]["min_healthy_ms"], 60_000);
    assert_eq!(st["gate"]["healthy_deadline_ms"], 80_000);
    assert!(
        event_messages(&st).iter().any(|m| m
            == "all 3 nodes upgraded and healthy; baking 4.2.1 for 1m: every node must stay healthy before it is made permanent"),
        "{st:#}"
    );
    // n2's service hangs in the middle of the bake: its agent answers unhealthy (no answer
    // from the service within the check's timeout), and one such answer fails the bake.
    let (version, pid) = c.node("n2").health().expect("n2's service answers");
    assert_eq!(version, "4.2.1");
    let pid = pid as i32;
    // SAFETY: kill(2) on the demo service this cluster started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let thaw = Thaw(pid);
    c.wait_for(Duration::from_secs(30), "the bake to fail", |c| {
        rollout_phase(c, &id) != "baking"
    });
    drop(thaw);
    let end = c.wait_rollout(Duration::from_secs(90), "the rollback", |s| {
        s.id == id && matches!(s.phase.as_str(), "rolled_back" | "rollback_failed")
    });
    let st = c.status_json(&id);
    assert_eq!(end.phase, "rolled_back", "{st:#}");
    assert!(
        event_messages(&st)
            .iter()
            .any(|m| m.starts_with("n2: bake on 4.2.1 (1m) failed: ")),
        "{st:#}"
    );
    // Nothing was made permanent: no commit was issued, and every node runs 4.2.0 again.
    assert_eq!(count_events(&st, "permanent on"), 0, "{st:#}");
    for n in ["n1", "n2", "n3"] {
        assert_eq!(c.node(n).health().map(|h| h.0).as_deref(), Some("4.2.0"));
        assert_eq!(
            c.node(n).audit_count(" permanent 4.2.1"),
            0,
            "{n}: {}",
            c.node(n).audit()
        );
    }
}

#[test]
fn a_healthy_bake_ends_in_the_commit() {
    let c = Cluster::start(ClusterOpts::demo(1, 2));
    let pkg = c.package("4.2.1", false);
    let out = c.cli_json(&[
        "rollout",
        "4.2.1",
        "--package",
        pkg.to_str().unwrap(),
        "--min-healthy-time",
        "0s",
        "--bake",
        "2s",
        "--json",
    ]);
    assert_eq!(out["phase"], "succeeded", "{out:#}");
    let msgs = event_messages(&out);
    let baked = |n: &str| {
        msgs.iter()
            .position(|m| m == &format!("{n}: stayed healthy on 4.2.1 for the bake (2s)"))
            .unwrap_or_else(|| panic!("{n} baked: {msgs:#?}"))
    };
    let commit = msgs
        .iter()
        .position(|m| m.contains("making 4.2.1 permanent"))
        .expect("the commit");
    assert!(baked("n1") < commit && baked("n2") < commit, "{msgs:#?}");
    assert_eq!(out["spec"]["bake_ms"], 2_000);
}
