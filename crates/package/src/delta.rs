//! A package sent as the chunks the receiver lacks ([`crate::chunks`]), the rest copied from the
//! files the receiver holds already: the sender gives the list of the package's chunks (size and
//! SHA-256 of each, in order), asks which are missing, and streams only those. The receiver
//! rebuilds the exact file through an [`IncomingFile`], so the whole file's size and SHA-256 are
//! checked as for a whole transfer (and the caller checks the signature as it always does).
//! Every chunk sent is checked against the digest the list gives it, so once a rebuilt file is
//! in place its list is exact and is kept as its chunk index ([`chunks::remember`]). A list that
//! lies, a chunk that went away meanwhile, or a short stream ends in a refused transfer, never
//! in a wrong file; the sender then sends the whole file.
//!
//! The agent's delta push (crates/agent, `delta.rs`) follows the same protocol; this is the
//! coordinators' copy (operator uploads and copies between coordinators).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::IncomingFile;
use crate::chunks::{self, Chunk, MAX_CHUNK};

/// Where a chunk is held here: a file, offset and length.
pub type Located = (PathBuf, u64, u32);

/// One chunk of a list: its size and SHA-256.
pub type ChunkId = (u32, [u8; 32]);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The chunk list or the indexes sent are malformed: the sender's fault.
    #[error("delta transfer refused: {0}; nothing was stored")]
    BadList(String),
    /// A chunk that is not sent is not here (any more): send the whole file.
    #[error("delta transfer refused: chunk {index} is not here (any more); send the whole package")]
    Missing { index: usize },
    /// A file holding chunks could not be read: send the whole file.
    #[error("delta transfer refused: cannot read a chunk of {}; send the whole package", path.display())]
    Local {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A chunk sent is not the one the list names.
    #[error(
        "delta transfer refused: chunk {index} as sent does not have the SHA-256 its list gives; discarded"
    )]
    WrongChunk { index: usize },
    #[error("delta transfer refused: more bytes than the chunks to send; discarded")]
    TooMuch,
    /// Writing or checking the rebuilt file failed.
    #[error(transparent)]
    File(#[from] crate::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every chunk of `files`, by digest (the first file holding a chunk wins). Blocking: a file
/// without a valid chunk cache is read once and cut; a file that cannot be read is skipped.
pub fn index(files: impl IntoIterator<Item = PathBuf>) -> HashMap<[u8; 32], Located> {
    let mut out = HashMap::new();
    for path in files {
        let Ok(list) = chunks::of_file(&path) else {
            continue;
        };
        for c in list {
            out.entry(c.sha256)
                .or_insert_with(|| (path.clone(), c.offset, c.len));
        }
    }
    out
}

/// A list as it came over the wire, checked: every size within bounds, 32-byte digests, the
/// sizes adding up to the file's size.
pub fn checked_list<'a>(
    raw: impl ExactSizeIterator<Item = (u32, &'a [u8])>,
    size: u64,
) -> Result<Vec<ChunkId>> {
    let bad = |why: String| Error::BadList(format!("the chunk list {why}"));
    // Far more than the smallest chunks could make: refused before allocating anything.
    if raw.len() as u64 > size / 1024 + 1 {
        return Err(bad(format!("has {} entries for {size} bytes", raw.len())));
    }
    let mut total = 0u64;
    let mut out = Vec::with_capacity(raw.len());
    for (i, (len, digest)) in raw.enumerate() {
        let digest: [u8; 32] = digest
            .try_into()
            .map_err(|_| bad(format!("names chunk {i} by {} bytes, not 32", digest.len())))?;
        if len == 0 || len as usize > MAX_CHUNK {
            return Err(bad(format!("gives chunk {i} {len} bytes")));
        }
        total += u64::from(len);
        out.push((len, digest));
    }
    if total != size {
        return Err(bad(format!("adds up to {total} bytes, not {size}")));
    }
    Ok(out)
}

/// The indexes of the chunks of `list` that `local` does not hold.
pub fn missing(local: &HashMap<[u8; 32], Located>, list: &[ChunkId]) -> Vec<u32> {
    (0..list.len() as u32)
        .filter(|&i| !local.contains_key(&list[i as usize].1))
        .collect()
}

/// The chunks of a file cut as `list` says (offsets from the sizes).
pub fn as_chunks(list: &[ChunkId]) -> Vec<Chunk> {
    let mut at = 0u64;
    list.iter()
        .map(|&(len, sha256)| {
            let c = Chunk {
                offset: at,
                len,
                sha256,
            };
            at += u64::from(len);
            c
        })
        .collect()
}

#[derive(Debug)]
enum Piece {
    /// Chunk `index` from the stream: this many bytes left, hashed so far, expected digest.
    Sent {
        index: usize,
        left: u64,
        hash: Sha256,
        digest: [u8; 32],
    },
    /// Copied from a file here.
    Local(Located),
}

/// What a delta transfer writes, in order: the sent chunks from the stream, the others from the
/// files here.
#[derive(Debug)]
pub struct Assembly {
    pieces: Vec<Piece>,
    next: usize,
    files: HashMap<PathBuf, File>,
    /// One buffer for every local piece: a fresh zeroed one per chunk cost an allocation (an
    /// `mmap` and its page faults past glibc's threshold) and a memset per 64 KiB copied.
    buf: Vec<u8>,
}

impl Assembly {
    /// Plans the file of `list` from the `sent` chunks (ascending indexes) and `local`'s.
    /// Refuses when a chunk that is not sent is not in `local`.
    pub fn plan(
        local: &HashMap<[u8; 32], Located>,
        list: &[ChunkId],
        sent: &[u32],
    ) -> Result<Assembly> {
        if sent.windows(2).any(|w| w[0] >= w[1]) || sent.iter().any(|&i| i as usize >= list.len()) {
            return Err(Error::BadList(
                "the sent chunk indexes are not ascending indexes of the list".into(),
            ));
        }
        let mut pieces = Vec::with_capacity(list.len());
        let mut sent = sent.iter().peekable();
        for (index, (size, digest)) in list.iter().enumerate() {
            if sent.peek().is_some_and(|&&s| s as usize == index) {
                sent.next();
                pieces.push(Piece::Sent {
                    index,
                    left: u64::from(*size),
                    hash: Sha256::new(),
                    digest: *digest,
                });
                continue;
            }
            let at = local.get(digest).ok_or(Error::Missing { index })?;
            pieces.push(Piece::Local(at.clone()));
        }
        Ok(Assembly {
            pieces,
            next: 0,
            files: HashMap::new(),
            buf: Vec::new(),
        })
    }

    /// How many bytes the stream carries.
    pub fn sent_bytes(&self) -> u64 {
        self.pieces
            .iter()
            .map(|p| match p {
                Piece::Sent { left, .. } => *left,
                Piece::Local(_) => 0,
            })
            .sum()
    }

    /// Writes the local pieces that come next, up to the next sent one.
    fn copy_locals(&mut self, out: &mut IncomingFile) -> Result<()> {
        while let Some(Piece::Local((path, offset, len))) = self.pieces.get(self.next) {
            let local = |source| Error::Local {
                path: path.clone(),
                source,
            };
            if !self.files.contains_key(path) {
                let f = File::open(path).map_err(local)?;
                self.files.insert(path.clone(), f);
            }
            // At most MAX_CHUNK bytes (a checked list's sizes).
            self.buf.resize(*len as usize, 0);
            if let Some(f) = self.files.get(path) {
                f.read_exact_at(&mut self.buf, *offset).map_err(local)?;
            }
            out.write(&self.buf)?;
            self.next += 1;
        }
        Ok(())
    }

    /// Feeds bytes from the stream: they fill the sent pieces in order (each checked against
    /// its digest once complete); local pieces in between are copied.
    pub fn feed(&mut self, out: &mut IncomingFile, mut data: &[u8]) -> Result<()> {
        loop {
            self.copy_locals(out)?;
            if data.is_empty() {
                return Ok(());
            }
            let Some(Piece::Sent {
                index,
                left,
                hash,
                digest,
            }) = self.pieces.get_mut(self.next)
            else {
                return Err(Error::TooMuch);
            };
            let take = (*left).min(data.len() as u64) as usize;
            hash.update(&data[..take]);
            out.write(&data[..take])?;
            *left -= take as u64;
            data = &data[take..];
            if *left == 0 {
                if <[u8; 32]>::from(std::mem::take(hash).finalize()) != *digest {
                    return Err(Error::WrongChunk { index: *index });
                }
                self.next += 1;
            }
        }
    }

    /// The stream ended: the trailing local pieces. A sent piece still waiting for bytes is a
    /// truncated stream, which the file's size check refuses.
    pub fn finish(&mut self, out: &mut IncomingFile) -> Result<()> {
        self.copy_locals(out)
    }
}

/// Keeps `list` as the chunk index of the file at `path` (just rebuilt from it and checked).
/// Only an optimisation: a failure is ignored, and the file is cut again when needed.
pub fn remember(path: &Path, list: &[ChunkId]) {
    chunks::remember(path, &as_chunks(list));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::hex;

    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut rng = fastrand::Rng::with_seed(seed);
        (0..n).map(|_| rng.u8(..)).collect()
    }

    /// A directory holding `old` (2 MiB of noise) and the bytes of `new`: the same with 100
    /// bytes changed in the middle.
    fn setup() -> (tempfile::TempDir, PathBuf, Vec<u8>) {
        let tmp = tempfile::tempdir().unwrap();
        let old = noise(2 << 20, 1);
        let path = tmp.path().join("old");
        std::fs::write(&path, &old).unwrap();
        let mut new = old.clone();
        new[1 << 20..(1 << 20) + 100].copy_from_slice(&noise(100, 2));
        (tmp, path, new)
    }

    fn list_of(bytes: &[u8]) -> Vec<ChunkId> {
        chunks::chunk_reader(bytes, Path::new("new"))
            .unwrap()
            .iter()
            .map(|c| (c.len, c.sha256))
            .collect()
    }

    fn incoming(dir: &Path, bytes: &[u8]) -> IncomingFile {
        let sha = hex(&Sha256::digest(bytes));
        IncomingFile::create(&dir.join("new"), &sha, bytes.len() as u64).unwrap()
    }

    /// The bytes of the `sent` chunks of `bytes`, in order.
    fn stream(bytes: &[u8], list: &[ChunkId], sent: &[u32]) -> Vec<u8> {
        let cs = as_chunks(list);
        sent.iter()
            .flat_map(|&i| {
                let c = cs[i as usize];
                bytes[c.offset as usize..(c.offset + u64::from(c.len)) as usize].to_vec()
            })
            .collect()
    }

    #[test]
    fn a_patched_file_is_rebuilt_from_the_chunks_sent_and_the_ones_here() {
        let (tmp, old, new) = setup();
        let local = index([old]);
        let list = list_of(&new);
        let missing = missing(&local, &list);
        assert!(!missing.is_empty() && missing.len() <= 2, "{missing:?}");
        let mut a = Assembly::plan(&local, &list, &missing).unwrap();
        assert!(a.sent_bytes() < new.len() as u64 / 4);
        let mut f = incoming(tmp.path(), &new);
        for piece in stream(&new, &list, &missing).chunks(1000) {
            a.feed(&mut f, piece).unwrap();
        }
        a.finish(&mut f).unwrap();
        let path = f.finish().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), new);
        // The list, checked chunk by chunk, becomes the new file's index.
        remember(&path, &list);
        assert_eq!(chunks::of_file(&path).unwrap(), as_chunks(&list));
    }

    #[test]
    fn a_lying_list_a_wrong_chunk_or_a_short_stream_lands_nothing() {
        let (tmp, old, new) = setup();
        let local = index([old.clone()]);
        let dest = tmp.path().join("new");
        // The list names the old chunk where the new one differs: the rebuilt bytes are the
        // old ones, whose SHA-256 is not the announced one.
        let mut lying = list_of(&new);
        let old_list = list_of(&std::fs::read(&old).unwrap());
        let changed = lying
            .iter()
            .position(|c| !local.contains_key(&c.1))
            .unwrap();
        lying[changed] = old_list[changed];
        if let Ok(mut a) = Assembly::plan(&local, &lying, &[]) {
            let mut f = incoming(tmp.path(), &new);
            let r = a.finish(&mut f).map(|()| f.finish());
            assert!(!matches!(r, Ok(Ok(_))), "a lying list was accepted");
        }
        assert!(!dest.exists());

        // A sent chunk whose bytes are not the ones its digest names.
        let list = list_of(&new);
        let missing = missing(&local, &list);
        let mut a = Assembly::plan(&local, &list, &missing).unwrap();
        let mut f = incoming(tmp.path(), &new);
        let mut bytes = stream(&new, &list, &missing);
        bytes[0] ^= 1;
        let e = a.feed(&mut f, &bytes).unwrap_err();
        assert!(matches!(e, Error::WrongChunk { .. }), "{e}");
        drop(f);
        assert!(!dest.exists());

        // An honest list, but the stream stops short.
        let all: Vec<u32> = (0..list.len() as u32).collect();
        let mut a = Assembly::plan(&local, &list, &all).unwrap();
        let mut f = incoming(tmp.path(), &new);
        a.feed(&mut f, &new[..new.len() / 2]).unwrap();
        a.finish(&mut f).unwrap();
        let e = f.finish().unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        assert!(!dest.exists());
    }

    #[test]
    fn bad_lists_and_missing_local_chunks_are_refused_before_anything_is_written() {
        let d = [0u8; 32];
        assert!(checked_list([(10u32, &d[..])].into_iter(), 10).is_ok());
        for (len, digest, size) in [
            (10u32, &d[..], 11u64),
            (10, &d[..31], 10),
            (0, &d[..], 0),
            ((MAX_CHUNK + 2) as u32, &d[..], (MAX_CHUNK + 2) as u64),
        ] {
            assert!(
                checked_list([(len, digest)].into_iter(), size).is_err(),
                "{len} {size}"
            );
        }
        let (tmp, old, new) = setup();
        let list = list_of(&new);
        let local = index([old.clone()]);
        for sent in [vec![1, 0], vec![list.len() as u32]] {
            assert!(matches!(
                Assembly::plan(&local, &list, &sent),
                Err(Error::BadList(_))
            ));
        }
        // A chunk that is neither sent nor here.
        let e = Assembly::plan(&local, &list, &[]).unwrap_err();
        assert!(matches!(e, Error::Missing { .. }), "{e}");
        assert!(e.to_string().contains("send the whole package"));
        // Here when planned, gone when copied: refused, not a wrong file.
        let all_but_first: Vec<u32> = (1..list.len() as u32).collect();
        assert!(
            local.contains_key(&list[0].1),
            "the change is in the middle"
        );
        let mut a = Assembly::plan(&local, &list, &all_but_first).unwrap();
        std::fs::remove_file(&old).unwrap();
        let mut f = incoming(tmp.path(), &new);
        let e = a.feed(&mut f, &[]).unwrap_err();
        assert!(matches!(e, Error::Local { .. }), "{e}");
    }
}
