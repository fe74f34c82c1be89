//! `hangarctl`: the operator CLI for a Hangar gateway. It talks to a node's `/api` over HTTP;
//! any node of a cluster can be addressed.

mod certs;
mod ops;
mod policies;

use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(name = "hangarctl", version, about = "Operate a Hangar MCP gateway")]
struct Cli {
    /// Base URL of any Hangar node. The API key, when the node requires one, is read from
    /// HANGAR_API_KEY (sent as X-API-Key).
    #[arg(
        long,
        env = "HANGAR_ENDPOINT",
        default_value = "http://127.0.0.1:8000",
        global = true
    )]
    endpoint: String,
    /// CA certificate(s) (PEM) to trust for an `https://` endpoint whose certificate a private
    /// CA signed (e.g. `ca.pem` of `hangarctl cluster gen-certs`). Without it only the
    /// system's roots are trusted.
    #[arg(long, env = "HANGAR_CA_FILE", global = true, value_name = "PEM")]
    ca_file: Option<std::path::PathBuf>,
    /// Client certificate (PEM, chain first) for an `https://` endpoint that asks for one
    /// (`server.tls.client_ca_file`); needs --client-key.
    #[arg(
        long,
        env = "HANGAR_CLIENT_CERT",
        global = true,
        value_name = "PEM",
        requires = "client_key"
    )]
    client_cert: Option<std::path::PathBuf>,
    /// The private key (PEM) of --client-cert.
    #[arg(
        long,
        env = "HANGAR_CLIENT_KEY",
        global = true,
        value_name = "PEM",
        requires = "client_cert"
    )]
    client_key: Option<std::path::PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// MCP servers.
    Servers {
        #[command(subcommand)]
        cmd: ServersCmd,
    },
    /// Tools across all servers.
    Tools {
        #[command(subcommand)]
        cmd: ToolsCmd,
    },
    /// Call a tool: `hangarctl call SERVER TOOL --args '{"a":1}'`.
    Call {
        /// Server (or group) id.
        server: String,
        /// Tool name as the upstream knows it.
        tool: String,
        /// Arguments as a JSON object.
        #[arg(long, default_value = "{}")]
        args: String,
    },
    /// Node status.
    System,
    /// The Raft cluster: status and membership.
    Cluster {
        #[command(subcommand)]
        cmd: ops::ClusterCmd,
    },
    /// The cluster's desired configuration.
    Config {
        #[command(subcommand)]
        cmd: ops::ConfigCmd,
    },
    /// The replicated domain event log.
    Events {
        #[command(subcommand)]
        cmd: ops::EventsCmd,
    },
    /// API keys (the key itself is read from HANGAR_API_KEY, never from a flag).
    Keys {
        #[command(subcommand)]
        cmd: ops::KeysCmd,
    },
    /// Roles and their assignments.
    Roles {
        #[command(subcommand)]
        cmd: ops::RolesCmd,
    },
    /// Who the API key in HANGAR_API_KEY authenticates as, and what it may do.
    Whoami,
    /// Cluster-wide rate limits: definitions, this node's mode and buckets.
    Limits {
        #[command(subcommand)]
        cmd: ops::LimitsCmd,
    },
    /// Tool access policies set through the API (scopes global, server, group, principal,
    /// role), enforced with the config file's.
    Policies {
        #[command(subcommand)]
        cmd: policies::PoliciesCmd,
    },
}

#[derive(Subcommand)]
enum ServersCmd {
    /// List servers (optionally by state).
    List {
        /// cold, initializing, ready, degraded or dead.
        #[arg(long)]
        state: Option<String>,
    },
    /// Show one server.
    Get {
        /// Server id.
        id: String,
    },
    /// Add a server: `hangarctl servers add ID --mode remote --url URL` or
    /// `--mode subprocess --command python3 --command -m --command my_server`.
    Add {
        /// Server id.
        id: String,
        /// subprocess or remote.
        #[arg(long, default_value = "subprocess")]
        mode: String,
        /// Command and arguments (repeat the flag for each element).
        #[arg(long = "command")]
        command: Vec<String>,
        /// Endpoint URL of a remote server (`--endpoint` is the node hangarctl talks to).
        #[arg(long = "url", value_name = "URL")]
        url: Option<String>,
        /// Environment variables KEY=VALUE (repeatable).
        #[arg(long = "env")]
        env: Vec<String>,
        /// Idle TTL in seconds.
        #[arg(long)]
        idle_ttl_s: Option<u64>,
        /// Description.
        #[arg(long)]
        description: Option<String>,
    },
    /// Remove a server (stops it first).
    Rm {
        /// Server id.
        id: String,
    },
    /// Start a server now.
    Start {
        /// Server id.
        id: String,
    },
    /// Stop a server.
    Stop {
        /// Server id.
        id: String,
    },
    /// Show the last stderr lines of a server.
    Logs {
        /// Server id.
        id: String,
        /// Number of lines (1..1000).
        #[arg(long, default_value_t = 100)]
        lines: usize,
    },
    /// List a server's tools.
    Tools {
        /// Server id.
        id: String,
    },
}

#[derive(Subcommand)]
enum ToolsCmd {
    /// List every tool.
    List,
}

struct Client {
    http: reqwest::Client,
    base: String,
    api_key: Option<String>,
    /// A CA file was given (`--ca-file`).
    private_ca: bool,
}

/// A client certificate: (certificate chain file, private key file).
type ClientIdentity<'a> = (&'a std::path::Path, &'a std::path::Path);

/// The PEM of a client certificate and its key, read and checked.
fn identity_pem((cert, key): ClientIdentity<'_>) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let cert_pem = std::fs::read(cert)
        .with_context(|| format!("--client-cert: cannot read {}", cert.display()))?;
    let key_pem = std::fs::read(key)
        .with_context(|| format!("--client-key: cannot read {}", key.display()))?;
    Ok((cert_pem, key_pem))
}

/// TLS trusting only the CA certificates in `file` (ring provider, ALPN h2 and http/1.1),
/// presenting `identity` when given.
fn tls_trusting(
    file: &std::path::Path,
    identity: Option<ClientIdentity<'_>>,
) -> anyhow::Result<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(file)
        .with_context(|| format!("--ca-file: cannot read {}", file.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.with_context(|| {
            format!(
                "--ca-file: {} is not a PEM certificate file",
                file.display()
            )
        })?;
        roots
            .add(cert)
            .with_context(|| format!("--ca-file: unusable CA certificate in {}", file.display()))?;
    }
    if roots.is_empty() {
        bail!("--ca-file: {} holds no PEM certificate", file.display());
    }
    let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS versions")?
    .with_root_certificates(roots);
    let mut tls = match identity {
        None => builder.with_no_client_auth(),
        Some(id) => {
            use rustls::pki_types::PrivateKeyDer;
            let (cert_pem, key_pem) = identity_pem(id)?;
            let chain = CertificateDer::pem_slice_iter(&cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| {
                    format!(
                        "--client-cert: {} is not a PEM certificate file",
                        id.0.display()
                    )
                })?;
            if chain.is_empty() {
                bail!("--client-cert: {} holds no PEM certificate", id.0.display());
            }
            let key = PrivateKeyDer::from_pem_slice(&key_pem).with_context(|| {
                format!("--client-key: {} holds no PEM private key", id.1.display())
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .context("--client-cert/--client-key: the key does not match the certificate")?
        }
    };
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tls)
}

/// Whether a request failed because the server's certificate is not trusted.
fn untrusted_certificate(e: &reqwest::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let tls = err.downcast_ref::<rustls::Error>().or_else(|| {
            err.downcast_ref::<std::io::Error>()
                .and_then(std::io::Error::get_ref)
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        // Some layers box the I/O error, hiding its type: rustls's message then tells.
        if matches!(tls, Some(rustls::Error::InvalidCertificate(_)))
            || err.to_string().contains("invalid peer certificate")
        {
            return true;
        }
        cur = err.source();
    }
    false
}

impl Client {
    fn new(
        endpoint: &str,
        api_key: Option<String>,
        ca_file: Option<&std::path::Path>,
        identity: Option<ClientIdentity<'_>>,
    ) -> anyhow::Result<Self> {
        let mut http = reqwest::Client::builder().timeout(std::time::Duration::from_secs(120));
        match (ca_file, identity) {
            (Some(f), id) => http = http.tls_backend_preconfigured(tls_trusting(f, id)?),
            (None, Some(id)) => {
                let (mut pem, key_pem) = identity_pem(id)?;
                pem.extend_from_slice(b"\n");
                pem.extend_from_slice(&key_pem);
                let identity = reqwest::Identity::from_pem(&pem)
                    .context("--client-cert/--client-key: not a PEM certificate and private key")?;
                http = http.identity(identity);
            }
            (None, None) => {}
        }
        let http = http.build().context("building the HTTP client")?;
        Ok(Client {
            http,
            base: endpoint.trim_end_matches('/').to_owned(),
            api_key,
            private_ca: ca_file.is_some(),
        })
    }

    /// The error of a request that got no answer, saying what to do.
    fn unreachable(&self, e: reqwest::Error) -> anyhow::Error {
        let what = if self.base.starts_with("https://") && untrusted_certificate(&e) {
            if self.private_ca {
                format!(
                    "cannot reach Hangar at {}: its TLS certificate was not signed by the CA in --ca-file (or does not name this host)",
                    self.base
                )
            } else {
                format!(
                    "cannot reach Hangar at {}: its TLS certificate is not trusted; pass --ca-file CA.pem (or set HANGAR_CA_FILE) with the CA that signed it",
                    self.base
                )
            }
        } else if self.base.starts_with("http://") {
            format!(
                "cannot reach Hangar at {} (is the node running? set --endpoint; a node with server.tls serves https://)",
                self.base
            )
        } else {
            format!(
                "cannot reach Hangar at {} (is the node running? set --endpoint)",
                self.base
            )
        };
        anyhow::Error::new(e).context(what)
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        self.request(
            method,
            path,
            body.map(|b| ("application/json", b.to_string())),
        )
        .await
    }

    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<(&str, String)>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}{}", self.base, path);
        let mut req = self.http.request(method, &url);
        if let Some(k) = &self.api_key {
            req = req.header("X-API-Key", k);
        }
        if let Some((content_type, b)) = body {
            req = req.header("Content-Type", content_type).body(b);
        }
        let resp = req.send().await.map_err(|e| self.unreachable(e))?;
        let status = resp.status();
        let text = resp.text().await.context("reading the response")?;
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text.clone()));
        if !status.is_success() {
            let msg = v
                .pointer("/error/message")
                .or_else(|| v.pointer("/message"))
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or(text);
            let mut details = String::new();
            for p in v
                .pointer("/error/details/problems")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
            {
                details.push_str(&format!(
                    "\n  {}: {}",
                    cell(&p["path"]),
                    cell(&p["message"])
                ));
            }
            bail!("{status}: {msg}{details}");
        }
        Ok(v)
    }

    /// POST a text body (a config file).
    async fn send_text(&self, path: &str, body: String) -> anyhow::Result<Value> {
        self.request(
            reqwest::Method::POST,
            path,
            Some(("application/yaml", body)),
        )
        .await
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.send(reqwest::Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }

    async fn mcp(&self, method: &str, params: Value) -> anyhow::Result<Value> {
        let url = format!("{}/mcp", self.base);
        let mut req = self
            .http
            .post(&url)
            .header("Content-Type", "application/json")
            .header("Accept", "application/json");
        if let Some(k) = &self.api_key {
            req = req.header("X-API-Key", k);
        }
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
        let resp = req
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let text = resp.text().await.context("reading the MCP answer")?;
        let v: Value = serde_json::from_str(&text).context("the MCP answer is not JSON")?;
        if let Some(e) = v.get("error") {
            bail!(
                "{} (code {})",
                e.get("message").and_then(Value::as_str).unwrap_or("error"),
                e.get("code").and_then(Value::as_i64).unwrap_or(0)
            );
        }
        Ok(v.get("result").cloned().unwrap_or(Value::Null))
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn table(rows: &[Value], cols: &[&str]) -> String {
    let mut widths: Vec<usize> = cols.iter().map(|c| c.len()).collect();
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            cols.iter()
                .map(|c| cell(r.get(*c).unwrap_or(&Value::Null)))
                .collect()
        })
        .collect();
    for row in &cells {
        for (i, c) in row.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |vals: Vec<String>, out: &mut String| {
        let parts: Vec<String> = vals
            .iter()
            .enumerate()
            .map(|(i, v)| format!("{:<w$}", v, w = widths[i]))
            .collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(cols.iter().map(|c| c.to_uppercase()).collect(), &mut out);
    for row in cells {
        line(row, &mut out);
    }
    out
}

fn print(output: Output, v: &Value, human: impl FnOnce(&Value) -> String) {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        Output::Table => print!("{}", human(v)),
    }
}

fn kv(v: &Value) -> String {
    let mut out = String::new();
    if let Some(o) = v.as_object() {
        let w = o.keys().map(String::len).max().unwrap_or(0);
        for (k, val) in o {
            out.push_str(&format!("{k:<w$}  {}\n", cell(val)));
        }
    }
    out
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // The key comes from the environment only: a flag would land in shell history.
    let api_key = std::env::var("HANGAR_API_KEY")
        .ok()
        .filter(|k| !k.trim().is_empty());
    let identity = cli.client_cert.as_deref().zip(cli.client_key.as_deref());
    let c = Client::new(&cli.endpoint, api_key, cli.ca_file.as_deref(), identity)?;
    let out = cli.output;
    match cli.command {
        Cmd::Servers { cmd } => match cmd {
            ServersCmd::List { state } => {
                let path = match state {
                    Some(s) => format!("/api/mcp_servers/?state={s}"),
                    None => "/api/mcp_servers/".into(),
                };
                let v = c.get(&path).await?;
                print(out, &v, |v| {
                    let rows = v["mcp_servers"].as_array().cloned().unwrap_or_default();
                    table(
                        &rows,
                        &[
                            "mcp_server",
                            "mode",
                            "node",
                            "state",
                            "tools_count",
                            "description",
                        ],
                    )
                });
            }
            ServersCmd::Get { id } => {
                let v = c.get(&format!("/api/mcp_servers/{id}")).await?;
                print(out, &v, kv);
            }
            ServersCmd::Add {
                id,
                mode,
                command,
                url,
                env,
                idle_ttl_s,
                description,
            } => {
                let mut body = json!({"mcp_server_id": id, "mode": mode});
                if !command.is_empty() {
                    body["command"] = json!(command);
                }
                if let Some(u) = url {
                    body["endpoint"] = json!(u);
                }
                if !env.is_empty() {
                    let mut m = serde_json::Map::new();
                    for kvs in env {
                        let Some((k, v)) = kvs.split_once('=') else {
                            bail!("--env expects KEY=VALUE (got '{kvs}')");
                        };
                        m.insert(k.to_owned(), json!(v));
                    }
                    body["env"] = Value::Object(m);
                }
                if let Some(t) = idle_ttl_s {
                    body["idle_ttl_s"] = json!(t);
                }
                if let Some(d) = description {
                    body["description"] = json!(d);
                }
                let v = c.post("/api/mcp_servers/", body).await?;
                print(out, &v, |v| {
                    format!("created {}\n", cell(&v["mcp_server_id"]))
                });
            }
            ServersCmd::Rm { id } => {
                let v = c
                    .send(
                        reqwest::Method::DELETE,
                        &format!("/api/mcp_servers/{id}"),
                        None,
                    )
                    .await?;
                print(out, &v, |_| format!("deleted {id}\n"));
            }
            ServersCmd::Start { id } => {
                let v = c
                    .post(&format!("/api/mcp_servers/{id}/start"), json!({}))
                    .await?;
                print(out, &v, |v| {
                    format!(
                        "{} is {} ({} tools)\n",
                        id,
                        cell(&v["state"]),
                        v["tools"].as_array().map_or(0, Vec::len)
                    )
                });
            }
            ServersCmd::Stop { id } => {
                let v = c
                    .post(
                        &format!("/api/mcp_servers/{id}/stop"),
                        json!({"reason": "user_request"}),
                    )
                    .await?;
                print(out, &v, |_| format!("stopped {id}\n"));
            }
            ServersCmd::Logs { id, lines } => {
                let v = c
                    .get(&format!("/api/mcp_servers/{id}/logs?lines={lines}"))
                    .await?;
                print(out, &v, |v| {
                    v["logs"]
                        .as_array()
                        .map(|ls| {
                            ls.iter()
                                .map(|l| format!("[{}] {}\n", cell(&l["stream"]), cell(&l["line"])))
                                .collect()
                        })
                        .unwrap_or_default()
                });
            }
            ServersCmd::Tools { id } => {
                let v = c.get(&format!("/api/mcp_servers/{id}/tools")).await?;
                print(out, &v, |v| {
                    let rows = v["tools"].as_array().cloned().unwrap_or_default();
                    table(&rows, &["name", "description"])
                });
            }
        },
        Cmd::Tools {
            cmd: ToolsCmd::List,
        } => {
            let v = c.get("/api/tools/").await?;
            print(out, &v, |v| {
                let rows = v["tools"].as_array().cloned().unwrap_or_default();
                table(&rows, &["exposed_name", "mcp_server_id", "description"])
            });
        }
        Cmd::Call { server, tool, args } => {
            let arguments: Value = serde_json::from_str(&args)
                .with_context(|| format!("--args must be a JSON object (got '{args}')"))?;
            if !arguments.is_object() {
                bail!("--args must be a JSON object (got '{args}')");
            }
            let v = c
                .mcp(
                    "tools/call",
                    json!({"name": format!("{server}__{tool}"), "arguments": arguments}),
                )
                .await?;
            print(out, &v, |v| {
                let mut s = String::new();
                for item in v["content"].as_array().cloned().unwrap_or_default() {
                    match item.get("text").and_then(Value::as_str) {
                        Some(t) => s.push_str(t),
                        None => s.push_str(&item.to_string()),
                    }
                    s.push('\n');
                }
                if v.get("isError") == Some(&Value::Bool(true)) {
                    s.insert_str(0, "tool reported an error:\n");
                }
                s
            });
        }
        Cmd::System => {
            let v = c.get("/api/system/").await?;
            print(out, &v["system"], kv);
        }
        Cmd::Cluster { cmd } => ops::cluster(&c, out, cmd).await?,
        Cmd::Config { cmd } => ops::config(&c, out, cmd).await?,
        Cmd::Events { cmd } => ops::events(&c, out, cmd).await?,
        Cmd::Keys { cmd } => ops::keys(&c, out, cmd).await?,
        Cmd::Roles { cmd } => ops::roles(&c, out, cmd).await?,
        Cmd::Whoami => {
            let v = c.get("/api/system/me").await?;
            print(out, &v, kv);
        }
        Cmd::Limits { cmd } => ops::limits(&c, out, cmd).await?,
        Cmd::Policies { cmd } => policies::policies(&c, out, cmd).await?,
    }
    Ok(())
}

fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hangarctl: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hangarctl: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let rows = vec![json!({"a": "x", "b": 1}), json!({"a": "longer", "b": null})];
        let t = table(&rows, &["a", "b"]);
        assert_eq!(t, "A       B\nx       1\nlonger  -\n");
    }
}
