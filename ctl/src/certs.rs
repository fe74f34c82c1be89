//! `hangarctl cluster gen-certs`: a cluster CA and one certificate per node for `cluster.tls`
//! (mutual TLS between the nodes), for tests and small deployments. Larger ones use their own
//! PKI: any CA works, as long as every node certificate carries the cluster's server name
//! (`hangar-node` by default) as a DNS name and allows both server and client authentication.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// What to make.
pub struct GenCerts {
    /// Output directory (created; existing files are not overwritten).
    pub out: PathBuf,
    /// Node ids to make certificates for.
    pub nodes: Vec<u64>,
    /// The name every node certificate carries (`cluster.tls.server_name`).
    pub server_name: String,
    /// Extra subject alternative names (IP addresses or DNS names) for every node.
    pub sans: Vec<String>,
    /// Validity in years from the start of this year.
    pub years: i32,
}

fn this_year() -> i32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    1970 + (secs / 31_556_952) as i32
}

fn write_new(path: &Path, text: &str, secret: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).with_context(|| {
        format!(
            "cannot create {} (an existing file is never overwritten; choose another --out)",
            path.display()
        )
    })?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

fn validity(p: &mut CertificateParams, years: i32) {
    let y = this_year();
    p.not_before = rcgen::date_time_ymd(y, 1, 1);
    p.not_after = rcgen::date_time_ymd(y + years, 1, 1);
}

/// Write `ca.pem`, `ca-key.pem`, and `node-<id>.pem` / `node-<id>-key.pem` per node; returns
/// the files written.
pub fn generate(g: &GenCerts) -> anyhow::Result<Vec<PathBuf>> {
    anyhow::ensure!(
        !g.nodes.is_empty(),
        "no node ids: give --nodes N or --node ID"
    );
    anyhow::ensure!(
        (1..=100).contains(&g.years),
        "--years must be between 1 and 100"
    );
    std::fs::create_dir_all(&g.out)
        .with_context(|| format!("cannot create {}", g.out.display()))?;
    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, "Hangar cluster CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut ca, g.years);
    let ca_cert = ca
        .self_signed(&ca_key)
        .context("signing the CA certificate")?;
    let mut written = Vec::new();
    let ca_pem = g.out.join("ca.pem");
    let ca_key_pem = g.out.join("ca-key.pem");
    write_new(&ca_pem, &ca_cert.pem(), false)?;
    write_new(&ca_key_pem, &ca_key.serialize_pem(), true)?;
    written.extend([ca_pem, ca_key_pem]);
    let issuer = Issuer::new(ca, ca_key);
    for id in &g.nodes {
        let key = KeyPair::generate().context("generating a node key")?;
        let mut p = CertificateParams::new(vec![g.server_name.clone()])
            .with_context(|| format!("server name {:?}", g.server_name))?;
        for san in &g.sans {
            p.subject_alt_names
                .push(match san.parse::<std::net::IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => SanType::DnsName(san.clone().try_into().with_context(|| {
                        format!("--san {san:?} is neither an IP address nor a DNS name")
                    })?),
                });
        }
        p.distinguished_name
            .push(DnType::CommonName, format!("hangar node {id}"));
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        validity(&mut p, g.years);
        let cert = p
            .signed_by(&key, &issuer)
            .with_context(|| format!("signing the certificate of node {id}"))?;
        let cert_path = g.out.join(format!("node-{id}.pem"));
        let key_path = g.out.join(format!("node-{id}-key.pem"));
        write_new(&cert_path, &cert.pem(), false)?;
        write_new(&key_path, &key.serialize_pem(), true)?;
        written.extend([cert_path, key_path]);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_ca_and_node_certificates_and_never_overwrites() {
        let dir = std::env::temp_dir().join(format!("hangar-certs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let g = GenCerts {
            out: dir.clone(),
            nodes: vec![1, 2],
            server_name: "hangar-node".into(),
            sans: vec!["127.0.0.1".into(), "node.example".into()],
            years: 2,
        };
        let files = generate(&g).unwrap();
        assert_eq!(files.len(), 6);
        let ca = std::fs::read_to_string(dir.join("ca.pem")).unwrap();
        assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"));
        let key = std::fs::read_to_string(dir.join("node-2-key.pem")).unwrap();
        assert!(key.contains("PRIVATE KEY"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("node-2-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = generate(&g).unwrap_err().to_string();
        assert!(again.contains("never overwritten"), "{again}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
