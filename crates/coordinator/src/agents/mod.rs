//! Talking to agents: one long-lived channel per node, and the execution of rollout actions
//! into results for the rollout machine (the step calls in `steps`, pings and health gates in
//! `health`).
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
use orch_tls::{Role, Security, party_domain};
use orch_types::{NodeId, VersionEntry, VersionStamp};
use tonic::transport::Channel;

use crate::blobs::BlobStore;
use crate::driver::now_ms;
use crate::state::Unresponsive;

mod health;
pub mod metric_gate;
mod push;
mod steps;

pub use health::GateBoard;

pub use steps::{Performed, finish_gate, perform, probe_gate};

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

/// At most this many agent channels are kept open between calls. A channel is one HTTP/2
/// connection with its buffers and service stack, about 35 KB on the leader (heap profile at
/// 1,000 nodes in docs/benchmarks.md), and a rollout or a `status` touches every node: kept
/// forever, 1,000 agents cost the leader 35 MB of mostly idle connections. Past the cap, the
/// least recently used channel is dropped from the pool; calls still using it keep it until
/// they end, and the next call to that node connects again.
const MAX_IDLE_CHANNELS: usize = CALLS_AT_ONCE;

/// How many short calls to agents (steps other than health gates, probes, releases, the
/// planning preflight) the leader makes at once: the rest wait their turn. Each call holds a
/// connection and a task; at 1,000 nodes, all at once was about 60 MB on the leader.
pub const CALLS_AT_ONCE: usize = 256;

/// Channels to agents, one per (node, address), the most recently used ones.
pub struct AgentPool {
    security: Security,
    channels: Mutex<Channels>,
    /// Who holds which package, for peer relay (`None`: relay off, every push direct).
    seeds: Option<push::Seeds>,
    /// Bounds the health probes of every node at once (`status`, a rollout's start) to about
    /// the channels the pool keeps: all 1,000 at once opened 1,000 connections together.
    probes: tokio::sync::Semaphore,
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
            channels: Mutex::new(Channels::default()),
            seeds: Some(push::Seeds::default()),
            probes: tokio::sync::Semaphore::new(CALLS_AT_ONCE),
        }
    }

    /// Peer relay on (the default) or off (`--no-peer-relay`).
    pub fn with_relay(mut self, on: bool) -> AgentPool {
        self.seeds = on.then(push::Seeds::default);
        self
    }

    /// Waits for a turn to probe a node outside a rollout step (at most 256 probes run at once).
    pub async fn probe_turn(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.probes.acquire().await.ok()
    }

    /// A client for node `node` at `addr`. Under mTLS the agent must present the certificate
    /// of that very node (`agent-<node>`): an address registered for n1 that leads to another
    /// machine's agent fails the handshake instead of receiving n1's steps. Calls carry their
    /// own deadlines (see the module docs); HTTP/2 keep-alive notices a dead connection.
    pub fn client(&self, node: &str, addr: &str) -> Result<AgentClient<Channel>, BadAgentAddress> {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let key = (node.to_string(), addr.to_string());
        let ch = match map.get(&key) {
            Some(c) => c,
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
                    // A keep-alive PING waits behind whatever the connection is sending: on a
                    // slow link, behind a push's bytes. 5 s closed healthy connections in the
                    // middle of a push at 512 kbit/s ("http2 error"). A dead agent is still
                    // noticed by its call's deadline and reported by the liveness pings.
                    .keep_alive_timeout(Duration::from_secs(20))
                    .connect_lazy();
                map.insert(key, c.clone(), MAX_IDLE_CHANNELS);
                c
            }
        };
        Ok(AgentClient::new(ch)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }
}

/// The pool's channels with the order of their last use, so that the least recently used one
/// can be dropped.
#[derive(Default)]
struct Channels {
    map: HashMap<(String, String), (Channel, u64)>,
    clock: u64,
}

impl Channels {
    fn get(&mut self, key: &(String, String)) -> Option<Channel> {
        self.clock += 1;
        let (c, used) = self.map.get_mut(key)?;
        *used = self.clock;
        Some(c.clone())
    }

    /// Adds a channel, first dropping the least recently used ones beyond `cap - 1`.
    fn insert(&mut self, key: (String, String), c: Channel, cap: usize) {
        while self.map.len() >= cap.max(1) {
            let Some(oldest) = self
                .map
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            self.map.remove(&oldest);
        }
        self.clock += 1;
        self.map.insert(key, (c, self.clock));
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
    // The pre-step (drain) hook failed: the switch was not attempted.
    "pre-switch",
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
    /// Where pushed bytes are counted.
    pub metrics: &'a crate::metrics::Metrics,
    /// Where health gates publish how long their node has been healthy.
    pub gates: &'a GateBoard,
    /// The rollout's metric gates, which its health gates evaluate too (none: only the agent).
    pub metric_gates: Option<Arc<TargetGates>>,
}

/// A rollout's metric gates and its target version: only gates on the target evaluate them.
/// A rollback's gates (on the previous release) do not: the window of a query still holds the
/// failed release's errors for a while, and must not hold up the way back.
#[derive(Debug)]
pub struct TargetGates {
    pub target: orch_types::Version,
    pub gates: orch_types::rollout::MetricGates,
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

/// The agent answered something: it is not unresponsive.
fn answered(cx: &ActionCtx<'_>, node: &NodeId) {
    if let Some(l) = &cx.liveness {
        l(node, None);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn channel() -> Channel {
        tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy()
    }

    fn key(n: &str) -> (String, String) {
        (n.to_string(), "127.0.0.1:9".to_string())
    }

    #[tokio::test]
    async fn the_pool_drops_the_least_recently_used_channel_past_its_cap() {
        let mut c = Channels::default();
        c.insert(key("n1"), channel(), 2);
        c.insert(key("n2"), channel(), 2);
        // n1 used after n2: n2 is the least recently used when n3 comes.
        assert!(c.get(&key("n1")).is_some());
        c.insert(key("n3"), channel(), 2);
        assert_eq!(c.map.len(), 2);
        assert!(c.get(&key("n2")).is_none());
        assert!(c.get(&key("n1")).is_some());
        assert!(c.get(&key("n3")).is_some());
    }
}
