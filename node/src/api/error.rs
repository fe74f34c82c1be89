//! The API's errors in MCP Hangar's envelope,
//! `{"error":{"code":"<ErrorClass>","message":"…","details":{…}|null}}`, and the one mapping
//! from each room's typed error to a status code and an error class.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hangar_raft::RaftError;
use serde_json::{Value, json};

use crate::cluster::{ClusterError, RejectCode};
use crate::config::{ConfigError, Problem, ReloadError};
use crate::runtime::RuntimeError;

/// An API error rendered in MCP Hangar's envelope.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    details: Value,
}

/// A handler's result.
pub(super) type ApiResult = Result<Response, ApiError>;

impl ApiError {
    /// A new error.
    pub fn new(
        status: StatusCode,
        code: &'static str,
        message: impl Into<String>,
        details: Value,
    ) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            details,
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The details object.
    pub fn details(&self) -> &Value {
        &self.details
    }

    /// 422 `ValidationError` without details.
    pub(super) fn validation(message: impl Into<String>, details: Value) -> Self {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "ValidationError",
            message,
            details,
        )
    }

    /// 400 `ValidationError`: the body is not what the route takes.
    pub(super) fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "ValidationError",
            message,
            Value::Null,
        )
    }

    /// 404 `McpServerNotFoundError`.
    pub(super) fn server_not_found(id: &str) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "McpServerNotFoundError",
            format!(
                "MCP server '{id}' not found; GET /api/mcp_servers/ lists the configured servers"
            ),
            json!({ "mcp_server_id": id }),
        )
    }

    /// 404 `GroupNotFoundError`.
    pub(super) fn group_not_found(id: &str) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "GroupNotFoundError",
            format!("group '{id}' not found; GET /api/groups/ lists the groups"),
            json!({ "group_id": id }),
        )
    }

    /// 422 `ValidationError` for an invalid configuration (or definition), every problem with
    /// its path in `details.problems`; `what` says what was invalid.
    pub(super) fn invalid_config(what: &str, e: &ConfigError) -> Self {
        ApiError::validation(
            format!("{what}: {e}"),
            json!({ "problems": problems_json(&e.problems()) }),
        )
    }
}

/// Problems as the API shows them: `[{"path": "mcp_servers.x.command", "message": "…"}]`.
pub(super) fn problems_json(problems: &[Problem]) -> Value {
    Value::Array(
        problems
            .iter()
            .map(|p| json!({"path": p.path, "message": p.message}))
            .collect(),
    )
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body =
            json!({"error": {"code": self.code, "message": self.message, "details": self.details}});
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<RuntimeError> for ApiError {
    fn from(e: RuntimeError) -> Self {
        match &e {
            RuntimeError::Exists(id) => ApiError::new(
                StatusCode::CONFLICT,
                "McpServerAlreadyExistsError",
                e.to_string(),
                json!({ "mcp_server_id": id }),
            ),
            RuntimeError::NotFound(id) => ApiError::server_not_found(id),
            RuntimeError::IsGroup(id) => ApiError::new(
                StatusCode::CONFLICT,
                "ValidationError",
                e.to_string(),
                json!({ "mcp_server_id": id }),
            ),
        }
    }
}

impl From<ConfigError> for ApiError {
    fn from(e: ConfigError) -> Self {
        ApiError::invalid_config("invalid configuration", &e)
    }
}

impl From<ReloadError> for ApiError {
    fn from(e: ReloadError) -> Self {
        let details = match &e {
            ReloadError::Invalid(c) => json!({ "problems": problems_json(&c.problems()) }),
            ReloadError::NoFile | ReloadError::NotApplied(_) => Value::Null,
        };
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "ConfigurationReloadFailed",
            format!("the new configuration is invalid; the previous one keeps serving: {e}"),
            details,
        )
    }
}

fn raft_status(r: &RaftError) -> (StatusCode, &'static str) {
    match r {
        RaftError::NoLeader | RaftError::NotLeader { .. } | RaftError::ShuttingDown => {
            (StatusCode::SERVICE_UNAVAILABLE, "ClusterUnavailableError")
        }
        RaftError::Unreachable { .. } => (StatusCode::BAD_GATEWAY, "ClusterUnavailableError"),
        RaftError::Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "ClusterTimeoutError"),
        RaftError::Membership { .. } => (StatusCode::CONFLICT, "MembershipError"),
        RaftError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "ValidationError"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "ClusterError"),
    }
}

fn reject_status(code: RejectCode) -> (StatusCode, &'static str) {
    let status = match code {
        RejectCode::ServerExists
        | RejectCode::KeyExists
        | RejectCode::KeyHashExists
        | RejectCode::VersionMismatch
        | RejectCode::Conflict => StatusCode::CONFLICT,
        RejectCode::ServerNotFound
        | RejectCode::KeyNotFound
        | RejectCode::NotFound
        | RejectCode::RoleNotFound => StatusCode::NOT_FOUND,
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    };
    let class = match code {
        RejectCode::ServerExists => "McpServerAlreadyExistsError",
        RejectCode::ServerNotFound => "McpServerNotFoundError",
        RejectCode::Conflict => "ConflictError",
        _ => "ValidationError",
    };
    (status, class)
}

impl From<ClusterError> for ApiError {
    fn from(e: ClusterError) -> Self {
        let msg = e.to_string();
        match &e {
            ClusterError::Raft(r) => {
                let (status, code) = raft_status(r);
                ApiError::new(status, code, msg, json!({"raft_error": r}))
            }
            ClusterError::Rejected { code, .. } => {
                let (status, class) = reject_status(*code);
                ApiError::new(status, class, msg, json!({"reason": code.as_str()}))
            }
            ClusterError::Invalid(c) => {
                ApiError::invalid_config("the resulting configuration would be invalid", c)
            }
            ClusterError::ApplyTimeout(_) => {
                ApiError::new(StatusCode::ACCEPTED, "ApplyPending", msg, Value::Null)
            }
            ClusterError::AlreadyInitialized
            | ClusterError::NotALearner(_)
            | ClusterError::NotAMember(_)
            | ClusterError::LastVoter => ApiError::bad_request(msg),
            ClusterError::Contended { .. } => ApiError::new(
                StatusCode::CONFLICT,
                "ConcurrentModificationError",
                msg,
                Value::Null,
            ),
            ClusterError::PeerUnreachable { .. } | ClusterError::PeerRpc { .. } => {
                ApiError::new(StatusCode::BAD_GATEWAY, "PeerError", msg, Value::Null)
            }
            ClusterError::PeerRefused { status, code, .. } => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "PeerError",
                msg,
                json!({"peer_status": status, "peer_code": code}),
            ),
        }
    }
}
