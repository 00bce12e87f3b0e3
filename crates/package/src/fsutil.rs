//! Durable file-system primitives: every durable write is a temp file in the destination's
//! directory, fsynced, renamed (or linked) into place, and the directory fsynced, so a crash
//! leaves either the old or the new content and never a partial file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, IoContext, Result};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A name unique within this machine for temp files and dirs: pid + per-process counter.
pub fn unique_suffix() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Makes the directory's entries (a rename, a new file) durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx("fsync directory", dir)
}

/// `path`'s directory (`.` for a bare name) and a hidden temp name beside it.
fn temp_beside(path: &Path) -> (&Path, PathBuf) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    (dir, dir.join(format!(".{name}.tmp-{}", unique_suffix())))
}

/// Writes `bytes` to a new temp file with `mode` and fsyncs it.
fn write_temp(tmp: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(tmp)
        .ctx("create", tmp)?;
    f.write_all(bytes).ctx("write", tmp)?;
    f.sync_all().ctx("fsync", tmp)
}

/// Writes `bytes` to `path` so that a crash leaves either the old or the new content:
/// temp file in the same directory, fsync, rename over, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let (dir, tmp) = temp_beside(path);
    let result = write_temp(&tmp, bytes, 0o666)
        .and_then(|()| fs::rename(&tmp, path).ctx("rename into place", path))
        .and_then(|()| fsync_dir(dir));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// What [`write_new`] found in the way.
#[derive(Debug, thiserror::Error)]
pub enum WriteNewError {
    #[error("{} already exists", path.display())]
    Exists { path: PathBuf },
    #[error(transparent)]
    Write(#[from] Error),
}

/// Writes `bytes` to a new file `path` with `mode`, durably, refusing to replace anything: the
/// temp file is linked into place (link fails if the name exists), never renamed over.
pub fn write_new(path: &Path, bytes: &[u8], mode: u32) -> std::result::Result<(), WriteNewError> {
    let (dir, tmp) = temp_beside(path);
    let result = write_temp(&tmp, bytes, mode)
        .map_err(WriteNewError::from)
        .and_then(|()| {
            fs::hard_link(&tmp, path).map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    WriteNewError::Exists {
                        path: path.to_path_buf(),
                    }
                } else {
                    WriteNewError::Write(Error::Io {
                        op: "create",
                        path: path.to_path_buf(),
                        source: e,
                    })
                }
            })
        });
    let _ = fs::remove_file(&tmp);
    result?;
    Ok(fsync_dir(dir)?)
}

/// How long [`retry_text_busy`] keeps retrying an `exec` refused with `ETXTBSY`.
pub const TEXT_BUSY_RETRY: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs `spawn` again while it fails with `ETXTBSY` ("text file busy"), for up to
/// [`TEXT_BUSY_RETRY`]. A program just written by this process (a release binary, a hook)
/// cannot be executed while any process holds it open for writing, and a child forked by
/// another thread during the write inherits that descriptor until its own `exec` closes it
/// (close-on-exec): a window of microseconds to milliseconds in which a correct `exec` fails.
/// Only that error is retried; the retries sleep 5 ms each, so use it at spawn sites only.
pub fn retry_text_busy<T>(mut spawn: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    let start = std::time::Instant::now();
    loop {
        match spawn() {
            Err(e)
                if e.kind() == io::ErrorKind::ExecutableFileBusy
                    && start.elapsed() < TEXT_BUSY_RETRY =>
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            r => return r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn write_new_never_replaces() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key");
        write_new(&p, b"one", 0o600).unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(matches!(
            write_new(&p, b"two", 0o600),
            Err(WriteNewError::Exists { .. })
        ));
        assert_eq!(fs::read(&p).unwrap(), b"one");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
    #[test]
    fn an_exec_refused_while_the_program_is_open_for_writing_is_retried() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let prog = dir.path().join("prog");
        fs::write(&prog, "#!/bin/sh\nexit 0\n").unwrap();
        fs::set_permissions(&prog, fs::Permissions::from_mode(0o755)).unwrap();
        // A writer holds the program open, as a child forked mid-copy does until its exec.
        let mut writer = Some(OpenOptions::new().write(true).open(&prog).unwrap());
        let busy = std::process::Command::new(&prog).spawn().unwrap_err();
        assert_eq!(busy.kind(), io::ErrorKind::ExecutableFileBusy);
        let mut attempts = 0;
        let mut child = retry_text_busy(|| {
            attempts += 1;
            // The writer lets go after the first refusal (the child's exec closing it).
            if attempts == 2 {
                writer.take();
            }
            std::process::Command::new(&prog).spawn()
        })
        .unwrap();
        assert!(child.wait().unwrap().success());
        assert_eq!(attempts, 2);
        // Other errors are not retried.
        let mut calls = 0;
        let missing = retry_text_busy(|| {
            calls += 1;
            std::process::Command::new(dir.path().join("missing")).spawn()
        });
        assert!(missing.is_err());
        assert_eq!(calls, 1);
    }
}
