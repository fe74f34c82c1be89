//! Custom roles and scoped role assignments against a real node with auth on: a role defined
//! through the API and assigned for one server lets a key call that server's tools and no
//! other's (`tools/list` shows only those), a lifecycle role scoped to a server starts it and
//! nothing else, a group scope covers the group and its members, invalid definitions are
//! refused (422 unknown permission, 409 built-in name, 409 delete while assigned), every change
//! is an audit event, and `hangarctl roles` creates, assigns with a scope and lists.

use std::process::Command;
use std::time::Duration;

use hangar_tests::*;
use serde_json::{Value, json};

/// A request's status and JSON body.
async fn send(rb: reqwest::RequestBuilder, key: &str) -> (u16, Value) {
    let r = rb.header("X-API-Key", key).send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn post(c: &reqwest::Client, url: String, key: &str, body: Value) -> (u16, Value) {
    send(
        c.post(url)
            .header("Content-Type", "application/json")
            .body(body.to_string()),
        key,
    )
    .await
}

/// One JSON-RPC request to an MCP endpoint with `key`: the HTTP status and the answer.
async fn mcp(c: &reqwest::Client, url: String, key: &str, method: &str, params: Value) -> Value {
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).to_string();
    let r = post_raw(c, &url, &body, &[("X-API-Key", key)]).await;
    assert_eq!(r.status, 200, "{method} on {url}: {}", r.body);
    r.response()
}

fn tool_names(list: &Value) -> Vec<String> {
    let mut names: Vec<String> = list["result"]["tools"]
        .as_array()
        .unwrap_or_else(|| panic!("no tools in {list}"))
        .iter()
        .filter_map(|t| t["name"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    names
}

/// The targets an aggregate `tools/list` shows tools of (the part before `__`; a management
/// tool counts as itself).
fn targets_listed(list: &Value) -> Vec<String> {
    let mut targets: Vec<String> = tool_names(list)
        .into_iter()
        .map(|n| n.split_once("__").map_or(n.clone(), |(t, _)| t.to_owned()))
        .collect();
    targets.dedup();
    targets
}

/// `hangarctl ARGS…` against `node` with `key`: success, stdout, stderr.
fn ctl(node: &Node, key: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin("hangarctl"))
        .arg("--endpoint")
        .arg(&node.base)
        .args(args)
        .env("HANGAR_API_KEY", key)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_roles_scoped_to_a_server_or_group_grant_only_there() {
    let admin = format!("mcp_{:064x}", u128::from(std::process::id()) << 64 | 0x201e);
    let cfg = format!(
        "auth:\n  enabled: true\n  api_key:\n    bootstrap_key: ${{HANGAR_BOOTSTRAP_KEY}}\nmcp_servers:\n{}{}{}  g:\n    mode: group\n    members: [{{id: c}}]\n",
        fixture_stdio_yaml("a", ""),
        fixture_stdio_yaml("b", ""),
        fixture_stdio_yaml("c", ""),
    );
    let node = Node::start_with(&cfg, &[("HANGAR_BOOTSTRAP_KEY", &admin)]);
    let c = client();

    // A custom role; the admin key works once the node's cluster is up.
    let caller = json!({"name": "caller", "permissions": ["tool:invoke", "tool:list"],
        "description": "calls tools"});
    let (s, body) = wait_for(
        "the admin creates a custom role",
        Duration::from_secs(30),
        || async {
            let r = post(&c, node.url("/api/auth/roles"), &admin, caller.clone()).await;
            (r.0 != 503).then_some(r)
        },
    )
    .await;
    assert_eq!(s, 201, "{body}");
    assert_eq!(body["permissions"], json!(["tool:invoke", "tool:list"]));
    // Replacing it: 200.
    let (s, body) = post(&c, node.url("/api/auth/roles"), &admin, caller.clone()).await;
    assert_eq!((s, &body["created"]), (200, &json!(false)), "{body}");
    let ops = json!({"name": "ops", "permissions": ["mcp_servers:lifecycle"]});
    let (s, body) = post(&c, node.url("/api/auth/roles"), &admin, ops).await;
    assert_eq!(s, 201, "{body}");

    // Refusals: an unknown permission (422, named), a built-in name (409), a bad scope (422).
    let (s, body) = post(
        &c,
        node.url("/api/auth/roles"),
        &admin,
        json!({"name": "bad", "permissions": ["tool:invoke", "tools:call", "mcp_servers:fly"]}),
    )
    .await;
    assert_eq!(s, 422, "{body}");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("tools:call")
            && msg.contains("mcp_servers:fly")
            && !msg.contains("tool:invoke"),
        "{msg}"
    );
    let (s, body) = post(
        &c,
        node.url("/api/auth/roles"),
        &admin,
        json!({"name": "viewer", "permissions": ["*:*"]}),
    )
    .await;
    assert_eq!(s, 409, "{body}");
    assert_eq!(body["error"]["code"], "ConflictError", "{body}");
    let (s, body) = post(
        &c,
        node.url("/api/auth/roles/assign"),
        &admin,
        json!({"principal_id": "svc:a", "role_name": "caller", "scope": "tenant:acme"}),
    )
    .await;
    assert_eq!(s, 422, "{body}");

    // A key for `svc:a`, which may call tools of server a only, and start a only.
    let (s, key) = post(
        &c,
        node.url("/api/auth/keys"),
        &admin,
        json!({"principal_id": "svc:a", "name": "scoped"}),
    )
    .await;
    assert_eq!(s, 201, "{key}");
    let key = key["raw_key"].as_str().unwrap().to_owned();
    for (role, scope) in [("caller", "server:a"), ("ops", "server:a")] {
        let (s, body) = post(
            &c,
            node.url("/api/auth/roles/assign"),
            &admin,
            json!({"principal_id": "svc:a", "role_name": role, "scope": scope}),
        )
        .await;
        assert_eq!(s, 200, "{body}");
        assert_eq!(body["scope"], scope);
    }
    let args = json!({"message": "hi"});
    let echo = |server: &str| json!({"name": format!("{server}__echo"), "arguments": args});
    let r = mcp(&c, node.url("/mcp"), &key, "tools/call", echo("a")).await;
    assert_eq!(text_of(&r), "hi", "{r}");
    let r = mcp(&c, node.url("/mcp"), &key, "tools/call", echo("b")).await;
    assert_eq!(r["error"]["code"], -32003, "{r}");
    assert_eq!(r["error"]["data"]["required_permission"], "tool:invoke");
    let r = mcp(&c, node.url("/mcp"), &key, "tools/list", json!({})).await;
    assert_eq!(targets_listed(&r), ["a"], "{r}");
    assert!(tool_names(&r).contains(&"a__echo".to_owned()), "{r}");
    let r = mcp(&c, node.url("/mcp"), &admin, "tools/list", json!({})).await;
    let all = targets_listed(&r);
    assert!(
        ["a", "b", "g", "hangar_list"]
            .iter()
            .all(|t| all.contains(&(*t).to_owned())),
        "{r}"
    );
    // The same through each server's own endpoint.
    let r = mcp(
        &c,
        node.url("/servers/a/mcp"),
        &key,
        "tools/list",
        json!({}),
    )
    .await;
    assert!(tool_names(&r).contains(&"echo".to_owned()), "{r}");
    let r = mcp(
        &c,
        node.url("/servers/b/mcp"),
        &key,
        "tools/list",
        json!({}),
    )
    .await;
    assert_eq!(r["error"]["code"], -32003, "no tool:list on b: {r}");
    let r = mcp(
        &c,
        node.url("/servers/b/mcp"),
        &key,
        "tools/call",
        json!({"name": "echo", "arguments": args}),
    )
    .await;
    assert_eq!(r["error"]["code"], -32003, "{r}");
    // Management tools need global permissions.
    let r = mcp(
        &c,
        node.url("/mcp"),
        &key,
        "tools/call",
        json!({"name": "hangar_list", "arguments": {}}),
    )
    .await;
    assert_eq!(r["error"]["code"], -32003, "{r}");
    // REST: lifecycle on a, not on b; nothing the roles do not grant.
    let (s, body) = post(&c, node.url("/api/mcp_servers/a/start"), &key, json!({})).await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = post(&c, node.url("/api/mcp_servers/b/start"), &key, json!({})).await;
    assert_eq!(s, 403, "{body}");
    assert_eq!(body["error"]["code"], "AccessDeniedError", "{body}");
    let (s, _) = send(c.get(node.url("/api/mcp_servers/a")), &key).await;
    assert_eq!(s, 403, "mcp_servers:read was not granted");
    let (s, me) = send(c.get(node.url("/api/system/me")), &key).await;
    assert_eq!(s, 200);
    assert_eq!(
        me["scoped_roles"],
        json!({"server:a": ["caller", "ops"]}),
        "{me}"
    );

    // A group scope covers the group and its members.
    let (s, body) = post(
        &c,
        node.url("/api/auth/roles/assign"),
        &admin,
        json!({"principal_id": "svc:a", "role_name": "caller", "scope": "group:g"}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let r = mcp(&c, node.url("/mcp"), &key, "tools/list", json!({})).await;
    assert_eq!(targets_listed(&r), ["a", "g"], "{r}");
    let r = mcp(&c, node.url("/mcp"), &key, "tools/call", echo("g")).await;
    assert_eq!(text_of(&r), "hi", "{r}");
    let r = mcp(
        &c,
        node.url("/servers/c/mcp"),
        &key,
        "tools/call",
        json!({"name": "echo", "arguments": args}),
    )
    .await;
    assert_eq!(text_of(&r), "hi", "{r}");
    let (s, _) = post(&c, node.url("/api/mcp_servers/c/start"), &key, json!({})).await;
    assert_eq!(s, 403, "ops is scoped to a only");

    // The list shows who holds what where; a role still assigned is not deleted.
    let (s, list) = send(c.get(node.url("/api/auth/roles")), &admin).await;
    assert_eq!(s, 200);
    let role = |name: &str| {
        list["roles"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no role {name} in {list}"))
    };
    assert_eq!(role("caller")["builtin"], false);
    assert_eq!(role("caller")["description"], "calls tools");
    assert_eq!(
        role("caller")["assignments"],
        json!([{"principal_id": "svc:a", "scope": "group:g", "source": "api"},
            {"principal_id": "svc:a", "scope": "server:a", "source": "api"}])
    );
    assert_eq!(role("viewer")["builtin"], true);
    let (s, body) = send(c.delete(node.url("/api/auth/roles/ops")), &admin).await;
    assert_eq!(s, 409, "{body}");
    assert_eq!(
        body["error"]["details"]["assignments"],
        json!([{"principal_id": "svc:a", "scope": "server:a", "source": "api"}])
    );
    let (s, _) = send(c.delete(node.url("/api/auth/roles/viewer")), &admin).await;
    assert_eq!(s, 409, "a built-in role");
    // Revoked (that scope only), then deleted.
    let (s, body) = post(
        &c,
        node.url("/api/auth/roles/revoke"),
        &admin,
        json!({"principal_id": "svc:a", "role_name": "ops", "scope": "server:a"}),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    let (s, body) = post(&c, node.url("/api/mcp_servers/a/stop"), &key, json!({})).await;
    assert_eq!(s, 403, "{body}");
    let (s, body) = send(c.delete(node.url("/api/auth/roles/ops")), &admin).await;
    assert_eq!((s, &body["deleted"]), (200, &json!(true)), "{body}");
    let (s, _) = send(c.delete(node.url("/api/auth/roles/ops")), &admin).await;
    assert_eq!(s, 404);
    // The scoped key may not manage roles.
    let (s, _) = post(&c, node.url("/api/auth/roles"), &key, caller.clone()).await;
    assert_eq!(s, 403);

    // hangarctl: create, assign with a scope, list.
    let (ok, out, err) = ctl(
        &node,
        &admin,
        &[
            "roles",
            "create",
            "reader",
            "--permission",
            "mcp_servers:read",
        ],
    );
    assert!(ok, "{out}{err}");
    let (ok, out, err) = ctl(
        &node,
        &admin,
        &["roles", "assign", "svc:a", "reader", "--scope", "server:b"],
    );
    assert!(ok, "{out}{err}");
    let (ok, out, err) = ctl(&node, &admin, &["roles", "list"]);
    assert!(ok, "{err}");
    assert!(
        out.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["svc:a", "reader", "server:b"]),
        "{out}"
    );
    let (ok, _, err) = ctl(
        &node,
        &admin,
        &["roles", "create", "x", "--permission", "nope:read"],
    );
    assert!(
        !ok && err.contains("422") && err.contains("nope:read"),
        "{err}"
    );
    let (s, _) = send(c.get(node.url("/api/mcp_servers/b")), &key).await;
    assert_eq!(s, 200, "reader on b");

    // Every change is an audit event, never with a key.
    wait_for("the role events", Duration::from_secs(10), || async {
        let (_, v) = send(c.get(node.url("/api/events?since=0&limit=1000")), &admin).await;
        let events = v["events"].as_array()?;
        let has = |kind: &str, role: &str| {
            events
                .iter()
                .any(|e| e["event_type"] == kind && e["data"]["role_name"] == role)
        };
        let scoped = events
            .iter()
            .any(|e| e["event_type"] == "RoleAssigned" && e["data"]["scope"] == "server:a");
        (has("CustomRoleCreated", "caller")
            && has("CustomRoleUpdated", "caller")
            && has("CustomRoleDeleted", "ops")
            && has("RoleRevoked", "ops")
            && scoped
            && !v.to_string().contains(&key))
        .then_some(())
    })
    .await;
}

/// A key for `principal` (of `tenant`, if given), created with `admin`: its raw secret.
async fn key_for(
    c: &reqwest::Client,
    node: &Node,
    admin: &str,
    principal: &str,
    tenant: Option<&str>,
) -> String {
    let mut body = json!({"principal_id": principal, "name": principal});
    if let Some(t) = tenant {
        body["tenant"] = json!(t);
    }
    let (s, v) = post(c, node.url("/api/auth/keys"), admin, body).await;
    assert_eq!(s, 201, "{v}");
    v["raw_key"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_assignments_in_the_config_file_grant_by_principal_and_tenant_and_follow_reloads() {
    let admin = format!("mcp_{:064x}", u128::from(std::process::id()) << 64 | 0xf11e);
    let head = "auth:\n  enabled: true\n  api_key:\n    bootstrap_key: ${HANGAR_BOOTSTRAP_KEY}\n";
    let servers = format!("mcp_servers:\n{}", fixture_stdio_yaml("a", ""));
    let assignments = "  role_assignments:\n    - {principal: \"svc:file\", role: developer}\n    - {principal: \"svc:tenant\", role: developer, scope: \"tenant:acme\"}\n";
    let node = Node::start_with(
        &format!("{head}{assignments}{servers}"),
        &[("HANGAR_BOOTSTRAP_KEY", &admin)],
    );
    let c = client();
    let file_key = wait_for(
        "the admin creates a key",
        Duration::from_secs(30),
        || async {
            let (s, v) = post(
                &c,
                node.url("/api/auth/keys"),
                &admin,
                json!({"principal_id": "svc:file", "name": "svc:file"}),
            )
            .await;
            (s != 503).then(|| {
                assert_eq!(s, 201, "{v}");
                v["raw_key"].as_str().unwrap().to_owned()
            })
        },
    )
    .await;
    let acme = key_for(&c, &node, &admin, "svc:tenant", Some("acme")).await;
    let other = key_for(&c, &node, &admin, "svc:tenant", Some("other")).await;
    let call = |key: String| {
        let c = c.clone();
        let url = node.url("/mcp");
        async move {
            mcp(
                &c,
                url,
                &key,
                "tools/call",
                json!({"name": "a__echo", "arguments": {"message": "m"}}),
            )
            .await
        }
    };
    // The file's global assignment, and its tenant-scoped one for the tenant's keys only.
    assert_eq!(
        call(file_key.clone()).await["result"]["content"][0]["text"],
        "m"
    );
    assert_eq!(
        call(acme.clone()).await["result"]["content"][0]["text"],
        "m"
    );
    let denied = call(other.clone()).await;
    assert_eq!(denied["error"]["code"], -32003, "{denied}");
    let (s, me) = send(c.get(node.url("/api/system/me")), &file_key).await;
    assert_eq!((s, &me["roles"]), (200, &json!(["developer"])), "{me}");
    // Listed with their source.
    let (s, roles) = send(c.get(node.url("/api/auth/roles")), &admin).await;
    assert_eq!(s, 200);
    let dev = roles["roles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "developer")
        .unwrap();
    assert!(
        dev["assignments"].as_array().unwrap().contains(
            &json!({"principal_id": "svc:tenant", "scope": "tenant:acme", "source": "config"})
        ),
        "{dev}"
    );
    // A reload without them takes the roles away at once; a bad one keeps them.
    node.write_config(&format!(
        "{head}  role_assignments:\n    - {{principal: \"svc:file\", role: sorcerer}}\n{servers}"
    ));
    let (s, body) = post(&c, node.url("/api/config/reload"), &admin, json!({})).await;
    assert!(s >= 400, "{body}");
    assert!(
        body.to_string().contains("unknown role `sorcerer`"),
        "{body}"
    );
    assert_eq!(
        call(file_key.clone()).await["result"]["content"][0]["text"],
        "m"
    );
    node.write_config(&format!("{head}{servers}"));
    let (s, body) = post(&c, node.url("/api/config/reload"), &admin, json!({})).await;
    assert_eq!(s, 200, "{body}");
    let denied = call(file_key).await;
    assert_eq!(denied["error"]["code"], -32003, "{denied}");
}
