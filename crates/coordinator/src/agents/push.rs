//! Staging's push: the package streamed from the content store to an agent, whole or, when the
//! agent already holds most of it in other packages, as the content-defined chunks it lacks
//! (`MissingChunks`, then a delta `PushPackage`). The agent reassembles the file and checks its
//! size, sha256 and signature exactly as for a whole push, so the integrity model is the same.

use std::ops::Range;
use std::path::Path;

use orch_package::chunks::{self, Chunk};
use orch_proto::agent::{self as pb, agent_client::AgentClient};
use tonic::transport::Channel;

use super::Deadline;
use crate::blobs::{BlobStore, CHUNK};

/// Below this, a delta is not worth the round trip.
const DELTA_MIN_SIZE: u64 = 1 << 20;

/// What the agent says when a chunk it was to copy is gone: the whole package goes instead.
const WHOLE_PACKAGE: &str = "push the whole package";

/// Pushes the package; returns the agent's reply and the package bytes sent. The agent may
/// answer before the stream ends (it already holds the package): the reader then stops.
pub(super) async fn push(
    c: &mut AgentClient<Channel>,
    blobs: &BlobStore,
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
    };
    if let Some((list, missing)) = delta_plan(c, &path, p, d).await {
        let ranges: Vec<Range<u64>> = missing
            .iter()
            .filter_map(|&i| list.get(i as usize))
            .map(|k| k.offset..k.offset + u64::from(k.len))
            .collect();
        let sent: u64 = ranges.iter().map(|r| r.end - r.start).sum();
        let delta = pb::PackageHeader {
            chunks: list
                .iter()
                .map(|k| pb::ChunkRef {
                    size: k.len,
                    sha256: k.sha256.to_vec(),
                })
                .collect(),
            sent: missing,
            ..header.clone()
        };
        match stream(c, &path, delta, Some(ranges), d).await {
            Ok(r) => return Ok((r, sent)),
            // A package the agent was to copy from went away meanwhile: send it whole.
            Err(s) if s.message().contains(WHOLE_PACKAGE) => {}
            Err(s) => return Err(s),
        }
    }
    let r = stream(c, &path, header, None, d).await?;
    Ok((r, p.size))
}

/// The package's chunks and the indexes of those the agent lacks, when a delta push is worth
/// it; `None` for a whole push (small package, an agent without `MissingChunks`, a package
/// the agent already has, or one it shares nothing with).
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
        chunks: list
            .iter()
            .map(|k| pb::ChunkRef {
                size: k.len,
                sha256: k.sha256.to_vec(),
            })
            .collect(),
    };
    // Unimplemented (an older agent) or any error: the whole push decides.
    let reply = c.missing_chunks(d.request(req)).await.ok()?.into_inner();
    if reply.already || reply.missing.len() >= list.len() {
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
