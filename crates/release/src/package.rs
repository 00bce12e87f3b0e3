//! Release packages: `<name>-<version>.zip` with a `release.toml` at its root and an optional
//! `<file>.sha256` beside it. Verification refuses anything hostile (digest mismatch, non-zip or
//! truncated data, escaping paths, links, device files, zip bombs, a manifest that disagrees);
//! extraction writes into a fresh directory that the caller renames into place.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use orch_types::{Version, parse_package_file_name, validate_package_name};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, Result};
use crate::fsutil::{unique_suffix, write_atomic};

pub const MANIFEST: &str = "release.toml";

/// Caps that bound what a package may expand to (zip-bomb protection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Total uncompressed bytes over all entries.
    pub max_total_bytes: u64,
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_total_bytes: 4 << 30,
            max_entries: 100_000,
        }
    }
}

/// What a verified package contains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackageInfo {
    pub name: String,
    pub version: Version,
    /// Hex SHA-256 of the zip file.
    pub sha256: String,
    /// Size of the zip file.
    pub size: u64,
    pub entries: u64,
    pub uncompressed_bytes: u64,
}

/// The `release.toml` manifest. Unknown keys are allowed (tools may add their own).
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub version: String,
}

/// Parses and validates a manifest's text.
pub fn parse_manifest(text: &str) -> Result<(String, Version), String> {
    let m: Manifest =
        toml::from_str(text).map_err(|e| format!("{MANIFEST} is not valid: {}", e.message()))?;
    validate_package_name(&m.name).map_err(|e| format!("{MANIFEST}: {e}"))?;
    let v = m
        .version
        .parse::<Version>()
        .map_err(|e| format!("{MANIFEST}: {e}"))?;
    Ok((m.name, v))
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Hex SHA-256 and size of a file.
pub fn sha256_file(path: &Path) -> Result<(String, u64)> {
    let mut f = File::open(path).ctx("open", path)?;
    sha256_reader(&mut f, path)
}

/// Hex SHA-256 and length of everything `f` yields from its current position.
fn sha256_reader(f: &mut File, path: &Path) -> Result<(String, u64)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf).ctx("read", path)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((hex(&h.finalize()), size))
}

/// Checks a hex digest's syntax; returns it lower-cased.
pub fn normalize_digest(d: &str) -> Option<String> {
    (d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit())).then(|| d.to_ascii_lowercase())
}

/// The digest from `<file>.sha256` beside the package, if that file exists.
pub fn sidecar_digest(zip: &Path) -> Result<Option<String>> {
    let side = sidecar_path(zip);
    let text = match fs::read_to_string(&side) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).ctx("read", &side),
    };
    let token = text.split_whitespace().next().unwrap_or("");
    normalize_digest(token)
        .map(Some)
        .ok_or_else(|| Error::BadPackage {
            file: display_name(zip),
            reason: format!(
                "{} does not start with a hex SHA-256 digest",
                display_name(&side)
            ),
        })
}

pub fn sidecar_path(zip: &Path) -> PathBuf {
    let mut s = zip.as_os_str().to_owned();
    s.push(".sha256");
    PathBuf::from(s)
}

fn display_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

fn bad(zip: &Path, reason: impl Into<String>) -> Error {
    Error::BadPackage {
        file: display_name(zip),
        reason: reason.into(),
    }
}

/// Checks an entry name: relative, no `..`, no backslashes or NULs (which some unzippers
/// treat as separators or terminators).
fn safe_relative_path(name: &str) -> Option<PathBuf> {
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

enum Kind {
    Dir,
    File { mode: u32 },
}

/// Classifies an entry, refusing links, device files, FIFOs, sockets and encryption.
fn classify<R: Read + Seek>(zip: &Path, f: &zip::read::ZipFile<'_, R>, name: &str) -> Result<Kind> {
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
fn open_checked<R: Read + Seek>(
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
    let mut declared = 0u64;
    let mut has_manifest = false;
    // Normalised path -> is a directory: two entries for one path, or a file used as a
    // directory, would make the result depend on extraction order.
    let mut seen: std::collections::HashMap<PathBuf, bool> = std::collections::HashMap::new();
    for i in 0..archive.len() {
        let f = archive
            .by_index_raw(i)
            .map_err(|e| bad(zip, format!("entry {i} is unreadable ({e})")))?;
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
        let is_dir = matches!(classify(zip, &f, &name)?, Kind::Dir);
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
        match seen.get(&rel) {
            Some(true) if is_dir => {}
            Some(_) => return Err(bad(zip, format!("entry {name:?} appears twice"))),
            None => {
                seen.insert(rel.clone(), is_dir);
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
        declared = declared.saturating_add(f.size());
        if rel == Path::new(MANIFEST) {
            has_manifest = true;
        }
    }
    if declared > limits.max_total_bytes {
        return Err(bad(
            zip,
            format!(
                "it expands to {declared} bytes, more than the limit of {}",
                limits.max_total_bytes
            ),
        ));
    }
    if !has_manifest {
        return Err(bad(zip, format!("it has no {MANIFEST} at its root")));
    }
    // Nothing (file or directory) may live inside a path that is a file.
    for path in seen.keys() {
        if let Some(a) = path
            .ancestors()
            .skip(1)
            .find(|a| seen.get(*a) == Some(&false))
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
    Ok(archive)
}

/// Checks the manifest against the file name and an expected version.
fn check_identity(
    zip: &Path,
    manifest_text: &str,
    expected: Option<Version>,
) -> Result<(String, Version)> {
    let (name, version) = parse_manifest(manifest_text).map_err(|e| bad(zip, e))?;
    let file_name = display_name(zip);
    let (fname, fversion) =
        parse_package_file_name(&file_name).ok_or_else(|| bad(zip, BAD_FILE_NAME))?;
    if fname != name || fversion != version {
        return Err(bad(
            zip,
            format!("{MANIFEST} says {name} {version} but the file name says {fname} {fversion}"),
        ));
    }
    if let Some(e) = expected
        && e != version
    {
        return Err(bad(zip, format!("it holds version {version}, not {e}")));
    }
    Ok((name, version))
}

/// The digest a package must have: `explicit` (validated), else its sidecar's, else none.
pub fn expected_digest(zip: &Path, explicit: Option<&str>) -> Result<Option<String>> {
    match explicit {
        Some(d) => normalize_digest(d)
            .map(Some)
            .ok_or_else(|| bad(zip, format!("expected digest {d:?} is not a hex SHA-256"))),
        None => sidecar_digest(zip),
    }
}

/// Hashes the package file and checks it against its expected digest (the given one, else its
/// `.sha256` sidecar's, if any); returns the actual digest and size.
pub fn digest_checked(zip: &Path, explicit: Option<&str>) -> Result<(String, u64)> {
    let expected = expected_digest(zip, explicit)?;
    let (actual, size) = sha256_file(zip)?;
    match expected {
        Some(e) if e != actual => Err(digest_mismatch(zip, &e, &actual)),
        _ => Ok((actual, size)),
    }
}

/// The refusal for a package whose bytes do not have the expected digest.
pub fn digest_mismatch(zip: &Path, expected: &str, actual: &str) -> Error {
    bad(
        zip,
        format!("SHA-256 mismatch: expected {expected}, the file has {actual}"),
    )
}

/// Name and version from a package's file name `<name>-<x.y.z>.zip`.
pub fn file_identity(zip: &Path) -> Result<(String, Version)> {
    let file_name = zip.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    parse_package_file_name(file_name).ok_or_else(|| bad(zip, BAD_FILE_NAME))
}

const BAD_FILE_NAME: &str = "its file name is not <name>-<x.y.z>.zip with a valid name and version";

/// Opens the package and verifies the digest (the given one, else the sidecar's, if any) of
/// that very handle, rewound for reading: the bytes checked are the bytes extracted, even if
/// the path is replaced meanwhile.
fn open_verified(zip: &Path, expected_sha256: Option<&str>) -> Result<(File, String, u64)> {
    let expected = expected_digest(zip, expected_sha256)?;
    let mut file = File::open(zip).ctx("open package", zip)?;
    let (actual, size) = sha256_reader(&mut file, zip)?;
    if let Some(e) = expected
        && e != actual
    {
        return Err(digest_mismatch(zip, &e, &actual));
    }
    file.seek(io::SeekFrom::Start(0)).ctx("rewind", zip)?;
    Ok((file, actual, size))
}

/// Copies at most `budget` bytes; reading more means the entry lied about its size.
fn copy_capped(
    zip: &Path,
    name: &str,
    mut r: impl Read,
    w: &mut impl Write,
    budget: u64,
) -> Result<u64> {
    let mut limited = (&mut r).take(budget + 1);
    let n = io::copy(&mut limited, w).map_err(|e| bad(zip, format!("entry {name:?}: {e}")))?;
    if n > budget {
        return Err(bad(
            zip,
            "its contents expand past the size limit (zip bomb?)".to_string(),
        ));
    }
    Ok(n)
}

fn short_entry(zip: &Path, name: &str, n: u64, declared: u64) -> Error {
    bad(
        zip,
        format!("entry {name:?} holds {n} bytes but declares {declared}"),
    )
}

/// Fully verifies a package without extracting it: digest, structure, every entry's data and
/// CRC, the limits, and the manifest against the file name.
pub fn verify(
    zip: &Path,
    expected_sha256: Option<&str>,
    expected_version: Option<Version>,
    limits: &Limits,
) -> Result<PackageInfo> {
    let (file, sha256, size) = open_verified(zip, expected_sha256)?;
    let mut archive = open_checked(zip, file, limits)?;
    let mut total = 0u64;
    let mut manifest = None;
    for i in 0..archive.len() {
        let mut f = archive
            .by_index(i)
            .map_err(|e| bad(zip, format!("entry {i} is unreadable ({e})")))?;
        let name = f.name().map(|n| n.into_owned()).unwrap_or_default();
        // The same classification as extraction (name or mode), so both read the same entries.
        if matches!(classify(zip, &f, &name)?, Kind::Dir) {
            continue;
        }
        let budget = limits.max_total_bytes - total;
        let declared = f.size();
        let n = if safe_relative_path(&name).as_deref() == Some(Path::new(MANIFEST)) {
            let mut buf = Vec::new();
            let n = copy_capped(zip, &name, &mut f, &mut buf, budget.min(1 << 20))?;
            manifest =
                Some(String::from_utf8(buf).map_err(|_| bad(zip, "release.toml is not UTF-8"))?);
            n
        } else {
            copy_capped(zip, &name, &mut f, &mut io::sink(), budget)?
        };
        // The same rule as extraction: an entry yields exactly what it declares.
        if n != declared {
            return Err(short_entry(zip, &name, n, declared));
        }
        total += n;
    }
    let manifest = manifest.ok_or_else(|| bad(zip, format!("it has no {MANIFEST}")))?;
    let (name, version) = check_identity(zip, &manifest, expected_version)?;
    Ok(PackageInfo {
        name,
        version,
        sha256,
        size,
        entries: archive.len() as u64,
        uncompressed_bytes: total,
    })
}

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
}

fn extract_entry(
    zip: &Path,
    archive: &mut zip::ZipArchive<PosReader>,
    dest: &Path,
    e: &FileEntry,
) -> Result<u64> {
    let mut f = archive
        .by_index(e.index)
        .map_err(|err| bad(zip, format!("entry {:?} is unreadable ({err})", e.name)))?;
    let target = dest.join(&e.rel);
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
    w.flush().ctx("write", &target)?;
    Ok(n)
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
    let expected = expected_digest(zip, expected_sha256)?;
    let file = Arc::new(File::open(zip).ctx("open package", zip)?);
    let size = file.metadata().ctx("stat", zip)?.len();
    let hasher = {
        let file = file.clone();
        std::thread::spawn(move || sha256_at(&file, size))
    };
    let digest = || -> Result<String> {
        hasher
            .join()
            .map_err(|_| Error::Refused("the digest thread panicked".into()))?
            .ctx("read", zip)
    };
    let check = |actual: &str| -> Result<()> {
        match &expected {
            Some(e) if e != actual => Err(digest_mismatch(zip, e, actual)),
            _ => Ok(()),
        }
    };
    let reader = PosReader {
        file,
        pos: 0,
        len: size,
    };
    let mut archive = match open_checked(zip, reader, limits) {
        Ok(a) => a,
        Err(e) => {
            // A digest mismatch explains a broken archive better than the archive error.
            check(&digest()?)?;
            return Err(e);
        }
    };
    fs::create_dir(dest).ctx("create", dest)?;
    let result = (|| {
        // Directories first (including every file's parent), so workers only create files.
        let mut files = Vec::new();
        for i in 0..archive.len() {
            let f = archive
                .by_index_raw(i)
                .map_err(|e| bad(zip, format!("entry {i} is unreadable ({e})")))?;
            let name = f.name().map(|n| n.into_owned()).unwrap_or_default();
            let rel = safe_relative_path(&name)
                .ok_or_else(|| bad(zip, format!("entry {name:?} escapes the release directory")))?;
            let target = dest.join(&rel);
            match classify(zip, &f, &name)? {
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
                    });
                }
            }
        }
        // Largest first, so the last worker does not finish long after the others.
        files.sort_by_key(|f| std::cmp::Reverse(f.declared));
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 4)
            .min(files.len().max(1));
        let next = AtomicUsize::new(0);
        let total = AtomicU64::new(0);
        let failed: Mutex<Option<Error>> = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..workers {
                let mut archive = archive.clone();
                let (next, total, failed, files) = (&next, &total, &failed, &files);
                s.spawn(move || {
                    loop {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        let Some(e) = files.get(k) else { return };
                        match extract_entry(zip, &mut archive, dest, e) {
                            Ok(n) => {
                                total.fetch_add(n, Ordering::Relaxed);
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
        let sha256 = digest()?;
        check(&sha256)?;
        if let Some(e) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        let manifest_path = dest.join(MANIFEST);
        let text = fs::read_to_string(&manifest_path)
            .map_err(|e| bad(zip, format!("{MANIFEST} is unreadable ({e})")))?;
        let (name, version) = check_identity(zip, &text, expected_version)?;
        // Entries may carry restrictive dir modes; the store must be able to delete the tree.
        let _ = fs::set_permissions(dest, fs::Permissions::from_mode(0o755));
        Ok(PackageInfo {
            name,
            version,
            sha256,
            size,
            entries: archive.len() as u64,
            uncompressed_bytes: total.into_inner(),
        })
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(dest);
    }
    result
}

/// Builds `<out>/<name>-<version>.zip` and its `.sha256` from a directory. A `release.toml` in
/// the directory must agree with name and version; without one, it is generated. File modes are
/// kept (so `hooks/activate` stays executable); links and special files are refused.
pub fn build(src: &Path, name: &str, version: Version, out: &Path) -> Result<(PathBuf, String)> {
    validate_package_name(name).map_err(|e| Error::Refused(e.to_string()))?;
    let meta = fs::metadata(src).ctx("read", src)?;
    if !meta.is_dir() {
        return Err(Error::Refused(format!(
            "{} is not a directory",
            src.display()
        )));
    }
    let manifest_path = src.join(MANIFEST);
    let manifest = match fs::read_to_string(&manifest_path) {
        Ok(text) => {
            let (n, v) = parse_manifest(&text).map_err(Error::Refused)?;
            if n != name || v != version {
                return Err(Error::Refused(format!(
                    "{} says {n} {v}, but --name {name} --version {version} was given",
                    manifest_path.display()
                )));
            }
            None
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Some(format!("name = \"{name}\"\nversion = \"{version}\"\n"))
        }
        Err(e) => return Err(e).ctx("read", &manifest_path),
    };
    let mut files = Vec::new();
    walk(src, Path::new(""), &mut files)?;
    files.sort();

    fs::create_dir_all(out).ctx("create", out)?;
    let zip_name = format!("{name}-{version}.zip");
    let zip_path = out.join(&zip_name);
    let tmp = out.join(format!(".{zip_name}.tmp-{}", unique_suffix()));
    let result = (|| {
        let f = File::create(&tmp).ctx("create", &tmp)?;
        let mut w = zip::ZipWriter::new(BufWriter::new(f));
        let zerr = |e: zip::result::ZipError| Error::Io {
            op: "write zip",
            path: tmp.clone(),
            source: io::Error::other(e),
        };
        let base = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .large_file(false);
        if let Some(m) = &manifest {
            w.start_file(MANIFEST, base.unix_permissions(0o644))
                .map_err(zerr)?;
            w.write_all(m.as_bytes()).ctx("write", &tmp)?;
        }
        for (rel, is_dir, mode, len) in &files {
            let zname = rel.to_string_lossy().replace('\\', "/");
            if *is_dir {
                w.add_directory(format!("{zname}/"), base.unix_permissions(*mode))
                    .map_err(zerr)?;
            } else {
                let opts = base
                    .unix_permissions(*mode)
                    .large_file(*len >= u32::MAX as u64);
                w.start_file(zname, opts).map_err(zerr)?;
                let path = src.join(rel);
                let mut input = File::open(&path).ctx("open", &path)?;
                io::copy(&mut input, &mut w).ctx("read", &path)?;
            }
        }
        let mut inner = w.finish().map_err(zerr)?;
        inner.flush().ctx("write", &tmp)?;
        let f = inner
            .into_inner()
            .map_err(|e| e.into_error())
            .ctx("write", &tmp)?;
        f.sync_all().ctx("fsync", &tmp)?;
        fs::rename(&tmp, &zip_path).ctx("rename into place", &zip_path)?;
        let (digest, _) = sha256_file(&zip_path)?;
        write_atomic(
            &sidecar_path(&zip_path),
            format!("{digest}  {zip_name}\n").as_bytes(),
        )?;
        Ok((zip_path.clone(), digest))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

type WalkEntry = (PathBuf, bool, u32, u64);

fn walk(root: &Path, rel: &Path, out: &mut Vec<WalkEntry>) -> Result<()> {
    let dir = root.join(rel);
    for entry in fs::read_dir(&dir).ctx("read directory", &dir)? {
        let entry = entry.ctx("read directory", &dir)?;
        let path = entry.path();
        let meta = fs::symlink_metadata(&path).ctx("stat", &path)?;
        let child = rel.join(entry.file_name());
        let mode = meta.permissions().mode() & 0o755;
        if meta.file_type().is_symlink() {
            return Err(Error::Refused(format!(
                "{} is a symbolic link; packages may only hold regular files and directories",
                path.display()
            )));
        } else if meta.is_dir() {
            out.push((child.clone(), true, mode | 0o700, 0));
            walk(root, &child, out)?;
        } else if meta.is_file() {
            out.push((child, false, mode | 0o600, meta.len()));
        } else {
            return Err(Error::Refused(format!(
                "{} is not a regular file; packages may only hold regular files and directories",
                path.display()
            )));
        }
    }
    Ok(())
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

    #[test]
    fn digests() {
        assert_eq!(hex(&[0, 15, 255]), "000fff");
        assert!(normalize_digest(&"A".repeat(64)).is_some());
        assert!(normalize_digest(&"g".repeat(64)).is_none());
        assert!(normalize_digest("abc").is_none());
    }

    #[test]
    fn manifests() {
        assert!(parse_manifest("name = \"emqx\"\nversion = \"4.2.1\"\nextra = 1\n").is_ok());
        assert!(parse_manifest("name = \"emqx\"\n").is_err());
        assert!(parse_manifest("name = \"emqx\"\nversion = \"4.2\"\n").is_err());
        assert!(parse_manifest("name = \"../x\"\nversion = \"4.2.1\"\n").is_err());
        assert!(parse_manifest("not toml [").is_err());
    }
}
