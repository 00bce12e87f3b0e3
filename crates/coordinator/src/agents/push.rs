//! Staging's push: the package streamed from the content store to an agent, whole or, when the
//! agent already holds most of it in other packages, as the content-defined chunks it lacks
//! (`MissingChunks`, then a delta `PushPackage`). The agent reassembles the file and checks its
//! size, sha256 and signature exactly as for a whole push, so the integrity model is the same.
//!
//! Peer relay: once some node holds the package ([`Seeds`]), the others are told to fetch the
//! chunks they lack from up to [`PEERS_PER_PUSH`] of those nodes instead (the header carries
//! the chunk list and the peers, the stream no data). At most [`MAX_DIRECT`] pushes of one
//! package come from this coordinator at a time, and while one is in flight and nobody holds
//! the package yet the others wait for it, so the leader sends a package's chunks about
//! [`MAX_DIRECT`] times whatever the cluster's size (plus once per node whose relay failed,
//! which falls back to a direct push).

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use orch_package::chunks::{self, Chunk};
use orch_proto::agent::{self as pb, agent_client::AgentClient};
use tonic::transport::Channel;

use super::Deadline;
use crate::blobs::{BlobStore, CHUNK};

/// Below this, a delta is not worth the round trip.
const DELTA_MIN_SIZE: u64 = 1 << 20;

/// What the agent says when a chunk it was to copy is gone: the whole package goes instead.
const WHOLE_PACKAGE: &str = "push the whole package";
/// What the agent says when no peer could give it a chunk: the chunks go directly instead.
const RELAY_FAILED: &str = "relay failed";
/// Direct pushes of one package from this coordinator at a time; the rest are relayed.
pub const MAX_DIRECT: usize = 2;
/// Peers named in one relayed push (tried in order; rotated across pushes to spread the load).
pub const PEERS_PER_PUSH: usize = 3;
/// Packages whose holders are remembered, and holders remembered per package.
const SEEDED_PACKAGES: usize = 8;
const MAX_HOLDERS: usize = 1024;

/// The node a push goes to.
pub(super) struct Target<'a> {
    pub node: &'a str,
    pub address: &'a str,
}

/// Which nodes hold which package (their push succeeded, or they had it), and the direct
/// pushes in flight. In memory: a new leader starts empty and seeds again.
#[derive(Default)]
pub struct Seeds {
    inner: Mutex<SeedMap>,
    changed: tokio::sync::Notify,
}

#[derive(Default)]
struct SeedMap {
    by_package: HashMap<String, Seed>,
    clock: u64,
}

#[derive(Default)]
struct Seed {
    /// (node, address), in the order they came to hold it.
    holders: Vec<(String, String)>,
    direct: usize,
    /// Where the next relayed push starts picking holders.
    next: usize,
    used: u64,
}

/// How a push goes: relayed from these peers, or directly (holding a direct slot).
enum Turn<'a> {
    Relay(Vec<pb::Peer>),
    Direct(DirectSlot<'a>),
}

/// One of [`MAX_DIRECT`] direct pushes of a package; freed on drop.
struct DirectSlot<'a> {
    seeds: &'a Seeds,
    sha256: String,
}

impl Drop for DirectSlot<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.seeds.lock().by_package.get_mut(&self.sha256) {
            s.direct = s.direct.saturating_sub(1);
        }
        self.seeds.changed.notify_waiters();
    }
}

impl Seeds {
    fn lock(&self) -> std::sync::MutexGuard<'_, SeedMap> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `node` holds the package now.
    fn add(&self, sha256: &str, t: &Target<'_>) {
        {
            let mut m = self.lock();
            let s = m.seed(sha256);
            if let Some(h) = s.holders.iter_mut().find(|h| h.0 == t.node) {
                h.1 = t.address.to_string();
            } else if s.holders.len() < MAX_HOLDERS {
                s.holders.push((t.node.to_string(), t.address.to_string()));
            }
        }
        self.changed.notify_waiters();
    }

    /// These peers failed a relay: they may not hold the package any more.
    fn forget(&self, sha256: &str, peers: &[pb::Peer]) {
        if let Some(s) = self.lock().by_package.get_mut(sha256) {
            s.holders
                .retain(|h| !peers.iter().any(|p| p.node_id == h.0));
        }
    }

    /// How `t`'s push of the package goes: relayed when somebody else holds it; else directly
    /// when a direct slot is free; else after waiting (at most `wait`) for one of the two.
    async fn turn(&self, sha256: &str, t: &Target<'_>, wait: Duration) -> Turn<'_> {
        let until = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut m = self.lock();
                let s = m.seed(sha256);
                let peers = s.pick(t.node);
                if !peers.is_empty() {
                    return Turn::Relay(peers);
                }
                if s.direct < MAX_DIRECT || tokio::time::Instant::now() >= until {
                    s.direct += 1;
                    return Turn::Direct(self.slot(sha256));
                }
            }
            let _ = tokio::time::timeout_at(until, notified).await;
        }
    }

    /// A direct slot taken without waiting (after a failed relay).
    fn direct(&self, sha256: &str) -> DirectSlot<'_> {
        self.lock().seed(sha256).direct += 1;
        self.slot(sha256)
    }

    fn slot(&self, sha256: &str) -> DirectSlot<'_> {
        DirectSlot {
            seeds: self,
            sha256: sha256.to_string(),
        }
    }
}

impl SeedMap {
    /// The package's entry (created, evicting the least recently used beyond the bound).
    fn seed(&mut self, sha256: &str) -> &mut Seed {
        self.clock += 1;
        if !self.by_package.contains_key(sha256) && self.by_package.len() >= SEEDED_PACKAGES {
            let idle = self
                .by_package
                .iter()
                .filter(|(_, s)| s.direct == 0)
                .min_by_key(|(_, s)| s.used)
                .map(|(k, _)| k.clone());
            if let Some(k) = idle {
                self.by_package.remove(&k);
            }
        }
        let clock = self.clock;
        let s = self.by_package.entry(sha256.to_string()).or_default();
        s.used = clock;
        s
    }
}

impl Seed {
    /// Up to [`PEERS_PER_PUSH`] holders other than `node`, starting where the last pick ended.
    fn pick(&mut self, node: &str) -> Vec<pb::Peer> {
        let others: Vec<&(String, String)> = self.holders.iter().filter(|h| h.0 != node).collect();
        if others.is_empty() {
            return Vec::new();
        }
        let start = self.next % others.len();
        self.next = self.next.wrapping_add(1);
        others
            .iter()
            .cycle()
            .skip(start)
            .take(PEERS_PER_PUSH.min(others.len()))
            .map(|h| pb::Peer {
                node_id: h.0.clone(),
                address: h.1.clone(),
            })
            .collect()
    }
}

/// Pushes the package to `t`: relayed from nodes that hold it when there are some, else
/// directly. Returns the agent's reply and the package bytes this coordinator sent. The agent
/// may answer before the stream ends (it already holds the package): the reader then stops.
pub(super) async fn push(
    c: &mut AgentClient<Channel>,
    blobs: &BlobStore,
    seeds: Option<&Seeds>,
    t: &Target<'_>,
    p: &orch_types::rollout::PackageRef,
    fence: Option<pb::Fence>,
    d: &Deadline,
) -> Result<(pb::PushReply, u64), tonic::Status> {
    let path = blobs.path(&p.sha256)?;
    // The signature travels with the bytes: agents with trusted keys check it themselves.
    let signature = blobs
        .signature(&p.sha256)
        .map_err(|e| tonic::Status::internal(e.to_string()))?
        .unwrap_or_default();
    let header = pb::PackageHeader {
        name: p.name.clone(),
        version: p.version.to_string(),
        sha256: p.sha256.clone(),
        size: p.size,
        fence,
        signature,
        force: false,
        chunks: Vec::new(),
        sent: Vec::new(),
        peers: Vec::new(),
    };
    let plan = delta_plan(c, &path, p, d).await;
    let Some(seeds) = seeds else {
        return direct(c, &path, header, plan, d).await;
    };
    let _slot = match &plan {
        // Too small to chunk, or the agent has it: one direct call, no slot needed.
        None => None,
        Some((list, _)) => match seeds.turn(&p.sha256, t, d.remaining() / 2).await {
            Turn::Direct(slot) => Some(slot),
            Turn::Relay(peers) => {
                let relayed = pb::PackageHeader {
                    chunks: refs(list),
                    peers: peers.clone(),
                    ..header.clone()
                };
                match stream(c, &path, relayed, Some(Vec::new()), d).await {
                    Ok(r) => {
                        seeds.add(&p.sha256, t);
                        return Ok((r, 0));
                    }
                    // No peer could give a chunk (gone, unreachable), or an agent that predates
                    // relay took it for a delta it cannot build: push directly.
                    Err(s)
                        if s.message().contains(RELAY_FAILED)
                            || s.message().contains(WHOLE_PACKAGE) =>
                    {
                        tracing::warn!(
                            node = t.node,
                            "relay failed, pushing directly: {}",
                            s.message()
                        );
                        seeds.forget(&p.sha256, &peers);
                        Some(seeds.direct(&p.sha256))
                    }
                    Err(s) => return Err(s),
                }
            }
        },
    };
    let r = direct(c, &path, header, plan, d).await?;
    seeds.add(&p.sha256, t);
    Ok(r)
}

/// A direct push: the chunks the agent lacks when that is less than the whole, else the whole
/// file.
async fn direct(
    c: &mut AgentClient<Channel>,
    path: &Path,
    header: pb::PackageHeader,
    plan: Option<(Vec<Chunk>, Vec<u32>)>,
    d: &Deadline,
) -> Result<(pb::PushReply, u64), tonic::Status> {
    let size = header.size;
    if let Some((list, missing)) = plan.filter(|(l, m)| m.len() < l.len()) {
        let ranges: Vec<Range<u64>> = missing
            .iter()
            .filter_map(|&i| list.get(i as usize))
            .map(|k| k.offset..k.offset + u64::from(k.len))
            .collect();
        let sent: u64 = ranges.iter().map(|r| r.end - r.start).sum();
        let delta = pb::PackageHeader {
            chunks: refs(&list),
            sent: missing,
            ..header.clone()
        };
        match stream(c, path, delta, Some(ranges), d).await {
            Ok(r) => return Ok((r, sent)),
            // A package the agent was to copy from went away meanwhile: send it whole.
            Err(s) if s.message().contains(WHOLE_PACKAGE) => {}
            Err(s) => return Err(s),
        }
    }
    let r = stream(c, path, header, None, d).await?;
    Ok((r, size))
}

fn refs(list: &[Chunk]) -> Vec<pb::ChunkRef> {
    list.iter()
        .map(|k| pb::ChunkRef {
            size: k.len,
            sha256: k.sha256.to_vec(),
        })
        .collect()
}

/// The package's chunks and the indexes of those the agent lacks; `None` for a plain whole
/// push (small package, an agent without `MissingChunks`, a package the agent already has).
async fn delta_plan(
    c: &mut AgentClient<Channel>,
    path: &Path,
    p: &orch_types::rollout::PackageRef,
    d: &Deadline,
) -> Option<(Vec<Chunk>, Vec<u32>)> {
    if p.size < DELTA_MIN_SIZE {
        return None;
    }
    let file = path.to_path_buf();
    let list = tokio::task::spawn_blocking(move || chunks::of_file(&file))
        .await
        .ok()?
        .ok()?;
    let req = pb::MissingChunksRequest {
        name: p.name.clone(),
        version: p.version.to_string(),
        sha256: p.sha256.clone(),
        size: p.size,
        chunks: refs(&list),
    };
    // Unimplemented (an older agent) or any error: the whole push decides.
    let reply = c.missing_chunks(d.request(req)).await.ok()?.into_inner();
    if reply.already {
        return None;
    }
    Some((list, reply.missing))
}

/// Streams `header`, then the file (`ranges`: only these byte ranges, in order).
async fn stream(
    c: &mut AgentClient<Channel>,
    path: &Path,
    header: pb::PackageHeader,
    ranges: Option<Vec<Range<u64>>>,
    d: &Deadline,
) -> Result<pb::PushReply, tonic::Status> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut f = tokio::fs::File::open(path)
        .await
        .map_err(|e| tonic::Status::not_found(format!("package bytes missing here: {e}")))?;
    let len = f
        .metadata()
        .await
        .map_err(|e| tonic::Status::internal(format!("stat {}: {e}", path.display())))?
        .len();
    // The whole file: one range.
    let ranges = ranges.unwrap_or_else(|| std::iter::once(0..len).collect());
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let reader = tokio::spawn(async move {
        // The header alone first: with a chunk list it may be large.
        if tx
            .send(pb::PackageChunk {
                header: Some(header),
                data: Vec::new(),
            })
            .await
            .is_err()
        {
            return;
        }
        for r in ranges {
            if f.seek(std::io::SeekFrom::Start(r.start)).await.is_err() {
                return;
            }
            let mut left = r.end - r.start;
            while left > 0 {
                let mut buf = vec![0u8; (CHUNK as u64).min(left) as usize];
                if f.read_exact(&mut buf).await.is_err() {
                    return;
                }
                left -= buf.len() as u64;
                let msg = pb::PackageChunk {
                    header: None,
                    data: buf,
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
        }
    });
    let r = c
        .push_package(d.request(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .await;
    reader.abort();
    Ok(r?.into_inner())
}
