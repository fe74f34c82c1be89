//! Configuration reloads (SIGHUP, `POST /api/config/reload`, `hangar_reload_config`, the file
//! watcher): read and validate the file first — an invalid file changes nothing and is
//! reported — then hand the new servers to the node through a [`ReloadTarget`] port and report
//! what changed.
//!
//! The config room knows nothing of the cluster, the runtime or the gateway: the node
//! assembly implements [`ReloadTarget`] on top of them.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indexmap::IndexMap;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::{Config, ConfigDiff, ConfigError, ServerSpec};
use crate::telemetry::events::DomainEvent;

/// A boxed future borrowed from its receiver.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An error of another room, kept whole (its type and message) for the report.
pub type TargetError = Box<dyn std::error::Error + Send + Sync>;

/// What a reload acts on (the port the node assembly implements).
pub trait ReloadTarget: Send + Sync {
    /// The servers and groups running now.
    fn current(&self) -> IndexMap<String, ServerSpec>;
    /// Make `cfg`'s servers (`raw_servers`: `mcp_servers` as written in the file) and rate
    /// limits the desired file-sourced ones and return once this node runs them.
    fn apply<'a>(
        &'a self,
        cfg: &'a Config,
        file_hash: &'a str,
    ) -> BoxFuture<'a, Result<(), TargetError>>;
    /// Take the settings of the new file that apply without a restart (tool naming, timeouts).
    fn settings(&self, cfg: &Config);
    /// Publish a domain event (`ConfigurationReloadRequested`, `…Reloaded`, `…ReloadFailed`).
    fn publish(&self, event: DomainEvent);
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The node was started without a file.
    #[error("this node was started without a configuration file; nothing to reload")]
    NoFile,
    /// The file is unreadable or invalid.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    /// The file is valid but the node could not apply it (no quorum, merged config invalid…).
    #[error("{0}")]
    NotApplied(TargetError),
}

/// The outcome of a reload that was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReloadStatus {
    /// The new file runs.
    Success,
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReloadReport {
    /// Always `success` (a failure is a [`ReloadError`]).
    pub status: ReloadStatus,
    /// What changed.
    #[serde(flatten)]
    pub diff: ConfigDiff,
    /// Time taken.
    pub duration_ms: u64,
}

/// Who asked for a reload (the `requested_by` of the events).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requester {
    /// SIGHUP.
    Sighup,
    /// `POST /api/config/reload`.
    Api,
    /// The `hangar_reload_config` tool.
    Tool,
    /// The file watcher.
    FileWatcher,
}

impl Requester {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Requester::Sighup => "sighup",
            Requester::Api => "api",
            Requester::Tool => "tool",
            Requester::FileWatcher => "file_watcher",
        }
    }
}

/// Reloads the configuration file of this node.
pub struct Reloader {
    path: Option<PathBuf>,
    target: Arc<dyn ReloadTarget>,
    lock: tokio::sync::Mutex<()>,
    fingerprint: parking_lot::Mutex<Option<Vec<u8>>>,
}

impl Reloader {
    /// A reloader of the file at `path` (none: every reload is refused with [`ReloadError::NoFile`]).
    pub fn new(path: Option<PathBuf>, target: Arc<dyn ReloadTarget>) -> Reloader {
        Reloader {
            path,
            target,
            lock: tokio::sync::Mutex::new(()),
            fingerprint: parking_lot::Mutex::new(None),
        }
    }

    /// Reload now (one at a time).
    pub async fn reload(&self, by: Requester) -> Result<ReloadReport, ReloadError> {
        let _g = self.lock.lock().await;
        let t0 = Instant::now();
        let Some(path) = &self.path else {
            return Err(ReloadError::NoFile);
        };
        let requested_by = by.as_str();
        let shown = path.display().to_string();
        self.target
            .publish(DomainEvent::ConfigurationReloadRequested {
                config_path: shown.clone(),
                requested_by: requested_by.to_owned(),
            });
        let bytes = std::fs::read(path).ok();
        let failed = |e: ReloadError| {
            let msg = e.to_string();
            tracing::error!(error = %msg, requested_by, "configuration_reload_failed (the previous configuration keeps serving)");
            self.target.publish(DomainEvent::ConfigurationReloadFailed {
                config_path: Some(shown.clone()),
                requested_by: requested_by.to_owned(),
                error: msg,
            });
            *self.fingerprint.lock() = bytes.clone();
            Err(e)
        };
        let cfg = match super::load_file(path) {
            Ok(c) => c,
            Err(e) => return failed(e.into()),
        };
        let before = self.target.current();
        let hash = super::sha256_hex(bytes.as_deref().unwrap_or_default());
        if let Err(e) = self.target.apply(&cfg, &hash).await {
            return failed(ReloadError::NotApplied(e));
        }
        let diff = super::diff(&before, &self.target.current());
        self.target.settings(&cfg);
        *self.fingerprint.lock() = bytes;
        let duration_ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.target.publish(DomainEvent::ConfigurationReloaded {
            config_path: Some(shown),
            requested_by: requested_by.to_owned(),
            mcp_servers_added: diff.added.clone(),
            mcp_servers_removed: diff.removed.clone(),
            mcp_servers_updated: diff.updated.clone(),
            mcp_servers_unchanged: Some(diff.unchanged.clone()),
            reload_duration_ms: Some(duration_ms),
        });
        Ok(ReloadReport {
            status: ReloadStatus::Success,
            diff,
            duration_ms,
        })
    }

    /// Watch the file: reload when its content changes (checked every `period`).
    pub fn watch(self: Arc<Self>, period: Duration, shutdown: CancellationToken) {
        let Some(path) = self.path.clone() else {
            return;
        };
        *self.fingerprint.lock() = std::fs::read(&path).ok();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let now = std::fs::read(&path).ok();
                let changed = now.is_some() && *self.fingerprint.lock() != now;
                if changed {
                    tracing::info!(path = %path.display(), "config_file_modified_detected");
                    // A failure is logged and published by `reload` itself.
                    let _ = self.reload(Requester::FileWatcher).await;
                }
            }
        });
    }
}
