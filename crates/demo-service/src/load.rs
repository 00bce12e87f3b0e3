//! A closed-loop HTTP load generator, used by the hot-swap test and the `hotswap` benchmark.
//!
//! Two kinds of clients run as tokio tasks until stopped:
//! - **keep-alive** clients reuse one connection; when a response says `Connection: close` they
//!   open a new one for the next request (normal HTTP, counted as a reconnect, not a failure);
//! - **fresh** clients open a new connection for every request.
//!
//! A failure is a request that did not get a complete `200` response: connection refused, reset,
//! closed before the response, timed out, or another status. A connection the server closed while
//! idle (no request on it) loses nothing and is counted separately as an idle close.
//!
//! Stopping lets each client finish its request in flight, so stopping never creates failures.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use http_body_util::Empty;
use hyper::StatusCode;
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::Error;
use crate::http::{self, Response};

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub addr: SocketAddr,
    /// Request path; `/` (which a broken release still answers with 200).
    pub path: String,
    pub keepalive_clients: usize,
    pub fresh_clients: usize,
    /// A request without a complete response within this is a failure.
    pub request_timeout: Duration,
    /// Pause after each request of a keep-alive client (zero: back to back).
    pub keepalive_pause: Duration,
    /// Pause after each request of a fresh-connection client. Bounds the connection rate and so
    /// the number of sockets in TIME_WAIT, which would otherwise exhaust ephemeral ports.
    pub fresh_pause: Duration,
    /// How many failure descriptions a report keeps (the count is always exact).
    pub max_failure_samples: usize,
}

impl LoadConfig {
    pub fn new(addr: SocketAddr) -> Self {
        LoadConfig {
            addr,
            path: "/".into(),
            keepalive_clients: 4,
            fresh_clients: 4,
            request_timeout: Duration::from_secs(5),
            keepalive_pause: Duration::ZERO,
            fresh_pause: Duration::from_millis(2),
            max_failure_samples: 20,
        }
    }
}

/// Statistics over one window of a run.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Requests answered with a complete 200.
    pub served: u64,
    pub failures: u64,
    /// The first few failures, described.
    pub failure_samples: Vec<String>,
    /// Latency of each served request in microseconds (connect included for fresh clients),
    /// sorted ascending.
    pub latencies_us: Vec<u32>,
    /// Keep-alive connections re-opened because a response said `Connection: close`.
    pub reconnects: u64,
    /// Keep-alive connections found closed while idle (no request lost).
    pub idle_closes: u64,
    /// Served requests per version named in the response body (`demo-service V (pid N)`).
    pub by_version: BTreeMap<String, u64>,
    pub elapsed: Duration,
}

impl LoadReport {
    /// The `q`-quantile (0.0..=1.0) of the latencies, nearest rank.
    pub fn percentile(&self, q: f64) -> Option<Duration> {
        if self.latencies_us.is_empty() {
            return None;
        }
        let n = self.latencies_us.len();
        let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as usize).clamp(1, n);
        Some(Duration::from_micros(u64::from(
            self.latencies_us[rank - 1],
        )))
    }

    pub fn requests_per_sec(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.served as f64 / secs
        } else {
            0.0
        }
    }
}

struct Window {
    started: Instant,
    report: LoadReport,
}

impl Window {
    fn new() -> Self {
        Window {
            started: Instant::now(),
            report: LoadReport::default(),
        }
    }
}

struct Shared {
    max_failure_samples: usize,
    served_total: AtomicU64,
    failed_total: AtomicU64,
    window: Mutex<Window>,
}

impl Shared {
    fn window(&self) -> MutexGuard<'_, Window> {
        // A panicking client task must not take the statistics down with it.
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn served(&self, latency: Duration, version: Option<String>) {
        self.served_total.fetch_add(1, Ordering::Relaxed);
        let mut w = self.window();
        w.report.served += 1;
        let us = u32::try_from(latency.as_micros()).unwrap_or(u32::MAX);
        w.report.latencies_us.push(us);
        if let Some(v) = version {
            *w.report.by_version.entry(v).or_default() += 1;
        }
    }

    fn failed(&self, what: String) {
        self.failed_total.fetch_add(1, Ordering::Relaxed);
        let mut w = self.window();
        w.report.failures += 1;
        if w.report.failure_samples.len() < self.max_failure_samples {
            w.report.failure_samples.push(what);
        }
    }

    fn count(&self, f: impl FnOnce(&mut LoadReport)) {
        f(&mut self.window().report);
    }

    fn take(&self) -> LoadReport {
        let mut w = self.window();
        let window = std::mem::replace(&mut *w, Window::new());
        let mut report = window.report;
        report.elapsed = window.started.elapsed();
        report.latencies_us.sort_unstable();
        report
    }
}

/// A running load. Dropping it without [`Load::stop`] aborts the clients.
pub struct Load {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    /// Starts the clients on the current tokio runtime.
    pub fn start(config: LoadConfig) -> Load {
        let shared = Arc::new(Shared {
            max_failure_samples: config.max_failure_samples,
            served_total: AtomicU64::new(0),
            failed_total: AtomicU64::new(0),
            window: Mutex::new(Window::new()),
        });
        let (stop, stop_rx) = watch::channel(false);
        let config = Arc::new(config);
        let mut tasks = Vec::new();
        for _ in 0..config.keepalive_clients {
            let (c, s, r) = (config.clone(), shared.clone(), stop_rx.clone());
            tasks.push(tokio::spawn(keepalive_client(c, s, r)));
        }
        for _ in 0..config.fresh_clients {
            let (c, s, r) = (config.clone(), shared.clone(), stop_rx.clone());
            tasks.push(tokio::spawn(fresh_client(c, s, r)));
        }
        Load {
            shared,
            stop,
            tasks,
        }
    }

    /// Requests served since the start (all windows).
    pub fn served_total(&self) -> u64 {
        self.shared.served_total.load(Ordering::Relaxed)
    }

    /// Failures since the start (all windows).
    pub fn failures_total(&self) -> u64 {
        self.shared.failed_total.load(Ordering::Relaxed)
    }

    /// The statistics since the start or the previous `take_report`, and a new window begins.
    pub fn take_report(&self) -> LoadReport {
        self.shared.take()
    }

    /// Stops the clients (each finishes its request in flight) and returns the last window.
    pub async fn stop(mut self) -> LoadReport {
        let _ = self.stop.send(true);
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
        self.shared.take()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Sleeps for `d` unless stopped first; returns whether to go on.
async fn pause(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    if *stop.borrow() {
        return false;
    }
    if !d.is_zero() {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = stop.changed() => return false,
        }
    }
    !*stop.borrow()
}

fn version_of(body: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    let mut words = text.split_whitespace();
    (words.next()? == "demo-service").then_some(())?;
    words.next().map(str::to_owned)
}

/// Why one request of the load failed.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("connect to {addr}")]
    Connect {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("keep-alive")]
    KeepAlive(#[source] Error),
    #[error("keep-alive GET {path}: no response within {timeout:?}")]
    KeepAliveTimeout { path: String, timeout: Duration },
    #[error("fresh")]
    Fresh(#[source] Error),
}

/// Records one exchange; returns whether its connection may carry another request.
fn record(shared: &Shared, started: Instant, outcome: Result<Response, Failure>) -> bool {
    match outcome {
        Ok(resp) if resp.status == StatusCode::OK => {
            shared.served(started.elapsed(), version_of(&resp.body));
            !resp.connection_close
        }
        Ok(resp) => {
            shared.failed(format!("status {}", resp.status));
            !resp.connection_close
        }
        Err(e) => {
            shared.failed(crate::one_line(e));
            false
        }
    }
}

async fn keepalive_client(
    config: Arc<LoadConfig>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let mut conn: Option<SendRequest<Empty<Bytes>>> = None;
    while !*stop.borrow() {
        if let Some(sender) = conn.as_mut()
            && sender.ready().await.is_err()
        {
            // Closed while idle, before we sent anything: nothing was lost.
            shared.count(|r| r.idle_closes += 1);
            conn = None;
        }
        let started = Instant::now();
        let exchange = async {
            let sender = match conn.as_mut() {
                Some(s) => s,
                None => conn.insert(http::connect(config.addr).await.map_err(|source| {
                    Failure::Connect {
                        addr: config.addr,
                        source,
                    }
                })?),
            };
            http::send_get(sender, config.addr, &config.path, false)
                .await
                .map_err(Failure::KeepAlive)
        };
        let outcome = tokio::time::timeout(config.request_timeout, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(Failure::KeepAliveTimeout {
                    path: config.path.clone(),
                    timeout: config.request_timeout,
                })
            });
        let failed = outcome.is_err();
        let reusable = record(&shared, started, outcome);
        if !reusable {
            if !failed {
                shared.count(|r| r.reconnects += 1);
            }
            conn = None;
        }
        // After a failure, do not spin against a service that is down.
        let wait = if failed {
            Duration::from_millis(10).max(config.keepalive_pause)
        } else {
            config.keepalive_pause
        };
        if !pause(wait, &mut stop).await {
            break;
        }
    }
}

async fn fresh_client(
    config: Arc<LoadConfig>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    while !*stop.borrow() {
        let started = Instant::now();
        let outcome = http::get(config.addr, &config.path, config.request_timeout)
            .await
            .map_err(Failure::Fresh);
        let failed = outcome.is_err();
        record(&shared, started, outcome);
        let wait = if failed {
            Duration::from_millis(10).max(config.fresh_pause)
        } else {
            config.fresh_pause
        };
        if !pause(wait, &mut stop).await {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let r = LoadReport {
            latencies_us: (1..=100).collect(),
            ..Default::default()
        };
        assert_eq!(r.percentile(0.5), Some(Duration::from_micros(50)));
        assert_eq!(r.percentile(0.99), Some(Duration::from_micros(99)));
        assert_eq!(r.percentile(1.0), Some(Duration::from_micros(100)));
        assert_eq!(r.percentile(0.0), Some(Duration::from_micros(1)));
        assert_eq!(LoadReport::default().percentile(0.5), None);
    }

    #[test]
    fn version_is_read_from_the_root_page() {
        assert_eq!(
            version_of(b"demo-service 1.0.3 (pid 12)\n").as_deref(),
            Some("1.0.3")
        );
        assert_eq!(version_of(b"something else"), None);
    }

    #[tokio::test]
    async fn refused_connections_are_failures() {
        // A port that was free a moment ago: nothing listens there.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let mut config = LoadConfig::new(addr);
        config.keepalive_clients = 1;
        config.fresh_clients = 1;
        let load = Load::start(config);
        let deadline = Instant::now() + Duration::from_secs(10);
        while load.failures_total() < 4 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let report = load.stop().await;
        assert_eq!(report.served, 0);
        assert!(report.failures >= 4, "{report:?}");
        assert!(
            report
                .failure_samples
                .iter()
                .any(|s| s.contains("keep-alive") || s.contains("connect"))
        );
    }
}
