//! Raft commit latency (sequential writes, each waiting for commit + apply on the leader) for
//! 1 and 3 coordinators on loopback, and the time from killing the leader to a new ready leader.
//!
//! `cargo bench -p orch-coordinator --bench raft_commit` (env: `RAFT_BENCH_WRITES`, default 500;
//! `RAFT_BENCH_FAILOVERS`, default 5).

#[path = "../tests/raft_support/mod.rs"]
mod raft_support;

use std::time::{Duration, Instant};

use raft_support::{Cluster, register};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

async fn commit_latency(nodes: &[u64], writes: usize) {
    let mut c = Cluster::start(nodes, None).await;
    let leader = c.leader(Duration::from_secs(20)).await;
    for n in 0..20 {
        c.node(leader)
            .write(register(1_000_000 + n))
            .await
            .expect("warm-up write");
    }
    let mut lat = Vec::with_capacity(writes);
    let start = Instant::now();
    for n in 0..writes as u64 {
        let t = Instant::now();
        c.node(leader).write(register(n)).await.expect("write");
        lat.push(t.elapsed());
    }
    let total = start.elapsed();
    lat.sort();
    let mean = lat.iter().sum::<Duration>() / lat.len() as u32;
    println!(
        "raft commit latency, {} coordinator(s), {writes} sequential writes: median {}, p99 {}, mean {}, max {}, {:.0} writes/s",
        nodes.len(),
        ms(pct(&lat, 0.5)),
        ms(pct(&lat, 0.99)),
        ms(mean),
        ms(*lat.last().unwrap()),
        writes as f64 / total.as_secs_f64()
    );
    c.shutdown().await;
}

async fn failover(trials: usize) {
    let mut c = Cluster::start(&[1, 2, 3], None).await;
    let mut times = Vec::new();
    for _ in 0..trials {
        let leader = c.leader(Duration::from_secs(20)).await;
        c.node(leader).write(register(0)).await.expect("write");
        let t = Instant::now();
        c.kill(leader).await;
        let new_leader = c.leader(Duration::from_secs(20)).await;
        c.node(new_leader)
            .write(register(1))
            .await
            .expect("write after failover");
        times.push(t.elapsed());
        c.restart(leader).await;
        // Let the restarted node catch up before the next round.
        let idx = c.node(new_leader).metrics().last_applied;
        c.wait_applied(idx, Duration::from_secs(20)).await;
    }
    times.sort();
    println!(
        "raft failover (kill leader -> new leader committed a write), {trials} trials: min {}, median {}, max {}",
        ms(times[0]),
        ms(pct(&times, 0.5)),
        ms(*times.last().unwrap())
    );
    c.shutdown().await;
}

fn main() {
    let writes = env("RAFT_BENCH_WRITES", 500);
    let failovers = env("RAFT_BENCH_FAILOVERS", 5);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        commit_latency(&[1], writes).await;
        commit_latency(&[1, 2, 3], writes).await;
        if failovers > 0 {
            failover(failovers).await;
        }
    });
}
