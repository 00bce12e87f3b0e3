//! Property tests: a simulated driver runs the machine against a simulated cluster, answering
//! actions in random order with random outcomes, injecting duplicate and stale results and random
//! operator commands, and checks the machine's invariants after every event.

mod common;

use std::collections::{HashMap, HashSet};

use common::{n, v};
use orch_rollout::{Action, ActionKind, ActionResult, Command, Event, LogEntry, Outcome, Rollout};
use orch_types::rollout::{NodeStep, OnFailure, Phase, RolloutSpec};
use orch_types::{NodeId, Version};
use proptest::prelude::*;
use proptest::strategy::ValueTree;

const TARGET: Version = Version::new(4, 2, 1);

/// What one simulated node actually runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct World {
    running: Version,
    permanent: Version,
}

#[derive(Debug, Clone)]
struct Scenario {
    /// Per node: its starting version.
    initial: Vec<Version>,
    batch_size: u32,
    canary: u32,
    permanent: bool,
    on_failure: OnFailure,
    max_parallel_staging: u32,
    /// The driver's and the operators' choices, consumed one byte at a time.
    script: Vec<u8>,
}

fn version_strategy() -> impl Strategy<Value = Version> {
    prop_oneof![
        14 => Just(Version::new(4, 2, 0)),
        3 => Just(TARGET),
        1 => Just(Version::new(4, 2, 5)),
        1 => Just(Version::new(4, 1, 9)),
    ]
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (1usize..=7)
        .prop_flat_map(|count| {
            (
                proptest::collection::vec(version_strategy(), count),
                1u32..=4,
                0u32..=count as u32,
                any::<bool>(),
                prop_oneof![Just(OnFailure::Rollback), Just(OnFailure::Pause)],
                1u32..=3,
                proptest::collection::vec(any::<u8>(), 0..400),
            )
        })
        .prop_map(
            |(initial, batch_size, canary, permanent, on_failure, max_parallel_staging, script)| {
                Scenario {
                    initial,
                    batch_size,
                    canary,
                    permanent,
                    on_failure,
                    max_parallel_staging,
                    script,
                }
            },
        )
}

struct Sim {
    r: Rollout,
    spec: RolloutSpec,
    log: Vec<LogEntry>,
    world: HashMap<NodeId, World>,
    initial: HashMap<NodeId, Version>,
    script: std::vec::IntoIter<u8>,
    t: u64,
    // ----- observations for the invariants -----
    last_seq: u64,
    /// Install outcome per node: None while in flight, Some(ok) once answered.
    installs: HashMap<NodeId, Option<bool>>,
    install_order: Vec<NodeId>,
    downgrade_order: Vec<NodeId>,
    answered: Vec<(u64, ActionResult)>,
    promoted: bool,
    targets_at_upgrade: Option<Vec<NodeId>>,
    /// Installs issued again after a failed one (resume with on_failure: pause).
    retried_installs: usize,
}

impl Sim {
    fn new(sc: &Scenario) -> Sim {
        let nodes: Vec<NodeId> = (1..=sc.initial.len())
            .map(|i| n(&format!("n{i}")))
            .collect();
        let mut spec = RolloutSpec::new("r-prop", TARGET, nodes.clone(), "ops");
        spec.batch_size = sc.batch_size;
        spec.canary = sc.canary;
        spec.permanent = sc.permanent;
        spec.on_failure = sc.on_failure;
        spec.max_parallel_staging = sc.max_parallel_staging;
        spec.min_healthy_time_ms = 0;
        spec.healthy_deadline_ms = 1;
        let world = nodes
            .iter()
            .zip(&sc.initial)
            .map(|(id, &ver)| {
                (
                    id.clone(),
                    World {
                        running: ver,
                        permanent: ver,
                    },
                )
            })
            .collect();
        let initial = nodes
            .iter()
            .cloned()
            .zip(sc.initial.iter().copied())
            .collect();
        Sim {
            r: Rollout::new(spec.clone()).unwrap(),
            spec,
            log: Vec::new(),
            world,
            initial,
            script: sc.script.clone().into_iter(),
            t: 0,
            last_seq: 0,
            installs: HashMap::new(),
            install_order: Vec::new(),
            downgrade_order: Vec::new(),
            answered: Vec::new(),
            promoted: false,
            targets_at_upgrade: None,
            retried_installs: 0,
        }
    }

    fn byte(&mut self) -> Option<u8> {
        self.script.next()
    }

    /// Applies an event and checks the invariants that hold after every single event.
    fn apply(&mut self, event: Event, by: &str) -> Result<Outcome, TestCaseError> {
        self.t += 1;
        let before = self.r.clone();
        let expected_issue = self.r.next_actions();
        let predicted = self.r.next_actions_after(&event);
        let out = self.r.apply(&event, self.t, by);
        // The cheap prediction (no audit trail copied) agrees with applying for real.
        match &out {
            Err(_) => prop_assert_eq!(predicted, None),
            Ok(_) => prop_assert_eq!(predicted, Some(self.r.next_actions())),
        }
        self.log.push(LogEntry {
            event: event.clone(),
            at_ms: self.t,
            by: by.to_string(),
        });

        match &out {
            Err(_) | Ok(Outcome::Ignored { .. }) => {
                prop_assert_eq!(
                    &self.r,
                    &before,
                    "refused or ignored event changed the state"
                );
            }
            Ok(Outcome::Applied { .. }) => {}
        }
        // The audit trail is append-only.
        prop_assert!(self.r.events().starts_with(before.events()));
        // Serde round trip of the whole machine gives it back, at every step.
        let json = serde_json::to_string(&self.r).unwrap();
        let back: Rollout = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(&back, &self.r);

        if let Ok(o) = &out {
            if matches!(event, Event::IssueActions) {
                prop_assert_eq!(o.issued(), expected_issue.as_slice());
                if before.phase() == Phase::Paused || before.phase().is_terminal() {
                    prop_assert!(o.issued().is_empty(), "issued while paused or finished");
                }
            } else {
                prop_assert!(o.issued().is_empty());
            }
            for a in o.issued() {
                self.observe_issue(a)?;
            }
            if let Event::Command(Command::Promote) = event {
                self.promoted = true;
            }
        }
        if let (Event::Result { seq, result }, Ok(Outcome::Applied { .. })) = (&event, &out) {
            self.answered.push((*seq, result.clone()));
        }
        if self.targets_at_upgrade.is_none() && self.r.working_phase() == Phase::Upgrading {
            self.targets_at_upgrade = Some(
                self.r
                    .nodes()
                    .filter(|p| p.step != NodeStep::Skipped)
                    .map(|p| p.id.clone())
                    .collect(),
            );
        }
        self.check_state()?;
        Ok(out.unwrap_or(Outcome::Ignored {
            reason: "rejected".into(),
        }))
    }

    fn observe_issue(&mut self, a: &Action) -> Result<(), TestCaseError> {
        prop_assert!(
            a.seq > self.last_seq,
            "seq not increasing: {} after {}",
            a.seq,
            self.last_seq
        );
        self.last_seq = a.seq;
        let step = self.r.node(&a.node).unwrap().step;
        let initial = self.initial[&a.node];
        if initial == TARGET {
            prop_assert_eq!(&a.kind, &ActionKind::Preflight, "action on a skipped node");
        }
        match &a.kind {
            ActionKind::Install { version } => {
                prop_assert_eq!(*version, TARGET);
                prop_assert!(
                    self.downgrade_order.is_empty(),
                    "install after rollback started"
                );
                match self.installs.get(&a.node) {
                    None => self.install_order.push(a.node.clone()),
                    // A retry is only legitimate after a failed install (on_failure: pause).
                    Some(Some(false)) => self.retried_installs += 1,
                    Some(prev) => {
                        return Err(TestCaseError::fail(format!(
                            "{} installed twice (previous: {prev:?})",
                            a.node
                        )));
                    }
                }
                self.installs.insert(a.node.clone(), None);
                if !self.promoted && self.spec.canary > 0 {
                    let targets = self.targets_at_upgrade.clone().unwrap_or_default();
                    let pos = targets.iter().position(|x| x == &a.node).unwrap();
                    prop_assert!(
                        pos < self.spec.canary as usize,
                        "{} installed before the canary was promoted",
                        a.node
                    );
                }
            }
            ActionKind::Downgrade { to } => {
                prop_assert!(
                    self.installs.contains_key(&a.node),
                    "downgrade of an untouched node"
                );
                prop_assert!(!self.downgrade_order.contains(&a.node), "downgraded twice");
                prop_assert_eq!(Some(*to), Some(initial));
                self.downgrade_order.push(a.node.clone());
                // Reverse install order, one node after the other.
                let mut rev = self.install_order.clone();
                rev.reverse();
                prop_assert!(
                    rev.starts_with(&self.downgrade_order),
                    "downgrade order {:?} is not the reverse of install order {:?}",
                    self.downgrade_order,
                    self.install_order
                );
            }
            // A gate on anything but the target is a rollback gate.
            ActionKind::HealthGate { expect, .. } if *expect != TARGET => {
                prop_assert_eq!(step, NodeStep::RollingBack);
            }
            _ => {}
        }
        Ok(())
    }

    fn check_state(&self) -> Result<(), TestCaseError> {
        let inflight = self.r.in_flight();
        // At most one action per node in flight.
        let mut seen = HashSet::new();
        for a in inflight {
            prop_assert!(
                seen.insert(a.node.clone()),
                "two actions in flight on {}",
                a.node
            );
        }
        let count =
            |f: &dyn Fn(&ActionKind) -> bool| inflight.iter().filter(|a| f(&a.kind)).count();
        let upgrading = count(&|k| {
            matches!(k, ActionKind::Install { .. })
                || matches!(k, ActionKind::HealthGate { expect, .. } if *expect == TARGET)
        });
        prop_assert!(
            upgrading <= self.spec.batch_size as usize,
            "more than batch_size installing/verifying"
        );
        let busy_nodes = self
            .r
            .nodes()
            .filter(|p| {
                matches!(
                    p.step,
                    NodeStep::Installing | NodeStep::Installed | NodeStep::Verifying
                )
            })
            .count();
        if self.r.working_phase() == Phase::Upgrading {
            prop_assert!(busy_nodes <= self.spec.batch_size as usize);
        }
        let par = self.spec.max_parallel_staging as usize;
        let staging = count(&|k| matches!(k, ActionKind::Stage { .. }));
        prop_assert!(staging <= par, "{} stages in flight", staging);
        let committing = count(&|k| matches!(k, ActionKind::Commit { .. }));
        prop_assert!(committing <= par, "{} commits in flight", committing);
        prop_assert!(
            count(&|k| matches!(k, ActionKind::Downgrade { .. })
                || matches!(k, ActionKind::HealthGate { expect, .. } if *expect != TARGET))
                <= 1,
            "rollback is one node at a time"
        );
        if self.r.phase().is_terminal() {
            prop_assert!(inflight.is_empty());
            prop_assert!(self.r.next_actions().is_empty());
            prop_assert!(!self.r.awaiting_promotion());
        }
        Ok(())
    }

    /// The simulated agent: performs the action on the world and says how it went.
    fn perform(&mut self, a: &Action, fail: bool) -> ActionResult {
        let w = self.world.get_mut(&a.node).unwrap();
        let failed = |what: &str| ActionResult::Failed {
            error: what.to_string(),
        };
        match &a.kind {
            ActionKind::Preflight if fail => failed("unreachable"),
            ActionKind::Preflight => ActionResult::Preflight {
                running: w.running,
                free_disk: 1 << 30,
            },
            ActionKind::Stage { .. } if fail => failed("unpack failed"),
            ActionKind::Install { version } => {
                if fail {
                    // A failed install may or may not have switched the service.
                    if self.t.is_multiple_of(2) {
                        w.running = *version;
                    }
                    failed("activation failed")
                } else {
                    w.running = *version;
                    ActionResult::Done
                }
            }
            ActionKind::HealthGate { expect, .. } => {
                if w.running != *expect {
                    failed(&format!("probe reported {}", w.running))
                } else if fail {
                    failed("probe failing")
                } else {
                    ActionResult::Done
                }
            }
            ActionKind::Commit { version } if !fail => {
                w.permanent = *version;
                ActionResult::Done
            }
            ActionKind::Commit { .. } => failed("commit failed"),
            ActionKind::Downgrade { to } if !fail => {
                w.running = *to;
                w.permanent = *to;
                ActionResult::Done
            }
            ActionKind::Downgrade { .. } => failed("downgrade failed"),
            ActionKind::Stage { .. } => ActionResult::Done,
        }
    }

    fn answer(&mut self, a: Action, fail: bool) -> Result<(), TestCaseError> {
        let result = self.perform(&a, fail);
        if let ActionKind::Install { .. } = a.kind {
            let ok = matches!(result, ActionResult::Done);
            self.installs.insert(a.node.clone(), Some(ok));
        }
        self.apply(Event::Result { seq: a.seq, result }, "driver")?;
        Ok(())
    }

    /// One random driver or operator move. Returns false when the script is used up.
    fn random_step(&mut self) -> Result<bool, TestCaseError> {
        let Some(b) = self.byte() else {
            return Ok(false);
        };
        match b % 16 {
            0..=4 => {
                self.apply(Event::IssueActions, "driver")?;
            }
            5..=10 => {
                let inflight = self.r.in_flight().to_vec();
                if !inflight.is_empty() {
                    let pick = self.byte().unwrap_or(0) as usize % inflight.len();
                    let fail = self.byte().unwrap_or(255) < 28;
                    self.answer(inflight[pick].clone(), fail)?;
                }
            }
            11 => {
                // A duplicate (or a late answer from a deposed leader) of an answered action.
                if !self.answered.is_empty() {
                    let pick = self.byte().unwrap_or(0) as usize % self.answered.len();
                    let (seq, result) = self.answered[pick].clone();
                    let out = self.apply(Event::Result { seq, result }, "old-leader")?;
                    prop_assert!(out.is_ignored());
                }
            }
            12 => {
                // A result for a seq that is not in flight: cancelled, answered or never issued.
                // (A stray answer for an in-flight seq is indistinguishable from the real one.)
                let seq = u64::from(self.byte().unwrap_or(0)) % (self.r.next_seq() + 3);
                if self.r.in_flight().iter().any(|a| a.seq == seq) {
                    return Ok(true);
                }
                let result = match self.byte().unwrap_or(0) % 3 {
                    0 => ActionResult::Done,
                    1 => ActionResult::Failed {
                        error: "stale".into(),
                    },
                    _ => ActionResult::Preflight {
                        running: v("4.2.0"),
                        free_disk: 0,
                    },
                };
                let out = self.apply(Event::Result { seq, result }, "stranger")?;
                prop_assert!(out.is_ignored());
            }
            _ => {
                let c = match self.byte().unwrap_or(0) % 20 {
                    0..=5 => Command::Pause,
                    6..=12 => Command::Resume,
                    13..=17 => Command::Promote,
                    18 => Command::Rollback,
                    _ => Command::Abort,
                };
                self.apply(Event::Command(c), "operator")?;
            }
        }
        Ok(true)
    }

    /// After the script: a well-behaved driver and operator that answer everything
    /// successfully, resume and promote. The machine must reach a terminal phase.
    fn finish(&mut self) -> Result<(), TestCaseError> {
        for _ in 0..2_000 {
            if self.r.phase().is_terminal() {
                return Ok(());
            }
            if self.r.phase() == Phase::Paused {
                self.apply(Event::Command(Command::Resume), "operator")?;
            } else if self.r.awaiting_promotion() {
                self.apply(Event::Command(Command::Promote), "operator")?;
            } else if !self.r.next_actions().is_empty() {
                self.apply(Event::IssueActions, "driver")?;
            } else if let Some(a) = self.r.in_flight().first().cloned() {
                self.answer(a, false)?;
            } else {
                return Err(TestCaseError::fail(format!(
                    "stuck: nothing to issue, nothing in flight: {}",
                    self.r.summary()
                )));
            }
        }
        Err(TestCaseError::fail(format!(
            "did not terminate: {}",
            self.r.summary()
        )))
    }

    fn check_end(&self) -> Result<(), TestCaseError> {
        let touched: Vec<NodeId> = self.r.touched();
        prop_assert_eq!(&touched, &self.install_order);
        match self.r.phase() {
            Phase::Succeeded => {
                for p in self.r.nodes() {
                    let w = self.world[&p.id];
                    prop_assert_eq!(w.running, TARGET, "{} not on target", p.id);
                    if p.step == NodeStep::Skipped {
                        continue;
                    }
                    if self.spec.permanent {
                        prop_assert_eq!(p.step, NodeStep::Committed);
                        prop_assert_eq!(w.permanent, TARGET);
                    } else {
                        prop_assert_eq!(p.step, NodeStep::Upgraded);
                        prop_assert_eq!(w.permanent, self.initial[&p.id]);
                    }
                }
            }
            Phase::RolledBack => {
                let mut rev = self.install_order.clone();
                rev.reverse();
                prop_assert_eq!(&self.downgrade_order, &rev);
                for p in self.r.nodes() {
                    let w = self.world[&p.id];
                    prop_assert_eq!(w.running, self.initial[&p.id], "{} not back", p.id);
                    if touched.contains(&p.id) {
                        prop_assert_eq!(p.step, NodeStep::RolledBack);
                        prop_assert_eq!(w.permanent, self.initial[&p.id]);
                    }
                }
            }
            Phase::RollbackFailed => {
                let failed: Vec<&NodeId> = self
                    .r
                    .nodes()
                    .filter(|p| p.step == NodeStep::RollbackFailed)
                    .map(|p| &p.id)
                    .collect();
                prop_assert!(!failed.is_empty());
                let err = self.r.error().unwrap();
                for id in failed {
                    prop_assert!(err.contains(id.as_str()), "{} not named in {}", id, err);
                }
                for p in self.r.nodes() {
                    if touched.contains(&p.id) {
                        prop_assert!(matches!(
                            p.step,
                            NodeStep::RolledBack | NodeStep::RollbackFailed
                        ));
                    }
                }
            }
            Phase::Aborted => {
                prop_assert!(self.r.error().is_some());
            }
            other => return Err(TestCaseError::fail(format!("not terminal: {other}"))),
        }
        // Determinism: the log replays to the identical state on a fresh machine.
        let replayed = Rollout::replay(self.spec.clone(), &self.log).unwrap();
        prop_assert_eq!(&replayed, &self.r);
        Ok(())
    }
}

/// `cases` unless PROPTEST_CASES says otherwise (to dial a run up or down from the command line).
fn config(cases: u32) -> ProptestConfig {
    let mut c = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = cases;
    }
    c
}

proptest! {
    #![proptest_config(config(1_000))]

    #[test]
    fn random_drivers_keep_every_invariant(sc in scenario()) {
        let mut sim = Sim::new(&sc);
        while sim.random_step()? {}
        sim.finish()?;
        sim.check_end()?;
    }

    /// With a driver that never fails anything and an operator who only promotes, every rollout
    /// whose preflight passes succeeds.
    #[test]
    fn clean_runs_succeed(sc in scenario()) {
        let mut sim = Sim::new(&Scenario { script: Vec::new(), ..sc.clone() });
        sim.finish()?;
        sim.check_end()?;
        let bad_hop = sc.initial.iter().any(|ver| !ver.is_patch_hop(&TARGET));
        if bad_hop {
            prop_assert_eq!(sim.r.phase(), Phase::Aborted);
            prop_assert!(sim.install_order.is_empty());
        } else {
            prop_assert_eq!(sim.r.phase(), Phase::Succeeded);
        }
    }
}

#[test]
fn the_simulation_reaches_every_terminal_phase() {
    // Guards the property test against a generator that never exercises some ending.
    let mut seen = HashSet::new();
    let (mut retries, mut promotions, mut skips) = (0, 0, 0);
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    for _ in 0..400 {
        let sc = scenario().new_tree(&mut runner).unwrap().current();
        let mut sim = Sim::new(&sc);
        while sim.random_step().unwrap() {}
        sim.finish().unwrap();
        sim.check_end().unwrap();
        seen.insert(sim.r.phase());
        retries += sim.retried_installs;
        promotions += usize::from(sim.promoted);
        skips += sim
            .r
            .nodes()
            .filter(|p| p.step == NodeStep::Skipped)
            .count();
    }
    assert!(retries > 0, "no install was ever retried");
    assert!(promotions > 0, "no canary was ever promoted");
    assert!(skips > 0, "no node was ever skipped");
    for p in [
        Phase::Succeeded,
        Phase::RolledBack,
        Phase::RollbackFailed,
        Phase::Aborted,
    ] {
        assert!(seen.contains(&p), "never reached {p}: {seen:?}");
    }
}
