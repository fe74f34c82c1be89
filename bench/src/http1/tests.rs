use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

#[test]
fn urls() {
    assert_eq!(
        parse_url("http://127.0.0.1:8080/mcp").unwrap(),
        Url {
            authority: "127.0.0.1:8080".into(),
            path: "/mcp".into()
        }
    );
    assert_eq!(
        parse_url("http://localhost").unwrap(),
        Url {
            authority: "localhost:80".into(),
            path: "/".into()
        }
    );
    assert_eq!(
        parse_url("http://[::1]/x?y=1").unwrap().authority,
        "[::1]:80"
    );
    assert_eq!(parse_url("http://[::1]:9/x").unwrap().authority, "[::1]:9");
    assert!(parse_url("https://127.0.0.1/mcp").is_err());
    assert!(parse_url("http://127.0.0.1:99999/mcp").is_err());
    assert!(parse_url("http:///mcp").is_err());
}

#[test]
fn heads() {
    let r =
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\ncontent-length: 12\r\n\r\n{\"a\":1}";
    let (h, n) = parse_head(r).unwrap().unwrap();
    assert_eq!(
        h,
        Head {
            status: 200,
            framing: Framing::Length(12),
            kind: BodyKind::Json,
            close: false
        }
    );
    assert_eq!(&r[n..], b"{\"a\":1}");

    let r = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    let (h, _) = parse_head(r).unwrap().unwrap();
    assert_eq!(
        (h.framing, h.kind, h.close),
        (Framing::Chunked, BodyKind::Sse, true)
    );

    let r = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n";
    let (h, _) = parse_head(r).unwrap().unwrap();
    assert_eq!((h.framing, h.close), (Framing::UntilClose, true));

    let r = b"HTTP/1.0 202 Accepted\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n";
    let (h, _) = parse_head(r).unwrap().unwrap();
    assert_eq!(
        (h.status, h.framing, h.close),
        (202, Framing::Length(0), false)
    );

    let (h, _) = parse_head(b"HTTP/1.1 204 No Content\r\n\r\n")
        .unwrap()
        .unwrap();
    assert_eq!(h.framing, Framing::Length(0));

    assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Le").unwrap(), None);
    assert!(parse_head(b"SPDY/3 200 OK\r\n\r\n").is_err());
    assert!(parse_head(b"HTTP/1.1 abc OK\r\n\r\n").is_err());
    assert!(parse_head(b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n").is_err());
    assert!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").is_err());
    let huge = vec![b'a'; MAX_HEAD + 1];
    assert_eq!(parse_head(&huge), Err(HttpError::HeadTooLarge));
}

#[test]
fn chunked_bodies() {
    let full = b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\n\r\nNEXT";
    let mut out = Vec::new();
    assert_eq!(
        decode_chunked(full, &mut out).unwrap(),
        Some(full.len() - 4)
    );
    assert_eq!(out, b"hello, world");
    // Every strict prefix is "need more".
    for cut in 0..full.len() - 4 {
        assert_eq!(
            decode_chunked(&full[..cut], &mut out).unwrap(),
            None,
            "cut {cut}"
        );
    }
    let trailers = b"3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n";
    assert_eq!(
        decode_chunked(trailers, &mut out).unwrap(),
        Some(trailers.len())
    );
    assert_eq!(out, b"abc");
    assert!(decode_chunked(b"zz\r\nabc\r\n", &mut out).is_err());
    assert!(decode_chunked(b"3\r\nabcd\r\n", &mut out).is_err());
}

#[test]
fn classifying_answers() {
    let ok = br#"{"jsonrpc":"2.0","id":3,"result":{"content":[]}}"#;
    assert_eq!(classify(200, BodyKind::Json, ok, 3), Ok(()));
    assert_eq!(
        classify(200, BodyKind::Json, ok, 4).unwrap_err().kind,
        ErrorKind::Transport
    );
    let e = classify(503, BodyKind::Json, b"overloaded", 3).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Http);
    assert!(e.detail.contains("503") && e.detail.contains("overloaded"));
    assert_eq!(
        classify(202, BodyKind::Json, b"", 3).unwrap_err().kind,
        ErrorKind::Transport
    );
    let rpc = br#"{"jsonrpc":"2.0","id":3,"error":{"code":-32602,"message":"Unknown tool"}}"#;
    assert_eq!(
        classify(200, BodyKind::Json, rpc, 3).unwrap_err().kind,
        ErrorKind::Rpc
    );
    let sse = b"event: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":3,\"result\":{}}\n\n";
    assert_eq!(classify(200, BodyKind::Sse, sse, 3), Ok(()));
}

/// A tiny HTTP/1.1 responder whose answer style is chosen by `arguments.mode` of the call.
struct Responder {
    url: String,
    conns: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn responder() -> Responder {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    let conns = Arc::new(AtomicUsize::new(0));
    let c = conns.clone();
    let task = tokio::spawn(async move {
        let mut tasks = tokio::task::JoinSet::new();
        while let Ok((s, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            tasks.spawn(handle(s));
        }
    });
    Responder { url, conns, task }
}

/// Read one request with a `content-length` body from `s` (bytes past it stay in `buf`): its
/// head, lower-cased, and its body; `None` when the client closed.
async fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, Vec<u8>)> {
    let end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i;
        }
        match s.read_buf(buf).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    while buf.len() < end + 4 + len {
        if s.read_buf(buf).await.unwrap_or(0) == 0 {
            return None;
        }
    }
    let body = buf[end + 4..end + 4 + len].to_vec();
    buf.drain(..end + 4 + len);
    Some((head, body))
}

async fn handle(mut s: TcpStream) {
    let mut buf = Vec::new();
    loop {
        let Some((head, body)) = read_request(&mut s, &mut buf).await else {
            return;
        };
        assert!(head.starts_with("post /mcp http/1.1\r\n"), "{head}");
        assert!(
            head.contains("\r\nmcp-protocol-version: 2025-11-25"),
            "{head}"
        );
        assert!(
            head.contains("\r\naccept: application/json, text/event-stream"),
            "{head}"
        );
        assert!(
            head.contains("\r\ncontent-type: application/json"),
            "{head}"
        );
        assert!(head.contains("\r\nx-api-key: k1"), "{head}");
        let req: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let id = req["id"].as_u64().unwrap();
        let mode = req["params"]["arguments"]["mode"]
            .as_str()
            .unwrap_or("json")
            .to_owned();
        let ok = format!(
            r#"{{"jsonrpc":"2.0","id":{id},"result":{{"content":[{{"type":"text","text":"Echo"}}]}}}}"#
        );
        let json = |body: &str, extra: &str| {
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra}\r\n{body}",
                body.len()
            )
        };
        match mode.as_str() {
            "json" => s.write_all(json(&ok, "").as_bytes()).await.unwrap(),
            "tool-error" => {
                let body = format!(
                    r#"{{"jsonrpc":"2.0","id":{id},"result":{{"content":[],"isError":true}}}}"#
                );
                s.write_all(json(&body, "").as_bytes()).await.unwrap();
            }
            "status" => {
                s.write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy")
                    .await
                    .unwrap();
            }
            "close" => {
                s.write_all(json(&ok, "connection: close\r\n").as_bytes())
                    .await
                    .unwrap();
                return;
            }
            "drop" => {
                // Keep-alive advertised, but the server goes away after answering.
                s.write_all(json(&ok, "").as_bytes()).await.unwrap();
                return;
            }
            "sse" => {
                s.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
                )
                .await
                .unwrap();
                let note = "event: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{}}\n\n";
                let resp = format!("event: message\ndata: {ok}\n\n");
                for piece in [note, resp.as_str()] {
                    let chunk = format!("{:x}\r\n{piece}\r\n", piece.len());
                    // Split writes so the client sees partial chunks.
                    let (a, b) = chunk.as_bytes().split_at(chunk.len() / 2);
                    s.write_all(a).await.unwrap();
                    s.flush().await.unwrap();
                    tokio::task::yield_now().await;
                    s.write_all(b).await.unwrap();
                }
                s.write_all(b"0\r\n\r\n").await.unwrap();
            }
            other => panic!("unknown mode {other}"),
        }
    }
}

fn target(url: &str) -> HttpTarget {
    HttpTarget {
        url: parse_url(url).unwrap(),
        protocol_version: "2025-11-25".into(),
        headers: vec![("X-API-Key".into(), "k1".into())],
    }
}

fn template(mode: &str) -> CallTemplate {
    CallTemplate::tools_call("everything__echo", &serde_json::json!({ "mode": mode })).unwrap()
}

#[tokio::test]
async fn raw_client_against_every_answer_style() {
    let r = responder().await;
    let t = target(&r.url);
    let mut c = RawClient::new(&t, template("json"), 1);
    for _ in 0..50 {
        assert_eq!(c.call_once().await, Ok(()));
    }
    assert_eq!(
        r.conns.load(Ordering::SeqCst),
        1,
        "keep-alive: one connection"
    );

    let mut c = RawClient::new(&t, template("sse"), 100);
    for _ in 0..5 {
        assert_eq!(c.call_once().await, Ok(()));
    }
    let before = r.conns.load(Ordering::SeqCst);
    let mut c = RawClient::new(&t, template("close"), 200);
    for _ in 0..3 {
        assert_eq!(c.call_once().await, Ok(()));
    }
    assert_eq!(
        r.conns.load(Ordering::SeqCst) - before,
        3,
        "Connection: close honoured"
    );

    let mut c = RawClient::new(&t, template("drop"), 300);
    for _ in 0..5 {
        assert_eq!(
            c.call_once().await,
            Ok(()),
            "stale keep-alive connection retried"
        );
    }

    let mut c = RawClient::new(&t, template("tool-error"), 400);
    assert_eq!(c.call_once().await.unwrap_err().kind, ErrorKind::Tool);
    assert_eq!(c.call_once().await.unwrap_err().kind, ErrorKind::Tool);
    let mut c = RawClient::new(&t, template("status"), 500);
    assert_eq!(c.call_once().await.unwrap_err().kind, ErrorKind::Http);
}

#[tokio::test]
async fn simple_requests_read_every_framing() {
    let r = responder().await;
    let authority = parse_url(&r.url).unwrap().authority;
    let mut body = Vec::new();
    template("json").write(7, &mut body);
    // The responder checks the MCP headers.
    let headers: Vec<(String, String)> = [
        ("Content-Type", "application/json"),
        ("Accept", "application/json, text/event-stream"),
        ("MCP-Protocol-Version", "2025-11-25"),
        ("X-API-Key", "k1"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    let (status, got) = simple_request(&authority, "POST", "/mcp", &headers, &body)
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(classify(status, BodyKind::Json, &got, 7), Ok(()));
    body.clear();
    template("sse").write(8, &mut body);
    let (status, got) = simple_request(&authority, "POST", "/mcp", &headers, &body)
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(classify(status, BodyKind::Sse, &got, 8), Ok(()));
    body.clear();
    template("status").write(9, &mut body);
    let (status, got) = simple_request(&authority, "POST", "/mcp", &headers, &body)
        .await
        .unwrap();
    assert_eq!((status, got.as_slice()), (503, b"busy".as_slice()));
}

#[tokio::test]
async fn connection_refused_is_a_transport_error() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp", l.local_addr().unwrap());
    drop(l);
    let mut c = RawClient::new(&target(&url), template("json"), 1);
    let e = c.call_once().await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Transport);
    assert!(e.detail.contains("connect to"), "{}", e.detail);
}

#[tokio::test]
async fn load_run_over_http_counts_calls() {
    let r = responder().await;
    let t = target(&r.url);
    let callers: Vec<RawClient> = (0..4)
        .map(|i| RawClient::new(&t, template("json"), (i as u64) << 32))
        .collect();
    let plan = crate::load::Plan {
        warmup: std::time::Duration::from_millis(50),
        duration: std::time::Duration::from_millis(300),
        timeout: std::time::Duration::from_secs(5),
        server_pids: vec![std::process::id()],
    };
    let (_, s) = crate::load::run(callers, &plan).await.unwrap();
    assert_eq!(s.errors.total(), 0, "{:?}", s.first_error);
    assert!(s.latency.count() > 100, "{}", s.latency.count());
    assert!(s.calls_per_s() > 300.0);
    assert_eq!(r.conns.load(Ordering::SeqCst), 4);
}

#[test]
fn rest_answers_are_judged_by_status() {
    assert_eq!(classify_status(201, b"{\"key_id\":\"k\"}"), Ok(()));
    assert_eq!(classify_status(204, b""), Ok(()));
    let e = classify_status(503, b"no leader").unwrap_err();
    assert_eq!(e.kind, ErrorKind::Http);
    assert!(e.detail.contains("503") && e.detail.contains("no leader"));
}

/// Answers every request on a keep-alive connection: 201 while the body names `ok-…`, else 409;
/// records each request head and body.
async fn rest_responder() -> (String, Arc<std::sync::Mutex<Vec<String>>>, Responder) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/api/auth/keys", listener.local_addr().unwrap());
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let conns = Arc::new(AtomicUsize::new(0));
    let (seen2, conns2) = (seen.clone(), conns.clone());
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            conns2.fetch_add(1, Ordering::SeqCst);
            let seen = seen2.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let Some((head, body)) = read_request(&mut s, &mut buf).await else {
                        return;
                    };
                    let body = String::from_utf8_lossy(&body).into_owned();
                    let answer: &[u8] = if body.contains("\"ok-") {
                        b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}"
                    } else {
                        b"HTTP/1.1 409 Conflict\r\ncontent-length: 6\r\n\r\nexists"
                    };
                    seen.lock().unwrap().push(format!("{head}\n\n{body}"));
                    s.write_all(answer).await.unwrap();
                }
            });
        }
    });
    (url.clone(), seen, Responder { url, conns, task })
}

#[tokio::test]
async fn rest_client_posts_the_template_and_counts_2xx() {
    let (url, seen, r) = rest_responder().await;
    let t = HttpTarget {
        url: parse_url(&url).unwrap(),
        protocol_version: String::new(),
        headers: vec![],
    };
    let mut c = RawClient::rest(
        &t,
        CallTemplate::around_id(r#"{"principal_id":"svc","name":"ok-"#, r#""}"#),
        41,
    );
    assert_eq!(c.call_once().await, Ok(()));
    assert_eq!(c.call_once().await, Ok(()));
    let mut bad = RawClient::rest(&t, CallTemplate::around_id(r#"{"name":"x-"#, r#""}"#), 1);
    let e = bad.call_once().await.unwrap_err();
    assert_eq!(
        (e.kind, e.detail.as_str()),
        (ErrorKind::Http, "HTTP 409: exists")
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3);
    assert!(
        seen[0].starts_with("post /api/auth/keys http/1.1\r\n"),
        "{}",
        seen[0]
    );
    assert!(!seen[0].contains("mcp-protocol-version"), "{}", seen[0]);
    assert!(
        seen[0].ends_with(r#"{"principal_id":"svc","name":"ok-41"}"#),
        "{}",
        seen[0]
    );
    assert!(seen[1].ends_with(r#""name":"ok-42"}"#), "{}", seen[1]);
    assert_eq!(r.conns.load(Ordering::SeqCst), 2, "keep-alive per client");
}
