//! Peer relay (issue #15): once a node holds a package, the leader tells the next ones to fetch
//! the chunks they lack from it instead of sending them itself; agents authenticate each other
//! by their agent certificates and check every chunk against its digest; a relay that cannot
//! be served falls back to a direct push.
//!
//! Build the binaries first: `cargo build --bins`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use orch_tests::cluster::*;
use orch_tests::proto as apb;
use orch_tests::{connect, header_for, push_chunks, push_file, rt};
use tonic::{Request, Response, Status, Streaming};

/// How `node` received `file`, from its agent's log: "relayed", "sent" (a delta push from the
/// coordinator) or "whole".
fn received_how(c: &Cluster, node: &str, file: &str) -> Option<&'static str> {
    let log = c.node(node).agent().log();
    let needle = format!("Received package {file}");
    let line = log.lines().rev().find(|l| l.contains(&needle))?;
    Some(if line.contains("relayed from peers") {
        "relayed"
    } else if line.contains("bytes sent") {
        "sent"
    } else {
        "whole"
    })
}

fn rollout(c: &Cluster, v: &str, pkg: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "rollout",
        v,
        "--package",
        pkg.to_str().unwrap(),
        "--min-healthy-time",
        "0s",
        "--json",
    ];
    args.extend_from_slice(extra);
    c.cli_json(&args)
}

#[test]
fn the_leader_sends_a_package_a_bounded_number_of_times_and_peers_relay_the_rest() {
    // Mutual TLS: agents fetch from each other under their own agent certificates.
    let c = Cluster::start(ClusterOpts::demo(1, 6).mtls());
    let pkg = c.package("4.2.1", false);
    let out = rollout(&c, "4.2.1", &pkg, &[]);
    assert_eq!(out["phase"], "succeeded", "{out:#}");
    let file = "demo-service-4.2.1.zip";
    let mut how = Vec::new();
    for n in ["n1", "n2", "n3", "n4", "n5", "n6"] {
        assert_eq!(
            c.node(n).health().map(|h| h.0).as_deref(),
            Some("4.2.1"),
            "{n}"
        );
        let h = received_how(&c, n, file)
            .unwrap_or_else(|| panic!("{n} did not log receiving {file}:\n{}", c.logs()));
        how.push((n, h));
    }
    let direct = how.iter().filter(|(_, h)| *h != "relayed").count();
    // The coordinator pushes at most 2 at a time, and only while nobody holds the package.
    assert!(direct <= 2, "{how:?}");
    assert!(how.len() - direct >= 4, "{how:?}");
    // The relayed bytes were served by agents: their logs say nothing, their metrics count;
    // what proves authentication is that the fetch succeeded under mTLS at all, and that a
    // client without an agent or coordinator certificate is refused (tests/security.rs).
}

#[test]
fn a_relay_whose_peer_is_gone_falls_back_to_a_direct_push() {
    let mut c = Cluster::start(ClusterOpts::demo(1, 3));
    let pkg = c.package("4.2.1", false);
    // n1 alone first: the leader then knows n1 holds 4.2.1.
    let out = rollout(&c, "4.2.1", &pkg, &["--nodes", "n1"]);
    assert_eq!(out["phase"], "succeeded", "{out:#}");
    // n1's agent goes away: a relay from it cannot be served.
    c.node_mut("n1").kill_agent();
    let out = rollout(&c, "4.2.1", &pkg, &["--nodes", "n2,n3"]);
    assert_eq!(out["phase"], "succeeded", "{out:#}");
    for n in ["n2", "n3"] {
        assert_eq!(
            c.node(n).health().map(|h| h.0).as_deref(),
            Some("4.2.1"),
            "{n}"
        );
        // n2 or n3 may relay from the other once it holds the package; never from n1.
        let log = c.node(n).agent().log();
        assert!(!log.contains("relayed from peers (n1"), "{n}:\n{log}");
    }
    let coord = c.coords[0].log();
    assert!(
        coord.contains("relay failed, pushing directly"),
        "no fallback in the coordinator's log:\n{coord}"
    );
}

// ---------------------------------------------------------------------------------------------
// A hostile peer

/// An agent that answers `FetchChunks` with wrong bytes of the right sizes (and nothing else).
#[derive(Clone, Default)]
struct LyingPeer {
    asked: Arc<AtomicUsize>,
    /// The package's chunk sizes, by index.
    sizes: Arc<Vec<u32>>,
}

type Res<T> = Result<Response<T>, Status>;

fn no<T>() -> Res<T> {
    Err(Status::unimplemented("a lying peer"))
}

#[tonic::async_trait]
impl apb::agent_server::Agent for LyingPeer {
    type FetchChunksStream = tokio_stream::wrappers::ReceiverStream<Result<apb::ChunkData, Status>>;

    async fn fetch_chunks(
        &self,
        req: Request<apb::FetchChunksRequest>,
    ) -> Res<Self::FetchChunksStream> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let indexes = req.into_inner().indexes;
        let sizes = self.sizes.clone();
        tokio::spawn(async move {
            for index in indexes {
                // The right index and size, the wrong bytes.
                let size = sizes.get(index as usize).copied().unwrap_or(1);
                let msg = apb::ChunkData {
                    index,
                    data: vec![0xAB; size as usize],
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }
    async fn node_info(&self, _: Request<apb::NodeInfoRequest>) -> Res<apb::NodeInfoReply> {
        no()
    }
    async fn versions(&self, _: Request<apb::VersionsRequest>) -> Res<apb::VersionsReply> {
        no()
    }
    async fn push_package(&self, _: Request<Streaming<apb::PackageChunk>>) -> Res<apb::PushReply> {
        no()
    }
    async fn missing_chunks(
        &self,
        _: Request<apb::MissingChunksRequest>,
    ) -> Res<apb::MissingChunksReply> {
        no()
    }
    async fn unpack(&self, _: Request<apb::UnpackRequest>) -> Res<apb::StepReply> {
        no()
    }
    async fn install(&self, _: Request<apb::InstallRequest>) -> Res<apb::StepReply> {
        no()
    }
    async fn permanent(&self, _: Request<apb::VersionRequest>) -> Res<apb::StepReply> {
        no()
    }
    async fn downgrade(&self, _: Request<apb::VersionRequest>) -> Res<apb::StepReply> {
        no()
    }
    async fn uninstall(&self, _: Request<apb::VersionRequest>) -> Res<apb::StepReply> {
        no()
    }
    async fn after_gate(&self, _: Request<apb::VersionRequest>) -> Res<apb::StepReply> {
        no()
    }
    async fn health(&self, _: Request<apb::HealthRequest>) -> Res<apb::HealthReply> {
        no()
    }
    async fn release(&self, _: Request<apb::ReleaseRequest>) -> Res<apb::ReleaseReply> {
        no()
    }
    async fn rebind(&self, _: Request<apb::RebindRequest>) -> Res<apb::RebindReply> {
        no()
    }
}

/// A relayed push of `pkg` to `addr` naming `peers`.
async fn relayed_push(
    addr: &str,
    pkg: &Path,
    peers: Vec<apb::Peer>,
) -> Result<apb::PushReply, Status> {
    let data = std::fs::read(pkg).unwrap();
    let (name, version) =
        orch_types::parse_package_file_name(pkg.file_name().unwrap().to_str().unwrap()).unwrap();
    let mut h = header_for(&name, &version.to_string(), &data, None);
    h.chunks = orch_package::chunks::of_file(pkg)
        .unwrap()
        .iter()
        .map(|k| apb::ChunkRef {
            size: k.len,
            sha256: k.sha256.to_vec(),
        })
        .collect();
    h.peers = peers;
    let first = apb::PackageChunk {
        header: Some(h),
        data: Vec::new(),
    };
    push_chunks(&mut connect(addr).await, vec![first]).await
}

#[test]
fn chunks_from_a_lying_peer_are_refused_and_fetched_from_the_next() {
    let c = Cluster::start(ClusterOpts::demo(1, 3));
    let pkg = c.package("4.2.2", false);
    let file = "demo-service-4.2.2.zip";
    let rt = rt();
    let liar = LyingPeer {
        sizes: Arc::new(
            orch_package::chunks::of_file(&pkg)
                .unwrap()
                .iter()
                .map(|k| k.len)
                .collect(),
        ),
        ..Default::default()
    };
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let liar_addr: SocketAddr = listener.local_addr().unwrap();
    let server = rt.spawn(
        tonic::transport::Server::builder()
            .add_service(apb::agent_server::AgentServer::new(liar.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let peer = |id: &str, addr: &str| apb::Peer {
        node_id: id.into(),
        address: addr.into(),
    };
    // n2 holds the package (an operator's own push).
    rt.block_on(async {
        push_file(&mut connect(&c.node("n2").agent().addr).await, &pkg, None).await
    })
    .unwrap();

    // Only the liar: every chunk it sends fails its digest, the push is refused, nothing lands.
    let n3 = c.node("n3").agent();
    let e = rt
        .block_on(relayed_push(
            &n3.addr,
            &pkg,
            vec![peer("n9", &liar_addr.to_string())],
        ))
        .unwrap_err();
    assert!(e.message().contains("relay failed"), "{e:?}");
    assert!(e.message().contains("wrong sha256"), "{e:?}");
    assert!(!n3.root.join("releases").join(file).exists());
    assert_eq!(liar.asked.load(Ordering::SeqCst), 1);

    // The liar first, then n2: the package is rebuilt from n2's chunks and verified whole.
    let n1 = c.node("n1").agent();
    let r = rt
        .block_on(relayed_push(
            &n1.addr,
            &pkg,
            vec![
                peer("n9", &liar_addr.to_string()),
                peer("n2", &c.node("n2").agent().addr),
            ],
        ))
        .unwrap();
    assert!(r.message.contains("relayed from peers"), "{r:?}");
    assert_eq!(liar.asked.load(Ordering::SeqCst), 2);
    let got = std::fs::read(n1.root.join("releases").join(file)).unwrap();
    assert_eq!(got, std::fs::read(&pkg).unwrap());

    // A peer list naming the node itself is refused before anything is admitted.
    let e = rt
        .block_on(relayed_push(&n3.addr, &pkg, vec![peer("n3", &n3.addr)]))
        .unwrap_err();
    assert!(e.message().contains("names this node"), "{e:?}");
    server.abort();
}
