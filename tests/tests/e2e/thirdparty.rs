//! Real third-party upstreams behind a real node: npm `@modelcontextprotocol/server-everything`
//! and PyPI `mcp-server-time`, both over stdio, installed by `scripts/deps.sh` under
//! `$HANGAR_DEPS` (default `~/.cache/hangar/deps`). When they are absent the tests fail and say
//! how to install them (scripts/test.sh always installs them first): a test whose peer is
//! missing has tested nothing.

use hangar_tests::*;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::Duration;

/// The peers' paths; fails the test, saying what to run, when `scripts/deps.sh` has not run.
struct Peers {
    node: PathBuf,
    everything_js: PathBuf,
    time_bin: PathBuf,
}

fn peers(test: &str) -> Peers {
    let deps = deps_dir(test);
    let p = Peers {
        node: node_bin(&deps),
        everything_js: npm_peer(&deps, "server-everything"),
        time_bin: deps.join("venv/bin/mcp-server-time"),
    };
    assert!(
        p.time_bin.exists(),
        "{} missing: run scripts/deps.sh",
        p.time_bin.display()
    );
    p
}

fn config(p: &Peers) -> String {
    format!(
        "mcp_servers:\n  everything:\n    mode: subprocess\n    command: [{:?}, {:?}, stdio]\n  \
         time:\n    mode: subprocess\n    command: [{:?}, --local-timezone, UTC]\n",
        p.node.display().to_string(),
        p.everything_js.display().to_string(),
        p.time_bin.display().to_string(),
    )
}

fn names(resp: &Value, key: &str, field: &str) -> Vec<String> {
    resp["result"][key]
        .as_array()
        .unwrap_or_else(|| panic!("no {key} in {resp}"))
        .iter()
        .filter_map(|t| t[field].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn everything_and_time_are_aggregated_and_called() {
    let p = peers("everything_and_time_are_aggregated_and_called");
    let node = Node::start(&config(&p));
    let c = client();
    let url = node.url("/mcp");
    let tools = rpc(&c, &url, "tools/list", json!({})).await.response();
    let tools = names(&tools, "tools", "name");
    for want in [
        "everything__echo",
        "everything__get-sum",
        "everything__trigger-long-running-operation",
        "time__get_current_time",
        "time__convert_time",
    ] {
        assert!(tools.iter().any(|n| n == want), "{want} missing: {tools:?}");
    }
    let r = call_tool(&c, &url, "everything__echo", json!({"message": "hi there"})).await;
    assert_eq!(text_of(&r), "Echo: hi there");
    let r = call_tool(&c, &url, "everything__get-sum", json!({"a": 19, "b": 23})).await;
    assert!(text_of(&r).contains("42"), "{r}");
    let r = call_tool(
        &c,
        &url,
        "time__get_current_time",
        json!({"timezone": "UTC"}),
    )
    .await;
    let now: Value = serde_json::from_str(&text_of(&r)).unwrap();
    assert_eq!(now["timezone"], "UTC", "{now}");
    let r = call_tool(
        &c,
        &url,
        "time__convert_time",
        json!({"source_timezone": "UTC", "time": "12:00", "target_timezone": "Asia/Tokyo"}),
    )
    .await;
    let conv: Value = serde_json::from_str(&text_of(&r)).unwrap();
    assert_eq!(
        &conv["target"]["datetime"].as_str().unwrap()[11..16],
        "21:00"
    );
    // A bad argument is the upstream's error, relayed (not a hang, not a gateway crash).
    let r = call_tool(
        &c,
        &url,
        "time__get_current_time",
        json!({"timezone": "Not/AZone"}),
    )
    .await;
    assert!(
        r.get("error").is_some() || r["result"]["isError"] == true,
        "{r}"
    );
    // Unknown tool under a known server prefix.
    let r = call_tool(&c, &url, "everything__no_such_tool", json!({})).await;
    assert!(
        r.get("error").is_some() || r["result"]["isError"] == true,
        "{r}"
    );
}

#[tokio::test]
async fn everything_progress_streams_through_sse() {
    let p = peers("everything_progress_streams_through_sse");
    let node = Node::start(&config(&p));
    let c = client();
    let body = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {
        "name": "everything__trigger-long-running-operation",
        "arguments": {"duration": 0.3, "steps": 3},
        "_meta": {"progressToken": "tok-1"}}})
    .to_string();
    let a = post_raw(&c, &node.url("/mcp"), &body, &[]).await;
    assert_eq!(a.status, 200, "{a:?}");
    assert!(a.content_type.starts_with("text/event-stream"), "{a:?}");
    let msgs = a.messages();
    assert_progress(&msgs, 3, "tok-1");
    let last = msgs.last().unwrap();
    assert_eq!(last["id"], 7);
    assert!(last["result"]["content"].is_array(), "{last}");
}

#[tokio::test]
async fn everything_resources_prompts_and_its_own_endpoint() {
    let p = peers("everything_resources_prompts_and_its_own_endpoint");
    let node = Node::start(&config(&p));
    let c = client();
    let url = node.url("/mcp");
    let res = rpc(&c, &url, "resources/list", json!({})).await.response();
    let uris = names(&res, "resources", "uri");
    let demo = uris
        .iter()
        .find(|u| u.starts_with("demo://"))
        .unwrap_or_else(|| panic!("no server-everything resource in {uris:?}"));
    let read = rpc(&c, &url, "resources/read", json!({"uri": demo}))
        .await
        .response();
    assert_eq!(read["result"]["contents"][0]["uri"], json!(demo), "{read}");
    let prompts = rpc(&c, &url, "prompts/list", json!({})).await.response();
    let prompts = names(&prompts, "prompts", "name");
    assert!(
        prompts.iter().any(|n| n == "everything__simple-prompt"),
        "{prompts:?}"
    );
    let got = rpc(
        &c,
        &url,
        "prompts/get",
        json!({"name": "everything__simple-prompt"}),
    )
    .await
    .response();
    assert!(
        got["result"]["messages"]
            .as_array()
            .is_some_and(|m| !m.is_empty()),
        "{got}"
    );
    // /servers/everything/mcp: the upstream under its own names.
    let own = node.url("/servers/everything/mcp");
    let init = rpc(
        &c,
        &own,
        "initialize",
        json!({"protocolVersion": "2025-06-18", "capabilities": {},
               "clientInfo": {"name": "e2e", "version": "1"}}),
    )
    .await
    .response();
    assert_eq!(init["result"]["protocolVersion"], "2025-06-18", "{init}");
    let tools = rpc(&c, &own, "tools/list", json!({})).await.response();
    let tools = names(&tools, "tools", "name");
    assert!(tools.iter().any(|n| n == "echo"), "{tools:?}");
    assert!(tools.iter().all(|n| !n.contains("__")), "{tools:?}");
    let r = call_tool(&c, &own, "echo", json!({"message": "own"})).await;
    assert_eq!(text_of(&r), "Echo: own");
}

/// Issue 7's report: a round-robin group of two server-everything members with `echo`
/// declared idempotent, eight clients calling `g__echo` back to back, members SIGKILLed
/// alternately (never both dead at once). Before the fix, from the second or third kill on
/// about half of all calls failed: each kill charged its member one failure per call in
/// flight, both members went DEGRADED and the group breaker opened for a minute. Now no call
/// fails, no member is DEGRADED, and the breaker stays closed.
#[tokio::test]
async fn alternating_member_kills_under_load_fail_no_call() {
    let p = peers("alternating_member_kills_under_load_fail_no_call");
    let member = |id: &str| {
        format!(
            "  {id}:\n    mode: subprocess\n    command: [{:?}, {:?}, stdio]\n    idempotent_tools: [echo]\n",
            p.node.display().to_string(),
            p.everything_js.display().to_string(),
        )
    };
    let cfg = format!(
        "mcp_servers:\n{}{}  g:\n    mode: group\n    strategy: round_robin\n    members:\n      - id: m1\n      - id: m2\n",
        member("m1"),
        member("m2")
    );
    let node = Node::start(&cfg);
    let c = client();
    let url = node.url("/mcp");
    // Both members up before the load starts.
    for _ in 0..4 {
        let r = call_tool(&c, &url, "g__echo", json!({"message": "warm"})).await;
        assert!(text_of(&r).contains("warm"), "{r}");
    }

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ok = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let clients: Vec<_> = (0..8)
        .map(|k| {
            let (c, url, stop, ok) = (c.clone(), url.clone(), stop.clone(), ok.clone());
            tokio::spawn(async move {
                let mut failures = Vec::new();
                // Bounded: the main task stops the clients; the count is a backstop.
                for i in 0..200_000u32 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let msg = format!("c{k}-{i}");
                    let r = call_tool(&c, &url, "g__echo", json!({"message": msg})).await;
                    let text = r["result"]["content"][0]["text"]
                        .as_str()
                        .unwrap_or_default();
                    if text.contains(&msg) && r["result"]["isError"] != true {
                        ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    } else if failures.len() < 5 {
                        failures.push(r.to_string());
                    } else {
                        failures.push(String::new());
                    }
                }
                failures
            })
        })
        .collect();

    let pid_of = |v: &Value| v["pid"].as_u64();
    for kill in 0..6 {
        let id = if kill % 2 == 0 { "m1" } else { "m2" };
        let pid = wait_for(
            "the member to be ready",
            Duration::from_secs(20),
            || async {
                let (_, v) = get_json(&c, &node.url(&format!("/api/mcp_servers/{id}"))).await;
                (v["state"] == "ready").then(|| pid_of(&v)).flatten()
            },
        )
        .await;
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
        let before = ok.load(std::sync::atomic::Ordering::Relaxed);
        // Back with a new process, and the load has moved on: then kill the other one.
        wait_for(
            "the killed member back and calls flowing",
            Duration::from_secs(30),
            || async {
                let (_, v) = get_json(&c, &node.url(&format!("/api/mcp_servers/{id}"))).await;
                let back = v["state"] == "ready" && pid_of(&v).is_some_and(|p| p != pid);
                let moved = ok.load(std::sync::atomic::Ordering::Relaxed) >= before + 40;
                (back && moved).then_some(())
            },
        )
        .await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut failed = Vec::new();
    for h in clients {
        failed.extend(h.await.unwrap());
    }
    let ok = ok.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        failed.is_empty(),
        "{} of {} calls failed; first: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 240, "the load ran: {ok} calls");
    let (_, g) = get_json(&c, &node.url("/api/groups/g")).await;
    for m in g["members"].as_array().unwrap() {
        assert_eq!(m["in_rotation"], true, "{g}");
    }
    for id in ["m1", "m2"] {
        let (_, v) = get_json(&c, &node.url(&format!("/api/mcp_servers/{id}"))).await;
        assert_eq!(v["state"], "ready", "{v}");
        // Killed three times with eight calls in flight: each death is one failure (at most
        // two, when a call's write fails just before the exit is noticed), and the restarted
        // process starts with a clean count.
        let h = &v["health"];
        assert_eq!(h["consecutive_failures"], 0, "{id}: {v}");
        let total = h["total_failures"].as_u64().unwrap_or(99);
        assert!(
            (3..=6).contains(&total),
            "{id} is blamed for the calls that died with it: {total} failures for 3 kills: {v}"
        );
    }
    let metrics = get_text(&c, &node.url("/metrics")).await;
    assert!(
        metrics.contains(r#"mcp_hangar_circuit_breaker_state{mcp_server="g",state="open"} 0"#)
            || !metrics.contains(r#"mcp_server="g",state="open""#),
        "the group breaker never stays open"
    );
    let (_, ev) = get_json(&c, &node.url("/api/events?since=0&limit=10000&sync=true")).await;
    let bad: Vec<&Value> = ev["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            e["event_type"] == "GroupCircuitOpened" || e["event_type"] == "McpServerDegraded"
        })
        .collect();
    assert!(
        bad.is_empty(),
        "no member may go DEGRADED and no group circuit open: {bad:?}"
    );
}
