//! Bearer JWTs against a real node: an issuer served by this test on 127.0.0.1 (a JWKS over
//! plain HTTP, allowed on loopback), ES256 tokens signed here, roles from the replicated
//! assignments and from `group_roles`, refusals with `Bearer error="invalid_token"`, a key
//! rotation picked up by the unknown-`kid` refetch, and the lockout counting bad tokens; an
//! issuer whose JWKS URL is found by OIDC discovery, and per-tenant audiences.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hangar_tests::jwt::{AUD, ISS, issuer, key, now, oidc_issuer, token};
use hangar_tests::*;
use serde_json::{Value, json};

/// A request's status, `WWW-Authenticate` and JSON body.
async fn send(rb: reqwest::RequestBuilder) -> (u16, String, Value) {
    status_www_body(rb).await
}

fn bearer(rb: reqwest::RequestBuilder, token: Option<&str>) -> reqwest::RequestBuilder {
    match token {
        Some(t) => rb.header("Authorization", format!("Bearer {t}")),
        None => rb,
    }
}

/// Call the fixture's echo over `/mcp` with `token`: the HTTP status and the JSON-RPC answer.
async fn echo(c: &reqwest::Client, node: &Node, token: Option<&str>) -> (u16, Value) {
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "fx__echo", "arguments": {"message": "hello"}}})
    .to_string();
    let mut headers = Vec::new();
    let auth = token.map(|t| format!("Bearer {t}"));
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    let r = post_raw(c, &node.url("/mcp"), &body, &headers).await;
    let msg = if r.status == 200 {
        r.response()
    } else {
        serde_json::from_str(&r.body).unwrap_or_default()
    };
    (r.status, msg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_bearer_tokens_authenticate_map_roles_and_follow_key_rotation() {
    let (a, b, stranger) = (key("key-a"), key("key-b"), key("key-x"));
    let doc = Arc::new(Mutex::new(json!({"keys": [a.jwk]}).to_string()));
    let jwks = issuer(doc.clone()).await;
    let admin = format!("mcp_{:064x}", u128::from(std::process::id()) << 64 | 0x1e2e);
    let cfg = format!(
        "auth:\n  enabled: true\n  api_key:\n    bootstrap_key: ${{HANGAR_BOOTSTRAP_KEY}}\n  rate_limit: {{max_attempts: 40, window_seconds: 120, lockout_seconds: 1}}\n  jwt:\n    issuers:\n      - issuer: {ISS}\n        audience: {AUD}\n        jwks_uri: {jwks}\n        algorithms: [ES256]\n        group_roles: {{readers: viewer}}\nmcp_servers:\n{}",
        fixture_stdio_yaml("fx", "")
    );
    let node = Node::start_with(&cfg, &[("HANGAR_BOOTSTRAP_KEY", &admin)]);
    let c = client();

    // The subject `alice` is a developer, through the replicated role assignments.
    wait_for(
        "the admin assigns a role",
        Duration::from_secs(30),
        || async {
            let (s, _, _) = send(
                c.post(node.url("/api/auth/roles/assign"))
                    .header("X-API-Key", &admin)
                    .header("Content-Type", "application/json")
                    .body(json!({"principal_id": "alice", "role_name": "developer"}).to_string()),
            )
            .await;
            (s == 200).then_some(())
        },
    )
    .await;
    let alice = token(&a, a.kid, json!({}));
    let (status, resp) = echo(&c, &node, Some(&alice)).await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(text_of(&resp), "hello", "{resp}");
    let (s, _, me) = send(bearer(c.get(node.url("/api/system/me")), Some(&alice))).await;
    assert_eq!(s, 200, "{me}");
    assert_eq!(me["principal_id"], "alice");
    assert_eq!(me["auth_method"], "jwt");
    assert_eq!(me["issuer"], ISS);
    assert_eq!(me["tenant"], "acme");
    assert_eq!(me["groups"], json!(["devs"]));
    assert_eq!(me["roles"], json!(["developer"]));
    let (s, _, _) = send(bearer(c.get(node.url("/api/mcp_servers/")), Some(&alice))).await;
    assert_eq!(s, 200);

    // No token, an expired one, one for another audience, one signed by another key under
    // the issuer's kid: 401 on /mcp and /api.
    let t = now();
    let expired = token(
        &a,
        a.kid,
        json!({"iat": t - 4000, "exp": t - 3000, "nbf": null}),
    );
    let wrong_aud = token(&a, a.kid, json!({"aud": "another-service"}));
    let forged = token(&stranger, a.kid, json!({}));
    for (what, tok) in [
        ("no token", None),
        ("expired", Some(expired.as_str())),
        ("wrong audience", Some(wrong_aud.as_str())),
        ("signed by another key", Some(forged.as_str())),
    ] {
        let (s, www, body) = send(bearer(c.get(node.url("/api/mcp_servers/")), tok)).await;
        assert_eq!(s, 401, "{what} on /api: {body}");
        assert_eq!(body["error"], "authentication_failed", "{what}: {body}");
        if tok.is_some() {
            assert!(
                www.contains("Bearer error=\"invalid_token\""),
                "{what}: {www}"
            );
        } else {
            assert_eq!(www, "Bearer, ApiKey");
        }
        let (s, _) = echo(&c, &node, tok).await;
        assert_eq!(s, 401, "{what} on /mcp");
    }
    let (_, _, body) = send(bearer(c.get(node.url("/api/mcp_servers/")), Some(&expired))).await;
    assert_eq!(body["details"]["reason"], "expired", "{body}");
    let (_, _, body) = send(bearer(
        c.get(node.url("/api/mcp_servers/")),
        Some(&wrong_aud),
    ))
    .await;
    assert_eq!(body["details"]["reason"], "wrong_audience", "{body}");
    let (_, _, body) = send(bearer(c.get(node.url("/api/mcp_servers/")), Some(&forged))).await;
    assert_eq!(body["details"]["reason"], "bad_signature", "{body}");

    // A member of `readers` is a viewer (group_roles): reads, but may not write or call.
    let carol = token(&a, a.kid, json!({"sub": "carol", "groups": ["readers"]}));
    let (s, _, body) = send(bearer(c.get(node.url("/api/mcp_servers/")), Some(&carol))).await;
    assert_eq!(s, 200, "{body}");
    let (s, _, body) = send(bearer(
        c.delete(node.url("/api/mcp_servers/fx")),
        Some(&carol),
    ))
    .await;
    assert_eq!(s, 403, "{body}");
    assert_eq!(body["error"]["code"], "AccessDeniedError", "{body}");
    let (_, resp) = echo(&c, &node, Some(&carol)).await;
    assert_eq!(resp["error"]["code"], -32003, "{resp}");

    // The issuer rotates to key b: a token under the new kid is accepted after the refetch
    // it triggers; the retired key is refused.
    *doc.lock().unwrap() = json!({"keys": [b.jwk]}).to_string();
    let rotated = token(&b, b.kid, json!({}));
    let (status, resp) = echo(&c, &node, Some(&rotated)).await;
    assert_eq!(status, 200, "the new key right away: {resp}");
    assert_eq!(text_of(&resp), "hello");
    let (s, _, body) = send(bearer(c.get(node.url("/api/mcp_servers/")), Some(&alice))).await;
    assert_eq!(s, 401, "the retired key: {body}");
    assert_eq!(body["details"]["reason"], "unknown_key", "{body}");

    // Bad tokens count toward the lockout like bad keys: the address is then refused even
    // with a good token, until the lockout ends.
    let mut locked = false;
    for _ in 0..45 {
        let (s, _, body) = send(bearer(
            c.get(node.url("/api/mcp_servers/")),
            Some(&wrong_aud),
        ))
        .await;
        assert_eq!(s, 401);
        if body["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("Too many auth attempts"))
        {
            locked = true;
            break;
        }
    }
    assert!(locked, "bad tokens lock the address out");
    let (s, _, _) = send(bearer(c.get(node.url("/api/mcp_servers/")), Some(&rotated))).await;
    assert_eq!(s, 401, "locked out even with a good token");
    wait_for("the lockout ends", Duration::from_secs(20), || async {
        let (s, _, _) = send(bearer(c.get(node.url("/api/mcp_servers/")), Some(&rotated))).await;
        (s == 200).then_some(())
    })
    .await;

    // The node's log names reasons, never a token.
    let log = node.proc.stderr();
    assert!(log.contains("authentication_failed"), "{log}");
    for t in [&alice, &expired, &wrong_aud, &forged, &rotated] {
        let sig = t.rsplit('.').next().unwrap();
        assert!(!log.contains(sig), "a token is in the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_keys_found_by_oidc_discovery_and_strict_tenant_audiences() {
    let (d, s) = (key("disc-1"), key("strict-1"));
    // Issuer 1: no jwks_uri, its discovery document unavailable at first.
    let discoverable = Arc::new(AtomicBool::new(false));
    let base = oidc_issuer(
        Arc::new(Mutex::new(json!({"keys": [d.jwk]}).to_string())),
        discoverable.clone(),
    )
    .await;
    // Issuer 2: a jwks_uri, and each tenant bound to its own audiences.
    let strict_jwks = issuer(Arc::new(Mutex::new(json!({"keys": [s.jwk]}).to_string()))).await;
    let cfg = format!(
        "auth:\n  enabled: true\n  api_key: {{enabled: false}}\n  rate_limit: {{max_attempts: 1000, window_seconds: 60, lockout_seconds: 1}}\n  jwt:\n    algorithms: [ES256]\n    issuers:\n      - issuer: \"{base}\"\n        audience: {AUD}\n        tenant_audiences: {{acme: hangar-acme-extra}}\n      - issuer: {ISS}\n        audience: {AUD}\n        jwks_uri: {strict_jwks}\n        strict_tenant_audience: true\n        tenant_audiences: {{acme: hangar-acme, globex: [hangar-globex, hangar-globex-2]}}\nmcp_servers: {{}}\n"
    );
    let node = Node::start(&cfg);
    let c = client();
    let me = async |t: &str| send(bearer(c.get(node.url("/api/system/me")), Some(t))).await;

    // Until discovery succeeds, the issuer's tokens are refused (401 invalid_token).
    let by_discovery = token(&d, d.kid, json!({"iss": base}));
    let (st, www, body) = me(&by_discovery).await;
    assert_eq!(st, 401, "{body}");
    assert!(www.contains("Bearer error=\"invalid_token\""), "{www}");
    assert_eq!(body["details"]["reason"], "keys_unavailable", "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("OIDC discovery")),
        "{body}"
    );

    // The document appears: the node discovers the JWKS URL (retry or unknown-kid refetch,
    // each at most every ~10 s) and the same token verifies.
    discoverable.store(true, Ordering::SeqCst);
    let who = wait_for("discovery succeeds", Duration::from_secs(40), || async {
        let (st, _, body) = me(&by_discovery).await;
        (st == 200).then_some(body)
    })
    .await;
    assert_eq!(who["principal_id"], "alice", "{who}");
    assert_eq!(who["issuer"], base.as_str(), "{who}");
    assert_eq!(who["auth_method"], "jwt", "{who}");
    let log = node.proc.stderr();
    assert!(log.contains("oidc_discovery_failed"), "{log}");
    assert!(log.contains("oidc_discovered"), "{log}");
    assert!(log.contains(&format!("{base}/jwks.json")), "{log}");
    // Not strict: acme's own audience is accepted besides the issuer's, for acme only.
    let extra = token(
        &d,
        d.kid,
        json!({"iss": base, "tenant": "acme", "aud": "hangar-acme-extra"}),
    );
    let (st, _, body) = me(&extra).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["tenant"], "acme");
    let not_globex = token(
        &d,
        d.kid,
        json!({"iss": base, "tenant": "globex", "aud": "hangar-acme-extra"}),
    );
    let (st, _, body) = me(&not_globex).await;
    assert_eq!(st, 401, "{body}");
    assert_eq!(body["details"]["reason"], "wrong_audience", "{body}");

    // Strict: the right tenant with one of its audiences only.
    let strict = |claims: Value| token(&s, s.kid, claims);
    let acme = strict(json!({"tenant": "acme", "aud": "hangar-acme"}));
    let (st, _, body) = me(&acme).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(
        (&body["tenant"], &body["issuer"]),
        (&json!("acme"), &json!(ISS))
    );
    let globex = strict(json!({"tenant": "globex", "aud": ["other", "hangar-globex-2"]}));
    let (st, _, body) = me(&globex).await;
    assert_eq!(st, 200, "{body}");
    let refused = [
        (
            "another tenant's audience",
            strict(json!({"tenant": "acme", "aud": "hangar-globex"})),
            "wrong_audience",
        ),
        (
            "the issuer's audience",
            strict(json!({"tenant": "acme", "aud": AUD})),
            "wrong_audience",
        ),
        (
            "a tenant not in the map",
            strict(json!({"tenant": "initech", "aud": "hangar-acme"})),
            "tenant_not_allowed",
        ),
        (
            "no tenant",
            strict(json!({"tenant": null, "aud": "hangar-acme"})),
            "missing_claim",
        ),
    ];
    for (what, t, reason) in &refused {
        let (st, www, body) = me(t).await;
        assert_eq!(st, 401, "{what}: {body}");
        assert!(
            www.contains("Bearer error=\"invalid_token\""),
            "{what}: {www}"
        );
        assert_eq!(body["details"]["reason"], *reason, "{what}: {body}");
    }
    let (_, _, body) = me(&refused[2].1).await;
    let msg = body["message"].as_str().unwrap_or_default();
    assert!(msg.contains("tenant not allowed"), "{body}");
    assert!(!msg.contains("initech"), "{body}");

    // The log names reasons, never a token.
    let log = node.proc.stderr();
    assert!(log.contains("tenant not allowed"), "{log}");
    for t in [&by_discovery, &extra, &not_globex, &acme, &globex]
        .into_iter()
        .chain(refused.iter().map(|r| &r.1))
    {
        let sig = t.rsplit('.').next().unwrap();
        assert!(!log.contains(sig), "a token is in the log");
    }
}
