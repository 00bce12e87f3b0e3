//! Recording results: group commit of the driver's entries, and agents' liveness.

use std::sync::Arc;

use orch_rollout::{Action, ActionResult, Event, LogEntry};
use orch_types::{NodeId, RolloutId};

use super::{Scope, TaskCx, leads_in, now_ms};
use crate::Shared;
use crate::agents::LivenessFn;
use crate::state::{Command, Unresponsive};

/// At most this many results go into one log entry (keeps an entry well under the Raft
/// message limits even with every node's version list in it).
const MAX_GROUP: usize = 64;

/// One action's commands waiting to be written, and who waits to hear whether they were.
struct Pending {
    cmds: Vec<Command>,
    done: Option<tokio::sync::oneshot::Sender<bool>>,
}

/// Group commit for results: while one entry is being committed, results that finish queue up
/// and then go into the next entry together. A step that runs on many nodes at once (preflight
/// of every node, staging and committing 8 at a time) then costs a few commits instead of one
/// per node. Each result keeps its own commands in order, and its caller still learns only
/// after the commit whether it was recorded, so nothing acts on an unrecorded result. Nothing
/// is written once the driver's term is over.
#[derive(Clone)]
pub(super) struct Recorder {
    tx: tokio::sync::mpsc::UnboundedSender<Pending>,
}

impl Recorder {
    pub(super) fn start(shared: Arc<Shared>, term: u64, scope: &Scope) -> Recorder {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Pending>();
        scope.spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut group = vec![first];
                while group.len() < MAX_GROUP {
                    match rx.try_recv() {
                        Ok(p) => group.push(p),
                        Err(_) => break,
                    }
                }
                let mut cmds = Vec::new();
                let mut waiting = Vec::with_capacity(group.len());
                for p in group {
                    cmds.extend(p.cmds);
                    waiting.extend(p.done);
                }
                let n = waiting.len();
                let ok = if !leads_in(&shared, term) {
                    false
                } else {
                    match shared.raft.write(Command::Batch(cmds)).await {
                        Ok(_) => true,
                        Err(e) => {
                            // Not recorded: those actions stay in flight and are performed again.
                            tracing::warn!(results = n, "results not recorded: {e}");
                            false
                        }
                    }
                };
                for w in waiting {
                    let _ = w.send(ok);
                }
            }
        });
        Recorder { tx }
    }

    /// Writes `cmds` (in the next group); `true` once committed and applied.
    async fn write(&self, cmds: Vec<Command>) -> bool {
        let (done, rx) = tokio::sync::oneshot::channel();
        let pending = Pending {
            cmds,
            done: Some(done),
        };
        if self.tx.send(pending).is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// Writes `cmds` in the next group without waiting to hear whether they were.
    fn submit(&self, cmds: Vec<Command>) {
        let _ = self.tx.send(Pending { cmds, done: None });
    }
}

/// Records an agent's liveness as pings see it, writing only changes (one entry when it stops
/// answering, one when it answers again).
pub(super) fn liveness_reporter(cx: &TaskCx) -> LivenessFn {
    let shared = cx.shared.clone();
    let recorder = cx.recorder.clone();
    Arc::new(move |node: &NodeId, now: Option<Unresponsive>| {
        let recorded = shared.read(|s| s.nodes.get(node).map(|n| n.unresponsive.clone()));
        let Some(recorded) = recorded else { return };
        let change = match (&recorded, &now) {
            (None, None) => false,
            // Keep the first `since`; refresh only the detail when it says something new.
            (Some(a), Some(b)) => a.detail != b.detail && a.since_ms == b.since_ms,
            _ => true,
        };
        if change {
            recorder.submit(vec![Command::NodeLiveness {
                id: node.clone(),
                unresponsive: now,
            }]);
        }
    })
}

pub(super) async fn record(
    cx: &TaskCx,
    rollout: RolloutId,
    action: &Action,
    result: ActionResult,
) -> bool {
    record_with(cx, rollout, action, result, None, None).await
}

/// Records an action's result in one Raft entry together with the node's reported versions (if
/// any) and the issuing of whatever the result enables: applying `IssueActions` right after the
/// result is deterministic and is what the driver loop would propose next anyway (when nothing
/// is enabled it is ignored and changes nothing), so the next step starts one commit sooner.
/// Every entry carries this driver's term.
pub(super) async fn record_with(
    cx: &TaskCx,
    rollout: RolloutId,
    action: &Action,
    result: ActionResult,
    versions: Option<Command>,
    gate_done: Option<(Action, ActionResult)>,
) -> bool {
    let at_ms = now_ms();
    let term = cx.term;
    let entry = |event| LogEntry {
        event,
        at_ms,
        by: cx.me.clone(),
    };
    let mut cmds: Vec<Command> = versions.into_iter().collect();
    cmds.push(Command::Rollout {
        id: rollout,
        entry: entry(Event::Result {
            seq: action.seq,
            result,
        }),
        term,
    });
    let issue = || Command::Rollout {
        id: rollout,
        entry: entry(Event::IssueActions),
        term,
    };
    cmds.push(issue());
    // The gate the entry above issues, already decided by its early probe; applied only if
    // exactly that gate was issued, else ignored and the gate is performed normally.
    if let Some((gate, gate_result)) = gate_done {
        cmds.push(Command::RolloutIfInFlight {
            id: rollout,
            entry: entry(Event::Result {
                seq: gate.seq,
                result: gate_result,
            }),
            action: gate,
            term,
        });
        cmds.push(issue());
    }
    let recorded = cx.recorder.write(cmds).await;
    if !recorded {
        tracing::warn!(%action, "result not recorded; it is performed again");
    }
    recorded
}
