//! Authorization: MCP Hangar's roles and permissions, the REST route → permission table
//! (anything not in it is denied), and the MCP method → permission map. Pure decisions; the
//! roles a principal holds come from the replicated state.

use std::collections::{BTreeMap, BTreeSet};

/// A permission, `resource:action` (`*` matches anything in either part).
pub type Permission = &'static str;

/// The six built-in roles and what they may do (MCP Hangar's enforced vocabulary).
pub const BUILTIN_ROLES: &[(&str, &[Permission])] = &[
    ("admin", &["*:*"]),
    (
        "provider-admin",
        &[
            "mcp_servers:read",
            "policy:read",
            "policy:write",
            "group:*",
            "discovery:read",
            "discovery:trigger",
            "discovery:approve",
            "approval:read",
            "approval:resolve",
            "tool:invoke",
            "tool:list",
            "metrics:read",
        ],
    ),
    (
        "developer",
        &[
            "mcp_servers:read",
            "mcp_servers:write",
            "mcp_servers:lifecycle",
            "tool:invoke",
            "tool:list",
            "group:read",
            "group:list",
            "discovery:read",
        ],
    ),
    (
        "viewer",
        &[
            "mcp_servers:read",
            "tool:list",
            "metrics:read",
            "group:read",
            "group:list",
            "discovery:read",
        ],
    ),
    (
        "auditor",
        &[
            "audit:read",
            "metrics:read",
            "approval:read",
            "group:list",
            "discovery:read",
        ],
    ),
    ("service-account", &["tool:invoke", "tool:list"]),
];

/// The permission vocabulary: every resource and its actions (what custom roles may name,
/// besides `*` for either part).
pub const KNOWN_PERMISSIONS: &[(&str, &[&str])] = &[
    ("mcp_servers", &["read", "write", "lifecycle"]),
    ("tool", &["invoke", "list"]),
    ("group", &["create", "read", "update", "delete", "list"]),
    ("policy", &["read", "write"]),
    ("config", &["read", "update", "reload"]),
    ("discovery", &["read", "trigger", "approve"]),
    ("approval", &["read", "resolve"]),
    ("metrics", &["read"]),
    ("audit", &["read"]),
    ("auth", &["manage"]),
    ("cluster", &["manage"]),
];

/// What is wrong with each of `permissions` that is not a known `resource:action` (`*`
/// matching any resource or any action): `(permission, why)`, empty when all are known.
pub fn unknown_permissions<'a>(
    permissions: impl IntoIterator<Item = &'a str>,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in permissions {
        let Some((r, a)) = p.split_once(':') else {
            out.push((p.to_owned(), "not of the form resource:action".to_owned()));
            continue;
        };
        let actions: Vec<&str> = match r {
            "*" => KNOWN_PERMISSIONS
                .iter()
                .flat_map(|(_, a)| a.iter().copied())
                .collect(),
            _ => match KNOWN_PERMISSIONS.iter().find(|(n, _)| *n == r) {
                Some((_, a)) => a.to_vec(),
                None => {
                    out.push((p.to_owned(), format!("unknown resource {r:?}")));
                    continue;
                }
            },
        };
        if a != "*" && !actions.contains(&a) {
            out.push((p.to_owned(), format!("unknown action {a:?} of {r:?}")));
        }
    }
    out
}

/// Every REST route and the permission it needs. `{x}` matches one path segment, `{*x}` the
/// rest. A route not listed here is denied to everyone but nobody: see [`route_permission`].
const ROUTES: &[(&str, &str, Permission)] = &[
    ("GET", "/api/mcp_servers", "mcp_servers:read"),
    ("GET", "/api/mcp_servers/", "mcp_servers:read"),
    ("POST", "/api/mcp_servers/", "mcp_servers:write"),
    ("GET", "/api/mcp_servers/{id}", "mcp_servers:read"),
    ("DELETE", "/api/mcp_servers/{id}", "mcp_servers:write"),
    (
        "POST",
        "/api/mcp_servers/{id}/start",
        "mcp_servers:lifecycle",
    ),
    (
        "POST",
        "/api/mcp_servers/{id}/stop",
        "mcp_servers:lifecycle",
    ),
    ("GET", "/api/mcp_servers/{id}/tools", "mcp_servers:read"),
    ("GET", "/api/mcp_servers/{id}/logs", "mcp_servers:read"),
    ("GET", "/api/tools", "tool:list"),
    ("GET", "/api/tools/", "tool:list"),
    ("GET", "/api/system", "metrics:read"),
    ("GET", "/api/system/", "metrics:read"),
    // Who am I: any authenticated caller.
    ("GET", "/api/system/me", ""),
    ("GET", "/api/groups", "group:list"),
    ("GET", "/api/groups/", "group:list"),
    ("POST", "/api/groups/", "group:create"),
    ("GET", "/api/groups/{id}", "group:read"),
    ("DELETE", "/api/groups/{id}", "group:delete"),
    ("GET", "/api/groups/{id}/members", "group:read"),
    ("POST", "/api/groups/{id}/members", "group:update"),
    (
        "DELETE",
        "/api/groups/{id}/members/{member}",
        "group:update",
    ),
    ("POST", "/api/groups/{id}/rebalance", "group:update"),
    ("POST", "/api/config/reload", "config:reload"),
    ("POST", "/api/config/validate", "config:read"),
    ("POST", "/api/config/diff", "config:read"),
    ("POST", "/api/config/apply", "config:update"),
    ("GET", "/api/config/export", "config:read"),
    ("GET", "/api/auth/keys", "auth:manage"),
    ("POST", "/api/auth/keys", "auth:manage"),
    ("DELETE", "/api/auth/keys/{id}", "auth:manage"),
    ("GET", "/api/auth/roles", "auth:manage"),
    ("POST", "/api/auth/roles", "auth:manage"),
    ("POST", "/api/auth/roles/assign", "auth:manage"),
    ("POST", "/api/auth/roles/revoke", "auth:manage"),
    ("DELETE", "/api/auth/roles/revoke", "auth:manage"),
    ("DELETE", "/api/auth/roles/{name}", "auth:manage"),
    ("GET", "/api/events", "audit:read"),
    ("GET", "/api/rate_limits", "policy:read"),
    ("PUT", "/api/rate_limits/{id}", "policy:write"),
    ("DELETE", "/api/rate_limits/{id}", "policy:write"),
    ("GET", "/api/auth/policies", "policy:read"),
    ("GET", "/api/auth/policies/{scope}/{target}", "policy:read"),
    ("PUT", "/api/auth/policies/{scope}/{target}", "policy:write"),
    (
        "DELETE",
        "/api/auth/policies/{scope}/{target}",
        "policy:write",
    ),
    ("GET", "/api/events/stream", "audit:read"),
    ("GET", "/api/cluster/status", "metrics:read"),
    ("POST", "/api/cluster/init", "cluster:manage"),
    ("POST", "/api/cluster/join", "cluster:manage"),
    ("POST", "/api/cluster/members", "cluster:manage"),
    ("DELETE", "/api/cluster/members/{id}", "cluster:manage"),
    (
        "POST",
        "/api/cluster/members/{id}/promote",
        "cluster:manage",
    ),
    ("POST", "/api/cluster/members/{id}/drain", "cluster:manage"),
    (
        "POST",
        "/api/cluster/members/{id}/undrain",
        "cluster:manage",
    ),
    ("POST", "/api/cluster/transfer-leader", "cluster:manage"),
    ("POST", "/api/cluster/snapshot", "cluster:manage"),
];

/// The permission a REST request needs: `Some("")` = any authenticated caller, `None` = the
/// route is not in the table (denied).
pub fn route_permission(method: &str, path: &str) -> Option<Permission> {
    route(method, path).map(|(_, _, p)| *p)
}

/// The route pattern a REST request matches (e.g. `/api/mcp_servers/{id}/start`), if any: the
/// command kind the command rate limiter counts it under.
pub fn route_pattern(method: &str, path: &str) -> Option<&'static str> {
    route(method, path).map(|(_, pattern, _)| *pattern)
}

/// The entry of the route table a REST request matches.
fn route(method: &str, path: &str) -> Option<&'static (&'static str, &'static str, Permission)> {
    let segs: Vec<&str> = path.split('/').collect();
    ROUTES
        .iter()
        .find(|(m, pattern, _)| *m == method && matches(pattern, &segs))
}

/// The server or group a REST request is about, for scoped grants: the `{id}` of
/// `/api/mcp_servers/{id}…` (`("server", id)`) and `/api/groups/{id}…` (`("group", id)`).
pub fn route_target(path: &str) -> Option<(&'static str, &str)> {
    let mut segs = path.split('/');
    let (Some(""), Some("api"), Some(kind), Some(id)) =
        (segs.next(), segs.next(), segs.next(), segs.next())
    else {
        return None;
    };
    let kind = match kind {
        "mcp_servers" => "server",
        "groups" => "group",
        _ => return None,
    };
    (!id.is_empty()).then_some((kind, id))
}

fn matches(pattern: &str, segs: &[&str]) -> bool {
    let pat: Vec<&str> = pattern.split('/').collect();
    for (i, p) in pat.iter().enumerate() {
        if p.starts_with("{*") {
            return segs.len() > i && !segs[i].is_empty();
        }
        let Some(s) = segs.get(i) else { return false };
        if p.starts_with('{') {
            if s.is_empty() {
                return false;
            }
        } else if p != s {
            return false;
        }
    }
    pat.len() == segs.len()
}

/// The permission an MCP request method needs (`None`: no permission, e.g. `initialize`,
/// `ping`, notifications).
pub fn mcp_permission(method: &str) -> Option<Permission> {
    match method {
        "initialize" | "ping" | "notifications/initialized" | "notifications/cancelled" => None,
        m if m.starts_with("notifications/") => None,
        "tools/call" => Some("tool:invoke"),
        "tools/list" => Some("tool:list"),
        "resources/list"
        | "resources/templates/list"
        | "resources/read"
        | "prompts/list"
        | "prompts/get"
        | "completion/complete"
        | "resources/subscribe"
        | "resources/unsubscribe" => Some("tool:list"),
        "logging/setLevel" => Some("mcp_servers:write"),
        _ => Some("tool:invoke"),
    }
}

/// What a request is about, for role assignments scoped to a server or a group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Target {
    /// Nothing in particular: only global grants count.
    #[default]
    None,
    /// A server, and the groups it is a member of (a group's scope covers its members).
    Server {
        /// Server id.
        id: String,
        /// Ids of the groups it is a member of.
        groups: Vec<String>,
    },
    /// A group.
    Group(String),
}

impl Target {
    /// Whether a scope (`server:<id>`, `group:<id>`) covers this target.
    fn covered_by(&self, scope: &str) -> bool {
        let (kind, sid) = scope.split_once(':').unwrap_or((scope, ""));
        match (self, kind) {
            (Target::Server { id, .. }, "server") => id == sid,
            (Target::Server { groups, .. }, "group") => groups.iter().any(|g| g == sid),
            (Target::Group(id), "group") => id == sid,
            _ => false,
        }
    }
}

/// What a principal may do: the union of its roles' permissions, globally and per scope.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    /// Role names held (globally).
    pub roles: BTreeSet<String>,
    /// Permissions, `resource:action` with `*` wildcards (globally).
    pub permissions: BTreeSet<String>,
    /// Roles held only for one server or group: scope (`server:<id>`, `group:<id>`) → names.
    pub scoped_roles: BTreeMap<String, BTreeSet<String>>,
    /// Their permissions by scope: granted only for requests about that server or group (a
    /// group's scope covers its members).
    pub scoped_permissions: BTreeMap<String, BTreeSet<String>>,
}

/// The permissions of `roles`, with `custom` definitions taking precedence over built-ins.
fn permissions_of(
    roles: &BTreeSet<String>,
    custom: &BTreeMap<String, BTreeSet<String>>,
) -> BTreeSet<String> {
    let mut permissions = BTreeSet::new();
    for r in roles {
        if let Some(c) = custom.get(r) {
            permissions.extend(c.iter().cloned());
        } else if let Some((_, ps)) = BUILTIN_ROLES.iter().find(|(n, _)| n == r) {
            permissions.extend(ps.iter().map(|p| (*p).to_owned()));
        }
    }
    permissions
}

/// Whether one of `permissions` grants `wanted` (`resource:action`).
fn any_grants<'a>(permissions: impl IntoIterator<Item = &'a String>, wanted: &str) -> bool {
    let (wr, wa) = wanted.split_once(':').unwrap_or((wanted, ""));
    permissions.into_iter().any(|p| {
        let (r, a) = p.split_once(':').unwrap_or((p, ""));
        (r == "*" || r == wr) && (a == "*" || a == wa)
    })
}

impl Grants {
    /// The grants of `roles`, with `custom` role definitions (name → permissions) taking
    /// precedence over built-ins of the same name.
    pub fn of(roles: &BTreeSet<String>, custom: &BTreeMap<String, BTreeSet<String>>) -> Grants {
        Grants {
            roles: roles.clone(),
            permissions: permissions_of(roles, custom),
            ..Grants::default()
        }
    }

    /// These grants plus roles held per scope (`server:<id>` / `group:<id>` → role names),
    /// with `custom` definitions as in [`Grants::of`].
    pub fn with_scoped(
        mut self,
        scoped: &BTreeMap<String, BTreeSet<String>>,
        custom: &BTreeMap<String, BTreeSet<String>>,
    ) -> Grants {
        for (scope, roles) in scoped {
            let perms = permissions_of(roles, custom);
            self.scoped_roles
                .entry(scope.clone())
                .or_default()
                .extend(roles.iter().cloned());
            self.scoped_permissions
                .entry(scope.clone())
                .or_default()
                .extend(perms);
        }
        self
    }

    /// Whether they include `wanted` globally (`""` = any authenticated caller).
    pub fn allows(&self, wanted: &str) -> bool {
        wanted.is_empty() || any_grants(&self.permissions, wanted)
    }

    /// Whether they include `wanted` for a request about `target`: globally, or through a
    /// role scoped to that server, to that group, or to a group the server is a member of.
    pub fn allows_on(&self, wanted: &str, target: &Target) -> bool {
        self.allows(wanted)
            || self
                .scoped_permissions
                .iter()
                .any(|(scope, ps)| target.covered_by(scope) && any_grants(ps, wanted))
    }

    /// Whether they include `wanted` globally or for at least one server or group (the
    /// request may go on; the target decides with [`Grants::allows_on`]).
    pub fn allows_somewhere(&self, wanted: &str) -> bool {
        self.allows(wanted)
            || self
                .scoped_permissions
                .values()
                .any(|ps| any_grants(ps, wanted))
    }

    /// Whether some grant is scoped (a target matters).
    pub fn has_scoped(&self) -> bool {
        !self.scoped_permissions.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(roles: &[&str]) -> Grants {
        Grants::of(
            &roles.iter().map(|r| (*r).to_owned()).collect(),
            &BTreeMap::new(),
        )
    }

    #[test]
    fn routes_map_to_permissions_and_unknown_routes_to_none() {
        assert_eq!(
            route_permission("GET", "/api/mcp_servers/"),
            Some("mcp_servers:read")
        );
        assert_eq!(
            route_permission("POST", "/api/mcp_servers/fx/start"),
            Some("mcp_servers:lifecycle")
        );
        assert_eq!(
            route_permission("DELETE", "/api/auth/keys/k1"),
            Some("auth:manage")
        );
        assert_eq!(route_permission("GET", "/api/nonexistent"), None);
        assert_eq!(route_permission("DELETE", "/api/system/"), None);
        assert_eq!(route_permission("GET", "/api/mcp_servers//tools"), None);
        assert_eq!(route_permission("GET", "/api/system/me"), Some(""));
    }

    #[test]
    fn roles_grant_mcp_hangars_permissions() {
        let admin = grants(&["admin"]);
        assert!(admin.allows("auth:manage") && admin.allows("mcp_servers:write"));
        let viewer = grants(&["viewer"]);
        assert!(viewer.allows("mcp_servers:read") && viewer.allows("tool:list"));
        assert!(!viewer.allows("mcp_servers:write") && !viewer.allows("tool:invoke"));
        assert!(!viewer.allows("auth:manage"));
        let dev = grants(&["developer"]);
        assert!(dev.allows("mcp_servers:write") && dev.allows("tool:invoke"));
        assert!(!dev.allows("policy:write") && !dev.allows("auth:manage"));
        assert!(grants(&["provider-admin"]).allows("group:delete"));
        assert!(grants(&["auditor"]).allows("audit:read"));
        let sa = grants(&["service-account"]);
        assert!(sa.allows("tool:invoke") && !sa.allows("mcp_servers:read"));
        assert!(!grants(&[]).allows("tool:list"));
        assert!(grants(&[]).allows(""));
        // A custom role.
        let custom = BTreeMap::from([(
            "ops".to_owned(),
            BTreeSet::from(["mcp_servers:lifecycle".to_owned()]),
        )]);
        let ops = Grants::of(&BTreeSet::from(["ops".to_owned()]), &custom);
        assert!(ops.allows("mcp_servers:lifecycle") && !ops.allows("mcp_servers:write"));
    }

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|i| (*i).to_owned()).collect()
    }

    fn server(id: &str, groups: &[&str]) -> Target {
        Target::Server {
            id: id.to_owned(),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        }
    }

    #[test]
    fn scoped_grants_count_only_for_their_server_or_group() {
        let custom = BTreeMap::from([
            ("caller".to_owned(), set(&["tool:invoke", "tool:list"])),
            ("ops".to_owned(), set(&["mcp_servers:lifecycle"])),
        ]);
        let scoped = BTreeMap::from([
            ("server:a".to_owned(), set(&["caller"])),
            ("group:g".to_owned(), set(&["ops", "viewer"])),
        ]);
        let g = Grants::of(&set(&["auditor"]), &custom).with_scoped(&scoped, &custom);
        assert_eq!(g.roles, set(&["auditor"]));
        assert_eq!(g.scoped_roles["group:g"], set(&["ops", "viewer"]));
        assert!(g.has_scoped());
        // Not globally.
        assert!(!g.allows("tool:invoke") && !g.allows("mcp_servers:lifecycle"));
        assert!(g.allows("audit:read") && g.allows_on("audit:read", &Target::None));
        // On server a only.
        assert!(g.allows_on("tool:invoke", &server("a", &[])));
        assert!(!g.allows_on("tool:invoke", &server("b", &[])));
        assert!(!g.allows_on("tool:invoke", &Target::Group("a".into())));
        assert!(!g.allows_on("tool:invoke", &Target::None));
        assert!(!g.allows_on("mcp_servers:lifecycle", &server("a", &[])));
        // On group g, and on its members (a built-in role scoped too).
        assert!(g.allows_on("mcp_servers:lifecycle", &Target::Group("g".into())));
        assert!(g.allows_on("mcp_servers:lifecycle", &server("m1", &["x", "g"])));
        assert!(g.allows_on("mcp_servers:read", &server("m1", &["g"])));
        assert!(!g.allows_on("mcp_servers:lifecycle", &server("m1", &["x"])));
        assert!(!g.allows_on("mcp_servers:write", &Target::Group("g".into())));
        assert!(!g.allows_on("mcp_servers:lifecycle", &Target::Group("gg".into())));
        // A server id that merely looks like a scope's prefix does not match.
        assert!(!g.allows_on("tool:invoke", &server("a2", &[])));
        // Somewhere: the request may proceed to the target check.
        assert!(g.allows_somewhere("tool:invoke") && g.allows_somewhere("mcp_servers:lifecycle"));
        assert!(!g.allows_somewhere("auth:manage") && !g.allows_somewhere("mcp_servers:write"));
        // Global grants hold on every target.
        let admin = grants(&["admin"]);
        assert!(!admin.has_scoped());
        assert!(admin.allows_on("tool:invoke", &server("b", &[])));
        assert!(admin.allows_somewhere("tool:invoke"));
        assert!(!Grants::default().allows_somewhere("tool:invoke"));
    }

    #[test]
    fn route_targets_are_the_server_or_group_in_the_path() {
        assert_eq!(
            route_target("/api/mcp_servers/a/start"),
            Some(("server", "a"))
        );
        assert_eq!(route_target("/api/mcp_servers/a"), Some(("server", "a")));
        assert_eq!(
            route_target("/api/groups/g/members/m"),
            Some(("group", "g"))
        );
        assert_eq!(route_target("/api/mcp_servers/"), None);
        assert_eq!(route_target("/api/mcp_servers"), None);
        assert_eq!(route_target("/api/auth/keys/k1"), None);
        assert_eq!(route_target("/api/tools/a"), None);
        assert_eq!(route_target("/mcp"), None);
        assert_eq!(
            route_permission("DELETE", "/api/auth/roles/ops"),
            Some("auth:manage")
        );
        assert_eq!(
            route_permission("POST", "/api/auth/roles"),
            Some("auth:manage")
        );
    }

    #[test]
    fn custom_role_permissions_are_checked_against_the_vocabulary() {
        assert!(
            unknown_permissions([
                "tool:invoke",
                "mcp_servers:*",
                "*:read",
                "*:*",
                "auth:manage",
                "group:delete"
            ])
            .is_empty()
        );
        let bad = unknown_permissions([
            "tools:call",
            "mcp_servers:fly",
            "*:fly",
            "admin",
            "tool:list",
        ]);
        let names: Vec<&str> = bad.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(names, ["tools:call", "mcp_servers:fly", "*:fly", "admin"]);
        assert!(bad[0].1.contains("unknown resource \"tools\""), "{bad:?}");
        // Every built-in role's permissions are in the vocabulary.
        for (name, perms) in BUILTIN_ROLES {
            assert!(
                unknown_permissions(perms.iter().copied()).is_empty(),
                "{name}"
            );
        }
        // And every route's.
        for (_, _, perm) in ROUTES.iter().filter(|(_, _, p)| !p.is_empty()) {
            assert!(unknown_permissions([*perm]).is_empty(), "{perm}");
        }
    }

    #[test]
    fn mcp_methods_need_tool_permissions() {
        assert_eq!(mcp_permission("initialize"), None);
        assert_eq!(mcp_permission("notifications/cancelled"), None);
        assert_eq!(mcp_permission("tools/call"), Some("tool:invoke"));
        assert_eq!(mcp_permission("tools/list"), Some("tool:list"));
        assert_eq!(mcp_permission("something/new"), Some("tool:invoke"));
    }
}
