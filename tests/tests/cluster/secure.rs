//! Issue 9's closing scenario in one run: three nodes with HTTPS at the edge (`server.tls`),
//! mutual TLS between them (`cluster.tls`), API keys and JWTs (a local issuer serving JWKS on
//! loopback) enforced on REST and on `/mcp` — the MCP side driven by the official Python `mcp`
//! client over TLS (`tests/python/mcp_probe.py`). Every refusal case on every node; keys
//! created and revoked through different nodes take effect everywhere once acknowledged; a
//! process holding a certificate of another CA can neither vote nor forward; and after the run
//! no issued secret is in a data directory, a log or the event log.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hangar_tests::cluster::{Cluster, Member};
use hangar_tests::jwt::{AUD, ISS, issuer, key, now, token};
use hangar_tests::*;
use serde_json::{Value, json};

use super::tls::{gen_certs, metric, tls_keys};
use super::{assign, get_with_key, grep_dir, new_key, test_key};

/// One credential: how it is sent (`X-API-Key` or a bearer token).
#[derive(Clone)]
enum Cred {
    None,
    Key(String),
    Bearer(String),
}

impl Cred {
    fn headers(&self) -> Vec<(&'static str, String)> {
        match self {
            Cred::None => vec![],
            Cred::Key(k) => vec![("X-API-Key", k.clone())],
            Cred::Bearer(t) => vec![("Authorization", format!("Bearer {t}"))],
        }
    }

    fn apply(&self, mut rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        for (h, v) in self.headers() {
            rb = rb.header(h, v);
        }
        rb
    }
}

/// The config of member `id`: HTTPS with its node certificate, mutual TLS between the nodes,
/// auth with the bootstrap key from the environment and one JWT issuer, one fixture server.
fn secure_config(cl: &Cluster, certs: &Path, id: u64, jwks: &str, server: &str) -> String {
    let mut s = format!(
        "server:\n  tls:\n    cert_file: \"{cert}\"\n    key_file: \"{key}\"\n\
         auth:\n  enabled: true\n  api_key:\n    bootstrap_key: ${{HANGAR_BOOTSTRAP_KEY}}\n\
         \x20 rate_limit: {{max_attempts: 1000, window_seconds: 60, lockout_seconds: 1}}\n\
         \x20 jwt:\n    issuers:\n      - issuer: {ISS}\n        audience: {AUD}\n\
         \x20       jwks_uri: {jwks}\n        algorithms: [ES256]\n\
         \x20       group_roles: {{devs: developer}}\n\
         mcp_servers:\n{fixture}cluster:\n{tls}  peers:\n",
        cert = certs.join(format!("node-{id}.pem")).display(),
        key = certs.join(format!("node-{id}-key.pem")).display(),
        fixture = fixture_stdio_yaml(server, ""),
        tls = tls_keys(certs, id),
    );
    for m in cl.members() {
        s.push_str(&format!(
            "    - {{node_id: {}, raft_addr: \"{}\", api_addr: \"{}\"}}\n",
            m.id(),
            m.raft_addr(),
            m.base()
        ));
    }
    s
}

/// Run the Python SDK client on `probes` (see `tests/python/mcp_probe.py`): one answer each.
fn python_probes(root: &Path, ca: &Path, probes: &[Value]) -> Vec<Value> {
    let deps = deps_dir("python_probes");
    let python = deps.join("venv/bin/python");
    assert!(python.exists(), "{}: run scripts/deps.sh", python.display());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/mcp_probe.py");
    let spec = root.join("probes.json");
    std::fs::write(
        &spec,
        json!({"ca": ca, "timeout_s": 30, "probes": probes}).to_string(),
    )
    .unwrap();
    let out = std::process::Command::new(python)
        .arg(&script)
        .arg(&spec)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&spec);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "mcp_probe.py failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answers: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(answers.len(), probes.len(), "{stdout}");
    answers
}

fn probe(m: &Member, name: &str, cred: &Cred, call: Option<Value>) -> Value {
    let headers: serde_json::Map<String, Value> = cred
        .headers()
        .into_iter()
        .map(|(h, v)| (h.to_owned(), Value::String(v)))
        .collect();
    json!({"name": format!("node {} {name}", m.id()), "url": m.url("/mcp"),
        "headers": headers, "call": call})
}

async fn status(c: &reqwest::Client, m: &Member, cred: &Cred, path: &str) -> (u16, String, Value) {
    status_www_body(cred.apply(c.get(m.url(path)))).await
}

/// A gRPC POST to `path` on `raft_addr` over TLS with `client` (certificate of another CA):
/// whether anything answered.
async fn grpc_answered(client: &reqwest::Client, raft_addr: &str, path: &str) -> bool {
    client
        .post(format!("https://{raft_addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(vec![0u8; 5])
        .send()
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_mtls_keys_and_jwts_hold_on_every_node_and_no_secret_is_written_down() {
    let admin = test_key(9);
    let certs_root = tempfile::tempdir().unwrap();
    let certs = certs_root.path().join("certs");
    let other = certs_root.path().join("other-ca");
    gen_certs(&certs, 3);
    gen_certs(&other, 4);
    let ca = certs.join("ca.pem");
    let mut cl = Cluster::new(&bin("hangar"))
        .unwrap()
        .env("MCP_LOG_LEVEL", "info")
        .env("HANGAR_BOOTSTRAP_KEY", &admin)
        .api_key(&admin)
        .unwrap()
        .https(&ca)
        .unwrap();
    for id in 1..=3 {
        cl.add(id, &[]).unwrap();
    }
    let signer = key("k1");
    let doc = Arc::new(Mutex::new(
        json!({"keys": [signer.jwk.clone()]}).to_string(),
    ));
    let jwks = issuer(doc).await;
    let server = format!("sec{}", std::process::id());
    for id in cl.ids() {
        let cfg = secure_config(&cl, &certs, id, &jwks, &server);
        cl.write_config(id, &cfg).unwrap();
    }
    cl.start_all().await.unwrap();
    let leader = cl.wait_leader(Duration::from_secs(30)).await.unwrap();
    let c = https_client(&[&ca], None);
    let (n1, n2, n3) = (
        cl.member(1).unwrap(),
        cl.member(2).unwrap(),
        cl.member(3).unwrap(),
    );
    assert!(n1.base().starts_with("https://"));
    let admin_cred = Cred::Key(admin.clone());
    for m in cl.members() {
        wait_for(
            "the bootstrap key works on every node",
            Duration::from_secs(20),
            || async {
                (status(&c, m, &admin_cred, "/api/mcp_servers/").await.0 == 200).then_some(())
            },
        )
        .await;
    }

    // Keys: a developer's created through node 1 works on node 3 as soon as it is answered; a
    // viewer's through node 2; one revoked through node 3 is refused on node 1 right away.
    let dev = new_key(&c, n1, &admin, "svc:dev").await;
    assign(&c, n1, &admin, "svc:dev", "developer").await;
    let dev_cred = Cred::Key(dev.0.clone());
    let (code, _, body) = status(&c, n3, &dev_cred, "/api/mcp_servers/").await;
    assert_eq!(
        code, 200,
        "a key created through node 1, on node 3 at once: {body}"
    );
    let viewer = new_key(&c, n2, &admin, "svc:view").await;
    assign(&c, n2, &admin, "svc:view", "viewer").await;
    let revoked = new_key(&c, n1, &admin, "svc:gone").await;
    assign(&c, n1, &admin, "svc:gone", "developer").await;
    assert_eq!(
        status(&c, n1, &Cred::Key(revoked.0.clone()), "/api/mcp_servers/")
            .await
            .0,
        200
    );
    let r = c
        .delete(n3.url(&format!("/api/auth/keys/{}", revoked.1)))
        .header("X-API-Key", &admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "revoke through node 3");
    let (code, _, body) = status(&c, n1, &Cred::Key(revoked.0.clone()), "/api/mcp_servers/").await;
    assert_eq!(
        code, 401,
        "revoked through node 3, on node 1 at once: {body}"
    );
    // A key that expires a second from now.
    let r = c
        .post(n2.url("/api/auth/keys"))
        .header("X-API-Key", &admin)
        .header("Content-Type", "application/json")
        .body(
            json!({"principal_id": "svc:short", "name": "short", "expires_at": now() as f64 + 1.0})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    let short: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    let short = short["raw_key"].as_str().unwrap().to_owned();
    let t = now();
    let jwt_dev = token(&signer, "k1", json!({"sub": "carol"}));
    let jwt_expired = token(
        &signer,
        "k1",
        json!({"sub": "carol", "iat": t - 7200, "exp": t - 3600}),
    );
    let jwt_wrong_aud = token(
        &signer,
        "k1",
        json!({"sub": "carol", "aud": "someone-else"}),
    );
    let refused: Vec<(&str, Cred)> = vec![
        ("no credential", Cred::None),
        (
            "bogus key",
            Cred::Key("mcp_0000000000000000000000000000000000000000000".into()),
        ),
        ("revoked key", Cred::Key(revoked.0.clone())),
        ("expired key", Cred::Key(short.clone())),
        ("expired JWT", Cred::Bearer(jwt_expired.clone())),
        ("wrong-audience JWT", Cred::Bearer(jwt_wrong_aud.clone())),
    ];
    wait_for(
        "the short-lived key expires",
        Duration::from_secs(10),
        || async {
            let (code, _, body) = status(&c, n3, &Cred::Key(short.clone()), "/api/tools/").await;
            (code == 401 && body["message"].as_str()?.contains("expired")).then_some(())
        },
    )
    .await;

    // REST, on every node.
    let viewer_cred = Cred::Key(viewer.0.clone());
    let jwt_cred = Cred::Bearer(jwt_dev.clone());
    for m in cl.members() {
        for (what, cred) in &refused {
            let (code, www, body) = status(&c, m, cred, "/api/mcp_servers/").await;
            assert_eq!(code, 401, "node {} {what}: {body}", m.id());
            assert!(www.contains("Bearer"), "node {} {what}: {www}", m.id());
            assert_eq!(body["error"], "authentication_failed", "{body}");
        }
        for (what, cred) in [("developer key", &dev_cred), ("developer JWT", &jwt_cred)] {
            let (code, _, body) = status(&c, m, cred, "/api/mcp_servers/").await;
            assert_eq!(code, 200, "node {} {what}: {body}", m.id());
        }
        let (_, _, me) = status(&c, m, &jwt_cred, "/api/system/me").await;
        assert_eq!(me["roles"], json!(["developer"]), "{me}");
        // A viewer writes nothing.
        let r = viewer_cred
            .apply(c.post(m.url(&format!("/api/mcp_servers/{server}/stop"))))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status().as_u16(),
            403,
            "node {}: a viewer stops nothing",
            m.id()
        );
        let body: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        assert_eq!(body["error"]["code"], "AccessDeniedError", "{body}");
        // An unmapped route is denied even to the admin.
        let (code, _, body) = status(&c, m, &admin_cred, "/api/nonexistent").await;
        assert_eq!(code, 403, "node {}: {body}", m.id());
    }

    // MCP through the official Python client over TLS, on every node.
    let echo =
        |msg: &str| Some(json!({"name": format!("{server}__echo"), "arguments": {"message": msg}}));
    let mut probes = Vec::new();
    for m in cl.members() {
        for (what, cred) in &refused {
            probes.push(probe(m, what, cred, None));
        }
        probes.push(probe(m, "viewer", &viewer_cred, echo("viewer")));
        probes.push(probe(m, "developer key", &dev_cred, echo("dev key")));
        probes.push(probe(m, "developer JWT", &jwt_cred, echo("dev jwt")));
    }
    let answers = python_probes(cl.root(), &ca, &probes);
    let per_node = refused.len() + 3;
    for (i, a) in answers.iter().enumerate() {
        let k = i % per_node;
        if k < refused.len() {
            assert_eq!(a["http_status"], 401, "{a}");
        } else if k == refused.len() {
            // The viewer sees no tools and may not call one.
            assert_eq!(a["tools"], json!([]), "{a}");
            assert_eq!(a["rpc_error"]["code"], -32003, "{a}");
            assert!(
                a["rpc_error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("tool:invoke"),
                "{a}"
            );
        } else {
            let want = if k == refused.len() + 1 {
                "dev key"
            } else {
                "dev jwt"
            };
            assert!(a["tools"].as_array().is_some_and(|t| !t.is_empty()), "{a}");
            assert_eq!(a["call"], json!({"is_error": false, "text": want}), "{a}");
        }
    }

    // A process with a certificate of another CA can neither vote nor forward: refused at the
    // handshake, counted, and the cluster's term and membership stay as they were.
    let before = cl
        .get_json(leader, "/api/cluster/status", Duration::from_secs(5))
        .await
        .unwrap();
    let refused_before = metric(&c, &n1.url("/metrics"), "hangar_cluster_tls_refused_total").await;
    let intruder = https_client(
        &[&ca],
        Some((&other.join("node-4.pem"), &other.join("node-4-key.pem"))),
    );
    // The same request with a node certificate of the cluster is answered (by gRPC).
    let member = https_client(
        &[&ca],
        Some((&certs.join("node-3.pem"), &certs.join("node-3-key.pem"))),
    );
    assert!(
        grpc_answered(
            &member,
            n1.raft_addr(),
            "/hangar.raft.v1.RaftService/ReadIndex"
        )
        .await,
        "a node certificate of the cluster CA is accepted"
    );
    for path in [
        "/hangar.raft.v1.RaftService/Vote",
        "/hangar.raft.v1.RaftService/Forward",
        "/hangar.node.v1.CallService/Calls",
    ] {
        assert!(
            !grpc_answered(&intruder, n1.raft_addr(), path).await,
            "{path} answered a certificate of another CA"
        );
    }
    wait_for("the refusals counted", Duration::from_secs(10), || async {
        (metric(&c, &n1.url("/metrics"), "hangar_cluster_tls_refused_total").await
            >= refused_before + 3.0)
            .then_some(())
    })
    .await;
    let after = cl
        .get_json(leader, "/api/cluster/status", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(after["term"], before["term"], "{after}");
    assert_eq!(after["members"], before["members"], "{after}");

    // No issued secret in the event log (read through every node), then none on disk.
    let secrets = [
        admin.as_str(),
        dev.0.as_str(),
        viewer.0.as_str(),
        revoked.0.as_str(),
        short.as_str(),
        jwt_dev.as_str(),
        jwt_expired.as_str(),
        jwt_wrong_aud.as_str(),
    ];
    for m in cl.members() {
        let (code, _, events) =
            get_with_key(&c, &m.url("/api/events?since=0&limit=10000"), Some(&admin)).await;
        assert_eq!(code, 200);
        let text = events.to_string();
        assert!(
            text.contains("KeyRevoked") || text.contains("ApiKeyRevoked"),
            "the revoke is an audit event: {}",
            &text[..text.len().min(400)]
        );
        for s in secrets {
            assert!(
                !text.contains(s),
                "node {}: a secret in the event log",
                m.id()
            );
        }
    }
    for id in cl.ids() {
        cl.terminate(id).await.unwrap();
    }
    for s in secrets {
        let hits = grep_dir(cl.root(), s);
        assert!(hits.is_empty(), "a secret is written in {hits:?}");
    }
}
