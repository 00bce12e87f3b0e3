//! The coordinator's Prometheus metrics (`/metrics` on `--http-listen`). Gauges are read from
//! the replicated state and Raft at scrape time; counters count what this process saw happen
//! (every coordinator applies the same log, so alert on the max across coordinators, not the
//! sum: deploy/prometheus/alerts.yml).

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use orch_types::rollout::{NodeStep, Phase};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::raft::{RaftStatus, Role};
use crate::state::ClusterState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabel {
    step: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeState {
    state: String,
}

/// What has been counted already, so that counters derived from the state move once per fact.
#[derive(Default)]
struct Seen {
    /// Rollouts whose end was counted (or that had ended before this process started).
    ended: BTreeSet<String>,
    /// (rollout, node) pairs whose failed health gate was counted.
    gate_failures: BTreeSet<(String, String)>,
}

pub struct Metrics {
    registry: Registry,
    rollouts: Family<Outcome, Counter>,
    gate_failures: Counter,
    pub step_duration: Family<KindLabel, Histogram>,
    pub package_uploaded: Counter,
    pub package_pushed: Counter,
    phase: Family<PhaseLabel, Gauge>,
    nodes_by_step: Family<StepLabel, Gauge>,
    since_progress: Gauge<f64, AtomicU64>,
    nodes: Family<NodeState, Gauge>,
    raft: RaftGauges,
    seen: Mutex<Option<Seen>>,
}

/// Raft's view from this coordinator, read at scrape time.
struct RaftGauges {
    term: Gauge,
    is_leader: Gauge,
    leader_id: Gauge,
    commit_index: Gauge,
    applied_index: Gauge,
    log_entries: Gauge,
    log_bytes: Gauge,
}

impl RaftGauges {
    fn new(r: &mut Registry) -> RaftGauges {
        let g = Gauge::default;
        RaftGauges {
            term: reg(r, "raft_term", "Current Raft term", None, g()),
            is_leader: reg(
                r,
                "raft_is_leader",
                "1 if this coordinator leads",
                None,
                g(),
            ),
            leader_id: reg(
                r,
                "raft_leader_id",
                "Leader known here (0: none)",
                None,
                g(),
            ),
            commit_index: reg(r, "raft_commit_index", "Last committed index", None, g()),
            applied_index: reg(r, "raft_applied_index", "Last applied index", None, g()),
            log_entries: reg(r, "raft_log_entries", "Entries not yet purged", None, g()),
            log_bytes: reg(
                r,
                "raft_storage",
                "Raft files on disk",
                Some(Unit::Bytes),
                g(),
            ),
        }
    }
}

fn step_histogram() -> Histogram {
    // 5 ms .. ~80 s: an upgrade step on a node ranges from a state change to a long hook.
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

/// The `kind` label of an action's step.
pub fn kind_of(kind: &orch_rollout::ActionKind) -> &'static str {
    use orch_rollout::ActionKind as K;
    match kind {
        K::Preflight => "preflight",
        K::Stage { .. } => "stage",
        K::Install { .. } => "install",
        K::Commit { .. } => "commit",
        K::Downgrade { .. } => "downgrade",
        K::HealthGate { .. } => "health_gate",
        K::Prune { .. } => "prune",
    }
}

/// Registers `metric` (with a unit suffix when given) and hands it back.
fn reg<M>(r: &mut Registry, name: &str, help: &str, unit: Option<Unit>, metric: M) -> M
where
    M: prometheus_client::registry::Metric + Clone,
{
    match unit {
        Some(u) => r.register_with_unit(name, help, u, metric.clone()),
        None => r.register(name, help, metric.clone()),
    }
    metric
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("orchestrator");
        let r = &mut r;
        let (s, b) = (Some(Unit::Seconds), Some(Unit::Bytes));
        let step_duration = Family::new_with_constructor(step_histogram as fn() -> Histogram);
        let mut m = Metrics {
            rollouts: reg(
                r,
                "rollouts",
                "Rollouts that ended, by outcome",
                None,
                Family::default(),
            ),
            gate_failures: reg(
                r,
                "health_gate_failures",
                "Nodes that failed their health gate after an upgrade step",
                None,
                Counter::default(),
            ),
            step_duration: reg(
                r,
                "step_duration",
                "Duration of the agent steps this coordinator drove, by kind",
                s.clone(),
                step_duration,
            ),
            package_uploaded: reg(
                r,
                "package_uploaded",
                "Package bytes uploaded to this coordinator",
                b.clone(),
                Counter::default(),
            ),
            package_pushed: reg(
                r,
                "package_pushed",
                "Package bytes this coordinator pushed to agents",
                b.clone(),
                Counter::default(),
            ),
            phase: reg(
                r,
                "rollout_phase",
                "The latest rollout's phase (1 for its phase, 0 for the others)",
                None,
                Family::default(),
            ),
            nodes_by_step: reg(
                r,
                "rollout_nodes",
                "Nodes of the latest rollout by step",
                None,
                Family::default(),
            ),
            since_progress: reg(
                r,
                "rollout_since_progress",
                "Time since the running rollout's last event (0 when none runs)",
                s,
                Gauge::<f64, AtomicU64>::default(),
            ),
            nodes: reg(
                r,
                "nodes",
                "Registered nodes: responsive, unresponsive (during a step), or with an id conflict",
                None,
                Family::default(),
            ),
            raft: RaftGauges::new(r),
            seen: Mutex::new(None),
            registry: Registry::default(),
        };
        m.registry = std::mem::take(r);
        m
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Records one agent step's duration.
    pub fn observe_step(&self, kind: &str, seconds: f64) {
        self.step_duration
            .get_or_create(&KindLabel {
                kind: kind.to_string(),
            })
            .observe(seconds);
    }

    /// Brings the gauges (and the counters derived from the state) up to date.
    pub fn refresh(
        &self,
        state: &ClusterState,
        raft: &RaftStatus,
        storage_bytes: u64,
        now_ms: u64,
    ) {
        self.refresh_raft(raft, storage_bytes);
        let kind = |n: &crate::state::NodeRecord| {
            if n.conflict.is_some() {
                "conflict"
            } else if n.unresponsive.is_some() {
                "unresponsive"
            } else {
                "responsive"
            }
        };
        for k in ["responsive", "unresponsive", "conflict"] {
            let n = state.nodes.values().filter(|n| kind(n) == k).count();
            self.nodes
                .get_or_create(&NodeState {
                    state: k.to_string(),
                })
                .set(n as i64);
        }
        let latest = state.rollouts.values().next_back();
        for p in Phase::ALL {
            let on = latest.is_some_and(|r| r.phase() == p);
            self.phase
                .get_or_create(&PhaseLabel {
                    phase: p.to_string(),
                })
                .set(i64::from(on));
        }
        for s in NodeStep::ALL {
            let n = latest.map_or(0, |r| r.nodes().filter(|n| n.step == s).count());
            self.nodes_by_step
                .get_or_create(&StepLabel {
                    step: s.to_string(),
                })
                .set(n as i64);
        }
        let since = latest
            .filter(|r| !r.phase().is_terminal())
            .and_then(|r| r.events().last())
            .map_or(0.0, |e| now_ms.saturating_sub(e.at_ms) as f64 / 1000.0);
        self.since_progress.set(since);
        self.count_from_state(state);
    }

    fn refresh_raft(&self, raft: &RaftStatus, storage_bytes: u64) {
        self.raft.term.set(raft.term as i64);
        self.raft
            .is_leader
            .set(i64::from(raft.role == Role::Leader));
        self.raft
            .leader_id
            .set(raft.leader.as_ref().map_or(0, |l| l.0) as i64);
        self.raft.commit_index.set(raft.committed as i64);
        self.raft.applied_index.set(raft.last_applied as i64);
        let first = raft.purged.map_or(1, |p| p + 1);
        self.raft
            .log_entries
            .set(raft.last_log_index.saturating_sub(first.saturating_sub(1)) as i64);
        self.raft.log_bytes.set(storage_bytes as i64);
    }

    fn count_from_state(&self, state: &ClusterState) {
        let mut guard = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        // The first look sets the baseline: what had ended before is not this process's news.
        let first = guard.is_none();
        let seen = guard.get_or_insert_with(Seen::default);
        for r in state.rollouts.values() {
            if r.phase().is_terminal() && seen.ended.insert(r.id().to_string()) && !first {
                self.rollouts
                    .get_or_create(&Outcome {
                        outcome: r.phase().to_string(),
                    })
                    .inc();
            }
            for n in r.nodes() {
                let failed_gate = n.step == NodeStep::Failed
                    && n.error
                        .as_deref()
                        .is_some_and(|e| e.contains("health gate"));
                if failed_gate
                    && seen
                        .gate_failures
                        .insert((r.id().to_string(), n.id.to_string()))
                    && !first
                {
                    self.gate_failures.inc();
                }
            }
        }
        // Bounded like the state: forget what the state no longer holds.
        seen.ended
            .retain(|id| state.rollouts.values().any(|r| r.id() == id));
        seen.gate_failures
            .retain(|(id, _)| state.rollouts.values().any(|r| r.id() == id));
        // Outcomes that never happened still show, at 0, so queries and alerts find them.
        for p in Phase::ALL.into_iter().filter(Phase::is_terminal) {
            self.rollouts
                .get_or_create(&Outcome {
                    outcome: p.to_string(),
                })
                .inc_by(0);
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
