//! The [`Recorder`]: numbers operations, stamps them with the run's clock and appends the
//! finished ones to `history.jsonl` and to memory.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::history::Op;

/// Unflushed lines are written out at least this often (when an operation finishes).
const FLUSH_EVERY: Duration = Duration::from_millis(250);

/// Records the operations of a run. Cloning is cheap; every clone records into the same
/// history. Safe to use from many tasks.
#[derive(Clone)]
pub struct Recorder {
    inner: Arc<Inner>,
}

struct Inner {
    /// The run's start: every time is nanoseconds since it.
    start: Instant,
    /// Next op index and next process number, with the time of the last invocation.
    counters: Mutex<Counters>,
    /// Finished operations and the file they go to.
    log: Mutex<Log>,
}

struct Counters {
    next_index: u64,
    next_process: u64,
}

struct Log {
    ops: Vec<Op>,
    file: Option<(PathBuf, BufWriter<File>)>,
    last_flush: Instant,
    /// The first write error (later writes are skipped; reported by [`Recorder::flush`]).
    error: Option<String>,
}

/// A ticket for an operation being invoked: its index and invocation time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Invocation {
    /// The op's index (unique, increasing in invocation order).
    pub index: u64,
    /// When it was invoked (ns since the run's start).
    pub invoke_ns: u64,
}

/// Lock a mutex, taking the data of a poisoned one (a panicking recorder user must not stop
/// the others from recording).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Recorder {
    /// A recorder that appends to `path` (created or truncated), timing from `start`.
    pub fn create(path: &Path, start: Instant) -> anyhow::Result<Recorder> {
        let file = File::create(path).with_context(|| format!("create {}", path.display()))?;
        Ok(Self::with_file(
            Some((path.to_owned(), BufWriter::new(file))),
            start,
        ))
    }

    /// A recorder that keeps operations in memory only.
    pub fn in_memory(start: Instant) -> Recorder {
        Self::with_file(None, start)
    }

    fn with_file(file: Option<(PathBuf, BufWriter<File>)>, start: Instant) -> Recorder {
        Recorder {
            inner: Arc::new(Inner {
                start,
                counters: Mutex::new(Counters {
                    next_index: 0,
                    next_process: 0,
                }),
                log: Mutex::new(Log {
                    ops: Vec::new(),
                    file,
                    last_flush: Instant::now(),
                    error: None,
                }),
            }),
        }
    }

    /// Nanoseconds since the run's start.
    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.inner.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// A new process number, never handed out before.
    pub fn new_process(&self) -> u64 {
        let mut c = lock(&self.inner.counters);
        let p = c.next_process;
        c.next_process += 1;
        p
    }

    /// Invoke an operation: its index and invocation time, taken together so that indexes
    /// increase with invocation times.
    pub fn invoke(&self) -> Invocation {
        let mut c = lock(&self.inner.counters);
        let index = c.next_index;
        c.next_index += 1;
        Invocation {
            index,
            invoke_ns: self.now_ns(),
        }
    }

    /// Record a finished operation (in memory, and as one JSON line in the file; the file is
    /// flushed at least every 250 ms of recording).
    pub fn record(&self, op: Op) {
        let mut log = lock(&self.inner.log);
        let log = &mut *log;
        if log.error.is_none()
            && let Some((path, w)) = &mut log.file
        {
            let written = serde_json::to_writer(&mut *w, &op)
                .map_err(std::io::Error::from)
                .and_then(|()| w.write_all(b"\n"))
                .and_then(|()| {
                    if log.last_flush.elapsed() >= FLUSH_EVERY {
                        log.last_flush = Instant::now();
                        w.flush()
                    } else {
                        Ok(())
                    }
                });
            if let Err(e) = written {
                log.error = Some(format!("write {}: {e}", path.display()));
            }
        }
        log.ops.push(op);
    }

    /// Write out everything recorded so far; fails with the first write error of the run.
    pub fn flush(&self) -> anyhow::Result<()> {
        let mut log = lock(&self.inner.log);
        let log = &mut *log;
        if let Some(e) = &log.error {
            anyhow::bail!("{e}");
        }
        if let Some((path, w)) = &mut log.file {
            w.flush()
                .with_context(|| format!("flush {}", path.display()))?;
            log.last_flush = Instant::now();
        }
        Ok(())
    }

    /// Every operation recorded so far, by index.
    pub fn ops(&self) -> Vec<Op> {
        let mut ops = lock(&self.inner.log).ops.clone();
        ops.sort_by_key(|o| o.index);
        ops
    }

    /// How many operations were recorded so far.
    pub fn len(&self) -> usize {
        lock(&self.inner.log).ops.len()
    }

    /// Whether nothing was recorded yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Read a history written by a [`Recorder`] (one [`Op`] per line, in completion order).
pub fn read_history(path: &Path) -> anyhow::Result<Vec<Op>> {
    let file = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut ops = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("read {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let op: Op = serde_json::from_str(&line)
            .with_context(|| format!("{} line {}: not an operation", path.display(), i + 1))?;
        ops.push(op);
    }
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{OpKind, Outcome};
    use serde_json::json;

    fn op(r: &Recorder, process: u64) -> Op {
        let inv = r.invoke();
        Op {
            index: inv.index,
            process,
            node: 1,
            kind: OpKind::Write,
            key: "r0".into(),
            value: json!(inv.index),
            outcome: Outcome::Ok,
            invoke_ns: inv.invoke_ns,
            complete_ns: r.now_ns(),
            error: None,
        }
    }

    #[test]
    fn records_to_memory_and_file_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.jsonl");
        let r = Recorder::create(&path, Instant::now()).unwrap();
        assert!(r.is_empty());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let r = r.clone();
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        let p = r.new_process();
                        let o = op(&r, p);
                        r.record(o);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        r.flush().unwrap();
        let ops = r.ops();
        assert_eq!(ops.len(), 200);
        // Unique indexes 0..200, increasing with invocation times.
        for (i, o) in ops.iter().enumerate() {
            assert_eq!(o.index, i as u64);
        }
        assert!(ops.windows(2).all(|w| w[0].invoke_ns <= w[1].invoke_ns));
        let mut processes: Vec<u64> = ops.iter().map(|o| o.process).collect();
        processes.sort_unstable();
        processes.dedup();
        assert_eq!(processes.len(), 200);
        let mut back = read_history(&path).unwrap();
        back.sort_by_key(|o| o.index);
        assert_eq!(back, ops);
    }

    #[test]
    fn a_bad_line_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.jsonl");
        std::fs::write(&path, "{\"index\": 1}\n").unwrap();
        let e = read_history(&path).unwrap_err();
        assert!(format!("{e:#}").contains("line 1"), "{e:#}");
    }
}
