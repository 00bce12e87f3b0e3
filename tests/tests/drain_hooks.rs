//! Drain hooks on real processes: every agent runs `--pre-step-cmd` before it switches its
//! node and `--post-step-cmd` once the node passed its health gate, with the activation's
//! arguments and environment. One shared log, appended to by the pre-step, activation and
//! post-step commands of every node, proves the order: pre < activate < post on each node,
//! node after node.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use orch_tests::cluster::*;
use orch_tests::{stderr, stdout};

const V0: &str = "4.2.0";
const V1: &str = "4.2.1";

/// `hook.sh KIND NODE FROM TO`: appends `KIND NODE FROM TO $ORCH_FROM_VERSION $ORCH_TO_VERSION`
/// to `log`; `pre-fail` / `post-fail` then say why and exit 1 (a load balancer that will not
/// drain, or not take the node back).
fn write_hook(dir: &Path, log: &Path) -> PathBuf {
    let script = dir.join("hook.sh");
    let body = format!(
        "#!/bin/sh\n\
         echo \"$1 $2 $3 $4 $ORCH_FROM_VERSION $ORCH_TO_VERSION\" >> '{}'\n\
         case \"$1\" in *-fail) echo \"load balancer refused $1 of $2\"; exit 1;; esac\n",
        log.display()
    );
    fs::write(&script, body).unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    script
}

/// A state-only cluster of 3 nodes whose agents run `hook.sh` as their pre-step, activation
/// and post-step commands (`pre` or `post` is `pre-fail` / `post-fail` on node `failing.1`);
/// returns it, the hooks' dir (kept as long as the test holds it) and the log's path.
fn cluster(failing: Option<(&str, usize)>) -> (Cluster, tempfile::TempDir, PathBuf) {
    let hooks = tempfile::Builder::new()
        .prefix("orch-drain-")
        .tempdir()
        .unwrap();
    let log = hooks.path().join("hooks.log");
    let script = write_hook(hooks.path(), &log);
    let s = script.display();
    let mut opts = ClusterOpts::state_only(1, 3);
    for i in 1..=3 {
        let kind = |k: &str| match failing {
            Some((f, n)) if f == k && n == i => format!("{k}-fail"),
            _ => k.to_string(),
        };
        let (pre, post) = (kind("pre"), kind("post"));
        opts = opts.agent_args(
            i,
            &[
                "--pre-step-cmd",
                &format!("{s} {pre} n{i}"),
                "--activate-cmd",
                &format!("{s} activate n{i}"),
                "--post-step-cmd",
                &format!("{s} {post} n{i}"),
            ],
        );
    }
    (Cluster::start(opts), hooks, log)
}

fn lines(log: &Path) -> Vec<String> {
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The three lines one switch of `node` from `from` to `to` logs, in order.
fn switch(node: &str, from: &str, to: &str) -> Vec<String> {
    ["pre", "activate", "post"]
        .iter()
        .map(|k| format!("{k} {node} {from} {to} {from} {to}"))
        .collect()
}

fn rollout(c: &Cluster) -> serde_json::Value {
    let pkg = c.package(V1, false);
    let o = c.cli(&[
        "rollout",
        V1,
        "--package",
        pkg.to_str().unwrap(),
        "--batch-size",
        "1",
        "--min-healthy-time",
        "0s",
        "--healthy-deadline",
        "20s",
        "--detach",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let id = stdout(&o).trim().to_string();
    let end = c.wait_rollout(Duration::from_secs(120), "the rollout to end", |s| {
        s.id == id
            && matches!(
                s.phase.as_str(),
                "succeeded" | "rolled_back" | "rollback_failed" | "aborted"
            )
    });
    assert_eq!(end.id, id);
    c.status_json(&id)
}

#[test]
fn drain_hooks_run_in_order_around_each_switch() {
    let (c, _hooks, log) = cluster(None);
    // Registering (and the nodes' 4.2.0 installs, done without the agent) ran no hook.
    assert_eq!(lines(&log), Vec::<String>::new());
    let st = rollout(&c);
    assert_eq!(st["phase"], "succeeded", "{st:#}");
    let want: Vec<String> = ["n1", "n2", "n3"]
        .iter()
        .flat_map(|n| switch(n, V0, V1))
        .collect();
    println!("hooks log:\n{}", lines(&log).join("\n"));
    assert_eq!(lines(&log), want, "{st:#}");
    for n in ["n1", "n2", "n3"] {
        let node = c.node(n);
        let audit = node.audit();
        assert_eq!(
            node.audit_count(&format!(
                "| install {V1} permanent=false | ok changed hooks=pre-switch,activate"
            )),
            1,
            "{n}: {audit}"
        );
        assert_eq!(
            node.audit_count(&format!("| after-gate {V1} | ok changed hooks=post-switch")),
            1,
            "{n}: {audit}"
        );
        assert!(
            !node.root.join("drained.json").exists(),
            "{n}: the drain is forgotten once the post-step hook ran"
        );
    }
}

#[test]
fn a_failing_pre_step_hook_fails_the_node_before_anything_changes() {
    let (c, _hooks, log) = cluster(Some(("pre", 2)));
    let st = rollout(&c);
    // n1 was upgraded, then n2's drain failed; n1 is rolled back (a switch: drained too) and
    // n2, whose switch was never attempted, is left alone.
    assert_eq!(st["phase"], "rolled_back", "{st:#}");
    let mut want = switch("n1", V0, V1);
    want.push(format!("pre-fail n2 {V0} {V1} {V0} {V1}"));
    want.extend(switch("n1", V1, V0));
    assert_eq!(lines(&log), want, "{st:#}");

    let err = st["error"].as_str().unwrap_or_default();
    println!(
        "hooks log:\n{}\nrollout error: {err}",
        lines(&log).join("\n")
    );
    for part in [
        "n2",
        "pre-step hook for 4.2.0 -> 4.2.1 failed",
        "exit code 1",
        "load balancer refused pre-fail of n2",
        "the switch was not attempted",
    ] {
        assert!(
            err.contains(part),
            "{part:?} in the rollout's error: {st:#}"
        );
    }
    // Both nodes run 4.2.0 permanently again; n2 never switched.
    let nodes = c.nodes_json();
    for n in ["n1", "n2", "n3"] {
        let versions = node_versions(&nodes, n);
        assert!(
            versions.contains(&(V0.to_string(), "permanent".to_string()))
                && !versions.iter().any(|(_, s)| s == "current"),
            "{n}: {versions:?}"
        );
    }
    let n2 = c.node("n2");
    assert_eq!(n2.audit_count("| failed pre-switch: "), 1, "{}", n2.audit());
    assert!(!n2.root.join("drained.json").exists());
    assert_eq!(c.node("n3").audit_count(" install "), 0);
}

#[test]
fn a_failing_post_step_hook_fails_the_gate_and_says_the_node_is_not_back() {
    let (c, _hooks, log) = cluster(Some(("post", 1)));
    let st = rollout(&c);
    // n1's gate failed on its post-step hook; the rollback switches it back (drained again)
    // and its undo gate's post-step hook fails again: a person must put it back.
    assert_eq!(st["phase"], "rollback_failed", "{st:#}");
    let want: Vec<String> = [
        format!("pre n1 {V0} {V1} {V0} {V1}"),
        format!("activate n1 {V0} {V1} {V0} {V1}"),
        format!("post-fail n1 {V0} {V1} {V0} {V1}"),
        format!("pre n1 {V1} {V0} {V1} {V0}"),
        format!("activate n1 {V1} {V0} {V1} {V0}"),
        format!("post-fail n1 {V1} {V0} {V1} {V0}"),
    ]
    .into();
    println!("hooks log:\n{}", lines(&log).join("\n"));
    assert_eq!(lines(&log), want, "{st:#}");
    let events = event_messages(&st).join("\n");
    assert!(
        events
            .contains("post-step hook after the health gate on 4.2.1 (switched from 4.2.0) failed")
            && events.contains("load balancer refused post-fail of n1")
            && events.contains("not put back in service"),
        "{events}"
    );
    // Still recorded as drained: the next passed gate runs the hook again.
    assert!(c.node("n1").root.join("drained.json").exists());
    assert_eq!(c.node("n2").audit_count(" install "), 0);
}
