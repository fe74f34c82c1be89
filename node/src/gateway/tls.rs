//! HTTPS at the front door (`server.tls`): everything the node's HTTP listener serves — MCP,
//! `/api`, probes, metrics — over TLS 1.2+ (rustls with the ring provider, ALPN `h2` and
//! `http/1.1`), with optional client certificates of a configured CA.
//!
//! * **Accepting**: [`listen`] runs its own accept loop; handshakes run concurrently (a slow
//!   or silent client holds up nobody), each within [`HANDSHAKE_TIMEOUT`]. A failed handshake
//!   (plain HTTP on the HTTPS port, an untrusted or missing client certificate, a client that
//!   distrusts ours) is logged and counted in `hangar_http_tls_handshake_failures_total`. The
//!   connections that complete it are served by axum like plain ones (with
//!   `ConnectInfo<SocketAddr>`, graceful shutdown).
//! * **Rotation**: the certificate, key and client CA files are re-read every
//!   [`WATCH_PERIOD`] (and on a configuration reload); when their content changed, new
//!   connections get the new material at once. A pair that does not load (unreadable, not
//!   PEM, key not matching the certificate) changes nothing: the error names the file and
//!   the previous certificate keeps serving.
//! * **Peers**: [`peer_client_config`] is the TLS side of this node's calls to the other
//!   members' API (join, status): it trusts `server.tls.peer_ca_file`, else
//!   `server.tls.client_ca_file`, else `cluster.tls.ca_file` (else the system's roots), and
//!   presents this node's certificate when a member asks for one.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Problem, ServerTls, TlsMinVersion};

/// How long a client may take to complete a handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the certificate files are checked for a change.
pub const WATCH_PERIOD: Duration = Duration::from_secs(2);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The current certificate and key: served to clients, and presented to members that ask
/// this node for a client certificate. Swapped whole on rotation.
pub struct CertSlot(ArcSwap<CertifiedKey>);

impl std::fmt::Debug for CertSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("CertSlot").finish_non_exhaustive()
    }
}

impl rustls::server::ResolvesServerCert for CertSlot {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

impl rustls::client::ResolvesClientCert for CertSlot {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// What the loaded material was made of (to notice a change).
#[derive(PartialEq, Eq)]
struct Loaded {
    tls: ServerTls,
    files: Vec<Option<Vec<u8>>>,
}

fn contents(tls: &ServerTls) -> Vec<Option<Vec<u8>>> {
    [
        Some(&tls.cert_file),
        Some(&tls.key_file),
        tls.client_ca_file.as_ref(),
    ]
    .into_iter()
    .map(|f| f.and_then(|f| std::fs::read(f).ok()))
    .collect()
}

/// The HTTPS side of the listener: its settings and the material in use.
pub struct Https {
    slot: Arc<CertSlot>,
    config: ArcSwap<rustls::ServerConfig>,
    /// The settings and file contents of the material in use, or of the last attempt to
    /// load a change (a failed attempt is not retried until something changes again).
    loaded: Mutex<Loaded>,
}

impl std::fmt::Debug for Https {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Https").finish_non_exhaustive()
    }
}

fn server_config(
    tls: &ServerTls,
    slot: Arc<CertSlot>,
) -> Result<Arc<rustls::ServerConfig>, Problem> {
    let versions: &[&rustls::SupportedProtocolVersion] = match tls.min_version {
        TlsMinVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsMinVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| Problem {
            path: "server.tls.min_version".into(),
            message: e.to_string(),
        })?;
    let builder = match &tls.client_ca_file {
        Some(file) => {
            let roots = crate::config::read_roots("server.tls.client_ca_file", file)?;
            let mut verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            );
            if !tls.require_client_cert {
                verifier = verifier.allow_unauthenticated();
            }
            let verifier = verifier.build().map_err(|e| Problem {
                path: "server.tls.client_ca_file".into(),
                message: format!("{}: {e}", file.display()),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_cert_resolver(slot);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

impl Https {
    /// Load the material `tls` names; a problem names the key and the file.
    pub fn load(tls: &ServerTls) -> Result<Arc<Https>, Problem> {
        let files = contents(tls);
        let key = crate::config::certified_key(&tls.cert_file, &tls.key_file)?;
        let slot = Arc::new(CertSlot(ArcSwap::new(key)));
        let config = server_config(tls, slot.clone())?;
        Ok(Arc::new(Https {
            slot,
            config: ArcSwap::new(config),
            loaded: Mutex::new(Loaded {
                tls: tls.clone(),
                files,
            }),
        }))
    }

    /// This node's certificate and key, as a client identity for calls to the other members.
    pub fn identity(&self) -> Arc<CertSlot> {
        self.slot.clone()
    }

    /// Take new settings (a configuration reload); the material is reloaded when they or
    /// the files changed.
    pub fn set_settings(&self, tls: &ServerTls) {
        self.refresh(Some(tls));
    }

    /// Reload the material if the settings (`Some`) or the files' content changed. A change
    /// that does not load is logged with the file it comes from and changes nothing.
    fn refresh(&self, new: Option<&ServerTls>) {
        let mut loaded = self.loaded.lock();
        let tls = new.cloned().unwrap_or_else(|| loaded.tls.clone());
        let files = contents(&tls);
        let now = Loaded { tls, files };
        if *loaded == now {
            return;
        }
        let tls = &now.tls;
        let result = crate::config::certified_key(&tls.cert_file, &tls.key_file).and_then(|key| {
            // The new config resolves through the shared slot, swapped once everything loaded.
            let config = server_config(tls, self.slot.clone())?;
            Ok((key, config))
        });
        match result {
            Ok((key, config)) => {
                self.slot.0.store(key);
                self.config.store(config);
                tracing::info!(cert_file = %tls.cert_file.display(), "http_tls_certificate_reloaded");
            }
            Err(p) => tracing::error!(
                problem = %p,
                "http_tls_reload_failed (the previous certificate keeps serving; fix the file)"
            ),
        }
        *loaded = now;
    }

    /// Check the files every [`WATCH_PERIOD`] until `shutdown`.
    pub fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(WATCH_PERIOD);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let me = self.clone();
                // File reads off the async workers.
                let _ = tokio::task::spawn_blocking(move || me.refresh(None)).await;
            }
        });
    }
}

/// TLS connections that completed their handshake, for `axum::serve`.
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            // The accept loop only ends once this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Accept TCP connections on `tcp` and hand those that complete a TLS handshake to the
/// returned listener. Failed handshakes are logged and counted in `failures`. The TCP
/// listener closes when the returned listener is dropped (at shutdown).
pub fn listen(
    tcp: TcpListener,
    https: Arc<Https>,
    failures: prometheus::IntCounter,
) -> std::io::Result<TlsListener> {
    let local = tcp.local_addr()?;
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                _ = tx.closed() => return,
                r = tcp.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "http_accept_failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // Answers are small and written whole: no Nagle delay on them.
            let _ = stream.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(https.config.load_full());
            let tx = tx.clone();
            let failures = failures.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send((tls, peer)).await;
                    }
                    Ok(Err(e)) => {
                        failures.inc();
                        tracing::info!(peer = %peer, error = %e, "http_tls_handshake_failed");
                    }
                    Err(_) => {
                        failures.inc();
                        tracing::info!(peer = %peer, "http_tls_handshake_failed (timed out)");
                    }
                }
            });
        }
    });
    Ok(TlsListener { rx, local })
}

/// The CA file this node trusts for the other members' HTTPS API, with its config path:
/// `server.tls.peer_ca_file`, else `server.tls.client_ca_file`, else `cluster.tls.ca_file`.
pub fn peer_ca(cfg: &Config) -> Option<(&'static str, PathBuf)> {
    let tls = cfg.server.tls.as_ref();
    if let Some(f) = tls.and_then(|t| t.peer_ca_file.clone()) {
        return Some(("server.tls.peer_ca_file", f));
    }
    if let Some(f) = tls.and_then(|t| t.client_ca_file.clone()) {
        return Some(("server.tls.client_ca_file", f));
    }
    cfg.cluster
        .tls
        .as_ref()
        .map(|t| ("cluster.tls.ca_file", t.ca_file.clone()))
}

/// The TLS side of this node's calls to the other members' API (see the module doc);
/// `None`: no CA configured, reqwest's default (the system's roots) applies.
pub fn peer_client_config(
    cfg: &Config,
    identity: Option<Arc<CertSlot>>,
) -> Result<Option<rustls::ClientConfig>, Problem> {
    let Some((path, file)) = peer_ca(cfg) else {
        return Ok(None);
    };
    let roots = crate::config::read_roots(path, &file)?;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Problem {
            path: path.into(),
            message: e.to_string(),
        })?
        .with_root_certificates(roots);
    let mut c = match identity {
        Some(id) => builder.with_client_cert_resolver(id),
        None => builder.with_no_client_auth(),
    };
    c.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(c))
}
