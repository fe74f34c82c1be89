//! Auth room: who is calling. The front door (`/mcp`, `/servers/{id}/mcp`) and the REST API
//! (`/api/*`) pass every request through [`middleware`]; handlers never check credentials
//! themselves. Probes (`/health/*`) and `/metrics` stay open.
//!
//! Today: API keys (`mcp_` + 256 random bits, created by `POST /api/auth/keys`). Only the
//! SHA-256 of a key is stored, in the cluster's replicated state, so a key created through
//! any node works on every node as soon as its write is acknowledged, and a revocation is
//! refused everywhere just as soon. A key is looked up by the hash of what the caller sent,
//! compared in constant time. SHA-256 (not a slow password hash) is right here because the
//! secret has 256 bits of entropy: nothing can be guessed, and the check costs a microsecond.
//!
//! Authorization ([`rbac`]): MCP Hangar's six roles and their permissions (plus custom roles),
//! assigned to principals through the replicated state. Every REST route maps to a
//! permission and a route outside the table is denied (403); over MCP, each method needs a
//! permission, a forbidden `tools/call` is a JSON-RPC error naming it (the upstream never
//! sees the call), and `tools/list` is empty for a caller who may not call tools.
//!
//! Bearer JWTs from trusted issuers ([`jwt`], `auth.jwt` or MCP Hangar's `auth.oidc`):
//! `Authorization: Bearer <token>` with a token that is not an API key. The subject's roles
//! come from the same replicated assignments as an API key principal's, plus those of its
//! groups (`group:<name>` assignments, and the issuer's `group_roles`).
//!
//! A source address that keeps failing is locked out for a while ([`lockout`]).
//!
//! Role assignments may be scoped to one server (`server:<id>`) or one group and its members
//! (`group:<id>`): their permissions count only for tool calls to that target and REST routes
//! about it ([`rbac::Grants::allows_on`]).
//!
//! Not yet: role assignments in the config file (refused by config validation), tenant scopes.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hangar_raft::state::ApiKeyRecord;
use parking_lot::RwLock;

use crate::config::AuthConfig;

pub mod jwt;
pub mod lockout;
pub mod policy;
pub mod rbac;

pub use rbac::Grants;

/// Longest credential accepted.
const MAX_KEY_LEN: usize = 256;

/// Who made a request (in the request's extensions once authenticated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// No credentials, and `auth.allow_anonymous` (or auth is off).
    Anonymous,
    /// An API key.
    ApiKey {
        /// The key's id (public).
        key_id: String,
        /// The principal it authenticates as.
        principal: String,
        /// The key's tenant (rate limits).
        tenant: Option<String>,
    },
    /// This node's configured bootstrap key, before the cluster registered it: an admin.
    Bootstrap {
        /// Its id once registered.
        key_id: String,
    },
    /// A verified bearer JWT.
    Jwt {
        /// Its subject claim: the principal id role assignments name.
        subject: String,
        /// Its issuer (`iss`).
        issuer: String,
        /// Its tenant claim (rate limits).
        tenant: Option<String>,
        /// Its groups claim (roles through `group_roles` and `group:<name>` assignments).
        groups: Vec<String>,
    },
}

impl Principal {
    /// The principal's name (`anonymous`, `admin` for the bootstrap key).
    pub fn name(&self) -> &str {
        match self {
            Principal::Anonymous => "anonymous",
            Principal::ApiKey { principal, .. } => principal,
            Principal::Bootstrap { .. } => "admin",
            Principal::Jwt { subject, .. } => subject,
        }
    }
}

/// Why a request is not authenticated (the message never contains the credential).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Nothing was sent.
    #[error(
        "No valid credentials provided: send an API key in the {header} header (or Authorization: Bearer mcp_…){}",
        jwt_hint(.jwt)
    )]
    Missing {
        /// The configured header.
        header: String,
        /// Bearer JWTs are accepted too.
        jwt: bool,
    },
    /// Not an API key at all.
    #[error("Invalid API key format: keys start with mcp_ and are at most 256 characters")]
    Malformed,
    /// No such key.
    #[error("Invalid API key")]
    Unknown,
    /// The key expired.
    #[error("API key {key_id} has expired")]
    Expired {
        /// Key id.
        key_id: String,
    },
    /// The key was revoked.
    #[error("API key {key_id} has been revoked")]
    Revoked {
        /// Key id.
        key_id: String,
    },
    /// A bearer JWT that does not verify.
    #[error("Invalid bearer token: {0}")]
    Jwt(#[from] jwt::JwtError),
}

/// The end of [`AuthError::Missing`]'s message when JWTs are accepted.
fn jwt_hint(jwt: &bool) -> &'static str {
    if *jwt {
        ", or a JWT as Authorization: Bearer <token>"
    } else {
        ""
    }
}

/// Where API keys are looked up (the cluster's replicated state).
pub trait KeyStore: Send + Sync + 'static {
    /// A number that changes whenever keys, roles or assignments change (what cached lookups
    /// are valid for).
    fn version(&self) -> u64;
    /// The roles assigned to `principal` and the custom role definitions (name →
    /// permissions).
    fn roles_of(
        &self,
        principal: &str,
    ) -> (
        std::collections::BTreeSet<String>,
        std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
    );
    /// The roles assigned to `principal` for one server or group only (scope `server:<id>` /
    /// `group:<id>` → role names) and the definitions of those roles (name → permissions).
    fn scoped_roles_of(
        &self,
        _principal: &str,
    ) -> (
        std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
        std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
    ) {
        Default::default()
    }
    /// The key whose SHA-256 (hex) is `sha256_hex`.
    fn find(&self, sha256_hex: &str) -> Option<ApiKeyRecord>;
    /// Catch up with every write the cluster acknowledged so far (a ReadIndex round);
    /// `false` when that is not possible now (no leader).
    fn catch_up(&self) -> futures::future::BoxFuture<'_, bool>;
}

/// The route that hands out the first admin key (`api/bootstrap.rs`): it authenticates no
/// one, so the middleware lets it through with [`AuthSettings`].
pub const BOOTSTRAP_ADMIN_PATH: &str = "/api/auth/bootstrap-admin";

/// The settings the bootstrap route needs to know (a request extension on that route).
#[derive(Debug, Clone, Copy, Default)]
pub struct AuthSettings {
    /// `auth.enabled`.
    pub enabled: bool,
    /// `auth.api_key.enabled`.
    pub api_keys: bool,
}

/// Authentication settings and the key store, shared by every request.
pub struct Auth {
    cfg: RwLock<AuthConfig>,
    /// The verifier of `cfg.jwt` (rebuilt when that changes).
    jwt: RwLock<Option<Arc<jwt::Jwt>>>,
    keys: Arc<dyn KeyStore>,
    lockout: lockout::Lockout,
    /// Keys found and grants computed at one [`KeyStore::version`]: the hot path does no
    /// scan and no allocation of permission sets until something changes.
    cache: parking_lot::Mutex<Cache>,
    /// The groups a server is a member of (the runtime's), for group-scoped grants on REST
    /// routes about a member; unset: none.
    membership: std::sync::OnceLock<Membership>,
}

/// The ids of the groups a server is a member of.
pub type Membership = Arc<dyn Fn(&str) -> Vec<String> + Send + Sync>;

/// The ids of the groups `server` is a member of in `runtime`.
pub fn groups_of(runtime: &crate::runtime::Runtime, server: &str) -> Vec<String> {
    runtime
        .groups()
        .into_iter()
        .filter(|g| g.spec().members.iter().any(|m| m.id == server))
        .map(|g| g.id().to_owned())
        .collect()
}

/// Whether `grants` include `perm` for a request to `id` (a server or group of `runtime`):
/// globally, or through a role scoped to it (group membership is looked up only then).
pub fn allows_on_id(
    grants: &Grants,
    perm: &str,
    runtime: &crate::runtime::Runtime,
    id: &str,
) -> bool {
    grants.allows(perm) || (grants.has_scoped() && grants.allows_on(perm, &target_in(runtime, id)))
}

/// What a request to `id` (a server or a group of `runtime`) is about, for scoped grants.
pub fn target_in(runtime: &crate::runtime::Runtime, id: &str) -> rbac::Target {
    if runtime.group(id).is_some() {
        return rbac::Target::Group(id.to_owned());
    }
    rbac::Target::Server {
        id: id.to_owned(),
        groups: groups_of(runtime, id),
    }
}

/// See [`Auth::cache`].
#[derive(Default)]
struct Cache {
    version: u64,
    /// SHA-256 (hex) → the key's record (found keys only, so callers cannot grow it).
    keys: std::collections::HashMap<String, Arc<ApiKeyRecord>>,
    /// Principal → what it may do.
    grants: std::collections::HashMap<String, Arc<Grants>>,
}

/// Entries kept per cache before it starts over.
const CACHE_CAP: usize = 10_000;

impl Cache {
    /// Start over when the auth state moved on.
    fn at(&mut self, version: u64) -> &mut Self {
        if self.version != version || self.keys.len() + self.grants.len() > CACHE_CAP {
            self.version = version;
            self.keys.clear();
            self.grants.clear();
        }
        self
    }
}

impl Auth {
    /// Authenticate against `keys` with `cfg`.
    pub fn new(cfg: AuthConfig, keys: Arc<dyn KeyStore>) -> Arc<Self> {
        let verifier = cfg.jwt.as_ref().map(jwt::Jwt::new);
        if let Some(v) = &verifier {
            v.start();
        }
        Arc::new(Auth {
            cfg: RwLock::new(cfg),
            jwt: RwLock::new(verifier),
            keys,
            lockout: lockout::Lockout::default(),
            cache: parking_lot::Mutex::new(Cache::default()),
            membership: std::sync::OnceLock::new(),
        })
    }

    /// Where group membership comes from (the runtime), for group-scoped grants on REST
    /// routes about a member server. Set once.
    pub fn set_membership(&self, membership: Membership) {
        let _ = self.membership.set(membership);
    }

    /// Whether `grants` include `perm` for a REST request to `path`: globally, or through a
    /// role scoped to the server or group the path names.
    fn permits(&self, grants: &Grants, perm: &str, path: &str) -> bool {
        grants.allows(perm)
            || (grants.has_scoped() && grants.allows_on(perm, &self.route_target(path)))
    }

    /// What a REST request to `path` is about (the `{id}` of `/api/mcp_servers/{id}…` or
    /// `/api/groups/{id}…`), for scoped grants.
    fn route_target(&self, path: &str) -> rbac::Target {
        match rbac::route_target(path) {
            Some(("group", id)) => rbac::Target::Group(id.to_owned()),
            Some((_, id)) => rbac::Target::Server {
                id: id.to_owned(),
                groups: self.membership.get().map(|m| m(id)).unwrap_or_default(),
            },
            None => rbac::Target::None,
        }
    }

    /// New settings (config reload).
    pub fn set_config(&self, cfg: AuthConfig) {
        // One lock at a time (`authenticate` holds `cfg` while it reads `jwt`).
        let changed = self.jwt().as_ref().map(|v| v.config()) != cfg.jwt.as_ref();
        if changed {
            // A new verifier fetches its keys afresh; the old one's fetch tasks stop with it.
            let verifier = cfg.jwt.as_ref().map(jwt::Jwt::new);
            if let Some(v) = &verifier {
                v.start();
            }
            *self.jwt.write() = verifier;
            // Grants of JWT principals depend on the issuers' `group_roles`.
            *self.cache.lock() = Cache::default();
        }
        if self.cfg.read().role_assignments != cfg.role_assignments {
            *self.cache.lock() = Cache::default();
        }
        *self.cfg.write() = cfg;
    }

    /// Add the file's role assignments (`auth.role_assignments`) of a caller known by any of
    /// `names` (an API key's principal id; a JWT's subject and `group:<g>` per group), of
    /// `tenant`: `global` and matching `tenant:<id>` ones to `roles`, `server:`/`group:` ones
    /// to `scoped`.
    fn add_config_roles(
        &self,
        names: &[String],
        tenant: Option<&str>,
        roles: &mut std::collections::BTreeSet<String>,
        scoped: &mut std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
    ) {
        let cfg = self.cfg.read();
        for a in cfg
            .role_assignments
            .iter()
            .filter(|a| names.contains(&a.principal))
        {
            match a.scope.strip_prefix("tenant:") {
                Some(t) if tenant == Some(t) => {
                    roles.insert(a.role.clone());
                }
                Some(_) => {}
                None if a.scope == "global" => {
                    roles.insert(a.role.clone());
                }
                None => {
                    scoped
                        .entry(a.scope.clone())
                        .or_default()
                        .insert(a.role.clone());
                }
            }
        }
    }

    /// The JWT verifier, when `auth.jwt` is configured.
    fn jwt(&self) -> Option<Arc<jwt::Jwt>> {
        self.jwt.read().clone()
    }

    /// What `p` may do.
    pub fn grants(&self, p: &Principal) -> Arc<Grants> {
        match p {
            Principal::Anonymous => Arc::new(Grants::default()),
            Principal::Bootstrap { .. } => Arc::new(Grants::of(
                &std::collections::BTreeSet::from(["admin".to_owned()]),
                &Default::default(),
            )),
            Principal::ApiKey {
                principal, tenant, ..
            } => {
                let version = self.keys.version();
                // The tenant matters for `tenant:` scoped assignments of the file; a NUL is
                // in no principal name.
                let cache_key = match tenant {
                    Some(t) => format!("{principal}\0tenant\0{t}"),
                    None => principal.clone(),
                };
                if let Some(g) = self.cache.lock().at(version).grants.get(&cache_key) {
                    return g.clone();
                }
                let (mut roles, custom) = self.keys.roles_of(principal);
                let (mut scoped, scoped_custom) = self.keys.scoped_roles_of(principal);
                self.add_config_roles(
                    std::slice::from_ref(principal),
                    tenant.as_deref(),
                    &mut roles,
                    &mut scoped,
                );
                let g = Arc::new(Grants::of(&roles, &custom).with_scoped(&scoped, &scoped_custom));
                self.cache
                    .lock()
                    .at(version)
                    .grants
                    .insert(cache_key, g.clone());
                g
            }
            Principal::Jwt {
                subject,
                issuer,
                groups,
                tenant,
            } => {
                let version = self.keys.version();
                // Not a principal name an API key can have (those hold no NUL).
                let cache_key = format!(
                    "\0jwt\0{issuer}\0{subject}\0{}\0tenant\0{}",
                    groups.join("\0"),
                    tenant.as_deref().unwrap_or("")
                );
                if let Some(g) = self.cache.lock().at(version).grants.get(&cache_key) {
                    return g.clone();
                }
                let (mut roles, mut custom) = self.keys.roles_of(subject);
                let (mut scoped, mut scoped_custom) = self.keys.scoped_roles_of(subject);
                for group in groups {
                    let principal = format!("group:{group}");
                    let (r, c) = self.keys.roles_of(&principal);
                    roles.extend(r);
                    custom.extend(c);
                    let (sr, sc) = self.keys.scoped_roles_of(&principal);
                    for (scope, r) in sr {
                        scoped.entry(scope).or_default().extend(r);
                    }
                    scoped_custom.extend(sc);
                }
                if let Some(v) = self.jwt() {
                    roles.extend(v.group_roles(issuer, groups));
                }
                let names: Vec<String> = std::iter::once(subject.clone())
                    .chain(groups.iter().map(|g| format!("group:{g}")))
                    .collect();
                self.add_config_roles(&names, tenant.as_deref(), &mut roles, &mut scoped);
                let g = Arc::new(Grants::of(&roles, &custom).with_scoped(&scoped, &scoped_custom));
                self.cache
                    .lock()
                    .at(version)
                    .grants
                    .insert(cache_key, g.clone());
                g
            }
        }
    }

    /// The key whose SHA-256 is `sha`, from the cache when the auth state did not change.
    fn find(&self, sha: &str) -> Option<Arc<ApiKeyRecord>> {
        let version = self.keys.version();
        if let Some(r) = self.cache.lock().at(version).keys.get(sha) {
            return Some(r.clone());
        }
        let r = Arc::new(self.keys.find(sha)?);
        self.cache
            .lock()
            .at(version)
            .keys
            .insert(sha.to_owned(), r.clone());
        Some(r)
    }

    /// The file's role assignments (`auth.role_assignments`).
    pub fn file_role_assignments(&self) -> Vec<crate::config::RoleAssignmentSpec> {
        self.cfg.read().role_assignments.clone()
    }

    /// Whether requests must authenticate.
    pub fn enabled(&self) -> bool {
        self.cfg.read().enabled
    }

    /// Who sent `headers`, at `now_ms` (Unix ms).
    pub fn authenticate(&self, headers: &HeaderMap, now_ms: u64) -> Result<Principal, AuthError> {
        let cfg = self.cfg.read();
        if !cfg.enabled {
            return Ok(Principal::Anonymous);
        }
        let verifier = self.jwt();
        // A bearer token that is not an API key is a JWT, when JWTs are accepted (with API
        // keys off, any bearer token is).
        if let Some(v) = &verifier
            && let Some(token) = bearer(headers).filter(|t| {
                !(cfg.api_key.enabled
                    && (t.starts_with("mcp_") || headers.contains_key(&cfg.api_key.header_name)))
            })
        {
            let now_s = now_ms as f64 / 1000.0;
            let id = v.verify(token, now_s)?;
            return Ok(Principal::Jwt {
                subject: id.subject,
                issuer: id.issuer,
                tenant: id.tenant,
                groups: id.groups,
            });
        }
        let sent = cfg
            .api_key
            .enabled
            .then(|| credential(headers, &cfg.api_key.header_name))
            .flatten();
        let Some(key) = sent else {
            return if cfg.allow_anonymous {
                Ok(Principal::Anonymous)
            } else {
                Err(AuthError::Missing {
                    header: cfg.api_key.header_name.clone(),
                    jwt: verifier.is_some(),
                })
            };
        };
        if !key.starts_with("mcp_") || key.len() > MAX_KEY_LEN {
            return Err(AuthError::Malformed);
        }
        let sha = crate::config::sha256_hex(key.as_bytes());
        match self.find(&sha) {
            Some(record) => check(&record, now_ms),
            // This node's own bootstrap key, before the cluster registered it (a node that
            // is not initialized yet, `cluster init`, a join): an admin key. Once registered,
            // the replicated record decides (it can be revoked).
            None if cfg.api_key.bootstrap_key.as_ref().is_some_and(|b| {
                constant_time_eq(&crate::config::sha256_hex(b.expose().as_bytes()), &sha)
            }) =>
            {
                Ok(Principal::Bootstrap {
                    key_id: format!("key_bootstrap_{}", &sha[..12]),
                })
            }
            None => Err(AuthError::Unknown),
        }
    }
}

/// A found key's verdict at `now_ms`.
fn check(record: &ApiKeyRecord, now_ms: u64) -> Result<Principal, AuthError> {
    if record.revoked {
        return Err(AuthError::Revoked {
            key_id: record.id.clone(),
        });
    }
    if record.expires_at_ms.is_some_and(|t| t <= now_ms) {
        return Err(AuthError::Expired {
            key_id: record.id.clone(),
        });
    }
    Ok(Principal::ApiKey {
        key_id: record.id.clone(),
        principal: record.principal.clone(),
        tenant: record.tenant.clone(),
    })
}

/// The credential a request carries: the API-key header, else `Authorization: Bearer …`.
fn credential<'a>(headers: &'a HeaderMap, header_name: &str) -> Option<&'a str> {
    if let Some(v) = headers.get(header_name) {
        return v.to_str().ok().map(str::trim).filter(|s| !s.is_empty());
    }
    bearer(headers)
}

/// The token of `Authorization: Bearer …`.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let auth = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = auth.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Equal, in time independent of where two strings differ.
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Middleware: authenticate every `/api` and MCP request; 401 with MCP Hangar's flat body and
/// `WWW-Authenticate` when that fails.
pub async fn middleware(State(auth): State<Arc<Auth>>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if path == BOOTSTRAP_ADMIN_PATH {
        // No credential exists yet: the route checks the caller's address and the
        // replicated state itself (`api/bootstrap.rs`), knowing the settings.
        let settings = {
            let cfg = auth.cfg.read();
            AuthSettings {
                enabled: cfg.enabled,
                api_keys: cfg.api_key.enabled,
            }
        };
        req.extensions_mut().insert(settings);
        return next.run(req).await;
    }
    if path.starts_with("/health/") || path == "/metrics" || !auth.enabled() {
        return next.run(req).await;
    }
    let source = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    let now = std::time::Instant::now();
    if let Some(left) = source.and_then(|ip| auth.lockout.locked(ip, now)) {
        let secs = left.as_secs().max(1);
        return unauthorized_with(
            format!("Too many auth attempts. Retry in {secs}s."),
            serde_json::json!({"retry_after": secs}),
        );
    }
    let now_ms = (crate::telemetry::unix_now() * 1000.0) as u64;
    let mut verdict = auth.authenticate(req.headers(), now_ms);
    if verdict == Err(AuthError::Unknown) && auth.keys.catch_up().await {
        // A key created through another node works here as soon as its write was
        // acknowledged, even if this node had not applied it yet.
        verdict = auth.authenticate(req.headers(), now_ms);
    }
    if let Err(AuthError::Jwt(jwt::JwtError::UnknownKey { issuer, .. })) = &verdict
        && let Some(v) = auth.jwt()
        && v.refetch(issuer).await
    {
        // The issuer may have rotated its keys: one (rate-limited) JWKS refetch, then again.
        verdict = auth.authenticate(req.headers(), now_ms);
    }
    if let Some(ip) = source {
        if verdict.is_ok() {
            auth.lockout.succeeded(ip);
        } else {
            let cfg = auth.cfg.read().rate_limit.clone();
            if let Some(lock) = auth.lockout.failed(&cfg, ip, now) {
                tracing::warn!(source = %ip, lockout_s = lock.as_secs(), "auth_lockout (too many failed attempts from this address)");
            }
        }
    }
    match verdict {
        Ok(p) => {
            let mut grants = auth.grants(&p);
            if path.starts_with("/api/") || path == "/api" {
                if p == Principal::Anonymous {
                    return api_error(
                        StatusCode::UNAUTHORIZED,
                        "MissingCredentialsError",
                        "the REST API needs credentials: send an API key".to_owned(),
                        serde_json::Value::Null,
                    );
                }
                let method = req.method().as_str().to_owned();
                let needed = rbac::route_permission(&method, path);
                if needed.is_some_and(|perm| !auth.permits(&grants, perm, path))
                    && auth.keys.catch_up().await
                {
                    // A role assigned through another node counts as soon as it was
                    // acknowledged.
                    grants = auth.grants(&p);
                }
                let denied = match needed {
                    None => Some((
                        format!(
                            "{method} {path} is not an authorized route (not in the permission table)"
                        ),
                        serde_json::json!({"route": format!("{method} {path}")}),
                    )),
                    Some(perm) if !auth.permits(&grants, perm, path) => Some((
                        format!(
                            "{perm} permission required (principal {} has roles {:?})",
                            p.name(),
                            grants.roles
                        ),
                        serde_json::json!({"required_permission": perm, "principal": p.name()}),
                    )),
                    Some(_) => None,
                };
                if let Some((message, details)) = denied {
                    tracing::info!(path, principal = p.name(), "access_denied");
                    return api_error(StatusCode::FORBIDDEN, "AccessDeniedError", message, details);
                }
            }
            req.extensions_mut().insert(grants);
            req.extensions_mut().insert(p);
            next.run(req).await
        }
        Err(e) => {
            tracing::info!(path, reason = %e, "authentication_failed");
            unauthorized(&e)
        }
    }
}

/// MCP Hangar's nested error envelope.
fn api_error(
    status: StatusCode,
    code: &str,
    message: String,
    details: serde_json::Value,
) -> Response {
    let body = serde_json::json!({"error": {"code": code, "message": message, "details": details}});
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// The 401 answer (a refused JWT: `Bearer error="invalid_token"`, RFC 6750, and the reason's
/// code in `details.reason`).
fn unauthorized(e: &AuthError) -> Response {
    let AuthError::Jwt(j) = e else {
        return unauthorized_with(e.to_string(), serde_json::Value::Null);
    };
    let mut r = unauthorized_with(e.to_string(), serde_json::json!({"reason": j.code()}));
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer error=\"invalid_token\", ApiKey"),
    );
    r
}

/// A 401 with MCP Hangar's flat body and `WWW-Authenticate`.
fn unauthorized_with(message: String, details: serde_json::Value) -> Response {
    let body = serde_json::json!({
        "error": "authentication_failed",
        "message": message,
        "details": details,
    });
    let mut r = (
        StatusCode::UNAUTHORIZED,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer, ApiKey"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Keys(HashMap<String, ApiKeyRecord>);

    impl KeyStore for Keys {
        fn find(&self, h: &str) -> Option<ApiKeyRecord> {
            self.0
                .values()
                .find(|k| constant_time_eq(&k.sha256_hex, h))
                .cloned()
        }

        fn catch_up(&self) -> futures::future::BoxFuture<'_, bool> {
            Box::pin(async { true })
        }

        fn version(&self) -> u64 {
            0
        }

        fn roles_of(
            &self,
            _principal: &str,
        ) -> (
            std::collections::BTreeSet<String>,
            std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
        ) {
            Default::default()
        }
    }

    const GOOD: &str = "mcp_0123456789abcdef0123456789abcdef";

    fn record(id: &str, raw: &str) -> ApiKeyRecord {
        ApiKeyRecord {
            tenant: None,
            id: id.into(),
            principal: "svc".into(),
            name: id.into(),
            sha256_hex: crate::config::sha256_hex(raw.as_bytes()),
            created_at_ms: 0,
            expires_at_ms: None,
            revoked: false,
        }
    }

    fn auth(enabled: bool, anonymous: bool) -> Arc<Auth> {
        let mut keys = HashMap::new();
        keys.insert("k1".to_owned(), record("k1", GOOD));
        let mut old = record("k2", "mcp_expired_expired_expired_expired_0");
        old.expires_at_ms = Some(1000);
        keys.insert("k2".to_owned(), old);
        let mut gone = record("k3", "mcp_revoked_revoked_revoked_revoked_0");
        gone.revoked = true;
        keys.insert("k3".to_owned(), gone);
        let cfg = AuthConfig {
            enabled,
            allow_anonymous: anonymous,
            ..AuthConfig::default()
        };
        Auth::new(cfg, Arc::new(Keys(keys)))
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn keys_authenticate_by_header_or_bearer_and_everything_else_is_refused() {
        let a = auth(true, false);
        let ok = Principal::ApiKey {
            key_id: "k1".into(),
            principal: "svc".into(),
            tenant: None,
        };
        assert_eq!(
            a.authenticate(&headers(&[("x-api-key", GOOD)]), 5000),
            Ok(ok.clone())
        );
        let bearer = format!("Bearer {GOOD}");
        assert_eq!(
            a.authenticate(&headers(&[("authorization", &bearer)]), 5000),
            Ok(ok)
        );
        assert!(matches!(
            a.authenticate(&headers(&[]), 5000),
            Err(AuthError::Missing { .. })
        ));
        assert_eq!(
            a.authenticate(&headers(&[("x-api-key", "mcp_bogus")]), 5000),
            Err(AuthError::Unknown)
        );
        assert_eq!(
            a.authenticate(&headers(&[("x-api-key", "not-a-key")]), 5000),
            Err(AuthError::Malformed)
        );
        let long = format!("mcp_{}", "a".repeat(300));
        assert_eq!(
            a.authenticate(&headers(&[("x-api-key", &long)]), 5000),
            Err(AuthError::Malformed)
        );
        assert!(matches!(
            a.authenticate(
                &headers(&[("x-api-key", "mcp_expired_expired_expired_expired_0")]),
                5000
            ),
            Err(AuthError::Expired { .. })
        ));
        assert!(matches!(
            a.authenticate(
                &headers(&[("x-api-key", "mcp_revoked_revoked_revoked_revoked_0")]),
                5000
            ),
            Err(AuthError::Revoked { .. })
        ));
        // The message never carries what was sent.
        let e = a
            .authenticate(&headers(&[("x-api-key", "mcp_bogus")]), 5000)
            .unwrap_err();
        assert!(!e.to_string().contains("bogus"));
    }

    #[test]
    fn the_configured_bootstrap_key_is_an_admin_until_the_cluster_knows_it() {
        let boot = "mcp_bootstrap_bootstrap_bootstrap_bootstrap";
        let mut cfg = AuthConfig {
            enabled: true,
            ..AuthConfig::default()
        };
        cfg.api_key.bootstrap_key = Some(crate::config::Secret::new(boot));
        let none = Auth::new(cfg.clone(), Arc::new(Keys(HashMap::new())));
        let p = none
            .authenticate(&headers(&[("x-api-key", boot)]), 0)
            .unwrap();
        assert!(matches!(p, Principal::Bootstrap { .. }));
        assert!(none.grants(&p).allows("auth:manage"));
        // Registered and revoked: the replicated record decides.
        let mut rec = record("kb", boot);
        rec.revoked = true;
        let known = Auth::new(cfg, Arc::new(Keys(HashMap::from([("kb".to_owned(), rec)]))));
        assert!(matches!(
            known.authenticate(&headers(&[("x-api-key", boot)]), 0),
            Err(AuthError::Revoked { .. })
        ));
    }

    #[test]
    fn off_or_anonymous_lets_callers_without_credentials_through() {
        assert_eq!(
            auth(false, false).authenticate(&headers(&[]), 0),
            Ok(Principal::Anonymous)
        );
        assert_eq!(
            auth(true, true).authenticate(&headers(&[]), 0),
            Ok(Principal::Anonymous)
        );
        // A wrong key is still refused when anonymous callers are allowed.
        assert_eq!(
            auth(true, true).authenticate(&headers(&[("x-api-key", "mcp_bogus")]), 0),
            Err(AuthError::Unknown)
        );
    }

    #[test]
    fn random_credentials_never_panic_and_never_authenticate() {
        use rand::{Rng, SeedableRng};
        let a = auth(true, false);
        let seed: u64 = rand::random();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        // Bounded: 5000 random header sets.
        for i in 0..5000 {
            let n = rng.random_range(0..300);
            let mut bytes: Vec<u8> = (0..n).map(|_| rng.random_range(0x20u8..0x7f)).collect();
            if rng.random_bool(0.3) {
                bytes.splice(0..0, *b"mcp_");
            }
            if rng.random_bool(0.2) {
                bytes.push(rng.random_range(0x80u8..=0xff));
            }
            let Ok(v) = HeaderValue::from_bytes(&bytes) else {
                continue;
            };
            let mut h = HeaderMap::new();
            let name = if rng.random_bool(0.5) {
                "x-api-key"
            } else {
                "authorization"
            };
            h.insert(axum::http::HeaderName::from_static(name), v);
            let r = a.authenticate(&h, 5000);
            assert!(r.is_err(), "seed {seed}, case {i}: {bytes:?} authenticated");
        }
    }

    /// A store where `svc` holds `ops` on server `a` and on group `g`, and `viewer` globally.
    struct Scoped;

    impl KeyStore for Scoped {
        fn find(&self, _h: &str) -> Option<ApiKeyRecord> {
            None
        }

        fn catch_up(&self) -> futures::future::BoxFuture<'_, bool> {
            Box::pin(async { false })
        }

        fn version(&self) -> u64 {
            0
        }

        fn roles_of(
            &self,
            _principal: &str,
        ) -> (
            std::collections::BTreeSet<String>,
            std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
        ) {
            (["viewer".to_owned()].into(), Default::default())
        }

        fn scoped_roles_of(
            &self,
            principal: &str,
        ) -> (
            std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
            std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
        ) {
            if principal != "svc" {
                return Default::default();
            }
            let ops = std::collections::BTreeSet::from(["ops".to_owned()]);
            (
                [
                    ("server:a".to_owned(), ops.clone()),
                    ("group:g".to_owned(), ops),
                ]
                .into(),
                [(
                    "ops".to_owned(),
                    ["mcp_servers:lifecycle".to_owned(), "tool:invoke".to_owned()].into(),
                )]
                .into(),
            )
        }
    }

    #[test]
    fn scoped_roles_count_on_rest_routes_about_their_server_or_group() {
        let a = Auth::new(
            AuthConfig {
                enabled: true,
                ..AuthConfig::default()
            },
            Arc::new(Scoped),
        );
        let svc = Principal::ApiKey {
            key_id: "k".into(),
            principal: "svc".into(),
            tenant: None,
        };
        let g = a.grants(&svc);
        assert!(g.allows("mcp_servers:read") && !g.allows("mcp_servers:lifecycle"));
        assert_eq!(g.scoped_roles.len(), 2);
        let start = |id: &str| format!("/api/mcp_servers/{id}/start");
        assert!(a.permits(&g, "mcp_servers:lifecycle", &start("a")));
        assert!(!a.permits(&g, "mcp_servers:lifecycle", &start("b")));
        assert!(
            a.permits(&g, "mcp_servers:read", &start("b")),
            "global viewer"
        );
        assert!(!a.permits(&g, "mcp_servers:write", "/api/mcp_servers/a"));
        assert!(!a.permits(&g, "mcp_servers:lifecycle", "/api/auth/roles"));
        assert!(a.permits(&g, "mcp_servers:lifecycle", "/api/groups/g/rebalance"));
        // Members of g: only once membership is known.
        assert!(!a.permits(&g, "mcp_servers:lifecycle", &start("m1")));
        a.set_membership(Arc::new(|id| {
            if id == "m1" {
                vec!["g".to_owned()]
            } else {
                Vec::new()
            }
        }));
        assert!(a.permits(&g, "mcp_servers:lifecycle", &start("m1")));
        assert!(!a.permits(&g, "mcp_servers:lifecycle", &start("m2")));
        // Another principal holds only the global role.
        let other = Principal::ApiKey {
            key_id: "k2".into(),
            principal: "other".into(),
            tenant: None,
        };
        let g = a.grants(&other);
        assert!(!g.has_scoped());
        assert!(!a.permits(&g, "mcp_servers:lifecycle", &start("a")));
    }

    #[test]
    fn constant_time_eq_compares_whole_strings() {
        assert!(constant_time_eq("abc", "abc"));
        assert!(!constant_time_eq("abc", "abd"));
        assert!(!constant_time_eq("abc", "abcd"));
    }

    #[test]
    fn role_assignments_of_the_file_add_global_tenant_and_scoped_roles() {
        let a = auth(true, false);
        let assign = |principal: &str, role: &str, scope: &str| crate::config::RoleAssignmentSpec {
            principal: principal.into(),
            role: role.into(),
            scope: scope.into(),
        };
        let mut cfg = a.cfg.read().clone();
        cfg.role_assignments = vec![
            assign("svc", "viewer", "global"),
            assign("svc", "developer", "tenant:acme"),
            assign("svc", "provider-admin", "server:s1"),
            assign("someone-else", "admin", "global"),
        ];
        a.set_config(cfg);
        let key = |tenant: Option<&str>| Principal::ApiKey {
            key_id: "k1".into(),
            principal: "svc".into(),
            tenant: tenant.map(str::to_owned),
        };
        let plain = a.grants(&key(None));
        assert!(plain.allows("mcp_servers:read") && !plain.allows("tool:invoke"));
        assert!(!plain.allows("policy:write"));
        let s1 = rbac::Target::Server {
            id: "s1".into(),
            groups: vec![],
        };
        let s2 = rbac::Target::Server {
            id: "s2".into(),
            groups: vec![],
        };
        assert!(plain.allows_on("policy:write", &s1) && !plain.allows_on("policy:write", &s2));
        // The tenant's role counts for a caller of that tenant only (not cached across them).
        assert!(a.grants(&key(Some("acme"))).allows("tool:invoke"));
        assert!(!a.grants(&key(Some("other"))).allows("tool:invoke"));
        assert!(!a.grants(&key(None)).allows("tool:invoke"));
        // JWT callers: by subject or by group.
        let jwt = |subject: &str, groups: &[&str]| Principal::Jwt {
            subject: subject.into(),
            issuer: "https://idp".into(),
            tenant: None,
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        };
        assert!(a.grants(&jwt("svc", &[])).allows("mcp_servers:read"));
        assert!(!a.grants(&jwt("bob", &[])).allows("mcp_servers:read"));
        let mut cfg = a.cfg.read().clone();
        cfg.role_assignments = vec![assign("group:ops", "admin", "global")];
        a.set_config(cfg);
        assert!(a.grants(&jwt("bob", &["ops"])).allows("auth:manage"));
        // A reload that drops the assignment takes the role away at once.
        let mut cfg = a.cfg.read().clone();
        cfg.role_assignments.clear();
        a.set_config(cfg);
        assert!(!a.grants(&jwt("bob", &["ops"])).allows("auth:manage"));
    }

    /// Bounded fuzzing of the credential headers: arbitrary bytes (valid header values, not
    /// necessarily UTF-8) in `Authorization` and `X-API-Key`, alone or together, never panic
    /// and never authenticate; a good key with bytes appended or cut never does either.
    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                // Visible ASCII, tabs and obs-text bytes: everything a header value may hold.
                proptest::collection::vec(
                    prop_oneof![0x20u8..=0x7e, Just(b'\t'), 0x80u8..=0xff],
                    0..600
                ),
                // Near misses of real credentials.
                (
                    prop_oneof![
                        Just(b"Bearer ".to_vec()),
                        Just(b"bearer  ".to_vec()),
                        Just(b"Basic ".to_vec()),
                        Just(Vec::new())
                    ],
                    prop_oneof![
                        Just(GOOD.as_bytes().to_vec()),
                        Just(b"mcp_".to_vec()),
                        Just(b"eyJhbGciOiJFUzI1NiJ9.e30.".to_vec())
                    ],
                    proptest::collection::vec(0x21u8..=0x7e, 0..40),
                    any::<bool>(),
                )
                    .prop_map(|(scheme, cred, tail, cut)| {
                        let mut v = scheme;
                        if cut && cred.len() > 5 {
                            v.extend_from_slice(&cred[..cred.len() - 1]);
                        } else {
                            v.extend_from_slice(&cred);
                            v.extend_from_slice(&tail);
                        }
                        if tail.is_empty() && !cut {
                            v.push(b'!');
                        }
                        v
                    }),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]
            #[test]
            fn credential_headers_of_any_bytes_never_panic_or_authenticate(
                authz in proptest::option::of(header_bytes()),
                key in proptest::option::of(header_bytes()),
            ) {
                let a = auth(true, false);
                let mut h = HeaderMap::new();
                for (name, v) in [("authorization", &authz), ("x-api-key", &key)] {
                    if let Some(v) = v
                        && let Ok(value) = HeaderValue::from_bytes(v)
                    {
                        h.insert(axum::http::HeaderName::from_static(name), value);
                    }
                }
                let got = a.authenticate(&h, 5_000);
                prop_assert!(got.is_err(), "authenticated {:?} / {:?}: {:?}", authz, key, got);
            }
        }
    }
}
