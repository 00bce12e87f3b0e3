//! Performing one action on its node's agent: the step calls (preflight, stage, install,
//! commit, downgrade, prune), the package push, and the call after a passed health gate that
//! puts a drained node back in service. Health gates are in [`super::health`].

use std::future::Future;
use std::time::Duration;

use orch_proto::agent::{self as pb, agent_client::AgentClient};
use orch_rollout::{Action, ActionKind, ActionResult};
use orch_types::{NodeId, Version};
use tonic::transport::Channel;

use super::health::{Gate, health_gate, watched};
use super::{ActionCtx, Budgets, COMMIT_BUDGET, CallError, Deadline, Reported, answered, retrying};

pub type Performed = Result<(ActionResult, Option<Reported>), CallError>;

/// Performs one action; returns the result to record, the versions the node reported (to
/// refresh the registry), or `Stale` when the agent has seen a newer fence.
pub async fn perform(cx: &ActionCtx<'_>, action: &Action) -> Performed {
    let node = &action.node;
    let c = cx
        .pool
        .client(node.as_str(), cx.address)
        .map_err(|e| CallError::Step(orch_types::error_chain(&e)))?;
    // Each kind's future is boxed: unboxed, every action task is as large as the largest kind,
    // and preflight puts every node's task in flight at once (about 21 KB a task before, 12 KB
    // after, in the heap profile at 1,000 nodes in docs/benchmarks.md).
    match &action.kind {
        ActionKind::Preflight => Box::pin(preflight(cx, node, &c)).await,
        ActionKind::Stage { version } => Box::pin(stage(cx, node, &c, *version)).await,
        ActionKind::Install { version } => {
            let req = |fence| pb::InstallRequest {
                version: version.to_string(),
                permanent: false,
                fence,
                expected_sha256: String::new(),
                force: false,
            };
            let send = |mut c: Client, r| async move { c.install(r).await };
            Box::pin(step(cx, node, &c, Step::switch("install", cx), req, send)).await
        }
        ActionKind::Commit { version } => {
            let step_of = Step {
                what: "commit",
                why: "a state write",
                budget: COMMIT_BUDGET,
            };
            let send = |mut c: Client, r| async move { c.permanent(r).await };
            Box::pin(step(cx, node, &c, step_of, |f| vreq(*version, f), send)).await
        }
        ActionKind::Downgrade { to } => {
            let send = |mut c: Client, r| async move { c.downgrade(r).await };
            Box::pin(step(
                cx,
                node,
                &c,
                Step::switch("downgrade", cx),
                |f| vreq(*to, f),
                send,
            ))
            .await
        }
        ActionKind::HealthGate { .. } => {
            Box::pin(async {
                match probe_gate(cx, action).await {
                    Some(probed) => finish_gate(cx, action, probed).await,
                    // Not reached: the arm matched a health gate.
                    None => Ok((ActionResult::Done, None)),
                }
            })
            .await
        }
        ActionKind::Prune { keep, protect } => Box::pin(prune(cx, node, &c, *keep, protect)).await,
    }
}

type Client = AgentClient<Channel>;

/// A health gate's probing alone: reads, changes nothing, so it may run before the gate is
/// recorded as issued (the driver's early probes). [`finish_gate`] completes it once the gate
/// is issued. `None` for an action that is not a health gate.
pub async fn probe_gate(cx: &ActionCtx<'_>, action: &Action) -> Option<Performed> {
    let ActionKind::HealthGate {
        min_healthy_time_ms,
        healthy_deadline_ms,
        expect,
        failure_threshold,
    } = &action.kind
    else {
        return None;
    };
    let node = &action.node;
    let c = match cx.pool.client(node.as_str(), cx.address) {
        Ok(c) => c,
        Err(e) => return Some(Err(CallError::Step(orch_types::error_chain(&e)))),
    };
    let gate = Gate {
        expect: *expect,
        min_healthy: Duration::from_millis(*min_healthy_time_ms),
        deadline: Duration::from_millis(*healthy_deadline_ms),
        failure_threshold: *failure_threshold,
    };
    Some(Ok((health_gate(cx, node, &c, gate).await, None)))
}

/// Completes a passed health gate, which must be issued by now: the agent's post-step (drain)
/// hook ([`after_gate`]). Anything else is returned as it is.
pub async fn finish_gate(cx: &ActionCtx<'_>, action: &Action, probed: Performed) -> Performed {
    let (ActionKind::HealthGate { expect, .. }, Ok((ActionResult::Done, _))) =
        (&action.kind, &probed)
    else {
        return probed;
    };
    let node = &action.node;
    match cx.pool.client(node.as_str(), cx.address) {
        Ok(c) => after_gate(cx, node, &c, *expect).await,
        Err(e) => Err(CallError::Step(orch_types::error_chain(&e))),
    }
}

/// What a step call is, for its deadline and for the error when the agent does not answer.
struct Step {
    /// `install`, `commit`, ...
    what: &'static str,
    /// How its budget was chosen.
    why: &'static str,
    budget: Duration,
}

impl Step {
    /// A hot switch (install or downgrade): the agent's activation timeout plus a margin.
    fn switch(what: &'static str, cx: &ActionCtx<'_>) -> Step {
        Step {
            what,
            why: "the agent's activation timeout plus a margin",
            budget: cx.budgets.switch(),
        }
    }
}

/// One step call that answers a `StepReply` (install, commit, downgrade, unpack): the request
/// `req` builds around its fence goes out with `send`, retried on connection failures within
/// the step's deadline, while the agent is watched with pings.
async fn step<Req, Fut>(
    cx: &ActionCtx<'_>,
    node: &NodeId,
    c: &Client,
    step: Step,
    req: impl FnOnce(Option<pb::Fence>) -> Req,
    send: impl Fn(Client, tonic::Request<Req>) -> Fut,
) -> Performed
where
    Req: Clone,
    Fut: Future<Output = Result<tonic::Response<pb::StepReply>, tonic::Status>>,
{
    let d = Deadline::after(step.budget);
    let req = req(cx.fence(&d));
    let call = retrying(node, step.what, step.why, &d, || {
        send(c.clone(), d.request(req.clone()))
    });
    step_reply(cx, node, watched(cx, node, c, call).await)
}

/// A step's reply as a result (and the releases it reported); a refusal or failure on the
/// node is a `Failed` result, a stale fence goes back to the driver.
fn step_reply(
    cx: &ActionCtx<'_>,
    node: &NodeId,
    r: Result<tonic::Response<pb::StepReply>, CallError>,
) -> Performed {
    match r {
        Ok(reply) => {
            answered(cx, node);
            let reply = reply.into_inner();
            let reported = Reported::new(&reply.versions, reply.boot_id, reply.state_rev);
            Ok((ActionResult::Done, Some(reported)))
        }
        Err(CallError::Step(e)) => Ok((ActionResult::Failed { error: e }, None)),
        Err(CallError::Refused(e)) => {
            answered(cx, node);
            Ok((ActionResult::Refused { error: e }, None))
        }
        Err(s) => Err(s),
    }
}

/// After a passed health gate: tells the agent, which runs the post-step (drain) hook if a
/// switch drained the node (a no-op otherwise, so bake and repeated gates are harmless). A
/// failing hook fails the gate: the node is healthy but not back in service, and an operator
/// must know. An agent that does not know the call (an older one) runs no drain hooks.
async fn after_gate(cx: &ActionCtx<'_>, node: &NodeId, c: &Client, version: Version) -> Performed {
    let d = Deadline::after(cx.budgets.switch());
    let req = vreq(version, cx.fence(&d));
    let why = "the agent's activation timeout plus a margin";
    let call = retrying(node, "post-step hook", why, &d, || {
        let mut c = c.clone();
        let r = d.request(req.clone());
        async move {
            match c.after_gate(r).await {
                Err(s) if s.code() == tonic::Code::Unimplemented => Ok(None),
                r => r.map(Some),
            }
        }
    });
    match watched(cx, node, c, call).await {
        Ok(Some(reply)) => step_reply(cx, node, Ok(reply)),
        Ok(None) => Ok((ActionResult::Done, None)),
        Err(CallError::Stale(s)) => Err(CallError::Stale(s)),
        // Even a refusal (a deadline that passed) leaves the node drained: the gate failed.
        Err(CallError::Step(error) | CallError::Refused(error)) => {
            Ok((ActionResult::Failed { error }, None))
        }
    }
}

async fn preflight(cx: &ActionCtx<'_>, node: &NodeId, c: &AgentClient<Channel>) -> Performed {
    let d = Deadline::after(cx.budgets.preflight);
    let why = "the preflight timeout";
    let versions = retrying(node, "preflight", why, &d, || {
        let mut c = c.clone();
        let r = d.request(pb::VersionsRequest {});
        async move { c.versions(r).await }
    });
    let info = retrying(node, "preflight", why, &d, || {
        let mut c = c.clone();
        let r = d.request(pb::NodeInfoRequest {});
        async move { c.node_info(r).await }
    });
    let (v, i) = match tokio::join!(versions, info) {
        (Ok(v), Ok(i)) => (v.into_inner(), i.into_inner()),
        (Err(CallError::Stale(s)), _) | (_, Err(CallError::Stale(s))) => {
            return Err(CallError::Stale(s));
        }
        (Err(CallError::Step(e) | CallError::Refused(e)), _)
        | (_, Err(CallError::Step(e) | CallError::Refused(e))) => {
            return Ok((ActionResult::Failed { error: e }, None));
        }
    };
    answered(cx, node);
    let entries = Reported::new(&v.versions, v.boot_id, v.state_rev);
    // A node bound to another cluster would refuse every step: say so now, with nothing
    // touched, instead of failing at the first push.
    if !i.cluster_id.is_empty() && i.cluster_id != cx.cluster_id() {
        let error = format!(
            "the agent belongs to cluster {} but this cluster is {}; if the node really moved here, run `orchestrator node rebind --agent {}` (operator), else remove it from this rollout",
            i.cluster_id,
            cx.cluster_id(),
            cx.address
        );
        return Ok((ActionResult::Failed { error }, Some(entries)));
    }
    match v.running_version.parse::<Version>() {
        Ok(running) => Ok((
            ActionResult::Preflight {
                running,
                free_disk: i.free_disk_bytes,
                releases: entries.versions.clone(),
            },
            Some(entries),
        )),
        Err(_) => Ok((
            ActionResult::Failed {
                error: "no release is installed on the node".into(),
            },
            Some(entries),
        )),
    }
}

async fn stage(
    cx: &ActionCtx<'_>,
    node: &NodeId,
    c: &AgentClient<Channel>,
    version: Version,
) -> Performed {
    let size = cx.package.map_or(0, |p| p.size);
    if let Some(p) = cx.package {
        let d = Deadline::after(Budgets::push(size));
        let why = "a margin plus the package size at 4 MiB/s";
        let fence = cx.fence(&d);
        let call = retrying(node, "push", why, &d, || {
            let mut c = c.clone();
            let fence = fence.clone();
            let t = super::push::Target {
                node: node.as_str(),
                address: cx.address,
            };
            async move {
                super::push::push(&mut c, cx.blobs, cx.pool.seeds.as_ref(), &t, p, fence, &d).await
            }
        });
        match watched(cx, node, c, call).await {
            Ok((reply, sent)) => {
                if !reply.already {
                    cx.metrics.package_pushed.inc_by(sent);
                }
            }
            Err(CallError::Step(e)) => {
                let error = format!("push: {e}");
                return Ok((ActionResult::Failed { error }, None));
            }
            // A refused push wrote nothing: the release store is untouched.
            Err(CallError::Refused(e)) => {
                let error = format!("push: {e}");
                return Ok((ActionResult::Refused { error }, None));
            }
            Err(s) => return Err(s),
        }
    }
    let unpack = Step {
        what: "unpack",
        why: "a margin plus the package size at 16 MiB/s",
        budget: Budgets::unpack(size),
    };
    let req = |fence| pb::UnpackRequest {
        version: version.to_string(),
        fence,
        expected_sha256: String::new(),
        force: false,
    };
    let send = |mut c: Client, r| async move { c.unpack(r).await };
    step(cx, node, c, unpack, req, send).await
}

/// Housekeeping after a successful rollout: lists the node's releases, then uninstalls
/// (fenced, one state write each) every one `prune_candidates` picks. One that cannot be
/// removed is named in the answer and the others still go; only a node that cannot even be
/// listed fails the action.
async fn prune(
    cx: &ActionCtx<'_>,
    node: &NodeId,
    c: &Client,
    keep: u32,
    protect: &[Version],
) -> Performed {
    let why = "a state write";
    let d = Deadline::after(COMMIT_BUDGET);
    let listed = retrying(node, "prune", why, &d, || {
        let mut c = c.clone();
        let r = d.request(pb::VersionsRequest {});
        async move { c.versions(r).await }
    })
    .await;
    let v = match listed {
        Ok(v) => v.into_inner(),
        Err(CallError::Stale(s)) => return Err(CallError::Stale(s)),
        Err(CallError::Step(error) | CallError::Refused(error)) => {
            return Ok((ActionResult::Failed { error }, None));
        }
    };
    answered(cx, node);
    let mut reported = Reported::new(&v.versions, v.boot_id, v.state_rev);
    let (mut removed, mut failed) = (Vec::new(), Vec::new());
    for version in orch_rollout::prune_candidates(&reported.versions, keep as usize, protect) {
        let d = Deadline::after(COMMIT_BUDGET);
        let req = vreq(version, cx.fence(&d));
        let call = retrying(node, "uninstall", why, &d, || {
            let mut c = c.clone();
            let r = d.request(req.clone());
            async move { c.uninstall(r).await }
        });
        match call.await {
            Ok(reply) => {
                let reply = reply.into_inner();
                reported = Reported::new(&reply.versions, reply.boot_id, reply.state_rev);
                removed.push(version);
            }
            Err(CallError::Stale(s)) => return Err(CallError::Stale(s)),
            Err(CallError::Step(e) | CallError::Refused(e)) => {
                failed.push(format!("{version}: {e}"))
            }
        }
    }
    Ok((ActionResult::Pruned { removed, failed }, Some(reported)))
}

fn vreq(v: Version, fence: Option<pb::Fence>) -> pb::VersionRequest {
    pb::VersionRequest {
        version: v.to_string(),
        fence,
        force: false,
    }
}
