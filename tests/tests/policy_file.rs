//! `rollout V --policy FILE`: the options from a TOML file give the same rollout as the same
//! flags; a flag overrides the file; a bad file is refused before anything is sent.

use std::time::Duration;

use orch_tests::cluster::*;
use orch_tests::stderr;
use serde_json::Value;

/// The spec without what differs between two rollouts of the same policy.
fn policy_of(status: &Value) -> Value {
    let mut spec = status["spec"].clone();
    for k in ["id", "version", "package", "requested_by"] {
        spec.as_object_mut().unwrap().remove(k);
    }
    spec
}

/// Starts `rollout V --package (a package of V) ARGS...` and waits for it to succeed.
fn run(c: &Cluster, version: &str, args: &[&str]) -> Value {
    let pkg = c.package(version, false).display().to_string();
    let mut all = vec!["rollout", version, "--package", &pkg];
    all.extend_from_slice(args);
    let out = c.cli_json(&all);
    let id = out["id"].as_str().unwrap().to_string();
    c.wait_rollout(Duration::from_secs(120), "the rollout to end", |s| {
        s.id == id && s.phase == "succeeded"
    });
    c.status_json(&id)
}

#[test]
fn a_policy_file_gives_the_rollout_its_flags_would() {
    let c = Cluster::start(ClusterOpts::state_only(1, 3));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    std::fs::write(
        &file,
        "# the web tier's policy\n\
         nodes = [\"n3\", \"n1\", \"n2\"]\n\
         batch-size = 2\n\
         min-healthy-time = \"200ms\"\n\
         healthy_deadline = \"30s\"\n\
         failure-threshold = 4\n\
         on-failure = \"pause\"\n\
         keep-releases = 0\n\
         bake = \"1s\"\n\
         watch-after-commit = \"1s\"\n",
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let from_file = run(&c, "4.2.1", &["--policy", f, "--detach", "--json"]);
    let from_flags = run(
        &c,
        "4.2.2",
        &[
            "--nodes",
            "n3,n1,n2",
            "--batch-size",
            "2",
            "--min-healthy-time",
            "200ms",
            "--healthy-deadline",
            "30s",
            "--failure-threshold",
            "4",
            "--on-failure",
            "pause",
            "--keep-releases",
            "0",
            "--bake",
            "1s",
            "--watch-after-commit",
            "1s",
            "--detach",
            "--json",
        ],
    );
    assert_eq!(policy_of(&from_file), policy_of(&from_flags));
    assert_eq!(from_file["spec"]["bake_ms"], 1_000, "{from_file:#}");
    assert_eq!(
        from_file["spec"]["watch_after_commit_ms"], 1_000,
        "{from_file:#}"
    );
    assert_eq!(from_file["spec"]["batch_size"], 2);
    // `status` shows the policy it runs with.
    let text = c.cli_ok(&["status", from_file["id"].as_str().unwrap()]);
    assert!(
        text.contains(
            "policy: batch 2, on failure pause, min healthy 200ms, healthy deadline 30.0s, failure threshold 4, bake 1.0s, watch after commit 1.0s"
        ),
        "{text}"
    );

    // A flag overrides the file.
    let over = run(
        &c,
        "4.2.3",
        &["--policy", f, "--batch-size", "1", "--detach", "--json"],
    );
    assert_eq!(over["spec"]["batch_size"], 1);
    assert_eq!(over["spec"]["bake_ms"], 1_000);

    // A typo is refused, naming the key and the file, and nothing starts.
    std::fs::write(&file, "batch-sise = 2\n").unwrap();
    let o = c.cli(&["rollout", "4.2.4", "--policy", f, "--detach"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("batch-sise") && err.contains("policy.toml"),
        "{err}"
    );
    let missing = dir.path().join("nope.toml");
    let o = c.cli(&["rollout", "4.2.4", "--policy", missing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("cannot read the policy file"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        c.cli_json(&["rollouts", "--all", "--json"])
            .as_array()
            .unwrap()
            .len(),
        3
    );
}
