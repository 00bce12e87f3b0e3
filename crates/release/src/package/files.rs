//! The record of an unpacked release's files (`releases/<v>.files`): for every regular file, its
//! entry name, CRC-32 and identity on disk (device, inode, size, modification and change times:
//! [`orch_package::verified::identity_of`]), taken when the release was unpacked. A later patch
//! release may then share an unchanged file after a `stat` instead of reading it back for its
//! CRC: the file is the one that was unpacked, untouched since. Any write to it (which changes
//! its modification and change times, the latter not settable from user space), a replacement
//! (another inode) or a new link to it (which changes its change time) makes its line stale, and
//! a stale, missing or unreadable record only means the bytes are read and checked as before: it
//! never lets a file be shared that would not be shared without it.
//!
//! File times have the file system's clock granularity (a few milliseconds on ext4), so a write
//! in the same tick as the change time that was recorded would leave the identity unchanged.
//! As git does for its index ("racily clean" entries), a line is trusted only when the file's
//! recorded change time is strictly older than the record itself: a later write then falls in
//! a later tick than the recorded one and changes the identity.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

const HEADER: &str = "orch-release-files 1";

/// What the record says of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    pub crc32: u32,
    pub identity: String,
}

/// Entry name -> what was recorded of its file.
pub type FileRecord = HashMap<String, Known>;

/// `releases/<v>.files` for the release directory `releases/<v>`.
pub fn record_path(release_dir: &Path) -> PathBuf {
    let mut s = release_dir.as_os_str().to_owned();
    s.push(".files");
    PathBuf::from(s)
}

/// The record's text. Names holding a line break are left out (they cannot be one line).
pub fn render(files: &[(String, Known)]) -> String {
    let mut out = String::with_capacity(64 * files.len() + HEADER.len() + 1);
    out.push_str(HEADER);
    out.push('\n');
    for (name, k) in files {
        if name.contains(['\n', '\r']) {
            continue;
        }
        let _ = writeln!(out, "{:08x} {}\t{name}", k.crc32, k.identity);
    }
    out
}

/// Parses a record; `None` when it is not one (then nothing is known and files are read).
pub fn parse(text: &str) -> Option<FileRecord> {
    let mut lines = text.lines();
    if lines.next()? != HEADER {
        return None;
    }
    let mut out = HashMap::new();
    for line in lines {
        let (left, name) = line.split_once('\t')?;
        let (crc, identity) = left.split_once(' ')?;
        if crc.len() != 8 || identity.split(' ').count() != 5 {
            return None;
        }
        let crc32 = u32::from_str_radix(crc, 16).ok()?;
        out.insert(
            name.to_string(),
            Known {
                crc32,
                identity: identity.to_string(),
            },
        );
    }
    Some(out)
}

/// The record of the release in `release_dir`, empty when there is none or it is unreadable;
/// without the lines whose change time is not older than the record (see the module's note).
pub fn read(release_dir: &Path) -> FileRecord {
    let path = record_path(release_dir);
    let Ok(file) = std::fs::File::open(&path) else {
        return FileRecord::default();
    };
    let Ok(meta) = file.metadata() else {
        return FileRecord::default();
    };
    let written = (meta.mtime(), meta.mtime_nsec());
    let mut text = String::new();
    if std::io::Read::read_to_string(&mut &file, &mut text).is_err() {
        return FileRecord::default();
    }
    let mut record = parse(&text).unwrap_or_default();
    record.retain(|_, k| change_time(&k.identity).is_some_and(|c| c < written));
    record
}

/// The change time (seconds, nanoseconds) of an identity: its last field, `s.nnnnnnnnn`.
fn change_time(identity: &str) -> Option<(i64, i64)> {
    let (s, ns) = identity.rsplit(' ').next()?.split_once('.')?;
    Some((s.parse().ok()?, ns.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_not_older_than_the_record_are_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let rel = dir.path().join("4.2.1");
        let line = |ctime: &str| Known {
            crc32: 1,
            identity: format!("1 2 3 4.000000000 {ctime}"),
        };
        let text = render(&[
            ("old".into(), line("1.000000000")),
            ("future".into(), line("99999999999.000000000")),
        ]);
        std::fs::write(record_path(&rel), text).unwrap();
        let r = read(&rel);
        assert!(r.contains_key("old"));
        assert!(!r.contains_key("future"));
        assert!(read(&dir.path().join("4.2.2")).is_empty());
    }

    #[test]
    fn a_record_round_trips_and_junk_is_no_record() {
        let k = Known {
            crc32: 0xdead_beef,
            identity: "1 2 3 4.000000005 6.000000007".into(),
        };
        let text = render(&[
            ("bin/app".into(), k.clone()),
            ("a\tb".into(), k.clone()),
            ("bad\nname".into(), k.clone()),
        ]);
        let r = parse(&text).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r["bin/app"], k);
        assert_eq!(r["a\tb"], k);
        for junk in [
            "",
            "orch-release-files 2\n",
            "orch-release-files 1\nzz 1 2 3 4 5\tx\n",
            "orch-release-files 1\n0000000a 1 2 3\tx\n",
            "orch-release-files 1\n0000000a 1 2 3 4 5 x\n",
        ] {
            assert_eq!(parse(junk), None, "{junk:?}");
        }
        assert_eq!(change_time(&k.identity), Some((6, 7)));
        assert_eq!(
            record_path(Path::new("/r/releases/4.2.1")),
            Path::new("/r/releases/4.2.1.files")
        );
    }
}
