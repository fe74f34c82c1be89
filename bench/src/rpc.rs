//! JSON-RPC bits the load generator needs: a pre-serialised `tools/call` request whose only
//! varying part is the id, a cheap classifier for replies, and the error kinds we count.

use std::fmt;

use serde::Deserialize;

/// The request could not be built from the command line.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// `--args` is not a JSON object.
    #[error("--args must be a JSON object such as '{{\"message\":\"hi\"}}' (got: {0})")]
    ArgsNotObject(String),
    /// Serialisation failed (should not happen for JSON values).
    #[error("cannot serialise the request: {0}")]
    Json(#[from] serde_json::Error),
}

/// A JSON-RPC request serialised once; [`CallTemplate::write`] splices in the id.
#[derive(Clone, Debug)]
pub struct CallTemplate {
    prefix: Vec<u8>,
    suffix: Vec<u8>,
}

impl CallTemplate {
    /// `tools/call` of `tool` with `arguments` (must be a JSON object).
    pub fn tools_call(tool: &str, arguments: &serde_json::Value) -> Result<Self, TemplateError> {
        if !arguments.is_object() {
            return Err(TemplateError::ArgsNotObject(arguments.to_string()));
        }
        let params = serde_json::json!({ "name": tool, "arguments": arguments });
        Self::request("tools/call", &params)
    }

    /// Any request with the given method and params.
    pub fn request(method: &str, params: &serde_json::Value) -> Result<Self, TemplateError> {
        let method = serde_json::to_string(method)?;
        let params = serde_json::to_string(params)?;
        Ok(Self {
            prefix: br#"{"jsonrpc":"2.0","id":"#.to_vec(),
            suffix: format!(r#","method":{method},"params":{params}}}"#).into_bytes(),
        })
    }

    /// Any body whose only varying part is a decimal number between `prefix` and `suffix`,
    /// e.g. a REST body `{"name":"bench-` + id + `"}`.
    pub fn around_id(prefix: &str, suffix: &str) -> Self {
        Self {
            prefix: prefix.as_bytes().to_vec(),
            suffix: suffix.as_bytes().to_vec(),
        }
    }

    /// Append the request with this id to `out`.
    pub fn write(&self, id: u64, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.prefix);
        push_u64(out, id);
        out.extend_from_slice(&self.suffix);
    }

    /// Length in bytes of the request with this id.
    pub fn len_with(&self, id: u64) -> usize {
        self.prefix.len() + digits(id) + self.suffix.len()
    }
}

/// Append the decimal form of `n` without allocating.
pub fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&tmp[i..]);
}

fn digits(mut n: u64) -> usize {
    let mut d = 1;
    while n >= 10 {
        n /= 10;
        d += 1;
    }
    d
}

/// What kind of failure a call had.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// A JSON-RPC error response.
    Rpc,
    /// A `tools/call` result with `isError: true`.
    Tool,
    /// An HTTP status other than 2xx.
    Http,
    /// Connection, pipe or framing failure; an unparsable or missing reply.
    Transport,
    /// No reply within `--timeout`.
    Timeout,
}

/// A failed call: its kind and a short description (kept for the first error of a run).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallError {
    /// The kind, used for the per-kind counters.
    pub kind: ErrorKind,
    /// What happened.
    pub detail: String,
}

impl CallError {
    /// A new error.
    pub fn new(kind: ErrorKind, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.detail)
    }
}

/// One message read from a server, classified.
#[derive(Debug, PartialEq)]
pub enum Reply {
    /// A response to one of our requests (`id` as u64 when it is a non-negative integer).
    Response {
        /// The id, if numeric.
        id: Option<u64>,
        /// Success, JSON-RPC error or tool error.
        outcome: Result<(), CallError>,
    },
    /// A request from the server (it expects an answer).
    Request {
        /// The id, verbatim.
        id: serde_json::Value,
        /// The method.
        method: String,
    },
    /// A notification from the server.
    Notification,
}

#[derive(Deserialize)]
struct Probe {
    #[serde(default)]
    id: Option<serde_json::Value>,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    result: Option<ResultProbe>,
    #[serde(default)]
    error: Option<ErrorProbe>,
}

#[derive(Deserialize)]
struct ResultProbe {
    #[serde(default, rename = "isError")]
    is_error: Option<bool>,
}

#[derive(Deserialize)]
struct ErrorProbe {
    #[serde(default)]
    code: i64,
    #[serde(default)]
    message: String,
}

/// Classify one JSON-RPC message. Only the envelope and `result.isError` are looked at.
pub fn parse_reply(bytes: &[u8]) -> Result<Reply, serde_json::Error> {
    let p: Probe = serde_json::from_slice(bytes)?;
    if let Some(method) = p.method {
        return Ok(match p.id {
            Some(id) if !id.is_null() => Reply::Request { id, method },
            _ => Reply::Notification,
        });
    }
    let id = p.id.as_ref().and_then(serde_json::Value::as_u64);
    let outcome = match (p.error, p.result) {
        (Some(e), _) => Err(CallError::new(
            ErrorKind::Rpc,
            format!("JSON-RPC error {}: {}", e.code, e.message),
        )),
        (
            None,
            Some(ResultProbe {
                is_error: Some(true),
            }),
        ) => Err(CallError::new(
            ErrorKind::Tool,
            format!("tool result has isError: true: {}", tool_error_text(bytes)),
        )),
        (None, _) => Ok(()),
    };
    Ok(Reply::Response { id, outcome })
}

/// The text content of an error result (parsed again in full: errors are rare).
fn tool_error_text(bytes: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(bytes).unwrap_or_default();
    let texts: Vec<&str> = v["result"]["content"]
        .as_array()
        .map(|items| items.iter().filter_map(|c| c["text"].as_str()).collect())
        .unwrap_or_default();
    if texts.is_empty() {
        "(no text content)".to_owned()
    } else {
        snippet(texts.join(" ").as_bytes(), 300)
    }
}

/// Bytes shortened for an error message (lossy UTF-8, at most `max` bytes).
pub fn snippet(bytes: &[u8], max: usize) -> String {
    let cut = &bytes[..bytes.len().min(max)];
    let mut s = String::from_utf8_lossy(cut).into_owned();
    if bytes.len() > max {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_splices_the_id() {
        let t =
            CallTemplate::tools_call("echo", &serde_json::json!({"message": "hi \"x\""})).unwrap();
        for id in [0u64, 7, 42, 1 << 40, u64::MAX] {
            let mut out = b"junk".to_vec();
            t.write(id, &mut out);
            let body = &out[4..];
            assert_eq!(body.len(), t.len_with(id));
            let v: serde_json::Value = serde_json::from_slice(body).unwrap();
            assert_eq!(v["id"].as_u64(), Some(id));
            assert_eq!(v["jsonrpc"], "2.0");
            assert_eq!(v["method"], "tools/call");
            assert_eq!(v["params"]["name"], "echo");
            assert_eq!(v["params"]["arguments"]["message"], "hi \"x\"");
        }
        assert!(CallTemplate::tools_call("echo", &serde_json::json!([1])).is_err());
    }

    #[test]
    fn classifies_replies() {
        let ok =
            br#"{"jsonrpc":"2.0","id":5,"result":{"content":[{"type":"text","text":"Echo: hi"}]}}"#;
        assert_eq!(
            parse_reply(ok).unwrap(),
            Reply::Response {
                id: Some(5),
                outcome: Ok(())
            }
        );
        let tool_err = br#"{"jsonrpc":"2.0","id":6,"result":{"content":[{"type":"text","text":"Tool nope not found"}],"isError":true}}"#;
        match parse_reply(tool_err).unwrap() {
            Reply::Response {
                id: Some(6),
                outcome: Err(e),
            } => {
                assert_eq!(e.kind, ErrorKind::Tool);
                assert!(e.detail.ends_with("Tool nope not found"), "{}", e.detail);
            }
            other => panic!("{other:?}"),
        }
        let not_err = br#"{"jsonrpc":"2.0","id":6,"result":{"isError":false}}"#;
        assert!(matches!(
            parse_reply(not_err).unwrap(),
            Reply::Response {
                outcome: Ok(()),
                ..
            }
        ));
        let rpc_err = br#"{"jsonrpc":"2.0","id":"abc","error":{"code":-32602,"message":"Unknown tool","data":{"x":[1]}}}"#;
        match parse_reply(rpc_err).unwrap() {
            Reply::Response {
                id: None,
                outcome: Err(e),
            } => {
                assert_eq!(e.kind, ErrorKind::Rpc);
                assert!(e.detail.contains("-32602") && e.detail.contains("Unknown tool"));
            }
            other => panic!("{other:?}"),
        }
        let req = br#"{"jsonrpc":"2.0","id":"s1","method":"roots/list"}"#;
        assert_eq!(
            parse_reply(req).unwrap(),
            Reply::Request {
                id: serde_json::json!("s1"),
                method: "roots/list".into()
            }
        );
        let note =
            br#"{"jsonrpc":"2.0","method":"notifications/message","params":{"level":"info"}}"#;
        assert_eq!(parse_reply(note).unwrap(), Reply::Notification);
        assert!(parse_reply(b"{not json").is_err());
    }

    #[test]
    fn snippets_are_bounded() {
        assert_eq!(snippet(b"hello", 10), "hello");
        assert_eq!(snippet(b"hello world", 5), "hello…");
    }
}
