//! Property tests: a simulated driver runs the machine against a simulated cluster, answering
//! actions in random order with random outcomes, injecting duplicate and stale results and random
//! operator commands, and checks the machine's invariants after every event.
//!
//! Each simulated node is a release store run by the node layer's real rules (`common::node`),
//! started in a random *reachable* state (built by random unpack / install / permanent /
//! downgrade steps from a first install), so every state a node can be in when a rollout starts
//! is exercised: target unknown, unpacked, old, current, permanent, permanent behind another
//! current release, older than the running release, another `major.minor`.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};

use common::node::{Node, Shape};
use common::{n, v};
use orch_release::rules::Op;
use orch_rollout::{
    Action, ActionKind, ActionResult, Command, Event, LogEntry, NodeAction, Outcome, Rollout,
};
use orch_types::rollout::{NodeCount, NodeStep, OnFailure, Phase, RolloutSpec, Wave};
use orch_types::{NodeId, ReleaseState, Version};
use proptest::prelude::*;
use proptest::strategy::ValueTree;

const TARGET: Version = Version::new(4, 2, 1);
/// Versions the random preparation steps use (besides the first install).
const PREP_VERSIONS: [Version; 3] = [Version::new(4, 2, 0), TARGET, Version::new(4, 2, 5)];

/// One step that builds a node's starting releases; steps the rules refuse are skipped.
#[derive(Debug, Clone, Copy)]
enum Prep {
    Unpack(usize),
    Install(usize, bool),
    Permanent(usize),
    Downgrade(usize),
}

fn prep_strategy() -> impl Strategy<Value = Prep> {
    let ver = 0..PREP_VERSIONS.len();
    prop_oneof![
        2 => ver.clone().prop_map(Prep::Unpack),
        4 => (ver.clone(), any::<bool>()).prop_map(|(i, p)| Prep::Install(i, p)),
        1 => ver.clone().prop_map(Prep::Permanent),
        2 => ver.prop_map(Prep::Downgrade),
    ]
}

/// A node's starting store: a first install of `base`, then the `prep` steps the rules allow.
fn start_node(base: Version, prep: &[Prep]) -> Node {
    let mut node = Node::default();
    node.op(
        Op::Install {
            version: base,
            permanent: true,
        },
        Some("emqx"),
    )
    .expect("a first install is always allowed");
    for p in prep {
        let op = match *p {
            Prep::Unpack(i) => Op::Unpack(PREP_VERSIONS[i]),
            Prep::Install(i, permanent) => Op::Install {
                version: PREP_VERSIONS[i],
                permanent,
            },
            Prep::Permanent(i) => Op::Permanent(PREP_VERSIONS[i]),
            Prep::Downgrade(i) => Op::Downgrade(PREP_VERSIONS[i]),
        };
        // A refused preparation step changes nothing: the state stays reachable.
        let _ = node.op(op, Some("emqx"));
    }
    node
}

fn node_strategy() -> impl Strategy<Value = Node> {
    (
        prop_oneof![
            10 => Just(Version::new(4, 2, 0)),
            2 => Just(TARGET),
            1 => Just(Version::new(4, 2, 5)),
            1 => Just(Version::new(4, 1, 9)),
        ],
        proptest::collection::vec(prep_strategy(), 0..5),
    )
        .prop_map(|(base, prep)| start_node(base, &prep))
}

/// Which row of the rollout table a node's start falls in (for the coverage check).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum StartKind {
    BadHop,
    Unknown,
    OnDisk,
    OnDiskBehindCurrent,
    Current,
    Permanent,
    PermanentBehindCurrent,
    Older,
}

fn start_kind(node: &Node) -> StartKind {
    let running = node.running().expect("something runs");
    if !running.is_patch_hop(&TARGET) {
        return StartKind::BadHop;
    }
    match node.state(TARGET) {
        Some(ReleaseState::Permanent) if node.current().is_some() => {
            StartKind::PermanentBehindCurrent
        }
        Some(ReleaseState::Permanent) => StartKind::Permanent,
        Some(ReleaseState::Current) => StartKind::Current,
        _ if running > TARGET => StartKind::Older,
        Some(_) if node.current().is_some() => StartKind::OnDiskBehindCurrent,
        Some(_) => StartKind::OnDisk,
        None => StartKind::Unknown,
    }
}

#[derive(Debug, Clone)]
struct Scenario {
    /// Per node: its starting release store.
    initial: Vec<Node>,
    batch_size: u32,
    canary: u32,
    permanent: bool,
    on_failure: OnFailure,
    max_parallel_staging: u32,
    /// The driver's and the operators' choices, consumed one byte at a time.
    script: Vec<u8>,
    /// `keep_releases`: prune after success.
    keep: Option<u32>,
    /// `bake_ms > 0` (`--bake`).
    bake: bool,
    /// `watch_after_commit_ms > 0` (`--watch-after-commit`; only when permanent).
    watch: bool,
    /// Waves, batch percentage, max-unavailable (`--wave-by` and friends).
    policy: Policy,
}

/// The policy options of a scenario; the default is none of them.
#[derive(Debug, Clone, Default)]
struct Policy {
    /// Consecutive wave sizes (their sum is the node count); empty: no waves.
    waves: Vec<usize>,
    /// `--batch-size P%` (overrides the scenario's batch size).
    batch_percent: Option<u32>,
    /// `--max-unavailable N`.
    max_unavailable: Option<u32>,
    /// Nodes of the rollout (indexes) unhealthy at the start, and how many outside it.
    unhealthy: Vec<usize>,
    unhealthy_outside: usize,
    /// `--promote-each-wave` (only with waves).
    promote_each_wave: bool,
    /// `--wave-pause` (only with waves).
    wave_pause: bool,
}

/// Random policies for `count` nodes: waves of random sizes, a percentage or not, a bound
/// with fewer unhealthy nodes than it allows (more is refused by the spec).
fn policy_strategy(count: usize) -> impl Strategy<Value = Policy> {
    (
        proptest::option::of(proptest::collection::vec(1usize..=3, 1..=count)),
        proptest::option::of(prop_oneof![Just(1u32), Just(34), Just(50), Just(100)]),
        proptest::option::of(1u32..=3),
        proptest::collection::vec(0..count, 0..=2),
        0usize..=1,
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            move |(waves, batch_percent, max_unavailable, unhealthy, outside, promote, pause)| {
                // Cut the random sizes to partition exactly `count` nodes.
                let mut sizes = Vec::new();
                let mut left = count;
                for w in waves.unwrap_or_default() {
                    if left == 0 {
                        break;
                    }
                    let w = w.min(left);
                    sizes.push(w);
                    left -= w;
                }
                if !sizes.is_empty() && left > 0 {
                    sizes.push(left);
                }
                let mut unhealthy: Vec<usize> = unhealthy;
                unhealthy.sort_unstable();
                unhealthy.dedup();
                let mut outside = outside;
                if let Some(max) = max_unavailable {
                    // Strictly fewer than the bound: the spec refuses the rest.
                    unhealthy.truncate(max as usize - 1);
                    outside = outside.min(max as usize - 1 - unhealthy.len());
                } else {
                    unhealthy.clear();
                    outside = 0;
                }
                Policy {
                    promote_each_wave: promote && !sizes.is_empty(),
                    wave_pause: pause && !sizes.is_empty(),
                    waves: sizes,
                    batch_percent,
                    max_unavailable,
                    unhealthy,
                    unhealthy_outside: outside,
                }
            },
        )
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (1usize..=6)
        .prop_flat_map(|count| {
            (
                proptest::collection::vec(node_strategy(), count),
                1u32..=4,
                0u32..=count as u32,
                any::<bool>(),
                prop_oneof![Just(OnFailure::Rollback), Just(OnFailure::Pause)],
                1u32..=3,
                proptest::collection::vec(any::<u8>(), 0..400),
                proptest::option::of(0u32..=3),
                any::<bool>(),
                any::<bool>(),
                policy_strategy(count),
            )
        })
        .prop_map(
            |(
                initial,
                batch_size,
                canary,
                permanent,
                on_failure,
                max_parallel_staging,
                script,
                keep,
                bake,
                watch,
                policy,
            )| {
                Scenario {
                    initial,
                    batch_size,
                    canary,
                    permanent,
                    on_failure,
                    max_parallel_staging,
                    script,
                    keep,
                    bake,
                    watch: watch && permanent,
                    policy,
                }
            },
        )
}

/// How the simulated agent answered one step that may change a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    /// Not answered yet (in flight, or cancelled and never performed).
    Pending,
    /// `Done`, or `Failed` (whether it changed the node is unknown to the machine).
    Done,
    Failed,
    /// `Refused`: nothing changed.
    Refused,
}

/// Where a rolled-back node must be: what it ran, with the permanent release it had; a node
/// that ran the target without it being permanent goes to its permanent release.
fn expected_after_rollback(start: &Node) -> Shape {
    let p = start.permanent();
    if start.current() == Some(TARGET) {
        (p, p, None)
    } else {
        start.shape()
    }
}

struct Sim {
    r: Rollout,
    spec: RolloutSpec,
    log: Vec<LogEntry>,
    world: HashMap<NodeId, Node>,
    initial: HashMap<NodeId, Node>,
    script: std::vec::IntoIter<u8>,
    t: u64,
    // ----- observations for the invariants -----
    last_seq: u64,
    /// Per node: the forward steps that may change it (install, downgrade, commit), by seq.
    changes: HashMap<NodeId, Vec<(u64, Answer)>>,
    /// Per node: the undo steps issued during rollback.
    undos: HashMap<NodeId, Vec<ActionKind>>,
    /// Nodes an undo step failed on (it may have changed the node; `rollback` again retries it).
    undo_failed: HashSet<NodeId>,
    /// Nodes in the order their rollback started.
    rollback_visits: Vec<NodeId>,
    answered: Vec<(u64, ActionResult)>,
    promoted: bool,
    targets_at_upgrade: Option<Vec<NodeId>>,
    /// Forward switches issued again after a failed one (resume with on_failure: pause).
    retried: usize,
    /// Refusals the simulated agents answered (injected; the rules never refuse a plan).
    refusals: usize,
    /// Nodes whose bake (or final check) gate passed.
    baked: HashSet<NodeId>,
    /// For [`Sim::finish`]: fail the answer with this index, this way (see [`Sim::perform`]).
    fail_at: Option<(usize, u8)>,
    answers: usize,
    /// For [`Sim::finish`]: fail the rollback answer with this index (undo steps and rollback
    /// gates), this way.
    fail_in_rollback: Option<(usize, u8)>,
    rollback_answers: usize,
    /// Nodes whose last forward health gate failed (for the max-unavailable count).
    gate_failed: HashSet<NodeId>,
    /// With promote_each_wave: the highest wave a `promote` was applied in front of (every
    /// earlier wave upgraded and healthy at that moment).
    promoted_wave: usize,
    /// With a wave pause: the pause gates in flight (seq -> the wave the pause is before) and,
    /// per node, the latest wave whose pause it passed.
    holds: HashMap<u64, usize>,
    held: HashMap<NodeId, usize>,
    /// Nodes whose watch-after-commit gate passed.
    watched: HashSet<NodeId>,
    /// The nodes upgraded (committed) when the first bake (watch) gate was issued: after a
    /// paused failure, `resume` retries every failed gate at once, so such nodes may be back
    /// to `installed` while another node's gate runs; no other node may.
    bake_set: Option<HashSet<NodeId>>,
    watch_set: Option<HashSet<NodeId>>,
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
        spec.keep_releases = sc.keep;
        spec.bake_ms = if sc.bake { 5 } else { 0 };
        spec.watch_after_commit_ms = if sc.watch { 7 } else { 0 };
        spec.min_healthy_time_ms = 0;
        spec.healthy_deadline_ms = 1;
        let p = &sc.policy;
        if !p.waves.is_empty() {
            spec.wave_by = Some("zone".into());
            let mut rest = nodes.iter();
            spec.waves = p
                .waves
                .iter()
                .enumerate()
                .map(|(k, &size)| Wave {
                    label_value: format!("z{k}"),
                    nodes: rest.by_ref().take(size).cloned().collect(),
                })
                .collect();
        }
        spec.batch_percent = p.batch_percent;
        spec.promote_each_wave = p.promote_each_wave;
        spec.wave_pause_ms = if p.wave_pause { 3 } else { 0 };
        spec.max_unavailable = p.max_unavailable.map(NodeCount::Count);
        spec.unhealthy_at_start = p.unhealthy.iter().map(|&i| nodes[i].clone()).collect();
        spec.unhealthy_at_start
            .extend((0..p.unhealthy_outside).map(|k| n(&format!("out{k}"))));
        let world: HashMap<NodeId, Node> = nodes.iter().cloned().zip(sc.initial.clone()).collect();
        Sim {
            r: Rollout::new(spec.clone()).unwrap(),
            spec,
            log: Vec::new(),
            initial: world.clone(),
            world,
            script: sc.script.clone().into_iter(),
            t: 0,
            last_seq: 0,
            changes: HashMap::new(),
            undos: HashMap::new(),
            undo_failed: HashSet::new(),
            rollback_visits: Vec::new(),
            answered: Vec::new(),
            promoted: false,
            targets_at_upgrade: None,
            retried: 0,
            refusals: 0,
            baked: HashSet::new(),
            fail_at: None,
            answers: 0,
            fail_in_rollback: None,
            rollback_answers: 0,
            gate_failed: HashSet::new(),
            promoted_wave: 0,
            holds: HashMap::new(),
            held: HashMap::new(),
            watched: HashSet::new(),
            bake_set: None,
            watch_set: None,
        }
    }

    fn byte(&mut self) -> Option<u8> {
        self.script.next()
    }

    /// The first seq of a forward change not refused: the node is touched from then on.
    fn touch_seq(&self, node: &NodeId) -> Option<u64> {
        self.changes
            .get(node)?
            .iter()
            .filter(|(_, a)| *a != Answer::Refused)
            .map(|(s, _)| *s)
            .min()
    }

    /// Touched nodes, in the order they were touched.
    fn touched(&self) -> Vec<NodeId> {
        let mut v: Vec<(u64, NodeId)> = self
            .changes
            .keys()
            .filter_map(|id| self.touch_seq(id).map(|s| (s, id.clone())))
            .collect();
        v.sort();
        v.into_iter().map(|(_, id)| id).collect()
    }

    /// A forward change on the node failed without saying whether it changed anything.
    fn uncertain(&self, node: &NodeId) -> bool {
        self.undo_failed.contains(node)
            || self
                .changes
                .get(node)
                .is_some_and(|c| c.iter().any(|(_, a)| *a == Answer::Failed))
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
                // Only the canary's promotion releases the canary (a wave's may come first).
                let msg = self.r.events().last().map(|e| e.message.clone());
                if msg.is_some_and(|m| m.starts_with("canary promoted")) {
                    self.promoted = true;
                }
                let ready = (0..self.spec.waves.len())
                    .find(|&w| {
                        self.wave_nodes(w).iter().any(|id| {
                            !matches!(
                                before.node(id).unwrap().step,
                                NodeStep::Upgraded | NodeStep::Committed | NodeStep::Skipped
                            )
                        })
                    })
                    .unwrap_or(0);
                self.promoted_wave = self.promoted_wave.max(ready);
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
        prop_assert_eq!(self.r.touched(), self.touched(), "touched nodes");
        self.check_state()?;
        Ok(out.unwrap_or(Outcome::Ignored {
            reason: "rejected".into(),
        }))
    }

    /// A node of a wave switches or is gated only once every node of the earlier waves runs
    /// the target and passed its gate (or was skipped).
    fn check_earlier_waves_done(&self, node: &NodeId) -> Result<(), TestCaseError> {
        let w = self.wave_of(node);
        if self.spec.promote_each_wave {
            prop_assert!(
                w <= self.promoted_wave,
                "{} of wave {} started without a promote in front of its wave",
                node,
                w
            );
        }
        for earlier in 0..w {
            for id in self.wave_nodes(earlier) {
                let step = self.r.node(&id).unwrap().step;
                if self.spec.wave_pause_ms > 0 && step != NodeStep::Skipped {
                    let held = self.held.get(&id).copied().unwrap_or(0);
                    prop_assert!(
                        held >= w,
                        "{} of wave {} started before {} of wave {} stayed healthy through the pause before it (held through {})",
                        node,
                        w,
                        id,
                        earlier,
                        held
                    );
                }
                prop_assert!(
                    matches!(
                        step,
                        NodeStep::Upgraded | NodeStep::Committed | NodeStep::Skipped
                    ),
                    "{} of wave {} started while {} of wave {} is {}",
                    node,
                    w,
                    id,
                    earlier,
                    step
                );
            }
        }
        Ok(())
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
        let start = &self.initial[&a.node];
        let w = &self.world[&a.node];
        let skipped =
            start.running() == Some(TARGET) && (start.current().is_none() || !self.spec.permanent);
        if skipped {
            prop_assert_eq!(&a.kind, &ActionKind::Preflight, "action on a skipped node");
        }
        // Every step the machine plans is one the node layer accepts (or finds already done),
        // whatever earlier failures left on the node.
        if let Err(e) = w.try_perform(&a.kind) {
            return Err(TestCaseError::fail(format!(
                "{}: the node layer refuses {} ({e}); node: {:?}, started as {:?}",
                a.node,
                a.kind,
                w.entries(),
                start.entries()
            )));
        }
        let undo = step == NodeStep::RollingBack;
        match &a.kind {
            ActionKind::Install { .. } | ActionKind::Downgrade { .. } if undo => {
                prop_assert!(
                    self.touch_seq(&a.node).is_some(),
                    "{} undone but never touched",
                    a.node
                );
                let undos = self.undos.entry(a.node.clone()).or_default();
                prop_assert!(!undos.contains(&a.kind), "{} twice on {}", a.kind, a.node);
                undos.push(a.kind.clone());
                if !self.rollback_visits.contains(&a.node) {
                    self.rollback_visits.push(a.node.clone());
                }
                // Where the machine knows the node's state, an undo step never targets the
                // release it runs.
                let to = match &a.kind {
                    ActionKind::Install { version } => *version,
                    ActionKind::Downgrade { to } => *to,
                    _ => unreachable!(),
                };
                if !self.uncertain(&a.node) {
                    prop_assert_ne!(
                        Some(to),
                        w.running(),
                        "{}: {} targets the release it runs",
                        a.node,
                        a.kind
                    );
                }
            }
            ActionKind::Install { .. }
            | ActionKind::Downgrade { .. }
            | ActionKind::Commit { .. } => {
                let version = match &a.kind {
                    ActionKind::Install { version } | ActionKind::Commit { version } => *version,
                    ActionKind::Downgrade { to } => *to,
                    _ => unreachable!(),
                };
                prop_assert_eq!(version, TARGET);
                prop_assert!(
                    self.rollback_visits.is_empty(),
                    "forward step after the rollback started"
                );
                let is_switch = !matches!(a.kind, ActionKind::Commit { .. });
                if is_switch {
                    self.check_earlier_waves_done(&a.node)?;
                }
                let changes = self.changes.entry(a.node.clone()).or_default();
                if is_switch {
                    // Another switch is only legitimate after a failed one (resume).
                    if let Some((_, last)) = changes.last() {
                        prop_assert!(
                            matches!(last, Answer::Failed | Answer::Refused),
                            "{} switched twice (previous: {:?})",
                            a.node,
                            last
                        );
                        self.retried += 1;
                    }
                    if !self.promoted && self.spec.canary > 0 {
                        let targets = self.targets_at_upgrade.clone().unwrap_or_default();
                        let pos = targets.iter().position(|x| x == &a.node).unwrap();
                        prop_assert!(
                            pos < self.spec.canary as usize,
                            "{} switched before the canary was promoted",
                            a.node
                        );
                    }
                }
                changes.push((a.seq, Answer::Pending));
            }
            // Rollback gates expect the release the node is back on, never the target.
            ActionKind::HealthGate { expect, .. } if undo => {
                prop_assert_ne!(*expect, TARGET);
            }
            // The watch after the commit: only once every target is committed, on all of them.
            ActionKind::HealthGate {
                expect,
                min_healthy_time_ms,
                failure_threshold,
                ..
            } if self.r.working_phase() == Phase::Watching => {
                prop_assert_eq!(*expect, TARGET);
                prop_assert!(self.spec.watch_after_commit_ms > 0 && self.spec.permanent);
                prop_assert_eq!(*min_healthy_time_ms, self.spec.watch_after_commit_ms);
                prop_assert_eq!(*failure_threshold, 1);
                let set = self.watch_set.get_or_insert_with(|| {
                    self.r
                        .nodes()
                        .filter(|p| p.step == NodeStep::Committed)
                        .map(|p| p.id.clone())
                        .collect()
                });
                for p in self.r.nodes() {
                    let retrying =
                        p.step == NodeStep::Installed && (p.id == a.node || set.contains(&p.id));
                    prop_assert!(
                        matches!(p.step, NodeStep::Committed | NodeStep::Skipped) || retrying,
                        "watch gate on {} while {} is {}",
                        a.node,
                        p.id,
                        p.step
                    );
                }
            }
            // A wave pause: on a node already upgraded, before the next wave starts.
            ActionKind::HealthGate {
                expect,
                min_healthy_time_ms,
                failure_threshold,
                ..
            } if self.r.working_phase() == Phase::Upgrading
                && matches!(step, NodeStep::Upgraded | NodeStep::Committed) =>
            {
                prop_assert_eq!(*expect, TARGET);
                prop_assert!(self.spec.wave_pause_ms > 0, "a second gate without a pause");
                prop_assert_eq!(*min_healthy_time_ms, self.spec.wave_pause_ms);
                prop_assert_eq!(*failure_threshold, 1);
                let k = self.r.holding_wave();
                prop_assert!(
                    k.is_some_and(|k| k > self.wave_of(&a.node)),
                    "pause gate on {} of wave {} while holding {:?}",
                    a.node,
                    self.wave_of(&a.node),
                    k
                );
                self.holds.insert(a.seq, k.unwrap_or(0));
            }
            // The bake (or final check): only once every target is upgraded, on all of them.
            ActionKind::HealthGate {
                expect,
                min_healthy_time_ms,
                failure_threshold,
                ..
            } if self.r.working_phase() == Phase::Baking => {
                prop_assert_eq!(*expect, TARGET);
                prop_assert!(self.spec.bake_ms > 0 || !self.spec.permanent);
                prop_assert_eq!(*min_healthy_time_ms, self.spec.bake_ms);
                let threshold = if self.spec.bake_ms > 0 {
                    1
                } else {
                    self.spec.failure_threshold
                };
                prop_assert_eq!(*failure_threshold, threshold);
                let set = self.bake_set.get_or_insert_with(|| {
                    self.r
                        .nodes()
                        .filter(|p| matches!(p.step, NodeStep::Upgraded | NodeStep::Committed))
                        .map(|p| p.id.clone())
                        .collect()
                });
                for p in self.r.nodes() {
                    let retrying =
                        p.step == NodeStep::Installed && (p.id == a.node || set.contains(&p.id));
                    prop_assert!(
                        matches!(
                            p.step,
                            NodeStep::Upgraded | NodeStep::Committed | NodeStep::Skipped
                        ) || retrying,
                        "bake gate on {} while {} is {}",
                        a.node,
                        p.id,
                        p.step
                    );
                }
            }
            ActionKind::HealthGate {
                expect,
                failure_threshold,
                ..
            } => {
                prop_assert_eq!(*expect, TARGET);
                prop_assert_eq!(step, NodeStep::Verifying);
                prop_assert_eq!(*failure_threshold, self.spec.failure_threshold);
                self.check_earlier_waves_done(&a.node)?;
            }
            _ => {}
        }
        // Nothing is made permanent before every target passed its bake.
        if matches!(a.kind, ActionKind::Commit { .. }) && self.spec.bake_ms > 0 {
            for p in self.r.nodes() {
                prop_assert!(
                    p.step == NodeStep::Skipped || self.baked.contains(&p.id),
                    "{} committed before {} baked",
                    a.node,
                    p.id
                );
            }
        }
        Ok(())
    }

    /// The wave of a node (0 without waves).
    fn wave_of(&self, id: &NodeId) -> usize {
        self.spec
            .waves
            .iter()
            .position(|w| w.nodes.contains(id))
            .unwrap_or(0)
    }

    /// The nodes of wave `w` (every node without waves).
    fn wave_nodes(&self, w: usize) -> Vec<NodeId> {
        match self.spec.waves.get(w) {
            Some(wave) => wave.nodes.clone(),
            None => self.spec.nodes.clone(),
        }
    }

    /// Nodes unavailable now, as the driver saw it: unhealthy at the start and not upgraded
    /// since (outside the rollout: throughout), mid-switch or mid-gate, a failed gate, or a
    /// switch that may have changed the node without a passed gate since.
    fn unavailable_now(&self) -> usize {
        let outside = self
            .spec
            .unhealthy_at_start
            .iter()
            .filter(|id| !self.spec.nodes.contains(id))
            .count();
        let inside = self
            .r
            .nodes()
            .filter(|p| match p.step {
                NodeStep::Upgraded
                | NodeStep::Committing
                | NodeStep::Committed
                | NodeStep::RolledBack => false,
                NodeStep::Installing
                | NodeStep::Verifying
                | NodeStep::RollingBack
                | NodeStep::RollbackFailed => true,
                NodeStep::Failed if self.gate_failed.contains(&p.id) => true,
                _ => {
                    self.touch_seq(&p.id).is_some() || self.spec.unhealthy_at_start.contains(&p.id)
                }
            })
            .count();
        outside + inside
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
        let step_of = |a: &Action| self.r.node(&a.node).unwrap().step;
        let count = |f: &dyn Fn(&Action) -> bool| inflight.iter().filter(|a| f(a)).count();
        let upgrading = count(&|a| {
            matches!(step_of(a), NodeStep::Installing | NodeStep::Verifying)
                && !matches!(a.kind, ActionKind::Commit { .. })
        });
        // Everything switching or verifying is in one wave, at most that wave's batch size.
        let waves: HashSet<usize> = inflight
            .iter()
            .filter(|a| {
                matches!(step_of(a), NodeStep::Installing | NodeStep::Verifying)
                    && !matches!(a.kind, ActionKind::Commit { .. })
            })
            .map(|a| self.wave_of(&a.node))
            .collect();
        prop_assert!(waves.len() <= 1, "switching in several waves: {:?}", waves);
        if let Some(&w) = waves.iter().next() {
            let size = self.spec.batch_size_in(self.wave_nodes(w).len());
            prop_assert!(
                upgrading <= size,
                "{} switching/verifying, batch size {}",
                upgrading,
                size
            );
        }
        // Max unavailable, counted here from what the driver saw, holds throughout the upgrade.
        if let Some(max) = self.spec.max_unavailable_nodes()
            && self.r.working_phase() == Phase::Upgrading
        {
            let down = self.unavailable_now();
            prop_assert!(
                down <= max,
                "{} nodes unavailable, at most {} allowed: {}",
                down,
                max,
                self.r.summary()
            );
        }
        let par = self.spec.max_parallel_staging as usize;
        let staging = count(&|a| matches!(a.kind, ActionKind::Stage { .. }));
        prop_assert!(staging <= par, "{} stages in flight", staging);
        let committing = count(&|a| matches!(a.kind, ActionKind::Commit { .. }));
        prop_assert!(committing <= par, "{} commits in flight", committing);
        prop_assert!(
            count(&|a| step_of(a) == NodeStep::RollingBack) <= 1,
            "rollback is one node at a time"
        );
        if self.r.phase().is_terminal() {
            prop_assert!(inflight.is_empty());
            prop_assert!(self.r.next_actions().is_empty());
            prop_assert!(!self.r.awaiting_promotion());
        }
        Ok(())
    }

    /// The simulated agent: performs the action on its node and says how it went. `fail`
    /// picks a failure: a refusal (nothing changed), or a failure that did or did not change
    /// the node.
    fn perform(&mut self, a: &Action, fail: Option<u8>) -> ActionResult {
        let w = self.world.get_mut(&a.node).unwrap();
        let failed = |what: &str| ActionResult::Failed {
            error: what.to_string(),
        };
        match (&a.kind, fail) {
            (ActionKind::Preflight, Some(_)) => failed("unreachable"),
            (ActionKind::Preflight, None) => ActionResult::Preflight {
                running: w.running().expect("something runs"),
                free_disk: 1 << 30,
                releases: w.entries(),
            },
            (ActionKind::HealthGate { expect, .. }, _) if w.running() != Some(*expect) => {
                failed(&format!("probe reported {:?}", w.running()))
            }
            (ActionKind::HealthGate { .. }, Some(_)) => failed("probe failing"),
            (ActionKind::HealthGate { .. }, None) => ActionResult::Done,
            (ActionKind::Prune { .. }, Some(_)) => failed("agent unreachable"),
            (ActionKind::Prune { keep, protect }, None) => match w.prune(*keep, protect) {
                Ok(removed) => ActionResult::Pruned {
                    removed,
                    failed: Vec::new(),
                },
                Err(e) => failed(&e.0),
            },
            (kind, None) => match w.perform(kind) {
                Ok(_) => ActionResult::Done,
                Err(e) => ActionResult::Refused { error: e.0 },
            },
            (_, Some(mode)) => match mode % 3 {
                0 => ActionResult::Refused {
                    error: "refused by the node".into(),
                },
                1 => failed("activation failed"),
                _ => {
                    // It happened, but the answer was lost.
                    let _ = w.perform(&a.kind);
                    failed("connection reset")
                }
            },
        }
    }

    fn answer(&mut self, a: Action, fail: Option<u8>) -> Result<(), TestCaseError> {
        let result = self.perform(&a, fail);
        if self.r.working_phase() == Phase::Baking
            && matches!(a.kind, ActionKind::HealthGate { .. })
            && result == ActionResult::Done
            && self.r.in_flight().iter().any(|x| x.seq == a.seq)
        {
            self.baked.insert(a.node.clone());
        }
        let in_flight = self.r.in_flight().iter().any(|x| x.seq == a.seq);
        if let Some(k) = self.holds.remove(&a.seq)
            && result == ActionResult::Done
            && in_flight
        {
            let held = self.held.entry(a.node.clone()).or_default();
            *held = (*held).max(k);
        }
        if self.r.working_phase() == Phase::Watching
            && matches!(a.kind, ActionKind::HealthGate { .. })
            && result == ActionResult::Done
            && in_flight
        {
            self.watched.insert(a.node.clone());
        }
        if matches!(result, ActionResult::Refused { .. }) {
            self.refusals += 1;
        }
        // A failed undo step may be issued again by `rollback` after `rollback_failed`.
        let undo = matches!(
            a.kind,
            ActionKind::Install { .. } | ActionKind::Downgrade { .. }
        ) && self
            .r
            .node(&a.node)
            .is_some_and(|p| p.step == NodeStep::RollingBack);
        if undo
            && matches!(
                result,
                ActionResult::Failed { .. } | ActionResult::Refused { .. }
            )
        {
            self.undo_failed.insert(a.node.clone());
            if let Some(u) = self.undos.get_mut(&a.node) {
                u.retain(|k| *k != a.kind);
            }
        }
        if let ActionKind::HealthGate { expect, .. } = a.kind
            && expect == TARGET
        {
            if matches!(result, ActionResult::Done) {
                self.gate_failed.remove(&a.node);
            } else {
                self.gate_failed.insert(a.node.clone());
            }
        }
        if let Some(c) = self.changes.get_mut(&a.node)
            && let Some(entry) = c.iter_mut().find(|(s, _)| *s == a.seq)
        {
            entry.1 = match result {
                ActionResult::Refused { .. } => Answer::Refused,
                ActionResult::Failed { .. } => Answer::Failed,
                _ => Answer::Done,
            };
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
                    let fail = self.byte().unwrap_or(255);
                    let fail = (fail < 28).then_some(fail);
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
                let result = match self.byte().unwrap_or(0) % 4 {
                    0 => ActionResult::Done,
                    1 => ActionResult::Failed {
                        error: "stale".into(),
                    },
                    2 => ActionResult::Refused {
                        error: "stale".into(),
                    },
                    _ => ActionResult::Preflight {
                        running: v("4.2.0"),
                        free_disk: 0,
                        releases: Vec::new(),
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
    /// successfully (but for `fail_at`), resume and promote. The machine must reach a terminal
    /// phase.
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
                let mut fail = self
                    .fail_at
                    .and_then(|(at, how)| (at == self.answers).then_some(how));
                self.answers += 1;
                if self.r.node(&a.node).unwrap().step == NodeStep::RollingBack {
                    fail = fail.or(self
                        .fail_in_rollback
                        .and_then(|(at, how)| (at == self.rollback_answers).then_some(how)));
                    self.rollback_answers += 1;
                }
                self.answer(a, fail)?;
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

    /// Every node is where the machine says it is, whatever the ending.
    fn check_nodes_are_as_said(&self) -> Result<(), TestCaseError> {
        let touched: HashSet<NodeId> = self.touched().into_iter().collect();
        for p in self.r.nodes() {
            let w = &self.world[&p.id];
            let start = &self.initial[&p.id];
            let t = Some(TARGET);
            match p.step {
                NodeStep::Committed => prop_assert_eq!(w.shape(), (t, t, None), "{}", p.id),
                NodeStep::Upgraded => prop_assert_eq!((w.running(), w.current()), (t, t)),
                NodeStep::Skipped => {
                    prop_assert_eq!(w.shape(), start.shape(), "{}", p.id);
                    prop_assert_eq!(w.running(), t, "{} skipped but not on target", p.id);
                    if self.spec.permanent {
                        prop_assert_eq!(w.permanent(), t, "{} skipped, not permanent", p.id);
                    }
                }
                NodeStep::RolledBack => {
                    prop_assert_eq!(
                        w.shape(),
                        expected_after_rollback(start),
                        "{} rolled back from {:?}",
                        p.id,
                        start.entries()
                    );
                }
                _ => {}
            }
            if !touched.contains(&p.id) {
                // Untouched (or only refused): what it runs, boots and has current is as it was.
                prop_assert_eq!(w.shape(), start.shape(), "untouched {} changed", p.id);
            }
        }
        Ok(())
    }

    /// After a successful rollout with `keep_releases`: every node it upgraded was pruned (or
    /// said why not), skipped ones were left alone; a pruned node keeps its current and permanent releases, the target and what it
    /// ran before, and otherwise only its newest `keep` releases.
    fn check_pruned(&self, keep: u32) -> Result<(), TestCaseError> {
        let said = |id: &NodeId, what: &str| {
            self.r
                .events()
                .iter()
                .any(|e| e.message.starts_with(&format!("{id}: {what}")))
        };
        for p in self.r.nodes() {
            let pruned = said(&p.id, "pruned ") || said(&p.id, "nothing to prune");
            if p.step == NodeStep::Skipped {
                // Left alone entirely.
                prop_assert!(!pruned && !said(&p.id, "pruning failed"));
                continue;
            }
            prop_assert!(
                pruned || said(&p.id, "pruning failed"),
                "{} was never pruned",
                p.id
            );
            if !pruned {
                continue;
            }
            let w = &self.world[&p.id];
            let start = &self.initial[&p.id];
            let mut newest: Vec<Version> = w.entries().iter().map(|e| e.version).collect();
            newest.sort_by(|a, b| b.cmp(a));
            for e in w.entries() {
                let rank = newest.iter().position(|v| *v == e.version).unwrap();
                let protected = e.version == TARGET
                    || Some(e.version) == start.permanent()
                    || Some(e.version) == start.current()
                    || matches!(e.state, ReleaseState::Current | ReleaseState::Permanent);
                prop_assert!(
                    protected || rank < keep as usize,
                    "{} keeps {} beyond the newest {}: {:?}",
                    p.id,
                    e.version,
                    keep,
                    w.entries()
                );
            }
            for v in [Some(TARGET), start.permanent(), start.current()]
                .into_iter()
                .flatten()
            {
                if start.state(v).is_some() || v == TARGET {
                    prop_assert!(w.state(v).is_some(), "{} lost {}", p.id, v);
                }
            }
        }
        Ok(())
    }

    fn check_end(&self) -> Result<(), TestCaseError> {
        let touched = self.touched();
        prop_assert_eq!(&self.r.touched(), &touched);
        self.check_nodes_are_as_said()?;
        let last = self.r.events().last().unwrap().message.clone();
        match self.r.phase() {
            Phase::Succeeded => {
                for p in self.r.nodes() {
                    // A rollout that bakes, or does not commit, ended only after every target
                    // passed its bake or final check.
                    if (self.spec.bake_ms > 0 || !self.spec.permanent)
                        && p.step != NodeStep::Skipped
                    {
                        prop_assert!(self.baked.contains(&p.id), "{} ended unbaked", p.id);
                    }
                    if self.spec.watch_after_commit_ms > 0 && p.step != NodeStep::Skipped {
                        prop_assert!(self.watched.contains(&p.id), "{} ended unwatched", p.id);
                    }
                    let w = &self.world[&p.id];
                    let start = &self.initial[&p.id];
                    prop_assert_eq!(w.running(), Some(TARGET), "{} not on target", p.id);
                    let permanent = if self.spec.permanent
                        || start.state(TARGET) == Some(ReleaseState::Permanent)
                    {
                        TARGET
                    } else {
                        start.permanent().unwrap()
                    };
                    prop_assert_eq!(w.permanent(), Some(permanent), "{}", p.id);
                    prop_assert!(matches!(
                        p.step,
                        NodeStep::Committed | NodeStep::Upgraded | NodeStep::Skipped
                    ));
                }
                if let Some(keep) = self.spec.keep_releases {
                    self.check_pruned(keep)?;
                }
                // The last word is true of every node.
                let claims_permanent = last
                    .starts_with(&format!("all {} node", self.r.nodes().len()))
                    && last.contains(&format!("run {TARGET} permanently"))
                    || last.contains(&format!("already runs {TARGET} permanently"));
                let all_permanent = self.world.values().all(|w| w.permanent() == Some(TARGET));
                prop_assert_eq!(claims_permanent, all_permanent, "{}", last);
            }
            Phase::RolledBack => {
                let mut rev = touched.clone();
                rev.reverse();
                prop_assert_eq!(&self.rollback_visits, &rev);
                for id in &touched {
                    prop_assert_eq!(self.r.node(id).unwrap().step, NodeStep::RolledBack);
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
                for id in &touched {
                    prop_assert!(matches!(
                        self.r.node(id).unwrap().step,
                        NodeStep::RolledBack | NodeStep::RollbackFailed
                    ));
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
        // And so does the rollout's own record of its inputs, without the log.
        let replayed = orch_rollout::replay(self.spec.clone(), self.r.inputs()).unwrap();
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
    /// whose preflight passes succeeds, whatever state its nodes start in.
    #[test]
    fn clean_runs_succeed(sc in scenario()) {
        let mut sim = Sim::new(&Scenario { script: Vec::new(), ..sc.clone() });
        sim.finish()?;
        sim.check_end()?;
        prop_assert_eq!(sim.refusals, 0, "the node layer refused a planned step");
        let bad_hop = sc.initial.iter().any(|w| start_kind(w) == StartKind::BadHop);
        if bad_hop {
            prop_assert_eq!(sim.r.phase(), Phase::Aborted);
            prop_assert!(sim.touched().is_empty());
        } else {
            prop_assert_eq!(sim.r.phase(), Phase::Succeeded);
        }
    }
}

#[test]
fn the_simulation_reaches_every_terminal_phase_and_start_state() {
    // Guards the property test against a generator that never exercises some ending or some
    // starting state.
    let mut seen = HashSet::new();
    let mut starts = HashSet::new();
    let (mut retries, mut promotions, mut skips, mut refusals, mut undo_installs) = (0, 0, 0, 0, 0);
    let (mut waved, mut bounded, mut wave_promoted) = (0, 0, 0);
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    for _ in 0..600 {
        let sc = scenario().new_tree(&mut runner).unwrap().current();
        starts.extend(sc.initial.iter().map(start_kind));
        let mut sim = Sim::new(&sc);
        while sim.random_step().unwrap() {}
        sim.finish().unwrap();
        sim.check_end().unwrap();
        seen.insert(sim.r.phase());
        if sim.r.phase() == Phase::Succeeded {
            waved += usize::from(sc.policy.waves.len() > 1);
            bounded += usize::from(!sc.policy.unhealthy.is_empty());
            wave_promoted += usize::from(sim.promoted_wave > 0);
        }
        retries += sim.retried;
        refusals += sim.refusals;
        promotions += usize::from(sim.promoted);
        skips += sim
            .r
            .nodes()
            .filter(|p| p.step == NodeStep::Skipped)
            .count();
        undo_installs += sim
            .undos
            .values()
            .flatten()
            .filter(|k| matches!(k, ActionKind::Install { .. }))
            .count();
    }
    assert!(waved > 0, "no rollout in several waves ever succeeded");
    assert!(
        bounded > 0,
        "no rollout bounded by max-unavailable with unhealthy nodes ever succeeded"
    );
    assert!(
        wave_promoted > 0,
        "no rollout promoted between waves ever succeeded"
    );
    assert!(retries > 0, "no switch was ever retried");
    assert!(promotions > 0, "no canary was ever promoted");
    assert!(skips > 0, "no node was ever skipped");
    assert!(refusals > 0, "no step was ever refused");
    assert!(
        undo_installs > 0,
        "no rollback ever installed a release again"
    );
    for p in [
        Phase::Succeeded,
        Phase::RolledBack,
        Phase::RollbackFailed,
        Phase::Aborted,
    ] {
        assert!(seen.contains(&p), "never reached {p}: {seen:?}");
    }
    for k in [
        StartKind::BadHop,
        StartKind::Unknown,
        StartKind::OnDisk,
        StartKind::OnDiskBehindCurrent,
        StartKind::Current,
        StartKind::Permanent,
        StartKind::PermanentBehindCurrent,
        StartKind::Older,
    ] {
        assert!(
            starts.contains(&k),
            "never started a node as {k:?}: {starts:?}"
        );
    }
}

/// Runs `sc` with a driver that fails the answer `fail_at` (and `fail_in_rollback`), then
/// checks the end; panics with the audit trail when a check fails.
fn run_checked(sc: &Scenario, fail_at: (usize, u8), fail_in_rollback: Option<(usize, u8)>) -> Sim {
    let mut sim = Sim::new(sc);
    sim.fail_at = Some(fail_at);
    sim.fail_in_rollback = fail_in_rollback;
    if let Err(e) = sim.finish().and_then(|()| sim.check_end()) {
        let starts: Vec<_> = sc.initial.iter().map(Node::entries).collect();
        panic!(
            "{starts:?}, permanent {}, {}, answer {fail_at:?} failing, rollback answer {fail_in_rollback:?} failing: {e}\n{}",
            sc.permanent,
            sc.on_failure,
            sim.r
                .events()
                .iter()
                .map(|e| e.message.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    sim
}

/// Every state of the rollout table, as a node's releases (target 4.2.1).
const START_STATES: [&[(&str, &str)]; 13] = [
    // target unknown
    &[("4.2.0", "permanent")],
    // target unpacked, or old
    &[("4.2.1", "unpacked"), ("4.2.0", "permanent")],
    &[("4.2.1", "old"), ("4.2.0", "permanent")],
    // target current, another permanent (bug 1)
    &[("4.2.1", "current"), ("4.2.0", "permanent")],
    &[("4.2.5", "permanent"), ("4.2.1", "current")],
    // target permanent and running
    &[("4.2.1", "permanent"), ("4.2.0", "old")],
    // target permanent, another current (bug 2)
    &[("4.2.1", "permanent"), ("4.2.0", "current")],
    &[("4.2.5", "current"), ("4.2.1", "permanent")],
    // another release current over another permanent; target unknown or on disk
    &[("4.2.5", "current"), ("4.2.0", "permanent")],
    &[
        ("4.2.5", "current"),
        ("4.2.1", "unpacked"),
        ("4.2.0", "permanent"),
    ],
    // target older than the running release: unknown, or old
    &[("4.2.5", "permanent")],
    &[("4.2.5", "permanent"), ("4.2.1", "old")],
    // another major.minor
    &[("4.1.9", "permanent")],
];

/// For every start state of a node (next to a plain node, before and after it), with and
/// without `--no-permanent`, under both failure policies: a clean run, and a run where the k-th
/// answer fails in each way (refused, failed without change, failed after changing the node).
/// Every run must end in a terminal phase with every node where the machine says it is, every
/// planned step accepted by the node layer, rollbacks that restore what was there and never
/// target the running release, and untouched nodes unchanged (all checked by `Sim`).
#[test]
fn every_start_state_and_outcome_ends_where_the_machine_says() {
    let plain = Node::with(&[("4.2.0", "permanent")]);
    let mut runs = 0;
    let mut endings = HashSet::new();
    for rows in START_STATES {
        let node = Node::with(rows);
        for layout in [
            vec![node.clone()],
            vec![node.clone(), plain.clone()],
            vec![plain.clone(), node.clone()],
        ] {
            for permanent in [true, false] {
                for on_failure in [OnFailure::Rollback, OnFailure::Pause] {
                    let sc = Scenario {
                        initial: layout.clone(),
                        batch_size: 1,
                        canary: 0,
                        permanent,
                        on_failure,
                        max_parallel_staging: 8,
                        script: Vec::new(),
                        // Pruning after success (keeping only the newest release beyond what
                        // is protected) with one failure policy, none with the other: every
                        // start state is pruned without doubling the runs.
                        keep: (on_failure == OnFailure::Pause).then_some(1),
                        // Likewise a bake with one policy: every start state bakes (and a
                        // failure in the bake is among the failure points tried below).
                        bake: on_failure == OnFailure::Rollback,
                        // And a watch after the commit with the other: a failure there is
                        // tried at every point too.
                        watch: permanent && on_failure == OnFailure::Pause,
                        policy: Policy::default(),
                    };
                    let mut clean = Sim::new(&sc);
                    clean.finish().unwrap();
                    clean.check_end().unwrap();
                    let answers = clean.answers;
                    assert_eq!(clean.refusals, 0, "{rows:?}: a planned step was refused");
                    // Then the first or second rollback answer fails too (refused, or failed
                    // after changing the node), when there is a rollback.
                    let second = [Some((0, 0)), Some((0, 2)), Some((1, 0)), Some((1, 2))];
                    for at in 0..answers {
                        for how in 0..3u8 {
                            let sim = run_checked(&sc, (at, how), None);
                            endings.insert(sim.r.phase());
                            runs += 1;
                            if sim.rollback_answers == 0 {
                                continue;
                            }
                            for rb in second {
                                let sim = run_checked(&sc, (at, how), rb);
                                endings.insert(sim.r.phase());
                                runs += 1;
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(runs > 1_000, "{runs}");
    assert_eq!(endings.len(), 4, "{endings:?}");
}

/// A node's preflight answer in the plan test: its releases, or unreachable.
fn answer_of(node: &Node, reachable: bool) -> ActionResult {
    if !reachable {
        return ActionResult::Failed {
            error: "agent unreachable: connection refused".into(),
        };
    }
    ActionResult::Preflight {
        running: node.running().expect("something runs"),
        free_disk: 1 << 40,
        releases: node.entries(),
    }
}

/// The machine driven to its end with every step succeeding (promoting when asked): the
/// actions in issue order, each with the number of the `IssueActions` round that issued it.
fn run_all_done(r: &mut Rollout, answers: &BTreeMap<NodeId, ActionResult>) -> Vec<(usize, Action)> {
    let mut issued = Vec::new();
    let mut t = 0;
    for round in 0..1_000 {
        if r.is_finished() {
            break;
        }
        if r.awaiting_promotion() {
            t += 1;
            r.apply(&Event::Command(Command::Promote), t, "alice")
                .expect("promote while awaiting promotion");
        }
        t += 1;
        let out = r.apply(&Event::IssueActions, t, "coord").expect("issue");
        issued.extend(out.issued().iter().cloned().map(|a| (round, a)));
        for a in r.in_flight().to_vec() {
            let result = match a.kind {
                ActionKind::Preflight => answers[&a.node].clone(),
                _ => ActionResult::Done,
            };
            t += 1;
            r.apply(&Event::Result { seq: a.seq, result }, t, "coord")
                .expect("result");
        }
    }
    issued
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// `plan` (the dry run) says exactly what the rollout then does with the same preflight
    /// answers: refused iff the rollout is refused (same words), each node's first step is
    /// the planned action, skipped nodes are left alone, and the planned batches are the
    /// groups the rollout switches together, canary first.
    #[test]
    fn the_plan_is_what_the_rollout_does(
        initial in proptest::collection::vec(node_strategy(), 1..=6),
        reachable in proptest::collection::vec(prop_oneof![9 => Just(true), 1 => Just(false)], 6),
        batch_size in 1u32..=3,
        canary in 0u32..=6,
        permanent in any::<bool>(),
        policy in policy_strategy(6),
    ) {
        let ids: Vec<NodeId> = (1..=initial.len()).map(|i| n(&format!("n{i}"))).collect();
        let mut spec = RolloutSpec::new("r1", TARGET, ids.clone(), "alice");
        spec.min_healthy_time_ms = 0;
        spec.healthy_deadline_ms = 1_000;
        spec.batch_size = batch_size;
        spec.canary = canary.min(initial.len() as u32);
        spec.permanent = permanent;
        // Waves cut to this rollout's node count (the strategy made them for 6 nodes).
        let mut rest = ids.iter();
        spec.waves = policy
            .waves
            .iter()
            .enumerate()
            .map(|(k, &size)| Wave {
                label_value: format!("z{k}"),
                nodes: rest.by_ref().take(size).cloned().collect(),
            })
            .filter(|w| !w.nodes.is_empty())
            .collect();
        if let Some(last) = spec.waves.last_mut() {
            last.nodes.extend(rest.cloned());
        }
        if !spec.waves.is_empty() {
            spec.wave_by = Some("zone".into());
        }
        spec.batch_percent = policy.batch_percent;
        let wave_of = |id: &NodeId| spec.waves.iter().position(|w| w.nodes.contains(id));
        let answers: BTreeMap<NodeId, ActionResult> = ids
            .iter()
            .zip(&initial)
            .zip(&reachable)
            .map(|((id, node), ok)| (id.clone(), answer_of(node, *ok)))
            .collect();
        let p = orch_rollout::plan(spec.clone(), &answers).expect("a valid spec");
        let mut r = Rollout::new(spec.clone()).unwrap();
        let issued = run_all_done(&mut r, &answers);

        let refused = issued.iter().all(|(_, a)| a.kind == ActionKind::Preflight)
            && r.phase() == Phase::Aborted;
        prop_assert_eq!(p.refusal.is_some(), refused, "{:?} / {:?}", p, r.phase());
        if refused {
            prop_assert_eq!(p.refusal.as_deref(), r.error());
            prop_assert!(p.batches.is_empty());
            prop_assert!(p.nodes.iter().any(|pn| pn.action == NodeAction::Refused));
            return Ok(());
        }
        prop_assert_eq!(r.phase(), Phase::Succeeded);
        for pn in &p.nodes {
            prop_assert_eq!(pn.to, TARGET);
            let first = issued
                .iter()
                .find(|(_, a)| a.node == pn.id && a.kind != ActionKind::Preflight)
                .map(|(_, a)| a.kind.name());
            let expect = match pn.action {
                NodeAction::Stage => Some("stage"),
                NodeAction::Install => Some("install"),
                NodeAction::SwitchBack => Some("downgrade"),
                NodeAction::Adopt => Some("health_gate"),
                NodeAction::Skip => None,
                NodeAction::Refused => {
                    prop_assert!(false, "a refused node in an accepted plan: {:?}", p);
                    None
                }
            };
            prop_assert_eq!(first, expect, "{:?}", pn);
            prop_assert_eq!(pn.from, r.node(&pn.id).unwrap().from_version);
        }
        // The batches: every non-skipped node once, in spec order, at most batch_size each,
        // the canary ones first; and the rollout switches (or adopts) them in those groups.
        let in_batches: Vec<&NodeId> = p.batches.iter().flat_map(|b| &b.nodes).collect();
        let moving: Vec<&NodeId> = p
            .nodes
            .iter()
            .filter(|pn| pn.action != NodeAction::Skip)
            .map(|pn| &pn.id)
            .collect();
        prop_assert_eq!(&in_batches, &moving);
        let canary_nodes: usize = p.batches.iter().filter(|b| b.canary).map(|b| b.nodes.len()).sum();
        prop_assert_eq!(canary_nodes, (spec.canary as usize).min(moving.len()));
        prop_assert!(p.batches.windows(2).all(|w| w[0].canary || !w[1].canary));
        let round_of = |id: &NodeId| {
            issued
                .iter()
                .find(|(_, a)| {
                    &a.node == id
                        && matches!(
                            a.kind,
                            ActionKind::Install { .. }
                                | ActionKind::Downgrade { .. }
                                | ActionKind::HealthGate { .. }
                        )
                })
                .map(|(round, _)| *round)
        };
        let mut last = None;
        for b in &p.batches {
            // One wave per batch, named, at most the wave's batch size.
            let waves: HashSet<Option<usize>> = b.nodes.iter().map(wave_of).collect();
            prop_assert_eq!(waves.len(), 1, "a batch straddles waves: {:?}", b);
            let wave = waves.into_iter().next().flatten();
            let wave_len = wave.map_or(ids.len(), |w| spec.waves[w].nodes.len());
            prop_assert_eq!(
                b.wave.as_deref(),
                wave.map(|w| spec.waves[w].label_value.as_str())
            );
            prop_assert!(!b.nodes.is_empty() && b.nodes.len() <= spec.batch_size_in(wave_len));
            let rounds: HashSet<Option<usize>> = b.nodes.iter().map(round_of).collect();
            prop_assert_eq!(rounds.len(), 1, "one batch switches together: {:?}", b);
            let round = rounds.into_iter().next().flatten();
            prop_assert!(round.is_some() && round > last, "batches in order: {:?}", p.batches);
            last = round;
        }
    }
}
