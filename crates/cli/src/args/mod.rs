//! Command-line grammar (clap derive). Kept apart from the handlers so `--help` reads as a
//! reference of the whole interface: every flag says what it does and its default, every
//! subcommand shows an example in its long help (`--help`, not `-h`).

mod cluster;
mod daemon;
mod node;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub use cluster::*;
pub use daemon::*;
pub use node::*;

#[derive(Parser, Debug)]
#[command(
    name = "orchestrator",
    version,
    about = "Cluster-wide hot upgrades: node release stores, agents, coordinators and rollouts",
    after_long_help = "Exit codes:\n  0  success (a waited-for rollout succeeded)\n  1  failure (also: a rollout failed, was rolled back or aborted)\n  2  usage error\n  3  a rollout's rollback failed (nodes need a person)\n  4  a rollout paused or awaits promotion (with --exit-on-pause)\n  5  --timeout passed while waiting (the rollout may still be running)\n  130  interrupted (Ctrl-C) while waiting (the rollout continues)\n\nExample:\n  orchestrator demo"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub global: GlobalOpts,
}

/// Options every command accepts.
#[derive(Args, Debug, Clone)]
pub struct GlobalOpts {
    /// Print JSON on stdout instead of text (shapes: docs/cli-json.md); errors then go to
    /// stderr as {"error": {"kind": ..., "message": ...}}.
    #[arg(long, global = true)]
    pub json: bool,
    /// When to colour the output: auto (stdout is a terminal and NO_COLOR is unset), always
    /// or never.
    #[arg(long, global = true, value_enum, value_name = "WHEN", default_value_t = ColorChoice::Auto)]
    pub color: ColorChoice,
    /// What to log on stderr: a level (error, warn, info, debug, trace) or a filter such as
    /// `info,orch_coordinator=debug`; wins over RUST_LOG. openraft's internals stay at warn
    /// unless the filter names openraft [default: info for the daemons (agent, coordinator),
    /// warn for other commands].
    #[arg(long, global = true, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// How log lines look on stderr: text, or json (one object per line).
    #[arg(long, global = true, value_enum, value_name = "FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ColorChoice {
    #[default]
    Auto,
    Always,
    Never,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Act on one node's release store (EMQX-style: versions, unpack, install, ...).
    #[command(after_long_help = node::EXAMPLES)]
    Node(NodeArgs),
    /// Build and verify release packages.
    #[command(subcommand)]
    Package(PackageCmd),
    /// Run a self-contained demonstration on this machine.
    #[command(after_long_help = daemon::DEMO_EXAMPLES)]
    Demo(DemoArgs),
    /// Run the node agent daemon (gRPC) over this node's release store.
    #[command(after_long_help = daemon::AGENT_EXAMPLES)]
    Agent(AgentArgs),
    /// Run a coordinator daemon (Raft member, control API, rollout driver on the leader).
    #[command(after_long_help = daemon::COORDINATOR_EXAMPLES)]
    Coordinator(CoordinatorArgs),
    /// Roll VERSION out across the cluster, node by node, health-gated; waits for the end.
    #[command(after_long_help = cluster::ROLLOUT_EXAMPLES)]
    Rollout(RolloutArgs),
    /// Show a rollout (the running one, else the latest).
    #[command(after_long_help = cluster::STATUS_EXAMPLES)]
    Status(StatusArgs),
    /// List rollouts (the newest ones kept by the coordinators; --all: also archived ones).
    #[command(
        after_long_help = "Examples:\n  orchestrator rollouts\n  orchestrator rollouts --all --json"
    )]
    Rollouts(RolloutsArgs),
    /// Pause a rollout after its in-flight steps.
    #[command(
        after_long_help = "Examples:\n  orchestrator pause\n  orchestrator pause r000003 --json"
    )]
    Pause(RolloutRefArgs),
    /// Resume a paused rollout (retrying a failed step).
    #[command(after_long_help = "Example:\n  orchestrator resume r000003")]
    Resume(RolloutRefArgs),
    /// Stop a rollout now, leaving nodes as they are.
    #[command(after_long_help = "Example:\n  orchestrator abort r000003")]
    Abort(RolloutRefArgs),
    /// Downgrade every node the rollout touched, in reverse order (on a rollout that ended
    /// rollback_failed: retry the nodes it names).
    #[command(after_long_help = "Example:\n  orchestrator rollback r000003")]
    Rollback(RolloutRefArgs),
    /// Continue a canary rollout past its canary nodes.
    #[command(
        after_long_help = "Example:\n  orchestrator rollout 4.2.1 --canary 1 --exit-on-pause && orchestrator promote"
    )]
    Promote(RolloutRefArgs),
    /// List registered nodes, their releases and health (or `nodes forget ID`).
    #[command(
        after_long_help = "Examples:\n  orchestrator nodes\n  orchestrator nodes --json\n  orchestrator nodes forget n7"
    )]
    Nodes(NodesArgs),
    /// Coordinator membership.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Create the cluster's certificate authority and party certificates (mutual TLS).
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Print a shell completion script (bash, zsh, fish, elvish or powershell) on stdout.
    #[command(
        after_long_help = "Examples:\n  orchestrator completions bash > /etc/bash_completion.d/orchestrator\n  orchestrator completions zsh > \"${fpath[1]}/_orchestrator\"\n  orchestrator completions fish > ~/.config/fish/completions/orchestrator.fish"
    )]
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) on stdout, or write one page per command into --dir.
    #[command(
        after_long_help = "Examples:\n  orchestrator man | man -l -\n  orchestrator man --dir /usr/local/share/man/man1"
    )]
    Man {
        /// Write orchestrator.1 and one orchestrator-COMMAND.1 per subcommand into DIR instead
        /// of printing the main page.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// `--retain-rollouts N`: at least 1.
pub fn parse_retain(s: &str) -> Result<usize, String> {
    let n: usize = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of rollouts"))?;
    if n == 0 {
        return Err(
            "0 would archive every rollout as soon as it finishes: keep at least 1 (default 100)"
                .to_string(),
        );
    }
    Ok(n)
}

/// Parses `500ms`, `2s`, `1m`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 500ms, 30s, 2m"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => {
            return Err(format!(
                "invalid duration {s:?}: unit must be ms, s, m or h"
            ));
        }
    };
    Ok(d)
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
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("2 days").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    /// Every argument says what it is, and every command that runs shows an example.
    #[test]
    fn every_argument_and_command_is_documented() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let path = format!("{path} {}", cmd.get_name());
            for a in cmd.get_arguments() {
                let builtin = matches!(a.get_id().as_str(), "help" | "version");
                if !builtin && !a.is_hide_set() && a.get_help().is_none() {
                    missing.push(format!("{path}: argument {} has no help", a.get_id()));
                }
            }
            if cmd.get_about().is_none() && path.contains(' ') {
                missing.push(format!("{path}: no description"));
            }
            let leaf = cmd.get_subcommands().next().is_none();
            let examples = cmd
                .get_after_long_help()
                .is_some_and(|h| h.to_string().contains("Example"));
            if leaf && !examples && cmd.get_name() != "help" {
                missing.push(format!("{path}: no example in its long help"));
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &path, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "", &mut missing);
        assert!(missing.is_empty(), "{}", missing.join("\n"));
    }
}
