//! What changed between two configurations.

use indexmap::IndexMap;
use serde::Serialize;

use super::ServerSpec;

/// What changed between two configurations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ConfigDiff {
    /// New ids.
    pub added: Vec<String>,
    /// Ids that disappeared.
    pub removed: Vec<String>,
    /// Ids whose definition changed.
    pub updated: Vec<String>,
    /// Ids left as they were.
    pub unchanged: Vec<String>,
}

/// Compare the servers and groups of two configurations.
pub fn diff(old: &IndexMap<String, ServerSpec>, new: &IndexMap<String, ServerSpec>) -> ConfigDiff {
    let mut d = ConfigDiff::default();
    for (id, spec) in new {
        match old.get(id) {
            None => d.added.push(id.clone()),
            Some(o) if o == spec => d.unchanged.push(id.clone()),
            Some(_) => d.updated.push(id.clone()),
        }
    }
    for id in old.keys() {
        if !new.contains_key(id) {
            d.removed.push(id.clone());
        }
    }
    d
}
