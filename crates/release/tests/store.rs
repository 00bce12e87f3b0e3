//! Store-level tests on real packages built by `package::build`: the EMQX hot-upgrade guide
//! walk-through, activation hooks (arguments, cwd, environment, override, failure, timeout),
//! the writer lock, restart reconciliation and repair of interrupted operations.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use orch_release::{Activation, Error, PackageSource, package};

/// A temp dir holding `root/` (the store) and `work/` (package sources, logs).
struct Fx {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    root: PathBuf,
}

impl Fx {
    fn new() -> Fx {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().canonicalize().unwrap();
        let root = base.join("root");
        fs::create_dir_all(root.join("releases")).unwrap();
        fs::create_dir_all(base.join("work")).unwrap();
        Fx {
            _tmp: tmp,
            base,
            root,
        }
    }
    fn work(&self) -> PathBuf {
        self.base.join("work")
    }
    /// Builds `emqx-<version>.zip` into `root/releases/` (where `Lookup` finds it).
    fn pkg(&self, version: &str, spec: &Spec<'_>) -> PathBuf {
        build_pkg(&self.work(), &self.root.join("releases"), version, spec)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.base.join(name)
    }
}

fn lookup(s: &str) -> PackageSource {
    PackageSource::Lookup(v(s))
}

fn msgs(o: &orch_release::Outcome) -> String {
    o.messages.join("\n")
}

#[test]
fn emqx_guide_walk_through() {
    let fx = Fx::new();
    fx.pkg("4.2.0", &Spec::default());
    fx.pkg("4.2.1", &Spec::default());
    let store = open(&fx.root);
    assert_eq!(listing(&store), "Installed versions:\n");

    // 4.2.0 is installed and permanent.
    let o = store.install(&lookup("4.2.0"), true).unwrap();
    assert!(o.changed);
    assert_eq!(
        msgs(&o),
        "Release 4.2.0 not found, attempting to unpack releases/emqx-4.2.0.zip\n\
         Unpacked successfully: \"4.2.0\"\n\
         Installed Release: 4.2.0\n\
         Made release permanent: \"4.2.0\""
    );
    // EMQX has no such line: it goes to stderr.
    assert_eq!(
        o.notes,
        vec!["No activation hook: only the recorded state changed (state-only switch)"]
    );
    assert_eq!(listing(&store), "Installed versions:\n* 4.2.0\tpermanent\n");

    // emqx upgrade --no-permanent 4.2.1
    let o = store.install(&lookup("4.2.1"), false).unwrap();
    assert_eq!(
        msgs(&o),
        "Release 4.2.1 not found, attempting to unpack releases/emqx-4.2.1.zip\n\
         Unpacked successfully: \"4.2.1\"\n\
         Installed Release: 4.2.1"
    );
    assert_eq!(
        listing(&store),
        "Installed versions:\n* 4.2.1\tcurrent\n* 4.2.0\tpermanent\n"
    );

    // emqx install 4.2.1: already current, so it only becomes permanent.
    let o = store.install(&lookup("4.2.1"), true).unwrap();
    assert!(o.changed);
    assert_eq!(o.activation, None, "no switch expected: {o:?}");
    assert_eq!(
        msgs(&o),
        "Release 4.2.1 is already installed and current, making permanent.\n\
         Made release permanent: \"4.2.1\""
    );
    assert!(o.notes.is_empty(), "{o:?}");
    assert_eq!(
        listing(&store),
        "Installed versions:\n* 4.2.1\tpermanent\n* 4.2.0\told\n"
    );

    // emqx downgrade 4.2.0
    let o = store.downgrade(v("4.2.0")).unwrap();
    assert_eq!(
        msgs(&o),
        "Release 4.2.0 is marked old, switching to it.\n\
         Installed Release: 4.2.0\n\
         Made release permanent: \"4.2.0\""
    );
    assert_eq!(
        listing(&store),
        "Installed versions:\n* 4.2.1\told\n* 4.2.0\tpermanent\n"
    );

    // emqx uninstall 4.2.1: its directory goes, its package stays.
    let o = store.uninstall(v("4.2.1")).unwrap();
    assert_eq!(
        msgs(&o),
        "Release 4.2.1 is marked old, uninstalling it.\nUninstalled Release: 4.2.1"
    );
    assert_eq!(listing(&store), "Installed versions:\n* 4.2.0\tpermanent\n");
    assert!(!fx.root.join("releases/4.2.1").exists());
    assert!(fx.root.join("releases/emqx-4.2.1.zip").is_file());
    assert_consistent(&store);

    // A fresh handle on the same root sees the same (durable) state.
    assert_eq!(
        listing(&open(&fx.root)),
        "Installed versions:\n* 4.2.0\tpermanent\n"
    );
    assert_eq!(store.root(), fx.root.as_path());
}

#[test]
fn repeated_steps_succeed_and_say_so() {
    let fx = Fx::new();
    fx.pkg("4.2.0", &Spec::default());
    fx.pkg("4.2.1", &Spec::default());
    let store = open(&fx.root);
    store.install(&lookup("4.2.0"), true).unwrap();
    store.unpack(&lookup("4.2.1")).unwrap();
    let before = snapshot(&fx.root);
    let o = store.unpack(&lookup("4.2.1")).unwrap();
    assert!(!o.changed);
    assert!(msgs(&o) == "Release 4.2.1 is already unpacked.", "{o:?}");
    let o = store.install(&lookup("4.2.0"), true).unwrap();
    assert!(!o.changed && msgs(&o).contains("already"), "{o:?}");
    let o = store.make_permanent(v("4.2.0")).unwrap();
    assert!(
        !o.changed && msgs(&o).contains("already permanent"),
        "{o:?}"
    );
    let o = store.downgrade(v("4.2.0")).unwrap();
    assert!(!o.changed && msgs(&o).contains("already"), "{o:?}");
    assert_eq!(
        snapshot(&fx.root),
        before,
        "no-ops must not touch the store"
    );
}

/// DESIGN.md: "unpack V ... Already known: no-op with a message saying its state". Operators
/// delete packages once unpacked to save space; `unpack 4.2.1` must then still say "already
/// unpacked", as `install 4.2.1` does, instead of failing to find a package it does not need.
#[test]
fn unpack_of_a_known_release_needs_no_package() {
    let fx = Fx::new();
    let zip = fx.pkg("4.2.0", &Spec::default());
    let store = open(&fx.root);
    store.install(&lookup("4.2.0"), true).unwrap();
    fs::remove_file(&zip).unwrap();
    fs::remove_file(package::sidecar_path(&zip)).unwrap();
    // install of the known release needs no package ...
    let o = store.install(&lookup("4.2.0"), true).unwrap();
    assert!(!o.changed);
    // ... and neither should unpack.
    let o = store
        .unpack(&lookup("4.2.0"))
        .expect("unpack of a known release must be a no-op, not a package lookup");
    assert!(!o.changed);
    assert_eq!(
        msgs(&o),
        "Release 4.2.0 is already installed and set permanent."
    );
}

#[test]
fn refusals_change_nothing_and_name_the_versions() {
    let fx = Fx::new();
    fx.pkg("4.2.0", &Spec::default());
    fx.pkg("4.2.1", &Spec::default());
    fx.pkg("4.3.0", &Spec::default());
    let store = open(&fx.root);
    store.install(&lookup("4.2.0"), true).unwrap();
    store.install(&lookup("4.2.1"), false).unwrap();
    let before = snapshot(&fx.root);
    let expect_refused = |r: orch_release::Result<orch_release::Outcome>, needles: &[&str]| {
        let e = r.unwrap_err();
        assert!(matches!(e, Error::Refused(_)), "{e:?}");
        let msg = e.to_string();
        for n in needles {
            assert!(msg.contains(n), "{msg:?} should mention {n:?}");
        }
    };
    // Cross-minor upgrade: refused before the package is even unpacked.
    expect_refused(store.install(&lookup("4.3.0"), true), &["4.2.1", "4.3.0"]);
    expect_refused(store.install(&lookup("4.3.0"), false), &["4.2.1", "4.3.0"]);
    expect_refused(store.uninstall(v("4.2.0")), &["4.2.0", "permanent"]);
    expect_refused(store.uninstall(v("4.2.1")), &["4.2.1", "current"]);
    expect_refused(store.uninstall(v("4.2.9")), &["4.2.9", "not installed"]);
    expect_refused(store.downgrade(v("4.2.9")), &["4.2.9", "not installed"]);
    expect_refused(store.downgrade(v("4.2.1")), &["4.2.1", "current"]);
    expect_refused(store.make_permanent(v("4.2.0")), &["4.2.0", "current"]);
    expect_refused(store.install(&lookup("4.2.0"), true), &["downgrade 4.2.0"]);
    assert_eq!(snapshot(&fx.root), before);
    assert!(!fx.root.join("releases/4.3.0").exists());

    // No package for an unknown version: a clear error pointing to --package.
    let e = store.unpack(&lookup("4.2.7")).unwrap_err();
    assert!(matches!(e, Error::PackageNotFound { .. }), "{e:?}");
    assert!(e.to_string().contains("--package"), "{e}");
    let e = store.install(&lookup("4.2.7"), true).unwrap_err();
    assert!(matches!(e, Error::PackageNotFound { .. }), "{e:?}");
    assert_eq!(snapshot(&fx.root), before);
}

#[test]
fn several_packages_for_one_version_are_ambiguous() {
    let fx = Fx::new();
    fx.pkg("4.2.0", &Spec::default());
    build_named(
        &fx.work(),
        &fx.root.join("releases"),
        "emqx-ee",
        "4.2.0",
        &Spec::default(),
    );
    let store = open(&fx.root);
    let e = store.unpack(&lookup("4.2.0")).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("emqx-4.2.0.zip")
            && msg.contains("emqx-ee-4.2.0.zip")
            && msg.contains("--package"),
        "{msg}"
    );
    // Naming the file resolves it, and the release records its package name.
    let ee = fx.root.join("releases/emqx-ee-4.2.0.zip");
    store.unpack(&file_src(&ee)).unwrap();
    assert_eq!(store.view().unwrap().releases[&v("4.2.0")].name, "emqx-ee");
}

#[test]
fn package_by_path_with_explicit_digest() {
    let fx = Fx::new();
    let out = fx.path("elsewhere");
    let zip = build_pkg(&fx.work(), &out, "4.2.0", &Spec::default());
    let (digest, _) = package::sha256_file(&zip).unwrap();
    // No sidecar: the explicit digest is what is checked (upper case is fine).
    fs::remove_file(package::sidecar_path(&zip)).unwrap();
    let store = open(&fx.root);
    let src = PackageSource::File {
        path: zip.clone(),
        sha256: Some(digest.to_ascii_uppercase()),
    };
    store.install(&src, true).unwrap();
    assert_eq!(listing(&store), "Installed versions:\n* 4.2.0\tpermanent\n");
    // The package is not copied into the store.
    assert!(!fx.root.join("releases/emqx-4.2.0.zip").exists());
    assert_consistent(&store);
}

// ---- activation ----

fn hook_logging_to(log: &Path) -> String {
    format!(
        "printf '%s|' \"$#\" \"$1\" \"$2\" \"$(pwd -P)\" \"$ORCH_ROOT_DIR\" \"$ORCH_RELEASE_DIR\" \
         \"$ORCH_FROM_VERSION\" \"$ORCH_TO_VERSION\" >> '{}'\necho >> '{}'",
        log.display(),
        log.display()
    )
}

#[test]
fn release_hook_gets_from_to_cwd_and_environment() {
    let fx = Fx::new();
    let log = fx.path("hook.log");
    let hook = hook_logging_to(&log);
    let spec = Spec {
        hook: Some(&hook),
        filler: 0,
    };
    fx.pkg("4.2.0", &spec);
    fx.pkg("4.2.1", &spec);
    let store = open(&fx.root);
    let o = store.install(&lookup("4.2.0"), true).unwrap();
    let hook_path = fx.root.join("releases/4.2.0/hooks/activate");
    assert_eq!(
        o.activation,
        Some(Activation::Hook(hook_path.display().to_string()))
    );
    store.install(&lookup("4.2.1"), true).unwrap();
    store.downgrade(v("4.2.0")).unwrap();
    // Steps without a switch do not run the hook.
    store.unpack(&lookup("4.2.1")).unwrap();
    store.uninstall(v("4.2.1")).unwrap();

    let r = fx.root.display().to_string();
    let line =
        |from: &str, to: &str| format!("2|{from}|{to}|{r}|{r}|{r}/releases/{to}|{from}|{to}|");
    let got = fs::read_to_string(&log).unwrap();
    assert_eq!(
        got.lines().collect::<Vec<_>>(),
        vec![
            line("none", "4.2.0"),
            line("4.2.0", "4.2.1"),
            line("4.2.1", "4.2.0")
        ]
    );
    assert_consistent(&store);
}

#[test]
fn activate_cmd_overrides_the_release_hook() {
    let fx = Fx::new();
    let hook_log = fx.path("hook.log");
    let cmd_log = fx.path("cmd.log");
    let hook = hook_logging_to(&hook_log);
    fx.pkg(
        "4.2.0",
        &Spec {
            hook: Some(&hook),
            filler: 0,
        },
    );
    fx.pkg("4.2.1", &Spec::default());
    let script = format!(
        "printf '%s %s %s %s\\n' \"$0\" \"$1\" \"$2\" \"$ORCH_TO_VERSION\" >> '{}'",
        cmd_log.display()
    );
    let store = open_with(&fx.root, |c| {
        c.activate_cmd = Some(vec![
            "/bin/sh".into(),
            "-c".into(),
            script,
            "my-activate".into(),
        ])
    });
    let o = store.install(&lookup("4.2.0"), true).unwrap();
    assert_eq!(o.activation, Some(Activation::Hook("/bin/sh".into())));
    // Also used for a release that ships no hook.
    store.install(&lookup("4.2.1"), false).unwrap();
    assert_eq!(
        fs::read_to_string(&cmd_log).unwrap(),
        "my-activate none 4.2.0 4.2.0\nmy-activate 4.2.0 4.2.1 4.2.1\n"
    );
    assert!(!hook_log.exists(), "the release's own hook must not run");
}

#[test]
fn no_hook_means_a_state_only_switch_that_says_so() {
    let fx = Fx::new();
    fx.pkg("4.2.0", &Spec::default());
    fx.pkg("4.2.1", &Spec::default());
    let store = open(&fx.root);
    for o in [
        store.install(&lookup("4.2.0"), true).unwrap(),
        store.install(&lookup("4.2.1"), false).unwrap(),
        store.downgrade(v("4.2.0")).unwrap(),
    ] {
        assert_eq!(o.activation, Some(Activation::StateOnly), "{o:?}");
        assert!(
            o.notes.last().unwrap().contains("state-only"),
            "{:?}",
            o.notes
        );
        assert!(!msgs(&o).contains("state-only"), "{o:?}");
    }
    // No switch, no activation at all.
    let o = store.uninstall(v("4.2.1")).unwrap();
    assert_eq!(o.activation, None);
    assert!(!msgs(&o).contains("state-only") && o.notes.is_empty());
}

#[test]
fn failing_hook_fails_the_step_with_its_stderr_and_states_unchanged() {
    let fx = Fx::new();
    fx.pkg("4.2.0", &Spec::default());
    let failing = "echo starting\necho boom >&2\nexit 3";
    fx.pkg(
        "4.2.1",
        &Spec {
            hook: Some(failing),
            filler: 3,
        },
    );
    let store = open(&fx.root);
    store.install(&lookup("4.2.0"), true).unwrap();
    store.unpack(&lookup("4.2.1")).unwrap();
    let before_listing = listing(&store);
    let before = snapshot(&fx.root);
    for permanent in [true, false] {
        let e = store.install(&lookup("4.2.1"), permanent).unwrap_err();
        match &e {
            Error::Activation { from, to, reason } => {
                assert_eq!((from.as_str(), *to), ("4.2.0", v("4.2.1")));
                let reason = reason.to_string();
                assert!(
                    reason.contains("boom") && reason.contains("exit code 3"),
                    "{reason}"
                );
            }
            other => panic!("expected an activation error, got {other:?}"),
        }
        let msg = e.to_string();
        assert!(
            msg.contains("boom") && msg.contains("states are unchanged"),
            "{msg}"
        );
        assert!(!msg.contains('\n'), "one line for the operator: {msg:?}");
        assert_eq!(listing(&store), before_listing);
        assert_eq!(snapshot(&fx.root), before, "hook log or state left behind");
    }
    // A working override then succeeds without re-extracting.
    let fixed = open_with(&fx.root, |c| c.activate_cmd = Some(vec!["true".into()]));
    fixed.install(&lookup("4.2.1"), true).unwrap();
    assert_eq!(
        listing(&store),
        "Installed versions:\n* 4.2.1\tpermanent\n* 4.2.0\told\n"
    );
}

#[test]
fn failing_hook_on_install_of_an_unknown_release_leaves_it_only_unpacked() {
    // The store's documented choice: the unpack is recorded before the switch, so a failed
    // activation keeps the extracted release (as `unpacked`) and every other state unchanged.
    let fx = Fx::new();
    fx.pkg("4.2.0", &Spec::default());
    fx.pkg(
        "4.2.1",
        &Spec {
            hook: Some("echo boom >&2; exit 3"),
            filler: 0,
        },
    );
    let store = open(&fx.root);
    store.install(&lookup("4.2.0"), true).unwrap();
    let e = store.install(&lookup("4.2.1"), true).unwrap_err();
    assert!(matches!(e, Error::Activation { .. }), "{e:?}");
    assert_eq!(
        listing(&store),
        "Installed versions:\n* 4.2.1\tunpacked\n* 4.2.0\tpermanent\n"
    );
    assert_consistent(&store);
}

#[test]
fn failing_hook_on_downgrade_leaves_states_unchanged() {
    let fx = Fx::new();
    // 4.2.0's hook accepts the first install (from "none") and fails any other switch.
    fx.pkg(
        "4.2.0",
        &Spec {
            hook: Some("[ \"$1\" = none ] || { echo boom >&2; exit 3; }"),
            filler: 0,
        },
    );
    fx.pkg("4.2.1", &Spec::default());
    let store = open(&fx.root);
    store.install(&lookup("4.2.0"), true).unwrap();
    store.install(&lookup("4.2.1"), true).unwrap();
    let before = snapshot(&fx.root);
    let e = store.downgrade(v("4.2.0")).unwrap_err();
    assert!(e.to_string().contains("boom"), "{e}");
    assert_eq!(
        listing(&store),
        "Installed versions:\n* 4.2.1\tpermanent\n* 4.2.0\told\n"
    );
    assert_eq!(snapshot(&fx.root), before);
}

#[test]
fn hook_past_the_timeout_is_killed_with_its_process_group() {
    let fx = Fx::new();
    let child_pid = fx.path("child.pid");
    let hook_pid = fx.path("hook.pid");
    let hook = format!(
        "echo $$ > '{}'\nsleep 60 &\necho $! > '{}'\necho still working >&2\nsleep 60",
        hook_pid.display(),
        child_pid.display()
    );
    fx.pkg("4.2.0", &Spec::default());
    fx.pkg(
        "4.2.1",
        &Spec {
            hook: Some(&hook),
            filler: 0,
        },
    );
    let store = open_with(&fx.root, |c| {
        c.activate_timeout = Duration::from_millis(500)
    });
    store.install(&lookup("4.2.0"), true).unwrap();
    store.unpack(&lookup("4.2.1")).unwrap();
    let before = snapshot(&fx.root);
    let start = Instant::now();
    let e = store.install(&lookup("4.2.1"), true).unwrap_err();
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(500), "{took:?}");
    assert!(
        took < Duration::from_secs(20),
        "the hook was not killed in time: {took:?}"
    );
    let msg = e.to_string();
    assert!(
        matches!(e, Error::Activation { .. })
            && msg.contains("did not finish within")
            && msg.contains("killed"),
        "{msg}"
    );
    assert!(msg.contains("still working"), "stderr tail missing: {msg}");
    assert_eq!(snapshot(&fx.root), before);
    let pid = |p: &Path| -> i32 { fs::read_to_string(p).unwrap().trim().parse().unwrap() };
    let (hook, child) = (pid(&hook_pid), pid(&child_pid));
    wait_until(Duration::from_secs(10), "the hook to die", || {
        process_dead(hook)
    });
    wait_until(Duration::from_secs(10), "the hook's child to die", || {
        process_dead(child)
    });
}

// ---- the lock ----

#[test]
fn second_writer_fails_fast_while_a_long_activation_holds_the_lock() {
    let fx = Fx::new();
    let started = fx.path("started");
    let go = fx.path("go");
    // Blocks until the test creates `go` (bounded: gives up after ~30 s so nothing hangs).
    let hook = format!(
        "touch '{}'\ni=0\nwhile [ ! -e '{}' ] && [ $i -lt 3000 ]; do sleep 0.01; i=$((i+1)); done",
        started.display(),
        go.display()
    );
    fx.pkg("4.2.0", &Spec::default());
    fx.pkg(
        "4.2.1",
        &Spec {
            hook: Some(&hook),
            filler: 0,
        },
    );
    let store = open(&fx.root);
    store.install(&lookup("4.2.0"), true).unwrap();
    store.unpack(&lookup("4.2.1")).unwrap();

    let holder = {
        let store = store.clone();
        std::thread::spawn(move || store.install(&lookup("4.2.1"), true))
    };
    wait_until(Duration::from_secs(20), "the hook to start", || {
        started.exists()
    });

    // A writer with a short timeout fails with a message naming the holder.
    let impatient = open_with(&fx.root, |c| c.lock_timeout = Duration::from_millis(200));
    let start = Instant::now();
    let e = impatient.make_permanent(v("4.2.0")).unwrap_err();
    assert!(start.elapsed() >= Duration::from_millis(200));
    assert!(start.elapsed() < Duration::from_secs(10));
    let pid = format!("pid {}", std::process::id());
    match &e {
        Error::Locked {
            holder, waited_ms, ..
        } => {
            assert!(
                holder.contains(&pid) && holder.contains("install 4.2.1"),
                "{holder}"
            );
            assert!(*waited_ms >= 200);
        }
        other => panic!("expected Locked, got {other:?}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains("locked by another process") && msg.contains(&pid),
        "{msg}"
    );
    let e = impatient.unpack(&lookup("4.2.0")).unwrap_err();
    assert!(matches!(e, Error::Locked { .. }), "{e:?}");

    // Readers take no lock.
    assert_eq!(
        listing(&impatient),
        "Installed versions:\n* 4.2.1\tunpacked\n* 4.2.0\tpermanent\n"
    );

    // A patient writer waits for the holder and then runs.
    let waiting = Arc::new(AtomicBool::new(false));
    let patient = {
        let store = open_with(&fx.root, |c| c.lock_timeout = Duration::from_secs(60));
        let waiting = waiting.clone();
        std::thread::spawn(move || {
            waiting.store(true, Ordering::SeqCst);
            let r = store.downgrade(v("4.2.0"));
            (r, Instant::now())
        })
    };
    wait_until(
        Duration::from_secs(10),
        "the patient writer to start",
        || waiting.load(Ordering::SeqCst),
    );
    // Give it time to be inside the lock wait (the assertions do not depend on it).
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !patient.is_finished(),
        "the patient writer ran while the lock was held"
    );
    fs::write(&go, b"").unwrap();
    let released = Instant::now();
    holder.join().unwrap().unwrap();
    let (r, finished) = patient.join().unwrap();
    r.unwrap();
    assert!(finished >= released);
    assert_eq!(
        listing(&store),
        "Installed versions:\n* 4.2.1\told\n* 4.2.0\tpermanent\n"
    );
    // And once everything is done, the impatient writer succeeds too.
    impatient.uninstall(v("4.2.1")).unwrap();
    assert_eq!(listing(&store), "Installed versions:\n* 4.2.0\tpermanent\n");
    assert_consistent(&store);
}

// ---- restarts and repairs ----

#[test]
fn reconcile_running_after_a_restart_demotes_the_current_release() {
    let fx = Fx::new();
    fx.pkg("4.2.0", &Spec::default());
    fx.pkg("4.2.1", &Spec::default());
    let store = open(&fx.root);
    store.install(&lookup("4.2.0"), true).unwrap();
    // Nothing current: nothing to do, whatever is reported.
    for reported in ["4.2.0", "4.2.1"] {
        let o = store.reconcile_running(v(reported)).unwrap();
        assert!(!o.changed && o.messages.is_empty(), "{o:?}");
    }
    store.install(&lookup("4.2.1"), false).unwrap();
    // The service still runs the current release: nothing to do.
    let o = store.reconcile_running(v("4.2.1")).unwrap();
    assert!(!o.changed);
    assert_eq!(
        listing(&store),
        "Installed versions:\n* 4.2.1\tcurrent\n* 4.2.0\tpermanent\n"
    );
    // It reports the permanent one: it was restarted.
    let o = store.reconcile_running(v("4.2.0")).unwrap();
    assert!(o.changed);
    assert!(
        msgs(&o).contains("4.2.0") && msgs(&o).contains("4.2.1 is now unpacked"),
        "{o:?}"
    );
    assert_eq!(
        listing(&open(&fx.root)),
        "Installed versions:\n* 4.2.1\tunpacked\n* 4.2.0\tpermanent\n"
    );
    assert_eq!(store.running().unwrap(), Some(v("4.2.0")));
    assert!(!store.reconcile_running(v("4.2.0")).unwrap().changed);
}

#[test]
fn interrupted_operations_are_repaired_in_view_and_on_the_next_write() {
    let fx = Fx::new();
    for ver in ["4.2.0", "4.2.1", "4.2.2"] {
        fx.pkg(ver, &Spec::default());
    }
    let store = open(&fx.root);
    store.install(&lookup("4.2.0"), true).unwrap();
    store.unpack(&lookup("4.2.1")).unwrap();
    let rel = fx.root.join("releases");
    let state_file = rel.join("state.json");

    // An unpack that renamed a complete directory into place but died before the state.
    let dir_422 = rel.join("4.2.2");
    fs::create_dir(&dir_422).unwrap();
    fs::write(
        dir_422.join("release.toml"),
        "name = \"emqx\"\nversion = \"4.2.2\"\n",
    )
    .unwrap();
    // An uninstall that renamed the directory away but died before writing the state.
    fs::rename(rel.join("4.2.1"), rel.join(".trash-4.2.1-999-0")).unwrap();
    // An extraction that died half-way, and a state write that died before its rename.
    fs::create_dir_all(rel.join(".unpack-4.2.3-999-1/bin")).unwrap();
    fs::write(
        rel.join(".unpack-4.2.3-999-1/release.toml"),
        "name = \"emqx\"\nversion = \"4.2.3\"\n",
    )
    .unwrap();
    fs::write(rel.join(".state.json.tmp-999-2"), b"{\"partial").unwrap();

    // Readers see the repaired view without writing anything.
    let before = snapshot(&fx.root);
    assert_eq!(
        listing(&store),
        "Installed versions:\n* 4.2.2\tunpacked\n* 4.2.0\tpermanent\n"
    );
    assert_eq!(snapshot(&fx.root), before);
    assert!(fs::read_to_string(&state_file).unwrap().contains("4.2.1"));

    // The next writer (even a no-op) clears the debris and persists the repair.
    let o = store.install(&lookup("4.2.0"), true).unwrap();
    assert!(!o.changed);
    assert_consistent(&store);
    let state = fs::read_to_string(&state_file).unwrap();
    assert!(
        !state.contains("4.2.1") && state.contains("4.2.2"),
        "{state}"
    );
    assert_eq!(
        listing(&store),
        "Installed versions:\n* 4.2.2\tunpacked\n* 4.2.0\tpermanent\n"
    );
}

#[test]
fn a_stray_directory_with_a_release_name_blocks_unpack_without_damage() {
    let fx = Fx::new();
    fx.pkg("4.2.0", &Spec::default());
    fx.pkg("4.2.1", &Spec::default());
    let store = open(&fx.root);
    store.install(&lookup("4.2.0"), true).unwrap();
    let stray = fx.root.join("releases/4.2.1");
    fs::create_dir(&stray).unwrap();
    fs::write(stray.join("operator-notes.txt"), b"keep me").unwrap();
    let before = snapshot(&fx.root);
    assert_eq!(listing(&store), "Installed versions:\n* 4.2.0\tpermanent\n");
    let e = store.unpack(&lookup("4.2.1")).unwrap_err();
    assert!(
        matches!(e, Error::Corrupt { .. }) && e.to_string().contains("move it away"),
        "{e:?}"
    );
    assert_eq!(snapshot(&fx.root), before);
}

#[test]
fn a_lost_permanent_release_or_garbage_state_is_reported_not_guessed() {
    let fx = Fx::new();
    fx.pkg("4.2.0", &Spec::default());
    let store = open(&fx.root);
    store.install(&lookup("4.2.0"), true).unwrap();
    let rel = fx.root.join("releases");
    fs::rename(rel.join("4.2.0"), fx.path("moved")).unwrap();
    let e = store.view().unwrap_err();
    assert!(
        matches!(e, Error::Corrupt { .. }) && e.to_string().contains("permanent release 4.2.0"),
        "{e}"
    );
    let e = store.uninstall(v("4.2.0")).unwrap_err();
    assert!(matches!(e, Error::Corrupt { .. }), "{e:?}");
    fs::rename(fx.path("moved"), rel.join("4.2.0")).unwrap();
    assert_eq!(listing(&store), "Installed versions:\n* 4.2.0\tpermanent\n");

    fs::write(rel.join("state.json"), b"not json").unwrap();
    let e = store.versions().unwrap_err();
    assert!(
        matches!(e, Error::Corrupt { .. }) && e.to_string().contains("unreadable"),
        "{e}"
    );
    // A state that breaks the invariants is refused too.
    fs::write(
        rel.join("state.json"),
        br#"{"format":1,"releases":{"4.2.0":{"state":"old","name":"emqx"}}}"#,
    )
    .unwrap();
    let e = store.versions().unwrap_err();
    assert!(e.to_string().contains("none is permanent"), "{e}");
    fs::write(rel.join("state.json"), br#"{"format":2,"releases":{}}"#).unwrap();
    let e = store.versions().unwrap_err();
    assert!(e.to_string().contains("format 2"), "{e}");
}

/// A root given as a relative path (as `--root-dir ./node1` would give it) must work the same,
/// including the release's own hook, which runs with its cwd set to ROOT: the paths it gets in
/// `ORCH_ROOT_DIR`/`ORCH_RELEASE_DIR` must be valid from there.
#[test]
fn relative_root_dir_gives_the_hook_usable_paths() {
    // Under the target dir, so that the relative path from the test's cwd (the crate dir)
    // does not happen to resolve from ROOT too.
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let base = tmp.path().canonicalize().unwrap();
    let root = base.join("root");
    let log = base.join("hook.log");
    let hook = format!(
        "{}\n[ -f \"$ORCH_RELEASE_DIR/release.toml\" ] && [ -d \"$ORCH_ROOT_DIR/releases\" ] \
         && echo usable >> '{}' || echo unusable >> '{}'",
        hook_logging_to(&log),
        log.display(),
        log.display()
    );
    let spec = Spec {
        hook: Some(&hook),
        filler: 0,
    };
    for ver in ["4.2.0", "4.2.1"] {
        build_pkg(&base, &root.join("releases"), ver, &spec);
    }
    let cwd = std::env::current_dir().unwrap().canonicalize().unwrap();
    let common = cwd
        .ancestors()
        .find(|a| root.starts_with(a))
        .unwrap()
        .to_path_buf();
    let mut rel = PathBuf::new();
    for _ in cwd.strip_prefix(&common).unwrap().components() {
        rel.push("..");
    }
    rel.push(root.strip_prefix(&common).unwrap());
    assert!(
        rel.is_relative() && rel.join("releases").is_dir(),
        "{rel:?}"
    );

    let store = open(&rel);
    store.install(&lookup("4.2.0"), true).unwrap();
    store.install(&lookup("4.2.1"), true).unwrap();
    let got = fs::read_to_string(&log).unwrap();
    let r = root.display().to_string();
    assert_eq!(
        got,
        format!(
            "2|none|4.2.0|{r}|{r}|{r}/releases/4.2.0|none|4.2.0|\nusable\n\
             2|4.2.0|4.2.1|{r}|{r}|{r}/releases/4.2.1|4.2.0|4.2.1|\nusable\n"
        ),
        "the hook must get absolute paths (it runs in ROOT)"
    );
}

/// Regression (found by the chaos runs): an agent killed after the activation hook switched the
/// service but before the switch was recorded restarts with the new release `unpacked` while the
/// service runs it. Reconciling records the switch, so a rollback's downgrade really switches
/// back instead of answering "already current".
#[test]
fn reconcile_running_records_a_switch_that_finished_unrecorded() {
    let fx = Fx::new();
    fx.pkg("4.2.0", &Spec::default());
    fx.pkg("4.2.1", &Spec::default());
    let store = open(&fx.root);
    store.install(&lookup("4.2.0"), true).unwrap();
    store.unpack(&lookup("4.2.1")).unwrap();
    let o = store.reconcile_running(v("4.2.1")).unwrap();
    assert!(o.changed, "{o:?}");
    assert!(
        msgs(&o).contains("a switch to it finished but was not recorded"),
        "{o:?}"
    );
    assert_eq!(o.activation, None, "the hook already ran: {o:?}");
    assert_eq!(
        listing(&open(&fx.root)),
        "Installed versions:\n* 4.2.1\tcurrent\n* 4.2.0\tpermanent\n"
    );
    assert!(!store.reconcile_running(v("4.2.1")).unwrap().changed);
    // The rollback's downgrade now switches the service back.
    let o = store.downgrade(v("4.2.0")).unwrap();
    assert!(o.changed && o.activation.is_some(), "{o:?}");
    assert_eq!(store.running().unwrap(), Some(v("4.2.0")));
    // An unknown version says nothing certain: nothing changes.
    assert!(!store.reconcile_running(v("4.2.9")).unwrap().changed);
    assert_consistent(&store);
}
