//! Any-node forwarding: the gRPC `CallService` served next to Raft (the host side), and the
//! [`Forward`] port the router uses to reach an instance on another node (the caller side).
//!
//! Calls from one node to another share one long-lived stream (`Calls`), opened by the
//! caller on first use and kept while it works: a call is one `start` message out, and its
//! frames come back tagged with the caller's number — the call's notifications (progress, log
//! messages) and the upstream's requests to the client (sampling, elicitation, roots) in
//! order, then exactly one answer or failure. A caller that gives up (client gone, deadline)
//! sends `cancel`, which drops the host's upstream call, which sends `notifications/cancelled`
//! upstream. A stream that breaks fails the calls in flight on it; the next call opens a new
//! one.
//!
//! The upstream's requests are registered in the host's relay table before they leave, so
//! their ids (`hgr/<host>/<seq>`) name the host: the client's answer, wherever the balancer
//! delivers it, comes back to the host through `Answer`.
//!
//! Cost: a call on an open stream is a message each way, not an HTTP/2 stream of its own
//! (headers, trailers, stream state on both sides); the host drives all of a stream's calls
//! from the task that writes its answers, so an upstream's answer goes out without a task
//! hop; with the write coalescing of the connections between nodes, calls forwarded together
//! share system calls (`bench/README.md`, "Any-node forwarding").

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use std::task::{Context, Poll};

use futures::future::{AbortHandle, Abortable};
use futures::stream::FuturesUnordered;
use futures::{Future, Stream, StreamExt};
use hangar_proto::node::v1 as pb;
use hangar_raft::RaftHandle;
use pb::call_frame::Frame;
use pb::call_service_client::CallServiceClient;
use pb::call_service_server::{CallService, CallServiceServer};
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use crate::jsonrpc::{Id, Message, RpcError};
use crate::runtime::relay::Relays;
use crate::runtime::{Forward, ForwardError, ForwardFuture, Host, Runtime, StartError};
use crate::upstream::{CallEvent, CallSink, Outcome, Upstream, UpstreamError};

/// Longest deadline a forwarded call may ask for.
const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
/// Extra time the caller gives the host beyond the call's own deadline (the host enforces
/// the deadline and answers `timeout` itself).
const DEADLINE_SLACK: Duration = Duration::from_secs(2);
/// Deadline of delivering a client's answer to the node that holds the request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames a host's stream holds for writing before its calls wait (HTTP/2 flow control
/// pushes back beyond that).
const HOST_QUEUE: usize = 1024;
/// Messages a host reads from a stream in one turn before it writes what is ready.
const HOST_READ_TURN: usize = 64;

/// Failure kinds on the wire.
mod kind {
    pub(super) const NOT_PLACED_HERE: &str = "not_placed_here";
    pub(super) const UNKNOWN_SERVER: &str = "unknown_server";
    pub(super) const START_FAILED: &str = "start_failed";
    pub(super) const TIMEOUT: &str = "timeout";
    pub(super) const UPSTREAM: &str = "upstream";
    pub(super) const BAD_REQUEST: &str = "bad_request";
    pub(super) const SHUTTING_DOWN: &str = "shutting_down";
}

/// The host side: runs forwarded calls on this node's instances.
#[derive(Default)]
pub struct CallServer {
    runtime: OnceLock<Arc<Runtime>>,
    /// Cancelled when the node stops serving calls: streams refuse new calls and end once
    /// their calls are done.
    stopping: CancellationToken,
}

impl CallServer {
    /// Refuse new calls from now on (`shutting_down`: the caller retries elsewhere, nothing
    /// was sent) and end every stream once its calls are done, so that the Raft listener
    /// can close. Called before the node stops its instances.
    pub fn stop(&self) {
        self.stopping.cancel();
    }

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

fn failure(message: impl Into<String>, kind: &str, before_send: bool) -> pb::CallFrame {
    pb::CallFrame {
        frame: Some(Frame::Failure(pb::Failure {
            message: message.into(),
            kind: kind.to_owned(),
            before_send,
        })),
    }
}

/// Where a host's call sends its frames: the stream's queue, tagged with the caller's number.
#[derive(Clone)]
struct FrameTx {
    call: u64,
    tx: mpsc::Sender<pb::CallDown>,
}

impl FrameTx {
    async fn send(&self, frame: pb::CallFrame) {
        let down = pb::CallDown {
            call: self.call,
            frame: Some(frame),
        };
        let _ = self.tx.send(down).await;
    }
}

type CallFuture = Pin<Box<dyn Future<Output = ()> + Send>>;
/// A call (its number when done) or a refusal (`None`) driven by a host's stream.
type CallSlot = Pin<Box<dyn Future<Output = Option<u64>> + Send>>;
/// How a host runs one call (the runtime's [`serve_call`]; a stand-in in tests).
type StartCall = Box<dyn Fn(pb::CallRequest, FrameTx) -> CallFuture + Send>;

/// A host's side of one `Calls` stream: reads the caller's starts and cancels, drives the
/// calls (no task of their own: an upstream's answer wakes the task that writes the stream)
/// and yields their frames. Ends when the caller closes its side, dropping every call still
/// running. Once the node stops serving calls, it says so (a `shutting_down` failure for
/// call number 0) and refuses new calls; the caller then closes its side when its calls here
/// are done.
struct HostCalls<S> {
    /// The caller's messages; `None` once it closed its side.
    inbound: Option<S>,
    start: StartCall,
    calls: FuturesUnordered<Abortable<CallSlot>>,
    aborts: HashMap<u64, AbortHandle>,
    tx: mpsc::Sender<pb::CallDown>,
    rx: mpsc::Receiver<pb::CallDown>,
    /// Resolves when the node starts stopping.
    stopping: Pin<Box<WaitForCancellationFutureOwned>>,
    draining: bool,
}

impl<S> HostCalls<S> {
    fn new(inbound: S, start: StartCall, shutdown: CancellationToken) -> Self {
        let (tx, rx) = mpsc::channel(HOST_QUEUE);
        HostCalls {
            inbound: Some(inbound),
            start,
            calls: FuturesUnordered::new(),
            aborts: HashMap::new(),
            tx,
            rx,
            draining: false,
            stopping: Box::pin(shutdown.cancelled_owned()),
        }
    }

    fn on_message(&mut self, up: pb::CallUp) {
        let id = up.call;
        match up.op {
            Some(pb::call_up::Op::Start(req)) => {
                if self.draining {
                    let f = failure("this node is shutting down", kind::SHUTTING_DOWN, true);
                    self.refuse(id, f);
                } else if id == 0 || self.aborts.contains_key(&id) {
                    let msg = format!("call number {id} is reserved or already running");
                    self.refuse(id, failure(msg, kind::BAD_REQUEST, true));
                } else {
                    let tx = FrameTx {
                        call: id,
                        tx: self.tx.clone(),
                    };
                    let call = (self.start)(req, tx);
                    self.push(id, call);
                }
            }
            Some(pb::call_up::Op::Cancel(_)) => {
                if let Some(h) = self.aborts.remove(&id) {
                    h.abort();
                }
            }
            None => {}
        }
    }

    /// Answer call number `id` with `f` and nothing else. The frame waits for room in the
    /// queue like any other, but is no call: it is not cancelled and does not hold the number.
    fn refuse(&mut self, id: u64, f: pb::CallFrame) {
        let tx = FrameTx {
            call: id,
            tx: self.tx.clone(),
        };
        let fut: CallSlot = Box::pin(async move {
            tx.send(f).await;
            None
        });
        let (_, reg) = AbortHandle::new_pair();
        self.calls.push(Abortable::new(fut, reg));
    }

    fn push(&mut self, id: u64, call: CallFuture) {
        let (handle, reg) = AbortHandle::new_pair();
        let fut: CallSlot = Box::pin(async move {
            call.await;
            Some(id)
        });
        self.calls.push(Abortable::new(fut, reg));
        self.aborts.insert(id, handle);
    }
}

impl<S> Stream for HostCalls<S>
where
    S: Stream<Item = Result<pb::CallUp, Status>> + Unpin,
{
    type Item = Result<pb::CallDown, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if !this.draining && this.stopping.as_mut().poll(cx).is_ready() {
            // Tell the caller (call number 0: the stream itself), which sends no new calls
            // and closes its side once its calls here are done; calls already on their way
            // are refused.
            this.draining = true;
            this.refuse(
                0,
                failure("this node is shutting down", kind::SHUTTING_DOWN, true),
            );
        }
        // New calls and cancellations, a bounded number per turn.
        let mut read = 0;
        while let Some(inbound) = this.inbound.as_mut() {
            if read == HOST_READ_TURN {
                cx.waker().wake_by_ref();
                break;
            }
            match inbound.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(up))) => this.on_message(up),
                // The caller closed its side or the connection broke: nobody is left to
                // answer. Dropping the calls cancels them upstream.
                Poll::Ready(Some(Err(_)) | None) => this.inbound = None,
                Poll::Pending => break,
            }
            read += 1;
        }
        if this.inbound.is_none() {
            return Poll::Ready(None);
        }
        // Drive the calls; a finished one is forgotten.
        while let Poll::Ready(Some(done)) = this.calls.poll_next_unpin(cx) {
            if let Ok(Some(id)) = done {
                this.aborts.remove(&id);
            }
        }
        match this.rx.poll_recv(cx) {
            Poll::Ready(Some(down)) => Poll::Ready(Some(Ok(down))),
            _ => Poll::Pending,
        }
    }
}

type CallsStream = Pin<Box<dyn Stream<Item = Result<pb::CallDown, Status>> + Send>>;

#[tonic::async_trait]
impl CallService for CallServer {
    type CallsStream = CallsStream;

    async fn calls(
        &self,
        request: Request<Streaming<pb::CallUp>>,
    ) -> Result<Response<Self::CallsStream>, Status> {
        let runtime = self
            .runtime
            .get()
            .cloned()
            .ok_or_else(|| Status::unavailable("this node is still starting"))?;
        let start: StartCall =
            Box::new(move |req, tx| Box::pin(serve_call(runtime.clone(), req, tx)));
        Ok(Response::new(Box::pin(HostCalls::new(
            request.into_inner(),
            start,
            self.stopping.clone(),
        ))))
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

/// Run one forwarded call and send its frames to `tx`. Driven by [`HostCalls`]: when the
/// caller cancels it or goes away this future is dropped, and with it the upstream call,
/// which cancels it upstream.
async fn serve_call(runtime: Arc<Runtime>, req: pb::CallRequest, tx: FrameTx) {
    let id = req.instance_id.clone();
    let answer = |f: pb::CallFrame| tx.send(f);
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
    tx: &'a FrameTx,
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
        self.tx.send(pb::CallFrame { frame: Some(frame) }).await;
    }
}

/// Why a caller's stream to a host ended.
#[derive(Clone, Debug)]
enum StreamEnd {
    /// It could not be opened: no call on it was sent.
    NotOpened(Status),
    /// It broke, or the host ended it: the calls in flight may have reached the upstream.
    Broken(String),
    /// (Of one call, never of a stream:) the stream was closing, the call was not sent.
    NotSent,
}

/// The part of a caller's stream its reader task shares: the calls waiting for frames.
#[derive(Default)]
struct Pending {
    calls: HashMap<u64, mpsc::UnboundedSender<pb::CallFrame>>,
    /// Set once when the stream ends; no call is registered after.
    ended: Option<StreamEnd>,
}

/// A caller's stream of calls to one host. Its reader task hands each frame to the call it
/// belongs to, never waiting for one (a slow client holds up only its own call).
struct CallStream {
    up: mpsc::UnboundedSender<pb::CallUp>,
    pending: Arc<parking_lot::Mutex<Pending>>,
    next: AtomicU64,
}

/// One call in flight on a [`CallStream`]. Dropped before its answer (client gone, deadline),
/// it cancels the call on the host.
struct CallInFlight {
    stream: Arc<CallStream>,
    id: u64,
    frames: mpsc::UnboundedReceiver<pb::CallFrame>,
}

impl Drop for CallInFlight {
    fn drop(&mut self) {
        // Still registered = no answer came: tell the host to drop the call.
        if self.stream.pending.lock().calls.remove(&self.id).is_some() {
            let _ = self.stream.up.send(pb::CallUp {
                call: self.id,
                op: Some(pb::call_up::Op::Cancel(pb::Cancel {})),
            });
        }
    }
}

impl CallStream {
    /// Open a stream to the host at `addr` behind `client`; its reader task runs until the
    /// stream ends. The stream is in `streams` until it ends or its host stops serving calls.
    fn open(
        mut client: CallServiceClient<Channel>,
        raft: RaftHandle,
        addr: String,
        streams: &Arc<Streams>,
    ) -> Arc<Self> {
        let (up, up_rx) = mpsc::unbounded_channel();
        let pending = Arc::new(parking_lot::Mutex::new(Pending::default()));
        let p = pending.clone();
        let streams = Arc::downgrade(streams);
        // Take it out of use: new calls open a new stream. Its calls in flight go on; when the
        // last of them ends, the stream is dropped, which closes the request side.
        let retire = {
            let (p, addr) = (pending.clone(), addr.clone());
            move || {
                if let Some(streams) = streams.upgrade() {
                    let mut map = streams.lock();
                    if map.get(&addr).is_some_and(|s| Arc::ptr_eq(&s.pending, &p)) {
                        map.remove(&addr);
                    }
                }
            }
        };
        tokio::spawn(async move {
            let outbound = tokio_stream::wrappers::UnboundedReceiverStream::new(up_rx);
            let end = match client.calls(outbound).await {
                Err(status) => {
                    raft.peer_failed(&addr, &status);
                    StreamEnd::NotOpened(status)
                }
                Ok(response) => {
                    let mut down = response.into_inner();
                    loop {
                        match down.message().await {
                            // Call number 0 is the stream: its host stops serving calls.
                            Ok(Some(d)) if d.call == 0 => retire(),
                            Ok(Some(d)) => dispatch(&p, d),
                            Ok(None) => break StreamEnd::Broken("it ended the stream".to_owned()),
                            Err(status) => {
                                raft.peer_failed(&addr, &status);
                                break StreamEnd::Broken(status.message().to_owned());
                            }
                        }
                    }
                }
            };
            retire();
            let mut st = p.lock();
            st.ended = Some(end);
            // The calls still waiting see their channel close and read `ended`.
            st.calls.clear();
        });
        Arc::new(CallStream {
            up,
            pending,
            next: AtomicU64::new(1),
        })
    }

    /// Send `req` as a new call on this stream.
    fn start(self: &Arc<Self>, req: pb::CallRequest) -> Result<CallInFlight, StreamEnd> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, frames) = mpsc::unbounded_channel();
        {
            let mut st = self.pending.lock();
            if let Some(end) = &st.ended {
                return Err(end.clone());
            }
            st.calls.insert(id, tx);
        }
        let start = pb::CallUp {
            call: id,
            op: Some(pb::call_up::Op::Start(req)),
        };
        if self.up.send(start).is_err() {
            // The request side is gone (the stream is ending): nothing was sent.
            self.pending.lock().calls.remove(&id);
            return Err(StreamEnd::NotSent);
        }
        Ok(CallInFlight {
            stream: self.clone(),
            id,
            frames,
        })
    }
}

/// Hand a host's frame to its call; an answer or failure also ends the call's registration.
fn dispatch(pending: &parking_lot::Mutex<Pending>, down: pb::CallDown) {
    let Some(frame) = down.frame else {
        return;
    };
    let mut st = pending.lock();
    if is_last(&frame) {
        if let Some(tx) = st.calls.remove(&down.call) {
            drop(st);
            let _ = tx.send(frame);
        }
    } else if let Some(tx) = st.calls.get(&down.call) {
        let _ = tx.send(frame);
    }
}

/// The caller side: forwards calls to the node hosting an instance.
pub struct Forwarder {
    raft: RaftHandle,
    me: u64,
    /// The open stream of calls to each host, by its Raft address.
    streams: Arc<Streams>,
}

/// A caller's streams of calls in use, by host Raft address.
type Streams = parking_lot::Mutex<HashMap<String, Arc<CallStream>>>;

impl Forwarder {
    /// Forward over `raft`'s peer channels; `me` is this node's id.
    pub fn new(raft: RaftHandle, me: u64) -> Self {
        Forwarder {
            raft,
            me,
            streams: Default::default(),
        }
    }

    /// A `CallService` client to `node` at `addr`, over Raft's shared channel.
    fn client(&self, node: u64, addr: &str) -> Result<CallServiceClient<Channel>, ForwardError> {
        let channel = self
            .raft
            .peer_channel(addr)
            .map_err(|e| ForwardError::Unreachable {
                node,
                message: e.to_string(),
            })?;
        Ok(CallServiceClient::new(channel)
            .max_decoding_message_size(hangar_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(hangar_proto::MAX_MESSAGE_BYTES))
    }

    /// The Raft address of `node`.
    fn addr(&self, node: u64) -> Result<String, ForwardError> {
        self.raft
            .read(|st| st.nodes.get(&node).map(|n| n.raft_addr.clone()))
            .ok_or_else(|| ForwardError::Unreachable {
                node,
                message: "it has no registered address".to_owned(),
            })
    }

    /// The stream of calls to `node`, opened if there is none in use.
    fn stream(&self, node: u64) -> Result<Arc<CallStream>, ForwardError> {
        let addr = self.addr(node)?;
        let mut streams = self.streams.lock();
        if let Some(s) = streams.get(&addr) {
            return Ok(s.clone());
        }
        let client = self.client(node, &addr)?;
        let s = CallStream::open(client, self.raft.clone(), addr.clone(), &self.streams);
        streams.insert(addr, s.clone());
        Ok(s)
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
        let stream = self.stream(node)?;
        let deadline = tokio::time::Instant::now() + timeout + DEADLINE_SLACK;
        let timed_out = || {
            ForwardError::Upstream(UpstreamError::Timeout {
                server: instance.to_owned(),
                secs: timeout.as_secs_f64(),
            })
        };
        let ended = |end: StreamEnd| match end {
            StreamEnd::NotOpened(status) => status_error(instance, node, &status),
            StreamEnd::NotSent => ForwardError::Unreachable {
                node,
                message: "its stream of calls was closing".to_owned(),
            },
            StreamEnd::Broken(message) => ForwardError::Upstream(UpstreamError::Closed {
                server: instance.to_owned(),
                message: format!("the forward to node {node} broke: {message}"),
                before_send: false,
            }),
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
        let mut call = stream.start(req).map_err(ended)?;
        loop {
            let frame = match tokio::time::timeout_at(deadline, call.frames.recv()).await {
                Err(_) => return Err(timed_out()),
                Ok(None) => {
                    let end = stream.pending.lock().ended.clone();
                    return Err(ended(end.unwrap_or_else(|| {
                        StreamEnd::Broken("the call was dropped".to_owned())
                    })));
                }
                Ok(Some(f)) => f,
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
        kind::SHUTTING_DOWN => ForwardError::Unreachable {
            node,
            message: f.message,
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

/// The gRPC status of a stream of calls that could not be opened. The requests are known
/// not to have left only when the connection could not be made.
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
        let addr = self.addr(node)?;
        let mut client = self.client(node, &addr)?;
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
    use tokio::sync::oneshot;

    fn start(call: u64, method: &str) -> pb::CallUp {
        pb::CallUp {
            call,
            op: Some(pb::call_up::Op::Start(pb::CallRequest {
                method: method.to_owned(),
                ..Default::default()
            })),
        }
    }

    fn cancel(call: u64) -> pb::CallUp {
        pb::CallUp {
            call,
            op: Some(pb::call_up::Op::Cancel(pb::Cancel {})),
        }
    }

    fn kind_of(d: &pb::CallDown) -> (u64, String) {
        let k = match &d.frame.as_ref().unwrap().frame {
            Some(Frame::Notification(b)) => format!("n:{}", String::from_utf8_lossy(b)),
            Some(Frame::Result(b)) => format!("r:{}", String::from_utf8_lossy(b)),
            Some(Frame::Failure(f)) => format!("f:{}:{}", f.kind, f.before_send),
            _ => "?".to_owned(),
        };
        (d.call, k)
    }

    type Inbound = mpsc::UnboundedSender<Result<pb::CallUp, Status>>;

    /// A host stream whose calls are `run(method)`; `guards` receives a oneshot per call
    /// whose sender lives exactly as long as the call.
    fn host<F>(
        run: F,
        stopping: CancellationToken,
    ) -> (
        Inbound,
        HostCalls<tokio_stream::wrappers::UnboundedReceiverStream<Result<pb::CallUp, Status>>>,
    )
    where
        F: Fn(String, FrameTx) -> CallFuture + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        let start: StartCall = Box::new(move |req, out| run(req.method, out));
        let inbound = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
        (tx, HostCalls::new(inbound, start, stopping))
    }

    async fn next(
        h: &mut (impl Stream<Item = Result<pb::CallDown, Status>> + Unpin),
    ) -> (u64, String) {
        let d = tokio::time::timeout(Duration::from_secs(10), h.next())
            .await
            .expect("a frame in time")
            .expect("the stream goes on")
            .expect("no error");
        kind_of(&d)
    }

    /// Calls on one stream run side by side; each one's frames come tagged with its number,
    /// in order, answer last. The stream ends when the caller closes its side.
    #[tokio::test]
    async fn host_streams_tag_each_calls_frames() {
        let (inbound, mut h) = host(
            |method, out| {
                Box::pin(async move {
                    // The second call answers first: frames of calls interleave.
                    if method == "slow" {
                        tokio::task::yield_now().await;
                        tokio::task::yield_now().await;
                    }
                    out.send(pb::CallFrame {
                        frame: Some(Frame::Notification(method.clone().into_bytes())),
                    })
                    .await;
                    out.send(pb::CallFrame {
                        frame: Some(Frame::Result(method.into_bytes())),
                    })
                    .await;
                })
            },
            CancellationToken::new(),
        );
        inbound.send(Ok(start(1, "slow"))).unwrap();
        inbound.send(Ok(start(2, "fast"))).unwrap();
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(next(&mut h).await);
        }
        let of = |c: u64| -> Vec<String> {
            got.iter()
                .filter(|(n, _)| *n == c)
                .map(|(_, k)| k.clone())
                .collect()
        };
        assert_eq!(of(1), ["n:slow", "r:slow"]);
        assert_eq!(of(2), ["n:fast", "r:fast"]);
        assert!(
            h.calls.is_empty() && h.aborts.is_empty(),
            "finished calls are forgotten"
        );
        drop(inbound);
        assert!(
            h.next().await.is_none(),
            "the stream ends with the caller's side"
        );
    }

    /// A cancel drops its call (which cancels it upstream) and only that one; a number in use
    /// is refused without touching its call; closing the caller's side drops the rest.
    #[tokio::test]
    async fn cancels_and_a_closed_caller_drop_the_calls() {
        let (guards_tx, mut guards) = mpsc::unbounded_channel::<oneshot::Receiver<()>>();
        let (inbound, mut h) = host(
            move |_, out| {
                let (alive, dropped) = oneshot::channel::<()>();
                guards_tx.send(dropped).unwrap();
                Box::pin(async move {
                    let _alive = alive;
                    out.send(pb::CallFrame {
                        frame: Some(Frame::Notification(b"started".to_vec())),
                    })
                    .await;
                    std::future::pending::<()>().await;
                })
            },
            CancellationToken::new(),
        );
        inbound.send(Ok(start(1, "a"))).unwrap();
        inbound.send(Ok(start(2, "b"))).unwrap();
        assert_eq!(next(&mut h).await.1, "n:started");
        assert_eq!(next(&mut h).await.1, "n:started");
        let mut one = guards.recv().await.unwrap();
        let mut two = guards.recv().await.unwrap();
        inbound.send(Ok(start(2, "again"))).unwrap();
        assert_eq!(next(&mut h).await, (2, "f:bad_request:true".to_owned()));
        inbound.send(Ok(cancel(1))).unwrap();
        // One turn of the stream reads the cancel (it yields nothing more).
        assert!(futures::poll!(h.next()).is_pending());
        assert!(
            one.try_recv()
                .is_err_and(|e| e == oneshot::error::TryRecvError::Closed)
        );
        assert_eq!(
            two.try_recv(),
            Err(oneshot::error::TryRecvError::Empty),
            "call 2 runs on"
        );
        drop(inbound);
        assert!(h.next().await.is_none());
        drop(h);
        assert_eq!(two.try_recv(), Err(oneshot::error::TryRecvError::Closed));
    }

    /// A host that stops serving calls says so on call number 0, refuses new calls (nothing
    /// sent) and lets the running ones finish.
    #[tokio::test]
    async fn a_stopping_host_says_so_and_refuses_new_calls() {
        let stopping = CancellationToken::new();
        let (release_tx, release) = tokio::sync::watch::channel(false);
        let (inbound, mut h) = host(
            move |_, out| {
                let mut release = release.clone();
                Box::pin(async move {
                    let _ = release.wait_for(|r| *r).await;
                    out.send(pb::CallFrame {
                        frame: Some(Frame::Result(b"done".to_vec())),
                    })
                    .await;
                })
            },
            stopping.clone(),
        );
        inbound.send(Ok(start(1, "a"))).unwrap();
        // One turn of the stream starts call 1 (which waits).
        assert!(futures::poll!(h.next()).is_pending());
        stopping.cancel();
        assert_eq!(next(&mut h).await, (0, "f:shutting_down:true".to_owned()));
        inbound.send(Ok(start(2, "b"))).unwrap();
        assert_eq!(next(&mut h).await, (2, "f:shutting_down:true".to_owned()));
        release_tx.send(true).unwrap();
        assert_eq!(next(&mut h).await, (1, "r:done".to_owned()));
        drop(inbound);
        assert!(h.next().await.is_none());
    }

    fn caller() -> (Arc<CallStream>, mpsc::UnboundedReceiver<pb::CallUp>) {
        let (up, up_rx) = mpsc::unbounded_channel();
        let s = Arc::new(CallStream {
            up,
            pending: Default::default(),
            next: AtomicU64::new(1),
        });
        (s, up_rx)
    }

    fn down(call: u64, f: Frame) -> pb::CallDown {
        pb::CallDown {
            call,
            frame: Some(pb::CallFrame { frame: Some(f) }),
        }
    }

    /// The caller's side: each call gets its own frames; an answered call sends nothing more,
    /// one dropped before its answer cancels it; after the stream ended no call starts.
    #[tokio::test]
    async fn callers_get_their_frames_and_cancel_what_they_drop() {
        let (s, mut up) = caller();
        let mut a = s.start(pb::CallRequest::default()).unwrap();
        let b = s.start(pb::CallRequest::default()).unwrap();
        let ids: Vec<u64> = [up.recv().await.unwrap(), up.recv().await.unwrap()]
            .iter()
            .map(|u| {
                assert!(matches!(u.op, Some(pb::call_up::Op::Start(_))));
                u.call
            })
            .collect();
        assert_eq!(ids, [a.id, b.id]);
        assert_ne!(a.id, b.id);
        dispatch(&s.pending, down(a.id, Frame::Notification(b"p".to_vec())));
        dispatch(&s.pending, down(a.id, Frame::Result(b"1".to_vec())));
        dispatch(
            &s.pending,
            down(a.id, Frame::Notification(b"late".to_vec())),
        );
        let got = |f: Option<pb::CallFrame>| kind_of(&pb::CallDown { call: 0, frame: f }).1;
        assert_eq!(got(a.frames.recv().await), "n:p");
        assert_eq!(got(a.frames.recv().await), "r:1");
        assert!(a.frames.recv().await.is_none(), "nothing after the answer");
        drop(a);
        let b_id = b.id;
        drop(b);
        let c = up.recv().await.unwrap();
        assert_eq!(c.call, b_id);
        assert!(matches!(c.op, Some(pb::call_up::Op::Cancel(_))));
        assert!(up.try_recv().is_err(), "the answered call sent no cancel");
        s.pending.lock().ended = Some(StreamEnd::Broken("gone".to_owned()));
        assert!(matches!(
            s.start(pb::CallRequest::default()),
            Err(StreamEnd::Broken(_))
        ));
    }
}
