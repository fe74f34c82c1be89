//! Paths the review of issue 7 found untested, each through real `hangar` processes and real
//! fixture upstreams: `list_changed` on `GET /mcp`, a client-sent `Mcp-Session-Id`,
//! `tool_access.naming: plain`, the `idempotent_tools` retry, `NoAvailableMemberError`,
//! non-default group health thresholds and `hangarctl servers|tools|call`.

use std::time::{Duration, Instant};

use hangar_tests::*;
use serde_json::{Value, json};

/// The fixture binary's path as a YAML-safe string.
fn fixture() -> String {
    bin("hangar-fixture").display().to_string()
}

/// The exposed tool names of a `tools/list` answer.
async fn tool_names(c: &reqwest::Client, url: &str) -> Vec<String> {
    let r = rpc(c, url, "tools/list", json!({})).await.response();
    r["result"]["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("no tools in {r}"))
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect()
}

/// The node's stderr-ring lines of one server.
async fn log_lines(c: &reqwest::Client, node: &Node, id: &str) -> Vec<String> {
    let (_, v) = get_json(
        c,
        &node.url(&format!("/api/mcp_servers/{id}/logs?lines=1000")),
    )
    .await;
    v["logs"]
        .as_array()
        .map(|ls| {
            ls.iter()
                .filter_map(|l| l["line"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A member's entry in `GET /api/groups/{group}`.
async fn member(c: &reqwest::Client, node: &Node, group: &str, id: &str) -> Value {
    let (s, v) = get_json(c, &node.url(&format!("/api/groups/{group}"))).await;
    assert_eq!(s, 200, "{v}");
    v["members"]
        .as_array()
        .unwrap_or_else(|| panic!("no members in {v}"))
        .iter()
        .find(|m| m["id"] == id)
        .unwrap_or_else(|| panic!("no member {id} in {v}"))
        .clone()
}

// ---------------------------------------------------------------------------------------------
// 1. GET /mcp delivers notifications/tools/list_changed
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn coverage_get_mcp_stream_delivers_tools_list_changed() {
    let node = Node::start(&format!("mcp_servers:\n{}", fixture_stdio_yaml("fx", "")));
    let c = client();
    let url = node.url("/mcp");
    // Start the upstream first so that its start-up announcements are over.
    assert_eq!(
        text_of(&call_tool(&c, &url, "fx__echo", json!({"message": "up"})).await),
        "up"
    );
    assert!(!tool_names(&c, &url).await.contains(&"fx__extra".to_owned()));
    let mut listener = Listener::open(&c, &url).await;
    let mut scoped = Listener::open(&c, &node.url("/servers/fx/mcp")).await;

    // The upstream's own tool list changes (it announces it on its stdout).
    assert_eq!(
        text_of(&call_tool(&c, &url, "fx__change_tools", json!({})).await),
        "extra tool added"
    );
    // A list_changed arrives after which the aggregated list shows the new tool (a late
    // announcement of the start-up above may come first: then wait for the next one).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = listener
            .expect(
                "notifications/tools/list_changed",
                deadline.saturating_duration_since(Instant::now()),
            )
            .await;
        assert_eq!(n["jsonrpc"], "2.0", "{n}");
        assert!(n.get("id").is_none(), "a notification: {n}");
        if tool_names(&c, &url).await.contains(&"fx__extra".to_owned()) {
            break;
        }
    }
    // The server's own stream carries it too.
    scoped
        .expect("notifications/tools/list_changed", Duration::from_secs(10))
        .await;
    assert_eq!(
        text_of(&call_tool(&c, &url, "fx__extra", json!({})).await),
        "extra"
    );

    // A server added through the REST API changes the aggregated list too (a fresh stream:
    // only what happens from now on).
    drop(listener);
    let mut listener = Listener::open(&c, &url).await;
    let r = c
        .post(node.url("/api/mcp_servers/"))
        .header("Content-Type", "application/json")
        .body(
            json!({"mcp_server_id": "added", "mode": "subprocess",
                   "command": [fixture(), "stdio", "--name", "added"]})
            .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201, "{}", r.text().await.unwrap());
    listener
        .expect("notifications/tools/list_changed", Duration::from_secs(10))
        .await;
    assert!(
        tool_names(&c, &url)
            .await
            .contains(&"added__whoami".to_owned())
    );
}

// ---------------------------------------------------------------------------------------------
// 2. A client-sent Mcp-Session-Id is accepted, never required, and keys cancellation
// ---------------------------------------------------------------------------------------------

/// The node's count of calls in flight (`/api/system/`).
async fn calls_in_flight(c: &reqwest::Client, node: &Node) -> u64 {
    let (_, v) = get_json(c, &node.url("/api/system/")).await;
    v["system"]["gateway"]["calls_in_flight"]
        .as_u64()
        .unwrap_or_else(|| panic!("no system.gateway.calls_in_flight in {v}"))
}

/// POST a body with optional headers; returns (status, the `mcp-session-id` answered, body).
async fn post_with(
    c: &reqwest::Client,
    url: &str,
    body: &Value,
    session: Option<&str>,
) -> (u16, Option<String>, Value) {
    let mut rb = c
        .post(url)
        .header("Content-Type", "application/json")
        .header("Accept", "application/json, text/event-stream")
        .body(body.to_string());
    if let Some(s) = session {
        rb = rb.header("Mcp-Session-Id", s);
    }
    let resp = rb.send().await.unwrap();
    let status = resp.status().as_u16();
    let sid = resp
        .headers()
        .get("mcp-session-id")
        .map(|v| v.to_str().unwrap().to_owned());
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let text = resp.text().await.unwrap();
    let ans = Answer {
        status,
        content_type: ct,
        body: text,
    };
    let v = ans.messages().pop().unwrap_or(Value::Null);
    (status, sid, v)
}

#[tokio::test]
async fn coverage_client_session_id_is_accepted_never_required_and_scopes_cancellation() {
    let node = Node::start(&format!("mcp_servers:\n{}", fixture_stdio_yaml("fx", "")));
    let c = client();
    let url = node.url("/mcp");
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"}}});
    for session in [None, Some("client-chosen-0f3a"), Some("another one")] {
        let (status, sid, v) = post_with(&c, &url, &init, session).await;
        assert_eq!(status, 200, "{session:?}: {v}");
        assert_eq!(v["result"]["protocolVersion"], "2025-06-18", "{v}");
        assert_eq!(
            sid, None,
            "the gateway is session-less and hands out no session id ({session:?})"
        );
        let call = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
            "params": {"name": "fx__echo", "arguments": {"message": format!("{session:?}")}}});
        let (status, sid, v) = post_with(&c, &url, &call, session).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(sid, None);
        assert_eq!(text_of(&v), format!("{session:?}"));
    }

    // The session id keys `notifications/cancelled`: a cancel from another session (or from a
    // client that sends none) does not touch the call; one from its own session does.
    let slow = json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call",
        "params": {"name": "fx__slow", "arguments": {"ms": 30000}}});
    let url2 = url.clone();
    let caller = tokio::spawn(async move {
        let c = client();
        post_with(&c, &url2, &slow, Some("sess-A")).await
    });
    wait_for(
        "the slow call in flight",
        Duration::from_secs(10),
        || async { (calls_in_flight(&c, &node).await == 1).then_some(()) },
    )
    .await;
    let cancel = json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
        "params": {"requestId": 5, "reason": "test"}});
    for other in [Some("sess-B"), None] {
        let (status, _, _) = post_with(&c, &url, &cancel, other).await;
        assert_eq!(status, 202);
        // The notification is handled before the 202 is sent.
        assert_eq!(
            calls_in_flight(&c, &node).await,
            1,
            "a cancel from {other:?} must not cancel sess-A's call"
        );
    }
    assert!(!caller.is_finished());
    let t0 = Instant::now();
    let (status, _, _) = post_with(&c, &url, &cancel, Some("sess-A")).await;
    assert_eq!(status, 202);
    let (_, _, v) = tokio::time::timeout(Duration::from_secs(10), caller)
        .await
        .expect("the cancelled call answers at once")
        .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert_eq!(v["id"], 5, "{v}");
    assert_eq!(v["error"]["code"], -32800, "{v}");
    assert_eq!(calls_in_flight(&c, &node).await, 0);
}

// ---------------------------------------------------------------------------------------------
// 3. tool_access.naming: plain
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn coverage_plain_naming_keeps_unique_names_and_prefixes_collisions() {
    let node = Node::start(&format!(
        "tool_access:\n  naming: plain\nmcp_servers:\n{}{}",
        fixture_stdio_yaml("one", ""),
        fixture_stdio_yaml("two", "")
    ));
    let c = client();
    let url = node.url("/mcp");
    // Both servers offer the same tools: every one of them collides and is prefixed.
    let names = tool_names(&c, &url).await;
    for n in ["one__echo", "two__echo", "one__whoami", "two__change_tools"] {
        assert!(names.contains(&n.to_owned()), "{n} missing from {names:?}");
    }
    assert!(!names.contains(&"echo".to_owned()), "{names:?}");
    assert!(!names.iter().any(|n| n.contains("extra")), "{names:?}");
    // The management tools keep their own names.
    assert!(names.contains(&"hangar_call".to_owned()), "{names:?}");

    // `one` gains a tool no other server has: it is exposed under its upstream name.
    assert_eq!(
        text_of(&call_tool(&c, &url, "one__change_tools", json!({})).await),
        "extra tool added"
    );
    let names = wait_for("`extra` in the list", Duration::from_secs(10), || async {
        let names = tool_names(&c, &url).await;
        names.contains(&"extra".to_owned()).then_some(names)
    })
    .await;
    assert!(!names.contains(&"one__extra".to_owned()), "{names:?}");
    assert!(names.contains(&"one__echo".to_owned()), "{names:?}");
    let r = call_tool(&c, &url, "extra", json!({})).await;
    assert_eq!(text_of(&r), "extra", "{r}");
    let r = call_tool(&c, &url, "echo", json!({"message": "x"})).await;
    assert_eq!(r["error"]["data"]["error_type"], "ToolNotFoundError", "{r}");

    // `two` gains it too: now it collides and both copies are prefixed.
    assert_eq!(
        text_of(&call_tool(&c, &url, "two__change_tools", json!({})).await),
        "extra tool added"
    );
    let names = wait_for(
        "`extra` to become prefixed",
        Duration::from_secs(10),
        || async {
            let names = tool_names(&c, &url).await;
            names.contains(&"two__extra".to_owned()).then_some(names)
        },
    )
    .await;
    assert!(names.contains(&"one__extra".to_owned()), "{names:?}");
    assert!(!names.contains(&"extra".to_owned()), "{names:?}");
    let r = call_tool(&c, &url, "extra", json!({})).await;
    assert_eq!(r["error"]["data"]["error_type"], "ToolNotFoundError", "{r}");
    let r = call_tool(&c, &url, "two__whoami", json!({})).await;
    let who: Value = serde_json::from_str(&text_of(&r)).unwrap();
    assert_eq!(who["name"], "two");
}

// ---------------------------------------------------------------------------------------------
// 4. idempotent_tools: retried on the next member only when declared idempotent
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn coverage_idempotent_tool_is_retried_on_the_next_member_and_others_are_not() {
    let fx = fixture();
    let m = |id: &str, extra: &str| {
        format!("  {id}:\n    command: [\"{fx}\", stdio, --name, {id}]\n{extra}")
    };
    let cfg = format!(
        "mcp_servers:\n{}{}{}{}  gi:\n    mode: group\n    strategy: priority\n    members:\n      - {{id: a1, priority: 1}}\n      - {{id: b1, priority: 2}}\n  gn:\n    mode: group\n    strategy: priority\n    members:\n      - {{id: a2, priority: 1}}\n      - {{id: b2, priority: 2}}\n",
        m("a1", "    idempotent_tools: [crash_after]\n"),
        m("b1", "    idempotent_tools: [\"crash_*\", echo]\n"),
        m("a2", "    idempotent_tools: [echo]\n"),
        m("b2", "")
    );
    let node = Node::start(&cfg);
    let c = client();
    let url = node.url("/mcp");
    // Both groups are up and route to their first member.
    for (g, first) in [("gi", "a1"), ("gn", "a2")] {
        let r = call_tool(&c, &url, &format!("{g}__whoami"), json!({})).await;
        let who: Value = serde_json::from_str(&text_of(&r)).unwrap();
        assert_eq!(who["name"], first, "{r}");
    }

    // Idempotent: the first member dies during the call; the call is sent again to b1.
    let r = call_tool(&c, &url, "gi__crash_after", json!({"n": 1, "name": "a1"})).await;
    assert_eq!(
        text_of(&r),
        "b1 spared at call 1",
        "retried on the other member: {r}"
    );
    wait_for("a1's crash in its log", Duration::from_secs(10), || async {
        log_lines(&c, &node, "a1")
            .await
            .iter()
            .any(|l| l.contains("crashing on purpose"))
            .then_some(())
    })
    .await;

    // Not idempotent (b2 does not declare it): the error comes back and b2 never saw it.
    let t0 = Instant::now();
    let r = call_tool(&c, &url, "gn__crash_after", json!({"n": 1, "name": "a2"})).await;
    assert!(t0.elapsed() < Duration::from_secs(10), "{r}");
    assert_eq!(r["error"]["code"], -32000, "{r}");
    assert_eq!(
        r["error"]["data"]["error_type"], "ToolInvocationError",
        "{r}"
    );
    assert_eq!(r["error"]["data"]["mcp_server"], "a2", "{r}");
    wait_for("a2's crash in its log", Duration::from_secs(10), || async {
        log_lines(&c, &node, "a2")
            .await
            .iter()
            .any(|l| l.contains("crashing on purpose"))
            .then_some(())
    })
    .await;
    // b2's first tool call is this one: the failed call was not re-sent to it.
    let r = rpc(
        &c,
        &node.url("/servers/b2/mcp"),
        "tools/call",
        json!({"name": "crash_after", "arguments": {"n": 1, "name": "nobody"}}),
    )
    .await
    .response();
    assert_eq!(text_of(&r), "b2 spared at call 1", "{r}");
}

// ---------------------------------------------------------------------------------------------
// 5. NoAvailableMemberError
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn coverage_group_without_a_startable_member_fails_with_no_available_member() {
    let cfg = "mcp_servers:\n  m1:\n    command: [/nonexistent/hangar-test-m1]\n  m2:\n    command: [/nonexistent/hangar-test-m2]\n  g:\n    mode: group\n    members: [{id: m1}, {id: m2}]\n";
    let node = Node::start(cfg);
    let c = client();
    let url = node.url("/mcp");
    let t0 = Instant::now();
    let r = call_tool(&c, &url, "g__echo", json!({"message": "hi"})).await;
    assert!(t0.elapsed() < Duration::from_secs(20), "fails fast: {r}");
    assert_eq!(r["error"]["code"], -32000, "{r}");
    assert_eq!(
        r["error"]["data"]["error_type"], "NoAvailableMemberError",
        "{r}"
    );
    assert_eq!(r["error"]["data"]["group"], "g", "{r}");
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(
        msg.starts_with("no available member in group 'g': "),
        "{msg}"
    );
    assert!(
        msg.contains("m1: ") && msg.contains("m2: "),
        "names every member: {msg}"
    );

    // The same through the batch tool.
    let r = call_tool(
        &c,
        &url,
        "hangar_call",
        json!({"calls": [{"mcp_server": "g", "tool": "echo", "arguments": {"message": "hi"}}]}),
    )
    .await;
    let v = &r["result"]["structuredContent"];
    assert_eq!(v["success"], false, "{r}");
    assert_eq!(v["failed"], 1, "{r}");
    let res = &v["results"][0];
    assert_eq!(res["success"], false, "{r}");
    assert_eq!(res["error_type"], "NoAvailableMemberError", "{r}");
    assert!(
        res["error"]
            .as_str()
            .unwrap()
            .starts_with("no available member in group 'g'"),
        "{r}"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Non-default group health thresholds
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn coverage_member_leaves_rotation_exactly_at_a_custom_unhealthy_threshold() {
    let cfg = format!(
        "mcp_servers:\n  broken:\n    command: [/nonexistent/hangar-test-broken]\n  ok:\n    command: [\"{}\", stdio, --name, ok]\n  g:\n    mode: group\n    strategy: priority\n    health: {{unhealthy_threshold: 4, healthy_threshold: 3}}\n    members:\n      - {{id: broken, priority: 1}}\n      - {{id: ok, priority: 2}}\n",
        fixture()
    );
    let node = Node::start(&cfg);
    let c = client();
    let url = node.url("/mcp");
    let m = member(&c, &node, "g", "broken").await;
    assert_eq!(m["in_rotation"], true, "{m}");
    assert_eq!(m["consecutive_failures"], 0, "{m}");
    for i in 1..=5u64 {
        let r = call_tool(&c, &url, "g__whoami", json!({})).await;
        let who: Value = serde_json::from_str(&text_of(&r)).unwrap();
        assert_eq!(who["name"], "ok", "call {i}: {r}");
        let m = member(&c, &node, "g", "broken").await;
        if i < 4 {
            // Tried first on every call (priority 1), failed, still in rotation.
            assert_eq!(m["consecutive_failures"], i, "call {i}: {m}");
            assert_eq!(
                m["in_rotation"], true,
                "not before the threshold (call {i}): {m}"
            );
        } else {
            // Out at the 4th failure; afterwards not tried while `ok` serves.
            assert_eq!(m["consecutive_failures"], 4, "call {i}: {m}");
            assert_eq!(
                m["in_rotation"], false,
                "out at the threshold (call {i}): {m}"
            );
        }
    }
    let ok = member(&c, &node, "g", "ok").await;
    assert_eq!(ok["in_rotation"], true, "{ok}");
    assert_eq!(ok["consecutive_failures"], 0, "{ok}");
    let (_, ev) = get_json(&c, &node.url("/api/events?since=0&limit=1000&sync=true")).await;
    let left: Vec<&Value> = ev["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            e["event_type"] == "GroupMemberHealthChanged"
                && e["data"]["member_id"] == "broken"
                && e["data"]["in_rotation"] == false
        })
        .collect();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0]["data"]["reason"], "unhealthy_threshold_reached");
}

// ---------------------------------------------------------------------------------------------
// 7. hangarctl servers | tools | call
// ---------------------------------------------------------------------------------------------

/// Run `hangarctl --endpoint <node> args…`; returns (exit code, stdout, stderr).
fn ctl(node: &Node, args: &[&str]) -> (i32, String, String) {
    hangarctl_on(node, args)
}

/// `ctl` that must succeed; returns stdout.
fn ctl_ok(node: &Node, args: &[&str]) -> String {
    let (code, out, err) = ctl(node, args);
    assert_eq!(code, 0, "hangarctl {args:?} failed: {out}{err}");
    out
}

/// `ctl --output json` that must succeed; returns the parsed stdout.
fn ctl_json(node: &Node, args: &[&str]) -> Value {
    let mut a = vec!["--output", "json"];
    a.extend_from_slice(args);
    let out = ctl_ok(node, &a);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

#[test]
fn coverage_hangarctl_servers_tools_and_call_against_a_real_node() {
    let node = Node::start(&format!(
        "mcp_servers:\n{}{}",
        fixture_stdio_yaml("fx", "    description: the fixture\n"),
        fixture_stdio_yaml("second", "    env:\n      GREETING: hi there\n")
    ));

    // servers list: JSON and table.
    let v = ctl_json(&node, &["servers", "list"]);
    let list = v["mcp_servers"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{v}");
    assert_eq!(list[0]["mcp_server"], "fx");
    assert_eq!(list[0]["state"], "cold");
    assert_eq!(list[1]["mcp_server"], "second");
    let t = ctl_ok(&node, &["servers", "list"]);
    let mut lines = t.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "MCP_SERVER",
            "MODE",
            "NODE",
            "STATE",
            "TOOLS_COUNT",
            "DESCRIPTION"
        ],
        "{t}"
    );
    let row = lines.next().unwrap();
    assert!(
        row.starts_with("fx ") && row.contains("cold") && row.ends_with("the fixture"),
        "{t}"
    );
    // The NODE column: once the leader (this node) placed them, node 1 hosts everything.
    poll_until("NODE column says 1", Duration::from_secs(10), || {
        let t = ctl_ok(&node, &["servers", "list"]);
        let row = t.lines().nth(1)?.to_owned();
        (row.split_whitespace().nth(2) == Some("1")).then_some(())
    });
    let (code, _, err) = ctl(&node, &["servers", "list", "--state", "sleepy"]);
    assert_eq!(code, 1);
    assert!(err.contains("state must be one of"), "{err}");
    let v = ctl_json(&node, &["servers", "list", "--state", "ready"]);
    assert_eq!(v["mcp_servers"], json!([]), "{v}");

    // servers start / get / tools.
    let t = ctl_ok(&node, &["servers", "start", "fx"]);
    assert!(t.starts_with("fx is ready ("), "{t}");
    let v = ctl_json(&node, &["servers", "get", "fx"]);
    assert_eq!(v["state"], "ready", "{v}");
    let t = ctl_ok(&node, &["servers", "get", "fx"]);
    assert!(
        t.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["state", "ready"]),
        "{t}"
    );
    let v = ctl_json(&node, &["servers", "tools", "fx"]);
    let tools = v["tools"].as_array().unwrap();
    assert!(
        tools
            .iter()
            .any(|t| t["name"] == "echo" && t["description"] == "Echo a message"),
        "{v}"
    );
    let t = ctl_ok(&node, &["servers", "tools", "fx"]);
    assert!(
        t.lines()
            .any(|l| l.starts_with("echo ") && l.ends_with("Echo a message")),
        "{t}"
    );
    let v = ctl_json(&node, &["servers", "list", "--state", "ready"]);
    assert_eq!(v["mcp_servers"][0]["mcp_server"], "fx", "{v}");
    let (code, _, err) = ctl(&node, &["servers", "get", "ghost"]);
    assert_eq!(code, 1);
    assert!(err.contains("404") && err.contains("ghost"), "{err}");

    // tools list.
    let v = ctl_json(&node, &["tools", "list"]);
    let echo = v["tools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["exposed_name"] == "fx__echo")
        .unwrap_or_else(|| panic!("no fx__echo in {v}"));
    assert_eq!(echo["mcp_server_id"], "fx");
    let t = ctl_ok(&node, &["tools", "list"]);
    assert!(t.starts_with("EXPOSED_NAME"), "{t}");
    assert!(
        t.lines()
            .any(|l| l.split_whitespace().take(2).collect::<Vec<_>>() == ["fx__echo", "fx"]),
        "{t}"
    );

    // call: a result, a tool error, a JSON-RPC error, bad arguments.
    assert_eq!(
        ctl_ok(
            &node,
            &["call", "fx", "echo", "--args", r#"{"message":"hello ctl"}"#]
        ),
        "hello ctl\n"
    );
    let v = ctl_json(&node, &["call", "fx", "add", "--args", r#"{"a":2,"b":3}"#]);
    assert_eq!(v["structuredContent"]["result"], 5.0, "{v}");
    assert_eq!(
        ctl_ok(
            &node,
            &["call", "fx", "fail", "--args", r#"{"message":"boom"}"#]
        ),
        "tool reported an error:\nboom\n"
    );
    let (code, _, err) = ctl(
        &node,
        &[
            "call",
            "fx",
            "rpc_error",
            "--args",
            r#"{"code":-32042,"message":"nope"}"#,
        ],
    );
    assert_eq!(code, 1);
    assert!(err.contains("nope (code -32042)"), "{err}");
    let (code, _, err) = ctl(&node, &["call", "fx", "echo", "--args", "[1]"]);
    assert_eq!(code, 1);
    assert!(err.contains("--args must be a JSON object"), "{err}");
    let (code, _, err) = ctl(&node, &["call", "ghost", "echo"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("Unknown tool") && err.contains("-32602"),
        "{err}"
    );

    // A second server: call it, its logs, stop, rm.
    assert_eq!(
        ctl_ok(
            &node,
            &["call", "second", "env", "--args", r#"{"name":"GREETING"}"#]
        ),
        "hi there\n"
    );
    let out = ctl_ok(&node, &["call", "second", "whoami"]);
    let who: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(who["name"], "second");
    let t = ctl_ok(&node, &["servers", "logs", "second", "--lines", "1000"]);
    assert!(
        t.lines()
            .any(|l| l.starts_with("[stderr] ") && l.contains("fixture second")),
        "{t}"
    );
    assert_eq!(
        ctl_ok(&node, &["servers", "stop", "second"]),
        "stopped second\n"
    );
    let v = ctl_json(&node, &["servers", "get", "second"]);
    assert_eq!(v["state"], "cold", "{v}");
    assert_eq!(
        ctl_ok(&node, &["servers", "rm", "second"]),
        "deleted second\n"
    );
    let err = poll_until("the removed server to go", Duration::from_secs(10), || {
        let (code, _, err) = ctl(&node, &["servers", "get", "second"]);
        (code == 1).then_some(err)
    });
    assert!(err.contains("404"), "{err}");
    let v = ctl_json(&node, &["servers", "list"]);
    assert_eq!(v["mcp_servers"].as_array().unwrap().len(), 1, "{v}");
}

/// `hangarctl servers add` of a subprocess server and of a remote one (`--url`), next to the
/// global `--endpoint` that names the node. (They once were one clap argument: the node URL
/// was sent as every new server's `endpoint`.)
#[test]
fn coverage_hangarctl_servers_add() {
    let node = Node::start(&format!("mcp_servers:\n{}", fixture_stdio_yaml("fx", "")));
    let fx = fixture();
    let t = ctl_ok(
        &node,
        &[
            "servers",
            "add",
            "added",
            "--mode",
            "subprocess",
            "--command",
            &fx,
            "--command",
            "stdio",
            "--command=--name",
            "--command",
            "added",
            "--env",
            "GREETING=hi there",
            "--description",
            "added by ctl",
        ],
    );
    assert_eq!(t, "created added\n");
    let v = poll_until("the added server", Duration::from_secs(10), || {
        let (code, out, _) = ctl(&node, &["--output", "json", "servers", "get", "added"]);
        (code == 0).then(|| serde_json::from_str::<Value>(&out).unwrap())
    });
    assert_eq!(v["description"], "added by ctl", "{v}");
    assert_eq!(
        ctl_ok(
            &node,
            &["call", "added", "env", "--args", r#"{"name":"GREETING"}"#]
        ),
        "hi there\n"
    );
    let web = FixtureHttp::start("web");
    let t = ctl_ok(
        &node,
        &[
            "servers", "add", "web", "--mode", "remote", "--url", &web.url,
        ],
    );
    assert_eq!(t, "created web\n");
    let out = poll_until("the remote server", Duration::from_secs(10), || {
        let (code, out, _) = ctl(&node, &["call", "web", "whoami"]);
        (code == 0).then_some(out)
    });
    let who: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(who["name"], "web");
}

/// `GET /api/tools/` reports each tool's `exposed_name`; under `naming: plain` that must be
/// the name `tools/list` exposes.
/// (It once reported `<server>__<tool>` whatever the naming.)
#[tokio::test]
async fn coverage_plain_naming_rest_tools_report_the_exposed_names() {
    let node = Node::start(&format!(
        "tool_access:\n  naming: plain\nmcp_servers:\n{}",
        fixture_stdio_yaml("solo", "")
    ));
    let c = client();
    let names = tool_names(&c, &node.url("/mcp")).await;
    assert!(names.contains(&"echo".to_owned()), "{names:?}");
    let (_, v) = get_json(&c, &node.url("/api/tools/")).await;
    let echo = v["tools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["mcp_server_id"] == "solo" && t["tool_name"] == "echo")
        .unwrap_or_else(|| panic!("no solo/echo in {v}"))
        .clone();
    assert_eq!(echo["exposed_name"], "echo", "{echo}");
}
