//! Rollout specification and progress types: what an operator asked for ([`RolloutSpec`]), where
//! a rollout stands ([`Phase`], [`NodeStep`], [`NodeProgress`]) and its audit trail
//! ([`AuditEvent`]). The state machine that moves a rollout lives in `orch-rollout`; these types
//! are here because the wire conversions, the client and the CLI need them without it.
//!
//! Everything is stored in the Raft state machine and sent as JSON, so every type is serde. Enums
//! use serde's default (externally tagged) representation and snake_case names, which works with
//! self-describing formats (JSON) and with compact ones (bincode-like) alike.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{NodeId, Version};

/// For a fieldless enum whose variants each have a name (the serde name too): `ALL` (in
/// declaration order), `as_str`, `Display`, and `FromStr`, which refuses any other text with
/// `ParseError::$err`.
macro_rules! names {
    ($ty:ident, $err:ident, { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            pub const ALL: [$ty; [$(stringify!($variant)),+].len()] = [$($ty::$variant),+];

            pub fn as_str(&self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $ty {
            type Err = crate::ParseError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $ty::ALL
                    .into_iter()
                    .find(|p| p.as_str() == s)
                    .ok_or_else(|| crate::ParseError::$err(crate::ParseError::shown(s)))
            }
        }
    };
}

/// Nodes upgraded at a time when the operator does not say (`--batch-size`).
pub const DEFAULT_BATCH_SIZE: u32 = 1;
/// Nodes pushed and unpacked at a time during staging (and made permanent at a time during
/// committing). Both steps leave the running service alone, so parallelism is bounded only to
/// spare the network and the coordinator.
pub const DEFAULT_MAX_PARALLEL_STAGING: u32 = 8;
/// How long a node's probe must pass continuously before it counts as healthy.
pub const DEFAULT_MIN_HEALTHY_TIME_MS: u64 = 10_000;
/// How long a node gets, from the start of its health gate, to become healthy.
pub const DEFAULT_HEALTHY_DEADLINE_MS: u64 = 300_000;
/// Consecutive failed probes that fail a health gate at once (Kubernetes' `failureThreshold`
/// default). 0 disables it: only the deadline ends a gate.
pub const DEFAULT_FAILURE_THRESHOLD: u32 = 3;
/// How long preflight may take per node (reading its releases and free disk) before the node
/// counts as unreachable, and the longest an operator may ask for.
pub const DEFAULT_PREFLIGHT_TIMEOUT_MS: u64 = 5_000;
pub const MAX_PREFLIGHT_TIMEOUT_MS: u64 = 600_000;
/// Largest accepted failure threshold. A count this high never fires before any sensible
/// deadline, so a bigger one is almost surely a duration typed as a count (`30000`).
pub const MAX_FAILURE_THRESHOLD: u32 = 10_000;
/// Longest bake (`--bake`): a week. Longer is almost surely a unit mistake, and the gate's
/// deadline (bake plus the healthy deadline) must stay far from overflow.
pub const MAX_BAKE_MS: u64 = 7 * 24 * 3_600_000;
/// Most metric gates (`--gate`) a rollout may have: each is evaluated about once a second per
/// node being gated, so many would load the Prometheus server for little gain.
pub const MAX_METRIC_GATES: usize = 16;
/// Longest metric gate query (bytes): it travels in every probe's URL.
pub const MAX_METRIC_GATE_LEN: usize = 2_048;
/// Longest Prometheus URL (bytes).
pub const MAX_PROMETHEUS_URL_LEN: usize = 512;

/// Why a [`RolloutSpec`] was refused. Each message names the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error(
        "invalid rollout id {0:?}: use 1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"
    )]
    InvalidId(String),
    #[error("a rollout needs at least one node")]
    NoNodes,
    #[error("node {0} is listed more than once")]
    DuplicateNode(NodeId),
    #[error("batch size must be at least 1")]
    ZeroBatchSize,
    #[error("max parallel staging must be at least 1")]
    ZeroParallelStaging,
    #[error("a canary of {canary} nodes is larger than the rollout's {nodes} nodes")]
    CanaryTooLarge { canary: u32, nodes: usize },
    #[error("healthy deadline must be greater than 0 ms")]
    ZeroHealthyDeadline,
    #[error(
        "healthy deadline ({deadline_ms} ms) is shorter than the minimum healthy time ({min_healthy_ms} ms): no node could ever pass its health gate"
    )]
    DeadlineBelowMinHealthy {
        deadline_ms: u64,
        min_healthy_ms: u64,
    },
    #[error("invalid package name {0:?}")]
    InvalidPackageName(String),
    #[error("package {name}-{package} does not match the rollout's target version {target}")]
    PackageVersionMismatch {
        name: String,
        package: Version,
        target: Version,
    },
    #[error("invalid package sha256 {0:?}: expected 64 lowercase hexadecimal characters")]
    InvalidSha256(String),
    #[error(
        "failure threshold {0} is too large (at most {MAX_FAILURE_THRESHOLD} consecutive failed probes; it is a count, not a duration); use 0 to disable it"
    )]
    FailureThresholdTooLarge(u32),
    #[error(
        "preflight timeout {0} ms is out of range: it must be between 1 ms and {MAX_PREFLIGHT_TIMEOUT_MS} ms"
    )]
    PreflightTimeout(u64),
    #[error("bake time {0} ms is too long: at most {MAX_BAKE_MS} ms (a week)")]
    BakeTooLong(u64),
    #[error(
        "the waves do not list the rollout's nodes: every node must be in exactly one non-empty wave, waves in the rollout's node order"
    )]
    WavesMismatch,
    #[error("waves need the label they are grouped by (wave_by)")]
    WavesWithoutLabel,
    #[error("promoting each wave needs waves: add --wave-by LABEL")]
    PromoteWithoutWaves,
    #[error("a wave pause needs waves: add --wave-by LABEL (or drop --wave-pause)")]
    WavePauseWithoutWaves,
    #[error("wave pause {0} ms is too long: at most {MAX_BAKE_MS} ms (a week)")]
    WavePauseTooLong(u64),
    #[error(
        "watching after the commit needs a commit: --no-permanent makes nothing permanent (use --bake to watch before the end instead)"
    )]
    WatchWithoutCommit,
    #[error("watch after commit {0} ms is too long: at most {MAX_BAKE_MS} ms (a week)")]
    WatchTooLong(u64),
    #[error(
        "--gate-prometheus {0:?} is not a usable Prometheus URL: give http://HOST:PORT (optionally with a path prefix; https is not supported yet)"
    )]
    PrometheusUrl(String),
    #[error("metric gates need a Prometheus server to ask: add --gate-prometheus http://HOST:PORT")]
    GatesWithoutPrometheus,
    #[error(
        "--gate-prometheus is given without any --gate 'QUERY': add at least one query, or drop it"
    )]
    PrometheusWithoutGates,
    #[error("{0} metric gates are too many: at most {MAX_METRIC_GATES}")]
    TooManyGates(usize),
    #[error("metric gate {0} is empty: give a PromQL expression")]
    EmptyGate(usize),
    #[error("metric gate {index} is {len} bytes long: at most {MAX_METRIC_GATE_LEN}")]
    GateTooLong { index: usize, len: usize },
    #[error("batch percentage {0}% is out of range: it must be between 1% and 100%")]
    BatchPercent(u32),
    #[error("max unavailable {0} is out of range: use at least 1 node, or 1% to 100%")]
    MaxUnavailable(NodeCount),
    #[error(
        "max unavailable {limit} allows {allowed} node(s) down at once, but {} node(s) are unhealthy already ({}): no node could be upgraded; repair them or raise --max-unavailable",
        unhealthy.len(),
        unhealthy.iter().map(|n| n.as_str()).collect::<Vec<_>>().join(", ")
    )]
    NoRoomUnavailable {
        limit: NodeCount,
        allowed: usize,
        unhealthy: Vec<NodeId>,
    },
}

/// A number of nodes, given as a count or as a percentage of a group (`2`, `25%`): the
/// `--batch-size` and `--max-unavailable` flags. Serialized as `{"count": 2}` or
/// `{"percent": 25}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeCount {
    Count(u32),
    Percent(u32),
}

impl NodeCount {
    /// Valid: a count of at least 1, a percentage from 1 to 100.
    pub fn is_valid(self) -> bool {
        match self {
            NodeCount::Count(n) => n >= 1,
            NodeCount::Percent(p) => (1..=100).contains(&p),
        }
    }

    /// Of a group of `n` nodes, rounded up, at least 1 (a batch size).
    pub fn of_rounded_up(self, n: usize) -> usize {
        match self {
            NodeCount::Count(c) => c as usize,
            NodeCount::Percent(p) => (n * p as usize).div_ceil(100),
        }
        .max(1)
    }

    /// Of a group of `n` nodes, rounded down, at least 1 (a bound on unavailable nodes: a
    /// percentage never allows more than it says, and 1 keeps a rollout able to move).
    pub fn of_rounded_down(self, n: usize) -> usize {
        match self {
            NodeCount::Count(c) => c as usize,
            NodeCount::Percent(p) => n * p as usize / 100,
        }
        .max(1)
    }
}

impl fmt::Display for NodeCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeCount::Count(n) => write!(f, "{n}"),
            NodeCount::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl FromStr for NodeCount {
    type Err = crate::ParseError;

    /// `N` (at least 1) or `P%` (1 to 100).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || crate::ParseError::NodeCount(crate::ParseError::shown(s));
        let digits = |t: &str| {
            if t.is_empty() || t.len() > 9 || !t.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err());
            }
            t.parse::<u32>().map_err(|_| err())
        };
        let c = match s.strip_suffix('%') {
            Some(p) => NodeCount::Percent(digits(p)?),
            None => NodeCount::Count(digits(s)?),
        };
        if c.is_valid() { Ok(c) } else { Err(err()) }
    }
}

/// One wave of a rollout (`--wave-by LABEL`): the nodes whose label has this value, in the
/// rollout's order. Waves are upgraded one after another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wave {
    pub label_value: String,
    pub nodes: Vec<NodeId>,
}

/// `--gate-prometheus URL --gate QUERY ...`: PromQL expressions every health gate (bake
/// included) also evaluates on a node its agent calls healthy; `$node` and `$version` in a
/// query stand for the node's id and the version the gate expects. A query passes when it
/// returns a vector with at least one sample or a scalar other than 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricGates {
    /// `http://HOST:PORT[/prefix]`: the queries go to `URL/api/v1/query`.
    pub prometheus: String,
    pub queries: Vec<String>,
}

impl MetricGates {
    /// `query` with the variables `$node` and `$version` replaced; any other `$name` (a longer
    /// one such as `$node_count` too) is left as it is.
    pub fn substituted(query: &str, node: &NodeId, version: &Version) -> String {
        let mut out = String::with_capacity(query.len() + 16);
        let mut rest = query;
        while let Some(i) = rest.find('$') {
            out.push_str(&rest[..i]);
            let after = &rest[i + 1..];
            let len = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            match &after[..len] {
                "node" => out.push_str(node.as_str()),
                "version" => out.push_str(&version.to_string()),
                other => {
                    out.push('$');
                    out.push_str(other);
                }
            }
            rest = &after[len..];
        }
        out.push_str(rest);
        out
    }

    /// Checks the URL (http only) and the queries' number and sizes.
    pub fn check(&self) -> Result<(), SpecError> {
        let url_ok = self.prometheus.len() <= MAX_PROMETHEUS_URL_LEN
            && self
                .prometheus
                .strip_prefix("http://")
                .and_then(|rest| rest.split('/').next())
                .is_some_and(|host| {
                    !host.is_empty()
                        && !host.contains('@')
                        && host.bytes().all(|b| b.is_ascii_graphic())
                })
            && !self.prometheus.contains(['?', '#']);
        if !url_ok {
            return Err(SpecError::PrometheusUrl(
                self.prometheus.chars().take(100).collect(),
            ));
        }
        if self.queries.is_empty() {
            return Err(SpecError::PrometheusWithoutGates);
        }
        if self.queries.len() > MAX_METRIC_GATES {
            return Err(SpecError::TooManyGates(self.queries.len()));
        }
        for (i, q) in self.queries.iter().enumerate() {
            if q.trim().is_empty() {
                return Err(SpecError::EmptyGate(i + 1));
            }
            if q.len() > MAX_METRIC_GATE_LEN {
                return Err(SpecError::GateTooLong {
                    index: i + 1,
                    len: q.len(),
                });
            }
        }
        Ok(())
    }
}

/// The package a rollout installs, as recorded in the Raft log: never the bytes, which live in
/// each coordinator's content-addressed store under `sha256`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PackageRef {
    pub name: String,
    pub version: Version,
    /// Lowercase hex digest of the zip.
    pub sha256: String,
    /// Size of the zip in bytes.
    pub size: u64,
}

/// What a rollout does when a node fails to stage, install, pass its health gate or commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Undo what was done to every touched node, most recently touched first (the default).
    #[default]
    Rollback,
    /// Stop and wait for an operator's `resume`, `rollback` or `abort`.
    Pause,
}

impl OnFailure {
    pub fn as_str(&self) -> &'static str {
        match self {
            OnFailure::Rollback => "rollback",
            OnFailure::Pause => "pause",
        }
    }
}

impl fmt::Display for OnFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OnFailure {
    type Err = crate::ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "rollback" => Ok(OnFailure::Rollback),
            "pause" => Ok(OnFailure::Pause),
            _ => Err(crate::ParseError::OnFailure(crate::ParseError::shown(s))),
        }
    }
}

fn default_max_parallel_staging() -> u32 {
    DEFAULT_MAX_PARALLEL_STAGING
}

fn default_failure_threshold() -> u32 {
    DEFAULT_FAILURE_THRESHOLD
}

fn default_preflight_timeout_ms() -> u64 {
    DEFAULT_PREFLIGHT_TIMEOUT_MS
}

/// What an operator asked for: move `nodes`, in this order, to `version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutSpec {
    pub id: String,
    /// The target version.
    pub version: Version,
    /// The package to push; `None` when the agents already have it (their own package store).
    pub package: Option<PackageRef>,
    /// Targets, in upgrade order.
    pub nodes: Vec<NodeId>,
    /// Nodes installed and health-gated at a time (at least 1).
    pub batch_size: u32,
    /// Upgrade the first `canary` nodes, then wait for `promote` (0: no canary).
    pub canary: u32,
    /// Make the new release permanent at the end (`false`: `--no-permanent`).
    pub permanent: bool,
    pub min_healthy_time_ms: u64,
    pub healthy_deadline_ms: u64,
    pub on_failure: OnFailure,
    /// The operator's identity (from their certificate).
    pub requested_by: String,
    /// Nodes staged (and committed) at a time; absent in older JSON, hence the default.
    #[serde(default = "default_max_parallel_staging")]
    pub max_parallel_staging: u32,
    /// Consecutive failed probes (the agent answered: unhealthy) that fail a health gate at
    /// once, without waiting for `healthy_deadline_ms`; 0: only the deadline. An unreachable
    /// agent is not a failed probe. Absent in older JSON, hence the default.
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
    /// How long preflight may take per node; absent in older JSON, hence the default.
    #[serde(default = "default_preflight_timeout_ms")]
    pub preflight_timeout_ms: u64,
    /// After a successful rollout, uninstall on every node of the rollout the releases beyond
    /// the newest N (never the current or permanent one, nor one this rollout would roll back
    /// to): `rollout --keep-releases N`. `None`: no pruning (and in older JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_releases: Option<u32>,
    /// `rollout --bake DUR`: once every node is upgraded and healthy, keep probing all of them
    /// for this long before making the release permanent; a failure in that window fails the
    /// rollout (by `on_failure`) while the release is still only `current` everywhere. 0: no
    /// bake (and in older JSON).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub bake_ms: u64,
    // The policy fields below were resolved by the coordinator when the rollout started (labels,
    // health), so the machine and every replay of it see the same facts. Absent in older JSON:
    // one wave, batches of `batch_size`, any selector already applied, no bound on unavailability.
    /// The label nodes were grouped into waves by (`--wave-by`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave_by: Option<String>,
    /// The waves, in upgrade order; their nodes, concatenated, are `nodes`. Empty: one wave.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waves: Vec<Wave>,
    /// `--batch-size P%`: each wave's batches hold P% of the wave's nodes (rounded up, at
    /// least 1); `batch_size` is then not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_percent: Option<u32>,
    /// `--selector`: the labels every node of the rollout has (already applied to `nodes`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    /// `--max-unavailable`: at most this many nodes (a percentage: of the rollout's nodes,
    /// rounded down, at least 1) unhealthy or mid-step at once, counting `unhealthy_at_start`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<NodeCount>,
    /// Registered nodes (in the rollout or not) whose health probe failed when the rollout
    /// started: they count as unavailable until the rollout upgrades them and they pass their
    /// gate. Only probed with `max_unavailable`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unhealthy_at_start: Vec<NodeId>,
    /// `--promote-each-wave`: once a wave is upgraded and healthy, wait for `promote` before
    /// the next one (not after the last: it commits).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub promote_each_wave: bool,
    /// `--wave-pause DUR`: once a wave is upgraded and healthy, every node upgraded so far must
    /// stay healthy this long (probed, one unhealthy answer fails it) before the next wave
    /// starts. 0: no pause (and in older JSON).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub wave_pause_ms: u64,
    /// `--watch-after-commit DUR`: after the commit, keep probing every upgraded node this long;
    /// a failure rolls the committed rollout back (a downgrade to the previous release, which
    /// is `old` on every node). 0: no watch (and in older JSON).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub watch_after_commit_ms: u64,
    /// `--gate-prometheus URL --gate QUERY ...`: PromQL checks of every health gate. Boxed:
    /// rarely set, and the spec travels inline in the Raft command enum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric_gates: Option<Box<MetricGates>>,
}

impl RolloutSpec {
    /// A spec with the defaults an operator gets without flags: one node at a time, no canary,
    /// permanent, roll back on failure.
    pub fn new(
        id: impl Into<String>,
        version: Version,
        nodes: Vec<NodeId>,
        requested_by: impl Into<String>,
    ) -> Self {
        RolloutSpec {
            id: id.into(),
            version,
            package: None,
            nodes,
            batch_size: DEFAULT_BATCH_SIZE,
            canary: 0,
            permanent: true,
            min_healthy_time_ms: DEFAULT_MIN_HEALTHY_TIME_MS,
            healthy_deadline_ms: DEFAULT_HEALTHY_DEADLINE_MS,
            on_failure: OnFailure::Rollback,
            requested_by: requested_by.into(),
            max_parallel_staging: DEFAULT_MAX_PARALLEL_STAGING,
            failure_threshold: DEFAULT_FAILURE_THRESHOLD,
            preflight_timeout_ms: DEFAULT_PREFLIGHT_TIMEOUT_MS,
            keep_releases: None,
            bake_ms: 0,
            wave_by: None,
            waves: Vec::new(),
            batch_percent: None,
            selector: BTreeMap::new(),
            max_unavailable: None,
            unhealthy_at_start: Vec::new(),
            promote_each_wave: false,
            wave_pause_ms: 0,
            watch_after_commit_ms: 0,
            metric_gates: None,
        }
    }

    /// The bake gate's deadline, from its start: the bake, then as long as any gate may take.
    pub fn bake_deadline_ms(&self) -> u64 {
        self.bake_ms.saturating_add(self.healthy_deadline_ms)
    }

    /// A watch of `watch_ms` (wave pause, watch after commit): its gate's deadline, as for
    /// the bake.
    pub fn watch_deadline_ms(&self, watch_ms: u64) -> u64 {
        watch_ms.saturating_add(self.healthy_deadline_ms)
    }

    /// The bound on unavailable nodes, resolved against the rollout's node count.
    pub fn max_unavailable_nodes(&self) -> Option<usize> {
        self.max_unavailable
            .map(|m| m.of_rounded_down(self.nodes.len()))
    }

    /// The batch size inside a wave of `wave_len` nodes.
    pub fn batch_size_in(&self, wave_len: usize) -> usize {
        match self.batch_percent {
            Some(p) => NodeCount::Percent(p).of_rounded_up(wave_len),
            None => (self.batch_size as usize).max(1),
        }
    }

    /// The batch rule as an operator gives it: `2` or `50%`.
    pub fn batch_rule(&self) -> String {
        match self.batch_percent {
            Some(p) => format!("{p}%"),
            None => self.batch_size.to_string(),
        }
    }

    /// Checks the policy fields (see [`RolloutSpec::validate`]).
    fn validate_policy(&self) -> Result<(), SpecError> {
        if self.promote_each_wave && self.waves.is_empty() {
            return Err(SpecError::PromoteWithoutWaves);
        }
        if self.wave_pause_ms > 0 && self.waves.is_empty() {
            return Err(SpecError::WavePauseWithoutWaves);
        }
        if self.wave_pause_ms > MAX_BAKE_MS {
            return Err(SpecError::WavePauseTooLong(self.wave_pause_ms));
        }
        if self.watch_after_commit_ms > 0 && !self.permanent {
            return Err(SpecError::WatchWithoutCommit);
        }
        if self.watch_after_commit_ms > MAX_BAKE_MS {
            return Err(SpecError::WatchTooLong(self.watch_after_commit_ms));
        }
        if !self.waves.is_empty() {
            if self.wave_by.is_none() {
                return Err(SpecError::WavesWithoutLabel);
            }
            let mut listed = self.waves.iter().flat_map(|w| w.nodes.iter());
            if self.waves.iter().any(|w| w.nodes.is_empty())
                || !self.nodes.iter().all(|n| listed.next() == Some(n))
                || listed.next().is_some()
            {
                return Err(SpecError::WavesMismatch);
            }
        }
        if let Some(p) = self.batch_percent
            && !(1..=100).contains(&p)
        {
            return Err(SpecError::BatchPercent(p));
        }
        if let Some(m) = self.max_unavailable {
            if !m.is_valid() {
                return Err(SpecError::MaxUnavailable(m));
            }
            // With as many nodes down as allowed already, no healthy node could ever start.
            let allowed = m.of_rounded_down(self.nodes.len());
            if self.unhealthy_at_start.len() >= allowed {
                return Err(SpecError::NoRoomUnavailable {
                    limit: m,
                    allowed,
                    unhealthy: self.unhealthy_at_start.clone(),
                });
            }
        }
        if let Some(g) = &self.metric_gates {
            g.check()?;
        }
        Ok(())
    }

    /// Checks everything that can be checked without talking to a node. A spec that passes can
    /// be driven to an end: every health gate is satisfiable, every batch is non-empty.
    pub fn validate(&self) -> Result<(), SpecError> {
        if !valid_rollout_id(&self.id) {
            return Err(SpecError::InvalidId(self.id.chars().take(64).collect()));
        }
        if self.nodes.is_empty() {
            return Err(SpecError::NoNodes);
        }
        let mut seen = HashSet::with_capacity(self.nodes.len());
        for n in &self.nodes {
            if !seen.insert(n) {
                return Err(SpecError::DuplicateNode(n.clone()));
            }
        }
        if self.batch_size == 0 {
            return Err(SpecError::ZeroBatchSize);
        }
        if self.max_parallel_staging == 0 {
            return Err(SpecError::ZeroParallelStaging);
        }
        // u32 -> usize never truncates on the 32/64-bit targets we build for.
        if self.canary as usize > self.nodes.len() {
            return Err(SpecError::CanaryTooLarge {
                canary: self.canary,
                nodes: self.nodes.len(),
            });
        }
        if self.healthy_deadline_ms == 0 {
            return Err(SpecError::ZeroHealthyDeadline);
        }
        if self.healthy_deadline_ms < self.min_healthy_time_ms {
            return Err(SpecError::DeadlineBelowMinHealthy {
                deadline_ms: self.healthy_deadline_ms,
                min_healthy_ms: self.min_healthy_time_ms,
            });
        }
        if self.failure_threshold > MAX_FAILURE_THRESHOLD {
            return Err(SpecError::FailureThresholdTooLarge(self.failure_threshold));
        }
        if self.bake_ms > MAX_BAKE_MS {
            return Err(SpecError::BakeTooLong(self.bake_ms));
        }
        if self.preflight_timeout_ms == 0 || self.preflight_timeout_ms > MAX_PREFLIGHT_TIMEOUT_MS {
            return Err(SpecError::PreflightTimeout(self.preflight_timeout_ms));
        }
        self.validate_policy()?;
        if let Some(p) = &self.package {
            if crate::validate_package_name(&p.name).is_err() {
                return Err(SpecError::InvalidPackageName(
                    p.name.chars().take(64).collect(),
                ));
            }
            if p.version != self.version {
                return Err(SpecError::PackageVersionMismatch {
                    name: p.name.clone(),
                    package: p.version,
                    target: self.version,
                });
            }
            if p.sha256.len() != 64
                || !p
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err(SpecError::InvalidSha256(
                    p.sha256.chars().take(80).collect(),
                ));
            }
        }
        Ok(())
    }
}

/// Rollout ids go into fences, log lines and possibly file names: same alphabet as node ids.
fn valid_rollout_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        && s.as_bytes()[0].is_ascii_alphanumeric()
}

/// Where a rollout stands. Serialized as the snake_case names operators see in `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Accepted and replicated; no driver has started it yet.
    Pending,
    /// Asking every target its running version and free disk. Touches nothing.
    Preflight,
    /// Pushing and unpacking the package on every node that needs it. The service is untouched.
    Staging,
    /// Installing (hot, not permanent) and health-gating, batch by batch.
    Upgrading,
    /// Every node upgraded and healthy; probing all of them again before ending: for the
    /// bake time (`--bake`) before the commit, or (with `--no-permanent`, which has no commit
    /// to notice a node that restarted onto its permanent release) once, to confirm every node
    /// still runs the target.
    Baking,
    /// Making the new release permanent on every upgraded node.
    Committing,
    /// Committed; probing every upgraded node for the watch after the commit
    /// (`--watch-after-commit`). A failure rolls the committed rollout back.
    Watching,
    /// Committed; uninstalling the releases beyond the newest N on every node
    /// (`--keep-releases`). A failure to prune is reported, never fails the rollout.
    Pruning,
    Succeeded,
    /// Waiting for an operator (after `pause`, or after a failure with `--on-failure pause`).
    Paused,
    /// Undoing what was done to every touched node, most recently touched first, each
    /// health-gated.
    RollingBack,
    RolledBack,
    /// An undo step or its health gate failed on some node; the error names them.
    RollbackFailed,
    /// Stopped; nodes left as they were at that moment (the events say how).
    Aborted,
}

names!(Phase, Phase, {
    Pending => "pending",
    Preflight => "preflight",
    Staging => "staging",
    Upgrading => "upgrading",
    Baking => "baking",
    Committing => "committing",
    Watching => "watching",
    Pruning => "pruning",
    Succeeded => "succeeded",
    Paused => "paused",
    RollingBack => "rolling_back",
    RolledBack => "rolled_back",
    RollbackFailed => "rollback_failed",
    Aborted => "aborted",
});

impl Phase {
    /// A terminal phase never changes again and accepts no command.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Phase::Succeeded | Phase::RolledBack | Phase::RollbackFailed | Phase::Aborted
        )
    }
}

/// Where one node stands within a rollout. Serialized as snake_case names.
///
/// The forward path is `pending -> preflight_ok -> staging -> staged -> installing -> installed
/// -> verifying -> upgraded -> committing -> committed`; `skipped` ends it for a node that is
/// already where the rollout would leave it. A node enters the path where its releases put it:
/// `staged` when the target is already on its disk, `installed` when it already runs the target
/// without it being permanent. `installing` is the switch to the target, whichever agent call
/// does it (install, or downgrade when the target is the node's permanent release).
/// `failed` holds the error of the step that failed. The rollback path is `rolling_back` (the
/// steps that undo what was done, then a health gate) then `rolled_back` or `rollback_failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeStep {
    /// Not preflighted yet (or its preflight is in flight).
    Pending,
    /// Already where the rollout would leave it (running the target permanently, or, with
    /// `--no-permanent`, running it at all): nothing to do.
    Skipped,
    /// Reachable, patch-level hop, enough disk.
    PreflightOk,
    Staging,
    /// The release is unpacked on the node; the service still runs the old one.
    Staged,
    /// The switch to the target in flight (a hot install, or a downgrade to the target when it
    /// is the node's permanent release).
    Installing,
    /// Running the target (not permanent, unless it was switched back to as the node's
    /// permanent release); health not confirmed yet.
    Installed,
    /// Health gate on the target in flight.
    Verifying,
    /// Running the target and healthy (not permanent yet).
    Upgraded,
    Committing,
    /// Running the target permanently.
    Committed,
    /// The last step failed; `error` says which and why.
    Failed,
    /// Undo steps (downgrade, install of the release that was current) or their health gate
    /// in progress.
    RollingBack,
    /// Back on its previous version and healthy.
    RolledBack,
    /// An undo step or its health gate failed: this node needs a person.
    RollbackFailed,
}

names!(NodeStep, NodeStep, {
    Pending => "pending",
    Skipped => "skipped",
    PreflightOk => "preflight_ok",
    Staging => "staging",
    Staged => "staged",
    Installing => "installing",
    Installed => "installed",
    Verifying => "verifying",
    Upgraded => "upgraded",
    Committing => "committing",
    Committed => "committed",
    Failed => "failed",
    RollingBack => "rolling_back",
    RolledBack => "rolled_back",
    RollbackFailed => "rollback_failed",
});

/// One node's progress, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeProgress {
    pub id: NodeId,
    /// The version the node ran when preflight asked (`None` before that). Rollback returns
    /// here, except on a node that ran the target itself without it being permanent: that one
    /// returns to its permanent release (the events say so).
    pub from_version: Option<Version>,
    pub step: NodeStep,
    /// The most recent error on this node, if any (the events keep the full history).
    pub error: Option<String>,
    /// When the node entered `step`: the time of the recorded entry that moved it there (ms
    /// since the epoch; 0 before its first step, and in rollouts recorded before this was
    /// kept).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub step_since_ms: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl NodeProgress {
    pub fn new(id: NodeId) -> Self {
        NodeProgress {
            id,
            from_version: None,
            step: NodeStep::Pending,
            error: None,
            step_since_ms: 0,
        }
    }
}

/// One line of a rollout's audit trail: when (the coordinator's clock, ms since the Unix epoch),
/// who (an operator identity, or the coordinator that drove the step) and what happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub at_ms: u64,
    pub by: String,
    pub message: String,
    /// The Raft term of the driver whose entry caused it; 0 for operators' commands (and in
    /// events recorded before terms were kept).
    #[serde(default)]
    pub term: u64,
}

/// What `status --json` shows for one rollout: `id`, `version`, `phase`, `nodes`, `events`, plus
/// whether it waits for `promote` and the reason it did not succeed (if it did not).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutStatus {
    pub id: String,
    pub version: Version,
    pub phase: Phase,
    pub awaiting_promotion: bool,
    pub error: Option<String>,
    pub nodes: Vec<NodeProgress>,
    pub events: Vec<AuditEvent>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    fn n(s: &str) -> NodeId {
        s.parse().unwrap()
    }

    fn spec() -> RolloutSpec {
        RolloutSpec::new("r1", v("4.2.1"), vec![n("n1"), n("n2"), n("n3")], "alice")
    }

    #[test]
    fn default_spec_is_valid() {
        assert_eq!(spec().validate(), Ok(()));
    }

    #[test]
    fn metric_gates_need_an_http_url_and_bounded_queries() {
        let check = |url: &str, queries: &[&str]| {
            let mut s = spec();
            s.metric_gates = Some(Box::new(MetricGates {
                prometheus: url.into(),
                queries: queries.iter().map(|q| q.to_string()).collect(),
            }));
            s.validate()
        };
        assert_eq!(check("http://127.0.0.1:9090", &["vector(1)"]), Ok(()));
        assert_eq!(check("http://prom/prefix", &["up"]), Ok(()));
        for bad in [
            "https://p:9090",
            "127.0.0.1:9090",
            "http://",
            "http://a b",
            "http://p?x=1",
        ] {
            assert!(
                matches!(check(bad, &["up"]), Err(SpecError::PrometheusUrl(_))),
                "{bad}"
            );
        }
        let e = check("https://p:9090", &["up"]).unwrap_err().to_string();
        assert!(e.contains("https is not supported yet"), "{e}");
        assert_eq!(
            check("http://p", &[]),
            Err(SpecError::PrometheusWithoutGates)
        );
        assert_eq!(
            check("http://p", &["up", " "]),
            Err(SpecError::EmptyGate(2))
        );
        let many = vec!["up"; MAX_METRIC_GATES + 1];
        assert_eq!(
            check("http://p", &many),
            Err(SpecError::TooManyGates(MAX_METRIC_GATES + 1))
        );
        let long = "x".repeat(MAX_METRIC_GATE_LEN + 1);
        assert_eq!(
            check("http://p", &[&long]),
            Err(SpecError::GateTooLong {
                index: 1,
                len: MAX_METRIC_GATE_LEN + 1
            })
        );
        // Older JSON without the field reads as no gates.
        let json = serde_json::to_string(&spec()).unwrap();
        assert!(!json.contains("metric_gates"), "{json}");
    }

    #[test]
    fn validation_errors_name_the_problem() {
        let check = |f: &dyn Fn(&mut RolloutSpec), want: SpecError| {
            let mut s = spec();
            f(&mut s);
            assert_eq!(s.validate(), Err(want));
        };
        check(
            &|s| s.id = String::new(),
            SpecError::InvalidId(String::new()),
        );
        check(
            &|s| s.id = "../x".into(),
            SpecError::InvalidId("../x".into()),
        );
        check(&|s| s.nodes.clear(), SpecError::NoNodes);
        check(
            &|s| s.nodes.push(n("n2")),
            SpecError::DuplicateNode(n("n2")),
        );
        check(&|s| s.batch_size = 0, SpecError::ZeroBatchSize);
        check(
            &|s| s.max_parallel_staging = 0,
            SpecError::ZeroParallelStaging,
        );
        check(
            &|s| s.canary = 4,
            SpecError::CanaryTooLarge {
                canary: 4,
                nodes: 3,
            },
        );
        check(
            &|s| {
                s.min_healthy_time_ms = 0;
                s.healthy_deadline_ms = 0
            },
            SpecError::ZeroHealthyDeadline,
        );
        check(
            &|s| {
                s.min_healthy_time_ms = 10;
                s.healthy_deadline_ms = 9
            },
            SpecError::DeadlineBelowMinHealthy {
                deadline_ms: 9,
                min_healthy_ms: 10,
            },
        );
        let pkg = PackageRef {
            name: "emqx".into(),
            version: v("4.2.1"),
            sha256: "ab".repeat(32),
            size: 10,
        };
        check(
            &|s| {
                s.package = Some(PackageRef {
                    version: v("4.2.2"),
                    ..pkg.clone()
                })
            },
            SpecError::PackageVersionMismatch {
                name: "emqx".into(),
                package: v("4.2.2"),
                target: v("4.2.1"),
            },
        );
        check(
            &|s| {
                s.package = Some(PackageRef {
                    sha256: "AB".repeat(32),
                    ..pkg.clone()
                })
            },
            SpecError::InvalidSha256("AB".repeat(32)),
        );
        check(
            &|s| {
                s.package = Some(PackageRef {
                    name: "../x".into(),
                    ..pkg.clone()
                })
            },
            SpecError::InvalidPackageName("../x".into()),
        );
        let mut ok = spec();
        ok.package = Some(pkg);
        ok.canary = 3;
        ok.batch_size = 100;
        ok.min_healthy_time_ms = 5;
        ok.healthy_deadline_ms = 5;
        assert_eq!(ok.validate(), Ok(()));
    }

    #[test]
    fn messages_are_readable() {
        assert_eq!(
            SpecError::DuplicateNode(n("n2")).to_string(),
            "node n2 is listed more than once"
        );
        assert_eq!(
            SpecError::CanaryTooLarge {
                canary: 4,
                nodes: 3
            }
            .to_string(),
            "a canary of 4 nodes is larger than the rollout's 3 nodes"
        );
    }

    #[test]
    fn enums_serialize_snake_case_and_parse_back() {
        for p in Phase::ALL {
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(json, format!("\"{}\"", p.as_str()));
            assert_eq!(serde_json::from_str::<Phase>(&json).unwrap(), p);
            assert_eq!(p.as_str().parse::<Phase>(), Ok(p));
        }
        assert_eq!(Phase::RollingBack.as_str(), "rolling_back");
        for s in NodeStep::ALL {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.as_str()));
            assert_eq!(serde_json::from_str::<NodeStep>(&json).unwrap(), s);
            assert_eq!(s.as_str().parse::<NodeStep>(), Ok(s));
        }
        assert_eq!(
            serde_json::to_string(&OnFailure::Pause).unwrap(),
            "\"pause\""
        );
        assert_eq!("rollback".parse::<OnFailure>(), Ok(OnFailure::Rollback));
        assert!("bogus".parse::<OnFailure>().is_err());
        assert!("bogus".parse::<Phase>().is_err());
    }

    #[test]
    fn terminal_phases() {
        let terminal: Vec<Phase> = Phase::ALL.into_iter().filter(Phase::is_terminal).collect();
        assert_eq!(
            terminal,
            [
                Phase::Succeeded,
                Phase::RolledBack,
                Phase::RollbackFailed,
                Phase::Aborted
            ]
        );
    }

    #[test]
    fn failure_threshold_defaults_and_bounds() {
        assert_eq!(spec().failure_threshold, DEFAULT_FAILURE_THRESHOLD);
        let mut s = spec();
        s.failure_threshold = 0;
        assert_eq!(s.validate(), Ok(()), "0 disables the threshold");
        s.failure_threshold = MAX_FAILURE_THRESHOLD;
        assert_eq!(s.validate(), Ok(()));
        s.failure_threshold = 30_000;
        let err = s.validate().unwrap_err();
        assert_eq!(err, SpecError::FailureThresholdTooLarge(30_000));
        let msg = err.to_string();
        assert!(
            msg.contains("30000") && msg.contains("use 0 to disable"),
            "{msg}"
        );
    }

    #[test]
    fn node_counts_parse_counts_and_percentages_only() {
        assert_eq!("3".parse::<NodeCount>(), Ok(NodeCount::Count(3)));
        assert_eq!("25%".parse::<NodeCount>(), Ok(NodeCount::Percent(25)));
        assert_eq!("100%".parse::<NodeCount>(), Ok(NodeCount::Percent(100)));
        for bad in [
            "0",
            "0%",
            "150%",
            "101%",
            "abc",
            "",
            "%",
            "-1",
            "+2",
            "2 ",
            "1.5%",
            "9999999999",
        ] {
            let e = bad.parse::<NodeCount>().unwrap_err();
            assert!(e.to_string().contains("invalid node count"), "{bad}: {e}");
        }
        for c in [NodeCount::Count(7), NodeCount::Percent(34)] {
            assert_eq!(c.to_string().parse::<NodeCount>(), Ok(c));
        }
        // Batches round up, bounds round down; both at least 1.
        assert_eq!(NodeCount::Percent(25).of_rounded_up(5), 2);
        assert_eq!(NodeCount::Percent(50).of_rounded_up(2), 1);
        assert_eq!(NodeCount::Percent(1).of_rounded_up(3), 1);
        assert_eq!(NodeCount::Percent(25).of_rounded_down(5), 1);
        assert_eq!(NodeCount::Percent(50).of_rounded_down(9), 4);
        assert_eq!(NodeCount::Percent(10).of_rounded_down(3), 1);
        assert_eq!(NodeCount::Count(2).of_rounded_up(9), 2);
    }

    #[test]
    fn policy_fields_validate_and_default_to_what_older_specs_meant() {
        let wave = |v: &str, ids: &[&str]| Wave {
            label_value: v.into(),
            nodes: ids.iter().map(|i| n(i)).collect(),
        };
        let mut s = spec();
        s.wave_by = Some("zone".into());
        s.waves = vec![wave("a", &["n1", "n2"]), wave("b", &["n3"])];
        s.batch_percent = Some(50);
        s.max_unavailable = Some(NodeCount::Count(2));
        s.unhealthy_at_start = vec![n("n9")];
        assert_eq!(s.validate(), Ok(()));
        assert_eq!(s.batch_size_in(2), 1);
        assert_eq!(s.batch_rule(), "50%");
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<RolloutSpec>(&json).unwrap(), s);

        let check = |f: &dyn Fn(&mut RolloutSpec), want: SpecError| {
            let mut bad = s.clone();
            f(&mut bad);
            assert_eq!(bad.validate(), Err(want));
        };
        check(&|b| b.waves[1].nodes.clear(), SpecError::WavesMismatch);
        check(&|b| b.waves.swap(0, 1), SpecError::WavesMismatch);
        check(
            &|b| b.waves.push(wave("c", &["n4"])),
            SpecError::WavesMismatch,
        );
        check(
            &|b| {
                b.waves[0].nodes.pop();
            },
            SpecError::WavesMismatch,
        );
        check(&|b| b.wave_by = None, SpecError::WavesWithoutLabel);
        check(
            &|b| {
                b.waves.clear();
                b.promote_each_wave = true;
            },
            SpecError::PromoteWithoutWaves,
        );
        check(&|b| b.batch_percent = Some(0), SpecError::BatchPercent(0));
        check(
            &|b| b.batch_percent = Some(101),
            SpecError::BatchPercent(101),
        );
        check(
            &|b| b.max_unavailable = Some(NodeCount::Percent(0)),
            SpecError::MaxUnavailable(NodeCount::Percent(0)),
        );
        let full = SpecError::NoRoomUnavailable {
            limit: NodeCount::Count(2),
            allowed: 2,
            unhealthy: vec![n("n9"), n("n2")],
        };
        assert_eq!(
            full.to_string(),
            "max unavailable 2 allows 2 node(s) down at once, but 2 node(s) are unhealthy already (n9, n2): no node could be upgraded; repair them or raise --max-unavailable"
        );
        check(&|b| b.unhealthy_at_start.push(n("n2")), full);

        // A spec recorded before policies: one wave, batches of batch_size, no bound.
        let mut old: serde_json::Value = serde_json::to_value(spec()).unwrap();
        for k in [
            "promote_each_wave",
            "wave_by",
            "waves",
            "batch_percent",
            "selector",
            "max_unavailable",
            "unhealthy_at_start",
        ] {
            assert!(
                old.as_object_mut().unwrap().remove(k).is_none(),
                "{k} is skipped when unset"
            );
        }
        old["batch_size"] = serde_json::json!(2);
        let back: RolloutSpec = serde_json::from_value(old).unwrap();
        assert!(back.waves.is_empty() && back.wave_by.is_none() && back.selector.is_empty());
        assert_eq!(back.batch_size_in(3), 2);
        assert_eq!(back.batch_rule(), "2");
        assert_eq!(back.max_unavailable_nodes(), None);
    }

    #[test]
    fn spec_json_round_trip_and_default_parallelism() {
        let s = spec();
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<RolloutSpec>(&json).unwrap(), s);
        let mut value: serde_json::Value = serde_json::from_str(&json).unwrap();
        let obj = value.as_object_mut().unwrap();
        obj.remove("max_parallel_staging");
        // Specs in the Raft log of clusters older than the failure threshold lack it.
        obj.remove("failure_threshold");
        let back: RolloutSpec = serde_json::from_value(value).unwrap();
        assert_eq!(back.max_parallel_staging, DEFAULT_MAX_PARALLEL_STAGING);
        assert_eq!(back.failure_threshold, DEFAULT_FAILURE_THRESHOLD);
    }

    #[test]
    fn progress_json_shape() {
        let p = NodeProgress {
            id: n("n1"),
            from_version: Some(v("4.2.0")),
            step: NodeStep::PreflightOk,
            error: None,
            step_since_ms: 0,
        };
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"id":"n1","from_version":"4.2.0","step":"preflight_ok","error":null}"#
        );
        let p = NodeProgress {
            step_since_ms: 7,
            ..p
        };
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"id":"n1","from_version":"4.2.0","step":"preflight_ok","error":null,"step_since_ms":7}"#
        );
    }
}
