//! The tonic gRPC transport between Raft peers (`hangar.raft.v1.RaftService`).
//!
//! openraft messages travel as JSON inside protobuf `bytes` fields (see the `.proto` file), so
//! openraft types stay inside this crate. One HTTP/2 [`Channel`] is cached per peer address,
//! with keepalive (1 s interval, 1 s timeout) so a channel recovers after a healed partition,
//! and a connect timeout so an unreachable peer yields `Unreachable` quickly. Both ends of every
//! connection between nodes gather the frames written in one round of the runtime into one
//! system call ([`coalesce`]).

mod client;
pub(crate) mod coalesce;
pub(crate) mod tls;

use std::collections::BTreeSet;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub(crate) use client::NetworkFactory;
use hangar_proto::MAX_MESSAGE_BYTES;
use hangar_proto::raft::v1 as pb;
use pb::raft_service_client::RaftServiceClient;
use serde::Deserialize;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::Channel;
use tonic::transport::Endpoint;

use crate::error::RaftError;
use crate::state::Command;
use crate::state::Response;
use crate::types::NodeInfo;

/// HTTP/2 keepalive ping interval on peer channels and on the server.
pub(crate) const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// How long to wait for a keepalive ack before the connection is considered dead.
pub(crate) const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(1);
/// TCP connect timeout to a peer.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Largest encoded AppendEntries message we send; leaves room for framing under the limit.
pub(crate) const APPEND_BUDGET_BYTES: usize = MAX_MESSAGE_BYTES - 64 * 1024;

/// A write or admin operation forwarded from a follower to the leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum ForwardOp {
    /// Propose a command.
    Propose { cmd: Command },
    /// Add a learner.
    AddLearner {
        id: u64,
        info: NodeInfo,
        blocking: bool,
    },
    /// Replace the voter set.
    ChangeVoters { voters: BTreeSet<u64> },
    /// Remove a node from the membership.
    RemoveNode { id: u64 },
    /// Transfer leadership.
    TransferLeader { to: u64 },
}

/// The leader's answer to a forwarded operation or a read-index request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub(crate) enum ForwardResult {
    /// The operation succeeded; `response` is set for proposals.
    Done { response: Option<Response> },
    /// Read index for a linearizable follower read.
    ReadIndex { index: u64 },
    /// The operation failed on the leader.
    Failed { error: RaftError },
}

/// Why a Raft message could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CodecError {
    /// Serialising the message failed.
    #[error("cannot encode Raft message: {0}")]
    Encode(#[source] serde_json::Error),
    /// The bytes are not a valid message of the expected type.
    #[error("cannot decode Raft message: {0}")]
    Decode(#[source] serde_json::Error),
    /// The peer used an encoding this version does not know.
    #[error("unsupported Raft message format {0}; all nodes must run compatible hangar versions")]
    Format(i32),
}

/// Encode an openraft message.
pub(crate) fn encode<T: Serialize>(v: &T) -> Result<pb::RaftMessage, CodecError> {
    let data = serde_json::to_vec(v).map_err(CodecError::Encode)?;
    Ok(pb::RaftMessage {
        format: pb::Format::Json as i32,
        data,
    })
}

/// Decode an openraft message.
pub(crate) fn decode<T: DeserializeOwned>(m: &pb::RaftMessage) -> Result<T, CodecError> {
    decode_bytes(m.format, &m.data)
}

/// Decode JSON `data` whose encoding is named by `format`.
pub(crate) fn decode_bytes<T: DeserializeOwned>(format: i32, data: &[u8]) -> Result<T, CodecError> {
    if format != pb::Format::Json as i32 {
        return Err(CodecError::Format(format));
    }
    serde_json::from_slice(data).map_err(CodecError::Decode)
}

/// One cached channel per peer address.
#[derive(Clone, Default)]
pub(crate) struct PeerPool {
    channels: Arc<parking_lot::Mutex<HashMap<String, Channel>>>,
    /// Mutual TLS to the peers (`None`: plaintext).
    tls: Option<tonic::transport::ClientTlsConfig>,
    /// Source address of outgoing connections: the IP the Raft listener is bound to, when it
    /// is a specific one (a multi-homed host talks to its peers from its cluster interface,
    /// and a peer's firewall or a fault-injecting proxy can tell the nodes apart).
    local_ip: Option<std::net::IpAddr>,
}

impl PeerPool {
    /// A pool whose channels use `tls` (mutual TLS) when given, and leave from `bind_ip`
    /// unless it is unspecified (`0.0.0.0`, `::`).
    pub(crate) fn new(
        tls: Option<tonic::transport::ClientTlsConfig>,
        bind_ip: std::net::IpAddr,
    ) -> PeerPool {
        PeerPool {
            channels: Default::default(),
            tls,
            local_ip: (!bind_ip.is_unspecified()).then_some(bind_ip),
        }
    }

    /// The endpoint of the peer at `addr`, with TLS when configured.
    fn endpoint(&self, addr: &str) -> Result<Endpoint, RaftError> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let invalid = |e: String| RaftError::Start {
            message: format!("invalid peer address {addr:?}: {e}; use host:port"),
        };
        let mut ep = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| invalid(e.to_string()))?;
        if let Some(tls) = &self.tls {
            ep = ep
                .tls_config(tls.clone())
                .map_err(|e| invalid(e.to_string()))?;
        }
        // TCP options (source address, TCP_NODELAY) are the connector's: see `connector`.
        Ok(ep
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            // The peers are members of the cluster (mutual TLS when configured), not strangers:
            // h2 ends a connection, and fails every call on it, after 1,024 streams it had to
            // reset itself (e.g. for frames arriving on a stream this side dropped early, such
            // as a Raft RPC past its deadline). Forwarded calls share one long-lived stream and
            // are never reset; this keeps the other RPCs from ever tripping that limit.
            .http2_max_local_error_reset_streams(None))
    }

    /// How every connection to a peer is dialled (tonic adds TLS and the connect timeout).
    fn connector(&self) -> coalesce::Connector {
        coalesce::Connector::new(self.local_ip)
    }

    /// Connect to `addr` now (with the TLS handshake when configured): whether a peer is
    /// reachable and, with mutual TLS, holds a node certificate of this cluster's CA.
    pub(crate) async fn probe(&self, addr: &str) -> Result<(), RaftError> {
        let ep = self.endpoint(addr)?;
        let connect = ep.connect_with_connector(self.connector());
        match tokio::time::timeout(Duration::from_secs(5), connect).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg = format!("{msg}: {s}");
                    src = s.source();
                }
                Err(RaftError::Unreachable {
                    node_id: 0,
                    addr: addr.to_owned(),
                    message: msg,
                })
            }
            Err(_) => Err(RaftError::Unreachable {
                node_id: 0,
                addr: addr.to_owned(),
                message: "the connection timed out".to_owned(),
            }),
        }
    }

    /// A client for the peer at `addr` (`host:port`), reusing the cached channel.
    pub(crate) fn client(&self, addr: &str) -> Result<RaftServiceClient<Channel>, RaftError> {
        Ok(RaftServiceClient::new(self.channel(addr)?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    /// The cached channel to the peer at `addr` (`host:port`), created lazily.
    pub(crate) fn channel(&self, addr: &str) -> Result<Channel, RaftError> {
        let channel = {
            let mut map = self.channels.lock();
            match map.get(addr) {
                Some(ch) => ch.clone(),
                None => {
                    let ch = self
                        .endpoint(addr)?
                        .connect_with_connector_lazy(self.connector());
                    map.insert(addr.to_string(), ch.clone());
                    ch
                }
            }
        };
        Ok(channel)
    }

    /// Forget the channel to `addr` after a transport failure, so the next call dials afresh
    /// (a tonic channel that failed to connect does not always recover by itself).
    pub(crate) fn invalidate(&self, addr: &str, status: &tonic::Status) {
        if matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
        ) {
            self.channels.lock().remove(addr);
        }
    }

    /// Drop all cached channels (on shutdown).
    pub(crate) fn clear(&self) {
        self.channels.lock().clear();
    }
}
