//! The release state rules, pure: a table of releases and their states, and for each operation
//! either a refusal, "already done", or the exact next table plus the side effects the store
//! must perform (unpack, activate, delete). No I/O, so every row is unit- and property-tested.
//!
//! States follow Erlang/OTP's release_handler: at most one `current` (running, not permanent),
//! exactly one `permanent` once anything was installed, and the running release is the current
//! one if there is one, else the permanent one.

use std::collections::BTreeMap;

use orch_types::{ReleaseState, Version, VersionEntry};
use serde::{Deserialize, Serialize};

/// Why the rules refuse an operation or a table: one sentence for the operator, saying what
/// holds and what to do instead. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

/// Callers that keep refusals as text (simulations in other crates' tests) use `?` into a
/// `String`.
impl From<Refusal> for String {
    fn from(r: Refusal) -> String {
        r.0
    }
}

/// Everything the store knows about one release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub state: ReleaseState,
    /// Package name the release came from (`emqx` for `emqx-4.2.1.zip`).
    pub name: String,
}

/// The table of releases, keyed by version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Releases {
    pub releases: BTreeMap<Version, Record>,
}

/// A node-layer operation on a known version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Unpack(Version),
    /// `install`/`upgrade`; `permanent: false` is `--no-permanent`.
    Install {
        version: Version,
        permanent: bool,
    },
    Permanent(Version),
    Downgrade(Version),
    Uninstall(Version),
}

/// The hot switch the store must perform before committing the new table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Switch {
    /// `None` on a first install: nothing runs yet.
    pub from: Option<Version>,
    pub to: Version,
}

/// What applying an operation means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// The result already holds; succeed without change and say so.
    Already(String),
    Apply(Change),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The version is unknown and its package must be unpacked first.
    pub unpack: Option<Version>,
    /// The running service must switch before `next` is committed.
    pub switch: Option<Switch>,
    /// `releases/<v>` must be removed (uninstall).
    pub delete: Option<Version>,
    /// The table once the change is done.
    pub next: Releases,
    /// What happened, in order, in EMQX 4.x's own words (the lines its runbooks grep): the
    /// `node` commands print exactly these on stdout.
    pub messages: Vec<String>,
}

/// The package an unknown version would be unpacked from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackageRef<'a> {
    /// Package name (`emqx` for `emqx-4.2.1.zip`), recorded with the release.
    pub name: &'a str,
    /// The file as EMQX names it in "attempting to unpack": relative to the root when it is
    /// inside it (`releases/emqx-4.2.1.zip`), else the path as given.
    pub file: &'a str,
}

impl Releases {
    pub fn state(&self, v: &Version) -> Option<ReleaseState> {
        self.releases.get(v).map(|r| r.state)
    }

    fn find(&self, st: ReleaseState) -> Option<Version> {
        self.releases
            .iter()
            .find(|(_, r)| r.state == st)
            .map(|(v, _)| *v)
    }

    pub fn current(&self) -> Option<Version> {
        self.find(ReleaseState::Current)
    }

    pub fn permanent(&self) -> Option<Version> {
        self.find(ReleaseState::Permanent)
    }

    /// The release the service runs: the current one, else the permanent one.
    pub fn running(&self) -> Option<Version> {
        self.current().or_else(|| self.permanent())
    }

    /// Newest first, as `versions` prints them.
    pub fn entries(&self) -> Vec<VersionEntry> {
        self.releases
            .iter()
            .rev()
            .map(|(v, r)| VersionEntry {
                version: *v,
                state: r.state,
            })
            .collect()
    }

    fn set(&mut self, v: Version, st: ReleaseState) {
        if let Some(r) = self.releases.get_mut(&v) {
            r.state = st;
        }
    }

    /// The invariants every reachable table satisfies; `Err` names the first one broken.
    pub fn check_invariants(&self) -> Result<(), Refusal> {
        let count = |st| self.releases.values().filter(|r| r.state == st).count();
        let (cur, perm, old) = (
            count(ReleaseState::Current),
            count(ReleaseState::Permanent),
            count(ReleaseState::Old),
        );
        if cur > 1 {
            return Err(Refusal(format!(
                "{cur} releases are current; at most one may be"
            )));
        }
        if perm > 1 {
            return Err(Refusal(format!(
                "{perm} releases are permanent; exactly one may be"
            )));
        }
        if perm == 0 && (cur > 0 || old > 0) {
            return Err(Refusal(
                "releases were installed but none is permanent".to_string(),
            ));
        }
        Ok(())
    }

    /// After a restart the node boots the permanent release, so a release that was only
    /// `current` is no longer running: it becomes `unpacked`, as release_handler shows it.
    /// Returns the demoted version, if any.
    pub fn restarted(&mut self) -> Option<Version> {
        let cur = self.current()?;
        self.set(cur, ReleaseState::Unpacked);
        Some(cur)
    }
}

/// What the table becomes when the service reports that it runs `reported`, with the line that
/// says why; `None` when the table already says so, or when nothing can be concluded.
/// - It runs the permanent release while another is current: the node was restarted and booted
///   the permanent one, so the former current release is `unpacked`.
/// - It runs a release recorded as `unpacked` or `old`: a switch to it ran (the activation hook
///   finished) but the agent stopped before recording it, so it is recorded now as the install
///   (or downgrade) that happened, without running the hook again. Otherwise a rollback's
///   downgrade to the recorded current release would answer "already current" while the
///   service keeps running the other one.
pub fn reconcile_reported(table: &Releases, reported: Version) -> Option<(Releases, String)> {
    let running = table.running()?;
    if table.permanent() == Some(reported)
        && let Some(cur) = table.current()
    {
        let mut next = table.clone();
        next.restarted();
        return Some((
            next,
            format!(
                "The service runs the permanent release {reported}: it was restarted, so {cur} is now unpacked"
            ),
        ));
    }
    if running == reported {
        return None;
    }
    let op = match table.state(&reported)? {
        ReleaseState::Unpacked => Op::Install {
            version: reported,
            permanent: false,
        },
        ReleaseState::Old => Op::Downgrade(reported),
        ReleaseState::Current | ReleaseState::Permanent => return None,
    };
    match plan(table, op, None) {
        Ok(Plan::Apply(c)) if c.unpack.is_none() && c.delete.is_none() && c.switch.is_some() => {
            Some((
                c.next,
                format!(
                    "The service runs {reported}, not the recorded {running}: a switch to it finished but was not recorded (the agent stopped), so {reported} is now current"
                ),
            ))
        }
        _ => None,
    }
}

fn patch_check(running: Option<Version>, to: Version, verb: &str) -> Result<(), Refusal> {
    match running {
        Some(from) if !from.is_patch_hop(&to) => Err(Refusal(format!(
            "refused to {verb} {from} -> {to}: only patch-level hot {verb}s are allowed \
             (major.minor must stay {}.{}); nothing was changed",
            from.major, from.minor
        ))),
        _ => Ok(()),
    }
}

/// Decides an operation. `package_name` is the name of the package that would be unpacked when
/// the version is unknown (install of a not-yet-unpacked version); `None` means no package was
/// found, which refuses such an install. The package file is taken to be
/// `releases/<name>-<version>.zip`; [`plan_package`] names the real one.
pub fn plan(table: &Releases, op: Op, package_name: Option<&str>) -> Result<Plan, Refusal> {
    let v = op.version();
    let file = package_name.map(|n| format!("releases/{n}-{v}.zip"));
    let pkg = package_name
        .zip(file.as_deref())
        .map(|(name, file)| PackageRef { name, file });
    plan_package(table, op, pkg)
}

impl Op {
    pub fn version(&self) -> Version {
        match *self {
            Op::Unpack(v)
            | Op::Install { version: v, .. }
            | Op::Permanent(v)
            | Op::Downgrade(v)
            | Op::Uninstall(v) => v,
        }
    }
}

/// EMQX's line before it unpacks a release it does not know.
fn attempting_unpack(v: Version, pkg: PackageRef) -> String {
    format!("Release {v} not found, attempting to unpack {}", pkg.file)
}

/// [`plan`] with the package file that would be unpacked, for the messages.
pub fn plan_package(table: &Releases, op: Op, pkg: Option<PackageRef>) -> Result<Plan, Refusal> {
    match op {
        // EMQX's `unpack` words for a release it already knows, by its state.
        Op::Unpack(v) => match table.state(&v) {
            Some(st) => Ok(Plan::Already(match st {
                ReleaseState::Old => format!("Release {v} is marked old."),
                ReleaseState::Unpacked => format!("Release {v} is already unpacked."),
                ReleaseState::Current => format!("Release {v} is already installed and current."),
                ReleaseState::Permanent => {
                    format!("Release {v} is already installed and set permanent.")
                }
            })),
            None => {
                let pkg = pkg.ok_or_else(|| no_package(v))?;
                let name = pkg.name;
                let mut next = table.clone();
                next.releases.insert(
                    v,
                    Record {
                        state: ReleaseState::Unpacked,
                        name: name.to_string(),
                    },
                );
                Ok(Plan::Apply(Change {
                    unpack: Some(v),
                    switch: None,
                    delete: None,
                    next,
                    messages: vec![
                        attempting_unpack(v, pkg),
                        format!("Unpacked successfully: \"{v}\""),
                    ],
                }))
            }
        },
        Op::Install { version, permanent } => plan_install(table, version, permanent, pkg),
        Op::Permanent(v) => plan_permanent(table, v),
        Op::Downgrade(v) => plan_downgrade(table, v),
        Op::Uninstall(v) => match table.state(&v) {
            None => Err(Refusal(format!(
                "refused to uninstall {v}: it is not installed"
            ))),
            Some(st @ (ReleaseState::Current | ReleaseState::Permanent)) => Err(Refusal(format!(
                "refused to uninstall {v}: it is the {st} release; switch away from it first"
            ))),
            Some(st) => {
                let mut next = table.clone();
                next.releases.remove(&v);
                // EMQX's words, including its missing full stop after "unpacked".
                let first = if st == ReleaseState::Old {
                    format!("Release {v} is marked old, uninstalling it.")
                } else {
                    format!("Release {v} is marked unpacked, uninstalling it")
                };
                Ok(Plan::Apply(Change {
                    unpack: None,
                    switch: None,
                    delete: Some(v),
                    next,
                    messages: vec![first, format!("Uninstalled Release: {v}")],
                }))
            }
        },
    }
}

fn no_package(v: Version) -> Refusal {
    Refusal(format!(
        "refused: release {v} is not unpacked and no package for it was found"
    ))
}

fn make_permanent(next: &mut Releases, v: Version, messages: &mut Vec<String>) {
    if let Some(p) = next.permanent().filter(|p| *p != v) {
        next.set(p, ReleaseState::Old);
    }
    next.set(v, ReleaseState::Permanent);
    messages.push(format!("Made release permanent: \"{v}\""));
}

fn plan_install(
    table: &Releases,
    v: Version,
    permanent: bool,
    pkg: Option<PackageRef>,
) -> Result<Plan, Refusal> {
    let running = table.running();
    match table.state(&v) {
        Some(ReleaseState::Permanent) => {
            if running == Some(v) {
                Ok(Plan::Already(format!(
                    "Release {v} is already installed, running and set permanent."
                )))
            } else {
                let cur = running.map(|c| c.to_string()).unwrap_or_default();
                Err(Refusal(format!(
                    "refused to install {v}: it is the permanent release while {cur} is current; \
                     use downgrade {v} to switch back to it"
                )))
            }
        }
        Some(ReleaseState::Current) => {
            if !permanent {
                return Ok(Plan::Already(format!(
                    "Release {v} is already installed and current."
                )));
            }
            let mut next = table.clone();
            let mut messages = vec![format!(
                "Release {v} is already installed and current, making permanent."
            )];
            make_permanent(&mut next, v, &mut messages);
            Ok(Plan::Apply(Change {
                unpack: None,
                switch: None,
                delete: None,
                next,
                messages,
            }))
        }
        st @ (None | Some(ReleaseState::Unpacked) | Some(ReleaseState::Old)) => {
            patch_check(running, v, "upgrade")?;
            let mut next = table.clone();
            let mut messages = Vec::new();
            let unpack = match st {
                None => {
                    let pkg = pkg.ok_or_else(|| no_package(v))?;
                    next.releases.insert(
                        v,
                        Record {
                            state: ReleaseState::Unpacked,
                            name: pkg.name.to_string(),
                        },
                    );
                    messages.push(attempting_unpack(v, pkg));
                    messages.push(format!("Unpacked successfully: \"{v}\""));
                    Some(v)
                }
                Some(ReleaseState::Old) => {
                    messages.push(format!("Release {v} is marked old, switching to it."));
                    None
                }
                Some(_) => {
                    messages.push(format!("Release {v} is already unpacked, now installing."));
                    None
                }
            };
            // A release that was current but never made permanent stops running: it is only
            // unpacked from now on (a reboot would not come back to it either).
            if let Some(c) = table.current() {
                next.set(c, ReleaseState::Unpacked);
            }
            next.set(v, ReleaseState::Current);
            messages.push(format!("Installed Release: {v}"));
            // The first install has nothing else to boot, so it is permanent regardless.
            if permanent || table.permanent().is_none() {
                make_permanent(&mut next, v, &mut messages);
            }
            Ok(Plan::Apply(Change {
                unpack,
                switch: Some(Switch {
                    from: running,
                    to: v,
                }),
                delete: None,
                next,
                messages,
            }))
        }
    }
}

fn plan_permanent(table: &Releases, v: Version) -> Result<Plan, Refusal> {
    match table.state(&v) {
        None => Err(Refusal(format!(
            "refused to make {v} permanent: it is not installed"
        ))),
        Some(ReleaseState::Current) => {
            let mut next = table.clone();
            let mut messages = Vec::new();
            make_permanent(&mut next, v, &mut messages);
            Ok(Plan::Apply(Change {
                unpack: None,
                switch: None,
                delete: None,
                next,
                messages,
            }))
        }
        Some(ReleaseState::Permanent) if table.current().is_none() => Ok(Plan::Already(format!(
            "Release {v} is already permanent; nothing to do"
        ))),
        Some(st) => Err(Refusal(format!(
            "refused to make {v} permanent: it is {st}, and only the current (running) release \
             can be made permanent{}",
            table
                .running()
                .map(|r| format!(" (running: {r})"))
                .unwrap_or_default()
        ))),
    }
}

fn plan_downgrade(table: &Releases, v: Version) -> Result<Plan, Refusal> {
    let running = table.running();
    match table.state(&v) {
        None => Err(Refusal(format!(
            "refused to downgrade to {v}: it is not installed"
        ))),
        Some(ReleaseState::Unpacked) => Err(Refusal(format!(
            "refused to downgrade to {v}: it is only unpacked, never installed; use install {v}"
        ))),
        Some(ReleaseState::Current) => Err(Refusal(format!(
            "refused to downgrade to {v}: it is already the running (current) release; \
             use permanent {v} to keep it"
        ))),
        Some(ReleaseState::Permanent) if running == Some(v) => Ok(Plan::Already(format!(
            "Release {v} is already installed, running and set permanent."
        ))),
        Some(ReleaseState::Permanent | ReleaseState::Old) => {
            patch_check(running, v, "downgrade")?;
            let mut next = table.clone();
            // The release we leave, and a permanent release we are not returning to, are old.
            if let Some(r) = running {
                next.set(r, ReleaseState::Old);
            }
            // EMQX's downgrade is its install: back to the permanent release it names the one
            // running, to an old one it says so.
            let first = match (table.state(&v), running) {
                (Some(ReleaseState::Permanent), Some(r)) => {
                    format!("Release {r} is the currently running version.")
                }
                _ => format!("Release {v} is marked old, switching to it."),
            };
            let mut messages = vec![first, format!("Installed Release: {v}")];
            make_permanent(&mut next, v, &mut messages);
            Ok(Plan::Apply(Change {
                unpack: None,
                switch: Some(Switch {
                    from: running,
                    to: v,
                }),
                delete: None,
                next,
                messages,
            }))
        }
    }
}

/// The release directories present: version -> the package name in its manifest.
pub type ReleaseDirs = BTreeMap<Version, String>;

/// Repairs a table against the release directories actually present (after a crash between a
/// directory rename and the state write). Returns the repaired table and what was repaired, or
/// an error when a running or permanent release has lost its directory.
pub fn reconcile(table: &Releases, dirs: &ReleaseDirs) -> Result<(Releases, Vec<String>), Refusal> {
    let mut next = table.clone();
    let mut notes = Vec::new();
    for (v, r) in &table.releases {
        if dirs.contains_key(v) {
            continue;
        }
        match r.state {
            ReleaseState::Unpacked | ReleaseState::Old => {
                // An uninstall renamed the directory away but did not record it: finish it.
                next.releases.remove(v);
                notes.push(format!("finished interrupted uninstall of {v}"));
            }
            st => {
                return Err(Refusal(format!(
                    "the {st} release {v} has no directory releases/{v}; restore it from its package"
                )));
            }
        }
    }
    for (v, name) in dirs {
        if !next.releases.contains_key(v) {
            // An unpack renamed a complete directory into place but did not record it.
            next.releases.insert(
                *v,
                Record {
                    state: ReleaseState::Unpacked,
                    name: name.clone(),
                },
            );
            notes.push(format!("recovered interrupted unpack of {v}"));
        }
    }
    Ok((next, notes))
}

#[cfg(test)]
mod tests {
    //! Every row of the transition table (DESIGN.md section 3), every refusal, every "already"
    //! no-op, and the reconcile/restart repairs, on in-memory tables.

    use super::*;
    use ReleaseState::{Current as C, Old as O, Permanent as P, Unpacked as U};

    fn v(s: &str) -> Version {
        s.parse().unwrap()
    }

    fn table(rows: &[(&str, ReleaseState)]) -> Releases {
        let mut t = Releases::default();
        for (ver, st) in rows {
            t.releases.insert(
                v(ver),
                Record {
                    state: *st,
                    name: "emqx".to_string(),
                },
            );
        }
        t.check_invariants().expect("test tables must be reachable");
        t
    }

    fn install(ver: &str, permanent: bool) -> Op {
        Op::Install {
            version: v(ver),
            permanent,
        }
    }

    fn apply(t: &Releases, op: Op, pkg: Option<&str>) -> Change {
        match plan(t, op, pkg) {
            Ok(Plan::Apply(c)) => {
                c.next
                    .check_invariants()
                    .unwrap_or_else(|e| panic!("{op:?} on {t:?} breaks an invariant: {e}"));
                c
            }
            other => panic!("{op:?} on {t:?}: expected a change, got {other:?}"),
        }
    }

    fn already(t: &Releases, op: Op, pkg: Option<&str>) -> String {
        match plan(t, op, pkg) {
            Ok(Plan::Already(msg)) => msg,
            other => panic!("{op:?} on {t:?}: expected already, got {other:?}"),
        }
    }

    fn refused(t: &Releases, op: Op, pkg: Option<&str>) -> String {
        match plan(t, op, pkg) {
            Err(Refusal(msg)) => msg,
            other => panic!("{op:?} on {t:?}: expected a refusal, got {other:?}"),
        }
    }

    fn switch(from: Option<&str>, to: &str) -> Option<Switch> {
        Some(Switch {
            from: from.map(v),
            to: v(to),
        })
    }

    // ---- unpack ----

    #[test]
    fn unpack_unknown_adds_it_unpacked_and_nothing_else() {
        let t = table(&[("4.2.0", P)]);
        let c = apply(&t, Op::Unpack(v("4.2.1")), Some("emqx-ee"));
        assert_eq!(c.unpack, Some(v("4.2.1")));
        assert_eq!(c.switch, None);
        assert_eq!(c.delete, None);
        let mut want = table(&[("4.2.0", P)]);
        want.releases.insert(
            v("4.2.1"),
            Record {
                state: U,
                name: "emqx-ee".into(),
            },
        );
        assert_eq!(c.next, want);
        assert_eq!(
            c.messages,
            vec![
                "Release 4.2.1 not found, attempting to unpack releases/emqx-ee-4.2.1.zip"
                    .to_string(),
                "Unpacked successfully: \"4.2.1\"".to_string()
            ]
        );
    }

    #[test]
    fn unpack_on_an_empty_store_and_of_another_minor_is_allowed() {
        // Unpacking is not a hop: no version check, and nothing becomes permanent.
        let c = apply(&Releases::default(), Op::Unpack(v("4.2.0")), Some("emqx"));
        assert_eq!(c.next, table(&[("4.2.0", U)]));
        let c = apply(
            &table(&[("4.2.0", P)]),
            Op::Unpack(v("5.0.0")),
            Some("emqx"),
        );
        assert_eq!(c.next, table(&[("4.2.0", P), ("5.0.0", U)]));
    }

    #[test]
    fn unpack_without_a_package_is_refused() {
        let msg = refused(&Releases::default(), Op::Unpack(v("4.2.1")), None);
        assert!(msg.contains("4.2.1") && msg.contains("no package"), "{msg}");
    }

    #[test]
    fn unpack_of_a_known_release_is_a_no_op_naming_its_state() {
        let t = table(&[("4.2.0", O), ("4.2.1", P), ("4.2.2", C), ("4.2.3", U)]);
        for (ver, st) in [
            ("4.2.0", "old"),
            ("4.2.1", "permanent"),
            ("4.2.2", "current"),
            ("4.2.3", "unpacked"),
        ] {
            let msg = already(&t, Op::Unpack(v(ver)), Some("emqx"));
            assert!(msg.contains(ver) && msg.contains(st), "{msg}");
            // Also without a package: nothing needs to be found.
            already(&t, Op::Unpack(v(ver)), None);
        }
    }

    // ---- install / upgrade ----

    #[test]
    fn first_install_of_an_unknown_release_unpacks_switches_from_none_and_is_permanent() {
        for permanent in [true, false] {
            let c = apply(
                &Releases::default(),
                install("4.2.0", permanent),
                Some("emqx"),
            );
            assert_eq!(c.unpack, Some(v("4.2.0")));
            assert_eq!(c.switch, switch(None, "4.2.0"));
            assert_eq!(c.next, table(&[("4.2.0", P)]), "permanent={permanent}");
            assert_eq!(
                c.messages,
                vec![
                    "Release 4.2.0 not found, attempting to unpack releases/emqx-4.2.0.zip"
                        .to_string(),
                    "Unpacked successfully: \"4.2.0\"".to_string(),
                    "Installed Release: 4.2.0".to_string(),
                    "Made release permanent: \"4.2.0\"".to_string(),
                ]
            );
        }
    }

    #[test]
    fn first_install_of_an_unpacked_release_has_no_version_check_and_is_permanent() {
        // Only unpacked releases of different minors: whichever is installed first is
        // permanent, even with --no-permanent, and no patch check applies.
        let t = table(&[("4.2.0", U), ("5.1.0", U)]);
        for permanent in [true, false] {
            let c = apply(&t, install("5.1.0", permanent), None);
            assert_eq!(c.unpack, None);
            assert_eq!(c.switch, switch(None, "5.1.0"));
            assert_eq!(c.next, table(&[("4.2.0", U), ("5.1.0", P)]));
        }
    }

    #[test]
    fn install_of_an_unknown_release_without_a_package_is_refused() {
        let msg = refused(&table(&[("4.2.0", P)]), install("4.2.1", true), None);
        assert!(msg.contains("4.2.1") && msg.contains("no package"), "{msg}");
    }

    #[test]
    fn upgrade_makes_the_new_release_permanent_and_the_previous_one_old() {
        // From unknown (unpack first), from unpacked, and back to an old release.
        let cases: [(Releases, &str, Option<&str>, bool, Releases); 3] = [
            (
                table(&[("4.2.0", P)]),
                "4.2.1",
                Some("emqx"),
                true,
                table(&[("4.2.0", O), ("4.2.1", P)]),
            ),
            (
                table(&[("4.2.0", P), ("4.2.1", U)]),
                "4.2.1",
                None,
                false,
                table(&[("4.2.0", O), ("4.2.1", P)]),
            ),
            (
                table(&[("4.2.0", O), ("4.2.1", P)]),
                "4.2.0",
                None,
                false,
                table(&[("4.2.0", P), ("4.2.1", O)]),
            ),
        ];
        for (t, to, pkg, unpacks, want) in cases {
            let c = apply(&t, install(to, true), pkg);
            assert_eq!(c.unpack, unpacks.then(|| v(to)));
            assert_eq!(
                c.switch,
                switch(Some(&t.running().unwrap().to_string()), to)
            );
            assert_eq!(c.delete, None);
            assert_eq!(c.next, want, "install {to} on {t:?}");
            assert_eq!(
                c.messages.last().unwrap(),
                &format!("Made release permanent: \"{to}\"")
            );
        }
    }

    #[test]
    fn upgrade_no_permanent_stops_after_the_switch() {
        for (t, pkg) in [
            (table(&[("4.2.0", P)]), Some("emqx")),
            (table(&[("4.2.0", P), ("4.2.1", U)]), None),
            (table(&[("4.2.0", P), ("4.2.1", O)]), None),
        ] {
            let c = apply(&t, install("4.2.1", false), pkg);
            assert_eq!(c.switch, switch(Some("4.2.0"), "4.2.1"));
            assert_eq!(c.next, table(&[("4.2.0", P), ("4.2.1", C)]), "{t:?}");
            assert_eq!(c.messages.last().unwrap(), "Installed Release: 4.2.1");
            assert!(!c.messages.iter().any(|m| m.contains("permanent")));
        }
    }

    #[test]
    fn install_speaks_emqx_about_where_the_release_comes_from() {
        let pkg = PackageRef {
            name: "emqx",
            file: "/srv/pkgs/emqx-4.2.1.zip",
        };
        let first = |t: &Releases, ver: &str, pkg| match plan_package(t, install(ver, true), pkg) {
            Ok(Plan::Apply(c)) => c.messages[0].clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            first(&table(&[("4.2.0", P)]), "4.2.1", Some(pkg)),
            "Release 4.2.1 not found, attempting to unpack /srv/pkgs/emqx-4.2.1.zip"
        );
        assert_eq!(
            first(&table(&[("4.2.0", P), ("4.2.1", U)]), "4.2.1", None),
            "Release 4.2.1 is already unpacked, now installing."
        );
        assert_eq!(
            first(&table(&[("4.2.0", O), ("4.2.1", P)]), "4.2.0", None),
            "Release 4.2.0 is marked old, switching to it."
        );
    }

    #[test]
    fn a_never_permanent_current_release_becomes_unpacked_when_another_is_installed() {
        let t = table(&[("4.2.0", P), ("4.2.1", C), ("4.2.2", U)]);
        let c = apply(&t, install("4.2.2", true), None);
        assert_eq!(c.switch, switch(Some("4.2.1"), "4.2.2"));
        assert_eq!(c.next, table(&[("4.2.0", O), ("4.2.1", U), ("4.2.2", P)]));
        let c = apply(&t, install("4.2.2", false), None);
        assert_eq!(c.switch, switch(Some("4.2.1"), "4.2.2"));
        assert_eq!(c.next, table(&[("4.2.0", P), ("4.2.1", U), ("4.2.2", C)]));
        // Also when the target is unknown and must be unpacked first.
        let t = table(&[("4.2.0", P), ("4.2.1", C)]);
        let c = apply(&t, install("4.2.3", false), Some("emqx"));
        assert_eq!(c.unpack, Some(v("4.2.3")));
        assert_eq!(c.next, table(&[("4.2.0", P), ("4.2.1", U), ("4.2.3", C)]));
    }

    #[test]
    fn install_of_the_current_release_makes_it_permanent_without_a_switch() {
        let t = table(&[("4.2.0", P), ("4.2.1", C)]);
        let c = apply(&t, install("4.2.1", true), None);
        assert_eq!(c.unpack, None);
        assert_eq!(c.switch, None);
        assert_eq!(c.delete, None);
        assert_eq!(c.next, table(&[("4.2.0", O), ("4.2.1", P)]));
        assert_eq!(
            c.messages,
            vec![
                "Release 4.2.1 is already installed and current, making permanent.".to_string(),
                "Made release permanent: \"4.2.1\"".to_string()
            ]
        );
    }

    #[test]
    fn install_no_permanent_of_the_current_release_is_a_no_op() {
        let t = table(&[("4.2.0", P), ("4.2.1", C)]);
        let msg = already(&t, install("4.2.1", false), None);
        assert!(
            msg == "Release 4.2.1 is already installed and current.",
            "{msg}"
        );
    }

    #[test]
    fn install_of_the_running_permanent_release_is_a_no_op() {
        let t = table(&[("4.2.0", O), ("4.2.1", P), ("4.2.2", U)]);
        for permanent in [true, false] {
            let msg = already(&t, install("4.2.1", permanent), Some("emqx"));
            assert!(msg.contains("4.2.1") && msg.contains("already"), "{msg}");
        }
    }

    #[test]
    fn install_of_the_permanent_release_that_is_not_running_points_to_downgrade() {
        let t = table(&[("4.2.0", P), ("4.2.1", C)]);
        for permanent in [true, false] {
            let msg = refused(&t, install("4.2.0", permanent), Some("emqx"));
            assert!(
                msg.contains("4.2.0") && msg.contains("4.2.1") && msg.contains("downgrade 4.2.0"),
                "{msg}"
            );
        }
    }

    #[test]
    fn install_across_minor_or_major_is_refused_naming_both_versions() {
        // From the permanent release, from a current one (the running one counts), for an
        // unknown, unpacked or old target, with and without --no-permanent.
        let cases = [
            (table(&[("4.2.0", P)]), "4.3.0", Some("emqx"), "4.2.0"),
            (table(&[("4.2.0", P)]), "5.2.0", Some("emqx"), "4.2.0"),
            (table(&[("4.2.0", P), ("4.3.0", U)]), "4.3.0", None, "4.2.0"),
            (table(&[("4.2.5", P), ("4.1.9", U)]), "4.1.9", None, "4.2.5"),
            (
                table(&[("4.2.0", P), ("4.2.1", C)]),
                "4.3.0",
                Some("emqx"),
                "4.2.1",
            ),
            // An old release of another minor (reachable only by hand-edited state).
            (table(&[("4.3.0", P), ("4.2.9", O)]), "4.2.9", None, "4.3.0"),
        ];
        for (t, to, pkg, from) in cases {
            for permanent in [true, false] {
                let msg = refused(&t, install(to, permanent), pkg);
                assert!(
                    msg.contains(&format!("{from} -> {to}")) && msg.contains("patch-level"),
                    "{msg}"
                );
                assert!(msg.contains("nothing was changed"), "{msg}");
            }
        }
    }

    #[test]
    fn patch_hops_in_both_directions_and_across_many_patches_are_allowed() {
        let t = table(&[("4.2.9", P)]);
        let c = apply(&t, install("4.2.10", true), Some("emqx"));
        assert_eq!(c.next, table(&[("4.2.9", O), ("4.2.10", P)]));
        let t = table(&[("4.2.9", P), ("4.2.0", U)]);
        let c = apply(&t, install("4.2.0", true), None);
        assert_eq!(c.next, table(&[("4.2.9", O), ("4.2.0", P)]));
    }

    // ---- permanent ----

    #[test]
    fn permanent_of_the_current_release_makes_the_previous_permanent_old() {
        let t = table(&[("4.2.0", P), ("4.2.1", C), ("4.1.0", U)]);
        let c = apply(&t, Op::Permanent(v("4.2.1")), None);
        assert_eq!((c.unpack, c.switch, c.delete), (None, None, None));
        assert_eq!(c.next, table(&[("4.2.0", O), ("4.2.1", P), ("4.1.0", U)]));
        assert_eq!(
            c.messages,
            vec!["Made release permanent: \"4.2.1\"".to_string()]
        );
    }

    #[test]
    fn permanent_of_the_running_permanent_release_is_a_no_op() {
        let t = table(&[("4.2.0", O), ("4.2.1", P)]);
        let msg = already(&t, Op::Permanent(v("4.2.1")), None);
        assert!(
            msg.contains("4.2.1") && msg.contains("already permanent"),
            "{msg}"
        );
    }

    #[test]
    fn permanent_refuses_anything_but_the_current_release() {
        let t = table(&[("4.2.0", O), ("4.2.1", P), ("4.2.2", C), ("4.2.3", U)]);
        for (ver, st) in [
            ("4.2.0", "old"),
            ("4.2.1", "permanent"),
            ("4.2.3", "unpacked"),
        ] {
            let msg = refused(&t, Op::Permanent(v(ver)), None);
            assert!(
                msg.contains(ver) && msg.contains(st) && msg.contains("running: 4.2.2"),
                "{msg}"
            );
        }
        let msg = refused(&t, Op::Permanent(v("4.2.9")), None);
        assert!(
            msg.contains("4.2.9") && msg.contains("not installed"),
            "{msg}"
        );
        let msg = refused(&Releases::default(), Op::Permanent(v("4.2.0")), None);
        assert!(msg.contains("not installed"), "{msg}");
        // Unpacked only, nothing installed: refused, and no "(running: ...)" is invented.
        let msg = refused(&table(&[("4.2.0", U)]), Op::Permanent(v("4.2.0")), None);
        assert!(
            msg.contains("unpacked") && !msg.contains("running:"),
            "{msg}"
        );
    }

    // ---- downgrade ----

    #[test]
    fn downgrade_to_the_permanent_release_while_another_is_current() {
        let t = table(&[("4.2.0", P), ("4.2.1", C)]);
        let c = apply(&t, Op::Downgrade(v("4.2.0")), None);
        assert_eq!(c.unpack, None);
        assert_eq!(c.switch, switch(Some("4.2.1"), "4.2.0"));
        assert_eq!(c.delete, None);
        assert_eq!(c.next, table(&[("4.2.0", P), ("4.2.1", O)]));
        assert_eq!(
            c.messages,
            vec![
                "Release 4.2.1 is the currently running version.".to_string(),
                "Installed Release: 4.2.0".to_string(),
                "Made release permanent: \"4.2.0\"".to_string()
            ]
        );
    }

    #[test]
    fn downgrade_to_an_old_release() {
        let t = table(&[("4.2.0", O), ("4.2.1", P)]);
        let c = apply(&t, Op::Downgrade(v("4.2.0")), None);
        assert_eq!(c.switch, switch(Some("4.2.1"), "4.2.0"));
        assert_eq!(c.next, table(&[("4.2.0", P), ("4.2.1", O)]));
        // EMQX's guide, verbatim.
        assert_eq!(
            c.messages,
            vec![
                "Release 4.2.0 is marked old, switching to it.".to_string(),
                "Installed Release: 4.2.0".to_string(),
                "Made release permanent: \"4.2.0\"".to_string()
            ]
        );
        // With a current release too: both the one we leave and the permanent one become old.
        let t = table(&[("4.2.0", O), ("4.2.1", P), ("4.2.2", C)]);
        let c = apply(&t, Op::Downgrade(v("4.2.0")), None);
        assert_eq!(c.switch, switch(Some("4.2.2"), "4.2.0"));
        assert_eq!(c.next, table(&[("4.2.0", P), ("4.2.1", O), ("4.2.2", O)]));
    }

    #[test]
    fn downgrade_to_the_running_permanent_release_is_a_no_op() {
        let t = table(&[("4.2.0", O), ("4.2.1", P)]);
        let msg = already(&t, Op::Downgrade(v("4.2.1")), None);
        assert!(msg.contains("4.2.1") && msg.contains("already"), "{msg}");
    }

    #[test]
    fn downgrade_refuses_unknown_unpacked_and_current() {
        let t = table(&[("4.2.0", P), ("4.2.1", C), ("4.2.2", U)]);
        let msg = refused(&t, Op::Downgrade(v("4.2.7")), None);
        assert!(
            msg.contains("4.2.7") && msg.contains("not installed"),
            "{msg}"
        );
        let msg = refused(&t, Op::Downgrade(v("4.2.2")), None);
        assert!(
            msg.contains("4.2.2") && msg.contains("unpacked") && msg.contains("install 4.2.2"),
            "{msg}"
        );
        let msg = refused(&t, Op::Downgrade(v("4.2.1")), None);
        assert!(
            msg.contains("4.2.1") && msg.contains("current") && msg.contains("permanent 4.2.1"),
            "{msg}"
        );
        let msg = refused(&Releases::default(), Op::Downgrade(v("4.2.0")), None);
        assert!(msg.contains("not installed"), "{msg}");
    }

    #[test]
    fn downgrade_across_minor_is_refused_naming_both_versions() {
        // Reachable only by hand-edited state, but the rule must still hold.
        let t = table(&[("4.2.9", O), ("4.3.0", P)]);
        let msg = refused(&t, Op::Downgrade(v("4.2.9")), None);
        assert!(
            msg.contains("4.3.0 -> 4.2.9") && msg.contains("patch-level"),
            "{msg}"
        );
    }

    // ---- uninstall ----

    #[test]
    fn uninstall_deletes_old_and_unpacked_releases() {
        let t = table(&[("4.2.0", O), ("4.2.1", P), ("4.2.2", U)]);
        for (ver, rest, first) in [
            (
                "4.2.0",
                table(&[("4.2.1", P), ("4.2.2", U)]),
                "Release 4.2.0 is marked old, uninstalling it.",
            ),
            (
                "4.2.2",
                table(&[("4.2.0", O), ("4.2.1", P)]),
                "Release 4.2.2 is marked unpacked, uninstalling it",
            ),
        ] {
            let c = apply(&t, Op::Uninstall(v(ver)), None);
            assert_eq!((c.unpack, c.switch), (None, None));
            assert_eq!(c.delete, Some(v(ver)));
            assert_eq!(c.next, rest);
            assert_eq!(
                c.messages,
                vec![first.to_string(), format!("Uninstalled Release: {ver}")]
            );
        }
        // The last unpacked release of a store where nothing was installed.
        let c = apply(&table(&[("4.2.0", U)]), Op::Uninstall(v("4.2.0")), None);
        assert_eq!(c.next, Releases::default());
    }

    #[test]
    fn uninstall_refuses_current_permanent_and_unknown() {
        let t = table(&[("4.2.0", P), ("4.2.1", C)]);
        for (ver, st) in [("4.2.0", "permanent"), ("4.2.1", "current")] {
            let msg = refused(&t, Op::Uninstall(v(ver)), None);
            assert!(msg.contains(ver) && msg.contains(st), "{msg}");
        }
        let msg = refused(&t, Op::Uninstall(v("4.2.2")), None);
        assert!(
            msg.contains("4.2.2") && msg.contains("not installed"),
            "{msg}"
        );
    }

    // ---- the table itself ----

    #[test]
    fn running_is_current_else_permanent() {
        assert_eq!(Releases::default().running(), None);
        assert_eq!(table(&[("4.2.0", U)]).running(), None);
        assert_eq!(table(&[("4.2.0", P)]).running(), Some(v("4.2.0")));
        assert_eq!(
            table(&[("4.2.0", P), ("4.2.1", C)]).running(),
            Some(v("4.2.1"))
        );
    }

    #[test]
    fn entries_are_newest_first_and_numeric() {
        let t = table(&[("4.2.9", O), ("4.2.10", P), ("4.2.1", U)]);
        let order: Vec<String> = t.entries().iter().map(|e| e.version.to_string()).collect();
        assert_eq!(order, ["4.2.10", "4.2.9", "4.2.1"]);
    }

    #[test]
    fn invariants_name_the_broken_rule() {
        let mut t = Releases::default();
        for (ver, st) in [("4.2.0", C), ("4.2.1", C), ("4.2.2", P)] {
            t.releases.insert(
                v(ver),
                Record {
                    state: st,
                    name: "emqx".into(),
                },
            );
        }
        assert!(t.check_invariants().unwrap_err().0.contains("current"));
        t.set(v("4.2.0"), P);
        assert!(t.check_invariants().unwrap_err().0.contains("permanent"));
        t.set(v("4.2.0"), O);
        t.set(v("4.2.2"), U);
        assert!(
            t.check_invariants()
                .unwrap_err()
                .0
                .contains("none is permanent")
        );
        t.set(v("4.2.1"), U);
        assert!(
            t.check_invariants()
                .unwrap_err()
                .0
                .contains("none is permanent")
        );
        t.set(v("4.2.0"), U);
        assert_eq!(t.check_invariants(), Ok(()));
    }

    #[test]
    fn restarted_demotes_the_current_release_only() {
        let mut t = table(&[("4.2.0", P), ("4.2.1", C)]);
        assert_eq!(t.restarted(), Some(v("4.2.1")));
        assert_eq!(t, table(&[("4.2.0", P), ("4.2.1", U)]));
        assert_eq!(t.restarted(), None);
        assert_eq!(t, table(&[("4.2.0", P), ("4.2.1", U)]));
        let mut empty = Releases::default();
        assert_eq!(empty.restarted(), None);
    }

    // ---- reconcile ----

    fn dirs(vs: &[&str]) -> BTreeMap<Version, String> {
        vs.iter().map(|s| (v(s), "emqx".to_string())).collect()
    }

    #[test]
    fn reconcile_of_a_consistent_store_changes_nothing() {
        let t = table(&[("4.2.0", O), ("4.2.1", P), ("4.2.2", C), ("4.2.3", U)]);
        let (next, notes) = reconcile(&t, &dirs(&["4.2.0", "4.2.1", "4.2.2", "4.2.3"])).unwrap();
        assert_eq!(next, t);
        assert!(notes.is_empty());
        let (next, notes) = reconcile(&Releases::default(), &BTreeMap::new()).unwrap();
        assert_eq!((next, notes), (Releases::default(), vec![]));
    }

    #[test]
    fn reconcile_finishes_an_interrupted_uninstall() {
        let t = table(&[("4.2.0", O), ("4.2.1", P), ("4.2.3", U)]);
        let (next, notes) = reconcile(&t, &dirs(&["4.2.1"])).unwrap();
        assert_eq!(next, table(&[("4.2.1", P)]));
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes.iter().any(|n| n.contains("uninstall of 4.2.0")));
        assert!(notes.iter().any(|n| n.contains("uninstall of 4.2.3")));
    }

    #[test]
    fn reconcile_recovers_an_interrupted_unpack_with_its_name() {
        let t = table(&[("4.2.1", P)]);
        let mut d = dirs(&["4.2.1"]);
        d.insert(v("4.2.2"), "emqx-ee".into());
        let (next, notes) = reconcile(&t, &d).unwrap();
        assert_eq!(next.state(&v("4.2.2")), Some(U));
        assert_eq!(next.releases[&v("4.2.2")].name, "emqx-ee");
        assert_eq!(next.state(&v("4.2.1")), Some(P));
        assert_eq!(
            notes,
            vec!["recovered interrupted unpack of 4.2.2".to_string()]
        );
        // From an empty table (crash during the very first unpack).
        let (next, _) = reconcile(&Releases::default(), &dirs(&["4.2.0"])).unwrap();
        assert_eq!(next, table(&[("4.2.0", U)]));
    }

    #[test]
    fn reconcile_refuses_a_running_or_permanent_release_without_its_directory() {
        for (t, missing, st) in [
            (table(&[("4.2.0", P)]), "4.2.0", "permanent"),
            (table(&[("4.2.0", P), ("4.2.1", C)]), "4.2.1", "current"),
        ] {
            let present: Vec<&str> = ["4.2.0", "4.2.1"]
                .into_iter()
                .filter(|x| *x != missing)
                .collect();
            let msg = reconcile(&t, &dirs(&present)).unwrap_err().0;
            assert!(
                msg.contains(st) && msg.contains(&format!("releases/{missing}")),
                "{msg}"
            );
        }
    }
}
