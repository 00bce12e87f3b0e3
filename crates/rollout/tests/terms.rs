//! Driver terms: a result recorded by a deposed driver (an older Raft term than the one now
//! driving the rollout) is ignored, and every event says which term recorded it.

use orch_rollout::{ActionKind, ActionResult, Command, Event, Outcome, Rollout};
use orch_types::rollout::{NodeStep, Phase, RolloutSpec};

fn spec() -> RolloutSpec {
    let mut s = RolloutSpec::new(
        "r1",
        "4.2.1".parse().unwrap(),
        vec!["n1".parse().unwrap(), "n2".parse().unwrap()],
        "alice",
    );
    s.min_healthy_time_ms = 0;
    s.healthy_deadline_ms = 1_000;
    s
}

fn issue(r: &mut Rollout, term: u64) -> Vec<orch_rollout::Action> {
    r.apply_in_term(&Event::IssueActions, 1, "c", term)
        .unwrap()
        .issued()
        .to_vec()
}

fn result(r: &mut Rollout, seq: u64, res: ActionResult, term: u64) -> Outcome {
    r.apply_in_term(&Event::Result { seq, result: res }, 1, "c", term)
        .unwrap()
}

/// Drives `r` to the first node's health gate in `term`; returns the gate's seq.
fn to_first_gate(r: &mut Rollout, term: u64) -> u64 {
    for a in issue(r, term) {
        let res = ActionResult::Preflight {
            running: "4.2.0".parse().unwrap(),
            free_disk: u64::MAX,
            releases: Vec::new(),
        };
        result(r, a.seq, res, term);
    }
    for a in issue(r, term) {
        result(r, a.seq, ActionResult::Done, term);
    }
    let install = issue(r, term);
    assert!(matches!(install[0].kind, ActionKind::Install { .. }));
    result(r, install[0].seq, ActionResult::Done, term);
    let gate = issue(r, term);
    assert!(matches!(gate[0].kind, ActionKind::HealthGate { .. }));
    gate[0].seq
}

/// The bug: a health gate probed by the leader of term 2 failed while it was cut off; a leader
/// of term 3 took over and re-performs the gate. The term-2 failure, committed late, must not
/// roll the rollout back.
#[test]
fn a_result_from_a_deposed_driver_is_ignored() {
    let mut r = Rollout::new(spec()).unwrap();
    let gate = to_first_gate(&mut r, 2);
    // The new driver claims the rollout: its first entry is an IssueActions in term 3.
    let claim = r.apply_in_term(&Event::IssueActions, 2, "c2", 3).unwrap();
    assert!(claim.is_ignored(), "nothing new to issue: {claim:?}");
    assert_eq!(r.driver_term(), 3, "the claim moves the driver term");
    let before = r.clone();
    let late = result(
        &mut r,
        gate,
        ActionResult::Failed {
            error: "health probe timed out".into(),
        },
        2,
    );
    assert!(
        matches!(&late, Outcome::Ignored { reason } if reason.contains("term 2") && reason.contains("term 3")),
        "{late:?}"
    );
    assert_eq!(r, before, "an ignored result changes nothing");
    assert_eq!(r.phase(), Phase::Upgrading);
    // The current driver's result for the same gate counts.
    result(&mut r, gate, ActionResult::Done, 3);
    assert_eq!(
        r.node(&"n1".parse().unwrap()).unwrap().step,
        NodeStep::Upgraded
    );
}

#[test]
fn a_newer_terms_result_moves_the_term_and_commands_do_not() {
    let mut r = Rollout::new(spec()).unwrap();
    let gate = to_first_gate(&mut r, 2);
    r.apply_in_term(&Event::Command(Command::Pause), 3, "operator/alice", 0)
        .unwrap();
    assert_eq!(r.driver_term(), 2, "operators' commands carry no term");
    result(&mut r, gate, ActionResult::Done, 4);
    assert_eq!(r.driver_term(), 4);
    // Every event says which term recorded it; the operator's says 0.
    let terms: Vec<u64> = r.events().iter().map(|e| e.term).collect();
    assert!(
        terms.contains(&2) && terms.contains(&4) && terms.contains(&0),
        "{terms:?}"
    );
    assert!(
        r.events()
            .iter()
            .filter(|e| e.by == "operator/alice")
            .all(|e| e.term == 0)
    );
}

/// Entries without a term (`apply`, or logs written before terms were kept) are never refused.
#[test]
fn entries_without_a_term_still_apply() {
    let mut r = Rollout::new(spec()).unwrap();
    let gate = to_first_gate(&mut r, 5);
    r.apply(
        &Event::Result {
            seq: gate,
            result: ActionResult::Done,
        },
        1,
        "c",
    )
    .unwrap();
    assert_eq!(
        r.node(&"n1".parse().unwrap()).unwrap().step,
        NodeStep::Upgraded
    );
    assert_eq!(r.driver_term(), 5);
}
