//! The `orchestrator agent` daemon itself: graceful SIGTERM with a step in flight, `--config`
//! files (flags win), and the configurations it must refuse before serving.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use orch_tests::proto as pb;
use orch_tests::*;

const SLOW_HOOK: &str = "#!/bin/sh\n\
    touch \"$ORCH_ROOT_DIR/hook-started\"\n\
    sleep 1.5\n\
    echo \"$1 -> $2\" >> \"$ORCH_ROOT_DIR/activations\"\n";

#[test]
fn sigterm_lets_the_step_in_flight_finish_then_exits_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let pkgs = tmp.path().join("pkgs");
    build_emqx(tmp.path(), &pkgs, &["4.2.0"]);
    PkgSpec::emqx("4.2.1")
        .hook(Some(SLOW_HOOK))
        .build(tmp.path(), &pkgs);
    let root = tmp.path().join("root");
    let mut agent = AgentProc::start("n1", &root, &[]);
    let p = |v: &str| pkgs.join(format!("emqx-{v}.zip")).display().to_string();
    agent.node_ok(&["install", "--package", &p("4.2.0")]);
    agent.node_ok(&["unpack", "--package", &p("4.2.1")]);

    let addr = agent.addr.clone();
    let install = std::thread::spawn(move || {
        orch(&["node", "install", "4.2.1", "--agent", &addr, "--insecure"])
    });
    let started = root.join("hook-started");
    wait_until(
        Duration::from_secs(20),
        "the activation hook to start",
        || started.exists(),
    );
    let t = Instant::now();
    agent.send_term();

    // While draining, the agent takes no new request, and a new one does not hang.
    let o = orch_within(
        &["node", "versions", "--agent", &agent.addr, "--insecure"],
        Duration::from_secs(10),
    );
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(
        stderr(&o).contains("cannot reach the agent"),
        "{}",
        stderr(&o)
    );

    let status = agent
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("agent did not exit after SIGTERM"));
    let took = t.elapsed();
    assert!(
        status.success(),
        "graceful exit is 0: {status}; log:\n{}",
        agent.log()
    );
    assert!(
        took >= Duration::from_millis(1000),
        "the agent waited for the step ({took:?})"
    );
    let o = install.join().unwrap();
    assert!(
        o.status.success(),
        "the in-flight install completed: {}",
        stderr(&o)
    );
    assert_eq!(
        stdout(&o),
        "Release 4.2.1 is already unpacked, now installing.\n\
         Installed Release: 4.2.1\n\
         Made release permanent: \"4.2.1\"\n"
    );
    assert_eq!(
        local_ok(&root, &["versions"]),
        "Installed versions:\n* 4.2.1\tpermanent\n* 4.2.0\told\n"
    );
    assert_eq!(
        read_or_empty(&root.join("activations")),
        "none -> 4.2.0\n4.2.0 -> 4.2.1\n"
    );
    // An idle agent exits promptly on SIGTERM, with 0.
    let mut idle = AgentProc::start("n1", &root, &[]);
    let t = Instant::now();
    assert!(idle.stop_term().success());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

fn write_config(path: &Path, root: &Path, port: u16, extra: &str) {
    fs::write(
        path,
        format!(
            "node-id = \"from-file\"\n\
             root-dir = \"{}\"\n\
             listen = \"127.0.0.1:{port}\"\n\
             insecure = true\n\
             {extra}\n\
             [label]\n\
             zone = \"a\"\n\
             rack = \"r1\"\n",
            root.display()
        ),
    )
    .unwrap();
}

fn info(agent: &AgentProc) -> pb::NodeInfoReply {
    rt().block_on(async {
        agent
            .client()
            .await
            .node_info(pb::NodeInfoRequest {})
            .await
            .unwrap()
            .into_inner()
    })
}

fn labels(i: &pb::NodeInfoReply) -> Vec<(String, String)> {
    let mut l: Vec<(String, String)> = i.labels.clone().into_iter().collect();
    l.sort();
    l
}

#[test]
fn config_file_configures_the_agent_and_flags_override_it() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let cfg = tmp.path().join("agent.toml");
    let port = free_port();
    write_config(&cfg, &root, port, "health-timeout = \"1s\"");
    let args = vec!["--config".to_string(), cfg.display().to_string()];
    let agent = AgentProc::launch(&args, &[], port, &root, Some("from-file"))
        .unwrap_or_else(|log| panic!("agent --config did not start: {log}"));
    let i = info(&agent);
    assert_eq!(i.node_id, "from-file");
    assert_eq!(i.root_dir, root.display().to_string());
    assert_eq!(i.driver, "native");
    assert_eq!(
        labels(&i),
        vec![("rack".into(), "r1".into()), ("zone".into(), "a".into())]
    );
    assert!(root.join("releases").is_dir());
    drop(agent);

    // Flags win over the file; the file still supplies what the flags do not say.
    let port2 = free_port();
    let args = vec![
        "--config".to_string(),
        cfg.display().to_string(),
        "--node-id".into(),
        "from-flag".into(),
        "--label".into(),
        "zone=b".into(),
        "--listen".into(),
        format!("127.0.0.1:{port2}"),
    ];
    let agent = AgentProc::launch(&args, &[], port2, &root, Some("from-flag"))
        .unwrap_or_else(|log| panic!("agent --config + flags did not start: {log}"));
    let i = info(&agent);
    assert_eq!(i.node_id, "from-flag");
    assert_eq!(i.root_dir, root.display().to_string());
    assert_eq!(
        labels(&i),
        vec![("rack".into(), "r1".into()), ("zone".into(), "b".into())]
    );
}

/// Runs `orchestrator agent ARGS`, which must refuse to start: exit 1 quickly, one stderr line.
fn refused_to_start(args: &[String], needle: &str) -> String {
    let o = orch_within(
        &[&["agent".to_string()][..], args].concat(),
        Duration::from_secs(15),
    );
    assert_eq!(
        o.status.code(),
        Some(1),
        "agent {args:?} must refuse to start: {}",
        stderr(&o)
    );
    let err = stderr(&o);
    let last = err.lines().last().unwrap_or("").to_string();
    assert!(last.starts_with("error: "), "{err:?}");
    assert!(last.contains(needle), "{err:?} should contain {needle:?}");
    last
}

#[test]
fn refuses_bad_configurations_before_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let port = free_port();
    let base = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec![
            "--node-id".into(),
            "n1".into(),
            "--root-dir".into(),
            root.display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    // Plain text must be asked for.
    refused_to_start(&base(&[]), "--insecure");
    let cfg = tmp.path().join("plain.toml");
    fs::write(
        &cfg,
        format!(
            "node-id = \"n1\"\nroot-dir = \"{}\"\nlisten = \"127.0.0.1:{port}\"\ninsecure = false\n",
            root.display()
        ),
    )
    .unwrap();
    refused_to_start(
        &["--config".into(), cfg.display().to_string()],
        "--insecure",
    );
    // An unknown key in the file (a typo must not be ignored).
    let cfg = tmp.path().join("typo.toml");
    write_config(&cfg, &root, port, "helth-url = \"http://127.0.0.1:1/\"");
    let line = refused_to_start(&["--config".into(), cfg.display().to_string()], "helth-url");
    assert!(
        line.contains(&cfg.display().to_string()),
        "names the file: {line}"
    );
    // Not TOML at all; a missing file.
    let cfg = tmp.path().join("broken.toml");
    fs::write(&cfg, "node-id = \n").unwrap();
    refused_to_start(
        &["--config".into(), cfg.display().to_string()],
        "broken.toml",
    );
    refused_to_start(
        &[
            "--config".into(),
            tmp.path().join("nope.toml").display().to_string(),
        ],
        "nope.toml",
    );
    // Other refusals.
    refused_to_start(&base(&["--insecure", "--driver", "emqx"]), "--emqx-bin");
    refused_to_start(
        &base(&["--insecure", "--driver", "docker"]),
        "unknown --driver",
    );
    refused_to_start(&base(&["--insecure", "--label", "zone"]), "K=V");
    refused_to_start(
        &[
            "--root-dir".into(),
            root.display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--insecure".into(),
        ],
        "--node-id",
    );
    let mut bad_id = base(&["--insecure"]);
    bad_id[1] = "../n1".into();
    refused_to_start(&bad_id, "invalid node id");
    let mut bad_listen = base(&["--insecure"]);
    bad_listen[5] = "localhost".into();
    refused_to_start(&bad_listen, "--listen");
    // Nothing was served.
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
fn a_port_in_use_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let line = refused_to_start(
        &[
            "--node-id".into(),
            "n1".into(),
            "--root-dir".into(),
            tmp.path().join("root").display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--insecure".into(),
        ],
        &format!("127.0.0.1:{port}"),
    );
    assert!(line.contains("cannot listen"), "{line}");
}

#[test]
fn remote_commands_give_up_on_a_wedged_agent() {
    let tmp = tempfile::tempdir().unwrap();
    let agent = AgentProc::start("n1", &tmp.path().join("root"), &[]);
    // Frozen (as under a debugger, or swapped out): the kernel still accepts connections.
    // SAFETY: kill(2) on our own child; the guard SIGKILLs it (which works on stopped ones).
    assert_eq!(
        unsafe { libc::kill(agent.pid() as libc::pid_t, libc::SIGSTOP) },
        0
    );
    let t = Instant::now();
    let o = run_bounded(
        orch_cmd(&["node", "versions", "--agent", &agent.addr, "--insecure"]),
        Duration::from_secs(30),
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "gave up only after {:?}",
        t.elapsed()
    );
    assert!(stderr(&o).contains(&agent.addr), "{}", stderr(&o));
}

#[test]
fn a_crash_mid_activation_keeps_the_old_state_and_the_step_can_be_retried() {
    let tmp = tempfile::tempdir().unwrap();
    let pkgs = tmp.path().join("pkgs");
    build_emqx(tmp.path(), &pkgs, &["4.2.0"]);
    PkgSpec::emqx("4.2.1")
        .hook(Some(SLOW_HOOK))
        .build(tmp.path(), &pkgs);
    let root = tmp.path().join("root");
    let mut agent = AgentProc::start("n1", &root, &[]);
    let p = |v: &str| pkgs.join(format!("emqx-{v}.zip")).display().to_string();
    agent.node_ok(&["install", "--package", &p("4.2.0")]);
    agent.node_ok(&["unpack", "--package", &p("4.2.1")]);
    let addr = agent.addr.clone();
    let install = std::thread::spawn(move || {
        orch(&[
            "node",
            "install",
            "--no-permanent",
            "4.2.1",
            "--agent",
            &addr,
            "--insecure",
        ])
    });
    let started = root.join("hook-started");
    wait_until(
        Duration::from_secs(20),
        "the activation hook to start",
        || started.exists(),
    );
    agent.kill9();
    let o = install.join().unwrap();
    assert_eq!(
        o.status.code(),
        Some(1),
        "the caller learns the step was cut"
    );
    // The hook (its own process group) finishes on its own; wait for it before going on.
    let acts = root.join("activations");
    wait_until(
        Duration::from_secs(20),
        "the orphaned hook to finish",
        || read_or_empty(&acts).contains("4.2.0 -> 4.2.1"),
    );
    // The switch was never recorded: the store still shows the state before the step.
    let agent = AgentProc::start("n1", &root, &[]);
    assert_eq!(
        agent.node_ok(&["versions"]),
        "Installed versions:\n* 4.2.1\tunpacked\n* 4.2.0\tpermanent\n"
    );
    // Retrying the same step completes it (the hook runs again: hooks must be idempotent).
    fs::remove_file(&started).unwrap();
    assert_eq!(
        agent.node_ok(&["install", "--no-permanent", "4.2.1"]),
        "Release 4.2.1 is already unpacked, now installing.\nInstalled Release: 4.2.1\n"
    );
    assert_eq!(
        read_or_empty(&acts),
        "none -> 4.2.0\n4.2.0 -> 4.2.1\n4.2.0 -> 4.2.1\n"
    );
    assert!(
        !list_dir(&root.join("releases"))
            .iter()
            .any(|n| n.starts_with(".activate-") || n.starts_with(".unpack-")),
        "{:?}",
        list_dir(&root.join("releases"))
    );
}

#[test]
fn a_corrupt_fence_file_stops_the_agent_from_starting() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    fs::create_dir_all(root.join("agent")).unwrap();
    fs::write(root.join("agent/fence.json"), "{\"term\": 3, \"rollout").unwrap();
    let line = refused_to_start(
        &[
            "--node-id".into(),
            "n1".into(),
            "--root-dir".into(),
            root.display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{}", free_port()),
            "--insecure".into(),
        ],
        "fence.json",
    );
    assert!(line.contains("unreadable"), "{line}");
}

#[test]
fn a_corrupt_cluster_file_stops_the_agent_from_starting() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    fs::create_dir_all(root.join("agent")).unwrap();
    fs::write(root.join("agent/cluster.json"), "{\"cluster_id\": \"3f").unwrap();
    let line = refused_to_start(
        &[
            "--node-id".into(),
            "n1".into(),
            "--root-dir".into(),
            root.display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{}", free_port()),
            "--insecure".into(),
        ],
        "cluster.json",
    );
    assert!(line.contains("unreadable"), "{line}");
}

#[test]
fn serves_with_unreachable_coordinators_and_describes_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let agent = AgentProc::start(
        "n1",
        &tmp.path().join("root"),
        &[
            // Nobody listens there: registration keeps failing, serving must not.
            "--coordinator",
            "127.0.0.1:1",
            "--coordinator",
            "127.0.0.1:2",
            "--advertise",
            "node1.example:7400",
            "--label",
            "zone=a",
        ],
    );
    let i = info(&agent);
    assert_eq!(labels(&i), vec![("zone".into(), "a".into())]);
    assert!(!i.agent_version.is_empty());
    assert!(i.free_disk_bytes > 0);
    assert_eq!(i.last_fence, None);
    assert_eq!((i.cluster_id.as_str(), i.held_by.as_str()), ("", ""));
    assert_eq!(
        i.activate_timeout_ms, 60_000,
        "the default --activate-timeout"
    );
    let log = agent.log();
    assert!(log.contains("--insecure"), "says it is plain text: {log}");
}

#[test]
fn a_second_agent_on_the_same_root_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let a = AgentProc::start("n1", &root, &[]);
    let port = free_port();
    let args: Vec<String> = [
        "--node-id",
        "n1",
        "--root-dir",
        root.to_str().unwrap(),
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--insecure",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    match AgentProc::launch(&args, &[], port, &root, Some("n1")) {
        Err(log) => assert!(log.contains("another agent"), "{log}"),
        Ok(b) => {
            // What goes wrong when it is not refused: B accepts what A already fenced off.
            rt().block_on(async {
                let u = |f| pb::UnpackRequest {
                    version: "4.2.0".into(),
                    fence: f,
                    expected_sha256: String::new(),
                    force: false,
                };
                let _ = a.client().await.unpack(u(fence(3, "r2", 1))).await;
                let r = b.client().await.unpack(u(fence(2, "r1", 9))).await;
                panic!(
                    "a second agent started on {}; a stale fence (term 2 after term 3) got: {:?}",
                    root.display(),
                    r.map_err(|e| error_kind(&e))
                );
            });
        }
    }
}

#[test]
fn the_agent_survives_clients_that_hang_up() {
    let tmp = tempfile::tempdir().unwrap();
    let agent = AgentProc::start("n1", &tmp.path().join("root"), &[]);
    let r = rt();
    for i in 0..300u64 {
        r.block_on(async {
            let Ok(ch) = tonic::transport::Channel::from_shared(format!("http://{}", agent.addr))
                .unwrap()
                .connect()
                .await
            else {
                return;
            };
            let mut c = orch_tests::proto::agent_client::AgentClient::new(ch);
            let call = tokio::spawn(async move {
                let _ = c.versions(pb::VersionsRequest {}).await;
            });
            // Hang up at varying points: before, during and after the reply.
            tokio::time::sleep(Duration::from_micros(i % 7 * 300)).await;
            call.abort();
        });
        if i % 50 == 49 {
            assert_eq!(
                agent.liveness(),
                "running",
                "after {i} clients; log:\n{}",
                agent.log()
            );
        }
    }
    assert_eq!(agent.liveness(), "running", "log:\n{}", agent.log());
    assert_eq!(agent.node_ok(&["versions"]), "Installed versions:\n");
}
