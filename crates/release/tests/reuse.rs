//! A patch release shares its predecessor's unchanged files (issue #15): unpacking it hard-links
//! every file whose bytes equal the running release's instead of inflating them again, and
//! uninstalling either release leaves the other's files whole.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::*;
use orch_release::{PackageSource, package};

/// A source tree of 30 files (a few KB each) and `bin/app`.
fn source(dir: &Path) {
    fs::create_dir_all(dir.join("bin")).unwrap();
    fs::write(dir.join("bin/app"), b"app binary\n".repeat(500)).unwrap();
    for i in 0..30 {
        let d = dir.join(format!("lib/d{}", i % 4));
        fs::create_dir_all(&d).unwrap();
        fs::write(
            d.join(format!("f{i}.txt")),
            format!("file {i} ").repeat(300),
        )
        .unwrap();
    }
}

fn build(src: &Path, out: &Path, version: &str) -> PathBuf {
    fs::remove_file(src.join("release.toml")).ok();
    package::build(src, NAME, v(version), out).unwrap().0
}

fn ino(p: &Path) -> u64 {
    fs::metadata(p).unwrap().ino()
}

#[test]
fn a_patch_links_the_files_it_shares_with_the_running_release() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, root) = (tmp.path().join("src"), tmp.path().join("root"));
    let store = open(&root);
    source(&src);
    let first = build(&src, &root.join("releases"), "4.2.0");
    store.install(&file_src(&first), true).unwrap();
    // The patch: one file changed, one added.
    fs::write(src.join("lib/d1/f5.txt"), "changed").unwrap();
    fs::write(src.join("lib/d0/new.txt"), "new").unwrap();
    let patch = build(&src, &root.join("releases"), "4.2.1");
    store
        .unpack(&PackageSource::File {
            path: patch,
            sha256: None,
        })
        .unwrap();
    let (old, new) = (root.join("releases/4.2.0"), root.join("releases/4.2.1"));
    // Unchanged files are the same inode; the changed and new ones, and the manifest, are not.
    assert_eq!(ino(&old.join("bin/app")), ino(&new.join("bin/app")));
    assert_eq!(
        ino(&old.join("lib/d2/f6.txt")),
        ino(&new.join("lib/d2/f6.txt"))
    );
    assert_ne!(
        ino(&old.join("lib/d1/f5.txt")),
        ino(&new.join("lib/d1/f5.txt"))
    );
    assert_ne!(
        ino(&old.join("release.toml")),
        ino(&new.join("release.toml"))
    );
    assert_eq!(
        fs::read_to_string(new.join("lib/d1/f5.txt")).unwrap(),
        "changed"
    );
    assert_eq!(
        fs::read_to_string(new.join("lib/d0/new.txt")).unwrap(),
        "new"
    );
    // Every file of the new release holds the source's bytes.
    for i in 0..30 {
        let rel = format!("lib/d{}/f{i}.txt", i % 4);
        assert_eq!(
            fs::read(new.join(&rel)).unwrap(),
            fs::read(src.join(&rel)).unwrap(),
            "{rel}"
        );
    }
    // Moving to the patch and uninstalling the old release leaves the patch whole.
    store.install(&lookup_v("4.2.1"), true).unwrap();
    store.uninstall(v("4.2.0")).unwrap();
    assert!(!old.exists());
    assert_eq!(
        fs::read(new.join("bin/app")).unwrap(),
        fs::read(src.join("bin/app")).unwrap()
    );
    assert_consistent(&store);
}

#[test]
fn a_file_changed_on_disk_is_not_shared() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, root) = (tmp.path().join("src"), tmp.path().join("root"));
    let store = open(&root);
    source(&src);
    let first = build(&src, &root.join("releases"), "4.2.0");
    store.install(&file_src(&first), true).unwrap();
    // Someone rewrote an installed file in place (same size): its bytes no longer match what
    // its package says, so the patch inflates its own copy.
    let tampered = root.join("releases/4.2.0/lib/d2/f6.txt");
    let len = fs::metadata(&tampered).unwrap().len() as usize;
    fs::write(&tampered, "x".repeat(len)).unwrap();
    fs::write(src.join("lib/d1/f5.txt"), "changed").unwrap();
    let patch = build(&src, &root.join("releases"), "4.2.1");
    store.unpack(&file_src(&patch)).unwrap();
    let new = root.join("releases/4.2.1/lib/d2/f6.txt");
    assert_ne!(ino(&tampered), ino(&new));
    assert_eq!(
        fs::read(&new).unwrap(),
        fs::read(src.join("lib/d2/f6.txt")).unwrap()
    );
}

fn lookup_v(s: &str) -> PackageSource {
    PackageSource::Lookup(v(s))
}

/// Writes `<v>.files` again, a clock tick or more later, so that every line of it is trusted
/// (a line is trusted only when its file's change time is older than the record).
fn age_record(release: &Path, text: &str) {
    std::thread::sleep(std::time::Duration::from_millis(30));
    fs::write(package::files::record_path(release), text).unwrap();
}

#[test]
fn the_record_of_files_spares_reading_them_but_never_vouches_for_a_rewritten_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, root) = (tmp.path().join("src"), tmp.path().join("root"));
    let store = open(&root);
    source(&src);
    let first = build(&src, &root.join("releases"), "4.2.0");
    store.install(&file_src(&first), true).unwrap();
    let old = root.join("releases/4.2.0");
    let text = fs::read_to_string(package::files::record_path(&old)).unwrap();
    let record = package::files::parse(&text).unwrap();
    assert!(record.contains_key("bin/app") && record.contains_key("lib/d2/f6.txt"));
    age_record(&old, &text);

    // Rewritten in place (same size) after the record: its identity changed, so its bytes are
    // read back, and they are not the package's.
    let tampered = old.join("lib/d2/f6.txt");
    let len = fs::metadata(&tampered).unwrap().len() as usize;
    fs::write(&tampered, "x".repeat(len)).unwrap();
    // A record that names a file with the identity it has now is believed without reading it:
    // shown by a forged line for another rewritten file (which a read would refuse).
    let forged = old.join("lib/d3/f7.txt");
    let len = fs::metadata(&forged).unwrap().len() as usize;
    fs::write(&forged, "y".repeat(len)).unwrap();
    let mut lines: Vec<(String, package::files::Known)> = record.into_iter().collect();
    for (name, k) in &mut lines {
        if name == "lib/d3/f7.txt" {
            k.identity = orch_package::verified::identity_of(&fs::metadata(&forged).unwrap());
        }
    }
    age_record(&old, &package::files::render(&lines));

    fs::write(src.join("lib/d1/f5.txt"), "changed").unwrap();
    let patch = build(&src, &root.join("releases"), "4.2.1");
    store.unpack(&file_src(&patch)).unwrap();
    let new = root.join("releases/4.2.1");
    assert_ne!(ino(&tampered), ino(&new.join("lib/d2/f6.txt")));
    assert_eq!(
        fs::read(new.join("lib/d2/f6.txt")).unwrap(),
        fs::read(src.join("lib/d2/f6.txt")).unwrap()
    );
    assert_eq!(ino(&forged), ino(&new.join("lib/d3/f7.txt")), "not read");
    // Unchanged files are shared; the patch has its own record, and uninstalling drops it.
    assert_eq!(ino(&old.join("bin/app")), ino(&new.join("bin/app")));
    assert!(package::files::record_path(&new).exists());
    store.uninstall(v("4.2.1")).unwrap();
    assert!(!package::files::record_path(&new).exists());
    assert_consistent(&store);
}
