//! What one upstream offers: tools, prompts, resources and resource templates, learned by
//! listing them after the handshake (and again on `list_changed`). Items stay raw JSON so
//! no field is lost; only the key (`name` / `uri` / `uriTemplate`) is extracted.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::jsonrpc::{RawObject, raw};
use crate::telemetry::unix_now;
use crate::upstream::{Outcome, Upstream};

/// One catalogue item: its key and its raw JSON object.
#[derive(Debug, Clone)]
pub struct CatalogEntry {
    /// `name` for tools and prompts, `uri` for resources, `uriTemplate` for templates.
    pub key: String,
    /// The item exactly as the upstream sent it.
    pub raw: Box<RawValue>,
}

impl CatalogEntry {
    /// The item with its key field replaced (used for prefixed tool and prompt names).
    pub fn renamed(&self, field: &str, new_key: &str) -> Box<RawValue> {
        match serde_json::from_str::<RawObject>(self.raw.get()) {
            Ok(mut obj) => {
                obj.insert(
                    field.to_owned(),
                    raw(&serde_json::Value::String(new_key.to_owned())),
                );
                crate::jsonrpc::raw_from_object(&obj)
            }
            Err(_) => self.raw.clone(),
        }
    }

    /// A field of the item parsed as JSON (e.g. `description`, `inputSchema`).
    pub fn field(&self, name: &str) -> Option<serde_json::Value> {
        let obj: RawObject = serde_json::from_str(self.raw.get()).ok()?;
        obj.get(name)
            .and_then(|v| serde_json::from_str(v.get()).ok())
    }
}

/// Everything learned from one upstream.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    /// Tools.
    pub tools: Vec<CatalogEntry>,
    /// Prompts.
    pub prompts: Vec<CatalogEntry>,
    /// Static resources.
    pub resources: Vec<CatalogEntry>,
    /// Resource templates.
    pub resource_templates: Vec<CatalogEntry>,
    /// Unix time it was learned.
    pub learned_at: f64,
    /// Which capabilities the upstream declared (`tools`, `prompts`, `resources`, `logging`, `completions`).
    pub capabilities: Vec<String>,
}

#[derive(Deserialize)]
struct Page {
    #[serde(default)]
    tools: Option<Vec<Box<RawValue>>>,
    #[serde(default)]
    prompts: Option<Vec<Box<RawValue>>>,
    #[serde(default)]
    resources: Option<Vec<Box<RawValue>>>,
    #[serde(default, rename = "resourceTemplates")]
    resource_templates: Option<Vec<Box<RawValue>>>,
    #[serde(default, rename = "nextCursor")]
    next_cursor: Option<String>,
}

const LIST_TIMEOUT: Duration = Duration::from_secs(15);
const MAX_PAGES: usize = 100;

impl Catalog {
    /// List everything the upstream declares it offers. Failures of a single list are
    /// logged and leave that list empty; they never fail the start.
    pub async fn learn(conn: &Arc<Upstream>) -> Catalog {
        let caps: serde_json::Value =
            serde_json::from_str::<serde_json::Value>(conn.init().result.get())
                .ok()
                .and_then(|v| v.get("capabilities").cloned())
                .unwrap_or(serde_json::Value::Null);
        let has = |k: &str| caps.get(k).is_some();
        let capabilities: Vec<String> = caps
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        let mut cat = Catalog {
            learned_at: unix_now(),
            capabilities,
            ..Default::default()
        };
        if has("tools") || caps.is_null() {
            cat.tools = list_all(conn, "tools/list", "name", |p| p.tools).await;
        }
        if has("prompts") {
            cat.prompts = list_all(conn, "prompts/list", "name", |p| p.prompts).await;
        }
        if has("resources") {
            cat.resources = list_all(conn, "resources/list", "uri", |p| p.resources).await;
            cat.resource_templates =
                list_all(conn, "resources/templates/list", "uriTemplate", |p| {
                    p.resource_templates
                })
                .await;
        }
        cat
    }

    /// Whether the upstream declared a capability.
    pub fn has_capability(&self, name: &str) -> bool {
        self.capabilities.iter().any(|c| c == name)
    }

    /// Whether two catalogues offer the same items (by key, in order).
    pub fn same_lists(&self, other: &Catalog) -> bool {
        let keys = |v: &[CatalogEntry]| v.iter().map(|e| e.key.clone()).collect::<Vec<_>>();
        keys(&self.tools) == keys(&other.tools)
            && keys(&self.prompts) == keys(&other.prompts)
            && keys(&self.resources) == keys(&other.resources)
            && keys(&self.resource_templates) == keys(&other.resource_templates)
    }

    /// The four lists as JSON array text (tools, prompts, resources, resource templates),
    /// the form the cluster replicates.
    pub fn lists_json(&self) -> [String; 4] {
        let arr = |v: &[CatalogEntry]| {
            let mut s = String::from("[");
            for (i, e) in v.iter().enumerate() {
                if i > 0 {
                    s.push(',');
                }
                s.push_str(e.raw.get());
            }
            s.push(']');
            s
        };
        [
            arr(&self.tools),
            arr(&self.prompts),
            arr(&self.resources),
            arr(&self.resource_templates),
        ]
    }

    /// A catalogue from replicated lists (see [`lists_json`](Self::lists_json)). Items
    /// without their key field are skipped; unreadable lists are empty.
    pub fn from_lists(lists: [&str; 4], learned_at: f64) -> Catalog {
        let parse = |text: &str, key: &str| -> Vec<CatalogEntry> {
            let items: Vec<Box<RawValue>> = serde_json::from_str(text).unwrap_or_default();
            items
                .into_iter()
                .filter_map(|raw| {
                    let obj: RawObject = serde_json::from_str(raw.get()).ok()?;
                    let key: String = serde_json::from_str(obj.get(key)?.get()).ok()?;
                    Some(CatalogEntry { key, raw })
                })
                .collect()
        };
        let mut cat = Catalog {
            tools: parse(lists[0], "name"),
            prompts: parse(lists[1], "name"),
            resources: parse(lists[2], "uri"),
            resource_templates: parse(lists[3], "uriTemplate"),
            learned_at,
            capabilities: Vec::new(),
        };
        for (name, present) in [
            ("tools", !cat.tools.is_empty()),
            ("prompts", !cat.prompts.is_empty()),
            (
                "resources",
                !cat.resources.is_empty() || !cat.resource_templates.is_empty(),
            ),
        ] {
            if present {
                cat.capabilities.push(name.to_owned());
            }
        }
        cat
    }

    /// Find a tool by its upstream name.
    pub fn tool(&self, name: &str) -> Option<&CatalogEntry> {
        self.tools.iter().find(|t| t.key == name)
    }
}

async fn list_all(
    conn: &Arc<Upstream>,
    method: &str,
    key_field: &str,
    pick: impl Fn(Page) -> Option<Vec<Box<RawValue>>>,
) -> Vec<CatalogEntry> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..MAX_PAGES {
        let params = cursor
            .as_ref()
            .map(|c| raw(&serde_json::json!({ "cursor": c })));
        let res = conn.request(method, params, None, Some(LIST_TIMEOUT)).await;
        let page: Page = match res {
            Ok(Outcome::Result(r)) => match serde_json::from_str(r.get()) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(mcp_server = conn.server_id(), method, error = %e, "catalog_list_unparseable");
                    break;
                }
            },
            Ok(Outcome::Error(e)) => {
                tracing::debug!(mcp_server = conn.server_id(), method, code = e.code, message = %e.message, "catalog_list_refused");
                break;
            }
            Err(e) => {
                tracing::warn!(mcp_server = conn.server_id(), method, error = %e, "catalog_list_failed");
                break;
            }
        };
        let next = page.next_cursor.clone();
        for item in pick(page).unwrap_or_default() {
            let key = serde_json::from_str::<RawObject>(item.get())
                .ok()
                .and_then(|o| {
                    o.get(key_field)
                        .and_then(|v| serde_json::from_str::<String>(v.get()).ok())
                });
            match key {
                Some(key) => out.push(CatalogEntry { key, raw: item }),
                None => tracing::warn!(
                    mcp_server = conn.server_id(),
                    method,
                    "catalog_item_without_key_skipped"
                ),
            }
        }
        match next {
            Some(c) if !c.is_empty() => cursor = Some(c),
            _ => break,
        }
    }
    out
}
