//! Drain hooks in the release store: the pre-step hook runs before every switch and can stop
//! it, the drain is recorded, and the post-step hook runs once after the gate.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::*;
use orch_release::store::DRAINED_FILE;
use orch_release::{Error, PackageSource, Store};

struct Fx {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    root: PathBuf,
}

impl Fx {
    /// A root with 4.2.0 permanent (installed before any drain hook is configured) and the
    /// 4.2.1 package beside it.
    fn new() -> Fx {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().canonicalize().unwrap();
        let root = base.join("root");
        let releases = root.join("releases");
        fs::create_dir_all(&releases).unwrap();
        fs::create_dir_all(base.join("work")).unwrap();
        for ver in ["4.2.0", "4.2.1"] {
            build_pkg(&base.join("work"), &releases, ver, &Spec::default());
        }
        open(&root)
            .install(&PackageSource::Lookup(v("4.2.0")), true)
            .unwrap();
        Fx {
            _tmp: tmp,
            base,
            root,
        }
    }

    fn log(&self) -> PathBuf {
        self.base.join("hooks.log")
    }

    fn logged(&self) -> Vec<String> {
        fs::read_to_string(self.log())
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// `sh -c SCRIPT NAME`: logs `NAME FROM TO ORCH_TO_VERSION` and ends with `exit`.
    fn cmd(&self, name: &str, exit: u8) -> Vec<String> {
        let script = format!(
            "echo \"$0 $1 $2 $ORCH_TO_VERSION\" >> '{}'; echo \"$0 says hello\"; exit {exit}",
            self.log().display()
        );
        vec!["/bin/sh".into(), "-c".into(), script, name.into()]
    }

    fn store(&self, pre: Option<Vec<String>>, post: Option<Vec<String>>) -> Store {
        let activate = self.cmd("activate", 0);
        open_with(&self.root, |c| {
            c.pre_switch_cmd = pre;
            c.post_switch_cmd = post;
            c.activate_cmd = Some(activate);
        })
    }

    /// Writes `releases/4.2.1/hooks/NAME` as the package would ship it.
    fn release_hook(&self, name: &str) {
        let dir = self.root.join("releases/4.2.1/hooks");
        fs::create_dir_all(&dir).unwrap();
        let hook = dir.join(name);
        let body = format!(
            "#!/bin/sh\necho \"pkg-{name} $1 $2 $ORCH_RELEASE_DIR\" >> '{}'\n",
            self.log().display()
        );
        fs::write(&hook, body).unwrap();
        fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();
    }
}

fn drained(root: &Path) -> bool {
    root.join(DRAINED_FILE).exists()
}

#[test]
fn a_failing_pre_step_hook_stops_the_switch_and_changes_no_state() {
    let fx = Fx::new();
    let store = fx.store(Some(fx.cmd("pre", 1)), Some(fx.cmd("post", 0)));
    store.unpack(&PackageSource::Lookup(v("4.2.1"))).unwrap();
    let before = listing(&store);
    let e = store
        .install(&PackageSource::Lookup(v("4.2.1")), false)
        .unwrap_err();
    assert!(matches!(e, Error::PreSwitch { .. }), "{e:?}");
    let msg = e.to_string();
    for part in [
        "pre-step hook for 4.2.0 -> 4.2.1 failed",
        "exit code 1",
        "output: pre says hello",
        "the switch was not attempted",
    ] {
        assert!(msg.contains(part), "{part:?} in {msg}");
    }
    assert_eq!(listing(&store), before);
    assert_eq!(store.running().unwrap(), Some(v("4.2.0")));
    // Neither the activation nor the post-step hook ran, and no drain is recorded.
    assert_eq!(fx.logged(), vec!["pre 4.2.0 4.2.1 4.2.1"]);
    assert!(!drained(&fx.root));
    assert!(!store.after_gate(v("4.2.0")).unwrap().changed);
    assert_eq!(fx.logged().len(), 1);
}

#[test]
fn hooks_run_in_order_and_post_step_runs_once_per_switch() {
    let fx = Fx::new();
    let store = fx.store(Some(fx.cmd("pre", 0)), Some(fx.cmd("post", 0)));
    let o = store
        .install(&PackageSource::Lookup(v("4.2.1")), false)
        .unwrap();
    assert_eq!(o.hooks, vec!["pre-switch", "activate"]);
    assert!(drained(&fx.root));
    // An agent restart reopens the store: the recorded drain is still there.
    let store = fx.store(Some(fx.cmd("pre", 0)), Some(fx.cmd("post", 0)));
    let o = store.after_gate(v("4.2.1")).unwrap();
    assert!(o.changed);
    assert_eq!(o.hooks, vec!["post-switch"]);
    assert!(!drained(&fx.root));
    // A second gate pass (a bake, a retry) does not run it again.
    assert!(!store.after_gate(v("4.2.1")).unwrap().changed);
    // A switch back (a rollback) is drained too.
    store.downgrade(v("4.2.0")).unwrap();
    store.after_gate(v("4.2.0")).unwrap();
    assert_eq!(
        fx.logged(),
        vec![
            "pre 4.2.0 4.2.1 4.2.1",
            "activate 4.2.0 4.2.1 4.2.1",
            "post 4.2.0 4.2.1 4.2.1",
            "pre 4.2.1 4.2.0 4.2.0",
            "activate 4.2.1 4.2.0 4.2.0",
            "post 4.2.1 4.2.0 4.2.0",
        ]
    );
}

#[test]
fn the_packages_own_hooks_run_when_no_command_is_configured() {
    let fx = Fx::new();
    let store = fx.store(None, None);
    store.unpack(&PackageSource::Lookup(v("4.2.1"))).unwrap();
    fx.release_hook("pre-switch");
    fx.release_hook("post-switch");
    store
        .install(&PackageSource::Lookup(v("4.2.1")), false)
        .unwrap();
    store.after_gate(v("4.2.1")).unwrap();
    let dir = fx.root.join("releases/4.2.1").display().to_string();
    assert_eq!(
        fx.logged(),
        vec![
            format!("pkg-pre-switch 4.2.0 4.2.1 {dir}"),
            "activate 4.2.0 4.2.1 4.2.1".to_string(),
            format!("pkg-post-switch 4.2.0 4.2.1 {dir}"),
        ]
    );
}

#[test]
fn a_post_step_hook_alone_is_recorded_and_its_failure_kept_for_a_retry() {
    let fx = Fx::new();
    let store = fx.store(None, Some(fx.cmd("post", 3)));
    store
        .install(&PackageSource::Lookup(v("4.2.1")), false)
        .unwrap();
    assert!(
        drained(&fx.root),
        "a post-step hook alone still needs the record"
    );
    let e = store.after_gate(v("4.2.1")).unwrap_err();
    assert!(matches!(e, Error::PostSwitch { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("post-step hook after the health gate on 4.2.1")
            && msg.contains("exit code 3")
            && msg.contains("post says hello"),
        "{msg}"
    );
    assert!(drained(&fx.root), "kept: a retry runs the hook again");
    let store = fx.store(None, Some(fx.cmd("post", 0)));
    assert!(store.after_gate(v("4.2.1")).unwrap().changed);
    assert!(!drained(&fx.root));
    // No hook at all: nothing recorded.
    let store = fx.store(None, None);
    store.downgrade(v("4.2.0")).unwrap();
    assert!(!drained(&fx.root));
}
