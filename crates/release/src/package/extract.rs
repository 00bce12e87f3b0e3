//! Extraction: entries inflated on several threads while the digest is computed on another,
//! all reading the same open file, into a fresh directory the caller renames into place. A file
//! whose digest was verified as it arrived (and has not changed since: see
//! [`orch_package::verified`]) is not hashed again.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use orch_package::digest::check_digest;
use orch_package::manifest::check_identity;
use orch_types::Version;
use sha2::{Digest, Sha256};

use super::check::{Kind, classify, open_checked, safe_relative_path};
use super::files::FileRecord;
use super::{Limits, MANIFEST, PackageInfo, bad, copy_capped, expected_digest, hex, short_entry};
use orch_package::error::IoContext;
use orch_package::verified::identity_of;

use crate::error::{Error, Result};

/// A positional reader over a shared open file: every clone reads the same file (the one whose
/// digest is checked) without sharing a file offset, so extraction threads need no lock.
#[derive(Clone)]
struct PosReader {
    file: Arc<File>,
    pos: u64,
    len: u64,
}

impl Read for PosReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for PosReader {
    fn seek(&mut self, to: io::SeekFrom) -> io::Result<u64> {
        let base = match to {
            io::SeekFrom::Start(n) => Some(n),
            io::SeekFrom::End(d) => self.len.checked_add_signed(d),
            io::SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos =
            base.ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek out of range"))?;
        Ok(self.pos)
    }
}

/// Hex SHA-256 of a whole file through positional reads.
fn sha256_at(file: &File, len: u64) -> io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < len {
        let n = file.read_at(&mut buf, pos)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(hex(&h.finalize()))
}

/// A regular file to extract: entry index, relative path, mode, declared size.
struct FileEntry {
    index: usize,
    rel: PathBuf,
    name: String,
    mode: u32,
    declared: u64,
    /// The entry's CRC-32 and raw Unix mode, as the archive declares them (for [`Reuse`]).
    crc32: u32,
    unix_mode: Option<u32>,
}

/// Files of an installed release that a new release may share instead of inflating its own
/// copy: a patch release repeats most of its predecessor's files byte for byte. An entry whose
/// name, size, CRC-32 and mode equal the installed release's package entry, and whose file
/// on disk still has that size and CRC-32, is hard-linked from the installed release. A link
/// is a second name for the same bytes: uninstalling either release removes only its own name,
/// so the other keeps its files. (Releases are not written to once unpacked; a release that
/// rewrote its own files in place would change the other's too, which is why the bytes on disk
/// are checked, not only the package's word.) The bytes on disk are known without reading them
/// when the installed release's record ([`super::files`]) names the file with this CRC-32 and
/// its identity is unchanged since it was unpacked; otherwise they are read back.
#[derive(Debug, Default)]
pub struct Reuse {
    /// The installed release's directory.
    pub dir: PathBuf,
    /// Its package's entries: name -> (size, CRC-32, raw Unix mode).
    pub entries: std::collections::HashMap<String, (u64, u32, Option<u32>)>,
    /// Its record of the files it unpacked (empty: every candidate is read back).
    pub known: FileRecord,
}

/// A regular file of an extracted release, for the caller's flush and the release's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtractedFile {
    /// The entry's name in the package.
    pub name: String,
    /// Where it is (under the extraction directory).
    pub path: PathBuf,
    /// Hard-linked from the installed release (its bytes were durable already), not written.
    pub linked: bool,
    pub crc32: u32,
    /// Its identity once in place ([`orch_package::verified::identity_of`]).
    pub identity: Option<String>,
}

/// What [`extract_tree`] made: the package's description, every regular file, every directory.
#[derive(Debug, Clone)]
pub struct Extraction {
    pub info: PackageInfo,
    pub files: Vec<ExtractedFile>,
    /// The extraction directory and every directory under it, parents before children.
    pub dirs: Vec<PathBuf>,
}

impl Reuse {
    /// The entries of the package `zip` (its central directory only), for the release unpacked
    /// in `dir`. `None` when the package cannot be read.
    pub fn of(zip: &Path, dir: &Path) -> Option<Reuse> {
        let mut archive = zip::ZipArchive::new(File::open(zip).ok()?).ok()?;
        let mut entries = std::collections::HashMap::new();
        for i in 0..archive.len() {
            let f = archive.by_index_raw(i).ok()?;
            let name = f.name().ok()?.into_owned();
            entries.insert(name, (f.size(), f.crc32(), f.unix_mode()));
        }
        Some(Reuse {
            dir: dir.to_path_buf(),
            entries,
            known: super::files::read(dir),
        })
    }

    /// The installed file to link for `e`, if it holds exactly the entry's bytes.
    fn source(&self, e: &FileEntry) -> Option<PathBuf> {
        let &(size, crc, mode) = self.entries.get(&e.name)?;
        if size != e.declared || crc != e.crc32 || mode != e.unix_mode {
            return None;
        }
        let path = self.dir.join(&e.rel);
        let meta = fs::symlink_metadata(&path).ok()?;
        if !meta.is_file() || meta.len() != size {
            return None;
        }
        // Unpacked with this CRC and untouched since: no need to read it.
        if self
            .known
            .get(&e.name)
            .is_some_and(|k| k.crc32 == crc && k.identity == identity_of(&meta))
        {
            return Some(path);
        }
        let mut f = File::open(&path).ok()?;
        let mut h = crc32fast::Hasher::new();
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = f.read(&mut buf).ok()?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        (h.finalize() == crc).then_some(path)
    }
}

/// Extracts (or links) one file; returns it as extracted.
fn extract_entry(
    zip: &Path,
    archive: &mut zip::ZipArchive<PosReader>,
    dest: &Path,
    e: &FileEntry,
    reuse: Option<&Reuse>,
) -> Result<ExtractedFile> {
    let target = dest.join(&e.rel);
    let done = |linked: bool, meta: Option<fs::Metadata>| ExtractedFile {
        name: e.name.clone(),
        path: target.clone(),
        linked,
        crc32: e.crc32,
        identity: meta.as_ref().map(identity_of),
    };
    if let Some(src) = reuse.and_then(|r| r.source(e))
        && fs::hard_link(&src, &target).is_ok()
    {
        // After the link, which changes the file's change time.
        return Ok(done(true, fs::symlink_metadata(&target).ok()));
    }
    let mut f = archive
        .by_index(e.index)
        .map_err(|err| bad(zip, format!("entry {:?} is unreadable ({err})", e.name)))?;
    // create_new: nothing can overwrite an earlier entry.
    let out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(e.mode)
        .open(&target)
        .map_err(|err| {
            if err.kind() == io::ErrorKind::AlreadyExists {
                bad(zip, format!("entry {:?} appears twice", e.name))
            } else {
                Error::Io {
                    op: "create",
                    path: target.clone(),
                    source: err,
                }
            }
        })?;
    let mut w = BufWriter::with_capacity(256 << 10, out);
    // The declared sizes were checked against the limit; an entry that inflates past its own
    // declaration is lying (zip bomb) and is refused.
    let n = copy_capped(zip, &e.name, &mut f, &mut w, e.declared)?;
    // Short is as wrong as long: what lands must be exactly what the archive declares.
    if n != e.declared {
        return Err(short_entry(zip, &e.name, n, e.declared));
    }
    let out = w
        .into_inner()
        .map_err(|err| err.into_error())
        .ctx("write", &target)?;
    Ok(done(false, out.metadata().ok()))
}

/// The digest of the package file: computed on its own thread while entries are extracted, or
/// known already (this very file was verified when it arrived: [`orch_package::verified`]).
enum Hasher {
    Thread(std::thread::JoinHandle<io::Result<String>>),
    Known(String),
}

impl Hasher {
    fn spawn(zip: &Path, file: Arc<File>, size: u64) -> Hasher {
        if let Some(d) = orch_package::verified::recorded(zip, &file) {
            return Hasher::Known(d);
        }
        Hasher::Thread(std::thread::spawn(move || sha256_at(&file, size)))
    }

    /// Waits for the digest and checks it against `expected`; returns it. (A local file given
    /// by an operator is hashed here, in the same pass as its extraction; nothing is recorded
    /// beside it, which may not even be writable.)
    fn check(self, zip: &Path, expected: Option<&str>) -> Result<String> {
        let actual = match self {
            Hasher::Known(d) => d,
            Hasher::Thread(t) => t
                .join()
                .map_err(|_| Error::refused("the digest thread panicked"))?
                .ctx("read", zip)?,
        };
        check_digest(zip, expected, &actual)?;
        Ok(actual)
    }
}

/// Verifies and extracts a package into `dest`, which must not exist. On any error `dest` is
/// removed, so the caller only ever sees a complete tree. The caller fsyncs and renames it.
///
/// Entries are inflated on several threads and the digest is computed on another one, all
/// reading the same open file; nothing is visible before the caller's rename, and the digest
/// is checked before this returns.
pub fn extract(
    zip: &Path,
    dest: &Path,
    expected_sha256: Option<&str>,
    expected_version: Option<Version>,
    limits: &Limits,
) -> Result<PackageInfo> {
    extract_reusing(zip, dest, expected_sha256, expected_version, limits, None)
}

/// [`extract`], hard-linking the files it shares with an installed release ([`Reuse`]) instead
/// of inflating them. The package's digest is checked as always; the manifest, the limits and
/// every other entry are handled as by [`extract`].
pub fn extract_reusing(
    zip: &Path,
    dest: &Path,
    expected_sha256: Option<&str>,
    expected_version: Option<Version>,
    limits: &Limits,
    reuse: Option<&Reuse>,
) -> Result<PackageInfo> {
    extract_tree(zip, dest, expected_sha256, expected_version, limits, reuse).map(|x| x.info)
}

/// [`extract_reusing`], saying what it made: every file (written or linked, with its CRC-32
/// and identity) and every directory, so the caller can flush exactly those and record them.
pub fn extract_tree(
    zip: &Path,
    dest: &Path,
    expected_sha256: Option<&str>,
    expected_version: Option<Version>,
    limits: &Limits,
    reuse: Option<&Reuse>,
) -> Result<Extraction> {
    let expected = expected_digest(zip, expected_sha256)?;
    let file = Arc::new(File::open(zip).ctx("open package", zip)?);
    let size = file.metadata().ctx("stat", zip)?.len();
    let hasher = Hasher::spawn(zip, file.clone(), size);
    let reader = PosReader {
        file: file.clone(),
        pos: 0,
        len: size,
    };
    let archive = match open_checked(zip, reader, limits) {
        Ok(a) => a,
        Err(e) => {
            // A digest mismatch explains a broken archive better than the archive error.
            hasher.check(zip, expected.as_deref())?;
            return Err(e);
        }
    };
    fs::create_dir(dest).ctx("create", dest)?;
    let result = (|| {
        let (files, dirs) = make_dirs(zip, &archive, dest)?;
        let extracted = extract_files(zip, &archive, dest, files, reuse);
        // The digest first: a mismatch explains a broken entry better than the entry's error.
        let sha256 = hasher.check(zip, expected.as_deref())?;
        let (uncompressed_bytes, files) = extracted?;
        let manifest_path = dest.join(MANIFEST);
        let text = fs::read_to_string(&manifest_path)
            .map_err(|e| bad(zip, format!("{MANIFEST} is unreadable ({e})")))?;
        let (name, version) = check_identity(zip, &text, expected_version)?;
        // Entries may carry restrictive dir modes; the store must be able to delete the tree.
        let _ = fs::set_permissions(dest, fs::Permissions::from_mode(0o755));
        let info = PackageInfo {
            name,
            version,
            sha256,
            size,
            entries: archive.len() as u64,
            uncompressed_bytes,
        };
        Ok(Extraction { info, files, dirs })
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(dest);
    }
    result
}

/// Creates every directory (including every file's parent), so workers only create files;
/// returns the files to extract, largest first (so the last worker does not finish long after
/// the others), and every directory (`dest` and those under it, parents first).
fn make_dirs(
    zip: &Path,
    archive: &zip::ZipArchive<PosReader>,
    dest: &Path,
) -> Result<(Vec<FileEntry>, Vec<PathBuf>)> {
    let mut dirs = std::collections::BTreeSet::new();
    dirs.insert(PathBuf::new());
    // A clone shares the parsed central directory; reading raw entries needs `&mut`.
    let mut archive = archive.clone();
    let mut files = Vec::new();
    for i in 0..archive.len() {
        let f = archive
            .by_index_raw(i)
            .map_err(|e| bad(zip, format!("entry {i} is unreadable ({e})")))?;
        let name = f.name().map(|n| n.into_owned()).unwrap_or_default();
        let rel = safe_relative_path(&name)
            .ok_or_else(|| bad(zip, format!("entry {name:?} escapes the release directory")))?;
        let target = dest.join(&rel);
        let kind = classify(zip, &f, &name)?;
        // Every ancestor inside `dest` (create_dir_all makes them all).
        let own = matches!(kind, Kind::Dir).then_some(rel.as_path());
        for a in own.into_iter().chain(rel.ancestors().skip(1)) {
            dirs.insert(a.to_path_buf());
        }
        match kind {
            Kind::Dir => fs::create_dir_all(&target).ctx("create", &target)?,
            Kind::File { mode } => {
                if let Some(parent) = target.parent() {
                    fs::create_dir_all(parent).ctx("create", parent)?;
                }
                files.push(FileEntry {
                    index: i,
                    rel,
                    name,
                    mode,
                    declared: f.size(),
                    crc32: f.crc32(),
                    unix_mode: f.unix_mode(),
                });
            }
        }
    }
    files.sort_by_key(|f| std::cmp::Reverse(f.declared));
    // Sorted paths put every parent before its children.
    let dirs = dirs.into_iter().map(|d| dest.join(d)).collect();
    Ok((files, dirs))
}

/// Extracts `files` on up to four threads; returns the bytes written and the files, or the
/// first error (after which every worker stops at its next entry).
fn extract_files(
    zip: &Path,
    archive: &zip::ZipArchive<PosReader>,
    dest: &Path,
    files: Vec<FileEntry>,
    reuse: Option<&Reuse>,
) -> Result<(u64, Vec<ExtractedFile>)> {
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 4)
        .min(files.len().max(1));
    let next = AtomicUsize::new(0);
    let total = AtomicU64::new(0);
    let failed: Mutex<Option<Error>> = Mutex::new(None);
    let made = Mutex::new(Vec::with_capacity(files.len()));
    std::thread::scope(|s| {
        for _ in 0..workers {
            let mut archive = archive.clone();
            let (next, total, failed, files, made) = (&next, &total, &failed, &files, &made);
            s.spawn(move || {
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(e) = files.get(k) else { return };
                    match extract_entry(zip, &mut archive, dest, e, reuse) {
                        Ok(f) => {
                            total.fetch_add(e.declared, Ordering::Relaxed);
                            made.lock().unwrap_or_else(|p| p.into_inner()).push(f);
                        }
                        Err(err) => {
                            let mut f = failed.lock().unwrap_or_else(|p| p.into_inner());
                            f.get_or_insert(err);
                            // Make every worker stop at its next entry.
                            next.store(files.len(), Ordering::Relaxed);
                            return;
                        }
                    }
                }
            });
        }
    });
    match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(e) => Err(e),
        None => Ok((
            total.into_inner(),
            made.into_inner().unwrap_or_else(|p| p.into_inner()),
        )),
    }
}
