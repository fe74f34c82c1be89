//! Mutual TLS between the nodes (`cluster.tls`, issue 9): a cluster whose certificates come
//! from `hangarctl cluster gen-certs` forms, replicates, forwards writes and tool calls; a
//! process with a certificate of another CA cannot join, and a peer without a certificate is
//! refused, logged and counted, while the cluster's term and membership stay as they were.

use std::time::Duration;

use hangar_tests::cluster::Cluster;
use hangar_tests::*;
use serde_json::{Value, json};

use super::{cluster, hangarctl};

/// `hangarctl cluster gen-certs` into `dir` for nodes 1..=n.
pub(super) fn gen_certs(dir: &std::path::Path, n: u64) {
    let (ok, out, err) = hangarctl(
        "http://127.0.0.1:9",
        &[
            "cluster",
            "gen-certs",
            "--out",
            dir.to_str().unwrap(),
            "--nodes",
            &n.to_string(),
            "--san",
            "127.0.0.1",
        ],
    );
    assert!(ok, "gen-certs failed:\n{out}\n{err}");
    assert!(dir.join("ca.pem").exists() && dir.join(format!("node-{n}-key.pem")).exists());
}

pub(super) fn tls_keys(dir: &std::path::Path, id: u64) -> String {
    format!(
        "  tls:\n    ca_file: \"{}\"\n    cert_file: \"{}\"\n    key_file: \"{}\"\n",
        dir.join("ca.pem").display(),
        dir.join(format!("node-{id}.pem")).display(),
        dir.join(format!("node-{id}-key.pem")).display()
    )
}

async fn status(c: &reqwest::Client, cl: &Cluster, id: u64) -> Value {
    let (code, v) = get_json(c, &cl.member(id).unwrap().url("/api/cluster/status")).await;
    assert_eq!(code, 200, "{v}");
    v
}

fn member_ids(st: &Value) -> Vec<u64> {
    let mut ids: Vec<u64> = st["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["node_id"].as_u64().unwrap())
        .collect();
    ids.sort_unstable();
    ids
}

/// The value of the first sample of metric `name` on the `/metrics` page at `url` (0 when absent).
pub(super) async fn metric(c: &reqwest::Client, url: &str, name: &str) -> f64 {
    get_text(c, url)
        .await
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_keeps_out_every_process_without_a_node_certificate_of_the_cluster_ca() {
    let c = client();
    let mut cl = cluster(3, &[]);
    let certs = cl.root().join("certs");
    let other = cl.root().join("other-ca");
    gen_certs(&certs, 3);
    gen_certs(&other, 4);
    let server = format!("tlsfx{}", std::process::id());
    let head = format!(
        "mcp_servers:\n{}",
        fixture_stdio_yaml(&server, "    placement: {nodes: [1]}\n")
    );
    for id in cl.ids() {
        let cfg = cl.static_peers_config(&head, &tls_keys(&certs, id));
        cl.write_config(id, &cfg).unwrap();
    }
    cl.start_all().await.unwrap();
    let leader = cl.wait_leader(Duration::from_secs(20)).await.unwrap();

    // Writes through a follower reach the leader (forwarded over TLS) and replicate.
    let follower = cl.ids().into_iter().find(|i| *i != leader).unwrap();
    let (code, key) = post_json(
        &c,
        &cl.member(follower).unwrap().url("/api/auth/keys"),
        json!({"principal_id": "svc", "name": "over-tls"}),
    )
    .await;
    assert_eq!(code, 201, "{key}");
    let key_id = key["key_id"].as_str().unwrap().to_owned();
    for id in cl.ids() {
        let url = cl.member(id).unwrap().url("/api/auth/keys");
        wait_for("the key on every node", Duration::from_secs(10), || async {
            let (_, v) = get_json(&c, &url).await;
            v.to_string().contains(&key_id).then_some(())
        })
        .await;
    }
    // A tool call through node 2 runs on node 1 (forwarded over TLS).
    let r = call_tool(
        &c,
        &cl.member(2).unwrap().url("/mcp"),
        &format!("{server}__echo"),
        json!({"message": "through mTLS"}),
    )
    .await;
    assert_eq!(text_of(&r), "through mTLS", "{r}");

    let before = status(&c, &cl, leader).await;
    let term = before["term"].as_u64().unwrap();
    assert_eq!(member_ids(&before), [1, 2, 3]);

    // A peer without any certificate: refused at the handshake, logged and counted.
    let raft_url = format!(
        "http://{}/hangar.raft.v1.RaftService/Vote",
        cl.member(1).unwrap().raft_addr()
    );
    let plain = reqwest::Client::builder()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let r = plain
        .post(&raft_url)
        .header("content-type", "application/grpc")
        .body(vec![0u8; 5])
        .send()
        .await;
    assert!(r.is_err(), "a plaintext gRPC request was answered: {r:?}");
    let metrics = cl.member(1).unwrap().url("/metrics");
    wait_for("the refusal counted", Duration::from_secs(10), || async {
        (metric(&c, &metrics, "hangar_cluster_tls_refused_total").await >= 1.0).then_some(())
    })
    .await;
    assert!(cl.member(1).unwrap().log().contains("raft_tls_refused"));

    // A process whose certificate comes from another CA cannot join.
    cl.add(4, &["--no-bootstrap"]).unwrap();
    cl.write_config(
        4,
        &format!("mcp_servers: {{}}\ncluster:\n{}", tls_keys(&other, 4)),
    )
    .unwrap();
    cl.start(4).await.unwrap();
    let seed = cl.member(leader).unwrap().base();
    let (ok, out, err) = hangarctl(&cl.member(4).unwrap().base(), &["cluster", "join", &seed]);
    assert!(!ok, "a node of another CA joined:\n{out}\n{err}");
    assert!(
        format!("{out}{err}").contains("mutual-TLS"),
        "the refusal says why:\n{out}\n{err}"
    );
    let after = status(&c, &cl, leader).await;
    assert_eq!(member_ids(&after), [1, 2, 3], "{after}");
    assert_eq!(after["term"].as_u64().unwrap(), term, "{after}");
    // The cluster still serves.
    let r = call_tool(
        &c,
        &cl.member(3).unwrap().url("/mcp"),
        &format!("{server}__echo"),
        json!({"message": "still"}),
    )
    .await;
    assert_eq!(text_of(&r), "still", "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_loopback_raft_address_needs_tls_or_an_explicit_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(&cfg, "mcp_servers: {}\n").unwrap();
    let out = std::process::Command::new(bin("hangar"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--raft-addr",
            "0.0.0.0:0",
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cluster.tls") && err.contains("insecure"),
        "{err}"
    );
}
