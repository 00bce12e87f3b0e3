//! Replay that is real: a finished process-level scenario (a rollout that succeeds, one whose
//! broken release is rolled back, one aborted while it waits for promotion, with a coordinator
//! restart in between so that terms change), and every rollout rebuilt from the spec and inputs
//! its status carries gives the same final state the coordinators show.

use orch_rollout::Input;
use orch_tests::cluster::{Cluster, ClusterOpts};
use orch_types::rollout::RolloutSpec;
use serde_json::Value;

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

/// The rollout `st` (its `status ID --json`) rebuilt from its own spec and inputs, as JSON of
/// the same shape for the fields both carry.
fn replayed(st: &Value) -> orch_types::rollout::RolloutStatus {
    let spec: RolloutSpec = serde_json::from_value(st["spec"].clone())
        .unwrap_or_else(|e| panic!("spec does not parse ({e}): {st}"));
    let inputs: Vec<Input> = serde_json::from_value(st["inputs"].clone())
        .unwrap_or_else(|e| panic!("inputs do not parse ({e}): {st}"));
    assert!(!inputs.is_empty(), "{st}");
    orch_rollout::replay(spec, &inputs)
        .unwrap_or_else(|e| panic!("replay refused its own spec: {e}"))
        .status()
}

#[test]
fn every_rollout_of_a_finished_scenario_replays_to_its_recorded_state() {
    let mut c = Cluster::start(ClusterOpts::demo(3, 3));
    let good = c.package("4.2.1", false).display().to_string();
    let broken = c.package("4.2.2", true).display().to_string();
    c.cli_ok(&quick("4.2.1", &good, &[]));
    // A new term before the next rollouts: restart the leader.
    let leader = c.cli_json(&["cluster", "status", "--json"])["leader_id"]
        .as_u64()
        .unwrap();
    c.coord(leader).restart();
    orch_tests::wait_until(std::time::Duration::from_secs(30), "a leader again", || {
        let o = c.cli(&["cluster", "status", "--json"]);
        serde_json::from_str::<Value>(&orch_tests::stdout(&o))
            .is_ok_and(|v| v["leader_id"].as_u64().is_some() && v["quorum"] == true)
    });
    let o = c.cli(&quick("4.2.2", &broken, &[]));
    assert!(!o.status.success(), "{}", orch_tests::stdout(&o));
    assert_eq!(
        c.status_json("r000002")["phase"],
        "rolled_back",
        "{}",
        orch_tests::stderr(&o)
    );
    let third = c.package("4.2.3", false).display().to_string();
    c.cli_ok(&[
        "rollout",
        "4.2.3",
        "--package",
        &third,
        "--canary",
        "1",
        "--min-healthy-time",
        "0ms",
        "--detach",
    ]);
    orch_tests::wait_until(
        std::time::Duration::from_secs(60),
        "the canary to wait for promotion",
        || c.status_json("r000003")["awaiting_promotion"] == true,
    );
    c.cli_ok(&["abort", "r000003"]);

    let mut phases = Vec::new();
    for id in ["r000001", "r000002", "r000003"] {
        let st = c.status_json(id);
        let r = replayed(&st);
        assert_eq!(r.phase.as_str(), st["phase"], "{id}: {st}");
        assert_eq!(
            r.awaiting_promotion,
            st["awaiting_promotion"] == true,
            "{id}"
        );
        assert_eq!(r.error.as_deref(), st["error"].as_str(), "{id}");
        let nodes: Vec<(String, String)> = st["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                (
                    n["id"].as_str().unwrap().to_string(),
                    n["step"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let again: Vec<(String, String)> = r
            .nodes
            .iter()
            .map(|n| (n.id.to_string(), n.step.to_string()))
            .collect();
        assert_eq!(again, nodes, "{id}");
        let messages: Vec<&str> = st["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["message"].as_str())
            .collect();
        let again: Vec<&str> = r.events.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(
            again, messages,
            "{id}: the audit trail is rendered from the inputs"
        );
        phases.push(st["phase"].as_str().unwrap().to_string());
    }
    assert_eq!(phases, ["succeeded", "rolled_back", "aborted"]);
}
