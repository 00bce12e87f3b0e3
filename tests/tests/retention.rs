//! Bounded coordinator state: finished rollouts beyond `--retain-rollouts` move out of the
//! replicated state into every coordinator's `DATA/history.jsonl` (still listed by
//! `rollouts --all` and shown by `status ID`), and the packages only they used are deleted
//! from every coordinator's `DATA/blobs`.
//!
//! Build the binaries first: `cargo build --bins`.

use std::time::Duration;

use orch_tests::cluster::*;
use orch_tests::{list_dir, read_or_empty};
use serde_json::Value;

const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(60);

fn ids(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|r| r["id"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// 3 coordinators keeping 2 finished rollouts, 4 rollouts each with its own package
/// (4.2.1 .. 4.2.4): the state keeps r3 and r4, every coordinator's history holds r1 and r2
/// (`rollouts --all` lists all 4 through each coordinator, `status r000001` still shows its
/// events), and the packages of r1 and r2 are deleted from every coordinator once the (test-
/// shortened) grace period after their upload is over, while r3's and r4's stay.
#[test]
fn old_rollouts_move_to_every_coordinators_history_and_their_packages_are_deleted() {
    let c = Cluster::start(ClusterOpts::state_only(3, 2).coordinator_args(&[
        "--retain-rollouts",
        "2",
        "--gc-grace",
        "2s",
    ]));
    let versions = ["4.2.1", "4.2.2", "4.2.3", "4.2.4"];
    let mut shas = Vec::new();
    for v in versions {
        let pkg = c.package(v, false);
        shas.push(orch_release::package::sha256_file(&pkg).unwrap().0);
        let pkg = pkg.display().to_string();
        c.cli_ok(&["rollout", v, "--package", &pkg, "--min-healthy-time", "0s"]);
    }
    let want_all: Vec<String> = (1..=4).map(|i| format!("r{i:06}")).collect();
    let want_kept = want_all[2..].to_vec();

    // Archiving follows the end of each rollout; followers apply it a moment later.
    for coord in &c.coords {
        let via = vec![coord.addr.clone()];
        c.wait_for(
            ROLLOUT_TIMEOUT,
            &format!("coordinator {} to keep 2 rollouts", coord.id),
            |c| {
                let o = orch_tests::run_bounded(
                    c.cli_cmd_via(&via, &["rollouts", "--json"]),
                    orch_tests::CLI_TIMEOUT,
                );
                o.status.success()
                    && serde_json::from_str::<Value>(orch_tests::stdout(&o).trim())
                        .is_ok_and(|v| ids(&v) == want_kept)
            },
        );
        let all = cli_json_via(&c, &via, &["rollouts", "--all", "--json"]);
        assert_eq!(ids(&all), want_all, "coordinator {}: {all}", coord.id);
        for r in all.as_array().unwrap() {
            assert_eq!(r["phase"], "succeeded", "{r}");
            assert_eq!(r["nodes"].as_array().map(Vec::len), Some(2), "{r}");
            assert!(r["created_at_ms"].as_u64().unwrap_or(0) > 0, "{r}");
        }
        assert_eq!(all[0]["version"], "4.2.1");
        // The history file holds what left the state, with the whole audit trail.
        let history = read_or_empty(&coord.data_dir.join("history.jsonl"));
        for id in ["r000001", "r000002"] {
            assert!(
                history.contains(&format!("{{\"id\":\"{id}\"")),
                "coordinator {}: {id} not in its history:\n{history}",
                coord.id
            );
        }
        assert!(!history.contains("\"id\":\"r000003\""), "{history}");

        // `status ID` finds an archived rollout, with its events.
        let st = cli_json_via(&c, &via, &["status", "r000001", "--json"]);
        assert_eq!(st["id"], "r000001");
        assert_eq!(st["version"], "4.2.1");
        assert_eq!(st["phase"], "succeeded");
        let events = event_messages(&st);
        assert!(
            events.iter().any(|e| e.contains("n1: healthy on 4.2.1")),
            "{events:?}"
        );
        assert!(events.len() > 5, "{events:?}");
        let human = c.cli_ok(&["status", "r2"]);
        assert!(
            human.contains("Rollout r000002 to 4.2.2: succeeded"),
            "{human}"
        );
        // Watching an archived rollout shows its final status and ends.
        let watched = cli_json_via(&c, &via, &["status", "r000002", "--watch", "--json"]);
        assert_eq!(watched["phase"], "succeeded", "{watched}");
    }

    // Package GC: r1's and r2's packages leave every coordinator; r3's and r4's stay.
    for coord in &c.coords {
        let blobs = coord.data_dir.join("blobs");
        c.wait_for(
            Duration::from_secs(30),
            &format!(
                "the packages of r1 and r2 deleted on coordinator {}",
                coord.id
            ),
            |_| {
                let names = list_dir(&blobs);
                !names
                    .iter()
                    .any(|n| n.starts_with(&shas[0]) || n.starts_with(&shas[1]))
            },
        );
        let names = list_dir(&blobs);
        for sha in &shas[2..] {
            assert!(
                names.contains(sha),
                "coordinator {}: the package of a kept rollout is gone: {names:?}",
                coord.id
            );
        }
        // The sweep deletes the files, then logs the round: wait for the line too.
        c.wait_for(
            Duration::from_secs(10),
            &format!("coordinator {} to log its GC round", coord.id),
            |_| coord.log().contains("package GC: deleted blobs"),
        );
    }
    let leader = c
        .coords
        .iter()
        .find(|p| p.log().contains("retention: archived"));
    assert!(
        leader.is_some(),
        "no coordinator logged an archive batch\n{}",
        c.logs()
    );

    // A fifth rollout: r3 leaves the state in turn.
    let pkg = c.package("4.2.5", false).display().to_string();
    c.cli_ok(&[
        "rollout",
        "4.2.5",
        "--package",
        &pkg,
        "--min-healthy-time",
        "0s",
    ]);
    c.wait_for(ROLLOUT_TIMEOUT, "r3 archived after r5", |c| {
        let list = c.cli_json(&["rollouts", "--json"]);
        ids(&list) == ["r000004", "r000005"]
    });
    let all = c.cli_json(&["rollouts", "--all", "--json"]);
    assert_eq!(ids(&all).len(), 5, "{all}");
}

/// `--retain-rollouts 0` is refused before anything starts, with what to do instead.
#[test]
fn retaining_no_rollouts_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let o = orch_tests::orch(&[
        "coordinator",
        "--id",
        "1",
        "--listen",
        "127.0.0.1:1",
        "--data-dir",
        &dir.path().join("d").display().to_string(),
        "--insecure",
        "--retain-rollouts",
        "0",
    ]);
    assert!(!o.status.success());
    let err = orch_tests::stderr(&o);
    assert!(
        err.contains("--retain-rollouts") && err.contains("at least 1"),
        "{err}"
    );
    // The same in the config file.
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "id = 1\nlisten = \"127.0.0.1:1\"\ndata-dir = \"{}\"\ninsecure = true\nretain-rollouts = 0\n",
            dir.path().join("d").display()
        ),
    )
    .unwrap();
    let o = orch_tests::orch(&["coordinator", "--config", &cfg.display().to_string()]);
    assert!(!o.status.success());
    let err = orch_tests::stderr(&o);
    assert!(
        err.contains("retain-rollouts = 0") && err.contains("at least 1"),
        "{err}"
    );
    assert!(!dir.path().join("d").exists(), "nothing started");
}

fn cli_json_via(c: &Cluster, via: &[String], args: &[&str]) -> Value {
    let o = orch_tests::run_bounded(c.cli_cmd_via(via, args), orch_tests::CLI_TIMEOUT);
    assert!(
        o.status.success(),
        "{args:?} via {via:?} failed: {} {}\n{}",
        orch_tests::stdout(&o),
        orch_tests::stderr(&o),
        c.logs()
    );
    serde_json::from_str(orch_tests::stdout(&o).trim())
        .unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e})"))
}
