//! The coordinator's settings: flags ([`CoordinatorConfig`]) and the `--config FILE` format.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use orch_tls::{Security, ServerLimits};
use serde::Deserialize;

use crate::error::ConfigError;
use crate::retention;

#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub id: u64,
    pub listen: SocketAddr,
    /// The address other coordinators and clients dial (defaults to `listen`).
    pub advertise: Option<String>,
    pub data_dir: PathBuf,
    /// The other coordinators: id -> address.
    pub peers: BTreeMap<u64, String>,
    pub bootstrap: bool,
    /// Mutual TLS (the default) or the explicitly requested plain text.
    pub security: Security,
    /// Allow `Security::Insecure` on a non-loopback listen address.
    pub insecure_allow_remote: bool,
    pub limits: ServerLimits,
    pub max_package_bytes: u64,
    /// `signing.pub` files: when any is given, package uploads and rollouts need a valid
    /// signature from one of them.
    pub trusted_keys: Vec<PathBuf>,
    /// Finished rollouts kept in the replicated state (at least 1); older ones move to
    /// `DATA/history.jsonl`. Only the leader's setting counts.
    pub retain_rollouts: usize,
    /// How long an unreferenced package record or blob file is kept after its upload.
    pub gc_grace: Duration,
    /// `--http-listen`: the dashboard, JSON API and metrics (off when `None`).
    pub http_listen: Option<SocketAddr>,
    /// `--http-public-metrics`: `/metrics` and `/healthz` without a client certificate.
    pub http_public_metrics: bool,
    /// Peer relay (on unless `--no-peer-relay`): nodes staging a package fetch its chunks from
    /// nodes that already hold it. Off where agents cannot reach each other.
    pub peer_relay: bool,
}

impl CoordinatorConfig {
    pub fn new(id: u64, listen: SocketAddr, data_dir: PathBuf, security: Security) -> Self {
        CoordinatorConfig {
            id,
            listen,
            advertise: None,
            data_dir,
            peers: BTreeMap::new(),
            bootstrap: false,
            security,
            insecure_allow_remote: false,
            limits: ServerLimits::default(),
            max_package_bytes: 4 << 30,
            trusted_keys: Vec::new(),
            retain_rollouts: retention::DEFAULT_RETAIN_ROLLOUTS,
            gc_grace: retention::DEFAULT_GC_GRACE,
            http_listen: None,
            http_public_metrics: false,
            peer_relay: true,
        }
    }

    pub fn address(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| self.listen.to_string())
    }
}

/// The `--config FILE` format: the same keys as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct CoordinatorFileConfig {
    pub id: Option<u64>,
    pub listen: Option<String>,
    pub advertise: Option<String>,
    pub data_dir: Option<PathBuf>,
    /// `ID=ADDR` entries.
    #[serde(default)]
    pub peer: Vec<String>,
    pub bootstrap: Option<bool>,
    /// A party folder holding ca.pem, cert.pem and key.pem (`orchestrator certs init`).
    pub tls_dir: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub insecure: Option<bool>,
    /// `trusted-key = ["/etc/orchestrator/signing.pub"]`
    #[serde(default)]
    pub trusted_key: Vec<PathBuf>,
    pub insecure_allow_remote: Option<bool>,
    /// Finished rollouts kept in the replicated state (`--retain-rollouts`).
    pub retain_rollouts: Option<usize>,
    pub http_listen: Option<String>,
    pub http_public_metrics: Option<bool>,
    /// `peer-relay = false` is `--no-peer-relay`.
    pub peer_relay: Option<bool>,
}

impl CoordinatorFileConfig {
    pub fn parse(text: &str) -> std::result::Result<Self, ConfigError> {
        toml::from_str(text).map_err(ConfigError::File)
    }
}

/// Parses `ID=ADDR`.
pub fn parse_peer(s: &str) -> std::result::Result<(u64, String), ConfigError> {
    let (id, addr) = s
        .split_once('=')
        .ok_or_else(|| ConfigError::PeerSyntax(s.to_string()))?;
    let id = id.parse().map_err(|_| ConfigError::PeerId(s.to_string()))?;
    if addr.is_empty() {
        return Err(ConfigError::PeerAddress(s.to_string()));
    }
    Ok((id, addr.to_string()))
}
