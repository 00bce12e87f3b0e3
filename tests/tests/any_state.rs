//! Rollouts from any state a cluster can be in, and a registry that cannot be fooled (issue
//! #11), plus a cluster rebuilt under its agents (issue #10): real coordinator and agent
//! processes on loopback with state-only release stores.
//!
//! Build the binaries first: `cargo build --bins`.

use std::time::{Duration, Instant};

use orch_tests::cluster::*;
use orch_tests::{AgentProc, stderr, stdout};

const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(90);
const V2: &str = "4.2.2";

fn quick<'a>(version: &'a str, pkg: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "rollout",
        version,
        "--package",
        pkg,
        "--min-healthy-time",
        "0ms",
        "--healthy-deadline",
        "20s",
    ];
    a.extend_from_slice(extra);
    a
}

/// The versions as the node's own store says (not the registry).
fn local_versions(c: &Cluster, id: &str) -> String {
    orch_tests::local_ok(&c.node(id).root, &["versions"])
}

/// Bug 1: a node that already runs the target as `current` only (an operator's
/// `--no-permanent` upgrade) used to be skipped and never made permanent while the rollout
/// said every node ran it permanently. Bug 2: a node whose target is its `permanent`
/// release behind another `current` one used to fail its install and "roll back" into
/// rollback_failed with nothing changed. A rollout of either version now repairs both.
#[test]
fn rollouts_from_current_only_and_permanent_behind_current_nodes() {
    let c = Cluster::start(ClusterOpts::state_only(1, 3));
    let p1 = c.package(V1, false).display().to_string();
    let p2 = c.package(V2, false).display().to_string();
    // n2 runs 4.2.1 as current only; n3 runs 4.2.2 as current over 4.2.0 permanent.
    c.node("n2")
        .agent()
        .node_ok(&["upgrade", "--no-permanent", "--package", &p1]);
    c.node("n3")
        .agent()
        .node_ok(&["upgrade", "--no-permanent", "--package", &p2]);

    // Rolling 4.2.0 out: n3 is switched back to its permanent 4.2.0 (a downgrade), the
    // others already run it permanently (n2: 4.2.0 is permanent, 4.2.1 current -> switched back too).
    let out = c.cli_ok(&[
        "rollout",
        V0,
        "--min-healthy-time",
        "0ms",
        "--healthy-deadline",
        "20s",
        "--json",
    ]);
    let fin: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(fin["phase"], "succeeded", "{fin}");
    for n in ["n2", "n3"] {
        let v = local_versions(&c, n);
        assert!(
            v.starts_with("Installed versions:")
                && v.contains("4.2.0\tpermanent")
                && !v.contains("current"),
            "{n} runs 4.2.0 permanently: {v}"
        );
    }
    let events = event_messages(&fin);
    assert!(
        !events.iter().any(|e| e.contains("rolling back")),
        "nothing was rolled back: {events:?}"
    );

    // Now 4.2.1 everywhere, with n1 left current-only first: it is gated and committed too.
    c.node("n1")
        .agent()
        .node_ok(&["upgrade", "--no-permanent", "--package", &p1]);
    let out = c.cli_ok(&quick(V1, &p1, &["--json"]));
    let fin: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(fin["phase"], "succeeded", "{fin}");
    for n in ["n1", "n2", "n3"] {
        assert_eq!(json_step(&fin, n), "committed", "{fin}");
        let v = local_versions(&c, n);
        assert!(v.contains("4.2.1\tpermanent"), "{n}: {v}");
    }
    let last = event_messages(&fin).last().cloned().unwrap_or_default();
    assert!(last.contains("permanent"), "{last}");
}

/// Bug 3: a second agent started as `n1` on another address was registered silently, and
/// steps went to either machine. It is refused while the first answers, the conflict shows in
/// `nodes`, and it takes over once the first is gone.
#[test]
fn a_second_agent_with_a_taken_node_id_is_refused_until_the_first_is_gone() {
    let mut c = Cluster::start(ClusterOpts::state_only(1, 2));
    let first = c.node("n1").agent().addr.clone();
    let other_root = c.dir.path().join("clone-of-n1");
    std::fs::create_dir_all(&other_root).unwrap();
    let addrs = c.addrs();
    let mut args: Vec<&str> = Vec::new();
    for a in &addrs {
        args.push("--coordinator");
        args.push(a);
    }
    let mut dup = AgentProc::start("n1", &other_root, &args);
    // Several registration periods: the registry keeps the first, and says why.
    let mut conflict = String::new();
    c.wait_for(
        Duration::from_secs(20),
        "the conflict to show in nodes",
        |c| {
            let nodes = c.nodes_json();
            let n1 = node_entry(&nodes, "n1");
            assert_eq!(
                n1["address"],
                first.as_str(),
                "the registry flipped: {nodes}"
            );
            conflict = n1["conflict"].as_str().unwrap_or_default().to_string();
            !conflict.is_empty()
        },
    );
    assert!(
        conflict.contains(&dup.addr) && conflict.contains(&first),
        "names both addresses: {conflict}"
    );
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(node_entry(&c.nodes_json(), "n1")["address"], first.as_str());
    let log = dup.log();
    assert!(
        log.contains("already taken by a live agent") && log.contains(&first),
        "the refused agent says why: {log}"
    );
    let text = c.cli_ok(&["nodes"]);
    assert!(text.contains("CONFLICT"), "{text}");
    // The first goes away (the node really moved): the second takes over.
    c.node_mut("n1").kill_agent();
    c.wait_for(
        Duration::from_secs(30),
        "the second agent to take over",
        |c| node_entry(&c.nodes_json(), "n1")["address"] == dup.addr.as_str(),
    );
    dup.kill9();
}

/// Bug 4: a release that answers "unhealthy" on every probe held the rollout for the whole
/// healthy deadline (5 minutes by default). Three failed probes in a row now fail the gate.
#[test]
fn a_plainly_broken_release_fails_its_gate_after_a_few_probes() {
    let c = Cluster::start(ClusterOpts::demo(1, 2));
    let broken = c.package(V1, true).display().to_string();
    let t = Instant::now();
    let o = c.cli(&[
        "rollout",
        V1,
        "--package",
        &broken,
        "--min-healthy-time",
        "1s",
        "--healthy-deadline",
        "5m",
    ]);
    let took = t.elapsed();
    assert!(!o.status.success(), "{}", stdout(&o));
    let st = c.status_json("r000001");
    assert_eq!(st["phase"], "rolled_back", "{st}");
    let n1 = st["nodes"][0]["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(n1.contains("probes in a row"), "{st}");
    println!("broken release rolled back after {took:?} (deadline 5m): {n1}");
}

/// Bug 5: a decommissioned node stayed registered and failed every default rollout's
/// preflight. `nodes forget` removes it (refused while a rollout holds it); an agent that
/// registers again reappears. Bug 7: preflight with dead agents names every one of them,
/// bounded by the preflight timeout.
#[test]
fn dead_nodes_are_named_by_preflight_and_can_be_forgotten() {
    let mut c = Cluster::start(ClusterOpts::state_only(1, 3));
    let p1 = c.package(V1, false).display().to_string();
    c.node_mut("n2").kill_agent();
    c.node_mut("n3").kill_agent();
    let t = Instant::now();
    let o = c.cli(&quick(V1, &p1, &["--preflight-timeout", "2s"]));
    println!("preflight refused after {:?}", t.elapsed());
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    // Refused before anything was uploaded or recorded (issue #12): no rollout in history.
    let err = stderr(&o);
    assert!(
        err.contains("n2") && err.contains("n3") && !err.contains("n1:"),
        "every unreachable node is named: {err}"
    );
    assert!(err.contains("nothing was uploaded or recorded"), "{err}");
    assert_eq!(c.cli_json(&["rollouts", "--json"]), serde_json::json!([]));

    // The decommissioned nodes are forgotten; the rollout then runs on the one left.
    let o = c.cli(&["nodes", "forget", "n3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let nodes = c.nodes_json();
    assert!(
        !nodes.as_array().unwrap().iter().any(|n| n["id"] == "n3"),
        "{nodes}"
    );
    c.cli_ok(&["nodes", "forget", "n2"]);
    let out = c.cli_ok(&quick(V1, &p1, &["--json"]));
    let fin: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(fin["phase"], "succeeded", "{fin}");
    assert_eq!(fin["nodes"].as_array().unwrap().len(), 1, "{fin}");

    // Its agent comes back: it reappears.
    c.node_mut("n2").restart_agent();
    c.wait_for(Duration::from_secs(20), "n2 to register again", |c| {
        c.nodes_json()
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["id"] == "n2")
    });
}

#[test]
fn forgetting_a_node_that_a_rollout_holds_is_refused() {
    let c = Cluster::start(ClusterOpts::state_only(1, 2));
    let p1 = c.package(V1, false).display().to_string();
    let mut bg = c.spawn_cli(&[
        "rollout",
        V1,
        "--package",
        &p1,
        "--min-healthy-time",
        "30s",
        "--healthy-deadline",
        "60s",
    ]);
    c.wait_rollout(ROLLOUT_TIMEOUT, "n1 in its gate", |s| {
        step_of(s, "n1") == "verifying"
    });
    let o = c.cli(&["nodes", "forget", "n2"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("not finished") && stderr(&o).contains("abort"),
        "{}",
        stderr(&o)
    );
    c.cli_ok(&["abort"]);
    let _ = bg.wait(ROLLOUT_TIMEOUT);
    c.cli_ok(&["nodes", "forget", "n2"]);
}

/// Bug 6: configuration mistakes used to pass silently.
#[test]
fn coordinator_configuration_mistakes_are_refused_or_reported() {
    let mut c = Cluster::start(ClusterOpts::state_only(3, 1));
    // `cluster status` shows every member's liveness and says when quorum is lost.
    let st = c.cli_json(&["cluster", "status", "--json"]);
    assert_eq!(st["quorum"], true, "{st}");
    let leader = c.wait_for_leader(Duration::from_secs(5));
    let leader_addr = c.coord(leader).addr.clone();
    let followers: Vec<u64> = c
        .coords
        .iter()
        .map(|p| p.id)
        .filter(|id| *id != leader)
        .collect();
    for f in &followers {
        c.coord(*f).kill9();
    }
    let mut seen = serde_json::Value::Null;
    c.wait_for(Duration::from_secs(20), "quorum lost to show", |c| {
        let o = orch_tests::run_bounded(
            c.cli_cmd_via(
                std::slice::from_ref(&leader_addr),
                &["cluster", "status", "--json"],
            ),
            Duration::from_secs(30),
        );
        seen = serde_json::from_str(stdout(&o).trim()).unwrap_or_default();
        seen["quorum"] == false
    });
    let members = seen["members"].as_array().unwrap();
    for f in &followers {
        let m = members.iter().find(|m| m["id"] == *f).unwrap();
        assert_eq!(m["reachable"], false, "{seen}");
    }
    assert!(
        seen["note"]
            .as_str()
            .unwrap_or_default()
            .contains("quorum lost"),
        "{seen}"
    );
    let text = c.cli_ok(&["cluster", "status", "--coordinator", &leader_addr]);
    assert!(text.contains("quorum lost"), "{text}");

    // `--id 2` on coordinator 3's data directory is refused.
    let (two, three) = (followers[0], followers[1]);
    let stolen = c.coord(three).data_dir.clone();
    let o = orch_tests::run_bounded(
        {
            let mut cmd = orch_tests::orch_cmd(&["coordinator", "--id"]);
            cmd.arg(two.to_string())
                .arg("--listen")
                .arg(format!("127.0.0.1:{}", orch_tests::free_port()))
                .arg("--data-dir")
                .arg(&stolen)
                .arg("--insecure");
            cmd
        },
        Duration::from_secs(30),
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains(&format!("belongs to coordinator {three}")),
        "{}",
        stderr(&o)
    );

    // `--batch-size 0` is refused before anything is sent.
    let o = c.cli(&["rollout", V1, "--batch-size", "0", "--detach"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
}

/// A `--peer` list that disagrees with the Raft membership is reported at start.
#[test]
fn a_peer_list_that_differs_from_the_membership_is_reported() {
    let mut c = Cluster::start(ClusterOpts::state_only(1, 1));
    let coord = c.coord(1);
    coord.kill9();
    // Restart it with an extra, unknown peer (a typo in a config management template).
    let mut cmd = orch_tests::orch_cmd(&["coordinator", "--id", "1", "--listen"]);
    cmd.arg(&coord.addr)
        .arg("--data-dir")
        .arg(&coord.data_dir)
        .arg("--peer")
        .arg("7=127.0.0.1:1")
        .arg("--insecure")
        .env("ORCH_LOG", "info,openraft=warn");
    let bg = BgCmd::spawn(cmd, c.dir.path());
    let start = Instant::now();
    let mut text = String::new();
    while start.elapsed() < Duration::from_secs(20) {
        text = bg.stderr() + &bg.stdout();
        if text.contains("differs from the cluster's Raft membership") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(bg);
    assert!(
        text.contains("differs from the cluster's Raft membership") && text.contains("7="),
        "{text}"
    );
}

/// Issue #10 bug 1: coordinators rebuilt from scratch (a new cluster, terms from 1) while the
/// agents stay. Before, every agent refused every step as stale and the rollout sat in flight
/// forever with nothing in `status`; now preflight refuses at once naming both cluster ids
/// and the remedy, and after `node rebind` the new cluster rolls out.
#[test]
fn a_rebuilt_cluster_is_refused_by_its_old_agents_until_they_are_rebound() {
    let mut c = Cluster::start(ClusterOpts::state_only(1, 2));
    let p1 = c.package(V1, false).display().to_string();
    let p2 = c.package(V2, false).display().to_string();
    c.cli_ok(&quick(V1, &p1, &[]));
    let old_id = c.cli_json(&["cluster", "status", "--json"])["cluster_id"]
        .as_str()
        .unwrap()
        .to_string();
    // Rebuild: fresh data directory, bootstrap again.
    let coord = c.coord(1);
    coord.kill9();
    std::fs::remove_dir_all(&coord.data_dir).unwrap();
    coord.restart();
    c.wait_for_leader(FORM_TIMEOUT);
    c.wait_for(FORM_TIMEOUT, "the agents to register again", |c| {
        c.ctl_nodes().is_some_and(|n| n.len() == 2)
    });
    let new_id = c.cli_json(&["cluster", "status", "--json"])["cluster_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!new_id.is_empty() && new_id != old_id);
    let t = Instant::now();
    let o = c.cli(&quick(V2, &p2, &[]));
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    println!("refused after {:?}", t.elapsed());
    // Refused before anything was recorded (issue #12): the new cluster has no rollout.
    let err = stderr(&o);
    assert!(
        err.contains(&old_id) && err.contains(&new_id) && err.contains("node rebind"),
        "names both clusters and the remedy: {err}"
    );
    assert_eq!(c.cli_json(&["rollouts", "--json"]), serde_json::json!([]));
    for n in ["n1", "n2"] {
        let out = c
            .node(n)
            .agent()
            .node_ok(&["rebind", "--cluster-id", &new_id]);
        assert!(out.contains(&new_id), "{out}");
    }
    let mut bg = c.spawn_cli(&quick(V2, &p2, &["--json"]));
    let Some(o) = bg.wait_within(ROLLOUT_TIMEOUT) else {
        panic!(
            "the rollout after rebind did not end: {:?}\n{}",
            c.ctl_status(""),
            c.logs()
        );
    };
    let fin: serde_json::Value = serde_json::from_str(o.stdout.trim()).unwrap();
    assert_eq!(fin["phase"], "succeeded", "{fin}");
    for n in ["n1", "n2"] {
        let v = local_versions(&c, n);
        assert!(v.contains("4.2.2\tpermanent"), "{n}: {v}");
    }
}
