//! Tool access policies: `tools: {allow_list, deny_list}` of a server or a group (fnmatch
//! globs `*`, `?`, `[abc]`, `[!abc]`). Levels merge from broad to narrow and each can only
//! take away: a tool denied anywhere is denied (deny wins), and every non-empty allow list
//! must match it. A denied tool is hidden from `tools/list` and refused on `tools/call`
//! before anything reaches the upstream.

use crate::config::ToolPolicy;

/// Whether `name` matches the fnmatch-style `pattern`.
pub fn glob(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    glob_at(&p, &n)
}

fn glob_at(p: &[char], n: &[char]) -> bool {
    // Iterative with one backtrack point for the last `*` (linear in practice).
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() {
            match p[pi] {
                '*' => {
                    star = Some((pi, ni));
                    pi += 1;
                    continue;
                }
                '?' => {
                    pi += 1;
                    ni += 1;
                    continue;
                }
                '[' => {
                    if let Some((matched, next)) = class(&p[pi..], n[ni]) {
                        if matched {
                            pi += next;
                            ni += 1;
                            continue;
                        }
                    } else if n[ni] == '[' {
                        // An unclosed `[` is a literal.
                        pi += 1;
                        ni += 1;
                        continue;
                    }
                }
                c if c == n[ni] => {
                    pi += 1;
                    ni += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, sn)) => {
                pi = sp + 1;
                ni = sn + 1;
                star = Some((sp, sn + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// A `[...]` class at the start of `p` against `c`: (matches, length of the class), or `None`
/// when it is not closed.
fn class(p: &[char], c: char) -> Option<(bool, usize)> {
    let mut i = 1;
    let negate = p.get(1) == Some(&'!');
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    while i < p.len() {
        if p[i] == ']' && !first {
            return Some((matched != negate, i + 1));
        }
        if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
            if p[i] <= c && c <= p[i + 2] {
                matched = true;
            }
            i += 3;
        } else {
            if p[i] == c {
                matched = true;
            }
            i += 1;
        }
        first = false;
    }
    None
}

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
