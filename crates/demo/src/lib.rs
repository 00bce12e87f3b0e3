//! The demonstration cluster behind `orchestrator demo`: everything on this machine, on loopback.
//!
//! # Responsibility
//!
//! [`DemoCluster::start`] lays out a demo directory (certificates unless insecure, demo-service
//! packages, one release store per node with 4.2.0 installed, which starts its service) and
//! starts coordinators and agents as child processes of a given `orchestrator` binary. Every
//! process it started is stopped by [`DemoCluster::stop`] or when the value drops, also during a
//! panic. [`DemoCluster::run`] then waits for a leader and every agent, keeps a client load on
//! every service, rolls 4.2.1 out, and (unless disabled) rolls a broken 4.2.2 out that fails its
//! health gate and is rolled back; a shutdown future given by the caller cuts it short.
//!
//! This crate never prints: it tells its caller what happens through [`Report`]s, and the CLI
//! chooses the words. [`build_package`] builds a demo-service package (`orchestrator demo
//! package`).

mod cluster;
mod packages;
mod scenario;

use std::path::{Path, PathBuf};
use std::time::Duration;

use orch_client::control as pb;
use orch_types::Version;

pub use cluster::DemoCluster;
pub use orch_demo_service::layout::ReleaseFaults;
pub use packages::{build_package, build_package_with, service_binary};
pub use scenario::{DemoOutcome, RolloutSummary};

/// The version every demo node starts on.
pub const V0: Version = Version::new(4, 2, 0);
/// The version the demo rolls out.
pub const V1: Version = Version::new(4, 2, 1);
/// The broken version the demo rolls out after [`V1`] (its health check fails; rolled back).
pub const V_BROKEN: Version = Version::new(4, 2, 2);

/// What to run.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// The demo's files: certificates, packages, node roots, daemon data and logs.
    pub dir: PathBuf,
    /// Nodes (an agent with a demo service each), 1 to 20.
    pub nodes: u32,
    /// Coordinators: 1, 3 or 5.
    pub coordinators: u32,
    /// Plain-text gRPC instead of mutual TLS.
    pub insecure: bool,
    /// After the good rollout, roll out a broken release that is rolled back.
    pub failure: bool,
    /// The `orchestrator` binary started as coordinators and agents (and as the demo service,
    /// through a wrapper, when no `demo-service` binary is found).
    pub exe: PathBuf,
    /// How long each node must stay healthy on its new version.
    pub min_healthy_time: Duration,
    /// How long to wait for a leader and every agent's registration.
    pub form_timeout: Duration,
}

impl DemoConfig {
    /// The defaults of `orchestrator demo`: 3 coordinators, 3 nodes, mutual TLS, with the broken
    /// rollout.
    pub fn new(dir: PathBuf, exe: PathBuf) -> DemoConfig {
        DemoConfig {
            dir,
            nodes: 3,
            coordinators: 3,
            insecure: false,
            failure: true,
            exe,
            min_healthy_time: Duration::from_secs(2),
            form_timeout: Duration::from_secs(30),
        }
    }

    /// Refuses sizes the demo does not support.
    pub fn check(&self) -> Result<(), DemoError> {
        if ![1, 3, 5].contains(&self.coordinators) {
            return Err(DemoError::Coordinators(self.coordinators));
        }
        if self.nodes == 0 || self.nodes > 20 {
            return Err(DemoError::Nodes(self.nodes));
        }
        Ok(())
    }
}

/// What happens, as it happens, for the caller to show.
#[derive(Debug)]
pub enum Report<'a> {
    /// Mutual TLS certificates are ready in `dir` (one folder per party).
    Certificates { dir: &'a Path },
    /// The demo-service packages were built into `dir`.
    Packages {
        dir: &'a Path,
        versions: &'a [Version],
    },
    /// Every node runs the demo service on `version`.
    NodesInstalled { nodes: u32, version: Version },
    /// The daemons were started; their logs are in `logs`.
    DaemonsStarted {
        coordinators: u32,
        nodes: u32,
        logs: &'a Path,
    },
    /// A leader is elected and every agent registered.
    Ready { leader: u64, term: u64, nodes: u32 },
    /// A rollout is about to start: the command an operator would type.
    RolloutStarting {
        version: Version,
        package: &'a Path,
        min_healthy_time: Duration,
        broken: bool,
    },
    /// The rollout `id` was accepted.
    RolloutStarted { id: &'a str },
    /// One audit event; `step` is how long since this node's previous event (or the rollout's
    /// start): what its step took.
    Event {
        event: &'a pb::AuditEvent,
        step: Option<Duration>,
    },
    /// The rollout ended; `took` is from its start to its end.
    RolloutEnded {
        status: &'a pb::RolloutStatus,
        took: Duration,
    },
    /// Every node's releases and health after the rollouts.
    Nodes { nodes: &'a [pb::NodeEntry] },
    /// The client load kept on every service during the rollouts.
    Load { served: u64, failures: u64 },
}

/// Why the demo failed. Messages name what failed and where to look; causes are kept as
/// sources (printed once, by whoever prints the chain).
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("--coordinators must be 1, 3 or 5 (got {0})")]
    Coordinators(u32),
    #[error("--nodes must be between 1 and 20 (got {0})")]
    Nodes(u32),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}")]
    Release {
        context: String,
        // Boxed: the store's error is large, and every demo function returns this type.
        #[source]
        source: Box<orch_release::Error>,
    },
    #[error("{context}")]
    DemoService {
        context: String,
        #[source]
        source: Box<orch_demo_service::Error>,
    },
    #[error("demo certificates in {}", dir.display())]
    Tls {
        dir: PathBuf,
        #[source]
        source: orch_tls::Error,
    },
    #[error("{context}")]
    Client {
        context: String,
        #[source]
        source: orch_client::ClientError,
    },
    #[error("only {registered} of {nodes} agents registered within {waited:?}; see the logs in {}", logs.display())]
    NotFormed {
        registered: usize,
        nodes: u32,
        waited: Duration,
        logs: PathBuf,
    },
    #[error("the demo rollout {id} of {version} ended {phase}{}; see the logs in {}", detail(error), logs.display())]
    RolloutOutcome {
        id: String,
        version: String,
        phase: String,
        error: String,
        logs: PathBuf,
    },
    #[error("interrupted: the demo cluster was stopped")]
    Interrupted,
}

fn detail(error: &str) -> String {
    if error.is_empty() {
        String::new()
    } else {
        format!(" ({error})")
    }
}

impl DemoError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> DemoError {
        let context = context.into();
        move |source| DemoError::Io { context, source }
    }

    pub(crate) fn release(
        context: impl Into<String>,
    ) -> impl FnOnce(orch_release::Error) -> DemoError {
        let context = context.into();
        move |source| DemoError::Release {
            context,
            source: Box::new(source),
        }
    }

    pub(crate) fn client(
        context: impl Into<String>,
    ) -> impl FnOnce(orch_client::ClientError) -> DemoError {
        let context = context.into();
        move |source| DemoError::Client { context, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_checked() {
        let mut c = DemoConfig::new("/tmp/x".into(), "/bin/true".into());
        assert!(c.check().is_ok());
        c.coordinators = 2;
        assert!(matches!(c.check(), Err(DemoError::Coordinators(2))));
        c.coordinators = 1;
        c.nodes = 0;
        assert!(matches!(c.check(), Err(DemoError::Nodes(0))));
    }
}
