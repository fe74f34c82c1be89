//! Real `hangar` nodes behind the chaos proxy: a leader is elected, writes replicate through
//! the proxied links, the cluster survives an isolated leader, a paused follower and a killed
//! node, and no upstream process outlives the cluster. A hung upstream (SIGSTOP) fails its
//! calls and recovers without a second copy; a full disk (root: a small tmpfs per node) stops
//! one node's writes while the majority goes on, and nothing is lost once it frees.
//!
//! The binaries are found by `hangar_chaos::nodes::find_binary` (`HANGAR_BIN`,
//! `HANGAR_FIXTURE_BIN`, or a target directory); a missing one fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use hangar_chaos::faults::{Fault, FaultKind, Injector, PartitionKind, Target};
use hangar_chaos::nodes::{
    NodeCondition, Nodes, Options, SERVER_ID, find_binary, is_mount_point, is_root,
    marked_processes, process_state, wait_until,
};
use hangar_chaos::proxy::Rule;
use hangar_chaos::run::{HANG_REQUEST_TIMEOUT, SMALL_DISK_MIB};
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

/// Start 3 nodes with the default options changed by `change`; fails when a binary is
/// missing.
async fn three_nodes_with(seed: u64, change: impl FnOnce(&mut Options)) -> Nodes {
    let hangar = find_binary("hangar").expect("the hangar binary");
    let fixture = find_binary("hangar-fixture").expect("the hangar-fixture binary");
    let mut opts = Options::new(3, &hangar, &fixture, seed);
    change(&mut opts);
    Nodes::start_with(opts)
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
    echo_within(nodes, via, message, Duration::from_secs(10)).await
}

/// [`echo`], the client giving up after `limit`.
async fn echo_within(nodes: &Nodes, via: u64, message: &str, limit: Duration) -> Option<String> {
    let url = format!("{}/mcp", nodes.api_base(via).ok()?);
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": format!("{SERVER_ID}__echo"), "arguments": {"message": message}}});
    let r = reqwest::Client::new()
        .post(&url)
        .header("Content-Type", "application/json")
        .header("Accept", "application/json, text/event-stream")
        .body(body.to_string())
        .timeout(limit)
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
    let paused_at = Instant::now();
    put_limit(&nodes, leader, "chaos-3").await;
    // The write was acknowledged without the paused node: the leader reports it behind the
    // commit index; and it stays out for longer than an election timeout.
    wait_until(
        "the paused follower is out past an election timeout",
        LIMIT,
        async || {
            let (_, st) = nodes.get(leader, "/api/cluster/status", LIMIT).await?;
            let committed = st["committed_index"].as_u64().unwrap_or(0);
            // The leader's view of the paused member (`matched_index` null: nothing matched).
            let Some(member) = st["members"]
                .as_array()
                .and_then(|m| m.iter().find(|m| m["node_id"] == paused))
            else {
                return Ok(None);
            };
            let matched = member["matched_index"].as_u64().unwrap_or(0);
            Ok(
                (matched < committed && paused_at.elapsed() > nodes.election_timeout() * 3)
                    .then_some(()),
            )
        },
    )
    .await
    .unwrap();
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

/// The fixture processes (pid, `/proc` state) seen at a time since the start of a test.
type Sample = (Duration, Vec<(u32, char)>);

/// This run's fixture processes, sampled every 50 ms on a thread of its own: every change of
/// the set (pid and `/proc` state), with its time.
struct ProcessSampler {
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<Vec<Sample>>,
}

impl ProcessSampler {
    fn start(marker: &str, fixture: &Path, t: Instant) -> ProcessSampler {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let (marker, fixture) = (marker.to_owned(), fixture.to_owned());
        let t = t.into_std();
        let thread = std::thread::spawn(move || {
            let mut changes: Vec<Sample> = Vec::new();
            // A sample every 50 ms until the sender says stop (or is dropped).
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(Duration::from_millis(50))
            {
                let now: Vec<(u32, char)> = marked_processes(&marker)
                    .into_iter()
                    .filter(|p| p.argv.first().map(PathBuf::from) == Some(fixture.clone()))
                    .filter_map(|p| Some((p.pid, process_state(p.pid)?)))
                    .filter(|&(_, state)| state != 'Z')
                    .collect();
                if changes.last().is_none_or(|(_, last)| *last != now) {
                    changes.push((t.elapsed(), now));
                }
            }
            changes
        });
        ProcessSampler { stop, thread }
    }

    fn finish(self) -> Vec<Sample> {
        let _ = self.stop.send(());
        self.thread.join().expect("the process sampler")
    }
}

fn timeline(changes: &[Sample]) -> String {
    changes
        .iter()
        .map(|(at, ps)| format!("  [{:>6.2}s] {ps:?}", at.as_secs_f64()))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_upstream_fails_its_calls_and_recovers_without_a_second_copy() {
    let t = Instant::now();
    let mut nodes = three_nodes_with(3, |o| {
        o.upstream_request_timeout = Some(HANG_REQUEST_TIMEOUT);
    })
    .await;
    let marker = nodes.marker().to_owned();
    let sampler = ProcessSampler::start(&marker, &nodes.options().fixture, t);
    phase("3 nodes ready (call timeout 1.5 s)", t);

    let leader = nodes.wait_leader(LIMIT).await.unwrap();
    wait_until("the fixture answers", LIMIT, async || {
        Ok(echo(&nodes, leader, "warm").await)
    })
    .await
    .unwrap();
    let host = nodes
        .host_of(SERVER_ID, None)
        .await
        .unwrap()
        .expect("placed");
    let other = nodes.ids().into_iter().find(|&n| n != host).unwrap();
    let before = nodes.fixture_processes();
    assert_eq!(before.len(), 1, "{before:?}");
    phase(&format!("{SERVER_ID} runs on node {host}: {before:?}"), t);

    let mut inj = Injector::new(3, t);
    let hang = Duration::from_secs(10);
    let injected = inj
        .inject(&mut nodes, &Fault::HangUpstream { duration: hang })
        .await
        .unwrap();
    let pid = injected.pid.unwrap();
    assert_eq!(pid, before[0].0, "the instance is what stops, not its shim");
    assert_eq!(injected.nodes, vec![host]);
    assert_eq!(process_state(pid), Some('T'), "{}", injected.detail);
    assert_eq!(nodes.paused_upstreams(), vec![pid]);
    phase(&injected.detail, t);

    // While it is stopped: calls through its host and through another node fail (or time
    // out), and the host stays responsive: its writes are acknowledged promptly and it is
    // ready.
    let mut calls = Vec::new();
    let mut i = 0;
    while Instant::now() + Duration::from_millis(2500) < injected.until {
        let via = if i % 2 == 0 { host } else { other };
        let began = Instant::now();
        let answer = echo_within(&nodes, via, "during", Duration::from_secs(5)).await;
        calls.push((
            began.duration_since(t),
            via,
            began.elapsed(),
            answer.is_some(),
        ));
        let w = Instant::now();
        put_limit(&nodes, host, &format!("chaos-hang-{i}")).await;
        assert!(
            w.elapsed() < Duration::from_secs(3),
            "a write through node {host}, the hung upstream's host, took {:?}",
            w.elapsed()
        );
        let (code, body) = nodes
            .get(host, "/health/ready", Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(
            code, 200,
            "node {host} not ready while its upstream hangs: {body}"
        );
        i += 1;
    }
    // The calls, consecutive ones with the same outcome on one line.
    let mut k = 0;
    while k < calls.len() {
        let ok = calls[k].3;
        let run = calls[k..].iter().take_while(|c| c.3 == ok).count();
        let (first, last) = (&calls[k], &calls[k + run - 1]);
        let slowest = calls[k..k + run]
            .iter()
            .map(|c| c.2)
            .max()
            .unwrap_or_default();
        eprintln!(
            "  {run} call(s) {} from {:.2}s to {:.2}s (slowest {slowest:.2?})",
            if ok { "ok" } else { "failed" },
            first.0.as_secs_f64(),
            (last.0 + last.2).as_secs_f64()
        );
        k += run;
    }
    assert!(
        calls.iter().any(|c| !c.3),
        "no call failed while the upstream was stopped: {calls:?}"
    );
    phase(&format!("{} calls during the hang", calls.len()), t);

    tokio::time::sleep_until(injected.until).await;
    let rec = inj.heal(&mut nodes, injected).await.unwrap();
    let outcome = rec.outcome.clone().unwrap();
    phase(&format!("healed: {outcome}"), t);
    assert!(nodes.paused_upstreams().is_empty());

    // After the heal: calls succeed through every node, and nothing is left stopped.
    for n in nodes.ids() {
        let text = wait_until("the fixture answers after the heal", LIMIT, async || {
            Ok(echo(&nodes, n, "after").await)
        })
        .await
        .unwrap_or_else(|e| panic!("via node {n}: {e:#}"));
        assert_eq!(text, "after");
    }
    let stopped = nodes.stopped_fixtures();
    assert!(
        stopped.is_empty(),
        "stopped fixture processes left: {stopped:?}"
    );
    nodes.wait_all_ready(LIMIT).await.unwrap();
    phase("calls answered through every node", t);

    // The single-instance invariant, stopped processes included.
    let changes = sampler.finish();
    eprintln!(
        "fixture processes (pid, state) over time:\n{}",
        timeline(&changes)
    );
    let doubled: Vec<&Sample> = changes.iter().filter(|(_, ps)| ps.len() > 1).collect();
    assert!(
        doubled.is_empty(),
        "single instance violated: Hangar started another copy of {SERVER_ID} while the hung \
         process {pid} (SIGSTOPped) still existed; it must kill the hung process before starting \
         a replacement. Samples with more than one process:\n{}\nheal: {outcome}",
        timeline(&doubled.into_iter().cloned().collect::<Vec<_>>())
    );

    drop(nodes);
    let left = marked_processes(&marker);
    assert!(left.is_empty(), "processes left after drop: {left:?}");
    phase("dropped; no process left", t);
}

/// `PUT /api/rate_limits/{id}` with `rps` through node `via`, retried until acknowledged
/// (the same value: idempotent) within `limit`; how long it took.
async fn put_rps(nodes: &Nodes, via: u64, id: &str, rps: u64, limit: Duration) -> Duration {
    let url = format!("{}/api/rate_limits/{id}", nodes.api_base(via).unwrap());
    let began = Instant::now();
    let mut last = String::new();
    let acknowledged = wait_until(
        &format!("PUT {url} (rps {rps}) acknowledged"),
        limit,
        async || {
            let r = reqwest::Client::new()
                .put(&url)
                .header("Content-Type", "application/json")
                .body(json!({"rps": rps, "match": {"tool": "chaos-none"}}).to_string())
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            match r {
                Ok(r) if r.status().is_success() => return Ok(Some(began.elapsed())),
                Ok(r) => last = format!("{} {}", r.status(), r.text().await.unwrap_or_default()),
                Err(e) => last = e.to_string(),
            }
            Ok(None)
        },
    )
    .await;
    acknowledged.unwrap_or_else(|e| panic!("{e}: {last}"))
}

/// The `rps` of rate limit `id` in a linearizable read on node `n` (`None`: absent).
async fn read_rps(nodes: &Nodes, n: u64, id: &str) -> Option<u64> {
    let (code, v) = nodes
        .get(
            n,
            "/api/rate_limits?consistency=linearizable",
            Duration::from_secs(10),
        )
        .await
        .unwrap_or_else(|e| panic!("node {n}: {e:#}"));
    assert_eq!(code, 200, "node {n}: no linearizable read: {v}");
    v["rate_limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["id"] == id)
        .and_then(|l| l["rps"].as_f64())
        .map(|r| r as u64)
}

/// The small-disk tests mount a tmpfs on every node's data directory.
fn assert_root_for_tmpfs() {
    assert!(
        is_root(),
        "this test mounts a tmpfs on every node's data directory and needs root (uid 0); run it \
         as root (CI does)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_one_node_and_the_majority_goes_on() {
    assert_root_for_tmpfs();
    let t = Instant::now();
    let mut nodes = three_nodes_with(4, |o| o.small_disks = Some(SMALL_DISK_MIB)).await;
    let marker = nodes.marker().to_owned();
    let mounts: Vec<PathBuf> = nodes.small_disks().values().cloned().collect();
    assert_eq!(mounts.len(), 3);
    assert!(mounts.iter().all(|m| is_mount_point(m)), "{mounts:?}");
    phase(
        &format!("3 nodes ready on {SMALL_DISK_MIB} MiB tmpfs each"),
        t,
    );

    let mut inj = Injector::new(4, t);
    let mut rps = 0;
    // A follower's disk fills, then the leader's.
    for target in [Target::Follower, Target::Leader] {
        let leader = nodes.wait_leader(LIMIT).await.unwrap();
        rps += 1;
        put_rps(&nodes, leader, "chaos-disk", rps, LIMIT).await;
        let fault = Fault::DiskFull {
            target: target.clone(),
            duration: Duration::from_secs(8),
        };
        let injected = inj.inject(&mut nodes, &fault).await.unwrap();
        let victim = injected.nodes[0];
        for (path, len, alloc) in nodes.disk_usage(victim) {
            eprintln!("  {}: length {len}, allocated {alloc}", path.display());
        }
        assert!(
            injected.detail.contains("ENOSPC"),
            "the disk did not fill: {}",
            injected.detail
        );
        phase(&injected.detail, t);

        // The majority keeps acknowledging writes through another node; the victim's
        // writes fail (it logs them, its Raft stops) or it exits.
        let via = nodes.ids().into_iter().find(|&n| n != victim).unwrap();
        let mut seen: Option<NodeCondition> = None;
        let mut writes = 0;
        // One write every 100 ms (a paced workload) while the disk is full.
        let mut pace = tokio::time::interval(Duration::from_millis(100));
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while Instant::now() < injected.until {
            pace.tick().await;
            rps += 1;
            let took = put_rps(&nodes, via, "chaos-disk", rps, LIMIT).await;
            writes += 1;
            let c = nodes.condition(victim).await;
            if seen.is_none() && (c.refused_writes() || c.exited.is_some()) {
                phase(&format!("node {victim}: {c}"), t);
                seen = Some(c);
            }
            if took > Duration::from_secs(1) {
                phase(&format!("a write through node {via} took {took:?}"), t);
            }
        }
        let last = nodes.condition(victim).await;
        phase(
            &format!("{writes} writes acknowledged through node {via}; node {victim}: {last}"),
            t,
        );
        assert!(
            seen.is_some(),
            "node {victim} ({target:?}) neither refused writes nor exited with its disk full for \
             {:?} while the others acknowledged {writes} writes: {last}",
            fault.duration()
        );

        let rec = inj.heal(&mut nodes, injected).await.unwrap();
        let outcome = rec.outcome.clone().unwrap();
        phase(&format!("healed: {outcome}"), t);
        assert!(nodes.full_disks().is_empty());

        // After the heal: every node ready and caught up, and the last acknowledged value
        // in a linearizable read on every node.
        if let Err(e) = nodes.wait_all_ready(Duration::from_secs(60)).await {
            let c = nodes.condition(victim).await;
            panic!(
                "after its disk was freed node {victim} did not recover: {e:#}\nnode {victim}: \
                 {c}\nheal: {outcome}\n{}",
                nodes.logs_tail(15)
            );
        }
        for n in nodes.ids() {
            assert_eq!(
                read_rps(&nodes, n, "chaos-disk").await,
                Some(rps),
                "node {n} lost the last acknowledged write (rps {rps})"
            );
        }
        phase(
            &format!("node {victim} recovered; every node reads rps {rps}"),
            t,
        );
    }

    drop(nodes);
    let left = marked_processes(&marker);
    assert!(left.is_empty(), "processes left after drop: {left:?}");
    let mounted: Vec<&PathBuf> = mounts.iter().filter(|m| is_mount_point(m)).collect();
    assert!(mounted.is_empty(), "still mounted after drop: {mounted:?}");
    let proc_mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        !proc_mounts.contains(&marker),
        "a tmpfs of this run is still mounted:\n{proc_mounts}"
    );
    phase("dropped; no process, no mount left", t);
}

/// The `size=` option of the tmpfs mounted on `dir`, in bytes (from `/proc/self/mounts`).
fn tmpfs_size(dir: &Path) -> Option<u64> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    let line = mounts
        .lines()
        .find(|l| l.split_whitespace().nth(1) == dir.to_str())?;
    let opts = line.split_whitespace().nth(3)?;
    let size = opts.split(',').find_map(|o| o.strip_prefix("size="))?;
    let (n, unit) = size.split_at(size.trim_end_matches(char::is_alphabetic).len());
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "k" => n * 1024,
        "m" => n * 1024 * 1024,
        "g" => n * 1024 * 1024 * 1024,
        _ => n,
    })
}

/// Node `id`'s write-ahead logs: `(length, allocated)` each.
fn wal_of(nodes: &Nodes, id: u64) -> Vec<(u64, u64)> {
    nodes
        .disk_usage(id)
        .into_iter()
        .filter(|(p, _, _)| p.extension().is_some_and(|e| e == "log"))
        .map(|(_, len, alloc)| (len, alloc))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_disks_start_small_grow_and_leave_nothing_mounted() {
    assert_root_for_tmpfs();
    let t = Instant::now();
    let mut nodes = three_nodes_with(5, |o| o.small_disks = Some(SMALL_DISK_MIB)).await;
    let marker = nodes.marker().to_owned();
    let full = SMALL_DISK_MIB * 1024 * 1024;
    let unpreallocated = |wal: &[(u64, u64)]| {
        !wal.is_empty() && wal.iter().all(|&(len, alloc)| alloc <= len + 1024 * 1024)
    };
    for (&id, dir) in nodes.small_disks() {
        assert_eq!(tmpfs_size(dir), Some(full), "node {id}: {dir:?}");
        let wal = wal_of(&nodes, id);
        assert!(
            unpreallocated(&wal),
            "node {id}'s log was preallocated: {wal:?}"
        );
    }
    phase("3 nodes on full-size disks, logs not preallocated", t);

    // A restarted node starts small again and grows once its new log was written to.
    let leader = nodes.wait_leader(LIMIT).await.unwrap();
    let follower = nodes.ids().into_iter().find(|&n| n != leader).unwrap();
    nodes.kill(follower).unwrap();
    put_rps(&nodes, leader, "chaos-small", 1, LIMIT).await;
    nodes.restart(follower).await.unwrap();
    let dir = nodes.small_disks()[&follower].clone();
    assert_eq!(tmpfs_size(&dir), Some(full));
    let wal = wal_of(&nodes, follower);
    assert!(
        unpreallocated(&wal),
        "node {follower}'s new log was preallocated: {wal:?}"
    );
    nodes.wait_all_ready(LIMIT).await.unwrap();
    phase(&format!("node {follower} restarted: {wal:?}"), t);

    // Drop with a full disk (and the node it wedged): nothing mounted, nothing left.
    let filled = nodes.fill_disk(follower).await.unwrap();
    assert!(
        filled.full && filled.preallocated < 1024 * 1024,
        "{filled:?}"
    );
    // (A write may still fit in the last page of its log: write until one does not.)
    let mut rps = 1;
    let c = wait_until("the full disk refuses a write", LIMIT, async || {
        rps += 1;
        put_rps(&nodes, leader, "chaos-small", rps, LIMIT).await;
        let c = nodes.condition(follower).await;
        Ok((c.refused_writes() || c.exited.is_some()).then_some(c))
    })
    .await
    .unwrap();
    phase(&format!("node {follower}: {c}"), t);
    let mounts: Vec<PathBuf> = nodes.small_disks().values().cloned().collect();
    drop(nodes);
    let left = marked_processes(&marker);
    assert!(left.is_empty(), "processes left after drop: {left:?}");
    let mounted: Vec<&PathBuf> = mounts.iter().filter(|m| is_mount_point(m)).collect();
    assert!(mounted.is_empty(), "still mounted after drop: {mounted:?}");
    phase("dropped with a full disk: no process, no mount left", t);
}
