//! Planning before acting (issue #12): `rollout --dry-run` runs preflight for real and touches
//! nothing; a rollout that would be refused is refused before anything is uploaded or
//! recorded; a second rollout is refused before its package is uploaded. Real coordinator and
//! agent processes on loopback with state-only release stores.
//!
//! Build the binaries first: `cargo build --bins`.

use std::path::Path;
use std::time::Duration;

use orch_tests::cluster::*;
use orch_tests::{PkgSpec, stderr, stdout};
use serde_json::{Value, json};

const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(60);

/// Every file under `dir`, recursively (relative paths, sorted).
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// What a dry run must leave exactly as it was: every agent's audit log, every node's
/// releases, the rollout list, and the coordinators' package store.
fn footprint(c: &Cluster) -> (Vec<String>, Vec<String>, Value, Vec<Vec<String>>) {
    let audits = c.nodes.iter().map(|n| n.audit()).collect();
    let releases = c
        .nodes
        .iter()
        .map(|n| orch_tests::local_ok(&n.root, &["versions"]))
        .collect();
    let rollouts = c.cli_json(&["rollouts", "--all", "--json"]);
    let blobs = c
        .coords
        .iter()
        .map(|k| files_under(&k.data_dir.join("blobs")))
        .collect();
    (audits, releases, rollouts, blobs)
}

fn node_plan<'a>(plan: &'a Value, id: &str) -> &'a Value {
    plan["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == id)
        .unwrap_or_else(|| panic!("no {id} in {plan}"))
}

/// The dry run shows the real plan (order, batches, canary, from -> to) and changes nothing:
/// no rollout, no audit line on any agent, no release, no package stored. Refusals (a hop
/// that is not patch-level, an unreachable agent) are shown per node with exit 1, and the
/// same rollout for real is refused before anything is uploaded or recorded.
#[test]
fn dry_run_plans_with_a_real_preflight_and_touches_nothing() {
    let mut c = Cluster::start(ClusterOpts::state_only(1, 3));
    let p1 = c.package(V1, false).display().to_string();
    let before = footprint(&c);
    assert_eq!(before.2, json!([]), "a fresh cluster has no rollouts");

    let args = [
        "rollout",
        V1,
        "--package",
        &p1,
        "--dry-run",
        "--canary",
        "1",
        "--batch-size",
        "2",
    ];
    let out = c.cli_ok(&args);
    println!("{out}");
    for needle in [
        "Plan for rollout of 4.2.1",
        "app-4.2.1.zip",
        "batch 1: n1 (canary)",
        "batch 2: n2, n3",
        "orchestrator promote",
        "The rollout would run: 3 node(s) to upgrade, 0 skipped. Nothing was started.",
    ] {
        assert!(out.contains(needle), "{needle:?} in {out}");
    }
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let plan = c.cli_json(&json_args);
    assert_eq!(plan["dry_run"], true, "{plan}");
    assert_eq!(plan["acceptable"], true, "{plan}");
    assert_eq!(plan["refusal"], Value::Null, "{plan}");
    assert_eq!(plan["package"]["file"], "app-4.2.1.zip", "{plan}");
    assert_eq!(plan["package"]["signed"], false, "{plan}");
    assert_eq!(
        plan["batches"],
        json!([{"canary": true, "nodes": ["n1"], "wave": null}, {"canary": false, "nodes": ["n2", "n3"], "wave": null}])
    );
    for n in ["n1", "n2", "n3"] {
        let np = node_plan(&plan, n);
        assert_eq!(
            (&np["from"], &np["to"], &np["action"]),
            (&json!(V0), &json!(V1), &json!("stage")),
            "{np}"
        );
        assert!(
            np["detail"].as_str().unwrap().contains("stage, install"),
            "{np}"
        );
    }
    assert_eq!(footprint(&c), before, "a dry run changed something");

    // Not a patch hop: refused per node, both versions named, exit 1, nothing touched.
    let p3 = PkgSpec {
        name: "app".into(),
        version: "4.3.0".into(),
        payload: "app 4.3.0\n".into(),
        hook: None,
    }
    .build(c.dir.path(), &c.pkgs.join("other"))
    .display()
    .to_string();
    let o = c.cli(&["rollout", "4.3.0", "--package", &p3, "--dry-run", "--json"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let plan: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(plan["acceptable"], false, "{plan}");
    assert_eq!(plan["batches"], json!([]), "{plan}");
    for n in ["n1", "n2", "n3"] {
        let np = node_plan(&plan, n);
        assert_eq!(np["action"], "refused", "{np}");
        let d = np["detail"].as_str().unwrap();
        assert!(d.contains("4.2.0") && d.contains("4.3.0"), "{d}");
    }
    let err: Value = serde_json::from_str(stderr(&o).trim()).unwrap();
    assert_eq!(err["error"]["kind"], "refused", "{err}");
    assert_eq!(footprint(&c), before, "a refused dry run changed something");

    // An unreachable agent: named, the others still planned; the table says it is refused.
    c.node_mut("n3").kill_agent();
    let o = c.cli(&[
        "rollout",
        V1,
        "--package",
        &p1,
        "--dry-run",
        "--preflight-timeout",
        "2s",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let table = stdout(&o);
    println!("{table}");
    let n3 = table.lines().find(|l| l.starts_with("n3 ")).unwrap();
    assert!(n3.contains("REFUSED") && n3.contains("unreachable"), "{n3}");
    let n1 = table.lines().find(|l| l.starts_with("n1 ")).unwrap();
    assert!(n1.contains("stage, install"), "{n1}");
    assert!(table.contains("The rollout would be refused"), "{table}");
    assert!(stderr(&o).contains("n3:"), "{}", stderr(&o));

    // The same rollout for real: refused before the upload and before anything is recorded.
    let audits: Vec<String> = c.nodes.iter().map(|n| n.audit()).collect();
    let o = c.cli(&["rollout", V1, "--package", &p1, "--preflight-timeout", "2s"]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let err = stderr(&o);
    assert!(
        err.contains("n3:") && err.contains("nothing was uploaded or recorded"),
        "{err}"
    );
    assert!(!err.contains("Uploading"), "{err}");
    // Without a package (no upload to spare) the coordinators refuse it at start, also
    // before recording: a hop that is not patch-level.
    let o = c.cli(&["rollout", "4.3.0", "--nodes", "n1,n2", "--detach"]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let err = stderr(&o);
    assert!(
        err.contains("refused by preflight, nothing was recorded")
            && err.contains("n1:")
            && err.contains("4.3.0"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_eq!(c.cli_json(&["rollouts", "--all", "--json"]), json!([]));
    let audits_after: Vec<String> = c.nodes.iter().map(|n| n.audit()).collect();
    assert_eq!(audits_after, audits, "a refused rollout touched an agent");
    assert_eq!(
        footprint(&c).3,
        before.3,
        "a refused rollout stored a package"
    );

    // Once the node is back, the rollout runs and is the first in history.
    c.node_mut("n3").restart_agent();
    c.wait_for(FORM_TIMEOUT, "n3 to answer again", |c| {
        c.cli(&["rollout", V1, "--package", &p1, "--dry-run"])
            .status
            .success()
    });
    let fin = c.cli_json(&[
        "rollout",
        V1,
        "--package",
        &p1,
        "--min-healthy-time",
        "0ms",
        "--json",
    ]);
    assert_eq!(fin["id"], "r000001", "{fin}");
    assert_eq!(fin["phase"], "succeeded", "{fin}");
}

/// With a rollout running, a second `rollout V --package BIG` is refused before any byte of
/// the package is uploaded: nothing is stored on the coordinators.
#[test]
fn a_second_rollout_is_refused_before_its_package_is_uploaded() {
    let c = Cluster::start(ClusterOpts::state_only(1, 2));
    let p1 = c.package(V1, false).display().to_string();
    let out = c.cli_ok(&[
        "rollout",
        V1,
        "--package",
        &p1,
        "--min-healthy-time",
        "60s",
        "--detach",
    ]);
    assert_eq!(out.trim(), "r000001");
    c.wait_rollout(ROLLOUT_TIMEOUT, "the first health gate", |s| {
        step_of(s, "n1") == "verifying"
    });
    // A package of tens of MiB that does not compress.
    let mut rng = fastrand::Rng::with_seed(12);
    let payload: String = (0..24 << 20)
        .map(|_| char::from(b'!' + rng.u8(..90)))
        .collect();
    let big = PkgSpec {
        name: "app".into(),
        version: "4.2.2".into(),
        payload,
        hook: None,
    }
    .build(c.dir.path(), &c.pkgs.join("big"));
    let size = std::fs::metadata(&big).unwrap().len();
    assert!(size > 16 << 20, "{size}");
    let blobs_before: Vec<Vec<String>> = c
        .coords
        .iter()
        .map(|k| files_under(&k.data_dir.join("blobs")))
        .collect();
    let o = c.cli(&["rollout", "4.2.2", "--package", &big.display().to_string()]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let err = stderr(&o);
    println!("{err}");
    assert!(
        err.contains("r000001") && err.contains("one rollout at a time"),
        "{err}"
    );
    assert!(!err.contains("Uploading"), "asked before uploading: {err}");
    let blobs_after: Vec<Vec<String>> = c
        .coords
        .iter()
        .map(|k| files_under(&k.data_dir.join("blobs")))
        .collect();
    assert_eq!(
        blobs_after, blobs_before,
        "no byte of the package was stored"
    );
    let list = c.cli_json(&["rollouts", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    c.cli_ok(&["abort", "r000001"]);
}

/// `orchestrator node prune --keep N` by hand, on the local store and through the agent: the
/// releases beyond the newest N go, never the permanent one; `--keep 0` is refused.
#[test]
fn node_prune_keeps_the_newest_releases_locally_and_through_the_agent() {
    let c = Cluster::start(ClusterOpts::state_only(1, 1));
    let node = c.node("n1");
    let agent = node.agent();
    for v in ["4.2.1", "4.2.2", "4.2.3", "4.2.4"] {
        let pkg = c.package(v, false).display().to_string();
        agent.node_ok(&["upgrade", "--package", &pkg]);
    }
    let versions = |c: &Cluster| orch_tests::local_ok(&c.node("n1").root, &["versions"]);
    assert_eq!(
        versions(&c),
        "Installed versions:\n* 4.2.4\tpermanent\n* 4.2.3\told\n* 4.2.2\told\n* 4.2.1\told\n* 4.2.0\told\n"
    );

    let o = orch_tests::local(&node.root, &["prune", "--keep", "0"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));

    let out = orch_tests::local_ok(&node.root, &["prune", "--keep", "3"]);
    println!("{out}");
    assert!(out.contains("4.2.1") && out.contains("4.2.0"), "{out}");
    assert!(out.contains("Pruned 2 release(s)"), "{out}");
    assert_eq!(
        versions(&c),
        "Installed versions:\n* 4.2.4\tpermanent\n* 4.2.3\told\n* 4.2.2\told\n"
    );
    let again = orch_tests::local_ok(&node.root, &["prune", "--keep", "3"]);
    assert!(again.starts_with("Nothing to prune"), "{again}");

    let out: Value =
        serde_json::from_str(agent.node_ok(&["prune", "--keep", "1", "--json"]).trim()).unwrap();
    assert_eq!(out["removed"], json!(["4.2.3", "4.2.2"]), "{out}");
    assert_eq!(
        out["releases"],
        json!([{"version": "4.2.4", "state": "permanent"}])
    );
    assert_eq!(versions(&c), "Installed versions:\n* 4.2.4\tpermanent\n");
}

/// `--keep-releases N` (default 3): after each successful rollout every upgraded node keeps
/// its newest N releases; the permanent one and the one a rollback would return to always
/// stay. Four rollouts in a row leave exactly three; one with `--keep-releases 1` leaves the
/// new permanent release and the previous one.
#[test]
fn keep_releases_prunes_after_each_rollout_never_current_or_permanent() {
    let c = Cluster::start(ClusterOpts::state_only(1, 2));
    let roll = |v: &str, extra: &[&str]| {
        let pkg = c.package(v, false).display().to_string();
        let mut args = vec![
            "rollout",
            v,
            "--package",
            &pkg,
            "--min-healthy-time",
            "0ms",
            "--json",
        ];
        args.extend_from_slice(extra);
        let fin = c.cli_json(&args);
        assert_eq!(fin["phase"], "succeeded", "{fin}");
        fin
    };
    let versions = |id: &str| orch_tests::local_ok(&c.node(id).root, &["versions"]);
    for v in ["4.2.1", "4.2.2", "4.2.3"] {
        roll(v, &[]);
    }
    let fin = roll("4.2.4", &[]);
    for n in ["n1", "n2"] {
        assert_eq!(
            versions(n),
            "Installed versions:\n* 4.2.4\tpermanent\n* 4.2.3\told\n* 4.2.2\told\n",
            "{n}"
        );
        assert_eq!(
            c.node(n).audit_count("uninstall 4.2.0"),
            1,
            "{}",
            c.node(n).audit()
        );
        assert_eq!(
            c.node(n).audit_count("uninstall 4.2.1"),
            1,
            "{}",
            c.node(n).audit()
        );
    }
    let st = c.status_json(fin["id"].as_str().unwrap());
    let events = event_messages(&st);
    for n in ["n1", "n2"] {
        let line = format!("{n}: pruned 4.2.1 (keeping the newest 3 releases)");
        assert!(events.contains(&line), "{line:?} in {events:#?}");
    }
    assert!(
        events
            .iter()
            .any(|e| e.contains("pruning on every upgraded node")),
        "{events:#?}"
    );

    // Keeping one: 4.2.4 stays all the same, as what a rollback of this rollout returns to.
    let fin = roll("4.2.5", &["--keep-releases", "1"]);
    for n in ["n1", "n2"] {
        assert_eq!(
            versions(n),
            "Installed versions:\n* 4.2.5\tpermanent\n* 4.2.4\told\n",
            "{n}"
        );
    }
    let st = c.status_json(fin["id"].as_str().unwrap());
    assert!(
        event_messages(&st)
            .contains(&"n1: pruned 4.2.3, 4.2.2 (keeping the newest release)".to_string()),
        "{st}"
    );
    // 0 keeps everything.
    roll("4.2.6", &["--keep-releases", "0"]);
    assert_eq!(
        versions("n1"),
        "Installed versions:\n* 4.2.6\tpermanent\n* 4.2.5\told\n* 4.2.4\told\n"
    );
}

/// Regression: StartRollout runs preflight before recording, and used to turn the request's
/// preflight timeout into a deadline before the spec was validated: an absurd timeout
/// panicked the coordinator (found by hostile_grpc). It is refused as invalid now, nothing
/// recorded, the coordinator alive.
#[test]
fn an_invalid_spec_is_refused_before_preflight_turns_it_into_deadlines() {
    let mut c = Cluster::start(ClusterOpts::state_only(1, 1));
    let addr = c.addrs()[0].clone();
    let refused = orch_tests::rt().block_on(async {
        let mut client = orch_client::Client::new(vec![addr], orch_tls::Security::Insecure);
        client
            .start_rollout(orch_client::control::StartRolloutRequest {
                version: V1.into(),
                preflight_timeout_ms: Some(u64::MAX),
                ..Default::default()
            })
            .await
    });
    let err = refused
        .expect_err("an absurd preflight timeout is refused")
        .to_string();
    assert!(err.contains("preflight"), "{err}");
    assert!(c.coord(1).is_running(), "{}", c.coord(1).log());
    assert!(
        !c.coord(1).log().contains("panicked"),
        "{}",
        c.coord(1).log()
    );
    assert_eq!(c.cli_json(&["rollouts", "--json"]), json!([]));
}
