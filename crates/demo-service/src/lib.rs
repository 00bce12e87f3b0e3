//! The demo service: a small HTTP service that proves a release install can be *hot*.
//!
//! # Responsibility
//!
//! `demo-service serve` answers `GET /health` with `{"version":"X.Y.Z","pid":N}`, `GET /` with
//! a line naming its version and pid, and `GET /metrics` with its responses by status code in
//! Prometheus' text format (`http_requests_total{code="200",version="X.Y.Z"} N`, scrapes not
//! counted; each process counts its own, from 0). Its release's `hooks/activate` (run by the release store on
//! install, upgrade and downgrade) calls `demo-service activate`, which switches the running
//! service to another release **without refusing or resetting a single connection**. The same
//! crate lays out release directories for the package builder ([`write_release_dir`]) and carries
//! the load generator ([`load`]) used by the hot-swap test and benchmark.
//!
//! # Files under the root directory `ROOT`
//!
//! | path | what |
//! |---|---|
//! | `ROOT/releases/V/` | release V: `release.toml`, `bin/demo-service`, `hooks/activate` |
//! | `ROOT/demo-service.toml` | `listen = "127.0.0.1:PORT"`: where a freshly started service listens |
//! | `ROOT/run/demo-service.pid` | pid of the process that currently owns the service (temp + rename) |
//! | `ROOT/run/demo-service.sock` | that process's control socket (bound under a temp name, renamed over) |
//! | `ROOT/log/demo-service.log` | stdout/stderr of detached service processes and their successors |
//!
//! # The handover protocol
//!
//! The control socket speaks one JSON line each way (see [`control`]). `activate --to V`:
//!
//! 1. asks the control socket for `status`. Nothing answers (no socket, or a stale one): no service
//!    runs (first install, or a node restart), so it starts `ROOT/releases/V/bin/demo-service serve`
//!    detached (`setsid`, stdio to the log) on the address from `ROOT/demo-service.toml` and goes to
//!    step 5. The service already runs V: nothing to switch, go to step 5.
//! 2. sends `handover V`. The running process **P** creates a pipe and spawns
//!    `ROOT/releases/V/bin/demo-service serve --inherit-fd 3 --ready-fd 4`, where fd 3 is P's
//!    listening socket and fd 4 the pipe's write end (both duplicated in a `pre_exec` hook, so only
//!    this child inherits them; every other descriptor stays close-on-exec).
//! 3. the child **C** serves on the inherited socket at once (P and C now share one listen queue,
//!    so a connection waiting in it is accepted by one of them, never refused), binds its own
//!    control socket under a temp name and renames it over `demo-service.sock`, writes the pid
//!    file, then writes `ready <pid>` to fd 4. If C exits or stays silent for the ready timeout
//!    (10 s), P kills it, keeps serving, and answers the handover with an error.
//! 4. on `ready`, P closes its copy of the listening socket (the socket lives on in C), starts
//!    draining, and only then answers `handed_over` with C's pid. Draining: every response P sends
//!    carries `Connection: close`; an idle keep-alive connection is **not** closed, it stays open
//!    until its next request has been answered (closing an idle connection races with a request
//!    the client may be sending at that instant, which is what makes clients fail), or until the
//!    drain timeout (10 s). Then P exits.
//! 5. `activate` polls `GET /health` (bounded, 15 s) until the body names version V, then exits 0.
//!
//! A *broken* release (`broken = true` in its `release.toml`, or `serve --broken`) starts and
//! serves `/`, but its `/health` answers 503 with a JSON body that names the fault **and the
//! version**. Its activation succeeds on purpose: the hook's job is the switch, judging health is
//! the coordinator's health gate. So `activate` accepts any status from `/health` as long as the
//! body reports version V.
//!
//! A release with `error_percent = N` in its `release.toml` (or `serve --error-percent N`)
//! answers `/` with 500 for N% of its requests (every 10th for 10, by request number), while
//! its `/health` says OK: only its metrics show the fault (what a metric gate must catch).
//!
//! SIGTERM (or SIGINT) makes a server stop accepting, drain the same way, remove its pid file and
//! control socket (only if they are still its own) and exit; `demo-service stop` sends it. Its
//! control socket stops answering when the drain starts, so an `activate` meanwhile (or after a
//! crash, which leaves a stale socket) finds no service and starts one afresh.

pub mod cli;
pub mod control;
pub mod fixture;
pub mod http;
pub mod layout;
pub mod load;
pub mod ops;
pub mod proc;
pub mod server;

use std::path::PathBuf;

pub use layout::{Paths, find_service_binary, write_release_dir};
pub use ops::{ActivateOptions, Activated, activate, start, status, stop};
pub use server::{ServeOptions, serve};

/// Boxed causes of errors whose type varies (hyper, http, body errors).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Everything that can go wrong in this crate; each variant's text is meant to be shown to an
/// operator as one line, with its causes ([`one_line`]). A wrapped cause is returned by
/// `source()` and not repeated in the message.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    InvalidVersion(#[from] orch_types::ParseError),
    #[error("{}: {message}", path.display())]
    Config { path: PathBuf, message: String },
    #[error("control socket {}: {message}", path.display())]
    Control {
        path: PathBuf,
        message: String,
        #[source]
        source: Option<BoxError>,
    },
    #[error("handover to {to} failed: {reason}")]
    Handover { to: String, reason: String },
    #[error("{0}")]
    Health(String),
    #[error("{0}")]
    Start(String),
    /// `--inherit-fd` or `--ready-fd` names a descriptor this process cannot take over.
    #[error("{flag} {fd}")]
    Inherited {
        flag: &'static str,
        fd: i32,
        #[source]
        reason: server::Unfit,
    },
    #[error("{0}")]
    Stop(String),
    #[error("cannot signal pid {pid}")]
    Signal {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}")]
    Http {
        what: String,
        #[source]
        source: Option<BoxError>,
    },
    /// A durable write (pid file) failed.
    #[error(transparent)]
    Write(#[from] orch_package::Error),
}

impl Error {
    /// Wraps an I/O error with what was being done, for `map_err`.
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    /// An HTTP failure caused by `source`, for `map_err`.
    pub(crate) fn http<E: Into<BoxError>>(what: impl Into<String>) -> impl FnOnce(E) -> Error {
        let what = what.into();
        move |source| Error::Http {
            what,
            source: Some(source.into()),
        }
    }
}

/// An error and its causes on one line (`outer: cause: root cause`), as an operator reads it.
pub fn one_line(e: impl std::error::Error + Send + Sync + 'static) -> String {
    format!("{:#}", anyhow::Error::new(e))
}

/// Parses a version the way the store does (strict `x.y.z`); the result is safe to use as a
/// directory name under `ROOT/releases/`.
pub fn parse_version(s: &str) -> Result<orch_types::Version, Error> {
    Ok(s.parse::<orch_types::Version>()?)
}
