//! What one HTTP request told the client, and the [`Outcome`] it earns.
//!
//! The rules, conservative because a wrong `Fail` makes the checker unsound (it would treat a
//! write that did take effect as one that did not) while a wrong `Info` only costs it time:
//!
//! * `Ok`: a 2xx answer whose body is the expected acknowledgement (a write) or a value
//!   (a read).
//! * A read that is not `Ok` is `Fail`: reads have no effect.
//! * A write is `Fail` only when it provably had no effect: the connection was refused (the
//!   request was never sent), or a 4xx answer given before anything was proposed (a malformed
//!   or invalid request, a route or method that does not exist, too large, throttled).
//! * Every other write is `Info`: client timeouts, connections cut after sending, 5xx, a 2xx
//!   with an unexpected body (e.g. 202 "apply pending"), redirects (which the client does not
//!   follow), 408, and a 4xx by which the replicated state machine rejected the command (its
//!   envelope has `details.reason`, e.g. 409 `key_exists`).
//!
//! The last two deserve a word. A node forwards a write to the leader and, until a deadline,
//! retries it when it believes the leader did not act on it; a retry can re-propose a command
//! that the first attempt did commit (observed: a key creation forwarded to a leader that was
//! killed came back 409 "API key id … already exists" although the key had been created, by
//! the first attempt). So neither a state-machine rejection nor a 503 "no leader" at the end
//! of such a loop proves that the write had no effect.

use std::fmt;

use serde_json::Value;

use crate::history::Outcome;

/// Whether an operation can change anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// A read: never changes anything.
    Read,
    /// A write or a tool call: may take effect once sent.
    Write,
}

/// How one HTTP request ended, as far as its outcome is concerned.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    /// No connection could be made: the request was never sent.
    Refused(String),
    /// The client gave up waiting (connecting, for the answer or for its body).
    TimedOut,
    /// The connection failed after it was made (reset, closed, body cut short).
    Broken(String),
    /// An HTTP answer with its whole body.
    Status {
        /// HTTP status code.
        code: u16,
        /// The body (UTF-8, lossily).
        body: String,
    },
}

impl Reply {
    /// Turn a reqwest error into a reply; `answered` tells whether a status line had
    /// arrived already (then the request was certainly sent).
    pub fn from_error(e: &reqwest::Error, answered: bool) -> Reply {
        if e.is_timeout() {
            Reply::TimedOut
        } else if e.is_connect() && !answered {
            Reply::Refused(error_chain(e))
        } else {
            Reply::Broken(error_chain(e))
        }
    }

    /// The body as JSON (`Null` when there is no answer or it is not JSON).
    pub fn json(&self) -> Value {
        match self {
            Reply::Status { body, .. } => serde_json::from_str(body).unwrap_or(Value::Null),
            _ => Value::Null,
        }
    }

    /// True for a 2xx answer.
    pub fn is_success(&self) -> bool {
        matches!(self, Reply::Status { code, .. } if (200..300).contains(code))
    }

    /// A short description for [`Op::error`](crate::history::Op::error): the status with the
    /// error envelope's code and message, never a success body (a created API key's body
    /// holds its secret).
    pub fn describe(&self) -> String {
        match self {
            Reply::Refused(e) => format!("not sent: {e}"),
            Reply::TimedOut => "timed out".to_owned(),
            Reply::Broken(e) => format!("connection failed: {e}"),
            Reply::Status { code, .. } if (200..300).contains(code) => {
                format!("HTTP {code} with an unexpected body")
            }
            Reply::Status { code, body } => {
                let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
                let err = &v["error"];
                match (err["code"].as_str(), err["message"].as_str()) {
                    (Some(c), Some(m)) => format!("HTTP {code} {c}: {}", truncate(m, 300)),
                    _ => format!("HTTP {code}: {}", truncate(body, 300)),
                }
            }
        }
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// The outcome of a request with effect `effect` that ended with `reply`; `acknowledged`
/// says whether a 2xx body was the expected acknowledgement or value (see the module
/// documentation for the rules).
pub fn outcome(effect: Effect, reply: &Reply, acknowledged: bool) -> Outcome {
    if reply.is_success() && acknowledged {
        return Outcome::Ok;
    }
    match (effect, reply) {
        (Effect::Read, _) => Outcome::Fail,
        (Effect::Write, Reply::Refused(_)) => Outcome::Fail,
        (Effect::Write, Reply::Status { code, .. })
            if (400..500).contains(code) && *code != 408 && !rejected_by_state_machine(reply) =>
        {
            Outcome::Fail
        }
        (Effect::Write, _) => Outcome::Info,
    }
}

/// Whether an answer is the replicated state machine's rejection of a proposed command
/// (`details.reason` in the error envelope), which may be the rejection of a re-proposal.
fn rejected_by_state_machine(reply: &Reply) -> bool {
    reply.json()["error"]["details"]["reason"].is_string()
}

/// The error and its sources, joined with ": " (reqwest's own message hides the cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = cause.source();
    }
    s
}

/// At most `max` bytes of `s`, cut at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> Reply {
        Reply::Status {
            code,
            body: String::new(),
        }
    }

    fn rejected(reason: &str, code: u16) -> Reply {
        Reply::Status {
            code,
            body: serde_json::json!({"error": {"code": "ValidationError", "message": "no",
                "details": {"reason": reason}}})
            .to_string(),
        }
    }

    fn refused_early(code: u16) -> Reply {
        Reply::Status {
            code,
            body: serde_json::json!({"error": {"code": "ValidationError", "message": "bad",
                "details": {"field": "rps"}}})
            .to_string(),
        }
    }

    #[test]
    fn outcome_table() {
        use Effect::{Read, Write};
        use Outcome::{Fail, Info, Ok};
        let refused = Reply::Refused("connection refused".into());
        let cut = Reply::Broken("connection reset".into());
        let cases: Vec<(Effect, Reply, bool, Outcome)> = vec![
            // Acknowledged.
            (Write, status(200), true, Ok),
            (Write, status(201), true, Ok),
            (Read, status(200), true, Ok),
            // A 2xx that is not the expected acknowledgement: unknown for a write.
            (Write, status(200), false, Info),
            (Write, status(202), false, Info),
            (Read, status(200), false, Fail),
            // Never sent.
            (Write, refused.clone(), false, Fail),
            (Read, refused, false, Fail),
            // Sent, then no answer.
            (Write, Reply::TimedOut, false, Info),
            (Write, cut.clone(), false, Info),
            (Read, Reply::TimedOut, false, Fail),
            (Read, cut, false, Fail),
            // Redirects are not followed.
            (Write, status(307), false, Info),
            (Read, status(307), false, Fail),
            // Refused before proposing.
            (Write, status(400), false, Fail),
            (Write, status(404), false, Fail),
            (Write, status(409), false, Fail),
            (Write, status(413), false, Fail),
            (Write, status(422), false, Fail),
            (Write, status(429), false, Fail),
            (Write, refused_early(400), false, Fail),
            (Write, refused_early(422), false, Fail),
            // A rejection by the state machine may reject a re-proposal of a write that did
            // take effect.
            (Write, rejected("key_exists", 409), false, Info),
            (Write, rejected("not_found", 404), false, Info),
            (Write, rejected("invalid", 422), false, Info),
            (Read, rejected("not_found", 404), false, Fail),
            // A request timeout says nothing about what happened.
            (Write, status(408), false, Info),
            // Server errors: the write may have been proposed.
            (Write, status(500), false, Info),
            (Write, status(502), false, Info),
            (Write, status(503), false, Info),
            (Write, status(504), false, Info),
            (Read, status(503), false, Fail),
            (Read, status(504), false, Fail),
            // `acknowledged` never turns a non-2xx into Ok.
            (Write, status(503), true, Info),
            (Write, status(422), true, Fail),
            (Read, status(500), true, Fail),
        ];
        for (effect, reply, ack, want) in cases {
            assert_eq!(
                outcome(effect, &reply, ack),
                want,
                "{effect:?} {reply:?} acknowledged={ack}"
            );
        }
    }

    #[test]
    fn descriptions_show_the_error_envelope_and_never_a_success_body() {
        let r = Reply::Status {
            code: 503,
            body: r#"{"error":{"code":"ClusterUnavailableError","message":"no leader","details":null}}"#
                .into(),
        };
        assert_eq!(r.describe(), "HTTP 503 ClusterUnavailableError: no leader");
        let created = Reply::Status {
            code: 201,
            body: r#"{"raw_key":"mcp_secret"}"#.into(),
        };
        assert!(!created.describe().contains("mcp_secret"));
        let plain = Reply::Status {
            code: 502,
            body: "bad gateway".into(),
        };
        assert_eq!(plain.describe(), "HTTP 502: bad gateway");
        assert_eq!(truncate("héllo", 2), "h");
    }

    #[tokio::test]
    async fn transport_errors_are_classified() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(std::time::Duration::from_millis(300))
            .build()
            .unwrap();
        // A port nobody listens on: refused, never sent.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = client
            .get(format!("http://127.0.0.1:{port}/"))
            .send()
            .await
            .unwrap_err();
        assert!(
            matches!(Reply::from_error(&e, false), Reply::Refused(_)),
            "{e:?}"
        );
        // A listener that accepts and never answers: sent, then timed out.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = silent.accept().await {
                held.push(s);
            }
        });
        let e = client
            .put(format!("http://{addr}/"))
            .body("{}")
            .send()
            .await
            .unwrap_err();
        assert_eq!(Reply::from_error(&e, false), Reply::TimedOut, "{e:?}");
        hold.abort();
    }
}
