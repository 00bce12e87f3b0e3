//! What the demo does with its cluster: wait for it to form, keep a client load on every
//! service, roll the good release out and (optionally) a broken one that is rolled back.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use orch_client::{Client, control as pb};
use orch_demo_service::load::{Load, LoadConfig};
use orch_release::{Limits, package};
use orch_types::Version;

use crate::{DemoCluster, DemoError, Report};

/// How one of the demo's rollouts ended.
#[derive(Debug, Clone)]
pub struct RolloutSummary {
    pub id: String,
    pub version: Version,
    /// The terminal phase (`succeeded`, `rolled_back`, ...).
    pub phase: String,
    /// From the rollout's start until its end.
    pub took: Duration,
}

/// What the demo showed.
#[derive(Debug, Clone)]
pub struct DemoOutcome {
    /// The good rollout, then the broken one (when run).
    pub rollouts: Vec<RolloutSummary>,
    /// Requests answered and failed by the demo services during the rollouts.
    pub served: u64,
    pub failures: u64,
}

fn is_terminal(phase: &str) -> bool {
    matches!(
        phase,
        "succeeded" | "rolled_back" | "rollback_failed" | "aborted"
    )
}

impl DemoCluster {
    /// Waits for the cluster, then runs the rollouts under client load. `shutdown` resolving
    /// (Ctrl-C) ends it with [`DemoError::Interrupted`]; the cluster keeps running until
    /// [`DemoCluster::stop`] or drop.
    pub async fn run(
        &self,
        report: &mut dyn FnMut(Report<'_>),
        shutdown: impl Future<Output = ()>,
    ) -> Result<DemoOutcome, DemoError> {
        tokio::select! {
            r = self.scenario(report) => r,
            () = shutdown => Err(DemoError::Interrupted),
        }
    }

    async fn scenario(&self, report: &mut dyn FnMut(Report<'_>)) -> Result<DemoOutcome, DemoError> {
        let mut c = self.client()?;
        self.wait_formed(&mut c, report).await?;
        // Client load on every service for the whole of the rollouts.
        let loads: Vec<Load> = self
            .services
            .iter()
            .map(|a| Load::start(LoadConfig::new(*a)))
            .collect();
        let mut rollouts = Vec::new();
        let mut result = Ok(());
        for (version, pkg) in self.packages.clone() {
            let broken = version == crate::V_BROKEN;
            match self.rollout(&mut c, version, &pkg, broken, report).await {
                Ok(s) => rollouts.push(s),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        let (mut served, mut failures) = (0, 0);
        for l in loads {
            let r = l.stop().await;
            served += r.served;
            failures += r.failures;
        }
        result?;
        let nodes = c
            .nodes(true)
            .await
            .map_err(DemoError::client("list the demo nodes"))?;
        report(Report::Nodes { nodes: &nodes });
        report(Report::Load { served, failures });
        Ok(DemoOutcome {
            rollouts,
            served,
            failures,
        })
    }

    /// Waits (bounded) for a leader and every agent's registration.
    async fn wait_formed(
        &self,
        c: &mut Client,
        report: &mut dyn FnMut(Report<'_>),
    ) -> Result<(), DemoError> {
        let start = Instant::now();
        let want = self.config.nodes as usize;
        // Each call retries on its own while no leader is elected; bound it by the wait.
        c.patience = self.config.form_timeout;
        loop {
            let registered = c.nodes(false).await.map(|n| n.len()).unwrap_or(0);
            if registered == want {
                break;
            }
            if start.elapsed() > self.config.form_timeout {
                return Err(DemoError::NotFormed {
                    registered,
                    nodes: self.config.nodes,
                    waited: self.config.form_timeout,
                    logs: self.config.dir.clone(),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let st = c
            .cluster_status()
            .await
            .map_err(DemoError::client("ask the demo coordinators who leads"))?;
        report(Report::Ready {
            leader: st.leader_id,
            term: st.term,
            nodes: self.config.nodes,
        });
        Ok(())
    }

    /// Uploads `pkg`, rolls it out and follows it to its end. The good rollout must succeed,
    /// the broken one must be rolled back; anything else is an error.
    async fn rollout(
        &self,
        c: &mut Client,
        version: Version,
        pkg: &Path,
        broken: bool,
        report: &mut dyn FnMut(Report<'_>),
    ) -> Result<RolloutSummary, DemoError> {
        let min_healthy = self.config.min_healthy_time;
        let info = package::verify(pkg, None, Some(version), &Limits::default()).map_err(
            DemoError::release(format!("check the demo package {}", pkg.display())),
        )?;
        report(Report::RolloutStarting {
            version,
            package: pkg,
            min_healthy_time: min_healthy,
            broken,
        });
        let header = pb::UploadHeader {
            name: info.name.clone(),
            version: info.version.to_string(),
            sha256: info.sha256.clone(),
            size: info.size,
            signature: Vec::new(),
        };
        c.upload(pkg, header)
            .await
            .map_err(DemoError::client(format!("upload {}", pkg.display())))?;
        let start = Instant::now();
        let started = c
            .start_rollout(pb::StartRolloutRequest {
                version: version.to_string(),
                package_sha256: info.sha256.clone(),
                min_healthy_time_ms: Some(min_healthy.as_millis() as u64),
                requested_by: "orchestrator demo".into(),
                ..Default::default()
            })
            .await
            .map_err(DemoError::client(format!("start the rollout of {version}")))?;
        report(Report::RolloutStarted { id: &started.id });
        let mut steps = StepClock::default();
        let mut printed = 0;
        let fin = c
            .follow(
                &started.id,
                |s| {
                    for e in s.events.iter().skip(printed) {
                        let step = steps.step(e);
                        report(Report::Event { event: e, step });
                    }
                    printed = printed.max(s.events.len());
                },
                is_terminal,
            )
            .await
            .map_err(DemoError::client(format!("follow rollout {}", started.id)))?;
        let took = start.elapsed();
        report(Report::RolloutEnded { status: &fin, took });
        let expected = if broken { "rolled_back" } else { "succeeded" };
        if fin.phase != expected {
            return Err(DemoError::RolloutOutcome {
                id: fin.id,
                version: fin.version,
                phase: fin.phase,
                error: fin.error,
                logs: self.config.dir.clone(),
            });
        }
        Ok(RolloutSummary {
            id: fin.id,
            version,
            phase: fin.phase,
            took,
        })
    }
}

/// How long each node's steps took: the time between a node's consecutive events (its first
/// one counts from the rollout's first event).
#[derive(Default)]
struct StepClock {
    first_ms: Option<u64>,
    last_by_node: HashMap<String, u64>,
}

impl StepClock {
    /// The time since this event's node's previous event; `None` for events about no node.
    fn step(&mut self, e: &pb::AuditEvent) -> Option<Duration> {
        let first = *self.first_ms.get_or_insert(e.at_ms);
        let node = event_node(&e.message)?;
        let prev = self
            .last_by_node
            .insert(node.to_string(), e.at_ms)
            .unwrap_or(first);
        Some(Duration::from_millis(e.at_ms.saturating_sub(prev)))
    }
}

/// The node an event is about: its message starts `ID: ` (node ids have no spaces).
fn event_node(message: &str) -> Option<&str> {
    let (head, _) = message.split_once(": ")?;
    (!head.is_empty() && !head.contains(' ')).then_some(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(at_ms: u64, message: &str) -> pb::AuditEvent {
        pb::AuditEvent {
            at_ms,
            message: message.into(),
            ..Default::default()
        }
    }

    #[test]
    fn steps_are_timed_per_node() {
        let mut c = StepClock::default();
        assert_eq!(
            c.step(&ev(1_000, "rollout 1 started: 4.2.1 on 2 nodes")),
            None
        );
        assert_eq!(
            c.step(&ev(1_500, "n1: staged 4.2.1")),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            c.step(&ev(1_700, "n2: staged 4.2.1")),
            Some(Duration::from_millis(700))
        );
        assert_eq!(
            c.step(&ev(4_500, "n1: healthy on 4.2.1")),
            Some(Duration::from_millis(3_000))
        );
    }

    #[test]
    fn node_of_event() {
        assert_eq!(event_node("n1: staged 4.2.1"), Some("n1"));
        assert_eq!(event_node("all 3 nodes upgraded and healthy; x: y"), None);
        assert_eq!(event_node("no colon here"), None);
    }
}
