//! openraft's storage conformance suite against the redb log store and state machine, plus
//! persistence checks of our own.

use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::{ErrorSubject, ErrorVerb, StorageError};
use orch_coordinator::raft::{LogStore, StateMachineStore, TypeConfig};
use tempfile::TempDir;

struct RedbBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for RedbBuilder {
    async fn build(
        &self,
    ) -> Result<(TempDir, LogStore, StateMachineStore), StorageError<TypeConfig>> {
        let io = |e| StorageError::from_io_error(ErrorSubject::Store, ErrorVerb::Write, e);
        let dir = tempfile::tempdir().map_err(io)?;
        let log = LogStore::open(dir.path().join("raft-log.redb"))
            .await
            .map_err(io)?;
        let sm = StateMachineStore::open(dir.path().join("state.redb"))
            .await
            .map_err(io)?;
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_storage_conformance_suite() {
    Suite::test_all(RedbBuilder)
        .await
        .expect("openraft storage suite");
}

/// Vote, committed id, entries and purge point survive reopening the files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_storage_survives_reopen() {
    use openraft::entry::RaftEntry;
    use openraft::storage::IOFlushed;
    use openraft::type_config::TypeConfigExt;
    use openraft::{RaftLogReader, Vote};
    use orch_coordinator::raft::types::{Entry, LogId};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raft-log.redb");
    let lid = |term: u64, index: u64| {
        LogId::new(
            openraft::impls::leader_id_adv::LeaderId { term, node_id: 1 },
            index,
        )
    };
    {
        let mut log = LogStore::open(&path).await.unwrap();
        log.save_vote(&Vote::new_committed(3, 1)).await.unwrap();
        let entries: Vec<Entry> = (1..=10).map(|i| Entry::new_blank(lid(3, i))).collect();
        let (tx, rx) = <TypeConfig as TypeConfigExt>::oneshot();
        log.append(entries, IOFlushed::signal(tx)).await.unwrap();
        rx.await.unwrap().unwrap();
        log.purge(lid(3, 4)).await.unwrap();
        log.save_committed(Some(lid(3, 9))).await.unwrap();
        // save_committed is lazily durable; a later durable write (as openraft does) flushes it.
        log.save_vote(&Vote::new_committed(3, 1)).await.unwrap();
    }
    let mut log = LogStore::open(&path).await.unwrap();
    assert_eq!(
        log.read_vote().await.unwrap(),
        Some(Vote::new_committed(3, 1))
    );
    assert_eq!(log.read_committed().await.unwrap(), Some(lid(3, 9)));
    let st = log.get_log_state().await.unwrap();
    assert_eq!(st.last_purged_log_id, Some(lid(3, 4)));
    assert_eq!(st.last_log_id, Some(lid(3, 10)));
    let got = log.try_get_log_entries(0..100).await.unwrap();
    assert_eq!(
        got.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
        (5..=10).collect::<Vec<_>>()
    );
    log.truncate_after(Some(lid(3, 7))).await.unwrap();
    assert_eq!(
        log.get_log_state().await.unwrap().last_log_id,
        Some(lid(3, 7))
    );

    // The state machine starts empty and reports nothing applied.
    let mut sm = StateMachineStore::open(dir.path().join("state.redb"))
        .await
        .unwrap();
    assert_eq!(sm.applied_state().await.unwrap().0, None);
    assert!(sm.get_current_snapshot().await.unwrap().is_none());
}
