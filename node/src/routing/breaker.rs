//! The circuit breaker of a group, as a pure state machine: routing feeds it each group
//! request's outcome and whether some member can serve right now; it answers whether a
//! request may go through. Time is passed in (seconds on any monotonic scale).
//!
//! The breaker exists to stop hammering a group none of whose members can serve. So it never
//! opens while a member is in rotation and READY (a failed call on one member, or a member that
//! died, is the member's matter, handled by failover and the member's own lifecycle), and an
//! open breaker lets a probe through as soon as a member can serve again instead of waiting
//! out its whole reset timeout.

pub use crate::supervisor::lifecycle::BreakerState;

/// A state change to report (metrics and events).
pub(super) type Transition = (BreakerState, BreakerState);

/// The breaker of one group.
#[derive(Debug, Clone)]
pub struct GroupBreaker {
    state: BreakerState,
    failures: u32,
    opened_at: Option<f64>,
    probing: bool,
}

impl Default for GroupBreaker {
    fn default() -> Self {
        GroupBreaker {
            state: BreakerState::Closed,
            failures: 0,
            opened_at: None,
            probing: false,
        }
    }
}

/// May a request go through?
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Admission {
    /// Yes (with the state change this caused, if any).
    Admit(Option<Transition>),
    /// No: retry in this many seconds.
    Refuse(f64),
}

impl GroupBreaker {
    /// Current state.
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Failed group requests counted since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Whether a request may go through at `now`. OPEN moves to HALF_OPEN (one probe) after
    /// `reset_timeout_s`, or at once when `can_serve` (a member is in rotation and READY).
    pub fn admit(&mut self, now: f64, reset_timeout_s: f64, can_serve: bool) -> Admission {
        match self.state {
            BreakerState::Closed => Admission::Admit(None),
            BreakerState::Open => {
                let elapsed = self.opened_at.map_or(f64::MAX, |t| now - t);
                if elapsed >= reset_timeout_s || can_serve {
                    self.state = BreakerState::HalfOpen;
                    self.probing = true;
                    Admission::Admit(Some((BreakerState::Open, BreakerState::HalfOpen)))
                } else {
                    Admission::Refuse(reset_timeout_s - elapsed)
                }
            }
            BreakerState::HalfOpen => {
                if self.probing {
                    Admission::Refuse(0.0)
                } else {
                    self.probing = true;
                    Admission::Admit(None)
                }
            }
        }
    }

    /// Record the outcome of one group request. A failure opens the breaker at `threshold`
    /// failures (or a failed probe), unless `can_serve`: a member is still in rotation and
    /// READY, so the group is not down.
    pub fn record(
        &mut self,
        ok: bool,
        now: f64,
        threshold: u32,
        can_serve: bool,
    ) -> Option<Transition> {
        let old = self.state;
        self.probing = false;
        if ok {
            self.failures = 0;
            self.state = BreakerState::Closed;
            self.opened_at = None;
        } else {
            self.failures = self.failures.saturating_add(1);
            let tripped = self.state == BreakerState::HalfOpen || self.failures >= threshold;
            if tripped && !can_serve {
                self.state = BreakerState::Open;
                self.opened_at = Some(now);
            }
        }
        (old != self.state).then_some((old, self.state))
    }

    /// Test hook: pretend the breaker opened `secs` earlier.
    #[cfg(test)]
    pub(crate) fn backdate(&mut self, secs: f64) {
        if let Some(t) = self.opened_at.as_mut() {
            *t -= secs;
        }
    }

    /// A probe was abandoned (its caller went away): let another request probe.
    pub fn release_probe(&mut self) {
        if self.state == BreakerState::HalfOpen {
            self.probing = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use BreakerState::*;

    #[test]
    fn opens_at_the_threshold_only_when_no_member_can_serve() {
        let mut b = GroupBreaker::default();
        for _ in 0..9 {
            assert_eq!(b.record(false, 0.0, 10, false), None);
        }
        // Ten failures, but a member is READY in rotation: the group is not down.
        assert_eq!(b.record(false, 0.0, 10, true), None);
        assert_eq!(b.state(), Closed);
        assert_eq!(b.record(false, 1.0, 10, false), Some((Closed, Open)));
        assert_eq!(b.failures(), 11);
    }

    #[test]
    fn open_refuses_until_the_reset_timeout_then_admits_one_probe() {
        let mut b = GroupBreaker::default();
        b.record(false, 100.0, 1, false);
        assert_eq!(b.admit(130.0, 60.0, false), Admission::Refuse(30.0));
        assert_eq!(
            b.admit(160.0, 60.0, false),
            Admission::Admit(Some((Open, HalfOpen)))
        );
        assert_eq!(b.admit(160.0, 60.0, false), Admission::Refuse(0.0));
        // The probe fails: open again.
        assert_eq!(b.record(false, 161.0, 1, false), Some((HalfOpen, Open)));
        assert_eq!(b.admit(162.0, 60.0, false), Admission::Refuse(59.0));
    }

    #[test]
    fn open_admits_a_probe_at_once_when_a_member_can_serve_again() {
        let mut b = GroupBreaker::default();
        b.record(false, 100.0, 1, false);
        assert_eq!(
            b.admit(101.0, 60.0, true),
            Admission::Admit(Some((Open, HalfOpen)))
        );
        assert_eq!(b.record(true, 101.5, 1, true), Some((HalfOpen, Closed)));
        assert_eq!(b.admit(102.0, 60.0, false), Admission::Admit(None));
    }

    #[test]
    fn a_success_closes_and_resets_the_count() {
        let mut b = GroupBreaker::default();
        b.record(false, 0.0, 3, false);
        b.record(false, 0.0, 3, false);
        assert_eq!(b.record(true, 0.0, 3, false), None);
        assert_eq!(b.failures(), 0);
        b.record(false, 0.0, 3, false);
        assert_eq!(b.state(), Closed);
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_request_probe() {
        let mut b = GroupBreaker::default();
        b.record(false, 0.0, 1, false);
        assert!(matches!(b.admit(60.0, 60.0, false), Admission::Admit(_)));
        assert_eq!(b.admit(60.0, 60.0, false), Admission::Refuse(0.0));
        b.release_probe();
        assert_eq!(b.admit(60.0, 60.0, false), Admission::Admit(None));
    }
}
