//! A spinner on stderr while a one-shot command waits for the coordinators, so that a wait for
//! a leader is not silence. Drawn only on a terminal, and only once the wait lasts.

use std::future::Future;
use std::io::Write;
use std::time::{Duration, Instant};

/// How long a wait lasts before the spinner shows (most answers come sooner).
const SHOW_AFTER: Duration = Duration::from_millis(400);

const FRAMES: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];

/// Awaits `fut`; meanwhile, when `enabled`, spins on stderr saying what it waits for.
pub async fn spin<F: Future>(what: &str, enabled: bool, fut: F) -> F::Output {
    if !enabled {
        return fut.await;
    }
    tokio::pin!(fut);
    let start = Instant::now();
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + SHOW_AFTER,
        Duration::from_millis(100),
    );
    let mut drawn = false;
    let out = loop {
        tokio::select! {
            out = &mut fut => break out,
            _ = tick.tick() => {
                let frame = FRAMES[(start.elapsed().as_millis() / 100) as usize % FRAMES.len()];
                let mut err = std::io::stderr().lock();
                let _ = write!(
                    err,
                    "\r\x1b[K{frame} {what}: waiting for the coordinators ({}s)",
                    start.elapsed().as_secs()
                );
                let _ = err.flush();
                drawn = true;
            }
        }
    };
    if drawn {
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[K");
        let _ = err.flush();
    }
    out
}
