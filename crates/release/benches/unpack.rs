//! Unpack throughput: `Store::unpack` (digest check + extraction + syncfs + rename + state)
//! against `bsdtar -xf` and `unzip -q` on the same ~200 MB package of ~4,000 files.
//!
//! Run with `cargo bench -p orch-release --bench unpack`. Best of 3 per tool, each run into a
//! fresh directory on the same file system; the page cache is NOT dropped (the package is hot
//! in cache for every tool), but `sync` runs (untimed) before each timed run so nobody pays for
//! the previous run's writeback, and extracted trees are only deleted at the end (~5 GB of
//! free space needed). Tools that are missing are skipped with a message.
//!
//! Two rows are an agent's whole staging of the package (issue #15, "one verification pass"):
//! receiving it (written in 64 KiB chunks through `IncomingFile`, hashed as it arrives) then
//! `Store::unpack`: once as it is now (the digest verified on arrival is recorded and extraction
//! does not hash again), once as before (the evidence removed, so extraction hashes the file a
//! second time). Their CPU is the CPU one staged node costs.
//!
//! Extra rows split the store's time: SHA-256 only, `package::verify` (digest + inflate + CRC,
//! nothing written), `package::extract` (the same plus writing files, no sync), and bsdtar
//! followed by `sync -f` (what the store's durability costs a tool that does not sync).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use orch_release::{Limits, PackageSource, Store, StoreConfig, package};
use orch_types::Version;

const FILES: usize = 4_000;
/// Target size of the zip itself.
const ZIP_TARGET: u64 = 200 << 20;
/// Bump to regenerate the cached package when the generator changes.
const DATA_VERSION: &str = "v2";
const RUNS: usize = 3;

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` does not: stay quick there.
    if !std::env::args().any(|a| a == "--bench") {
        println!("unpack benchmark: run it with `cargo bench -p orch-release --bench unpack`");
        return;
    }
    let data = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("unpack-bench-{DATA_VERSION}"));
    let pkg = data.join("pkgs/bench-1.0.0.zip");
    if !pkg.exists() {
        generate(&data, &pkg);
    }
    let zip_bytes = fs::metadata(&pkg).unwrap().len();
    let info = package::verify(&pkg, None, None, &Limits::default()).unwrap();
    let raw_bytes = info.uncompressed_bytes;
    println!(
        "package: {} ({:.1} MB zip, {:.1} MB in {} entries, ratio {:.2})",
        pkg.display(),
        mb(zip_bytes),
        mb(raw_bytes),
        info.entries,
        raw_bytes as f64 / zip_bytes as f64
    );
    println!(
        "machine: {} CPUs, load average before: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg()
    );

    let runs = data.join("runs");
    let _ = fs::remove_dir_all(&runs);
    fs::create_dir_all(&runs).unwrap();

    type Run = Box<dyn Fn(&Path, &Path)>;
    type Tool = (&'static str, Run);
    let bytes = std::sync::Arc::new(fs::read(&pkg).unwrap());
    let digest = info.sha256.clone();
    let staging = |hash_twice: bool| -> Run {
        let (bytes, digest) = (bytes.clone(), digest.clone());
        Box::new(move |_pkg: &Path, dest: &Path| {
            let store = Store::open(StoreConfig::new(dest)).unwrap();
            let zip = dest.join("releases").join("bench-1.0.0.zip");
            let mut incoming =
                orch_package::IncomingFile::create(&zip, &digest, bytes.len() as u64)
                    .unwrap()
                    .record_verified();
            for chunk in bytes.chunks(64 << 10) {
                incoming.write(chunk).unwrap();
            }
            incoming.finish().unwrap();
            if hash_twice {
                orch_package::verified::forget(&zip);
            }
            store
                .unpack(&PackageSource::File {
                    path: zip,
                    sha256: Some(digest.clone()),
                })
                .unwrap();
        })
    };
    let mut tools: Vec<Tool> = vec![
        (
            "staging: receive (hashed on arrival) + Store::unpack, verified once",
            staging(false),
        ),
        (
            "staging before: receive + Store::unpack hashing it again",
            staging(true),
        ),
        (
            "Store::unpack (digest + extract + syncfs + rename + state)",
            Box::new(|pkg: &Path, dest: &Path| {
                let store = Store::open(StoreConfig::new(dest)).unwrap();
                store
                    .unpack(&PackageSource::File {
                        path: pkg.to_path_buf(),
                        sha256: None,
                    })
                    .unwrap();
            }),
        ),
        (
            "package::extract (digest + extract, no sync)",
            Box::new(|pkg: &Path, dest: &Path| {
                package::extract(pkg, dest, None, None, &Limits::default()).unwrap();
            }),
        ),
        (
            "package::verify (digest + inflate + CRC, no writes)",
            Box::new(|pkg: &Path, _dest: &Path| {
                package::verify(pkg, None, None, &Limits::default()).unwrap();
            }),
        ),
        (
            "package::sha256_file (digest only)",
            Box::new(|pkg: &Path, _dest: &Path| {
                package::sha256_file(pkg).unwrap();
            }),
        ),
    ];
    if tool_exists("bsdtar", &["--version"]) {
        tools.push((
            "bsdtar -xf",
            Box::new(|pkg: &Path, dest: &Path| {
                fs::create_dir_all(dest).unwrap();
                run(Command::new("bsdtar")
                    .arg("-xf")
                    .arg(pkg)
                    .arg("-C")
                    .arg(dest));
            }),
        ));
        tools.push((
            "bsdtar -xf, then sync -f",
            Box::new(|pkg: &Path, dest: &Path| {
                fs::create_dir_all(dest).unwrap();
                run(Command::new("bsdtar")
                    .arg("-xf")
                    .arg(pkg)
                    .arg("-C")
                    .arg(dest));
                run(Command::new("sync").arg("-f").arg(dest));
            }),
        ));
    } else {
        println!("skipping bsdtar: not installed (apt-get install -y libarchive-tools)");
    }
    if tool_exists("unzip", &["-v"]) {
        tools.push((
            "unzip -q",
            Box::new(|pkg: &Path, dest: &Path| {
                run(Command::new("unzip").arg("-q").arg(pkg).arg("-d").arg(dest));
            }),
        ));
    } else {
        println!("skipping unzip: not installed (apt-get install -y unzip)");
    }

    // `ORCH_BENCH_ONLY=substring` runs only the matching tools (for profiling one of them).
    if let Ok(only) = std::env::var("ORCH_BENCH_ONLY") {
        tools.retain(|(name, _)| name.contains(&only));
    }
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); tools.len()];
    let mut cpu: Vec<Vec<(f64, f64)>> = vec![Vec::new(); tools.len()];
    // Round-robin so that background load hits every tool alike.
    for round in 0..RUNS {
        for (i, (name, f)) in tools.iter().enumerate() {
            let dest = runs.join(format!("t{i}-r{round}"));
            sync();
            let cpu_start = cpu_seconds();
            let start = Instant::now();
            f(&pkg, &dest);
            let took = start.elapsed();
            let cpu_end = cpu_seconds();
            cpu[i].push((cpu_end.0 - cpu_start.0, cpu_end.1 - cpu_start.1));
            if round == 0 && dest.exists() {
                let n = count_files(&dest);
                assert!(
                    n + 5 >= FILES,
                    "{name}: only {n} files extracted into {}",
                    dest.display()
                );
            }
            times[i].push(took);
            // Trees are kept until the end: deleting thousands of inodes right before the next
            // run makes ext4's inode allocator (find_inode_bit -> recently_deleted) scan the
            // inode tables and dominates whichever tool runs next.
            let (user, sys) = cpu[i].last().unwrap();
            eprintln!("round {round}: {name}: {took:.2?} (CPU user {user:.2} s, sys {sys:.2} s)");
        }
    }
    sync();

    println!(
        "\nUnpack of {} ({:.1} MB zip, {:.1} MB uncompressed, {} entries); best of {RUNS}, \
         page cache not dropped, `sync` before each run; MB/s = uncompressed MB / best seconds; \
         CPU = user+sys seconds of this process and its children in the best run.\n",
        pkg.file_name().unwrap().to_string_lossy(),
        mb(zip_bytes),
        mb(raw_bytes),
        info.entries
    );
    println!("| tool | best s | MB/s | CPU user+sys s (best run) | all runs (s) |");
    println!("|---|---:|---:|---:|---|");
    for (((name, _), ts), cs) in tools.iter().zip(&times).zip(&cpu) {
        let best_i = (0..ts.len()).min_by_key(|&i| ts[i]).unwrap();
        let best = ts[best_i].as_secs_f64();
        let all: Vec<String> = ts
            .iter()
            .map(|t| format!("{:.2}", t.as_secs_f64()))
            .collect();
        let (user, sys) = cs[best_i];
        println!(
            "| {name} | {best:.2} | {:.0} | {user:.2}+{sys:.2} | {} |",
            mb(raw_bytes) / best,
            all.join(", ")
        );
    }
    println!("\nload average after: {}", loadavg());
    let _ = fs::remove_dir_all(&runs);
}

fn mb(b: u64) -> f64 {
    b as f64 / 1e6
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// (user, sys) seconds of this process and its reaped children (/proc/self/stat ticks).
fn cpu_seconds() -> (f64, f64) {
    let stat = fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return (0.0, 0.0);
    };
    // After the command name: state is field 3; utime, stime, cutime, cstime are 14..=17.
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse::<u64>().unwrap_or(0))
        .collect();
    let tick = 100.0;
    ((f[11] + f[13]) as f64 / tick, (f[12] + f[14]) as f64 / tick)
}

fn sync() {
    let _ = Command::new("sync").status();
}

fn tool_exists(prog: &str, args: &[&str]) -> bool {
    Command::new(prog)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn run(cmd: &mut Command) {
    let st = cmd.status().unwrap();
    assert!(st.success(), "{cmd:?} failed: {st}");
}

fn count_files(dir: &Path) -> usize {
    let mut n = 0;
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            n += count_files(&e.path());
        } else {
            n += 1;
        }
    }
    n
}

/// Pseudo-random text: words from a random vocabulary, numbers and hex ids, so deflate gets
/// roughly 1.7x (compressible, not trivially).
fn generate(data: &Path, pkg: &Path) {
    let start = Instant::now();
    let src = data.join("src");
    let _ = fs::remove_dir_all(&src);
    let mut rng = fastrand::Rng::with_seed(42);
    let vocab: Vec<String> = (0..4_000)
        .map(|_| {
            let len = rng.usize(2..11);
            (0..len).map(|_| rng.lowercase()).collect()
        })
        .collect();
    // Sizes: mostly small, some medium, a few large; then scaled to the target.
    let mut sizes: Vec<f64> = (0..FILES)
        .map(|i| match i % 100 {
            0 => rng.f64() * 3e6 + 1e6,
            1..=9 => rng.f64() * 7e5 + 1e5,
            10..=39 => rng.f64() * 9e4 + 1e4,
            _ => rng.f64() * 9e3 + 5e2,
        })
        .collect();
    // This text deflates ~1.7x: aim the uncompressed total accordingly.
    let want = ZIP_TARGET as f64 * 1.7;
    let scale = want / sizes.iter().sum::<f64>();
    sizes.iter_mut().for_each(|s| *s *= scale);

    let mut buf = String::new();
    for (i, size) in sizes.iter().enumerate() {
        let dir = src.join(format!("lib/app{}/priv/d{}", i % 40, i % 7));
        fs::create_dir_all(&dir).unwrap();
        buf.clear();
        while buf.len() < *size as usize {
            match rng.u8(0..10) {
                0..=5 => buf.push_str(&vocab[rng.usize(..vocab.len())]),
                6 | 7 => buf.push_str(&rng.u32(..).to_string()),
                _ => buf.push_str(&format!("{:016x}", rng.u64(..))),
            }
            buf.push(if rng.u8(0..12) == 0 { '\n' } else { ' ' });
        }
        let mut f = fs::File::create(dir.join(format!("f{i}.txt"))).unwrap();
        f.write_all(buf.as_bytes()).unwrap();
    }
    let out: PathBuf = pkg.parent().unwrap().to_path_buf();
    package::build(&src, "bench", Version::new(1, 0, 0), &out).unwrap();
    fs::remove_dir_all(&src).unwrap();
    println!("generated {} in {:.1?}", pkg.display(), start.elapsed());
}
