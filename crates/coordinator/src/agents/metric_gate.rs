//! Metric gates (`--gate-prometheus URL --gate QUERY`): instant PromQL queries against a
//! Prometheus server's HTTP API, judged as a condition. A query passes when it returns a vector
//! with at least one sample (Prometheus' alerting semantics: a comparison such as `< 0.01`
//! filters the samples out when it is false) or a scalar other than 0.
//!
//! The client is a plain HTTP/1.1 GET on a fresh connection, bounded by [`QUERY_TIMEOUT`]:
//! one query a second per gated node needs no pool, and a fresh connection never meets one the
//! server closed in between.

use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::header::{ACCEPT, HOST, HeaderValue};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use orch_types::rollout::MetricGates;
use orch_types::{NodeId, Version};
use serde::Deserialize;
use tokio::net::TcpStream;

/// One query's whole exchange (connect, request, answer).
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// An instant query's answer is small; a bigger one is not worth reading.
const MAX_ANSWER: usize = 1 << 20;

/// Why a query could not be judged. A wrapped cause is `source()`, not repeated in the text
/// (`orch_types::error_chain` shows both).
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("{0} is not an http://HOST:PORT URL")]
    Url(String),
    #[error("cannot reach Prometheus at {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP exchange with Prometheus at {addr} failed")]
    Http {
        addr: String,
        #[source]
        source: hyper::Error,
    },
    #[error("no answer from Prometheus at {addr} within {QUERY_TIMEOUT:?}")]
    Timeout { addr: String },
    #[error("Prometheus answered HTTP {status}: {detail}")]
    Status { status: StatusCode, detail: String },
    #[error("Prometheus said {error_type}: {error}")]
    Prometheus { error_type: String, error: String },
    #[error("unreadable answer from Prometheus: {0}")]
    Answer(String),
    #[error(
        "the query returns a {0}, not an instant vector or a scalar: use an instant expression"
    )]
    ResultType(String),
}

/// What a query returned, judged.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// A non-empty vector, or a scalar other than 0: `value` is the first sample's.
    True { value: String },
    /// An empty vector: a comparison that filtered everything out, or no data.
    Nothing,
    /// A scalar 0.
    False { value: String },
}

/// `{"status": ..., "data": {"resultType": ..., "result": ...}}` or an error.
#[derive(Debug, Deserialize)]
struct Answer {
    status: String,
    #[serde(default)]
    data: Option<Data>,
    #[serde(default, rename = "errorType")]
    error_type: String,
    #[serde(default)]
    error: String,
}

#[derive(Debug, Deserialize)]
struct Data {
    #[serde(rename = "resultType")]
    result_type: String,
    result: serde_json::Value,
}

/// Judges an answer of `GET /api/v1/query` (whatever its HTTP status: errors come as JSON).
pub fn judge(body: &[u8]) -> Result<Outcome, QueryError> {
    let a: Answer = serde_json::from_slice(body).map_err(|e| QueryError::Answer(e.to_string()))?;
    if a.status != "success" {
        return Err(QueryError::Prometheus {
            error_type: a.error_type,
            error: a.error,
        });
    }
    let d = a
        .data
        .ok_or_else(|| QueryError::Answer("status success without data".into()))?;
    // A sample is `[time, "value"]`.
    let value_of = |sample: &serde_json::Value| -> Result<String, QueryError> {
        sample
            .get(1)
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .ok_or_else(|| QueryError::Answer(format!("a sample without a value: {sample}")))
    };
    match d.result_type.as_str() {
        "vector" => {
            let samples = d
                .result
                .as_array()
                .ok_or_else(|| QueryError::Answer("a vector result that is not a list".into()))?;
            match samples.first() {
                None => Ok(Outcome::Nothing),
                Some(s) => Ok(Outcome::True {
                    value: value_of(s.get("value").unwrap_or(&serde_json::Value::Null))?,
                }),
            }
        }
        "scalar" => {
            let value = value_of(&d.result)?;
            let n: f64 = value
                .parse()
                .map_err(|_| QueryError::Answer(format!("scalar value {value:?}")))?;
            // NaN (no data) is not true either.
            if n != 0.0 && !n.is_nan() {
                Ok(Outcome::True { value })
            } else {
                Ok(Outcome::False { value })
            }
        }
        other => Err(QueryError::ResultType(other.to_string())),
    }
}

/// `s` percent-encoded for a URL's query string (everything but the unreserved characters).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `http://HOST:PORT[/prefix]` split into the address to dial (port 80 when none) and the
/// Host header, and the path prefix without a trailing slash.
fn split_url(url: &str) -> Result<(String, String, String), QueryError> {
    let bad = || QueryError::Url(url.to_string());
    let rest = url.strip_prefix("http://").ok_or_else(bad)?;
    let (authority, prefix) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    if authority.is_empty() {
        return Err(bad());
    }
    // A bracketed IPv6 address has colons of its own; a port follows its `]`.
    let has_port = match authority.rfind(']') {
        Some(end) => authority[end..].contains(':'),
        None => authority.contains(':'),
    };
    let addr = if has_port {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    Ok((addr, authority.to_string(), prefix.to_string()))
}

/// Evaluates `query` (already substituted) on the Prometheus server at `url`.
pub async fn query(url: &str, query: &str) -> Result<Outcome, QueryError> {
    let (addr, host, prefix) = split_url(url)?;
    let path = format!("{prefix}/api/v1/query?query={}", encode(query));
    let exchange = async {
        let stream = TcpStream::connect(&addr)
            .await
            .map_err(|source| QueryError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let http = |source| QueryError::Http {
            addr: addr.clone(),
            source,
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        // Its errors surface on the request too; it ends with the connection.
        tokio::spawn(conn);
        let mut req = Request::get(path.as_str())
            .body(Empty::<Bytes>::new())
            .map_err(|e| QueryError::Url(format!("{url}: {e}")))?;
        let host = HeaderValue::from_str(&host).map_err(|_| QueryError::Url(url.to_string()))?;
        req.headers_mut().insert(HOST, host);
        req.headers_mut()
            .insert(ACCEPT, HeaderValue::from_static("application/json"));
        let resp = sender.send_request(req).await.map_err(http)?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| QueryError::Answer(format!("reading the answer: {e}")))?
            .to_bytes();
        Ok::<_, QueryError>((status, body))
    };
    let (status, body) = tokio::time::timeout(QUERY_TIMEOUT, exchange)
        .await
        .map_err(|_| QueryError::Timeout { addr: addr.clone() })??;
    match judge(&body) {
        // Prometheus answers bad queries with 400 and a JSON error: that says more.
        Err(QueryError::Answer(_)) if !status.is_success() => Err(QueryError::Status {
            status,
            detail: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
        }),
        judged => judged,
    }
}

/// Evaluates every gate for `node` expecting `version` (all at once): `None` when every one
/// passes, else what failed, for the gate's error: `metric gate `QUERY` returned nothing`.
pub async fn failing(gates: &MetricGates, node: &NodeId, version: &Version) -> Option<String> {
    let checks = gates.queries.iter().map(|q| {
        let sent = MetricGates::substituted(q, node, version);
        async move {
            let outcome = query(&gates.prometheus, &sent).await;
            (sent, outcome)
        }
    });
    let results = futures::future::join_all(checks).await;
    let failed: Vec<String> = results
        .into_iter()
        .filter_map(|(sent, outcome)| match outcome {
            Ok(Outcome::True { .. }) => None,
            Ok(Outcome::Nothing) => Some(format!(
                "metric gate `{sent}` returned nothing (false, or no data)"
            )),
            Ok(Outcome::False { value }) => {
                Some(format!("metric gate `{sent}` returned value {value}"))
            }
            Err(e) => Some(format!(
                "metric gate `{sent}` error: {}",
                orch_types::error_chain(&e)
            )),
        })
        .collect();
    (!failed.is_empty()).then(|| failed.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_pass_with_a_sample_and_scalars_when_not_zero() {
        let v = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"node":"n1"},"value":[1700000000.1,"0.004"]}]}}"#;
        assert_eq!(
            judge(v).unwrap(),
            Outcome::True {
                value: "0.004".into()
            }
        );
        let empty = br#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
        assert_eq!(judge(empty).unwrap(), Outcome::Nothing);
        let one =
            br#"{"status":"success","data":{"resultType":"scalar","result":[1700000000,"1"]}}"#;
        assert_eq!(judge(one).unwrap(), Outcome::True { value: "1".into() });
        let zero =
            br#"{"status":"success","data":{"resultType":"scalar","result":[1700000000,"0"]}}"#;
        assert_eq!(judge(zero).unwrap(), Outcome::False { value: "0".into() });
        let nan =
            br#"{"status":"success","data":{"resultType":"scalar","result":[1700000000,"NaN"]}}"#;
        assert_eq!(
            judge(nan).unwrap(),
            Outcome::False {
                value: "NaN".into()
            }
        );
    }

    #[test]
    fn errors_and_other_result_types_are_named() {
        let err = br#"{"status":"error","errorType":"bad_data","error":"invalid parameter \"query\": 1:5: parse error"}"#;
        let e = judge(err).unwrap_err().to_string();
        assert!(e.contains("bad_data") && e.contains("parse error"), "{e}");
        let matrix = br#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#;
        let e = judge(matrix).unwrap_err().to_string();
        assert!(e.contains("returns a matrix"), "{e}");
        let e = judge(b"<html>").unwrap_err().to_string();
        assert!(e.starts_with("unreadable answer from Prometheus"), "{e}");
    }

    #[test]
    fn queries_are_substituted_and_encoded() {
        let node: NodeId = "n2".parse().unwrap();
        let version: Version = "4.2.1".parse().unwrap();
        let q = MetricGates::substituted(
            r#"sum(up{node="$node",version="$version"}) > 0 and on() vector($node_count)"#,
            &node,
            &version,
        );
        // Only the two variables: a longer name that starts with one is left alone.
        assert_eq!(
            q,
            r#"sum(up{node="n2",version="4.2.1"}) > 0 and on() vector($node_count)"#
        );
        assert_eq!(
            MetricGates::substituted("$node$version$", &node, &version),
            "n24.2.1$"
        );
        assert_eq!(
            encode(r#"a{b="c d"}<0.01"#),
            "a%7Bb%3D%22c%20d%22%7D%3C0.01"
        );
    }

    #[test]
    fn urls_give_the_address_host_and_prefix() {
        let s = |u: &str| split_url(u).map_err(|e| e.to_string());
        assert_eq!(
            s("http://127.0.0.1:9090").unwrap(),
            (
                "127.0.0.1:9090".into(),
                "127.0.0.1:9090".into(),
                String::new()
            )
        );
        assert_eq!(
            s("http://prom.example/prometheus/").unwrap(),
            (
                "prom.example:80".into(),
                "prom.example".into(),
                "/prometheus".into()
            )
        );
        assert_eq!(s("http://[::1]:9090").unwrap().0, "[::1]:9090");
        assert!(s("https://prom:9090").is_err());
    }

    #[tokio::test]
    async fn an_unreachable_server_is_an_error_naming_it() {
        // A port nothing listens on: bind one, then close it.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let e = query(&format!("http://{addr}"), "up").await.unwrap_err();
        let shown = orch_types::error_chain(&e);
        assert!(
            shown.starts_with(&format!("cannot reach Prometheus at {addr}: ")),
            "{shown}"
        );
    }
}
