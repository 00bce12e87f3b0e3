//! One value a daemon or client carries for all its channels: mutual TLS with this party's
//! material (the default), or the explicitly requested plain-text mode. It builds the endpoints
//! a party dials, the server it serves on (TLS plus the abuse limits every server shares), and
//! the [`AuthMode`] its services check callers with.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::{Endpoint, Server};

use crate::{AuthMode, Error, Identity, Result, Role, TlsFiles, TlsMaterial};

/// Limits every orchestrator gRPC server applies, whatever it serves.
///
/// The request deadline bounds how long a handler may take to produce its response: a unary
/// call, or the whole upload of a client stream (a package push or upload). Server streams
/// (`WatchRollout`, `GetBlob`) are not cut by it: their response starts at once and the stream
/// continues until the watched rollout ends. A client's shorter `grpc-timeout` wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    pub request_deadline: Duration,
    /// HTTP/2 streams (concurrent calls) one connection may open.
    pub max_concurrent_streams: u32,
    /// Requests one connection may have in flight in the handlers at once.
    pub concurrency_per_connection: usize,
    /// Largest header block a client may send.
    pub max_header_list_bytes: u32,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            // Large enough to upload a package at the 4 GiB limit over a modest link, or to run
            // an activation with its default 60 s timeout; small enough that a stuck call ends.
            request_deadline: Duration::from_secs(15 * 60),
            max_concurrent_streams: 64,
            concurrency_per_connection: 32,
            max_header_list_bytes: 16 << 10,
        }
    }
}

/// How a party secures its channels.
#[derive(Clone, Debug)]
pub enum Security {
    /// Mutual TLS with this party's checked certificate, key and CA bundle.
    Mtls(Arc<TlsMaterial>),
    /// Plain text, nobody identified, every role check passes. Only by explicit request.
    Insecure,
}

impl Security {
    /// Resolves the command-line choice: `--insecure`, or the TLS files from `--tls-dir` and/or
    /// `--ca`/`--cert`/`--key` (loaded and checked now). Giving both is refused: a daemon
    /// should not silently ignore the files an operator pointed it at.
    pub fn resolve(
        insecure: bool,
        dir: Option<&Path>,
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<Security> {
        let any_file = dir.is_some() || ca.is_some() || cert.is_some() || key.is_some();
        match (insecure, any_file) {
            (true, true) => Err(Error::Config(
                "--insecure and TLS files (--tls-dir/--ca/--cert/--key) were both given: \
                 choose one"
                    .into(),
            )),
            (true, false) => Ok(Security::Insecure),
            (false, _) => {
                let files = TlsFiles::resolve(dir, ca, cert, key)?;
                Ok(Security::Mtls(Arc::new(files.load()?)))
            }
        }
    }

    /// The mode services check callers with.
    pub fn mode(&self) -> AuthMode {
        match self {
            Security::Mtls(_) => AuthMode::Mtls,
            Security::Insecure => AuthMode::Insecure,
        }
    }

    pub fn is_insecure(&self) -> bool {
        matches!(self, Security::Insecure)
    }

    /// This party's own identity (`None` in insecure mode).
    pub fn identity(&self) -> Option<&Identity> {
        match self {
            Security::Mtls(m) => Some(m.identity()),
            Security::Insecure => None,
        }
    }

    /// Refuses to run as anyone but `role`/`name`: a coordinator started with an agent's
    /// certificate, or an agent whose certificate names another node, is a deployment mistake
    /// that would otherwise surface as puzzling refusals from its peers.
    pub fn expect_identity(&self, role: Role, name: &str) -> Result<()> {
        let Some(id) = self.identity() else {
            return Ok(());
        };
        if id.role == role && id.name == name {
            return Ok(());
        }
        Err(Error::Config(format!(
            "the TLS certificate is for {id}, but this daemon runs as {role} {name}: \
             use the {} folder made by `orchestrator certs` (or issue one with \
             `orchestrator certs issue DIR --role {role} --name {name}`)",
            crate::party_domain(role, name)
        )))
    }

    /// Refuses plain text on an address other machines can reach, unless `allow_remote`.
    pub fn check_listen(&self, listen: SocketAddr, allow_remote: bool) -> Result<()> {
        if self.is_insecure() && !listen.ip().is_loopback() && !allow_remote {
            return Err(Error::Config(format!(
                "--insecure on {listen} would serve plain-text gRPC to the network: listen on \
                 127.0.0.1, use mutual TLS (--tls-dir), or add --insecure-allow-remote if this \
                 network is trusted"
            )));
        }
        Ok(())
    }

    /// An endpoint for dialing `addr` (`HOST:PORT`), expecting the server's certificate to
    /// carry `domain` (see the crate docs for which domain to dial each party with). Under
    /// mTLS the URI is `https` (tonic applies TLS only to those); in insecure mode `http`.
    pub fn endpoint(&self, addr: &str, domain: &str) -> Result<Endpoint> {
        let bad = |e: tonic::transport::Error| {
            Error::Config(format!("invalid address {:?}: {e}", trim(addr)))
        };
        match self {
            Security::Mtls(m) => Endpoint::from_shared(crate::tls_uri(addr)?)
                .map_err(bad)?
                .tls_config(m.client_config(domain))
                .map_err(|e| Error::Config(format!("TLS setup for {:?}: {e}", trim(addr)))),
            Security::Insecure => {
                let uri = if addr.contains("://") {
                    addr.to_string()
                } else {
                    format!("http://{addr}")
                };
                Endpoint::from_shared(uri).map_err(bad)
            }
        }
    }

    /// A server builder with this party's TLS configuration (requiring client certificates)
    /// and `limits` applied.
    pub fn server(&self, limits: &ServerLimits) -> Result<Server> {
        let mut b = Server::builder()
            .timeout(limits.request_deadline)
            .max_concurrent_streams(limits.max_concurrent_streams)
            .concurrency_limit_per_connection(limits.concurrency_per_connection)
            .http2_max_header_list_size(limits.max_header_list_bytes)
            // Dead peers (a partitioned client holding streams) are noticed and dropped.
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)));
        if let Security::Mtls(m) = self {
            b = b
                .tls_config(m.server_config()?)
                .map_err(|e| Error::Config(format!("TLS server setup: {e}")))?;
        }
        Ok(b)
    }
}

/// A connection error with its causes: tonic's top-level message is only "transport error",
/// while the causes say what went wrong (refused, TLS handshake, certificate not trusted).
pub fn connect_error(e: &tonic::transport::Error) -> String {
    error_chain(e)
}

/// One error and its causes on one line (each cause once); one implementation for every crate.
pub use orch_types::error_chain;

/// True when `e` (or any of its causes) is a TLS failure: a handshake refused, a certificate
/// not trusted, expired or of the wrong party. Unlike a refused or timed-out connection, this
/// does not heal by retrying: the caller's or the peer's TLS files must change.
pub fn is_tls_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if c.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        // tokio-rustls reports TLS errors as io::Error(InvalidData) wrapping rustls::Error.
        if let Some(io) = c.downcast_ref::<std::io::Error>()
            && io
                .get_ref()
                .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
        {
            return true;
        }
        cur = c.source();
    }
    false
}

/// Addresses come from users and peers: keep error messages short.
fn trim(addr: &str) -> String {
    addr.chars().take(100).collect()
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;

    #[test]
    fn error_chain_prints_each_cause_once() {
        // A cause returned by source() only, and one its parent already prints.
        let missing = Error::io("/nowhere/ca.pem", io::Error::from_raw_os_error(2));
        let line = error_chain(&missing);
        assert_eq!(line.matches("os error 2").count(), 1, "{line}");
        assert!(line.starts_with("/nowhere/ca.pem: "), "{line}");
        #[derive(Debug, thiserror::Error)]
        #[error("outer: {0}")]
        struct PrintsItsSource(#[source] io::Error);
        let both = PrintsItsSource(io::Error::other("inner"));
        assert_eq!(error_chain(&both), "outer: inner");
    }

    #[test]
    fn insecure_is_loopback_only_unless_allowed() {
        let s = Security::Insecure;
        assert!(
            s.check_listen("127.0.0.1:1".parse().unwrap(), false)
                .is_ok()
        );
        assert!(s.check_listen("[::1]:1".parse().unwrap(), false).is_ok());
        let e = s
            .check_listen("0.0.0.0:7000".parse().unwrap(), false)
            .unwrap_err();
        assert!(e.to_string().contains("--insecure-allow-remote"), "{e}");
        assert!(s.check_listen("10.0.0.1:1".parse().unwrap(), true).is_ok());
    }

    #[test]
    fn resolve_refuses_ambiguity_and_missing_files() {
        let e = Security::resolve(true, Some(Path::new("/x")), None, None, None).unwrap_err();
        assert!(e.to_string().contains("choose one"), "{e}");
        let e = Security::resolve(false, None, None, None, None).unwrap_err();
        assert!(e.to_string().contains("--tls-dir"), "{e}");
        assert!(
            Security::resolve(true, None, None, None, None)
                .unwrap()
                .is_insecure()
        );
    }

    #[test]
    fn insecure_endpoints_are_http() {
        let ep = Security::Insecure.endpoint("127.0.0.1:5", "x").unwrap();
        assert_eq!(ep.uri().scheme_str(), Some("http"));
        assert!(Security::Insecure.endpoint("bad addr\n", "x").is_err());
    }
}

/// The accepted-connection stream every server here serves on: TCP_NODELAY set, because an
/// HTTP/2 answer written in several segments otherwise waits for the peer's delayed ACK (40 ms
/// on Linux) whenever an earlier segment is unacknowledged (seen as 40 ms first calls to agents
/// and a 40 ms p99 on Raft writes between coordinators).
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

#[cfg(test)]
mod incoming_tests {
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn accepted_connections_have_nodelay() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut inc = super::incoming(listener);
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let accepted = inc.next().await.unwrap().unwrap();
        assert!(
            accepted.nodelay().unwrap(),
            "accepted socket without TCP_NODELAY"
        );
        drop(client);
    }
}
