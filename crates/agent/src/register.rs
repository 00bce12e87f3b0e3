//! Registration with the coordinator cluster: at start, then periodically (so a coordinator
//! that lost its state, or a new leader, learns about this node, and reported versions stay
//! fresh), and at once when the agent changed the node's releases outside a step (a reconcile).
//! The coordinators only write to their log when something changed. The registration carries
//! the agent's `--activate-timeout`, from which coordinators size their calls' deadlines.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use orch_client::{Client, control as pb};

use crate::driver::Driver;

const REFRESH: Duration = Duration::from_secs(5);
const RETRY: Duration = Duration::from_secs(1);

/// Who this node is, as it registers.
pub(crate) struct Registrant {
    pub coordinators: Vec<String>,
    pub node_id: String,
    /// The address coordinators dial.
    pub address: String,
    pub labels: BTreeMap<String, String>,
    pub activate_timeout: Duration,
}

pub(crate) async fn keep_registered(
    me: Registrant,
    driver: Arc<dyn Driver>,
    stamp: Arc<crate::service::Stamp>,
    security: orch_tls::Security,
    changed: Arc<tokio::sync::Notify>,
) {
    let Registrant {
        coordinators,
        node_id,
        address,
        labels,
        activate_timeout,
    } = me;
    let mut client = Client::new(coordinators, security);
    client.patience = Duration::from_secs(3);
    let mut registered = false;
    // Failed registrations back off (with jitter, so a fleet restarted together does not
    // call together) up to REFRESH; a success resets it.
    let backoff = orch_retry::Backoff::new(RETRY, REFRESH);
    let mut failures = backoff.start();
    loop {
        let d = driver.clone();
        // Before reading the releases (see `Stamp`).
        let (boot_id, state_rev) = stamp.read();
        let versions = tokio::task::spawn_blocking(move || d.versions())
            .await
            .ok()
            .and_then(|r| r.ok())
            .unwrap_or_default();
        let req = pb::RegisterNodeRequest {
            id: node_id.clone(),
            address: address.clone(),
            labels: labels.clone().into_iter().collect(),
            versions: versions
                .iter()
                .map(|e| pb::VersionEntry {
                    version: e.version.to_string(),
                    state: e.state.to_string(),
                })
                .collect(),
            boot_id,
            state_rev,
            activate_timeout_ms: u64::try_from(activate_timeout.as_millis()).unwrap_or(u64::MAX),
        };
        match client.register_node(req).await {
            Ok(changed) => {
                if !registered || changed {
                    tracing::info!(node = %node_id, %address, "registered with the coordinators");
                }
                registered = true;
                failures = backoff.start();
            }
            Err(e) => {
                tracing::warn!(node = %node_id, "registration failed (will retry): {e}");
                registered = false;
            }
        }
        let pause = if registered {
            REFRESH
        } else {
            failures.next_delay().unwrap_or(REFRESH)
        };
        // Woken early when the node changed outside a step (a reconcile after the service
        // restarted), so the coordinators learn it at once.
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = changed.notified() => {}
        }
    }
}
