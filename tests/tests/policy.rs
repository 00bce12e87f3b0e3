//! Rollout policies across a real cluster (issue #16): waves by a node label, percentage
//! batches, a label selector and a bound on unavailable nodes, driven by the `orchestrator` CLI
//! against coordinator and agent processes on loopback (state-only nodes: the order is what
//! matters here, not the service).
//!
//! Build the binaries first: `cargo build --bins`.

use orch_tests::cluster::*;
use orch_tests::{stderr, stdout};
use serde_json::Value;

/// Six nodes in three zones, deliberately not in id order: zone a is n2, n5; zone b n1, n4;
/// zone c n3, n6. Node 7 (when asked for) has no zone.
fn three_zones(extra_unlabelled: bool) -> Cluster {
    let zones = ["b", "a", "c", "b", "a", "c"];
    let mut opts = ClusterOpts::state_only(1, zones.len() + usize::from(extra_unlabelled));
    let labels: Vec<String> = zones.iter().map(|z| format!("zone={z}")).collect();
    for (i, l) in labels.iter().enumerate() {
        opts = opts.agent_args(i + 1, &["--label", l, "--label", "role=web"]);
    }
    Cluster::start(opts)
}

fn zone_nodes(zone: &str) -> &'static [&'static str] {
    match zone {
        "a" => &["n2", "n5"],
        "b" => &["n1", "n4"],
        _ => &["n3", "n6"],
    }
}

/// Index of the event `node: MESSAGE...` (the first one), panicking with the trail if absent.
fn at(st: &Value, node: &str, what: &str) -> usize {
    let needle = format!("{node}: {what}");
    event_messages(st)
        .iter()
        .position(|m| m.starts_with(&needle))
        .unwrap_or_else(|| panic!("no event {needle:?} in {st}"))
}

/// `rollout V1 --package PKG --wave-by zone --batch-size 50% --max-unavailable 1 EXTRA...`.
fn zoned<'a>(pkg: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "rollout",
        V1,
        "--package",
        pkg,
        "--wave-by",
        "zone",
        "--batch-size",
        "50%",
        "--max-unavailable",
        "1",
    ];
    a.extend_from_slice(extra);
    a
}

#[test]
fn wave_by_zone_upgrades_zone_by_zone_in_half_zone_batches() {
    let c = three_zones(false);
    let pkg = c.package(V1, false).display().to_string();

    // The dry run shows the waves and the batches inside them.
    let plan = c.cli_json(&zoned(&pkg, &["--dry-run", "--json"]));
    assert_eq!(plan["acceptable"], true, "{plan}");
    let batches: Vec<(String, Vec<String>)> = plan["batches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["wave"].as_str().unwrap_or_default().to_string(),
                serde_json::from_value(b["nodes"].clone()).unwrap(),
            )
        })
        .collect();
    let expect: Vec<(String, Vec<String>)> = [
        ("a", "n2"),
        ("a", "n5"),
        ("b", "n1"),
        ("b", "n4"),
        ("c", "n3"),
        ("c", "n6"),
    ]
    .iter()
    .map(|(w, n)| (w.to_string(), vec![n.to_string()]))
    .collect();
    assert_eq!(batches, expect, "{plan}");
    assert_eq!(plan["policy"]["wave_by"], "zone", "{plan}");
    assert_eq!(plan["policy"]["batch"], "50%", "{plan}");
    assert_eq!(plan["policy"]["max_unavailable_nodes"], 1, "{plan}");
    let table = c.cli_ok(&zoned(&pkg, &["--dry-run"]));
    for line in [
        "batch size 50%, canary 0",
        "waves by zone: a (2), then b (2), then c (2)",
        "at most 1 node(s) unavailable at once (1; none unhealthy now)",
        "batch 1: wave zone=a: n2",
        "batch 6: wave zone=c: n6",
    ] {
        assert!(table.contains(line), "{line:?} not in {table}");
    }

    let o = c.cli(&zoned(
        &pkg,
        &["--min-healthy-time", "200ms", "--healthy-deadline", "20s"],
    ));
    assert!(
        o.status.success(),
        "rollout failed ({}): {}\n{}\n{}",
        o.status,
        stdout(&o),
        stderr(&o),
        c.logs()
    );
    let st = c.status_json("");
    assert_eq!(st["phase"], "succeeded", "{st}");
    let human = c.cli_ok(&["status"]);
    assert!(
        human.contains("policy: waves by zone (a, b, c), batches of 50%, at most 1 unavailable"),
        "{human}"
    );

    // The policy as status shows it.
    let p = &st["policy"];
    assert_eq!(p["wave_by"], "zone", "{st}");
    assert_eq!(p["batch"], "50%", "{st}");
    assert_eq!(p["max_unavailable"], "1", "{st}");
    assert_eq!(p["unhealthy_at_start"], serde_json::json!([]), "{st}");
    let waves: Vec<(String, Vec<String>)> = p["waves"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["label_value"].as_str().unwrap().to_string(),
                serde_json::from_value(w["nodes"].clone()).unwrap(),
            )
        })
        .collect();
    let want: Vec<(String, Vec<String>)> = ["a", "b", "c"]
        .iter()
        .map(|z| {
            (
                z.to_string(),
                zone_nodes(z).iter().map(|n| n.to_string()).collect(),
            )
        })
        .collect();
    assert_eq!(waves, want, "{st}");
    // The nodes in wave order.
    let order: Vec<&str> = st["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    assert_eq!(order, ["n2", "n5", "n1", "n4", "n3", "n6"], "{st}");

    // Zone by zone: every node of a zone healthy on the target before any node of the next
    // one is installed; inside a zone, one node (50% of 2) at a time.
    for (earlier, later) in [("a", "b"), ("b", "c")] {
        let last_healthy = zone_nodes(earlier)
            .iter()
            .map(|n| at(&st, n, &format!("healthy on {V1}")))
            .max()
            .unwrap();
        let first_installed = zone_nodes(later)
            .iter()
            .map(|n| at(&st, n, &format!("installed {V1}")))
            .min()
            .unwrap();
        assert!(
            last_healthy < first_installed,
            "zone {later} installed before zone {earlier} was healthy: {st}"
        );
    }
    for z in ["a", "b", "c"] {
        let [first, second] = zone_nodes(z) else {
            unreachable!()
        };
        assert!(
            at(&st, first, &format!("healthy on {V1}"))
                < at(&st, second, &format!("installed {V1}")),
            "zone {z}: both halves at once: {st}"
        );
    }
    for n in ["n1", "n2", "n3", "n4", "n5", "n6"] {
        assert_eq!(json_step(&st, n), "committed", "{st}");
    }
}

#[test]
fn bad_policies_are_refused_with_the_reason() {
    let c = three_zones(true);
    let pkg = c.package(V1, false).display().to_string();
    let refused = |args: &[&str], needle: &str| {
        let mut a = vec!["rollout", V1, "--package", pkg.as_str()];
        a.extend_from_slice(args);
        let o = c.cli(&a);
        let err = stderr(&o);
        assert!(!o.status.success(), "{args:?} was accepted: {}", stdout(&o));
        assert!(err.contains(needle), "{args:?}: {needle:?} not in {err}");
    };
    // The parser refuses what is not a count or a percentage.
    for bad in ["0%", "150%", "abc", "0"] {
        refused(&["--batch-size", bad], "invalid node count");
    }
    refused(&["--max-unavailable", "101%"], "invalid node count");
    refused(&["--selector", "zone"], "is not K=V");
    // The coordinators refuse what does not fit the registered nodes, naming it.
    refused(
        &["--wave-by", "rack"],
        "no node of the rollout has the label \"rack\"",
    );
    refused(
        &["--nodes", "n1,n99", "--wave-by", "zone"],
        "node n99 is not registered",
    );
    // n7 has no zone.
    refused(&["--wave-by", "zone"], "node(s) n7 have no label \"zone\"");
    refused(
        &["--selector", "zone=x"],
        "no registered node matches --selector zone=x",
    );
    refused(
        &["--nodes", "n1,n2", "--selector", "zone=a"],
        "node(s) n1 named in --nodes do not match --selector zone=a",
    );
    // A selector that excludes n7 makes the waves complete: the dry run shows them.
    let plan = c.cli_json(&[
        "rollout",
        V1,
        "--package",
        &pkg,
        "--selector",
        "role=web",
        "--wave-by",
        "zone",
        "--dry-run",
        "--json",
    ]);
    assert_eq!(plan["acceptable"], true, "{plan}");
    let nodes: Vec<&str> = plan["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    assert_eq!(nodes, ["n2", "n5", "n1", "n4", "n3", "n6"], "{plan}");
    assert_eq!(plan["policy"]["selector"]["role"], "web", "{plan}");
    // Nothing was recorded by any refusal.
    let list = c.cli_json(&["rollouts", "--all", "--json"]);
    assert_eq!(list, serde_json::json!([]), "{list}");
}

#[test]
fn promote_each_wave_stops_between_zones_until_promoted() {
    let c = three_zones(false);
    let pkg = c.package(V1, false).display().to_string();
    let mut args = zoned(&pkg, &["--promote-each-wave", "--exit-on-pause"]);
    args.extend(["--min-healthy-time", "200ms", "--healthy-deadline", "20s"]);
    let o = c.cli(&args);
    assert_eq!(
        o.status.code(),
        Some(4),
        "expected a stop after zone a: {}\n{}",
        stdout(&o),
        stderr(&o)
    );
    for (zone, step) in [("a", "upgraded"), ("b", "staged"), ("c", "staged")] {
        let st = c.status_json("");
        assert_eq!(st["awaiting_promotion"], true, "{st}");
        assert_eq!(st["policy"]["promote_each_wave"], true, "{st}");
        for n in zone_nodes(zone) {
            assert_eq!(json_step(&st, n), step, "zone {zone}: {st}");
        }
    }
    let human = c.cli_ok(&["status"]);
    assert!(
        human.contains("(wave done: waiting for `orchestrator promote`)"),
        "{human}"
    );
    c.cli_ok(&["promote"]);
    let o = c.cli(&["status", "--watch", "--exit-on-pause"]);
    assert_eq!(
        o.status.code(),
        Some(4),
        "a stop after zone b: {}",
        stderr(&o)
    );
    let st = c.status_json("");
    for n in zone_nodes("b") {
        assert_eq!(json_step(&st, n), "upgraded", "{st}");
    }
    for n in zone_nodes("c") {
        assert_eq!(json_step(&st, n), "staged", "{st}");
    }
    assert!(
        count_events(&st, "waiting for promote before wave zone=c") == 1,
        "{st}"
    );
    c.cli_ok(&["promote"]);
    // No stop after the last zone: it commits.
    let o = c.cli(&["status", "--watch", "--exit-on-pause"]);
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    let st = c.status_json("");
    assert_eq!(st["phase"], "succeeded", "{st}");
}

#[test]
fn a_wave_pause_holds_every_upgraded_node_healthy_between_zones() {
    let c = three_zones(false);
    let pkg = c.package(V1, false).display().to_string();
    // Without waves there is nothing to pause between: refused before anything is recorded.
    let o = c.cli(&["rollout", V1, "--package", &pkg, "--wave-pause", "1s"]);
    assert!(!o.status.success(), "{}", stdout(&o));
    assert!(
        stderr(&o).contains("a wave pause needs waves: add --wave-by LABEL"),
        "{}",
        stderr(&o)
    );
    let mut args = zoned(&pkg, &["--wave-pause", "1s"]);
    args.extend(["--min-healthy-time", "200ms", "--healthy-deadline", "20s"]);
    let o = c.cli(&args);
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    let st = c.status_json("");
    assert_eq!(st["phase"], "succeeded", "{st}");
    assert_eq!(st["policy"]["wave_pause_ms"], 1_000, "{st}");
    let human = c.cli_ok(&["status"]);
    assert!(human.contains("wave pause 1s"), "{human}");
    // Before zone b, both nodes of zone a stay healthy through the pause; before zone c, the
    // four nodes of a and b do. Only then is the next zone's first node installed.
    for (before, held, later) in [("b", &["a"][..], "b"), ("c", &["a", "b"][..], "c")] {
        let over = event_index(
            &st,
            &format!("every upgraded node stayed healthy for 1s; starting wave zone={before}"),
        )
        .unwrap_or_else(|| panic!("no pause before zone {before}: {st}"));
        let first_installed = zone_nodes(later)
            .iter()
            .map(|n| at(&st, n, &format!("installed {V1}")))
            .min()
            .unwrap();
        assert!(
            over < first_installed,
            "zone {later} before its pause: {st}"
        );
        let held: Vec<&str> = held
            .iter()
            .flat_map(|z| zone_nodes(z).iter().copied())
            .collect();
        let n = held.len();
        let started = event_index(
            &st,
            &format!("wave pause 1s before wave zone={before}: the {n} nodes upgraded so far must stay healthy"),
        )
        .unwrap_or_else(|| panic!("no pause announced before zone {before}: {st}"));
        for node in held {
            let passed = event_messages(&st)
                .iter()
                .enumerate()
                .filter(|(i, m)| {
                    *i > started
                        && *i < over
                        && **m
                            == format!("{node}: stayed healthy on {V1} through the wave pause (1s)")
                })
                .count();
            assert_eq!(
                passed, 1,
                "{node} through the pause before zone {before}: {st}"
            );
        }
    }
    // None after the last zone: the commit follows.
    assert_eq!(count_events(&st, "wave pause 1s before"), 2, "{st}");
}
