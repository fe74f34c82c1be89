//! Cluster-wide rate limits (DESIGN §6): a limit means the same on one node and on five, and
//! a call never waits for the network to be admitted.
//!
//! * Definitions are replicated (`State.limits`: the config file's `rate_limit` and
//!   `rate_limits`, and those set through `/api/rate_limits`).
//! * Each node decides locally, with one GCRA cell per bucket ([`gcra`]) at its current
//!   **share** of the limit: a few atomics, no lock shared by all calls (the rules are an
//!   `ArcSwap` snapshot, the buckets sit in sharded maps).
//! * The leader leases the shares ([`allocator`]): every [`REPORT_EVERY`] each node reports
//!   its demand per bucket over gRPC (`QuotaService/Report`, not Raft entries) and gets
//!   shares valid for [`LEASE`] ([`service`]).
//! * A node without a valid lease (it cannot reach a leader) applies each rule's
//!   `on_partition` mode, and says so: `X-RateLimit-Mode: partition` on every response, the
//!   metric `mcp_hangar_rate_limit_partition_mode`, the events `RateLimitPartitionMode` /
//!   `RateLimitLeaseRestored`.

pub mod allocator;
pub mod gcra;
pub mod service;

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hangar_raft::state::RateLimitDef;
use parking_lot::RwLock;
use prometheus::{GaugeVec, IntCounter, IntCounterVec, IntGauge, Opts};

use self::allocator::{Limit, Mode};
use self::gcra::{Gcra, Rate, Verdict};
use crate::jsonrpc::RpcError;
use crate::upstream::lease::mono_now_ns;

/// How often a node reports its demand to the leader.
pub const REPORT_EVERY: Duration = Duration::from_millis(250);
/// How long a grant is valid (from before the report was sent).
pub const LEASE: Duration = Duration::from_secs(2);
/// The JSON-RPC error code of a refused call.
pub const RATE_LIMITED: i64 = -32029;
/// Local buckets unused this long are forgotten.
const BUCKET_IDLE_NS: u64 = 60_000_000_000;
const SHARDS: usize = 32;

/// Who is calling, as the rate limits see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The API key id; `jwt:<issuer>|<subject>` for a bearer JWT; `ip:<address>` for an
    /// unauthenticated caller.
    pub principal: String,
    /// No credentials.
    pub anonymous: bool,
    /// The key's tenant (empty: none).
    pub tenant: String,
}

impl Caller {
    /// The caller of a request: its principal (set by the auth middleware), else its source
    /// address.
    pub fn of(
        principal: Option<&crate::auth::Principal>,
        source: Option<std::net::IpAddr>,
    ) -> Caller {
        use crate::auth::Principal;
        match principal {
            Some(Principal::ApiKey { key_id, tenant, .. }) => Caller {
                principal: key_id.clone(),
                anonymous: false,
                tenant: tenant.clone().unwrap_or_default(),
            },
            Some(Principal::Bootstrap { key_id }) => Caller {
                principal: key_id.clone(),
                anonymous: false,
                tenant: String::new(),
            },
            Some(Principal::Jwt {
                subject,
                issuer,
                tenant,
                ..
            }) => Caller {
                principal: format!("jwt:{issuer}|{subject}"),
                anonymous: false,
                tenant: tenant.clone().unwrap_or_default(),
            },
            _ => Caller {
                principal: source.map_or_else(|| "ip:unknown".to_owned(), |ip| format!("ip:{ip}")),
                anonymous: true,
                tenant: String::new(),
            },
        }
    }

    /// The local user of a stdio front door.
    pub fn local() -> Caller {
        Caller {
            principal: "local".to_owned(),
            anonymous: true,
            tenant: String::new(),
        }
    }
}

/// What is being counted.
#[derive(Debug, Clone, Copy)]
pub enum Subject<'a> {
    /// A tool call.
    Tool {
        /// Server or group id.
        server: &'a str,
        /// Tool name.
        tool: &'a str,
    },
    /// A REST command (its route pattern, e.g. `POST /api/mcp_servers/{id}/start`).
    Command(&'a str),
}

impl Subject<'_> {
    fn dim(&self, caller: &Caller, dim: &str) -> String {
        match (dim, self) {
            ("principal", _) => caller.principal.clone(),
            ("tenant", _) => caller.tenant.clone(),
            ("server", Subject::Tool { server, .. }) => (*server).to_owned(),
            ("tool", Subject::Tool { tool, .. }) => (*tool).to_owned(),
            ("command", Subject::Tool { .. }) => "invoke_tool".to_owned(),
            ("command", Subject::Command(c)) => (*c).to_owned(),
            _ => String::new(),
        }
    }
}

/// A compiled rule.
struct Rule {
    def: RateLimitDef,
    mode: Mode,
    allowed: IntCounter,
    rejected: IntCounter,
}

impl Rule {
    fn applies(&self, caller: &Caller, subject: &Subject<'_>) -> bool {
        if self.def.applies_to == "tools" && !matches!(subject, Subject::Tool { .. }) {
            return false;
        }
        self.def.matches.iter().all(|(dim, pattern)| {
            if dim == "principal" && pattern == "anonymous" {
                return caller.anonymous;
            }
            crate::routing::glob_match(pattern, &subject.dim(caller, dim))
        })
    }

    fn bucket_key(&self, caller: &Caller, subject: &Subject<'_>) -> String {
        let mut k = self.def.id.clone();
        for dim in &self.def.key {
            k.push('|');
            k.push_str(dim);
            k.push('=');
            k.push_str(&subject.dim(caller, dim));
        }
        k
    }

    fn limit(&self) -> Limit {
        Limit {
            rps: self.def.rps,
            mode: self.mode,
        }
    }
}

#[derive(Default)]
struct Rules {
    list: Vec<Arc<Rule>>,
    by_id: HashMap<String, Arc<Rule>>,
}

/// One bucket on this node.
struct Bucket {
    rule: Arc<Rule>,
    gcra: Gcra,
    /// The granted share (f64 bits); NaN: none (provisional share).
    share: AtomicU64,
    offered: AtomicU64,
    allowed: AtomicU64,
    rejected: AtomicU64,
    last_used: AtomicU64,
    /// Offered calls per second, smoothed (f64 bits; the reporter's).
    demand: AtomicU64,
    /// `offered` at the last report.
    reported: AtomicU64,
}

fn f64_of(a: &AtomicU64) -> f64 {
    f64::from_bits(a.load(Ordering::Relaxed))
}

/// A refused call.
#[derive(Debug, Clone, PartialEq)]
pub struct Limited {
    /// The rule that refused it.
    pub rule: String,
    /// The rule's cluster-wide rate.
    pub rps: f64,
    /// The rule's cluster-wide burst.
    pub burst: u64,
    /// When to try again.
    pub retry_after: Duration,
    /// This node's mode (`leased`, or the rule's partition mode).
    pub mode: &'static str,
}

impl Limited {
    fn message(&self) -> String {
        format!(
            "Rate limit exceeded: rule '{}' allows {} calls/s (burst {}) across the cluster; retry in {} ms",
            self.rule,
            self.rps,
            self.burst,
            self.retry_after.as_millis().max(1)
        )
    }

    fn retry_after_ms(&self) -> u64 {
        (self.retry_after.as_millis() as u64).max(1)
    }

    /// The MCP error (`tools/call`, and a `hangar_call` entry's `RateLimitExceeded`).
    pub fn rpc_error(&self) -> RpcError {
        RpcError::with_data(
            RATE_LIMITED,
            self.message(),
            &serde_json::json!({
                "error_type": "RateLimitExceeded",
                "rule": self.rule,
                "retryAfterMs": self.retry_after_ms(),
                "limit": self.rps,
                "burst": self.burst,
                "mode": self.mode,
            }),
        )
    }

    /// Back from the `data` of [`rpc_error`](Self::rpc_error) (for the HTTP headers of an MCP
    /// answer).
    pub fn from_data(d: &serde_json::Value) -> Limited {
        Limited {
            rule: d["rule"].as_str().unwrap_or_default().to_owned(),
            rps: d["limit"].as_f64().unwrap_or(0.0),
            burst: d["burst"].as_u64().unwrap_or(0),
            retry_after: Duration::from_millis(d["retryAfterMs"].as_u64().unwrap_or(1)),
            mode: match d["mode"].as_str() {
                Some("safe_share") => "safe_share",
                Some("fail_closed") => "fail_closed",
                Some("starting") => "starting",
                _ => "leased",
            },
        }
    }

    /// `Retry-After` and the IETF draft's `RateLimit-*` headers, plus MCP Hangar's
    /// `X-RateLimit-*`.
    pub fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        let secs = self.retry_after.as_secs_f64().ceil().max(1.0) as u64;
        let limit = format!("{}", self.rps.ceil() as u64);
        let mut put = |name: &'static str, v: String| {
            if let Ok(v) = HeaderValue::from_str(&v) {
                h.insert(HeaderName::from_static(name), v);
            }
        };
        put("retry-after", secs.to_string());
        put("ratelimit-limit", limit.clone());
        put("ratelimit-remaining", "0".to_owned());
        put("ratelimit-reset", secs.to_string());
        put(
            "ratelimit-policy",
            format!("{limit};w=1;burst={}", self.burst),
        );
        put("x-ratelimit-limit", limit);
        put("x-ratelimit-remaining", "0".to_owned());
        put("x-ratelimit-reset", secs.to_string());
        h
    }

    /// The REST answer: 429 with MCP Hangar's nested envelope.
    pub fn response(&self) -> Response {
        let body = serde_json::json!({"error": {
            "code": "RateLimitExceeded",
            "message": self.message(),
            "details": {"rule": self.rule, "limit": self.rps, "burst": self.burst,
                        "window_seconds": 1, "retry_after_ms": self.retry_after_ms(), "mode": self.mode},
        }});
        (
            StatusCode::TOO_MANY_REQUESTS,
            self.headers(),
            axum::Json(body),
        )
            .into_response()
    }
}

/// The metrics of the rate limits.
pub struct RateLimitMetrics {
    hits: IntCounterVec,
    rule: IntCounterVec,
    share: GaugeVec,
    active: IntGauge,
    partition: IntGauge,
}

impl RateLimitMetrics {
    fn new() -> RateLimitMetrics {
        fn bad<T>(e: prometheus::Error) -> T {
            panic!("rate limit metric definition: {e}")
        }
        RateLimitMetrics {
            hits: IntCounterVec::new(
                Opts::new("mcp_hangar_rate_limit_hits_total", "Rate limit decisions"),
                &["result"],
            )
            .unwrap_or_else(bad),
            rule: IntCounterVec::new(
                Opts::new(
                    "mcp_hangar_rate_limit_rule_total",
                    "Rate limit decisions by rule",
                ),
                &["rule", "result"],
            )
            .unwrap_or_else(bad),
            share: GaugeVec::new(
                Opts::new(
                    "mcp_hangar_rate_limit_share_rps",
                    "This node's current share of each rule (calls/s, summed over its buckets)",
                ),
                &["rule"],
            )
            .unwrap_or_else(bad),
            active: IntGauge::new(
                "mcp_hangar_rate_limit_active_buckets",
                "Rate limit buckets in use on this node",
            )
            .unwrap_or_else(bad),
            partition: IntGauge::new(
                "mcp_hangar_rate_limit_partition_mode",
                "1 while this node has no lease from a leader and applies the rules' on_partition modes",
            )
            .unwrap_or_else(bad),
        }
    }

    /// Register them with `registry`.
    pub fn register(&self, registry: &prometheus::Registry) {
        let _ = registry.register(Box::new(self.hits.clone()));
        let _ = registry.register(Box::new(self.rule.clone()));
        let _ = registry.register(Box::new(self.share.clone()));
        let _ = registry.register(Box::new(self.active.clone()));
        let _ = registry.register(Box::new(self.partition.clone()));
    }
}

/// This node's rate limiter.
pub struct RateLimits {
    rules: ArcSwap<Rules>,
    defs: RwLock<BTreeMap<String, RateLimitDef>>,
    shards: Vec<RwLock<HashMap<String, Arc<Bucket>>>>,
    hasher: std::collections::hash_map::RandomState,
    /// The shares of the last grant (also for buckets not used here yet).
    grants: RwLock<Arc<HashMap<String, f64>>>,
    /// The lease runs until here (monotonic ns).
    lease_until: AtomicU64,
    /// The last grant applied.
    acked: AtomicU64,
    /// Members of the cluster (voters and learners) as this node knows them.
    members: AtomicU64,
    partition: AtomicBool,
    /// A leader answered at least once (before: no share at all, see [`RateLimits::new`]).
    granted_once: AtomicBool,
    allowed_hits: IntCounter,
    rejected_hits: IntCounter,
    metrics: RateLimitMetrics,
}

/// This node's view, for `/api/rate_limits` and `hangar_health`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BucketView {
    /// Rule id.
    pub rule: String,
    /// Bucket key.
    pub key: String,
    /// The rate this node admits there now.
    pub share_rps: f64,
    /// Offered calls per second, smoothed.
    pub demand_rps: f64,
    /// Admitted here.
    pub allowed: u64,
    /// Refused here.
    pub rejected: u64,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self::new()
    }
}

impl RateLimits {
    /// No rules yet. Until a leader answers a first report, the node admits nothing on a
    /// limited bucket (a node joining a cluster whose shares are all granted must not add its
    /// own); if no answer comes within a [`LEASE`] it falls back to its partition modes.
    pub fn new() -> RateLimits {
        let metrics = RateLimitMetrics::new();
        RateLimits {
            rules: ArcSwap::from_pointee(Rules::default()),
            defs: RwLock::new(BTreeMap::new()),
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            grants: RwLock::new(Arc::new(HashMap::new())),
            lease_until: AtomicU64::new(mono_now_ns().saturating_add(LEASE.as_nanos() as u64)),
            acked: AtomicU64::new(0),
            members: AtomicU64::new(1),
            partition: AtomicBool::new(false),
            granted_once: AtomicBool::new(false),
            allowed_hits: metrics.hits.with_label_values(&["allowed"]),
            rejected_hits: metrics.hits.with_label_values(&["rejected"]),
            metrics,
        }
    }

    /// The metrics, to be registered with the node's registry.
    pub fn metrics(&self) -> &RateLimitMetrics {
        &self.metrics
    }

    /// The definitions in effect.
    pub fn definitions(&self) -> Vec<RateLimitDef> {
        self.defs.read().values().cloned().collect()
    }

    /// Replace the definitions (from the replicated state); `true` when they changed. The
    /// buckets of changed rules start afresh.
    pub fn set_definitions(&self, defs: &BTreeMap<String, RateLimitDef>) -> bool {
        if *self.defs.read() == *defs {
            return false;
        }
        let mut rules = Rules::default();
        for d in defs.values() {
            let r = Arc::new(Rule {
                mode: Mode::parse(&d.on_partition),
                allowed: self.metrics.rule.with_label_values(&[&d.id, "allowed"]),
                rejected: self.metrics.rule.with_label_values(&[&d.id, "rejected"]),
                def: d.clone(),
            });
            rules.by_id.insert(d.id.clone(), r.clone());
            rules.list.push(r);
        }
        let old = std::mem::replace(&mut *self.defs.write(), defs.clone());
        self.rules.store(Arc::new(rules));
        for shard in &self.shards {
            shard
                .write()
                .retain(|_, b| old.get(&b.rule.def.id) == defs.get(&b.rule.def.id));
        }
        for id in old.keys().filter(|id| !defs.contains_key(*id)) {
            let _ = self.metrics.share.remove_label_values(&[id]);
        }
        true
    }

    /// The limit of bucket `key` (its rule's), if the rule exists.
    pub fn limit_of(&self, key: &str) -> Option<Limit> {
        let id = key.split('|').next().unwrap_or(key);
        self.rules.load().by_id.get(id).map(|r| r.limit())
    }

    /// Whether this node applies its partition modes now.
    pub fn in_partition(&self) -> bool {
        self.partition.load(Ordering::Relaxed)
    }

    /// `starting` (no leader answered yet: limited buckets admit nothing), `leased` or
    /// `partition`.
    pub fn mode(&self) -> &'static str {
        if self.in_partition() {
            "partition"
        } else if !self.granted_once.load(Ordering::Acquire) {
            "starting"
        } else {
            "leased"
        }
    }

    /// Time left on the lease.
    pub fn lease_remaining(&self) -> Duration {
        Duration::from_nanos(
            self.lease_until
                .load(Ordering::Acquire)
                .saturating_sub(mono_now_ns()),
        )
    }

    /// Admit one call of `caller` on `subject`, or say which rule refuses it.
    pub fn check(&self, caller: &Caller, subject: Subject<'_>) -> Result<(), Limited> {
        let rules = self.rules.load();
        if rules.list.is_empty() {
            return Ok(());
        }
        let now = mono_now_ns();
        let mut verdict = Ok(());
        for rule in rules.list.iter().filter(|r| r.applies(caller, &subject)) {
            let key = rule.bucket_key(caller, &subject);
            let bucket = self.bucket(key, rule, now);
            bucket.offered.fetch_add(1, Ordering::Relaxed);
            bucket.last_used.store(now, Ordering::Relaxed);
            let (rate, mode) = self.rate(&bucket, now);
            let refused = match rate {
                Rated::Open => None,
                Rated::Closed => Some(REPORT_EVERY),
                Rated::At(rate) => match bucket.gcra.check(rate, now) {
                    Verdict::Allow { .. } => None,
                    Verdict::Deny { retry_after_ns, .. } => {
                        Some(Duration::from_nanos(retry_after_ns))
                    }
                },
            };
            match refused {
                None => {
                    bucket.allowed.fetch_add(1, Ordering::Relaxed);
                    rule.allowed.inc();
                }
                Some(retry_after) => {
                    bucket.rejected.fetch_add(1, Ordering::Relaxed);
                    rule.rejected.inc();
                    verdict = Err(Limited {
                        rule: rule.def.id.clone(),
                        rps: rule.def.rps,
                        burst: rule.def.burst,
                        retry_after,
                        mode,
                    });
                    break;
                }
            }
        }
        match &verdict {
            Ok(()) => self.allowed_hits.inc(),
            Err(_) => self.rejected_hits.inc(),
        }
        verdict
    }

    fn shard(&self, key: &str) -> &RwLock<HashMap<String, Arc<Bucket>>> {
        &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS]
    }

    fn bucket(&self, key: String, rule: &Arc<Rule>, now: u64) -> Arc<Bucket> {
        let shard = self.shard(&key);
        if let Some(b) = shard.read().get(&key) {
            return b.clone();
        }
        let share = self.grants.read().get(&key).copied().unwrap_or(f64::NAN);
        shard
            .write()
            .entry(key)
            .or_insert_with(|| {
                Arc::new(Bucket {
                    rule: rule.clone(),
                    gcra: Gcra::default(),
                    share: AtomicU64::new(share.to_bits()),
                    offered: AtomicU64::new(0),
                    allowed: AtomicU64::new(0),
                    rejected: AtomicU64::new(0),
                    last_used: AtomicU64::new(now),
                    demand: AtomicU64::new(0f64.to_bits()),
                    reported: AtomicU64::new(0),
                })
            })
            .clone()
    }

    /// The rate this node admits on `bucket` now, and the mode it is in.
    fn rate(&self, bucket: &Bucket, now: u64) -> (Rated, &'static str) {
        let def = &bucket.rule.def;
        let members = self.members.load(Ordering::Relaxed).max(1) as f64;
        let leased = now < self.lease_until.load(Ordering::Acquire);
        let share = if leased {
            let s = f64_of(&bucket.share);
            if !s.is_nan() {
                s
            } else if self.granted_once.load(Ordering::Acquire) {
                def.rps / members
            } else {
                return (Rated::Closed, "starting");
            }
        } else {
            match bucket.rule.mode {
                Mode::SafeShare => def.rps / members,
                Mode::FailOpen => return (Rated::Open, "fail_open"),
                Mode::FailClosed => return (Rated::Closed, "fail_closed"),
            }
        };
        let mode = if leased { "leased" } else { "safe_share" };
        // The node's part of the burst, in proportion to its part of the rate.
        let burst = def.burst as f64 * share / def.rps;
        match Rate::new(share, burst) {
            Some(r) => (Rated::At(r), mode),
            None => (Rated::Closed, mode),
        }
    }

    /// This node's buckets.
    pub fn buckets(&self) -> Vec<BucketView> {
        let now = mono_now_ns();
        let mut out = Vec::new();
        for shard in &self.shards {
            for (k, b) in shard.read().iter() {
                let share = match self.rate(b, now).0 {
                    Rated::Open => f64::INFINITY,
                    Rated::Closed => 0.0,
                    Rated::At(r) => r.rps(),
                };
                out.push(BucketView {
                    rule: b.rule.def.id.clone(),
                    key: k.clone(),
                    share_rps: share,
                    demand_rps: f64_of(&b.demand),
                    allowed: b.allowed.load(Ordering::Relaxed),
                    rejected: b.rejected.load(Ordering::Relaxed),
                });
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }

    /// Buckets in use here.
    pub fn active_buckets(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }

    /// The demand report for the leader, with the rate this node admits on each bucket now;
    /// forgets idle buckets. `interval` is the time since the last report.
    ///
    /// `interval: None` resends the current estimates (an acknowledgement right after a grant
    /// that lowered a share, so that the leader can give the freed rate to another node).
    pub fn report(&self, node: u64, interval: Option<Duration>) -> allocator::Report {
        let now = mono_now_ns();
        let grants = self.grants.read().clone();
        let rules = self.rules.load();
        let mut buckets = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for shard in &self.shards {
            shard.write().retain(|_, b| {
                now.saturating_sub(b.last_used.load(Ordering::Relaxed)) < BUCKET_IDLE_NS
            });
            for (k, b) in shard.read().iter() {
                let demand = match interval {
                    Some(interval) => {
                        let secs = interval.as_secs_f64().max(0.001);
                        let offered = b.offered.load(Ordering::Relaxed);
                        let delta =
                            offered.saturating_sub(b.reported.swap(offered, Ordering::Relaxed));
                        // Smoothed over about two reports: follows a moving load within a
                        // second.
                        let d = 0.4 * f64_of(&b.demand) + 0.6 * (delta as f64 / secs);
                        b.demand.store(d.to_bits(), Ordering::Relaxed);
                        d
                    }
                    None => f64_of(&b.demand),
                };
                buckets.push(allocator::BucketReport {
                    key: k.clone(),
                    demand,
                    holding: self.holding(f64_of(&b.share), now),
                    using: self.admitting(&b.rule, f64_of(&b.share), now),
                });
                seen.insert(k.clone());
            }
        }
        for (k, v) in grants.iter() {
            let rule = rules.by_id.get(k.split('|').next().unwrap_or(k));
            if let (false, Some(rule)) = (seen.contains(k), rule) {
                buckets.push(allocator::BucketReport {
                    key: k.clone(),
                    demand: 0.0,
                    holding: self.holding(*v, now),
                    using: self.admitting(rule, *v, now),
                });
            }
        }
        allocator::Report {
            node,
            acked: self.acked.load(Ordering::Acquire),
            buckets,
        }
    }

    /// The share held under a running lease for a bucket with granted `share` (NaN: none):
    /// `None` for the provisional share, nothing while starting or past the lease.
    fn holding(&self, share: f64, now: u64) -> Option<f64> {
        if now >= self.lease_until.load(Ordering::Acquire) {
            Some(0.0)
        } else if !share.is_nan() {
            Some(share)
        } else if self.granted_once.load(Ordering::Acquire) {
            None
        } else {
            Some(0.0)
        }
    }

    /// The rate admitted on a bucket of `rule` with granted `share` (NaN: none) at `now`, as
    /// the leader should count it (fail_open counts as the safe share: the best bound).
    fn admitting(&self, rule: &Rule, share: f64, now: u64) -> f64 {
        let members = self.members.load(Ordering::Relaxed).max(1) as f64;
        if now < self.lease_until.load(Ordering::Acquire) {
            if !share.is_nan() {
                share
            } else if self.granted_once.load(Ordering::Acquire) {
                rule.def.rps / members
            } else {
                0.0
            }
        } else if rule.mode == Mode::FailClosed {
            0.0
        } else {
            rule.def.rps / members
        }
    }

    /// Apply a grant from the leader: the shares, and a lease until `until` (monotonic ns).
    /// Returns whether it lowered a share this node had.
    pub fn apply_grant(&self, grant: &allocator::Grant, until: u64) -> bool {
        let shares: HashMap<String, f64> = grant.shares.iter().cloned().collect();
        let before = self.grants.read().clone();
        let lowered = shares
            .iter()
            .any(|(k, v)| before.get(k).is_some_and(|old| v < old));
        for shard in &self.shards {
            for (k, b) in shard.read().iter() {
                let s = shares.get(k).copied().unwrap_or(f64::NAN);
                b.share.store(s.to_bits(), Ordering::Relaxed);
            }
        }
        *self.grants.write() = Arc::new(shares);
        self.acked.store(grant.seq, Ordering::Release);
        self.lease_until.fetch_max(until, Ordering::AcqRel);
        self.granted_once.store(true, Ordering::Release);
        lowered
    }

    /// Set the number of members a safe share divides by.
    pub fn set_members(&self, n: usize) {
        self.members.store(n.max(1) as u64, Ordering::Relaxed);
    }

    /// Update the partition flag from the lease; returns the change, if any (`Some(true)`:
    /// entered partition mode).
    pub fn update_mode(&self) -> Option<bool> {
        // Without rules there is nothing to fall back on: no partition mode to declare.
        let lapsed = mono_now_ns() >= self.lease_until.load(Ordering::Acquire)
            && !self.defs.read().is_empty();
        let was = self.partition.swap(lapsed, Ordering::AcqRel);
        self.metrics.partition.set(i64::from(lapsed));
        let mut per_rule: HashMap<String, f64> = HashMap::new();
        for b in self.buckets() {
            *per_rule.entry(b.rule).or_default() += b.share_rps;
        }
        for id in self.defs.read().keys() {
            let v = per_rule.get(id).copied().unwrap_or(0.0);
            self.metrics.share.with_label_values(&[id]).set(v);
        }
        self.metrics.active.set(self.active_buckets() as i64);
        (was != lapsed).then_some(lapsed)
    }
}

enum Rated {
    Open,
    Closed,
    At(Rate),
}

/// Middleware on every MCP and REST request: names the caller for the rate limits (an
/// `Arc<Caller>` extension), limits REST commands (the config's `rate_limit`: every non-GET
/// `/api` route, one bucket per route), and marks every answer of a node in partition mode.
pub async fn middleware(
    State(limits): State<Arc<RateLimits>>,
    mut req: Request,
    next: Next,
) -> Response {
    let source = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    let caller = Arc::new(Caller::of(
        req.extensions().get::<crate::auth::Principal>(),
        source,
    ));
    let path = req.uri().path();
    if path.starts_with("/api/") && req.method() != Method::GET && req.method() != Method::HEAD {
        let method = req.method().as_str().to_owned();
        let command = crate::auth::rbac::route_pattern(&method, path)
            .map_or_else(|| format!("{method} {path}"), |p| format!("{method} {p}"));
        if let Err(limited) = limits.check(&caller, Subject::Command(&command)) {
            return with_mode(&limits, limited.response());
        }
    }
    req.extensions_mut().insert(caller);
    with_mode(&limits, next.run(req).await)
}

fn with_mode(limits: &RateLimits, mut resp: Response) -> Response {
    if limits.in_partition() {
        resp.headers_mut().insert(
            HeaderName::from_static("x-ratelimit-mode"),
            HeaderValue::from_static("partition"),
        );
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(id: &str, rps: f64, burst: u64) -> RateLimitDef {
        RateLimitDef {
            id: id.into(),
            source: "api".into(),
            applies_to: "tools".into(),
            key: vec![],
            matches: BTreeMap::new(),
            rps,
            burst,
            on_partition: "safe_share".into(),
        }
    }

    /// A limiter whose leader answered (with no shares: the provisional rate / members).
    fn leased(defs: &[RateLimitDef]) -> RateLimits {
        let l = RateLimits::new();
        l.set_definitions(&defs.iter().map(|d| (d.id.clone(), d.clone())).collect());
        l.apply_grant(
            &allocator::Grant {
                seq: 1,
                shares: vec![],
            },
            mono_now_ns() + 3_600_000_000_000,
        );
        l
    }

    fn anon() -> Caller {
        Caller::of(None, Some([127, 0, 0, 1].into()))
    }

    const ECHO: Subject<'static> = Subject::Tool {
        server: "fs",
        tool: "write_file",
    };

    #[test]
    fn with_no_rules_everything_is_admitted() {
        // Even before any leader answered.
        let l = RateLimits::new();
        for _ in 0..1000 {
            assert!(l.check(&anon(), ECHO).is_ok());
        }
    }

    #[test]
    fn a_single_node_admits_the_burst_then_refuses_with_a_retry_time() {
        let l = leased(&[def("g", 10.0, 5)]);
        let admitted = (0..20).filter(|_| l.check(&anon(), ECHO).is_ok()).count();
        assert_eq!(admitted, 5);
        let e = l.check(&anon(), ECHO).unwrap_err();
        assert_eq!(e.rule, "g");
        assert!(e.retry_after > Duration::ZERO && e.retry_after <= Duration::from_millis(100));
        let rpc = e.rpc_error();
        assert_eq!(rpc.code, RATE_LIMITED);
        let data: serde_json::Value = serde_json::from_str(rpc.data.unwrap().get()).unwrap();
        assert_eq!(data["error_type"], "RateLimitExceeded");
        assert!(data["retryAfterMs"].as_u64().unwrap() >= 1);
        let h = e.headers();
        assert_eq!(h["retry-after"], "1");
        assert_eq!(h["x-ratelimit-limit"], "10");
    }

    #[test]
    fn rules_match_by_glob_and_key_by_dimension() {
        let mut per_server = def("w", 1.0, 1);
        per_server.key = vec!["server".into()];
        per_server.matches = BTreeMap::from([("tool".into(), "write_*".into())]);
        let l = leased(&[per_server]);
        let c = anon();
        let read = Subject::Tool {
            server: "fs",
            tool: "read_file",
        };
        let other = Subject::Tool {
            server: "db",
            tool: "write_row",
        };
        assert!(l.check(&c, ECHO).is_ok());
        assert!(l.check(&c, ECHO).is_err());
        // Another tool is not matched; another server has its own bucket.
        assert!(l.check(&c, read).is_ok());
        assert!(l.check(&c, other).is_ok());
        // REST commands are not counted by a tools rule.
        assert!(l.check(&c, Subject::Command("POST /api/x")).is_ok());
        assert_eq!(l.active_buckets(), 2);
    }

    #[test]
    fn the_anonymous_match_is_every_unauthenticated_caller() {
        let mut d = def("anon", 1.0, 1);
        d.matches = BTreeMap::from([("principal".into(), "anonymous".into())]);
        d.key = vec!["principal".into()];
        let l = leased(&[d]);
        let keyed = Caller {
            principal: "k1".into(),
            anonymous: false,
            tenant: String::new(),
        };
        for _ in 0..5 {
            assert!(l.check(&keyed, ECHO).is_ok());
        }
        assert!(l.check(&anon(), ECHO).is_ok());
        assert!(l.check(&anon(), ECHO).is_err());
        // Another address is another principal.
        assert!(
            l.check(&Caller::of(None, Some([127, 0, 0, 2].into())), ECHO)
                .is_ok()
        );
    }

    #[test]
    fn keys_of_one_tenant_share_its_bucket() {
        let mut d = def("t", 1.0, 1);
        d.key = vec!["tenant".into()];
        let l = leased(&[d]);
        let key = |id: &str, tenant: &str| {
            Caller::of(
                Some(&crate::auth::Principal::ApiKey {
                    key_id: id.into(),
                    principal: "p".into(),
                    tenant: Some(tenant.into()),
                }),
                None,
            )
        };
        assert_eq!(key("k1", "acme").tenant, "acme");
        assert!(l.check(&key("k1", "acme"), ECHO).is_ok());
        // Another key of the same tenant: the same bucket, now empty.
        assert!(l.check(&key("k2", "acme"), ECHO).is_err());
        assert!(l.check(&key("k3", "globex"), ECHO).is_ok());
        // A JWT caller: keyed by issuer and subject, with its tenant.
        let jwt = Caller::of(
            Some(&crate::auth::Principal::Jwt {
                subject: "alice".into(),
                issuer: "https://idp".into(),
                tenant: Some("acme".into()),
                groups: Vec::new(),
            }),
            None,
        );
        assert_eq!(jwt.principal, "jwt:https://idp|alice");
        assert!(!jwt.anonymous);
        assert!(l.check(&jwt, ECHO).is_err(), "acme's bucket is empty");
    }

    #[test]
    fn a_grant_sets_the_share_and_its_lapse_the_partition_mode() {
        let l = RateLimits::new();
        let mut d = def("g", 100.0, 1);
        d.on_partition = "fail_closed".into();
        l.set_definitions(&BTreeMap::from([("g".into(), d)]));
        l.set_members(3);
        // Before a leader answered: nothing (a joining node adds nothing to the granted
        // shares).
        assert_eq!(l.check(&anon(), ECHO).unwrap_err().mode, "starting");
        assert_eq!(l.mode(), "starting");
        let r = l.report(1, Some(Duration::from_millis(250)));
        assert_eq!(r.buckets.len(), 1);
        assert_eq!(r.buckets[0].holding, Some(0.0));
        assert!((r.buckets[0].demand - 0.6 * 4.0).abs() < 1e-9);
        l.apply_grant(
            &allocator::Grant {
                seq: 7,
                shares: vec![("g".into(), 0.0)],
            },
            mono_now_ns() + 1_000_000_000,
        );
        // A zero share refuses at once (until the next grant).
        let e = l.check(&anon(), ECHO).unwrap_err();
        assert_eq!(e.retry_after, REPORT_EVERY);
        let r = l.report(1, None);
        assert_eq!(r.acked, 7);
        // Resending does not consume the counts.
        assert!((r.buckets[0].demand - 0.6 * 4.0).abs() < 1e-9);
        assert_eq!(l.update_mode(), None);
        // The lease runs out: fail_closed refuses, and the node says it is partitioned.
        l.lease_until.store(0, Ordering::Release);
        assert_eq!(l.update_mode(), Some(true));
        assert_eq!(l.mode(), "partition");
        assert_eq!(l.check(&anon(), ECHO).unwrap_err().mode, "fail_closed");
    }

    #[test]
    fn the_command_limiter_counts_rest_commands_per_route() {
        let mut d = def("rate_limit", 1.0, 2);
        d.applies_to = "commands".into();
        d.key = vec!["command".into()];
        let l = leased(&[d]);
        let c = anon();
        let start = Subject::Command("POST /api/mcp_servers/{id}/start");
        assert!(l.check(&c, start).is_ok());
        assert!(l.check(&c, start).is_ok());
        assert!(l.check(&c, start).is_err());
        assert!(l.check(&c, Subject::Command("POST /api/groups/")).is_ok());
        // Tool calls share one bucket, `invoke_tool`.
        assert!(l.check(&c, ECHO).is_ok());
        assert!(
            l.buckets()
                .iter()
                .any(|b| b.key == "rate_limit|command=invoke_tool")
        );
    }
}
