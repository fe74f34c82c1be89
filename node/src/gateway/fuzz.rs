//! Bounded fuzzing of the JSON-RPC envelope: random and mutated messages through the whole
//! gateway (`Gateway::handle`) never panic, and every request gets one answer. Seeded, so a
//! failure names the seed that reproduces it.

use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use super::{Ctx, Gateway, GatewayConfig, Scope};
use crate::config::Naming;
use crate::jsonrpc::Message;
use crate::runtime::Runtime;
use crate::telemetry::Metrics;
use crate::telemetry::events::EventLog;

const METHODS: &[&str] = &[
    "initialize",
    "ping",
    "tools/list",
    "tools/call",
    "prompts/list",
    "prompts/get",
    "resources/list",
    "resources/read",
    "resources/templates/list",
    "completion/complete",
    "logging/setLevel",
    "server/discover",
    "notifications/cancelled",
    "notifications/initialized",
    "hangar_call",
    "",
    "x/y",
];

fn random_value(rng: &mut rand::rngs::StdRng, depth: u32) -> Value {
    match rng.random_range(0..if depth > 3 { 5 } else { 8 }) {
        0 => Value::Null,
        1 => Value::Bool(rng.random()),
        2 => json!(rng.random::<i64>()),
        3 => json!(rng.random::<f64>()),
        4 => {
            let n = rng.random_range(0..12);
            Value::String((0..n).map(|_| rng.random_range(' '..='~')).collect())
        }
        5 => Value::Array(
            (0..rng.random_range(0..4))
                .map(|_| random_value(rng, depth + 1))
                .collect(),
        ),
        _ => {
            let keys = [
                "name",
                "arguments",
                "uri",
                "ref",
                "_meta",
                "protocolVersion",
                "cursor",
                "x",
            ];
            Value::Object(
                (0..rng.random_range(0..4))
                    .map(|_| {
                        (
                            keys[rng.random_range(0..keys.len())].to_owned(),
                            random_value(rng, depth + 1),
                        )
                    })
                    .collect(),
            )
        }
    }
}

fn random_message(rng: &mut rand::rngs::StdRng) -> Vec<u8> {
    let mut m = serde_json::Map::new();
    if rng.random_bool(0.9) {
        m.insert(
            "jsonrpc".into(),
            json!(if rng.random_bool(0.9) { "2.0" } else { "1.0" }),
        );
    }
    if rng.random_bool(0.8) {
        m.insert("id".into(), random_value(rng, 3));
    }
    if rng.random_bool(0.9) {
        m.insert(
            "method".into(),
            json!(METHODS[rng.random_range(0..METHODS.len())]),
        );
    }
    if rng.random_bool(0.7) {
        m.insert("params".into(), random_value(rng, 0));
    }
    if rng.random_bool(0.1) {
        m.insert("result".into(), random_value(rng, 2));
    }
    let mut bytes = serde_json::to_vec(&Value::Object(m)).unwrap_or_default();
    // Sometimes break the text itself.
    if rng.random_bool(0.1) && !bytes.is_empty() {
        let i = rng.random_range(0..bytes.len());
        bytes[i] = rng.random();
    }
    bytes
}

#[tokio::test]
async fn random_envelopes_never_panic_and_requests_always_get_one_answer() {
    let cfg = crate::config::load_str("mcp_servers: {}\n", &|_| None).unwrap();
    let rt = Runtime::new(
        &cfg,
        Arc::new(Metrics::new()),
        Arc::new(EventLog::new("n", 100)),
        "n".into(),
    );
    let gw = Gateway::new(
        rt,
        GatewayConfig {
            naming: Naming::Prefixed,
            request_timeout: Duration::from_secs(1),
        },
    );
    let seed: u64 = rand::random();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Bounded: 3000 messages.
    for i in 0..3000 {
        let bytes = random_message(&mut rng);
        let Ok(msg) = serde_json::from_slice::<Message>(&bytes) else {
            continue;
        };
        let is_request = msg.id.is_some() && msg.method.is_some();
        let ctx = Ctx {
            scope: if rng.random_bool(0.8) {
                Scope::Aggregate
            } else {
                Scope::Server("nope".into())
            },
            out: None,
            cancel_key: "fuzz".into(),
            grants: None,
            caller: std::sync::Arc::new(crate::ratelimit::Caller::local()),
        };
        let answer = tokio::time::timeout(Duration::from_secs(5), gw.handle(&ctx, msg))
            .await
            .unwrap_or_else(|_| panic!("seed {seed}, message {i}: no answer within 5 s"));
        if is_request {
            assert!(
                answer.is_some(),
                "seed {seed}, message {i}: a request without an answer: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
    }
}
