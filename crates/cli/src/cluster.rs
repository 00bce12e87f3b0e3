//! Cluster commands (clients of the coordinators' control API): `rollout`, `status`,
//! `rollouts`, operator commands on a rollout, `nodes`, and `cluster status|add|remove`.
//!
//! One-shot commands fail at once when every coordinator refuses the connection and wait at
//! most `--timeout` (10 s) for a leader, with a spinner on a terminal; the waiting ones
//! (`rollout`, `status --watch`) reconnect instead (see `wait.rs`).

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{Result, bail};
use orch_client::{Client, control as pb};
use orch_release::{Limits, package};
use orch_types::rollout::{DEFAULT_HEALTHY_DEADLINE_MS, DEFAULT_MIN_HEALTHY_TIME_MS, NodeCount};
use serde_json::json;

use crate::args::{
    ClusterCmd, ClusterOpts, EventCount, GlobalOpts, NodesArgs, NodesCmd, RolloutArgs,
    RolloutRefArgs, StatusArgs,
};
use crate::exit::Exit;
use crate::live::Gate;
use crate::output::{
    Paint, cluster_json, node_json, print_status, releases, status_json, use_color,
};
use crate::spinner::spin;
use crate::wait::{Mode, conclude, wait};

/// How long a one-shot command waits for a leader unless `--timeout` says otherwise.
const ONE_SHOT_TIMEOUT: Duration = Duration::from_secs(10);

fn addrs(o: &ClusterOpts) -> Result<Vec<String>> {
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
    Ok(addrs)
}

/// A client for a one-shot command: refused at once when no coordinator accepts connections,
/// patient for `--timeout` (10 s) while no leader answers.
pub(crate) fn client(o: &ClusterOpts) -> Result<Client> {
    let addrs = addrs(o)?;
    fail_fast(&addrs)?;
    let mut c = Client::new(addrs, crate::tls::client_security(&o.tls)?);
    c.allow_stale(o.stale);
    c.patience = o.timeout.unwrap_or(ONE_SHOT_TIMEOUT);
    Ok(c)
}

/// A client for a waiting command: it keeps trying while coordinators are away.
fn waiting_client(o: &ClusterOpts) -> Result<Client> {
    let mut c = Client::new(addrs(o)?, crate::tls::client_security(&o.tls)?);
    c.allow_stale(o.stale);
    Ok(c)
}

/// Fails when every address refuses the TCP connection (nothing listens there): retrying for
/// the leader's patience would only make the operator wait for the same answer. Any other
/// outcome (an accepted connection, a timeout, a name that does not resolve) is left to the
/// client, which knows how to wait and what to say.
fn fail_fast(addrs: &[String]) -> Result<()> {
    use std::net::{TcpStream, ToSocketAddrs};
    let mut refused = Vec::new();
    for a in addrs {
        let Ok(resolved) = a.to_socket_addrs() else {
            return Ok(());
        };
        for sa in resolved {
            match TcpStream::connect_timeout(&sa, Duration::from_millis(500)) {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                _ => return Ok(()),
            }
        }
        refused.push(a.as_str());
    }
    Err(Exit::new(
        1,
        "unreachable",
        format!(
            "no coordinator reachable at {}: connection refused (nothing listens there): are they running? check --coordinator / ORCHESTRATOR_COORDINATORS",
            refused.join(", ")
        ),
    )
    .into())
}

/// After a read with `--stale`: says on stderr when the answer may be out of date (and for how
/// long the coordinator that answered has known no leader, when it said).
pub(crate) fn warn_if_stale(c: &Client) {
    if let Some(d) = c.stale_no_leader_for().filter(|_| c.saw_stale()) {
        eprintln!("no leader for {}s; this view may be stale", d.as_secs());
    } else if c.saw_stale() {
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

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Runtime::new()?)
}

/// A spinner on stderr while a one-shot command waits, when stderr is a terminal.
pub(crate) fn spinner_on(g: &GlobalOpts) -> bool {
    !g.json && std::io::stderr().is_terminal()
}

/// How a waiting command shows the rollout: JSON, the live view on a terminal, else lines.
fn wait_mode(g: &GlobalOpts, every_json: bool, gate: Option<Gate>, skip: usize) -> Mode {
    if g.json {
        Mode::Json { every: every_json }
    } else if std::io::stdout().is_terminal() {
        Mode::Live {
            paint: Paint {
                on: use_color(g.color),
            },
            gate,
        }
    } else {
        Mode::Lines { skip }
    }
}

/// `rollout --keep-releases` when neither the flag nor a policy file sets it.
const DEFAULT_KEEP_RELEASES: u32 = 3;

pub fn rollout(mut a: RolloutArgs, g: &GlobalOpts) -> Result<()> {
    if let Some(path) = a.policy.clone() {
        crate::policy::Policy::read(&path)?.apply_to(&mut a)?;
    }
    check_metric_gates(&a)?;
    let mut c = waiting_client(&a.cluster)?;
    // Starting is one-shot: refused at once when nothing listens, bounded while leaderless.
    fail_fast(c.addrs())?;
    c.patience = a.cluster.timeout.unwrap_or(ONE_SHOT_TIMEOUT);
    let spinning = spinner_on(g);
    runtime()?.block_on(async move {
        // The package's digest, its chunks (for a delta upload) and its entries are checked
        // at once, each in a pass of its own; the plan is asked for as soon as the digest is
        // known, while the entries are still being checked.
        let mut checks = a.package.clone().map(|p| Checks::start(p, a.version));
        let header = match &mut checks {
            Some(ch) => Some(ch.header().await?),
            None => None,
        };
        let req = pb::PlanRolloutRequest {
            start: Some(start_request(&a, String::new())),
            package: header.clone(),
            // Ask first: a rollout that would be refused (another one runs, a node unknown,
            // preflight refuses) is refused before any byte of the package is uploaded.
            // Without a package there is no upload to spare: StartRollout runs preflight
            // itself before recording anything.
            skip_preflight: !a.dry_run && header.is_none(),
        };
        let what = if a.dry_run {
            "planning (preflight)"
        } else {
            "checking the rollout"
        };
        let (plan, entries) = tokio::join!(spin(what, spinning, c.plan_rollout(req)), async {
            match &mut checks {
                Some(ch) => ch.entries().await,
                None => Ok(()),
            }
        });
        // A bad package is refused first, before anything is sent, whatever the plan says.
        entries?;
        let plan = plan?;
        if a.dry_run {
            let paint = Paint {
                on: use_color(g.color),
            };
            return crate::plan::show(&plan, g.json, paint);
        }
        if !plan.refusal.is_empty() {
            return Err(Exit::new(
                1,
                "refused",
                format!(
                    "rollout of {} refused by preflight, nothing was uploaded or recorded: {}",
                    plan.version, plan.refusal
                ),
            )
            .into());
        }
        let package_sha256 = match (checks, header) {
            (Some(ch), Some(header)) => {
                let path = ch.path.clone();
                let chunks = ch.chunks().await;
                upload(&mut c, &path, header, chunks).await?
            }
            _ => String::new(),
        };
        let req = start_request(&a, package_sha256);
        let started = spin("starting the rollout", spinning, c.start_rollout(req)).await?;
        if a.detach {
            if g.json {
                println!("{}", status_json(&started));
            } else {
                println!("{}", started.id);
            }
            return Ok(());
        }
        if !g.json {
            println!(
                "Rollout {} started: {} on {} node(s)",
                started.id,
                started.version,
                started.nodes.len()
            );
        }
        let gate = Gate {
            min_healthy: a
                .min_healthy_time
                .unwrap_or(Duration::from_millis(DEFAULT_MIN_HEALTHY_TIME_MS)),
            deadline: a
                .healthy_deadline
                .unwrap_or(Duration::from_millis(DEFAULT_HEALTHY_DEADLINE_MS)),
        };
        let mode = wait_mode(g, false, Some(gate), 0);
        let end = wait(&c, &started.id, mode, a.cluster.timeout, a.exit_on_pause).await?;
        conclude(end, &started.id, g.json, false)
    })
}

type Blocking<T> = tokio::task::JoinHandle<T>;

/// A package being checked before its rollout, in three passes at once on the blocking pool:
/// its digest (against its `.sha256` sidecar when there is one), its entries (structure, every
/// entry's data and CRC, the limits, the manifest against the file name and the version), and
/// its chunks for a delta upload. Together the checks of `package::verify`; apart, the plan
/// can be asked for once the digest is known and no pass waits for another.
struct Checks {
    path: std::path::PathBuf,
    digest: Option<Blocking<orch_package::Result<(String, u64)>>>,
    entries: Option<Blocking<orch_release::Result<package::Contents>>>,
    chunks: Option<Blocking<Option<Vec<orch_package::chunks::Chunk>>>>,
}

impl Checks {
    fn start(path: std::path::PathBuf, version: orch_types::Version) -> Checks {
        let p = path.clone();
        let digest = tokio::task::spawn_blocking(move || package::digest_checked(&p, None));
        let p = path.clone();
        let entries = tokio::task::spawn_blocking(move || {
            package::verify_entries(&p, Some(version), &Limits::default())
        });
        let p = path.clone();
        // Only an optimisation: without chunks the whole package is uploaded.
        let chunks = tokio::task::spawn_blocking(move || {
            let f = std::fs::File::open(&p).ok()?;
            orch_package::chunks::chunk_reader(std::io::BufReader::with_capacity(1 << 20, f), &p)
                .ok()
        });
        Checks {
            path,
            digest: Some(digest),
            entries: Some(entries),
            chunks: Some(chunks),
        }
    }

    /// The package as the coordinators are told about it (signature included), once its digest
    /// is checked. Its name and version come from its file name, which the entries' check holds
    /// to the manifest: a package whose name or version lies fails there.
    async fn header(&mut self) -> Result<pb::UploadHeader> {
        let (sha256, size) = match self.digest.take() {
            Some(t) => t.await??,
            None => bail!("the package's digest was asked for twice"),
        };
        let (name, version) = match package::file_identity(&self.path) {
            Ok(id) => id,
            // What the full check says comes first, as `package::verify` would say it.
            Err(e) => {
                self.entries().await?;
                return Err(e.into());
            }
        };
        // FILE.sig travels with the package; coordinators and agents with trusted keys check it.
        let signature = orch_release::signing::read_sig(&self.path)?.unwrap_or_default();
        Ok(pb::UploadHeader {
            name,
            version: version.to_string(),
            sha256,
            size,
            signature,
        })
    }

    /// Waits for the entries' check (once; later calls return at once).
    async fn entries(&mut self) -> Result<()> {
        if let Some(t) = self.entries.take() {
            t.await??;
        }
        Ok(())
    }

    async fn chunks(mut self) -> Option<Vec<orch_package::chunks::Chunk>> {
        self.chunks.take()?.await.ok().flatten()
    }
}

/// Uploads the checked package with its signature and returns its digest: as the chunks the
/// coordinators lack when its chunk list is known and the leader takes delta uploads, else
/// whole.
async fn upload(
    c: &mut Client,
    path: &std::path::Path,
    header: pb::UploadHeader,
    chunks: Option<Vec<orch_package::chunks::Chunk>>,
) -> Result<String> {
    eprintln!(
        "Uploading {} {} ({} bytes, sha256 {}, {})",
        header.name,
        header.version,
        header.size,
        header.sha256,
        if header.signature.is_empty() {
            "unsigned"
        } else {
            "with its signature"
        }
    );
    let sha256 = header.sha256.clone();
    if let Some(chunks) = chunks {
        let refs = chunks
            .iter()
            .map(|c| pb::PackageChunkRef {
                size: c.len,
                sha256: c.sha256.to_vec(),
            })
            .collect();
        match c.upload_delta(path, header.clone(), refs).await {
            Ok((reply, sent)) => {
                eprintln!(
                    "Sent {sent} of {} bytes (the coordinators held the rest); stored on coordinators {:?}",
                    header.size, reply.holders
                );
                return Ok(sha256);
            }
            // The coordinators answered (an older leader, a chunk gone since it was asked
            // for): nothing was stored, the whole file goes instead.
            Err(orch_client::ClientError::Refused(why)) => {
                eprintln!("Delta upload not possible ({why}); uploading the whole package");
            }
            Err(e) => return Err(e.into()),
        }
    }
    let reply = c.upload(path, header).await?;
    eprintln!("Stored on coordinators {:?}", reply.holders);
    Ok(sha256)
}

/// Metric gates need both a Prometheus server and a query (from the flags or the policy
/// file); the coordinators check the URL and the queries themselves.
fn check_metric_gates(a: &RolloutArgs) -> Result<()> {
    match (&a.gate_prometheus, a.gates.is_empty()) {
        (None, false) => anyhow::bail!(
            "--gate needs --gate-prometheus URL: the Prometheus server (http://HOST:PORT) to evaluate the queries against"
        ),
        (Some(url), true) => anyhow::bail!(
            "--gate-prometheus {url} is given without any --gate 'QUERY': add a query, or drop it"
        ),
        _ => Ok(()),
    }
}

/// The `StartRollout` request for the command's flags.
fn start_request(a: &RolloutArgs, package_sha256: String) -> pb::StartRolloutRequest {
    pb::StartRolloutRequest {
        version: a.version.to_string(),
        package_sha256,
        nodes: a.nodes.clone(),
        batch_size: match a.batch_size {
            Some(NodeCount::Count(n)) => n,
            _ => 0,
        },
        canary: a.canary.unwrap_or(0),
        no_permanent: a.no_permanent,
        min_healthy_time_ms: a.min_healthy_time.map(|d| d.as_millis() as u64),
        healthy_deadline_ms: a.healthy_deadline.map(|d| d.as_millis() as u64),
        on_failure: a
            .on_failure
            .clone()
            .unwrap_or_else(|| "rollback".to_string()),
        requested_by: operator(),
        request_id: orch_client::request_id(),
        preflight_timeout_ms: a.preflight_timeout.map(|d| d.as_millis() as u64),
        failure_threshold: a.failure_threshold,
        keep_releases: Some(a.keep_releases.unwrap_or(DEFAULT_KEEP_RELEASES)).filter(|&n| n > 0),
        bake_ms: a.bake.map(|d| d.as_millis() as u64),
        wave_by: a.wave_by.clone().unwrap_or_default(),
        batch_percent: match a.batch_size {
            Some(NodeCount::Percent(p)) => p,
            _ => 0,
        },
        selector: a
            .selector
            .clone()
            .map(|s| s.0.into_iter().collect())
            .unwrap_or_default(),
        max_unavailable: a.max_unavailable.map(|m| m.to_string()).unwrap_or_default(),
        promote_each_wave: a.promote_each_wave,
        wave_pause_ms: a.wave_pause.map(|d| d.as_millis() as u64),
        watch_after_commit_ms: a.watch_after_commit.map(|d| d.as_millis() as u64),
        gate_prometheus: a.gate_prometheus.clone().unwrap_or_default(),
        gates: a.gates.clone(),
    }
}

pub fn status(a: StatusArgs, g: &GlobalOpts) -> Result<()> {
    let events = match a.events {
        None | Some(EventCount::All) => None,
        Some(EventCount::Last(n)) => Some(n),
    };
    if !a.watch {
        let mut c = client(&a.cluster)?;
        let id = a.id.unwrap_or_default();
        let spinning = spinner_on(g);
        return runtime()?.block_on(async move {
            let s = spin("reading the rollout", spinning, c.rollout(&id)).await?;
            if g.json {
                let mut v = status_json_events(&s, events);
                if c.saw_stale() {
                    v["stale"] = json!(true);
                }
                println!("{v}");
            } else {
                print_status(&s, events);
            }
            warn_if_stale(&c);
            Ok(())
        });
    }
    let mut c = waiting_client(&a.cluster)?;
    runtime()?.block_on(async move {
        let Some(first) = crate::wait::first_watched(&mut c, &a).await? else {
            return Ok(());
        };
        let mut skip = 0;
        if !g.json && !std::io::stdout().is_terminal() {
            print_status(&first, events);
            skip = first.events.len();
        }
        let mode = wait_mode(g, true, None, skip);
        let end = wait(&c, &first.id, mode, a.cluster.timeout, a.exit_on_pause).await?;
        conclude(end, &first.id, g.json, true)
    })
}

/// A status as JSON, with only the last `events` events (and how many were left out).
fn status_json_events(s: &pb::RolloutStatus, events: Option<usize>) -> serde_json::Value {
    let mut v = status_json(s);
    if let Some(n) = events {
        let total = s.events.len();
        let keep = n.min(total);
        if let Some(list) = v["events"].as_array_mut() {
            list.drain(..total - keep);
        }
        v["events_left_out"] = json!(total - keep);
    }
    v
}

pub fn command(name: &str, a: RolloutRefArgs, g: &GlobalOpts) -> Result<()> {
    let mut c = client(&a.cluster)?;
    let id = a.id.unwrap_or_default();
    let spinning = spinner_on(g);
    runtime()?.block_on(async move {
        let s = spin(
            &format!("sending {name}"),
            spinning,
            c.command(&id, name, &operator()),
        )
        .await?;
        if g.json {
            println!("{}", status_json(&s));
        } else {
            println!("Rollout {}: {} accepted; phase {}", s.id, name, s.phase);
        }
        Ok(())
    })
}

pub fn nodes(a: NodesArgs, g: &GlobalOpts) -> Result<()> {
    if let Some(NodesCmd::Forget { id, cluster }) = a.cmd {
        return forget_node(&id, cluster, g);
    }
    let mut c = client(&a.cluster)?;
    let spinning = spinner_on(g);
    runtime()?.block_on(async move {
        let nodes = spin("listing nodes", spinning, c.nodes(true)).await?;
        if g.json {
            // An array has no room for a flag of its own: each entry carries it.
            let stale = c.saw_stale();
            let v: Vec<_> = nodes
                .iter()
                .map(|n| {
                    let mut v = node_json(n);
                    if stale {
                        v["stale"] = json!(true);
                    }
                    v
                })
                .collect();
            println!("{}", serde_json::Value::Array(v));
        } else if nodes.is_empty() {
            println!("No nodes registered: start agents with --coordinator ADDR.");
        } else {
            print_nodes(&nodes);
        }
        warn_if_stale(&c);
        Ok(())
    })
}

fn print_nodes(nodes: &[pb::NodeEntry]) {
    let w = nodes.iter().map(|n| n.id.len()).max().unwrap_or(4).max(4);
    println!(
        "{:<w$}  {:<21}  {:<9}  VERSIONS",
        "NODE", "ADDRESS", "HEALTHY"
    );
    for n in nodes {
        println!(
            "{:<w$}  {:<21}  {:<9}  {}",
            n.id,
            n.address,
            if n.healthy { "yes" } else { "no" },
            releases(n)
        );
        if !n.conflict.is_empty() {
            println!("{:<w$}  CONFLICT: {}", "", n.conflict);
        }
    }
}

fn forget_node(id: &str, o: ClusterOpts, g: &GlobalOpts) -> Result<()> {
    let mut c = client(&o)?;
    let spinning = spinner_on(g);
    runtime()?.block_on(async move {
        spin("forgetting the node", spinning, c.forget_node(id, &operator())).await?;
        if g.json {
            println!("{}", json!({ "forgot": id }));
        } else {
            println!(
                "Forgot node {id}: it is no longer in the registry (its agent reappears if it registers again)"
            );
        }
        Ok(())
    })
}

fn print_cluster(s: &pb::ClusterStatusReply) {
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

pub fn cluster(cmd: ClusterCmd, g: &GlobalOpts) -> Result<()> {
    let rt = runtime()?;
    let spinning = spinner_on(g);
    let (s, done) = match cmd {
        ClusterCmd::Status(a) => {
            let mut c = client(&a.cluster)?;
            let s = rt.block_on(spin(
                "asking for the cluster's status",
                spinning,
                c.cluster_status(),
            ))?;
            (s, None)
        }
        ClusterCmd::Add {
            id,
            address,
            cluster,
        } => {
            let mut c = client(&cluster)?;
            // Catching up a learner can take a while; do not give up after the default.
            c.patience = cluster.timeout.unwrap_or(Duration::from_secs(120));
            let s = rt.block_on(spin(
                "adding the coordinator",
                spinning,
                c.add_member(id, &address),
            ))?;
            (s, Some(format!("Added coordinator {id} at {address}")))
        }
        ClusterCmd::Remove { id, cluster } => {
            let mut c = client(&cluster)?;
            let s = rt.block_on(spin(
                "removing the coordinator",
                spinning,
                c.remove_member(id),
            ))?;
            (s, Some(format!("Removed coordinator {id}")))
        }
    };
    if g.json {
        println!("{}", cluster_json(&s));
        return Ok(());
    }
    if let Some(line) = done {
        println!("{line}");
    }
    print_cluster(&s);
    Ok(())
}
