//! Domain types shared by every layer of the orchestrator: release versions, release states, node
//! identifiers and version listings. Pure data with validation and serde; no I/O.
//!
//! Every type that comes from outside (a user, a file, the network) has a `FromStr`/`new` that
//! validates it, so code holding one of these values can rely on its invariants.

pub mod rollout;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a value from outside was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error(
        "invalid version {0:?}: expected strict x.y.z with decimal numbers and no leading zeros (for example 4.2.1)"
    )]
    Version(String),
    #[error("invalid release state {0:?}: expected one of unpacked, current, permanent, old")]
    ReleaseState(String),
    #[error(
        "invalid node id {0:?}: use 1-64 characters from A-Z a-z 0-9 . _ -, not starting with '.' or '-'"
    )]
    NodeId(String),
    #[error(
        "invalid package name {0:?}: use 1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit"
    )]
    PackageName(String),
    #[error("invalid rollout id {0:?}: expected r followed by its number (for example r000042)")]
    RolloutId(String),
    #[error("invalid on-failure policy {0:?}: expected rollback or pause")]
    OnFailure(String),
    #[error("invalid phase {0:?}")]
    Phase(String),
    #[error("invalid node step {0:?}")]
    NodeStep(String),
    #[error(
        "invalid node count {0:?}: expected a number of nodes (at least 1) or a percentage from 1% to 100% (for example 2 or 25%)"
    )]
    NodeCount(String),
}

impl ParseError {
    /// What a refusal shows of the refused text: its first 64 characters.
    pub(crate) fn shown(s: &str) -> String {
        s.chars().take(64).collect()
    }
}

/// Why a node's labels were refused ([`check_labels`]). The offending key is cut to 64
/// characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error("{0} labels, at most {MAX_LABELS}")]
    TooMany(usize),
    #[error("label key {0:?} must be 1-{MAX_LABEL_KEY} bytes without control characters")]
    BadKey(String),
    #[error(
        "the value of label {0:?} must be at most {MAX_LABEL_VALUE} bytes without control characters"
    )]
    BadValue(String),
}

/// `error` and its causes on one line, `what failed: why: why`, each cause once: a cause whose
/// text its parent already shows (errors that embed their source in their message) is not
/// repeated. For messages that leave the process as text (a gRPC status); a local caller that
/// has `anyhow` prints the chain with `{:#}` instead.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// A release version: strict `major.minor.patch`, ordered numerically (4.2.10 > 4.2.9).
///
/// Leading zeros are refused so that each version has exactly one spelling (and one directory).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub major: u64,
    pub minor: u64,
    pub patch: u64,
}

impl Version {
    pub const fn new(major: u64, minor: u64, patch: u64) -> Self {
        Version {
            major,
            minor,
            patch,
        }
    }

    /// A hot upgrade or downgrade is only allowed between versions of the same `major.minor`.
    pub fn is_patch_hop(&self, other: &Version) -> bool {
        self.major == other.major && self.minor == other.minor
    }
}

impl FromStr for Version {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseError::Version(s.chars().take(64).collect());
        let mut parts = s.split('.');
        let mut next = || -> Result<u64, ParseError> {
            let p = parts.next().ok_or_else(err)?;
            if p.is_empty()
                || p.len() > 19
                || !p.bytes().all(|b| b.is_ascii_digit())
                || (p.len() > 1 && p.starts_with('0'))
            {
                return Err(err());
            }
            p.parse().map_err(|_| err())
        };
        let v = Version::new(next()?, next()?, next()?);
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(v)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl Serialize for Version {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The state of one release in a node's store, as Erlang/OTP's release_handler names them.
///
/// A release that is both running and permanent shows as `Permanent`; `Current` means running
/// but not permanent (a restart would boot the permanent one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReleaseState {
    Unpacked,
    Current,
    Permanent,
    Old,
}

impl ReleaseState {
    pub fn as_str(&self) -> &'static str {
        match self {
            ReleaseState::Unpacked => "unpacked",
            ReleaseState::Current => "current",
            ReleaseState::Permanent => "permanent",
            ReleaseState::Old => "old",
        }
    }
}

impl fmt::Display for ReleaseState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ReleaseState {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "unpacked" => ReleaseState::Unpacked,
            "current" => ReleaseState::Current,
            "permanent" => ReleaseState::Permanent,
            "old" => ReleaseState::Old,
            _ => return Err(ParseError::ReleaseState(s.chars().take(64).collect())),
        })
    }
}

/// One line of a `versions` listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionEntry {
    pub version: Version,
    pub state: ReleaseState,
}

/// Renders a listing exactly as operators' scripts parse it (EMQX 4.x `emqx versions`):
/// a header line, then `* VERSION<TAB>STATE` per release, newest first.
pub fn format_versions(entries: &[VersionEntry]) -> String {
    let mut sorted: Vec<&VersionEntry> = entries.iter().collect();
    sorted.sort_by_key(|e| std::cmp::Reverse(e.version));
    let mut out = String::from("Installed versions:\n");
    for e in sorted {
        out.push_str(&format!("* {}\t{}\n", e.version, e.state));
    }
    out
}

/// Parses the `versions` format back (used by the EMQX driver). Lines that are not entries are
/// skipped, so a banner or warning printed by the tool does not break parsing.
pub fn parse_versions(text: &str) -> Result<Vec<VersionEntry>, ParseError> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("* ") else {
            continue;
        };
        let mut it = rest.split(['\t', ' ']).filter(|s| !s.is_empty());
        let (Some(v), Some(st)) = (it.next(), it.next()) else {
            continue;
        };
        out.push(VersionEntry {
            version: v.parse()?,
            state: st.parse()?,
        });
    }
    Ok(out)
}

fn valid_ident(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        && s.as_bytes()[0].is_ascii_alphanumeric()
}

/// A node identifier. Restricted to a path- and log-safe alphabet because ids end up in file
/// names, certificate SANs and log lines.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(String);

impl NodeId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for NodeId {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if valid_ident(s) {
            Ok(NodeId(s.to_string()))
        } else {
            Err(ParseError::NodeId(s.chars().take(64).collect()))
        }
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for NodeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Validates a package name (the `<name>` of `<name>-<version>.zip`).
pub fn validate_package_name(s: &str) -> Result<(), ParseError> {
    if valid_ident(s) {
        Ok(())
    } else {
        Err(ParseError::PackageName(s.chars().take(64).collect()))
    }
}

/// Splits a package file name `<name>-<version>.zip` into its parts, validating both.
pub fn parse_package_file_name(file_name: &str) -> Option<(String, Version)> {
    let stem = file_name.strip_suffix(".zip")?;
    let (name, version) = stem.rsplit_once('-')?;
    validate_package_name(name).ok()?;
    Some((name.to_string(), version.parse().ok()?))
}

/// A rollout's id: its number, assigned in creation order by the replicated state. Shown (and
/// serialized) as `r` plus at least six digits (`r000042`); ordered by the number, so
/// `r1000000` comes after `r999999` (as strings it would not). `FromStr` also takes `r42` and
/// `42`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RolloutId(pub u64);

impl FromStr for RolloutId {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s.strip_prefix('r').unwrap_or(s);
        if digits.is_empty() || digits.len() > 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ParseError::RolloutId(s.chars().take(64).collect()));
        }
        digits
            .parse()
            .map(RolloutId)
            .map_err(|_| ParseError::RolloutId(s.chars().take(64).collect()))
    }
}

impl fmt::Display for RolloutId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "r{:06}", self.0)
    }
}

impl Serialize for RolloutId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RolloutId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// When a node's reported releases were read: which agent process (`boot`, fixed at its start)
/// and how many state-changing steps it had completed then (`rev`). Reports from one process
/// are ordered by `rev`, so the coordinators can drop a report that arrives after a newer one
/// (a periodic registration read just before a step, delivered just after the step's own
/// report). Reports from different processes are not ordered: the newest arrival wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct VersionStamp {
    pub boot: u64,
    pub rev: u64,
}

impl VersionStamp {
    /// From the wire: `boot == 0` means the sender does not stamp its reports.
    pub fn from_wire(boot: u64, rev: u64) -> Option<VersionStamp> {
        (boot != 0).then_some(VersionStamp { boot, rev })
    }

    /// True when this report was read before `other` by the same agent process.
    pub fn is_older_than(&self, other: &VersionStamp) -> bool {
        self.boot == other.boot && self.rev < other.rev
    }
}

/// True when a report stamped `new` must not replace what was stamped `old`.
pub fn stale_report(new: Option<VersionStamp>, old: Option<VersionStamp>) -> bool {
    matches!((new, old), (Some(n), Some(o)) if n.is_older_than(&o))
}

/// Most labels a node may carry, and the longest key and value. Labels live in the
/// coordinators' replicated state and in every `nodes` answer, so a registration must not be
/// able to grow them without bound.
pub const MAX_LABELS: usize = 64;
pub const MAX_LABEL_KEY: usize = 128;
pub const MAX_LABEL_VALUE: usize = 1024;

/// Checks a node's labels against the bounds above (keys 1..=128 bytes, values up to 1024,
/// no control characters). The error names the offending key, cut to 64 characters.
pub fn check_labels<'a>(
    labels: impl ExactSizeIterator<Item = (&'a String, &'a String)>,
) -> Result<(), LabelError> {
    if labels.len() > MAX_LABELS {
        return Err(LabelError::TooMany(labels.len()));
    }
    for (k, v) in labels {
        if k.is_empty() || k.len() > MAX_LABEL_KEY || k.chars().any(char::is_control) {
            return Err(LabelError::BadKey(ParseError::shown(k)));
        }
        if v.len() > MAX_LABEL_VALUE || v.chars().any(char::is_control) {
            return Err(LabelError::BadValue(ParseError::shown(k)));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Ids compared as strings put r1000000 before r999999 (fences and "the latest rollout"
    /// went wrong after a million rollouts): they compare by number.
    #[test]
    fn rollout_ids_order_by_number() {
        let a: RolloutId = "r999999".parse().unwrap();
        let b: RolloutId = "r1000000".parse().unwrap();
        assert!(a < b);
        assert!("r999999" > "r1000000", "as strings they would not");
        assert_eq!(b.to_string(), "r1000000");
        assert_eq!(RolloutId(42).to_string(), "r000042");
        assert_eq!("r42".parse::<RolloutId>(), Ok(RolloutId(42)));
        assert_eq!("42".parse::<RolloutId>(), Ok(RolloutId(42)));
        for bad in [
            "",
            "r",
            "rx1",
            "r-1",
            "r1 ",
            "r99999999999999999999999",
            "é",
        ] {
            assert!(bad.parse::<RolloutId>().is_err(), "{bad:?}");
        }
        let json =
            serde_json::to_string(&std::collections::BTreeMap::from([(b, 1), (a, 2)])).unwrap();
        assert_eq!(json, r#"{"r999999":2,"r1000000":1}"#);
        let back: std::collections::BTreeMap<RolloutId, u32> = serde_json::from_str(&json).unwrap();
        assert_eq!(back.keys().copied().collect::<Vec<_>>(), vec![a, b]);
    }

    #[test]
    fn version_parse_strict() {
        assert_eq!("4.2.1".parse::<Version>(), Ok(Version::new(4, 2, 1)));
        assert_eq!("0.0.0".parse::<Version>(), Ok(Version::new(0, 0, 0)));
        for bad in [
            "",
            "4",
            "4.2",
            "4.2.1.0",
            "v4.2.1",
            "4.2.1-rc1",
            "4.02.1",
            "4.2.01",
            " 4.2.1",
            "4.2.1 ",
            "4..1",
            "4.2.",
            "+4.2.1",
            "-4.2.1",
            "4.2.x",
            "99999999999999999999.0.0",
            "4.2.1\n",
        ] {
            assert!(bad.parse::<Version>().is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn version_orders_numerically() {
        let a: Version = "4.2.10".parse().unwrap();
        let b: Version = "4.2.9".parse().unwrap();
        assert!(a > b);
        assert!("10.0.0".parse::<Version>().unwrap() > "9.9.9".parse::<Version>().unwrap());
    }

    #[test]
    fn patch_hop() {
        let v = |s: &str| s.parse::<Version>().unwrap();
        assert!(v("4.2.0").is_patch_hop(&v("4.2.7")));
        assert!(!v("4.2.0").is_patch_hop(&v("4.3.0")));
        assert!(!v("4.2.0").is_patch_hop(&v("5.2.0")));
    }

    #[test]
    fn versions_format_is_byte_exact_and_round_trips() {
        let entries = vec![
            VersionEntry {
                version: "4.2.0".parse().unwrap(),
                state: ReleaseState::Old,
            },
            VersionEntry {
                version: "4.2.1".parse().unwrap(),
                state: ReleaseState::Permanent,
            },
        ];
        let text = format_versions(&entries);
        assert_eq!(
            text,
            "Installed versions:\n* 4.2.1\tpermanent\n* 4.2.0\told\n"
        );
        let mut back = parse_versions(&text).unwrap();
        back.reverse();
        assert_eq!(back, entries);
        assert_eq!(format_versions(&[]), "Installed versions:\n");
    }

    #[test]
    fn json_shapes() {
        let e = VersionEntry {
            version: "4.2.1".parse().unwrap(),
            state: ReleaseState::Permanent,
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"version":"4.2.1","state":"permanent"}"#
        );
        assert!(serde_json::from_str::<Version>(r#""4.2""#).is_err());
    }

    #[test]
    fn node_ids() {
        assert!("n1".parse::<NodeId>().is_ok());
        assert!("node-1.eu_west".parse::<NodeId>().is_ok());
        for bad in [
            "",
            "../n1",
            "n/1",
            ".hidden",
            "-x",
            "a b",
            &"x".repeat(65),
            "n1\0",
        ] {
            assert!(bad.parse::<NodeId>().is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn package_file_names() {
        assert_eq!(
            parse_package_file_name("emqx-ee-4.2.1.zip"),
            Some(("emqx-ee".to_string(), Version::new(4, 2, 1)))
        );
        assert_eq!(parse_package_file_name("emqx-4.2.zip"), None);
        assert_eq!(parse_package_file_name("-4.2.1.zip"), None);
        assert_eq!(parse_package_file_name("emqx-4.2.1.tar"), None);
    }

    proptest! {
        #[test]
        fn version_display_parse_round_trip(a in 0u64..100_000, b in 0u64..100_000, c in 0u64..100_000) {
            let v = Version::new(a, b, c);
            prop_assert_eq!(v.to_string().parse::<Version>(), Ok(v));
        }

        #[test]
        fn version_parse_never_panics(s in ".{0,40}") {
            let _ = s.parse::<Version>();
        }
    }

    #[test]
    fn labels_are_bounded() {
        use std::collections::BTreeMap;
        let ok: BTreeMap<String, String> = [("zone".to_string(), "eu-1".to_string())]
            .into_iter()
            .collect();
        assert!(check_labels(ok.iter()).is_ok());
        let max: BTreeMap<String, String> = (0..MAX_LABELS)
            .map(|i| (format!("k{i}"), "v".repeat(MAX_LABEL_VALUE)))
            .collect();
        assert!(
            check_labels(max.iter()).is_ok(),
            "the bounds themselves are allowed"
        );
        let mut over = max.clone();
        over.insert("one-more".into(), String::new());
        assert!(
            check_labels(over.iter())
                .unwrap_err()
                .to_string()
                .contains("at most 64")
        );
        for (k, v) in [
            (String::new(), "v".to_string()),
            ("k".repeat(MAX_LABEL_KEY + 1), "v".to_string()),
            ("a\tb".to_string(), "v".to_string()),
            ("zone".to_string(), "v".repeat(MAX_LABEL_VALUE + 1)),
            ("zone".to_string(), "eu\n1".to_string()),
        ] {
            let m: BTreeMap<String, String> = [(k.clone(), v)].into_iter().collect();
            let e = check_labels(m.iter()).unwrap_err().to_string();
            assert!(e.len() < 200, "{e}");
        }
    }
}
