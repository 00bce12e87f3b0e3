//! The replicated state machine on disk: one redb file (`DATA/state.redb`), separate from the
//! log (redb allows one write transaction at a time per file).
//!
//! Layout (table `sm`, all values JSON):
//! - `last_applied`, `membership`, `state` (the whole [`ClusterState`]): the state as of the
//!   current snapshot, written together in the transaction that stores the snapshot (built or
//!   installed);
//! - `snapshot_meta`, `snapshot_data`: the current snapshot (what a lagging follower is sent).
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

use super::log_store::{Db, DbCloser, decode, encode, join_err, open_db};
use super::types::{LogId, Snapshot, SnapshotData, SnapshotMeta, StoredMembership, TypeConfig};
use crate::state::{ClusterState, Response};

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

/// openraft's state machine over [`ClusterState`], persisted in redb.
pub struct StateMachineStore {
    db: Arc<Db>,
    path: Arc<PathBuf>,
    view: StateView,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    applied_tx: watch::Sender<u64>,
}

impl StateMachineStore {
    /// Opens (or creates) the state machine at `path` and loads the persisted state into a new
    /// [`StateView`].
    pub async fn open(path: impl AsRef<Path>) -> io::Result<StateMachineStore> {
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
                Ok((
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
        let (la, mem, st) = raw;
        let last_applied: Option<LogId> = match la {
            Some(b) => decode(&path, KEY_LAST_APPLIED, &b)?,
            None => None,
        };
        let membership: StoredMembership = match mem {
            Some(b) => decode(&path, KEY_MEMBERSHIP, &b)?,
            None => StoredMembership::default(),
        };
        let state: ClusterState = match st {
            Some(b) => decode(&path, KEY_STATE, &b)?,
            None => ClusterState::default(),
        };
        let (applied_tx, _) = watch::channel(last_applied.as_ref().map_or(0, |l| l.index));
        Ok(StateMachineStore {
            db: Db::new(db),
            path: Arc::new(path),
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
        blocking(&self.db, &self.path, what, f).await
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

async fn blocking<R, F>(
    db: &Arc<Db>,
    path: &Arc<PathBuf>,
    what: &'static str,
    f: F,
) -> io::Result<R>
where
    R: Send + 'static,
    F: FnOnce(&Database) -> Result<R, redb::Error> + Send + 'static,
{
    let db = db.clone();
    let path = path.clone();
    tokio::task::spawn_blocking(move || f(&db))
        .await
        .map_err(join_err)?
        .map_err(|e| {
            io::Error::other(format!(
                "state machine {}: {what} failed: {e}; check the disk (space, permissions) under the data directory",
                path.display()
            ))
        })
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

        // Apply in memory (the shared view), collecting the responses.
        let mut replies = Vec::with_capacity(batch.len());
        {
            let mut state = write_view(&self.view);
            for (entry, responder) in batch {
                let log_id = entry.log_id;
                let response = match entry.payload {
                    EntryPayload::Blank => Response::default(),
                    EntryPayload::Normal(cmd) => state.apply(&cmd.0),
                    EntryPayload::Membership(m) => {
                        self.membership = StoredMembership::new(Some(log_id), m);
                        Response::default()
                    }
                };
                self.last_applied = Some(log_id);
                replies.push((responder, response));
            }
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
        let state = encode(&payload.state)?;
        let la = encode(&meta.last_log_id)?;
        let mem = encode(&meta.last_membership)?;
        let meta_json = encode(meta)?;
        self.blocking("install snapshot", move |db| {
            let mut tx = db.begin_write()?;
            tx.set_durability(Durability::Immediate)?;
            {
                let mut t = tx.open_table(SM)?;
                t.insert(KEY_STATE, state.as_slice())?;
                t.insert(KEY_LAST_APPLIED, la.as_slice())?;
                t.insert(KEY_MEMBERSHIP, mem.as_slice())?;
                t.insert(KEY_SNAPSHOT_META, meta_json.as_slice())?;
                t.insert(KEY_SNAPSHOT_DATA, snapshot.as_slice())?;
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
        let data = encode(&payload)?;
        let meta_json = encode(&meta)?;
        let state = encode(&payload.state)?;
        let la = encode(&payload.last_applied)?;
        let mem = encode(&payload.membership)?;
        let path = self.path.clone();
        let new_last = meta.last_log_id;
        let d = data.clone();
        blocking(&self.db, &self.path, "store snapshot", move |db| {
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
                        redb::Error::Corrupted(format!("{}: snapshot meta: {e}", path.display()))
                    })?;
                let newer_exists = current.is_some_and(|c| c.last_log_id > new_last);
                if !newer_exists {
                    t.insert(KEY_SNAPSHOT_META, meta_json.as_slice())?;
                    t.insert(KEY_SNAPSHOT_DATA, d.as_slice())?;
                    // The state a restart starts from: this snapshot's, consistent with its
                    // last applied id and membership; later entries are re-applied from the log.
                    t.insert(KEY_STATE, state.as_slice())?;
                    t.insert(KEY_LAST_APPLIED, la.as_slice())?;
                    t.insert(KEY_MEMBERSHIP, mem.as_slice())?;
                }
            }
            // Immediate: also makes the preceding (Durability::None) apply batches durable.
            tx.commit()?;
            Ok(())
        })
        .await?;
        tracing::info!(snapshot = %payload.id, last_log_id = ?meta.last_log_id, bytes = data.len(), "built snapshot");
        Ok(Snapshot {
            meta,
            snapshot: data,
        })
    }
}
