//! What can be checked from a zip's central directory before anything is written: entry count,
//! declared sizes, names, types, and that the manifest exists.

use std::collections::HashMap;
use std::io::{Read, Seek};
use std::path::{Component, Path, PathBuf};

use super::{Limits, MANIFEST, bad};
use crate::error::Result;

/// Checks an entry name: relative, no `..`, no backslashes or NULs (which some unzippers
/// treat as separators or terminators).
pub(super) fn safe_relative_path(name: &str) -> Option<PathBuf> {
    if name.is_empty() || name.contains('\\') || name.contains('\0') || name.starts_with('/') {
        return None;
    }
    let p = Path::new(name);
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir => {}
            _ => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

const S_IFMT: u32 = 0o170000;
const S_IFREG: u32 = 0o100000;
const S_IFDIR: u32 = 0o040000;

pub(super) enum Kind {
    Dir,
    File { mode: u32 },
}

/// Classifies an entry, refusing links, device files, FIFOs, sockets and encryption.
pub(super) fn classify<R: Read + Seek>(
    zip: &Path,
    f: &zip::read::ZipFile<'_, R>,
    name: &str,
) -> Result<Kind> {
    if f.encrypted() {
        return Err(bad(zip, format!("entry {name:?} is encrypted")));
    }
    let mode = f.unix_mode();
    let ty = mode.map(|m| m & S_IFMT).unwrap_or(0);
    if f.is_symlink() || (ty != 0 && ty != S_IFREG && ty != S_IFDIR) {
        let what = match ty {
            0o120000 => "a symbolic link",
            0o020000 => "a character device",
            0o060000 => "a block device",
            0o010000 => "a FIFO",
            0o140000 => "a socket",
            _ => "not a regular file or directory",
        };
        return Err(bad(zip, format!("entry {name:?} is {what}")));
    }
    if f.is_dir() || ty == S_IFDIR {
        return Ok(Kind::Dir);
    }
    // Keep rwx bits only: no setuid/setgid/sticky from a package; owner can always read/write.
    let perm = mode.map(|m| m & 0o755).unwrap_or(0o644) | 0o600;
    Ok(Kind::File { mode: perm })
}

/// Opens the archive and checks everything that can be checked from the central directory:
/// entry count, declared sizes, names, types, and that the manifest exists. Nothing is written.
pub(super) fn open_checked<R: Read + Seek>(
    zip: &Path,
    file: R,
    limits: &Limits,
) -> Result<zip::ZipArchive<R>> {
    let mut archive = zip::ZipArchive::new(file)
        .map_err(|e| bad(zip, format!("not a valid zip archive ({e})")))?;
    let n = archive.len() as u64;
    if n > limits.max_entries {
        return Err(bad(
            zip,
            format!(
                "it has {n} entries, more than the limit of {}",
                limits.max_entries
            ),
        ));
    }
    if archive.has_duplicate_names() {
        return Err(bad(zip, "it has several entries with the same name"));
    }
    let mut tree = Tree::default();
    for i in 0..archive.len() {
        let f = archive
            .by_index_raw(i)
            .map_err(|e| bad(zip, format!("entry {i} is unreadable ({e})")))?;
        tree.add(zip, i, &f)?;
    }
    tree.finish(zip, limits)?;
    Ok(archive)
}

/// The entries seen so far, to check the archive as a whole.
#[derive(Default)]
struct Tree {
    /// Normalised path -> is a directory: two entries for one path, or a file used as a
    /// directory, would make the result depend on extraction order.
    seen: HashMap<PathBuf, bool>,
    /// Sum of the declared (uncompressed) sizes.
    declared: u64,
    has_manifest: bool,
}

impl Tree {
    /// Checks entry `i` on its own and against the entries before it.
    fn add<R: Read + Seek>(
        &mut self,
        zip: &Path,
        i: usize,
        f: &zip::read::ZipFile<'_, R>,
    ) -> Result<()> {
        let name = f
            .name()
            .map_err(|e| bad(zip, format!("entry {i} has an invalid name ({e})")))?
            .into_owned();
        let rel = safe_relative_path(&name).ok_or_else(|| {
            bad(
                zip,
                format!("entry {name:?} escapes the release directory (absolute path or '..')"),
            )
        })?;
        let is_dir = matches!(classify(zip, f, &name)?, Kind::Dir);
        // A directory by its mode (e.g. the MS-DOS directory attribute) but with data: readers
        // that go by the name would read it as a file, extraction makes it a directory.
        if is_dir && (f.size() > 0 || f.compressed_size() > 0) {
            return Err(bad(
                zip,
                format!(
                    "entry {name:?} is marked as a directory but holds {} bytes",
                    f.size().max(f.compressed_size())
                ),
            ));
        }
        match self.seen.get(&rel) {
            Some(true) if is_dir => {}
            Some(_) => return Err(bad(zip, format!("entry {name:?} appears twice"))),
            None => {
                self.seen.insert(rel.clone(), is_dir);
            }
        }
        // A stored entry's data is its contents, so the two sizes must agree. When they do
        // not, readers disagree on where the entry ends (the fuzzer found one that `verify`
        // refused and extraction wrote truncated).
        if f.compression() == zip::CompressionMethod::Stored && f.compressed_size() != f.size() {
            return Err(bad(
                zip,
                format!(
                    "entry {name:?} is stored uncompressed but declares {} bytes of data for {} bytes of contents",
                    f.compressed_size(),
                    f.size()
                ),
            ));
        }
        self.declared = self.declared.saturating_add(f.size());
        if rel == Path::new(MANIFEST) {
            self.has_manifest = true;
        }
        Ok(())
    }

    /// The checks of the whole: total size, the manifest, nothing inside a file.
    fn finish(self, zip: &Path, limits: &Limits) -> Result<()> {
        if self.declared > limits.max_total_bytes {
            return Err(bad(
                zip,
                format!(
                    "it expands to {} bytes, more than the limit of {}",
                    self.declared, limits.max_total_bytes
                ),
            ));
        }
        if !self.has_manifest {
            return Err(bad(zip, format!("it has no {MANIFEST} at its root")));
        }
        // Nothing (file or directory) may live inside a path that is a file.
        for path in self.seen.keys() {
            if let Some(a) = path
                .ancestors()
                .skip(1)
                .find(|a| self.seen.get(*a) == Some(&false))
            {
                return Err(bad(
                    zip,
                    format!(
                        "entry {:?} is inside {:?}, which is a file",
                        path.display(),
                        a.display()
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        assert_eq!(
            safe_relative_path("a/b.txt"),
            Some(PathBuf::from("a/b.txt"))
        );
        assert_eq!(safe_relative_path("./a"), Some(PathBuf::from("a")));
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a/../b",
            "a\\..\\b",
            "a\0b",
            ".",
        ] {
            assert_eq!(safe_relative_path(bad), None, "{bad:?}");
        }
    }
}
