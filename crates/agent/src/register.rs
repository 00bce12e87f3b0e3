//! Registration with the coordinator cluster: at start, then periodically (so a coordinator
//! that lost its state, or a new leader, learns about this node, and reported versions stay
//! fresh), and at once when the agent changed the node's releases outside a step (a reconcile).
//! The coordinators only write to their log when something changed. The registration carries
//! the agent's `--activate-timeout`, from which coordinators size their calls' deadlines.
//!
//! While a coordinator drives steps on this node the periodic registration waits: a leader
//! whose fenced step this agent just admitted has the node in its registry, and each step
//! reports the node's releases. At 1,000 nodes that is 200 calls a second less during a
//! rollout. The pause is jittered so that a fleet started together does not call together.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use orch_client::{Client, control as pb};

use crate::driver::Driver;

const REFRESH: Duration = Duration::from_secs(5);
const RETRY: Duration = Duration::from_secs(1);
/// Each periodic pause is [`REFRESH`] times a factor drawn from `1 +- JITTER`.
const JITTER: f64 = 0.2;

/// When a coordinator last had a fenced step of this node admitted: see the module docs.
pub(crate) struct Contact {
    start: Instant,
    /// Milliseconds from `start` to the last contact, plus one; 0: none yet.
    last: AtomicU64,
}

impl Contact {
    pub(crate) fn new() -> Contact {
        Contact {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    /// A coordinator's fenced step was admitted now.
    pub(crate) fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.last.fetch_max(ms + 1, Ordering::Relaxed);
    }

    fn last(&self) -> Option<Instant> {
        match self.last.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(self.start + Duration::from_millis(ms - 1)),
        }
    }
}

/// `refresh` times a random factor in `1 +- JITTER`.
fn jittered(refresh: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS's randomness: a different factor per agent and call.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u8(0);
    let unit = (h.finish() >> 11) as f64 / (1u64 << 53) as f64;
    refresh.mul_f64(1.0 - JITTER + 2.0 * JITTER * unit)
}

/// When a periodic registration that was due at `due` happens: then, or `pause` after the
/// last contact when a coordinator called since `due - pause` (it knows this node).
fn postponed(due: Instant, pause: Duration, contact: Option<Instant>) -> Instant {
    match contact {
        Some(c) if c + pause > due => c + pause,
        _ => due,
    }
}

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
    contact: Arc<Contact>,
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
            jittered(REFRESH)
        } else {
            failures.next_delay().unwrap_or(REFRESH)
        };
        let mut due = Instant::now() + pause;
        loop {
            // Woken early when the node changed outside a step (a reconcile after the service
            // restarted), so the coordinators learn it at once.
            tokio::select! {
                () = tokio::time::sleep_until(due.into()) => {}
                () = changed.notified() => break,
            }
            // A failed registration is retried on its backoff whoever called meanwhile.
            let later = postponed(due, pause, contact.last());
            if !registered || later <= due {
                break;
            }
            due = later;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_contact_postpones_the_registration_to_a_pause_after_it() {
        let t0 = Instant::now();
        let pause = Duration::from_secs(5);
        let due = t0 + pause;
        assert_eq!(
            postponed(due, pause, None),
            due,
            "no contact: due as planned"
        );
        assert_eq!(
            postponed(due, pause, Some(t0 - Duration::from_secs(1))),
            due,
            "a contact before the last registration changes nothing"
        );
        let c = t0 + Duration::from_secs(3);
        assert_eq!(postponed(due, pause, Some(c)), c + pause);
    }

    #[test]
    fn contacts_are_remembered_latest_first() {
        let c = Contact::new();
        assert!(c.last().is_none());
        c.touch();
        let first = c.last().expect("touched");
        assert!(first <= Instant::now());
        std::thread::sleep(Duration::from_millis(3));
        c.touch();
        assert!(c.last().expect("touched") > first);
    }

    #[test]
    fn jittered_pauses_stay_within_their_bounds_and_differ() {
        let pauses: Vec<Duration> = (0..200).map(|_| jittered(REFRESH)).collect();
        let (lo, hi) = (REFRESH.mul_f64(1.0 - JITTER), REFRESH.mul_f64(1.0 + JITTER));
        assert!(pauses.iter().all(|p| *p >= lo && *p <= hi), "{pauses:?}");
        assert!(pauses.iter().any(|p| *p != pauses[0]), "not jittered");
    }
}
