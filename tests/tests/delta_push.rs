//! Only changed bytes on the wire (issue #15): staging sends a node only the content-defined
//! chunks it holds in none of its packages; the agent copies the rest from the packages it has
//! and checks the whole file's size and sha256 as for a whole push.
//!
//! Build the binaries first: `cargo build --bins`.

use orch_tests::cluster::*;

/// `(sent, size)` from the agent's "Received package FILE: N of its M bytes sent" line.
fn delta_of(log: &str, file: &str) -> Option<(u64, u64)> {
    let needle = format!("Received package {file}: ");
    let line = log.lines().rev().find(|l| l.contains(&needle))?;
    let rest = &line[line.find(&needle)? + needle.len()..];
    let mut words = rest.split_whitespace();
    let sent = words.next()?.parse().ok()?;
    let size = words.nth(2)?.parse().ok()?;
    Some((sent, size))
}

#[test]
fn a_patch_release_sends_each_node_only_the_chunks_it_lacks() {
    let c = Cluster::start(ClusterOpts::demo(1, 2));
    for v in ["4.2.1", "4.2.2"] {
        let pkg = c.package(v, false);
        let out = c.cli_json(&[
            "rollout",
            v,
            "--package",
            pkg.to_str().unwrap(),
            "--min-healthy-time",
            "0s",
            "--json",
        ]);
        assert_eq!(out["phase"], "succeeded", "{out:#}");
        let file = format!("demo-service-{v}.zip");
        if v == "4.2.1" {
            // The nodes hold no package yet (their 4.2.0 came without one): a whole push.
            continue;
        }
        for n in ["n1", "n2"] {
            let node = c.node(n);
            // Every node runs the release the reassembled package holds.
            assert_eq!(node.health().map(|h| h.0).as_deref(), Some(v), "{n}");
            let log = node.agent().log();
            let (sent, size) = delta_of(&log, &file)
                .unwrap_or_else(|| panic!("{n}: no delta push of {file} in its log:\n{log}"));
            // Consecutive demo releases differ in their manifest, not in the service binary
            // that makes up most of the package: a small part of it crosses the wire.
            eprintln!("{n}: {sent} of {size} bytes sent for {file}");
            assert!(
                sent * 4 < size,
                "{n}: {sent} of {size} bytes sent for {file}"
            );
        }
    }
}
