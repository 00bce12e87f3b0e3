//! Housekeeping (pure): which releases a node can do without.

use orch_types::{ReleaseState, Version, VersionEntry};

/// The releases to uninstall from a node that lists `releases` so that it keeps its newest
/// `keep` ones: every release beyond the newest `keep` versions, except the `current` and the
/// `permanent` one (never removed, and counted among the kept) and those in `needed` (e.g. a
/// release a running rollout may switch to). Newest first, as `versions` lists them.
///
/// With `keep` 0 only the current and permanent releases (and `needed`) stay.
pub fn prune_candidates(
    releases: &[VersionEntry],
    keep: usize,
    needed: &[Version],
) -> Vec<Version> {
    let mut sorted: Vec<&VersionEntry> = releases.iter().collect();
    sorted.sort_by_key(|e| std::cmp::Reverse(e.version));
    sorted.dedup_by_key(|e| e.version);
    sorted
        .iter()
        .enumerate()
        .filter(|(i, e)| {
            *i >= keep
                && matches!(e.state, ReleaseState::Old | ReleaseState::Unpacked)
                && !needed.contains(&e.version)
        })
        .map(|(_, e)| e.version)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(rows: &[(&str, ReleaseState)]) -> Vec<VersionEntry> {
        rows.iter()
            .map(|(v, s)| VersionEntry {
                version: v.parse().unwrap(),
                state: *s,
            })
            .collect()
    }

    fn vs(v: &[&str]) -> Vec<Version> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    use ReleaseState::*;

    #[test]
    fn keeps_the_newest_and_never_current_or_permanent() {
        let r = rel(&[
            ("4.2.0", Old),
            ("4.2.3", Permanent),
            ("4.2.1", Old),
            ("4.2.2", Unpacked),
            ("4.1.9", Old),
        ]);
        assert_eq!(prune_candidates(&r, 3, &[]), vs(&["4.2.0", "4.1.9"]));
        assert_eq!(
            prune_candidates(&r, 1, &[]),
            vs(&["4.2.2", "4.2.1", "4.2.0", "4.1.9"])
        );
        assert_eq!(prune_candidates(&r, 5, &[]), Vec::<Version>::new());
        assert_eq!(
            prune_candidates(&r, 0, &vs(&["4.2.0"])),
            vs(&["4.2.2", "4.2.1", "4.1.9"])
        );
        // An old permanent release behind a newer current one stays, whatever its age.
        let r = rel(&[("4.2.5", Current), ("4.2.4", Old), ("4.2.0", Permanent)]);
        assert_eq!(prune_candidates(&r, 0, &[]), vs(&["4.2.4"]));
        assert_eq!(prune_candidates(&r, 1, &[]), vs(&["4.2.4"]));
        assert_eq!(prune_candidates(&r, 2, &[]), Vec::<Version>::new());
    }

    /// Exhaustive over small stores: what stays is exactly the current and permanent
    /// releases, the needed ones and the newest `keep`; nothing else.
    #[test]
    fn exhaustive_small_stores() {
        let versions = vs(&["4.2.0", "4.2.1", "4.2.2", "4.2.3", "4.2.4"]);
        let states = [
            None,
            Some(Old),
            Some(Unpacked),
            Some(Current),
            Some(Permanent),
        ];
        let mut assignment = vec![0usize; versions.len()];
        loop {
            let releases: Vec<VersionEntry> = versions
                .iter()
                .zip(&assignment)
                .filter_map(|(v, &s)| states[s].map(|state| VersionEntry { version: *v, state }))
                .collect();
            for keep in 0..=6 {
                for needed in [vec![], vs(&["4.2.0"]), vs(&["4.2.4", "4.2.2"])] {
                    let gone = prune_candidates(&releases, keep, &needed);
                    let mut newest: Vec<Version> = releases.iter().map(|e| e.version).collect();
                    newest.sort_by(|a, b| b.cmp(a));
                    for e in &releases {
                        let rank = newest.iter().position(|v| *v == e.version).unwrap();
                        let must_stay = matches!(e.state, Current | Permanent)
                            || needed.contains(&e.version)
                            || rank < keep;
                        assert_eq!(
                            gone.contains(&e.version),
                            !must_stay,
                            "{releases:?} keep {keep} needed {needed:?}: {gone:?}"
                        );
                    }
                    assert!(
                        gone.windows(2).all(|w| w[0] > w[1]),
                        "newest first: {gone:?}"
                    );
                }
            }
            // Next assignment (odometer).
            let mut i = 0;
            loop {
                if i == assignment.len() {
                    return;
                }
                assignment[i] += 1;
                if assignment[i] < states.len() {
                    break;
                }
                assignment[i] = 0;
                i += 1;
            }
        }
    }
}
