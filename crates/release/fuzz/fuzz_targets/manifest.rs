//! The `release.toml` parser (`package::parse_manifest`) on arbitrary text: no panic, and what
//! it accepts is a valid package name and a version that prints and re-parses to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use orch_release::package::parse_manifest;
use orch_types::{Version, validate_package_name};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok((name, version)) = parse_manifest(text) {
        assert!(
            validate_package_name(&name).is_ok(),
            "accepted name {name:?}"
        );
        assert_eq!(version.to_string().parse::<Version>(), Ok(version));
        // What `package build` writes for it parses back to the same identity.
        let regenerated = format!("name = \"{name}\"\nversion = \"{version}\"\n");
        assert_eq!(parse_manifest(&regenerated), Ok((name, version)));
    }
});
