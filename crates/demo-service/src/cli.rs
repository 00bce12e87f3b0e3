//! The `demo-service` command line. `main.rs` only calls [`main`].

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::control::Reply;
use crate::ops::{self, ActivateOptions};
use crate::server::{self, ServeOptions};
use crate::{Error, Paths};

#[derive(Debug, Parser)]
#[command(
    name = "demo-service",
    about = "A small HTTP service whose releases switch without refusing a connection"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP service (GET /health, GET /) in the foreground.
    Serve {
        #[arg(long)]
        root: PathBuf,
        /// The release this process is (`ROOT/releases/V`).
        #[arg(long)]
        version: String,
        /// Address to listen on [default: `listen` of ROOT/demo-service.toml].
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Serve on this inherited listening socket instead of binding (set by a handover).
        #[arg(long, value_name = "FD")]
        inherit_fd: Option<i32>,
        /// Write `ready PID` to this inherited pipe once serving (set by a handover).
        #[arg(long, value_name = "FD")]
        ready_fd: Option<i32>,
        /// Fail /health with 503 on purpose (also when the release's release.toml says `broken = true`).
        #[arg(long)]
        broken: bool,
        /// Answer `/` with 500 for this share of requests, 0-100 (also when the release's
        /// release.toml says `error_percent = N`); /health stays 200.
        #[arg(long, value_name = "PERCENT", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=100))]
        error_percent: u32,
        /// How long a draining process waits for its keep-alive connections.
        #[arg(long, value_name = "MS", default_value_t = server::DEFAULT_DRAIN_TIMEOUT.as_millis() as u64)]
        drain_timeout_ms: u64,
        /// How long a handover waits for the successor to be ready.
        #[arg(long, value_name = "MS", default_value_t = server::DEFAULT_READY_TIMEOUT.as_millis() as u64)]
        ready_timeout_ms: u64,
    },
    /// Make the service run release V: hand over from the running release, or start V when
    /// nothing runs. What the release's hooks/activate calls.
    Activate {
        #[arg(long)]
        root: PathBuf,
        /// The release being switched from (`none` on a first install); informational.
        #[arg(long, default_value = "none")]
        from: String,
        #[arg(long)]
        to: String,
        /// Bound on waiting for /health to report the new version, in seconds.
        #[arg(long, value_name = "SECS", default_value_t = 15)]
        health_timeout: u64,
    },
    /// Start release V's service, detached, when none runs (V is the permanent release after a
    /// reboot). Does nothing when V already runs.
    Start {
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        version: String,
        /// Address to listen on [default: `listen` of ROOT/demo-service.toml].
        #[arg(long)]
        listen: Option<SocketAddr>,
        #[arg(long, value_name = "SECS", default_value_t = 15)]
        health_timeout: u64,
    },
    /// Stop the running service: SIGTERM (it drains), then SIGKILL after the timeout.
    Stop {
        #[arg(long)]
        root: PathBuf,
        #[arg(long, value_name = "SECS", default_value_t = 15)]
        timeout: u64,
    },
    /// Print what the running service reports on its control socket, as JSON.
    Status {
        #[arg(long)]
        root: PathBuf,
    },
}

/// Entry point of the binary: parse, run, print one line on error, exit 0/1.
pub fn main() -> ExitCode {
    main_from(std::env::args_os())
}

/// The same, with explicit arguments (the first is the program name). Lets another binary
/// (`orchestrator demo-service ...`) act as the demo service.
pub fn main_from<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = Cli::parse_from(args);
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let name = command_name(&cli.command);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The store shows the tail of stderr to the operator: one clear line.
            eprintln!("demo-service {name}: error: {}", crate::one_line(e));
            ExitCode::FAILURE
        }
    }
}

fn command_name(c: &Command) -> &'static str {
    match c {
        Command::Serve { .. } => "serve",
        Command::Activate { .. } => "activate",
        Command::Start { .. } => "start",
        Command::Stop { .. } => "stop",
        Command::Status { .. } => "status",
    }
}

/// Absolute, resolved root: argv of every process names it the same way, which is how `stop` and
/// the test reaper recognise the service of a root.
fn resolve_root(root: &Path) -> Result<PathBuf, Error> {
    std::fs::canonicalize(root).map_err(Error::io(format!("root directory {}", root.display())))
}

fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(Error::io("starting the async runtime"))
}

/// Runs one parsed command.
pub fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Serve {
            root,
            version,
            listen,
            inherit_fd,
            ready_fd,
            broken,
            error_percent,
            drain_timeout_ms,
            ready_timeout_ms,
        } => {
            let opts = ServeOptions {
                root: resolve_root(&root)?,
                version,
                listen,
                inherit_fd,
                ready_fd,
                broken,
                error_percent,
                drain_timeout: Duration::from_millis(drain_timeout_ms),
                ready_timeout: Duration::from_millis(ready_timeout_ms),
            };
            runtime()?.block_on(server::serve(opts))
        }
        Command::Activate {
            root,
            from,
            to,
            health_timeout,
        } => {
            let root = resolve_root(&root)?;
            let opts = ActivateOptions {
                health_timeout: Duration::from_secs(health_timeout),
                ..ActivateOptions::default()
            };
            let done = runtime()?.block_on(ops::activate(&root, &from, &to, &opts))?;
            println!("{done}");
            Ok(())
        }
        Command::Start {
            root,
            version,
            listen,
            health_timeout,
        } => {
            let root = resolve_root(&root)?;
            let opts = ActivateOptions {
                health_timeout: Duration::from_secs(health_timeout),
                ..ActivateOptions::default()
            };
            let done = runtime()?.block_on(ops::start(&root, &version, listen, &opts))?;
            println!("{done}");
            Ok(())
        }
        Command::Stop { root, timeout } => {
            let root = resolve_root(&root)?;
            let done = ops::stop(&root, Duration::from_secs(timeout))?;
            println!("{done}");
            Ok(())
        }
        Command::Status { root } => {
            let root = resolve_root(&root)?;
            let reply = runtime()?.block_on(ops::status(&root))?;
            match reply {
                Some(r @ Reply::Status { .. }) => {
                    let text = serde_json::to_string(&r).map_err(|e| Error::Control {
                        path: Paths::new(&root).control_socket(),
                        message: "cannot encode the reply".into(),
                        source: Some(e.into()),
                    })?;
                    println!("{text}");
                    Ok(())
                }
                Some(other) => Err(Error::Control {
                    path: Paths::new(&root).control_socket(),
                    message: format!("unexpected reply: {other:?}"),
                    source: None,
                }),
                None => {
                    println!("{{\"reply\":\"not_running\"}}");
                    Ok(())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn handover_flags_parse() {
        let cli = Cli::try_parse_from([
            "demo-service",
            "serve",
            "--root",
            "/r",
            "--version",
            "1.0.1",
            "--inherit-fd",
            "3",
            "--ready-fd",
            "4",
        ])
        .unwrap();
        match cli.command {
            Command::Serve {
                inherit_fd,
                ready_fd,
                drain_timeout_ms,
                ..
            } => {
                assert_eq!((inherit_fd, ready_fd), (Some(3), Some(4)));
                assert_eq!(drain_timeout_ms, 10_000);
            }
            other => panic!("{other:?}"),
        }
    }
}
