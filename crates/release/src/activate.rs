//! Activation: running the command that switches the live service to another release, and the
//! drain hooks around it (the same arguments, environment, timeout and output tail).
//!
//! The hook's output goes to a temp file rather than a pipe: a hook that starts a daemon which
//! inherits the descriptor would otherwise keep the pipe open and hang the store forever.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use orch_types::Version;

use orch_package::error::IoContext;

use crate::error::{Error, Result};
use crate::fsutil::unique_suffix;

/// How the switch was carried out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Activation {
    /// A hook ran and succeeded.
    Hook(String),
    /// No hook is configured or shipped: only the recorded state changed.
    StateOnly,
}

/// Why a hook failed. A leaf rendered inside the sentence of [`Error::Activation`] (or of a
/// drain hook's variant), which the advice follows, so it prints its I/O error itself and has
/// no `source()`.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("cannot prepare its output file {}: {error}", path.display())]
    Output {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot run {}: {error}", prog.display())]
    Spawn {
        prog: PathBuf,
        error: std::io::Error,
    },
    #[error("waiting for {}: {error}", prog.display())]
    Wait {
        prog: PathBuf,
        error: std::io::Error,
    },
    #[error("{} did not finish within {timeout:?} and was killed{}", prog.display(), tail_note(output))]
    TimedOut {
        prog: PathBuf,
        timeout: Duration,
        /// The end of what the hook printed.
        output: String,
    },
    #[error("{} ended with {how}{}", prog.display(), tail_note(output))]
    Failed {
        prog: PathBuf,
        /// `exit code N` or `a signal`.
        how: String,
        output: String,
    },
}

/// Which of a switch's hooks: the file a release ships it as (`hooks/<name>`) and how its
/// failure is reported. The drain hooks run around the activation: `pre-switch` right before
/// it (take the node out of the load balancer), `post-switch` once the node passed its health
/// gate on the new release (put it back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookKind {
    Activate,
    PreSwitch,
    PostSwitch,
}

impl HookKind {
    /// The hook's file name under the release's `hooks/`.
    pub fn file_name(self) -> &'static str {
        match self {
            HookKind::Activate => "activate",
            HookKind::PreSwitch => "pre-switch",
            HookKind::PostSwitch => "post-switch",
        }
    }

    fn error(self, from: String, to: Version, reason: HookError) -> Error {
        let reason = Box::new(reason);
        match self {
            HookKind::Activate => Error::Activation { from, to, reason },
            HookKind::PreSwitch => Error::PreSwitch { from, to, reason },
            HookKind::PostSwitch => Error::PostSwitch { from, to, reason },
        }
    }
}

/// The command to run for a switch to the release in `release_dir`: the configured one, else
/// the release's own `hooks/<kind>`.
pub(crate) fn hook_for(
    configured: Option<&[String]>,
    release_dir: &Path,
    kind: HookKind,
) -> Option<(PathBuf, Vec<String>)> {
    if let Some(cmd) = configured
        && let Some((prog, args)) = cmd.split_first()
    {
        return Some((PathBuf::from(prog), args.to_vec()));
    }
    let hook = release_dir.join("hooks").join(kind.file_name());
    hook.is_file().then(|| (hook, Vec::new()))
}

const TAIL_BYTES: u64 = 2048;

/// The switch a hook runs for: every hook of it gets the same arguments and environment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Switch<'a> {
    pub root: &'a Path,
    /// The release switched to (`ORCH_RELEASE_DIR`).
    pub release_dir: &'a Path,
    pub from: Option<Version>,
    pub to: Version,
    pub timeout: Duration,
}

/// Runs the hook with `FROM TO`, cwd `root` and the documented environment; kills its process
/// group on timeout. Succeeds only on exit 0; a failure is `kind`'s error variant.
pub(crate) fn run_hook(
    kind: HookKind,
    prog: &Path,
    args: &[String],
    sw: &Switch<'_>,
) -> Result<Activation> {
    let from_s = sw
        .from
        .map(|v| v.to_string())
        .unwrap_or_else(|| "none".into());
    let log_path = sw
        .root
        .join("releases")
        .join(format!(".activate-{}.log", unique_suffix()));
    let log = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&log_path)
        .ctx("create", &log_path)?;
    let hook = Hook {
        prog,
        args,
        root: sw.root,
        release_dir: sw.release_dir,
        from: &from_s,
        to: sw.to,
    };
    let result = hook.run(sw.timeout, &log, &log_path);
    let _ = fs::remove_file(&log_path);
    result.map_err(|reason| kind.error(from_s.clone(), sw.to, reason))
}

/// One hook invocation: `prog ARGS.. FROM TO` in `root`, with the documented environment.
struct Hook<'a> {
    prog: &'a Path,
    args: &'a [String],
    root: &'a Path,
    release_dir: &'a Path,
    from: &'a str,
    to: Version,
}

impl Hook<'_> {
    /// Runs the hook with its output in `log`; kills its process group on timeout.
    fn run(&self, timeout: Duration, log: &File, log_path: &Path) -> Result<Activation, HookError> {
        let prog = || self.prog.to_path_buf();
        let dup = || {
            log.try_clone().map_err(|error| HookError::Output {
                path: log_path.to_path_buf(),
                error,
            })
        };
        let to = self.to.to_string();
        let mut cmd = Command::new(self.prog);
        cmd.args(self.args)
            .arg(self.from)
            .arg(&to)
            .current_dir(self.root)
            .env("ORCH_ROOT_DIR", self.root)
            .env("ORCH_RELEASE_DIR", self.release_dir)
            .env("ORCH_FROM_VERSION", self.from)
            .env("ORCH_TO_VERSION", &to)
            .stdin(Stdio::null())
            .stdout(dup()?)
            .stderr(dup()?)
            // Own process group, so a timeout kills the hook and whatever it spawned in its group.
            .process_group(0);
        // A hook just unpacked may still be open for writing in a child forked meanwhile.
        let mut child = orch_package::fsutil::retry_text_busy(|| cmd.spawn()).map_err(|error| {
            HookError::Spawn {
                prog: prog(),
                error,
            }
        })?;
        let start = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) if start.elapsed() >= timeout => {
                    // The group's id is the hook's pid (process_group(0) above).
                    let group = rustix::process::Pid::from_child(&child);
                    let _ =
                        rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
                    let _ = child.wait();
                    return Err(HookError::TimedOut {
                        prog: prog(),
                        timeout,
                        output: tail(log),
                    });
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(error) => {
                    return Err(HookError::Wait {
                        prog: prog(),
                        error,
                    });
                }
            }
        };
        if status.success() {
            return Ok(Activation::Hook(self.prog.display().to_string()));
        }
        let how = status
            .code()
            .map(|c| format!("exit code {c}"))
            .unwrap_or_else(|| "a signal".to_string());
        Err(HookError::Failed {
            prog: prog(),
            how,
            output: tail(log),
        })
    }
}

/// The last [`TAIL_BYTES`] the hook printed, trimmed (empty when unreadable).
fn tail(mut log: &File) -> String {
    (|| -> std::io::Result<String> {
        let len = log.metadata()?.len();
        log.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)))?;
        let mut buf = Vec::new();
        log.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).trim().to_string())
    })()
    .unwrap_or_default()
}

/// `; output: ...` on one line (newlines folded), or nothing when the hook printed nothing.
fn tail_note(tail: &str) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!("; output: {}", tail.lines().collect::<Vec<_>>().join(" | "))
    }
}
