use std::time::Duration;

use super::*;

fn env(k: &str) -> Option<String> {
    match k {
        "HOME_DIR" => Some("/home/x".into()),
        "TOKEN" => Some("s3cr3t".into()),
        "NESTED" => Some("${TOKEN}".into()),
        _ => None,
    }
}

fn load(y: &str) -> Result<Config, ConfigError> {
    load_str(y, &env)
}

fn problems(y: &str) -> Vec<String> {
    match load(y) {
        Err(ConfigError::Invalid { problems }) => {
            problems.iter().map(ToString::to_string).collect()
        }
        other => panic!("expected problems, got {other:?}"),
    }
}

#[test]
fn defaults_of_a_minimal_subprocess_server() {
    let c = load("mcp_servers:\n  math:\n    command: [python3, -m, math]\n    args: [--fast]\n")
        .unwrap();
    let ServerSpec::Subprocess(s) = &c.mcp_servers["math"] else {
        panic!()
    };
    assert_eq!(s.command, vec!["python3", "-m", "math", "--fast"]);
    assert_eq!(s.common.idle_ttl_s, 300);
    assert_eq!(s.common.health_check_interval_s, 60);
    assert_eq!(s.common.max_consecutive_failures, 3);
    assert!(!s.common.auto_start);
    assert_eq!(c.server.listen, "127.0.0.1:8000");
    assert_eq!(c.server.max_body_bytes, 4 * 1024 * 1024);
    assert_eq!(c.tool_access.naming, Naming::Prefixed);
    assert_eq!(c.execution.max_concurrency, Some(50));
}

#[test]
fn remote_defaults_and_auth() {
    let c = load(
        "mcp_servers:\n  r:\n    mode: remote\n    endpoint: http://127.0.0.1:9/mcp\n    auth: {type: bearer, bearer_token: \"${TOKEN}\"}\n",
    )
    .unwrap();
    let ServerSpec::Remote(r) = &c.mcp_servers["r"] else {
        panic!()
    };
    assert_eq!(r.http.connect_timeout, Duration::from_secs(10));
    assert_eq!(r.http.read_timeout, Duration::from_secs(30));
    let RemoteAuth::Bearer { token } = &r.auth else {
        panic!()
    };
    assert_eq!(token.expose(), "s3cr3t");
    assert_eq!(format!("{token:?}"), "\"***\"");
    assert!(!serde_json::to_string(&c).unwrap().contains("s3cr3t"));
}

#[test]
fn interpolation_rules() {
    let c = load(
        "mcp_servers:\n  a:\n    command: [\"${HOME_DIR}/bin/x\", \"${MISSING:-dflt}\", \"${MISSING:-}\", \"${NESTED}\"]\n",
    )
    .unwrap();
    let ServerSpec::Subprocess(s) = &c.mcp_servers["a"] else {
        panic!()
    };
    assert_eq!(s.command, vec!["/home/x/bin/x", "dflt", "", "${TOKEN}"]);
    let p = problems("mcp_servers:\n  a:\n    command: [x]\n    env: {K: \"${NOPE}\"}\n");
    assert_eq!(p.len(), 1);
    assert!(
        p[0].contains("mcp_servers.a.env.K") && p[0].contains("`NOPE`"),
        "{p:?}"
    );
}

#[test]
fn unknown_keys_are_reported_with_paths_and_hints() {
    let p = problems("mcp_servers:\n  math:\n    commandd: [x]\nloging: {}\n");
    assert!(
        p.iter()
            .any(|m| m
                .starts_with("mcp_servers.math.commandd: unknown key; did you mean `command`?")),
        "{p:?}"
    );
    assert!(
        p.iter()
            .any(|m| m.starts_with("loging: unknown key; did you mean `logging`?")),
        "{p:?}"
    );
    assert!(
        p.iter()
            .any(|m| m.starts_with("mcp_servers.math.command: is required")),
        "{p:?}"
    );
}

#[test]
fn docker_mode_is_refused_clearly() {
    let p = problems("mcp_servers:\n  d:\n    mode: docker\n    image: x\n");
    assert_eq!(
        p,
        vec![
            "mcp_servers.d.mode: mode `docker` is not yet supported by Hangar; use `subprocess` or `remote`"
        ]
    );
}

#[test]
fn collects_every_problem() {
    let p = problems(
        "mcp_servers:\n  a:\n    command: [x]\n    idle_ttl_s: 0\n  b:\n    mode: remote\n    endpoint: ftp://x\n  bad__id:\n    command: [y]\n",
    );
    assert!(
        p.iter()
            .any(|m| m.starts_with("mcp_servers.a.idle_ttl_s: must be between 1 and 86400")),
        "{p:?}"
    );
    assert!(
        p.iter()
            .any(|m| m.starts_with("mcp_servers.b.endpoint: must be an http")),
        "{p:?}"
    );
    assert!(
        p.iter()
            .any(|m| m.starts_with("mcp_servers.bad__id: server ids must not contain `__`")),
        "{p:?}"
    );
    assert_eq!(p.len(), 3, "{p:?}");
}

#[test]
fn groups_with_inline_and_referenced_members() {
    let c = load(
        "mcp_servers:\n  a: {command: [x]}\n  g:\n    mode: group\n    strategy: priority\n    members:\n      - {id: a, priority: 2}\n      - {id: b, command: [y], weight: 5}\n",
    )
    .unwrap();
    assert!(matches!(c.mcp_servers["b"], ServerSpec::Subprocess(_)));
    let ServerSpec::Group(g) = &c.mcp_servers["g"] else {
        panic!()
    };
    assert_eq!(g.strategy, Strategy::Priority);
    assert_eq!(g.members.len(), 2);
    assert_eq!(g.members[0].priority, 2);
    assert_eq!(g.members[1].weight, 5);
    assert_eq!(g.circuit_breaker.failure_threshold, 10);
    assert_eq!(g.health.unhealthy_threshold, 2);
}

#[test]
fn group_validation() {
    let p = problems(
        "mcp_servers:\n  g:\n    mode: group\n    strategy: fastest\n    min_healthy: 3\n    members:\n      - {id: nope}\n      - {id: nope}\n",
    );
    assert!(
        p.iter()
            .any(|m| m.contains("strategy: must be round_robin")),
        "{p:?}"
    );
    assert!(
        p.iter()
            .any(|m| m.contains("min_healthy: is 3 but the group has only 2")),
        "{p:?}"
    );
    assert!(p.iter().any(|m| m.contains("listed twice")), "{p:?}");
    assert!(
        p.iter().any(|m| m.contains("member `nope` is not defined")),
        "{p:?}"
    );
}

#[test]
fn unsupported_sections_refused_unless_disabled() {
    assert!(load("mcp_servers: {}\napprovals: {enabled: false}\n").is_ok());
    let p = problems("mcp_servers: {}\napprovals: {enabled: true}\n");
    assert!(
        p[0].starts_with("approvals: approval gates (`approvals`) is not supported"),
        "{p:?}"
    );
}

#[test]
fn auth_with_api_keys() {
    let c = load("mcp_servers: {}\n").unwrap();
    assert!(!c.auth.enabled);
    assert_eq!(c.auth.api_key.header_name, "X-API-Key");
    let key = format!("mcp_{}", "ab".repeat(16));
    let c = load(&format!(
        "mcp_servers: {{}}\nauth:\n  enabled: true\n  storage: {{driver: sqlite}}\n  api_key: {{header_name: X-Key, bootstrap_key: {key}}}\n"
    ))
    .unwrap();
    assert!(c.auth.enabled && !c.auth.allow_anonymous);
    assert_eq!(c.auth.api_key.header_name, "X-Key");
    assert_eq!(
        c.auth.api_key.bootstrap_key.as_ref().map(|k| k.expose()),
        Some(key.as_str())
    );
    // The key never shows in debug output.
    assert!(!format!("{c:?}").contains(&key));
    let p =
        problems("mcp_servers: {}\nauth:\n  enabled: true\n  api_key: {bootstrap_key: hunter2}\n");
    assert!(
        p.iter()
            .any(|m| m.contains("auth.api_key.bootstrap_key") && !m.contains("hunter2")),
        "{p:?}"
    );
    // An incomplete OIDC issuer names what it lacks (more in config/jwt.rs).
    let p = problems("mcp_servers: {}\nauth:\n  enabled: true\n  oidc: {issuer: x}\n");
    assert!(
        p.iter()
            .any(|m| m.starts_with("auth.oidc.audience: is required")),
        "{p:?}"
    );
    let c = load("mcp_servers: {}\nauth:\n  enabled: true\n  rate_limit: {max_attempts: 3, window_seconds: 10, lockout_seconds: 30}\n").unwrap();
    assert_eq!(c.auth.rate_limit.max_attempts, 3);
    assert_eq!(c.auth.rate_limit.lockout, Duration::from_secs(30));
    assert!(load("mcp_servers: {}\n").unwrap().auth.rate_limit.enabled);
    let p = problems("mcp_servers: {}\nauth:\n  enabled: true\n  api_key: {enabled: false}\n");
    assert!(p.iter().any(|m| m.contains("no authenticator")), "{p:?}");
}

#[test]
fn role_assignments_in_the_file() {
    let c = load(
        "mcp_servers: {}\nauth:\n  enabled: true\n  role_assignments:\n    - {principal: \"service:ci\", role: developer}\n    - {principal: \"group:ops\", role: admin, scope: \"tenant:acme\"}\n    - {principal: alice, role: viewer, scope: \"server:math\"}\n",
    )
    .unwrap();
    let a = &c.auth.role_assignments;
    assert_eq!(a.len(), 3);
    assert_eq!(
        (
            a[0].principal.as_str(),
            a[0].role.as_str(),
            a[0].scope.as_str()
        ),
        ("service:ci", "developer", "global")
    );
    assert_eq!(a[1].scope, "tenant:acme");
    assert_eq!(a[2].scope, "server:math");
    let p = problems(
        "mcp_servers: {}\nauth:\n  role_assignments:\n    - {principal: a, role: wizard}\n    - {principal: b, role: viewer, scope: \"planet:mars\"}\n    - {role: viewer}\n    - {principal: c, role: viewer, colour: red}\n",
    );
    let has = |needle: &str| p.iter().any(|m| m.contains(needle));
    assert!(
        has("auth.role_assignments[0].role: unknown role `wizard`"),
        "{p:?}"
    );
    assert!(
        has("auth.role_assignments[1].scope: `planet:mars` is not a scope"),
        "{p:?}"
    );
    assert!(has("auth.role_assignments[2].principal"), "{p:?}");
    assert!(has("auth.role_assignments[3].colour"), "{p:?}");
    let p = problems("mcp_servers: {}\nauth:\n  role_assignments: {a: admin}\n");
    assert!(
        has_any(&p, "auth.role_assignments: must be a list"),
        "{p:?}"
    );
}

fn has_any(p: &[String], needle: &str) -> bool {
    p.iter().any(|m| m.contains(needle))
}

#[test]
fn yaml_errors_and_shapes() {
    assert!(matches!(load(""), Err(ConfigError::Invalid { .. })));
    let p = problems("- a\n- b\n");
    assert!(p[0].contains("must be a mapping"), "{p:?}");
    let p = problems("mcp_servers: [\n");
    assert!(p[0].contains("not valid YAML"), "{p:?}");
    let p = problems("mcp_servers:\n  a:\n    command: x\n");
    assert!(p[0].contains("must be a list of strings"), "{p:?}");
}

#[test]
fn duplicate_yaml_keys_are_rejected() {
    let r = load("mcp_servers:\n  a: {command: [x]}\n  a: {command: [y]}\n");
    assert!(
        r.is_err(),
        "duplicate keys must not be silently merged: {r:?}"
    );
}

#[test]
fn predefined_tools_and_policies() {
    let c = load(
        "mcp_servers:\n  a:\n    command: [x]\n    tools:\n      - {name: add, inputSchema: {type: object}}\n  b:\n    command: [y]\n    tools: {deny_list: [\"admin_*\"]}\n",
    )
    .unwrap();
    let ServerSpec::Subprocess(a) = &c.mcp_servers["a"] else {
        panic!()
    };
    assert!(matches!(&a.common.tools, Some(ToolsSpec::Predefined(t)) if t[0].name == "add"));
    let ServerSpec::Subprocess(b) = &c.mcp_servers["b"] else {
        panic!()
    };
    assert!(
        matches!(&b.common.tools, Some(ToolsSpec::Policy(p)) if p.deny_list == vec!["admin_*"])
    );
}

#[test]
fn diff_classifies_servers() {
    let old = load("mcp_servers:\n  a: {command: [x]}\n  b: {command: [y]}\n  c: {command: [z]}\n")
        .unwrap();
    let new =
        load("mcp_servers:\n  a: {command: [x]}\n  b: {command: [y2]}\n  d: {command: [w]}\n")
            .unwrap();
    let d = diff(&old.mcp_servers, &new.mcp_servers);
    assert_eq!(d.added, vec!["d"]);
    assert_eq!(d.removed, vec!["c"]);
    assert_eq!(d.updated, vec!["b"]);
    assert_eq!(d.unchanged, vec!["a"]);
}

#[test]
fn validate_server_checks_one_definition_against_what_exists() {
    let known = load(
        "mcp_servers:\n  a:\n    command: [x]\n  g:\n    mode: group\n    members: [{id: a}]\n",
    )
    .unwrap()
    .mcp_servers;
    let paths = |r: Result<ServerSpec, Problems>| -> Vec<String> {
        r.unwrap_err().0.into_iter().map(|p| p.path).collect()
    };
    // A server, taken literally (no interpolation).
    let s = validate_server("b", &serde_json::json!({"command": ["${TOKEN}"]}), &known).unwrap();
    let ServerSpec::Subprocess(s) = s else {
        panic!()
    };
    assert_eq!(s.command, vec!["${TOKEN}"]);
    assert_eq!(
        paths(validate_server(
            "b",
            &serde_json::json!({"mode": "remote", "endpoint": "ftp://x"}),
            &known
        )),
        ["mcp_servers.b.endpoint"]
    );
    assert_eq!(
        paths(validate_server(
            "b__c",
            &serde_json::json!({"command": ["x"]}),
            &known
        )),
        ["mcp_servers.b__c"]
    );
    // A group: members among the known servers or inline; never a group; empty is fine.
    let g = |v: serde_json::Value| validate_server("h", &v, &known);
    let ok = g(serde_json::json!({"mode": "group", "min_healthy": 2,
        "members": [{"id": "a"}, {"id": "c", "command": ["y"]}]}))
    .unwrap();
    let ServerSpec::Group(ok) = ok else { panic!() };
    assert_eq!(ok.members.len(), 2);
    assert_eq!(ok.min_healthy, 2);
    assert!(matches!(
        g(serde_json::json!({"mode": "group", "members": []})),
        Ok(ServerSpec::Group(_))
    ));
    assert_eq!(
        paths(g(
            serde_json::json!({"mode": "group", "members": [{"id": "nope"}, {"id": "g"}]})
        )),
        ["mcp_servers.h.members[0].id", "mcp_servers.h.members[1].id"]
    );
    assert_eq!(
        paths(g(
            serde_json::json!({"mode": "group", "members": [{"id": "a", "command": ["z"]}]})
        )),
        ["mcp_servers.h.members[0]"]
    );
    assert_eq!(
        paths(g(
            serde_json::json!({"mode": "group", "strategy": "bogus", "members": [{"id": "a"}]})
        )),
        ["mcp_servers.h.strategy"]
    );
    // The same problem list converts into the config error the API renders.
    let e: ConfigError = g(serde_json::json!({"mode": "group"})).unwrap_err().into();
    assert_eq!(e.problems()[0].path, "mcp_servers.h.members");
}

#[test]
fn the_placement_lease_defaults_below_the_node_loss_timeout_and_is_checked() {
    let c = load("mcp_servers: {}\n").unwrap();
    assert_eq!(c.cluster.node_loss_timeout, Duration::from_secs(10));
    assert_eq!(c.cluster.placement_lease, Duration::from_secs(7));
    // The default follows a shorter node-loss timeout.
    let c = load("mcp_servers: {}\ncluster:\n  node_loss_timeout_ms: 3000\n").unwrap();
    assert_eq!(c.cluster.placement_lease, Duration::from_millis(2100));
    let c = load(
        "mcp_servers: {}\ncluster:\n  node_loss_timeout_ms: 3000\n  placement_lease_ms: 2500\n",
    )
    .unwrap();
    assert_eq!(c.cluster.placement_lease, Duration::from_millis(2500));
    // Too close to the node-loss timeout: the node might still run it when it is placed
    // elsewhere.
    let p = problems(
        "mcp_servers: {}\ncluster:\n  node_loss_timeout_ms: 3000\n  placement_lease_ms: 2600\n",
    );
    assert!(
        p.iter().any(|m| m.contains("cluster.placement_lease_ms")
            && m.contains("at most node_loss_timeout_ms − 500 (2500")),
        "{p:?}"
    );
    // Shorter than an election: leases would lapse whenever the leader changes.
    let p = problems("mcp_servers: {}\ncluster:\n  placement_lease_ms: 900\n");
    assert!(
        p.iter()
            .any(|m| m.contains("at least 2 × election_max_ms (1000")),
        "{p:?}"
    );
}

#[test]
fn replicas_n_becomes_a_group_of_single_instance_members() {
    let c = load("mcp_servers:\n  web:\n    command: [srv]\n    auto_start: true\n    placement: {replicas: 3, nodes: [1, 2, 3]}\n")
        .unwrap();
    let ServerSpec::Group(g) = &c.mcp_servers["web"] else {
        panic!("{:?}", c.mcp_servers["web"])
    };
    let ids: Vec<&str> = g.members.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["web.1", "web.2", "web.3"]);
    assert!(g.auto_start);
    for id in ids {
        let ServerSpec::Subprocess(s) = &c.mcp_servers[id] else {
            panic!()
        };
        assert_eq!(s.placement.replicas, Replicas::One);
        assert_eq!(s.placement.nodes, vec![1, 2, 3]);
        assert_eq!(s.command, vec!["srv"]);
    }
    for bad in ["0", "65", "many"] {
        let p = problems(&format!(
            "mcp_servers:\n  web:\n    command: [srv]\n    placement: {{replicas: {bad}}}\n"
        ));
        assert!(
            p.iter()
                .any(|m| m.contains("placement.replicas") && m.contains("from 2 to 64")),
            "{bad}: {p:?}"
        );
    }
    let p = problems(
        "mcp_servers:\n  web:\n    command: [srv]\n    placement: {replicas: 3, nodes: [1, 2]}\n",
    );
    assert!(
        p.iter()
            .any(|m| m.contains("needs at least 3 allowed nodes")),
        "{p:?}"
    );
}

#[test]
fn node_labels_and_placement_labels() {
    let c = load("mcp_servers:\n  s:\n    command: [srv]\n    placement: {labels: {zone: eu-1, gpu: true}}\ncluster:\n  labels: {zone: eu-1, rack: 7}\n")
        .unwrap();
    let ServerSpec::Subprocess(s) = &c.mcp_servers["s"] else {
        panic!()
    };
    assert_eq!(s.placement.labels["zone"], "eu-1");
    assert_eq!(s.placement.labels["gpu"], "true");
    assert_eq!(c.cluster.labels["rack"], "7");
    let p = problems("mcp_servers:\n  s:\n    command: [srv]\n    placement: {labels: [zone]}\n");
    assert!(
        p.iter()
            .any(|m| m.contains("mcp_servers.s.placement.labels")
                && m.contains("mapping of label names")),
        "{p:?}"
    );
    let p = problems("mcp_servers: {}\ncluster:\n  labels: {zone: ''}\n");
    assert!(p.iter().any(|m| m.contains("cluster.labels.zone")), "{p:?}");
}
