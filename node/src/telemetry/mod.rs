//! Telemetry room: the Prometheus metric registry (MCP Hangar's metric names, so existing
//! dashboards and alerts keep working) and log initialisation.
//!
//! Label sets are bounded: server ids and tool names come from configuration and learned
//! catalogues, never from raw client input.

pub mod events;

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Latency buckets used by MCP Hangar (seconds).
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Cold-start buckets used by MCP Hangar (seconds).
const COLD_START_BUCKETS: &[f64] = &[0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// All metrics of one node.
pub struct Metrics {
    registry: Registry,
    /// `mcp_hangar_tool_calls_total{mcp_server,tool,status}`.
    pub tool_calls: IntCounterVec,
    /// `mcp_hangar_tool_call_duration_seconds{mcp_server,tool}` (successful calls only).
    pub tool_call_duration: HistogramVec,
    /// `mcp_hangar_tool_call_errors_total{mcp_server,tool,error_type}`.
    pub tool_call_errors: IntCounterVec,
    /// `mcp_hangar_tool_access_denied_total{mcp_server,reason}`: calls refused by a tool
    /// access policy.
    pub tool_access_denied: IntCounterVec,
    /// `mcp_hangar_mcp_server_info{mcp_server,mode}` = 1.
    pub server_info: IntGaugeVec,
    /// `mcp_hangar_mcp_server_state{mcp_server}` 0 cold … 4 dead.
    pub server_state: IntGaugeVec,
    /// `mcp_hangar_mcp_server_up{mcp_server}` 1/0.
    pub server_up: IntGaugeVec,
    /// `mcp_hangar_mcp_server_initialized{mcp_server}` 1/0.
    pub server_initialized: IntGaugeVec,
    /// `mcp_hangar_mcp_server_last_state_change_timestamp_seconds{mcp_server}`.
    pub server_last_state_change: GaugeVec,
    /// `mcp_hangar_mcp_server_cold_start_in_progress{mcp_server}`.
    pub cold_start_in_progress: IntGaugeVec,
    /// `mcp_hangar_mcp_server_starts_total{mcp_server,result}`.
    pub starts: IntCounterVec,
    /// `mcp_hangar_mcp_server_stops_total{mcp_server,reason}`.
    pub stops: IntCounterVec,
    /// `mcp_hangar_mcp_server_cold_start_seconds{mcp_server,mode}`.
    pub cold_start: HistogramVec,
    /// `mcp_hangar_connections_active{mcp_server}` 1/0.
    pub connections_active: IntGaugeVec,
    /// `mcp_hangar_messages_sent_total{mcp_server,method}` (requests Hangar sent upstream).
    pub messages_sent: IntCounterVec,
    /// `mcp_hangar_errors_total{component,error_type}`.
    pub errors: IntCounterVec,
    /// `mcp_hangar_circuit_breaker_state{mcp_server,state}`.
    pub circuit_breaker_state: IntGaugeVec,
    /// `mcp_hangar_build_info{version}` = 1.
    pub build_info: IntGaugeVec,
    /// `mcp_hangar_process_start_time_seconds`.
    pub process_start_time: IntGauge,
    /// `hangar_cluster_tls_refused_total`: connections to the Raft listener refused by mutual
    /// TLS (no node certificate of the cluster's CA).
    pub tls_refused: prometheus::IntCounter,
    /// `hangar_http_tls_handshake_failures_total`: connections to the HTTPS listener
    /// (`server.tls`) whose TLS handshake failed (plain HTTP, no or an untrusted client
    /// certificate, a client that does not trust ours, a timeout).
    pub http_tls_handshake_failures: prometheus::IntCounter,
    /// `hangar_mcp_requests_total{method,status}`: every front-door JSON-RPC request.
    pub front_requests: IntCounterVec,
    /// `mcp_hangar_health_checks_total{mcp_server,result}`.
    pub health_checks: IntCounterVec,
    /// `mcp_hangar_health_check_duration_seconds{mcp_server}`.
    pub health_check_duration: HistogramVec,
    /// `mcp_hangar_health_check_consecutive_failures{mcp_server}`.
    pub health_consecutive_failures: IntGaugeVec,
}

fn counter(reg: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| panic_metric(name, &e));
    register(reg, Box::new(c.clone()), name);
    c
}

fn gauge(reg: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g =
        IntGaugeVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| panic_metric(name, &e));
    register(reg, Box::new(g.clone()), name);
    g
}

fn histogram(
    reg: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )
    .unwrap_or_else(|e| panic_metric(name, &e));
    register(reg, Box::new(h.clone()), name);
    h
}

fn register(reg: &Registry, c: Box<dyn prometheus::core::Collector>, name: &str) {
    if let Err(e) = reg.register(c) {
        panic_metric(name, &e)
    }
}

/// Metric definitions are static: a failure here is a programming error caught by the unit
/// tests, never a runtime condition.
fn panic_metric(name: &str, e: &prometheus::Error) -> ! {
    panic!("metric definition {name} is invalid: {e}")
}

impl Metrics {
    /// Create and register every metric.
    pub fn new() -> Self {
        let r = Registry::new();
        let l_srv = &["mcp_server"];
        let m = Metrics {
            tool_calls: counter(
                &r,
                "mcp_hangar_tool_calls_total",
                "Tool calls",
                &["mcp_server", "tool", "status"],
            ),
            tool_call_duration: histogram(
                &r,
                "mcp_hangar_tool_call_duration_seconds",
                "Tool call duration (successful calls)",
                &["mcp_server", "tool"],
                LATENCY_BUCKETS,
            ),
            tool_call_errors: counter(
                &r,
                "mcp_hangar_tool_call_errors_total",
                "Tool call errors",
                &["mcp_server", "tool", "error_type"],
            ),
            tool_access_denied: counter(
                &r,
                "mcp_hangar_tool_access_denied_total",
                "Tool calls refused by a tool access policy",
                &["mcp_server", "reason"],
            ),
            server_info: gauge(
                &r,
                "mcp_hangar_mcp_server_info",
                "Configured MCP servers",
                &["mcp_server", "mode"],
            ),
            server_state: gauge(
                &r,
                "mcp_hangar_mcp_server_state",
                "MCP server state (0 cold, 1 initializing, 2 ready, 3 degraded, 4 dead)",
                l_srv,
            ),
            server_up: gauge(
                &r,
                "mcp_hangar_mcp_server_up",
                "MCP server ready (1) or not (0)",
                l_srv,
            ),
            server_initialized: gauge(
                &r,
                "mcp_hangar_mcp_server_initialized",
                "MCP server has completed the MCP handshake",
                l_srv,
            ),
            server_last_state_change: {
                let g = GaugeVec::new(
                    Opts::new(
                        "mcp_hangar_mcp_server_last_state_change_timestamp_seconds",
                        "Unix time of the last state change",
                    ),
                    l_srv,
                )
                .unwrap_or_else(|e| panic_metric("last_state_change", &e));
                register(&r, Box::new(g.clone()), "last_state_change");
                g
            },
            cold_start_in_progress: gauge(
                &r,
                "mcp_hangar_mcp_server_cold_start_in_progress",
                "A cold start is in progress",
                l_srv,
            ),
            starts: counter(
                &r,
                "mcp_hangar_mcp_server_starts_total",
                "Server starts",
                &["mcp_server", "result"],
            ),
            stops: counter(
                &r,
                "mcp_hangar_mcp_server_stops_total",
                "Server stops",
                &["mcp_server", "reason"],
            ),
            cold_start: histogram(
                &r,
                "mcp_hangar_mcp_server_cold_start_seconds",
                "Cold start duration",
                &["mcp_server", "mode"],
                COLD_START_BUCKETS,
            ),
            connections_active: gauge(
                &r,
                "mcp_hangar_connections_active",
                "Upstream connection is open (1) or not (0)",
                l_srv,
            ),
            messages_sent: counter(
                &r,
                "mcp_hangar_messages_sent_total",
                "JSON-RPC requests sent upstream",
                &["mcp_server", "method"],
            ),
            errors: counter(
                &r,
                "mcp_hangar_errors_total",
                "Errors by component",
                &["component", "error_type"],
            ),
            circuit_breaker_state: gauge(
                &r,
                "mcp_hangar_circuit_breaker_state",
                "Circuit breaker state (1 = in that state)",
                &["mcp_server", "state"],
            ),
            build_info: gauge(
                &r,
                "mcp_hangar_build_info",
                "Build information",
                &["version"],
            ),
            process_start_time: {
                let g = IntGauge::new(
                    "mcp_hangar_process_start_time_seconds",
                    "Process start time",
                )
                .unwrap_or_else(|e| panic_metric("process_start_time", &e));
                register(&r, Box::new(g.clone()), "process_start_time");
                g
            },
            tls_refused: {
                let c = prometheus::IntCounter::new(
                    "hangar_cluster_tls_refused_total",
                    "Connections to the Raft listener refused by mutual TLS",
                )
                .unwrap_or_else(|e| panic_metric("tls_refused", &e));
                register(&r, Box::new(c.clone()), "tls_refused");
                c
            },
            http_tls_handshake_failures: {
                let c = prometheus::IntCounter::new(
                    "hangar_http_tls_handshake_failures_total",
                    "Connections to the HTTPS listener whose TLS handshake failed",
                )
                .unwrap_or_else(|e| panic_metric("http_tls_handshake_failures", &e));
                register(&r, Box::new(c.clone()), "http_tls_handshake_failures");
                c
            },
            front_requests: counter(
                &r,
                "hangar_mcp_requests_total",
                "Front-door JSON-RPC requests by method and outcome",
                &["method", "status"],
            ),
            health_checks: counter(
                &r,
                "mcp_hangar_health_checks_total",
                "Health checks",
                &["mcp_server", "result"],
            ),
            health_check_duration: histogram(
                &r,
                "mcp_hangar_health_check_duration_seconds",
                "Health check duration",
                l_srv,
                &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0],
            ),
            health_consecutive_failures: gauge(
                &r,
                "mcp_hangar_health_check_consecutive_failures",
                "Consecutive failures",
                l_srv,
            ),
            registry: r,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        m.process_start_time.set(unix_now() as i64);
        m
    }

    /// Register further collectors (another room's metrics) with this registry.
    pub fn register_with(&self, f: impl FnOnce(&Registry)) {
        f(&self.registry);
    }

    /// Render the Prometheus text exposition format (0.0.4).
    pub fn render(&self) -> String {
        let mut buf = Vec::with_capacity(16 * 1024);
        let enc = TextEncoder::new();
        if let Err(e) = enc.encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "metrics_encode_failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Forget every series of one server (after it is removed from the configuration).
    pub fn forget_server(&self, id: &str) {
        for g in [
            &self.server_state,
            &self.server_up,
            &self.server_initialized,
            &self.cold_start_in_progress,
            &self.connections_active,
        ] {
            let _ = g.remove_label_values(&[id]);
        }
        let _ = self.server_last_state_change.remove_label_values(&[id]);
        for mode in ["subprocess", "remote", "group"] {
            let _ = self.server_info.remove_label_values(&[id, mode]);
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Seconds since the Unix epoch as a float.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Initialise tracing: JSON lines when `json` (or `MCP_JSON_LOGS=true`), level from `level`
/// (or `MCP_LOG_LEVEL`), always to stderr (stdout may carry JSON-RPC in `--stdio` mode).
pub fn init_logging(level: Option<&str>, json: bool) {
    let env_level = std::env::var("MCP_LOG_LEVEL").ok();
    let level = env_level
        .as_deref()
        .or(level)
        .unwrap_or("info")
        .to_ascii_lowercase();
    let level = match level.as_str() {
        "warning" => "warn".to_owned(),
        "critical" => "error".to_owned(),
        other => other.to_owned(),
    };
    let filter =
        tracing_subscriber::EnvFilter::try_new(format!("{level},hyper=warn,reqwest=warn,h2=warn"))
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = json
        || std::env::var("MCP_JSON_LOGS")
            .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
            .unwrap_or(false);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_mcp_hangar_names() {
        let m = Metrics::new();
        m.tool_calls
            .with_label_values(&["math", "add", "success"])
            .inc();
        m.server_state.with_label_values(&["math"]).set(2);
        let text = m.render();
        assert!(text.contains(
            r#"mcp_hangar_tool_calls_total{mcp_server="math",status="success",tool="add"} 1"#
        ));
        assert!(text.contains(r#"mcp_hangar_mcp_server_state{mcp_server="math"} 2"#));
        assert!(text.contains("mcp_hangar_build_info"));
    }
}
