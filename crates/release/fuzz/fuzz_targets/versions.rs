//! The `versions` listing parser (`orch_types::parse_versions`, which reads the EMQX script's
//! output) on arbitrary text: no panic, and what it accepts renders with `format_versions` and
//! parses back to the same entries (newest first).
#![no_main]

use libfuzzer_sys::fuzz_target;
use orch_types::{Version, format_versions, parse_versions};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Version parsing on its own: whatever parses prints back to the same text's value.
    if let Ok(v) = text.parse::<Version>() {
        assert_eq!(v.to_string().parse::<Version>(), Ok(v));
    }
    if let Ok(entries) = parse_versions(text) {
        let rendered = format_versions(&entries);
        let mut again = parse_versions(&rendered).expect("a rendered listing parses");
        let mut sorted = entries.clone();
        sorted.sort_by_key(|e| std::cmp::Reverse(e.version));
        again.sort_by_key(|e| std::cmp::Reverse(e.version));
        assert_eq!(again, sorted);
    }
});
