//! Tool access policies through `/api/auth/policies` and `hangarctl policies` (replicated,
//! merged with the config file's): a server policy hides and refuses a tool until it is
//! deleted, a group member's policy applies to the calls routed to that member, principal and
//! role policies apply to some callers only.

use std::time::Duration;

use hangar_tests::*;
use serde_json::{Value, json};

fn ctl(node: &Node, args: &[&str]) -> (i32, String, String) {
    hangarctl_on(node, args)
}

/// Send a request with an optional API key and JSON body: (status, body).
async fn send(
    c: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut rb = c.request(method, url);
    if let Some(k) = key {
        rb = rb.header("X-API-Key", k);
    }
    if let Some(b) = body {
        rb = rb
            .header("Content-Type", "application/json")
            .body(b.to_string());
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn put_policy(
    c: &reqwest::Client,
    node: &Node,
    path: &str,
    key: Option<&str>,
    body: Value,
) -> (u16, Value) {
    send(
        c,
        reqwest::Method::PUT,
        &node.url(&format!("/api/auth/policies/{path}")),
        key,
        Some(body),
    )
    .await
}

async fn delete_policy(c: &reqwest::Client, node: &Node, path: &str, key: Option<&str>) -> u16 {
    send(
        c,
        reqwest::Method::DELETE,
        &node.url(&format!("/api/auth/policies/{path}")),
        key,
        None,
    )
    .await
    .0
}

/// One JSON-RPC request through `url` with an optional API key: the response message.
async fn mcp(
    c: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    method: &str,
    params: Value,
) -> Value {
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).to_string();
    let headers: Vec<(&str, &str)> = key.map(|k| ("X-API-Key", k)).into_iter().collect();
    let a = post_raw(c, url, &body, &headers).await;
    assert_eq!(a.status, 200, "{method} through {url}: {a:?}");
    a.response()
}

async fn tool_names(c: &reqwest::Client, url: &str, key: Option<&str>) -> Vec<String> {
    let r = mcp(c, url, key, "tools/list", json!({})).await;
    r["result"]["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("no tools in {r}"))
        .iter()
        .filter_map(|t| t["name"].as_str().map(str::to_owned))
        .collect()
}

async fn call(c: &reqwest::Client, url: &str, key: Option<&str>, tool: &str, args: Value) -> Value {
    mcp(
        c,
        url,
        key,
        "tools/call",
        json!({"name": tool, "arguments": args}),
    )
    .await
}

/// Assert a refusal by the tool access policies naming `needle`.
fn assert_refused(r: &Value, needle: &str) {
    assert_eq!(r["error"]["code"], -32003, "{r}");
    assert_eq!(
        r["error"]["data"]["error_type"], "ToolAccessDeniedError",
        "{r}"
    );
    let msg = r["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains(needle), "`{needle}` not in: {msg}");
}

/// How many calls of `tool` the HTTP fixture behind `mcp_url` served.
async fn upstream_calls(c: &reqwest::Client, mcp_url: &str, tool: &str) -> u64 {
    let (_, stats) = get_json(c, &mcp_url.replace("/mcp", "/admin/stats")).await;
    stats["counts"][format!("tool:{tool}")]
        .as_u64()
        .unwrap_or(0)
}

fn metric_line(metrics: &str, prefix: &str) -> Option<String> {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .map(str::to_owned)
}

#[tokio::test]
async fn a_server_policy_set_through_the_api_hides_and_refuses_a_tool_until_deleted() {
    let web = FixtureHttp::start("web");
    let node = Node::start(&format!(
        "mcp_servers:\n  web:\n    mode: remote\n    endpoint: {}\n",
        web.url
    ));
    let c = client();
    let agg = node.url("/mcp");
    let direct = node.url("/servers/web/mcp");
    assert_eq!(
        text_of(&call(&c, &agg, None, "web__echo", json!({"message": "1"})).await),
        "1"
    );
    assert!(
        tool_names(&c, &agg, None)
            .await
            .contains(&"web__echo".to_owned())
    );

    // PUT: validated, stored, replicated, announced.
    let (s, v) = put_policy(&c, &node, "server/web", None, json!({"deny": ["echo"]})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["policy"],
        json!({"scope": "server", "target": "web", "allow": [], "deny": ["echo"], "approval": []})
    );
    let (s, v) = get_json(&c, &node.url("/api/auth/policies/server/web")).await;
    assert_eq!((s, &v["policy"]["deny"]), (200, &json!(["echo"])), "{v}");

    // Hidden from both views, refused through both, never reaching the upstream.
    let agg_tools = tool_names(&c, &agg, None).await;
    assert!(
        !agg_tools.contains(&"web__echo".to_owned()) && agg_tools.contains(&"web__add".to_owned()),
        "{agg_tools:?}"
    );
    let direct_tools = tool_names(&c, &direct, None).await;
    assert!(
        !direct_tools.contains(&"echo".to_owned()) && direct_tools.contains(&"add".to_owned()),
        "{direct_tools:?}"
    );
    for (url, tool) in [(&agg, "web__echo"), (&direct, "echo")] {
        let r = call(&c, url, None, tool, json!({"message": "2"})).await;
        assert_refused(&r, "the API policy server/web");
    }
    assert_eq!(upstream_calls(&c, &web.url, "echo").await, 1);
    assert_eq!(
        text_of(&call(&c, &agg, None, "web__add", json!({"a": 1, "b": 2})).await),
        "3"
    );
    let r = call(&c, &agg, None, "hangar_tools", json!({"mcp_server": "web"})).await;
    let listed: Vec<&str> = r["result"]["structuredContent"]["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("no tools in {r}"))
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert!(
        listed.contains(&"add") && !listed.contains(&"echo"),
        "{listed:?}"
    );
    let metrics = get_text(&c, &node.url("/metrics")).await;
    assert_eq!(
        metric_line(&metrics, "mcp_hangar_tool_access_denied_total{mcp_server=\"web\",reason=\"tool_not_in_access_policy\"}").as_deref(),
        Some("mcp_hangar_tool_access_denied_total{mcp_server=\"web\",reason=\"tool_not_in_access_policy\"} 2")
    );
    let (_, ev) = get_json(&c, &node.url("/api/events?since=0&limit=1000&sync=true")).await;
    let set = ev["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event_type"] == "ToolAccessPolicySet")
        .unwrap_or_else(|| panic!("no ToolAccessPolicySet in {ev}"));
    assert_eq!(
        (&set["data"]["scope"], &set["data"]["target"]),
        (&json!("server"), &json!("web"))
    );

    // Refusals name the problem.
    for (path, body, needle) in [
        (
            "tenant/web",
            json!({"deny": ["x"]}),
            "unknown scope `tenant`",
        ),
        (
            "server/web",
            json!({"deny": ["echo", "ad[min"]}),
            "deny[1] `ad[min`: has an unclosed `[`",
        ),
        ("server/web", json!({"deny": [""]}), "deny[0]"),
        ("server/web", json!({}), "at least one"),
        (
            "server/web",
            json!({"deny": ["x"], "approval": ["pay"]}),
            "no approval gate",
        ),
        ("server/web", json!({"denied": ["x"]}), "unknown field"),
        ("global/web", json!({"deny": ["x"]}), "`*`"),
        ("group/web", json!({"deny": ["x"]}), "is a server"),
    ] {
        let (s, v) = put_policy(&c, &node, path, None, body).await;
        assert_eq!(s, 422, "{path}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{path}: `{needle}` not in {msg}");
    }

    // hangarctl: a global policy, listed with the server's, removed again.
    let (code, out, err) = ctl(&node, &["policies", "set", "global", "--deny", "ad?"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_refused(
        &call(&c, &agg, None, "web__add", json!({"a": 1, "b": 2})).await,
        "the API policy global/*",
    );
    let (code, out, _) = ctl(&node, &["policies", "get"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("global")
            && out.contains("ad?")
            && out.contains("web")
            && out.contains("echo"),
        "{out}"
    );
    let (code, out, _) = ctl(
        &node,
        &["--output", "json", "policies", "get", "server", "web"],
    );
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["policy"]["deny"], json!(["echo"]));
    assert_eq!(ctl(&node, &["policies", "rm", "global"]).0, 0);
    let (code, _, err) = ctl(&node, &["policies", "rm", "global"]);
    assert_eq!(code, 1);
    assert!(err.contains("404"), "{err}");

    // DELETE: allowed again; a second DELETE is a 404.
    assert_eq!(delete_policy(&c, &node, "server/web", None).await, 200);
    assert!(
        tool_names(&c, &agg, None)
            .await
            .contains(&"web__echo".to_owned())
    );
    assert_eq!(
        text_of(&call(&c, &direct, None, "echo", json!({"message": "3"})).await),
        "3"
    );
    assert_eq!(upstream_calls(&c, &web.url, "echo").await, 2);
    assert_eq!(delete_policy(&c, &node, "server/web", None).await, 404);
    let (_, v) = get_json(&c, &node.url("/api/auth/policies")).await;
    assert_eq!(v["count"], 0, "{v}");
}

#[tokio::test]
async fn a_members_policy_applies_to_the_calls_routed_to_that_member() {
    // `pool` prefers b (priority 1), whose entry denies echo; a (priority 2) allows it.
    let node = Node::start(&format!(
        "mcp_servers:\n{}{}  pool:\n    mode: group\n    strategy: priority\n    members:\n      - {{id: a, priority: 2}}\n      - {{id: b, priority: 1, tools: {{deny_list: [echo]}}}}\n",
        fixture_stdio_yaml("a", ""),
        fixture_stdio_yaml("b", ""),
    ));
    let c = client();
    let agg = node.url("/mcp");
    // whoami lands on b: the group routes by priority.
    let who = call(&c, &agg, None, "pool__whoami", json!({})).await;
    assert!(text_of(&who).contains("\"name\":\"b\""), "{who}");
    // echo lands on b too, which refuses it; a still takes echo called directly.
    let r = call(&c, &agg, None, "pool__echo", json!({"message": "x"})).await;
    assert_refused(&r, "routed to member 'b'");
    assert_eq!(r["error"]["data"]["group"], "pool", "{r}");
    assert_eq!(r["error"]["data"]["mcp_server"], "b", "{r}");
    let r = call(
        &c,
        &node.url("/servers/pool/mcp"),
        None,
        "echo",
        json!({"message": "x"}),
    )
    .await;
    assert_refused(&r, "the entry of member `b` in group `pool`");
    assert_eq!(
        text_of(
            &call(
                &c,
                &node.url("/servers/a/mcp"),
                None,
                "echo",
                json!({"message": "a"})
            )
            .await
        ),
        "a"
    );
    // Listed: a member (a) would take it.
    assert!(
        tool_names(&c, &agg, None)
            .await
            .contains(&"pool__echo".to_owned())
    );
    // The file's member policy is listed with the API's, marked as the file's.
    let (_, v) = get_json(&c, &node.url("/api/auth/policies")).await;
    assert_eq!(v["count"], 1, "{v}");
    assert_eq!(
        v["policies"][0],
        json!({"scope": "member", "target": "pool/b", "allow": [], "deny": ["echo"],
            "approval": [], "source": "config"})
    );

    // A replicated policy on a member's server id applies when calls land on it; a tool no
    // member takes is not listed.
    let (s, v) = put_policy(&c, &node, "server/b", None, json!({"deny": ["add"]})).await;
    assert_eq!(s, 200, "{v}");
    assert_refused(
        &call(&c, &agg, None, "pool__add", json!({"a": 1, "b": 1})).await,
        "the API policy server/b",
    );
    assert!(
        tool_names(&c, &agg, None)
            .await
            .contains(&"pool__add".to_owned())
    );
    let (s, _) = put_policy(&c, &node, "server/a", None, json!({"deny": ["add"]})).await;
    assert_eq!(s, 200);
    let listed = tool_names(&c, &agg, None).await;
    assert!(
        !listed.contains(&"pool__add".to_owned()) && listed.contains(&"pool__whoami".to_owned()),
        "{listed:?}"
    );
    let direct = tool_names(&c, &node.url("/servers/pool/mcp"), None).await;
    assert!(!direct.contains(&"add".to_owned()), "{direct:?}");
    // A group scope on a server id is refused: it would never apply.
    let (s, v) = put_policy(&c, &node, "server/pool", None, json!({"deny": ["x"]})).await;
    assert_eq!(s, 422, "{v}");

    let metrics = get_text(&c, &node.url("/metrics")).await;
    assert_eq!(
        metric_line(&metrics, "mcp_hangar_tool_access_denied_total{mcp_server=\"b\",reason=\"tool_not_in_access_policy\"}").as_deref(),
        Some("mcp_hangar_tool_access_denied_total{mcp_server=\"b\",reason=\"tool_not_in_access_policy\"} 3")
    );
    // b stays in rotation: refusals are not failures.
    let who = call(&c, &agg, None, "pool__whoami", json!({})).await;
    assert!(text_of(&who).contains("\"name\":\"b\""), "{who}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn principal_and_role_policies_apply_to_their_callers_only() {
    let admin = format!("mcp_{:064x}", u128::from(std::process::id()) << 64 | 0x9011);
    let cfg = format!(
        "auth:\n  enabled: true\n  api_key:\n    bootstrap_key: ${{HANGAR_BOOTSTRAP_KEY}}\nmcp_servers:\n{}",
        fixture_stdio_yaml("fx", "")
    );
    let node = Node::start_with(&cfg, &[("HANGAR_BOOTSTRAP_KEY", &admin)]);
    let c = client();
    let keys_url = node.url("/api/auth/keys");
    // Two developers' keys.
    let mut keys = Vec::new();
    for who in ["alice", "bob"] {
        let created = wait_for("a key is created", Duration::from_secs(30), || async {
            let (s, v) = send(
                &c,
                reqwest::Method::POST,
                &keys_url,
                Some(&admin),
                Some(json!({"principal_id": who, "name": who})),
            )
            .await;
            (s == 201).then_some(v)
        })
        .await;
        let (s, v) = send(
            &c,
            reqwest::Method::POST,
            &node.url("/api/auth/roles/assign"),
            Some(&admin),
            Some(json!({"principal_id": who, "role_name": "developer"})),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        keys.push((
            created["key_id"].as_str().unwrap().to_owned(),
            created["raw_key"].as_str().unwrap().to_owned(),
        ));
    }
    let (alice_id, alice) = (&keys[0].0, keys[0].1.as_str());
    let bob = keys[1].1.as_str();
    let agg = node.url("/mcp");

    // Managing policies needs policy:write (a developer has none); no key is a 401.
    let (s, _) = put_policy(&c, &node, "server/fx", None, json!({"deny": ["x"]})).await;
    assert_eq!(s, 401);
    let (s, v) = put_policy(&c, &node, "server/fx", Some(bob), json!({"deny": ["x"]})).await;
    assert_eq!(s, 403, "{v}");
    let (s, v) = put_policy(
        &c,
        &node,
        &format!("principal/{alice_id}"),
        Some(&admin),
        json!({"deny": ["echo"]}),
    )
    .await;
    assert_eq!(s, 200, "{v}");

    // Alice neither sees nor calls echo; Bob does both.
    assert!(
        !tool_names(&c, &agg, Some(alice))
            .await
            .contains(&"fx__echo".to_owned())
    );
    assert_refused(
        &call(&c, &agg, Some(alice), "fx__echo", json!({"message": "a"})).await,
        &format!("the API policy principal/{alice_id}"),
    );
    assert!(
        tool_names(&c, &agg, Some(bob))
            .await
            .contains(&"fx__echo".to_owned())
    );
    assert_eq!(
        text_of(&call(&c, &agg, Some(bob), "fx__echo", json!({"message": "b"})).await),
        "b"
    );
    assert_eq!(
        text_of(&call(&c, &agg, Some(alice), "fx__add", json!({"a": 2, "b": 2})).await),
        "4"
    );

    // A key's principal (as role assignments name it) works as well as its id.
    let (s, v) = put_policy(
        &c,
        &node,
        "principal/bob",
        Some(&admin),
        json!({"deny": ["whoami"]}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_refused(
        &call(&c, &agg, Some(bob), "fx__whoami", json!({})).await,
        "the API policy principal/bob",
    );
    assert!(text_of(&call(&c, &agg, Some(alice), "fx__whoami", json!({})).await).contains("fx"));
    assert_eq!(
        delete_policy(&c, &node, "principal/bob", Some(&admin)).await,
        200
    );

    // A role policy: every developer is limited to whoami and echo, the admin is not.
    let (s, v) = put_policy(
        &c,
        &node,
        "role/developer",
        Some(&admin),
        json!({"allow": ["whoami", "echo"]}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    for key in [alice, bob] {
        assert_refused(
            &call(&c, &agg, Some(key), "fx__add", json!({"a": 1, "b": 1})).await,
            "no allow pattern of the API policy role/developer",
        );
    }
    assert!(text_of(&call(&c, &agg, Some(bob), "fx__whoami", json!({})).await).contains("fx"));
    assert_eq!(
        text_of(&call(&c, &agg, Some(&admin), "fx__add", json!({"a": 1, "b": 1})).await),
        "2"
    );
    let (s, v) = get_json(&c, &node.url("/api/auth/policies")).await;
    assert_eq!(s, 401, "{v}");
    let (s, v) = send(
        &c,
        reqwest::Method::GET,
        &node.url("/api/auth/policies"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!((s, &v["count"]), (200, &json!(2)), "{v}");

    // Removed: Alice calls echo again.
    assert_eq!(
        delete_policy(&c, &node, &format!("principal/{alice_id}"), Some(&admin)).await,
        200
    );
    assert_eq!(
        text_of(
            &call(
                &c,
                &agg,
                Some(alice),
                "fx__echo",
                json!({"message": "again"})
            )
            .await
        ),
        "again"
    );
}
