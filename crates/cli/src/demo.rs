//! `orchestrator demo`: runs the demonstration cluster of `orch-demo` and tells its story, with
//! the time of each event, how long each node's step took and each rollout's total, then the
//! commands to try next. `demo package` builds a demo-service package.

use std::path::Path;

use anyhow::{Context, Result};
use orch_demo::{DemoCluster, DemoConfig, DemoOutcome, Report};

use crate::args::{DemoArgs, DemoCmd, GlobalOpts};
use crate::output::{clock_ms, human_duration, now_ms, releases};

pub fn run(args: DemoArgs, g: &GlobalOpts) -> Result<()> {
    let exe = std::env::current_exe().context("locate the orchestrator binary")?;
    if let Some(DemoCmd::Package {
        version,
        out,
        broken,
        error_percent,
    }) = args.cmd
    {
        let bin = orch_demo::service_binary(&exe, &out)?;
        let faults = orch_demo::ReleaseFaults {
            broken,
            error_percent,
        };
        let zip = orch_demo::build_package_with(&out, version, faults, &bin)?;
        if g.json {
            println!("{}", serde_json::json!({ "package": zip }));
        } else {
            println!("Built package: {}", zip.display());
        }
        return Ok(());
    }
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("orchestrator-demo-{}", std::process::id())),
    };
    let mut config = DemoConfig::new(dir.clone(), exe.clone());
    config.nodes = args.nodes;
    config.coordinators = args.coordinators;
    config.insecure = args.insecure;
    config.failure = !args.no_failure;
    config.check()?;

    let mut printer = Printer;
    let mut report = |r: Report<'_>| printer.print(r);
    let mut cluster = DemoCluster::start(&config, &mut report)?;
    if let Some(url) = cluster.dashboard_urls().first() {
        println!("Dashboard and metrics: {url} (every coordinator serves one; see docs/api.md)");
    }
    let rt = tokio::runtime::Runtime::new()?;
    let outcome = rt.block_on(async {
        cluster
            .run(&mut report, crate::daemon::shutdown_signal())
            .await
    })?;
    summary(&outcome);
    if args.keep {
        next_steps(&exe, &cluster, &dir, true);
        rt.block_on(async { crate::daemon::shutdown_signal().await });
        cluster.stop();
    } else {
        cluster.stop();
        next_steps(&exe, &cluster, &dir, false);
    }
    println!("Demo files (logs, data): {}", dir.display());
    Ok(())
}

/// Prints the demo's reports, each line stamped with the wall-clock time.
struct Printer;

impl Printer {
    fn line(&self, at_ms: u64, text: &str) {
        println!("{}  {text}", clock_ms(at_ms));
    }

    fn print(&mut self, r: Report<'_>) {
        let now = now_ms();
        match r {
            Report::Certificates { dir } => {
                self.line(now, &format!("Mutual TLS: certificates in {}", dir.display()))
            }
            Report::Packages { dir, versions } => {
                let v: Vec<String> = versions.iter().map(|v| v.to_string()).collect();
                self.line(
                    now,
                    &format!(
                        "Built demo-service packages {} in {}",
                        v.join(", "),
                        dir.display()
                    ),
                );
            }
            Report::NodesInstalled { nodes, version } => {
                self.line(now, &format!("{nodes} nodes run demo-service {version}"))
            }
            Report::DaemonsStarted {
                coordinators,
                nodes,
                logs,
            } => self.line(
                now,
                &format!(
                    "Started {coordinators} coordinators and {nodes} agents on loopback (logs in {})",
                    logs.display()
                ),
            ),
            Report::Ready {
                leader,
                term,
                nodes,
            } => self.line(
                now,
                &format!("Coordinator {leader} leads (term {term}); all {nodes} nodes registered"),
            ),
            other => self.print_rollout(now, other),
        }
    }

    fn print_rollout(&mut self, now: u64, r: Report<'_>) {
        match r {
            Report::RolloutStarting {
                version,
                package,
                min_healthy_time,
                broken,
            } => {
                println!();
                if broken {
                    println!(
                        "Now a broken release: {version} starts but fails its health check, so the rollout rolls back."
                    );
                }
                self.line(
                    now,
                    &format!(
                        "$ orchestrator rollout {version} --package {} --min-healthy-time {}ms",
                        package.display(),
                        min_healthy_time.as_millis()
                    ),
                );
            }
            Report::RolloutStarted { id } => self.line(now, &format!("Rollout {id} started")),
            Report::Event { event, step } => {
                let took = step
                    .map(|d| format!("  (+{})", human_duration(d)))
                    .unwrap_or_default();
                println!("{}    {}{took}", clock_ms(event.at_ms), event.message);
            }
            Report::RolloutEnded { status, took } => {
                let mut line = format!(
                    "Rollout {} {} in {}",
                    status.id,
                    status.phase,
                    human_duration(took)
                );
                if !status.error.is_empty() {
                    line.push_str(&format!(": {}", status.error));
                }
                self.line(now, &line);
            }
            Report::Nodes { nodes } => {
                println!();
                for n in nodes {
                    println!("  {}  healthy={}  {}", n.id, n.healthy, releases(n));
                }
            }
            Report::Load { served, failures } => println!(
                "\nClient load during the rollouts: {served} requests served, {failures} failed (hot swaps drop nothing)"
            ),
            _ => {}
        }
    }
}

fn summary(o: &DemoOutcome) {
    for r in &o.rollouts {
        println!(
            "Rollout {} of {}: {} in {}",
            r.id,
            r.version,
            r.phase,
            human_duration(r.took)
        );
    }
}

/// The commands to try next, with this binary's real path (it may not be on PATH).
fn next_steps(exe: &Path, cluster: &DemoCluster, dir: &Path, running: bool) {
    let bin = shell_quote(exe);
    if !running {
        println!("\nTo keep the cluster running and try commands against it:");
        println!("  {bin} demo --keep --dir {}", shell_quote(dir));
        return;
    }
    println!("\nThe cluster keeps running (Ctrl-C stops it). Try, in another terminal:");
    println!(
        "  export ORCHESTRATOR_COORDINATORS={}",
        cluster.coordinator_addrs().join(",")
    );
    let tls = match cluster.operator_tls_dir() {
        Some(d) => {
            println!("  export ORCHESTRATOR_TLS_DIR={}", shell_quote(&d));
            ""
        }
        None => " --insecure",
    };
    if let Some(url) = cluster.dashboard_urls().first() {
        match cluster.operator_tls_dir() {
            Some(d) => println!(
                "  curl --cacert {ca} --cert {cert} --key {key} {url}api/v1/nodes   # the dashboard's API; a browser needs the certificate too (docs/api.md)",
                ca = shell_quote(&d.join("ca.pem")),
                cert = shell_quote(&d.join("cert.pem")),
                key = shell_quote(&d.join("key.pem")),
            ),
            None => println!("  open {url}   # the live dashboard"),
        }
    }
    let pkgs = dir.join("packages");
    println!("  {bin} nodes{tls}");
    println!("  {bin} rollouts{tls}");
    println!("  {bin} status{tls}");
    println!("  {bin} demo package 4.2.3 --out {}", shell_quote(&pkgs));
    println!(
        "  {bin} rollout 4.2.3 --package {}{tls}",
        shell_quote(&pkgs.join("demo-service-4.2.3.zip"))
    );
}

/// `path`, quoted for a POSIX shell when it needs to be.
fn shell_quote(p: &Path) -> String {
    let s = p.display().to_string();
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+:,=@".contains(c))
    {
        s
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}
