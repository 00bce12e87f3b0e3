//! Command-line grammar (clap derive). Kept apart from the handlers so `--help` reads as a
//! reference of the whole interface.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use orch_types::Version;

#[derive(Parser, Debug)]
#[command(
    name = "orchestrator",
    version,
    about = "Cluster-wide hot upgrades: node release stores, agents, coordinators and rollouts"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Act on one node's release store (EMQX-style: versions, unpack, install, ...).
    Node(NodeArgs),
    /// Build and verify release packages.
    #[command(subcommand)]
    Package(PackageCmd),
    /// Run a self-contained demonstration on this machine.
    Demo(DemoArgs),
    /// Run the node agent daemon (gRPC) over this node's release store.
    Agent(AgentArgs),
    /// Run a coordinator daemon (Raft member, control API, rollout driver on the leader).
    Coordinator(CoordinatorArgs),
    /// Roll VERSION out across the cluster, node by node, health-gated; waits for the end.
    Rollout(RolloutArgs),
    /// Show a rollout (the running one, else the latest).
    Status(StatusArgs),
    /// List rollouts (the newest ones kept by the coordinators; --all: also archived ones).
    Rollouts(RolloutsArgs),
    /// Pause a rollout after its in-flight steps.
    Pause(RolloutRefArgs),
    /// Resume a paused rollout (retrying a failed step).
    Resume(RolloutRefArgs),
    /// Stop a rollout now, leaving nodes as they are.
    Abort(RolloutRefArgs),
    /// Downgrade every node the rollout touched, in reverse order.
    Rollback(RolloutRefArgs),
    /// Continue a canary rollout past its canary nodes.
    Promote(RolloutRefArgs),
    /// List registered nodes, their releases and health (or `nodes forget ID`).
    Nodes(NodesArgs),
    /// Coordinator membership.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Create the cluster's certificate authority and party certificates (mutual TLS).
    #[command(subcommand)]
    Certs(CertsCmd),
}

/// How this command secures its gRPC channels. Mutual TLS unless `--insecure`.
#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// A party folder holding ca.pem, cert.pem and key.pem (from `orchestrator certs init`).
    /// Client commands default to $ORCHESTRATOR_TLS_DIR, else ~/.config/orchestrator/;
    /// daemons have no default.
    #[arg(long, global = true, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// The CA bundle (PEM) to trust, instead of the folder's ca.pem.
    #[arg(long, global = true, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// This party's certificate (PEM), instead of the folder's cert.pem.
    #[arg(long, global = true, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// This party's private key (PEM, mode 0600), instead of the folder's key.pem.
    #[arg(long, global = true, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Plain-text gRPC without certificates: nobody is authenticated. Daemons print a warning
    /// and refuse it on a non-loopback address unless --insecure-allow-remote.
    #[arg(long, global = true)]
    pub insecure: bool,
}

#[derive(Subcommand, Debug)]
pub enum CertsCmd {
    /// Create DIR/ca (the CA; keep ca-key.pem offline) and one folder per party
    /// (DIR/coordinator-1, DIR/agent-n1, DIR/operator-alice, ...).
    Init {
        dir: PathBuf,
        /// Coordinators 1..=N.
        #[arg(long, value_name = "N", default_value_t = 0)]
        coordinators: u32,
        /// Agents, by node id.
        #[arg(long, value_name = "ID,ID,...", value_delimiter = ',')]
        agents: Vec<String>,
        /// Operators (may run rollouts), by name.
        #[arg(long, value_name = "NAME,...", value_delimiter = ',')]
        operators: Vec<String>,
        /// Viewers (read-only control API), by name.
        #[arg(long, value_name = "NAME,...", value_delimiter = ',')]
        viewers: Vec<String>,
        /// An extra DNS name or IP address for every coordinator and agent certificate
        /// (repeatable): the names clients dial besides localhost.
        #[arg(long = "san", value_name = "NAME")]
        sans: Vec<String>,
        /// Validity of the party certificates, in days.
        #[arg(long, value_name = "DAYS", default_value_t = orch_tls::DEFAULT_CERT_DAYS)]
        days: u32,
    },
    /// Issue one more party certificate, signed by DIR/ca, into DIR/<role>-<name>/ (or --out).
    Issue {
        dir: PathBuf,
        /// coordinator, agent, operator or viewer.
        #[arg(long, value_name = "ROLE")]
        role: String,
        /// Coordinator id, node id, or person's name.
        #[arg(long, value_name = "NAME")]
        name: String,
        /// An extra DNS name or IP address (coordinator and agent certificates; repeatable).
        #[arg(long = "san", value_name = "NAME")]
        sans: Vec<String>,
        /// The folder to create instead of DIR/<role>-<name> (for rotation). Must not exist.
        #[arg(long, value_name = "FOLDER")]
        out: Option<PathBuf>,
        #[arg(long, value_name = "DAYS", default_value_t = orch_tls::DEFAULT_CERT_DAYS)]
        days: u32,
    },
}

/// How to reach the coordinators.
#[derive(Args, Debug, Clone)]
pub struct ClusterOpts {
    /// A coordinator's address (repeatable); any member will do.
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
    #[command(flatten)]
    pub tls: TlsArgs,
}

#[derive(Args, Debug)]
pub struct JsonOpts {
    #[command(flatten)]
    pub cluster: ClusterOpts,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct NodesArgs {
    #[command(subcommand)]
    pub cmd: Option<NodesCmd>,
    #[command(flatten)]
    pub list: JsonOpts,
}

#[derive(Subcommand, Debug)]
pub enum NodesCmd {
    /// Remove a node from the registry (a decommissioned machine). Refused while a rollout
    /// holds it; an agent that registers again reappears.
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
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct RolloutRefArgs {
    /// The rollout (default: the running one).
    pub id: Option<String>,
    #[command(flatten)]
    pub cluster: ClusterOpts,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    pub id: Option<String>,
    /// Keep showing changes until the rollout ends.
    #[arg(long)]
    pub watch: bool,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub cluster: ClusterOpts,
}

#[derive(Args, Debug)]
pub struct RolloutArgs {
    pub version: Version,
    /// Upload this package and push it to the nodes (else they must already have it).
    #[arg(long, value_name = "FILE")]
    pub package: Option<PathBuf>,
    /// Target nodes in order (default: every registered node, by id).
    #[arg(long, value_name = "ID,ID,...", value_delimiter = ',')]
    pub nodes: Vec<String>,
    /// Nodes upgraded at a time (at least 1) [default: 1].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: Option<u32>,
    /// Upgrade the first N nodes, then wait for `orchestrator promote`.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub canary: u32,
    /// Leave the new release current but not permanent.
    #[arg(long)]
    pub no_permanent: bool,
    /// How long each node must stay healthy on the new version (default 10s).
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub min_healthy_time: Option<Duration>,
    /// How long a node may take to become healthy (default 5m).
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub healthy_deadline: Option<Duration>,
    /// rollback (default) or pause.
    #[arg(long, value_name = "WHAT", default_value = "rollback")]
    pub on_failure: String,
    /// How long preflight may take per node before it counts as unreachable [default: 5s].
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub preflight_timeout: Option<Duration>,
    /// Consecutive failed health probes that fail a node's health gate at once, before its
    /// deadline (0: only the deadline decides; an unreachable agent never counts) [default: 3].
    #[arg(long, value_name = "N")]
    pub failure_threshold: Option<u32>,
    /// Print the rollout id and return at once.
    #[arg(long)]
    pub detach: bool,
    /// Print the final status as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub cluster: ClusterOpts,
}

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Leader, term and members.
    Status(JsonOpts),
    /// Add a coordinator (learner first, then voter).
    Add {
        id: u64,
        address: String,
        #[command(flatten)]
        cluster: ClusterOpts,
    },
    /// Remove a coordinator.
    Remove {
        id: u64,
        #[command(flatten)]
        cluster: ClusterOpts,
    },
}

#[derive(Args, Debug)]
pub struct CoordinatorArgs {
    /// TOML file with the same keys as the flags (id, listen, data-dir, peer, ...); flags win.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[arg(long, value_name = "N")]
    pub id: Option<u64>,
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Address other coordinators and clients dial, when it differs from --listen.
    #[arg(long, value_name = "ADDR")]
    pub advertise: Option<String>,
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Another coordinator, ID=HOST:PORT (repeatable).
    #[arg(long = "peer", value_name = "ID=ADDR")]
    pub peers: Vec<String>,
    /// Initialize the cluster (once, on one coordinator).
    #[arg(long)]
    pub bootstrap: bool,
    /// With --insecure, serve plain text on a non-loopback address too.
    #[arg(long)]
    pub insecure_allow_remote: bool,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Only accept packages signed by this public key (signing.pub; repeatable).
    #[arg(long = "trusted-key", value_name = "PUB")]
    pub trusted_keys: Vec<PathBuf>,
    /// Keep the last N finished rollouts in the replicated state [default: 100]; older ones
    /// move to DATA/history.jsonl (still shown by `rollouts --all` and `status ID`), and
    /// packages no kept rollout uses are deleted. Only the leader's setting counts: give every
    /// coordinator the same.
    #[arg(long, value_name = "N", value_parser = parse_retain)]
    pub retain_rollouts: Option<usize>,
    /// How long an unused package is kept after its upload before package GC deletes it
    /// (tests shorten it).
    #[arg(long, value_name = "DUR", value_parser = parse_duration, hide = true)]
    pub gc_grace: Option<Duration>,
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

#[derive(Args, Debug)]
pub struct NodeArgs {
    /// Act through this node's agent (HOST:PORT) instead of a local root directory (wins over --root-dir).
    #[arg(long, global = true, value_name = "ADDR")]
    pub agent: Option<String>,
    /// The node's root directory (releases live in DIR/releases).
    #[arg(long, global = true, env = "ORCH_ROOT_DIR", value_name = "DIR")]
    pub root_dir: Option<PathBuf>,
    /// Command that switches the running service (overrides the release's hooks/activate);
    /// shell-split, called with FROM and TO versions appended.
    #[arg(long, global = true, value_name = "CMD")]
    pub activate_cmd: Option<String>,
    // The four store settings below have no clap default so that `--agent` can tell they were
    // given and refuse them (the agent's own configuration applies there); the local defaults
    // are in node.rs.
    /// How long activation may take before it is killed and the step fails [default: 60s].
    #[arg(long, global = true, value_name = "DUR", value_parser = parse_duration)]
    pub activate_timeout: Option<Duration>,
    /// How long to wait for another process that holds the store lock [default: 10s].
    #[arg(long, global = true, value_name = "DUR", value_parser = parse_duration)]
    pub lock_timeout: Option<Duration>,
    /// Refuse packages that expand to more than this many bytes [default: 4294967296].
    #[arg(long, global = true, value_name = "BYTES")]
    pub max_unpacked_bytes: Option<u64>,
    /// Refuse packages with more entries than this [default: 100000].
    #[arg(long, global = true, value_name = "N")]
    pub max_entries: Option<u64>,
    /// Only unpack or install packages with a valid FILE.sig from this public key (repeatable:
    /// any one will do). Local store only; an agent enforces its own --trusted-key.
    #[arg(long = "trusted-key", global = true, value_name = "PUB")]
    pub trusted_keys: Vec<PathBuf>,
    /// With --agent under mutual TLS: the node id the agent's certificate must name (the
    /// connection then proves it reached that node).
    #[arg(long, global = true, value_name = "ID")]
    pub node_id: Option<String>,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(subcommand)]
    pub cmd: NodeCmd,
}

#[derive(Subcommand, Debug)]
pub enum NodeCmd {
    /// List installed releases, newest first.
    Versions {
        /// Print `[{"version":..,"state":..}]`.
        #[arg(long)]
        json: bool,
    },
    /// Unpack a package (from DIR/releases/<name>-VERSION.zip or --package).
    Unpack(PackageTarget),
    /// Hot-switch to a release and make it permanent (same as upgrade).
    Install(InstallArgs),
    /// Unpack if needed, hot-switch, and make permanent (unless --no-permanent).
    Upgrade(InstallArgs),
    /// Make the current release permanent.
    Permanent {
        version: Version,
        #[command(flatten)]
        force: ForceArg,
    },
    /// Switch back to an old (or the permanent) release and make it permanent.
    Downgrade {
        version: Version,
        #[command(flatten)]
        force: ForceArg,
    },
    /// Delete an old or unpacked release.
    Uninstall {
        version: Version,
        #[command(flatten)]
        force: ForceArg,
    },
    /// Print the root directory.
    RootDir,
    /// Run the node's health check (through its agent) against an expected version.
    Health {
        /// The version the service must report.
        #[arg(long, value_name = "VERSION")]
        expect: Option<Version>,
    },
    /// Move the node (through its agent) to another coordinator cluster: its agent then accepts
    /// that cluster's fenced steps and refuses the old one's. Without --cluster-id the node is
    /// unbound, and the next coordinator cluster to send it a step binds it. Operators only.
    Rebind {
        /// The id of the cluster the node now belongs to (`orchestrator cluster status` shows it).
        #[arg(long, value_name = "ID")]
        cluster_id: Option<String>,
    },
}

impl NodeCmd {
    /// Whether `--force` was given (step commands only).
    pub fn force(&self) -> bool {
        match self {
            NodeCmd::Unpack(t) => t.force.force,
            NodeCmd::Install(a) | NodeCmd::Upgrade(a) => a.target.force.force,
            NodeCmd::Permanent { force, .. }
            | NodeCmd::Downgrade { force, .. }
            | NodeCmd::Uninstall { force, .. } => force.force,
            NodeCmd::Versions { .. } | NodeCmd::RootDir | NodeCmd::Health { .. } => false,
            NodeCmd::Rebind { .. } => false,
        }
    }
}

#[derive(Args, Debug, Clone, Copy, Default)]
pub struct ForceArg {
    /// With --agent: do the step even while a rollout holds the node (the agent refuses an
    /// operator's step then, to keep it from racing the rollout). Audited.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct PackageTarget {
    /// The version to look up in DIR/releases.
    pub version: Option<Version>,
    /// A package file anywhere (its .sha256 beside it is checked when present).
    #[arg(long, value_name = "FILE")]
    pub package: Option<PathBuf>,
    /// Expected SHA-256 of the package (overrides the .sha256 file).
    #[arg(long, value_name = "HEX")]
    pub sha256: Option<String>,
    #[command(flatten)]
    pub force: ForceArg,
}

#[derive(Args, Debug)]
pub struct InstallArgs {
    #[command(flatten)]
    pub target: PackageTarget,
    /// Stop after the hot switch: the release is current, the permanent one stays permanent.
    #[arg(long)]
    pub no_permanent: bool,
}

#[derive(Subcommand, Debug)]
pub enum PackageCmd {
    /// Zip a directory into OUT/<NAME>-<VERSION>.zip plus its .sha256.
    Build {
        dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: Version,
        #[arg(long, value_name = "OUTDIR")]
        out: PathBuf,
    },
    /// Check a package: digest, structure, limits and manifest (and, with --trusted-key, its
    /// FILE.sig).
    Verify {
        file: PathBuf,
        /// Expected SHA-256 (overrides the .sha256 file).
        #[arg(long, value_name = "HEX")]
        sha256: Option<String>,
        /// Require a valid FILE.sig from this public key (repeatable: any one will do).
        #[arg(long = "trusted-key", value_name = "PUB")]
        trusted_keys: Vec<PathBuf>,
    },
    /// Create an Ed25519 package signing key pair: DIR/signing.key (0600) and DIR/signing.pub.
    Keygen {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Sign a package: writes the detached signature FILE.sig beside it.
    Sign {
        file: PathBuf,
        /// The private key (signing.key from `package keygen`).
        #[arg(long, value_name = "KEY")]
        key: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Keep the demo's files in this directory instead of a temporary one.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Number of nodes (agents with a demo service each).
    #[arg(long, default_value_t = 3)]
    pub nodes: u32,
    /// Number of coordinators (1, 3 or 5).
    #[arg(long, default_value_t = 3)]
    pub coordinators: u32,
    /// Keep the cluster running after the demo rollout (Ctrl-C stops it).
    #[arg(long)]
    pub keep: bool,
    /// Run the demo cluster in plain text instead of mutual TLS (certificates are otherwise
    /// generated into the demo directory).
    #[arg(long)]
    pub insecure: bool,
    /// Skip the second, broken rollout (a release that fails its health check and is rolled
    /// back).
    #[arg(long)]
    pub no_failure: bool,
    #[command(subcommand)]
    pub cmd: Option<DemoCmd>,
}

#[derive(Subcommand, Debug)]
pub enum DemoCmd {
    /// Build a package of the hot-swappable demo service.
    Package {
        version: Version,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// A release whose service starts but fails its health check.
        #[arg(long)]
        broken: bool,
    },
}

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// TOML file with the same keys as the flags (node-id, root-dir, listen, ...); flags win.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[arg(long, value_name = "ID")]
    pub node_id: Option<String>,
    #[arg(long, env = "ORCH_ROOT_DIR", value_name = "DIR")]
    pub root_dir: Option<PathBuf>,
    /// Address to serve gRPC on (HOST:PORT).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Address coordinators should dial, when it differs from --listen.
    #[arg(long, value_name = "ADDR")]
    pub advertise: Option<String>,
    /// A coordinator to register with (repeatable).
    #[arg(long = "coordinator", value_name = "ADDR")]
    pub coordinators: Vec<String>,
    /// A label K=V describing this node (repeatable).
    #[arg(long = "label", value_name = "K=V")]
    pub labels: Vec<String>,
    /// Health probe: GET URL; healthy iff 2xx in time and a JSON `version` (if any) matches.
    #[arg(long, value_name = "URL")]
    pub health_url: Option<String>,
    /// Health probe: run `CMD EXPECTED_VERSION`; healthy iff exit 0.
    #[arg(long, value_name = "CMD")]
    pub health_cmd: Option<String>,
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub health_timeout: Option<Duration>,
    /// Command that switches the service (overrides releases' hooks/activate).
    #[arg(long, value_name = "CMD")]
    pub activate_cmd: Option<String>,
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub activate_timeout: Option<Duration>,
    /// native (the built-in store) or emqx (drive an EMQX 4.x `emqx` script).
    #[arg(long, value_name = "DRIVER")]
    pub driver: Option<String>,
    /// The `emqx` script for --driver emqx.
    #[arg(long, value_name = "PATH")]
    pub emqx_bin: Option<PathBuf>,
    /// With --insecure, serve plain text on a non-loopback address too.
    #[arg(long)]
    pub insecure_allow_remote: bool,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Only accept packages signed by this public key (signing.pub; repeatable).
    #[arg(long = "trusted-key", value_name = "PUB")]
    pub trusted_keys: Vec<PathBuf>,
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
}
