//! Cluster commands (clients of the coordinators' control API): `rollout`, `status`,
//! `rollouts`, operator commands on a rollout, `nodes`, and `cluster status|add|remove`.

use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use orch_client::{Client, control as pb};
use orch_release::{Limits, package};

use crate::args::{
    ClusterCmd, ClusterOpts, JsonOpts, RolloutArgs, RolloutRefArgs, RolloutsArgs, StatusArgs,
};
use crate::output::{clock, cluster_json, node_json, print_status, status_json};

fn client(o: &ClusterOpts) -> Result<Client> {
    let addrs: Vec<String> = o
        .coordinators
        .iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if addrs.is_empty() {
        bail!(
            "no coordinator address: pass --coordinator ADDR or set ORCHESTRATOR_COORDINATORS=a,b,c"
        );
    }
    let mut c = Client::new(addrs, crate::tls::client_security(&o.tls)?);
    c.allow_stale(o.stale);
    Ok(c)
}

/// After a read with `--stale`: says on stderr when the answer may be out of date.
fn warn_if_stale(c: &Client) {
    if c.saw_stale() {
        eprintln!(
            "warning: --stale: this view comes from a coordinator that could not confirm it is up to date (no leader reachable, or a follower answering; applied index {}): it may be stale",
            c.seen_index()
        );
    }
}

/// The operator's name as this user claims it. Under mutual TLS the coordinators ignore it and
/// record the name in the certificate; in insecure mode they record it marked unverified.
fn operator() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .map(|u| format!("operator {u}"))
        .unwrap_or_else(|| "operator".to_string())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Runtime::new()?)
}

fn is_terminal(phase: &str) -> bool {
    matches!(
        phase,
        "succeeded" | "rolled_back" | "rollback_failed" | "aborted"
    )
}

pub fn rollout(a: RolloutArgs) -> Result<()> {
    let mut c = client(&a.cluster)?;
    runtime()?.block_on(async move {
        let package_sha256 = match &a.package {
            Some(path) => upload(&mut c, path, a.version).await?,
            None => String::new(),
        };
        let started = c.start_rollout(start_request(&a, package_sha256)).await?;
        if a.detach {
            if a.json {
                println!("{}", status_json(&started));
            } else {
                println!("{}", started.id);
            }
            return Ok(());
        }
        if !a.json {
            println!(
                "Rollout {} started: {} on {} node(s)",
                started.id,
                started.version,
                started.nodes.len()
            );
        }
        let fin = follow_events(&mut c, &started.id, a.json).await?;
        if a.json {
            println!("{}", status_json(&fin));
        } else {
            println!("Rollout {} {}", fin.id, fin.phase);
            if !fin.error.is_empty() {
                println!("error: {}", fin.error);
            }
        }
        if fin.phase == "succeeded" {
            return Ok(());
        }
        let cause = if fin.error.is_empty() {
            String::new()
        } else {
            format!(": {}", fin.error)
        };
        Err(anyhow!("rollout {} ended {}{cause}", fin.id, fin.phase))
    })
}

/// Checks the package here (a bad one is refused before anything is uploaded), uploads it with
/// its signature, and returns its digest.
async fn upload(
    c: &mut Client,
    path: &std::path::Path,
    version: orch_types::Version,
) -> Result<String> {
    let info = package::verify(path, None, Some(version), &Limits::default())?;
    // FILE.sig travels with the package; coordinators and agents with trusted keys check it.
    let signature = orch_release::signing::read_sig(path)?.unwrap_or_default();
    eprintln!(
        "Uploading {} {} ({} bytes, sha256 {}, {})",
        info.name,
        info.version,
        info.size,
        info.sha256,
        if signature.is_empty() {
            "unsigned"
        } else {
            "with its signature"
        }
    );
    let header = pb::UploadHeader {
        name: info.name.clone(),
        version: info.version.to_string(),
        sha256: info.sha256.clone(),
        size: info.size,
        signature,
    };
    let reply = c.upload(path, header).await?;
    eprintln!("Stored on coordinators {:?}", reply.holders);
    Ok(info.sha256)
}

/// The `StartRollout` request for the command's flags.
fn start_request(a: &RolloutArgs, package_sha256: String) -> pb::StartRolloutRequest {
    pb::StartRolloutRequest {
        version: a.version.to_string(),
        package_sha256,
        nodes: a.nodes.clone(),
        batch_size: a.batch_size.unwrap_or(0),
        canary: a.canary,
        no_permanent: a.no_permanent,
        min_healthy_time_ms: a.min_healthy_time.map(|d| d.as_millis() as u64),
        healthy_deadline_ms: a.healthy_deadline.map(|d| d.as_millis() as u64),
        on_failure: a.on_failure.clone(),
        requested_by: operator(),
        request_id: orch_client::request_id(),
        preflight_timeout_ms: a.preflight_timeout.map(|d| d.as_millis() as u64),
        failure_threshold: a.failure_threshold,
    }
}

/// Follows a rollout to its end, printing each new event with its time (unless `quiet`).
async fn follow_events(c: &mut Client, id: &str, quiet: bool) -> Result<pb::RolloutStatus> {
    let mut printed = 0usize;
    let fin = c
        .follow(
            id,
            |s| {
                if quiet {
                    return;
                }
                for e in s.events.iter().skip(printed) {
                    println!("{} {}", clock(e.at_ms), e.message);
                }
                printed = printed.max(s.events.len());
            },
            is_terminal,
        )
        .await?;
    Ok(fin)
}

pub fn status(a: StatusArgs) -> Result<()> {
    let mut c = client(&a.cluster)?;
    let id = a.id.unwrap_or_default();
    runtime()?.block_on(async move {
        if !a.watch {
            let s = c.rollout(&id).await?;
            if a.json {
                println!("{}", status_json(&s));
            } else {
                print_status(&s, Some(10));
            }
            warn_if_stale(&c);
            return Ok(());
        }
        let first = c.rollout(&id).await?;
        let json = a.json;
        c.follow(
            &first.id,
            |s| {
                if json {
                    println!("{}", status_json(s));
                } else {
                    println!();
                    print_status(s, Some(10));
                }
            },
            is_terminal,
        )
        .await?;
        Ok(())
    })
}

pub fn rollouts(a: RolloutsArgs) -> Result<()> {
    let mut c = client(&a.cluster)?;
    runtime()?.block_on(async move {
        let list = c.rollouts(a.all).await?;
        if a.json {
            let v: Vec<_> = list.iter().map(status_json).collect();
            println!("{}", serde_json::Value::Array(v));
        } else if list.is_empty() {
            println!("No rollouts yet.");
        } else {
            println!(
                "{:<9} {:<10} {:<16} {:>5}  REQUESTED BY",
                "ID", "VERSION", "PHASE", "NODES"
            );
            for r in &list {
                println!(
                    "{:<9} {:<10} {:<16} {:>5}  {}",
                    r.id,
                    r.version,
                    r.phase,
                    r.nodes.len(),
                    r.requested_by
                );
            }
        }
        warn_if_stale(&c);
        Ok(())
    })
}

pub fn command(name: &str, a: RolloutRefArgs) -> Result<()> {
    let mut c = client(&a.cluster)?;
    let id = a.id.unwrap_or_default();
    runtime()?.block_on(async move {
        let s = c.command(&id, name, &operator()).await?;
        println!("Rollout {}: {} accepted; phase {}", s.id, name, s.phase);
        Ok(())
    })
}

pub fn nodes(a: JsonOpts) -> Result<()> {
    let mut c = client(&a.cluster)?;
    runtime()?.block_on(async move {
        let nodes = c.nodes(true).await?;
        if a.json {
            let v: Vec<_> = nodes.iter().map(node_json).collect();
            println!("{}", serde_json::Value::Array(v));
        } else if nodes.is_empty() {
            println!("No nodes registered: start agents with --coordinator ADDR.");
        } else {
            let w = nodes.iter().map(|n| n.id.len()).max().unwrap_or(4).max(4);
            println!(
                "{:<w$}  {:<21}  {:<9}  VERSIONS",
                "NODE", "ADDRESS", "HEALTHY"
            );
            for n in &nodes {
                let versions: Vec<String> = n
                    .versions
                    .iter()
                    .map(|e| format!("{} {}", e.version, e.state))
                    .collect();
                println!(
                    "{:<w$}  {:<21}  {:<9}  {}",
                    n.id,
                    n.address,
                    if n.healthy { "yes" } else { "no" },
                    versions.join(", ")
                );
                if !n.conflict.is_empty() {
                    println!("{:<w$}  CONFLICT: {}", "", n.conflict);
                }
            }
        }
        warn_if_stale(&c);
        Ok(())
    })
}

pub fn forget_node(id: &str, o: ClusterOpts) -> Result<()> {
    let mut c = client(&o)?;
    runtime()?.block_on(async move {
        c.forget_node(id, &operator()).await?;
        println!("Forgot node {id}: it is no longer in the registry (its agent reappears if it registers again)");
        Ok(())
    })
}

fn print_cluster(s: &pb::ClusterStatusReply, json_out: bool) {
    if json_out {
        let v = cluster_json(s);
        println!("{v}");
        return;
    }
    if !s.cluster_id.is_empty() {
        println!("cluster: {}", s.cluster_id);
    }
    if s.leader_id == 0 {
        println!("leader: none elected (term {})", s.term);
    } else {
        println!(
            "leader: coordinator {} at {} (term {})",
            s.leader_id, s.leader_address, s.term
        );
    }
    if !s.note.is_empty() {
        println!("{}", s.note);
    }
    for m in &s.members {
        let lead = if m.id == s.leader_id {
            "  (leader)"
        } else {
            ""
        };
        let mut seen = if m.reachable {
            "reachable"
        } else {
            "UNREACHABLE"
        }
        .to_string();
        if let Some(ms) = m.last_contact_ms_ago {
            seen.push_str(&format!(", last contact {ms} ms ago"));
        }
        if let Some(lag) = m.lag {
            seen.push_str(&format!(", {lag} entries behind"));
        }
        println!("  {}  {}  {}{}  ({seen})", m.id, m.address, m.role, lead);
    }
}

pub fn cluster(cmd: ClusterCmd) -> Result<()> {
    let rt = runtime()?;
    match cmd {
        ClusterCmd::Status(a) => {
            let mut c = client(&a.cluster)?;
            let s = rt.block_on(c.cluster_status())?;
            print_cluster(&s, a.json);
        }
        ClusterCmd::Add {
            id,
            address,
            cluster,
        } => {
            let mut c = client(&cluster)?;
            // Catching up a learner can take a while; do not give up after the default.
            c.patience = Duration::from_secs(120);
            let s = rt.block_on(c.add_member(id, &address))?;
            println!("Added coordinator {id} at {address}");
            print_cluster(&s, false);
        }
        ClusterCmd::Remove { id, cluster } => {
            let mut c = client(&cluster)?;
            let s = rt.block_on(c.remove_member(id))?;
            println!("Removed coordinator {id}");
            print_cluster(&s, false);
        }
    }
    Ok(())
}
