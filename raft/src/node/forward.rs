//! The forwarding client: runs an operation on the leader — locally when this node leads,
//! else over the `Forward` / `ReadIndex` RPCs — and retries, until a deadline, only when the
//! leader provably did not act on it.

use std::sync::Arc;
use std::time::Duration;

use hangar_proto::raft::v1 as pb;
use pb::raft_service_client::RaftServiceClient;
use tokio::sync::watch;
use tokio::time::Instant;

use super::executor::Core;
use crate::error::RaftError;
use crate::network::ForwardOp;
use crate::network::ForwardResult;
use crate::network::decode_bytes;
use crate::state::Response;

/// How long `propose`, membership changes and linearizable reads keep trying (leader
/// elections and forwarding included) before giving up.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(10);

/// Outcome of one attempt to reach the leader.
enum Attempt<T> {
    Done(Result<T, RaftError>),
    /// Safe to retry (the leader did not act on it); carries the error to return at the deadline.
    Retry(RaftError),
}

/// True when a failed call provably never reached the server (connection not established).
fn not_sent(status: &tonic::Status) -> bool {
    let mut text = status.message().to_ascii_lowercase();
    let mut source = std::error::Error::source(status);
    while let Some(s) = source {
        text.push(' ');
        text.push_str(&s.to_string().to_ascii_lowercase());
        source = s.source();
    }
    // Only failures to establish the connection: "connection reset" or "connection closed"
    // happen after the request may have been sent, and must not be retried.
    [
        "error trying to connect",
        "tcp connect error",
        "connection refused",
        "client error (connect)",
        "service was not ready",
    ]
    .iter()
    .any(|m| text.contains(m))
}

/// Sends operations and read-index requests to the current leader.
pub(crate) struct Forwarder {
    core: Arc<Core>,
    leader_rx: watch::Receiver<Option<u64>>,
}

impl Forwarder {
    /// A forwarder that follows the leader announced on `leader_rx`.
    pub(crate) fn new(core: Arc<Core>, leader_rx: watch::Receiver<Option<u64>>) -> Forwarder {
        Forwarder { core, leader_rx }
    }

    fn node_id(&self) -> u64 {
        self.core.node_id
    }

    /// Wait (until `deadline`) for the leader to change from `seen`, or a short backoff.
    async fn wait_leader_change(&self, seen: Option<u64>, deadline: Instant) {
        let mut rx = self.leader_rx.clone();
        let wait = rx.wait_for(|l| *l != seen);
        let backoff = Instant::now() + Duration::from_millis(100);
        let _ = tokio::time::timeout_at(deadline.min(backoff), wait).await;
    }

    /// Run `op` on the leader, forwarding when this node is not the leader.
    pub(crate) async fn route(&self, op: ForwardOp) -> Result<Option<Response>, RaftError> {
        let deadline = Instant::now() + OPERATION_TIMEOUT;
        loop {
            let leader = *self.leader_rx.borrow();
            let attempt = match leader {
                None => Attempt::Retry(RaftError::NoLeader),
                Some(id) if id == self.node_id() => {
                    match self.core.execute_local(op.clone()).await {
                        Err(e @ RaftError::NotLeader { .. }) => Attempt::Retry(e),
                        other => Attempt::Done(other),
                    }
                }
                Some(id) => self.forward(id, &op, deadline).await,
            };
            match attempt {
                Attempt::Done(result) => return result,
                Attempt::Retry(e) if Instant::now() >= deadline => {
                    return Err(match e {
                        e @ (RaftError::NoLeader | RaftError::Unreachable { .. }) => e,
                        other => {
                            tracing::debug!(error = %other, "giving up after retries");
                            RaftError::Timeout {
                                what: "reaching the leader".to_string(),
                                after_ms: OPERATION_TIMEOUT.as_millis() as u64,
                            }
                        }
                    });
                }
                Attempt::Retry(_) => self.wait_leader_change(leader, deadline).await,
            }
        }
    }

    fn leader_client(
        &self,
        leader: u64,
    ) -> Result<(RaftServiceClient<tonic::transport::Channel>, String), RaftError> {
        let info = self.core.node_info(leader).ok_or(RaftError::NoLeader)?;
        let client = self.core.pool.client(&info.raft_addr)?;
        Ok((client, info.raft_addr))
    }

    async fn forward(
        &self,
        leader: u64,
        op: &ForwardOp,
        deadline: Instant,
    ) -> Attempt<Option<Response>> {
        let (mut client, addr) = match self.leader_client(leader) {
            Ok(c) => c,
            Err(e) => return Attempt::Retry(e),
        };
        let bytes = match serde_json::to_vec(op) {
            Ok(b) => b,
            Err(e) => return Attempt::Done(Err(RaftError::internal(e))),
        };
        let mut req = tonic::Request::new(pb::ForwardRequest {
            format: pb::Format::Json as i32,
            op: bytes,
            from_node: self.node_id(),
        });
        req.set_timeout(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(100)),
        );
        let unreachable = |message: String| RaftError::Unreachable {
            node_id: leader,
            addr: addr.clone(),
            message,
        };
        let result = client.forward(req).await;
        if let Err(status) = &result {
            self.core.pool.invalidate(&addr, status);
        }
        match result {
            Ok(reply) => {
                let reply = reply.into_inner();
                match decode_bytes::<ForwardResult>(reply.format, &reply.result) {
                    Ok(ForwardResult::Done { response }) => Attempt::Done(Ok(response)),
                    // Refused before anything was appended: try the new leader.
                    Ok(ForwardResult::Failed {
                        error: e @ (RaftError::NotLeader { .. } | RaftError::NoLeader),
                    }) => Attempt::Retry(e),
                    // A leader shutting down may have appended the entry already (a later
                    // leader can commit it): retrying could apply it twice.
                    Ok(ForwardResult::Failed {
                        error: RaftError::ShuttingDown,
                    }) if matches!(op, ForwardOp::Propose { .. }) => {
                        Attempt::Done(Err(RaftError::OutcomeUnknown {
                            message: format!(
                                "leader {leader} at {addr} shut down while proposing; the write may or may not take effect"
                            ),
                        }))
                    }
                    Ok(ForwardResult::Failed {
                        error: e @ RaftError::ShuttingDown,
                    }) => Attempt::Retry(e),
                    Ok(ForwardResult::Failed { error }) => Attempt::Done(Err(error)),
                    Ok(ForwardResult::ReadIndex { .. }) => Attempt::Done(Err(RaftError::internal(
                        "leader answered a forward with a read index",
                    ))),
                    Err(e) => Attempt::Done(Err(RaftError::internal(e))),
                }
            }
            Err(status) if not_sent(&status) => {
                Attempt::Retry(unreachable(status.message().to_string()))
            }
            Err(status) => match op {
                ForwardOp::Propose { .. } => Attempt::Done(Err(RaftError::OutcomeUnknown {
                    message: format!(
                        "forwarding to leader {leader} at {addr} failed: {}",
                        status.message()
                    ),
                })),
                _ => Attempt::Done(Err(unreachable(status.message().to_string()))),
            },
        }
    }

    /// The leader's read index (asked over gRPC when this node is a follower), retried until
    /// `deadline` while no leader is known or the leader changes.
    pub(crate) async fn read_index(&self, deadline: Instant) -> Result<u64, RaftError> {
        loop {
            let leader = *self.leader_rx.borrow();
            let result = match leader {
                None => Err(RaftError::NoLeader),
                Some(id) if id == self.node_id() => self.core.read_index_local().await,
                Some(id) => self.remote_read_index(id, deadline).await,
            };
            match result {
                Ok(index) => return Ok(index),
                Err(e) if !e.is_retryable() && !matches!(e, RaftError::ShuttingDown) => {
                    return Err(e);
                }
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => self.wait_leader_change(leader, deadline).await,
            }
        }
    }

    async fn remote_read_index(&self, leader: u64, deadline: Instant) -> Result<u64, RaftError> {
        let (mut client, addr) = self.leader_client(leader)?;
        let mut req = tonic::Request::new(pb::ReadIndexRequest {
            from_node: self.node_id(),
        });
        req.set_timeout(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(100)),
        );
        let reply = client
            .read_index(req)
            .await
            .inspect_err(|s| self.core.pool.invalidate(&addr, s))
            .map_err(|s| RaftError::Unreachable {
                node_id: leader,
                addr,
                message: s.message().to_string(),
            })?
            .into_inner();
        match decode_bytes::<ForwardResult>(reply.format, &reply.result)
            .map_err(RaftError::internal)?
        {
            ForwardResult::ReadIndex { index } => Ok(index),
            ForwardResult::Failed { error } => Err(error),
            ForwardResult::Done { .. } => Err(RaftError::internal(
                "leader answered a read index with a write result",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::not_sent;

    #[test]
    fn only_failures_to_connect_count_as_not_sent() {
        for sent in [
            "transport error: connection reset by peer",
            "transport error: connection closed before message completed",
            "h2 protocol error: stream disconnected",
            "timeout expired",
        ] {
            assert!(!not_sent(&tonic::Status::unavailable(sent)), "{sent}");
        }
        for unsent in [
            "error trying to connect: tcp connect error: Connection refused (os error 111)",
            "client error (Connect)",
            "tcp connect error",
            "Service was not ready: transport error",
        ] {
            assert!(not_sent(&tonic::Status::unavailable(unsent)), "{unsent}");
        }
    }
}
