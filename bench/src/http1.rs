//! A minimal HTTP/1.1 client for one thing: POST a pre-serialised JSON-RPC body on a keep-alive
//! connection and read back the JSON or SSE answer. No TLS, no redirects, no compression.
//! Cheaper than a general client because every buffer is reused and nothing is parsed twice.

use tokio::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::load::{CallResult, Caller};
use crate::rpc::{CallError, CallTemplate, ErrorKind, Reply, parse_reply, push_u64, snippet};
use crate::sse;

/// Largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;

/// A URL this client cannot use.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    /// Not `http://host:port/path`.
    #[error(
        "bad URL '{0}': expected http://HOST[:PORT]/PATH (https is not supported by the load generator)"
    )]
    Bad(String),
}

/// A parsed `http://` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Url {
    /// `host:port`, used for connecting and as the `Host` header.
    pub authority: String,
    /// The path (with query), starting with `/`.
    pub path: String,
}

/// Parse `http://host[:port][/path]` (port defaults to 80, path to `/`).
pub fn parse_url(s: &str) -> Result<Url, UrlError> {
    let bad = || UrlError::Bad(s.to_owned());
    let rest = s.strip_prefix("http://").ok_or_else(bad)?;
    let (auth, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if auth.is_empty() || auth.contains('@') || path.contains(char::is_whitespace) {
        return Err(bad());
    }
    let has_port = match auth.rfind(':') {
        Some(i) => !auth[i..].contains(']'),
        None => false,
    };
    let authority = if has_port {
        let port = &auth[auth.rfind(':').map_or(0, |i| i + 1)..];
        port.parse::<u16>().map_err(|_| bad())?;
        auth.to_owned()
    } else {
        format!("{auth}:80")
    };
    Ok(Url {
        authority,
        path: path.to_owned(),
    })
}

/// A response could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HttpError {
    /// The status line or a header is malformed.
    #[error("malformed HTTP response: {0}")]
    Malformed(String),
    /// The head is larger than 64 KiB.
    #[error("HTTP response head larger than 64 KiB")]
    HeadTooLarge,
    /// A chunk of a chunked body is malformed.
    #[error("malformed chunked body: {0}")]
    Chunked(String),
}

/// How the body is framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// `Content-Length: n` (or no body: 0).
    Length(usize),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Neither: the body ends when the server closes the connection.
    UntilClose,
}

/// What the body contains, from `Content-Type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    /// `application/json` (or anything that is not SSE).
    Json,
    /// `text/event-stream`.
    Sse,
}

/// The parts of a response head the client uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    /// Status code.
    pub status: u16,
    /// Body framing.
    pub framing: Framing,
    /// Body content kind.
    pub kind: BodyKind,
    /// The server will close the connection after this response.
    pub close: bool,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &b[start..end.max(start)]
}

fn contains_ci(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

/// Parse the response head at the start of `buf`. `Ok(None)` means "need more bytes";
/// `Ok(Some((head, n)))` means the head is the first `n` bytes.
pub fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, HttpError> {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        return if buf.len() > MAX_HEAD {
            Err(HttpError::HeadTooLarge)
        } else {
            Ok(None)
        };
    };
    let mut lines = buf[..end]
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let status_line = lines.next().unwrap_or_default();
    let malformed =
        |what: &str, line: &[u8]| HttpError::Malformed(format!("{what}: {}", snippet(line, 100)));
    let mut parts = status_line.splitn(3, |&b| b == b' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with(b"HTTP/1.") {
        return Err(malformed("not an HTTP/1.x status line", status_line));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| malformed("bad status code", status_line))?;
    let mut close = version == b"HTTP/1.0";
    let mut length: Option<usize> = None;
    let mut chunked = false;
    let mut kind = BodyKind::Json;
    for line in lines {
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or_else(|| malformed("header without a colon", line))?;
        let (name, value) = (&line[..colon], trim(&line[colon + 1..]));
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = std::str::from_utf8(value)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| malformed("bad Content-Length", line))?;
            length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            chunked = contains_ci(value, b"chunked");
        } else if name.eq_ignore_ascii_case(b"content-type") {
            if contains_ci(value, b"text/event-stream") {
                kind = BodyKind::Sse;
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            if contains_ci(value, b"close") {
                close = true;
            } else if contains_ci(value, b"keep-alive") {
                close = false;
            }
        }
    }
    let framing = if (100..200).contains(&status) || status == 204 || status == 304 {
        Framing::Length(0)
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        close = true;
        Framing::UntilClose
    };
    Ok(Some((
        Head {
            status,
            framing,
            kind,
            close,
        },
        end + 4,
    )))
}

/// Decode a complete chunked body at the start of `buf` into `out` (cleared first).
/// `Ok(None)` means "need more bytes"; `Ok(Some(n))` means the body took `n` bytes of `buf`.
pub fn decode_chunked(buf: &[u8], out: &mut Vec<u8>) -> Result<Option<usize>, HttpError> {
    out.clear();
    let mut pos = 0;
    loop {
        let Some(eol) = find(&buf[pos..], b"\r\n") else {
            return if buf.len() - pos > 1024 {
                Err(HttpError::Chunked("chunk size line too long".into()))
            } else {
                Ok(None)
            };
        };
        let line = &buf[pos..pos + eol];
        let size_part = trim(line.split(|&b| b == b';').next().unwrap_or_default());
        let size = std::str::from_utf8(size_part)
            .ok()
            .and_then(|s| usize::from_str_radix(s, 16).ok())
            .ok_or_else(|| HttpError::Chunked(format!("bad chunk size '{}'", snippet(line, 40))))?;
        pos += eol + 2;
        if size == 0 {
            // Trailers (usually none), then an empty line.
            loop {
                let Some(eol) = find(&buf[pos..], b"\r\n") else {
                    return Ok(None);
                };
                pos += eol + 2;
                if eol == 0 {
                    return Ok(Some(pos));
                }
            }
        }
        if buf.len() < pos + size + 2 {
            return Ok(None);
        }
        if &buf[pos + size..pos + size + 2] != b"\r\n" {
            return Err(HttpError::Chunked("chunk not followed by CRLF".into()));
        }
        out.extend_from_slice(&buf[pos..pos + size]);
        pos += size + 2;
    }
}

/// The outcome of one HTTP answer to a JSON-RPC request with id `id`.
pub fn classify(status: u16, kind: BodyKind, body: &[u8], id: u64) -> Result<(), CallError> {
    if !(200..300).contains(&status) {
        return Err(CallError::new(
            ErrorKind::Http,
            format!("HTTP {status}: {}", snippet(body, 300)),
        ));
    }
    if kind == BodyKind::Sse {
        return sse::find_response(body, id);
    }
    if body.is_empty() {
        return Err(CallError::new(
            ErrorKind::Transport,
            format!("HTTP {status} with an empty body: no JSON-RPC response"),
        ));
    }
    match parse_reply(body) {
        Ok(Reply::Response { id: got, outcome }) if got.is_none_or(|g| g == id) => outcome,
        Ok(other) => Err(CallError::new(
            ErrorKind::Transport,
            format!("expected the response to id {id}, got {other:?}"),
        )),
        Err(e) => Err(CallError::new(
            ErrorKind::Transport,
            format!("bad JSON body ({e}): {}", snippet(body, 200)),
        )),
    }
}

/// The outcome of a plain REST answer: any 2xx status is a success, the body is not parsed.
pub fn classify_status(status: u16, body: &[u8]) -> Result<(), CallError> {
    if (200..300).contains(&status) {
        Ok(())
    } else {
        Err(CallError::new(
            ErrorKind::Http,
            format!("HTTP {status}: {}", snippet(body, 300)),
        ))
    }
}

/// How [`RawClient`] judges an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// A JSON-RPC response (JSON or SSE) to the request's id, see [`classify`].
    JsonRpc,
    /// Any 2xx status, see [`classify_status`].
    Status2xx,
}

/// Where and how to POST.
#[derive(Clone, Debug)]
pub struct HttpTarget {
    /// The endpoint.
    pub url: Url,
    /// Value of the `MCP-Protocol-Version` header (empty: no such header).
    pub protocol_version: String,
    /// Extra headers (e.g. `X-API-Key`).
    pub headers: Vec<(String, String)>,
}

impl HttpTarget {
    /// The request head up to and including `Content-Length: ` (the length follows).
    fn head_prefix(&self) -> Vec<u8> {
        let mut h = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Accept: application/json, text/event-stream\r\n",
            self.url.path, self.url.authority
        );
        if !self.protocol_version.is_empty() {
            h.push_str("MCP-Protocol-Version: ");
            h.push_str(&self.protocol_version);
            h.push_str("\r\n");
        }
        for (k, v) in &self.headers {
            h.push_str(k);
            h.push_str(": ");
            h.push_str(v);
            h.push_str("\r\n");
        }
        h.push_str("Content-Length: ");
        h.into_bytes()
    }
}

/// One keep-alive connection, one request at a time.
pub struct RawClient {
    authority: String,
    head: Vec<u8>,
    template: CallTemplate,
    expect: Expect,
    stream: Option<TcpStream>,
    out: Vec<u8>,
    inbuf: Vec<u8>,
    body: Vec<u8>,
    next_id: u64,
    /// A call was abandoned mid-flight (timeout): the connection state is unknown.
    dirty: bool,
    reused: bool,
}

enum Failure {
    /// Nothing came back on a reused connection: the server may have closed it while idle.
    Stale(CallError),
    /// Anything else.
    Other(CallError),
}

fn io_err(what: &str, e: &std::io::Error) -> CallError {
    CallError::new(ErrorKind::Transport, format!("{what}: {e}"))
}

impl RawClient {
    /// A client for `target` sending `template`; ids start at `first_id` and increase.
    pub fn new(target: &HttpTarget, template: CallTemplate, first_id: u64) -> Self {
        Self {
            authority: target.url.authority.clone(),
            head: target.head_prefix(),
            template,
            expect: Expect::JsonRpc,
            stream: None,
            out: Vec::with_capacity(1024),
            inbuf: Vec::with_capacity(16 * 1024),
            body: Vec::with_capacity(16 * 1024),
            next_id: first_id,
            dirty: false,
            reused: false,
        }
    }

    /// A client for a plain REST endpoint (e.g. `POST /api/auth/keys`): the body is `template`
    /// with the id spliced in, and any 2xx answer is a success.
    pub fn rest(target: &HttpTarget, template: CallTemplate, first_id: u64) -> Self {
        Self {
            expect: Expect::Status2xx,
            ..Self::new(target, template, first_id)
        }
    }

    /// Send one request and classify the answer.
    pub async fn call_once(&mut self) -> Result<(), CallError> {
        if self.dirty {
            self.stream = None;
        }
        self.dirty = true;
        let id = self.next_id;
        self.next_id += 1;
        self.out.clear();
        self.out.extend_from_slice(&self.head);
        push_u64(&mut self.out, self.template.len_with(id) as u64);
        self.out.extend_from_slice(b"\r\n\r\n");
        self.template.write(id, &mut self.out);
        let mut result = self.exchange().await;
        if let Err(Failure::Stale(_)) = result {
            self.stream = None;
            result = self.exchange().await;
        }
        self.dirty = false;
        match result {
            Ok((status, kind)) => match self.expect {
                Expect::JsonRpc => classify(status, kind, &self.body, id),
                Expect::Status2xx => classify_status(status, &self.body),
            },
            Err(Failure::Stale(e) | Failure::Other(e)) => {
                self.stream = None;
                Err(e)
            }
        }
    }

    /// Write `self.out`, read one response; the body ends up in `self.body`.
    async fn exchange(&mut self) -> Result<(u16, BodyKind), Failure> {
        let stream = match &mut self.stream {
            Some(s) => s,
            None => {
                let s = TcpStream::connect(&self.authority).await.map_err(|e| {
                    Failure::Other(io_err(&format!("connect to {}", self.authority), &e))
                })?;
                s.set_nodelay(true)
                    .map_err(|e| Failure::Other(io_err("set TCP_NODELAY", &e)))?;
                self.reused = false;
                self.stream.insert(s)
            }
        };
        let reused = self.reused;
        self.reused = true;
        if let Err(e) = stream.write_all(&self.out).await {
            let err = io_err("write request", &e);
            return Err(if reused {
                Failure::Stale(err)
            } else {
                Failure::Other(err)
            });
        }
        self.inbuf.clear();
        let mut head: Option<(Head, usize)> = None;
        loop {
            if head.is_none() {
                head = parse_head(&self.inbuf).map_err(|e| {
                    Failure::Other(CallError::new(ErrorKind::Transport, e.to_string()))
                })?;
                // Skip interim 1xx responses.
                if let Some((h, n)) = head
                    && (100..200).contains(&h.status)
                {
                    self.inbuf.drain(..n);
                    head = None;
                    continue;
                }
            }
            if let Some((h, n)) = head {
                let have = &self.inbuf[n..];
                let done = match h.framing {
                    Framing::Length(len) if have.len() >= len => {
                        self.body.clear();
                        self.body.extend_from_slice(&have[..len]);
                        true
                    }
                    Framing::Length(_) | Framing::UntilClose => false,
                    Framing::Chunked => decode_chunked(have, &mut self.body)
                        .map_err(|e| {
                            Failure::Other(CallError::new(ErrorKind::Transport, e.to_string()))
                        })?
                        .is_some(),
                };
                if done {
                    if h.close {
                        self.stream = None;
                    }
                    return Ok((h.status, h.kind));
                }
            }
            let n = match stream.read_buf(&mut self.inbuf).await {
                Ok(n) => n,
                Err(e) => {
                    let err = io_err("read response", &e);
                    return Err(if reused && self.inbuf.is_empty() {
                        Failure::Stale(err)
                    } else {
                        Failure::Other(err)
                    });
                }
            };
            if n == 0 {
                if let Some((h, hn)) = head
                    && h.framing == Framing::UntilClose
                {
                    self.body.clear();
                    self.body.extend_from_slice(&self.inbuf[hn..]);
                    self.stream = None;
                    return Ok((h.status, h.kind));
                }
                let err = CallError::new(
                    ErrorKind::Transport,
                    format!(
                        "connection closed by the server after {} bytes of response",
                        self.inbuf.len()
                    ),
                );
                return Err(if reused && self.inbuf.is_empty() {
                    Failure::Stale(err)
                } else {
                    Failure::Other(err)
                });
            }
        }
    }
}

/// Largest response accepted by [`simple_request`].
const MAX_SIMPLE_RESPONSE: usize = 4 * 1024 * 1024;

/// One request on a fresh connection (`Connection: close`), for control calls such as
/// `POST /api/mcp_servers/{id}/stop`: returns the status and the decoded body.
pub async fn simple_request(
    authority: &str,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> Result<(u16, Vec<u8>), CallError> {
    let mut s = TcpStream::connect(authority)
        .await
        .map_err(|e| io_err(&format!("connect to {authority}"), &e))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    let mut req = format!("{req}Content-Length: {}\r\n\r\n", body.len()).into_bytes();
    req.extend_from_slice(body);
    s.write_all(&req)
        .await
        .map_err(|e| io_err("write request", &e))?;
    let bad = |e: HttpError| CallError::new(ErrorKind::Transport, e.to_string());
    let mut buf = Vec::with_capacity(4096);
    let mut body = Vec::new();
    let mut eof = false;
    loop {
        if let Some((head, n)) = parse_head(&buf).map_err(bad)? {
            let rest = &buf[n..];
            let done = match head.framing {
                Framing::Length(len) if rest.len() >= len => {
                    body.extend_from_slice(&rest[..len]);
                    true
                }
                Framing::UntilClose if eof => {
                    body.extend_from_slice(rest);
                    true
                }
                Framing::Chunked => decode_chunked(rest, &mut body).map_err(bad)?.is_some(),
                Framing::Length(_) | Framing::UntilClose => false,
            };
            if done {
                return Ok((head.status, body));
            }
        }
        if eof {
            return Err(CallError::new(
                ErrorKind::Transport,
                format!("incomplete HTTP response: {}", snippet(&buf, 200)),
            ));
        }
        if buf.len() > MAX_SIMPLE_RESPONSE {
            return Err(CallError::new(
                ErrorKind::Transport,
                "response larger than 4 MiB",
            ));
        }
        let n = s
            .read_buf(&mut buf)
            .await
            .map_err(|e| io_err("read response", &e))?;
        eof = n == 0;
    }
}

impl Caller for RawClient {
    async fn call(&mut self) -> CallResult {
        let outcome = self.call_once().await;
        CallResult {
            outcome,
            done: Instant::now(),
        }
    }
}

#[cfg(test)]
mod tests;
