//! The endpoint over real TLS on loopback: who gets in with which certificate, public metrics,
//! and a server-sent event stream that arrives as it is produced and ends on shutdown.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::StatusCode;
use orch_http::{Caller, HttpConfig, Request, ResponseFuture, Routes};
use orch_tls::{InitOptions, TlsFiles};
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

struct Echo;

impl Routes for Echo {
    fn route(&self, req: Request, caller: Caller) -> ResponseFuture {
        let path = req.uri().path().to_string();
        Box::pin(async move {
            match path.as_str() {
                "/metrics" => orch_http::text(StatusCode::OK, "up 1\n"),
                "/events" => {
                    let (tx, rx) = tokio::sync::mpsc::channel(4);
                    tokio::spawn(async move {
                        for i in 0..2 {
                            let data = serde_json::json!({ "i": i });
                            let _ = tx.send(orch_http::sse::Event { name: "tick", data }).await;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    });
                    orch_http::sse::response(futures::stream::unfold(rx, |mut rx| async move {
                        rx.recv().await.map(|e| (e, rx))
                    }))
                }
                _ => orch_http::json(
                    StatusCode::OK,
                    &serde_json::json!({ "who": caller.party() }),
                ),
            }
        })
    }
}

fn pki(dir: &Path) {
    orch_tls::init_with(
        dir,
        &InitOptions {
            coordinators: 1,
            operators: vec!["alice".into()],
            viewers: vec!["grafana".into()],
            agents: vec!["n1".into()],
            ..InitOptions::default()
        },
    )
    .unwrap();
}

async fn start(
    dir: &Path,
    public: bool,
) -> (
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let material = TlsFiles::from_dir(&dir.join("coordinator-1"))
        .load()
        .unwrap();
    let config = HttpConfig {
        tls: Some(material.https_server_config(true).unwrap()),
        public_metrics: public,
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        orch_http::serve(listener, config, Arc::new(Echo), async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    (addr, stop, task)
}

/// A TLS client trusting the test CA, presenting `party`'s certificate if given.
fn connector(dir: &Path, party: Option<&str>) -> TlsConnector {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(dir.join("ca/ca.pem")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match party {
        Some(p) => {
            let chain = CertificateDer::pem_file_iter(dir.join(p).join("cert.pem"))
                .unwrap()
                .map(|c| c.unwrap())
                .collect();
            let key = PrivateKeyDer::from_pem_file(dir.join(p).join("key.pem")).unwrap();
            b.with_client_auth_cert(chain, key).unwrap()
        }
        None => b.with_no_client_auth(),
    };
    TlsConnector::from(Arc::new(config))
}

async fn get(
    addr: SocketAddr,
    tls: &TlsConnector,
    path: &str,
) -> hyper::Response<hyper::body::Incoming> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let stream = tls.connect(name, tcp).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", "localhost")
        .body(Empty::new())
        .unwrap();
    send.send_request(req).await.unwrap()
}

async fn body(r: hyper::Response<hyper::body::Incoming>) -> String {
    String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

#[tokio::test]
async fn roles_decide_who_reads_and_metrics_can_be_public() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    let (addr, stop, task) = start(dir.path(), false).await;
    let viewer = connector(dir.path(), Some("viewer-grafana"));
    let r = get(addr, &viewer, "/api/v1/nodes").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(body(r).await, r#"{"who":"viewer-grafana"}"#);
    let operator = connector(dir.path(), Some("operator-alice"));
    assert_eq!(get(addr, &operator, "/").await.status(), StatusCode::OK);

    let agent = connector(dir.path(), Some("agent-n1"));
    let r = get(addr, &agent, "/api/v1/nodes").await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let anonymous = connector(dir.path(), None);
    for path in ["/metrics", "/healthz", "/api/v1/nodes", "/"] {
        let r = get(addr, &anonymous, path).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path}");
        let text = body(r).await;
        assert!(
            text.contains("\"kind\":\"unauthenticated\"") && text.contains("--role viewer"),
            "{text}"
        );
    }
    stop.send(()).unwrap();
    task.await.unwrap();

    let (addr, stop, task) = start(dir.path(), true).await;
    let r = get(addr, &anonymous, "/metrics").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(body(r).await, "up 1\n");
    assert_eq!(
        get(addr, &anonymous, "/api/v1/nodes").await.status(),
        StatusCode::UNAUTHORIZED
    );
    stop.send(()).unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn events_stream_as_they_come_and_shutdown_ends_open_streams() {
    let dir = tempfile::tempdir().unwrap();
    pki(dir.path());
    let (addr, stop, task) = start(dir.path(), false).await;
    let viewer = connector(dir.path(), Some("viewer-grafana"));
    let r = get(addr, &viewer, "/events").await;
    assert_eq!(
        r.headers()["content-type"],
        "text/event-stream; charset=utf-8"
    );
    assert_eq!(
        body(r).await,
        "event: tick\ndata: {\"i\":0}\n\nevent: tick\ndata: {\"i\":1}\n\n"
    );
    // A stream left open (a browser tab) does not keep the endpoint from stopping.
    let open = get(addr, &viewer, "/events").await;
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("shutdown ends open connections")
        .unwrap();
    drop(open);
}
