//! Test harness shared by the transition tests and the property tests: a rollout plus the log of
//! every event applied to it, so any test can check that replay and serde give the same state.

#![allow(dead_code)]

pub mod node;

use orch_rollout::{
    Action, ActionKind, ActionResult, Command, Event, LogEntry, Outcome, Rejected, Rollout,
};
use orch_types::rollout::{NodeStep, Phase, RolloutSpec};
use orch_types::{NodeId, ReleaseState, Version, VersionEntry};

pub fn v(s: &str) -> Version {
    s.parse().unwrap()
}

pub fn n(s: &str) -> NodeId {
    s.parse().unwrap()
}

pub const TARGET: &str = "4.2.1";
pub const FROM: &str = "4.2.0";

/// `count` nodes n1..nN, target 4.2.1, instant health gates, defaults otherwise.
pub fn spec(count: usize) -> RolloutSpec {
    let nodes = (1..=count).map(|i| n(&format!("n{i}"))).collect();
    let mut s = RolloutSpec::new("r1", v(TARGET), nodes, "alice");
    s.min_healthy_time_ms = 0;
    s.healthy_deadline_ms = 1_000;
    s
}

pub struct H {
    pub r: Rollout,
    pub log: Vec<LogEntry>,
    pub t: u64,
}

impl H {
    pub fn new(spec: RolloutSpec) -> H {
        H {
            r: Rollout::new(spec).expect("valid spec"),
            log: Vec::new(),
            t: 1_000,
        }
    }

    /// Applies an event, logging it, and checks that a refusal or an ignored event changed
    /// nothing.
    pub fn apply_by(&mut self, event: Event, by: &str) -> Result<Outcome, Rejected> {
        self.t += 1;
        let before = self.r.clone();
        let out = self.r.apply(&event, self.t, by);
        self.log.push(LogEntry {
            event,
            at_ms: self.t,
            by: by.to_string(),
        });
        match &out {
            Err(_) | Ok(Outcome::Ignored { .. }) => {
                assert_eq!(self.r, before, "refused/ignored event changed state")
            }
            Ok(Outcome::Applied { .. }) => {}
        }
        out
    }

    pub fn apply(&mut self, event: Event) -> Result<Outcome, Rejected> {
        self.apply_by(event, "coord-1")
    }

    pub fn phase(&self) -> Phase {
        self.r.phase()
    }

    /// Issues the next actions, checking they are exactly what `next_actions` announced.
    pub fn issue(&mut self) -> Vec<Action> {
        let expected = self.r.next_actions();
        let out = self.apply(Event::IssueActions).unwrap();
        assert_eq!(out.issued(), expected.as_slice());
        for a in out.issued() {
            assert!(self.r.in_flight().contains(a));
        }
        out.issued().to_vec()
    }

    pub fn result(&mut self, seq: u64, result: ActionResult) -> Outcome {
        self.apply(Event::Result { seq, result }).unwrap()
    }

    pub fn done(&mut self, seq: u64) -> Outcome {
        self.result(seq, ActionResult::Done)
    }

    pub fn fail(&mut self, seq: u64, error: &str) -> Outcome {
        self.result(
            seq,
            ActionResult::Failed {
                error: error.to_string(),
            },
        )
    }

    /// A preflight answer from a node that runs `running` permanently and has nothing else.
    pub fn preflight(&mut self, seq: u64, running: &str) -> Outcome {
        self.preflight_with(seq, &[(running, "permanent")])
    }

    /// A preflight answer listing `releases` as `(version, state)`; the running version is the
    /// current one, else the permanent one.
    pub fn preflight_with(&mut self, seq: u64, releases: &[(&str, &str)]) -> Outcome {
        let releases = entries(releases);
        let running = releases
            .iter()
            .find(|e| e.state == ReleaseState::Current)
            .or_else(|| releases.iter().find(|e| e.state == ReleaseState::Permanent))
            .expect("a running release")
            .version;
        self.result(
            seq,
            ActionResult::Preflight {
                running,
                free_disk: 1 << 40,
                releases,
            },
        )
    }

    /// A preflight answer without a release list, as drivers sent before lists existed.
    pub fn preflight_legacy(&mut self, seq: u64, running: &str) -> Outcome {
        self.result(
            seq,
            ActionResult::Preflight {
                running: v(running),
                free_disk: 1 << 40,
                releases: Vec::new(),
            },
        )
    }

    pub fn refuse(&mut self, seq: u64, error: &str) -> Outcome {
        self.result(
            seq,
            ActionResult::Refused {
                error: error.to_string(),
            },
        )
    }

    pub fn cmd(&mut self, c: Command) -> Result<Outcome, Rejected> {
        self.apply_by(Event::Command(c), "alice")
    }

    pub fn step(&self, node: &str) -> NodeStep {
        self.r.node(&n(node)).unwrap().step
    }

    pub fn steps(&self) -> Vec<NodeStep> {
        self.r.nodes().map(|p| p.step).collect()
    }

    /// The seq of the in-flight action of kind `kind` (by name) on `node`.
    pub fn seq_of(&self, node: &str, kind: &str) -> u64 {
        self.r
            .in_flight()
            .iter()
            .find(|a| a.node.as_str() == node && a.kind.name() == kind)
            .unwrap_or_else(|| panic!("no in-flight {kind} on {node}: {:?}", self.r.in_flight()))
            .seq
    }

    /// Issue preflights and answer them with `versions` (one per node, in order).
    pub fn preflight_all(&mut self, versions: &[&str]) {
        let actions = self.issue();
        assert_eq!(actions.len(), versions.len());
        for (a, ver) in actions.iter().zip(versions) {
            assert_eq!(a.kind, ActionKind::Preflight);
            self.preflight(a.seq, ver);
        }
    }

    /// Preflight every node from 4.2.0 and stage them all successfully.
    pub fn run_to_upgrading(&mut self) {
        let count = self.r.nodes().len();
        self.preflight_all(&vec![FROM; count]);
        self.stage_all();
        assert_eq!(self.phase(), Phase::Upgrading);
    }

    pub fn stage_all(&mut self) {
        while self.r.working_phase() == Phase::Staging && !self.r.phase().is_terminal() {
            let actions = self.issue();
            assert!(!actions.is_empty(), "staging stalled");
            for a in actions {
                self.done(a.seq);
            }
        }
    }

    /// Issue and answer `Done` to everything until nothing more happens. Returns the actions in
    /// the order they were issued.
    pub fn run_ok(&mut self) -> Vec<Action> {
        let mut all = Vec::new();
        loop {
            let issued = self.issue();
            if issued.is_empty() && self.r.in_flight().is_empty() {
                return all;
            }
            all.extend(issued.iter().cloned());
            let pending: Vec<Action> = self.r.in_flight().to_vec();
            for a in pending {
                if a.kind == ActionKind::Preflight {
                    self.preflight(a.seq, FROM);
                } else {
                    self.done(a.seq);
                }
            }
        }
    }

    /// The state is reproducible: replaying the log, replaying the rollout's own record of its
    /// inputs and a serde round trip all give it back.
    pub fn check(&self) {
        let replayed = Rollout::replay(self.r.spec().clone(), &self.log).unwrap();
        assert_eq!(replayed, self.r, "replay diverged");
        let replayed = orch_rollout::replay(self.r.spec().clone(), self.r.inputs()).unwrap();
        assert_eq!(replayed, self.r, "replay of the recorded inputs diverged");
        let json = serde_json::to_string(&self.r).unwrap();
        let back: Rollout = serde_json::from_str(&json).unwrap();
        assert_eq!(back, self.r, "serde round trip diverged");
    }

    pub fn messages(&self) -> Vec<String> {
        self.r.events().iter().map(|e| e.message.clone()).collect()
    }

    pub fn has_event(&self, needle: &str) -> bool {
        self.r.events().iter().any(|e| e.message.contains(needle))
    }
}

/// `(version, state)` pairs as release entries.
pub fn entries(releases: &[(&str, &str)]) -> Vec<VersionEntry> {
    releases
        .iter()
        .map(|(ver, st)| VersionEntry {
            version: v(ver),
            state: st.parse().expect("a release state"),
        })
        .collect()
}

pub fn kinds(actions: &[Action]) -> Vec<(String, &'static str)> {
    actions
        .iter()
        .map(|a| (a.node.to_string(), a.kind.name()))
        .collect()
}

/// `(node, min healthy, deadline, failure threshold)` of each action, all health gates on
/// [`TARGET`].
pub fn gates(actions: &[Action]) -> Vec<(String, u64, u64, u32)> {
    actions
        .iter()
        .map(|a| match &a.kind {
            ActionKind::HealthGate {
                min_healthy_time_ms,
                healthy_deadline_ms,
                expect,
                failure_threshold,
            } => {
                assert_eq!(expect.to_string(), TARGET);
                (
                    a.node.to_string(),
                    *min_healthy_time_ms,
                    *healthy_deadline_ms,
                    *failure_threshold,
                )
            }
            other => panic!("expected a health gate, got {other}"),
        })
        .collect()
}
