//! Real `hangar` nodes behind the chaos proxy: a leader is elected, writes replicate through
//! the proxied links, the cluster survives an isolated leader, a paused follower and a killed
//! node, and no upstream process outlives the cluster.
//!
//! The binaries are found by `hangar_chaos::nodes::find_binary` (`HANGAR_BIN`,
//! `HANGAR_FIXTURE_BIN`, or a target directory); a missing one fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use hangar_chaos::faults::{Fault, FaultKind, Injector, PartitionKind, Target};
use hangar_chaos::nodes::{Nodes, SERVER_ID, find_binary, marked_processes, wait_until};
use hangar_chaos::proxy::Rule;
use serde_json::{Value, json};
use tokio::time::Instant;

const LIMIT: Duration = Duration::from_secs(30);

/// Start 3 nodes; fails (never skips) when a binary is missing.
async fn three_nodes(seed: u64) -> Nodes {
    let hangar = find_binary("hangar").expect("the hangar binary");
    let fixture = find_binary("hangar-fixture").expect("the hangar-fixture binary");
    Nodes::start(3, &hangar, &fixture, seed)
        .await
        .unwrap_or_else(|e| panic!("start 3 nodes: {e:#}"))
}

/// `PUT /api/rate_limits/{id}` through node `via`; panics unless acknowledged.
async fn put_limit(nodes: &Nodes, via: u64, id: &str) {
    let url = format!("{}/api/rate_limits/{id}", nodes.api_base(via).unwrap());
    let r = reqwest::Client::new()
        .put(&url)
        .header("Content-Type", "application/json")
        .body(json!({"rps": 5, "match": {"tool": "chaos-none"}}).to_string())
        .timeout(Duration::from_secs(15))
        .send()
        .await
        .unwrap_or_else(|e| panic!("PUT {url}: {e}"));
    let status = r.status();
    let body = r.text().await.unwrap_or_default();
    assert!(status.is_success(), "PUT {url}: {status} {body}");
}

/// The rate-limit ids node `id` lists in a linearizable read (`None`: no 200 answer).
async fn limits(nodes: &Nodes, id: u64, limit: Duration) -> Option<Vec<String>> {
    let (code, v) = nodes
        .get(id, "/api/rate_limits?consistency=linearizable", limit)
        .await
        .ok()?;
    if code != 200 {
        return None;
    }
    Some(
        v["rate_limits"]
            .as_array()?
            .iter()
            .filter_map(|l| l["id"].as_str().map(str::to_owned))
            .collect(),
    )
}

/// Every node's linearizable read lists `ids` at once (no polling: the writes were
/// acknowledged before).
async fn all_see(nodes: &Nodes, ids: &[&str]) {
    for n in nodes.ids() {
        let seen = limits(nodes, n, Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("node {n}: no linearizable read"));
        for id in ids {
            assert!(
                seen.iter().any(|s| s == id),
                "node {n} does not list {id} in a linearizable read after it was acknowledged: {seen:?}"
            );
        }
    }
}

/// Call the fixture's `echo` through node `via`; its text when the call succeeded.
async fn echo(nodes: &Nodes, via: u64, message: &str) -> Option<String> {
    let url = format!("{}/mcp", nodes.api_base(via).ok()?);
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": format!("{SERVER_ID}__echo"), "arguments": {"message": message}}});
    let r = reqwest::Client::new()
        .post(&url)
        .header("Content-Type", "application/json")
        .header("Accept", "application/json, text/event-stream")
        .body(body.to_string())
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .ok()?;
    let text = r.text().await.ok()?;
    // A JSON answer, or the last `data:` line of an SSE stream.
    let msg: Value = serde_json::from_str(&text).ok().or_else(|| {
        text.lines()
            .rev()
            .filter_map(|l| l.strip_prefix("data:"))
            .find_map(|d| serde_json::from_str(d.trim()).ok())
    })?;
    msg["result"]["content"][0]["text"]
        .as_str()
        .map(str::to_owned)
}

fn phase(name: &str, t: Instant) {
    eprintln!("[{:>6.2}s] {name}", t.elapsed().as_secs_f64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxied_cluster_survives_isolation_pause_and_kill() {
    let t = Instant::now();
    let mut nodes = three_nodes(1).await;
    let marker = nodes.marker().to_owned();
    let proxy = nodes.proxy().clone();
    phase("3 nodes ready", t);

    // A leader, reached through the proxy from the right source IPs.
    let leader = nodes.wait_leader(LIMIT).await.unwrap();
    assert_eq!(nodes.leader().await, Some(leader));
    for f in nodes.ids().into_iter().filter(|&n| n != leader) {
        let s = proxy.stats(leader, f).unwrap();
        assert!(
            s.connections >= 1 && s.bytes_sent > 0,
            "{leader} → {f}: {s:?}"
        );
    }
    assert!(
        proxy.unknown_sources().is_empty(),
        "{:?}",
        proxy.unknown_sources()
    );
    phase(&format!("leader {leader}"), t);

    // A write through a follower is forwarded (through the proxy) and replicated.
    let follower = nodes.ids().into_iter().find(|&n| n != leader).unwrap();
    put_limit(&nodes, follower, "chaos-1").await;
    all_see(&nodes, &["chaos-1"]).await;
    phase("a write through a follower replicated", t);

    // Isolate the leader: the other two elect one of them.
    proxy.isolate(leader).unwrap();
    let isolated = Instant::now();
    let new = wait_until("a new leader among the other two", LIMIT, async || {
        Ok(nodes.leader().await.filter(|&l| l != leader))
    })
    .await
    .unwrap();
    phase(
        &format!(
            "leader {leader} isolated; node {new} elected in {:?}",
            isolated.elapsed()
        ),
        t,
    );
    let other = nodes
        .ids()
        .into_iter()
        .find(|&n| n != leader && n != new)
        .unwrap();
    put_limit(&nodes, other, "chaos-2").await;
    // The isolated node must not serve a stale linearizable read.
    if let Some(seen) = limits(&nodes, leader, Duration::from_secs(3)).await {
        assert!(
            seen.iter().any(|s| s == "chaos-2"),
            "isolated node {leader} served a stale linearizable read: {seen:?}"
        );
    }
    assert!(proxy.stats(leader, new).unwrap().cut + proxy.stats(new, leader).unwrap().cut > 0);
    proxy.heal();
    nodes.wait_all_ready(LIMIT).await.unwrap();
    all_see(&nodes, &["chaos-1", "chaos-2"]).await;
    phase("healed; all caught up", t);

    // Pause a follower for longer than the election timeout; the others go on.
    let leader = nodes.wait_leader(LIMIT).await.unwrap();
    let paused = nodes.ids().into_iter().find(|&n| n != leader).unwrap();
    nodes.pause(paused).unwrap();
    tokio::time::sleep(nodes.election_timeout() * 3).await;
    put_limit(&nodes, leader, "chaos-3").await;
    nodes.resume(paused).unwrap();
    nodes.wait_all_ready(LIMIT).await.unwrap();
    all_see(&nodes, &["chaos-3"]).await;
    phase(&format!("node {paused} paused and resumed; caught up"), t);

    // Start the upstream, kill its host: its process dies with the node, the instance moves.
    let via = nodes.wait_leader(LIMIT).await.unwrap();
    let text = wait_until("the fixture answers", LIMIT, async || {
        Ok(echo(&nodes, via, "hi").await)
    })
    .await
    .unwrap();
    assert_eq!(text, "hi");
    let host = nodes
        .host_of(SERVER_ID, None)
        .await
        .unwrap()
        .expect("placed");
    for p in marked_processes(&marker) {
        eprintln!(
            "  process {} (parent {}): {}",
            p.pid,
            p.ppid,
            p.argv.join(" ")
        );
    }
    let hosts = nodes.fixture_hosts();
    assert!(
        hosts.iter().any(|&(_, h)| h == Some(host)),
        "the fixture runs under node {host}: {hosts:?}"
    );
    nodes.kill(host).unwrap();
    let killed = Instant::now();
    let orphans = wait_until(
        "the killed node's upstream dies with it",
        Duration::from_secs(5),
        async || Ok(nodes.orphans().is_empty().then_some(())),
    )
    .await;
    assert!(
        orphans.is_ok(),
        "fixture processes outlived node {host}: {:?}",
        nodes.orphans()
    );
    let survivor = nodes.responsive()[0];
    let text = wait_until("the instance answers again elsewhere", LIMIT, async || {
        Ok(echo(&nodes, survivor, "again").await)
    })
    .await
    .unwrap();
    assert_eq!(text, "again");
    phase(
        &format!(
            "host {host} killed; {SERVER_ID} answers again after {:?}",
            killed.elapsed()
        ),
        t,
    );
    nodes.restart(host).await.unwrap();
    nodes.wait_all_ready(LIMIT).await.unwrap();
    all_see(&nodes, &["chaos-1", "chaos-2", "chaos-3"]).await;
    phase(&format!("node {host} restarted; caught up"), t);

    // Nothing of this run outlives it.
    drop(nodes);
    let left = marked_processes(&marker);
    assert!(left.is_empty(), "processes left after drop: {left:?}");
    phase("dropped; no process left", t);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_injector_applies_and_heals_each_kind_of_fault() {
    let t = Instant::now();
    let mut nodes = three_nodes(2).await;
    let marker = nodes.marker().to_owned();
    let proxy = nodes.proxy().clone();
    let mut inj = Injector::new(2, t);
    let short = Duration::from_millis(1200);
    phase("3 nodes ready", t);

    // An isolated leader is replaced while the partition lasts.
    let leader = nodes.wait_leader(LIMIT).await.unwrap();
    let fault = Fault::Partition {
        kind: PartitionKind::Isolate(Target::Leader),
        duration: short,
    };
    let injected = inj.inject(&mut nodes, &fault).await.unwrap();
    assert_eq!(injected.nodes, vec![leader]);
    let others: Vec<u64> = nodes.ids().into_iter().filter(|&n| n != leader).collect();
    assert!(
        others
            .iter()
            .all(|&o| proxy.rule(leader, o) == Some(Rule::Drop))
    );
    wait_until("a new leader", LIMIT, async || {
        Ok(nodes.leader().await.filter(|&l| l != leader))
    })
    .await
    .unwrap();
    tokio::time::sleep_until(injected.until).await;
    let rec = inj.heal(&mut nodes, injected).await.unwrap();
    assert!(
        others
            .iter()
            .all(|&o| proxy.rule(o, leader) == Some(Rule::Pass))
    );
    assert!(rec.start_ns <= rec.heal_ns && rec.heal_ns <= rec.end_ns);
    assert!(rec.heal_ns - rec.start_ns >= short.as_nanos() as u64);
    nodes.wait_all_ready(LIMIT).await.unwrap();
    phase("isolate the leader", t);

    // The others, one by one, each healed before the next.
    let faults = [
        Fault::Pause {
            target: Target::Follower,
            duration: nodes.election_timeout() * 2,
        },
        Fault::Partition {
            kind: PartitionKind::Blackhole(Target::Random),
            duration: short,
        },
        Fault::Partition {
            kind: PartitionKind::MajorityMinority,
            duration: short,
        },
        Fault::Delay {
            scope: hangar_chaos::faults::DelayScope::All,
            by: Duration::from_millis(30),
            duration: short,
        },
        Fault::Kill {
            target: Target::Follower,
            down_for: short,
        },
        Fault::Restart {
            node: Target::Follower,
        },
    ];
    for f in &faults {
        let rec = inj
            .run(&mut nodes, f)
            .await
            .unwrap_or_else(|e| panic!("{f}: {e:#}"));
        assert_eq!(rec.kind, f.kind());
        assert_eq!(
            rec.nodes.len(),
            if f.kind() == FaultKind::Delay { 3 } else { 1 },
            "{rec:?}"
        );
        assert!(
            proxy.report().iter().all(|l| l.rule == Rule::Pass),
            "{rec:?}"
        );
        assert!(nodes.paused().is_empty());
        nodes
            .wait_all_ready(LIMIT)
            .await
            .unwrap_or_else(|e| panic!("after {f}: {e:#}"));
        phase(&rec.detail, t);
    }

    // Kill the upstream: Hangar starts it again on the next call.
    let via = nodes.wait_leader(LIMIT).await.unwrap();
    wait_until("the fixture answers", LIMIT, async || {
        Ok(echo(&nodes, via, "1").await)
    })
    .await
    .unwrap();
    let before = nodes.fixture_processes();
    let rec = inj.run(&mut nodes, &Fault::KillUpstream).await.unwrap();
    let pid = rec.pid.unwrap();
    assert!(before.iter().any(|&(p, _)| p == pid), "{before:?} {rec:?}");
    wait_until("the fixture answers again", LIMIT, async || {
        Ok(echo(&nodes, via, "2").await)
    })
    .await
    .unwrap();
    assert!(nodes.fixture_processes().iter().all(|&(p, _)| p != pid));
    phase(&rec.detail, t);

    let log = inj.log_jsonl().unwrap();
    assert_eq!(log.lines().count(), 8, "{log}");
    assert!(inj.log().iter().all(|r| r.error.is_none()), "{log}");
    eprintln!("{log}");
    drop(nodes);
    assert!(marked_processes(&marker).is_empty());
}
