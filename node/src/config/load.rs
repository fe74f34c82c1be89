//! Entry points: a file, YAML text, one definition, or replicated raw definitions, each
//! interpolated (`${VAR}` / `${VAR:-default}`) and validated into the typed IR.

use std::path::Path;

use indexmap::IndexMap;
use serde_json::Value;

use super::reader::{ProblemSink, join, type_name};
use super::validate::{build, check_id, group_spec, server_spec};
use super::*;

/// Validate one server or group definition on its own, as it would be validated in a file:
/// `raw` is the value under `mcp_servers.<id>` (taken literally, no `${VAR}`), `known` the
/// servers and groups defined already (a group's members must be among its servers, or be
/// defined inline in `raw`). Inline members of a group are checked but not returned.
pub fn validate_server(
    id: &str,
    raw: &Value,
    known: &IndexMap<String, ServerSpec>,
) -> Result<ServerSpec, Problems> {
    let p = ProblemSink::default();
    let path = join("mcp_servers", id);
    check_id(id, &path, &p);
    let is_group = raw.get("mode").and_then(Value::as_str) == Some("group");
    let spec = if is_group {
        let mut inline = IndexMap::new();
        let g = group_spec(raw, &path, &p, &|m| known.contains_key(m), &mut inline);
        if let Some(g) = &g {
            check_members(id, g, &|m| inline.get(m).or_else(|| known.get(m)), &p);
        }
        g.map(ServerSpec::Group)
    } else {
        server_spec(raw, &path, &p)
    };
    match spec {
        Some(s) if p.is_empty() => Ok(s),
        _ => {
            let mut problems = p.take();
            if problems.is_empty() {
                problems.push(Problem {
                    path,
                    message: "is not a valid server definition".into(),
                });
            }
            Err(Problems(problems))
        }
    }
}

/// A group's members must be servers, not groups.
pub(super) fn check_members<'a>(
    gid: &str,
    g: &GroupSpec,
    lookup: &dyn Fn(&str) -> Option<&'a ServerSpec>,
    p: &ProblemSink,
) {
    for (i, m) in g.members.iter().enumerate() {
        match lookup(&m.id) {
            None => p.push(
                &format!("mcp_servers.{gid}.members[{i}].id"),
                format!("member `{}` is not defined under mcp_servers (define it there or inline with mode and command/endpoint)", m.id),
            ),
            Some(ServerSpec::Group(_)) => p.push(
                &format!("mcp_servers.{gid}.members[{i}].id"),
                format!("member `{}` is a group; groups cannot contain groups", m.id),
            ),
            Some(_) => {}
        }
    }
}

/// Load and validate a file; `${VAR}` comes from the process environment.
pub fn load_file(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Unreadable {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let mut cfg = load_str(&text, &|k| std::env::var(k).ok())?;
    // The files a section names must be there and usable (checked here, for a file this node
    // runs, not for a document posted to the API: its paths are another machine's).
    let mut problems = match &cfg.server.tls {
        Some(tls) => super::server_tls::check_files(tls),
        None => Vec::new(),
    };
    // The programs this node would spawn must be allowed here (checked again at spawn).
    problems.extend(super::command_problems(
        &cfg.mcp_servers,
        &super::CommandPolicy::from_env(),
    ));
    if !problems.is_empty() {
        return Err(ConfigError::Invalid { problems });
    }
    cfg.file_hash = Some(sha256_hex(text.as_bytes()));
    Ok(cfg)
}

/// SHA-256 of `bytes`, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Build server specs from replicated raw definitions: `(id, definition, interpolate)`.
/// Definitions from the config file are interpolated with this node's environment; those
/// from the API are taken literally. Validation is the same as for a file.
pub fn servers_from_raw(
    entries: &[(String, Value, bool)],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<IndexMap<String, ServerSpec>, ConfigError> {
    let p = ProblemSink::default();
    let mut interpolated = Value::Object(
        entries
            .iter()
            .filter(|(_, _, i)| *i)
            .map(|(id, v, _)| (id.clone(), v.clone()))
            .collect(),
    );
    interpolate(&mut interpolated, "mcp_servers", env, &p);
    let mut servers = match interpolated {
        Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    for (id, v, interp) in entries {
        if !interp {
            servers.insert(id.clone(), v.clone());
        }
    }
    let doc = serde_json::json!({ "mcp_servers": Value::Object(servers) });
    let cfg = build(&doc, &p, false);
    if p.is_empty() {
        Ok(cfg.mcp_servers)
    } else {
        Err(ConfigError::Invalid { problems: p.take() })
    }
}

/// Load and validate YAML text with a variable lookup for `${VAR}`.
pub fn load_str(yaml: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    let invalid = |m: String| ConfigError::Invalid {
        problems: vec![Problem {
            path: String::new(),
            message: m,
        }],
    };
    if yaml.trim().is_empty() {
        return Err(invalid(
            "the configuration is empty; it needs at least `mcp_servers: {}`".into(),
        ));
    }
    let mut doc: Value =
        serde_saphyr::from_str(yaml).map_err(|e| invalid(format!("not valid YAML: {e}")))?;
    if !doc.is_object() {
        return Err(invalid(format!(
            "the configuration must be a mapping of sections, got {}",
            type_name(&doc)
        )));
    }
    let p = ProblemSink::default();
    let raw_servers = doc
        .get("mcp_servers")
        .and_then(Value::as_object)
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    interpolate(&mut doc, "", env, &p);
    let mut cfg = build(&doc, &p, false);
    cfg.raw_servers = raw_servers;
    if p.is_empty() {
        Ok(cfg)
    } else {
        Err(ConfigError::Invalid { problems: p.take() })
    }
}

/// Replace `${VAR}` / `${VAR:-default}` in every string (single pass, no re-expansion).
fn interpolate(v: &mut Value, path: &str, env: &dyn Fn(&str) -> Option<String>, p: &ProblemSink) {
    match v {
        Value::String(s) if s.contains("${") => {
            let mut out = String::with_capacity(s.len());
            let mut rest = s.as_str();
            while let Some(start) = rest.find("${") {
                out.push_str(&rest[..start]);
                let after = &rest[start + 2..];
                let Some(end) = after.find('}') else {
                    out.push_str(&rest[start..]);
                    rest = "";
                    break;
                };
                let inner = &after[..end];
                let (name, default) = match inner.split_once(":-") {
                    Some((n, d)) => (n, Some(d)),
                    None => (inner, None),
                };
                let valid = !name.is_empty()
                    && name
                        .chars()
                        .next()
                        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !valid {
                    out.push_str(&rest[start..start + 3 + end]);
                } else {
                    match (env(name), default) {
                        (Some(val), _) => out.push_str(&val),
                        (None, Some(d)) => out.push_str(d),
                        (None, None) => {
                            p.push(
                                path,
                                format!(
                                    "environment variable `{name}` is not set (used as ${{{name}}}); set it or write ${{{name}:-default}}"
                                ),
                            );
                        }
                    }
                }
                rest = &after[end + 1..];
            }
            out.push_str(rest);
            *s = out;
        }
        Value::Array(items) => {
            for (i, it) in items.iter_mut().enumerate() {
                interpolate(it, &format!("{path}[{i}]"), env, p);
            }
        }
        Value::Object(map) => {
            for (k, it) in map.iter_mut() {
                interpolate(it, &join(path, k), env, p);
            }
        }
        _ => {}
    }
}
