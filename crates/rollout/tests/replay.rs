//! Replay from the record a rollout keeps of itself: for many generated runs (driver terms
//! that change, stale and mismatched results, operator commands at any time, failures and
//! refusals), `replay(spec, rollout.inputs())` gives the identical rollout, audit trail included,
//! also after the record went through JSON (as `status --json` shows it).

use orch_rollout::{ActionKind, ActionResult, Command, Event, Input, Rollout, replay};
use orch_types::rollout::{OnFailure, RolloutSpec};
use orch_types::{NodeId, ReleaseState, Version, VersionEntry};
use proptest::prelude::*;

fn v(s: &str) -> Version {
    s.parse().unwrap()
}

fn spec(nodes: usize, batch: u32, canary: u32, on_failure: OnFailure) -> RolloutSpec {
    let ids: Vec<NodeId> = (1..=nodes)
        .map(|i| format!("n{i}").parse().unwrap())
        .collect();
    let mut s = RolloutSpec::new("r000001", v("4.2.1"), ids, "operator/alice");
    s.batch_size = batch;
    s.canary = canary.min(nodes as u32);
    s.on_failure = on_failure;
    s.min_healthy_time_ms = 0;
    s.healthy_deadline_ms = 1;
    s
}

/// One answer the simulated driver gives to an in-flight action, chosen by a script byte.
fn answer(kind: &ActionKind, b: u8) -> ActionResult {
    match (kind, b % 8) {
        (ActionKind::Preflight, 0) => ActionResult::Failed {
            error: "unreachable".into(),
        },
        (ActionKind::Preflight, 1) => ActionResult::Preflight {
            running: v("4.2.1"),
            free_disk: 1 << 30,
            releases: vec![VersionEntry {
                version: v("4.2.1"),
                state: ReleaseState::Permanent,
            }],
        },
        (ActionKind::Preflight, _) => ActionResult::Preflight {
            running: v("4.2.0"),
            free_disk: 1 << 30,
            releases: vec![VersionEntry {
                version: v("4.2.0"),
                state: ReleaseState::Permanent,
            }],
        },
        (_, 0) => ActionResult::Failed {
            error: "x".repeat(usize::from(b) * 40),
        },
        (_, 1) => ActionResult::Refused {
            error: "refused".into(),
        },
        // A result that does not fit a step: rejected, and changes nothing.
        (_, 2) => ActionResult::Preflight {
            running: v("4.2.0"),
            free_disk: 0,
            releases: Vec::new(),
        },
        _ => ActionResult::Done,
    }
}

/// Runs a script against a fresh rollout; every byte picks the next event.
fn run(spec: RolloutSpec, script: &[u8]) -> Rollout {
    let mut r = Rollout::new(spec).unwrap();
    drive(&mut r, script);
    r
}

/// Applies a script to `r` (see [`run`]).
fn drive(r: &mut Rollout, script: &[u8]) {
    let mut term = 1u64 + r.driver_term();
    let mut t = 0u64;
    let mut bytes = script.iter().copied();
    while let Some(b) = bytes.next() {
        t += 1;
        let arg = bytes.next().unwrap_or(0);
        let event = match b % 16 {
            // A new leader.
            0 => {
                term += 1;
                Event::IssueActions
            }
            1 => Event::Command(Command::Pause),
            2 => Event::Command(Command::Resume),
            3 => Event::Command(Command::Promote),
            4 if arg % 4 == 0 => Event::Command(Command::Rollback),
            5 if arg % 8 == 0 => Event::Command(Command::Abort),
            // A result for an action that is not in flight (stale, or never issued).
            6 => Event::Result {
                seq: u64::from(arg),
                result: ActionResult::Done,
            },
            _ if !r.next_actions().is_empty() && b % 3 == 0 => Event::IssueActions,
            _ => match r
                .in_flight()
                .get(usize::from(arg) % r.in_flight().len().max(1))
            {
                Some(a) => Event::Result {
                    seq: a.seq,
                    result: answer(&a.kind, b),
                },
                None => Event::IssueActions,
            },
        };
        // Commands carry no term; a deposed driver's result now and then carries an old one.
        let in_term = match &event {
            Event::Command(_) => 0,
            Event::Result { .. } if arg % 7 == 0 => term.saturating_sub(1),
            _ => term,
        };
        let by = if in_term == 0 {
            "operator/bob"
        } else {
            "coordinator-1"
        };
        let _ = r.apply_in_term(&event, t, by, in_term);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn replaying_the_recorded_inputs_gives_the_same_rollout(
        nodes in 1usize..6,
        batch in 1u32..3,
        canary in 0u32..3,
        pause in any::<bool>(),
        script in proptest::collection::vec(any::<u8>(), 0..400),
    ) {
        let on_failure = if pause { OnFailure::Pause } else { OnFailure::Rollback };
        let spec = spec(nodes, batch, canary, on_failure);
        let r = run(spec.clone(), &script);
        let replayed = replay(spec.clone(), r.inputs()).unwrap();
        prop_assert_eq!(&replayed, &r);
        // The record as `status --json` carries it replays the same.
        let json = serde_json::to_string(r.inputs()).unwrap();
        let inputs: Vec<Input> = serde_json::from_str(&json).unwrap();
        let from_json = replay(spec, &inputs).unwrap();
        prop_assert_eq!(from_json.status(), r.status());
        // Only inputs that changed something are kept: never more than were applied.
        prop_assert!(r.inputs().len() <= script.len());
    }

    /// A rollout read back from JSON (a snapshot, a restart: what it keeps only in memory,
    /// such as where each node is, starts empty) goes on exactly as the original does.
    #[test]
    fn a_rollout_read_back_from_json_continues_the_same(
        nodes in 1usize..6,
        batch in 1u32..3,
        canary in 0u32..3,
        before in proptest::collection::vec(any::<u8>(), 0..200),
        after in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let mut r = run(spec(nodes, batch, canary, OnFailure::Rollback), &before);
        let json = serde_json::to_string(&r).unwrap();
        let mut back: Rollout = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(&back, &r);
        prop_assert_eq!(back.next_actions(), r.next_actions());
        drive(&mut r, &after);
        drive(&mut back, &after);
        prop_assert_eq!(&back, &r);
        prop_assert_eq!(back.status(), r.status());
        prop_assert_eq!(back.next_actions(), r.next_actions());
    }
}

/// Inputs that change nothing are not kept: a driver proposing `IssueActions` with nothing to
/// issue, again and again, does not grow the record.
#[test]
fn idle_and_refused_inputs_are_not_recorded() {
    let mut r = Rollout::new(spec(1, 1, 0, OnFailure::Rollback)).unwrap();
    r.apply_in_term(&Event::IssueActions, 1, "c", 1).unwrap();
    let kept = r.inputs().len();
    for t in 2..50 {
        let _ = r.apply_in_term(&Event::IssueActions, t, "c", 1);
        let _ = r.apply(&Event::Command(Command::Promote), t, "operator/bob");
    }
    assert_eq!(r.inputs().len(), kept);
    // A new driver's claim changes the driver term: kept, although it issues nothing.
    r.apply_in_term(&Event::IssueActions, 60, "c", 2).unwrap();
    assert_eq!(r.inputs().len(), kept + 1);
    assert_eq!(r.inputs().last().unwrap().term, 2);
}
