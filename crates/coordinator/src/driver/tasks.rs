//! The driver's action tasks: one per in-flight action, which performs it on its node's agent
//! and records the result.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use orch_proto::agent as pb;
use orch_rollout::{Action, ActionKind, ActionResult};
use orch_types::{NodeId, RolloutId};
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::early::{lock, start_gate_early};
use super::record::{liveness_reporter, record, record_with};
use super::{ActiveView, PREFLIGHT_TIMEOUT, TaskCx, leads_in};
use crate::agents::{
    ActionCtx, Budgets, CallError, Performed, TargetGates, UNKNOWN_ACTIVATE_TIMEOUT, perform,
};
use crate::state::Command;

/// At most this many action tasks other than health gates run at once. Preflight puts every
/// node's action in flight together: at 1,000 nodes, a task each at once held ~23 MB of task
/// state plus a busy connection per agent on the leader, for calls that take milliseconds.
/// The rest wait in the machine's in-flight list and start as tasks finish (each result is an
/// applied entry, which re-syncs). Staging and committing are already 8 at a time.
pub(super) const STEP_TASKS: usize = crate::agents::CALLS_AT_ONCE;

/// The action tasks of the rollout being driven, by seq (seqs start again with each rollout).
#[derive(Default)]
pub(super) struct Tasks {
    rollout: Option<RolloutId>,
    /// The rollout's span: every step's span is its child, so each log line of a step names
    /// the rollout, the node and the fence.
    span: Option<tracing::Span>,
    slots: HashMap<u64, Slot>,
}

/// Starts a task for every in-flight action that has none, and forgets tasks whose action is
/// no longer in flight (cancelled by the machine) or whose result could not be recorded (it
/// is performed again).
pub(super) fn sync_tasks(cx: &TaskCx, tasks: &mut Tasks, r: &ActiveView) {
    if tasks.rollout != Some(r.id) {
        // Another rollout: none of the previous one's tasks or early probes apply to it.
        for (_, slot) in tasks.slots.drain() {
            if let Slot::Running { handle, .. } = slot {
                handle.abort();
            }
        }
        for (_, g) in lock(&cx.early).drain() {
            g.handle.abort();
        }
        tasks.rollout = Some(r.id);
        tasks.span = Some(tracing::info_span!("rollout", rollout = %r.id));
    }
    let parent = tasks.span.clone().unwrap_or_else(tracing::Span::none);
    let tasks = &mut tasks.slots;
    let in_flight = &r.in_flight;
    // A set: during preflight every node's action is in flight at once, and a scan of them
    // per task would cost nodes x nodes on every applied entry.
    let seqs: HashSet<u64> = in_flight.iter().map(|a| a.seq).collect();
    tasks.retain(|seq, slot| {
        if !seqs.contains(seq) {
            if let Slot::Running { handle, .. } = slot {
                handle.abort();
            }
            return false;
        }
        if let Slot::Running { handle, .. } = slot
            && handle.is_finished()
        {
            match futures::FutureExt::now_or_never(handle) {
                // Recorded: the state read above may predate it, so never re-run it.
                Some(Ok(Some(true))) => *slot = Slot::Recorded,
                _ => return false,
            }
        }
        true
    });
    // Early probes whose gate was never issued (the rollout went another way) are dropped.
    lock(&cx.early).retain(|seq, g| {
        let keep = *seq >= r.next_seq || seqs.contains(seq);
        if !keep {
            g.handle.abort();
        }
        keep
    });
    let running = tasks
        .values()
        .filter(|s| matches!(s, Slot::Running { gate: false, .. }))
        .count();
    for a in to_start(in_flight, running, |seq| tasks.contains_key(&seq)) {
        let gate = is_gate(a);
        // `fence` is the fence's step: with the term and the rollout it is what the agent checks.
        let span = tracing::info_span!(
            parent: &parent,
            "step",
            rollout = %r.id,
            node = %a.node,
            fence = a.seq,
            term = cx.term,
            kind = crate::metrics::kind_of(&a.kind),
        );
        let h = cx.scope.spawn(
            perform_and_record(cx.clone(), r.id, r.package.clone(), a.clone()).instrument(span),
        );
        tasks.insert(a.seq, Slot::Running { handle: h, gate });
    }
}

fn is_gate(a: &Action) -> bool {
    matches!(a.kind, ActionKind::HealthGate { .. })
}

/// The in-flight actions to start a task for, in order, given how many non-gate tasks run and
/// which actions have a task. Gates run as long as their policy says and must all run together
/// (a bake gates every node at once); the other steps are short calls, at most [`STEP_TASKS`]
/// at a time.
fn to_start(
    in_flight: &[Action],
    mut running: usize,
    has_task: impl Fn(u64) -> bool,
) -> Vec<&Action> {
    let mut out = Vec::new();
    for a in in_flight {
        if has_task(a.seq) {
            continue;
        }
        if !is_gate(a) {
            if running >= STEP_TASKS {
                continue;
            }
            running += 1;
        }
        out.push(a);
    }
    out
}

enum Slot {
    Running {
        handle: JoinHandle<Option<bool>>,
        gate: bool,
    },
    /// Finished and its result is in the log.
    Recorded,
}

/// What an action of `node` needs to reach its agent: its address and step budgets.
fn agent_of(cx: &TaskCx, rollout: RolloutId, node: &NodeId) -> Option<(String, Budgets)> {
    cx.shared.read(|s| {
        let preflight = s.rollouts.get(&rollout).map_or(PREFLIGHT_TIMEOUT, |r| {
            Duration::from_millis(r.spec().preflight_timeout_ms)
        });
        s.nodes.get(node).map(|n| {
            let activate = match n.activate_timeout_ms {
                0 => UNKNOWN_ACTIVATE_TIMEOUT,
                ms => Duration::from_millis(ms),
            };
            (
                n.address.clone(),
                Budgets {
                    preflight,
                    activate,
                },
            )
        })
    })
}

/// Performs an action and records its result; `false` when the result could not be recorded.
pub(super) async fn perform_and_record(
    cx: TaskCx,
    rollout: RolloutId,
    package: Option<orch_types::rollout::PackageRef>,
    action: Action,
) -> bool {
    let Some((address, budgets)) = agent_of(&cx, rollout, &action.node) else {
        let error = format!("node {} is not registered", action.node);
        return record(&cx, rollout, &action, ActionResult::Failed { error }).await;
    };
    if let (ActionKind::Stage { .. }, Some(p)) = (&action.kind, &package)
        && let Err(e) = cx.shared.ensure_blob(&p.sha256).await
    {
        let error = format!(
            "package bytes unavailable on the leader: {}",
            orch_types::error_chain(&e)
        );
        return record(&cx, rollout, &action, ActionResult::Failed { error }).await;
    }
    let metric_gates = cx.shared.read(|s| {
        let spec = s.rollouts.get(&rollout)?.spec();
        Some(Arc::new(TargetGates {
            target: spec.version,
            gates: (**spec.metric_gates.as_ref()?).clone(),
        }))
    });
    let actx = ActionCtx {
        pool: &cx.shared.agents,
        blobs: &cx.shared.blobs,
        address: &address,
        fence: pb::Fence {
            term: cx.term,
            rollout_id: rollout.to_string(),
            step: action.seq,
            cluster_id: cx.cluster_id.clone(),
            deadline_unix_ms: 0,
        },
        package: package.as_ref(),
        budgets,
        liveness: Some(liveness_reporter(&cx)),
        metrics: &cx.shared.metrics,
        gates: &cx.shared.gates,
        metric_gates,
    };
    let started = std::time::Instant::now();
    let performed = perform_or_take_early(&cx, &actx, rollout, &action).await;
    cx.shared.metrics.observe_step(
        crate::metrics::kind_of(&action.kind),
        started.elapsed().as_secs_f64(),
    );
    record_performed(&cx, &actx, rollout, &action, performed).await
}

/// Performs `action`, or takes the outcome of its early health probe if one was started for
/// exactly this action.
async fn perform_or_take_early(
    cx: &TaskCx,
    actx: &ActionCtx<'_>,
    rollout: RolloutId,
    action: &Action,
) -> Performed {
    let started_early = lock(&cx.early).remove(&action.seq).and_then(|g| {
        if g.action == *action {
            Some(g.handle)
        } else {
            g.handle.abort();
            None
        }
    });
    match started_early {
        Some(h) => {
            tracing::info!(%action, rollout = %rollout, "performing (probing since the install)");
            match h.await {
                // Issued now: the gate may finish (the post-step hook).
                Ok(Some(p)) => crate::agents::finish_gate(actx, action, p).await,
                _ => perform(actx, action).await,
            }
        }
        None => {
            tracing::info!(%action, rollout = %rollout, "performing");
            perform(actx, action).await
        }
    }
}

/// Records what performing `action` gave; `false` when it could not be recorded. A stale
/// fence is recorded as a failure only while this coordinator still leads.
async fn record_performed(
    cx: &TaskCx,
    actx: &ActionCtx<'_>,
    rollout: RolloutId,
    action: &Action,
    performed: Performed,
) -> bool {
    let result = match performed {
        Ok((result, versions)) => {
            let gate_done = start_gate_early(cx, actx, rollout, action, &result).await;
            let versions = versions.map(|r| Command::NodeVersions {
                id: action.node.clone(),
                versions: r.versions,
                stamp: r.stamp,
            });
            return record_with(cx, rollout, action, result, versions, gate_done).await;
        }
        Err(CallError::Stale(msg)) if leads_in(&cx.shared, cx.term) => {
            // This coordinator still leads, yet the agent holds a newer fence of this
            // cluster: the step did not happen. Recorded as a failure so that the rollout's
            // failure policy applies (instead of waiting forever).
            tracing::warn!(%msg, "an agent refused a step with a newer fence while this coordinator leads");
            let error = format!(
                "the agent refused the step: {msg}; something else advanced its fence (another coordinator of this cluster, or a restored data directory)"
            );
            ActionResult::Failed { error }
        }
        Err(CallError::Stale(msg)) => {
            tracing::warn!(%msg, "an agent saw a newer coordinator's fence; this driver stands down");
            // The newer leader owns this action now.
            return true;
        }
        Err(CallError::Step(error)) => ActionResult::Failed { error },
        Err(CallError::Refused(error)) => ActionResult::Refused { error },
    };
    record(cx, rollout, action, result).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use orch_types::Version;

    fn action(seq: u64, kind: ActionKind) -> Action {
        Action {
            seq,
            node: format!("n{seq}").parse().unwrap(),
            kind,
        }
    }

    fn gate(seq: u64) -> Action {
        let expect: Version = "4.2.1".parse().unwrap();
        action(
            seq,
            ActionKind::HealthGate {
                min_healthy_time_ms: 0,
                healthy_deadline_ms: 1,
                expect,
                failure_threshold: 0,
            },
        )
    }

    #[test]
    fn steps_start_at_most_the_cap_at_once_and_gates_always_start() {
        let mut in_flight: Vec<Action> = (0..STEP_TASKS as u64 + 50)
            .map(|s| action(s, ActionKind::Preflight))
            .collect();
        // Gates after the cap's worth of steps still start, all of them.
        in_flight.extend((1000..1300).map(gate));
        let seqs = |v: Vec<&Action>| v.iter().map(|a| a.seq).collect::<Vec<_>>();

        let first = seqs(to_start(&in_flight, 0, |_| false));
        let steps: Vec<u64> = (0..STEP_TASKS as u64).collect();
        assert_eq!(first[..STEP_TASKS], steps[..]);
        assert_eq!(first[STEP_TASKS..], (1000..1300).collect::<Vec<_>>()[..]);

        // With the first ones running, nothing more starts until some finish; then the next
        // ones in order, as many as finished.
        let has = |s: u64| s < STEP_TASKS as u64 || s >= 1000;
        assert!(to_start(&in_flight, STEP_TASKS, has).is_empty());
        assert_eq!(
            seqs(to_start(&in_flight, STEP_TASKS - 3, has)),
            (STEP_TASKS as u64..STEP_TASKS as u64 + 3).collect::<Vec<_>>()
        );
    }
}
