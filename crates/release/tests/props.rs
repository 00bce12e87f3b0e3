//! Property tests: random command sequences against a real store in a temp dir, compared
//! step by step with `rules::plan` applied to an in-memory table (the model). After every
//! command: the store's table equals the model, the invariants hold, `versions` matches the
//! release directories on disk, and no temp debris is left. A second, pure property drives the
//! rules alone with many more cases.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use orch_release::rules::{self, Op, Plan, Releases};
use orch_release::{Activation, Error, PackageSource, Store};
use orch_types::{ReleaseState, Version};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

const POOL: [&str; 5] = ["4.2.0", "4.2.1", "4.2.2", "4.2.3", "4.3.0"];
/// 4.2.2 ships a hook that succeeds; 4.2.3 one that always fails; the others none.
const OK_HOOK: &str = "4.2.2";
const BAD_HOOK: &str = "4.2.3";
/// Packages also present in `ROOT/releases/` (so `Lookup` finds them).
const IN_ROOT: [&str; 2] = ["4.2.0", "4.2.1"];

#[derive(Debug, Clone)]
enum Cmd {
    /// `unpack --package FILE`
    Unpack(usize),
    /// `install/upgrade [--no-permanent] --package FILE`
    Install(usize, bool),
    /// `install/upgrade [--no-permanent] V` (looked up in ROOT/releases)
    InstallLookup(usize, bool),
    Permanent(usize),
    Downgrade(usize),
    Uninstall(usize),
    /// The service reports that it runs this version.
    Reported(usize),
}

fn cmd() -> impl Strategy<Value = Cmd> {
    let i = || 0..POOL.len();
    prop_oneof![
        2 => i().prop_map(Cmd::Unpack),
        4 => (i(), any::<bool>()).prop_map(|(i, p)| Cmd::Install(i, p)),
        2 => (i(), any::<bool>()).prop_map(|(i, p)| Cmd::InstallLookup(i, p)),
        2 => i().prop_map(Cmd::Permanent),
        2 => i().prop_map(Cmd::Downgrade),
        2 => i().prop_map(Cmd::Uninstall),
        1 => i().prop_map(Cmd::Reported),
    ]
}

struct Packages {
    _dir: tempfile::TempDir,
    zips: Vec<PathBuf>,
}

impl Packages {
    fn build() -> Packages {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("pkgs");
        let zips = POOL
            .iter()
            .map(|ver| {
                let hook = match *ver {
                    OK_HOOK => Some("exit 0"),
                    BAD_HOOK => Some("echo refusing >&2; exit 1"),
                    _ => None,
                };
                build_pkg(dir.path(), &out, ver, &Spec { hook, filler: 12 })
            })
            .collect();
        Packages { _dir: dir, zips }
    }
}

fn check_disk(store: &Store, model: &Releases) -> Result<(), TestCaseError> {
    let view = store
        .view()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&view, model, "store table vs model");
    view.check_invariants()
        .map_err(|e| TestCaseError::fail(e.0))?;
    prop_assert_eq!(
        listing(store),
        orch_types::format_versions(&model.entries())
    );
    let dirs: Vec<Version> = release_dirs(store).into_iter().collect();
    let known: Vec<Version> = model.releases.keys().copied().collect();
    prop_assert_eq!(dirs, known, "release directories vs versions");
    prop_assert_eq!(debris(store), Vec::<String>::new());
    Ok(())
}

fn run_case(pkgs: &Packages, cmds: &[Cmd]) -> Result<(), TestCaseError> {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let rel = root.join("releases");
    fs::create_dir_all(&rel).unwrap();
    for ver in IN_ROOT {
        let zip = &pkgs.zips[POOL.iter().position(|p| *p == ver).unwrap()];
        let name = zip.file_name().unwrap();
        fs::copy(zip, rel.join(name)).unwrap();
        let side = orch_release::package::sidecar_path(zip);
        fs::copy(&side, rel.join(side.file_name().unwrap())).unwrap();
    }
    let store = open(&root);
    let mut model = Releases::default();
    let mut installed_once = false;
    for (step, c) in cmds.iter().enumerate() {
        let ctx = format!("step {step}: {c:?} on {:?}", model.entries());
        let file = |i: usize| PackageSource::File {
            path: pkgs.zips[i].clone(),
            sha256: None,
        };
        let ver = |i: usize| v(POOL[i]);
        // The package file a step would unpack, as its "attempting to unpack" line names it.
        let outside = |i: usize| Some(pkgs.zips[i].display().to_string());
        if let Cmd::Reported(i) = c {
            let r = store.reconcile_running(ver(*i)).unwrap();
            let expected = orch_release::rules::reconcile_reported(&model, ver(*i));
            prop_assert_eq!(r.changed, expected.is_some(), "{}", ctx);
            if let Some((next, why)) = expected {
                prop_assert_eq!(&r.messages, &vec![why], "{}", ctx);
                model = next;
            }
            check_disk(&store, &model)?;
            continue;
        }
        let (op, pkg_file, result) = match c {
            Cmd::Unpack(i) => (Op::Unpack(ver(*i)), outside(*i), store.unpack(&file(*i))),
            Cmd::Install(i, p) => (
                Op::Install {
                    version: ver(*i),
                    permanent: *p,
                },
                outside(*i),
                store.install(&file(*i), *p),
            ),
            Cmd::InstallLookup(i, p) => {
                let in_root = IN_ROOT.contains(&POOL[*i]);
                let known = model.state(&ver(*i)).is_some();
                let r = store.install(&PackageSource::Lookup(ver(*i)), *p);
                if !known && !in_root {
                    prop_assert!(
                        matches!(r, Err(Error::PackageNotFound { .. })),
                        "{}: {:?}",
                        ctx,
                        r
                    );
                    check_disk(&store, &model)?;
                    continue;
                }
                (
                    Op::Install {
                        version: ver(*i),
                        permanent: *p,
                    },
                    (!known).then(|| format!("releases/emqx-{}.zip", POOL[*i])),
                    r,
                )
            }
            Cmd::Permanent(i) => (Op::Permanent(ver(*i)), None, store.make_permanent(ver(*i))),
            Cmd::Downgrade(i) => (Op::Downgrade(ver(*i)), None, store.downgrade(ver(*i))),
            Cmd::Uninstall(i) => (Op::Uninstall(ver(*i)), None, store.uninstall(ver(*i))),
            Cmd::Reported(_) => unreachable!(),
        };
        let pkg = pkg_file
            .as_deref()
            .map(|file| rules::PackageRef { name: "emqx", file });
        match rules::plan_package(&model, op, pkg) {
            Err(msg) => match result {
                Err(Error::Refused(m)) => prop_assert_eq!(m, msg, "{}", ctx),
                other => prop_assert!(
                    false,
                    "{}: expected refusal {:?}, got {:?}",
                    ctx,
                    msg,
                    other
                ),
            },
            Ok(Plan::Already(msg)) => {
                let o = result.map_err(|e| TestCaseError::fail(format!("{ctx}: {e}")))?;
                prop_assert!(!o.changed, "{}", ctx);
                prop_assert_eq!(o.messages, vec![msg], "{}", ctx);
                prop_assert!(o.notes.is_empty(), "{}", ctx);
                prop_assert_eq!(o.activation, None, "{}", ctx);
            }
            Ok(Plan::Apply(change)) => {
                let to_bad = change.switch.is_some_and(|s| s.to == v(BAD_HOOK));
                if to_bad {
                    match result {
                        Err(Error::Activation { to, reason, .. }) => {
                            prop_assert_eq!(to, v(BAD_HOOK));
                            let reason = reason.to_string();
                            prop_assert!(reason.contains("refusing"), "{}", reason);
                        }
                        other => prop_assert!(
                            false,
                            "{}: expected activation failure, got {:?}",
                            ctx,
                            other
                        ),
                    }
                    // Only the unpack (recorded before the switch) survives a failed switch.
                    if let Some(u) = change.unpack {
                        model.releases.insert(
                            u,
                            rules::Record {
                                state: ReleaseState::Unpacked,
                                name: "emqx".into(),
                            },
                        );
                    }
                } else {
                    let o = result.map_err(|e| TestCaseError::fail(format!("{ctx}: {e}")))?;
                    prop_assert!(o.changed, "{}", ctx);
                    let want = change.messages.clone();
                    let mut want_notes = Vec::<String>::new();
                    match change.switch {
                        None => prop_assert_eq!(&o.activation, &None, "{}", ctx),
                        Some(s) if s.to == v(OK_HOOK) => {
                            prop_assert!(
                                matches!(o.activation, Some(Activation::Hook(_))),
                                "{}",
                                ctx
                            )
                        }
                        Some(_) => {
                            prop_assert_eq!(&o.activation, &Some(Activation::StateOnly), "{}", ctx);
                            want_notes.push(
                                "No activation hook: only the recorded state changed (state-only switch)"
                                    .to_string(),
                            );
                        }
                    }
                    prop_assert_eq!(o.messages, want, "{}", ctx);
                    prop_assert_eq!(o.notes, want_notes, "{}", ctx);
                    if change.switch.is_some() {
                        installed_once = true;
                    }
                    model = change.next;
                }
            }
        }
        check_disk(&store, &model).map_err(|e| TestCaseError::fail(format!("{ctx}: {e}")))?;
        if installed_once {
            let perms = model
                .releases
                .values()
                .filter(|r| r.state == ReleaseState::Permanent)
                .count();
            prop_assert_eq!(perms, 1, "{}: exactly one permanent once installed", ctx);
        }
    }
    // A fresh handle sees the same durable state.
    check_disk(&open(&root), &model)?;
    Ok(())
}

#[test]
fn random_command_sequences_match_the_rules_on_a_real_store() {
    let pkgs = Packages::build();
    let mut runner = TestRunner::new(Config {
        cases: 64,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&prop::collection::vec(cmd(), 1..20), |cmds| {
        run_case(&pkgs, &cmds)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

// ---- the rules alone ----

fn op_of(c: &Cmd) -> Option<Op> {
    let ver = |i: usize| v(POOL[i]);
    Some(match *c {
        Cmd::Unpack(i) => Op::Unpack(ver(i)),
        Cmd::Install(i, p) | Cmd::InstallLookup(i, p) => Op::Install {
            version: ver(i),
            permanent: p,
        },
        Cmd::Permanent(i) => Op::Permanent(ver(i)),
        Cmd::Downgrade(i) => Op::Downgrade(ver(i)),
        Cmd::Uninstall(i) => Op::Uninstall(ver(i)),
        Cmd::Reported(_) => return None,
    })
}

proptest! {
    #![proptest_config(Config { cases: 2000, failure_persistence: None, ..Config::default() })]

    /// Every reachable table satisfies the invariants; every applied step, repeated, is a
    /// no-op that says so (or, for uninstall, a refusal because it is gone); a patch check
    /// refusal names both versions.
    #[test]
    fn rules_keep_invariants_and_repeats_are_no_ops(cmds in prop::collection::vec(cmd(), 1..40)) {
        let mut t = Releases::default();
        for c in &cmds {
            let Some(op) = op_of(c) else {
                let mut u = t.clone();
                u.restarted();
                prop_assert!(u.check_invariants().is_ok());
                t = u;
                continue;
            };
            match rules::plan(&t, op, Some("emqx")) {
                Err(rules::Refusal(msg)) => {
                    if msg.contains("patch-level") {
                        let running = t.running().unwrap().to_string();
                        prop_assert!(msg.contains(&running), "{}", msg);
                    }
                }
                Ok(Plan::Already(_)) => {}
                Ok(Plan::Apply(change)) => {
                    prop_assert!(change.next.check_invariants().is_ok(), "{:?} -> {:?}", op, change.next);
                    if let Some(s) = change.switch {
                        prop_assert_eq!(s.from, t.running());
                        prop_assert_eq!(change.next.running(), Some(s.to));
                    }
                    if t.permanent().is_some() || change.switch.is_some() {
                        prop_assert!(change.next.permanent().is_some());
                    }
                    t = change.next;
                    match (op, rules::plan(&t, op, Some("emqx"))) {
                        (Op::Uninstall(_), r) => prop_assert!(r.is_err()),
                        (_, r) => prop_assert!(matches!(r, Ok(Plan::Already(_))), "{:?} repeated: {:?}", op, r),
                    }
                }
            }
        }
    }
}

/// `versions` on disk never lists a release whose directory is missing, even for a store that
/// was copied around: quick guard that `release_dirs` and `view` agree on an empty store.
#[test]
fn empty_store_lists_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(&tmp.path().join("root"));
    check_disk(&store, &Releases::default()).unwrap();
    assert!(Path::new(store.releases_dir()).is_dir());
}
