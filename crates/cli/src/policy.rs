//! `rollout V --policy FILE`: the rollout options kept as a TOML file in version control.
//!
//! Keys are the rollout flags' long names (`batch-size = 2`, `min-healthy-time = "10s"`;
//! `batch_size` works too). A flag on the command line overrides the file's value. Unknown keys
//! are refused, so a typo never silently means the default.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use serde::Deserialize;

use crate::args::{RolloutArgs, parse_duration};

/// What a policy file may set: every rollout option, none of the per-invocation ones
/// (`--package`, `--detach`, `--dry-run`, `--json`, the coordinators).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Policy {
    #[serde(alias = "nodes")]
    pub nodes: Option<Vec<String>>,
    #[serde(alias = "batch_size")]
    pub batch_size: Option<u32>,
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
        if let Some(b) = self.batch_size {
            if b == 0 {
                return Err(anyhow!("batch-size: must be at least 1"));
            }
            a.batch_size.get_or_insert(b);
        }
        if let Some(c) = self.canary {
            a.canary.get_or_insert(c);
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
             failure-threshold = 5\nkeep-releases = 0\nbake = \"10m\"\n",
        )
        .unwrap();
        assert_eq!(p.batch_size, Some(2));
        assert_eq!(p.min_healthy_time.as_deref(), Some("10s"));
        assert_eq!(p.keep_releases, Some(0));
        assert_eq!(p.permanent, Some(false));
    }

    #[test]
    fn a_typo_is_refused_with_the_key() {
        let e = Policy::parse("batch-sise = 2\n").unwrap_err().to_string();
        assert!(e.contains("batch-sise"), "{e}");
        let e = Policy::parse("batch-size = \"two\"\n").unwrap_err().to_string();
        assert!(e.contains("batch-size") || e.contains("integer"), "{e}");
    }
}
