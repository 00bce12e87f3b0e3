//! Raft RPCs to the other coordinators over tonic (`RaftPeer` in proto/raft.proto).
//!
//! openraft's request and response types travel as JSON inside `RaftMessage`. There is ONE
//! long-lived tonic `Channel` per peer (per id and address), created lazily on first use and
//! shared by the replication, heartbeat and snapshot clients openraft creates for that peer;
//! HTTP/2 multiplexes them, so a snapshot transfer does not stall heartbeats. The channel
//! reconnects by itself after the peer restarts.
//!
//! Connection failures are returned as `Unreachable` so openraft backs off (with the workspace's
//! retry policy, [`PEER_BACKOFF`]); elapsed per-RPC deadlines as `Timeout`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::BasicNode;
use openraft::error::{
    NetworkError, RPCError, RaftError, ReplicationClosed, StreamingError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RPCTypes, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{OptionalSend, RaftNetworkV2};
use orch_proto::raft::raft_peer_client::RaftPeerClient;
use orch_proto::raft::{RaftMessage, SnapshotChunk};
use orch_retry::Backoff;
use orch_tls::{Role, Security, party_domain};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::Channel;

use super::types::{NodeId, Snapshot, SnapshotData, TypeConfig, Vote};

/// Largest gRPC message either side accepts (AppendEntries batches and snapshot chunks).
pub(crate) const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// Pauses between attempts to reach an unreachable peer: jittered so that the members do not
/// retry in step, capped low so that a restarted peer rejoins quickly (heartbeats are 100 ms
/// apart; openraft's own default is a constant 200 ms).
const PEER_BACKOFF: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(400));
/// Snapshot bytes per `SnapshotChunk`.
const SNAPSHOT_CHUNK_BYTES: usize = 1024 * 1024;

/// A peer's address that cannot be dialed. Shared: the channel cache hands it to every client
/// of that peer.
#[derive(Debug, Clone, thiserror::Error)]
#[error("peer address {addr:?} (expected HOST:PORT)")]
pub struct BadPeerAddress {
    addr: String,
    #[source]
    source: Arc<orch_tls::Error>,
}

/// A peer's channel, or why its address is unusable.
type ChannelOrErr = Result<Channel, BadPeerAddress>;

/// Creates the per-peer clients; owns the channel cache.
#[derive(Clone)]
pub struct Network {
    inner: Arc<NetworkInner>,
}

struct NetworkInner {
    my_id: NodeId,
    security: Security,
    /// Lower bound of an AppendEntries deadline. openraft asks for `heartbeat_interval` (minus a
    /// margin) even for large catch-up batches; the heartbeat path enforces its own hard limit,
    /// so a floor only keeps big batches to a slow follower from timing out over and over.
    append_floor: Duration,
    channels: Mutex<HashMap<NodeId, (String, ChannelOrErr)>>,
}

impl Network {
    pub fn new(my_id: NodeId, security: Security, append_floor: Duration) -> Network {
        Network {
            inner: Arc::new(NetworkInner {
                my_id,
                security,
                append_floor,
                channels: Mutex::new(HashMap::new()),
            }),
        }
    }

    fn channel(&self, target: NodeId, addr: &str) -> ChannelOrErr {
        let mut map = self
            .inner
            .channels
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((a, ch)) = map.get(&target)
            && a == addr
        {
            return ch.clone();
        }
        let ch = make_channel(target, addr, &self.inner.security);
        if let Err(e) = &ch {
            tracing::warn!(peer = target, addr, "{}", orch_types::error_chain(e));
        }
        map.insert(target, (addr.to_string(), ch.clone()));
        ch
    }
}

/// Under mTLS the peer must present the certificate of coordinator `target` itself: the
/// handshake proves this node reached the member it means to replicate to.
fn make_channel(target: NodeId, addr: &str, security: &Security) -> ChannelOrErr {
    let domain = party_domain(Role::Coordinator, &target.to_string());
    let ep = security
        .endpoint(addr, &domain)
        .map_err(|e| BadPeerAddress {
            addr: addr.to_string(),
            source: Arc::new(e),
        })?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(2))
        .keep_alive_timeout(Duration::from_secs(2))
        .keep_alive_while_idle(true);
    Ok(ep.connect_lazy())
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        PeerClient {
            my_id: self.inner.my_id,
            target,
            addr: node.addr.clone(),
            append_floor: self.inner.append_floor,
            channel: self.channel(target, &node.addr),
        }
    }
}

/// Sends Raft RPCs to one peer.
pub struct PeerClient {
    my_id: NodeId,
    target: NodeId,
    addr: String,
    append_floor: Duration,
    channel: ChannelOrErr,
}

impl PeerClient {
    fn client(&self) -> Result<RaftPeerClient<Channel>, Unreachable<TypeConfig>> {
        match &self.channel {
            Ok(ch) => Ok(RaftPeerClient::new(ch.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES)),
            Err(e) => Err(Unreachable::from_string(format!(
                "peer {} at {}: {}; fix its address in the cluster membership",
                self.target,
                self.addr,
                orch_types::error_chain(e)
            ))),
        }
    }

    fn timeout_err(&self, action: RPCTypes, timeout: Duration) -> Timeout<TypeConfig> {
        Timeout {
            action,
            id: self.my_id,
            target: self.target,
            timeout,
        }
    }

    fn status_err(&self, rpc: &str, s: tonic::Status) -> RPCError<TypeConfig> {
        let msg = format!(
            "{rpc} to peer {} at {}: {} ({:?}); is that coordinator running and reachable?",
            self.target,
            self.addr,
            s.message(),
            s.code()
        );
        match s.code() {
            tonic::Code::InvalidArgument | tonic::Code::Internal => {
                RPCError::Network(NetworkError::from_string(msg))
            }
            _ => RPCError::Unreachable(Unreachable::from_string(msg)),
        }
    }

    /// One unary JSON RPC with a deadline.
    async fn unary<Req, Resp, F, Fut>(
        &self,
        action: RPCTypes,
        req: &Req,
        timeout: Duration,
        call: F,
    ) -> Result<Resp, RPCError<TypeConfig>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        F: FnOnce(RaftPeerClient<Channel>, tonic::Request<RaftMessage>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<RaftMessage>, tonic::Status>>,
    {
        let client = self.client()?;
        let json = serde_json::to_vec(req).map_err(|e| {
            RPCError::Network(NetworkError::from_string(format!("encode {action:?}: {e}")))
        })?;
        let mut request = tonic::Request::new(RaftMessage { json });
        request.set_timeout(timeout);
        let resp = match tokio::time::timeout(timeout, call(client, request)).await {
            Err(_) => return Err(RPCError::Timeout(self.timeout_err(action, timeout))),
            Ok(Err(s)) if s.code() == tonic::Code::DeadlineExceeded => {
                return Err(RPCError::Timeout(self.timeout_err(action, timeout)));
            }
            Ok(Err(s)) => return Err(self.status_err(&format!("{action:?}"), s)),
            Ok(Ok(r)) => r.into_inner(),
        };
        let result: Result<Resp, RaftError<TypeConfig>> =
            serde_json::from_slice(&resp.json).map_err(|e| {
                RPCError::Network(NetworkError::from_string(format!(
                    "{action:?} reply from peer {} at {}: undecodable ({e}); do all coordinators run the same version?",
                    self.target, self.addr
                )))
            })?;
        result.map_err(|e| {
            // The peer's Raft is stopped or failed: treat it as down and back off.
            RPCError::Unreachable(Unreachable::from_string(format!(
                "peer {} at {} cannot serve Raft: {e}",
                self.target, self.addr
            )))
        })
    }
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = SnapshotData;

    /// How long openraft waits before retrying a peer it found unreachable: the workspace's
    /// retry policy ([`PEER_BACKOFF`]), with no deadline (a peer is retried until it is back
    /// or removed from the membership).
    fn backoff(&self) -> Option<openraft::network::Backoff> {
        Some(openraft::network::Backoff::new(PEER_BACKOFF.delays()))
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let timeout = option.soft_ttl().max(self.append_floor);
        self.unary(
            RPCTypes::AppendEntries,
            &rpc,
            timeout,
            |mut c, r| async move { c.append_entries(r).await },
        )
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.unary(
            RPCTypes::Vote,
            &rpc,
            option.soft_ttl(),
            |mut c, r| async move { c.vote(r).await },
        )
        .await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let mut client = self.client()?;
        let enc = |what: &str, e: serde_json::Error| {
            StreamingError::Network(NetworkError::from_string(format!(
                "encode snapshot {what}: {e}"
            )))
        };
        let vote_json = serde_json::to_vec(&vote).map_err(|e| enc("vote", e))?;
        let meta_json = serde_json::to_vec(&snapshot.meta).map_err(|e| enc("meta", e))?;
        let chunk = option
            .snapshot_chunk_size()
            .unwrap_or(SNAPSHOT_CHUNK_BYTES)
            .clamp(64 * 1024, SNAPSHOT_CHUNK_BYTES * 4);
        let data = snapshot.snapshot;
        let mut chunks = Vec::with_capacity(data.len() / chunk + 1);
        let mut first = true;
        let mut rest: &[u8] = &data;
        while first || !rest.is_empty() {
            let (head, tail) = rest.split_at(rest.len().min(chunk));
            chunks.push(SnapshotChunk {
                vote_json: if first { vote_json.clone() } else { Vec::new() },
                meta_json: if first { meta_json.clone() } else { Vec::new() },
                data: head.to_vec(),
            });
            first = false;
            rest = tail;
        }
        let timeout = option.soft_ttl();
        tracing::info!(
            peer = self.target,
            bytes = data.len(),
            chunks = chunks.len(),
            "sending snapshot"
        );
        let mut request = tonic::Request::new(futures::stream::iter(chunks));
        request.set_timeout(timeout);
        let send = client.install_snapshot(request);
        let resp = tokio::select! {
            closed = cancel => return Err(StreamingError::Closed(closed)),
            r = tokio::time::timeout(timeout, send) => match r {
                Err(_) => return Err(StreamingError::Timeout(self.timeout_err(RPCTypes::InstallSnapshot, timeout))),
                Ok(Err(s)) if s.code() == tonic::Code::DeadlineExceeded => {
                    return Err(StreamingError::Timeout(self.timeout_err(RPCTypes::InstallSnapshot, timeout)));
                }
                Ok(Err(s)) => {
                    return Err(match self.status_err("InstallSnapshot", s) {
                        RPCError::Network(e) => StreamingError::Network(e),
                        RPCError::Timeout(e) => StreamingError::Timeout(e),
                        RPCError::Unreachable(e) => StreamingError::Unreachable(e),
                        RPCError::RemoteError(e) => StreamingError::Unreachable(Unreachable::from_string(e.to_string())),
                    });
                }
                Ok(Ok(r)) => r.into_inner(),
            },
        };
        let result: Result<SnapshotResponse<TypeConfig>, openraft::error::Fatal<TypeConfig>> =
            serde_json::from_slice(&resp.json).map_err(|e| {
                StreamingError::Network(NetworkError::from_string(format!(
                    "InstallSnapshot reply from peer {} at {}: undecodable ({e})",
                    self.target, self.addr
                )))
            })?;
        result.map_err(|e| {
            StreamingError::Unreachable(Unreachable::from_string(format!(
                "peer {} at {} cannot install the snapshot: {e}",
                self.target, self.addr
            )))
        })
    }
}
