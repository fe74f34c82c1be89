//! Poll a condition until it holds or a deadline passes — the one wait helper of Hangar's
//! tests and benchmarks (the end-to-end and cluster tests, the Raft tests, the node's unit
//! tests and `hangar-bench`).
//!
//! A [`Wait`] names what is awaited, how long it may take and how often to look. The
//! condition is checked at once, then after every step; the last sleep is cut short so the
//! condition is checked once more exactly at the deadline and never later. The result is the
//! first `Some` the condition returns, or a typed [`Timeout`] saying what was awaited and for
//! how long (`expect*` panic with that message instead, for tests).
//!
//! ```
//! use std::time::Duration;
//! use hangar_wait::Wait;
//!
//! let mut n = 0;
//! let v = Wait::new("the third look", Duration::from_secs(5))
//!     .step(Duration::from_millis(1))
//!     .poll(|| {
//!         n += 1;
//!         (n == 3).then_some(n)
//!     });
//! assert_eq!(v, Ok(3));
//! ```
#![deny(missing_docs)]

use std::convert::Infallible;
use std::fmt;
use std::time::Duration;

/// The default interval between two checks of a condition.
pub const DEFAULT_STEP: Duration = Duration::from_millis(20);

/// A condition did not hold before its deadline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timeout {
    /// What was awaited.
    pub what: String,
    /// How long it was awaited.
    pub after: Duration,
}

impl fmt::Display for Timeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "timed out after {:?} waiting for {}",
            self.after, self.what
        )
    }
}

impl std::error::Error for Timeout {}

/// What to wait for, for how long, and how often to look.
#[derive(Clone, Debug)]
pub struct Wait {
    what: String,
    timeout: Duration,
    step: Duration,
}

impl Wait {
    /// Wait up to `timeout` for `what` (a description used in the [`Timeout`]), looking every
    /// [`DEFAULT_STEP`].
    pub fn new(what: impl Into<String>, timeout: Duration) -> Self {
        Self {
            what: what.into(),
            timeout,
            step: DEFAULT_STEP,
        }
    }

    /// Look every `step` instead (a zero step polls without pausing).
    #[must_use]
    pub fn step(mut self, step: Duration) -> Self {
        self.step = step;
        self
    }

    /// What is awaited.
    pub fn what(&self) -> &str {
        &self.what
    }

    /// How long it may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn timed_out(&self) -> Timeout {
        Timeout {
            what: self.what.clone(),
            after: self.timeout,
        }
    }

    /// How long to sleep before the next look, or `None` once the deadline has passed.
    fn pause(&self, left: Option<Duration>) -> Option<Duration> {
        match left {
            // No representable deadline: wait for ever.
            None => Some(self.step),
            Some(left) if left.is_zero() => None,
            Some(left) => Some(self.step.min(left)),
        }
    }

    /// Call `f` until it returns `Some` (blocking the thread between looks).
    pub fn poll<T>(&self, mut f: impl FnMut() -> Option<T>) -> Result<T, Timeout> {
        match self.try_poll(|| Ok::<_, Infallible>(f())) {
            Ok(r) => r,
            Err(never) => match never {},
        }
    }

    /// Call `f` until it returns `Ok(Some)`; an `Err` from `f` ends the wait at once and is
    /// returned as the outer error. The inner result is the value or the [`Timeout`].
    pub fn try_poll<T, E>(
        &self,
        mut f: impl FnMut() -> Result<Option<T>, E>,
    ) -> Result<Result<T, Timeout>, E> {
        use std::time::Instant;
        let deadline = Instant::now().checked_add(self.timeout);
        loop {
            if let Some(v) = f()? {
                return Ok(Ok(v));
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            match self.pause(left) {
                // The pause between looks of this poll-with-deadline helper itself (the one
                // place tests pause), cut at the deadline by `pause`.
                Some(p) => std::thread::sleep(p),
                None => return Ok(Err(self.timed_out())),
            }
        }
    }

    /// Like [`Wait::poll`], but panics with the [`Timeout`]'s message (for tests).
    pub fn expect<T>(&self, f: impl FnMut() -> Option<T>) -> T {
        self.poll(f).unwrap_or_else(|t| panic!("{t}"))
    }

    /// Await `f` until it returns `Some` (sleeping on Tokio's clock between looks).
    pub async fn poll_async<T>(&self, mut f: impl AsyncFnMut() -> Option<T>) -> Result<T, Timeout> {
        match self
            .try_poll_async(async || Ok::<_, Infallible>(f().await))
            .await
        {
            Ok(r) => r,
            Err(never) => match never {},
        }
    }

    /// Await `f` until it returns `Ok(Some)`; an `Err` from `f` ends the wait at once and is
    /// returned as the outer error. The inner result is the value or the [`Timeout`].
    pub async fn try_poll_async<T, E>(
        &self,
        mut f: impl AsyncFnMut() -> Result<Option<T>, E>,
    ) -> Result<Result<T, Timeout>, E> {
        use tokio::time::Instant;
        let deadline = Instant::now().checked_add(self.timeout);
        loop {
            if let Some(v) = f().await? {
                return Ok(Ok(v));
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            match self.pause(left) {
                // As above: the pause between looks, never past the deadline.
                Some(p) => tokio::time::sleep(p).await,
                None => return Ok(Err(self.timed_out())),
            }
        }
    }

    /// Like [`Wait::poll_async`], but panics with the [`Timeout`]'s message (for tests).
    pub async fn expect_async<T>(&self, f: impl AsyncFnMut() -> Option<T>) -> T {
        self.poll_async(f).await.unwrap_or_else(|t| panic!("{t}"))
    }
}

#[cfg(test)]
mod tests;
