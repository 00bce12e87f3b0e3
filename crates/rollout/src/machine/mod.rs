//! The [`Rollout`] state machine. See the crate docs for the protocol and the semantics.
//!
//! This module holds the state, applying an event and the queries; the rest is split by what
//! it decides: [`plan`] (which actions the state calls for), [`result`] (issuing actions and
//! taking their results), [`preflight`] (planning each node from its answer), [`preview`] (a
//! rollout's plan before it exists, for dry runs), [`advance`] (phase
//! transitions), [`housekeeping`] (pruning old releases after success), [`rollback`], [`command`] (operator commands) and [`messages`] (the audit
//! sentences that summarize many nodes).

mod advance;
mod command;
mod housekeeping;
mod messages;
mod plan;
mod preflight;
mod preview;
mod result;
mod rollback;

pub use preview::{NodeAction, Plan, PlannedBatch, PlannedNode, plan};

use orch_types::rollout::{
    AuditEvent, NodeProgress, NodeStep, OnFailure, Phase, RolloutSpec, RolloutStatus, SpecError,
};
use orch_types::{NodeId, ReleaseState, Version, VersionEntry};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

use crate::protocol::{
    Action, ActionKind, ActionResult, Command, Event, Input, LogEntry, Outcome, Rejected,
};

/// Longest text kept from outside (a driver's error, a caller's identity), in characters: the
/// state is replicated and shown in `status`, so one chatty agent must not bloat it.
pub const MAX_TEXT_CHARS: usize = 2048;

/// Preflight wants this many times the package size free on each node: the zip itself plus at
/// least as much again for the unpacked release. It is an early, friendly refusal; the agent still
/// fails the unpack cleanly if the release turns out bigger.
pub const DISK_HEADROOM_FACTOR: u64 = 2;

/// The step `resume` re-issues for a node that failed (with `--on-failure pause`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Retry {
    Stage,
    Install,
    HealthGate,
    Commit,
    /// The forward downgrade to the target (route [`Route::SwitchBack`]).
    SwitchBack,
}

impl Retry {
    fn name(self) -> &'static str {
        match self {
            Retry::Stage => "stage",
            Retry::Install => "install",
            Retry::HealthGate => "health gate",
            Retry::Commit => "commit",
            Retry::SwitchBack => "downgrade",
        }
    }

    /// The step a node goes back to so that the next `IssueActions` re-issues the failed action.
    fn step_before(self) -> NodeStep {
        match self {
            Retry::Stage => NodeStep::PreflightOk,
            Retry::Install | Retry::SwitchBack => NodeStep::Staged,
            Retry::HealthGate => NodeStep::Installed,
            Retry::Commit => NodeStep::Upgraded,
        }
    }
}

/// How preflight decided to bring a node to the target, from the releases the node listed.
/// Every route ends with the node running the target, healthy, and (with `permanent`) permanent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Route {
    /// The target is not on the node: stage (push + unpack), install, gate, commit. Also the
    /// route of a node whose preflight answer listed no releases (older drivers and logs).
    #[default]
    Stage,
    /// The target is on the node's disk (`unpacked` or `old`): nothing to push or unpack;
    /// install, gate, commit.
    Install,
    /// The target already runs as `current` (not permanent): gate, then commit with the others.
    Adopt,
    /// The target is the node's permanent release while another release is `current`: the
    /// agent's downgrade switches back to it (it stays permanent), then gate. Nothing to commit.
    SwitchBack,
}

/// What a node ran and would boot when preflight asked: all a rollback needs to undo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Start {
    /// The release running without being permanent, if any.
    current: Option<Version>,
    /// The release a restart boots.
    permanent: Version,
}

/// One node: what `status` shows, plus the bookkeeping the machine needs.
///
/// Snapshots of the coordinators' state hold every rollout ever run, so every field added
/// after the first release has a serde default that means what older states meant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct NodeState {
    progress: NodeProgress,
    /// Seq of the first step that may have changed what this node runs or boots (install,
    /// forward downgrade, commit). `Some` means the node is *touched*: a rollback must undo it.
    /// A step the agent refused (nothing changed) does not count. Rollback goes in decreasing
    /// order of this seq, the reverse of the order nodes were touched. (Named after the only
    /// step that touched a node when it was introduced.)
    #[serde(rename = "install_seq")]
    touch_seq: Option<u64>,
    /// What failed last, so `resume` knows what to retry.
    retry: Option<Retry>,
    /// During rollback: every undo step succeeded and the health gate is next.
    downgraded: bool,
    /// How preflight planned this node.
    #[serde(default)]
    route: Route,
    /// The node's releases at preflight; `None` when the answer listed none (then the rollback
    /// is a downgrade to `from_version`, as before release lists existed).
    #[serde(default)]
    start: Option<Start>,
    /// Seq of the first commit that may have made the target permanent here.
    #[serde(default)]
    commit_seq: Option<u64>,
    /// During rollback: how many undo steps have succeeded.
    #[serde(default)]
    undone: u8,
    /// The last failure was the agent's refusal: the node is as it was before that step.
    #[serde(default)]
    refused: bool,
    /// Its prune (`keep_releases`) was answered, whatever the answer.
    #[serde(default)]
    pruned: bool,
    /// It passed its bake (or final check) gate in [`Phase::Baking`].
    #[serde(default)]
    baked: bool,
    /// It passed its watch-after-commit gate in [`Phase::Watching`].
    #[serde(default)]
    watched: bool,
    /// With `wave_pause_ms`: the wave pauses it stayed healthy through (the pause before wave
    /// `k` is passed when this is at least `k`).
    #[serde(default)]
    held: usize,
}

impl NodeState {
    fn step(&self) -> NodeStep {
        self.progress.step
    }

    fn id(&self) -> &NodeId {
        &self.progress.id
    }
}

/// One rollout: its spec, where it stands, and everything needed to continue it on any machine.
///
/// Serialize it whole into the Raft state machine (snapshots included); deserializing gives an
/// identical machine. All changes go through [`Rollout::apply`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    /// Shared: never changes once created, and [`Rollout::next_actions_after`] copies the
    /// rollout on every install (a spec lists every node).
    #[serde(with = "shared_spec")]
    spec: std::sync::Arc<RolloutSpec>,
    /// The working phase; never `Paused` (that is the `paused` flag, so a pause can never lose
    /// the phase it resumes into). Results that arrive while paused move this phase.
    phase: Phase,
    paused: bool,
    nodes: Vec<NodeState>,
    events: Vec<AuditEvent>,
    /// The seq the next issued action gets. Starts at 1 so that 0 can mean "no fence" elsewhere.
    next_seq: u64,
    /// Issued actions without a result yet, in issue (seq) order.
    in_flight: Vec<Action>,
    awaiting_promotion: bool,
    promoted: bool,
    /// With `promote_each_wave`: the waves `promote` has let start (wave `k` starts once this
    /// is at least `k`); 0 in rollouts before waves.
    #[serde(default)]
    waves_promoted: usize,
    /// With `wave_pause_ms`: the wave pauses announced (the one before wave `k` once this is at
    /// least `k`) and the ones over (every node upgraded before wave `k` stayed healthy
    /// through it).
    #[serde(default)]
    waves_holding: usize,
    #[serde(default)]
    waves_held: usize,
    /// Why the rollout is not progressing normally or did not succeed (first cause first).
    error: Option<String>,
    /// The newest term of a driver that recorded an entry for this rollout. A result
    /// recorded under an older term comes from a deposed driver and is ignored.
    #[serde(default)]
    driver_term: u64,
    /// Every input that changed this rollout, oldest first (see [`replay`]). Empty in rollouts
    /// created before inputs were recorded: those cannot be replayed.
    #[serde(default)]
    inputs: Vec<Input>,
    /// Derived from `nodes` (never serialized, ignored by `==`): where each node is, so that
    /// a result or an in-flight action finds its node without a scan of every node.
    #[serde(skip)]
    index: NodeIndex,
}

/// Node id -> position in [`Rollout::nodes`], built on first use. A rollout's nodes never
/// change after [`Rollout::new`], so it never goes stale; shared (`Arc`) so that copying a
/// rollout (snapshots, [`Rollout::next_actions_after`]) does not copy it.
#[derive(Debug, Clone, Default)]
struct NodeIndex(std::sync::OnceLock<std::sync::Arc<HashMap<NodeId, usize>>>);

impl PartialEq for NodeIndex {
    /// A cache of `nodes`, which `==` compares already.
    fn eq(&self, _: &NodeIndex) -> bool {
        true
    }
}

impl Eq for NodeIndex {}

/// Serde for the shared spec: the spec itself, as before it was shared.
mod shared_spec {
    use std::sync::Arc;

    use orch_types::rollout::RolloutSpec;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(spec: &Arc<RolloutSpec>, s: S) -> Result<S::Ok, S::Error> {
        spec.as_ref().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<RolloutSpec>, D::Error> {
        RolloutSpec::deserialize(d).map(Arc::new)
    }
}

/// Nodes counted by how they ended (or were found) at a successful end or after preflight.
#[derive(Debug, Default)]
struct Tally {
    /// Made permanent by a commit of this rollout.
    committed: usize,
    /// Switched back to the target, their permanent release, with a downgrade.
    switched_back: usize,
    /// Run the target, healthy, not permanent (no-permanent).
    not_permanent: usize,
    /// Skipped: ran the target permanently.
    had_permanent: usize,
    /// Skipped: ran the target without it being permanent (no-permanent).
    had_current: usize,
    /// Skipped: ran the target; the preflight answer listed no releases.
    had_unknown: usize,
}

/// Per-apply scratch: who and when, for the audit events, and what got cancelled.
struct Ctx<'a> {
    at_ms: u64,
    by: &'a str,
    term: u64,
    cancelled: Vec<Action>,
}

fn clip(s: &str) -> String {
    let mut out: String = s.chars().take(MAX_TEXT_CHARS).collect();
    if out.len() < s.len() {
        out.push_str("...");
    }
    out
}

/// `event` as it is kept among a rollout's inputs: a driver's error clipped as applying it
/// clips it (clipping twice changes nothing, so a replay applies the same text).
fn kept(event: &Event) -> Event {
    let clipped = |result: &ActionResult| match result {
        ActionResult::Failed { error } => ActionResult::Failed { error: clip(error) },
        ActionResult::Refused { error } => ActionResult::Refused { error: clip(error) },
        other => other.clone(),
    };
    match event {
        Event::Result { seq, result } => Event::Result {
            seq: *seq,
            result: clipped(result),
        },
        other => other.clone(),
    }
}

/// Rebuilds a rollout from its spec and its recorded [`Rollout::inputs`]: a pure function,
/// so every replay of the same record gives the same rollout, audit trail included. Inputs
/// that would be refused now change nothing, as when they were first applied.
pub fn replay(spec: RolloutSpec, inputs: &[Input]) -> Result<Rollout, SpecError> {
    let mut r = Rollout::new(spec)?;
    for i in inputs {
        // A refusal changed nothing then and changes nothing now.
        let _ = r.apply_in_term(&i.event, i.at_ms, &i.by, i.term);
    }
    Ok(r)
}

fn join_ids<'a>(ids: impl IntoIterator<Item = &'a NodeId>) -> String {
    ids.into_iter()
        .map(|n| n.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// A duration in the audit trail's words: `900ms`, `45s`, `5m`, `1h30m`, `2m30.5s`.
fn ms(ms: u64) -> String {
    if ms < 1_000 {
        return format!("{ms}ms");
    }
    let (h, m, s, frac) = (
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1_000 % 60,
        ms % 1_000,
    );
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 || frac > 0 {
        out.push_str(&format!("{s}"));
        if frac > 0 {
            out.push_str(format!(".{frac:03}").trim_end_matches('0'));
        }
        out.push('s');
    }
    out
}

impl Rollout {
    /// A new rollout in phase `pending`. Refuses a spec that does not validate.
    pub fn new(spec: RolloutSpec) -> Result<Rollout, SpecError> {
        spec.validate()?;
        let nodes = spec
            .nodes
            .iter()
            .map(|id| NodeState {
                progress: NodeProgress::new(id.clone()),
                touch_seq: None,
                retry: None,
                downgraded: false,
                route: Route::Stage,
                start: None,
                commit_seq: None,
                undone: 0,
                refused: false,
                pruned: false,
                baked: false,
                watched: false,
                held: 0,
            })
            .collect();
        Ok(Rollout {
            spec: std::sync::Arc::new(spec),
            phase: Phase::Pending,
            paused: false,
            nodes,
            events: Vec::new(),
            next_seq: 1,
            in_flight: Vec::new(),
            awaiting_promotion: false,
            promoted: false,
            waves_promoted: 0,
            waves_holding: 0,
            waves_held: 0,
            error: None,
            driver_term: 0,
            inputs: Vec::new(),
            index: NodeIndex::default(),
        })
    }

    /// Rebuilds a rollout from its spec and its event log. Entries that were rejected when first
    /// applied are rejected again and change nothing, so the whole log can be replayed as is.
    pub fn replay<'a>(
        spec: RolloutSpec,
        log: impl IntoIterator<Item = &'a LogEntry>,
    ) -> Result<Rollout, SpecError> {
        let mut r = Rollout::new(spec)?;
        for e in log {
            // A rejection is part of the history: it changed nothing then and changes nothing now.
            let _ = r.apply(&e.event, e.at_ms, &e.by);
        }
        Ok(r)
    }

    /// Applies one event. `at_ms` and `by` only go into the audit trail: the machine has no
    /// clock, so applying the same events gives the same state anywhere.
    ///
    /// `Err` means the event was refused and the state is exactly as before.
    pub fn apply(&mut self, event: &Event, at_ms: u64, by: &str) -> Result<Outcome, Rejected> {
        self.apply_in_term(event, at_ms, by, 0)
    }

    /// Applies one event recorded by the driver of Raft term `term` (0: not a driver, e.g. an
    /// operator's command). Driver entries move the rollout's driver term forward (even when
    /// they change nothing else: a new driver's first `IssueActions` claims the rollout), and
    /// a result recorded under an older term than that is ignored: it was produced by a
    /// deposed driver, whose in-flight work the newer one performs again.
    ///
    /// An event that changed the rollout is kept among its [`Rollout::inputs`].
    pub fn apply_in_term(
        &mut self,
        event: &Event,
        at_ms: u64,
        by: &str,
        term: u64,
    ) -> Result<Outcome, Rejected> {
        let term_before = self.driver_term;
        let by = clip(by);
        let steps_before: Vec<NodeStep> = self.nodes.iter().map(|n| n.progress.step).collect();
        let outcome = self.take(event, at_ms, &by, term);
        // A node that changed step entered it at this entry's time: recorded, so the time in
        // step is the same on every coordinator and in a replay (the machine has no clock).
        for (n, before) in self.nodes.iter_mut().zip(steps_before) {
            if n.progress.step != before {
                n.progress.step_since_ms = at_ms;
            }
        }
        // Only what changed the state is kept: a replay without the rest gives the same state.
        if matches!(outcome, Ok(Outcome::Applied { .. })) || self.driver_term != term_before {
            self.inputs.push(Input {
                event: kept(event),
                at_ms,
                by,
                term,
            });
        }
        outcome
    }

    /// [`Rollout::apply_in_term`] without keeping the input.
    fn take(
        &mut self,
        event: &Event,
        at_ms: u64,
        by: &str,
        term: u64,
    ) -> Result<Outcome, Rejected> {
        if term > 0 && !matches!(event, Event::Command(_)) {
            if term < self.driver_term {
                if let Event::Result { seq, .. } = event {
                    return Ok(Outcome::Ignored {
                        reason: format!(
                            "result ignored: action {seq} was answered under term {term}, but the rollout is driven in term {} now",
                            self.driver_term
                        ),
                    });
                }
            } else {
                self.driver_term = term;
            }
        }
        let mut cx = Ctx {
            at_ms,
            by,
            term,
            cancelled: Vec::new(),
        };
        match event {
            Event::IssueActions => Ok(self.issue(&mut cx)),
            Event::Result { seq, result } => self.on_result(*seq, result, &mut cx),
            Event::Command(c) => self.on_command(*c, &mut cx),
        }
    }

    /// What [`Rollout::next_actions`] would return once `event` were applied, leaving this
    /// rollout as it is; `None` if the event would be refused. The audit trail is not copied
    /// (planning never reads it), so this stays cheap however long the history grows: the
    /// driver asks it on every successful install to start the health gate early.
    pub fn next_actions_after(&self, event: &Event) -> Option<Vec<Action>> {
        let mut r = Rollout {
            spec: self.spec.clone(),
            phase: self.phase,
            paused: self.paused,
            nodes: self.nodes.clone(),
            events: Vec::new(),
            next_seq: self.next_seq,
            in_flight: self.in_flight.clone(),
            awaiting_promotion: self.awaiting_promotion,
            promoted: self.promoted,
            waves_promoted: self.waves_promoted,
            waves_holding: self.waves_holding,
            waves_held: self.waves_held,
            error: self.error.clone(),
            driver_term: self.driver_term,
            inputs: Vec::new(),
            index: self.index.clone(),
        };
        r.apply(event, 0, "").ok()?;
        Some(r.next_actions())
    }

    pub fn spec(&self) -> &RolloutSpec {
        &self.spec
    }

    pub fn id(&self) -> &str {
        &self.spec.id
    }

    /// The phase operators see: `paused` while paused, otherwise the working phase.
    pub fn phase(&self) -> Phase {
        if self.paused {
            Phase::Paused
        } else {
            self.phase
        }
    }

    /// The phase the rollout is in or, while paused, the one `resume` continues in.
    pub fn working_phase(&self) -> Phase {
        self.phase
    }

    pub fn is_finished(&self) -> bool {
        self.phase.is_terminal()
    }

    /// With `--wave-pause`: the wave that waits for the pause before it (every node upgraded
    /// so far must stay healthy for the pause first); `None` when no pause holds now.
    pub fn holding_wave(&self) -> Option<usize> {
        (self.phase == Phase::Upgrading)
            .then(|| self.wave_hold())
            .flatten()
    }

    /// True when the canary nodes are upgraded and healthy and the rollout waits for `promote`.
    pub fn awaiting_promotion(&self) -> bool {
        self.awaiting_promotion
    }

    /// Why the rollout is not progressing normally, or why it did not succeed.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// Per-node progress, in spec order.
    pub fn nodes(&self) -> impl ExactSizeIterator<Item = &NodeProgress> {
        self.nodes.iter().map(|n| &n.progress)
    }

    pub fn node(&self, id: &NodeId) -> Option<&NodeProgress> {
        self.index_of(id).map(|i| &self.nodes[i].progress)
    }

    /// The audit trail, oldest first.
    pub fn events(&self) -> &[AuditEvent] {
        &self.events
    }

    /// Every input that changed this rollout, oldest first: [`replay`] of the spec and these
    /// gives this rollout back.
    pub fn inputs(&self) -> &[Input] {
        &self.inputs
    }

    /// Issued actions whose result has not been applied, oldest first. A driver taking over
    /// (new leader) reconciles and re-performs these: agent calls are idempotent and fenced.
    pub fn in_flight(&self) -> &[Action] {
        &self.in_flight
    }

    /// The seq the next issued action will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The newest Raft term in which a driver recorded an entry for this rollout.
    pub fn driver_term(&self) -> u64 {
        self.driver_term
    }

    /// Nodes where a step that changes what they run or boot (install, downgrade, commit) was
    /// attempted and not refused, in the order they were first touched (rollback goes the other
    /// way).
    pub fn touched(&self) -> Vec<NodeId> {
        let mut order = self.rollback_order();
        order.reverse();
        order
            .into_iter()
            .map(|i| self.nodes[i].id().clone())
            .collect()
    }

    /// Free disk preflight requires on each node, if the spec names a package.
    pub fn required_free_disk(&self) -> Option<u64> {
        self.spec
            .package
            .as_ref()
            .map(|p| p.size.saturating_mul(DISK_HEADROOM_FACTOR))
    }

    /// The actions the next [`Event::IssueActions`] would issue, with the seqs they would get.
    /// Empty when there is nothing to start: paused, finished, waiting for promotion, or waiting
    /// for in-flight results.
    pub fn next_actions(&self) -> Vec<Action> {
        self.plan()
            .into_iter()
            .zip(self.next_seq..)
            .map(|((i, kind), seq)| Action {
                seq,
                node: self.nodes[i].id().clone(),
                kind,
            })
            .collect()
    }

    /// What `status --json` shows.
    pub fn status(&self) -> RolloutStatus {
        RolloutStatus {
            id: self.spec.id.clone(),
            version: self.spec.version,
            phase: self.phase(),
            awaiting_promotion: self.awaiting_promotion,
            error: self.error.clone(),
            nodes: self.nodes().cloned().collect(),
            events: self.events.clone(),
        }
    }

    /// One line for humans, e.g. `r1 -> 4.2.1: upgrading; 2 upgraded, 1 installing, 2 staged`.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} -> {}: {}",
            self.spec.id,
            self.spec.version,
            self.phase()
        );
        if self.paused {
            s.push_str(&format!(" (during {})", self.phase));
        }
        let counts: Vec<String> = NodeStep::ALL
            .into_iter()
            .filter_map(|step| {
                let n = self.nodes.iter().filter(|n| n.step() == step).count();
                (n > 0).then(|| format!("{n} {step}"))
            })
            .collect();
        s.push_str("; ");
        s.push_str(&counts.join(", "));
        if !self.in_flight.is_empty() {
            s.push_str(&format!("; {} action(s) in flight", self.in_flight.len()));
        }
        if self.awaiting_promotion {
            s.push_str("; waiting for promote");
        }
        if let Some(e) = &self.error {
            s.push_str("; ");
            s.push_str(e);
        }
        s
    }

    fn record(&mut self, cx: &Ctx<'_>, message: String) {
        self.events.push(AuditEvent {
            at_ms: cx.at_ms,
            by: cx.by.to_string(),
            message,
            term: cx.term,
        });
    }

    fn index_of(&self, id: &NodeId) -> Option<usize> {
        let index = self.index.0.get_or_init(|| {
            let mut by_id = HashMap::with_capacity(self.nodes.len());
            for (i, n) in self.nodes.iter().enumerate() {
                // The first one, as a scan would find (a validated spec has no duplicates).
                by_id.entry(n.id().clone()).or_insert(i);
            }
            std::sync::Arc::new(by_id)
        });
        index.get(id).copied()
    }

    /// Per node (by position): whether an action of it is in flight. One pass over the
    /// in-flight actions, so that planning over every node stays linear in the node count
    /// (asking [`Rollout::busy`] per node scans the in-flight list for each: all of preflight
    /// is in flight at once).
    fn busy_nodes(&self) -> Vec<bool> {
        let mut busy = vec![false; self.nodes.len()];
        for a in &self.in_flight {
            if let Some(i) = self.index_of(&a.node) {
                busy[i] = true;
            }
        }
        busy
    }
}
