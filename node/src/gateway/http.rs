//! Streamable HTTP front door: `POST|GET|DELETE /mcp` and `/servers/{id}/mcp`, plus the
//! Host/Origin guard against DNS rebinding.
//!
//! A request is answered with one JSON body when its result arrives before anything else;
//! if the upstream first emits progress, logs or a request for the client (and the client
//! accepts `text/event-stream`), the answer switches to an SSE stream that carries those
//! messages and ends with the response.

pub mod limits;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;

use super::{Ctx, Gateway, Scope, protocol};
use crate::jsonrpc::{
    INVALID_REQUEST, Id, Kind, METHOD_NOT_FOUND, Message, PARSE_ERROR, RpcError, raw_object,
};

/// Shared state of the front-door routes.
#[derive(Clone)]
pub struct FrontDoor {
    /// The gateway.
    pub gateway: Arc<Gateway>,
    /// Maximum request body size in bytes (larger → 413).
    pub max_body: usize,
}

/// The MCP routes.
pub fn routes(state: FrontDoor) -> Router {
    Router::new()
        .route(
            "/mcp",
            post(post_aggregate).get(get_aggregate).delete(delete_mcp),
        )
        .route(
            "/servers/{id}/mcp",
            post(post_server).get(get_server).delete(delete_mcp),
        )
        .with_state(state)
}

/// What the caller may do, when auth is on (set by the auth middleware).
type GrantsExt = Option<axum::Extension<Arc<crate::auth::Grants>>>;
/// Who the caller is for the rate limits (set by the rate-limit middleware).
type CallerExt = Option<axum::Extension<Arc<crate::ratelimit::Caller>>>;

/// What the gateway needs to know of the caller.
#[derive(Clone)]
struct Who {
    grants: Option<Arc<crate::auth::Grants>>,
    caller: Arc<crate::ratelimit::Caller>,
}

impl Who {
    fn of(grants: GrantsExt, caller: CallerExt) -> Who {
        Who {
            grants: grants.map(|g| g.0),
            caller: caller.map_or_else(
                || Arc::new(crate::ratelimit::Caller::of(None, None)),
                |c| c.0,
            ),
        }
    }
}

async fn post_aggregate(
    State(st): State<FrontDoor>,
    grants: GrantsExt,
    caller: CallerExt,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle_post(st, Scope::Aggregate, Who::of(grants, caller), headers, body).await
}

async fn post_server(
    State(st): State<FrontDoor>,
    Path(id): Path<String>,
    grants: GrantsExt,
    caller: CallerExt,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if !st.gateway.runtime().exists(&id) {
        return json_error(
            StatusCode::NOT_FOUND,
            None,
            RpcError::new(
                METHOD_NOT_FOUND,
                format!(
                    "No MCP server or group '{id}' behind this gateway; GET /api/mcp_servers/ lists them"
                ),
            ),
        );
    }
    handle_post(
        st,
        Scope::Server(id),
        Who::of(grants, caller),
        headers,
        body,
    )
    .await
}

async fn delete_mcp() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        [(header::ALLOW, "GET, POST")],
        "This gateway is session-less: there is no session to delete.\n",
    )
        .into_response()
}

fn json_response(status: StatusCode, body: String) -> Response {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn json_error(status: StatusCode, id: Option<Id>, err: RpcError) -> Response {
    json_response(status, Message::error(id, err).to_json())
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

async fn handle_post(
    st: FrontDoor,
    scope: Scope,
    who: Who,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Some(ct) = header_str(&headers, "content-type")
        && !ct.to_ascii_lowercase().starts_with("application/json")
    {
        return json_error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            None,
            RpcError::new(
                INVALID_REQUEST,
                format!("Content-Type must be application/json (got '{ct}')"),
            ),
        );
    }
    let bytes = match axum::body::to_bytes(body, st.max_body).await {
        Ok(b) => b,
        Err(_) => {
            return json_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                None,
                RpcError::new(
                    INVALID_REQUEST,
                    format!(
                        "Request body exceeds the limit of {} bytes (server.max_body_bytes)",
                        st.max_body
                    ),
                ),
            );
        }
    };
    let accept = header_str(&headers, "accept")
        .unwrap_or("")
        .to_ascii_lowercase();
    let accepts_sse = accept.contains("text/event-stream");
    let header_version = header_str(&headers, "mcp-protocol-version").map(str::to_owned);
    if let Some(v) = &header_version
        && !protocol::is_supported(v)
    {
        return json_error(
            StatusCode::BAD_REQUEST,
            None,
            protocol::unsupported_version(v),
        );
    }
    let cancel_key = header_str(&headers, "mcp-session-id")
        .unwrap_or("")
        .to_owned();

    let first = bytes.iter().find(|b| !b.is_ascii_whitespace()).copied();
    if first == Some(b'[') {
        return handle_batch(st, scope, &bytes, cancel_key, who).await;
    }
    let msg: Message = match serde_json::from_slice(&bytes) {
        Ok(m) => m,
        Err(e) => {
            let valid_json = serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_ok();
            let err = if valid_json {
                RpcError::new(
                    INVALID_REQUEST,
                    format!("Invalid Request: not a JSON-RPC 2.0 message ({e})"),
                )
            } else {
                RpcError::new(
                    PARSE_ERROR,
                    format!("Parse error: the body is not valid JSON ({e})"),
                )
            };
            return json_error(StatusCode::BAD_REQUEST, None, err);
        }
    };
    match msg.kind() {
        Kind::Request => {}
        Kind::Invalid => {
            let resp = st
                .gateway
                .handle(&ctx_of(&scope, None, &cancel_key, who.clone()), msg)
                .await;
            let body = resp.map(|m| m.to_json()).unwrap_or_default();
            return json_response(StatusCode::BAD_REQUEST, body);
        }
        Kind::Notification | Kind::Response => {
            st.gateway
                .handle(&ctx_of(&scope, None, &cancel_key, who.clone()), msg)
                .await;
            return StatusCode::ACCEPTED.into_response();
        }
    }
    // Stateless-era requests must agree with the transport header.
    let modern_meta = raw_object(msg.params.as_deref())
        .ok()
        .and_then(|p| protocol::modern_meta(&p).ok().flatten());
    let modern = modern_meta.is_some() || header_version.as_deref() == Some(protocol::MODERN);
    if let Some(meta) = &modern_meta
        && header_version.as_deref() != Some(meta.version.as_str())
    {
        return json_error(
            StatusCode::BAD_REQUEST,
            msg.id.clone(),
            RpcError::new(
                INVALID_REQUEST,
                format!(
                    "The MCP-Protocol-Version header ({}) must match params._meta['{}'] ({})",
                    header_version.as_deref().unwrap_or("absent"),
                    protocol::META_VERSION,
                    meta.version
                ),
            ),
        );
    }

    let (tx, mut rx) = if accepts_sse {
        let (tx, rx) = mpsc::channel::<Message>(64);
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let gw = st.gateway.clone();
    let mut fut: Pin<Box<dyn Future<Output = Option<Message>> + Send>> = Box::pin(async move {
        let ctx = Ctx {
            scope,
            out: tx,
            cancel_key,
            grants: who.grants,
            caller: who.caller,
        };
        gw.handle(&ctx, msg).await
    });
    let first_event = match rx.as_mut() {
        None => None,
        Some(rx) => {
            tokio::select! {
                biased;
                r = &mut fut => {
                    // Messages queued while the call finished still go out, before the answer.
                    let mut early = Vec::new();
                    while let Ok(m) = rx.try_recv() {
                        early.push(m);
                    }
                    if early.is_empty() {
                        return finish_json(r, modern);
                    }
                    return sse_finished(early, r);
                }
                ev = rx.recv() => ev,
            }
        }
    };
    let Some(first_event) = first_event else {
        return finish_json(fut.await, modern);
    };
    let Some(rx) = rx else {
        return finish_json(fut.await, modern);
    };
    sse_response(first_event, fut, rx)
}

fn finish_json(resp: Option<Message>, modern: bool) -> Response {
    let Some(resp) = resp else {
        return StatusCode::ACCEPTED.into_response();
    };
    let status = match (&resp.error, modern) {
        (Some(e), true)
            if e.code == protocol::UNSUPPORTED_VERSION
                || e.code == protocol::MISSING_CAPABILITY =>
        {
            StatusCode::BAD_REQUEST
        }
        (Some(e), true) if e.code == METHOD_NOT_FOUND => StatusCode::NOT_FOUND,
        _ => StatusCode::OK,
    };
    let limited = resp
        .error
        .as_ref()
        .filter(|e| e.code == crate::ratelimit::RATE_LIMITED)
        .and_then(|e| e.data.as_ref())
        .and_then(|d| serde_json::from_str::<serde_json::Value>(d.get()).ok());
    let mut r = json_response(status, resp.to_json());
    if let Some(d) = limited {
        // A refused call answers in the body (JSON-RPC) and, for HTTP clients and
        // balancers, with the same retry headers as a REST 429.
        r.headers_mut()
            .extend(crate::ratelimit::Limited::from_data(&d).headers());
    }
    r
}

fn sse_finished(early: Vec<Message>, resp: Option<Message>) -> Response {
    let events: Vec<Result<Event, Infallible>> = early
        .iter()
        .chain(resp.iter())
        .map(|m| Ok(event(m)))
        .collect();
    Sse::new(futures::stream::iter(events)).into_response()
}

enum SseState {
    Start(
        Message,
        Pin<Box<dyn Future<Output = Option<Message>> + Send>>,
        mpsc::Receiver<Message>,
    ),
    Running(
        Pin<Box<dyn Future<Output = Option<Message>> + Send>>,
        mpsc::Receiver<Message>,
    ),
    Draining(Option<Message>, mpsc::Receiver<Message>),
    Done,
}

fn event(msg: &Message) -> Event {
    Event::default().event("message").data(msg.to_json())
}

fn sse_response(
    first: Message,
    fut: Pin<Box<dyn Future<Output = Option<Message>> + Send>>,
    rx: mpsc::Receiver<Message>,
) -> Response {
    let stream = futures::stream::unfold(SseState::Start(first, fut, rx), |state| async move {
        match state {
            SseState::Start(first, fut, rx) => Some((
                Ok::<_, Infallible>(event(&first)),
                SseState::Running(fut, rx),
            )),
            SseState::Running(mut fut, mut rx) => {
                tokio::select! {
                    biased;
                    ev = rx.recv() => match ev {
                        Some(m) => Some((Ok(event(&m)), SseState::Running(fut, rx))),
                        None => {
                            let r = fut.await;
                            r.map(|m| (Ok(event(&m)), SseState::Done))
                        }
                    },
                    r = &mut fut => {
                        // Deliver anything queued before the response, then the response.
                        match rx.try_recv() {
                            Ok(m) => Some((Ok(event(&m)), SseState::Draining(r, rx))),
                            Err(_) => r.map(|m| (Ok(event(&m)), SseState::Done)),
                        }
                    }
                }
            }
            SseState::Draining(r, mut rx) => match rx.try_recv() {
                Ok(m) => Some((Ok(event(&m)), SseState::Draining(r, rx))),
                Err(_) => r.map(|m| (Ok(event(&m)), SseState::Done)),
            },
            SseState::Done => None,
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

fn ctx_of(scope: &Scope, out: Option<mpsc::Sender<Message>>, key: &str, who: Who) -> Ctx {
    Ctx {
        scope: scope.clone(),
        out,
        cancel_key: key.to_owned(),
        grants: who.grants,
        caller: who.caller,
    }
}

async fn handle_batch(
    st: FrontDoor,
    scope: Scope,
    bytes: &[u8],
    cancel_key: String,
    who: Who,
) -> Response {
    let items: Vec<serde_json::Value> = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                None,
                RpcError::new(
                    PARSE_ERROR,
                    format!("Parse error: the body is not valid JSON ({e})"),
                ),
            );
        }
    };
    if items.is_empty() {
        return json_error(
            StatusCode::BAD_REQUEST,
            None,
            RpcError::new(INVALID_REQUEST, "Invalid Request: empty batch"),
        );
    }
    let ctx = ctx_of(&scope, None, &cancel_key, who.clone());
    let calls = items.into_iter().map(|item| {
        let gw = st.gateway.clone();
        let ctx = &ctx;
        async move {
            match serde_json::from_value::<Message>(item) {
                Ok(m) => gw.handle(ctx, m).await,
                Err(e) => Some(Message::error(
                    None,
                    RpcError::new(INVALID_REQUEST, format!("Invalid Request: {e}")),
                )),
            }
        }
    });
    let responses: Vec<String> = futures::future::join_all(calls)
        .await
        .into_iter()
        .flatten()
        .map(|m| m.to_json())
        .collect();
    if responses.is_empty() {
        return StatusCode::ACCEPTED.into_response();
    }
    json_response(StatusCode::OK, format!("[{}]", responses.join(",")))
}

async fn get_aggregate(State(st): State<FrontDoor>, headers: HeaderMap) -> Response {
    listen(st, None, headers)
}

async fn get_server(
    State(st): State<FrontDoor>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !st.gateway.runtime().exists(&id) {
        return StatusCode::NOT_FOUND.into_response();
    }
    listen(st, Some(id), headers)
}

fn listen(st: FrontDoor, server: Option<String>, headers: HeaderMap) -> Response {
    let accept = header_str(&headers, "accept")
        .unwrap_or("")
        .to_ascii_lowercase();
    if !accept.contains("text/event-stream") {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, "POST")],
            "GET opens a server-notification stream and requires 'Accept: text/event-stream'.\n",
        )
            .into_response();
    }
    let rx = st.gateway.listen();
    let stream = tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(move |item| {
        let server = server.clone();
        async move {
            let b = item.ok()?;
            match &server {
                Some(s) if !b.server.is_empty() && &b.server != s => None,
                _ => Some(Ok::<_, Infallible>(
                    Event::default().event("message").data(&b.json),
                )),
            }
        }
    });
    sse_stream(stream)
}

fn sse_stream<S>(stream: S) -> Response
where
    S: Stream<Item = Result<Event, Infallible>> + Send + 'static,
{
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// Host/Origin allow-lists (DNS-rebinding protection).
#[derive(Debug, Clone)]
pub struct HostGuard {
    hosts: Vec<String>,
    origins: Vec<String>,
    enforce_hosts: bool,
}

const LOOPBACK_NAMES: &[&str] = &["localhost", "127.0.0.1", "::1", "[::1]"];

impl HostGuard {
    /// Build the guard. On a loopback listener the Host header must name a loopback host or
    /// one of `allowed_hosts`; on other listeners only a non-default `allowed_hosts` list is
    /// enforced (`*` disables the check).
    pub fn new(listen: SocketAddr, allowed_hosts: &[String], allowed_origins: &[String]) -> Self {
        let mut hosts: Vec<String> = allowed_hosts
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect();
        let custom = hosts.iter().any(|h| !LOOPBACK_NAMES.contains(&h.as_str()));
        let disabled = hosts.iter().any(|h| h == "*");
        let enforce_hosts = !disabled && (listen.ip().is_loopback() || custom);
        if listen.ip().is_loopback() {
            hosts.extend(LOOPBACK_NAMES.iter().map(|s| (*s).to_owned()));
        }
        HostGuard {
            hosts,
            origins: allowed_origins
                .iter()
                .map(|o| o.to_ascii_lowercase())
                .collect(),
            enforce_hosts,
        }
    }

    fn host_allowed(&self, host: &str) -> bool {
        let host = strip_port(&host.to_ascii_lowercase());
        self.hosts.iter().any(|allowed| {
            if let Some(suffix) = allowed.strip_prefix("*.") {
                host.ends_with(&format!(".{suffix}"))
            } else {
                *allowed == host
            }
        })
    }

    /// Whether a request with these headers may proceed; `Err` says why not.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), GuardRefusal> {
        self.check_with_authority(headers, None)
    }

    /// [`check`](Self::check), the host taken from `authority` (the request URI's) when there
    /// is no `Host` header: HTTP/2 carries the host in `:authority` (negotiated over TLS).
    pub fn check_with_authority(
        &self,
        headers: &HeaderMap,
        authority: Option<&str>,
    ) -> Result<(), GuardRefusal> {
        let host = header_str(headers, "host").or(authority).unwrap_or("");
        if self.enforce_hosts && !self.host_allowed(host) {
            return Err(GuardRefusal::Host(host.to_owned()));
        }
        if let Some(origin) = header_str(headers, "origin") {
            let o = origin.to_ascii_lowercase();
            if o == "null" {
                return Err(GuardRefusal::NullOrigin);
            }
            let origin_host = o.split("://").nth(1).unwrap_or(&o);
            let ok = self.origins.contains(&o) || self.host_allowed(origin_host);
            if !ok {
                return Err(GuardRefusal::Origin(origin.to_owned()));
            }
        }
        Ok(())
    }
}

/// Why the [`HostGuard`] refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuardRefusal {
    /// The Host header names a host this node does not serve.
    #[error("Host '{0}' is not allowed (DNS-rebinding protection); add it to server.allowed_hosts")]
    Host(String),
    /// `Origin: null`.
    #[error("Origin 'null' is not allowed")]
    NullOrigin,
    /// A foreign Origin.
    #[error("Origin '{0}' is not allowed; add it to server.allowed_origins")]
    Origin(String),
}

fn strip_port(host: &str) -> String {
    if let Some(rest) = host.strip_prefix('[') {
        // [::1]:8080
        return match rest.split_once(']') {
            Some((ip, _)) => format!("[{ip}]"),
            None => host.to_owned(),
        };
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) && !h.contains(':') => {
            h.to_owned()
        }
        _ => host.to_owned(),
    }
}

/// Middleware: refuse requests whose Host/Origin fail the guard (421 on MCP paths, 403 for a
/// foreign Origin, 400 elsewhere), with a JSON error saying what to configure.
pub async fn guard(State(g): State<Arc<HostGuard>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if path.starts_with("/health/") || path == "/metrics" {
        return next.run(req).await;
    }
    let authority = req.uri().authority().map(|a| a.as_str());
    if let Err(why) = g.check_with_authority(req.headers(), authority) {
        let path = req.uri().path();
        let status = if matches!(why, GuardRefusal::Origin(_) | GuardRefusal::NullOrigin) {
            StatusCode::FORBIDDEN
        } else if path == "/mcp" || path.starts_with("/servers/") {
            StatusCode::MISDIRECTED_REQUEST
        } else {
            StatusCode::BAD_REQUEST
        };
        tracing::warn!(reason = %why, path, "request_refused_by_host_guard");
        let body = serde_json::json!({"error": {"code": "InvalidHostHeader", "message": why.to_string(), "details": null}});
        return json_response(status, body.to_string());
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(host: &str, origin: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_str(host).unwrap());
        if let Some(o) = origin {
            h.insert("origin", HeaderValue::from_str(o).unwrap());
        }
        h
    }

    #[test]
    fn loopback_listener_refuses_foreign_hosts() {
        let g = HostGuard::new("127.0.0.1:8000".parse().unwrap(), &[], &[]);
        assert!(g.check(&headers("127.0.0.1:8000", None)).is_ok());
        assert!(g.check(&headers("localhost", None)).is_ok());
        assert!(g.check(&headers("[::1]:8000", None)).is_ok());
        assert!(g.check(&headers("evil.com", None)).is_err());
        assert!(
            g.check(&headers("localhost:8000", Some("http://localhost:5173")))
                .is_ok()
        );
        assert!(
            g.check(&headers("localhost:8000", Some("https://evil.com")))
                .is_err()
        );
    }

    #[test]
    fn custom_hosts_and_wildcards() {
        let g = HostGuard::new(
            "0.0.0.0:8000".parse().unwrap(),
            &["*.example.com".into()],
            &[],
        );
        assert!(g.check(&headers("api.example.com:443", None)).is_ok());
        assert!(g.check(&headers("evil.com", None)).is_err());
        let open = HostGuard::new("0.0.0.0:8000".parse().unwrap(), &[], &[]);
        assert!(open.check(&headers("anything", None)).is_ok());
    }

    #[test]
    fn http2_authority_stands_for_a_missing_host_header() {
        let g = HostGuard::new("127.0.0.1:8000".parse().unwrap(), &[], &[]);
        let none = HeaderMap::new();
        assert!(
            g.check_with_authority(&none, Some("127.0.0.1:8000"))
                .is_ok()
        );
        assert!(g.check_with_authority(&none, Some("evil.com")).is_err());
        assert!(g.check_with_authority(&none, None).is_err());
        // A Host header wins over the authority.
        let h = headers("evil.com", None);
        assert!(g.check_with_authority(&h, Some("localhost")).is_err());
    }
}
