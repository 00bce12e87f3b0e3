//! A real `orchestrator agent` process driven over gRPC: the node-layer step sequence through
//! `orchestrator node ... --agent` (with output identical to `--root-dir`), idempotency, push
//! integrity, error kinds, and fencing across restarts.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

use orch_tests::proto as pb;
use orch_tests::*;
use tonic::Code;

const ZEROS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What a step of the sequence must do on the local store (the agent must then do the same).
enum Expect {
    /// Exit 0 with exactly this stdout (`<ROOT>` stands for the root directory).
    Out(&'static str),
    /// Exit 1, nothing on stdout, one stderr line containing this.
    Refused(&'static str),
}

/// Replaces the root directory's path by `<ROOT>` so two stores' outputs compare.
fn normalize(text: &str, root: &Path) -> String {
    text.replace(&root.display().to_string(), "<ROOT>")
}

struct Seen {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn seen(o: &Output, root: &Path) -> Seen {
    Seen {
        code: o.status.code(),
        stdout: normalize(&stdout(o), root),
        stderr: normalize(&stderr(o), root),
    }
}

/// The node-layer sequence of DESIGN.md section 3 with its refusals. `{P}` is the package dir.
fn sequence() -> Vec<(&'static str, Expect)> {
    use Expect::*;
    vec![
        ("versions", Out("Installed versions:\n")),
        (
            "unpack --package {P}/emqx-4.2.0.zip",
            Out(
                "Release 4.2.0 not found, attempting to unpack releases/emqx-4.2.0.zip\n\
                 Unpacked successfully: \"4.2.0\"\n",
            ),
        ),
        (
            "unpack --package {P}/emqx-4.2.0.zip",
            Out("Release 4.2.0 is already unpacked.\n"),
        ),
        (
            "install 4.2.0",
            Out("Release 4.2.0 is already unpacked, now installing.\n\
                 Installed Release: 4.2.0\n\
                 Made release permanent: \"4.2.0\"\n"),
        ),
        (
            "unpack 4.2.1 --package {P}/emqx-4.2.0.zip",
            Refused("version 4.2.1 was given but the package emqx-4.2.0.zip holds 4.2.0"),
        ),
        (
            "unpack --package {P}/emqx-4.2.1.zip --sha256 0000000000000000000000000000000000000000000000000000000000000000",
            Refused("package emqx-4.2.1.zip refused: SHA-256 mismatch: expected 0000"),
        ),
        (
            "unpack --package {P}/emqx-4.2.9.zip",
            Refused("package emqx-4.2.9.zip refused: "),
        ),
        (
            "unpack --package {P}/emqx-4.2.1.zip",
            Out(
                "Release 4.2.1 not found, attempting to unpack releases/emqx-4.2.1.zip\n\
                 Unpacked successfully: \"4.2.1\"\n",
            ),
        ),
        (
            "install --no-permanent 4.2.1",
            Out("Release 4.2.1 is already unpacked, now installing.\nInstalled Release: 4.2.1\n"),
        ),
        (
            "install --no-permanent 4.2.1",
            Out("Release 4.2.1 is already installed and current.\n"),
        ),
        (
            "versions",
            Out("Installed versions:\n* 4.2.1\tcurrent\n* 4.2.0\tpermanent\n"),
        ),
        (
            "versions --json",
            Out(
                "[{\"version\":\"4.2.1\",\"state\":\"current\"},{\"version\":\"4.2.0\",\"state\":\"permanent\"}]\n",
            ),
        ),
        (
            "permanent 4.2.0",
            Refused("refused to make 4.2.0 permanent"),
        ),
        (
            "permanent 4.2.1",
            Out("Made release permanent: \"4.2.1\"\n"),
        ),
        (
            "install --package {P}/emqx-4.3.0.zip",
            Refused("refused to upgrade 4.2.1 -> 4.3.0: only patch-level hot upgrades"),
        ),
        (
            "uninstall 4.2.1",
            Refused("refused to uninstall 4.2.1: it is the permanent release"),
        ),
        (
            "versions",
            Out("Installed versions:\n* 4.2.1\tpermanent\n* 4.2.0\told\n"),
        ),
        (
            "install 4.2.7",
            Refused("no package for version 4.2.7 in <ROOT>/releases"),
        ),
        (
            "downgrade 4.2.0",
            Out("Release 4.2.0 is marked old, switching to it.\n\
                 Installed Release: 4.2.0\n\
                 Made release permanent: \"4.2.0\"\n"),
        ),
        (
            "uninstall 4.2.1",
            Out("Release 4.2.1 is marked old, uninstalling it.\nUninstalled Release: 4.2.1\n"),
        ),
        (
            "uninstall 4.2.1",
            Refused("refused to uninstall 4.2.1: it is not installed"),
        ),
        (
            "install 4.2.0",
            Out("Release 4.2.0 is already installed, running and set permanent.\n"),
        ),
        ("versions", Out("Installed versions:\n* 4.2.0\tpermanent\n")),
        (
            "versions --json",
            Out("[{\"version\":\"4.2.0\",\"state\":\"permanent\"}]\n"),
        ),
        ("root-dir", Out("<ROOT>\n")),
    ]
}

fn args_of(step: &str, pkgs: &Path) -> Vec<String> {
    step.replace("{P}", &pkgs.display().to_string())
        .split(' ')
        .map(str::to_string)
        .collect()
}

/// Packages 4.2.0, 4.2.1, 4.3.0 (recording hook) and a digest-correct non-zip 4.2.9.
fn packages(tmp: &Path) -> PathBuf {
    let pkgs = tmp.join("pkgs");
    build_emqx(tmp, &pkgs, &["4.2.0", "4.2.1", "4.3.0"]);
    let junk = pkgs.join("emqx-4.2.9.zip");
    fs::write(&junk, b"this is not a zip file at all").unwrap();
    let digest = orch_release::package::sha256_file(&junk).unwrap().0;
    fs::write(
        pkgs.join("emqx-4.2.9.zip.sha256"),
        format!("{digest}  emqx-4.2.9.zip\n"),
    )
    .unwrap();
    pkgs
}

#[test]
fn step_sequence_over_agent_matches_local_root_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let pkgs = packages(tmp.path());
    let local_root = tmp.path().join("local-root");
    let agent_root = tmp.path().join("agent-root");
    let agent = AgentProc::start("n1", &agent_root, &[]);

    for (i, (step, expect)) in sequence().into_iter().enumerate() {
        let args = args_of(step, &pkgs);
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut l = seen(&local(&local_root, &a), &local_root);
        // The local store unpacks `--package FILE` where it is, and names it so; the agent
        // first receives it into its releases/ and names that.
        let real = format!("attempting to unpack {}/", pkgs.display());
        if step.starts_with("unpack --package")
            && l.code == Some(0)
            && l.stdout.contains("not found")
        {
            assert!(l.stdout.contains(&real), "{step}: {}", l.stdout);
        }
        l.stdout = l.stdout.replace(&real, "attempting to unpack releases/");
        let r = seen(&agent.node(&a), &agent_root);
        let ctx = format!("step {i} `{step}`");
        match expect {
            Expect::Out(want) => {
                assert_eq!(l.code, Some(0), "{ctx} (local): {}", l.stderr);
                assert_eq!(l.stdout, want, "{ctx} (local)");
                assert_eq!(l.stderr, "", "{ctx} (local)");
            }
            Expect::Refused(needle) => {
                assert_eq!(l.code, Some(1), "{ctx} (local) must be refused");
                assert_eq!(l.stdout, "", "{ctx} (local)");
                assert_eq!(l.stderr.lines().count(), 1, "{ctx} (local): {:?}", l.stderr);
                assert!(l.stderr.starts_with("error: "), "{ctx}: {:?}", l.stderr);
                assert!(
                    l.stderr.contains(needle),
                    "{ctx} (local): {:?} lacks {needle:?}",
                    l.stderr
                );
            }
        }
        assert_eq!(
            r.code, l.code,
            "{ctx}: exit codes differ; agent said {:?}",
            r.stderr
        );
        assert_eq!(r.stdout, l.stdout, "{ctx}: stdout differs");
        assert_eq!(r.stderr, l.stderr, "{ctx}: stderr differs");

        // Health is the agent's own (a local store has no probe): checked once 4.2.1 is
        // current but not yet permanent.
        if step == "install --no-permanent 4.2.1" && l.stdout.contains("Installed Release") {
            assert_eq!(
                agent.node_ok(&["health", "--expect", "4.2.1"]),
                "healthy (store check, reports 4.2.1): store runs 4.2.1\n"
            );
            let o = agent.node(&["health", "--expect", "4.2.0"]);
            assert_refused(
                &o,
                "error: unhealthy (store check, reports 4.2.1): store runs 4.2.1, expected 4.2.0",
            );
        }
    }

    // root-dir prints each one's own root.
    assert_eq!(
        local_ok(&local_root, &["root-dir"]),
        format!("{}\n", local_root.display())
    );
    assert_eq!(
        agent.node_ok(&["root-dir"]),
        format!("{}\n", agent_root.display())
    );
    // The same activations ran, with the same FROM and TO.
    let acts = "none -> 4.2.0\n4.2.0 -> 4.2.1\n4.2.1 -> 4.2.0\n";
    assert_eq!(read_or_empty(&local_root.join("activations")), acts);
    assert_eq!(read_or_empty(&agent_root.join("activations")), acts);
    // Both stores hold the same release directories.
    let dirs = |root: &Path| -> Vec<String> {
        list_dir(&root.join("releases"))
            .into_iter()
            .filter(|n| n.parse::<orch_types::Version>().is_ok())
            .collect()
    };
    assert_eq!(dirs(&local_root), vec!["4.2.0".to_string()]);
    assert_eq!(dirs(&agent_root), dirs(&local_root));
}

#[test]
fn repeated_steps_over_grpc_say_already_and_a_different_package_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let pkgs = tmp.path().join("pkgs");
    let zip = PkgSpec::emqx("4.2.0").build(tmp.path(), &pkgs);
    let other = PkgSpec::emqx("4.2.0")
        .payload("a different build\n")
        .build(tmp.path(), &tmp.path().join("other"));
    let root = tmp.path().join("root");
    let rel = root.join("releases");
    let agent = AgentProc::start("n1", &root, &[]);

    rt().block_on(async {
        let mut c = agent.client().await;
        let r = push_file(&mut c, &zip, None).await.unwrap();
        assert!(!r.already);
        assert_eq!(r.path, "releases/emqx-4.2.0.zip");
        let r = push_file(&mut c, &zip, None).await.unwrap();
        assert!(r.already, "second push of the same package: {r:?}");
        assert!(r.message.contains("already"), "{r:?}");

        let unpack = pb::UnpackRequest {
            version: "4.2.0".into(),
            fence: None,
            expected_sha256: String::new(),
            force: false,
        };
        let r = c.unpack(unpack.clone()).await.unwrap().into_inner();
        assert!(r.changed);
        assert_eq!(
            r.messages,
            vec![
                "Release 4.2.0 not found, attempting to unpack releases/emqx-4.2.0.zip".to_string(),
                "Unpacked successfully: \"4.2.0\"".to_string()
            ]
        );
        let r = c.unpack(unpack).await.unwrap().into_inner();
        assert!(!r.changed, "{r:?}");
        assert_eq!(
            r.messages,
            vec!["Release 4.2.0 is already unpacked.".to_string()]
        );
        assert_eq!(
            states(&r.versions),
            vec![("4.2.0".into(), "unpacked".into())]
        );

        let install = |permanent| pb::InstallRequest {
            version: "4.2.0".into(),
            permanent,
            fence: None,
            expected_sha256: String::new(),
            force: false,
        };
        let r = c.install(install(true)).await.unwrap().into_inner();
        assert!(r.changed);
        for permanent in [true, false] {
            let r = c.install(install(permanent)).await.unwrap().into_inner();
            assert!(
                !r.changed,
                "install of the current permanent release: {r:?}"
            );
            assert_eq!(
                r.messages,
                vec!["Release 4.2.0 is already installed, running and set permanent.".to_string()]
            );
            assert_eq!(
                states(&r.versions),
                vec![("4.2.0".into(), "permanent".into())]
            );
        }
        let r = c
            .permanent(pb::VersionRequest {
                version: "4.2.0".into(),
                fence: None,
                force: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!r.changed);
        let r = c
            .downgrade(pb::VersionRequest {
                version: "4.2.0".into(),
                fence: None,
                force: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!r.changed, "downgrade to the running permanent: {r:?}");

        // A different package under the same name: refused, the original untouched.
        let before_zip = fs::read(rel.join("emqx-4.2.0.zip")).unwrap();
        let before_side = fs::read(rel.join("emqx-4.2.0.zip.sha256")).unwrap();
        let listing = list_dir(&rel);
        let e = push_file(&mut c, &other, None).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert_eq!(error_kind(&e), "refused");
        assert!(e.message().contains("a different emqx-4.2.0.zip"), "{e:?}");
        assert_eq!(fs::read(rel.join("emqx-4.2.0.zip")).unwrap(), before_zip);
        assert_eq!(
            fs::read(rel.join("emqx-4.2.0.zip.sha256")).unwrap(),
            before_side
        );
        assert_eq!(list_dir(&rel), listing);
    });

    // The same through the CLI: one line, exit 1, nothing changed.
    let o = agent.node(&["install", "--package", other.to_str().unwrap()]);
    assert_refused(&o, "push refused: a different emqx-4.2.0.zip");
    assert_eq!(
        fs::read(rel.join("emqx-4.2.0.zip")).unwrap(),
        fs::read(&zip).unwrap()
    );
    assert_eq!(
        fs::read_to_string(rel.join("4.2.0/payload.txt")).unwrap(),
        "release 4.2.0\n"
    );
    assert_eq!(
        agent.node_ok(&["versions"]),
        "Installed versions:\n* 4.2.0\tpermanent\n"
    );
    // Repeating the whole CLI upgrade is a success that changes nothing.
    assert_eq!(
        agent.node_ok(&["upgrade", "--package", zip.to_str().unwrap()]),
        "Release 4.2.0 is already installed, running and set permanent.\n"
    );
    assert_eq!(read_or_empty(&root.join("activations")), "none -> 4.2.0\n");
}

/// No upload debris and no package: what a refused push must leave.
fn assert_nothing_left(rel: &Path, before: &[String], ctx: &str) {
    let now = list_dir(rel);
    assert!(
        !now.iter()
            .any(|n| n.starts_with('.') && !before.contains(n)),
        "{ctx}: upload temp file left: {now:?}"
    );
    assert_eq!(now, before, "{ctx}: releases/ changed");
}

#[test]
fn push_integrity_refuses_bad_streams_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let zip = PkgSpec::emqx("4.2.0").build(tmp.path(), &tmp.path().join("pkgs"));
    let data = fs::read(&zip).unwrap();
    let root = tmp.path().join("root");
    let rel = root.join("releases");
    let agent = AgentProc::start("n1", &root, &[]);

    rt().block_on(async {
        let mut c = agent.client().await;
        let before = list_dir(&rel);
        let good = || header_for("emqx", "4.2.0", &data, None);

        // Each case: what, the header, the bytes sent, a fragment of the one-line refusal.
        // All are INVALID_ARGUMENT with `orch-error: bad-package`.
        let with = |f: &dyn Fn(&mut pb::PackageHeader)| {
            let mut h = good();
            f(&mut h);
            h
        };
        let short = data[..data.len() - 10].to_vec();
        let cases: Vec<(&str, pb::PackageHeader, &[u8], &str)> = vec![
            (
                "wrong digest",
                with(&|h| h.sha256 = sha256_hex(b"something else")),
                &data,
                "SHA-256 mismatch",
            ),
            ("truncated", good(), &short, "truncated"),
            (
                "more than size",
                with(&|h| h.size = data.len() as u64 - 10),
                &data,
                "more data than the announced",
            ),
            (
                "invalid version",
                with(&|h| h.version = "4.2".into()),
                &data,
                "invalid version \"4.2\"",
            ),
            (
                "leading zero",
                with(&|h| h.version = "04.2.0".into()),
                &data,
                "invalid version",
            ),
            (
                "name with ../",
                with(&|h| h.name = "../emqx".into()),
                &data,
                "invalid package name",
            ),
            (
                "name with /",
                with(&|h| h.name = "a/b".into()),
                &data,
                "invalid package name",
            ),
            (
                "digest not hex",
                with(&|h| h.sha256 = "not-hex".into()),
                &data,
                "not a hex SHA-256",
            ),
            (
                "oversized",
                with(&|h| h.size = 5 << 30),
                &data,
                "exceeds the limit",
            ),
        ];
        for (what, h, bytes, msg) in cases {
            let e = push_chunks(&mut c, chunks_of(Some(h), bytes, 100))
                .await
                .expect_err(what);
            assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e:?}");
            assert_eq!(error_kind(&e), "bad-package", "{what}: {e:?}");
            assert!(
                e.message().contains(msg),
                "{what}: {:?} lacks {msg:?}",
                e.message()
            );
            assert_eq!(e.message().lines().count(), 1, "{what}: one line");
            assert_nothing_left(&rel, &before, what);
        }
        // Nothing escaped the releases directory either.
        assert!(!root.join("emqx-4.2.0.zip").exists());
        assert!(!tmp.path().join("emqx-4.2.0.zip").exists());

        // First chunk without a header; an empty stream.
        let e = push_chunks(&mut c, chunks_of(None, &data, 1000))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("header"), "{e:?}");
        assert_nothing_left(&rel, &before, "no header");
        let e = push_chunks(&mut c, Vec::new()).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert_nothing_left(&rel, &before, "empty stream");

        // A second header later in the stream is data, not a new header: the digest catches it.
        let mut chunks = chunks_of(Some(good()), &data, 100);
        chunks[1].header = Some(header_for("emqx", "4.2.1", &data, None));
        let r = push_chunks(&mut c, chunks).await.unwrap();
        assert_eq!(r.path, "releases/emqx-4.2.0.zip");
        fs::remove_file(rel.join("emqx-4.2.0.zip")).unwrap();
        fs::remove_file(rel.join("emqx-4.2.0.zip.sha256")).unwrap();

        // After all that, an honest push works and lands where documented, sidecar beside it.
        let r = push_file(&mut c, &zip, None).await.unwrap();
        assert!(!r.already);
        assert_eq!(fs::read(rel.join("emqx-4.2.0.zip")).unwrap(), data);
        let side = fs::read_to_string(rel.join("emqx-4.2.0.zip.sha256")).unwrap();
        assert!(side.starts_with(&sha256_hex(&data)), "{side:?}");
    });
}

#[test]
fn an_aborted_upload_is_discarded() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let rel = root.join("releases");
    let agent = AgentProc::start("n1", &root, &[]);
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();

    rt().block_on(async {
        let mut c = agent.client().await;
        let before = list_dir(&rel);
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::PackageChunk>(4);
        let call = tokio::spawn(async move {
            c.push_package(tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(
                rx,
            ))
            .await
        });
        let h = header_for("emqx", "4.2.0", &data, None);
        for chunk in chunks_of(Some(h), &data[..100_000], 10_000) {
            tx.send(chunk).await.unwrap();
        }
        // The agent is writing the upload: its temp file exists.
        let start = std::time::Instant::now();
        while !list_dir(&rel)
            .iter()
            .any(|n| n.starts_with('.') && !before.contains(n))
        {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(10),
                "no upload temp file appeared: {:?}",
                list_dir(&rel)
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        // The client goes away mid-stream (the request is cancelled, the stream reset).
        call.abort();
        let _ = call.await;
        drop(tx);
        let start = std::time::Instant::now();
        while list_dir(&rel) != before {
            // (The agent notices the reset and drops the partial file.)
            assert!(
                start.elapsed() < std::time::Duration::from_secs(10),
                "aborted upload left {:?}",
                list_dir(&rel)
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    });
}

#[test]
fn error_kinds_and_codes_are_as_documented() {
    let tmp = tempfile::tempdir().unwrap();
    let pkgs = tmp.path().join("pkgs");
    build_emqx(tmp.path(), &pkgs, &["4.2.0", "4.3.0"]);
    let failing = PkgSpec::emqx("4.2.1")
        .hook(Some("#!/bin/sh\necho 'cannot switch' >&2\nexit 3\n"))
        .build(tmp.path(), &pkgs);
    let root = tmp.path().join("root");
    let agent = AgentProc::start("n1", &root, &[]);

    rt().block_on(async {
        let mut c = agent.client().await;
        for p in ["emqx-4.2.0.zip", "emqx-4.3.0.zip"] {
            push_file(&mut c, &pkgs.join(p), None).await.unwrap();
        }
        push_file(&mut c, &failing, None).await.unwrap();
        let ureq = |v: &str| pb::UnpackRequest {
            version: v.into(),
            fence: None,
            expected_sha256: String::new(),
            force: false,
        };
        let ireq = |v: &str| pb::InstallRequest {
            version: v.into(),
            permanent: false,
            fence: None,
            expected_sha256: String::new(),
            force: false,
        };
        let vreq = |v: &str| pb::VersionRequest {
            version: v.into(),
            fence: None,
            force: false,
        };
        c.install(ireq("4.2.0")).await.unwrap();

        let check = |what: &str,
                     r: Result<tonic::Response<pb::StepReply>, tonic::Status>,
                     code,
                     kind: &str,
                     msg: &str| {
            let e = r.expect_err(what);
            assert_eq!(e.code(), code, "{what}: {e:?}");
            assert_eq!(error_kind(&e), kind, "{what}: {e:?}");
            assert!(
                e.message().contains(msg),
                "{what}: {:?} lacks {msg:?}",
                e.message()
            );
            assert_eq!(e.message().lines().count(), 1, "{what}");
        };
        check(
            "unpack unknown",
            c.unpack(ureq("4.2.7")).await,
            Code::NotFound,
            "not-found",
            "no package for version 4.2.7",
        );
        check(
            "install unknown",
            c.install(ireq("4.2.7")).await,
            Code::NotFound,
            "not-found",
            "no package for version 4.2.7",
        );
        check(
            "unpack bad version",
            c.unpack(ureq("4.2")).await,
            Code::InvalidArgument,
            "bad-package",
            "invalid version",
        );
        check(
            "install bad version",
            c.install(ireq("v4.2.1")).await,
            Code::InvalidArgument,
            "bad-package",
            "invalid version",
        );
        check(
            "permanent empty version",
            c.permanent(vreq("")).await,
            Code::InvalidArgument,
            "bad-package",
            "invalid version",
        );
        check(
            "patch hop",
            c.install(ireq("4.3.0")).await,
            Code::FailedPrecondition,
            "refused",
            "refused to upgrade 4.2.0 -> 4.3.0",
        );
        check(
            "permanent unknown",
            c.permanent(vreq("4.2.7")).await,
            Code::FailedPrecondition,
            "refused",
            "not installed",
        );
        check(
            "uninstall permanent",
            c.uninstall(vreq("4.2.0")).await,
            Code::FailedPrecondition,
            "refused",
            "it is the permanent release",
        );
        check(
            "downgrade unknown",
            c.downgrade(vreq("4.2.7")).await,
            Code::FailedPrecondition,
            "refused",
            "not installed",
        );
        check(
            "activation fails",
            c.install(ireq("4.2.1")).await,
            Code::Internal,
            "activation",
            "activation 4.2.0 -> 4.2.1 failed",
        );
        // The failed switch changed no state: 4.2.1 stays merely unpacked.
        let v = c
            .versions(pb::VersionsRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            states(&v.versions),
            vec![
                ("4.2.1".into(), "unpacked".into()),
                ("4.2.0".into(), "permanent".into())
            ]
        );
        assert_eq!(v.running_version, "4.2.0");
        assert_eq!(v.reported_version, "");
    });
    // The CLI turns the same errors into one line and exit 1.
    assert_refused(
        &agent.node(&["unpack", "4.2.7"]),
        "no package for version 4.2.7",
    );
    assert_refused(&agent.node(&["install", "4.2.1"]), "cannot switch");
}

#[test]
fn fencing_rejects_stale_fences_across_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let pkgs = tmp.path().join("pkgs");
    build_emqx(tmp.path(), &pkgs, &["4.2.0", "4.2.1", "4.2.2"]);
    let root = tmp.path().join("root");
    let mut agent = AgentProc::start("n1", &root, &[]);
    // Unfenced operator commands.
    agent.node_ok(&[
        "install",
        "--package",
        pkgs.join("emqx-4.2.0.zip").to_str().unwrap(),
    ]);
    agent.node_ok(&[
        "unpack",
        "--package",
        pkgs.join("emqx-4.2.1.zip").to_str().unwrap(),
    ]);

    let install = |f| pb::InstallRequest {
        version: "4.2.1".into(),
        permanent: false,
        fence: f,
        expected_sha256: String::new(),
        force: false,
    };
    let perm = |f| pb::VersionRequest {
        version: "4.2.1".into(),
        fence: f,
        force: false,
    };
    let stale = |e: tonic::Status, ctx: &str| {
        assert_eq!(e.code(), Code::Aborted, "{ctx}: {e:?}");
        assert_eq!(error_kind(&e), "stale-fence", "{ctx}: {e:?}");
        assert!(e.message().contains("stale fence"), "{ctx}: {e:?}");
        e
    };

    rt().block_on(async {
        let mut c = agent.client().await;
        let r = c
            .install(install(fence(2, "r1", 5)))
            .await
            .unwrap()
            .into_inner();
        assert!(r.changed);
        let e = stale(
            c.permanent(perm(fence(2, "r1", 4))).await.unwrap_err(),
            "older step",
        );
        assert!(
            e.message().contains("(term 2, rollout r000001, step 4)")
                && e.message().contains("(term 2, rollout r000001, step 5)"),
            "names both fences: {e:?}"
        );
        stale(
            c.install(install(fence(1, "r9", 99))).await.unwrap_err(),
            "older term",
        );
        // A stale push is refused before anything is written.
        let rel = root.join("releases");
        let before = list_dir(&rel);
        stale(
            push_file(&mut c, &pkgs.join("emqx-4.2.2.zip"), fence(2, "r1", 1))
                .await
                .unwrap_err(),
            "stale push",
        );
        assert_eq!(list_dir(&rel), before);
        // The rejected step changed nothing.
        let v = c
            .versions(pb::VersionsRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            states(&v.versions),
            vec![
                ("4.2.1".into(), "current".into()),
                ("4.2.0".into(), "permanent".into())
            ]
        );
        // An equal fence is a retry: accepted, and idempotent.
        let r = c
            .install(install(fence(2, "r1", 5)))
            .await
            .unwrap()
            .into_inner();
        assert!(!r.changed, "{r:?}");
        let info = c
            .node_info(pb::NodeInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.last_fence, fence(2, "r000001", 5));
    });

    // Graceful restart on the same root: the fence survives.
    assert!(agent.stop_term().success(), "{}", agent.log());
    let mut agent = AgentProc::start("n1", &root, &[]);
    rt().block_on(async {
        let mut c = agent.client().await;
        let info = c
            .node_info(pb::NodeInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.last_fence, fence(2, "r000001", 5));
        stale(
            c.permanent(perm(fence(2, "r1", 4))).await.unwrap_err(),
            "after restart",
        );
        // A newer term passes.
        let r = c
            .permanent(perm(fence(3, "r0", 0)))
            .await
            .unwrap()
            .into_inner();
        assert!(r.changed);
        assert_eq!(
            r.messages,
            vec!["Made release permanent: \"4.2.1\"".to_string()]
        );
        stale(
            c.permanent(perm(fence(2, "r1", 5))).await.unwrap_err(),
            "the old leader's retry after a newer term",
        );
    });

    // Crash (SIGKILL) right after a fence was accepted: it is durable.
    rt().block_on(async {
        let mut c = agent.client().await;
        let r = c
            .unpack(pb::UnpackRequest {
                version: "4.2.1".into(),
                fence: fence(4, "r2", 1),
                expected_sha256: String::new(),
                force: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!r.changed);
    });
    agent.kill9();
    let agent = AgentProc::start("n1", &root, &[]);
    rt().block_on(async {
        let mut c = agent.client().await;
        stale(
            c.permanent(perm(fence(3, "r0", 7))).await.unwrap_err(),
            "after a crash",
        );
        let info = c
            .node_info(pb::NodeInfoRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.last_fence, fence(4, "r000002", 1));
        assert_eq!(info.held_by, "r000002");
    });

    // Unfenced calls (an operator's own commands) are refused while rollout r2 holds the node,
    // allowed with --force, and audited either way.
    assert_refused(
        &agent.node(&["downgrade", "4.2.0"]),
        "node n1 is held by rollout r000002 of cluster test-cluster",
    );
    assert_eq!(
        agent.node_ok(&["downgrade", "4.2.0", "--force"]),
        "Release 4.2.0 is marked old, switching to it.\n\
         Installed Release: 4.2.0\n\
         Made release permanent: \"4.2.0\"\n"
    );
    let audit = fs::read_to_string(root.join("agent/audit.log")).unwrap();
    let c = "cluster=test-cluster";
    for line in [
        "unauthenticated unfenced | push emqx-4.2.0.zip | ok changed".to_string(),
        "unauthenticated unfenced | install 4.2.0 permanent=true | ok changed".into(),
        "unauthenticated unfenced | unpack 4.2.1 | ok changed".into(),
        format!("{c} term=2 rollout=r1 step=5 | install 4.2.1 permanent=false | ok changed"),
        format!("{c} term=2 rollout=r1 step=4 | permanent 4.2.1 | refused stale-fence: "),
        format!("{c} term=2 rollout=r1 step=5 | install 4.2.1 permanent=false | ok unchanged"),
        format!("{c} term=3 rollout=r0 step=0 | permanent 4.2.1 | ok changed"),
        format!("{c} term=4 rollout=r2 step=1 | unpack 4.2.1 | ok unchanged"),
        "unfenced | downgrade 4.2.0 | refused held: node n1 is held by rollout r000002".into(),
        "unfenced | downgrade 4.2.0 | ok changed".into(),
    ] {
        assert!(audit.contains(&line), "audit.log lacks {line:?}:\n{audit}");
    }
    let fence_file: serde_json::Value =
        serde_json::from_slice(&fs::read(root.join("agent/fence.json")).unwrap()).unwrap();
    assert_eq!(fence_file["term"], 4);
    assert_eq!(fence_file["rollout_id"], "r000002");
    assert_eq!(fence_file["cluster_id"], TEST_CLUSTER);
    assert_eq!(fence_file["released"], false);
}

// ---- Where `--agent` and `--root-dir` disagree (bugs; see the ignore reasons) ----

/// Runs the same command against a local root and an agent; returns (local, agent) normalized.
fn both(local_root: &Path, agent: &AgentProc, args: &[&str]) -> (Seen, Seen) {
    (
        seen(&local(local_root, args), local_root),
        seen(&agent.node(args), &agent.root),
    )
}

fn assert_same(l: &Seen, r: &Seen, ctx: &str) {
    assert_eq!(
        (r.code, &r.stdout, &r.stderr),
        (l.code, &l.stdout, &l.stderr),
        "{ctx}: --agent (left) differs from --root-dir (right)"
    );
}

#[test]
fn client_side_refusals_agree_between_agent_and_root_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let pkgs = tmp.path().join("pkgs");
    build_emqx(tmp.path(), &pkgs, &["4.2.0"]);
    let local_root = tmp.path().join("local");
    let agent = AgentProc::start("n1", &tmp.path().join("agent"), &[]);
    let p = pkgs.display().to_string();
    // A sidecar that is not a digest.
    fs::copy(pkgs.join("emqx-4.2.0.zip"), pkgs.join("emqx-4.2.5.zip")).unwrap();
    fs::write(pkgs.join("emqx-4.2.5.zip.sha256"), "garbage\n").unwrap();
    for args in [
        vec!["unpack".to_string()],
        vec![
            "unpack".into(),
            "--package".into(),
            format!("{p}/emqx-4.2.5.zip"),
        ],
        vec![
            "install".into(),
            "--package".into(),
            format!("{p}/emqx-4.2.5.zip"),
        ],
        vec![
            "unpack".into(),
            "4.2.1".into(),
            "--package".into(),
            format!("{p}/emqx-4.2.0.zip"),
        ],
        vec!["permanent".into(), "4.2.0".into()],
        vec!["downgrade".into(), "4.2.0".into()],
    ] {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let (l, r) = both(&local_root, &agent, &a);
        assert_eq!(l.code, Some(1), "{a:?} is refused locally");
        assert_same(&l, &r, &format!("{a:?}"));
    }
}

#[test]
fn malformed_sha256_reads_the_same_through_the_agent() {
    let tmp = tempfile::tempdir().unwrap();
    let pkgs = tmp.path().join("pkgs");
    build_emqx(tmp.path(), &pkgs, &["4.2.0"]);
    let agent = AgentProc::start("n1", &tmp.path().join("agent"), &[]);
    let zip = pkgs.join("emqx-4.2.0.zip");
    let (l, r) = both(
        &tmp.path().join("local"),
        &agent,
        &[
            "unpack",
            "--package",
            zip.to_str().unwrap(),
            "--sha256",
            "abc",
        ],
    );
    assert_same(&l, &r, "--sha256 abc");
}

#[test]
fn badly_named_package_reads_the_same_through_the_agent() {
    let tmp = tempfile::tempdir().unwrap();
    let pkgs = tmp.path().join("pkgs");
    build_emqx(tmp.path(), &pkgs, &["4.2.0"]);
    let odd = pkgs.join("emqx.zip");
    fs::copy(pkgs.join("emqx-4.2.0.zip"), &odd).unwrap();
    let agent = AgentProc::start("n1", &tmp.path().join("agent"), &[]);
    let (l, r) = both(
        &tmp.path().join("local"),
        &agent,
        &["unpack", "--package", odd.to_str().unwrap()],
    );
    assert_same(&l, &r, "emqx.zip");
}

#[test]
fn sha256_without_package_is_enforced_through_the_agent() {
    let tmp = tempfile::tempdir().unwrap();
    let pkgs = tmp.path().join("pkgs");
    build_emqx(tmp.path(), &pkgs, &["4.2.0"]);
    let local_root = tmp.path().join("local");
    let agent_root = tmp.path().join("agent");
    // The package already sits in both nodes' releases/ (as after a push or a copy).
    for root in [&local_root, &agent_root] {
        let rel = root.join("releases");
        fs::create_dir_all(&rel).unwrap();
        for f in ["emqx-4.2.0.zip", "emqx-4.2.0.zip.sha256"] {
            fs::copy(pkgs.join(f), rel.join(f)).unwrap();
        }
    }
    let agent = AgentProc::start("n1", &agent_root, &[]);
    let (l, r) = both(
        &local_root,
        &agent,
        &["install", "4.2.0", "--sha256", ZEROS],
    );
    assert_refused(
        &local(&local_root, &["install", "4.2.0", "--sha256", ZEROS]),
        "SHA-256 mismatch",
    );
    assert_same(&l, &r, "install 4.2.0 --sha256 ZEROS");
    assert_eq!(
        agent.node_ok(&["versions"]),
        "Installed versions:\n",
        "nothing may be installed from a package that fails the operator's digest"
    );
    // A digest that is not one is refused the same way on both sides.
    let (l, r) = both(&local_root, &agent, &["unpack", "4.2.0", "--sha256", "xyz"]);
    assert_same(&l, &r, "unpack 4.2.0 --sha256 xyz");
    assert_ne!(l.code, Some(0), "{}", l.stderr);
    // The right digest installs, through the agent as locally.
    let good = fs::read_to_string(pkgs.join("emqx-4.2.0.zip.sha256")).unwrap();
    let good = good.split_whitespace().next().unwrap().to_string();
    let (l, r) = both(
        &local_root,
        &agent,
        &["install", "4.2.0", "--sha256", &good],
    );
    assert_same(&l, &r, "install 4.2.0 --sha256 GOOD");
    assert_eq!(l.code, Some(0), "{}", l.stderr);
    assert!(
        agent.node_ok(&["versions"]).contains("4.2.0"),
        "installed through the agent"
    );
}

#[test]
fn local_only_flags_are_not_silently_dropped_with_agent() {
    let tmp = tempfile::tempdir().unwrap();
    let pkgs = tmp.path().join("pkgs");
    let zip = PkgSpec::emqx("4.2.0").build(tmp.path(), &pkgs);
    let agent = AgentProc::start("n1", &tmp.path().join("agent"), &[]);
    let args = [
        "unpack",
        "--package",
        zip.to_str().unwrap(),
        "--max-entries",
        "1",
    ];
    let (l, r) = both(&tmp.path().join("local"), &agent, &args);
    assert_eq!(
        l.code,
        Some(1),
        "the local store enforces --max-entries 1: {}",
        l.stderr
    );
    assert_eq!(
        r.code,
        Some(1),
        "--agent must refuse the flag (or apply it), not drop it: {:?}",
        r.stdout
    );
    assert!(
        r.stderr.contains("--max-entries") && r.stderr.contains("configure the agent"),
        "the refusal names the flag and what to do instead: {}",
        r.stderr
    );
    assert_eq!(
        agent.node_ok(&["versions"]),
        "Installed versions:\n",
        "nothing was unpacked through the agent"
    );
}

#[test]
fn malformed_push_streams_carry_an_error_kind() {
    let tmp = tempfile::tempdir().unwrap();
    let agent = AgentProc::start("n1", &tmp.path().join("root"), &[]);
    rt().block_on(async {
        let mut c = agent.client().await;
        let e = push_chunks(&mut c, chunks_of(None, b"data", 2))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert_eq!(error_kind(&e), "bad-package", "{e:?}");
        let e = push_chunks(&mut c, Vec::new()).await.unwrap_err();
        assert_eq!(error_kind(&e), "bad-package", "{e:?}");
    });
}

#[test]
fn large_packages_stream_in_many_chunks() {
    let tmp = tempfile::tempdir().unwrap();
    // ~3 MB of incompressible payload: a dozen CLI chunks.
    let mut payload = String::with_capacity(4 << 20);
    while payload.len() < (3 << 20) {
        payload.push_str(&format!("{:016x}\n", fastrand::u64(..)));
    }
    let zip = PkgSpec::emqx("4.2.0")
        .payload(&payload)
        .build(tmp.path(), &tmp.path().join("pkgs"));
    assert!(fs::metadata(&zip).unwrap().len() > 1 << 20);
    let root = tmp.path().join("root");
    let agent = AgentProc::start("n1", &root, &[]);
    agent.node_ok(&["install", "--package", zip.to_str().unwrap()]);
    assert_eq!(
        fs::read(root.join("releases/emqx-4.2.0.zip")).unwrap(),
        fs::read(&zip).unwrap()
    );
    assert_eq!(
        fs::read_to_string(root.join("releases/4.2.0/payload.txt")).unwrap(),
        payload
    );
}

/// A root with 4.2.0 permanent and 4.2.1 unpacked, whose activation hook signals its start
/// (`ROOT/hook-started`) and then takes `secs`.
fn slow_switch_agent(tmp: &Path, secs: &str) -> AgentProc {
    let pkgs = tmp.join("pkgs");
    build_emqx(tmp, &pkgs, &["4.2.0"]);
    PkgSpec::emqx("4.2.1")
        .hook(Some(&format!(
            "#!/bin/sh\ntouch \"$ORCH_ROOT_DIR/hook-started\"\nsleep {secs}\n\
             echo \"$1 -> $2\" >> \"$ORCH_ROOT_DIR/activations\"\n"
        )))
        .build(tmp, &pkgs);
    let agent = AgentProc::start("n1", &tmp.join("root"), &[]);
    let p = |v: &str| pkgs.join(format!("emqx-{v}.zip")).display().to_string();
    agent.node_ok(&["install", "--package", &p("4.2.0")]);
    agent.node_ok(&["unpack", "--package", &p("4.2.1")]);
    agent
}

#[test]
fn steps_on_one_node_run_one_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let agent = slow_switch_agent(tmp.path(), "2");
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
    let started = agent.root.join("hook-started");
    wait_until(
        std::time::Duration::from_secs(20),
        "the activation to start",
        || started.exists(),
    );
    // Reads answer meanwhile, and show the state before the switch.
    assert_eq!(
        agent.node_ok(&["versions"]),
        "Installed versions:\n* 4.2.1\tunpacked\n* 4.2.0\tpermanent\n"
    );
    // A second step waits for the first instead of interleaving with it: once the switch is
    // done, 4.2.1 is current and can be made permanent.
    assert_eq!(
        agent.node_ok(&["permanent", "4.2.1"]),
        "Made release permanent: \"4.2.1\"\n"
    );
    let o = install.join().unwrap();
    assert_eq!(
        stdout(&o),
        "Release 4.2.1 is already unpacked, now installing.\nInstalled Release: 4.2.1\n",
        "{}",
        stderr(&o)
    );
    assert_eq!(
        agent.node_ok(&["versions"]),
        "Installed versions:\n* 4.2.1\tpermanent\n* 4.2.0\told\n"
    );
    assert_eq!(
        read_or_empty(&agent.root.join("activations")),
        "none -> 4.2.0\n4.2.0 -> 4.2.1\n"
    );
}

#[test]
fn node_info_answers_while_a_step_is_in_flight() {
    let tmp = tempfile::tempdir().unwrap();
    let agent = slow_switch_agent(tmp.path(), "4");
    let addr = agent.addr.clone();
    let install = std::thread::spawn(move || {
        orch(&["node", "install", "4.2.1", "--agent", &addr, "--insecure"])
    });
    let started = agent.root.join("hook-started");
    wait_until(
        std::time::Duration::from_secs(20),
        "the activation to start",
        || started.exists(),
    );
    let t = std::time::Instant::now();
    let o = orch(&["node", "root-dir", "--agent", &agent.addr, "--insecure"]);
    let took = t.elapsed();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        took < std::time::Duration::from_millis(2500),
        "NodeInfo took {took:?}: it waited for the activation"
    );
    assert!(install.join().unwrap().status.success());
}

#[test]
fn an_upload_cut_by_an_agent_crash_is_cleared_on_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let rel = root.join("releases");
    let mut agent = AgentProc::start("n1", &root, &[]);
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let before = list_dir(&rel);
    let r = rt();
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::PackageChunk>(4);
    let mut c = r.block_on(agent.client());
    let call = r.spawn(async move {
        c.push_package(tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(
            rx,
        ))
        .await
    });
    r.block_on(async {
        let h = header_for("emqx", "4.2.0", &data, None);
        for chunk in chunks_of(Some(h), &data[..100_000], 10_000) {
            tx.send(chunk).await.unwrap();
        }
    });
    wait_until(
        std::time::Duration::from_secs(10),
        "the upload's temp file",
        || {
            list_dir(&rel)
                .iter()
                .any(|n| n.starts_with('.') && !before.contains(n))
        },
    );
    agent.kill9();
    assert_ne!(list_dir(&rel), before, "the crash left the partial upload");
    let agent = AgentProc::start("n1", &root, &[]);
    assert_eq!(list_dir(&rel), before, "the restarted agent cleared it");
    assert_eq!(agent.node_ok(&["versions"]), "Installed versions:\n");
    drop(tx);
    let _ = r.block_on(call);
}

/// Every report of the node's releases carries when it was read: this agent process's id and
/// its count of steps that changed something. Steps that change nothing, and refused steps,
/// keep the count; a restarted agent has another id.
#[test]
fn release_reports_are_stamped_with_the_agents_step_count() {
    let tmp = tempfile::tempdir().unwrap();
    let zip = PkgSpec::emqx("4.2.0").build(tmp.path(), &tmp.path().join("pkgs"));
    let root = tmp.path().join("root");
    let mut agent = AgentProc::start("n1", &root, &[]);
    let unpack = pb::UnpackRequest {
        version: "4.2.0".into(),
        fence: None,
        expected_sha256: String::new(),
        force: false,
    };
    let boot = rt().block_on(async {
        let mut c = agent.client().await;
        let v = c
            .versions(pb::VersionsRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_ne!(v.boot_id, 0, "stamped");
        let rev0 = v.state_rev;
        push_file(&mut c, &zip, None).await.unwrap();
        let r = c.unpack(unpack.clone()).await.unwrap().into_inner();
        assert!(r.changed);
        assert_eq!((r.boot_id, r.state_rev), (v.boot_id, rev0 + 1));
        // Nothing to do: same count.
        let r = c.unpack(unpack.clone()).await.unwrap().into_inner();
        assert!(!r.changed);
        assert_eq!((r.boot_id, r.state_rev), (v.boot_id, rev0 + 1));
        // Refused: same count.
        c.install(pb::InstallRequest {
            version: "4.2.9".into(),
            permanent: true,
            fence: None,
            expected_sha256: String::new(),
            force: false,
        })
        .await
        .unwrap_err();
        let v2 = c
            .versions(pb::VersionsRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!((v2.boot_id, v2.state_rev), (v.boot_id, rev0 + 1));
        v.boot_id
    });
    assert!(agent.stop_term().success(), "{}", agent.log());
    let agent = AgentProc::start("n1", &root, &[]);
    rt().block_on(async {
        let mut c = agent.client().await;
        let v = c
            .versions(pb::VersionsRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_ne!(v.boot_id, boot, "a restarted agent is another process");
        assert_ne!(v.boot_id, 0);
    });
}
