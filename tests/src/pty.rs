//! Running a command on a pseudo-terminal, as an operator's terminal would: its stdout (and
//! stdin) is the pty's terminal side, so the command sees a TTY of the given size; everything it
//! writes is collected from the pty's controller side for a terminal emulator (the `vt100`
//! crate, in the tests) to render into a screen.

use std::fs::File;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::wait_child;

/// A command running on a pseudo-terminal; killed on drop.
pub struct PtyRun {
    child: Option<Child>,
    output: Arc<Mutex<Vec<u8>>>,
    reader: Option<JoinHandle<()>>,
}

/// Opens a pseudo-terminal of `cols` x `rows`: (controller, terminal) sides.
fn openpty(cols: u16, rows: u16) -> (OwnedFd, OwnedFd) {
    let mut controller: libc::c_int = -1;
    let mut terminal: libc::c_int = -1;
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two new descriptors into the two ints; the name buffer is null
    // (not wanted) and the termios pointer null (defaults); `size` outlives the call.
    let rc = unsafe {
        libc::openpty(
            &mut controller,
            &mut terminal,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(rc, 0, "openpty failed: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened for us and are owned by nothing else.
    unsafe {
        (
            OwnedFd::from_raw_fd(controller),
            OwnedFd::from_raw_fd(terminal),
        )
    }
}

impl PtyRun {
    /// Starts `cmd` with stdin and stdout on a new `cols` x `rows` pseudo-terminal (stderr as
    /// `cmd` has it).
    pub fn spawn(mut cmd: Command, cols: u16, rows: u16) -> PtyRun {
        let (controller, terminal) = openpty(cols, rows);
        let stdin = terminal.try_clone().expect("dup the pty");
        let child = cmd
            .stdin(Stdio::from(stdin))
            .stdout(Stdio::from(terminal))
            .spawn()
            .expect("spawn on the pty");
        // `cmd` still holds the terminal side: drop it so that reads end when the child does.
        drop(cmd);
        let output = Arc::new(Mutex::new(Vec::new()));
        let sink = output.clone();
        let mut file = File::from(controller);
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends with EIO once no process holds the terminal side any more.
            while let Ok(n) = file.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        PtyRun {
            child: Some(child),
            output,
            reader: Some(reader),
        }
    }

    /// Everything written to the terminal so far.
    pub fn output(&self) -> Vec<u8> {
        self.output.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("already waited").id()
    }

    /// Waits at most `timeout` for the command to exit, then for its output to be read.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut().expect("already waited");
        let status = wait_child(child, timeout)?;
        self.child = None;
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        Some(status)
    }
}

impl Drop for PtyRun {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The screen a `cols` x `rows` terminal shows after `bytes`.
pub fn render(bytes: &[u8], cols: u16, rows: u16) -> String {
    let nz = |n: u16| std::num::NonZeroU16::new(n).expect("a terminal size is at least 1");
    let mut p = vt100::Parser::new(nz(rows), nz(cols), 0);
    p.process(bytes);
    p.screen().contents()
}
