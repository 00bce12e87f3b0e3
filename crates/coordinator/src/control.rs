//! The `Control` service: operators' API and agent registration. Reads are answered from this
//! coordinator's replicated state; writes go through Raft and so only succeed on the leader
//! (a follower answers NotLeader with the leader's address, and clients retry there).
//!
//! The service's methods are here; `read` decides whether a read may be answered and finds
//! rollouts, `status` renders them, `start` builds a rollout's spec from a request, `plan` runs
//! preflight without recording anything (dry runs, and refusing a rollout before it is
//! recorded), `register` takes agent registrations, `watch` streams a rollout's changes.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use orch_proto::control::{self as pb, control_server::Control};
use orch_rollout::{Event, LogEntry};
use orch_tls::Role;
use orch_types::{NodeId, Version};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

mod plan;
mod read;
mod register;
mod start;
mod status;
mod watch;

pub use status::{status_of, status_of_archived};

use crate::Shared;
use crate::driver::now_ms;
use crate::error::Error;
use crate::state::{Command, PackageRecord, Response as SmResponse};

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

impl ControlService {
    /// Uploads go to the leader (the client retries there).
    fn leader_only(&self) -> Result<(), Status> {
        if self.shared.raft.is_leader() {
            return Ok(());
        }
        Err(Error::NotLeader {
            leader: self.shared.raft.leader(),
        }
        .into())
    }

    /// An upload's header, checked: its version, digest and signature. With trusted keys,
    /// unsigned code stops here, before a byte is stored, copied or staged.
    fn upload_header(
        &self,
        h: &pb::UploadHeader,
    ) -> Result<(Version, String, Option<Vec<u8>>), Status> {
        orch_types::validate_package_name(&h.name).map_err(|e| bad(e.to_string()))?;
        let version: Version = h
            .version
            .parse()
            .map_err(|e: orch_types::ParseError| bad(e.to_string()))?;
        let sha = orch_package::digest::normalize_digest(&h.sha256)
            .ok_or_else(|| bad("upload refused: sha256 is not a hex SHA-256 digest"))?;
        let sig = (!h.signature.is_empty()).then(|| h.signature.clone());
        self.shared.blobs.check_signature(
            &format!("{}-{version}.zip", h.name),
            sig.as_deref(),
            &sha,
        )?;
        Ok((version, sha, sig))
    }

    /// After an upload is stored here: copies it to the other coordinators and records it.
    async fn uploaded(
        &self,
        h: pb::UploadHeader,
        version: Version,
        sha: String,
        already: bool,
    ) -> Res<pb::UploadReply> {
        if !already {
            self.shared.metrics.package_uploaded.inc_by(h.size);
        }
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
}

#[tonic::async_trait]
impl Control for ControlService {
    async fn upload_package(
        &self,
        req: Request<Streaming<pb::UploadChunk>>,
    ) -> Res<pb::UploadReply> {
        self.check(&req, WRITE)?;
        self.leader_only()?;
        let mut s = req.into_inner();
        let first = s
            .next()
            .await
            .ok_or_else(|| bad("upload refused: empty stream"))??;
        let h = first
            .header
            .ok_or_else(|| bad("upload refused: the first chunk must carry the header"))?;
        let (version, sha, sig) = self.upload_header(&h)?;
        let rest = s.map(|c| c.map(|c| c.data));
        let already = self
            .shared
            .blobs
            .receive(&sha, h.size, sig, first.data, rest)
            .await?;
        self.uploaded(h, version, sha, already).await
    }

    async fn missing_package_chunks(
        &self,
        req: Request<pb::MissingPackageChunksRequest>,
    ) -> Res<pb::MissingPackageChunksReply> {
        self.check(&req, WRITE)?;
        self.leader_only()?;
        let r = req.into_inner();
        let list = crate::blobs::checked_list(
            r.chunks.iter().map(|c| (c.size, c.sha256.as_slice())),
            r.size,
        )?;
        let reply = match self.shared.blobs.missing_chunks(&r.sha256, list).await? {
            None => pb::MissingPackageChunksReply {
                missing: vec![],
                stored: true,
            },
            Some(missing) => pb::MissingPackageChunksReply {
                missing,
                stored: false,
            },
        };
        Ok(Response::new(reply))
    }

    async fn upload_package_delta(
        &self,
        req: Request<Streaming<pb::UploadDeltaChunk>>,
    ) -> Res<pb::UploadReply> {
        self.check(&req, WRITE)?;
        self.leader_only()?;
        let mut s = req.into_inner();
        let first = s
            .next()
            .await
            .ok_or_else(|| bad("upload refused: empty stream"))??;
        let h = first
            .header
            .ok_or_else(|| bad("upload refused: the first chunk must carry the header"))?;
        let (version, sha, sig) = self.upload_header(&h)?;
        let delta = crate::blobs::Delta {
            list: crate::blobs::checked_list(
                first.chunks.iter().map(|c| (c.size, c.sha256.as_slice())),
                h.size,
            )?,
            sent: first.sent,
        };
        let rest = s.map(|c| c.map(|c| c.data));
        let already = self
            .shared
            .blobs
            .receive_delta(&sha, h.size, sig, delta, first.data, rest)
            .await?;
        self.uploaded(h, version, sha, already).await
    }

    async fn start_rollout(&self, req: Request<pb::StartRolloutRequest>) -> Res<pb::RolloutStatus> {
        let requested_by = self.caller(&req, WRITE, &req.get_ref().requested_by)?;
        let r = req.into_inner();
        let spec = self.rollout_spec(&r, requested_by).await?;
        // Refused rollouts are never recorded: `rollouts` holds only real ones.
        self.refuse_before_recording(&spec, &r.request_id).await?;
        let create = Command::CreateRollout {
            spec,
            at_ms: now_ms(),
        };
        match self.write_request(&r.request_id, create).await? {
            SmResponse::Created { id } => Ok(Response::new(self.find(&id)?)),
            other => Err(Status::internal(format!("unexpected answer {other:?}"))),
        }
    }

    async fn plan_rollout(&self, req: Request<pb::PlanRolloutRequest>) -> Res<pb::RolloutPlan> {
        let start = req.get_ref().start.clone().unwrap_or_default();
        let requested_by = self.caller(&req, WRITE, &start.requested_by)?;
        // As fresh as a read: a plan must see the rollout that was just started.
        let at = self.read_gate(&req).await?;
        let r = req.into_inner();
        let mut spec = self.rollout_spec(&start, requested_by).await?;
        self.precheck(&spec)?;
        let signed = match &r.package {
            Some(h) if start.package_sha256.is_empty() => {
                spec.package = Some(self.unstored_package(h, spec.version)?);
                !h.signature.is_empty()
            }
            Some(_) => {
                return Err(bad(
                    "give the package either uploaded (start.package_sha256) or described (package), not both",
                ));
            }
            None => spec
                .package
                .as_ref()
                .is_some_and(|p| matches!(self.shared.blobs.signature(&p.sha256), Ok(Some(_)))),
        };
        spec.validate().map_err(|e| bad(e.to_string()))?;
        let plan = if r.skip_preflight {
            None
        } else {
            Some(self.plan_of(&spec).await?)
        };
        Ok(at.answer(plan::plan_reply(&spec, plan, signed)))
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
            let mut out: Vec<_> = archived
                .iter()
                .map(|h| status_of_archived(h, false))
                .collect();
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

    type WatchRolloutStream = watch::WatchStream;

    async fn watch_rollout(&self, req: Request<pb::RolloutRef>) -> Res<Self::WatchRolloutStream> {
        self.watch(req).await
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
        let r = req.into_inner();
        let (probe, max_age) = (r.probe, Duration::from_millis(r.probe_max_age_ms));
        let nodes = self
            .shared
            .read(|s| s.nodes.values().cloned().collect::<Vec<_>>());
        if probe {
            self.shared
                .probes
                .retain(|id| nodes.iter().any(|n| n.id.as_str() == id));
        }
        let mut out = Vec::with_capacity(nodes.len());
        let probes = futures::future::join_all(nodes.iter().map(|n| {
            let shared = self.shared.clone();
            let addr = n.address.clone();
            let node = n.id.to_string();
            async move {
                if !probe {
                    return (false, "not probed".to_string());
                }
                shared.probe_node_within(&node, &addr, max_age).await
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
        self.register(req).await
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
