//! A rollout's plan before it exists (`rollout --dry-run`, and the refusal `StartRollout` gives
//! before anything is recorded): the machine itself is run through its preflight on the
//! answers given, so the plan shown is exactly what a real rollout with those answers does.

use std::collections::BTreeMap;

use super::*;

/// What a rollout would do to one node, as its preflight decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeAction {
    /// The target is not on the node: push and unpack it, install, health gate, commit.
    Stage,
    /// The target is on its disk (`unpacked` or `old`): install, health gate, commit.
    Install,
    /// It already runs the target, not permanently: health gate, commit.
    Adopt,
    /// The target is its permanent release behind another current one: downgrade to it, gate.
    SwitchBack,
    /// Already where the rollout would leave it: left alone.
    Skip,
    /// Preflight refuses this node (unreachable, not a patch hop, no disk space, ...): the
    /// whole rollout would be refused.
    Refused,
}

impl NodeAction {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeAction::Stage => "stage",
            NodeAction::Install => "install",
            NodeAction::Adopt => "adopt",
            NodeAction::SwitchBack => "switch_back",
            NodeAction::Skip => "skip",
            NodeAction::Refused => "refused",
        }
    }
}

/// One node of a [`Plan`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedNode {
    pub id: NodeId,
    /// The release it runs, when preflight learned it.
    pub from: Option<Version>,
    pub to: Version,
    pub action: NodeAction,
    /// Preflight's sentence about the node, as the rollout's audit trail would record it
    /// (without the leading node id): the plan in words, why it is skipped, or why refused.
    pub detail: String,
}

/// One upgrade batch of a [`Plan`], in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedBatch {
    /// Part of the canary: the rollout waits for `promote` after the last canary batch.
    pub canary: bool,
    pub nodes: Vec<NodeId>,
    /// The value of the `wave_by` label its nodes share (`None` without waves).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave: Option<String>,
}

/// What a rollout of a spec would do, given every node's preflight answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub version: Version,
    /// Every node, in the spec's order.
    pub nodes: Vec<PlannedNode>,
    /// The upgrade batches in order (skipped nodes are in none); empty when refused.
    pub batches: Vec<PlannedBatch>,
    /// Why preflight refuses the rollout (naming each failing node); `None`: it would run.
    pub refusal: Option<String>,
}

impl Plan {
    pub fn is_acceptable(&self) -> bool {
        self.refusal.is_none()
    }
}

/// The plan of a rollout of `spec` whose nodes answer preflight with `answers`
/// ([`ActionResult::Preflight`], or [`ActionResult::Failed`] for a node that could not be
/// asked). A node without an answer counts as failed. Pure: the rollout machine is run through
/// its preflight on these answers and read back, so nothing here can disagree with it.
pub fn plan(
    spec: RolloutSpec,
    answers: &BTreeMap<NodeId, ActionResult>,
) -> Result<Plan, SpecError> {
    let mut r = Rollout::new(spec)?;
    // Cannot be rejected: a new rollout's first `IssueActions` issues every node's preflight.
    let _ = r.apply(&Event::IssueActions, 0, "plan");
    for action in r.in_flight().to_vec() {
        let result = match answers.get(&action.node) {
            Some(a @ (ActionResult::Preflight { .. } | ActionResult::Failed { .. })) => a.clone(),
            Some(other) => ActionResult::Failed {
                error: format!("not a preflight answer: {other:?}"),
            },
            None => ActionResult::Failed {
                error: "no preflight answer".to_string(),
            },
        };
        // A rejection leaves the node pending; it is then shown as refused below.
        let _ = r.apply(
            &Event::Result {
                seq: action.seq,
                result,
            },
            0,
            "plan",
        );
    }
    Ok(r.preview())
}

impl Rollout {
    /// The plan as this rollout's preflight left it (see [`plan`]).
    fn preview(&self) -> Plan {
        let refused = self.phase == Phase::Aborted;
        let nodes = self
            .nodes
            .iter()
            .map(|n| {
                let id = n.id().clone();
                let action = match n.step() {
                    NodeStep::Skipped => NodeAction::Skip,
                    NodeStep::PreflightOk | NodeStep::Staged | NodeStep::Installed => {
                        match n.route {
                            Route::Stage => NodeAction::Stage,
                            Route::Install => NodeAction::Install,
                            Route::Adopt => NodeAction::Adopt,
                            Route::SwitchBack => NodeAction::SwitchBack,
                        }
                    }
                    _ => NodeAction::Refused,
                };
                let prefix = format!("{id}: ");
                let detail = self
                    .events
                    .iter()
                    .rev()
                    .find_map(|e| e.message.strip_prefix(&prefix))
                    .map(str::to_string)
                    .or_else(|| n.progress.error.clone())
                    .unwrap_or_else(|| "no preflight answer".to_string());
                PlannedNode {
                    id,
                    from: n.progress.from_version,
                    to: self.spec.version,
                    action,
                    detail,
                }
            })
            .collect();
        let batches = if refused {
            Vec::new()
        } else {
            self.batches()
                .into_iter()
                .map(|(after_canary, b)| PlannedBatch {
                    canary: self.spec.canary > 0 && !after_canary,
                    nodes: b.iter().map(|&i| self.nodes[i].id().clone()).collect(),
                    wave: b.first().and_then(|&i| {
                        self.spec
                            .waves
                            .get(self.wave_of(i))
                            .map(|w| w.label_value.clone())
                    }),
                })
                .collect()
        };
        Plan {
            version: self.spec.version,
            nodes,
            batches,
            refusal: refused.then(|| {
                self.error
                    .clone()
                    .unwrap_or_else(|| "preflight refused the rollout".to_string())
            }),
        }
    }
}
