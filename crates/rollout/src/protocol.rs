//! The vocabulary between the state machine and its driver: the actions it asks for, the events
//! it accepts, and what applying an event did.

use std::fmt;

use orch_types::rollout::Phase;
use orch_types::{NodeId, Version, VersionEntry};
use serde::{Deserialize, Serialize};

/// One thing the driver must do on one node. `seq` is unique within the rollout and increases
/// with every action issued: it is the third part of the agent fence `(term, rollout id, seq)` and
/// the key the result comes back with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Action {
    pub seq: u64,
    pub node: NodeId,
    pub kind: ActionKind,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} [seq {}]", self.node, self.kind, self.seq)
    }
}

/// What an [`Action`] does. Every kind is idempotent on the agent side (repeating a step whose
/// result already holds succeeds), which is what lets a new leader re-perform an in-flight action.
///
/// The same kind serves the forward path and the rollback: while the rollout is rolling back,
/// `Install` and `Downgrade` are undo steps (see the crate docs for which undoes what).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    /// Ask the agent its running version, its releases and free disk. Touches nothing. Answer
    /// with [`ActionResult::Preflight`] or [`ActionResult::Failed`].
    Preflight,
    /// Push the package (if the spec has one) and unpack `version`. The service is untouched.
    Stage { version: Version },
    /// Hot-install `version` without making it permanent (agent `Install`, `permanent: false`).
    /// Forward: the target. Rollback: the release that was `current` before the rollout.
    Install { version: Version },
    /// Probe the node with the driver's own clock: pass when the probe succeeds continuously for
    /// `min_healthy_time_ms` while reporting `expect`; fail once `failure_threshold` probes in a
    /// row were answered unhealthy (0: never), or if it has not passed within
    /// `healthy_deadline_ms` of the start. A probe the agent does not answer is no failed
    /// probe: only the deadline governs an unreachable agent.
    HealthGate {
        min_healthy_time_ms: u64,
        healthy_deadline_ms: u64,
        expect: Version,
        /// Absent in actions issued before it existed: 0, no threshold, as they were issued.
        #[serde(default)]
        failure_threshold: u32,
    },
    /// Make `version` permanent (agent `Permanent`).
    Commit { version: Version },
    /// Switch to `to` and make it permanent (agent `Downgrade`; `to` must be the node's
    /// permanent or an `old` release). Forward: to the target when it is the node's permanent
    /// release while another one runs. Rollback: back to the node's permanent release from
    /// before the rollout. Always followed by a health gate (possibly after another undo step).
    Downgrade { to: Version },
    /// Housekeeping after a successful rollout (`keep_releases`): uninstall the node's
    /// releases beyond the newest `keep`, never the current or permanent one nor one in
    /// `protect` (the target and what the node ran before: a rollback's destinations). The
    /// driver lists the node's releases, picks them with [`crate::prune_candidates`] and
    /// uninstalls each (fenced); answered with [`ActionResult::Pruned`] (or `Failed`).
    Prune { keep: u32, protect: Vec<Version> },
}

impl ActionKind {
    /// Short name, as in logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            ActionKind::Preflight => "preflight",
            ActionKind::Stage { .. } => "stage",
            ActionKind::Install { .. } => "install",
            ActionKind::HealthGate { .. } => "health_gate",
            ActionKind::Commit { .. } => "commit",
            ActionKind::Downgrade { .. } => "downgrade",
            ActionKind::Prune { .. } => "prune",
        }
    }

    /// Whether the action changes what the node runs (or boots). The machine never cancels these:
    /// their outcome must be known before the node is touched again.
    pub fn changes_node(&self) -> bool {
        matches!(
            self,
            ActionKind::Install { .. } | ActionKind::Commit { .. } | ActionKind::Downgrade { .. }
        )
    }
}

impl fmt::Display for ActionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ActionKind::Preflight => f.write_str("preflight"),
            ActionKind::Stage { version } => write!(f, "stage {version}"),
            ActionKind::Install { version } => write!(f, "install {version}"),
            ActionKind::HealthGate { expect, .. } => write!(f, "health gate on {expect}"),
            ActionKind::Commit { version } => write!(f, "make {version} permanent"),
            ActionKind::Downgrade { to } => write!(f, "downgrade to {to}"),
            ActionKind::Prune { keep, .. } => write!(f, "prune to the newest {keep} releases"),
        }
    }
}

/// How an action ended, as the driver reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionResult {
    /// A preflight answer (only valid for [`ActionKind::Preflight`]): the release the node's
    /// store says runs, its free disk, and its releases with their states. An empty list is an
    /// answer from a driver that did not send one (older log entries): the node is then
    /// planned from `running` alone, as before release lists existed.
    Preflight {
        running: Version,
        free_disk: u64,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        releases: Vec<VersionEntry>,
    },
    /// The action did what it says (for a health gate: the gate passed).
    Done,
    /// The action failed, after whatever retries of transient errors the driver does; `error`
    /// says why in words an operator can act on. Whether it changed the node is unknown.
    Failed { error: String },
    /// The agent refused the step before changing anything (its answer says nothing changed:
    /// a state rule, a deadline that passed, a package it would not take). Like `Failed`, but
    /// a refused install, commit or downgrade does not make its node *touched*, so a rollback
    /// leaves that node alone.
    Refused { error: String },
    /// A prune's answer (only valid for [`ActionKind::Prune`]): the releases uninstalled, and
    /// `VERSION: why` for each one that could not be.
    Pruned {
        removed: Vec<Version>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        failed: Vec<String>,
    },
}

/// An operator command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    Pause,
    Resume,
    Abort,
    Rollback,
    Promote,
}

impl Command {
    pub fn as_str(&self) -> &'static str {
        match self {
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::Abort => "abort",
            Command::Rollback => "rollback",
            Command::Promote => "promote",
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything that can change a rollout. Each one is a Raft entry; applying the same sequence to
/// the same spec gives the same state on every machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// The driver is about to perform [`crate::Rollout::next_actions`]: record them in flight
    /// (assigning their seqs). Carries no data because the actions follow from the state, so a
    /// stale or repeated `IssueActions` can never issue anything the state does not call for.
    IssueActions,
    /// The outcome of the in-flight action `seq`.
    Result { seq: u64, result: ActionResult },
    /// An operator command.
    Command(Command),
}

/// One replicated log entry: an event with the time the coordinator proposed it and who caused it
/// (an operator identity for commands, the driving coordinator for the rest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    pub event: Event,
    pub at_ms: u64,
    pub by: String,
}

/// One event as the machine applied it: the arguments of [`crate::Rollout::apply_in_term`]
/// (`term` 0: not a driver's entry, as with [`crate::Rollout::apply`]). A rollout keeps every
/// input that changed it ([`crate::Rollout::inputs`]), so [`crate::replay`] of its spec and
/// its inputs gives the same rollout, audit trail included: the prose is rendered from them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Input {
    pub event: Event,
    pub at_ms: u64,
    pub by: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub term: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What applying an event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The state changed.
    Applied {
        /// The phase afterwards.
        phase: Phase,
        /// Actions now in flight that the driver must perform (only `IssueActions` issues).
        issued: Vec<Action>,
        /// Actions that were in flight and no longer are, without a result: the driver should
        /// stop them (a running health gate, an unpack nobody needs); their results, if they
        /// still come, are ignored.
        cancelled: Vec<Action>,
    },
    /// A valid event that changed nothing: a result for an action that is not in flight (stale,
    /// duplicate, or cancelled), or `IssueActions` with nothing to issue.
    Ignored { reason: String },
}

impl Outcome {
    /// The actions issued by this event (empty unless it was `IssueActions`).
    pub fn issued(&self) -> &[Action] {
        match self {
            Outcome::Applied { issued, .. } => issued,
            Outcome::Ignored { .. } => &[],
        }
    }

    /// The actions cancelled by this event.
    pub fn cancelled(&self) -> &[Action] {
        match self {
            Outcome::Applied { cancelled, .. } => cancelled,
            Outcome::Ignored { .. } => &[],
        }
    }

    pub fn is_ignored(&self) -> bool {
        matches!(self, Outcome::Ignored { .. })
    }
}

/// Why an event was refused. A refused event leaves the state exactly as it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("cannot {command}: rollout {id} has already ended ({phase})")]
    Ended {
        command: Command,
        id: String,
        phase: Phase,
    },
    #[error("cannot pause: rollout is already paused")]
    AlreadyPaused,
    #[error("cannot resume: rollout is not paused (it is {phase})")]
    NotPaused { phase: Phase },
    #[error("cannot roll back: rollout is already rolling back")]
    AlreadyRollingBack,
    #[error("cannot promote: rollout is not waiting for canary promotion")]
    NotAwaitingPromotion,
    #[error("result for action {seq} ({kind} on {node}) does not fit it: {detail}")]
    MismatchedResult {
        seq: u64,
        node: NodeId,
        kind: &'static str,
        detail: &'static str,
    },
}
