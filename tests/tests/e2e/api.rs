//! REST, probes and metrics.

use hangar_tests::*;
use serde_json::json;

#[tokio::test]
async fn rest_probes_and_metrics() {
    let node = Node::start(&format!(
        "mcp_servers:\n{}",
        fixture_stdio_yaml(
            "fx",
            "    description: the fixture\n    env:\n      GREETING: hi\n"
        )
    ));
    let c = client();
    for p in ["/health/live", "/health/ready", "/health/startup"] {
        let (s, _) = get_json(&c, &node.url(p)).await;
        assert_eq!(s, 200, "{p}");
    }
    let (s, v) = get_json(&c, &node.url("/api/mcp_servers/")).await;
    assert_eq!(s, 200);
    assert_eq!(v["mcp_servers"][0]["mcp_server"], "fx");
    assert_eq!(v["mcp_servers"][0]["state"], "cold");
    let r = c.get(node.url("/api/mcp_servers")).send().await.unwrap();
    assert_eq!(
        r.url().path(),
        "/api/mcp_servers/",
        "slashless form redirects"
    );
    let (s, v) = get_json(&c, &node.url("/api/mcp_servers/ghost")).await;
    assert_eq!(s, 404);
    assert_eq!(v["error"]["code"], "McpServerNotFoundError");
    // Start, tools, a call, logs, details (env values masked), stop.
    let r = c
        .post(node.url("/api/mcp_servers/fx/start"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let (_, v) = get_json(&c, &node.url("/api/mcp_servers/fx/tools")).await;
    assert!(
        v["tools"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "echo")
    );
    let resp = call_tool(
        &c,
        &node.url("/mcp"),
        "fx__env",
        json!({"name": "GREETING"}),
    )
    .await;
    assert_eq!(text_of(&resp), "hi", "env reaches the child");
    let (_, v) = get_json(&c, &node.url("/api/mcp_servers/fx")).await;
    assert_eq!(v["state"], "ready");
    assert_eq!(
        v["config"]["env"]["GREETING"], "***",
        "env values are masked: {v}"
    );
    let (_, v) = get_json(&c, &node.url("/api/mcp_servers/fx/logs?lines=10")).await;
    assert!(v["count"].as_u64().unwrap() > 0, "{v}");
    let (s, _) = get_json(&c, &node.url("/api/mcp_servers/fx/logs?lines=0")).await;
    assert_eq!(s, 422);
    let (_, v) = get_json(&c, &node.url("/api/tools/")).await;
    assert!(
        v["tools"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["exposed_name"] == "fx__echo")
    );
    let (_, v) = get_json(&c, &node.url("/api/system/")).await;
    assert_eq!(v["system"]["total_invocations"], 1);
    let metrics = c.get(node.url("/metrics")).send().await.unwrap();
    assert!(
        metrics.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = metrics.text().await.unwrap();
    for needle in [
        r#"mcp_hangar_tool_calls_total{mcp_server="fx",status="success",tool="env"} 1"#,
        r#"mcp_hangar_mcp_server_state{mcp_server="fx"} 2"#,
        "mcp_hangar_tool_call_duration_seconds_bucket",
        "mcp_hangar_mcp_server_cold_start_seconds_count",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    let r = c
        .post(node.url("/api/mcp_servers/fx/stop"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let (_, v) = get_json(&c, &node.url("/api/mcp_servers/fx")).await;
    assert_eq!(v["state"], "cold");
    // Create and delete at run time; invalid definitions are refused with paths.
    let fixture = bin("hangar-fixture").display().to_string();
    let r = c
        .post(node.url("/api/mcp_servers/"))
        .header("Content-Type", "application/json")
        .body(
            json!({"mcp_server_id": "added", "mode": "subprocess", "command": [fixture, "stdio"]})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    assert_eq!(
        text_of(
            &call_tool(
                &c,
                &node.url("/mcp"),
                "added__echo",
                json!({"message": "new"})
            )
            .await
        ),
        "new"
    );
    let r = c
        .post(node.url("/api/mcp_servers/"))
        .body(json!({"mcp_server_id": "bad", "mode": "remote", "endpoint": "ftp://x"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 422);
    let v: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(
        v["error"]["details"]["problems"][0]["path"], "mcp_servers.bad.endpoint",
        "{v}"
    );
    let r = c
        .delete(node.url("/api/mcp_servers/added"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let (s, _) = get_json(&c, &node.url("/api/mcp_servers/added")).await;
    assert_eq!(s, 404);
}
