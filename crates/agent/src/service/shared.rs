//! The state every call of the agent shares, and the call as it is admitted and audited.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use orch_proto::agent as pb;
use orch_tls::{AuthMode, Role};
use tokio::sync::Mutex;
use tonic::{Request, Status};

use crate::audit::{self, AuditLog, Caller};
use crate::driver::Driver;
use crate::error::Result;
use crate::fence::{Admission, FenceStore, View};
use crate::health::HealthConfig;

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
    /// When a coordinator's fenced step was last admitted (the registration loop waits).
    pub contact: Arc<crate::register::Contact>,
    /// What `/metrics` serves (recorded here, in the service layer, as calls finish).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Channels to other agents, for peer relay.
    pub peers: crate::relay::Peers,
}

impl Shared {
    /// Publishes what NodeInfo shows after the fence store changed.
    pub fn publish(&self, fences: &FenceStore) {
        *self.view.lock().unwrap_or_else(|p| p.into_inner()) = fences.view();
    }

    /// The caller, and whether its role is one of `allowed` (under `--insecure`: everyone,
    /// unauthenticated). The caller is known even when refused, for the audit line.
    pub(crate) fn caller<T>(
        &self,
        req: &Request<T>,
        allowed: &[Role],
    ) -> (Caller, Result<(), Status>) {
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
    pub(crate) fn admit(&self, fences: &mut FenceStore, call: &Call) -> Result<()> {
        fences.admit(&Admission {
            fence: call.fence.as_ref(),
            force: call.force,
            may_fence: call.caller.may_fence(),
            caller: &call.caller.to_string(),
            what: &call.what,
            now_ms: audit::now_ms(),
        })?;
        // Only a coordinator's fence: an operator's unfenced step must not delay the report
        // of what it changed.
        if call.fence.is_some() && call.caller.may_fence() {
            self.contact.touch();
        }
        self.publish(fences);
        Ok(())
    }

    /// Audits `call` and counts it in the metrics: every mutating call passes here once.
    pub(crate) fn record(&self, call: &Call, result: &str) {
        self.metrics.record_call(&call.what, result);
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
