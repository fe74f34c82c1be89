//! Streamable HTTP transport tests against a small in-process MCP server (axum, 127.0.0.1).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::jsonrpc::{Id, raw};
use crate::upstream::{
    CallEvent, ConnectOptions, HttpSpec, Outcome, TransportSpec, Upstream, UpstreamError,
};

#[derive(Default)]
struct Srv {
    get_enabled: bool,
    sessions: Mutex<HashSet<String>>,
    next_session: AtomicU64,
    inits: AtomicU64,
    /// Server→client request id → where the client's answer goes.
    answers: Mutex<HashMap<String, oneshot::Sender<Value>>>,
    cancelled: Mutex<Vec<Value>>,
    versions_seen: Mutex<Vec<Option<String>>>,
    auth_seen: Mutex<Vec<Option<String>>>,
    deleted: Mutex<Vec<String>>,
    get_streams: AtomicU64,
    get_closed: Arc<AtomicU64>,
    push: Mutex<Option<broadcast::Sender<String>>>,
}

fn header(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

fn json_response(status: u16, session: Option<&str>, body: &Value) -> Response {
    let mut b = Response::builder()
        .status(status)
        .header("content-type", "application/json");
    if let Some(s) = session {
        b = b.header("mcp-session-id", s);
    }
    b.body(Body::from(body.to_string())).unwrap()
}

fn text_response(status: u16, text: &str) -> Response {
    Response::builder()
        .status(status)
        .body(Body::from(text.to_owned()))
        .unwrap()
}

/// An SSE response whose events are written by the returned sender.
fn sse_response() -> (Response, mpsc::Sender<String>) {
    let (tx, rx) = mpsc::channel::<String>(16);
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx)
        .map(|s| Ok::<_, std::io::Error>(bytes::Bytes::from(s)));
    let resp = Response::builder()
        .status(200)
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap();
    (resp, tx)
}

use futures::StreamExt;

async fn on_post(State(srv): State<Arc<Srv>>, headers: HeaderMap, body: String) -> Response {
    let msg: Value = match serde_json::from_str(&body) {
        Ok(v) => v,
        Err(_) => return text_response(400, "not json"),
    };
    let id = msg.get("id").cloned().unwrap_or(Value::Null);
    let method = msg
        .get("method")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if method == "initialize" {
        let n = srv.inits.fetch_add(1, Ordering::SeqCst) + 1;
        let sid = format!("sess-{}", srv.next_session.fetch_add(1, Ordering::SeqCst));
        srv.sessions.lock().insert(sid.clone());
        let result = json!({"protocolVersion": "2025-06-18", "capabilities": {"tools": {}},
                            "serverInfo": {"name": "axum", "version": n.to_string()}});
        return json_response(
            200,
            Some(&sid),
            &json!({"jsonrpc": "2.0", "id": id, "result": result}),
        );
    }
    match header(&headers, "mcp-session-id") {
        None => return text_response(400, "Bad Request: missing Mcp-Session-Id"),
        Some(s) if !srv.sessions.lock().contains(&s) => {
            return text_response(404, "unknown session");
        }
        Some(_) => {}
    }
    if method.is_empty() {
        // The client's answer to one of our requests.
        if let Some(tx) = srv.answers.lock().remove(&id.to_string()) {
            let _ = tx.send(msg);
        }
        return text_response(202, "");
    }
    if msg.get("id").is_none() {
        if method == "notifications/cancelled" {
            srv.cancelled.lock().push(msg["params"].clone());
        }
        return text_response(202, "");
    }
    if method != "tools/call" {
        return json_response(
            200,
            None,
            &json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32601, "message": "no such method"}}),
        );
    }
    srv.versions_seen
        .lock()
        .push(header(&headers, "mcp-protocol-version"));
    srv.auth_seen.lock().push(header(&headers, "authorization"));
    let name = msg["params"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let args = msg["params"]["arguments"].clone();
    let token = msg["params"]["_meta"]["progressToken"].clone();
    match name.as_str() {
        "echo" => json_response(
            200,
            None,
            &json!({"jsonrpc": "2.0", "id": id, "result": {"echo": args}}),
        ),
        "sse_progress" => {
            let (resp, tx) = sse_response();
            tokio::spawn(async move {
                let progress = json!({"jsonrpc": "2.0", "method": "notifications/progress",
                                      "params": {"progressToken": token, "progress": 1}});
                let log = json!({"jsonrpc": "2.0", "method": "notifications/message",
                                 "params": {"level": "info", "data": "working"}});
                let done = json!({"jsonrpc": "2.0", "id": id, "result": {"done": true}});
                // A comment, an event with id, data split over two lines, CRLF endings.
                let _ = tx.send(": hello\n\n".into()).await;
                let _ = tx
                    .send(format!("id: 1\nevent: message\ndata: {progress}\n\n"))
                    .await;
                let text = log.to_string();
                let (a, b) = text.split_at(text.find("\"params\"").unwrap());
                let _ = tx
                    .send(format!("id: 2\r\ndata: {a}\r\ndata: {b}\r\n\r\n"))
                    .await;
                let _ = tx.send(format!("id: 3\ndata: {done}\n\n")).await;
            });
            resp
        }
        "sse_sampling" => {
            let (resp, tx) = sse_response();
            let (atx, arx) = oneshot::channel();
            srv.answers.lock().insert("\"srv-1\"".into(), atx);
            tokio::spawn(async move {
                let ask = json!({"jsonrpc": "2.0", "id": "srv-1", "method": "sampling/createMessage",
                                 "params": {"messages": []}});
                let _ = tx.send(format!("data: {ask}\n\n")).await;
                let answer = tokio::time::timeout(Duration::from_secs(10), arx)
                    .await
                    .ok()
                    .and_then(Result::ok);
                let done = json!({"jsonrpc": "2.0", "id": id, "result": {"sampling": answer}});
                let _ = tx.send(format!("data: {done}\n\n")).await;
            });
            resp
        }
        "sse_end_early" => {
            let (resp, tx) = sse_response();
            tokio::spawn(async move {
                let log = json!({"jsonrpc": "2.0", "method": "notifications/message", "params": {"data": "bye"}});
                let _ = tx.send(format!("data: {log}\n\n")).await;
            });
            resp
        }
        "slow" => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            json_response(
                200,
                None,
                &json!({"jsonrpc": "2.0", "id": id, "result": {}}),
            )
        }
        "fail500" => text_response(500, "internal kaboom"),
        "accept_only" => text_response(202, ""),
        _ => json_response(
            200,
            None,
            &json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32602, "message": "unknown tool"}}),
        ),
    }
}

async fn on_get(State(srv): State<Arc<Srv>>, headers: HeaderMap) -> Response {
    if !srv.get_enabled {
        return text_response(405, "no GET stream here");
    }
    match header(&headers, "mcp-session-id") {
        Some(s) if srv.sessions.lock().contains(&s) => {}
        _ => return text_response(404, "unknown session"),
    }
    let mut rx = match srv.push.lock().as_ref() {
        Some(tx) => tx.subscribe(),
        None => return text_response(500, "no push channel"),
    };
    let (resp, tx) = sse_response();
    srv.get_streams.fetch_add(1, Ordering::SeqCst);
    let closed = srv.get_closed.clone();
    tokio::spawn(async move {
        while let Ok(m) = rx.recv().await {
            if tx.send(format!("data: {m}\n\n")).await.is_err() {
                break;
            }
        }
        closed.fetch_add(1, Ordering::SeqCst);
    });
    resp
}

async fn on_delete(State(srv): State<Arc<Srv>>, headers: HeaderMap) -> StatusCode {
    if let Some(s) = header(&headers, "mcp-session-id") {
        srv.sessions.lock().remove(&s);
        srv.deleted.lock().push(s);
    }
    StatusCode::OK
}

struct Running {
    srv: Arc<Srv>,
    url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start(get_enabled: bool) -> Running {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (push, _) = broadcast::channel(16);
    let srv = Arc::new(Srv {
        get_enabled,
        push: Mutex::new(Some(push)),
        ..Default::default()
    });
    let app = Router::new()
        .route(
            "/mcp",
            axum::routing::post(on_post).get(on_get).delete(on_delete),
        )
        .with_state(srv.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Running { srv, url, task }
}

fn spec(url: &str) -> TransportSpec {
    TransportSpec::Http(HttpSpec {
        endpoint: url.to_owned(),
        headers: vec![("Authorization".into(), "Bearer t0ken".into())],
        connect_timeout: Duration::from_secs(2),
        read_timeout: Duration::from_secs(10),
        verify_tls: true,
        ca_cert_path: None,
    })
}

fn opts() -> ConnectOptions {
    ConnectOptions {
        server_id: "remote".into(),
        client_name: "hangar-test".into(),
        client_version: "0".into(),
        protocol_version: "2025-11-25".into(),
        init_timeout: Duration::from_secs(5),
        client_capabilities: json!({"sampling": {}}),
        lease: None,
    }
}

fn call(name: &str, args: Value) -> Option<Box<serde_json::value::RawValue>> {
    Some(raw(&json!({"name": name, "arguments": args})))
}

fn result_json(o: Outcome) -> Value {
    match o {
        Outcome::Result(r) => serde_json::from_str(r.get()).unwrap(),
        Outcome::Error(e) => panic!("unexpected error answer: {e:?}"),
    }
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    hangar_wait::Wait::new(what, Duration::from_secs(10))
        .step(Duration::from_millis(10))
        .expect_async(async || cond().then_some(()))
        .await;
}

#[tokio::test]
async fn json_answers_carry_session_version_and_auth_headers() {
    let run = start(false).await;
    let up = Upstream::connect(&spec(&run.url), opts()).await.unwrap();
    assert_eq!(up.init().protocol_version, "2025-06-18");
    assert!(up.init().result.get().contains("axum"));
    let v = result_json(
        up.request("tools/call", call("echo", json!({"a": 1})), None, None)
            .await
            .unwrap(),
    );
    assert_eq!(v, json!({"echo": {"a": 1}}));
    assert_eq!(
        run.srv.versions_seen.lock().clone(),
        [Some("2025-06-18".to_owned())]
    );
    assert_eq!(
        run.srv.auth_seen.lock().clone(),
        [Some("Bearer t0ken".to_owned())]
    );
    // JSON-RPC errors pass through as answers.
    let Outcome::Error(e) = up
        .request("tools/call", call("nope", json!({})), None, None)
        .await
        .unwrap()
    else {
        panic!("expected an error answer")
    };
    assert_eq!(e.code, -32602);
    assert!(up.logs(10).is_empty() && up.pid().is_none());
    up.shutdown().await;
}

#[tokio::test]
async fn sse_answers_route_progress_and_logs_to_the_call() {
    let run = start(false).await;
    let up = Upstream::connect(&spec(&run.url), opts()).await.unwrap();
    let (tx, mut rx) = mpsc::channel(8);
    let params = Some(raw(
        &json!({"name": "sse_progress", "arguments": {}, "_meta": {"progressToken": "mine"}}),
    ));
    let v = result_json(
        up.request("tools/call", params, Some(tx), None)
            .await
            .unwrap(),
    );
    assert_eq!(v, json!({"done": true}));
    let Ok(CallEvent::Notification(p)) = rx.try_recv() else {
        panic!("no progress")
    };
    assert_eq!(p.method.as_deref(), Some("notifications/progress"));
    let params: Value = serde_json::from_str(p.params.unwrap().get()).unwrap();
    assert_eq!(
        params["progressToken"],
        json!("mine"),
        "the caller's token is restored"
    );
    let Ok(CallEvent::Notification(l)) = rx.try_recv() else {
        panic!("no log")
    };
    assert_eq!(l.method.as_deref(), Some("notifications/message"));
    assert!(rx.try_recv().is_err());
    up.shutdown().await;
}

#[tokio::test]
async fn a_server_request_on_the_stream_is_answered_with_respond() {
    let run = start(false).await;
    let up = Upstream::connect(&spec(&run.url), opts()).await.unwrap();
    let (tx, mut rx) = mpsc::channel(8);
    let responder = {
        let up = up.clone();
        tokio::spawn(async move {
            let Some(CallEvent::Request(req)) = rx.recv().await else {
                panic!("no request")
            };
            assert_eq!(req.method.as_deref(), Some("sampling/createMessage"));
            assert_eq!(req.id, Some(Id::Str("srv-1".into())));
            up.respond(
                req.id.unwrap(),
                Outcome::Result(raw(&json!({"content": "hi"}))),
            )
            .await
            .unwrap();
        })
    };
    let v = result_json(
        up.request(
            "tools/call",
            call("sse_sampling", json!({})),
            Some(tx),
            None,
        )
        .await
        .unwrap(),
    );
    responder.await.unwrap();
    assert_eq!(v["sampling"]["result"], json!({"content": "hi"}));
    up.shutdown().await;
}

#[tokio::test]
async fn an_expired_session_is_reinitialized_once_and_the_calls_retried() {
    let run = start(false).await;
    let up = Upstream::connect(&spec(&run.url), opts()).await.unwrap();
    result_json(
        up.request("tools/call", call("echo", json!({})), None, None)
            .await
            .unwrap(),
    );
    assert_eq!(run.srv.inits.load(Ordering::SeqCst), 1);
    run.srv.sessions.lock().clear(); // the server forgets every session
    let calls = (0..10).map(|i| {
        let up = up.clone();
        async move {
            let v = result_json(
                up.request("tools/call", call("echo", json!({"i": i})), None, None)
                    .await
                    .unwrap(),
            );
            assert_eq!(v["echo"]["i"], json!(i));
        }
    });
    futures::future::join_all(calls).await;
    assert_eq!(
        run.srv.inits.load(Ordering::SeqCst),
        2,
        "one re-initialization for all callers"
    );
    assert!(up.is_alive());
    up.shutdown().await;
}

#[tokio::test]
async fn connection_refused_is_a_before_send_connect_error() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    drop(listener);
    let err = Upstream::connect(&spec(&url), opts()).await.err().unwrap();
    assert!(matches!(err, UpstreamError::Connect { .. }), "{err:?}");
    assert!(err.before_send());
    assert!(!err.to_string().contains("t0ken"));
}

#[tokio::test]
async fn http_error_statuses_are_protocol_errors_with_an_excerpt() {
    let run = start(false).await;
    let up = Upstream::connect(&spec(&run.url), opts()).await.unwrap();
    let err = up
        .request("tools/call", call("fail500", json!({})), None, None)
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::Protocol { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("500") && text.contains("internal kaboom"),
        "{text}"
    );
    assert!(!err.before_send());
    let err = up
        .request("tools/call", call("accept_only", json!({})), None, None)
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::Protocol { .. }), "{err:?}");
    let err = up
        .request("tools/call", call("sse_end_early", json!({})), None, None)
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
    up.shutdown().await;
}

#[tokio::test]
async fn a_timeout_or_a_dropped_call_sends_cancelled() {
    let run = start(false).await;
    let up = Upstream::connect(&spec(&run.url), opts()).await.unwrap();
    let err = up
        .request(
            "tools/call",
            call("slow", json!({})),
            None,
            Some(Duration::from_millis(200)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, UpstreamError::Timeout { .. }), "{err:?}");
    eventually("cancelled after the timeout", || {
        run.srv.cancelled.lock().len() == 1
    })
    .await;
    let dropped = tokio::time::timeout(
        Duration::from_millis(200),
        up.request("tools/call", call("slow", json!({})), None, None),
    )
    .await;
    assert!(dropped.is_err());
    eventually("cancelled after the drop", || {
        run.srv.cancelled.lock().len() == 2
    })
    .await;
    let c = run.srv.cancelled.lock().clone();
    assert!(
        c[0]["requestId"].is_u64() && c[0]["requestId"] != c[1]["requestId"],
        "{c:?}"
    );
    assert_eq!(up.in_flight(), 0);
    up.shutdown().await;
}

#[tokio::test]
async fn the_get_stream_delivers_server_notifications() {
    let run = start(true).await;
    let up = Upstream::connect(&spec(&run.url), opts()).await.unwrap();
    let mut notes = up.subscribe();
    eventually("the GET stream is open", || {
        run.srv.get_streams.load(Ordering::SeqCst) >= 1
    })
    .await;
    let push = run.srv.push.lock().clone().unwrap();
    push.send(json!({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}).to_string())
        .unwrap();
    let m = tokio::time::timeout(Duration::from_secs(5), notes.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        m.method.as_deref(),
        Some("notifications/tools/list_changed")
    );
    // Dropping the Upstream (no shutdown) closes the GET stream too.
    drop(up);
    // Keep pushing: the server notices the closed stream on its next write.
    hangar_wait::Wait::new(
        "the GET stream to close with its Upstream",
        Duration::from_secs(10),
    )
    .step(Duration::from_millis(20))
    .expect_async(async || {
        let _ = push.send(json!({"jsonrpc": "2.0", "method": "notifications/message"}).to_string());
        (run.srv.get_closed.load(Ordering::SeqCst) > 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn shutdown_deletes_the_session_and_closes() {
    let run = start(false).await;
    let up = Upstream::connect(&spec(&run.url), opts()).await.unwrap();
    up.shutdown().await;
    assert_eq!(run.srv.deleted.lock().clone(), ["sess-0".to_owned()]);
    assert!(!up.is_alive());
    tokio::time::timeout(Duration::from_secs(1), up.closed())
        .await
        .unwrap();
    let err = up
        .request("tools/call", call("echo", json!({})), None, None)
        .await
        .unwrap_err();
    assert!(err.before_send(), "{err:?}");
    up.shutdown().await; // idempotent
    assert_eq!(run.srv.deleted.lock().len(), 1);
}
