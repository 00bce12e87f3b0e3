//! The `orchestrator` binary: argument parsing and output only. Every capability lives in a
//! library crate; this file maps commands onto them and errors onto one stderr line + exit code.

mod args;
mod demo;
mod node;
mod package_cmd;

use clap::Parser;

use args::{Cli, Command};

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ORCH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Node(n) => node::run(n),
        Command::Package(p) => package_cmd::run(p),
        Command::Demo(d) => demo::run(d),
    };
    if let Err(e) = result {
        // One line: the operator reads what failed and why; `{:#}` joins the causes.
        let msg = format!("{e:#}").replace('\n', " ");
        eprintln!("error: {msg}");
        std::process::exit(1);
    }
}
