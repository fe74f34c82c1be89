//! Hardening: request limits at the HTTP listener (JSON depth, body size, header size, the
//! REST deadline), the subprocess command allow-list, literal-secret warnings, and the one-time
//! `hangar auth bootstrap-admin`.

use std::process::Command;
use std::time::{Duration, Instant};

use hangar_tests::*;
use serde_json::{Value, json};

/// `[[[…]]]` nested `n` deep.
fn nested(n: usize) -> String {
    format!("{}{}", "[".repeat(n), "]".repeat(n))
}

async fn still_serves(c: &reqwest::Client, node: &Node) {
    let (status, _) = get_json(c, &node.url("/health/live")).await;
    assert_eq!(status, 200);
    let r = call_tool(
        c,
        &node.url("/mcp"),
        "fx__echo",
        json!({"message": "still here"}),
    )
    .await;
    assert_eq!(text_of(&r), "still here", "{r}");
    let (status, v) = get_json(c, &node.url("/api/mcp_servers/")).await;
    assert_eq!(status, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_json_large_bodies_and_huge_headers_are_refused_and_the_node_serves_on() {
    let c = client();
    let cfg = format!(
        "server:\n  max_body_bytes: 65536\nmcp_servers:\n{}    env:\n      GITHUB_TOKEN: ghp_literal_for_the_warning\n",
        fixture_stdio_yaml("fx", "")
    );
    let node = Node::start(&cfg);
    still_serves(&c, &node).await;
    // `hangar serve` logs the literal secret of its file (as `hangar validate` prints it).
    assert!(
        node.proc.stderr().contains("config_literal_secret")
            && node
                .proc
                .stderr()
                .contains("mcp_servers.fx.env.GITHUB_TOKEN"),
        "{}",
        node.proc.stderr()
    );

    // JSON nested deeper than server.max_json_depth (64): 400 before anything parses it.
    let deep_call = format!(
        r#"{{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{{"name":"fx__echo","arguments":{{"message":"x","deep":{}}}}}}}"#,
        nested(100)
    );
    for path in ["/mcp", "/servers/fx/mcp"] {
        let a = post_raw(&c, &node.url(path), &deep_call, &[]).await;
        assert_eq!(a.status, 400, "{path}: {a:?}");
        let v: Value = serde_json::from_str(&a.body).unwrap();
        assert_eq!(v["error"]["code"], -32600, "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("deeper than 64 levels") && msg.contains("server.max_json_depth"),
            "{msg}"
        );
    }
    let a = post_raw(
        &c,
        &node.url("/api/mcp_servers/"),
        &format!(
            r#"{{"mcp_server_id":"d","mode":"remote","x":{}}}"#,
            nested(80)
        ),
        &[],
    )
    .await;
    assert_eq!(a.status, 400, "{a:?}");
    let v: Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!(v["error"]["code"], "ValidationError", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("server.max_json_depth"),
        "{v}"
    );
    // Nesting within the limit passes (and brackets inside strings do not count).
    let ok = call_tool(
        &c,
        &node.url("/mcp"),
        "fx__echo",
        json!({"message": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
               "n": serde_json::from_str::<Value>(&nested(40)).unwrap()}),
    )
    .await;
    assert!(text_of(&ok).starts_with("[[[["), "{ok}");
    still_serves(&c, &node).await;

    // Bodies above server.max_body_bytes: 413 on MCP and REST alike.
    let big = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"fx__echo","arguments":{{"message":"{}"}}}}}}"#,
        "a".repeat(100_000)
    );
    let a = post_raw(&c, &node.url("/mcp"), &big, &[]).await;
    assert_eq!(a.status, 413, "{a:?}");
    assert!(a.body.contains("server.max_body_bytes"), "{a:?}");
    let a = post_raw(&c, &node.url("/api/mcp_servers/"), &big, &[]).await;
    assert_eq!(a.status, 413, "{a:?}");
    let v: Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!(v["error"]["code"], "PayloadTooLarge", "{v}");
    still_serves(&c, &node).await;

    // A 64 KiB header: 431 (server.max_header_bytes, 16 KiB), on every path.
    let huge = "a".repeat(64 * 1024);
    for path in ["/api/system/", "/mcp", "/health/live"] {
        let r = c
            .post(node.url(path))
            .header("Content-Type", "application/json")
            .header("X-Padding", &huge)
            .body(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#)
            .send()
            .await;
        match r {
            Ok(r) => {
                assert_eq!(r.status().as_u16(), 431, "{path}");
                let body = r.text().await.unwrap();
                assert!(body.contains("server.max_header_bytes"), "{path}: {body}");
            }
            // Refusing the connection is acceptable too.
            Err(e) => eprintln!("{path}: connection refused the 64 KiB header: {e}"),
        }
    }
    still_serves(&c, &node).await;
}

fn sleep_bin() -> &'static str {
    ["/usr/bin/sleep", "/bin/sleep"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("a sleep binary")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rest_request_past_the_deadline_gets_504_and_the_node_serves_on() {
    let c = client();
    // A "server" that never answers `initialize`: starting it outlasts the 1 s deadline.
    let cfg = format!(
        "server:\n  request_timeout_s: 1\nmcp_servers:\n{}  mute:\n    command: [{}, \"60\"]\n",
        fixture_stdio_yaml("fx", ""),
        sleep_bin()
    );
    let node = Node::start(&cfg);
    let t0 = Instant::now();
    let (status, v) = post_json(&c, &node.url("/api/mcp_servers/mute/start"), json!({})).await;
    let took = t0.elapsed();
    assert_eq!(status, 504, "{v}");
    assert_eq!(v["error"]["code"], "RequestTimeout", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("server.request_timeout_s"),
        "{v}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
    still_serves(&c, &node).await;
}

#[test]
fn validate_warns_about_literal_secrets_and_refuses_commands_off_the_allow_list() {
    let dir = tempfile::tempdir().unwrap();
    let validate = |yaml: &str, env: &[(&str, &str)]| {
        let f = dir.path().join("c.yaml");
        std::fs::write(&f, yaml).unwrap();
        let mut cmd = Command::new(bin("hangar"));
        cmd.arg("validate")
            .arg(&f)
            .env_remove("MCP_ALLOWED_COMMANDS")
            .env_remove("HANGAR_ALLOW_ABSOLUTE_COMMANDS");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Literal secrets: warnings with their path, still valid (exit 0).
    let (code, err) = validate(
        "mcp_servers:\n  gh:\n    command: [npx, -y, server-github]\n    env:\n      GITHUB_TOKEN: ghp_literal\n      LOG_LEVEL: debug\n      OTHER_TOKEN: \"${OTHER_TOKEN:-}\"\n\
         auth:\n  enabled: true\n  api_key:\n    bootstrap_key: mcp_0123456789abcdef0123456789abcdef01\n",
        &[],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("warning: mcp_servers.gh.env.GITHUB_TOKEN: a literal secret"),
        "{err}"
    );
    assert!(
        err.contains("warning: auth.api_key.bootstrap_key: a literal secret"),
        "{err}"
    );
    assert!(
        !err.contains("LOG_LEVEL") && !err.contains("OTHER_TOKEN"),
        "{err}"
    );
    assert_eq!(err.matches("warning:").count(), 2, "{err}");

    // A program off MCP Hangar's allow-list: a problem naming the server and the command.
    let shell = "mcp_servers:\n  sh:\n    command: [bash, -c, 'echo hi']\n";
    let (code, err) = validate(shell, &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("mcp_servers.sh.command: server `sh`: `bash` is not an allowed executable"),
        "{err}"
    );
    assert!(err.contains("MCP_ALLOWED_COMMANDS"), "{err}");
    // MCP_ALLOWED_COMMANDS replaces the list.
    let (code, err) = validate(shell, &[("MCP_ALLOWED_COMMANDS", "bash,npx")]);
    assert_eq!(code, Some(0), "{err}");
    // An absolute path is accepted whatever its name, unless HANGAR_ALLOW_ABSOLUTE_COMMANDS=false.
    let fixture = format!(
        "mcp_servers:\n  fx:\n    command: [\"{}\", stdio]\n",
        bin("hangar-fixture").display()
    );
    let (code, err) = validate(&fixture, &[]);
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = validate(&fixture, &[("HANGAR_ALLOW_ABSOLUTE_COMMANDS", "false")]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("`hangar-fixture`"), "{err}");
    let (code, err) = validate(
        &fixture,
        &[
            ("HANGAR_ALLOW_ABSOLUTE_COMMANDS", "false"),
            ("MCP_ALLOWED_COMMANDS", "hangar-fixture"),
        ],
    );
    assert_eq!(code, Some(0), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_refuses_commands_off_the_allow_list() {
    let c = client();
    let node = Node::start(&format!("mcp_servers:\n{}", fixture_stdio_yaml("fx", "")));
    let (status, v) = post_json(
        &c,
        &node.url("/api/mcp_servers/"),
        json!({"mcp_server_id": "sh", "mode": "subprocess", "command": ["sh", "-c", "id"]}),
    )
    .await;
    assert_eq!(status, 422, "{v}");
    assert_eq!(
        v["error"]["details"]["problems"][0]["path"], "mcp_servers.sh.command",
        "{v}"
    );
    let msg = v["error"]["details"]["problems"][0]["message"]
        .as_str()
        .unwrap();
    assert!(
        msg.contains("server `sh`") && msg.contains("`sh` is not an allowed executable"),
        "{msg}"
    );
    let (status, v) = post_json(
        &c,
        &node.url("/api/groups/"),
        json!({"group_id": "g", "members": [{"id": "m", "command": ["curl", "x"]}]}),
    )
    .await;
    assert_eq!(status, 422, "{v}");
    assert!(
        v.to_string()
            .contains("`curl` is not an allowed executable"),
        "{v}"
    );
    let (_, list) = get_json(&c, &node.url("/api/mcp_servers/")).await;
    assert!(!list.to_string().contains("\"sh\""), "{list}");
}

fn bootstrap_admin(node: &Node) -> (Option<i32>, String, String) {
    let out = Command::new(bin("hangar"))
        .args(["auth", "bootstrap-admin", "--endpoint", &node.base])
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_admin_hands_out_one_admin_key_once() {
    let c = client();
    // Auth on, no bootstrap key in the file: nobody may create keys yet.
    let node = Node::start("auth:\n  enabled: true\nmcp_servers: {}\n");
    let (status, _) = post_json(&c, &node.url("/api/auth/keys"), json!({})).await;
    assert_eq!(status, 401);

    let (code, out, err) = bootstrap_admin(&node);
    assert_eq!(code, Some(0), "{out}{err}");
    let key = out
        .lines()
        .find_map(|l| l.strip_prefix("api key  : "))
        .unwrap_or_else(|| panic!("no key printed: {out}"))
        .trim()
        .to_owned();
    assert!(key.starts_with("mcp_") && key.len() == 68, "{key}");
    assert_eq!(out.matches(&key).count(), 1, "printed once: {out}");
    assert!(out.contains("key_bootstrap_admin"), "{out}");

    // The key is an admin's: it may see who it is and create other keys.
    let me = c
        .get(node.url("/api/system/me"))
        .header("X-API-Key", &key)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(me.contains("\"admin\""), "{me}");
    let r = c
        .post(node.url("/api/auth/keys"))
        .header("X-API-Key", &key)
        .header("Content-Type", "application/json")
        .body(json!({"principal_id": "service:ci", "name": "ci"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);

    // A second run is refused with a clear message, and hands out nothing.
    let (code, out, err) = bootstrap_admin(&node);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(!out.contains("mcp_"), "{out}");
    assert!(
        err.contains("bootstrap-admin refused: an admin API key already exists")
            && err.contains("key_bootstrap_admin"),
        "{err}"
    );
    // Still refused once the key is revoked: the route works once, for good.
    let r = c
        .delete(node.url("/api/auth/keys/key_bootstrap_admin"))
        .header("X-API-Key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let (code, _, err) = bootstrap_admin(&node);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("already exists"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_admin_is_refused_with_auth_off_or_a_bootstrap_key_configured() {
    let open = Node::start("mcp_servers: {}\n");
    let (code, out, err) = bootstrap_admin(&open);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("authentication is off"), "{err}");
    drop(open);

    let key = "mcp_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let with_key = Node::start_with(
        "auth:\n  enabled: true\n  api_key:\n    bootstrap_key: ${HANGAR_BOOTSTRAP_KEY}\nmcp_servers: {}\n",
        &[("HANGAR_BOOTSTRAP_KEY", key)],
    );
    // The configured bootstrap key is registered (as an admin) shortly after start.
    let c = client();
    wait_for(
        "the bootstrap key registered",
        Duration::from_secs(20),
        async || {
            let r = c
                .get(with_key.url("/api/auth/keys"))
                .header("X-API-Key", key)
                .send()
                .await
                .ok()?;
            let t = r.text().await.ok()?;
            t.contains("key_bootstrap_").then_some(())
        },
    )
    .await;
    let (code, out, err) = bootstrap_admin(&with_key);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(err.contains("an admin API key already exists"), "{err}");
}
