//! The shipped systemd units: `systemd-analyze verify` accepts them (with the real binary at
//! their ExecStart path), `systemd-analyze security` scores each at most 3.0 ("OK"), and the
//! flags they pass exist. Skipped loudly where systemd-analyze is missing.

use std::path::{Path, PathBuf};
use std::process::Command;

fn units() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "service"))
        .collect();
    v.sort();
    assert_eq!(v.len(), 2, "{v:?}");
    v
}

fn analyze_or_skip() -> bool {
    let ok = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!(
            "!!!!!!!! SKIPPED systemd unit checks: systemd-analyze is not installed !!!!!!!!"
        );
    }
    ok
}

/// A copy of `unit` whose ExecStart runs the binary this test suite built.
fn with_built_binary(unit: &Path, dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(unit).unwrap();
    assert!(
        text.contains("ExecStart=/usr/local/bin/orchestrator "),
        "{}",
        unit.display()
    );
    let bin = orch_tests::orchestrator();
    let out = dir.join(unit.file_name().unwrap());
    std::fs::write(
        &out,
        text.replace("/usr/local/bin/orchestrator", bin.to_str().unwrap()),
    )
    .unwrap();
    out
}

#[test]
fn units_verify_and_score_ok() {
    if !analyze_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    for unit in units() {
        let copy = with_built_binary(&unit, tmp.path());
        let o = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&copy)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.success() && err.trim().is_empty(),
            "{}: {err}",
            unit.display()
        );

        let o = Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(&copy)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        let line = out
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_else(|| panic!("{}: no score in {out}", unit.display()));
        let score: f64 = line
            .split(':')
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("unreadable score line {line:?}"));
        println!("{}: {score}", unit.display());
        assert!(
            score <= 3.0,
            "{}: exposure {score} > 3.0\n{out}",
            unit.display()
        );
    }
}

/// The subcommand and flags each unit's ExecStart passes are ones the binary has, and the
/// daemons announce readiness (Type=notify needs sd_notify READY=1).
#[test]
fn exec_start_matches_the_binary() {
    for unit in units() {
        let text = std::fs::read_to_string(&unit).unwrap();
        let exec = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .unwrap();
        let words: Vec<&str> = exec.split_whitespace().collect();
        let sub = words[1];
        let help = orch_tests::orch_ok(&[sub, "--help"]);
        for flag in words.iter().filter(|w| w.starts_with("--")) {
            assert!(
                help.contains(flag),
                "{}: {flag} is not a flag of `orchestrator {sub}`",
                unit.display()
            );
        }
        assert!(text.contains("Type=notify"), "{}", unit.display());
    }
}

/// Type=notify works: under systemd (NOTIFY_SOCKET set) a coordinator says READY=1 once it
/// serves, and STOPPING=1 when asked to stop.
#[test]
fn a_coordinator_notifies_systemd_when_ready_and_when_stopping() {
    use std::os::unix::net::UnixDatagram;
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let port = orch_tests::free_port();
    let mut cmd = orch_tests::orch_cmd(&[
        "coordinator",
        "--id",
        "1",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--data-dir",
        dir.path().join("data").to_str().unwrap(),
        "--bootstrap",
        "--insecure",
    ]);
    cmd.env("NOTIFY_SOCKET", &sock_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let child = KillOnDrop(cmd.spawn().unwrap());
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("a notification within 60 s");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.contains("READY=1"), "{msg:?}");
    // It really serves by then.
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    let pid = child.0.id() as libc::pid_t;
    // SAFETY: signals our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let n = sock.recv(&mut buf).expect("STOPPING=1 on SIGTERM");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.contains("STOPPING=1"), "{msg:?}");
}

/// Kills and reaps the child when the test ends, passing or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
