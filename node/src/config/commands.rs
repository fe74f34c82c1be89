//! The subprocess `command` allow-list (MCP Hangar's): which executables a node may spawn
//! as MCP servers. Checked when a configuration is validated (a file, a document posted to
//! `/api/config/*`, a server added through `/api`) and again right before a child is spawned,
//! with the spawning node's own environment.
//!
//! * The executable's **name** (the basename of `command[0]`) must be in the list: MCP
//!   Hangar's default ([`DEFAULT_ALLOWED_COMMANDS`]) or `MCP_ALLOWED_COMMANDS`, a
//!   comma-separated list that replaces it (entries are reduced to their basename, as MCP
//!   Hangar does; an empty value allows nothing).
//! * An **absolute path** (`/opt/mcp/bin/server`) names one exact file chosen by whoever wrote
//!   the configuration; Hangar accepts it whatever its name unless
//!   `HANGAR_ALLOW_ABSOLUTE_COMMANDS=false`, which applies MCP Hangar's rule to it too (its
//!   name must be in the list). This default keeps servers installed at a fixed path (the
//!   fixture, a venv's console script) working without listing each; set it to `false` where
//!   callers of `/api` must not choose arbitrary programs.

use std::collections::BTreeSet;
use std::path::Path;

use indexmap::IndexMap;
use serde_json::Value;

use super::{Problem, ServerSpec};

/// MCP Hangar's default allow-list of subprocess executables.
pub const DEFAULT_ALLOWED_COMMANDS: &[&str] = &[
    "bun",
    "deno",
    "docker",
    "node",
    "npx",
    "podman",
    "python",
    "python3",
    "python3.11",
    "python3.12",
    "python3.13",
    "python3.14",
    "uv",
    "uvx",
];

/// The variable that replaces the allow-list (MCP Hangar's).
pub const ALLOWED_COMMANDS_VAR: &str = "MCP_ALLOWED_COMMANDS";
/// The variable that decides whether an absolute path is accepted whatever its name.
pub const ABSOLUTE_COMMANDS_VAR: &str = "HANGAR_ALLOW_ABSOLUTE_COMMANDS";

/// Which executables may be spawned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandPolicy {
    allowed: BTreeSet<String>,
    /// The list came from `MCP_ALLOWED_COMMANDS`.
    from_env: bool,
    allow_absolute: bool,
}

fn basename(program: &str) -> &str {
    Path::new(program)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(program)
}

impl CommandPolicy {
    /// The policy of this process's environment.
    pub fn from_env() -> CommandPolicy {
        CommandPolicy::from_lookup(&|k| std::env::var(k).ok())
    }

    /// The policy of an environment given as a lookup.
    pub fn from_lookup(env: &dyn Fn(&str) -> Option<String>) -> CommandPolicy {
        let (allowed, from_env) = match env(ALLOWED_COMMANDS_VAR) {
            Some(list) => (
                list.split(',')
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(|c| basename(c).to_owned())
                    .collect(),
                true,
            ),
            None => (
                DEFAULT_ALLOWED_COMMANDS
                    .iter()
                    .map(|c| (*c).to_owned())
                    .collect(),
                false,
            ),
        };
        let allow_absolute = env(ABSOLUTE_COMMANDS_VAR).is_none_or(|v| {
            !matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "false" | "0" | "no" | "off"
            )
        });
        CommandPolicy {
            allowed,
            from_env,
            allow_absolute,
        }
    }

    /// Whether `program` (`command[0]`) may be spawned; `Err` says why not and what to set.
    pub fn check(&self, program: &str) -> Result<(), String> {
        let name = basename(program.trim());
        if program.trim().is_empty() || self.allowed.contains(name) {
            return Ok(());
        }
        let absolute = program.starts_with('/');
        if absolute && self.allow_absolute {
            return Ok(());
        }
        let list = if self.allowed.is_empty() {
            format!("{ALLOWED_COMMANDS_VAR} is empty: nothing may be spawned")
        } else {
            let names: Vec<&str> = self.allowed.iter().map(String::as_str).collect();
            let source = if self.from_env {
                ALLOWED_COMMANDS_VAR
            } else {
                "the default list"
            };
            format!("{source}: {}", names.join(", "))
        };
        let hint = if absolute {
            format!(
                "add `{name}` to {ALLOWED_COMMANDS_VAR} (a comma-separated list replacing the default), or remove {ABSOLUTE_COMMANDS_VAR}=false (absolute paths are then accepted whatever their name)"
            )
        } else {
            format!(
                "add `{name}` to {ALLOWED_COMMANDS_VAR} (a comma-separated list replacing the default){}",
                if self.allow_absolute {
                    ", or give the absolute path of the program"
                } else {
                    ""
                }
            )
        };
        Err(format!(
            "`{program}` is not an allowed executable ({list}); {hint}"
        ))
    }
}

/// One problem per server (`mcp_servers.<id>.command`) whose program `policy` refuses.
/// Members made from `replicas: N` (`id.1` …) are reported once, under their server.
pub fn command_problems(
    servers: &IndexMap<String, ServerSpec>,
    policy: &CommandPolicy,
) -> Vec<Problem> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (id, spec) in servers {
        let ServerSpec::Subprocess(s) = spec else {
            continue;
        };
        let root = id.split('.').next().unwrap_or(id);
        let Some(program) = s.command.first() else {
            continue;
        };
        if let Err(why) = policy.check(program)
            && seen.insert(root.to_owned())
        {
            out.push(Problem {
                path: format!("mcp_servers.{root}.command"),
                message: format!("server `{root}`: {why}"),
            });
        }
    }
    out
}

/// [`command_problems`] of one definition as posted to the API (`raw`, taken literally):
/// its `command`, and those of inline group members.
pub fn raw_command_problems(id: &str, raw: &Value, policy: &CommandPolicy) -> Vec<Problem> {
    let program = |v: &Value| -> Option<String> {
        v.get("command")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let mut out = Vec::new();
    if let Some(p) = program(raw)
        && let Err(why) = policy.check(&p)
    {
        out.push(Problem {
            path: format!("mcp_servers.{id}.command"),
            message: format!("server `{id}`: {why}"),
        });
    }
    for (i, m) in raw
        .get("members")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        if let Some(p) = program(m)
            && let Err(why) = policy.check(&p)
        {
            let mid = m.get("id").and_then(Value::as_str).unwrap_or("?");
            out.push(Problem {
                path: format!("mcp_servers.{id}.members[{i}].command"),
                message: format!("server `{mid}`: {why}"),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(vars: &[(&str, &str)]) -> CommandPolicy {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        CommandPolicy::from_lookup(&move |k| {
            vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn default_list_is_mcp_hangars_and_matches_basenames() {
        let p = policy(&[]);
        for ok in [
            "npx",
            "uvx",
            "python3",
            "python3.12",
            "node",
            "docker",
            "./bin/node",
        ] {
            assert!(p.check(ok).is_ok(), "{ok}");
        }
        for refused in ["bash", "sh", "curl", "python2", "bin/bash", "./npx-evil"] {
            let e = p.check(refused).unwrap_err();
            assert!(e.contains("not an allowed executable"), "{e}");
            assert!(e.contains("MCP_ALLOWED_COMMANDS"), "{e}");
        }
        // An absolute path names one exact file: accepted by default.
        assert!(p.check("/opt/mcp/bin/hangar-fixture").is_ok());
        assert!(p.check("/usr/bin/npx").is_ok());
    }

    #[test]
    fn env_replaces_the_list_and_absolute_paths_can_be_checked_by_name() {
        let p = policy(&[("MCP_ALLOWED_COMMANDS", " hangar-fixture, /usr/bin/mytool ,")]);
        assert!(p.check("hangar-fixture").is_ok());
        assert!(p.check("mytool").is_ok());
        let e = p.check("npx").unwrap_err();
        assert!(
            e.contains("MCP_ALLOWED_COMMANDS: hangar-fixture, mytool"),
            "{e}"
        );
        let strict = policy(&[
            ("MCP_ALLOWED_COMMANDS", "npx"),
            ("HANGAR_ALLOW_ABSOLUTE_COMMANDS", "false"),
        ]);
        assert!(strict.check("/usr/local/bin/npx").is_ok());
        let e = strict.check("/bin/bash").unwrap_err();
        assert!(e.contains("`/bin/bash`"), "{e}");
        assert!(e.contains("HANGAR_ALLOW_ABSOLUTE_COMMANDS"), "{e}");
        let none = policy(&[("MCP_ALLOWED_COMMANDS", "")]);
        assert!(none.check("npx").unwrap_err().contains("is empty"));
    }

    #[test]
    fn problems_name_the_server_and_the_command() {
        let cfg = super::super::load_str(
            "mcp_servers:\n  ok: {command: [npx, srv]}\n  sh:\n    command: [bash, -c, 'rm -rf /']\n  web:\n    command: [ruby, s.rb]\n    placement: {replicas: 2}\n",
            &|_| None,
        )
        .unwrap();
        let p = command_problems(&cfg.mcp_servers, &policy(&[]));
        let text: Vec<String> = p.iter().map(ToString::to_string).collect();
        assert_eq!(p.len(), 2, "{text:?}");
        assert!(text[0].starts_with("mcp_servers.sh.command: server `sh`: `bash` is not"));
        assert!(text[1].starts_with("mcp_servers.web.command: server `web`: `ruby`"));
        let raw = serde_json::json!({"mode": "group", "members": [{"id": "a"},
            {"id": "m", "command": ["bash"]}]});
        let p = raw_command_problems("g", &raw, &policy(&[]));
        assert_eq!(p[0].path, "mcp_servers.g.members[1].command");
        assert!(p[0].message.starts_with("server `m`: `bash`"), "{}", p[0]);
    }
}
