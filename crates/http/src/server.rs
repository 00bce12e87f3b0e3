//! Accepting connections: TLS handshake (bounded), the caller's identity, the access rule, a
//! bound on concurrent connections, and shutdown that ends every stream.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::StatusCode;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::{Caller, Error, Request, Response, Routes, error};

/// A TLS handshake or a request's headers that take longer than this are dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Open connections at once (browsers keep a few each, SSE streams stay open).
const MAX_CONNECTIONS: usize = 256;

/// How the endpoint serves.
#[derive(Clone)]
pub struct HttpConfig {
    /// HTTPS with this configuration (the daemon's certificate); `None`: plain HTTP
    /// (`--insecure`, loopback only: the daemon checks that).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// `--http-public-metrics`: `/metrics` and `/healthz` without a client certificate.
    pub public_metrics: bool,
}

/// May `caller` see `path` at all? Routes that change something check the operator role too.
pub fn allowed(path: &str, caller: &Caller, public_metrics: bool) -> bool {
    caller.may_view() || (public_metrics && matches!(path, "/metrics" | "/healthz"))
}

/// Serves `routes` on `listener` until `shutdown` resolves; then every connection, streams
/// included, is closed.
pub async fn serve(
    listener: TcpListener,
    config: HttpConfig,
    routes: Arc<dyn Routes>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let addr = listener.local_addr().map_err(|source| Error::Accept {
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
        source,
    })?;
    let acceptor = config.tls.clone().map(TlsAcceptor::from);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%addr, error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%addr, %peer, "HTTP connection refused: {MAX_CONNECTIONS} already open");
            continue;
        };
        let routes = routes.clone();
        let acceptor = acceptor.clone();
        let public = config.public_metrics;
        conns.spawn(async move {
            let _permit = permit;
            connection(tcp, peer, acceptor, routes, public).await;
        });
    }
    conns.shutdown().await;
    Ok(())
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: Option<TlsAcceptor>,
    routes: Arc<dyn Routes>,
    public: bool,
) {
    let _ = tcp.set_nodelay(true);
    let Some(acceptor) = acceptor else {
        return http(tcp, Caller::Insecure, routes, public).await;
    };
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "HTTPS handshake failed"),
        Err(_) => return tracing::debug!(%peer, "HTTPS handshake timed out"),
    };
    let caller = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map_or(Caller::Anonymous, |leaf| {
            match orch_tls::identity_from_cert_der(leaf.as_ref()) {
                Ok(id) => Caller::Authenticated(id),
                // Signed by our CA but naming no role: no rights, like no certificate.
                Err(_) => Caller::Anonymous,
            }
        });
    http(tls, caller, routes, public).await;
}

async fn http<S>(io: S, caller: Caller, routes: Arc<dyn Routes>, public: bool)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req: Request| {
        let routes = routes.clone();
        let caller = caller.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(req, caller, &*routes, public).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        .serve_connection(TokioIo::new(io), service);
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}

async fn handle(req: Request, caller: Caller, routes: &dyn Routes, public: bool) -> Response {
    if !allowed(req.uri().path(), &caller, public) {
        return refusal(&caller);
    }
    routes.route(req, caller).await
}

fn refusal(caller: &Caller) -> Response {
    let how = "a client certificate with the viewer role or above is needed: \
               `orchestrator certs issue DIR --role viewer --name NAME --p12` makes one a browser can import";
    match caller {
        Caller::Authenticated(id) => error(
            StatusCode::FORBIDDEN,
            "permission_denied",
            &format!("{} may not read this: {how}", id.party()),
        ),
        _ => error(StatusCode::UNAUTHORIZED, "unauthenticated", how),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use orch_tls::{Identity, Role};

    fn who(role: Role) -> Caller {
        Caller::Authenticated(Identity::new(role, "x1").unwrap())
    }

    #[test]
    fn the_access_rule() {
        for path in ["/", "/api/v1/nodes", "/metrics", "/healthz"] {
            assert!(allowed(path, &Caller::Insecure, false));
            assert!(allowed(path, &who(Role::Viewer), false));
            assert!(allowed(path, &who(Role::Operator), false));
            assert!(!allowed(path, &Caller::Anonymous, false), "{path}");
            assert!(!allowed(path, &who(Role::Agent), false), "{path}");
        }
        assert!(allowed("/metrics", &Caller::Anonymous, true));
        assert!(allowed("/healthz", &Caller::Anonymous, true));
        assert!(!allowed("/api/v1/nodes", &Caller::Anonymous, true));
        assert!(!allowed("/metrics/x", &Caller::Anonymous, true));
        assert!(who(Role::Operator).may_operate());
        assert!(!who(Role::Viewer).may_operate());
        assert!(!who(Role::Coordinator).may_operate());
    }
}
