//! Correct under leadership change, frozen processes and retries (issue #10): real
//! `orchestrator coordinator` and `orchestrator agent` processes on loopback, frozen with
//! SIGSTOP (not killed: a frozen process comes back with its old view of the world).
//!
//! Build the binaries first: `cargo build --bins`.

use std::time::{Duration, Instant};

use orch_tests::cluster::*;
use orch_tests::{stderr, stdout};

const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(90);

fn rollout_args<'a>(pkg: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["rollout", V1, "--package", pkg];
    a.extend_from_slice(extra);
    a
}

fn signal_pid(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on a child process of this test that is still running.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig})");
}

/// Resumes a SIGSTOPped process when dropped (also on panic), so its guard can kill it.
struct Thaw(u32);

impl Drop for Thaw {
    fn drop(&mut self) {
        // SAFETY: as above; the process may be gone already, which is fine.
        unsafe { libc::kill(self.0 as libc::pid_t, libc::SIGCONT) };
    }
}

fn events(st: &serde_json::Value) -> Vec<(u64, String)> {
    st["events"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    (
                        e["term"].as_u64().unwrap_or(0),
                        e["message"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The leader freezes in the middle of a health gate; the others elect a new leader that
/// finishes the rollout; then the old leader resumes. Its gate task wakes up past its deadline
/// and would report a failure: nothing from its term may land after the new term's entries,
/// and the history stays one sequence (each step once, terms never going back).
#[test]
fn a_frozen_leader_that_resumes_adds_nothing_from_its_old_term() {
    let mut c = Cluster::start(ClusterOpts::state_only(3, 3));
    let pkg = c.package(V1, false).display().to_string();
    let mut bg = c.spawn_cli(&rollout_args(
        &pkg,
        &["--min-healthy-time", "3s", "--healthy-deadline", "6s"],
    ));
    c.wait_rollout(ROLLOUT_TIMEOUT, "n1 in its health gate", |s| {
        step_of(s, "n1") == "verifying"
    });
    let old = c.wait_for_leader(Duration::from_secs(5));
    let pid = c.coord(old).pid().unwrap();
    signal_pid(pid, libc::SIGSTOP);
    let thaw = Thaw(pid);
    let others: Vec<String> = c
        .coords
        .iter()
        .filter(|p| p.id != old)
        .map(|p| p.addr.clone())
        .collect();
    c.wait_for(ROLLOUT_TIMEOUT, "the others to finish the rollout", |c| {
        c.ctl_status_via(&others[0], "r000001")
            .is_some_and(|s| s.phase == "succeeded")
    });
    // Frozen for longer than the gate's deadline: its probe wakes up to a failure.
    std::thread::sleep(Duration::from_secs(2));
    drop(thaw);
    // Give the resumed coordinator time to act on what it had in flight.
    std::thread::sleep(Duration::from_secs(4));
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
    let ev = events(&st);
    let mut highest = 0;
    for (term, msg) in &ev {
        assert!(
            *term == 0 || *term >= highest,
            "an entry of term {term} landed after term {highest}: {msg:?}\n{st}"
        );
        highest = highest.max(*term);
        assert!(
            !msg.contains("failed") && !msg.contains("rolling back"),
            "{msg:?}\n{st}"
        );
    }
    let terms: std::collections::BTreeSet<u64> = ev.iter().map(|(t, _)| *t).collect();
    assert!(
        terms.len() >= 2,
        "the rollout was driven in two terms: {terms:?}"
    );
    for n in ["n1", "n2", "n3"] {
        for step in ["installed 4.2.1", "healthy on 4.2.1", "4.2.1 is permanent"] {
            let count = ev
                .iter()
                .filter(|(_, m)| m.starts_with(&format!("{n}: {step}")))
                .count();
            assert_eq!(count, 1, "{n}: {step:?} {count} times\n{st}");
        }
    }
}

/// Something advanced an agent's fence beyond what the leader sends (here: a forged fence of
/// this cluster with a far higher term). Before, the driver took the refusal for its own
/// deposition and the rollout sat in flight forever with nothing in `status`; now, while it
/// still leads, the refusal is a failure of that step, visible, and the failure policy applies.
#[test]
fn a_stale_fence_refusal_while_leading_fails_the_step_visibly() {
    let c = Cluster::start(ClusterOpts::state_only(1, 2));
    let cluster = c.cli_json(&["cluster", "status", "--json"]);
    let cluster_id = cluster["cluster_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(cluster_id.len(), 32, "{cluster}");
    // The forged fence is admitted (insecure agents accept any caller's fence), then the
    // unpack of an absent version fails: nothing else changes on the node.
    let agent = c.node("n1").agent();
    let forged = orch_tests::rt().block_on(async {
        let mut a = agent.client().await;
        a.unpack(orch_proto::agent::UnpackRequest {
            version: "9.9.9".into(),
            fence: Some(orch_proto::agent::Fence {
                term: 1_000,
                rollout_id: "r000001".into(),
                step: 1,
                cluster_id: cluster_id.clone(),
                deadline_unix_ms: 0,
            }),
            expected_sha256: String::new(),
            force: false,
        })
        .await
    });
    assert!(forged.is_err(), "9.9.9 is not on the node: {forged:?}");

    let pkg = c.package(V1, false).display().to_string();
    let t = Instant::now();
    let o = c.cli(&rollout_args(
        &pkg,
        &["--min-healthy-time", "0s", "--healthy-deadline", "10s"],
    ));
    assert!(!o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    println!("rollout ended after {:?}", t.elapsed());
    let st = c.status_json("r000001");
    assert_eq!(st["phase"], "aborted", "{st}");
    let n1 = st["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == "n1")
        .unwrap();
    let err = n1["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("stale fence") && err.contains("term 1000"),
        "n1's error names the refusal: {st}"
    );
    // Nothing was installed anywhere.
    let nodes = c.nodes_json();
    for n in ["n1", "n2"] {
        assert_eq!(
            node_versions(&nodes, n)
                .iter()
                .find(|(_, s)| s == "permanent")
                .map(|(v, _)| v.as_str()),
            Some(V0),
            "{nodes}"
        );
    }
}

/// An agent frozen (SIGSTOP) while its install waits its turn: the leader shows it as
/// unresponsive while the call is outstanding, gives up at the step's deadline (derived from
/// the agent's activation timeout, not a fixed two minutes) and rolls back; when the agent
/// resumes, the steps that waited in its socket are past their deadlines and are refused, so
/// nothing changes behind the rollout's back.
#[test]
fn a_frozen_agent_is_shown_unresponsive_and_never_applies_a_late_step() {
    let c = Cluster::start(
        ClusterOpts::state_only(1, 2)
            .agent_args(1, &["--activate-timeout", "2s"])
            .agent_args(2, &["--activate-timeout", "2s"]),
    );
    let pkg = c.package(V1, false).display().to_string();
    let mut bg = c.spawn_cli(&rollout_args(
        &pkg,
        &["--min-healthy-time", "4s", "--healthy-deadline", "30s"],
    ));
    c.wait_rollout(ROLLOUT_TIMEOUT, "n1 in its health gate", |s| {
        step_of(s, "n1") == "verifying"
    });
    let before = c.node("n2").audit();
    let pid = c.node("n2").agent().pid();
    signal_pid(pid, libc::SIGSTOP);
    let thaw = Thaw(pid);
    let frozen_at = Instant::now();
    c.wait_rollout(Duration::from_secs(30), "n2 shown unresponsive", |s| {
        s.nodes
            .iter()
            .any(|n| n.id == "n2" && n.unresponsive_since_ms > 0)
    });
    let shown = frozen_at.elapsed();
    let out = c.cli_ok(&["status"]);
    assert!(
        out.lines()
            .any(|l| l.contains("n2") && l.contains("agent unresponsive for")),
        "{out}"
    );
    let o = bg.wait(Duration::from_secs(120));
    let ended = frozen_at.elapsed();
    assert!(!o.status.success(), "{}", o.stdout);
    let st = c.status_json("r000001");
    assert!(
        matches!(
            st["phase"].as_str(),
            Some("rollback_failed" | "rolled_back")
        ),
        "{st}"
    );
    println!("frozen agent shown unresponsive after {shown:?}; rollout ended after {ended:?}");
    // Resume it: whatever waited in its socket is past its deadline.
    drop(thaw);
    std::thread::sleep(Duration::from_secs(3));
    let after = c.node("n2").audit();
    let new_lines: Vec<&str> = after.lines().skip(before.lines().count()).collect();
    assert!(
        !new_lines
            .iter()
            .any(|l| l.contains("install 4.2.1") && !l.contains("refused")),
        "a late install was applied: {new_lines:?}"
    );
    let v = orch_tests::local_ok(&c.node("n2").root, &["versions"]);
    assert!(
        v.contains("4.2.0\tpermanent") && !v.contains("4.2.1\tcurrent"),
        "n2 changed behind the rollout's back: {v}"
    );
}

/// A write whose outcome the client did not learn (its Raft commit timed out, or the answer
/// was lost with the connection) may still be applied; the client then retries it under the
/// same request id and must get the first attempt's result. Before, a retried `pause`
/// reported "already paused" (exit 1) after pausing, and a retried `rollout` was refused by its
/// own first attempt. The retry is sent here as the client sends it: the same request twice.
#[test]
fn a_retried_request_gets_the_first_attempts_answer() {
    use orch_proto::control::{self as pb, control_client::ControlClient};
    let mut c = Cluster::start(ClusterOpts::state_only(3, 2));
    let pkg = c.package(V1, false).display().to_string();
    let bytes = std::fs::read(&pkg).unwrap();
    let sha = orch_tests::sha256_hex(&bytes);
    let leader = c.wait_for_leader(Duration::from_secs(5));
    let addr = c.coord(leader).addr.clone();
    orch_tests::rt().block_on(async {
        let mut client = orch_client::Client::new(vec![addr.clone()], orch_tls::Security::Insecure);
        client
            .upload(
                std::path::Path::new(&pkg),
                pb::UploadHeader {
                    name: "app".into(),
                    version: V1.into(),
                    sha256: sha.clone(),
                    size: bytes.len() as u64,
                    signature: Vec::new(),
                },
            )
            .await
            .unwrap();
        let mut ctl = ControlClient::new(orch_tests::channel(&addr).await);
        let start = pb::StartRolloutRequest {
            version: V1.into(),
            package_sha256: sha.clone(),
            min_healthy_time_ms: Some(60_000),
            healthy_deadline_ms: Some(120_000),
            requested_by: "test".into(),
            request_id: "start-1".into(),
            ..Default::default()
        };
        let first = ctl.start_rollout(start.clone()).await.unwrap().into_inner();
        let retry = ctl
            .start_rollout(start)
            .await
            .expect("a retried start is answered like the first")
            .into_inner();
        assert_eq!(first.id, retry.id);
        let pause = pb::RolloutCommandRequest {
            id: first.id.clone(),
            command: "pause".into(),
            requested_by: "test".into(),
            request_id: "pause-1".into(),
        };
        let p1 = ctl
            .rollout_command(pause.clone())
            .await
            .unwrap()
            .into_inner();
        let p2 = ctl
            .rollout_command(pause.clone())
            .await
            .expect("a retried pause is answered like the first")
            .into_inner();
        assert_eq!((p1.phase.as_str(), p2.phase.as_str()), ("paused", "paused"));
        // The same command as a new request is refused as it should be.
        let again = ctl
            .rollout_command(pb::RolloutCommandRequest {
                request_id: "pause-2".into(),
                ..pause
            })
            .await
            .unwrap_err();
        assert!(again.message().contains("already paused"), "{again:?}");
        let list = ctl
            .list_rollouts(pb::ListRolloutsRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(list.rollouts.len(), 1, "one rollout, not two");
    });
    let st = c.status_json("r000001");
    let pauses = events(&st)
        .iter()
        .filter(|(_, m)| m.contains("paused by"))
        .count();
    assert_eq!(pauses, 1, "{st}");
}

/// Right after a frozen old leader resumes it still believes it leads, with the state it had
/// when it froze. Reads served by it must not go back to that state (a succeeded rollout
/// showed `upgrading` again, three runs out of three).
#[test]
fn reads_do_not_go_backwards_when_a_frozen_leader_resumes() {
    let mut c = Cluster::start(ClusterOpts::state_only(3, 2));
    let pkg = c.package(V1, false).display().to_string();
    let mut bg = c.spawn_cli(&rollout_args(
        &pkg,
        &["--min-healthy-time", "2s", "--healthy-deadline", "30s"],
    ));
    c.wait_rollout(ROLLOUT_TIMEOUT, "n1 in its health gate", |s| {
        step_of(s, "n1") == "verifying"
    });
    let old = c.wait_for_leader(Duration::from_secs(5));
    let pid = c.coord(old).pid().unwrap();
    signal_pid(pid, libc::SIGSTOP);
    let thaw = Thaw(pid);
    let others: Vec<String> = c
        .coords
        .iter()
        .filter(|p| p.id != old)
        .map(|p| p.addr.clone())
        .collect();
    c.wait_for(ROLLOUT_TIMEOUT, "the others to finish the rollout", |c| {
        c.ctl_status_via(&others[0], "r000001")
            .is_some_and(|s| s.phase == "succeeded")
    });
    let o = bg.wait(ROLLOUT_TIMEOUT);
    assert!(o.status.success(), "{}", o.stderr);
    let old_addr = c.coord(old).addr.clone();
    drop(thaw);
    // Ask the resumed coordinator at once, repeatedly: every answer is the rollout's real
    // state (it confirms leadership first, or sends the client to the new leader).
    let start = Instant::now();
    let mut answers = Vec::new();
    while start.elapsed() < Duration::from_secs(3) {
        let o = orch_tests::run_bounded(
            c.cli_cmd_via(
                std::slice::from_ref(&old_addr),
                &["status", "r000001", "--json"],
            ),
            Duration::from_secs(30),
        );
        if o.status.success() {
            let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
            answers.push(v["phase"].as_str().unwrap_or_default().to_string());
        }
    }
    assert!(!answers.is_empty(), "no answer at all");
    assert!(
        answers.iter().all(|p| p == "succeeded"),
        "a read went backwards: {answers:?}"
    );
}
