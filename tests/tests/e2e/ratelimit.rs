//! Rate limits on one real node: the config's rules on tool calls (MCP error, `hangar_call`
//! entries, `hangar_health`, metrics), `/api/rate_limits` and `hangarctl limits`, a reload that
//! changes them and one that is refused, and the command limiter's 429 on REST commands.
//! (The cluster-wide behaviour — shares across nodes, leader loss, partitions — is in the
//! `cluster` test binary.)

use std::time::Duration;

use hangar_tests::*;
use serde_json::{Value, json};

fn ctl(node: &Node, args: &[&str]) -> (i32, String, String) {
    hangarctl_on(node, args)
}

async fn limit_ids(c: &reqwest::Client, node: &Node) -> Vec<String> {
    let (s, v) = get_json(c, &node.url("/api/rate_limits")).await;
    assert_eq!(s, 200, "{v}");
    v["rate_limits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_owned())
        .collect()
}

/// The value of a metric line starting with `prefix`.
async fn metric(c: &reqwest::Client, node: &Node, prefix: &str) -> Option<f64> {
    get_text(c, &node.url("/metrics"))
        .await
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_refuse_calls_with_a_retry_time_and_follow_the_config_and_the_api() {
    let servers = format!("mcp_servers:\n{}", fixture_stdio_yaml("fx", ""));
    let rules = "rate_limits:\n  - id: echo-per-caller\n    key: [principal]\n    match: {tool: echo}\n    rps: 0.5\n    burst: 3\n";
    let node = Node::start(&format!("{rules}{servers}"));
    let c = client();
    let url = node.url("/mcp");
    // The rule is in effect once this node's limiter lists it.
    wait_for(
        "the rule in hangar_health",
        Duration::from_secs(15),
        || async {
            let r = call_tool(&c, &url, "hangar_health", json!({})).await;
            let rl = &r["result"]["structuredContent"]["security"]["rate_limiting"];
            (rl["config"][0]["id"] == "echo-per-caller").then_some(())
        },
    )
    .await;

    // A burst of 3, then refusals with a retry time (in the body and in the HTTP headers);
    // another tool is not limited.
    let mut ok = 0;
    let mut refused = Vec::new();
    for i in 0..8 {
        let r = call_tool(&c, &url, "fx__echo", json!({"message": format!("m{i}")})).await;
        if r.get("result").is_some() {
            ok += 1;
        } else {
            refused.push(r);
        }
    }
    assert!(
        (3..=4).contains(&ok),
        "admitted {ok} of 8 at burst 3: {refused:?}"
    );
    let e = &refused[0]["error"];
    assert_eq!(e["code"], -32029, "{e}");
    assert_eq!(e["data"]["error_type"], "RateLimitExceeded", "{e}");
    assert_eq!(e["data"]["rule"], "echo-per-caller", "{e}");
    assert!(e["data"]["retryAfterMs"].as_u64().unwrap() > 0, "{e}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("Rate limit exceeded"),
        "{e}"
    );
    let raw = c
        .post(&url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(
            json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call",
                     "params": {"name": "fx__echo", "arguments": {"message": "x"}}})
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        raw.status().as_u16(),
        200,
        "a JSON-RPC error travels in a 200"
    );
    assert!(
        raw.headers().contains_key("retry-after"),
        "{:?}",
        raw.headers()
    );
    assert!(
        raw.headers().contains_key("x-ratelimit-limit"),
        "{:?}",
        raw.headers()
    );
    for _ in 0..5 {
        let r = call_tool(&c, &url, "fx__whoami", json!({})).await;
        assert!(r.get("result").is_some(), "whoami is not matched: {r}");
    }

    // hangar_call: the entries over the limit fail with RateLimitExceeded.
    let calls: Vec<Value> = (0..4)
        .map(|i| json!({"mcp_server": "fx", "tool": "echo", "arguments": {"message": i.to_string()}}))
        .collect();
    let b = call_tool(&c, &url, "hangar_call", json!({"calls": calls})).await;
    let results = b["result"]["structuredContent"]["results"]
        .as_array()
        .unwrap()
        .clone();
    assert!(
        results
            .iter()
            .any(|r| r["error_type"] == "RateLimitExceeded"),
        "{b}"
    );

    // hangar_health counts the real buckets (one: this caller's echo bucket).
    let h = call_tool(&c, &url, "hangar_health", json!({})).await;
    assert_eq!(
        h["result"]["structuredContent"]["security"]["rate_limiting"]["active_buckets"], 1,
        "{h}"
    );
    assert!(
        metric(
            &c,
            &node,
            "mcp_hangar_rate_limit_hits_total{result=\"rejected\"}"
        )
        .await
        .unwrap()
            >= 5.0
    );
    assert!(
        metric(
            &c,
            &node,
            "mcp_hangar_rate_limit_rule_total{result=\"allowed\",rule=\"echo-per-caller\"}"
        )
        .await
        .unwrap()
            >= 3.0
    );
    let (_, v) = get_json(&c, &node.url("/api/rate_limits")).await;
    assert_eq!(v["node"]["mode"], "leased", "{v}");
    assert_eq!(
        v["buckets"][0]["key"], "echo-per-caller|principal=ip:127.0.0.1",
        "{v}"
    );
    assert!(v["buckets"][0]["rejected"].as_u64().unwrap() >= 5, "{v}");
    let (_, sys) = get_json(&c, &node.url("/api/system/")).await;
    assert_eq!(
        sys["system"]["instance"]["rate_limits_are_per_instance"],
        false
    );

    // hangarctl limits: set, list, remove; refusals with the server's reason.
    let (code, out, err) = ctl(
        &node,
        &[
            "limits",
            "set",
            "api-rule",
            "--rps",
            "5",
            "--key",
            "server",
            "--match-tool",
            "who*",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = ctl(&node, &["limits", "list"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("api-rule") && out.contains("echo-per-caller"),
        "{out}"
    );
    let (code, _, err) = ctl(&node, &["limits", "rm", "echo-per-caller"]);
    assert_eq!(code, 1);
    assert!(err.contains("409") && err.contains("config file"), "{err}");
    let (code, _, err) = ctl(&node, &["limits", "set", "bad", "--rps", "0"]);
    assert_eq!(code, 1);
    assert!(err.contains("422") && err.contains("rps"), "{err}");
    let (code, _, err) = ctl(&node, &["limits", "rm", "nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("404"), "{err}");
    assert_eq!(ctl(&node, &["limits", "rm", "api-rule"]).0, 0);
    assert_eq!(limit_ids(&c, &node).await, ["echo-per-caller"]);

    // A reload replaces the file's limits: here the command limiter instead of the rule.
    let (s, _) = post_json(&c, &node.url("/api/rate_limits/kept"), json!({"rps": 100})).await;
    assert_eq!(s, 405, "PUT, not POST");
    let r = c
        .put(node.url("/api/rate_limits/kept"))
        .header("content-type", "application/json")
        .body(json!({"rps": 100, "key": ["principal"]}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    node.write_config(&format!("rate_limit: {{rps: 0.5, burst: 2}}\n{servers}"));
    let r = c.post(node.url("/api/config/reload")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());
    assert_eq!(limit_ids(&c, &node).await, ["kept", "rate_limit"]);
    // REST commands: the burst, then 429 with Retry-After and the RateLimit headers.
    wait_for(
        "the command limiter in effect",
        Duration::from_secs(10),
        || async {
            let r = c
                .post(node.url("/api/mcp_servers/fx/start"))
                .send()
                .await
                .unwrap();
            (r.status().as_u16() == 429).then_some(r)
        },
    )
    .await;
    let r = c
        .post(node.url("/api/mcp_servers/fx/start"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    let h = r.headers().clone();
    assert!(
        h["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1,
        "{h:?}"
    );
    for name in [
        "ratelimit-limit",
        "ratelimit-remaining",
        "ratelimit-reset",
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
    ] {
        assert!(h.contains_key(name), "{name} missing: {h:?}");
    }
    let body: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "RateLimitExceeded", "{body}");
    assert_eq!(body["error"]["details"]["rule"], "rate_limit", "{body}");
    // Queries are not limited.
    for _ in 0..5 {
        assert_eq!(get_json(&c, &node.url("/api/mcp_servers/fx")).await.0, 200);
    }

    // A bad file is refused with the rule's path and keeps the limits in effect.
    node.write_config(&format!(
        "rate_limits:\n  - id: neg\n    rps: -1\n{servers}"
    ));
    let r = c.post(node.url("/api/config/reload")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 422);
    let text = r.text().await.unwrap();
    assert!(text.contains("rate_limits[0].rps"), "{text}");
    assert_eq!(limit_ids(&c, &node).await, ["kept", "rate_limit"]);
}
