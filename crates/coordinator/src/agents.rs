//! Talking to agents: one long-lived channel per node, and the execution of rollout actions
//! into results for the rollout machine.
//!
//! Every call carries a deadline derived from what it does (the agent's activation timeout for
//! a switch, the package size for a push or an unpack, the preflight timeout for preflight),
//! both as the gRPC timeout and inside its fence, as wall-clock time: an agent refuses to
//! start a step whose deadline has passed, so a request that waited in a frozen agent's socket
//! is never applied after the rollout gave up on it. While a step call is outstanding the
//! agent is pinged; what the pings see is reported through [`ActionCtx::liveness`], so
//! `status` can say that an agent is unresponsive, and since when, instead of showing nothing.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use orch_proto::agent::{self as pb, agent_client::AgentClient};
use orch_retry::Backoff;
use orch_rollout::{Action, ActionKind, ActionResult};
use orch_tls::{Role, Security, party_domain};
use orch_types::{NodeId, Version, VersionEntry, VersionStamp};
use tonic::transport::Channel;

use crate::blobs::{BlobStore, CHUNK};
use crate::driver::now_ms;
use crate::state::Unresponsive;

/// How long a connection failure (agent restarting, port not open yet) is retried before the
/// step is reported failed; never beyond the step's own deadline.
const TRANSPORT_RETRY: Duration = Duration::from_secs(6);
const PROBE_INTERVAL: Duration = Duration::from_millis(200);
/// One health probe's own timeout.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// What a step may take on the node besides its own work: waiting for the store lock (10 s by
/// default), state writes and fsyncs, the network.
pub const STEP_MARGIN: Duration = Duration::from_secs(15);
/// Making a release permanent is a state write.
const COMMIT_BUDGET: Duration = Duration::from_secs(30);
/// Telling an agent that a rollout no longer holds it.
const RELEASE_BUDGET: Duration = Duration::from_secs(5);
/// The activation timeout assumed for an agent that did not report its own (the old fixed
/// deadline of every call).
pub const UNKNOWN_ACTIVATE_TIMEOUT: Duration = Duration::from_secs(90);
/// Slowest transfer rate a push is given time for, and the slowest unpack.
const PUSH_BYTES_PER_SEC: u64 = 4 << 20;
const UNPACK_BYTES_PER_SEC: u64 = 16 << 20;
/// A step call outstanding this long gets its agent pinged, then every [`PING_EVERY`].
const PING_AFTER: Duration = Duration::from_secs(3);
const PING_EVERY: Duration = Duration::from_secs(2);
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Largest gRPC message exchanged with agents (push chunks are 256 KiB).
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Channels to agents, one per (node, address).
pub struct AgentPool {
    security: Security,
    channels: Mutex<HashMap<(String, String), Channel>>,
}

/// A node's registered address that cannot be dialed.
#[derive(Debug, thiserror::Error)]
#[error("agent {node} at {addr:?}")]
pub struct BadAgentAddress {
    pub node: String,
    pub addr: String,
    #[source]
    pub source: orch_tls::Error,
}

/// An agent call's failure, split by what the driver must do about it.
#[derive(Debug)]
pub enum CallError {
    /// The step failed on the node, or its outcome is unknown (transport error, timeout):
    /// report `Failed`.
    Step(String),
    /// The agent refused the step and nothing changed on the node: report `Refused`.
    Refused(String),
    /// The agent saw a newer fence of this cluster: either this coordinator was deposed (stop
    /// driving) or, if it still leads, something else advanced the fence (record a failure).
    Stale(String),
}

impl AgentPool {
    pub fn new(security: Security) -> AgentPool {
        AgentPool {
            security,
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// A client for node `node` at `addr`. Under mTLS the agent must present the certificate
    /// of that very node (`agent-<node>`): an address registered for n1 that leads to another
    /// machine's agent fails the handshake instead of receiving n1's steps. Calls carry their
    /// own deadlines (see the module docs); HTTP/2 keep-alive notices a dead connection.
    pub fn client(&self, node: &str, addr: &str) -> Result<AgentClient<Channel>, BadAgentAddress> {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let key = (node.to_string(), addr.to_string());
        let ch = match map.get(&key) {
            Some(c) => c.clone(),
            None => {
                let c = self
                    .security
                    .endpoint(addr, &party_domain(Role::Agent, node))
                    .map_err(|source| BadAgentAddress {
                        node: node.to_string(),
                        addr: addr.to_string(),
                        source,
                    })?
                    .connect_timeout(Duration::from_secs(2))
                    .http2_keep_alive_interval(Duration::from_secs(5))
                    .keep_alive_timeout(Duration::from_secs(5))
                    .connect_lazy();
                map.insert(key, c.clone());
                c
            }
        };
        Ok(AgentClient::new(ch)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }
}

fn kind_of(s: &tonic::Status) -> Option<&str> {
    s.metadata().get("orch-error").and_then(|v| v.to_str().ok())
}

fn is_transport(s: &tonic::Status) -> bool {
    // An agent's own errors carry `orch-error`; anything else UNAVAILABLE/UNKNOWN is the wire.
    kind_of(s).is_none()
        && matches!(
            s.code(),
            tonic::Code::Unavailable
                | tonic::Code::Unknown
                | tonic::Code::Cancelled
                | tonic::Code::DeadlineExceeded
        )
}

/// A step's time limit: as the gRPC timeout of each attempt and, in wall-clock time, in its
/// fence.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    at: Instant,
    unix_ms: u64,
    budget: Duration,
}

impl Deadline {
    pub fn after(budget: Duration) -> Deadline {
        Deadline {
            at: Instant::now() + budget,
            unix_ms: now_ms().saturating_add(budget.as_millis() as u64),
            budget,
        }
    }

    fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// `msg` as a request that times out at the deadline.
    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(self.remaining().max(Duration::from_millis(1)));
        r
    }
}

/// How long each kind of step may take on a node.
#[derive(Debug, Clone, Copy)]
pub struct Budgets {
    /// Preflight: reading the node's versions and free disk.
    pub preflight: Duration,
    /// The agent's `--activate-timeout` (a hot switch may take that long).
    pub activate: Duration,
}

impl Budgets {
    /// A push of `size` bytes.
    pub fn push(size: u64) -> Duration {
        STEP_MARGIN + Duration::from_secs(size / PUSH_BYTES_PER_SEC)
    }

    /// An unpack of a package of `size` bytes.
    pub fn unpack(size: u64) -> Duration {
        STEP_MARGIN + Duration::from_secs(size / UNPACK_BYTES_PER_SEC)
    }

    /// An install or a downgrade (a hot switch).
    pub fn switch(&self) -> Duration {
        self.activate + STEP_MARGIN
    }
}

/// Agent error kinds after which nothing changed on the node (see proto/agent.proto).
const NOTHING_CHANGED: &[&str] = &[
    "refused",
    "bad-package",
    "bad-request",
    "signature",
    "not-found",
    "busy",
    "deadline",
    "held",
    "other-cluster",
    "forbidden",
];

fn classify(node: &NodeId, what: &str, d: &Deadline, why: &str, s: tonic::Status) -> CallError {
    match kind_of(&s) {
        Some("stale-fence") => CallError::Stale(format!("{node}: {}", s.message())),
        Some(k) if NOTHING_CHANGED.contains(&k) => CallError::Refused(s.message().to_string()),
        _ if s.code() == tonic::Code::DeadlineExceeded && kind_of(&s).is_none() => {
            CallError::Step(format!(
                "agent unresponsive: no answer to the {what} within {:?} ({why}); it may be hung or cut off (the agent refuses to start the step late)",
                d.budget
            ))
        }
        _ if is_transport(&s) => CallError::Step(format!("agent unreachable: {}", s.message())),
        _ => CallError::Step(s.message().to_string()),
    }
}

/// Connection failures (agent restarting, port not open yet) are retried with this policy for
/// at most [`TRANSPORT_RETRY`], never past the step's own deadline.
const TRANSPORT_BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));

/// Calls `f` until it answers, retrying connection failures (see [`TRANSPORT_BACKOFF`]); a
/// timeout is not retried (the deadline is over).
async fn retrying<T, F, Fut>(
    node: &NodeId,
    what: &str,
    why: &str,
    d: &Deadline,
    f: F,
) -> Result<T, CallError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    TRANSPORT_BACKOFF
        .with_deadline(TRANSPORT_RETRY.min(d.remaining()))
        .retry(f, |s| {
            is_transport(s) && s.code() != tonic::Code::DeadlineExceeded
        })
        .await
        .map_err(|s| classify(node, what, d, why, s))
}

/// Told, while a step call is outstanding, whether the node's agent answers pings: `Some`
/// when it stopped answering (since when and what was seen), `None` when it answers again.
pub type LivenessFn = Arc<dyn Fn(&NodeId, Option<Unresponsive>) + Send + Sync>;

/// Everything an action needs besides the agent.
pub struct ActionCtx<'a> {
    pub pool: &'a AgentPool,
    pub blobs: &'a BlobStore,
    pub address: &'a str,
    /// The action's fence; each call sets its own deadline in it.
    pub fence: pb::Fence,
    /// The package to push when staging (name, version, sha256, size).
    pub package: Option<&'a orch_types::rollout::PackageRef>,
    pub budgets: Budgets,
    /// Where pings report an unresponsive agent (none: not watched).
    pub liveness: Option<LivenessFn>,
}

impl ActionCtx<'_> {
    fn fence(&self, d: &Deadline) -> Option<pb::Fence> {
        Some(pb::Fence {
            deadline_unix_ms: d.unix_ms,
            ..self.fence.clone()
        })
    }

    fn cluster_id(&self) -> &str {
        &self.fence.cluster_id
    }
}

/// The releases a node reported and when it read them (orders reports from one agent process).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reported {
    pub versions: Vec<VersionEntry>,
    pub stamp: Option<VersionStamp>,
}

impl Reported {
    fn new(entries: &[pb::VersionEntry], boot_id: u64, state_rev: u64) -> Reported {
        Reported {
            versions: entries
                .iter()
                .filter_map(|e| VersionEntry::try_from(e).ok())
                .collect(),
            stamp: VersionStamp::from_wire(boot_id, state_rev),
        }
    }
}

type Performed = Result<(ActionResult, Option<Reported>), CallError>;

/// Performs one action; returns the result to record, the versions the node reported (to
/// refresh the registry), or `Stale` when the agent has seen a newer fence.
pub async fn perform(cx: &ActionCtx<'_>, action: &Action) -> Performed {
    let node = &action.node;
    let c = cx
        .pool
        .client(node.as_str(), cx.address)
        .map_err(|e| CallError::Step(orch_types::error_chain(&e)))?;
    match &action.kind {
        ActionKind::Preflight => preflight(cx, node, &c).await,
        ActionKind::Stage { version } => stage(cx, node, &c, *version).await,
        ActionKind::Install { version } => {
            let d = Deadline::after(cx.budgets.switch());
            let req = pb::InstallRequest {
                version: version.to_string(),
                permanent: false,
                fence: cx.fence(&d),
                expected_sha256: String::new(),
                force: false,
            };
            let why = "the agent's activation timeout plus a margin";
            let call = retrying(node, "install", why, &d, || {
                let mut c = c.clone();
                let r = d.request(req.clone());
                async move { c.install(r).await }
            });
            step_reply(cx, node, watched(cx, node, &c, call).await)
        }
        ActionKind::Commit { version } => {
            let d = Deadline::after(COMMIT_BUDGET);
            let req = vreq(*version, cx.fence(&d));
            let call = retrying(node, "commit", "a state write", &d, || {
                let mut c = c.clone();
                let r = d.request(req.clone());
                async move { c.permanent(r).await }
            });
            step_reply(cx, node, watched(cx, node, &c, call).await)
        }
        ActionKind::Downgrade { to } => {
            let d = Deadline::after(cx.budgets.switch());
            let req = vreq(*to, cx.fence(&d));
            let why = "the agent's activation timeout plus a margin";
            let call = retrying(node, "downgrade", why, &d, || {
                let mut c = c.clone();
                let r = d.request(req.clone());
                async move { c.downgrade(r).await }
            });
            step_reply(cx, node, watched(cx, node, &c, call).await)
        }
        ActionKind::HealthGate {
            min_healthy_time_ms,
            healthy_deadline_ms,
            expect,
            failure_threshold,
        } => {
            let gate = Gate {
                expect: *expect,
                min_healthy: Duration::from_millis(*min_healthy_time_ms),
                deadline: Duration::from_millis(*healthy_deadline_ms),
                failure_threshold: *failure_threshold,
            };
            Ok((health_gate(cx, node, &c, gate).await, None))
        }
    }
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

/// The agent answered something: it is not unresponsive.
fn answered(cx: &ActionCtx<'_>, node: &NodeId) {
    if let Some(l) = &cx.liveness {
        l(node, None);
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
            async move { push(&mut c, cx.blobs, p, fence, &d).await }
        });
        match watched(cx, node, c, call).await {
            Ok(_) => {}
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
    let d = Deadline::after(Budgets::unpack(size));
    let req = pb::UnpackRequest {
        version: version.to_string(),
        fence: cx.fence(&d),
        expected_sha256: String::new(),
        force: false,
    };
    let why = "a margin plus the package size at 16 MiB/s";
    let call = retrying(node, "unpack", why, &d, || {
        let mut c = c.clone();
        let r = d.request(req.clone());
        async move { c.unpack(r).await }
    });
    step_reply(cx, node, watched(cx, node, c, call).await)
}

fn vreq(v: Version, fence: Option<pb::Fence>) -> pb::VersionRequest {
    pb::VersionRequest {
        version: v.to_string(),
        fence,
        force: false,
    }
}

/// Runs a step call while pinging its agent (after [`PING_AFTER`], every [`PING_EVERY`]):
/// an agent that stops answering pings is reported unresponsive, since the first unanswered
/// ping, and responsive again when it answers. `NodeInfo` never waits for a step, so a busy
/// agent still answers; a frozen or cut-off one does not.
async fn watched<T>(
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

/// What a health gate checks.
#[derive(Debug, Clone, Copy)]
struct Gate {
    expect: Version,
    min_healthy: Duration,
    deadline: Duration,
    /// Consecutive probes answered "unhealthy" that fail the gate at once (0: never).
    failure_threshold: u32,
}

/// After a probe answered "unhealthy", the next one waits this long, so that a failure
/// threshold counts about one failed probe a second (a service briefly busy right after its
/// hot switch is not failed by a burst of fast probes).
const PROBE_INTERVAL_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// The probe must pass continuously for `min_healthy` and report `expect`, within `deadline`;
/// `failure_threshold` probes in a row answered "unhealthy" fail it at once. A probe the agent
/// does not answer counts for neither (only the deadline governs an unreachable agent) and
/// tells the liveness watch.
async fn health_gate(
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
    let mut healthy_since: Option<Instant> = None;
    let mut unanswered_since: Option<u64> = None;
    let mut failed_in_a_row = 0u32;
    let mut last = String::from("no probe answered yet");
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
                if r.healthy {
                    failed_in_a_row = 0;
                    let since = *healthy_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= min_healthy {
                        answered(cx, node);
                        return ActionResult::Done;
                    }
                } else {
                    healthy_since = None;
                    failed_in_a_row += 1;
                    last = format!("{} check: {}", r.check, r.detail);
                }
                None
            }
            Ok(Err(s)) if kind_of(&s).is_some() => {
                healthy_since = None;
                last = s.message().to_string();
                None
            }
            Ok(Err(s)) => Some(format!("agent unreachable: {}", s.message())),
            Err(_) => Some("health probe timed out".to_string()),
        };
        match unanswered {
            None => {
                if unanswered_since.take().is_some() {
                    answered(cx, node);
                }
            }
            Some(detail) => {
                healthy_since = None;
                let since_ms = *unanswered_since.get_or_insert(sent);
                if let Some(l) = &cx.liveness {
                    l(
                        node,
                        Some(Unresponsive {
                            since_ms,
                            detail: detail.clone(),
                        }),
                    );
                }
                last = detail;
            }
        }
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

/// Tells `node`'s agent that rollout `fence.rollout_id` no longer holds it (best effort: the
/// caller retries or gives up; an operator can still `--force`).
pub async fn release(pool: &AgentPool, node: &NodeId, addr: &str, fence: pb::Fence) -> bool {
    let Ok(mut c) = pool.client(node.as_str(), addr) else {
        return false;
    };
    let d = Deadline::after(RELEASE_BUDGET);
    let req = d.request(pb::ReleaseRequest {
        fence: Some(pb::Fence {
            deadline_unix_ms: d.unix_ms,
            ..fence
        }),
    });
    match c.release(req).await {
        Ok(_) => true,
        Err(s) => {
            tracing::debug!(%node, "release not delivered: {}", s.message());
            false
        }
    }
}

/// Streams the package from the content store to the agent. The agent may answer before the
/// stream ends (it already holds the package): the reader then stops.
async fn push(
    c: &mut AgentClient<Channel>,
    blobs: &BlobStore,
    p: &orch_types::rollout::PackageRef,
    fence: Option<pb::Fence>,
    d: &Deadline,
) -> Result<pb::PushReply, tonic::Status> {
    use tokio::io::AsyncReadExt;
    let path = blobs.path(&p.sha256)?;
    let mut f = tokio::fs::File::open(&path)
        .await
        .map_err(|e| tonic::Status::not_found(format!("package bytes missing here: {e}")))?;
    // The signature travels with the bytes: agents with trusted keys check it themselves.
    let signature = blobs
        .signature(&p.sha256)
        .map_err(|e| tonic::Status::internal(e.to_string()))?
        .unwrap_or_default();
    let header = pb::PackageHeader {
        name: p.name.clone(),
        version: p.version.to_string(),
        sha256: p.sha256.clone(),
        size: p.size,
        fence,
        signature,
        force: false,
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let reader = tokio::spawn(async move {
        let mut header = Some(header);
        loop {
            let mut buf = vec![0u8; CHUNK];
            let n = match f.read(&mut buf).await {
                Ok(n) => n,
                Err(_) => return,
            };
            if n == 0 && header.is_none() {
                return;
            }
            buf.truncate(n);
            if tx
                .send(pb::PackageChunk {
                    header: header.take(),
                    data: buf,
                })
                .await
                .is_err()
                || n == 0
            {
                return;
            }
        }
    });
    let r = c
        .push_package(d.request(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .await;
    reader.abort();
    Ok(r?.into_inner())
}
