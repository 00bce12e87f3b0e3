//! Talking to agents: one long-lived channel per node, and the execution of rollout actions
//! (fenced, with bounded retries of transport errors) into results for the rollout machine.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use orch_proto::agent::{self as pb, agent_client::AgentClient};
use orch_rollout::{Action, ActionKind, ActionResult};
use orch_tls::{Role, Security, party_domain};
use orch_types::{NodeId, Version, VersionEntry, VersionStamp};
use tonic::transport::Channel;

use crate::blobs::{BlobStore, CHUNK};

/// How long a transport failure is retried before the step is reported failed.
const TRANSPORT_RETRY: Duration = Duration::from_secs(6);
const PROBE_INTERVAL: Duration = Duration::from_millis(200);

/// Largest gRPC message exchanged with agents (push chunks are 256 KiB).
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Channels to agents, one per (node, address).
pub struct AgentPool {
    security: Security,
    channels: Mutex<HashMap<(String, String), Channel>>,
}

/// An agent call's failure, split by what the driver must do about it.
#[derive(Debug)]
pub enum CallError {
    /// The agent refused or the step failed on the node: report `Failed`.
    Step(String),
    /// The agent saw a newer fence: this coordinator was deposed; stop driving.
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
    /// machine's agent fails the handshake instead of receiving n1's steps.
    pub fn client(&self, node: &str, addr: &str) -> Result<AgentClient<Channel>, String> {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let key = (node.to_string(), addr.to_string());
        let ch = match map.get(&key) {
            Some(c) => c.clone(),
            None => {
                let c = self
                    .security
                    .endpoint(addr, &party_domain(Role::Agent, node))
                    .map_err(|e| format!("agent {node} at {addr:?}: {e}"))?
                    .connect_timeout(Duration::from_secs(2))
                    .timeout(Duration::from_secs(120))
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

fn is_transport(s: &tonic::Status) -> bool {
    // An agent's own errors carry `orch-error`; anything else UNAVAILABLE/UNKNOWN is the wire.
    s.metadata().get("orch-error").is_none()
        && matches!(
            s.code(),
            tonic::Code::Unavailable
                | tonic::Code::Unknown
                | tonic::Code::Cancelled
                | tonic::Code::DeadlineExceeded
        )
}

fn classify(node: &NodeId, s: tonic::Status) -> CallError {
    if s.metadata().get("orch-error").and_then(|v| v.to_str().ok()) == Some("stale-fence") {
        CallError::Stale(format!("{node}: {}", s.message()))
    } else if is_transport(&s) {
        CallError::Step(format!("agent unreachable: {}", s.message()))
    } else {
        CallError::Step(s.message().to_string())
    }
}

/// Retries `f` while the agent is unreachable, up to [`TRANSPORT_RETRY`].
async fn retrying<T, F, Fut>(node: &NodeId, mut f: F) -> Result<T, CallError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let start = Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(s) if is_transport(&s) && start.elapsed() < TRANSPORT_RETRY => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            Err(s) => return Err(classify(node, s)),
        }
    }
}

/// Everything an action needs besides the agent.
pub struct ActionCtx<'a> {
    pub pool: &'a AgentPool,
    pub blobs: &'a BlobStore,
    pub address: &'a str,
    pub fence: pb::Fence,
    /// The package to push when staging (name, version, sha256, size).
    pub package: Option<&'a orch_types::rollout::PackageRef>,
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

/// Performs one action; returns the result to record, the versions the node reported (to
/// refresh the registry), or `Stale` when a newer coordinator has taken over.
pub async fn perform(
    cx: &ActionCtx<'_>,
    action: &Action,
) -> Result<(ActionResult, Option<Reported>), CallError> {
    let node = &action.node;
    let mut c = cx
        .pool
        .client(node.as_str(), cx.address)
        .map_err(CallError::Step)?;
    let fence = Some(cx.fence.clone());
    let step = |r: Result<tonic::Response<pb::StepReply>, CallError>| match r {
        Ok(reply) => {
            let reply = reply.into_inner();
            let reported = Reported::new(&reply.versions, reply.boot_id, reply.state_rev);
            Ok((ActionResult::Done, Some(reported)))
        }
        Err(CallError::Step(e)) => Ok((ActionResult::Failed { error: e }, None)),
        Err(s) => Err(s),
    };
    match &action.kind {
        ActionKind::Preflight => {
            let versions = retrying(node, || {
                let mut c = c.clone();
                async move { c.versions(pb::VersionsRequest {}).await }
            })
            .await;
            let info = retrying(node, || {
                let mut c = c.clone();
                async move { c.node_info(pb::NodeInfoRequest {}).await }
            })
            .await;
            match (versions, info) {
                (Ok(v), Ok(i)) => {
                    let v = v.into_inner();
                    let entries = Reported::new(&v.versions, v.boot_id, v.state_rev);
                    match v.running_version.parse::<Version>() {
                        Ok(running) => Ok((
                            ActionResult::Preflight {
                                running,
                                free_disk: i.into_inner().free_disk_bytes,
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
                (Err(CallError::Stale(s)), _) | (_, Err(CallError::Stale(s))) => {
                    Err(CallError::Stale(s))
                }
                (Err(CallError::Step(e)), _) | (_, Err(CallError::Step(e))) => {
                    Ok((ActionResult::Failed { error: e }, None))
                }
            }
        }
        ActionKind::Stage { version } => {
            if let Some(p) = cx.package {
                let pushed = retrying(node, || {
                    let mut c = c.clone();
                    let fence = fence.clone();
                    async move { push(&mut c, cx.blobs, p, fence).await }
                })
                .await;
                match pushed {
                    Ok(_) => {}
                    Err(CallError::Step(e)) => {
                        return Ok((
                            ActionResult::Failed {
                                error: format!("push: {e}"),
                            },
                            None,
                        ));
                    }
                    Err(s) => return Err(s),
                }
            }
            let req = pb::UnpackRequest {
                version: version.to_string(),
                fence: fence.clone(),
                expected_sha256: String::new(),
                force: false,
            };
            step(
                retrying(node, || {
                    let mut c = c.clone();
                    let r = req.clone();
                    async move { c.unpack(r).await }
                })
                .await,
            )
        }
        ActionKind::Install { version } => {
            let req = pb::InstallRequest {
                version: version.to_string(),
                permanent: false,
                fence: fence.clone(),
                expected_sha256: String::new(),
                force: false,
            };
            step(
                retrying(node, || {
                    let mut c = c.clone();
                    let r = req.clone();
                    async move { c.install(r).await }
                })
                .await,
            )
        }
        ActionKind::Commit { version } => {
            let req = vreq(*version, &fence);
            step(
                retrying(node, || {
                    let mut c = c.clone();
                    let r = req.clone();
                    async move { c.permanent(r).await }
                })
                .await,
            )
        }
        ActionKind::Downgrade { to } => {
            let req = vreq(*to, &fence);
            step(
                retrying(node, || {
                    let mut c = c.clone();
                    let r = req.clone();
                    async move { c.downgrade(r).await }
                })
                .await,
            )
        }
        ActionKind::HealthGate {
            min_healthy_time_ms,
            healthy_deadline_ms,
            expect,
        } => {
            let r = health_gate(
                &mut c,
                *expect,
                Duration::from_millis(*min_healthy_time_ms),
                Duration::from_millis(*healthy_deadline_ms),
            )
            .await;
            Ok((r, None))
        }
    }
}

fn vreq(v: Version, fence: &Option<pb::Fence>) -> pb::VersionRequest {
    pb::VersionRequest {
        version: v.to_string(),
        fence: fence.clone(),
        force: false,
    }
}

/// The probe must pass continuously for `min_healthy` and report `expect`, within `deadline`.
async fn health_gate(
    c: &mut AgentClient<Channel>,
    expect: Version,
    min_healthy: Duration,
    deadline: Duration,
) -> ActionResult {
    let start = Instant::now();
    let mut healthy_since: Option<Instant> = None;
    let mut last = String::from("no probe answered yet");
    loop {
        let probe = tokio::time::timeout(
            Duration::from_secs(5),
            c.health(pb::HealthRequest {
                expect_version: expect.to_string(),
            }),
        )
        .await;
        match probe {
            Ok(Ok(r)) => {
                let r = r.into_inner();
                if r.healthy {
                    let since = *healthy_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= min_healthy {
                        return ActionResult::Done;
                    }
                } else {
                    healthy_since = None;
                    last = format!("{} check: {}", r.check, r.detail);
                }
            }
            Ok(Err(s)) => {
                healthy_since = None;
                last = format!("agent unreachable: {}", s.message());
            }
            Err(_) => {
                healthy_since = None;
                last = "health probe timed out".into();
            }
        }
        if start.elapsed() >= deadline {
            return ActionResult::Failed {
                error: format!(
                    "not healthy on {expect} for {min_healthy:?} within {deadline:?}; last: {last}"
                ),
            };
        }
        tokio::time::sleep(PROBE_INTERVAL.min(deadline.saturating_sub(start.elapsed()))).await;
    }
}

/// Streams the package from the content store to the agent.
async fn push(
    c: &mut AgentClient<Channel>,
    blobs: &BlobStore,
    p: &orch_types::rollout::PackageRef,
    fence: Option<pb::Fence>,
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
    tokio::spawn(async move {
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
    Ok(
        c.push_package(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner(),
    )
}
