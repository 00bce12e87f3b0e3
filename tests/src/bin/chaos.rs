//! The chaos soak (issue #14): seeded rollouts under injected faults, every invariant checked
//! after each run (see `orch_tests::chaos`).
//!
//! ```text
//! cargo run -p orch-tests --release --bin chaos -- --backend process|containers --runs N [--seed S] [--minutes M]
//! ```
//!
//! `--minutes M` starts no new run after M minutes (the totals count the runs done), so a soak
//! can fill a time budget and still end cleanly: every process and container it started is
//! removed when it ends.
//!
//! Prints every run (its seed first; `ORCH_CHAOS_SEED=S` replays one) and the totals: runs,
//! phases, faults injected by kind, violations, time. Exit 1 when any run broke an invariant.
//! The binaries it drives come from the same target dir (`cargo build --bins` first).

use std::process::ExitCode;

use orch_tests::chaos::{self, Backend, ContainerBackend, ProcessBackend};
use orch_tests::containers::docker_or_skip;

const USAGE: &str = "usage: chaos --backend process|containers --runs N [--seed S] [--minutes M]";

fn main() -> ExitCode {
    let mut backend = String::from("process");
    let mut runs: u64 = 10;
    let mut seed: u64 = fastrand::u64(..);
    let mut minutes: Option<u64> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let value = args.next();
        let parsed = match (a.as_str(), value) {
            ("--backend", Some(v)) => {
                backend = v;
                true
            }
            ("--runs", Some(v)) => v.parse().map(|n| runs = n).is_ok(),
            ("--seed", Some(v)) => v.parse().map(|n| seed = n).is_ok(),
            ("--minutes", Some(v)) => v.parse().map(|n| minutes = Some(n)).is_ok(),
            _ => false,
        };
        if !parsed {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    }
    let mut b: Box<dyn Backend> = match backend.as_str() {
        "process" => Box::new(ProcessBackend::new(3, 3)),
        "containers" => {
            if !docker_or_skip("chaos soak") {
                return ExitCode::from(2);
            }
            Box::new(ContainerBackend::new(3, 3))
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    println!("chaos soak on {backend}: {runs} runs from base seed {seed}");
    let seeds = chaos::seeds(seed, runs);
    let budget = minutes.map(|m| std::time::Duration::from_secs(m * 60));
    let totals = chaos::soak_within(b.as_mut(), &seeds, budget);
    println!("TOTALS ({backend}, base seed {seed})\n{totals}");
    if totals.violations == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
