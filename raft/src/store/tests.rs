//! openraft's storage conformance suite against the RocksDB store, plus restart recovery.

use openraft::RaftLogReader;
use openraft::RaftSnapshotBuilder;
use openraft::StorageError;
use openraft::entry::RaftEntry;
use openraft::storage::RaftLogStorage;
use openraft::storage::RaftStateMachine;
use openraft::testing::log::StoreBuilder;
use openraft::testing::log::Suite;
use openraft::type_config::TypeConfigExt;
use tempfile::TempDir;

use super::*;
use crate::state::Command;
use crate::state::EventRecord;
use crate::typecfg::Entry;
use crate::typecfg::Proposal;
use crate::typecfg::TypeConfig;
use crate::typecfg::Vote;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(TempDir, LogStore, StateMachineStore), StorageError<TypeConfig>> {
        let dir =
            tempfile::tempdir().map_err(|e| StorageError::write(TypeConfig::err_from_error(&e)))?;
        let (log, sm) =
            open(dir.path()).map_err(|e| StorageError::write(TypeConfig::err_from_error(&e)))?;
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite() {
    Suite::test_all(Builder).await.expect("storage suite");
}

fn log_id(term: u64, index: u64) -> crate::typecfg::LogId {
    let leader = openraft::impls::leader_id_adv::LeaderId { term, node_id: 1 };
    crate::typecfg::LogId::new(leader, index)
}

fn event_entry(term: u64, index: u64, kind: &str) -> Entry {
    let proposal = Proposal {
        cmd: Command::AppendEvents {
            events: vec![EventRecord {
                kind: kind.into(),
                at_ms: 1,
                node_id: 1,
                subject: String::new(),
                data: serde_json::Value::Null,
            }],
        },
        at_ms: 1000 + index,
    };
    Entry::new_normal(log_id(term, index), proposal)
}

async fn append_all(log: &mut LogStore, entries: Vec<Entry>) {
    let (tx, rx) = TypeConfig::oneshot();
    let cb = openraft::storage::IOFlushed::<TypeConfig>::signal(tx);
    log.append(entries, cb).await.unwrap();
    rx.await.unwrap().unwrap();
}

async fn apply_all(sm: &mut StateMachineStore, entries: Vec<Entry>) {
    let items = entries.into_iter().map(|e| Ok((e, None)));
    sm.apply(futures::stream::iter(items)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_recovers_log_vote_and_snapshot_state() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (mut log, mut sm) = open(dir.path()).unwrap();
        let entries: Vec<Entry> = (1..=5)
            .map(|i| event_entry(1, i, &format!("e{i}")))
            .collect();
        append_all(&mut log, entries.clone()).await;
        log.save_vote(&Vote::new_committed(1, 1)).await.unwrap();
        log.save_committed(Some(log_id(1, 5))).await.unwrap();
        apply_all(&mut sm, entries[..3].to_vec()).await;
        let snap = sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        assert_eq!(snap.meta.last_log_id, Some(log_id(1, 3)));
        apply_all(&mut sm, entries[3..].to_vec()).await;
        assert_eq!(sm.shared().read(|s| s.events.last_seq()), 5);
        log.purge(log_id(1, 2)).await.unwrap();
    }
    let (mut log, mut sm) = open(dir.path()).unwrap();
    // The state machine restarts from the snapshot; openraft re-applies 4..=5 from the log.
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(1, 3)));
    assert_eq!(sm.shared().read(|s| s.events.last_seq()), 3);
    assert_eq!(sm.shared().applied_index(), 3);
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(1, 5)));
    assert_eq!(
        log.read_vote().await.unwrap(),
        Some(Vote::new_committed(1, 1))
    );
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 2)));
    assert_eq!(state.last_log_id, Some(log_id(1, 5)));
    let rest = log.try_get_log_entries(0..10).await.unwrap();
    assert_eq!(
        rest.iter().map(|e| e.index()).collect::<Vec<_>>(),
        [3, 4, 5]
    );
    let current = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta.last_log_id, Some(log_id(1, 3)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_unknown_on_disk_format() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (log, _sm) = open(dir.path()).unwrap();
        let mut batch = WriteBatch::default();
        batch.put_cf(log_db(&log).cf(CF_META).unwrap(), KEY_FORMAT, b"99");
        log_db(&log).write(batch, true).unwrap();
    }
    match open(dir.path()) {
        Err(StoreOpenError::Format { found: 99, .. }) => {}
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("opened a store with an unknown format"),
    }
}

fn log_db(log: &LogStore) -> &Db {
    log.db()
}
