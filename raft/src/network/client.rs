//! openraft's network side: one [`PeerClient`] per replication target, over the pooled channel.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;

use futures::Stream;
use futures::StreamExt;
use hangar_proto::SNAPSHOT_CHUNK_BYTES;
use hangar_proto::raft::v1 as pb;
use openraft::AnyError;
use openraft::OptionalSend;
use openraft::RaftNetworkFactory;
use openraft::base::BoxFuture;
use openraft::base::BoxStream;
use openraft::entry::RaftEntry;
use openraft::errors::RPCError;
use openraft::errors::ReplicationClosed;
use openraft::errors::StreamingError;
use openraft::errors::Unreachable;
use openraft::network::RPCOption;
use openraft::network::RaftNetworkV2;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::SnapshotResponse;
use openraft::raft::StreamAppendResult;
use openraft::raft::TransferLeaderRequest;
use openraft::raft::TransferLeaderResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use parking_lot::Mutex;
use pb::raft_service_client::RaftServiceClient;
use tonic::transport::Channel;

use super::APPEND_BUDGET_BYTES;
use super::CodecError;
use super::PeerPool;
use super::decode;
use super::encode;
use crate::typecfg::Snapshot;
use crate::typecfg::SnapshotData;
use crate::typecfg::TypeConfig;
use crate::typecfg::Vote;
use crate::types::NodeInfo;

type RpcErr = RPCError<TypeConfig>;

/// Creates [`PeerClient`]s for openraft.
pub(crate) struct NetworkFactory {
    pool: PeerPool,
}

impl NetworkFactory {
    pub(crate) fn new(pool: PeerPool) -> Self {
        NetworkFactory { pool }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &NodeInfo) -> PeerClient {
        PeerClient {
            target,
            addr: node.raft_addr.clone(),
            pool: self.pool.clone(),
        }
    }
}

/// The connection to one peer.
pub(crate) struct PeerClient {
    target: u64,
    addr: String,
    pool: PeerPool,
}

/// Any transport failure makes openraft back off from the peer.
fn unreachable(target: u64, addr: &str, what: impl std::fmt::Display) -> RpcErr {
    RPCError::Unreachable(Unreachable::new(&AnyError::error(format!(
        "raft peer {target} at {addr}: {what}"
    ))))
}

fn status_err(target: u64, addr: &str, status: &tonic::Status) -> RpcErr {
    unreachable(
        target,
        addr,
        format!("{}: {}", status.code(), status.message()),
    )
}

/// Why an AppendEntries request could not be put on the wire.
#[derive(Debug, thiserror::Error)]
enum SplitError {
    /// A part could not be encoded.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// One entry alone is larger than a message may be.
    #[error(
        "log entry {index} encodes to {size} bytes, more than the {budget} byte message budget"
    )]
    EntryTooLarge {
        /// The entry's log index.
        index: u64,
        /// Its encoded size (plus a separator).
        size: usize,
        /// The message budget.
        budget: usize,
    },
}

/// Split an AppendEntries request into consecutive requests that each encode within
/// [`APPEND_BUDGET_BYTES`]; every part's `prev_log_id` is the last entry of the part before.
fn split_append(req: AppendEntriesRequest<TypeConfig>) -> Result<Vec<pb::RaftMessage>, SplitError> {
    split_append_within(req, APPEND_BUDGET_BYTES)
}

fn split_append_within(
    req: AppendEntriesRequest<TypeConfig>,
    budget: usize,
) -> Result<Vec<pb::RaftMessage>, SplitError> {
    let whole = encode(&req)?;
    if whole.data.len() <= budget {
        return Ok(vec![whole]);
    }
    let AppendEntriesRequest {
        vote,
        prev_log_id,
        entries,
        leader_commit,
    } = req;
    let part = |prev: Option<crate::typecfg::LogId>, entries: Vec<crate::typecfg::Entry>| {
        encode(&AppendEntriesRequest::<TypeConfig> {
            vote,
            prev_log_id: prev,
            entries,
            leader_commit,
        })
    };
    // Size of a part without entries; a prev_log_id may grow by a few bytes between parts.
    let base = part(prev_log_id, Vec::new())?.data.len() + 64;
    let mut parts = Vec::new();
    let mut prev = prev_log_id;
    let mut current: Vec<crate::typecfg::Entry> = Vec::new();
    let mut current_bytes = base;
    for entry in entries {
        // +1 for the separating comma.
        let size = serde_json::to_vec(&entry)
            .map_err(CodecError::Encode)?
            .len()
            + 1;
        if base + size > budget {
            return Err(SplitError::EntryTooLarge {
                index: entry.index(),
                size,
                budget,
            });
        }
        if !current.is_empty() && current_bytes + size > budget {
            let batch = std::mem::take(&mut current);
            let next_prev = batch.last().map(|e| e.log_id());
            parts.push(part(prev, batch)?);
            prev = next_prev;
            current_bytes = base;
        }
        current_bytes += size;
        current.push(entry);
    }
    if !current.is_empty() {
        parts.push(part(prev, current)?);
    }
    Ok(parts)
}

impl PeerClient {
    fn status_err(&self, status: &tonic::Status) -> RpcErr {
        self.pool.invalidate(&self.addr, status);
        status_err(self.target, &self.addr, status)
    }

    fn client(&self) -> Result<RaftServiceClient<Channel>, RpcErr> {
        self.pool
            .client(&self.addr)
            .map_err(|e| unreachable(self.target, &self.addr, e))
    }

    fn request<T>(&self, msg: T, option: &RPCOption) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.set_timeout(option.soft_ttl());
        req
    }
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RpcErr> {
        let parts = split_append(rpc).map_err(|e| unreachable(self.target, &self.addr, e))?;
        let mut client = self.client()?;
        let mut acked = None;
        let total = parts.len();
        for (i, part) in parts.into_iter().enumerate() {
            let last_of_part = if total > 1 {
                decode::<AppendEntriesRequest<TypeConfig>>(&part)
                    .ok()
                    .and_then(|r| r.entries.last().map(|e| e.log_id()))
            } else {
                None
            };
            let resp = client
                .append_entries(self.request(part, &option))
                .await
                .map_err(|s| self.status_err(&s));
            let resp: AppendEntriesResponse<TypeConfig> = match resp {
                Ok(r) => {
                    decode(r.get_ref()).map_err(|e| unreachable(self.target, &self.addr, e))?
                }
                // Later parts: report what the peer acknowledged so far.
                Err(_) if i > 0 => return Ok(AppendEntriesResponse::PartialSuccess(acked)),
                Err(e) => return Err(e),
            };
            match resp {
                AppendEntriesResponse::Success if i + 1 < total => acked = last_of_part,
                other if i == 0 => return Ok(other),
                AppendEntriesResponse::Success => return Ok(AppendEntriesResponse::Success),
                _ => return Ok(AppendEntriesResponse::PartialSuccess(acked)),
            }
        }
        Ok(AppendEntriesResponse::Success)
    }

    fn stream_append<'s, S>(
        &'s mut self,
        mut input: S,
        option: RPCOption,
    ) -> BoxFuture<'s, Result<BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RpcErr>>, RpcErr>>
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + OptionalSend + Unpin + 'static,
    {
        Box::pin(async move {
            // Pull the first request before dialing: openraft applies its replication backoff
            // while producing requests, so a peer that is down is not redialed in a busy loop.
            let Some(first) = input.next().await else {
                return Ok(Box::pin(futures::stream::empty()) as BoxStream<'s, _>);
            };
            let input = futures::stream::once(futures::future::ready(first)).chain(input);
            let mut client = self.client()?;
            let target = self.target;
            let addr = self.addr.clone();
            let pool = self.pool.clone();
            // How many wire messages each input request was split into, in order.
            let groups: Arc<Mutex<VecDeque<usize>>> = Arc::default();
            let groups_in = groups.clone();
            // Dropped with the response stream: then the request stream ends too, so the HTTP/2
            // stream closes fully and the peer's graceful shutdown is not held up.
            let (done_tx, done_rx) = futures::channel::oneshot::channel::<()>();
            let addr_in = addr.clone();
            // A request that cannot be encoded ends the stream (openraft then restarts replication
            // and sees the error again on the unary path).
            let outgoing = input
                .map(split_append)
                .take_while(move |parts| {
                    if let Err(e) = parts {
                        tracing::error!(target, addr = %addr_in, error = %e, "cannot send log entries");
                    }
                    futures::future::ready(parts.is_ok())
                })
                .map(move |parts| {
                    let parts = parts.unwrap_or_default();
                    groups_in.lock().push_back(parts.len());
                    futures::stream::iter(parts)
                })
                .flatten()
                // Ends the request side once the response side is gone (see `done_tx`).
                .take_until(done_rx);
            let mut req = tonic::Request::new(outgoing);
            req.set_timeout(option.hard_ttl());
            let responses = client
                .stream_append(req)
                .await
                .map_err(|s| {
                    pool.invalidate(&addr, &s);
                    status_err(target, &addr, &s)
                })?
                .into_inner();
            let out = futures::stream::unfold(Some((responses, groups, done_tx)), move |st| {
                let addr = addr.clone();
                let pool = pool.clone();
                async move {
                    let (mut responses, groups, done_tx) = st?;
                    let decode_item =
                        |item: Option<Result<pb::RaftMessage, tonic::Status>>| match item {
                            Some(Ok(msg)) => decode::<StreamAppendResult<TypeConfig>>(&msg)
                                .map_err(|e| unreachable(target, &addr, e)),
                            Some(Err(s)) => {
                                pool.invalidate(&addr, &s);
                                Err(status_err(target, &addr, &s))
                            }
                            None => Err(unreachable(target, &addr, "stream closed by peer")),
                        };
                    // The first response of the next request; the end of the stream ends the output.
                    let first = responses.next().await?;
                    // A request split into n messages gets n responses; report the last (or the
                    // first failure) as the result of the original request.
                    let n = groups.lock().pop_front().unwrap_or(1);
                    let mut result = decode_item(Some(first));
                    for _ in 1..n {
                        if !matches!(result, Ok(Ok(_))) {
                            break;
                        }
                        result = decode_item(responses.next().await);
                    }
                    let next = if matches!(result, Ok(Ok(_))) {
                        Some((responses, groups, done_tx))
                    } else {
                        None
                    };
                    Some((result, next))
                }
            });
            Ok(Box::pin(out) as BoxStream<'s, _>)
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RpcErr> {
        let msg = encode(&rpc).map_err(|e| unreachable(self.target, &self.addr, e))?;
        let resp = self
            .client()?
            .vote(self.request(msg, &option))
            .await
            .map_err(|s| self.status_err(&s))?;
        decode(resp.get_ref()).map_err(|e| unreachable(self.target, &self.addr, e))
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RpcErr> {
        let msg = encode(&rpc).map_err(|e| unreachable(self.target, &self.addr, e))?;
        let resp = self
            .client()?
            .pre_vote(self.request(msg, &option))
            .await
            .map_err(|s| self.status_err(&s))?;
        decode(resp.get_ref()).map_err(|e| unreachable(self.target, &self.addr, e))
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let header = pb::SnapshotHeader {
            format: pb::Format::Json as i32,
            vote: serde_json::to_vec(&vote).map_err(|e| unreachable(self.target, &self.addr, e))?,
            meta: serde_json::to_vec(&snapshot.meta)
                .map_err(|e| unreachable(self.target, &self.addr, e))?,
            total_bytes: snapshot.snapshot.len() as u64,
        };
        let mut chunks = vec![pb::SnapshotChunk {
            payload: Some(pb::snapshot_chunk::Payload::Header(header)),
        }];
        chunks.extend(
            snapshot
                .snapshot
                .chunks(SNAPSHOT_CHUNK_BYTES)
                .map(|c| pb::SnapshotChunk {
                    payload: Some(pb::snapshot_chunk::Payload::Data(c.to_vec())),
                }),
        );
        let mut req = tonic::Request::new(futures::stream::iter(chunks));
        req.set_timeout(option.hard_ttl());
        let mut client = self.client()?;
        let call = client.snapshot(req);
        let resp = tokio::select! {
            r = call => r.map_err(|s| self.status_err(&s))?,
            closed = cancel => return Err(StreamingError::Closed(closed)),
        };
        Ok(decode(resp.get_ref()).map_err(|e| unreachable(self.target, &self.addr, e))?)
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RpcErr> {
        let msg = encode(&req).map_err(|e| unreachable(self.target, &self.addr, e))?;
        let resp = self
            .client()?
            .transfer_leader(self.request(msg, &option))
            .await
            .map_err(|s| self.status_err(&s))?;
        decode(resp.get_ref()).map_err(|e| unreachable(self.target, &self.addr, e))
    }
}

#[cfg(test)]
mod tests {
    use openraft::entry::RaftEntry;

    use super::*;
    use crate::state::Command;
    use crate::state::EventRecord;
    use crate::typecfg::Entry;
    use crate::typecfg::LogId;
    use crate::typecfg::Proposal;

    fn log_id(index: u64) -> LogId {
        LogId::new(
            openraft::impls::leader_id_adv::LeaderId {
                term: 2,
                node_id: 1,
            },
            index,
        )
    }

    fn entry(index: u64, payload_bytes: usize) -> Entry {
        let cmd = Command::AppendEvents {
            events: vec![EventRecord {
                kind: "x".repeat(payload_bytes),
                at_ms: 0,
                node_id: 1,
                subject: String::new(),
                data: serde_json::Value::Null,
            }],
        };
        Entry::new_normal(log_id(index), Proposal { cmd, at_ms: 0 })
    }

    fn request(entries: Vec<Entry>) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest {
            vote: Vote::new_committed(2, 1),
            prev_log_id: Some(log_id(10)),
            entries,
            leader_commit: Some(log_id(10)),
        }
    }

    #[test]
    fn small_requests_are_sent_whole() {
        let parts = split_append(request((11..=13).map(|i| entry(i, 10)).collect())).unwrap();
        assert_eq!(parts.len(), 1);
    }

    #[test]
    fn large_requests_are_split_into_chained_parts_within_budget() {
        let budget = 2000;
        let parts =
            split_append_within(request((11..=20).map(|i| entry(i, 500)).collect()), budget)
                .unwrap();
        assert!(parts.len() > 2, "{} parts", parts.len());
        let mut expected_prev = Some(log_id(10));
        let mut next_index = 11;
        for part in &parts {
            assert!(
                part.data.len() <= budget,
                "part of {} bytes",
                part.data.len()
            );
            let req: AppendEntriesRequest<TypeConfig> = decode(part).unwrap();
            assert_eq!(req.prev_log_id, expected_prev);
            assert!(!req.entries.is_empty());
            for e in &req.entries {
                assert_eq!(e.index(), next_index);
                next_index += 1;
            }
            expected_prev = req.entries.last().map(|e| e.log_id());
        }
        assert_eq!(next_index, 21, "every entry sent exactly once");
    }

    #[test]
    fn an_entry_larger_than_the_budget_is_an_error() {
        let err = split_append_within(request(vec![entry(11, 5000)]), 2000).unwrap_err();
        assert!(
            matches!(
                err,
                SplitError::EntryTooLarge {
                    index: 11,
                    budget: 2000,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("log entry 11"), "{err}");
    }
}
