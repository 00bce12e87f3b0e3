//! Delta pushes: a package arrives as the chunks this node lacks, the rest copied from the
//! packages it already holds (`ROOT/releases/*.zip`, cut into content-defined chunks by
//! [`orch_package::chunks`]). The rebuilding itself is [`orch_package::delta`], shared with the
//! coordinators' delta uploads: every chunk sent is checked against its digest, and the
//! reassembled file goes through the same [`IncomingFile`] as a full push (size and sha256 of
//! the whole file; the signature was checked before a byte was written). A chunk list that
//! lies, or a local package that changed, therefore ends in a refused push, never in a wrong
//! file. This module adds the node's view: which files are sources, and the agent's errors.
//!
//! [`IncomingFile`]: orch_package::IncomingFile

use std::collections::HashMap;
use std::path::Path;

use orch_package::delta::{self as shared, Located};
use orch_proto::agent as pb;
use orch_types::parse_package_file_name;

use crate::error::{Error, Result};
use crate::push::Upload;

/// Every chunk of every package in `releases` but `except` (the file being pushed), by digest.
/// Blocking: a package without a valid chunk cache is read once and cut.
pub fn local_chunks(releases: &Path, except: &str) -> HashMap<[u8; 32], Located> {
    let Ok(rd) = std::fs::read_dir(releases) else {
        return HashMap::new();
    };
    let files = rd.flatten().filter_map(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        let source = name != except && parse_package_file_name(&name).is_some();
        (source && e.path().is_file()).then(|| e.path())
    });
    shared::index(files)
}

/// The header's chunk list, checked: every size within bounds, 32-byte digests, the sizes adding
/// up to the package's size.
pub fn checked_list(chunks: &[pb::ChunkRef], size: u64) -> Result<Vec<(u32, [u8; 32])>> {
    shared::checked_list(chunks.iter().map(|c| (c.size, c.sha256.as_slice())), size)
        .map_err(refused)
}

/// `MissingChunks`: the indexes of the chunks no package here holds.
pub fn missing(releases: &Path, file_name: &str, list: &[(u32, [u8; 32])]) -> Vec<u32> {
    shared::missing(&local_chunks(releases, file_name), list)
}

/// The agent's error for a refused delta: a chunk that is gone tells the sender to push the
/// whole package (the words the coordinator looks for); a bad list or chunk is a bad request.
fn refused(e: shared::Error) -> Error {
    match e {
        shared::Error::Missing { index } => Error::Refused(format!(
            "push refused: chunk {index} is not on this node (any more); push the whole package"
        )),
        shared::Error::Local { path, source } => Error::Refused(format!(
            "push refused: cannot read a chunk of {} ({source}); push the whole package",
            path.display()
        )),
        shared::Error::File(e) => Error::from(e),
        e @ (shared::Error::BadList(_)
        | shared::Error::WrongChunk { .. }
        | shared::Error::TooMuch) => Error::BadRequest(format!("push refused: {e}")),
    }
}

/// What a delta push writes, in order: the sent chunks from the stream, the others from the
/// packages here; and the list, kept as the package's chunk index once it is in place.
pub struct Assembly {
    inner: shared::Assembly,
    list: Vec<(u32, [u8; 32])>,
}

impl Assembly {
    /// Refuses when a chunk that is not sent is nowhere here (it was when the sender asked,
    /// but a package went away since): the sender then pushes the whole file.
    pub fn plan(
        releases: &Path,
        file_name: &str,
        list: &[(u32, [u8; 32])],
        sent: &[u32],
    ) -> Result<Assembly> {
        let local = if sent.len() < list.len() {
            local_chunks(releases, file_name)
        } else {
            HashMap::new()
        };
        let inner = shared::Assembly::plan(&local, list, sent).map_err(refused)?;
        Ok(Assembly {
            inner,
            list: list.to_vec(),
        })
    }

    /// A relayed push: every chunk no package here holds is fetched from peers and fed in
    /// order as if the stream sent it. Returns the assembly and those indexes.
    pub fn plan_relay(
        releases: &Path,
        file_name: &str,
        list: &[(u32, [u8; 32])],
    ) -> Result<(Assembly, Vec<u32>)> {
        let local = local_chunks(releases, file_name);
        let remote = shared::missing(&local, list);
        let inner = shared::Assembly::plan(&local, list, &remote).map_err(refused)?;
        let a = Assembly {
            inner,
            list: list.to_vec(),
        };
        Ok((a, remote))
    }

    /// How many bytes the stream carries.
    pub fn sent_bytes(&self) -> u64 {
        self.inner.sent_bytes()
    }

    /// Feeds bytes from the stream: they fill the sent pieces in order (each checked against
    /// its digest), local pieces in between are copied.
    pub fn feed(&mut self, upload: &mut Upload, data: &[u8]) -> Result<()> {
        self.inner.feed(upload.incoming(), data).map_err(refused)
    }

    /// The stream ended: the trailing local pieces; a sent piece still waiting for bytes is a
    /// truncated stream (the upload's size check then refuses it).
    pub fn finish(&mut self, upload: &mut Upload) -> Result<()> {
        self.inner.finish(upload.incoming()).map_err(refused)
    }

    /// The package is in place at `path`, checked whole: its list (every chunk checked) becomes
    /// its chunk index, so later pushes need not cut it again.
    pub fn remember(&self, path: &Path) {
        shared::remember(path, &self.list);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::push::Header;
    use orch_package::chunks::{self, MAX_CHUNK};
    use std::path::PathBuf;

    /// Incompressible bytes (xorshift), the same for the same seed.
    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect()
    }

    fn sha256_hex(b: &[u8]) -> String {
        orch_package::digest::sha256_reader(&mut &b[..], Path::new("bytes"))
            .unwrap()
            .0
    }

    /// `releases/` holding app-1.0.0.zip (2 MiB of noise), and app-1.0.1's bytes: the same
    /// with 100 bytes changed in the middle.
    fn setup() -> (tempfile::TempDir, PathBuf, Vec<u8>) {
        let tmp = tempfile::tempdir().unwrap();
        let releases = tmp.path().join("releases");
        std::fs::create_dir_all(&releases).unwrap();
        let old = noise(2 << 20, 1);
        std::fs::write(releases.join("app-1.0.0.zip"), &old).unwrap();
        let mut new = old.clone();
        new[1 << 20..(1 << 20) + 100].copy_from_slice(&noise(100, 2));
        (tmp, releases, new)
    }

    fn list_of(bytes: &[u8]) -> Vec<(u32, [u8; 32])> {
        chunks::chunk_reader(bytes, Path::new("new"))
            .unwrap()
            .iter()
            .map(|c| (c.len, c.sha256))
            .collect()
    }

    fn upload(releases: &Path, bytes: &[u8]) -> Upload {
        let h = Header::validate(
            "app",
            "1.0.1",
            &sha256_hex(bytes),
            bytes.len() as u64,
            vec![],
            1 << 30,
        )
        .unwrap();
        Upload::start(releases, h).unwrap().unwrap()
    }

    /// Feeds the bytes of the `sent` chunks of `bytes`, in 1000-byte pieces.
    fn feed_sent(
        a: &mut Assembly,
        u: &mut Upload,
        bytes: &[u8],
        list: &[(u32, [u8; 32])],
        sent: &[u32],
    ) {
        let mut starts = Vec::new();
        let mut at = 0usize;
        for (len, _) in list {
            starts.push(at);
            at += *len as usize;
        }
        let mut stream = Vec::new();
        for &i in sent {
            let s = starts[i as usize];
            stream.extend_from_slice(&bytes[s..s + list[i as usize].0 as usize]);
        }
        for piece in stream.chunks(1000) {
            a.feed(u, piece).unwrap();
        }
    }

    #[test]
    fn a_patched_package_is_rebuilt_from_the_chunks_sent_and_the_ones_here() {
        let (_tmp, releases, new) = setup();
        let list = list_of(&new);
        let missing = missing(&releases, "app-1.0.1.zip", &list);
        assert!(
            !missing.is_empty() && missing.len() <= 2,
            "{missing:?} of {}",
            list.len()
        );
        let mut a = Assembly::plan(&releases, "app-1.0.1.zip", &list, &missing).unwrap();
        assert!(a.sent_bytes() < new.len() as u64 / 4);
        let mut u = upload(&releases, &new);
        feed_sent(&mut a, &mut u, &new, &list, &missing);
        a.finish(&mut u).unwrap();
        let path = u.finish().unwrap();
        assert_eq!(std::fs::read(path).unwrap(), new);
    }

    #[test]
    fn a_lying_chunk_list_or_a_short_stream_lands_nothing() {
        let (_tmp, releases, new) = setup();
        // The list says the changed chunk is one the node holds (the old one's digest): the
        // assembled file is the old bytes, whose sha256 is not the announced one.
        let mut lying = list_of(&new);
        let old_list = list_of(&std::fs::read(releases.join("app-1.0.0.zip")).unwrap());
        let known: std::collections::HashSet<_> = old_list.iter().map(|c| c.1).collect();
        let changed = lying.iter().position(|c| !known.contains(&c.1)).unwrap();
        lying[changed] = old_list[changed];
        let mut a = Assembly::plan(&releases, "app-1.0.1.zip", &lying, &[]).unwrap();
        let mut u = upload(&releases, &new);
        // The sizes may not even add up to the announced size any more.
        let r = a.finish(&mut u).map(|()| u.finish());
        assert!(!matches!(r, Ok(Ok(_))), "a lying list was accepted");
        assert!(!releases.join("app-1.0.1.zip").exists());

        // An honest list, but the stream stops short.
        let list = list_of(&new);
        let sent: Vec<u32> = (0..list.len() as u32).collect();
        let mut a = Assembly::plan(&releases, "app-1.0.1.zip", &list, &sent).unwrap();
        let mut u = upload(&releases, &new);
        a.feed(&mut u, &new[..new.len() / 2]).unwrap();
        a.finish(&mut u).unwrap();
        let e = u.finish().unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        assert!(!releases.join("app-1.0.1.zip").exists());
    }

    #[test]
    fn bad_lists_are_refused_before_anything_is_written() {
        let ok = pb::ChunkRef {
            size: 10,
            sha256: vec![0; 32],
        };
        assert!(checked_list(std::slice::from_ref(&ok), 10).is_ok());
        let short = pb::ChunkRef {
            sha256: vec![0; 31],
            ..ok.clone()
        };
        for (list, size) in [
            (vec![ok.clone()], 11),
            (vec![short], 10),
            (
                vec![pb::ChunkRef {
                    size: 0,
                    ..ok.clone()
                }],
                0,
            ),
            (
                vec![pb::ChunkRef {
                    size: (MAX_CHUNK + 2) as u32,
                    ..ok.clone()
                }],
                (MAX_CHUNK + 2) as u64,
            ),
        ] {
            assert!(checked_list(&list, size).is_err(), "{list:?}");
        }
        let (_tmp, releases, new) = setup();
        let list = list_of(&new);
        // Not ascending, or out of range.
        for sent in [vec![1, 0], vec![list.len() as u32]] {
            assert!(Assembly::plan(&releases, "app-1.0.1.zip", &list, &sent).is_err());
        }
        // A chunk the node does not hold, not sent: refused, telling the sender what to do.
        let e = Assembly::plan(&releases, "app-1.0.1.zip", &list, &[])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("push the whole package"), "{e}");
    }
}
