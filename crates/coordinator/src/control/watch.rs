//! `WatchRollout`: a rollout's status now, then at every change. A watcher's cost per applied
//! entry must not grow with the rollout (nodes, audit trail, inputs): [`WatchCursor`] keeps what
//! was last sent and finds what changed by comparing the machine's node entries (no status is
//! built) and taking the events and inputs beyond the counts sent. Clients that ask
//! `incremental` get those deltas; others get full statuses, as before deltas existed.

use std::collections::HashMap;
use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use orch_proto::control as pb;
use orch_rollout::Rollout;
use orch_types::NodeId;
use orch_types::rollout::NodeProgress;
use tonic::{Request, Response, Status};

use super::status::{audit_event, head_of, node_of, policy_of};
use super::{ControlService, READ};
use crate::state::{ClusterState, Unresponsive};

/// Where this coordinator's health gates stand for a node: `GateBoard::healthy_since`.
pub(crate) type Gates<'a> = &'a dyn Fn(&NodeId) -> Option<u64>;

/// This coordinator's health gates as a watch reads them: per node ([`Gates`]), and the gate
/// board's change counter read before (`GateBoard::changes`; `None`: unknown). While the
/// counter stays the same, every node's gate is where the last delta saw it, and a delta need
/// not ask for each node again (a lock and a lookup per node, on every applied entry).
#[derive(Clone, Copy)]
pub(crate) struct Board<'a> {
    pub gates: Gates<'a>,
    pub rev: Option<u64>,
}

/// A watch sends at most one message per this long. A large rollout applies entries and moves
/// health gates hundreds of times a second, and each message costs a pass over the rollout's
/// nodes (a gate lookup each while gates move): batched, a watch's cost per second stays
/// bounded whatever the rate, on the leader that also drives the rollout. The watch channels
/// it waits on keep only the latest value anyway, so no state is lost, only intermediate
/// ones skipped, as they could be before.
const COALESCE: Duration = Duration::from_millis(20);

pub(super) type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::RolloutStatus, Status>> + Send>>;

/// What a watch last sent of one rollout.
#[derive(Default)]
pub(crate) struct WatchCursor {
    /// The scalars last sent ([`head_of`]).
    head: pb::RolloutStatus,
    events: usize,
    inputs: usize,
    /// Per node, in the rollout's order: what its last sent entry was built from.
    nodes: Vec<SentNode>,
    /// The gate board's change counter when `nodes` last read every node's gate.
    board_rev: Option<u64>,
}

#[derive(PartialEq)]
struct SentNode {
    progress: NodeProgress,
    unresponsive: Option<(u64, String)>,
    /// The gate board's `healthy_since` (None: this coordinator does not probe the node).
    gate: Option<u64>,
}

impl WatchCursor {
    /// The full status of `r` (what `status_of` and `with_gates` give) and a cursor at it.
    pub(crate) fn start(
        s: &ClusterState,
        r: &Rollout,
        board: Board<'_>,
    ) -> (WatchCursor, pb::RolloutStatus) {
        let mut cursor = WatchCursor::default();
        let mut st = cursor.delta(s, r, board);
        st.incremental = false;
        // Neither type can fail to serialize (plain data, string keys).
        st.spec_json = serde_json::to_string(r.spec()).unwrap_or_default();
        if st.inputs_json.is_empty() {
            st.inputs_json = "[]".to_string();
        }
        st.policy = Some(policy_of(r.spec()));
        (cursor, st)
    }

    /// What changed in `r` since the last status this cursor gave (a delta), or `None`.
    pub(crate) fn next(
        &mut self,
        s: &ClusterState,
        r: &Rollout,
        board: Board<'_>,
    ) -> Option<pb::RolloutStatus> {
        // A trail shorter than what was sent is not the rollout this cursor followed: start over
        // with a full status.
        if r.events().len() < self.events
            || r.inputs().len() < self.inputs
            || r.nodes().len() != self.nodes.len()
        {
            let (cursor, st) = WatchCursor::start(s, r, board);
            *self = cursor;
            return Some(st);
        }
        let before = std::mem::take(&mut self.head);
        let delta = self.delta(s, r, board);
        let changed = self.head != before
            || !delta.nodes.is_empty()
            || !delta.events.is_empty()
            || !delta.inputs_json.is_empty();
        changed.then_some(delta)
    }

    /// The scalars, the nodes whose entry changed and the events and inputs appended since
    /// what the cursor holds; the cursor then holds them.
    ///
    /// Called on every applied entry: what it does per node is a few comparisons (no lookup of
    /// the registry or the gate board per node), so that it costs little however many nodes
    /// the rollout has.
    fn delta(&mut self, s: &ClusterState, r: &Rollout, board: Board<'_>) -> pb::RolloutStatus {
        let mut nodes = Vec::new();
        // Nodes whose agent does not answer: usually none (one pass over the registry).
        let down_now: HashMap<&NodeId, &Unresponsive> = if s.any_unresponsive() {
            s.nodes
                .values()
                .filter_map(|n| Some((&n.id, n.unresponsive.as_ref()?)))
                .collect()
        } else {
            HashMap::new()
        };
        let board_same = board.rev.is_some() && board.rev == self.board_rev;
        self.board_rev = board.rev;
        for (i, n) in r.nodes().enumerate() {
            let down = if down_now.is_empty() {
                None
            } else {
                down_now.get(&n.id).copied()
            };
            let gate = match self.nodes.get(i) {
                Some(sent) if board_same => sent.gate,
                _ => (board.gates)(&n.id),
            };
            if let Some(sent) = self.nodes.get(i)
                && sent.progress == *n
                && sent.gate == gate
                && sent.unresponsive.as_ref().map(|(t, d)| (*t, d.as_str()))
                    == down.map(|u| (u.since_ms, u.detail.as_str()))
            {
                continue;
            }
            let mut entry = node_of(s, n);
            if let Some(since) = gate {
                entry.gate_watched = true;
                entry.healthy_since_ms = since;
            }
            nodes.push(entry);
            let sent = SentNode {
                progress: n.clone(),
                unresponsive: down.map(|u| (u.since_ms, u.detail.clone())),
                gate,
            };
            match self.nodes.get_mut(i) {
                Some(slot) => *slot = sent,
                None => self.nodes.push(sent),
            }
        }
        let events = r.events()[self.events..].iter().map(audit_event).collect();
        self.events = r.events().len();
        let added = &r.inputs()[self.inputs..];
        let inputs_json = if added.is_empty() {
            String::new()
        } else {
            serde_json::to_string(added).unwrap_or_default()
        };
        self.inputs = r.inputs().len();
        self.head = head_of(s, r);
        pb::RolloutStatus {
            nodes,
            events,
            inputs_json,
            incremental: true,
            ..self.head.clone()
        }
    }
}

/// The rollout a watch of `id` follows: empty names the running one, else the newest.
fn find_in<'a>(s: &'a ClusterState, id: &str) -> Option<&'a Rollout> {
    if id.is_empty() {
        s.active_rollout().or_else(|| s.latest_rollout())
    } else {
        s.find_rollout(id)
    }
}

/// Where a watched rollout stands between two messages.
enum Standing {
    Open,
    /// Finished, and its final phase was sent: nothing more to say.
    Done,
    /// No longer in the replicated state: archived.
    Gone,
}

impl ControlService {
    pub(super) async fn watch(
        &self,
        req: Request<pb::RolloutRef>,
    ) -> Result<Response<WatchStream>, Status> {
        self.check(&req, READ)?;
        let at = self.read_gate(&req).await?;
        let pb::RolloutRef {
            id: wanted,
            incremental,
        } = req.into_inner();
        let (cursor, first) = loop {
            let opened = {
                let gates = |n: &NodeId| self.shared.gates.healthy_since(n);
                let board = Board {
                    gates: &gates,
                    rev: Some(*self.shared.gates.changes().borrow()),
                };
                self.shared
                    .read(|s| find_in(s, &wanted).map(|r| WatchCursor::start(s, r, board)))
            };
            if let Some(opened) = opened {
                break opened;
            }
            match self.find(&wanted) {
                // Created since the line above: open it.
                Ok(_) => continue,
                // Archived (it finished long ago): its final status is all there is to watch.
                Err(e) => match self.archived_status(&wanted).await? {
                    Some(st) => return Ok(at.answer(Box::pin(tokio_stream::once(Ok(st))))),
                    None => return Err(e),
                },
            }
        };
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(self.clone().follow(cursor, first, incremental, tx));
        Ok(at.answer(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    /// Sends `first`, then a message at every change of the rollout, until it is finished (and
    /// that was sent) or archived, or the client goes away.
    async fn follow(
        self,
        mut cursor: WatchCursor,
        first: pb::RolloutStatus,
        incremental: bool,
        tx: tokio::sync::mpsc::Sender<Result<pb::RolloutStatus, Status>>,
    ) {
        let id = first.id.clone();
        let mut applied = self.shared.raft.applied();
        // A health gate's progress changes no replicated state, yet the view counts it.
        let mut gates = self.shared.gates.changes();
        // The full status the client holds: compared with an archived status, and sent whole to
        // clients that did not ask for deltas.
        let mut last = first.clone();
        if tx.send(Ok(first)).await.is_err() {
            return;
        }
        loop {
            let standing = self.shared.read(|s| match s.find_rollout(&id) {
                None => Standing::Gone,
                Some(r) if r.is_finished() && r.phase().to_string() == last.phase => Standing::Done,
                Some(_) => Standing::Open,
            });
            match standing {
                Standing::Open => {}
                Standing::Done => return,
                // Archived meanwhile (it had finished): its last status, then the end.
                Standing::Gone => {
                    if let Ok(Some(st)) = self.archived_status(&id).await
                        && st != last
                    {
                        let _ = tx.send(Ok(st)).await;
                    }
                    return;
                }
            }
            tokio::select! {
                r = applied.changed() => if r.is_err() { return },
                r = gates.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                _ = tx.closed() => return,
            }
            // Let the changes of the next moment join this one: see COALESCE.
            tokio::select! {
                _ = tokio::time::sleep(COALESCE) => {}
                _ = tx.closed() => return,
            }
            let delta = {
                let since = |n: &NodeId| self.shared.gates.healthy_since(n);
                // Read before the gates themselves: a change after it is seen next time.
                let board = Board {
                    gates: &since,
                    rev: Some(*gates.borrow_and_update()),
                };
                self.shared
                    .read(|s| s.find_rollout(&id).and_then(|r| cursor.next(s, r, board)))
            };
            let Some(delta) = delta else {
                continue;
            };
            let sent = incremental.then(|| delta.clone());
            last.merge_watch_update(delta);
            let msg = sent.unwrap_or_else(|| last.clone());
            if tx.send(Ok(msg)).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use orch_rollout::{ActionKind, ActionResult, Event, LogEntry};
    use orch_types::rollout::RolloutSpec;
    use orch_types::{RolloutId, VersionEntry};

    use super::*;
    use crate::control::status_of;
    use crate::state::{Command, Unresponsive};

    fn register(s: &mut ClusterState, id: &str) {
        s.apply(&Command::RegisterNode {
            id: id.parse().unwrap(),
            address: "127.0.0.1:1".into(),
            labels: BTreeMap::new(),
            versions: Vec::new(),
            at_ms: 0,
            stamp: None,
            activate_timeout_ms: 0,
        });
    }

    fn event(s: &mut ClusterState, event: Event, at_ms: u64) {
        s.apply(&Command::Rollout {
            id: RolloutId(1),
            entry: LogEntry {
                event,
                at_ms,
                by: "coordinator-1".into(),
            },
            term: 2,
        });
    }

    /// The result an agent would give: n2 fails its gate, so the rollout rolls back.
    fn result_of(a: &orch_rollout::Action) -> ActionResult {
        match &a.kind {
            ActionKind::Preflight => ActionResult::Preflight {
                running: "4.2.0".parse().unwrap(),
                free_disk: u64::MAX,
                releases: vec![VersionEntry {
                    version: "4.2.0".parse().unwrap(),
                    state: orch_types::ReleaseState::Permanent,
                }],
            },
            ActionKind::HealthGate { expect, .. }
                if a.node.as_str() == "n2" && expect.to_string() == "4.2.1" =>
            {
                ActionResult::Failed {
                    error: "probe reported 4.2.0".into(),
                }
            }
            _ => ActionResult::Done,
        }
    }

    /// What `GetRollout` answers: the status with the gate board's view.
    fn full(s: &ClusterState, gates: &HashMap<NodeId, u64>) -> pb::RolloutStatus {
        let mut st = status_of(s, s.find_rollout("r000001").unwrap(), true);
        for n in &mut st.nodes {
            if let Some(since) = gates.get(&n.id.parse::<NodeId>().unwrap()) {
                n.gate_watched = true;
                n.healthy_since_ms = *since;
            }
        }
        st
    }

    /// Deltas merged onto the first status give the full status after every change: nodes,
    /// events, inputs, scalars, gate board and liveness changes, through a failure and the
    /// rollback it causes; and a delta carries only what changed.
    #[test]
    fn merged_deltas_equal_the_full_status() {
        let mut s = ClusterState::default();
        for n in ["n1", "n2", "n3"] {
            register(&mut s, n);
        }
        let ids: Vec<NodeId> = ["n1", "n2", "n3"].map(|n| n.parse().unwrap()).into();
        let mut spec = RolloutSpec::new("x", "4.2.1".parse().unwrap(), ids.clone(), "operator/a");
        spec.min_healthy_time_ms = 0;
        s.apply(&Command::CreateRollout { spec, at_ms: 1 });
        let mut board: HashMap<NodeId, u64> = HashMap::new();
        let r = s.find_rollout("r000001").unwrap();
        let looked_up = |n: &NodeId| board.get(n).copied();
        let first = Board {
            gates: &looked_up,
            rev: None,
        };
        let (mut cursor, mut merged) = WatchCursor::start(&s, r, first);
        assert_eq!(merged, full(&s, &board), "the first status is the full one");
        let (mut t, mut deltas, mut small) = (1, 0, 0);
        while let Some(r) = s.find_rollout("r000001").filter(|r| !r.is_finished()) {
            t += 1;
            let in_flight = r.in_flight().to_vec();
            match t {
                // Changes outside the rollout's entries: a gate starts, sees n1 healthy;
                // n3's agent stops answering, then answers again.
                3 => {
                    board.insert(ids[0].clone(), 0);
                }
                4 => {
                    board.insert(ids[0].clone(), 1234);
                }
                5 | 7 => {
                    s.apply(&Command::NodeLiveness {
                        id: ids[2].clone(),
                        unresponsive: (t == 5).then(|| Unresponsive {
                            since_ms: 5,
                            detail: "no answer".into(),
                        }),
                    });
                }
                _ if in_flight.is_empty() => event(&mut s, Event::IssueActions, t),
                _ => {
                    for a in in_flight {
                        let result = result_of(&a);
                        event(&mut s, Event::Result { seq: a.seq, result }, t);
                    }
                }
            }
            let r = s.find_rollout("r000001").unwrap();
            let gates = |n: &NodeId| board.get(n).copied();
            let gates = Board {
                gates: &gates,
                rev: None,
            };
            if let Some(d) = cursor.next(&s, r, gates) {
                assert!(d.incremental && d.spec_json.is_empty() && d.policy.is_none());
                small += usize::from(d.nodes.len() < ids.len());
                deltas += 1;
                merged.merge_watch_update(d);
            }
            assert_eq!(merged, full(&s, &board), "after step {t}");
            assert!(cursor.next(&s, r, gates).is_none(), "nothing changed since");
        }
        assert_eq!(merged.phase, "rolled_back");
        // Most entries move one node (preflight and staging move all three at once).
        assert!(
            deltas > 8 && small * 4 > deltas * 3,
            "{deltas} deltas, {small} small"
        );
    }
    /// While the gate board's change counter stays the same, a delta takes every node's gate
    /// from what it sent (no lookup per node); once it moves, it looks again and sends the
    /// nodes whose gate changed.
    #[test]
    fn gates_are_looked_up_again_only_when_the_board_changed() {
        let mut s = ClusterState::default();
        for n in ["n1", "n2", "n3"] {
            register(&mut s, n);
        }
        let ids: Vec<NodeId> = ["n1", "n2", "n3"].map(|n| n.parse().unwrap()).into();
        let spec = RolloutSpec::new("x", "4.2.1".parse().unwrap(), ids.clone(), "operator/a");
        s.apply(&Command::CreateRollout { spec, at_ms: 1 });
        let r = s.find_rollout("r000001").unwrap();
        let calls = std::cell::Cell::new(0);
        let board: std::cell::RefCell<HashMap<NodeId, u64>> = Default::default();
        let gates = |n: &NodeId| {
            calls.set(calls.get() + 1);
            board.borrow().get(n).copied()
        };
        let at = |rev| Board {
            gates: &gates,
            rev: Some(rev),
        };
        let (mut cursor, _) = WatchCursor::start(&s, r, at(7));
        assert_eq!(calls.get(), 3, "the first status looks every node up");
        assert!(cursor.next(&s, r, at(7)).is_none());
        assert_eq!(calls.get(), 3, "same counter: no lookup");
        board.borrow_mut().insert(ids[1].clone(), 0);
        let d = cursor.next(&s, r, at(8)).expect("n2's gate started");
        assert_eq!(
            calls.get(),
            6,
            "the counter moved: every node looked up again"
        );
        assert_eq!(d.nodes.len(), 1);
        assert_eq!(d.nodes[0].id, "n2");
        assert!(d.nodes[0].gate_watched);
        // Without a counter, every delta looks up.
        assert!(
            cursor
                .next(
                    &s,
                    r,
                    Board {
                        gates: &gates,
                        rev: None
                    }
                )
                .is_none()
        );
        assert_eq!(calls.get(), 9);
    }
}
