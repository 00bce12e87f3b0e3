//! The replicated state machine on disk: one redb file (`DATA/state.redb`), separate from the
//! log (redb allows one write transaction at a time per file).
//!
//! Layout (table `sm`, all values JSON):
//! - `snapshot_meta`, `snapshot_data`: the current snapshot (what a lagging follower is sent),
//!   written together when a snapshot is built or installed. `snapshot_data` is a
//!   [`SnapshotPayload`]: the whole [`ClusterState`] with its last applied id and membership,
//!   which is also what the state machine starts from after a restart, so the state is stored
//!   once.
//! - Files written by earlier versions also hold `last_applied`, `membership` and `state` (a
//!   second copy of the same state); they are read when there is no snapshot and removed with
//!   the next snapshot.
//!
//! Archived rollouts ([`Command::ArchiveRollouts`]) are appended to the history file (see
//! [`crate::history`]) and fsynced before the command applies, so no snapshot can lack them
//! in both places.
//!
//! Durability: applying entries writes nothing; the applied state lives in memory and is
//! persisted with each snapshot (every `snapshot_every` entries), committed with
//! `Durability::Immediate`. After a restart or crash the state machine starts at its last
//! snapshot and openraft re-applies the committed entries after it from the log (the log keeps
//! every entry after the last snapshot and persists the committed id), so no applied entry is
//! lost and applying is deterministic. The cost this avoids is serializing and writing the
//! whole state on every commit, on every coordinator, which grew with the rollout history.
//!
//! The in-memory `ClusterState` is the shared [`StateView`]: readers see every applied entry at
//! once, and the `applied` watch announces the new last-applied index after each batch.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use futures::{Stream, StreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::log_store::{Db, DbCloser, decode, encode, join_err, on_db, open_db};
use super::types::{LogId, Snapshot, SnapshotData, SnapshotMeta, StoredMembership, TypeConfig};
use crate::history::{History, HistoryRecord};
use crate::state::{ClusterState, Command, Response};

const SM: TableDefinition<&str, &[u8]> = TableDefinition::new("sm");

const KEY_LAST_APPLIED: &str = "last_applied";
const KEY_MEMBERSHIP: &str = "membership";
const KEY_STATE: &str = "state";
const KEY_SNAPSHOT_META: &str = "snapshot_meta";
const KEY_SNAPSHOT_DATA: &str = "snapshot_data";

/// File name of the state machine inside the data directory.
pub const STATE_FILE: &str = "state.redb";

/// The shared read view of the applied [`ClusterState`].
///
/// Updated on every apply batch and snapshot install. Hold the guard briefly (never across an
/// `.await`): the state machine takes the write lock to apply entries. A poisoned lock only
/// means a reader panicked; `read().unwrap_or_else(|p| p.into_inner())` is fine.
pub type StateView = Arc<RwLock<ClusterState>>;

fn write_view(v: &StateView) -> RwLockWriteGuard<'_, ClusterState> {
    v.write().unwrap_or_else(|e| e.into_inner())
}

fn read_view(v: &StateView) -> RwLockReadGuard<'_, ClusterState> {
    v.read().unwrap_or_else(|e| e.into_inner())
}

/// What a snapshot's bytes hold.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotPayload {
    /// `TERM-NODE-INDEX-NONCE` of the last included entry; unique per build.
    pub id: String,
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    pub state: ClusterState,
}

/// What `open` found on disk.
enum Stored {
    /// The current snapshot's payload.
    Snapshot(Vec<u8>),
    /// No snapshot: the keys of files written by earlier versions (or nothing at all).
    Keys(Option<Vec<u8>>, Option<Vec<u8>>, Option<Vec<u8>>),
}

/// Removes the keys of the earlier layout, whose state the new snapshot replaces.
fn remove_old_keys(t: &mut redb::Table<&str, &[u8]>) -> Result<(), redb::Error> {
    for k in [KEY_STATE, KEY_LAST_APPLIED, KEY_MEMBERSHIP] {
        t.remove(k)?;
    }
    Ok(())
}

/// openraft's state machine over [`ClusterState`], persisted in redb.
pub struct StateMachineStore {
    db: Arc<Db>,
    path: Arc<PathBuf>,
    /// Where archived rollouts go.
    history: History,
    view: StateView,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    applied_tx: watch::Sender<u64>,
}

impl StateMachineStore {
    /// Opens (or creates) the state machine at `path` and loads the persisted state into a new
    /// [`StateView`]; archived rollouts go to `history.jsonl` beside it.
    pub async fn open(path: impl AsRef<Path>) -> io::Result<StateMachineStore> {
        let path = path.as_ref().to_path_buf();
        let history = History::new(path.with_file_name(crate::history::HISTORY_FILE));
        Self::open_with_history(path, history).await
    }

    /// [`StateMachineStore::open`] with the history file at its own place.
    pub async fn open_with_history(
        path: impl AsRef<Path>,
        history: History,
    ) -> io::Result<StateMachineStore> {
        let path = path.as_ref().to_path_buf();
        let p = path.clone();
        let (db, raw) = tokio::task::spawn_blocking(move || -> io::Result<_> {
            let db = open_db(&p, &[SM], &[])?;
            let read = || -> Result<_, redb::Error> {
                let tx = db.begin_read()?;
                let t = tx.open_table(SM)?;
                let get = |k: &str| -> Result<Option<Vec<u8>>, redb::Error> {
                    Ok(t.get(k)?.map(|v| v.value().to_vec()))
                };
                // The snapshot holds the state; the old keys only matter without one.
                if let Some(data) = get(KEY_SNAPSHOT_DATA)? {
                    return Ok(Stored::Snapshot(data));
                }
                Ok(Stored::Keys(
                    get(KEY_LAST_APPLIED)?,
                    get(KEY_MEMBERSHIP)?,
                    get(KEY_STATE)?,
                ))
            };
            let raw = read()
                .map_err(|e| io::Error::other(format!("cannot read {}: {e}", p.display())))?;
            Ok((db, raw))
        })
        .await
        .map_err(join_err)??;
        let (last_applied, membership, state) = match raw {
            Stored::Snapshot(data) => {
                let p: SnapshotPayload = decode(&path, KEY_SNAPSHOT_DATA, &data)?;
                (p.last_applied, p.membership, p.state)
            }
            Stored::Keys(la, mem, st) => (
                match la {
                    Some(b) => decode(&path, KEY_LAST_APPLIED, &b)?,
                    None => None,
                },
                match mem {
                    Some(b) => decode(&path, KEY_MEMBERSHIP, &b)?,
                    None => StoredMembership::default(),
                },
                match st {
                    Some(b) => decode(&path, KEY_STATE, &b)?,
                    None => ClusterState::default(),
                },
            ),
        };
        let (applied_tx, _) = watch::channel(last_applied.as_ref().map_or(0, |l| l.index));
        Ok(StateMachineStore {
            db: Db::new(db),
            path: Arc::new(path),
            history,
            view: Arc::new(RwLock::new(state)),
            last_applied,
            membership,
            applied_tx,
        })
    }

    /// The shared read view of the applied state.
    pub fn view(&self) -> StateView {
        self.view.clone()
    }

    /// A watch of the last applied log index (0 before anything was applied).
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.applied_tx.subscribe()
    }

    /// A handle that does not keep the database open; used to flush and wait for the close.
    pub(crate) fn closer(&self) -> DbCloser {
        Db::closer(&self.db, self.path.to_path_buf())
    }

    async fn blocking<R, F>(&self, what: &'static str, f: F) -> io::Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&Database) -> Result<R, redb::Error> + Send + 'static,
    {
        on_db(&self.db, "state machine", &self.path, what, f).await
    }

    /// Writes the rollouts that an archive command will remove to the history file and waits
    /// until they are durable. Only those it will remove (present and finished): the same
    /// check as [`ClusterState::apply`], on the same state.
    async fn archive(&self, ids: &[orch_types::RolloutId], at_ms: u64) -> io::Result<()> {
        let records: Vec<HistoryRecord> = {
            let s = read_view(&self.view);
            ids.iter()
                .filter(|id| s.archivable(**id))
                .filter_map(|id| {
                    let r = s.rollouts.get(id)?;
                    let created = s.created_at.get(id).copied().unwrap_or(0);
                    Some(HistoryRecord::of(*id, r, created, at_ms))
                })
                .collect()
        };
        if records.is_empty() {
            return Ok(());
        }
        let history = self.history.clone();
        tokio::task::spawn_blocking(move || history.append(&records))
            .await
            .map_err(join_err)?
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot archive finished rollouts: {e}; this coordinator stops applying the log until it can (fix the disk and restart it)"
                    ),
                )
            })
    }

    fn publish_applied(&self) {
        let idx = self.last_applied.as_ref().map_or(0, |l| l.index);
        self.applied_tx.send_if_modified(|cur| {
            if *cur != idx {
                *cur = idx;
                true
            } else {
                false
            }
        });
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let mut batch = Vec::new();
        while let Some(item) = entries.next().await {
            batch.push(item?);
        }
        if batch.is_empty() {
            return Ok(());
        }

        // Apply in memory (the shared view), collecting the responses. The write lock is taken
        // per entry: an archive entry first writes the rollouts it removes to the history file
        // (an await, which must not hold the lock).
        let mut replies = Vec::with_capacity(batch.len());
        for (entry, responder) in batch {
            let log_id = entry.log_id;
            if let EntryPayload::Normal(cmd) = &entry.payload
                && let Command::ArchiveRollouts {
                    rollouts, at_ms, ..
                } = &cmd.0
            {
                self.archive(rollouts, *at_ms).await?;
            }
            let response = match entry.payload {
                EntryPayload::Blank => Response::default(),
                EntryPayload::Normal(cmd) => write_view(&self.view).apply(&cmd.0),
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(log_id), m);
                    Response::default()
                }
            };
            self.last_applied = Some(log_id);
            replies.push((responder, response));
        }

        // Nothing is written here: the state is persisted with each snapshot (see the module
        // docs), and the entries after it are re-applied from the log after a restart. Writing
        // the whole state per batch made every commit slower as the history grew.

        for (responder, response) in replies {
            if let Some(r) = responder {
                r.send(response);
            }
        }
        self.publish_applied();
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // Capture a consistent (state, last applied, membership) triple now: openraft calls this
        // between apply batches; the builder then runs concurrently with later applies.
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let id = match &self.last_applied {
            Some(l) => format!(
                "{}-{}-{}-{nonce:x}",
                l.leader_id.term, l.leader_id.node_id, l.index
            ),
            None => format!("0-0-0-{nonce:x}"),
        };
        // Cheap: rollouts are shared (`Arc`), so this copies the registry and pointers; the
        // serialization happens in the builder, without the lock.
        let payload = SnapshotPayload {
            id,
            last_applied: self.last_applied,
            membership: self.membership.clone(),
            state: read_view(&self.view).clone(),
        };
        SnapshotBuilder {
            db: self.db.clone(),
            path: self.path.clone(),
            payload: Some(payload),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> Result<(), io::Error> {
        let payload: SnapshotPayload = decode(&self.path, "snapshot", &snapshot)?;
        tracing::info!(
            snapshot = %payload.id,
            last_log_id = ?meta.last_log_id,
            "installing snapshot"
        );
        let meta_json = encode(meta)?;
        self.blocking("install snapshot", move |db| {
            let mut tx = db.begin_write()?;
            tx.set_durability(Durability::Immediate)?;
            {
                let mut t = tx.open_table(SM)?;
                // The snapshot's bytes are also the state a restart starts from.
                t.insert(KEY_SNAPSHOT_META, meta_json.as_slice())?;
                t.insert(KEY_SNAPSHOT_DATA, snapshot.as_slice())?;
                remove_old_keys(&mut t)?;
            }
            tx.commit()?;
            Ok(())
        })
        .await?;
        *write_view(&self.view) = payload.state;
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.publish_applied();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let raw = self
            .blocking("read snapshot", |db| {
                let tx = db.begin_read()?;
                let t = tx.open_table(SM)?;
                let meta = t.get(KEY_SNAPSHOT_META)?.map(|v| v.value().to_vec());
                let data = t.get(KEY_SNAPSHOT_DATA)?.map(|v| v.value().to_vec());
                Ok(meta.zip(data))
            })
            .await?;
        match raw {
            None => Ok(None),
            Some((meta, data)) => Ok(Some(Snapshot {
                meta: decode(&self.path, KEY_SNAPSHOT_META, &meta)?,
                snapshot: data,
            })),
        }
    }
}

/// Builds (and persists) a snapshot from the triple captured by `get_snapshot_builder`.
pub struct SnapshotBuilder {
    db: Arc<Db>,
    path: Arc<PathBuf>,
    payload: Option<SnapshotPayload>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let payload = self
            .payload
            .take()
            .ok_or_else(|| io::Error::other("snapshot builder used twice"))?;
        let meta = SnapshotMeta {
            last_log_id: payload.last_applied,
            last_membership: payload.membership.clone(),
        };
        let snapshot_id = payload.id.clone();
        // Serializing the whole state is CPU work: off the async runtime.
        let (data, meta_json) = tokio::task::spawn_blocking({
            let meta = meta.clone();
            move || Ok::<_, io::Error>((encode(&payload)?, encode(&meta)?))
        })
        .await
        .map_err(join_err)??;
        let path = self.path.clone();
        let new_last = meta.last_log_id;
        let d = data.clone();
        on_db(
            &self.db,
            "state machine",
            &self.path,
            "store snapshot",
            move |db| {
                let mut tx = db.begin_write()?;
                tx.set_durability(Durability::Immediate)?;
                {
                    let mut t = tx.open_table(SM)?;
                    // Never replace a newer snapshot (an install may have raced this build).
                    let current: Option<SnapshotMeta> = t
                        .get(KEY_SNAPSHOT_META)?
                        .map(|v| serde_json::from_slice(v.value()))
                        .transpose()
                        .map_err(|e| {
                            redb::Error::Corrupted(format!(
                                "{}: snapshot meta: {e}",
                                path.display()
                            ))
                        })?;
                    let newer_exists = current.is_some_and(|c| c.last_log_id > new_last);
                    if !newer_exists {
                        // Also the state a restart starts from (with its last applied id and
                        // membership); later entries are re-applied from the log.
                        t.insert(KEY_SNAPSHOT_META, meta_json.as_slice())?;
                        t.insert(KEY_SNAPSHOT_DATA, d.as_slice())?;
                        remove_old_keys(&mut t)?;
                    }
                }
                // Immediate: also makes the preceding (Durability::None) apply batches durable.
                tx.commit()?;
                Ok(())
            },
        )
        .await?;
        tracing::info!(snapshot = %snapshot_id, last_log_id = ?meta.last_log_id, bytes = data.len(), "built snapshot");
        Ok(Snapshot {
            meta,
            snapshot: data,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use openraft::entry::RaftEntry;
    use orch_rollout::{Event, LogEntry};
    use orch_types::RolloutId;
    use orch_types::rollout::RolloutSpec;

    use super::*;
    use crate::history::HISTORY_FILE;
    use crate::raft::types::{Entry, RaftCommand};

    fn lid(index: u64) -> LogId {
        LogId::new(
            openraft::impls::leader_id_adv::LeaderId {
                term: 1,
                node_id: 1,
            },
            index,
        )
    }

    /// Commands that register a node and run `n` rollouts to their end (aborted).
    fn commands(n: u64) -> Vec<Command> {
        let mut out = vec![Command::RegisterNode {
            id: "n1".parse().unwrap(),
            address: "127.0.0.1:1".into(),
            labels: BTreeMap::new(),
            versions: Vec::new(),
            at_ms: 0,
            stamp: None,
            activate_timeout_ms: 0,
        }];
        for i in 1..=n {
            let spec = RolloutSpec::new(
                "r0",
                "4.2.1".parse().unwrap(),
                vec!["n1".parse().unwrap()],
                "alice",
            );
            out.push(Command::CreateRollout {
                spec,
                at_ms: 1000 + i,
            });
            out.push(Command::Rollout {
                id: RolloutId(i),
                entry: LogEntry {
                    event: Event::Command(orch_rollout::Command::Abort),
                    at_ms: 2000 + i,
                    by: "alice".into(),
                },
                term: 0,
            });
        }
        out
    }

    /// Applies `cmds` as entries `first..`.
    async fn apply(sm: &mut StateMachineStore, first: u64, cmds: Vec<Command>) {
        let entries: Vec<_> = cmds
            .into_iter()
            .zip(first..)
            .map(|(c, i)| Ok((Entry::new_normal(lid(i), RaftCommand(c)), None)))
            .collect();
        sm.apply(futures::stream::iter(entries)).await.unwrap();
    }

    fn keys(path: &Path) -> Vec<String> {
        let db = Database::open(path).unwrap();
        let tx = db.begin_read().unwrap();
        let t = tx.open_table(SM).unwrap();
        t.iter()
            .unwrap()
            .map(|kv| kv.unwrap().0.value().to_string())
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_is_stored_once_and_is_what_a_restart_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        let state = {
            let mut sm = StateMachineStore::open(&path).await.unwrap();
            apply(&mut sm, 1, commands(3)).await;
            let mut b = sm.get_snapshot_builder().await;
            let snap = b.build_snapshot().await.unwrap();
            assert_eq!(snap.meta.last_log_id, Some(lid(7)));
            let st = read_view(&sm.view).clone();
            assert_eq!(st.rollouts.len(), 3);
            st
        };
        // One copy of the state on disk: the snapshot.
        assert_eq!(keys(&path), vec![KEY_SNAPSHOT_DATA, KEY_SNAPSHOT_META]);
        let mut sm = StateMachineStore::open(&path).await.unwrap();
        assert_eq!(*read_view(&sm.view), state);
        assert_eq!(sm.applied_state().await.unwrap().0, Some(lid(7)));
        let current = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta.last_log_id, Some(lid(7)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn files_of_the_earlier_layout_still_load_and_lose_the_second_copy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        // What earlier versions wrote with every snapshot: the state twice (`state` and inside
        // `snapshot_data`) plus `last_applied` and `membership`.
        let mut state = ClusterState::default();
        for c in commands(2) {
            state.apply(&c);
        }
        let payload = SnapshotPayload {
            id: "1-1-5-0".into(),
            last_applied: Some(lid(5)),
            membership: StoredMembership::default(),
            state: state.clone(),
        };
        let meta = SnapshotMeta {
            last_log_id: Some(lid(5)),
            last_membership: StoredMembership::default(),
        };
        let write = |with_snapshot: bool| {
            let _ = std::fs::remove_file(&path);
            let db = open_db(&path, &[SM], &[]).unwrap();
            let tx = db.begin_write().unwrap();
            {
                let mut t = tx.open_table(SM).unwrap();
                t.insert(KEY_STATE, encode(&state).unwrap().as_slice())
                    .unwrap();
                t.insert(KEY_LAST_APPLIED, encode(&Some(lid(5))).unwrap().as_slice())
                    .unwrap();
                t.insert(
                    KEY_MEMBERSHIP,
                    encode(&StoredMembership::default()).unwrap().as_slice(),
                )
                .unwrap();
                if with_snapshot {
                    t.insert(KEY_SNAPSHOT_META, encode(&meta).unwrap().as_slice())
                        .unwrap();
                    t.insert(KEY_SNAPSHOT_DATA, encode(&payload).unwrap().as_slice())
                        .unwrap();
                }
            }
            tx.commit().unwrap();
        };
        for with_snapshot in [false, true] {
            write(with_snapshot);
            let mut sm = StateMachineStore::open(&path).await.unwrap();
            assert_eq!(
                *read_view(&sm.view),
                state,
                "with snapshot: {with_snapshot}"
            );
            assert_eq!(sm.applied_state().await.unwrap().0, Some(lid(5)));
            // The next snapshot replaces the old keys.
            apply(&mut sm, 6, commands(0)).await;
            sm.get_snapshot_builder()
                .await
                .build_snapshot()
                .await
                .unwrap();
            drop(sm);
            assert_eq!(keys(&path), vec![KEY_SNAPSHOT_DATA, KEY_SNAPSHOT_META]);
            let sm = StateMachineStore::open(&path).await.unwrap();
            assert_eq!(read_view(&sm.view).rollouts, state.rollouts);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn archiving_writes_the_history_before_the_rollouts_leave_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        let mut sm = StateMachineStore::open(&path).await.unwrap();
        // The rollouts finish and are archived in one batch (as a lagging follower applies
        // them): the history still gets them.
        let mut cmds = commands(3);
        cmds.push(Command::ArchiveRollouts {
            rollouts: vec![RolloutId(1), RolloutId(2), RolloutId(9)],
            packages: Vec::new(),
            grace_ms: 0,
            at_ms: 5000,
        });
        apply(&mut sm, 1, cmds).await;
        let ids: Vec<u64> = read_view(&sm.view).rollouts.keys().map(|i| i.0).collect();
        assert_eq!(ids, vec![3]);
        let history = History::new(dir.path().join(HISTORY_FILE));
        let all = history.read_all().unwrap();
        assert_eq!(
            all.iter().map(|r| r.id.0).collect::<Vec<_>>(),
            vec![1, 2],
            "only what was archived"
        );
        assert_eq!(all[0].created_at_ms, 1001);
        assert_eq!(all[0].archived_at_ms, 5000);
        assert_eq!(all[0].status.phase.to_string(), "aborted");
        assert!(!all[0].status.events.is_empty());
        // Re-applied after a crash (the entry after the last snapshot): a duplicate line that
        // readers fold into one, and nothing else archived.
        drop(sm);
        let mut sm = StateMachineStore::open(&path).await.unwrap();
        let mut cmds = commands(3);
        cmds.push(Command::ArchiveRollouts {
            rollouts: vec![RolloutId(1), RolloutId(2)],
            packages: Vec::new(),
            grace_ms: 0,
            at_ms: 5000,
        });
        apply(&mut sm, 1, cmds).await;
        let text = std::fs::read_to_string(history.path()).unwrap();
        assert_eq!(text.lines().count(), 4);
        assert_eq!(history.read_all().unwrap(), all);
    }
}
