//! The MCP front door: protocol revisions, aggregation, routing, streaming, bad input.

use std::time::{Duration, Instant};

use hangar_tests::*;
use serde_json::{Value, json};

fn config(extra: &str) -> String {
    format!("mcp_servers:\n{}", fixture_stdio_yaml("fx", extra))
}

#[tokio::test]
async fn negotiates_every_protocol_revision() {
    let node = Node::start(&config(""));
    let c = client();
    let url = node.url("/mcp");
    for v in ["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"] {
        let r = rpc(
            &c,
            &url,
            "initialize",
            json!({"protocolVersion": v, "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"}}),
        )
        .await;
        assert_eq!(r.status, 200);
        let resp = r.response();
        assert_eq!(resp["result"]["protocolVersion"], v, "{resp}");
        assert_eq!(resp["result"]["serverInfo"]["name"], "mcp-hangar");
    }
    let r = rpc(
        &c,
        &url,
        "initialize",
        json!({"protocolVersion": "1999-01-01", "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"}}),
    )
    .await;
    assert_eq!(r.response()["result"]["protocolVersion"], "2025-11-25");
    // Stateless revision: per-request _meta + header.
    let meta = json!({"io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {}, "io.modelcontextprotocol/clientInfo": {"name": "t", "version": "1"}});
    let body =
        json!({"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": {"_meta": meta}})
            .to_string();
    let r = post_raw(&c, &url, &body, &[("MCP-Protocol-Version", "2026-07-28")]).await;
    assert_eq!(r.status, 200, "{r:?}");
    let res = r.response()["result"].clone();
    assert!(
        res["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("2026-07-28"))
    );
    assert_eq!(
        res["_meta"]["io.modelcontextprotocol/serverInfo"]["name"],
        "mcp-hangar"
    );
    let body =
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "fx__echo",
        "arguments": {"message": "modern"}, "_meta": meta}})
        .to_string();
    let r = post_raw(&c, &url, &body, &[("MCP-Protocol-Version", "2026-07-28")]).await;
    assert_eq!(text_of(&r.response()), "modern");
    assert_eq!(r.response()["result"]["resultType"], "complete");
    let body =
        json!({"jsonrpc": "2.0", "id": 5, "method": "tools/list", "params": {"_meta": meta}})
            .to_string();
    let r = post_raw(&c, &url, &body, &[("MCP-Protocol-Version", "2026-07-28")]).await;
    let res = r.response()["result"].clone();
    assert_eq!(
        (&res["resultType"], &res["cacheScope"], &res["ttlMs"]),
        (&json!("complete"), &json!("private"), &json!(0)),
        "{res}"
    );
    // Header missing → 400; unsupported version → 400 with the supported list.
    let r = post_raw(&c, &url, &body, &[]).await;
    assert_eq!(r.status, 400, "{r:?}");
    let mut bad = meta.clone();
    bad["io.modelcontextprotocol/protocolVersion"] = json!("2031-01-01");
    let body = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/list", "params": {"_meta": bad}})
        .to_string();
    let r = post_raw(&c, &url, &body, &[("MCP-Protocol-Version", "2026-07-28")]).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.response()["error"]["code"], -32022);
    // Removed RPCs answer -32601 (HTTP 404) in the stateless revision.
    let body =
        json!({"jsonrpc": "2.0", "id": 4, "method": "ping", "params": {"_meta": meta}}).to_string();
    let r = post_raw(&c, &url, &body, &[("MCP-Protocol-Version", "2026-07-28")]).await;
    assert_eq!(
        (r.status, r.response()["error"]["code"].clone()),
        (404, json!(-32601))
    );
}

#[tokio::test]
async fn aggregates_stdio_and_remote_servers_and_routes_calls() {
    let web = FixtureHttp::start("web");
    let cfg = format!(
        "mcp_servers:\n{}  web:\n    mode: remote\n    endpoint: {}\n",
        fixture_stdio_yaml("fx", ""),
        web.url
    );
    let node = Node::start(&cfg);
    let c = client();
    let url = node.url("/mcp");
    let tools = rpc(&c, &url, "tools/list", json!({})).await.response();
    let names: Vec<&str> = tools["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"fx__echo") && names.contains(&"web__echo"),
        "{names:?}"
    );
    assert!(names.iter().all(|n| n.len() <= 64));
    assert_eq!(
        text_of(&call_tool(&c, &url, "fx__echo", json!({"message": "a"})).await),
        "a"
    );
    assert_eq!(
        text_of(&call_tool(&c, &url, "web__echo", json!({"message": "b"})).await),
        "b"
    );
    let who: Value = serde_json::from_str(&text_of(
        &call_tool(&c, &url, "web__whoami", json!({})).await,
    ))
    .unwrap();
    assert_eq!(who["mode"], "http");
    // Structured content and unknown fields pass through.
    let r = call_tool(&c, &url, "fx__add", json!({"a": 2, "b": 3})).await;
    assert_eq!(r["result"]["structuredContent"]["result"], 5.0);
    // Prompts, resources, templates and completion through the aggregate.
    let p = rpc(&c, &url, "prompts/list", json!({})).await.response();
    assert!(
        p["result"]["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["name"] == "fx__greet")
    );
    let g = rpc(
        &c,
        &url,
        "prompts/get",
        json!({"name": "web__greet", "arguments": {"who": "Ada"}}),
    )
    .await
    .response();
    assert_eq!(g["result"]["messages"][0]["content"]["text"], "Hello, Ada!");
    let rl = rpc(&c, &url, "resources/list", json!({})).await.response();
    let fixture_uris = rl["result"]["resources"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["uri"].as_str().unwrap().starts_with("fixture://"))
        .count();
    assert_eq!(fixture_uris, 2, "{rl}");
    let rr = rpc(
        &c,
        &url,
        "resources/read",
        json!({"uri": "fixture://web/readme"}),
    )
    .await
    .response();
    assert_eq!(rr["result"]["contents"][0]["text"], "readme of web");
    let rt = rpc(
        &c,
        &url,
        "resources/read",
        json!({"uri": "fixture://fx/items/42"}),
    )
    .await
    .response();
    assert_eq!(rt["result"]["contents"][0]["text"], "{\"id\":\"42\"}");
    let cc = rpc(
        &c,
        &url,
        "completion/complete",
        json!({"ref": {"type": "ref/prompt", "name": "fx__greet"},
        "argument": {"name": "who", "value": "a"}}),
    )
    .await
    .response();
    assert_eq!(cc["result"]["completion"]["values"], json!(["alice"]));
    let lv = rpc(&c, &url, "logging/setLevel", json!({"level": "debug"}))
        .await
        .response();
    assert_eq!(lv["result"], json!({}));
}

#[tokio::test]
async fn bad_input_gets_clear_errors_and_the_node_keeps_serving() {
    let node = Node::start(&format!("server:\n  max_body_bytes: 2048\n{}", config("")));
    let c = client();
    let url = node.url("/mcp");
    let r = post_raw(&c, &url, "{not json", &[]).await;
    assert_eq!(
        (r.status, r.response()["error"]["code"].clone()),
        (400, json!(-32700))
    );
    let r = post_raw(&c, &url, r#"{"jsonrpc":"2.0","id":1}"#, &[]).await;
    assert_eq!(r.response()["error"]["code"], -32600);
    let r = rpc(&c, &url, "no/such/method", json!({})).await;
    assert_eq!(r.response()["error"]["code"], -32601);
    let r = rpc(&c, &url, "tools/call", json!({"arguments": {}})).await;
    assert_eq!(r.response()["error"]["code"], -32602);
    let r = post_raw(
        &c,
        &url,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":[1]}"#,
        &[],
    )
    .await;
    assert_eq!(r.response()["error"]["code"], -32602);
    let r = call_tool(&c, &url, "fx__nope", json!({})).await;
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Unknown tool"),
        "{r}"
    );
    let r = call_tool(&c, &url, "ghost__echo", json!({})).await;
    assert_eq!(r["error"]["code"], -32602);
    let big = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "fx__echo", "arguments": {"message": "x".repeat(4096)}}})
    .to_string();
    let r = post_raw(&c, &url, &big, &[]).await;
    assert_eq!(r.status, 413);
    let r = post_raw(&c, &url, "{}", &[("Host", "evil.example")]).await;
    assert_eq!(r.status, 421);
    let r = post_raw(&c, &url, "{}", &[("Origin", "https://evil.example")]).await;
    assert_eq!(r.status, 403);
    let r = c.delete(&url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 405);
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 405);
    let r = post_raw(&c, &url, "[]", &[]).await;
    assert_eq!(r.status, 400);
    // Still serving.
    assert_eq!(
        text_of(&call_tool(&c, &url, "fx__echo", json!({"message": "ok"})).await),
        "ok"
    );
}

#[tokio::test]
async fn upstream_crash_mid_call_fails_fast_and_garbage_is_ignored() {
    let node = Node::start(&config(""));
    let c = client();
    let url = node.url("/mcp");
    let r = call_tool(&c, &url, "fx__garbage", json!({})).await;
    assert_eq!(text_of(&r), "garbage sent");
    let t0 = Instant::now();
    let r = call_tool(&c, &url, "fx__crash_after", json!({"n": 1})).await;
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "in-flight caller must not hang"
    );
    assert_eq!(r["error"]["code"], -32000, "{r}");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("ended"),
        "{r}"
    );
    // The next call restarts the server.
    assert_eq!(
        text_of(&call_tool(&c, &url, "fx__echo", json!({"message": "back"})).await),
        "back"
    );
    let (_, logs) = get_json(&c, &node.url("/api/mcp_servers/fx/logs?lines=1000")).await;
    let lines: Vec<String> = logs["logs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["line"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        lines.iter().any(|l| l.contains("this is not JSON")),
        "garbage kept in the log ring: {lines:?}"
    );
}

/// The node's count of calls in flight (`/api/system/`).
async fn calls_in_flight(c: &reqwest::Client, node: &Node) -> u64 {
    let (_, v) = get_json(c, &node.url("/api/system/")).await;
    v["system"]["gateway"]["calls_in_flight"]
        .as_u64()
        .unwrap_or_else(|| panic!("no system.gateway.calls_in_flight in {v}"))
}

#[tokio::test]
async fn a_caller_that_goes_away_cancels_its_call_upstream_and_leaves_nothing_behind() {
    let node = Node::start(&config(""));
    let c = client();
    // Warm the server so the call below is in flight upstream at once.
    assert_eq!(
        text_of(&call_tool(&c, &node.url("/mcp"), "fx__echo", json!({"message": "up"})).await),
        "up"
    );
    let body = json!({"jsonrpc": "2.0", "id": "leaver-1", "method": "tools/call",
        "params": {"name": "fx__slow", "arguments": {"ms": 20000}}});
    let url = node.url("/mcp");
    let leaver =
        tokio::spawn(async move { post_raw(&client(), &url, &body.to_string(), &[]).await });
    wait_for(
        "the slow call in flight",
        Duration::from_secs(10),
        || async { (calls_in_flight(&c, &node).await == 1).then_some(()) },
    )
    .await;
    // The client goes away: its connection closes with the request unanswered.
    leaver.abort();
    let _ = leaver.await;
    wait_for(
        "the abandoned call to leave the in-flight map",
        Duration::from_secs(10),
        || async { (calls_in_flight(&c, &node).await == 0).then_some(()) },
    )
    .await;
    // ... and the upstream was told to stop working on it.
    wait_for(
        "notifications/cancelled upstream",
        Duration::from_secs(10),
        || async {
            logs_contain(
                &c,
                &node.url("/api/mcp_servers/fx/logs"),
                "notifications/cancelled",
            )
            .await
        },
    )
    .await;
    // The node keeps serving.
    assert_eq!(
        text_of(
            &call_tool(
                &c,
                &node.url("/mcp"),
                "fx__echo",
                json!({"message": "still"})
            )
            .await
        ),
        "still"
    );
}

#[tokio::test]
async fn progress_streams_as_sse_with_the_callers_token() {
    let node = Node::start(&config(""));
    let c = client();
    let body = json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": "fx__progress",
        "arguments": {"steps": 3, "ms": 5}, "_meta": {"progressToken": "my-token"}}}).to_string();
    let r = post_raw(&c, &node.url("/mcp"), &body, &[]).await;
    assert!(r.content_type.starts_with("text/event-stream"), "{r:?}");
    let msgs = r.messages();
    assert_progress(&msgs, 3, "my-token");
    assert_eq!(msgs.last().unwrap()["id"], 9);
    assert_eq!(text_of(msgs.last().unwrap()), "done 3");
    // A JSON-only client gets one JSON answer.
    let resp = c
        .post(node.url("/mcp"))
        .header("Content-Type", "application/json")
        .header("Accept", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json")
    );
}

#[tokio::test]
async fn server_scope_is_transparent() {
    let node = Node::start(&config(""));
    let c = client();
    let url = node.url("/servers/fx/mcp");
    let init = rpc(
        &c,
        &url,
        "initialize",
        json!({"protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"}}),
    )
    .await
    .response();
    assert_eq!(init["result"]["serverInfo"]["name"], "hangar-fixture-fx");
    assert_eq!(init["result"]["protocolVersion"], "2025-06-18");
    let tools = rpc(&c, &url, "tools/list", json!({})).await.response();
    assert!(
        tools["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "echo")
    );
    assert_eq!(
        text_of(&call_tool(&c, &url, "echo", json!({"message": "plain"})).await),
        "plain"
    );
    let r = rpc(&c, &node.url("/servers/ghost/mcp"), "tools/list", json!({})).await;
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn expired_upstream_session_is_reinitialized_transparently() {
    let web = FixtureHttp::start("web");
    let node = Node::start(&format!(
        "mcp_servers:\n  web:\n    mode: remote\n    endpoint: {}\n",
        web.url
    ));
    let c = client();
    let url = node.url("/mcp");
    assert_eq!(
        text_of(&call_tool(&c, &url, "web__echo", json!({"message": "1"})).await),
        "1"
    );
    let admin = web.url.replace("/mcp", "/admin/expire-sessions");
    assert_eq!(c.post(&admin).send().await.unwrap().status().as_u16(), 200);
    assert_eq!(
        text_of(&call_tool(&c, &url, "web__echo", json!({"message": "2"})).await),
        "2"
    );
    let (_, stats) = get_json(&c, &web.url.replace("/mcp", "/admin/stats")).await;
    assert_eq!(stats["counts"]["initialize"], 2, "{stats}");
}

#[tokio::test]
async fn sampling_elicitation_and_roots_are_relayed_to_the_client() {
    let web = FixtureHttp::start("web");
    let node = Node::start(&format!(
        "mcp_servers:\n{}  web:\n    mode: remote\n    endpoint: {}\n",
        fixture_stdio_yaml("fx", ""),
        web.url
    ));
    let c = client();
    let url = node.url("/mcp");
    for server in ["fx", "web"] {
        let r = relay_roundtrip(&c, &url, &url, &format!("{server}__sample"), |_| {
            json!({"role": "assistant",
            "content": {"type": "text", "text": "from the client"}, "model": "m"})
        })
        .await;
        assert_eq!(text_of(&r), "sampled: from the client", "{server}");
        let r = relay_roundtrip(&c, &url, &url, &format!("{server}__elicit"), |m| {
            assert_eq!(m["method"], "elicitation/create");
            json!({"action": "accept", "content": {"answer": "42"}})
        })
        .await;
        assert!(text_of(&r).contains("42"), "{r}");
        let r = relay_roundtrip(
            &c,
            &url,
            &url,
            &format!("{server}__roots"),
            |_| json!({"roots": [{"uri": "file:///w", "name": "w"}]}),
        )
        .await;
        assert!(text_of(&r).contains("file:///w"), "{r}");
    }
}

#[tokio::test]
async fn tool_access_policies_hide_and_refuse_denied_tools() {
    let node = Node::start(&config(
        "    tools: {deny_list: [\"change_*\", \"crash*\"]}\n",
    ));
    let c = client();
    let names = |v: &Value| -> Vec<String> {
        v["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|t| t["name"].as_str().map(str::to_owned))
            .collect()
    };
    // Aggregate and server views: listed without the denied tools.
    let agg = rpc(&c, &node.url("/mcp"), "tools/list", json!({}))
        .await
        .response();
    let agg = names(&agg);
    assert!(agg.contains(&"fx__echo".to_owned()), "{agg:?}");
    assert!(
        !agg.iter()
            .any(|n| n.starts_with("fx__change_") || n.starts_with("fx__crash")),
        "{agg:?}"
    );
    let direct = rpc(&c, &node.url("/servers/fx/mcp"), "tools/list", json!({}))
        .await
        .response();
    let direct = names(&direct);
    assert!(
        direct.contains(&"echo".to_owned()) && !direct.contains(&"change_tools".to_owned()),
        "{direct:?}"
    );
    // Refused on call through both views (the upstream never sees it), and counted.
    for (url, tool) in [
        (node.url("/mcp"), "fx__change_tools"),
        (node.url("/servers/fx/mcp"), "change_tools"),
    ] {
        let r = call_tool(&c, &url, tool, json!({})).await;
        assert_eq!(r["error"]["code"], -32003, "{r}");
        assert_eq!(
            r["error"]["data"]["error_type"], "ToolAccessDeniedError",
            "{r}"
        );
    }
    let metrics = get_text(&c, &node.url("/metrics")).await;
    assert!(
        metrics.contains("mcp_hangar_tool_access_denied_total{mcp_server=\"fx\",reason=\"tool_not_in_access_policy\"} 2"),
        "{}",
        metrics.lines().filter(|l| l.contains("denied")).collect::<Vec<_>>().join("\n")
    );
    // Allowed tools still work.
    assert_eq!(
        text_of(&call_tool(&c, &node.url("/mcp"), "fx__echo", json!({"message": "ok"})).await),
        "ok"
    );
}
