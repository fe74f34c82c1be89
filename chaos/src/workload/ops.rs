//! The requests of the workloads, one function per operation, each ending in a [`Done`]:
//! the outcome (see [`classify`](super::classify)), the value and the error text. None of
//! them panics or retries: a failed request is a recorded outcome.

use serde_json::{Value, json};

use super::classify::{Effect, Reply, outcome};
use crate::history::Outcome;

/// The header that asks a node for a linearizable read.
const CONSISTENCY_HEADER: &str = "X-Hangar-Consistency";

/// `limit` of every `/api/events` page (the most a node returns at once).
pub(super) const EVENTS_PAGE: usize = 10_000;

/// The rate-limit `match` glob of the register workload: it matches no tool, so the limits
/// written throttle nothing.
pub(super) const NO_TOOL_GLOB: &str = "chaos-none-*";

/// How an operation ended.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Done {
    pub(super) outcome: Outcome,
    pub(super) value: Value,
    pub(super) error: Option<String>,
}

impl Done {
    /// The outcome of `reply` for an operation with `effect`; `value` is what a 2xx body said
    /// (`None`: not the expected body) and `fallback` the value recorded otherwise.
    fn from(effect: Effect, reply: &Reply, value: Option<Value>, fallback: Value) -> Done {
        let outcome = outcome(effect, reply, value.is_some());
        match (outcome, value) {
            (Outcome::Ok, Some(value)) => Done {
                outcome,
                value,
                error: None,
            },
            _ => Done {
                outcome,
                value: fallback,
                error: Some(reply.describe()),
            },
        }
    }
}

/// Send a request and read its whole body.
async fn send(rb: reqwest::RequestBuilder) -> Reply {
    let resp = match rb.send().await {
        Ok(r) => r,
        Err(e) => return Reply::from_error(&e, false),
    };
    let code = resp.status().as_u16();
    match resp.bytes().await {
        Ok(b) => Reply::Status {
            code,
            body: String::from_utf8_lossy(&b).into_owned(),
        },
        Err(e) => Reply::from_error(&e, true),
    }
}

/// A GET that asks for a linearizable read.
fn linearizable_get(http: &reqwest::Client, url: String) -> reqwest::RequestBuilder {
    http.get(url).header(CONSISTENCY_HEADER, "linearizable")
}

/// A JSON number read back from a node as the register value: integers as integers.
fn number_value(n: f64) -> Value {
    if n.fract() == 0.0 && n >= 0.0 && n <= u64::MAX as f64 {
        json!(n as u64)
    } else {
        json!(n)
    }
}

// ------------------------------------------------------------------ register

/// `PUT /api/rate_limits/{id}` with `rps` = `value` (the register write).
pub(super) async fn write_register(
    http: &reqwest::Client,
    base: &str,
    limit_id: &str,
    value: u64,
) -> Done {
    let body = json!({"rps": value, "match": {"tool": NO_TOOL_GLOB}});
    let reply = send(
        http.put(format!("{base}/api/rate_limits/{limit_id}"))
            .header("Content-Type", "application/json")
            .body(body.to_string()),
    )
    .await;
    let acked = reply.is_success() && write_acknowledged(&reply.json(), limit_id, value);
    Done::from(
        Effect::Write,
        &reply,
        acked.then(|| json!(value)),
        json!(value),
    )
}

/// Whether a `PUT /api/rate_limits/{id}` answer acknowledges writing `value` to `limit_id`.
pub(super) fn write_acknowledged(body: &Value, limit_id: &str, value: u64) -> bool {
    let def = &body["rate_limit"];
    def["id"].as_str() == Some(limit_id) && def["rps"].as_f64() == Some(value as f64)
}

/// Linearizable `GET /api/rate_limits`: the `rps` of `limit_id` (`null` when absent).
pub(super) async fn read_register(http: &reqwest::Client, base: &str, limit_id: &str) -> Done {
    let reply = send(linearizable_get(http, format!("{base}/api/rate_limits"))).await;
    let value = reply
        .is_success()
        .then(|| register_value(&reply.json(), limit_id))
        .flatten();
    Done::from(Effect::Read, &reply, value, Value::Null)
}

/// The register value in a `GET /api/rate_limits` body: `Some(null)` when the limit is
/// absent, `None` when the body is not a rate-limit list.
pub(super) fn register_value(body: &Value, limit_id: &str) -> Option<Value> {
    let limits = body["rate_limits"].as_array()?;
    match limits.iter().find(|l| l["id"].as_str() == Some(limit_id)) {
        None => Some(Value::Null),
        Some(l) => l["rps"].as_f64().map(number_value),
    }
}

// ------------------------------------------------------------------ set

/// `POST /api/auth/keys` named `name`, for `principal` (the set add). Only the name is kept: the answer holds
/// the key's secret, which is neither recorded nor logged.
pub(super) async fn add_key(
    http: &reqwest::Client,
    base: &str,
    name: &str,
    principal: &str,
) -> Done {
    let body = json!({"principal_id": principal, "name": name});
    let reply = send(
        http.post(format!("{base}/api/auth/keys"))
            .header("Content-Type", "application/json")
            .body(body.to_string()),
    )
    .await;
    let acked = reply.is_success() && {
        let v = reply.json();
        v["name"].as_str() == Some(name) && v["key_id"].is_string()
    };
    Done::from(
        Effect::Write,
        &reply,
        acked.then(|| json!(name)),
        json!(name),
    )
}

/// Linearizable `GET /api/auth/keys` (of `principal` only, when given): the names starting
/// with `prefix`, sorted (duplicates kept: two keys with one name would be an anomaly worth
/// seeing).
pub(super) async fn read_keys(
    http: &reqwest::Client,
    base: &str,
    prefix: &str,
    principal: Option<&str>,
) -> Done {
    let url = match principal {
        Some(p) => format!("{base}/api/auth/keys?principal_id={p}"),
        None => format!("{base}/api/auth/keys"),
    };
    let reply = send(linearizable_get(http, url)).await;
    let value = reply
        .is_success()
        .then(|| key_names(&reply.json(), prefix))
        .flatten()
        .map(|names| json!(names));
    Done::from(Effect::Read, &reply, value, Value::Null)
}

/// The key names starting with `prefix` in a `GET /api/auth/keys` body, sorted.
pub(super) fn key_names(body: &Value, prefix: &str) -> Option<Vec<String>> {
    let mut names = Vec::new();
    for k in body["keys"].as_array()? {
        let name = k["name"].as_str()?;
        if name.starts_with(prefix) {
            names.push(name.to_owned());
        }
    }
    names.sort();
    Some(names)
}

// ------------------------------------------------------------------ calls

/// `tools/call` of an echo tool through `/mcp`, with `message`; `Ok` when the tool's text is
/// the message.
pub(super) async fn call_echo(
    http: &reqwest::Client,
    base: &str,
    tool: &str,
    message: &str,
    rpc_id: u64,
) -> Done {
    let body = json!({"jsonrpc": "2.0", "id": rpc_id, "method": "tools/call",
        "params": {"name": tool, "arguments": {"message": message}}});
    let reply = send(
        http.post(format!("{base}/mcp"))
            .header("Content-Type", "application/json")
            .header("Accept", "application/json, text/event-stream")
            .body(body.to_string()),
    )
    .await;
    let Reply::Status { code, body } = &reply else {
        return Done::from(Effect::Write, &reply, None, Value::Null);
    };
    if !(200..300).contains(code) {
        return Done::from(Effect::Write, &reply, None, Value::Null);
    }
    match tool_text(body, rpc_id) {
        Ok(text) if text == message => {
            Done::from(Effect::Write, &reply, Some(json!(text)), Value::Null)
        }
        // The gateway answered, but not with the echo: the call may or may not have run.
        Ok(text) => Done {
            outcome: Outcome::Info,
            value: json!(text),
            error: Some(format!("the echo of {message:?} answered {text:?}")),
        },
        Err(e) => Done {
            outcome: Outcome::Info,
            value: Value::Null,
            error: Some(e),
        },
    }
}

/// The JSON-RPC messages of an MCP answer: one JSON body, or the `data:` of every SSE event.
pub(super) fn mcp_messages(body: &str) -> Vec<Value> {
    if let Ok(v) = serde_json::from_str::<Value>(body) {
        return vec![v];
    }
    body.split("\n\n")
        .filter_map(|event| {
            let data: Vec<&str> = event
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if data.is_empty() {
                return None;
            }
            serde_json::from_str(&data.join("\n")).ok()
        })
        .collect()
}

/// The text of the result of JSON-RPC request `rpc_id` in an MCP answer, or why there is
/// none (a JSON-RPC error, a tool error, no response).
pub(super) fn tool_text(body: &str, rpc_id: u64) -> Result<String, String> {
    let Some(resp) = mcp_messages(body)
        .into_iter()
        .find(|m| m["id"].as_u64() == Some(rpc_id) && m.get("method").is_none())
    else {
        return Err("no JSON-RPC response in the answer".to_owned());
    };
    if let Some(err) = resp.get("error") {
        return Err(format!(
            "JSON-RPC error {}: {}",
            err["code"],
            err["message"].as_str().unwrap_or("")
        ));
    }
    let result = &resp["result"];
    let text = result["content"][0]["text"].as_str();
    if result["isError"] == Value::Bool(true) {
        return Err(format!("tool error: {}", text.unwrap_or("")));
    }
    text.map(str::to_owned)
        .ok_or_else(|| "no text content in the tool result".to_owned())
}

// ------------------------------------------------------------------ events

/// `GET /api/events` after seq `from`: `[{"seq", "id"}]` of the first page (`all`: of every
/// page, following `since`), linearizable if asked.
pub(super) async fn read_events(
    http: &reqwest::Client,
    base: &str,
    from: u64,
    linearizable: bool,
    all: bool,
) -> Done {
    let mut events: Vec<Value> = Vec::new();
    let mut since = from;
    loop {
        let url = format!("{base}/api/events?since={since}&limit={EVENTS_PAGE}");
        let rb = if linearizable {
            linearizable_get(http, url)
        } else {
            http.get(url)
        };
        let reply = send(rb).await;
        let page = reply
            .is_success()
            .then(|| event_ids(&reply.json()))
            .flatten();
        let Some(page) = page else {
            return Done::from(Effect::Read, &reply, None, Value::Null);
        };
        let n = page.len();
        if let Some(last) = page.last().and_then(|e| e["seq"].as_u64()) {
            since = last;
        }
        events.extend(page);
        if !all || n < EVENTS_PAGE {
            return Done {
                outcome: Outcome::Ok,
                value: Value::Array(events),
                error: None,
            };
        }
    }
}

/// `[{"seq", "id"}]` of the events of a `GET /api/events` body (`id`: the event's
/// `event_id`, or its type and time when it has none); `None` unless every event has a seq.
pub(super) fn event_ids(body: &Value) -> Option<Vec<Value>> {
    body["events"]
        .as_array()?
        .iter()
        .map(|e| {
            let seq = e["seq"].as_u64()?;
            let id = match e["event_id"].as_str() {
                Some(id) if !id.is_empty() => id.to_owned(),
                _ => format!(
                    "{}@{}",
                    e["event_type"].as_str().unwrap_or("?"),
                    e["occurred_at"]
                ),
            };
            Some(json!({"seq": seq, "id": id}))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_bodies() {
        let body = json!({"rate_limits": [
            {"id": "other", "rps": 1.0},
            {"id": "chaos-r0", "rps": 17.0, "burst": 17},
        ]});
        assert_eq!(register_value(&body, "chaos-r0"), Some(json!(17)));
        assert_eq!(register_value(&body, "chaos-r1"), Some(Value::Null));
        assert_eq!(register_value(&json!({"error": {}}), "chaos-r0"), None);
        assert_eq!(
            register_value(
                &json!({"rate_limits": [{"id": "chaos-r0", "rps": 1.5}]}),
                "chaos-r0"
            ),
            Some(json!(1.5))
        );
        let ack = json!({"rate_limit": {"id": "chaos-r0", "rps": 17.0}});
        assert!(write_acknowledged(&ack, "chaos-r0", 17));
        assert!(!write_acknowledged(&ack, "chaos-r0", 18));
        assert!(!write_acknowledged(&ack, "chaos-r1", 17));
    }

    #[test]
    fn key_bodies() {
        let body = json!({"keys": [
            {"key_id": "key_2", "name": "chaos-2-0"},
            {"key_id": "key_1", "name": "chaos-1-0"},
            {"key_id": "key_3", "name": "admin"},
        ], "count": 3});
        assert_eq!(
            key_names(&body, "chaos-"),
            Some(vec!["chaos-1-0".to_owned(), "chaos-2-0".to_owned()])
        );
        assert_eq!(key_names(&json!({}), "chaos-"), None);
    }

    #[test]
    fn mcp_answers() {
        let json_body =
            r#"{"jsonrpc":"2.0","id":7,"result":{"content":[{"type":"text","text":"hi"}]}}"#;
        assert_eq!(tool_text(json_body, 7), Ok("hi".to_owned()));
        assert!(tool_text(json_body, 8).is_err());
        let sse = "event: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{}}\n\n\
                   event: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":3,\"result\":{\"content\":[{\"type\":\"text\",\"text\":\"yo\"}]}}\n\n";
        assert_eq!(tool_text(sse, 3), Ok("yo".to_owned()));
        let rpc_err = r#"{"jsonrpc":"2.0","id":1,"error":{"code":-32000,"message":"down"}}"#;
        assert_eq!(
            tool_text(rpc_err, 1),
            Err("JSON-RPC error -32000: down".to_owned())
        );
        let tool_err = r#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"x"}],"isError":true}}"#;
        assert_eq!(tool_text(tool_err, 1), Err("tool error: x".to_owned()));
    }

    #[test]
    fn event_bodies() {
        let body = json!({"events": [
            {"seq": 1, "event_id": "a", "event_type": "KeyCreated", "occurred_at": 1.5},
            {"seq": 2, "event_id": "", "event_type": "KeyCreated", "occurred_at": 2.5},
        ], "last_seq": 2});
        assert_eq!(
            event_ids(&body),
            Some(vec![
                json!({"seq": 1, "id": "a"}),
                json!({"seq": 2, "id": "KeyCreated@2.5"})
            ])
        );
        assert_eq!(event_ids(&json!({"events": [{"event_id": "a"}]})), None);
    }

    #[test]
    fn done_keeps_the_attempted_value_when_not_ok() {
        let reply = Reply::TimedOut;
        let d = Done::from(Effect::Write, &reply, None, json!(5));
        assert_eq!(d.outcome, Outcome::Info);
        assert_eq!(d.value, json!(5));
        assert_eq!(d.error.as_deref(), Some("timed out"));
    }
}
