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
        nodes: r.nodes().map(node_progress).collect(),
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
        term: 0,
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
        let sha = orch_release::package::normalize_digest(&h.sha256)
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
        if !r.on_failure.is_empty() {
            spec.on_failure = r
                .on_failure
                .parse::<OnFailure>()
                .map_err(|e| bad(e.to_string()))?;
        }
        match self
            .write(Command::CreateRollout {
                spec,
                at_ms: now_ms(),
            })
            .await?
        {
            SmResponse::Created { id } => Ok(Response::new(self.find(&id)?)),
            other => Err(Status::internal(format!("unexpected answer {other:?}"))),
        }
    }

    async fn get_rollout(&self, req: Request<pb::RolloutRef>) -> Res<pb::RolloutStatus> {
        self.check(&req, READ)?;
        let id = req.into_inner().id;
        let found = self.find(&id);
        // Not in the replicated state: perhaps archived (retention) into the history file.
        if found.is_err()
            && let Some(st) = self.archived_status(&id).await?
        {
            return Ok(Response::new(st));
        }
        Ok(Response::new(found?))
    }

    async fn list_rollouts(
        &self,
        req: Request<pb::ListRolloutsRequest>,
    ) -> Res<pb::ListRolloutsReply> {
        self.check(&req, READ)?;
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
        Ok(Response::new(pb::ListRolloutsReply { rollouts }))
    }

    type WatchRolloutStream = Pin<Box<dyn Stream<Item = Result<pb::RolloutStatus, Status>> + Send>>;

    async fn watch_rollout(&self, req: Request<pb::RolloutRef>) -> Res<Self::WatchRolloutStream> {
        self.check(&req, READ)?;
        let wanted = req.into_inner().id;
        let first = match self.find(&wanted) {
            Ok(st) => st,
            // Archived (it finished long ago): its final status is all there is to watch.
            Err(e) => match self.archived_status(&wanted).await? {
                Some(st) => return Ok(Response::new(Box::pin(tokio_stream::once(Ok(st))))),
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
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
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
        self.write(Command::Rollout {
            id: key,
            entry: LogEntry {
                event: Event::Command(cmd),
                at_ms: now_ms(),
                by,
            },
        })
        .await?;
        Ok(Response::new(self.find(&id)?))
    }

    async fn list_nodes(&self, req: Request<pb::ListNodesRequest>) -> Res<pb::ListNodesReply> {
        self.check(&req, READ)?;
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
            });
        }
        Ok(Response::new(pb::ListNodesReply { nodes: out }))
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
        })
        .await?;
        Ok(Response::new(pb::RegisterNodeReply { changed: true }))
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
