//! stdio transport tests, against a small MCP server written in Python (below) and plain
//! shell processes.

use std::io::{BufRead, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use super::{StdioConn, response_id_prefix};
use crate::jsonrpc::{Id, raw};
use crate::upstream::{
    CallEvent, ConnectOptions, Outcome, StdioSpec, TransportSpec, Upstream, UpstreamError,
};

/// A tiny MCP server: tools are the behaviours under test. Each `tools/call` runs on its own
/// thread so answers can come back out of order.
const SERVER: &str = r##"
import json, os, sys, threading, time
lock = threading.Lock()
waiting = {}
def send(obj):
    data = json.dumps(obj) + "\n"
    with lock:
        sys.stdout.write(data)
        sys.stdout.flush()
def raw_out(text):
    with lock:
        sys.stdout.write(text)
        sys.stdout.flush()
def log(s):
    sys.stderr.write(s + "\n")
    sys.stderr.flush()
def result(id, r):
    send({"jsonrpc": "2.0", "id": id, "result": r})
def ask(method, params, rid):
    ev = threading.Event()
    box = []
    waiting[rid] = (ev, box)
    send({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})
    ev.wait(10)
    return box[0] if box else None
def tool(id, name, args, meta):
    if name == "echo":
        result(id, {"echo": args})
    elif name == "slow":
        time.sleep(args.get("ms", 0) / 1000.0)
        result(id, {"echo": args})
    elif name == "progress":
        tok = meta.get("progressToken")
        for i in (1, 2):
            send({"jsonrpc": "2.0", "method": "notifications/progress",
                  "params": {"progressToken": tok, "progress": i, "total": 2}})
        result(id, {"token_seen": tok})
    elif name == "sampling":
        result(id, {"sampling": ask("sampling/createMessage", {"messages": []}, "srv-%s" % id)})
    elif name == "ping_client":
        result(id, {"ping": ask("ping", {}, "ping-%s" % id)})
    elif name == "log":
        send({"jsonrpc": "2.0", "method": "notifications/message",
              "params": {"level": "info", "data": "hello %s" % id}})
        result(id, {})
    elif name == "list_changed":
        send({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
        result(id, {})
    elif name == "garbage":
        raw_out("this is not json\n")
        result(id, {"ok": True})
    elif name == "crash":
        log("crashing now")
        os._exit(3)
    elif name == "block":
        log("block %s" % id)
    elif name == "stderr":
        for i in range(args["n"]):
            log(("L%d " % i) + "x" * args.get("pad", 0))
        result(id, {})
    elif name == "huge":
        raw_out('{"jsonrpc":"2.0","id":%d,"result":{"blob":"' % id + "a" * (17 * 1024 * 1024) + '"}}\n')
    elif name == "bad_answer":
        send({"jsonrpc": "2.0", "id": id})
def handle(msg):
    m = msg.get("method")
    id = msg.get("id")
    if m is None:
        w = waiting.pop(id, None)
        if w:
            w[1].append(msg)
            w[0].set()
        return
    if m == "initialize":
        if os.environ.get("DIE_ON_INIT"):
            log("refusing to start")
            os._exit(7)
        result(id, {"protocolVersion": os.environ.get("PV", "2025-06-18"),
                    "capabilities": {"tools": {}}, "serverInfo": {"name": "py", "version": "0"}})
    elif m == "notifications/initialized":
        log("initialized")
    elif m == "notifications/cancelled":
        log("cancelled %s" % msg["params"]["requestId"])
    elif m == "tools/call":
        p = msg.get("params", {})
        threading.Thread(target=tool, daemon=True,
                         args=(id, p.get("name"), p.get("arguments", {}), p.get("_meta", {}))).start()
    elif id is not None:
        send({"jsonrpc": "2.0", "id": id, "error": {"code": -32601, "message": "no such method"}})
if os.environ.get("BANNER"):
    raw_out("Welcome to the py server!\n\n")
for line in sys.stdin:
    line = line.strip()
    if line:
        handle(json.loads(line))
log("stdin closed")
"##;

fn py_spec(env: &[(&str, &str)]) -> TransportSpec {
    TransportSpec::Stdio(StdioSpec {
        argv: vec!["python3".into(), "-u".into(), "-c".into(), SERVER.into()],
        env: env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        cwd: None,
    })
}

fn opts() -> ConnectOptions {
    ConnectOptions {
        server_id: "py".into(),
        client_name: "hangar-test".into(),
        client_version: "0".into(),
        protocol_version: "2025-11-25".into(),
        init_timeout: Duration::from_secs(10),
        client_capabilities: json!({"sampling": {}, "roots": {"listChanged": true}}),
        lease: None,
    }
}

async fn py(env: &[(&str, &str)]) -> Arc<Upstream> {
    Upstream::connect(&py_spec(env), opts()).await.unwrap()
}

fn call_params(name: &str, args: Value) -> Option<Box<serde_json::value::RawValue>> {
    Some(raw(&json!({"name": name, "arguments": args})))
}

fn result_json(o: Outcome) -> Value {
    match o {
        Outcome::Result(r) => serde_json::from_str(r.get()).unwrap(),
        Outcome::Error(e) => panic!("unexpected error answer: {e:?}"),
    }
}

async fn tool(up: &Upstream, name: &str, args: Value) -> Value {
    result_json(
        up.request("tools/call", call_params(name, args), None, None)
            .await
            .unwrap(),
    )
}

/// Poll `cond` every 10 ms until it holds or 10 s pass.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    hangar_wait::Wait::new(what, Duration::from_secs(10))
        .step(Duration::from_millis(10))
        .expect_async(async || cond().then_some(()))
        .await;
}

fn has_log(up: &Upstream, needle: &str) -> bool {
    up.logs(1000).iter().any(|l| l.line.contains(needle))
}

/// The id the server logged for the `block` call (from "block <id>" on its stderr).
fn blocked_ids(up: &Upstream) -> Vec<String> {
    up.logs(1000)
        .iter()
        .filter_map(|l| l.line.strip_prefix("block ").map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn handshake_reports_version_and_raw_result() {
    let up = py(&[]).await;
    assert_eq!(up.init().protocol_version, "2025-06-18");
    assert!(up.init().result.get().contains(r#""serverInfo""#));
    eventually("initialized notification", || has_log(&up, "initialized")).await;
    assert!(up.is_alive());
    assert!(up.pid().is_some());
    up.shutdown().await;
    assert!(!up.is_alive());
}

#[tokio::test]
async fn multiplexes_100_concurrent_calls_answered_out_of_order() {
    let up = py(&[]).await;
    let calls = (0..100u64).map(|i| {
        let up = up.clone();
        async move {
            // Later calls answer sooner.
            let v = tool(&up, "slow", json!({"i": i, "ms": (100 - i) * 3})).await;
            assert_eq!(
                v["echo"]["i"],
                json!(i),
                "call {i} got someone else's answer"
            );
        }
    });
    futures::future::join_all(calls).await;
    assert_eq!(up.in_flight(), 0);
    up.shutdown().await;
}

#[tokio::test]
async fn a_crash_mid_call_fails_every_call_at_once() {
    let up = py(&[]).await;
    let mut waiting = Vec::new();
    for _ in 0..5 {
        let up = up.clone();
        waiting.push(tokio::spawn(async move {
            up.request("tools/call", call_params("block", json!({})), None, None)
                .await
        }));
    }
    eventually("five blocked calls", || blocked_ids(&up).len() == 5).await;
    let started = Instant::now();
    let err = up
        .request("tools/call", call_params("crash", json!({})), None, None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            UpstreamError::Closed {
                before_send: false,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("exit status: 3"), "{err}");
    for w in waiting {
        let e = w.await.unwrap().unwrap_err();
        assert!(matches!(e, UpstreamError::Closed { .. }), "{e:?}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "calls were not failed promptly"
    );
    tokio::time::timeout(Duration::from_secs(5), up.closed())
        .await
        .unwrap();
    assert!(!up.is_alive());
    assert!(has_log(&up, "crashing now"));
    let after = up
        .request("tools/call", call_params("echo", json!({})), None, None)
        .await
        .unwrap_err();
    assert!(
        after.before_send(),
        "a call on a dead connection never leaves: {after:?}"
    );
    up.shutdown().await;
}

#[tokio::test]
async fn garbage_on_stdout_is_logged_and_ignored() {
    let up = py(&[("BANNER", "1")]).await;
    assert_eq!(tool(&up, "garbage", json!({})).await, json!({"ok": true}));
    assert_eq!(
        tool(&up, "echo", json!({"x": 1})).await,
        json!({"echo": {"x": 1}})
    );
    let logs = up.logs(1000);
    let garbage: Vec<_> = logs
        .iter()
        .filter(|l| l.stream == "stdout-garbage")
        .map(|l| l.line.as_str())
        .collect();
    assert_eq!(garbage, ["Welcome to the py server!", "this is not json"]);
    assert!(up.is_alive());
    up.shutdown().await;
}

#[tokio::test]
async fn progress_tokens_are_rewritten_upstream_and_restored_for_each_caller() {
    let up = py(&[]).await;
    let params = Some(raw(
        &json!({"name": "progress", "arguments": {}, "_meta": {"progressToken": "same"}}),
    ));
    let (tx1, mut rx1) = mpsc::channel(16);
    let (tx2, mut rx2) = mpsc::channel(16);
    let (a, b) = tokio::join!(
        up.request("tools/call", params.clone(), Some(tx1), None),
        up.request("tools/call", params, Some(tx2), None),
    );
    let (a, b) = (result_json(a.unwrap()), result_json(b.unwrap()));
    let (ta, tb) = (
        a["token_seen"].as_str().unwrap(),
        b["token_seen"].as_str().unwrap(),
    );
    assert!(ta.starts_with("hgr-p") && tb.starts_with("hgr-p"));
    assert_ne!(
        ta, tb,
        "two callers with the same token get distinct upstream tokens"
    );
    for rx in [&mut rx1, &mut rx2] {
        let mut seen = Vec::new();
        while let Ok(ev) = rx.try_recv() {
            let CallEvent::Notification(m) = ev else {
                panic!("unexpected request")
            };
            let p: Value = serde_json::from_str(m.params.unwrap().get()).unwrap();
            assert_eq!(
                p["progressToken"],
                json!("same"),
                "the caller's own token comes back"
            );
            seen.push(p["progress"].as_u64().unwrap());
        }
        assert_eq!(seen, [1, 2], "each caller sees exactly its own progress");
    }
    up.shutdown().await;
}

#[tokio::test]
async fn dropping_a_call_or_timing_out_cancels_it_upstream() {
    let up = py(&[]).await;
    let dropped = tokio::time::timeout(
        Duration::from_millis(300),
        up.request("tools/call", call_params("block", json!({})), None, None),
    )
    .await;
    assert!(
        dropped.is_err(),
        "the call must still be pending when dropped"
    );
    eventually("the server sees the block call", || {
        blocked_ids(&up).len() == 1
    })
    .await;
    let id = blocked_ids(&up)[0].clone();
    eventually("cancellation of the dropped call", || {
        has_log(&up, &format!("cancelled {id}"))
    })
    .await;
    assert_eq!(up.in_flight(), 0);

    let err = up
        .request(
            "tools/call",
            call_params("block", json!({})),
            None,
            Some(Duration::from_millis(200)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::Timeout { .. }), "{err:?}");
    eventually("the second block call", || blocked_ids(&up).len() == 2).await;
    let id = blocked_ids(&up)[1].clone();
    eventually("cancellation after timeout", || {
        has_log(&up, &format!("cancelled {id}"))
    })
    .await;
    // The connection still serves.
    assert_eq!(
        tool(&up, "echo", json!({"k": 2})).await,
        json!({"echo": {"k": 2}})
    );
    up.shutdown().await;
}

#[tokio::test]
async fn a_server_request_goes_to_the_only_caller_that_listens() {
    let up = py(&[]).await;
    // A call without a sink in flight does not make attribution ambiguous.
    let bystander = {
        let up = up.clone();
        tokio::spawn(async move {
            up.request("tools/call", call_params("block", json!({})), None, None)
                .await
        })
    };
    eventually("bystander in flight", || blocked_ids(&up).len() == 1).await;
    let (tx, mut rx) = mpsc::channel(4);
    let responder = {
        let up = up.clone();
        tokio::spawn(async move {
            let Some(CallEvent::Request(req)) = rx.recv().await else {
                panic!("no request delivered")
            };
            assert_eq!(req.method.as_deref(), Some("sampling/createMessage"));
            let id = req.id.unwrap();
            assert!(
                matches!(&id, Id::Str(s) if s.starts_with("srv-")),
                "the upstream's own id: {id:?}"
            );
            up.respond(
                id,
                Outcome::Result(raw(&json!({"content": "from the client"}))),
            )
            .await
            .unwrap();
        })
    };
    let v = result_json(
        up.request(
            "tools/call",
            call_params("sampling", json!({})),
            Some(tx),
            None,
        )
        .await
        .unwrap(),
    );
    responder.await.unwrap();
    assert_eq!(
        v["sampling"]["result"],
        json!({"content": "from the client"})
    );
    bystander.abort();
    up.shutdown().await;
}

#[tokio::test]
async fn an_ambiguous_server_request_is_refused_not_misdelivered() {
    let up = py(&[]).await;
    let (other_tx, mut other_rx) = mpsc::channel(4);
    let other = {
        let up = up.clone();
        tokio::spawn(async move {
            up.request(
                "tools/call",
                call_params("block", json!({})),
                Some(other_tx),
                None,
            )
            .await
        })
    };
    eventually("other caller in flight", || blocked_ids(&up).len() == 1).await;
    let (tx, mut rx) = mpsc::channel(4);
    let v = result_json(
        up.request(
            "tools/call",
            call_params("sampling", json!({})),
            Some(tx),
            None,
        )
        .await
        .unwrap(),
    );
    assert_eq!(v["sampling"]["error"]["code"], json!(-32603));
    assert!(
        v["sampling"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cannot attribute")
    );
    assert!(
        rx.try_recv().is_err() && other_rx.try_recv().is_err(),
        "nobody got the request"
    );
    other.abort();

    // No caller listens at all: refused too.
    let v = tool(&up, "sampling", json!({})).await;
    assert_eq!(v["sampling"]["error"]["code"], json!(-32603));
    up.shutdown().await;
}

#[tokio::test]
async fn ping_from_the_server_is_answered_directly() {
    let up = py(&[]).await;
    let (tx, mut rx) = mpsc::channel(4);
    let v = result_json(
        up.request(
            "tools/call",
            call_params("ping_client", json!({})),
            Some(tx),
            None,
        )
        .await
        .unwrap(),
    );
    assert_eq!(v["ping"]["result"], json!({}));
    assert!(
        rx.try_recv().is_err(),
        "ping is not forwarded to the caller"
    );
    up.shutdown().await;
}

#[tokio::test]
async fn notifications_go_to_the_call_or_to_subscribers() {
    let up = py(&[]).await;
    let mut notes = up.subscribe();
    // A log emitted while the only listening call is in flight belongs to it.
    let (tx, mut rx) = mpsc::channel(4);
    up.request("tools/call", call_params("log", json!({})), Some(tx), None)
        .await
        .unwrap();
    let Ok(CallEvent::Notification(m)) = rx.try_recv() else {
        panic!("log not delivered to the call")
    };
    assert_eq!(m.method.as_deref(), Some("notifications/message"));
    // Without a listening call it is broadcast, as are list changes.
    tool(&up, "log", json!({})).await;
    tool(&up, "list_changed", json!({})).await;
    let a = tokio::time::timeout(Duration::from_secs(5), notes.recv())
        .await
        .unwrap()
        .unwrap();
    let b = tokio::time::timeout(Duration::from_secs(5), notes.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.method.as_deref(), Some("notifications/message"));
    assert_eq!(
        b.method.as_deref(),
        Some("notifications/tools/list_changed")
    );
    up.shutdown().await;
}

#[tokio::test]
async fn an_oversized_answer_fails_that_call_and_the_connection_keeps_serving() {
    let up = py(&[]).await;
    let err = up
        .request("tools/call", call_params("huge", json!({})), None, None)
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::Protocol { .. }), "{err:?}");
    assert!(err.to_string().contains("16 MiB"), "{err}");
    assert_eq!(
        tool(&up, "echo", json!({"after": true})).await,
        json!({"echo": {"after": true}})
    );
    assert!(has_log(&up, "longer than the 16 MiB limit"));
    let bad = up
        .request(
            "tools/call",
            call_params("bad_answer", json!({})),
            None,
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(bad, UpstreamError::Protocol { .. }), "{bad:?}");
    up.shutdown().await;
}

#[tokio::test]
async fn the_stderr_ring_is_bounded() {
    let up = py(&[]).await;
    tool(&up, "stderr", json!({"n": 1200, "pad": 10000})).await;
    eventually("the last stderr line", || has_log(&up, "L1199 ")).await;
    let logs = up.logs(usize::MAX);
    assert_eq!(logs.len(), 1000);
    assert!(logs.iter().all(|l| l.line.len() <= 8192));
    assert!(logs[999].line.starts_with("L1199 ") && logs[999].stream == "stderr");
    assert!(
        logs[0].line.starts_with("L200 "),
        "the oldest lines went first: {}",
        &logs[0].line[..10]
    );
    assert_eq!(up.logs(3).len(), 3);
    assert!(logs[999].timestamp > 1.0e9);
    up.shutdown().await;
}

#[tokio::test]
async fn spawn_failures_happen_before_send() {
    for argv in [
        vec!["/nonexistent/hangar-mcp-server".to_owned()],
        vec!["no-such-program-hangar".to_owned()],
        vec![],
    ] {
        let spec = TransportSpec::Stdio(StdioSpec {
            argv: argv.clone(),
            env: vec![],
            cwd: None,
        });
        let err = Upstream::connect(&spec, opts()).await.err().unwrap();
        assert!(
            matches!(err, UpstreamError::Spawn { .. }),
            "{argv:?}: {err:?}"
        );
        assert!(err.before_send());
        if let Some(p) = argv.first() {
            assert!(
                err.to_string().contains(p.as_str()),
                "names the program: {err}"
            );
        }
    }
}

#[tokio::test]
async fn handshake_failures_are_reported_and_the_process_is_stopped() {
    let err = Upstream::connect(&py_spec(&[("PV", "1999-01-01")]), opts())
        .await
        .err()
        .unwrap();
    assert!(matches!(err, UpstreamError::Handshake { .. }), "{err:?}");
    assert!(err.to_string().contains("1999-01-01"));
    let err = Upstream::connect(&py_spec(&[("DIE_ON_INIT", "1")]), opts())
        .await
        .err()
        .unwrap();
    assert!(matches!(err, UpstreamError::Handshake { .. }), "{err:?}");
    assert!(err.to_string().contains("exit status: 7"), "{err}");
    // A process that never answers.
    let spec = TransportSpec::Stdio(StdioSpec {
        argv: vec!["sleep".into(), "30".into()],
        env: vec![],
        cwd: None,
    });
    let mut o = opts();
    o.init_timeout = Duration::from_millis(300);
    let err = Upstream::connect(&spec, o).await.err().unwrap();
    assert!(
        matches!(err, UpstreamError::Handshake { .. }) && err.to_string().contains("initialize"),
        "{err}"
    );
}

#[tokio::test]
async fn shutdown_closes_stdin_first_and_is_idempotent() {
    let up = py(&[]).await;
    let pid = up.pid().unwrap();
    let started = Instant::now();
    up.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "a well-behaved server exits on stdin close"
    );
    assert!(has_log(&up, "stdin closed"));
    assert!(!up.is_alive());
    assert!(process_gone(pid));
    up.shutdown().await;
}

#[tokio::test]
async fn shutdown_escalates_to_sigterm_then_sigkill() {
    let (notes, _) = broadcast::channel(4);
    // Ignores stdin EOF and SIGTERM; only SIGKILL stops it.
    let spec = StdioSpec {
        argv: vec![
            "sh".into(),
            "-c".into(),
            "trap 'echo got-term >&2' TERM; while :; do sleep 0.05; done".into(),
        ],
        env: vec![],
        cwd: None,
    };
    let conn = StdioConn::spawn("stubborn", &spec, notes, None).unwrap();
    let pid = conn.pid().unwrap();
    let started = Instant::now();
    conn.shutdown().await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(9),
        "took {took:?}"
    );
    assert!(
        conn.logs(10).iter().any(|l| l.line == "got-term"),
        "SIGTERM was sent to the group"
    );
    assert!(!conn.is_alive());
    assert!(process_gone(pid));
}

#[tokio::test]
async fn dropping_the_connection_kills_the_process_group() {
    let (notes, _) = broadcast::channel(4);
    let spec = StdioSpec {
        argv: vec![
            "sh".into(),
            "-c".into(),
            "sleep 300 & echo $! >&2; wait".into(),
        ],
        env: vec![],
        cwd: None,
    };
    let conn = StdioConn::spawn("dropper", &spec, notes, None).unwrap();
    let pid = conn.pid().unwrap();
    let grandchild =
        hangar_wait::Wait::new("the grandchild pid on stderr", Duration::from_secs(10))
            .step(Duration::from_millis(10))
            .expect_async(async || {
                conn.logs(1)
                    .first()
                    .and_then(|l| l.line.parse::<u32>().ok())
            })
            .await;
    assert!(!process_gone(grandchild));
    drop(conn);
    eventually("the process group to go with the drop", || {
        process_gone(pid) && process_gone(grandchild)
    })
    .await;
}

/// True when the pid no longer runs (absent, or a zombie waiting for a reaper).
fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the parenthesized command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

/// Re-executed by `no_orphans_when_the_node_is_sigkilled`: spawns a server, prints its pid
/// and waits to be killed.
#[test]
#[ignore = "helper process for no_orphans_when_the_node_is_sigkilled"]
fn orphan_helper() {
    if std::env::var_os("HANGAR_ORPHAN_HELPER").is_none() {
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (notes, _) = broadcast::channel(4);
        let spec = StdioSpec {
            argv: vec!["sleep".into(), "300".into()],
            env: vec![],
            cwd: None,
        };
        let conn = StdioConn::spawn("orphan", &spec, notes, None).unwrap();
        println!("ORPHAN-PID {}", conn.pid().unwrap());
        std::io::stdout().flush().unwrap();
        std::future::pending::<()>().await;
    });
}

#[test]
fn no_orphans_when_the_node_is_sigkilled() {
    if !std::path::Path::new("/usr/bin/setpriv").is_file() {
        eprintln!("skipped: /usr/bin/setpriv is not installed");
        return;
    }
    let mut helper = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "upstream::stdio::tests::orphan_helper",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("HANGAR_ORPHAN_HELPER", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = helper.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            // libtest prints "test <name> ... " without a newline before the test's output.
            if let Some((_, pid)) = line.split_once("ORPHAN-PID ") {
                let _ = tx.send(pid.trim().parse::<u32>().unwrap());
            }
        }
    });
    let server = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(pid) => pid,
        Err(e) => {
            let _ = helper.kill();
            let _ = helper.wait();
            panic!("the helper did not report its server pid: {e}");
        }
    };
    assert!(
        !process_gone(server),
        "the server runs while its parent lives"
    );
    // setpriv arms the parent-death signal and then execs the server; wait for the exec so
    // the kill below does not land in the (microseconds-wide) window before the signal is armed.
    hangar_wait::Wait::new("setpriv to exec the server", Duration::from_secs(10))
        .step(Duration::from_millis(5))
        .expect(|| {
            std::fs::read_to_string(format!("/proc/{server}/comm"))
                .map_or(true, |comm| comm.trim() == "sleep")
                .then_some(())
        });
    helper.kill().unwrap(); // SIGKILL: no chance to clean up
    helper.wait().unwrap();
    let gone = hangar_wait::Wait::new("the server to die with its parent", Duration::from_secs(10))
        .step(Duration::from_millis(10))
        .poll(|| process_gone(server).then_some(()));
    if gone.is_err() {
        let _ = std::process::Command::new("kill")
            .args(["-9", &server.to_string()])
            .status();
        panic!("the server {server} outlived its SIGKILLed parent");
    }
}

#[test]
fn the_id_of_an_oversized_answer_is_found_in_its_prefix() {
    assert_eq!(
        response_id_prefix(br#"{"jsonrpc":"2.0","id":42,"result":{"blob":"aaa"#),
        Some(42)
    );
    assert_eq!(
        response_id_prefix(br#"{"result":{"id":9,"x":"a"},"id": 7,"#),
        Some(7)
    );
    assert_eq!(
        response_id_prefix(br#"{"jsonrpc":"2.0","error":{"code":1},"id":3}"#),
        Some(3)
    );
    assert_eq!(
        response_id_prefix(br#"{"jsonrpc":"2.0","id":5,"method":"x","params":{"#),
        None
    );
    assert_eq!(
        response_id_prefix(br#"{"jsonrpc":"2.0","params":{"id":5,"result":1"#),
        None
    );
    assert_eq!(
        response_id_prefix(br#"{"jsonrpc":"2.0","id":"s1","result":{"#),
        None
    );
}

#[tokio::test]
async fn long_lines_are_capped_while_read() {
    let data = format!("{}\nshort\n", "y".repeat(100));
    let mut r = tokio::io::BufReader::with_capacity(16, data.as_bytes());
    let mut buf = Vec::new();
    assert_eq!(
        super::read_line_capped(&mut r, &mut buf, 10).await.unwrap(),
        101
    );
    assert_eq!(buf, b"yyyyyyyyyy");
    buf.clear();
    assert_eq!(
        super::read_line_capped(&mut r, &mut buf, 10).await.unwrap(),
        6
    );
    assert_eq!(buf, b"short\n");
    buf.clear();
    assert_eq!(
        super::read_line_capped(&mut r, &mut buf, 10).await.unwrap(),
        0
    );
}
