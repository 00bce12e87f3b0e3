//! Health checks against an expected version: an HTTP probe (2xx within the timeout and, when
//! the body is JSON with a string `version`, that it equals the expected one), a command
//! (`CMD EXPECTED_VERSION`, healthy iff exit 0), or, with neither, the store's running version.

use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use orch_types::Version;

#[derive(Debug, Clone, Default)]
pub struct HealthConfig {
    pub url: Option<String>,
    /// Already shell-split; the expected version is appended.
    pub cmd: Option<Vec<String>>,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthResult {
    pub healthy: bool,
    /// What the service reports running, when the check says.
    pub reported: Option<String>,
    /// "http", "command" or "store".
    pub check: &'static str,
    pub detail: String,
    /// The service process's identity (its `pid` in the health URL's JSON body), when it says:
    /// a change means the service was restarted.
    pub identity: Option<String>,
}

const MAX_BODY: usize = 64 << 10;

/// Why a health URL could not be read.
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error("invalid health URL {url:?}")]
    BadUrl {
        url: String,
        #[source]
        source: hyper::http::uri::InvalidUri,
    },
    #[error("health URL {url:?} must be http://")]
    NotHttp { url: String },
    #[error("GET {url}")]
    Get {
        url: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("GET {url}: reading body")]
    Body {
        url: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("GET {url}: no answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
}

/// GETs `url`; returns (status, body).
async fn get(url: &str, timeout: Duration) -> Result<(u16, Bytes), ProbeError> {
    let uri: hyper::Uri = url.parse().map_err(|source| ProbeError::BadUrl {
        url: url.to_string(),
        source,
    })?;
    if uri.scheme_str() != Some("http") {
        return Err(ProbeError::NotHttp {
            url: url.to_string(),
        });
    }
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let fut = async {
        let resp = client.get(uri).await.map_err(|source| ProbeError::Get {
            url: url.to_string(),
            source,
        })?;
        let status = resp.status().as_u16();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|source| ProbeError::Body {
                url: url.to_string(),
                source,
            })?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| ProbeError::Timeout {
            url: url.to_string(),
            timeout,
        })?
}

/// The `version` string field of a JSON object body, if there is one.
pub fn body_version(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("version")?.as_str().map(str::to_string)
}

/// The `pid` field (a number or a string) of a JSON object body, if there is one.
pub fn body_identity(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    match v.get("pid")? {
        serde_json::Value::Number(n) => Some(n.to_string()),
        // Bounded: it is only compared, but it comes from another process.
        serde_json::Value::String(s) if s.len() <= 64 => Some(s.clone()),
        _ => None,
    }
}

pub async fn probe_http(url: &str, timeout: Duration, expect: Option<Version>) -> HealthResult {
    let (status, body) = match get(url, timeout).await {
        Ok(r) => r,
        Err(e) => {
            return HealthResult {
                healthy: false,
                reported: None,
                check: "http",
                detail: orch_tls::error_chain(&e),
                identity: None,
            };
        }
    };
    let reported = body_version(&body);
    let identity = body_identity(&body);
    let (healthy, detail) = if !(200..300).contains(&status) {
        (false, format!("GET {url} answered HTTP {status}"))
    } else {
        match (&reported, expect) {
            (Some(r), Some(e)) if *r != e.to_string() => {
                (false, format!("service reports version {r}, expected {e}"))
            }
            _ => (true, format!("GET {url} answered HTTP {status}")),
        }
    };
    HealthResult {
        healthy,
        reported,
        check: "http",
        detail,
        identity,
    }
}

pub async fn probe_cmd(cmd: &[String], timeout: Duration, expect: Option<Version>) -> HealthResult {
    let fail = |detail| HealthResult {
        healthy: false,
        reported: None,
        check: "command",
        detail,
        identity: None,
    };
    let Some((prog, args)) = cmd.split_first() else {
        return fail("empty health command".to_string());
    };
    let mut c = tokio::process::Command::new(prog);
    c.args(args)
        .arg(expect.map(|v| v.to_string()).unwrap_or_default())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    match tokio::time::timeout(timeout, c.output()).await {
        Err(_) => fail(format!("{prog} did not finish within {timeout:?}")),
        Ok(Err(e)) => fail(format!("cannot run {prog}: {e}")),
        Ok(Ok(out)) if out.status.success() => HealthResult {
            healthy: true,
            reported: None,
            check: "command",
            detail: format!("{prog} exited 0"),
            identity: None,
        },
        Ok(Ok(out)) => {
            let tail = String::from_utf8_lossy(&out.stderr);
            let tail: String = tail
                .trim()
                .lines()
                .last()
                .unwrap_or("")
                .chars()
                .take(300)
                .collect();
            fail(format!(
                "{prog} exited with {}{}",
                out.status,
                if tail.is_empty() {
                    String::new()
                } else {
                    format!(": {tail}")
                }
            ))
        }
    }
}

/// Runs the configured checks in order (URL, then command); with neither, compares the store's
/// running version. `url_probe` is the URL's answer when the caller already probed it (with
/// the same `expect`); otherwise the URL is probed here.
pub async fn check(
    cfg: &HealthConfig,
    expect: Option<Version>,
    store_running: Option<Version>,
    url_probe: Option<HealthResult>,
) -> HealthResult {
    let mut last = None;
    if let Some(url) = &cfg.url {
        let r = match url_probe {
            Some(r) => r,
            None => probe_http(url, cfg.timeout, expect).await,
        };
        if !r.healthy {
            return r;
        }
        last = Some(r);
    }
    if let Some(cmd) = &cfg.cmd {
        let mut r = probe_cmd(cmd, cfg.timeout, expect).await;
        if let Some(prev) = &last {
            r.reported = prev.reported.clone();
        }
        return r;
    }
    if let Some(r) = last {
        return r;
    }
    let running = store_running.map(|v| v.to_string());
    let (healthy, detail) = match (expect, store_running) {
        (Some(e), Some(r)) if e == r => (true, format!("store runs {r}")),
        (Some(e), Some(r)) => (false, format!("store runs {r}, expected {e}")),
        (Some(e), None) => (false, format!("nothing installed, expected {e}")),
        (None, Some(r)) => (true, format!("store runs {r}")),
        (None, None) => (false, "nothing installed".to_string()),
    };
    HealthResult {
        healthy,
        reported: running,
        check: "store",
        detail,
        identity: None,
    }
}
