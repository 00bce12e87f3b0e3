//! The Raft log on disk: one redb file (`DATA/raft-log.redb`).
//!
//! Layout:
//! - table `entries`: log index (u64) -> JSON of the openraft entry;
//! - table `meta`: `vote`, `committed`, `last_purged` -> JSON of the openraft value.
//!
//! Durability points:
//! - `save_vote`, `truncate_after` and `purge` commit with `Durability::Immediate` (fsync)
//!   before they return.
//! - `append` commits the entries without fsync (readable at once, as openraft requires when
//!   it returns), then an Immediate commit on the blocking pool makes them durable, and only
//!   after that commit does it fire openraft's flush callback. openraft counts an entry towards
//!   a quorum only after that callback, so the leader's fsync overlaps the replication.
//! - `purge` writes `last_purged` and deletes the entries in the same transaction, so the
//!   recorded purge point never trails the deleted entries.
//! - `save_committed` commits with `Durability::None`: it becomes durable with the next
//!   Immediate commit. Losing it in a crash only makes the node re-learn the commit index from
//!   the leader; the state machine persists its own last-applied id.
//!
//! redb is synchronous, so every operation runs on the blocking thread pool.

use std::fmt::Debug;
use std::io;
use std::ops::Deref;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::types::{Entry, LogId, TypeConfig, Vote};

const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_LAST_PURGED: &str = "last_purged";

/// File name of the Raft log inside the data directory.
pub const LOG_FILE: &str = "raft-log.redb";

/// A redb database that announces when it is closed (its file lock released), so a restart
/// in the same process can reopen the file.
pub(crate) struct Db {
    db: Option<Database>,
    closed_tx: tokio::sync::watch::Sender<()>,
}

impl Deref for Db {
    type Target = Database;

    fn deref(&self) -> &Database {
        self.db.as_ref().expect("database is open")
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        // Close the file first; `closed_tx` is dropped after this, waking `DbCloser`.
        drop(self.db.take());
    }
}

impl Db {
    pub(crate) fn new(db: Database) -> Arc<Db> {
        Arc::new(Db {
            db: Some(db),
            closed_tx: tokio::sync::watch::channel(()).0,
        })
    }

    pub(crate) fn closer(this: &Arc<Db>, path: PathBuf) -> DbCloser {
        DbCloser {
            weak: Arc::downgrade(this),
            closed: this.closed_tx.subscribe(),
            path,
        }
    }
}

/// Flushes a database and waits until every handle on it is gone, without keeping it open.
pub(crate) struct DbCloser {
    weak: Weak<Db>,
    closed: tokio::sync::watch::Receiver<()>,
    path: PathBuf,
}

impl DbCloser {
    /// Makes every earlier `Durability::None` commit durable (no-op once closed).
    pub(crate) async fn flush(&self) -> io::Result<()> {
        let Some(db) = self.weak.upgrade() else {
            return Ok(());
        };
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || -> Result<(), redb::Error> {
            let tx = db.begin_write()?;
            tx.commit()?;
            Ok(())
        })
        .await
        .map_err(join_err)?
        .map_err(|e| io::Error::other(format!("flush {}: {e}", path.display())))
    }

    /// Waits until the file is closed; `false` after `timeout`.
    pub(crate) async fn wait_closed(&mut self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, async {
            while self.closed.changed().await.is_ok() {}
        })
        .await
        .is_ok()
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

/// The redb-backed Raft log. Cheap to clone: clones share the database (the log reader handed
/// to replication tasks is a clone).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Db>,
    path: Arc<PathBuf>,
}

impl LogStore {
    /// Opens (or creates) the log at `path`.
    pub async fn open(path: impl AsRef<Path>) -> io::Result<LogStore> {
        let path = path.as_ref().to_path_buf();
        let p = path.clone();
        let db = tokio::task::spawn_blocking(move || open_db(&p, &[META], &[ENTRIES]))
            .await
            .map_err(join_err)??;
        Ok(LogStore {
            db: Db::new(db),
            path: Arc::new(path),
        })
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
        on_db(&self.db, "Raft log", &self.path, what, f).await
    }

    async fn read_meta<T: DeserializeOwned + Send + 'static>(
        &self,
        key: &'static str,
    ) -> io::Result<Option<T>> {
        let raw = self
            .blocking("read", move |db| {
                let tx = db.begin_read()?;
                let t = tx.open_table(META)?;
                Ok(t.get(key)?.map(|v| v.value().to_vec()))
            })
            .await?;
        raw.map(|b| decode(&self.path, key, &b)).transpose()
    }

    async fn write_meta<T: Serialize>(
        &self,
        key: &'static str,
        value: &T,
        durability: Durability,
    ) -> io::Result<()> {
        let bytes = encode(value)?;
        self.blocking("write", move |db| {
            let mut tx = db.begin_write()?;
            tx.set_durability(durability)?;
            {
                let mut t = tx.open_table(META)?;
                t.insert(key, bytes.as_slice())?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn read_range(&self, start: Bound<u64>, end: Bound<u64>) -> io::Result<Vec<Entry>> {
        let raw = self
            .blocking("read entries", move |db| {
                let tx = db.begin_read()?;
                let t = tx.open_table(ENTRIES)?;
                let mut out = Vec::new();
                for item in t.range::<u64>((start, end))? {
                    let (k, v) = item?;
                    out.push((k.value(), v.value().to_vec()));
                }
                Ok(out)
            })
            .await?;
        raw.into_iter()
            .map(|(i, b)| decode(&self.path, "entry", &b).map(|e: Entry| (i, e)))
            .map(|r| {
                r.and_then(|(i, e)| {
                    if e.log_id.index == i {
                        Ok(e)
                    } else {
                        Err(io::Error::other(format!(
                            "Raft log {}: entry stored at index {i} has log id {}; the file is corrupt",
                            self.path.display(),
                            e.log_id
                        )))
                    }
                })
            })
            .collect()
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let start = range.start_bound().cloned();
        let end = range.end_bound().cloned();
        if is_empty_range(start, end) {
            return Ok(Vec::new());
        }
        self.read_range(start, end).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        self.read_meta(KEY_VOTE).await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged: Option<LogId> = self.read_meta(KEY_LAST_PURGED).await?;
        let last = self
            .blocking("read last entry", |db| {
                let tx = db.begin_read()?;
                let t = tx.open_table(ENTRIES)?;
                Ok(t.last()?.map(|(_, v)| v.value().to_vec()))
            })
            .await?;
        let last_log_id = match last {
            Some(b) => Some(decode::<Entry>(&self.path, "entry", &b)?.log_id),
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.write_meta(KEY_VOTE, vote, Durability::Immediate).await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        self.write_meta(KEY_COMMITTED, &committed, Durability::None)
            .await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        Ok(self
            .read_meta::<Option<LogId>>(KEY_COMMITTED)
            .await?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut rows = Vec::new();
        for e in entries {
            rows.push((e.log_id.index, encode(&e)?));
        }
        if rows.is_empty() {
            callback.io_completed(Ok(()));
            return Ok(());
        }
        // 1. Readable at once: a non-durable commit (no fsync), so openraft can replicate the
        //    entries while they are being made durable here.
        // 2. Durable in the background: an empty Immediate commit persists every earlier commit;
        //    only then does the callback tell openraft the entries are on disk. (Flushes may
        //    finish out of order; a later flush covers the earlier entries and openraft ignores
        //    a completion older than one it already has.)
        self.blocking("append", move |db| {
            let mut tx = db.begin_write()?;
            tx.set_durability(Durability::None)?;
            {
                let mut t = tx.open_table(ENTRIES)?;
                for (i, b) in &rows {
                    t.insert(*i, b.as_slice())?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await?;
        let db = self.db.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let r = (|| -> Result<(), redb::Error> {
                let mut tx = db.begin_write()?;
                tx.set_durability(Durability::Immediate)?;
                tx.commit()?;
                Ok(())
            })();
            callback.io_completed(r.map_err(|e| {
                io::Error::other(format!("Raft log {}: flush failed: {e}", path.display()))
            }));
        });
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map(|l| l.index + 1).unwrap_or(0);
        self.blocking("truncate", move |db| {
            let mut tx = db.begin_write()?;
            tx.set_durability(Durability::Immediate)?;
            {
                let mut t = tx.open_table(ENTRIES)?;
                t.retain_in::<u64, _>(from.., |_, _| false)?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let upto = log_id.index;
        let bytes = encode(&log_id)?;
        self.blocking("purge", move |db| {
            let mut tx = db.begin_write()?;
            tx.set_durability(Durability::Immediate)?;
            {
                // The purge point first, then the entries, in one atomic commit.
                let mut m = tx.open_table(META)?;
                m.insert(KEY_LAST_PURGED, bytes.as_slice())?;
                let mut t = tx.open_table(ENTRIES)?;
                t.retain_in::<u64, _>(..=upto, |_, _| false)?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }
}

fn is_empty_range(start: Bound<u64>, end: Bound<u64>) -> bool {
    let lo = match start {
        Bound::Included(s) => s,
        Bound::Excluded(s) => match s.checked_add(1) {
            Some(s) => s,
            None => return true,
        },
        Bound::Unbounded => 0,
    };
    match end {
        Bound::Included(e) => lo > e,
        Bound::Excluded(e) => lo >= e,
        Bound::Unbounded => false,
    }
}

/// Opens or creates a redb file and makes sure the given tables exist (read transactions
/// cannot open a table that was never created).
pub(crate) fn open_db(
    path: &Path,
    str_tables: &[TableDefinition<&str, &[u8]>],
    u64_tables: &[TableDefinition<u64, &[u8]>],
) -> io::Result<Database> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot create data directory {}: {e}", dir.display()),
            )
        })?;
    }
    let db = Database::create(path).map_err(|e| match e {
        redb::DatabaseError::DatabaseAlreadyOpen => io::Error::new(
            io::ErrorKind::WouldBlock,
            format!(
                "{} is already open (another coordinator using the same --data-dir is running); stop it or choose another data directory",
                path.display()
            ),
        ),
        e => io::Error::other(format!("cannot open {}: {e}", path.display())),
    })?;
    let init = || -> Result<(), redb::Error> {
        let tx = db.begin_write()?;
        for t in str_tables {
            tx.open_table(*t)?;
        }
        for t in u64_tables {
            tx.open_table(*t)?;
        }
        tx.commit()?;
        Ok(())
    };
    init().map_err(|e| io::Error::other(format!("cannot initialise {}: {e}", path.display())))?;
    Ok(db)
}

pub(crate) fn encode<T: Serialize>(v: &T) -> io::Result<Vec<u8>> {
    serde_json::to_vec(v)
        .map_err(|e| io::Error::other(format!("cannot encode Raft data as JSON: {e}")))
}

pub(crate) fn decode<T: DeserializeOwned>(path: &Path, what: &str, b: &[u8]) -> io::Result<T> {
    serde_json::from_slice(b).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: cannot decode {what}: {e}; the file is corrupt or was written by an incompatible version",
                path.display()
            ),
        )
    })
}

/// Runs `f` on the database off the async runtime. A redb failure becomes an I/O error naming
/// the store (`Raft log`, `state machine`), its file and what was being done (openraft takes
/// I/O errors and shows their text, so the cause goes into it).
pub(crate) async fn on_db<R, F>(
    db: &Arc<Db>,
    store: &'static str,
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
                "{store} {}: {what} failed: {e}; check the disk (space, permissions) under the data directory",
                path.display()
            ))
        })
}

pub(crate) fn join_err(e: tokio::task::JoinError) -> io::Error {
    io::Error::other(format!("storage task failed: {e}"))
}
