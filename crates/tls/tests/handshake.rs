//! Real mTLS handshakes on 127.0.0.1: a tonic server built with `server_config`, serving the
//! Raft peer service from `orch-proto`, and clients holding various certificates.
//!
//! The test service: `AppendEntries` is coordinator-only (checked in the handler with
//! `require`, or by an `authorize` interceptor that wraps the whole service) and answers with the
//! caller's identity; `Vote` is "register as the node named in the request" (`require_name`).

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use orch_proto::raft::raft_peer_client::RaftPeerClient;
use orch_proto::raft::raft_peer_server::{RaftPeer, RaftPeerServer};
use orch_proto::raft::{RaftMessage, SnapshotChunk};
use orch_tls::{
    COORDINATOR_DOMAIN, IssueOptions, Role, TlsFiles, Validity, authenticated, authorize, init,
    issue_with, party_domain,
};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server};
use tonic::{Code, Request, Response, Status, Streaming};

struct Svc {
    intercepted: bool,
}

#[tonic::async_trait]
impl RaftPeer for Svc {
    async fn append_entries(
        &self,
        req: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let id = if self.intercepted {
            authenticated(&req)
                .cloned()
                .ok_or_else(|| Status::internal("the interceptor stored no identity"))?
        } else {
            orch_tls::require(&req, &[Role::Coordinator])?
        };
        Ok(Response::new(RaftMessage {
            json: id.to_string().into_bytes(),
        }))
    }

    async fn vote(&self, req: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let node = String::from_utf8_lossy(&req.get_ref().json).into_owned();
        let id = orch_tls::require_name(&req, Role::Agent, &node)?;
        Ok(Response::new(RaftMessage {
            json: id.to_string().into_bytes(),
        }))
    }

    async fn install_snapshot(
        &self,
        _req: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftMessage>, Status> {
        Err(Status::unimplemented("test service"))
    }
}

/// Serves with the server side of `files`; `interceptor` wraps the service in
/// `authorize(roles)` instead of checking in the handler.
async fn serve(files: &TlsFiles, interceptor: Option<&'static [Role]>) -> SocketAddr {
    let tls = orch_tls::server_config(files).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut builder = Server::builder().tls_config(tls).unwrap();
    let router = match interceptor {
        None => builder.add_service(RaftPeerServer::new(Svc { intercepted: false })),
        Some(roles) => builder.add_service(RaftPeerServer::with_interceptor(
            Svc { intercepted: true },
            authorize(roles),
        )),
    };
    tokio::spawn(router.serve_with_incoming(TcpListenerStream::new(listener)));
    addr
}

async fn client(
    addr: SocketAddr,
    tls: ClientTlsConfig,
) -> Result<RaftPeerClient<tonic::transport::Channel>, Status> {
    let ch = Endpoint::from_shared(orch_tls::tls_uri(&addr.to_string()).unwrap())
        .unwrap()
        .tls_config(tls)
        .map_err(|e| Status::internal(format!("client config: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| Status::unavailable(format!("connect: {e:?}")))?;
    Ok(RaftPeerClient::new(ch))
}

async fn append(addr: SocketAddr, tls: ClientTlsConfig) -> Result<String, Status> {
    let reply = client(addr, tls)
        .await?
        .append_entries(RaftMessage::default())
        .await?;
    Ok(String::from_utf8(reply.into_inner().json).unwrap())
}

async fn register(addr: SocketAddr, tls: ClientTlsConfig, node: &str) -> Result<String, Status> {
    let reply = client(addr, tls)
        .await?
        .vote(RaftMessage {
            json: node.as_bytes().to_vec(),
        })
        .await?;
    Ok(String::from_utf8(reply.into_inner().json).unwrap())
}

/// The client configuration of a party folder, through the crate's loader.
fn party(dir: &Path, folder: &str, domain: &str) -> ClientTlsConfig {
    orch_tls::client_config(&TlsFiles::from_dir(&dir.join(folder)), domain).unwrap()
}

/// A client configuration built by hand (bypassing the loader's checks), to present what a
/// hostile or broken client would.
fn raw(ca: &Path, cert_key: Option<&Path>, domain: &str) -> ClientTlsConfig {
    let mut c = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(fs::read(ca).unwrap()))
        .domain_name(domain);
    if let Some(folder) = cert_key {
        c = c.identity(Identity::from_pem(
            fs::read(folder.join("cert.pem")).unwrap(),
            fs::read(folder.join("key.pem")).unwrap(),
        ));
    }
    c
}

/// A handshake-level refusal: never an answer, and not a role refusal.
#[track_caller]
fn assert_refused(r: Result<String, Status>) {
    match r {
        Ok(v) => panic!("expected the connection to be refused, got an answer: {v}"),
        Err(s) => {
            eprintln!("REFUSED: {:?} {}", s.code(), s.message());
            assert!(
                s.code() != Code::PermissionDenied && s.code() != Code::Ok,
                "expected a TLS refusal, got {s:?}"
            )
        }
    }
}

struct Cluster {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

fn cluster() -> Cluster {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs");
    init(
        &dir,
        2,
        &["n1".to_string(), "n2".to_string()],
        &["alice".to_string()],
    )
    .unwrap();
    orch_tls::issue(&dir, Role::Viewer, "grafana", &[]).unwrap();
    Cluster { _tmp: tmp, dir }
}

#[tokio::test]
async fn the_right_role_passes() {
    let c = cluster();
    let addr = serve(&TlsFiles::from_dir(&c.dir.join("coordinator-1")), None).await;
    let who = append(addr, party(&c.dir, "coordinator-2", "localhost"))
        .await
        .unwrap();
    assert_eq!(who, "coordinator 2");
}

#[tokio::test]
async fn no_client_certificate_is_refused() {
    let c = cluster();
    let addr = serve(&TlsFiles::from_dir(&c.dir.join("coordinator-1")), None).await;
    assert_refused(append(addr, raw(&c.dir.join("ca/ca.pem"), None, "localhost")).await);
    append(addr, party(&c.dir, "coordinator-2", "localhost"))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let c = cluster();
    let other = cluster();
    let addr = serve(&TlsFiles::from_dir(&c.dir.join("coordinator-1")), None).await;
    // The client trusts the server's CA but presents a coordinator certificate of another CA.
    let r = append(
        addr,
        raw(
            &c.dir.join("ca/ca.pem"),
            Some(&other.dir.join("coordinator-2")),
            "localhost",
        ),
    )
    .await;
    assert_refused(r);
    // And a client of the other CA does not trust this server either.
    assert_refused(append(addr, party(&other.dir, "coordinator-2", "localhost")).await);
    append(addr, party(&c.dir, "coordinator-2", "localhost"))
        .await
        .unwrap();
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let c = cluster();
    let now = SystemTime::now();
    let expired = issue_with(
        &c.dir,
        Role::Coordinator,
        "3",
        &IssueOptions {
            validity: Validity::between(
                now - Duration::from_secs(30 * 86400),
                now - Duration::from_secs(86400),
            ),
            ..IssueOptions::default()
        },
    )
    .unwrap();
    let addr = serve(&TlsFiles::from_dir(&c.dir.join("coordinator-1")), None).await;
    assert_refused(
        append(
            addr,
            raw(&c.dir.join("ca/ca.pem"), Some(&expired), "localhost"),
        )
        .await,
    );
    append(addr, party(&c.dir, "coordinator-2", "localhost"))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_wrong_role_is_permission_denied_naming_the_required_role() {
    let c = cluster();
    let addr = serve(&TlsFiles::from_dir(&c.dir.join("coordinator-1")), None).await;
    for (folder, caller) in [
        ("operator-alice", "operator alice"),
        ("agent-n1", "agent n1"),
        ("viewer-grafana", "viewer grafana"),
    ] {
        let s = append(addr, party(&c.dir, folder, COORDINATOR_DOMAIN))
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::PermissionDenied, "{folder}: {s:?}");
        assert_eq!(
            s.message(),
            format!("permission denied: requires role coordinator; the caller is {caller}")
        );
        assert!(!s.message().contains(c.dir.to_str().unwrap()));
    }
}

#[tokio::test]
async fn the_interceptor_admits_listed_roles_and_records_the_identity() {
    let c = cluster();
    let addr = serve(
        &TlsFiles::from_dir(&c.dir.join("coordinator-1")),
        Some(&[Role::Operator, Role::Viewer]),
    )
    .await;
    for (folder, who) in [
        ("operator-alice", "operator alice"),
        ("viewer-grafana", "viewer grafana"),
    ] {
        let got = append(addr, party(&c.dir, folder, COORDINATOR_DOMAIN))
            .await
            .unwrap();
        assert_eq!(got, who);
    }
    for folder in ["coordinator-2", "agent-n1"] {
        let s = append(addr, party(&c.dir, folder, COORDINATOR_DOMAIN))
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::PermissionDenied, "{folder}");
        assert!(
            s.message().contains("requires role operator or viewer"),
            "{}",
            s.message()
        );
    }
    assert_refused(append(addr, raw(&c.dir.join("ca/ca.pem"), None, "localhost")).await);
}

#[tokio::test]
async fn an_agent_may_only_act_as_the_node_its_certificate_names() {
    let c = cluster();
    let addr = serve(&TlsFiles::from_dir(&c.dir.join("coordinator-1")), None).await;
    let n2 = || party(&c.dir, "agent-n2", COORDINATOR_DOMAIN);
    assert_eq!(register(addr, n2(), "n2").await.unwrap(), "agent n2");
    let s = register(addr, n2(), "n1").await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    assert!(s.message().contains("agent n2"), "{}", s.message());
    let s = register(
        addr,
        party(&c.dir, "operator-alice", COORDINATOR_DOMAIN),
        "n1",
    )
    .await
    .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    assert!(
        s.message().contains("requires role agent"),
        "{}",
        s.message()
    );
}

#[tokio::test]
async fn clients_verify_which_party_they_reached() {
    let c = cluster();
    let coord = serve(&TlsFiles::from_dir(&c.dir.join("coordinator-1")), None).await;
    let agent = serve(&TlsFiles::from_dir(&c.dir.join("agent-n1")), None).await;
    let me = "coordinator-2";
    // Any coordinator, a specific one, or localhost.
    for domain in [
        COORDINATOR_DOMAIN.to_string(),
        party_domain(Role::Coordinator, "1"),
        "localhost".to_string(),
    ] {
        append(coord, party(&c.dir, me, &domain)).await.unwrap();
    }
    assert_refused(append(coord, party(&c.dir, me, "coordinator-2")).await);
    assert_refused(append(coord, party(&c.dir, me, "agent-n1")).await);
    // The agent's server answers to its own name, never to the coordinators' shared one.
    append(agent, party(&c.dir, me, &party_domain(Role::Agent, "n1")))
        .await
        .unwrap();
    assert_refused(append(agent, party(&c.dir, me, "agent-n2")).await);
    assert_refused(append(agent, party(&c.dir, me, COORDINATOR_DOMAIN)).await);
}

#[tokio::test]
async fn a_ca_bundle_trusts_both_cas_during_rotation() {
    let old = cluster();
    let new = cluster();
    let tmp = tempfile::tempdir().unwrap();
    let mut bundle = fs::read(old.dir.join("ca/ca.pem")).unwrap();
    bundle.extend(fs::read(new.dir.join("ca/ca.pem")).unwrap());
    let bundle_path = tmp.path().join("bundle.pem");
    fs::write(&bundle_path, &bundle).unwrap();

    // The server still presents its old certificate but trusts both CAs.
    let server = TlsFiles {
        ca: bundle_path.clone(),
        ..TlsFiles::from_dir(&old.dir.join("coordinator-1"))
    };
    let addr = serve(&server, None).await;
    // A peer already switched to its new certificate, trusting both.
    let switched = TlsFiles {
        ca: bundle_path.clone(),
        ..TlsFiles::from_dir(&new.dir.join("coordinator-2"))
    };
    let tls = orch_tls::client_config(&switched, "localhost").unwrap();
    assert_eq!(append(addr, tls).await.unwrap(), "coordinator 2");
    // A peer not yet switched.
    let tls = party(&old.dir, "coordinator-2", "localhost");
    assert_eq!(append(addr, tls).await.unwrap(), "coordinator 2");
}

/// The handshake refusals above surface on the client only as a transport error; this checks the
/// reason with the verifier tonic's server uses (rustls' WebPKI client verifier over `ca.pem`).
#[test]
fn the_server_side_verifier_refuses_for_the_right_reason() {
    use rustls::pki_types::{CertificateDer, UnixTime, pem::PemObject};
    use rustls::server::WebPkiClientVerifier;
    use rustls::{CertificateError, Error as TlsError, RootCertStore};
    use std::sync::Arc;

    let c = cluster();
    let other = cluster();
    let now = SystemTime::now();
    let expired = issue_with(
        &c.dir,
        Role::Agent,
        "old",
        &IssueOptions {
            validity: Validity::between(
                now - Duration::from_secs(30 * 86400),
                now - Duration::from_secs(86400),
            ),
            ..IssueOptions::default()
        },
    )
    .unwrap();
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(c.dir.join("ca/ca.pem")).unwrap() {
        roots.add(ca.unwrap()).unwrap();
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    assert!(verifier.client_auth_mandatory());
    let verify = |folder: &Path| {
        let leaf = CertificateDer::from_pem_file(folder.join("cert.pem")).unwrap();
        verifier
            .verify_client_cert(&leaf, &[], UnixTime::now())
            .map(|_| ())
    };
    for ok in [
        "coordinator-1",
        "agent-n1",
        "operator-alice",
        "viewer-grafana",
    ] {
        verify(&c.dir.join(ok)).unwrap();
    }
    match verify(&expired) {
        Err(TlsError::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        )) => {}
        other => panic!("expected Expired, got {other:?}"),
    }
    match verify(&other.dir.join("coordinator-1")) {
        Err(TlsError::InvalidCertificate(CertificateError::UnknownIssuer)) => {}
        other => panic!("expected UnknownIssuer, got {other:?}"),
    }
}
