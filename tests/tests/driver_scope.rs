//! The rollout driver's work belongs to its Raft term: when the term ends (here: the
//! coordinator shuts down while a health gate is being probed), every task the driver started
//! is gone, so nothing keeps calling agents with the old fence or proposing results produced
//! under the old term. Coordinator and agent run in this process, so a task that outlived its
//! coordinator would still be running here and be seen.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use orch_agent::{AgentConfig, HealthConfig};
use orch_client::{Client, control as pb};
use orch_coordinator::CoordinatorConfig;
use orch_release::{PackageSource, Store, StoreConfig};
use orch_tests::write_script;

fn build_package(work: &Path, out: &Path, v: &str) -> std::path::PathBuf {
    let src = work.join(format!("src-{v}"));
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("payload.txt"), format!("app {v}\n")).unwrap();
    orch_release::package::build(&src, "app", v.parse().unwrap(), out)
        .unwrap()
        .0
}

fn probes(count_file: &Path) -> usize {
    fs::read_to_string(count_file)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_coordinator_that_stops_leading_leaves_no_driver_task_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let pkgs = work.join("pkgs");
    let pkg0 = build_package(work, &pkgs, "4.2.0");
    let pkg1 = build_package(work, &pkgs, "4.2.1");
    let root = work.join("n1");
    fs::create_dir_all(&root).unwrap();
    Store::open(StoreConfig::new(&root))
        .unwrap()
        .install(
            &PackageSource::File {
                path: pkg0,
                sha256: None,
            },
            true,
        )
        .unwrap();
    // The health check counts its runs and always fails: the gate keeps probing until its
    // (long) deadline.
    let count_file = work.join("probes.log");
    let check = work.join("check.sh");
    write_script(
        &check,
        &format!(
            "#!/bin/sh\necho probe >> {}\nexit 1\n",
            count_file.display()
        ),
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    let coord_listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let coord_addr = coord_listener.local_addr().unwrap();
    let mut cfg = CoordinatorConfig::new(
        1,
        coord_addr,
        work.join("coordinator"),
        orch_tls::Security::Insecure,
    );
    cfg.bootstrap = true;
    let (stop_coord, stopped) = tokio::sync::oneshot::channel::<()>();
    let coordinator = rt.spawn(async move {
        let shutdown = async move {
            let _ = stopped.await;
        };
        orch_coordinator::serve(cfg, coord_listener, shutdown).await
    });

    let agent_listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let agent_addr = agent_listener.local_addr().unwrap();
    let mut acfg = AgentConfig::new(
        "n1".parse().unwrap(),
        root,
        agent_addr,
        orch_tls::Security::Insecure,
    );
    acfg.coordinators = vec![coord_addr.to_string()];
    acfg.health = HealthConfig {
        url: None,
        cmd: Some(vec![check.display().to_string()]),
        timeout: Duration::from_secs(2),
    };
    acfg.shutdown_grace = Duration::from_secs(2);
    let (stop_agent, agent_stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = rt.spawn(async move {
        let shutdown = async move {
            let _ = agent_stopped.await;
        };
        orch_agent::serve(acfg, agent_listener, shutdown).await
    });

    let addrs = vec![coord_addr.to_string()];
    let client = || Client::new(addrs.clone(), orch_tls::Security::Insecure);
    wait_for("n1 to register", Duration::from_secs(30), || {
        rt.block_on(client().nodes(false))
            .is_ok_and(|n| n.len() == 1)
    });
    let info = orch_release::package::verify(
        &pkg1,
        None,
        Some("4.2.1".parse().unwrap()),
        &orch_release::Limits::default(),
    )
    .unwrap();
    rt.block_on(client().upload(
        &pkg1,
        pb::UploadHeader {
            name: info.name.clone(),
            version: info.version.to_string(),
            sha256: info.sha256.clone(),
            size: info.size,
            signature: Vec::new(),
        },
    ))
    .unwrap();
    rt.block_on(client().start_rollout(pb::StartRolloutRequest {
        version: "4.2.1".into(),
        package_sha256: info.sha256,
        min_healthy_time_ms: Some(0),
        healthy_deadline_ms: Some(120_000),
        requested_by: "test".into(),
        ..Default::default()
    }))
    .unwrap();
    wait_for("the health gate to probe", Duration::from_secs(60), || {
        probes(&count_file) >= 3
    });

    // The coordinator stops (its term ends with it); `serve` returns.
    let _ = stop_coord.send(());
    let r = rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), coordinator).await });
    assert!(
        matches!(r, Ok(Ok(Ok(())))),
        "the coordinator did not stop: {r:?}"
    );
    let after_stop = probes(&count_file);
    // Probes run every 200 ms: a gate task that outlived the driver would add about ten.
    std::thread::sleep(Duration::from_secs(2));
    let later = probes(&count_file);
    let _ = stop_agent.send(());
    let _ = rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), agent).await });
    assert!(
        later <= after_stop + 1,
        "the health gate kept probing after its coordinator stopped: {after_stop} probes when it stopped, {later} two seconds later"
    );
}
