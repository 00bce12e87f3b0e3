//! The tonic `Agent` service: fenced, idempotent steps, one at a time per node, with the
//! blocking driver work run off the async runtime.

use std::path::PathBuf;
use std::sync::Arc;

use orch_proto::agent::{self as pb, agent_server::Agent};
use orch_tls::{AuthMode, Role};
use orch_types::{Version, VersionEntry};
use tokio::sync::Mutex;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::driver::{Driver, StepOutcome};
use crate::error::{Error, Result};
use crate::fence::{Fence, FenceStore};
use crate::health::{self, HealthConfig};
use crate::push::{Header, Upload};

/// Who may call what: steps change the node, so only coordinators (rollouts) and operators
/// (`orchestrator node --agent`); reading it is also open to viewers.
const MUTATE: &[Role] = &[Role::Coordinator, Role::Operator];
const READ: &[Role] = &[Role::Coordinator, Role::Operator, Role::Viewer];

pub(crate) struct Shared {
    pub node_id: String,
    /// Checks the caller's certificate on every call (or nothing, with `--insecure`).
    pub auth: AuthMode,
    pub root: PathBuf,
    pub labels: std::collections::BTreeMap<String, String>,
    pub driver: Arc<dyn Driver>,
    pub health: HealthConfig,
    pub max_package_bytes: u64,
    /// Empty: signatures are not required.
    pub trusted: orch_release::TrustedKeys,
    /// Held for the whole of a mutating step: one step at a time per node.
    pub steps: Arc<Mutex<FenceStore>>,
    /// The highest fence, readable without the step lock.
    pub last_fence: std::sync::Mutex<Option<pb::Fence>>,
    /// Orders this process's reports of its releases (see [`Stamp`]).
    pub stamp: Arc<Stamp>,
}

/// This agent process's id and a count of its completed state-changing steps, sent with every
/// report of the node's releases so the coordinators can drop a report that arrives after a
/// newer one. Read it *before* reading the releases: a report may then be newer than its stamp
/// says (harmless), never older.
pub struct Stamp {
    boot: u64,
    rev: std::sync::atomic::AtomicU64,
}

impl Stamp {
    pub fn new() -> Stamp {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        // Never 0 (0 means "not stamped" on the wire).
        let boot = (nanos ^ (u64::from(std::process::id()) << 32)).max(1);
        Stamp {
            boot,
            rev: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `(boot_id, state_rev)` now.
    pub fn read(&self) -> (u64, u64) {
        (
            self.boot,
            self.rev.load(std::sync::atomic::Ordering::SeqCst),
        )
    }

    /// A step changed the node's releases.
    pub fn bump(&self) {
        self.rev.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Default for Stamp {
    fn default() -> Self {
        Stamp::new()
    }
}

#[derive(Clone)]
pub struct AgentService {
    pub(crate) shared: Arc<Shared>,
}

fn fence_of(f: Option<pb::Fence>) -> Option<Fence> {
    f.map(|f| Fence {
        term: f.term,
        rollout_id: f.rollout_id,
        step: f.step,
    })
}

fn parse_version(s: &str) -> Result<Version> {
    s.parse::<Version>()
        .map_err(|e| Error::BadRequest(e.to_string()))
}

fn entries(v: &[VersionEntry]) -> Vec<pb::VersionEntry> {
    v.iter().map(pb::VersionEntry::from).collect()
}

impl AgentService {
    /// Runs blocking driver work on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Driver) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let driver = self.shared.driver.clone();
        tokio::task::spawn_blocking(move || f(driver.as_ref()))
            .await
            .map_err(|e| Error::Internal(format!("step task failed: {e}")))?
    }

    /// A fenced, serialized step that returns the outcome and the releases after it.
    async fn step(
        &self,
        fence: Option<pb::Fence>,
        what: String,
        f: impl FnOnce(&dyn Driver) -> Result<StepOutcome> + Send + 'static,
    ) -> Result<pb::StepReply> {
        let mut fences = self.shared.steps.clone().lock_owned().await;
        fences.admit(fence_of(fence).as_ref(), &what)?;
        self.snapshot_fence(&fences);
        // The guard moves into the blocking task: even if this request is cancelled, the next
        // step (and a graceful shutdown) waits until the driver work has really finished.
        let stamp = self.shared.stamp.clone();
        let (outcome, versions, (boot_id, state_rev)) = self
            .blocking(move |d| {
                let _step = fences;
                let o = f(d)?;
                // Under the step lock, so the stamp read next describes exactly the releases
                // read after it. Steps that changed nothing (or failed, which changes nothing)
                // keep the count: reports with equal counts are all accepted.
                if o.changed {
                    stamp.bump();
                }
                let at = stamp.read();
                Ok((o, d.versions()?, at))
            })
            .await?;
        tracing::info!(node = %self.shared.node_id, step = %what, changed = outcome.changed, "step done");
        Ok(pb::StepReply {
            changed: outcome.changed,
            messages: outcome.messages,
            versions: entries(&versions),
            boot_id,
            state_rev,
        })
    }

    /// For drivers that do not look packages up themselves (the EMQX script): before unpacking
    /// or installing a version the node does not have yet, its `releases/<name>-<v>.zip` must
    /// exist (else `not-found`, decided before the script runs, as the native store does),
    /// have the operator's `sha256` if one was given and, with trusted keys, carry a valid
    /// `.sig` from one of them.
    fn signature_gate(
        &self,
    ) -> impl Fn(&dyn Driver, Version, Option<&str>) -> Result<()> + Send + 'static {
        let trusted = self.shared.trusted.clone();
        let releases = self.shared.root.join("releases");
        move |d: &dyn Driver, v: Version, sha256: Option<&str>| {
            if d.checks_signatures() || d.versions()?.iter().any(|e| e.version == v) {
                return Ok(());
            }
            let zip = orch_release::store::find_package_in(&releases, v)?;
            // One pass over the file: the signature check verifies the digest first.
            if !trusted.is_empty() {
                orch_release::store::check_signature(&zip, sha256, &trusted)?;
            } else if orch_release::package::expected_digest(&zip, sha256)?.is_some() {
                orch_release::package::digest_checked(&zip, sha256)?;
            }
            Ok(())
        }
    }

    fn snapshot_fence(&self, fences: &FenceStore) {
        *self
            .shared
            .last_fence
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = fences.highest().map(|f| pb::Fence {
            term: f.term,
            rollout_id: f.rollout_id.clone(),
            step: f.step,
            ..Default::default()
        });
    }

    /// What the service reports (health URL `version`), repairing the store when it shows
    /// the node was restarted. Skips the repair while a step is in flight.
    async fn reported_and_reconcile(&self) -> Option<String> {
        let url = self.shared.health.url.as_ref()?;
        let r = health::probe_http(url, self.shared.health.timeout, None).await;
        let reported = r.reported?;
        self.reconcile(&reported).await;
        Some(reported)
    }

    /// Repairs the store from what the service reports (see `reported_and_reconcile`).
    async fn reconcile(&self, reported: &str) {
        if let (Ok(v), Ok(_guard)) = (reported.parse::<Version>(), self.shared.steps.try_lock()) {
            match self.blocking(move |d| d.reconcile_running(v)).await {
                Ok(Some(note)) => {
                    self.shared.stamp.bump();
                    tracing::warn!(node = %self.shared.node_id, "{note}")
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(node = %self.shared.node_id, "reconcile failed: {e}"),
            }
        }
    }
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
        let last_fence = self
            .shared
            .last_fence
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
            last_fence,
            ..Default::default()
        }))
    }

    async fn versions(
        &self,
        req: Request<pb::VersionsRequest>,
    ) -> Result<Response<pb::VersionsReply>, Status> {
        self.shared.auth.require(&req, READ)?;
        let reported = self.reported_and_reconcile().await.unwrap_or_default();
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
        self.shared.auth.require(&req, MUTATE)?;
        let mut stream = req.into_inner();
        let first = stream
            .next()
            .await
            .ok_or_else(|| Error::BadRequest("push refused: empty stream".into()))??;
        let h = first.header.ok_or_else(|| {
            Error::BadRequest("push refused: the first chunk must carry the header".into())
        })?;
        let mut header = Header::validate(
            &h.name,
            &h.version,
            &h.sha256,
            h.size,
            h.signature,
            self.shared.max_package_bytes,
        )?;
        // Before the fence is recorded or a byte is written: a refusal changes nothing.
        header.check_signature(&self.shared.trusted)?;
        let file_name = header.file_name();
        {
            let mut fences = self.shared.steps.lock().await;
            fences.admit(fence_of(h.fence).as_ref(), &format!("push {file_name}"))?;
            self.snapshot_fence(&fences);
        }
        let releases = self.shared.root.join("releases");
        let path = format!("releases/{file_name}");
        let Some(mut upload) = Upload::start(&releases, header)? else {
            // Drain what the client still sends; the identical package is already here.
            while let Some(chunk) = stream.next().await {
                chunk?;
            }
            return Ok(Response::new(pb::PushReply {
                path,
                already: true,
                message: format!("Package {file_name} is already on this node"),
            }));
        };
        upload.write(&first.data)?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                Status::cancelled(format!(
                    "push of {file_name} interrupted ({e}); package discarded"
                ))
            })?;
            upload.write(&chunk.data)?;
        }
        let finished = tokio::task::spawn_blocking(move || upload.finish())
            .await
            .map_err(|e| Status::internal(format!("push task failed: {e}")))??;
        tracing::info!(node = %self.shared.node_id, file = %finished.display(), "package received");
        Ok(Response::new(pb::PushReply {
            path,
            already: false,
            message: format!("Received package {file_name}"),
        }))
    }

    async fn unpack(
        &self,
        req: Request<pb::UnpackRequest>,
    ) -> Result<Response<pb::StepReply>, Status> {
        self.shared.auth.require(&req, MUTATE)?;
        let r = req.into_inner();
        let v = parse_version(&r.version)?;
        let sha = expected_sha256(r.expected_sha256)?;
        let gate = self.signature_gate();
        Ok(Response::new(
            self.step(r.fence, format!("unpack {v}"), move |d| {
                gate(d, v, sha.as_deref())?;
                d.unpack(v, sha.as_deref())
            })
            .await?,
        ))
    }

    async fn install(
        &self,
        req: Request<pb::InstallRequest>,
    ) -> Result<Response<pb::StepReply>, Status> {
        self.shared.auth.require(&req, MUTATE)?;
        let r = req.into_inner();
        let v = parse_version(&r.version)?;
        let p = r.permanent;
        let sha = expected_sha256(r.expected_sha256)?;
        let gate = self.signature_gate();
        Ok(Response::new(
            self.step(r.fence, format!("install {v} permanent={p}"), move |d| {
                gate(d, v, sha.as_deref())?;
                d.install(v, p, sha.as_deref())
            })
            .await?,
        ))
    }

    async fn permanent(
        &self,
        req: Request<pb::VersionRequest>,
    ) -> Result<Response<pb::StepReply>, Status> {
        self.shared.auth.require(&req, MUTATE)?;
        let r = req.into_inner();
        let v = parse_version(&r.version)?;
        Ok(Response::new(
            self.step(r.fence, format!("permanent {v}"), move |d| d.permanent(v))
                .await?,
        ))
    }

    async fn downgrade(
        &self,
        req: Request<pb::VersionRequest>,
    ) -> Result<Response<pb::StepReply>, Status> {
        self.shared.auth.require(&req, MUTATE)?;
        let r = req.into_inner();
        let v = parse_version(&r.version)?;
        Ok(Response::new(
            self.step(r.fence, format!("downgrade {v}"), move |d| d.downgrade(v))
                .await?,
        ))
    }

    async fn uninstall(
        &self,
        req: Request<pb::VersionRequest>,
    ) -> Result<Response<pb::StepReply>, Status> {
        self.shared.auth.require(&req, MUTATE)?;
        let r = req.into_inner();
        let v = parse_version(&r.version)?;
        Ok(Response::new(
            self.step(r.fence, format!("uninstall {v}"), move |d| d.uninstall(v))
                .await?,
        ))
    }

    async fn release(
        &self,
        _req: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseReply>, Status> {
        Err(Status::unimplemented("release: not yet"))
    }

    async fn rebind(
        &self,
        _req: Request<pb::RebindRequest>,
    ) -> Result<Response<pb::RebindReply>, Status> {
        Err(Status::unimplemented("rebind: not yet"))
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
        // One GET serves both the repair and the check: probing twice would double a check's
        // latency and could judge a different answer than the one the repair saw.
        let url_probe = match &self.shared.health.url {
            Some(url) => {
                let r = health::probe_http(url, self.shared.health.timeout, expect).await;
                if let Some(reported) = &r.reported {
                    self.reconcile(reported).await;
                }
                Some(r)
            }
            None => None,
        };
        let running = self.blocking(|d| d.running()).await?;
        let h = health::check(&self.shared.health, expect, running, url_probe).await;
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
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(root.as_os_str().as_bytes()) else {
        return 0;
    };
    // SAFETY: statvfs writes into the zeroed struct we own; the path is a valid C string.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut s) == 0 {
            (s.f_bavail as u64).saturating_mul(s.f_frsize as u64)
        } else {
            0
        }
    }
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
