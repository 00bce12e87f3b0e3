//! The grammar of the daemons (`agent`, `coordinator`), the demo, certificates, and the TLS
//! options every networked command shares.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use orch_types::Version;

use super::{parse_duration, parse_retain};

pub const DEMO_EXAMPLES: &str = "Examples:
  orchestrator demo
  orchestrator demo --nodes 5 --no-failure
  orchestrator demo --keep --dir /tmp/demo";

pub const AGENT_EXAMPLES: &str = "Examples:
  orchestrator agent --node-id n1 --root-dir /opt/emqx --listen 0.0.0.0:7100 \\
      --coordinator 10.0.0.11:7000 --health-url http://127.0.0.1:18083/status \\
      --tls-dir /etc/orchestrator/agent-n1
  orchestrator agent --config /etc/orchestrator/agent.toml --log-format json

Logs go to stderr at info (--log-level, RUST_LOG).";

pub const COORDINATOR_EXAMPLES: &str = "Examples:
  orchestrator coordinator --id 1 --listen 0.0.0.0:7000 --data-dir /var/lib/orchestrator \\
      --peer 2=10.0.0.12:7000 --peer 3=10.0.0.13:7000 --bootstrap \\
      --tls-dir /etc/orchestrator/coordinator-1
  orchestrator coordinator --config /etc/orchestrator/coordinator.toml --log-level debug

Logs go to stderr at info (--log-level, RUST_LOG); openraft's own at warn unless named.";

/// How this command secures its gRPC channels. Mutual TLS unless `--insecure`.
#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// A party folder holding ca.pem, cert.pem and key.pem (from `orchestrator certs init`)
    /// [default: client commands $ORCHESTRATOR_TLS_DIR, else ~/.config/orchestrator/; daemons
    /// none].
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
    #[command(
        after_long_help = "Example:\n  orchestrator certs init certs --coordinators 3 --agents n1,n2,n3 --operators alice --san 10.0.0.11"
    )]
    Init {
        /// The directory to create (it must not hold a CA yet).
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
    #[command(
        after_long_help = "Examples:\n  orchestrator certs issue certs --role agent --name n4 --san 10.0.0.24\n  ORCH_P12_PASSWORD=... orchestrator certs issue certs --role viewer --name alice --p12"
    )]
    Issue {
        /// The directory made by `certs init` (holding ca/).
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
        /// Validity of the certificate, in days.
        #[arg(long, value_name = "DAYS", default_value_t = orch_tls::DEFAULT_CERT_DAYS)]
        days: u32,
        /// Also write <role>-<name>.p12 in the new folder: certificate, key and CA as one
        /// PKCS#12 bundle a browser imports (for the dashboard under mutual TLS).
        #[arg(long)]
        p12: bool,
        /// The bundle's password (needed with --p12; prefer the environment variable, which
        /// other users cannot see in the process list).
        #[arg(
            long,
            value_name = "PASSWORD",
            env = "ORCH_P12_PASSWORD",
            hide_env_values = true
        )]
        p12_password: Option<String>,
    },
}

/// What both daemons take about serving: TLS, plain text's limits, trusted signing keys.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// With --insecure, serve plain text on a non-loopback address too.
    #[arg(long)]
    pub insecure_allow_remote: bool,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Only accept packages signed by this public key (signing.pub; repeatable)
    /// [default: any package].
    #[arg(long = "trusted-key", value_name = "PUB")]
    pub trusted_keys: Vec<PathBuf>,
    /// Serve HTTP(S) on this address too (HOST:PORT): the dashboard and JSON API on
    /// coordinators, /metrics and /healthz on both daemons [default: off]. Under mutual TLS it
    /// is HTTPS with this daemon's certificate, and clients need a viewer certificate or above.
    #[arg(long, value_name = "ADDR")]
    pub http_listen: Option<String>,
    /// Serve /metrics and /healthz to clients without a certificate (for a Prometheus that has
    /// none); everything else still needs one.
    #[arg(long)]
    pub http_public_metrics: bool,
}

#[derive(Args, Debug)]
pub struct CoordinatorArgs {
    /// TOML file with the same keys as the flags (id, listen, data-dir, peer, ...); flags win.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// This coordinator's id (1 or more, unique in the cluster).
    #[arg(long, value_name = "N")]
    pub id: Option<u64>,
    /// Address to serve the control API and Raft on (HOST:PORT).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Address other coordinators and clients dial [default: --listen].
    #[arg(long, value_name = "ADDR")]
    pub advertise: Option<String>,
    /// Where the Raft log, state and packages are kept.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Another coordinator, ID=HOST:PORT (repeatable).
    #[arg(long = "peer", value_name = "ID=ADDR")]
    pub peers: Vec<String>,
    /// Initialize the cluster (once, on one coordinator).
    #[arg(long)]
    pub bootstrap: bool,
    #[command(flatten)]
    pub serve: ServeArgs,
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
    /// Push every package to every node from the leader, instead of letting nodes that are
    /// staging fetch its chunks from nodes that already hold it (peer relay, the default).
    /// For networks where agents cannot reach each other's gRPC port.
    #[arg(long)]
    pub no_peer_relay: bool,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Keep the demo's files in this directory [default: a new one under the temporary
    /// directory].
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Number of nodes (agents with a demo service each), 1 to 20.
    #[arg(long, default_value_t = 3)]
    pub nodes: u32,
    /// Number of coordinators (1, 3 or 5).
    #[arg(long, default_value_t = 3)]
    pub coordinators: u32,
    /// Keep the cluster running after the demo rollouts (Ctrl-C stops it).
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
    #[command(after_long_help = "Example:\n  orchestrator demo package 4.2.3 --out /tmp/packages")]
    Package {
        /// The version to build (x.y.z).
        version: Version,
        /// Where to write the package.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// A release whose service starts but fails its health check.
        #[arg(long)]
        broken: bool,
        /// A release whose `/` answers 500 for this share of requests (0-100, every 10th for
        /// 10) while its health check passes: only its metrics (`/metrics`) show it.
        #[arg(long, value_name = "PERCENT", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=100))]
        error_percent: u32,
    },
}

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// TOML file with the same keys as the flags (node-id, root-dir, listen, ...); flags win.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// This node's id (what rollouts and certificates name it).
    #[arg(long, value_name = "ID")]
    pub node_id: Option<String>,
    /// The node's root directory (releases live in DIR/releases) [default: $ORCH_ROOT_DIR].
    #[arg(long, env = "ORCH_ROOT_DIR", value_name = "DIR")]
    pub root_dir: Option<PathBuf>,
    /// Address to serve gRPC on (HOST:PORT).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Address coordinators should dial [default: --listen].
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
    /// How long one health probe may take [default: 2s].
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub health_timeout: Option<Duration>,
    /// Command that switches the service (overrides releases' hooks/activate).
    #[arg(long, value_name = "CMD")]
    pub activate_cmd: Option<String>,
    /// Drain hook run before every switch, with the activation's arguments and environment
    /// (overrides releases' hooks/pre-switch); failing stops the switch before it starts.
    #[arg(long, value_name = "CMD")]
    pub pre_step_cmd: Option<String>,
    /// Hook run once the node passed its health gate after a switch (overrides releases'
    /// hooks/post-switch): puts the node back in service.
    #[arg(long, value_name = "CMD")]
    pub post_step_cmd: Option<String>,
    /// How long activation may take before it is killed and the step fails [default: 60s].
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub activate_timeout: Option<Duration>,
    /// native (the built-in store) or emqx (drive an EMQX 4.x `emqx` script) [default: native].
    #[arg(long, value_name = "DRIVER")]
    pub driver: Option<String>,
    /// The `emqx` script for --driver emqx.
    #[arg(long, value_name = "PATH")]
    pub emqx_bin: Option<PathBuf>,
    #[command(flatten)]
    pub serve: ServeArgs,
}
