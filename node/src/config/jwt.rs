//! `auth.jwt` — and MCP Hangar's `auth.oidc`, read as the same thing: bearer JWTs from trusted
//! issuers, with keys from a JWKS URL or static PEM public keys.
//!
//! Both sections have MCP Hangar's shape: settings at the top are the defaults of every entry
//! of `issuers` (a single issuer may be written at the top alone), with MCP Hangar's key names
//! (`jwks_uri`, `clock_skew_leeway_seconds`, `max_token_lifetime_seconds`, `subject_claim`,
//! `groups_claim`, `tenant_claim`, `require_tenant`, `resource_uri`) and Hangar's shorter
//! spellings accepted too (`jwks_url`, `leeway_s`, `max_lifetime_s`). They differ only in
//! defaults: `auth.oidc` keeps MCP Hangar's (off unless `enabled: true`, 60 s leeway, tokens
//! of at most an hour, tenant in `tenant_id`), so a file written for MCP Hangar means what it
//! meant there; `auth.jwt` is on when present, with 30 s, a day and `tenant`.
//!
//! Keys: an issuer with neither `jwks_uri` nor `public_keys` finds its JWKS URL by OIDC
//! discovery (`<issuer>/.well-known/openid-configuration`, its `jwks_uri`; see
//! [`JwtIssuer::discovery_url`]), which needs the issuer to be an https URL (plain http only
//! to a loopback host), as a `jwks_uri` has to be.
//!
//! Per-tenant audiences (MCP Hangar's `strict_tenant_audience` + `tenant_audiences`, a
//! mapping of tenant → audience or list of audiences, at the top or per issuer like every
//! other field): with `strict_tenant_audience: true` a token must name a tenant that is a key
//! of `tenant_audiences`, and its `aud` must name one of that tenant's audiences — instead of
//! the issuer's `audience` (which is then optional and not used, nor is `resource_uri`); a
//! tenant absent from the map is refused. Without `strict_tenant_audience`, a tenant's
//! audiences are accepted *in addition to* the issuer's `audience` for tokens of that tenant
//! (a tenant absent from the map gets the issuer's audiences only): the map can only widen
//! what a tenant's tokens may carry, never narrow what the issuer accepts; narrowing is what
//! `strict_tenant_audience` is for.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Serialize;
use serde_json::Value;

use super::reader::{Obj, type_name};

/// `auth.jwt` / `auth.oidc`: who may present a bearer JWT.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JwtConfig {
    /// Trusted issuers (at least one), each with its own keys and claim names.
    pub issuers: Vec<JwtIssuer>,
}

/// One trusted issuer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JwtIssuer {
    /// The `iss` its tokens carry (exactly).
    pub issuer: String,
    /// Accepted `aud` values: a token must name at least one.
    pub audiences: Vec<String>,
    /// Where its signing keys are published (JWKS), if anywhere.
    pub jwks_uri: Option<String>,
    /// How often the JWKS is fetched again (besides on an unknown `kid`).
    pub jwks_refresh: Duration,
    /// Static public keys (PEM), besides or instead of a JWKS.
    pub public_keys: Vec<JwtPublicKey>,
    /// Signature algorithms accepted (asymmetric only; never `none` or HMAC).
    pub algorithms: Vec<Algorithm>,
    /// Clock skew allowed on `exp`, `nbf` and `iat`.
    pub leeway: Duration,
    /// Longest accepted token lifetime (`exp - iat`, and `exp - now`); `None`: no limit.
    pub max_lifetime: Option<Duration>,
    /// The claim naming the principal.
    pub subject_claim: String,
    /// The claim listing the caller's groups.
    pub groups_claim: String,
    /// The claim naming the caller's tenant.
    pub tenant_claim: String,
    /// Refuse a token without a tenant.
    pub require_tenant: bool,
    /// Group name → Hangar roles granted to members of that group.
    pub group_roles: BTreeMap<String, Vec<String>>,
    /// Bind each tenant's tokens to that tenant's audiences: the tenant claim is required and
    /// must be a key of `tenant_audiences`, and `aud` must name one of its audiences
    /// (`audiences` is not used then).
    pub strict_tenant_audience: bool,
    /// Tenant → its audiences. Strict: the only audiences its tokens are accepted with;
    /// otherwise accepted for its tokens besides `audiences`.
    pub tenant_audiences: BTreeMap<String, Vec<String>>,
}

impl JwtIssuer {
    /// Where OIDC discovery finds this issuer's JWKS URL: `<issuer>/.well-known/openid-configuration`,
    /// when it has neither `jwks_uri` nor `public_keys` (`None` otherwise).
    pub fn discovery_url(&self) -> Option<String> {
        (self.jwks_uri.is_none() && self.public_keys.is_empty()).then(|| {
            format!(
                "{}/.well-known/openid-configuration",
                self.issuer.trim_end_matches('/')
            )
        })
    }
}

/// A static public key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JwtPublicKey {
    /// The `kid` tokens signed with it carry (`None`: any token without a matching `kid`).
    pub kid: Option<String>,
    /// SPKI (`PUBLIC KEY`) or PKCS#1 (`RSA PUBLIC KEY`) PEM.
    pub pem: String,
}

/// Which section is being read (they differ only in defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Section {
    /// `auth.jwt`.
    Jwt,
    /// `auth.oidc` (MCP Hangar's defaults).
    Oidc,
}

struct Defaults {
    enabled: bool,
    leeway_s: u64,
    max_lifetime_s: u64,
    tenant_claim: &'static str,
}

impl Section {
    fn defaults(self) -> Defaults {
        match self {
            Section::Jwt => Defaults {
                enabled: true,
                leeway_s: 30,
                max_lifetime_s: 86_400,
                tenant_claim: "tenant",
            },
            Section::Oidc => Defaults {
                enabled: false,
                leeway_s: 60,
                max_lifetime_s: 3600,
                tenant_claim: "tenant_id",
            },
        }
    }
}

/// Default JWKS refresh period (seconds).
const DEFAULT_REFRESH_S: u64 = 300;
/// Default algorithms.
const DEFAULT_ALGORITHMS: &[Algorithm] = &[Algorithm::RS256, Algorithm::ES256];

/// Keys of one issuer (at the top of the section: the defaults of every issuer).
const ISSUER_KEYS: &[&str] = &[
    "issuer",
    "audience",
    "jwks_uri",
    "jwks_url",
    "jwks_refresh_s",
    "public_keys",
    "algorithms",
    "clock_skew_leeway_seconds",
    "leeway_s",
    "max_token_lifetime_seconds",
    "max_lifetime_s",
    "subject_claim",
    "groups_claim",
    "tenant_claim",
    "email_claim",
    "client_id",
    "require_tenant",
    "group_roles",
    "strict_tenant_audience",
    "tenant_audiences",
];

/// What one mapping says (absent keys: `None`, inherited from the top or defaulted).
#[derive(Default, Clone)]
struct Fields {
    issuer: Option<String>,
    audiences: Option<Vec<String>>,
    jwks_uri: Option<String>,
    jwks_refresh_s: Option<u64>,
    public_keys: Option<Vec<JwtPublicKey>>,
    algorithms: Option<Vec<Algorithm>>,
    leeway_s: Option<u64>,
    max_lifetime_s: Option<u64>,
    subject_claim: Option<String>,
    groups_claim: Option<String>,
    tenant_claim: Option<String>,
    require_tenant: Option<bool>,
    group_roles: Option<BTreeMap<String, Vec<String>>>,
    strict_tenant_audience: Option<bool>,
    tenant_audiences: Option<BTreeMap<String, Vec<String>>>,
}

impl Fields {
    /// This mapping's values, over `base` (the section's top).
    fn over(self, base: &Fields) -> Fields {
        let b = base.clone();
        Fields {
            // Each entry names its own issuer.
            issuer: self.issuer,
            audiences: self.audiences.or(b.audiences),
            jwks_uri: self.jwks_uri.or(b.jwks_uri),
            jwks_refresh_s: self.jwks_refresh_s.or(b.jwks_refresh_s),
            public_keys: self.public_keys.or(b.public_keys),
            algorithms: self.algorithms.or(b.algorithms),
            leeway_s: self.leeway_s.or(b.leeway_s),
            max_lifetime_s: self.max_lifetime_s.or(b.max_lifetime_s),
            subject_claim: self.subject_claim.or(b.subject_claim),
            groups_claim: self.groups_claim.or(b.groups_claim),
            tenant_claim: self.tenant_claim.or(b.tenant_claim),
            require_tenant: self.require_tenant.or(b.require_tenant),
            group_roles: self.group_roles.or(b.group_roles),
            strict_tenant_audience: self.strict_tenant_audience.or(b.strict_tenant_audience),
            tenant_audiences: self.tenant_audiences.or(b.tenant_audiences),
        }
    }
}

/// Read `auth.jwt` or `auth.oidc`; `None` when it is disabled (problems are still reported).
pub(super) fn parse(o: &Obj<'_>, section: Section) -> Option<JwtConfig> {
    let d = section.defaults();
    o.allow(ISSUER_KEYS);
    let enabled = o.bool("enabled", d.enabled);
    let resource_uri = o.str("resource_uri").filter(|s| !s.trim().is_empty());
    let top = fields(o);
    let mut issuers = Vec::new();
    match o.raw("issuers") {
        Some(Value::Array(items)) if !items.is_empty() => {
            for (i, item) in items.iter().enumerate() {
                let path = format!("{}[{i}]", o.at("issuers"));
                let Some(io) = Obj::new(item, &path, o.p) else {
                    continue;
                };
                io.allow(ISSUER_KEYS);
                let f = fields(&io).over(&top);
                if let Some(is) = resolve(&io, f, &d, resource_uri.as_deref()) {
                    issuers.push(is);
                }
                io.finish();
            }
        }
        Some(Value::Array(_)) | None => {
            if top.issuer.is_some() {
                if let Some(is) = resolve(o, top.clone(), &d, resource_uri.as_deref()) {
                    issuers.push(is);
                }
            } else {
                o.p.push(
                    &o.at("issuers"),
                    "is required: list the trusted issuers, e.g. [{issuer: https://idp.example.com/realms/prod, audience: hangar, jwks_uri: https://idp.example.com/realms/prod/protocol/openid-connect/certs}]",
                );
            }
        }
        Some(other) => o.p.push(
            &o.at("issuers"),
            format!(
                "must be a list of issuers ({{issuer, audience, jwks_uri | public_keys, …}}), got {}",
                type_name(other)
            ),
        ),
    }
    for (i, a) in issuers.iter().enumerate() {
        if issuers[..i].iter().any(|b| b.issuer == a.issuer) {
            o.p.push(
                &format!("{}[{i}].issuer", o.at("issuers")),
                format!("issuer {:?} is listed twice", a.issuer),
            );
        }
    }
    o.finish();
    (enabled && !issuers.is_empty()).then_some(JwtConfig { issuers })
}

/// Which of two spellings of one setting is used (both: a problem).
fn spelling(o: &Obj<'_>, canonical: &'static str, alias: &'static str) -> &'static str {
    if o.has(canonical) && o.has(alias) {
        o.p.push(
            &o.at(alias),
            format!("is another spelling of `{canonical}`, which is set too; keep one"),
        );
    }
    if o.has(alias) { alias } else { canonical }
}

/// Read the issuer settings present in `o`.
fn fields(o: &Obj<'_>) -> Fields {
    let mut f = Fields {
        issuer: o.str("issuer"),
        ..Fields::default()
    };
    if let Some(iss) = &f.issuer
        && iss.trim().is_empty()
    {
        o.p.push(&o.at("issuer"), "must not be empty");
    }
    f.audiences = match o.raw("audience") {
        None => None,
        Some(Value::String(s)) => Some(vec![s.clone()]),
        Some(Value::Array(_)) => o.str_list("audience"),
        Some(other) => {
            o.p.push(
                &o.at("audience"),
                format!(
                    "must be a string or a list of strings, got {}",
                    type_name(other)
                ),
            );
            None
        }
    };
    if f.audiences
        .as_ref()
        .is_some_and(|a| a.is_empty() || a.iter().any(|s| s.trim().is_empty()))
    {
        o.p.push(
            &o.at("audience"),
            "must name at least one non-empty audience",
        );
    }
    let key = spelling(o, "jwks_uri", "jwks_url");
    f.jwks_uri = o.str(key);
    if let Some(u) = &f.jwks_uri
        && let Some(problem) = jwks_uri_problem(u)
    {
        o.p.push(&o.at(key), problem);
    }
    if o.has("jwks_refresh_s") {
        f.jwks_refresh_s = Some(o.int("jwks_refresh_s", DEFAULT_REFRESH_S, 10, 86_400));
    }
    f.public_keys = public_keys(o);
    f.algorithms = algorithms(o);
    let key = spelling(o, "clock_skew_leeway_seconds", "leeway_s");
    if o.has(key) {
        f.leeway_s = Some(o.int(key, 0, 0, 600));
    }
    let key = spelling(o, "max_token_lifetime_seconds", "max_lifetime_s");
    if o.has(key) {
        f.max_lifetime_s = Some(o.int(key, 0, 0, 31_536_000));
    }
    for (key, slot) in [
        ("subject_claim", &mut f.subject_claim),
        ("groups_claim", &mut f.groups_claim),
        ("tenant_claim", &mut f.tenant_claim),
    ] {
        *slot = o.str(key);
        if slot.as_ref().is_some_and(|s| s.trim().is_empty()) {
            o.p.push(&o.at(key), "must name a claim");
        }
    }
    if o.has("require_tenant") {
        f.require_tenant = Some(o.bool("require_tenant", false));
    }
    f.group_roles = group_roles(o);
    // Accepted for MCP Hangar files; nothing here depends on them.
    let _ = (o.str("client_id"), o.str("email_claim"));
    if o.has("strict_tenant_audience") {
        f.strict_tenant_audience = Some(o.bool("strict_tenant_audience", false));
    }
    f.tenant_audiences = tenant_audiences(o);
    f
}

/// An issuer's settings with defaults, or `None` (and problems) when it is incomplete.
fn resolve(o: &Obj<'_>, f: Fields, d: &Defaults, resource_uri: Option<&str>) -> Option<JwtIssuer> {
    let issuer = f.issuer.filter(|s| !s.trim().is_empty());
    if issuer.is_none() && !o.has("issuer") {
        o.p.push(
            &o.at("issuer"),
            "is required (the exact `iss` this issuer's tokens carry)",
        );
    }
    let strict = f.strict_tenant_audience.unwrap_or(false);
    let tenant_audiences = f.tenant_audiences.unwrap_or_default();
    if strict && tenant_audiences.is_empty() {
        o.p.push(
            &o.at("tenant_audiences"),
            "is required with `strict_tenant_audience: true`: map each tenant to its audience(s), e.g. {acme: https://hangar.example.com/acme} (a tenant absent from it is refused)",
        );
    }
    // MCP Hangar: `resource_uri`, when set, is the audience of every issuer (RFC 8707).
    let audiences = match resource_uri {
        Some(r) => Some(vec![r.to_owned()]),
        // Strict: the tenant's audiences are checked instead.
        None if strict => Some(f.audiences.unwrap_or_default()),
        None => f.audiences,
    };
    if audiences.is_none() {
        o.p.push(
            &o.at("audience"),
            "is required (the `aud` tokens for this Hangar carry; or set resource_uri)",
        );
    }
    let public_keys = f.public_keys.unwrap_or_default();
    if f.jwks_uri.is_none()
        && public_keys.is_empty()
        && let Some(iss) = &issuer
        && let Some(problem) = discovery_issuer_problem(iss)
    {
        o.p.push(&o.at("issuer"), problem);
    }
    let max_lifetime_s = f.max_lifetime_s.unwrap_or(d.max_lifetime_s);
    Some(JwtIssuer {
        issuer: issuer?,
        audiences: audiences?,
        jwks_uri: f.jwks_uri,
        jwks_refresh: Duration::from_secs(f.jwks_refresh_s.unwrap_or(DEFAULT_REFRESH_S)),
        public_keys,
        algorithms: f.algorithms.unwrap_or_else(|| DEFAULT_ALGORITHMS.to_vec()),
        leeway: Duration::from_secs(f.leeway_s.unwrap_or(d.leeway_s)),
        max_lifetime: (max_lifetime_s > 0).then(|| Duration::from_secs(max_lifetime_s)),
        subject_claim: f.subject_claim.unwrap_or_else(|| "sub".to_owned()),
        groups_claim: f.groups_claim.unwrap_or_else(|| "groups".to_owned()),
        tenant_claim: f.tenant_claim.unwrap_or_else(|| d.tenant_claim.to_owned()),
        require_tenant: f.require_tenant.unwrap_or(false),
        group_roles: f.group_roles.unwrap_or_default(),
        strict_tenant_audience: strict,
        tenant_audiences,
    })
}

/// Why `issuer` cannot be where its keys are discovered (no `jwks_uri`, no `public_keys`), if
/// it cannot: discovery fetches `<issuer>/.well-known/openid-configuration`, so the issuer
/// must be an https URL (plain http only to a loopback host), without query or fragment.
fn discovery_issuer_problem(issuer: &str) -> Option<String> {
    const NO_KEYS: &str = "has neither `jwks_uri` nor `public_keys`, so its keys are found by OIDC discovery (<issuer>/.well-known/openid-configuration)";
    let url = match reqwest::Url::parse(issuer) {
        Ok(url) => url,
        Err(_) => {
            return Some(format!(
                "{NO_KEYS}, which needs the issuer to be an https:// URL: give `jwks_uri` (the issuer's JWKS) or `public_keys` (PEM)"
            ));
        }
    };
    if url.query().is_some() || url.fragment().is_some() {
        return Some(format!(
            "{NO_KEYS}, which needs an issuer URL without query or fragment: give `jwks_uri` or `public_keys`"
        ));
    }
    match url.scheme() {
        "https" => None,
        "http" if is_loopback(&url) => None,
        "http" => Some(format!(
            "{NO_KEYS}, which must be https: a discovery document fetched over plain http from {} could be replaced by anyone on the path (http is accepted for loopback addresses only); give an https issuer, `jwks_uri` or `public_keys`",
            url.host_str().unwrap_or("?")
        )),
        other => Some(format!(
            "{NO_KEYS}, which needs an https:// issuer URL, got `{other}:`; give `jwks_uri` or `public_keys`"
        )),
    }
}

/// Why `u` cannot be a JWKS URL, if it cannot: http(s) only, and plain http only to a
/// loopback host (keys fetched in the clear could be swapped by anyone on the path).
fn jwks_uri_problem(u: &str) -> Option<String> {
    let url = match reqwest::Url::parse(u) {
        Ok(url) => url,
        Err(e) => return Some(format!("is not a URL ({e})")),
    };
    match url.scheme() {
        "https" => None,
        "http" if is_loopback(&url) => None,
        "http" => Some(format!(
            "must be https: keys fetched over plain http from {} could be replaced by anyone on the path (http is accepted for loopback addresses only)",
            url.host_str().unwrap_or("?")
        )),
        other => Some(format!("must be an https:// URL, got `{other}:`")),
    }
}

/// Whether `url` points at this machine.
pub fn is_loopback(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `public_keys`: PEM strings or `{kid, pem}` mappings.
fn public_keys(o: &Obj<'_>) -> Option<Vec<JwtPublicKey>> {
    let v = o.raw("public_keys")?;
    let Value::Array(items) = v else {
        o.p.push(
            &o.at("public_keys"),
            format!(
                "must be a list of PEM public keys (or {{kid, pem}} mappings), got {}",
                type_name(v)
            ),
        );
        return None;
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let path = format!("{}[{i}]", o.at("public_keys"));
        let key = match item {
            Value::String(pem) => Some(JwtPublicKey {
                kid: None,
                pem: pem.clone(),
            }),
            Value::Object(_) => Obj::new(item, &path, o.p).and_then(|k| {
                let kid = k.str("kid");
                let pem = k.req_str("pem", "the key, PEM");
                k.finish();
                Some(JwtPublicKey { kid, pem: pem? })
            }),
            other => {
                o.p.push(
                    &path,
                    format!(
                        "must be a PEM public key or {{kid, pem}}, got {}",
                        type_name(other)
                    ),
                );
                None
            }
        };
        let Some(key) = key else { continue };
        if public_key(&key.pem).is_none() {
            o.p.push(
                &path,
                "is not a PEM public key (RSA, EC P-256/P-384 or Ed25519; `-----BEGIN PUBLIC KEY-----`)",
            );
            continue;
        }
        out.push(key);
    }
    Some(out)
}

/// The key family of a PEM public key (`RSA`, `EC`, `OKP`) and its decoding key.
pub fn public_key(pem: &str) -> Option<(&'static str, DecodingKey)> {
    let pem = pem.trim().as_bytes();
    if pem.windows(7).any(|w| w == b"PRIVATE") {
        return None;
    }
    if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
        return Some(("RSA", k));
    }
    if let Ok(k) = DecodingKey::from_ec_pem(pem) {
        return Some(("EC", k));
    }
    DecodingKey::from_ed_pem(pem).ok().map(|k| ("OKP", k))
}

/// `algorithms`: asymmetric JWS algorithms only.
fn algorithms(o: &Obj<'_>) -> Option<Vec<Algorithm>> {
    let names = o.str_list("algorithms")?;
    let mut out = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let path = format!("{}[{i}]", o.at("algorithms"));
        match Algorithm::from_str(name) {
            _ if name.eq_ignore_ascii_case("none") => o.p.push(
                &path,
                "`none` (unsigned tokens) is never accepted: anyone could write one",
            ),
            Ok(Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) => o.p.push(
                &path,
                format!(
                    "{name} is refused: with a shared secret every party that can check a token can also mint one; use the issuer's asymmetric keys (RS256, ES256, …)"
                ),
            ),
            Ok(a) => {
                if !out.contains(&a) {
                    out.push(a);
                }
            }
            Err(_) => o.p.push(
                &path,
                format!(
                    "unknown algorithm `{name}`: use RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384 or EdDSA"
                ),
            ),
        }
    }
    if names.is_empty() {
        o.p.push(&o.at("algorithms"), "must list at least one algorithm");
    }
    Some(out)
}

/// `group_roles`: group name → a role or a list of roles.
fn group_roles(o: &Obj<'_>) -> Option<BTreeMap<String, Vec<String>>> {
    let v = o.raw("group_roles")?;
    let Value::Object(m) = v else {
        o.p.push(
            &o.at("group_roles"),
            format!(
                "must be a mapping of group names to roles (e.g. {{platform-admins: admin}}), got {}",
                type_name(v)
            ),
        );
        return None;
    };
    let mut out = BTreeMap::new();
    for (group, roles) in m {
        let path = format!("{}.{group}", o.at("group_roles"));
        let roles: Vec<String> = match roles {
            Value::String(r) => vec![r.clone()],
            Value::Array(items) if items.iter().all(Value::is_string) => items
                .iter()
                .filter_map(|r| r.as_str().map(str::to_owned))
                .collect(),
            other => {
                o.p.push(
                    &path,
                    format!(
                        "must be a role name or a list of role names, got {}",
                        type_name(other)
                    ),
                );
                continue;
            }
        };
        if roles.iter().any(|r| r.trim().is_empty()) || roles.is_empty() {
            o.p.push(&path, "must name at least one role");
            continue;
        }
        out.insert(group.clone(), roles);
    }
    Some(out)
}

/// `tenant_audiences`: tenant → an audience or a list of audiences (non-empty strings).
fn tenant_audiences(o: &Obj<'_>) -> Option<BTreeMap<String, Vec<String>>> {
    let v = o.raw("tenant_audiences")?;
    let Value::Object(m) = v else {
        o.p.push(
            &o.at("tenant_audiences"),
            format!(
                "must be a mapping of tenants to audiences (e.g. {{acme: https://hangar.example.com/acme, globex: [a, b]}}), got {}",
                type_name(v)
            ),
        );
        return None;
    };
    let mut out = BTreeMap::new();
    for (tenant, auds) in m {
        let path = format!("{}.{tenant}", o.at("tenant_audiences"));
        if tenant.trim().is_empty() {
            o.p.push(&path, "a tenant name must not be empty");
            continue;
        }
        let auds: Vec<String> = match auds {
            Value::String(a) => vec![a.clone()],
            Value::Array(items) if items.iter().all(Value::is_string) => items
                .iter()
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect(),
            other => {
                o.p.push(
                    &path,
                    format!(
                        "must be an audience or a list of audiences, got {}",
                        type_name(other)
                    ),
                );
                continue;
            }
        };
        if auds.is_empty() || auds.iter().any(|a| a.trim().is_empty()) {
            o.p.push(&path, "must name at least one non-empty audience");
            continue;
        }
        out.insert(tenant.clone(), auds);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::super::{ConfigError, load_str};
    use super::*;

    const PUB: &str = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEEVs/o5+uQbTjL3chynL4wXgUg2R9\nq9UU8I5mEovUf86QZ7kOBIjJwqnzD1omageEHWwHdBO6B+dFabmdT9POxg==\n-----END PUBLIC KEY-----\n";

    fn auth_yaml(section: &str) -> String {
        format!("mcp_servers: {{}}\nauth:\n  enabled: true\n{section}")
    }

    fn load(section: &str) -> Result<super::super::Config, ConfigError> {
        load_str(&auth_yaml(section), &|_| None)
    }

    fn problems(section: &str) -> Vec<String> {
        match load(section) {
            Err(ConfigError::Invalid { problems }) => {
                problems.iter().map(ToString::to_string).collect()
            }
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn jwt_issuers_with_defaults_and_both_spellings() {
        let c = load(
            "  jwt:\n    issuers:\n      - issuer: https://idp.example.com\n        audience: hangar\n        jwks_url: https://idp.example.com/jwks.json\n        group_roles: {platform-admins: admin, readers: [viewer, auditor]}\n",
        )
        .unwrap();
        let jwt = c.auth.jwt.unwrap();
        let is = &jwt.issuers[0];
        assert_eq!(is.issuer, "https://idp.example.com");
        assert_eq!(is.audiences, vec!["hangar".to_owned()]);
        assert_eq!(
            is.jwks_uri.as_deref(),
            Some("https://idp.example.com/jwks.json")
        );
        assert_eq!(is.algorithms, vec![Algorithm::RS256, Algorithm::ES256]);
        assert_eq!(is.leeway, Duration::from_secs(30));
        assert_eq!(is.max_lifetime, Some(Duration::from_secs(86_400)));
        assert_eq!(is.jwks_refresh, Duration::from_secs(300));
        assert_eq!(
            (
                is.subject_claim.as_str(),
                is.groups_claim.as_str(),
                is.tenant_claim.as_str()
            ),
            ("sub", "groups", "tenant")
        );
        assert_eq!(is.group_roles["platform-admins"], vec!["admin".to_owned()]);
        assert_eq!(is.group_roles["readers"].len(), 2);
        // Top-level settings are every issuer's defaults; Hangar's short names work too.
        let c = load(&format!(
            "  jwt:\n    leeway_s: 5\n    max_lifetime_s: 0\n    algorithms: [ES384]\n    issuers:\n      - {{issuer: a, audience: [x, y], public_keys: [{pub_}]}}\n      - {{issuer: b, audience: z, clock_skew_leeway_seconds: 7, public_keys: [{{kid: k1, pem: {pub_}}}], jwks_uri: \"http://127.0.0.1:9/jwks\", jwks_refresh_s: 60}}\n",
            pub_ = serde_json::to_string(PUB).unwrap()
        ))
        .unwrap();
        let jwt = c.auth.jwt.unwrap();
        assert_eq!(jwt.issuers[0].leeway, Duration::from_secs(5));
        assert_eq!(jwt.issuers[0].max_lifetime, None, "0: no cap");
        assert_eq!(jwt.issuers[0].algorithms, vec![Algorithm::ES384]);
        assert_eq!(jwt.issuers[0].audiences.len(), 2);
        assert_eq!(jwt.issuers[1].leeway, Duration::from_secs(7));
        assert_eq!(jwt.issuers[1].public_keys[0].kid.as_deref(), Some("k1"));
        assert_eq!(jwt.issuers[1].jwks_refresh, Duration::from_secs(60));
        // JWT alone is an authenticator.
        assert!(
            load("  api_key: {enabled: false}\n  jwt: {issuer: a, audience: b, jwks_uri: \"https://a/jwks\"}\n")
                .is_ok()
        );
    }

    #[test]
    fn mcp_hangars_oidc_section_means_the_same_with_its_defaults() {
        let c = load(
            "  oidc:\n    enabled: true\n    resource_uri: https://hangar.example.com\n    require_tenant: true\n    client_id: hangar\n    issuers:\n      - issuer: https://idp.example.com/realms/prod\n        audience: https://hangar.example.com\n        jwks_uri: https://idp.example.com/realms/prod/protocol/openid-connect/certs\n",
        )
        .unwrap();
        let is = &c.auth.jwt.unwrap().issuers[0];
        assert_eq!(is.audiences, vec!["https://hangar.example.com".to_owned()]);
        assert!(is.require_tenant);
        assert_eq!(is.tenant_claim, "tenant_id");
        assert_eq!(is.leeway, Duration::from_secs(60));
        assert_eq!(is.max_lifetime, Some(Duration::from_secs(3600)));
        // The legacy single issuer at the top; off unless enabled (as in MCP Hangar).
        let off = "  oidc: {issuer: a, audience: b, jwks_uri: \"https://a/certs\"}\n";
        assert_eq!(load(off).unwrap().auth.jwt, None);
        let on = "  oidc: {enabled: true, issuer: a, audience: b, jwks_uri: \"https://a/certs\"}\n";
        assert_eq!(load(on).unwrap().auth.jwt.unwrap().issuers[0].issuer, "a");
    }

    #[test]
    fn problems_name_their_path() {
        let cases: &[(&str, &str)] = &[
            (
                "  jwt:\n    issuers: [{issuer: a, audience: b, jwks_uri: \"http://idp.example.com/jwks\"}]\n",
                "auth.jwt.issuers[0].jwks_uri: must be https",
            ),
            (
                "  jwt:\n    issuers: [{issuer: a, audience: b, jwks_url: \"ftp://idp/jwks\"}]\n",
                "auth.jwt.issuers[0].jwks_url: must be an https:// URL",
            ),
            (
                "  jwt:\n    issuers: [{issuer: a, audience: b, jwks_uri: \"https://a/j\", algorithms: [ES256, none]}]\n",
                "auth.jwt.issuers[0].algorithms[1]: `none`",
            ),
            (
                "  jwt:\n    issuers: [{issuer: a, audience: b, jwks_uri: \"https://a/j\", algorithms: [HS256]}]\n",
                "auth.jwt.issuers[0].algorithms[0]: HS256 is refused",
            ),
            (
                "  jwt:\n    issuers: [{issuer: a, audience: b, jwks_uri: \"https://a/j\", algorithms: [XS1]}]\n",
                "auth.jwt.issuers[0].algorithms[0]: unknown algorithm",
            ),
            (
                "  jwt:\n    issuers: [{audience: b, jwks_uri: \"https://a/j\"}]\n",
                "auth.jwt.issuers[0].issuer: is required",
            ),
            (
                "  jwt:\n    issuers: [{issuer: a, jwks_uri: \"https://a/j\"}]\n",
                "auth.jwt.issuers[0].audience: is required",
            ),
            (
                "  jwt:\n    issuers: [{issuer: a, audience: b}]\n",
                "auth.jwt.issuers[0].issuer: has neither `jwks_uri` nor `public_keys`, so its keys are found by OIDC discovery",
            ),
            (
                "  jwt:\n    issuers: [{issuer: \"http://idp.example.com/realms/x\", audience: b}]\n",
                "auth.jwt.issuers[0].issuer: has neither `jwks_uri` nor `public_keys`, so its keys are found by OIDC discovery (<issuer>/.well-known/openid-configuration), which must be https",
            ),
            (
                "  jwt:\n    issuers: [{issuer: \"https://idp.example.com/?realm=x\", audience: b}]\n",
                "auth.jwt.issuers[0].issuer: has neither `jwks_uri` nor `public_keys`, so its keys are found by OIDC discovery (<issuer>/.well-known/openid-configuration), which needs an issuer URL without query",
            ),
            (
                "  jwt:\n    issuers: [{issuer: a, audience: b, public_keys: [\"not a key\"]}]\n",
                "auth.jwt.issuers[0].public_keys[0]: is not a PEM public key",
            ),
            (
                "  jwt:\n    issuers: [{issuer: a, audience: b, jwks_uri: \"https://a/j\"}, {issuer: a, audience: c, jwks_uri: \"https://a/j\"}]\n",
                "auth.jwt.issuers[1].issuer: issuer \"a\" is listed twice",
            ),
            (
                "  jwt:\n    issuers: [{issuer: a, audience: b, jwks_uri: \"https://a/j\", jwks_url: \"https://a/j\"}]\n",
                "auth.jwt.issuers[0].jwks_url: is another spelling of `jwks_uri`",
            ),
            (
                "  jwt:\n    issuers: [{issuer: a, audience: b, jwks_uri: \"https://a/j\", group_roles: {g: {x: 1}}}]\n",
                "auth.jwt.issuers[0].group_roles.g: must be a role name",
            ),
            (
                "  jwt:\n    issuers: [{issuer: a, audience: b, jwks_uri: \"https://a/j\", leeway_s: 5000}]\n",
                "auth.jwt.issuers[0].leeway_s: must be between 0 and 600",
            ),
            (
                "  jwt:\n    issuers: [{issuer: a, audience: b, jwks_uri: \"https://a/j\", shoe_size: 5}]\n",
                "auth.jwt.issuers[0].shoe_size: unknown key",
            ),
            (
                "  oidc:\n    enabled: true\n    strict_tenant_audience: true\n    issuers: [{issuer: a, audience: b, jwks_uri: \"https://a/j\"}]\n",
                "auth.oidc.issuers[0].tenant_audiences: is required with `strict_tenant_audience: true`",
            ),
            (
                "  jwt: {issuer: a, audience: b, jwks_uri: \"https://a/j\", strict_tenant_audience: true, tenant_audiences: {}}\n",
                "auth.jwt.tenant_audiences: is required with `strict_tenant_audience: true`",
            ),
            (
                "  jwt: {issuer: a, audience: b, jwks_uri: \"https://a/j\", strict_tenant_audience: maybe, tenant_audiences: {t: x}}\n",
                "auth.jwt.strict_tenant_audience: must be true or false",
            ),
            (
                "  jwt: {issuer: a, audience: b, jwks_uri: \"https://a/j\", tenant_audiences: [x]}\n",
                "auth.jwt.tenant_audiences: must be a mapping of tenants to audiences",
            ),
            (
                "  jwt: {issuer: a, audience: b, jwks_uri: \"https://a/j\", tenant_audiences: {acme: \"\"}}\n",
                "auth.jwt.tenant_audiences.acme: must name at least one non-empty audience",
            ),
            (
                "  jwt: {issuer: a, audience: b, jwks_uri: \"https://a/j\", tenant_audiences: {acme: []}}\n",
                "auth.jwt.tenant_audiences.acme: must name at least one non-empty audience",
            ),
            (
                "  jwt: {issuer: a, audience: b, jwks_uri: \"https://a/j\", tenant_audiences: {acme: [x, 3]}}\n",
                "auth.jwt.tenant_audiences.acme: must be an audience or a list of audiences, got a list",
            ),
            (
                "  jwt: {issuer: a, audience: b, jwks_uri: \"https://a/j\", tenant_audiences: {acme: {x: 1}}}\n",
                "auth.jwt.tenant_audiences.acme: must be an audience or a list of audiences, got a mapping",
            ),
            (
                "  jwt: {issuer: a, jwks_uri: \"https://a/j\", tenant_audiences: {acme: x}}\n",
                "auth.jwt.audience: is required",
            ),
            (
                "  jwt: {issuer: a, audience: b, jwks_uri: \"https://a/j\"}\n  oidc: {issuer: a, audience: b, jwks_uri: \"https://a/j\"}\n",
                "auth.oidc: auth.jwt is set too",
            ),
            ("  jwt: {enabled: true}\n", "auth.jwt.issuers: is required"),
        ];
        for (yaml, want) in cases {
            let p = problems(yaml);
            assert!(p.iter().any(|m| m.starts_with(want)), "{want}\n{p:?}");
        }
        // Loopback http is fine; `localhost` and [::1] too.
        for url in [
            "http://127.0.0.1:8080/jwks",
            "http://localhost/jwks",
            "http://[::1]:9/jwks",
        ] {
            assert!(
                load(&format!(
                    "  jwt: {{issuer: a, audience: b, jwks_uri: \"{url}\"}}\n"
                ))
                .is_ok(),
                "{url}"
            );
        }
    }

    #[test]
    fn an_issuer_without_keys_discovers_them_when_it_is_an_https_url() {
        let c = load("  jwt: {issuer: \"https://idp.example.com/realms/prod/\", audience: b}\n")
            .unwrap();
        let is = &c.auth.jwt.unwrap().issuers[0];
        assert_eq!(is.jwks_uri, None);
        assert!(is.public_keys.is_empty());
        assert_eq!(
            is.discovery_url().as_deref(),
            Some("https://idp.example.com/realms/prod/.well-known/openid-configuration")
        );
        // Loopback http, as for a jwks_uri; in MCP Hangar's section too.
        for issuer in ["http://127.0.0.1:8080", "http://localhost/realms/x"] {
            let c = load(&format!(
                "  oidc: {{enabled: true, issuers: [{{issuer: \"{issuer}\", audience: b}}]}}\n"
            ))
            .unwrap();
            let is = &c.auth.jwt.unwrap().issuers[0];
            assert_eq!(
                is.discovery_url(),
                Some(format!("{issuer}/.well-known/openid-configuration"))
            );
        }
        // With a jwks_uri or static keys, nothing is discovered (and the issuer may be any string).
        let c = load("  jwt: {issuer: a, audience: b, jwks_uri: \"https://a/j\"}\n").unwrap();
        assert_eq!(c.auth.jwt.unwrap().issuers[0].discovery_url(), None);
        let c = load(&format!(
            "  jwt: {{issuer: a, audience: b, public_keys: [{}]}}\n",
            serde_json::to_string(PUB).unwrap()
        ))
        .unwrap();
        assert_eq!(c.auth.jwt.unwrap().issuers[0].discovery_url(), None);
        // Not a URL, another scheme: refused, naming the issuer and the ways out.
        for (issuer, want) in [
            ("acme-idp", "needs the issuer to be an https:// URL"),
            ("ftp://idp.example.com", "got `ftp:`"),
            ("http://10.0.0.1/realms/x", "must be https"),
        ] {
            let p = problems(&format!("  jwt: {{issuer: \"{issuer}\", audience: b}}\n"));
            assert!(
                p.iter()
                    .any(|m| m.starts_with("auth.jwt.issuer: has neither")
                        && m.contains(want)
                        && m.contains("`jwks_uri`")),
                "{issuer}: {p:?}"
            );
        }
    }

    #[test]
    fn tenant_audiences_are_read_and_inherited() {
        let c = load(
            "  oidc:\n    enabled: true\n    strict_tenant_audience: true\n    tenant_audiences: {acme: https://hangar.example.com/acme, globex: [g1, g2]}\n    issuers:\n      - {issuer: a, jwks_uri: \"https://a/j\"}\n      - {issuer: b, audience: hb, jwks_uri: \"https://b/j\", strict_tenant_audience: false, tenant_audiences: {initech: i1}}\n      - {issuer: c, audience: hc, jwks_uri: \"https://c/j\", strict_tenant_audience: false}\n",
        )
        .unwrap();
        let jwt = c.auth.jwt.unwrap();
        let (a, b, cc) = (&jwt.issuers[0], &jwt.issuers[1], &jwt.issuers[2]);
        // Strict: `audience` may be left out (the tenant's audiences are checked instead).
        assert!(a.strict_tenant_audience);
        assert!(a.audiences.is_empty());
        assert_eq!(
            a.tenant_audiences["acme"],
            vec!["https://hangar.example.com/acme".to_owned()]
        );
        assert_eq!(
            a.tenant_audiences["globex"],
            vec!["g1".to_owned(), "g2".to_owned()]
        );
        // Each field is inherited on its own, and overridden on its own.
        assert!(!b.strict_tenant_audience);
        assert_eq!(
            b.tenant_audiences.keys().collect::<Vec<_>>(),
            vec!["initech"]
        );
        assert!(!cc.strict_tenant_audience);
        assert_eq!(cc.tenant_audiences, a.tenant_audiences);
        // Off by default; an empty map without strict is nothing.
        let c = load(
            "  jwt: {issuer: a, audience: b, jwks_uri: \"https://a/j\", tenant_audiences: {}}\n",
        )
        .unwrap();
        let is = &c.auth.jwt.unwrap().issuers[0];
        assert!(!is.strict_tenant_audience && is.tenant_audiences.is_empty());
        // Strict inherited from the top, map missing everywhere: the issuer's entry is named.
        let p = problems(
            "  jwt:\n    strict_tenant_audience: true\n    issuers: [{issuer: a, audience: b, jwks_uri: \"https://a/j\"}]\n",
        );
        assert!(
            p.iter().any(|m| m.starts_with(
                "auth.jwt.issuers[0].tenant_audiences: is required with `strict_tenant_audience: true`"
            )),
            "{p:?}"
        );
    }
}
