//! Watching an agent while a step runs (pings), and health gates.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use orch_proto::agent::{self as pb, agent_client::AgentClient};
use orch_rollout::ActionResult;
use orch_types::rollout::MetricGates;
use orch_types::{NodeId, Version};
use tonic::transport::Channel;

use super::metric_gate;
use super::{
    ActionCtx, PING_AFTER, PING_EVERY, PING_TIMEOUT, PROBE_INTERVAL, PROBE_TIMEOUT, answered,
    kind_of,
};
use crate::driver::now_ms;
use crate::state::Unresponsive;

/// Runs a step call while pinging its agent (after [`PING_AFTER`], every [`PING_EVERY`]):
/// an agent that stops answering pings is reported unresponsive, since the first unanswered
/// ping, and responsive again when it answers. `NodeInfo` never waits for a step, so a busy
/// agent still answers; a frozen or cut-off one does not.
pub(super) async fn watched<T>(
    cx: &ActionCtx<'_>,
    node: &NodeId,
    c: &AgentClient<Channel>,
    call: impl Future<Output = T>,
) -> T {
    let Some(report) = cx.liveness.clone() else {
        return call.await;
    };
    tokio::pin!(call);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + PING_AFTER, PING_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut since: Option<u64> = None;
    loop {
        tokio::select! {
            r = &mut call => return r,
            _ = tick.tick() => {
                let sent = now_ms();
                let mut c = c.clone();
                let mut req = tonic::Request::new(pb::NodeInfoRequest {});
                req.set_timeout(PING_TIMEOUT);
                let detail = match tokio::time::timeout(PING_TIMEOUT, c.node_info(req)).await {
                    Ok(Ok(_)) => None,
                    Ok(Err(s)) => Some(format!("ping failed: {}", s.message())),
                    Err(_) => Some(format!("no answer to a ping within {PING_TIMEOUT:?}")),
                };
                match detail {
                    None => {
                        if since.take().is_some() {
                            report(node, None);
                        }
                    }
                    Some(detail) => {
                        let since_ms = *since.get_or_insert(sent);
                        report(node, Some(Unresponsive { since_ms, detail }));
                    }
                }
            }
        }
    }
}

/// The leader's volatile view of the health gates it runs: per node, since when its probes have
/// seen it healthy without a break. Only the prober knows this (it is not replicated, and the
/// rollout machine has no clock): `status` shows it when the leader answers; a follower leaves
/// it out and the views fall back to the time in step.
#[derive(Debug)]
pub struct GateBoard {
    /// Node -> healthy since (ms since the epoch), 0 while not healthy; present while a gate
    /// of this coordinator probes the node.
    healthy_since: Mutex<HashMap<NodeId, u64>>,
    /// Bumped on every change, so that watchers send a new status.
    changed: tokio::sync::watch::Sender<u64>,
}

impl Default for GateBoard {
    fn default() -> Self {
        GateBoard {
            healthy_since: Mutex::default(),
            changed: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl GateBoard {
    /// `Some(since_ms)` while this coordinator probes `node`'s gate (`Some(0)`: not healthy).
    pub fn healthy_since(&self, node: &NodeId) -> Option<u64> {
        self.lock().get(node).copied()
    }

    /// Changes whenever a gate's progress does.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, u64>> {
        self.healthy_since.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, node: &NodeId, since: Option<u64>) {
        let before = match since {
            Some(ms) => self.lock().insert(node.clone(), ms),
            None => self.lock().remove(node),
        };
        if before != since {
            self.changed.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

/// One gate's run of healthy probes, published on the [`GateBoard`] (cleared when dropped).
struct Healthy<'a> {
    board: &'a GateBoard,
    node: &'a NodeId,
    since: Option<Instant>,
}

impl<'a> Healthy<'a> {
    fn start(board: &'a GateBoard, node: &'a NodeId) -> Self {
        board.set(node, Some(0));
        Healthy {
            board,
            node,
            since: None,
        }
    }

    /// A probe saw the node healthy: for how long now without a break.
    fn seen(&mut self) -> Duration {
        let (board, node) = (self.board, self.node);
        self.since
            .get_or_insert_with(|| {
                board.set(node, Some(now_ms()));
                Instant::now()
            })
            .elapsed()
    }

    /// The run of healthy probes broke.
    fn reset(&mut self) {
        if self.since.take().is_some() {
            self.board.set(self.node, Some(0));
        }
    }
}

impl Drop for Healthy<'_> {
    fn drop(&mut self) {
        self.board.set(self.node, None);
    }
}

/// What a health gate checks.
#[derive(Debug, Clone, Copy)]
pub(super) struct Gate {
    pub expect: Version,
    pub min_healthy: Duration,
    pub deadline: Duration,
    /// Consecutive probes answered "unhealthy" that fail the gate at once (0: never).
    pub failure_threshold: u32,
}

/// Tells the liveness watch whether the agent answered this probe: `unanswered` is what was
/// seen when it did not; `since` is when the agent stopped answering (kept across probes).
fn report_liveness(
    cx: &ActionCtx<'_>,
    node: &NodeId,
    since: &mut Option<u64>,
    sent: u64,
    unanswered: Option<String>,
) {
    match unanswered {
        None => {
            if since.take().is_some() {
                answered(cx, node);
            }
        }
        Some(detail) => {
            let since_ms = *since.get_or_insert(sent);
            if let Some(l) = &cx.liveness {
                l(node, Some(Unresponsive { since_ms, detail }));
            }
        }
    }
}

/// A gate's metric gates: evaluated on a probe the agent answered healthy, at most once per
/// [`METRIC_GATE_EVERY`] while they pass (fast probes reuse the last pass), on every such
/// probe after a failure (which comes a second apart anyway).
struct MetricCheck<'a> {
    gates: Option<&'a MetricGates>,
    passed_at: Option<Instant>,
}

/// How often passing metric gates are evaluated again.
const METRIC_GATE_EVERY: Duration = Duration::from_secs(1);

impl<'a> MetricCheck<'a> {
    fn new(gates: Option<&'a MetricGates>) -> Self {
        MetricCheck {
            gates,
            passed_at: None,
        }
    }

    /// `None` when every gate passes (or there are none), else what failed.
    async fn failing(&mut self, node: &NodeId, version: &Version) -> Option<String> {
        let gates = self.gates?;
        if self
            .passed_at
            .is_some_and(|t| t.elapsed() < METRIC_GATE_EVERY)
        {
            return None;
        }
        let started = Instant::now();
        let failed = metric_gate::failing(gates, node, version).await;
        self.passed_at = failed.is_none().then_some(started);
        failed
    }
}

/// After a probe answered "unhealthy", the next one waits this long, so that a failure
/// threshold counts about one failed probe a second (a service briefly busy right after its
/// hot switch is not failed by a burst of fast probes).
const PROBE_INTERVAL_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// The probe must pass continuously for `min_healthy` and report `expect`, within `deadline`;
/// `failure_threshold` probes in a row answered "unhealthy" fail it at once. A probe the agent
/// does not answer counts for neither (only the deadline governs an unreachable agent) and
/// tells the liveness watch. On the rollout's target, a probe the agent answered healthy must
/// also pass the metric gates ([`MetricCheck`]); a failing one counts as answered unhealthy.
pub(super) async fn health_gate(
    cx: &ActionCtx<'_>,
    node: &NodeId,
    c: &AgentClient<Channel>,
    gate: Gate,
) -> ActionResult {
    let Gate {
        expect,
        min_healthy,
        deadline,
        failure_threshold,
    } = gate;
    let start = Instant::now();
    let mut healthy = Healthy::start(cx.gates, node);
    let mut unanswered_since: Option<u64> = None;
    let mut failed_in_a_row = 0u32;
    let mut last = String::from("no probe answered yet");
    let target = cx.metric_gates.as_deref().filter(|t| t.target == expect);
    let mut metrics = MetricCheck::new(target.map(|t| &t.gates));
    loop {
        let sent = now_ms();
        let mut req = tonic::Request::new(pb::HealthRequest {
            expect_version: expect.to_string(),
        });
        req.set_timeout(PROBE_TIMEOUT);
        let mut client = c.clone();
        let probe = tokio::time::timeout(PROBE_TIMEOUT, client.health(req)).await;
        let unanswered = match probe {
            Ok(Ok(r)) => {
                let r = r.into_inner();
                // A failed metric gate counts like the agent answering unhealthy.
                let failing = match r.healthy {
                    true => metrics.failing(node, &expect).await,
                    false => Some(format!("{} check: {}", r.check, r.detail)),
                };
                if let Some(why) = failing {
                    healthy.reset();
                    failed_in_a_row += 1;
                    last = why;
                } else {
                    failed_in_a_row = 0;
                    if healthy.seen() >= min_healthy {
                        answered(cx, node);
                        return ActionResult::Done;
                    }
                }
                None
            }
            Ok(Err(s)) if kind_of(&s).is_some() => {
                healthy.reset();
                last = s.message().to_string();
                None
            }
            Ok(Err(s)) => Some(format!("agent unreachable: {}", s.message())),
            Err(_) => Some("health probe timed out".to_string()),
        };
        if let Some(detail) = &unanswered {
            healthy.reset();
            last = detail.clone();
        }
        report_liveness(cx, node, &mut unanswered_since, sent, unanswered);
        if failure_threshold > 0 && failed_in_a_row >= failure_threshold {
            return ActionResult::Failed {
                error: format!(
                    "unhealthy on {failed_in_a_row} probes in a row (failure threshold {failure_threshold}); last: {last}"
                ),
            };
        }
        if start.elapsed() >= deadline {
            return ActionResult::Failed {
                error: format!(
                    "not healthy on {expect} for {min_healthy:?} within {deadline:?}; last: {last}"
                ),
            };
        }
        let pause = if failed_in_a_row > 0 {
            PROBE_INTERVAL_AFTER_FAILURE
        } else {
            PROBE_INTERVAL
        };
        tokio::time::sleep(pause.min(deadline.saturating_sub(start.elapsed()))).await;
    }
}
