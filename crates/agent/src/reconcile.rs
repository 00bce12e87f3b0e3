//! Repairing the store after the managed service restarted on its own (a node reboot, a
//! crash and restart by its supervisor): a restarted service runs its *permanent* release, so a
//! release still recorded as `current` is not running any more and becomes `unpacked`. And
//! after the agent itself died mid-switch: the activation hook (its own process group) finished
//! the switch but the agent never recorded it, so the service runs a release recorded as
//! `unpacked` or `old`; the switch is recorded then (`orch_release::rules::reconcile_reported`).
//!
//! Reads never do this (a single probe that happens to see the permanent version must not
//! change the node). The agent reconciles:
//! - at start, before serving, from one probe of the health URL;
//! - when the service's process identity changes: a background task polls the health URL every
//!   [`POLL`] and compares the `pid` of its JSON body with the one last reconciled against.
//!   A service that reports no `pid` is reconciled only at start (or at the first probe that
//!   answers, if the service was down when the agent started); the task then ends.
//!
//! A reconcile is a step: it runs under the step lock (when a step is in flight, the next poll
//! tries again), the service is probed again under the lock (a step that ran meanwhile may have
//! switched it), and when it changes the store it is audited (caller `agent/<node>`), bumps the
//! report stamp and wakes the registration loop so the coordinators learn it at once.

use std::sync::Arc;
use std::time::Duration;

use orch_types::Version;

use crate::audit::{self, Caller, wire};
use crate::health;
use crate::service::{Call, Shared};

/// How often the background task probes the service.
pub const POLL: Duration = Duration::from_secs(2);

/// What the last reconcile saw.
#[derive(Debug, Clone, Default)]
pub(crate) struct Seen {
    /// A reconcile ran (the service answered with a version at least once).
    pub done: bool,
    /// The service's `pid` then.
    pub identity: Option<String>,
}

/// Probes the service and, if it answers with a version, reconciles. Must be called with the
/// step lock held (`fences` is its guard). `None` when the service did not say its version.
async fn probe_and_reconcile(
    shared: &Arc<Shared>,
    guard: tokio::sync::OwnedMutexGuard<crate::fence::FenceStore>,
    url: &str,
    why: &str,
) -> Option<Seen> {
    let r = health::probe_http(url, shared.health.timeout, None).await;
    let reported = r.reported?;
    let seen = Seen {
        done: true,
        identity: r.identity.clone(),
    };
    let Ok(v) = reported.parse::<Version>() else {
        tracing::warn!(node = %shared.node_id, "the service reports {reported:?}, not a version: nothing to reconcile");
        return Some(seen);
    };
    let call = Call {
        caller: Caller::Agent(shared.node_id.clone()),
        fence: None,
        force: false,
        what: match &r.identity {
            Some(pid) => format!("reconcile {v} pid={} ({why})", wire(pid)),
            None => format!("reconcile {v} ({why})"),
        },
    };
    let s = shared.clone();
    let done = tokio::task::spawn_blocking(move || {
        let _step = guard;
        match s.driver.reconcile_running(v) {
            Ok(Some(note)) => {
                s.stamp.bump();
                s.record(&call, &audit::ok(true));
                tracing::warn!(node = %s.node_id, "{note}");
                true
            }
            Ok(None) => false,
            Err(e) => {
                s.record(&call, &audit::error(&e));
                tracing::warn!(node = %s.node_id, "reconcile failed: {}", e.message());
                false
            }
        }
    })
    .await;
    if matches!(done, Ok(true)) {
        shared.changed.notify_one();
    }
    Some(seen)
}

/// The start-up reconcile (before serving: nothing else holds the step lock).
pub(crate) async fn at_start(shared: &Arc<Shared>) -> Seen {
    let Some(url) = shared.health.url.clone() else {
        return Seen::default();
    };
    let guard = shared.steps.clone().lock_owned().await;
    probe_and_reconcile(shared, guard, &url, "agent start")
        .await
        .unwrap_or_default()
}

/// Polls the service until aborted; reconciles when its identity changed.
pub(crate) async fn watch(shared: Arc<Shared>, mut seen: Seen) {
    let Some(url) = shared.health.url.clone() else {
        return;
    };
    loop {
        // A service that answered without a `pid` is reconciled only at start: polling it
        // could not tell a restart, so the task ends (and probes nobody needlessly).
        if seen.done && seen.identity.is_none() {
            return;
        }
        tokio::time::sleep(POLL).await;
        let r = health::probe_http(&url, shared.health.timeout, None).await;
        if r.reported.is_none() {
            continue;
        }
        let restarted = r.identity.is_some() && r.identity != seen.identity;
        if seen.done && !restarted {
            continue;
        }
        // A step in flight: the next poll tries again (the change stays unseen until then).
        let Ok(guard) = shared.steps.clone().try_lock_owned() else {
            continue;
        };
        let why = if seen.done {
            "service restarted"
        } else {
            "first answer"
        };
        if let Some(now) = probe_and_reconcile(&shared, guard, &url, why).await {
            seen = now;
        }
    }
}
