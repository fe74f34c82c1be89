//! REST, probes and metrics.

use hangar_tests::*;
use std::time::Duration;

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

/// A `hangar_*` tool's structured result.
async fn tool(
    c: &reqwest::Client,
    node: &Node,
    name: &str,
    args: serde_json::Value,
) -> serde_json::Value {
    let r = call_tool(c, &node.url("/mcp"), name, args).await;
    r["result"]["structuredContent"].clone()
}

fn row<'a>(list: &'a serde_json::Value, key: &str, id: &str) -> &'a serde_json::Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|r| r[key] == id)
        .unwrap_or_else(|| panic!("no {id} in {list}"))
}

/// REST and the `hangar_*` tools show one view: a failed server's health, and a group's
/// state with a non-default `min_healthy` (inactive → partial → healthy) in `/api/groups/`,
/// the group row of `/api/mcp_servers/` and `hangar_group_list`.
#[tokio::test]
async fn rest_and_management_tools_show_one_server_and_group_view() {
    let closed = free_port();
    let node = Node::start(&format!(
        "mcp_servers:\n{}{}  down:\n    mode: remote\n    endpoint: http://127.0.0.1:{closed}/mcp\n    max_consecutive_failures: 1\n    http: {{connect_timeout: 1.0, read_timeout: 1.0}}\n  g:\n    mode: group\n    auto_start: false\n    min_healthy: 2\n    members: [{{id: a}}, {{id: b}}]\n",
        fixture_stdio_yaml("a", ""),
        fixture_stdio_yaml("b", "")
    ));
    let c = client();

    // A server that cannot start: both views give the health that goes with its state.
    let r = c
        .post(node.url("/api/mcp_servers/down/start"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let health_of = |state: &str| match state {
        "ready" => "healthy",
        "degraded" => "degraded",
        "dead" => "unhealthy",
        _ => "unknown",
    };
    wait_for(
        "down failed in both views",
        Duration::from_secs(10),
        || async {
            let (_, rest) = get_json(&c, &node.url("/api/mcp_servers/")).await;
            let tools = tool(&c, &node, "hangar_list", json!({})).await;
            let rest = row(&rest["mcp_servers"], "mcp_server", "down").clone();
            let mcp = row(&tools["mcp_servers"], "mcp_server", "down").clone();
            for v in [&rest, &mcp] {
                assert_eq!(
                    v["health_status"],
                    health_of(v["state"].as_str().unwrap()),
                    "{v}"
                );
            }
            let failed = |v: &serde_json::Value| v["state"] == "degraded" || v["state"] == "dead";
            (failed(&rest) && failed(&mcp)).then_some(())
        },
    )
    .await;

    // The group: REST group, REST server-list row and the tool agree at every step.
    let views = || async {
        let (_, g) = get_json(&c, &node.url("/api/groups/g")).await;
        let (_, list) = get_json(&c, &node.url("/api/mcp_servers/")).await;
        let tools = tool(&c, &node, "hangar_group_list", json!({})).await;
        let t = row(&tools["groups"], "group_id", "g").clone();
        let l = row(&list["mcp_servers"], "mcp_server", "g").clone();
        assert_eq!(g["state"], t["state"], "REST {g} vs tool {t}");
        assert_eq!(g["state"], l["state"], "REST {g} vs list {l}");
        assert_eq!(
            g["healthy_count"], t["healthy_count"],
            "REST {g} vs tool {t}"
        );
        assert_eq!(g["min_healthy"], 2);
        (
            g["state"].as_str().unwrap().to_owned(),
            l["health_status"].as_str().unwrap().to_owned(),
        )
    };
    assert_eq!(views().await, ("inactive".into(), "unknown".into()));
    for (member, want) in [
        ("a", ("partial", "degraded")),
        ("b", ("healthy", "healthy")),
    ] {
        let r = c
            .post(node.url(&format!("/api/mcp_servers/{member}/start")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert_eq!(
            views().await,
            (want.0.into(), want.1.into()),
            "after starting {member}"
        );
    }
}

/// Groups and servers created through REST are validated by the config room: problems come
/// with their paths, an empty group is allowed, a group cannot contain a group; cluster
/// refusals keep their status codes.
#[tokio::test]
async fn rest_definitions_are_validated_with_paths_and_cluster_refusals_keep_their_codes() {
    let node = Node::start(&format!(
        "mcp_servers:\n{}  g:\n    mode: group\n    members: [{{id: a}}]\n",
        fixture_stdio_yaml("a", "")
    ));
    let c = client();
    let (s, v) = post_json(
        &c,
        &node.url("/api/groups/"),
        json!({"group_id": "ng", "members": [{"id": "nope"}]}),
    )
    .await;
    assert_eq!(s, 422, "{v}");
    assert_eq!(v["error"]["code"], "ValidationError");
    assert_eq!(
        v["error"]["details"]["problems"][0]["path"], "mcp_servers.ng.members[0].id",
        "{v}"
    );
    let (s, v) = post_json(
        &c,
        &node.url("/api/groups/"),
        json!({"group_id": "gg", "members": [{"id": "g"}]}),
    )
    .await;
    assert_eq!(s, 422, "{v}");
    assert!(
        v["error"]["details"]["problems"][0]["message"]
            .as_str()
            .unwrap()
            .contains("groups cannot contain groups"),
        "{v}"
    );
    let (s, v) = post_json(
        &c,
        &node.url("/api/groups/"),
        json!({"group_id": "bad id", "members": [{"id": "a"}]}),
    )
    .await;
    assert_eq!(s, 422, "{v}");
    let (s, v) = post_json(
        &c,
        &node.url("/api/groups/"),
        json!({"group_id": "empty", "description": "later"}),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = get_json(&c, &node.url("/api/groups/empty")).await;
    assert_eq!(s, 200);
    assert_eq!(
        (&v["state"], &v["total_members"], &v["description"]),
        (&json!("inactive"), &json!(0), &json!("later")),
        "{v}"
    );
    let (s, v) = post_json(
        &c,
        &node.url("/api/mcp_servers/"),
        json!({"mcp_server_id": "x", "mode": "group", "members": [{"id": "a"}]}),
    )
    .await;
    assert_eq!(s, 422, "{v}");
    let (s, v) = post_json(
        &c,
        &node.url("/api/mcp_servers/"),
        json!({"mcp_server_id": "y", "mode": "subprocess"}),
    )
    .await;
    assert_eq!(s, 422, "{v}");
    assert_eq!(
        v["error"]["details"]["problems"][0]["path"], "mcp_servers.y.command",
        "{v}"
    );

    // Cluster refusals: typed in the cluster room, mapped once in the API.
    let (s, v) = post_json(&c, &node.url("/api/cluster/members/99/promote"), json!({})).await;
    assert_eq!(
        (s, &v["error"]["code"]),
        (400, &json!("ValidationError")),
        "{v}"
    );
    let r = c
        .delete(node.url("/api/cluster/members/99"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let (s, v) = post_json(&c, &node.url("/api/cluster/init"), json!({})).await;
    assert_eq!(
        (s, &v["error"]["code"]),
        (400, &json!("ValidationError")),
        "{v}"
    );
    let (s, v) = post_json(
        &c,
        &node.url("/api/cluster/join"),
        json!({"seed": node.url("")}),
    )
    .await;
    assert_eq!(
        (s, &v["error"]["code"]),
        (409, &json!("MembershipError")),
        "{v}"
    );
}
