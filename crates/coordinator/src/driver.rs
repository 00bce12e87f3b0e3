//! The rollout driver. Runs only on the Raft leader, for one term: it reads the active rollout
//! from the replicated state, proposes `IssueActions` when the machine wants new actions,
//! performs every in-flight action through the agents (fenced with this term), and proposes
//! each result (results that finish while an entry is being committed share the next entry). It keeps no state of its own beyond the tasks it runs, so a new leader simply
//! starts a driver that re-performs whatever is in flight (agent calls are idempotent).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use orch_proto::agent as pb;
use orch_rollout::{Action, ActionKind, ActionResult, Event, LogEntry};
use orch_types::RolloutId;
use tokio::task::JoinHandle;

use crate::Shared;
use crate::agents::{ActionCtx, CallError, Reported, perform};
use crate::state::Command;

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Drives rollouts while this coordinator leads in `term`; returns when it stops leading or
/// `stop` fires.
pub async fn run(shared: Arc<Shared>, term: u64, mut stop: tokio::sync::watch::Receiver<bool>) {
    let me = format!("coordinator-{}", shared.raft.id());
    tracing::info!(term, "rollout driver started (this coordinator leads)");
    let mut applied = shared.raft.applied();
    let mut tasks: HashMap<u64, Slot> = HashMap::new();
    let early: EarlyGates = Arc::default();
    let (recorder, recording) = Recorder::start(shared.clone());
    let task = TaskCx {
        shared: shared.clone(),
        term,
        me: me.clone(),
        early: early.clone(),
        recorder,
    };
    loop {
        if *stop.borrow() || !shared.raft.is_leader() || shared.raft.current_term() != term {
            break;
        }
        // Only what the loop needs, not a clone of the rollout (its audit trail grows with
        // every step, and this runs after every applied entry).
        let active = shared.read(|s| {
            s.active().map(|(id, r)| ActiveView {
                id,
                package: r.spec().package.clone(),
                in_flight: r.in_flight().to_vec(),
                next_seq: r.next_seq(),
                wants_issue: !r.next_actions().is_empty(),
            })
        });
        if let Some(r) = active {
            let in_flight = r.in_flight;
            // Cancelled actions (e.g. a health gate nobody needs after an abort) stop here, and
            // an action whose result could not be recorded is performed again.
            tasks.retain(|seq, slot| {
                if !in_flight.iter().any(|a| a.seq == *seq) {
                    if let Slot::Running(h) = slot {
                        h.abort();
                    }
                    return false;
                }
                if let Slot::Running(h) = slot
                    && h.is_finished()
                {
                    match futures::FutureExt::now_or_never(h) {
                        // Recorded: the state read above may predate it, so never re-run it.
                        Some(Ok(true)) => *slot = Slot::Recorded,
                        _ => return false,
                    }
                }
                true
            });
            // Early probes whose gate was never issued (the rollout went another way) are dropped.
            lock(&early).retain(|seq, g| {
                let keep = *seq >= r.next_seq || in_flight.iter().any(|a| a.seq == *seq);
                if !keep {
                    g.handle.abort();
                }
                keep
            });
            for a in in_flight {
                if tasks.contains_key(&a.seq) {
                    continue;
                }
                let h = tokio::spawn(perform_and_record(
                    task.clone(),
                    r.id,
                    r.package.clone(),
                    a.clone(),
                ));
                tasks.insert(a.seq, Slot::Running(h));
            }
            if r.wants_issue {
                let entry = LogEntry {
                    event: Event::IssueActions,
                    at_ms: now_ms(),
                    by: me.clone(),
                };
                match shared
                    .raft
                    .write(Command::Rollout { id: r.id, entry })
                    .await
                {
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::warn!("cannot record issued actions: {e}");
                        break;
                    }
                }
            }
        }
        tokio::select! {
            r = applied.changed() => if r.is_err() { break },
            _ = stop.changed() => {}
            // A finished task whose result could not be recorded is retried from here.
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
    for (_, slot) in tasks {
        if let Slot::Running(h) = slot {
            h.abort();
        }
    }
    for (_, g) in lock(&early).drain() {
        g.handle.abort();
    }
    recording.abort();
    tracing::info!(term, "rollout driver stopped");
}

/// What every action task of one driver needs.
#[derive(Clone)]
struct TaskCx {
    shared: Arc<Shared>,
    term: u64,
    me: String,
    early: EarlyGates,
    recorder: Recorder,
}

/// What the driver loop reads of the active rollout on each round.
struct ActiveView {
    id: RolloutId,
    package: Option<orch_types::rollout::PackageRef>,
    in_flight: Vec<Action>,
    next_seq: u64,
    wants_issue: bool,
}

/// At most this many results go into one log entry (keeps an entry well under the Raft
/// message limits even with every node's version list in it).
const MAX_GROUP: usize = 64;

/// One action's commands waiting to be written, and who waits to hear whether they were.
struct Pending {
    cmds: Vec<Command>,
    done: tokio::sync::oneshot::Sender<bool>,
}

/// Group commit for results: while one entry is being committed, results that finish queue up
/// and then go into the next entry together. A step that runs on many nodes at once (preflight
/// of every node, staging and committing 8 at a time) then costs a few commits instead of one
/// per node. Each result keeps its own commands in order, and its caller still learns only
/// after the commit whether it was recorded, so nothing acts on an unrecorded result.
#[derive(Clone)]
struct Recorder {
    tx: tokio::sync::mpsc::UnboundedSender<Pending>,
}

impl Recorder {
    fn start(shared: Arc<Shared>) -> (Recorder, JoinHandle<()>) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Pending>();
        let task = tokio::spawn(async move {
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
                    waiting.push(p.done);
                }
                let n = waiting.len();
                let ok = match shared.raft.write(Command::Batch(cmds)).await {
                    Ok(_) => true,
                    Err(e) => {
                        // Not recorded: those actions stay in flight and are performed again.
                        tracing::warn!(results = n, "results not recorded: {e}");
                        false
                    }
                };
                for w in waiting {
                    let _ = w.send(ok);
                }
            }
        });
        (Recorder { tx }, task)
    }

    /// Writes `cmds` (in the next group); `true` once committed and applied.
    async fn write(&self, cmds: Vec<Command>) -> bool {
        let (done, rx) = tokio::sync::oneshot::channel();
        if self.tx.send(Pending { cmds, done }).is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }
}

/// How long an install's result waits for its health gate's early probe before being recorded
/// on its own: a gate decided within this window (min-healthy-time 0, a service healthy at once)
/// is recorded in the same entry, saving a commit per node; a longer gate is recorded when it
/// ends. Short, so `status` never shows an install as running for noticeably longer than it did.
const COMBINE_WINDOW: Duration = Duration::from_millis(50);

type Performed = Result<(ActionResult, Option<Reported>), CallError>;

/// A health gate's probing, started as soon as the install (or downgrade) it follows succeeded,
/// while that result is being committed. Probing reads and changes nothing, so it may start
/// before the gate is recorded as issued; its outcome is used only if the committed log then
/// issues exactly this gate (same seq, node and expectations), and recorded like any result.
/// This takes the probe off the critical path: one commit per node instead of commit + probe.
struct EarlyGate {
    action: Action,
    handle: JoinHandle<Performed>,
}

/// Early gate probes by the seq the gate is expected to get.
type EarlyGates = Arc<Mutex<HashMap<u64, EarlyGate>>>;

fn lock(g: &EarlyGates) -> std::sync::MutexGuard<'_, HashMap<u64, EarlyGate>> {
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

enum Slot {
    Running(JoinHandle<bool>),
    /// Finished and its result is in the log.
    Recorded,
}

/// Performs an action and records its result; `false` when the result could not be recorded.
async fn perform_and_record(
    cx: TaskCx,
    rollout: RolloutId,
    package: Option<orch_types::rollout::PackageRef>,
    action: Action,
) -> bool {
    let TaskCx {
        shared,
        term,
        me,
        early,
        recorder,
    } = cx;
    let Some(address) = shared.read(|s| s.nodes.get(&action.node).map(|n| n.address.clone()))
    else {
        return record(
            &recorder,
            rollout,
            &action,
            orch_rollout::ActionResult::Failed {
                error: format!("node {} is not registered", action.node),
            },
            &me,
        )
        .await;
    };
    if let (ActionKind::Stage { .. }, Some(p)) = (&action.kind, &package)
        && let Err(e) = shared.ensure_blob(&p.sha256).await
    {
        return record(
            &recorder,
            rollout,
            &action,
            orch_rollout::ActionResult::Failed {
                error: format!("package bytes unavailable on the leader: {e}"),
            },
            &me,
        )
        .await;
    }
    let cx = ActionCtx {
        pool: &shared.agents,
        blobs: &shared.blobs,
        address: &address,
        fence: pb::Fence {
            term,
            rollout_id: rollout.to_string(),
            step: action.seq,
            ..Default::default()
        },
        package: package.as_ref(),
    };
    let started_early = lock(&early).remove(&action.seq).and_then(|g| {
        if g.action == action {
            Some(g.handle)
        } else {
            g.handle.abort();
            None
        }
    });
    let performed = match started_early {
        Some(h) => {
            tracing::info!(%action, rollout = %rollout, "performing (probing since the install)");
            match h.await {
                Ok(p) => p,
                Err(_) => perform(&cx, &action).await,
            }
        }
        None => {
            tracing::info!(%action, rollout = %rollout, "performing");
            perform(&cx, &action).await
        }
    };
    match performed {
        Ok((result, versions)) => {
            let mut gate_done = None;
            if let Some(gate) = predicted_gate(&shared, rollout, &action, &result) {
                let (shared2, address2, fence2) =
                    (shared.clone(), address.clone(), cx.fence.clone());
                let g = gate.clone();
                let mut handle = tokio::spawn(async move {
                    let cx = ActionCtx {
                        pool: &shared2.agents,
                        blobs: &shared2.blobs,
                        address: &address2,
                        fence: fence2,
                        package: None,
                    };
                    perform(&cx, &g).await
                });
                match tokio::time::timeout(COMBINE_WINDOW, &mut handle).await {
                    // Decided at once (e.g. min-healthy-time 0): both results go in one entry.
                    Ok(Ok(Ok((gate_result, _)))) => gate_done = Some((gate, gate_result)),
                    // The probe itself failed to run: the gate is performed normally once issued.
                    Ok(_) => {}
                    Err(_) => {
                        if let Some(old) = lock(&early).insert(
                            gate.seq,
                            EarlyGate {
                                action: gate,
                                handle,
                            },
                        ) {
                            old.handle.abort();
                        }
                    }
                }
            }
            let versions = versions.map(|r| Command::NodeVersions {
                id: action.node.clone(),
                versions: r.versions,
                stamp: r.stamp,
            });
            record_with(
                &recorder, rollout, &action, result, versions, gate_done, &me,
            )
            .await
        }
        Err(CallError::Stale(msg)) => {
            tracing::warn!(%msg, "an agent saw a newer coordinator's fence; this driver stands down");
            // Treated as recorded: the newer leader owns this action now.
            true
        }
        Err(CallError::Step(msg)) => {
            record(
                &recorder,
                rollout,
                &action,
                ActionResult::Failed { error: msg },
                &me,
            )
            .await
        }
    }
}

async fn record(
    recorder: &Recorder,
    rollout: RolloutId,
    action: &Action,
    result: orch_rollout::ActionResult,
    me: &str,
) -> bool {
    record_with(recorder, rollout, action, result, None, None, me).await
}

/// Records an action's result in one Raft entry together with the node's reported versions (if
/// any) and the issuing of whatever the result enables: applying `IssueActions` right after the
/// result is deterministic and is what the driver loop would propose next anyway (when nothing
/// is enabled it is ignored and changes nothing), so the next step starts one commit sooner.
async fn record_with(
    recorder: &Recorder,
    rollout: RolloutId,
    action: &Action,
    result: orch_rollout::ActionResult,
    versions: Option<Command>,
    gate_done: Option<(Action, ActionResult)>,
    me: &str,
) -> bool {
    let at_ms = now_ms();
    let entry = |event| Command::Rollout {
        id: rollout,
        entry: LogEntry {
            event,
            at_ms,
            by: me.to_string(),
        },
    };
    let mut cmds: Vec<Command> = versions.into_iter().collect();
    cmds.push(entry(Event::Result {
        seq: action.seq,
        result,
    }));
    cmds.push(entry(Event::IssueActions));
    // The gate the entry above issues, already decided by its early probe; applied only if
    // exactly that gate was issued, else ignored and the gate is performed normally.
    if let Some((gate, gate_result)) = gate_done {
        cmds.push(Command::RolloutIfInFlight {
            id: rollout,
            entry: LogEntry {
                event: Event::Result {
                    seq: gate.seq,
                    result: gate_result,
                },
                at_ms,
                by: me.to_string(),
            },
            action: gate,
        });
        cmds.push(entry(Event::IssueActions));
    }
    let recorded = recorder.write(cmds).await;
    if !recorded {
        tracing::warn!(%action, "result not recorded; it is performed again");
    }
    recorded
}
