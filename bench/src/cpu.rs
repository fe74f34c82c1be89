//! CPU time of processes (Linux `/proc`), to report how much of the machine the load generator
//! and the server side used during a run. Elsewhere these readings are simply absent.

use std::time::Duration;

/// Kernel clock ticks per second for `/proc/<pid>/stat` (USER_HZ, 100 on Linux).
const TICKS_PER_SEC: f64 = 100.0;

/// `utime + stime` of one process (all its threads), in clock ticks.
pub fn process_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_ticks(&stat)
}

/// `utime + stime` from the text of `/proc/<pid>/stat`.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may contain spaces and parentheses: skip to the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After the name: state(3) ppid(4) … utime(14) stime(15) → indices 11 and 12 here.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Direct children of a process (all its threads), from `/proc/<pid>/task/*/children`.
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
    }
    out
}

/// A fixed set of processes: the roots given and all their descendants at creation time.
#[derive(Clone, Debug, Default)]
pub struct CpuProbe {
    pids: Vec<u32>,
}

impl CpuProbe {
    /// The roots and every descendant alive now.
    pub fn new(roots: &[u32]) -> Self {
        let mut pids: Vec<u32> = Vec::new();
        let mut todo: Vec<u32> = roots.to_vec();
        while let Some(p) = todo.pop() {
            if pids.contains(&p) {
                continue;
            }
            pids.push(p);
            todo.extend(children(p));
        }
        Self { pids }
    }

    /// Exactly these processes (no children): e.g. the load generator itself, whose stdio
    /// server child is reported separately.
    pub fn exact(pids: &[u32]) -> Self {
        Self {
            pids: pids.to_vec(),
        }
    }

    /// The processes covered.
    pub fn pids(&self) -> &[u32] {
        &self.pids
    }

    /// Total CPU ticks of the covered processes still alive (`None` if none can be read).
    pub fn ticks(&self) -> Option<u64> {
        let mut any = false;
        let mut sum = 0;
        for &p in &self.pids {
            if let Some(t) = process_ticks(p) {
                any = true;
                sum += t;
            }
        }
        any.then_some(sum)
    }

    /// CPU use since an earlier [`CpuProbe::ticks`] reading over `wall`, in % of one core.
    pub fn percent_since(&self, before: Option<u64>, wall: Duration) -> Option<f64> {
        let (before, now) = (before?, self.ticks()?);
        let secs = wall.as_secs_f64();
        if secs <= 0.0 {
            return None;
        }
        let pct = now.saturating_sub(before) as f64 / TICKS_PER_SEC / secs * 100.0;
        Some((pct * 10.0).round() / 10.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_names() {
        let stat =
            "1234 (node (x) y) S 1 1234 1234 0 -1 4194560 9 0 0 0 250 37 0 0 20 0 11 0 5 0 0";
        assert_eq!(parse_stat_ticks(stat), Some(287));
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn measures_this_process_burning_cpu() {
        let me = std::process::id();
        let probe = CpuProbe::new(&[me]);
        assert!(probe.pids().contains(&me));
        let before = probe.ticks();
        let Some(t0) = before else {
            panic!("no CPU ticks for this process")
        };
        // Spin until the probe has seen 50 ms of CPU (5 ticks at 100 Hz). How long that takes
        // depends on how loaded the machine is, so the bound is generous and only a probe that
        // sees nothing fails.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while probe.ticks().unwrap_or(t0) < t0 + 5 {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "30 s of spinning and the probe saw no CPU time"
            );
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
        }
        let pct = probe.percent_since(before, start.elapsed()).unwrap();
        assert!(pct > 0.0, "{pct}");
    }

    #[test]
    fn finds_children() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let probe = CpuProbe::new(&[std::process::id()]);
        let found = probe.pids().contains(&child.id());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(found, "{:?} lacks {}", probe.pids(), child.id());
    }
}
