//! Warnings (not errors) about secrets written literally in a configuration file instead of
//! as `${VAR}` references. The file's `mcp_servers` are replicated to every node as written,
//! and the file itself tends to be committed and copied: a token belongs in the environment.
//!
//! A string value is reported when it holds no `${` and
//! * it is a credential of a server's `auth` (every key but `type`, `api_key_header` and
//!   `username`: `api_key`, `bearer_token`, `password`), or
//! * its key looks like a credential: the name ends with `token`, `secret`, `password`,
//!   `passwd`, `key`, `apikey`, `credential(s)`, or is `authorization` / `cookie` — under a
//!   server's `env` and `http.headers`, and anywhere else in the file
//!   (`auth.api_key.bootstrap_key`). Names of files, headers, paths and claims
//!   (`key_file`, `api_key_header`, …) are not credentials.
//!
//! `rate_limit(s)` hold no secrets (their `key` is a bucket key) and are skipped.

use std::path::Path;

use serde_json::Value;

use super::Problem;
use super::reader::join;

/// Endings of key names that hold credentials.
const SECRET_ENDINGS: &[&str] = &[
    "token",
    "secret",
    "password",
    "passwd",
    "key",
    "apikey",
    "credential",
    "credentials",
];
/// Whole key names that hold credentials (HTTP headers).
const SECRET_NAMES: &[&str] = &["authorization", "proxy-authorization", "cookie"];
/// Endings that make a name describe something else than the secret itself.
const NOT_SECRET_ENDINGS: &[&str] = &[
    "_file", "_path", "_dir", "_header", "_name", "_claim", "_id", "_url", "_uri", "_type",
    "-file", "-path", "-header", "-name",
];
/// Keys of a server's `auth` that are not credentials.
const AUTH_PLAIN: &[&str] = &["type", "api_key_header", "username"];

fn secret_name(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    if NOT_SECRET_ENDINGS.iter().any(|e| n.ends_with(e)) {
        return false;
    }
    SECRET_NAMES.contains(&n.as_str()) || SECRET_ENDINGS.iter().any(|e| n.ends_with(e))
}

fn literal(v: &Value) -> bool {
    matches!(v, Value::String(s) if !s.trim().is_empty() && !s.contains("${"))
}

/// Every literal secret in a parsed configuration document (before interpolation).
pub fn literal_secrets(doc: &Value) -> Vec<Problem> {
    let mut out = Vec::new();
    let Value::Object(root) = doc else {
        return out;
    };
    for (k, v) in root {
        if k == "rate_limit" || k == "rate_limits" {
            continue;
        }
        walk(v, k, k == "mcp_servers", &mut out);
    }
    out
}

/// [`literal_secrets`] of YAML text; nothing when it does not parse (validation says why).
pub fn literal_secrets_in(yaml: &str) -> Vec<Problem> {
    serde_saphyr::from_str::<Value>(yaml)
        .map(|doc| literal_secrets(&doc))
        .unwrap_or_default()
}

/// [`literal_secrets`] of a file; nothing when it cannot be read or parsed.
pub fn literal_secrets_in_file(path: &Path) -> Vec<Problem> {
    std::fs::read_to_string(path)
        .map(|t| literal_secrets_in(&t))
        .unwrap_or_default()
}

fn report(path: &str, name: &str, out: &mut Vec<Problem>) {
    let var = if name == "bootstrap_key" {
        "HANGAR_BOOTSTRAP_KEY".to_owned()
    } else {
        name.to_ascii_uppercase().replace(['-', '.'], "_")
    };
    out.push(Problem {
        path: path.to_owned(),
        message: format!(
            "a literal secret in the configuration file (its servers are replicated to every node as written); write it as ${{{var}}} and set {var} in the node's environment"
        ),
    });
}

/// `in_servers`: `v` is (inside) `mcp_servers`, where `auth` is a server's upstream auth.
fn walk(v: &Value, path: &str, in_servers: bool, out: &mut Vec<Problem>) {
    match v {
        Value::Object(map) => {
            for (k, item) in map {
                let p = join(path, k);
                if in_servers
                    && k == "auth"
                    && let Value::Object(auth) = item
                {
                    for (ak, av) in auth {
                        if !AUTH_PLAIN.contains(&ak.as_str()) && literal(av) {
                            report(&join(&p, ak), ak, out);
                        }
                    }
                    continue;
                }
                if secret_name(k) && literal(item) {
                    report(&p, k, out);
                } else {
                    walk(item, &p, in_servers, out);
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                walk(item, &format!("{path}[{i}]"), in_servers, out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(yaml: &str) -> Vec<String> {
        literal_secrets_in(yaml)
            .into_iter()
            .map(|p| p.path)
            .collect()
    }

    #[test]
    fn literal_credentials_are_reported_with_their_path() {
        let yaml = r#"
mcp_servers:
  gh:
    command: [npx, server-github]
    env:
      GITHUB_TOKEN: ghp_literal
      GITHUB_API_KEY: "${GH_KEY}"
      LOG_LEVEL: debug
      GREETING: hello
  api:
    mode: remote
    endpoint: https://api.example.com/mcp
    http:
      headers: {Authorization: "Bearer abc", X-Api-Key: k1, X-Trace: "on", X-Auth-Token: "${T}"}
    auth: {type: basic, username: bob, password: hunter2}
  bearer:
    mode: remote
    endpoint: https://b.example.com/mcp
    auth: {type: bearer, bearer_token: "${B}"}
  g:
    mode: group
    members:
      - {id: m, command: [npx, m], env: {DB_PASSWORD: pw}}
auth:
  enabled: true
  api_key:
    header_name: X-API-Key
    bootstrap_key: mcp_0123456789abcdef0123456789abcdef
server:
  tls: {cert_file: /c.pem, key_file: /k.pem}
rate_limits:
  - {id: r, key: principal, rps: 1}
"#;
        assert_eq!(
            paths(yaml),
            // Sorted: the parsed document's maps are.
            vec![
                "auth.api_key.bootstrap_key",
                "mcp_servers.api.auth.password",
                "mcp_servers.api.http.headers.Authorization",
                "mcp_servers.api.http.headers.X-Api-Key",
                "mcp_servers.g.members[0].env.DB_PASSWORD",
                "mcp_servers.gh.env.GITHUB_TOKEN",
            ]
        );
        let w = literal_secrets_in(yaml);
        assert!(w[0].message.contains("${HANGAR_BOOTSTRAP_KEY}"));
        assert!(w[5].message.contains("${GITHUB_TOKEN}"), "{}", w[5].message);
    }

    #[test]
    fn references_and_non_secrets_are_quiet() {
        assert!(
            paths(
                "mcp_servers:\n  a:\n    command: [npx]\n    env: {TOKEN: \"${TOKEN}\", KEY_FILE: /k, PWD: /tmp}\n\
                 auth:\n  api_key: {bootstrap_key: \"${HANGAR_BOOTSTRAP_KEY}\", api_key_header: X}\n"
            )
            .is_empty()
        );
        assert!(paths("not: [valid").is_empty());
        assert!(secret_name("client_secret") && secret_name("PRIVATE_KEY"));
        assert!(!secret_name("api_key_header") && !secret_name("key_file"));
    }
}
