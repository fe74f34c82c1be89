//! Placement leases at the process level.
//!
//! A node may run a single-instance (`replicas: 1`) server only while it holds a placement
//! lease (see `cluster/lease.rs`). The node itself stops such servers when its lease lapses,
//! but a node that is frozen (SIGSTOP, a long GC-like pause, a hung host) cannot stop
//! anything. So the child is started through `hangar exec-child --lease-fd N`, which does not
//! `exec` the server but stays as its parent and kills it the moment the lease it was last
//! given lapses, whatever state the node is in.
//!
//! The node writes each renewed deadline into a pipe as 8 bytes, little endian: an instant of
//! `CLOCK_MONOTONIC` in nanoseconds, a clock that every process on the machine reads alike
//! (and that a frozen process does not stop). The shim opens the pipe's read end through
//! `/proc/<node pid>/fd/N` (no descriptor is inherited, and no unsafe code is needed). The
//! pipe closing (the node died or dropped the connection) also ends the server.

use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::process::ExitCode;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// This node's placement lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    /// Not in a cluster: single-instance servers run without one.
    NotRequired,
    /// Held until this `CLOCK_MONOTONIC` instant, in nanoseconds (0: never held).
    Until(u64),
}

impl Lease {
    /// Whether servers may run under it now.
    pub fn held(self) -> bool {
        match self {
            Lease::NotRequired => true,
            Lease::Until(t) => mono_now_ns() < t,
        }
    }
}

/// The lease as the node holds it, for spawning lease-bound children.
pub type LeaseWatch = watch::Receiver<Lease>;

/// Now, on `CLOCK_MONOTONIC`, in nanoseconds.
pub fn mono_now_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (t.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(t.tv_nsec as u64)
}

/// The node's end of a child's lease pipe.
pub(super) struct LeasePipe {
    /// Kept open while the child runs: the shim opens it through `/proc/<node>/fd/<n>`, so
    /// no descriptor is ever inherited (the node spawns from many threads at once).
    read: OwnedFd,
    write: OwnedFd,
}

impl LeasePipe {
    /// A pipe holding `deadline` already (the shim reads it before starting the server).
    pub(super) fn new(deadline: u64) -> io::Result<LeasePipe> {
        use rustix::pipe::PipeFlags;
        let (read, write) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        rustix::io::write(&write, &deadline.to_le_bytes())?;
        Ok(LeasePipe { read, write })
    }

    /// The fd number of the read end in this process (`--lease-fd` of the shim).
    pub(super) fn read_fd(&self) -> RawFd {
        use std::os::fd::AsRawFd;
        self.read.as_raw_fd()
    }

    /// Write every new deadline of `lease` into the pipe until `done` (the child exited);
    /// then close it.
    pub(super) fn feed(self, mut lease: LeaseWatch, done: CancellationToken) {
        tokio::spawn(async move {
            let LeasePipe { read, write } = self;
            loop {
                tokio::select! {
                    _ = done.cancelled() => break,
                    r = lease.changed() => if r.is_err() { break },
                }
                let deadline = match *lease.borrow_and_update() {
                    Lease::Until(t) => t,
                    Lease::NotRequired => u64::MAX,
                };
                // Non-blocking: a full pipe (the shim is not reading) skips this renewal;
                // the next one carries a later deadline anyway.
                let _ = rustix::io::write(&write, &deadline.to_le_bytes());
            }
            drop((read, write));
        });
    }
}

/// `hangar exec-child --parent P --lease-fd N`: run `program args` as a child (through
/// `hangar exec-child` again, which arms the server's parent-death signal) and kill it when
/// the lease read from the node's fd N lapses, or when the node closes the pipe. Returns the
/// server's exit status.
pub fn supervise(parent: i32, lease_fd: RawFd, program: &str, args: &[String]) -> ExitCode {
    use std::io::Read;
    let path = format!("/proc/{parent}/fd/{lease_fd}");
    let mut lease = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("hangar exec-child: cannot open the lease pipe {path}: {e}");
            return ExitCode::from(126);
        }
    };
    let mut b = [0u8; 8];
    let deadline = match lease.read_exact(&mut b) {
        Ok(()) => u64::from_le_bytes(b),
        Err(_) => 0,
    };
    if mono_now_ns() >= deadline {
        eprintln!("hangar exec-child: this node holds no placement lease; not starting the server");
        return ExitCode::from(75);
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hangar exec-child: cannot start: {e}");
            return ExitCode::from(126);
        }
    };
    rt.block_on(watch_over(lease, deadline, program, args))
}

/// The shim's loop: the server's exit, the lease's deadline, renewals, signals.
async fn watch_over(
    mut lease: std::fs::File,
    mut deadline: u64,
    program: &str,
    args: &[String],
) -> ExitCode {
    use std::io::Read;
    use tokio::signal::unix::{SignalKind, signal};
    // An orderly stop signals the whole process group: the server acts on it, and this
    // process waits to report its exit. (exec resets handled signals to the default in the
    // server.)
    let mut signals = Vec::new();
    for kind in [
        SignalKind::terminate(),
        SignalKind::interrupt(),
        SignalKind::hangup(),
    ] {
        match signal(kind) {
            Ok(s) => signals.push(s),
            Err(e) => eprintln!("hangar exec-child: cannot handle {kind:?}: {e}"),
        }
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("hangar exec-child: cannot find the hangar binary: {e}");
            return ExitCode::from(126);
        }
    };
    let mut child = match tokio::process::Command::new(exe)
        .args([
            "exec-child",
            "--parent",
            &std::process::id().to_string(),
            "--",
            program,
        ])
        .args(args)
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hangar exec-child: cannot run '{program}': {e}");
            return ExitCode::from(127);
        }
    };
    let pid = child.id().unwrap_or_default();
    // The server's stdin and stdout must close when it exits, not when this process does.
    if let Err(e) = detach_stdio() {
        eprintln!("hangar exec-child: cannot detach from the server's stdio: {e}");
    }
    // Renewals from the node, read by a thread (the pipe blocks here).
    let (tx, mut renewals) = tokio::sync::mpsc::unbounded_channel::<Option<u64>>();
    std::thread::spawn(move || {
        let mut b = [0u8; 8];
        loop {
            let next = lease
                .read_exact(&mut b)
                .ok()
                .map(|()| u64::from_le_bytes(b));
            let closed = next.is_none();
            if tx.send(next).is_err() || closed {
                return;
            }
        }
    });
    loop {
        let now = mono_now_ns();
        if now >= deadline {
            let _ = child.kill().await;
            eprintln!(
                "hangar exec-child: placement lease lapsed at CLOCK_MONOTONIC {now} ns; killed the MCP server (pid {pid})"
            );
            return ExitCode::from(137);
        }
        let signalled = async {
            if signals.is_empty() {
                std::future::pending::<()>().await;
            }
            futures::future::select_all(signals.iter_mut().map(|s| Box::pin(s.recv()))).await;
        };
        tokio::select! {
            status = child.wait() => {
                return status.map_or(ExitCode::from(1), exit_code);
            }
            _ = tokio::time::sleep(std::time::Duration::from_nanos(deadline - now)) => {}
            r = renewals.recv() => match r {
                Some(Some(d)) => deadline = d,
                _ => {
                    // The node is gone or dropped the connection.
                    let _ = child.kill().await;
                    return ExitCode::from(137);
                }
            },
            _ = signalled => {}
        }
    }
}

/// Point this process's stdin and stdout at /dev/null (the server keeps the real ones).
fn detach_stdio() -> io::Result<()> {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    rustix::stdio::dup2_stdin(&null)?;
    rustix::stdio::dup2_stdout(&null)?;
    Ok(())
}

fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => ExitCode::from(c as u8),
        (None, Some(s)) => ExitCode::from((128 + s) as u8),
        _ => ExitCode::from(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_pipe_carries_the_first_deadline_and_every_renewal_then_closes() {
        let (tx, rx) = watch::channel(Lease::Until(5));
        let pipe = LeasePipe::new(5).unwrap();
        let read = rustix::io::dup(&pipe.read).unwrap();
        let done = CancellationToken::new();
        pipe.feed(rx, done.clone());
        tx.send_replace(Lease::Until(9));
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        hangar_wait::Wait::new(
            "two deadlines in the pipe",
            std::time::Duration::from_secs(5),
        )
        .expect_async(async || {
            if let Ok(n) = rustix::io::read(&read, &mut buf) {
                got.extend_from_slice(&buf[..n]);
            }
            (got.len() >= 16).then_some(())
        })
        .await;
        assert_eq!(&got[..8], &5u64.to_le_bytes());
        assert_eq!(&got[8..16], &9u64.to_le_bytes());
        done.cancel();
        // The write end closes once the child is done: end of file.
        hangar_wait::Wait::new("end of file", std::time::Duration::from_secs(5))
            .expect_async(async || (rustix::io::read(&read, &mut buf) == Ok(0)).then_some(()))
            .await;
    }

    #[test]
    fn a_lease_is_held_until_its_deadline() {
        assert!(Lease::NotRequired.held());
        assert!(!Lease::Until(0).held());
        assert!(Lease::Until(mono_now_ns() + 60_000_000_000).held());
        assert!(!Lease::Until(mono_now_ns()).held());
    }
}
