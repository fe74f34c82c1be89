//! `hangarctl cluster …`, `config …`, `events tail`, `keys …`, `roles …` and `limits …`.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::{Client, Output, cell, kv, print, table};

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Leader, term, members with roles, applied/committed index and lag per node.
    Status,
    /// Initialize a new cluster on the addressed node (alone, or with --member entries).
    Init {
        /// Other initial voters as ID=RAFT_ADDR,API_ADDR (repeatable).
        #[arg(long = "member")]
        members: Vec<String>,
    },
    /// Make the addressed (new, empty) node join the cluster that SEED (an API URL) belongs to.
    Join {
        /// API URL of any member, e.g. http://10.0.0.1:8000.
        seed: String,
        /// Join as a learner (non-voting) instead of a voter.
        #[arg(long)]
        learner: bool,
    },
    /// Add a node as a learner (it receives the log but does not vote).
    AddLearner {
        /// The node's id.
        #[arg(long)]
        node_id: u64,
        /// Its Raft address (host:port).
        #[arg(long)]
        raft_addr: String,
        /// Its API address: host:port, or https://host:port for a node with server.tls.
        #[arg(long)]
        api_addr: String,
    },
    /// Make a learner a voter.
    Promote {
        /// Node id.
        node_id: u64,
    },
    /// Move every MCP server instance off a node (before maintenance); it takes none until
    /// `undrain`.
    Drain {
        /// Node id.
        node_id: u64,
    },
    /// Let a drained node take instances again (nothing moves back by itself).
    Undrain {
        /// Node id.
        node_id: u64,
    },
    /// Remove a node from the cluster (then stop it).
    Remove {
        /// Node id.
        node_id: u64,
    },
    /// Hand leadership to another voter.
    TransferLeader {
        /// Node id of the new leader.
        node_id: u64,
    },
    /// Build a snapshot on the addressed node now (and optionally purge its log).
    Snapshot {
        /// Also purge log entries covered by the snapshot.
        #[arg(long)]
        purge: bool,
    },
    /// Make a cluster CA and node certificates for `cluster.tls` (mutual TLS between nodes),
    /// locally: ca.pem, ca-key.pem, node-ID.pem, node-ID-key.pem in --out.
    GenCerts {
        /// Output directory (existing files are never overwritten).
        #[arg(long)]
        out: std::path::PathBuf,
        /// Make certificates for nodes 1..=N.
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        /// The name in every node certificate (`cluster.tls.server_name`).
        #[arg(long, default_value = "hangar-node")]
        server_name: String,
        /// Extra subject alternative name for every node (IP or DNS; repeatable).
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Validity in years.
        #[arg(long, default_value_t = 5)]
        years: i32,
    },
}

#[derive(Subcommand)]
pub enum ConfigCmd {
    /// Check a config file on the addressed node (its environment interpolates `${VAR}`).
    Validate {
        /// The file.
        file: std::path::PathBuf,
    },
    /// Show what applying a config file would change.
    Diff {
        /// The file.
        file: std::path::PathBuf,
    },
    /// Make a config file the cluster's desired configuration.
    Apply {
        /// The file.
        file: std::path::PathBuf,
    },
    /// Print the cluster's desired configuration.
    Export,
}

#[derive(Subcommand)]
pub enum EventsCmd {
    /// Print events as they are appended (from --since, default: the last 20).
    Tail {
        /// Start after this sequence number.
        #[arg(long)]
        since: Option<u64>,
        /// Stop after this many events (default: run until interrupted).
        #[arg(long)]
        count: Option<usize>,
        /// Stop after this many seconds.
        #[arg(long)]
        timeout: Option<u64>,
    },
}

fn parse_member(s: &str) -> anyhow::Result<Value> {
    let (id, addrs) = s
        .split_once('=')
        .with_context(|| format!("--member expects ID=RAFT_ADDR,API_ADDR (got '{s}')"))?;
    let (raft, api) = addrs
        .split_once(',')
        .with_context(|| format!("--member expects ID=RAFT_ADDR,API_ADDR (got '{s}')"))?;
    let id: u64 = id
        .parse()
        .with_context(|| format!("--member: node id '{id}' is not a number"))?;
    Ok(json!({"node_id": id, "raft_addr": raft, "api_addr": api}))
}

pub async fn cluster(c: &Client, out: Output, cmd: ClusterCmd) -> anyhow::Result<()> {
    match cmd {
        ClusterCmd::GenCerts {
            out: dir,
            nodes,
            server_name,
            sans,
            years,
        } => {
            let files = crate::certs::generate(&crate::certs::GenCerts {
                out: dir,
                nodes: (1..=nodes).collect(),
                server_name,
                sans,
                years,
            })?;
            for f in files {
                println!("{}", f.display());
            }
        }
        ClusterCmd::Status => {
            let v = c.get("/api/cluster/status").await?;
            print(out, &v, |v| {
                let mut s = format!(
                    "node {} is {} · leader {} · term {} · config version {}\n",
                    cell(&v["node_id"]),
                    cell(&v["role"]),
                    cell(&v["leader_id"]),
                    cell(&v["term"]),
                    cell(&v["config_version"]),
                );
                if v["initialized"] == json!(false) {
                    s.push_str("not initialized: run `hangarctl cluster init` here, or `hangarctl cluster join SEED`\n");
                }
                let rows = v["members"].as_array().cloned().unwrap_or_default();
                s.push('\n');
                s.push_str(&table(
                    &rows,
                    &[
                        "node_id",
                        "membership",
                        "role",
                        "api_addr",
                        "raft_addr",
                        "committed_index",
                        "applied_index",
                        "lag",
                        "ready",
                    ],
                ));
                s
            });
        }
        ClusterCmd::Init { members } => {
            let members = members
                .iter()
                .map(|m| parse_member(m))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let v = c
                .post("/api/cluster/init", json!({"members": members}))
                .await?;
            print(out, &v, |v| {
                format!("cluster initialized on node {}\n", cell(&v["node_id"]))
            });
        }
        ClusterCmd::Join { seed, learner } => {
            let role = if learner { "learner" } else { "voter" };
            let v = c
                .post("/api/cluster/join", json!({"seed": seed, "role": role}))
                .await?;
            print(out, &v, |v| {
                format!(
                    "node {} joined through {} as a {role}\n",
                    cell(&v["node_id"]),
                    cell(&v["seed"])
                )
            });
        }
        ClusterCmd::AddLearner {
            node_id,
            raft_addr,
            api_addr,
        } => {
            let v = c
                .post(
                    "/api/cluster/members",
                    json!({"node_id": node_id, "raft_addr": raft_addr, "api_addr": api_addr, "role": "learner"}),
                )
                .await?;
            print(out, &v, |_| {
                format!("node {node_id} added as a learner (caught up)\n")
            });
        }
        ClusterCmd::Promote { node_id } => {
            let v = c
                .post(
                    &format!("/api/cluster/members/{node_id}/promote"),
                    json!({}),
                )
                .await?;
            print(out, &v, |_| format!("node {node_id} is a voter\n"));
        }
        ClusterCmd::Drain { node_id } => {
            let v = c
                .post(&format!("/api/cluster/members/{node_id}/drain"), json!({}))
                .await?;
            print(out, &v, |_| {
                format!("node {node_id} is draining: its instances move to the other nodes\n")
            });
        }
        ClusterCmd::Undrain { node_id } => {
            let v = c
                .post(
                    &format!("/api/cluster/members/{node_id}/undrain"),
                    json!({}),
                )
                .await?;
            print(out, &v, |_| {
                format!("node {node_id} takes instances again\n")
            })
        }
        ClusterCmd::Remove { node_id } => {
            let v = c
                .send(
                    reqwest::Method::DELETE,
                    &format!("/api/cluster/members/{node_id}"),
                    None,
                )
                .await?;
            print(out, &v, |_| {
                format!("node {node_id} removed from the cluster; stop its process\n")
            });
        }
        ClusterCmd::TransferLeader { node_id } => {
            let v = c
                .post("/api/cluster/transfer-leader", json!({"node_id": node_id}))
                .await?;
            print(out, &v, |v| {
                format!(
                    "leadership transfer to node {node_id} requested; leader is now {}\n",
                    cell(&v["leader_id"])
                )
            });
        }
        ClusterCmd::Snapshot { purge } => {
            let path = if purge {
                "/api/cluster/snapshot?purge=true"
            } else {
                "/api/cluster/snapshot"
            };
            let v = c.post(path, json!({})).await?;
            print(out, &v, kv);
        }
    }
    Ok(())
}

fn read_file(path: &std::path::Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

fn problems(v: &Value) -> String {
    let mut s = String::new();
    for p in v["problems"].as_array().cloned().unwrap_or_default() {
        let path = cell(&p["path"]);
        if path.is_empty() || path == "-" {
            s.push_str(&format!("  {}\n", cell(&p["message"])));
        } else {
            s.push_str(&format!("  {path}: {}\n", cell(&p["message"])));
        }
    }
    s
}

fn diff_text(v: &Value) -> String {
    let mut s = String::new();
    for (k, sign) in [
        ("added", '+'),
        ("removed", '-'),
        ("updated", '~'),
        ("unchanged", ' '),
    ] {
        for id in v[k].as_array().cloned().unwrap_or_default() {
            s.push_str(&format!("{sign} {} ({k})\n", cell(&id)));
        }
    }
    if s.is_empty() {
        s.push_str("no MCP servers\n");
    }
    s
}

pub async fn config(c: &Client, out: Output, cmd: ConfigCmd) -> anyhow::Result<()> {
    match cmd {
        ConfigCmd::Validate { file } => {
            let v = c
                .send_text("/api/config/validate", read_file(&file)?)
                .await?;
            let valid = v["valid"] == json!(true);
            print(out, &v, |v| {
                if valid {
                    format!(
                        "{}: valid ({} MCP servers/groups)\n",
                        file.display(),
                        cell(&v["mcp_servers"])
                    )
                } else {
                    format!("{}: invalid\n{}", file.display(), problems(v))
                }
            });
            if !valid {
                bail!("the configuration is invalid");
            }
        }
        ConfigCmd::Diff { file } => {
            let v = c.send_text("/api/config/diff", read_file(&file)?).await?;
            print(out, &v, diff_text);
        }
        ConfigCmd::Apply { file } => {
            let v = c.send_text("/api/config/apply", read_file(&file)?).await?;
            print(out, &v, |v| {
                format!(
                    "applied as config version {}\n{}",
                    cell(&v["config_version"]),
                    diff_text(v)
                )
            });
        }
        ConfigCmd::Export => {
            let v = c.get("/api/config/export").await?;
            let doc = json!({"mcp_servers": v["mcp_servers"]});
            print(out, &v, |_| {
                serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n"
            });
        }
    }
    Ok(())
}

pub async fn events(c: &Client, out: Output, cmd: EventsCmd) -> anyhow::Result<()> {
    let EventsCmd::Tail {
        since,
        count,
        timeout,
    } = cmd;
    let mut after = match since {
        Some(s) => s,
        None => {
            let v = c.get("/api/events?since=0&limit=1").await?;
            v["last_seq"].as_u64().unwrap_or(0).saturating_sub(20)
        }
    };
    let deadline = timeout.map(|t| tokio::time::Instant::now() + Duration::from_secs(t));
    let mut printed = 0usize;
    loop {
        let v = c
            .get(&format!("/api/events?since={after}&limit=500"))
            .await?;
        for ev in v["events"].as_array().cloned().unwrap_or_default() {
            after = ev["seq"].as_u64().unwrap_or(after);
            match out {
                Output::Json => println!("{ev}"),
                Output::Table => println!(
                    "{:>6}  {:<14}  node {:<3} {:<32} {}",
                    cell(&ev["seq"]),
                    format_time(ev["occurred_at"].as_f64().unwrap_or(0.0)),
                    cell(&ev["produced_by"]),
                    cell(&ev["event_type"]),
                    ev["data"]
                ),
            }
            printed += 1;
            if count.is_some_and(|n| printed >= n) {
                return Ok(());
            }
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn format_time(unix: f64) -> String {
    let secs = unix as u64;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    format!(
        "{h:02}:{m:02}:{s:02}.{:03}Z",
        ((unix.fract()) * 1000.0) as u64
    )
}

#[derive(Subcommand)]
pub enum KeysCmd {
    /// Create an API key for a principal; the raw key is printed once (store it now).
    Create {
        /// The principal it authenticates as (e.g. `service:ci`).
        #[arg(long)]
        principal: String,
        /// A name for it.
        #[arg(long)]
        name: String,
        /// Expire after this many seconds.
        #[arg(long)]
        expires_in: Option<u64>,
        /// The tenant its calls count under (rate limits keyed or matched by tenant).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// List keys (never their secrets).
    List {
        /// Include revoked keys.
        #[arg(long)]
        all: bool,
    },
    /// Revoke a key by id: refused on every node once this returns.
    Revoke {
        /// Key id (`key_…`).
        id: String,
    },
}

pub async fn keys(c: &Client, out: Output, cmd: KeysCmd) -> anyhow::Result<()> {
    match cmd {
        KeysCmd::Create {
            principal,
            name,
            expires_in,
            tenant,
        } => {
            let mut body = json!({"principal_id": principal, "name": name});
            if let Some(t) = tenant {
                body["tenant"] = json!(t);
            }
            if let Some(s) = expires_in {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .context("the system clock is before 1970")?
                    .as_secs_f64();
                body["expires_at"] = json!(now + s as f64);
            }
            let v = c.post("/api/auth/keys", body).await?;
            print(out, &v, |v| {
                format!(
                    "key_id: {}\nkey:    {}\n(store the key now: it is shown once)\n",
                    cell(&v["key_id"]),
                    cell(&v["raw_key"])
                )
            });
        }
        KeysCmd::List { all } => {
            let v = c
                .get(&format!("/api/auth/keys?include_revoked={all}"))
                .await?;
            print(out, &v, |v| {
                table(
                    v["keys"].as_array().map_or(&[][..], Vec::as_slice),
                    &[
                        "key_id",
                        "principal_id",
                        "tenant",
                        "name",
                        "revoked",
                        "expires_at",
                    ],
                )
            });
        }
        KeysCmd::Revoke { id } => {
            let v = c
                .send(
                    reqwest::Method::DELETE,
                    &format!("/api/auth/keys/{id}"),
                    None,
                )
                .await?;
            print(out, &v, kv);
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum RolesCmd {
    /// Roles with their permissions, and who holds which where (scopes).
    List,
    /// Create or replace a custom role.
    Create {
        /// Role name (1-64 letters, digits, `_`, `-`, `.`; not a built-in name).
        name: String,
        /// A permission, `resource:action` (`*` for either part, e.g. `tool:invoke`,
        /// `mcp_servers:*`); repeat or comma-separate.
        #[arg(
            long = "permission",
            value_name = "PERMISSION",
            value_delimiter = ',',
            required = true
        )]
        permissions: Vec<String>,
        /// What the role is for.
        #[arg(long)]
        description: Option<String>,
    },
    /// Delete a custom role (refused while it is assigned: revoke it first).
    Delete {
        /// Role name.
        name: String,
    },
    /// Give a principal a role (admin, provider-admin, developer, viewer, auditor,
    /// service-account, or a custom one), everywhere or within a scope.
    Assign(AssignArgs),
    /// Take a role from a principal (the assignment of that scope only).
    Revoke(AssignArgs),
}

/// `roles assign|revoke PRINCIPAL ROLE [--scope S]` (`--principal` / `--role` work too).
#[derive(Args)]
pub struct AssignArgs {
    /// Principal (e.g. `service:ci`, `group:<JWT group>`).
    principal: Option<String>,
    /// Role name.
    role: Option<String>,
    /// Principal, as a flag.
    #[arg(
        long = "principal",
        value_name = "PRINCIPAL",
        conflicts_with = "principal"
    )]
    principal_flag: Option<String>,
    /// Role name, as a flag.
    #[arg(long = "role", value_name = "ROLE", conflicts_with = "role")]
    role_flag: Option<String>,
    /// Where the role applies: `global` (default), `server:<id>` or `group:<id>` (the group
    /// and its members).
    #[arg(long)]
    scope: Option<String>,
}

impl AssignArgs {
    /// The request body.
    fn body(self) -> anyhow::Result<Value> {
        let Some(principal) = self.principal.or(self.principal_flag) else {
            bail!("give the principal: roles assign|revoke PRINCIPAL ROLE [--scope server:ID]");
        };
        let Some(role) = self.role.or(self.role_flag) else {
            bail!("give the role: roles assign|revoke PRINCIPAL ROLE [--scope server:ID]");
        };
        let mut body = json!({"principal_id": principal, "role_name": role});
        if let Some(scope) = self.scope {
            body["scope"] = json!(scope);
        }
        Ok(body)
    }
}

/// `GET /api/auth/roles` as text: the roles, then every assignment with its scope.
fn roles_text(v: &Value) -> String {
    let roles = v["roles"].as_array().map_or(&[][..], Vec::as_slice);
    let mut s = table(roles, &["name", "builtin", "permissions"]);
    let held: Vec<Value> = roles
        .iter()
        .flat_map(|r| {
            r["assignments"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| json!({"principal_id": a["principal_id"], "role": r["name"], "scope": a["scope"]}))
        })
        .collect();
    if !held.is_empty() {
        s.push('\n');
        s.push_str(&table(&held, &["principal_id", "role", "scope"]));
    }
    s
}

pub async fn roles(c: &Client, out: Output, cmd: RolesCmd) -> anyhow::Result<()> {
    let v = match cmd {
        RolesCmd::List => {
            let v = c.get("/api/auth/roles").await?;
            print(out, &v, roles_text);
            return Ok(());
        }
        RolesCmd::Create {
            name,
            permissions,
            description,
        } => {
            let mut body = json!({"name": name, "permissions": permissions});
            if let Some(d) = description {
                body["description"] = json!(d);
            }
            c.post("/api/auth/roles", body).await?
        }
        RolesCmd::Delete { name } => {
            if name.is_empty() || name.contains(['/', '?', '#', '%']) {
                bail!("invalid role name '{name}'");
            }
            c.send(
                reqwest::Method::DELETE,
                &format!("/api/auth/roles/{name}"),
                None,
            )
            .await?
        }
        RolesCmd::Assign(a) => c.post("/api/auth/roles/assign", a.body()?).await?,
        RolesCmd::Revoke(a) => c.post("/api/auth/roles/revoke", a.body()?).await?,
    };
    print(out, &v, kv);
    Ok(())
}

#[derive(Subcommand)]
pub enum LimitsCmd {
    /// Rate-limit definitions, this node's mode (leased, partition, standalone) and its
    /// buckets with their shares.
    List,
    /// Create or replace a rate limit on tool calls (cluster-wide `--rps`).
    Set {
        /// Rule id ([A-Za-z0-9_.-], at most 64 characters).
        id: String,
        #[command(flatten)]
        spec: LimitSpec,
    },
    /// Delete a rate limit defined through the API (file-defined ones: edit the file).
    Rm {
        /// Rule id.
        id: String,
    },
}

/// The definition `limits set` sends.
#[derive(Args)]
pub struct LimitSpec {
    /// Calls per second allowed across the whole cluster (> 0, fractions allowed).
    #[arg(long)]
    rps: f64,
    /// Burst size (>= 1; default max(1, ceil(rps))).
    #[arg(long)]
    burst: Option<u64>,
    /// Dimensions that separate buckets, comma-separated or repeated: principal, tenant,
    /// server, tool (default: one bucket for the whole rule).
    #[arg(long, value_delimiter = ',')]
    key: Vec<String>,
    /// Only calls to servers matching this glob.
    #[arg(long)]
    match_server: Option<String>,
    /// Only calls to tools matching this glob.
    #[arg(long)]
    match_tool: Option<String>,
    /// Only calls by this principal (API key id; `anonymous` = every unauthenticated caller).
    #[arg(long)]
    match_principal: Option<String>,
    /// Only calls by keys of this tenant.
    #[arg(long)]
    match_tenant: Option<String>,
    /// What a node does without a quota lease from the leader.
    #[arg(long, value_parser = ["safe_share", "fail_open", "fail_closed"])]
    on_partition: Option<String>,
}

/// A rule id as a path segment: refuses what would change the URL (the node checks the rest).
fn limit_path(id: &str) -> anyhow::Result<String> {
    if id.is_empty() || id.contains(['/', '?', '#', '%']) || id.contains(char::is_whitespace) {
        bail!("invalid rate limit id '{id}': use letters, digits, '_', '.' and '-'");
    }
    Ok(format!("/api/rate_limits/{id}"))
}

/// The body of `PUT /api/rate_limits/{id}`; absent options are left out.
fn limit_body(spec: &LimitSpec) -> anyhow::Result<Value> {
    let LimitSpec {
        rps,
        burst,
        key,
        match_server,
        match_tool,
        match_principal,
        match_tenant,
        on_partition,
    } = spec;
    if !rps.is_finite() {
        bail!("--rps must be a number (got {rps})");
    }
    let mut body = json!({"rps": rps});
    let key: Vec<&String> = key.iter().filter(|k| !k.trim().is_empty()).collect();
    if !key.is_empty() {
        body["key"] = json!(key);
    }
    let mut m = serde_json::Map::new();
    for (k, v) in [
        ("server", match_server),
        ("tool", match_tool),
        ("principal", match_principal),
        ("tenant", match_tenant),
    ] {
        if let Some(v) = v {
            m.insert(k.to_owned(), json!(v));
        }
    }
    if !m.is_empty() {
        body["match"] = Value::Object(m);
    }
    if let Some(b) = burst {
        body["burst"] = json!(b);
    }
    if let Some(p) = on_partition {
        body["on_partition"] = json!(p);
    }
    Ok(body)
}

/// A number of requests per second for a table: at most two decimals.
fn rate(v: &Value) -> Value {
    match v.as_f64() {
        Some(f) if f.fract() != 0.0 => json!(format!("{f:.2}")),
        _ => v.clone(),
    }
}

/// A definition as a table row: `key` as `a,b`, `match` as `k=glob,…`.
fn limit_row(d: &Value) -> Value {
    if !d.is_object() {
        return d.clone();
    }
    let mut r = d.clone();
    let key: Vec<String> = d["key"]
        .as_array()
        .map(|a| a.iter().map(cell).collect())
        .unwrap_or_default();
    r["key"] = if key.is_empty() {
        Value::Null
    } else {
        json!(key.join(","))
    };
    let m: Vec<String> = d["match"]
        .as_object()
        .map(|o| o.iter().map(|(k, v)| format!("{k}={}", cell(v))).collect())
        .unwrap_or_default();
    r["match"] = if m.is_empty() {
        Value::Null
    } else {
        json!(m.join(","))
    };
    r["rps"] = rate(&d["rps"]);
    r
}

fn limits_text(v: &Value) -> String {
    let defs: Vec<Value> = v["rate_limits"]
        .as_array()
        .map(|a| a.iter().map(limit_row).collect())
        .unwrap_or_default();
    let mut s = table(
        &defs,
        &[
            "id",
            "source",
            "applies_to",
            "key",
            "match",
            "rps",
            "burst",
            "on_partition",
        ],
    );
    let n = &v["node"];
    s.push_str(&format!(
        "\nnode {} · mode {} · lease {} ms left · leader {}\n\n",
        cell(&n["node_id"]),
        cell(&n["mode"]),
        cell(&n["lease_remaining_ms"]),
        cell(&n["leader"]),
    ));
    let buckets: Vec<Value> = v["buckets"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|b| b.is_object())
                .map(|b| {
                    let mut r = b.clone();
                    r["share_rps"] = rate(&b["share_rps"]);
                    r["demand_rps"] = rate(&b["demand_rps"]);
                    r
                })
                .collect()
        })
        .unwrap_or_default();
    s.push_str(&table(
        &buckets,
        &[
            "rule",
            "key",
            "share_rps",
            "demand_rps",
            "allowed",
            "rejected",
        ],
    ));
    s
}

pub async fn limits(c: &Client, out: Output, cmd: LimitsCmd) -> anyhow::Result<()> {
    match cmd {
        LimitsCmd::List => {
            let v = c.get("/api/rate_limits").await?;
            print(out, &v, limits_text);
        }
        LimitsCmd::Set { id, spec } => {
            let path = limit_path(&id)?;
            let body = limit_body(&spec)?;
            let v = c.send(reqwest::Method::PUT, &path, Some(body)).await?;
            print(out, &v, |v| kv(&limit_row(&v["rate_limit"])));
        }
        LimitsCmd::Rm { id } => {
            let v = c
                .send(reqwest::Method::DELETE, &limit_path(&id)?, None)
                .await?;
            print(out, &v, |_| format!("deleted {id}\n"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::{Cli, Cmd};

    /// `hangarctl ARGS…` parsed as `limits set`: its path and body.
    fn set_request(args: &[&str]) -> anyhow::Result<(String, Value)> {
        let cli = Cli::try_parse_from([&["hangarctl", "limits", "set"], args].concat())?;
        let Cmd::Limits {
            cmd: LimitsCmd::Set { id, spec },
        } = cli.command
        else {
            bail!("not `limits set`");
        };
        Ok((limit_path(&id)?, limit_body(&spec)?))
    }

    #[test]
    fn limits_set_sends_every_given_field() {
        let (path, body) = set_request(&[
            "per-key",
            "--rps",
            "100",
            "--burst",
            "20",
            "--key",
            "principal,server",
            "--match-server",
            "fs*",
            "--match-tool",
            "write_*",
            "--match-principal",
            "anonymous",
            "--match-tenant",
            "acme",
            "--on-partition",
            "fail_closed",
        ])
        .unwrap();
        assert_eq!(path, "/api/rate_limits/per-key");
        assert_eq!(
            body,
            json!({
                "key": ["principal", "server"],
                "match": {"server": "fs*", "tool": "write_*", "principal": "anonymous", "tenant": "acme"},
                "rps": 100.0,
                "burst": 20,
                "on_partition": "fail_closed",
            })
        );
    }

    #[test]
    fn limits_set_leaves_out_absent_options() {
        let (_, body) = set_request(&["g", "--rps", "2.5"]).unwrap();
        assert_eq!(body, json!({"rps": 2.5}));
        let (_, body) = set_request(&[
            "g",
            "--rps",
            "1",
            "--key",
            "tool",
            "--key",
            "tenant",
            "--match-tool",
            "x",
        ])
        .unwrap();
        assert_eq!(
            body,
            json!({"rps": 1.0, "key": ["tool", "tenant"], "match": {"tool": "x"}})
        );
    }

    #[test]
    fn limits_set_refuses_bad_arguments_before_sending() {
        assert!(set_request(&["g"]).is_err(), "--rps is required");
        assert!(set_request(&["g", "--rps", "ten"]).is_err());
        assert!(set_request(&["g", "--rps", "NaN"]).is_err());
        assert!(set_request(&["g", "--rps", "1", "--on-partition", "maybe"]).is_err());
        assert!(set_request(&["a/b", "--rps", "1"]).is_err());
        assert!(limit_path("x?y").is_err());
        assert_eq!(limit_path("a.b_c-1").unwrap(), "/api/rate_limits/a.b_c-1");
    }

    /// `hangarctl roles ARGS…` parsed.
    fn roles_cmd(args: &[&str]) -> anyhow::Result<RolesCmd> {
        let cli = Cli::try_parse_from([&["hangarctl", "roles"], args].concat())?;
        let Cmd::Roles { cmd } = cli.command else {
            bail!("not `roles`");
        };
        Ok(cmd)
    }

    #[test]
    fn roles_assign_and_revoke_take_positionals_or_flags_and_a_scope() {
        let Ok(RolesCmd::Assign(a)) =
            roles_cmd(&["assign", "svc:a", "caller", "--scope", "server:a"])
        else {
            panic!("assign");
        };
        assert_eq!(
            a.body().unwrap(),
            json!({"principal_id": "svc:a", "role_name": "caller", "scope": "server:a"})
        );
        let Ok(RolesCmd::Revoke(a)) =
            roles_cmd(&["revoke", "--principal", "p", "--role", "viewer"])
        else {
            panic!("revoke");
        };
        assert_eq!(
            a.body().unwrap(),
            json!({"principal_id": "p", "role_name": "viewer"})
        );
        let Ok(RolesCmd::Assign(a)) = roles_cmd(&["assign", "p"]) else {
            panic!("assign");
        };
        assert!(a.body().is_err(), "no role");
        assert!(roles_cmd(&["assign", "p", "r", "--principal", "q"]).is_err());
        let Ok(RolesCmd::Create {
            name, permissions, ..
        }) = roles_cmd(&[
            "create",
            "caller",
            "--permission",
            "tool:invoke,tool:list",
            "--permission",
            "mcp_servers:read",
        ])
        else {
            panic!("create");
        };
        assert_eq!(name, "caller");
        assert_eq!(
            permissions,
            ["tool:invoke", "tool:list", "mcp_servers:read"]
        );
        assert!(
            roles_cmd(&["create", "x"]).is_err(),
            "--permission is required"
        );
    }

    #[test]
    fn roles_list_shows_every_assignment_with_its_scope() {
        let v = json!({"roles": [
            {"name": "viewer", "builtin": true, "permissions": ["tool:list"],
             "assignments": [{"principal_id": "p1", "scope": "global"}]},
            {"name": "caller", "builtin": false, "permissions": ["tool:invoke"],
             "assignments": [{"principal_id": "svc:a", "scope": "server:a"}]},
        ]});
        assert_eq!(
            roles_text(&v),
            "\
NAME    BUILTIN  PERMISSIONS
viewer  true     [\"tool:list\"]
caller  false    [\"tool:invoke\"]

PRINCIPAL_ID  ROLE    SCOPE
p1            viewer  global
svc:a         caller  server:a
"
        );
    }

    #[test]
    fn limits_list_shows_definitions_mode_and_buckets() {
        let v = json!({
            "rate_limits": [
                {"id": "rate_limit", "source": "file", "applies_to": "commands", "key": ["command"],
                 "match": {}, "rps": 10.0, "burst": 20, "on_partition": "safe_share"},
                {"id": "per-key", "source": "api", "applies_to": "tools", "key": ["principal", "server"],
                 "match": {"server": "fs*"}, "rps": 0.5, "burst": 1, "on_partition": "fail_open"},
            ],
            "node": {"node_id": 1, "mode": "leased", "lease_remaining_ms": 1800, "leader": 2},
            "buckets": [{"rule": "per-key", "key": "per-key|principal=k1|server=fs", "share_rps": 33.333333,
                         "demand_rps": 12.0, "allowed": 40, "rejected": 3}],
        });
        assert_eq!(
            limits_text(&v),
            "\
ID          SOURCE  APPLIES_TO  KEY               MATCH       RPS   BURST  ON_PARTITION
rate_limit  file    commands    command           -           10.0  20     safe_share
per-key     api     tools       principal,server  server=fs*  0.50  1      fail_open

node 1 · mode leased · lease 1800 ms left · leader 2

RULE     KEY                             SHARE_RPS  DEMAND_RPS  ALLOWED  REJECTED
per-key  per-key|principal=k1|server=fs  33.33      12.0        40       3
"
        );
    }
}
