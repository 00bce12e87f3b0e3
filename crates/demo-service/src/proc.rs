//! Process helpers (Linux): liveness that treats zombies as dead, and recognising our own service
//! processes by their command line, so a stale pid file never gets an unrelated process signalled.

use std::path::Path;
use std::time::{Duration, Instant};

use rustix::io::Errno;
pub use rustix::process::Signal;
use rustix::process::{Pid, kill_process, test_kill_process};

/// Whether `pid` names a live process. A zombie counts as dead: a detached service is reparented
/// to pid 1, which in a container may never reap it, and "exited but not reaped" is what callers
/// waiting for an exit care about.
pub fn is_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    let Some(p) = Pid::from_raw(pid) else {
        return false;
    };
    // Signal 0: the process exists (EPERM: it exists but belongs to someone else).
    let exists = matches!(test_kill_process(p), Ok(()) | Err(Errno::PERM));
    exists && !is_zombie(pid)
}

/// Whether every thread of `pid` has exited. A multi-threaded process's group leader shows `Z` as
/// soon as its own thread exits, while other threads may still be unwinding and holding the
/// process's files (its listening sockets among them); only when every task is `Z`/`X` are they
/// closed. Without /proc/PID/task (not Linux-like) the leader's state decides.
fn is_zombie(pid: i32) -> bool {
    let tasks: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    if tasks.is_empty() {
        return task_is_dead(&format!("/proc/{pid}/stat")).unwrap_or(false);
    }
    // A task that vanished between listing and reading has exited.
    tasks
        .iter()
        .all(|t| task_is_dead(&format!("/proc/{pid}/task/{t}/stat")).unwrap_or(true))
}

/// The state in a `stat` file is `Z` (zombie) or `X` (dead); None when it cannot be read.
fn task_is_dead(stat_path: &str) -> Option<bool> {
    let stat = std::fs::read_to_string(stat_path).ok()?;
    // The state follows the parenthesised command name, which may itself contain ") ".
    stat.rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next())
        .map(|state| state == 'Z' || state == 'X')
}

/// The process's argv, if readable.
pub fn cmdline(pid: i32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// Whether `pid` is a demo-service process working on `root` (its argv has `--root ROOT`).
pub fn is_service_of(pid: i32, root: &Path) -> bool {
    let Some(args) = cmdline(pid) else {
        return false;
    };
    // Either the demo-service binary itself, or a binary that runs it as its `demo-service`
    // subcommand (`orchestrator demo-service ...`, used when no separate binary was built).
    let is_ours = args
        .first()
        .is_some_and(|a0| a0.ends_with(crate::layout::BINARY_NAME))
        || args.get(1).map(String::as_str) == Some(crate::layout::BINARY_NAME);
    is_ours
        && args
            .windows(2)
            .any(|w| w[0] == "--root" && same_path(Path::new(&w[1]), root))
}

/// Path equality that tolerates different spellings of one directory (symlinks, `..`). Only
/// absolute paths are resolved: a relative one would resolve against our cwd, not the process's.
fn same_path(a: &Path, b: &Path) -> bool {
    if a == b {
        return true;
    }
    let resolve = |p: &Path| {
        p.is_absolute()
            .then(|| std::fs::canonicalize(p).ok())
            .flatten()
    };
    matches!((resolve(a), resolve(b)), (Some(x), Some(y)) if x == y)
}

/// Every live demo-service process whose argv names `root`, found by scanning `/proc`. Tests and
/// benchmarks use it to kill a whole chain of successors, including ones whose pid they never saw.
pub fn service_processes_of(root: &Path) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id() as i32;
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me && is_alive(*pid) && is_service_of(*pid, root))
        .collect()
}

/// Sends `sig` to `pid`; a pid <= 0 (a process group, or every process) is refused.
pub fn signal(pid: i32, sig: Signal) -> std::io::Result<()> {
    let p = (pid > 0)
        .then(|| Pid::from_raw(pid))
        .flatten()
        .ok_or(Errno::SRCH)?;
    Ok(kill_process(p, sig)?)
}

/// Polls until `pid` is dead or `timeout` passes; returns whether it died.
pub fn wait_for_exit(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !is_alive(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_is_alive_and_nonsense_is_not() {
        assert!(is_alive(std::process::id() as i32));
        assert!(!is_alive(0));
        assert!(!is_alive(-1));
        assert!(!is_alive(i32::MAX));
    }

    #[test]
    fn zombie_counts_as_dead() {
        let child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        // Not reaped until `wait`: a zombie once it exits.
        assert!(wait_for_exit(pid, Duration::from_secs(10)));
        let mut child = child;
        child.wait().unwrap();
    }
}
