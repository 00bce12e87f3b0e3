//! Activation: running the command that switches the live service to another release.
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

use crate::error::{Error, IoContext, Result};
use crate::fsutil::unique_suffix;

/// How the switch was carried out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Activation {
    /// A hook ran and succeeded.
    Hook(String),
    /// No hook is configured or shipped: only the recorded state changed.
    StateOnly,
}

/// The command to run for a switch to `to`: the configured one, else the release's own hook.
pub(crate) fn hook_for(
    configured: Option<&[String]>,
    release_dir: &Path,
) -> Option<(PathBuf, Vec<String>)> {
    if let Some(cmd) = configured
        && let Some((prog, args)) = cmd.split_first()
    {
        return Some((PathBuf::from(prog), args.to_vec()));
    }
    let hook = release_dir.join("hooks").join("activate");
    hook.is_file().then(|| (hook, Vec::new()))
}

const TAIL_BYTES: u64 = 2048;

/// Runs the hook with `FROM TO`, cwd `root` and the documented environment; kills its process
/// group on timeout. Succeeds only on exit 0.
pub(crate) fn run_hook(
    prog: &Path,
    args: &[String],
    root: &Path,
    release_dir: &Path,
    from: Option<Version>,
    to: Version,
    timeout: Duration,
) -> Result<Activation> {
    let from_s = from.map(|v| v.to_string()).unwrap_or_else(|| "none".into());
    let log_path = root
        .join("releases")
        .join(format!(".activate-{}.log", unique_suffix()));
    let log = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&log_path)
        .ctx("create", &log_path)?;
    let result = wait_hook(
        prog,
        args,
        root,
        release_dir,
        &from_s,
        to,
        timeout,
        &log,
        &log_path,
    );
    let _ = fs::remove_file(&log_path);
    result.map_err(|reason| Error::Activation {
        from: from_s.clone(),
        to,
        reason,
    })
}

#[allow(clippy::too_many_arguments)]
fn wait_hook(
    prog: &Path,
    args: &[String],
    root: &Path,
    release_dir: &Path,
    from_s: &str,
    to: Version,
    timeout: Duration,
    log: &File,
    log_path: &Path,
) -> std::result::Result<Activation, String> {
    let dup = || {
        log.try_clone()
            .map_err(|e| format!("dup {}: {e}", log_path.display()))
    };
    let mut child = Command::new(prog)
        .args(args)
        .arg(from_s)
        .arg(to.to_string())
        .current_dir(root)
        .env("ORCH_ROOT_DIR", root)
        .env("ORCH_RELEASE_DIR", release_dir)
        .env("ORCH_FROM_VERSION", from_s)
        .env("ORCH_TO_VERSION", to.to_string())
        .stdin(Stdio::null())
        .stdout(dup()?)
        .stderr(dup()?)
        // Own process group, so a timeout kills the hook and whatever it spawned in its group.
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", prog.display()))?;
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if start.elapsed() >= timeout => {
                // SAFETY: plain kill(2) on the group we created; no memory is touched.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                let _ = child.wait();
                return Err(format!(
                    "{} did not finish within {:?} and was killed{}",
                    prog.display(),
                    timeout,
                    tail_note(log)
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("waiting for {}: {e}", prog.display())),
        }
    };
    if status.success() {
        Ok(Activation::Hook(prog.display().to_string()))
    } else {
        let code = status
            .code()
            .map(|c| format!("exit code {c}"))
            .unwrap_or_else(|| "a signal".to_string());
        Err(format!(
            "{} ended with {code}{}",
            prog.display(),
            tail_note(log)
        ))
    }
}

fn tail_note(mut log: &File) -> String {
    let tail = (|| -> std::io::Result<String> {
        let len = log.metadata()?.len();
        log.seek(SeekFrom::Start(len.saturating_sub(TAIL_BYTES)))?;
        let mut buf = Vec::new();
        log.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).trim().to_string())
    })()
    .unwrap_or_default();
    if tail.is_empty() {
        String::new()
    } else {
        // One line for the operator: newlines folded so the message stays a single line.
        format!("; output: {}", tail.lines().collect::<Vec<_>>().join(" | "))
    }
}
