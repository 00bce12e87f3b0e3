//! Hot-swap benchmark: a client load (keep-alive and fresh-connection clients) against the demo
//! service before, during and after 20 consecutive activations, each run through the release's
//! `hooks/activate` as the release store runs it. Prints a markdown table of requests served,
//! failures and latency per phase.
//!
//! `cargo bench -p orch-demo-service --bench hotswap`

use std::path::Path;
use std::time::{Duration, Instant};

use orch_demo_service::fixture::{self, Reaper, patch_version};
use orch_demo_service::load::{Load, LoadConfig, LoadReport};

const SWAPS: usize = 20;
const STEADY_PHASE: Duration = Duration::from_secs(5);
const KEEPALIVE_CLIENTS: usize = 4;
const FRESH_CLIENTS: usize = 4;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = runtime.block_on(run()) {
        eprintln!("hotswap benchmark failed: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let root = std::fs::canonicalize(tmp.path())?;
    // Kills every service process of this root on return, also on panic.
    let _reaper = Reaper::new(&root);
    let addr = fixture::free_loopback_addr()?;
    let releases: Vec<(String, bool)> = (0..=SWAPS).map(|i| (patch_version(i), false)).collect();
    let binary = Path::new(env!("CARGO_BIN_EXE_demo-service"));
    fixture::setup_root(&root, binary, &releases, addr)?;

    activate(&root, "none", &patch_version(0)).await?;
    let mut config = LoadConfig::new(addr);
    config.keepalive_clients = KEEPALIVE_CLIENTS;
    config.fresh_clients = FRESH_CLIENTS;
    let load = Load::start(config.clone());

    // Warm up (connections open, caches warm), then measure.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = load.take_report();
    tokio::time::sleep(STEADY_PHASE).await;
    let before = load.take_report();

    let started = Instant::now();
    let mut activation_ms = Vec::new();
    for i in 1..=SWAPS {
        let t = Instant::now();
        activate(&root, &patch_version(i - 1), &patch_version(i)).await?;
        activation_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let swaps_took = started.elapsed();
    let during = load.take_report();

    tokio::time::sleep(STEADY_PHASE).await;
    let after = load.stop().await;

    activation_ms.sort_by(f64::total_cmp);
    println!(
        "hot swap: {SWAPS} activations in {:.2} s (activation hook run: median {:.0} ms, max {:.0} ms); load: {KEEPALIVE_CLIENTS} keep-alive + {FRESH_CLIENTS} fresh-connection clients, closed loop, fresh clients pause {:?} between requests; loopback, {} cores",
        swaps_took.as_secs_f64(),
        activation_ms[activation_ms.len() / 2],
        activation_ms[activation_ms.len() - 1],
        config.fresh_pause,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    println!();
    println!(
        "| phase | duration | requests served | failures | req/s | p50 latency | p99 latency | keep-alive reconnects (Connection: close) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (name, r) in [
        ("before", &before),
        ("during 20 swaps", &during),
        ("after", &after),
    ] {
        row(name, r);
    }
    for (name, r) in [("before", &before), ("during", &during), ("after", &after)] {
        if r.failures > 0 {
            eprintln!("{name}: failures: {:?}", r.failure_samples);
        }
    }
    Ok(())
}

fn row(name: &str, r: &LoadReport) {
    let ms = |d: Option<Duration>| {
        d.map_or("-".into(), |d| {
            format!("{:.2} ms", d.as_secs_f64() * 1000.0)
        })
    };
    println!(
        "| {name} | {:.2} s | {} | {} | {:.0} | {} | {} | {} |",
        r.elapsed.as_secs_f64(),
        r.served,
        r.failures,
        r.requests_per_sec(),
        ms(r.percentile(0.5)),
        ms(r.percentile(0.99)),
        r.reconnects
    );
}

async fn activate(root: &Path, from: &str, to: &str) -> anyhow::Result<()> {
    let out = fixture::run_hook(root, from, to, Duration::from_secs(90)).await?;
    anyhow::ensure!(
        out.success,
        "activation {from} -> {to} failed: {}",
        out.stderr.trim()
    );
    Ok(())
}
