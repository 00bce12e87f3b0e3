//! The rollout driver. Runs only on the Raft leader, for one term: it reads the active rollout
//! from the replicated state, proposes `IssueActions` when the machine wants new actions,
//! performs every in-flight action through the agents (fenced with this term), and proposes
//! each result. It keeps no state of its own beyond the tasks it runs, so a new leader simply
//! starts a driver that re-performs whatever is in flight (agent calls are idempotent).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use orch_proto::agent as pb;
use orch_rollout::{Action, ActionKind, Event, LogEntry};
use tokio::task::JoinHandle;

use crate::Shared;
use crate::agents::{ActionCtx, CallError, perform};
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
    loop {
        if *stop.borrow() || !shared.raft.is_leader() || shared.raft.current_term() != term {
            break;
        }
        let active = shared.read(|s| s.active_rollout().cloned());
        if let Some(r) = active {
            let in_flight: Vec<Action> = r.in_flight().to_vec();
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
            for a in in_flight {
                if tasks.contains_key(&a.seq) {
                    continue;
                }
                let h = tokio::spawn(perform_and_record(
                    shared.clone(),
                    term,
                    r.id().to_string(),
                    r.spec().package.clone(),
                    a.clone(),
                    me.clone(),
                ));
                tasks.insert(a.seq, Slot::Running(h));
            }
            if !r.next_actions().is_empty() {
                let entry = LogEntry {
                    event: Event::IssueActions,
                    at_ms: now_ms(),
                    by: me.clone(),
                };
                match shared
                    .raft
                    .write(Command::Rollout {
                        id: r.id().to_string(),
                        entry,
                    })
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
    tracing::info!(term, "rollout driver stopped");
}

enum Slot {
    Running(JoinHandle<bool>),
    /// Finished and its result is in the log.
    Recorded,
}

/// Performs an action and records its result; `false` when the result could not be recorded.
async fn perform_and_record(
    shared: Arc<Shared>,
    term: u64,
    rollout: String,
    package: Option<orch_types::rollout::PackageRef>,
    action: Action,
    me: String,
) -> bool {
    let Some(address) = shared.read(|s| s.nodes.get(&action.node).map(|n| n.address.clone()))
    else {
        return record(
            &shared,
            &rollout,
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
            &shared,
            &rollout,
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
            rollout_id: rollout.clone(),
            step: action.seq,
        },
        package: package.as_ref(),
    };
    tracing::info!(%action, rollout = %rollout, "performing");
    match perform(&cx, &action).await {
        Ok((result, versions)) => {
            if let Some(versions) = versions {
                let _ = shared
                    .raft
                    .write(Command::NodeVersions {
                        id: action.node.clone(),
                        versions,
                    })
                    .await;
            }
            record(&shared, &rollout, &action, result, &me).await
        }
        Err(CallError::Stale(msg)) => {
            tracing::warn!(%msg, "an agent saw a newer coordinator's fence; this driver stands down");
            // Treated as recorded: the newer leader owns this action now.
            true
        }
        Err(CallError::Step(msg)) => {
            record(
                &shared,
                &rollout,
                &action,
                orch_rollout::ActionResult::Failed { error: msg },
                &me,
            )
            .await
        }
    }
}

async fn record(
    shared: &Shared,
    rollout: &str,
    action: &Action,
    result: orch_rollout::ActionResult,
    me: &str,
) -> bool {
    let entry = LogEntry {
        event: Event::Result {
            seq: action.seq,
            result,
        },
        at_ms: now_ms(),
        by: me.to_string(),
    };
    match shared
        .raft
        .write(Command::Rollout {
            id: rollout.to_string(),
            entry,
        })
        .await
    {
        Ok(_) => true,
        Err(e) => {
            // Not recorded: the action stays in flight and is performed again.
            tracing::warn!(%action, "result not recorded: {e}");
            false
        }
    }
}
