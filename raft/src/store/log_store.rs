//! The Raft log on RocksDB (`logs` + `meta` column families).

use std::fmt::Debug;
use std::io;
use std::ops::Bound;
use std::ops::RangeBounds;

use openraft::LogState;
use openraft::OptionalSend;
use openraft::RaftLogReader;
use openraft::entry::RaftEntry;
use openraft::storage::IOFlushed;
use openraft::storage::RaftLogStorage;
use rocksdb::Direction;
use rocksdb::IteratorMode;
use rocksdb::WriteBatch;

use super::CF_LOGS;
use super::CF_META;
use super::Db;
use super::blocking;
use super::rocks_err;
use super::to_json;
use crate::typecfg::Entry;
use crate::typecfg::LogId;
use crate::typecfg::TypeConfig;
use crate::typecfg::Vote;

const KEY_VOTE: &[u8] = b"vote";
const KEY_LAST_PURGED: &[u8] = b"last_purged";
const KEY_COMMITTED: &[u8] = b"committed";

/// Log entries are keyed by big-endian index so RocksDB's byte order is index order.
fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn key_index(key: &[u8]) -> io::Result<u64> {
    let bytes: [u8; 8] = key
        .try_into()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "log key is not 8 bytes"))?;
    Ok(u64::from_be_bytes(bytes))
}

fn decode_entry(index: u64, bytes: &[u8]) -> io::Result<Entry> {
    let entry: Entry = serde_json::from_slice(bytes).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("corrupt log entry {index}: {e}"),
        )
    })?;
    if entry.index() != index {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "log entry stored under index {index} claims index {}",
                entry.index()
            ),
        ));
    }
    Ok(entry)
}

/// The Raft log store; cheap to clone (it is also its own log reader).
#[derive(Clone)]
pub(crate) struct LogStore {
    db: Db,
}

impl LogStore {
    pub(crate) fn new(db: Db) -> Self {
        LogStore { db }
    }

    pub(crate) fn db(&self) -> &Db {
        &self.db
    }

    fn read_range(&self, start: u64, end_inclusive: Option<u64>) -> io::Result<Vec<Entry>> {
        let cf = self.db.cf(CF_LOGS)?;
        let from = index_key(start);
        let mut out = Vec::new();
        for item in self
            .db
            .raw()
            .iterator_cf(cf, IteratorMode::From(&from, Direction::Forward))
        {
            let (key, value) = item.map_err(rocks_err)?;
            let index = key_index(&key)?;
            if end_inclusive.is_some_and(|end| index > end) {
                break;
            }
            out.push(decode_entry(index, &value)?);
        }
        Ok(out)
    }

    fn last_entry(&self) -> io::Result<Option<Entry>> {
        let cf = self.db.cf(CF_LOGS)?;
        match self.db.raw().iterator_cf(cf, IteratorMode::End).next() {
            None => Ok(None),
            Some(item) => {
                let (key, value) = item.map_err(rocks_err)?;
                Ok(Some(decode_entry(key_index(&key)?, &value)?))
            }
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => x.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(x) => Some(*x),
            Bound::Excluded(0) => return Ok(Vec::new()),
            Bound::Excluded(x) => Some(x - 1),
            Bound::Unbounded => None,
        };
        if end.is_some_and(|e| e < start) {
            return Ok(Vec::new());
        }
        let this = self.clone();
        blocking(move || this.read_range(start, end)).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        let db = self.db.clone();
        blocking(move || db.get_json(CF_META, KEY_VOTE)).await
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let this = self.clone();
        blocking(move || {
            let last_purged: Option<LogId> = this.db.get_json(CF_META, KEY_LAST_PURGED)?;
            let last = this.last_entry()?.map(|e| e.log_id());
            Ok(LogState {
                last_log_id: last.or(last_purged),
                last_purged_log_id: last_purged,
            })
        })
        .await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        let value = to_json(vote)?;
        let db = self.db.clone();
        // Durable on return: synced write.
        blocking(move || {
            let mut batch = WriteBatch::default();
            batch.put_cf(db.cf(CF_META)?, KEY_VOTE, value);
            db.write(batch, true)
        })
        .await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        let db = self.db.clone();
        let value = to_json(&committed)?;
        // Not synced: a lagging committed id only means fewer entries are re-applied at start.
        blocking(move || {
            let mut batch = WriteBatch::default();
            batch.put_cf(db.cf(CF_META)?, KEY_COMMITTED, value);
            db.write(batch, false)
        })
        .await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        let db = self.db.clone();
        blocking(move || {
            Ok(db
                .get_json::<Option<LogId>>(CF_META, KEY_COMMITTED)?
                .flatten())
        })
        .await
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
        let mut encoded = Vec::new();
        for entry in entries {
            encoded.push((index_key(entry.index()), to_json(&entry)?));
        }
        let db = self.db.clone();
        // Readable on return: the batch is in the memtable + WAL buffer when this await ends.
        blocking(move || {
            let cf = db.cf(CF_LOGS)?;
            let mut batch = WriteBatch::default();
            for (key, value) in encoded {
                batch.put_cf(cf, key, value);
            }
            db.write(batch, false)
        })
        .await?;
        // Durable later: fsync the WAL on a blocking thread, then tell openraft.
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let res = db.sync_wal();
            if let Err(e) = &res {
                tracing::error!(error = %e, "fsync of the Raft log failed; the node will stop");
            }
            callback.io_completed(res);
        });
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |id| id.index() + 1);
        let db = self.db.clone();
        blocking(move || {
            let mut batch = WriteBatch::default();
            batch.delete_range_cf(db.cf(CF_LOGS)?, index_key(from), index_key(u64::MAX));
            batch.delete_cf(db.cf(CF_LOGS)?, index_key(u64::MAX));
            db.write(batch, true)
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let value = to_json(&log_id)?;
        let upto = log_id.index();
        let db = self.db.clone();
        blocking(move || {
            // Record the purge point first (durably), then delete: a crash in between leaves
            // entries openraft ignores, never a hole.
            let mut batch = WriteBatch::default();
            batch.put_cf(db.cf(CF_META)?, KEY_LAST_PURGED, value);
            db.write(batch, true)?;
            let mut batch = WriteBatch::default();
            batch.delete_range_cf(
                db.cf(CF_LOGS)?,
                index_key(0),
                index_key(upto.saturating_add(1)),
            );
            db.write(batch, false)
        })
        .await
    }
}
