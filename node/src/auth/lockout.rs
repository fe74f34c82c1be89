//! Failed-attempt lockout (`auth.rate_limit`): a source address that fails authentication
//! `max_attempts` times within `window` is refused for `lockout` (doubled for each repeated
//! lockout, at most an hour), even with valid credentials. Kept per node, in memory.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::config::AuthLockout;

/// Longest lockout.
const MAX_LOCKOUT: Duration = Duration::from_secs(3600);
/// Addresses tracked before idle ones are forgotten.
const MAX_TRACKED: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Attempts {
    window_start: Instant,
    failures: u32,
    locked_until: Option<Instant>,
    lockouts: u32,
}

/// Failed attempts by source address.
#[derive(Default)]
pub struct Lockout {
    by_addr: Mutex<HashMap<IpAddr, Attempts>>,
}

impl Lockout {
    /// How long `addr` is still locked out at `now`, if it is.
    pub fn locked(&self, addr: IpAddr, now: Instant) -> Option<Duration> {
        let map = self.by_addr.lock();
        let until = map.get(&addr)?.locked_until?;
        (until > now).then(|| until - now)
    }

    /// Count a failed attempt; returns the lockout it started, if it started one.
    pub fn failed(&self, cfg: &AuthLockout, addr: IpAddr, now: Instant) -> Option<Duration> {
        if !cfg.enabled {
            return None;
        }
        let mut map = self.by_addr.lock();
        if map.len() >= MAX_TRACKED {
            map.retain(|_, a| {
                a.locked_until.is_some_and(|u| u > now)
                    || now.duration_since(a.window_start) < cfg.window
            });
        }
        let a = map.entry(addr).or_insert(Attempts {
            window_start: now,
            failures: 0,
            locked_until: None,
            lockouts: 0,
        });
        if now.duration_since(a.window_start) >= cfg.window {
            a.window_start = now;
            a.failures = 0;
        }
        a.failures += 1;
        if a.failures < cfg.max_attempts {
            return None;
        }
        let factor = 1u32 << a.lockouts.min(12);
        let lock = (cfg.lockout * factor).min(MAX_LOCKOUT);
        a.locked_until = Some(now + lock);
        a.lockouts += 1;
        a.failures = 0;
        a.window_start = now;
        Some(lock)
    }

    /// A successful authentication: its failures so far are forgiven (not its lockout count).
    pub fn succeeded(&self, addr: IpAddr) {
        if let Some(a) = self.by_addr.lock().get_mut(&addr) {
            a.failures = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AuthLockout {
        AuthLockout {
            enabled: true,
            max_attempts: 3,
            window: Duration::from_secs(60),
            lockout: Duration::from_secs(10),
        }
    }

    #[test]
    fn repeated_failures_lock_an_address_and_lockouts_double() {
        let l = Lockout::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        assert_eq!(l.failed(&cfg(), a, t0), None);
        assert_eq!(l.failed(&cfg(), a, t0), None);
        assert_eq!(l.failed(&cfg(), a, t0), Some(Duration::from_secs(10)));
        assert_eq!(
            l.locked(a, t0 + Duration::from_secs(9)),
            Some(Duration::from_secs(1))
        );
        assert_eq!(l.locked(b, t0), None, "another address is not affected");
        let t1 = t0 + Duration::from_secs(11);
        assert_eq!(l.locked(a, t1), None, "the lockout ends");
        for _ in 0..2 {
            assert_eq!(l.failed(&cfg(), a, t1), None);
        }
        assert_eq!(
            l.failed(&cfg(), a, t1),
            Some(Duration::from_secs(20)),
            "doubled"
        );
    }

    #[test]
    fn failures_outside_the_window_and_after_a_success_start_over() {
        let l = Lockout::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        l.failed(&cfg(), a, t0);
        l.failed(&cfg(), a, t0);
        assert_eq!(
            l.failed(&cfg(), a, t0 + Duration::from_secs(61)),
            None,
            "a new window"
        );
        l.succeeded(a);
        assert_eq!(l.failed(&cfg(), a, t0 + Duration::from_secs(62)), None);
        let off = AuthLockout {
            enabled: false,
            ..cfg()
        };
        for _ in 0..10 {
            assert_eq!(l.failed(&off, a, t0), None);
        }
    }
}
