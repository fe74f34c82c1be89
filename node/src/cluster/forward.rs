//! Any-node forwarding: the gRPC `CallService` served next to Raft (the host side), and the
//! [`Forward`] port the router uses to reach an instance on another node (the caller side).
//!
//! A call travels as one request and comes back as a stream: the call's notifications
//! (progress, log messages) in order, then exactly one answer or failure. Dropping the
//! caller's stream (client gone, deadline) drops the host's upstream call, which sends
//! `notifications/cancelled` upstream.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::Stream;
use hangar_proto::node::v1 as pb;
use hangar_raft::RaftHandle;
use pb::call_frame::Frame;
use pb::call_service_client::CallServiceClient;
use pb::call_service_server::{CallService, CallServiceServer};
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::jsonrpc::{Message, RpcError};
use crate::runtime::{Forward, ForwardError, ForwardFuture, Host, Runtime, StartError};
use crate::upstream::{CallEvent, CallSink, Outcome, UpstreamError};

/// Longest deadline a forwarded call may ask for.
const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
/// Extra time the caller gives the host beyond the call's own deadline (the host enforces
/// the deadline and answers `timeout` itself).
const DEADLINE_SLACK: Duration = Duration::from_secs(2);

/// Failure kinds on the wire.
mod kind {
    pub(super) const NOT_PLACED_HERE: &str = "not_placed_here";
    pub(super) const UNKNOWN_SERVER: &str = "unknown_server";
    pub(super) const START_FAILED: &str = "start_failed";
    pub(super) const TIMEOUT: &str = "timeout";
    pub(super) const UPSTREAM: &str = "upstream";
    pub(super) const BAD_REQUEST: &str = "bad_request";
}

/// The host side: runs forwarded calls on this node's instances.
#[derive(Default)]
pub struct CallServer {
    runtime: OnceLock<Arc<Runtime>>,
}

impl CallServer {
    /// The service, to be served on the Raft listener; it answers UNAVAILABLE until
    /// [`attach`](Self::attach).
    pub fn routes(self: &Arc<Self>) -> tonic::service::Routes {
        tonic::service::Routes::new(CallServiceServer::from_arc(self.clone()))
    }

    /// Serve calls on `runtime`'s instances from now on.
    pub fn attach(&self, runtime: Arc<Runtime>) {
        let _ = self.runtime.set(runtime);
    }
}

type FrameStream = Pin<Box<dyn Stream<Item = Result<pb::CallFrame, Status>> + Send>>;

fn failure(message: impl Into<String>, kind: &str, before_send: bool) -> pb::CallFrame {
    pb::CallFrame {
        frame: Some(Frame::Failure(pb::Failure {
            message: message.into(),
            kind: kind.to_owned(),
            before_send,
        })),
    }
}

#[tonic::async_trait]
impl CallService for CallServer {
    type CallStream = FrameStream;

    async fn call(
        &self,
        request: Request<pb::CallRequest>,
    ) -> Result<Response<Self::CallStream>, Status> {
        let runtime = self
            .runtime
            .get()
            .cloned()
            .ok_or_else(|| Status::unavailable("this node is still starting"))?;
        let req = request.into_inner();
        let (tx, rx) = mpsc::channel::<Result<pb::CallFrame, Status>>(64);
        tokio::spawn(serve_call(runtime, req, tx));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

/// Run one forwarded call and stream its frames to `tx`.
async fn serve_call(
    runtime: Arc<Runtime>,
    req: pb::CallRequest,
    tx: mpsc::Sender<Result<pb::CallFrame, Status>>,
) {
    let id = req.instance_id.clone();
    let answer = |f: pb::CallFrame| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(Ok(f)).await;
        }
    };
    let Some(inst) = runtime.instance(&id) else {
        return answer(failure(
            format!("no MCP server '{id}' on node {}", runtime.node_id()),
            kind::UNKNOWN_SERVER,
            true,
        ))
        .await;
    };
    if inst.host() != Host::Here {
        return answer(failure(
            format!("'{id}' is not placed on this node"),
            kind::NOT_PLACED_HERE,
            true,
        ))
        .await;
    }
    let params = if req.params.is_empty() {
        None
    } else {
        match String::from_utf8(req.params)
            .ok()
            .and_then(|s| RawValue::from_string(s).ok())
        {
            Some(p) => Some(p),
            None => {
                return answer(failure("params are not JSON text", kind::BAD_REQUEST, true)).await;
            }
        }
    };
    let timeout =
        Duration::from_millis(req.timeout_ms).clamp(Duration::from_millis(1), MAX_TIMEOUT);
    tracing::debug!(server = %id, from = req.from_node, method = %req.method, "forwarded_call");
    let conn = match inst.ensure_ready().await {
        Ok(c) => c,
        Err(StartError::NotPlacedHere { .. }) => {
            return answer(failure(
                format!("'{id}' is not placed on this node"),
                kind::NOT_PLACED_HERE,
                true,
            ))
            .await;
        }
        Err(e) => return answer(failure(e.to_string(), kind::START_FAILED, true)).await,
    };
    let (sink, mut events) = mpsc::channel::<CallEvent>(64);
    let call = conn.request(&req.method, params, Some(sink), Some(timeout));
    tokio::pin!(call);
    let result = loop {
        tokio::select! {
            r = &mut call => break r,
            Some(ev) = events.recv() => relay_event(&conn, ev, &tx).await,
            // The caller went away: dropping the call cancels it upstream.
            _ = tx.closed() => return,
        }
    };
    // Notifications sent before the answer go first.
    while let Ok(ev) = events.try_recv() {
        relay_event(&conn, ev, &tx).await;
    }
    let frame = match result {
        Ok(Outcome::Result(r)) => {
            inst.report_success(&conn);
            Frame::Result(r.get().as_bytes().to_vec())
        }
        Ok(Outcome::Error(e)) => {
            inst.report_success(&conn);
            Frame::RpcError(serde_json::to_vec(&e).unwrap_or_default())
        }
        Err(e) => {
            inst.report_transport_failure(&conn, &e);
            let k = if matches!(e, UpstreamError::Timeout { .. }) {
                kind::TIMEOUT
            } else {
                kind::UPSTREAM
            };
            return answer(failure(e.to_string(), k, e.before_send())).await;
        }
    };
    answer(pb::CallFrame { frame: Some(frame) }).await;
}

/// A call event on the host: notifications go to the caller; requests from the upstream to
/// the client (sampling, elicitation, roots) are answered with an error, because the answer
/// cannot yet travel back across nodes.
async fn relay_event(
    conn: &crate::upstream::Upstream,
    ev: CallEvent,
    tx: &mpsc::Sender<Result<pb::CallFrame, Status>>,
) {
    match ev {
        CallEvent::Notification(m) => {
            let _ = tx
                .send(Ok(pb::CallFrame {
                    frame: Some(Frame::Notification(m.to_json().into_bytes())),
                }))
                .await;
        }
        CallEvent::Request(m) => {
            if let Some(id) = m.id {
                let err = RpcError::new(
                    crate::jsonrpc::METHOD_NOT_FOUND,
                    "the client is connected to another Hangar node; requests from a server to the client are not relayed across nodes yet",
                );
                let _ = conn.respond(id, Outcome::Error(err)).await;
            }
        }
    }
}

/// The caller side: forwards calls to the node hosting an instance.
pub struct Forwarder {
    raft: RaftHandle,
    me: u64,
}

impl Forwarder {
    /// Forward over `raft`'s peer channels; `me` is this node's id.
    pub fn new(raft: RaftHandle, me: u64) -> Self {
        Forwarder { raft, me }
    }

    async fn run(
        &self,
        node: u64,
        instance: &str,
        method: &str,
        params: Option<Box<RawValue>>,
        sink: Option<CallSink>,
        timeout: Duration,
    ) -> Result<Outcome, ForwardError> {
        let connect = |message: String| ForwardError::Unreachable { node, message };
        let addr = self
            .raft
            .read(|st| st.nodes.get(&node).map(|n| n.raft_addr.clone()))
            .ok_or_else(|| connect("it has no registered address".to_owned()))?;
        let channel = self
            .raft
            .peer_channel(&addr)
            .map_err(|e| connect(e.to_string()))?;
        let mut client = CallServiceClient::new(channel)
            .max_decoding_message_size(hangar_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(hangar_proto::MAX_MESSAGE_BYTES);
        let deadline = tokio::time::Instant::now() + timeout + DEADLINE_SLACK;
        let timed_out = || {
            ForwardError::Upstream(UpstreamError::Timeout {
                server: instance.to_owned(),
                secs: timeout.as_secs_f64(),
            })
        };
        let req = pb::CallRequest {
            from_node: self.me,
            instance_id: instance.to_owned(),
            method: method.to_owned(),
            params: params
                .map(|p| p.get().as_bytes().to_vec())
                .unwrap_or_default(),
            timeout_ms: timeout.as_millis() as u64,
        };
        let mut stream = match tokio::time::timeout_at(deadline, client.call(req)).await {
            Err(_) => return Err(timed_out()),
            Ok(Err(status)) => {
                self.raft.peer_failed(&addr, &status);
                return Err(status_error(instance, node, &status));
            }
            Ok(Ok(r)) => r.into_inner(),
        };
        loop {
            let frame = match tokio::time::timeout_at(deadline, stream.message()).await {
                Err(_) => return Err(timed_out()),
                Ok(Err(status)) => {
                    self.raft.peer_failed(&addr, &status);
                    return Err(ForwardError::Upstream(UpstreamError::Closed {
                        server: instance.to_owned(),
                        message: format!("the forward to node {node} broke: {}", status.message()),
                        before_send: false,
                    }));
                }
                Ok(Ok(None)) => {
                    return Err(ForwardError::Upstream(UpstreamError::Closed {
                        server: instance.to_owned(),
                        message: format!("node {node} ended the forward without an answer"),
                        before_send: false,
                    }));
                }
                Ok(Ok(Some(f))) => f,
            };
            let bad = |what: &str| {
                ForwardError::Upstream(UpstreamError::Protocol {
                    server: instance.to_owned(),
                    message: format!("node {node} sent an unreadable {what}"),
                })
            };
            match frame.frame {
                Some(Frame::Notification(b)) => {
                    if let (Some(sink), Ok(m)) = (&sink, serde_json::from_slice::<Message>(&b)) {
                        let _ = sink.send(CallEvent::Notification(m)).await;
                    }
                }
                Some(Frame::Result(b)) => {
                    let text = String::from_utf8(b).map_err(|_| bad("result"))?;
                    let raw = RawValue::from_string(text).map_err(|_| bad("result"))?;
                    return Ok(Outcome::Result(raw));
                }
                Some(Frame::RpcError(b)) => {
                    let e: RpcError = serde_json::from_slice(&b).map_err(|_| bad("error"))?;
                    return Ok(Outcome::Error(e));
                }
                Some(Frame::Failure(f)) => return Err(failure_error(instance, node, f, timeout)),
                None => return Err(bad("frame")),
            }
        }
    }
}

/// A failure frame from the host, as the router's error.
fn failure_error(instance: &str, node: u64, f: pb::Failure, timeout: Duration) -> ForwardError {
    match f.kind.as_str() {
        kind::NOT_PLACED_HERE => ForwardError::NotHostedThere {
            node,
            instance: instance.to_owned(),
        },
        kind::UNKNOWN_SERVER | kind::START_FAILED | kind::BAD_REQUEST => ForwardError::Start {
            node,
            message: f.message,
        },
        kind::TIMEOUT => ForwardError::Upstream(UpstreamError::Timeout {
            server: instance.to_owned(),
            secs: timeout.as_secs_f64(),
        }),
        _ => ForwardError::Upstream(UpstreamError::Closed {
            server: instance.to_owned(),
            message: format!("on node {node}: {}", f.message),
            before_send: f.before_send,
        }),
    }
}

/// A gRPC status at the start of a forward. The request is known not to have left only
/// when the connection could not be made.
fn status_error(instance: &str, node: u64, status: &Status) -> ForwardError {
    // Only a connection that could not be made (or a host still starting) proves the request
    // never left; a connection that broke later may have delivered it.
    let msg = status.message().to_ascii_lowercase();
    let unreachable = status.code() == tonic::Code::Unavailable
        && (msg.contains("connect") || msg.contains("still starting"));
    if unreachable {
        ForwardError::Unreachable {
            node,
            message: status.message().to_owned(),
        }
    } else {
        ForwardError::Upstream(UpstreamError::Closed {
            server: instance.to_owned(),
            message: format!("node {node} refused the forward: {}", status.message()),
            before_send: false,
        })
    }
}

impl Forward for Forwarder {
    fn call<'a>(
        &'a self,
        node: u64,
        instance: &'a str,
        method: &'a str,
        params: Option<Box<RawValue>>,
        sink: Option<CallSink>,
        timeout: Duration,
    ) -> ForwardFuture<'a> {
        Box::pin(self.run(node, instance, method, params, sink, timeout))
    }
}
