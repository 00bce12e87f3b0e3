//! Peer relay benchmark (issue #15: leader egress bounded independently of N): the bytes the
//! leader pushes to agents during a rollout of a package none of them holds, at N = 10, 50 and
//! 100 nodes, with peer relay (the default) and without (`--no-peer-relay`), interleaved.
//!
//! ```text
//! cargo build --release --bins && cargo bench -p orch-tests --bench relay
//! ```
//!
//! One real coordinator process (`--http-listen`, whose `/metrics` gives
//! `orchestrator_package_pushed_bytes_total`); the nodes are a lightweight fleet
//! ([`orch_tests::fleet`]): real gRPC agents in this process, each with its own store on tmpfs.
//! The package is `ORCH_BENCH_MB` MiB (default 16) of fresh random files, so no node holds any
//! of its chunks. `ORCH_BENCH_SIZES=10,50` sets N; `ORCH_BENCH_QUICK=1` runs N = 5 with a 2 MiB
//! package (for checking the benchmark itself). `ORCH_BENCH_RELAY=on` (or `off`) runs only that
//! mode. Also printed: the coordinator's resident memory once every agent registered, after the
//! rollout, and its peak. Without `--bench` it only says how to run it.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use orch_client::{Client, control as pb};
use orch_tests::cluster::{CoordProc, spawn_coordinators_with};
use orch_tests::fleet::{Fleet, terminal};
use orch_tests::http::http_get;
use tokio::runtime::Runtime;

const V0: &str = "4.2.0";
const V1: &str = "4.2.1";

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("relay benchmark: run it with `cargo bench -p orch-tests --bench relay`");
        return;
    }
    let orchestrator = orch_tests::target_dir().join("orchestrator");
    if !orchestrator.is_file() {
        eprintln!(
            "{} is missing: run `cargo build --release --bins` first",
            orchestrator.display()
        );
        std::process::exit(2);
    }
    let quick = std::env::var_os("ORCH_BENCH_QUICK").is_some();
    let mb: usize = env_or("ORCH_BENCH_MB", if quick { 2 } else { 16 });
    let sizes: Vec<usize> = match std::env::var("ORCH_BENCH_SIZES") {
        Ok(s) => s.split(',').filter_map(|x| x.trim().parse().ok()).collect(),
        Err(_) if quick => vec![5],
        Err(_) => vec![10, 50, 100],
    };
    let rt = orch_tests::fleet::runtime();
    let work = tempfile::Builder::new()
        .prefix("orch-relay-")
        .tempdir()
        .unwrap();
    let pkgs = work.path().join("pkgs");
    let pkg0 = build_package(work.path(), &pkgs, V0, 0);
    let pkg1 = build_package(work.path(), &pkgs, V1, mb);
    let size = fs::metadata(&pkg1).unwrap().len();
    println!("# Peer relay benchmark\n");
    println!(
        "package {V1}: {:.1} MB (random files: no node holds any of its chunks); 1 coordinator; nodes in-process\n",
        size as f64 / 1e6
    );
    println!(
        "| nodes | relay | leader egress (MB) | egress / package | rollout wall (s) | staging (s) | coordinator RSS registered / after / peak (MB) |"
    );
    println!("|---|---|---|---|---|---|---|");
    for &n in &sizes {
        let modes: &[bool] = match std::env::var("ORCH_BENCH_RELAY").as_deref() {
            Ok("on") => &[true],
            Ok("off") => &[false],
            _ => &[false, true],
        };
        for &relay in modes {
            let r = run(&rt, work.path(), n, relay, &pkg0, &pkg1);
            println!(
                "| {n} | {} | {:.1} | {:.2} | {:.2} | {:.2} | {:.0} / {:.0} / {:.0} |",
                if relay { "on" } else { "off" },
                r.egress as f64 / 1e6,
                r.egress as f64 / size as f64,
                r.wall.as_secs_f64(),
                r.staging.as_secs_f64(),
                r.registered.0,
                r.after.0,
                r.after.1,
            );
        }
    }
}

struct RunResult {
    egress: u64,
    wall: Duration,
    staging: Duration,
    /// The coordinator's (VmRSS, VmHWM) in MB once every agent registered, and after the
    /// rollout.
    registered: (f64, f64),
    after: (f64, f64),
}

/// `VmRSS` and `VmHWM` of a coordinator process, MB.
fn memory_mb(c: &CoordProc) -> (f64, f64) {
    let status = c
        .pid()
        .and_then(|pid| fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kib| kib * 1024.0 / 1e6)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn run(rt: &Runtime, work: &Path, n: usize, relay: bool, pkg0: &Path, pkg1: &Path) -> RunResult {
    let dir = tempfile::Builder::new()
        .prefix("run-")
        .tempdir_in(work)
        .unwrap();
    let http = format!("127.0.0.1:{}", orch_tests::free_port());
    let mut extra = vec!["--http-listen".to_string(), http.clone()];
    if !relay {
        extra.push("--no-peer-relay".into());
    }
    let coords: Vec<CoordProc> = spawn_coordinators_with(dir.path(), 1, "warn", None, &extra);
    let addrs: Vec<String> = coords.iter().map(|c| c.addr.clone()).collect();
    let roots = orch_tests::fleet::roots_dir("orch-relay-nodes-");
    let fleet = Fleet::start(rt, roots.path(), &Fleet::ids(n), &addrs, Some(pkg0));
    let mut client = Client::new(addrs.clone(), orch_tls::Security::Insecure);
    wait("all agents registered", || {
        rt.block_on(client.nodes(false)).is_ok_and(|v| v.len() >= n)
    });
    let registered = memory_mb(&coords[0]);
    let sha = orch_tests::fleet::upload(rt, &mut client, pkg1);
    let before = pushed(&http);
    let start = Instant::now();
    let st = rt
        .block_on(client.start_rollout(pb::StartRolloutRequest {
            version: V1.into(),
            package_sha256: sha,
            min_healthy_time_ms: Some(0),
            healthy_deadline_ms: Some(30_000),
            requested_by: "bench".into(),
            ..Default::default()
        }))
        .unwrap();
    let mut last = st.clone();
    wait("the rollout to finish", || {
        last = rt.block_on(client.rollout(&st.id)).unwrap();
        terminal(&last.phase)
    });
    let wall = start.elapsed();
    assert_eq!(last.phase, "succeeded", "{last:?}");
    let egress = pushed(&http) - before;
    let after = memory_mb(&coords[0]);
    let at = |needle: &str| {
        last.events
            .iter()
            .find(|e| e.message.contains(needle))
            .map(|e| e.at_ms)
    };
    let staging = match (at("preflight passed"), at(&format!("all {n} nodes staged"))) {
        (Some(a), Some(b)) if b >= a => Duration::from_millis(b - a),
        _ => Duration::ZERO,
    };
    fleet.stop(rt);
    drop(coords);
    RunResult {
        egress,
        wall,
        staging,
        registered,
        after,
    }
}

fn wait(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `orchestrator_package_pushed_bytes_total` from the coordinator's `/metrics`.
fn pushed(http: &str) -> u64 {
    let mut body = String::new();
    wait_http(http, &mut body);
    body.lines()
        .find(|l| l.starts_with("orchestrator_package_pushed_bytes_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or_else(|| panic!("no orchestrator_package_pushed_bytes_total in:\n{body}"))
}

fn wait_http(http: &str, body: &mut String) {
    let start = Instant::now();
    loop {
        let (code, b) = http_get(http, "/metrics");
        if code == 200 {
            *body = b;
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no /metrics on {http}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A state-only release `app` `v` with `mb` MiB of random files.
fn build_package(work: &Path, out: &Path, v: &str, mb: usize) -> PathBuf {
    let src = work.join(format!("src-{v}"));
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("payload.txt"), format!("app {v}\n")).unwrap();
    let mut rng = fastrand::Rng::with_seed(mb as u64 + 11);
    for i in 0..mb {
        let data: Vec<u8> = (0..1 << 20).map(|_| rng.u8(..)).collect();
        fs::write(src.join(format!("filler-{i}.bin")), data).unwrap();
    }
    orch_release::package::build(&src, "app", v.parse().unwrap(), out)
        .unwrap()
        .0
}

fn env_or(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
