//! The [`Rollout`] state machine. See the crate docs for the protocol and the semantics.

use orch_types::rollout::{
    AuditEvent, NodeProgress, NodeStep, OnFailure, Phase, RolloutSpec, RolloutStatus, SpecError,
};
use orch_types::{NodeId, ReleaseState, Version, VersionEntry};
use serde::{Deserialize, Serialize};

use crate::protocol::{
    Action, ActionKind, ActionResult, Command, Event, LogEntry, Outcome, Rejected,
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
    spec: RolloutSpec,
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
    /// Why the rollout is not progressing normally or did not succeed (first cause first).
    error: Option<String>,
    /// The newest term of a driver that recorded an entry for this rollout. A result
    /// recorded under an older term comes from a deposed driver and is ignored.
    #[serde(default)]
    driver_term: u64,
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

fn join_ids<'a>(ids: impl IntoIterator<Item = &'a NodeId>) -> String {
    ids.into_iter()
        .map(|n| n.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// `4.2.1 current, 4.2.0 permanent, 4.1.9 old`, newest first (as `versions` lists them).
fn describe_releases(releases: &[VersionEntry]) -> String {
    let mut sorted: Vec<&VersionEntry> = releases.iter().collect();
    sorted.sort_by_key(|e| std::cmp::Reverse(e.version));
    sorted
        .iter()
        .map(|e| format!("{} {}", e.version, e.state))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `4.2.0 permanently`, or `4.2.2 (current; 4.2.0 permanent)`.
fn describe_start(start: &Start) -> String {
    match start.current {
        None => format!("{} permanently", start.permanent),
        Some(c) => format!("{c} (current; {} permanent)", start.permanent),
    }
}

/// Checks that a node's release list is one its store can hold (the invariants of the node
/// layer: at most one `current`, exactly one `permanent`, each version once) and agrees with the
/// version it says runs (the current one, else the permanent one). Planning on a list that does
/// not add up would guess; the caller refuses the node instead.
fn check_releases(running: Version, releases: &[VersionEntry]) -> Result<Start, String> {
    let mut current = None;
    let mut permanent = None;
    for (k, e) in releases.iter().enumerate() {
        if releases[..k].iter().any(|o| o.version == e.version) {
            return Err(format!("{} is listed twice", e.version));
        }
        let slot = match e.state {
            ReleaseState::Current => &mut current,
            ReleaseState::Permanent => &mut permanent,
            ReleaseState::Unpacked | ReleaseState::Old => continue,
        };
        if let Some(other) = slot.replace(e.version) {
            return Err(format!(
                "both {other} and {} are {}",
                e.version,
                e.state.as_str()
            ));
        }
    }
    let Some(permanent) = permanent else {
        return Err("no release is permanent".to_string());
    };
    let runs = current.unwrap_or(permanent);
    if runs != running {
        return Err(format!(
            "it reports {running} running, but its releases say {runs} runs"
        ));
    }
    Ok(Start { current, permanent })
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
            })
            .collect();
        Ok(Rollout {
            spec,
            phase: Phase::Pending,
            paused: false,
            nodes,
            events: Vec::new(),
            next_seq: 1,
            in_flight: Vec::new(),
            awaiting_promotion: false,
            promoted: false,
            error: None,
            driver_term: 0,
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
    pub fn apply_in_term(
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
        let by = clip(by);
        let mut cx = Ctx {
            at_ms,
            by: &by,
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
            error: self.error.clone(),
            driver_term: self.driver_term,
        };
        r.apply(event, 0, "").ok()?;
        Some(r.next_actions())
    }

    // ----- queries -----

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
        self.nodes
            .iter()
            .find(|n| n.id() == id)
            .map(|n| &n.progress)
    }

    /// The audit trail, oldest first.
    pub fn events(&self) -> &[AuditEvent] {
        &self.events
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

    // ----- planning (pure) -----

    fn busy(&self, i: usize) -> bool {
        let id = self.nodes[i].id();
        self.in_flight.iter().any(|a| &a.node == id)
    }

    /// Nodes that take part in the upgrade: all but the skipped ones (meaningful after preflight).
    fn targets(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].step() != NodeStep::Skipped)
            .collect()
    }

    fn canary_pending(&self) -> bool {
        self.spec.canary > 0 && !self.promoted
    }

    /// The upgrade batches, in order, each flagged with whether it comes after the canary. The
    /// canary part is chunked separately so that no batch straddles the promotion point, and
    /// every batch respects `batch_size`.
    fn batches(&self) -> Vec<(bool, Vec<usize>)> {
        let targets = self.targets();
        let size = (self.spec.batch_size as usize).max(1);
        let canary = (self.spec.canary as usize).min(targets.len());
        let (head, tail) = targets.split_at(canary);
        let mut out: Vec<(bool, Vec<usize>)> =
            head.chunks(size).map(|c| (false, c.to_vec())).collect();
        out.extend(tail.chunks(size).map(|c| (true, c.to_vec())));
        out
    }

    /// Touched nodes, most recently touched first.
    fn rollback_order(&self) -> Vec<usize> {
        let mut v: Vec<(u64, usize)> = self
            .nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| n.touch_seq.map(|s| (s, i)))
            .collect();
        v.sort_unstable_by(|a, b| b.cmp(a));
        v.into_iter().map(|(_, i)| i).collect()
    }

    /// Up to `max_parallel_staging` in flight of one kind, over idle nodes at `step`, in order.
    fn plan_bounded(&self, step: NodeStep, kind: ActionKind) -> Vec<(usize, ActionKind)> {
        let running = self
            .in_flight
            .iter()
            .filter(|a| a.kind.name() == kind.name())
            .count();
        let budget = (self.spec.max_parallel_staging as usize).saturating_sub(running);
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].step() == step && !self.busy(i))
            .take(budget)
            .map(|i| (i, kind.clone()))
            .collect()
    }

    fn plan(&self) -> Vec<(usize, ActionKind)> {
        if self.paused || self.phase.is_terminal() {
            return Vec::new();
        }
        let target = self.spec.version;
        match self.phase {
            Phase::Pending | Phase::Preflight => (0..self.nodes.len())
                .filter(|&i| self.nodes[i].step() == NodeStep::Pending && !self.busy(i))
                .map(|i| (i, ActionKind::Preflight))
                .collect(),
            Phase::Staging => {
                self.plan_bounded(NodeStep::PreflightOk, ActionKind::Stage { version: target })
            }
            Phase::Upgrading => self.plan_upgrade(),
            Phase::Committing => {
                self.plan_bounded(NodeStep::Upgraded, ActionKind::Commit { version: target })
            }
            Phase::RollingBack => self.plan_rollback(),
            _ => Vec::new(),
        }
    }

    fn plan_upgrade(&self) -> Vec<(usize, ActionKind)> {
        if self.awaiting_promotion {
            return Vec::new();
        }
        let batches = self.batches();
        let Some((after_canary, batch)) = batches
            .iter()
            .find(|(_, b)| b.iter().any(|&i| !self.upgraded(i)))
        else {
            return Vec::new();
        };
        if *after_canary && self.canary_pending() {
            return Vec::new();
        }
        let target = self.spec.version;
        batch
            .iter()
            .filter(|&&i| !self.busy(i))
            .filter_map(|&i| match self.nodes[i].step() {
                NodeStep::Staged if self.nodes[i].route == Route::SwitchBack => {
                    Some((i, ActionKind::Downgrade { to: target }))
                }
                NodeStep::Staged => Some((i, ActionKind::Install { version: target })),
                NodeStep::Installed => Some((i, self.gate(target))),
                _ => None,
            })
            .collect()
    }

    /// Node `i` runs the target and passed its gate: `upgraded`, or `committed` already (a
    /// switch back to a permanent target needs no commit).
    fn upgraded(&self, i: usize) -> bool {
        matches!(
            self.nodes[i].step(),
            NodeStep::Upgraded | NodeStep::Committed
        )
    }

    /// Node `i` has the target on disk (or running) and waits for its upgrade batch.
    fn ready(&self, i: usize) -> bool {
        matches!(self.nodes[i].step(), NodeStep::Staged | NodeStep::Installed)
    }

    /// The steps that undo what the forward path may have done to node `i`, in order, and the
    /// release the node runs once they are done (its rollback gate expects it); `None` when the
    /// node's starting point is unknown. Every step is valid, or already holds, whichever of
    /// the node's possible states it finds (a failed step may or may not have changed it):
    ///
    /// - target installed over a permanent P (nothing else current): downgrade P.
    /// - target installed over C current on a permanent P: install C again (not permanent),
    ///   preceded by a downgrade to P if a commit may have made the target permanent.
    /// - target was already current over P (only gated and committed): downgrade P. Not quite
    ///   the start (the target ran, not permanently), but a rollback moves away from the
    ///   target instead of installing it again; the target stays on disk (`old`).
    /// - target was permanent behind C current (switched back to with a downgrade): install C
    ///   again (not permanent), which restores exactly C current, target permanent.
    fn undo_program(&self, i: usize) -> (Vec<ActionKind>, Option<Version>) {
        let n = &self.nodes[i];
        let Some(start) = n.start else {
            // Preflight answered without releases: as before release lists existed.
            return match n.progress.from_version {
                Some(from) => (vec![ActionKind::Downgrade { to: from }], Some(from)),
                None => (Vec::new(), None),
            };
        };
        let p = start.permanent;
        let down = ActionKind::Downgrade { to: p };
        match (n.route, start.current) {
            (Route::Stage | Route::Install, None) | (Route::Adopt, _) => (vec![down], Some(p)),
            (Route::Stage | Route::Install, Some(c)) => {
                let reinstall = ActionKind::Install { version: c };
                if n.commit_seq.is_some() {
                    (vec![down, reinstall], Some(c))
                } else {
                    (vec![reinstall], Some(c))
                }
            }
            (Route::SwitchBack, Some(c)) => (vec![ActionKind::Install { version: c }], Some(c)),
            // Preflight never plans a switch back without a current release.
            (Route::SwitchBack, None) => (Vec::new(), None),
        }
    }

    fn plan_rollback(&self) -> Vec<(usize, ActionKind)> {
        // Strictly one node at a time, most recently touched first: the next node waits until the
        // previous one is back and healthy (or given up on).
        let order = self.rollback_order();
        let Some(&i) = order.iter().find(|&&i| {
            !matches!(
                self.nodes[i].step(),
                NodeStep::RolledBack | NodeStep::RollbackFailed
            )
        }) else {
            return Vec::new();
        };
        if self.busy(i) {
            // Typically an install or commit still in flight: its outcome must be known first.
            return Vec::new();
        }
        let n = &self.nodes[i];
        let (program, back_to) = self.undo_program(i);
        let Some(back_to) = back_to else {
            // start_rollback marks such nodes rollback_failed; nothing sensible to issue.
            return Vec::new();
        };
        match program.get(usize::from(n.undone)) {
            Some(step) if !n.downgraded => vec![(i, step.clone())],
            _ => vec![(i, self.gate(back_to))],
        }
    }

    fn gate(&self, expect: Version) -> ActionKind {
        ActionKind::HealthGate {
            min_healthy_time_ms: self.spec.min_healthy_time_ms,
            healthy_deadline_ms: self.spec.healthy_deadline_ms,
            expect,
            failure_threshold: self.spec.failure_threshold,
        }
    }

    fn idle_reason(&self) -> String {
        if self.phase.is_terminal() {
            format!("nothing to issue: rollout has ended ({})", self.phase)
        } else if self.paused {
            "nothing to issue: rollout is paused".to_string()
        } else if self.awaiting_promotion {
            "nothing to issue: waiting for canary promotion".to_string()
        } else {
            format!(
                "nothing to issue: waiting for {} in-flight action(s)",
                self.in_flight.len()
            )
        }
    }

    // ----- transitions -----

    fn record(&mut self, cx: &Ctx<'_>, message: String) {
        self.events.push(AuditEvent {
            at_ms: cx.at_ms,
            by: cx.by.to_string(),
            message,
            term: cx.term,
        });
    }

    fn index_of(&self, id: &NodeId) -> Option<usize> {
        self.nodes.iter().position(|n| n.id() == id)
    }

    fn issue(&mut self, cx: &mut Ctx<'_>) -> Outcome {
        if self.paused || self.phase.is_terminal() {
            return Outcome::Ignored {
                reason: self.idle_reason(),
            };
        }
        let mut changed = false;
        if self.phase == Phase::Pending {
            self.phase = Phase::Preflight;
            changed = true;
            let s = &self.spec;
            let msg = format!(
                "rollout {} started: {} on {} node{} in order {}; batch size {}, canary {}, {}, on failure {}; requested by {}",
                s.id,
                s.version,
                s.nodes.len(),
                plural(s.nodes.len()),
                join_ids(&s.nodes),
                s.batch_size,
                s.canary,
                if s.permanent {
                    "permanent"
                } else {
                    "not permanent"
                },
                s.on_failure,
                s.requested_by,
            );
            self.record(cx, msg);
        }
        let plan = self.plan();
        if plan.is_empty() && !changed {
            return Outcome::Ignored {
                reason: self.idle_reason(),
            };
        }
        let mut issued = Vec::with_capacity(plan.len());
        let rolling_back = self.phase == Phase::RollingBack;
        for (i, kind) in plan {
            let seq = self.next_seq;
            self.next_seq += 1;
            let node = &mut self.nodes[i];
            match &kind {
                ActionKind::Preflight => {}
                ActionKind::Stage { .. } => node.progress.step = NodeStep::Staging,
                ActionKind::Install { .. } | ActionKind::Downgrade { .. } if rolling_back => {
                    node.progress.step = NodeStep::RollingBack;
                }
                ActionKind::Install { .. } | ActionKind::Downgrade { .. } => {
                    node.progress.step = NodeStep::Installing;
                    node.touch_seq.get_or_insert(seq);
                }
                ActionKind::HealthGate { .. } => {
                    // A rollback gate leaves the node `rolling_back`.
                    if node.progress.step == NodeStep::Installed {
                        node.progress.step = NodeStep::Verifying;
                    }
                }
                ActionKind::Commit { .. } => {
                    node.progress.step = NodeStep::Committing;
                    node.touch_seq.get_or_insert(seq);
                    node.commit_seq.get_or_insert(seq);
                }
            }
            let action = Action {
                seq,
                node: node.id().clone(),
                kind,
            };
            self.in_flight.push(action.clone());
            issued.push(action);
        }
        if !issued.is_empty() {
            let list: Vec<String> = issued.iter().map(|a| a.to_string()).collect();
            self.record(cx, format!("started {}", list.join("; ")));
        }
        Outcome::Applied {
            phase: self.phase(),
            issued,
            cancelled: Vec::new(),
        }
    }

    fn on_result(
        &mut self,
        seq: u64,
        result: &ActionResult,
        cx: &mut Ctx<'_>,
    ) -> Result<Outcome, Rejected> {
        let Some(pos) = self.in_flight.iter().position(|a| a.seq == seq) else {
            let reason = if seq == 0 || seq >= self.next_seq {
                format!("result ignored: action {seq} was never issued")
            } else {
                format!(
                    "result ignored: action {seq} is not in flight (already answered, or cancelled)"
                )
            };
            return Ok(Outcome::Ignored { reason });
        };
        let action = &self.in_flight[pos];
        let mismatch = match (&action.kind, result) {
            (ActionKind::Preflight, ActionResult::Done) => {
                Some("a preflight is answered with the running version and free disk, or a failure")
            }
            (kind, ActionResult::Preflight { .. }) if *kind != ActionKind::Preflight => {
                Some("only a preflight is answered with a running version")
            }
            _ => None,
        };
        if let Some(detail) = mismatch {
            return Err(Rejected::MismatchedResult {
                seq,
                node: action.node.clone(),
                kind: action.kind.name(),
                detail,
            });
        }
        let Some(i) = self.index_of(&action.node) else {
            // Only reachable with a hand-edited state; leave it untouched rather than guess.
            return Ok(Outcome::Ignored {
                reason: format!(
                    "result ignored: action {seq} names node {} which is not in this rollout",
                    action.node
                ),
            });
        };
        let action = self.in_flight.remove(pos);
        match result {
            ActionResult::Preflight {
                running,
                free_disk,
                releases,
            } => self.preflight_answered(i, *running, *free_disk, releases, cx),
            ActionResult::Done => self.action_done(i, &action, cx),
            ActionResult::Failed { error } => {
                self.action_failed(i, &action, &clip(error), false, cx)
            }
            ActionResult::Refused { error } => self.action_refused(i, &action, &clip(error), cx),
        }
        self.advance(cx);
        Ok(Outcome::Applied {
            phase: self.phase(),
            issued: Vec::new(),
            cancelled: std::mem::take(&mut cx.cancelled),
        })
    }

    /// Plans node `i` from its preflight answer: skipped, refused, or one of the [`Route`]s.
    fn preflight_answered(
        &mut self,
        i: usize,
        running: Version,
        free_disk: u64,
        releases: &[VersionEntry],
        cx: &mut Ctx<'_>,
    ) {
        let target = self.spec.version;
        let id = self.nodes[i].id().clone();
        self.nodes[i].progress.from_version = Some(running);
        if releases.is_empty() {
            return self.preflight_legacy(i, running, free_disk, cx);
        }
        let start = match check_releases(running, releases) {
            Ok(start) => start,
            Err(why) => {
                return self.preflight_failed(
                    i,
                    format!(
                        "its releases do not add up ({why}: {}); nothing was touched, check `orchestrator node versions --agent {id}`",
                        describe_releases(releases)
                    ),
                    cx,
                );
            }
        };
        let has = describe_start(&start);
        let p = start.permanent;
        if running != target && !running.is_patch_hop(&target) {
            return self.preflight_failed(
                i,
                format!(
                    "cannot hop from {running} to {target}: only patch-level hot upgrades (same major.minor) are allowed"
                ),
                cx,
            );
        }
        let state = releases
            .iter()
            .find(|e| e.version == target)
            .map(|e| e.state);
        let route = match state {
            Some(ReleaseState::Permanent) if start.current.is_none() => {
                return self.skip(i, start, format!("already runs {target} permanently"), cx);
            }
            Some(ReleaseState::Current) if !self.spec.permanent => {
                return self.skip(
                    i,
                    start,
                    format!(
                        "already runs {target}, not permanently ({p} is permanent), which is where a rollout without making it permanent leaves it"
                    ),
                    cx,
                );
            }
            Some(ReleaseState::Permanent) => Route::SwitchBack,
            Some(ReleaseState::Current) => Route::Adopt,
            Some(ReleaseState::Unpacked | ReleaseState::Old) => Route::Install,
            None => Route::Stage,
        };
        if route == Route::Stage
            && let Some(need) = self.required_free_disk()
            && free_disk < need
        {
            return self.preflight_failed(
                i,
                format!(
                    "not enough free disk: {free_disk} bytes free, {need} needed ({DISK_HEADROOM_FACTOR}x the package size)"
                ),
                cx,
            );
        }
        let commit = if self.spec.permanent {
            ", make permanent"
        } else {
            ""
        };
        let (step, plan) = match route {
            Route::Stage => (
                NodeStep::PreflightOk,
                format!("{free_disk} bytes free; stage, install, gate{commit} {target}"),
            ),
            Route::Install => (
                NodeStep::Staged,
                format!(
                    "{target} is already on its disk ({}), nothing to stage; install, gate{commit}",
                    state.map_or("unpacked", |s| s.as_str())
                ),
            ),
            Route::Adopt => (
                NodeStep::Installed,
                format!(
                    "it already runs {target}, not permanently; health gate, then make it permanent with the others"
                ),
            ),
            Route::SwitchBack => (
                NodeStep::Staged,
                format!(
                    "{target} is its permanent release; switch back to it with a downgrade (it stays permanent), then health gate"
                ),
            ),
        };
        let node = &mut self.nodes[i];
        node.start = Some(start);
        node.route = route;
        node.progress.step = step;
        self.record(cx, format!("{id}: preflight ok: runs {has}: {plan}"));
    }

    /// A preflight answer without releases (an older driver): planned from the running version
    /// alone, exactly as before release lists existed, so old logs replay to the same state.
    fn preflight_legacy(&mut self, i: usize, running: Version, free_disk: u64, cx: &mut Ctx<'_>) {
        let target = self.spec.version;
        let need = self.required_free_disk();
        let node = &mut self.nodes[i];
        let id = node.id().clone();
        if running == target {
            node.progress.step = NodeStep::Skipped;
            self.record(cx, format!("{id}: already runs {target}: skipped"));
        } else if !running.is_patch_hop(&target) {
            self.preflight_failed(
                i,
                format!(
                    "cannot hop from {running} to {target}: only patch-level hot upgrades (same major.minor) are allowed"
                ),
                cx,
            );
        } else if let Some(need) = need
            && free_disk < need
        {
            self.preflight_failed(
                i,
                format!(
                    "not enough free disk: {free_disk} bytes free, {need} needed ({DISK_HEADROOM_FACTOR}x the package size)"
                ),
                cx,
            );
        } else {
            node.progress.step = NodeStep::PreflightOk;
            self.record(
                cx,
                format!("{id}: preflight ok: runs {running}, {free_disk} bytes free"),
            );
        }
    }

    fn skip(&mut self, i: usize, start: Start, why: String, cx: &mut Ctx<'_>) {
        let node = &mut self.nodes[i];
        node.start = Some(start);
        node.progress.step = NodeStep::Skipped;
        let id = node.id().clone();
        self.record(cx, format!("{id}: {why}: skipped"));
    }

    fn preflight_failed(&mut self, i: usize, msg: String, cx: &mut Ctx<'_>) {
        let node = &mut self.nodes[i];
        node.progress.step = NodeStep::Failed;
        node.progress.error = Some(msg.clone());
        let id = node.id().clone();
        self.record(cx, format!("{id}: {msg}"));
    }

    fn action_done(&mut self, i: usize, action: &Action, cx: &mut Ctx<'_>) {
        if self.nodes[i].step() == NodeStep::RollingBack && action.kind.changes_node() {
            return self.undo_step_done(i, action, cx);
        }
        let node = &mut self.nodes[i];
        let id = node.id().clone();
        let msg = match &action.kind {
            // Answered with `Done`: refused before this point (MismatchedResult).
            ActionKind::Preflight => return,
            ActionKind::Stage { version } => {
                node.progress.step = NodeStep::Staged;
                format!("{id}: staged {version}")
            }
            ActionKind::Install { version } => {
                node.progress.step = NodeStep::Installed;
                format!("{id}: installed {version} (not permanent yet)")
            }
            ActionKind::Downgrade { to } => {
                node.progress.step = NodeStep::Installed;
                format!("{id}: switched back to {to} with a downgrade ({to} is permanent)")
            }
            ActionKind::HealthGate { expect, .. } => {
                if node.downgraded && node.progress.step == NodeStep::RollingBack {
                    node.progress.step = NodeStep::RolledBack;
                    format!("{id}: rolled back to {expect} and healthy")
                } else if node.route == Route::SwitchBack {
                    // Its downgrade made the target permanent already: nothing to commit.
                    node.progress.step = NodeStep::Committed;
                    format!("{id}: healthy on {expect}, which is permanent")
                } else {
                    node.progress.step = NodeStep::Upgraded;
                    format!("{id}: healthy on {expect}")
                }
            }
            ActionKind::Commit { version } => {
                node.progress.step = NodeStep::Committed;
                format!("{id}: {version} is permanent")
            }
        };
        self.record(cx, msg);
    }

    /// An undo step of node `i`'s rollback succeeded; after the last one, its gate is next.
    fn undo_step_done(&mut self, i: usize, action: &Action, cx: &mut Ctx<'_>) {
        let steps = self.undo_program(i).0.len();
        let node = &mut self.nodes[i];
        node.undone = node.undone.saturating_add(1);
        if usize::from(node.undone) >= steps {
            node.downgraded = true;
        }
        let id = node.id().clone();
        let msg = match &action.kind {
            ActionKind::Install { version } => {
                format!("{id}: {version} installed again (current, not permanent, as before)")
            }
            ActionKind::Downgrade { to } => format!("{id}: downgraded to {to}"),
            other => format!("{id}: {other} done"),
        };
        self.record(cx, msg);
    }

    fn action_failed(
        &mut self,
        i: usize,
        action: &Action,
        error: &str,
        refused: bool,
        cx: &mut Ctx<'_>,
    ) {
        let error = if error.trim().is_empty() {
            "no detail given"
        } else {
            error
        };
        let failed = if refused {
            "refused, nothing changed"
        } else {
            "failed"
        };
        let undoing = self.nodes[i].step() == NodeStep::RollingBack;
        if !undoing {
            self.nodes[i].refused = refused;
        }
        match &action.kind {
            ActionKind::Preflight => {
                self.preflight_failed(i, format!("preflight {failed}: {error}"), cx);
            }
            ActionKind::Stage { version } => {
                self.node_failed(
                    i,
                    Retry::Stage,
                    format!("staging {version} {failed}: {error}"),
                    cx,
                );
            }
            ActionKind::Install { version } if undoing => {
                self.rollback_failed(
                    i,
                    format!("installing {version} again {failed}: {error}"),
                    cx,
                );
            }
            ActionKind::Install { version } => {
                self.node_failed(
                    i,
                    Retry::Install,
                    format!("install of {version} {failed}: {error}"),
                    cx,
                );
            }
            ActionKind::HealthGate { expect, .. } => {
                let n = &self.nodes[i];
                if n.downgraded && n.step() == NodeStep::RollingBack {
                    let after = match self.undo_program(i).0.last() {
                        Some(ActionKind::Install { .. }) => "installing it again",
                        _ => "downgrade",
                    };
                    self.rollback_failed(
                        i,
                        format!("health gate on {expect} after {after} {failed}: {error}"),
                        cx,
                    );
                } else {
                    self.node_failed(
                        i,
                        Retry::HealthGate,
                        format!("health gate on {expect} {failed}: {error}"),
                        cx,
                    );
                }
            }
            ActionKind::Commit { version } => {
                self.node_failed(
                    i,
                    Retry::Commit,
                    format!("making {version} permanent {failed}: {error}"),
                    cx,
                );
            }
            ActionKind::Downgrade { to } if undoing => {
                self.rollback_failed(i, format!("downgrade to {to} {failed}: {error}"), cx);
            }
            ActionKind::Downgrade { to } => {
                self.node_failed(
                    i,
                    Retry::SwitchBack,
                    format!("downgrade to {to} {failed}: {error}"),
                    cx,
                );
            }
        }
    }

    /// The agent refused the step: nothing changed, so a step that would have touched the node
    /// no longer does (unless an earlier attempt may have), then it fails like any step.
    fn action_refused(&mut self, i: usize, action: &Action, error: &str, cx: &mut Ctx<'_>) {
        let node = &mut self.nodes[i];
        if node.touch_seq == Some(action.seq) {
            node.touch_seq = None;
        }
        if node.commit_seq == Some(action.seq) {
            node.commit_seq = None;
        }
        self.action_failed(i, action, error, true, cx);
    }

    /// A forward step failed on node `i`: mark it and apply the spec's `on_failure`.
    fn node_failed(&mut self, i: usize, retry: Retry, msg: String, cx: &mut Ctx<'_>) {
        let node = &mut self.nodes[i];
        node.progress.step = NodeStep::Failed;
        node.progress.error = Some(msg.clone());
        node.retry = Some(retry);
        let cause = format!("{}: {msg}", node.id());
        self.record(cx, cause.clone());
        if !matches!(
            self.phase,
            Phase::Staging | Phase::Upgrading | Phase::Committing
        ) {
            // Rolling back already (an install or commit that was in flight failed): the node
            // is downgraded like every touched node; nothing else to decide.
            return;
        }
        match self.spec.on_failure {
            OnFailure::Rollback => self.start_rollback(cause, cx),
            OnFailure::Pause => {
                self.error.get_or_insert(cause.clone());
                if self.paused {
                    self.record(
                        cx,
                        format!(
                            "rollout stays paused: resume retries the failed {}, rollback rolls back every touched node, abort stops here",
                            retry.name()
                        ),
                    );
                } else {
                    self.paused = true;
                    self.record(
                        cx,
                        format!(
                            "paused after a failure (on failure: pause): {cause}; resume retries the failed {}, rollback rolls back every touched node, abort stops here",
                            retry.name()
                        ),
                    );
                }
            }
        }
    }

    fn rollback_failed(&mut self, i: usize, msg: String, cx: &mut Ctx<'_>) {
        let node = &mut self.nodes[i];
        node.progress.step = NodeStep::RollbackFailed;
        node.progress.error = Some(msg.clone());
        let id = node.id().clone();
        self.record(
            cx,
            format!("{id}: {msg}; this node needs a person, rollback continues with the others"),
        );
    }

    /// Enters `rolling_back` (or `aborted` when no node was touched: nothing to undo).
    fn start_rollback(&mut self, cause: String, cx: &mut Ctx<'_>) {
        self.awaiting_promotion = false;
        self.error.get_or_insert(cause.clone());
        let order = self.rollback_order();
        if order.is_empty() {
            self.terminate(
                Phase::Aborted,
                format!(
                    "{cause}; no node was installed, so there is nothing to roll back: rollout aborted (the service was never touched; staged releases stay unpacked)"
                ),
                cx,
            );
            return;
        }
        // Keep only actions that change a node: their outcome must be known before the node is
        // downgraded. Health gates and unpacks no longer matter.
        let (keep, drop): (Vec<Action>, Vec<Action>) = std::mem::take(&mut self.in_flight)
            .into_iter()
            .partition(|a| a.kind.changes_node());
        self.in_flight = keep;
        for a in &drop {
            if let Some(j) = self.index_of(&a.node) {
                let n = &mut self.nodes[j];
                n.progress.step = match n.step() {
                    NodeStep::Verifying => NodeStep::Installed,
                    NodeStep::Staging => NodeStep::PreflightOk,
                    other => other,
                };
            }
        }
        cx.cancelled.extend(drop);
        for &j in &order {
            if self.undo_program(j).1.is_none() {
                // Cannot happen (a touch needs a preflight), but never guess a version to run.
                self.rollback_failed(
                    j,
                    "previous version unknown, cannot roll back".to_string(),
                    cx,
                );
            }
        }
        self.phase = Phase::RollingBack;
        let ids: Vec<&NodeId> = order.iter().map(|&j| self.nodes[j].id()).collect();
        let mut msg = format!(
            "{cause}; rolling back {} touched node{} one at a time, most recently touched first: {}",
            ids.len(),
            plural(ids.len()),
            join_ids(ids)
        );
        if self.paused {
            msg.push_str(" (the rollout is paused: resume or rollback starts it)");
        }
        self.record(cx, msg);
    }

    /// Ends the rollout. Whatever is in flight is cancelled: late results are ignored.
    fn terminate(&mut self, phase: Phase, message: String, cx: &mut Ctx<'_>) {
        cx.cancelled.append(&mut self.in_flight);
        self.phase = phase;
        self.paused = false;
        self.awaiting_promotion = false;
        self.record(cx, message);
    }

    /// Takes every phase transition the state now calls for.
    fn advance(&mut self, cx: &mut Ctx<'_>) {
        // Each step moves strictly forward through the phases, so a handful always suffices.
        for _ in 0..Phase::ALL.len() {
            if !self.advance_once(cx) {
                return;
            }
        }
    }

    fn advance_once(&mut self, cx: &mut Ctx<'_>) -> bool {
        let target = self.spec.version;
        match self.phase {
            Phase::Preflight => {
                let waiting = self.nodes.iter().any(|n| n.step() == NodeStep::Pending)
                    || self
                        .in_flight
                        .iter()
                        .any(|a| a.kind == ActionKind::Preflight);
                if waiting {
                    return false;
                }
                let failures: Vec<String> = self
                    .nodes
                    .iter()
                    .filter(|n| n.step() == NodeStep::Failed)
                    .map(|n| {
                        format!(
                            "{}: {}",
                            n.id(),
                            n.progress.error.as_deref().unwrap_or("failed")
                        )
                    })
                    .collect();
                if !failures.is_empty() {
                    let msg = format!(
                        "preflight refused the rollout, nothing was touched: {}",
                        failures.join("; ")
                    );
                    self.error = Some(msg.clone());
                    self.terminate(Phase::Aborted, msg, cx);
                    return true;
                }
                let todo = self.targets();
                if todo.is_empty() {
                    let msg = self.nothing_to_do_message();
                    self.terminate(Phase::Succeeded, msg, cx);
                    return true;
                }
                self.phase = Phase::Staging;
                let msg = self.preflight_passed_message(&todo);
                self.record(cx, msg);
                true
            }
            Phase::Staging => {
                let targets = self.targets();
                if !targets.iter().all(|&i| self.ready(i)) {
                    return false;
                }
                self.phase = Phase::Upgrading;
                let canary = if self.spec.canary > 0 {
                    format!(
                        ", waiting for promote after the first {}",
                        (self.spec.canary as usize).min(targets.len())
                    )
                } else {
                    String::new()
                };
                let n = targets.len();
                let staged = targets
                    .iter()
                    .filter(|&&i| self.nodes[i].route == Route::Stage)
                    .count();
                let ready = if staged == n {
                    format!("all {n} node{} staged", plural(n))
                } else {
                    format!(
                        "all {n} node{} ready ({staged} staged, {} already had {target})",
                        plural(n),
                        n - staged
                    )
                };
                let msg = format!(
                    "{ready}; upgrading {} at a time{canary}",
                    self.spec.batch_size
                );
                self.record(cx, msg);
                true
            }
            Phase::Upgrading => {
                let targets = self.targets();
                if self.canary_pending() {
                    let canary = (self.spec.canary as usize).min(targets.len());
                    let head = &targets[..canary];
                    if self.awaiting_promotion || !head.iter().all(|&i| self.upgraded(i)) {
                        return false;
                    }
                    self.awaiting_promotion = true;
                    let ids = join_ids(head.iter().map(|&i| self.nodes[i].id()));
                    self.record(
                        cx,
                        format!(
                            "canary {ids} upgraded and healthy on {target}; waiting for promote"
                        ),
                    );
                    return true;
                }
                if !targets.iter().all(|&i| self.upgraded(i)) {
                    return false;
                }
                let n = targets.len();
                let to_commit = targets
                    .iter()
                    .filter(|&&i| self.nodes[i].step() == NodeStep::Upgraded)
                    .count();
                if self.spec.permanent && to_commit > 0 {
                    self.phase = Phase::Committing;
                    let msg = if to_commit == n {
                        format!(
                            "all {n} node{} upgraded and healthy; making {target} permanent",
                            plural(n)
                        )
                    } else {
                        format!(
                            "all {n} node{} upgraded and healthy; making {target} permanent on {to_commit} ({} already run it permanently)",
                            plural(n),
                            n - to_commit
                        )
                    };
                    self.record(cx, msg);
                } else {
                    let msg = self.success_message();
                    self.terminate(Phase::Succeeded, msg, cx);
                }
                true
            }
            Phase::Committing => {
                let targets = self.targets();
                if !targets
                    .iter()
                    .all(|&i| self.nodes[i].step() == NodeStep::Committed)
                {
                    return false;
                }
                let msg = self.success_message();
                self.terminate(Phase::Succeeded, msg, cx);
                true
            }
            Phase::RollingBack => {
                let order = self.rollback_order();
                if order.is_empty() {
                    // The steps that touched nodes were all refused after the rollback began
                    // (it waits for steps in flight): no node changed, nothing to undo.
                    self.terminate(
                        Phase::Aborted,
                        "no node was changed after all (their agents refused the steps in flight), so there is nothing to roll back: rollout aborted".to_string(),
                        cx,
                    );
                    return true;
                }
                let done = |&i: &usize| {
                    matches!(
                        self.nodes[i].step(),
                        NodeStep::RolledBack | NodeStep::RollbackFailed
                    )
                };
                if !order.iter().all(done) {
                    return false;
                }
                let failed: Vec<String> = order
                    .iter()
                    .filter(|&&i| self.nodes[i].step() == NodeStep::RollbackFailed)
                    .map(|&i| {
                        let n = &self.nodes[i];
                        format!(
                            "{} ({})",
                            n.id(),
                            n.progress.error.as_deref().unwrap_or("failed")
                        )
                    })
                    .collect();
                if failed.is_empty() {
                    let n = order.len();
                    self.terminate(
                        Phase::RolledBack,
                        format!(
                            "all {n} touched node{} rolled back to their previous version and healthy",
                            plural(n)
                        ),
                        cx,
                    );
                } else {
                    let msg = format!(
                        "rollback failed on {}: {} need{} a person",
                        failed.join(", "),
                        if failed.len() == 1 {
                            "this node"
                        } else {
                            "these nodes"
                        },
                        if failed.len() == 1 { "s" } else { "" }
                    );
                    self.error = Some(match self.error.take() {
                        Some(cause) => format!("{cause}; {msg}"),
                        None => msg.clone(),
                    });
                    self.terminate(Phase::RollbackFailed, msg, cx);
                }
                true
            }
            _ => false,
        }
    }

    /// How many nodes ended (or start) in each way, for the summaries.
    fn tally(&self) -> Tally {
        let mut t = Tally::default();
        for n in &self.nodes {
            match n.step() {
                NodeStep::Committed if n.route == Route::SwitchBack => t.switched_back += 1,
                NodeStep::Committed => t.committed += 1,
                NodeStep::Upgraded => t.not_permanent += 1,
                NodeStep::Skipped => match n.start {
                    Some(Start { current: None, .. }) => t.had_permanent += 1,
                    Some(_) => t.had_current += 1,
                    None => t.had_unknown += 1,
                },
                // Not at a successful end: nothing to count.
                _ => {}
            }
        }
        t
    }

    /// The event that ends preflight when nodes need work: how many and what each needs.
    fn preflight_passed_message(&self, todo: &[usize]) -> String {
        let target = self.spec.version;
        let count = |r: Route| todo.iter().filter(|&&i| self.nodes[i].route == r).count();
        let n = todo.len();
        let (stage, install, adopt, switch) = (
            count(Route::Stage),
            count(Route::Install),
            count(Route::Adopt),
            count(Route::SwitchBack),
        );
        let mut what = if stage == n {
            format!("{n} node{} to upgrade", plural(n))
        } else {
            let parts: Vec<String> = [
                (stage, "to stage and install"),
                (install, "to install from their disk"),
                (adopt, "already running it, to gate and make permanent"),
                (switch, "to switch back to it with a downgrade"),
            ]
            .into_iter()
            .filter(|(k, _)| *k > 0)
            .map(|(k, s)| format!("{k} {s}"))
            .collect();
            format!(
                "{n} node{} to move to {target} ({})",
                plural(n),
                parts.join(", ")
            )
        };
        let t = self.tally();
        let skipped = t.had_permanent + t.had_current + t.had_unknown;
        if skipped > 0 {
            what.push_str(&format!(" ({skipped} already on {target}, skipped)"));
        }
        if stage > 0 {
            format!(
                "preflight passed: {what}; staging {target}, {} at a time",
                self.spec.max_parallel_staging
            )
        } else {
            format!("preflight passed: {what}; nothing to stage")
        }
    }

    /// The final event when preflight found nothing to do. True of every node.
    fn nothing_to_do_message(&self) -> String {
        let target = self.spec.version;
        let t = self.tally();
        if t.had_unknown == self.nodes.len() {
            // Answers without release lists: whether permanently is not known.
            return format!("every node already runs {target}: nothing to do");
        }
        if t.had_permanent == self.nodes.len() {
            return format!("every node already runs {target} permanently: nothing to do");
        }
        let parts: Vec<String> = [
            (t.had_permanent, "permanently"),
            (
                t.had_current,
                "not permanently, where a rollout without making it permanent leaves it",
            ),
            (t.had_unknown, "not known whether permanently"),
        ]
        .into_iter()
        .filter(|(k, _)| *k > 0)
        .map(|(k, s)| format!("{k} {s}"))
        .collect();
        format!(
            "every node already runs {target} ({}): nothing to do",
            parts.join("; ")
        )
    }

    /// The final event of a successful rollout: true of every node, saying how each got there.
    fn success_message(&self) -> String {
        let target = self.spec.version;
        let t = self.tally();
        let total = self.nodes.len();
        let everyone_permanent = t.not_permanent == 0 && t.had_current == 0 && t.had_unknown == 0;
        if everyone_permanent {
            let mut msg = format!("all {total} node{} run {target} permanently", plural(total));
            if t.committed != total {
                let parts: Vec<String> = [
                    (t.committed, "made permanent by this rollout"),
                    (t.switched_back, "switched back to it with a downgrade"),
                    (t.had_permanent, "already did: skipped"),
                ]
                .into_iter()
                .filter(|(k, _)| *k > 0)
                .map(|(k, s)| format!("{k} {s}"))
                .collect();
                msg.push_str(&format!(" ({})", parts.join(", ")));
            }
            return msg;
        }
        let parts: Vec<String> = [
            (
                t.committed,
                "made permanent by this rollout".to_string(),
            ),
            (
                t.not_permanent,
                "healthy, not made permanent (no-permanent): a restart boots their previous release"
                    .to_string(),
            ),
            (
                t.had_current,
                "already ran it without it being permanent: skipped".to_string(),
            ),
            (
                t.switched_back,
                "switched back to it with a downgrade, which made it permanent".to_string(),
            ),
            (t.had_permanent, "already ran it permanently: skipped".to_string()),
            (
                t.had_unknown,
                "already ran it (their preflight did not list releases, so whether permanently is not known): skipped".to_string(),
            ),
        ]
        .into_iter()
        .filter(|(k, _)| *k > 0)
        .map(|(k, s)| format!("{k} {s}"))
        .collect();
        format!(
            "all {total} node{} run {target}: {}",
            plural(total),
            parts.join("; ")
        )
    }

    fn on_command(&mut self, command: Command, cx: &mut Ctx<'_>) -> Result<Outcome, Rejected> {
        if self.phase.is_terminal() {
            return Err(Rejected::Ended {
                command,
                id: self.spec.id.clone(),
                phase: self.phase,
            });
        }
        let by = cx.by.to_string();
        match command {
            Command::Pause => {
                if self.paused {
                    return Err(Rejected::AlreadyPaused);
                }
                self.paused = true;
                let n = self.in_flight.len();
                self.record(
                    cx,
                    format!(
                        "paused by {by} during {}: no new action starts; {n} in flight finish and are recorded; resume continues",
                        self.phase
                    ),
                );
            }
            Command::Resume => {
                if !self.paused {
                    return Err(Rejected::NotPaused {
                        phase: self.phase(),
                    });
                }
                self.paused = false;
                let mut retried = Vec::new();
                if matches!(
                    self.phase,
                    Phase::Staging | Phase::Upgrading | Phase::Committing
                ) {
                    for n in &mut self.nodes {
                        if n.progress.step == NodeStep::Failed
                            && let Some(r) = n.retry.take()
                        {
                            n.progress.step = r.step_before();
                            n.progress.error = None;
                            n.refused = false;
                            retried.push(format!("{} ({})", n.id(), r.name()));
                        }
                    }
                    // The failure that paused the rollout is being retried: no longer current.
                    self.error = None;
                }
                let msg = if retried.is_empty() {
                    format!("resumed by {by}: continuing {}", self.phase)
                } else {
                    format!(
                        "resumed by {by}: continuing {}, retrying {}",
                        self.phase,
                        retried.join(", ")
                    )
                };
                self.record(cx, msg);
                self.advance(cx);
            }
            Command::Abort => {
                self.error.get_or_insert(format!("aborted by {by}"));
                let left = self.describe_nodes_left();
                self.terminate(
                    Phase::Aborted,
                    format!("aborted by {by}; nodes are left as they are: {left}"),
                    cx,
                );
            }
            Command::Rollback => {
                if self.phase == Phase::RollingBack {
                    if !self.paused {
                        return Err(Rejected::AlreadyRollingBack);
                    }
                    self.paused = false;
                    self.record(
                        cx,
                        format!("rollback requested by {by}: continuing the paused rollback"),
                    );
                } else {
                    self.paused = false;
                    self.start_rollback(format!("rollback requested by {by}"), cx);
                    self.advance(cx);
                }
            }
            Command::Promote => {
                if !self.awaiting_promotion {
                    return Err(Rejected::NotAwaitingPromotion);
                }
                self.awaiting_promotion = false;
                self.promoted = true;
                let rest = self
                    .targets()
                    .len()
                    .saturating_sub(self.spec.canary as usize);
                self.record(
                    cx,
                    format!(
                        "canary promoted by {by}: continuing with the remaining {rest} node{}",
                        plural(rest)
                    ),
                );
                self.advance(cx);
            }
        }
        Ok(Outcome::Applied {
            phase: self.phase(),
            issued: Vec::new(),
            cancelled: std::mem::take(&mut cx.cancelled),
        })
    }

    /// For the abort event: what each node runs now, grouped, so the operator knows what to check.
    fn describe_nodes_left(&self) -> String {
        let target = self.spec.version;
        let mut groups: Vec<(String, Vec<&NodeId>)> = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let in_flight = self
                .in_flight
                .iter()
                .find(|a| &a.node == n.id() && a.kind.changes_node());
            let desc = if let Some(a) = in_flight {
                format!("{} was in flight, outcome unknown (check the node)", a.kind)
            } else {
                let (program, back_to) = self.undo_program(i);
                let back =
                    back_to.map_or_else(|| "its previous version".to_string(), |v| v.to_string());
                // After a switch back the target is permanent already.
                let how = if n.route == Route::SwitchBack {
                    "permanently"
                } else {
                    "not permanent"
                };
                let unless_refused = |what: &str, otherwise: String| {
                    if n.refused {
                        format!("untouched ({what} refused)")
                    } else {
                        otherwise
                    }
                };
                match n.step() {
                    NodeStep::Pending
                    | NodeStep::PreflightOk
                    | NodeStep::Skipped
                    | NodeStep::Staging
                    | NodeStep::Staged => "untouched".to_string(),
                    NodeStep::Installing | NodeStep::Committing => {
                        "outcome of the last step unknown (check the node)".to_string()
                    }
                    NodeStep::Installed | NodeStep::Verifying => {
                        format!("run {target}, {how}, health not confirmed")
                    }
                    NodeStep::Upgraded => format!("run {target}, not permanent"),
                    NodeStep::Committed => format!("run {target} permanently"),
                    NodeStep::Failed => match n.retry {
                        Some(Retry::Stage) | None => "untouched".to_string(),
                        Some(Retry::Install) => unless_refused(
                            "install",
                            "install failed, state unknown (check the node)".to_string(),
                        ),
                        Some(Retry::SwitchBack) => unless_refused(
                            "downgrade",
                            format!("downgrade to {target} failed, state unknown (check the node)"),
                        ),
                        Some(Retry::HealthGate) => format!("run {target}, {how}, unhealthy"),
                        Some(Retry::Commit) if n.refused => {
                            format!("run {target}, not permanent (commit refused)")
                        }
                        Some(Retry::Commit) => {
                            format!("run {target}, not permanent (commit failed)")
                        }
                    },
                    NodeStep::RollingBack if n.downgraded => {
                        format!("back on {back}, health not confirmed")
                    }
                    NodeStep::RollingBack if n.undone > 0 => {
                        let on = program
                            .get(usize::from(n.undone) - 1)
                            .map_or_else(|| "?".to_string(), |k| k.to_string());
                        format!("rolled back part way (did: {on}), not yet back on {back}")
                    }
                    NodeStep::RollingBack => format!("run {target}, not rolled back"),
                    NodeStep::RolledBack => format!("back on {back}"),
                    NodeStep::RollbackFailed => "rollback failed, needs a person".to_string(),
                }
            };
            match groups.iter_mut().find(|(d, _)| *d == desc) {
                Some((_, ids)) => ids.push(n.id()),
                None => groups.push((desc, vec![n.id()])),
            }
        }
        groups
            .into_iter()
            .map(|(desc, ids)| format!("{}: {desc}", join_ids(ids)))
            .collect::<Vec<_>>()
            .join("; ")
    }
}
