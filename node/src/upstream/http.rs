//! Remote Streamable HTTP transport: POST each message, read a JSON or SSE answer, keep the
//! upstream session (`Mcp-Session-Id`) and re-initialize it transparently when the server
//! forgets it (404). A GET stream, when offered, carries server notifications.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use parking_lot::Mutex;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::value::RawValue;
use tokio::sync::{Notify, broadcast};

use super::sse::SseParser;
use super::{CallEvent, CallSink, HttpSpec, Outcome, UpstreamError};
use crate::jsonrpc::{Id, Kind, Message, RawObject, raw_from_object};

pub(super) struct HttpConn {
    server: String,
    client: reqwest::Client,
    endpoint: String,
    headers: HeaderMap,
    session: Mutex<Option<String>>,
    protocol: Mutex<Option<String>>,
    next: AtomicU64,
    alive: AtomicBool,
    closed: Notify,
    notes: broadcast::Sender<Arc<Message>>,
    init_params: Mutex<Option<Box<RawValue>>>,
    reinit: tokio::sync::Mutex<u64>,
    generation: AtomicU64,
}

enum Posted {
    Answer(Outcome),
    Accepted,
    SessionGone,
}

impl HttpConn {
    pub(super) fn new(
        server: &str,
        spec: &HttpSpec,
        notes: broadcast::Sender<Arc<Message>>,
    ) -> Result<Arc<HttpConn>, UpstreamError> {
        let conn_err = |m: String| UpstreamError::Connect {
            server: server.to_owned(),
            message: m,
        };
        let mut headers = HeaderMap::new();
        for (k, v) in &spec.headers {
            let name = HeaderName::from_bytes(k.as_bytes()).map_err(|_| conn_err(format!("invalid header name '{k}'")))?;
            let mut value =
                HeaderValue::from_str(v).map_err(|_| conn_err(format!("invalid value for header '{k}'")))?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        let mut b = reqwest::Client::builder()
            .connect_timeout(spec.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true);
        if !spec.verify_tls {
            tracing::warn!(mcp_server = server, "tls_verification_disabled");
            b = b.tls_danger_accept_invalid_certs(true);
        }
        if let Some(ca) = &spec.ca_cert_path {
            let pem = std::fs::read(ca).map_err(|e| conn_err(format!("cannot read CA file {}: {e}", ca.display())))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| conn_err(format!("invalid CA file {}: {e}", ca.display())))?;
            b = b.add_root_certificate(cert);
        }
        let client = b.build().map_err(|e| conn_err(format!("cannot build HTTP client: {e}")))?;
        Ok(Arc::new(HttpConn {
            server: server.to_owned(),
            client,
            endpoint: spec.endpoint.clone(),
            headers,
            session: Mutex::new(None),
            protocol: Mutex::new(None),
            next: AtomicU64::new(1),
            alive: AtomicBool::new(true),
            closed: Notify::new(),
            notes,
            init_params: Mutex::new(None),
            reinit: tokio::sync::Mutex::new(0),
            generation: AtomicU64::new(0),
        }))
    }

    pub(super) fn next_id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    pub(super) fn set_protocol_version(&self, v: &str) {
        *self.protocol.lock() = Some(v.to_owned());
    }

    pub(super) fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    pub(super) async fn closed(&self) {
        loop {
            let n = self.closed.notified();
            if !self.is_alive() {
                return;
            }
            n.await;
        }
    }

    fn request_builder(&self, body: String) -> reqwest::RequestBuilder {
        let mut rb = self
            .client
            .post(&self.endpoint)
            .headers(self.headers.clone())
            .header("Content-Type", "application/json")
            .header("Accept", "application/json, text/event-stream")
            .body(body);
        if let Some(s) = self.session.lock().clone() {
            rb = rb.header("Mcp-Session-Id", s);
        }
        if let Some(v) = self.protocol.lock().clone() {
            rb = rb.header("MCP-Protocol-Version", v);
        }
        rb
    }

    fn map_send_error(&self, e: reqwest::Error) -> UpstreamError {
        if e.is_connect() {
            UpstreamError::Connect {
                server: self.server.clone(),
                message: without_url(&e),
            }
        } else if e.is_timeout() {
            UpstreamError::Timeout {
                server: self.server.clone(),
                secs: 0.0,
            }
        } else {
            UpstreamError::Closed {
                server: self.server.clone(),
                message: without_url(&e),
                before_send: false,
            }
        }
    }

    /// POST one message and read the answer for `id` (None for notifications).
    async fn post(
        &self,
        body: String,
        id: Option<u64>,
        sink: Option<&CallSink>,
        progress: Option<&(String, Box<RawValue>)>,
    ) -> Result<Posted, UpstreamError> {
        let had_session = self.session.lock().is_some();
        let resp = self.request_builder(body).send().await.map_err(|e| self.map_send_error(e))?;
        let status = resp.status();
        if status.as_u16() == 404 && had_session {
            return Ok(Posted::SessionGone);
        }
        if let Some(s) = resp.headers().get("mcp-session-id").and_then(|v| v.to_str().ok()) {
            *self.session.lock() = Some(s.to_owned());
        }
        if status.as_u16() == 202 || (id.is_none() && status.is_success()) {
            return Ok(Posted::Accepted);
        }
        let ctype = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        if !status.is_success() && !ctype.starts_with("application/json") {
            let text = resp.text().await.unwrap_or_default();
            return Err(UpstreamError::Protocol {
                server: self.server.clone(),
                message: format!("HTTP {status}: {}", excerpt(&text)),
            });
        }
        if ctype.starts_with("text/event-stream") {
            let mut parser = SseParser::new();
            let mut stream = resp.bytes_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| UpstreamError::Closed {
                    server: self.server.clone(),
                    message: format!("the SSE stream broke: {}", without_url(&e)),
                    before_send: false,
                })?;
                for ev in parser.feed(&chunk) {
                    if ev.data.trim().is_empty() {
                        continue;
                    }
                    let Ok(msg) = serde_json::from_str::<Message>(&ev.data) else { continue };
                    if let Some(outcome) = self.on_stream_message(msg, id, sink, progress).await {
                        return Ok(Posted::Answer(outcome));
                    }
                }
            }
            return Err(UpstreamError::Closed {
                server: self.server.clone(),
                message: "the SSE stream ended without an answer".into(),
                before_send: false,
            });
        }
        let bytes = resp.bytes().await.map_err(|e| self.map_send_error(e))?;
        let msg: Message = serde_json::from_slice(&bytes).map_err(|e| UpstreamError::Protocol {
            server: self.server.clone(),
            message: format!("HTTP {status} with a body that is not JSON-RPC: {e}"),
        })?;
        match (msg.result, msg.error) {
            (Some(r), _) => Ok(Posted::Answer(Outcome::Result(r))),
            (None, Some(e)) => Ok(Posted::Answer(Outcome::Error(e))),
            _ => Err(UpstreamError::Protocol {
                server: self.server.clone(),
                message: format!("HTTP {status} without result or error"),
            }),
        }
    }

    async fn on_stream_message(
        &self,
        mut msg: Message,
        id: Option<u64>,
        sink: Option<&CallSink>,
        progress: Option<&(String, Box<RawValue>)>,
    ) -> Option<Outcome> {
        match msg.kind() {
            Kind::Response => {
                if matches!((&msg.id, id), (Some(Id::Num(n)), Some(want)) if *n as u64 == want) {
                    return Some(match (msg.result, msg.error) {
                        (Some(r), _) => Outcome::Result(r),
                        (None, Some(e)) => Outcome::Error(e),
                        _ => return None,
                    });
                }
                None
            }
            Kind::Notification => {
                let method = msg.method.clone().unwrap_or_default();
                if method == "notifications/progress" {
                    if let (Some(sink), Some((tok, orig))) = (sink, progress) {
                        if let Ok(mut p) = serde_json::from_str::<RawObject>(msg.params.as_deref().map_or("{}", |r| r.get())) {
                            let matches = p
                                .get("progressToken")
                                .is_some_and(|t| t.get().trim_matches('"') == tok);
                            if matches {
                                p.insert("progressToken".into(), orig.clone());
                                msg.params = Some(raw_from_object(&p));
                                let _ = sink.send(CallEvent::Notification(msg)).await;
                            }
                        }
                    }
                    return None;
                }
                match sink {
                    Some(s) => {
                        let _ = s.send(CallEvent::Notification(msg)).await;
                    }
                    None => {
                        let _ = self.notes.send(Arc::new(msg));
                    }
                }
                None
            }
            Kind::Request => {
                match sink {
                    Some(s) => {
                        let _ = s.send(CallEvent::Request(msg)).await;
                    }
                    None => {
                        if let Some(rid) = msg.id {
                            let err = Message::error(
                                Some(rid),
                                crate::jsonrpc::RpcError::new(
                                    crate::jsonrpc::INTERNAL_ERROR,
                                    "the client of this call cannot receive requests",
                                ),
                            );
                            self.post_notification(err.to_json()).await;
                        }
                    }
                }
                None
            }
            Kind::Invalid => None,
        }
    }

    /// The initialize request (remembered for transparent re-initialization).
    pub(super) async fn initialize(&self, params: Box<RawValue>) -> Result<Outcome, UpstreamError> {
        *self.init_params.lock() = Some(params.clone());
        *self.session.lock() = None;
        let id = self.next_id();
        let body = Message::request(Id::Num(id as i64), "initialize", Some(params)).to_json();
        match self.post(body, Some(id), None, None).await? {
            Posted::Answer(o) => Ok(o),
            Posted::Accepted | Posted::SessionGone => Err(UpstreamError::Handshake {
                server: self.server.clone(),
                message: "initialize got no answer".into(),
            }),
        }
    }

    /// Re-run the handshake once for all concurrent callers that saw the 404.
    async fn reinitialize(&self, seen_generation: u64) -> Result<(), UpstreamError> {
        let mut g = self.reinit.lock().await;
        if self.generation.load(Ordering::SeqCst) != seen_generation {
            return Ok(());
        }
        let params = self.init_params.lock().clone().ok_or_else(|| UpstreamError::Handshake {
            server: self.server.clone(),
            message: "no initialize parameters to replay".into(),
        })?;
        tracing::info!(mcp_server = %self.server, "upstream_session_expired_reinitializing");
        match self.initialize(params).await? {
            Outcome::Result(_) => {}
            Outcome::Error(e) => {
                return Err(UpstreamError::Handshake {
                    server: self.server.clone(),
                    message: format!("re-initialize refused: {}", e.message),
                });
            }
        }
        let note = Message::notification("notifications/initialized", None).to_json();
        self.post(note, None, None, None).await?;
        self.generation.fetch_add(1, Ordering::SeqCst);
        *g += 1;
        Ok(())
    }

    pub(super) async fn call(
        &self,
        id: u64,
        msg: Message,
        sink: Option<CallSink>,
        progress: Option<(String, Box<RawValue>)>,
    ) -> Result<Outcome, UpstreamError> {
        if !self.is_alive() {
            return Err(UpstreamError::Closed {
                server: self.server.clone(),
                message: "the connection was shut down".into(),
                before_send: true,
            });
        }
        let body = msg.to_json();
        let generation = self.generation.load(Ordering::SeqCst);
        match self.post(body.clone(), Some(id), sink.as_ref(), progress.as_ref()).await? {
            Posted::Answer(o) => Ok(o),
            Posted::Accepted => Err(UpstreamError::Protocol {
                server: self.server.clone(),
                message: "the request was accepted without an answer".into(),
            }),
            Posted::SessionGone => {
                self.reinitialize(generation).await?;
                match self.post(body, Some(id), sink.as_ref(), progress.as_ref()).await? {
                    Posted::Answer(o) => Ok(o),
                    _ => Err(UpstreamError::Protocol {
                        server: self.server.clone(),
                        message: "no answer after re-initializing the session".into(),
                    }),
                }
            }
        }
    }

    /// POST a notification or a response; failures are logged, not returned.
    pub(super) async fn post_notification(&self, body: String) {
        match self.request_builder(body).send().await {
            Ok(resp) => {
                let status = resp.status();
                if !status.is_success() {
                    tracing::debug!(mcp_server = %self.server, %status, "upstream_notification_refused");
                }
            }
            Err(e) => tracing::debug!(mcp_server = %self.server, error = %without_url(&e), "upstream_notification_failed"),
        }
    }

    /// Keep a GET stream open for server notifications while alive (405 = not offered).
    pub(super) fn start_listening(self: Arc<Self>) {
        let weak = Arc::downgrade(&self);
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(500);
            loop {
                let Some(me) = weak.upgrade() else { return };
                if !me.is_alive() {
                    return;
                }
                let mut rb = me
                    .client
                    .get(&me.endpoint)
                    .headers(me.headers.clone())
                    .header("Accept", "text/event-stream");
                if let Some(s) = me.session.lock().clone() {
                    rb = rb.header("Mcp-Session-Id", s);
                }
                if let Some(v) = me.protocol.lock().clone() {
                    rb = rb.header("MCP-Protocol-Version", v);
                }
                let resp = match rb.send().await {
                    Ok(r) => r,
                    Err(_) => {
                        drop(me);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                        continue;
                    }
                };
                let ok = resp.status().is_success()
                    && resp
                        .headers()
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|c| c.starts_with("text/event-stream"));
                if !ok {
                    // 405 or anything else: the server offers no notification stream.
                    return;
                }
                backoff = Duration::from_millis(500);
                let notes = me.notes.clone();
                drop(me);
                let mut parser = SseParser::new();
                let mut stream = resp.bytes_stream();
                while let Some(Ok(chunk)) = stream.next().await {
                    for ev in parser.feed(&chunk) {
                        if let Ok(m) = serde_json::from_str::<Message>(&ev.data) {
                            let _ = notes.send(Arc::new(m));
                        }
                    }
                    if weak.upgrade().is_none_or(|m| !m.is_alive()) {
                        return;
                    }
                }
                tokio::time::sleep(backoff).await;
            }
        });
    }

    pub(super) async fn shutdown(&self) {
        if !self.alive.swap(false, Ordering::SeqCst) {
            return;
        }
        self.closed.notify_waiters();
        let session = self.session.lock().take();
        if let Some(s) = session {
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                self.client
                    .delete(&self.endpoint)
                    .headers(self.headers.clone())
                    .header("Mcp-Session-Id", s)
                    .send(),
            )
            .await;
        }
    }
}

fn without_url(e: &reqwest::Error) -> String {
    // reqwest includes the URL (which may carry credentials in a query) in Display.
    let mut s = e.to_string();
    if let Some(url) = e.url() {
        s = s.replace(url.as_str(), "<endpoint>");
    }
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

fn excerpt(text: &str) -> String {
    let t = text.trim();
    if t.len() <= 200 {
        t.to_owned()
    } else {
        let mut cut = 200;
        while !t.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}…", &t[..cut])
    }
}

