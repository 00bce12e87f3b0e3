//! Rollouts across a real cluster: `orchestrator coordinator` and `orchestrator agent`
//! processes on loopback, each agent managing a hot-swappable demo service (or, where only the
//! orchestration matters, a state-only release store), driven by the `orchestrator` CLI.
//!
//! Build the binaries first: `cargo build --bins` (the demo-service binary comes with it).

use std::time::{Duration, Instant};

use orch_tests::cluster::*;
use orch_tests::{stderr, stdout};

const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(60);

/// An activation command for one node: records its pid (= its process group, the store starts
/// it in its own group), waits 3 s, then runs the release's own hook.
const SLOW_ACTIVATE: &str = "#!/bin/sh\n\
    echo $$ > \"$ORCH_ROOT_DIR/slow-activate.pid\"\n\
    sleep 3\n\
    exec \"$ORCH_RELEASE_DIR/hooks/activate\" \"$@\"\n";

fn rollout_args<'a>(pkg: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["rollout", V1, "--package", pkg];
    a.extend_from_slice(extra);
    a
}

/// Every node of `nodes --json` runs `expect` as `(version, state)` pairs and is healthy.
///
/// Reports of a node's releases are ordered per agent process (`VersionStamp`), so a periodic
/// re-registration read before a step can no longer land after the step's own report and put
/// the old releases back (it used to, for up to one 5 s registration period). The only lag
/// left is a follower that has not applied the last entry yet, so this re-reads `nodes --json`
/// for at most 1 s.
fn assert_nodes(c: &Cluster, nodes: &serde_json::Value, ids: &[&str], expect: &[(&str, &str)]) {
    let want: Vec<(String, String)> = expect
        .iter()
        .map(|(v, s)| (v.to_string(), s.to_string()))
        .collect();
    let ok = |nodes: &serde_json::Value| {
        ids.iter()
            .all(|id| node_versions(nodes, id) == want && node_entry(nodes, id)["healthy"] == true)
    };
    if ok(nodes) {
        return;
    }
    let start = Instant::now();
    let mut last = nodes.clone();
    while start.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(50));
        last = c.nodes_json();
        if ok(&last) {
            return;
        }
    }
    assert_nodes_now(c, &last, ids, expect);
}

fn assert_nodes_now(c: &Cluster, nodes: &serde_json::Value, ids: &[&str], expect: &[(&str, &str)]) {
    let want: Vec<(String, String)> = expect
        .iter()
        .map(|(v, s)| (v.to_string(), s.to_string()))
        .collect();
    for id in ids {
        assert_eq!(
            node_versions(nodes, id),
            want,
            "node {id} in {nodes}\n{}",
            c.logs()
        );
        assert_eq!(
            node_entry(nodes, id)["healthy"],
            true,
            "node {id} unhealthy: {nodes}"
        );
    }
}

#[test]
fn rollout_upgrades_every_node_hot_and_commits() {
    let c = upgrade_every_node_hot(ClusterOpts::demo(3, 3));
    // In insecure mode nobody is authenticated: the name the CLI claims is marked so.
    let st = c.status_json("");
    let by = st["requested_by"].as_str().unwrap_or_default();
    assert!(by.ends_with("(unverified)"), "{st}");
}

/// The same scenario with mutual TLS on every channel (operator -> coordinator, Raft and blob
/// copies between coordinators, coordinator -> agent pushes and steps, agent registration):
/// the audit trail names the operator from the certificate.
#[test]
fn rollout_under_mutual_tls_upgrades_every_node_and_records_the_certified_operator() {
    let c = upgrade_every_node_hot(ClusterOpts::demo(3, 3).mtls());
    let st = c.status_json("");
    assert_eq!(st["requested_by"], "operator/alice", "{st}");
    let out = c.cli_ok(&["status"]);
    assert!(out.contains("requested by operator/alice"), "{out}");
}

/// Rolls 4.2.1 out across `opts`' demo cluster under client load, asserting every node is
/// hot-swapped, committed and never dropped a request.
fn upgrade_every_node_hot(opts: ClusterOpts) -> Cluster {
    let c = Cluster::start(opts);
    let pkg = c.package(V1, false).display().to_string();
    let load = ServiceLoad::start(&c.services());
    let watch = HealthWatch::start(c.services());
    let t = Instant::now();
    let o = c.cli(&rollout_args(
        &pkg,
        &["--min-healthy-time", "500ms", "--healthy-deadline", "20s"],
    ));
    let took = t.elapsed();
    let (seen, misses) = watch.stop();
    let reports = load.stop();
    assert!(
        o.status.success(),
        "rollout failed ({}): {}\n{}\n{}",
        o.status,
        stdout(&o),
        stderr(&o),
        c.logs()
    );
    let out = stdout(&o);
    assert!(out.contains("Rollout r000001 succeeded"), "{out}");
    // It printed the steps as they happened.
    for n in ["n1", "n2", "n3"] {
        assert!(out.contains(&format!("{n}: installed 4.2.1")), "{out}");
    }
    println!("rollout of 3 demo nodes took {took:?}");

    let nodes = c.nodes_json();
    assert_nodes(
        &c,
        &nodes,
        &["n1", "n2", "n3"],
        &[(V1, "permanent"), (V0, "old")],
    );
    let st = c.status_json("");
    assert_eq!(st["phase"], "succeeded", "{st}");
    for n in ["n1", "n2", "n3"] {
        assert_eq!(json_step(&st, n), "committed", "{st}");
    }

    // The services answered throughout: no client request failed, none went unanswered.
    for (i, r) in reports.iter().enumerate() {
        println!(
            "service n{}: {} served, {} failed, by version {:?}",
            i + 1,
            r.served,
            r.failures,
            r.by_version
        );
        assert!(r.served > 0, "no load reached n{}", i + 1);
        assert_eq!(
            r.failures,
            0,
            "n{}: requests failed during the rollout: {:?}",
            i + 1,
            r.failure_samples
        );
        assert!(
            r.by_version.contains_key(V1),
            "n{}: {:?}",
            i + 1,
            r.by_version
        );
    }
    for (i, s) in seen.iter().enumerate() {
        let versions: Vec<&str> = s.iter().map(|(v, _)| v.as_str()).collect();
        assert_eq!(versions, [V0, V1], "n{}: /health saw {s:?}", i + 1);
        assert_eq!(misses[i], 0, "n{}: /health went unanswered", i + 1);
    }
    c
}

#[test]
fn broken_release_fails_its_health_gate_and_every_touched_node_is_downgraded() {
    let c = Cluster::start(ClusterOpts::demo(3, 3));
    let pkg = c.package(V1, true).display().to_string();
    let load = ServiceLoad::start(&c.services());
    let o = c.cli(&rollout_args(
        &pkg,
        &["--min-healthy-time", "500ms", "--healthy-deadline", "2s"],
    ));
    let reports = load.stop();
    assert_eq!(
        o.status.code(),
        Some(1),
        "a rolled-back rollout exits 1: {}\n{}\n{}",
        stdout(&o),
        stderr(&o),
        c.logs()
    );
    assert!(
        stderr(&o).contains("rolled_back"),
        "the error names the end: {}",
        stderr(&o)
    );

    let st = c.status_json("r000001");
    assert_eq!(st["phase"], "rolled_back", "{st}");
    let err = st["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("n1") && err.contains("health gate"),
        "the error says which node failed and how: {err:?}"
    );
    // The first node failed its gate; it, and only it, was touched and downgraded.
    // (Twice: the node's failure, then the start of the rollback quoting it.)
    assert!(
        count_events(&st, "n1: health gate on 4.2.1 failed") >= 1,
        "{st}"
    );
    assert_eq!(count_events(&st, "n1: downgraded to 4.2.0"), 1, "{st}");
    assert_eq!(
        count_events(&st, "n1: rolled back to 4.2.0 and healthy"),
        1,
        "{st}"
    );
    assert_eq!(json_step(&st, "n1"), "rolled_back", "{st}");
    for n in ["n2", "n3"] {
        assert_eq!(
            count_events(&st, &format!("{n}: install 4.2.1")),
            0,
            "{n} must not be installed after n1 failed: {st}"
        );
        assert_eq!(
            c.node(n).audit_count(" install "),
            0,
            "{}",
            c.node(n).audit()
        );
    }
    assert_eq!(c.node("n1").audit_count(" install 4.2.1"), 1);
    assert_eq!(c.node("n1").audit_count(" downgrade 4.2.0"), 1);

    // Every node is back on (or still on) 4.2.0, permanent and healthy.
    let nodes = c.nodes_json();
    assert_nodes(&c, &nodes, &["n1"], &[(V1, "old"), (V0, "permanent")]);
    assert_nodes(
        &c,
        &nodes,
        &["n2", "n3"],
        &[(V1, "unpacked"), (V0, "permanent")],
    );
    for n in &c.nodes {
        let (v, _) = n.health().expect("the service answers");
        assert_eq!(v, V0, "{} runs {v}", n.id);
    }
    // A broken release still serves `/`: no client request failed through both swaps.
    for (i, r) in reports.iter().enumerate() {
        assert!(r.served > 0);
        assert_eq!(r.failures, 0, "n{}: {:?}", i + 1, r.failure_samples);
    }
}

/// Every node went through each step exactly once, in order: staged, installed, healthy,
/// permanent; node k+1's install started only after node k was healthy.
fn assert_each_step_once(st: &serde_json::Value, nodes: &[&str]) {
    for n in nodes {
        for needle in [
            format!("{n}: stage 4.2.1 [seq"),
            format!("{n}: staged 4.2.1"),
            format!("{n}: install 4.2.1 [seq"),
            format!("{n}: installed 4.2.1"),
            format!("{n}: health gate on 4.2.1 [seq"),
            format!("{n}: healthy on 4.2.1"),
            format!("{n}: make 4.2.1 permanent [seq"),
            format!("{n}: 4.2.1 is permanent"),
        ] {
            assert_eq!(
                count_events(st, &needle),
                1,
                "{needle:?} should appear exactly once in {:#?}",
                event_messages(st)
            );
        }
    }
    for w in nodes.windows(2) {
        let healthy = event_index(st, &format!("{}: healthy on 4.2.1", w[0])).unwrap();
        let next = event_index(st, &format!("{}: install 4.2.1 [seq", w[1])).unwrap();
        assert!(
            healthy < next,
            "{} installed before {} was healthy",
            w[1],
            w[0]
        );
    }
}

/// The first event recorded at or after `at_ms`: (its time, message, by).
fn first_event_after(st: &serde_json::Value, at_ms: u64) -> Option<(u64, String, String)> {
    st["events"].as_array()?.iter().find_map(|e| {
        let t = e["at_ms"].as_u64()?;
        (t >= at_ms).then(|| {
            (
                t,
                e["message"].as_str().unwrap_or_default().to_string(),
                e["by"].as_str().unwrap_or_default().to_string(),
            )
        })
    })
}

#[test]
fn leader_killed_mid_rollout_another_takes_over_and_the_waiting_cli_follows_it() {
    let mut c = Cluster::start(ClusterOpts::demo(3, 3));
    let pkg = c.package(V1, false).display().to_string();
    let watch = HealthWatch::start(c.services());
    let mut bg = c.spawn_cli(&rollout_args(
        &pkg,
        &["--min-healthy-time", "2s", "--healthy-deadline", "30s"],
    ));
    c.wait_rollout(ROLLOUT_TIMEOUT, "n2 in its health gate", |s| {
        step_of(s, "n2") == "verifying"
    });
    let old = c.wait_for_leader(Duration::from_secs(5));
    let kill_ms = now_ms();
    let t_kill = Instant::now();
    c.coord(old).kill9();
    let new = c.wait_for_leader(Duration::from_secs(15));
    let elected = t_kill.elapsed();
    assert_ne!(new, old);

    let o = bg.wait(ROLLOUT_TIMEOUT);
    let (seen, _) = watch.stop();
    assert!(
        o.status.success(),
        "the waiting rollout must follow the new leader to success ({}): {}\n{}\n{}",
        o.status,
        o.stdout,
        o.stderr,
        c.logs()
    );
    assert!(
        o.stdout.contains("Rollout r000001 succeeded"),
        "{}",
        o.stdout
    );

    let st = c.status_json("r000001");
    assert_eq!(st["phase"], "succeeded", "{st}");
    assert_each_step_once(&st, &["n1", "n2", "n3"]);
    let (next_ms, next_msg, next_by) =
        first_event_after(&st, kill_ms).expect("an event after the kill");
    assert_eq!(
        next_by,
        format!("coordinator-{new}"),
        "the new leader recorded it"
    );
    println!(
        "leader {old} killed during n2's health gate: coordinator {new} elected after {elected:?}; \
         next step recorded {} ms after the kill ({next_msg:?}; includes re-running the 2 s gate)",
        next_ms - kill_ms
    );

    // Each agent performed the install exactly once (one fenced install in its audit log)...
    for n in &c.nodes {
        assert_eq!(
            n.audit_count(" install 4.2.1"),
            1,
            "{}: {}",
            n.id,
            n.audit()
        );
        assert_eq!(
            n.audit_count(" permanent 4.2.1"),
            1,
            "{}: {}",
            n.id,
            n.audit()
        );
    }
    // ... and each service was switched exactly once: one process on 4.2.0, then one on 4.2.1.
    for (i, s) in seen.iter().enumerate() {
        let versions: Vec<&str> = s.iter().map(|(v, _)| v.as_str()).collect();
        assert_eq!(versions, [V0, V1], "n{}: /health saw {s:?}", i + 1);
    }
    let nodes = c.nodes_json();
    assert_nodes(
        &c,
        &nodes,
        &["n1", "n2", "n3"],
        &[(V1, "permanent"), (V0, "old")],
    );
}

#[test]
fn agent_killed_mid_install_fails_that_node_and_the_others_are_rolled_back() {
    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("slow-activate");
    orch_tests::write_script(&script, SLOW_ACTIVATE);
    let script_s = script.display().to_string();
    let mut c =
        Cluster::start(ClusterOpts::demo(3, 3).agent_args(2, &["--activate-cmd", &script_s]));
    let pkg = c.package(V1, false).display().to_string();
    let mut bg = c.spawn_cli(&rollout_args(
        &pkg,
        &["--min-healthy-time", "500ms", "--healthy-deadline", "10s"],
    ));
    let marker = c.node("n2").root.join("slow-activate.pid");
    c.wait_for(ROLLOUT_TIMEOUT, "n2's activation to start", |_| {
        marker.is_file() && !orch_tests::read_or_empty(&marker).trim().is_empty()
    });
    assert_eq!(step_of(&c.ctl_status("").unwrap(), "n2"), "installing");
    c.node_mut("n2").kill_agent();
    // The hook survives its agent (own process group): kill it too, before it switches.
    let hook: i32 = orch_tests::read_or_empty(&marker).trim().parse().unwrap();
    // SAFETY: kill(2) of the process group our agent created for the hook.
    unsafe { libc::kill(-hook, libc::SIGKILL) };

    let o = bg.wait(ROLLOUT_TIMEOUT);
    let st = c.status_json("r000001");
    let phase = st["phase"].as_str().unwrap();
    assert!(
        phase == "rolled_back" || phase == "rollback_failed",
        "phase {phase}: {st}"
    );
    // The exit-code table: 1 rolled back, 3 rollback failed (nodes need a person).
    assert_eq!(
        o.status.code(),
        Some(if phase == "rollback_failed" { 3 } else { 1 }),
        "{}\n{}\n{}",
        o.stdout,
        o.stderr,
        c.logs()
    );
    let err = st["error"].as_str().unwrap_or_default();
    assert!(err.contains("n2"), "the error names n2: {err:?}");
    if phase == "rollback_failed" {
        assert_eq!(json_step(&st, "n2"), "rollback_failed", "{st}");
    }
    println!("agent n2 killed mid-install: rollout ended {phase}: {err}");
    // n1 was upgraded before, so it was rolled back; n3 was never touched.
    assert_eq!(json_step(&st, "n1"), "rolled_back", "{st}");
    assert!(
        count_events(&st, "n2: install of 4.2.1 failed") >= 1,
        "{:#?}",
        event_messages(&st)
    );
    assert_eq!(c.node("n1").audit_count(" downgrade 4.2.0"), 1);
    assert_eq!(c.node("n3").audit_count(" install "), 0);

    let nodes = c.nodes_json();
    assert_nodes(&c, &nodes, &["n1"], &[(V1, "old"), (V0, "permanent")]);
    assert_nodes(&c, &nodes, &["n3"], &[(V1, "unpacked"), (V0, "permanent")]);
    for n in &c.nodes {
        let (v, _) = n.health().expect("the service answers");
        assert_eq!(v, V0, "{} runs {v}", n.id);
    }
}

#[test]
fn two_of_three_coordinators_down_stops_every_step_until_one_returns() {
    let mut c = Cluster::start(ClusterOpts::demo(3, 3));
    let pkg = c.package(V1, false).display().to_string();
    let mut bg = c.spawn_cli(&rollout_args(
        &pkg,
        &["--min-healthy-time", "2s", "--healthy-deadline", "30s"],
    ));
    c.wait_rollout(ROLLOUT_TIMEOUT, "n1 in its health gate", |s| {
        step_of(s, "n1") == "verifying"
    });
    let leader = c.wait_for_leader(Duration::from_secs(5));
    let follower = c
        .coords
        .iter()
        .map(|p| p.id)
        .find(|id| *id != leader)
        .unwrap();
    let survivor = c
        .coords
        .iter()
        .find(|p| p.id != leader && p.id != follower)
        .unwrap()
        .addr
        .clone();
    c.coord(leader).kill9();
    c.coord(follower).kill9();

    // Let whatever was on the wire land, then nothing may move.
    std::thread::sleep(Duration::from_millis(500));
    let before = c
        .ctl_status_via(&survivor, "r000001")
        .expect("the survivor answers reads");
    let audits: Vec<String> = c.nodes.iter().map(|n| n.audit()).collect();
    std::thread::sleep(Duration::from_secs(3));
    let after = c.ctl_status_via(&survivor, "r000001").unwrap();
    assert_eq!(
        before, after,
        "the rollout advanced without a majority of coordinators"
    );
    assert_eq!(after.phase, "upgrading");
    assert_eq!(step_of(&after, "n2"), "staged", "{after:?}");
    for (n, a) in c.nodes.iter().zip(&audits) {
        assert_eq!(&n.audit(), a, "{} was acted on without a majority", n.id);
    }
    let cs = c.ctl_cluster_via(&survivor).unwrap();
    assert_eq!(cs.leader_id, 0, "no leader without a majority: {cs:?}");
    assert!(
        !bg.try_done(),
        "the waiting rollout command gave up: {}",
        bg.stdout()
    );

    // One returns (same binary, same data dir): the rollout continues to the end.
    let back_ms = now_ms();
    c.coord(leader).restart();
    let o = bg.wait(ROLLOUT_TIMEOUT);
    assert!(
        o.status.success(),
        "{}\n{}\n{}",
        o.stdout,
        o.stderr,
        c.logs()
    );
    let st = c.status_json("r000001");
    assert_eq!(st["phase"], "succeeded", "{st}");
    assert_each_step_once(&st, &["n1", "n2", "n3"]);
    let (t, msg, by) = first_event_after(&st, back_ms).unwrap();
    println!(
        "coordinator {leader} restarted: next step recorded {} ms later by {by} ({msg:?}; includes re-running n1's 2 s gate)",
        t - back_ms
    );
    for n in &c.nodes {
        assert_eq!(
            n.audit_count(" install 4.2.1"),
            1,
            "{}: {}",
            n.id,
            n.audit()
        );
    }
    let nodes = c.nodes_json();
    assert_nodes(
        &c,
        &nodes,
        &["n1", "n2", "n3"],
        &[(V1, "permanent"), (V0, "old")],
    );
}

/// A snapshot of what could move: the rollout's events and nodes, and the steps each agent
/// recorded (a rollout's release of its nodes when it ends changes nothing on them, and may
/// arrive at any time after the end: left out).
fn snapshot(c: &Cluster) -> (usize, Vec<String>, Vec<String>) {
    let st = c.ctl_status("").expect("status");
    let steps = |audit: String| -> String {
        audit
            .lines()
            .filter(|l| !l.contains("| release |"))
            .map(|l| format!("{l}\n"))
            .collect()
    };
    (
        st.events.len(),
        st.nodes.iter().map(|n| n.step.clone()).collect(),
        c.nodes.iter().map(|n| steps(n.audit())).collect(),
    )
}

const BUSY: [&str; 5] = [
    "staging",
    "installing",
    "verifying",
    "committing",
    "rolling_back",
];

#[test]
fn pause_stops_new_steps_and_resume_finishes_the_rollout() {
    let c = Cluster::start(ClusterOpts::demo(3, 3));
    let pkg = c.package(V1, false).display().to_string();
    let mut bg = c.spawn_cli(&rollout_args(
        &pkg,
        &["--min-healthy-time", "1s", "--healthy-deadline", "30s"],
    ));
    c.wait_rollout(ROLLOUT_TIMEOUT, "n1 upgrading", |s| {
        matches!(step_of(s, "n1"), "installing" | "installed" | "verifying")
    });
    let out = c.cli_ok(&["pause"]);
    assert!(out.contains("pause accepted; phase paused"), "{out}");
    let st = c.status_json("");
    assert_eq!(st["phase"], "paused", "{st}");
    // In-flight steps finish and are recorded; then nothing moves.
    let settled = c.wait_rollout(Duration::from_secs(20), "in-flight steps to finish", |s| {
        s.nodes.iter().all(|n| !BUSY.contains(&n.step.as_str()))
    });
    assert_eq!(settled.phase, "paused");
    let before = snapshot(&c);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(snapshot(&c), before, "a paused rollout moved");
    assert_eq!(step_of(&settled, "n2"), "staged", "{settled:?}");
    assert_eq!(c.node("n2").audit_count(" install "), 0);
    assert!(!bg.try_done(), "the waiting rollout returned while paused");
    // Pausing twice is refused with a reason.
    let o = c.cli(&["pause"]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));

    let out = c.cli_ok(&["resume"]);
    assert!(out.contains("resume accepted"), "{out}");
    let o = bg.wait(ROLLOUT_TIMEOUT);
    assert!(
        o.status.success(),
        "{}\n{}\n{}",
        o.stdout,
        o.stderr,
        c.logs()
    );
    let st = c.status_json("r000001");
    assert_eq!(st["phase"], "succeeded", "{st}");
    assert_each_step_once(&st, &["n1", "n2", "n3"]);
    assert!(count_events(&st, "paused by ") == 1 && count_events(&st, "resumed by ") == 1);
    let nodes = c.nodes_json();
    assert_nodes(
        &c,
        &nodes,
        &["n1", "n2", "n3"],
        &[(V1, "permanent"), (V0, "old")],
    );
}

#[test]
fn abort_leaves_nodes_as_they_are_and_says_what_each_runs() {
    let c = Cluster::start(ClusterOpts::demo(3, 3));
    let pkg = c.package(V1, false).display().to_string();
    let mut bg = c.spawn_cli(&rollout_args(
        &pkg,
        &["--min-healthy-time", "3s", "--healthy-deadline", "30s"],
    ));
    c.wait_rollout(ROLLOUT_TIMEOUT, "n2 in its health gate", |s| {
        step_of(s, "n2") == "verifying"
    });
    let out = c.cli_ok(&["abort"]);
    assert!(out.contains("abort accepted; phase aborted"), "{out}");
    let o = bg.wait(Duration::from_secs(20));
    assert_eq!(o.status.code(), Some(1), "{}\n{}", o.stdout, o.stderr);
    assert!(o.stderr.contains("aborted"), "{}", o.stderr);

    let st = c.status_json("r000001");
    assert_eq!(st["phase"], "aborted", "{st}");
    let msgs = event_messages(&st);
    let last = msgs.last().unwrap();
    assert!(
        last.contains("nodes are left as they are")
            && last.contains("n1: run 4.2.1, not permanent")
            && last.contains("n2: run 4.2.1, not permanent, health not confirmed")
            && last.contains("n3: untouched"),
        "the abort event says per node what it runs: {last:?}"
    );
    // Nothing moves after the abort: no commit, no downgrade, no install on n3.
    let before = snapshot(&c);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(snapshot(&c), before, "an aborted rollout moved");
    for n in &c.nodes {
        assert_eq!(n.audit_count(" permanent "), 0, "{}", n.audit());
        assert_eq!(n.audit_count(" downgrade "), 0, "{}", n.audit());
    }
    assert_eq!(c.node("n3").audit_count(" install "), 0);
    let nodes = c.nodes_json();
    assert_nodes(
        &c,
        &nodes,
        &["n1", "n2"],
        &[(V1, "current"), (V0, "permanent")],
    );
    assert_nodes(&c, &nodes, &["n3"], &[(V1, "unpacked"), (V0, "permanent")]);
    let runs: Vec<String> = c.nodes.iter().map(|n| n.health().unwrap().0).collect();
    assert_eq!(runs, [V1, V1, V0]);
}

#[test]
fn canary_waits_for_promote_then_finishes() {
    let c = Cluster::start(ClusterOpts::demo(3, 3));
    let pkg = c.package(V1, false).display().to_string();
    let mut bg = c.spawn_cli(&rollout_args(
        &pkg,
        &[
            "--canary",
            "1",
            "--min-healthy-time",
            "300ms",
            "--healthy-deadline",
            "20s",
        ],
    ));
    let st = c.wait_rollout(ROLLOUT_TIMEOUT, "the canary to be done", |s| {
        s.awaiting_promotion
    });
    assert_eq!(st.phase, "upgrading");
    assert_eq!(step_of(&st, "n1"), "upgraded");
    let json = c.status_json("");
    assert_eq!(json["awaiting_promotion"], true, "{json}");
    let text = c.cli_ok(&["status"]);
    assert!(
        text.contains("waiting for `orchestrator promote`"),
        "{text}"
    );
    let before = snapshot(&c);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        snapshot(&c),
        before,
        "the rollout went past the canary unpromoted"
    );
    for n in ["n2", "n3"] {
        assert_eq!(step_of(&st, n), "staged");
        assert_eq!(c.node(n).audit_count(" install "), 0);
    }
    assert!(!bg.try_done());

    let out = c.cli_ok(&["promote"]);
    assert!(out.contains("promote accepted"), "{out}");
    let o = bg.wait(ROLLOUT_TIMEOUT);
    assert!(
        o.status.success(),
        "{}\n{}\n{}",
        o.stdout,
        o.stderr,
        c.logs()
    );
    let st = c.status_json("r000001");
    assert_eq!(st["phase"], "succeeded", "{st}");
    assert_each_step_once(&st, &["n1", "n2", "n3"]);
    assert_eq!(count_events(&st, "canary promoted by "), 1);
    // Promoting again is refused: there is nothing to promote.
    let o = c.cli(&["promote"]);
    assert_eq!(o.status.code(), Some(1));
    let nodes = c.nodes_json();
    assert_nodes(
        &c,
        &nodes,
        &["n1", "n2", "n3"],
        &[(V1, "permanent"), (V0, "old")],
    );
}

#[test]
fn no_permanent_leaves_the_new_release_current_and_the_old_one_permanent() {
    let c = Cluster::start(ClusterOpts::demo(3, 3));
    let pkg = c.package(V1, false).display().to_string();
    let out = c.cli_ok(&rollout_args(
        &pkg,
        &[
            "--no-permanent",
            "--min-healthy-time",
            "300ms",
            "--healthy-deadline",
            "20s",
        ],
    ));
    assert!(out.contains("Rollout r000001 succeeded"), "{out}");
    let st = c.status_json("r000001");
    assert_eq!(st["phase"], "succeeded", "{st}");
    for n in ["n1", "n2", "n3"] {
        assert_eq!(json_step(&st, n), "upgraded", "{st}");
        assert_eq!(count_events(&st, &format!("{n}: make 4.2.1 permanent")), 0);
        assert_eq!(c.node(n).audit_count(" permanent "), 0);
        // Without a commit, a final check confirms every node still runs the target.
        assert_eq!(
            count_events(&st, &format!("{n}: still runs 4.2.1, healthy")),
            1,
            "{st}"
        );
    }
    let nodes = c.nodes_json();
    assert_nodes(
        &c,
        &nodes,
        &["n1", "n2", "n3"],
        &[(V1, "current"), (V0, "permanent")],
    );
    let runs: Vec<String> = c.nodes.iter().map(|n| n.health().unwrap().0).collect();
    assert_eq!(runs, [V1, V1, V1]);
}

#[test]
fn one_rollout_at_a_time_cluster_queries_and_bad_input() {
    let c = Cluster::start(ClusterOpts::state_only(3, 3));
    let pkg = c.package(V1, false).display().to_string();
    // A rollout that stays in its first health gate for a while.
    let out = c.cli_ok(&rollout_args(
        &pkg,
        &["--min-healthy-time", "60s", "--detach"],
    ));
    assert_eq!(out.trim(), "r000001");
    c.wait_rollout(ROLLOUT_TIMEOUT, "the first health gate", |s| {
        step_of(s, "n1") == "verifying"
    });

    let o = c.cli(&["rollout", V1, "--detach"]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let err = stderr(&o);
    assert!(
        err.contains("r000001") && err.contains("one rollout at a time"),
        "refused with the id of the running one: {err:?}"
    );
    assert_eq!(err.lines().count(), 1, "{err:?}");
    println!("second rollout refused: {}", err.trim());

    let cs = c.cli_json(&["cluster", "status", "--json"]);
    let leader = cs["leader_id"].as_u64().expect("a leader");
    assert!((1..=3).contains(&leader), "{cs}");
    assert!(cs["term"].as_u64().unwrap() >= 1, "{cs}");
    let mut members: Vec<(u64, String)> = cs["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_u64().unwrap(),
                m["role"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    members.sort();
    assert_eq!(
        members,
        [
            (1, "voter".to_string()),
            (2, "voter".into()),
            (3, "voter".into())
        ],
        "{cs}"
    );
    let addrs: Vec<&str> = cs["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["address"].as_str().unwrap())
        .collect();
    for a in c.addrs() {
        assert!(addrs.contains(&a.as_str()), "{cs}");
    }

    let list = c.cli_json(&["rollouts", "--json"]);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["id"], "r000001");
    assert_eq!(list[0]["phase"], "upgrading");
    assert_eq!(list[0]["version"], V1);

    c.cli_ok(&["abort", "r000001"]);
    // Unknown node: a clear refusal, nothing created.
    let o = c.cli(&["rollout", V1, "--nodes", "n1,n9", "--detach"]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(
        stderr(&o).contains("node n9 is not registered"),
        "{}",
        stderr(&o)
    );
    println!("unknown node refused: {}", stderr(&o).trim());
    // A malformed node id too.
    let o = c.cli(&["rollout", V1, "--nodes", "n1,bad id!", "--detach"]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(stderr(&o).contains("bad id!"), "{}", stderr(&o));
    println!("malformed node id refused: {}", stderr(&o).trim());

    let list = c.cli_json(&["rollouts", "--json"]);
    let phases: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["phase"].as_str().unwrap())
        .collect();
    assert_eq!(phases, ["aborted"], "refused rollouts are not created");

    // Once the first has ended, a second is accepted (4.2.1 is already staged there, so no
    // package); n1 runs 4.2.1 since the aborted rollout, but only as `current`: it is
    // health-gated and made permanent with the others (it used to be skipped and left so,
    // while the rollout said every node ran 4.2.1 permanently).
    let out = c.cli_ok(&[
        "rollout",
        V1,
        "--nodes",
        "n3,n1,n2",
        "--min-healthy-time",
        "0ms",
        "--json",
    ]);
    let fin: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(fin["id"], "r000002");
    assert_eq!(fin["phase"], "succeeded", "{fin}");
    let order: Vec<(&str, &str)> = fin["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["id"].as_str().unwrap(), n["step"].as_str().unwrap()))
        .collect();
    assert_eq!(
        order,
        [
            ("n3", "committed"),
            ("n1", "committed"),
            ("n2", "committed")
        ],
        "nodes in the order given"
    );
    let nodes = c.nodes_json();
    assert_nodes(
        &c,
        &nodes,
        &["n1", "n2", "n3"],
        &[(V1, "permanent"), (V0, "old")],
    );
}

#[test]
fn bad_version_exits_2_and_unreachable_coordinators_exit_1_with_a_clear_error() {
    let o = orch_tests::orch(&[
        "rollout",
        "4.2",
        "--coordinator",
        "127.0.0.1:1",
        "--insecure",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("4.2"), "{}", stderr(&o));

    let port = orch_tests::free_port();
    let addr = format!("127.0.0.1:{port}");
    let t = Instant::now();
    let mut cmd = orch_tests::orch_cmd(&["rollout", V1, "--coordinator", &addr, "--insecure"]);
    cmd.env_remove("ORCHESTRATOR_COORDINATORS");
    let o = orch_tests::run_bounded(cmd, Duration::from_secs(60));
    let took = t.elapsed();
    let err = orch_tests::assert_refused(&o, "no coordinator reachable");
    assert!(err.contains(&addr), "{err}");
    println!("unreachable coordinators reported after {took:?}: {err}");

    // No address at all.
    let mut cmd = orch_tests::orch_cmd(&["status", "--insecure"]);
    cmd.env_remove("ORCHESTRATOR_COORDINATORS");
    let o = orch_tests::run_bounded(cmd, Duration::from_secs(10));
    orch_tests::assert_refused(&o, "no coordinator address");
}

#[test]
fn leader_killed_mid_install_the_new_leader_re_performs_it_without_a_second_activation() {
    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("slow-activate");
    orch_tests::write_script(&script, SLOW_ACTIVATE);
    let script_s = script.display().to_string();
    let mut c =
        Cluster::start(ClusterOpts::demo(3, 3).agent_args(2, &["--activate-cmd", &script_s]));
    let pkg = c.package(V1, false).display().to_string();
    let watch = HealthWatch::start(c.services());
    let mut bg = c.spawn_cli(&rollout_args(
        &pkg,
        &["--min-healthy-time", "300ms", "--healthy-deadline", "30s"],
    ));
    let marker = c.node("n2").root.join("slow-activate.pid");
    c.wait_for(ROLLOUT_TIMEOUT, "n2's activation to start", |_| {
        marker.is_file()
    });
    let old = c.wait_for_leader(Duration::from_secs(5));
    let kill_ms = now_ms();
    c.coord(old).kill9();
    let new = c.wait_for_leader(Duration::from_secs(15));
    assert_ne!(old, new);

    let o = bg.wait(ROLLOUT_TIMEOUT);
    let (seen, _) = watch.stop();
    assert!(
        o.status.success(),
        "{}\n{}\n{}",
        o.stdout,
        o.stderr,
        c.logs()
    );
    let st = c.status_json("r000001");
    assert_eq!(st["phase"], "succeeded", "{st}");
    // The install in flight was re-performed by the new leader (a second fenced call, newer
    // term) and recorded once; the service was switched once.
    assert_eq!(count_events(&st, "n2: installed 4.2.1"), 1, "{st}");
    assert_eq!(count_events(&st, "n2: install 4.2.1 [seq"), 1, "{st}");
    let installs: Vec<String> = c
        .node("n2")
        .audit()
        .lines()
        .filter(|l| l.contains(" install 4.2.1"))
        .map(str::to_string)
        .collect();
    assert!(
        (1..=2).contains(&installs.len()),
        "n2 install calls: {installs:?}"
    );
    if installs.len() == 2 {
        // `SECS fence term=T rollout=R step=S install 4.2.1 permanent=false`
        let field = |l: &str, key: &str| -> u64 {
            l.split(' ')
                .find_map(|w| w.strip_prefix(key))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {key} in {l:?}"))
        };
        assert_eq!(
            field(&installs[0], "step="),
            field(&installs[1], "step="),
            "only the same step may be performed again: {installs:?}"
        );
        assert!(
            field(&installs[1], "term=") > field(&installs[0], "term="),
            "by the newer leader: {installs:?}"
        );
    }
    for n in ["n1", "n3"] {
        assert_eq!(
            c.node(n).audit_count(" install 4.2.1"),
            1,
            "{}",
            c.node(n).audit()
        );
    }
    for (i, s) in seen.iter().enumerate() {
        let versions: Vec<&str> = s.iter().map(|(v, _)| v.as_str()).collect();
        assert_eq!(versions, [V0, V1], "n{}: /health saw {s:?}", i + 1);
    }
    let (t, msg, by) = first_event_after(&st, kill_ms).unwrap();
    println!(
        "leader {old} killed during n2's install: next step {} ms after the kill ({msg:?} by {by}); n2 install calls: {installs:?}",
        t - kill_ms
    );
    let nodes = c.nodes_json();
    assert_nodes(
        &c,
        &nodes,
        &["n1", "n2", "n3"],
        &[(V1, "permanent"), (V0, "old")],
    );
}

#[test]
fn a_frozen_coordinator_does_not_hang_the_cli_or_the_waiting_rollout() {
    let mut c = Cluster::start(ClusterOpts::state_only(3, 3));
    let pkg = c.package(V1, false).display().to_string();
    let mut bg = c.spawn_cli(&rollout_args(
        &pkg,
        &["--min-healthy-time", "2s", "--healthy-deadline", "30s"],
    ));
    c.wait_rollout(ROLLOUT_TIMEOUT, "n1 in its health gate", |s| {
        step_of(s, "n1") == "verifying"
    });
    // The leader freezes (a VM pause, a stuck process): the TCP port still accepts, nothing
    // answers. The others elect a new leader and finish the rollout.
    let frozen = c.wait_for_leader(Duration::from_secs(5));
    c.coord(frozen).signal(libc::SIGSTOP);
    let others: Vec<String> = c
        .coords
        .iter()
        .filter(|p| p.id != frozen)
        .map(|p| p.addr.clone())
        .collect();
    c.wait_for(ROLLOUT_TIMEOUT, "the others to finish the rollout", |c| {
        c.ctl_status_via(&others[0], "r000001")
            .is_some_and(|s| s.phase == "succeeded")
    });

    // A command that lists the frozen coordinator first must move on to the others.
    let mut addrs = vec![c.coord(frozen).addr.clone()];
    addrs.extend(others.iter().cloned());
    let cmd = c.cli_cmd_via(&addrs, &["cluster", "status", "--json"]);
    let mut status = BgCmd::spawn(cmd, c.dir.path());
    let st = status.wait_within(Duration::from_secs(15));
    // The waiting `rollout` was following the frozen leader's watch stream: it must notice.
    let fin = bg.wait_within(Duration::from_secs(5));
    c.coord(frozen).kill9();
    println!(
        "frozen coordinator {frozen}: `cluster status` {}; waiting `rollout` {}",
        if st.is_some() { "answered" } else { "hung" },
        if fin.is_some() { "returned" } else { "hung" }
    );
    let st = st.expect("`cluster status` hung on the frozen coordinator listed first");
    assert!(st.status.success(), "{}", st.stderr);
    let fin = fin.expect(
        "the waiting `rollout` hung on the frozen leader's watch stream after the rollout succeeded",
    );
    assert!(fin.status.success(), "{}\n{}", fin.stdout, fin.stderr);
}
