//! The binary's output contract without a cluster: `--json` on the local commands (packages,
//! certificates, one node's store) and JSON errors, shell completions and man pages, the help's
//! examples, EMQX's `root_dir` spelling, and the log options.

use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn orch(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_orchestrator"))
        .args(args)
        .env_remove("ORCH_LOG")
        .env_remove("RUST_LOG")
        .env_remove("ORCH_ROOT_DIR")
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

fn json(args: &[&str]) -> Value {
    let out = ok(args);
    assert_eq!(out.lines().count(), 1, "{args:?}: one JSON document: {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {out}"))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn local_commands_print_json() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();

    let src = dir.join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("payload.txt"), "hello\n").unwrap();
    let dist = dir.join("dist");
    let built = json(&[
        "package",
        "build",
        s(&src),
        "--name",
        "app",
        "--version",
        "1.2.3",
        "--out",
        s(&dist),
        "--json",
    ]);
    let zip = dist.join("app-1.2.3.zip");
    assert_eq!(built["package"], s(&zip), "{built}");
    assert_eq!(built["sha256"].as_str().map(str::len), Some(64), "{built}");

    let keys = dir.join("keys");
    let key = json(&["--json", "package", "keygen", "--out", s(&keys)]);
    assert!(key["key_id"].is_string(), "{key}");
    let signed = json(&[
        "package",
        "sign",
        s(&zip),
        "--key",
        s(&keys.join("signing.key")),
        "--json",
    ]);
    assert_eq!(signed["key_id"], key["key_id"], "{signed}");
    let verified = json(&[
        "package",
        "verify",
        s(&zip),
        "--trusted-key",
        s(&keys.join("signing.pub")),
        "--json",
    ]);
    assert_eq!(verified["name"], "app", "{verified}");
    assert_eq!(verified["version"], "1.2.3", "{verified}");
    assert_eq!(verified["digest_verified"], true, "{verified}");
    assert_eq!(verified["signed_by"], key["key_id"], "{verified}");

    let certs = dir.join("certs");
    let made = json(&[
        "certs",
        "init",
        s(&certs),
        "--coordinators",
        "1",
        "--agents",
        "n1",
        "--json",
    ]);
    assert_eq!(made["ca"], s(&certs.join("ca")), "{made}");
    assert_eq!(made["parties"].as_array().map(Vec::len), Some(2), "{made}");

    let root = dir.join("root");
    fs::create_dir_all(root.join("releases")).unwrap();
    fs::copy(&zip, root.join("releases/app-1.2.3.zip")).unwrap();
    let r = s(&root);
    assert_eq!(
        json(&["node", "--root-dir", r, "versions", "--json"]),
        Value::Array(vec![])
    );
    let steps = json(&["node", "--root-dir", r, "upgrade", "1.2.3", "--json"]);
    let lines = steps["messages"].as_array().expect("messages");
    assert_eq!(
        lines[0], "Release 1.2.3 not found, attempting to unpack releases/app-1.2.3.zip",
        "{steps}"
    );
    assert!(steps["notes"].is_array(), "{steps}");
    let listed = json(&["node", "--root-dir", r, "--json", "versions"]);
    assert_eq!(listed[0]["version"], "1.2.3", "{listed}");
    assert_eq!(
        json(&["node", "--root-dir", r, "root-dir", "--json"])["root_dir"],
        r
    );
}

#[test]
fn errors_with_json_are_one_json_line_on_stderr() {
    let out = orch(&["package", "verify", "/nonexistent/app-1.0.0.zip", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    let v: Value = serde_json::from_str(&err).expect("JSON error");
    assert!(v["error"]["kind"].is_string(), "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("app-1.0.0.zip")),
        "{v}"
    );
    // The daemons print no data: --json is refused, pointing at --log-format.
    let out = orch(&["agent", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--log-format json"));
}

#[test]
fn root_dir_is_also_spelled_as_in_emqx_and_prints_unquoted() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("emqx root");
    let r = s(&root);
    assert_eq!(ok(&["node", "--root-dir", r, "root_dir"]), format!("{r}\n"));
    assert_eq!(ok(&["node", "--root-dir", r, "root-dir"]), format!("{r}\n"));
}

#[test]
fn completions_and_man_pages_are_generated() {
    for (shell, marker) in [
        ("bash", "_orchestrator()"),
        ("zsh", "#compdef orchestrator"),
        ("fish", "complete -c orchestrator"),
    ] {
        let out = ok(&["completions", shell]);
        assert!(
            out.contains(marker),
            "{shell}: {}",
            &out[..out.len().min(200)]
        );
        assert!(
            out.contains("rollout") && out.contains("exit-on-pause"),
            "{shell}"
        );
    }
    let page = ok(&["man"]);
    assert!(page.contains(".TH orchestrator 1"), "{}", &page[..200]);
    assert!(page.contains("rollout"));
    let tmp = tempfile::tempdir().unwrap();
    ok(&["man", "--dir", s(tmp.path())]);
    for name in [
        "orchestrator.1",
        "orchestrator-rollout.1",
        "orchestrator-status.1",
    ] {
        let p = tmp.path().join(name);
        assert!(
            fs::metadata(&p).is_ok_and(|m| m.len() > 100),
            "{name} written"
        );
    }
}

#[test]
fn help_shows_defaults_and_examples() {
    let help = ok(&["rollout", "--help"]);
    assert!(help.contains("Examples:"), "{help}");
    assert!(
        help.contains("[default: 10s]"),
        "--min-healthy-time's default: {help}"
    );
    assert!(help.contains("--exit-on-pause"), "{help}");
    let help = ok(&["status", "--help"]);
    assert!(
        help.contains("--next") && help.contains("--events"),
        "{help}"
    );
    assert!(
        help.contains("--log-level") && help.contains("--log-format"),
        "{help}"
    );
}

/// An agent with no log settings logs at info on stderr; `--log-format json` makes each line a
/// JSON object; `--log-level warn` silences info.
#[test]
fn daemons_log_at_info_by_default_and_take_log_options() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| -> String {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let listen = format!("127.0.0.1:{port}");
        let root = tmp.path().join(format!("root{port}"));
        let child = Command::new(env!("CARGO_BIN_EXE_orchestrator"))
            .args([
                "agent",
                "--node-id",
                "n1",
                "--root-dir",
                s(&root),
                "--listen",
                &listen,
            ])
            .arg("--insecure")
            .args(extra)
            .env_remove("ORCH_LOG")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start an agent");
        // It listens within seconds; then stop it.
        let start = Instant::now();
        while std::net::TcpStream::connect(&listen).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the agent never listened"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(200));
        // SAFETY: kill(2) on our own child, not yet waited for.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let out = child.wait_with_output().expect("agent output");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let text = run(&[]);
    assert!(
        text.contains("INFO") && text.contains("agent listening"),
        "{text}"
    );
    let json = run(&["--log-format", "json"]);
    let line = json
        .lines()
        .find(|l| l.contains("agent listening"))
        .unwrap_or_else(|| panic!("{json}"));
    let v: Value = serde_json::from_str(line).expect("a JSON log line");
    assert_eq!(v["level"], "INFO", "{v}");
    let quiet = run(&["--log-level", "warn"]);
    assert!(!quiet.contains("agent listening"), "{quiet}");
}
