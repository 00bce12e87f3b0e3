//! The store's file-system primitives: the durable writes of the package format (with this
//! crate's error),
//! the flush of an extracted tree (an fsync per file and directory, or one `syncfs` for a large
//! tree), tree removal, and the store lock.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use orch_package::fsutil::unique_suffix;

use orch_package::error::IoContext;

use crate::error::{Error, Result};

/// [`orch_package::fsutil::fsync_dir`], with this crate's error.
pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    Ok(orch_package::fsutil::fsync_dir(dir)?)
}

/// [`orch_package::fsutil::write_atomic`], with this crate's error.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(orch_package::fsutil::write_atomic(path, bytes)?)
}

/// Flushes every dirty page of the file system holding `dir` with one `syncfs` call: far cheaper
/// than an fsync per file when thousands of files were just extracted.
pub(crate) fn syncfs(dir: &Path) -> Result<()> {
    let d = File::open(dir).ctx("open for syncfs", dir)?;
    rustix::fs::syncfs(&d)
        .map_err(std::io::Error::from)
        .ctx("syncfs", dir)?;
    Ok(())
}

/// Above this many files written plus directories, one `syncfs` is cheaper than an fsync each.
const FSYNC_EACH_MAX: usize = 256;

/// Makes an extracted tree durable before it is renamed into place: an fsync of every file
/// written (a linked file's bytes were made durable when its own release was unpacked) and of
/// every directory (new entries, links included), children first. `syncfs` would flush every
/// dirty page of the whole file system, other nodes' and services' included, so it is kept for
/// trees with many files, where one call beats thousands of fsyncs.
pub(crate) fn flush_extracted(
    root: &Path,
    files: &[crate::package::ExtractedFile],
    dirs: &[PathBuf],
) -> Result<()> {
    let written = files.iter().filter(|f| !f.linked).count();
    if written + dirs.len() > FSYNC_EACH_MAX {
        return syncfs(root);
    }
    for f in files.iter().filter(|f| !f.linked) {
        File::open(&f.path)
            .and_then(|h| h.sync_all())
            .ctx("fsync", &f.path)?;
    }
    for d in dirs.iter().rev() {
        fsync_dir(d)?;
    }
    Ok(())
}

/// Removes a directory tree if it exists.
pub(crate) fn remove_tree(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).ctx("remove", path).map_err(Error::from),
    }
}
/// An exclusive advisory lock on the store (flock on `releases/.lock`), held until dropped.
pub(crate) struct StoreLock {
    file: File,
}

impl StoreLock {
    /// Waits up to `timeout` for the lock. The holder writes its pid and operation into the
    /// lock file so a waiter can say who it waited for.
    pub(crate) fn acquire(
        root: &Path,
        lock_path: PathBuf,
        timeout: Duration,
        what: &str,
    ) -> Result<StoreLock> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .ctx("open lock file", &lock_path)?;
        let start = Instant::now();
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) => {
                    if start.elapsed() >= timeout {
                        let holder = fs::read_to_string(&lock_path)
                            .ok()
                            .map(|s| s.trim().to_string())
                            .filter(|s| !s.is_empty())
                            .unwrap_or_else(|| "unknown holder".to_string());
                        return Err(Error::Locked {
                            root: root.to_path_buf(),
                            holder,
                            waited_ms: start.elapsed().as_millis(),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(TryLockError::Error(e)) => {
                    return Err(e).ctx("lock", &lock_path).map_err(Error::from);
                }
            }
        }
        // Best effort: the note is informational, the flock is what excludes.
        let _ = file.set_len(0);
        let _ = (&file).write_all(format!("pid {} ({what})\n", std::process::id()).as_bytes());
        Ok(StoreLock { file })
    }
}

impl Drop for StoreLock {
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
        let _ = self.file.unlock();
    }
}
