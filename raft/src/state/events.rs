//! The append-only domain event log with count and age retention.

use std::collections::VecDeque;

use serde::Deserialize;
use serde::Serialize;

use super::model::EventRecord;
use super::model::StoredEvent;

/// Default maximum number of retained events.
pub const DEFAULT_EVENT_MAX_COUNT: u64 = 10_000;
/// Default maximum event age: 7 days.
pub const DEFAULT_EVENT_MAX_AGE_MS: u64 = 7 * 24 * 3600 * 1000;

/// How many of the newest events a new event's id is checked against (see
/// [`EventLog::append`]).
pub(super) const DEDUP_WINDOW: usize = 4096;

/// The id a node gave an event (`data.event_id`), if any.
fn event_id(e: &EventRecord) -> Option<&str> {
    e.data.get("event_id").and_then(serde_json::Value::as_str)
}

/// The replicated event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventLog {
    events: VecDeque<StoredEvent>,
    /// Seq the next appended event gets.
    next_seq: u64,
    /// Keep at most this many events (0 = unlimited).
    max_count: u64,
    /// Drop events older than this (0 = unlimited).
    max_age_ms: u64,
}

impl Default for EventLog {
    fn default() -> Self {
        EventLog {
            events: VecDeque::new(),
            next_seq: 1,
            max_count: DEFAULT_EVENT_MAX_COUNT,
            max_age_ms: DEFAULT_EVENT_MAX_AGE_MS,
        }
    }
}

impl EventLog {
    /// Append events; returns the (first, last) seq assigned, `None` for an empty batch.
    ///
    /// An event whose `data.event_id` is already among the last [`DEDUP_WINDOW`] events is
    /// skipped: a node re-proposes a batch whose first proposal had an unknown outcome (the
    /// leader died after appending it), and the log must hold each event once.
    pub(crate) fn append(&mut self, events: &[EventRecord], now_ms: u64) -> Option<(u64, u64)> {
        let first = self.next_seq;
        // Which of `events` to keep, decided while the log is only borrowed (no id is copied).
        let keep: Vec<bool> = {
            let mut seen: std::collections::HashSet<&str> = std::collections::HashSet::new();
            if events.iter().any(|e| event_id(e).is_some()) {
                seen.extend(
                    self.events
                        .iter()
                        .rev()
                        .take(DEDUP_WINDOW)
                        .filter_map(|e| event_id(&e.event)),
                );
            }
            events
                .iter()
                .map(|e| event_id(e).is_none_or(|id| seen.insert(id)))
                .collect()
        };
        for (event, _) in events.iter().zip(keep).filter(|(_, k)| *k) {
            self.events.push_back(StoredEvent {
                seq: self.next_seq,
                appended_at_ms: now_ms,
                event: event.clone(),
            });
            self.next_seq += 1;
        }
        self.apply_retention(now_ms);
        (self.next_seq > first).then(|| (first, self.next_seq - 1))
    }

    /// Change retention and apply it at once.
    pub(crate) fn set_retention(&mut self, max_count: u64, max_age_ms: u64, now_ms: u64) {
        self.max_count = max_count;
        self.max_age_ms = max_age_ms;
        self.apply_retention(now_ms);
    }

    fn apply_retention(&mut self, now_ms: u64) {
        if self.max_count > 0 {
            while self.events.len() as u64 > self.max_count {
                self.events.pop_front();
            }
        }
        if self.max_age_ms > 0 {
            let cutoff = now_ms.saturating_sub(self.max_age_ms);
            // `appended_at_ms` is non-decreasing along the log (apply time is monotonic).
            while self
                .events
                .front()
                .is_some_and(|e| e.appended_at_ms < cutoff)
            {
                self.events.pop_front();
            }
        }
    }

    /// Events with `seq > after`, oldest first, at most `limit`.
    ///
    /// If events after `after` were already dropped by retention, the result starts at the
    /// oldest retained event; compare its `seq` with `after + 1` to detect the gap.
    pub fn since(&self, after: u64, limit: usize) -> Vec<StoredEvent> {
        let start = self.events.partition_point(|e| e.seq <= after);
        self.events
            .iter()
            .skip(start)
            .take(limit)
            .cloned()
            .collect()
    }

    /// Number of retained events.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// True when no event is retained.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Seq of the oldest retained event.
    pub fn first_seq(&self) -> Option<u64> {
        self.events.front().map(|e| e.seq)
    }

    /// Seq of the newest event ever appended (0 when none).
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Current retention: (max_count, max_age_ms); 0 means unlimited.
    pub fn retention(&self) -> (u64, u64) {
        (self.max_count, self.max_age_ms)
    }
}
