use std::cell::Cell;
use std::time::{Duration, Instant};

use super::*;

const MS: Duration = Duration::from_millis(1);

#[test]
fn the_first_some_is_returned_and_nothing_is_called_after_it() {
    let calls = Cell::new(0);
    let v = Wait::new("x", Duration::from_secs(10)).step(MS).poll(|| {
        calls.set(calls.get() + 1);
        assert!(calls.get() <= 3, "called after the first Some");
        (calls.get() >= 3).then_some(calls.get() * 10)
    });
    assert_eq!(v, Ok(30));
    assert_eq!(calls.get(), 3);
}

#[test]
fn a_condition_that_never_holds_times_out_after_the_timeout() {
    let calls = Cell::new(0u32);
    let start = Instant::now();
    let r: Result<(), _> = Wait::new("the moon", 60 * MS).step(10 * MS).poll(|| {
        calls.set(calls.get() + 1);
        None
    });
    let took = start.elapsed();
    assert_eq!(
        r,
        Err(Timeout {
            what: "the moon".into(),
            after: 60 * MS
        })
    );
    assert!(took >= 60 * MS, "gave up early: {took:?}");
    // One step past the deadline at most, plus scheduling slack on a loaded machine.
    assert!(took < 60 * MS + 10 * MS + 500 * MS, "{took:?}");
    assert!(
        calls.get() >= 2,
        "looked once at the start and at the deadline"
    );
}

#[test]
fn the_last_sleep_is_cut_at_the_deadline() {
    let calls = Cell::new(0u32);
    let start = Instant::now();
    let r = Wait::new("x", 30 * MS)
        .step(Duration::from_secs(30))
        .poll(|| {
            calls.set(calls.get() + 1);
            None::<()>
        });
    assert!(r.is_err());
    let took = start.elapsed();
    assert!(took >= 30 * MS && took < Duration::from_secs(5), "{took:?}");
    assert_eq!(calls.get(), 2, "at the start and at the deadline");
}

#[test]
fn a_zero_timeout_looks_exactly_once() {
    let calls = Cell::new(0u32);
    let w = Wait::new("x", Duration::ZERO);
    assert!(
        w.poll(|| {
            calls.set(calls.get() + 1);
            None::<()>
        })
        .is_err()
    );
    assert_eq!(calls.get(), 1);
    assert_eq!(w.poll(|| Some(7)), Ok(7));
}

#[test]
fn an_unrepresentable_deadline_still_returns_the_first_some() {
    let calls = Cell::new(0u32);
    let v = Wait::new("x", Duration::MAX).step(MS).poll(|| {
        calls.set(calls.get() + 1);
        (calls.get() == 2).then_some(())
    });
    assert_eq!(v, Ok(()));
}

#[test]
fn an_error_ends_the_wait_at_once() {
    let calls = Cell::new(0u32);
    let r: Result<Result<(), Timeout>, &str> = Wait::new("x", Duration::from_secs(10))
        .step(MS)
        .try_poll(|| {
            calls.set(calls.get() + 1);
            if calls.get() == 2 {
                Err("boom")
            } else {
                Ok(None)
            }
        });
    assert_eq!(r, Err("boom"));
    assert_eq!(calls.get(), 2);
}

#[test]
#[should_panic(expected = "timed out after 5ms waiting for the moon")]
fn expect_panics_with_what_and_how_long() {
    Wait::new("the moon", 5 * MS).expect(|| None::<()>);
}

#[test]
fn timeout_message() {
    let t = Timeout {
        what: "a leader".into(),
        after: Duration::from_secs(3),
    };
    assert_eq!(t.to_string(), "timed out after 3s waiting for a leader");
    let w = Wait::new("a leader", Duration::from_secs(3));
    assert_eq!(
        (w.what(), w.timeout()),
        ("a leader", Duration::from_secs(3))
    );
}

// Async variants on Tokio's paused clock: the timings are exact.

#[tokio::test(start_paused = true)]
async fn async_looks_at_every_step_and_exactly_at_the_deadline() {
    let start = tokio::time::Instant::now();
    let mut seen = Vec::new();
    let r = Wait::new("x", 50 * MS)
        .step(20 * MS)
        .poll_async(async || {
            seen.push(start.elapsed());
            None::<()>
        })
        .await;
    assert_eq!(
        r,
        Err(Timeout {
            what: "x".into(),
            after: 50 * MS
        })
    );
    assert_eq!(seen, [Duration::ZERO, 20 * MS, 40 * MS, 50 * MS]);
    assert_eq!(start.elapsed(), 50 * MS, "never sleeps past the deadline");
}

#[tokio::test(start_paused = true)]
async fn async_returns_the_first_some_and_may_borrow_state_across_awaits() {
    let mut calls = 0;
    let v = Wait::new("x", Duration::from_secs(10))
        .poll_async(async || {
            calls += 1;
            tokio::task::yield_now().await;
            (calls == 3).then_some(calls)
        })
        .await;
    assert_eq!(v, Ok(3));
    assert_eq!(calls, 3);
}

#[tokio::test(start_paused = true)]
async fn async_error_ends_the_wait_at_once() {
    let mut calls = 0;
    let r: Result<Result<(), Timeout>, String> = Wait::new("x", Duration::from_secs(10))
        .try_poll_async(async || {
            calls += 1;
            Err(format!("failed at look {calls}"))
        })
        .await;
    assert_eq!(r, Err("failed at look 1".into()));
}

#[tokio::test(start_paused = true)]
async fn closures_returning_futures_are_accepted() {
    let v = Wait::new("x", Duration::from_secs(1))
        .expect_async(|| async { Some(5) })
        .await;
    assert_eq!(v, 5);
}

#[tokio::test(start_paused = true)]
#[should_panic(expected = "timed out after 1s waiting for a reply")]
async fn expect_async_panics_with_what_and_how_long() {
    Wait::new("a reply", Duration::from_secs(1))
        .expect_async(async || None::<()>)
        .await;
}
