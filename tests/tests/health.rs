//! The agent's health checks (`--health-cmd`, `--health-url`, the store's view) through
//! `orchestrator node health --agent ADDR --expect V` and the raw API, and reconciliation of a
//! restarted node (the service reports the permanent release while the store says another is
//! current): at agent start, never by a read.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use orch_tests::proto as pb;
use orch_tests::*;

/// A health command that exits 0 iff its argument equals the content of `running` beside it.
fn health_script(dir: &Path) -> std::path::PathBuf {
    let script = dir.join("check-health.sh");
    write_script(
        &script,
        "#!/bin/sh\n\
         want=$(cat \"$(dirname \"$0\")/running\")\n\
         if [ \"$1\" = \"$want\" ]; then exit 0; fi\n\
         echo \"service runs $want, not $1\" >&2\n\
         exit 1\n",
    );
    script
}

/// `health --expect V` through the agent: (exit code, the one line it printed).
fn health(agent: &AgentProc, expect: Option<&str>) -> (Option<i32>, String) {
    let mut args = vec!["health"];
    if let Some(v) = expect {
        args.extend(["--expect", v]);
    }
    let o = agent.node(&args);
    let text = if o.status.success() {
        assert!(o.stderr.is_empty(), "{}", stderr(&o));
        stdout(&o)
    } else {
        assert!(o.stdout.is_empty(), "{}", stdout(&o));
        stderr(&o)
    };
    assert_eq!(text.lines().count(), 1, "one line: {text:?}");
    (o.status.code(), text.trim_end().to_string())
}

#[test]
fn health_cmd_is_run_with_the_expected_version() {
    let tmp = tempfile::tempdir().unwrap();
    let script = health_script(tmp.path());
    fs::write(tmp.path().join("running"), "4.2.0").unwrap();
    let agent = AgentProc::start(
        "n1",
        &tmp.path().join("root"),
        &["--health-cmd", script.to_str().unwrap()],
    );
    let s = script.display().to_string();
    assert_eq!(
        health(&agent, Some("4.2.0")),
        (Some(0), format!("healthy (command check): {s} exited 0"))
    );
    let (code, line) = health(&agent, Some("4.2.1"));
    assert_eq!(code, Some(1));
    assert!(
        line.starts_with(&format!(
            "error: unhealthy (command check): {s} exited with"
        )),
        "{line}"
    );
    assert!(
        line.contains("service runs 4.2.0, not 4.2.1"),
        "the reason: {line}"
    );
    // The check follows what the service does, not the store (which is empty here).
    fs::write(tmp.path().join("running"), "4.2.1").unwrap();
    assert_eq!(health(&agent, Some("4.2.1")).0, Some(0));

    rt().block_on(async {
        let mut c = agent.client().await;
        let h = c
            .health(pb::HealthRequest {
                expect_version: "4.2.0".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!h.healthy);
        assert_eq!(h.check, "command");
        assert_eq!(h.reported_version, "");
        assert!(h.detail.contains("service runs 4.2.1, not 4.2.0"), "{h:?}");
        // A malformed expected version is a bad request, not "unhealthy".
        let e = c
            .health(pb::HealthRequest {
                expect_version: "4.2".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    });
}

#[test]
fn health_cmd_that_hangs_times_out() {
    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("hang.sh");
    write_script(&script, "#!/bin/sh\nexec sleep 30\n");
    let agent = AgentProc::start(
        "n1",
        &tmp.path().join("root"),
        &[
            "--health-cmd",
            script.to_str().unwrap(),
            "--health-timeout",
            "500ms",
        ],
    );
    let t = Instant::now();
    let (code, line) = health(&agent, Some("4.2.0"));
    let took = t.elapsed();
    assert_eq!(code, Some(1));
    assert!(line.contains("unhealthy (command check)"), "{line}");
    assert!(line.contains("did not finish within 500ms"), "{line}");
    assert!(took >= Duration::from_millis(500), "{took:?}");
    assert!(
        took < Duration::from_secs(5),
        "bounded by --health-timeout: {took:?}"
    );
}

#[test]
fn health_url_checks_status_version_and_time() {
    let tmp = tempfile::tempdir().unwrap();
    let server = HttpServer::start(HttpReply::version("4.2.1"));
    let url = server.url();
    let agent = AgentProc::start(
        "n1",
        &tmp.path().join("root"),
        &["--health-url", &url, "--health-timeout", "500ms"],
    );

    assert_eq!(
        health(&agent, Some("4.2.1")),
        (
            Some(0),
            format!("healthy (http check, reports 4.2.1): GET {url} answered HTTP 200")
        )
    );
    // Wrong version: unhealthy, naming both.
    assert_eq!(
        health(&agent, Some("4.2.0")),
        (
            Some(1),
            "error: unhealthy (http check, reports 4.2.1): service reports version 4.2.1, expected 4.2.0"
                .to_string()
        )
    );
    // Not 2xx.
    server.set(HttpReply::Status(503, "{\"version\":\"4.2.1\"}".into()));
    let (code, line) = health(&agent, Some("4.2.1"));
    assert_eq!(code, Some(1));
    assert!(line.contains("unhealthy (http check"), "{line}");
    assert!(line.contains("answered HTTP 503"), "{line}");
    // 2xx without a JSON version: healthy, nothing reported.
    server.set(HttpReply::Status(200, "ok".into()));
    assert_eq!(
        health(&agent, Some("4.2.1")),
        (
            Some(0),
            format!("healthy (http check): GET {url} answered HTTP 200")
        )
    );
    // No answer within --health-timeout.
    server.set(HttpReply::Hang);
    let t = Instant::now();
    let (code, line) = health(&agent, Some("4.2.1"));
    let took = t.elapsed();
    assert_eq!(code, Some(1));
    assert!(line.contains("unhealthy (http check)"), "{line}");
    assert!(line.contains("no answer within 500ms"), "{line}");
    assert!(took >= Duration::from_millis(500), "{took:?}");
    assert!(
        took < Duration::from_secs(5),
        "bounded by --health-timeout: {took:?}"
    );

    // The raw reply says the same, and Versions carries what the service reports.
    server.set(HttpReply::version("4.2.1"));
    rt().block_on(async {
        let mut c = agent.client().await;
        let h = c
            .health(pb::HealthRequest {
                expect_version: "4.2.0".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!h.healthy);
        assert_eq!(
            (h.check.as_str(), h.reported_version.as_str()),
            ("http", "4.2.1")
        );
        let v = c
            .versions(pb::VersionsRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(v.reported_version, "4.2.1");
        assert_eq!(v.running_version, "");
    });
    assert!(server.hits() >= 6, "the agent asked the server each time");
}

#[test]
fn health_url_connection_refused_is_unhealthy() {
    let tmp = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{}/health", free_port());
    let agent = AgentProc::start("n1", &tmp.path().join("root"), &["--health-url", &url]);
    let t = Instant::now();
    let (code, line) = health(&agent, Some("4.2.0"));
    assert_eq!(code, Some(1));
    assert!(
        line.starts_with(&format!("error: unhealthy (http check): GET {url}")),
        "{line}"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    // Versions still answers; the service simply reports nothing.
    assert_eq!(agent.node_ok(&["versions"]), "Installed versions:\n");
}

#[test]
fn health_url_and_cmd_both_must_pass() {
    let tmp = tempfile::tempdir().unwrap();
    let script = health_script(tmp.path());
    fs::write(tmp.path().join("running"), "4.2.0").unwrap();
    let server = HttpServer::start(HttpReply::version("4.2.1"));
    let agent = AgentProc::start(
        "n1",
        &tmp.path().join("root"),
        &[
            "--health-url",
            &server.url(),
            "--health-cmd",
            script.to_str().unwrap(),
        ],
    );
    // The URL passes, the command fails: the command decides, the reported version is kept.
    let (code, line) = health(&agent, Some("4.2.1"));
    assert_eq!(code, Some(1));
    assert!(
        line.starts_with("error: unhealthy (command check, reports 4.2.1): "),
        "{line}"
    );
    // The URL fails first: the command is not what decides.
    let (code, line) = health(&agent, Some("4.2.0"));
    assert_eq!(code, Some(1));
    assert!(line.contains("(http check, reports 4.2.1)"), "{line}");
    fs::write(tmp.path().join("running"), "4.2.1").unwrap();
    let (code, line) = health(&agent, Some("4.2.1"));
    assert_eq!(code, Some(0), "{line}");
    assert!(
        line.starts_with("healthy (command check, reports 4.2.1)"),
        "{line}"
    );
}

#[test]
fn without_checks_health_is_the_store_view() {
    let tmp = tempfile::tempdir().unwrap();
    let pkgs = tmp.path().join("pkgs");
    build_emqx(tmp.path(), &pkgs, &["4.2.0"]);
    let agent = AgentProc::start("n1", &tmp.path().join("root"), &[]);
    assert_eq!(
        health(&agent, None),
        (
            Some(1),
            "error: unhealthy (store check): nothing installed".into()
        )
    );
    assert_eq!(
        health(&agent, Some("4.2.0")),
        (
            Some(1),
            "error: unhealthy (store check): nothing installed, expected 4.2.0".into()
        )
    );
    agent.node_ok(&[
        "install",
        "--package",
        pkgs.join("emqx-4.2.0.zip").to_str().unwrap(),
    ]);
    assert_eq!(
        health(&agent, Some("4.2.0")),
        (
            Some(0),
            "healthy (store check, reports 4.2.0): store runs 4.2.0".into()
        )
    );
    assert_eq!(
        health(&agent, None),
        (
            Some(0),
            "healthy (store check, reports 4.2.0): store runs 4.2.0".into()
        )
    );
}

/// A root whose store says 4.2.0 permanent and 4.2.1 current (made with the local CLI).
fn store_with_current(tmp: &Path, name: &str) -> std::path::PathBuf {
    let pkgs = tmp.join("pkgs");
    if !pkgs.join("emqx-4.2.1.zip").exists() {
        build_emqx(tmp, &pkgs, &["4.2.0", "4.2.1"]);
    }
    let root = tmp.join(name);
    let p = |v: &str| pkgs.join(format!("emqx-{v}.zip")).display().to_string();
    local_ok(&root, &["install", "--package", &p("4.2.0")]);
    local_ok(
        &root,
        &["install", "--no-permanent", "--package", &p("4.2.1")],
    );
    assert_eq!(
        local_ok(&root, &["versions"]),
        "Installed versions:\n* 4.2.1\tcurrent\n* 4.2.0\tpermanent\n"
    );
    root
}

/// Reads never change the node (issue #10): a probe that sees the permanent release does not
/// demote the current one; the agent reconciles when it starts (and when the service's pid
/// changes, see agent_fencing.rs).
#[test]
fn a_restarted_service_is_reconciled_at_agent_start_not_by_versions() {
    let tmp = tempfile::tempdir().unwrap();
    let root = store_with_current(tmp.path(), "root");
    // The service runs the current release: nothing to repair.
    let server = HttpServer::start(HttpReply::version("4.2.1"));
    let mut agent = AgentProc::start("n1", &root, &["--health-url", &server.url()]);
    assert_eq!(
        agent.node_ok(&["versions"]),
        "Installed versions:\n* 4.2.1\tcurrent\n* 4.2.0\tpermanent\n"
    );
    // The node was restarted: the service booted the permanent release. Versions reports
    // what the service says, and changes nothing.
    server.set(HttpReply::version("4.2.0"));
    assert_eq!(
        agent.node_ok(&["versions"]),
        "Installed versions:\n* 4.2.1\tcurrent\n* 4.2.0\tpermanent\n"
    );
    rt().block_on(async {
        let mut c = agent.client().await;
        let v = c
            .versions(pb::VersionsRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(v.reported_version, "4.2.0");
        assert_eq!(v.running_version, "4.2.1");
    });
    // The agent restarts with the node: it repairs the store before serving.
    assert!(agent.stop_term().success(), "{}", agent.log());
    let agent = AgentProc::start("n1", &root, &["--health-url", &server.url()]);
    assert_eq!(
        agent.node_ok(&["versions"]),
        "Installed versions:\n* 4.2.1\tunpacked\n* 4.2.0\tpermanent\n"
    );
    // Durable: the store itself now says so.
    assert_eq!(
        local_ok(&root, &["versions"]),
        "Installed versions:\n* 4.2.1\tunpacked\n* 4.2.0\tpermanent\n"
    );
    // From there the release can be installed again.
    assert_eq!(
        agent.node_ok(&["install", "--no-permanent", "4.2.1"]),
        "Release 4.2.1 is already unpacked, now installing.\nInstalled Release: 4.2.1\n"
    );
}

#[test]
fn health_checks_never_change_the_store() {
    let tmp = tempfile::tempdir().unwrap();
    let root = store_with_current(tmp.path(), "root");
    let server = HttpServer::start(HttpReply::version("4.2.1"));
    let agent = AgentProc::start("n1", &root, &["--health-url", &server.url()]);
    server.set(HttpReply::version("4.2.0"));
    let (code, line) = health(&agent, Some("4.2.1"));
    assert_eq!(code, Some(1));
    assert!(
        line.contains("service reports version 4.2.0, expected 4.2.1"),
        "{line}"
    );
    assert_eq!(
        local_ok(&root, &["versions"]),
        "Installed versions:\n* 4.2.1\tcurrent\n* 4.2.0\tpermanent\n"
    );
    // A service reporting a version the store does not know changes nothing, at start either.
    let root2 = store_with_current(tmp.path(), "root2");
    server.set(HttpReply::version("4.2.9"));
    let agent2 = AgentProc::start("n2", &root2, &["--health-url", &server.url()]);
    assert_eq!(health(&agent2, Some("4.2.1")).0, Some(1));
    assert_eq!(
        agent2.node_ok(&["versions"]),
        "Installed versions:\n* 4.2.1\tcurrent\n* 4.2.0\tpermanent\n"
    );
}

#[test]
fn health_probes_the_url_once_per_call() {
    let tmp = tempfile::tempdir().unwrap();
    let server = HttpServer::start(HttpReply::version("4.2.1"));
    let agent = AgentProc::start(
        "n1",
        &tmp.path().join("root"),
        &["--health-url", &server.url(), "--health-timeout", "1s"],
    );
    let before = server.hits();
    assert_eq!(health(&agent, Some("4.2.1")).0, Some(0));
    assert_eq!(server.hits() - before, 1, "one GET per health check");
    // With a service that does not answer, a check lasts one --health-timeout, not two.
    server.set(HttpReply::Hang);
    let t = Instant::now();
    assert_eq!(health(&agent, Some("4.2.1")).0, Some(1));
    assert!(
        t.elapsed() < Duration::from_millis(1900),
        "{:?}",
        t.elapsed()
    );
}
