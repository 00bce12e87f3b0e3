//! The grammar of the commands that talk to the coordinators.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use orch_types::Version;
use orch_types::rollout::NodeCount;

use super::{TlsArgs, parse_duration};

pub const ROLLOUT_EXAMPLES: &str = "Examples:
  orchestrator rollout 4.2.1 --package emqx-4.2.1.zip
  orchestrator rollout 4.2.1 --nodes n1,n2,n3 --batch-size 2 --min-healthy-time 30s
  orchestrator rollout 4.2.1 --canary 1 --exit-on-pause --timeout 30m --json
  orchestrator rollout 4.2.1 --detach
  orchestrator rollout 4.2.1 --package emqx-4.2.1.zip --dry-run
  orchestrator rollout 4.2.1 --wave-by zone --batch-size 50% --max-unavailable 1
  orchestrator rollout 4.2.1 --selector role=web,zone=a --batch-size 25%

While it waits, the command shows a live view on a terminal (one line per event otherwise) and
ends with the rollout: exit 0 succeeded, 1 failed, rolled back or aborted, 3 rollback failed,
4 paused or awaiting promotion (--exit-on-pause), 5 --timeout passed. Losing the coordinators
does not end it: it reconnects. Ctrl-C stops waiting, not the rollout.";

pub const STATUS_EXAMPLES: &str = "Examples:
  orchestrator status
  orchestrator status r000003 --events 50
  orchestrator status --watch --timeout 30m
  orchestrator status --watch --next --exit-on-pause

With --watch the command exits like `rollout` does when the rollout ends (0 succeeded, 1 failed,
rolled back or aborted, 3 rollback failed, 4 paused with --exit-on-pause, 5 --timeout).";

/// How to reach the coordinators.
#[derive(Args, Debug, Clone)]
pub struct ClusterOpts {
    /// A coordinator's address (repeatable, or comma-separated); any member will do
    /// [default: $ORCHESTRATOR_COORDINATORS].
    #[arg(
        long = "coordinator",
        value_name = "ADDR",
        env = "ORCHESTRATOR_COORDINATORS",
        value_delimiter = ','
    )]
    pub coordinators: Vec<String>,
    /// For reads: when no leader can be reached, accept the answer of any coordinator (it may
    /// be out of date; the command says so on stderr). Without it, reads come from the leader
    /// or from a coordinator at least as up to date as what this command saw.
    #[arg(long)]
    pub stale: bool,
    /// How long to wait. One-shot commands: for a leader to answer (when every coordinator
    /// refuses the connection they fail at once) [default: 10s]. `rollout` (waiting) and
    /// `status --watch`: for the rollout to end, then exit 5 leaving it running [default: no
    /// limit].
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    #[command(flatten)]
    pub tls: TlsArgs,
}

#[derive(Args, Debug)]
pub struct NodesArgs {
    #[command(subcommand)]
    pub cmd: Option<NodesCmd>,
    #[command(flatten)]
    pub cluster: ClusterOpts,
}

#[derive(Subcommand, Debug)]
pub enum NodesCmd {
    /// Remove a node from the registry (a decommissioned machine). Refused while a rollout
    /// holds it; an agent that registers again reappears.
    #[command(after_long_help = "Example:\n  orchestrator nodes forget n7")]
    Forget {
        /// The node id.
        id: String,
        #[command(flatten)]
        cluster: ClusterOpts,
    },
}

#[derive(Args, Debug)]
pub struct RolloutsArgs {
    /// Also the rollouts archived out of the replicated state (--retain-rollouts) into the
    /// answering coordinator's history file.
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub cluster: ClusterOpts,
}

#[derive(Args, Debug)]
pub struct RolloutRefArgs {
    /// The rollout [default: the running one].
    pub id: Option<String>,
    #[command(flatten)]
    pub cluster: ClusterOpts,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The rollout [default: the running one, else the latest].
    pub id: Option<String>,
    /// Keep showing the rollout until it ends (a live view on a terminal, one line per event
    /// otherwise), then exit with its outcome's code.
    #[arg(long)]
    pub watch: bool,
    /// With --watch: when no rollout is running, wait for the next one to start instead of
    /// showing the last one.
    #[arg(long, requires = "watch")]
    pub next: bool,
    /// With --watch: exit 4 when the rollout pauses or waits for `orchestrator promote`.
    #[arg(long, requires = "watch")]
    pub exit_on_pause: bool,
    /// How many of the last events to show: a number, or `all` [default: all].
    #[arg(long, value_name = "N", value_parser = parse_events)]
    pub events: Option<EventCount>,
    #[command(flatten)]
    pub cluster: ClusterOpts,
}

/// `--events N|all`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventCount {
    All,
    Last(usize),
}

fn parse_events(s: &str) -> Result<EventCount, String> {
    if s == "all" {
        return Ok(EventCount::All);
    }
    s.parse()
        .map(EventCount::Last)
        .map_err(|_| format!("{s:?} is not a number of events (or `all`)"))
}

/// `N` or `P%` (`--batch-size`, `--max-unavailable`).
pub(crate) fn parse_node_count(s: &str) -> Result<NodeCount, String> {
    s.parse().map_err(|e: orch_types::ParseError| e.to_string())
}

/// A label name (`--wave-by`): not empty, no `=` or `,`, no control characters.
pub(crate) fn parse_label_key(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 128 || s.contains(['=', ',']) || s.chars().any(char::is_control) {
        return Err(format!(
            "{s:?} is not a label name: use the K of an agent's --label K=V"
        ));
    }
    Ok(s.to_string())
}

/// `--selector K=V,...`: the label pairs, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector(pub Vec<(String, String)>);

/// `K=V,K=V` (`--selector`): every pair with a key, each key once.
pub(crate) fn parse_selector(s: &str) -> Result<Selector, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    for pair in s.split(',') {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(format!("{pair:?} is not K=V (for example zone=a,role=web)"));
        };
        let k = parse_label_key(k.trim())?;
        if out.iter().any(|(seen, _)| *seen == k) {
            return Err(format!("label {k:?} is given twice"));
        }
        out.push((k, v.trim().to_string()));
    }
    Ok(Selector(out))
}

#[derive(Args, Debug)]
pub struct RolloutArgs {
    /// The version to roll out (x.y.z).
    pub version: Version,
    /// Upload this package and push it to the nodes (without it, the coordinators must hold it
    /// already).
    #[arg(long, value_name = "FILE")]
    pub package: Option<PathBuf>,
    /// Target nodes in order [default: every registered node, by id].
    #[arg(long, value_name = "ID,ID,...", value_delimiter = ',')]
    pub nodes: Vec<String>,
    /// Nodes upgraded at a time (at least 1), or a percentage of each wave's nodes (`25%`,
    /// rounded up, at least 1 node) [default: 1].
    #[arg(long, value_name = "N|P%", value_parser = parse_node_count)]
    pub batch_size: Option<NodeCount>,
    /// Group the nodes into waves by this label's value (`zone`): waves go one after another,
    /// in the order of the values, each wave upgraded and healthy before the next starts.
    #[arg(long, value_name = "LABEL", value_parser = parse_label_key)]
    pub wave_by: Option<String>,
    /// Only the nodes with all these labels (with --nodes: every named node must match).
    #[arg(long, value_name = "K=V,...", value_parser = parse_selector)]
    pub selector: Option<Selector>,
    /// At most this many nodes unhealthy or mid-upgrade at once, across waves, counting the
    /// nodes already unhealthy when the rollout starts: a number, or a percentage of the
    /// rollout's nodes (rounded down, at least 1).
    #[arg(long, value_name = "N|P%", value_parser = parse_node_count)]
    pub max_unavailable: Option<NodeCount>,
    /// After each wave but the last, wait for `orchestrator promote` before the next one
    /// (with --exit-on-pause: exit 4 there).
    #[arg(long, requires = "wave_by")]
    pub promote_each_wave: bool,
    /// Upgrade the first N nodes, then wait for `orchestrator promote` (0: no canary) [default: 0].
    #[arg(long, value_name = "N")]
    pub canary: Option<u32>,
    /// Leave the new release current but not permanent.
    #[arg(long)]
    pub no_permanent: bool,
    /// How long each node must stay healthy on the new version [default: 10s].
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub min_healthy_time: Option<Duration>,
    /// How long a node may take to become healthy [default: 5m].
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub healthy_deadline: Option<Duration>,
    /// What a failed node does to the rollout: rollback or pause [default: rollback].
    #[arg(long, value_name = "WHAT")]
    pub on_failure: Option<String>,
    /// How long preflight may take per node before it counts as unreachable [default: 5s].
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub preflight_timeout: Option<Duration>,
    /// Consecutive failed health probes that fail a node's health gate at once, before its
    /// deadline (0: only the deadline decides; an unreachable agent never counts) [default: 3].
    #[arg(long, value_name = "N")]
    pub failure_threshold: Option<u32>,
    /// After the rollout succeeds, uninstall on every node it upgraded the releases beyond the
    /// newest N (never the current or permanent one, nor the one a rollback would return to),
    /// recorded in its events; a failure to prune is reported, not a failure of the rollout.
    /// 0: keep every release [default: 3].
    #[arg(long, value_name = "N")]
    pub keep_releases: Option<u32>,
    /// Once every node is upgraded and healthy, keep probing all of them for DUR before making
    /// the release permanent; any unhealthy answer in that window fails the rollout (rolled
    /// back, or paused with --on-failure pause) while the release is still only current.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub bake: Option<Duration>,
    /// With --wave-by: once a wave is upgraded and healthy, hold DUR before the next wave, every
    /// node upgraded so far still probed (one unhealthy answer fails the rollout).
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub wave_pause: Option<Duration>,
    /// After the commit, keep probing every upgraded node for DUR; a failure rolls the
    /// committed rollout back (every node downgraded to its previous release).
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub watch_after_commit: Option<Duration>,
    /// The Prometheus server (http://HOST:PORT; https is not supported yet) that the metric
    /// gates (--gate) are evaluated against.
    #[arg(long, value_name = "URL")]
    pub gate_prometheus: Option<String>,
    /// A metric gate (repeatable, at most 16): a PromQL query that every health gate (the bake
    /// included) evaluates about once a second while the node's agent says healthy; `$node`
    /// and `$version` are replaced by the node's id and the version it should run. Passing:
    /// a vector with at least one sample, or a scalar other than 0 (write comparisons as
    /// filters, `... < 0.01`, not with `bool`). Nothing, a scalar 0 or an error is an unhealthy
    /// probe.
    #[arg(long = "gate", value_name = "QUERY")]
    pub gates: Vec<String>,
    /// Take the rollout options from this TOML file (keys are these flags' long names:
    /// `batch-size = 2`, `bake = "10m"`, `permanent = false`, ...); a flag given here
    /// overrides the file's value.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Print the rollout id (with --json: its status) and return at once.
    #[arg(long, conflicts_with = "dry_run")]
    pub detach: bool,
    /// Run preflight for real and print the plan (node order, batches, canary, each node's
    /// from -> to or why it is skipped, any refusal) without starting anything: the package is
    /// checked here and described to the coordinators, not uploaded; agents are only read.
    /// Exit 0 when the rollout would run, 1 when it would be refused.
    #[arg(long)]
    pub dry_run: bool,
    /// Exit 4 when the rollout pauses or waits for `orchestrator promote` (a canary).
    #[arg(long)]
    pub exit_on_pause: bool,
    #[command(flatten)]
    pub cluster: ClusterOpts,
}

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Leader, term and members.
    #[command(
        after_long_help = "Examples:\n  orchestrator cluster status\n  orchestrator cluster status --json"
    )]
    Status(ClusterOptsOnly),
    /// Add a coordinator (learner first, then voter).
    #[command(after_long_help = "Example:\n  orchestrator cluster add 4 10.0.0.14:7000")]
    Add {
        /// The new coordinator's id (unique, 1 or more).
        id: u64,
        /// The address the other coordinators dial it at (HOST:PORT).
        address: String,
        #[command(flatten)]
        cluster: ClusterOpts,
    },
    /// Remove a coordinator.
    #[command(after_long_help = "Example:\n  orchestrator cluster remove 4")]
    Remove {
        /// The coordinator's id.
        id: u64,
        #[command(flatten)]
        cluster: ClusterOpts,
    },
}

/// Only the coordinators' address and TLS.
#[derive(Args, Debug)]
pub struct ClusterOptsOnly {
    #[command(flatten)]
    pub cluster: ClusterOpts,
}
