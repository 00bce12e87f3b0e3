//! Only changed bytes on the wire to the coordinators too (issue #15): a package whose chunks the
//! coordinators hold already (the release it patches) is uploaded as the chunks the leader
//! lacks, and copied to the other coordinators the same way; each rebuilds the file from its
//! stored packages and checks size and sha256 of the whole before storing it.
//!
//! Build the binaries first: `cargo build --bins`.

use orch_tests::cluster::*;

/// `(sent, size)` from the CLI's "Sent N of M bytes" line.
fn delta_of(stderr: &str) -> Option<(u64, u64)> {
    let line = stderr.lines().find(|l| l.starts_with("Sent "))?;
    let mut words = line.split_whitespace();
    let sent = words.nth(1)?.parse().ok()?;
    let size = words.nth(1)?.parse().ok()?;
    Some((sent, size))
}

fn sha256_hex(path: &std::path::Path) -> String {
    orch_package::digest::sha256_file(path).unwrap().0
}

#[test]
fn a_patch_upload_sends_only_the_chunks_the_coordinators_lack_and_every_one_rebuilds_it() {
    let c = Cluster::start(ClusterOpts::demo(3, 1));
    for v in ["4.2.1", "4.2.2"] {
        let pkg = c.package(v, false);
        let out = c.cli(&[
            "rollout",
            v,
            "--package",
            pkg.to_str().unwrap(),
            "--min-healthy-time",
            "0s",
            "--json",
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "rollout {v} failed:\n{stderr}");
        let (sent, size) =
            delta_of(&stderr).unwrap_or_else(|| panic!("no delta upload of {v}:\n{stderr}"));
        eprintln!("{v}: {sent} of {size} bytes sent");
        if v == "4.2.2" {
            // Consecutive demo releases differ in their manifest, not in the service binary
            // that makes up most of the package.
            assert!(sent * 4 < size, "{sent} of {size} bytes sent for {v}");
        }
        // Every coordinator holds the exact package: the followers rebuilt it from the
        // chunks the leader sent them and their own copy of the previous release.
        let sha = sha256_hex(&pkg);
        for coord in &c.coords {
            let blob = coord.data_dir.join("blobs").join(&sha);
            assert!(blob.is_file(), "coordinator {} lacks {v}", coord.id);
            assert_eq!(sha256_hex(&blob), sha, "coordinator {}", coord.id);
            // Its chunk index is the list it was rebuilt from: written by delta transfers.
            assert!(
                orch_package::chunks::cache_path(&blob).is_file(),
                "coordinator {} did not get {v} as a delta",
                coord.id
            );
        }
        for coord in &c.coords {
            let log = coord.log();
            assert!(!log.contains("delta copy failed"), "{log}");
        }
        assert_eq!(
            c.node("n1").health().map(|h| h.0).as_deref(),
            Some(v),
            "n1 runs {v}"
        );
    }
}
