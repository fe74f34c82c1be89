//! The `cluster:` section: this node's identity in the Raft cluster, where its data lives,
//! how it finds the others, and the Raft timings. Every key can also come from a flag or an
//! environment variable of `hangar serve` (flags win), see `ClusterConfig::override_with`.

use std::path::PathBuf;

use serde::Serialize;
use serde_json::Value;

use super::ConfigError;
use super::reader::{Obj, ProblemSink, type_name};

/// A statically known member, used to bootstrap a cluster from config alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerSpec {
    /// Node id.
    pub node_id: u64,
    /// Its Raft (gRPC) address, `host:port`.
    pub raft_addr: String,
    /// Its HTTP API address, `host:port`.
    pub api_addr: String,
}

/// `cluster:`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterConfig {
    /// This node's id (≥ 1, unique, stable across restarts).
    pub node_id: u64,
    /// Address the Raft gRPC server binds. `127.0.0.1:0` (the default) picks a free port,
    /// which only suits a single-node cluster: members must keep their address.
    pub raft_addr: String,
    /// Raft address the other nodes use to reach this one (default: the bound address).
    pub advertise_addr: Option<String>,
    /// HTTP address the other nodes and `hangarctl` use for this node (default: the bound
    /// listener address).
    pub api_advertise_addr: Option<String>,
    /// Where the Raft log and state live.
    pub data_dir: PathBuf,
    /// Static membership: when set and this node has no data, the node with the lowest id
    /// initializes the cluster with all of them.
    pub peers: Vec<PeerSpec>,
    /// API URLs of existing members to join through (`http://host:port`).
    pub join: Vec<String>,
    /// With neither peers nor join: initialize a single-node cluster on first start
    /// (`false` waits for `hangarctl cluster init` or `cluster join`).
    pub bootstrap: bool,
    /// Leader heartbeat, ms.
    pub heartbeat_ms: u64,
    /// Election timeout range, ms.
    pub election_min_ms: u64,
    /// Election timeout range, ms.
    pub election_max_ms: u64,
    /// Snapshot after this many applied entries.
    pub snapshot_every: u64,
    /// Log entries kept after a snapshot.
    pub keep_logs: u64,
    /// `/health/ready` fails when this node's applied index trails its commit index by more.
    pub max_ready_lag: u64,
    /// Most local-mode (`replicas: 1`) instances the leader places on this node (`None` = no
    /// limit).
    pub capacity: Option<u32>,
    /// Labels of this node (`cluster.labels: {zone: a}`), matched by a server's
    /// `placement.labels`.
    pub labels: std::collections::BTreeMap<String, String>,
    /// A node that has not acknowledged the leader for this long is lost: the leader places
    /// its instances on the other nodes.
    pub node_loss_timeout: std::time::Duration,
    /// How long a placement lease lasts: a node runs its single-instance servers only while
    /// it holds one, renewed by the leader. Shorter than `node_loss_timeout`, so a node cut
    /// off from the leader has stopped them before the leader places them elsewhere.
    pub placement_lease: std::time::Duration,
    /// `--apply-config`: this node's file replaces the cluster's file configuration at start.
    pub apply_config_at_boot: bool,
    /// Mutual TLS between the nodes (`cluster.tls`).
    pub tls: Option<ClusterTls>,
    /// `cluster.insecure: true`: allow plaintext between nodes on a non-loopback address.
    pub insecure: bool,
}

/// `cluster.tls`: this node's certificate and the cluster CA (PEM files).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterTls {
    /// The cluster CA's certificate: the only issuer of node certificates.
    pub ca_file: PathBuf,
    /// This node's certificate (chain).
    pub cert_file: PathBuf,
    /// Its private key.
    pub key_file: PathBuf,
    /// The name every node certificate carries as a DNS SAN (default `hangar-node`).
    pub server_name: String,
}

/// The default `cluster.tls.server_name` (what `hangarctl cluster gen-certs` puts in every
/// node certificate).
pub const NODE_SERVER_NAME: &str = "hangar-node";

fn is_loopback(addr: &str) -> bool {
    match addr.parse::<std::net::SocketAddr>() {
        Ok(a) => a.ip().is_loopback(),
        // A host name: only `localhost` is known to be local.
        Err(_) => addr.split(':').next() == Some("localhost"),
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            node_id: 1,
            raft_addr: "127.0.0.1:0".into(),
            advertise_addr: None,
            api_advertise_addr: None,
            data_dir: PathBuf::from("data"),
            peers: Vec::new(),
            join: Vec::new(),
            bootstrap: true,
            heartbeat_ms: 50,
            election_min_ms: 250,
            election_max_ms: 500,
            snapshot_every: 5000,
            keep_logs: 1000,
            max_ready_lag: 1000,
            capacity: None,
            labels: Default::default(),
            node_loss_timeout: std::time::Duration::from_secs(10),
            placement_lease: std::time::Duration::from_secs(7),
            apply_config_at_boot: false,
            tls: None,
            insecure: false,
        }
    }
}

/// Overrides from flags and environment variables (`None` = keep the file's value); these
/// are the cluster flags of `hangar serve`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClusterOverrides {
    /// This node's id in the cluster (≥ 1; overrides `cluster.node_id`, default 1).
    #[arg(long, env = "HANGAR_NODE_ID")]
    pub node_id: Option<u64>,
    /// Raft (gRPC) bind address, e.g. 127.0.0.1:7400 (overrides `cluster.raft_addr`).
    #[arg(long, env = "HANGAR_RAFT_ADDR")]
    pub raft_addr: Option<String>,
    /// Raft address the other nodes use for this one (overrides `cluster.advertise_addr`).
    #[arg(long, env = "HANGAR_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,
    /// Data directory of the Raft log and state (overrides `cluster.data_dir`, default ./data).
    #[arg(long, env = "HANGAR_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Join the cluster through this member's API URL (repeatable; overrides `cluster.join`).
    #[arg(long, env = "HANGAR_JOIN", value_delimiter = ',')]
    pub join: Vec<String>,
    /// Do not initialize a single-node cluster on first start; wait for
    /// `hangarctl cluster init` or `cluster join`.
    #[arg(long)]
    pub no_bootstrap: bool,
    /// Apply this node's configuration file to the cluster at start even when the cluster
    /// already runs a configuration from another file (by default a joining or restarting
    /// member of a multi-node cluster does not override it).
    #[arg(long, env = "HANGAR_APPLY_CONFIG")]
    pub apply_config: bool,
}

impl ClusterConfig {
    /// Apply flag/env overrides and re-check what they may have broken.
    pub fn override_with(&mut self, o: &ClusterOverrides) -> Result<(), ConfigError> {
        if let Some(id) = o.node_id {
            self.node_id = id;
        }
        if let Some(a) = &o.raft_addr {
            self.raft_addr = a.clone();
        }
        if let Some(a) = &o.advertise_addr {
            self.advertise_addr = Some(a.clone());
        }
        if let Some(d) = &o.data_dir {
            self.data_dir = d.clone();
        }
        if !o.join.is_empty() {
            self.join = o.join.clone();
        }
        if o.no_bootstrap {
            self.bootstrap = false;
        }
        if o.apply_config {
            self.apply_config_at_boot = true;
        }
        let p = ProblemSink::default();
        if self.node_id == 0 {
            p.push(
                "cluster.node_id",
                "the node id must be ≥ 1 (--node-id / cluster.node_id)",
            );
        }
        if self.raft_addr.parse::<std::net::SocketAddr>().is_err() {
            p.push(
                "cluster.raft_addr",
                format!(
                    "the Raft address must be IP:PORT, e.g. 127.0.0.1:7400 (got `{}`)",
                    self.raft_addr
                ),
            );
        }
        for j in &self.join {
            if let Err(m) = check_url(j) {
                p.push("cluster.join", format!("join address `{j}`: {m}"));
            }
        }
        if self.tls.is_none() && !self.insecure {
            let exposed = std::iter::once(&self.raft_addr)
                .chain(self.advertise_addr.iter())
                .find(|a| !is_loopback(a));
            if let Some(a) = exposed {
                p.push(
                    "cluster.tls",
                    format!(
                        "the Raft address {a} is not a loopback address, and traffic between nodes would be plaintext and unauthenticated: anyone reaching it could vote, replicate or join. Set cluster.tls {{ca_file, cert_file, key_file}} (make them with `hangarctl cluster gen-certs`), or `cluster.insecure: true` if the network between the nodes is trusted"
                    ),
                );
            }
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid { problems: p.take() })
        }
    }
}

fn check_url(u: &str) -> Result<(), &'static str> {
    let rest = u
        .strip_prefix("http://")
        .or_else(|| u.strip_prefix("https://"))
        .ok_or("must start with http:// or https:// (the API address of a member)")?;
    if rest.trim_end_matches('/').is_empty() {
        return Err("has no host");
    }
    Ok(())
}

/// Least gap between a placement lease and the node-loss timeout, ms: the time a node has to
/// kill its instances after its lease lapsed, before the leader may start them elsewhere.
pub(super) const LEASE_MARGIN_MS: u64 = 500;

/// Parse `cluster:`.
pub(super) fn parse(o: &Obj<'_>, p: &ProblemSink) -> ClusterConfig {
    let d = ClusterConfig::default();
    let node_id = o.int("node_id", d.node_id, 1, u64::MAX >> 1);
    let raft_addr = o.str("raft_addr").unwrap_or(d.raft_addr);
    if raft_addr.parse::<std::net::SocketAddr>().is_err() {
        p.push(
            &o.at("raft_addr"),
            format!("must be IP:PORT, e.g. 127.0.0.1:7400 (got `{raft_addr}`)"),
        );
    }
    let advertise_addr = o.str("advertise_addr");
    let api_advertise_addr = o.str("api_advertise_addr");
    let data_dir = o.str("data_dir").map(PathBuf::from).unwrap_or(d.data_dir);
    let mut peers = Vec::new();
    if let Some(v) = o.raw("peers") {
        match v {
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let path = format!("{}[{i}]", o.at("peers"));
                    let Some(po) = Obj::new(item, &path, p) else {
                        continue;
                    };
                    let id = po.int("node_id", 0, 1, u64::MAX >> 1);
                    let raft = po.req_str("raft_addr", "the peer's Raft address (host:port)");
                    let api = po.req_str("api_addr", "the peer's HTTP API address (host:port)");
                    po.finish();
                    if let (Some(raft_addr), Some(api_addr)) = (raft, api)
                        && id > 0
                    {
                        peers.push(PeerSpec {
                            node_id: id,
                            raft_addr,
                            api_addr,
                        });
                    }
                }
            }
            other => p.push(
                &o.at("peers"),
                format!(
                    "must be a list of {{node_id, raft_addr, api_addr}}, got {}",
                    type_name(other)
                ),
            ),
        }
    }
    let join = o.str_list("join").unwrap_or_default();
    for (i, j) in join.iter().enumerate() {
        if let Err(m) = check_url(j) {
            p.push(&format!("{}[{i}]", o.at("join")), m);
        }
    }
    let heartbeat_ms = o.int("heartbeat_ms", d.heartbeat_ms, 10, 60_000);
    let election_min_ms = o.int("election_min_ms", d.election_min_ms, 50, 600_000);
    let election_max_ms = o.int("election_max_ms", d.election_max_ms, 60, 600_000);
    if election_min_ms >= election_max_ms || heartbeat_ms >= election_min_ms {
        p.push(
            &o.path_str(),
            format!(
                "Raft timings must satisfy heartbeat_ms < election_min_ms < election_max_ms (got {heartbeat_ms} < {election_min_ms} < {election_max_ms})"
            ),
        );
    }
    let node_loss_ms = o.int(
        "node_loss_timeout_ms",
        d.node_loss_timeout.as_millis() as u64,
        election_max_ms,
        3_600_000,
    );
    // Default: 70 % of the node-loss timeout (7 s of 10 s).
    let lease_ms = o.int("placement_lease_ms", node_loss_ms * 7 / 10, 1, 3_600_000);
    let min_lease = 2 * election_max_ms;
    if lease_ms < min_lease || lease_ms + LEASE_MARGIN_MS > node_loss_ms {
        p.push(
            &o.at("placement_lease_ms"),
            format!(
                "must be at least 2 × election_max_ms ({min_lease}, so a lease outlives a leader election) and at most node_loss_timeout_ms − {LEASE_MARGIN_MS} ({}, so a node cut off from the leader stops its instances before the leader places them elsewhere); got {lease_ms}",
                node_loss_ms.saturating_sub(LEASE_MARGIN_MS)
            ),
        );
    }
    let c = ClusterConfig {
        node_id,
        raft_addr,
        advertise_addr,
        api_advertise_addr,
        data_dir,
        peers,
        join,
        bootstrap: o.bool("bootstrap", d.bootstrap),
        heartbeat_ms,
        election_min_ms,
        election_max_ms,
        snapshot_every: o.int("snapshot_every", d.snapshot_every, 0, u64::MAX >> 1),
        keep_logs: o.int("keep_logs", d.keep_logs, 0, u64::MAX >> 1),
        max_ready_lag: o.int("max_ready_lag", d.max_ready_lag, 1, u64::MAX >> 1),
        capacity: o
            .has("capacity")
            .then(|| o.int("capacity", 0, 0, 100_000) as u32),
        labels: super::validate::labels(o.raw("labels"), &o.at("labels"), p),
        node_loss_timeout: std::time::Duration::from_millis(node_loss_ms),
        placement_lease: std::time::Duration::from_millis(lease_ms),
        apply_config_at_boot: false,
        tls: o.obj("tls").map(|t| {
            let file = |k: &'static str| {
                t.req_str(k, "a PEM file")
                    .map(PathBuf::from)
                    .unwrap_or_default()
            };
            let tls = ClusterTls {
                ca_file: file("ca_file"),
                cert_file: file("cert_file"),
                key_file: file("key_file"),
                server_name: t
                    .str("server_name")
                    .unwrap_or_else(|| NODE_SERVER_NAME.to_owned()),
            };
            t.finish();
            tls
        }),
        insecure: o.bool("insecure", false),
    };
    o.allow(&["enabled"]);
    o.finish();
    c
}
