//! `orchestrator node prune --keep N`: uninstalls the releases a node can do without (all but
//! the newest N, never the current or permanent one), on a local store or through the agent.
//! Which releases go is `orch_rollout::prune_candidates`, the rule rollouts prune with.

use anyhow::{Result, anyhow, bail};
use orch_proto::agent::{self as pb, agent_client::AgentClient};
use orch_release::Store;
use orch_types::{Version, VersionEntry};
use serde_json::json;
use tonic::transport::Channel;

/// What one uninstall did: its messages, or why it failed.
type Removal = (Version, Result<Vec<String>, String>);

/// Prunes a local store.
pub fn local(store: &Store, keep: u32, json: bool) -> Result<()> {
    let before = store.versions()?;
    let removals = orch_rollout::prune_candidates(&before, keep as usize, &[])
        .into_iter()
        .map(|v| {
            let r = store
                .uninstall(v)
                .map(|o| o.messages)
                .map_err(|e| format!("{e:#}"));
            (v, r)
        })
        .collect();
    report(&store.versions()?, keep, removals, json)
}

/// Prunes the store of the agent `c` at `addr` (`force`: even while a rollout holds the node).
pub async fn remote(
    c: &mut AgentClient<Channel>,
    addr: &str,
    keep: u32,
    force: bool,
    json: bool,
) -> Result<()> {
    let before = versions(c, addr).await?;
    let mut removals = Vec::new();
    for v in orch_rollout::prune_candidates(&before, keep as usize, &[]) {
        let r = c
            .uninstall(pb::VersionRequest {
                version: v.to_string(),
                fence: None,
                force,
            })
            .await
            .map(|r| r.into_inner().messages)
            .map_err(|s| s.message().to_string());
        removals.push((v, r));
    }
    report(&versions(c, addr).await?, keep, removals, json)
}

async fn versions(c: &mut AgentClient<Channel>, addr: &str) -> Result<Vec<VersionEntry>> {
    let r = c
        .versions(pb::VersionsRequest {})
        .await
        .map_err(|s| {
            anyhow!(
                "listing the releases of the agent at {addr}: {}",
                s.message()
            )
        })?
        .into_inner();
    r.versions
        .iter()
        .map(VersionEntry::try_from)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("the agent at {addr} sent an invalid listing: {e}"))
}

/// Prints what was removed (each uninstall's own lines, then a summary) and what is left; an
/// error naming every release that could not be removed.
fn report(after: &[VersionEntry], keep: u32, removals: Vec<Removal>, json: bool) -> Result<()> {
    let removed: Vec<Version> = removals
        .iter()
        .filter(|(_, r)| r.is_ok())
        .map(|(v, _)| *v)
        .collect();
    let failed: Vec<String> = removals
        .iter()
        .filter_map(|(v, r)| r.as_ref().err().map(|e| format!("{v}: {e}")))
        .collect();
    let mut kept: Vec<&VersionEntry> = after.iter().collect();
    kept.sort_by_key(|e| std::cmp::Reverse(e.version));
    if json {
        let v = json!({
            "keep": keep,
            "removed": removed.iter().map(|v| v.to_string()).collect::<Vec<_>>(),
            "failed": failed,
            "releases": kept.iter().map(|e| json!({"version": e.version.to_string(), "state": e.state.as_str()})).collect::<Vec<_>>(),
        });
        println!("{v}");
    } else {
        for (_, r) in &removals {
            for line in r.iter().flatten() {
                println!("{line}");
            }
        }
        let left = kept
            .iter()
            .map(|e| format!("{} {}", e.version, e.state))
            .collect::<Vec<_>>()
            .join(", ");
        if removed.is_empty() && failed.is_empty() {
            println!(
                "Nothing to prune: keeping the newest {keep} release(s) and the current and permanent ones: {left}"
            );
        } else {
            println!("Pruned {} release(s); left: {left}", removed.len());
        }
    }
    if !failed.is_empty() {
        bail!(
            "could not uninstall {}; the others were pruned",
            failed.join("; ")
        );
    }
    Ok(())
}
