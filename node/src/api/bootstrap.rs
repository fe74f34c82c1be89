//! The first admin credential: `POST /api/auth/bootstrap-admin`, behind
//! `hangar auth bootstrap-admin`.
//!
//! A node started with `auth.enabled` and no key has no one who may create keys. This route
//! creates the first admin API key, once, for a caller on the node's own host:
//!
//! * it needs no credential (none exists yet), so it is accepted only from a **loopback**
//!   source address (or the node's own listen address, when the listener is bound to one
//!   address), and never when the request carries proxy headers (`Forwarded`,
//!   `X-Forwarded-For`, `X-Real-IP`: behind a proxy on the same host every caller would look
//!   local);
//! * only while **no key of an admin principal** exists in the replicated state — revoked
//!   ones and the bootstrap key of `auth.api_key.bootstrap_key` included — so on a cluster it
//!   works once for the whole cluster, whichever node is asked;
//! * the key has a fixed id ([`KEY_ID`]): two concurrent claims race in Raft and one gets
//!   `KeyExists` (409). Key records are never deleted (a revoked key stays, marked revoked),
//!   so once used the route is refused for good;
//! * only with authentication on and API keys accepted (MCP Hangar refuses to bootstrap with
//!   auth disabled too).
//!
//! The raw key is in the answer only; the state keeps its SHA-256 like every key.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use hangar_raft::Command;
use hangar_raft::state::ApiKeyRecord;
use serde::Deserialize;
use serde_json::{Value, json};

use super::ApiState;
use super::error::{ApiError, ApiResult};
use crate::auth::{AuthSettings, KeyStore};
use crate::cluster::{ClusterError, RejectCode};
use crate::telemetry::events::DomainEvent;

/// The route.
pub const PATH: &str = crate::auth::BOOTSTRAP_ADMIN_PATH;
/// The id of the key this route creates (fixed: at most one ever).
pub const KEY_ID: &str = "key_bootstrap_admin";
/// The principal of the key unless the caller names one.
pub const DEFAULT_PRINCIPAL: &str = "admin";
/// The key's name unless the caller names one.
pub const DEFAULT_NAME: &str = "bootstrap-admin";

/// The address the node's HTTP listener is bound to (an extension set by the node).
#[derive(Debug, Clone, Copy)]
pub struct Listener(pub SocketAddr);

/// Headers a proxy adds: with one of them, the TCP source is the proxy, not the caller.
const PROXY_HEADERS: &[&str] = &["forwarded", "x-forwarded-for", "x-real-ip"];

fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// Whether a request from `source` with `headers`, to a listener bound to `listener`, comes
/// from the node's own host; `Err` says why not.
pub fn local_caller(
    source: Option<SocketAddr>,
    listener: Option<SocketAddr>,
    headers: &HeaderMap,
) -> Result<(), String> {
    let Some(source) = source else {
        return Err("the caller's address is unknown".into());
    };
    let ip = unmapped(source.ip());
    let own = listener
        .map(|l| unmapped(l.ip()))
        .is_some_and(|l| !l.is_unspecified() && l == ip);
    if !ip.is_loopback() && !own {
        return Err(format!(
            "the first admin key is handed out only to a caller on the node's own host (a loopback address); this request came from {ip}. Run `hangar auth bootstrap-admin` on the node's host"
        ));
    }
    if let Some(h) = PROXY_HEADERS.iter().find(|h| headers.contains_key(**h)) {
        return Err(format!(
            "the request carries `{h}`: it came through a proxy, so its local source address says nothing about the caller. Run `hangar auth bootstrap-admin` on the node's host against the node's own address, not through a proxy"
        ));
    }
    Ok(())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Body {
    #[serde(default)]
    principal_id: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

fn refused(status: StatusCode, message: impl Into<String>, details: Value) -> ApiError {
    ApiError::new(status, "BootstrapRefused", message, details)
}

/// Keys (by id) whose principal holds the global `admin` role, and the key of a previous
/// bootstrap.
fn admin_keys(st: &ApiState) -> Vec<String> {
    st.cluster.raft().read(|s| {
        s.keys
            .values()
            .filter(|k| {
                k.id == KEY_ID
                    || s.role_assignments
                        .get(&k.principal)
                        .is_some_and(|r| r.contains("admin"))
            })
            .map(|k| k.id.clone())
            .collect()
    })
}

fn already(ids: &[String]) -> ApiError {
    refused(
        StatusCode::CONFLICT,
        format!(
            "an admin API key already exists ({}): bootstrap-admin works once, while the cluster has no admin key. Create further keys with an admin key (`hangarctl keys create`)",
            ids.join(", ")
        ),
        json!({"admin_keys": ids}),
    )
}

/// `POST /api/auth/bootstrap-admin` `{"principal_id"?, "name"?}`.
pub(super) async fn bootstrap_admin(State(st): State<ApiState>, req: Request) -> ApiResult {
    let source = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let listener = req.extensions().get::<Listener>().map(|l| l.0);
    let settings = req.extensions().get::<AuthSettings>().copied();
    if let Err(why) = local_caller(source, listener, req.headers()) {
        tracing::warn!(source = ?source, reason = %why, "bootstrap_admin_refused");
        return Err(refused(StatusCode::FORBIDDEN, why, Value::Null));
    }
    let settings = settings.unwrap_or_default();
    if !settings.enabled {
        return Err(refused(
            StatusCode::CONFLICT,
            "authentication is off on this node (auth.enabled is false): every caller may already do everything. Turn on `auth: {enabled: true}` and run bootstrap-admin again",
            Value::Null,
        ));
    }
    if !settings.api_keys {
        return Err(refused(
            StatusCode::CONFLICT,
            "API keys are not accepted on this node (auth.api_key.enabled is false): an admin key would not work",
            Value::Null,
        ));
    }
    let bytes = axum::body::to_bytes(req.into_body(), 64 * 1024)
        .await
        .map_err(|e| ApiError::bad_request(format!("cannot read the body: {e}")))?;
    let body: Body = if bytes.iter().all(u8::is_ascii_whitespace) {
        Body::default()
    } else {
        serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::validation(
                format!(
                    "body must be {{\"principal_id\": \"…\", \"name\": \"…\"}} (both optional): {e}"
                ),
                Value::Null,
            )
        })?
    };
    let principal = body
        .principal_id
        .unwrap_or_else(|| DEFAULT_PRINCIPAL.to_owned());
    let name = body.name.unwrap_or_else(|| DEFAULT_NAME.to_owned());
    if principal.trim().is_empty()
        || principal.starts_with("group:")
        || principal.chars().any(char::is_control)
        || name.trim().is_empty()
    {
        return Err(ApiError::validation(
            "principal_id and name must be non-empty text (a principal, not `group:…`)",
            json!({"field": "principal_id"}),
        ));
    }
    // Decide on everything the cluster acknowledged, not on this node's possibly late copy.
    if !KeyStore::catch_up(&*st.cluster).await {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ClusterUnavailable",
            "the cluster has no leader now; try again once it has one (hangarctl cluster status)",
            Value::Null,
        ));
    }
    let existing = admin_keys(&st);
    if !existing.is_empty() {
        return Err(already(&existing));
    }
    let secret: [u8; 32] = rand::random();
    let raw_key = format!("mcp_{}", hex::encode(secret));
    let record = ApiKeyRecord {
        id: KEY_ID.to_owned(),
        principal: principal.clone(),
        name: name.clone(),
        sha256_hex: crate::config::sha256_hex(raw_key.as_bytes()),
        created_at_ms: 0,
        expires_at_ms: None,
        revoked: false,
        tenant: None,
    };
    match st
        .cluster
        .propose(Command::CreateApiKey { key: record })
        .await
    {
        Ok(_) => {}
        Err(ClusterError::Rejected {
            code: RejectCode::KeyExists | RejectCode::KeyHashExists,
            ..
        }) => return Err(already(&[KEY_ID.to_owned()])),
        Err(e) => return Err(e.into()),
    }
    st.cluster.assign_role(&principal, "admin", None).await?;
    st.runtime().events().emit(DomainEvent::KeyCreated {
        key_id: KEY_ID.to_owned(),
        principal_id: principal.clone(),
        name: name.clone(),
    });
    tracing::warn!(key_id = KEY_ID, principal = %principal, source = ?source, "bootstrap_admin_key_created");
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({"key_id": KEY_ID, "raw_key": raw_key, "principal_id": principal,
            "name": name, "role": "admin",
            "warning": "Store the raw key now: it is shown once and never stored. This route is now refused for good."})),
    )
        .into_response())
}

/// What the node answered `hangar auth bootstrap-admin`.
#[derive(Debug)]
pub enum ClientError {
    /// The node refused (the message says why); exit 1.
    Refused(String),
    /// The node could not be asked; exit 2.
    Failed(String),
}

/// The new key, as the node answered it.
#[derive(Debug, Deserialize)]
pub struct Created {
    /// Key id.
    pub key_id: String,
    /// The raw key (shown once).
    pub raw_key: String,
    /// Its principal.
    pub principal_id: String,
    /// Its name.
    pub name: String,
}

/// The client side: ask the node at `endpoint` (`http(s)://127.0.0.1:PORT`) for the first
/// admin key. `ca_file` is the CA to trust for an `https://` endpoint.
pub async fn request(
    endpoint: &str,
    principal: Option<&str>,
    name: Option<&str>,
    ca_file: Option<&Path>,
) -> Result<Created, ClientError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut http = reqwest::Client::builder().timeout(std::time::Duration::from_secs(60));
    if let Some(f) = ca_file {
        let roots = crate::config::read_roots("--ca-file", f)
            .map_err(|p| ClientError::Failed(p.to_string()))?;
        let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Failed(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        http = http.tls_backend_preconfigured(tls);
    }
    let http = http
        .build()
        .map_err(|e| ClientError::Failed(format!("building the HTTP client: {e}")))?;
    let url = format!("{}{PATH}", endpoint.trim_end_matches('/'));
    let mut body = serde_json::Map::new();
    if let Some(p) = principal {
        body.insert("principal_id".into(), json!(p));
    }
    if let Some(n) = name {
        body.insert("name".into(), json!(n));
    }
    let resp = http
        .post(&url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(Value::Object(body).to_string())
        .send()
        .await
        .map_err(|e| {
            ClientError::Failed(format!(
                "cannot reach the node at {endpoint} ({e}); is it running on this host? Pass its address with --endpoint http://127.0.0.1:PORT (https:// with --ca-file when it serves HTTPS)"
            ))
        })?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if status == StatusCode::CREATED {
        return serde_json::from_str(&text).map_err(|e| {
            ClientError::Failed(format!("unexpected answer from the node ({e}): {text}"))
        });
    }
    let message = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| text.trim().to_owned());
    if status == StatusCode::NOT_FOUND {
        return Err(ClientError::Failed(format!(
            "the node at {endpoint} does not serve {PATH} (an older Hangar?): {message}"
        )));
    }
    if status.is_client_error() {
        Err(ClientError::Refused(message))
    } else {
        Err(ClientError::Failed(format!("HTTP {status}: {message}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn only_callers_on_the_nodes_own_host() {
        let none = HeaderMap::new();
        let any = addr("0.0.0.0:8000");
        assert!(local_caller(addr("127.0.0.1:5000"), any, &none).is_ok());
        assert!(local_caller(addr("[::1]:5000"), any, &none).is_ok());
        assert!(local_caller(addr("[::ffff:127.0.0.1]:5000"), any, &none).is_ok());
        let e = local_caller(addr("10.1.2.3:5000"), any, &none).unwrap_err();
        assert!(e.contains("came from 10.1.2.3"), "{e}");
        assert!(local_caller(addr("[fe80::1]:5000"), any, &none).is_err());
        assert!(local_caller(None, any, &none).is_err());
        // A listener bound to one address: a connection from that address is this host.
        let own = addr("10.1.2.3:8000");
        assert!(local_caller(addr("10.1.2.3:5000"), own, &none).is_ok());
        assert!(local_caller(addr("10.1.2.4:5000"), own, &none).is_err());
        assert!(local_caller(addr("0.0.0.0:5000"), any, &none).is_err());
    }

    #[test]
    fn a_proxy_in_between_is_refused() {
        for h in ["x-forwarded-for", "forwarded", "x-real-ip"] {
            let mut headers = HeaderMap::new();
            headers.insert(h, "203.0.113.9".parse().unwrap());
            let e = local_caller(addr("127.0.0.1:5000"), None, &headers).unwrap_err();
            assert!(e.contains(h) && e.contains("proxy"), "{e}");
        }
    }
}
