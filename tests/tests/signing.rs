//! Signed packages end to end: `orchestrator package keygen|sign|verify`, an agent with
//! `--trusted-key` refusing unsigned, wrongly signed and signed-then-modified packages (on push
//! and on unpack of a zip already in releases/) with nothing on disk changed, and coordinators
//! with `--trusted-key` refusing an unsigned `rollout --package` before any agent is touched,
//! while a signed one rolls out with its signature carried to every coordinator and agent.
//!
//! Build the binaries first: `cargo build --bins`.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use orch_tests::cluster::*;
use orch_tests::*;
use tonic::Code;

/// Every entry under `root`: relative path -> "dir", "link" or "file <mode> <sha256>".
fn snapshot(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let meta = fs::symlink_metadata(&p).unwrap();
            if meta.is_dir() {
                out.insert(rel, "dir".into());
                walk(root, &p, out);
            } else if meta.file_type().is_symlink() {
                out.insert(rel, "link".into());
            } else {
                let bytes = fs::read(&p).unwrap();
                out.insert(
                    rel,
                    format!(
                        "file {:o} {}",
                        meta.permissions().mode() & 0o7777,
                        sha256_hex(&bytes)
                    ),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn assert_unchanged(before: &BTreeMap<String, String>, root: &Path, ctx: &str) {
    let now = snapshot(root);
    assert_eq!(&now, before, "{ctx}: the agent's root directory changed");
}

/// A refusal by the agent: the root is unchanged but for the audit log, which gained only
/// `refused` lines (every mutating call is audited, admitted or refused).
fn assert_refused_and_audited(
    before: &BTreeMap<String, String>,
    audit_before: &str,
    root: &Path,
    ctx: &str,
) {
    let audit_key = "agent/audit.log".to_string();
    let (mut before, mut now) = (before.clone(), snapshot(root));
    before.remove(&audit_key);
    now.remove(&audit_key);
    assert_eq!(now, before, "{ctx}: the agent's root directory changed");
    let audit = read_or_empty(&root.join(&audit_key));
    let new = audit
        .strip_prefix(audit_before)
        .unwrap_or_else(|| panic!("{ctx}: the audit log was rewritten"));
    assert!(!new.is_empty(), "{ctx}: the refusal is audited");
    for line in new.lines() {
        assert!(line.contains(" | refused "), "{ctx}: {line:?}");
    }
}

/// `package keygen --out DIR`; returns (signing.key, signing.pub).
fn keygen(dir: &Path) -> (PathBuf, PathBuf) {
    let out = orch_ok(&["package", "keygen", "--out", &dir.display().to_string()]);
    assert!(out.contains("Created signing key"), "{out}");
    (dir.join("signing.key"), dir.join("signing.pub"))
}

fn sign(zip: &Path, key: &Path) -> String {
    orch_ok(&[
        "package",
        "sign",
        &zip.display().to_string(),
        "--key",
        &key.display().to_string(),
    ])
}

fn sig_of(zip: &Path) -> PathBuf {
    PathBuf::from(format!("{}.sig", zip.display()))
}

/// Copies `zip` (and its .sha256) into `dir` under the same name.
fn copy_pkg(zip: &Path, dir: &Path) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    let name = zip.file_name().unwrap();
    let to = dir.join(name);
    fs::copy(zip, &to).unwrap();
    let side = PathBuf::from(format!("{}.sha256", zip.display()));
    if side.exists() {
        fs::copy(&side, PathBuf::from(format!("{}.sha256", to.display()))).unwrap();
    }
    to
}

/// Rewrites `zip`'s .sha256 to match its current bytes (a tamperer would).
fn fix_sidecar(zip: &Path) {
    let d = sha256_hex(&fs::read(zip).unwrap());
    let name = zip.file_name().unwrap().to_string_lossy();
    fs::write(
        PathBuf::from(format!("{}.sha256", zip.display())),
        format!("{d}  {name}\n"),
    )
    .unwrap();
}

/// A package with the same name and version as a signed one but other contents, given the
/// genuine package's signature (as an attacker replaying a signature would).
fn modified_copy(tmp: &Path, version: &str, out: &Path, sig_from: &Path) -> PathBuf {
    let zip = PkgSpec::emqx(version)
        .payload("release with a backdoor\n")
        .build(tmp, out);
    fs::copy(sig_from, sig_of(&zip)).unwrap();
    zip
}

#[test]
fn keygen_sign_and_verify_on_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let keys = tmp.path().join("keys");
    let (key, public) = keygen(&keys);
    assert_eq!(
        fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600,
        "the private key must be private"
    );
    let key_text = fs::read_to_string(&key).unwrap();
    let pub_text = fs::read_to_string(&public).unwrap();
    assert!(
        key_text.starts_with("-----BEGIN PRIVATE KEY-----"),
        "{key_text}"
    );
    assert!(
        pub_text.starts_with("-----BEGIN PUBLIC KEY-----"),
        "{pub_text}"
    );

    // A second keygen refuses and changes nothing.
    let o = orch(&["package", "keygen", "--out", &keys.display().to_string()]);
    assert_refused(&o, "already exists");
    assert_eq!(fs::read_to_string(&key).unwrap(), key_text);
    assert_eq!(fs::read_to_string(&public).unwrap(), pub_text);
    assert_eq!(list_dir(&keys), vec!["signing.key", "signing.pub"]);

    let zip = PkgSpec::emqx("4.2.0").build(tmp.path(), &tmp.path().join("pkgs"));
    let said = sign(&zip, &key);
    assert!(said.contains(".zip.sig"), "{said}");
    let sig = fs::read_to_string(sig_of(&zip)).unwrap();
    assert!(
        sig.starts_with("orchestrator-signature v1\nkey-id "),
        "{sig}"
    );

    let z = zip.display().to_string();
    let p = public.display().to_string();
    let ok = orch_ok(&["package", "verify", &z, "--trusted-key", &p]);
    assert!(ok.contains("signed by trusted key"), "{ok}");
    // Without --trusted-key, verify is what it was.
    let ok = orch_ok(&["package", "verify", &z]);
    assert!(!ok.contains("signed"), "{ok}");

    // Another key is not trusted.
    let (_, other_pub) = keygen(&tmp.path().join("other"));
    let o = orch(&[
        "package",
        "verify",
        &z,
        "--trusted-key",
        &other_pub.display().to_string(),
    ]);
    assert_refused(&o, "unknown key");
    // Both trusted (a rotation): fine.
    orch_ok(&[
        "package",
        "verify",
        &z,
        "--trusted-key",
        &other_pub.display().to_string(),
        "--trusted-key",
        &p,
    ]);

    // A public key is not a signing key, and a missing package is not signed.
    let o = orch(&["package", "sign", &z, "--key", &p]);
    assert_refused(&o, "PRIVATE KEY");
    let o = orch(&[
        "package",
        "sign",
        &tmp.path().join("nope-1.0.0.zip").display().to_string(),
        "--key",
        &key.display().to_string(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));

    // Unsigned: missing.
    let bare = PkgSpec::emqx("4.2.1").build(tmp.path(), &tmp.path().join("pkgs"));
    let o = orch(&[
        "package",
        "verify",
        &bare.display().to_string(),
        "--trusted-key",
        &p,
    ]);
    assert_refused(&o, "missing");
}

#[test]
fn agent_with_trusted_keys_refuses_unsigned_wrongly_signed_and_modified_packages() {
    let tmp = tempfile::tempdir().unwrap();
    let (key, public) = keygen(&tmp.path().join("keys"));
    let (other_key, _) = keygen(&tmp.path().join("other"));
    let pkgs = tmp.path().join("pkgs");
    let root = tmp.path().join("root");
    let agent = AgentProc::start(
        "n1",
        &root,
        &["--trusted-key", &public.display().to_string()],
    );

    // A correctly signed package is accepted and installs; its signature is stored beside it.
    let good0 = PkgSpec::emqx("4.2.0").build(tmp.path(), &pkgs);
    sign(&good0, &key);
    let out = agent.node_ok(&["install", "--package", &good0.display().to_string()]);
    assert!(out.contains("Installed Release: 4.2.0"), "{out}");
    assert_eq!(
        fs::read(root.join("releases/emqx-4.2.0.zip.sig")).unwrap(),
        fs::read(sig_of(&good0)).unwrap()
    );
    assert!(read_or_empty(&root.join("activations")).contains("-> 4.2.0"));

    // Three bad 4.2.1 packages, each in its own directory (same file name).
    let genuine = PkgSpec::emqx("4.2.1").build(tmp.path(), &pkgs);
    sign(&genuine, &key);
    let unsigned = copy_pkg(&genuine, &tmp.path().join("unsigned"));
    let wrong = copy_pkg(&genuine, &tmp.path().join("wrong"));
    sign(&wrong, &other_key);
    let modified = modified_copy(
        tmp.path(),
        "4.2.1",
        &tmp.path().join("modified"),
        &sig_of(&genuine),
    );

    let cases: [(&str, &Path, &str); 3] = [
        ("unsigned", &unsigned, "missing"),
        ("signed by another key", &wrong, "unknown key"),
        ("signed, then modified", &modified, "modified after signing"),
    ];
    for (what, zip, check) in cases {
        for cmd in ["unpack", "install"] {
            let before = snapshot(&root);
            let audit_before = read_or_empty(&root.join("agent/audit.log"));
            let o = agent.node(&[cmd, "--package", &zip.display().to_string()]);
            let line = assert_refused(&o, "signature check failed");
            assert!(line.contains(check), "{what}: {line}");
            assert!(
                line.contains("emqx-4.2.1.zip"),
                "{what}: names the package: {line}"
            );
            assert_refused_and_audited(&before, &audit_before, &root, &format!("{what} ({cmd})"));
        }
    }

    // Over the raw API: PERMISSION_DENIED with the `signature` kind, and nothing written.
    rt().block_on(async {
        let mut c = agent.client().await;
        let before = snapshot(&root);
        let audit_before = read_or_empty(&root.join("agent/audit.log"));
        let e = push_file(&mut c, &unsigned, None).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert_eq!(error_kind(&e), "signature", "{e:?}");
        // A huge "signature" is refused as a bad request before anything else.
        let data = fs::read(&genuine).unwrap();
        let mut h = header_for("emqx", "4.2.1", &data, None);
        h.signature = vec![b'x'; 1 << 20];
        let e = push_chunks(&mut c, chunks_of(Some(h), &data, 64 << 10))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert_refused_and_audited(&before, &audit_before, &root, "raw pushes");
    });

    // A zip placed in releases/ by hand (not pushed) is checked on unpack too. The step's
    // audit line is the one expected write: the attempt is recorded, nothing else changes.
    let placed = copy_pkg(&unsigned, &root.join("releases"));
    let audit = root.join("agent/audit.log");
    for (what, setup, check) in [
        ("no stored signature", None, "missing"),
        (
            "another key's signature",
            Some(sig_of(&wrong)),
            "unknown key",
        ),
        (
            "a signature of other bytes",
            Some(sig_of(&good0)),
            "invalid",
        ),
    ] {
        let _ = fs::remove_file(sig_of(&placed));
        if let Some(s) = &setup {
            fs::copy(s, sig_of(&placed)).unwrap();
        }
        for cmd in ["unpack", "install"] {
            let mut before = snapshot(&root);
            let o = agent.node(&[cmd, "4.2.1"]);
            let line = assert_refused(&o, "signature check failed");
            assert!(line.contains(check), "{what}: {line}");
            let mut now = snapshot(&root);
            let audit_key = "agent/audit.log".to_string();
            before.remove(&audit_key);
            now.remove(&audit_key);
            assert_eq!(now, before, "{what} ({cmd}): only the audit log may change");
            assert!(
                read_or_empty(&audit)
                    .lines()
                    .last()
                    .is_some_and(|l| l.contains(&format!("{cmd} 4.2.1"))),
                "the attempt is audited"
            );
        }
    }
    // With its genuine signature stored, the same zip installs.
    fs::copy(sig_of(&genuine), sig_of(&placed)).unwrap();
    let out = agent.node_ok(&["install", "4.2.1"]);
    assert!(out.contains("Installed Release: 4.2.1"), "{out}");
    let versions = agent.node_ok(&["versions"]);
    assert!(
        versions.contains("4.2.1") && versions.contains("permanent"),
        "{versions}"
    );

    // A zip tampered with after a valid push (digest sidecar fixed up too) is refused.
    let good2 = PkgSpec::emqx("4.2.2").build(tmp.path(), &pkgs);
    sign(&good2, &key);
    let out = agent.node_ok(&["unpack", "--package", &good2.display().to_string()]);
    assert!(out.contains("4.2.2"), "{out}");
    agent.node_ok(&["uninstall", "4.2.2"]);
    let stored = root.join("releases/emqx-4.2.2.zip");
    let evil = PkgSpec::emqx("4.2.2")
        .payload("evil\n")
        .build(tmp.path(), &tmp.path().join("evil"));
    fs::copy(&evil, &stored).unwrap();
    fix_sidecar(&stored);
    let before = snapshot(&root);
    let o = agent.node(&["unpack", "4.2.2"]);
    let line = assert_refused(&o, "signature check failed");
    assert!(line.contains("modified after signing"), "{line}");
    let mut now = snapshot(&root);
    let mut before = before;
    before.remove("agent/audit.log");
    now.remove("agent/audit.log");
    assert_eq!(now, before, "tampered zip: only the audit log may change");
}

#[test]
fn agent_without_trusted_keys_accepts_unsigned_and_keeps_pushed_signatures() {
    let tmp = tempfile::tempdir().unwrap();
    let (key, _) = keygen(&tmp.path().join("keys"));
    let pkgs = tmp.path().join("pkgs");
    let root = tmp.path().join("root");
    let agent = AgentProc::start("n1", &root, &[]);
    let unsigned = PkgSpec::emqx("4.2.0").build(tmp.path(), &pkgs);
    agent.node_ok(&["install", "--package", &unsigned.display().to_string()]);
    assert!(!root.join("releases/emqx-4.2.0.zip.sig").exists());
    let signed = PkgSpec::emqx("4.2.1").build(tmp.path(), &pkgs);
    sign(&signed, &key);
    agent.node_ok(&["unpack", "--package", &signed.display().to_string()]);
    assert_eq!(
        fs::read(root.join("releases/emqx-4.2.1.zip.sig")).unwrap(),
        fs::read(sig_of(&signed)).unwrap(),
        "a pushed signature is kept for when keys are configured"
    );
}

#[test]
fn agent_refuses_to_start_with_an_unreadable_trusted_key() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let missing = tmp.path().join("nope.pub");
    let port = free_port();
    let args: Vec<String> = [
        "--node-id",
        "n1",
        "--root-dir",
        &root.display().to_string(),
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--insecure",
        "--trusted-key",
        &missing.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let log = match AgentProc::launch(&args, &[], port, &root, Some("n1")) {
        Ok(_) => panic!("the agent started with an unreadable --trusted-key"),
        Err(log) => log,
    };
    assert!(
        log.contains("trusted-key") && log.contains("nope.pub"),
        "{log}"
    );
}

#[test]
fn coordinators_with_trusted_keys_refuse_unsigned_rollouts_and_carry_signatures() {
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = keygen(keys.path());
    let p = public.display().to_string();
    let trust = ["--trusted-key", p.as_str()];
    let c = Cluster::start(
        ClusterOpts::state_only(3, 2)
            .coordinator_args(&trust)
            .agent_args(1, &trust)
            .agent_args(2, &trust),
    );
    let pkg = c.package(V1, false);
    let pkg_s = pkg.display().to_string();
    let roots: Vec<BTreeMap<String, String>> = c.nodes.iter().map(|n| snapshot(&n.root)).collect();

    // Unsigned: refused at upload, before any byte is stored or any agent is touched.
    let o = c.cli(&["rollout", V1, "--package", &pkg_s]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("signature check failed") && err.contains("missing"),
        "{err}"
    );
    assert!(
        err.contains(&format!("app-{V1}.zip")),
        "names the package: {err}"
    );
    for (n, before) in c.nodes.iter().zip(&roots) {
        assert_unchanged(before, &n.root, &format!("node {}", n.id));
    }
    let rollouts = c.cli_json(&["rollouts", "--json"]);
    assert_eq!(
        rollouts.as_array().map(Vec::len),
        Some(0),
        "no rollout was created: {rollouts}"
    );
    let digest = sha256_hex(&fs::read(&pkg).unwrap());
    for co in &c.coords {
        assert!(
            !co.data_dir.join("blobs").join(&digest).exists(),
            "coordinator {} stored the refused package",
            co.id
        );
    }

    // Signed: rolls out; the signature reached every coordinator and every agent.
    sign(&pkg, &key);
    let out = c.cli_ok(&[
        "rollout",
        V1,
        "--package",
        &pkg_s,
        "--min-healthy-time",
        "0s",
    ]);
    assert!(out.contains("succeeded") || out.contains("done"), "{out}");
    let sig = fs::read(sig_of(&pkg)).unwrap();
    for co in &c.coords {
        assert_eq!(
            fs::read(co.data_dir.join("blobs").join(format!("{digest}.sig"))).ok(),
            Some(sig.clone()),
            "coordinator {} keeps the signature beside the bytes",
            co.id
        );
    }
    for n in &c.nodes {
        assert_eq!(
            fs::read(n.root.join(format!("releases/app-{V1}.zip.sig"))).ok(),
            Some(sig.clone()),
            "node {} got the signature with the package",
            n.id
        );
    }
    c.wait_for(
        Duration::from_secs(20),
        "both nodes on the new version",
        |c| {
            c.ctl_nodes().is_some_and(|nodes| {
                nodes.iter().all(|e| {
                    e.versions
                        .iter()
                        .any(|v| v.version == V1 && v.state == "permanent")
                })
            })
        },
    );
}

#[test]
fn emqx_driver_agent_checks_signatures_before_calling_the_script() {
    let tmp = tempfile::tempdir().unwrap();
    let (key, public) = keygen(&tmp.path().join("keys"));
    let pkgs = tmp.path().join("pkgs");
    let root = tmp.path().join("emqx");
    let bin = root.join("bin/emqx");
    fs::create_dir_all(bin.parent().unwrap()).unwrap();
    write_script(&bin, &fs::read_to_string(fixture("emqx")).unwrap());
    let agent = AgentProc::start(
        "emqx1",
        &root,
        &[
            "--driver",
            "emqx",
            "--emqx-bin",
            bin.to_str().unwrap(),
            "--trusted-key",
            &public.display().to_string(),
        ],
    );
    let mutating = || {
        read_or_empty(&root.join("emqx-calls.log"))
            .lines()
            .filter(|c| *c != "versions")
            .count()
    };

    // Pushed unsigned: refused at the push, the script never runs.
    let unsigned = PkgSpec::emqx("4.2.0").build(tmp.path(), &pkgs);
    let o = agent.node(&["unpack", "--package", &unsigned.display().to_string()]);
    assert_refused(&o, "signature check failed: missing");
    assert_eq!(mutating(), 0);

    // Placed in releases/ by hand, unsigned: refused before the script is called.
    copy_pkg(&unsigned, &root.join("releases"));
    let o = agent.node(&["unpack", "4.2.0"]);
    assert_refused(&o, "signature check failed: missing");
    assert_eq!(mutating(), 0, "the emqx script must not be called");

    // Signed: the script unpacks it.
    sign(&unsigned, &key);
    fs::copy(
        sig_of(&unsigned),
        sig_of(&root.join("releases/emqx-4.2.0.zip")),
    )
    .unwrap();
    agent.node_ok(&["unpack", "4.2.0"]);
    assert_eq!(mutating(), 1);
}

/// The local `node --root-dir` commands take `--trusted-key` too: the same refusals as an
/// agent, nothing on disk changed; a signed package installs. With `--agent` the flag is
/// refused (the agent enforces its own keys).
#[test]
fn local_store_commands_enforce_trusted_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let (key, public) = keygen(&tmp.path().join("keys"));
    let (other_key, _) = keygen(&tmp.path().join("other"));
    let pkgs = tmp.path().join("pkgs");
    let root = tmp.path().join("root");
    let pubs = public.display().to_string();
    let node = |args: &[&str]| {
        let mut a = vec!["node"];
        a.extend_from_slice(args);
        a.extend(["--root-dir", root.to_str().unwrap(), "--trusted-key", &pubs]);
        orch(&a)
    };
    let genuine = PkgSpec::emqx("4.2.0").build(tmp.path(), &pkgs);
    sign(&genuine, &key);
    let unsigned = copy_pkg(&genuine, &tmp.path().join("unsigned"));
    let wrong = copy_pkg(&genuine, &tmp.path().join("wrong"));
    sign(&wrong, &other_key);
    fs::create_dir_all(&root).unwrap();
    // Opening the store creates releases/, a step its (empty) lock file: neither is a change.
    assert!(node(&["versions"]).status.success());
    let without_lock = |mut m: BTreeMap<String, String>| {
        m.remove("releases/.lock");
        m
    };
    let before = without_lock(snapshot(&root));
    for (what, zip, needle) in [
        ("unsigned", &unsigned, "missing"),
        ("signed by another key", &wrong, "unknown key"),
    ] {
        let o = node(&["install", "--package", zip.to_str().unwrap()]);
        let err = assert_refused(&o, "signature");
        assert!(err.contains(needle), "{what}: {err}");
        assert_eq!(
            without_lock(snapshot(&root)),
            before,
            "{what}: the root changed"
        );
    }
    let o = node(&["install", "--package", genuine.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("Installed Release: 4.2.0"),
        "{}",
        stdout(&o)
    );
    // Through an agent the flag does not apply: refused, not dropped.
    let o = orch(&[
        "node",
        "versions",
        "--agent",
        "127.0.0.1:9",
        "--insecure",
        "--trusted-key",
        &pubs,
    ]);
    assert_refused(&o, "--trusted-key");
}
