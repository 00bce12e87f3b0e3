//! The `Control` service: operators' API and agent registration. Reads are answered from this
//! coordinator's replicated state; writes go through Raft and so only succeed on the leader
//! (a follower answers NotLeader with the leader's address, and clients retry there).

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use orch_proto::control::{self as pb, control_server::Control};
use orch_rollout::{Event, LogEntry, Rollout};
use orch_tls::Role;
use orch_types::rollout::{OnFailure, PackageRef, RolloutSpec};
use orch_types::{NodeId, Version, VersionEntry};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::Shared;
use crate::driver::now_ms;
use crate::error::Error;
use crate::history::HistoryRecord;
use crate::state::{ClusterState, Command, PackageRecord, Response as SmResponse};

#[derive(Clone)]
pub struct ControlService {
    pub(crate) shared: Arc<Shared>,
}

type Res<T> = std::result::Result<Response<T>, Status>;

/// Largest request the control service decodes (upload chunks are 256 KiB).
pub const MAX_REQUEST_BYTES: usize = 8 << 20;
/// Largest reply it encodes (rollout lists with their events); the client accepts as much.
pub const MAX_REPLY_BYTES: usize = 64 << 20;

/// Running rollouts and changing membership is for operators; viewers may look.
const WRITE: &[Role] = &[Role::Operator];
const READ: &[Role] = &[Role::Operator, Role::Viewer];

/// A rollout's status for the control API; `with_events: false` (listings) copies nothing of
/// its audit trail, which is most of its size.
pub fn status_of(s: &ClusterState, r: &Rollout, with_events: bool) -> pb::RolloutStatus {
    pb::RolloutStatus {
        id: r.id().to_string(),
        version: r.spec().version.to_string(),
        phase: r.phase().to_string(),
        awaiting_promotion: r.awaiting_promotion(),
        error: r.error().unwrap_or_default().to_string(),
        nodes: r
            .nodes()
            .map(|n| {
                let mut p = node_progress(n);
                if let Some(u) = s.nodes.get(&n.id).and_then(|rec| rec.unresponsive.as_ref()) {
                    p.unresponsive_since_ms = u.since_ms;
                    p.unresponsive_detail = u.detail.clone();
                }
                p
            })
            .collect(),
        events: if with_events {
            r.events().iter().map(audit_event).collect()
        } else {
            Vec::new()
        },
        created_at_ms: r
            .id()
            .parse()
            .ok()
            .and_then(|id| s.created_at.get(&id).copied())
            .unwrap_or(0),
        requested_by: r.spec().requested_by.clone(),
    }
}

fn node_progress(n: &orch_types::rollout::NodeProgress) -> pb::NodeProgress {
    pb::NodeProgress {
        id: n.id.to_string(),
        from_version: n.from_version.map(|v| v.to_string()).unwrap_or_default(),
        step: n.step.to_string(),
        error: n.error.clone().unwrap_or_default(),
        ..Default::default()
    }
}

fn audit_event(e: &orch_types::rollout::AuditEvent) -> pb::AuditEvent {
    pb::AuditEvent {
        at_ms: e.at_ms,
        by: e.by.clone(),
        message: e.message.clone(),
        term: e.term,
    }
}

/// An archived rollout's status, from its history line.
pub fn status_of_archived(h: &HistoryRecord) -> pb::RolloutStatus {
    let st = &h.status;
    pb::RolloutStatus {
        id: h.id.to_string(),
        version: st.version.to_string(),
        phase: st.phase.to_string(),
        awaiting_promotion: st.awaiting_promotion,
        error: st.error.clone().unwrap_or_default(),
        nodes: st.nodes.iter().map(node_progress).collect(),
        events: st.events.iter().map(audit_event).collect(),
        created_at_ms: h.created_at_ms,
        requested_by: h.spec.requested_by.clone(),
    }
}

impl ControlService {
    /// Admits `req` if its caller has one of `allowed`, and returns who asked for the audit
    /// trail: the certificate's `operator/<name>` under mTLS. In insecure mode nobody is
    /// identified, so the name the client claims (`claimed`) is recorded marked unverified.
    fn caller<T>(
        &self,
        req: &Request<T>,
        allowed: &[Role],
        claimed: &str,
    ) -> Result<String, Status> {
        Ok(match self.shared.security.mode().require(req, allowed)? {
            Some(id) => format!("{}/{}", id.role, id.name),
            None => {
                let claimed: String = claimed
                    .chars()
                    .filter(|c| !c.is_control())
                    .take(64)
                    .collect();
                if claimed.is_empty() {
                    "unknown operator (unverified)".to_string()
                } else {
                    format!("{claimed} (unverified)")
                }
            }
        })
    }

    fn check<T>(&self, req: &Request<T>, allowed: &[Role]) -> Result<(), Status> {
        self.shared
            .security
            .mode()
            .require(req, allowed)
            .map(|_| ())
    }

    async fn write(&self, cmd: Command) -> Result<SmResponse, Status> {
        match self.shared.raft.write(cmd).await? {
            SmResponse::Rejected(why) => Err(Error::Refused(why).into()),
            r => Ok(r),
        }
    }

    /// Writes a client's request under its id (when it gave one): a retry of a request that
    /// was applied gets the first attempt's response instead of being applied again.
    async fn write_request(&self, request_id: &str, cmd: Command) -> Result<SmResponse, Status> {
        if request_id.is_empty() {
            return self.write(cmd).await;
        }
        if request_id.len() > 128 || request_id.chars().any(char::is_control) {
            return Err(bad("request_id must be at most 128 printable characters"));
        }
        self.write(Command::Request {
            request_id: request_id.to_string(),
            at_ms: now_ms(),
            command: Box::new(cmd),
        })
        .await
    }

    /// Decides whether this coordinator may answer a read, so that reads never go backwards
    /// for a client: the leader answers after confirming its leadership with a quorum; a
    /// follower answers when it has applied at least the index the client last saw
    /// (`orch-min-index`, waiting briefly for it), else sends the client to the leader. With
    /// `orch-stale: 1` any coordinator answers when no leader can be reached, saying so.
    async fn read_gate<T>(&self, req: &Request<T>) -> Result<ReadAt, Status> {
        let md = req.metadata();
        let stale_ok = md.get("orch-stale").is_some_and(|v| v == "1");
        let min_index: u64 = md
            .get("orch-min-index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let raft = &self.shared.raft;
        let here = || *raft.applied().borrow();
        if raft.is_leader() {
            match raft.ensure_linearizable().await {
                Ok(()) => {
                    return Ok(ReadAt {
                        index: here(),
                        stale: false,
                    });
                }
                Err(e) if !stale_ok => return Err(e.into()),
                Err(_) => {}
            }
        } else if min_index > 0 && caught_up(raft.applied(), min_index).await {
            return Ok(ReadAt {
                index: here(),
                stale: false,
            });
        }
        if stale_ok {
            return Ok(ReadAt {
                index: here(),
                stale: true,
            });
        }
        Err(Error::NotLeader {
            leader: raft.leader(),
        }
        .into())
    }

    fn find(&self, id: &str) -> Result<pb::RolloutStatus, Status> {
        let found = self.find_here(id);
        // A follower applies a new rollout a heartbeat after the leader created it: rather than
        // deny what the caller just started, send it to the leader (the client follows).
        if found.is_err() && !self.shared.raft.is_leader() {
            let leader = self.shared.raft.leader();
            if leader.is_some() {
                return Err(Error::NotLeader { leader }.into());
            }
        }
        found
    }

    /// An archived rollout's status (with its events) from this coordinator's history file.
    async fn archived_status(&self, id: &str) -> Result<Option<pb::RolloutStatus>, Status> {
        let Ok(id) = id.parse::<orch_types::RolloutId>() else {
            return Ok(None);
        };
        let history = self.shared.history.clone();
        let found: Option<HistoryRecord> = tokio::task::spawn_blocking(move || history.find(id))
            .await
            .map_err(|e| Status::internal(format!("reading the history: {e}")))?
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(found.as_ref().map(status_of_archived))
    }

    fn find_here(&self, id: &str) -> Result<pb::RolloutStatus, Status> {
        self.shared.read(|s| {
            let r = if id.is_empty() {
                s.active_rollout().or_else(|| s.latest_rollout())
            } else {
                s.find_rollout(id)
            };
            r.map(|r| status_of(s, r, true)).ok_or_else(|| {
                if id.is_empty() {
                    Status::not_found(
                        "no rollout yet: start one with `orchestrator rollout VERSION`",
                    )
                } else {
                    Status::not_found(format!(
                        "no rollout {}: `orchestrator rollouts --all` lists them",
                        shown(id)
                    ))
                }
            })
        })
    }
}

/// What a read answer reflects: the applied index (sent back as `orch-applied`, which the
/// client returns as `orch-min-index`) and whether it may be stale.
#[derive(Debug, Clone, Copy)]
struct ReadAt {
    index: u64,
    stale: bool,
}

impl ReadAt {
    fn answer<T>(self, msg: T) -> Response<T> {
        let mut r = Response::new(msg);
        let md = r.metadata_mut();
        if let Ok(v) = self.index.to_string().parse() {
            md.insert("orch-applied", v);
        }
        if self.stale {
            md.insert(
                "orch-stale",
                tonic::metadata::MetadataValue::from_static("1"),
            );
        }
        r
    }
}

/// How long a follower waits to apply the index a client has already seen before sending it
/// to the leader.
const CATCH_UP_WAIT: Duration = Duration::from_secs(1);

/// True once `applied` reaches `index` (within [`CATCH_UP_WAIT`]).
async fn caught_up(mut applied: tokio::sync::watch::Receiver<u64>, index: u64) -> bool {
    tokio::time::timeout(CATCH_UP_WAIT, applied.wait_for(|a| *a >= index))
        .await
        .is_ok_and(|r| r.is_ok())
}

/// Client input as a refusal quotes it: bounded, because the refusal travels back in a response
/// header, and a header larger than the client accepts makes the answer unreadable.
fn shown(s: &str) -> String {
    const MAX: usize = 64;
    if s.chars().count() <= MAX {
        s.to_string()
    } else {
        format!("{}...", s.chars().take(MAX).collect::<String>())
    }
}

fn bad(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

/// Checks that an address others will dial is `HOST:PORT` (or an http(s) URL with host and
/// port): a path, NUL, spaces or a missing port would otherwise enter the replicated state and
/// only fail when dialed (for a new member: a learner that can never catch up).
fn check_address(addr: &str, what: &str) -> Result<(), Status> {
    let uri = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    let ok = !addr.is_empty()
        && addr.len() <= 256
        && uri.parse::<tonic::codegen::http::Uri>().is_ok_and(|u| {
            matches!(u.scheme_str(), Some("http" | "https"))
                && u.host().is_some_and(|h| !h.is_empty())
                && u.port_u16().is_some()
                && u.path_and_query().is_none_or(|p| p.as_str() == "/")
        });
    if ok {
        Ok(())
    } else {
        let shown: String = addr.chars().take(64).collect();
        Err(bad(format!(
            "{what}: address {shown:?} is not HOST:PORT (at most 256 bytes)"
        )))
    }
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn upload_package(
        &self,
        req: Request<Streaming<pb::UploadChunk>>,
    ) -> Res<pb::UploadReply> {
        self.check(&req, WRITE)?;
        if !self.shared.raft.is_leader() {
            return Err(Error::NotLeader {
                leader: self.shared.raft.leader(),
            }
            .into());
        }
        let mut s = req.into_inner();
        let first = s
            .next()
            .await
            .ok_or_else(|| bad("upload refused: empty stream"))??;
        let h = first
            .header
            .ok_or_else(|| bad("upload refused: the first chunk must carry the header"))?;
        orch_types::validate_package_name(&h.name).map_err(|e| bad(e.to_string()))?;
        let version: Version = h
            .version
            .parse()
            .map_err(|e: orch_types::ParseError| bad(e.to_string()))?;
        let sha = orch_package::digest::normalize_digest(&h.sha256)
            .ok_or_else(|| bad("upload refused: sha256 is not a hex SHA-256 digest"))?;
        // Before a byte is stored, copied or staged: with trusted keys, unsigned code stops here.
        let sig = (!h.signature.is_empty()).then_some(h.signature);
        self.shared.blobs.check_signature(
            &format!("{}-{version}.zip", h.name),
            sig.as_deref(),
            &sha,
        )?;
        let rest = s.map(|c| c.map(|c| c.data));
        let already = self
            .shared
            .blobs
            .receive(&sha, h.size, sig, first.data, rest)
            .await?;
        let holders = self.shared.replicate_blob(&sha).await?;
        self.write(Command::AddPackage(PackageRecord {
            name: h.name,
            version,
            sha256: sha.clone(),
            size: h.size,
            holders: holders.iter().copied().collect(),
            uploaded_at_ms: now_ms(),
        }))
        .await?;
        Ok(Response::new(pb::UploadReply {
            sha256: sha,
            holders,
            already,
        }))
    }

    async fn start_rollout(&self, req: Request<pb::StartRolloutRequest>) -> Res<pb::RolloutStatus> {
        let requested_by = self.caller(&req, WRITE, &req.get_ref().requested_by)?;
        let r = req.into_inner();
        let version: Version = r
            .version
            .parse()
            .map_err(|e: orch_types::ParseError| bad(e.to_string()))?;
        let (nodes, package) = self.shared.read(|s| -> Result<_, Status> {
            let nodes: Vec<NodeId> = if r.nodes.is_empty() {
                s.nodes.keys().cloned().collect()
            } else {
                r.nodes
                    .iter()
                    .map(|n| n.parse::<NodeId>().map_err(|e| bad(e.to_string())))
                    .collect::<Result<_, _>>()?
            };
            if nodes.is_empty() {
                return Err(Status::failed_precondition(
                    "no nodes are registered: start agents with --coordinator ADDR",
                ));
            }
            let package = if r.package_sha256.is_empty() {
                None
            } else {
                let p = s.packages.get(&r.package_sha256).ok_or_else(|| {
                    Status::failed_precondition(format!(
                        "package {} is not stored on the coordinators: upload it first",
                        shown(&r.package_sha256)
                    ))
                })?;
                if p.version != version {
                    return Err(bad(format!(
                        "the package holds version {}, not {version}",
                        p.version
                    )));
                }
                Some(PackageRef {
                    name: p.name.clone(),
                    version: p.version,
                    sha256: p.sha256.clone(),
                    size: p.size,
                })
            };
            Ok((nodes, package))
        })?;
        // A package stored before keys were configured (or copied without its signature) is
        // refused here too, before any agent is touched.
        if let Some(p) = &package
            && !self.shared.blobs.trusted().is_empty()
        {
            self.shared.ensure_blob(&p.sha256).await?;
            let sig = self.shared.blobs.signature(&p.sha256)?;
            self.shared.blobs.check_signature(
                &format!("{}-{}.zip", p.name, p.version),
                sig.as_deref(),
                &p.sha256,
            )?;
        }
        let mut spec = RolloutSpec::new("r000000", version, nodes, requested_by);
        spec.package = package;
        if r.batch_size > 0 {
            spec.batch_size = r.batch_size;
        }
        spec.canary = r.canary;
        spec.permanent = !r.no_permanent;
        if let Some(t) = r.min_healthy_time_ms {
            spec.min_healthy_time_ms = t;
        }
        if let Some(t) = r.healthy_deadline_ms {
            spec.healthy_deadline_ms = t;
        }
        if let Some(t) = r.preflight_timeout_ms {
            spec.preflight_timeout_ms = t;
        }
        if let Some(n) = r.failure_threshold {
            spec.failure_threshold = n;
        }
        if !r.on_failure.is_empty() {
            spec.on_failure = r
                .on_failure
                .parse::<OnFailure>()
                .map_err(|e| bad(e.to_string()))?;
        }
        let create = Command::CreateRollout {
            spec,
            at_ms: now_ms(),
        };
        match self.write_request(&r.request_id, create).await? {
            SmResponse::Created { id } => Ok(Response::new(self.find(&id)?)),
            other => Err(Status::internal(format!("unexpected answer {other:?}"))),
        }
    }

    async fn get_rollout(&self, req: Request<pb::RolloutRef>) -> Res<pb::RolloutStatus> {
        self.check(&req, READ)?;
        let at = self.read_gate(&req).await?;
        let id = req.into_inner().id;
        let found = self.find(&id);
        // Not in the replicated state: perhaps archived (retention) into the history file.
        if found.is_err()
            && let Some(st) = self.archived_status(&id).await?
        {
            return Ok(at.answer(st));
        }
        Ok(at.answer(found?))
    }

    async fn list_rollouts(
        &self,
        req: Request<pb::ListRolloutsRequest>,
    ) -> Res<pb::ListRolloutsReply> {
        self.check(&req, READ)?;
        let at = self.read_gate(&req).await?;
        let all = req.into_inner().all;
        // The history first (read without holding the state), then the state: a rollout
        // archived in between is then listed from its history line rather than missed.
        let mut archived = if all {
            let history = self.shared.history.clone();
            tokio::task::spawn_blocking(move || history.list())
                .await
                .map_err(|e| Status::internal(format!("reading the history: {e}")))?
                .map_err(|e| Status::internal(e.to_string()))?
        } else {
            Vec::new()
        };
        let mut rollouts = self.shared.read(|s| {
            archived.retain(|h| !s.rollouts.contains_key(&h.id));
            s.rollouts
                .values()
                .map(|r| status_of(s, r, false))
                .collect::<Vec<_>>()
        });
        if !archived.is_empty() {
            let mut out: Vec<_> = archived.iter().map(status_of_archived).collect();
            out.append(&mut rollouts);
            // Oldest first, by number.
            out.sort_by_key(|st| {
                st.id
                    .parse::<orch_types::RolloutId>()
                    .map(|i| i.0)
                    .unwrap_or(0)
            });
            rollouts = out;
        }
        Ok(at.answer(pb::ListRolloutsReply { rollouts }))
    }

    type WatchRolloutStream = Pin<Box<dyn Stream<Item = Result<pb::RolloutStatus, Status>> + Send>>;

    async fn watch_rollout(&self, req: Request<pb::RolloutRef>) -> Res<Self::WatchRolloutStream> {
        self.check(&req, READ)?;
        let at = self.read_gate(&req).await?;
        let wanted = req.into_inner().id;
        let first = match self.find(&wanted) {
            Ok(st) => st,
            // Archived (it finished long ago): its final status is all there is to watch.
            Err(e) => match self.archived_status(&wanted).await? {
                Some(st) => return Ok(at.answer(Box::pin(tokio_stream::once(Ok(st))))),
                None => return Err(e),
            },
        };
        let id = first.id.clone();
        let me = self.clone();
        let mut applied = self.shared.raft.applied();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut last = first;
            if tx.send(Ok(last.clone())).await.is_err() {
                return;
            }
            loop {
                // Archived meanwhile (it had finished): its last status, then the end.
                if me.shared.read(|s| s.find_rollout(&id).is_none()) {
                    if let Ok(Some(st)) = me.archived_status(&id).await
                        && st != last
                    {
                        let _ = tx.send(Ok(st)).await;
                    }
                    return;
                }
                let done = me
                    .shared
                    .read(|s| s.find_rollout(&id).map(|r| r.is_finished()).unwrap_or(true));
                if done && last.phase == me.find(&id).map(|s| s.phase).unwrap_or_default() {
                    return;
                }
                tokio::select! {
                    r = applied.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = tx.closed() => return,
                }
                if let Ok(now) = me.find(&id)
                    && now != last
                {
                    last = now;
                    if tx.send(Ok(last.clone())).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(at.answer(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn rollout_command(
        &self,
        req: Request<pb::RolloutCommandRequest>,
    ) -> Res<pb::RolloutStatus> {
        let by = self.caller(&req, WRITE, &req.get_ref().requested_by)?;
        let r = req.into_inner();
        let cmd = match r.command.as_str() {
            "pause" => orch_rollout::Command::Pause,
            "resume" => orch_rollout::Command::Resume,
            "abort" => orch_rollout::Command::Abort,
            "rollback" => orch_rollout::Command::Rollback,
            "promote" => orch_rollout::Command::Promote,
            other => {
                return Err(bad(format!(
                    "unknown command {:?}: use pause, resume, abort, rollback or promote",
                    shown(other)
                )));
            }
        };
        let id = self.find(&r.id)?.id;
        let key: orch_types::RolloutId = id
            .parse()
            .map_err(|e: orch_types::ParseError| Status::internal(e.to_string()))?;
        let command = Command::Rollout {
            id: key,
            entry: LogEntry {
                event: Event::Command(cmd),
                at_ms: now_ms(),
                by,
            },
            term: 0,
        };
        self.write_request(&r.request_id, command).await?;
        Ok(Response::new(self.find(&id)?))
    }

    async fn list_nodes(&self, req: Request<pb::ListNodesRequest>) -> Res<pb::ListNodesReply> {
        self.check(&req, READ)?;
        let at = self.read_gate(&req).await?;
        let probe = req.into_inner().probe;
        let nodes = self
            .shared
            .read(|s| s.nodes.values().cloned().collect::<Vec<_>>());
        let mut out = Vec::with_capacity(nodes.len());
        let probes = futures::future::join_all(nodes.iter().map(|n| {
            let shared = self.shared.clone();
            let addr = n.address.clone();
            let node = n.id.to_string();
            async move {
                if !probe {
                    return (false, "not probed".to_string());
                }
                shared.probe_node(&node, &addr).await
            }
        }))
        .await;
        for (n, (healthy, detail)) in nodes.into_iter().zip(probes) {
            out.push(pb::NodeEntry {
                id: n.id.to_string(),
                address: n.address,
                labels: n.labels.into_iter().collect(),
                versions: n
                    .versions
                    .iter()
                    .map(|e| pb::VersionEntry {
                        version: e.version.to_string(),
                        state: e.state.to_string(),
                    })
                    .collect(),
                healthy,
                health_detail: detail,
                conflict: n
                    .conflict
                    .as_ref()
                    .map(|c| c.detail.clone())
                    .unwrap_or_default(),
                conflict_at_ms: n.conflict.as_ref().map_or(0, |c| c.at_ms),
            });
        }
        Ok(at.answer(pb::ListNodesReply { nodes: out }))
    }

    async fn cluster_status(
        &self,
        req: Request<pb::ClusterStatusRequest>,
    ) -> Res<pb::ClusterStatusReply> {
        self.check(&req, READ)?;
        Ok(Response::new(self.shared.cluster_status()))
    }

    async fn add_member(&self, req: Request<pb::MemberRequest>) -> Res<pb::ClusterStatusReply> {
        self.check(&req, WRITE)?;
        let r = req.into_inner();
        if r.address.is_empty() {
            return Err(bad(
                "a new coordinator needs an address: cluster add ID ADDR",
            ));
        }
        check_address(&r.address, "cluster add refused")?;
        if r.id == 0 {
            // 0 means "no leader" in ClusterStatus; coordinators start at 1 (`--id`).
            return Err(bad("cluster add refused: coordinator ids start at 1"));
        }
        // Two members at one address would be one process answering for both.
        if let Some(m) = self
            .shared
            .raft
            .metrics()
            .members
            .into_iter()
            .find(|m| m.id != r.id && m.addr == r.address)
        {
            return Err(bad(format!(
                "cluster add refused: {} is already coordinator {}'s address",
                shown(&r.address),
                m.id
            )));
        }
        self.shared.raft.add_member(r.id, r.address).await?;
        Ok(Response::new(self.shared.cluster_status()))
    }

    async fn remove_member(&self, req: Request<pb::MemberRequest>) -> Res<pb::ClusterStatusReply> {
        self.check(&req, WRITE)?;
        self.shared.raft.remove_member(req.into_inner().id).await?;
        Ok(Response::new(self.shared.cluster_status()))
    }

    async fn forget_node(&self, req: Request<pb::ForgetNodeRequest>) -> Res<pb::ForgetNodeReply> {
        let by = self.caller(&req, WRITE, &req.get_ref().requested_by)?;
        let r = req.into_inner();
        let id: NodeId =
            r.id.parse()
                .map_err(|e: orch_types::ParseError| bad(e.to_string()))?;
        self.write_request(&r.request_id, Command::RemoveNode { id: id.clone() })
            .await?;
        tracing::info!(node = %id, %by, "node forgotten (removed from the registry)");
        Ok(Response::new(pb::ForgetNodeReply {}))
    }

    async fn register_node(
        &self,
        req: Request<pb::RegisterNodeRequest>,
    ) -> Res<pb::RegisterNodeReply> {
        // An agent registers itself only: its certificate must name the node id it claims,
        // or a stolen n2 key could redirect n1's steps to a machine of its choosing.
        self.shared
            .security
            .mode()
            .require_name(&req, Role::Agent, &req.get_ref().id)?;
        let r = req.into_inner();
        let id: NodeId =
            r.id.parse()
                .map_err(|e: orch_types::ParseError| bad(e.to_string()))?;
        check_address(&r.address, "registration refused")?;
        let versions: Vec<VersionEntry> = r
            .versions
            .iter()
            .map(|e| {
                Ok(VersionEntry {
                    version: e
                        .version
                        .parse()
                        .map_err(|e: orch_types::ParseError| bad(e.to_string()))?,
                    state: e
                        .state
                        .parse()
                        .map_err(|e: orch_types::ParseError| bad(e.to_string()))?,
                })
            })
            .collect::<Result<_, Status>>()?;
        orch_types::check_labels(r.labels.iter())
            .map_err(|e| bad(format!("registration refused: {e}")))?;
        let labels: std::collections::BTreeMap<String, String> = r.labels.into_iter().collect();
        let stamp = orch_types::VersionStamp::from_wire(r.boot_id, r.state_rev);
        self.refuse_duplicate(&id, &r.address, r.boot_id).await?;
        self.clear_old_conflict(&id, &r.address).await;
        // Nothing to write when address and labels hold and the report either was read before
        // the recorded one or is the recorded one (same versions, same stamp). Equal versions
        // under a newer stamp are written: the stamp must move on with the node, or a delayed
        // report read in between could later pass as newer. The driver records every step's
        // report with its stamp, so that write happens only after changes made outside a
        // rollout (an operator's `node ... --agent`, a restart).
        let unchanged = self.shared.read(|s| {
            s.nodes.get(&id).is_some_and(|n| {
                n.address == r.address
                    && n.labels == labels
                    && n.activate_timeout_ms == r.activate_timeout_ms
                    // A registration proves the agent answers again: recorded.
                    && n.unresponsive.is_none()
                    && (orch_types::stale_report(stamp, n.stamp)
                        || (n.versions == versions && n.stamp == stamp))
            })
        });
        if unchanged {
            // Still confirm we lead, so the agent learns where the leader is.
            if !self.shared.raft.is_leader() {
                return Err(Error::NotLeader {
                    leader: self.shared.raft.leader(),
                }
                .into());
            }
            return Ok(Response::new(pb::RegisterNodeReply { changed: false }));
        }
        self.write(Command::RegisterNode {
            id,
            address: r.address,
            labels,
            versions,
            at_ms: now_ms(),
            stamp,
            activate_timeout_ms: r.activate_timeout_ms,
        })
        .await?;
        Ok(Response::new(pb::RegisterNodeReply { changed: true }))
    }
}

/// A conflict is written again at most this often while it goes on, and cleared once it has
/// not been seen for [`CONFLICT_FORGET_MS`].
const CONFLICT_REFRESH_MS: u64 = 60_000;
const CONFLICT_FORGET_MS: u64 = 90_000;

impl ControlService {
    /// Refuses a registration of a known node id from another address while the agent on
    /// record there is alive (it answers as that node, as another process than the one
    /// registering): two machines must never share an id (steps would go to either). A node
    /// that really moved takes over as soon as its old agent no longer answers.
    async fn refuse_duplicate(&self, id: &NodeId, address: &str, boot: u64) -> Result<(), Status> {
        let recorded = self.shared.read(|s| {
            s.nodes
                .get(id)
                .map(|n| (n.address.clone(), n.conflict.clone()))
        });
        let Some((old, conflict)) = recorded.filter(|(a, _)| a != address) else {
            return Ok(());
        };
        let Some(live) = self.shared.live_agent(id, &old).await else {
            return Ok(());
        };
        if live == boot && boot != 0 {
            return Ok(());
        }
        let detail = format!(
            "an agent at {} (boot id {boot:x}) tried to register as {id} while the live agent at {old} (boot id {live:x}) has that id",
            shown(address)
        );
        tracing::warn!(node = %id, "registration refused: {detail}");
        let now = now_ms();
        if conflict.is_none_or(|c| now.saturating_sub(c.at_ms) > CONFLICT_REFRESH_MS) {
            let c = crate::state::Conflict { detail, at_ms: now };
            let _ = self
                .shared
                .raft
                .write(Command::NodeConflict {
                    id: id.clone(),
                    conflict: Some(c),
                })
                .await;
        }
        Err(Status::failed_precondition(format!(
            "node id {id} is already taken by a live agent at {old} (boot id {live:x}); this agent at {} is refused: give it its own --node-id, or stop the other agent (this one takes over as soon as the other no longer answers), or run `orchestrator nodes forget {id}` after stopping it",
            shown(address)
        )))
    }

    /// Forgets a conflict that has not been seen for a while (the duplicate stopped trying).
    async fn clear_old_conflict(&self, id: &NodeId, address: &str) {
        let stale = self.shared.read(|s| {
            s.nodes.get(id).is_some_and(|n| {
                n.address == address
                    && n.conflict
                        .as_ref()
                        .is_some_and(|c| now_ms().saturating_sub(c.at_ms) > CONFLICT_FORGET_MS)
            })
        });
        if stale {
            let _ = self
                .shared
                .raft
                .write(Command::NodeConflict {
                    id: id.clone(),
                    conflict: None,
                })
                .await;
        }
    }
}

/// Members that must hold a package before a rollout may use it: every voter we can reach;
/// at least a majority of voters.
pub(crate) fn enough_holders(voters: &BTreeSet<u64>, holders: &[u64]) -> bool {
    let held = holders.iter().filter(|h| voters.contains(h)).count();
    held * 2 > voters.len()
}

#[cfg(test)]
mod tests {
    use super::check_address;

    #[test]
    fn addresses_must_be_host_and_port() {
        for ok in [
            "127.0.0.1:7001",
            "node1.example:7400",
            "[::1]:7001",
            "https://coord2:7001",
            "http://10.0.0.1:80/",
        ] {
            assert!(check_address(ok, "x").is_ok(), "{ok}");
        }
        for junk in [
            "",
            "/etc/passwd",
            "../x",
            "a/b",
            "x\0y:1",
            "127.0.0.1",
            "host name:80",
            "unix:///tmp/sock",
            "127.0.0.1:99999",
            "http://h:1/path",
            "ftp://h:1",
        ] {
            assert!(check_address(junk, "x").is_err(), "{junk:?}");
        }
        assert!(check_address(&format!("{}:1", "a".repeat(300)), "x").is_err());
    }
}
