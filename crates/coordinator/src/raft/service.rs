//! The `RaftPeer` gRPC service: what other coordinators call. Decodes openraft's JSON messages
//! and hands them to the local Raft node; replies carry openraft's `Result` as JSON.

use futures::StreamExt;
use orch_proto::raft::raft_peer_server::{RaftPeer, RaftPeerServer};
use orch_proto::raft::{RaftMessage, SnapshotChunk};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::{Request, Response, Status, Streaming};

use super::network::MAX_MESSAGE_BYTES;
use super::types::{Raft, Snapshot, SnapshotMeta, Vote};

/// Largest snapshot this node accepts.
const MAX_SNAPSHOT_BYTES: usize = 1 << 30;

/// Serves `RaftPeer` for one Raft node.
#[derive(Clone)]
pub struct RaftPeerService {
    raft: Raft,
}

impl RaftPeerService {
    pub fn new(raft: Raft) -> RaftPeerService {
        RaftPeerService { raft }
    }

    /// The tonic service, with message limits matching the client side.
    pub fn into_server(self) -> RaftPeerServer<RaftPeerService> {
        RaftPeerServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

fn decode<T: DeserializeOwned>(what: &str, b: &[u8]) -> Result<T, Status> {
    serde_json::from_slice(b).map_err(|e| {
        Status::invalid_argument(format!(
            "cannot decode {what}: {e}; do all coordinators run the same version?"
        ))
    })
}

fn reply<T: Serialize>(v: &T) -> Result<Response<RaftMessage>, Status> {
    let json =
        serde_json::to_vec(v).map_err(|e| Status::internal(format!("cannot encode reply: {e}")))?;
    Ok(Response::new(RaftMessage { json }))
}

#[tonic::async_trait]
impl RaftPeer for RaftPeerService {
    async fn append_entries(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let req = decode("AppendEntries request", &request.into_inner().json)?;
        reply(&self.raft.append_entries(req).await)
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let req = decode("Vote request", &request.into_inner().json)?;
        reply(&self.raft.vote(req).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftMessage>, Status> {
        let mut stream = request.into_inner();
        let first = stream
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))??;
        if first.vote_json.is_empty() || first.meta_json.is_empty() {
            return Err(Status::invalid_argument(
                "the first snapshot chunk must carry the vote and the snapshot meta",
            ));
        }
        let vote: Vote = decode("snapshot vote", &first.vote_json)?;
        let meta: SnapshotMeta = decode("snapshot meta", &first.meta_json)?;
        let mut data = first.data;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            if data.len() + chunk.data.len() > MAX_SNAPSHOT_BYTES {
                return Err(Status::resource_exhausted(format!(
                    "snapshot larger than {MAX_SNAPSHOT_BYTES} bytes"
                )));
            }
            data.extend_from_slice(&chunk.data);
        }
        let snapshot = Snapshot {
            meta,
            snapshot: data,
        };
        reply(&self.raft.install_full_snapshot(vote, snapshot).await)
    }
}
