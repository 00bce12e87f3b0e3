//! A minimal HTTPS client for tests of the daemons' HTTP endpoints (mutual TLS with a party
//! folder's certificate, or none), and a plain HTTP GET for local servers such as Prometheus.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// `(status, body)` of `METHOD https://ADDR/PATH`, trusting `ca`, presenting `party`'s
/// certificate (a folder holding cert.pem and key.pem) when given.
pub fn https(
    method: &str,
    addr: &str,
    path: &str,
    ca: &Path,
    party: Option<&Path>,
) -> (u16, String) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots
            .add(c.expect("CA certificate"))
            .expect("CA certificate");
    }
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots);
    let config = match party {
        Some(p) => {
            let chain = CertificateDer::pem_file_iter(p.join("cert.pem"))
                .expect("cert.pem")
                .map(|c| c.expect("certificate"))
                .collect();
            let key = PrivateKeyDer::from_pem_file(p.join("key.pem")).expect("key.pem");
            b.with_client_auth_cert(chain, key)
                .expect("client certificate")
        }
        None => b.with_no_client_auth(),
    };
    let name = ServerName::try_from("127.0.0.1").expect("server name");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("TLS client");
    let mut tcp = TcpStream::connect(addr).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    tls.write_all(req.as_bytes()).expect("send");
    let mut raw = Vec::new();
    // A server that closes without close_notify still gave us the whole answer.
    let _ = tls.read_to_end(&mut raw);
    parse(&raw)
}

/// `(status, body)` of `GET http://ADDR/PATH_AND_QUERY` (HTTP/1.0, so no chunking); status 0
/// when nothing listens there (yet).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let Ok(mut tcp) = TcpStream::connect(addr) else {
        return (0, String::new());
    };
    tcp.set_read_timeout(Some(Duration::from_secs(30))).ok();
    write!(tcp, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("send");
    let mut raw = Vec::new();
    let _ = tcp.read_to_end(&mut raw);
    parse(&raw)
}

/// `(status, body)` of `METHOD http://ADDR/PATH` with a JSON `body` (HTTP/1.1, one request per
/// connection); status 0 when nothing listens there.
pub fn http_json(method: &str, addr: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let Ok(mut tcp) = TcpStream::connect(addr) else {
        return (0, String::new());
    };
    tcp.set_read_timeout(Some(Duration::from_secs(60))).ok();
    let body = body.unwrap_or("");
    write!(
        tcp,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    // Some servers (chromedriver) keep the connection open whatever the request says: read
    // the headers, then exactly Content-Length bytes.
    let mut raw = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
        if let Some(end) = head_end {
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            let length = head.lines().find_map(|l| {
                l.strip_prefix("content-length:")
                    .and_then(|v| v.trim().parse::<usize>().ok())
            });
            if length.is_some_and(|n| raw.len() >= end + n) {
                break;
            }
            if length.is_none() {
                let _ = tcp.read_to_end(&mut raw);
                break;
            }
        }
        match tcp.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
    parse(&raw)
}

fn parse(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    (
        status,
        if chunked {
            dechunk(body)
        } else {
            body.to_string()
        },
    )
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Percent-encodes a query parameter.
pub fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
