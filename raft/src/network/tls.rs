//! Mutual TLS between the nodes (`cluster.tls`): every gRPC connection of the Raft listener —
//! Raft itself, call forwarding, placement leases, quotas — is TLS with a client certificate,
//! both sides signed by the cluster's CA. A process without such a certificate cannot vote,
//! replicate, join or forward: its handshake is refused, logged and counted
//! ([`crate::RaftHandle::tls_refusals`]).
//!
//! Node certificates are checked against the CA and a shared server name (`hangar-node` by
//! default, a DNS SAN of every node certificate), not against the addresses: nodes move, the
//! CA says who is a member.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// How long a peer may take to complete a handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The PEM material of this node.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerTls {
    /// The cluster CA's certificate(s).
    pub ca_pem: Vec<u8>,
    /// This node's certificate chain.
    pub cert_pem: Vec<u8>,
    /// Its private key.
    pub key_pem: Vec<u8>,
    /// The name every node certificate carries (a DNS SAN) and clients check.
    pub server_name: String,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("PeerTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl PeerTls {
    fn certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
        let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{what}: not PEM certificates ({e})"))?;
        if certs.is_empty() {
            return Err(format!("{what}: no certificate in the file"));
        }
        Ok(certs)
    }

    /// Check the material and build the server side (client certificates required).
    pub(crate) fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, String> {
        let mut roots = rustls::RootCertStore::empty();
        for c in Self::certs(&self.ca_pem, "cluster.tls.ca_file")? {
            roots
                .add(c)
                .map_err(|e| format!("cluster.tls.ca_file: unusable CA certificate ({e})"))?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .map_err(|e| format!("cluster.tls.ca_file: {e}"))?;
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem)
            .map_err(|e| format!("cluster.tls.key_file: not a PEM private key ({e})"))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_client_cert_verifier(verifier)
            .with_single_cert(Self::certs(&self.cert_pem, "cluster.tls.cert_file")?, key)
            .map_err(|e| format!("cluster.tls.cert_file/key_file: {e}"))?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }

    /// The client side, for tonic channels to the other nodes.
    pub(crate) fn client_config(&self) -> tonic::transport::ClientTlsConfig {
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem))
            .identity(tonic::transport::Identity::from_pem(
                &self.cert_pem,
                &self.key_pem,
            ))
            .domain_name(self.server_name.clone())
    }
}

/// Accept TCP connections on `listener` and hand over those that complete a mutual-TLS
/// handshake; refusals are logged and counted in `refused`. Handshakes run concurrently (a
/// slow peer does not hold up the others). Ends when the receiver is dropped.
pub(crate) fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    refused: Arc<AtomicU64>,
) -> (
    mpsc::Receiver<Result<TlsStream<TcpStream>, std::io::Error>>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    let task = tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "raft_accept_failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let refused = refused.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(peer = %peer, error = %e,
                            "raft_tls_refused (a peer without a valid node certificate of this cluster's CA: it cannot vote, replicate, join or forward)");
                    }
                    Err(_) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(peer = %peer, "raft_tls_refused (handshake timed out)");
                    }
                }
            });
        }
    });
    (rx, task)
}
