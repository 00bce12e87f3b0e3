//! A minimal HTTP/1.1 client (hyper) for health checks and the load generator.

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONNECTION, HOST, HeaderMap, HeaderValue};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;

use crate::Error;

/// Bodies are small; anything above this is not our service talking.
pub const MAX_BODY: usize = 64 * 1024;

/// A fully read response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: StatusCode,
    /// The server said `Connection: close`: this connection carries no further request.
    pub connection_close: bool,
    pub body: Bytes,
}

/// What `/health` reports, healthy or not.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Health {
    pub version: String,
    pub pid: Option<u32>,
    #[serde(default)]
    pub fault: Option<String>,
}

impl Response {
    /// The `/health` body, if it is JSON with a string `version`.
    pub fn health(&self) -> Option<Health> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// Whether a header map says `Connection: close`.
pub fn says_close(headers: &HeaderMap) -> bool {
    headers.get_all(CONNECTION).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    })
}

/// Opens an HTTP/1.1 connection; the connection's driver runs as its own task and ends when the
/// connection closes.
pub async fn connect(addr: SocketAddr) -> std::io::Result<SendRequest<Empty<Bytes>>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        // Errors here surface on the sender too; nothing to add.
        let _ = conn.await;
    });
    Ok(sender)
}

/// Sends `GET path` on an open connection and reads the whole response.
pub async fn send_get(
    sender: &mut SendRequest<Empty<Bytes>>,
    addr: SocketAddr,
    path: &str,
    close: bool,
) -> Result<Response, Error> {
    let mut req = Request::get(path)
        .body(Empty::<Bytes>::new())
        .map_err(Error::http("building request"))?;
    let host = HeaderValue::from_str(&addr.to_string()).map_err(Error::http("host header"))?;
    req.headers_mut().insert(HOST, host);
    if close {
        req.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    let resp = sender
        .send_request(req)
        .await
        .map_err(Error::http(format!("GET {path}")))?;
    let status = resp.status();
    let connection_close = says_close(resp.headers());
    let body = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(Error::http(format!("GET {path}: reading body")))?
        .to_bytes();
    Ok(Response {
        status,
        connection_close,
        body,
    })
}

/// `GET path` on a fresh connection (closed afterwards), bounded by `timeout` overall.
pub async fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Response, Error> {
    let once = async {
        let mut sender = connect(addr)
            .await
            .map_err(Error::http(format!("connecting to {addr}")))?;
        send_get(&mut sender, addr, path, true).await
    };
    tokio::time::timeout(timeout, once)
        .await
        .map_err(|_| Error::Http {
            what: format!("GET http://{addr}{path}: no response within {timeout:?}"),
            source: None,
        })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_close_detection() {
        let mut h = HeaderMap::new();
        assert!(!says_close(&h));
        h.insert(CONNECTION, HeaderValue::from_static("keep-alive"));
        assert!(!says_close(&h));
        h.insert(CONNECTION, HeaderValue::from_static("Upgrade, Close"));
        assert!(says_close(&h));
    }

    #[test]
    fn health_body_parses_healthy_and_broken() {
        let ok = Response {
            status: StatusCode::OK,
            connection_close: false,
            body: Bytes::from_static(br#"{"version":"1.0.0","pid":7}"#),
        };
        assert_eq!(
            ok.health(),
            Some(Health {
                version: "1.0.0".into(),
                pid: Some(7),
                fault: None
            })
        );
        let not_json = Response {
            body: Bytes::from_static(b"hello"),
            ..ok
        };
        assert_eq!(not_json.health(), None);
    }
}
