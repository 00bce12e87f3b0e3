//! `orchestrator demo`: an all-local cluster on loopback. It starts coordinators and agents as
//! child processes of this binary, each node running the hot-swappable demo service on 4.2.0,
//! keeps a client load on every service, rolls 4.2.1 out, and reports what happened (including
//! how many requests failed during the hot swaps: none is the point). `demo package` builds a
//! demo-service package.

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use orch_client::{Client, control as pb};
use orch_demo_service::load::{Load, LoadConfig};
use orch_release::{PackageSource, Store, StoreConfig, package};
use orch_types::Version;

use crate::args::{DemoArgs, DemoCmd};

pub fn run(args: DemoArgs) -> Result<()> {
    if let Some(DemoCmd::Package {
        version,
        out,
        broken,
    }) = args.cmd
    {
        let zip = build_package(&out, version, broken, &service_binary(&out)?)?;
        println!("Built package: {}", zip.display());
        return Ok(());
    }
    if ![1, 3, 5].contains(&args.coordinators) {
        bail!("--coordinators must be 1, 3 or 5");
    }
    if args.nodes == 0 || args.nodes > 20 {
        bail!("--nodes must be between 1 and 20");
    }
    let base = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("orchestrator-demo-{}", std::process::id())),
    };
    fs::create_dir_all(&base).with_context(|| format!("create {}", base.display()))?;
    let mut cluster = Cluster {
        children: Vec::new(),
        roots: Vec::new(),
    };
    let result = demo(&args, &base, &mut cluster);
    if result.is_ok() && args.keep {
        println!("\nThe cluster keeps running (Ctrl-C stops it). Try:");
        println!(
            "  export ORCHESTRATOR_COORDINATORS={}",
            cluster_addrs(&base)?
        );
        if args.insecure {
            println!("  orchestrator nodes --insecure; orchestrator status --insecure");
        } else {
            println!(
                "  export ORCHESTRATOR_TLS_DIR={}",
                base.join("certs").join("operator-demo").display()
            );
            println!("  orchestrator nodes; orchestrator status");
        }
        let rt = tokio::runtime::Runtime::new()?;
        rt.block_on(crate::agent_cmd::shutdown_signal());
    }
    cluster.stop();
    if result.is_ok() {
        println!("Demo files (logs, data): {}", base.display());
    }
    result
}

fn cluster_addrs(base: &Path) -> Result<String> {
    Ok(fs::read_to_string(base.join("coordinators"))?
        .trim()
        .to_string())
}

/// Everything the demo started, stopped on every exit path (also on panic, via Drop).
struct Cluster {
    children: Vec<(String, Child)>,
    roots: Vec<PathBuf>,
}

impl Cluster {
    fn stop(&mut self) {
        for (_, c) in &mut self.children {
            // SAFETY: plain kill(2) of our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for (_, c) in &mut self.children {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
        for r in self.roots.drain(..) {
            let _ = orch_demo_service::stop(&r, Duration::from_secs(5));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The demo-service binary, or a wrapper that runs this binary as the demo service.
fn service_binary(scratch: &Path) -> Result<PathBuf> {
    if let Ok(p) = orch_demo_service::find_service_binary() {
        return Ok(p);
    }
    let exe = std::env::current_exe()?;
    fs::create_dir_all(scratch)?;
    let wrapper = scratch.join(".demo-service-wrapper");
    let quoted = exe.display().to_string().replace('\'', "'\\''");
    fs::write(
        &wrapper,
        format!("#!/bin/sh\nexec '{quoted}' demo-service \"$@\"\n"),
    )?;
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755))?;
    Ok(wrapper)
}

fn build_package(out: &Path, v: Version, broken: bool, bin: &Path) -> Result<PathBuf> {
    let src = out.join(format!(".demo-src-{v}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&src);
    orch_demo_service::write_release_dir(&src, &v.to_string(), broken, bin)
        .map_err(|e| anyhow!("{e}"))?;
    let built = package::build(&src, "demo-service", v, out);
    let _ = fs::remove_dir_all(&src);
    Ok(built?.0)
}

fn spawn(cluster: &mut Cluster, name: &str, log: &Path, args: &[String]) -> Result<()> {
    let exe = std::env::current_exe()?;
    let log_file = fs::File::create(log)?;
    let child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("start {name}"))?;
    cluster.children.push((name.to_string(), child));
    Ok(())
}

/// The demo's certificates in `base/certs` (one folder per party, `orchestrator certs init`
/// style); parties missing from an earlier run with the same `--dir` are issued.
fn demo_certs(base: &Path, coordinators: u32, nodes: u32) -> Result<PathBuf> {
    let dir = base.join("certs");
    let agents: Vec<String> = (1..=nodes).map(|n| format!("n{n}")).collect();
    if !dir.join(orch_tls::CA_FOLDER).exists() {
        orch_tls::init(&dir, coordinators, &agents, &["demo".to_string()])?;
        return Ok(dir);
    }
    let mut want: Vec<(orch_tls::Role, String)> = (1..=coordinators)
        .map(|i| (orch_tls::Role::Coordinator, i.to_string()))
        .collect();
    want.extend(agents.into_iter().map(|a| (orch_tls::Role::Agent, a)));
    want.push((orch_tls::Role::Operator, "demo".into()));
    for (role, name) in want {
        if !dir.join(orch_tls::party_domain(role, &name)).exists() {
            orch_tls::issue(&dir, role, &name, &[])?;
        }
    }
    Ok(dir)
}

/// `--insecure`, or `--tls-dir DIR/<party>`.
fn tls_flags(certs: Option<&Path>, party: &str) -> Vec<String> {
    match certs {
        None => vec!["--insecure".into()],
        Some(d) => vec!["--tls-dir".into(), d.join(party).display().to_string()],
    }
}

fn demo(args: &DemoArgs, base: &Path, cluster: &mut Cluster) -> Result<()> {
    let certs = if args.insecure {
        None
    } else {
        let d = demo_certs(base, args.coordinators, args.nodes)?;
        println!("Mutual TLS: certificates in {}", d.display());
        Some(d)
    };
    let certs = certs.as_deref();
    let v0: Version = "4.2.0".parse()?;
    let v1: Version = "4.2.1".parse()?;
    let packages = base.join("packages");
    fs::create_dir_all(&packages)?;
    let bin = service_binary(&packages)?;
    let pkg0 = build_package(&packages, v0, false, &bin)?;
    let pkg1 = build_package(&packages, v1, false, &bin)?;
    println!(
        "Built demo-service packages 4.2.0 and 4.2.1 in {}",
        packages.display()
    );

    // Nodes: a root each, 4.2.0 installed (its hook starts the service), then an agent.
    let mut services: Vec<SocketAddr> = Vec::new();
    for i in 1..=args.nodes {
        let root = base.join(format!("node{i}"));
        let releases = root.join("releases");
        fs::create_dir_all(&releases)?;
        let svc: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        fs::write(
            root.join("demo-service.toml"),
            format!("listen = \"{svc}\"\n"),
        )?;
        let store = Store::open(StoreConfig::new(&root))?;
        cluster.roots.push(root.clone());
        store.install(
            &PackageSource::File {
                path: pkg0.clone(),
                sha256: None,
            },
            true,
        )?;
        services.push(svc);
    }
    println!("{} nodes run demo-service 4.2.0", args.nodes);

    let cports: Vec<u16> = (0..args.coordinators)
        .map(|_| free_port())
        .collect::<Result<_>>()?;
    let caddrs: Vec<String> = cports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    fs::write(base.join("coordinators"), caddrs.join(","))?;
    for (i, addr) in caddrs.iter().enumerate() {
        let id = i + 1;
        let mut a = vec![
            "coordinator".to_string(),
            "--id".into(),
            id.to_string(),
            "--listen".into(),
            addr.clone(),
            "--data-dir".into(),
            base.join(format!("coordinator{id}")).display().to_string(),
        ];
        a.extend(tls_flags(certs, &format!("coordinator-{id}")));
        for (j, peer) in caddrs.iter().enumerate() {
            if j != i {
                a.push("--peer".into());
                a.push(format!("{}={peer}", j + 1));
            }
        }
        if id == 1 {
            a.push("--bootstrap".into());
        }
        spawn(
            cluster,
            &format!("coordinator {id}"),
            &base.join(format!("coordinator{id}.log")),
            &a,
        )?;
    }
    for (i, svc) in services.iter().enumerate() {
        let n = i + 1;
        let mut a = vec![
            "agent".to_string(),
            "--node-id".into(),
            format!("n{n}"),
            "--root-dir".into(),
            base.join(format!("node{n}")).display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{}", free_port()?),
            "--health-url".into(),
            format!("http://{svc}/health"),
        ];
        a.extend(tls_flags(certs, &format!("agent-n{n}")));
        for c in &caddrs {
            a.push("--coordinator".into());
            a.push(c.clone());
        }
        spawn(
            cluster,
            &format!("agent n{n}"),
            &base.join(format!("agent{n}.log")),
            &a,
        )?;
    }
    println!(
        "Started {} coordinators and {} agents on loopback (logs in {})",
        args.coordinators,
        args.nodes,
        base.display()
    );

    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let security = match certs {
            None => orch_tls::Security::Insecure,
            Some(d) => orch_tls::Security::resolve(false, Some(&d.join("operator-demo")), None, None, None)?,
        };
        let mut c = Client::new(caddrs.clone(), security);
        // Wait (bounded) for a leader and every agent's registration.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let nodes = c.nodes(false).await.map(|n| n.len()).unwrap_or(0);
            if nodes == args.nodes as usize {
                break;
            }
            if Instant::now() > deadline {
                bail!("only {nodes} of {} agents registered within 30s; see the logs in {}", args.nodes, base.display());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let st = c.cluster_status().await?;
        println!("Coordinator {} leads (term {}); all {} nodes registered\n", st.leader_id, st.term, args.nodes);

        // Client load on every service for the whole rollout.
        let loads: Vec<Load> = services.iter().map(|a| Load::start(LoadConfig::new(*a))).collect();

        let info = package::verify(&pkg1, None, Some(v1), &orch_release::Limits::default())?;
        println!("$ orchestrator rollout 4.2.1 --package {} --min-healthy-time 2s", pkg1.display());
        c.upload(
            &pkg1,
            pb::UploadHeader {
                name: info.name.clone(),
                version: info.version.to_string(),
                sha256: info.sha256.clone(),
                size: info.size,
                signature: Vec::new(),
            },
        )
        .await?;
        let started = c
            .start_rollout(pb::StartRolloutRequest {
                version: v1.to_string(),
                package_sha256: info.sha256.clone(),
                min_healthy_time_ms: Some(2000),
                requested_by: "orchestrator demo".into(),
                ..Default::default()
            })
            .await?;
        let mut printed = 0;
        let fin = c
            .follow(
                &started.id,
                |s| {
                    for e in s.events.iter().skip(printed) {
                        println!("  {}", e.message);
                    }
                    printed = printed.max(s.events.len());
                },
                |p| matches!(p, "succeeded" | "rolled_back" | "rollback_failed" | "aborted"),
            )
            .await?;
        println!("Rollout {} {}\n", fin.id, fin.phase);

        let mut served = 0;
        let mut failures = 0;
        for l in loads {
            let r = l.stop().await;
            served += r.served;
            failures += r.failures;
        }
        for n in c.nodes(true).await? {
            let versions: Vec<String> = n.versions.iter().map(|e| format!("{} {}", e.version, e.state)).collect();
            println!("  {}  healthy={}  {}", n.id, n.healthy, versions.join(", "));
        }
        println!(
            "\nClient load during the rollout: {served} requests served, {failures} failed (hot swaps drop nothing)"
        );
        if fin.phase != "succeeded" {
            bail!("the demo rollout ended {}: {}", fin.phase, fin.error);
        }
        Ok(())
    })
}
