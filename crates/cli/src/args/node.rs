//! The grammar of `node ...` (one node's release store, locally or through its agent) and
//! `package ...`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use orch_types::Version;

use super::{TlsArgs, parse_duration};

pub const EXAMPLES: &str = "Examples (the EMQX 4.x hot-upgrade guide's steps):
  orchestrator node versions
  cp emqx-4.2.1.zip \"$(orchestrator node root_dir)/releases\"
  orchestrator node upgrade 4.2.1
  orchestrator node downgrade 4.2.0
  orchestrator node uninstall 4.2.1
  orchestrator node --agent 10.0.0.21:7100 --node-id n1 versions";

#[derive(Args, Debug)]
pub struct NodeArgs {
    /// Act through this node's agent (HOST:PORT) instead of a local root directory (wins over
    /// --root-dir).
    #[arg(long, global = true, value_name = "ADDR")]
    pub agent: Option<String>,
    /// The node's root directory (releases live in DIR/releases) [default: $ORCH_ROOT_DIR].
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
    /// List installed releases, newest first (--json: `[{"version":..,"state":..}]`).
    #[command(
        after_long_help = "Examples:\n  orchestrator node versions\n  orchestrator node versions --json"
    )]
    Versions,
    /// Unpack a package (from DIR/releases/<name>-VERSION.zip or --package).
    #[command(
        after_long_help = "Examples:\n  orchestrator node unpack 4.2.1\n  orchestrator node unpack --package /tmp/emqx-4.2.1.zip"
    )]
    Unpack(PackageTarget),
    /// Hot-switch to a release and make it permanent (same as upgrade).
    #[command(after_long_help = "Example:\n  orchestrator node install 4.2.1")]
    Install(InstallArgs),
    /// Unpack if needed, hot-switch, and make permanent (unless --no-permanent).
    #[command(
        after_long_help = "Examples:\n  orchestrator node upgrade 4.2.1\n  orchestrator node upgrade 4.2.1 --no-permanent"
    )]
    Upgrade(InstallArgs),
    /// Make the current release permanent.
    #[command(after_long_help = "Example:\n  orchestrator node permanent 4.2.1")]
    Permanent {
        /// The current release's version.
        version: Version,
        #[command(flatten)]
        force: ForceArg,
    },
    /// Switch back to an old (or the permanent) release and make it permanent.
    #[command(after_long_help = "Example:\n  orchestrator node downgrade 4.2.0")]
    Downgrade {
        /// The old release to switch to.
        version: Version,
        #[command(flatten)]
        force: ForceArg,
    },
    /// Delete an old or unpacked release.
    #[command(after_long_help = "Example:\n  orchestrator node uninstall 4.2.0")]
    Uninstall {
        /// The release to delete.
        version: Version,
        #[command(flatten)]
        force: ForceArg,
    },
    /// Uninstall the releases beyond the newest N (never the current or the permanent one, which
    /// count among the N), printing what was removed.
    #[command(
        after_long_help = "Examples:\n  orchestrator node prune --keep 3\n  orchestrator node --agent 10.0.0.21:7100 --node-id n1 prune --keep 2"
    )]
    Prune {
        /// How many releases to keep, newest first (at least 1: the current and permanent
        /// releases always stay, and the previous one is what a downgrade returns to).
        #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
        keep: u32,
        #[command(flatten)]
        force: ForceArg,
    },
    /// Print the root directory, unquoted (also spelled root_dir, as in EMQX's guide).
    #[command(
        alias = "root_dir",
        after_long_help = "Example:\n  cp emqx-4.2.1.zip \"$(orchestrator node root_dir)/releases\""
    )]
    RootDir,
    /// Run the node's health check (through its agent) against an expected version.
    #[command(
        after_long_help = "Example:\n  orchestrator node --agent 10.0.0.21:7100 --node-id n1 health --expect 4.2.1"
    )]
    Health {
        /// The version the service must report [default: any].
        #[arg(long, value_name = "VERSION")]
        expect: Option<Version>,
    },
    /// Move the node (through its agent) to another coordinator cluster: its agent then accepts
    /// that cluster's fenced steps and refuses the old one's. Without --cluster-id the node is
    /// unbound, and the next coordinator cluster to send it a step binds it. Operators only.
    #[command(
        after_long_help = "Example:\n  orchestrator node --agent 10.0.0.21:7100 --node-id n1 rebind --cluster-id 6f1c..."
    )]
    Rebind {
        /// The id of the cluster the node now belongs to (`orchestrator cluster status` shows it)
        /// [default: none: unbind].
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
            | NodeCmd::Uninstall { force, .. }
            | NodeCmd::Prune { force, .. } => force.force,
            NodeCmd::Versions | NodeCmd::RootDir | NodeCmd::Health { .. } => false,
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
    /// Expected SHA-256 of the package [default: the FILE.sha256 beside it, if any].
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
    #[command(
        after_long_help = "Example:\n  orchestrator package build ./emqx --name emqx --version 4.2.1 --out dist"
    )]
    Build {
        /// The release directory to package (its files become the release's).
        dir: PathBuf,
        /// The package name (the file is NAME-VERSION.zip).
        #[arg(long)]
        name: String,
        /// The release's version (x.y.z).
        #[arg(long)]
        version: Version,
        /// Where to write the zip and its .sha256.
        #[arg(long, value_name = "OUTDIR")]
        out: PathBuf,
    },
    /// Check a package: digest, structure, limits and manifest (and, with --trusted-key, its
    /// FILE.sig).
    #[command(
        after_long_help = "Examples:\n  orchestrator package verify dist/emqx-4.2.1.zip\n  orchestrator package verify dist/emqx-4.2.1.zip --trusted-key keys/signing.pub --json"
    )]
    Verify {
        /// The package file (NAME-x.y.z.zip).
        file: PathBuf,
        /// Expected SHA-256 [default: the FILE.sha256 beside it, if any].
        #[arg(long, value_name = "HEX")]
        sha256: Option<String>,
        /// Require a valid FILE.sig from this public key (repeatable: any one will do).
        #[arg(long = "trusted-key", value_name = "PUB")]
        trusted_keys: Vec<PathBuf>,
    },
    /// Create an Ed25519 package signing key pair: DIR/signing.key (0600) and DIR/signing.pub.
    #[command(after_long_help = "Example:\n  orchestrator package keygen --out keys")]
    Keygen {
        /// The directory to create the key pair in.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Sign a package: writes the detached signature FILE.sig beside it.
    #[command(
        after_long_help = "Example:\n  orchestrator package sign dist/emqx-4.2.1.zip --key keys/signing.key"
    )]
    Sign {
        /// The package file to sign.
        file: PathBuf,
        /// The private key (signing.key from `package keygen`).
        #[arg(long, value_name = "KEY")]
        key: PathBuf,
    },
}
