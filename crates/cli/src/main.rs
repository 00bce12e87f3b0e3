//! The `orchestrator` binary: argument parsing and output only. Every capability lives in a
//! library crate; this file maps commands onto them, sets up logging, and turns errors into one
//! stderr line (JSON with `--json`) and an exit code (see `exit.rs` and the README's table).

mod agent_cmd;
mod args;
mod cluster;
mod coordinator_cmd;
mod daemon;
mod demo;
mod exit;
mod history;
mod live;
mod node;
mod output;
mod package_cmd;
mod plan;
mod policy;
mod prune;
mod remote;
mod spinner;
mod tls;
mod wait;

use std::io::IsTerminal;

use clap::{CommandFactory, Parser};
use serde_json::json;

use args::{Cli, Command, GlobalOpts, LogFormat};

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
    let g = cli.global.clone();
    if let Err(e) = init_logging(&g, is_daemon(&cli.command)) {
        fail(&g, &e);
    }
    if let Err(e) = dispatch(cli.command, &g) {
        fail(&g, &e);
    }
}

fn is_daemon(c: &Command) -> bool {
    matches!(c, Command::Agent(_) | Command::Coordinator(_))
}

fn dispatch(command: Command, g: &GlobalOpts) -> anyhow::Result<()> {
    if g.json && !prints_json(&command) {
        anyhow::bail!(
            "--json does not apply to this command: it prints no data (the daemons log; use --log-format json)"
        );
    }
    match command {
        Command::Node(n) => node::run(n, g),
        Command::Package(p) => package_cmd::run(p, g),
        Command::Demo(d) => demo::run(d, g),
        Command::Agent(a) => agent_cmd::run(a),
        Command::Coordinator(a) => coordinator_cmd::coordinator(a),
        Command::Rollout(a) => cluster::rollout(a, g),
        Command::Status(a) => cluster::status(a, g),
        Command::Rollouts(a) => history::rollouts(a, g),
        Command::Pause(a) => cluster::command("pause", a, g),
        Command::Resume(a) => cluster::command("resume", a, g),
        Command::Abort(a) => cluster::command("abort", a, g),
        Command::Rollback(a) => cluster::command("rollback", a, g),
        Command::Promote(a) => cluster::command("promote", a, g),
        Command::Nodes(a) => cluster::nodes(a, g),
        Command::Cluster(c) => cluster::cluster(c, g),
        Command::Certs(c) => tls::certs(c, g),
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "orchestrator", &mut script);
            write_stdout(&script)
        }
        Command::Man { dir } => man(dir),
    }
}

/// Whether `--json` means something for the command (everything that prints data).
fn prints_json(c: &Command) -> bool {
    match c {
        Command::Agent(_)
        | Command::Coordinator(_)
        | Command::Completions { .. }
        | Command::Man { .. } => false,
        Command::Demo(d) => d.cmd.is_some(),
        _ => true,
    }
}

/// `orchestrator man`: the main page on stdout, or every page into `dir`.
fn man(dir: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    let cmd = Cli::command();
    match dir {
        None => {
            let mut page = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut page)?;
            write_stdout(&page)?;
        }
        Some(d) => {
            std::fs::create_dir_all(&d)
                .map_err(|e| anyhow::anyhow!("create {}: {e}", d.display()))?;
            clap_mangen::generate_to(cmd, &d)
                .map_err(|e| anyhow::anyhow!("write man pages into {}: {e}", d.display()))?;
            println!("Wrote the man pages into {}", d.display());
        }
    }
    Ok(())
}

/// Writes `bytes` to stdout; a reader that went away (`| head`) ends the command quietly.
fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(141),
        r => Ok(r?),
    }
}

/// Logs on stderr. The filter: `--log-level`, else `ORCH_LOG`, else `RUST_LOG`, else `info`
/// for the daemons and `warn` for other commands; openraft's internals stay at warn unless
/// the filter names openraft (its info lines are about Raft's machinery, not the rollouts).
fn init_logging(g: &GlobalOpts, daemon: bool) -> anyhow::Result<()> {
    let spec = g
        .log_level
        .clone()
        .or_else(|| std::env::var("ORCH_LOG").ok().filter(|s| !s.is_empty()))
        .or_else(|| std::env::var("RUST_LOG").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| if daemon { "info" } else { "warn" }.to_string());
    let full = if spec.contains("openraft") {
        spec.clone()
    } else {
        format!("{spec},openraft=warn")
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&full).map_err(|e| {
        anyhow::anyhow!("--log-level {spec:?} is not a level or filter (e.g. info, or info,orch_agent=debug): {e}")
    })?;
    let ansi = std::io::stderr().is_terminal() && output::use_color_stderr(g.color);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match g.log_format {
        LogFormat::Text => builder.with_ansi(ansi).init(),
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
    Ok(())
}

/// Ends the command: one error line on stderr (`{"error": {"kind", "message"}}` with --json)
/// and the error's exit code.
fn fail(g: &GlobalOpts, e: &anyhow::Error) -> ! {
    let (code, kind) = exit::classify(e);
    let message = exit::message(e);
    if g.json {
        eprintln!("{}", json!({"error": {"kind": kind, "message": message}}));
    } else {
        eprintln!("error: {message}");
    }
    std::process::exit(code);
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
