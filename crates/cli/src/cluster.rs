//! Cluster commands: the coordinator daemon, `rollout`, `status`, `rollouts`, operator
//! commands on a rollout, `nodes`, and `cluster status|add|remove`.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use orch_client::{Client, control as pb};
use orch_coordinator::{CoordinatorConfig, CoordinatorFileConfig, parse_peer};
use orch_release::{Limits, package};
use serde_json::json;

use crate::args::{
    ClusterCmd, ClusterOpts, CoordinatorArgs, JsonOpts, RolloutArgs, RolloutRefArgs, RolloutsArgs,
    StatusArgs,
};

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

pub fn status_json(s: &pb::RolloutStatus) -> serde_json::Value {
    json!({
        "id": s.id,
        "version": s.version,
        "phase": s.phase,
        "awaiting_promotion": s.awaiting_promotion,
        "error": if s.error.is_empty() { serde_json::Value::Null } else { json!(s.error) },
        "requested_by": s.requested_by,
        "created_at_ms": s.created_at_ms,
        "nodes": s.nodes.iter().map(|n| json!({
            "id": n.id,
            "from_version": if n.from_version.is_empty() { serde_json::Value::Null } else { json!(n.from_version) },
            "step": n.step,
            "error": if n.error.is_empty() { serde_json::Value::Null } else { json!(n.error) },
            "unresponsive_since_ms": if n.unresponsive_since_ms == 0 { serde_json::Value::Null } else { json!(n.unresponsive_since_ms) },
            "unresponsive_detail": if n.unresponsive_detail.is_empty() { serde_json::Value::Null } else { json!(n.unresponsive_detail) },
        })).collect::<Vec<_>>(),
        "events": s.events.iter().map(|e| json!({"at_ms": e.at_ms, "by": e.by, "message": e.message, "term": e.term})).collect::<Vec<_>>(),
        // For replay: orch_rollout::replay(spec, inputs) gives this status back.
        "spec": serde_json::from_str::<serde_json::Value>(&s.spec_json).unwrap_or(serde_json::Value::Null),
        "inputs": serde_json::from_str::<serde_json::Value>(&s.inputs_json).unwrap_or(serde_json::Value::Null),
    })
}

fn clock(at_ms: u64) -> String {
    let secs = at_ms / 1000;
    format!(
        "{:02}:{:02}:{:02}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60
    )
}

/// A node's error column: its agent's unresponsiveness (and for how long), then its error.
fn node_problem(n: &pb::NodeProgress) -> String {
    let mut out = Vec::new();
    if n.unresponsive_since_ms > 0 {
        let secs = now_ms().saturating_sub(n.unresponsive_since_ms) / 1000;
        out.push(format!(
            "agent unresponsive for {secs}s ({})",
            n.unresponsive_detail
        ));
    }
    if !n.error.is_empty() {
        out.push(n.error.clone());
    }
    out.join("; ")
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn print_status(s: &pb::RolloutStatus) {
    let mut head = format!("Rollout {} to {}: {}", s.id, s.version, s.phase);
    if s.awaiting_promotion {
        head.push_str(" (canary done: waiting for `orchestrator promote`)");
    }
    println!("{head}");
    if !s.requested_by.is_empty() {
        println!("requested by {}", s.requested_by);
    }
    if !s.error.is_empty() {
        println!("error: {}", s.error);
    }
    let w = s.nodes.iter().map(|n| n.id.len()).max().unwrap_or(4).max(4);
    println!("  {:<w$}  {:<10}  {:<16}  ERROR", "NODE", "FROM", "STEP");
    for n in &s.nodes {
        println!(
            "  {:<w$}  {:<10}  {:<16}  {}",
            n.id,
            if n.from_version.is_empty() {
                "-"
            } else {
                &n.from_version
            },
            n.step,
            node_problem(n)
        );
    }
    if !s.events.is_empty() {
        println!("events:");
        for e in s
            .events
            .iter()
            .rev()
            .take(10)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            println!("  {} {} ({})", clock(e.at_ms), e.message, e.by);
        }
    }
}

pub fn coordinator(a: CoordinatorArgs) -> Result<()> {
    let f = match &a.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))?;
            CoordinatorFileConfig::parse(&text).map_err(|e| anyhow!("{}: {e}", p.display()))?
        }
        None => CoordinatorFileConfig::default(),
    };
    let id =
        a.id.or(f.id)
            .ok_or_else(|| anyhow!("no coordinator id: pass --id N"))?;
    if id == 0 {
        bail!("--id must be 1 or more");
    }
    let listen_s = a
        .listen
        .or(f.listen)
        .ok_or_else(|| anyhow!("no listen address: pass --listen HOST:PORT"))?;
    let listen = listen_s
        .parse()
        .with_context(|| format!("--listen {listen_s:?} is not HOST:PORT"))?;
    let data_dir = a
        .data_dir
        .or(f.data_dir)
        .ok_or_else(|| anyhow!("no data directory: pass --data-dir DIR"))?;
    let security = crate::tls::daemon_security(
        &a.tls,
        crate::tls::FileTls {
            tls_dir: f.tls_dir.clone(),
            ca: f.ca.clone(),
            cert: f.cert.clone(),
            key: f.key.clone(),
            insecure: f.insecure,
        },
    )?;
    let allow_remote = a.insecure_allow_remote || f.insecure_allow_remote.unwrap_or(false);
    let listen: std::net::SocketAddr = listen;
    // Checked here too (the daemon checks again) so the refusal comes before anything starts.
    security.check_listen(listen, allow_remote)?;
    security.expect_identity(orch_tls::Role::Coordinator, &id.to_string())?;
    let insecure = security.is_insecure();
    let mut cfg = CoordinatorConfig::new(id, listen, data_dir, security);
    cfg.insecure_allow_remote = allow_remote;
    cfg.advertise = a.advertise.or(f.advertise);
    let peers = if a.peers.is_empty() { f.peer } else { a.peers };
    for p in peers {
        let (pid, addr) = parse_peer(&p).map_err(|e| anyhow!(e))?;
        if pid != id {
            cfg.peers.insert(pid, addr);
        }
    }
    cfg.bootstrap = a.bootstrap || f.bootstrap.unwrap_or(false);
    cfg.trusted_keys = if a.trusted_keys.is_empty() {
        f.trusted_key
    } else {
        a.trusted_keys
    };
    if let Some(n) = a.retain_rollouts.or(f.retain_rollouts) {
        // The flag's parser refuses 0; the file's value is checked here.
        crate::args::parse_retain(&n.to_string())
            .map_err(|e| anyhow!("retain-rollouts = {n}: {e}"))?;
        cfg.retain_rollouts = n;
    }
    if let Some(g) = a.gc_grace {
        cfg.gc_grace = g;
    }
    if insecure {
        eprintln!(
            "WARNING: coordinator {id} serves plain-text gRPC on {listen} (--insecure): anyone who can reach it can run rollouts"
        );
    }
    bound_malloc_arenas();
    runtime()?.block_on(orch_coordinator::run(
        cfg,
        crate::agent_cmd::shutdown_signal(),
    ))?;
    Ok(())
}

/// Caps glibc's malloc arenas at 2 (unless MALLOC_ARENA_MAX is set), before any thread starts.
/// With the default (8 per core) each runtime thread that allocates gets its own arena, and
/// memory freed in one is not reused by another: the growth benchmark measured the leader's
/// resident memory climbing from 64 to ~100 MiB over 1,000 rollouts while its live state stayed
/// the same, and flat at ~60 MiB with the cap (docs/benchmarks.md).
fn bound_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; called before the runtime's
        // threads exist.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

pub fn rollout(a: RolloutArgs) -> Result<()> {
    let mut c = client(&a.cluster)?;
    runtime()?.block_on(async move {
        let mut package_sha256 = String::new();
        if let Some(path) = &a.package {
            // Refuse a bad package here, before anything is uploaded.
            let info = package::verify(path, None, Some(a.version), &Limits::default())?;
            // FILE.sig travels with the package; coordinators and agents with trusted keys
            // check it.
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
            let reply = c
                .upload(
                    path,
                    pb::UploadHeader {
                        name: info.name.clone(),
                        version: info.version.to_string(),
                        sha256: info.sha256.clone(),
                        size: info.size,
                        signature,
                    },
                )
                .await?;
            eprintln!("Stored on coordinators {:?}", reply.holders);
            package_sha256 = info.sha256;
        }
        let req = pb::StartRolloutRequest {
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
        };
        let started = c.start_rollout(req).await?;
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
        let json = a.json;
        let mut printed = 0usize;
        let fin = c
            .follow(
                &started.id,
                |s| {
                    if json {
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
        if json {
            println!("{}", status_json(&fin));
        } else {
            println!("Rollout {} {}", fin.id, fin.phase);
            if !fin.error.is_empty() {
                println!("error: {}", fin.error);
            }
        }
        if fin.phase == "succeeded" {
            Ok(())
        } else {
            Err(anyhow!(
                "rollout {} ended {}{}",
                fin.id,
                fin.phase,
                if fin.error.is_empty() {
                    String::new()
                } else {
                    format!(": {}", fin.error)
                }
            ))
        }
    })
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
                print_status(&s);
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
                    print_status(s);
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
            let v: Vec<_> = nodes
                .iter()
                .map(|n| {
                    json!({
                        "id": n.id,
                        "address": n.address,
                        "labels": n.labels,
                        "versions": n.versions.iter().map(|e| json!({"version": e.version, "state": e.state})).collect::<Vec<_>>(),
                        "healthy": n.healthy,
                        "health_detail": n.health_detail,
                        "conflict": if n.conflict.is_empty() { serde_json::Value::Null } else { json!(n.conflict) },
                        "conflict_at_ms": if n.conflict_at_ms == 0 { serde_json::Value::Null } else { json!(n.conflict_at_ms) },
                    })
                })
                .collect();
            println!("{}", serde_json::Value::Array(v));
        } else if nodes.is_empty() {
            println!("No nodes registered: start agents with --coordinator ADDR.");
        } else {
            let w = nodes.iter().map(|n| n.id.len()).max().unwrap_or(4).max(4);
            println!("{:<w$}  {:<21}  {:<9}  VERSIONS", "NODE", "ADDRESS", "HEALTHY");
            for n in &nodes {
                let versions: Vec<String> = n.versions.iter().map(|e| format!("{} {}", e.version, e.state)).collect();
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
        let v = json!({
            "leader_id": if s.leader_id == 0 { serde_json::Value::Null } else { json!(s.leader_id) },
            "leader_address": s.leader_address,
            "cluster_id": s.cluster_id,
            "term": s.term,
            "last_applied": s.last_applied,
            "quorum": s.quorum,
            "note": s.note,
            "answered_by": s.answered_by,
            "members": s.members.iter().map(|m| json!({
                "id": m.id,
                "address": m.address,
                "role": m.role,
                "reachable": m.reachable,
                "last_contact_ms_ago": m.last_contact_ms_ago,
                "lag": m.lag,
            })).collect::<Vec<_>>(),
        });
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
