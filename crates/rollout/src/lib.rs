//! The rollout state machine: spec + events -> phase, per-node progress and the next actions.
//!
//! This crate decides *what* a cluster-wide hot upgrade does next and records *what happened*;
//! it performs nothing. No I/O, no clock, no async, no openraft: the coordinator's driver does
//! the agent calls and the Raft log makes every decision durable. Because [`Rollout::apply`] is a
//! pure function of the state and the event, every coordinator that applies the same log holds
//! the same rollout, and a new leader continues exactly where the old one stopped.
//!
//! # Protocol
//!
//! Every change is an [`Event`], proposed to Raft and applied on every coordinator with
//! [`Rollout::apply`]`(event, at_ms, by)`. `at_ms` (the proposer's clock) and `by` (an operator
//! identity, or the driving coordinator) only go into the audit trail. The driver, on the leader:
//!
//! 1. Reads [`Rollout::next_actions`]. If it is not empty, proposes [`Event::IssueActions`]. That
//!    event carries no data: applying it recomputes the same actions from the state, assigns
//!    their `seq`s (unique, strictly increasing, starting at 1) and records them in flight, so a
//!    stale or repeated `IssueActions` can never start anything the state does not call for.
//! 2. Once the entry is committed, performs the actions in [`Outcome::issued`] (equivalently,
//!    [`Rollout::in_flight`]). Every agent call carries the fence `(cluster id, term, rollout
//!    id, seq)`.
//! 3. Proposes each result as [`Event::Result`]` { seq, result }`. A result for a seq that is not
//!    in flight (never issued, already answered, cancelled) is [`Outcome::Ignored`] and changes
//!    nothing, so duplicates and stragglers from a deposed leader are harmless. A result whose
//!    shape does not fit the action (a `Done` for a preflight) is [`Rejected`].
//! 4. Stops whatever [`Outcome::cancelled`] lists (a health gate nobody needs any more).
//! 5. Loops. Operator commands arrive as [`Event::Command`] through the same log.
//!
//! The coordinator applies driver entries with [`Rollout::apply_in_term`], naming the Raft term
//! of the driver that recorded them: the rollout keeps the newest such term, and a result
//! recorded under an older one (by a deposed driver) is ignored. A new driver's first entry, an
//! `IssueActions`, claims the rollout for its term before it performs anything.
//!
//! ```
//! use orch_rollout::{ActionKind, ActionResult, Event, Rollout};
//! use orch_types::rollout::{Phase, RolloutSpec};
//! use orch_types::{ReleaseState, VersionEntry};
//!
//! let nodes = vec!["n1".parse()?, "n2".parse()?];
//! let mut rollout = Rollout::new(RolloutSpec::new("r1", "4.2.1".parse()?, nodes, "alice"))?;
//! let mut now_ms = 0;
//! while !rollout.is_finished() {
//!     now_ms += 1;
//!     if !rollout.next_actions().is_empty() {
//!         // In the coordinator, every `apply` is a committed Raft entry applied everywhere.
//!         rollout.apply(&Event::IssueActions, now_ms, "coordinator-1")?;
//!     }
//!     for action in rollout.in_flight().to_vec() {
//!         // ... perform `action` on its node's agent, fenced with `action.seq` ...
//!         let result = match action.kind {
//!             ActionKind::Preflight => ActionResult::Preflight {
//!                 running: "4.2.0".parse()?,
//!                 free_disk: 1 << 30,
//!                 releases: vec![VersionEntry {
//!                     version: "4.2.0".parse()?,
//!                     state: ReleaseState::Permanent,
//!                 }],
//!             },
//!             _ => ActionResult::Done,
//!         };
//!         rollout.apply(&Event::Result { seq: action.seq, result }, now_ms, "coordinator-1")?;
//!     }
//! }
//! assert_eq!(rollout.phase(), Phase::Succeeded);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! A driver taking over after a failover re-performs [`Rollout::in_flight`] (agent calls are
//! idempotent; health gates restart from zero) or reports what the agent says happened.
//! Transient errors are the driver's to retry; a `Failed` result means "this step failed" (it may
//! or may not have changed the node), a `Refused` result "the agent refused it, nothing changed".
//! `Err(Rejected)` always leaves the state untouched, so replaying a log that contains rejected
//! entries ([`Rollout::replay`]) gives the same state.
//!
//! # Plans
//!
//! [`plan`]`(spec, answers)` runs a new rollout through its preflight on the given answers and
//! reads back what it would do: every node's action (stage, install, adopt, switch back, skip,
//! or refused, with preflight's own sentence), the upgrade batches with the canary, and the
//! refusal, if any. It is the machine's own planning, so a dry run shows exactly what a real
//! rollout given the same answers does, and a coordinator can refuse a rollout before
//! recording it.
//!
//! # Replay
//!
//! A rollout records its own inputs: every event that changed it, with the time, the caller
//! and the driver term it was applied with ([`Rollout::inputs`], an [`Input`] each). Events that
//! changed nothing (rejected, or ignored without claiming the rollout for a newer term) are not
//! kept, so the record grows with the rollout's progress, not with its driver's retries. The
//! audit trail is rendered from these inputs as they are applied, and [`replay`]`(spec, inputs)`
//! rebuilds the identical rollout, audit trail included, anywhere.
//!
//! # Semantics
//!
//! - **pending**: accepted, not started. The first `IssueActions` moves it to preflight.
//! - **preflight** (touches nothing): every node is asked its running version, its releases and
//!   free disk, all at once, and each node is planned from its releases (T is the target; see
//!   the table below). A hop that is not patch-level (same `major.minor`), less than
//!   [`DISK_HEADROOM_FACTOR`] x the package size free on a node that needs the package, a
//!   release list that does not add up, or a failed preflight refuses the whole rollout: once
//!   every answer is in, it ends `aborted` with an error naming each failing node and why (both
//!   versions for a bad hop). All nodes skipped: `succeeded` at once. A lower patch version is a
//!   valid target (it is how a committed release is taken back).
//!
//!   | the node has                               | forward                                   | rollback (once touched)               |
//!   |--------------------------------------------|-------------------------------------------|---------------------------------------|
//!   | no T (R permanent)                         | stage, install T, gate, commit            | downgrade R, gate                     |
//!   | T `unpacked` or `old` (R permanent)        | install T, gate, commit (nothing to stage)| downgrade R, gate                     |
//!   | no T / T on disk, C `current` over P       | (as above)                                | install C (after downgrade P if a commit was attempted), gate |
//!   | T `current` over P                         | gate, commit (skipped with `--no-permanent`) | downgrade P, gate                  |
//!   | T `permanent`, nothing current             | skipped                                   | -                                     |
//!   | T `permanent`, C `current`                 | downgrade T (it stays permanent), gate    | install C, gate                       |
//!
//!   Without a release list (older drivers), a node is planned from its running version alone:
//!   skipped when it runs T, else staged and installed, and rolled back by a downgrade to it.
//! - **staging**: stage (push + unpack) every node whose plan starts with it, at most
//!   `spec.max_parallel_staging` at a time. Unpacking does not touch the running service.
//! - **upgrading**: non-skipped nodes in spec order, in batches of `batch_size`: the switch to
//!   the target (`Install`, or `Downgrade` when the target is the node's permanent release;
//!   nothing for a node already running it), then a `HealthGate` expecting the target. The next
//!   batch starts once every node of the current one is healthy, so at most `batch_size` nodes
//!   are switching or verifying at once. With a canary of N, the first N non-skipped nodes form
//!   their own batch(es) (chunked by `batch_size`; no batch straddles the boundary); when they
//!   are healthy the phase stays `upgrading` with [`Rollout::awaiting_promotion`] set, until
//!   `promote`. If the canary covers every node, the wait comes before committing.
//! - **baking** (with `bake_ms > 0`, `--bake`, or with `permanent: false`): every non-skipped
//!   node gets a second `HealthGate` at once, expecting the target. With a bake it must stay
//!   healthy for `bake_ms` and one probe answered unhealthy fails it (failure threshold 1);
//!   the deadline is the bake plus `healthy_deadline_ms`. Without a bake (`--no-permanent`
//!   alone) it is a final check, one healthy probe with the spec's failure threshold: a
//!   rollout that does not commit would otherwise end `succeeded` with a node that restarted
//!   after its gate back on its permanent release (a rebooted node boots it). A failure here
//!   is a node failure like any other (`on_failure`): the target is still only `current`, so
//!   a rollback is the usual one.
//! - **committing**: `Commit` every upgraded node whose target is not permanent yet (bounded like
//!   staging). With `permanent: false` (`--no-permanent`) there is no committing: `succeeded`
//!   right after the final check. The final event says how every node runs the target: made
//!   permanent, switched back to it, or already running it (skipped).
//! - **pruning** (only with `keep_releases: Some(N)`, `--keep-releases`): once every target is
//!   committed (or, with `--no-permanent`, upgraded), every node the rollout upgraded gets a
//!   `Prune` (bounded like staging): the driver uninstalls the releases beyond the newest N
//!   that [`prune_candidates`] picks, never the current or permanent one nor the ones in
//!   `protect` (the target, and what the node ran and booted before: where a rollback would
//!   take it). Each answer is an audit event (`n1: pruned 4.1.9 (keeping the newest 3
//!   releases)`); a failure is reported and never fails the rollout. Then `succeeded`. Skipped
//!   nodes are not pruned, and a rollout that skipped every node has nothing to prune.
//! - **failure** of a stage, install, health gate or commit applies `spec.on_failure`:
//!   - `rollback`: enter **rolling_back**. Every *touched* node (a step that changes what it
//!     runs or boots was attempted on it and not refused, including the one that failed, even if
//!     it was already committed) is put back with the undo steps of the table above, most
//!     recently touched first, one node at a time, each followed by a health gate on the release
//!     it is back on. Every undo step holds or is valid whatever a failed step left, and none
//!     targets a release the node is known to run. In-flight health gates and stages are
//!     cancelled; an install, downgrade or commit in flight is waited for before its node is
//!     undone. A failed undo step or gate marks that node `rollback_failed` and the rollback
//!     goes on with the others; the end is `rolled_back`, or `rollback_failed` with an error
//!     naming the nodes that need a person. `rollback` on a `rollback_failed` rollout (the
//!     only command a finished rollout takes) retries exactly the failed undo step or gate of
//!     each such node whose previous version is known, and ends again. If no node was touched (a staging failure, or a
//!     refused install), there is nothing to undo: `aborted`.
//!   - `pause`: enter **paused**; in-flight actions still complete and are recorded. `resume`
//!     retries exactly the failed step of each failed node (a failed health gate is re-run, not
//!     the install), `rollback` rolls back, `abort` stops.
//!   - A commit failure is treated like any other: the node is running the target but not
//!     permanently, so a reboot would split the cluster across versions. Rolling back (or pausing
//!     for a person) restores one version everywhere; the driver has already retried transient
//!     errors before reporting the failure.
//! - **pause** (any non-terminal phase, including rolling back): no new actions; results of
//!   in-flight actions are still applied and can move the phase underneath (shown by
//!   [`Rollout::working_phase`]); a failure while paused follows `on_failure` but nothing new
//!   starts before `resume` (with `rollback` the rollout stays paused, already set to roll back).
//!   If the last in-flight results finish the rollout (or preflight refuses it), the terminal
//!   phase wins over the pause. **resume** continues the working phase.
//! - **abort** (any non-terminal phase): `aborted` at once; in-flight actions are cancelled and
//!   nodes are left as they are; the audit event says, per node, what it runs now.
//! - **rollback** (any non-terminal phase except rolling back): as a failure with
//!   `on_failure: rollback`; unpauses. Before any install (pending, preflight, staging) there is
//!   nothing to undo: `aborted`. On a paused rollback it continues the rollback.
//! - **promote**: only while awaiting promotion.
//! - Commands on a terminal phase, and commands that make no sense now, are [`Rejected`] with a
//!   reason.
//! - **skipped** nodes are left alone entirely: they already are where the rollout would leave
//!   them (running the target permanently; with `--no-permanent`, running it at all). A node that
//!   runs the target without it being permanent is gated and committed with the others.
//! - A deposed leader's late entries are harmless: its `IssueActions` issues only what the state
//!   calls for (usually nothing), its results for actions already answered are ignored, and the
//!   agents' fences reject its calls.
//!
//! The serialized [`Rollout`] is trusted input: it only ever comes from this crate, through the
//! replicated state machine. What is untrusted (results and errors from drivers and agents,
//! caller identities) is validated or clipped ([`MAX_TEXT_CHARS`]) and never panics the machine.
//!
//! Every transition appends an [`orch_types::rollout::AuditEvent`] with a sentence an operator
//! can read, e.g. `n2: health gate on 4.2.1 failed: probe reported 4.2.0`.

mod machine;
mod protocol;
mod prune;

pub use machine::{
    DISK_HEADROOM_FACTOR, MAX_TEXT_CHARS, NodeAction, Plan, PlannedBatch, PlannedNode, Rollout,
    plan, replay,
};
pub use protocol::{
    Action, ActionKind, ActionResult, Command, Event, Input, LogEntry, Outcome, Rejected,
};
pub use prune::prune_candidates;
