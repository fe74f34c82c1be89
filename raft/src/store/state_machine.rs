//! The state machine: the in-memory [`State`] driven by the pure `apply`, with snapshots
//! persisted in the `sm` column family.

use std::io;
use std::sync::Arc;

use futures::Stream;
use futures::StreamExt;
use openraft::EntryPayload;
use openraft::OptionalSend;
use openraft::RaftSnapshotBuilder;
use openraft::entry::RaftEntry;
use openraft::storage::EntryResponder;
use openraft::storage::RaftStateMachine;
use parking_lot::RwLock;
use rocksdb::WriteBatch;
use serde::Deserialize;
use serde::Serialize;
use tokio::sync::watch;

use super::CF_SM;
use super::Db;
use super::blocking;
use super::to_json;
use crate::state::ApplyCtx;
use crate::state::Response;
use crate::state::State;
use crate::state::apply;
use crate::typecfg::LogId;
use crate::typecfg::Snapshot;
use crate::typecfg::SnapshotData;
use crate::typecfg::SnapshotMeta;
use crate::typecfg::StoredMembership;
use crate::typecfg::TypeConfig;

const KEY_SNAPSHOT_META: &[u8] = b"snapshot_meta";
const KEY_SNAPSHOT_DATA: &[u8] = b"snapshot_data";
const SNAPSHOT_FORMAT: u32 = 1;

/// What a snapshot's data holds.
#[derive(Serialize, Deserialize)]
struct SnapshotPayload {
    format: u32,
    state: State,
}

/// The applied state shared between the state machine task and the [`RaftHandle`](crate::RaftHandle).
pub(crate) struct SharedSm {
    data: RwLock<SmData>,
    applied_tx: watch::Sender<u64>,
}

struct SmData {
    state: State,
    last_applied: Option<LogId>,
    membership: StoredMembership,
}

impl SharedSm {
    /// Run `f` on the applied state.
    pub(crate) fn read<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        f(&self.data.read().state)
    }

    /// Index of the last applied entry (0 before any).
    pub(crate) fn applied_index(&self) -> u64 {
        self.data
            .read()
            .last_applied
            .as_ref()
            .map_or(0, |l| l.index)
    }

    /// Subscribe to the applied index.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.applied_tx.subscribe()
    }

    fn publish(&self, index: u64) {
        self.applied_tx.send_if_modified(|cur| {
            if *cur != index {
                *cur = index;
                true
            } else {
                false
            }
        });
    }
}

/// openraft's state machine over [`SharedSm`].
pub(crate) struct StateMachineStore {
    db: Db,
    shared: Arc<SharedSm>,
}

impl StateMachineStore {
    /// Load the latest snapshot (if any) as the initial applied state.
    pub(super) fn open(db: Db) -> io::Result<Self> {
        let (state, last_applied, membership) = match load_snapshot(&db)? {
            Some(snap) => {
                let payload = decode_payload(&snap.snapshot)?;
                (
                    payload.state,
                    snap.meta.last_log_id,
                    snap.meta.last_membership,
                )
            }
            None => (State::default(), None, StoredMembership::default()),
        };
        let applied = last_applied.as_ref().map_or(0, |l| l.index);
        let (applied_tx, _) = watch::channel(applied);
        let shared = Arc::new(SharedSm {
            data: RwLock::new(SmData {
                state,
                last_applied,
                membership,
            }),
            applied_tx,
        });
        Ok(StateMachineStore { db, shared })
    }

    /// The shared applied state.
    pub(crate) fn shared(&self) -> Arc<SharedSm> {
        self.shared.clone()
    }
}

fn decode_payload(bytes: &[u8]) -> io::Result<SnapshotPayload> {
    let payload: SnapshotPayload = serde_json::from_slice(bytes).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("corrupt snapshot data: {e}"),
        )
    })?;
    if payload.format != SNAPSHOT_FORMAT {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "snapshot format {} is not supported (expected {SNAPSHOT_FORMAT}); upgrade this node",
                payload.format
            ),
        ));
    }
    Ok(payload)
}

fn load_snapshot(db: &Db) -> io::Result<Option<Snapshot>> {
    let Some(meta) = db.get_json::<SnapshotMeta>(CF_SM, KEY_SNAPSHOT_META)? else {
        return Ok(None);
    };
    let data = db
        .raw()
        .get_cf(db.cf(CF_SM)?, KEY_SNAPSHOT_DATA)
        .map_err(super::rocks_err)?
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "snapshot metadata without snapshot data",
            )
        })?;
    Ok(Some(Snapshot {
        meta,
        snapshot: data,
    }))
}

fn save_snapshot(db: &Db, meta: &SnapshotMeta, data: &[u8]) -> io::Result<()> {
    let cf = db.cf(CF_SM)?;
    let mut batch = WriteBatch::default();
    batch.put_cf(cf, KEY_SNAPSHOT_META, to_json(meta)?);
    batch.put_cf(cf, KEY_SNAPSHOT_DATA, data);
    db.write(batch, true)
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let d = self.shared.data.read();
        Ok((d.last_applied, d.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let mut last = None;
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let log_id = entry.log_id();
            let response = {
                let mut d = self.shared.data.write();
                let response = match &entry.payload {
                    EntryPayload::Blank => Response::Ok,
                    EntryPayload::Normal(proposal) => {
                        let ctx = ApplyCtx {
                            log_index: log_id.index,
                            term: log_id.leader_id.term,
                            now_ms: proposal.at_ms,
                        };
                        apply(&mut d.state, &proposal.cmd, ctx)
                    }
                    EntryPayload::Membership(m) => {
                        d.membership = StoredMembership::new(Some(log_id), m.clone());
                        Response::Ok
                    }
                };
                d.last_applied = Some(log_id);
                response
            };
            last = Some(log_id.index);
            if let Some(responder) = responder {
                responder.send(response);
            }
        }
        if let Some(index) = last {
            self.shared.publish(index);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            db: self.db.clone(),
            shared: self.shared.clone(),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> Result<(), io::Error> {
        let payload = decode_payload(&snapshot)?;
        // Persist first: if this fails the node stops with the old state intact.
        let db = self.db.clone();
        let meta_c = meta.clone();
        blocking(move || save_snapshot(&db, &meta_c, &snapshot)).await?;
        let index = meta.last_log_id.as_ref().map_or(0, |l| l.index);
        {
            let mut d = self.shared.data.write();
            d.state = payload.state;
            d.last_applied = meta.last_log_id;
            d.membership = meta.last_membership.clone();
        }
        tracing::info!(index, "installed snapshot");
        self.shared.publish(index);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        let db = self.db.clone();
        blocking(move || load_snapshot(&db)).await
    }
}

/// Builds a snapshot of the current applied state.
pub(crate) struct SnapshotBuilder {
    db: Db,
    shared: Arc<SharedSm>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let (state, last_applied, membership) = {
            let d = self.shared.data.read();
            (d.state.clone(), d.last_applied, d.membership.clone())
        };
        let meta = SnapshotMeta {
            last_log_id: last_applied,
            last_membership: membership,
        };
        let db = self.db.clone();
        let meta_c = meta.clone();
        let data = blocking(move || {
            let data = to_json(&SnapshotPayload {
                format: SNAPSHOT_FORMAT,
                state,
            })?;
            save_snapshot(&db, &meta_c, &data)?;
            Ok(data)
        })
        .await?;
        tracing::info!(snapshot = %meta, bytes = data.len(), "built snapshot");
        Ok(Snapshot {
            meta,
            snapshot: data,
        })
    }
}
