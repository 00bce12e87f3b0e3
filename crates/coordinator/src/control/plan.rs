//! Planning a rollout before it exists: the preflight behind `rollout --dry-run`
//! (`PlanRollout`), and the one `StartRollout` runs on the leader before anything is written to
//! the Raft log, so that a refused rollout leaves no trace in the history.
//!
//! Preflight here is the driver's own (`agents::perform` of a `Preflight` action: the agent's
//! `Versions` and `NodeInfo`, both reads, unfenced and unaudited), and the plan is the rollout
//! machine's own planning on the answers (`orch_rollout::plan`). Nothing is recorded and no
//! agent state changes.

use std::collections::BTreeMap;
use std::time::Duration;

use orch_proto::agent as apb;
use orch_proto::control as pb;
use orch_rollout::{Action, ActionKind, ActionResult, Plan};
use orch_types::rollout::{PackageRef, RolloutSpec};
use orch_types::{NodeId, Version};
use tonic::Status;

use super::{ControlService, bad, shown};
use crate::agents::{ActionCtx, Budgets, CallError, UNKNOWN_ACTIVATE_TIMEOUT, perform};

impl ControlService {
    /// Refuses at once what applying the rollout would refuse (another rollout runs, a node is
    /// not registered, the package is not stored), before any agent is asked.
    pub(super) fn precheck(&self, spec: &RolloutSpec) -> Result<(), Status> {
        match self.shared.read(|s| s.refuse_rollout(spec)) {
            Some(why) => Err(Status::failed_precondition(why)),
            None => Ok(()),
        }
    }

    /// Every node's preflight answer, all asked at once, each within the spec's preflight
    /// timeout. A node that cannot be asked answers `Failed`, saying why.
    async fn preflight_answers(&self, spec: &RolloutSpec) -> BTreeMap<NodeId, ActionResult> {
        let preflight = Duration::from_millis(spec.preflight_timeout_ms);
        let (cluster_id, agents) = self.shared.read(|s| {
            let agents: Vec<_> = spec
                .nodes
                .iter()
                .map(|n| {
                    let agent = s.nodes.get(n).map(|r| {
                        let activate = match r.activate_timeout_ms {
                            0 => UNKNOWN_ACTIVATE_TIMEOUT,
                            ms => Duration::from_millis(ms),
                        };
                        (r.address.clone(), activate)
                    });
                    (n.clone(), agent)
                })
                .collect();
            (s.cluster_id.clone().unwrap_or_default(), agents)
        });
        let asks = agents.into_iter().map(|(node, agent)| {
            let cluster_id = cluster_id.clone();
            async move {
                let Some((address, activate)) = agent else {
                    let error = format!("node {node} is not registered");
                    return (node, ActionResult::Failed { error });
                };
                let cx = ActionCtx {
                    pool: &self.shared.agents,
                    blobs: &self.shared.blobs,
                    address: &address,
                    // Preflight sends no fence; the cluster id is what the agent's is checked
                    // against.
                    fence: apb::Fence {
                        cluster_id,
                        ..Default::default()
                    },
                    package: None,
                    budgets: Budgets {
                        preflight,
                        activate,
                    },
                    liveness: None,
                    metric_gates: None,
                    metrics: &self.shared.metrics,
                    gates: &self.shared.gates,
                };
                let action = Action {
                    seq: 0,
                    node: node.clone(),
                    kind: ActionKind::Preflight,
                };
                let result = match perform(&cx, &action).await {
                    Ok((r, _)) => r,
                    Err(
                        CallError::Step(error)
                        | CallError::Refused(error)
                        | CallError::Stale(error),
                    ) => ActionResult::Failed { error },
                };
                (node, result)
            }
        });
        // In order, at most CALLS_AT_ONCE at a time (each holds a connection to its agent).
        use futures::StreamExt;
        let answers: Vec<_> = futures::stream::iter(asks)
            .buffered(crate::agents::CALLS_AT_ONCE)
            .collect()
            .await;
        answers.into_iter().collect()
    }

    /// The plan of a rollout of `spec`: preflight run for real, planned by the rollout machine.
    pub(super) async fn plan_of(&self, spec: &RolloutSpec) -> Result<Plan, Status> {
        // Before any agent is asked: the preflight timeout becomes a deadline, and only a
        // valid spec bounds it.
        spec.validate().map_err(|e| bad(e.to_string()))?;
        let answers = self.preflight_answers(spec).await;
        orch_rollout::plan(spec.clone(), &answers).map_err(|e| bad(e.to_string()))
    }

    /// Before `StartRollout` proposes the rollout: refuses it, with nothing recorded, when it
    /// could not be created or preflight refuses it. A retry of a request already applied is
    /// not checked again (its rollout is now the running one): the log answers it.
    pub(super) async fn refuse_before_recording(
        &self,
        spec: &RolloutSpec,
        request_id: &str,
    ) -> Result<(), Status> {
        if !request_id.is_empty() && self.shared.read(|s| s.requests.get(request_id).is_some()) {
            return Ok(());
        }
        if !self.shared.raft.is_leader() {
            // The client retries at the leader, which checks.
            return Err(crate::error::Error::NotLeader {
                leader: self.shared.raft.leader(),
            }
            .into());
        }
        self.precheck(spec)?;
        let plan = self.plan_of(spec).await?;
        match plan.refusal {
            None => Ok(()),
            Some(why) => Err(Status::failed_precondition(format!(
                "rollout of {} refused by preflight, nothing was recorded: {why}",
                spec.version
            ))),
        }
    }

    /// A package the client checked and did not upload, for a plan: its name and version must
    /// be the rollout's, its digest well formed and, with trusted keys, its signature valid.
    pub(super) fn unstored_package(
        &self,
        h: &pb::UploadHeader,
        version: Version,
    ) -> Result<PackageRef, Status> {
        orch_types::validate_package_name(&h.name).map_err(|e| bad(e.to_string()))?;
        let v: Version = h
            .version
            .parse()
            .map_err(|e: orch_types::ParseError| bad(e.to_string()))?;
        if v != version {
            return Err(bad(format!("the package holds version {v}, not {version}")));
        }
        let sha = orch_package::digest::normalize_digest(&h.sha256).ok_or_else(|| {
            bad(format!(
                "package digest {} is not a hex SHA-256 digest",
                shown(&h.sha256)
            ))
        })?;
        let sig = (!h.signature.is_empty()).then_some(h.signature.as_slice());
        self.shared
            .blobs
            .check_signature(&format!("{}-{v}.zip", h.name), sig, &sha)?;
        Ok(PackageRef {
            name: h.name.clone(),
            version: v,
            sha256: sha,
            size: h.size,
        })
    }
}

/// The reply for a plan (`None`: preflight was not run).
pub(super) fn plan_reply(spec: &RolloutSpec, plan: Option<Plan>, signed: bool) -> pb::RolloutPlan {
    let (nodes, batches, refusal) = match &plan {
        None => (Vec::new(), Vec::new(), String::new()),
        Some(p) => (
            p.nodes
                .iter()
                .map(|n| pb::PlannedNode {
                    id: n.id.to_string(),
                    from_version: n.from.map(|v| v.to_string()).unwrap_or_default(),
                    to_version: n.to.to_string(),
                    action: n.action.as_str().to_string(),
                    detail: n.detail.clone(),
                })
                .collect(),
            p.batches
                .iter()
                .map(|b| pb::PlannedBatch {
                    canary: b.canary,
                    nodes: b.nodes.iter().map(|n| n.to_string()).collect(),
                    wave: b.wave.clone().unwrap_or_default(),
                })
                .collect(),
            p.refusal.clone().unwrap_or_default(),
        ),
    };
    let package = spec.package.as_ref();
    pb::RolloutPlan {
        version: spec.version.to_string(),
        nodes,
        batches,
        refusal,
        package: package.map_or(String::new(), |p| format!("{}-{}.zip", p.name, p.version)),
        package_sha256: package.map_or(String::new(), |p| p.sha256.clone()),
        package_size: package.map_or(0, |p| p.size),
        package_signed: signed,
        batch_size: spec.batch_size,
        canary: spec.canary,
        permanent: spec.permanent,
        on_failure: spec.on_failure.to_string(),
        preflight_run: plan.is_some(),
        policy: Some(super::status::policy_of(spec)),
    }
}
