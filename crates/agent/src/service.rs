//! The tonic `Agent` service: fenced, idempotent steps, one at a time per node, with the
//! blocking work (admission, the fence files, the driver, the audit line) run off the async
//! runtime. Every mutating call is audited, admitted or refused; reads never write.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use orch_proto::agent::{self as pb, agent_server::Agent};
use orch_tls::{AuthMode, Role};
use orch_types::{Version, VersionEntry};
use tokio::sync::Mutex;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::audit::{self, AuditLog, Caller, wire};
use crate::driver::{Driver, StepOutcome};
use crate::error::{Error, Result};
use crate::fence::{Admission, FenceStore, View};
use crate::health::{self, HealthConfig};
use crate::push::{Header, Upload, Writer};

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
    pub trusted: orch_package::TrustedKeys,
    /// Held for the whole of a mutating step: one step at a time per node.
    pub steps: Arc<Mutex<FenceStore>>,
    /// The binding, highest fence and holder, readable without the step lock.
    pub view: std::sync::Mutex<View>,
    /// Orders this process's reports of its releases (see [`Stamp`]).
    pub stamp: Arc<Stamp>,
    pub audit: AuditLog,
    /// `--activate-timeout`, reported in NodeInfo.
    pub activate_timeout: Duration,
    /// Wakes the registration loop when the node changed outside a step.
    pub changed: Arc<tokio::sync::Notify>,
}

impl Shared {
    /// Publishes what NodeInfo shows after the fence store changed.
    pub fn publish(&self, fences: &FenceStore) {
        *self.view.lock().unwrap_or_else(|p| p.into_inner()) = fences.view();
    }

    /// The caller, and whether its role is one of `allowed` (under `--insecure`: everyone,
    /// unauthenticated). The caller is known even when refused, for the audit line.
    fn caller<T>(&self, req: &Request<T>, allowed: &[Role]) -> (Caller, Result<(), Status>) {
        match self.auth {
            AuthMode::Insecure => (Caller::Unauthenticated, Ok(())),
            AuthMode::Mtls => match orch_tls::identity_of(req) {
                Err(s) => (Caller::Unidentified, Err(s)),
                Ok(id) => {
                    let allowed = id.require(allowed);
                    (Caller::Cert(id), allowed)
                }
            },
        }
    }

    /// Admits `call` (recording its fence) and publishes the new view. Blocking.
    fn admit(&self, fences: &mut FenceStore, call: &Call) -> Result<()> {
        fences.admit(&Admission {
            fence: call.fence.as_ref(),
            force: call.force,
            may_fence: call.caller.may_fence(),
            caller: &call.caller.to_string(),
            what: &call.what,
            now_ms: audit::now_ms(),
        })?;
        self.publish(fences);
        Ok(())
    }

    pub(crate) fn record(&self, call: &Call, result: &str) {
        self.audit.record(
            &call.caller,
            &audit::fence_field(call.fence.as_ref()),
            &call.what,
            result,
        );
    }
}

/// One mutating call, as admitted and audited.
#[derive(Debug, Clone)]
pub(crate) struct Call {
    pub caller: Caller,
    pub fence: Option<pb::Fence>,
    pub force: bool,
    /// The step as the audit log shows it (wire values escaped).
    pub what: String,
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

impl AgentService {
    /// Runs blocking driver work on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Driver) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let driver = self.shared.driver.clone();
        tokio::task::spawn_blocking(move || f(driver.as_ref()))
            .await
            .map_err(joined)?
    }

    /// A status not made by the agent (the role check, the transport), audited.
    fn denied(&self, call: &Call, s: Status) -> Status {
        self.shared.record(call, &audit::status(&s));
        s
    }

    /// The agent's own refusal or failure outside [`AgentService::step`], audited.
    fn refused(&self, call: &Call, e: Error) -> Status {
        self.shared.record(call, &audit::error(&e));
        e.into()
    }

    /// The role check's verdict, a refusal audited.
    fn check(&self, call: &Call, allowed: Result<(), Status>) -> Result<(), Status> {
        allowed.map_err(|s| self.denied(call, s))
    }

    /// A result decided outside a step (a malformed field, the upload), a refusal audited.
    fn parsed<T>(&self, call: &Call, r: Result<T>) -> Result<T, Status> {
        r.map_err(|e| self.refused(call, e))
    }

    /// A fenced (or unfenced), serialized, audited step that returns the outcome and the
    /// releases after it.
    async fn step(
        &self,
        call: Call,
        f: impl FnOnce(&dyn Driver) -> Result<StepOutcome> + Send + 'static,
    ) -> Result<pb::StepReply> {
        let guard = self.shared.steps.clone().lock_owned().await;
        let shared = self.shared.clone();
        // The guard moves into the blocking task: even if this request is cancelled, the next
        // step (and a graceful shutdown) waits until the driver work has really finished.
        // Admission happens there too, right before the work: a deadline that passed while
        // this request waited (for the lock, or in a frozen agent's socket) is refused.
        let (outcome, versions, (boot_id, state_rev)) = tokio::task::spawn_blocking(move || {
            let mut fences = guard;
            let r = shared
                .admit(&mut fences, &call)
                .and_then(|()| f(shared.driver.as_ref()));
            shared.record(
                &call,
                &match &r {
                    Ok(o) => audit::ok(o.changed),
                    Err(e) => audit::error(e),
                },
            );
            let o = r?;
            // Under the step lock, so the stamp read next describes exactly the releases read
            // after it. Steps that changed nothing (or failed, which changes nothing) keep the
            // count: reports with equal counts are all accepted.
            if o.changed {
                shared.stamp.bump();
            }
            let at = shared.stamp.read();
            Ok::<_, Error>((o, shared.driver.versions()?, at))
        })
        .await
        .map_err(joined)??;
        tracing::info!(node = %self.shared.node_id, changed = outcome.changed, "step done");
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
                orch_package::signing::check_signature(&zip, sha256, &trusted)?;
            } else if orch_package::digest::expected_digest(&zip, sha256)?.is_some() {
                orch_package::digest::digest_checked(&zip, sha256)?;
            }
            Ok(())
        }
    }

    /// What the service reports through its health URL (read only: the store is repaired by
    /// the agent's own reconcile, see `crate::reconcile`).
    async fn reported(&self) -> Option<String> {
        let url = self.shared.health.url.as_ref()?;
        health::probe_http(url, self.shared.health.timeout, None)
            .await
            .reported
    }

    /// A step on one version: role check, version and expected digest parsed (refusals
    /// audited), then [`AgentService::step`].
    async fn versioned(
        &self,
        caller: (Caller, Result<(), Status>),
        req: VersionCall,
        f: impl FnOnce(&dyn Driver, Version, Option<&str>) -> Result<StepOutcome> + Send + 'static,
    ) -> Result<Response<pb::StepReply>, Status> {
        let call = Call {
            caller: caller.0,
            fence: req.fence,
            force: req.force,
            what: req.what,
        };
        self.check(&call, caller.1)?;
        let v = self.parsed(&call, parse_version(&req.version))?;
        let sha = self.parsed(&call, expected_sha256(req.sha256))?;
        let reply = self.step(call, move |d| f(d, v, sha.as_deref())).await?;
        Ok(Response::new(reply))
    }

    /// A versioned step without a package: `NAME VERSION` in the audit log.
    async fn version_step(
        &self,
        caller: (Caller, Result<(), Status>),
        name: &str,
        r: pb::VersionRequest,
        f: fn(&dyn Driver, Version) -> Result<StepOutcome>,
    ) -> Result<Response<pb::StepReply>, Status> {
        let req = VersionCall {
            what: format!("{name} {}", wire(&r.version)),
            fence: r.fence,
            force: r.force,
            version: r.version,
            sha256: String::new(),
        };
        self.versioned(caller, req, move |d, v, _| f(d, v)).await
    }

    /// A change of the fence files alone (no driver work): serialized with steps, published
    /// to NodeInfo's view and audited, `changed` saying whether it changed anything.
    async fn fence_change<T: Send + 'static>(
        &self,
        call: Call,
        f: impl FnOnce(&mut FenceStore, &Call) -> Result<T> + Send + 'static,
        changed: fn(&T) -> bool,
    ) -> Result<T, Status> {
        let guard = self.shared.steps.clone().lock_owned().await;
        let shared = self.shared.clone();
        let r = tokio::task::spawn_blocking(move || {
            let mut fences = guard;
            let r = f(&mut fences, &call);
            shared.publish(&fences);
            shared.record(
                &call,
                &match &r {
                    Ok(v) => audit::ok(changed(v)),
                    Err(e) => audit::error(e),
                },
            );
            r
        })
        .await
        .map_err(joined)??;
        Ok(r)
    }
}

/// What a versioned step's request says.
struct VersionCall {
    /// The step as the audit log shows it.
    what: String,
    fence: Option<pb::Fence>,
    force: bool,
    version: String,
    /// The expected digest (empty: none).
    sha256: String,
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
        let (caller, allowed) = self.shared.caller(&req, MUTATE);
        let mut call = Call {
            caller,
            fence: None,
            force: false,
            what: "push".into(),
        };
        self.check(&call, allowed)?;
        let mut stream = req.into_inner();
        let first = match stream.next().await {
            Some(Ok(c)) => c,
            Some(Err(s)) => return Err(self.denied(&call, s)),
            None => {
                let e = Error::BadRequest("push refused: empty stream".into());
                return Err(self.refused(&call, e));
            }
        };
        let h = self.parsed(
            &call,
            first.header.ok_or_else(|| {
                Error::BadRequest("push refused: the first chunk must carry the header".into())
            }),
        )?;
        call.what = format!("push {}-{}.zip", wire(&h.name), wire(&h.version));
        call.fence = h.fence;
        call.force = h.force;
        let mut header = self.parsed(
            &call,
            Header::validate(
                &h.name,
                &h.version,
                &h.sha256,
                h.size,
                h.signature,
                self.shared.max_package_bytes,
            ),
        )?;
        // Before the fence is recorded or a byte is written: a refusal changes nothing.
        self.parsed(&call, header.check_signature(&self.shared.trusted))?;
        let file_name = header.file_name();
        // Admitted under the step lock (fence, binding, hold, deadline) before the first byte
        // is written; the upload itself runs beside other steps (it only adds a file).
        let guard = self.shared.steps.clone().lock_owned().await;
        let (shared, c) = (self.shared.clone(), call.clone());
        tokio::task::spawn_blocking(move || {
            let mut fences = guard;
            shared.admit(&mut fences, &c)
        })
        .await
        .map_err(joined)
        .and_then(|r| r)
        .map_err(|e| self.refused(&call, e))?;
        let releases = self.shared.root.join("releases");
        let path = format!("releases/{file_name}");
        let started = tokio::task::spawn_blocking(move || Upload::start(&releases, header))
            .await
            .map_err(joined)
            .and_then(|r| r);
        let Some(upload) = self.parsed(&call, started)? else {
            // The identical package is already here: answer now, without reading the rest of
            // the stream (dropping it tells the sender to stop).
            self.shared.record(&call, &audit::ok(false));
            return Ok(Response::new(pb::PushReply {
                path,
                already: true,
                message: format!("Package {file_name} is already on this node"),
            }));
        };
        let writer = Writer::spawn(upload);
        let mut writing = writer.write(first.data).await;
        while writing {
            match stream.next().await {
                None => break,
                Some(Ok(chunk)) => writing = writer.write(chunk.data).await,
                Some(Err(e)) => {
                    writer.abort().await;
                    let s = Status::cancelled(format!(
                        "push of {file_name} interrupted ({e}); package discarded"
                    ));
                    return Err(self.denied(&call, s));
                }
            }
        }
        // Also the error that stopped the writer early (more data than announced, a disk error).
        let finished = self.parsed(&call, writer.finish().await)?;
        self.shared.record(&call, &audit::ok(true));
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
        let h = health::check(&self.shared.health, expect, running, None).await;
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
