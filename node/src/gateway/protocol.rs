//! MCP protocol revisions and per-request negotiation.
//!
//! Handshake era (2024-11-05 … 2025-11-25): `initialize` picks the version. Stateless era
//! (2026-07-28): every request carries `_meta["io.modelcontextprotocol/protocolVersion"]`
//! and `clientCapabilities`; `server/discover` replaces `initialize`.

use serde_json::value::RawValue;

use crate::jsonrpc::{INVALID_PARAMS, RawObject, RpcError};

/// The stateless revision.
pub const MODERN: &str = "2026-07-28";
/// Newest handshake-era revision (answered when a client asks for an unknown one).
pub const LATEST_HANDSHAKE: &str = "2025-11-25";
/// Every revision the front door speaks, newest first.
pub const SUPPORTED: &[&str] = &[
    MODERN,
    "2025-11-25",
    "2025-06-18",
    "2025-03-26",
    "2024-11-05",
];
/// `_meta` key carrying the protocol version of a stateless request.
pub const META_VERSION: &str = "io.modelcontextprotocol/protocolVersion";
/// `_meta` key carrying the client's capabilities on a stateless request.
pub const META_CAPS: &str = "io.modelcontextprotocol/clientCapabilities";
/// `_meta` key carrying the client's identity on a stateless request.
pub const META_CLIENT: &str = "io.modelcontextprotocol/clientInfo";
/// `_meta` key carrying the server's identity on a `server/discover` result.
pub const META_SERVER: &str = "io.modelcontextprotocol/serverInfo";
/// JSON-RPC error: unsupported protocol version (2026-07-28).
pub const UNSUPPORTED_VERSION: i64 = -32022;
/// JSON-RPC error: a required client capability is missing (2026-07-28).
pub const MISSING_CAPABILITY: i64 = -32003;

/// Whether `v` is a revision we speak.
pub fn is_supported(v: &str) -> bool {
    SUPPORTED.contains(&v)
}

/// The version to answer an `initialize` that asked for `requested`.
pub fn negotiate(requested: Option<&str>) -> &'static str {
    match requested {
        Some(v) if v != MODERN => SUPPORTED
            .iter()
            .find(|s| **s == v)
            .copied()
            .unwrap_or(LATEST_HANDSHAKE),
        _ => LATEST_HANDSHAKE,
    }
}

/// What a stateless request declared in its `_meta`.
#[derive(Debug, Clone)]
pub struct ModernMeta {
    /// Declared protocol version.
    pub version: String,
    /// Declared client capabilities.
    pub capabilities: serde_json::Value,
}

/// The error for an unsupported version (data lists what we support).
pub fn unsupported_version(requested: &str) -> RpcError {
    RpcError::with_data(
        UNSUPPORTED_VERSION,
        format!(
            "Unsupported protocol version '{requested}'; this gateway supports {}",
            SUPPORTED.join(", ")
        ),
        &serde_json::json!({ "supported": SUPPORTED, "requested": requested }),
    )
}

/// Inspect `params._meta` for the stateless-era fields. `Ok(None)` = a handshake-era request.
pub fn modern_meta(params: &RawObject) -> Result<Option<ModernMeta>, RpcError> {
    let Some(meta) = params.get("_meta") else {
        return Ok(None);
    };
    if !meta.get().contains("io.modelcontextprotocol/") {
        return Ok(None);
    }
    let meta: serde_json::Map<String, serde_json::Value> = serde_json::from_str(meta.get())
        .map_err(|_| RpcError::new(INVALID_PARAMS, "params._meta must be an object"))?;
    let Some(version) = meta.get(META_VERSION) else {
        if meta.contains_key(META_CAPS) || meta.contains_key(META_CLIENT) {
            return Err(RpcError::new(
                INVALID_PARAMS,
                format!("params._meta is missing '{META_VERSION}'"),
            ));
        }
        return Ok(None);
    };
    let version = version.as_str().ok_or_else(|| {
        RpcError::new(
            INVALID_PARAMS,
            format!("params._meta['{META_VERSION}'] must be a string"),
        )
    })?;
    if !is_supported(version) {
        return Err(unsupported_version(version));
    }
    let capabilities = meta.get(META_CAPS).cloned().ok_or_else(|| {
        RpcError::new(
            INVALID_PARAMS,
            format!("params._meta is missing '{META_CAPS}' (required on every {MODERN} request)"),
        )
    })?;
    if !capabilities.is_object() {
        return Err(RpcError::new(
            INVALID_PARAMS,
            format!("params._meta['{META_CAPS}'] must be an object"),
        ));
    }
    Ok(Some(ModernMeta {
        version: version.to_owned(),
        capabilities,
    }))
}

/// Methods whose 2026-07-28 result schema is `CacheableResult` (`cacheScope` and `ttlMs`
/// are required besides `resultType`).
const CACHEABLE: &[&str] = &[
    "server/discover",
    "tools/list",
    "prompts/list",
    "resources/list",
    "resources/templates/list",
    "resources/read",
];

/// Complete the result of a 2026-07-28 request: every result carries `resultType`
/// (`"complete"`); cacheable ones also `cacheScope` (`"private"`: what the gateway lists
/// depends on the caller's authorization) and `ttlMs` (0: no caching hint). Fields already
/// present (from an upstream that speaks the revision) are kept.
pub fn modern_result(method: &str, result: Box<RawValue>) -> Box<RawValue> {
    let Ok(mut obj) = serde_json::from_str::<RawObject>(result.get()) else {
        return result;
    };
    let mut fields = vec![("resultType", r#""complete""#)];
    if CACHEABLE.contains(&method) {
        fields.extend([("cacheScope", r#""private""#), ("ttlMs", "0")]);
    }
    for (key, value) in fields {
        if !obj.contains_key(key)
            && let Ok(v) = RawValue::from_string(value.to_owned())
        {
            obj.insert(key.to_owned(), v);
        }
    }
    crate::jsonrpc::raw_from_object(&obj)
}

/// Remove the stateless-era `_meta` keys before forwarding params to a handshake-era upstream.
pub fn strip_modern_meta(params: &mut RawObject) {
    let Some(meta) = params.get("_meta") else {
        return;
    };
    if !meta.get().contains("io.modelcontextprotocol/") {
        return;
    }
    let Ok(mut m) = serde_json::from_str::<RawObject>(meta.get()) else {
        return;
    };
    m.retain(|k, _| !k.starts_with("io.modelcontextprotocol/"));
    if m.is_empty() {
        params.shift_remove("_meta");
    } else {
        params.insert("_meta".to_owned(), crate::jsonrpc::raw_from_object(&m));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jsonrpc::raw_object;
    use serde_json::value::RawValue;

    fn obj(s: &str) -> RawObject {
        let raw = RawValue::from_string(s.to_owned()).unwrap();
        raw_object(Some(&raw)).unwrap()
    }

    #[test]
    fn negotiation() {
        assert_eq!(negotiate(Some("2024-11-05")), "2024-11-05");
        assert_eq!(negotiate(Some("2025-06-18")), "2025-06-18");
        assert_eq!(negotiate(Some("1999-01-01")), LATEST_HANDSHAKE);
        assert_eq!(negotiate(None), LATEST_HANDSHAKE);
    }

    #[test]
    fn modern_meta_rules() {
        assert!(modern_meta(&obj(r#"{"name":"x"}"#)).unwrap().is_none());
        let ok = obj(
            r#"{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}"#,
        );
        assert_eq!(modern_meta(&ok).unwrap().unwrap().version, MODERN);
        let bad = obj(
            r#"{"_meta":{"io.modelcontextprotocol/protocolVersion":"2030-01-01","io.modelcontextprotocol/clientCapabilities":{}}}"#,
        );
        assert_eq!(modern_meta(&bad).unwrap_err().code, UNSUPPORTED_VERSION);
        let no_caps = obj(r#"{"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}"#);
        assert_eq!(modern_meta(&no_caps).unwrap_err().code, INVALID_PARAMS);
    }

    #[test]
    fn strips_only_protocol_keys() {
        let mut p = obj(
            r#"{"name":"x","_meta":{"progressToken":1,"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}"#,
        );
        strip_modern_meta(&mut p);
        assert_eq!(
            crate::jsonrpc::raw_from_object(&p).get(),
            r#"{"name":"x","_meta":{"progressToken":1}}"#
        );
    }

    #[test]
    fn modern_results_carry_result_type_and_cache_fields() {
        let r = |s: &str| RawValue::from_string(s.to_owned()).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(modern_result("tools/list", r(r#"{"tools":[]}"#)).get()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"tools": [], "resultType": "complete", "cacheScope": "private", "ttlMs": 0})
        );
        let v: serde_json::Value = serde_json::from_str(
            modern_result("tools/call", r(r#"{"content":[],"resultType":"x"}"#)).get(),
        )
        .unwrap();
        assert_eq!(v, serde_json::json!({"content": [], "resultType": "x"}));
    }
}
