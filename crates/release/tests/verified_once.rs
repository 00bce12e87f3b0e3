//! One verification pass (issue #15): a package received with [`orch_package::IncomingFile`] is
//! hashed while it arrives, and extraction trusts that digest instead of hashing the file again,
//! for as long as the file is the one that was verified. Any change to the file voids it.

mod common;

use std::fs;
use std::io::Write;

use common::*;
use orch_package::{IncomingFile, verified};
use orch_release::{Limits, package};

/// `emqx-1.0.0.zip` received into `dir` as a push does: written while hashed, checked,
/// renamed into place. Returns its path and digest.
fn receive(work: &std::path::Path, dir: &std::path::Path) -> (std::path::PathBuf, String) {
    let built = build_pkg(
        work,
        &work.join("out"),
        "1.0.0",
        &Spec {
            filler: 20,
            ..Spec::default()
        },
    );
    let bytes = fs::read(&built).unwrap();
    let (digest, _) = package::sha256_file(&built).unwrap();
    fs::create_dir_all(dir).unwrap();
    let dest = dir.join("emqx-1.0.0.zip");
    let mut incoming = IncomingFile::create(&dest, &digest, bytes.len() as u64)
        .unwrap()
        .record_verified();
    for chunk in bytes.chunks(4096) {
        incoming.write(chunk).unwrap();
    }
    assert_eq!(incoming.finish().unwrap(), dest);
    (dest, digest)
}

#[test]
fn a_received_package_is_extracted_on_the_digest_it_arrived_with() {
    let tmp = tempfile::tempdir().unwrap();
    let (zip, digest) = receive(tmp.path(), &tmp.path().join("releases"));
    let f = fs::File::open(&zip).unwrap();
    assert_eq!(
        verified::recorded(&zip, &f).as_deref(),
        Some(digest.as_str())
    );
    let info = package::extract(
        &zip,
        &tmp.path().join("x1"),
        Some(&digest),
        Some(v("1.0.0")),
        &Limits::default(),
    )
    .unwrap();
    assert_eq!(info.sha256, digest);

    // Proof that extraction takes the recorded digest instead of hashing: evidence that
    // (falsely) names another digest for this very file is believed, and the expected digest
    // then does not match. Only the receiver writes this evidence, in a directory it owns.
    let other = "ab".repeat(32);
    verified::record(&zip, &f, &other).unwrap();
    let err = package::extract(
        &zip,
        &tmp.path().join("x2"),
        Some(&digest),
        Some(v("1.0.0")),
        &Limits::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains(&other), "{err}");
    assert!(!tmp.path().join("x2").exists());
}

#[test]
fn a_package_changed_after_it_arrived_is_hashed_again_and_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (zip, digest) = receive(tmp.path(), &tmp.path().join("releases"));
    // One byte appended after the verification: the evidence no longer applies, the file is
    // hashed, and the digest it arrived with does not match what is there now.
    fs::OpenOptions::new()
        .append(true)
        .open(&zip)
        .unwrap()
        .write_all(b"x")
        .unwrap();
    assert_eq!(
        verified::recorded(&zip, &fs::File::open(&zip).unwrap()),
        None
    );
    let err = package::extract(
        &zip,
        &tmp.path().join("x"),
        Some(&digest),
        Some(v("1.0.0")),
        &Limits::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("SHA-256") || err.contains("sha256") || err.contains("digest"),
        "{err}"
    );
    assert!(!tmp.path().join("x").exists());
}

#[test]
fn the_store_unpacks_a_received_package_without_hashing_it_again() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let store = open(&root);
    let (zip, digest) = receive(tmp.path(), &root.join("releases"));
    // The false-evidence probe again, through the store: it must take the recorded digest.
    let f = fs::File::open(&zip).unwrap();
    verified::record(&zip, &f, &"cd".repeat(32)).unwrap();
    let src = orch_release::PackageSource::File {
        path: zip.clone(),
        sha256: Some(digest.clone()),
    };
    assert!(store.unpack(&src).is_err());
    verified::record(&zip, &f, &digest).unwrap();
    store.unpack(&src).unwrap();
    assert!(release_dirs(&store).contains(&v("1.0.0")));
    assert_consistent(&store);
}
