//! The release store on disk: `ROOT/releases/` holds packages, one directory per unpacked
//! release, `state.json` (the states) and `.lock`.
//!
//! Every mutation runs under the exclusive lock and in this order, so that a crash at any point
//! leaves a state that `reconcile` turns into either the old or the new one:
//! unpack = extract to `.unpack-*`, flush it (an fsync of each file written and each directory,
//! or one syncfs for a large tree), write `<v>.files` (the record of its files, see
//! [`crate::package::files`]), rename to `<v>/`, fsync dir, then write state;
//! uninstall = rename `<v>/` to `.trash-*`, fsync dir, write state, then delete the trash;
//! switch = run the pre-step hook and record the drain (`drained.json`), run the activation
//! hook, then write state. Reads take no lock: state.json is replaced
//! atomically and the in-memory reconcile gives the same view a writer would persist.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use orch_types::{Version, VersionEntry, parse_package_file_name};
use serde::{Deserialize, Serialize};

use crate::activate::{Activation, HookKind, Switch, hook_for, run_hook};
use orch_package::error::IoContext;

use crate::error::{Error, Result};
use crate::fsutil::{
    StoreLock, flush_extracted, fsync_dir, remove_tree, unique_suffix, write_atomic,
};
use crate::package::{self, Limits, MANIFEST, PackageInfo};
use crate::rules::{self, Op, Plan, Releases};
use orch_package::signing::TrustedKeys;
pub use orch_package::signing::check_signature;

const STATE_FILE: &str = "state.json";
/// `ROOT/drained.json`: a pre-step hook drained the node for a switch and the post-step hook
/// has not put it back yet (see [`Store::after_gate`]).
pub const DRAINED_FILE: &str = "drained.json";
const LOCK_FILE: &str = ".lock";
const STATE_FORMAT: u32 = 1;
/// Prefixes of our own temporary entries in `releases/`, removed under the lock.
const TEMP_PREFIXES: [&str; 4] = [".unpack-", ".trash-", ".activate-", ".state.json.tmp-"];

/// How a store behaves; everything but `root` has a sensible default.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub root: PathBuf,
    /// Overrides the release's own `hooks/activate` (already shell-split).
    pub activate_cmd: Option<Vec<String>>,
    /// Drain hooks (already shell-split): override the release's own `hooks/pre-switch` and
    /// `hooks/post-switch`. They run with the activation hook's arguments, environment and
    /// timeout.
    pub pre_switch_cmd: Option<Vec<String>>,
    pub post_switch_cmd: Option<Vec<String>>,
    pub activate_timeout: Duration,
    pub limits: Limits,
    /// How long a writer waits for another one to finish.
    pub lock_timeout: Duration,
    /// When not empty, a package is only unpacked with a valid `<file>.sig` from one of these
    /// keys beside it (see [`orch_package::signing`]).
    pub trusted_keys: TrustedKeys,
}

impl StoreConfig {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        StoreConfig {
            root: root.into(),
            activate_cmd: None,
            pre_switch_cmd: None,
            post_switch_cmd: None,
            activate_timeout: Duration::from_secs(60),
            limits: Limits::default(),
            lock_timeout: Duration::from_secs(10),
            trusted_keys: TrustedKeys::default(),
        }
    }
}

/// Where the package for an unpack or install comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PackageSource {
    /// `ROOT/releases/<name>-<version>.zip` (with its `.sha256` if present).
    Lookup(Version),
    /// A package file anywhere, with an optional expected digest (else its sidecar's, if any).
    File {
        path: PathBuf,
        sha256: Option<String>,
    },
}

/// What an operation did, for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Lines to print on stdout, in order: EMQX's own words (scripts grep them).
    pub messages: Vec<String>,
    /// Anything else worth saying (a state-only switch): for stderr, so stdout stays EMQX's.
    pub notes: Vec<String>,
    /// False when the result already held.
    pub changed: bool,
    /// Present when the operation switched the running release.
    pub activation: Option<Activation>,
    /// How long the activation hook ran, when one ran (the agent's metrics).
    pub hook_duration: Option<std::time::Duration>,
    /// The hooks that ran, in order (`pre-switch`, `activate`, `post-switch`), for the audit.
    pub hooks: Vec<&'static str>,
}

/// What `drained.json` records: the switch the node was drained for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Drained {
    #[serde(default)]
    from: Option<Version>,
    to: Version,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    format: u32,
    #[serde(flatten)]
    table: Releases,
}

/// A node's release store. Cheap to clone; holds no lock or descriptor between calls, so a
/// daemon and local commands can share one root (they take turns through the lock).
#[derive(Debug, Clone)]
pub struct Store {
    cfg: StoreConfig,
    releases: PathBuf,
}

impl Store {
    /// Opens (creating `ROOT/releases/` if needed) a store.
    pub fn open(mut cfg: StoreConfig) -> Result<Store> {
        let releases = cfg.root.join("releases");
        fs::create_dir_all(&releases).ctx("create", &releases)?;
        // Hooks run with ROOT as their working directory: every path we hand them (and the
        // hook's own path) must not depend on ours.
        cfg.root = fs::canonicalize(&cfg.root).ctx("resolve", &cfg.root)?;
        let releases = cfg.root.join("releases");
        Ok(Store { cfg, releases })
    }

    pub fn root(&self) -> &Path {
        &self.cfg.root
    }

    pub fn releases_dir(&self) -> &Path {
        &self.releases
    }

    pub fn config(&self) -> &StoreConfig {
        &self.cfg
    }

    /// Every release and its state, newest first.
    pub fn versions(&self) -> Result<Vec<VersionEntry>> {
        Ok(self.view()?.entries())
    }

    /// The release the service runs according to the store.
    pub fn running(&self) -> Result<Option<Version>> {
        Ok(self.view()?.running())
    }

    /// The reconciled table, without writing anything.
    pub fn view(&self) -> Result<Releases> {
        let table = self.load()?;
        let dirs = self.scan_dirs()?;
        rules::reconcile(&table, &dirs)
            .map(|(t, _)| t)
            .map_err(|reason| self.corrupt(reason))
    }

    /// Unpacks a package; an already known version is a no-op that says its state.
    pub fn unpack(&self, src: &PackageSource) -> Result<Outcome> {
        // A known version needs no package (it may have been deleted since).
        if let PackageSource::Lookup(v) = src
            && self.view()?.state(v).is_some()
        {
            return self.execute(&format!("unpack {v}"), Op::Unpack(*v), None);
        }
        let (version, pkg) = self.resolve(src)?;
        self.execute(&format!("unpack {version}"), Op::Unpack(version), Some(pkg))
    }

    /// `install`/`upgrade`: unpacks if needed, switches, and (unless `permanent` is false)
    /// makes the release permanent. With a `File` source the version is the package's.
    pub fn install(&self, src: &PackageSource, permanent: bool) -> Result<Outcome> {
        let (version, pkg) = match src {
            // A known version needs no package; only look one up when it is unknown.
            PackageSource::Lookup(v) if self.view()?.state(v).is_some() => (*v, None),
            _ => {
                let (v, p) = self.resolve(src)?;
                (v, Some(p))
            }
        };
        self.execute(
            &format!("install {version}"),
            Op::Install { version, permanent },
            pkg,
        )
    }

    pub fn make_permanent(&self, v: Version) -> Result<Outcome> {
        self.execute(&format!("permanent {v}"), Op::Permanent(v), None)
    }

    pub fn downgrade(&self, v: Version) -> Result<Outcome> {
        self.execute(&format!("downgrade {v}"), Op::Downgrade(v), None)
    }

    pub fn uninstall(&self, v: Version) -> Result<Outcome> {
        self.execute(&format!("uninstall {v}"), Op::Uninstall(v), None)
    }

    /// Called when the service reports that it runs `reported`. If that is the permanent
    /// release while another one is recorded as current, the node was restarted (and booted
    /// the permanent release): the former current release becomes `unpacked`.
    pub fn reconcile_running(&self, reported: Version) -> Result<Outcome> {
        self.with_lock("reconcile", |table| {
            if let Some((next, why)) = rules::reconcile_reported(table, reported) {
                self.save(&next)?;
                *table = next;
                return Ok(Outcome {
                    messages: vec![why],
                    notes: vec![],
                    changed: true,
                    activation: None,
                    hook_duration: None,
                    hooks: vec![],
                });
            }
            Ok(Outcome {
                messages: vec![],
                notes: vec![],
                changed: false,
                activation: None,
                hook_duration: None,
                hooks: vec![],
            })
        })
    }

    /// The node passed its health gate on `v`: if a switch drained it (`drained.json`), runs
    /// the post-step hook (configured, else `releases/<v>/hooks/post-switch`) and forgets the
    /// drain. Without a recorded drain it does nothing, so a repeated call, and the gates that
    /// follow no switch (bake, final check), are no-ops. A failing hook keeps the record: a
    /// retry runs it again.
    pub fn after_gate(&self, v: Version) -> Result<Outcome> {
        self.with_lock(&format!("after-gate {v}"), |_| {
            let Some(drained) = self.read_drained()? else {
                return Ok(Outcome {
                    messages: vec![],
                    notes: vec![format!(
                        "no drain recorded: nothing to run after the health gate on {v}"
                    )],
                    changed: false,
                    activation: None,
                    hook_duration: None,
                    hooks: vec![],
                });
            };
            let dir = self.releases.join(v.to_string());
            let mut hooks = Vec::new();
            let cmd = self.cfg.post_switch_cmd.as_deref();
            if let Some((prog, args)) = hook_for(cmd, &dir, HookKind::PostSwitch) {
                let switch = self.switch(&dir, drained.from, v);
                run_hook(HookKind::PostSwitch, &prog, &args, &switch)?;
                hooks.push(HookKind::PostSwitch.file_name());
            }
            let path = self.cfg.root.join(DRAINED_FILE);
            fs::remove_file(&path).ctx("remove", &path)?;
            fsync_dir(&self.cfg.root)?;
            Ok(Outcome {
                messages: vec![],
                notes: vec![format!(
                    "post-step after the health gate on {v}: the node is back in service"
                )],
                changed: true,
                activation: None,
                hook_duration: None,
                hooks,
            })
        })
    }

    /// Whether a drain is recorded (`drained.json`): a pre-step hook ran for a switch and the
    /// post-step hook has not run since.
    pub fn is_drained(&self) -> Result<bool> {
        Ok(self.read_drained()?.is_some())
    }

    // ---- internals ----

    fn switch<'a>(&'a self, dir: &'a Path, from: Option<Version>, to: Version) -> Switch<'a> {
        Switch {
            root: &self.cfg.root,
            release_dir: dir,
            from,
            to,
            timeout: self.cfg.activate_timeout,
        }
    }

    /// Before a switch: runs the pre-step hook, if any (a failure stops the switch before it is
    /// attempted), and records the drain when there is a pre- or post-step hook, so that the
    /// post-step hook runs after the gate even across an agent restart. True when a hook ran.
    fn drain(&self, sw: &Switch<'_>) -> Result<bool> {
        let pre = hook_for(
            self.cfg.pre_switch_cmd.as_deref(),
            sw.release_dir,
            HookKind::PreSwitch,
        );
        let post = hook_for(
            self.cfg.post_switch_cmd.as_deref(),
            sw.release_dir,
            HookKind::PostSwitch,
        );
        if let Some((prog, args)) = &pre {
            run_hook(HookKind::PreSwitch, prog, args, sw)?;
        }
        if pre.is_some() || post.is_some() {
            let marker = Drained {
                from: sw.from,
                to: sw.to,
            };
            let bytes = serde_json::to_vec(&marker)
                .map_err(|e| self.undecodable("cannot encode the drain record".into(), e))?;
            write_atomic(&self.cfg.root.join(DRAINED_FILE), &bytes)?;
        }
        Ok(pre.is_some())
    }

    fn read_drained(&self) -> Result<Option<Drained>> {
        let path = self.cfg.root.join(DRAINED_FILE);
        match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
                self.undecodable(
                    format!(
                        "{} is unreadable; remove it once the node is back in service",
                        path.display()
                    ),
                    e,
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).ctx("read", &path).map_err(Error::from),
        }
    }

    fn corrupt(&self, reason: impl ToString) -> Error {
        Error::Corrupt {
            root: self.cfg.root.clone(),
            reason: reason.to_string(),
            source: None,
        }
    }

    fn undecodable(&self, reason: String, source: serde_json::Error) -> Error {
        Error::Corrupt {
            root: self.cfg.root.clone(),
            reason,
            source: Some(source),
        }
    }

    fn load(&self) -> Result<Releases> {
        let path = self.releases.join(STATE_FILE);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Releases::default()),
            Err(e) => return Err(e).ctx("read", &path).map_err(Error::from),
        };
        let file: StateFile = serde_json::from_slice(&bytes)
            .map_err(|e| self.undecodable(format!("{} is unreadable", path.display()), e))?;
        if file.format != STATE_FORMAT {
            return Err(self.corrupt(format!(
                "{} has format {}, this version understands {STATE_FORMAT}",
                path.display(),
                file.format
            )));
        }
        file.table
            .check_invariants()
            .map_err(|e| self.corrupt(format!("{}: {e}", path.display())))?;
        Ok(file.table)
    }

    fn save(&self, table: &Releases) -> Result<()> {
        let file = StateFile {
            format: STATE_FORMAT,
            table: table.clone(),
        };
        let mut bytes = serde_json::to_vec_pretty(&file)
            .map_err(|e| self.undecodable("cannot encode state".to_string(), e))?;
        bytes.push(b'\n');
        write_atomic(&self.releases.join(STATE_FILE), &bytes)
    }

    /// Release directories present: `releases/<x.y.z>/release.toml` whose manifest agrees.
    fn scan_dirs(&self) -> Result<rules::ReleaseDirs> {
        let mut out = BTreeMap::new();
        for entry in fs::read_dir(&self.releases).ctx("read directory", &self.releases)? {
            let entry = entry.ctx("read directory", &self.releases)?;
            let Some(v) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<Version>().ok())
            else {
                continue;
            };
            let manifest = entry.path().join(MANIFEST);
            let Ok(text) = fs::read_to_string(&manifest) else {
                continue;
            };
            if let Ok((name, mv)) = package::parse_manifest(&text)
                && mv == v
            {
                out.insert(v, name);
            }
        }
        Ok(out)
    }

    /// Runs `f` on the reconciled table under the exclusive lock, after clearing debris of
    /// interrupted operations and persisting any repair.
    fn with_lock<T>(&self, what: &str, f: impl FnOnce(&mut Releases) -> Result<T>) -> Result<T> {
        let _lock = StoreLock::acquire(
            &self.cfg.root,
            self.releases.join(LOCK_FILE),
            self.cfg.lock_timeout,
            what,
        )?;
        for entry in fs::read_dir(&self.releases).ctx("read directory", &self.releases)? {
            let entry = entry.ctx("read directory", &self.releases)?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            // Also the temp files of `<v>.files` written atomically (`.<v>.files.tmp-*`).
            if TEMP_PREFIXES.iter().any(|p| name.starts_with(p))
                || (name.starts_with('.') && name.contains(".files.tmp-"))
            {
                let path = entry.path();
                if path.is_dir() {
                    remove_tree(&path)?;
                } else {
                    let _ = fs::remove_file(&path);
                }
            }
        }
        let stored = self.load()?;
        let dirs = self.scan_dirs()?;
        let (mut table, notes) =
            rules::reconcile(&stored, &dirs).map_err(|reason| self.corrupt(reason))?;
        if !notes.is_empty() {
            tracing::warn!(root = %self.cfg.root.display(), repairs = ?notes, "repaired release store after an interrupted operation");
            self.save(&table)?;
        }
        f(&mut table)
    }

    /// Finds the package for a source and reads its identity from the file name.
    fn resolve(&self, src: &PackageSource) -> Result<(Version, ResolvedPackage)> {
        match src {
            PackageSource::Lookup(v) => {
                let path = self.find_package(*v)?;
                let name = package::file_identity(&path)?.0;
                Ok((
                    *v,
                    ResolvedPackage {
                        path,
                        name,
                        sha256: None,
                    },
                ))
            }
            PackageSource::File { path, sha256 } => {
                let (name, v) = package::file_identity(path)?;
                Ok((
                    v,
                    ResolvedPackage {
                        path: path.clone(),
                        name,
                        sha256: sha256.clone(),
                    },
                ))
            }
        }
    }

    /// `releases/<name>-<v>.zip`; refuses when several names match.
    pub fn find_package(&self, v: Version) -> Result<PathBuf> {
        find_package_in(&self.releases, v)
    }

    fn execute(&self, what: &str, op: Op, pkg: Option<ResolvedPackage>) -> Result<Outcome> {
        self.with_lock(what, |table| {
            let shown = pkg.as_ref().map(|p| self.shown_path(&p.path));
            let pkg_ref = pkg
                .as_ref()
                .zip(shown.as_deref())
                .map(|(p, file)| rules::PackageRef {
                    name: &p.name,
                    file,
                });
            let change = match rules::plan_package(table, op, pkg_ref)? {
                Plan::Already(msg) => {
                    return Ok(Outcome {
                        messages: vec![msg],
                        notes: vec![],
                        changed: false,
                        activation: None,
                        hook_duration: None,
                        hooks: vec![],
                    });
                }
                Plan::Apply(change) => change,
            };
            if let (Some(v), Some(p)) = (change.unpack, &pkg) {
                self.unpack_dir(v, p, table.running())?;
                // Recorded before any switch: if activation fails, the release stays unpacked
                // and a retry need not extract it again.
                let mut unpacked = table.clone();
                unpacked.releases.insert(
                    v,
                    rules::Record {
                        state: orch_types::ReleaseState::Unpacked,
                        name: p.name.clone(),
                    },
                );
                self.save(&unpacked)?;
                *table = unpacked;
            }
            let mut activation = None;
            let mut hook_duration = None;
            let mut hooks = Vec::new();
            if let Some(sw) = change.switch {
                let dir = self.releases.join(sw.to.to_string());
                let switch = self.switch(&dir, sw.from, sw.to);
                if self.drain(&switch)? {
                    hooks.push(HookKind::PreSwitch.file_name());
                }
                let started = std::time::Instant::now();
                let cmd = self.cfg.activate_cmd.as_deref();
                activation = Some(match hook_for(cmd, &dir, HookKind::Activate) {
                    Some((prog, args)) => run_hook(HookKind::Activate, &prog, &args, &switch)?,
                    None => Activation::StateOnly,
                });
                if matches!(activation, Some(Activation::Hook(_))) {
                    hook_duration = Some(started.elapsed());
                    hooks.push(HookKind::Activate.file_name());
                }
            }
            if let Some(v) = change.delete {
                let dir = self.releases.join(v.to_string());
                let trash = self
                    .releases
                    .join(format!(".trash-{v}-{}", unique_suffix()));
                fs::rename(&dir, &trash).ctx("move away", &dir)?;
                fsync_dir(&self.releases)?;
                self.save(&change.next)?;
                remove_tree(&trash)?;
                // Only an optimisation for later unpacks; a leftover never vouches for a file
                // (identities are checked).
                let _ = fs::remove_file(package::files::record_path(&dir));
            } else {
                self.save(&change.next)?;
            }
            *table = change.next;
            let mut notes = Vec::new();
            if activation == Some(Activation::StateOnly) {
                notes.push(
                    "No activation hook: only the recorded state changed (state-only switch)"
                        .to_string(),
                );
            }
            Ok(Outcome {
                messages: change.messages,
                notes,
                changed: true,
                activation,
                hook_duration,
                hooks,
            })
        })
    }

    /// A package path as EMQX shows it: relative to the root when inside it
    /// (`releases/emqx-4.2.1.zip`), else as given.
    fn shown_path(&self, path: &Path) -> String {
        let abs = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        abs.strip_prefix(&self.cfg.root)
            .unwrap_or(path)
            .display()
            .to_string()
    }

    /// Extracts into a temp dir, flushes it, records its files (`<v>.files`) and renames it to
    /// `releases/<v>`. Files it shares with the running release (whose package is still here)
    /// are hard-linked from it.
    fn unpack_dir(
        &self,
        v: Version,
        p: &ResolvedPackage,
        running: Option<Version>,
    ) -> Result<PackageInfo> {
        let final_dir = self.releases.join(v.to_string());
        if final_dir.exists() {
            return Err(self.corrupt(format!(
                "{} exists but is not a valid release of {v}; move it away and retry",
                final_dir.display()
            )));
        }
        // With trusted keys, the signature is checked before a single entry is parsed, and the
        // extraction is then bound to the digest that was verified.
        let verified = if self.cfg.trusted_keys.is_empty() {
            None
        } else {
            Some(check_signature(&p.path, p.sha256.as_deref(), &self.cfg.trusted_keys)?.0)
        };
        let tmp = self
            .releases
            .join(format!(".unpack-{v}-{}", unique_suffix()));
        let reuse = running.filter(|r| *r != v).and_then(|r| {
            let zip = find_package_in(&self.releases, r).ok()?;
            package::Reuse::of(&zip, &self.releases.join(r.to_string()))
        });
        let ex = package::extract_tree(
            &p.path,
            &tmp,
            verified.as_deref().or(p.sha256.as_deref()),
            Some(v),
            &self.cfg.limits,
            reuse.as_ref(),
        )?;
        let done = (|| {
            flush_extracted(&tmp, &ex.files, &ex.dirs)?;
            self.record_files(&final_dir, &ex.files);
            fs::rename(&tmp, &final_dir).ctx("rename into place", &final_dir)?;
            fsync_dir(&self.releases)
        })();
        if done.is_err() {
            let _ = remove_tree(&tmp);
        }
        done.map(|()| ex.info)
    }

    /// Writes `<v>.files` for the release about to be renamed to `final_dir`. Best effort: it
    /// only spares a later patch reading these files back, so a failure is logged, not fatal.
    fn record_files(&self, final_dir: &Path, files: &[package::ExtractedFile]) {
        let known: Vec<_> = files
            .iter()
            .filter_map(|f| {
                let identity = f.identity.clone()?;
                let k = package::files::Known {
                    crc32: f.crc32,
                    identity,
                };
                Some((f.name.clone(), k))
            })
            .collect();
        let path = package::files::record_path(final_dir);
        if let Err(e) = write_atomic(&path, package::files::render(&known).as_bytes()) {
            tracing::warn!(file = %path.display(), "cannot record the release's files (a later patch reads them back instead): {e}");
        }
    }
}

#[derive(Debug, Clone)]
struct ResolvedPackage {
    path: PathBuf,
    name: String,
    sha256: Option<String>,
}

/// The one `<name>-<v>.zip` in a `releases` directory; refuses when several names match. Also
/// used by the agent for drivers that do not look packages up themselves.
pub fn find_package_in(releases: &Path, v: Version) -> Result<PathBuf> {
    let mut found = Vec::new();
    for entry in fs::read_dir(releases).ctx("read directory", releases)? {
        let entry = entry.ctx("read directory", releases)?;
        if let Some(name) = entry.file_name().to_str()
            && let Some((_, pv)) = parse_package_file_name(name)
            && pv == v
            && entry.path().is_file()
        {
            found.push(entry.path());
        }
    }
    found.sort();
    match found.len() {
        0 => Err(Error::PackageNotFound {
            version: v,
            dir: releases.to_path_buf(),
        }),
        1 => Ok(found.remove(0)),
        _ => Err(Error::refused(format!(
            "refused: several packages hold version {v} ({}); pass --package FILE",
            found
                .iter()
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}
