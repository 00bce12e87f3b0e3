//! Crash test: a child process (this test binary, re-executed to run `crash_child`) loops
//! through upgrades, downgrades, unpacks and uninstalls on a store whose hook does a little
//! work; the parent SIGKILLs it at a random moment (0-30 ms after it starts looping), at least
//! 200 times. After every kill the store must open cleanly, satisfy the invariants, list exactly
//! the release directories on disk, and accept a mutating operation that leaves no debris.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use orch_release::{Error, PackageSource, Store, StoreConfig};

const ROOT_ENV: &str = "ORCH_RELEASE_CRASH_ROOT";
const READY_ENV: &str = "ORCH_RELEASE_CRASH_READY";
const KILLS: usize = 200;

/// The child's script; it starts at a random position so that every step gets killed.
enum Step {
    Unpack(&'static str),
    Install(&'static str, bool),
    Permanent(&'static str),
    Downgrade(&'static str),
    Uninstall(&'static str),
}

const SCRIPT: [Step; 12] = [
    Step::Unpack("4.2.3"),
    Step::Install("4.2.1", false),
    Step::Permanent("4.2.1"),
    Step::Install("4.2.2", true),
    Step::Downgrade("4.2.1"),
    Step::Uninstall("4.2.3"),
    Step::Downgrade("4.2.0"),
    Step::Uninstall("4.2.2"),
    Step::Install("4.2.1", true),
    Step::Downgrade("4.2.0"),
    Step::Install("4.2.2", false),
    Step::Downgrade("4.2.0"),
];

/// Runs only when re-executed by `sigkill_at_random_moments_leaves_a_consistent_store`.
#[test]
fn crash_child() {
    let (Some(root), Some(ready)) = (std::env::var_os(ROOT_ENV), std::env::var_os(READY_ENV))
    else {
        return;
    };
    let store = Store::open(StoreConfig::new(PathBuf::from(root))).unwrap();
    let mut rng = fastrand::Rng::new();
    let mut i = rng.usize(..SCRIPT.len());
    fs::write(ready, b"looping").unwrap();
    // Bounded even if the parent vanished without killing us.
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let r = match SCRIPT[i % SCRIPT.len()] {
            Step::Unpack(s) => store.unpack(&PackageSource::Lookup(v(s))),
            Step::Install(s, p) => store.install(&PackageSource::Lookup(v(s)), p),
            Step::Permanent(s) => store.make_permanent(v(s)),
            Step::Downgrade(s) => store.downgrade(v(s)),
            Step::Uninstall(s) => store.uninstall(v(s)),
        };
        match r {
            Ok(_) | Err(Error::Refused(_)) => {}
            Err(e) => panic!("child: unexpected error: {e}"),
        }
        i += 1;
    }
}

/// Kills (SIGKILL) and reaps the child when dropped, also on panic.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn child_log(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn sigkill_at_random_moments_leaves_a_consistent_store() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().canonicalize().unwrap();
    let root = base.join("root");
    let rel = root.join("releases");
    // A hook that does a little work (a few processes and a rename).
    let hook = "echo \"$1 -> $2\" > \"$ORCH_ROOT_DIR/active.tmp\"\n\
                mv \"$ORCH_ROOT_DIR/active.tmp\" \"$ORCH_ROOT_DIR/active\"";
    for ver in ["4.2.0", "4.2.1", "4.2.2", "4.2.3"] {
        build_pkg(
            &base,
            &rel,
            ver,
            &Spec {
                hook: Some(hook),
                filler: 150,
            },
        );
    }
    let store = open(&root);
    store
        .install(&PackageSource::Lookup(v("4.2.0")), true)
        .unwrap();

    let exe = std::env::current_exe().unwrap();
    let ready = base.join("ready");
    let log = base.join("child.log");
    let mut rng = fastrand::Rng::new();
    let mut seen: std::collections::BTreeMap<&str, usize> = Default::default();
    let start = Instant::now();
    for kill in 0..KILLS {
        let _ = fs::remove_file(&ready);
        let child = Command::new(&exe)
            .args(["--exact", "crash_child", "--nocapture", "--include-ignored"])
            .env(ROOT_ENV, &root)
            .env(READY_ENV, &ready)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut guard = Guard(child);
        let wait_start = Instant::now();
        while !ready.exists() {
            if let Some(st) = guard.0.try_wait().unwrap() {
                panic!(
                    "kill {kill}: child exited early ({st}):\n{}",
                    child_log(&log)
                );
            }
            assert!(
                wait_start.elapsed() < Duration::from_secs(30),
                "kill {kill}: child never started"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_micros(rng.u64(0..=30_000)));
        if let Some(st) = guard.0.try_wait().unwrap() {
            panic!(
                "kill {kill}: child exited by itself ({st}):\n{}",
                child_log(&log)
            );
        }
        drop(guard); // SIGKILL + reap

        for d in debris(&store) {
            let kind = [".unpack-", ".trash-", ".activate-", ".state.json.tmp-"]
                .into_iter()
                .find(|p| d.starts_with(p))
                .unwrap();
            *seen.entry(kind).or_default() += 1;
        }
        // Opens cleanly and is consistent without any writer having run.
        let after = open(&root);
        let table = after
            .view()
            .unwrap_or_else(|e| panic!("kill {kill}: view failed: {e}"));
        table
            .check_invariants()
            .unwrap_or_else(|e| panic!("kill {kill}: {e}"));
        let listed: std::collections::BTreeSet<_> = table.releases.keys().copied().collect();
        assert_eq!(
            listed,
            release_dirs(&after),
            "kill {kill}: versions vs dirs"
        );
        assert!(
            table.permanent().is_some(),
            "kill {kill}: no permanent release"
        );
        // Every listed release directory is complete (the manifest is the last check, so
        // test a file that the package holds).
        for ver in &listed {
            assert!(
                rel.join(ver.to_string()).join("bin/app").is_file(),
                "kill {kill}: {ver} listed but incomplete"
            );
        }
        // A writer repairs whatever the kill interrupted and leaves no debris.
        let running = table.running().unwrap();
        after
            .install(&PackageSource::Lookup(running), true)
            .unwrap_or_else(|e| panic!("kill {kill}: install {running} failed: {e}"));
        assert_consistent(&after);
        if kill % 3 == 0 {
            after
                .unpack(&PackageSource::Lookup(v("4.2.3")))
                .unwrap_or_else(|e| panic!("kill {kill}: unpack failed: {e}"));
            assert_consistent(&after);
        }
    }
    println!(
        "{KILLS} kills in {:.1?}; debris found after kills (then cleaned): {seen:?}; final: {}",
        start.elapsed(),
        listing(&store).replace('\n', " | ")
    );
}
