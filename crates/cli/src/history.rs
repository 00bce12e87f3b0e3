//! `orchestrator rollouts`: the rollouts kept by the coordinators (and with `--all` the
//! archived ones), with when each started, how long it took, how it ended and who started it.

use std::time::Duration;

use anyhow::Result;
use orch_client::{Client, control as pb};
use serde_json::json;

use crate::args::{GlobalOpts, RolloutsArgs};
use crate::cluster::{client, runtime, spinner_on, warn_if_stale};
use crate::live::phase_is_terminal;
use crate::output::{date_time, human_duration, status_json};
use crate::spinner::spin;

/// Rollouts whose duration `rollouts` looks up (each costs one more request).
const DURATIONS_FOR: usize = 50;

pub fn rollouts(a: RolloutsArgs, g: &GlobalOpts) -> Result<()> {
    let mut c = client(&a.cluster)?;
    let spinning = spinner_on(g);
    runtime()?.block_on(async move {
        let list = spin("listing rollouts", spinning, c.rollouts(a.all)).await?;
        let durations = durations(&mut c, &list).await;
        if g.json {
            let v: Vec<_> = list
                .iter()
                .zip(&durations)
                .map(|(r, d)| {
                    let mut v = status_json(r);
                    v["duration_ms"] = json!(d.map(|d| d.as_millis() as u64));
                    v
                })
                .collect();
            println!("{}", serde_json::Value::Array(v));
        } else if list.is_empty() {
            println!("No rollouts yet.");
        } else {
            print_rollouts(&list, &durations);
        }
        warn_if_stale(&c);
        Ok(())
    })
}

/// Each listed rollout's duration, from its start to its last event (to now while it runs),
/// for the newest [`DURATIONS_FOR`]: the listing carries no events, so each costs a request.
async fn durations(c: &mut Client, list: &[pb::RolloutStatus]) -> Vec<Option<Duration>> {
    let mut out = vec![None; list.len()];
    let newest = list.len().saturating_sub(DURATIONS_FOR);
    for (i, r) in list.iter().enumerate().skip(newest) {
        let Ok(full) = c.rollout(&r.id).await else {
            continue;
        };
        let start = full.created_at_ms;
        let end = if phase_is_terminal(&full.phase) {
            full.events.last().map_or(start, |e| e.at_ms)
        } else {
            crate::output::now_ms()
        };
        if start > 0 {
            out[i] = Some(Duration::from_millis(end.saturating_sub(start)));
        }
    }
    out
}

fn print_rollouts(list: &[pb::RolloutStatus], durations: &[Option<Duration>]) {
    println!(
        "{:<9} {:<10} {:<19}  {:>8}  {:<16} {:>5}  REQUESTED BY",
        "ID", "VERSION", "STARTED (UTC)", "DURATION", "OUTCOME", "NODES"
    );
    for (r, d) in list.iter().zip(durations) {
        let outcome = if phase_is_terminal(&r.phase) {
            r.phase.clone()
        } else {
            format!("{} (running)", r.phase)
        };
        println!(
            "{:<9} {:<10} {:<19}  {:>8}  {:<16} {:>5}  {}",
            r.id,
            r.version,
            date_time(r.created_at_ms),
            d.map(human_duration).unwrap_or_else(|| "-".into()),
            outcome,
            r.nodes.len(),
            r.requested_by
        );
    }
}
