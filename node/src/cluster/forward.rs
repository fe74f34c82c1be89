//! Any-node forwarding: the gRPC `CallService` served next to Raft (the host side), and the
//! [`Forward`] port the router uses to reach an instance on another node (the caller side).
//!
//! A call travels as one request and comes back as a stream: the call's notifications
//! (progress, log messages) and the upstream's requests to the client (sampling, elicitation,
//! roots) in order, then exactly one answer or failure. Dropping the caller's stream (client
//! gone, deadline) drops the host's upstream call, which sends `notifications/cancelled`
//! upstream.
//!
//! The upstream's requests are registered in the host's relay table before they leave, so
//! their ids (`hgr/<host>/<seq>`) name the host: the client's answer, wherever the balancer
//! delivers it, comes back to the host through `Answer`.
//!
//! Cost: the host's stream drives the upstream call itself (no task of its own) and holds the
//! response headers until the first frame, so a call without notifications is answered with
//! headers, answer and trailers in one write; with the write coalescing of the connections
//! between nodes, calls forwarded together share system calls (`bench/README.md`, "Any-node
//! forwarding").

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use std::task::{Context, Poll, ready};

use futures::{Stream, StreamExt};
use hangar_proto::node::v1 as pb;
use hangar_raft::RaftHandle;
use pb::call_frame::Frame;
use pb::call_service_client::CallServiceClient;
use pb::call_service_server::{CallService, CallServiceServer};
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::jsonrpc::{Id, Message, RpcError};
use crate::runtime::relay::Relays;
use crate::runtime::{Forward, ForwardError, ForwardFuture, Host, Runtime, StartError};
use crate::upstream::{CallEvent, CallSink, Outcome, Upstream, UpstreamError};

/// Longest deadline a forwarded call may ask for.
const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
/// Extra time the caller gives the host beyond the call's own deadline (the host enforces
/// the deadline and answers `timeout` itself).
const DEADLINE_SLACK: Duration = Duration::from_secs(2);
/// How long a forward's trailers may take after its answer before the stream is reset.
const FINISH_TIMEOUT: Duration = Duration::from_secs(5);
/// Deadline of delivering a client's answer to the node that holds the request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

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

/// Whether `f` ends a call (its answer or failure).
fn is_last(f: &pb::CallFrame) -> bool {
    matches!(
        f.frame,
        Some(Frame::Result(_) | Frame::RpcError(_) | Frame::Failure(_)) | None
    )
}

/// The frames of one forwarded call. The stream drives the call itself (no task of its
/// own: the upstream's answer wakes the task that writes the response) and ends after the
/// answer or failure. Dropping it drops the call, which cancels it upstream.
struct CallFrames {
    call: Option<Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
    rx: mpsc::Receiver<Result<pb::CallFrame, Status>>,
    done: bool,
}

impl Stream for CallFrames {
    type Item = Result<pb::CallFrame, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Some(call) = self.call.as_mut()
            && call.as_mut().poll(cx).is_ready()
        {
            self.call = None;
        }
        let frame = ready!(self.rx.poll_recv(cx));
        self.done = frame
            .as_ref()
            .is_none_or(|f| f.as_ref().map_or(true, is_last));
        Poll::Ready(frame)
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
        let mut frames = CallFrames {
            call: Some(Box::pin(serve_call(runtime, req, tx))),
            rx,
            done: false,
        };
        // The response headers wait for the first frame, and the stream ends right after the
        // answer: a simple call's headers, answer and trailers leave in one write (three
        // before), which on loopback is most of a forward's cost.
        let first = frames.next().await;
        Ok(Response::new(Box::pin(
            futures::stream::iter(first).chain(frames),
        )))
    }

    async fn answer(
        &self,
        request: Request<pb::RelayAnswer>,
    ) -> Result<Response<pb::AnswerReply>, Status> {
        let runtime = self
            .runtime
            .get()
            .cloned()
            .ok_or_else(|| Status::unavailable("this node is still starting"))?;
        let a = request.into_inner();
        let id = Id::Str(a.relay_id);
        let mut msg = Message::response(id.clone(), crate::jsonrpc::empty_object());
        if !a.rpc_error.is_empty() {
            let e: RpcError = serde_json::from_slice(&a.rpc_error).map_err(|_| {
                Status::invalid_argument("rpc_error is not a JSON-RPC error object")
            })?;
            msg.result = None;
            msg.error = Some(e);
        } else {
            let raw = String::from_utf8(a.result)
                .ok()
                .and_then(|t| RawValue::from_string(t).ok())
                .ok_or_else(|| Status::invalid_argument("result is not JSON text"))?;
            msg.result = Some(raw);
        }
        let delivered = runtime
            .relays()
            .answer(&id, msg)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(pb::AnswerReply { delivered }))
    }
}

/// Run one forwarded call and stream its frames to `tx`. Driven by [`CallFrames`]: when the
/// caller goes away the stream is dropped, and with it this future and the upstream call,
/// which cancels it upstream.
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
    let relays = runtime.relays();
    let relay = Relayer {
        relays,
        call: relays.next_call(),
        conn: &conn,
        client_answers: req.client_answers,
        tx: &tx,
    };
    // The client's answers to this call's requests are not awaited after it ends.
    let _forget = relays.call_guard(relay.call);
    let (sink, mut events) = mpsc::channel::<CallEvent>(64);
    let call = conn.request(&req.method, params, Some(sink), Some(timeout));
    tokio::pin!(call);
    let result = loop {
        tokio::select! {
            r = &mut call => break r,
            Some(ev) = events.recv() => relay.event(ev).await,
        }
    };
    // Notifications sent before the answer go first.
    while let Ok(ev) = events.try_recv() {
        relay.event(ev).await;
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

/// Sends a forwarded call's events to the caller.
struct Relayer<'a> {
    relays: &'a Relays,
    call: u64,
    conn: &'a Arc<Upstream>,
    client_answers: bool,
    tx: &'a mpsc::Sender<Result<pb::CallFrame, Status>>,
}

impl Relayer<'_> {
    /// A call event on the host: notifications go to the caller as they are; requests from
    /// the upstream to the client (sampling, elicitation, roots) get a relayed id naming this
    /// node first, so the client's answer finds its way back here.
    async fn event(&self, ev: CallEvent) {
        let frame = match ev {
            CallEvent::Notification(m) | CallEvent::Relayed(m) => {
                Frame::Notification(m.to_json().into_bytes())
            }
            CallEvent::Request(mut m) => {
                let Some(upstream_id) = m.id.take() else {
                    return;
                };
                if !self.client_answers {
                    let err = RpcError::new(
                        crate::jsonrpc::INTERNAL_ERROR,
                        "the client cannot receive requests from the server (it did not accept an event stream for this call)",
                    );
                    let _ = self.conn.respond(upstream_id, Outcome::Error(err)).await;
                    return;
                }
                m.id = Some(
                    self.relays
                        .register(self.conn.clone(), upstream_id, self.call),
                );
                Frame::Request(m.to_json().into_bytes())
            }
        };
        let _ = self.tx.send(Ok(pb::CallFrame { frame: Some(frame) })).await;
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

    /// A `CallService` client to `node` (over Raft's shared channel) and its address.
    fn client(&self, node: u64) -> Result<(CallServiceClient<Channel>, String), ForwardError> {
        let unreachable = |message: String| ForwardError::Unreachable { node, message };
        let addr = self
            .raft
            .read(|st| st.nodes.get(&node).map(|n| n.raft_addr.clone()))
            .ok_or_else(|| unreachable("it has no registered address".to_owned()))?;
        let channel = self
            .raft
            .peer_channel(&addr)
            .map_err(|e| unreachable(e.to_string()))?;
        let client = CallServiceClient::new(channel)
            .max_decoding_message_size(hangar_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(hangar_proto::MAX_MESSAGE_BYTES);
        Ok((client, addr))
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
        let (mut client, addr) = self.client(node)?;
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
            client_answers: sink.is_some(),
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
                Some(Frame::Request(b)) => {
                    if let (Some(sink), Ok(m)) = (&sink, serde_json::from_slice::<Message>(&b)) {
                        let _ = sink.send(CallEvent::Relayed(m)).await;
                    }
                }
                Some(Frame::Result(b)) => {
                    finish(stream);
                    let text = String::from_utf8(b).map_err(|_| bad("result"))?;
                    let raw = RawValue::from_string(text).map_err(|_| bad("result"))?;
                    return Ok(Outcome::Result(raw));
                }
                Some(Frame::RpcError(b)) => {
                    finish(stream);
                    let e: RpcError = serde_json::from_slice(&b).map_err(|_| bad("error"))?;
                    return Ok(Outcome::Error(e));
                }
                Some(Frame::Failure(f)) => {
                    finish(stream);
                    return Err(failure_error(instance, node, f, timeout));
                }
                None => return Err(bad("frame")),
            }
        }
    }
}

/// Read a forward's stream to its end after the answer (the host sends its trailers right
/// behind it, usually in the same packet). A stream dropped before its end is reset
/// (`RST_STREAM`), which costs a frame each way — and HTTP/2 libraries count such resets
/// against a per-connection limit.
fn finish(mut stream: tonic::Streaming<pb::CallFrame>) {
    use futures::FutureExt;
    if let Some(Ok(None) | Err(_)) = stream.message().now_or_never() {
        return;
    }
    tokio::spawn(async move {
        let drain = async { while let Ok(Some(_)) = stream.message().await {} };
        let _ = tokio::time::timeout(FINISH_TIMEOUT, drain).await;
    });
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

impl Forwarder {
    async fn deliver(&self, node: u64, relay_id: &Id, msg: Message) -> Result<bool, ForwardError> {
        let Id::Str(relay_id) = relay_id else {
            return Ok(false);
        };
        let (mut client, addr) = self.client(node)?;
        let (result, rpc_error) = match (msg.result, msg.error) {
            (Some(r), _) => (r.get().as_bytes().to_vec(), Vec::new()),
            (None, Some(e)) => (Vec::new(), serde_json::to_vec(&e).unwrap_or_default()),
            (None, None) => (
                Vec::new(),
                serde_json::to_vec(&RpcError::new(
                    crate::jsonrpc::INTERNAL_ERROR,
                    "empty answer from client",
                ))
                .unwrap_or_default(),
            ),
        };
        let mut req = Request::new(pb::RelayAnswer {
            relay_id: relay_id.clone(),
            result,
            rpc_error,
        });
        req.set_timeout(ANSWER_TIMEOUT);
        match client.answer(req).await {
            Ok(r) => Ok(r.into_inner().delivered),
            Err(status) => {
                self.raft.peer_failed(&addr, &status);
                Err(ForwardError::Unreachable {
                    node,
                    message: status.message().to_owned(),
                })
            }
        }
    }
}

impl Forward for Forwarder {
    fn answer<'a>(
        &'a self,
        node: u64,
        relay_id: &'a Id,
        msg: Message,
    ) -> Pin<Box<dyn std::future::Future<Output = Result<bool, ForwardError>> + Send + 'a>> {
        Box::pin(self.deliver(node, relay_id, msg))
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(f: Frame) -> Result<pb::CallFrame, Status> {
        Ok(pb::CallFrame { frame: Some(f) })
    }

    /// The stream drives its call, yields its frames in order and ends with the answer, even
    /// when the call goes on sending.
    #[tokio::test]
    async fn call_frames_end_with_the_answer() {
        let (tx, rx) = mpsc::channel(2);
        let call = async move {
            for f in [
                Frame::Notification(b"{}".to_vec()),
                Frame::Notification(b"{}".to_vec()),
                Frame::Notification(b"{}".to_vec()),
                Frame::Result(b"1".to_vec()),
                Frame::Notification(b"late".to_vec()),
            ] {
                if tx.send(frame(f)).await.is_err() {
                    return;
                }
            }
            std::future::pending::<()>().await;
        };
        let frames = CallFrames {
            call: Some(Box::pin(call)),
            rx,
            done: false,
        };
        let got: Vec<_> = tokio::time::timeout(Duration::from_secs(10), frames.collect::<Vec<_>>())
            .await
            .expect("the stream ends after the answer");
        let kinds: Vec<_> = got
            .into_iter()
            .map(|f| match f.unwrap().frame {
                Some(Frame::Notification(_)) => "n",
                Some(Frame::Result(_)) => "r",
                _ => "?",
            })
            .collect();
        assert_eq!(kinds, ["n", "n", "n", "r"]);
    }

    /// Dropping the stream drops the call it drives (which cancels the upstream request).
    #[tokio::test]
    async fn dropping_call_frames_drops_the_call() {
        let (tx, rx) = mpsc::channel(4);
        let (dropped_tx, dropped_rx) = tokio::sync::oneshot::channel::<()>();
        let call = async move {
            let _guard = dropped_tx;
            let _ = tx.send(frame(Frame::Notification(b"{}".to_vec()))).await;
            std::future::pending::<()>().await;
        };
        let mut frames = CallFrames {
            call: Some(Box::pin(call)),
            rx,
            done: false,
        };
        assert!(frames.next().await.is_some());
        drop(frames);
        // The oneshot's sender went with the call.
        assert!(dropped_rx.await.is_err());
    }
}
