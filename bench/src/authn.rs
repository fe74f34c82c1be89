//! `hangar-bench authn`: the cost of authenticating and authorizing one call — the exact
//! `Auth::authenticate` + `Auth::grants` + permission check the `/mcp` middleware runs — for
//! auth off, an API key (`X-API-Key`) and an ES256 JWT (`Authorization: Bearer`), from C
//! threads at once, in the same run. Each call is timed alone; the figures are per call.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue};
use hangar_node::auth::{Auth, KeyStore};
use hangar_raft::state::ApiKeyRecord;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

use crate::decide::PerCall;

/// What is measured.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// `auth.enabled: false`.
    Off,
    /// A developer's API key.
    ApiKey,
    /// A developer's JWT (ES256, a static public key).
    Jwt,
}

const ISSUER: &str = "https://idp.bench.invalid";
const AUDIENCE: &str = "hangar-bench";

/// One developer key in a store that never changes (version 1).
struct OneKey(ApiKeyRecord);

impl KeyStore for OneKey {
    fn version(&self) -> u64 {
        1
    }

    fn roles_of(&self, principal: &str) -> (BTreeSet<String>, BTreeMap<String, BTreeSet<String>>) {
        let roles = if principal == "bench" || principal == "carol" {
            BTreeSet::from(["developer".to_owned()])
        } else {
            BTreeSet::new()
        };
        (roles, BTreeMap::new())
    }

    fn find(&self, sha256_hex: &str) -> Option<ApiKeyRecord> {
        hangar_node::auth::constant_time_eq(&self.0.sha256_hex, sha256_hex).then(|| self.0.clone())
    }

    fn catch_up(&self) -> futures::future::BoxFuture<'_, bool> {
        Box::pin(async { true })
    }
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The auth room as a node with `mode` runs it, and the headers of one caller.
fn setup(mode: Mode) -> anyhow::Result<(Arc<Auth>, HeaderMap)> {
    let key = format!("mcp_{}", "7e".repeat(32));
    let signer = rcgen::KeyPair::generate()?;
    let pem = signer.public_key_pem().replace('\n', "\n            ");
    let enabled = !matches!(mode, Mode::Off);
    let yaml = format!(
        "mcp_servers: {{}}\nauth:\n  enabled: {enabled}\n  jwt:\n    issuers:\n      - issuer: {ISSUER}\n        audience: {AUDIENCE}\n        algorithms: [ES256]\n        public_keys:\n          - |\n            {pem}\n"
    );
    let cfg = hangar_node::config::load_str(&yaml, &|_| None)
        .map_err(|e| anyhow::anyhow!("bench auth config: {e}"))?;
    let store = OneKey(ApiKeyRecord {
        id: "key_bench".into(),
        principal: "bench".into(),
        name: "bench".into(),
        sha256_hex: hangar_node::config::sha256_hex(key.as_bytes()),
        created_at_ms: 0,
        expires_at_ms: None,
        revoked: false,
        tenant: None,
    });
    let auth = Auth::new(cfg.auth, Arc::new(store));
    let mut headers = HeaderMap::new();
    match mode {
        Mode::Off => {}
        Mode::ApiKey => {
            headers.insert("x-api-key", HeaderValue::from_str(&key)?);
        }
        Mode::Jwt => {
            let t = now_s();
            let claims = json!({"iss": ISSUER, "aud": AUDIENCE, "sub": "carol", "iat": t,
                "exp": t + 3600, "groups": ["devs"]});
            let token = jsonwebtoken::encode(
                &Header::new(Algorithm::ES256),
                &claims,
                &EncodingKey::from_ec_pem(signer.serialize_pem().as_bytes())?,
            )?;
            headers.insert(
                "authorization",
                HeaderValue::from_str(&format!("Bearer {token}"))?,
            );
        }
    }
    Ok((auth, headers))
}

/// Authenticate and authorize one `tools/call` per iteration for `duration` from
/// `concurrency` threads.
pub fn run(mode: Mode, concurrency: usize, duration: Duration) -> anyhow::Result<PerCall> {
    let (auth, headers) = setup(mode)?;
    let label = match mode {
        Mode::Off => "off",
        Mode::ApiKey => "api-key",
        Mode::Jwt => "jwt",
    };
    crate::decide::per_call(label, concurrency, duration, |_| {
        let auth = auth.clone();
        let headers = headers.clone();
        move || {
            let now_ms = now_s() * 1000;
            let p = auth
                .authenticate(&headers, now_ms)
                .map_err(|e| anyhow::anyhow!("the bench caller was refused: {e}"))?;
            let allowed = !auth.enabled() || auth.grants(&p).allows("tool:invoke");
            anyhow::ensure!(allowed, "the bench caller may not call tools");
            Ok(())
        }
    })
}
