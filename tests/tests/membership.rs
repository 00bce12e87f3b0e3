//! `orchestrator cluster status|add|remove` through the real binaries: a single bootstrapped
//! coordinator grows to two (learner, then voter), the new member serves reads and sees writes
//! made through the leader, then shrinks back; bad requests are refused with a clear line.

use std::path::Path;
use std::time::Duration;

use orch_tests::cluster::{BgCmd, spawn_coordinators};
use orch_tests::{free_port, orch_cmd, orch_within, stderr, stdout, wait_until};
use serde_json::Value;

const CLI: Duration = Duration::from_secs(60);

/// Runs the CLI against a loopback cluster that serves plain text.
fn cli(args: &[&str]) -> std::process::Output {
    let mut a = args.to_vec();
    a.push("--insecure");
    orch_within(&a, CLI)
}

fn cluster_json(addr: &str) -> Option<Value> {
    let o = cli(&["cluster", "status", "--json", "--coordinator", addr]);
    if !o.status.success() {
        return None;
    }
    serde_json::from_str(&stdout(&o)).ok()
}

/// `(id, role)` of every member, sorted by id.
fn members(v: &Value) -> Vec<(u64, String)> {
    let mut m: Vec<(u64, String)> = v["members"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            (
                m["id"].as_u64().unwrap_or(0),
                m["role"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    m.sort();
    m
}

fn start_standalone(dir: &Path, id: u64, addr: &str, peer: &str) -> BgCmd {
    let data = dir.join(format!("coordinator{id}"));
    let mut cmd = orch_cmd(&["coordinator"]);
    cmd.args([
        "--id",
        &id.to_string(),
        "--listen",
        addr,
        "--data-dir",
        &data.display().to_string(),
        "--peer",
        &format!("1={peer}"),
        "--insecure",
    ])
    .env_remove("ORCHESTRATOR_COORDINATORS")
    .env("ORCH_LOG", "info");
    BgCmd::spawn(cmd, dir)
}

#[test]
fn cluster_add_and_remove_through_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let coords = spawn_coordinators(tmp.path(), 1, "info");
    let a1 = coords[0].addr.clone();
    wait_until(Duration::from_secs(30), "coordinator 1 leads", || {
        cluster_json(&a1).is_some_and(|v| v["leader_id"].as_u64() == Some(1))
    });
    assert_eq!(
        members(&cluster_json(&a1).unwrap()),
        vec![(1, "voter".to_string())]
    );

    // A second coordinator, started outside the membership, joins through `cluster add`.
    let a2 = format!("127.0.0.1:{}", free_port());
    let c2 = start_standalone(tmp.path(), 2, &a2, &a1);
    let o = cli(&["cluster", "add", "2", &a2, "--coordinator", &a1]);
    assert!(
        o.status.success(),
        "cluster add failed: {}\n{}",
        stdout(&o),
        stderr(&o)
    );
    assert!(stdout(&o).contains("Added coordinator 2"), "{}", stdout(&o));
    let v = cluster_json(&a1).unwrap();
    assert_eq!(
        members(&v),
        vec![(1, "voter".to_string()), (2, "voter".to_string())],
        "{v}"
    );

    // The new member knows the leader and applies what the leader commits.
    wait_until(Duration::from_secs(20), "coordinator 2 follows 1", || {
        cluster_json(&a2).is_some_and(|v| {
            v["leader_id"].as_u64() == Some(1)
                && members(&v) == vec![(1, "voter".to_string()), (2, "voter".to_string())]
        })
    });
    let applied_1 = cluster_json(&a1).unwrap()["last_applied"].as_u64().unwrap();
    wait_until(Duration::from_secs(20), "coordinator 2 catches up", || {
        cluster_json(&a2)
            .and_then(|v| v["last_applied"].as_u64())
            .is_some_and(|a| a >= applied_1)
    });

    // Adding it again changes nothing and says so, or succeeds idempotently; never a third
    // member or a demotion.
    let o = cli(&["cluster", "add", "2", &a2, "--coordinator", &a1]);
    let again = format!("{}{}", stdout(&o), stderr(&o));
    assert_eq!(
        members(&cluster_json(&a1).unwrap()),
        vec![(1, "voter".to_string()), (2, "voter".to_string())],
        "after a repeated add: {again}"
    );

    // Bad input: refused before anything changes.
    let o = cli(&["cluster", "add", "x", &a2, "--coordinator", &a1]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = cli(&["cluster", "remove", "7", "--coordinator", &a1]);
    assert!(!o.status.success(), "removing a non-member must fail");
    assert!(
        stderr(&o).contains('7'),
        "the refusal names the id: {}",
        stderr(&o)
    );

    // Shrink back to one.
    let o = cli(&["cluster", "remove", "2", "--coordinator", &a1]);
    assert!(
        o.status.success(),
        "cluster remove failed: {}\n{}",
        stdout(&o),
        stderr(&o)
    );
    assert!(
        stdout(&o).contains("Removed coordinator 2"),
        "{}",
        stdout(&o)
    );
    assert_eq!(
        members(&cluster_json(&a1).unwrap()),
        vec![(1, "voter".to_string())]
    );

    // The remaining coordinator still commits on its own (a write through the CLI path:
    // an agent-less registry read is not enough, so check the cluster still has a leader
    // and answers after the change).
    wait_until(Duration::from_secs(20), "coordinator 1 still leads", || {
        cluster_json(&a1).is_some_and(|v| v["leader_id"].as_u64() == Some(1))
    });

    // Removing the last voter would leave no cluster: refused.
    let o = cli(&["cluster", "remove", "1", "--coordinator", &a1]);
    assert!(!o.status.success(), "removing the last member must fail");
    assert_eq!(
        members(&cluster_json(&a1).unwrap()),
        vec![(1, "voter".to_string())]
    );
    // Both coordinators are killed when their guards drop.
    drop(c2);
    drop(coords);
}
