//! The thin JSON-RPC 2.0 envelope shared by the front door (`gateway/`) and the upstream
//! clients (`upstream/`).
//!
//! Only the envelope is parsed; `params`, `result` and `error.data` stay raw JSON
//! (`Box<RawValue>`) so the gateway never drops or reorders fields it does not understand.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// A JSON-RPC request id, kept exactly as the peer wrote it (a number or a string).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(untagged)]
pub enum Id {
    /// A numeric id. JSON-RPC allows fractions; MCP uses integers.
    Num(i64),
    /// A string id.
    Str(String),
}

impl std::fmt::Display for Id {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Id::Num(n) => write!(f, "{n}"),
            Id::Str(s) => write!(f, "{s:?}"),
        }
    }
}

/// A JSON-RPC error object. `data` stays raw.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RpcError {
    /// The error code (JSON-RPC and MCP codes; see the constants in this module).
    pub code: i64,
    /// A human-readable message.
    pub message: String,
    /// Optional structured detail, passed through untouched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Box<RawValue>>,
}

impl RpcError {
    /// An error without data.
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            data: None,
        }
    }

    /// An error with JSON data.
    pub fn with_data(code: i64, message: impl Into<String>, data: &serde_json::Value) -> Self {
        Self {
            code,
            message: message.into(),
            data: serde_json::value::to_raw_value(data).ok(),
        }
    }
}

/// Parse error (invalid JSON).
pub const PARSE_ERROR: i64 = -32700;
/// The JSON is not a valid request object.
pub const INVALID_REQUEST: i64 = -32600;
/// The method does not exist or is not available.
pub const METHOD_NOT_FOUND: i64 = -32601;
/// Invalid method parameters.
pub const INVALID_PARAMS: i64 = -32602;
/// Internal error.
pub const INTERNAL_ERROR: i64 = -32603;
/// Hangar: the upstream server could not be reached, died, or failed mid-call.
pub const UPSTREAM_ERROR: i64 = -32000;
/// Hangar: the request timed out.
pub const TIMEOUT_ERROR: i64 = -32001;
/// MCP: resource not found.
pub const RESOURCE_NOT_FOUND: i64 = -32002;
/// The caller lacks the permission the request needs.
pub const FORBIDDEN: i64 = -32003;

/// One JSON-RPC message of any kind (request, notification, response).
///
/// Classification: `method` + `id` = request; `method` without `id` = notification;
/// no `method` = response (`result` or `error`).
#[derive(Debug, Serialize, Deserialize, Default)]
pub struct Message {
    /// Always "2.0" on output; not checked strictly on input beyond presence.
    #[serde(default = "two_point_oh")]
    pub jsonrpc: String,
    /// Request or response id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Id>,
    /// Method name for requests and notifications.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Raw parameters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<Box<RawValue>>,
    /// Raw result of a successful response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Box<RawValue>>,
    /// Error of a failed response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RpcError>,
}

fn two_point_oh() -> String {
    "2.0".to_owned()
}

/// What kind of message a [`Message`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Has a method and an id.
    Request,
    /// Has a method, no id.
    Notification,
    /// Has an id and a result or an error, no method.
    Response,
    /// Anything else (reported as invalid request).
    Invalid,
}

impl Message {
    /// Classify the message.
    pub fn kind(&self) -> Kind {
        match (&self.method, &self.id, &self.result, &self.error) {
            (Some(_), Some(_), None, None) => Kind::Request,
            (Some(_), None, None, None) => Kind::Notification,
            (None, Some(_), Some(_), None) | (None, Some(_), None, Some(_)) => Kind::Response,
            _ => Kind::Invalid,
        }
    }

    /// A request.
    pub fn request(id: Id, method: impl Into<String>, params: Option<Box<RawValue>>) -> Self {
        Self {
            jsonrpc: two_point_oh(),
            id: Some(id),
            method: Some(method.into()),
            params,
            ..Default::default()
        }
    }

    /// A notification.
    pub fn notification(method: impl Into<String>, params: Option<Box<RawValue>>) -> Self {
        Self {
            jsonrpc: two_point_oh(),
            method: Some(method.into()),
            params,
            ..Default::default()
        }
    }

    /// A success response.
    pub fn response(id: Id, result: Box<RawValue>) -> Self {
        Self {
            jsonrpc: two_point_oh(),
            id: Some(id),
            result: Some(result),
            ..Default::default()
        }
    }

    /// An error response. `id` is `None` only for parse errors / unidentifiable requests,
    /// in which case `"id": null` is written.
    pub fn error(id: Option<Id>, error: RpcError) -> Self {
        Self {
            jsonrpc: two_point_oh(),
            id,
            error: Some(error),
            ..Default::default()
        }
    }

    /// Serialize to a compact JSON string. Error responses without an id get `"id":null`.
    pub fn to_json(&self) -> String {
        if self.id.is_none() && self.error.is_some() && self.method.is_none() {
            let err = serde_json::to_string(&self.error).unwrap_or_else(|_| "null".to_owned());
            return format!(r#"{{"jsonrpc":"2.0","id":null,"error":{err}}}"#);
        }
        serde_json::to_string(self).unwrap_or_else(|e| {
            format!(
                r#"{{"jsonrpc":"2.0","id":null,"error":{{"code":-32603,"message":"serialization failed: {}"}}}}"#,
                e.to_string().replace('"', "'")
            )
        })
    }
}

/// Serialize any value to a raw JSON value (infallible for plain `serde_json::Value`s).
pub fn raw(value: &serde_json::Value) -> Box<RawValue> {
    serde_json::value::to_raw_value(value).unwrap_or_else(|_| empty_object())
}

/// `{}` as a raw value.
pub fn empty_object() -> Box<RawValue> {
    RawValue::from_string("{}".to_owned()).unwrap_or_else(|_| unreachable_raw())
}

fn unreachable_raw() -> Box<RawValue> {
    // `{}` always parses; this path exists only to avoid `unwrap` in library code.
    serde_json::value::to_raw_value(&serde_json::Map::new()).unwrap_or_default()
}

/// A JSON object kept field by field as raw values: lets the gateway rewrite one field
/// (e.g. a tool `name`) and pass every other field through byte for byte.
pub type RawObject = indexmap::IndexMap<String, Box<RawValue>>;

/// Parse raw params as an object of raw fields (`None` params give an empty object).
pub fn raw_object(params: Option<&RawValue>) -> Result<RawObject, serde_json::Error> {
    match params {
        None => Ok(RawObject::new()),
        Some(p) => serde_json::from_str(p.get()),
    }
}

/// Serialize a raw object back to a raw value.
pub fn raw_from_object(obj: &RawObject) -> Box<RawValue> {
    serde_json::value::to_raw_value(obj).unwrap_or_else(|_| empty_object())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_messages() {
        let m: Message =
            serde_json::from_str(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#).unwrap();
        assert_eq!(m.kind(), Kind::Request);
        let m: Message =
            serde_json::from_str(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#)
                .unwrap();
        assert_eq!(m.kind(), Kind::Notification);
        let m: Message = serde_json::from_str(r#"{"jsonrpc":"2.0","id":"a","result":{}}"#).unwrap();
        assert_eq!(m.kind(), Kind::Response);
        let m: Message = serde_json::from_str(r#"{"jsonrpc":"2.0","id":"a"}"#).unwrap();
        assert_eq!(m.kind(), Kind::Invalid);
    }

    #[test]
    fn unknown_fields_survive_a_round_trip() {
        let input = r#"{"jsonrpc":"2.0","id":7,"result":{"tools":[{"name":"grep","x-vendor":"keep-me"}],"futureField":1}}"#;
        let m: Message = serde_json::from_str(input).unwrap();
        assert_eq!(m.to_json(), input);
    }

    #[test]
    fn raw_object_rewrites_one_field_only() {
        let p = RawValue::from_string(
            r#"{"name":"a__echo","arguments":{"x":1e400},"_meta":{"k":[1,2]}}"#.into(),
        )
        .unwrap();
        let mut obj = raw_object(Some(&p)).unwrap();
        obj.insert("name".into(), raw(&serde_json::json!("echo")));
        assert_eq!(
            raw_from_object(&obj).get(),
            r#"{"name":"echo","arguments":{"x":1e400},"_meta":{"k":[1,2]}}"#
        );
    }

    #[test]
    fn error_without_id_writes_null() {
        let m = Message::error(None, RpcError::new(PARSE_ERROR, "bad"));
        assert_eq!(
            m.to_json(),
            r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"bad"}}"#
        );
    }
}
