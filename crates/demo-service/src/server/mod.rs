//! `demo-service serve`: the HTTP server, its control socket, the handover to a successor and the
//! drain. The protocol is described in the crate docs.

mod fds;
mod handover;
mod respond;

pub use fds::Unfit;

use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

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
    /// Answer `/` with 500 for this share of requests (0-100; also `error_percent = N` in the
    /// release's manifest), while `/health` stays 200.
    pub error_percent: u32,
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
            error_percent: 0,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            ready_timeout: DEFAULT_READY_TIMEOUT,
        }
    }
}

struct State {
    version: String,
    pid: u32,
    broken: bool,
    /// `/` answers 500 for this share of its requests.
    error_percent: u32,
    /// Requests to `/` so far: which of them fail is decided by their number, so exactly
    /// `error_percent` of them do, evenly spread.
    root_requests: AtomicU64,
    /// Responses by status code (`/metrics` itself not counted), for `/metrics`.
    responses: std::sync::Mutex<std::collections::BTreeMap<u16, u64>>,
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
    let faults = layout::release_faults(&paths, &version)?;
    let broken = opts.broken || faults.broken;
    let error_percent = match opts.error_percent {
        0 => faults.error_percent,
        p => p.min(100),
    };
    let pid = std::process::id();
    let (listener, ready) = take_or_bind(&opts, &paths)?;
    let listen = listener
        .local_addr()
        .map_err(Error::io("reading the listen address"))?;
    let mut signals = Signals::install()?;
    let run_dir = paths.run_dir();
    fs::create_dir_all(&run_dir).map_err(Error::io(format!("creating {}", run_dir.display())))?;
    let (control, control_id) = fds::bind_control(&paths)?;
    orch_package::fsutil::write_atomic(&paths.pid_file(), format!("{pid}\n").as_bytes())?;

    let state = Arc::new(State {
        version: version.clone(),
        pid,
        broken,
        error_percent,
        root_requests: AtomicU64::new(0),
        responses: std::sync::Mutex::default(),
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
        error_percent,
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
    let control_task = tokio::spawn(handover::control_loop(
        control,
        state.clone(),
        Arc::downgrade(&listener),
        stop_tx,
    ));
    let reason = accept_until_stopped(&listener, &state, &mut stop_rx, &mut signals).await;

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
            false
        }
        StopReason::Signal(name) => {
            info!("{name}: stopped accepting, draining");
            true
        }
    };
    drain(&state, &mut signals).await;
    if signalled {
        fds::remove_if_ours(&paths, pid, control_id);
    }
    info!(version, pid, "exiting");
    Ok(())
}

/// The listening socket (inherited in a handover, else bound) and the ready pipe to report on.
/// The inherited descriptors are taken first: they must become close-on-exec before anything
/// else could spawn a process and leak them.
fn take_or_bind(
    opts: &ServeOptions,
    paths: &Paths,
) -> Result<(Arc<TcpListener>, Option<fs::File>), Error> {
    let ready = opts.ready_fd.map(fds::take_ready_fd).transpose()?;
    let std_listener = match opts.inherit_fd {
        Some(fd) => fds::take_listener_fd(fd)?,
        None => {
            let addr = match opts.listen {
                Some(a) => a,
                None => layout::configured_listen(paths)?,
            };
            std::net::TcpListener::bind(addr).map_err(Error::io(format!("binding {addr}")))?
        }
    };
    std_listener
        .set_nonblocking(true)
        .map_err(Error::io("setting the listener non-blocking"))?;
    let listener =
        TcpListener::from_std(std_listener).map_err(Error::io("registering the listener"))?;
    Ok((Arc::new(listener), ready))
}

/// SIGTERM and SIGINT: stop accepting and drain; a second one during the drain cuts it short.
struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    fn install() -> Result<Signals, Error> {
        Ok(Signals {
            term: signal(SignalKind::terminate()).map_err(Error::io("installing SIGTERM"))?,
            int: signal(SignalKind::interrupt()).map_err(Error::io("installing SIGINT"))?,
        })
    }

    /// The name of the next signal received.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Accepts connections until a handover completed or a signal came.
async fn accept_until_stopped(
    listener: &TcpListener,
    state: &Arc<State>,
    stop_rx: &mut mpsc::Receiver<HandoverDone>,
    signals: &mut Signals,
) -> StopReason {
    loop {
        tokio::select! {
            biased;
            Some(done) = stop_rx.recv() => return StopReason::HandedOver(done.ack),
            name = signals.next() => return StopReason::Signal(name),
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => respond::spawn_connection(stream, state),
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning on the error.
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// Waits until every open connection is done, the drain timeout passes, or another signal.
async fn drain(state: &State, signals: &mut Signals) {
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
        name = signals.next() => warn!("{name} while draining: exiting now"),
    }
}
