//! How a call runs: the role check, refusals audited, a step serialized and run on the blocking
//! pool with its fence admitted right before the work, and changes of the fence files alone.

use orch_proto::agent as pb;
use orch_types::Version;
use tonic::{Response, Status};
use tracing::Instrument;

use super::{AgentService, Call, entries, expected_sha256, joined, parse_version};
use crate::audit::{self, Caller, wire};
use crate::driver::{Driver, StepOutcome};
use crate::error::{Error, Result};
use crate::fence::FenceStore;
use crate::health;

impl AgentService {
    /// Runs blocking driver work on the blocking pool.
    pub(super) async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Driver) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let driver = self.shared.driver.clone();
        tokio::task::spawn_blocking(move || f(driver.as_ref()))
            .await
            .map_err(joined)?
    }

    /// A status not made by the agent (the role check, the transport), audited.
    pub(super) fn denied(&self, call: &Call, s: Status) -> Status {
        self.shared.record(call, &audit::status(&s));
        s
    }

    /// The agent's own refusal or failure outside [`AgentService::step`], audited.
    pub(super) fn refused(&self, call: &Call, e: Error) -> Status {
        self.shared.record(call, &audit::error(&e));
        e.into()
    }

    /// The role check's verdict, a refusal audited.
    pub(super) fn check(&self, call: &Call, allowed: Result<(), Status>) -> Result<(), Status> {
        allowed.map_err(|s| self.denied(call, s))
    }

    /// A result decided outside a step (a malformed field, the upload), a refusal audited.
    pub(super) fn parsed<T>(&self, call: &Call, r: Result<T>) -> Result<T, Status> {
        r.map_err(|e| self.refused(call, e))
    }

    /// A fenced (or unfenced), serialized, audited step that returns the outcome and the
    /// releases after it.
    pub(super) async fn step(
        &self,
        call: Call,
        f: impl FnOnce(&dyn Driver) -> Result<StepOutcome> + Send + 'static,
    ) -> Result<pb::StepReply> {
        // Every line of the step names its rollout and fence (empty and 0: an operator's own
        // unfenced step), as the coordinator's step span does.
        let (rollout, term, fence) = call.fence.as_ref().map_or((String::new(), 0, 0), |f| {
            (f.rollout_id.clone(), f.term, f.step)
        });
        let span = tracing::info_span!(
            "step",
            node = %self.shared.node_id,
            step = %call.what,
            rollout = %rollout,
            term,
            fence,
        );
        self.step_in_span(call, f).instrument(span).await
    }

    async fn step_in_span(
        &self,
        call: Call,
        f: impl FnOnce(&dyn Driver) -> Result<StepOutcome> + Send + 'static,
    ) -> Result<pb::StepReply> {
        let guard = self.shared.steps.clone().lock_owned().await;
        let span = tracing::Span::current();
        let shared = self.shared.clone();
        // The guard moves into the blocking task: even if this request is cancelled, the next
        // step (and a graceful shutdown) waits until the driver work has really finished.
        // Admission happens there too, right before the work: a deadline that passed while
        // this request waited (for the lock, or in a frozen agent's socket) is refused.
        let (outcome, versions, (boot_id, state_rev)) = tokio::task::spawn_blocking(move || {
            let _in_step = span.enter();
            let mut fences = guard;
            let r = shared.admit(&mut fences, &call).and_then(|()| {
                let started = std::time::Instant::now();
                let r = f(shared.driver.as_ref());
                let kind = call.what.split_whitespace().next().unwrap_or("unknown");
                let activation = r.as_ref().ok().and_then(|o| o.activation);
                shared
                    .metrics
                    .observe_step(kind, started.elapsed().as_secs_f64(), activation);
                r
            });
            shared.record(
                &call,
                &match &r {
                    Ok(o) => audit::ok_with_hooks(o.changed, &o.hooks),
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
            notes: outcome.notes,
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
    pub(super) fn signature_gate(
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
    pub(super) async fn reported(&self) -> Option<String> {
        let url = self.shared.health.url.as_ref()?;
        health::probe_http(url, self.shared.health.timeout, None)
            .await
            .reported
    }

    /// A step on one version: role check, version and expected digest parsed (refusals
    /// audited), then [`AgentService::step`].
    pub(super) async fn versioned(
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
    pub(super) async fn version_step(
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
    pub(super) async fn fence_change<T: Send + 'static>(
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
pub(super) struct VersionCall {
    /// The step as the audit log shows it.
    pub(super) what: String,
    pub(super) fence: Option<pb::Fence>,
    pub(super) force: bool,
    pub(super) version: String,
    /// The expected digest (empty: none).
    pub(super) sha256: String,
}
