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
    ("POST", "/api/auth/roles/assign", "auth:manage"),
    ("POST", "/api/auth/roles/revoke", "auth:manage"),
    ("GET", "/api/events", "audit:read"),
    ("GET", "/api/rate_limits", "policy:read"),
    ("PUT", "/api/rate_limits/{id}", "policy:write"),
    ("DELETE", "/api/rate_limits/{id}", "policy:write"),
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
    let segs: Vec<&str> = path.split('/').collect();
    ROUTES
        .iter()
        .find(|(m, pattern, _)| *m == method && matches(pattern, &segs))
        .map(|(_, _, p)| *p)
}

/// The route pattern a REST request matches (e.g. `/api/mcp_servers/{id}/start`), if any: the
/// command kind the command rate limiter counts it under.
pub fn route_pattern(method: &str, path: &str) -> Option<&'static str> {
    let segs: Vec<&str> = path.split('/').collect();
    ROUTES
        .iter()
        .find(|(m, pattern, _)| *m == method && matches(pattern, &segs))
        .map(|(_, pattern, _)| *pattern)
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

/// What a principal may do: the union of its roles' permissions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    /// Role names held.
    pub roles: BTreeSet<String>,
    /// Permissions, `resource:action` with `*` wildcards.
    pub permissions: BTreeSet<String>,
}

impl Grants {
    /// The grants of `roles`, with `custom` role definitions (name → permissions) taking
    /// precedence over built-ins of the same name.
    pub fn of(roles: &BTreeSet<String>, custom: &BTreeMap<String, BTreeSet<String>>) -> Grants {
        let mut permissions = BTreeSet::new();
        for r in roles {
            if let Some(c) = custom.get(r) {
                permissions.extend(c.iter().cloned());
            } else if let Some((_, ps)) = BUILTIN_ROLES.iter().find(|(n, _)| n == r) {
                permissions.extend(ps.iter().map(|p| (*p).to_owned()));
            }
        }
        Grants {
            roles: roles.clone(),
            permissions,
        }
    }

    /// Whether they include `wanted` (`""` = any authenticated caller).
    pub fn allows(&self, wanted: &str) -> bool {
        if wanted.is_empty() {
            return true;
        }
        let (wr, wa) = wanted.split_once(':').unwrap_or((wanted, ""));
        self.permissions.iter().any(|p| {
            let (r, a) = p.split_once(':').unwrap_or((p, ""));
            (r == "*" || r == wr) && (a == "*" || a == wa)
        })
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

    #[test]
    fn mcp_methods_need_tool_permissions() {
        assert_eq!(mcp_permission("initialize"), None);
        assert_eq!(mcp_permission("notifications/cancelled"), None);
        assert_eq!(mcp_permission("tools/call"), Some("tool:invoke"));
        assert_eq!(mcp_permission("tools/list"), Some("tool:list"));
        assert_eq!(mcp_permission("something/new"), Some("tool:invoke"));
    }
}
