//! The HTTP side of every daemon (`--http-listen`): HTTPS with the daemon's own certificate
//! under mutual TLS, or plain HTTP in `--insecure` mode; who may see what, decided here from
//! the client's certificate (viewer role or above for everything, `/metrics` and `/healthz`
//! to anyone with `--http-public-metrics`); and the response shapes the daemons share: JSON,
//! `{"error": {"kind", "message"}}`, OpenMetrics text and server-sent events.
//!
//! The daemons own their routes ([`Routes`]); this crate owns the connection handling, so
//! both coordinators and agents get the same limits, timeouts and shutdown behaviour.

mod response;
mod server;
pub mod sse;

use std::future::Future;
use std::pin::Pin;

pub use orch_tls::{Identity, Role};
pub use response::{
    Body, Response, classic_text, error, html, json, metrics, not_found, static_asset, text,
};
pub use server::{HttpConfig, serve};

/// A request as the routes see it: its body is never read by this crate.
pub type Request = hyper::Request<hyper::body::Incoming>;

/// The request's `Accept` header, empty when absent or not text: the format `/metrics` answers
/// in depends on it ([`metrics`]).
pub fn accept(req: &Request) -> String {
    req.headers()
        .get(hyper::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// A boxed response future, so that routes can be async without a macro crate.
pub type ResponseFuture = Pin<Box<dyn Future<Output = Response> + Send>>;

/// Who is asking, from the TLS handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// `--insecure`: no TLS, so no identity; everything is allowed (loopback only).
    Insecure,
    /// HTTPS without a client certificate (only let in with `--http-public-metrics`).
    Anonymous,
    /// HTTPS with a client certificate of this role and name.
    Authenticated(Identity),
}

impl Caller {
    /// Viewer role or above: may read everything.
    pub fn may_view(&self) -> bool {
        match self {
            Caller::Insecure => true,
            Caller::Anonymous => false,
            Caller::Authenticated(id) => {
                matches!(id.role, Role::Viewer | Role::Operator | Role::Coordinator)
            }
        }
    }

    /// Operator role: may pause, resume, abort, promote and roll back.
    pub fn may_operate(&self) -> bool {
        match self {
            Caller::Insecure => true,
            Caller::Anonymous => false,
            Caller::Authenticated(id) => id.role == Role::Operator,
        }
    }

    /// How the caller is named in audit trails (`operator-alice`, `insecure`).
    pub fn party(&self) -> String {
        match self {
            Caller::Insecure => "insecure".into(),
            Caller::Anonymous => "anonymous".into(),
            Caller::Authenticated(id) => id.party(),
        }
    }
}

/// A daemon's routes. The server has already checked that the caller may see the path (see
/// [`server::allowed`]); routes that change something check [`Caller::may_operate`].
pub trait Routes: Send + Sync + 'static {
    fn route(&self, req: Request, caller: Caller) -> ResponseFuture;
}

/// Errors that stop the endpoint from serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("HTTP endpoint {addr}: {source}")]
    Accept {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}
