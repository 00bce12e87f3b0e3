//! The agent's Prometheus metrics (`/metrics` on `--http-listen`). Counters and histograms are
//! recorded by the service layer as calls finish (the clock is read there, never in the release
//! store); the running release is read from the driver at scrape time.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use orch_types::{ReleaseState, VersionEntry};

/// The fence rules' refusals (`crate::fence`), always exported so alerts find them at 0.
pub const FENCE_REFUSALS: [&str; 5] = [
    "stale-fence",
    "other-cluster",
    "held",
    "deadline",
    "forbidden",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepResult {
    kind: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProbeResult {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Release {
    version: String,
    permanent: String,
}

pub struct Metrics {
    registry: Registry,
    steps: Family<StepResult, Counter>,
    step_duration: Family<Kind, Histogram>,
    activation_duration: Histogram,
    probes: Family<ProbeResult, Counter>,
    probe_duration: Histogram,
    fence_refusals: Family<Reason, Counter>,
    release: Family<Release, Gauge>,
    relay: Family<Direction, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Direction {
    direction: String,
}

fn step_histogram() -> Histogram {
    // 5 ms .. ~80 s: from a state change to a long activation hook.
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("orchestrator_agent");
        let m = Metrics {
            steps: Family::default(),
            step_duration: Family::new_with_constructor(step_histogram as fn() -> Histogram),
            activation_duration: step_histogram(),
            probes: Family::default(),
            // 1 ms .. ~16 s: a local HTTP probe up to the longest probe timeout.
            probe_duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            fence_refusals: Family::default(),
            release: Family::default(),
            relay: Family::default(),
            registry: Registry::default(),
        };
        r.register(
            "steps",
            "Calls that change the node (unpack, install, permanent, downgrade, uninstall, after-gate, push, release, rebind), by kind and result: changed, unchanged, refused or failed",
            m.steps.clone(),
        );
        r.register_with_unit(
            "step_duration",
            "Duration of the driver work of a step that ran, by kind",
            Unit::Seconds,
            m.step_duration.clone(),
        );
        r.register_with_unit(
            "activation_duration",
            "Duration of the activation hooks run by steps that switched the running release (the EMQX script, for the EMQX driver)",
            Unit::Seconds,
            m.activation_duration.clone(),
        );
        r.register(
            "health_probes",
            "Health checks answered (the coordinators' health gate), by result: healthy or unhealthy",
            m.probes.clone(),
        );
        r.register_with_unit(
            "health_probe_duration",
            "Latency of the health checks",
            Unit::Seconds,
            m.probe_duration.clone(),
        );
        r.register(
            "fence_refusals",
            "Calls refused by the fence rules, by reason (a deposed coordinator, another cluster, a held node, a passed deadline, a role that may not fence)",
            m.fence_refusals.clone(),
        );
        r.register(
            "release_info",
            "The release this node runs (its version, and whether it is the permanent one); absent when none",
            m.release.clone(),
        );
        r.register(
            "relay_bytes",
            "Package bytes moved by peer relay: fetched from other agents while staging, or served to them",
            m.relay.clone(),
        );
        for direction in ["fetched", "served"] {
            m.relay
                .get_or_create(&Direction {
                    direction: direction.into(),
                })
                .inc_by(0);
        }
        for reason in FENCE_REFUSALS {
            m.fence_refusals
                .get_or_create(&Reason {
                    reason: reason.into(),
                })
                .inc_by(0);
        }
        // Failures that never happened still show, at 0, so that `increase()` in alerts sees
        // the first one.
        for kind in [
            "unpack",
            "install",
            "permanent",
            "downgrade",
            "uninstall",
            "push",
        ] {
            m.steps
                .get_or_create(&StepResult {
                    kind: kind.into(),
                    result: "failed".into(),
                })
                .inc_by(0);
        }
        for result in ["healthy", "unhealthy"] {
            m.probes
                .get_or_create(&ProbeResult {
                    result: result.into(),
                })
                .inc_by(0);
        }
        Metrics { registry: r, ..m }
    }

    /// Peer relay bytes, `direction` "fetched" or "served".
    pub fn relayed(&self, direction: &str, bytes: u64) {
        self.relay
            .get_or_create(&Direction {
                direction: direction.into(),
            })
            .inc_by(bytes);
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Counts one audited call from its audit verdict (`ok changed`, `ok unchanged`,
    /// `refused KIND: ...`, `failed KIND: ...`): every call is audited exactly once, so it is
    /// counted exactly once. `what` is the audit log's step (`install 4.2.1 permanent=false`).
    pub fn record_call(&self, what: &str, verdict: &str) {
        let kind = what.split_whitespace().next().unwrap_or("unknown");
        let (result, error_kind) = match verdict.split_once(' ') {
            // `ok changed hooks=...` names the hooks the step ran.
            Some(("ok", rest)) if rest.split(' ').next() == Some("changed") => ("changed", None),
            Some(("ok", _)) => ("unchanged", None),
            Some(("refused", rest)) => ("refused", rest.split(':').next()),
            Some(("failed", rest)) => ("failed", rest.split(':').next()),
            _ => ("failed", None),
        };
        self.steps
            .get_or_create(&StepResult {
                kind: kind.into(),
                result: result.into(),
            })
            .inc();
        if let Some(reason) = error_kind.filter(|k| FENCE_REFUSALS.contains(k)) {
            self.fence_refusals
                .get_or_create(&Reason {
                    reason: reason.into(),
                })
                .inc();
        }
    }

    /// The driver work of a step that ran, and its activation hook's run when it had one.
    pub fn observe_step(&self, kind: &str, seconds: f64, activation: Option<std::time::Duration>) {
        self.step_duration
            .get_or_create(&Kind { kind: kind.into() })
            .observe(seconds);
        if let Some(hook) = activation {
            self.activation_duration.observe(hook.as_secs_f64());
        }
    }

    pub fn observe_probe(&self, healthy: bool, seconds: f64) {
        let result = if healthy { "healthy" } else { "unhealthy" };
        self.probes
            .get_or_create(&ProbeResult {
                result: result.into(),
            })
            .inc();
        self.probe_duration.observe(seconds);
    }

    /// Sets the release info from the node's releases (at scrape time).
    pub fn set_releases(&self, versions: &[VersionEntry]) {
        self.release.clear();
        let find = |st| versions.iter().find(|e| e.state == st);
        let running = find(ReleaseState::Current)
            .map(|e| (e.version, false))
            .or_else(|| find(ReleaseState::Permanent).map(|e| (e.version, true)));
        if let Some((version, permanent)) = running {
            self.release
                .get_or_create(&Release {
                    version: version.to_string(),
                    permanent: permanent.to_string(),
                })
                .set(1);
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(m: &Metrics) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, m.registry()).unwrap();
        out
    }

    #[test]
    fn calls_are_counted_from_their_verdicts() {
        let m = Metrics::new();
        m.record_call("install 4.2.1 permanent=false", "ok changed");
        m.record_call("install 4.2.1 permanent=false", "ok unchanged");
        m.record_call("unpack 4.2.1", "refused stale-fence: fence 1/r1/2 is older");
        m.record_call(
            "downgrade 4.2.0",
            "failed activation: hook ended with exit code 1",
        );
        let t = text(&m);
        for line in [
            r#"orchestrator_agent_steps_total{kind="install",result="changed"} 1"#,
            r#"orchestrator_agent_steps_total{kind="install",result="unchanged"} 1"#,
            r#"orchestrator_agent_steps_total{kind="unpack",result="refused"} 1"#,
            r#"orchestrator_agent_steps_total{kind="downgrade",result="failed"} 1"#,
            r#"orchestrator_agent_fence_refusals_total{reason="stale-fence"} 1"#,
            r#"orchestrator_agent_fence_refusals_total{reason="held"} 0"#,
            r#"orchestrator_agent_steps_total{kind="uninstall",result="failed"} 0"#,
        ] {
            assert!(t.contains(line), "{line} missing from\n{t}");
        }
        // A failure that is not a fence rule is not a fence refusal.
        assert!(!t.contains(r#"reason="activation""#), "{t}");
    }

    #[test]
    fn the_release_info_names_the_running_release() {
        let m = Metrics::new();
        let e = |v: &str, state| VersionEntry {
            version: v.parse().unwrap(),
            state,
        };
        m.set_releases(&[
            e("4.2.0", ReleaseState::Permanent),
            e("4.2.1", ReleaseState::Current),
        ]);
        let t = text(&m);
        assert!(
            t.contains(r#"orchestrator_agent_release_info{version="4.2.1",permanent="false"} 1"#),
            "{t}"
        );
        m.set_releases(&[e("4.2.1", ReleaseState::Permanent)]);
        let t = text(&m);
        assert!(!t.contains(r#"version="4.2.0""#), "{t}");
        assert!(
            t.contains(r#"orchestrator_agent_release_info{version="4.2.1",permanent="true"} 1"#),
            "{t}"
        );
    }
}
