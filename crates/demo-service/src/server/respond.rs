//! Answering HTTP: `/health`, `/` and `/metrics`, with `Connection: close` once draining.

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
    let path = req.uri().path();
    let (status, content_type, body) = match path {
        "/health" if readable => health(state),
        "/" if readable => root(state),
        "/metrics" if readable => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics(state),
        ),
        "/" | "/health" | "/metrics" => (
            StatusCode::METHOD_NOT_ALLOWED,
            text,
            "method not allowed\n".into(),
        ),
        _ => (StatusCode::NOT_FOUND, text, "not found\n".into()),
    };
    // The scrapes themselves would only dilute what the metrics say about the service.
    if path != "/metrics" {
        let mut counts = state.responses.lock().unwrap_or_else(|p| p.into_inner());
        *counts.entry(status.as_u16()).or_default() += 1;
    }
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

/// `/`: a line naming the version and pid, or, for the requests an `error_percent` release
/// fails on purpose, a 500.
fn root(state: &State) -> (StatusCode, &'static str, String) {
    let text = "text/plain; charset=utf-8";
    let n = state.root_requests.fetch_add(1, Ordering::Relaxed) + 1;
    if fails(n, state.error_percent) {
        let body = format!(
            "demo-service {} (pid {}): injected error (error_percent = {} in its release.toml)\n",
            state.version, state.pid, state.error_percent
        );
        return (StatusCode::INTERNAL_SERVER_ERROR, text, body);
    }
    (
        StatusCode::OK,
        text,
        format!("demo-service {} (pid {})\n", state.version, state.pid),
    )
}

/// Whether request number `n` (from 1) is one of the `percent` in 100 that fail: the n-th
/// request fails when it completes another whole failure's share (every 10th for 10%).
fn fails(n: u64, percent: u32) -> bool {
    let p = u64::from(percent.min(100));
    n * p / 100 > (n - 1) * p / 100
}

/// `/metrics` in Prometheus' text format: responses by status code, labelled with the version
/// (so a query can look at one release). Each process counts its own, from 0: `rate()` and
/// `increase()` take a restart (a handover) in their stride.
fn metrics(state: &State) -> String {
    let counts = state
        .responses
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut out = String::from(
        "# HELP http_requests_total HTTP requests answered, by status code.\n\
         # TYPE http_requests_total counter\n",
    );
    for (code, n) in counts {
        out.push_str(&format!(
            "http_requests_total{{code=\"{code}\",version=\"{}\"}} {n}\n",
            state.version
        ));
    }
    out
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

#[cfg(test)]
mod tests {
    use super::fails;

    #[test]
    fn an_error_percentage_fails_exactly_that_share_evenly() {
        let failing = |p| (1..=100).filter(|&n| fails(n, p)).collect::<Vec<u64>>();
        assert_eq!(failing(10), [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]);
        assert!(failing(0).is_empty());
        assert_eq!(failing(100).len(), 100);
        assert_eq!(
            failing(25),
            [
                4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60, 64, 68, 72, 76, 80, 84,
                88, 92, 96, 100
            ]
        );
    }
}
