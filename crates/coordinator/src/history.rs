//! The history file, `DATA/history.jsonl`: rollouts that retention moved out of the replicated
//! state, one JSON line per rollout with everything `status ID --json` shows (spec, phase,
//! nodes, every event, creation time, and the inputs that replay it).
//!
//! Each coordinator's state machine appends the lines when it applies
//! [`crate::state::Command::ArchiveRollouts`], and fsyncs them before the rollouts leave the
//! in-memory state (see `raft/state_machine.rs`). The file is append-only: a crash after the
//! append but before the next snapshot re-applies the command and appends the same rollouts
//! again, so readers dedupe by id (the last line wins). A line cut short by a crash is skipped.
//!
//! What this file does not hold: a coordinator that joined the cluster later, or caught up from
//! a snapshot sent by the leader, never applied the archive entries compacted into that
//! snapshot, so its file lacks those rollouts (the leader's file has them).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use orch_rollout::{Input, Rollout};
use orch_types::RolloutId;
use orch_types::rollout::{AuditEvent, NodeProgress, Phase, RolloutSpec, RolloutStatus};
use serde::{Deserialize, Serialize};

/// File name of the history inside the coordinator's data directory.
pub const HISTORY_FILE: &str = "history.jsonl";

/// One archived rollout, as one line of the history file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryRecord {
    /// First on the line, so a lookup by id skips other lines without parsing them.
    pub id: RolloutId,
    /// When the rollout was accepted (the proposer's clock, ms since the epoch).
    pub created_at_ms: u64,
    /// When the leader archived it (its clock).
    pub archived_at_ms: u64,
    pub spec: RolloutSpec,
    /// Phase, nodes and the whole audit trail at the time it was archived (it was finished).
    pub status: RolloutStatus,
    /// The rollout machine's inputs: `orch_rollout::replay(spec, inputs)` gives the rollout
    /// back. Empty in lines written before inputs were recorded.
    #[serde(default)]
    pub inputs: Vec<Input>,
}

impl HistoryRecord {
    pub fn of(id: RolloutId, r: &Rollout, created_at_ms: u64, archived_at_ms: u64) -> Self {
        HistoryRecord {
            id,
            created_at_ms,
            archived_at_ms,
            spec: r.spec().clone(),
            status: r.status(),
            inputs: r.inputs().to_vec(),
        }
    }
}

/// The fields of a line that `rollouts --all` shows: the same as [`HistoryRecord`] without the
/// audit trail and the inputs, which serde skips instead of building (the bulk of every line).
#[derive(Deserialize)]
struct ListedRecord {
    id: RolloutId,
    created_at_ms: u64,
    archived_at_ms: u64,
    spec: RolloutSpec,
    status: ListedStatus,
}

#[derive(Deserialize)]
struct ListedStatus {
    id: String,
    version: orch_types::Version,
    phase: Phase,
    awaiting_promotion: bool,
    error: Option<String>,
    nodes: Vec<NodeProgress>,
}

impl From<ListedRecord> for HistoryRecord {
    fn from(r: ListedRecord) -> Self {
        HistoryRecord {
            id: r.id,
            created_at_ms: r.created_at_ms,
            archived_at_ms: r.archived_at_ms,
            spec: r.spec,
            status: RolloutStatus {
                id: r.status.id,
                version: r.status.version,
                phase: r.status.phase,
                awaiting_promotion: r.status.awaiting_promotion,
                error: r.status.error,
                nodes: r.status.nodes,
                events: Vec::<AuditEvent>::new(),
            },
            inputs: Vec::new(),
        }
    }
}

/// The history file of one coordinator. Cheap to clone. Every method does blocking file I/O:
/// call it from `spawn_blocking`.
#[derive(Debug, Clone)]
pub struct History {
    path: Arc<PathBuf>,
}

impl History {
    pub fn new(path: impl Into<PathBuf>) -> History {
        History {
            path: Arc::new(path.into()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `records` (one line each) and makes them durable before returning.
    pub fn append(&self, records: &[HistoryRecord]) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        for r in records {
            serde_json::to_writer(&mut buf, r).map_err(|e| {
                io::Error::other(format!(
                    "cannot encode rollout {} for the history: {e}",
                    r.id
                ))
            })?;
            buf.push(b'\n');
        }
        let ctx = |what: &str, e: io::Error| {
            io::Error::new(
                e.kind(),
                format!(
                    "history file {}: {what} failed: {e}; check the disk (space, permissions) under the data directory",
                    self.path.display()
                ),
            )
        };
        let existed = self.path.exists();
        let mut f = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&*self.path)
            .map_err(|e| ctx("open", e))?;
        // A line cut short by a crash stays on its own (readers skip it) instead of swallowing
        // the first new line.
        let len = f.metadata().map_err(|e| ctx("stat", e))?.len();
        if len > 0 {
            let mut last = [0u8; 1];
            f.seek(SeekFrom::Start(len - 1))
                .and_then(|_| f.read_exact(&mut last))
                .map_err(|e| ctx("read", e))?;
            if last[0] != b'\n' {
                buf.insert(0, b'\n');
            }
        }
        f.write_all(&buf).map_err(|e| ctx("append", e))?;
        f.sync_data().map_err(|e| ctx("fsync", e))?;
        if !existed && let Some(dir) = self.path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| ctx("fsync of the directory", e))?;
        }
        Ok(())
    }

    /// Every archived rollout, oldest first, without their audit trails (for listings).
    pub fn list(&self) -> io::Result<Vec<HistoryRecord>> {
        let mut out: BTreeMap<RolloutId, HistoryRecord> = BTreeMap::new();
        self.scan(|line| {
            if let Ok(r) = serde_json::from_str::<ListedRecord>(line) {
                out.insert(r.id, r.into());
            }
        })?;
        Ok(out.into_values().collect())
    }

    /// Every archived rollout with its audit trail, oldest first.
    pub fn read_all(&self) -> io::Result<Vec<HistoryRecord>> {
        let mut out: BTreeMap<RolloutId, HistoryRecord> = BTreeMap::new();
        self.scan(|line| {
            if let Ok(r) = serde_json::from_str::<HistoryRecord>(line) {
                out.insert(r.id, r);
            }
        })?;
        Ok(out.into_values().collect())
    }

    /// One archived rollout with its audit trail (the last line for that id).
    pub fn find(&self, id: RolloutId) -> io::Result<Option<HistoryRecord>> {
        let prefix = format!("{{\"id\":\"{id}\"");
        let mut found = None;
        self.scan(|line| {
            // Lines this file writes start with their id; anything else is parsed to be sure.
            if line.starts_with("{\"id\":\"") && !line.starts_with(&prefix) {
                return;
            }
            if let Ok(r) = serde_json::from_str::<HistoryRecord>(line)
                && r.id == id
            {
                found = Some(r);
            }
        })?;
        Ok(found)
    }

    fn scan(&self, mut each: impl FnMut(&str)) -> io::Result<()> {
        let f = match File::open(&*self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot read the history file {}: {e}", self.path.display()),
                ));
            }
        };
        let mut r = BufReader::new(f);
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) => return Ok(()),
                Ok(_) => each(line.trim_end()),
                // Not UTF-8: a damaged line; the others are still readable.
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    tracing::warn!(file = %self.path.display(), "skipping an unreadable history line");
                }
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("cannot read the history file {}: {e}", self.path.display()),
                    ));
                }
            }
        }
    }

    /// The file's size in bytes (0 when it does not exist yet).
    pub fn size(&self) -> u64 {
        fs::metadata(&*self.path).map(|m| m.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use orch_rollout::Event;

    fn rollout(id: u64, events: usize) -> (RolloutId, Rollout) {
        let rid = RolloutId(id);
        let spec = RolloutSpec::new(
            rid.to_string(),
            "4.2.1".parse().unwrap(),
            vec!["n1".parse().unwrap()],
            "alice",
        );
        let mut r = Rollout::new(spec).unwrap();
        for i in 0..events {
            // Each `pause` while running adds one event; `resume` another.
            let c = if i % 2 == 0 {
                orch_rollout::Command::Pause
            } else {
                orch_rollout::Command::Resume
            };
            r.apply(&Event::Command(c), i as u64, "alice").unwrap();
        }
        (rid, r)
    }

    #[test]
    fn appended_records_read_back_deduped_by_id_last_wins() {
        let dir = tempfile::tempdir().unwrap();
        let h = History::new(dir.path().join(HISTORY_FILE));
        assert!(h.read_all().unwrap().is_empty(), "no file yet: empty");
        let (i1, r1) = rollout(1, 2);
        let (i2, r2) = rollout(2, 4);
        let (i10, r10) = rollout(10, 1);
        h.append(&[
            HistoryRecord::of(i10, &r10, 10, 100),
            HistoryRecord::of(i1, &r1, 1, 100),
        ])
        .unwrap();
        h.append(&[HistoryRecord::of(i2, &r2, 2, 100)]).unwrap();
        // A re-applied archive command after a crash appends the same rollout again.
        h.append(&[HistoryRecord::of(i1, &r1, 1, 200)]).unwrap();

        let all = h.read_all().unwrap();
        let ids: Vec<u64> = all.iter().map(|r| r.id.0).collect();
        assert_eq!(ids, vec![1, 2, 10], "numeric order, one per id");
        assert_eq!(all[0].archived_at_ms, 200, "the last line wins");
        assert_eq!(all[1].status.events.len(), 4);
        assert_eq!(all[1].status, r2.status());
        assert_eq!(all[1].spec, *r2.spec());

        let listed = h.list().unwrap();
        assert_eq!(listed.len(), 3);
        assert!(listed.iter().all(|r| r.status.events.is_empty()));
        assert_eq!(listed[1].status.nodes, r2.status().nodes);

        let found = h.find(RolloutId(2)).unwrap().unwrap();
        assert_eq!(found.status.events.len(), 4);
        assert_eq!(h.find(RolloutId(1)).unwrap().unwrap().archived_at_ms, 200);
        assert!(h.find(RolloutId(3)).unwrap().is_none());
    }

    #[test]
    fn a_torn_last_line_is_skipped_and_does_not_swallow_the_next_append() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(HISTORY_FILE);
        let h = History::new(&path);
        let (i1, r1) = rollout(1, 1);
        let (i2, r2) = rollout(2, 1);
        h.append(&[HistoryRecord::of(i1, &r1, 1, 1)]).unwrap();
        // A crash in the middle of an append.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"id\":\"r000002\",\"created_at_ms\":2,\"arch")
            .unwrap();
        drop(f);
        assert_eq!(h.read_all().unwrap().len(), 1);
        h.append(&[HistoryRecord::of(i2, &r2, 2, 2)]).unwrap();
        let ids: Vec<u64> = h.read_all().unwrap().iter().map(|r| r.id.0).collect();
        assert_eq!(ids, vec![1, 2]);
        assert!(h.find(RolloutId(2)).unwrap().is_some());
    }
}
