//! The rollout driver. Runs only on the Raft leader, for one term: it reads the active rollout
//! from the replicated state, proposes `IssueActions` when the machine wants new actions,
//! performs every in-flight action through the agents (fenced with this cluster and term),
//! and proposes each result (results that finish while an entry is being committed share the
//! next entry). It keeps no state of its own beyond the tasks it runs, so a new leader simply
//! starts a driver that re-performs whatever is in flight (agent calls are idempotent).
//!
//! Everything a driver spawns belongs to its term ([`Scope`]): action tasks, early health
//! probes, the recorder, liveness reports and releases stop when the term ends, before
//! [`run`] returns. A result that a deposed driver still managed to propose is refused by the
//! state machine (it carries its term; see `Rollout::apply_in_term`), and the first entry of a
//! new driver claims the rollout for its term.
//!
//! Here: the driver loop and its term's scope; `tasks` performs and records each action,
//! `record` groups results into log entries, `early` starts health probes ahead of their
//! gate.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use orch_proto::agent as pb;
use orch_retry::Backoff;
use orch_rollout::{Action, Event, LogEntry};
use orch_types::{NodeId, RolloutId};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Shared;
use crate::raft::error::WriteError;
use crate::state::Command;

mod early;
mod record;
mod tasks;

use early::EarlyGates;
use record::Recorder;
use tasks::{Tasks, sync_tasks};

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How long preflight may take per node when the rollout does not say.
pub const PREFLIGHT_TIMEOUT: Duration =
    Duration::from_millis(orch_types::rollout::DEFAULT_PREFLIGHT_TIMEOUT_MS);

/// How long the end of a driver waits for its tasks to notice the cancellation.
const WIND_DOWN: Duration = Duration::from_secs(5);

/// Pauses between the leader's attempts at a write it needs before driving (naming the cluster).
const LEADER_BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));

/// Telling the nodes of a finished rollout that it no longer holds them: a few tries.
const RELEASE_BACKOFF: Backoff =
    Backoff::new(Duration::from_secs(2), Duration::from_secs(8)).with_max_retries(2);

/// The tasks of one driver term: spawned through it, they stop when the term's token is
/// cancelled (the term ended, or the driver was dropped), and [`Scope::close`] waits until
/// they are gone.
#[derive(Clone)]
struct Scope {
    token: CancellationToken,
    tracker: TaskTracker,
}

impl Scope {
    fn spawn<F>(&self, f: F) -> JoinHandle<Option<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let token = self.token.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                biased;
                _ = token.cancelled() => None,
                r = f => Some(r),
            }
        })
    }

    async fn close(&self) {
        self.token.cancel();
        self.tracker.close();
        if tokio::time::timeout(WIND_DOWN, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("driver tasks did not stop within {WIND_DOWN:?}");
        }
    }
}

/// Drives rollouts while this coordinator leads in `term`; returns when it stops leading or
/// `stop` is cancelled, after every task it started has stopped.
pub async fn run(shared: Arc<Shared>, term: u64, stop: CancellationToken) {
    let scope = Scope {
        token: stop.child_token(),
        tracker: TaskTracker::new(),
    };
    // Also when this future is dropped instead of finishing.
    let _cancel_on_drop = scope.token.clone().drop_guard();
    tracing::info!(term, "rollout driver started (this coordinator leads)");
    if let Some(cluster_id) = ensure_cluster_id(&shared, term, &scope.token).await {
        drive(shared, term, cluster_id, &scope).await;
    }
    scope.close().await;
    tracing::info!(term, "rollout driver stopped");
}

fn leads_in(shared: &Shared, term: u64) -> bool {
    shared.raft.is_leader() && shared.raft.current_term() == term
}

/// The cluster's id, created by the first leader that finds none.
async fn ensure_cluster_id(shared: &Shared, term: u64, stop: &CancellationToken) -> Option<String> {
    // Retried for as long as this coordinator leads in `term`.
    let mut attempts = LEADER_BACKOFF.start();
    loop {
        if let Some(id) = shared.read(|s| s.cluster_id.clone()) {
            return Some(id);
        }
        if stop.is_cancelled() || !leads_in(shared, term) {
            return None;
        }
        let id = new_cluster_id()?;
        match shared
            .raft
            .write(Command::SetClusterId { id: id.clone() })
            .await
        {
            Ok(_) => tracing::info!(cluster_id = %id, "named the cluster"),
            Err(e) => {
                tracing::warn!("cannot record the cluster id: {e}");
                let pause = attempts.next_delay().unwrap_or(LEADER_BACKOFF.cap);
                tokio::select! {
                    _ = stop.cancelled() => return None,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }
}

/// 128 random bits as hex.
fn new_cluster_id() -> Option<String> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        tracing::error!("the system random generator failed: cannot name the cluster");
        return None;
    }
    Some(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// What every action task of one driver needs.
#[derive(Clone)]
struct TaskCx {
    shared: Arc<Shared>,
    term: u64,
    cluster_id: String,
    me: String,
    early: EarlyGates,
    recorder: Recorder,
    scope: Scope,
}

/// What the driver loop reads of the active rollout on each round.
struct ActiveView {
    id: RolloutId,
    package: Option<orch_types::rollout::PackageRef>,
    in_flight: Vec<Action>,
    next_seq: u64,
    wants_issue: bool,
    /// The rollout was last driven in an older term: this driver must claim it first.
    unclaimed: bool,
}

async fn drive(shared: Arc<Shared>, term: u64, cluster_id: String, scope: &Scope) {
    let me = format!("coordinator-{}", shared.raft.id());
    let mut applied = shared.raft.applied();
    let mut tasks = Tasks::default();
    let recorder = Recorder::start(shared.clone(), term, scope);
    let cx = TaskCx {
        shared: shared.clone(),
        term,
        cluster_id,
        me: me.clone(),
        early: Arc::default(),
        recorder,
        scope: scope.clone(),
    };
    // The rollout this driver saw running; when it ends, its nodes are released. At the start:
    // the latest finished rollout, whose release the previous leader may not have sent.
    let mut watching: Option<RolloutId> = shared.read(|s| {
        s.rollouts
            .iter()
            .next_back()
            .filter(|(_, r)| r.is_finished())
            .map(|(id, _)| *id)
    });
    loop {
        if scope.token.is_cancelled() || !leads_in(&shared, term) {
            break;
        }
        let active = shared.read(|s| {
            s.active().map(|(id, r)| ActiveView {
                id,
                package: r.spec().package.clone(),
                in_flight: r.in_flight().to_vec(),
                next_seq: r.next_seq(),
                wants_issue: !r.next_actions().is_empty(),
                unclaimed: r.driver_term() < term,
            })
        });
        if let Some(ended) = watching.filter(|w| active.as_ref().is_none_or(|a| a.id != *w)) {
            release_nodes(&cx, ended);
            watching = None;
        }
        watching = active.as_ref().map(|a| a.id).or(watching);
        if let Some(r) = active {
            // A newer driver claims the rollout before acting, so that results of the
            // previous one still in the log are ignored from here on.
            if r.unclaimed || r.wants_issue {
                match issue(&cx, r.id).await {
                    Ok(()) => continue,
                    Err(e) => {
                        tracing::warn!("cannot record issued actions: {e}");
                        break;
                    }
                }
            }
            sync_tasks(&cx, &mut tasks, &r);
        }
        tokio::select! {
            r = applied.changed() => if r.is_err() { break },
            _ = scope.token.cancelled() => break,
            // A finished task whose result could not be recorded is retried from here.
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

async fn issue(cx: &TaskCx, id: RolloutId) -> Result<(), WriteError> {
    let entry = LogEntry {
        event: Event::IssueActions,
        at_ms: now_ms(),
        by: cx.me.clone(),
    };
    cx.shared
        .raft
        .write(Command::Rollout {
            id,
            entry,
            term: cx.term,
        })
        .await
        .map(|_| ())
}

/// Tells every node of a finished rollout that it no longer holds them (best effort, a few
/// tries; an operator can still `--force` a node whose release never arrived).
fn release_nodes(cx: &TaskCx, id: RolloutId) {
    let Some((nodes, next_seq)) = cx.shared.read(|s| {
        s.rollouts.get(&id).map(|r| {
            let nodes: Vec<(NodeId, String)> = r
                .spec()
                .nodes
                .iter()
                .filter_map(|n| s.nodes.get(n).map(|rec| (n.clone(), rec.address.clone())))
                .collect();
            (nodes, r.next_seq())
        })
    }) else {
        return;
    };
    let (shared, term, cluster_id) = (cx.shared.clone(), cx.term, cx.cluster_id.clone());
    // One task for all: a release is a short call, sent to at most STEP_TASKS nodes at a time
    // like the steps (1,000 at once opened 1,000 connections together on the leader).
    cx.scope.spawn(async move {
        let send = |(node, addr): (NodeId, String)| {
            let shared = &shared;
            let fence = pb::Fence {
                term,
                rollout_id: id.to_string(),
                // Above every step the rollout issued.
                step: next_seq,
                cluster_id: cluster_id.clone(),
                deadline_unix_ms: 0,
            };
            async move {
                let delivered = RELEASE_BACKOFF
                    .retry(
                        || async {
                            let sent =
                                crate::agents::release(&shared.agents, &node, &addr, fence.clone());
                            if sent.await { Ok(()) } else { Err(()) }
                        },
                        |_| true,
                    )
                    .await;
                if delivered.is_err() {
                    tracing::info!(%node, rollout = %id, "could not tell the agent that the rollout ended; an operator's step there needs --force until the next rollout");
                }
            }
        };
        futures::StreamExt::for_each_concurrent(
            futures::stream::iter(nodes),
            tasks::STEP_TASKS,
            send,
        )
        .await;
    });
}
