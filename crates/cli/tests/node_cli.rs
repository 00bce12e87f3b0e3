//! The real `orchestrator` binary through the EMQX hot-upgrade guide, checking `versions`
//! byte for byte at every step, plus the refusal contract (exit code, one stderr line).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn orch(root: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_orchestrator"))
        .args(args)
        .env("ORCH_ROOT_DIR", root)
        .env_remove("ORCH_LOG")
        .output()
        .expect("run orchestrator")
}

fn ok(root: &Path, args: &[&str]) -> String {
    let out = orch(root, args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// Asserts a refusal: exit 1, nothing on stdout, exactly one line on stderr containing `needle`.
fn refused(root: &Path, args: &[&str], needle: &str) {
    let out = orch(root, args);
    assert_eq!(out.status.code(), Some(1), "{args:?} must be refused");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.lines().count(),
        1,
        "one stderr line expected, got {err:?}"
    );
    assert!(err.contains(needle), "{err:?} should mention {needle:?}");
    assert!(out.stdout.is_empty());
}

fn build(dir: &Path, version: &str, out: &Path) {
    let src = dir.join(format!("src-{version}"));
    fs::create_dir_all(src.join("hooks")).unwrap();
    fs::write(src.join("payload.txt"), format!("release {version}\n")).unwrap();
    let hook = src.join("hooks/activate");
    fs::write(
        &hook,
        "#!/bin/sh\necho \"$1 -> $2\" >> \"$ORCH_ROOT_DIR/activations\"\n",
    )
    .unwrap();
    fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();
    let out_s = out.to_str().unwrap();
    let src_s = src.to_str().unwrap();
    let o = ok(
        dir,
        &[
            "package",
            "build",
            src_s,
            "--name",
            "emqx",
            "--version",
            version,
            "--out",
            out_s,
        ],
    );
    assert!(o.contains(&format!("emqx-{version}.zip")));
}

#[test]
fn emqx_guide_walkthrough_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let rel = root.join("releases");
    for v in ["4.2.0", "4.2.1"] {
        build(tmp.path(), v, &rel);
    }
    assert_eq!(ok(&root, &["node", "versions"]), "Installed versions:\n");
    assert_eq!(ok(&root, &["node", "versions", "--json"]), "[]\n");

    let o = ok(&root, &["node", "upgrade", "4.2.0"]);
    assert_eq!(
        o,
        "Release 4.2.0 not found, attempting to unpack releases/emqx-4.2.0.zip\n\
         Unpacked successfully: \"4.2.0\"\n\
         Installed Release: 4.2.0\n\
         Made release permanent: \"4.2.0\"\n"
    );
    assert_eq!(
        ok(&root, &["node", "versions"]),
        "Installed versions:\n* 4.2.0\tpermanent\n"
    );

    let o = ok(&root, &["node", "upgrade", "--no-permanent", "4.2.1"]);
    assert_eq!(
        o,
        "Release 4.2.1 not found, attempting to unpack releases/emqx-4.2.1.zip\n\
         Unpacked successfully: \"4.2.1\"\n\
         Installed Release: 4.2.1\n"
    );
    assert_eq!(
        ok(&root, &["node", "versions"]),
        "Installed versions:\n* 4.2.1\tcurrent\n* 4.2.0\tpermanent\n"
    );

    let o = ok(&root, &["node", "install", "4.2.1"]);
    assert_eq!(
        o,
        "Release 4.2.1 is already installed and current, making permanent.\n\
         Made release permanent: \"4.2.1\"\n"
    );
    assert_eq!(
        ok(&root, &["node", "versions"]),
        "Installed versions:\n* 4.2.1\tpermanent\n* 4.2.0\told\n"
    );
    assert_eq!(
        ok(&root, &["node", "versions", "--json"]),
        "[{\"version\":\"4.2.1\",\"state\":\"permanent\"},{\"version\":\"4.2.0\",\"state\":\"old\"}]\n"
    );

    let o = ok(&root, &["node", "downgrade", "4.2.0"]);
    assert_eq!(
        o,
        "Release 4.2.0 is marked old, switching to it.\n\
         Installed Release: 4.2.0\n\
         Made release permanent: \"4.2.0\"\n"
    );
    assert_eq!(
        ok(&root, &["node", "versions"]),
        "Installed versions:\n* 4.2.1\told\n* 4.2.0\tpermanent\n"
    );

    assert_eq!(
        ok(&root, &["node", "uninstall", "4.2.1"]),
        "Release 4.2.1 is marked old, uninstalling it.\nUninstalled Release: 4.2.1\n"
    );
    assert_eq!(
        ok(&root, &["node", "versions"]),
        "Installed versions:\n* 4.2.0\tpermanent\n"
    );
    assert!(!rel.join("4.2.1").exists());

    // The hook ran for every switch, with FROM and TO.
    let acts = fs::read_to_string(root.join("activations")).unwrap();
    assert_eq!(acts, "none -> 4.2.0\n4.2.0 -> 4.2.1\n4.2.1 -> 4.2.0\n");
    assert_eq!(
        ok(&root, &["node", "root-dir"]).trim_end(),
        root.to_str().unwrap()
    );
    // The guide's spelling, unquoted, usable as `$(orchestrator node root_dir)/releases`.
    let dir = ok(&root, &["node", "root_dir"]);
    assert_eq!(dir, format!("{}\n", root.display()));
    assert!(Path::new(dir.trim_end()).join("releases").is_dir(), "{dir}");
}

/// Without an activation hook the switch only changes the recorded state: saying so is not an
/// EMQX line, so it goes to stderr and stdout stays exactly EMQX's.
#[test]
fn notes_go_to_stderr_and_emqx_lines_to_stdout() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let rel = root.join("releases");
    // A package without an activation hook.
    let src = tmp.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("payload.txt"), "release 4.2.0\n").unwrap();
    let (src_s, rel_s) = (src.to_str().unwrap(), rel.to_str().unwrap());
    ok(
        &root,
        &[
            "package",
            "build",
            src_s,
            "--name",
            "emqx",
            "--version",
            "4.2.0",
            "--out",
            rel_s,
        ],
    );
    let out = orch(&root, &["node", "install", "4.2.0"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "Release 4.2.0 not found, attempting to unpack releases/emqx-4.2.0.zip\n\
         Unpacked successfully: \"4.2.0\"\n\
         Installed Release: 4.2.0\n\
         Made release permanent: \"4.2.0\"\n"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "No activation hook: only the recorded state changed (state-only switch)\n"
    );
}

#[test]
fn refusals_exit_nonzero_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let rel = root.join("releases");
    for v in ["4.2.0", "4.3.0"] {
        build(tmp.path(), v, &rel);
    }
    ok(&root, &["node", "upgrade", "4.2.0"]);
    let before = ok(&root, &["node", "versions"]);
    refused(&root, &["node", "upgrade", "4.3.0"], "4.2.0 -> 4.3.0");
    refused(&root, &["node", "uninstall", "4.2.0"], "permanent");
    refused(&root, &["node", "downgrade", "4.1.9"], "not installed");
    refused(&root, &["node", "permanent", "4.3.0"], "not installed");
    refused(
        &root,
        &["node", "unpack", "4.9.9"],
        "no package for version 4.9.9",
    );
    refused(&root, &["node", "upgrade"], "VERSION or --package");
    fs::write(rel.join("emqx-4.3.0.zip.sha256"), "0".repeat(64)).unwrap();
    refused(&root, &["node", "unpack", "4.3.0"], "SHA-256 mismatch");
    assert_eq!(ok(&root, &["node", "versions"]), before);
    assert!(!rel.join("4.3.0").exists());

    // Bad versions are usage errors (exit 2).
    let out = orch(&root, &["node", "downgrade", "4.2"]);
    assert_eq!(out.status.code(), Some(2));

    // Without a root dir anywhere.
    let out = Command::new(env!("CARGO_BIN_EXE_orchestrator"))
        .args(["node", "versions"])
        .env_remove("ORCH_ROOT_DIR")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--root-dir"));
}

#[test]
fn package_verify_and_idempotent_repeats() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let rel = root.join("releases");
    build(tmp.path(), "4.2.0", &rel);
    let zip = rel.join("emqx-4.2.0.zip");
    let o = ok(&root, &["package", "verify", zip.to_str().unwrap()]);
    assert!(o.starts_with("Package OK: emqx 4.2.0"), "{o}");
    assert!(o.contains("digest verified"));

    ok(&root, &["node", "unpack", "4.2.0"]);
    let o = ok(&root, &["node", "unpack", "4.2.0"]);
    assert_eq!(o, "Release 4.2.0 is already unpacked.\n");
    ok(&root, &["node", "install", "4.2.0"]);
    let o = ok(&root, &["node", "install", "4.2.0"]);
    assert_eq!(
        o,
        "Release 4.2.0 is already installed, running and set permanent.\n"
    );

    // A truncated copy is refused by verify.
    let bytes = fs::read(&zip).unwrap();
    let cut = tmp.path().join("emqx-4.2.0.zip");
    fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    refused(
        &root,
        &["package", "verify", cut.to_str().unwrap()],
        "refused",
    );
}

/// A printing command whose reader is gone (`orchestrator node versions | head -0`) ends
/// quietly with 141, as a filter killed by SIGPIPE would: no panic message. (SIGPIPE itself
/// stays ignored, so a peer closing a network connection cannot kill a command silently.)
#[test]
fn a_closed_stdout_ends_quietly() {
    let tmp = tempfile::tempdir().unwrap();
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_orchestrator"))
        .args(["node", "versions", "--root-dir"])
        .arg(tmp.path())
        .env_remove("ORCH_LOG")
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("run orchestrator");
    assert_eq!(out.status.code(), Some(141), "{:?}", out.status);
    assert_eq!(String::from_utf8_lossy(&out.stderr), "", "no panic message");
}
