//! Lowering: a validated server spec becomes what the upstream room connects with (argv and
//! environment of a child process, or endpoint, headers and TLS settings of a remote server,
//! with its credentials rendered into headers).

use super::{RemoteAuth, ServerSpec};
use crate::upstream::{HttpSpec, StdioSpec, TransportSpec};

/// Translate a configured server into the upstream room's transport spec.
pub fn transport_spec(spec: &ServerSpec) -> TransportSpec {
    match spec {
        ServerSpec::Subprocess(s) => TransportSpec::Stdio(StdioSpec {
            argv: s.command.clone(),
            env: s.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            cwd: s.cwd.clone(),
        }),
        ServerSpec::Remote(r) => {
            let mut headers: Vec<(String, String)> = r
                .http
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            match &r.auth {
                RemoteAuth::None => {}
                RemoteAuth::ApiKey { header, key } => {
                    headers.push((header.clone(), key.expose().to_owned()))
                }
                RemoteAuth::Bearer { token } => headers.push((
                    "Authorization".to_owned(),
                    format!("Bearer {}", token.expose()),
                )),
                RemoteAuth::Basic { username, password } => {
                    let raw = format!("{username}:{}", password.expose());
                    headers.push((
                        "Authorization".to_owned(),
                        format!("Basic {}", base64(raw.as_bytes())),
                    ));
                }
            }
            TransportSpec::Http(HttpSpec {
                endpoint: r.endpoint.clone(),
                headers,
                connect_timeout: r.http.connect_timeout,
                read_timeout: r.http.read_timeout,
                verify_tls: r.tls.verify_ssl,
                ca_cert_path: r.tls.ca_cert_path.clone(),
            })
        }
        // Groups have no transport of their own; the runtime never builds instances for them.
        ServerSpec::Group(_) => TransportSpec::Stdio(StdioSpec {
            argv: Vec::new(),
            env: Vec::new(),
            cwd: None,
        }),
    }
}

/// Standard base64 (RFC 4648) for Basic auth headers.
fn base64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::base64;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foob"), "Zm9vYg==");
        assert_eq!(base64(b"user:pa55"), "dXNlcjpwYTU1");
    }
}
