//! Direct stdio target: spawn an MCP server, do the MCP handshake, then let N workers share its
//! one stdin/stdout pipe. Request ids carry the worker index in the low 16 bits and the worker's
//! sequence number above, so one reader task can route each answer without a lookup table.

use std::collections::VecDeque;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::Mutex;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::load::{CallResult, Caller};
use crate::rpc::{CallError, CallTemplate, ErrorKind, Reply, parse_reply, snippet};

/// Bits of the request id that hold the worker index.
const WORKER_BITS: u32 = 16;
/// Bytes of the server's stderr kept for error messages.
const STDERR_TAIL: usize = 4096;

/// The server could not be started or did not complete the handshake.
#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    /// The process could not be spawned.
    #[error(
        "cannot start `{cmd}`: {source} (check the path and that the interpreter is installed)"
    )]
    Spawn {
        /// The command line.
        cmd: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Reading or writing the pipes failed.
    #[error("{what}: {source}; server stderr: {stderr}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
        /// The end of the server's stderr.
        stderr: String,
    },
    /// The handshake failed or the server exited.
    #[error("MCP handshake failed: {reason}; server stderr: {stderr}")]
    Handshake {
        /// Why.
        reason: String,
        /// The end of the server's stderr.
        stderr: String,
    },
}

struct Delivery {
    seq: u64,
    done: Instant,
    outcome: Result<(), CallError>,
}

#[derive(Default)]
struct Routes {
    slots: StdMutex<Vec<Option<UnboundedSender<Delivery>>>>,
    closed: AtomicBool,
}

type Stdin = Arc<Mutex<Option<ChildStdin>>>;

/// A running MCP server on stdio, handshake done, its stdout read by one routing task.
pub struct StdioServer {
    child: Child,
    stdin: Stdin,
    routes: Arc<Routes>,
    reader: JoinHandle<()>,
    stderr_task: JoinHandle<()>,
    stderr: Arc<StdMutex<VecDeque<u8>>>,
    template: CallTemplate,
}

fn tail_of(buf: &StdMutex<VecDeque<u8>>) -> String {
    match buf.lock() {
        Ok(b) => {
            let v: Vec<u8> = b.iter().copied().collect();
            let s = String::from_utf8_lossy(&v).trim().to_owned();
            if s.is_empty() {
                "(empty)".to_owned()
            } else {
                s
            }
        }
        Err(_) => "(unavailable)".to_owned(),
    }
}

impl StdioServer {
    /// Spawn `argv`, send `initialize` (with `protocol_version`) and `notifications/initialized`,
    /// and get ready to send `template` from workers. Gives up after `handshake_timeout`.
    pub async fn start(
        argv: &[String],
        protocol_version: &str,
        template: CallTemplate,
        handshake_timeout: Duration,
    ) -> Result<Self, StdioError> {
        let cmd = argv.join(" ");
        let (prog, args) = argv.split_first().ok_or_else(|| StdioError::Spawn {
            cmd: cmd.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"),
        })?;
        let mut child = Command::new(prog)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| StdioError::Spawn { cmd, source })?;
        let stderr = Arc::new(StdMutex::new(VecDeque::with_capacity(STDERR_TAIL)));
        let stderr_task = match child.stderr.take() {
            Some(mut pipe) => {
                let buf = stderr.clone();
                tokio::spawn(async move {
                    let mut chunk = [0u8; 1024];
                    while let Ok(n) = pipe.read(&mut chunk).await {
                        if n == 0 {
                            break;
                        }
                        if let Ok(mut b) = buf.lock() {
                            b.extend(&chunk[..n]);
                            let excess = b.len().saturating_sub(STDERR_TAIL);
                            b.drain(..excess);
                        }
                    }
                })
            }
            None => tokio::spawn(async {}),
        };
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err(StdioError::Handshake {
                reason: "the child has no stdin/stdout pipes".into(),
                stderr: tail_of(&stderr),
            });
        };
        let stdin: Stdin = Arc::new(Mutex::new(Some(stdin)));
        let mut reader = BufReader::with_capacity(64 * 1024, stdout);
        let hs = handshake(&stdin, &mut reader, protocol_version);
        let outcome = match tokio::time::timeout(handshake_timeout, hs).await {
            Ok(r) => r,
            Err(_) => Err(HsError::Protocol(format!(
                "no answer to initialize within {handshake_timeout:?}"
            ))),
        };
        if let Err(e) = outcome {
            // Let the stderr reader catch up (the server usually says why it failed).
            let mut stderr_task = stderr_task;
            let _ = tokio::time::timeout(Duration::from_millis(500), &mut stderr_task).await;
            stderr_task.abort();
            let tail = tail_of(&stderr);
            return Err(match e {
                HsError::Io(what, source) => StdioError::Io {
                    what,
                    source,
                    stderr: tail,
                },
                HsError::Protocol(reason) => StdioError::Handshake {
                    reason,
                    stderr: tail,
                },
            });
        }
        let routes = Arc::new(Routes::default());
        let reader = tokio::spawn(read_loop(reader, routes.clone(), stdin.clone()));
        Ok(Self {
            child,
            stdin,
            routes,
            reader,
            stderr_task,
            stderr,
            template,
        })
    }

    /// The server's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The end of the server's stderr so far.
    pub fn stderr_tail(&self) -> String {
        tail_of(&self.stderr)
    }

    /// A caller for worker `index` (< 65536). A new caller for the same index replaces the old.
    pub fn caller(&self, index: usize) -> StdioCaller {
        let (tx, rx) = unbounded_channel();
        if let Ok(mut slots) = self.routes.slots.lock() {
            if slots.len() <= index {
                slots.resize_with(index + 1, || None);
            }
            slots[index] = Some(tx);
        }
        StdioCaller {
            worker: index as u64 & ((1 << WORKER_BITS) - 1),
            seq: 0,
            line: Vec::with_capacity(1024),
            template: self.template.clone(),
            stdin: self.stdin.clone(),
            rx,
            routes: self.routes.clone(),
        }
    }

    /// Close stdin, give the server `grace` to exit, then kill it.
    pub async fn shutdown(mut self, grace: Duration) {
        self.stdin.lock().await.take();
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
        self.reader.abort();
        self.stderr_task.abort();
    }
}

enum HsError {
    Io(&'static str, std::io::Error),
    Protocol(String),
}

async fn handshake(
    stdin: &Stdin,
    reader: &mut BufReader<ChildStdout>,
    protocol_version: &str,
) -> Result<(), HsError> {
    let init = serde_json::json!({
        "jsonrpc": "2.0", "id": 0, "method": "initialize",
        "params": {
            "protocolVersion": protocol_version,
            "capabilities": {},
            "clientInfo": { "name": "hangar-bench", "version": env!("CARGO_PKG_VERSION") }
        }
    });
    write_line(stdin, init.to_string().as_bytes())
        .await
        .map_err(|e| HsError::Io("write initialize", e))?;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .await
            .map_err(|e| HsError::Io("read initialize response", e))?;
        if n == 0 {
            return Err(HsError::Protocol(
                "the server closed stdout (exited?)".into(),
            ));
        }
        match parse_reply(line.trim_ascii()) {
            Ok(Reply::Response {
                id: Some(0),
                outcome,
            }) => {
                outcome
                    .map_err(|e| HsError::Protocol(format!("initialize failed: {}", e.detail)))?;
                break;
            }
            Ok(Reply::Request { id, .. }) => {
                let err = serde_json::json!({"jsonrpc":"2.0","id":id,
                    "error":{"code":-32601,"message":"hangar-bench does not serve this method"}});
                write_line(stdin, err.to_string().as_bytes())
                    .await
                    .map_err(|e| HsError::Io("answer a server request", e))?;
            }
            _ => {}
        }
    }
    write_line(
        stdin,
        br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
    )
    .await
    .map_err(|e| HsError::Io("write notifications/initialized", e))
}

async fn write_line(stdin: &Stdin, bytes: &[u8]) -> std::io::Result<()> {
    let mut guard = stdin.lock().await;
    let w = guard
        .as_mut()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "stdin closed"))?;
    let mut buf = Vec::with_capacity(bytes.len() + 1);
    buf.extend_from_slice(bytes);
    buf.push(b'\n');
    w.write_all(&buf).await
}

async fn read_loop(mut reader: BufReader<ChildStdout>, routes: Arc<Routes>, stdin: Stdin) {
    let mut line = Vec::with_capacity(64 * 1024);
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let done = Instant::now();
        let msg = line.trim_ascii();
        if msg.is_empty() {
            continue;
        }
        match parse_reply(msg) {
            Ok(Reply::Response {
                id: Some(id),
                outcome,
            }) => {
                let worker = (id & ((1 << WORKER_BITS) - 1)) as usize;
                let delivery = Delivery {
                    seq: id >> WORKER_BITS,
                    done,
                    outcome,
                };
                if let Ok(slots) = routes.slots.lock()
                    && let Some(Some(tx)) = slots.get(worker)
                {
                    let _ = tx.send(delivery);
                }
            }
            Ok(Reply::Request { id, method }) => {
                let err = serde_json::json!({"jsonrpc":"2.0","id":id,
                    "error":{"code":-32601,"message":format!("hangar-bench does not serve {method}")}});
                let _ = write_line(&stdin, err.to_string().as_bytes()).await;
            }
            // Notifications, responses we cannot route, non-JSON output: ignored.
            _ => {}
        }
    }
    routes.closed.store(true, Ordering::SeqCst);
    if let Ok(mut slots) = routes.slots.lock() {
        slots.clear();
    }
}

/// One worker's slot on the shared pipe.
pub struct StdioCaller {
    worker: u64,
    seq: u64,
    line: Vec<u8>,
    template: CallTemplate,
    stdin: Stdin,
    rx: UnboundedReceiver<Delivery>,
    routes: Arc<Routes>,
}

impl StdioCaller {
    async fn call_inner(&mut self) -> CallResult {
        let fail = |detail: String| CallResult {
            outcome: Err(CallError::new(ErrorKind::Transport, detail)),
            done: Instant::now(),
        };
        if self.routes.closed.load(Ordering::SeqCst) {
            return fail("the server closed stdout (exited?)".into());
        }
        self.seq += 1;
        let id = (self.seq << WORKER_BITS) | self.worker;
        self.line.clear();
        self.template.write(id, &mut self.line);
        self.line.push(b'\n');
        {
            let mut guard = self.stdin.lock().await;
            let Some(w) = guard.as_mut() else {
                return fail("the server's stdin is closed".into());
            };
            if let Err(e) = w.write_all(&self.line).await {
                return fail(format!("write to the server's stdin: {e}"));
            }
        }
        loop {
            match self.rx.recv().await {
                None => return fail("the server closed stdout (exited?)".into()),
                Some(d) if d.seq == self.seq => {
                    return CallResult {
                        outcome: d.outcome,
                        done: d.done,
                    };
                }
                // A late answer to a call that timed out.
                Some(_) => {}
            }
        }
    }

    /// The request line most recently sent (for tests and diagnostics).
    pub fn last_request(&self) -> String {
        snippet(&self.line, 500)
    }
}

impl Caller for StdioCaller {
    fn call(&mut self) -> impl std::future::Future<Output = CallResult> + Send {
        self.call_inner()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny MCP server in POSIX sh: answers initialize, then echoes every tools/call with
    /// the same id; a call whose arguments contain "fail" gets isError.
    const SH_SERVER: &str = r#"
while IFS= read -r line; do
  id=$(printf '%s' "$line" | sed -n 's/.*"id":\([0-9]*\).*/\1/p')
  case "$line" in
    *'"initialize"'*) printf '{"jsonrpc":"2.0","id":%s,"result":{"protocolVersion":"2025-11-25","capabilities":{"tools":{}},"serverInfo":{"name":"sh","version":"0"}}}\n' "$id" ;;
    *'"notifications/'*) printf '{"jsonrpc":"2.0","method":"notifications/message","params":{"level":"info","data":"hi"}}\n' ;;
    *fail*) printf '{"jsonrpc":"2.0","id":%s,"result":{"content":[],"isError":true}}\n' "$id" ;;
    *'"tools/call"'*) printf '{"jsonrpc":"2.0","id":%s,"result":{"content":[{"type":"text","text":"ok"}]}}\n' "$id" ;;
  esac
done
"#;

    fn argv() -> Vec<String> {
        vec!["sh".into(), "-c".into(), SH_SERVER.into()]
    }

    #[tokio::test]
    async fn handshake_and_multiplexed_calls() {
        let t = CallTemplate::tools_call("echo", &serde_json::json!({"message":"hi"})).unwrap();
        let srv = StdioServer::start(&argv(), "2025-11-25", t, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(srv.pid().is_some());
        let mut callers: Vec<StdioCaller> = (0..3).map(|i| srv.caller(i)).collect();
        let mut tasks = Vec::new();
        for mut c in callers.drain(..) {
            tasks.push(tokio::spawn(async move {
                for _ in 0..5 {
                    let r = c.call().await;
                    assert_eq!(r.outcome, Ok(()), "{}", c.last_request());
                }
                c
            }));
        }
        for t in tasks {
            let c = t.await.unwrap();
            assert_eq!(c.seq, 5);
        }
        srv.shutdown(Duration::from_secs(5)).await;
    }

    #[tokio::test]
    async fn tool_errors_and_server_exit() {
        let t = CallTemplate::tools_call("echo", &serde_json::json!({"message":"fail"})).unwrap();
        let srv = StdioServer::start(&argv(), "2025-11-25", t, Duration::from_secs(10))
            .await
            .unwrap();
        let mut c = srv.caller(0);
        let r = c.call().await;
        assert_eq!(r.outcome.unwrap_err().kind, ErrorKind::Tool);
        let pid = srv.pid().unwrap();
        srv.shutdown(Duration::from_secs(5)).await;
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
        // The pipe is gone: the call fails fast instead of hanging.
        let r = tokio::time::timeout(Duration::from_secs(5), c.call())
            .await
            .unwrap();
        assert_eq!(r.outcome.unwrap_err().kind, ErrorKind::Transport);
    }

    #[tokio::test]
    async fn a_server_that_exits_reports_its_stderr() {
        let argv: Vec<String> = vec!["sh".into(), "-c".into(), "echo boom-123 >&2; exit 3".into()];
        let t = CallTemplate::tools_call("echo", &serde_json::json!({})).unwrap();
        let err = StdioServer::start(&argv, "2025-11-25", t, Duration::from_secs(10))
            .await
            .err()
            .unwrap();
        let msg = err.to_string();
        assert!(
            msg.contains("handshake") || msg.contains("write initialize"),
            "{msg}"
        );
        assert!(msg.contains("boom-123"), "{msg}");
        let t = CallTemplate::tools_call("echo", &serde_json::json!({})).unwrap();
        let err = StdioServer::start(
            &["/nonexistent/server".to_owned()],
            "x",
            t,
            Duration::from_secs(1),
        )
        .await
        .err()
        .unwrap();
        assert!(matches!(err, StdioError::Spawn { .. }), "{err}");
    }
}
