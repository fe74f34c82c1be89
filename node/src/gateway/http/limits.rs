//! Limits on every request of the node's HTTP listener (plain HTTP and HTTPS alike, MCP and
//! `/api`):
//!
//! * **headers** ([`headers`], the outermost layer): the header fields of a request may total
//!   at most `server.max_header_bytes` (names and values; default 16 KiB) → 431. HTTP/2
//!   connections are also held to hyper's own 16 KiB header list; HTTP/1 requests whose head
//!   exceeds hyper's buffer (about 400 KiB) are refused by hyper with 431 before reaching it.
//! * **bodies** ([`bodies`], the innermost layer, after authentication): an MCP or `/api`
//!   body may be at most `server.max_body_bytes` → 413, and a JSON body may nest `[`/`{` at
//!   most `server.max_json_depth` levels → 400 (JSON-RPC `-32600` on MCP paths), found by a
//!   byte scan before anything parses it.
//! * **REST deadline**: an `/api` request that has not produced its answer within
//!   `server.request_timeout_s` gets 504 (forwarded MCP calls have the same deadline in the
//!   gateway). The answer's body is not limited: an SSE stream runs as long as it likes.
//!
//! The settings are read at start; changing them needs a restart.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use bytes::{Bytes, BytesMut};

use crate::config::ServerConfig;
use crate::jsonrpc::{INVALID_REQUEST, Message, RpcError};

/// The limits in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest request body (bytes).
    pub max_body: usize,
    /// Deepest JSON nesting.
    pub max_json_depth: usize,
    /// Largest total of header fields (bytes).
    pub max_header_bytes: usize,
    /// Deadline of a REST request.
    pub rest_timeout: Duration,
}

impl Limits {
    /// The limits `server:` sets.
    pub fn of(server: &ServerConfig) -> Limits {
        Limits {
            max_body: server.max_body_bytes,
            max_json_depth: server.max_json_depth,
            max_header_bytes: server.max_header_bytes,
            rest_timeout: server.request_timeout,
        }
    }
}

/// Whether JSON text nests `[`/`{` more than `max` levels deep (brackets inside strings do
/// not count). A single pass over the bytes, without validating the JSON: the parser that
/// runs afterwards reports syntax errors.
pub fn nesting_exceeds(bytes: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in bytes {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Bytes of a request's header fields as sent on HTTP/1 (`name: value\r\n`).
pub fn header_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum()
}

fn is_mcp(path: &str) -> bool {
    path == "/mcp" || (path.starts_with("/servers/") && path.ends_with("/mcp"))
}

fn is_api(path: &str) -> bool {
    path == "/api" || path.starts_with("/api/")
}

/// A refusal in the shape of the path's protocol: a JSON-RPC error (`-32600`, id null) on
/// MCP paths, MCP Hangar's REST envelope elsewhere.
pub fn refusal(path: &str, status: StatusCode, code: &str, message: String) -> Response {
    let body = if is_mcp(path) {
        Message::error(None, RpcError::new(INVALID_REQUEST, message)).to_json()
    } else {
        serde_json::json!({"error": {"code": code, "message": message, "details": null}})
            .to_string()
    };
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Middleware: refuse a request whose header fields are too large (431).
pub async fn headers(State(l): State<Limits>, req: Request, next: Next) -> Response {
    let n = header_bytes(req.headers());
    if n > l.max_header_bytes {
        let path = req.uri().path();
        tracing::warn!(
            path,
            bytes = n,
            limit = l.max_header_bytes,
            "request_headers_too_large"
        );
        let mut r = refusal(
            path,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "RequestHeaderFieldsTooLarge",
            format!(
                "Request header fields total {n} bytes, above the limit of {} bytes (server.max_header_bytes)",
                l.max_header_bytes
            ),
        );
        if req.version() <= axum::http::Version::HTTP_11 {
            // The body is not read: the connection cannot carry another request.
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        return r;
    }
    next.run(req).await
}

fn json_content(headers: &HeaderMap, bytes: &[u8]) -> bool {
    match headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        Some(ct) => ct.to_ascii_lowercase().contains("json"),
        None => matches!(
            bytes.iter().find(|b| !b.is_ascii_whitespace()),
            Some(b'{' | b'[')
        ),
    }
}

/// How much of a body above the limit is still read (and dropped) so that the client, still
/// sending, gets to read the 413 instead of a reset connection.
const DRAIN_BYTES: usize = 8 * 1024 * 1024;
/// How long that may take.
const DRAIN_TIME: Duration = Duration::from_secs(2);

/// Why a body was not read.
enum Unread {
    /// Above the limit.
    TooLarge,
    /// The connection failed.
    Failed(String),
}

/// The body, if it fits in `max` bytes (`declared_over`: its Content-Length says it does
/// not). A body above the limit is drained (up to [`DRAIN_BYTES`] / [`DRAIN_TIME`]).
async fn read_limited(mut body: Body, max: usize, declared_over: bool) -> Result<Bytes, Unread> {
    use http_body_util::BodyExt;
    let mut buf = BytesMut::new();
    let mut over = declared_over;
    let mut drained = 0usize;
    let deadline = tokio::time::Instant::now() + DRAIN_TIME;
    loop {
        let frame = if over {
            match tokio::time::timeout_at(deadline, body.frame()).await {
                Ok(f) => f,
                Err(_) => break,
            }
        } else {
            body.frame().await
        };
        match frame {
            None => break,
            Some(Err(_)) if over => break,
            Some(Err(e)) => return Err(Unread::Failed(e.to_string())),
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if over {
                    drained += data.len();
                    if drained > DRAIN_BYTES {
                        break;
                    }
                } else if buf.len() + data.len() > max {
                    over = true;
                    drained = buf.len() + data.len();
                    buf = BytesMut::new();
                } else {
                    buf.extend_from_slice(&data);
                }
            }
        }
    }
    if over {
        Err(Unread::TooLarge)
    } else {
        Ok(buf.freeze())
    }
}

/// Read the body within the limit and check its nesting; the request again with the body
/// read, or the refusal.
async fn checked_body(req: Request, l: &Limits) -> Result<Request, Response> {
    let path = req.uri().path().to_owned();
    let declared_over = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > l.max_body as u64);
    let (parts, body) = req.into_parts();
    let bytes = match read_limited(body, l.max_body, declared_over).await {
        Ok(b) => b,
        Err(Unread::TooLarge) => {
            let mut r = refusal(
                &path,
                StatusCode::PAYLOAD_TOO_LARGE,
                "PayloadTooLarge",
                format!(
                    "Request body exceeds the limit of {} bytes (server.max_body_bytes)",
                    l.max_body
                ),
            );
            if parts.version <= axum::http::Version::HTTP_11 {
                r.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            return Err(r);
        }
        Err(Unread::Failed(why)) => {
            return Err(refusal(
                &path,
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!("The request body could not be read: {why}"),
            ));
        }
    };
    if json_content(&parts.headers, &bytes) && nesting_exceeds(&bytes, l.max_json_depth) {
        tracing::warn!(path, limit = l.max_json_depth, "request_json_too_deep");
        let message = format!(
            "Invalid Request: the JSON body nests deeper than {} levels (server.max_json_depth)",
            l.max_json_depth
        );
        return Err(refusal(
            &path,
            StatusCode::BAD_REQUEST,
            "ValidationError",
            message,
        ));
    }
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

/// Middleware: body size and JSON depth of MCP and `/api` requests, and the REST deadline.
pub async fn bodies(State(l): State<Limits>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    let (mcp, api) = (is_mcp(&path), is_api(&path));
    if !mcp && !api {
        return next.run(req).await;
    }
    let req = if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        req
    } else {
        match checked_body(req, &l).await {
            Ok(r) => r,
            Err(refused) => return refused,
        }
    };
    if !api {
        return next.run(req).await;
    }
    match tokio::time::timeout(l.rest_timeout, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => {
            tracing::warn!(
                path,
                timeout_s = l.rest_timeout.as_secs_f64(),
                "rest_request_timed_out"
            );
            refusal(
                &path,
                StatusCode::GATEWAY_TIMEOUT,
                "RequestTimeout",
                format!(
                    "The request did not complete within {:.1}s (server.request_timeout_s); what it asked for may still take effect",
                    l.rest_timeout.as_secs_f64()
                ),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(n: usize) -> String {
        format!("{}{}", "[".repeat(n), "]".repeat(n))
    }

    #[test]
    fn depth_counts_brackets_and_braces_outside_strings() {
        assert!(!nesting_exceeds(nested(64).as_bytes(), 64));
        assert!(nesting_exceeds(nested(65).as_bytes(), 64));
        assert!(!nesting_exceeds(b"{\"a\":{\"b\":[1,2,{}]}}", 4));
        assert!(nesting_exceeds(b"{\"a\":{\"b\":[1,2,{}]}}", 3));
        // Brackets in strings, escaped quotes included, do not count.
        let s = format!("{{\"s\":\"{}\\\"{}\"}}", "[".repeat(500), "{".repeat(500));
        assert!(!nesting_exceeds(s.as_bytes(), 1));
        assert!(!nesting_exceeds(br#"["\\", "[[["]"#, 1));
        // Siblings do not add up.
        assert!(!nesting_exceeds("[[],[],[],[]]".repeat(100).as_bytes(), 2));
        // Not JSON at all: the parser will say so.
        assert!(!nesting_exceeds(b"]]]]}}", 1));
        assert!(!nesting_exceeds(b"", 1));
    }

    #[test]
    fn limits_come_from_the_server_section_with_defaults() {
        let load = |y: &str| crate::config::load_str(y, &|_| None);
        let d = Limits::of(&load("mcp_servers: {}\n").unwrap().server);
        assert_eq!(
            (d.max_json_depth, d.max_header_bytes, d.max_body),
            (64, 16 * 1024, 4 * 1024 * 1024)
        );
        assert_eq!(d.rest_timeout, Duration::from_secs(60));
        let c = load("server: {max_json_depth: 10, max_header_bytes: 2048, request_timeout_s: 5}\nmcp_servers: {}\n")
            .unwrap();
        let l = Limits::of(&c.server);
        assert_eq!((l.max_json_depth, l.max_header_bytes), (10, 2048));
        assert_eq!(l.rest_timeout, Duration::from_secs(5));
        let e = load("server: {max_json_depth: 1, max_header_bytes: 10}\nmcp_servers: {}\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("server.max_json_depth: must be between 2"),
            "{e}"
        );
        assert!(
            e.contains("server.max_header_bytes: must be between 1024"),
            "{e}"
        );
    }

    #[test]
    fn header_bytes_count_names_and_values() {
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("12345"));
        h.insert("host", HeaderValue::from_static("localhost"));
        assert_eq!(header_bytes(&h), (3 + 5 + 4) + (4 + 9 + 4));
    }

    #[test]
    fn refusals_speak_the_paths_protocol() {
        let r = refusal(
            "/servers/x/mcp",
            StatusCode::BAD_REQUEST,
            "ValidationError",
            "too deep".into(),
        );
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert!(is_mcp("/mcp") && is_mcp("/servers/a/mcp") && !is_mcp("/api/mcp_servers/"));
        assert!(is_api("/api/tools/") && !is_api("/apix"));
        let mut h = HeaderMap::new();
        assert!(json_content(&h, b" {\"a\":1}"));
        assert!(!json_content(&h, b"mcp_servers: {}"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/yaml"));
        assert!(!json_content(&h, b"{}"));
    }
}
