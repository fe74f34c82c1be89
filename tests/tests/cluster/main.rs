//! Raft cluster tests with real `hangar` processes on loopback: forming a cluster from
//! nothing with `hangarctl`, replicated writes and catalogue, leader kills (kill -9) with
//! re-election, catch-up after restart (also by snapshot), membership changes, and
//! single-node persistence.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use futures::StreamExt;
use hangar_tests::cluster::{Cluster, Member};
use hangar_tests::*;
use serde_json::{Value, json};

mod ratelimit;
mod secure;
mod tls;

/// A cluster of `n` members (ids 1..=n, not started) running `hangar` with `args`, logging
/// at info level.
fn cluster(n: u64, args: &[&str]) -> Cluster {
    let mut cl = Cluster::new(&bin("hangar"))
        .unwrap()
        .env("MCP_LOG_LEVEL", "info");
    for id in 1..=n {
        cl.add(id, args).unwrap();
    }
    cl
}

/// Give every member of `cl` one static-peers config (`head`: top-level keys; `cluster_extra`:
/// indented keys under `cluster:`), start them all and wait for a leader; returns its id.
async fn start_static(cl: &mut Cluster, head: &str, cluster_extra: &str) -> u64 {
    let cfg = cl.static_peers_config(head, cluster_extra);
    for n in cl.ids() {
        cl.write_config(n, &cfg).unwrap();
    }
    cl.start_all().await.unwrap();
    cl.wait_leader(Duration::from_secs(20)).await.unwrap()
}

/// A 3-node cluster running one fixture server whose id (also its `--name`, by which its
/// processes are counted) is `prefix` + this test process's pid, with `server_extra` under
/// the server and `cluster_extra` under `cluster:`; returns the cluster, the id and its
/// `whoami` tool.
async fn fixture_cluster(
    prefix: &str,
    server_extra: &str,
    cluster_extra: &str,
) -> (Cluster, String, String) {
    let mut cl = cluster(3, &[]);
    let id = format!("{prefix}{}", std::process::id());
    let tool = format!("{id}__whoami");
    start_static(
        &mut cl,
        &format!("mcp_servers:\n{}", fixture_stdio_yaml(&id, server_extra)),
        cluster_extra,
    )
    .await;
    (cl, id, tool)
}

fn hangarctl(endpoint: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin("hangarctl"))
        .arg("--endpoint")
        .arg(endpoint)
        .args(args)
        .output()
        .expect("run hangarctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ctl_ok(endpoint: &str, args: &[&str]) -> String {
    let (ok, out, err) = hangarctl(endpoint, args);
    assert!(ok, "hangarctl {args:?} failed:\n{out}\n{err}");
    out
}

/// Servers listed by a node.
async fn server_ids(c: &reqwest::Client, m: &Member) -> Option<BTreeSet<String>> {
    let text = c
        .get(m.url("/api/mcp_servers/"))
        .timeout(Duration::from_secs(3))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    Some(
        v["mcp_servers"]
            .as_array()?
            .iter()
            .filter_map(|s| s["mcp_server"].as_str().map(str::to_owned))
            .collect(),
    )
}

/// Create a server through `m`; true when acknowledged (2xx).
async fn add_server(c: &reqwest::Client, m: &Member, id: &str) -> bool {
    let body = json!({"mcp_server_id": id, "mode": "remote", "endpoint": "http://127.0.0.1:9/mcp"});
    match c
        .post(m.url("/api/mcp_servers/"))
        .header("Content-Type", "application/json")
        .body(body.to_string())
        .timeout(Duration::from_secs(15))
        .send()
        .await
    {
        Ok(r) => r.status().is_success(),
        Err(_) => false,
    }
}

/// Create an API key through `m`; its id when acknowledged.
async fn add_key(c: &reqwest::Client, m: &Member, name: &str) -> Option<String> {
    let body = json!({"principal_id": "svc", "name": name});
    let r = c
        .post(m.url("/api/auth/keys"))
        .header("Content-Type", "application/json")
        .body(body.to_string())
        .timeout(Duration::from_secs(15))
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    let v: Value = serde_json::from_str(&r.text().await.ok()?).ok()?;
    assert!(v["raw_key"].as_str()?.starts_with("mcp_"));
    v["key_id"].as_str().map(str::to_owned)
}

/// Key ids listed by a node.
async fn key_ids(c: &reqwest::Client, m: &Member) -> Option<BTreeSet<String>> {
    let (code, v) = get_json(c, &m.url("/api/auth/keys")).await;
    (code == 200).then_some(())?;
    Some(
        v["keys"]
            .as_array()?
            .iter()
            .filter_map(|k| k["key_id"].as_str().map(str::to_owned))
            .collect(),
    )
}

/// (seq, event id) of every event a node lists.
async fn event_ids(c: &reqwest::Client, m: &Member) -> Option<Vec<(u64, String)>> {
    let (code, v) = get_json(c, &m.url("/api/events?since=0&limit=10000")).await;
    (code == 200).then_some(())?;
    v["events"]
        .as_array()?
        .iter()
        .map(|e| Some((e["seq"].as_u64()?, e["event_id"].as_str()?.to_owned())))
        .collect()
}

/// A config with fixture servers `a` and `b` (`member_extra` added to each) and a round-robin
/// group `g` of the two.
fn group_of_two(a: &str, b: &str, member_extra: &str) -> String {
    format!(
        "mcp_servers:\n{}{}  g:\n    mode: group\n    strategy: round_robin\n    members:\n      - id: {a}\n      - id: {b}\n",
        fixture_stdio_yaml(a, member_extra),
        fixture_stdio_yaml(b, member_extra)
    )
}

/// A JSON-RPC POST that accepts a JSON answer only (no event stream), within `timeout`.
async fn post_json_only(
    c: &reqwest::Client,
    url: &str,
    body: &Value,
    timeout: Duration,
) -> reqwest::Result<reqwest::Response> {
    c.post(url)
        .header("Content-Type", "application/json")
        .header("Accept", "application/json")
        .timeout(timeout)
        .body(body.to_string())
        .send()
        .await
}

fn fixture_config() -> String {
    format!("mcp_servers:\n{}", fixture_stdio_yaml("fx", ""))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_forms_from_nothing_replicates_and_survives_twenty_leader_kills() {
    let c = client();
    let cfg = fixture_config();
    let mut cl = cluster(3, &["--no-bootstrap"]);
    for id in cl.ids() {
        cl.write_config(id, &cfg).unwrap();
    }
    cl.start_all().await.unwrap();
    let ms = cl.members();
    // Not ready before the cluster exists.
    let (code, _) = get_json(&c, &ms[0].url("/health/ready")).await;
    assert_eq!(code, 503);

    // Form the cluster with hangarctl.
    ctl_ok(&ms[0].base(), &["cluster", "init"]);
    let seed = ms[0].base();
    ctl_ok(&ms[1].base(), &["cluster", "join", &seed]);
    ctl_ok(&ms[2].base(), &["cluster", "join", &seed]);
    let out = ctl_ok(&ms[2].base(), &["cluster", "status"]);
    assert!(out.contains("leader 1"), "{out}");
    let st: Value = serde_json::from_str(&ctl_ok(
        &ms[1].base(),
        &["--output", "json", "cluster", "status"],
    ))
    .unwrap();
    let voters: Vec<&str> = st["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["membership"].as_str())
        .collect();
    assert_eq!(voters, vec!["voter"; 3], "{st}");
    for m in ms {
        wait_for("node ready", Duration::from_secs(20), || async {
            (get_json(&c, &m.url("/health/ready")).await.0 == 200).then_some(())
        })
        .await;
    }

    // The config file's servers are on every node; a write on a follower shows everywhere.
    let follower = ms.iter().find(|m| m.id() != 1).unwrap();
    assert!(add_server(&c, follower, "added-on-follower").await);
    for m in ms {
        let ids = wait_for(
            "replicated server list",
            Duration::from_secs(10),
            || async {
                let ids = server_ids(&c, m).await?;
                ids.contains("added-on-follower").then_some(ids)
            },
        )
        .await;
        assert!(ids.contains("fx"), "{ids:?}");
    }

    // A tool call on node 1 teaches the catalogue to every node: node 3 lists the tools
    // without starting the server.
    let r = call_tool(&c, &ms[0].url("/mcp"), "fx__echo", json!({"message": "hi"})).await;
    assert_eq!(text_of(&r), "hi", "{r}");
    wait_for(
        "catalogue replicated to node 3",
        Duration::from_secs(10),
        || async {
            let (_, v) = get_json(&c, &ms[2].url("/api/tools/")).await;
            v["tools"]
                .as_array()?
                .iter()
                .any(|t| t["exposed_name"] == "fx__echo")
                .then_some(())
        },
    )
    .await;
    let names = wait_for("catalogue on node 3", Duration::from_secs(10), || async {
        let a = rpc(&c, &ms[2].url("/mcp"), "tools/list", json!({})).await;
        let tools = a.response()["result"]["tools"].as_array()?.clone();
        let names: Vec<String> = tools
            .iter()
            .filter_map(|t| t["name"].as_str().map(str::to_owned))
            .collect();
        names.contains(&"fx__echo".to_owned()).then_some(names)
    })
    .await;
    let on_one: Vec<String> = rpc(&c, &ms[0].url("/mcp"), "tools/list", json!({}))
        .await
        .response()["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["name"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(names, on_one, "every node lists the same tools");
    // fx runs once, where the leader placed it; node 3 shows that instance and never
    // started one of its own to list the tools.
    let (_, fx3) = get_json(&c, &ms[2].url("/api/mcp_servers/fx")).await;
    let host = fx3["node"].as_u64().expect("fx is placed");
    assert_ne!(host, 3, "{fx3}");
    assert_eq!(fx3["health"]["starts"], 0, "node 3 did not start fx: {fx3}");
    assert_eq!(fx3["pid"], Value::Null, "{fx3}");

    // Events are the same on every node (same sequence numbers and ids).
    let ev1 = wait_for(
        "McpServerStarted replicated",
        Duration::from_secs(10),
        || async {
            let (_, v) = get_json(&c, &ms[2].url("/api/events?since=0&limit=1000")).await;
            let evs = v["events"].as_array()?.clone();
            evs.iter()
                .any(|e| e["event_type"] == "McpServerStarted" && e["produced_by"] == "1")
                .then_some(evs)
        },
    )
    .await;
    let (_, v1) = get_json(&c, &ms[0].url("/api/events?since=0&limit=1000")).await;
    let ids = |evs: &[Value]| -> Vec<(u64, String)> {
        evs.iter()
            .map(|e| {
                (
                    e["seq"].as_u64().unwrap(),
                    e["event_id"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let a = ids(&ev1);
    let b = ids(v1["events"].as_array().unwrap());
    let n = a.len().min(b.len());
    assert!(n > 0);
    assert_eq!(a[..n], b[..n], "event logs differ between nodes");

    // hangarctl events tail sees them.
    let tail = ctl_ok(
        &ms[1].base(),
        &[
            "events",
            "tail",
            "--since",
            "0",
            "--count",
            "1",
            "--timeout",
            "5",
        ],
    );
    assert!(!tail.trim().is_empty());

    // Twenty leader kills: each time a new leader is elected, a write through a survivor
    // succeeds, and the killed node restarts and catches up.
    let mut acked: Vec<String> = vec!["added-on-follower".into()];
    let mut acked_keys: BTreeSet<String> = BTreeSet::new();
    let mut failovers = Vec::new();
    for round in 0..20 {
        let leader = cl.wait_leader(Duration::from_secs(20)).await.unwrap();
        let killed_at = cl.kill9(leader).unwrap();
        let ms = cl.members();
        // First successful write through another node.
        let id = format!("k{round}");
        wait_for(
            &format!("round {round}: a write acknowledged after killing leader {leader}"),
            Duration::from_secs(20),
            async || {
                let target = ms.iter().find(|m| m.alive()).unwrap();
                if add_server(&c, target, &id).await {
                    return Some(());
                }
                // The write may have been committed although its answer was lost: a retry
                // then reports "exists", which also proves it is there.
                server_ids(&c, target)
                    .await
                    .is_some_and(|s| s.contains(&id))
                    .then_some(())
            },
        )
        .await;
        failovers.push(killed_at.elapsed());
        acked.push(id);
        // A key created through another survivor is acknowledged too.
        let other = ms.iter().rfind(|m| m.alive()).unwrap();
        if let Some(k) = add_key(&c, other, &format!("round-{round}")).await {
            acked_keys.insert(k);
        }
        let new_leader = cl.wait_leader(Duration::from_secs(20)).await.unwrap();
        assert_ne!(new_leader, leader);
        // Restart the killed node; it must catch up before the next kill (quorum).
        cl.restart(leader).await.unwrap();
        let want: BTreeSet<String> = acked.iter().cloned().collect();
        let m = cl.member(leader).unwrap();
        wait_for(
            "restarted node caught up",
            Duration::from_secs(30),
            || async {
                let ids = server_ids(&c, m).await?;
                let ready = get_json(&c, &m.url("/health/ready")).await.0 == 200;
                (ready && want.is_subset(&ids)).then_some(())
            },
        )
        .await;
    }
    let ms = cl.members();
    // Every acknowledged write is on every node.
    let want: BTreeSet<String> = acked.iter().cloned().collect();
    for m in ms {
        let ids = wait_for(
            "all acknowledged writes",
            Duration::from_secs(20),
            || async {
                let ids = server_ids(&c, m).await?;
                want.is_subset(&ids).then_some(ids)
            },
        )
        .await;
        assert!(ids.contains("fx"));
    }
    assert!(
        acked_keys.len() >= 15,
        "most key writes succeed: {acked_keys:?}"
    );
    for m in ms {
        wait_for("all acknowledged keys", Duration::from_secs(20), || async {
            acked_keys.is_subset(&key_ids(&c, m).await?).then_some(())
        })
        .await;
    }
    // The event log is the same on every node (same sequence numbers, same ids).
    let logs = wait_for("identical event logs", Duration::from_secs(20), || async {
        let mut logs = Vec::new();
        for m in ms {
            logs.push(event_ids(&c, m).await?);
        }
        logs.windows(2).all(|w| w[0] == w[1]).then_some(logs)
    })
    .await;
    assert!(logs[0].len() > 20, "{} events", logs[0].len());
    failovers.sort();
    eprintln!(
        "leader failover (kill -9 → first acknowledged write), {} kills: p50 {:?}, p99 {:?}, max {:?}",
        failovers.len(),
        percentile(&failovers, 0.5),
        percentile(&failovers, 0.99),
        failovers.last().unwrap()
    );
    for m in ms {
        assert!(
            !m.log().contains("panicked"),
            "node {} panicked:\n{}",
            m.id(),
            m.log()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_nodes_catch_up_by_snapshot_and_membership_changes_work() {
    let c = client();
    // Static peers: the lowest id bootstraps; small snapshot interval so a lagging node
    // must be sent a snapshot.
    let mut cl = cluster(3, &[]);
    let leader = start_static(
        &mut cl,
        "mcp_servers: {}\n",
        "  snapshot_every: 20\n  keep_logs: 5\n",
    )
    .await;
    // Take node 3 (or another non-leader) down, write a lot, snapshot and purge.
    let lag = cl.ids().into_iter().find(|&id| id != leader).unwrap();
    cl.kill9(lag).unwrap();
    let writer = cl.members().iter().find(|m| m.alive()).unwrap();
    let mut acked = BTreeSet::new();
    for i in 0..60 {
        let id = format!("s{i}");
        assert!(add_server(&c, writer, &id).await, "write {id}");
        acked.insert(id);
    }
    let leader_m = cl.member(leader).unwrap();
    let snap: Value = serde_json::from_str(&ctl_ok(
        &leader_m.base(),
        &["--output", "json", "cluster", "snapshot", "--purge"],
    ))
    .unwrap();
    assert!(snap["purged_index"].as_u64().unwrap_or(0) > 0, "{snap}");
    cl.restart(lag).await.unwrap();
    let m = cl.member(lag).unwrap();
    wait_for(
        "lagging node caught up",
        Duration::from_secs(30),
        || async {
            let ids = server_ids(&c, m).await?;
            acked.is_subset(&ids).then_some(())
        },
    )
    .await;
    let (_, st) = get_json(&c, &m.url("/api/cluster/status")).await;
    assert!(
        st["snapshot_index"].as_u64().unwrap_or(0) > 0,
        "the lagging node was caught up from a snapshot: {st}"
    );

    // A fourth node: added as a learner with hangarctl, promoted, then node 2 removed.
    cl.add(4, &["--no-bootstrap"]).unwrap();
    cl.write_config(4, "mcp_servers: {}\n").unwrap();
    cl.start(4).await.unwrap();
    let m4 = cl.member(4).unwrap();
    let any = cl.members()[0].base();
    ctl_ok(
        &any,
        &[
            "cluster",
            "add-learner",
            "--node-id",
            "4",
            "--raft-addr",
            m4.raft_addr(),
            "--api-addr",
            m4.api_addr(),
        ],
    );
    wait_for("learner caught up", Duration::from_secs(20), || async {
        let ids = server_ids(&c, m4).await?;
        acked.is_subset(&ids).then_some(())
    })
    .await;
    ctl_ok(&any, &["cluster", "promote", "4"]);
    ctl_ok(&any, &["cluster", "remove", "2"]);
    let st: Value =
        serde_json::from_str(&ctl_ok(&any, &["--output", "json", "cluster", "status"])).unwrap();
    let mut roles: BTreeMap<u64, String> = BTreeMap::new();
    for m in st["members"].as_array().unwrap() {
        roles.insert(
            m["node_id"].as_u64().unwrap(),
            m["membership"].as_str().unwrap().to_owned(),
        );
    }
    assert_eq!(
        roles,
        BTreeMap::from([
            (1, "voter".to_owned()),
            (3, "voter".to_owned()),
            (4, "voter".to_owned())
        ]),
        "{st}"
    );
    // Leadership can be handed to a chosen voter.
    let out = ctl_ok(&any, &["cluster", "transfer-leader", "4"]);
    assert!(out.contains("leader is now 4"), "{out}");
    // The new voter takes writes; the cluster survives losing one of three voters.
    cl.kill9(2).unwrap();
    let m4 = cl.member(4).unwrap();
    assert!(add_server(&c, m4, "after-membership-change").await);
    // Errors say what to do.
    let (ok, _, err) = hangarctl(&any, &["cluster", "promote", "99"]);
    assert!(!ok && err.contains("not a learner"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_default_keeps_its_data_across_restarts() {
    let root = tempfile::tempdir().unwrap();
    let c = client();
    let mut cl = cluster(1, &[]);
    cl.write_config(1, &fixture_config()).unwrap();
    cl.start(1).await.unwrap();
    let m = cl.member(1).unwrap();
    assert_eq!(get_json(&c, &m.url("/health/ready")).await.0, 200);
    assert!(add_server(&c, m, "kept").await);
    let (_, before) = get_json(&c, &m.url("/api/events?since=0&limit=1000")).await;
    // Graceful stop, then start again on the same data directory.
    let code = cl.terminate(1).await.unwrap();
    assert_eq!(code, Some(0));
    cl.start(1).await.unwrap();
    let m = cl.member(1).unwrap();
    let ids = server_ids(&c, m).await.unwrap();
    assert!(ids.contains("kept") && ids.contains("fx"), "{ids:?}");
    let (_, after) = get_json(&c, &m.url("/api/events?since=0&limit=1000")).await;
    assert!(
        after["last_seq"].as_u64() >= before["last_seq"].as_u64(),
        "{before} {after}"
    );
    // hangarctl config export / diff / apply on the running node.
    let export: Value = serde_json::from_str(&ctl_ok(
        &m.base(),
        &["--output", "json", "config", "export"],
    ))
    .unwrap();
    assert!(export["mcp_servers"]["kept"].is_object(), "{export}");
    let new_cfg = root.path().join("new.yaml");
    std::fs::write(
        &new_cfg,
        format!("mcp_servers:\n{}", fixture_stdio_yaml("fx2", "")),
    )
    .unwrap();
    let diff = ctl_ok(&m.base(), &["config", "diff", new_cfg.to_str().unwrap()]);
    assert!(diff.contains("+ fx2") && diff.contains("- fx"), "{diff}");
    ctl_ok(&m.base(), &["config", "apply", new_cfg.to_str().unwrap()]);
    let ids = server_ids(&c, m).await.unwrap();
    assert!(
        ids.contains("fx2") && !ids.contains("fx") && ids.contains("kept"),
        "{ids:?}"
    );
    let bad = root.path().join("bad.yaml");
    std::fs::write(&bad, "mcp_servers:\n  x:\n    commandd: [y]\n").unwrap();
    let (ok, out, err) = hangarctl(&m.base(), &["config", "validate", bad.to_str().unwrap()]);
    assert!(!ok && out.contains("mcp_servers.x.commandd"), "{out}{err}");
    // Data directory in use: a second node on it refuses to start with a clear message.
    let out = Command::new(bin("hangar"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(m.data_dir())
        .arg("--config")
        .arg(m.config_path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("data directory"), "{err}");
    // A non-loopback listener without auth is refused before anything is bound.
    let out = Command::new(bin("hangar"))
        .args(["serve", "--listen", "0.0.0.0:0", "--data-dir"])
        .arg(root.path().join("open"))
        .arg("--config")
        .arg(m.config_path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to listen on 0.0.0.0:0 without authentication")
            && err.contains("--unsafe-no-auth"),
        "{err}"
    );
}

/// Live processes whose command line contains `marker` (the fixture's `--name`).
fn processes_named(marker: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        // Zombies are gone already; only running processes count.
        let state = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .next();
        // A lease shim (`hangar exec-child --lease-fd`) carries the server's argv too; it is
        // not the server.
        let shim = args.contains(&b"exec-child".as_slice());
        if state != Some("Z") && !shim && args.contains(&marker.as_bytes()) {
            out.push(pid);
        }
    }
    out
}

/// The parent pid of `pid`.
fn ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Whether `pid` is a lease shim (`hangar exec-child`).
fn is_shim(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"exec-child"))
}

/// The pid of the node that runs server process `pid` (its parent, or its lease shim's).
fn parent_of(pid: u32) -> Option<u32> {
    let p = ppid(pid)?;
    if is_shim(p) { ppid(p) } else { Some(p) }
}

/// The pid the fixture reports from `whoami`, called through `m`.
/// Wait until every member answers `/health/ready` with 200.
async fn wait_all_ready(c: &reqwest::Client, cl: &Cluster) {
    for m in cl.members() {
        wait_for("node ready", Duration::from_secs(20), || async {
            (get_json(c, &m.url("/health/ready")).await.0 == 200).then_some(())
        })
        .await;
    }
}

/// The id of the member whose child the process `pid` is.
fn host_of(cl: &Cluster, pid: u32) -> u64 {
    cl.members()
        .iter()
        .find(|m| m.pid() == parent_of(pid))
        .map(Member::id)
        .expect("the instance is a child of one of the nodes")
}

async fn whoami(c: &reqwest::Client, m: &Member, tool: &str) -> Option<u64> {
    let r = call_tool(c, &m.url("/mcp"), tool, json!({})).await;
    let text = r["result"]["content"][0]["text"].as_str()?;
    serde_json::from_str::<Value>(text).ok()?["pid"].as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_instance_serves_every_node_and_moves_when_its_node_dies() {
    let c = client();
    let (mut cl, id, tool) = fixture_cluster("solo", "", "  node_loss_timeout_ms: 3000\n").await;
    wait_all_ready(&c, &cl).await;
    // Every node serves the call; all reach the same process, and only one exists.
    let mut seen = BTreeSet::new();
    for m in cl.members() {
        let pid = whoami(&c, m, &tool).await;
        assert!(pid.is_some(), "call through node {} failed", m.id());
        seen.insert(pid.unwrap());
    }
    assert_eq!(
        seen.len(),
        1,
        "every node reached the same instance: {seen:?}"
    );
    let pid = *seen.first().unwrap() as u32;
    assert_eq!(
        processes_named(&id),
        vec![pid],
        "exactly one process machine-wide"
    );
    let host = host_of(&cl, pid);

    // Progress notifications of a call forwarded across nodes reach the caller in order,
    // with its own token, before the answer.
    let other = cl.members().iter().find(|m| m.id() != host).unwrap();
    let body = json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {
        "name": format!("{id}__progress"), "arguments": {"steps": 3, "ms": 5},
        "_meta": {"progressToken": "fwd-token"}}})
    .to_string();
    let r = post_raw(&c, &other.url("/mcp"), &body, &[]).await;
    assert!(r.content_type.starts_with("text/event-stream"), "{r:?}");
    let msgs = r.messages();
    assert_progress(&msgs, 3, "fwd-token");
    assert_eq!(text_of(msgs.last().unwrap()), "done 3");

    // Sampling and elicitation from the upstream reach a client of another node; the
    // client's answers, posted to the third node (as a balancer may deliver them), go home.
    let third = cl
        .members()
        .iter()
        .find(|m| m.id() != host && m.id() != other.id())
        .unwrap();
    let home = format!("hgr/{host}/");
    let r = relay_roundtrip(
        &c,
        &other.url("/mcp"),
        &third.url("/mcp"),
        &format!("{id}__sample"),
        |m| {
            assert_eq!(m["method"], "sampling/createMessage");
            assert!(m["id"].as_str().unwrap().starts_with(&home), "{m}");
            json!({"role": "assistant",
                "content": {"type": "text", "text": "answered via a third node"}, "model": "m"})
        },
    )
    .await;
    assert_eq!(text_of(&r), "sampled: answered via a third node");
    let r = relay_roundtrip(
        &c,
        &other.url("/mcp"),
        &third.url("/mcp"),
        &format!("{id}__elicit"),
        |m| {
            assert_eq!(m["method"], "elicitation/create");
            json!({"action": "accept", "content": {"answer": "42"}})
        },
    )
    .await;
    assert!(text_of(&r).contains("42"), "{r}");
    // A client that reads no event stream cannot answer: the host tells the upstream at once
    // (the call ends without waiting for an answer that cannot come).
    let body = json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call",
        "params": {"name": format!("{id}__sample"), "arguments": {"prompt": "p"}}});
    let r = post_json_only(&c, &other.url("/mcp"), &body, Duration::from_secs(20))
        .await
        .unwrap();
    let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert!(text_of(&v).contains("sampling failed"), "{v}");
    assert!(text_of(&v).contains("cannot receive requests"), "{v}");
    for m in cl.members() {
        let (_, sys) = get_json(&c, &m.url("/api/system")).await;
        assert_eq!(
            sys["system"]["gateway"]["pending_relays"],
            0,
            "node {}: {sys}",
            m.id()
        );
    }

    // An upstream's own tool-list change on the host reaches the GET /mcp stream of a node
    // that does not host it (through the replicated catalogue).
    let mut listener = Listener::open(&c, &other.url("/mcp")).await;
    let r = call_tool(
        &c,
        &other.url("/mcp"),
        &format!("{id}__change_tools"),
        json!({}),
    )
    .await;
    assert_eq!(text_of(&r), "extra tool added");
    let extra = format!("{id}__extra");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        listener
            .expect(
                "notifications/tools/list_changed",
                deadline.saturating_duration_since(std::time::Instant::now()),
            )
            .await;
        let a = rpc(&c, &other.url("/mcp"), "tools/list", json!({})).await;
        let tools = a.response()["result"]["tools"].clone();
        if tools
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["name"] == extra.as_str()))
        {
            break;
        }
    }
    drop(listener);

    // A client that goes away cancels the call on the host, across the forward: read the
    // stream until the upstream reports progress (it is working on the call), then drop it.
    let long = json!({"jsonrpc": "2.0", "id": 10, "method": "tools/call", "params": {
        "name": format!("{id}__progress"), "arguments": {"steps": 1000, "ms": 20},
        "_meta": {"progressToken": "leaver"}}})
    .to_string();
    let resp = c
        .post(other.url("/mcp"))
        .header("Content-Type", "application/json")
        .header("Accept", "application/json, text/event-stream")
        .body(long)
        .send()
        .await
        .unwrap();
    let mut stream = resp.bytes_stream();
    let mut seen = String::new();
    // Bounded: at most 1000 chunks, 20 s.
    let first = tokio::time::timeout(Duration::from_secs(20), async {
        for _ in 0..1000 {
            match stream.next().await {
                Some(Ok(b)) => {
                    seen.push_str(&String::from_utf8_lossy(&b));
                    if seen.contains("notifications/progress") {
                        return true;
                    }
                }
                _ => return false,
            }
        }
        false
    })
    .await;
    assert_eq!(first, Ok(true), "progress before the client leaves: {seen}");
    drop(stream);
    let host_m = cl.member(host).unwrap();
    wait_for(
        "notifications/cancelled on the host",
        Duration::from_secs(10),
        || async {
            logs_contain(
                &c,
                &host_m.url(&format!("/api/mcp_servers/{id}/logs")),
                "notifications/cancelled",
            )
            .await
        },
    )
    .await;
    // Starting it through the REST API of a node that does not host it reaches the host
    // (no second process) and lists its tools.
    let r = c
        .post(other.url(&format!("/api/mcp_servers/{id}/start")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert!(v["tools"].as_array().is_some_and(|t| !t.is_empty()), "{v}");
    // Every node shows where it runs and the state its host reported.
    for m in cl.members() {
        wait_for(
            "the host's report on every node",
            Duration::from_secs(10),
            || async {
                let (n, s) = placements_seen(&c, m).await?.get(&id)?.clone();
                (n == host && s == "ready").then_some(())
            },
        )
        .await;
    }
    for m in cl.members() {
        let (_, sys) = get_json(&c, &m.url("/api/system")).await;
        assert_eq!(
            sys["system"]["placements"],
            json!([{"mcp_server": id, "node": host, "state": "ready"}]),
            "/api/system/ on node {}",
            m.id()
        );
    }
    let t = ctl_ok(&other.base(), &["servers", "list"]);
    let row: Vec<&str> = t
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("{t}"))
        .split_whitespace()
        .collect();
    assert_eq!(row[2], host.to_string(), "the NODE column: {t}");
    assert_eq!(processes_named(&id), vec![pid], "still one process");

    // The hosting node dies: survivors place the instance elsewhere and serve again.
    cl.kill9(host).unwrap();
    let survivors: Vec<u64> = cl.alive();
    let new_pid = wait_for(
        "calls served again after the host died",
        Duration::from_secs(45),
        || async {
            let mut pids = BTreeSet::new();
            for n in &survivors {
                pids.insert(whoami(&c, cl.member(*n).unwrap(), &tool).await?);
            }
            (pids.len() == 1).then(|| *pids.first().unwrap())
        },
    )
    .await as u32;
    assert_ne!(new_pid, pid, "a new process serves");
    let procs = wait_for(
        "the dead node's child is gone",
        Duration::from_secs(10),
        || async {
            let p = processes_named(&id);
            (p.len() == 1).then_some(p)
        },
    )
    .await;
    assert_eq!(procs, vec![new_pid], "exactly one process after the move");
    let new_host = parent_of(new_pid);
    assert!(
        survivors
            .iter()
            .any(|n| cl.member(*n).unwrap().pid() == new_host),
        "the new instance runs on a survivor"
    );
}

/// `/api/mcp_servers/` rows of `m` by id: (node, state).
async fn placements_seen(
    c: &reqwest::Client,
    m: &Member,
) -> Option<BTreeMap<String, (u64, String)>> {
    let (code, v) = get_json(c, &m.url("/api/mcp_servers/")).await;
    if code != 200 {
        return None;
    }
    Some(
        v["mcp_servers"]
            .as_array()?
            .iter()
            .filter_map(|r| {
                Some((
                    r["mcp_server"].as_str()?.to_owned(),
                    (r["node"].as_u64()?, r["state"].as_str()?.to_owned()),
                ))
            })
            .collect(),
    )
}

/// A forwarded call whose client goes away is cancelled on the stream of calls the two nodes
/// share: cancellations must not disturb the other calls on it (with a stream per call they
/// once did: the HTTP/2 library ends a connection after 1,024 streams it had to reset itself).
/// Here a forwarded call waits for the client's sampling answer while more than 1,100 other
/// forwards are cancelled and 3,000 more are answered, and must still complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_than_a_thousand_cancelled_forwards_break_no_other_call() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let c = client();
    let (cl, id, tool) = fixture_cluster("resets", "", "").await;
    wait_all_ready(&c, &cl).await;
    let pid = whoami(&c, &cl.members()[0], &tool)
        .await
        .expect("the first call works") as u32;
    let host = host_of(&cl, pid);
    let other = cl.members().iter().find(|m| m.id() != host).unwrap();
    let url = other.url("/mcp");

    // The call that stays in flight: its sampling request is answered only after the
    // cancellations.
    let asked = std::sync::Arc::new(AtomicBool::new(false));
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let pending = tokio::spawn({
        let (c, url, asked) = (c.clone(), url.clone(), asked.clone());
        let sample = format!("{id}__sample");
        async move {
            relay_roundtrip(&c, &url, &url, &sample, move |m| {
                assert_eq!(m["method"], "sampling/createMessage");
                asked.store(true, Ordering::SeqCst);
                tokio::task::block_in_place(|| wait.recv().expect("the test sends go"));
                json!({"role": "assistant",
                    "content": {"type": "text", "text": "still here"}, "model": "m"})
            })
            .await
        }
    });
    wait_for("the sampling request", Duration::from_secs(20), || async {
        asked.load(Ordering::SeqCst).then_some(())
    })
    .await;

    // 1,300 forwarded calls whose client gives up after 150 ms (the tool takes 2 s).
    let slow = format!("{id}__slow");
    let cancelled = futures::stream::iter(0..1300u32)
        .map(|i| {
            let (c, url, slow) = (c.clone(), url.clone(), slow.clone());
            async move {
                let body = json!({"jsonrpc": "2.0", "id": i, "method": "tools/call",
                    "params": {"name": slow, "arguments": {"ms": 2000}}});
                post_json_only(&c, &url, &body, Duration::from_millis(150))
                    .await
                    .is_err_and(|e| e.is_timeout())
            }
        })
        .buffer_unordered(32)
        .filter(|gave_up| std::future::ready(*gave_up))
        .count()
        .await;
    assert!(cancelled > 1100, "only {cancelled} calls were cancelled");
    // 3,000 forwarded calls answered at once, 16 at a time: none may fail.
    let echo = format!("{id}__echo");
    let failed: Vec<Value> = futures::stream::iter(0..3000u32)
        .map(|i| {
            let (c, url, echo) = (c.clone(), url.clone(), echo.clone());
            async move { call_tool(&c, &url, &echo, json!({"message": format!("m{i}")})).await }
        })
        .buffer_unordered(16)
        .filter(|r| std::future::ready(r.get("result").is_none()))
        .collect()
        .await;
    assert!(
        failed.is_empty(),
        "{} calls failed, e.g. {}",
        failed.len(),
        failed[0]
    );

    go.send(()).unwrap();
    let r = tokio::time::timeout(Duration::from_secs(30), pending)
        .await
        .expect("the call in flight ends")
        .unwrap();
    assert_eq!(text_of(&r), "sampled: still here", "{r}");
    assert!(whoami(&c, other, &tool).await.is_some(), "a new call works");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_spread_over_nodes_fails_no_call_when_a_node_dies() {
    let c = client();
    let mut cl = cluster(3, &[]);
    let tag = std::process::id();
    let (a, b) = (format!("ga{tag}"), format!("gb{tag}"));
    let head = group_of_two(&a, &b, "    idempotent_tools: [whoami]\n");
    start_static(&mut cl, &head, "  node_loss_timeout_ms: 3000\n").await;
    // Both members run (the group auto-starts them), on two different nodes, and every node
    // shows the same placement and state.
    let views = wait_for(
        "members ready everywhere",
        Duration::from_secs(30),
        || async {
            let mut views = Vec::new();
            for m in cl.members() {
                let v = placements_seen(&c, m).await?;
                let (na, sa) = v.get(&a)?;
                let (nb, sb) = v.get(&b)?;
                (sa == "ready" && sb == "ready").then_some(())?;
                views.push((*na, *nb));
            }
            Some(views)
        },
    )
    .await;
    assert!(
        views.windows(2).all(|w| w[0] == w[1]),
        "same view on every node: {views:?}"
    );
    let (na, nb) = views[0];
    assert_ne!(na, nb, "members on different nodes");
    // Kill the node of member a while clients call the group through the other nodes.
    let callers: Vec<String> = cl
        .members()
        .iter()
        .filter(|m| m.id() != na)
        .map(|m| m.url("/mcp"))
        .collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (i, url) in callers.iter().cycle().take(4).enumerate() {
        let (c, url, stop) = (c.clone(), url.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            // Bounded: at most 100 000 calls per client (the test stops it far earlier).
            for _ in 0..100_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let r = call_tool(&c, &url, "g__whoami", json!({})).await;
                if r["result"]["content"][0]["text"].is_string() && r["result"]["isError"] != true {
                    ok += 1;
                } else {
                    failed.push(format!("client {i}: {r}"));
                }
            }
            (ok, failed)
        }));
    }
    wait_for("calls flowing", Duration::from_secs(10), || async {
        let m = cl.member(nb).unwrap();
        placements_seen(&c, m).await.map(|_| ())
    })
    .await;
    cl.kill9(na).unwrap();
    // Traffic continues while the leader notices the loss and re-places member a.
    let survivor = cl.member(nb).unwrap();
    wait_for(
        "member a re-placed and ready",
        Duration::from_secs(45),
        || async {
            let v = placements_seen(&c, survivor).await?;
            let (n, s) = v.get(&a)?;
            (*n != na && s == "ready").then_some(())
        },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for t in tasks {
        let (ok, failed) = t.await.unwrap();
        assert!(failed.is_empty(), "failed calls: {failed:?}");
        total += ok;
    }
    assert!(total > 20, "calls were made during the kill ({total})");
    // Member a, READY again on its new node, is back in rotation on every surviving node:
    // the group's calls reach both members' processes again.
    for n in cl.alive() {
        let m = cl.member(n).unwrap();
        wait_for(
            "both members in rotation again",
            Duration::from_secs(20),
            || async {
                let mut pids = BTreeSet::new();
                for _ in 0..6 {
                    let r = call_tool(&c, &m.url("/mcp"), "g__whoami", json!({})).await;
                    let text = r["result"]["content"][0]["text"].as_str()?.to_owned();
                    pids.insert(serde_json::from_str::<Value>(&text).ok()?["pid"].as_u64()?);
                }
                (pids.len() == 2).then_some(())
            },
        )
        .await;
    }

    // A member that restarts with a different configuration file does not replace the
    // cluster's configuration (the last node to start used to win silently).
    let r = nb;
    let other_cfg = cl.static_peers_config("mcp_servers: {}\n", "  node_loss_timeout_ms: 3000\n");
    cl.write_config(r, &other_cfg).unwrap();
    cl.terminate(r).await.unwrap();
    cl.restart(r).await.unwrap();
    let m = cl.member(r).unwrap();
    wait_for("restarted node ready", Duration::from_secs(30), || async {
        (get_json(&c, &m.url("/health/ready")).await.0 == 200).then_some(())
    })
    .await;
    let ids = server_ids(&c, m).await.unwrap();
    assert!(ids.contains(&a) && ids.contains("g"), "{ids:?}");
    assert!(
        m.log().contains("config_file_not_applied"),
        "the node says why"
    );
}

/// A node stopped with SIGTERM, without a drain first, fails no call forwarded to it, not even
/// one that is not idempotent: the calls running there finish, new ones are refused before
/// they are sent and go to the group's other member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_with_sigterm_fails_no_forwarded_call() {
    let c = client();
    let mut cl = cluster(3, &[]);
    let tag = std::process::id();
    let (a, b) = (format!("sa{tag}"), format!("sb{tag}"));
    let head = group_of_two(&a, &b, "");
    start_static(&mut cl, &head, "  node_loss_timeout_ms: 3000\n").await;
    let (na, nb) = wait_for("members ready", Duration::from_secs(30), || async {
        let v = placements_seen(&c, &cl.members()[0]).await?;
        let (na, sa) = v.get(&a)?;
        let (nb, sb) = v.get(&b)?;
        (sa == "ready" && sb == "ready").then_some((*na, *nb))
    })
    .await;
    assert_ne!(na, nb, "members on different nodes");
    // Every call goes through the third node, so every call is forwarded.
    let via = cl
        .members()
        .iter()
        .find(|m| m.id() != na && m.id() != nb)
        .unwrap()
        .url("/mcp");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let mut tasks = Vec::new();
    for i in 0..4 {
        let (c, url, stop, done) = (c.clone(), via.clone(), stop.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut failed = Vec::new();
            // Bounded: at most 10 000 calls per client (the test stops it far earlier).
            for _ in 0..10_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                // Calls run on the node when it is stopped, and longer than the fixture's
                // own grace after its stdin closes (2 s): Hangar waits for them first.
                let r = call_tool(&c, &url, "g__slow", json!({"ms": 2500})).await;
                if r["result"]["content"][0]["text"].is_string() && r["result"]["isError"] != true {
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                } else {
                    failed.push(format!("client {i}: {r}"));
                }
            }
            failed
        }));
    }
    let calls = || done.load(std::sync::atomic::Ordering::Relaxed);
    wait_for("calls flowing", Duration::from_secs(30), || async {
        (calls() >= 4).then_some(())
    })
    .await;
    let code = cl.terminate(na).await.unwrap();
    assert_eq!(code, Some(0), "node {na} stopped cleanly");
    // Its peers closed their streams of calls when it said it stopped serving them: the
    // Raft listener closed without being cut off.
    let log = cl.member(na).unwrap().log();
    assert!(!log.contains("did not stop in time"), "{log}");
    let after = calls();
    wait_for("calls after the stop", Duration::from_secs(30), || async {
        (calls() >= after + 8).then_some(())
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        let failed = t.await.unwrap();
        assert!(failed.is_empty(), "failed calls: {failed:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_kill_restarts_no_instance_on_a_survivor() {
    let c = client();
    let mut cl = cluster(3, &[]);
    let leader = start_static(
        &mut cl,
        "mcp_servers: {}\n",
        "  node_loss_timeout_ms: 3000\n",
    )
    .await;
    let host = cl.ids().into_iter().find(|n| *n != leader).unwrap();
    // A server placed on a node that is not the leader, added through the API.
    let id = format!("keep{}", std::process::id());
    let tool = format!("{id}__whoami");
    let body = json!({"mcp_server_id": id, "mode": "subprocess",
        "command": [bin("hangar-fixture").display().to_string(), "stdio", "--name", id],
        "placement": {"nodes": [host]}});
    let r = c
        .post(cl.member(leader).unwrap().url("/api/mcp_servers/"))
        .header("Content-Type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let pid = wait_for("served from its host", Duration::from_secs(20), || async {
        whoami(&c, cl.member(leader).unwrap(), &tool).await
    })
    .await as u32;
    assert_eq!(
        parent_of(pid),
        cl.member(host).unwrap().pid(),
        "runs on node {host}"
    );

    // The leader dies: a new one takes over from the replicated placements and the instance
    // on the surviving node keeps running (same process) and serving.
    cl.kill9(leader).unwrap();
    let survivors = cl.alive();
    let new_leader = cl.wait_leader(Duration::from_secs(20)).await.unwrap();
    assert_ne!(new_leader, leader);
    // Longer than node_loss_timeout: a new leader that misjudged the host as lost would have
    // moved the instance by then. Bounded: one call per node per round, 20 000 rounds at most.
    let until = std::time::Instant::now() + Duration::from_secs(5);
    let mut rounds = 0;
    for _ in 0..20_000 {
        if std::time::Instant::now() > until {
            break;
        }
        for n in &survivors {
            let got = whoami(&c, cl.member(*n).unwrap(), &tool).await;
            assert_eq!(got, Some(u64::from(pid)), "call through node {n}");
        }
        rounds += 1;
    }
    assert!(
        std::time::Instant::now() > until,
        "the check covered the node-loss window ({rounds} rounds)"
    );
    assert_eq!(processes_named(&id), vec![pid], "the same single process");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_moves_instances_off_a_node_and_undrain_moves_nothing_back() {
    let c = client();
    let (cl, id, tool) = fixture_cluster("drn", "", "").await;
    let any = &cl.members()[0];
    let pid = wait_for("served", Duration::from_secs(20), || async {
        whoami(&c, any, &tool).await
    })
    .await as u32;
    let host = cl
        .members()
        .iter()
        .find(|m| m.pid() == parent_of(pid))
        .map(Member::id)
        .unwrap();
    let out = ctl_ok(&any.base(), &["cluster", "drain", &host.to_string()]);
    assert!(out.contains("draining"), "{out}");
    let (_, st) = get_json(&c, &any.url("/api/cluster/status")).await;
    assert_eq!(st["draining"], json!([host]), "{st}");
    // The instance moves: a new process on another node serves, the old one is gone.
    let moved = wait_for(
        "the instance moved off the drained node",
        Duration::from_secs(30),
        || async {
            let p = whoami(&c, any, &tool).await? as u32;
            let parent = parent_of(p)?;
            let on = cl.members().iter().find(|m| m.pid() == Some(parent))?.id();
            (p != pid && on != host && processes_named(&id) == vec![p]).then_some(p)
        },
    )
    .await;
    // Undrain: the node may take instances again, but nothing moves back by itself.
    ctl_ok(&any.base(), &["cluster", "undrain", &host.to_string()]);
    let (_, st) = get_json(&c, &any.url("/api/cluster/status")).await;
    assert_eq!(st["draining"], json!([]), "{st}");
    for m in cl.members() {
        assert_eq!(
            whoami(&c, m, &tool).await,
            Some(u64::from(moved)),
            "via node {}",
            m.id()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stateful_third_party_server_shares_its_state_through_every_node() {
    let deps = deps_dir("a_stateful_third_party_server_shares_its_state_through_every_node");
    let memory_js = npm_peer(&deps, "server-memory");
    let c = client();
    let mut cl = cluster(3, &[]);
    // Its knowledge graph lives in the test's directory (one file: one process writes it).
    let store = cl.root().join("memory.jsonl");
    let head = format!(
        "mcp_servers:\n  memory:\n    mode: subprocess\n    command: [{:?}, {:?}]\n    env:\n      MEMORY_FILE_PATH: {:?}\n",
        node_bin(&deps).display().to_string(),
        memory_js.display().to_string(),
        store.display().to_string(),
    );
    start_static(&mut cl, &head, "").await;
    let ms = cl.members();
    let entity = format!("hangar-{}", std::process::id());
    // Written through node 1 ...
    let r = wait_for("create_entities through node 1", Duration::from_secs(30), || async {
        let r = call_tool(
            &c,
            &ms[0].url("/mcp"),
            "memory__create_entities",
            json!({"entities": [{"name": entity, "entityType": "test", "observations": ["one gateway"]}]}),
        )
        .await;
        r["result"]["content"][0]["text"].is_string().then_some(r)
    })
    .await;
    assert_ne!(r["result"]["isError"], true, "{r}");
    // ... read back through nodes 2 and 3: one process, one state.
    for m in &ms[1..] {
        let r = call_tool(&c, &m.url("/mcp"), "memory__read_graph", json!({})).await;
        assert!(
            text_of(&r).contains(&entity),
            "node {} sees the entity: {r}",
            m.id()
        );
    }
    let memory_procs: Vec<u32> = processes_named(&memory_js.display().to_string());
    assert_eq!(
        memory_procs.len(),
        1,
        "one server-memory process machine-wide: {memory_procs:?}"
    );
}

/// Now on `CLOCK_MONOTONIC`, in nanoseconds (the clock the lease shims log).
fn mono_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// Send `sig` to process `pid`.
fn signal(pid: u32, sig: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(pid as i32).unwrap();
    rustix::process::kill_process(pid, sig).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_host_stops_its_instance_before_another_node_starts_it() {
    let c = client();
    // It may run on node 2 or 3; node 1 only forwards (and its calls are what we watch).
    let (cl, id, tool) = fixture_cluster(
        "frozen",
        "    placement: {nodes: [2, 3]}\n",
        "  node_loss_timeout_ms: 3000\n  placement_lease_ms: 2000\n",
    )
    .await;
    let via = cl.member(1).unwrap();
    let pid = wait_for("served through node 1", Duration::from_secs(20), || async {
        whoami(&c, via, &tool).await
    })
    .await as u32;
    let host = cl
        .members()
        .iter()
        .find(|m| m.pid() == parent_of(pid))
        .map(Member::id)
        .expect("the instance runs on a node");
    let host_pid = cl.member(host).unwrap().pid().unwrap();

    // Watch the server's processes machine-wide, every 10 ms, until told to stop (at most
    // 120 s): (CLOCK_MONOTONIC ns, pids).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        let id = id.clone();
        std::thread::spawn(move || {
            let mut samples: Vec<(u64, Vec<u32>)> = Vec::new();
            // Polls until told to stop; the deadline only bounds a test that never says so.
            let _ = hangar_wait::Wait::new("the end of the sampling", Duration::from_secs(120))
                .step(Duration::from_millis(10))
                .poll(|| {
                    samples.push((mono_ns(), processes_named(&id)));
                    stop.load(std::sync::atomic::Ordering::Relaxed)
                        .then_some(())
                });
            samples
        })
    };

    // Freeze the host (as a long pause or a hung machine would): it can stop nothing itself.
    signal(host_pid, rustix::process::Signal::STOP);
    let frozen_at = mono_ns();
    let new_pid = wait_for(
        "another node serves after the host froze",
        Duration::from_secs(40),
        || async {
            let p = whoami(&c, via, &tool).await? as u32;
            (p != pid).then_some(p)
        },
    )
    .await;
    let new_host = parent_of(new_pid);
    assert!(
        new_host.is_some() && new_host != Some(host_pid),
        "the new instance runs on another node"
    );
    // Still frozen, and its server is gone: its lease shim killed it.
    assert!(!pid_alive(pid), "the frozen node's server was killed");
    assert_eq!(processes_named(&id), vec![new_pid]);

    // Thaw it: it learns where the instance went and starts nothing of its own.
    signal(host_pid, rustix::process::Signal::CONT);
    let thawed = cl.member(host).unwrap();
    wait_for(
        "the thawed node forwards to the new host",
        Duration::from_secs(30),
        || async { (whoami(&c, thawed, &tool).await? == u64::from(new_pid)).then_some(()) },
    )
    .await;
    let lapse_line = wait_for(
        "the shim's lease line in the old instance's logs",
        Duration::from_secs(20),
        || async {
            let (_, v) = get_json(&c, &thawed.url(&format!("/api/mcp_servers/{id}/logs"))).await;
            v["logs"]
                .as_array()?
                .iter()
                .filter_map(|l| l["line"].as_str())
                .find(|l| l.contains("placement lease lapsed"))
                .map(str::to_owned)
        },
    )
    .await;
    let lapsed_at: u64 = lapse_line
        .split("CLOCK_MONOTONIC ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no timestamp in {lapse_line}"));
    assert_eq!(
        processes_named(&id),
        vec![new_pid],
        "one process after the thaw"
    );
    for m in cl.members() {
        assert_eq!(
            whoami(&c, m, &tool).await,
            Some(u64::from(new_pid)),
            "via node {}",
            m.id()
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let samples = sampler.join().unwrap();

    // Never two processes at once; the old one was last seen before the new one was first seen,
    // and the shim killed it before that.
    let both: Vec<&(u64, Vec<u32>)> = samples.iter().filter(|(_, p)| p.len() > 1).collect();
    assert!(both.is_empty(), "two live processes at once: {both:?}");
    let last_old = samples
        .iter()
        .filter(|(_, p)| p.contains(&pid))
        .map(|(t, _)| *t)
        .max()
        .unwrap();
    let first_new = samples
        .iter()
        .filter(|(_, p)| p.contains(&new_pid))
        .map(|(t, _)| *t)
        .min()
        .expect("the sampler saw the new process");
    assert!(
        last_old < first_new,
        "the old process outlived the start of the new one"
    );
    assert!(
        frozen_at < lapsed_at && lapsed_at < first_new,
        "the lease lapsed after the freeze ({frozen_at}) and before the new process ({first_new}): {lapse_line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_keeps_failing_on_its_node_is_placed_on_another() {
    let c = client();
    let mut cl = cluster(3, &[]);
    let id = format!("flaky{}", std::process::id());
    let tool = format!("{id}__whoami");
    // The command comes from each node's environment: node 1 cannot run it.
    let fixture = bin("hangar-fixture").display().to_string();
    cl.member_env(1, "FLAKY_BIN", "/nonexistent/hangar-fixture")
        .unwrap();
    cl.member_env(2, "FLAKY_BIN", &fixture).unwrap();
    cl.member_env(3, "FLAKY_BIN", &fixture).unwrap();
    let server = format!(
        "  {id}:\n    mode: subprocess\n    command: [\"${{FLAKY_BIN}}\", stdio, --name, {id}]\n    max_consecutive_failures: 1\n    placement: {{nodes: [1, 2]}}\n"
    );
    start_static(
        &mut cl,
        &format!("mcp_servers:\n{server}"),
        "  node_loss_timeout_ms: 3000\n",
    )
    .await;
    // Nothing runs yet: the leader places it on the least-loaded allowed node, node 1.
    let via = cl.member(3).unwrap();
    wait_for("placed on node 1", Duration::from_secs(20), || async {
        let (n, _) = placements_seen(&c, via).await?.get(&id)?.clone();
        (n == 1).then_some(())
    })
    .await;
    // Calls fail there (the start fails; it goes DEGRADED), until the leader moves it.
    let pid = wait_for(
        "served after the leader moved it off the node it fails on",
        Duration::from_secs(30),
        || async { whoami(&c, via, &tool).await },
    )
    .await as u32;
    assert_eq!(
        parent_of(pid),
        cl.member(2).unwrap().pid(),
        "it runs on node 2 now"
    );
    for m in cl.members() {
        wait_for(
            "every node shows it on node 2",
            Duration::from_secs(10),
            || async {
                let (n, s) = placements_seen(&c, m).await?.get(&id)?.clone();
                (n == 2 && s == "ready").then_some(())
            },
        )
        .await;
    }
    assert!(
        cl.member(1)
            .unwrap()
            .log()
            .contains("mcp_server_start_failed"),
        "it was tried on node 1 first"
    );
    assert_eq!(processes_named(&id), vec![pid]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_run_on_different_nodes_and_a_drain_under_traffic_fails_no_call() {
    let c = client();
    let (cl, id, tool) = fixture_cluster(
        "rep",
        "    auto_start: true\n    placement: {replicas: 2}\n",
        "  node_loss_timeout_ms: 3000\n",
    )
    .await;
    let (m1, m2) = (format!("{id}.1"), format!("{id}.2"));
    // Two instances, on two different nodes, both ready, as every node shows.
    let hosts = |v: &BTreeMap<String, (u64, String)>| -> Option<(u64, u64)> {
        let (a, sa) = v.get(&m1)?;
        let (b, sb) = v.get(&m2)?;
        (a != b && sa == "ready" && sb == "ready").then_some((*a, *b))
    };
    let mut placed = None;
    for m in cl.members() {
        placed = Some(
            wait_for(
                "two ready replicas on two nodes",
                Duration::from_secs(30),
                || async { hosts(&placements_seen(&c, m).await?) },
            )
            .await,
        );
    }
    let (h1, _h2) = placed.unwrap();
    let procs = processes_named(&id);
    assert_eq!(procs.len(), 2, "{procs:?}");
    assert_ne!(parent_of(procs[0]), parent_of(procs[1]), "on two nodes");
    // Calls through any node are balanced over both.
    for m in cl.members() {
        let mut seen = BTreeSet::new();
        for _ in 0..6 {
            seen.insert(whoami(&c, m, &tool).await.expect("a call"));
        }
        assert_eq!(seen.len(), 2, "via node {}: {seen:?}", m.id());
    }

    // Drain the node of the first replica while a client calls through another node.
    let via = cl.members().iter().find(|m| m.id() != h1).unwrap();
    let url = via.url("/mcp");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (c, stop, tool) = (c.clone(), stop.clone(), tool.clone());
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            // Bounded: at most 20 000 calls.
            for _ in 0..20_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let r = call_tool(&c, &url, &tool, json!({})).await;
                if r["result"]["content"][0]["text"].is_string() && r["result"]["isError"] != true {
                    ok += 1;
                } else {
                    failed.push(r.to_string());
                }
            }
            (ok, failed)
        })
    };
    let base = cl.members()[0].base();
    ctl_ok(&base, &["cluster", "drain", &h1.to_string()]);
    for m in cl.members() {
        wait_for(
            "both replicas ready off the drained node",
            Duration::from_secs(40),
            || async {
                let (a, b) = hosts(&placements_seen(&c, m).await?)?;
                (a != h1 && b != h1).then_some(())
            },
        )
        .await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = traffic.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} calls failed: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(3)]
    );
    eprintln!("replicas drain: {ok} calls, none failed");
    assert!(ok > 20, "traffic ran ({ok} calls)");
    assert_eq!(processes_named(&id).len(), 2, "still two replicas");
    ctl_ok(&base, &["cluster", "undrain", &h1.to_string()]);
}

/// A fresh API key for a test (`mcp_` + 64 hex characters).
fn test_key(salt: u64) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "mcp_{:032x}{:016x}{:016x}",
        t,
        u64::from(std::process::id()),
        salt
    )
}

/// Status of a GET through `m` with an optional API key, with the answer's
/// `WWW-Authenticate` and body.
async fn get_with_key(c: &reqwest::Client, url: &str, key: Option<&str>) -> (u16, String, Value) {
    let mut rb = c.get(url);
    if let Some(k) = key {
        rb = rb.header("X-API-Key", k);
    }
    status_www_body(rb).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_and_roles_are_enforced_on_every_node_once_acknowledged() {
    let c = client();
    let admin = test_key(1);
    let mut cl = cluster(3, &[])
        .env("HANGAR_BOOTSTRAP_KEY", &admin)
        .api_key(&admin)
        .unwrap();
    let id = format!("locked{}", std::process::id());
    let head = format!(
        "auth:\n  enabled: true\n  api_key:\n    bootstrap_key: ${{HANGAR_BOOTSTRAP_KEY}}\nmcp_servers:\n{}",
        fixture_stdio_yaml(&id, "")
    );
    start_static(&mut cl, &head, "").await;
    let mcp_list = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).to_string();
    for m in cl.members() {
        let url = m.url("/api/mcp_servers/");
        // No key, a bogus key, a key that is not a key: 401 with the flat body and the header.
        for key in [None, Some("mcp_bogus"), Some("hunter2")] {
            let (status, www, body) = get_with_key(&c, &url, key).await;
            assert_eq!(status, 401, "node {} key {key:?}: {body}", m.id());
            assert_eq!(www, "Bearer, ApiKey");
            assert_eq!(body["error"], "authentication_failed", "{body}");
        }
        let r = post_raw(&c, &m.url("/mcp"), &mcp_list, &[]).await;
        assert_eq!(r.status, 401, "MCP without a key on node {}", m.id());
        // Probes stay open.
        assert_eq!(get_with_key(&c, &m.url("/health/ready"), None).await.0, 200);
        // The bootstrap admin key works everywhere, on REST and MCP.
        wait_for(
            "the bootstrap key works",
            Duration::from_secs(20),
            || async { (get_with_key(&c, &url, Some(&admin)).await.0 == 200).then_some(()) },
        )
        .await;
        let r = post_raw(&c, &m.url("/mcp"), &mcp_list, &[("X-API-Key", &admin)]).await;
        assert_eq!(r.status, 200, "{r:?}");
        let bearer = format!("Bearer {admin}");
        let r = post_raw(&c, &m.url("/mcp"), &mcp_list, &[("Authorization", &bearer)]).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    let (n1, n2, n3) = (
        cl.member(1).unwrap(),
        cl.member(2).unwrap(),
        cl.member(3).unwrap(),
    );
    // A developer key created (and its role assigned) through node 1 works on node 3 as soon
    // as the writes are answered.
    let dev = new_key(&c, n1, &admin, "svc:dev").await;
    assign(&c, n1, &admin, "svc:dev", "developer").await;
    let (status, _, body) = get_with_key(&c, &n3.url("/api/mcp_servers/"), Some(&dev.0)).await;
    assert_eq!(status, 200, "the new key on node 3 right away: {body}");
    // A viewer (through node 2) reads but may not write, manage keys or call tools.
    let viewer = new_key(&c, n2, &admin, "svc:view").await;
    assign(&c, n2, &admin, "svc:view", "viewer").await;
    assert_eq!(
        get_with_key(&c, &n3.url("/api/mcp_servers/"), Some(&viewer.0))
            .await
            .0,
        200
    );
    let r = c
        .post(n3.url("/api/auth/roles/assign"))
        .header("X-API-Key", &viewer.0)
        .header("Content-Type", "application/json")
        .body(json!({"principal_id": "svc:view", "role_name": "admin"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let body: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "AccessDeniedError", "{body}");
    assert_eq!(
        body["error"]["details"]["required_permission"],
        "auth:manage"
    );
    let r = c
        .post(n3.url(&format!("/api/mcp_servers/{id}/stop")))
        .header("X-API-Key", &viewer.0)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403, "a viewer stops nothing");
    let (_, _, me) = get_with_key(&c, &n3.url("/api/system/me"), Some(&viewer.0)).await;
    assert_eq!(me["principal_id"], "svc:view");
    assert_eq!(me["roles"], json!(["viewer"]));
    // Over MCP: the viewer sees no tools and may not call one (the upstream never sees it);
    // the developer may.
    let call = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": format!("{id}__echo"), "arguments": {"message": "hi"}}})
    .to_string();
    let r = post_raw(&c, &n3.url("/mcp"), &call, &[("X-API-Key", &viewer.0)]).await;
    let m = r.messages().pop().unwrap();
    assert_eq!(m["error"]["code"], -32003, "{m}");
    assert!(
        m["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tool:invoke"),
        "{m}"
    );
    let r = post_raw(&c, &n3.url("/mcp"), &mcp_list, &[("X-API-Key", &viewer.0)]).await;
    assert_eq!(r.messages().pop().unwrap()["result"]["tools"], json!([]));
    let r = post_raw(&c, &n3.url("/mcp"), &call, &[("X-API-Key", &dev.0)]).await;
    assert_eq!(text_of(&r.messages().pop().unwrap()), "hi");
    let r = post_raw(&c, &n3.url("/mcp"), &mcp_list, &[("X-API-Key", &dev.0)]).await;
    assert!(
        r.messages().pop().unwrap()["result"]["tools"]
            .as_array()
            .is_some_and(|t| !t.is_empty())
    );
    // A route outside the permission table is denied even to an admin.
    let (status, _, body) = get_with_key(&c, &n1.url("/api/nonexistent"), Some(&admin)).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "AccessDeniedError");
    // Revoked through node 3: refused on every node as soon as the revoke is answered.
    let r = c
        .delete(n3.url(&format!("/api/auth/keys/{}", dev.1)))
        .header("X-API-Key", &admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert!(body.get("not_yet_applied_on").is_none(), "{body}");
    for m in cl.members() {
        let (status, _, body) = get_with_key(&c, &m.url("/api/mcp_servers/"), Some(&dev.0)).await;
        assert_eq!(status, 401, "revoked key on node {}", m.id());
        assert!(
            body["message"].as_str().unwrap().contains("revoked"),
            "{body}"
        );
    }
    let key = dev.0.clone();
    // hangarctl takes its key from HANGAR_API_KEY only.
    let ctl = |key: Option<&str>, args: &[&str]| {
        let mut cmd = Command::new(bin("hangarctl"));
        cmd.arg("--endpoint").arg(n2.base()).args(args);
        cmd.env_remove("HANGAR_API_KEY");
        if let Some(k) = key {
            cmd.env("HANGAR_API_KEY", k);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, _) = ctl(Some(&viewer.0), &["whoami"]);
    assert!(
        ok && out.contains("svc:view") && out.contains("viewer"),
        "{out}"
    );
    let (ok, _, err) = ctl(None, &["keys", "list"]);
    assert!(
        !ok && err.contains("401") && err.contains("No valid credentials"),
        "{err}"
    );
    let (ok, out, err) = ctl(Some(&admin), &["keys", "list"]);
    assert!(ok && out.contains(&viewer.1), "{out}{err}");
    let (ok, out, err) = ctl(
        Some(&admin),
        &[
            "roles",
            "assign",
            "--principal",
            "svc:ops",
            "--role",
            "auditor",
        ],
    );
    assert!(ok, "{out}{err}");
    let (ok, out, _) = ctl(Some(&admin), &["roles", "list"]);
    assert!(
        ok && out.contains("svc:ops") && out.contains("auditor"),
        "{out}"
    );
    // Every change is an audit event (without any secret).
    wait_for(
        "the role change in the event log",
        Duration::from_secs(10),
        || async {
            let (_, _, v) =
                get_with_key(&c, &n1.url("/api/events?since=0&limit=1000"), Some(&admin)).await;
            v["events"]
                .as_array()?
                .iter()
                .any(|e| {
                    e["event_type"] == "RoleAssigned" && e["data"]["principal_id"] == "svc:ops"
                })
                .then_some(())
        },
    )
    .await;
    // An expired key: refused (created with an expiry a second ahead).
    let soon = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        + 1.0;
    let r = c
        .post(n1.url("/api/auth/keys"))
        .header("X-API-Key", &admin)
        .header("Content-Type", "application/json")
        .body(json!({"principal_id": "svc", "name": "short", "expires_at": soon}).to_string())
        .send()
        .await
        .unwrap();
    let short: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    let short = short["raw_key"].as_str().unwrap().to_owned();
    wait_for(
        "the short-lived key expires",
        Duration::from_secs(10),
        || async {
            let (status, _, body) =
                get_with_key(&c, &n3.url("/api/mcp_servers/"), Some(&short)).await;
            (status == 401 && body["message"].as_str()?.contains("expired")).then_some(())
        },
    )
    .await;
    // An address that keeps failing is locked out of that node for a while, even with a
    // valid key (10 failures in 60 s by default); the other nodes still serve it.
    let mut locked = None;
    for i in 0..12 {
        let (status, _, body) =
            get_with_key(&c, &n1.url("/api/mcp_servers/"), Some("mcp_wrong")).await;
        assert_eq!(status, 401);
        if body["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("Too many auth attempts"))
        {
            locked = Some(i);
            break;
        }
    }
    assert_eq!(locked, Some(10), "locked after the 10th failure");
    let (status, _, body) = get_with_key(&c, &n1.url("/api/mcp_servers/"), Some(&admin)).await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["details"]["retry_after"]
            .as_u64()
            .is_some_and(|s| s > 200),
        "{body}"
    );
    assert_eq!(
        get_with_key(&c, &n2.url("/api/mcp_servers/"), Some(&admin))
            .await
            .0,
        200
    );
    // No raw key anywhere on disk: data directories and logs.
    for n in cl.ids() {
        cl.terminate(n).await.unwrap();
    }
    for secret in [&admin, &key, &viewer.0, &short] {
        let hits = grep_dir(cl.root(), secret);
        assert!(hits.is_empty(), "a raw key is written in {hits:?}");
    }
}

/// A new API key for `principal`, created through `m` with `admin`: (raw key, key id).
async fn new_key(
    c: &reqwest::Client,
    m: &Member,
    admin: &str,
    principal: &str,
) -> (String, String) {
    let r = c
        .post(m.url("/api/auth/keys"))
        .header("X-API-Key", admin)
        .header("Content-Type", "application/json")
        .body(json!({"principal_id": principal, "name": principal}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201, "create a key");
    let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    (
        v["raw_key"].as_str().expect("the raw key, once").to_owned(),
        v["key_id"].as_str().unwrap().to_owned(),
    )
}

/// Give `principal` `role` through `m`.
async fn assign(c: &reqwest::Client, m: &Member, admin: &str, principal: &str, role: &str) {
    let r = c
        .post(m.url("/api/auth/roles/assign"))
        .header("X-API-Key", admin)
        .header("Content-Type", "application/json")
        .body(json!({"principal_id": principal, "role_name": role}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "assign {role}");
}

/// Files under `dir` (recursively) whose bytes contain `needle`.
fn grep_dir(dir: &std::path::Path, needle: &str) -> Vec<std::path::PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    // Bounded: at most 100 000 entries.
    let mut budget = 100_000;
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            budget -= 1;
            if budget == 0 {
                return hits;
            }
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if std::fs::read(&p)
                .is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes()))
            {
                hits.push(p);
            }
        }
    }
    hits
}

/// The tool names `tools/list` shows through `url`.
async fn listed_tools(c: &reqwest::Client, url: &str) -> Vec<String> {
    rpc(c, url, "tools/list", json!({})).await.response()["result"]["tools"]
        .as_array()
        .map(|t| {
            t.iter()
                .filter_map(|t| t["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_written_through_one_node_changes_the_tool_lists_of_the_others() {
    let c = client();
    let mut cl = cluster(3, &[]);
    let id = format!("pol{}", std::process::id());
    let head = format!("mcp_servers:\n{}", fixture_stdio_yaml(&id, ""));
    start_static(&mut cl, &head, "").await;
    let (n1, n2, n3) = (
        cl.member(1).unwrap(),
        cl.member(2).unwrap(),
        cl.member(3).unwrap(),
    );
    let echo = format!("{id}__echo");
    wait_for(
        "the tools listed on node 3",
        Duration::from_secs(20),
        || async {
            listed_tools(&c, &n3.url("/mcp"))
                .await
                .contains(&echo)
                .then_some(())
        },
    )
    .await;
    let mut listener = Listener::open(&c, &n3.url("/mcp")).await;
    let r = c
        .put(n1.url(&format!("/api/auth/policies/server/{id}")))
        .header("Content-Type", "application/json")
        .body(json!({"deny": ["echo"]}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());
    // Node 3's listeners hear of it, and its list no longer shows the tool.
    listener
        .expect("notifications/tools/list_changed", Duration::from_secs(10))
        .await;
    assert!(!listed_tools(&c, &n3.url("/mcp")).await.contains(&echo));
    let r = c
        .delete(n2.url(&format!("/api/auth/policies/server/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    listener
        .expect("notifications/tools/list_changed", Duration::from_secs(10))
        .await;
    assert!(listed_tools(&c, &n3.url("/mcp")).await.contains(&echo));
}
