//! Cold start: the time from nothing running to the answer of the first `tools/call`.
//!
//! * direct: spawn the server, `initialize` + `notifications/initialized`, first call
//!   (the process is then stopped, outside the timed part);
//! * through Hangar: `POST /api/mcp_servers/{id}/stop`, wait until the server reports `cold`,
//!   then time one `tools/call` on `/mcp` (a new connection; Hangar spawns and initializes the
//!   upstream inside that call).

use std::time::Duration;

use hangar_wait::Wait;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::histogram::{HistogramError, Latency, us_to_ms};
use crate::http1::{HttpTarget, RawClient, simple_request};
use crate::load::Caller;
use crate::rpc::{CallError, CallTemplate, ErrorKind, snippet};
use crate::stdio::StdioServer;

/// One cold-start measurement series, written as one JSON line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ColdRecord {
    /// Always `cold`.
    pub bench: String,
    /// Label used to pair series in reports (e.g. `direct-fixture`).
    pub label: String,
    /// The server command or URL.
    pub target: String,
    /// The tool called.
    pub tool: String,
    /// Repetitions that succeeded (the samples).
    pub reps: u64,
    /// Repetitions that failed.
    pub errors: u64,
    /// Median, ms.
    pub p50_ms: f64,
    /// 90th percentile, ms.
    pub p90_ms: f64,
    /// Fastest, ms.
    pub min_ms: f64,
    /// Slowest, ms.
    pub max_ms: f64,
    /// The first error, if any.
    pub first_error: Option<String>,
}

impl ColdRecord {
    /// Summarise a series.
    pub fn new(
        label: &str,
        target: &str,
        tool: &str,
        lat: &Latency,
        errors: u64,
        first_error: Option<String>,
    ) -> Self {
        let s = lat.summary();
        Self {
            bench: "cold".into(),
            label: label.into(),
            target: target.into(),
            tool: tool.into(),
            reps: s.count,
            errors,
            p50_ms: us_to_ms(s.p50_us),
            p90_ms: us_to_ms(s.p90_us),
            min_ms: us_to_ms(s.min_us),
            max_ms: us_to_ms(s.max_us),
            first_error,
        }
    }
}

/// Run `once` `reps` times and collect the durations.
pub async fn series<F, Fut>(
    reps: usize,
    mut once: F,
) -> Result<(Latency, u64, Option<String>), HistogramError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Duration, String>>,
{
    let mut lat = Latency::new()?;
    let mut errors = 0;
    let mut first_error = None;
    for _ in 0..reps {
        match once().await {
            Ok(d) => lat.record(d),
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    Ok((lat, errors, first_error))
}

/// Spawn `argv`, handshake, make the first call: the time until its answer. The server is then
/// shut down (not timed).
pub async fn direct_once(
    argv: &[String],
    protocol_version: &str,
    template: &CallTemplate,
    timeout: Duration,
) -> Result<Duration, String> {
    let t0 = Instant::now();
    let server = StdioServer::start(argv, protocol_version, template.clone(), timeout)
        .await
        .map_err(|e| e.to_string())?;
    let mut caller = server.caller(0);
    let r = tokio::time::timeout(timeout, caller.call()).await;
    let elapsed = t0.elapsed();
    drop(caller);
    server.shutdown(Duration::from_secs(5)).await;
    match r {
        Ok(r) => r.outcome.map(|()| elapsed).map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer to the first call within {timeout:?}")),
    }
}

fn json_headers() -> Vec<(String, String)> {
    vec![("Content-Type".into(), "application/json".into())]
}

/// Stop server `id` through Hangar's API and wait (≤ `timeout`) until it reports `cold`.
pub async fn make_cold(target: &HttpTarget, id: &str, timeout: Duration) -> Result<(), CallError> {
    let auth = &target.url.authority;
    let mut headers = json_headers();
    headers.extend(target.headers.iter().cloned());
    let path = format!("/api/mcp_servers/{id}/stop");
    let (status, body) = simple_request(auth, "POST", &path, &headers, b"{}").await?;
    if status != 200 {
        return Err(CallError::new(
            ErrorKind::Http,
            format!("POST {path}: HTTP {status}: {}", snippet(&body, 300)),
        ));
    }
    let path = format!("/api/mcp_servers/{id}");
    let mut last = (0, Vec::new());
    let waited = Wait::new(format!("server '{id}' to be cold"), timeout)
        .try_poll_async(async || {
            let (status, body) = simple_request(auth, "GET", &path, &target.headers, b"").await?;
            let state = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("state").and_then(|s| s.as_str()).map(str::to_owned));
            let cold = status == 200 && state.as_deref() == Some("cold");
            last = (status, body);
            Ok::<_, CallError>(cold.then_some(()))
        })
        .await?;
    waited.map_err(|_| {
        CallError::new(
            ErrorKind::Timeout,
            format!(
                "server '{id}' not cold within {timeout:?}: HTTP {}: {}",
                last.0,
                snippet(&last.1, 300)
            ),
        )
    })
}

/// Make server `id` cold, then time one `tools/call` through `target` (a new connection).
pub async fn hangar_once(
    target: &HttpTarget,
    id: &str,
    template: &CallTemplate,
    timeout: Duration,
) -> Result<Duration, String> {
    make_cold(target, id, timeout)
        .await
        .map_err(|e| e.to_string())?;
    let mut client = RawClient::new(target, template.clone(), 1);
    let t0 = Instant::now();
    let r = tokio::time::timeout(timeout, client.call_once()).await;
    let elapsed = t0.elapsed();
    match r {
        Ok(Ok(())) => Ok(elapsed),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer to the first call within {timeout:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn series_counts_samples_and_errors() {
        let mut n = 0u64;
        let (lat, errors, first) = series(5, || {
            n += 1;
            let k = n;
            async move {
                if k == 2 {
                    Err(format!("boom {k}"))
                } else {
                    Ok(Duration::from_millis(10 * k))
                }
            }
        })
        .await
        .unwrap();
        assert_eq!((lat.count(), errors), (4, 1));
        assert_eq!(first.as_deref(), Some("boom 2"));
        let r = ColdRecord::new("direct", "t", "echo", &lat, errors, first);
        assert_eq!((r.min_ms, r.max_ms), (10.0, 50.0));
        assert_eq!(r.p50_ms, 30.0);
        assert_eq!(r.bench, "cold");
    }

    #[tokio::test]
    async fn direct_cold_start_of_a_shell_server() {
        // Answers initialize and every tools/call (same shape as the stdio module's test server).
        let script = r#"
while IFS= read -r line; do
  id=$(printf '%s' "$line" | sed -n 's/.*"id":\([0-9]*\).*/\1/p')
  case "$line" in
    *'"initialize"'*) printf '{"jsonrpc":"2.0","id":%s,"result":{"protocolVersion":"2025-11-25","capabilities":{},"serverInfo":{"name":"sh","version":"0"}}}\n' "$id" ;;
    *'"tools/call"'*) printf '{"jsonrpc":"2.0","id":%s,"result":{"content":[]}}\n' "$id" ;;
  esac
done
"#;
        let argv = vec!["sh".to_owned(), "-c".to_owned(), script.to_owned()];
        let t = CallTemplate::tools_call("echo", &serde_json::json!({})).unwrap();
        let d = direct_once(&argv, "2025-11-25", &t, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(d > Duration::ZERO && d < Duration::from_secs(10), "{d:?}");
        let bad = vec!["/nonexistent/server".to_owned()];
        assert!(
            direct_once(&bad, "2025-11-25", &t, Duration::from_secs(1))
                .await
                .is_err()
        );
    }
}
