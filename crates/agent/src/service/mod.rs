//! The tonic `Agent` service: fenced, idempotent steps, one at a time per node, with the
//! blocking work (admission, the fence files, the driver, the audit line) run off the async
//! runtime. Every mutating call is audited, admitted or refused; reads never write.

mod calls;
mod shared;
mod upload;

use std::sync::Arc;

use orch_proto::agent::{self as pb, agent_server::Agent};
use orch_tls::Role;
use orch_types::{Version, VersionEntry};
use tonic::{Request, Response, Status, Streaming};

use crate::audit::{self, wire};
use crate::error::{Error, Result};
use crate::health;
use calls::VersionCall;
pub use shared::Stamp;
pub(crate) use shared::{Call, Shared};

/// Who may call what: steps change the node, so only coordinators (rollouts) and operators
/// (`orchestrator node --agent`); reading it is also open to viewers.
const MUTATE: &[Role] = &[Role::Coordinator, Role::Operator];
const READ: &[Role] = &[Role::Coordinator, Role::Operator, Role::Viewer];
/// Peer relay: other agents fetch chunks of staged packages (coordinators may too).
const RELAY: &[Role] = &[Role::Agent, Role::Coordinator];
/// Chunks read ahead of a slow fetcher: bounded, so a peer that stops reading costs no memory.
const RELAY_QUEUE: usize = 4;

#[derive(Clone)]
pub struct AgentService {
    pub(crate) shared: Arc<Shared>,
}

fn parse_version(s: &str) -> Result<Version> {
    s.parse::<Version>()
        .map_err(|e| Error::BadRequest(e.to_string()))
}

fn entries(v: &[VersionEntry]) -> Vec<pb::VersionEntry> {
    v.iter().map(pb::VersionEntry::from).collect()
}

fn joined(e: tokio::task::JoinError) -> Error {
    Error::task("the step task")(e)
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn node_info(
        &self,
        req: Request<pb::NodeInfoRequest>,
    ) -> Result<Response<pb::NodeInfoReply>, Status> {
        self.shared.auth.require(&req, READ)?;
        // Never wait for an in-flight step (an activation can take a minute): while one runs,
        // the fence is reported from the last snapshot.
        let view = self
            .shared
            .view
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Ok(Response::new(pb::NodeInfoReply {
            node_id: self.shared.node_id.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            root_dir: self.shared.root.display().to_string(),
            labels: self.shared.labels.clone().into_iter().collect(),
            free_disk_bytes: free_disk(&self.shared.root),
            driver: self.shared.driver.name().to_string(),
            last_fence: view.last_fence,
            cluster_id: view.cluster_id,
            held_by: view.held_by,
            activate_timeout_ms: u64::try_from(self.shared.activate_timeout.as_millis())
                .unwrap_or(u64::MAX),
            boot_id: self.shared.stamp.read().0,
        }))
    }

    async fn versions(
        &self,
        req: Request<pb::VersionsRequest>,
    ) -> Result<Response<pb::VersionsReply>, Status> {
        self.shared.auth.require(&req, READ)?;
        let reported = self.reported().await.unwrap_or_default();
        let (boot_id, state_rev) = self.shared.stamp.read();
        let (versions, running) = self
            .blocking(|d| {
                let v = d.versions()?;
                let r = d.running()?;
                Ok((v, r))
            })
            .await?;
        Ok(Response::new(pb::VersionsReply {
            versions: entries(&versions),
            running_version: running.map(|v| v.to_string()).unwrap_or_default(),
            reported_version: reported,
            boot_id,
            state_rev,
        }))
    }

    async fn push_package(
        &self,
        req: Request<Streaming<pb::PackageChunk>>,
    ) -> Result<Response<pb::PushReply>, Status> {
        self.push(req).await
    }

    async fn missing_chunks(
        &self,
        req: Request<pb::MissingChunksRequest>,
    ) -> Result<Response<pb::MissingChunksReply>, Status> {
        self.shared.auth.require(&req, READ)?;
        let r = req.into_inner();
        let max = self.shared.max_package_bytes;
        let header =
            crate::push::Header::validate(&r.name, &r.version, &r.sha256, r.size, vec![], max)?;
        let list = crate::delta::checked_list(&r.chunks, r.size)?;
        let releases = self.shared.root.join("releases");
        let reply = tokio::task::spawn_blocking(move || {
            let file_name = header.file_name();
            if crate::push::holds(&releases.join(&file_name), &header.sha256) {
                return pb::MissingChunksReply {
                    missing: vec![],
                    already: true,
                };
            }
            pb::MissingChunksReply {
                missing: crate::delta::missing(&releases, &file_name, &list),
                already: false,
            }
        })
        .await
        .map_err(joined)?;
        Ok(Response::new(reply))
    }

    type FetchChunksStream = tokio_stream::wrappers::ReceiverStream<Result<pb::ChunkData, Status>>;

    async fn fetch_chunks(
        &self,
        req: Request<pb::FetchChunksRequest>,
    ) -> Result<Response<Self::FetchChunksStream>, Status> {
        self.shared.auth.require(&req, RELAY)?;
        let r = req.into_inner();
        let max = self.shared.max_package_bytes;
        let header = crate::push::Header::validate(&r.name, &r.version, &r.sha256, 0, vec![], max)?;
        let releases = self.shared.root.join("releases");
        let indexes = r.indexes;
        let (tx, rx) = tokio::sync::mpsc::channel(RELAY_QUEUE);
        let source = {
            let indexes = indexes.clone();
            tokio::task::spawn_blocking(move || {
                crate::relay::Source::open(&releases, &header.file_name(), &header.sha256, &indexes)
            })
            .await
            .map_err(joined)??
        };
        let metrics = self.shared.metrics.clone();
        // Reads run on the blocking pool, one chunk ahead of the sender at most RELAY_QUEUE.
        tokio::task::spawn_blocking(move || {
            for index in indexes {
                let msg = source
                    .read(index)
                    .map(|data| pb::ChunkData { index, data })
                    .map_err(Status::from);
                let failed = msg.is_err();
                if let Ok(m) = &msg {
                    metrics.relayed("served", m.data.len() as u64);
                }
                // The fetcher went away: stop reading.
                if tx.blocking_send(msg).is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn unpack(
        &self,
        req: Request<pb::UnpackRequest>,
    ) -> Result<Response<pb::StepReply>, Status> {
        let caller = self.shared.caller(&req, MUTATE);
        let r = req.into_inner();
        let req = VersionCall {
            what: format!("unpack {}", wire(&r.version)),
            fence: r.fence,
            force: r.force,
            version: r.version,
            sha256: r.expected_sha256,
        };
        let gate = self.signature_gate();
        self.versioned(caller, req, move |d, v, sha| {
            gate(d, v, sha)?;
            d.unpack(v, sha)
        })
        .await
    }

    async fn install(
        &self,
        req: Request<pb::InstallRequest>,
    ) -> Result<Response<pb::StepReply>, Status> {
        let caller = self.shared.caller(&req, MUTATE);
        let r = req.into_inner();
        let p = r.permanent;
        let req = VersionCall {
            what: format!("install {} permanent={p}", wire(&r.version)),
            fence: r.fence,
            force: r.force,
            version: r.version,
            sha256: r.expected_sha256,
        };
        let gate = self.signature_gate();
        self.versioned(caller, req, move |d, v, sha| {
            gate(d, v, sha)?;
            d.install(v, p, sha)
        })
        .await
    }

    async fn permanent(
        &self,
        req: Request<pb::VersionRequest>,
    ) -> Result<Response<pb::StepReply>, Status> {
        let caller = self.shared.caller(&req, MUTATE);
        self.version_step(caller, "permanent", req.into_inner(), |d, v| d.permanent(v))
            .await
    }

    async fn downgrade(
        &self,
        req: Request<pb::VersionRequest>,
    ) -> Result<Response<pb::StepReply>, Status> {
        let caller = self.shared.caller(&req, MUTATE);
        self.version_step(caller, "downgrade", req.into_inner(), |d, v| d.downgrade(v))
            .await
    }

    async fn uninstall(
        &self,
        req: Request<pb::VersionRequest>,
    ) -> Result<Response<pb::StepReply>, Status> {
        let caller = self.shared.caller(&req, MUTATE);
        self.version_step(caller, "uninstall", req.into_inner(), |d, v| d.uninstall(v))
            .await
    }

    async fn after_gate(
        &self,
        req: Request<pb::VersionRequest>,
    ) -> Result<Response<pb::StepReply>, Status> {
        let caller = self.shared.caller(&req, MUTATE);
        self.version_step(caller, "after-gate", req.into_inner(), |d, v| {
            d.after_gate(v)
        })
        .await
    }

    async fn release(
        &self,
        req: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseReply>, Status> {
        let (caller, allowed) = self.shared.caller(&req, &[Role::Coordinator]);
        let r = req.into_inner();
        let call = Call {
            caller,
            fence: r.fence,
            force: false,
            what: "release".into(),
        };
        self.check(&call, allowed)?;
        if !call.caller.may_fence() {
            let e = Error::Forbidden {
                caller: call.caller.to_string(),
            };
            return Err(self.refused(&call, e));
        }
        let fence = self.parsed(
            &call,
            call.fence.clone().ok_or_else(|| {
                Error::InvalidFence(
                    "release refused: it needs the fence of the rollout that ends".into(),
                )
            }),
        )?;
        let released = self
            .fence_change(
                call,
                move |fences, _| fences.release(&fence, audit::now_ms()),
                |released| *released,
            )
            .await?;
        Ok(Response::new(pb::ReleaseReply { released }))
    }

    async fn rebind(
        &self,
        req: Request<pb::RebindRequest>,
    ) -> Result<Response<pb::RebindReply>, Status> {
        // Operators only: a coordinator cluster must not be able to take nodes from another.
        let (caller, allowed) = self.shared.caller(&req, &[Role::Operator]);
        let r = req.into_inner();
        let call = Call {
            caller,
            fence: None,
            force: false,
            what: if r.cluster_id.is_empty() {
                "unbind".into()
            } else {
                format!("rebind {}", wire(&r.cluster_id))
            },
        };
        self.check(&call, allowed)?;
        let (previous, cluster_id) = self
            .fence_change(
                call,
                move |fences, call| {
                    fences.rebind(&r.cluster_id, &call.caller.to_string(), audit::now_ms())
                },
                |(previous, new)| previous != new,
            )
            .await?;
        Ok(Response::new(pb::RebindReply {
            previous_cluster_id: previous,
            cluster_id,
        }))
    }

    async fn health(
        &self,
        req: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthReply>, Status> {
        self.shared.auth.require(&req, READ)?;
        let r = req.into_inner();
        let expect = if r.expect_version.is_empty() {
            None
        } else {
            Some(parse_version(&r.expect_version)?)
        };
        let running = self.blocking(|d| d.running()).await?;
        let started = std::time::Instant::now();
        let h = health::check(&self.shared.health, expect, running, None).await;
        self.shared
            .metrics
            .observe_probe(h.healthy, started.elapsed().as_secs_f64());
        Ok(Response::new(pb::HealthReply {
            healthy: h.healthy,
            reported_version: h.reported.unwrap_or_default(),
            check: h.check.to_string(),
            detail: h.detail,
        }))
    }
}

/// Free bytes for unprivileged users on the root's file system (0 when unknown).
fn free_disk(root: &std::path::Path) -> u64 {
    rustix::fs::statvfs(root)
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
        .unwrap_or(0)
}

/// The request's expected digest (empty: none). Its form is checked where the package is
/// known, so the refusal names the package as the local command's does; a value longer than
/// any digest (64 hex characters) is refused here, without quoting it back.
fn expected_sha256(s: String) -> Result<Option<String>> {
    if s.len() > 64 {
        return Err(Error::BadRequest(format!(
            "expected_sha256 is not a hex SHA-256 ({} characters)",
            s.len()
        )));
    }
    Ok((!s.is_empty()).then_some(s))
}
