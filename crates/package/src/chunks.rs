//! Content-defined chunks of package files, so that staging sends a node only the bytes it does
//! not hold already. FastCDC (2020 variant, normalisation level 1) cuts a file where its content
//! says, not at fixed offsets: an insertion or a changed file in a package moves the cut points
//! only around it, and two builds of releases that share most of their files (deterministic zips:
//! `package build`) share most of their chunks. Every party uses the same sizes, so the same
//! bytes give the same chunks everywhere. A chunk is named by its SHA-256.
//!
//! The list of a file's chunks is cached beside it (`<file>.chunks`), valid while the file keeps
//! the identity it had when it was chunked (see [`crate::verified`]).

use std::fs::File;
use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, Result};
use crate::fsutil::write_atomic;
use crate::verified::identity;

/// The smallest, average and largest chunk.
pub const MIN_CHUNK: usize = 16 << 10;
pub const AVG_CHUNK: usize = 64 << 10;
pub const MAX_CHUNK: usize = 256 << 10;

/// One chunk of a file: where it is and what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub offset: u64,
    pub len: u32,
    pub sha256: [u8; 32],
}

/// `<file>.chunks`.
pub fn cache_path(file: &Path) -> PathBuf {
    let mut s = file.as_os_str().to_owned();
    s.push(".chunks");
    PathBuf::from(s)
}

/// Cuts the bytes `r` yields into chunks (`path` names it in errors).
pub fn chunk_reader(r: impl std::io::Read, path: &Path) -> Result<Vec<Chunk>> {
    let cdc = fastcdc::v2020::StreamCDC::new(r, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK);
    let mut out = Vec::new();
    for c in cdc {
        let c = c.map_err(|e| match e {
            fastcdc::v2020::Error::IoError(source) => Error::Io {
                op: "read",
                path: path.to_path_buf(),
                source,
            },
            other => Error::bad(path, format!("cannot cut it into chunks: {other}")),
        })?;
        out.push(Chunk {
            offset: c.offset,
            // At most MAX_CHUNK.
            len: c.length as u32,
            sha256: Sha256::digest(&c.data).into(),
        });
    }
    Ok(out)
}

/// The chunks of the file at `path`: from its cache when that was made from this very file (the
/// same identity), else cut now and cached (the cache is an optimisation: a failure to write it
/// is not an error).
pub fn of_file(path: &Path) -> Result<Vec<Chunk>> {
    let f = File::open(path).ctx("open", path)?;
    let id = identity(&f);
    if let Some(id) = &id
        && let Some(cached) = read_cache(path, id)
    {
        return Ok(cached);
    }
    let chunks = chunk_reader(BufReader::with_capacity(1 << 20, &f), path)?;
    if let Some(id) = id {
        let _ = write_cache(path, &id, &chunks);
    }
    Ok(chunks)
}

/// Caches `chunks` as the chunks of the file at `path`, which must be exactly how that file is
/// cut (a file just rebuilt from a checked list: [`crate::delta`]). Best effort, as caching.
pub fn remember(path: &Path, chunks: &[Chunk]) {
    let Ok(f) = File::open(path) else { return };
    if let Some(id) = identity(&f) {
        let _ = write_cache(path, &id, chunks);
    }
}

fn write_cache(path: &Path, id: &str, chunks: &[Chunk]) -> Result<()> {
    let mut text = Vec::with_capacity(80 * chunks.len() + 64);
    let _ = writeln!(text, "{id}");
    for c in chunks {
        let _ = writeln!(
            text,
            "{} {} {}",
            c.offset,
            c.len,
            crate::digest::hex(&c.sha256)
        );
    }
    write_atomic(&cache_path(path), &text)
}

fn read_cache(path: &Path, id: &str) -> Option<Vec<Chunk>> {
    let text = std::fs::read_to_string(cache_path(path)).ok()?;
    let mut lines = text.lines();
    if lines.next()? != id {
        return None;
    }
    let mut out = Vec::new();
    let mut next = 0u64;
    for line in lines {
        let mut it = line.split(' ');
        let offset: u64 = it.next()?.parse().ok()?;
        let len: u32 = it.next()?.parse().ok()?;
        let sha256 = parse_digest(it.next()?)?;
        // A cache that does not tile the file exactly is not this file's.
        if offset != next || len == 0 || len as usize > MAX_CHUNK {
            return None;
        }
        next = offset + u64::from(len);
        out.push(Chunk {
            offset,
            len,
            sha256,
        });
    }
    Some(out)
}

/// 64 hex digits as 32 bytes.
pub fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Removes the cache (with the file it describes).
pub fn forget(path: &Path) {
    let _ = std::fs::remove_file(cache_path(path));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut rng = fastrand::Rng::with_seed(seed);
        (0..n).map(|_| rng.u8(..)).collect()
    }

    #[test]
    fn chunks_tile_the_file_and_survive_an_insertion_elsewhere() {
        let a = noise(2 << 20, 7);
        let ca = chunk_reader(&a[..], Path::new("a")).unwrap();
        assert!(ca.len() > 8, "{} chunks", ca.len());
        let mut at = 0u64;
        for c in &ca {
            assert_eq!(c.offset, at);
            assert!((c.len as usize) <= MAX_CHUNK);
            at += u64::from(c.len);
        }
        assert_eq!(at, a.len() as u64);
        // 100 bytes inserted near the start: all but the first chunk or two are unchanged.
        let mut b = a.clone();
        b.splice(1000..1000, noise(100, 8));
        let cb = chunk_reader(&b[..], Path::new("b")).unwrap();
        let known: std::collections::HashSet<[u8; 32]> = ca.iter().map(|c| c.sha256).collect();
        let new = cb.iter().filter(|c| !known.contains(&c.sha256)).count();
        assert!(new <= 2, "{new} of {} chunks changed", cb.len());
    }

    #[test]
    fn the_cache_is_used_only_for_the_file_it_was_made_from() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p-1.0.0.zip");
        std::fs::write(&path, noise(1 << 20, 1)).unwrap();
        let first = of_file(&path).unwrap();
        assert!(cache_path(&path).exists());
        assert_eq!(of_file(&path).unwrap(), first);
        // A cache that lies about this file is believed only while the identity matches; once
        // the file is rewritten it is cut again.
        std::fs::write(&path, noise(1 << 20, 2)).unwrap();
        let again = of_file(&path).unwrap();
        assert_ne!(again, first);
        assert_eq!(
            again,
            chunk_reader(&std::fs::read(&path).unwrap()[..], &path).unwrap()
        );
        // A damaged cache is ignored.
        let id = identity(&File::open(&path).unwrap()).unwrap();
        std::fs::write(cache_path(&path), format!("{id}\n5 10 zz\n")).unwrap();
        assert_eq!(of_file(&path).unwrap(), again);
        forget(&path);
        assert!(!cache_path(&path).exists());
    }
}
