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
}

#[derive(Args, Debug)]
pub struct NodeArgs {
    /// The node's root directory (releases live in DIR/releases).
    #[arg(long, global = true, env = "ORCH_ROOT_DIR", value_name = "DIR")]
    pub root_dir: Option<PathBuf>,
    /// Command that switches the running service (overrides the release's hooks/activate);
    /// shell-split, called with FROM and TO versions appended.
    #[arg(long, global = true, value_name = "CMD")]
    pub activate_cmd: Option<String>,
    /// How long activation may take before it is killed and the step fails.
    #[arg(long, global = true, value_name = "DUR", default_value = "60s", value_parser = parse_duration)]
    pub activate_timeout: Duration,
    /// How long to wait for another process that holds the store lock.
    #[arg(long, global = true, value_name = "DUR", default_value = "10s", value_parser = parse_duration)]
    pub lock_timeout: Duration,
    /// Refuse packages that expand to more than this many bytes.
    #[arg(long, global = true, value_name = "BYTES", default_value_t = 4 << 30)]
    pub max_unpacked_bytes: u64,
    /// Refuse packages with more entries than this.
    #[arg(long, global = true, value_name = "N", default_value_t = 100_000)]
    pub max_entries: u64,
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
    Permanent { version: Version },
    /// Switch back to an old (or the permanent) release and make it permanent.
    Downgrade { version: Version },
    /// Delete an old or unpacked release.
    Uninstall { version: Version },
    /// Print the root directory.
    RootDir,
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
    /// Check a package: digest, structure, limits and manifest.
    Verify {
        file: PathBuf,
        /// Expected SHA-256 (overrides the .sha256 file).
        #[arg(long, value_name = "HEX")]
        sha256: Option<String>,
    },
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Keep the demo's files in this directory instead of a temporary one.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
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
