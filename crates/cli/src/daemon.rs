//! What the daemon commands (`agent`, `coordinator`) share: their `--config` file, their listen
//! address and the signal that stops them.

use std::fmt::Display;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result, anyhow};

/// The daemon's `--config` TOML file parsed by `parse`, or the defaults without one.
pub fn read_config<T: Default, E: Display>(
    path: Option<&Path>,
    parse: impl FnOnce(&str) -> Result<T, E>,
) -> Result<T> {
    let Some(p) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))?;
    parse(&text).map_err(|e| anyhow!("{}: {e}", p.display()))
}

/// `--listen` (else the config file's `listen`) as a socket address.
pub fn listen_addr(flag: Option<String>, file: Option<String>) -> Result<SocketAddr> {
    let s = flag
        .or(file)
        .ok_or_else(|| anyhow!("no listen address: pass --listen HOST:PORT"))?;
    s.parse()
        .with_context(|| format!("--listen {s:?} is not HOST:PORT"))
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called (it must be
/// called inside the runtime), not when the future is first polled: a daemon reports itself
/// ready (sd_notify) before its server polls the future, and a SIGTERM in between must stop it
/// cleanly rather than kill it.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate()).ok();
    let int = signal(SignalKind::interrupt()).ok();
    async move {
        let wait = |s: Option<tokio::signal::unix::Signal>| async move {
            match s {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = wait(term) => {}
            () = wait(int) => {}
        }
    }
}
