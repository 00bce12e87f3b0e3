//! The EMQX driver (`orchestrator agent --driver emqx --emqx-bin PATH`) against the stand-in
//! `tests/fixtures/emqx` script: the same step sequence as the native store, with the same
//! `versions` after every step and the same refusals, decided before the script is called.

use std::fs;
use std::path::{Path, PathBuf};

use orch_tests::proto as pb;
use orch_tests::*;

const ZEROS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// An EMQX-like installation: ROOT/bin/emqx (the stand-in); packages go to ROOT/releases/.
fn emqx_install(root: &Path) -> PathBuf {
    let bin = root.join("bin/emqx");
    fs::create_dir_all(bin.parent().unwrap()).unwrap();
    fs::copy(fixture("emqx"), &bin).unwrap();
    write_script(&bin, &fs::read_to_string(fixture("emqx")).unwrap());
    bin
}

fn emqx_agent(root: &Path) -> AgentProc {
    let bin = emqx_install(root);
    AgentProc::start(
        "emqx1",
        root,
        &["--driver", "emqx", "--emqx-bin", bin.to_str().unwrap()],
    )
}

/// The script's invocations so far.
fn calls(root: &Path) -> Vec<String> {
    read_or_empty(&root.join("emqx-calls.log"))
        .lines()
        .map(str::to_string)
        .collect()
}

/// Invocations after the first `from`, other than `versions` (which only reads).
fn mutating_calls_since(root: &Path, from: usize) -> Vec<String> {
    calls(root)
        .into_iter()
        .skip(from)
        .filter(|c| c != "versions")
        .collect()
}

#[test]
fn stand_in_script_behaves_like_emqx() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("emqx");
    let bin = emqx_install(&root);
    build_emqx(
        tmp.path(),
        &root.join("releases"),
        &["4.2.0", "4.2.1", "4.2.10"],
    );
    let run = |args: &[&str]| {
        run_bounded(
            {
                let mut c = std::process::Command::new(&bin);
                c.args(args).env_remove("EMQX_ROOT");
                c
            },
            CLI_TIMEOUT,
        )
    };
    let out = |args: &[&str]| {
        let o = run(args);
        assert!(o.status.success(), "emqx {args:?}: {}", stderr(&o));
        stdout(&o)
    };
    assert_eq!(out(&["versions"]), "Installed versions:\n");
    // EMQX's words, as its hot-upgrade guide shows them.
    assert_eq!(
        out(&["unpack", "4.2.0"]),
        "Release 4.2.0 not found, attempting to unpack releases/emqx-4.2.0.zip\n\
         Unpacked successfully: \"4.2.0\"\n"
    );
    out(&["install", "4.2.0"]);
    assert_eq!(
        out(&["upgrade", "--no-permanent", "4.2.10"]),
        "Release 4.2.10 not found, attempting to unpack releases/emqx-4.2.10.zip\n\
         Unpacked successfully: \"4.2.10\"\n\
         Installed Release: 4.2.10\n"
    );
    out(&["unpack", "4.2.1"]);
    // Newest first, numerically (4.2.10 > 4.2.1).
    assert_eq!(
        out(&["versions"]),
        "Installed versions:\n* 4.2.10\tcurrent\n* 4.2.1\tunpacked\n* 4.2.0\tpermanent\n"
    );
    let o = run(&["uninstall", "4.2.0"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("Uninstall failed"), "{}", stderr(&o));
    let o = run(&["unpack", "4.2.7"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("Unpack failed"), "{}", stderr(&o));
    let o = run(&["bogus"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("Usage"), "{}", stderr(&o));
    // The sequence lands in the same states as release_handler's.
    assert_eq!(
        out(&["install", "4.2.10"]),
        "Release 4.2.10 is already installed and current, making permanent.\n\
         Made release permanent: \"4.2.10\"\n"
    );
    assert_eq!(
        out(&["downgrade", "4.2.0"]),
        "Release 4.2.0 is marked old, switching to it.\n\
         Installed Release: 4.2.0\n\
         Made release permanent: \"4.2.0\"\n"
    );
    assert_eq!(
        out(&["versions"]),
        "Installed versions:\n* 4.2.10\told\n* 4.2.1\tunpacked\n* 4.2.0\tpermanent\n"
    );
    assert_eq!(
        out(&["uninstall", "4.2.10"]),
        "Release 4.2.10 is marked old, uninstalling it.\nUninstalled Release: 4.2.10\n"
    );
}

/// Steps of the sequence (`{P}` = package dir) and the script call each must make, if any.
fn sequence() -> Vec<(&'static str, Option<&'static str>)> {
    vec![
        ("versions", None),
        ("unpack --package {P}/emqx-4.2.0.zip", Some("unpack 4.2.0")),
        ("unpack --package {P}/emqx-4.2.0.zip", None),
        ("install 4.2.0", Some("install 4.2.0")),
        ("unpack 4.2.1 --package {P}/emqx-4.2.0.zip", None),
        ("unpack --package {P}/emqx-4.2.1.zip --sha256 ZEROS", None),
        ("unpack --package {P}/emqx-4.2.1.zip", Some("unpack 4.2.1")),
        (
            "install --no-permanent 4.2.1",
            Some("upgrade --no-permanent 4.2.1"),
        ),
        ("install --no-permanent 4.2.1", None),
        ("health --expect 4.2.1", None),
        ("health --expect 4.2.0", None),
        ("permanent 4.2.0", None),
        ("permanent 4.2.1", Some("install 4.2.1")),
        ("permanent 4.2.1", None),
        ("install --package {P}/emqx-4.3.0.zip", None),
        ("uninstall 4.2.1", None),
        ("downgrade 4.2.1", None),
        ("downgrade 4.2.0", Some("downgrade 4.2.0")),
        ("downgrade 4.2.0", None),
        ("uninstall 4.2.1", Some("uninstall 4.2.1")),
        ("uninstall 4.2.1", None),
        ("install 4.2.0", None),
        ("unpack --package {P}/emqx-4.2.1.zip", Some("unpack 4.2.1")),
        ("install 4.2.1", Some("install 4.2.1")),
        ("downgrade 4.2.0", Some("downgrade 4.2.0")),
    ]
}

#[test]
fn emqx_driver_passes_the_native_step_sequence() {
    let tmp = tempfile::tempdir().unwrap();
    let pkgs = tmp.path().join("pkgs");
    build_emqx(tmp.path(), &pkgs, &["4.2.0", "4.2.1", "4.3.0"]);
    let native_root = tmp.path().join("native");
    let emqx_root = tmp.path().join("emqx");
    let native = AgentProc::start("native1", &native_root, &[]);
    let emqx = emqx_agent(&emqx_root);

    let expected_versions = [
        (3, "Installed versions:\n* 4.2.0\tpermanent\n"),
        (
            7,
            "Installed versions:\n* 4.2.1\tcurrent\n* 4.2.0\tpermanent\n",
        ),
        (
            12,
            "Installed versions:\n* 4.2.1\tpermanent\n* 4.2.0\told\n",
        ),
        (
            17,
            "Installed versions:\n* 4.2.1\told\n* 4.2.0\tpermanent\n",
        ),
        (19, "Installed versions:\n* 4.2.0\tpermanent\n"),
        (
            24,
            "Installed versions:\n* 4.2.1\told\n* 4.2.0\tpermanent\n",
        ),
    ];
    for (i, (step, call)) in sequence().into_iter().enumerate() {
        let args: Vec<String> = step
            .replace("{P}", &pkgs.display().to_string())
            .replace("ZEROS", ZEROS)
            .split(' ')
            .map(str::to_string)
            .collect();
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let ctx = format!("step {i} `{step}`");
        let before = calls(&emqx_root).len();
        let n = native.node(&a);
        let e = emqx.node(&a);
        assert_eq!(
            e.status.code(),
            n.status.code(),
            "{ctx}: exit codes differ; emqx said {:?} {:?}\nagent log:\n{}",
            stdout(&e),
            stderr(&e),
            emqx.log()
        );
        if n.status.success() {
            assert!(!e.stdout.is_empty(), "{ctx}: emqx printed nothing");
            if call.is_none() && !step.starts_with("health") && step != "versions" {
                // "already": decided from the parsed versions.
                assert!(stdout(&e).contains("already"), "{ctx}: {}", stdout(&e));
            }
            if call.is_some_and(|c| c.starts_with("install")) && step.starts_with("permanent") {
                // EMQX has no `permanent`: its `install` of the current release says more.
                assert_eq!(
                    stdout(&e),
                    format!(
                        "Release 4.2.1 is already installed and current, making permanent.\n{}",
                        stdout(&n)
                    ),
                    "{ctx}"
                );
            } else {
                // Every other line, change or not, is EMQX's own, from the script or the rules.
                assert_eq!(stdout(&e), stdout(&n), "{ctx}");
            }
        } else {
            // Refusals come from the same rules: the same single line.
            assert_eq!(stderr(&e), stderr(&n), "{ctx}: refusals differ");
            assert_eq!(stderr(&e).lines().count(), 1, "{ctx}");
        }
        // The script is called exactly for a real change, with EMQX's own command.
        assert_eq!(
            mutating_calls_since(&emqx_root, before),
            call.map(|c| vec![c.to_string()]).unwrap_or_default(),
            "{ctx}: script calls"
        );
        // Both show the same releases after every step, byte for byte.
        let nv = native.node_ok(&["versions"]);
        assert_eq!(emqx.node_ok(&["versions"]), nv, "{ctx}: versions");
        assert_eq!(
            emqx.node_ok(&["versions", "--json"]),
            native.node_ok(&["versions", "--json"]),
            "{ctx}: versions --json"
        );
        if let Some((_, want)) = expected_versions.iter().find(|(at, _)| *at == i) {
            assert_eq!(nv, *want, "{ctx}");
        }
    }
    // Pushed packages sit where the script looks for them, with their digest.
    for v in ["4.2.0", "4.2.1", "4.3.0"] {
        let f = emqx_root.join(format!("releases/emqx-{v}.zip"));
        assert_eq!(
            fs::read(&f).unwrap(),
            fs::read(pkgs.join(format!("emqx-{v}.zip"))).unwrap()
        );
        assert!(
            emqx_root
                .join(format!("releases/emqx-{v}.zip.sha256"))
                .is_file()
        );
    }
    rt().block_on(async {
        let mut c = emqx.client().await;
        let info = c
            .node_info(pb::NodeInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.driver, "emqx");
        assert_eq!(info.root_dir, emqx_root.display().to_string());
        let v = c
            .versions(pb::VersionsRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(v.running_version, "4.2.0");
    });
}

#[test]
fn a_failing_emqx_script_is_reported_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let pkgs = tmp.path().join("pkgs");
    build_emqx(tmp.path(), &pkgs, &["4.2.0", "4.2.1"]);
    let root = tmp.path().join("emqx");
    let agent = emqx_agent(&root);
    let p = |v: &str| pkgs.join(format!("emqx-{v}.zip")).display().to_string();
    agent.node_ok(&["install", "--package", &p("4.2.0")]);
    agent.node_ok(&["unpack", "--package", &p("4.2.1")]);
    fs::write(
        root.join("emqx-fail-upgrade"),
        "ERROR: release_handler:install_release failed: {'EXIT',{noproc}}\n",
    )
    .unwrap();
    let o = agent.node(&["install", "--no-permanent", "4.2.1"]);
    let line = assert_refused(&o, "install_release failed");
    assert!(
        line.contains("upgrade --no-permanent 4.2.1"),
        "names the command: {line}"
    );
    assert_eq!(
        agent.node_ok(&["versions"]),
        "Installed versions:\n* 4.2.1\tunpacked\n* 4.2.0\tpermanent\n"
    );
    rt().block_on(async {
        let mut c = agent.client().await;
        let e = c
            .install(pb::InstallRequest {
                version: "4.2.1".into(),
                permanent: false,
                fence: None,
                expected_sha256: String::new(),
                force: false,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Internal, "{e:?}");
        assert_eq!(error_kind(&e), "activation");
    });
    // `versions` itself failing (the node is down) is an error, not an empty listing.
    fs::write(
        root.join("emqx-fail-versions"),
        "Node 'emqx@127.0.0.1' not responding to pings.\n",
    )
    .unwrap();
    let o = agent.node(&["versions"]);
    assert_refused(&o, "not responding to pings");
    fs::remove_file(root.join("emqx-fail-versions")).unwrap();
    fs::remove_file(root.join("emqx-fail-upgrade")).unwrap();
    assert_eq!(
        agent.node_ok(&["install", "--no-permanent", "4.2.1"]),
        "Release 4.2.1 is already unpacked, now installing.\nInstalled Release: 4.2.1\n"
    );
}

#[test]
fn emqx_driver_missing_package_is_not_found() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("emqx");
    let agent = emqx_agent(&root);
    rt().block_on(async {
        let mut c = agent.client().await;
        let e = c
            .unpack(pb::UnpackRequest {
                version: "4.2.7".into(),
                fence: None,
                expected_sha256: String::new(),
                force: false,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
        assert_eq!(error_kind(&e), "not-found", "{e:?}");
    });
    // Decided before the script is asked to do anything.
    assert_eq!(mutating_calls_since(&root, 0), Vec::<String>::new());
}

/// `--sha256` for a package already in `releases/`: the agent checks it before the script is
/// asked to do anything (the script looks the package up itself), as the native store does.
#[test]
fn emqx_driver_checks_the_operators_digest_before_the_script_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("emqx");
    let agent = emqx_agent(&root);
    build_emqx(tmp.path(), &root.join("releases"), &["4.2.0"]);
    let before = calls(&root).len();
    rt().block_on(async {
        let mut c = agent.client().await;
        for (expected, kind) in [(ZEROS, "bad-package"), ("not-a-digest", "bad-package")] {
            let e = c
                .install(pb::InstallRequest {
                    version: "4.2.0".into(),
                    permanent: true,
                    fence: None,
                    expected_sha256: expected.into(),
                    force: false,
                })
                .await
                .unwrap_err();
            assert_eq!(error_kind(&e), kind, "{expected}: {e:?}");
            assert!(
                e.message().contains("emqx-4.2.0.zip"),
                "the refusal names the package: {e:?}"
            );
        }
    });
    assert_eq!(mutating_calls_since(&root, before), Vec::<String>::new());
    // The right digest goes through to the script.
    let good = fs::read_to_string(root.join("releases/emqx-4.2.0.zip.sha256")).unwrap();
    let good = good.split_whitespace().next().unwrap().to_string();
    rt().block_on(async {
        let mut c = agent.client().await;
        c.install(pb::InstallRequest {
            version: "4.2.0".into(),
            permanent: true,
            fence: None,
            expected_sha256: good,
            force: false,
        })
        .await
        .unwrap();
    });
    assert_eq!(
        mutating_calls_since(&root, before),
        vec!["install 4.2.0".to_string()]
    );
}
