//! `rollout V --policy FILE`: the rollout options kept as a TOML file in version control.
//!
//! Keys are the rollout flags' long names (`batch-size = 2`, `min-healthy-time = "10s"`;
//! `batch_size` works too). A flag on the command line overrides the file's value. Unknown keys
//! are refused, so a typo never silently means the default.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use serde::Deserialize;

use crate::args::{RolloutArgs, parse_duration, parse_label_key, parse_node_count, parse_selector};

/// `2` or `"25%"`: a number of nodes as TOML writes it.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Count {
    Nodes(u32),
    Text(String),
}

impl Count {
    fn parse(self, key: &str) -> Result<orch_types::rollout::NodeCount> {
        let text = match self {
            Count::Nodes(n) => n.to_string(),
            Count::Text(t) => t,
        };
        parse_node_count(&text).map_err(|e| anyhow!("{key}: {e}"))
    }
}

/// `{ zone = "a", role = "web" }` or `"zone=a,role=web"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Labels {
    Table(std::collections::BTreeMap<String, String>),
    Text(String),
}

/// What a policy file may set: every rollout option, none of the per-invocation ones
/// (`--package`, `--detach`, `--dry-run`, `--json`, the coordinators).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Policy {
    #[serde(alias = "nodes")]
    pub nodes: Option<Vec<String>>,
    #[serde(alias = "batch_size")]
    pub batch_size: Option<Count>,
    #[serde(alias = "wave_by")]
    pub wave_by: Option<String>,
    pub selector: Option<Labels>,
    #[serde(alias = "max_unavailable")]
    pub max_unavailable: Option<Count>,
    #[serde(alias = "promote_each_wave")]
    pub promote_each_wave: Option<bool>,
    pub canary: Option<u32>,
    /// `permanent = false` is `--no-permanent`.
    pub permanent: Option<bool>,
    #[serde(alias = "min_healthy_time")]
    pub min_healthy_time: Option<String>,
    #[serde(alias = "healthy_deadline")]
    pub healthy_deadline: Option<String>,
    #[serde(alias = "on_failure")]
    pub on_failure: Option<String>,
    #[serde(alias = "preflight_timeout")]
    pub preflight_timeout: Option<String>,
    #[serde(alias = "failure_threshold")]
    pub failure_threshold: Option<u32>,
    #[serde(alias = "keep_releases")]
    pub keep_releases: Option<u32>,
    pub bake: Option<String>,
    #[serde(alias = "wave_pause")]
    pub wave_pause: Option<String>,
    #[serde(alias = "watch_after_commit")]
    pub watch_after_commit: Option<String>,
    #[serde(alias = "gate_prometheus")]
    pub gate_prometheus: Option<String>,
    /// `gate = ["QUERY", ...]` (or one query as a string): `--gate`.
    pub gate: Option<Queries>,
}

/// `["q1", "q2"]` or `"q1"`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Queries {
    Many(Vec<String>),
    One(String),
}

impl Policy {
    pub fn parse(text: &str) -> Result<Policy> {
        toml::from_str(text).map_err(|e| anyhow!("{}", e.to_string().trim_end()))
    }

    pub fn read(path: &Path) -> Result<Policy> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the policy file {}", path.display()))?;
        Policy::parse(&text).with_context(|| {
            format!(
                "the policy file {} is not a valid rollout policy (keys are the rollout flags' long names, e.g. batch-size = 2, bake = \"10m\")",
                path.display()
            )
        })
    }

    /// Fills in every option of `a` that its command line left unset.
    pub fn apply_to(self, a: &mut RolloutArgs) -> Result<()> {
        let dur = |key: &str, v: Option<String>| -> Result<Option<std::time::Duration>> {
            v.map(|s| parse_duration(&s).map_err(|e| anyhow!("{key}: {e}")))
                .transpose()
        };
        if a.nodes.is_empty()
            && let Some(n) = self.nodes
        {
            a.nodes = n;
        }
        if a.batch_size.is_none()
            && let Some(b) = self.batch_size
        {
            a.batch_size = Some(b.parse("batch-size")?);
        }
        if a.max_unavailable.is_none()
            && let Some(m) = self.max_unavailable
        {
            a.max_unavailable = Some(m.parse("max-unavailable")?);
        }
        if a.wave_by.is_none()
            && let Some(w) = self.wave_by
        {
            a.wave_by = Some(parse_label_key(&w).map_err(|e| anyhow!("wave-by: {e}"))?);
        }
        if a.selector.is_none()
            && let Some(s) = self.selector
        {
            let text = match s {
                Labels::Text(t) => t,
                Labels::Table(t) => t
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(","),
            };
            a.selector = Some(parse_selector(&text).map_err(|e| anyhow!("selector: {e}"))?);
        }
        if let Some(c) = self.canary {
            a.canary.get_or_insert(c);
        }
        if self.promote_each_wave == Some(true) {
            a.promote_each_wave = true;
        }
        if self.permanent == Some(false) {
            a.no_permanent = true;
        }
        let t = dur("min-healthy-time", self.min_healthy_time)?;
        a.min_healthy_time = a.min_healthy_time.or(t);
        let t = dur("healthy-deadline", self.healthy_deadline)?;
        a.healthy_deadline = a.healthy_deadline.or(t);
        if let Some(f) = self.on_failure {
            a.on_failure.get_or_insert(f);
        }
        let t = dur("preflight-timeout", self.preflight_timeout)?;
        a.preflight_timeout = a.preflight_timeout.or(t);
        a.failure_threshold = a.failure_threshold.or(self.failure_threshold);
        a.keep_releases = a.keep_releases.or(self.keep_releases);
        let t = dur("bake", self.bake)?;
        a.bake = a.bake.or(t);
        let t = dur("wave-pause", self.wave_pause)?;
        a.wave_pause = a.wave_pause.or(t);
        let t = dur("watch-after-commit", self.watch_after_commit)?;
        a.watch_after_commit = a.watch_after_commit.or(t);
        a.gate_prometheus = a.gate_prometheus.take().or(self.gate_prometheus);
        // The queries go together: any --gate on the command line replaces the file's list.
        if a.gates.is_empty() {
            a.gates = match self.gate {
                Some(Queries::Many(q)) => q,
                Some(Queries::One(q)) => vec![q],
                None => Vec::new(),
            };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_the_flags_names_in_either_spelling() {
        let p = Policy::parse(
            "nodes = [\"n1\", \"n2\"]\nbatch-size = 2\ncanary = 1\npermanent = false\n\
             min_healthy_time = \"10s\"\nhealthy-deadline = \"5m\"\non-failure = \"pause\"\n\
             failure-threshold = 5\nkeep-releases = 0\nbake = \"10m\"\n\
             wave-pause = \"30s\"\nwatch_after_commit = \"5m\"\n",
        )
        .unwrap();
        assert_eq!(p.wave_pause.as_deref(), Some("30s"));
        assert_eq!(p.watch_after_commit.as_deref(), Some("5m"));
        assert!(matches!(p.batch_size, Some(Count::Nodes(2))));
        assert_eq!(p.min_healthy_time.as_deref(), Some("10s"));
        assert_eq!(p.keep_releases, Some(0));
        assert_eq!(p.permanent, Some(false));
    }

    #[test]
    fn waves_selector_and_bounds_take_numbers_percentages_and_tables() {
        let p = Policy::parse(
            "wave-by = \"zone\"\nbatch-size = \"50%\"\nmax-unavailable = 1\n\
             selector = { role = \"web\", tier = \"edge\" }\n",
        )
        .unwrap();
        assert!(matches!(&p.batch_size, Some(Count::Text(t)) if t == "50%"));
        assert!(matches!(p.max_unavailable, Some(Count::Nodes(1))));
        assert!(matches!(&p.selector, Some(Labels::Table(t)) if t.len() == 2));
        let p = Policy::parse("selector = \"role=web\"\nbatch-size = \"150%\"\n").unwrap();
        let e = p
            .batch_size
            .unwrap()
            .parse("batch-size")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("batch-size: "), "{e}");
    }

    #[test]
    fn metric_gates_take_a_list_or_one_query() {
        let p = Policy::parse(
            "gate-prometheus = \"http://127.0.0.1:9090\"\n\
             gate = [\"sum(up{node=\\\"$node\\\"}) > 0\", \"vector(1)\"]\n",
        )
        .unwrap();
        assert_eq!(p.gate_prometheus.as_deref(), Some("http://127.0.0.1:9090"));
        assert!(
            matches!(&p.gate, Some(Queries::Many(q)) if q.len() == 2 && q[0] == "sum(up{node=\"$node\"}) > 0")
        );
        let p =
            Policy::parse("gate_prometheus = \"http://p:9090\"\ngate = \"vector(1)\"\n").unwrap();
        assert!(matches!(&p.gate, Some(Queries::One(q)) if q == "vector(1)"));
    }

    fn rollout_args(argv: &[&str]) -> RolloutArgs {
        use clap::Parser;
        let cli = crate::args::Cli::try_parse_from(
            ["orchestrator", "rollout", "4.2.1"].iter().chain(argv),
        )
        .unwrap();
        match cli.command {
            crate::args::Command::Rollout(a) => a,
            other => panic!("not a rollout: {other:?}"),
        }
    }

    #[test]
    fn gate_flags_override_the_files_server_and_whole_query_list() {
        let file = "gate-prometheus = \"http://file:9090\"\ngate = [\"a\", \"b\"]\n";
        let mut a = rollout_args(&[]);
        Policy::parse(file).unwrap().apply_to(&mut a).unwrap();
        assert_eq!(a.gate_prometheus.as_deref(), Some("http://file:9090"));
        assert_eq!(a.gates, ["a", "b"]);
        let mut a = rollout_args(&["--gate", "c", "--gate-prometheus", "http://flag:9090"]);
        Policy::parse(file).unwrap().apply_to(&mut a).unwrap();
        assert_eq!(a.gate_prometheus.as_deref(), Some("http://flag:9090"));
        assert_eq!(a.gates, ["c"]);
    }

    #[test]
    fn a_typo_is_refused_with_the_key() {
        let e = Policy::parse("batch-sise = 2\n").unwrap_err().to_string();
        assert!(e.contains("batch-sise"), "{e}");
        let e = Policy::parse("canary = \"two\"\n").unwrap_err().to_string();
        assert!(
            e.contains("canary = \"two\"") && e.contains("expected u32"),
            "{e}"
        );
    }
}
