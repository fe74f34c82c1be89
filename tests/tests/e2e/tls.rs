//! HTTPS at the front door (`server.tls`, issue 9): a node serves MCP, `/api`, probes and
//! metrics over TLS only (h2 negotiated by ALPN), to clients that trust its CA; plain HTTP and
//! clients that do not trust the CA fail at the handshake (counted). New certificate files
//! are served to new connections without a restart, a broken replacement keeps the old one;
//! `require_client_cert` refuses clients without a certificate of the CA; `hangarctl` works
//! with `--ca-file`; two HTTPS nodes with required client certificates form a cluster (join
//! and status calls between them over HTTPS). Certificates come from
//! `hangarctl cluster gen-certs` (node certificates are server and client certificates).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use hangar_tests::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};

fn hangarctl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin("hangarctl"))
        .args(args)
        .env_remove("HANGAR_CA_FILE")
        .env_remove("HANGAR_ENDPOINT")
        .output()
        .expect("run hangarctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `hangarctl cluster gen-certs` into `dir`: `ca.pem`, `node-{1,2}.pem`, `node-{1,2}-key.pem`
/// for `localhost` and 127.0.0.1.
fn gen_certs(dir: &Path) -> PathBuf {
    let (ok, out, err) = hangarctl(&[
        "cluster",
        "gen-certs",
        "--out",
        dir.to_str().unwrap(),
        "--nodes",
        "2",
        "--san",
        "127.0.0.1",
        "--server-name",
        "localhost",
    ]);
    assert!(ok, "gen-certs failed:\n{out}\n{err}");
    dir.to_owned()
}

fn der(pem_file: &Path) -> Vec<u8> {
    CertificateDer::from_pem_file(pem_file)
        .unwrap()
        .as_ref()
        .to_vec()
}

/// The DER of the certificate the listener at `base` (`https://HOST:PORT`) serves to a new
/// connection, read from a handshake of our own.
async fn served_cert(base: &str, cas: &[&Path]) -> Vec<u8> {
    let addr = base.strip_prefix("https://").unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_config(cas, None)));
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0]
        .as_ref()
        .to_vec()
}

/// Replace `to` with the content of `from` in one step (as a deployment tool would).
fn replace(from: &Path, to: &Path) {
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

fn config(cert: &Path, key: &Path, extra_tls: &str, server: &str) -> String {
    format!(
        "server:\n  tls:\n    cert_file: \"{}\"\n    key_file: \"{}\"\n{extra_tls}mcp_servers:\n{}",
        cert.display(),
        key.display(),
        fixture_stdio_yaml(server, "")
    )
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_front_door_serves_trusting_clients_and_refuses_plain_http_and_strangers() {
    let dir = tempfile::tempdir().unwrap();
    let certs = gen_certs(&dir.path().join("certs"));
    let other = gen_certs(&dir.path().join("other"));
    let ca = certs.join("ca.pem");
    let node = Node::start(&config(
        &certs.join("node-1.pem"),
        &certs.join("node-1-key.pem"),
        "",
        "fx",
    ));
    let ready: Value =
        serde_json::from_str(&std::fs::read_to_string(node.dir.path().join("ready.json")).unwrap())
            .unwrap();
    assert_eq!(ready["https"], json!(true), "{ready}");
    let base = node.ready_url();
    assert_eq!(
        base,
        format!("https://{}", ready["http_addr"].as_str().unwrap())
    );

    // A client trusting the CA: MCP, /api, probes and metrics, over HTTP/2 (ALPN h2).
    let c = https_client(&[&ca], None);
    let r = call_tool(
        &c,
        &format!("{base}/mcp"),
        "fx__echo",
        json!({"message": "over tls"}),
    )
    .await;
    assert_eq!(text_of(&r), "over tls", "{r}");
    let resp = c
        .get(format!("{base}/api/mcp_servers/"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status().as_u16(), 200);
    let servers: Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
    assert_eq!(servers["mcp_servers"][0]["mcp_server"], "fx", "{servers}");
    let (code, _) = get_json(&c, &format!("{base}/health/live")).await;
    assert_eq!(code, 200);

    // Plain HTTP on the same port, and clients that do not trust the CA: no answer.
    let plain = client().get(node.url("/health/live")).send().await;
    assert!(plain.is_err(), "plain HTTP got an answer: {plain:?}");
    let system_roots = client().get(format!("{base}/health/live")).send().await;
    assert!(system_roots.is_err(), "{system_roots:?}");
    let other_ca = https_client(&[&other.join("ca.pem")], None)
        .get(format!("{base}/health/live"))
        .send()
        .await;
    assert!(other_ca.is_err(), "{other_ca:?}");
    // (Counted by the node once it saw the client give up: poll.)
    wait_for(
        "3 handshake failures counted",
        Duration::from_secs(10),
        async || {
            let text = get_text(&c, &format!("{base}/metrics")).await;
            (metric(&text, "hangar_http_tls_handshake_failures_total") >= 3.0).then_some(())
        },
    )
    .await;

    // hangarctl: with --ca-file it works; without, it says to pass it.
    let (ok, out, err) = hangarctl(&[
        "--endpoint",
        &base,
        "--ca-file",
        ca.to_str().unwrap(),
        "servers",
        "list",
    ]);
    assert!(ok && out.contains("fx"), "{out}\n{err}");
    let (ok, out, err) = hangarctl(&["--endpoint", &base, "servers", "list"]);
    assert!(!ok, "{out}");
    assert!(
        err.contains("not trusted") && err.contains("--ca-file"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_certificate_files_are_served_without_a_restart_and_a_broken_one_keeps_the_old() {
    let dir = tempfile::tempdir().unwrap();
    let first = gen_certs(&dir.path().join("first"));
    let second = gen_certs(&dir.path().join("second"));
    let live = dir.path().join("live");
    std::fs::create_dir(&live).unwrap();
    let (cert, key) = (live.join("cert.pem"), live.join("key.pem"));
    std::fs::copy(first.join("node-1.pem"), &cert).unwrap();
    std::fs::copy(first.join("node-1-key.pem"), &key).unwrap();
    let node = Node::start(&config(&cert, &key, "", "fx"));
    let base = node.ready_url();
    let cas = [first.join("ca.pem"), second.join("ca.pem")];
    let cas: Vec<&Path> = cas.iter().map(PathBuf::as_path).collect();
    assert_eq!(
        served_cert(&base, &cas).await,
        der(&first.join("node-1.pem"))
    );

    // A new pair (key first, then certificate, as separate writes).
    replace(&second.join("node-1-key.pem"), &key);
    replace(&second.join("node-1.pem"), &cert);
    let want = der(&second.join("node-1.pem"));
    wait_for(
        "the new certificate served",
        Duration::from_secs(20),
        async || (served_cert(&base, &cas).await == want).then_some(()),
    )
    .await;
    // Only the new CA is needed now.
    let c = https_client(&[&second.join("ca.pem")], None);
    let r = call_tool(
        &c,
        &format!("{base}/mcp"),
        "fx__echo",
        json!({"message": "rotated"}),
    )
    .await;
    assert_eq!(text_of(&r), "rotated");

    // A broken replacement: logged with the file's name; the current certificate stays.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nbroken\n").unwrap();
    poll_until("the failed reload logged", Duration::from_secs(20), || {
        let err = node.proc.stderr();
        (err.contains("http_tls_reload_failed") && err.contains(&cert.display().to_string()))
            .then_some(())
    });
    assert_eq!(served_cert(&base, &cas).await, want);
    let r = call_tool(
        &c,
        &format!("{base}/mcp"),
        "fx__echo",
        json!({"message": "still"}),
    )
    .await;
    assert_eq!(text_of(&r), "still");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_client_certificates_refuse_clients_without_one_of_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let certs = gen_certs(&dir.path().join("certs"));
    let other = gen_certs(&dir.path().join("other"));
    let ca = certs.join("ca.pem");
    let extra = format!(
        "    client_ca_file: \"{}\"\n    require_client_cert: true\n    min_version: \"1.3\"\n",
        ca.display()
    );
    let node = Node::start(&config(
        &certs.join("node-1.pem"),
        &certs.join("node-1-key.pem"),
        &extra,
        "fx",
    ));
    let base = node.ready_url();
    let mcp = format!("{base}/mcp");
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "fx__echo", "arguments": {"message": "mtls"}}});

    let anonymous = https_client(&[&ca], None)
        .post(&mcp)
        .header("Content-Type", "application/json")
        .header("Accept", "application/json, text/event-stream")
        .body(body.to_string())
        .send()
        .await;
    assert!(anonymous.is_err(), "{anonymous:?}");
    let foreign = https_client(
        &[&ca],
        Some((&other.join("node-2.pem"), &other.join("node-2-key.pem"))),
    )
    .get(format!("{base}/health/live"))
    .send()
    .await;
    assert!(foreign.is_err(), "{foreign:?}");

    let member = https_client(
        &[&ca],
        Some((&certs.join("node-2.pem"), &certs.join("node-2-key.pem"))),
    );
    let r = call_tool(&member, &mcp, "fx__echo", json!({"message": "mtls"})).await;
    assert_eq!(text_of(&r), "mtls", "{r}");
    wait_for(
        "2 handshake failures counted",
        Duration::from_secs(10),
        async || {
            let text = get_text(&member, &format!("{base}/metrics")).await;
            (metric(&text, "hangar_http_tls_handshake_failures_total") >= 2.0).then_some(())
        },
    )
    .await;
    // hangarctl presents a client certificate when given one (--client-cert/--client-key,
    // with or without --ca-file), and is refused without.
    let ca_arg = ca.to_str().unwrap();
    let cert = certs.join("node-2.pem");
    let key = certs.join("node-2-key.pem");
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let (ok, out, err) = hangarctl(&[
        "--endpoint",
        &base,
        "--ca-file",
        ca_arg,
        "--client-cert",
        cert,
        "--client-key",
        key,
        "servers",
        "list",
    ]);
    assert!(ok && out.contains("fx"), "{out}{err}");
    let (ok, _, err) = hangarctl(&["--endpoint", &base, "--ca-file", ca_arg, "servers", "list"]);
    assert!(!ok, "without a client certificate: {err}");
    let (ok, _, err) = hangarctl(&[
        "--endpoint",
        &base,
        "--ca-file",
        ca_arg,
        "--client-cert",
        cert,
        "servers",
        "list",
    ]);
    assert!(!ok && err.contains("--client-key"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_members_join_and_report_to_each_other_with_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let certs = gen_certs(&dir.path().join("certs"));
    let ca = certs.join("ca.pem");
    let extra = format!(
        "    client_ca_file: \"{}\"\n    require_client_cert: true\n",
        ca.display()
    );
    let yaml = |id: u64| {
        config(
            &certs.join(format!("node-{id}.pem")),
            &certs.join(format!("node-{id}-key.pem")),
            &extra,
            "fx",
        )
    };
    let one = Node::start(&yaml(1));
    let one_url = one.ready_url();
    let two = Node::start_with(
        &yaml(2),
        &[("HANGAR_NODE_ID", "2"), ("HANGAR_JOIN", one_url.as_str())],
    );
    let two_url = two.ready_url();
    let c = https_client(
        &[&ca],
        Some((&certs.join("node-1.pem"), &certs.join("node-1-key.pem"))),
    );
    // Each node's status asks the other one for its report, over HTTPS with its node
    // certificate as client certificate; the advertised API addresses say https.
    for url in [&one_url, &two_url] {
        let st = wait_for(
            "both members reachable",
            Duration::from_secs(30),
            async || {
                let (code, st) = get_json(&c, &format!("{url}/api/cluster/status")).await;
                let members = st["members"].as_array()?.clone();
                (code == 200
                    && members.len() == 2
                    && members.iter().all(|m| m["reachable"] == json!(true)))
                .then_some(st)
            },
        )
        .await;
        let addrs: Vec<&str> = st["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["api_addr"].as_str().unwrap())
            .collect();
        assert!(
            addrs.contains(&one_url.as_str()) && addrs.contains(&two_url.as_str()),
            "{st}"
        );
    }
}
