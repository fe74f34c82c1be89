//! Table-driven tests of every lifecycle transition.

use super::*;

use Action::{
    BreakerChanged, CheckHealth, Connect, Disconnect, Recover, RecoveryScheduled, Refuse, Revive,
    StateChanged, StopIdle,
};
use ServerState::*;

const POLICY: Policy = Policy {
    max_consecutive_failures: 3,
    health_interval_s: 10.0,
    idle_ttl_s: 100.0,
    backoff: Backoff {
        base_s: 1.0,
        cap_s: 60.0,
        jitter: 0.2,
        floor_s: 0.2,
    },
};

/// Jitter in the middle of its range: the backoff factor is exactly 1.
fn mid() -> f64 {
    0.5
}

/// A lifecycle driven to `state` at t = 0 (READY is generation 1).
fn at(state: ServerState) -> Lifecycle {
    let mut l = Lifecycle::new(POLICY, 0.0);
    let mut j = mid;
    match state {
        Cold => {}
        Initializing => {
            l.step(Event::StartRequested, 0.0, &mut j);
        }
        Ready => {
            l.step(Event::StartRequested, 0.0, &mut j);
            l.step(Event::Started, 0.0, &mut j);
        }
        Dead => {
            l.step(Event::StartRequested, 0.0, &mut j);
            l.step(Event::Started, 0.0, &mut j);
            l.step(
                Event::ConnectionLost {
                    generation: 1,
                    why: "exit".into(),
                },
                0.0,
                &mut j,
            );
        }
        Degraded => {
            l.step(Event::StartRequested, 0.0, &mut j);
            l.step(Event::Started, 0.0, &mut j);
            for _ in 0..3 {
                l.step(
                    Event::CallFailed {
                        generation: 1,
                        error: "timeout".into(),
                    },
                    0.0,
                    &mut j,
                );
            }
        }
    }
    assert_eq!(l.state(), state, "set-up of {state:?}");
    l
}

fn changed(old: ServerState, new: ServerState) -> Action {
    StateChanged { old, new }
}

fn breaker(old: BreakerState, new: BreakerState) -> Action {
    BreakerChanged { old, new }
}

struct Case {
    name: &'static str,
    from: ServerState,
    event: Event,
    now: f64,
    to: ServerState,
    actions: Vec<Action>,
}

#[test]
fn every_transition() {
    let lost = |generation| Event::ConnectionLost {
        generation,
        why: "exit".into(),
    };
    let call_failed = |generation| Event::CallFailed {
        generation,
        error: "timeout".into(),
    };
    let tick = Event::Tick {
        in_flight: 0,
        revive_when_dead: false,
    };
    let cases = vec![
        Case {
            name: "cold: a start request starts it",
            from: Cold,
            event: Event::StartRequested,
            now: 1.0,
            to: Initializing,
            actions: vec![changed(Cold, Initializing), Connect],
        },
        Case {
            name: "dead: a start request restarts it",
            from: Dead,
            event: Event::StartRequested,
            now: 1.0,
            to: Initializing,
            actions: vec![changed(Dead, Initializing), Connect],
        },
        Case {
            name: "initializing: a start request after an abandoned start connects again",
            from: Initializing,
            event: Event::StartRequested,
            now: 1.0,
            to: Initializing,
            actions: vec![Connect],
        },
        Case {
            name: "ready: a start request is a no-op",
            from: Ready,
            event: Event::StartRequested,
            now: 1.0,
            to: Ready,
            actions: vec![],
        },
        Case {
            name: "degraded before its backoff: refused (circuit open)",
            from: Degraded,
            event: Event::StartRequested,
            now: 0.5,
            to: Degraded,
            actions: vec![Refuse {
                retry_in_s: 0.5,
                failures: 3,
            }],
        },
        Case {
            name: "degraded after its backoff: a caller may probe",
            from: Degraded,
            event: Event::StartRequested,
            now: 1.0,
            to: Initializing,
            actions: vec![
                breaker(BreakerState::Open, BreakerState::HalfOpen),
                changed(Degraded, Initializing),
                Connect,
            ],
        },
        Case {
            name: "degraded: the recovery probe before it is due does nothing",
            from: Degraded,
            event: Event::RecoveryProbe,
            now: 0.9,
            to: Degraded,
            actions: vec![],
        },
        Case {
            name: "degraded: the recovery probe when due starts it half-open",
            from: Degraded,
            event: Event::RecoveryProbe,
            now: 1.0,
            to: Initializing,
            actions: vec![
                breaker(BreakerState::Open, BreakerState::HalfOpen),
                changed(Degraded, Initializing),
                Connect,
            ],
        },
        Case {
            name: "ready: a recovery probe does nothing",
            from: Ready,
            event: Event::RecoveryProbe,
            now: 100.0,
            to: Ready,
            actions: vec![],
        },
        Case {
            name: "initializing: started → ready",
            from: Initializing,
            event: Event::Started,
            now: 1.0,
            to: Ready,
            actions: vec![changed(Initializing, Ready)],
        },
        Case {
            name: "initializing: a failed start → dead (one failure)",
            from: Initializing,
            event: Event::StartFailed {
                error: "ENOENT".into(),
            },
            now: 1.0,
            to: Dead,
            actions: vec![changed(Initializing, Dead)],
        },
        Case {
            name: "ready: the connection is lost → dead",
            from: Ready,
            event: lost(1),
            now: 1.0,
            to: Dead,
            actions: vec![changed(Ready, Dead)],
        },
        Case {
            name: "ready: a lost connection of an older generation is ignored",
            from: Ready,
            event: lost(0),
            now: 1.0,
            to: Ready,
            actions: vec![],
        },
        Case {
            name: "dead: more losses of the same connection are not counted again",
            from: Dead,
            event: lost(1),
            now: 1.0,
            to: Dead,
            actions: vec![],
        },
        Case {
            name: "dead: calls that died with the connection are not counted",
            from: Dead,
            event: call_failed(1),
            now: 1.0,
            to: Dead,
            actions: vec![],
        },
        Case {
            name: "ready: one failed call is counted, below the threshold",
            from: Ready,
            event: call_failed(1),
            now: 1.0,
            to: Ready,
            actions: vec![],
        },
        Case {
            name: "ready: a failed call of an older generation is ignored",
            from: Ready,
            event: call_failed(0),
            now: 1.0,
            to: Ready,
            actions: vec![],
        },
        Case {
            name: "ready: a failed health check is counted, below the threshold",
            from: Ready,
            event: Event::HealthFailed {
                generation: 1,
                error: "no pong".into(),
            },
            now: 1.0,
            to: Ready,
            actions: vec![],
        },
        Case {
            name: "ready: a passed health check",
            from: Ready,
            event: Event::HealthPassed { generation: 1 },
            now: 1.0,
            to: Ready,
            actions: vec![],
        },
        Case {
            name: "ready: stopped → cold",
            from: Ready,
            event: Event::Stopped,
            now: 1.0,
            to: Cold,
            actions: vec![changed(Ready, Cold)],
        },
        Case {
            name: "degraded: stopped → cold, breaker closed",
            from: Degraded,
            event: Event::Stopped,
            now: 1.0,
            to: Cold,
            actions: vec![
                changed(Degraded, Cold),
                breaker(BreakerState::Open, BreakerState::Closed),
            ],
        },
        Case {
            name: "cold: stopped stays cold",
            from: Cold,
            event: Event::Stopped,
            now: 1.0,
            to: Cold,
            actions: vec![],
        },
        Case {
            name: "ready: a tick before the health interval does nothing",
            from: Ready,
            event: tick.clone(),
            now: 9.9,
            to: Ready,
            actions: vec![],
        },
        Case {
            name: "ready: a tick at the health interval asks for a check",
            from: Ready,
            event: tick.clone(),
            now: 10.0,
            to: Ready,
            actions: vec![CheckHealth],
        },
        Case {
            name: "ready: a tick at the idle TTL with nothing in flight stops it",
            from: Ready,
            event: tick.clone(),
            now: 100.0,
            to: Ready,
            actions: vec![
                CheckHealth,
                StopIdle {
                    idle_for_s: 100.0,
                    last_used: 0.0,
                },
            ],
        },
        Case {
            name: "ready: idle but a call in flight: not stopped",
            from: Ready,
            event: Event::Tick {
                in_flight: 1,
                revive_when_dead: false,
            },
            now: 100.0,
            to: Ready,
            actions: vec![CheckHealth],
        },
        Case {
            name: "degraded: a tick when recovery is due asks for the probe",
            from: Degraded,
            event: tick.clone(),
            now: 1.0,
            to: Degraded,
            actions: vec![Recover],
        },
        Case {
            name: "degraded: a tick before recovery is due does nothing",
            from: Degraded,
            event: tick.clone(),
            now: 0.5,
            to: Degraded,
            actions: vec![],
        },
        Case {
            name: "dead: a tick revives a group member",
            from: Dead,
            event: Event::Tick {
                in_flight: 0,
                revive_when_dead: true,
            },
            now: 1.0,
            to: Dead,
            actions: vec![Revive],
        },
        Case {
            name: "dead: a tick leaves a lone server for its next call",
            from: Dead,
            event: tick.clone(),
            now: 1.0,
            to: Dead,
            actions: vec![],
        },
        Case {
            name: "cold: a tick does nothing",
            from: Cold,
            event: tick,
            now: 1000.0,
            to: Cold,
            actions: vec![],
        },
    ];
    for case in cases {
        let mut l = at(case.from);
        let mut j = mid;
        let actions = l.step(case.event.clone(), case.now, &mut j);
        assert_eq!(actions, case.actions, "{}", case.name);
        assert_eq!(l.state(), case.to, "{}", case.name);
    }
}

#[test]
fn the_threshold_degrades_disconnects_and_schedules_recovery() {
    let mut l = at(Ready);
    let mut j = mid;
    let fail = |l: &mut Lifecycle, j: &mut dyn FnMut() -> f64| {
        l.step(
            Event::HealthFailed {
                generation: 1,
                error: "no pong".into(),
            },
            5.0,
            j,
        )
    };
    assert!(fail(&mut l, &mut j).is_empty());
    assert!(fail(&mut l, &mut j).is_empty());
    let actions = fail(&mut l, &mut j);
    assert_eq!(
        actions,
        vec![
            Disconnect,
            changed(Ready, Degraded),
            Action::Degraded {
                consecutive_failures: 3,
                total_failures: 3,
                reason: FailureKind::HealthCheck,
                error: "no pong".into(),
            },
            breaker(BreakerState::Closed, BreakerState::Open),
            RecoveryScheduled {
                in_s: 1.0,
                failures: 3
            },
        ]
    );
    assert_eq!(l.next_recovery_at(), Some(6.0));
    assert_eq!(l.last_error(), Some("no pong"));
}

#[test]
fn a_failed_probe_returns_to_degraded_with_a_longer_backoff_and_a_good_one_recovers() {
    let mut l = at(Degraded);
    let mut j = mid;
    assert_eq!(l.next_recovery_at(), Some(1.0));
    l.step(Event::RecoveryProbe, 1.0, &mut j);
    let actions = l.step(
        Event::StartFailed {
            error: "ENOENT".into(),
        },
        1.5,
        &mut j,
    );
    assert_eq!(
        actions,
        vec![
            changed(Initializing, Degraded),
            breaker(BreakerState::HalfOpen, BreakerState::Open),
            RecoveryScheduled {
                in_s: 2.0,
                failures: 4
            },
        ]
    );
    assert_eq!(l.next_recovery_at(), Some(3.5));
    // Second attempt succeeds: READY, breaker closed, counters reset, new generation.
    l.step(Event::RecoveryProbe, 3.5, &mut j);
    let actions = l.step(Event::Started, 4.0, &mut j);
    assert_eq!(
        actions,
        vec![
            changed(Initializing, Ready),
            breaker(BreakerState::HalfOpen, BreakerState::Closed),
        ]
    );
    assert_eq!(l.consecutive_failures(), 0);
    assert_eq!(l.generation(), 2);
    assert_eq!(l.next_recovery_at(), None);
    assert_eq!(l.total_failures(), 4);
}

#[test]
fn backoff_doubles_caps_and_jitters_within_bounds() {
    let b = Backoff::default();
    assert_eq!(b.delay(0, 0.5), 1.0);
    assert_eq!(b.delay(1, 0.5), 2.0);
    assert_eq!(b.delay(5, 0.5), 32.0);
    assert_eq!(b.delay(6, 0.5), 60.0);
    assert_eq!(b.delay(u32::MAX, 0.5), 60.0);
    assert!((b.delay(3, 0.0) - 6.4).abs() < 1e-9);
    assert!((b.delay(3, 1.0) - 9.6).abs() < 1e-9);
    // Out-of-range jitter is clamped; the floor holds.
    assert!((b.delay(0, 7.0) - 1.2).abs() < 1e-9);
    let tiny = Backoff {
        base_s: 0.01,
        ..Backoff::default()
    };
    assert_eq!(tiny.delay(0, 0.0), 0.2);
}

/// The bug of issue 7: a member killed while calls were in flight collected one failure per
/// call (and more from retries), went DEGRADED and stayed out for its backoff. Now the death
/// counts once, calls that died with it count nothing, and the next success clears it.
#[test]
fn calls_in_flight_when_the_process_died_are_not_held_against_the_restarted_instance() {
    let mut l = at(Ready);
    let mut j = mid;
    for kill in 0..10u32 {
        let generation = l.generation();
        let t = f64::from(kill);
        // Eight calls in flight: the first notices the death, the others fail with it.
        l.step(
            Event::ConnectionLost {
                generation,
                why: "killed".into(),
            },
            t,
            &mut j,
        );
        for _ in 0..8 {
            l.step(
                Event::CallFailed {
                    generation,
                    error: "connection closed".into(),
                },
                t,
                &mut j,
            );
        }
        assert_eq!(l.state(), Dead);
        assert_eq!(l.consecutive_failures(), 1, "kill {kill}");
        // The next call restarts it; late failures of the old process still do not count.
        assert_eq!(
            l.step(Event::StartRequested, t + 0.1, &mut j),
            vec![changed(Dead, Initializing), Connect]
        );
        l.step(Event::Started, t + 0.3, &mut j);
        l.step(
            Event::CallFailed {
                generation,
                error: "late".into(),
            },
            t + 0.4,
            &mut j,
        );
        assert_eq!(l.consecutive_failures(), 0);
        assert_eq!(l.state(), Ready);
    }
    assert_eq!(l.total_failures(), 10);
    assert_eq!(l.generation(), 11);
}

#[test]
fn a_call_success_resets_the_count_and_records_use() {
    let mut l = at(Ready);
    let mut j = mid;
    for _ in 0..2 {
        l.step(
            Event::CallFailed {
                generation: 1,
                error: "timeout".into(),
            },
            1.0,
            &mut j,
        );
    }
    assert_eq!(l.consecutive_failures(), 2);
    l.step(Event::CallSucceeded { generation: 1 }, 2.0, &mut j);
    assert_eq!(l.consecutive_failures(), 0);
    assert_eq!(l.last_used(), 2.0);
    l.step(Event::Used, 3.0, &mut j);
    assert_eq!(l.last_used(), 3.0);
}

#[test]
fn a_health_check_is_not_asked_for_twice_within_an_interval() {
    let mut l = at(Ready);
    let mut j = mid;
    let tick = Event::Tick {
        in_flight: 0,
        revive_when_dead: false,
    };
    assert_eq!(l.step(tick.clone(), 10.0, &mut j), vec![CheckHealth]);
    assert_eq!(l.step(tick.clone(), 10.25, &mut j), vec![]);
    l.step(Event::HealthPassed { generation: 1 }, 10.5, &mut j);
    assert_eq!(l.proven(), 2);
    assert_eq!(l.step(tick.clone(), 20.4, &mut j), vec![]);
    assert_eq!(l.step(tick, 20.5, &mut j), vec![CheckHealth]);
}

#[test]
fn a_threshold_of_one_degrades_on_the_first_failure() {
    let mut l = Lifecycle::new(
        Policy {
            max_consecutive_failures: 1,
            ..POLICY
        },
        0.0,
    );
    let mut j = mid;
    l.step(Event::StartRequested, 0.0, &mut j);
    let actions = l.step(
        Event::StartFailed {
            error: "ENOENT".into(),
        },
        0.0,
        &mut j,
    );
    assert_eq!(actions.first(), Some(&changed(Initializing, Dead)));
    assert_eq!(l.state(), Degraded);
    assert!(!actions.contains(&Disconnect), "nothing to disconnect");
}

#[test]
fn state_names_round_trip() {
    for s in [Cold, Initializing, Ready, Degraded, Dead] {
        assert_eq!(ServerState::parse(s.as_str()), Some(s));
    }
    assert_eq!(ServerState::parse("READY"), Some(Ready));
    assert_eq!(ServerState::parse("nope"), None);
}
