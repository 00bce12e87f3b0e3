//! Growth benchmark (not a test): does the coordinators' state stay bounded over many rollouts?
//!
//! ```text
//! cargo build --release --bins && cargo bench -p orch-tests --bench growth
//! ```
//!
//! 3 real coordinator processes (data on disk, `--retain-rollouts 100`) and 20 agents in this
//! process (state-only stores on tmpfs when there is one, as in the orchestration benchmark)
//! run 1,000 rollouts back and forth between 4.2.0 and 4.2.1, each with its (tiny) package
//! uploaded again and `min-healthy-time 0`. Every 100 rollouts it prints, per coordinator
//! process: resident memory (VmRSS from /proc/PID/status), the Raft log and state machine on
//! disk (`DATA/raft/*.redb`), the history file and the blob directory; and the latency of
//! `ListRollouts` (what `orchestrator rollouts` calls; median of 20 on one channel to the
//! leader) and of `ListRollouts { all }` (median of 5).
//!
//! - `ORCH_BENCH_QUICK=1`: 30 rollouts, retention 5, a row every 5 (checks the benchmark runs).
//! - `ORCH_BENCH_NO_RETENTION=1`: retention out of reach (1,000,000), for comparison.
//! - `ORCH_BENCH_NO_ALL=1`: skip the `rollouts --all` measurement (whose answer, and so the
//!   answering leader's transient memory, grows with the history).
//! - `ORCH_BENCH_ROLLOUTS=N`, `ORCH_BENCH_RETAIN=N`, `ORCH_BENCH_EVERY=N` override the counts.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use orch_client::{Client, control as pb};
use orch_tests::cluster::{CoordProc, spawn_coordinators_with};
use orch_tests::fleet::{Fleet, terminal};
use tokio::runtime::Runtime;

const V0: &str = "4.2.0";
const V1: &str = "4.2.1";
const NODES: usize = 20;

fn env_num(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn main() {
    let orchestrator = orch_tests::target_dir().join("orchestrator");
    if !orchestrator.is_file() {
        eprintln!(
            "{} is missing: run `cargo build --release --bins` before `cargo bench -p orch-tests --bench growth`",
            orchestrator.display()
        );
        std::process::exit(2);
    }
    let quick = std::env::var_os("ORCH_BENCH_QUICK").is_some();
    let no_retention = std::env::var_os("ORCH_BENCH_NO_RETENTION").is_some();
    let total = env_num("ORCH_BENCH_ROLLOUTS").unwrap_or(if quick { 30 } else { 1000 });
    let keep = env_num("ORCH_BENCH_RETAIN").unwrap_or(if no_retention {
        1_000_000
    } else if quick {
        5
    } else {
        100
    });
    let no_all = std::env::var_os("ORCH_BENCH_NO_ALL").is_some();
    let every = env_num("ORCH_BENCH_EVERY")
        .unwrap_or(if quick { 5 } else { 100 })
        .max(1);

    let rt = orch_tests::fleet::runtime();
    let work = tempfile::Builder::new()
        .prefix("orch-growth-")
        .tempdir()
        .unwrap();
    let agent_work = orch_tests::fleet::roots_dir("orch-growth-agents-");
    let pkgs = work.path().join("pkgs");
    let pkg0 = build_package(work.path(), &pkgs, V0);
    let pkg1 = build_package(work.path(), &pkgs, V1);

    println!("# Growth benchmark\n");
    println!(
        "binary: {}; machine: {} CPUs, load average before: {}",
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
        "{total} rollouts of {NODES} nodes, 3 coordinators, --retain-rollouts {keep}{}; coordinators' data: {}\n",
        if no_retention {
            " (retention out of reach)"
        } else {
            ""
        },
        work.path().display()
    );

    let procs = spawn_coordinators_with(
        work.path(),
        3,
        "warn",
        None,
        &["--retain-rollouts".to_string(), keep.to_string()],
    );
    let addrs: Vec<String> = procs.iter().map(|p| p.addr.clone()).collect();
    wait_leader(&rt, &addrs);
    let ids: Vec<String> = (1..=NODES).map(|i| format!("n{i:02}")).collect();
    let agents = Fleet::start(&rt, agent_work.path(), &ids, &addrs, Some(&pkg0));
    wait_registered(&rt, &addrs, NODES);

    println!(
        "| rollouts | in state | leader | RSS MiB (c1/c2/c3) | raft/*.redb MiB (c1/c2/c3) | history MiB (c1/c2/c3) | blobs KiB | `rollouts` median ms | `rollouts --all` median ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let started = Instant::now();
    for i in 1..=total {
        let (v, pkg) = if i % 2 == 1 { (V1, &pkg1) } else { (V0, &pkg0) };
        let sha = orch_tests::fleet::upload(&rt, &mut client(&addrs), pkg);
        let fin = rt.block_on(async {
            let mut c = client(&addrs);
            let mut req = pb::StartRolloutRequest {
                version: v.into(),
                package_sha256: sha,
                min_healthy_time_ms: Some(0),
                healthy_deadline_ms: Some(30_000),
                requested_by: "bench".into(),
                ..Default::default()
            };
            req.nodes = ids.clone();
            let st = c.start_rollout(req).await.unwrap();
            c.follow(&st.id, |_| {}, terminal).await.unwrap()
        });
        assert_eq!(fin.phase, "succeeded", "rollout {i}: {fin:?}");
        if i % every == 0 || i == total {
            let row = measure(&rt, &addrs, &procs, !no_all);
            println!(
                "| {i} | {} | c{} | {} | {} | {} | {:.0} | {:.2} | {:.2} |",
                row.in_state,
                row.leader,
                join(&row.rss, |b| mib(*b)),
                join(&row.raft, |b| mib(*b)),
                join(&row.history, |b| mib(*b)),
                row.blobs as f64 / 1024.0,
                ms(row.list),
                ms(row.list_all),
            );
            eprintln!("  {i} rollouts after {:?}", started.elapsed());
        }
    }
    agents.stop(&rt);
    drop(procs);
}

struct Row {
    in_state: usize,
    leader: u64,
    rss: Vec<u64>,
    raft: Vec<u64>,
    history: Vec<u64>,
    blobs: u64,
    list: Duration,
    list_all: Duration,
}

fn measure(rt: &Runtime, addrs: &[String], procs: &[CoordProc], with_all: bool) -> Row {
    let status = rt.block_on(client(addrs).cluster_status()).unwrap();
    let (list, list_all, in_state) = rt.block_on(async {
        let ch =
            tonic::transport::Channel::from_shared(format!("http://{}", status.leader_address))
                .unwrap()
                .connect()
                .await
                .unwrap();
        let mut c = pb::control_client::ControlClient::new(ch).max_decoding_message_size(64 << 20);
        let mut timed = async |all: bool, n: usize| {
            let mut out = Vec::with_capacity(n);
            let mut len = 0;
            for _ in 0..n {
                let t = Instant::now();
                len = c
                    .list_rollouts(pb::ListRolloutsRequest { all })
                    .await
                    .unwrap()
                    .into_inner()
                    .rollouts
                    .len();
                out.push(t.elapsed());
            }
            (median(out), len)
        };
        let (list, in_state) = timed(false, 20).await;
        let list_all = if with_all {
            timed(true, 5).await.0
        } else {
            Duration::ZERO
        };
        (list, list_all, in_state)
    });
    let leader_blobs = procs
        .iter()
        .find(|p| p.id == status.leader_id)
        .map(|p| dir_bytes(&p.data_dir.join("blobs")))
        .unwrap_or(0);
    Row {
        in_state,
        leader: status.leader_id,
        rss: procs.iter().map(rss_bytes).collect(),
        raft: procs
            .iter()
            .map(|p| dir_bytes(&p.data_dir.join("raft")))
            .collect(),
        history: procs
            .iter()
            .map(|p| {
                fs::metadata(p.data_dir.join("history.jsonl"))
                    .map(|m| m.len())
                    .unwrap_or(0)
            })
            .collect(),
        blobs: leader_blobs,
        list,
        list_all,
    }
}

/// VmRSS of a coordinator process, in bytes.
fn rss_bytes(p: &CoordProc) -> u64 {
    let Some(pid) = p.pid() else { return 0 };
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Bytes of the regular files directly in `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn mib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1024.0 * 1024.0))
}

fn join(v: &[u64], f: impl Fn(&u64) -> String) -> String {
    v.iter().map(f).collect::<Vec<_>>().join(" / ")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn client(addrs: &[String]) -> Client {
    Client::new(addrs.to_vec(), orch_tls::Security::Insecure)
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
