//! stdio child-process transport: newline-delimited JSON-RPC over the child's stdin/stdout,
//! many concurrent calls multiplexed by our own ids, stderr kept in a bounded ring.
//!
//! Tasks per child: one writer (queue → buffered stdin, flushed when the queue is empty),
//! one stdout reader (routes answers, notifications and server→client requests), one stderr
//! reader (fills the ring) and one waiter (owns the `Child`, reaps it, kills the process group
//! when the connection is dropped). Process exit or stdout EOF fails every in-flight call at
//! once.
//!
//! No orphans: the child runs in its own process group, started through `hangar exec-child`
//! (the node's own binary; `/usr/bin/setpriv --pdeathsig KILL` when this code runs inside
//! another program), which arms the parent-death signal so the kernel kills it if this process dies, even
//! by SIGKILL. Linux delivers the parent-death signal when the *thread* that spawned the child
//! exits, so spawn from a long-lived runtime worker (never from `spawn_blocking`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::value::RawValue;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::lease::{Lease, LeasePipe, LeaseWatch};
use super::{CallEvent, CallSink, LogLine, Outcome, StdioSpec, UpstreamError};
use crate::jsonrpc::{INTERNAL_ERROR, Id, Kind, Message, RpcError, raw_from_object, raw_object};
use crate::lines::read_line_capped;
use crate::telemetry::unix_now;

/// Lines kept in the stderr ring.
pub(super) const RING_LINES: usize = 1000;
/// Bytes kept per ring line.
pub(super) const RING_LINE_BYTES: usize = 8192;
/// Longest stdout line accepted as a message.
pub(super) const MAX_LINE: usize = 16 * 1024 * 1024;
/// Outgoing queue length; beyond it requests fail with `Overloaded`.
const WRITE_QUEUE: usize = 4096;
/// Non-JSON stdout lines copied into the ring per second (the rest are counted).
const GARBAGE_PER_SEC: u32 = 20;
/// How long EOF waits for the exit status (and exit for the reader to drain) before failing calls.
const EXIT_GRACE: Duration = Duration::from_millis(250);

/// The bounded stderr ring.
#[derive(Default)]
pub(super) struct Ring {
    lines: Mutex<VecDeque<LogLine>>,
}

impl Ring {
    /// Append one line (truncated to 8192 bytes), dropping the oldest beyond 1000 lines.
    pub(super) fn push(&self, stream: &str, line: &[u8]) {
        let line = trim_eol(line);
        let line = &line[..line.len().min(RING_LINE_BYTES)];
        // Lossy decoding may cut a multi-byte character in half at the limit; that shows as U+FFFD.
        let mut text = String::from_utf8_lossy(line).into_owned();
        if text.len() > RING_LINE_BYTES {
            let mut cut = RING_LINE_BYTES;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        let entry = LogLine {
            timestamp: unix_now(),
            line: text,
            stream: stream.to_owned(),
        };
        let mut lines = self.lines.lock();
        if lines.len() >= RING_LINES {
            lines.pop_front();
        }
        lines.push_back(entry);
    }

    /// The last `n` lines, oldest first.
    pub(super) fn tail(&self, n: usize) -> Vec<LogLine> {
        let lines = self.lines.lock();
        let skip = lines.len().saturating_sub(n);
        lines.iter().skip(skip).cloned().collect()
    }
}

/// One call waiting for its answer.
pub(super) struct PendingCall {
    tx: oneshot::Sender<Result<Outcome, UpstreamError>>,
    sink: Option<CallSink>,
    /// (token sent upstream, the caller's original token).
    progress: Option<(String, Box<RawValue>)>,
}

/// Calls in flight, with the indexes routing needs. One lock.
#[derive(Default)]
struct Calls {
    map: HashMap<u64, PendingCall>,
    /// Rewritten progress token → call id.
    tokens: HashMap<String, u64>,
    /// Calls that have a sink (attribution of server→client requests and logs).
    with_sink: HashSet<u64>,
    /// Server→client request id (as JSON text) → the call it was delivered to.
    server_requests: HashMap<String, u64>,
    /// Set once the connection is gone; no call may be added afterwards.
    closed: Option<String>,
}

impl Calls {
    fn remove(&mut self, id: u64) -> Option<PendingCall> {
        let p = self.map.remove(&id)?;
        if let Some((tok, _)) = &p.progress {
            self.tokens.remove(tok);
        }
        if p.sink.is_some() {
            self.with_sink.remove(&id);
            if !self.server_requests.is_empty() {
                self.server_requests.retain(|_, call| *call != id);
            }
        }
        Some(p)
    }

    /// The sink of the only in-flight call that has one.
    fn sole_sink(&self) -> Option<(u64, CallSink)> {
        if self.with_sink.len() != 1 {
            return None;
        }
        let id = *self.with_sink.iter().next()?;
        Some((id, self.map.get(&id)?.sink.clone()?))
    }
}

/// State shared by the handle and the tasks.
struct Shared {
    server: String,
    calls: Mutex<Calls>,
    ring: Ring,
    /// Cancelled once the connection is gone (calls failed, `closed()` resolves).
    closed: CancellationToken,
    /// Set by `shutdown`: the end is expected, not worth a warning.
    stopping: std::sync::atomic::AtomicBool,
    /// Cancelled once the process has been reaped; `exit` then holds its status.
    exited: CancellationToken,
    exit: Mutex<Option<String>>,
    /// Cancelled once stdout hit EOF (everything the process wrote has been routed).
    stdout_done: CancellationToken,
    /// Cancelled once the writer has stopped; `unsent` then holds the ids of the requests
    /// it never got into the pipe.
    writer_done: CancellationToken,
    unsent: Mutex<HashSet<u64>>,
}

impl Shared {
    /// Mark the connection gone and fail every call in flight. Idempotent. Calls whose
    /// request the writer never got into the pipe (`unsent`) fail as "before send", so that
    /// routing may retry them elsewhere.
    fn close(&self, why: &str) {
        let unsent = std::mem::take(&mut *self.unsent.lock());
        let drained = {
            let mut calls = self.calls.lock();
            if calls.closed.is_some() {
                return;
            }
            calls.closed = Some(why.to_owned());
            calls.tokens.clear();
            calls.with_sink.clear();
            calls.server_requests.clear();
            std::mem::take(&mut calls.map)
        };
        for (id, p) in drained {
            let before_send = unsent.contains(&id);
            let message = if before_send {
                format!("the MCP server process ended before the request reached it ({why})")
            } else {
                format!("the MCP server process ended during the call ({why})")
            };
            let _ = p.tx.send(Err(UpstreamError::Closed {
                server: self.server.clone(),
                message,
                before_send,
            }));
        }
        self.closed.cancel();
        if self.stopping.load(Ordering::Relaxed) {
            tracing::debug!(mcp_server = %self.server, reason = %why, "upstream_process_stopped");
        } else {
            tracing::warn!(mcp_server = %self.server, reason = %why, "upstream_process_ended");
        }
    }

    fn closed_error(&self, before_send: bool) -> UpstreamError {
        let why = self
            .calls
            .lock()
            .closed
            .clone()
            .unwrap_or_else(|| "the process cannot be written to".to_owned());
        UpstreamError::Closed {
            server: self.server.clone(),
            message: format!("the MCP server process is not running ({why})"),
            before_send,
        }
    }
}

/// A running child process.
pub(super) struct StdioConn {
    shared: Arc<Shared>,
    writer: mpsc::Sender<Vec<u8>>,
    next_id: AtomicU64,
    pid: Option<u32>,
    /// Closes the child's stdin (first step of an orderly stop).
    stdin_close: CancellationToken,
    /// Kills the process group (on drop, or at the end of `shutdown`).
    kill: CancellationToken,
    shutdown_lock: tokio::sync::Mutex<()>,
}

impl Drop for StdioConn {
    fn drop(&mut self) {
        self.kill.cancel();
    }
}

impl StdioConn {
    /// Spawn the child and its tasks (no handshake).
    pub(super) fn spawn(
        server_id: &str,
        spec: &StdioSpec,
        notes: broadcast::Sender<Arc<Message>>,
        lease: Option<&LeaseWatch>,
    ) -> Result<Arc<StdioConn>, UpstreamError> {
        let spawn_err = |message: String| UpstreamError::Spawn {
            server: server_id.to_owned(),
            message,
        };
        let Some(program) = spec.argv.first() else {
            return Err(spawn_err(
                "the command is empty; set `command` to the program and its arguments".into(),
            ));
        };
        // Check the program ourselves: behind setpriv an exec failure would only show as an
        // early exit, and the caller must learn that the request never left.
        resolve_program(program, spec)
            .map_err(|e| spawn_err(format!("cannot run '{program}': {e}")))?;
        let shim = death_shim();
        let lease = match (lease, &shim) {
            (Some(rx), Some(Shim::Hangar(_))) => match *rx.borrow() {
                Lease::NotRequired => None,
                Lease::Until(deadline) => {
                    if !Lease::Until(deadline).held() {
                        return Err(spawn_err(
                            "this node holds no placement lease (it lost contact with the cluster's leader)".into(),
                        ));
                    }
                    let pipe = LeasePipe::new(deadline)
                        .map_err(|e| spawn_err(format!("cannot make the lease pipe: {e}")))?;
                    Some((pipe, rx.clone()))
                }
            },
            (Some(_), _) => {
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| {
                    tracing::warn!("not running as the hangar binary: placement leases are enforced by the node only, not by a process-level shim");
                });
                None
            }
            (None, _) => None,
        };
        let mut cmd = match shim {
            Some(Shim::Hangar(exe)) => {
                let mut c = Command::new(exe);
                c.args(["exec-child", "--parent", &std::process::id().to_string()]);
                if let Some((pipe, _)) = &lease {
                    c.args(["--lease-fd", &pipe.read_fd().to_string()]);
                }
                c.arg("--").arg(program);
                c
            }
            Some(Shim::Setpriv(setpriv)) => {
                let mut c = Command::new(setpriv);
                c.args(["--pdeathsig", "KILL", "--"]).arg(program);
                c
            }
            None => Command::new(program),
        };
        cmd.args(&spec.argv[1..])
            .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        if let Some(cwd) = &spec.cwd {
            cmd.current_dir(cwd);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| spawn_err(format!("cannot run '{program}': {e}")))?;
        let pid = child.id();
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(spawn_err("the child's stdio pipes are missing".into()));
        };
        tracing::debug!(mcp_server = server_id, pid = ?pid, "upstream_process_started");

        let shared = Arc::new(Shared {
            server: server_id.to_owned(),
            calls: Mutex::new(Calls::default()),
            ring: Ring::default(),
            closed: CancellationToken::new(),
            stopping: std::sync::atomic::AtomicBool::new(false),
            exited: CancellationToken::new(),
            exit: Mutex::new(None),
            stdout_done: CancellationToken::new(),
            writer_done: CancellationToken::new(),
            unsent: Mutex::new(HashSet::new()),
        });
        let (wtx, wrx) = mpsc::channel::<Vec<u8>>(WRITE_QUEUE);
        let stdin_close = CancellationToken::new();
        let kill = CancellationToken::new();

        if let Some((pipe, rx)) = lease {
            pipe.feed(rx, shared.exited.clone());
        }
        tokio::spawn(write_loop(shared.clone(), stdin, wrx, stdin_close.clone()));
        tokio::spawn(stderr_loop(shared.clone(), stderr));
        tokio::spawn(wait_loop(
            shared.clone(),
            child,
            pid,
            kill.clone(),
            stdin_close.clone(),
        ));
        let reader = Reader {
            shared: shared.clone(),
            writer: wtx.clone(),
            notes,
            garbage: GarbageLimiter::default(),
        };
        tokio::spawn(reader.run(stdout));

        Ok(Arc::new(StdioConn {
            shared,
            writer: wtx,
            next_id: AtomicU64::new(1),
            pid,
            stdin_close,
            kill,
            shutdown_lock: tokio::sync::Mutex::new(()),
        }))
    }

    /// Send one request and wait for its answer (see [`super::Upstream::request`]).
    pub(super) async fn call(
        &self,
        method: &str,
        params: Option<Box<RawValue>>,
        sink: Option<CallSink>,
        progress: Option<(String, Box<RawValue>)>,
        timeout: Duration,
    ) -> Result<Outcome, UpstreamError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let msg = Message::request(Id::Num(id as i64), method, params);
        let mut line = Vec::with_capacity(96 + msg.params.as_ref().map_or(0, |p| p.get().len()));
        serde_json::to_writer(&mut line, &msg).map_err(|e| UpstreamError::Protocol {
            server: self.shared.server.clone(),
            message: format!("cannot serialize the request: {e}"),
        })?;
        line.push(b'\n');
        let (tx, rx) = oneshot::channel();
        {
            let mut calls = self.shared.calls.lock();
            // Once the process has been reaped nothing can reach it, even if the
            // connection is not closed yet (the reader may still be draining stdout).
            if calls.closed.is_some() || self.shared.exited.is_cancelled() {
                drop(calls);
                return Err(self.shared.closed_error(true));
            }
            if let Some((tok, _)) = &progress {
                calls.tokens.insert(tok.clone(), id);
            }
            if sink.is_some() {
                calls.with_sink.insert(id);
            }
            calls.map.insert(id, PendingCall { tx, sink, progress });
        }
        let mut guard = CallGuard {
            conn: self,
            id,
            sent: false,
            done: false,
            cancellable: method != "initialize",
        };
        match self.writer.try_send(line) {
            Ok(()) => guard.sent = true,
            Err(TrySendError::Full(_)) => {
                return Err(UpstreamError::Overloaded {
                    server: self.shared.server.clone(),
                    message: format!(
                        "{WRITE_QUEUE} messages are already queued for this server; retry later"
                    ),
                });
            }
            Err(TrySendError::Closed(_)) => return Err(self.shared.closed_error(true)),
        }
        let answer = tokio::time::timeout(timeout, rx).await;
        match answer {
            Ok(Ok(r)) => {
                guard.done = true;
                r
            }
            Ok(Err(_)) => {
                guard.done = true;
                Err(self.shared.closed_error(false))
            }
            // The guard removes the call and tells the server to stop working on it.
            Err(_) => Err(UpstreamError::Timeout {
                server: self.shared.server.clone(),
                secs: timeout.as_secs_f64(),
            }),
        }
    }

    /// Queue a notification or a response for the child.
    pub(super) async fn send(&self, msg: &Message) -> Result<(), UpstreamError> {
        let mut line = msg.to_json().into_bytes();
        line.push(b'\n');
        if self.shared.calls.lock().closed.is_some() {
            return Err(self.shared.closed_error(true));
        }
        self.writer
            .send(line)
            .await
            .map_err(|_| self.shared.closed_error(true))
    }

    /// Answer a server→client request.
    pub(super) async fn respond(&self, msg: &Message) -> Result<(), UpstreamError> {
        if let Some(id) = &msg.id {
            let key = id_key(id);
            self.shared.calls.lock().server_requests.remove(&key);
        }
        self.send(msg).await
    }

    /// Whether the connection can take new requests: the process is running and readable.
    /// False as soon as the process has been reaped, even while the reader still drains what
    /// it wrote before exiting (new requests are refused from then on, see [`Self::call`]).
    pub(super) fn is_alive(&self) -> bool {
        !self.shared.closed.is_cancelled() && !self.shared.exited.is_cancelled()
    }

    /// Resolves once the connection is gone.
    pub(super) async fn closed(&self) {
        self.shared.closed.cancelled().await;
    }

    /// Child pid.
    pub(super) fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// stderr ring tail.
    pub(super) fn logs(&self, n: usize) -> Vec<LogLine> {
        self.shared.ring.tail(n)
    }

    /// Orderly stop: close stdin, wait 3 s, SIGTERM the group, wait 2 s, SIGKILL. Idempotent.
    /// Kill the process group now (a child that stopped answering gets no orderly stop: a
    /// stopped or wedged process would ignore it), and wait a bounded time for the exit.
    pub(super) async fn kill_now(&self) {
        let _one_at_a_time = self.shutdown_lock.lock().await;
        self.shared.stopping.store(true, Ordering::Relaxed);
        self.kill.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.shared.exited.cancelled()).await;
        if tokio::time::timeout(EXIT_GRACE * 2, self.shared.closed.cancelled())
            .await
            .is_err()
        {
            self.shared.close("killed by Hangar");
        }
    }

    pub(super) async fn shutdown(&self) {
        let _one_at_a_time = self.shutdown_lock.lock().await;
        let exited = &self.shared.exited;
        if !exited.is_cancelled() {
            self.shared.stopping.store(true, Ordering::Relaxed);
            self.stdin_close.cancel();
            if tokio::time::timeout(Duration::from_secs(3), exited.cancelled())
                .await
                .is_err()
            {
                if let Some(pid) = self.pid {
                    signal_group(pid, rustix::process::Signal::TERM);
                }
                if tokio::time::timeout(Duration::from_secs(2), exited.cancelled())
                    .await
                    .is_err()
                {
                    self.kill.cancel();
                    let _ = tokio::time::timeout(Duration::from_secs(2), exited.cancelled()).await;
                }
            }
        }
        // The waiter closes the connection right after the exit (allowing the reader a short
        // drain); make sure it is closed when we return.
        if tokio::time::timeout(EXIT_GRACE * 2, self.shared.closed.cancelled())
            .await
            .is_err()
        {
            self.shared.close("stopped by Hangar");
        }
    }
}

/// Removes an unfinished call when the caller's future goes away, and tells the server.
struct CallGuard<'a> {
    conn: &'a StdioConn,
    id: u64,
    sent: bool,
    done: bool,
    cancellable: bool,
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let removed = self.conn.shared.calls.lock().remove(self.id);
        // If the answer already arrived (removed by the reader), there is nothing to cancel.
        if removed.is_none() || !self.sent || !self.cancellable {
            return;
        }
        let note = super::cancelled_notification(self.id);
        let mut line = note.into_bytes();
        line.push(b'\n');
        match self.conn.writer.try_send(line) {
            Ok(()) | Err(TrySendError::Closed(_)) => {}
            Err(TrySendError::Full(line)) => {
                let writer = self.conn.writer.clone();
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        let _ = writer.send(line).await;
                    });
                }
            }
        }
    }
}

async fn write_loop(
    shared: Arc<Shared>,
    stdin: tokio::process::ChildStdin,
    mut rx: mpsc::Receiver<Vec<u8>>,
    stdin_close: CancellationToken,
) {
    let mut w = tokio::io::BufWriter::with_capacity(64 * 1024, stdin);
    let mut failure = None;
    // The lines of the current batch that the BufWriter accepted (it was empty before).
    let mut batch: Vec<Vec<u8>> = Vec::new();
    'outer: loop {
        batch.clear();
        let first = tokio::select! {
            biased;
            _ = stdin_close.cancelled() => break,
            m = rx.recv() => match m {
                Some(m) => m,
                None => break,
            },
        };
        if let Err(e) = w.write_all(&first).await {
            failure = Some(e);
            break;
        }
        batch.push(first);
        // Batch whatever else is queued, then flush once.
        while let Ok(m) = rx.try_recv() {
            if let Err(e) = w.write_all(&m).await {
                failure = Some(e);
                break 'outer;
            }
            batch.push(m);
        }
        if let Err(e) = w.flush().await {
            failure = Some(e);
            break;
        }
    }
    // Requests that never reached the pipe: lines of the failed batch that start past the
    // bytes written (the BufWriter keeps what it could not write), and every line still
    // queued. A line whose own write failed may have been written in part: not counted.
    let mut unsent = HashSet::new();
    if failure.is_some() {
        let accepted: usize = batch.iter().map(Vec::len).sum();
        let written = accepted.saturating_sub(w.buffer().len());
        let mut start = 0;
        for line in &batch {
            if start >= written {
                unsent.extend(request_id(line));
            }
            start += line.len();
        }
    }
    // Whatever is still queued never left (and nothing can be queued any more).
    rx.close();
    while let Ok(line) = rx.try_recv() {
        unsent.extend(request_id(&line));
    }
    shared.unsent.lock().extend(unsent);
    shared.writer_done.cancel();
    let _ = w.shutdown().await;
    drop(w);
    if let Some(e) = failure {
        // The server closed its stdin (or died): it can no longer receive requests.
        if !shared.exited.is_cancelled() {
            tracing::warn!(mcp_server = %shared.server, error = %e, "upstream_stdin_write_failed");
        }
        let _ = tokio::time::timeout(EXIT_GRACE, shared.exited.cancelled()).await;
        let why = shared
            .exit
            .lock()
            .clone()
            .unwrap_or_else(|| format!("cannot write to its stdin: {e}"));
        shared.close(&why);
    }
}

/// The id of a request line we wrote (ours are numbers), or `None` for anything else.
fn request_id(line: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Probe {
        id: Option<u64>,
        method: Option<serde::de::IgnoredAny>,
    }
    let p: Probe = serde_json::from_slice(line).ok()?;
    p.method.and(p.id)
}

async fn stderr_loop(shared: Arc<Shared>, stderr: tokio::process::ChildStderr) {
    let mut r = BufReader::with_capacity(16 * 1024, stderr);
    let mut buf = Vec::with_capacity(1024);
    loop {
        buf.clear();
        match read_line_capped(&mut r, &mut buf, RING_LINE_BYTES).await {
            Ok(0) | Err(_) => break,
            Ok(_) => shared.ring.push("stderr", &buf),
        }
    }
}

async fn wait_loop(
    shared: Arc<Shared>,
    mut child: tokio::process::Child,
    pid: Option<u32>,
    kill: CancellationToken,
    stdin_close: CancellationToken,
) {
    let status = tokio::select! {
        s = child.wait() => s,
        _ = kill.cancelled() => {
            if let Some(pid) = pid {
                signal_group(pid, rustix::process::Signal::KILL);
            }
            let _ = child.start_kill();
            child.wait().await
        }
    };
    let text = match status {
        Ok(s) => s.to_string(),
        Err(e) => format!("cannot wait for the process: {e}"),
    };
    *shared.exit.lock() = Some(text.clone());
    shared.exited.cancel();
    // Anything the server left behind in its process group must not outlive it.
    if let Some(pid) = pid {
        signal_group(pid, rustix::process::Signal::KILL);
    }
    // Let the reader route what the process wrote just before exiting.
    let _ = tokio::time::timeout(EXIT_GRACE, shared.stdout_done.cancelled()).await;
    // Stop the writer and learn which requests never reached the process.
    stdin_close.cancel();
    let _ = tokio::time::timeout(EXIT_GRACE, shared.writer_done.cancelled()).await;
    shared.close(&text);
}

/// Send a signal to the child's process group (its pid: it was started with `process_group(0)`).
fn signal_group(pid: u32, sig: rustix::process::Signal) {
    let Ok(raw) = i32::try_from(pid) else { return };
    if let Some(pid) = rustix::process::Pid::from_raw(raw) {
        let _ = rustix::process::kill_process_group(pid, sig);
    }
}

/// Counts non-JSON stdout lines; lets `GARBAGE_PER_SEC` per second through to the ring.
struct GarbageLimiter {
    window: Instant,
    in_window: u32,
    suppressed: u64,
    last_warn: Option<Instant>,
}

impl Default for GarbageLimiter {
    fn default() -> Self {
        GarbageLimiter {
            window: Instant::now(),
            in_window: 0,
            suppressed: 0,
            last_warn: None,
        }
    }
}

struct Reader {
    shared: Arc<Shared>,
    writer: mpsc::Sender<Vec<u8>>,
    notes: broadcast::Sender<Arc<Message>>,
    garbage: GarbageLimiter,
}

impl Reader {
    async fn run(mut self, stdout: tokio::process::ChildStdout) {
        let mut r = BufReader::with_capacity(64 * 1024, stdout);
        let mut buf = Vec::with_capacity(8192);
        loop {
            buf.clear();
            if buf.capacity() > 1024 * 1024 {
                buf.shrink_to(64 * 1024);
            }
            let n = match read_line_capped(&mut r, &mut buf, MAX_LINE + 1).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if buf.len() > MAX_LINE {
                self.oversized(&buf, n);
                continue;
            }
            let line = trim(&buf);
            if line.is_empty() {
                continue;
            }
            match serde_json::from_slice::<Message>(line) {
                Ok(msg) => self.dispatch(msg),
                Err(_) => self.garbage(line),
            }
        }
        // EOF: the process is gone or closed stdout. Fail everything in flight at once (after a
        // short wait for the exit status, so the error can say how the process ended).
        self.shared.stdout_done.cancel();
        let _ = tokio::time::timeout(EXIT_GRACE, self.shared.exited.cancelled()).await;
        if self.shared.exited.is_cancelled() {
            // The wait task closes once the writer has said which requests never left.
            return;
        }
        let why = self
            .shared
            .exit
            .lock()
            .clone()
            .unwrap_or_else(|| "the server closed its stdout".to_owned());
        self.shared.close(&why);
    }

    /// A line longer than 16 MiB: a protocol error for that message; keep serving.
    fn oversized(&mut self, prefix: &[u8], total: usize) {
        let note = format!("(skipped a {total}-byte stdout message: longer than the 16 MiB limit)");
        self.shared.ring.push("stdout-garbage", note.as_bytes());
        tracing::warn!(mcp_server = %self.shared.server, bytes = total, "upstream_message_too_long");
        if let Some(id) = response_id_prefix(prefix) {
            let call = self.shared.calls.lock().remove(id);
            if let Some(call) = call {
                let _ = call.tx.send(Err(UpstreamError::Protocol {
                    server: self.shared.server.clone(),
                    message: format!(
                        "the answer is {total} bytes, over the 16 MiB limit for one message"
                    ),
                }));
            }
        }
    }

    fn garbage(&mut self, line: &[u8]) {
        let now = Instant::now();
        let g = &mut self.garbage;
        if now.duration_since(g.window) >= Duration::from_secs(1) {
            if g.suppressed > 0 {
                let note = format!(
                    "({} more non-JSON stdout lines were not kept)",
                    g.suppressed
                );
                self.shared.ring.push("stdout-garbage", note.as_bytes());
            }
            g.window = now;
            g.in_window = 0;
            g.suppressed = 0;
        }
        if g.in_window < GARBAGE_PER_SEC {
            g.in_window += 1;
            self.shared.ring.push("stdout-garbage", line);
        } else {
            g.suppressed += 1;
        }
        if g.last_warn
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60))
        {
            g.last_warn = Some(now);
            tracing::warn!(mcp_server = %self.shared.server, "upstream_wrote_non_json_to_stdout (ignored; kept in its logs as stdout-garbage)");
        }
    }

    fn write(&self, msg: &Message) {
        let mut line = msg.to_json().into_bytes();
        line.push(b'\n');
        if let Err(TrySendError::Full(line)) = self.writer.try_send(line) {
            let writer = self.writer.clone();
            tokio::spawn(async move {
                let _ = writer.send(line).await;
            });
        }
    }

    /// Route one message from the child. Never blocks the reader.
    fn dispatch(&mut self, msg: Message) {
        match msg.kind() {
            Kind::Response | Kind::Invalid if msg.method.is_none() => self.on_response(msg),
            Kind::Request => self.on_request(msg),
            Kind::Notification => self.on_notification(msg),
            _ => {}
        }
    }

    fn on_response(&mut self, msg: Message) {
        let Some(id) = msg.id.as_ref().and_then(our_id) else {
            return;
        };
        let Some(call) = self.shared.calls.lock().remove(id) else {
            return; // cancelled or timed out already
        };
        let answer = match (msg.result, msg.error) {
            (Some(r), None) => Ok(Outcome::Result(r)),
            (None, Some(e)) => Ok(Outcome::Error(e)),
            _ => Err(UpstreamError::Protocol {
                server: self.shared.server.clone(),
                message: "the answer has neither (or both) `result` and `error`".into(),
            }),
        };
        let _ = call.tx.send(answer);
    }

    fn on_request(&mut self, msg: Message) {
        let Some(id) = msg.id.clone() else { return };
        if msg.method.as_deref() == Some("ping") {
            self.write(&Message::response(id, crate::jsonrpc::empty_object()));
            return;
        }
        let target = {
            let mut calls = self.shared.calls.lock();
            let sole = calls.sole_sink();
            if let Some((call, _)) = &sole {
                calls.server_requests.insert(id_key(&id), *call);
            }
            sole
        };
        let Some((_, sink)) = target else {
            let err = RpcError::new(
                INTERNAL_ERROR,
                "Hangar cannot attribute this request to a caller (it needs exactly one call in flight that accepts server requests)",
            );
            self.write(&Message::error(Some(id), err));
            return;
        };
        match sink.try_send(CallEvent::Request(msg)) {
            Ok(()) => {}
            Err(TrySendError::Full(ev)) => {
                let writer = self.writer.clone();
                tokio::spawn(async move {
                    if sink.send(ev).await.is_err() {
                        let _ = writer.send(caller_gone(id)).await;
                    }
                });
            }
            Err(TrySendError::Closed(_)) => {
                self.shared
                    .calls
                    .lock()
                    .server_requests
                    .remove(&id_key(&id));
                let _ = self.writer.try_send(caller_gone(id));
            }
        }
    }

    fn on_notification(&mut self, msg: Message) {
        let method = msg.method.as_deref().unwrap_or_default();
        let target = match method {
            "notifications/progress" => match self.progress_target(&msg) {
                Some((sink, original)) => {
                    let Some(msg) = restore_token(msg, original) else {
                        return;
                    };
                    deliver(sink, msg);
                    return;
                }
                // Not for any live call with a listener: drop it (progress is call-scoped).
                None => return,
            },
            "notifications/message" => self.shared.calls.lock().sole_sink().map(|(_, s)| s),
            "notifications/cancelled" => {
                // The server gave up on a request it sent us: tell the caller it went to.
                let rid = raw_object(msg.params.as_deref())
                    .ok()
                    .and_then(|p| p.get("requestId").map(|r| r.get().to_owned()));
                rid.and_then(|k| {
                    let calls = self.shared.calls.lock();
                    let call = calls.server_requests.get(&k)?;
                    calls.map.get(call)?.sink.clone()
                })
            }
            _ => None,
        };
        match target {
            Some(sink) => deliver(sink, msg),
            None => {
                let _ = self.notes.send(Arc::new(msg));
            }
        }
    }

    fn progress_target(&self, msg: &Message) -> Option<(CallSink, Box<RawValue>)> {
        let tok = progress_token_key(msg)?;
        let calls = self.shared.calls.lock();
        let id = calls.tokens.get(&tok)?;
        let call = calls.map.get(id)?;
        Some((call.sink.clone()?, call.progress.as_ref()?.1.clone()))
    }
}

/// The `progressToken` of a progress notification, as the key our token map uses.
pub(super) fn progress_token_key(msg: &Message) -> Option<String> {
    let params = raw_object(msg.params.as_deref()).ok()?;
    let tok = params.get("progressToken")?;
    Some(match serde_json::from_str::<String>(tok.get()) {
        Ok(s) => s,
        Err(_) => tok.get().to_owned(),
    })
}

/// Put the caller's original progress token back.
pub(super) fn restore_token(mut msg: Message, original: Box<RawValue>) -> Option<Message> {
    let mut params = raw_object(msg.params.as_deref()).ok()?;
    params.insert("progressToken".to_owned(), original);
    msg.params = Some(raw_from_object(&params));
    Some(msg)
}

/// Deliver a notification to a call's sink without blocking the reader.
fn deliver(sink: CallSink, msg: Message) {
    if let Err(TrySendError::Full(ev)) = sink.try_send(CallEvent::Notification(msg)) {
        tokio::spawn(async move {
            let _ = sink.send(ev).await;
        });
    }
}

fn caller_gone(id: Id) -> Vec<u8> {
    let err = RpcError::new(
        INTERNAL_ERROR,
        "the caller this request was meant for has gone away",
    );
    let mut line = Message::error(Some(id), err).to_json().into_bytes();
    line.push(b'\n');
    line
}

/// Our ids are positive integers; tolerate servers that echo them as strings.
fn our_id(id: &Id) -> Option<u64> {
    match id {
        Id::Num(n) => u64::try_from(*n).ok(),
        Id::Str(s) => s.parse().ok(),
    }
}

/// A server request id as JSON text (the form `requestId` has in `notifications/cancelled`).
fn id_key(id: &Id) -> String {
    match id {
        Id::Num(n) => n.to_string(),
        Id::Str(s) => serde_json::to_string(s).unwrap_or_default(),
    }
}

/// For a message too long to parse: if its first few KiB show a top-level numeric `id` and a
/// top-level `result` or `error` key, that is the call it answers.
fn response_id_prefix(prefix: &[u8]) -> Option<u64> {
    let p = &prefix[..prefix.len().min(4096)];
    let mut depth = 0usize;
    let mut i = 0;
    let mut id = None;
    let mut is_answer = false;
    let mut expect_key = false;
    while i < p.len() {
        match p[i] {
            b'{' | b'[' => {
                depth += 1;
                expect_key = depth == 1 && p[i] == b'{';
                i += 1;
            }
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            b',' => {
                expect_key = depth == 1;
                i += 1;
            }
            b'"' => {
                let start = i + 1;
                let mut j = start;
                while j < p.len() && p[j] != b'"' {
                    if p[j] == b'\\' {
                        j += 1;
                    }
                    j += 1;
                }
                let s = p.get(start..j)?;
                i = j + 1;
                if depth == 1 && expect_key {
                    expect_key = false;
                    match s {
                        b"result" | b"error" => is_answer = true,
                        b"method" => return None,
                        b"id" => {
                            while i < p.len() && (p[i] == b':' || p[i].is_ascii_whitespace()) {
                                i += 1;
                            }
                            let digits = p[i..].iter().take_while(|b| b.is_ascii_digit()).count();
                            id = std::str::from_utf8(&p[i..i + digits]).ok()?.parse().ok();
                        }
                        _ => {}
                    }
                }
            }
            _ => i += 1,
        }
        if is_answer && id.is_some() {
            return id;
        }
    }
    None
}

/// Resolve argv[0] like the exec will (PATH of the child's environment, relative to its cwd).
/// What arms the parent-death signal of a child before it becomes the server.
enum Shim {
    /// The `hangar` binary itself (`hangar exec-child`): always there when a node runs.
    Hangar(PathBuf),
    /// util-linux `setpriv` (when this code runs inside another program, e.g. a test).
    Setpriv(&'static Path),
}

/// The shim to start children through; `None` only when neither exists (then a SIGKILLed
/// node's children are not killed by the kernel, and a warning says so once).
fn death_shim() -> Option<Shim> {
    static HANGAR: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    let hangar = HANGAR.get_or_init(|| {
        std::env::current_exe()
            .ok()
            .filter(|p| p.file_name().is_some_and(|n| n == "hangar"))
    });
    if let Some(exe) = hangar {
        return Some(Shim::Hangar(exe.clone()));
    }
    let setpriv = Path::new("/usr/bin/setpriv");
    if setpriv.is_file() {
        return Some(Shim::Setpriv(setpriv));
    }
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| {
        tracing::warn!("neither the hangar binary nor /usr/bin/setpriv is available: child processes will outlive this process if it is killed");
    });
    None
}

fn resolve_program(program: &str, spec: &StdioSpec) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let check = |p: &Path| -> std::io::Result<()> {
        let meta = std::fs::metadata(p)?;
        if meta.is_dir() {
            return Err(std::io::Error::new(
                ErrorKind::InvalidInput,
                "it is a directory",
            ));
        }
        if meta.permissions().mode() & 0o111 == 0 {
            return Err(std::io::Error::new(
                ErrorKind::PermissionDenied,
                "it is not executable",
            ));
        }
        Ok(())
    };
    if program.contains('/') {
        let p = Path::new(program);
        let full = match (&spec.cwd, p.is_relative()) {
            (Some(cwd), true) => cwd.join(p),
            _ => p.to_path_buf(),
        };
        check(&full)?;
        return Ok(full);
    }
    let path = spec
        .env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| std::ffi::OsString::from(v))
        .or_else(|| std::env::var_os("PATH"))
        .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    let mut last = None;
    for dir in std::env::split_paths(&path) {
        let dir = match (&spec.cwd, dir.is_relative()) {
            (Some(cwd), true) => cwd.join(dir),
            _ => dir,
        };
        let candidate = dir.join(program);
        match check(&candidate) {
            Ok(()) => return Ok(candidate),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::new(ErrorKind::NotFound, "not found on PATH")))
}

fn trim(b: &[u8]) -> &[u8] {
    b.trim_ascii()
}

fn trim_eol(b: &[u8]) -> &[u8] {
    let mut end = b.len();
    while end > 0 && (b[end - 1] == b'\n' || b[end - 1] == b'\r') {
        end -= 1;
    }
    &b[..end]
}

#[cfg(test)]
mod tests;
