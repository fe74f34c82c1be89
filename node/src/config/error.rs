//! Why a configuration, or one definition in it, is not valid.

use std::path::PathBuf;

/// One problem with its path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path (`mcp_servers.math.command`).
    pub path: String,
    /// What is wrong and what to do.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read configuration file {}: {reason}", path.display())]
    Unreadable {
        /// The path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The content is invalid.
    #[error("{} configuration problem(s): {}", problems.len(), problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid {
        /// Every problem found.
        problems: Vec<Problem>,
    },
}

impl ConfigError {
    /// Every problem with its path (an unreadable file is one problem without a path).
    pub fn problems(&self) -> Vec<Problem> {
        match self {
            ConfigError::Invalid { problems } => problems.clone(),
            ConfigError::Unreadable { reason, .. } => vec![Problem {
                path: String::new(),
                message: reason.clone(),
            }],
        }
    }
}

/// Problems of one server or group definition, each with its path
/// (`mcp_servers.<id>.<key>`), see [`validate_server`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} problem(s): {}", .0.len(), .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct Problems(pub Vec<Problem>);

impl From<Problems> for ConfigError {
    fn from(p: Problems) -> Self {
        ConfigError::Invalid { problems: p.0 }
    }
}
