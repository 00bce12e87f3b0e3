//! The agent's HTTP endpoint (`--http-listen`): `/metrics` and `/healthz`. HTTPS with the
//! agent's own certificate under mutual TLS; who may read is decided by `orch-http` (viewer
//! role or above, or anyone for these two paths with `--http-public-metrics`).

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::{Method, StatusCode};
use orch_http::{Caller, Request, ResponseFuture, Routes};
use orch_tls::Security;
use serde_json::json;
use tokio::net::TcpListener;

use crate::error::{Error, Result};
use crate::service::Shared;

struct AgentRoutes {
    shared: Arc<Shared>,
}

impl Routes for AgentRoutes {
    fn route(&self, req: Request, _caller: Caller) -> ResponseFuture {
        let shared = self.shared.clone();
        let accept = orch_http::accept(&req);
        let (method, path) = (req.method().clone(), req.uri().path().to_string());
        Box::pin(async move {
            match (&method, path.as_str()) {
                (&Method::GET, "/metrics") => {
                    let driver = shared.driver.clone();
                    // Read at scrape time; a store that cannot be read leaves the info out.
                    match tokio::task::spawn_blocking(move || driver.versions()).await {
                        Ok(Ok(v)) => shared.metrics.set_releases(&v),
                        _ => shared.metrics.set_releases(&[]),
                    }
                    orch_http::metrics(shared.metrics.registry(), &accept)
                }
                (&Method::GET, "/healthz") => orch_http::json(
                    StatusCode::OK,
                    &json!({"status": "ok", "node": shared.node_id}),
                ),
                (_, "/metrics" | "/healthz") => orch_http::error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    &format!("{method} {path} is not served: only GET (see docs/api.md)"),
                ),
                _ => orch_http::not_found(&path),
            }
        })
    }
}

/// Binds `addr` and serves `/metrics` and `/healthz` until the returned task is aborted.
pub(crate) async fn start(
    addr: SocketAddr,
    security: &Security,
    allow_remote: bool,
    public_metrics: bool,
    shared: Arc<Shared>,
) -> Result<tokio::task::JoinHandle<()>> {
    let refused = |e: orch_tls::Error| Error::Refused(format!("--http-listen {addr}: {e}"));
    security.check_listen(addr, allow_remote).map_err(refused)?;
    let tls = match security {
        // A client without a certificate gets through the handshake and then a 401 that says
        // how to get one, rather than a bare TLS alert.
        Security::Mtls(material) => Some(material.https_server_config(true).map_err(refused)?),
        Security::Insecure => None,
    };
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Refused(format!("cannot listen on --http-listen {addr}: {e}")))?;
    let local = listener.local_addr().unwrap_or(addr);
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(url = %format!("{scheme}://{local}/metrics"), "agent metrics listening");
    let cfg = orch_http::HttpConfig {
        tls,
        public_metrics,
    };
    let routes = Arc::new(AgentRoutes { shared });
    Ok(tokio::spawn(async move {
        if let Err(e) = orch_http::serve(listener, cfg, routes, std::future::pending::<()>()).await
        {
            tracing::error!(error = %e, "the agent's HTTP endpoint stopped");
        }
    }))
}
