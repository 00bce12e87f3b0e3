//! Early health probes: a gate's probing starts as soon as the install it follows succeeded,
//! while that result is being committed, and is used only if the log then issues exactly that
//! gate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use orch_rollout::{Action, ActionKind, ActionResult, Event};
use orch_types::RolloutId;
use tokio::task::JoinHandle;

use super::TaskCx;
use crate::Shared;
use crate::agents::{ActionCtx, Performed, finish_gate, probe_gate};

/// How long an install's result waits for its health gate's early probe before being recorded
/// on its own: a gate decided within this window (min-healthy-time 0, a service healthy at once)
/// is recorded in the same entry, saving a commit per node; a longer gate is recorded when it
/// ends. Short, so `status` never shows an install as running for noticeably longer than it did.
const COMBINE_WINDOW: Duration = Duration::from_millis(50);

/// A health gate's probing, started as soon as the install (or downgrade) it follows succeeded,
/// while that result is being committed. Probing reads and changes nothing, so it may start
/// before the gate is recorded as issued; its outcome is used only if the committed log then
/// issues exactly this gate (same seq, node and expectations), and only then is the gate
/// finished (the agent's post-step hook, which changes the node) and recorded like any result.
/// This takes the probe off the critical path: one commit per node instead of commit + probe.
pub(super) struct EarlyGate {
    pub action: Action,
    pub handle: JoinHandle<Option<Performed>>,
}

/// Early gate probes by the seq the gate is expected to get.
pub(super) type EarlyGates = Arc<Mutex<HashMap<u64, EarlyGate>>>;

pub(super) fn lock(g: &EarlyGates) -> std::sync::MutexGuard<'_, HashMap<u64, EarlyGate>> {
    g.lock().unwrap_or_else(|p| p.into_inner())
}

/// The health gate the machine will issue for `action`'s node once `result` is applied, if the
/// state as it stands leads there (it is deterministic; the prediction is checked later).
fn predicted_gate(
    shared: &Shared,
    rollout: RolloutId,
    action: &Action,
    result: &ActionResult,
) -> Option<Action> {
    if !matches!(
        action.kind,
        ActionKind::Install { .. } | ActionKind::Downgrade { .. }
    ) || !matches!(result, ActionResult::Done)
    {
        return None;
    }
    let event = Event::Result {
        seq: action.seq,
        result: result.clone(),
    };
    shared.read(|s| {
        s.rollouts
            .get(&rollout)?
            .next_actions_after(&event)?
            .into_iter()
            .find(|a| a.node == action.node && matches!(a.kind, ActionKind::HealthGate { .. }))
    })
}

/// After a successful install (or downgrade) whose gate the machine will issue next, starts
/// probing at once: a gate decided within [`COMBINE_WINDOW`] is returned to be recorded in
/// the same entry; a longer one keeps running as an [`EarlyGate`].
pub(super) async fn start_gate_early(
    cx: &TaskCx,
    actx: &ActionCtx<'_>,
    rollout: RolloutId,
    action: &Action,
    result: &ActionResult,
) -> Option<(Action, ActionResult)> {
    let gate = predicted_gate(&cx.shared, rollout, action, result)?;
    let shared = cx.shared.clone();
    let address = actx.address.to_string();
    let fence = actx.fence.clone();
    let budgets = actx.budgets;
    let liveness = actx.liveness.clone();
    let metric_gates = actx.metric_gates.clone();
    let g = gate.clone();
    let mut handle = cx.scope.spawn(async move {
        let actx = ActionCtx {
            pool: &shared.agents,
            blobs: &shared.blobs,
            address: &address,
            fence,
            package: None,
            budgets,
            liveness,
            metrics: &shared.metrics,
            gates: &shared.gates,
            metric_gates,
        };
        // A predicted gate is always a health gate.
        probe_gate(&actx, &g).await.unwrap_or_else(|| {
            Err(crate::agents::CallError::Step(
                "an early probe of an action that is not a health gate".into(),
            ))
        })
    });
    match tokio::time::timeout(COMBINE_WINDOW, &mut handle).await {
        // Decided at once (e.g. min-healthy-time 0): both results go in one entry, unless the
        // rollout was paused meanwhile (then nothing may happen on the node before `resume`:
        // the gate is performed once issued). The post-step hook runs first: it is part of
        // the gate's result.
        Ok(Ok(Some(Ok(probed)))) => {
            let paused = cx.shared.read(|s| {
                s.rollouts.get(&rollout).is_none_or(|r| {
                    r.phase() == orch_types::rollout::Phase::Paused || r.is_finished()
                })
            });
            if paused {
                return None;
            }
            match finish_gate(actx, &gate, Ok(probed)).await {
                Ok((gate_result, _)) => Some((gate, gate_result)),
                Err(_) => None,
            }
        }
        // The probe itself failed to run: the gate is performed normally once issued.
        Ok(_) => None,
        Err(_) => {
            let early = EarlyGate {
                action: gate.clone(),
                handle,
            };
            if let Some(old) = lock(&cx.early).insert(gate.seq, early) {
                old.handle.abort();
            }
            None
        }
    }
}
