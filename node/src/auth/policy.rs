//! Tool access policies: allow/deny globs (fnmatch `*`, `?`, `[abc]`, `[!abc]`) from the
//! config file (`tools: {allow_list, deny_list}` of a server, a group and a group member) and
//! from `/api/auth/policies` (replicated through Raft: scopes `global`, `server`, `group`,
//! `principal`, `role`).
//!
//! Levels merge from broad to narrow and each can only take away: a tool denied anywhere is
//! denied (deny wins), and every non-empty allow list must match it. A tool matching an
//! `approval` glob is refused too: Hangar has no approval gate, so such a call fails closed
//! with its own error (`ToolApprovalNotSupportedError`) rather than waiting for a human
//! (precedence deny > approval > allow, as in MCP Hangar). A refused tool is hidden from
//! `tools/list` and refused on `tools/call` before anything reaches the upstream.
//!
//! Which levels apply to a call: the config policy of the server or group called, the
//! replicated `global` policy, the replicated `server`/`group` policy of the target, the
//! replicated `principal` policies of the caller (its API key id and the key's principal; for a
//! JWT its subject and `jwt:<issuer>|<subject>`) and the `role` policies of its (global) roles. When the target is a group,
//! the member the call is routed to adds its own levels (its entry's `tools` in the group,
//! the member server's own config `tools`, and the replicated `server` policy of its id): a
//! call routed to a member that refuses the tool is refused. The decision here is pure; the
//! gateway gathers the levels.

use std::fmt;

use crate::config::ToolPolicy;
use crate::routing::glob_match as glob;

/// The scopes a replicated policy can have.
pub const SCOPES: &[&str] = &["global", "server", "group", "principal", "role"];

/// Longest glob pattern accepted through the API.
pub const MAX_PATTERN: usize = 256;
/// Most patterns in one list accepted through the API.
pub const MAX_PATTERNS: usize = 1000;

/// One level of an effective policy: its lists and where it comes from (named in refusals).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rule {
    /// Where it comes from, e.g. ``the config policy of server `fx` ``.
    pub origin: String,
    /// Allowed tools (empty: all).
    pub allow: Vec<String>,
    /// Denied tools.
    pub deny: Vec<String>,
    /// Tools that need an approval (refused: there is no approval gate).
    pub approval: Vec<String>,
}

impl Rule {
    /// A config file policy; `origin` says whose.
    pub fn from_config(origin: String, p: &ToolPolicy) -> Rule {
        Rule {
            origin,
            allow: p.allow_list.clone(),
            deny: p.deny_list.clone(),
            approval: p.approval_list.clone(),
        }
    }

    /// A policy set through `/api/auth/policies`.
    pub fn from_api(p: &hangar_raft::state::ToolPolicy) -> Rule {
        Rule {
            origin: format!(
                "the API policy {}/{}",
                p.scope,
                if p.scope == "global" { "*" } else { &p.target }
            ),
            allow: p.allow.clone(),
            deny: p.deny.clone(),
            approval: p.approval.clone(),
        }
    }

    /// Whether it restricts nothing.
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty() && self.approval.is_empty()
    }
}

/// Where the policies set through `/api/auth/policies` are read (the replicated state).
pub trait PolicySource: Send + Sync {
    /// The stored policies under these `(scope, target)` keys (`("global", "")` for the
    /// global one), absent ones skipped, in the order asked.
    fn lookup(&self, keys: &[(&str, &str)]) -> Vec<hangar_raft::state::ToolPolicy>;
    /// Whether any policy is stored.
    fn any(&self) -> bool;
    /// The principal an API key (by id) authenticates as, if it is a known key.
    fn key_principal(&self, key_id: &str) -> Option<String>;
}

/// Why a tool is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// A deny glob matches it.
    Denied,
    /// An approval glob matches it (no approval gate: refused).
    NeedsApproval,
    /// An allow list does not match it.
    NotAllowed,
}

/// A refusal: why, and a sentence naming the pattern and the level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Why.
    pub why: Why,
    /// E.g. ``it matches the deny pattern `admin_*` of the API policy server/fx``.
    pub detail: String,
}

impl Refusal {
    /// The `reason` label of `mcp_hangar_tool_access_denied_total`.
    pub fn metric_reason(&self) -> &'static str {
        match self.why {
            Why::Denied | Why::NotAllowed => "tool_not_in_access_policy",
            Why::NeedsApproval => "approval_required",
        }
    }

    /// The `error_type` of the JSON-RPC error.
    pub fn error_type(&self) -> &'static str {
        match self.why {
            Why::Denied | Why::NotAllowed => "ToolAccessDeniedError",
            Why::NeedsApproval => "ToolApprovalNotSupportedError",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

/// Why `tool` is refused by `rules` (all levels that apply, any order), or `None` when it is
/// allowed: deny anywhere, then approval anywhere, then every non-empty allow list.
pub fn decide(rules: &[Rule], tool: &str) -> Option<Refusal> {
    for r in rules {
        if let Some(d) = r.deny.iter().find(|d| glob(d, tool)) {
            return Some(Refusal {
                why: Why::Denied,
                detail: format!("it matches the deny pattern `{d}` of {}", r.origin),
            });
        }
    }
    for r in rules {
        if let Some(a) = r.approval.iter().find(|a| glob(a, tool)) {
            return Some(Refusal {
                why: Why::NeedsApproval,
                detail: format!(
                    "it matches the approval pattern `{a}` of {}, and this Hangar has no approval gate (such calls are refused; remove the pattern or deny the tool)",
                    r.origin
                ),
            });
        }
    }
    for r in rules {
        if !r.allow.is_empty() && !r.allow.iter().any(|a| glob(a, tool)) {
            return Some(Refusal {
                why: Why::NotAllowed,
                detail: format!(
                    "it matches no allow pattern of {} ({})",
                    r.origin,
                    r.allow.join(", ")
                ),
            });
        }
    }
    None
}

/// Whether `tools/list` shows `tool`: `base` (the target's levels) allows it and, for a group
/// (`members` non-empty: each member's own levels), at least one member would take the call.
pub fn listed(base: &[Rule], members: &[Vec<Rule>], tool: &str) -> bool {
    decide(base, tool).is_none()
        && (members.is_empty() || members.iter().any(|m| decide(m, tool).is_none()))
}

/// Why `tool` is refused by config `policies` (broad to narrow), or `None` when it is allowed.
pub fn refusal(policies: &[&ToolPolicy], tool: &str) -> Option<String> {
    let rules: Vec<Rule> = policies
        .iter()
        .map(|p| Rule::from_config("its tool access policy".to_owned(), p))
        .collect();
    decide(&rules, tool).map(|r| r.detail)
}

/// The `principal` policy targets a caller matches: its principal (an API key id, `local`,
/// `ip:<address>`, `jwt:<issuer>|<subject>`) and, for a JWT, the bare subject.
pub fn principal_targets(principal: &str) -> Vec<&str> {
    let mut out = vec![principal];
    if let Some(rest) = principal.strip_prefix("jwt:")
        && let Some((_, subject)) = rest.split_once('|')
        && !subject.is_empty()
    {
        out.push(subject);
    }
    out
}

/// What is wrong with a glob given through the API, if anything: empty, too long, control
/// characters or surrounding blanks, or an unclosed `[` class.
pub fn glob_problem(pattern: &str) -> Option<String> {
    if pattern.is_empty() {
        return Some("an empty pattern matches no tool".to_owned());
    }
    if pattern.len() > MAX_PATTERN {
        return Some(format!("is longer than {MAX_PATTERN} bytes"));
    }
    if pattern.chars().any(char::is_control) || pattern.trim() != pattern {
        return Some("must not contain control characters or start/end with blanks".to_owned());
    }
    let p: Vec<char> = pattern.chars().collect();
    let mut i = 0;
    while i < p.len() {
        if p[i] == '[' {
            // `[`, optional `!`, at least one character (a first `]` is literal), `]`.
            let mut j = i + 1;
            if p.get(j) == Some(&'!') {
                j += 1;
            }
            j += 1;
            while j < p.len() && p[j] != ']' {
                j += 1;
            }
            if j >= p.len() {
                return Some(format!(
                    "has an unclosed `[` at character {} (a class is `[abc]`, `[a-z]` or `[!abc]`)",
                    i + 1
                ));
            }
            i = j;
        }
        i += 1;
    }
    None
}

/// What is wrong with a replicated policy's scope and target, if anything (`target` as in the
/// URL: `*` for `global`).
pub fn scope_problem(scope: &str, target: &str) -> Option<String> {
    if !SCOPES.contains(&scope) {
        return Some(format!(
            "unknown scope `{scope}`: use global, server, group, principal or role"
        ));
    }
    if scope == "global" {
        return (target != "*").then(|| {
            format!(
                "the target of scope global is `*` (got `{target}`): /api/auth/policies/global/*"
            )
        });
    }
    if target.is_empty() || target.len() > MAX_PATTERN {
        return Some(format!("the {scope} id must be 1-{MAX_PATTERN} bytes"));
    }
    if target.chars().any(char::is_control) || target.trim() != target {
        return Some(format!(
            "the {scope} id must not contain control characters or start/end with blanks"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_fnmatch() {
        assert!(glob("*", "anything"));
        assert!(glob("admin_*", "admin_delete"));
        assert!(!glob("admin_*", "user_admin"));
        assert!(glob("get_?", "get_x"));
        assert!(!glob("get_?", "get_xy"));
        assert!(glob("*_[ab]", "x_a"));
        assert!(!glob("*_[ab]", "x_c"));
        assert!(glob("*_[!ab]", "x_c"));
        assert!(glob("[a-c]*", "beta"));
        assert!(glob("a*b*c", "axxbyyc"));
        assert!(!glob("a*b*c", "axxbyy"));
        assert!(glob("[x", "[x"));
        assert!(glob("", ""));
        assert!(!glob("", "x"));
    }

    fn policy(allow: &[&str], deny: &[&str]) -> ToolPolicy {
        ToolPolicy {
            allow_list: allow.iter().map(|s| (*s).to_owned()).collect(),
            deny_list: deny.iter().map(|s| (*s).to_owned()).collect(),
            ..ToolPolicy::default()
        }
    }

    #[test]
    fn deny_wins_and_allow_lists_intersect() {
        let group = policy(&["read_*", "list_*"], &[]);
        let server = policy(&[], &["read_secret*"]);
        let both = [&group, &server];
        assert_eq!(refusal(&both, "read_file"), None);
        assert!(refusal(&both, "read_secrets").unwrap().contains("deny"));
        assert!(refusal(&both, "write_file").unwrap().contains("allow"));
        // Deny beats allow on the same level.
        let p = policy(&["*"], &["drop_*"]);
        assert!(refusal(&[&p], "drop_table").is_some());
        assert_eq!(refusal(&[], "anything"), None);
    }

    fn rule(origin: &str, allow: &[&str], deny: &[&str], approval: &[&str]) -> Rule {
        let v = |l: &[&str]| l.iter().map(|s| (*s).to_owned()).collect();
        Rule {
            origin: origin.to_owned(),
            allow: v(allow),
            deny: v(deny),
            approval: v(approval),
        }
    }

    #[test]
    fn levels_merge_server_group_member_and_replicated() {
        // Config: the group allows read_* and list_*; member 2 denies list_secrets.
        // Replicated: global denies drop_*, the principal may only read_*.
        let global = rule("global", &[], &["drop_*"], &[]);
        let group = rule("group g", &["read_*", "list_*", "drop_*"], &[], &[]);
        let principal = rule("principal k", &["read_*"], &[], &[]);
        let member2 = rule("member m2", &[], &["list_secrets"], &[]);

        let base = [global.clone(), group.clone()];
        assert_eq!(decide(&base, "read_file"), None);
        assert_eq!(decide(&base, "list_secrets"), None);
        let r = decide(&base, "drop_table").unwrap();
        assert_eq!(r.why, Why::Denied);
        assert!(r.detail.contains("`drop_*` of global"), "{}", r.detail);
        // Deny wins even over an allow list that matches on another level.
        assert_eq!(decide(&base, "drop_table").unwrap().why, Why::Denied);
        let r = decide(&base, "write_file").unwrap();
        assert_eq!(r.why, Why::NotAllowed);
        assert!(r.detail.contains("group g"), "{}", r.detail);

        // The member level only applies on that member.
        let on_m2 = [global.clone(), group.clone(), member2.clone()];
        assert_eq!(decide(&on_m2, "list_secrets").unwrap().why, Why::Denied);
        assert_eq!(decide(&on_m2, "list_files"), None);

        // A principal's allow list restricts further (allow lists intersect).
        let as_k = [global, group, principal];
        assert_eq!(decide(&as_k, "read_file"), None);
        assert_eq!(decide(&as_k, "list_files").unwrap().why, Why::NotAllowed);

        // No levels, or empty ones: everything is allowed.
        assert_eq!(decide(&[], "x"), None);
        assert_eq!(decide(&[Rule::default()], "x"), None);
    }

    #[test]
    fn approval_globs_are_refused_between_deny_and_allow() {
        let r = [
            rule("a", &["pay_*", "read_*"], &["pay_all"], &["pay_*"]),
            rule("b", &["read_*"], &[], &[]),
        ];
        // deny > approval
        assert_eq!(decide(&r, "pay_all").unwrap().why, Why::Denied);
        // approval > allow (b's allow list does not match pay_one either)
        let x = decide(&r, "pay_one").unwrap();
        assert_eq!(x.why, Why::NeedsApproval);
        assert_eq!(x.error_type(), "ToolApprovalNotSupportedError");
        assert_eq!(x.metric_reason(), "approval_required");
        assert!(x.detail.contains("no approval gate"), "{}", x.detail);
        let d = decide(&r, "write").unwrap();
        assert_eq!(
            (d.error_type(), d.metric_reason()),
            ("ToolAccessDeniedError", "tool_not_in_access_policy")
        );
        assert_eq!(decide(&r, "read_x"), None);
    }

    #[test]
    fn a_group_lists_a_tool_some_member_takes() {
        let base = [rule("group", &[], &["admin_*"], &[])];
        let m1 = vec![rule("m1", &[], &["echo"], &[])];
        let m2 = vec![rule("m2", &[], &["echo", "add"], &[])];
        let members = [m1.clone(), m2];
        assert!(listed(&base, &members, "whoami"));
        assert!(listed(&base, &members, "add"), "m1 takes it");
        assert!(!listed(&base, &members, "echo"), "no member takes it");
        assert!(!listed(&base, &members, "admin_x"), "the group denies it");
        assert!(listed(&base, &[], "echo"), "a server has no member levels");
        assert!(listed(&[], &[m1, Vec::new()], "echo"));
    }

    #[test]
    fn replicated_policies_name_their_scope() {
        let p = hangar_raft::state::ToolPolicy {
            scope: "global".into(),
            target: String::new(),
            allow: vec![],
            deny: vec!["x".into()],
            approval: vec![],
        };
        let r = Rule::from_api(&p);
        assert_eq!(r.origin, "the API policy global/*");
        assert_eq!(r.deny, ["x"]);
        let cfg = Rule::from_config("c".into(), &policy(&["a"], &["b"]));
        assert_eq!(
            (cfg.allow, cfg.deny),
            (vec!["a".to_owned()], vec!["b".to_owned()])
        );
    }

    #[test]
    fn principals_match_key_ids_and_jwt_subjects() {
        assert_eq!(principal_targets("key_1"), ["key_1"]);
        assert_eq!(
            principal_targets("jwt:https://idp.example|auth0|alice"),
            ["jwt:https://idp.example|auth0|alice", "auth0|alice"]
        );
        assert_eq!(principal_targets("jwt:x|"), ["jwt:x|"]);
    }

    #[test]
    fn api_globs_and_scopes_are_checked() {
        for ok in [
            "echo", "admin_*", "get_?", "[a-c]*", "[!x]y", "[]]", "a[!]]b",
        ] {
            assert_eq!(glob_problem(ok), None, "{ok}");
        }
        assert!(glob_problem("").unwrap().contains("empty"));
        assert!(glob_problem(" echo").unwrap().contains("blanks"));
        assert!(glob_problem("a\nb").unwrap().contains("control"));
        assert!(glob_problem(&"x".repeat(300)).unwrap().contains("longer"));
        assert!(
            glob_problem("admin_[abc")
                .unwrap()
                .contains("unclosed `[` at character 7")
        );
        assert!(glob_problem("[!").unwrap().contains("unclosed"));
        assert!(glob_problem("[").unwrap().contains("unclosed"));

        assert_eq!(scope_problem("global", "*"), None);
        assert_eq!(scope_problem("server", "fx"), None);
        assert_eq!(scope_problem("principal", "jwt:https://i|alice"), None);
        assert!(scope_problem("global", "fx").unwrap().contains("`*`"));
        assert!(
            scope_problem("tenant", "x")
                .unwrap()
                .contains("unknown scope")
        );
        assert!(scope_problem("role", " admin").unwrap().contains("blanks"));
    }
}
