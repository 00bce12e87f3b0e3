//! Only changed bytes on the wire (issue #15): a patch that changes 1% of the files of a
//! ~200 MB package, staged on a node that holds the previous package. Measures what a delta
//! push sends (the content-defined chunks the node lacks) against the whole package, and the
//! node's time to rebuild and verify the file from them against receiving it whole. No network:
//! the bytes a push would carry are fed straight to the agent's own assembly code.
//!
//! Run with `cargo bench -p orch-tests --bench delta` (`ORCH_BENCH_MB=20` for a smaller package;
//! `ORCH_BENCH_CHANGED=5` for 5% of the files changed). Without `--bench` (as under `cargo test
//! --all-targets`) it only says how to run it.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use orch_agent::delta::{self, Assembly};
use orch_agent::push::{Header, Upload};
use orch_release::package;
use orch_types::Version;

const FILES: usize = 2_000;

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("delta benchmark: run it with `cargo bench -p orch-tests --bench delta`");
        return;
    }
    let mb: u64 = env_or("ORCH_BENCH_MB", 200);
    let changed_pct: u64 = env_or("ORCH_BENCH_CHANGED", 1);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let releases = tmp.path().join("node/releases");
    fs::create_dir_all(&releases).unwrap();
    let mut rng = fastrand::Rng::with_seed(7);
    let sizes = file_sizes(&mut rng, mb << 20);
    for (i, size) in sizes.iter().enumerate() {
        write_file(&src, i, *size, &mut rng);
    }
    let (old, _) = package::build(&src, "bench", Version::new(1, 0, 0), &releases).unwrap();
    // The patch: every 100/pct-th file rewritten (starting at file 7, so that the share of
    // bytes changed is about the share of files: every 50th file is a large one), and the
    // manifest's version.
    let step = (100 / changed_pct.max(1)) as usize;
    let mut changed_bytes = 0u64;
    for i in (7..FILES).step_by(step.max(1)) {
        write_file(&src, i, sizes[i], &mut rng);
        changed_bytes += sizes[i] as u64;
    }
    let out = tmp.path().join("out");
    let (new, digest) = package::build(&src, "bench", Version::new(1, 0, 1), &out).unwrap();
    let new_bytes = fs::read(&new).unwrap();
    let size = new_bytes.len() as u64;
    let total = sizes.iter().sum::<usize>();
    println!(
        "packages: {:.1} MB zip of {FILES} files ({:.1} MB of text); the patch rewrites {} files ({changed_pct}% of the files; {:.1} MB, {:.2}% of the text)",
        size as f64 / 1e6,
        total as f64 / 1e6,
        (FILES - 7).div_ceil(step),
        changed_bytes as f64 / 1e6,
        changed_bytes as f64 * 100.0 / total as f64
    );
    println!(
        "machine: {} CPUs",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    let t = Instant::now();
    let chunks = orch_package::chunks::chunk_reader(&new_bytes[..], &new).unwrap();
    let cut = t.elapsed();
    let list: Vec<(u32, [u8; 32])> = chunks.iter().map(|c| (c.len, c.sha256)).collect();
    let name = "bench-1.0.1.zip";
    let t = Instant::now();
    let missing = delta::missing(&releases, name, &list);
    let lookup = t.elapsed();
    let sent: u64 = missing.iter().map(|&i| u64::from(list[i as usize].0)).sum();
    println!(
        "chunks: {} (cut + hashed in {cut:.2?} on the sender); the node lacks {} of them (found in {lookup:.2?}, its package cut once, then cached)",
        list.len(),
        missing.len()
    );
    println!(
        "sent: {sent} of {size} bytes ({:.2}%)",
        sent as f64 * 100.0 / size as f64
    );

    let mut whole = Vec::new();
    let mut assembled = Vec::new();
    for _ in 0..3 {
        let dir = tmp.path().join("recv");
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::copy(&old, dir.join("bench-1.0.0.zip")).unwrap();
        // Cut the copy once, as the node would have done before (not part of the push).
        delta::missing(&dir, name, &list);
        whole.push(receive(&dir, &digest, &new_bytes, false, &list, &missing));
        fs::remove_file(dir.join(name)).unwrap();
        assembled.push(receive(&dir, &digest, &new_bytes, true, &list, &missing));
    }
    let best = |v: &[Duration]| v.iter().min().copied().unwrap_or_default();
    println!("\n| staging the patch on the node | bytes sent | best of 3 |");
    println!("|---|---:|---:|");
    println!(
        "| whole push (receive, hash, fsync, rename) | {size} | {:.2?} |",
        best(&whole)
    );
    println!(
        "| delta push (chunks sent + copied from 1.0.0, hash, fsync, rename) | {sent} | {:.2?} |",
        best(&assembled)
    );
}

/// One staging of the new package into `dir`: whole (every byte through the upload) or as a
/// delta (`as_delta`: the missing chunks' bytes through the assembly). Returns its wall time.
fn receive(
    dir: &Path,
    digest: &str,
    bytes: &[u8],
    as_delta: bool,
    list: &[(u32, [u8; 32])],
    missing: &[u32],
) -> Duration {
    let t = Instant::now();
    let h = Header::validate(
        "bench",
        "1.0.1",
        digest,
        bytes.len() as u64,
        vec![],
        1 << 40,
    )
    .unwrap();
    let mut upload = Upload::start(dir, h).unwrap().unwrap();
    match as_delta {
        false => {
            for piece in bytes.chunks(256 << 10) {
                upload.write(piece).unwrap();
            }
        }
        true => {
            let mut a = Assembly::plan(dir, "bench-1.0.1.zip", list, missing).unwrap();
            let mut at = 0usize;
            let mut next = missing.iter().peekable();
            for (i, (len, _)) in list.iter().enumerate() {
                if next.peek().is_some_and(|&&m| m as usize == i) {
                    next.next();
                    a.feed(&mut upload, &bytes[at..at + *len as usize]).unwrap();
                }
                at += *len as usize;
            }
            a.finish(&mut upload).unwrap();
        }
    }
    upload.finish().unwrap();
    t.elapsed()
}

fn env_or(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// File sizes adding up to about `total` bytes of text: mostly small, some large.
fn file_sizes(rng: &mut fastrand::Rng, total: u64) -> Vec<usize> {
    let raw: Vec<f64> = (0..FILES)
        .map(|i| if i % 50 == 0 { 50.0 } else { 1.0 } * (0.5 + rng.f64()))
        .collect();
    let scale = total as f64 * 1.7 / raw.iter().sum::<f64>();
    raw.iter().map(|r| (r * scale) as usize + 1).collect()
}

/// `src/lib/dN/fI.txt`: pseudo-random words (deflates about 1.7x, like real text).
fn write_file(src: &Path, i: usize, size: usize, rng: &mut fastrand::Rng) {
    let dir = src.join(format!("lib/d{}", i % 16));
    fs::create_dir_all(&dir).unwrap();
    let mut text = String::with_capacity(size + 16);
    while text.len() < size {
        text.push_str(&format!("{:x} ", rng.u32(..) % 65536));
        if rng.u8(..8) == 0 {
            text.push('\n');
        }
    }
    fs::File::create(dir.join(format!("f{i}.txt")))
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
}
