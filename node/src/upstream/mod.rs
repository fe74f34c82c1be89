//! Upstream room: the MCP *client* side. One [`Upstream`] is one live, initialized
//! connection to an MCP server — a child process over stdio, or a remote Streamable HTTP
//! endpoint — shared by every caller: requests are multiplexed by our own ids, progress
//! tokens are made connection-unique and restored, a caller that goes away cancels its
//! request upstream, and params/results pass through as raw JSON.
//!
//! Routing of what the server sends besides answers:
//! * `notifications/progress` → the call whose (rewritten) token it carries, original token
//!   restored; dropped when no live call listens.
//! * stdio: server→client requests and `notifications/message` → the call with a sink if it is
//!   the only one in flight; otherwise requests are refused (-32603) and logs broadcast.
//!   HTTP: whatever arrives on a call's own SSE stream belongs to that call.
//! * `ping` from the server is answered here with `{}`.
//! * everything else → [`Upstream::subscribe`].

mod http;
pub mod lease;
mod sse;
mod stdio;

pub use sse::{SseEvent, SseParser};

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::{broadcast, mpsc};

use crate::jsonrpc::{Id, Message, RawObject, RpcError, raw, raw_from_object};

/// Protocol revisions Hangar accepts in an upstream's `initialize` answer.
pub const SUPPORTED_PROTOCOL_VERSIONS: &[&str] =
    &["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"];

/// How to reach an upstream.
#[derive(Debug, Clone)]
pub enum TransportSpec {
    /// A child process speaking newline-delimited JSON-RPC on stdio.
    Stdio(StdioSpec),
    /// A remote Streamable HTTP endpoint.
    Http(HttpSpec),
}

/// A child process.
#[derive(Clone)]
pub struct StdioSpec {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Extra environment (values may be secrets; `Debug` hides them).
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: Option<PathBuf>,
}

impl std::fmt::Debug for StdioSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StdioSpec")
            .field("argv", &self.argv)
            .field(
                "env",
                &self
                    .env
                    .iter()
                    .map(|(k, _)| (k.as_str(), "<redacted>"))
                    .collect::<Vec<_>>(),
            )
            .field("cwd", &self.cwd)
            .finish()
    }
}

/// A remote endpoint.
#[derive(Clone)]
pub struct HttpSpec {
    /// URL of the MCP endpoint.
    pub endpoint: String,
    /// Extra headers (including auth; values are secrets and never logged).
    pub headers: Vec<(String, String)>,
    /// TCP/TLS connect timeout.
    pub connect_timeout: Duration,
    /// Default per-request deadline (requests without their own timeout).
    pub read_timeout: Duration,
    /// Verify TLS certificates.
    pub verify_tls: bool,
    /// Extra CA certificate (PEM).
    pub ca_cert_path: Option<PathBuf>,
}

impl std::fmt::Debug for HttpSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSpec")
            .field("endpoint", &self.endpoint)
            .field(
                "headers",
                &self
                    .headers
                    .iter()
                    .map(|(k, _)| (k.as_str(), "<redacted>"))
                    .collect::<Vec<_>>(),
            )
            .field("connect_timeout", &self.connect_timeout)
            .field("read_timeout", &self.read_timeout)
            .field("verify_tls", &self.verify_tls)
            .field("ca_cert_path", &self.ca_cert_path)
            .finish()
    }
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
    /// Protocol version to ask for (the server may answer any of [`SUPPORTED_PROTOCOL_VERSIONS`]).
    pub protocol_version: String,
    /// Handshake deadline.
    pub init_timeout: Duration,
    /// Capabilities advertised upstream.
    pub client_capabilities: serde_json::Value,
    /// The placement lease a stdio child runs under (single-instance servers in a cluster):
    /// the child is killed when it lapses, even if this process is frozen.
    pub lease: Option<lease::LeaseWatch>,
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
    /// A notification that belongs to this call (progress with the caller's original token
    /// restored, `notifications/message` emitted while serving it, …).
    Notification(Message),
    /// A request from the upstream to the client (sampling, elicitation, roots); `id` is the
    /// upstream's id — answer with [`Upstream::respond`].
    Request(Message),
    /// A request from an upstream on another node, already registered there: its id is the
    /// relayed id (`hgr/<node>/<seq>`) to show the client unchanged; the answer goes home.
    Relayed(Message),
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
    /// Unix time in seconds.
    pub timestamp: f64,
    /// The line (at most 8192 bytes).
    pub line: String,
    /// `stderr` or `stdout-garbage`.
    pub stream: String,
}

/// Transport failures.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The process could not be started (the request never left).
    #[error("cannot start MCP server '{server}': {message}")]
    Spawn {
        /// Server id.
        server: String,
        /// What failed.
        message: String,
    },
    /// The endpoint could not be reached (the request never left).
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
    /// Too many messages queued for this server (the request never left).
    #[error("MCP server '{server}' is overloaded: {message}")]
    Overloaded {
        /// Server id.
        server: String,
        /// What was full.
        message: String,
    },
}

impl UpstreamError {
    /// True when the request certainly did not reach the upstream (safe to retry elsewhere).
    pub fn before_send(&self) -> bool {
        match self {
            UpstreamError::Spawn { .. }
            | UpstreamError::Connect { .. }
            | UpstreamError::Overloaded { .. } => true,
            UpstreamError::Closed { before_send, .. } => *before_send,
            _ => false,
        }
    }
}

enum Transport {
    Stdio(Arc<stdio::StdioConn>),
    Http(Arc<http::HttpConn>),
}

/// One live, initialized upstream connection; share it as `Arc<Upstream>`.
pub struct Upstream {
    server_id: String,
    transport: Transport,
    init: InitInfo,
    notes: broadcast::Sender<Arc<Message>>,
    in_flight: AtomicUsize,
    default_timeout: Duration,
}

/// Default deadline for stdio requests without their own timeout.
const STDIO_DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

static PROGRESS_SEQ: AtomicU64 = AtomicU64::new(1);

/// (progress token sent upstream, the caller's original token).
type ProgressPair = (String, Box<RawValue>);

impl Upstream {
    /// Start or reach the server and perform the MCP handshake (`initialize` → check the
    /// answered protocol version → `notifications/initialized`) within `opts.init_timeout`.
    pub async fn connect(
        spec: &TransportSpec,
        opts: ConnectOptions,
    ) -> Result<Arc<Upstream>, UpstreamError> {
        let (notes, _) = broadcast::channel(1024);
        let params = raw(&serde_json::json!({
            "protocolVersion": opts.protocol_version,
            "capabilities": opts.client_capabilities,
            "clientInfo": {"name": opts.client_name, "version": opts.client_version},
        }));
        let server = opts.server_id.clone();
        let timed_out = || UpstreamError::Handshake {
            server: server.clone(),
            message: format!(
                "no answer to initialize within {:.1}s; check that the server speaks MCP on this transport",
                opts.init_timeout.as_secs_f64()
            ),
        };
        let (transport, init, default_timeout) = match spec {
            TransportSpec::Stdio(s) => {
                let conn = stdio::StdioConn::spawn(&server, s, notes.clone(), opts.lease.as_ref())?;
                let handshake = async {
                    let outcome = conn
                        .call("initialize", Some(params), None, None, opts.init_timeout)
                        .await
                        .map_err(|e| match e {
                            UpstreamError::Timeout { .. } => timed_out(),
                            other => UpstreamError::Handshake {
                                server: server.clone(),
                                message: format!("initialize failed: {other}"),
                            },
                        })?;
                    let info = check_init(&server, outcome)?;
                    conn.send(&Message::notification("notifications/initialized", None))
                        .await
                        .map_err(|e| UpstreamError::Handshake {
                            server: server.clone(),
                            message: format!("cannot send notifications/initialized: {e}"),
                        })?;
                    Ok::<_, UpstreamError>(info)
                };
                let res = tokio::time::timeout(opts.init_timeout, handshake).await;
                match res {
                    Ok(Ok(info)) => (Transport::Stdio(conn), info, STDIO_DEFAULT_TIMEOUT),
                    Ok(Err(e)) => {
                        conn.shutdown().await;
                        return Err(e);
                    }
                    Err(_) => {
                        conn.shutdown().await;
                        return Err(timed_out());
                    }
                }
            }
            TransportSpec::Http(h) => {
                let conn = http::HttpConn::new(&server, h, notes.clone())?;
                match tokio::time::timeout(opts.init_timeout, conn.initialize(params)).await {
                    Ok(Ok(info)) => (Transport::Http(conn), info, h.read_timeout),
                    Ok(Err(e)) => {
                        conn.shutdown().await;
                        return Err(match e {
                            e @ (UpstreamError::Connect { .. }
                            | UpstreamError::Handshake { .. }) => e,
                            other => UpstreamError::Handshake {
                                server: server.clone(),
                                message: format!("initialize failed: {other}"),
                            },
                        });
                    }
                    Err(_) => {
                        conn.shutdown().await;
                        return Err(timed_out());
                    }
                }
            }
        };
        if let Transport::Http(h) = &transport {
            h.start_listening();
        }
        tracing::info!(mcp_server = %server, protocol = %init.protocol_version, "upstream_connected");
        Ok(Arc::new(Upstream {
            server_id: server,
            transport,
            init,
            notes,
            in_flight: AtomicUsize::new(0),
            default_timeout,
        }))
    }

    /// The handshake result.
    pub fn init(&self) -> &InitInfo {
        &self.init
    }

    /// Server id.
    pub fn server_id(&self) -> &str {
        &self.server_id
    }

    /// Send a request and wait for its answer. `params` pass through untouched except
    /// `_meta.progressToken`, which is rewritten to a connection-unique token upstream and
    /// restored on progress notifications sent to `sink`. Dropping the returned future before
    /// it completes sends `notifications/cancelled` upstream. `timeout`: overall deadline
    /// (None = the connection's default: HTTP read timeout, 60 s for stdio).
    pub async fn request(
        &self,
        method: &str,
        params: Option<Box<RawValue>>,
        sink: Option<CallSink>,
        timeout: Option<Duration>,
    ) -> Result<Outcome, UpstreamError> {
        let timeout = timeout.unwrap_or(self.default_timeout);
        let _counted = InFlight::new(&self.in_flight);
        let (params, progress) = rewrite_progress(params);
        match &self.transport {
            Transport::Stdio(c) => c.call(method, params, sink, progress, timeout).await,
            Transport::Http(c) => c.call(method, params, sink, progress, timeout).await,
        }
    }

    /// Send a notification.
    pub async fn notify(
        &self,
        method: &str,
        params: Option<Box<RawValue>>,
    ) -> Result<(), UpstreamError> {
        let msg = Message::notification(method, params);
        match &self.transport {
            Transport::Stdio(c) => c.send(&msg).await,
            Transport::Http(c) => c.send_oneway(msg.to_json()).await,
        }
    }

    /// Answer a server→client request previously delivered as [`CallEvent::Request`].
    pub async fn respond(&self, upstream_id: Id, outcome: Outcome) -> Result<(), UpstreamError> {
        let msg = match outcome {
            Outcome::Result(r) => Message::response(upstream_id, r),
            Outcome::Error(e) => Message::error(Some(upstream_id), e),
        };
        match &self.transport {
            Transport::Stdio(c) => c.respond(&msg).await,
            Transport::Http(c) => c.send_oneway(msg.to_json()).await,
        }
    }

    /// Notifications not attributable to a call (list changes, resource updates, logs outside calls).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Message>> {
        self.notes.subscribe()
    }

    /// Whether the connection is usable.
    pub fn is_alive(&self) -> bool {
        match &self.transport {
            Transport::Stdio(c) => c.is_alive(),
            Transport::Http(c) => c.is_alive(),
        }
    }

    /// Resolves when the connection is gone (process exited, stdout closed, shut down, or the
    /// HTTP session cannot be re-established).
    pub async fn closed(&self) {
        match &self.transport {
            Transport::Stdio(c) => c.closed().await,
            Transport::Http(c) => c.closed().await,
        }
    }

    /// stdio: the last `n` stderr (and stdout-garbage) lines; HTTP: empty.
    pub fn logs(&self, n: usize) -> Vec<LogLine> {
        match &self.transport {
            Transport::Stdio(c) => c.logs(n),
            Transport::Http(_) => Vec::new(),
        }
    }

    /// stdio: the child's pid.
    pub fn pid(&self) -> Option<u32> {
        match &self.transport {
            Transport::Stdio(c) => c.pid(),
            Transport::Http(_) => None,
        }
    }

    /// Orderly stop. stdio: close stdin, wait up to 3 s, SIGTERM the process group, wait 2 s,
    /// SIGKILL. HTTP: DELETE the session. Idempotent.
    pub async fn shutdown(&self) {
        match &self.transport {
            Transport::Stdio(c) => c.shutdown().await,
            Transport::Http(c) => c.shutdown().await,
        }
    }

    /// Stop at once, for a connection that failed: stdio: SIGKILL the process group and wait
    /// (bounded) for the exit; HTTP: as [`Upstream::shutdown`].
    pub async fn kill(&self) {
        match &self.transport {
            Transport::Stdio(c) => c.kill_now().await,
            Transport::Http(c) => c.shutdown().await,
        }
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        // stdio: dropping the connection kills the process group (see `stdio`). HTTP: the GET
        // listener would otherwise keep the connection and its stream open.
        if let Transport::Http(h) = &self.transport {
            h.stop_listening();
        }
    }
}

/// Counts a request in flight for as long as it lives.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn new(c: &'a AtomicUsize) -> Self {
        c.fetch_add(1, Ordering::Relaxed);
        InFlight(c)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Check an `initialize` answer: a result with a protocol version Hangar speaks.
fn check_init(server: &str, outcome: Outcome) -> Result<InitInfo, UpstreamError> {
    #[derive(serde::Deserialize)]
    struct Head {
        #[serde(rename = "protocolVersion")]
        protocol_version: Option<serde_json::Value>,
    }
    let bad = |message: String| UpstreamError::Handshake {
        server: server.to_owned(),
        message,
    };
    let result = match outcome {
        Outcome::Result(r) => r,
        Outcome::Error(e) => {
            return Err(bad(format!(
                "the server refused initialize: {} ({})",
                e.message, e.code
            )));
        }
    };
    let head: Head = serde_json::from_str(result.get())
        .map_err(|e| bad(format!("the initialize result is not an object: {e}")))?;
    let version = match head.protocol_version {
        Some(serde_json::Value::String(v)) => v,
        Some(other) => {
            return Err(bad(format!(
                "the initialize result has a non-string protocolVersion {other}"
            )));
        }
        None => return Err(bad("the initialize result has no protocolVersion".into())),
    };
    if !SUPPORTED_PROTOCOL_VERSIONS.contains(&version.as_str()) {
        return Err(bad(format!(
            "the server answered protocol version '{version}', which Hangar does not speak (supported: {})",
            SUPPORTED_PROTOCOL_VERSIONS.join(", ")
        )));
    }
    Ok(InitInfo {
        protocol_version: version,
        result,
    })
}

/// `notifications/cancelled` for one of our request ids.
fn cancelled_notification(id: u64) -> String {
    Message::notification(
        "notifications/cancelled",
        Some(raw(
            &serde_json::json!({"requestId": id, "reason": "the client went away"}),
        )),
    )
    .to_json()
}

/// If params carry `_meta.progressToken`, replace it with a connection-unique token; returns
/// the new params and (new token, original token). Always rewritten when present, so a token a
/// caller chose can never collide with another call's.
fn rewrite_progress(
    params: Option<Box<RawValue>>,
) -> (Option<Box<RawValue>>, Option<ProgressPair>) {
    let Some(p) = params else { return (None, None) };
    if !p.get().contains("progressToken") {
        return (Some(p), None);
    }
    let Ok(mut obj) = serde_json::from_str::<RawObject>(p.get()) else {
        return (Some(p), None);
    };
    let Some(meta) = obj.get("_meta") else {
        return (Some(p), None);
    };
    let Ok(mut meta) = serde_json::from_str::<RawObject>(meta.get()) else {
        return (Some(p), None);
    };
    let Some(original) = meta.get("progressToken").cloned() else {
        return (Some(p), None);
    };
    let token = format!("hgr-p{}", PROGRESS_SEQ.fetch_add(1, Ordering::Relaxed));
    meta.insert(
        "progressToken".to_owned(),
        raw(&serde_json::Value::String(token.clone())),
    );
    obj.insert("_meta".to_owned(), raw_from_object(&meta));
    (Some(raw_from_object(&obj)), Some((token, original)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_tokens_are_rewritten_and_everything_else_is_kept() {
        let p = RawValue::from_string(
            r#"{"name":"x","_meta":{"progressToken":7,"k":1},"z":1e400}"#.into(),
        )
        .unwrap();
        let (out, tok) = rewrite_progress(Some(p));
        let (new, orig) = tok.unwrap();
        assert_eq!(orig.get(), "7");
        assert!(new.starts_with("hgr-p"));
        assert_eq!(
            out.unwrap().get(),
            format!(r#"{{"name":"x","_meta":{{"progressToken":"{new}","k":1}},"z":1e400}}"#)
        );
        let (_, tok2) = rewrite_progress(Some(
            RawValue::from_string(r#"{"_meta":{"progressToken":7}}"#.into()).unwrap(),
        ));
        assert_ne!(tok2.unwrap().0, new, "tokens are unique");
        let plain = RawValue::from_string(r#"{"name":"progressToken"}"#.into()).unwrap();
        let (out, tok) = rewrite_progress(Some(plain));
        assert!(tok.is_none());
        assert_eq!(out.unwrap().get(), r#"{"name":"progressToken"}"#);
    }

    #[test]
    fn init_answers_are_checked() {
        let ok = Outcome::Result(
            RawValue::from_string(r#"{"protocolVersion":"2025-06-18","x":1}"#.into()).unwrap(),
        );
        let info = check_init("s", ok).unwrap();
        assert_eq!(info.protocol_version, "2025-06-18");
        assert_eq!(
            info.result.get(),
            r#"{"protocolVersion":"2025-06-18","x":1}"#
        );
        let unknown = Outcome::Result(
            RawValue::from_string(r#"{"protocolVersion":"1999-01-01"}"#.into()).unwrap(),
        );
        let e = check_init("s", unknown).unwrap_err();
        assert!(matches!(e, UpstreamError::Handshake { .. }));
        assert!(e.to_string().contains("1999-01-01"), "{e}");
        let missing = Outcome::Result(RawValue::from_string("{}".into()).unwrap());
        assert!(
            check_init("s", missing)
                .unwrap_err()
                .to_string()
                .contains("no protocolVersion")
        );
        let refused = Outcome::Error(RpcError::new(-32602, "nope"));
        assert!(
            check_init("s", refused)
                .unwrap_err()
                .to_string()
                .contains("nope")
        );
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let h = HttpSpec {
            endpoint: "https://example.invalid/mcp".into(),
            headers: vec![("Authorization".into(), "Bearer sekrit".into())],
            connect_timeout: Duration::from_secs(1),
            read_timeout: Duration::from_secs(1),
            verify_tls: true,
            ca_cert_path: None,
        };
        let s = StdioSpec {
            argv: vec!["x".into()],
            env: vec![("API_KEY".into(), "sekrit".into())],
            cwd: None,
        };
        let text = format!("{:?} {:?}", TransportSpec::Http(h), TransportSpec::Stdio(s));
        assert!(!text.contains("sekrit"), "{text}");
        assert!(text.contains("Authorization") && text.contains("API_KEY"));
    }

    #[test]
    fn before_send_classification() {
        let s = || "s".to_owned();
        assert!(
            UpstreamError::Spawn {
                server: s(),
                message: s()
            }
            .before_send()
        );
        assert!(
            UpstreamError::Connect {
                server: s(),
                message: s()
            }
            .before_send()
        );
        assert!(
            UpstreamError::Overloaded {
                server: s(),
                message: s()
            }
            .before_send()
        );
        assert!(
            UpstreamError::Closed {
                server: s(),
                message: s(),
                before_send: true
            }
            .before_send()
        );
        assert!(
            !UpstreamError::Closed {
                server: s(),
                message: s(),
                before_send: false
            }
            .before_send()
        );
        assert!(
            !UpstreamError::Timeout {
                server: s(),
                secs: 1.0
            }
            .before_send()
        );
        assert!(
            !UpstreamError::Protocol {
                server: s(),
                message: s()
            }
            .before_send()
        );
        assert!(
            !UpstreamError::Handshake {
                server: s(),
                message: s()
            }
            .before_send()
        );
    }
}
