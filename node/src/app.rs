//! Node assembly: builds the rooms from a validated configuration, binds the listener,
//! serves until SIGTERM/SIGINT (or stdin EOF in `--stdio` mode) and shuts down in order:
//! stop accepting, let in-flight requests finish within a deadline, stop every child.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiState};
use crate::cluster::{Cluster, ClusterError, PeerHttp, StartError};
use crate::config::{
    BoxFuture, Config, ConfigError, ReloadTarget, Reloader, Requester, TargetError,
};
use crate::gateway::http::{self as front, FrontDoor, HostGuard};
use crate::gateway::tls::{self as front_tls, Https};
use crate::gateway::{Gateway, GatewayConfig};
use crate::runtime::Runtime;
use crate::telemetry::Metrics;

/// What `hangar serve` was asked to do.
pub struct ServeOptions {
    /// The validated configuration.
    pub config: Config,
    /// Where it came from (for reloads and reporting).
    pub config_path: Option<PathBuf>,
    /// Listen address override.
    pub listen: Option<String>,
    /// Serve stdio instead of (or in addition to, with `listen`) HTTP.
    pub stdio: bool,
    /// Ready file to write once listening.
    pub ready_file: Option<PathBuf>,
    /// Cluster settings from flags and environment (override `cluster:` in the file).
    pub cluster: crate::config::ClusterOverrides,
    /// `--unsafe-no-auth`: listen on a non-loopback address without authentication.
    pub unsafe_no_auth: bool,
}

/// A running node.
pub struct Node {
    /// The gateway.
    pub gateway: Arc<Gateway>,
    /// The runtime.
    pub runtime: Arc<Runtime>,
    http: Option<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)>,
    stdio: bool,
    shutdown: CancellationToken,
    /// Configuration reloads.
    pub reloader: Arc<Reloader>,
    /// This node in the Raft cluster.
    pub cluster: Arc<Cluster>,
    /// A temporary data directory to remove at exit (`--stdio` without `--data-dir`).
    temp_data: Option<PathBuf>,
}

/// The node side of configuration reloads: the cluster takes the new servers (validated
/// against the merged desired config and replicated), the runtime reports what runs, the
/// gateway takes the settings that apply without a restart.
struct ReloadWiring {
    runtime: Arc<Runtime>,
    gateway: Arc<Gateway>,
    cluster: Arc<Cluster>,
    auth: Arc<crate::auth::Auth>,
    /// The listener is on loopback (or `--unsafe-no-auth`): a reload may turn auth off.
    auth_may_be_off: bool,
    /// The listener's HTTPS side (`server.tls`), when it serves HTTPS.
    https: Option<Arc<Https>>,
}

impl ReloadTarget for ReloadWiring {
    fn current(&self) -> indexmap::IndexMap<String, crate::config::ServerSpec> {
        self.runtime.specs()
    }

    fn apply<'a>(
        &'a self,
        cfg: &'a Config,
        file_hash: &'a str,
    ) -> BoxFuture<'a, Result<(), TargetError>> {
        Box::pin(async move {
            self.cluster
                .apply_file_config(&cfg.raw_servers, &cfg.rate_limits, file_hash)
                .await
                .map(drop)
                .map_err(TargetError::from)
        })
    }

    fn settings(&self, cfg: &Config) {
        self.gateway.set_config(gateway_config(cfg));
        if cfg.auth.enabled || self.auth_may_be_off {
            self.auth.set_config(cfg.auth.clone());
        } else {
            tracing::error!(
                "config_reload_kept_auth_on: this node listens on a non-loopback address; turning auth off needs a restart with --unsafe-no-auth"
            );
        }
        match (&self.https, &cfg.server.tls) {
            (Some(h), Some(tls)) => h.set_settings(tls),
            (Some(_), None) => tracing::error!(
                "config_reload_kept_https: turning server.tls off needs a restart; the listener keeps serving HTTPS"
            ),
            (None, Some(_)) => tracing::error!(
                "config_reload_https_needs_restart: server.tls was added; the listener serves plain HTTP until the node restarts"
            ),
            (None, None) => {}
        }
    }

    fn publish(&self, event: crate::telemetry::events::DomainEvent) {
        self.runtime.events().emit(event);
    }
}

fn gateway_config(cfg: &Config) -> GatewayConfig {
    GatewayConfig {
        naming: cfg.tool_access.naming,
        request_timeout: cfg.server.request_timeout,
    }
}

/// Why a node could not start; each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A command-line override does not fit the configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The listen address is not `HOST:PORT`.
    #[error("listen address '{0}' is not HOST:PORT (e.g. 127.0.0.1:8000)")]
    ListenAddress(String),
    /// The listener could not be bound.
    #[error("cannot listen on {addr} (is another process using the port?)")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The Raft side (data directory, Raft listener) could not start.
    #[error(transparent)]
    Cluster(#[from] StartError),
    /// The cluster could not be formed or joined.
    #[error("initializing the cluster")]
    Boot(#[from] hangar_raft::RaftError),
    /// The configuration file could not be applied to the replicated state.
    #[error("the configuration file could not be applied to the cluster")]
    Apply(#[from] ClusterError),
    /// A non-loopback listener without authentication, not explicitly allowed.
    #[error(
        "refusing to listen on {0} without authentication: anyone who can reach it could call every tool and change the configuration. Enable `auth: {{enabled: true}}` (with API keys, and a first admin key from `auth.api_key.bootstrap_key: ${{HANGAR_BOOTSTRAP_KEY}}`), listen on 127.0.0.1, or pass --unsafe-no-auth if something in front of Hangar authenticates"
    )]
    Unauthenticated(SocketAddr),
    /// A local file (ready file, socket address) could not be written or read.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NodeError {
    let what = what.into();
    move |source| NodeError::Io { what, source }
}

/// How long in-flight HTTP requests may run after a shutdown signal.
const GRACE: Duration = Duration::from_secs(10);

impl Node {
    /// Build every room, join or form the cluster, bind the listener (if any).
    pub async fn start(opts: ServeOptions) -> Result<Node, NodeError> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut cfg = opts.config;
        cfg.cluster.override_with(&opts.cluster)?;
        // A desktop client starts `--stdio` from wherever it likes (often `/`): without an
        // explicit data directory such a node keeps its Raft data in a private temporary
        // directory, removed at exit (the config file stays the source of truth).
        let mut temp_data = None;
        if opts.stdio
            && opts.cluster.data_dir.is_none()
            && cfg.cluster.data_dir == crate::config::ClusterConfig::default().data_dir
        {
            let dir = std::env::temp_dir().join(format!("hangar-stdio-{}", std::process::id()));
            cfg.cluster.data_dir = dir.clone();
            temp_data = Some(dir);
        }
        let node_name = cfg.cluster.node_id.to_string();
        let shutdown = CancellationToken::new();
        // Bind first: the API address is part of this node's identity in the cluster.
        let listen = match (&opts.listen, opts.stdio) {
            (Some(l), _) => Some(l.clone()),
            (None, false) => Some(cfg.server.listen.clone()),
            (None, true) => None,
        };
        let listener = match listen {
            Some(listen) => {
                let addr: SocketAddr = listen
                    .parse()
                    .map_err(|_| NodeError::ListenAddress(listen.clone()))?;
                if !addr.ip().is_loopback() && !cfg.auth.enabled && !opts.unsafe_no_auth {
                    return Err(NodeError::Unauthenticated(addr));
                }
                Some(
                    TcpListener::bind(addr)
                        .await
                        .map_err(|source| NodeError::Bind { addr, source })?,
                )
            }
            None => None,
        };
        let api_addr = match &listener {
            Some(l) => l
                .local_addr()
                .map_err(io("reading the listener's address"))?,
            None => SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        // HTTPS material before anything else starts: a bad file refuses start-up.
        let tls_problem = |p| NodeError::Config(ConfigError::Invalid { problems: vec![p] });
        let https = match (&listener, &cfg.server.tls) {
            (Some(_), Some(tls)) => Some(Https::load(tls).map_err(tls_problem)?),
            _ => None,
        };
        let peer = PeerHttp {
            https: https.is_some(),
            tls: front_tls::peer_client_config(&cfg, https.as_ref().map(|h| h.identity()))
                .map_err(tls_problem)?,
        };
        let cluster = Cluster::start(cfg.cluster.clone(), api_addr, peer, shutdown.clone()).await?;
        cluster.set_peer_key(cfg.auth.api_key.bootstrap_key.clone());
        cluster.boot().await?;
        let metrics = Arc::new(Metrics::new());
        let events = Arc::new(crate::telemetry::events::EventLog::new(&node_name, 10_000));
        // The replicated log is this node's event log before anything is served: a request
        // arriving during start-up must not read the (empty) node-local ring instead.
        events.attach(cluster.clone());
        // Servers come from the replicated state (the applier), never straight from the file.
        let mut boot_cfg = cfg.clone();
        boot_cfg.mcp_servers.clear();
        let runtime = Runtime::new(&boot_cfg, metrics, events, node_name.clone());
        let gateway = Gateway::new(runtime.clone(), gateway_config(&cfg));
        let limits = cluster.rate_limits().clone();
        runtime
            .metrics()
            .register_with(|r| limits.metrics().register(r));
        gateway.set_rate_limits(limits.clone());
        gateway.set_policy_source(cluster.clone());
        let auth = crate::auth::Auth::new(cfg.auth.clone(), cluster.clone());
        let members_of = runtime.clone();
        auth.set_membership(Arc::new(move |id| crate::auth::groups_of(&members_of, id)));
        let reloader = Arc::new(Reloader::new(
            opts.config_path.clone(),
            Arc::new(ReloadWiring {
                runtime: runtime.clone(),
                gateway: gateway.clone(),
                cluster: cluster.clone(),
                auth: auth.clone(),
                auth_may_be_off: api_addr.ip().is_loopback() || opts.unsafe_no_auth,
                https: https.clone(),
            }),
        ));
        gateway.set_reloader(reloader.clone());
        let mut http = None;
        if let Some(listener) = listener {
            let bound = listener
                .local_addr()
                .map_err(io("reading the listener's address"))?;
            if !bound.ip().is_loopback() && !cfg.auth.enabled {
                tracing::warn!(addr = %bound, "listening on a non-loopback address without authentication (--unsafe-no-auth)");
            }
            let guard = Arc::new(HostGuard::new(
                bound,
                &cfg.server.allowed_hosts,
                &cfg.server.allowed_origins,
            ));
            let http_limits = front::limits::Limits::of(&cfg.server);
            let app = Router::new()
                .merge(front::routes(FrontDoor {
                    gateway: gateway.clone(),
                    max_body: cfg.server.max_body_bytes,
                }))
                .merge(api::routes(ApiState {
                    gateway: gateway.clone(),
                    reloader: Some(reloader.clone()),
                    cluster: cluster.clone(),
                    auth: auth.clone(),
                }))
                // Bodies are read (and limited) only once the caller authenticated.
                .layer(axum::middleware::from_fn_with_state(
                    http_limits,
                    front::limits::bodies,
                ))
                .layer(axum::extract::DefaultBodyLimit::max(
                    cfg.server.max_body_bytes,
                ))
                .layer(axum::Extension(api::bootstrap::Listener(bound)))
                .layer(axum::middleware::from_fn_with_state(
                    limits,
                    crate::ratelimit::middleware,
                ))
                .layer(axum::middleware::from_fn_with_state(
                    auth.clone(),
                    crate::auth::middleware,
                ))
                .layer(axum::middleware::from_fn_with_state(guard, front::guard))
                .layer(axum::middleware::from_fn_with_state(
                    http_limits,
                    front::limits::headers,
                ));
            let token = shutdown.clone();
            let task = match &https {
                Some(h) => {
                    let failures = runtime.metrics().http_tls_handshake_failures.clone();
                    let listener = front_tls::listen(listener, h.clone(), failures)
                        .map_err(io("reading the listener's address"))?;
                    h.clone().watch(shutdown.clone());
                    tokio::spawn(async move {
                        // `tap_io` only to have `ConnectInfo<SocketAddr>` (axum implements it
                        // for tapped listeners of any address type).
                        axum::serve(
                            listener.tap_io(|_| {}),
                            app.into_make_service_with_connect_info::<SocketAddr>(),
                        )
                        .with_graceful_shutdown(async move { token.cancelled().await })
                        .await
                    })
                }
                None => tokio::spawn(async move {
                    // Answers are small and written whole: no Nagle delay on them.
                    let listener = listener.tap_io(|tcp| {
                        let _ = tcp.set_nodelay(true);
                    });
                    axum::serve(
                        listener,
                        app.into_make_service_with_connect_info::<SocketAddr>(),
                    )
                    .with_graceful_shutdown(async move { token.cancelled().await })
                    .await
                }),
            };
            let scheme = if https.is_some() { "https" } else { "http" };
            tracing::info!(addr = %bound, scheme, node_id = %node_name, "http_server_started");
            http = Some((bound, task));
        }
        let file = opts.config_path.as_ref().and(
            cfg.file_hash
                .clone()
                .map(|h| (cfg.raw_servers.clone(), cfg.rate_limits.clone(), h)),
        );
        cluster.run(runtime.clone(), file).await?;
        if let Some(key) = &cfg.auth.api_key.bootstrap_key {
            cluster.ensure_bootstrap_key(key).await?;
        }
        if cfg.config_reload.enabled {
            let period = if cfg.config_reload.use_watchdog {
                Duration::from_secs(1)
            } else {
                Duration::from_secs(cfg.config_reload.interval_s)
            };
            reloader.clone().watch(period, shutdown.clone());
        }
        crate::supervisor::spawn(runtime.clone(), shutdown.clone());
        if let (Some(path), Some((bound, _))) = (&opts.ready_file, &http) {
            write_ready_file(path, *bound, https.is_some(), cluster.raft().local_addr())?;
        }
        // auto_start: servers that ask for it, and members of groups that do, among those
        // this node hosts (the others start where the leader places them).
        for inst in runtime.instances() {
            if inst.host() == crate::runtime::Host::Here && runtime.wants_auto_start(&inst) {
                tokio::spawn(async move {
                    if let Err(e) = inst.ensure_ready().await {
                        tracing::warn!(error = %e, "auto_start_failed");
                    }
                });
            }
        }
        Ok(Node {
            gateway,
            runtime,
            http,
            stdio: opts.stdio,
            shutdown,
            reloader,
            cluster,
            temp_data,
        })
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(|(a, _)| *a)
    }

    /// Serve until a shutdown signal (or stdin EOF in stdio mode), then shut down in order.
    /// Returns why the node had to stop on its own, if it did: its Raft core failed (e.g. the
    /// data directory's disk is full). A node whose Raft core stopped cannot take part in the
    /// cluster any more; it stops (fail-stop) so that a supervisor restarts it on its data once
    /// the cause is gone, instead of lingering unready forever.
    pub async fn run_until_shutdown(self: Arc<Self>) -> Option<String> {
        let stdio_done = async {
            if self.stdio {
                if let Err(e) = crate::gateway::stdio::serve(self.gateway.clone()).await {
                    tracing::warn!(error = %e, "stdio_front_door_failed");
                }
                tracing::info!("stdin_closed");
            } else {
                std::future::pending::<()>().await;
            }
        };
        let raft = self.cluster.raft().clone();
        let mut failed = None;
        tokio::select! {
            sig = signals(self.reloader.clone()) => tracing::info!(signal = sig, "shutdown_requested"),
            _ = stdio_done => {},
            reason = raft.fatal() => {
                tracing::error!(error = %reason, "raft_core_failed: this node stops (restart it once the cause, e.g. a full disk, is gone)");
                failed = Some(reason);
            }
        }
        self.shutdown.cancel();
        let grace_end = tokio::time::Instant::now() + GRACE;
        if let Some((_, task)) = &self.http {
            // Wait for in-flight requests within the grace period.
            let waited = tokio::time::timeout_at(grace_end, async {
                while !task.is_finished() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await;
            if waited.is_err() {
                tracing::warn!("in-flight requests did not finish within the grace period");
            }
        }
        // Calls forwarded here by other nodes: new ones are refused unsent (they go to another
        // member, or wait for the server's next placement), those running finish within what is
        // left of the grace period before the instances stop.
        self.cluster.stop_calls();
        let left = grace_end.saturating_duration_since(tokio::time::Instant::now());
        self.runtime.drain_all(left).await;
        self.runtime.shutdown_all().await;
        self.cluster.shutdown().await;
        if let Some(dir) = &self.temp_data {
            let _ = std::fs::remove_dir_all(dir);
        }
        tracing::info!("server_lifecycle_shutdown_complete");
        failed
    }
}

fn write_ready_file(
    path: &std::path::Path,
    addr: SocketAddr,
    https: bool,
    raft_addr: SocketAddr,
) -> Result<(), NodeError> {
    let scheme = if https { "https" } else { "http" };
    let body = serde_json::json!({ "http_addr": addr.to_string(), "https": https,
        "url": format!("{scheme}://{addr}"), "raft_addr": raft_addr.to_string(),
        "pid": std::process::id() });
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, body.to_string()).map_err(io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io(format!("writing {}", path.display())))?;
    Ok(())
}

/// Resolves with the name of the first termination signal. SIGHUP reloads the configuration.
async fn signals(reloader: Arc<Reloader>) -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the node with SIGKILL");
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            _ = term.recv() => return "SIGTERM",
            _ = int.recv() => return "SIGINT",
            _ = hup.recv() => {
                tracing::info!("reload_signal_received");
                let r = reloader.clone();
                tokio::spawn(async move { let _ = r.reload(Requester::Sighup).await; });
            }
        }
    }
}
