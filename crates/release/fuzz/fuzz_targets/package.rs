//! Package verification and extraction from arbitrary bytes, through the same public API the
//! release store uses (`package::verify`, `package::extract`), with small limits.
//!
//! Beyond "no panic", it checks what the store relies on:
//! - `verify` and `extract` agree: extract never accepts what verify refuses, and refuses what
//!   verify accepts only for an I/O reason (e.g. a name too long for the file system);
//! - a refused extraction leaves nothing behind (the destination does not exist);
//! - an accepted one holds only regular files and directories inside the destination, no
//!   setuid/setgid/sticky bits, and exactly the byte count both functions reported.
#![no_main]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use orch_release::package::{extract, verify};
use orch_release::{Error, Limits};

/// The name the seed packages carry (`orchestrator package build --name app --version 1.0.0`),
/// so the fuzzer starts from packages whose manifest matches the file name.
const FILE: &str = "app-1.0.0.zip";

const LIMITS: Limits = Limits {
    max_total_bytes: 1 << 20,
    max_entries: 64,
};

/// Regular-file bytes under `dir`; panics on anything that is neither file nor directory.
fn tree_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in fs::read_dir(dir).expect("read extracted dir") {
        let e = e.expect("dir entry");
        let meta = fs::symlink_metadata(e.path()).expect("stat extracted entry");
        let mode = meta.permissions().mode();
        assert_eq!(
            mode & 0o7000,
            0,
            "{:?} has special mode bits {mode:o}",
            e.path()
        );
        if meta.is_dir() {
            total += tree_bytes(&e.path());
        } else {
            assert!(
                meta.is_file(),
                "{:?} is neither file nor directory",
                e.path()
            );
            total += meta.len();
        }
    }
    total
}

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("temp dir");
    let zip = dir.path().join(FILE);
    fs::write(&zip, data).expect("write input");
    let dest = dir.path().join("out");

    let verified = verify(&zip, None, None, &LIMITS);
    let extracted = extract(&zip, &dest, None, None, &LIMITS);

    match (&verified, &extracted) {
        (Ok(v), Ok(x)) => {
            assert_eq!(v, x, "verify and extract report different packages");
            assert!(x.uncompressed_bytes <= LIMITS.max_total_bytes);
            assert!(x.entries <= LIMITS.max_entries);
            assert_eq!(tree_bytes(&dest), x.uncompressed_bytes);
        }
        (Err(_), Ok(x)) => panic!("extract accepted what verify refused: {x:?}, {verified:?}"),
        (Ok(_), Err(e)) => {
            assert!(
                matches!(e, Error::Io { .. }),
                "verify accepted what extract refused: {e}"
            );
            assert!(!dest.exists(), "a refused extraction left {dest:?}");
        }
        (Err(_), Err(_)) => assert!(!dest.exists(), "a refused extraction left {dest:?}"),
    }
    // Nothing was written beside the destination (e.g. by a path escaping it).
    let mut names: Vec<_> = fs::read_dir(dir.path())
        .expect("read temp dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    names.sort();
    let expected: Vec<std::ffi::OsString> = if extracted.is_ok() {
        vec![FILE.into(), "out".into()]
    } else {
        vec![FILE.into()]
    };
    assert_eq!(names, expected, "unexpected files beside the package");
});
