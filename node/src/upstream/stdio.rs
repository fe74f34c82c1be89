//! stdio child-process transport: newline-delimited JSON-RPC over the child's stdin/stdout,
//! many concurrent calls multiplexed by our own ids, stderr kept in a bounded ring.

use std::collections::HashMap;
use std::collections::VecDeque;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{Notify, mpsc, oneshot};

use super::{CallSink, LogLine, Outcome, StdioSpec, UpstreamError};
use crate::jsonrpc::{Id, Kind, Message};
use crate::telemetry::unix_now;

const RING_LINES: usize = 1000;
const RING_LINE_BYTES: usize = 8192;
const MAX_LINE: usize = 16 * 1024 * 1024;

/// The bounded stderr ring.
#[derive(Default)]
pub struct Ring {
    lines: Mutex<VecDeque<LogLine>>,
}

impl Ring {
    /// Append one line (truncated to 8192 bytes), dropping the oldest beyond 1000 lines.
    pub fn push(&self, stream: &str, line: &str) {
        let mut l = line.trim_end_matches(['\r', '\n']).to_owned();
        if l.len() > RING_LINE_BYTES {
            let mut cut = RING_LINE_BYTES;
            while !l.is_char_boundary(cut) {
                cut -= 1;
            }
            l.truncate(cut);
        }
        let mut lines = self.lines.lock();
        if lines.len() == RING_LINES {
            lines.pop_front();
        }
        lines.push_back(LogLine {
            timestamp: unix_now(),
            line: l,
            stream: stream.to_owned(),
        });
    }

    /// The last `n` lines.
    pub fn tail(&self, n: usize) -> Vec<LogLine> {
        let lines = self.lines.lock();
        let skip = lines.len().saturating_sub(n);
        lines.iter().skip(skip).cloned().collect()
    }
}

pub(super) struct PendingCall {
    pub tx: oneshot::Sender<Result<Outcome, UpstreamError>>,
    pub sink: Option<CallSink>,
    pub progress: Option<(String, Box<serde_json::value::RawValue>)>,
}

/// Shared state between the handle and the reader/writer tasks.
pub(super) struct Shared {
    pub pending: Mutex<HashMap<u64, PendingCall>>,
    pub progress: Mutex<HashMap<String, u64>>,
    pub alive: AtomicBool,
    pub closed: Notify,
    pub exit: Mutex<Option<String>>,
    pub ring: Ring,
}

/// A running child process.
pub struct StdioConn {
    pub(super) shared: Arc<Shared>,
    pub(super) writer: mpsc::Sender<String>,
    pub(super) next_id: AtomicU64,
    pid: Option<u32>,
    child: tokio::sync::Mutex<Option<Child>>,
    pub(super) notes: tokio::sync::broadcast::Sender<Arc<Message>>,
}

impl StdioConn {
    /// Spawn the child and its reader/writer/stderr tasks (no handshake).
    pub fn spawn(
        server_id: &str,
        spec: &StdioSpec,
        notes: tokio::sync::broadcast::Sender<Arc<Message>>,
    ) -> Result<Arc<StdioConn>, UpstreamError> {
        let Some(program) = spec.argv.first() else {
            return Err(UpstreamError::Spawn {
                server: server_id.to_owned(),
                message: "the command is empty".into(),
            });
        };
        // setpriv --pdeathsig KILL: the kernel kills the child if this node dies, even on
        // SIGKILL (no orphans). It execs in place, so the pid is the server's.
        let setpriv = std::path::Path::new("/usr/bin/setpriv");
        let mut cmd = if setpriv.exists() {
            let mut c = Command::new(setpriv);
            c.arg("--pdeathsig").arg("KILL").arg("--").arg(program);
            c
        } else {
            Command::new(program)
        };
        cmd.args(&spec.argv[1..])
            .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("MCP_TRANSPORT", "stdio")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        if let Some(cwd) = &spec.cwd {
            cmd.current_dir(cwd);
        }
        let mut child = cmd.spawn().map_err(|e| UpstreamError::Spawn {
            server: server_id.to_owned(),
            message: format!("cannot run '{program}': {e}"),
        })?;
        let pid = child.id();
        let (Some(stdin), Some(stdout), Some(stderr)) = (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(UpstreamError::Spawn {
                server: server_id.to_owned(),
                message: "the child's stdio pipes are missing".into(),
            });
        };
        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::new()),
            progress: Mutex::new(HashMap::new()),
            alive: AtomicBool::new(true),
            closed: Notify::new(),
            exit: Mutex::new(None),
            ring: Ring::default(),
        });
        let (wtx, mut wrx) = mpsc::channel::<String>(1024);
        // Writer: batches lines, flushes when the queue is empty.
        let sh = shared.clone();
        tokio::spawn(async move {
            let mut w = tokio::io::BufWriter::with_capacity(64 * 1024, stdin);
            while let Some(line) = wrx.recv().await {
                if w.write_all(line.as_bytes()).await.is_err() {
                    break;
                }
                if wrx.is_empty() && w.flush().await.is_err() {
                    break;
                }
            }
            let _ = w.shutdown().await;
            drop(sh);
        });
        // stderr → ring
        let sh = shared.clone();
        tokio::spawn(async move {
            let mut r = BufReader::new(stderr);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => sh.ring.push("stderr", &String::from_utf8_lossy(&buf)),
                }
            }
        });
        let conn = Arc::new(StdioConn {
            shared: shared.clone(),
            writer: wtx,
            next_id: AtomicU64::new(1),
            pid,
            child: tokio::sync::Mutex::new(Some(child)),
            notes,
        });
        // Reader
        let weak = Arc::downgrade(&conn);
        let server = server_id.to_owned();
        tokio::spawn(async move {
            let mut r = BufReader::with_capacity(64 * 1024, stdout);
            let mut buf = Vec::with_capacity(8192);
            let mut garbage_logged = 0u32;
            loop {
                buf.clear();
                match read_line(&mut r, &mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                if buf.len() > MAX_LINE {
                    shared.ring.push("stdout-garbage", "(a message longer than 16 MiB was skipped)");
                    continue;
                }
                let line = trim(&buf);
                if line.is_empty() {
                    continue;
                }
                let Some(conn) = weak.upgrade() else { break };
                match serde_json::from_slice::<Message>(line) {
                    Ok(msg) => conn.dispatch(msg).await,
                    Err(_) => {
                        shared.ring.push("stdout-garbage", &String::from_utf8_lossy(line));
                        if garbage_logged < 10 {
                            garbage_logged += 1;
                            tracing::warn!(mcp_server = %server, "upstream_wrote_non_json_to_stdout (ignored)");
                        }
                    }
                }
            }
            // EOF: the process is gone or closed stdout. Fail everything in flight at once.
            let status = match weak.upgrade() {
                Some(conn) => conn.reap().await,
                None => None,
            };
            let why = status.unwrap_or_else(|| "stdout closed".to_owned());
            *shared.exit.lock() = Some(why.clone());
            shared.alive.store(false, Ordering::SeqCst);
            let pending: Vec<PendingCall> = shared.pending.lock().drain().map(|(_, p)| p).collect();
            for p in pending {
                let _ = p.tx.send(Err(UpstreamError::Closed {
                    server: server.clone(),
                    message: format!("the MCP server process ended during the call ({why})"),
                    before_send: false,
                }));
            }
            shared.closed.notify_waiters();
            tracing::warn!(mcp_server = %server, reason = %why, "upstream_process_ended");
        });
        Ok(conn)
    }

    async fn reap(&self) -> Option<String> {
        let mut guard = self.child.lock().await;
        let child = guard.as_mut()?;
        match tokio::time::timeout(std::time::Duration::from_millis(500), child.wait()).await {
            Ok(Ok(st)) => Some(st.to_string()),
            _ => None,
        }
    }

    /// Child pid.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// Route one message from the child.
    async fn dispatch(&self, msg: Message) {
        match msg.kind() {
            Kind::Response => {
                let Some(Id::Num(n)) = msg.id else { return };
                let Some(p) = self.shared.pending.lock().remove(&(n as u64)) else {
                    return;
                };
                if let Some((tok, _)) = &p.progress {
                    self.shared.progress.lock().remove(tok);
                }
                let outcome = match (msg.result, msg.error) {
                    (Some(r), _) => Outcome::Result(r),
                    (None, Some(e)) => Outcome::Error(e),
                    _ => return,
                };
                let _ = p.tx.send(Ok(outcome));
            }
            Kind::Request => {
                if msg.method.as_deref() == Some("ping") {
                    if let Some(id) = msg.id {
                        let resp = Message::response(id, crate::jsonrpc::empty_object());
                        let _ = self.write(resp.to_json()).await;
                    }
                    return;
                }
                let sink = self.sole_sink();
                match sink {
                    Some(s) => {
                        let _ = s.send(super::CallEvent::Request(msg)).await;
                    }
                    None => {
                        if let Some(id) = msg.id {
                            let err = Message::error(
                                Some(id),
                                crate::jsonrpc::RpcError::new(
                                    crate::jsonrpc::INTERNAL_ERROR,
                                    "Hangar cannot attribute this request to a caller (no single call in flight that accepts requests)",
                                ),
                            );
                            let _ = self.write(err.to_json()).await;
                        }
                    }
                }
            }
            Kind::Notification => {
                let method = msg.method.as_deref().unwrap_or_default();
                if method == "notifications/progress" {
                    let _ = super::route_progress(&self.shared.pending, &self.shared.progress, msg).await;
                    return;
                }
                if method == "notifications/message" {
                    if let Some(s) = self.sole_sink() {
                        let _ = s.send(super::CallEvent::Notification(msg)).await;
                        return;
                    }
                }
                let _ = self.notes.send(Arc::new(msg));
            }
            Kind::Invalid => {}
        }
    }

    fn sole_sink(&self) -> Option<CallSink> {
        let pending = self.shared.pending.lock();
        let mut sinks = pending.values().filter_map(|p| p.sink.clone());
        let first = sinks.next()?;
        if sinks.next().is_some() {
            return None;
        }
        Some(first)
    }

    /// Queue one line for the child's stdin.
    pub(super) async fn write(&self, mut line: String) -> Result<(), ()> {
        line.push('\n');
        self.writer.send(line).await.map_err(|_| ())
    }

    /// Terminate the child: close stdin, wait, SIGTERM the group, wait, SIGKILL.
    pub async fn shutdown(&self) {
        let mut guard = self.child.lock().await;
        let Some(mut child) = guard.take() else { return };
        let pid = child.id();
        // Closing the writer channel closes stdin.
        if tokio::time::timeout(std::time::Duration::from_millis(300), child.wait())
            .await
            .is_ok()
        {
            return;
        }
        if let Some(pid) = pid {
            signal_group(pid, "TERM");
        }
        if tokio::time::timeout(std::time::Duration::from_secs(2), child.wait())
            .await
            .is_ok()
        {
            return;
        }
        if let Some(pid) = pid {
            signal_group(pid, "KILL");
        }
        let _ = child.kill().await;
    }

    /// stderr ring tail.
    pub fn logs(&self, n: usize) -> Vec<LogLine> {
        self.shared.ring.tail(n)
    }
}

fn signal_group(pid: u32, sig: &str) {
    // kill(1) on the negative pid signals the whole process group without `unsafe`.
    let _ = std::process::Command::new("kill")
        .args(["-s", sig, "--"])
        .arg(format!("-{pid}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut total = 0;
    loop {
        let chunk = r.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(total);
        }
        let (used, done) = match chunk.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        if buf.len() <= MAX_LINE {
            buf.extend_from_slice(&chunk[..used]);
        }
        r.consume(used);
        total += used;
        if done {
            return Ok(total);
        }
    }
}

fn trim(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|c| !c.is_ascii_whitespace()).unwrap_or(b.len());
    let end = b.iter().rposition(|c| !c.is_ascii_whitespace()).map_or(start, |i| i + 1);
    &b[start..end]
}
