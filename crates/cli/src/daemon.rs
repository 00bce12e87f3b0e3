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

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
