//! Tool catalogue projection and naming: the aggregated view of every upstream's tools,
//! prompts and resources that `/mcp` serves, with stable exposed names.
//!
//! Names are `<server>__<tool>` by default; a name longer than 64 characters keeps its first
//! 55 characters and gets `_` + 8 hex digits of the SHA-256 of the full name, so it is stable
//! and identical on every node. `tool_access.naming: plain` keeps upstream names where they
//! are unique across servers. Members of a group are collapsed into the group.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::config::{Naming, ServerSpec, ToolPolicy, ToolsSpec};
use crate::runtime::{Catalog, CatalogEntry, Runtime};

/// Separator between server id and tool name.
pub const SEPARATOR: &str = "__";
/// Maximum exposed name length (many clients reject longer tool names).
pub const MAX_NAME: usize = 64;

/// The exposed (prefixed) name of `item` on `server`, always ≤ 64 characters.
pub fn exposed_name(server: &str, item: &str) -> String {
    let full = format!("{server}{SEPARATOR}{item}");
    if full.len() <= MAX_NAME {
        return full;
    }
    let digest = Sha256::digest(full.as_bytes());
    let tag = hex::encode(&digest[..4]);
    let mut cut = MAX_NAME - 1 - tag.len();
    while !full.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}_{tag}", &full[..cut])
}

/// Where an exposed name leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Server or group id.
    pub target: String,
    /// The name the upstream knows.
    pub upstream_name: String,
}

/// The aggregated catalogue at one moment.
#[derive(Debug, Default)]
pub struct Index {
    tools: HashMap<String, Route>,
    prompts: HashMap<String, Route>,
    resources: HashMap<String, String>,
    templates: Vec<(String, String)>,
    /// Rendered `tools/list` result.
    pub tools_result: Arc<str>,
    /// Rendered `prompts/list` result.
    pub prompts_result: Arc<str>,
    /// Rendered `resources/list` result.
    pub resources_result: Arc<str>,
    /// Rendered `resources/templates/list` result.
    pub templates_result: Arc<str>,
    /// Targets whose catalogue is not known yet (cold, no predefined tools).
    pub unknown_targets: Vec<String>,
    /// Number of tools exposed.
    pub tool_count: usize,
}

impl Index {
    /// Route for an exposed tool name.
    pub fn tool(&self, name: &str) -> Option<&Route> {
        self.tools.get(name)
    }

    /// Route for an exposed prompt name.
    pub fn prompt(&self, name: &str) -> Option<&Route> {
        self.prompts.get(name)
    }

    /// Target serving a resource URI: an exact listed URI, else the template with the
    /// longest literal prefix matching it.
    pub fn resource_target(&self, uri: &str) -> Option<&str> {
        if let Some(t) = self.resources.get(uri) {
            return Some(t);
        }
        self.templates
            .iter()
            .filter(|(prefix, _)| !prefix.is_empty() && uri.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len())
            .map(|(_, t)| t.as_str())
    }

    /// Exposed tool names by (target, upstream tool name): what `tools/list` calls each tool.
    pub fn exposed_tools(&self) -> HashMap<(&str, &str), &str> {
        self.tools
            .iter()
            .map(|(exposed, r)| {
                (
                    (r.target.as_str(), r.upstream_name.as_str()),
                    exposed.as_str(),
                )
            })
            .collect()
    }

    /// Every target that offers resources (fallback routing for unknown URIs).
    pub fn resource_targets(&self) -> HashSet<&str> {
        self.resources
            .values()
            .map(String::as_str)
            .chain(self.templates.iter().map(|(_, t)| t.as_str()))
            .collect()
    }
}

/// One visible target (a standalone server or a group) and the catalogue it shows.
pub struct TargetCatalog {
    /// Server or group id.
    pub target: String,
    /// Learned catalogue, if any.
    pub catalog: Option<Arc<Catalog>>,
    /// Predefined tools from config (used while the catalogue is unknown).
    pub predefined: Vec<CatalogEntry>,
    /// Its tool access policies, broad to narrow (a denied tool is not listed).
    pub policies: Vec<ToolPolicy>,
    /// For a group: each member's own config policies (a tool no member takes is not listed).
    pub members: Vec<Vec<ToolPolicy>>,
}

/// The tool access policies of `target` (a server or a group), broad to narrow.
pub fn policies_of(runtime: &Runtime, target: &str) -> Vec<ToolPolicy> {
    if let Some(g) = runtime.group(target) {
        return g.spec().tools.into_iter().collect();
    }
    match runtime
        .instance(target)
        .and_then(|i| i.spec().common().and_then(|c| c.tools.clone()))
    {
        Some(ToolsSpec::Policy(p)) => vec![p],
        _ => Vec::new(),
    }
}

/// For a group: the config policies of each member, by member id: the member entry's `tools`
/// in the group and the member server's own `tools` policy (empty for a server).
pub fn member_policies_of(runtime: &Runtime, target: &str) -> Vec<(String, Vec<ToolPolicy>)> {
    let Some(g) = runtime.group(target) else {
        return Vec::new();
    };
    g.spec()
        .members
        .into_iter()
        .map(|m| {
            let own = policies_of(runtime, &m.id);
            let levels = m.tools.into_iter().chain(own).collect();
            (m.id, levels)
        })
        .collect()
}

/// Visible targets: standalone servers (not members of a group) and groups (showing their
/// first member that has a catalogue).
pub fn visible_targets(runtime: &Runtime) -> Vec<TargetCatalog> {
    let groups = runtime.groups();
    let members: HashSet<String> = groups
        .iter()
        .flat_map(|g| g.spec().members.into_iter().map(|m| m.id))
        .collect();
    let mut out = Vec::new();
    for inst in runtime.instances() {
        if members.contains(inst.id()) {
            continue;
        }
        out.push(TargetCatalog {
            target: inst.id().to_owned(),
            catalog: runtime.catalog_of(&inst),
            predefined: predefined(&inst.spec()),
            policies: policies_of(runtime, inst.id()),
            members: Vec::new(),
        });
    }
    for g in groups {
        let spec = g.spec();
        let mut catalog = None;
        let mut pre = Vec::new();
        for m in &spec.members {
            if let Some(inst) = runtime.instance(&m.id) {
                if catalog.is_none() {
                    catalog = runtime.catalog_of(&inst);
                }
                if pre.is_empty() {
                    pre = predefined(&inst.spec());
                }
            }
        }
        out.push(TargetCatalog {
            target: g.id().to_owned(),
            catalog,
            predefined: pre,
            policies: policies_of(runtime, g.id()),
            members: member_policies_of(runtime, g.id())
                .into_iter()
                .map(|(_, levels)| levels)
                .collect(),
        });
    }
    out
}

fn predefined(spec: &ServerSpec) -> Vec<CatalogEntry> {
    match spec.common().and_then(|c| c.tools.as_ref()) {
        Some(ToolsSpec::Predefined(list)) => list
            .iter()
            .filter_map(|t| {
                let mut obj = serde_json::json!({ "name": t.name, "inputSchema": t.input_schema });
                if let Some(d) = &t.description {
                    obj["description"] = serde_json::Value::String(d.clone());
                }
                if let Some(o) = &t.output_schema {
                    obj["outputSchema"] = o.clone();
                }
                serde_json::value::to_raw_value(&obj)
                    .ok()
                    .map(|raw| CatalogEntry {
                        key: t.name.clone(),
                        raw,
                    })
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn render(key: &str, items: &[Box<RawValue>]) -> Arc<str> {
    let mut s = String::with_capacity(64 + items.iter().map(|i| i.get().len() + 1).sum::<usize>());
    s.push_str("{\"");
    s.push_str(key);
    s.push_str("\":[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(item.get());
    }
    s.push_str("]}");
    Arc::from(s)
}

/// Build the aggregated index from the visible targets.
pub fn build(
    targets: &[TargetCatalog],
    naming: Naming,
    extra_tools: &[serde_json::Value],
) -> Index {
    let mut idx = Index::default();
    // Count upstream names across targets for plain naming.
    let mut tool_counts: HashMap<&str, usize> = HashMap::new();
    let mut prompt_counts: HashMap<&str, usize> = HashMap::new();
    for t in targets {
        for e in tools_of(t) {
            *tool_counts.entry(e.key.as_str()).or_default() += 1;
        }
        if let Some(c) = &t.catalog {
            for e in &c.prompts {
                *prompt_counts.entry(e.key.as_str()).or_default() += 1;
            }
        }
    }
    let name_for = |target: &str, key: &str, counts: &HashMap<&str, usize>| match naming {
        Naming::Plain if counts.get(key) == Some(&1) && key.len() <= MAX_NAME => key.to_owned(),
        _ => exposed_name(target, key),
    };
    let mut tools = Vec::new();
    let mut prompts = Vec::new();
    let mut resources = Vec::new();
    let mut templates = Vec::new();
    for t in targets {
        if t.catalog.is_none() && t.predefined.is_empty() {
            idx.unknown_targets.push(t.target.clone());
        }
        for e in tools_of(t) {
            let exposed = name_for(&t.target, &e.key, &tool_counts);
            if idx.tools.contains_key(&exposed) {
                tracing::warn!(tool = %exposed, target = %t.target, "duplicate_exposed_tool_name_skipped");
                continue;
            }
            tools.push(e.renamed("name", &exposed));
            idx.tools.insert(
                exposed,
                Route {
                    target: t.target.clone(),
                    upstream_name: e.key.clone(),
                },
            );
        }
        let Some(c) = &t.catalog else { continue };
        for e in &c.prompts {
            let exposed = name_for(&t.target, &e.key, &prompt_counts);
            if idx.prompts.contains_key(&exposed) {
                continue;
            }
            prompts.push(e.renamed("name", &exposed));
            idx.prompts.insert(
                exposed,
                Route {
                    target: t.target.clone(),
                    upstream_name: e.key.clone(),
                },
            );
        }
        for e in &c.resources {
            if idx.resources.contains_key(&e.key) {
                continue;
            }
            resources.push(e.raw.clone());
            idx.resources.insert(e.key.clone(), t.target.clone());
        }
        for e in &c.resource_templates {
            templates.push(e.raw.clone());
            let prefix = e.key.split('{').next().unwrap_or_default().to_owned();
            idx.templates.push((prefix, t.target.clone()));
        }
    }
    idx.tool_count = tools.len();
    tools.extend(
        extra_tools
            .iter()
            .filter_map(|t| serde_json::value::to_raw_value(t).ok()),
    );
    idx.tools_result = render("tools", &tools);
    idx.prompts_result = render("prompts", &prompts);
    idx.resources_result = render("resources", &resources);
    idx.templates_result = render("resourceTemplates", &templates);
    idx
}

/// The tools `t` exposes: its catalogue (or predefined list) minus what its policies deny
/// (for a group: minus what every member's own policies deny).
fn tools_of(t: &TargetCatalog) -> impl Iterator<Item = &CatalogEntry> {
    use crate::auth::policy::{Rule, listed};
    let all = match &t.catalog {
        Some(c) => &c.tools,
        None => &t.predefined,
    };
    let rules = |ps: &[ToolPolicy]| -> Vec<Rule> {
        ps.iter()
            .map(|p| Rule::from_config(String::new(), p))
            .collect()
    };
    let base = rules(&t.policies);
    let members: Vec<Vec<Rule>> = if t.members.iter().all(Vec::is_empty) {
        Vec::new()
    } else {
        t.members.iter().map(|m| rules(m)).collect()
    };
    all.iter().filter(move |e| listed(&base, &members, &e.key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str) -> CatalogEntry {
        CatalogEntry {
            key: name.to_owned(),
            raw: serde_json::value::to_raw_value(&serde_json::json!({"name": name, "x-vendor": 1}))
                .unwrap(),
        }
    }

    fn target(id: &str, tools: &[&str]) -> TargetCatalog {
        TargetCatalog {
            target: id.to_owned(),
            catalog: Some(Arc::new(Catalog {
                tools: tools.iter().map(|t| entry(t)).collect(),
                ..Default::default()
            })),
            predefined: Vec::new(),
            policies: Vec::new(),
            members: Vec::new(),
        }
    }

    #[test]
    fn a_denied_tool_is_not_listed() {
        let mut t = target("fx", &["echo", "admin_drop", "admin_list"]);
        t.policies = vec![ToolPolicy {
            deny_list: vec!["admin_*".into()],
            ..ToolPolicy::default()
        }];
        let idx = build(&[t], Naming::Prefixed, &[]);
        assert!(idx.tool("fx__echo").is_some());
        assert!(idx.tool("fx__admin_drop").is_none() && idx.tool("fx__admin_list").is_none());
        assert!(!idx.tools_result.contains("admin_drop"));
    }

    #[test]
    fn prefixed_names_keep_unknown_fields() {
        let idx = build(
            &[target("math", &["add"]), target("time", &["now"])],
            Naming::Prefixed,
            &[],
        );
        assert_eq!(
            idx.tool("math__add"),
            Some(&Route {
                target: "math".into(),
                upstream_name: "add".into()
            })
        );
        assert!(
            idx.tools_result
                .contains(r#"{"name":"math__add","x-vendor":1}"#)
        );
        assert_eq!(idx.tool_count, 2);
    }

    #[test]
    fn long_names_are_hashed_stably_and_bounded() {
        let server = "a-very-long-server-identifier-used-by-some-team";
        let tool = "and_an_equally_long_tool_name_that_overflows_the_limit";
        let a = exposed_name(server, tool);
        let b = exposed_name(server, tool);
        assert_eq!(a, b);
        assert!(a.len() <= MAX_NAME, "{a}");
        assert!(a.starts_with("a-very-long-server-identifier"));
        assert_ne!(
            exposed_name(
                server,
                "and_an_equally_long_tool_name_that_overflows_the_limiT"
            ),
            a
        );
        let idx = build(&[target(server, &[tool])], Naming::Prefixed, &[]);
        assert_eq!(idx.tool(&a).unwrap().upstream_name, tool);
    }

    #[test]
    fn plain_naming_prefixes_only_collisions() {
        let idx = build(
            &[target("a", &["echo", "only_a"]), target("b", &["echo"])],
            Naming::Plain,
            &[],
        );
        assert!(idx.tool("only_a").is_some());
        assert!(idx.tool("echo").is_none());
        assert!(idx.tool("a__echo").is_some());
        assert!(idx.tool("b__echo").is_some());
    }

    #[test]
    fn resource_templates_route_by_longest_prefix() {
        let mut idx = Index::default();
        idx.templates.push(("file:///".into(), "fs".into()));
        idx.templates
            .push(("file:///special/".into(), "special".into()));
        assert_eq!(idx.resource_target("file:///special/x"), Some("special"));
        assert_eq!(idx.resource_target("file:///etc/x"), Some("fs"));
        assert_eq!(idx.resource_target("db://x"), None);
    }
}
