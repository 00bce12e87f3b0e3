//! The [`Rollout`] state machine. See the crate docs for the protocol and the semantics.

use orch_types::rollout::{
    AuditEvent, NodeProgress, NodeStep, OnFailure, Phase, RolloutSpec, RolloutStatus, SpecError,
};
use orch_types::{NodeId, Version};
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
}

impl Retry {
    fn name(self) -> &'static str {
        match self {
            Retry::Stage => "stage",
            Retry::Install => "install",
            Retry::HealthGate => "health gate",
            Retry::Commit => "commit",
        }
    }

    /// The step a node goes back to so that the next `IssueActions` re-issues the failed action.
    fn step_before(self) -> NodeStep {
        match self {
            Retry::Stage => NodeStep::PreflightOk,
            Retry::Install => NodeStep::Staged,
            Retry::HealthGate => NodeStep::Installed,
            Retry::Commit => NodeStep::Upgraded,
        }
    }
}

/// One node: what `status` shows, plus the bookkeeping the machine needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct NodeState {
    progress: NodeProgress,
    /// Seq of the first `Install` issued to this node. `Some` means the node is *touched*: an
    /// install was attempted, so a rollback must downgrade it. Rollback goes in decreasing order
    /// of this seq, which is the reverse of the install order.
    install_seq: Option<u64>,
    /// What failed last, so `resume` knows what to retry.
    retry: Option<Retry>,
    /// During rollback: the downgrade succeeded and its health gate is next.
    downgraded: bool,
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

impl Rollout {
    /// A new rollout in phase `pending`. Refuses a spec that does not validate.
    pub fn new(spec: RolloutSpec) -> Result<Rollout, SpecError> {
        spec.validate()?;
        let nodes = spec
            .nodes
            .iter()
            .map(|id| NodeState {
                progress: NodeProgress::new(id.clone()),
                install_seq: None,
                retry: None,
                downgraded: false,
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

    /// Nodes where an install was attempted, in install order (rollback goes the other way).
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

    /// Touched nodes, newest install first.
    fn rollback_order(&self) -> Vec<usize> {
        let mut v: Vec<(u64, usize)> = self
            .nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| n.install_seq.map(|s| (s, i)))
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
        let Some((after_canary, batch)) = batches.iter().find(|(_, b)| {
            b.iter()
                .any(|&i| self.nodes[i].step() != NodeStep::Upgraded)
        }) else {
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
                NodeStep::Staged => Some((i, ActionKind::Install { version: target })),
                NodeStep::Installed => Some((i, self.gate(target))),
                _ => None,
            })
            .collect()
    }

    fn plan_rollback(&self) -> Vec<(usize, ActionKind)> {
        // Strictly one node at a time, newest install first: the next node waits until the
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
        let Some(from) = n.progress.from_version else {
            // start_rollback marks such nodes rollback_failed; nothing sensible to issue.
            return Vec::new();
        };
        if n.downgraded {
            vec![(i, self.gate(from))]
        } else {
            vec![(i, ActionKind::Downgrade { to: from })]
        }
    }

    fn gate(&self, expect: Version) -> ActionKind {
        ActionKind::HealthGate {
            min_healthy_time_ms: self.spec.min_healthy_time_ms,
            healthy_deadline_ms: self.spec.healthy_deadline_ms,
            expect,
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
        for (i, kind) in plan {
            let seq = self.next_seq;
            self.next_seq += 1;
            let node = &mut self.nodes[i];
            match &kind {
                ActionKind::Preflight => {}
                ActionKind::Stage { .. } => node.progress.step = NodeStep::Staging,
                ActionKind::Install { .. } => {
                    node.progress.step = NodeStep::Installing;
                    node.install_seq.get_or_insert(seq);
                }
                ActionKind::HealthGate { .. } => {
                    // A rollback gate leaves the node `rolling_back`.
                    if node.progress.step == NodeStep::Installed {
                        node.progress.step = NodeStep::Verifying;
                    }
                }
                ActionKind::Commit { .. } => node.progress.step = NodeStep::Committing,
                ActionKind::Downgrade { .. } => node.progress.step = NodeStep::RollingBack,
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
            ActionResult::Preflight { running, free_disk } => {
                self.preflight_ok(i, *running, *free_disk, cx)
            }
            ActionResult::Done => self.action_done(i, &action, cx),
            ActionResult::Failed { error } => self.action_failed(i, &action, &clip(error), cx),
        }
        self.advance(cx);
        Ok(Outcome::Applied {
            phase: self.phase(),
            issued: Vec::new(),
            cancelled: std::mem::take(&mut cx.cancelled),
        })
    }

    fn preflight_ok(&mut self, i: usize, running: Version, free_disk: u64, cx: &mut Ctx<'_>) {
        let target = self.spec.version;
        let need = self.required_free_disk();
        let node = &mut self.nodes[i];
        node.progress.from_version = Some(running);
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

    fn preflight_failed(&mut self, i: usize, msg: String, cx: &mut Ctx<'_>) {
        let node = &mut self.nodes[i];
        node.progress.step = NodeStep::Failed;
        node.progress.error = Some(msg.clone());
        let id = node.id().clone();
        self.record(cx, format!("{id}: {msg}"));
    }

    fn action_done(&mut self, i: usize, action: &Action, cx: &mut Ctx<'_>) {
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
            ActionKind::HealthGate { expect, .. } => {
                if node.downgraded && node.progress.step == NodeStep::RollingBack {
                    node.progress.step = NodeStep::RolledBack;
                    format!("{id}: rolled back to {expect} and healthy")
                } else {
                    node.progress.step = NodeStep::Upgraded;
                    format!("{id}: healthy on {expect}")
                }
            }
            ActionKind::Commit { version } => {
                node.progress.step = NodeStep::Committed;
                format!("{id}: {version} is permanent")
            }
            ActionKind::Downgrade { to } => {
                node.downgraded = true;
                format!("{id}: downgraded to {to}")
            }
        };
        self.record(cx, msg);
    }

    fn action_failed(&mut self, i: usize, action: &Action, error: &str, cx: &mut Ctx<'_>) {
        let error = if error.trim().is_empty() {
            "no detail given"
        } else {
            error
        };
        match &action.kind {
            ActionKind::Preflight => {
                self.preflight_failed(i, format!("preflight failed: {error}"), cx);
            }
            ActionKind::Stage { version } => {
                self.node_failed(
                    i,
                    Retry::Stage,
                    format!("staging {version} failed: {error}"),
                    cx,
                );
            }
            ActionKind::Install { version } => {
                self.node_failed(
                    i,
                    Retry::Install,
                    format!("install of {version} failed: {error}"),
                    cx,
                );
            }
            ActionKind::HealthGate { expect, .. } => {
                let n = &self.nodes[i];
                if n.downgraded && n.step() == NodeStep::RollingBack {
                    self.rollback_failed(
                        i,
                        format!("health gate on {expect} after downgrade failed: {error}"),
                        cx,
                    );
                } else {
                    self.node_failed(
                        i,
                        Retry::HealthGate,
                        format!("health gate on {expect} failed: {error}"),
                        cx,
                    );
                }
            }
            ActionKind::Commit { version } => {
                self.node_failed(
                    i,
                    Retry::Commit,
                    format!("making {version} permanent failed: {error}"),
                    cx,
                );
            }
            ActionKind::Downgrade { to } => {
                self.rollback_failed(i, format!("downgrade to {to} failed: {error}"), cx);
            }
        }
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
            if self.nodes[j].progress.from_version.is_none() {
                // Cannot happen (install needs a preflight), but never guess a version to run.
                self.rollback_failed(
                    j,
                    "previous version unknown, cannot downgrade".to_string(),
                    cx,
                );
            }
        }
        self.phase = Phase::RollingBack;
        let ids: Vec<&NodeId> = order.iter().map(|&j| self.nodes[j].id()).collect();
        let mut msg = format!(
            "{cause}; rolling back {} touched node{} one at a time, newest install first: {}",
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
                let todo = self.targets().len();
                let skipped = self.nodes.len() - todo;
                if todo == 0 {
                    self.terminate(
                        Phase::Succeeded,
                        format!("every node already runs {target}: nothing to do"),
                        cx,
                    );
                    return true;
                }
                self.phase = Phase::Staging;
                let skipped = if skipped > 0 {
                    format!(" ({skipped} already on {target}, skipped)")
                } else {
                    String::new()
                };
                let msg = format!(
                    "preflight passed: {todo} node{} to upgrade{skipped}; staging {target}, {} at a time",
                    plural(todo),
                    self.spec.max_parallel_staging
                );
                self.record(cx, msg);
                true
            }
            Phase::Staging => {
                let targets = self.targets();
                if !targets
                    .iter()
                    .all(|&i| self.nodes[i].step() == NodeStep::Staged)
                {
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
                let msg = format!(
                    "all {} node{} staged; upgrading {} at a time{canary}",
                    targets.len(),
                    plural(targets.len()),
                    self.spec.batch_size
                );
                self.record(cx, msg);
                true
            }
            Phase::Upgrading => {
                let targets = self.targets();
                let upgraded = |i: &usize| self.nodes[*i].step() == NodeStep::Upgraded;
                if self.canary_pending() {
                    let canary = (self.spec.canary as usize).min(targets.len());
                    let head = &targets[..canary];
                    if self.awaiting_promotion || !head.iter().all(upgraded) {
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
                if !targets.iter().all(upgraded) {
                    return false;
                }
                let n = targets.len();
                if self.spec.permanent {
                    self.phase = Phase::Committing;
                    self.record(
                        cx,
                        format!(
                            "all {n} node{} upgraded and healthy; making {target} permanent",
                            plural(n)
                        ),
                    );
                } else {
                    self.terminate(
                        Phase::Succeeded,
                        format!(
                            "all {n} node{} run {target} and are healthy; not made permanent (no-permanent): a restart boots the previous release",
                            plural(n)
                        ),
                        cx,
                    );
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
                let n = targets.len();
                self.terminate(
                    Phase::Succeeded,
                    format!("all {n} node{} run {target} permanently", plural(n)),
                    cx,
                );
                true
            }
            Phase::RollingBack => {
                let order = self.rollback_order();
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
        for n in &self.nodes {
            let in_flight = self
                .in_flight
                .iter()
                .find(|a| &a.node == n.id() && a.kind.changes_node());
            let desc = if let Some(a) = in_flight {
                format!("{} was in flight, outcome unknown (check the node)", a.kind)
            } else {
                let from = n
                    .progress
                    .from_version
                    .map_or_else(|| "its previous version".to_string(), |v| v.to_string());
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
                        format!("run {target}, not permanent, health not confirmed")
                    }
                    NodeStep::Upgraded => format!("run {target}, not permanent"),
                    NodeStep::Committed => format!("run {target} permanently"),
                    NodeStep::Failed => match n.retry {
                        Some(Retry::Stage) | None => "untouched".to_string(),
                        Some(Retry::Install) => {
                            "install failed, state unknown (check the node)".to_string()
                        }
                        Some(Retry::HealthGate) => {
                            format!("run {target}, not permanent, unhealthy")
                        }
                        Some(Retry::Commit) => {
                            format!("run {target}, not permanent (commit failed)")
                        }
                    },
                    NodeStep::RollingBack if n.downgraded => {
                        format!("back on {from}, health not confirmed")
                    }
                    NodeStep::RollingBack => format!("run {target}, not rolled back"),
                    NodeStep::RolledBack => format!("back on {from}"),
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
