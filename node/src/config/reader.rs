//! Path-tracking typed reader over a parsed YAML document: every problem is collected with
//! its path, and keys nobody read are reported as unknown (with a "did you mean" hint).

use std::cell::RefCell;
use std::collections::HashSet;

use serde_json::{Map, Value};

use super::Problem;

/// Collects problems while reading.
#[derive(Default)]
pub(super) struct ProblemSink(RefCell<Vec<Problem>>);

impl ProblemSink {
    /// Record a problem.
    pub(super) fn push(&self, path: &str, message: impl Into<String>) {
        self.0.borrow_mut().push(Problem {
            path: path.to_owned(),
            message: message.into(),
        });
    }

    /// All problems so far.
    pub(super) fn take(self) -> Vec<Problem> {
        self.0.into_inner()
    }

    /// Whether any problem was recorded.
    pub(super) fn is_empty(&self) -> bool {
        self.0.borrow().is_empty()
    }
}

/// A mapping being read at `path`.
pub(super) struct Obj<'a> {
    map: &'a Map<String, Value>,
    path: String,
    pub(super) p: &'a ProblemSink,
    allowed: RefCell<HashSet<&'static str>>,
}

/// Join a path and a key.
pub(super) fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// JSON type name for messages.
pub(super) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

impl<'a> Obj<'a> {
    /// Read `v` at `path` as a mapping (reports a problem and returns None otherwise).
    pub(super) fn new(v: &'a Value, path: &str, p: &'a ProblemSink) -> Option<Obj<'a>> {
        match v {
            Value::Object(map) => Some(Obj {
                map,
                path: path.to_owned(),
                p,
                allowed: RefCell::new(HashSet::new()),
            }),
            other => {
                p.push(path, format!("must be a mapping, got {}", type_name(other)));
                None
            }
        }
    }

    /// Path of this mapping.
    pub(super) fn path_str(&self) -> String {
        self.path.clone()
    }

    /// Path of a key.
    pub(super) fn at(&self, key: &str) -> String {
        join(&self.path, key)
    }

    /// Raw value of a key (marks it known).
    pub(super) fn raw(&self, key: &'static str) -> Option<&'a Value> {
        self.allowed.borrow_mut().insert(key);
        match self.map.get(key) {
            Some(Value::Null) | None => None,
            Some(v) => Some(v),
        }
    }

    /// Mark keys as known without reading them.
    pub(super) fn allow(&self, keys: &[&'static str]) {
        self.allowed.borrow_mut().extend(keys.iter().copied());
    }

    /// Whether the key is present (and not null).
    pub(super) fn has(&self, key: &str) -> bool {
        matches!(self.map.get(key), Some(v) if !v.is_null())
    }

    /// A string.
    pub(super) fn str(&self, key: &'static str) -> Option<String> {
        match self.raw(key)? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            other => {
                self.p.push(
                    &self.at(key),
                    format!("must be a string, got {}", type_name(other)),
                );
                None
            }
        }
    }

    /// A required string.
    pub(super) fn req_str(&self, key: &'static str, what: &str) -> Option<String> {
        let v = self.str(key);
        if v.is_none() && !self.has(key) {
            self.p.push(&self.at(key), format!("is required ({what})"));
        }
        v
    }

    /// A boolean.
    pub(super) fn bool(&self, key: &'static str, default: bool) -> bool {
        match self.raw(key) {
            None => default,
            Some(Value::Bool(b)) => *b,
            Some(Value::String(s))
                if matches!(s.to_ascii_lowercase().as_str(), "true" | "yes" | "on" | "1") =>
            {
                true
            }
            Some(Value::String(s))
                if matches!(
                    s.to_ascii_lowercase().as_str(),
                    "false" | "no" | "off" | "0"
                ) =>
            {
                false
            }
            Some(other) => {
                self.p.push(
                    &self.at(key),
                    format!("must be true or false, got {}", type_name(other)),
                );
                default
            }
        }
    }

    /// An integer within `[min, max]`.
    pub(super) fn int(&self, key: &'static str, default: u64, min: u64, max: u64) -> u64 {
        let v = match self.raw(key) {
            None => return default,
            Some(Value::Number(n)) => n.as_u64().or_else(|| {
                n.as_f64()
                    .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                    .map(|f| f as u64)
            }),
            Some(Value::String(s)) => s.trim().parse::<u64>().ok(),
            Some(_) => None,
        };
        match v {
            Some(v) if v >= min && v <= max => v,
            Some(v) => {
                self.p.push(
                    &self.at(key),
                    format!("must be between {min} and {max}, got {v}"),
                );
                default
            }
            None => {
                self.p.push(
                    &self.at(key),
                    format!("must be a whole number between {min} and {max}"),
                );
                default
            }
        }
    }

    /// A number within `[min, max]`.
    pub(super) fn num(&self, key: &'static str, default: f64, min: f64, max: f64) -> f64 {
        let v = match self.raw(key) {
            None => return default,
            Some(Value::Number(n)) => n.as_f64(),
            Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
            Some(_) => None,
        };
        match v {
            Some(v) if v.is_finite() && v >= min && v <= max => v,
            Some(v) => {
                self.p.push(
                    &self.at(key),
                    format!("must be between {min} and {max}, got {v}"),
                );
                default
            }
            None => {
                self.p.push(
                    &self.at(key),
                    format!("must be a number between {min} and {max}"),
                );
                default
            }
        }
    }

    /// A list of strings.
    pub(super) fn str_list(&self, key: &'static str) -> Option<Vec<String>> {
        match self.raw(key)? {
            Value::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, it) in items.iter().enumerate() {
                    match it {
                        Value::String(s) => out.push(s.clone()),
                        Value::Number(n) => out.push(n.to_string()),
                        Value::Bool(b) => out.push(b.to_string()),
                        other => self.p.push(
                            &format!("{}[{i}]", self.at(key)),
                            format!("must be a string, got {}", type_name(other)),
                        ),
                    }
                }
                Some(out)
            }
            Value::String(s) => {
                self.p.push(
                    &self.at(key),
                    format!("must be a list of strings (write [\"{s}\"] for a single element)"),
                );
                None
            }
            other => {
                self.p.push(
                    &self.at(key),
                    format!("must be a list of strings, got {}", type_name(other)),
                );
                None
            }
        }
    }

    /// A mapping of string to string.
    pub(super) fn str_map(&self, key: &'static str) -> indexmap::IndexMap<String, String> {
        let mut out = indexmap::IndexMap::new();
        let Some(v) = self.raw(key) else { return out };
        let Value::Object(m) = v else {
            self.p.push(
                &self.at(key),
                format!(
                    "must be a mapping of names to strings, got {}",
                    type_name(v)
                ),
            );
            return out;
        };
        for (k, v) in m {
            match v {
                Value::String(s) => {
                    out.insert(k.clone(), s.clone());
                }
                Value::Number(n) => {
                    out.insert(k.clone(), n.to_string());
                }
                Value::Bool(b) => {
                    out.insert(k.clone(), b.to_string());
                }
                other => self.p.push(
                    &join(&self.at(key), k),
                    format!("must be a string, got {}", type_name(other)),
                ),
            }
        }
        out
    }

    /// A nested mapping.
    pub(super) fn obj(&self, key: &'static str) -> Option<Obj<'a>> {
        let v = self.raw(key)?;
        Obj::new(v, &self.at(key), self.p)
    }

    /// Report keys that were never read as unknown.
    pub(super) fn finish(&self) {
        let allowed = self.allowed.borrow();
        for k in self.map.keys() {
            if allowed.contains(k.as_str()) {
                continue;
            }
            let hint = allowed
                .iter()
                .filter(|a| edit_distance(a, k) <= 2)
                .min_by_key(|a| edit_distance(a, k))
                .map(|a| format!("; did you mean `{a}`?"))
                .unwrap_or_default();
            self.p.push(&self.at(k), format!("unknown key{hint}"));
        }
    }
}

/// Levenshtein distance (small strings).
pub(super) fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut cur = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
        }
        prev = cur;
    }
    prev[b.len()]
}
