//! Durable storage of the Raft log and the state machine, on RocksDB.
//!
//! One database in `<data_dir>/raft` with three column families:
//!
//! * `meta` — on-disk format version, vote, last purged log id, committed log id;
//! * `logs` — log entries, keyed by big-endian `u64` index, JSON values;
//! * `sm` — the latest state-machine snapshot (metadata + serialised [`State`](crate::State)).
//!
//! The state machine lives in memory and is rebuilt on start from the latest snapshot plus the
//! committed log entries after it (openraft re-applies them using the persisted committed id).
//! Every RocksDB call runs on a blocking thread. Any storage error is returned to openraft,
//! which stops the node: a replica never continues on storage it could not write.

mod log_store;
mod state_machine;
#[cfg(test)]
mod tests;

use std::io;
use std::path::Path;
use std::sync::Arc;

pub(crate) use log_store::LogStore;
use rocksdb::ColumnFamily;
use rocksdb::ColumnFamilyDescriptor;
use rocksdb::DB;
use rocksdb::Options;
use rocksdb::WriteBatch;
use rocksdb::WriteOptions;
use serde::Serialize;
use serde::de::DeserializeOwned;
pub(crate) use state_machine::SharedSm;
pub(crate) use state_machine::StateMachineStore;

const CF_META: &str = "meta";
const CF_LOGS: &str = "logs";
const CF_SM: &str = "sm";

/// On-disk format written by this version; bump with an upgrade path when it changes.
const FORMAT_VERSION: u64 = 1;
const KEY_FORMAT: &[u8] = b"format_version";

/// Why the store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum StoreOpenError {
    /// RocksDB refused to open the directory.
    #[error(
        "cannot open the Raft store at {path}: {source}; check that the directory is writable and \
         no other hangar process uses it"
    )]
    Open {
        /// Database directory.
        path: String,
        /// RocksDB's error.
        source: rocksdb::Error,
    },
    /// The directory holds data in a format this binary does not understand.
    #[error(
        "the Raft store at {path} has on-disk format {found}, this binary understands {expected}; \
         run a matching hangar version or wipe the directory and rejoin the cluster"
    )]
    Format {
        /// Database directory.
        path: String,
        /// Format found on disk.
        found: u64,
        /// Format this binary writes.
        expected: u64,
    },
    /// Reading or writing initial data failed.
    #[error("cannot read the Raft store at {path}: {source}")]
    Io {
        /// Database directory.
        path: String,
        /// The error.
        source: io::Error,
    },
}

/// Owns the database. Fields drop in declaration order: the database closes first, then
/// `closed` drops, which tells [`Db::closed`] watchers that the directory is free again.
struct DbOwner {
    db: DB,
    closed: tokio::sync::watch::Sender<()>,
}

/// Shared handle on the RocksDB database.
#[derive(Clone)]
pub(crate) struct Db {
    inner: Arc<DbOwner>,
}

impl Db {
    fn raw(&self) -> &DB {
        &self.inner.db
    }

    /// A receiver whose `changed()` fails once the database is closed (every handle dropped).
    pub(crate) fn closed(&self) -> tokio::sync::watch::Receiver<()> {
        self.inner.closed.subscribe()
    }

    fn cf(&self, name: &str) -> io::Result<&ColumnFamily> {
        self.raw().cf_handle(name).ok_or_else(|| {
            io::Error::other(format!(
                "column family {name:?} missing from the Raft store"
            ))
        })
    }

    /// Read and decode a JSON value.
    fn get_json<T: DeserializeOwned>(&self, cf: &str, key: &[u8]) -> io::Result<Option<T>> {
        let Some(bytes) = self.raw().get_cf(self.cf(cf)?, key).map_err(rocks_err)? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "corrupt value under {cf}/{}: {e}",
                    String::from_utf8_lossy(key)
                ),
            )
        })
    }

    /// Write a batch; `sync` makes it durable (WAL fsync) before returning.
    fn write(&self, batch: WriteBatch, sync: bool) -> io::Result<()> {
        let mut opts = WriteOptions::default();
        opts.set_sync(sync);
        self.raw().write_opt(batch, &opts).map_err(rocks_err)
    }

    /// Fsync the write-ahead log.
    fn sync_wal(&self) -> io::Result<()> {
        self.raw().flush_wal(true).map_err(rocks_err)
    }
}

fn rocks_err(e: rocksdb::Error) -> io::Error {
    io::Error::other(format!("RocksDB: {e}"))
}

fn to_json<T: Serialize>(v: &T) -> io::Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Run blocking storage work off the async threads.
async fn blocking<T, F>(f: F) -> io::Result<T>
where
    F: FnOnce() -> io::Result<T> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io::Error::other(format!("storage task failed: {e}")))?
}

/// Open (or create) the store in `dir` and return the log store and the state machine.
pub(crate) fn open(dir: &Path) -> Result<(LogStore, StateMachineStore), StoreOpenError> {
    let path = dir.display().to_string();
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    // Keep the footprint small: the replicated state is config-sized.
    opts.set_keep_log_file_num(4);
    opts.set_max_total_wal_size(64 * 1024 * 1024);
    let cfs =
        [CF_META, CF_LOGS, CF_SM].map(|name| ColumnFamilyDescriptor::new(name, Options::default()));
    let db = DB::open_cf_descriptors(&opts, dir, cfs).map_err(|source| StoreOpenError::Open {
        path: path.clone(),
        source,
    })?;
    let db = Db {
        inner: Arc::new(DbOwner {
            db,
            closed: tokio::sync::watch::channel(()).0,
        }),
    };
    let io = |source| StoreOpenError::Io {
        path: path.clone(),
        source,
    };
    match db.get_json::<u64>(CF_META, KEY_FORMAT).map_err(io)? {
        Some(FORMAT_VERSION) => {}
        Some(found) => {
            return Err(StoreOpenError::Format {
                path,
                found,
                expected: FORMAT_VERSION,
            });
        }
        None => {
            let mut batch = WriteBatch::default();
            batch.put_cf(
                db.cf(CF_META).map_err(io)?,
                KEY_FORMAT,
                to_json(&FORMAT_VERSION).map_err(io)?,
            );
            db.write(batch, true).map_err(io)?;
        }
    }
    let sm = StateMachineStore::open(db.clone()).map_err(io)?;
    Ok((LogStore::new(db), sm))
}
