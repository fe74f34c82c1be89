//! Remote Streamable HTTP transport: POST each message, read a JSON or SSE answer, keep the
//! upstream session (`Mcp-Session-Id`) and re-initialize it transparently when the server
//! forgets it (404). A GET stream, when offered, carries server notifications.
//!
//! Attribution is exact here: whatever arrives on a POST's SSE stream belongs to that call.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use futures::StreamExt;
use parking_lot::Mutex;
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde_json::value::RawValue;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::sse::SseParser;
use super::stdio::{progress_token_key, restore_token};
use super::{CallEvent, CallSink, HttpSpec, InitInfo, Outcome, UpstreamError};
use crate::jsonrpc::{INTERNAL_ERROR, Id, Kind, Message, RpcError};

const SESSION_HEADER: &str = "mcp-session-id";
const VERSION_HEADER: &str = "mcp-protocol-version";
/// Bytes of an error body quoted in errors.
const EXCERPT: usize = 200;

/// Servers for which "TLS verification is off" was already logged.
static TLS_WARNED: LazyLock<Mutex<HashSet<String>>> = LazyLock::new(|| Mutex::new(HashSet::new()));

#[derive(Debug, Clone, Default)]
struct Session {
    id: Option<String>,
    protocol: Option<String>,
    /// Bumped by every successful (re-)initialization.
    generation: u64,
}

pub(super) struct HttpConn {
    server: String,
    client: reqwest::Client,
    endpoint: reqwest::Url,
    headers: HeaderMap,
    read_timeout: Duration,
    session: Mutex<Session>,
    next_id: AtomicU64,
    closed: CancellationToken,
    /// Stops the GET listener (cancelled with `closed`, or when the `Upstream` is dropped).
    listen_stop: CancellationToken,
    stopping: AtomicBool,
    notes: broadcast::Sender<Arc<Message>>,
    init_params: Mutex<Option<Box<RawValue>>>,
    reinit: tokio::sync::Mutex<()>,
}

enum Posted {
    Answer(Outcome),
    Accepted,
    /// 404 on a request that carried the session of this generation.
    SessionGone(u64),
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
        let endpoint = reqwest::Url::parse(&spec.endpoint).map_err(|e| {
            conn_err(format!(
                "the endpoint is not a valid URL ({e}); check `endpoint`"
            ))
        })?;
        if !matches!(endpoint.scheme(), "http" | "https") {
            return Err(conn_err(format!(
                "the endpoint scheme '{}' is not supported; use http:// or https://",
                endpoint.scheme()
            )));
        }
        let mut headers = HeaderMap::new();
        for (k, v) in &spec.headers {
            let name = HeaderName::from_bytes(k.as_bytes()).map_err(|_| {
                conn_err(format!(
                    "invalid header name '{k}'; fix the configured headers"
                ))
            })?;
            let mut value = HeaderValue::from_str(v).map_err(|_| {
                conn_err(format!(
                    "the value of header '{k}' has characters HTTP does not allow"
                ))
            })?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        let mut b = reqwest::Client::builder()
            .connect_timeout(spec.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true);
        if !spec.verify_tls {
            if TLS_WARNED.lock().insert(server.to_owned()) {
                tracing::warn!(
                    mcp_server = server,
                    "tls_verification_disabled (certificates are not checked)"
                );
            }
            b = b.tls_danger_accept_invalid_certs(true);
        }
        if let Some(ca) = &spec.ca_cert_path {
            let pem = std::fs::read(ca)
                .map_err(|e| conn_err(format!("cannot read CA file {}: {e}", ca.display())))?;
            let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| {
                conn_err(format!(
                    "the CA file {} is not a PEM certificate: {e}",
                    ca.display()
                ))
            })?;
            b = b.add_root_certificate(cert);
        }
        let client = b
            .build()
            .map_err(|e| conn_err(format!("cannot build the HTTP client: {}", without_url(&e))))?;
        let closed = CancellationToken::new();
        Ok(Arc::new(HttpConn {
            server: server.to_owned(),
            client,
            endpoint,
            headers,
            read_timeout: spec.read_timeout,
            session: Mutex::new(Session::default()),
            next_id: AtomicU64::new(1),
            closed: closed.clone(),
            listen_stop: closed.child_token(),
            stopping: AtomicBool::new(false),
            notes,
            init_params: Mutex::new(None),
            reinit: tokio::sync::Mutex::new(()),
        }))
    }

    pub(super) fn is_alive(&self) -> bool {
        !self.closed.is_cancelled()
    }

    pub(super) async fn closed(&self) {
        self.closed.cancelled().await;
    }

    /// A POST with our headers; returns it with the session generation it carries and whether
    /// it carries a session id.
    fn post_builder(
        &self,
        body: String,
        use_session: bool,
    ) -> (reqwest::RequestBuilder, u64, bool) {
        let s = self.session.lock().clone();
        let mut rb = self
            .client
            .post(self.endpoint.clone())
            .headers(self.headers.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(
                reqwest::header::ACCEPT,
                "application/json, text/event-stream",
            )
            .body(body);
        let mut had_session = false;
        if use_session {
            if let Some(id) = &s.id {
                rb = rb.header(SESSION_HEADER, id);
                had_session = true;
            }
            if let Some(v) = &s.protocol {
                rb = rb.header(VERSION_HEADER, v);
            }
        }
        (rb, s.generation, had_session)
    }

    fn send_error(&self, e: &reqwest::Error) -> UpstreamError {
        if e.is_connect() {
            UpstreamError::Connect {
                server: self.server.clone(),
                message: without_url(e),
            }
        } else if e.is_timeout() {
            UpstreamError::Timeout {
                server: self.server.clone(),
                secs: self.read_timeout.as_secs_f64(),
            }
        } else {
            UpstreamError::Closed {
                server: self.server.clone(),
                message: without_url(e),
                before_send: false,
            }
        }
    }

    /// POST one message and read the answer for `want` (None for notifications/responses).
    async fn post(
        &self,
        body: String,
        want: Option<u64>,
        sink: Option<&CallSink>,
        progress: Option<&(String, Box<RawValue>)>,
        use_session: bool,
    ) -> Result<Posted, UpstreamError> {
        let (rb, generation, had_session) = self.post_builder(body, use_session);
        let resp = rb.send().await.map_err(|e| self.send_error(&e))?;
        let status = resp.status();
        if status == StatusCode::NOT_FOUND && had_session {
            return Ok(Posted::SessionGone(generation));
        }
        if let Some(s) = resp
            .headers()
            .get(SESSION_HEADER)
            .and_then(|v| v.to_str().ok())
        {
            let mut sess = self.session.lock();
            // A late answer from an older session must not overwrite a newer one.
            if sess.id.as_deref() != Some(s) && (!use_session || sess.generation == generation) {
                sess.id = Some(s.to_owned());
            }
        }
        if !status.is_success() {
            let text = body_excerpt(resp).await;
            return Err(UpstreamError::Protocol {
                server: self.server.clone(),
                message: format!("HTTP {status}: {text}"),
            });
        }
        let Some(want) = want else {
            return Ok(Posted::Accepted);
        };
        if status == StatusCode::ACCEPTED {
            return Ok(Posted::Accepted);
        }
        let ctype = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        if ctype.starts_with("text/event-stream") {
            return self.read_stream(resp, want, sink, progress).await;
        }
        if !ctype.starts_with("application/json") {
            return Err(UpstreamError::Protocol {
                server: self.server.clone(),
                message: format!(
                    "HTTP {status} with content type '{ctype}' (expected application/json or text/event-stream)"
                ),
            });
        }
        let bytes = resp.bytes().await.map_err(|e| self.send_error(&e))?;
        let msg: Message = serde_json::from_slice(&bytes).map_err(|e| UpstreamError::Protocol {
            server: self.server.clone(),
            message: format!(
                "HTTP {status} with a body that is not a JSON-RPC message ({e}): {}",
                excerpt(&String::from_utf8_lossy(&bytes))
            ),
        })?;
        match self.answer_for(msg, want) {
            Some(a) => Ok(Posted::Answer(a?)),
            None => Err(UpstreamError::Protocol {
                server: self.server.clone(),
                message: format!(
                    "HTTP {status}: the JSON body is not the answer to request {want}"
                ),
            }),
        }
    }

    /// `Some` when `msg` is the response to request `want`.
    fn answer_for(&self, msg: Message, want: u64) -> Option<Result<Outcome, UpstreamError>> {
        if msg.method.is_some() {
            return None;
        }
        let id = match msg.id.as_ref()? {
            Id::Num(n) => u64::try_from(*n).ok()?,
            Id::Str(s) => s.parse().ok()?,
        };
        if id != want {
            return None;
        }
        Some(match (msg.result, msg.error) {
            (Some(r), None) => Ok(Outcome::Result(r)),
            (None, Some(e)) => Ok(Outcome::Error(e)),
            _ => Err(UpstreamError::Protocol {
                server: self.server.clone(),
                message: "the answer has neither (or both) `result` and `error`".into(),
            }),
        })
    }

    async fn read_stream(
        &self,
        resp: reqwest::Response,
        want: u64,
        sink: Option<&CallSink>,
        progress: Option<&(String, Box<RawValue>)>,
    ) -> Result<Posted, UpstreamError> {
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
                let Ok(msg) = serde_json::from_str::<Message>(&ev.data) else {
                    tracing::debug!(mcp_server = %self.server, "upstream_sse_event_not_json_rpc (ignored)");
                    continue;
                };
                if msg.method.is_none() {
                    if let Some(a) = self.answer_for(msg, want) {
                        return Ok(Posted::Answer(a?));
                    }
                    continue;
                }
                self.on_stream_message(msg, sink, progress).await;
            }
        }
        Err(UpstreamError::Closed {
            server: self.server.clone(),
            message: "the SSE stream ended before the answer".into(),
            before_send: false,
        })
    }

    /// A notification or request that arrived on a call's own stream.
    async fn on_stream_message(
        &self,
        msg: Message,
        sink: Option<&CallSink>,
        progress: Option<&(String, Box<RawValue>)>,
    ) {
        match msg.kind() {
            Kind::Notification => {
                if msg.method.as_deref() == Some("notifications/progress") {
                    let (Some(sink), Some((tok, orig))) = (sink, progress) else {
                        return;
                    };
                    if progress_token_key(&msg).as_deref() == Some(tok.as_str())
                        && let Some(msg) = restore_token(msg, orig.clone())
                    {
                        let _ = sink.send(CallEvent::Notification(msg)).await;
                    }
                    return;
                }
                match sink {
                    Some(s) => {
                        let _ = s.send(CallEvent::Notification(msg)).await;
                    }
                    None => {
                        let _ = self.notes.send(Arc::new(msg));
                    }
                }
            }
            Kind::Request => {
                let Some(id) = msg.id.clone() else { return };
                if msg.method.as_deref() == Some("ping") {
                    let pong = Message::response(id, crate::jsonrpc::empty_object());
                    let _ = self.send_oneway(pong.to_json()).await;
                    return;
                }
                let delivered = match sink {
                    Some(s) => s.send(CallEvent::Request(msg)).await.is_ok(),
                    None => false,
                };
                if !delivered {
                    let err = RpcError::new(
                        INTERNAL_ERROR,
                        "Hangar cannot attribute this request to a caller (the caller does not accept server requests)",
                    );
                    let _ = self
                        .send_oneway(Message::error(Some(id), err).to_json())
                        .await;
                }
            }
            _ => {}
        }
    }

    /// Initialize (or re-initialize) the session: `initialize`, check, `notifications/initialized`.
    pub(super) async fn initialize(
        &self,
        params: Box<RawValue>,
    ) -> Result<InitInfo, UpstreamError> {
        *self.init_params.lock() = Some(params.clone());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body = Message::request(Id::Num(id as i64), "initialize", Some(params)).to_json();
        let outcome = match self.post(body, Some(id), None, None, false).await? {
            Posted::Answer(o) => o,
            Posted::Accepted | Posted::SessionGone(_) => {
                return Err(UpstreamError::Handshake {
                    server: self.server.clone(),
                    message: "the server accepted initialize without answering it".into(),
                });
            }
        };
        let info = super::check_init(&self.server, outcome)?;
        {
            let mut s = self.session.lock();
            s.protocol = Some(info.protocol_version.clone());
            s.generation += 1;
        }
        let note = Message::notification("notifications/initialized", None).to_json();
        self.send_oneway(note)
            .await
            .map_err(|e| UpstreamError::Handshake {
                server: self.server.clone(),
                message: format!("notifications/initialized was refused: {e}"),
            })?;
        Ok(info)
    }

    /// Re-run the handshake once for all concurrent callers that saw the 404 on generation `seen`.
    async fn reinitialize(&self, seen: u64) -> Result<(), UpstreamError> {
        let _single_flight = self.reinit.lock().await;
        if self.session.lock().generation != seen {
            return Ok(()); // someone else already did it
        }
        let params = self
            .init_params
            .lock()
            .clone()
            .ok_or_else(|| UpstreamError::Handshake {
                server: self.server.clone(),
                message: "no initialize parameters to replay".into(),
            })?;
        tracing::info!(mcp_server = %self.server, "upstream_session_expired_reinitializing");
        match self.initialize(params).await {
            Ok(_) => Ok(()),
            Err(e) => {
                if matches!(e, UpstreamError::Handshake { .. }) {
                    // The server answers but refuses a new session: this connection is done.
                    tracing::warn!(mcp_server = %self.server, error = %e, "upstream_session_unrecoverable");
                    self.closed.cancel();
                }
                Err(e)
            }
        }
    }

    /// Send a request and wait for its answer; on drop before the answer, cancel upstream.
    pub(super) async fn call(
        self: &Arc<Self>,
        method: &str,
        params: Option<Box<RawValue>>,
        sink: Option<CallSink>,
        progress: Option<(String, Box<RawValue>)>,
        timeout: Duration,
    ) -> Result<Outcome, UpstreamError> {
        if !self.is_alive() {
            return Err(UpstreamError::Closed {
                server: self.server.clone(),
                message: "the connection was shut down".into(),
                before_send: true,
            });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body = Message::request(Id::Num(id as i64), method, params).to_json();
        let mut guard = CancelOnDrop {
            conn: self.clone(),
            id,
            armed: true,
        };
        let res = tokio::time::timeout(
            timeout,
            self.call_inner(id, body, sink.as_ref(), progress.as_ref()),
        )
        .await;
        match res {
            Ok(r) => {
                guard.armed = false;
                r
            }
            Err(_) => Err(UpstreamError::Timeout {
                server: self.server.clone(),
                secs: timeout.as_secs_f64(),
            }),
        }
    }

    async fn call_inner(
        &self,
        id: u64,
        body: String,
        sink: Option<&CallSink>,
        progress: Option<&(String, Box<RawValue>)>,
    ) -> Result<Outcome, UpstreamError> {
        let first = self
            .post(body.clone(), Some(id), sink, progress, true)
            .await?;
        let seen = match first {
            Posted::Answer(o) => return Ok(o),
            Posted::Accepted => return Err(self.accepted_without_answer()),
            Posted::SessionGone(g) => g,
        };
        self.reinitialize(seen).await?;
        match self.post(body, Some(id), sink, progress, true).await? {
            Posted::Answer(o) => Ok(o),
            Posted::Accepted => Err(self.accepted_without_answer()),
            Posted::SessionGone(_) => Err(UpstreamError::Protocol {
                server: self.server.clone(),
                message: "the server forgot the session again right after re-initializing it"
                    .into(),
            }),
        }
    }

    fn accepted_without_answer(&self) -> UpstreamError {
        UpstreamError::Protocol {
            server: self.server.clone(),
            message: "the server accepted the request (HTTP 202) without answering it".into(),
        }
    }

    /// POST a notification or a response (no answer expected).
    pub(super) async fn send_oneway(&self, body: String) -> Result<(), UpstreamError> {
        let (rb, _, had_session) = self.post_builder(body, true);
        let resp = match tokio::time::timeout(self.read_timeout, rb.send()).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(self.send_error(&e)),
            Err(_) => {
                return Err(UpstreamError::Timeout {
                    server: self.server.clone(),
                    secs: self.read_timeout.as_secs_f64(),
                });
            }
        };
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let text = if status == StatusCode::NOT_FOUND && had_session {
            "the server no longer knows this session".to_owned()
        } else {
            body_excerpt(resp).await
        };
        Err(UpstreamError::Protocol {
            server: self.server.clone(),
            message: format!("HTTP {status}: {text}"),
        })
    }

    /// Keep a GET stream open for server-initiated messages while alive (405 = not offered).
    pub(super) fn start_listening(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let closed = self.listen_stop.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(250);
            loop {
                let pause = {
                    let Some(me) = weak.upgrade() else { return };
                    tokio::select! {
                        _ = closed.cancelled() => return,
                        r = me.listen_once() => match r {
                            Listen::NotOffered => return,
                            Listen::Streamed => {
                                backoff = Duration::from_millis(250);
                                backoff
                            }
                            Listen::Failed => {
                                let b = backoff;
                                backoff = (backoff * 2).min(Duration::from_secs(30));
                                b
                            }
                        },
                    }
                };
                tokio::select! {
                    _ = closed.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        });
    }

    async fn listen_once(&self) -> Listen {
        let s = self.session.lock().clone();
        let mut rb = self
            .client
            .get(self.endpoint.clone())
            .headers(self.headers.clone())
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(id) = &s.id {
            rb = rb.header(SESSION_HEADER, id);
        }
        if let Some(v) = &s.protocol {
            rb = rb.header(VERSION_HEADER, v);
        }
        let resp = match rb.send().await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(mcp_server = %self.server, error = %without_url(&e), "upstream_get_stream_failed");
                return Listen::Failed;
            }
        };
        let status = resp.status();
        let is_sse = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|c| c.to_ascii_lowercase().starts_with("text/event-stream"));
        if !status.is_success() || !is_sse {
            return match status.as_u16() {
                // Session expired (the next POST re-initializes), or a transient failure.
                404 | 408 | 429 | 500..=599 => Listen::Failed,
                // 405 and everything else: the server offers no stream.
                _ => Listen::NotOffered,
            };
        }
        let mut parser = SseParser::new();
        let mut stream = resp.bytes_stream();
        while let Some(Ok(chunk)) = stream.next().await {
            for ev in parser.feed(&chunk) {
                let Ok(msg) = serde_json::from_str::<Message>(&ev.data) else {
                    continue;
                };
                match msg.kind() {
                    Kind::Request => {
                        let Some(id) = msg.id.clone() else { continue };
                        let answer = if msg.method.as_deref() == Some("ping") {
                            Message::response(id, crate::jsonrpc::empty_object())
                        } else {
                            Message::error(
                                Some(id),
                                RpcError::new(
                                    INTERNAL_ERROR,
                                    "Hangar cannot attribute this request to a caller (it arrived outside any call)",
                                ),
                            )
                        };
                        let _ = self.send_oneway(answer.to_json()).await;
                    }
                    Kind::Notification => {
                        let _ = self.notes.send(Arc::new(msg));
                    }
                    _ => {}
                }
            }
        }
        Listen::Streamed
    }

    /// Stop the GET listener (the owning `Upstream` is gone).
    pub(super) fn stop_listening(&self) {
        self.listen_stop.cancel();
    }

    /// Stop: DELETE the session if any. Idempotent.
    pub(super) async fn shutdown(&self) {
        if self.stopping.swap(true, Ordering::SeqCst) {
            self.closed.cancelled().await;
            return;
        }
        let session = self.session.lock().id.take();
        if let Some(s) = session {
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                self.client
                    .delete(self.endpoint.clone())
                    .headers(self.headers.clone())
                    .header(SESSION_HEADER, s)
                    .send(),
            )
            .await;
        }
        self.closed.cancel();
    }
}

enum Listen {
    NotOffered,
    Streamed,
    Failed,
}

/// Sends `notifications/cancelled` when a call's future is dropped before its answer.
struct CancelOnDrop {
    conn: Arc<HttpConn>,
    id: u64,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.armed || !self.conn.is_alive() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let conn = self.conn.clone();
        let note = super::cancelled_notification(self.id);
        rt.spawn(async move {
            if let Err(e) = conn.send_oneway(note).await {
                tracing::debug!(mcp_server = %conn.server, error = %e, "upstream_cancel_not_delivered");
            }
        });
    }
}

/// Display of a reqwest error without the URL (which may carry credentials in its query).
fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(url) = e.url() {
        s = s.replace(url.as_str(), "<endpoint>");
    }
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        src = inner.source();
    }
    s
}

/// The first few hundred bytes of an error body (reads at most ~4 KiB of it).
async fn body_excerpt(resp: reqwest::Response) -> String {
    let mut stream = resp.bytes_stream();
    let mut buf = Vec::new();
    while let Some(Ok(chunk)) = stream.next().await {
        buf.extend_from_slice(&chunk);
        if buf.len() >= 4096 {
            break;
        }
    }
    let text = excerpt(&String::from_utf8_lossy(&buf));
    if text.is_empty() {
        "(empty body)".to_owned()
    } else {
        text
    }
}

fn excerpt(text: &str) -> String {
    let t = text.trim();
    if t.len() <= EXCERPT {
        t.to_owned()
    } else {
        let mut cut = EXCERPT;
        while !t.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}…", &t[..cut])
    }
}

#[cfg(test)]
mod tests;
