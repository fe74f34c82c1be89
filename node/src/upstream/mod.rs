//! Upstream room: the MCP *client* side. One [`Upstream`] is one live, initialized
//! connection to an MCP server — a child process over stdio, or a remote Streamable HTTP
//! endpoint — shared by every caller: requests are multiplexed by our own ids, progress
//! tokens are made connection-unique and restored, a caller that goes away cancels its
//! request upstream, and params/results pass through as raw JSON.

mod http;
mod sse;
mod stdio;

pub use sse::SseParser;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::jsonrpc::{Id, Message, RawObject, RpcError, raw, raw_from_object, raw_object};

/// How to reach an upstream.
#[derive(Debug, Clone)]
pub enum TransportSpec {
    /// A child process speaking newline-delimited JSON-RPC on stdio.
    Stdio(StdioSpec),
    /// A remote Streamable HTTP endpoint.
    Http(HttpSpec),
}

/// A child process.
#[derive(Debug, Clone)]
pub struct StdioSpec {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: Option<PathBuf>,
}

/// A remote endpoint.
#[derive(Debug, Clone)]
pub struct HttpSpec {
    /// URL of the MCP endpoint.
    pub endpoint: String,
    /// Extra headers (including auth; values are secrets and never logged).
    pub headers: Vec<(String, String)>,
    /// TCP/TLS connect timeout.
    pub connect_timeout: Duration,
    /// Default per-request read timeout.
    pub read_timeout: Duration,
    /// Verify TLS certificates.
    pub verify_tls: bool,
    /// Extra CA certificate (PEM).
    pub ca_cert_path: Option<PathBuf>,
}

/// Handshake parameters.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Server id (for logs and errors).
    pub server_id: String,
    /// clientInfo.name.
    pub client_name: String,
    /// clientInfo.version.
    pub client_version: String,
    /// Protocol version to ask for.
    pub protocol_version: String,
    /// Handshake deadline.
    pub init_timeout: Duration,
    /// Capabilities advertised upstream.
    pub client_capabilities: serde_json::Value,
}

/// What the handshake produced.
#[derive(Debug)]
pub struct InitInfo {
    /// Negotiated protocol version.
    pub protocol_version: String,
    /// Raw `initialize` result.
    pub result: Box<RawValue>,
}

/// A message that belongs to one in-flight call.
#[derive(Debug)]
pub enum CallEvent {
    /// Progress (original token restored), logging during the call, …
    Notification(Message),
    /// A request from the upstream to the client (sampling, elicitation, roots); answer with
    /// [`Upstream::respond`] using its id.
    Request(Message),
}

/// Where call events go.
pub type CallSink = mpsc::Sender<CallEvent>;

/// An upstream's answer.
#[derive(Debug)]
pub enum Outcome {
    /// `result`.
    Result(Box<RawValue>),
    /// `error`.
    Error(RpcError),
}

/// A stderr (or stdout-garbage) line.
#[derive(Debug, Clone, Serialize)]
pub struct LogLine {
    /// Unix time.
    pub timestamp: f64,
    /// The line.
    pub line: String,
    /// `stderr` or `stdout-garbage`.
    pub stream: String,
}

/// Transport failures.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The process could not be started.
    #[error("cannot start MCP server '{server}': {message}")]
    Spawn {
        /// Server id.
        server: String,
        /// What failed.
        message: String,
    },
    /// The endpoint could not be reached.
    #[error("cannot connect to MCP server '{server}': {message}")]
    Connect {
        /// Server id.
        server: String,
        /// What failed.
        message: String,
    },
    /// The MCP handshake failed.
    #[error("MCP handshake with '{server}' failed: {message}")]
    Handshake {
        /// Server id.
        server: String,
        /// What failed.
        message: String,
    },
    /// The connection died.
    #[error("MCP server '{server}' connection closed: {message}")]
    Closed {
        /// Server id.
        server: String,
        /// What happened.
        message: String,
        /// True when the request was certainly not delivered.
        before_send: bool,
    },
    /// No answer in time.
    #[error("MCP server '{server}' did not answer within {secs:.1}s")]
    Timeout {
        /// Server id.
        server: String,
        /// The deadline.
        secs: f64,
    },
    /// Unreadable or refused answer.
    #[error("MCP server '{server}' answered badly: {message}")]
    Protocol {
        /// Server id.
        server: String,
        /// What was wrong.
        message: String,
    },
}

impl UpstreamError {
    /// True when the request certainly did not reach the upstream (safe to retry elsewhere).
    pub fn before_send(&self) -> bool {
        match self {
            UpstreamError::Spawn { .. } | UpstreamError::Connect { .. } => true,
            UpstreamError::Closed { before_send, .. } => *before_send,
            _ => false,
        }
    }
}

enum Transport {
    Stdio(Arc<stdio::StdioConn>),
    Http(Arc<http::HttpConn>),
}

/// One live, initialized upstream connection.
pub struct Upstream {
    server_id: String,
    transport: Transport,
    init: InitInfo,
    notes: broadcast::Sender<Arc<Message>>,
    in_flight: Arc<AtomicU64>,
    default_timeout: Duration,
}

/// Shared progress-routing state used by both transports.
type PendingMap = Mutex<HashMap<u64, stdio::PendingCall>>;

static PROGRESS_SEQ: AtomicU64 = AtomicU64::new(1);

/// Deliver a progress notification to the call whose (rewritten) token it carries.
async fn route_progress(
    pending: &PendingMap,
    tokens: &Mutex<HashMap<String, u64>>,
    mut msg: Message,
) -> bool {
    let Ok(mut params) = raw_object(msg.params.as_deref()) else {
        return false;
    };
    let Some(tok) = params
        .get("progressToken")
        .and_then(|t| serde_json::from_str::<serde_json::Value>(t.get()).ok())
    else {
        return false;
    };
    let key = token_key(&tok);
    let Some(call) = tokens.lock().get(&key).copied() else {
        return false;
    };
    let (sink, original) = {
        let pending = pending.lock();
        let Some(p) = pending.get(&call) else { return false };
        let Some((_, orig)) = &p.progress else { return false };
        (p.sink.clone(), orig.clone())
    };
    let Some(sink) = sink else { return false };
    params.insert("progressToken".to_owned(), original);
    msg.params = Some(raw_from_object(&params));
    sink.send(CallEvent::Notification(msg)).await.is_ok()
}

fn token_key(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Cancels the request upstream if the caller's future is dropped before the answer.
struct CancelGuard<'a> {
    up: &'a Upstream,
    id: u64,
    armed: bool,
}

impl Drop for CancelGuard<'_> {
    fn drop(&mut self) {
        self.up.in_flight.fetch_sub(1, Ordering::Relaxed);
        if !self.armed {
            return;
        }
        let id = self.id;
        match &self.up.transport {
            Transport::Stdio(c) => {
                let removed = c.shared.pending.lock().remove(&id);
                if let Some(p) = removed {
                    if let Some((tok, _)) = p.progress {
                        c.shared.progress.lock().remove(&tok);
                    }
                }
                let note = cancelled(id);
                let c = c.clone();
                tokio::spawn(async move {
                    let _ = c.write(note).await;
                });
            }
            Transport::Http(c) => {
                let c = c.clone();
                let note = cancelled(id);
                tokio::spawn(async move {
                    c.post_notification(note).await;
                });
            }
        }
    }
}

fn cancelled(id: u64) -> String {
    Message::notification(
        "notifications/cancelled",
        Some(raw(&serde_json::json!({"requestId": id, "reason": "the client went away"}))),
    )
    .to_json()
}

impl Upstream {
    /// Start or reach the server and perform the MCP handshake.
    pub async fn connect(spec: &TransportSpec, opts: ConnectOptions) -> Result<Arc<Upstream>, UpstreamError> {
        let (notes, _) = broadcast::channel(256);
        let (transport, default_timeout) = match spec {
            TransportSpec::Stdio(s) => (
                Transport::Stdio(stdio::StdioConn::spawn(&opts.server_id, s, notes.clone())?),
                Duration::from_secs(60),
            ),
            TransportSpec::Http(h) => (
                Transport::Http(http::HttpConn::new(&opts.server_id, h, notes.clone())?),
                h.read_timeout,
            ),
        };
        let mut up = Upstream {
            server_id: opts.server_id.clone(),
            transport,
            init: InitInfo {
                protocol_version: opts.protocol_version.clone(),
                result: crate::jsonrpc::empty_object(),
            },
            notes,
            in_flight: Arc::new(AtomicU64::new(0)),
            default_timeout,
        };
        let init = match tokio::time::timeout(opts.init_timeout, up.handshake(&opts)).await {
            Ok(Ok(i)) => i,
            Ok(Err(e)) => {
                up.shutdown().await;
                return Err(e);
            }
            Err(_) => {
                up.shutdown().await;
                return Err(UpstreamError::Handshake {
                    server: opts.server_id.clone(),
                    message: format!("no answer to initialize within {:?}", opts.init_timeout),
                });
            }
        };
        up.init = init;
        let up = Arc::new(up);
        if let Transport::Http(h) = &up.transport {
            h.set_protocol_version(&up.init.protocol_version);
            h.clone().start_listening();
        }
        Ok(up)
    }

    async fn handshake(&self, opts: &ConnectOptions) -> Result<InitInfo, UpstreamError> {
        let params = raw(&serde_json::json!({
            "protocolVersion": opts.protocol_version,
            "capabilities": opts.client_capabilities,
            "clientInfo": {"name": opts.client_name, "version": opts.client_version},
        }));
        let outcome = match &self.transport {
            Transport::Http(h) => h.initialize(params).await?,
            Transport::Stdio(_) => self.request("initialize", Some(params), None, Some(opts.init_timeout)).await?,
        };
        let result = match outcome {
            Outcome::Result(r) => r,
            Outcome::Error(e) => {
                return Err(UpstreamError::Handshake {
                    server: self.server_id.clone(),
                    message: format!("initialize refused: {} ({})", e.message, e.code),
                });
            }
        };
        let version = serde_json::from_str::<serde_json::Value>(result.get())
            .ok()
            .and_then(|v| v.get("protocolVersion").and_then(|p| p.as_str()).map(str::to_owned))
            .ok_or_else(|| UpstreamError::Handshake {
                server: self.server_id.clone(),
                message: "initialize result has no protocolVersion".into(),
            })?;
        self.notify("notifications/initialized", None).await?;
        Ok(InitInfo {
            protocol_version: version,
            result,
        })
    }

    /// The handshake result.
    pub fn init(&self) -> &InitInfo {
        &self.init
    }

    /// Server id.
    pub fn server_id(&self) -> &str {
        &self.server_id
    }

    /// Send a request and wait for the answer (see the room docs for progress and
    /// cancellation). `timeout` defaults to the connection's read timeout.
    pub async fn request(
        &self,
        method: &str,
        params: Option<Box<RawValue>>,
        sink: Option<CallSink>,
        timeout: Option<Duration>,
    ) -> Result<Outcome, UpstreamError> {
        let timeout = timeout.unwrap_or(self.default_timeout);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let id = match &self.transport {
            Transport::Stdio(c) => c.next_id.fetch_add(1, Ordering::Relaxed),
            Transport::Http(c) => c.next_id(),
        };
        let mut guard = CancelGuard {
            up: self,
            id,
            armed: false,
        };
        // Progress token rewrite.
        let (params, progress) = rewrite_progress(params, sink.is_some());
        match &self.transport {
            Transport::Stdio(c) => {
                if !c.shared.alive.load(Ordering::SeqCst) {
                    return Err(UpstreamError::Closed {
                        server: self.server_id.clone(),
                        message: "the MCP server process is not running".into(),
                        before_send: true,
                    });
                }
                let (tx, rx) = oneshot::channel();
                if let Some((tok, _)) = &progress {
                    c.shared.progress.lock().insert(tok.clone(), id);
                }
                c.shared
                    .pending
                    .lock()
                    .insert(id, stdio::PendingCall { tx, sink, progress });
                let line = Message::request(Id::Num(id as i64), method, params).to_json();
                if c.write(line).await.is_err() {
                    c.shared.pending.lock().remove(&id);
                    return Err(UpstreamError::Closed {
                        server: self.server_id.clone(),
                        message: "the MCP server process is not running".into(),
                        before_send: true,
                    });
                }
                guard.armed = true;
                let res = tokio::time::timeout(timeout, rx).await;
                match res {
                    Ok(Ok(r)) => {
                        guard.armed = false;
                        r
                    }
                    Ok(Err(_)) => {
                        guard.armed = false;
                        Err(UpstreamError::Closed {
                            server: self.server_id.clone(),
                            message: "the connection was dropped".into(),
                            before_send: false,
                        })
                    }
                    Err(_) => Err(UpstreamError::Timeout {
                        server: self.server_id.clone(),
                        secs: timeout.as_secs_f64(),
                    }),
                }
            }
            Transport::Http(c) => {
                guard.armed = true;
                let msg = Message::request(Id::Num(id as i64), method, params);
                let res = tokio::time::timeout(timeout, c.call(id, msg, sink, progress)).await;
                match res {
                    Ok(r) => {
                        guard.armed = false;
                        r
                    }
                    Err(_) => Err(UpstreamError::Timeout {
                        server: self.server_id.clone(),
                        secs: timeout.as_secs_f64(),
                    }),
                }
            }
        }
    }

    /// Send a notification.
    pub async fn notify(&self, method: &str, params: Option<Box<RawValue>>) -> Result<(), UpstreamError> {
        let line = Message::notification(method, params).to_json();
        match &self.transport {
            Transport::Stdio(c) => c.write(line).await.map_err(|_| UpstreamError::Closed {
                server: self.server_id.clone(),
                message: "the MCP server process is not running".into(),
                before_send: true,
            }),
            Transport::Http(c) => {
                c.post_notification(line).await;
                Ok(())
            }
        }
    }

    /// Answer a request the upstream sent during a call.
    pub async fn respond(&self, upstream_id: Id, outcome: Outcome) -> Result<(), UpstreamError> {
        let msg = match outcome {
            Outcome::Result(r) => Message::response(upstream_id, r),
            Outcome::Error(e) => Message::error(Some(upstream_id), e),
        };
        match &self.transport {
            Transport::Stdio(c) => c.write(msg.to_json()).await.map_err(|_| UpstreamError::Closed {
                server: self.server_id.clone(),
                message: "the MCP server process is not running".into(),
                before_send: true,
            }),
            Transport::Http(c) => {
                c.post_notification(msg.to_json()).await;
                Ok(())
            }
        }
    }

    /// Notifications not tied to a call.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Message>> {
        self.notes.subscribe()
    }

    /// Whether the connection is usable.
    pub fn is_alive(&self) -> bool {
        match &self.transport {
            Transport::Stdio(c) => c.shared.alive.load(Ordering::SeqCst),
            Transport::Http(c) => c.is_alive(),
        }
    }

    /// Resolves when the connection is gone.
    pub async fn closed(&self) {
        match &self.transport {
            Transport::Stdio(c) => loop {
                let notified = c.shared.closed.notified();
                if !c.shared.alive.load(Ordering::SeqCst) {
                    return;
                }
                notified.await;
            },
            Transport::Http(c) => c.closed().await,
        }
    }

    /// Last `n` stderr lines (stdio).
    pub fn logs(&self, n: usize) -> Vec<LogLine> {
        match &self.transport {
            Transport::Stdio(c) => c.logs(n),
            Transport::Http(_) => Vec::new(),
        }
    }

    /// Child pid (stdio).
    pub fn pid(&self) -> Option<u32> {
        match &self.transport {
            Transport::Stdio(c) => c.pid(),
            Transport::Http(_) => None,
        }
    }

    /// Orderly stop. Idempotent.
    pub async fn shutdown(&self) {
        match &self.transport {
            Transport::Stdio(c) => {
                c.shutdown().await;
            }
            Transport::Http(c) => c.shutdown().await,
        }
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed) as usize
    }
}

/// If params carry `_meta.progressToken` and the caller listens, replace it with a
/// connection-unique token; returns the new params and (new token, original token).
fn rewrite_progress(
    params: Option<Box<RawValue>>,
    listening: bool,
) -> (Option<Box<RawValue>>, Option<(String, Box<RawValue>)>) {
    let Some(p) = params else { return (None, None) };
    if !listening || !p.get().contains("progressToken") {
        return (Some(p), None);
    }
    let Ok(mut obj) = serde_json::from_str::<RawObject>(p.get()) else {
        return (Some(p), None);
    };
    let Some(meta) = obj.get("_meta") else { return (Some(p), None) };
    let Ok(mut meta) = serde_json::from_str::<RawObject>(meta.get()) else {
        return (Some(p), None);
    };
    let Some(original) = meta.get("progressToken").cloned() else {
        return (Some(p), None);
    };
    let token = format!("hgr-p{}", PROGRESS_SEQ.fetch_add(1, Ordering::Relaxed));
    meta.insert("progressToken".to_owned(), raw(&serde_json::Value::String(token.clone())));
    obj.insert("_meta".to_owned(), raw_from_object(&meta));
    (Some(raw_from_object(&obj)), Some((token, original)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_tokens_are_rewritten_only_when_listening() {
        let p = RawValue::from_string(r#"{"name":"x","_meta":{"progressToken":7,"k":1}}"#.into()).unwrap();
        let (out, tok) = rewrite_progress(Some(p.clone()), false);
        assert_eq!(out.unwrap().get(), p.get());
        assert!(tok.is_none());
        let (out, tok) = rewrite_progress(Some(p), true);
        let (new, orig) = tok.unwrap();
        assert_eq!(orig.get(), "7");
        assert!(out.unwrap().get().contains(&format!("\"progressToken\":\"{new}\"")));
    }
}
