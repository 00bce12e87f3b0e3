//! The one-shot commands: `activate` (what the release hook calls), `start`, `stop`, `status`.

use std::fmt;
use std::fs;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use hyper::StatusCode;

use crate::control::{self, Reply, Request};
use crate::layout::{self, Paths};
use crate::{Error, http, parse_version, proc};

/// How long a status request may take.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
/// Between two health polls.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Bounds of `activate` and `start`.
#[derive(Debug, Clone)]
pub struct ActivateOptions {
    /// How long `/health` may take to report the new version.
    pub health_timeout: Duration,
    /// How long the running process may take to answer a handover (it waits up to its ready
    /// timeout, 10 s by default, for the successor).
    pub handover_timeout: Duration,
}

impl Default for ActivateOptions {
    fn default() -> Self {
        ActivateOptions {
            health_timeout: Duration::from_secs(15),
            handover_timeout: Duration::from_secs(30),
        }
    }
}

/// How the service came to run the requested version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum How {
    /// Nothing ran: a detached service was started.
    Started,
    /// The running process handed its socket over.
    HandedOver { from_version: String, from_pid: u32 },
    /// It already ran that version.
    AlreadyRunning,
}

/// The outcome of a successful `activate` or `start`.
#[derive(Debug, Clone)]
pub struct Activated {
    pub version: String,
    pub pid: u32,
    pub listen: SocketAddr,
    /// What `/health` answered with the new version in its body; 503 for a broken release.
    pub health_status: StatusCode,
    pub how: How,
}

impl fmt::Display for Activated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (v, pid, addr) = (&self.version, self.pid, self.listen);
        match &self.how {
            How::Started => write!(f, "demo-service {v} started (pid {pid}) on {addr}")?,
            How::HandedOver {
                from_version,
                from_pid,
            } => write!(
                f,
                "demo-service handed over from {from_version} (pid {from_pid}) to {v} (pid {pid}) on {addr}"
            )?,
            How::AlreadyRunning => write!(
                f,
                "demo-service {v} was already running (pid {pid}) on {addr}"
            )?,
        }
        if self.health_status.is_success() {
            write!(f, "; /health answered {}", self.health_status)
        } else {
            // Activation only switches; whether the release is healthy is the health gate's call.
            write!(
                f,
                "; /health answered {} (unhealthy; the health gate decides)",
                self.health_status
            )
        }
    }
}

/// `demo-service activate --root ROOT --from F --to V`: make the service run release V.
///
/// Succeeds once `/health` answers (with any status) with version V in its body, from the new
/// process; a broken release therefore activates successfully and is caught by the health gate.
/// `from` (`none` on a first install) is informational: what runs is asked from the service.
pub async fn activate(
    root: &Path,
    from: &str,
    to: &str,
    opts: &ActivateOptions,
) -> Result<Activated, Error> {
    let to = parse_version(to)?.to_string();
    if from != "none" {
        parse_version(from)?;
    }
    let paths = Paths::new(root);
    require_release(&paths, &to)?;

    let Some((running, pid, listen)) = running_service(&paths, opts.health_timeout).await? else {
        return start_and_verify(&paths, &to, None, opts).await;
    };
    if running == to {
        let (status, pid) =
            verify_health(listen, &to, Some(pid), opts.health_timeout, None).await?;
        return Ok(Activated {
            version: to,
            pid,
            listen,
            health_status: status,
            how: How::AlreadyRunning,
        });
    }

    let sock = paths.control_socket();
    let reply = control::request(
        &sock,
        &Request::Handover {
            version: to.clone(),
        },
        opts.handover_timeout,
    )
    .await?;
    match reply {
        Some(Reply::HandedOver {
            pid: new_pid,
            listen,
            ..
        }) => {
            let (status, new_pid) =
                verify_health(listen, &to, Some(new_pid), opts.health_timeout, None).await?;
            Ok(Activated {
                version: to,
                pid: new_pid,
                listen,
                health_status: status,
                how: How::HandedOver {
                    from_version: running,
                    from_pid: pid,
                },
            })
        }
        Some(Reply::Error { message }) => Err(Error::Handover {
            to,
            reason: format!("the running {running} (pid {pid}) said: {message}"),
        }),
        Some(other) => Err(Error::Control {
            path: sock,
            message: format!("unexpected reply to handover: {other:?}"),
            source: None,
        }),
        None => Err(Error::Handover {
            to,
            reason: format!("the running {running} (pid {pid}) went away during the handover"),
        }),
    }
}

/// `demo-service start --root ROOT --version V`: start release V's service when none runs (after
/// a reboot, V is the permanent release). Succeeds without doing anything when V already runs;
/// refuses when another version runs.
pub async fn start(
    root: &Path,
    version: &str,
    listen: Option<SocketAddr>,
    opts: &ActivateOptions,
) -> Result<Activated, Error> {
    let version = parse_version(version)?.to_string();
    let paths = Paths::new(root);
    require_release(&paths, &version)?;
    match running_service(&paths, opts.health_timeout).await? {
        None => start_and_verify(&paths, &version, listen, opts).await,
        Some((running, pid, addr)) if running == version => {
            let (status, pid) =
                verify_health(addr, &version, Some(pid), opts.health_timeout, None).await?;
            Ok(Activated {
                version,
                pid,
                listen: addr,
                health_status: status,
                how: How::AlreadyRunning,
            })
        }
        Some((running, pid, _)) => Err(Error::Start(format!(
            "release {running} is already running (pid {pid}); activate {version} to switch, or stop it first"
        ))),
    }
}

/// What the control socket reports, or `None` when no service runs.
pub async fn status(root: &Path) -> Result<Option<Reply>, Error> {
    let paths = Paths::new(root);
    control::request(&paths.control_socket(), &Request::Status, STATUS_TIMEOUT).await
}

/// The outcome of `stop`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stopped {
    NotRunning,
    /// Exited after SIGTERM (drained).
    Stopped {
        pid: i32,
    },
    /// Did not exit within the timeout and was killed.
    Killed {
        pid: i32,
    },
}

impl fmt::Display for Stopped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stopped::NotRunning => write!(f, "demo-service is not running"),
            Stopped::Stopped { pid } => write!(f, "demo-service (pid {pid}) stopped"),
            Stopped::Killed { pid } => write!(
                f,
                "demo-service (pid {pid}) did not stop within the timeout and was killed"
            ),
        }
    }
}

/// `demo-service stop --root ROOT`: SIGTERM to the pid in the pid file (the service drains and
/// exits), wait up to `timeout`, then SIGKILL. Blocking.
pub fn stop(root: &Path, timeout: Duration) -> Result<Stopped, Error> {
    let paths = Paths::new(root);
    let Some(pid) = paths.read_pid() else {
        return Ok(Stopped::NotRunning);
    };
    // A stale pid file may name a recycled pid: signal only our own service of this root.
    if !proc::is_alive(pid) || !proc::is_service_of(pid, root) {
        return Ok(Stopped::NotRunning);
    }
    proc::signal(pid, proc::Signal::TERM).map_err(|source| Error::Signal { pid, source })?;
    if proc::wait_for_exit(pid, timeout) {
        return Ok(Stopped::Stopped { pid });
    }
    let _ = proc::signal(pid, proc::Signal::KILL);
    if !proc::wait_for_exit(pid, Duration::from_secs(5)) {
        return Err(Error::Stop(format!("pid {pid} survived SIGKILL for 5s")));
    }
    // It could not clean up after itself.
    if paths.read_pid() == Some(pid) {
        let _ = fs::remove_file(paths.pid_file());
        let _ = fs::remove_file(paths.control_socket());
    }
    Ok(Stopped::Killed { pid })
}

fn require_release(paths: &Paths, version: &str) -> Result<(), Error> {
    let binary = paths.release_binary(version);
    if binary.is_file() {
        Ok(())
    } else {
        Err(Error::Start(format!(
            "{} does not exist (is release {version} unpacked?)",
            binary.display()
        )))
    }
}

/// `(version, pid, listen)` of the running service, or `None` when none runs. A stopping process
/// closes its control socket as it starts draining, so it already counts as not running; one that
/// still reports `draining` (caught in that instant) is waited for, bounded.
async fn running_service(
    paths: &Paths,
    wait: Duration,
) -> Result<Option<(String, u32, SocketAddr)>, Error> {
    let sock = paths.control_socket();
    let deadline = Instant::now() + wait;
    loop {
        match control::request(&sock, &Request::Status, STATUS_TIMEOUT).await? {
            None => return Ok(None),
            Some(Reply::Status {
                draining: false,
                version,
                pid,
                listen,
            }) => return Ok(Some((version, pid, listen))),
            Some(Reply::Status {
                draining: true,
                pid,
                ..
            }) => {
                if Instant::now() >= deadline {
                    return Err(Error::Start(format!(
                        "the running service (pid {pid}) is shutting down and did not exit within {wait:?}"
                    )));
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
            Some(other) => {
                return Err(Error::Control {
                    path: sock,
                    message: format!("unexpected reply to status: {other:?}"),
                    source: None,
                });
            }
        }
    }
}

async fn start_and_verify(
    paths: &Paths,
    version: &str,
    listen: Option<SocketAddr>,
    opts: &ActivateOptions,
) -> Result<Activated, Error> {
    let listen = match listen {
        Some(a) => a,
        None => layout::configured_listen(paths)?,
    };
    let mut child = spawn_detached(paths, version, listen)?;
    let pid = child.id();
    let result = verify_health(
        listen,
        version,
        Some(pid),
        opts.health_timeout,
        Some((&mut child, paths)),
    )
    .await;
    match result {
        Ok((status, pid)) => Ok(Activated {
            version: version.to_owned(),
            pid,
            listen,
            health_status: status,
            how: How::Started,
        }),
        Err(e) => {
            // Do not leave a half-started service behind a failed activation.
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
            }
            Err(e)
        }
    }
}

/// Starts `ROOT/releases/V/bin/demo-service serve` in its own session with stdio on the log
/// file: it must not share the caller's terminal, signals or output pipes (the store captures
/// the hook's output and would otherwise wait for the service to exit).
fn spawn_detached(
    paths: &Paths,
    version: &str,
    listen: SocketAddr,
) -> Result<std::process::Child, Error> {
    let log_dir = paths.log_dir();
    fs::create_dir_all(&log_dir).map_err(Error::io(format!("creating {}", log_dir.display())))?;
    let log_path = paths.log_file();
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(Error::io(format!("opening {}", log_path.display())))?;
    let log_err = log
        .try_clone()
        .map_err(Error::io(format!("opening {}", log_path.display())))?;
    let binary = paths.release_binary(version);
    let mut cmd = std::process::Command::new(&binary);
    cmd.arg("serve")
        .arg("--root")
        .arg(paths.root())
        .args(["--version", version])
        .args(["--listen", &listen.to_string()])
        .current_dir(paths.root())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    // SAFETY: setsid is async-signal-safe; the child is a fresh fork, never a group leader.
    // (std has no safe way to run code between fork and exec; the call itself is rustix's.)
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::setsid()?;
            Ok(())
        });
    }
    orch_package::fsutil::retry_text_busy(|| cmd.spawn())
        .map_err(Error::io(format!("starting {}", binary.display())))
}

/// Polls `/health` at `addr` until its body reports `version` (and `pid`, when given), whatever
/// the status; returns that status and pid. With `child`, fails early when it exits.
async fn verify_health(
    addr: SocketAddr,
    version: &str,
    pid: Option<u32>,
    timeout: Duration,
    mut child: Option<(&mut std::process::Child, &Paths)>,
) -> Result<(StatusCode, u32), Error> {
    let deadline = Instant::now() + timeout;
    let mut last;
    loop {
        if let Some((child, paths)) = child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            return Err(Error::Start(format!(
                "release {version}'s service exited ({status}) before answering /health; {}: {}",
                paths.log_file().display(),
                log_tail(&paths.log_file(), 3)
            )));
        }
        match http::get(addr, "/health", Duration::from_secs(2)).await {
            Ok(resp) => match resp.health() {
                Some(h) if h.version == version && (pid.is_none() || h.pid == pid) => {
                    return Ok((resp.status, h.pid.unwrap_or(0)));
                }
                Some(h) => {
                    last = format!(
                        "{} reporting version {} (pid {})",
                        resp.status,
                        h.version,
                        h.pid.map_or("?".into(), |p| p.to_string())
                    );
                }
                None => last = format!("{} with a body that is not health JSON", resp.status),
            },
            Err(e) => last = crate::one_line(e),
        }
        if Instant::now() >= deadline {
            let who = pid.map_or(String::new(), |p| format!(" from pid {p}"));
            return Err(Error::Health(format!(
                "/health at {addr} did not report version {version}{who} within {timeout:?}; last answer: {last}"
            )));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// The last `n` non-empty lines of a log, joined on one line (the store shows a stderr tail).
fn log_tail(path: &Path, n: usize) -> String {
    let Ok(text) = fs::read_to_string(path) else {
        return "(log unreadable)".into();
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = &lines[lines.len().saturating_sub(n)..];
    if tail.is_empty() {
        "(log empty)".into()
    } else {
        tail.join(" | ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_tail_joins_last_lines() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("log");
        assert_eq!(log_tail(&p, 3), "(log unreadable)");
        fs::write(&p, "a\n\nb\nc\nd\n").unwrap();
        assert_eq!(log_tail(&p, 3), "b | c | d");
        fs::write(&p, "").unwrap();
        assert_eq!(log_tail(&p, 3), "(log empty)");
    }

    #[test]
    fn activated_line_says_who_decides_health() {
        let a = Activated {
            version: "1.0.1".into(),
            pid: 9,
            listen: "127.0.0.1:1".parse().unwrap(),
            health_status: StatusCode::SERVICE_UNAVAILABLE,
            how: How::HandedOver {
                from_version: "1.0.0".into(),
                from_pid: 8,
            },
        };
        let s = a.to_string();
        assert!(s.contains("from 1.0.0 (pid 8) to 1.0.1 (pid 9)"), "{s}");
        assert!(s.contains("the health gate decides"), "{s}");
    }

    #[tokio::test]
    async fn activate_without_config_names_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let paths = Paths::new(tmp.path());
        layout::write_release_dir(
            &paths.release_dir("1.0.0"),
            "1.0.0",
            false,
            Path::new("/bin/sh"),
        )
        .unwrap();
        let err = activate(tmp.path(), "none", "1.0.0", &ActivateOptions::default())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("demo-service.toml"), "{err}");
        assert!(err.contains("listen"), "{err}");
    }

    #[tokio::test]
    async fn activate_of_a_missing_release_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let err = activate(tmp.path(), "none", "1.0.0", &ActivateOptions::default())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("is release 1.0.0 unpacked?"), "{err}");
        let err = activate(tmp.path(), "none", "1.0", &ActivateOptions::default())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid version"), "{err}");
    }

    #[test]
    fn stop_without_pid_file_is_not_running() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(
            stop(tmp.path(), Duration::from_secs(1)).unwrap(),
            Stopped::NotRunning
        );
        // A pid file naming a process that is not our service (ourselves) is stale.
        let paths = Paths::new(tmp.path());
        fs::create_dir_all(paths.run_dir()).unwrap();
        fs::write(paths.pid_file(), format!("{}\n", std::process::id())).unwrap();
        assert_eq!(
            stop(tmp.path(), Duration::from_secs(1)).unwrap(),
            Stopped::NotRunning
        );
    }
}
