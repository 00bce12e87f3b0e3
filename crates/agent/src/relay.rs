//! Peer relay: a node staging a package fetches the chunks it lacks from other agents that
//! already hold it (the leader names them in the push header), so the leader sends a package a
//! bounded number of times whatever the cluster's size.
//!
//! Serving side ([`Source`]): `FetchChunks` reads chunks of a package that is here whole and
//! verified (its recorded digest is the one asked for), by index into its content-defined chunk
//! list. Fetching side ([`fetch`]): every chunk is checked against the size and digest of the
//! list the push header carries before it is written, and the whole file is then checked as for
//! any push (size, sha256, signature). A peer that fails, is unreachable or sends a wrong chunk
//! is left for the next; when none can give a chunk the push is refused with "relay failed" and
//! nothing lands. Peers are reached under this agent's own certificate and must present the
//! certificate of the node the leader named (`agent-<node>`).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use orch_package::chunks;
use orch_proto::agent::{self as pb, agent_client::AgentClient};
use orch_tls::{Role, Security, party_domain, validate_name};
use sha2::Digest;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::error::{Error, Result};

/// What a relayed push's refusal says: the sender then pushes the chunks itself.
pub const RELAY_FAILED: &str = "relay failed";
/// More peers than this in one header is not a relay plan but a flood.
pub const MAX_PEERS: usize = 16;
/// Connecting to a peer; a peer that does not answer within this is skipped.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A peer that sends nothing for this long (frozen, overloaded) is left for the next one.
const PEER_STALL: Duration = Duration::from_secs(5);
/// A fetch's overall limit when the push carries no deadline.
const DEFAULT_BUDGET: Duration = Duration::from_secs(120);

/// Channels to peers, one per (node, address), reused across pushes.
pub struct Peers {
    security: Security,
    channels: Mutex<HashMap<(String, String), Channel>>,
}

impl Peers {
    pub fn new(security: Security) -> Peers {
        Peers {
            security,
            channels: Mutex::new(HashMap::new()),
        }
    }

    fn client(&self, p: &pb::Peer) -> Result<AgentClient<Channel>> {
        let mut map = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        let key = (p.node_id.clone(), p.address.clone());
        let ch = match map.get(&key) {
            Some(c) => c.clone(),
            None => {
                let c = self
                    .security
                    .endpoint(&p.address, &party_domain(Role::Agent, &p.node_id))
                    .map_err(|e| {
                        Error::BadRequest(format!(
                            "push refused: peer {} at {:?} cannot be dialed: {e}",
                            p.node_id, p.address
                        ))
                    })?
                    .connect_timeout(CONNECT_TIMEOUT)
                    .connect_lazy();
                map.insert(key, c.clone());
                c
            }
        };
        Ok(AgentClient::new(ch).max_decoding_message_size(crate::MAX_MESSAGE_BYTES))
    }
}

/// Checks a header's peers: named nodes (not this one), with addresses, not too many.
pub fn checked_peers(peers: &[pb::Peer], me: &str) -> Result<()> {
    let bad = |why: String| Error::BadRequest(format!("push refused: the peer list {why}"));
    if peers.len() > MAX_PEERS {
        return Err(bad(format!(
            "has {} peers (at most {MAX_PEERS})",
            peers.len()
        )));
    }
    for p in peers {
        validate_name(&p.node_id).map_err(|e| bad(format!("names a bad node: {e}")))?;
        if p.node_id == me {
            return Err(bad(format!("names this node ({me})")));
        }
        if p.address.is_empty() || p.address.len() > 255 {
            return Err(bad(format!("gives {} no usable address", p.node_id)));
        }
    }
    Ok(())
}

/// A package here, open for serving its chunks.
pub struct Source {
    file: File,
    path: std::path::PathBuf,
    /// Offset and length of each chunk, by index.
    ranges: Vec<(u64, u32)>,
}

impl Source {
    /// Opens `releases/<name>-<version>.zip` for `FetchChunks`: it must be here whole with the
    /// digest asked for (from its verification record, else hashed), and every index must be in
    /// its chunk list, ascending. Blocking.
    pub fn open(releases: &Path, file_name: &str, sha256: &str, indexes: &[u32]) -> Result<Source> {
        let path = releases.join(file_name);
        if !crate::push::holds(&path, sha256) {
            return Err(Error::Refused(format!(
                "fetch refused: {file_name} with sha256 {sha256} is not on this node (any more)"
            )));
        }
        let list = chunks::of_file(&path)?;
        if indexes.windows(2).any(|w| w[0] >= w[1])
            || indexes.iter().any(|&i| i as usize >= list.len())
        {
            return Err(Error::BadRequest(format!(
                "fetch refused: the indexes are not ascending indexes of the {} chunks of {file_name}",
                list.len()
            )));
        }
        let file = File::open(&path).map_err(Error::io("open", &path))?;
        let ranges = list.iter().map(|c| (c.offset, c.len)).collect();
        Ok(Source { file, ranges, path })
    }

    /// Chunk `index`'s bytes. Blocking.
    pub fn read(&self, index: u32) -> Result<Vec<u8>> {
        let (offset, len) = self.ranges[index as usize];
        let mut buf = vec![0u8; len as usize];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(Error::io("read a chunk of", &self.path))?;
        Ok(buf)
    }
}

/// What a relayed push fetches, and from whom.
pub struct Plan<'a> {
    pub peers: &'a [pb::Peer],
    pub name: &'a str,
    pub version: &'a str,
    pub sha256: &'a str,
    /// The header's chunk list (size, digest).
    pub list: &'a [(u32, [u8; 32])],
    /// The indexes to fetch, ascending.
    pub wanted: &'a [u32],
    /// The push's own deadline (its fence's), if any.
    pub deadline_unix_ms: u64,
}

/// Why one peer did not give every chunk.
enum PeerFailure {
    /// The peer's fault (unreachable, refused, a wrong chunk): try the next one.
    Peer(String),
    /// The local writer stopped (a disk error, or the file failed its checks): stop.
    Local,
}

/// Fetches `plan.wanted` from the peers, in order, handing each checked chunk to `sink` (which
/// returns false once the writer has stopped). Returns the bytes fetched.
pub async fn fetch<F, Fut>(peers: &Peers, plan: &Plan<'_>, mut sink: F) -> Result<u64>
where
    F: FnMut(Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = deadline(plan.deadline_unix_ms);
    let mut next = 0usize;
    let mut bytes = 0u64;
    let mut failures = Vec::new();
    for p in plan.peers {
        if next == plan.wanted.len() {
            break;
        }
        match fetch_from(peers, p, plan, until, &mut next, &mut bytes, &mut sink).await {
            Ok(()) => {}
            Err(PeerFailure::Peer(why)) => failures.push(format!("{}: {why}", p.node_id)),
            Err(PeerFailure::Local) => break,
        }
    }
    if next < plan.wanted.len() {
        return Err(Error::Refused(format!(
            "push refused: {RELAY_FAILED}: {} of {} chunks could not be fetched from peers ({}); nothing was kept",
            plan.wanted.len() - next,
            plan.wanted.len(),
            if failures.is_empty() {
                "the package could not be written here".to_string()
            } else {
                failures.join("; ")
            }
        )));
    }
    Ok(bytes)
}

fn deadline(unix_ms: u64) -> Instant {
    let now = crate::audit::now_ms();
    let budget = if unix_ms == 0 {
        DEFAULT_BUDGET
    } else {
        Duration::from_millis(unix_ms.saturating_sub(now))
    };
    Instant::now() + budget
}

/// Fetches what is left of `plan.wanted` (from `*next`) from one peer.
async fn fetch_from<F, Fut>(
    peers: &Peers,
    p: &pb::Peer,
    plan: &Plan<'_>,
    until: Instant,
    next: &mut usize,
    bytes: &mut u64,
    sink: &mut F,
) -> std::result::Result<(), PeerFailure>
where
    F: FnMut(Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let left = until.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(PeerFailure::Peer("the push's deadline passed".into()));
    }
    let mut c = peers
        .client(p)
        .map_err(|e| PeerFailure::Peer(e.to_string()))?;
    let mut req = tonic::Request::new(pb::FetchChunksRequest {
        name: plan.name.to_string(),
        version: plan.version.to_string(),
        sha256: plan.sha256.to_string(),
        indexes: plan.wanted[*next..].to_vec(),
    });
    req.set_timeout(left);
    let stalled = || PeerFailure::Peer(format!("sent nothing for {PEER_STALL:?}"));
    let mut stream = tokio::time::timeout(PEER_STALL, c.fetch_chunks(req))
        .await
        .map_err(|_| stalled())?
        .map_err(|s| PeerFailure::Peer(s.message().to_string()))?
        .into_inner();
    while *next < plan.wanted.len() {
        let msg = match tokio::time::timeout(PEER_STALL, stream.next()).await {
            Err(_) => return Err(stalled()),
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(s))) => return Err(PeerFailure::Peer(s.message().to_string())),
            Ok(None) => return Err(PeerFailure::Peer("the stream ended early".into())),
        };
        let want = plan.wanted[*next];
        check_chunk(plan.list, want, &msg).map_err(PeerFailure::Peer)?;
        *bytes += msg.data.len() as u64;
        if !sink(msg.data).await {
            return Err(PeerFailure::Local);
        }
        *next += 1;
    }
    Ok(())
}

/// A chunk from a peer: the one asked for next, with the size and digest the list gives.
fn check_chunk(
    list: &[(u32, [u8; 32])],
    want: u32,
    msg: &pb::ChunkData,
) -> std::result::Result<(), String> {
    if msg.index != want {
        return Err(format!("sent chunk {} where {want} was due", msg.index));
    }
    let Some((size, digest)) = list.get(want as usize) else {
        return Err(format!("chunk {want} is not in the list"));
    };
    if msg.data.len() != *size as usize {
        return Err(format!(
            "sent {} bytes for chunk {want} of {size}",
            msg.data.len()
        ));
    }
    if sha2::Sha256::digest(&msg.data).as_slice() != digest {
        return Err(format!("sent chunk {want} with the wrong sha256"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list_for(chunks: &[&[u8]]) -> Vec<(u32, [u8; 32])> {
        chunks
            .iter()
            .map(|c| (c.len() as u32, sha2::Sha256::digest(c).into()))
            .collect()
    }

    #[test]
    fn a_chunk_must_be_the_one_due_with_its_size_and_digest() {
        let list = list_for(&[b"first chunk", b"second"]);
        let ok = pb::ChunkData {
            index: 1,
            data: b"second".to_vec(),
        };
        assert!(check_chunk(&list, 1, &ok).is_ok());
        let wrong_index = pb::ChunkData {
            index: 0,
            ..ok.clone()
        };
        assert!(
            check_chunk(&list, 1, &wrong_index)
                .unwrap_err()
                .contains("due")
        );
        let wrong_bytes = pb::ChunkData {
            index: 1,
            data: b"secONd".to_vec(),
        };
        assert!(
            check_chunk(&list, 1, &wrong_bytes)
                .unwrap_err()
                .contains("sha256")
        );
        let short = pb::ChunkData {
            index: 1,
            data: b"sec".to_vec(),
        };
        assert!(check_chunk(&list, 1, &short).unwrap_err().contains("bytes"));
        assert!(
            check_chunk(
                &list,
                2,
                &pb::ChunkData {
                    index: 2,
                    data: vec![]
                }
            )
            .is_err()
        );
    }

    #[test]
    fn peer_lists_are_checked() {
        let p = |id: &str, addr: &str| pb::Peer {
            node_id: id.into(),
            address: addr.into(),
        };
        assert!(checked_peers(&[p("n2", "127.0.0.1:1")], "n1").is_ok());
        assert!(checked_peers(&[p("n1", "127.0.0.1:1")], "n1").is_err());
        assert!(checked_peers(&[p("../x", "127.0.0.1:1")], "n1").is_err());
        assert!(checked_peers(&[p("n2", "")], "n1").is_err());
        let many: Vec<_> = (0..=MAX_PEERS)
            .map(|i| p(&format!("n{}", i + 2), "a:1"))
            .collect();
        assert!(checked_peers(&many, "n1").is_err());
    }
}
