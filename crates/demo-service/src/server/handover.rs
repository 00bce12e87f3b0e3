//! The control socket's server side, and the handover to a successor (see the crate docs).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::{
    CONTROL_READ_TIMEOUT, ConnectionGuard, HandoverDone, INHERITED_LISTENER_FD, READY_FD, State,
};
use crate::control::{self, Reply, Request as ControlRequest};

pub(super) async fn control_loop(
    control: UnixListener,
    state: Arc<State>,
    listener: Weak<TcpListener>,
    stop_tx: mpsc::Sender<HandoverDone>,
) {
    loop {
        match control.accept().await {
            Ok((stream, _)) => {
                // Counted like an HTTP connection, so the process does not exit (drain finished)
                // before the handover reply has been written.
                let guard = ConnectionGuard::new(&state);
                let (state, listener, stop_tx) = (state.clone(), listener.clone(), stop_tx.clone());
                tokio::spawn(async move {
                    let _guard = guard;
                    handle_control(stream, &state, &listener, &stop_tx).await;
                });
            }
            Err(e) => {
                warn!("control accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle_control(
    mut stream: UnixStream,
    state: &Arc<State>,
    listener: &Weak<TcpListener>,
    stop_tx: &mpsc::Sender<HandoverDone>,
) {
    let line =
        match tokio::time::timeout(CONTROL_READ_TIMEOUT, control::read_line(&mut stream)).await {
            Ok(Ok(line)) => line,
            Ok(Err(e)) => {
                debug!("control read failed: {e}");
                return;
            }
            Err(_) => return,
        };
    let reply = match serde_json::from_str::<ControlRequest>(&line) {
        Ok(ControlRequest::Status) => Reply::Status {
            version: state.version.clone(),
            pid: state.pid,
            listen: state.listen,
            draining: state.draining.load(Ordering::SeqCst),
        },
        Ok(ControlRequest::Handover { version }) => {
            match handover(state, listener, stop_tx, &version).await {
                Ok(reply) => reply,
                Err(e) => {
                    let message = crate::one_line(e);
                    warn!("handover to {version} failed: {message}");
                    Reply::Error { message }
                }
            }
        }
        Err(e) => Reply::Error {
            message: format!("bad request {line:?}: {e}"),
        },
    };
    let mut out = match serde_json::to_string(&reply) {
        Ok(s) => s,
        Err(e) => format!("{{\"reply\":\"error\",\"message\":\"{e}\"}}"),
    };
    out.push('\n');
    if let Err(e) = stream.write_all(out.as_bytes()).await {
        warn!("could not write the control reply: {e}");
    }
}

/// Why this process did not hand over; the reply's message. Nothing changed.
#[derive(Debug, thiserror::Error)]
enum HandoverRefused {
    #[error(transparent)]
    Version(#[from] orch_types::ParseError),
    #[error("this process already handed over to {version} (pid {pid})")]
    AlreadyHandedOver { version: String, pid: u32 },
    #[error("this process is shutting down")]
    ShuttingDown,
    #[error("{} does not exist (is release {to} unpacked?)", binary.display())]
    NoBinary { binary: PathBuf, to: String },
    #[error("cannot start {}", binary.display())]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The successor started but did not say `ready` (it died, stayed silent, or said
    /// something else); it was killed.
    #[error("{0}")]
    NotReady(String),
}

/// Spawns release `to`'s binary on our listening socket, waits for its `ready`, then has the
/// accept loop stop and start draining. On any failure the successor is killed and we keep
/// serving: a failed handover leaves the service as it was.
async fn handover(
    state: &Arc<State>,
    listener: &Weak<TcpListener>,
    stop_tx: &mpsc::Sender<HandoverDone>,
    to: &str,
) -> Result<Reply, HandoverRefused> {
    let to = orch_types::Version::from_str(to)?.to_string();
    let mut handed_over = state.handed_over.lock().await;
    if let Some((version, pid)) = &*handed_over {
        return Err(HandoverRefused::AlreadyHandedOver {
            version: version.clone(),
            pid: *pid,
        });
    }
    if state.draining.load(Ordering::SeqCst) {
        return Err(HandoverRefused::ShuttingDown);
    }
    let binary = state.paths.release_binary(&to);
    if !binary.is_file() {
        return Err(HandoverRefused::NoBinary { binary, to });
    }
    // Holding a strong reference keeps the socket open until the child has its own copy.
    let Some(listener) = listener.upgrade() else {
        return Err(HandoverRefused::ShuttingDown);
    };
    let (mut child, ready_rx) = spawn_successor(state, &binary, &to, listener.as_raw_fd())
        .map_err(|source| HandoverRefused::Spawn {
            binary: binary.clone(),
            source,
        })?;
    drop(listener);
    let child_pid = child.id().unwrap_or(0);
    info!(
        to,
        child_pid, "successor started, waiting for it to be ready"
    );

    let log = state.paths.log_file();
    let ready = tokio::time::timeout(state.ready_timeout, control::read_line(ready_rx)).await;
    let failure = match ready {
        Ok(Ok(line)) if line.starts_with("ready") => None,
        Ok(Ok(line)) if line.is_empty() => {
            // EOF: the child closed its end without a word, almost always by exiting.
            let status = match tokio::time::timeout(Duration::from_secs(2), child.wait()).await {
                Ok(Ok(s)) => s.to_string(),
                _ => "still running without a ready signal".into(),
            };
            Some(format!(
                "release {to}'s service (pid {child_pid}) stopped before it was ready ({status}); its stderr went to this service's ({} when started detached)",
                log.display()
            ))
        }
        Ok(Ok(line)) => Some(format!(
            "unexpected ready line {line:?} from pid {child_pid}"
        )),
        Ok(Err(e)) => Some(format!("reading the ready pipe: {e}")),
        Err(_) => Some(format!(
            "release {to}'s service (pid {child_pid}) was not ready within {:?}",
            state.ready_timeout
        )),
    };
    if let Some(message) = failure {
        // The child may hold our socket and may even accept on it; it must not outlive a
        // failed handover.
        let _ = child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
        return Err(HandoverRefused::NotReady(message));
    }

    let (ack_tx, ack_rx) = oneshot::channel();
    if stop_tx.send(HandoverDone { ack: ack_tx }).await.is_ok() {
        let _ = ack_rx.await;
    }
    *handed_over = Some((to.clone(), child_pid));
    info!(to, child_pid, "handed over; draining");
    // Dropping the handle neither kills nor waits: the successor outlives us.
    drop(child);
    Ok(Reply::HandedOver {
        from: state.version.clone(),
        version: to,
        pid: child_pid,
        listen: state.listen,
    })
}

fn spawn_successor(
    state: &State,
    binary: &Path,
    to: &str,
    listener_fd: RawFd,
) -> std::io::Result<(tokio::process::Child, tokio::net::unix::pipe::Receiver)> {
    let (ready_read, ready_write) = pipe_cloexec()?;
    let write_fd = ready_write.as_raw_fd();
    let mut cmd = tokio::process::Command::new(binary);
    cmd.arg("serve")
        .arg("--root")
        .arg(state.paths.root())
        .args(["--version", to])
        .args(["--inherit-fd", &INHERITED_LISTENER_FD.to_string()])
        .args(["--ready-fd", &READY_FD.to_string()])
        .args([
            "--drain-timeout-ms",
            &state.drain_timeout.as_millis().to_string(),
        ])
        .args([
            "--ready-timeout-ms",
            &state.ready_timeout.as_millis().to_string(),
        ])
        .current_dir(state.paths.root())
        .stdin(Stdio::null())
        .kill_on_drop(false);
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe calls
    // (fcntl, dup2, close). Both descriptors are first copied above the target numbers, so that
    // neither dup2 can clobber the other's source; dup2's copies do not have FD_CLOEXEC, so
    // exactly these two descriptors survive the exec, and only in this child. Raw libc rather
    // than rustix: rustix's dup2 wants its target as an `OwnedFd`, which fds 3 and 4 of the
    // forked child are not, and there is no safe way to run code between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let high_listener = libc::fcntl(listener_fd, libc::F_DUPFD, 10);
            if high_listener < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let high_write = libc::fcntl(write_fd, libc::F_DUPFD, 10);
            if high_write < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::dup2(high_listener, INHERITED_LISTENER_FD) < 0
                || libc::dup2(high_write, READY_FD) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(high_listener);
            libc::close(high_write);
            Ok(())
        });
    }
    let child = orch_package::fsutil::retry_text_busy(|| cmd.spawn())?;
    // Our copy of the write end must go, or EOF would never tell us the child died.
    drop(ready_write);
    let rx = tokio::net::unix::pipe::Receiver::from_owned_fd(ready_read)?;
    Ok((child, rx))
}

fn pipe_cloexec() -> std::io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?)
}
