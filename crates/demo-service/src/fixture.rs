//! Helpers shared by the integration tests and the benchmark: a root directory with releases, the
//! activation hook run exactly as the release store runs it, and a reaper that kills every service
//! process of a root, including detached ones and successors whose pid was never seen.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::layout::{self, Paths};
use crate::{Error, proc};

/// `1.0.i`: the release names the tests and the benchmark walk through.
pub fn patch_version(i: usize) -> String {
    format!("1.0.{i}")
}

/// A loopback address that was free when probed (bind port 0, read, close).
pub fn free_loopback_addr() -> std::io::Result<SocketAddr> {
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// Lays out `root` with `ROOT/releases/V/` for each `(version, broken)` (the binary copied from
/// `binary`) and `ROOT/demo-service.toml` saying `listen`.
pub fn setup_root(
    root: &Path,
    binary: &Path,
    releases: &[(String, bool)],
    listen: SocketAddr,
) -> Result<(), Error> {
    let paths = Paths::new(root);
    for (version, broken) in releases {
        layout::write_release_dir(&paths.release_dir(version), version, *broken, binary)?;
    }
    let config = format!("listen = \"{listen}\"\n");
    std::fs::write(paths.config_file(), config).map_err(Error::io("writing demo-service.toml"))
}

/// What a hook run produced.
#[derive(Debug)]
pub struct HookOutput {
    pub success: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `ROOT/releases/TO/hooks/activate FROM TO` as the release store does: working directory
/// ROOT, `ORCH_ROOT_DIR`, `ORCH_RELEASE_DIR`, `ORCH_FROM_VERSION`, `ORCH_TO_VERSION` set, stdout
/// and stderr captured. Killed after `timeout`.
pub async fn run_hook(
    root: &Path,
    from: &str,
    to: &str,
    timeout: Duration,
) -> std::io::Result<HookOutput> {
    let paths = Paths::new(root);
    let release = paths.release_dir(to);
    let hook = release.join("hooks").join("activate");
    let mut cmd = tokio::process::Command::new(&hook);
    cmd.args([from, to])
        .current_dir(root)
        .env("ORCH_ROOT_DIR", root)
        .env("ORCH_RELEASE_DIR", &release)
        .env("ORCH_FROM_VERSION", from)
        .env("ORCH_TO_VERSION", to)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = orch_package::fsutil::retry_text_busy(|| cmd.spawn())?;
    let out = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "{} {from} {to} did not finish within {timeout:?}",
                    hook.display()
                ),
            )
        })??;
    Ok(HookOutput {
        success: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Kills every demo-service process of a root when dropped, also during a panic: the one in the
/// pid file, and every process whose argv names the root (detached starts, successors, processes
/// still draining).
pub struct Reaper {
    root: PathBuf,
}

impl Reaper {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Reaper { root: root.into() }
    }

    /// SIGKILLs them all and waits (bounded) until they are gone; returns the pids killed.
    pub fn kill_all(&self) -> Vec<i32> {
        let mut pids = proc::service_processes_of(&self.root);
        if let Some(pid) = Paths::new(&self.root).read_pid()
            && !pids.contains(&pid)
            && proc::is_alive(pid)
            && proc::is_service_of(pid, &self.root)
        {
            pids.push(pid);
        }
        for pid in &pids {
            let _ = proc::signal(*pid, proc::Signal::KILL);
        }
        for pid in &pids {
            proc::wait_for_exit(*pid, Duration::from_secs(5));
        }
        pids
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.kill_all();
    }
}
