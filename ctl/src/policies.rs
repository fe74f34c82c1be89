//! `hangarctl policies …`: the tool access policies set through `/api/auth/policies`
//! (replicated; enforced with the config file's policies).

use anyhow::bail;
use clap::Subcommand;
use serde_json::{Value, json};

use crate::{Client, Output, cell, kv, print, table};

#[derive(Subcommand)]
pub enum PoliciesCmd {
    /// Every policy set through the API, or the one of SCOPE TARGET.
    Get {
        /// global, server, group, principal or role.
        scope: Option<String>,
        /// The server, group, principal (API key id, a key's principal, JWT subject) or role;
        /// `*` (or nothing) for global.
        target: Option<String>,
    },
    /// Create or replace the policy of SCOPE TARGET: deny wins, a non-empty allow list
    /// restricts to its globs (`*`, `?`, `[abc]`).
    Set {
        /// global, server, group, principal or role.
        scope: String,
        /// Id within the scope (`*` or nothing for global).
        target: Option<String>,
        /// Allowed tool globs (repeat or comma-separate).
        #[arg(long, value_delimiter = ',')]
        allow: Vec<String>,
        /// Denied tool globs (repeat or comma-separate).
        #[arg(long, value_delimiter = ',')]
        deny: Vec<String>,
    },
    /// Remove the policy of SCOPE TARGET.
    Rm {
        /// global, server, group, principal or role.
        scope: String,
        /// Id within the scope (`*` or nothing for global).
        target: Option<String>,
    },
}

/// Percent-encode one path segment (a JWT subject or an issuer URL may hold `/`, `|`, …).
fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'*' | b':') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `/api/auth/policies/{scope}/{target}` (a missing target is `*` for global only).
fn policy_path(scope: &str, target: Option<&str>) -> anyhow::Result<String> {
    let target = match (scope, target) {
        ("global", None) => "*",
        (_, Some(t)) if !t.is_empty() => t,
        _ => bail!("policies: scope `{scope}` needs a TARGET (the {scope} id)"),
    };
    Ok(format!(
        "/api/auth/policies/{}/{}",
        segment(scope),
        segment(target)
    ))
}

/// A policy as a table row: lists as `a,b`.
fn row(p: &Value) -> Value {
    let mut r = p.clone();
    for k in ["allow", "deny", "approval"] {
        let list: Vec<String> = p[k]
            .as_array()
            .map(|a| a.iter().map(cell).collect())
            .unwrap_or_default();
        r[k] = if list.is_empty() {
            Value::Null
        } else {
            json!(list.join(","))
        };
    }
    r
}

const COLUMNS: &[&str] = &["scope", "target", "allow", "deny"];

pub async fn policies(c: &Client, out: Output, cmd: PoliciesCmd) -> anyhow::Result<()> {
    match cmd {
        PoliciesCmd::Get {
            scope: None,
            target: _,
        } => {
            let v = c.get("/api/auth/policies").await?;
            print(out, &v, |v| {
                let rows: Vec<Value> = v["policies"]
                    .as_array()
                    .map(|a| a.iter().map(row).collect())
                    .unwrap_or_default();
                table(&rows, COLUMNS)
            });
        }
        PoliciesCmd::Get {
            scope: Some(scope),
            target,
        } => {
            let v = c.get(&policy_path(&scope, target.as_deref())?).await?;
            print(out, &v, |v| kv(&row(&v["policy"])));
        }
        PoliciesCmd::Set {
            scope,
            target,
            allow,
            deny,
        } => {
            let path = policy_path(&scope, target.as_deref())?;
            let v = c
                .send(
                    reqwest::Method::PUT,
                    &path,
                    Some(json!({"allow": allow, "deny": deny})),
                )
                .await?;
            print(out, &v, |v| kv(&row(&v["policy"])));
        }
        PoliciesCmd::Rm { scope, target } => {
            let path = policy_path(&scope, target.as_deref())?;
            c.send(reqwest::Method::DELETE, &path, None).await?;
            if out == Output::Table {
                println!("deleted {scope}/{}", target.as_deref().unwrap_or("*"));
            } else {
                println!(
                    "{}",
                    json!({"deleted": {"scope": scope, "target": target.as_deref().unwrap_or("*")}})
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::{Cli, Cmd};

    #[test]
    fn paths_encode_targets_and_default_global() {
        assert_eq!(
            policy_path("global", None).unwrap(),
            "/api/auth/policies/global/*"
        );
        assert_eq!(
            policy_path("server", Some("fx")).unwrap(),
            "/api/auth/policies/server/fx"
        );
        assert_eq!(
            policy_path("principal", Some("jwt:https://idp/x|auth0|al ice")).unwrap(),
            "/api/auth/policies/principal/jwt:https:%2F%2Fidp%2Fx%7Cauth0%7Cal%20ice"
        );
        assert!(policy_path("server", None).is_err());
    }

    #[test]
    fn set_takes_repeated_and_comma_separated_globs() {
        let cli = Cli::try_parse_from([
            "hangarctl",
            "policies",
            "set",
            "server",
            "fx",
            "--deny",
            "echo,admin_*",
            "--deny",
            "drop",
            "--allow",
            "*",
        ])
        .unwrap();
        let Cmd::Policies {
            cmd:
                PoliciesCmd::Set {
                    scope,
                    target,
                    allow,
                    deny,
                },
        } = cli.command
        else {
            panic!("not `policies set`");
        };
        assert_eq!((scope.as_str(), target.as_deref()), ("server", Some("fx")));
        assert_eq!(deny, ["echo", "admin_*", "drop"]);
        assert_eq!(allow, ["*"]);
    }

    #[test]
    fn rows_join_lists() {
        let r = row(&json!({"scope": "server", "target": "fx", "allow": [], "deny": ["a", "b"]}));
        assert_eq!(r["deny"], "a,b");
        assert_eq!(r["allow"], Value::Null);
    }
}
