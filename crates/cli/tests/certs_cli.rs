//! `orchestrator certs init|issue` through the real binary: the folders and modes it writes,
//! that the results load as the parties they name, and its refusals (exit 1, nothing on
//! stdout, one stderr line).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use orch_tls::{Role, TlsFiles};

fn orch(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_orchestrator"))
        .args(args)
        .env_remove("ORCH_LOG")
        .output()
        .expect("run orchestrator")
}

fn ok(args: &[&str]) -> String {
    let out = orch(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

fn refused(args: &[&str], needle: &str) {
    let out = orch(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert!(out.stdout.is_empty(), "{args:?} printed to stdout");
    assert_eq!(err.lines().count(), 1, "{args:?}: one stderr line: {err}");
    assert!(
        err.contains(needle),
        "{args:?}: expected {needle:?} in {err}"
    );
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn identity(folder: &Path) -> (Role, String) {
    let m = TlsFiles::from_dir(folder).load().expect("the folder loads");
    (m.identity().role, m.identity().name.clone())
}

#[test]
fn init_writes_a_ca_and_one_loadable_folder_per_party() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tls");
    let d = dir.display().to_string();
    let out = ok(&[
        "certs",
        "init",
        &d,
        "--coordinators",
        "2",
        "--agents",
        "n1,n2",
        "--operators",
        "alice",
        "--viewers",
        "grafana",
        "--san",
        "node.example",
    ]);
    assert!(out.contains("6 parties"), "{out}");
    assert_eq!(mode(&dir.join("ca/ca-key.pem")), 0o600);
    for (folder, role, name) in [
        ("coordinator-1", Role::Coordinator, "1"),
        ("coordinator-2", Role::Coordinator, "2"),
        ("agent-n1", Role::Agent, "n1"),
        ("agent-n2", Role::Agent, "n2"),
        ("operator-alice", Role::Operator, "alice"),
        ("viewer-grafana", Role::Viewer, "grafana"),
    ] {
        let f = dir.join(folder);
        assert!(out.contains(folder), "{out}");
        assert_eq!(mode(&f.join("key.pem")), 0o600, "{folder}");
        assert_eq!(identity(&f), (role, name.to_string()));
        assert!(!f.join("ca-key.pem").exists(), "{folder} holds the CA key");
    }

    // Issue one more later, and a rotation folder for an existing party.
    let out = ok(&["certs", "issue", &d, "--role", "agent", "--name", "n3"]);
    assert!(out.contains("agent-n3"), "{out}");
    assert_eq!(identity(&dir.join("agent-n3")), (Role::Agent, "n3".into()));
    let rotated = dir.join("agent-n1.2027").display().to_string();
    ok(&[
        "certs", "issue", &d, "--role", "agent", "--name", "n1", "--out", &rotated, "--days", "30",
    ]);
    assert_eq!(
        identity(&dir.join("agent-n1.2027")),
        (Role::Agent, "n1".into())
    );
}

#[test]
fn refusals_are_one_line_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tls");
    let d = dir.display().to_string();
    refused(&["certs", "init", &d], "nothing to create");
    assert!(!dir.exists());
    refused(&["certs", "init", &d, "--agents", "../etc"], "invalid name");
    assert!(!dir.exists());
    ok(&["certs", "init", &d, "--coordinators", "1"]);
    // Never overwrites.
    refused(
        &["certs", "init", &d, "--coordinators", "1"],
        "already exists",
    );
    refused(
        &["certs", "issue", &d, "--role", "coordinator", "--name", "1"],
        "already exists",
    );
    refused(
        &["certs", "issue", &d, "--role", "admin", "--name", "x"],
        "role",
    );
    refused(
        &[
            "certs",
            "issue",
            &d,
            "--role",
            "operator",
            "--name",
            "bob",
            "--san",
            "h.example",
        ],
        "client-only",
    );
    refused(
        &[
            "certs", "issue", &d, "--role", "agent", "--name", "n1", "--days", "0",
        ],
        "--days",
    );
    // No CA there.
    let empty = tmp.path().join("empty").display().to_string();
    refused(
        &["certs", "issue", &empty, "--role", "agent", "--name", "n1"],
        "ca",
    );
}
