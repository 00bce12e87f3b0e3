//! Orchestration benchmark (not a test): what the coordinators add on top of the agents' own
//! work, with real coordinator processes.
//!
//! ```text
//! cargo build --release --bins && cargo bench -p orch-tests --bench orchestration
//! ```
//!
//! - **Per-node overhead**: a rollout of a state-only release (no hook, no health URL: the agent
//!   only switches its store's state) with `min-healthy-time 0`, for 10 and 100 nodes at 1 and 3
//!   coordinators. Agents run in this process (`orch_agent::serve` on port-0 listeners, one
//!   tokio runtime): 100 agent processes would measure the scheduler of a small machine. The
//!   agents' own work is measured separately by calling one agent directly (push, unpack,
//!   install, health, permanent; no coordinator), and the part of it on the rollout's critical
//!   path (preflight and staging/commit rounds of 4 in parallel, installs and gates one node at
//!   a time) is subtracted from the wall time.
//! - **Where the time of one upgraded node goes**, from the rollout's own event timestamps.
//! - **Raft write latency**: sequential `RegisterNode` writes that change the registry (a
//!   control RPC to the leader, committed through Raft and applied) — median and p99.
//! - **Coordinator memory**: each coordinator's `VmHWM` and `VmRSS` (`/proc/PID/status`) after
//!   each rollout, the leader first.
//! - **Failover**: a rollout with the leader SIGKILLed in the middle of upgrading (3
//!   coordinators): time from the kill to the next recorded rollout step, and to a new leader.
//!
//! `ORCH_BENCH_QUICK=1` runs a smaller version (for checking the benchmark itself).
//! `ORCH_BENCH_SIZES=10,100` sets the rollout sizes of the per-node section (default 10, 100 and
//! 1,000: the 1,000-node rollouts take a few minutes; `none`: skip that section).
//! `ORCH_BENCH_FAILOVERS=N` sets the failover trials (default 10, the issue's median of 10).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use orch_client::{Client, control as pb};
use orch_tests::cluster::{CoordProc, now_ms, spawn_coordinators};
use orch_tests::fleet::{Fleet, terminal};
use orch_tests::proto as apb;
use tokio::runtime::Runtime;

const V0: &str = "4.2.0";
const V1: &str = "4.2.1";

fn main() {
    let orchestrator = orch_tests::target_dir().join("orchestrator");
    if !orchestrator.is_file() {
        eprintln!(
            "{} is missing: run `cargo build --release --bins` before `cargo bench -p orch-tests --bench orchestration`",
            orchestrator.display()
        );
        std::process::exit(2);
    }
    let quick = std::env::var_os("ORCH_BENCH_QUICK").is_some();
    let rt = orch_tests::fleet::runtime();
    let work = tempfile::Builder::new()
        .prefix("orch-bench-")
        .tempdir()
        .unwrap();
    let agent_work = orch_tests::fleet::roots_dir("orch-bench-agents-");
    let pkgs = work.path().join("pkgs");
    let pkg0 = build_package(work.path(), &pkgs, V0);
    let pkg1 = build_package(work.path(), &pkgs, V1);

    println!("# Orchestration benchmark\n");
    println!(
        "binary: {}; machine: {} CPUs, load average before: {}\n",
        orchestrator.display(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );

    println!(
        "coordinators' data: {}; agents' roots: {}\n",
        work.path().display(),
        agent_work.path().display()
    );
    let costs = calibrate(
        &rt,
        agent_work.path(),
        &pkg0,
        &pkg1,
        if quick { 3 } else { 10 },
    );
    println!("## Agent work per step (one agent called directly, no coordinator)\n");
    println!("| step | mean (ms) |\n|---|---|");
    for (name, d) in [
        ("preflight (versions + node info)", costs.preflight),
        ("stage (push + unpack)", costs.stage),
        ("install (state-only switch)", costs.install),
        ("health (store view)", costs.health),
        ("permanent", costs.commit),
    ] {
        println!("| {name} | {:.2} |", ms(d));
    }
    println!();

    let sizes = bench_sizes(quick);
    let mut runs = Vec::new();
    for coords in [1usize, 3] {
        for &n in &sizes {
            eprintln!("running: {coords} coordinator(s), {n} nodes");
            runs.push(run_config(
                &rt,
                work.path(),
                agent_work.path(),
                coords,
                n,
                &pkg0,
                &pkg1,
                &costs,
                quick,
            ));
        }
    }

    println!("## Per-node orchestration overhead (min-healthy-time 0, state-only agents)\n");
    println!(
        "| coordinators | nodes | rollout wall (ms) | agent work on the critical path (ms) | overhead per node (ms) | upgrade phase per node (ms) | of which agent work (ms) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in &runs {
        println!(
            "| {} | {} | {:.0} | {:.0} | **{:.2}** | {:.2} | {:.2} |",
            r.coords,
            r.nodes,
            r.wall_ms,
            r.agent_ms,
            (r.wall_ms - r.agent_ms) / r.nodes as f64,
            r.upgrade_per_node_ms,
            ms(costs.install + costs.health),
        );
    }
    println!();
    println!("## Where one node's upgrade goes (mean over nodes, from event timestamps)\n");
    println!(
        "| coordinators | nodes | issue install (ms) | install + record (ms) | issue gate (ms) | gate + record (ms) | preflight (ms) | staging (ms) | committing (ms) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &runs {
        let b = &r.breakdown;
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} |",
            r.coords,
            r.nodes,
            b.issue_install,
            b.install,
            b.issue_gate,
            b.gate,
            r.preflight_ms,
            r.staging_ms,
            r.commit_ms
        );
    }
    println!();
    println!(
        "## Raft write latency (RegisterNode that changes the registry; sequential, one channel to the leader)\n"
    );
    println!("| coordinators | state | writes | median (ms) | p99 (ms) |\n|---|---|---|---|---|");
    for r in &runs {
        for (when, w) in [
            (
                format!("{} nodes registered, no rollout", r.nodes),
                &r.writes_before,
            ),
            (format!("after a {}-node rollout", r.nodes), &r.writes_after),
        ] {
            println!(
                "| {} | {when} | {} | {:.2} | {:.2} |",
                r.coords,
                w.len(),
                ms(percentile(w, 0.5)),
                ms(percentile(w, 0.99))
            );
        }
    }
    println!();
    println!(
        "## Coordinator memory after the rollout (/proc/PID/status; target at 1,000 nodes: <= 100 MB)\n"
    );
    println!(
        "| coordinators | nodes | coordinator | VmHWM (MB) | VmRSS (MB) |\n|---|---|---|---|---|"
    );
    for r in &runs {
        for m in &r.memory {
            println!(
                "| {} | {} | {} ({}) | {:.1} | {:.1} |",
                r.coords,
                r.nodes,
                m.id,
                m.role,
                m.hwm_kib as f64 / 1024.0,
                m.rss_kib as f64 / 1024.0
            );
        }
    }
    println!();

    let trials = std::env::var("ORCH_BENCH_FAILOVERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 1 } else { 10 });
    eprintln!("running: failover, {trials} trial(s)");
    let fo = failover(
        &rt,
        work.path(),
        agent_work.path(),
        if quick { 20 } else { 50 },
        trials,
        &pkg0,
        &pkg1,
    );
    println!(
        "## Failover: leader SIGKILLed mid-upgrade (3 coordinators, {} nodes)\n",
        fo.nodes
    );
    println!(
        "| trial | new leader elected after (ms) | next rollout step recorded after (ms) | that step |"
    );
    println!("|---|---|---|---|");
    for (i, t) in fo.trials.iter().enumerate() {
        println!(
            "| {} | {} | {} | {} |",
            i + 1,
            t.elected_ms,
            t.next_step_ms,
            t.next_step.replace('|', "/")
        );
    }
    let mut next: Vec<u64> = fo.trials.iter().map(|t| t.next_step_ms).collect();
    next.sort_unstable();
    println!(
        "\nkill -> next step: median {} ms, max {} ms (target <= 2000 ms)",
        next[next.len() / 2],
        next[next.len() - 1]
    );
    println!(
        "\nRaft writes in this cluster (3 coordinators, {} nodes): median {:.2} ms / p99 {:.2} ms before any rollout; median {:.2} ms / p99 {:.2} ms after {} rollouts",
        fo.nodes,
        ms(percentile(&fo.writes_start, 0.5)),
        ms(percentile(&fo.writes_start, 0.99)),
        ms(percentile(&fo.writes_end, 0.5)),
        ms(percentile(&fo.writes_end, 0.99)),
        fo.rollouts
    );
}

/// The rollout sizes of the per-node section: `ORCH_BENCH_SIZES` (comma-separated), else
/// 10, 100 and 1,000 (10 for a quick run).
fn bench_sizes(quick: bool) -> Vec<usize> {
    match std::env::var("ORCH_BENCH_SIZES") {
        // Only the failover section.
        Ok(v) if v == "none" => Vec::new(),
        Ok(v) => v
            .split(',')
            .map(|n| {
                n.trim().parse().unwrap_or_else(|_| {
                    panic!("ORCH_BENCH_SIZES={v:?}: give node counts, e.g. 100,1000")
                })
            })
            .collect(),
        Err(_) if quick => vec![10],
        Err(_) => vec![10, 100, 1_000],
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn percentile(v: &[Duration], q: f64) -> Duration {
    let mut v = v.to_vec();
    v.sort_unstable();
    if v.is_empty() {
        return Duration::ZERO;
    }
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

/// `OUT/app-V.zip`: a release without hook (an install only switches the store's state).
fn build_package(work: &Path, out: &Path, v: &str) -> PathBuf {
    let src = work.join(format!("src-{v}"));
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("payload.txt"), format!("app {v}\n")).unwrap();
    orch_release::package::build(&src, "app", v.parse().unwrap(), out)
        .unwrap()
        .0
}

// ---------------------------------------------------------------------------------------------
// Agent work, measured without coordinators

struct Costs {
    preflight: Duration,
    stage: Duration,
    install: Duration,
    health: Duration,
    commit: Duration,
}

fn calibrate(rt: &Runtime, work: &Path, pkg0: &Path, pkg1: &Path, rounds: usize) -> Costs {
    let dir = work.join("calibration");
    let ids: Vec<String> = (0..rounds).map(|i| format!("cal{i:02}")).collect();
    let agents = Fleet::start(rt, &dir, &ids, &[], Some(pkg0));
    let mut sum = [Duration::ZERO; 5];
    rt.block_on(async {
        for (i, addr) in agents.addrs.iter().enumerate() {
            let mut c = orch_tests::connect(addr).await;
            let fence = |step| orch_tests::fence(1, "r000001", step);
            // Warm the connection up: the first request pays for HTTP/2 setup.
            c.node_info(apb::NodeInfoRequest {}).await.unwrap();
            let t = Instant::now();
            c.versions(apb::VersionsRequest {}).await.unwrap();
            c.node_info(apb::NodeInfoRequest {}).await.unwrap();
            let t1 = Instant::now();
            orch_tests::push_file(&mut c, pkg1, fence(1)).await.unwrap();
            c.unpack(apb::UnpackRequest {
                version: V1.into(),
                fence: fence(1),
                expected_sha256: String::new(),
                force: false,
            })
            .await
            .unwrap();
            let t2 = Instant::now();
            c.install(apb::InstallRequest {
                version: V1.into(),
                permanent: false,
                fence: fence(2),
                expected_sha256: String::new(),
                force: false,
            })
            .await
            .unwrap();
            let t3 = Instant::now();
            let h = c
                .health(apb::HealthRequest {
                    expect_version: V1.into(),
                })
                .await
                .unwrap()
                .into_inner();
            assert!(h.healthy, "calibration agent {i} unhealthy: {h:?}");
            let t4 = Instant::now();
            c.permanent(apb::VersionRequest {
                version: V1.into(),
                fence: fence(3),
                force: false,
            })
            .await
            .unwrap();
            let t5 = Instant::now();
            for (k, d) in [t1 - t, t2 - t1, t3 - t2, t4 - t3, t5 - t4]
                .into_iter()
                .enumerate()
            {
                sum[k] += d;
            }
        }
    });
    agents.stop(rt);
    let n = rounds as u32;
    Costs {
        preflight: sum[0] / n,
        stage: sum[1] / n,
        install: sum[2] / n,
        health: sum[3] / n,
        commit: sum[4] / n,
    }
}

// ---------------------------------------------------------------------------------------------
// One configuration

struct Breakdown {
    issue_install: f64,
    install: f64,
    issue_gate: f64,
    gate: f64,
}

struct Run {
    coords: usize,
    nodes: usize,
    wall_ms: f64,
    agent_ms: f64,
    upgrade_per_node_ms: f64,
    preflight_ms: f64,
    staging_ms: f64,
    commit_ms: f64,
    breakdown: Breakdown,
    /// Raft writes before the rollout and after it (the state then holds its events).
    writes_before: Vec<Duration>,
    writes_after: Vec<Duration>,
    /// Each coordinator's memory after the rollout, the leader first.
    memory: Vec<Memory>,
}

/// A coordinator process's memory as `/proc/PID/status` gives it.
struct Memory {
    role: &'static str,
    id: u64,
    /// Peak resident set (VmHWM), KiB.
    hwm_kib: u64,
    /// Resident set now (VmRSS), KiB.
    rss_kib: u64,
}

/// `VmHWM` and `VmRSS` of every running coordinator, the leader (`leader`) first.
fn memory_of(procs: &[CoordProc], leader: u64) -> Vec<Memory> {
    let field = |status: &str, name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    let mut out: Vec<Memory> = procs
        .iter()
        .filter_map(|p| {
            let status = fs::read_to_string(format!("/proc/{}/status", p.pid()?)).ok()?;
            Some(Memory {
                role: if p.id == leader { "leader" } else { "follower" },
                id: p.id,
                hwm_kib: field(&status, "VmHWM:"),
                rss_kib: field(&status, "VmRSS:"),
            })
        })
        .collect();
    out.sort_by_key(|m| (m.role != "leader", m.id));
    out
}

/// Sequential writes that change the registry (a node `writer` whose labels change each
/// time), on one long-lived channel to the leader; the latency of each.
fn measure_writes(rt: &Runtime, addrs: &[String], count: usize) -> Vec<Duration> {
    let leader = rt
        .block_on(client(addrs).cluster_status())
        .unwrap()
        .leader_address;
    rt.block_on(async {
        let ch = tonic::transport::Channel::from_shared(format!("http://{leader}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut c = pb::control_client::ControlClient::new(ch);
        let mut out = Vec::with_capacity(count);
        let salt = fastrand::u64(..);
        for i in 0..count {
            let req = pb::RegisterNodeRequest {
                id: "writer".into(),
                address: "127.0.0.1:9".into(),
                labels: BTreeMap::from([("i".to_string(), format!("{salt}-{i}"))])
                    .into_iter()
                    .collect(),
                versions: Vec::new(),
                ..Default::default()
            };
            let t = Instant::now();
            let r = c.register_node(req).await.unwrap().into_inner();
            out.push(t.elapsed());
            assert!(r.changed, "the write changed nothing");
        }
        out
    })
}

fn client(addrs: &[String]) -> Client {
    Client::new(addrs.to_vec(), orch_tls::Security::Insecure)
}

/// Waits until a leader is elected and every coordinator is a member.
fn wait_leader(rt: &Runtime, addrs: &[String]) -> u64 {
    let start = Instant::now();
    loop {
        if let Ok(s) = rt.block_on(client(addrs).cluster_status())
            && s.leader_id != 0
            && s.members.len() == addrs.len()
        {
            return s.leader_id;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "no leader");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_registered(rt: &Runtime, addrs: &[String], n: usize) {
    let start = Instant::now();
    loop {
        if rt
            .block_on(client(addrs).nodes(false))
            .is_ok_and(|v| v.len() >= n)
        {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "agents did not register"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn rollout_req(v: &str, sha: &str) -> pb::StartRolloutRequest {
    pb::StartRolloutRequest {
        version: v.into(),
        package_sha256: sha.into(),
        min_healthy_time_ms: Some(0),
        healthy_deadline_ms: Some(30_000),
        requested_by: "bench".into(),
        ..Default::default()
    }
}

/// At which time the first event containing `needle` was recorded.
fn event_at(st: &pb::RolloutStatus, needle: &str) -> Option<u64> {
    st.events
        .iter()
        .find(|e| e.message.contains(needle))
        .map(|e| e.at_ms)
}

#[allow(clippy::too_many_arguments)]
fn run_config(
    rt: &Runtime,
    work: &Path,
    agent_work: &Path,
    coords: usize,
    n: usize,
    pkg0: &Path,
    pkg1: &Path,
    costs: &Costs,
    quick: bool,
) -> Run {
    let dir = work.join(format!("c{coords}-n{n}"));
    fs::create_dir_all(&dir).unwrap();
    let procs = spawn_coordinators(&dir, coords, "warn");
    let addrs: Vec<String> = procs.iter().map(|p| p.addr.clone()).collect();
    wait_leader(rt, &addrs);
    let ids: Vec<String> = (1..=n).map(|i| format!("n{i:03}")).collect();
    let agents = Fleet::start(
        rt,
        &agent_work.join(format!("c{coords}-n{n}")),
        &ids,
        &addrs,
        Some(pkg0),
    );
    wait_registered(rt, &addrs, n);
    let sha = orch_tests::fleet::upload(rt, &mut client(&addrs), pkg1);
    let writes_before = measure_writes(rt, &addrs, if quick { 50 } else { 300 });

    let t = Instant::now();
    let fin = rt.block_on(async {
        let mut c = client(&addrs);
        let mut req = rollout_req(V1, &sha);
        req.nodes = ids.clone();
        let st = c.start_rollout(req).await.unwrap();
        c.follow(&st.id, |_| {}, terminal).await.unwrap()
    });
    let client_wall = t.elapsed();
    assert_eq!(fin.phase, "succeeded", "{fin:?}");
    let first = fin.created_at_ms;
    let last = fin.events.last().unwrap().at_ms;
    let wall_ms = (last - first) as f64;
    eprintln!(
        "  rollout: {wall_ms} ms between the rollout's creation and its last event ({client_wall:?} seen by the client)"
    );

    if std::env::var_os("ORCH_BENCH_EVENTS").is_some() {
        for e in &fin.events {
            eprintln!("  +{:>5} ms  {}", e.at_ms.saturating_sub(first), e.message);
        }
    }
    let staged = event_at(&fin, &format!("all {n} nodes staged")).unwrap();
    let upgraded = event_at(&fin, &format!("all {n} nodes upgraded")).unwrap();
    let preflight_done = event_at(&fin, "preflight passed").unwrap();
    let rounds = n.div_ceil(4) as u32;
    let agent = costs.preflight
        + costs.stage * rounds
        + (costs.install + costs.health) * n as u32
        + costs.commit * rounds;

    // Per node: "started X: install" -> "X: installed" -> "started X: health gate" ->
    // "X: healthy" -> "started next: install".
    let mut b = [0f64; 4];
    for (k, id) in ids.iter().enumerate() {
        let a = event_at(&fin, &format!("started {id}: install")).unwrap();
        let bb = event_at(&fin, &format!("{id}: installed")).unwrap();
        let cc = event_at(&fin, &format!("started {id}: health gate")).unwrap();
        let d = event_at(&fin, &format!("{id}: healthy on")).unwrap();
        let prev = if k == 0 {
            staged
        } else {
            event_at(&fin, &format!("{}: healthy on", ids[k - 1])).unwrap()
        };
        b[0] += (a - prev) as f64;
        b[1] += (bb - a) as f64;
        b[2] += (cc - bb) as f64;
        b[3] += (d - cc) as f64;
    }
    let nf = n as f64;

    let writes_after = measure_writes(rt, &addrs, if quick { 50 } else { 300 });
    let memory = memory_of(&procs, wait_leader(rt, &addrs));

    agents.stop(rt);
    drop(procs);
    Run {
        coords,
        nodes: n,
        wall_ms,
        agent_ms: ms(agent),
        upgrade_per_node_ms: (upgraded - staged) as f64 / nf,
        preflight_ms: (preflight_done - first) as f64,
        staging_ms: (staged - preflight_done) as f64,
        commit_ms: (last - upgraded) as f64,
        breakdown: Breakdown {
            issue_install: b[0] / nf,
            install: b[1] / nf,
            issue_gate: b[2] / nf,
            gate: b[3] / nf,
        },
        writes_before,
        writes_after,
        memory,
    }
}

// ---------------------------------------------------------------------------------------------
// Failover

struct Trial {
    elected_ms: u64,
    next_step_ms: u64,
    next_step: String,
}

struct Failover {
    nodes: usize,
    trials: Vec<Trial>,
    /// Raft writes at the start and after every rollout of the section.
    writes_start: Vec<Duration>,
    writes_end: Vec<Duration>,
    rollouts: usize,
}

fn failover(
    rt: &Runtime,
    work: &Path,
    agent_work: &Path,
    n: usize,
    trials: usize,
    pkg0: &Path,
    pkg1: &Path,
) -> Failover {
    let dir = work.join("failover");
    fs::create_dir_all(&dir).unwrap();
    let mut procs: Vec<CoordProc> = spawn_coordinators(&dir, 3, "warn");
    let addrs: Vec<String> = procs.iter().map(|p| p.addr.clone()).collect();
    wait_leader(rt, &addrs);
    let ids: Vec<String> = (1..=n).map(|i| format!("n{i:03}")).collect();
    let agents = Fleet::start(rt, &agent_work.join("failover"), &ids, &addrs, Some(pkg0));
    wait_registered(rt, &addrs, n);
    let sha = orch_tests::fleet::upload(rt, &mut client(&addrs), pkg1);
    let writes_start = measure_writes(rt, &addrs, 200);
    // Every node gets 4.2.1 (permanent, 4.2.0 old); trials then go back and forth without a
    // package (both releases are on every node).
    let fin = rt.block_on(async {
        let mut c = client(&addrs);
        let mut req = rollout_req(V1, &sha);
        req.nodes = ids.clone();
        let st = c.start_rollout(req).await.unwrap();
        c.follow(&st.id, |_| {}, terminal).await.unwrap()
    });
    assert_eq!(fin.phase, "succeeded", "{fin:?}");

    let mut out = Vec::new();
    for trial in 0..trials {
        let v = if trial % 2 == 0 { V0 } else { V1 };
        let leader = wait_leader(rt, &addrs);
        let id = rt
            .block_on(client(&addrs).start_rollout(pb::StartRolloutRequest {
                nodes: ids.clone(),
                ..rollout_req(v, "")
            }))
            .unwrap()
            .id;
        // Kill the leader once a third of the nodes are upgraded.
        let start = Instant::now();
        loop {
            let st = rt.block_on(client(&addrs).rollout(&id)).unwrap();
            let up = st.nodes.iter().filter(|x| x.step == "upgraded").count();
            if st.phase == "upgrading" && up >= n / 3 {
                break;
            }
            assert!(
                !terminal(&st.phase) && start.elapsed() < Duration::from_secs(60),
                "missed the kill point: {st:?}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        let kill_ms = now_ms();
        let killed = Instant::now();
        let p = procs.iter_mut().find(|p| p.id == leader).unwrap();
        p.kill9();
        let others: Vec<String> = procs
            .iter()
            .filter(|p| p.id != leader)
            .map(|p| p.addr.clone())
            .collect();
        let elected = loop {
            if let Ok(s) = rt.block_on(client(&others).cluster_status())
                && s.leader_id != 0
                && s.leader_id != leader
            {
                break killed.elapsed();
            }
            assert!(killed.elapsed() < Duration::from_secs(30), "no new leader");
            std::thread::sleep(Duration::from_millis(5));
        };
        let fin = rt.block_on(async {
            let mut c = client(&others);
            c.follow(&id, |_| {}, terminal).await.unwrap()
        });
        assert_eq!(fin.phase, "succeeded", "{fin:?}");
        let next = fin
            .events
            .iter()
            .find(|e| e.at_ms >= kill_ms)
            .expect("an event after the kill");
        eprintln!(
            "  trial {}: killed coordinator {leader}; elected after {elected:?}; next step after {} ms: {} ({})",
            trial + 1,
            next.at_ms - kill_ms,
            next.message,
            next.by
        );
        out.push(Trial {
            elected_ms: elected.as_millis() as u64,
            next_step_ms: next.at_ms - kill_ms,
            next_step: format!("{} ({})", next.message, next.by),
        });
        // Bring it back and let it catch up before the next trial.
        let p = procs.iter_mut().find(|p| p.id == leader).unwrap();
        p.restart();
        let addr = p.addr.clone();
        let start = Instant::now();
        loop {
            let me = rt.block_on(client(std::slice::from_ref(&addr)).cluster_status());
            let them = rt.block_on(client(&others).cluster_status());
            if let (Ok(me), Ok(them)) = (me, them)
                && me.leader_id != 0
                && me.last_applied >= them.last_applied
            {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "restarted coordinator did not catch up"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let writes_end = measure_writes(rt, &addrs, 200);
    agents.stop(rt);
    drop(procs);
    Failover {
        nodes: n,
        rollouts: trials + 1,
        trials: out,
        writes_start,
        writes_end,
    }
}
