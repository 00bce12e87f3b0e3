//! Answering HTTP: `/health` and `/`, with `Connection: close` once draining.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONNECTION, CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::debug;

use super::{ConnectionGuard, State};

pub(super) fn spawn_connection(stream: TcpStream, state: &Arc<State>) {
    let guard = ConnectionGuard::new(state);
    let state = state.clone();
    tokio::spawn(async move {
        let _guard = guard;
        let _ = stream.set_nodelay(true);
        let svc = service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(respond(&req, &state)) }
        });
        // No timer is configured, so hyper never closes an idle keep-alive connection by itself:
        // closing one races with the client's next request. Drain ends them cleanly instead.
        if let Err(e) = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), svc)
            .await
        {
            debug!("connection ended with an error: {e}");
        }
    });
}

fn respond(req: &Request<Incoming>, state: &State) -> Response<Full<Bytes>> {
    let text = "text/plain; charset=utf-8";
    let readable = matches!(*req.method(), Method::GET | Method::HEAD);
    let (status, content_type, body) = match req.uri().path() {
        "/health" if readable => health(state),
        "/" if readable => (
            StatusCode::OK,
            text,
            format!("demo-service {} (pid {})\n", state.version, state.pid),
        ),
        "/" | "/health" => (
            StatusCode::METHOD_NOT_ALLOWED,
            text,
            "method not allowed\n".into(),
        ),
        _ => (StatusCode::NOT_FOUND, text, "not found\n".into()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    if state.draining.load(Ordering::SeqCst) {
        // hyper closes the connection after writing a response that says so; the client knows
        // not to reuse it, so nothing is lost.
        resp.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

fn health(state: &State) -> (StatusCode, &'static str, String) {
    let json = "application/json";
    if state.broken {
        let body = serde_json::json!({
            "status": "unhealthy",
            "version": state.version,
            "pid": state.pid,
            "fault": format!(
                "release {} was built broken (broken = true in its release.toml): its health check fails on purpose",
                state.version
            ),
        });
        (StatusCode::SERVICE_UNAVAILABLE, json, body.to_string())
    } else {
        // Field order matters to readers comparing bytes: {"version":"X.Y.Z","pid":N}.
        let body = format!(
            "{{\"version\":{},\"pid\":{}}}",
            serde_json::Value::from(state.version.as_str()),
            state.pid
        );
        (StatusCode::OK, json, body)
    }
}
