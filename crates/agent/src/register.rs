//! Registration with the coordinator cluster: at start, then periodically (so a coordinator
//! that lost its state, or a new leader, learns about this node, and reported versions stay
//! fresh). The coordinators only write to their log when something changed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use orch_client::{Client, control as pb};

use crate::driver::Driver;

const REFRESH: Duration = Duration::from_secs(5);
const RETRY: Duration = Duration::from_secs(1);

pub(crate) async fn keep_registered(
    coordinators: Vec<String>,
    node_id: String,
    address: String,
    labels: BTreeMap<String, String>,
    driver: Arc<dyn Driver>,
    stamp: Arc<crate::service::Stamp>,
    security: orch_tls::Security,
) {
    let mut client = Client::new(coordinators, security);
    client.patience = Duration::from_secs(3);
    let mut registered = false;
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
            activate_timeout_ms: 0,
        };
        match client.register_node(req).await {
            Ok(changed) => {
                if !registered || changed {
                    tracing::info!(node = %node_id, %address, "registered with the coordinators");
                }
                registered = true;
            }
            Err(e) => {
                tracing::warn!(node = %node_id, "registration failed (will retry): {e}");
                registered = false;
            }
        }
        tokio::time::sleep(if registered { REFRESH } else { RETRY }).await;
    }
}
