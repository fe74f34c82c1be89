//! Tool access policies: `tools: {allow_list, deny_list}` of a server or a group (fnmatch
//! globs `*`, `?`, `[abc]`, `[!abc]`). Levels merge from broad to narrow and each can only
//! take away: a tool denied anywhere is denied (deny wins), and every non-empty allow list
//! must match it. A denied tool is hidden from `tools/list` and refused on `tools/call`
//! before anything reaches the upstream.

use crate::config::ToolPolicy;
use crate::routing::glob_match as glob;

/// Why `tool` is refused by `policies` (broad to narrow), or `None` when it is allowed.
pub fn refusal(policies: &[&ToolPolicy], tool: &str) -> Option<String> {
    for p in policies {
        if let Some(d) = p.deny_list.iter().find(|d| glob(d, tool)) {
            return Some(format!("it matches the deny_list pattern `{d}`"));
        }
    }
    for p in policies {
        if !p.allow_list.is_empty() && !p.allow_list.iter().any(|a| glob(a, tool)) {
            return Some(format!(
                "it matches no allow_list pattern ({})",
                p.allow_list.join(", ")
            ));
        }
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
        assert!(
            refusal(&both, "read_secrets")
                .unwrap()
                .contains("deny_list")
        );
        assert!(refusal(&both, "write_file").unwrap().contains("allow_list"));
        // Deny beats allow on the same level.
        let p = policy(&["*"], &["drop_*"]);
        assert!(refusal(&[&p], "drop_table").is_some());
        assert_eq!(refusal(&[], "anything"), None);
    }
}
