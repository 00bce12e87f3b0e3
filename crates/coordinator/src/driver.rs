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

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use orch_proto::agent as pb;
use orch_retry::Backoff;
use orch_rollout::{Action, ActionKind, ActionResult, Event, LogEntry};
use orch_types::{NodeId, RolloutId};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Shared;
use crate::agents::{
    ActionCtx, Budgets, CallError, LivenessFn, Reported, UNKNOWN_ACTIVATE_TIMEOUT, perform,
};
use crate::raft::error::WriteError;
use crate::state::{Command, Unresponsive};

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

/// The action tasks of the rollout being driven, by seq (seqs start again with each rollout).
#[derive(Default)]
struct Tasks {
    rollout: Option<RolloutId>,
    slots: HashMap<u64, Slot>,
}

/// Starts a task for every in-flight action that has none, and forgets tasks whose action is
/// no longer in flight (cancelled by the machine) or whose result could not be recorded (it
/// is performed again).
fn sync_tasks(cx: &TaskCx, tasks: &mut Tasks, r: &ActiveView) {
    if tasks.rollout != Some(r.id) {
        // Another rollout: none of the previous one's tasks or early probes apply to it.
        for (_, slot) in tasks.slots.drain() {
            if let Slot::Running(h) = slot {
                h.abort();
            }
        }
        for (_, g) in lock(&cx.early).drain() {
            g.handle.abort();
        }
        tasks.rollout = Some(r.id);
    }
    let tasks = &mut tasks.slots;
    let in_flight = &r.in_flight;
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
                Some(Ok(Some(true))) => *slot = Slot::Recorded,
                _ => return false,
            }
        }
        true
    });
    // Early probes whose gate was never issued (the rollout went another way) are dropped.
    lock(&cx.early).retain(|seq, g| {
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
        let h = cx.scope.spawn(perform_and_record(
            cx.clone(),
            r.id,
            r.package.clone(),
            a.clone(),
        ));
        tasks.insert(a.seq, Slot::Running(h));
    }
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
    for (node, addr) in nodes {
        let shared = cx.shared.clone();
        let fence = pb::Fence {
            term: cx.term,
            rollout_id: id.to_string(),
            // Above every step the rollout issued.
            step: next_seq,
            cluster_id: cx.cluster_id.clone(),
            deadline_unix_ms: 0,
        };
        cx.scope.spawn(async move {
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
        });
    }
}

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
struct Recorder {
    tx: tokio::sync::mpsc::UnboundedSender<Pending>,
}

impl Recorder {
    fn start(shared: Arc<Shared>, term: u64, scope: &Scope) -> Recorder {
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
fn liveness_reporter(cx: &TaskCx) -> LivenessFn {
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
    handle: JoinHandle<Option<Performed>>,
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
    Running(JoinHandle<Option<bool>>),
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
async fn perform_and_record(
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
        let error = format!("package bytes unavailable on the leader: {e}");
        return record(&cx, rollout, &action, ActionResult::Failed { error }).await;
    }
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
    };
    let started_early = lock(&cx.early).remove(&action.seq).and_then(|g| {
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
                Ok(Some(p)) => p,
                _ => perform(&actx, &action).await,
            }
        }
        None => {
            tracing::info!(%action, rollout = %rollout, "performing");
            perform(&actx, &action).await
        }
    };
    match performed {
        Ok((result, versions)) => {
            let gate_done = start_gate_early(&cx, &actx, rollout, &action, &result).await;
            let versions = versions.map(|r| Command::NodeVersions {
                id: action.node.clone(),
                versions: r.versions,
                stamp: r.stamp,
            });
            record_with(&cx, rollout, &action, result, versions, gate_done).await
        }
        Err(CallError::Stale(msg)) if leads_in(&cx.shared, cx.term) => {
            // This coordinator still leads, yet the agent holds a newer fence of this
            // cluster: the step did not happen. Recorded as a failure so that the rollout's
            // failure policy applies (instead of waiting forever).
            tracing::warn!(%msg, "an agent refused a step with a newer fence while this coordinator leads");
            let error = format!(
                "the agent refused the step: {msg}; something else advanced its fence (another coordinator of this cluster, or a restored data directory)"
            );
            record(&cx, rollout, &action, ActionResult::Failed { error }).await
        }
        Err(CallError::Stale(msg)) => {
            tracing::warn!(%msg, "an agent saw a newer coordinator's fence; this driver stands down");
            // The newer leader owns this action now.
            true
        }
        Err(CallError::Step(error)) => {
            record(&cx, rollout, &action, ActionResult::Failed { error }).await
        }
        Err(CallError::Refused(error)) => {
            record(&cx, rollout, &action, ActionResult::Refused { error }).await
        }
    }
}

/// After a successful install (or downgrade) whose gate the machine will issue next, starts
/// probing at once: a gate decided within [`COMBINE_WINDOW`] is returned to be recorded in
/// the same entry; a longer one keeps running as an [`EarlyGate`].
async fn start_gate_early(
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
        };
        perform(&actx, &g).await
    });
    match tokio::time::timeout(COMBINE_WINDOW, &mut handle).await {
        // Decided at once (e.g. min-healthy-time 0): both results go in one entry.
        Ok(Ok(Some(Ok((gate_result, _))))) => Some((gate, gate_result)),
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

async fn record(cx: &TaskCx, rollout: RolloutId, action: &Action, result: ActionResult) -> bool {
    record_with(cx, rollout, action, result, None, None).await
}

/// Records an action's result in one Raft entry together with the node's reported versions (if
/// any) and the issuing of whatever the result enables: applying `IssueActions` right after the
/// result is deterministic and is what the driver loop would propose next anyway (when nothing
/// is enabled it is ignored and changes nothing), so the next step starts one commit sooner.
/// Every entry carries this driver's term.
async fn record_with(
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
