//! Helpers shared by the integration tests: packages built with the real `package::build`,
//! tree snapshots, and the on-disk checks every test repeats.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use orch_release::{PackageSource, Store, StoreConfig, package};
use orch_types::Version;

pub const NAME: &str = "emqx";

pub fn v(s: &str) -> Version {
    s.parse().unwrap()
}

static SRC_COUNTER: AtomicU64 = AtomicU64::new(0);

/// What goes into a test package besides its generated `release.toml`.
#[derive(Default, Clone)]
pub struct Spec<'a> {
    /// Body of `hooks/activate` (a shell script; `#!/bin/sh` is prepended), made executable.
    pub hook: Option<&'a str>,
    /// Number of filler files (a few KB each, in a few subdirectories).
    pub filler: usize,
}

/// Builds `<out>/emqx-<version>.zip` (and its `.sha256`) with `package::build` from a fresh
/// source tree under `work`. Returns the zip's path.
pub fn build_pkg(work: &Path, out: &Path, version: &str, spec: &Spec<'_>) -> PathBuf {
    build_named(work, out, NAME, version, spec)
}

pub fn build_named(work: &Path, out: &Path, name: &str, version: &str, spec: &Spec<'_>) -> PathBuf {
    let n = SRC_COUNTER.fetch_add(1, Ordering::Relaxed);
    let src = work.join(format!("src-{name}-{version}-{n}"));
    fs::create_dir_all(src.join("bin")).unwrap();
    fs::write(src.join("bin/app"), format!("app {name} {version}\n")).unwrap();
    if let Some(body) = spec.hook {
        fs::create_dir_all(src.join("hooks")).unwrap();
        let hook = src.join("hooks/activate");
        fs::write(&hook, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).unwrap();
    }
    for i in 0..spec.filler {
        let dir = src.join(format!("lib/d{}", i % 7));
        fs::create_dir_all(&dir).unwrap();
        let line = format!("{version} filler line {i} ");
        fs::write(dir.join(format!("f{i}.txt")), line.repeat(40 + i % 200)).unwrap();
    }
    let (zip, digest) = package::build(&src, name, v(version), out).unwrap();
    assert_eq!(digest.len(), 64);
    fs::remove_dir_all(&src).unwrap();
    zip
}

pub fn file_src(path: &Path) -> PackageSource {
    PackageSource::File {
        path: path.to_path_buf(),
        sha256: None,
    }
}

pub fn open(root: &Path) -> Store {
    Store::open(StoreConfig::new(root)).unwrap()
}

pub fn open_with(root: &Path, f: impl FnOnce(&mut StoreConfig)) -> Store {
    let mut cfg = StoreConfig::new(root);
    f(&mut cfg);
    Store::open(cfg).unwrap()
}

/// `versions` rendered exactly as the CLI prints it.
pub fn listing(store: &Store) -> String {
    orch_types::format_versions(&store.versions().unwrap())
}

/// Directories under `releases/` whose name is a version.
pub fn release_dirs(store: &Store) -> BTreeSet<Version> {
    fs::read_dir(store.releases_dir())
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            let v = e.file_name().to_str()?.parse::<Version>().ok()?;
            e.file_type().unwrap().is_dir().then_some(v)
        })
        .collect()
}

/// Temporary entries of interrupted or running operations.
pub fn debris(store: &Store) -> Vec<String> {
    fs::read_dir(store.releases_dir())
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            [".unpack-", ".trash-", ".activate-", ".state.json.tmp-"]
                .iter()
                .any(|p| n.starts_with(p))
                .then_some(n)
        })
        .collect()
}

/// The checks that must hold whenever no writer runs: invariants, `versions` equals the
/// release directories on disk, and no temp debris.
pub fn assert_consistent(store: &Store) {
    let table = store.view().unwrap();
    table.check_invariants().unwrap();
    let listed: BTreeSet<Version> = store
        .versions()
        .unwrap()
        .iter()
        .map(|e| e.version)
        .collect();
    assert_eq!(listed, release_dirs(store), "versions vs directories");
    assert_eq!(debris(store), Vec::<String>::new(), "temp debris left");
}

/// One entry of a tree snapshot: kind, size (files only) and permission bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: char,
    pub size: u64,
    pub mode: u32,
    /// First bytes of small files, so a rewrite with the same size is still noticed.
    pub head: Vec<u8>,
}

/// Every path under `dir` (relative), with kind/size/mode. Does not follow symlinks.
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Node> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Node>) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            let meta = fs::symlink_metadata(&path).unwrap();
            let ft = meta.file_type();
            let kind = if ft.is_dir() {
                'd'
            } else if ft.is_file() {
                'f'
            } else if ft.is_symlink() {
                'l'
            } else {
                '?'
            };
            let head = if ft.is_file() && meta.len() <= 4096 {
                fs::read(&path).unwrap()
            } else {
                Vec::new()
            };
            out.insert(
                path.strip_prefix(base).unwrap().to_path_buf(),
                Node {
                    kind,
                    size: if ft.is_file() { meta.len() } else { 0 },
                    mode: meta.permissions().mode(),
                    head,
                },
            );
            if ft.is_dir() {
                walk(base, &path, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Polls `cond` every few milliseconds until it holds; panics with `what` after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether a process is gone or a zombie (killed but not yet reaped by its new parent).
pub fn process_dead(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => {
            // The state follows the parenthesised command name.
            let state = stat.rsplit_once(')').map(|(_, r)| r.trim_start());
            matches!(state.and_then(|s| s.chars().next()), Some('Z' | 'X'))
        }
    }
}
