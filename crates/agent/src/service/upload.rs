//! `PushPackage`: the header checked (and, with trusted keys, its signature) and the push
//! admitted under the step lock before a byte is written; then the chunks stream to disk.

use orch_proto::agent as pb;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::{AgentService, Call, MUTATE, joined};
use crate::audit::{self, wire};
use crate::error::Error;
use crate::push::{Header, Upload, Writer};

impl AgentService {
    pub(super) async fn push(
        &self,
        req: Request<Streaming<pb::PackageChunk>>,
    ) -> Result<Response<pb::PushReply>, Status> {
        let (caller, allowed) = self.shared.caller(&req, MUTATE);
        let mut call = Call {
            caller,
            fence: None,
            force: false,
            what: "push".into(),
        };
        self.check(&call, allowed)?;
        let mut stream = req.into_inner();
        let (mut h, first_data) = self.first_chunk(&call, &mut stream).await?;
        call.what = format!("push {}-{}.zip", wire(&h.name), wire(&h.version));
        let deadline_unix_ms = h.fence.as_ref().map_or(0, |f| f.deadline_unix_ms);
        call.fence = h.fence.take();
        call.force = h.force;
        let delta = (!h.chunks.is_empty()).then(|| (h.chunks.clone(), h.sent.clone()));
        let h_size = h.size;
        let peers = std::mem::take(&mut h.peers);
        if !peers.is_empty() {
            self.parsed(&call, relay_header(&h, &peers, &self.shared.node_id))?;
        }
        let mut header = self.parsed(
            &call,
            Header::validate(
                &h.name,
                &h.version,
                &h.sha256,
                h.size,
                h.signature,
                self.shared.max_package_bytes,
            ),
        )?;
        // Before the fence is recorded or a byte is written: a refusal changes nothing.
        self.parsed(&call, header.check_signature(&self.shared.trusted))?;
        let file_name = header.file_name();
        // Admitted under the step lock (fence, binding, hold, deadline) before the first byte
        // is written; the upload itself runs beside other steps (it only adds a file).
        let guard = self.shared.steps.clone().lock_owned().await;
        let (shared, c) = (self.shared.clone(), call.clone());
        tokio::task::spawn_blocking(move || {
            let mut fences = guard;
            shared.admit(&mut fences, &c)
        })
        .await
        .map_err(joined)
        .and_then(|r| r)
        .map_err(|e| self.refused(&call, e))?;
        let releases = self.shared.root.join("releases");
        let path = format!("releases/{file_name}");
        let started = tokio::task::spawn_blocking(move || Upload::start(&releases, header))
            .await
            .map_err(joined)
            .and_then(|r| r);
        let Some(upload) = self.parsed(&call, started)? else {
            // The identical package is already here: answer now, without reading the rest of
            // the stream (dropping it tells the sender to stop).
            self.shared.record(&call, &audit::ok(false));
            return Ok(Response::new(pb::PushReply {
                path,
                already: true,
                message: format!("Package {file_name} is already on this node"),
            }));
        };
        if !peers.is_empty() {
            let (chunks, _) = delta.unwrap_or_default();
            let relayed = Relayed {
                peers: &peers,
                chunks,
                size: h_size,
                file_name: &file_name,
                name: &h.name,
                version: &h.version,
                sha256: &h.sha256,
                deadline_unix_ms,
            };
            return self.relayed(&call, upload, relayed).await;
        }
        let assembly = match delta {
            None => None,
            Some(d) => Some(self.assembly(&call, d, h_size, &file_name).await?),
        };
        let sent_bytes = assembly.as_ref().map(|a| a.sent_bytes());
        let writer = Writer::spawn(upload, assembly);
        let finished = self
            .write_stream(&call, writer, first_data, &mut stream, &file_name)
            .await?;
        self.shared.record(&call, &audit::ok(true));
        let message = received(&file_name, sent_bytes, h_size);
        tracing::info!(node = %self.shared.node_id, file = %finished.display(), "{message}");
        Ok(Response::new(pb::PushReply {
            path,
            already: false,
            message,
        }))
    }

    /// Writes the stream's data (after `first`) through `writer` and finishes the file.
    async fn write_stream(
        &self,
        call: &Call,
        writer: Writer,
        first: Vec<u8>,
        stream: &mut Streaming<pb::PackageChunk>,
        file_name: &str,
    ) -> Result<std::path::PathBuf, Status> {
        let mut writing = writer.write(first).await;
        while writing {
            match stream.next().await {
                None => break,
                Some(Ok(chunk)) => writing = writer.write(chunk.data).await,
                Some(Err(e)) => {
                    writer.abort().await;
                    let s = Status::cancelled(format!(
                        "push of {file_name} interrupted ({e}); package discarded"
                    ));
                    return Err(self.denied(call, s));
                }
            }
        }
        // Also the error that stopped the writer early (more data than announced, a disk error).
        self.parsed(call, writer.finish().await)
    }

    /// The stream's first message: its header, and the data it carries.
    async fn first_chunk(
        &self,
        call: &Call,
        stream: &mut Streaming<pb::PackageChunk>,
    ) -> Result<(pb::PackageHeader, Vec<u8>), Status> {
        let first = match stream.next().await {
            Some(Ok(c)) => c,
            Some(Err(s)) => return Err(self.denied(call, s)),
            None => {
                let e = Error::BadRequest("push refused: empty stream".into());
                return Err(self.refused(call, e));
            }
        };
        let h = self.parsed(
            call,
            first.header.ok_or_else(|| {
                Error::BadRequest("push refused: the first chunk must carry the header".into())
            }),
        )?;
        Ok((h, first.data))
    }

    /// A delta push's assembly: the header's chunk list checked, every chunk not sent found in
    /// the packages here.
    async fn assembly(
        &self,
        call: &Call,
        (chunks, sent): (Vec<pb::ChunkRef>, Vec<u32>),
        size: u64,
        file_name: &str,
    ) -> Result<crate::delta::Assembly, Status> {
        let list = self.parsed(call, crate::delta::checked_list(&chunks, size))?;
        let (releases, name) = (self.shared.root.join("releases"), file_name.to_string());
        let planned = tokio::task::spawn_blocking(move || {
            crate::delta::Assembly::plan(&releases, &name, &list, &sent)
        })
        .await
        .map_err(joined)
        .and_then(|r| r);
        self.parsed(call, planned)
    }
}

/// A relayed push's header: a chunk list to fetch by, nothing sent, good peers.
fn relay_header(h: &pb::PackageHeader, peers: &[pb::Peer], me: &str) -> crate::error::Result<()> {
    if h.chunks.is_empty() || !h.sent.is_empty() {
        return Err(Error::BadRequest(
            "push refused: a relayed push carries the chunk list and sends no chunk itself".into(),
        ));
    }
    crate::relay::checked_peers(peers, me)
}

/// What a relayed push needs once admitted.
struct Relayed<'a> {
    peers: &'a [pb::Peer],
    chunks: Vec<pb::ChunkRef>,
    size: u64,
    file_name: &'a str,
    name: &'a str,
    version: &'a str,
    sha256: &'a str,
    deadline_unix_ms: u64,
}

impl AgentService {
    /// A relayed push, admitted: the chunks not here are fetched from the peers, checked one by
    /// one, and written in order between those copied from the packages here; then the whole
    /// file is checked as for any push. The sender's stream carries nothing more.
    async fn relayed(
        &self,
        call: &Call,
        upload: Upload,
        r: Relayed<'_>,
    ) -> Result<Response<pb::PushReply>, Status> {
        let list = self.parsed(call, crate::delta::checked_list(&r.chunks, r.size))?;
        let (releases, name) = (self.shared.root.join("releases"), r.file_name.to_string());
        let list2 = list.clone();
        let planned = tokio::task::spawn_blocking(move || {
            crate::delta::Assembly::plan_relay(&releases, &name, &list2)
        })
        .await
        .map_err(joined)
        .and_then(|r| r);
        let (assembly, remote) = self.parsed(call, planned)?;
        let writer = Writer::spawn(upload, Some(assembly));
        let plan = crate::relay::Plan {
            peers: r.peers,
            name: r.name,
            version: r.version,
            sha256: r.sha256,
            list: &list,
            wanted: &remote,
            deadline_unix_ms: r.deadline_unix_ms,
        };
        let fetched = crate::relay::fetch(&self.shared.peers, &plan, |d| writer.write(d)).await;
        let fetched = match fetched {
            Ok(n) => n,
            Err(e) => {
                writer.abort().await;
                return Err(self.refused(call, e));
            }
        };
        self.shared.metrics.relayed("fetched", fetched);
        let finished = self.parsed(call, writer.finish().await)?;
        self.shared.record(call, &audit::ok(true));
        let from: Vec<&str> = r.peers.iter().map(|p| p.node_id.as_str()).collect();
        let message = format!(
            "Received package {}: {fetched} of its {} bytes relayed from peers ({}), the rest copied from packages already here",
            r.file_name,
            r.size,
            from.join(", ")
        );
        tracing::info!(node = %self.shared.node_id, file = %finished.display(), "{message}");
        Ok(Response::new(pb::PushReply {
            path: format!("releases/{}", r.file_name),
            already: false,
            message,
        }))
    }
}

/// What a finished push says (a delta push: how much of it was sent).
fn received(file_name: &str, sent: Option<u64>, size: u64) -> String {
    match sent {
        Some(n) => format!(
            "Received package {file_name}: {n} of its {size} bytes sent, the rest copied from packages already here"
        ),
        None => format!("Received package {file_name}"),
    }
}
