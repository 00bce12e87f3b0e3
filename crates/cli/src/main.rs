//! The `orchestrator` binary: argument parsing and output only. Every capability lives in a
//! library crate; this file maps commands onto them and errors onto one stderr line + exit code.

mod agent_cmd;
mod args;
mod cluster;
mod coordinator_cmd;
mod daemon;
mod demo;
mod node;
mod output;
mod package_cmd;
mod remote;
mod tls;

use clap::Parser;

use args::{Cli, Command};

fn main() {
    // `orchestrator demo-service ...` is the demo service itself, so a demo needs no second
    // binary (the demo packages then carry a wrapper that execs this one).
    if std::env::args().nth(1).as_deref() == Some("demo-service") {
        let code = orch_demo_service::cli::main_from(std::env::args_os().skip(1));
        std::process::exit(if code == std::process::ExitCode::SUCCESS {
            0
        } else {
            1
        });
    }
    let cli = Cli::parse();
    // A printing command piped into `head` should end quietly, not panic. SIGPIPE stays
    // ignored (Rust's default) because a coordinator or agent closing its connection while
    // this process writes to it (TLS refused, failover) would otherwise kill the command
    // without a word; only a broken stdout ends it quietly.
    quiet_on_closed_stdout();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ORCH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Node(n) => node::run(n),
        Command::Package(p) => package_cmd::run(p),
        Command::Demo(d) => demo::run(d),
        Command::Agent(a) => agent_cmd::run(a),
        Command::Coordinator(a) => coordinator_cmd::coordinator(a),
        Command::Rollout(a) => cluster::rollout(a),
        Command::Status(a) => cluster::status(a),
        Command::Rollouts(a) => cluster::rollouts(a),
        Command::Pause(a) => cluster::command("pause", a),
        Command::Resume(a) => cluster::command("resume", a),
        Command::Abort(a) => cluster::command("abort", a),
        Command::Rollback(a) => cluster::command("rollback", a),
        Command::Promote(a) => cluster::command("promote", a),
        Command::Nodes(a) => match a.cmd {
            None => cluster::nodes(a.list),
            Some(crate::args::NodesCmd::Forget { id, cluster }) => {
                cluster::forget_node(&id, cluster)
            }
        },
        Command::Cluster(c) => cluster::cluster(c),
        Command::Certs(c) => tls::certs(c),
    };
    if let Err(e) = result {
        // One line: the operator reads what failed and why; `{:#}` joins the causes.
        let msg = format!("{e:#}").replace('\n', " ");
        eprintln!("error: {msg}");
        std::process::exit(1);
    }
}

/// Ends the process quietly (exit 141, as a filter killed by SIGPIPE) when printing fails
/// because stdout's reader went away; every other panic is reported as usual.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}
