//! Bearer JWTs (`auth.jwt`, or MCP Hangar's `auth.oidc`): `Authorization: Bearer <token>`
//! where the token is not an API key.
//!
//! A token is checked locally, in this order, each failure with its own reason ([`JwtError`]):
//! shape (three base64url parts, at most [`MAX_TOKEN_LEN`] bytes, no `crit` header), the
//! issuer (the unverified `iss` picks one of the configured issuers, whose keys then have to
//! verify the signature, so a forged `iss` gains nothing), the algorithm (the issuer's
//! `algorithms`; `none` and HMAC never), the key (by `kid`), the signature (ring, through
//! `jsonwebtoken`), then the claims ([`check_claims`], a pure function of the claims, the
//! issuer's settings and the time): `aud`, `exp` (required), `nbf`, `iat` with the leeway,
//! the lifetime cap, the subject, tenant and groups.
//!
//! Audiences per tenant (`strict_tenant_audience`, `tenant_audiences`): strict, a token must
//! name a tenant that is a key of `tenant_audiences` ([`JwtError::TenantNotAllowed`]
//! otherwise, [`JwtError::MissingClaim`] without one) and its `aud` must name one of that
//! tenant's audiences — the issuer's `audience` is not used. Not strict, a tenant's audiences
//! are accepted for its tokens in addition to the issuer's (see `config/jwt.rs`).
//!
//! The claims are checked here rather than by `jsonwebtoken::Validation`: every time claim must
//! be a JSON number, a wrong type refuses the token (jsonwebtoken 9 skips a time claim of the
//! wrong type, GHSA-h395-gr6q-cpjc), and each refusal gets a distinct reason.
//!
//! Keys: static `public_keys` are parsed once; a `jwks_uri` is fetched by a background task
//! (at start, then every `jwks_refresh_s`, sooner after a failure) and the decoding keys it
//! yields are kept per `kid`, so a request never waits on the network, with one exception: a
//! token whose `kid` no key has triggers one refetch (at most one per issuer every
//! [`KID_REFETCH_EVERY`]) and its request waits for it at most [`KID_REFETCH_WAIT`] — how a
//! key rotation at the issuer is picked up without waiting for the next refresh.
//!
//! OIDC discovery: an issuer with neither `jwks_uri` nor `public_keys` gets its JWKS URL from
//! `<issuer>/.well-known/openid-configuration` (its `jwks_uri`), fetched by the same loop,
//! with the same client (deadlines, redirects only to https or loopback http) and a size
//! limit ([`MAX_DISCOVERY_BYTES`]). The document's `issuer`, when present, must be the
//! configured issuer, and its `jwks_uri` must be https — plain http only to a loopback host
//! and only when the document itself came from one. (It should be on the issuer's host or at
//! least an https URL the operator trusts as much: whoever serves the discovery document
//! chooses the keys.) The URL found is kept and used by later fetches; it is discovered again
//! on every unknown-`kid` refetch (rate-limited as above) and after
//! [`REDISCOVER_AFTER_FAILURES`] JWKS fetches in a row failed; a failed rediscovery keeps the
//! URL found before. Until discovery and a first JWKS fetch succeed, the issuer's tokens are
//! refused with [`JwtError::UnknownKey`] whose code is `keys_unavailable` (401
//! `invalid_token`; the node logs the reason, never the token), and each failed attempt is
//! logged (`oidc_discovery_failed`, `jwks_fetch_failed`); a success is logged as
//! `oidc_discovered` (with the URL found) and `jwks_fetched`. There is no status endpoint or
//! metric for the key state: those log lines are it, and [`Jwt::discovered_jwks_uri`].

use std::collections::{BTreeSet, HashMap};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use parking_lot::Mutex;
use serde_json::{Map, Value};
use sha2::Digest;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{JwtConfig, JwtIssuer};

/// Longest bearer token accepted.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// At most one refetch for unknown key ids per issuer this often.
pub const KID_REFETCH_EVERY: Duration = Duration::from_secs(10);
/// How long a request with an unknown key id waits for that refetch.
pub const KID_REFETCH_WAIT: Duration = Duration::from_secs(2);
/// Deadline of one JWKS fetch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// First retry delay after a failed fetch (doubled per failure, at most the refresh period).
const RETRY_FIRST: Duration = Duration::from_secs(5);
/// Largest JWKS document read.
const MAX_JWKS_BYTES: usize = 1 << 20;
/// Largest OIDC discovery document read.
pub const MAX_DISCOVERY_BYTES: usize = 256 * 1024;
/// JWKS fetches failing in a row before the JWKS URL is discovered again (OIDC discovery).
pub const REDISCOVER_AFTER_FAILURES: u32 = 2;
/// Keys kept from one JWKS.
const MAX_KEYS: usize = 100;
/// Keys tried for one token (one without a `kid`, or a `kid` matching several keys).
const MAX_CANDIDATES: usize = 16;
/// Groups kept from one token (more can only grant less: groups add roles, never take any).
const MAX_GROUPS: usize = 1000;
/// Longest subject, tenant or group name.
const MAX_NAME_LEN: usize = 512;

/// Who a verified token says the caller is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The subject claim.
    pub subject: String,
    /// The issuer (`iss`), as configured.
    pub issuer: String,
    /// The tenant claim, if any.
    pub tenant: Option<String>,
    /// The groups claim.
    pub groups: Vec<String>,
}

/// Why a bearer token is refused. The message never contains the token; the only values it
/// takes from the token are its `alg` and `kid` (shortened, escaped).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Longer than [`MAX_TOKEN_LEN`].
    #[error("the bearer token is longer than {MAX_TOKEN_LEN} bytes")]
    TooLong,
    /// Not three base64url parts of JSON objects.
    #[error("the bearer token is not a JWT (header.payload.signature, base64url JSON)")]
    Malformed,
    /// A header this verifier does not accept.
    #[error("the token's header is not accepted: {0}")]
    BadHeader(&'static str),
    /// `none`, HMAC, or an algorithm the issuer does not allow.
    #[error("algorithm {alg} is not accepted for this issuer (allowed: {allowed})")]
    AlgorithmNotAllowed {
        /// The header's `alg` (shortened).
        alg: String,
        /// The issuer's algorithms.
        allowed: String,
    },
    /// No `iss`, or one no configured issuer has.
    #[error("the token's issuer is not a trusted issuer")]
    UntrustedIssuer,
    /// No key of the issuer matches (yet): a `kid` it does not have, or no keys at all yet
    /// (`pending`: its JWKS, or the OIDC discovery of its URL, has not succeeded).
    #[error("{}", unknown_key_message(.issuer, .kid, *.pending))]
    UnknownKey {
        /// The configured issuer.
        issuer: String,
        /// The header's `kid` (shortened, escaped), or `none`.
        kid: String,
        /// Why the issuer has no keys at all, when it has none yet.
        pending: Option<Pending>,
    },
    /// The signature does not verify.
    #[error("the token's signature does not verify with the keys of issuer {issuer}")]
    BadSignature {
        /// The configured issuer.
        issuer: String,
    },
    /// `aud` names none of the accepted audiences.
    #[error("the token is not meant for this Hangar: its audience is none of {expected:?}")]
    WrongAudience {
        /// The accepted audiences.
        expected: Vec<String>,
    },
    /// `exp` is past (beyond the leeway).
    #[error("the token expired {ago_s} s ago")]
    Expired {
        /// Seconds since `exp`.
        ago_s: u64,
    },
    /// `nbf` (or `iat`) is in the future (beyond the leeway).
    #[error("the token is not valid yet (for another {in_s} s)")]
    NotYetValid {
        /// Seconds until it is.
        in_s: u64,
    },
    /// `exp - iat` or `exp - now` exceeds the issuer's maximum.
    #[error("the token lives {lifetime_s} s, longer than the {max_s} s this issuer's tokens may")]
    LifetimeTooLong {
        /// Its lifetime.
        lifetime_s: u64,
        /// The maximum.
        max_s: u64,
    },
    /// A required claim is absent (or empty).
    #[error("the token has no `{claim}` claim")]
    MissingClaim {
        /// The claim's name.
        claim: String,
    },
    /// A claim of the wrong type (or too long).
    #[error("the token's `{claim}` claim is not valid (wrong type or too long)")]
    InvalidClaim {
        /// The claim's name.
        claim: String,
    },
    /// `strict_tenant_audience`: the token's tenant is not a key of `tenant_audiences`.
    #[error(
        "tenant not allowed: the token's tenant is not one this issuer's tokens are accepted for (strict_tenant_audience)"
    )]
    TenantNotAllowed,
    /// The subject is a principal id Hangar reserves (`admin`, `group:…`).
    #[error(
        "the token's subject is a reserved principal id (`admin` is the bootstrap key's, `group:…` names group role assignments)"
    )]
    ReservedSubject,
}

impl JwtError {
    /// A stable code for the reason.
    pub fn code(&self) -> &'static str {
        match self {
            JwtError::TooLong => "too_long",
            JwtError::Malformed => "malformed",
            JwtError::BadHeader(_) => "bad_header",
            JwtError::AlgorithmNotAllowed { .. } => "algorithm_not_allowed",
            JwtError::UntrustedIssuer => "untrusted_issuer",
            JwtError::UnknownKey { pending: None, .. } => "unknown_key",
            JwtError::UnknownKey {
                pending: Some(_), ..
            } => "keys_unavailable",
            JwtError::BadSignature { .. } => "bad_signature",
            JwtError::WrongAudience { .. } => "wrong_audience",
            JwtError::Expired { .. } => "expired",
            JwtError::NotYetValid { .. } => "not_yet_valid",
            JwtError::LifetimeTooLong { .. } => "lifetime_too_long",
            JwtError::MissingClaim { .. } => "missing_claim",
            JwtError::InvalidClaim { .. } => "invalid_claim",
            JwtError::ReservedSubject => "reserved_subject",
            JwtError::TenantNotAllowed => "tenant_not_allowed",
        }
    }
}

/// Why an issuer has no keys yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pending {
    /// OIDC discovery has not found its JWKS URL yet.
    Discovery,
    /// Its JWKS has not been fetched yet.
    Jwks,
}

fn unknown_key_message(issuer: &str, kid: &str, pending: Option<Pending>) -> String {
    match pending {
        None => format!("no signing key of issuer {issuer} matches the token (kid {kid})"),
        Some(Pending::Discovery) => format!(
            "the signing keys of issuer {issuer} are not available: the OIDC discovery of its JWKS URL has not succeeded yet"
        ),
        Some(Pending::Jwks) => format!(
            "the signing keys of issuer {issuer} are not available: its JWKS has not been fetched yet"
        ),
    }
}

/// Key families (what a key can verify).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Rsa,
    Ec,
    Ed,
}

impl Family {
    fn of(alg: Algorithm) -> Option<Family> {
        match alg {
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => Some(Family::Rsa),
            Algorithm::ES256 | Algorithm::ES384 => Some(Family::Ec),
            Algorithm::EdDSA => Some(Family::Ed),
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => None,
        }
    }
}

/// One verification key, decoded once.
struct Key {
    kid: Option<String>,
    family: Family,
    /// The only algorithm it may verify (the JWK's `alg`, or its curve's), if restricted.
    alg: Option<Algorithm>,
    key: DecodingKey,
}

impl Key {
    fn fits(&self, alg: Algorithm) -> bool {
        Family::of(alg) == Some(self.family) && self.alg.is_none_or(|a| a == alg)
    }
}

/// Keys by `kid`, and those without one.
#[derive(Default)]
struct KeySet {
    by_kid: HashMap<String, Vec<Arc<Key>>>,
    anonymous: Vec<Arc<Key>>,
}

impl KeySet {
    fn new(keys: Vec<Key>) -> KeySet {
        let mut set = KeySet::default();
        for k in keys.into_iter().map(Arc::new) {
            match &k.kid {
                Some(kid) => set.by_kid.entry(kid.clone()).or_default().push(k.clone()),
                None => set.anonymous.push(k),
            }
        }
        set
    }

    fn len(&self) -> usize {
        self.by_kid.values().map(Vec::len).sum::<usize>() + self.anonymous.len()
    }

    /// Keys that may have signed a token with `kid` and `alg`, into `out`.
    fn candidates(&self, kid: Option<&str>, alg: Algorithm, out: &mut Vec<Arc<Key>>) {
        let fits = |k: &&Arc<Key>| k.fits(alg);
        match kid {
            Some(kid) => match self.by_kid.get(kid) {
                Some(ks) => out.extend(ks.iter().filter(fits).cloned()),
                None => out.extend(self.anonymous.iter().filter(fits).cloned()),
            },
            None => {
                out.extend(self.anonymous.iter().filter(fits).cloned());
                out.extend(self.by_kid.values().flatten().filter(fits).cloned());
            }
        }
    }
}

/// Where an issuer's JWKS URL comes from.
enum Source {
    /// `jwks_uri`, as configured.
    Configured(String),
    /// OIDC discovery: the discovery document at this URL names it.
    Discovery(String),
}

/// A JWKS URL's fetch state.
struct Fetch {
    source: Source,
    /// Wakes the fetch loop (an unknown `kid`).
    wake: Notify,
    /// Counts finished fetch attempts (waiters watch it move).
    done: watch::Sender<u64>,
    state: Mutex<FetchState>,
}

#[derive(Default)]
struct FetchState {
    in_flight: bool,
    last_kid_refetch: Option<Instant>,
    /// The JWKS URL discovery found (OIDC discovery only).
    discovered: Option<String>,
    /// Discover the JWKS URL again at the next attempt (an unknown `kid`).
    rediscover: bool,
}

/// Most tokens whose signature is remembered per issuer (all are forgotten when full).
const VERIFIED_CAP: usize = 4096;

/// One trusted issuer and its keys.
struct Issuer {
    cfg: JwtIssuer,
    static_keys: KeySet,
    fetched: ArcSwap<KeySet>,
    /// Bumped each time `fetched` is replaced: a remembered signature is valid for one
    /// generation of keys only (a key dropped from the JWKS verifies nothing any more).
    keys_gen: AtomicU64,
    /// SHA-256 of tokens whose signature verified → the key generation it verified under.
    /// A client sends the same token on every call until it expires; its signature (tens of
    /// µs for RS/ES/PS) is checked once per key generation, its claims on every call.
    verified: Mutex<HashMap<[u8; 32], u64>>,
    fetch: Option<Fetch>,
}

impl Issuer {
    /// Replace the fetched keys (a new key generation: remembered signatures are checked
    /// again).
    fn set_fetched(&self, keys: KeySet) {
        self.fetched.store(Arc::new(keys));
        self.keys_gen.fetch_add(1, Ordering::AcqRel);
    }
}

/// The verifier of one `auth.jwt` configuration; stops its fetch tasks when dropped.
pub struct Jwt {
    cfg: JwtConfig,
    issuers: Vec<Arc<Issuer>>,
    client: Option<reqwest::Client>,
    started: AtomicBool,
    stop: CancellationToken,
}

impl Drop for Jwt {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Jwt {
    /// A verifier for `cfg` (validated: keys parse, URLs are http(s)). Call [`Jwt::start`]
    /// to begin fetching JWKS.
    pub fn new(cfg: &JwtConfig) -> Arc<Jwt> {
        let issuers = cfg
            .issuers
            .iter()
            .map(|is| {
                let keys = is
                    .public_keys
                    .iter()
                    .filter_map(|pk| {
                        let (kty, key) = crate::config::jwt_public_key(&pk.pem)?;
                        let family = match kty {
                            "RSA" => Family::Rsa,
                            "EC" => Family::Ec,
                            _ => Family::Ed,
                        };
                        Some(Key {
                            kid: pk.kid.clone(),
                            family,
                            alg: None,
                            key,
                        })
                    })
                    .collect();
                Arc::new(Issuer {
                    cfg: is.clone(),
                    static_keys: KeySet::new(keys),
                    fetched: ArcSwap::from_pointee(KeySet::default()),
                    keys_gen: AtomicU64::new(0),
                    verified: Mutex::new(HashMap::new()),
                    fetch: source(is).map(|source| Fetch {
                        source,
                        wake: Notify::new(),
                        done: watch::channel(0).0,
                        state: Mutex::new(FetchState::default()),
                    }),
                })
            })
            .collect();
        let client = cfg
            .issuers
            .iter()
            .any(|i| source(i).is_some())
            .then(http_client)
            .flatten();
        Arc::new(Jwt {
            cfg: cfg.clone(),
            issuers,
            client,
            started: AtomicBool::new(false),
            stop: CancellationToken::new(),
        })
    }

    /// The configuration it verifies with.
    pub fn config(&self) -> &JwtConfig {
        &self.cfg
    }

    /// Start the JWKS fetch loops (once; needs a tokio runtime, else a later call does it).
    pub fn start(&self) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.started.swap(true, Ordering::SeqCst) {
            return;
        }
        let Some(client) = &self.client else { return };
        for is in self.issuers.iter().filter(|i| i.fetch.is_some()) {
            rt.spawn(fetch_loop(is.clone(), client.clone(), self.stop.clone()));
        }
    }

    /// The JWKS URL OIDC discovery found for `issuer` (`None`: not discovered yet, or the
    /// issuer does not use discovery).
    pub fn discovered_jwks_uri(&self, issuer: &str) -> Option<String> {
        self.issuers
            .iter()
            .find(|i| i.cfg.issuer == issuer)?
            .fetch
            .as_ref()?
            .state
            .lock()
            .discovered
            .clone()
    }

    /// The roles `groups` map to under `issuer`'s `group_roles`.
    pub fn group_roles(&self, issuer: &str, groups: &[String]) -> BTreeSet<String> {
        let Some(is) = self.issuers.iter().find(|i| i.cfg.issuer == issuer) else {
            return BTreeSet::new();
        };
        groups
            .iter()
            .filter_map(|g| is.cfg.group_roles.get(g))
            .flatten()
            .cloned()
            .collect()
    }

    /// Verify `token` at `now_s` (Unix seconds).
    pub fn verify(&self, token: &str, now_s: f64) -> Result<Identity, JwtError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(JwtError::TooLong);
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(_sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed);
        };
        let header = json_part(h)?;
        let claims = json_part(p)?;
        if header.contains_key("crit") {
            return Err(JwtError::BadHeader(
                "critical extensions (`crit`) are not supported",
            ));
        }
        let Some(alg_name) = header.get("alg").and_then(Value::as_str) else {
            return Err(JwtError::BadHeader("no `alg`"));
        };
        let kid = match header.get("kid") {
            None | Some(Value::Null) => None,
            Some(Value::String(k)) => Some(k.as_str()),
            Some(_) => return Err(JwtError::BadHeader("`kid` is not a string")),
        };
        let iss = match claims.get("iss") {
            Some(Value::String(s)) => s,
            None | Some(Value::Null) => {
                return Err(JwtError::MissingClaim {
                    claim: "iss".into(),
                });
            }
            Some(_) => return Err(JwtError::UntrustedIssuer),
        };
        let Some(issuer) = self.issuers.iter().find(|i| i.cfg.issuer == *iss) else {
            return Err(JwtError::UntrustedIssuer);
        };
        let alg = Algorithm::from_str(alg_name)
            .ok()
            .filter(|a| issuer.cfg.algorithms.contains(a) && Family::of(*a).is_some())
            .ok_or_else(|| JwtError::AlgorithmNotAllowed {
                alg: shorten(alg_name),
                allowed: issuer
                    .cfg
                    .algorithms
                    .iter()
                    .map(|a| format!("{a:?}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        // Read before the keys: a refresh in between makes what is remembered here stale.
        let keys_gen = issuer.keys_gen.load(Ordering::Acquire);
        let digest: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        if issuer.verified.lock().get(&digest) == Some(&keys_gen) {
            return check_claims(&issuer.cfg, &claims, now_s);
        }
        let mut candidates = Vec::new();
        issuer.static_keys.candidates(kid, alg, &mut candidates);
        issuer.fetched.load().candidates(kid, alg, &mut candidates);
        if candidates.is_empty() {
            return Err(JwtError::UnknownKey {
                issuer: issuer.cfg.issuer.clone(),
                kid: kid.map_or_else(|| "none".to_owned(), shorten),
                pending: issuer.pending(),
            });
        }
        let mut validation = Validation::new(alg);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        let verified = candidates.iter().take(MAX_CANDIDATES).any(|k| {
            jsonwebtoken::decode::<serde::de::IgnoredAny>(token, &k.key, &validation).is_ok()
        });
        if !verified {
            return Err(JwtError::BadSignature {
                issuer: issuer.cfg.issuer.clone(),
            });
        }
        {
            let mut remembered = issuer.verified.lock();
            if remembered.len() >= VERIFIED_CAP {
                remembered.clear();
            }
            remembered.insert(digest, keys_gen);
        }
        check_claims(&issuer.cfg, &claims, now_s)
    }

    /// After [`JwtError::UnknownKey`] for `issuer`: fetch its JWKS again (at most once per
    /// [`KID_REFETCH_EVERY`]; a fetch already under way counts) and wait for it at most
    /// [`KID_REFETCH_WAIT`]. `true` when a fetch finished (the token is worth checking again).
    /// An issuer using OIDC discovery discovers its JWKS URL again first.
    pub async fn refetch(&self, issuer: &str) -> bool {
        self.start();
        let Some(fetch) = self
            .issuers
            .iter()
            .find(|i| i.cfg.issuer == issuer)
            .and_then(|i| i.fetch.as_ref())
        else {
            return false;
        };
        if self.client.is_none() {
            return false;
        }
        let mut done = fetch.done.subscribe();
        let seen = *done.borrow_and_update();
        {
            let mut st = fetch.state.lock();
            if !st.in_flight {
                let now = Instant::now();
                if st
                    .last_kid_refetch
                    .is_some_and(|t| now.duration_since(t) < KID_REFETCH_EVERY)
                {
                    return false;
                }
                st.last_kid_refetch = Some(now);
                st.rediscover = matches!(fetch.source, Source::Discovery(_));
                fetch.wake.notify_one();
            }
        }
        matches!(
            tokio::time::timeout(KID_REFETCH_WAIT, done.wait_for(|n| *n > seen)).await,
            Ok(Ok(_))
        )
    }
}

impl Issuer {
    /// Why it has no keys at all, if it has none.
    fn pending(&self) -> Option<Pending> {
        let fetch = self.fetch.as_ref()?;
        if self.static_keys.len() > 0 || self.fetched.load().len() > 0 {
            return None;
        }
        match fetch.source {
            Source::Discovery(_) if fetch.state.lock().discovered.is_none() => {
                Some(Pending::Discovery)
            }
            _ => Some(Pending::Jwks),
        }
    }
}

/// Where `is`'s JWKS URL comes from, if it has one: `jwks_uri`, else OIDC discovery when it
/// has no static keys either.
fn source(is: &JwtIssuer) -> Option<Source> {
    match (&is.jwks_uri, is.discovery_url()) {
        (Some(url), _) => Some(Source::Configured(url.clone())),
        (None, Some(url)) => Some(Source::Discovery(url)),
        (None, None) => None,
    }
}

/// The HTTP client for JWKS and discovery documents: short deadlines, redirects only to https
/// (or loopback http).
fn http_client() -> Option<reqwest::Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let policy = reqwest::redirect::Policy::custom(|attempt| {
        let url = attempt.url();
        let safe = url.scheme() == "https"
            || (url.scheme() == "http" && crate::config::is_loopback_url(url));
        if attempt.previous().len() >= 3 {
            attempt.error("more than 3 redirects")
        } else if safe {
            attempt.follow()
        } else {
            attempt.error("a JWKS redirect may only lead to an https URL")
        }
    });
    match reqwest::Client::builder()
        .timeout(FETCH_TIMEOUT)
        .connect_timeout(FETCH_TIMEOUT)
        .redirect(policy)
        .build()
    {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::error!(error = %e, "jwks_client_failed (JWT keys from jwks_uri cannot be fetched)");
            None
        }
    }
}

/// Fetch `issuer`'s JWKS now, then every `jwks_refresh_s` (or when woken), until `stop`.
async fn fetch_loop(issuer: Arc<Issuer>, client: reqwest::Client, stop: CancellationToken) {
    let Some(fetch) = &issuer.fetch else { return };
    let mut failures = 0u32;
    loop {
        let rediscover = {
            let mut st = fetch.state.lock();
            st.in_flight = true;
            std::mem::take(&mut st.rediscover) || failures >= REDISCOVER_AFTER_FAILURES
        };
        let result = tokio::select! {
            r = fetch_keys(&issuer, fetch, &client, rediscover) => r,
            () = stop.cancelled() => return,
        };
        let next = match result {
            Ok((url, keys)) => {
                failures = 0;
                tracing::info!(issuer = %issuer.cfg.issuer, url = %url, keys = keys.len(), "jwks_fetched");
                issuer.set_fetched(keys);
                issuer.cfg.jwks_refresh
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(issuer = %issuer.cfg.issuer, error = %e, failures, "jwks_fetch_failed (the keys fetched before stay in use)");
                (RETRY_FIRST * (1 << failures.min(10))).min(issuer.cfg.jwks_refresh)
            }
        };
        fetch.state.lock().in_flight = false;
        fetch.done.send_modify(|n| *n += 1);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(next) => {}
            () = fetch.wake.notified() => {}
        }
    }
}

/// One attempt: the JWKS URL (configured, or discovered — again when `rediscover`, or when
/// not yet found), then its keys. The error says which step failed and where.
async fn fetch_keys(
    issuer: &Issuer,
    fetch: &Fetch,
    client: &reqwest::Client,
    rediscover: bool,
) -> Result<(String, KeySet), String> {
    let url = match &fetch.source {
        Source::Configured(url) => url.clone(),
        Source::Discovery(config_url) => {
            let known = fetch.state.lock().discovered.clone();
            match known {
                Some(url) if !rediscover => url,
                known => match discover(client, config_url, &issuer.cfg.issuer).await {
                    Ok(url) => {
                        if known.as_deref() == Some(url.as_str()) {
                            tracing::debug!(issuer = %issuer.cfg.issuer, jwks_uri = %url, "oidc_discovered (unchanged)");
                        } else {
                            tracing::info!(issuer = %issuer.cfg.issuer, discovery = %config_url, jwks_uri = %url, "oidc_discovered");
                        }
                        fetch.state.lock().discovered = Some(url.clone());
                        url
                    }
                    Err(e) => match known {
                        Some(url) => {
                            tracing::warn!(issuer = %issuer.cfg.issuer, discovery = %config_url, error = %e, "oidc_discovery_failed (the JWKS URL found before stays in use)");
                            url
                        }
                        None => {
                            tracing::warn!(issuer = %issuer.cfg.issuer, discovery = %config_url, error = %e, "oidc_discovery_failed (its tokens are refused until it succeeds)");
                            return Err(format!("OIDC discovery at {config_url}: {e}"));
                        }
                    },
                },
            }
        }
    };
    match fetch_jwks(client, &url).await {
        Ok(keys) => Ok((url, keys)),
        Err(e) => Err(format!("JWKS at {url}: {e}")),
    }
}

/// GET `url` as JSON, at most `max` bytes of it.
async fn get_json(client: &reqwest::Client, url: &str, max: usize) -> Result<Vec<u8>, String> {
    let mut resp = client
        .get(url)
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("HTTP {}", resp.status()));
    }
    if resp.content_length().is_some_and(|n| n > max as u64) {
        return Err(format!("the document is larger than {max} bytes"));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        body.extend_from_slice(&chunk);
        if body.len() > max {
            return Err(format!("the document is larger than {max} bytes"));
        }
    }
    Ok(body)
}

/// GET a JWKS and decode its signing keys.
async fn fetch_jwks(client: &reqwest::Client, url: &str) -> Result<KeySet, String> {
    parse_jwks(&get_json(client, url, MAX_JWKS_BYTES).await?)
}

/// GET an OIDC discovery document and the JWKS URL it names.
async fn discover(client: &reqwest::Client, url: &str, issuer: &str) -> Result<String, String> {
    let body = get_json(client, url, MAX_DISCOVERY_BYTES).await?;
    let from_loopback = reqwest::Url::parse(url)
        .is_ok_and(|u| u.scheme() == "http" && crate::config::is_loopback_url(&u));
    parse_discovery(&body, issuer, from_loopback)
}

/// The `jwks_uri` of an OIDC discovery document for `issuer` (fetched over loopback http when
/// `from_loopback`): its `issuer`, when present, must be `issuer`; the URL must be https, or
/// loopback http when the document came from loopback http too.
fn parse_discovery(body: &[u8], issuer: &str, from_loopback: bool) -> Result<String, String> {
    let doc: Map<String, Value> = serde_json::from_slice(body)
        .map_err(|e| format!("not an OIDC discovery document (a JSON object): {e}"))?;
    match doc.get("issuer") {
        None | Some(Value::Null) => {}
        Some(Value::String(i)) if i == issuer => {}
        Some(Value::String(i)) => {
            return Err(format!(
                "the document is for issuer {}, not {issuer}",
                shorten(i)
            ));
        }
        Some(_) => return Err("its `issuer` is not a string".into()),
    }
    let url = match doc.get("jwks_uri") {
        Some(Value::String(u)) if !u.trim().is_empty() => u,
        None | Some(Value::Null) | Some(Value::String(_)) => {
            return Err("it has no `jwks_uri` (give the issuer's `jwks_uri` in the config)".into());
        }
        Some(_) => return Err("its `jwks_uri` is not a URL string".into()),
    };
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| format!("its `jwks_uri` {} is not a URL ({e})", shorten(url)))?;
    match parsed.scheme() {
        "https" => Ok(url.clone()),
        "http" if from_loopback && crate::config::is_loopback_url(&parsed) => Ok(url.clone()),
        _ => Err(format!(
            "its `jwks_uri` {} is refused: keys must come from an https URL (plain http only to a loopback host, from a loopback issuer)",
            shorten(url)
        )),
    }
}

/// The signing keys of a JWKS document (keys it cannot use — encryption keys, symmetric
/// keys, unknown types or curves — are skipped); an error when none is usable.
fn parse_jwks(body: &[u8]) -> Result<KeySet, String> {
    #[derive(serde::Deserialize)]
    struct Jwks {
        keys: Vec<Value>,
    }
    #[derive(serde::Deserialize)]
    struct Jwk {
        kty: String,
        kid: Option<String>,
        alg: Option<String>,
        #[serde(rename = "use")]
        use_: Option<String>,
        n: Option<String>,
        e: Option<String>,
        crv: Option<String>,
        x: Option<String>,
        y: Option<String>,
    }
    let set: Jwks = serde_json::from_slice(body)
        .map_err(|e| format!("not a JWKS ({{\"keys\": [...]}}): {e}"))?;
    let mut keys = Vec::new();
    for v in set.keys.into_iter().take(MAX_KEYS) {
        let Ok(k) = serde_json::from_value::<Jwk>(v) else {
            continue;
        };
        if k.use_.as_deref().is_some_and(|u| u != "sig") {
            continue;
        }
        let alg = match k.alg.as_deref() {
            None => None,
            Some(a) => match Algorithm::from_str(a) {
                Ok(a) if Family::of(a).is_some() => Some(a),
                _ => continue,
            },
        };
        let decoded = match (k.kty.as_str(), k.crv.as_deref()) {
            ("RSA", _) => k.n.as_deref().zip(k.e.as_deref()).and_then(|(n, e)| {
                DecodingKey::from_rsa_components(n, e)
                    .ok()
                    .map(|d| (Family::Rsa, None, d))
            }),
            ("EC", Some(crv @ ("P-256" | "P-384"))) => {
                let curve_alg = if crv == "P-256" {
                    Algorithm::ES256
                } else {
                    Algorithm::ES384
                };
                k.x.as_deref().zip(k.y.as_deref()).and_then(|(x, y)| {
                    DecodingKey::from_ec_components(x, y)
                        .ok()
                        .map(|d| (Family::Ec, Some(curve_alg), d))
                })
            }
            ("OKP", Some("Ed25519")) => k.x.as_deref().and_then(|x| {
                DecodingKey::from_ed_components(x)
                    .ok()
                    .map(|d| (Family::Ed, Some(Algorithm::EdDSA), d))
            }),
            _ => None,
        };
        let Some((family, implied, key)) = decoded else {
            continue;
        };
        if let (Some(a), Some(i)) = (alg, implied)
            && a != i
        {
            continue;
        }
        if alg.is_some_and(|a| Family::of(a) != Some(family)) {
            continue;
        }
        keys.push(Key {
            kid: k.kid,
            family,
            alg: alg.or(implied),
            key,
        });
    }
    if keys.is_empty() {
        return Err("the JWKS has no usable signing key (RSA, EC P-256/P-384 or Ed25519)".into());
    }
    Ok(KeySet::new(keys))
}

/// A base64url part of a token, as a JSON object.
fn json_part(part: &str) -> Result<Map<String, Value>, JwtError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| JwtError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| JwtError::Malformed)
}

/// A token-supplied string for a message: at most 64 characters, escaped.
fn shorten(s: &str) -> String {
    let cut: String = s.chars().take(64).collect();
    format!("{cut:?}")
}

/// A claim by name: the exact key, else a dotted path into nested objects
/// (`realm_access.roles`). `null` counts as absent.
fn claim<'a>(claims: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    let found = match claims.get(name) {
        Some(v) => Some(v),
        None if name.contains('.') => {
            let mut segs = name.split('.');
            let mut cur = claims.get(segs.next()?)?;
            for s in segs {
                cur = cur.as_object()?.get(s)?;
            }
            Some(cur)
        }
        None => None,
    };
    found.filter(|v| !v.is_null())
}

/// A time claim: absent, or a finite JSON number (anything else refuses the token).
fn time_claim(claims: &Map<String, Value>, name: &str) -> Result<Option<f64>, JwtError> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .filter(|f| f.is_finite())
            .map(Some)
            .ok_or_else(|| JwtError::InvalidClaim { claim: name.into() }),
        Some(_) => Err(JwtError::InvalidClaim { claim: name.into() }),
    }
}

/// A string claim (`None` when absent; too long or not a string: refused).
fn string_claim(claims: &Map<String, Value>, name: &str) -> Result<Option<String>, JwtError> {
    match claim(claims, name) {
        None => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) if s.len() <= MAX_NAME_LEN => Ok(Some(s.clone())),
        Some(_) => Err(JwtError::InvalidClaim { claim: name.into() }),
    }
}

/// The claims of a token whose signature verified, against its issuer's settings at `now_s`.
pub fn check_claims(
    cfg: &JwtIssuer,
    claims: &Map<String, Value>,
    now_s: f64,
) -> Result<Identity, JwtError> {
    // Audience: a string or a list; one of them must be ours.
    let auds: Vec<&str> = match claims.get("aud") {
        None | Some(Value::Null) => {
            return Err(JwtError::MissingClaim {
                claim: "aud".into(),
            });
        }
        Some(Value::String(a)) => vec![a.as_str()],
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
        Some(_) => {
            return Err(JwtError::InvalidClaim {
                claim: "aud".into(),
            });
        }
    };
    let tenant = string_claim(claims, &cfg.tenant_claim)?;
    // Ours: the issuer's audiences and the tenant's; strict, the tenant's only (and a tenant
    // the map does not have is refused).
    let tenant_auds = tenant.as_ref().and_then(|t| cfg.tenant_audiences.get(t));
    let expected: Vec<&String> = if cfg.strict_tenant_audience {
        if tenant.is_none() {
            return Err(JwtError::MissingClaim {
                claim: cfg.tenant_claim.clone(),
            });
        }
        let Some(allowed) = tenant_auds else {
            return Err(JwtError::TenantNotAllowed);
        };
        allowed.iter().collect()
    } else {
        cfg.audiences
            .iter()
            .chain(tenant_auds.into_iter().flatten())
            .collect()
    };
    if !auds.iter().any(|a| expected.iter().any(|e| e == a)) {
        return Err(JwtError::WrongAudience {
            expected: expected.into_iter().cloned().collect(),
        });
    }
    let leeway = cfg.leeway.as_secs_f64();
    let Some(exp) = time_claim(claims, "exp")? else {
        return Err(JwtError::MissingClaim {
            claim: "exp".into(),
        });
    };
    let nbf = time_claim(claims, "nbf")?;
    let iat = time_claim(claims, "iat")?;
    if now_s >= exp + leeway {
        return Err(JwtError::Expired {
            ago_s: (now_s - exp).max(0.0) as u64,
        });
    }
    for t in [nbf, iat].into_iter().flatten() {
        if t > now_s + leeway {
            return Err(JwtError::NotYetValid {
                in_s: (t - now_s).ceil() as u64,
            });
        }
    }
    if let Some(max) = cfg.max_lifetime {
        let max_s = max.as_secs_f64();
        let lifetime = match iat {
            Some(iat) if exp - iat > max_s => Some(exp - iat),
            _ if exp - now_s > max_s + leeway => Some(exp - now_s),
            _ => None,
        };
        if let Some(l) = lifetime {
            return Err(JwtError::LifetimeTooLong {
                lifetime_s: l as u64,
                max_s: max.as_secs(),
            });
        }
    }
    let Some(subject) = string_claim(claims, &cfg.subject_claim)? else {
        return Err(JwtError::MissingClaim {
            claim: cfg.subject_claim.clone(),
        });
    };
    if subject == "admin" || subject.starts_with("group:") {
        return Err(JwtError::ReservedSubject);
    }
    if cfg.require_tenant && tenant.is_none() {
        return Err(JwtError::MissingClaim {
            claim: cfg.tenant_claim.clone(),
        });
    }
    let groups = match claim(claims, &cfg.groups_claim) {
        None => Vec::new(),
        Some(Value::String(g)) if g.is_empty() => Vec::new(),
        Some(Value::String(g)) if g.len() <= MAX_NAME_LEN => vec![g.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .filter(|g| !g.is_empty() && g.len() <= MAX_NAME_LEN)
            .take(MAX_GROUPS)
            .map(str::to_owned)
            .collect(),
        Some(_) => {
            return Err(JwtError::InvalidClaim {
                claim: cfg.groups_claim.clone(),
            });
        }
    };
    Ok(Identity {
        subject,
        issuer: cfg.issuer.clone(),
        tenant,
        groups,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    const ISS: &str = "https://idp.example.com/realms/prod";
    const AUD: &str = "hangar";
    const NOW: f64 = 1_700_000_000.0;
    /// A 2048-bit RSA key made for these tests only (nothing else trusts it).
    const RSA_KEY: &str = include_str!("testdata/rsa-test-only.key.pem");
    const RSA_PUB: &str = include_str!("testdata/rsa-test-only.pub.pem");

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// A P-256 signing key and its JWK.
    struct EcKey {
        kid: String,
        enc: EncodingKey,
        jwk: Value,
        pub_pem: String,
    }

    fn ec_key(kid: &str) -> EcKey {
        let kp = rcgen::KeyPair::generate().unwrap();
        let raw = kp.public_key_raw();
        assert_eq!(raw.len(), 65, "an uncompressed P-256 point");
        EcKey {
            kid: kid.to_owned(),
            enc: EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap(),
            jwk: json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
                "x": b64(&raw[1..33]), "y": b64(&raw[33..])}),
            pub_pem: kp.public_key_pem(),
        }
    }

    fn issuer_cfg() -> JwtIssuer {
        JwtIssuer {
            issuer: ISS.into(),
            audiences: vec![AUD.into(), "other".into()],
            jwks_uri: None,
            jwks_refresh: Duration::from_secs(300),
            public_keys: Vec::new(),
            algorithms: vec![Algorithm::RS256, Algorithm::ES256],
            leeway: Duration::from_secs(30),
            max_lifetime: Some(Duration::from_secs(3600)),
            subject_claim: "sub".into(),
            groups_claim: "groups".into(),
            tenant_claim: "tenant".into(),
            require_tenant: false,
            group_roles: [("platform-admins".to_owned(), vec!["admin".to_owned()])]
                .into_iter()
                .collect(),
            strict_tenant_audience: false,
            tenant_audiences: Default::default(),
        }
    }

    /// A verifier whose issuer has `keys` as its fetched JWKS.
    fn verifier(cfg: JwtIssuer, jwks: &[&Value]) -> Arc<Jwt> {
        let v = Jwt::new(&JwtConfig { issuers: vec![cfg] });
        if !jwks.is_empty() {
            let doc = json!({"keys": jwks}).to_string();
            v.issuers[0].set_fetched(parse_jwks(doc.as_bytes()).unwrap());
        }
        v
    }

    fn good_claims() -> Value {
        json!({"iss": ISS, "aud": AUD, "sub": "alice", "iat": NOW - 10.0, "exp": NOW + 600.0,
            "tenant": "acme", "groups": ["platform-admins", "devs"]})
    }

    fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
        let mut h = Header::new(alg);
        h.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&h, claims, key).unwrap()
    }

    fn es256(key: &EcKey, claims: &Value) -> String {
        sign(Algorithm::ES256, Some(&key.kid), claims, &key.enc)
    }

    /// `claims` with `patch` applied (`null` removes a claim).
    fn with(patch: Value) -> Value {
        let mut c = good_claims();
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    }

    /// A token assembled by hand (header and claims as given, any signature).
    fn raw_token(header: &Value, claims: &Value, sig: &[u8]) -> String {
        format!(
            "{}.{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes()),
            b64(sig)
        )
    }

    #[test]
    fn a_remembered_signature_counts_for_one_generation_of_keys_only() {
        let k = ec_key("k1");
        let v = verifier(issuer_cfg(), &[&k.jwk]);
        let token = es256(&k, &good_claims());
        assert!(v.verify(&token, NOW).is_ok());
        // Remembered: the claims are still checked on every call.
        assert!(v.verify(&token, NOW).is_ok());
        assert!(matches!(
            v.verify(&token, NOW + 3600.0),
            Err(JwtError::Expired { .. })
        ));
        assert_eq!(v.issuers[0].verified.lock().len(), 1);
        // The issuer drops the key: the same token no longer verifies.
        let other = ec_key("k2");
        let doc = json!({"keys": [other.jwk]}).to_string();
        v.issuers[0].set_fetched(parse_jwks(doc.as_bytes()).unwrap());
        assert!(v.verify(&token, NOW).is_err());
        // A token differing in one signature byte is not taken for the remembered one.
        let good = es256(&other, &good_claims());
        let mut forged = good.clone().into_bytes();
        let last = forged.len() - 2;
        forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).unwrap();
        assert!(v.verify(&good, NOW).is_ok());
        assert!(matches!(
            v.verify(&forged, NOW),
            Err(JwtError::BadSignature { .. })
        ));
    }

    #[test]
    fn a_good_token_is_accepted_with_its_subject_issuer_tenant_and_groups() {
        let k = ec_key("k1");
        let v = verifier(issuer_cfg(), &[&k.jwk]);
        let id = v.verify(&es256(&k, &good_claims()), NOW).unwrap();
        assert_eq!(
            id,
            Identity {
                subject: "alice".into(),
                issuer: ISS.into(),
                tenant: Some("acme".into()),
                groups: vec!["platform-admins".into(), "devs".into()],
            }
        );
        // `aud` as a list with one of ours; no `iat`; within the leeway after `exp`.
        let t = es256(
            &k,
            &with(json!({"aud": ["x", "other"], "iat": null, "exp": NOW - 20.0})),
        );
        assert!(v.verify(&t, NOW).is_ok());
        // A token without a kid is tried against the issuer's keys.
        let t = sign(Algorithm::ES256, None, &good_claims(), &k.enc);
        assert!(v.verify(&t, NOW).is_ok());
    }

    #[test]
    fn rs256_verifies_with_a_static_pem_key_and_with_jwk_components() {
        let enc = EncodingKey::from_rsa_pem(RSA_KEY.as_bytes()).unwrap();
        let mut cfg = issuer_cfg();
        cfg.public_keys = vec![crate::config::JwtPublicKey {
            kid: None,
            pem: RSA_PUB.into(),
        }];
        let v = verifier(cfg, &[]);
        let t = sign(Algorithm::RS256, Some("rsa1"), &good_claims(), &enc);
        assert_eq!(v.verify(&t, NOW).unwrap().subject, "alice");
        // RS384 is not in the issuer's algorithms.
        let t384 = sign(Algorithm::RS384, Some("rsa1"), &good_claims(), &enc);
        assert_eq!(
            v.verify(&t384, NOW).unwrap_err().code(),
            "algorithm_not_allowed"
        );
        // The same key published as a JWK (n, e).
        let jwk = json!({"kty": "RSA", "kid": "rsa1", "alg": "RS256", "e": "AQAB",
            "n": "wD9KXAYjnZzbZkk4KoS0JDzi8h5f_Rr9EvF7rNfRww2glCQWflfKJ3bd3mFC62VB4i4kavEtJgmnUGIQsd8wulr9gsVZm5Wn3JSQms1TQ_zuC-LnwiF5euYDEET1Iw9ARXR3imh_Q4W0l7Z_yOEMleK5ifiGrj42jfZED26MQtHgCwOrFz_j6C5GIhqVT1Sp_twHd2JH5oAsqwq51GeRGNW_x1r53dAFfSbL3mwaK08yTWgBk3-39R1zJBkimyzbP0QoORtVTUStsG4IuTL7XPVQEop50HAWOt1TSzXa0y5j0PtriAKLVdCrYnH0u-X9DCVL_lKLjlJ0ntQkwvaN6Q"});
        let v = verifier(issuer_cfg(), &[&jwk]);
        assert!(v.verify(&t, NOW).is_ok());
        // An EC token claiming the RSA key's kid finds no EC key under it.
        let k = ec_key("rsa1");
        assert_eq!(
            v.verify(&es256(&k, &good_claims()), NOW)
                .unwrap_err()
                .code(),
            "unknown_key"
        );
    }

    #[test]
    fn each_bad_token_is_refused_with_its_own_reason() {
        let k = ec_key("k1");
        let other = ec_key("k1");
        let v = verifier(issuer_cfg(), &[&k.jwk]);
        let good = es256(&k, &good_claims());
        let (h, rest) = good.split_once('.').unwrap();
        let (p, sig) = rest.split_once('.').unwrap();
        let mut flipped = URL_SAFE_NO_PAD.decode(sig).unwrap();
        flipped[10] ^= 1;
        let hs_key = EncodingKey::from_secret(b"a shared secret");
        let cases: Vec<(&str, String, &str)> = vec![
            (
                "wrong audience",
                es256(&k, &with(json!({"aud": "someone-else"}))),
                "wrong_audience",
            ),
            (
                "wrong issuer",
                es256(&k, &with(json!({"iss": "https://evil.example"}))),
                "untrusted_issuer",
            ),
            (
                "expired beyond the leeway",
                es256(&k, &with(json!({"exp": NOW - 31.0, "iat": NOW - 600.0}))),
                "expired",
            ),
            (
                "nbf in the future",
                es256(&k, &with(json!({"nbf": NOW + 120.0}))),
                "not_yet_valid",
            ),
            (
                "iat in the future",
                es256(&k, &with(json!({"iat": NOW + 120.0}))),
                "not_yet_valid",
            ),
            (
                "exp - iat too long",
                es256(&k, &with(json!({"iat": NOW - 10.0, "exp": NOW + 7200.0}))),
                "lifetime_too_long",
            ),
            (
                "exp - now too long",
                es256(&k, &with(json!({"iat": null, "exp": NOW + 7200.0}))),
                "lifetime_too_long",
            ),
            (
                "alg none",
                raw_token(&json!({"alg": "none", "kid": "k1"}), &good_claims(), b""),
                "algorithm_not_allowed",
            ),
            (
                "HS256",
                sign(Algorithm::HS256, Some("k1"), &good_claims(), &hs_key),
                "algorithm_not_allowed",
            ),
            (
                "unknown kid",
                sign(Algorithm::ES256, Some("k2"), &good_claims(), &other.enc),
                "unknown_key",
            ),
            (
                "another key under the known kid",
                es256(&other, &good_claims()),
                "bad_signature",
            ),
            (
                "tampered signature",
                format!("{h}.{p}.{}", b64(&flipped)),
                "bad_signature",
            ),
            (
                "tampered payload",
                format!(
                    "{h}.{}.{sig}",
                    b64(with(json!({"sub": "mallory"})).to_string().as_bytes())
                ),
                "bad_signature",
            ),
            (
                "no exp",
                es256(&k, &with(json!({"exp": null}))),
                "missing_claim",
            ),
            (
                "exp as a string",
                es256(&k, &with(json!({"exp": "never"}))),
                "invalid_claim",
            ),
            (
                "nbf as a string",
                es256(&k, &with(json!({"nbf": "later"}))),
                "invalid_claim",
            ),
            (
                "no subject",
                es256(&k, &with(json!({"sub": null}))),
                "missing_claim",
            ),
            (
                "reserved subject",
                es256(&k, &with(json!({"sub": "admin"}))),
                "reserved_subject",
            ),
            (
                "group subject",
                es256(&k, &with(json!({"sub": "group:platform-admins"}))),
                "reserved_subject",
            ),
            (
                "crit header",
                raw_token(
                    &json!({"alg": "ES256", "kid": "k1", "crit": ["exp"]}),
                    &good_claims(),
                    b"x",
                ),
                "bad_header",
            ),
            ("not a JWT", "not-a-jwt".into(), "malformed"),
            ("too long", "a".repeat(MAX_TOKEN_LEN + 1), "too_long"),
        ];
        for (what, token, code) in &cases {
            let e = v.verify(token, NOW).expect_err(what);
            assert_eq!(e.code(), *code, "{what}: {e}");
            // The reason never carries the token (nor its signature).
            let msg = e.to_string();
            assert!(
                !msg.contains(token.as_str()) && !msg.contains(sig),
                "{what}: {msg}"
            );
        }
        // The reasons the brief names are all different.
        let named = [
            "wrong audience",
            "wrong issuer",
            "expired beyond the leeway",
            "nbf in the future",
            "exp - iat too long",
            "alg none",
            "unknown kid",
            "tampered signature",
        ];
        let codes: BTreeSet<&str> = cases
            .iter()
            .filter(|(w, _, _)| named.contains(w))
            .map(|(_, _, c)| *c)
            .collect();
        assert_eq!(codes.len(), named.len(), "{codes:?}");
        // require_tenant.
        let mut cfg = issuer_cfg();
        cfg.require_tenant = true;
        let v = verifier(cfg, &[&k.jwk]);
        let e = v
            .verify(&es256(&k, &with(json!({"tenant": null}))), NOW)
            .unwrap_err();
        assert_eq!(
            e,
            JwtError::MissingClaim {
                claim: "tenant".into()
            }
        );
        // No lifetime cap: a year-long token passes.
        let mut cfg = issuer_cfg();
        cfg.max_lifetime = None;
        let v = verifier(cfg, &[&k.jwk]);
        assert!(
            v.verify(&es256(&k, &with(json!({"exp": NOW + 3e7}))), NOW)
                .is_ok()
        );
    }

    #[test]
    fn claim_names_are_configurable_and_may_be_nested() {
        let mut cfg = issuer_cfg();
        cfg.subject_claim = "preferred_username".into();
        cfg.groups_claim = "realm_access.roles".into();
        cfg.tenant_claim = "https://example.com/tenant".into();
        let claims = with(
            json!({"preferred_username": "bob", "realm_access": {"roles": ["ops", 3, ""]},
            "https://example.com/tenant": "t1"}),
        );
        let id = check_claims(&cfg, claims.as_object().unwrap(), NOW).unwrap();
        assert_eq!(
            (id.subject.as_str(), id.tenant.as_deref()),
            ("bob", Some("t1"))
        );
        assert_eq!(id.groups, vec!["ops".to_owned()]);
        let bad = with(json!({"preferred_username": "bob", "realm_access": {"roles": {"x": 1}}}));
        assert_eq!(
            check_claims(&cfg, bad.as_object().unwrap(), NOW)
                .unwrap_err()
                .code(),
            "invalid_claim"
        );
    }

    #[test]
    fn jwks_keep_signing_keys_only() {
        let k = ec_key("ec1");
        let doc = json!({"keys": [
            k.jwk,
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {"kty": "RSA", "kid": "enc", "use": "enc", "n": "AQAB", "e": "AQAB"},
            {"kty": "RSA", "kid": "oaep", "alg": "RSA-OAEP", "n": "AQAB", "e": "AQAB"},
            {"kty": "EC", "kid": "p521", "crv": "P-521", "x": "AA", "y": "AA"},
            {"kty": "EC", "kid": "mismatch", "crv": "P-256", "alg": "ES384", "x": "AA", "y": "AA"},
            {"something": "else"},
        ]});
        let set = parse_jwks(doc.to_string().as_bytes()).unwrap();
        assert_eq!(set.len(), 1);
        assert!(set.by_kid.contains_key("ec1"));
        assert!(parse_jwks(br#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#).is_err());
        assert!(parse_jwks(b"[]").is_err());
        // Static keys: public PEMs only.
        assert!(crate::config::jwt_public_key(&k.pub_pem).is_some());
        assert!(crate::config::jwt_public_key(RSA_PUB).is_some());
        assert!(
            crate::config::jwt_public_key(RSA_KEY).is_none(),
            "a private key is refused"
        );
    }

    /// Roles assigned to principals, as the replicated state would have them.
    struct Roles(std::collections::HashMap<String, BTreeSet<String>>);

    impl crate::auth::KeyStore for Roles {
        fn version(&self) -> u64 {
            1
        }
        fn roles_of(
            &self,
            principal: &str,
        ) -> (
            BTreeSet<String>,
            std::collections::BTreeMap<String, BTreeSet<String>>,
        ) {
            (
                self.0.get(principal).cloned().unwrap_or_default(),
                Default::default(),
            )
        }
        fn find(&self, _: &str) -> Option<hangar_raft::state::ApiKeyRecord> {
            None
        }
        fn catch_up(&self) -> futures::future::BoxFuture<'_, bool> {
            Box::pin(async { true })
        }
    }

    fn bearer(token: &str) -> axum::http::HeaderMap {
        let mut h = axum::http::HeaderMap::new();
        h.insert(
            axum::http::header::AUTHORIZATION,
            axum::http::HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        h
    }

    #[test]
    fn groups_map_to_roles_and_the_subject_keeps_its_assigned_roles() {
        let k = ec_key("k1");
        let mut cfg = issuer_cfg();
        cfg.public_keys = vec![crate::config::JwtPublicKey {
            kid: Some("k1".into()),
            pem: k.pub_pem.clone(),
        }];
        cfg.group_roles
            .insert("readers".into(), vec!["viewer".into(), "auditor".into()]);
        let auth_cfg = crate::config::AuthConfig {
            enabled: true,
            jwt: Some(JwtConfig { issuers: vec![cfg] }),
            ..Default::default()
        };
        let roles = Roles(
            [
                ("alice".to_owned(), BTreeSet::from(["developer".to_owned()])),
                (
                    "group:devs".to_owned(),
                    BTreeSet::from(["service-account".to_owned()]),
                ),
            ]
            .into_iter()
            .collect(),
        );
        let auth = crate::auth::Auth::new(auth_cfg, Arc::new(roles));
        let now_ms = (NOW * 1000.0) as u64;
        let p = auth
            .authenticate(&bearer(&es256(&k, &good_claims())), now_ms)
            .unwrap();
        assert_eq!(p.name(), "alice");
        let g = auth.grants(&p);
        assert_eq!(
            g.roles,
            BTreeSet::from(["admin".into(), "developer".into(), "service-account".into()]),
            "assigned to the subject, to group:devs, and mapped from platform-admins"
        );
        let reader = with(json!({"sub": "carol", "groups": ["readers"]}));
        let p = auth
            .authenticate(&bearer(&es256(&k, &reader)), now_ms)
            .unwrap();
        let g = auth.grants(&p);
        assert_eq!(g.roles, BTreeSet::from(["auditor".into(), "viewer".into()]));
        assert!(g.allows("mcp_servers:read") && !g.allows("mcp_servers:write"));
        let nobody = with(json!({"sub": "dave", "groups": []}));
        let p = auth
            .authenticate(&bearer(&es256(&k, &nobody)), now_ms)
            .unwrap();
        assert!(auth.grants(&p).roles.is_empty());
        // A bad token is an AuthError::Jwt (401 with Bearer error="invalid_token").
        let e = auth
            .authenticate(&bearer(&es256(&k, &with(json!({"aud": "x"})))), now_ms)
            .unwrap_err();
        let r = crate::auth::unauthorized(&e);
        assert_eq!(r.status(), axum::http::StatusCode::UNAUTHORIZED);
        let www = r.headers()[axum::http::header::WWW_AUTHENTICATE]
            .to_str()
            .unwrap();
        assert!(www.contains("Bearer error=\"invalid_token\""), "{www}");
        // An `mcp_` bearer is still an API key (none known here).
        assert_eq!(
            auth.authenticate(&bearer("mcp_0123456789abcdef0123456789abcdef"), now_ms),
            Err(crate::auth::AuthError::Unknown)
        );
    }

    #[test]
    fn a_reload_keeps_the_verifier_unless_the_jwt_settings_change() {
        let cfg = |aud: &str| {
            let mut is = issuer_cfg();
            is.audiences = vec![aud.into()];
            crate::config::AuthConfig {
                enabled: true,
                jwt: Some(JwtConfig { issuers: vec![is] }),
                ..Default::default()
            }
        };
        let auth = crate::auth::Auth::new(cfg("a"), Arc::new(Roles(Default::default())));
        let first = auth.jwt().unwrap();
        let stop = first.stop.clone();
        auth.set_config(cfg("a"));
        assert!(Arc::ptr_eq(&first, &auth.jwt().unwrap()), "unchanged: kept");
        auth.set_config(cfg("b"));
        let second = auth.jwt().unwrap();
        assert!(!Arc::ptr_eq(&first, &second), "changed: rebuilt");
        assert_eq!(second.config().issuers[0].audiences, vec!["b".to_owned()]);
        drop(first);
        assert!(stop.is_cancelled(), "the old verifier's fetch loops stop");
        auth.set_config(crate::config::AuthConfig {
            jwt: None,
            ..cfg("b")
        });
        assert!(auth.jwt().is_none());
    }

    #[test]
    fn random_bearer_tokens_never_panic_and_never_verify() {
        use rand::{Rng, SeedableRng};
        let k = ec_key("k1");
        let v = verifier(issuer_cfg(), &[&k.jwk]);
        let good = es256(&k, &good_claims());
        let seed: u64 = rand::random();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let pieces = [
            "",
            ".",
            "..",
            "...",
            "e30",
            "eyJ",
            "=",
            "-",
            "_",
            "AAAA",
            &b64(br#"{"alg":"ES256","kid":"k1"}"#),
            &b64(br#"{"alg":"none"}"#),
            &b64(br#"{"alg":"RS256","kid":7}"#),
            &b64(good_claims().to_string().as_bytes()),
            &b64(br#"{"iss":"https://idp.example.com/realms/prod","exp":"x"}"#),
            &b64(b"[]"),
            &b64(b"null"),
        ];
        // Bounded: 5000 random tokens.
        for i in 0..5000 {
            let token: String = match rng.random_range(0..4) {
                // Random printable bytes.
                0 => (0..rng.random_range(0..400))
                    .map(|_| rng.random_range(' '..='~'))
                    .collect(),
                // Pieces joined by dots.
                1 => (0..rng.random_range(1..6))
                    .map(|_| pieces[rng.random_range(0..pieces.len())])
                    .collect::<Vec<_>>()
                    .join("."),
                // The good token with a few bytes changed.
                2 => {
                    let mut b = good.clone().into_bytes();
                    for _ in 0..rng.random_range(1..4) {
                        let at = rng.random_range(0..b.len());
                        b[at] = rng.random_range(b'-'..=b'z');
                    }
                    String::from_utf8_lossy(&b).into_owned()
                }
                // Random JSON header and payload, random signature.
                _ => {
                    let alg = ["ES256", "RS256", "none", "HS256", "EdDSA"][rng.random_range(0..5)];
                    let kid = ["k1", "k2"][rng.random_range(0..2)];
                    let h = json!({"alg": alg, "kid": kid});
                    let mut c = good_claims();
                    for key in ["exp", "iat", "nbf", "aud", "sub", "groups", "tenant"] {
                        if rng.random_bool(0.3) {
                            let odd = [
                                json!(null),
                                json!("s"),
                                json!(-1),
                                json!(1e300),
                                json!([1]),
                                json!({}),
                            ];
                            c[key] = odd[rng.random_range(0..odd.len())].clone();
                        }
                    }
                    let sig: Vec<u8> = (0..rng.random_range(0..80)).map(|_| rng.random()).collect();
                    raw_token(&h, &c, &sig)
                }
            };
            if token == good {
                continue;
            }
            assert!(
                v.verify(&token, NOW).is_err(),
                "seed {seed}, case {i}: {token:?} verified"
            );
        }
    }

    /// A JWKS endpoint on 127.0.0.1 serving whatever `doc` holds; counts its requests.
    async fn jwks_server(
        doc: Arc<Mutex<String>>,
        hits: Arc<std::sync::atomic::AtomicU64>,
    ) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let (doc, hits) = (doc.clone(), hits.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    hits.fetch_add(1, Ordering::SeqCst);
                    let body = doc.lock().clone();
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        format!("http://{addr}/jwks.json")
    }

    #[tokio::test]
    async fn an_unknown_kid_triggers_one_rate_limited_refetch_that_picks_up_a_rotation() {
        let (a, b, c) = (ec_key("a"), ec_key("b"), ec_key("c"));
        let doc = Arc::new(Mutex::new(json!({"keys": [a.jwk]}).to_string()));
        let hits = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let url = jwks_server(doc.clone(), hits.clone()).await;
        let mut cfg = issuer_cfg();
        cfg.jwks_uri = Some(url);
        let v = Jwt::new(&JwtConfig { issuers: vec![cfg] });
        v.start();
        let now = || crate::telemetry::unix_now();
        let claims = |now: f64| with(json!({"iat": now, "exp": now + 300.0}));
        // The first fetch happens in the background; a token waits for it at most ~2 s.
        let t = es256(&a, &claims(now()));
        if v.verify(&t, now()).is_err() {
            assert!(v.refetch(ISS).await, "the start-up fetch finishes");
        }
        assert!(v.verify(&t, now()).is_ok());
        // The issuer rotates to b: a b token's kid is unknown until one refetch.
        *doc.lock() = json!({"keys": [b.jwk]}).to_string();
        let t = es256(&b, &claims(now()));
        assert_eq!(v.verify(&t, now()).unwrap_err().code(), "unknown_key");
        let before = hits.load(Ordering::SeqCst);
        let started = Instant::now();
        assert!(v.refetch(ISS).await);
        assert!(started.elapsed() < KID_REFETCH_WAIT);
        assert_eq!(hits.load(Ordering::SeqCst), before + 1);
        assert!(v.verify(&t, now()).is_ok(), "accepted after the refetch");
        assert_eq!(
            v.verify(&es256(&a, &claims(now())), now())
                .unwrap_err()
                .code(),
            "unknown_key",
            "the retired key is gone"
        );
        // Another unknown kid within 10 s: no fetch, no wait.
        *doc.lock() = json!({"keys": [b.jwk, c.jwk]}).to_string();
        let started = Instant::now();
        assert!(!v.refetch(ISS).await, "rate-limited");
        assert!(started.elapsed() < Duration::from_millis(100));
        assert_eq!(hits.load(Ordering::SeqCst), before + 1);
        // Dropping the verifier stops its fetch loop.
        let stop = v.stop.clone();
        drop(v);
        assert!(stop.is_cancelled());
    }

    #[tokio::test]
    async fn a_failed_fetch_keeps_the_keys_fetched_before() {
        let a = ec_key("a");
        let doc = Arc::new(Mutex::new(json!({"keys": [a.jwk]}).to_string()));
        let hits = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let url = jwks_server(doc.clone(), hits).await;
        let mut cfg = issuer_cfg();
        cfg.jwks_uri = Some(url);
        let v = Jwt::new(&JwtConfig { issuers: vec![cfg] });
        v.start();
        let now = crate::telemetry::unix_now();
        let t = es256(&a, &with(json!({"iat": now, "exp": now + 300.0})));
        if v.verify(&t, now).is_err() {
            assert!(v.refetch(ISS).await);
        }
        assert!(v.verify(&t, now).is_ok());
        *doc.lock() = "not json".into();
        let other = ec_key("z");
        let unknown = es256(&other, &with(json!({"iat": now, "exp": now + 300.0})));
        assert_eq!(v.verify(&unknown, now).unwrap_err().code(), "unknown_key");
        assert!(v.refetch(ISS).await, "the attempt finished (and failed)");
        assert!(v.verify(&t, now).is_ok(), "the old keys stay");
    }

    /// `issuer_cfg` with `acme` and `globex` audiences, strict or not.
    fn tenant_cfg(strict: bool) -> JwtIssuer {
        let mut cfg = issuer_cfg();
        cfg.strict_tenant_audience = strict;
        cfg.tenant_audiences = [
            ("acme".to_owned(), vec!["hangar-acme".to_owned()]),
            (
                "globex".to_owned(),
                vec!["hangar-globex".to_owned(), "hangar-globex-2".to_owned()],
            ),
        ]
        .into_iter()
        .collect();
        cfg
    }

    fn check(cfg: &JwtIssuer, patch: Value) -> Result<Identity, JwtError> {
        check_claims(cfg, with(patch).as_object().unwrap(), NOW)
    }

    #[test]
    fn strict_tenant_audiences_bind_each_tenant_to_its_own_audiences() {
        let cfg = tenant_cfg(true);
        // The right tenant with one of its audiences.
        let id = check(&cfg, json!({"tenant": "acme", "aud": "hangar-acme"})).unwrap();
        assert_eq!(id.tenant.as_deref(), Some("acme"));
        assert!(
            check(
                &cfg,
                json!({"tenant": "globex", "aud": ["x", "hangar-globex-2"]})
            )
            .is_ok()
        );
        // The right tenant with another tenant's audience, or the issuer's (not used when strict).
        for aud in [json!("hangar-globex"), json!(AUD), json!(["other", "x"])] {
            let e = check(&cfg, json!({"tenant": "acme", "aud": aud})).unwrap_err();
            assert_eq!(
                e,
                JwtError::WrongAudience {
                    expected: vec!["hangar-acme".into()]
                },
                "{aud}"
            );
        }
        // A tenant the map does not have: refused, without echoing it.
        let e = check(&cfg, json!({"tenant": "initech", "aud": "hangar-acme"})).unwrap_err();
        assert_eq!(e.code(), "tenant_not_allowed");
        let msg = e.to_string();
        assert!(msg.starts_with("tenant not allowed"), "{msg}");
        assert!(
            !msg.contains("initech") && !msg.contains("hangar-acme"),
            "{msg}"
        );
        // No tenant (absent, empty): the tenant claim is required.
        for t in [json!(null), json!("")] {
            assert_eq!(
                check(&cfg, json!({"tenant": t, "aud": "hangar-acme"})).unwrap_err(),
                JwtError::MissingClaim {
                    claim: "tenant".into()
                }
            );
        }
        // A tenant of the wrong type.
        assert_eq!(
            check(&cfg, json!({"tenant": ["acme"], "aud": "hangar-acme"}))
                .unwrap_err()
                .code(),
            "invalid_claim"
        );
        // Through the verifier too (a signed token).
        let k = ec_key("k1");
        let v = verifier(cfg, &[&k.jwk]);
        let ok = es256(&k, &with(json!({"tenant": "acme", "aud": "hangar-acme"})));
        assert_eq!(v.verify(&ok, NOW).unwrap().tenant.as_deref(), Some("acme"));
        let other = es256(&k, &with(json!({"tenant": "globex", "aud": "hangar-acme"})));
        assert_eq!(v.verify(&other, NOW).unwrap_err().code(), "wrong_audience");
        let unknown = es256(
            &k,
            &with(json!({"tenant": "umbrella", "aud": "hangar-acme"})),
        );
        assert_eq!(
            v.verify(&unknown, NOW).unwrap_err().code(),
            "tenant_not_allowed"
        );
    }

    #[test]
    fn without_strict_a_tenants_audiences_are_accepted_besides_the_issuers() {
        let cfg = tenant_cfg(false);
        // The tenant's own additional audience.
        assert!(check(&cfg, json!({"tenant": "acme", "aud": "hangar-acme"})).is_ok());
        assert!(
            check(
                &cfg,
                json!({"tenant": "globex", "aud": ["hangar-globex-2"]})
            )
            .is_ok()
        );
        // The issuer's audiences still, for every tenant, one not in the map, and none.
        for t in [json!("acme"), json!("initech"), json!(null)] {
            assert!(check(&cfg, json!({"tenant": t, "aud": AUD})).is_ok(), "{t}");
        }
        // Another tenant's audience is not one of ours.
        let e = check(&cfg, json!({"tenant": "globex", "aud": "hangar-acme"})).unwrap_err();
        assert_eq!(e.code(), "wrong_audience");
        for t in [json!("initech"), json!(null)] {
            assert_eq!(
                check(&cfg, json!({"tenant": t, "aud": "hangar-acme"}))
                    .unwrap_err()
                    .code(),
                "wrong_audience",
                "{t}"
            );
        }
        // Without the map, an issuer's audiences only (as before).
        assert_eq!(
            check(
                &issuer_cfg(),
                json!({"tenant": "acme", "aud": "hangar-acme"})
            )
            .unwrap_err()
            .code(),
            "wrong_audience"
        );
    }

    #[test]
    fn discovery_documents_name_an_https_jwks_uri_of_their_issuer() {
        let iss = "https://idp.example.com/realms/prod";
        let doc = |v: Value| v.to_string().into_bytes();
        // Success: an https URL (on the issuer's host or elsewhere); `issuer` may be absent.
        assert_eq!(
            parse_discovery(
                &doc(
                    json!({"issuer": iss, "jwks_uri": "https://idp.example.com/certs",
                    "authorization_endpoint": "https://idp.example.com/auth"})
                ),
                iss,
                false
            ),
            Ok("https://idp.example.com/certs".into())
        );
        assert_eq!(
            parse_discovery(
                &doc(json!({"jwks_uri": "https://keys.example.net/k"})),
                iss,
                false
            ),
            Ok("https://keys.example.net/k".into())
        );
        // Loopback http, only from a loopback document.
        assert_eq!(
            parse_discovery(
                &doc(json!({"jwks_uri": "http://127.0.0.1:9/jwks"})),
                iss,
                true
            ),
            Ok("http://127.0.0.1:9/jwks".into())
        );
        let refused = |v: Value, from_loopback: bool| {
            parse_discovery(&doc(v), iss, from_loopback).unwrap_err()
        };
        // Not https.
        for (u, lo) in [
            ("http://idp.example.com/certs", false),
            ("http://idp.example.com/certs", true),
            ("http://127.0.0.1:9/jwks", false),
            ("ftp://idp.example.com/certs", false),
            ("file:///etc/keys.json", true),
        ] {
            let e = refused(json!({"jwks_uri": u}), lo);
            assert!(
                e.contains("is refused: keys must come from an https URL"),
                "{u}: {e}"
            );
        }
        // No `jwks_uri`, or not a string / URL.
        for v in [
            json!({"issuer": iss}),
            json!({"jwks_uri": null}),
            json!({"jwks_uri": ""}),
        ] {
            assert!(
                refused(v.clone(), false).contains("has no `jwks_uri`"),
                "{v}"
            );
        }
        assert!(refused(json!({"jwks_uri": 7}), false).contains("not a URL string"));
        assert!(refused(json!({"jwks_uri": "not a url"}), false).contains("is not a URL"));
        // Another issuer's document, not JSON, not an object.
        let e = refused(
            json!({"issuer": "https://evil.example", "jwks_uri": "https://evil.example/k"}),
            false,
        );
        assert!(e.contains("is for issuer \"https://evil.example\""), "{e}");
        assert!(parse_discovery(b"<html>", iss, false).is_err());
        assert!(parse_discovery(b"[]", iss, false).is_err());
    }

    /// Paths served by [`routed_server`]: status and body each, and the requests each got.
    #[derive(Default)]
    struct Routes {
        docs: HashMap<String, (u16, String)>,
        hits: HashMap<String, u64>,
    }

    impl Routes {
        fn set(&mut self, path: &str, status: u16, body: impl Into<String>) {
            self.docs.insert(path.into(), (status, body.into()));
        }
        fn hits(&self, path: &str) -> u64 {
            self.hits.get(path).copied().unwrap_or(0)
        }
    }

    /// An HTTP server on 127.0.0.1 answering from `routes` (404 elsewhere); its base URL.
    async fn routed_server(routes: Arc<Mutex<Routes>>) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let routes = routes.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&got).into_owned();
                    let path = head.split(' ').nth(1).unwrap_or("").to_owned();
                    let (status, body) = {
                        let mut r = routes.lock();
                        *r.hits.entry(path.clone()).or_default() += 1;
                        r.docs.get(&path).cloned().unwrap_or((404, String::new()))
                    };
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        format!("http://{addr}")
    }

    const DISCOVERY: &str = "/.well-known/openid-configuration";

    /// A verifier of one issuer at `base` (keys by discovery), refreshing every `refresh`.
    fn discovering(base: &str, refresh: Duration) -> Arc<Jwt> {
        let mut cfg = issuer_cfg();
        cfg.issuer = base.to_owned();
        cfg.jwks_refresh = refresh;
        assert!(cfg.discovery_url().is_some());
        Jwt::new(&JwtConfig { issuers: vec![cfg] })
    }

    /// A fresh token of the issuer at `base`, signed by `k`.
    fn token_of(base: &str, k: &EcKey) -> String {
        let now = crate::telemetry::unix_now();
        es256(
            k,
            &with(json!({"iss": base, "iat": now, "exp": now + 300.0})),
        )
    }

    /// Wait until the fetch loop of `v`'s first issuer finished `n` attempts.
    async fn attempts(v: &Jwt, n: u64) {
        let mut done = v.issuers[0].fetch.as_ref().unwrap().done.subscribe();
        tokio::time::timeout(Duration::from_secs(10), done.wait_for(|c| *c >= n))
            .await
            .expect("the fetch loop makes progress")
            .unwrap();
    }

    #[tokio::test]
    async fn discovery_that_fails_is_retried_and_its_tokens_verify_once_it_succeeds() {
        let a = ec_key("a");
        let routes = Arc::new(Mutex::new(Routes::default()));
        let base = routed_server(routes.clone()).await;
        routes.lock().set(DISCOVERY, 500, "{}");
        routes
            .lock()
            .set("/jwks.json", 200, json!({"keys": [a.jwk]}).to_string());
        let v = discovering(&base, Duration::from_secs(300));
        v.start();
        attempts(&v, 1).await;
        // Discovery failed: the issuer has no keys; its tokens are refused, saying why.
        let t = token_of(&base, &a);
        let e = v.verify(&t, crate::telemetry::unix_now()).unwrap_err();
        assert_eq!(e.code(), "keys_unavailable");
        assert!(
            matches!(
                e,
                JwtError::UnknownKey {
                    pending: Some(Pending::Discovery),
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("OIDC discovery"), "{e}");
        assert!(!e.to_string().contains(t.as_str()));
        assert_eq!(v.discovered_jwks_uri(&base), None);
        assert_eq!(routes.lock().hits("/jwks.json"), 0, "nothing to fetch yet");
        // The discovery document appears: the unknown-kid refetch discovers, then fetches.
        routes.lock().set(
            DISCOVERY,
            200,
            json!({"issuer": base, "jwks_uri": format!("{base}/jwks.json")}).to_string(),
        );
        assert!(v.refetch(&base).await, "the refetch finished");
        assert_eq!(
            v.discovered_jwks_uri(&base),
            Some(format!("{base}/jwks.json"))
        );
        let id = v.verify(&t, crate::telemetry::unix_now()).unwrap();
        assert_eq!(id.issuer, base);
        assert_eq!(routes.lock().hits(DISCOVERY), 2);
        assert_eq!(routes.lock().hits("/jwks.json"), 1);
    }

    #[tokio::test]
    async fn an_unknown_kid_discovers_again_and_follows_a_moved_jwks() {
        let (a, b) = (ec_key("a"), ec_key("b"));
        let routes = Arc::new(Mutex::new(Routes::default()));
        let base = routed_server(routes.clone()).await;
        let disc = |path: &str| json!({"jwks_uri": format!("{base}{path}")}).to_string();
        routes.lock().set(DISCOVERY, 200, disc("/a.json"));
        routes
            .lock()
            .set("/a.json", 200, json!({"keys": [a.jwk]}).to_string());
        routes
            .lock()
            .set("/b.json", 200, json!({"keys": [b.jwk]}).to_string());
        let v = discovering(&base, Duration::from_secs(300));
        v.start();
        attempts(&v, 1).await;
        let now = crate::telemetry::unix_now;
        assert!(v.verify(&token_of(&base, &a), now()).is_ok());
        // The issuer moves its JWKS (and rotates): a b token triggers rediscovery.
        routes.lock().set(DISCOVERY, 200, disc("/b.json"));
        let tb = token_of(&base, &b);
        assert_eq!(v.verify(&tb, now()).unwrap_err().code(), "unknown_key");
        assert!(v.refetch(&base).await);
        assert_eq!(v.discovered_jwks_uri(&base), Some(format!("{base}/b.json")));
        assert!(v.verify(&tb, now()).is_ok());
        assert_eq!(routes.lock().hits(DISCOVERY), 2);
        // Rate-limited like the refetch: no second rediscovery within 10 s.
        assert!(!v.refetch(&base).await);
        assert_eq!(routes.lock().hits(DISCOVERY), 2);
    }

    #[tokio::test]
    async fn a_failing_jwks_is_discovered_again_and_a_refused_or_missing_jwks_uri_is_no_key() {
        let a = ec_key("a");
        let routes = Arc::new(Mutex::new(Routes::default()));
        let base = routed_server(routes.clone()).await;
        // A JWKS URL that is not https (nor loopback): refused, never fetched.
        routes.lock().set(
            DISCOVERY,
            200,
            json!({"jwks_uri": "http://192.0.2.1/jwks.json"}).to_string(),
        );
        let v = discovering(&base, Duration::from_millis(100));
        v.start();
        attempts(&v, 2).await;
        let now = crate::telemetry::unix_now;
        assert_eq!(v.discovered_jwks_uri(&base), None);
        assert_eq!(
            v.verify(&token_of(&base, &a), now()).unwrap_err().code(),
            "keys_unavailable"
        );
        // No `jwks_uri` at all: the same.
        routes
            .lock()
            .set(DISCOVERY, 200, json!({"issuer": base}).to_string());
        let seen = routes.lock().hits(DISCOVERY);
        let done = *v.issuers[0].fetch.as_ref().unwrap().done.borrow();
        attempts(&v, done + 2).await;
        assert!(routes.lock().hits(DISCOVERY) > seen);
        assert_eq!(v.discovered_jwks_uri(&base), None);
        assert_eq!(
            v.verify(&token_of(&base, &a), now()).unwrap_err().code(),
            "keys_unavailable"
        );
        // Found, but the JWKS fails: after a few failures in a row, discovered again.
        routes.lock().set(
            DISCOVERY,
            200,
            json!({"jwks_uri": format!("{base}/old.json")}).to_string(),
        );
        routes.lock().set("/old.json", 503, "");
        let old_hits = || routes.lock().hits("/old.json");
        let t0 = Instant::now();
        while old_hits() < 1 + REDISCOVER_AFTER_FAILURES as u64 + 1 {
            assert!(t0.elapsed() < Duration::from_secs(10), "the loop retries");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            v.discovered_jwks_uri(&base),
            Some(format!("{base}/old.json"))
        );
        routes.lock().set(
            DISCOVERY,
            200,
            json!({"jwks_uri": format!("{base}/new.json")}).to_string(),
        );
        routes
            .lock()
            .set("/new.json", 200, json!({"keys": [a.jwk]}).to_string());
        let t0 = Instant::now();
        while v.verify(&token_of(&base, &a), now()).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "rediscovered after failures"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            v.discovered_jwks_uri(&base),
            Some(format!("{base}/new.json"))
        );
        // Once it works, refreshes fetch the JWKS without discovering again.
        let (disc, new) = {
            let r = routes.lock();
            (r.hits(DISCOVERY), r.hits("/new.json"))
        };
        let t0 = Instant::now();
        while routes.lock().hits("/new.json") < new + 3 {
            assert!(t0.elapsed() < Duration::from_secs(10), "refreshes go on");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(routes.lock().hits(DISCOVERY), disc);
    }

    #[tokio::test]
    async fn a_rediscovery_that_fails_keeps_the_jwks_uri_found_before() {
        let (a, b) = (ec_key("a"), ec_key("b"));
        let routes = Arc::new(Mutex::new(Routes::default()));
        let base = routed_server(routes.clone()).await;
        routes.lock().set(
            DISCOVERY,
            200,
            json!({"jwks_uri": format!("{base}/jwks.json")}).to_string(),
        );
        routes
            .lock()
            .set("/jwks.json", 200, json!({"keys": [a.jwk]}).to_string());
        let v = discovering(&base, Duration::from_secs(300));
        v.start();
        attempts(&v, 1).await;
        routes.lock().set(DISCOVERY, 500, "");
        routes
            .lock()
            .set("/jwks.json", 200, json!({"keys": [b.jwk]}).to_string());
        let now = crate::telemetry::unix_now;
        let tb = token_of(&base, &b);
        assert_eq!(v.verify(&tb, now()).unwrap_err().code(), "unknown_key");
        assert!(v.refetch(&base).await);
        assert_eq!(
            routes.lock().hits(DISCOVERY),
            2,
            "discovery was tried again"
        );
        assert_eq!(
            v.discovered_jwks_uri(&base),
            Some(format!("{base}/jwks.json"))
        );
        assert!(
            v.verify(&tb, now()).is_ok(),
            "the JWKS URL found before was used"
        );
    }

    #[test]
    fn an_issuer_with_a_jwks_uri_or_static_keys_does_not_discover() {
        let mut cfg = issuer_cfg();
        cfg.jwks_uri = Some("https://idp.example.com/certs".into());
        let v = Jwt::new(&JwtConfig {
            issuers: vec![cfg.clone()],
        });
        assert!(matches!(
            v.issuers[0].fetch.as_ref().unwrap().source,
            Source::Configured(_)
        ));
        // Not fetched yet: keys_unavailable, naming the JWKS (not discovery).
        let k = ec_key("k1");
        let e = v.verify(&es256(&k, &good_claims()), NOW).unwrap_err();
        assert_eq!(e.code(), "keys_unavailable");
        assert!(e.to_string().contains("JWKS has not been fetched"), "{e}");
        cfg.jwks_uri = None;
        cfg.public_keys = vec![crate::config::JwtPublicKey {
            kid: None,
            pem: k.pub_pem.clone(),
        }];
        let v = Jwt::new(&JwtConfig { issuers: vec![cfg] });
        assert!(v.issuers[0].fetch.is_none() && v.client.is_none());
        let other = ec_key("k2");
        assert_eq!(
            v.verify(&es256(&other, &good_claims()), NOW)
                .unwrap_err()
                .code(),
            "bad_signature"
        );
    }
}
