//! Acceptance scenarios of issue 3 (inventory §9.1 R02–R05, R09 and the §9.2 checklist) with
//! real `hangar` processes and real fixture servers. `lifecycle.rs` already covers the basic
//! cases (orphans, single-flight over `/mcp`, idle stop, detection of a dead upstream, in-request
//! failover of a subprocess group, file-watch reload); these tests extend them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hangar_tests::*;
use serde_json::{Value, json};

/// The port of a fixture URL `http://127.0.0.1:PORT/mcp`.
fn port_of(url: &str) -> String {
    url.rsplit(':')
        .next()
        .and_then(|r| r.split('/').next())
        .unwrap()
        .to_owned()
}

/// The fixture's base URL (for `/admin/stats`).
fn base_of(url: &str) -> String {
    url.trim_end_matches("/mcp").to_owned()
}

fn kill9(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status();
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

async fn events(c: &reqwest::Client, node: &Node) -> Vec<Value> {
    let (_, v) = get_json(c, &node.url("/api/events?since=0&limit=10000&sync=true")).await;
    v["events"].as_array().cloned().unwrap_or_default()
}

/// Events of one type whose data contains every field of `fields`.
fn matching<'a>(evs: &'a [Value], ty: &str, fields: &Value) -> Vec<&'a Value> {
    evs.iter()
        .filter(|e| e["event_type"] == ty)
        .filter(|e| {
            fields
                .as_object()
                .unwrap()
                .iter()
                .all(|(k, v)| &e["data"][k] == v)
        })
        .collect()
}

async fn metrics(c: &reqwest::Client, node: &Node) -> String {
    get_text(c, &node.url("/metrics")).await
}

/// Run a management tool; returns its structured result (with `isError` copied in).
async fn mgmt(c: &reqwest::Client, node: &Node, name: &str, args: Value) -> Value {
    let r = call_tool(c, &node.url("/mcp"), name, args).await;
    let res = &r["result"];
    assert!(res.is_object(), "{name} answered {r}");
    let mut v = match res.get("structuredContent") {
        Some(sc) => sc.clone(),
        None => json!({"text": res["content"][0]["text"]}),
    };
    if res["isError"] == json!(true) {
        v["isError"] = json!(true);
    }
    v
}

/// `whoami` through a tool name: Ok(instance name) or Err(the JSON-RPC answer).
async fn who(c: &reqwest::Client, url: &str, tool: &str) -> Result<String, Value> {
    let r = call_tool(c, url, tool, json!({})).await;
    match r["result"]["content"][0]["text"].as_str() {
        Some(t) if r["result"]["isError"] != json!(true) => {
            let v: Value = serde_json::from_str(t).unwrap();
            Ok(v["name"].as_str().unwrap().to_owned())
        }
        _ => Err(r),
    }
}

async fn state_of(c: &reqwest::Client, node: &Node, id: &str) -> String {
    let (_, v) = get_json(c, &node.url(&format!("/api/mcp_servers/{id}"))).await;
    v["state"].as_str().unwrap_or("").to_owned()
}

async fn pid_of(c: &reqwest::Client, node: &Node, id: &str) -> u32 {
    let (_, v) = get_json(c, &node.url(&format!("/api/mcp_servers/{id}"))).await;
    v["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no pid for {id}: {v}")) as u32
}

fn error_type(resp: &Value) -> String {
    resp["error"]["data"]["error_type"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

// ---------------------------------------------------------------------------------------------
// R02 + per-server part of R03
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn acceptance_r02_r03_server_degrades_shows_next_attempt_fails_fast_and_recovers_unattended()
{
    let web = FixtureHttp::start("web");
    let port = port_of(&web.url);
    let node = Node::start(&format!(
        "mcp_servers:\n  web:\n    mode: remote\n    endpoint: {}\n    health_check_interval_s: 1\n    max_consecutive_failures: 3\n    http: {{connect_timeout: 5.0, read_timeout: 5.0}}\n",
        web.url
    ));
    let c = client();
    let b = mgmt(
        &c,
        &node,
        "hangar_call",
        json!({"calls": [{"mcp_server": "web", "tool": "add", "arguments": {"a": 1, "b": 2}}]}),
    )
    .await;
    assert_eq!(b["results"][0]["success"], true, "{b}");
    assert_eq!(
        b["results"][0]["result"]["structuredContent"]["result"].as_f64(),
        Some(3.0),
        "{b}"
    );

    // Stop the upstream: 3 failed checks at a 1 s interval → DEGRADED.
    drop(web);
    let t0 = Instant::now();
    wait_for("DEGRADED", Duration::from_secs(20), || async {
        (state_of(&c, &node, "web").await == "degraded").then_some(())
    })
    .await;
    let detect = t0.elapsed();
    assert!(
        detect < Duration::from_secs(9),
        "detected within 3 x interval + slack: {detect:?}"
    );
    let evs = events(&c, &node).await;
    let failed = matching(&evs, "HealthCheckFailed", &json!({"mcp_server_id": "web"}));
    assert_eq!(failed.len(), 3, "{failed:?}");
    assert_eq!(
        matching(
            &evs,
            "McpServerDegraded",
            &json!({"mcp_server_id": "web", "reason": "health_check_failures", "consecutive_failures": 3})
        )
        .len(),
        1,
        "{evs:?}"
    );
    assert!(
        !matching(
            &evs,
            "CircuitBreakerStateChanged",
            &json!({"mcp_server_id": "web", "old_state": "closed", "new_state": "open"})
        )
        .is_empty()
    );
    let m = metrics(&c, &node).await;
    assert!(
        m.contains(r#"mcp_hangar_mcp_server_state{mcp_server="web"} 3"#),
        "{m}"
    );
    assert!(
        m.contains(r#"mcp_hangar_health_check_consecutive_failures{mcp_server="web"} 3"#),
        "{m}"
    );

    // The next recovery attempt is scheduled and shown in the details.
    let next = wait_for(
        "next_recovery_at in hangar_details",
        Duration::from_secs(10),
        || async {
            let d = mgmt(&c, &node, "hangar_details", json!({"mcp_server": "web"})).await;
            d["health"]["next_recovery_at"].as_f64()
        },
    )
    .await;
    let now = now_unix();
    assert!(
        next > now - 1.0 && next < now + 120.0,
        "next attempt {next} vs now {now}"
    );

    // While the breaker is open, calls fail fast (milliseconds, not the 5 s connect timeout).
    let fast = wait_for(
        "a call refused by the open breaker",
        Duration::from_secs(10),
        || async {
            let t = Instant::now();
            let b = mgmt(
                &c,
                &node,
                "hangar_call",
                json!({"calls": [{"mcp_server": "web", "tool": "echo", "arguments": {"message": "x"}}]}),
            )
            .await;
            let r = b["results"][0].clone();
            (r["error_type"] == "CircuitBreakerOpen").then(|| (t.elapsed(), r))
        },
    )
    .await;
    assert!(
        fast.0 < Duration::from_millis(200),
        "fails fast: {:?}",
        fast.0
    );
    assert_eq!(fast.1["success"], false);
    assert!(
        fast.1["error"]
            .as_str()
            .unwrap()
            .contains("next recovery attempt"),
        "{}",
        fast.1
    );
    assert!(
        metrics(&c, &node)
            .await
            .contains(r#"mcp_hangar_circuit_breaker_state{mcp_server="web",state="open"} 1"#)
    );

    // A recovery attempt half-opens the breaker; it fails (upstream still down) and re-opens.
    wait_for("a failed probe", Duration::from_secs(15), || async {
        let evs = events(&c, &node).await;
        (!matching(
            &evs,
            "CircuitBreakerStateChanged",
            &json!({"mcp_server_id": "web", "old_state": "half_open", "new_state": "open"}),
        )
        .is_empty())
        .then_some(())
    })
    .await;
    assert_eq!(state_of(&c, &node, "web").await, "degraded");

    // Bring the upstream back: recovery happens without an operator and closes the breaker.
    let _web2 = FixtureHttp::start_args("web", &["--listen", &format!("127.0.0.1:{port}")]);
    wait_for(
        "unattended recovery to READY",
        Duration::from_secs(30),
        || async { (state_of(&c, &node, "web").await == "ready").then_some(()) },
    )
    .await;
    let evs = events(&c, &node).await;
    assert!(
        !matching(
            &evs,
            "CircuitBreakerStateChanged",
            &json!({"mcp_server_id": "web", "old_state": "half_open", "new_state": "closed"})
        )
        .is_empty(),
        "{evs:?}"
    );
    assert_eq!(
        matching(&evs, "McpServerDegraded", &json!({"mcp_server_id": "web"})).len(),
        1,
        "failed recovery attempts do not re-announce DEGRADED"
    );
    let m = metrics(&c, &node).await;
    assert!(
        m.contains(r#"mcp_hangar_circuit_breaker_state{mcp_server="web",state="closed"} 1"#),
        "{m}"
    );
    assert!(m.contains(r#"mcp_hangar_mcp_server_state{mcp_server="web"} 2"#));
    assert_eq!(
        text_of(
            &call_tool(
                &c,
                &node.url("/mcp"),
                "web__echo",
                json!({"message": "back"})
            )
            .await
        ),
        "back"
    );
}

// ---------------------------------------------------------------------------------------------
// R03 group breaker
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn acceptance_r03_group_breaker_opens_fails_fast_half_opens_and_closes() {
    let cfg = format!(
        "mcp_servers:\n{}  g:\n    mode: group\n    strategy: round_robin\n    min_healthy: 1\n    circuit_breaker: {{failure_threshold: 3, reset_timeout_s: 2}}\n    members:\n      - {{id: a}}\n",
        fixture_stdio_yaml("a", "")
    );
    let node = Node::start(&cfg);
    let c = client();
    let url = node.url("/mcp");
    assert_eq!(
        text_of(&call_tool(&c, &url, "g__add", json!({"a": 1, "b": 2})).await),
        "3"
    );
    // Three failed calls (the member's process crashes on each) open the group breaker.
    for i in 0..3 {
        let r = call_tool(&c, &url, "g__crash_after", json!({"n": 1})).await;
        assert!(r["error"].is_object(), "call {i} should fail: {r}");
        assert_ne!(error_type(&r), "CircuitBreakerOpen", "call {i}: {r}");
    }
    let t = Instant::now();
    let r = call_tool(&c, &url, "g__echo", json!({"message": "x"})).await;
    assert!(
        t.elapsed() < Duration::from_millis(200),
        "fails fast: {:?}",
        t.elapsed()
    );
    assert_eq!(error_type(&r), "CircuitBreakerOpen", "{r}");
    let evs = events(&c, &node).await;
    assert!(
        !matching(
            &evs,
            "CircuitBreakerStateChanged",
            &json!({"mcp_server_id": "g", "old_state": "closed", "new_state": "open"})
        )
        .is_empty()
    );
    assert!(!matching(&evs, "GroupCircuitOpened", &json!({"group_id": "g"})).is_empty());
    assert!(
        metrics(&c, &node)
            .await
            .contains(r#"mcp_hangar_circuit_breaker_state{mcp_server="g",state="open"} 1"#)
    );
    let (_, gv) = get_json(&c, &node.url("/api/groups/g")).await;
    assert_eq!(gv["circuit_breaker_state"], "open", "{gv}");
    assert_eq!(gv["state"], "degraded", "{gv}");
    let d = mgmt(&c, &node, "hangar_details", json!({"mcp_server": "g"})).await;
    assert_eq!(d["circuit_open"], true, "{d}");
    assert_eq!(d["is_available"], false, "{d}");

    // After the reset timeout one probe is admitted; it fails, so the breaker re-opens.
    let probe = wait_for(
        "a failing probe after the reset timeout",
        Duration::from_secs(10),
        || async {
            let r = call_tool(&c, &url, "g__crash_after", json!({"n": 1})).await;
            (error_type(&r) != "CircuitBreakerOpen").then_some(r)
        },
    )
    .await;
    assert!(probe["error"].is_object(), "{probe}");
    let r = call_tool(&c, &url, "g__echo", json!({"message": "x"})).await;
    assert_eq!(error_type(&r), "CircuitBreakerOpen", "re-opened: {r}");
    assert!(
        !matching(
            &events(&c, &node).await,
            "CircuitBreakerStateChanged",
            &json!({"mcp_server_id": "g", "old_state": "half_open", "new_state": "open"})
        )
        .is_empty()
    );

    // A probe abandoned by its caller (batch per-call timeout) must not wedge the breaker.
    let abandoned = wait_for(
        "a probe that times out",
        Duration::from_secs(10),
        || async {
            let b = mgmt(
                &c,
                &node,
                "hangar_call",
                json!({"calls": [{"mcp_server": "g", "tool": "slow", "arguments": {"ms": 3000}, "timeout": 0.3}]}),
            )
            .await;
            let r = b["results"][0].clone();
            (r["error_type"] != "CircuitBreakerOpen").then_some(r)
        },
    )
    .await;
    assert_eq!(abandoned["error_type"], "TimeoutError", "{abandoned}");
    // The next request probes, succeeds and closes the breaker.
    let r = call_tool(&c, &url, "g__echo", json!({"message": "closed"})).await;
    assert_eq!(text_of(&r), "closed", "{r}");
    assert!(
        !matching(
            &events(&c, &node).await,
            "CircuitBreakerStateChanged",
            &json!({"mcp_server_id": "g", "old_state": "half_open", "new_state": "closed"})
        )
        .is_empty()
    );
    assert!(
        metrics(&c, &node)
            .await
            .contains(r#"mcp_hangar_circuit_breaker_state{mcp_server="g",state="closed"} 1"#)
    );
    let (_, gv) = get_json(&c, &node.url("/api/groups/g")).await;
    assert_eq!(gv["circuit_breaker_state"], "closed", "{gv}");
}

// ---------------------------------------------------------------------------------------------
// R04 + checklist "kill a primary under steady traffic"
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Sample {
    at: Instant,
    who: Result<String, String>,
}

/// Steady traffic: one `whoami` call after another with a short pause; after each call the
/// counter in `done` is bumped (so a test can act between two calls).
struct Traffic {
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    done: tokio::sync::watch::Receiver<usize>,
    task: tokio::task::JoinHandle<()>,
}

impl Traffic {
    fn start(url: String, tool: &'static str) -> Traffic {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, done) = tokio::sync::watch::channel(0usize);
        let (s2, stop2) = (samples.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let c = client();
            while !stop2.load(Ordering::SeqCst) {
                let r = who(&c, &url, tool).await.map_err(|e| e.to_string());
                s2.lock().unwrap().push(Sample {
                    at: Instant::now(),
                    who: r,
                });
                tx.send_modify(|n| *n += 1);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Traffic {
            samples,
            stop,
            done,
            task,
        }
    }

    fn samples(&self) -> Vec<Sample> {
        self.samples.lock().unwrap().clone()
    }

    /// Wait until `n` calls after `since` were served by `name`.
    async fn served_by(&self, name: &str, since: Instant, n: usize, timeout: Duration) {
        wait_for(&format!("{n} calls served by {name}"), timeout, || async {
            let k = self
                .samples()
                .iter()
                .filter(|s| s.at >= since && s.who.as_deref() == Ok(name))
                .count();
            (k >= n).then_some(())
        })
        .await;
    }

    /// Wait for the end of the next call (the worker then pauses before the next one).
    async fn between_calls(&mut self) {
        self.done.borrow_and_update();
        self.done.changed().await.unwrap();
    }

    async fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap();
        self.samples.lock().unwrap().clone()
    }
}

fn priority_group_cfg(p: &str, b: &str) -> String {
    format!(
        "mcp_servers:\n  p:\n    mode: remote\n    endpoint: {p}\n    health_check_interval_s: 1\n    http: {{connect_timeout: 2.0, read_timeout: 5.0}}\n  b:\n    mode: remote\n    endpoint: {b}\n    health_check_interval_s: 1\n  g:\n    mode: group\n    strategy: priority\n    members:\n      - {{id: p, priority: 1}}\n      - {{id: b, priority: 2}}\n"
    )
}

#[tokio::test]
async fn acceptance_r04_priority_failover_under_steady_traffic_has_zero_failures_and_fails_back() {
    let mut p = FixtureHttp::start("p");
    let b = FixtureHttp::start("b");
    let p_port = port_of(&p.url);
    let node = Node::start(&priority_group_cfg(&p.url, &b.url));
    let c = client();
    let t_start = Instant::now();
    let mut traffic = Traffic::start(node.url("/mcp"), "g__whoami");
    traffic
        .served_by("p", t_start, 5, Duration::from_secs(20))
        .await;
    assert!(
        traffic
            .samples()
            .iter()
            .all(|s| s.who.as_deref() == Ok("p")),
        "the primary serves first: {:?}",
        traffic.samples()
    );

    // Kill the primary between two calls: the next call fails before it is sent and must
    // go to the backup inside the same request.
    traffic.between_calls().await;
    p.proc.kill9();
    let killed = Instant::now();
    traffic
        .served_by("b", killed, 10, Duration::from_secs(20))
        .await;
    let first_b = traffic
        .samples()
        .iter()
        .find(|s| s.at >= killed && s.who.is_ok())
        .map(|s| s.at - killed)
        .unwrap();
    eprintln!("failover: first successful call {first_b:?} after the primary died");
    let evs = events(&c, &node).await;
    assert!(
        !matching(
            &evs,
            "GroupMemberHealthChanged",
            &json!({"group_id": "g", "member_id": "p", "in_rotation": false})
        )
        .is_empty(),
        "{evs:?}"
    );

    // Restart the primary: it recovers (health checks / recovery) and serves again.
    let restarted = Instant::now();
    let _p2 = FixtureHttp::start_args("p", &["--listen", &format!("127.0.0.1:{p_port}")]);
    traffic
        .served_by("p", restarted, 5, Duration::from_secs(40))
        .await;
    let samples = traffic.finish().await;
    let failures: Vec<&Sample> = samples.iter().filter(|s| s.who.is_err()).collect();
    assert!(
        failures.is_empty(),
        "zero failed calls expected: {failures:?}"
    );
    assert!(
        !matching(
            &events(&c, &node).await,
            "GroupMemberHealthChanged",
            &json!({"group_id": "g", "member_id": "p", "in_rotation": true})
        )
        .is_empty()
    );
    // After failback the primary gets everything again.
    let last: Vec<_> = samples.iter().rev().take(3).collect();
    assert!(last.iter().all(|s| s.who.as_deref() == Ok("p")), "{last:?}");
}

// ---------------------------------------------------------------------------------------------
// R05 load balancing
// ---------------------------------------------------------------------------------------------

/// Names of the instances that served a `hangar_call` batch of `whoami` calls, in order.
async fn batch_whoami(
    c: &reqwest::Client,
    node: &Node,
    group: &str,
    n: usize,
    conc: u32,
) -> Vec<String> {
    let calls: Vec<Value> = (0..n)
        .map(|_| json!({"mcp_server": group, "tool": "whoami"}))
        .collect();
    let b = mgmt(
        c,
        node,
        "hangar_call",
        json!({"calls": calls, "max_concurrency": conc}),
    )
    .await;
    assert_eq!(b["succeeded"], n, "{b}");
    b["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let t = r["result"]["content"][0]["text"].as_str().unwrap();
            let v: Value = serde_json::from_str(t).unwrap();
            v["name"].as_str().unwrap().to_owned()
        })
        .collect()
}

#[tokio::test]
async fn acceptance_r05_round_robin_is_exactly_cyclic_and_skips_a_lost_member() {
    let m: Vec<FixtureHttp> = ["m1", "m2", "m3"]
        .iter()
        .map(|n| FixtureHttp::start(n))
        .collect();
    let mut cfg = "mcp_servers:\n".to_owned();
    for (i, f) in m.iter().enumerate() {
        cfg.push_str(&format!(
            "  m{}:\n    mode: remote\n    endpoint: {}\n",
            i + 1,
            f.url
        ));
    }
    cfg.push_str("  g:\n    mode: group\n    strategy: round_robin\n    members: [{id: m1}, {id: m2}, {id: m3}]\n");
    let node = Node::start(&cfg);
    let c = client();
    let url = node.url("/mcp");
    let mut order = Vec::new();
    for _ in 0..9 {
        order.push(who(&c, &url, "g__whoami").await.unwrap());
    }
    assert_eq!(
        order,
        ["m1", "m2", "m3", "m1", "m2", "m3", "m1", "m2", "m3"]
    );
    let mut m = m;
    m[2].proc.kill9();
    let mut after = Vec::new();
    for i in 0..6 {
        let w = who(&c, &url, "g__whoami").await;
        after.push(w.unwrap_or_else(|e| panic!("call {i} failed: {e}")));
    }
    assert!(after.iter().all(|n| n != "m3"), "{after:?}");
    assert!(
        after.contains(&"m1".to_owned()) && after.contains(&"m2".to_owned()),
        "{after:?}"
    );
    let (_, gv) = get_json(&c, &node.url("/api/groups/g")).await;
    let m3 = gv["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == "m3")
        .unwrap()
        .clone();
    assert_eq!(m3["in_rotation"], false, "{gv}");
    // With m3 out of rotation the two others alternate exactly.
    let mut rest = Vec::new();
    for _ in 0..4 {
        rest.push(who(&c, &url, "g__whoami").await.unwrap());
    }
    assert!(
        rest.windows(2).all(|w| w[0] != w[1]),
        "alternates m1/m2: {rest:?}"
    );
}

#[tokio::test]
async fn acceptance_r05_weighted_round_robin_random_and_least_connections() {
    let fixture = bin("hangar-fixture").display().to_string();
    let cfg = format!(
        "mcp_servers:\n  a:\n    command: [\"{fixture}\", stdio, --name, a]\n  b:\n    command: [\"{fixture}\", stdio, --name, b]\n  wrr:\n    mode: group\n    strategy: weighted_round_robin\n    members: [{{id: a, weight: 80}}, {{id: b, weight: 20}}]\n  rnd:\n    mode: group\n    strategy: random\n    members: [{{id: a, weight: 70}}, {{id: b, weight: 30}}]\n  lc:\n    mode: group\n    strategy: least_connections\n    members: [{{id: a}}, {{id: b}}]\n"
    );
    let node = Node::start(&cfg);
    let c = client();
    let url = node.url("/mcp");

    // Smooth WRR: exactly 80/20 over 100 sequential calls, interleaved (the 4:1 cycle is
    // a a b a a, so at most 4 heavy picks in a row across cycles).
    let picks = batch_whoami(&c, &node, "wrr", 100, 1).await;
    assert_eq!(picks.iter().filter(|n| *n == "a").count(), 80, "{picks:?}");
    let mut run = 0;
    let mut max_run = 0;
    for p in &picks {
        run = if p == "a" { run + 1 } else { 0 };
        max_run = max_run.max(run);
    }
    assert!(max_run <= 4, "interleaved: {picks:?}");

    // Weighted random: 70/30 within ±5 % over 1000 calls.
    let mut a = 0;
    for _ in 0..10 {
        a += batch_whoami(&c, &node, "rnd", 100, 50)
            .await
            .iter()
            .filter(|n| *n == "a")
            .count();
    }
    assert!(
        (650..=750).contains(&a),
        "random 70/30: a served {a} of 1000"
    );

    // least_connections counts true in-flight requests: while a slow call holds one member,
    // every other call goes to the other member (round robin would alternate).
    who(&c, &url, "lc__whoami").await.unwrap();
    let slow = {
        let c = c.clone();
        let url = url.clone();
        tokio::spawn(async move { call_tool(&c, &url, "lc__slow", json!({"ms": 4000})).await })
    };
    let busy_free = wait_for(
        "calls to avoid the busy member",
        Duration::from_secs(3),
        || async {
            let mut names = Vec::new();
            for _ in 0..5 {
                names.push(who(&c, &url, "lc__whoami").await.unwrap());
            }
            names
                .windows(2)
                .all(|w| w[0] == w[1])
                .then(|| names[0].clone())
        },
    )
    .await;
    for _ in 0..10 {
        assert_eq!(who(&c, &url, "lc__whoami").await.unwrap(), busy_free);
    }
    assert!(!slow.is_finished(), "the slow call is still in flight");
    let r = slow.await.unwrap();
    assert_eq!(text_of(&r), "slept 4000ms");
    // Nothing in flight any more: both members serve again.
    let mut names = Vec::new();
    for _ in 0..4 {
        names.push(who(&c, &url, "lc__whoami").await.unwrap());
    }
    assert!(
        names.contains(&"a".to_owned()) && names.contains(&"b".to_owned()),
        "{names:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// R09 subprocess servers, idle TTL, logs
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn acceptance_r09_subprocess_status_idle_ttl_events_and_logs() {
    let node = Node::start(&format!(
        "mcp_servers:\n{}",
        fixture_stdio_yaml(
            "math",
            "    idle_ttl_s: 2\n    env: {PYTHONUNBUFFERED: \"1\"}\n"
        )
    ));
    let c = client();
    let row = |s: &Value| {
        s["mcp_servers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == "math")
            .cloned()
            .unwrap()
    };
    let s = mgmt(&c, &node, "hangar_status", json!({})).await;
    assert_eq!(row(&s)["state"], "cold", "{s}");
    assert_eq!(row(&s)["indicator"], "[COLD]");
    let b = mgmt(
        &c,
        &node,
        "hangar_call",
        json!({"calls": [{"mcp_server": "math", "tool": "add", "arguments": {"a": 1, "b": 2}}]}),
    )
    .await;
    assert_eq!(
        b["results"][0]["result"]["structuredContent"],
        json!({"result": 3.0}),
        "{b}"
    );
    let s = mgmt(&c, &node, "hangar_status", json!({})).await;
    assert_eq!(row(&s)["state"], "ready", "{s}");
    assert_eq!(row(&s)["indicator"], "[READY]");
    let l = mgmt(&c, &node, "hangar_list", json!({"state_filter": "ready"})).await;
    assert_eq!(l["mcp_servers"][0]["mcp_server"], "math", "{l}");
    assert!(l["mcp_servers"][0]["tools_count"].as_u64().unwrap() >= 5);
    let pid = pid_of(&c, &node, "math").await;

    wait_for("idle stop", Duration::from_secs(15), || async {
        (state_of(&c, &node, "math").await == "cold").then_some(())
    })
    .await;
    wait_for(
        "the idle child to exit",
        Duration::from_secs(10),
        || async { (!pid_alive(pid)).then_some(()) },
    )
    .await;
    let s = mgmt(&c, &node, "hangar_status", json!({})).await;
    assert_eq!(row(&s)["indicator"], "[COLD]", "{s}");
    let evs = events(&c, &node).await;
    let idle = evs
        .iter()
        .position(|e| {
            e["event_type"] == "McpServerIdleDetected" && e["data"]["mcp_server_id"] == "math"
        })
        .expect("McpServerIdleDetected");
    let stopped = evs
        .iter()
        .position(|e| {
            e["event_type"] == "McpServerStopped"
                && e["data"]["mcp_server_id"] == "math"
                && e["data"]["reason"] == "idle"
        })
        .expect("McpServerStopped{reason: idle}");
    assert!(idle < stopped, "IdleDetected precedes Stopped");
    assert!(evs[idle]["data"]["idle_duration_s"].as_f64().unwrap() >= 2.0);
    assert!(
        metrics(&c, &node)
            .await
            .contains(r#"mcp_hangar_mcp_server_stops_total{mcp_server="math",reason="idle"} 1"#)
    );

    // The captured stderr of the stopped process is still served.
    let (st, logs) = get_json(&c, &node.url("/api/mcp_servers/math/logs?lines=50")).await;
    assert_eq!(st, 200);
    let lines: Vec<&str> = logs["logs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["line"].as_str().unwrap())
        .collect();
    assert!(
        lines.iter().any(|l| l.contains("fixture math: tools/call")),
        "{lines:?}"
    );
    assert!(logs["count"].as_u64().unwrap() <= 50);
    let (st, _) = get_json(&c, &node.url("/api/mcp_servers/math/logs?lines=0")).await;
    assert_eq!(st, 422);
}

// ---------------------------------------------------------------------------------------------
// Checklist: cold start, recovery after killing every upstream
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn acceptance_cold_start_of_ten_concurrent_batch_calls_starts_once() {
    let node = Node::start(&format!("mcp_servers:\n{}", fixture_stdio_yaml("fx", "")));
    let c = client();
    let calls: Vec<Value> = (0..10)
        .map(|i| json!({"mcp_server": "fx", "tool": "echo", "arguments": {"message": format!("m{i}")}}))
        .collect();
    let b = mgmt(
        &c,
        &node,
        "hangar_call",
        json!({"calls": calls, "max_concurrency": 10}),
    )
    .await;
    assert_eq!(b["succeeded"], 10, "{b}");
    for (i, r) in b["results"].as_array().unwrap().iter().enumerate() {
        assert_eq!(r["index"], i);
        assert_eq!(r["result"]["content"][0]["text"], format!("m{i}"));
    }
    let m = metrics(&c, &node).await;
    assert!(
        m.contains(r#"mcp_hangar_mcp_server_starts_total{mcp_server="fx",result="success"} 1"#),
        "{m}"
    );
    assert!(
        m.lines().any(
            |l| l.starts_with("mcp_hangar_mcp_server_cold_start_seconds_count{")
                && l.contains(r#"mcp_server="fx""#)
                && l.ends_with(" 1")
        ),
        "{m}"
    );
}

#[tokio::test]
async fn acceptance_killing_every_upstream_process_recovers_without_an_operator() {
    let fixture = bin("hangar-fixture").display().to_string();
    let node = Node::start(&format!(
        "mcp_servers:\n{}{}{}  g:\n    mode: group\n    members:\n      - {{id: m, command: [\"{fixture}\", stdio, --name, m]}}\n",
        fixture_stdio_yaml("s1", ""),
        fixture_stdio_yaml("s2", ""),
        fixture_stdio_yaml("s3", ""),
    ));
    let c = client();
    let url = node.url("/mcp");
    let ids = ["s1", "s2", "s3", "m"];
    for t in ["s1__whoami", "s2__whoami", "s3__whoami", "g__whoami"] {
        who(&c, &url, t).await.unwrap();
    }
    let mut pids = Vec::new();
    for id in ids {
        pids.push(pid_of(&c, &node, id).await);
    }
    for pid in &pids {
        kill9(*pid);
    }
    wait_for("every child gone", Duration::from_secs(10), || async {
        pids.iter().all(|p| !pid_alive(*p)).then_some(())
    })
    .await;
    for (t, name) in [
        ("s1__whoami", "s1"),
        ("s2__whoami", "s2"),
        ("s3__whoami", "s3"),
        ("g__whoami", "m"),
    ] {
        assert_eq!(who(&c, &url, t).await.unwrap(), name);
    }
    for (id, old) in ids.iter().zip(&pids) {
        assert_eq!(state_of(&c, &node, id).await, "ready");
        assert_ne!(pid_of(&c, &node, id).await, *old, "{id} runs a new process");
    }
}

// ---------------------------------------------------------------------------------------------
// Checklist: config reload (a)–(g)
// ---------------------------------------------------------------------------------------------

fn reloaded_by<'a>(evs: &'a [Value], by: &str) -> Vec<&'a Value> {
    matching(evs, "ConfigurationReloaded", &json!({ "requested_by": by }))
}

#[tokio::test]
async fn acceptance_reload_via_file_watch_adds_changes_removes_and_survives_invalid_files() {
    let base = |chg_env: &str, with_gone: bool, extra: &str| {
        format!(
            "mcp_servers:\n{}{}{}{}",
            fixture_stdio_yaml("fx", ""),
            fixture_stdio_yaml("chg", &format!("    env: {{MARK: {chg_env}}}\n")),
            if with_gone {
                fixture_stdio_yaml("gone", "")
            } else {
                String::new()
            },
            extra
        )
    };
    let node = Node::start(&base("v1", true, ""));
    let c = client();
    let url = node.url("/mcp");
    for t in ["fx__whoami", "chg__whoami", "gone__whoami"] {
        who(&c, &url, t).await.unwrap();
    }
    let fx_pid = pid_of(&c, &node, "fx").await;
    let chg_pid = pid_of(&c, &node, "chg").await;
    let gone_pid = pid_of(&c, &node, "gone").await;

    // (a) added → appears COLD.
    node.write_config(&base("v1", true, &fixture_stdio_yaml("new1", "")));
    wait_for("new1 to appear", Duration::from_secs(10), || async {
        (state_of(&c, &node, "new1").await == "cold").then_some(())
    })
    .await;
    let evs = events(&c, &node).await;
    let r = reloaded_by(&evs, "file_watcher");
    assert_eq!(r.len(), 1, "{evs:?}");
    assert_eq!(r[0]["data"]["mcp_servers_added"], json!(["new1"]));

    // (b) changed → old process stopped, new definition COLD, next call runs it.
    // (c) removed → stopped and gone. Both in one edit.
    node.write_config(&base("v2", false, &fixture_stdio_yaml("new1", "")));
    wait_for("gone to be removed", Duration::from_secs(10), || async {
        let (s, _) = get_json(&c, &node.url("/api/mcp_servers/gone")).await;
        (s == 404).then_some(())
    })
    .await;
    wait_for("old processes to stop", Duration::from_secs(10), || async {
        (!pid_alive(gone_pid) && !pid_alive(chg_pid)).then_some(())
    })
    .await;
    assert_eq!(state_of(&c, &node, "chg").await, "cold");
    assert_eq!(
        text_of(&call_tool(&c, &url, "chg__env", json!({"name": "MARK"})).await),
        "v2"
    );
    let evs = events(&c, &node).await;
    let r = reloaded_by(&evs, "file_watcher");
    assert_eq!(r.len(), 2, "{evs:?}");
    assert_eq!(r[1]["data"]["mcp_servers_updated"], json!(["chg"]));
    assert_eq!(r[1]["data"]["mcp_servers_removed"], json!(["gone"]));
    let unchanged = r[1]["data"]["mcp_servers_unchanged"].as_array().unwrap();
    assert!(unchanged.contains(&json!("fx")), "{unchanged:?}");
    // Unchanged: same process, never restarted.
    assert_eq!(pid_of(&c, &node, "fx").await, fx_pid);
    let (_, fx) = get_json(&c, &node.url("/api/mcp_servers/fx")).await;
    assert_eq!(fx["health"]["starts"], 1, "{fx}");

    // (d) invalid → reported, previous configuration keeps serving.
    node.write_config("mcp_servers:\n  broken: {mode: subprocess}\n");
    wait_for(
        "ConfigurationReloadFailed",
        Duration::from_secs(10),
        || async {
            (!matching(
                &events(&c, &node).await,
                "ConfigurationReloadFailed",
                &json!({"requested_by": "file_watcher"}),
            )
            .is_empty())
            .then_some(())
        },
    )
    .await;
    assert_eq!(
        text_of(&call_tool(&c, &url, "fx__echo", json!({"message": "still"})).await),
        "still"
    );
    assert_eq!(pid_of(&c, &node, "fx").await, fx_pid);
    assert_eq!(state_of(&c, &node, "new1").await, "cold");
}

#[tokio::test]
async fn acceptance_reload_via_sighup_api_and_tool_keeps_unchanged_connections() {
    let web = FixtureHttp::start("web");
    let head = format!(
        "config_reload: {{enabled: false}}\nmcp_servers:\n  web:\n    mode: remote\n    endpoint: {}\n{}",
        web.url,
        fixture_stdio_yaml("fx", "")
    );
    let node = Node::start(&head);
    let c = client();
    let url = node.url("/mcp");
    assert_eq!(
        text_of(&call_tool(&c, &url, "web__echo", json!({"message": "1"})).await),
        "1"
    );
    let fx_pid = {
        who(&c, &url, "fx__whoami").await.unwrap();
        pid_of(&c, &node, "fx").await
    };
    let inits = || async {
        let (_, s) = get_json(&c, &format!("{}/admin/stats", base_of(&web.url))).await;
        s["counts"]["initialize"].as_u64().unwrap_or(0)
    };
    assert_eq!(inits().await, 1);

    // (e) SIGHUP.
    node.write_config(&format!("{head}{}", fixture_stdio_yaml("hup", "")));
    let _ = std::process::Command::new("kill")
        .args(["-s", "HUP", &node.proc.pid().to_string()])
        .status();
    wait_for("the SIGHUP reload", Duration::from_secs(10), || async {
        let evs = events(&c, &node).await;
        (!reloaded_by(&evs, "sighup").is_empty()).then_some(())
    })
    .await;
    assert_eq!(state_of(&c, &node, "hup").await, "cold");
    let evs = events(&c, &node).await;
    assert_eq!(
        reloaded_by(&evs, "sighup")[0]["data"]["mcp_servers_added"],
        json!(["hup"])
    );
    assert!(
        !matching(
            &evs,
            "ConfigurationReloadRequested",
            &json!({"requested_by": "sighup"})
        )
        .is_empty()
    );

    // (f) POST /api/config/reload.
    node.write_config(&format!("{head}{}", fixture_stdio_yaml("api", "")));
    let r = c.post(node.url("/api/config/reload")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(v["status"], "success", "{v}");
    assert_eq!(v["added"], json!(["api"]), "{v}");
    assert_eq!(v["removed"], json!(["hup"]), "{v}");
    assert!(
        !reloaded_by(&events(&c, &node).await, "api").is_empty(),
        "ConfigurationReloaded{{requested_by: api}}"
    );

    // (g) hangar_reload_config, valid then invalid.
    node.write_config(&head);
    let v = mgmt(&c, &node, "hangar_reload_config", json!({"graceful": true})).await;
    assert_eq!(v["status"], "success", "{v}");
    assert_eq!(v["mcp_servers_removed"], json!(["api"]), "{v}");
    assert_eq!(v["mcp_servers_added"], json!([]), "{v}");
    let mut unchanged: Vec<&str> = v["mcp_servers_unchanged"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    unchanged.sort_unstable();
    assert_eq!(unchanged, ["fx", "web"], "{v}");
    assert!(v["duration_ms"].is_u64(), "{v}");
    assert!(v["message"].is_string(), "{v}");
    assert!(!reloaded_by(&events(&c, &node).await, "tool").is_empty());

    node.write_config("mcp_servers: [\n");
    let v = mgmt(&c, &node, "hangar_reload_config", json!({})).await;
    assert_eq!(v["isError"], true, "{v}");
    assert_eq!(v["status"], "failed", "{v}");
    assert_eq!(v["error_type"], "ConfigurationReloadFailed", "{v}");
    let r = c.post(node.url("/api/config/reload")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 422);
    let e: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(e["error"]["code"], "ConfigurationReloadFailed", "{e}");
    let _ = std::process::Command::new("kill")
        .args(["-s", "HUP", &node.proc.pid().to_string()])
        .status();
    wait_for(
        "the failed SIGHUP reload event",
        Duration::from_secs(10),
        || async {
            (!matching(
                &events(&c, &node).await,
                "ConfigurationReloadFailed",
                &json!({"requested_by": "sighup"}),
            )
            .is_empty())
            .then_some(())
        },
    )
    .await;

    // Unchanged servers kept their process and their upstream connection throughout.
    assert_eq!(pid_of(&c, &node, "fx").await, fx_pid);
    assert_eq!(
        text_of(&call_tool(&c, &url, "web__echo", json!({"message": "2"})).await),
        "2"
    );
    assert_eq!(
        inits().await,
        1,
        "no new upstream session for the unchanged server"
    );
}

// ---------------------------------------------------------------------------------------------
// Management tools (inventory §4.3)
// ---------------------------------------------------------------------------------------------

fn keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .map(String::as_str)
        .collect();
    k.sort_unstable();
    k
}

fn has_keys(v: &Value, want: &[&str]) {
    let k = keys(v);
    for w in want {
        assert!(k.contains(w), "missing '{w}' in {v}");
    }
}

#[tokio::test]
async fn acceptance_management_tools_argument_and_result_shapes() {
    let node = Node::start(&format!(
        "mcp_servers:\n{}{}  g:\n    mode: group\n    strategy: round_robin\n    description: the group\n    members: [{{id: fx, weight: 3, priority: 2}}, {{id: fy}}]\n",
        fixture_stdio_yaml("fx", "    description: first\n"),
        fixture_stdio_yaml("fy", "")
    ));
    let c = client();
    let url = node.url("/mcp");
    let list = rpc(&c, &url, "tools/list", json!({})).await.response();
    let names: Vec<&str> = list["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    for t in [
        "hangar_list",
        "hangar_status",
        "hangar_details",
        "hangar_tools",
        "hangar_health",
        "hangar_start",
        "hangar_stop",
        "hangar_warm",
        "hangar_group_list",
        "hangar_group_rebalance",
        "hangar_reload_config",
        "hangar_call",
    ] {
        assert!(names.contains(&t), "{t} missing from {names:?}");
    }

    // hangar_list
    let v = mgmt(&c, &node, "hangar_list", json!({})).await;
    has_keys(&v, &["mcp_servers", "groups", "runtime_mcp_servers"]);
    let fx = v["mcp_servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["mcp_server"] == "fx")
        .unwrap();
    has_keys(
        fx,
        &[
            "mcp_server",
            "state",
            "mode",
            "alive",
            "tools_count",
            "health_status",
            "tools_predefined",
            "description",
        ],
    );
    assert_eq!(fx["mode"], "subprocess");
    assert_eq!(fx["description"], "first");
    has_keys(
        &v["groups"][0],
        &[
            "group_id",
            "state",
            "strategy",
            "healthy_count",
            "total_members",
        ],
    );
    assert_eq!(v["groups"][0]["total_members"], 2);
    let v = mgmt(&c, &node, "hangar_list", json!({"state_filter": "bogus"})).await;
    assert_eq!(v["isError"], true, "{v}");

    // hangar_start / hangar_tools / hangar_details
    let v = mgmt(&c, &node, "hangar_start", json!({"mcp_server": "fx"})).await;
    assert_eq!(v["mcp_server"], "fx");
    assert_eq!(v["state"], "ready");
    assert!(
        v["tools"].as_array().unwrap().contains(&json!("echo")),
        "{v}"
    );
    let v = mgmt(&c, &node, "hangar_start", json!({"mcp_server": "nope"})).await;
    assert_eq!(v["isError"], true);
    assert!(
        v["text"]
            .as_str()
            .unwrap()
            .contains("unknown_mcp_server: nope")
    );
    let v = mgmt(&c, &node, "hangar_start", json!({"mcp_server": "g"})).await;
    has_keys(
        &v,
        &[
            "group",
            "state",
            "members_started",
            "healthy_count",
            "total_members",
        ],
    );
    assert_eq!(v["members_started"], 2, "{v}");
    assert_eq!(v["state"], "healthy", "{v}");

    let v = mgmt(&c, &node, "hangar_tools", json!({"mcp_server": "fx"})).await;
    assert_eq!(v["mcp_server"], "fx");
    let echo = v["tools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "echo")
        .unwrap();
    has_keys(echo, &["name", "description", "inputSchema"]);
    let v = mgmt(&c, &node, "hangar_tools", json!({"mcp_server": "g"})).await;
    assert_eq!(v["group"], true, "{v}");

    let v = mgmt(&c, &node, "hangar_details", json!({"mcp_server": "fx"})).await;
    has_keys(
        &v,
        &[
            "mcp_server",
            "state",
            "mode",
            "alive",
            "tools",
            "health",
            "idle_time",
            "meta",
        ],
    );
    has_keys(&v["health"], &["consecutive_failures"]);
    let v = mgmt(&c, &node, "hangar_details", json!({"mcp_server": "g"})).await;
    has_keys(
        &v,
        &[
            "strategy",
            "min_healthy",
            "healthy_count",
            "total_members",
            "is_available",
            "circuit_open",
            "members",
        ],
    );
    let fxm = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "fx")
        .unwrap();
    has_keys(
        fxm,
        &[
            "id",
            "state",
            "in_rotation",
            "weight",
            "priority",
            "consecutive_failures",
        ],
    );
    assert_eq!(fxm["weight"], 3);
    assert_eq!(fxm["priority"], 2);
    let v = mgmt(&c, &node, "hangar_details", json!({"mcp_server": "nope"})).await;
    assert_eq!(v["isError"], true);

    // hangar_status / hangar_health / hangar_group_list / rebalance
    let v = mgmt(&c, &node, "hangar_status", json!({})).await;
    has_keys(
        &v,
        &[
            "mcp_servers",
            "groups",
            "runtime_mcp_servers",
            "summary",
            "formatted",
        ],
    );
    has_keys(
        &v["summary"],
        &[
            "healthy_mcp_servers",
            "total_mcp_servers",
            "uptime",
            "uptime_seconds",
        ],
    );
    has_keys(
        &v["mcp_servers"][0],
        &["id", "indicator", "state", "mode", "last_used"],
    );
    assert!(
        v["formatted"].as_str().unwrap().contains("[READY] fx"),
        "{v}"
    );
    let v = mgmt(&c, &node, "hangar_health", json!({})).await;
    has_keys(&v, &["status", "mcp_servers", "groups", "security"]);
    assert_eq!(v["mcp_servers"]["by_state"]["ready"], 2, "{v}");
    has_keys(
        &v["groups"],
        &["total", "by_state", "total_members", "healthy_members"],
    );
    assert_eq!(v["groups"]["healthy_members"], 2, "{v}");
    let v = mgmt(&c, &node, "hangar_group_list", json!({})).await;
    has_keys(
        &v["groups"][0],
        &[
            "group_id",
            "description",
            "state",
            "strategy",
            "min_healthy",
            "healthy_count",
            "total_members",
            "is_available",
            "circuit_open",
            "members",
        ],
    );
    assert_eq!(v["groups"][0]["description"], "the group");
    let v = mgmt(&c, &node, "hangar_group_rebalance", json!({"group": "g"})).await;
    has_keys(
        &v,
        &[
            "group_id",
            "state",
            "healthy_count",
            "total_members",
            "members_in_rotation",
        ],
    );
    assert_eq!(v["members_in_rotation"], json!(["fx", "fy"]));
    let v = mgmt(
        &c,
        &node,
        "hangar_group_rebalance",
        json!({"group": "nope"}),
    )
    .await;
    assert!(v["text"].as_str().unwrap().contains("unknown_group: nope"));

    // hangar_stop / hangar_warm
    let v = mgmt(&c, &node, "hangar_stop", json!({"mcp_server": "fx"})).await;
    assert_eq!(v["stopped"], "fx", "{v}");
    assert!(v["reason"].is_string());
    let v = mgmt(
        &c,
        &node,
        "hangar_warm",
        json!({"mcp_servers": "fx,fy,nope"}),
    )
    .await;
    assert_eq!(v["warmed"], json!(["fx"]), "{v}");
    assert_eq!(v["already_warm"], json!(["fy"]), "{v}");
    assert_eq!(v["failed"][0]["id"], "nope", "{v}");
    assert!(v["summary"].is_string());
    let v = mgmt(&c, &node, "hangar_stop", json!({"mcp_server": "g"})).await;
    assert_eq!(v["group"], "g", "{v}");
    assert_eq!(v["stopped"], true, "{v}");
    assert_eq!(state_of(&c, &node, "fy").await, "cold");

    // hangar_call: validation
    let many: Vec<Value> = (0..101)
        .map(|_| json!({"mcp_server": "fx", "tool": "echo"}))
        .collect();
    let v = mgmt(&c, &node, "hangar_call", json!({ "calls": many })).await;
    assert_eq!(v["isError"], true);
    assert_eq!(v["validation_errors"][0]["field"], "calls", "{v}");
    let v = mgmt(
        &c,
        &node,
        "hangar_call",
        json!({"calls": [{"mcp_server": "fx"}], "max_concurrency": 51, "timeout": 0.5, "max_attempts": 11}),
    )
    .await;
    let fields: Vec<(Value, &str)> = v["validation_errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["index"].clone(), e["field"].as_str().unwrap()))
        .collect();
    for want in [
        (Value::Null, "max_concurrency"),
        (Value::Null, "timeout"),
        (Value::Null, "max_attempts"),
        (json!(0), "tool"),
    ] {
        assert!(fields.contains(&want), "{want:?} not in {fields:?}");
    }
    let v = mgmt(&c, &node, "hangar_call", json!({"calls": []})).await;
    assert_eq!(v["validation_errors"][0]["field"], "calls", "{v}");

    // hangar_call: per-call outcomes and error types
    let v = mgmt(
        &c,
        &node,
        "hangar_call",
        json!({"max_concurrency": 3, "calls": [
            {"mcp_server": "fx", "tool": "add", "arguments": {"a": 1, "b": 2}},
            {"mcp_server": "nope", "tool": "echo", "arguments": {"message": "x"}},
            {"mcp_server": "fx", "tool": "no_such_tool"},
            {"mcp_server": "fx", "tool": "fail"},
            {"mcp_server": "fx", "tool": "slow", "arguments": {"ms": 3000}, "timeout": 0.3},
            {"mcp_server": "g", "tool": "echo", "arguments": {"message": "via group"}}
        ]}),
    )
    .await;
    has_keys(
        &v,
        &[
            "batch_id",
            "success",
            "total",
            "succeeded",
            "failed",
            "elapsed_ms",
            "results",
        ],
    );
    assert_eq!(v["total"], 6);
    assert_eq!(v["succeeded"], 2, "{v}");
    assert_eq!(v["failed"], 4);
    assert_eq!(v["success"], false);
    let res = v["results"].as_array().unwrap();
    for (i, r) in res.iter().enumerate() {
        has_keys(
            r,
            &[
                "index",
                "call_id",
                "success",
                "result",
                "error",
                "error_type",
                "elapsed_ms",
            ],
        );
        assert_eq!(r["index"], i);
    }
    assert_eq!(res[0]["result"]["content"][0]["text"], "3");
    assert_eq!(res[1]["error_type"], "McpServerNotFoundError", "{}", res[1]);
    assert_eq!(res[2]["error_type"], "ToolNotFoundError", "{}", res[2]);
    assert_eq!(res[3]["error_type"], "ToolInvocationError", "{}", res[3]);
    assert_eq!(res[4]["error_type"], "TimeoutError", "{}", res[4]);
    assert_eq!(res[5]["result"]["content"][0]["text"], "via group");

    // max_attempts retries and reports it; fail_fast cancels the rest; max_concurrency 1
    // runs calls one after another; the batch timeout bounds everything.
    let v = mgmt(
        &c,
        &node,
        "hangar_call",
        json!({"max_attempts": 3, "calls": [{"mcp_server": "fx", "tool": "fail"}]}),
    )
    .await;
    assert_eq!(
        v["results"][0]["retry_metadata"],
        json!({"attempts": 3, "retries": 2}),
        "{v}"
    );
    let v = mgmt(
        &c,
        &node,
        "hangar_call",
        json!({"fail_fast": true, "max_concurrency": 1, "calls": [
            {"mcp_server": "fx", "tool": "fail"},
            {"mcp_server": "fx", "tool": "echo", "arguments": {"message": "a"}},
            {"mcp_server": "fx", "tool": "echo", "arguments": {"message": "b"}}]}),
    )
    .await;
    assert_eq!(v["results"][1]["error_type"], "CancellationError", "{v}");
    assert_eq!(v["results"][2]["error_type"], "CancellationError", "{v}");
    let v = mgmt(
        &c,
        &node,
        "hangar_call",
        json!({"max_concurrency": 1, "calls": [
            {"mcp_server": "fx", "tool": "slow", "arguments": {"ms": 200}},
            {"mcp_server": "fx", "tool": "slow", "arguments": {"ms": 200}},
            {"mcp_server": "fx", "tool": "slow", "arguments": {"ms": 200}}]}),
    )
    .await;
    assert_eq!(v["succeeded"], 3, "{v}");
    assert!(v["elapsed_ms"].as_u64().unwrap() >= 600, "sequential: {v}");
    let v = mgmt(
        &c,
        &node,
        "hangar_call",
        json!({"timeout": 1, "calls": [{"mcp_server": "fx", "tool": "slow", "arguments": {"ms": 5000}}]}),
    )
    .await;
    assert_eq!(v["results"][0]["error_type"], "TimeoutError", "{v}");
    assert_eq!(v["results"][0]["error"], "Global timeout exceeded", "{v}");
}

// ---------------------------------------------------------------------------------------------
// REST /api/groups
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn acceptance_rest_groups_list_get_create_members_rebalance_delete() {
    let node = Node::start(&format!(
        "mcp_servers:\n{}{}  g:\n    mode: group\n    members: [{{id: a}}]\n",
        fixture_stdio_yaml("a", ""),
        fixture_stdio_yaml("b", "")
    ));
    let c = client();
    let url = node.url("/mcp");
    let post = |path: &str, body: Value| {
        let c = c.clone();
        let u = node.url(path);
        async move {
            let r = c
                .post(u)
                .header("Content-Type", "application/json")
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            let s = r.status().as_u16();
            (
                s,
                serde_json::from_str::<Value>(&r.text().await.unwrap()).unwrap_or(Value::Null),
            )
        }
    };
    let delete = |path: &str| {
        let c = c.clone();
        let u = node.url(path);
        async move {
            let r = c.delete(u).send().await.unwrap();
            let s = r.status().as_u16();
            (
                s,
                serde_json::from_str::<Value>(&r.text().await.unwrap()).unwrap_or(Value::Null),
            )
        }
    };

    let (s, v) = get_json(&c, &node.url("/api/groups/")).await;
    assert_eq!(s, 200);
    has_keys(
        &v["groups"][0],
        &[
            "group_id",
            "state",
            "strategy",
            "min_healthy",
            "healthy_count",
            "total_members",
            "circuit_breaker_state",
            "members",
        ],
    );
    let (s, v) = get_json(&c, &node.url("/api/groups/g")).await;
    assert_eq!(s, 200);
    assert_eq!(v["circuit_breaker_state"], "closed");
    let (s, v) = get_json(&c, &node.url("/api/groups/nope")).await;
    assert_eq!(s, 404);
    assert_eq!(v["error"]["code"], "GroupNotFoundError", "{v}");

    // create, then route through it
    let (s, v) = post(
        "/api/groups/",
        json!({"group_id": "ng", "strategy": "round_robin", "members": [{"id": "a"}]}),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let (s, _) = post(
        "/api/groups/",
        json!({"group_id": "ng", "members": [{"id": "a"}]}),
    )
    .await;
    assert_eq!(s, 409, "a duplicate id is refused");
    let (s, v) = post(
        "/api/groups/",
        json!({"group_id": "bad", "strategy": "bogus", "members": [{"id": "a"}]}),
    )
    .await;
    assert_eq!(s, 422, "{v}");
    assert_eq!(who(&c, &url, "ng__whoami").await.unwrap(), "a");

    // members
    let (s, v) = post(
        "/api/groups/ng/members",
        json!({"member_id": "b", "weight": 2}),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let (s, _) = post("/api/groups/ng/members", json!({"member_id": "b"})).await;
    assert_eq!(s, 409);
    let (s, _) = post("/api/groups/ng/members", json!({"member_id": "nope"})).await;
    assert_eq!(s, 422);
    let (s, v) = get_json(&c, &node.url("/api/groups/ng/members")).await;
    assert_eq!(s, 200);
    let ids: Vec<&str> = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a", "b"]);
    let mut served = Vec::new();
    for _ in 0..4 {
        served.push(who(&c, &url, "ng__whoami").await.unwrap());
    }
    assert!(
        served.contains(&"a".to_owned()) && served.contains(&"b".to_owned()),
        "{served:?}"
    );
    let (s, _) = delete("/api/groups/ng/members/b").await;
    assert_eq!(s, 200);
    let (s, _) = delete("/api/groups/ng/members/b").await;
    assert_eq!(s, 404);
    for _ in 0..3 {
        assert_eq!(who(&c, &url, "ng__whoami").await.unwrap(), "a");
    }

    // rebalance, delete
    let (s, v) = post("/api/groups/ng/rebalance", json!({})).await;
    assert_eq!(s, 200, "{v}");
    let (s, _) = post("/api/groups/nope/rebalance", json!({})).await;
    assert_eq!(s, 404);
    let (s, v) = delete("/api/groups/ng").await;
    assert_eq!(s, 200, "{v}");
    let (s, _) = get_json(&c, &node.url("/api/groups/ng")).await;
    assert_eq!(s, 404);
    let r = call_tool(&c, &url, "ng__whoami", json!({})).await;
    assert!(r["error"].is_object(), "{r}");
    let (s, _) = delete("/api/groups/ng").await;
    assert_eq!(s, 404);
}

// ---------------------------------------------------------------------------------------------
// Graceful shutdown
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acceptance_sigterm_finishes_in_flight_calls_exits_0_and_leaves_no_orphans() {
    let mut node = Node::start(&format!(
        "mcp_servers:\n{}{}",
        fixture_stdio_yaml("fx", ""),
        fixture_stdio_yaml("fy", "")
    ));
    let c = client();
    let url = node.url("/mcp");
    who(&c, &url, "fy__whoami").await.unwrap();
    let fy_pid = pid_of(&c, &node, "fy").await;
    let call = {
        let c = c.clone();
        let url = url.clone();
        tokio::spawn(async move { call_tool(&c, &url, "fx__slow", json!({"ms": 1500})).await })
    };
    // Wait until the slow call reached the upstream (the fixture logs each request).
    wait_for(
        "the slow call in flight",
        Duration::from_secs(15),
        || async {
            let (_, l) = get_json(&c, &node.url("/api/mcp_servers/fx/logs?lines=100")).await;
            l["logs"]
                .as_array()?
                .iter()
                .any(|x| x["line"].as_str().unwrap_or("").contains("tools/call"))
                .then_some(())
        },
    )
    .await;
    let fx_pid = pid_of(&c, &node, "fx").await;
    let code = node.proc.terminate();
    let r = call.await.unwrap();
    assert_eq!(text_of(&r), "slept 1500ms", "{r}");
    assert_eq!(code, Some(0), "exit 0:\n{}", node.proc.stderr());
    wait_for("every child to stop", Duration::from_secs(10), || async {
        (!pid_alive(fx_pid) && !pid_alive(fy_pid)).then_some(())
    })
    .await;
    assert!(
        node.proc
            .stderr()
            .contains("server_lifecycle_shutdown_complete")
    );
}

// ---------------------------------------------------------------------------------------------
// Measurement (not an assertion): member death → group routing around it
// ---------------------------------------------------------------------------------------------

#[tokio::test]
#[ignore = "measurement; run with --ignored --nocapture"]
async fn measure_failover_time_from_member_death_to_routing_around_it() {
    let mut p = FixtureHttp::start("p");
    let b = FixtureHttp::start("b");
    let p_port = port_of(&p.url);
    let node = Node::start(&priority_group_cfg(&p.url, &b.url));
    let c = client();
    let url = node.url("/mcp");
    let mut first = Vec::new();
    let mut out_of_rotation = Vec::new();
    for round in 0..3 {
        wait_for("p serving", Duration::from_secs(40), || async {
            (who(&c, &url, "g__whoami").await.ok()? == "p").then_some(())
        })
        .await;
        p.proc.kill9();
        let t0 = Instant::now();
        assert_eq!(who(&c, &url, "g__whoami").await.unwrap(), "b");
        first.push(t0.elapsed());
        assert_eq!(who(&c, &url, "g__whoami").await.unwrap(), "b");
        out_of_rotation.push(t0.elapsed());
        let t1 = Instant::now();
        assert_eq!(who(&c, &url, "g__whoami").await.unwrap(), "b");
        eprintln!(
            "round {round}: first call after death served by the backup in {:?}; member out of rotation after {:?}; next call {:?}",
            first[round],
            out_of_rotation[round],
            t1.elapsed()
        );
        p = FixtureHttp::start_args("p", &["--listen", &format!("127.0.0.1:{p_port}")]);
    }
    first.sort();
    eprintln!(
        "failover (death → first call served by the backup): median {:?}, max {:?}",
        first[1], first[2]
    );
}
