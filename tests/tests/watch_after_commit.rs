//! `rollout --watch-after-commit DUR` on real processes: after the commit every node is probed
//! for DUR; a node that fails in that window rolls the committed rollout back, every node
//! downgraded to its previous release (which the commit left `old` on every node).
//!
//! Build the binaries first: `cargo build --bins`.

use std::time::Duration;

use orch_tests::cluster::*;

#[test]
fn a_failure_while_watching_after_the_commit_downgrades_every_node() {
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
        "--watch-after-commit",
        "60s",
        "--detach",
        "--json",
    ]);
    let id = started["id"].as_str().unwrap().to_string();
    c.wait_for(Duration::from_secs(60), "the watch after the commit", |c| {
        rollout_phase(c, &id) == "watching"
    });
    let st = c.status_json(&id);
    // Committed everywhere before the watch; the watch is the gate the status shows.
    for n in ["n1", "n2", "n3"] {
        assert_eq!(json_step(&st, n), "committed", "{st:#}");
        assert_eq!(c.node(n).audit_count(" permanent 4.2.1"), 1, "{n}");
    }
    assert_eq!(st["gate"]["min_healthy_ms"], 60_000, "{st:#}");
    assert_eq!(st["policy"]["watch_after_commit_ms"], 60_000, "{st:#}");
    let human = c.cli_ok(&["status", &id]);
    assert!(human.contains("watch after commit 1m"), "{human}");

    // n2's service hangs while it is watched: its agent answers unhealthy, which fails it.
    let (version, pid) = c.node("n2").health().expect("n2's service answers");
    assert_eq!(version, "4.2.1");
    let pid = pid as i32;
    // SAFETY: kill(2) on the demo service this cluster started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let thaw = Thaw(pid);
    c.wait_for(Duration::from_secs(30), "the watch to fail", |c| {
        rollout_phase(c, &id) != "watching"
    });
    drop(thaw);
    let end = c.wait_rollout(Duration::from_secs(120), "the rollback", |s| {
        s.id == id && matches!(s.phase.as_str(), "rolled_back" | "rollback_failed")
    });
    let st = c.status_json(&id);
    assert_eq!(end.phase, "rolled_back", "{st:#}");
    let msgs = event_messages(&st);
    assert!(
        msgs.iter()
            .any(|m| m.starts_with("n2: watch after the commit on 4.2.1 (1m) failed: ")),
        "{msgs:#?}"
    );
    assert!(
        msgs.iter()
            .any(|m| m.contains("(4.2.1 was committed: this rolls back a committed rollout)")),
        "{msgs:#?}"
    );
    // Every node runs 4.2.0 again, permanently: the agents downgraded to it.
    for n in ["n1", "n2", "n3"] {
        let node = c.node(n);
        assert_eq!(node.health().map(|h| h.0).as_deref(), Some("4.2.0"), "{n}");
        assert_eq!(
            node.audit_count(" downgrade 4.2.0"),
            1,
            "{n}: {}",
            node.audit()
        );
        let nodes = c.nodes_json();
        let versions = node_versions(&nodes, n);
        for (v, state) in [("4.2.0", "permanent"), ("4.2.1", "old")] {
            assert!(
                versions.contains(&(v.to_string(), state.to_string())),
                "{n}: {versions:?}"
            );
        }
    }
}

#[test]
fn a_quiet_watch_after_the_commit_ends_in_success() {
    let c = Cluster::start(ClusterOpts::demo(1, 2));
    let pkg = c.package("4.2.1", false);
    let out = c.cli_json(&[
        "rollout",
        "4.2.1",
        "--package",
        pkg.to_str().unwrap(),
        "--min-healthy-time",
        "0s",
        "--watch-after-commit",
        "2s",
        "--json",
    ]);
    assert_eq!(out["phase"], "succeeded", "{out:#}");
    let msgs = event_messages(&out);
    let pos = |needle: &str| {
        msgs.iter()
            .position(|m| m.contains(needle))
            .unwrap_or_else(|| panic!("{needle:?} in {msgs:#?}"))
    };
    let watching = pos("watching every upgraded node for 2s after the commit");
    assert!(pos("n1: 4.2.1 is permanent") < watching, "{msgs:#?}");
    assert!(pos("n2: 4.2.1 is permanent") < watching, "{msgs:#?}");
    assert!(
        watching < pos("n1: stayed healthy on 4.2.1 for the watch after the commit (2s)"),
        "{msgs:#?}"
    );
    assert!(
        watching < pos("n2: stayed healthy on 4.2.1 for the watch after the commit (2s)"),
        "{msgs:#?}"
    );
    assert_eq!(out["spec"]["watch_after_commit_ms"], 2_000);
}
