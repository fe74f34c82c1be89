//! Unit tests for `apply`: every command, retention, fencing, rejection values.

use std::collections::BTreeMap;
use std::collections::BTreeSet;

use serde_json::json;

use super::*;

const HASH_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const HASH_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

fn ctx(term: u64, now_ms: u64) -> ApplyCtx {
    ApplyCtx {
        log_index: 1,
        term,
        now_ms,
    }
}

fn run(state: &mut State, cmd: Command) -> Response {
    apply(state, &cmd, ctx(1, 1000))
}

fn assert_rejected(resp: &Response, want: RejectCode) {
    match resp {
        Response::Rejected { code, message } => {
            assert_eq!(*code, want, "message: {message}");
            assert!(!message.is_empty());
        }
        other => panic!("expected Rejected({want}), got {other:?}"),
    }
}

fn file_config(servers: &[(&str, serde_json::Value)], hash: &str) -> Command {
    Command::SetDesiredConfig {
        servers: servers
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        source: ConfigSourceKind::File,
        file_hash: Some(hash.to_string()),
    }
}

fn put_server(
    id: &str,
    spec: serde_json::Value,
    create_only: bool,
    if_version: Option<u64>,
) -> Command {
    Command::PutServer {
        id: id.to_string(),
        spec,
        source: ConfigSourceKind::Api,
        file_hash: None,
        create_only,
        if_version,
    }
}

#[test]
fn set_desired_config_replaces_file_set_and_bumps_version() {
    let mut s = State::default();
    let r = run(
        &mut s,
        file_config(
            &[("math", json!({"cmd": "m"})), ("git", json!({"cmd": "g"}))],
            HASH_A,
        ),
    );
    assert_eq!(
        r,
        Response::ConfigApplied {
            config_version: 1,
            added: vec!["git".into(), "math".into()],
            updated: vec![],
            removed: vec![],
        }
    );
    assert_eq!(s.config_file_hash.as_deref(), Some(HASH_A));
    assert_eq!(
        s.servers["math"].source.to_string(),
        format!("file:{HASH_A}")
    );
    assert_eq!(s.servers["math"].config_version, 1);
    assert_eq!(s.servers["math"].updated_at_ms, 1000);

    // An API-defined server survives a file reload.
    assert_eq!(
        run(
            &mut s,
            put_server("web", json!({"url": "http://x"}), true, None)
        ),
        Response::ServerChanged { config_version: 2 }
    );

    // Reload: math changes, git disappears, time added.
    let r = apply(
        &mut s,
        &file_config(
            &[("math", json!({"cmd": "m2"})), ("time", json!({}))],
            HASH_B,
        ),
        ctx(1, 2000),
    );
    assert_eq!(
        r,
        Response::ConfigApplied {
            config_version: 3,
            added: vec!["time".into()],
            updated: vec!["math".into()],
            removed: vec!["git".into()],
        }
    );
    assert!(!s.servers.contains_key("git"));
    assert!(
        s.servers.contains_key("web"),
        "api-sourced server must survive"
    );
    assert_eq!(s.servers["math"].config_version, 3);
    assert_eq!(s.servers["web"].config_version, 2);
    assert_eq!(s.servers["math"].updated_at_ms, 2000);

    // Same content again: nothing changes, version stays.
    let before = s.clone();
    let r = apply(
        &mut s,
        &file_config(
            &[("math", json!({"cmd": "m2"})), ("time", json!({}))],
            HASH_B,
        ),
        ctx(1, 3000),
    );
    assert_eq!(
        r,
        Response::ConfigApplied {
            config_version: 3,
            added: vec![],
            updated: vec![],
            removed: vec![],
        }
    );
    assert_eq!(s.servers, before.servers);
}

#[test]
fn set_desired_config_removes_catalog_of_removed_servers() {
    let mut s = State::default();
    run(&mut s, file_config(&[("math", json!({}))], HASH_A));
    run(
        &mut s,
        Command::PutCatalog {
            server_id: "math".into(),
            tools: "[]".into(),
            prompts: "[]".into(),
            resources: "[]".into(),
            resource_templates: "[]".into(),
        },
    );
    run(&mut s, file_config(&[], HASH_B));
    assert!(s.servers.is_empty());
    assert!(s.catalog.is_empty());
}

#[test]
fn set_desired_config_rejects_bad_input_without_change() {
    let mut s = State::default();
    let cmd = Command::SetDesiredConfig {
        servers: BTreeMap::from([("a".to_string(), json!({}))]),
        source: ConfigSourceKind::File,
        file_hash: None,
    };
    assert_rejected(&run(&mut s, cmd), RejectCode::InvalidArgument);
    assert_rejected(
        &run(&mut s, file_config(&[("a", json!({}))], "nothex")),
        RejectCode::InvalidArgument,
    );
    assert_rejected(
        &run(&mut s, file_config(&[("", json!({}))], HASH_A)),
        RejectCode::InvalidArgument,
    );
    assert_eq!(
        s,
        State {
            clock_ms: 1000,
            ..State::default()
        }
    );
}

#[test]
fn put_server_create_only_and_compare_and_set() {
    let mut s = State::default();
    assert_eq!(
        run(&mut s, put_server("a", json!(1), true, None)),
        Response::ServerChanged { config_version: 1 }
    );
    assert_rejected(
        &run(&mut s, put_server("a", json!(2), true, None)),
        RejectCode::ServerExists,
    );
    assert_eq!(s.servers["a"].spec, json!(1));
    assert_rejected(
        &run(&mut s, put_server("a", json!(2), false, Some(7))),
        RejectCode::VersionMismatch,
    );
    assert_rejected(
        &run(&mut s, put_server("zz", json!(2), false, Some(1))),
        RejectCode::VersionMismatch,
    );
    assert_eq!(
        run(&mut s, put_server("a", json!(2), false, Some(1))),
        Response::ServerChanged { config_version: 2 }
    );
    assert_eq!(s.servers["a"].spec, json!(2));
    assert_eq!(s.servers["a"].source, ConfigSource::Api);
    assert_rejected(
        &run(&mut s, put_server("", json!(2), false, None)),
        RejectCode::InvalidArgument,
    );
}

#[test]
fn delete_server() {
    let mut s = State::default();
    run(&mut s, put_server("a", json!(1), false, None));
    assert_eq!(
        run(&mut s, Command::DeleteServer { id: "a".into() }),
        Response::ServerChanged { config_version: 2 }
    );
    assert!(s.servers.is_empty());
    assert_rejected(
        &run(&mut s, Command::DeleteServer { id: "a".into() }),
        RejectCode::ServerNotFound,
    );
    assert_eq!(s.config_version, 2);
}

#[test]
fn catalog_digest_and_change_detection() {
    let mut s = State::default();
    let cmd = |tools: &str| Command::PutCatalog {
        server_id: "math".into(),
        tools: tools.into(),
        prompts: "[]".into(),
        resources: "[]".into(),
        resource_templates: "[]".into(),
    };
    let r1 = apply(&mut s, &cmd(r#"[{"name":"add"}]"#), ctx(1, 10));
    let Response::CatalogUpdated {
        schema_digest,
        changed,
    } = r1
    else {
        panic!("unexpected {r1:?}")
    };
    assert!(changed);
    assert_eq!(schema_digest.len(), 64);
    assert_eq!(s.catalog["math"].learned_at_ms, 10);
    let r2 = apply(&mut s, &cmd(r#"[{"name":"add"}]"#), ctx(1, 20));
    assert_eq!(
        r2,
        Response::CatalogUpdated {
            schema_digest: schema_digest.clone(),
            changed: false
        }
    );
    assert_eq!(
        s.catalog["math"].learned_at_ms, 10,
        "unchanged catalogue keeps learned_at"
    );
    let r3 = apply(&mut s, &cmd(r#"[{"name":"sub"}]"#), ctx(1, 30));
    assert!(
        matches!(r3, Response::CatalogUpdated { changed: true, .. }),
        "{r3:?}"
    );
    assert_ne!(s.catalog["math"].schema_digest, schema_digest);
    // Boundaries matter: moving text between lists changes the digest.
    assert_ne!(
        schema_digest_of(["ab", "", "", ""]),
        schema_digest_of(["a", "b", "", ""])
    );

    assert_eq!(
        run(
            &mut s,
            Command::DeleteCatalog {
                server_id: "math".into()
            }
        ),
        Response::Ok
    );
    assert_rejected(
        &run(
            &mut s,
            Command::DeleteCatalog {
                server_id: "math".into(),
            },
        ),
        RejectCode::NotFound,
    );
}

fn schema_digest_of(lists: [&str; 4]) -> String {
    schema_digest(lists)
}

#[test]
fn placement_fencing_rejects_older_terms() {
    let mut s = State::default();
    let place = |inst: &str, node: u64, term: u64| Command::SetPlacement {
        instance_id: inst.into(),
        node_id: node,
        term,
    };
    assert_eq!(
        apply(&mut s, &place("math#0", 1, 3), ctx(3, 1)),
        Response::Ok
    );
    assert_eq!(
        s.placements["math#0"],
        Placement {
            node_id: 1,
            term: 3
        }
    );
    assert_eq!(s.placement_term, 3);

    // A new leader (term 5) moves it.
    assert_eq!(
        apply(&mut s, &place("math#0", 2, 5), ctx(5, 2)),
        Response::Ok
    );
    // The deposed leader's late decision (term 3, committed by the new leader in term 5) is fenced.
    assert_rejected(
        &apply(&mut s, &place("math#0", 1, 3), ctx(5, 3)),
        RejectCode::StaleTerm,
    );
    assert_eq!(
        s.placements["math#0"],
        Placement {
            node_id: 2,
            term: 5
        }
    );
    // A claim of a term newer than the entry's own term is refused too.
    assert_rejected(
        &apply(&mut s, &place("git#0", 1, 9), ctx(5, 3)),
        RejectCode::StaleTerm,
    );
    assert!(!s.placements.contains_key("git#0"));
    // Same term is fine.
    assert_eq!(
        apply(&mut s, &place("git#0", 3, 5), ctx(5, 4)),
        Response::Ok
    );
    // A decision of term 5 that reaches the log only in term 6 (a leader cut off from the
    // majority decided it; its forwarder gave it to the next leader after the partition), even
    // when no placement of term 6 came before it: refused, the instance stays where it runs.
    assert_rejected(
        &apply(&mut s, &place("git#0", 1, 5), ctx(6, 4)),
        RejectCode::StaleTerm,
    );
    assert_eq!(s.placements["git#0"].node_id, 3);

    let remove = |inst: &str, term: u64| Command::RemovePlacement {
        instance_id: inst.into(),
        term,
    };
    assert_rejected(
        &apply(&mut s, &remove("git#0", 4), ctx(5, 5)),
        RejectCode::StaleTerm,
    );
    assert_eq!(apply(&mut s, &remove("git#0", 5), ctx(5, 5)), Response::Ok);
    assert_rejected(
        &apply(&mut s, &remove("git#0", 5), ctx(5, 5)),
        RejectCode::NotFound,
    );
    assert_rejected(
        &apply(&mut s, &place("", 1, 5), ctx(5, 5)),
        RejectCode::InvalidArgument,
    );
}

#[test]
fn status_reports_only_from_the_placed_node() {
    let mut s = State::default();
    apply(
        &mut s,
        &Command::SetPlacement {
            instance_id: "math#0".into(),
            node_id: 2,
            term: 1,
        },
        ctx(1, 1),
    );
    let report = |node: u64, st: InstanceState| Command::ReportStatus {
        instance_id: "math#0".into(),
        node_id: node,
        state: st,
        reason: "why".into(),
    };
    assert_rejected(
        &run(&mut s, report(1, InstanceState::Ready)),
        RejectCode::NotPlacedHere,
    );
    assert!(s.status.is_empty());
    assert_eq!(run(&mut s, report(2, InstanceState::Ready)), Response::Ok);
    assert_eq!(
        s.status["math#0"],
        InstanceStatus {
            state: InstanceState::Ready,
            reason: "why".into(),
            node_id: 2,
            at_ms: 1000
        }
    );
    // Unplaced instances (e.g. remote servers) accept reports from anyone.
    let r = run(
        &mut s,
        Command::ReportStatus {
            instance_id: "web#0".into(),
            node_id: 3,
            state: InstanceState::Degraded,
            reason: String::new(),
        },
    );
    assert_eq!(r, Response::Ok);
    assert_eq!(
        serde_json::to_value(InstanceState::Degraded).unwrap(),
        json!("DEGRADED")
    );
}

fn key(id: &str, hash: &str) -> ApiKeyRecord {
    ApiKeyRecord {
        tenant: None,
        id: id.into(),
        principal: "user:alice".into(),
        name: "laptop".into(),
        sha256_hex: hash.into(),
        created_at_ms: 0,
        expires_at_ms: Some(99),
        revoked: false,
    }
}

#[test]
fn api_keys_lifecycle_and_rejections() {
    let mut s = State::default();
    assert_eq!(
        run(
            &mut s,
            Command::CreateApiKey {
                key: key("k1", HASH_A)
            }
        ),
        Response::Ok
    );
    assert_eq!(
        s.keys["k1"].created_at_ms, 1000,
        "created is the apply time"
    );
    assert_eq!(s.key_by_hash(HASH_A).map(|k| k.id.as_str()), Some("k1"));
    assert_rejected(
        &run(
            &mut s,
            Command::CreateApiKey {
                key: key("k1", HASH_B),
            },
        ),
        RejectCode::KeyExists,
    );
    assert_rejected(
        &run(
            &mut s,
            Command::CreateApiKey {
                key: key("k2", HASH_A),
            },
        ),
        RejectCode::KeyHashExists,
    );
    assert_rejected(
        &run(
            &mut s,
            Command::CreateApiKey {
                key: key("k3", "raw-secret"),
            },
        ),
        RejectCode::InvalidArgument,
    );
    assert_rejected(
        &run(
            &mut s,
            Command::CreateApiKey {
                key: key("k3", &HASH_A.to_uppercase()),
            },
        ),
        RejectCode::InvalidArgument,
    );
    assert_rejected(
        &run(
            &mut s,
            Command::CreateApiKey {
                key: key("", HASH_B),
            },
        ),
        RejectCode::InvalidArgument,
    );
    assert_eq!(s.keys.len(), 1);

    assert_eq!(
        run(&mut s, Command::RevokeApiKey { id: "k1".into() }),
        Response::Ok
    );
    assert!(s.keys["k1"].revoked);
    assert_eq!(
        run(&mut s, Command::RevokeApiKey { id: "k1".into() }),
        Response::Ok,
        "idempotent"
    );
    assert_rejected(
        &run(&mut s, Command::RevokeApiKey { id: "nope".into() }),
        RejectCode::KeyNotFound,
    );
    assert_eq!(
        run(&mut s, Command::DeleteApiKey { id: "k1".into() }),
        Response::Ok
    );
    assert_rejected(
        &run(&mut s, Command::DeleteApiKey { id: "k1".into() }),
        RejectCode::KeyNotFound,
    );
}

#[test]
fn roles_and_assignments() {
    let mut s = State::default();
    let role = RoleDef {
        name: "dev".into(),
        permissions: BTreeSet::from(["tools:call".to_string()]),
        description: String::new(),
    };
    assert_rejected(
        &run(
            &mut s,
            Command::AssignRole {
                principal: "alice".into(),
                role: "dev".into(),
                scope: None,
            },
        ),
        RejectCode::RoleNotFound,
    );
    assert_eq!(
        run(&mut s, Command::PutRole { role: role.clone() }),
        Response::Ok
    );
    let assign = |p: &str| Command::AssignRole {
        principal: p.into(),
        role: "dev".into(),
        scope: None,
    };
    assert_eq!(run(&mut s, assign("alice")), Response::Ok);
    assert_eq!(run(&mut s, assign("alice")), Response::Ok);
    assert_eq!(run(&mut s, assign("bob")), Response::Ok);
    assert_rejected(&run(&mut s, assign("")), RejectCode::InvalidArgument);
    assert_eq!(
        s.role_assignments["alice"],
        BTreeSet::from(["dev".to_string()])
    );
    assert_eq!(
        run(
            &mut s,
            Command::UnassignRole {
                principal: "bob".into(),
                role: "dev".into(),
                scope: None,
            }
        ),
        Response::Ok
    );
    assert!(!s.role_assignments.contains_key("bob"));
    // Deleting the role removes its assignments.
    assert_eq!(
        run(&mut s, Command::DeleteRole { name: "dev".into() }),
        Response::Ok
    );
    assert!(s.roles.is_empty());
    assert!(s.role_assignments.is_empty());
    assert_rejected(
        &run(&mut s, Command::DeleteRole { name: "dev".into() }),
        RejectCode::RoleNotFound,
    );
    let mut nameless = role;
    nameless.name.clear();
    assert_rejected(
        &run(&mut s, Command::PutRole { role: nameless }),
        RejectCode::InvalidArgument,
    );
}

#[test]
fn scoped_role_assignments_custom_roles_and_deletion() {
    let mut s = State::default();
    let role = |name: &str, perms: &[&str]| RoleDef {
        name: name.into(),
        permissions: perms.iter().map(|p| (*p).to_owned()).collect(),
        description: "custom".into(),
    };
    let assign = |p: &str, r: &str, scope: Option<&str>| Command::AssignRole {
        principal: p.into(),
        role: r.into(),
        scope: scope.map(str::to_owned),
    };
    let unassign = |p: &str, r: &str, scope: Option<&str>| Command::UnassignRole {
        principal: p.into(),
        role: r.into(),
        scope: scope.map(str::to_owned),
    };
    assert_eq!(
        run(
            &mut s,
            Command::PutRole {
                role: role("ops", &["mcp_servers:lifecycle"])
            }
        ),
        Response::Ok
    );
    // Create-or-replace.
    assert_eq!(
        run(
            &mut s,
            Command::PutRole {
                role: role("ops", &["mcp_servers:lifecycle", "tool:invoke"])
            }
        ),
        Response::Ok
    );
    assert_eq!(s.roles["ops"].permissions.len(), 2);
    let version = s.auth_version;
    // Scoped and global assignments are kept apart; `global` is the same as no scope.
    assert_eq!(
        run(&mut s, assign("svc", "ops", Some("server:a"))),
        Response::Ok
    );
    assert_eq!(
        run(&mut s, assign("svc", "ops", Some("group:g-1"))),
        Response::Ok
    );
    assert_eq!(
        run(&mut s, assign("ann", "ops", Some("global"))),
        Response::Ok
    );
    assert_eq!(s.auth_version, version + 3);
    assert!(!s.role_assignments.contains_key("svc"));
    assert_eq!(
        s.role_assignments["ann"],
        BTreeSet::from(["ops".to_owned()])
    );
    assert_eq!(
        s.scoped_role_assignments["svc"],
        BTreeMap::from([
            ("group:g-1".to_owned(), BTreeSet::from(["ops".to_owned()])),
            ("server:a".to_owned(), BTreeSet::from(["ops".to_owned()])),
        ])
    );
    // Bad scopes are refused and change nothing.
    for bad in [
        "tenant:acme",
        "server:",
        "server:a/b",
        "group",
        "everywhere",
        "",
    ] {
        assert_rejected(
            &run(&mut s, assign("svc", "ops", Some(bad))),
            RejectCode::InvalidArgument,
        );
        assert_rejected(
            &run(&mut s, unassign("svc", "ops", Some(bad))),
            RejectCode::InvalidArgument,
        );
    }
    assert_eq!(s.auth_version, version + 3);
    assert_rejected(
        &run(&mut s, assign("svc", "nope", Some("server:a"))),
        RejectCode::RoleNotFound,
    );
    // Revoking the global assignment leaves the scoped ones, and the other way round.
    assert_eq!(run(&mut s, unassign("svc", "ops", None)), Response::Ok);
    assert_eq!(s.scoped_role_assignments["svc"].len(), 2);
    assert_eq!(
        run(&mut s, unassign("svc", "ops", Some("server:a"))),
        Response::Ok
    );
    assert_eq!(
        s.scoped_role_assignments["svc"].keys().collect::<Vec<_>>(),
        ["group:g-1"]
    );
    assert_eq!(
        run(&mut s, unassign("ann", "ops", Some("server:a"))),
        Response::Ok
    );
    assert!(s.role_assignments.contains_key("ann"));
    // Deleting the role removes every assignment of it, scoped ones included.
    assert_eq!(
        run(&mut s, Command::DeleteRole { name: "ops".into() }),
        Response::Ok
    );
    assert!(s.role_assignments.is_empty());
    assert!(s.scoped_role_assignments.is_empty());
}

#[test]
fn role_scopes_parse() {
    assert_eq!(RoleScope::parse("global"), Ok(RoleScope::Global));
    assert_eq!(
        RoleScope::parse("server:math"),
        Ok(RoleScope::Server("math"))
    );
    assert_eq!(
        RoleScope::parse("group:g_1-x"),
        Ok(RoleScope::Group("g_1-x"))
    );
    for bad in [
        "Global",
        "tenant:a",
        "server:",
        "server:a:b",
        "group: a",
        "x",
    ] {
        assert!(RoleScope::parse(bad).is_err(), "{bad}");
    }
    let long = format!("server:{}", "a".repeat(65));
    assert!(RoleScope::parse(&long).is_err());
}

#[test]
fn entries_and_snapshots_from_before_scopes_still_read() {
    // A log entry and a state written before role scopes existed.
    let cmd: Command =
        serde_json::from_value(json!({"type": "assign_role", "principal": "p", "role": "viewer"}))
            .unwrap();
    assert_eq!(
        cmd,
        Command::AssignRole {
            principal: "p".into(),
            role: "viewer".into(),
            scope: None,
        }
    );
    // A global assignment is written as before (no `scope` field).
    assert!(serde_json::to_value(&cmd).unwrap().get("scope").is_none());
    let mut old = serde_json::to_value(State::default()).unwrap();
    old.as_object_mut()
        .unwrap()
        .remove("scoped_role_assignments");
    let st: State = serde_json::from_value(old).unwrap();
    assert!(st.scoped_role_assignments.is_empty());
}

#[test]
fn tool_policies() {
    let mut s = State::default();
    let policy = ToolPolicy {
        scope: "server".into(),
        target: "math".into(),
        allow: vec!["add".into()],
        deny: vec!["rm*".into()],
        approval: vec!["pay".into()],
    };
    assert_eq!(
        run(
            &mut s,
            Command::PutToolPolicy {
                policy: policy.clone()
            }
        ),
        Response::Ok
    );
    assert_eq!(s.policy("server", "math"), Some(&policy));
    let del = Command::DeleteToolPolicy {
        scope: "server".into(),
        target: "math".into(),
    };
    assert_eq!(run(&mut s, del.clone()), Response::Ok);
    assert_rejected(&run(&mut s, del), RejectCode::NotFound);
    let mut bad = policy;
    bad.scope.clear();
    assert_rejected(
        &run(&mut s, Command::PutToolPolicy { policy: bad }),
        RejectCode::InvalidArgument,
    );
}

fn limit(id: &str, source: &str) -> RateLimitDef {
    RateLimitDef {
        id: id.into(),
        source: source.into(),
        applies_to: "tools".into(),
        key: vec!["principal".into()],
        matches: BTreeMap::from([("tool".to_owned(), "write_*".to_owned())]),
        rps: 100.0,
        burst: 10,
        on_partition: "safe_share".into(),
    }
}

#[test]
fn rate_limits() {
    let mut s = State::default();
    let l = limit("per-user", "api");
    assert_eq!(
        run(&mut s, Command::PutRateLimit { limit: l.clone() }),
        Response::Ok
    );
    assert_eq!(s.limits["per-user"], l);
    for bad in [
        RateLimitDef {
            rps: 0.0,
            ..l.clone()
        },
        RateLimitDef {
            rps: f64::NAN,
            ..l.clone()
        },
        RateLimitDef {
            burst: 0,
            ..l.clone()
        },
        RateLimitDef {
            id: "a b".into(),
            ..l.clone()
        },
        RateLimitDef {
            key: vec!["user".into()],
            ..l.clone()
        },
        RateLimitDef {
            on_partition: "maybe".into(),
            ..l.clone()
        },
        RateLimitDef {
            matches: BTreeMap::from([("command".to_owned(), "x".to_owned())]),
            ..l.clone()
        },
    ] {
        assert_rejected(
            &run(&mut s, Command::PutRateLimit { limit: bad }),
            RejectCode::InvalidArgument,
        );
    }
    assert_eq!(
        run(
            &mut s,
            Command::DeleteRateLimit {
                id: "per-user".into()
            }
        ),
        Response::Ok
    );
    assert_rejected(
        &run(
            &mut s,
            Command::DeleteRateLimit {
                id: "per-user".into(),
            },
        ),
        RejectCode::NotFound,
    );
}

#[test]
fn file_rate_limits_replace_each_other_and_are_not_changed_through_the_api() {
    let mut s = State::default();
    run(
        &mut s,
        Command::PutRateLimit {
            limit: limit("mine", "api"),
        },
    );
    let set = |ids: &[&str]| Command::SetFileRateLimits {
        limits: ids.iter().map(|i| limit(i, "file")).collect(),
    };
    assert_eq!(run(&mut s, set(&["a", "b"])), Response::Ok);
    assert_eq!(run(&mut s, set(&["b", "c"])), Response::Ok);
    let ids: Vec<&String> = s.limits.keys().collect();
    assert_eq!(ids, ["b", "c", "mine"]);
    assert_rejected(
        &run(&mut s, Command::DeleteRateLimit { id: "b".into() }),
        RejectCode::Conflict,
    );
    assert_rejected(
        &run(
            &mut s,
            Command::PutRateLimit {
                limit: limit("c", "api"),
            },
        ),
        RejectCode::Conflict,
    );
    assert_rejected(&run(&mut s, set(&["a b"])), RejectCode::InvalidArgument);
    assert_rejected(
        &run(
            &mut s,
            Command::SetFileRateLimits {
                limits: vec![limit("x", "api")],
            },
        ),
        RejectCode::InvalidArgument,
    );
    // A refused set changes nothing.
    assert_eq!(s.limits.len(), 3);
}

fn ev(kind: &str) -> EventRecord {
    EventRecord {
        kind: kind.into(),
        at_ms: 5,
        node_id: 1,
        subject: "math".into(),
        data: json!({"k": 1}),
    }
}

#[test]
fn events_get_sequence_numbers_and_can_be_read_since() {
    let mut s = State::default();
    let r = run(
        &mut s,
        Command::AppendEvents {
            events: vec![ev("a"), ev("b"), ev("c")],
        },
    );
    assert_eq!(
        r,
        Response::EventsAppended {
            first_seq: Some(1),
            last_seq: Some(3)
        }
    );
    let r = run(
        &mut s,
        Command::AppendEvents {
            events: vec![ev("d")],
        },
    );
    assert_eq!(
        r,
        Response::EventsAppended {
            first_seq: Some(4),
            last_seq: Some(4)
        }
    );
    assert_eq!(
        run(&mut s, Command::AppendEvents { events: vec![] }),
        Response::EventsAppended {
            first_seq: None,
            last_seq: None
        }
    );
    let kinds = |v: Vec<StoredEvent>| v.into_iter().map(|e| e.event.kind).collect::<Vec<_>>();
    assert_eq!(kinds(s.events_since(0, 100)), ["a", "b", "c", "d"]);
    assert_eq!(kinds(s.events_since(2, 100)), ["c", "d"]);
    assert_eq!(kinds(s.events_since(1, 2)), ["b", "c"]);
    assert!(s.events_since(4, 100).is_empty());
    assert_eq!(s.events.last_seq(), 4);
}

#[test]
fn event_retention_by_count_and_age() {
    let mut s = State::default();
    assert_eq!(
        apply(
            &mut s,
            &Command::SetEventRetention {
                max_count: 3,
                max_age_ms: 1000
            },
            ctx(1, 0)
        ),
        Response::Ok
    );
    assert_eq!(s.events.retention(), (3, 1000));
    for (i, t) in [(0u64, 100u64), (1, 200), (2, 300), (3, 400)] {
        apply(
            &mut s,
            &Command::AppendEvents {
                events: vec![ev(&format!("e{i}"))],
            },
            ctx(1, t),
        );
    }
    // Count: only 3 kept, seq keeps increasing.
    assert_eq!(s.events.len(), 3);
    assert_eq!(s.events.first_seq(), Some(2));
    assert_eq!(s.events_since(0, 10)[0].seq, 2, "gap is visible to readers");
    // Age: at t=1350, events appended before 350 are dropped on the next append.
    apply(
        &mut s,
        &Command::AppendEvents {
            events: vec![ev("late")],
        },
        ctx(1, 1350),
    );
    let seqs: Vec<u64> = s.events_since(0, 10).iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [4, 5]);
    // Tightening retention applies at once.
    apply(
        &mut s,
        &Command::SetEventRetention {
            max_count: 1,
            max_age_ms: 0,
        },
        ctx(1, 1360),
    );
    assert_eq!(
        s.events_since(0, 10)
            .iter()
            .map(|e| e.seq)
            .collect::<Vec<_>>(),
        [5]
    );
}

#[test]
fn apply_clock_is_monotonic_across_leaders() {
    let mut s = State::default();
    apply(
        &mut s,
        &Command::AppendEvents {
            events: vec![ev("a")],
        },
        ctx(1, 5000),
    );
    // New leader with a clock behind: time does not go backwards, retention stays sane.
    apply(
        &mut s,
        &Command::AppendEvents {
            events: vec![ev("b")],
        },
        ctx(2, 4000),
    );
    assert_eq!(s.clock_ms, 5000);
    assert_eq!(s.events_since(1, 1)[0].appended_at_ms, 5000);
}

#[test]
fn nodes_register_and_unregister() {
    let mut s = State::default();
    let reg = Command::RegisterNode {
        node_id: 7,
        api_addr: "127.0.0.1:8080".into(),
        raft_addr: "127.0.0.1:9090".into(),
        capacity: Some(2),
        labels: [("zone".to_owned(), "a".to_owned())].into(),
    };
    assert_eq!(run(&mut s, reg), Response::Ok);
    assert_eq!(s.nodes[&7].api_addr, "127.0.0.1:8080");
    assert_eq!(s.nodes[&7].capacity, Some(2));
    assert_eq!(s.nodes[&7].labels["zone"], "a");
    let drain = |draining| Command::SetNodeDrain {
        node_id: 7,
        draining,
    };
    assert_eq!(run(&mut s, drain(true)), Response::Ok);
    assert!(s.nodes[&7].draining);
    // A restart re-registers; the drain stays until an operator lifts it.
    let again = Command::RegisterNode {
        node_id: 7,
        api_addr: "127.0.0.1:8081".into(),
        raft_addr: "127.0.0.1:9090".into(),
        capacity: None,
        labels: Default::default(),
    };
    assert_eq!(run(&mut s, again), Response::Ok);
    assert!(s.nodes[&7].draining);
    assert_eq!(run(&mut s, drain(false)), Response::Ok);
    assert!(!s.nodes[&7].draining);
    assert_rejected(
        &run(
            &mut s,
            Command::SetNodeDrain {
                node_id: 99,
                draining: true,
            },
        ),
        RejectCode::NotFound,
    );
    assert_eq!(
        run(&mut s, Command::UnregisterNode { node_id: 7 }),
        Response::Ok
    );
    assert_rejected(
        &run(&mut s, Command::UnregisterNode { node_id: 7 }),
        RejectCode::NotFound,
    );
}

#[test]
fn commands_and_state_round_trip_through_json() {
    let mut s = State::default();
    run(
        &mut s,
        file_config(&[("math", json!({"cmd": ["x"]}))], HASH_A),
    );
    run(
        &mut s,
        Command::CreateApiKey {
            key: key("k1", HASH_B),
        },
    );
    run(
        &mut s,
        Command::AppendEvents {
            events: vec![ev("a")],
        },
    );
    let text = serde_json::to_string(&s).unwrap();
    let back: State = serde_json::from_str(&text).unwrap();
    assert_eq!(back, s);
    assert!(text.contains(&format!("\"file:{HASH_A}\"")));

    let cmd = put_server("a", json!({"x": 1}), true, Some(3));
    let back: Command = serde_json::from_str(&serde_json::to_string(&cmd).unwrap()).unwrap();
    assert_eq!(back, cmd);
    let resp = Response::rejected(RejectCode::ServerExists, "m");
    let text = serde_json::to_string(&resp).unwrap();
    assert!(text.contains("\"server_exists\""), "{text}");
    // Display never shows payloads (they may hold secrets).
    assert_eq!(cmd.to_string(), "put_server");
    assert_eq!(
        ConfigSource::try_from("bogus".to_string()),
        Err(UnknownConfigSource("bogus".to_string()))
    );
}

#[test]
fn auth_version_moves_with_every_applied_key_or_role_change_only() {
    let mut s = State::default();
    let key = ApiKeyRecord {
        tenant: None,
        id: "k1".into(),
        principal: "svc".into(),
        name: "n".into(),
        sha256_hex: "a".repeat(64),
        created_at_ms: 0,
        expires_at_ms: None,
        revoked: false,
    };
    assert_eq!(
        run(&mut s, Command::CreateApiKey { key: key.clone() }),
        Response::Ok
    );
    assert_eq!(s.auth_version, 1);
    // A refused command (the id exists) changes nothing.
    assert!(matches!(
        run(&mut s, Command::CreateApiKey { key }),
        Response::Rejected { .. }
    ));
    assert_eq!(s.auth_version, 1);
    let assign = Command::AssignRole {
        principal: "svc".into(),
        role: "viewer".into(),
        scope: None,
    };
    // No such role yet: refused.
    assert!(matches!(
        run(&mut s, assign.clone()),
        Response::Rejected { .. }
    ));
    assert_eq!(s.auth_version, 1);
    let role = RoleDef {
        name: "viewer".into(),
        permissions: ["tool:list".to_owned()].into(),
        description: String::new(),
    };
    assert_eq!(run(&mut s, Command::PutRole { role }), Response::Ok);
    assert_eq!(run(&mut s, assign), Response::Ok);
    assert_eq!(
        run(&mut s, Command::RevokeApiKey { id: "k1".into() }),
        Response::Ok
    );
    assert_eq!(s.auth_version, 4);
    // Other commands leave it alone.
    let drain = Command::SetNodeDrain {
        node_id: 1,
        draining: true,
    };
    assert!(run(&mut s, drain).is_rejected(), "no node 1 registered");
    assert_eq!(s.auth_version, 4);
}

#[test]
fn a_re_proposed_event_batch_is_appended_once() {
    let with_id = |kind: &str, id: &str| {
        let mut e = ev(kind);
        e.data = serde_json::json!({"event_id": id});
        e
    };
    let mut s = State::default();
    let batch = vec![with_id("a", "e1"), with_id("b", "e2")];
    run(
        &mut s,
        Command::AppendEvents {
            events: batch.clone(),
        },
    );
    // The same batch again (its first proposal's outcome was unknown), now with a new event.
    let mut again = batch;
    again.push(with_id("c", "e3"));
    again.push(ev("no-id"));
    again.push(ev("no-id"));
    let r = run(&mut s, Command::AppendEvents { events: again });
    assert_eq!(
        r,
        Response::EventsAppended {
            first_seq: Some(3),
            last_seq: Some(5)
        }
    );
    // Only repeats are dropped: events without an id are all kept, a batch of repeats alone
    // appends nothing.
    let kinds: Vec<String> = s
        .events_since(0, 100)
        .into_iter()
        .map(|e| e.event.kind)
        .collect();
    assert_eq!(kinds, ["a", "b", "c", "no-id", "no-id"]);
    let r = run(
        &mut s,
        Command::AppendEvents {
            events: vec![with_id("a", "e1")],
        },
    );
    assert_eq!(
        r,
        Response::EventsAppended {
            first_seq: None,
            last_seq: None
        }
    );
}
