//! Response shapes shared by every daemon's routes.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::StatusCode;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};

/// Every response body: a whole buffer or a stream (server-sent events).
pub type Body = UnsyncBoxBody<Bytes, Infallible>;
pub type Response = hyper::Response<Body>;

pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

fn with_type(status: StatusCode, content_type: &'static str, body: Body) -> Response {
    let mut r = hyper::Response::new(body);
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// A JSON document.
pub fn json(status: StatusCode, value: &impl serde::Serialize) -> Response {
    match serde_json::to_vec(value) {
        Ok(v) => with_type(status, "application/json", full(v)),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            &format!("could not encode the answer: {e}"),
        ),
    }
}

/// `{"error": {"kind": KIND, "message": MESSAGE}}`, the same shape as the CLI's `--json` errors.
pub fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    let v = serde_json::json!({"error": {"kind": kind, "message": message}});
    with_type(status, "application/json", full(v.to_string()))
}

pub fn not_found(path: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        &format!("no such endpoint: {path} (see docs/api.md)"),
    )
}

pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response {
    with_type(status, "text/plain; charset=utf-8", full(body))
}

pub fn html(body: &'static str) -> Response {
    static_asset(body.as_bytes(), "text/html; charset=utf-8")
}

/// An asset compiled into the binary.
pub fn static_asset(body: &'static [u8], content_type: &'static str) -> Response {
    with_type(StatusCode::OK, content_type, full(Bytes::from_static(body)))
}

/// A Prometheus registry in the OpenMetrics text format.
pub fn metrics(registry: &prometheus_client::registry::Registry) -> Response {
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, registry) {
        Ok(()) => with_type(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            full(out),
        ),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            &format!("could not encode the metrics: {e}"),
        ),
    }
}
