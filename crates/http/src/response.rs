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

/// A Prometheus registry: in the OpenMetrics text format when the client accepts it (as
/// Prometheus does), else in the classic text format 0.0.4 (what `promtool check metrics`
/// and older scrapers read).
pub fn metrics(registry: &prometheus_client::registry::Registry, accept: &str) -> Response {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            &format!("could not encode the metrics: {e}"),
        );
    }
    if accept.contains("application/openmetrics-text") {
        with_type(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            full(out),
        )
    } else {
        with_type(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            full(classic_text(&out)),
        )
    }
}

/// OpenMetrics text to the classic format: no `# UNIT` or `# EOF`, and the metadata of a
/// counter (or info metric) under its sample name (`x_total`, `x_info`).
pub fn classic_text(openmetrics: &str) -> String {
    let mut renamed = std::collections::BTreeMap::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            match rest.rsplit_once(' ') {
                Some((name, "counter")) => {
                    renamed.insert(name.to_string(), (format!("{name}_total"), "counter"))
                }
                Some((name, "info")) => {
                    renamed.insert(name.to_string(), (format!("{name}_info"), "gauge"))
                }
                _ => None,
            };
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let meta = line
            .strip_prefix("# HELP ")
            .map(|r| ("HELP", r))
            .or_else(|| line.strip_prefix("# TYPE ").map(|r| ("TYPE", r)));
        if let Some((kind, rest)) = meta {
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            if let Some((new, ty)) = renamed.get(name) {
                let tail = if kind == "TYPE" { ty } else { tail };
                out.push_str(&format!("# {kind} {new} {tail}\n"));
                continue;
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn classic_text_names_counters_by_their_samples() {
        let om = "# HELP up_rollouts Rollouts.\n# TYPE up_rollouts counter\n# UNIT up_rollouts bytes\nup_rollouts_total{a=\"b\"} 1\n# HELP g A gauge.\n# TYPE g gauge\ng 2\n# EOF\n";
        assert_eq!(
            super::classic_text(om),
            "# HELP up_rollouts_total Rollouts.\n# TYPE up_rollouts_total counter\nup_rollouts_total{a=\"b\"} 1\n# HELP g A gauge.\n# TYPE g gauge\ng 2\n"
        );
    }
}
