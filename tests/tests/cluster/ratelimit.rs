//! Cluster-wide rate limits (issue 10) on three real nodes without a balancer: the tests spread
//! the load over the nodes themselves. A rule admits its rate cluster-wide whichever node the
//! calls arrive at, follows the load when it moves, does not overshoot when the leader (which
//! allocates the shares) dies, falls back to its safe share on a node cut off from every leader,
//! and the command limiter (`rate_limit`) answers a flood with 429 on every node. Rules are
//! also managed through the REST API of any node.
//!
//! Load is paced by one Tokio interval; every send is its own task, so a slow answer never
//! delays the next send. Admitted calls (successful results) are counted by send time in
//! 5-second windows from the start of the load.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use hangar_tests::cluster::{Cluster, Member};
use hangar_tests::*;
use hangar_wait::Wait;
use reqwest::Method;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};

use super::{cluster, start_static};

/// The window admitted calls are counted in.
const WINDOW: Duration = Duration::from_secs(5);
/// The rule of the load tests: 100 calls/s cluster-wide, burst 10.
const RULES: &str = "rate_limits:\n  - id: global100\n    rps: 100\n    burst: 10\n";
/// Its rate.
const RPS: f64 = 100.0;
/// Its burst.
const BURST: f64 = 10.0;
/// Voters of the test clusters.
const VOTERS: f64 = 3.0;
/// The fixture server (one copy on every node, so every node serves calls itself).
const SERVER: &str = "fixture";
/// Its echo tool, as clients call it.
const TOOL: &str = "fixture__echo";
/// What the calls echo.
const MESSAGE: &str = "rl";
/// Most calls in flight at once; a send beyond it is skipped and counted.
const MAX_IN_FLIGHT: usize = 512;
/// Longest a single call may take.
const CALL_LIMIT: Duration = Duration::from_secs(15);

/// A 3-node cluster with `top` (top-level keys) and the fixture on every node; returns the
/// cluster and its leader.
async fn rl_cluster(top: &str) -> (Cluster, u64) {
    let mut cl = cluster(3, &[]);
    let head = format!(
        "{top}mcp_servers:\n{}",
        fixture_stdio_yaml(SERVER, "    placement: {replicas: all}\n")
    );
    let leader = start_static(&mut cl, &head, "").await;
    (cl, leader)
}

/// Poll `f` every 100 ms until it returns `Ok`; panics after `limit` with the last `Err`.
async fn until<T>(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> Result<T, String>) -> T {
    let mut last = String::from("nothing yet");
    let got = Wait::new(what, limit)
        .step(Duration::from_millis(100))
        .poll_async(async || match f().await {
            Ok(v) => Some(v),
            Err(e) => {
                last = e;
                None
            }
        })
        .await;
    match got {
        Ok(v) => v,
        Err(t) => panic!("{t}; last seen: {last}"),
    }
}

/// The first 600 characters of `s`.
fn clip(s: &str) -> String {
    s.chars().take(600).collect()
}

/// A header's value as text.
fn header(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// Send a REST request (JSON body when given), bounded by 10 s: status, headers and the body
/// (JSON, or a JSON string holding the text).
async fn request(
    c: &reqwest::Client,
    method: Method,
    url: &str,
    body: Option<Value>,
) -> Result<(u16, HeaderMap, Value), String> {
    let mut rb = c
        .request(method.clone(), url)
        .timeout(Duration::from_secs(10));
    if let Some(b) = body {
        rb = rb
            .header("Content-Type", "application/json")
            .body(b.to_string());
    }
    let r = rb
        .send()
        .await
        .map_err(|e| format!("{method} {url}: {e}"))?;
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.map_err(|e| format!("{method} {url}: {e}"))?;
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok((status, headers, v))
}

/// GET, bounded by 10 s.
async fn get(c: &reqwest::Client, url: &str) -> Result<(u16, HeaderMap, Value), String> {
    request(c, Method::GET, url, None).await
}

/// `GET /api/rate_limits` of `m` (200 only).
async fn rate_limits(c: &reqwest::Client, m: &Member) -> Result<Value, String> {
    match get(c, &m.url("/api/rate_limits")).await? {
        (200, _, v) => Ok(v),
        (s, _, v) => Err(format!(
            "node {}: HTTP {s}: {}",
            m.id(),
            clip(&v.to_string())
        )),
    }
}

/// `/metrics` of `m`.
async fn metrics(c: &reqwest::Client, m: &Member) -> String {
    let (status, _, v) = get(c, &m.url("/metrics")).await.unwrap();
    assert_eq!(status, 200, "/metrics of node {}", m.id());
    v.as_str().map(str::to_owned).unwrap_or_default()
}

/// The sum of the samples of metric `name` (with `label`, e.g. `result="rejected"`, among
/// its labels when given) in a Prometheus text; `None` when it has no such sample.
fn metric(text: &str, name: &str, label: Option<&str>) -> Option<f64> {
    let mut sum = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let value = if let Some(labelled) = rest.strip_prefix('{') {
            let Some((labels, value)) = labelled.split_once('}') else {
                continue;
            };
            if label.is_some_and(|l| !labels.contains(l)) {
                continue;
            }
            value
        } else if rest.starts_with(' ') && label.is_none() {
            rest
        } else {
            continue;
        };
        if let Some(v) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}

/// How one call ended.
#[derive(Debug, Clone)]
enum Kind {
    /// A successful result (the echo).
    Admitted,
    /// JSON-RPC error -32029; its `data`.
    Rejected(Value),
    /// Anything else.
    Failed(String),
}

/// One `tools/call` of the echo through `url`: how it ended and the answer's headers.
async fn echo_once(c: &reqwest::Client, url: &str, id: u64) -> (Kind, HeaderMap) {
    let body = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
        "params": {"name": TOOL, "arguments": {"message": MESSAGE}}})
    .to_string();
    let sent = c
        .post(url)
        .header("Content-Type", "application/json")
        .header("Accept", "application/json, text/event-stream")
        .timeout(CALL_LIMIT)
        .body(body)
        .send()
        .await;
    let resp = match sent {
        Ok(r) => r,
        Err(e) => return (Kind::Failed(format!("send: {e}")), HeaderMap::new()),
    };
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let content_type = header(&headers, "content-type").unwrap_or_default();
    let body = match resp.text().await {
        Ok(b) => b,
        Err(e) => return (Kind::Failed(format!("read: {e}")), headers),
    };
    let a = Answer {
        status,
        content_type,
        body,
    };
    let kind = match a.messages().pop() {
        Some(m) if m["error"]["code"] == -32029 => Kind::Rejected(m["error"]["data"].clone()),
        Some(m)
            if m["result"]["content"][0]["text"] == MESSAGE && m["result"]["isError"] != true =>
        {
            Kind::Admitted
        }
        Some(m) => Kind::Failed(format!("HTTP {status}: {}", clip(&m.to_string()))),
        None => Kind::Failed(format!("HTTP {status}: {}", clip(&a.body))),
    };
    (kind, headers)
}

/// One call of a load.
#[derive(Debug, Clone)]
struct Outcome {
    /// The node it was sent to.
    node: u64,
    /// When it was sent, from the start of the load.
    sent: Duration,
    /// How it ended.
    kind: Kind,
    /// Its `X-RateLimit-Mode` header.
    mode: Option<String>,
}

/// The calls of a load.
struct Offered {
    outcomes: Vec<Outcome>,
    /// Sends planned (rate × duration).
    planned: u64,
    /// Sends skipped because `MAX_IN_FLIGHT` calls were running.
    skipped: u64,
}

/// Offer `rps` echo calls per second for `dur`: send `n` (from 0) goes, at `sent` after the
/// start, to the node and MCP URL `target(sent, n)` returns. Returns once every call has ended.
async fn offer(
    c: &reqwest::Client,
    rps: f64,
    dur: Duration,
    mut target: impl FnMut(Duration, u64) -> (u64, String),
) -> Offered {
    let planned = (rps * dur.as_secs_f64()).round() as u64;
    let t0 = Instant::now();
    let mut ticks = tokio::time::interval_at(t0, Duration::from_secs_f64(1.0 / rps));
    // A late tick is made up at once: the offered rate holds on average.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut tasks = JoinSet::new();
    let mut outcomes = Vec::with_capacity(planned as usize);
    let mut skipped = 0;
    for n in 0..planned {
        ticks.tick().await;
        while let Some(done) = tasks.try_join_next() {
            outcomes.push(done.expect("a sender task"));
        }
        let sent = t0.elapsed();
        let (node, url) = target(sent, n);
        if tasks.len() >= MAX_IN_FLIGHT {
            skipped += 1;
            continue;
        }
        let c = c.clone();
        tasks.spawn(async move {
            let (kind, headers) = echo_once(&c, &url, n).await;
            Outcome {
                node,
                sent,
                kind,
                mode: header(&headers, "x-ratelimit-mode"),
            }
        });
    }
    // Bounded: every call ends within CALL_LIMIT.
    while let Some(done) = tasks.join_next().await {
        outcomes.push(done.expect("a sender task"));
    }
    outcomes.sort_by_key(|o| o.sent);
    Offered {
        outcomes,
        planned,
        skipped,
    }
}

impl Offered {
    fn admitted(&self) -> impl Iterator<Item = &Outcome> {
        self.outcomes
            .iter()
            .filter(|o| matches!(o.kind, Kind::Admitted))
    }

    fn failed(&self) -> Vec<&Outcome> {
        self.outcomes
            .iter()
            .filter(|o| matches!(o.kind, Kind::Failed(_)))
            .collect()
    }

    /// Admitted calls sent in each of the first `n` windows.
    fn admitted_per_window(&self, n: usize) -> Vec<u64> {
        let mut w = vec![0; n];
        for o in self.admitted() {
            let i = (o.sent.as_secs_f64() / WINDOW.as_secs_f64()) as usize;
            if let Some(x) = w.get_mut(i) {
                *x += 1;
            }
        }
        w
    }

    /// Admitted calls sent in each of the first `n` seconds.
    fn admitted_per_second(&self, n: usize) -> Vec<u64> {
        let mut s = vec![0; n];
        for o in self.admitted() {
            if let Some(x) = s.get_mut(o.sent.as_secs() as usize) {
                *x += 1;
            }
        }
        s
    }

    /// Most admitted calls sent in any 5-second interval.
    fn max_sliding(&self) -> u64 {
        let sent: Vec<Duration> = self.admitted().map(|o| o.sent).collect();
        let mut best = 0;
        let mut lo = 0;
        for hi in 0..sent.len() {
            while sent[hi] - sent[lo] >= WINDOW {
                lo += 1;
            }
            best = best.max(hi - lo + 1);
        }
        best as u64
    }

    /// Per window: admitted (per node), rejected, failed (per node); then the totals.
    fn report(&self, n: usize) -> String {
        let mut rows = Vec::new();
        for w in 0..n {
            let inside: Vec<&Outcome> = self
                .outcomes
                .iter()
                .filter(|o| (o.sent.as_secs_f64() / WINDOW.as_secs_f64()) as usize == w)
                .collect();
            let mut admitted: BTreeMap<u64, u64> = BTreeMap::new();
            let mut failed: BTreeMap<u64, u64> = BTreeMap::new();
            let mut rejected = 0;
            for o in &inside {
                match o.kind {
                    Kind::Admitted => *admitted.entry(o.node).or_default() += 1,
                    Kind::Rejected(_) => rejected += 1,
                    Kind::Failed(_) => *failed.entry(o.node).or_default() += 1,
                }
            }
            rows.push(format!(
                "  window {w} [{}s, {}s): admitted {} by node {admitted:?}, rejected {rejected}, failed {failed:?}, sent {}",
                w * 5,
                w * 5 + 5,
                admitted.values().sum::<u64>(),
                inside.len()
            ));
        }
        rows.push(format!(
            "  planned {}, sent {}, skipped {}, admitted {}, max in any 5 s {}",
            self.planned,
            self.outcomes.len(),
            self.skipped,
            self.admitted().count(),
            self.max_sliding()
        ));
        for o in self.failed().iter().take(3) {
            if let Kind::Failed(why) = &o.kind {
                rows.push(format!("  failed: node {} at {:?}: {why}", o.node, o.sent));
            }
        }
        rows.join("\n")
    }

    /// Every rejection is well-formed: `data.error_type` and a positive `data.retryAfterMs`.
    fn check_rejections(&self, report: &str) {
        let mut n = 0;
        for o in &self.outcomes {
            if let Kind::Rejected(data) = &o.kind {
                n += 1;
                assert!(
                    data["error_type"] == "RateLimitExceeded"
                        && data["retryAfterMs"].as_f64().is_some_and(|ms| ms > 0.0),
                    "a rejected call's data: {data}\n{report}"
                );
            }
        }
        assert!(n > 0, "no call was rejected\n{report}");
    }

    /// The sender kept up and every call was admitted or rejected by the limit.
    fn check_clean(&self, report: &str) {
        assert!(
            self.skipped * 100 <= self.planned,
            "the sender fell behind: {} of {} sends skipped\n{report}",
            self.skipped,
            self.planned
        );
        let failed = self.failed();
        assert!(
            failed.is_empty(),
            "{} calls failed otherwise than by the limit, e.g. {:?}\n{report}",
            failed.len(),
            &failed[..failed.len().min(3)]
        );
    }

    /// Every window after the first admits `RPS` × 5 s ± 5 %.
    fn check_windows(&self, n: usize, report: &str) {
        let want = RPS * WINDOW.as_secs_f64();
        let got = self.admitted_per_window(n);
        let off: Vec<(usize, u64)> = got
            .iter()
            .enumerate()
            .skip(1)
            .filter(|(_, a)| (**a as f64 - want).abs() > 0.05 * want)
            .map(|(w, a)| (w, *a))
            .collect();
        assert!(
            off.is_empty(),
            "windows admitting outside {want} ± 5 %: {off:?} (all: {got:?})\n{report}"
        );
    }
}

/// Each node's MCP URL by id.
fn mcp_urls(cl: &Cluster) -> BTreeMap<u64, String> {
    cl.members()
        .iter()
        .map(|m| (m.id(), m.url("/mcp")))
        .collect()
}

/// Of every ten sends, eight go to `busy` and one to each other node.
fn skewed(ids: &[u64], busy: u64, n: u64) -> u64 {
    let others: Vec<u64> = ids.iter().copied().filter(|&i| i != busy).collect();
    match n % 10 {
        3 => others[0],
        7 => others[1],
        _ => busy,
    }
}

/// Wait until `m` is ready, holds a quota lease, and has loaded every rule it lists (its
/// per-rule metric exists: a rule is listed as soon as Raft has it, but a node loads its
/// rules into the limiter on its next demand report, up to 250 ms later).
async fn ready_and_leased(c: &reqwest::Client, m: &Member) {
    until(
        &format!("node {} ready", m.id()),
        Duration::from_secs(30),
        async || match get(c, &m.url("/health/ready")).await? {
            (200, _, _) => Ok(()),
            (s, _, v) => Err(format!("HTTP {s}: {}", clip(&v.to_string()))),
        },
    )
    .await;
    let listed = until(
        &format!("node {} holds a quota lease", m.id()),
        Duration::from_secs(30),
        async || {
            let v = rate_limits(c, m).await?;
            if v["node"]["mode"] == "leased" {
                Ok(v)
            } else {
                Err(clip(&v.to_string()))
            }
        },
    )
    .await;
    let ids: Vec<String> = listed["rate_limits"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|d| d["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    until(
        &format!("node {} loaded the rules {ids:?}", m.id()),
        Duration::from_secs(10),
        async || {
            let text = metrics(c, m).await;
            let missing: Vec<&String> = ids
                .iter()
                .filter(|id| {
                    let label = format!("rule=\"{id}\"");
                    metric(&text, "mcp_hangar_rate_limit_rule_total", Some(&label)).is_none()
                })
                .collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "no mcp_hangar_rate_limit_rule_total for {missing:?}"
                ))
            }
        },
    )
    .await;
}

/// Every node ready, leased, and serving the echo (its copy of the fixture started).
async fn ready_for_load(c: &reqwest::Client, cl: &Cluster) {
    for m in cl.members() {
        ready_and_leased(c, m).await;
        let url = m.url("/mcp");
        until(
            &format!("the echo through node {}", m.id()),
            Duration::from_secs(30),
            async || match echo_once(c, &url, 0).await.0 {
                Kind::Admitted => Ok(()),
                k => Err(format!("{k:?}")),
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_wide_limit_admits_its_rate_under_skewed_load() {
    let c = client();
    let (cl, _) = rl_cluster(RULES).await;
    ready_for_load(&c, &cl).await;
    let ids = cl.ids();
    let urls = mcp_urls(&cl);
    // 300 calls/s, 8:1:1 over nodes 1, 2, 3, for four windows.
    let o = offer(&c, 300.0, 4 * WINDOW, |_, n| {
        let id = skewed(&ids, ids[0], n);
        (id, urls[&id].clone())
    })
    .await;
    let report = o.report(4);
    eprintln!("skewed load 8:1:1, busy node {}:\n{report}", ids[0]);
    o.check_clean(&report);
    o.check_rejections(&report);
    o.check_windows(4, &report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limit_follows_the_busy_node_when_it_moves() {
    let c = client();
    let (cl, _) = rl_cluster(RULES).await;
    ready_for_load(&c, &cl).await;
    let ids = cl.ids();
    let urls = mcp_urls(&cl);
    // The busy node (8 of 10 sends) changes at every window: 1, 2, 3, 1.
    let busy_in = |w: usize| ids[w % ids.len()];
    let o = offer(&c, 300.0, 4 * WINDOW, |sent, n| {
        let w = (sent.as_secs_f64() / WINDOW.as_secs_f64()) as usize;
        let id = skewed(&ids, busy_in(w), n);
        (id, urls[&id].clone())
    })
    .await;
    let report = o.report(4);
    let busy: Vec<u64> = (0..4).map(busy_in).collect();
    eprintln!("moving load 8:1:1, busy node per window {busy:?}:\n{report}");
    o.check_clean(&report);
    o.check_rejections(&report);
    o.check_windows(4, &report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_does_not_overshoot() {
    let c = client();
    let (mut cl, leader) = rl_cluster(RULES).await;
    ready_for_load(&c, &cl).await;
    let ids = cl.ids();
    let survivors: Vec<u64> = ids.iter().copied().filter(|&i| i != leader).collect();
    let urls = mcp_urls(&cl);
    // 300 calls/s spread evenly; after one window the leader is killed and the survivors
    // take all of it for three windows more.
    let mut killed_at = None;
    let o = offer(&c, 300.0, 4 * WINDOW, |sent, n| {
        if killed_at.is_none() && sent >= WINDOW {
            cl.kill9(leader).unwrap();
            killed_at = Some(sent);
        }
        let to = if killed_at.is_some() {
            &survivors
        } else {
            &ids
        };
        let id = to[(n % to.len() as u64) as usize];
        (id, urls[&id].clone())
    })
    .await;
    let report = o.report(4);
    eprintln!(
        "leader {leader} killed at {killed_at:?}:\n{report}\n  admitted per second: {:?}",
        o.admitted_per_second(20)
    );
    // Calls to the killed node fail; the survivors' calls are admitted or rejected.
    let failed: Vec<&Outcome> = o
        .failed()
        .into_iter()
        .filter(|f| f.node != leader)
        .collect();
    assert!(
        failed.is_empty(),
        "{} calls through the survivors failed otherwise than by the limit, e.g. {:?}\n{report}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert!(
        o.skipped * 100 <= o.planned,
        "the sender fell behind\n{report}"
    );
    o.check_rejections(&report);
    let most = RPS * WINDOW.as_secs_f64() * (1.0 + 1.0 / VOTERS);
    let got = o.admitted_per_window(4);
    assert!(
        got.iter().all(|&a| a as f64 <= most),
        "a window admitted more than {most:.0}: {got:?}\n{report}"
    );
    // Not vacuous: the survivors still admit at least their safe shares (2 × rps/3) − 20 %.
    let least = 0.8 * 2.0 * RPS / VOTERS * WINDOW.as_secs_f64();
    assert!(
        got[3] as f64 >= least,
        "the survivors admitted {} in the last window, fewer than {least:.0}\n{report}",
        got[3]
    );
}

/// Processes stopped with SIGSTOP, continued (SIGCONT) when thawed or dropped.
struct Frozen(Vec<u32>);

impl Frozen {
    fn stop(pids: &[u32]) -> Frozen {
        let frozen = Frozen(pids.to_vec());
        for &p in pids {
            send_signal(p, rustix::process::Signal::STOP);
        }
        frozen
    }

    fn thaw(&mut self) {
        for p in self.0.drain(..) {
            send_signal(p, rustix::process::Signal::CONT);
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.thaw();
    }
}

/// Send `sig` to `pid`, ignoring failures (the process may be gone).
fn send_signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(p) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(p, sig);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_node_falls_back_to_its_safe_share_and_says_so() {
    let c = client();
    let (cl, leader) = rl_cluster(RULES).await;
    ready_for_load(&c, &cl).await;
    // Freeze the two other nodes (the leader among them): the lone node reaches no leader.
    let lone = cl.ids().into_iter().find(|&i| i != leader).unwrap();
    let others: Vec<u32> = cl
        .members()
        .iter()
        .filter(|m| m.id() != lone)
        .map(|m| m.pid().unwrap())
        .collect();
    let m = cl.member(lone).unwrap();
    let mut frozen = Frozen::stop(&others);
    let stopped = Instant::now();
    let v = until(
        &format!("node {lone} in partition mode"),
        Duration::from_secs(20),
        async || {
            let v = rate_limits(&c, m).await?;
            if v["node"]["mode"] == "partition" {
                Ok(v)
            } else {
                Err(clip(&v.to_string()))
            }
        },
    )
    .await;
    eprintln!(
        "node {lone} in partition mode {:?} after the others froze: {}",
        stopped.elapsed(),
        clip(&v["node"].to_string())
    );
    let text = metrics(&c, m).await;
    assert_eq!(
        metric(&text, "mcp_hangar_rate_limit_partition_mode", None),
        Some(1.0),
        "partition_mode on node {lone}"
    );
    let (_, h, _) = get(&c, &m.url("/api/rate_limits")).await.unwrap();
    assert!(
        header(&h, "x-ratelimit-mode").is_some_and(|v| !v.is_empty()),
        "an /api answer in partition mode carries X-RateLimit-Mode: {h:?}"
    );
    // 100 calls/s for one window: about rps / voters admitted.
    let url = m.url("/mcp");
    let o = offer(&c, 100.0, WINDOW, |_, _| (lone, url.clone())).await;
    let report = o.report(1);
    let modes: BTreeSet<Option<String>> = o.outcomes.iter().map(|x| x.mode.clone()).collect();
    eprintln!("partitioned node {lone}, X-RateLimit-Mode values {modes:?}:\n{report}");
    o.check_clean(&report);
    o.check_rejections(&report);
    assert!(
        o.outcomes
            .iter()
            .all(|x| x.mode.as_ref().is_some_and(|v| !v.is_empty())),
        "every MCP answer in partition mode carries X-RateLimit-Mode: {modes:?}"
    );
    let share = RPS / VOTERS * WINDOW.as_secs_f64();
    let admitted = o.admitted().count() as f64;
    assert!(
        (0.8 * share..=1.2 * share + BURST).contains(&admitted),
        "admitted {admitted} in partition mode, want {:.0}..={:.0}\n{report}",
        0.8 * share,
        1.2 * share + BURST
    );
    // Thawed: the lease comes back.
    frozen.thaw();
    until(
        &format!("node {lone} leased again"),
        Duration::from_secs(30),
        async || {
            let v = rate_limits(&c, m).await?;
            if v["node"]["mode"] == "leased" {
                Ok(())
            } else {
                Err(clip(&v.to_string()))
            }
        },
    )
    .await;
    let text = metrics(&c, m).await;
    assert_eq!(
        metric(&text, "mcp_hangar_rate_limit_partition_mode", None),
        Some(0.0),
        "partition_mode on node {lone} after the thaw"
    );
    // Both changes are events.
    until(
        "RateLimitPartitionMode and RateLimitLeaseRestored events",
        Duration::from_secs(20),
        async || {
            let (_, _, v) = get(&c, &m.url("/api/events?since=0&limit=10000")).await?;
            let types: BTreeSet<&str> = v["events"]
                .as_array()
                .map(|a| a.iter().filter_map(|e| e["event_type"].as_str()).collect())
                .unwrap_or_default();
            if types.contains("RateLimitPartitionMode") && types.contains("RateLimitLeaseRestored")
            {
                Ok(())
            } else {
                Err(format!("{types:?}"))
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_gets_429_with_retry_after_on_every_node() {
    let c = client();
    let (burst, rps) = (5.0, 1.0);
    let (cl, _) = rl_cluster("rate_limit: {rps: 1, burst: 5}\n").await;
    // No echo to warm up: every tool call counts in the command limiter's bucket.
    for m in cl.members() {
        ready_and_leased(&c, m).await;
    }
    // 20 starts at once through each node, the three nodes at once.
    let t0 = Instant::now();
    let floods = cl.members().iter().map(|m| {
        let url = m.url(&format!("/api/mcp_servers/{SERVER}/start"));
        let c = &c;
        async move {
            let answers =
                futures::future::join_all((0..20).map(|_| request(c, Method::POST, &url, None)))
                    .await;
            (m.id(), answers)
        }
    });
    let floods = futures::future::join_all(floods).await;
    let took = t0.elapsed();
    let (mut admitted, mut rejected_on) = (0, BTreeMap::<u64, u64>::new());
    let mut seen = Vec::new();
    for (node, answers) in &floods {
        for a in answers {
            let (status, h, body) = a.as_ref().unwrap();
            seen.push(format!("node {node}: {status}"));
            match status {
                200 => admitted += 1,
                429 => {
                    *rejected_on.entry(*node).or_default() += 1;
                    let retry = header(h, "retry-after");
                    assert!(
                        retry
                            .as_deref()
                            .and_then(|r| r.parse::<u64>().ok())
                            .is_some_and(|s| s >= 1),
                        "Retry-After {retry:?} on node {node}: {h:?}"
                    );
                    for name in ["ratelimit-limit", "x-ratelimit-remaining"] {
                        assert!(h.contains_key(name), "{name} on node {node}: {h:?}");
                    }
                    assert_eq!(
                        body["error"]["code"], "RateLimitExceeded",
                        "node {node}: {body}"
                    );
                    assert_eq!(
                        body["error"]["details"]["rule"], "rate_limit",
                        "node {node}: {body}"
                    );
                }
                _ => panic!("start through node {node}: HTTP {status}: {body}"),
            }
        }
    }
    eprintln!(
        "flood of 3 × 20 starts in {took:?}: {admitted} admitted, rejected per node {rejected_on:?}"
    );
    // About the burst cluster-wide (plus what refills while the flood lasts), not per node.
    let most = burst + (rps * took.as_secs_f64()).ceil() + 1.0;
    assert!(
        (3.0..=most).contains(&f64::from(admitted)),
        "{admitted} starts admitted cluster-wide, want 3..={most} ({seen:?})"
    );
    for id in cl.ids() {
        assert!(
            rejected_on.get(&id).is_some_and(|&n| n > 0),
            "node {id} answered no 429: {rejected_on:?}"
        );
    }

    // A batch of 20 calls through hangar_call: entries beyond the bucket are rejected.
    let calls: Vec<Value> = (0..20)
        .map(|i| json!({"mcp_server": SERVER, "tool": "echo", "arguments": {"message": format!("b{i}")}}))
        .collect();
    let url = cl.member(1).unwrap().url("/mcp");
    let batch = until(
        "hangar_call admitted",
        Duration::from_secs(20),
        async || {
            let a = rpc(
                &c,
                &url,
                "tools/call",
                json!({"name": "hangar_call", "arguments": {"calls": calls}}),
            )
            .await;
            let r = a.response();
            if r["result"]["structuredContent"]["results"].is_array() {
                Ok(r["result"]["structuredContent"].clone())
            } else {
                Err(clip(&r.to_string()))
            }
        },
    )
    .await;
    let results = batch["results"].as_array().unwrap();
    assert_eq!(results.len(), 20, "{batch}");
    let limited = results
        .iter()
        .filter(|r| r["success"] == false && r["error_type"] == "RateLimitExceeded")
        .count();
    let other: Vec<&Value> = results
        .iter()
        .filter(|r| r["success"] != true && r["error_type"] != "RateLimitExceeded")
        .collect();
    eprintln!(
        "hangar_call: {} succeeded, {limited} rate-limited",
        results.len() - limited - other.len()
    );
    assert!(limited > 0, "no entry was rate-limited: {batch}");
    assert!(other.is_empty(), "entries failed otherwise: {other:?}");
    let mut rejected = 0.0;
    for m in cl.members() {
        let text = metrics(&c, m).await;
        rejected += metric(
            &text,
            "mcp_hangar_rate_limit_hits_total",
            Some("result=\"rejected\""),
        )
        .unwrap_or(0.0);
    }
    assert!(
        rejected > 0.0,
        "mcp_hangar_rate_limit_hits_total{{result=\"rejected\"}} over the nodes: {rejected}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_rules_are_managed_through_the_api_of_any_node() {
    let c = client();
    let mut cl = cluster(3, &[]);
    let leader = start_static(&mut cl, &format!("{RULES}mcp_servers: {{}}\n"), "").await;
    for m in cl.members() {
        ready_and_leased(&c, m).await;
    }
    let (n1, n2, n3) = (
        cl.member(1).unwrap(),
        cl.member(2).unwrap(),
        cl.member(3).unwrap(),
    );
    let rule = json!({"key": ["server"], "match": {"server": "fs*"}, "rps": 50, "burst": 5,
        "on_partition": "fail_closed"});
    // Created through node 2 ...
    let (status, _, body) = request(
        &c,
        Method::PUT,
        &n2.url("/api/rate_limits/api-rule"),
        Some(rule.clone()),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let def = &body["rate_limit"];
    assert_eq!(def["id"], "api-rule", "{body}");
    assert_eq!(def["source"], "api", "{body}");
    assert_eq!(def["applies_to"], "tools", "{body}");
    assert_eq!(def["key"], json!(["server"]), "{body}");
    assert_eq!(def["match"]["server"], "fs*", "{body}");
    assert_eq!(def["rps"].as_f64(), Some(50.0), "{body}");
    assert_eq!(def["burst"], 5, "{body}");
    assert_eq!(def["on_partition"], "fail_closed", "{body}");
    // ... shown by node 3, with the file's rule.
    let listed = until(
        "node 3 lists the new rule",
        Duration::from_secs(10),
        async || {
            let v = rate_limits(&c, n3).await?;
            let has = v["rate_limits"]
                .as_array()
                .is_some_and(|a| a.iter().any(|d| d["id"] == "api-rule" && d["rps"] == 50.0));
            if has {
                Ok(v)
            } else {
                Err(clip(&v.to_string()))
            }
        },
    )
    .await;
    let file_rule = listed["rate_limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == "global100")
        .unwrap_or_else(|| panic!("global100 listed: {listed}"));
    assert_eq!(file_rule["source"], "file", "{listed}");
    assert_eq!(file_rule["rps"].as_f64(), Some(100.0), "{listed}");
    assert_eq!(file_rule["burst"], 10, "{listed}");
    assert_eq!(listed["node"]["node_id"], 3, "{listed}");
    assert_eq!(listed["node"]["mode"], "leased", "{listed}");
    assert_eq!(listed["node"]["leader"], leader, "{listed}");
    // A rule of the file is edited in the file.
    let (status, _, body) = request(
        &c,
        Method::DELETE,
        &n1.url("/api/rate_limits/global100"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(status, 409, "DELETE of a file rule: {body}");
    let (status, _, body) = request(
        &c,
        Method::PUT,
        &n1.url("/api/rate_limits/global100"),
        Some(rule.clone()),
    )
    .await
    .unwrap();
    assert_eq!(status, 409, "PUT of a file rule: {body}");
    // Bad input is a 422 naming the field.
    let (status, _, body) = request(
        &c,
        Method::PUT,
        &n2.url("/api/rate_limits/bad"),
        Some(json!({"rps": -1, "burst": 5})),
    )
    .await
    .unwrap();
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "ValidationError", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("rps")),
        "{body}"
    );
    // Deleted through node 3, gone on node 2; an unknown id is a 404.
    let (status, _, body) = request(
        &c,
        Method::DELETE,
        &n3.url("/api/rate_limits/api-rule"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deleted"], "api-rule", "{body}");
    until(
        "node 2 no longer lists the rule",
        Duration::from_secs(10),
        async || {
            let v = rate_limits(&c, n2).await?;
            let has = v["rate_limits"]
                .as_array()
                .is_none_or(|a| a.iter().any(|d| d["id"] == "api-rule"));
            if has {
                Err(clip(&v.to_string()))
            } else {
                Ok(())
            }
        },
    )
    .await;
    let (status, _, body) = request(&c, Method::DELETE, &n1.url("/api/rate_limits/nope"), None)
        .await
        .unwrap();
    assert_eq!(status, 404, "{body}");
    let (_, _, sys) = get(&c, &n1.url("/api/system")).await.unwrap();
    assert_eq!(
        sys["system"]["instance"]["rate_limits_are_per_instance"], false,
        "{sys}"
    );
}
