//! Availability of the demo service under steady load during a 5-node rollout and during a
//! rollback (issue #15: zero failed requests, p99 at most 2x the idle p99).
//!
//! A real cluster (1 coordinator, 5 agents, each node's demo service) on loopback; every
//! node's service gets a steady closed-loop load (one keep-alive and one fresh-connection client,
//! paced) for the whole run, measured per phase: idle, a rollout to 4.2.1 (hot switches, node by
//! node, min-healthy-time 1 s), a rollout of a broken 4.2.2 (its first node fails its health gate
//! and is rolled back), and idle again. A failed request is one without a complete 200 answer.
//!
//! `cargo build --release --bins && cargo bench -p orch-tests --bench availability`
//! (`ORCH_BENCH_QUICK=1`: 1 s idle phases, for checking the benchmark itself).

use std::time::Duration;

use orch_demo_service::load::{Load, LoadConfig, LoadReport};
use orch_tests::cluster::{Cluster, ClusterOpts};

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "availability benchmark: run it with `cargo bench -p orch-tests --bench availability`"
        );
        return;
    }
    let quick = std::env::var_os("ORCH_BENCH_QUICK").is_some();
    let idle = Duration::from_secs(if quick { 1 } else { 5 });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let c = Cluster::start(ClusterOpts::demo(1, 5));
    let good = c.package("4.2.1", false).display().to_string();
    let broken = c.package("4.2.2", true).display().to_string();
    let _in_rt = rt.enter();
    let loads: Vec<Load> = c
        .services()
        .into_iter()
        .map(|addr| {
            Load::start(LoadConfig {
                keepalive_clients: 1,
                fresh_clients: 1,
                keepalive_pause: Duration::from_millis(2),
                fresh_pause: Duration::from_millis(5),
                ..LoadConfig::new(addr)
            })
        })
        .collect();
    let window = |loads: &[Load]| merge(loads.iter().map(Load::take_report));
    let mut phases = Vec::new();

    std::thread::sleep(idle);
    phases.push(("idle", window(&loads), String::new()));

    let out = c.cli_json(&[
        "rollout",
        "4.2.1",
        "--package",
        &good,
        "--min-healthy-time",
        "1s",
        "--json",
    ]);
    phases.push((
        "rollout 4.2.0 -> 4.2.1 (5 nodes)",
        window(&loads),
        out["phase"].to_string(),
    ));

    let o = c.cli(&[
        "rollout",
        "4.2.2",
        "--package",
        &broken,
        "--min-healthy-time",
        "1s",
        "--healthy-deadline",
        "10s",
        "--json",
    ]);
    let end = serde_json::from_slice::<serde_json::Value>(&o.stdout)
        .map(|v| v["phase"].to_string())
        .unwrap_or_else(|_| "unreadable".into());
    phases.push((
        "broken 4.2.2: failed gate, rolled back",
        window(&loads),
        end,
    ));

    std::thread::sleep(idle);
    let last = rt.block_on(async {
        let mut reports = Vec::new();
        for l in loads {
            reports.push(l.stop().await);
        }
        merge(reports)
    });
    phases.push(("idle after", last, String::new()));

    let idle_p99 = phases[0].1.percentile(0.99).unwrap_or_default();
    println!("## Availability under load (5 demo services, 2 clients each, 1 coordinator)\n");
    println!(
        "| phase | how it ended | duration | requests | failed | p50 | p99 | p99 / idle p99 |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (name, r, ended) in &phases {
        let p50 = r.percentile(0.5).unwrap_or_default();
        let p99 = r.percentile(0.99).unwrap_or_default();
        println!(
            "| {name} | {ended} | {:.1} s | {} | {} | {:.2} ms | {:.2} ms | {:.2} |",
            r.elapsed.as_secs_f64(),
            r.served,
            r.failures,
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            p99.as_secs_f64() / idle_p99.as_secs_f64().max(1e-9)
        );
        for f in r.failure_samples.iter().take(5) {
            println!("  failure: {f}");
        }
    }
    let failed: u64 = phases.iter().map(|p| p.1.failures).sum();
    let worst = phases[1..3]
        .iter()
        .filter_map(|p| p.1.percentile(0.99))
        .max()
        .unwrap_or_default();
    println!(
        "\nfailed requests: {failed} (target 0); worst p99 during rollout/rollback {:.2} ms = {:.2}x the idle p99 (target <= 2x)",
        worst.as_secs_f64() * 1e3,
        worst.as_secs_f64() / idle_p99.as_secs_f64().max(1e-9)
    );
}

/// One report over several clients' windows (their durations overlap: the longest is kept).
fn merge(reports: impl IntoIterator<Item = LoadReport>) -> LoadReport {
    let mut all = LoadReport::default();
    for r in reports {
        all.served += r.served;
        all.failures += r.failures;
        all.failure_samples.extend(r.failure_samples);
        all.latencies_us.extend(r.latencies_us);
        all.reconnects += r.reconnects;
        all.idle_closes += r.idle_closes;
        all.elapsed = all.elapsed.max(r.elapsed);
    }
    all.latencies_us.sort_unstable();
    all
}
