//! `demo-service serve`: the HTTP server, its control socket, the handover to a successor and the
//! drain. The protocol is described in the crate docs.

use std::convert::Infallible;
use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONNECTION, CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::control::{self, Reply, Request as ControlRequest};
use crate::layout::{self, Paths};
use crate::{Error, parse_version};

/// How long a drained process waits for its remaining keep-alive connections.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a process waits for its successor's `ready` before giving up on a handover.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// The fd number at which a successor finds the inherited listening socket.
pub const INHERITED_LISTENER_FD: RawFd = 3;
/// The fd number at which a successor finds the write end of the ready pipe.
pub const READY_FD: RawFd = 4;
/// How long a control connection may take to send its request.
const CONTROL_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Options of `demo-service serve`.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub root: PathBuf,
    pub version: String,
    /// Address to bind; when `None` (and nothing is inherited), `ROOT/demo-service.toml`'s.
    pub listen: Option<SocketAddr>,
    /// An inherited listening socket (a handover): serve on it instead of binding.
    pub inherit_fd: Option<RawFd>,
    /// Write `ready <pid>\n` here (then close it) once serving; the predecessor waits for it.
    pub ready_fd: Option<RawFd>,
    /// Fail `/health` on purpose (also enabled by `broken = true` in the release's manifest).
    pub broken: bool,
    pub drain_timeout: Duration,
    pub ready_timeout: Duration,
}

impl ServeOptions {
    pub fn new(root: impl Into<PathBuf>, version: impl Into<String>) -> Self {
        ServeOptions {
            root: root.into(),
            version: version.into(),
            listen: None,
            inherit_fd: None,
            ready_fd: None,
            broken: false,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            ready_timeout: DEFAULT_READY_TIMEOUT,
        }
    }
}

struct State {
    version: String,
    pid: u32,
    broken: bool,
    listen: SocketAddr,
    paths: Paths,
    drain_timeout: Duration,
    ready_timeout: Duration,
    /// Once set, every response says `Connection: close`.
    draining: AtomicBool,
    /// Open HTTP and control connections; the drain waits for zero.
    connections: watch::Sender<usize>,
    /// Serialises handovers; holds the successor once one took over.
    handed_over: tokio::sync::Mutex<Option<(String, u32)>>,
}

/// Counts one open connection for as long as it lives.
struct ConnectionGuard(Arc<State>);

impl ConnectionGuard {
    fn new(state: &Arc<State>) -> Self {
        state.connections.send_modify(|n| *n += 1);
        ConnectionGuard(state.clone())
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.send_modify(|n| *n -= 1);
    }
}

/// Sent by a successful handover to the accept loop, which stops accepting, starts draining and
/// then acknowledges, so the handover is answered only once new connections reach the successor.
struct HandoverDone {
    ack: oneshot::Sender<()>,
}

enum StopReason {
    HandedOver(oneshot::Sender<()>),
    Signal(&'static str),
}

/// Runs the service until it has handed over (and drained) or was told to stop by a signal.
pub async fn serve(opts: ServeOptions) -> Result<(), Error> {
    let version = parse_version(&opts.version)?.to_string();
    let paths = Paths::new(&opts.root);
    let broken = opts.broken || layout::release_is_broken(&paths, &version)?;
    let pid = std::process::id();

    // Take the inherited descriptors first: they must become close-on-exec before anything else
    // could spawn a process and leak them.
    let ready = opts.ready_fd.map(take_ready_fd).transpose()?;
    let std_listener = match opts.inherit_fd {
        Some(fd) => take_listener_fd(fd)?,
        None => {
            let addr = match opts.listen {
                Some(a) => a,
                None => layout::configured_listen(&paths)?,
            };
            std::net::TcpListener::bind(addr).map_err(Error::io(format!("binding {addr}")))?
        }
    };
    std_listener
        .set_nonblocking(true)
        .map_err(Error::io("setting the listener non-blocking"))?;
    let listen = std_listener
        .local_addr()
        .map_err(Error::io("reading the listen address"))?;
    let listener = Arc::new(
        TcpListener::from_std(std_listener).map_err(Error::io("registering the listener"))?,
    );

    let mut sigterm = signal(SignalKind::terminate()).map_err(Error::io("installing SIGTERM"))?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(Error::io("installing SIGINT"))?;

    let run_dir = paths.run_dir();
    fs::create_dir_all(&run_dir).map_err(Error::io(format!("creating {}", run_dir.display())))?;
    let (control, control_id) = bind_control(&paths)?;
    layout::write_atomic(&paths.pid_file(), format!("{pid}\n").as_bytes())?;

    let state = Arc::new(State {
        version: version.clone(),
        pid,
        broken,
        listen,
        paths: paths.clone(),
        drain_timeout: opts.drain_timeout,
        ready_timeout: opts.ready_timeout,
        draining: AtomicBool::new(false),
        connections: watch::Sender::new(0),
        handed_over: tokio::sync::Mutex::new(None),
    });
    info!(
        version,
        pid,
        %listen,
        broken,
        inherited = opts.inherit_fd.is_some(),
        "demo-service serving"
    );

    if let Some(mut ready) = ready {
        // If the predecessor is gone (it gave up, or was killed), we are simply the service now.
        if let Err(e) = ready.write_all(format!("ready {pid}\n").as_bytes()) {
            warn!("could not tell the predecessor we are ready: {e}");
        }
    }

    let (stop_tx, mut stop_rx) = mpsc::channel::<HandoverDone>(1);
    let control_task = tokio::spawn(control_loop(
        control,
        state.clone(),
        Arc::downgrade(&listener),
        stop_tx,
    ));

    let reason = loop {
        tokio::select! {
            biased;
            Some(done) = stop_rx.recv() => break StopReason::HandedOver(done.ack),
            _ = sigterm.recv() => break StopReason::Signal("SIGTERM"),
            _ = sigint.recv() => break StopReason::Signal("SIGINT"),
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => spawn_connection(stream, &state),
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning on the error.
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    };

    // A handover that completes from now on finds no accept loop to acknowledge it; dropping the
    // receiver (and any message queued in it) releases its wait.
    drop(stop_rx);
    // Stop accepting: our copy of the socket closes; after a handover the successor's copy keeps
    // the socket (and its queue of pending connections) alive.
    drop(listener);
    state.draining.store(true, Ordering::SeqCst);
    control_task.abort();
    let signalled = match reason {
        StopReason::HandedOver(ack) => {
            let _ = ack.send(());
            None
        }
        StopReason::Signal(name) => {
            info!("{name}: stopped accepting, draining");
            Some(name)
        }
    };

    let mut open = state.connections.subscribe();
    let n = *open.borrow();
    if n > 0 {
        info!(connections = n, "draining");
    }
    tokio::select! {
        _ = open.wait_for(|n| *n == 0) => info!("drained"),
        _ = tokio::time::sleep(state.drain_timeout) => {
            let left = *state.connections.borrow();
            warn!(connections = left, "drain timeout: closing the remaining connections");
        }
        // A second signal cuts the drain short, as operators expect.
        _ = sigterm.recv() => warn!("SIGTERM while draining: exiting now"),
        _ = sigint.recv() => warn!("SIGINT while draining: exiting now"),
    }

    if signalled.is_some() {
        remove_if_ours(&paths, pid, control_id);
    }
    info!(version, pid, "exiting");
    Ok(())
}

fn spawn_connection(stream: TcpStream, state: &Arc<State>) {
    let guard = ConnectionGuard::new(state);
    let state = state.clone();
    tokio::spawn(async move {
        let _guard = guard;
        let _ = stream.set_nodelay(true);
        let svc = service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(respond(&req, &state)) }
        });
        // No timer is configured, so hyper never closes an idle keep-alive connection by itself:
        // closing one races with the client's next request. Drain ends them cleanly instead.
        if let Err(e) = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), svc)
            .await
        {
            debug!("connection ended with an error: {e}");
        }
    });
}

fn respond(req: &Request<Incoming>, state: &State) -> Response<Full<Bytes>> {
    let text = "text/plain; charset=utf-8";
    let readable = matches!(*req.method(), Method::GET | Method::HEAD);
    let (status, content_type, body) = match req.uri().path() {
        "/health" if readable => health(state),
        "/" if readable => (
            StatusCode::OK,
            text,
            format!("demo-service {} (pid {})\n", state.version, state.pid),
        ),
        "/" | "/health" => (
            StatusCode::METHOD_NOT_ALLOWED,
            text,
            "method not allowed\n".into(),
        ),
        _ => (StatusCode::NOT_FOUND, text, "not found\n".into()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    if state.draining.load(Ordering::SeqCst) {
        // hyper closes the connection after writing a response that says so; the client knows
        // not to reuse it, so nothing is lost.
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

fn health(state: &State) -> (StatusCode, &'static str, String) {
    let json = "application/json";
    if state.broken {
        let body = serde_json::json!({
            "status": "unhealthy",
            "version": state.version,
            "pid": state.pid,
            "fault": format!(
                "release {} was built broken (broken = true in its release.toml): its health check fails on purpose",
                state.version
            ),
        });
        (StatusCode::SERVICE_UNAVAILABLE, json, body.to_string())
    } else {
        // Field order matters to readers comparing bytes: {"version":"X.Y.Z","pid":N}.
        let body = format!(
            "{{\"version\":{},\"pid\":{}}}",
            serde_json::Value::from(state.version.as_str()),
            state.pid
        );
        (StatusCode::OK, json, body)
    }
}

async fn control_loop(
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
                Err(message) => {
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

/// Spawns release `to`'s binary on our listening socket, waits for its `ready`, then has the
/// accept loop stop and start draining. On any failure the successor is killed and we keep
/// serving: a failed handover leaves the service as it was.
async fn handover(
    state: &Arc<State>,
    listener: &Weak<TcpListener>,
    stop_tx: &mpsc::Sender<HandoverDone>,
    to: &str,
) -> Result<Reply, String> {
    let to = parse_version(to).map_err(|e| e.to_string())?.to_string();
    let mut handed_over = state.handed_over.lock().await;
    if let Some((version, pid)) = &*handed_over {
        return Err(format!(
            "this process already handed over to {version} (pid {pid})"
        ));
    }
    if state.draining.load(Ordering::SeqCst) {
        return Err("this process is shutting down".into());
    }
    let binary = state.paths.release_binary(&to);
    if !binary.is_file() {
        return Err(format!(
            "{} does not exist (is release {to} unpacked?)",
            binary.display()
        ));
    }
    // Holding a strong reference keeps the socket open until the child has its own copy.
    let Some(listener) = listener.upgrade() else {
        return Err("this process is shutting down".into());
    };
    let (mut child, ready_rx) = spawn_successor(state, &binary, &to, listener.as_raw_fd())
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
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
        return Err(message);
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
    // exactly these two descriptors survive the exec, and only in this child.
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
    let child = cmd.spawn()?;
    // Our copy of the write end must go, or EOF would never tell us the child died.
    drop(ready_write);
    let rx = tokio::net::unix::pipe::Receiver::from_owned_fd(ready_read)?;
    Ok((child, rx))
}

fn pipe_cloexec() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fresh descriptors we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both were just returned by pipe2 and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn set_cloexec(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor number; fails cleanly with EBADF if it is not open.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Takes ownership of an inherited listening TCP socket, after checking it is one (taking a
/// wrong descriptor would close something else on drop).
fn take_listener_fd(fd: RawFd) -> Result<std::net::TcpListener, Error> {
    let err = |m: String| Error::Start(format!("--inherit-fd {fd}: {m}"));
    if fd <= 2 {
        return Err(err("is a standard stream, not a socket".into()));
    }
    let mut listening: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `listening`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut listening as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(err(format!(
            "not a socket: {}",
            std::io::Error::last_os_error()
        )));
    }
    if listening == 0 {
        return Err(err("not a listening socket".into()));
    }
    set_cloexec(fd).map_err(|e| err(e.to_string()))?;
    // SAFETY: checked above that fd is an open listening socket; nothing else in this process
    // owns it (it was inherited for us).
    Ok(unsafe { std::net::TcpListener::from_raw_fd(fd) })
}

fn take_ready_fd(fd: RawFd) -> Result<fs::File, Error> {
    if fd <= 2 {
        return Err(Error::Start(format!(
            "--ready-fd {fd}: is a standard stream"
        )));
    }
    set_cloexec(fd).map_err(|e| Error::Start(format!("--ready-fd {fd}: {e}")))?;
    // SAFETY: the descriptor is open (fcntl succeeded) and was inherited for us alone.
    Ok(unsafe { fs::File::from_raw_fd(fd) })
}

/// Binds the control socket under a temp name and renames it into place, so that the path always
/// reaches a live process: the predecessor's socket until this rename, ours from then on.
fn bind_control(paths: &Paths) -> Result<(UnixListener, (u64, u64)), Error> {
    let path = paths.control_socket();
    let tmp = paths
        .run_dir()
        .join(format!(".demo-service.sock.{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let listener =
        UnixListener::bind(&tmp).map_err(Error::io(format!("binding {}", tmp.display())))?;
    let meta = fs::metadata(&tmp).map_err(Error::io(format!("stat {}", tmp.display())))?;
    fs::rename(&tmp, &path).map_err(Error::io(format!("renaming to {}", path.display())))?;
    Ok((listener, (meta.dev(), meta.ino())))
}

/// Removes the pid file and control socket if they are still ours (a successor may have replaced
/// them, and its files must survive our exit).
fn remove_if_ours(paths: &Paths, pid: u32, control_id: (u64, u64)) {
    if paths.read_pid() == Some(pid as i32) {
        let _ = fs::remove_file(paths.pid_file());
    }
    let sock = paths.control_socket();
    if fs::metadata(&sock).is_ok_and(|m| (m.dev(), m.ino()) == control_id) {
        let _ = fs::remove_file(&sock);
    }
}
