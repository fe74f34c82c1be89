//! `server.tls`: HTTPS at the node's HTTP listener (MCP, `/api`, probes, metrics), with
//! optional client certificates, and the PEM files it names. The files are read and checked
//! whenever a configuration file is loaded (start, reload, `hangar validate`), so a missing
//! or unreadable certificate is reported with its path before anything changes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Serialize;

use super::Problem;
use super::reader::{Obj, ProblemSink};

/// The lowest TLS version the listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum TlsMinVersion {
    /// TLS 1.2 and 1.3 (the default).
    #[serde(rename = "1.2")]
    Tls12,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    Tls13,
}

/// `server.tls`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServerTls {
    /// The listener's certificate chain (PEM, leaf first).
    pub cert_file: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// CA certificate(s) that sign acceptable client certificates (PEM).
    pub client_ca_file: Option<PathBuf>,
    /// Refuse, at the handshake, a client without a certificate of `client_ca_file`
    /// (`false`: a certificate is optional, but one from another CA is still refused).
    pub require_client_cert: bool,
    /// Lowest protocol version.
    pub min_version: TlsMinVersion,
    /// CA certificate(s) this node trusts when it calls the other members' HTTPS API (join,
    /// status); default: `client_ca_file`, else `cluster.tls.ca_file`, else the system's roots.
    pub peer_ca_file: Option<PathBuf>,
}

/// Parse `server.tls` (shape only; the files are checked by [`check_files`]).
pub(super) fn parse(o: &Obj<'_>, p: &ProblemSink) -> ServerTls {
    let file = |k: &'static str| {
        o.req_str(k, "a PEM file")
            .map(PathBuf::from)
            .unwrap_or_default()
    };
    let cert_file = file("cert_file");
    let key_file = file("key_file");
    let client_ca_file = o.str("client_ca_file").map(PathBuf::from);
    let require_client_cert = o.bool("require_client_cert", false);
    if require_client_cert && client_ca_file.is_none() {
        p.push(
            &o.at("require_client_cert"),
            "needs `client_ca_file` (the CA whose certificates clients must present)",
        );
    }
    let min_version = match o.str("min_version").as_deref() {
        None | Some("1.2") => TlsMinVersion::Tls12,
        Some("1.3") => TlsMinVersion::Tls13,
        Some(other) => {
            p.push(
                &o.at("min_version"),
                format!("must be \"1.2\" or \"1.3\" (got `{other}`)"),
            );
            TlsMinVersion::Tls12
        }
    };
    let peer_ca_file = o.str("peer_ca_file").map(PathBuf::from);
    o.finish();
    ServerTls {
        cert_file,
        key_file,
        client_ca_file,
        require_client_cert,
        min_version,
        peer_ca_file,
    }
}

fn problem(path: &str, message: String) -> Problem {
    Problem {
        path: path.to_owned(),
        message,
    }
}

fn read(path: &str, file: &Path) -> Result<Vec<u8>, Problem> {
    std::fs::read(file).map_err(|e| problem(path, format!("cannot read {}: {e}", file.display())))
}

/// The certificates of the PEM file at config path `path` (e.g. `server.tls.cert_file`); at
/// least one.
pub fn read_certs(path: &str, file: &Path) -> Result<Vec<CertificateDer<'static>>, Problem> {
    let pem = read(path, file)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            problem(
                path,
                format!("{} is not a PEM certificate file ({e})", file.display()),
            )
        })?;
    if certs.is_empty() {
        return Err(problem(
            path,
            format!("{} holds no PEM certificate", file.display()),
        ));
    }
    Ok(certs)
}

/// The private key of the PEM file at config path `path`.
pub(super) fn read_key(path: &str, file: &Path) -> Result<PrivateKeyDer<'static>, Problem> {
    let pem = read(path, file)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        problem(
            path,
            format!("{} holds no usable PEM private key ({e})", file.display()),
        )
    })
}

/// A trust store of the CA certificates of the PEM file at config path `path`.
pub fn read_roots(path: &str, file: &Path) -> Result<rustls::RootCertStore, Problem> {
    let mut roots = rustls::RootCertStore::empty();
    for c in read_certs(path, file)? {
        roots.add(c).map_err(|e| {
            problem(
                path,
                format!("{}: unusable CA certificate ({e})", file.display()),
            )
        })?;
    }
    Ok(roots)
}

/// This listener's certificate and key (`server.tls.cert_file`, `key_file`) as one signing
/// identity; the key must match the certificate.
pub fn certified_key(
    cert_file: &Path,
    key_file: &Path,
) -> Result<Arc<rustls::sign::CertifiedKey>, Problem> {
    let certs = read_certs("server.tls.cert_file", cert_file)?;
    let key = read_key("server.tls.key_file", key_file)?;
    let provider = rustls::crypto::ring::default_provider();
    rustls::sign::CertifiedKey::from_der(certs, key, &provider)
        .map(Arc::new)
        .map_err(|e| {
            problem(
                "server.tls.key_file",
                format!(
                    "{} does not fit the certificate in {} ({e})",
                    key_file.display(),
                    cert_file.display()
                ),
            )
        })
}

/// Read and check every file `server.tls` names; each problem carries its path.
pub(super) fn check_files(tls: &ServerTls) -> Vec<Problem> {
    let certs = read_certs("server.tls.cert_file", &tls.cert_file);
    let key = read_key("server.tls.key_file", &tls.key_file);
    let mut problems: Vec<Problem> = [certs.err(), key.err()].into_iter().flatten().collect();
    if problems.is_empty()
        && let Err(p) = certified_key(&tls.cert_file, &tls.key_file)
    {
        problems.push(p);
    }
    for (path, file) in [
        ("server.tls.client_ca_file", &tls.client_ca_file),
        ("server.tls.peer_ca_file", &tls.peer_ca_file),
    ] {
        if let Some(f) = file
            && let Err(p) = read_roots(path, f)
        {
            problems.push(p);
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::super::{ConfigError, load_file, load_str};
    use super::*;

    fn problems(r: Result<super::super::Config, ConfigError>) -> Vec<String> {
        match r {
            Ok(_) => Vec::new(),
            Err(e) => e.problems().iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn shape_defaults_and_path_named_problems() {
        let c = load_str(
            "mcp_servers: {}\nserver:\n  tls: {cert_file: c.pem, key_file: k.pem}\n",
            &|_| None,
        )
        .unwrap();
        let t = c.server.tls.unwrap();
        assert_eq!(t.min_version, TlsMinVersion::Tls12);
        assert!(!t.require_client_cert && t.client_ca_file.is_none());
        assert!(
            load_str("mcp_servers: {}\n", &|_| None)
                .unwrap()
                .server
                .tls
                .is_none()
        );
        let p = problems(load_str(
            "mcp_servers: {}\nserver:\n  tls: {require_client_cert: true, min_version: \"1.1\", cert: x}\n",
            &|_| None,
        ));
        let all = p.join("\n");
        for want in [
            "server.tls.cert_file: is required",
            "server.tls.key_file: is required",
            "server.tls.require_client_cert: needs `client_ca_file`",
            "server.tls.min_version: must be \"1.2\" or \"1.3\"",
            "server.tls.cert: unknown key",
        ] {
            assert!(all.contains(want), "{want} not in:\n{all}");
        }
    }

    #[test]
    fn a_file_loads_only_with_usable_files_each_named() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not pem at all\n").unwrap();
        let cfg = dir.path().join("c.yaml");
        std::fs::write(
            &cfg,
            format!(
                "mcp_servers: {{}}\nserver:\n  tls:\n    cert_file: {}\n    key_file: {}\n    client_ca_file: {}\n    min_version: \"1.3\"\n",
                dir.path().join("missing.pem").display(),
                junk.display(),
                junk.display()
            ),
        )
        .unwrap();
        let all = problems(load_file(&cfg)).join("\n");
        assert!(
            all.contains("server.tls.cert_file: cannot read") && all.contains("missing.pem"),
            "{all}"
        );
        assert!(
            all.contains("server.tls.key_file:") && all.contains("no usable PEM private key"),
            "{all}"
        );
        assert!(
            all.contains("server.tls.client_ca_file:") && all.contains("no PEM certificate"),
            "{all}"
        );
        // The same document through the API (another machine's paths): shape only.
        let text = std::fs::read_to_string(&cfg).unwrap();
        let c = load_str(&text, &|_| None).unwrap();
        assert_eq!(c.server.tls.unwrap().min_version, TlsMinVersion::Tls13);
    }
}
