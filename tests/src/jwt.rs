//! A JWT issuer for tests: P-256 keys, ES256 tokens with good default claims, and a JWKS
//! endpoint served on 127.0.0.1 (plain HTTP, which Hangar allows on loopback), with an OIDC
//! discovery document (`/.well-known/openid-configuration`) naming it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The issuer (`iss`) of the tokens [`token`] signs.
pub const ISS: &str = "https://idp.hangar.test/realms/e2e";
/// Their audience (`aud`).
pub const AUD: &str = "hangar-e2e";

/// A P-256 key: its signing half and its public JWK.
pub struct Key {
    /// Its key id.
    pub kid: &'static str,
    /// The signing half.
    pub enc: EncodingKey,
    /// The public JWK.
    pub jwk: Value,
}

/// A new P-256 key under `kid`.
pub fn key(kid: &'static str) -> Key {
    let kp = rcgen::KeyPair::generate().unwrap();
    // The uncompressed point: 0x04 || x || y.
    let raw = kp.public_key_raw();
    let b64 = |b: &[u8]| URL_SAFE_NO_PAD.encode(b);
    Key {
        kid,
        enc: EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap(),
        jwk: json!({"kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
            "x": b64(&raw[1..33]), "y": b64(&raw[33..65])}),
    }
}

/// Unix time, seconds.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An ES256 token signed by `signer` under `kid`, with `claims` over good defaults
/// (`null` removes one).
pub fn token(signer: &Key, kid: &str, claims: Value) -> String {
    let t = now();
    let mut c = json!({"iss": ISS, "aud": AUD, "sub": "alice", "iat": t, "exp": t + 300,
        "tenant": "acme", "groups": ["devs"]});
    for (k, v) in claims.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&h, &c, &signer.enc).unwrap()
}

/// The issuer's JWKS endpoint: `GET /jwks.json` answers whatever `doc` holds (and `GET
/// /.well-known/openid-configuration` the discovery document naming it). Its URL.
pub async fn issuer(doc: Arc<Mutex<String>>) -> String {
    let base = serve(doc, Arc::new(AtomicBool::new(true))).await;
    format!("{base}/jwks.json")
}

/// An issuer found by OIDC discovery: its URL (`http://127.0.0.1:PORT`, the `iss` its tokens
/// must carry), where `GET /.well-known/openid-configuration` answers `{issuer, jwks_uri:
/// <issuer>/jwks.json}` — 503 while `discoverable` is false — and `GET /jwks.json` whatever
/// `doc` holds.
pub async fn oidc_issuer(doc: Arc<Mutex<String>>, discoverable: Arc<AtomicBool>) -> String {
    serve(doc, discoverable).await
}

/// Serve the JWKS and discovery documents on 127.0.0.1; the base URL.
async fn serve(doc: Arc<Mutex<String>>, discoverable: Arc<AtomicBool>) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", l.local_addr().unwrap());
    let discovery = json!({"issuer": base, "jwks_uri": format!("{base}/jwks.json"),
        "id_token_signing_alg_values_supported": ["ES256"]})
    .to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let (doc, discoverable, discovery) =
                (doc.clone(), discoverable.clone(), discovery.clone());
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 2048];
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let (status, body) = if got.starts_with(b"GET /jwks.json ") {
                    ("200 OK", doc.lock().unwrap().clone())
                } else if got.starts_with(b"GET /.well-known/openid-configuration ") {
                    if discoverable.load(Ordering::SeqCst) {
                        ("200 OK", discovery)
                    } else {
                        ("503 Service Unavailable", String::new())
                    }
                } else {
                    ("404 Not Found", String::new())
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    base
}
