//! Descriptors and files this process takes over or leaves behind: the inherited listening
//! socket and ready pipe, the control socket, the pid file.

use std::fs;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;

use tokio::net::UnixListener;

use crate::Error;
use crate::layout::Paths;

/// Why an inherited descriptor was not taken.
#[derive(Debug, thiserror::Error)]
pub enum Unfit {
    #[error("is a standard stream")]
    StandardStream,
    #[error("not a socket")]
    NotSocket(#[source] std::io::Error),
    #[error("not a listening socket")]
    NotListening,
    #[error("not an open descriptor")]
    NotOpen(#[source] std::io::Error),
}

/// Checks an inherited descriptor number with `check` (which must not close it), marks it
/// close-on-exec, and only then takes ownership of it: taking a wrong descriptor would close
/// something else on drop. Numbers 0-2 are the standard streams, never an inherited socket.
fn take_inherited(
    fd: RawFd,
    flag: &'static str,
    check: impl FnOnce(BorrowedFd<'_>) -> Result<(), Unfit>,
) -> Result<OwnedFd, Error> {
    let unfit = |reason| Error::Inherited { flag, fd, reason };
    if fd <= 2 {
        return Err(unfit(Unfit::StandardStream));
    }
    // SAFETY: only syscalls use the borrowed number, and they fail cleanly (EBADF) if it is not
    // open; nothing closes it while borrowed.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    check(borrowed).map_err(unfit)?;
    rustix::io::fcntl_getfd(borrowed)
        .and_then(|flags| rustix::io::fcntl_setfd(borrowed, flags | rustix::io::FdFlags::CLOEXEC))
        .map_err(|e| unfit(Unfit::NotOpen(e.into())))?;
    // SAFETY: checked above that the descriptor is open; it was inherited for us alone and
    // nothing else in this process owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Takes ownership of an inherited listening TCP socket, after checking it is one.
pub(super) fn take_listener_fd(fd: RawFd) -> Result<std::net::TcpListener, Error> {
    let owned = take_inherited(
        fd,
        "--inherit-fd",
        |b| match rustix::net::sockopt::socket_acceptconn(b) {
            Ok(true) => Ok(()),
            Ok(false) => Err(Unfit::NotListening),
            Err(e) => Err(Unfit::NotSocket(e.into())),
        },
    )?;
    Ok(std::net::TcpListener::from(owned))
}

pub(super) fn take_ready_fd(fd: RawFd) -> Result<fs::File, Error> {
    Ok(fs::File::from(take_inherited(
        fd,
        "--ready-fd",
        |_| Ok(()),
    )?))
}

/// Binds the control socket under a temp name and renames it into place, so that the path always
/// reaches a live process: the predecessor's socket until this rename, ours from then on.
pub(super) fn bind_control(paths: &Paths) -> Result<(UnixListener, (u64, u64)), Error> {
    let path = paths.control_socket();
    let tmp = paths
        .run_dir()
        .join(format!(".demo-service.sock.{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let listener =
        UnixListener::bind(&tmp).map_err(Error::io(format!("binding {}", tmp.display())))?;
    let meta = fs::metadata(&tmp).map_err(Error::io(format!("stat {}", tmp.display())))?;
    fs::rename(&tmp, &path).map_err(Error::io(format!("renaming to {}", path.display())))?;
    Ok((listener, (meta.dev(), meta.ino())))
}

/// Removes the pid file and control socket if they are still ours (a successor may have replaced
/// them, and its files must survive our exit).
pub(super) fn remove_if_ours(paths: &Paths, pid: u32, control_id: (u64, u64)) {
    if paths.read_pid() == Some(pid as i32) {
        let _ = fs::remove_file(paths.pid_file());
    }
    let sock = paths.control_socket();
    if fs::metadata(&sock).is_ok_and(|m| (m.dev(), m.ino()) == control_id) {
        let _ = fs::remove_file(&sock);
    }
}
