//! This node's gRPC service (`hangar.raft.v1.RaftService`): decodes peer messages and hands
//! them to openraft, and serves the `Forward` / `ReadIndex` RPCs with the leader-side
//! executor. The wire format and the outgoing side live in `network`.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use futures::StreamExt;
use hangar_proto::MAX_MESSAGE_BYTES;
use hangar_proto::raft::v1 as pb;
use openraft::errors::Fatal;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::TransferLeaderRequest;
use openraft::raft::VoteRequest;
use pb::raft_service_server::RaftService;
use pb::raft_service_server::RaftServiceServer;
use tokio::net::TcpListener;
use tonic::Request;
use tonic::Response;
use tonic::Status;
use tonic::Streaming;
use tonic::transport::server::TcpIncoming;

use super::executor::Core;
use crate::network::ForwardOp;
use crate::network::ForwardResult;
use crate::network::KEEPALIVE_INTERVAL;
use crate::network::KEEPALIVE_TIMEOUT;
use crate::network::decode;
use crate::network::decode_bytes;
use crate::network::encode;
use crate::typecfg::Snapshot;
use crate::typecfg::SnapshotMeta;
use crate::typecfg::TypeConfig;
use crate::typecfg::Vote;

/// Largest snapshot we accept from a leader (the whole snapshot is held in memory).
const MAX_SNAPSHOT_BYTES: u64 = 1 << 30;

struct Service {
    core: Arc<Core>,
}

fn bad_request(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(e.to_string())
}

fn fatal(e: Fatal<TypeConfig>) -> Status {
    Status::unavailable(format!("raft stopped on this node: {e}"))
}

fn encoded<T: serde::Serialize>(v: &T) -> Result<Response<pb::RaftMessage>, Status> {
    encode(v)
        .map(Response::new)
        .map_err(|e| Status::internal(e.to_string()))
}

fn forward_reply(result: &ForwardResult) -> Result<Response<pb::ForwardReply>, Status> {
    let result = serde_json::to_vec(result).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(pb::ForwardReply {
        format: pb::Format::Json as i32,
        result,
    }))
}

type MsgStream = Pin<Box<dyn Stream<Item = Result<pb::RaftMessage, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl RaftService for Service {
    async fn vote(
        &self,
        req: Request<pb::RaftMessage>,
    ) -> Result<Response<pb::RaftMessage>, Status> {
        let rpc: VoteRequest<TypeConfig> = decode(req.get_ref()).map_err(bad_request)?;
        let resp = self
            .core
            .raft
            .vote(rpc)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        encoded(&resp)
    }

    async fn pre_vote(
        &self,
        req: Request<pb::RaftMessage>,
    ) -> Result<Response<pb::RaftMessage>, Status> {
        let rpc: VoteRequest<TypeConfig> = decode(req.get_ref()).map_err(bad_request)?;
        let resp = self
            .core
            .raft
            .pre_vote(rpc)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        encoded(&resp)
    }

    async fn append_entries(
        &self,
        req: Request<pb::RaftMessage>,
    ) -> Result<Response<pb::RaftMessage>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = decode(req.get_ref()).map_err(bad_request)?;
        let resp = self
            .core
            .raft
            .append_entries(rpc)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        encoded(&resp)
    }

    type StreamAppendStream = MsgStream;

    async fn stream_append(
        &self,
        req: Request<Streaming<pb::RaftMessage>>,
    ) -> Result<Response<Self::StreamAppendStream>, Status> {
        let incoming = req.into_inner();
        // Decode until the first bad message; a decode error ends the input (and the stream).
        let requests = incoming
            .take_while(|m| futures::future::ready(m.is_ok()))
            .filter_map(|m| {
                futures::future::ready(match m {
                    Ok(msg) => match decode::<AppendEntriesRequest<TypeConfig>>(&msg) {
                        Ok(r) => Some(r),
                        Err(e) => {
                            tracing::warn!(error = %e, "dropping undecodable stream-append message");
                            None
                        }
                    },
                    Err(_) => None,
                })
            });
        let mut stopping = self.core.stopping.subscribe();
        let stopped = async move {
            let _ = stopping.wait_for(|s| *s).await;
        };
        let out = self
            .core
            .raft
            .stream_append(requests)
            .map(|item| match item {
                Ok(result) => encode(&result).map_err(|e| Status::internal(e.to_string())),
                Err(e) => Err(fatal(e)),
            })
            // End the stream when this node stops, so graceful server shutdown can finish.
            .take_until(stopped);
        Ok(Response::new(Box::pin(out) as MsgStream))
    }

    async fn snapshot(
        &self,
        req: Request<Streaming<pb::SnapshotChunk>>,
    ) -> Result<Response<pb::RaftMessage>, Status> {
        let mut chunks = req.into_inner();
        let header = match chunks.next().await {
            Some(Ok(pb::SnapshotChunk {
                payload: Some(pb::snapshot_chunk::Payload::Header(h)),
            })) => h,
            Some(Err(s)) => return Err(s),
            _ => {
                return Err(bad_request("snapshot stream must start with a header"));
            }
        };
        if header.total_bytes > MAX_SNAPSHOT_BYTES {
            return Err(Status::resource_exhausted(format!(
                "snapshot of {} bytes exceeds the {MAX_SNAPSHOT_BYTES} byte limit",
                header.total_bytes
            )));
        }
        let vote: Vote = decode_bytes(header.format, &header.vote).map_err(bad_request)?;
        let meta: SnapshotMeta = decode_bytes(header.format, &header.meta).map_err(bad_request)?;
        let total = usize::try_from(header.total_bytes).map_err(bad_request)?;
        let mut data = Vec::with_capacity(total);
        while let Some(chunk) = chunks.next().await {
            match chunk?.payload {
                Some(pb::snapshot_chunk::Payload::Data(bytes)) => {
                    if data.len() + bytes.len() > total {
                        return Err(bad_request("snapshot data longer than announced"));
                    }
                    data.extend_from_slice(&bytes);
                }
                _ => return Err(bad_request("unexpected header inside snapshot data")),
            }
        }
        if data.len() != total {
            return Err(bad_request(format!(
                "snapshot truncated: got {} of {total} bytes",
                data.len()
            )));
        }
        let resp = self
            .core
            .raft
            .install_full_snapshot(
                vote,
                Snapshot {
                    meta,
                    snapshot: data,
                },
            )
            .await
            .map_err(fatal)?;
        encoded(&resp)
    }

    async fn transfer_leader(
        &self,
        req: Request<pb::RaftMessage>,
    ) -> Result<Response<pb::RaftMessage>, Status> {
        let rpc: TransferLeaderRequest<TypeConfig> = decode(req.get_ref()).map_err(bad_request)?;
        let resp = self
            .core
            .raft
            .handle_transfer_leader(rpc)
            .await
            .map_err(fatal)?;
        encoded(&resp)
    }

    async fn forward(
        &self,
        req: Request<pb::ForwardRequest>,
    ) -> Result<Response<pb::ForwardReply>, Status> {
        let req = req.into_inner();
        let op: ForwardOp = decode_bytes(req.format, &req.op).map_err(bad_request)?;
        tracing::debug!(from = req.from_node, ?op, "forwarded operation");
        let result = match self.core.execute_local(op).await {
            Ok(response) => ForwardResult::Done { response },
            Err(error) => ForwardResult::Failed { error },
        };
        forward_reply(&result)
    }

    async fn read_index(
        &self,
        _req: Request<pb::ReadIndexRequest>,
    ) -> Result<Response<pb::ForwardReply>, Status> {
        let result = match self.core.read_index_local().await {
            Ok(index) => ForwardResult::ReadIndex { index },
            Err(error) => ForwardResult::Failed { error },
        };
        forward_reply(&result)
    }
}

/// Serve the Raft service on `listener` until `shutdown` resolves.
pub(crate) async fn serve(
    core: Arc<Core>,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    extra: Option<tonic::service::Routes>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let refused = core.tls_refusals.clone();
    let svc = RaftServiceServer::new(Service { core })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let routes = match extra {
        Some(extra) => extra.add_service(svc),
        None => tonic::service::Routes::new(svc),
    };
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_routes(routes);
    match tls {
        // Mutual TLS: our own acceptor, so that refused peers are logged and counted.
        Some(cfg) => {
            let (rx, accept) = crate::network::tls::incoming(listener, cfg, refused);
            let incoming = tokio_stream::wrappers::ReceiverStream::new(rx)
                .map(|c| c.map(crate::network::coalesce::Coalesce::new));
            let r = server
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await;
            accept.abort();
            r
        }
        // `serve_with_incoming*` ignores the builder's TCP settings: set them on the incoming
        // stream. Without TCP_NODELAY an append's answer can wait for the peer's delayed ACK
        // (40 ms on Linux) — that was the commit latency tail.
        None => {
            server
                .serve_with_incoming_shutdown(
                    TcpIncoming::from(listener)
                        .with_nodelay(Some(true))
                        .map(|c| c.map(crate::network::coalesce::Coalesce::new)),
                    shutdown,
                )
                .await
        }
    }
}
