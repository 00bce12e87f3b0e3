//! Metric gates (`--gate-prometheus URL --gate QUERY`) against a real Prometheus server
//! (Debian's `prometheus`, skipped loudly when missing) scraping the demo services, which count
//! their responses by status code: a release that answers 500 for 10% of its requests while its
//! health endpoint says OK is caught by the gate and rolled back; a healthy release with the
//! same gate (and a bake, whose gate evaluates it too) commits.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use orch_demo_service::load::{Load, LoadConfig, LoadReport};
use orch_tests::cluster::*;
use orch_tests::http::{http_get, query_escape};
use orch_tests::stderr;
use serde_json::Value;

/// The share of 5xx among the responses of `$version` on `$node` over the last 10 s must stay
/// under 1%. Empty when the release served nothing yet (no denominator) or when the comparison
/// filters the ratio out; `or vector(0)`: no 5xx series at all is a ratio of 0.
const GATE: &str = r#"(sum(increase(http_requests_total{node="$node",version="$version",code=~"5.."}[10s])) or vector(0)) / sum(increase(http_requests_total{node="$node",version="$version"}[10s])) < 0.01"#;

fn prometheus_or_skip() -> bool {
    let ok = Command::new("prometheus")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!(
            "!!!!!!!! SKIPPED metric gate test: prometheus is not installed (apt-get install prometheus) !!!!!!!!"
        );
    }
    ok
}

/// Prometheus on loopback scraping every demo service each second, labelled with its node.
struct Prometheus {
    child: Child,
    addr: String,
    dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    fn start(services: &[(String, SocketAddr)]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let port = orch_tests::free_port();
        let mut config = "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: demo\n    static_configs:\n".to_string();
        for (node, addr) in services {
            config.push_str(&format!(
                "      - targets: [\"{addr}\"]\n        labels:\n          node: {node}\n"
            ));
        }
        let file = dir.path().join("prometheus.yml");
        std::fs::write(&file, config).unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        Prometheus {
            child,
            addr: format!("127.0.0.1:{port}"),
            dir,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The first sample's value of an instant query, if any.
    fn query(&self, q: &str) -> Option<f64> {
        let (code, body) = http_get(
            &self.addr,
            &format!("/api/v1/query?query={}", query_escape(q)),
        );
        if code != 200 {
            return None;
        }
        let v: Value = serde_json::from_str(&body).ok()?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }

    fn wait_for(&self, q: &str, what: &str, ok: impl Fn(f64) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v = self.query(q);
            if v.is_some_and(&ok) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: `{q}` is {v:?}; prometheus log: {}",
                std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// Steady requests to every service's `/` (one keep-alive client each, ~50 requests a second),
/// on their own runtime; stopped (or aborted, when dropped) at the end.
struct Traffic {
    rt: tokio::runtime::Runtime,
    loads: Vec<Load>,
}

impl Traffic {
    fn start(services: &[(String, SocketAddr)]) -> Traffic {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let loads = {
            let _g = rt.enter();
            services
                .iter()
                .map(|(_, a)| {
                    let mut cfg = LoadConfig::new(*a);
                    cfg.keepalive_clients = 1;
                    cfg.fresh_clients = 0;
                    cfg.keepalive_pause = Duration::from_millis(20);
                    Load::start(cfg)
                })
                .collect()
        };
        Traffic { rt, loads }
    }

    /// What each service's client saw since the start or the previous call.
    fn reports(&self) -> Vec<LoadReport> {
        self.loads.iter().map(Load::take_report).collect()
    }

    fn stop(self) {
        let Traffic { rt, loads } = self;
        rt.block_on(async {
            for l in loads {
                l.stop().await;
            }
        });
    }
}

fn node_error(st: &Value, node: &str) -> String {
    st["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["id"] == node)
        .and_then(|n| n["error"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// Starts `rollout VERSION --package PKG` with the metric gate and `extra`, detached; its id.
fn start_gated(c: &Cluster, prom: &Prometheus, version: &str, pkg: &str, extra: &[&str]) -> String {
    let url = prom.url();
    let mut args = vec![
        "rollout",
        version,
        "--package",
        pkg,
        "--gate-prometheus",
        &url,
        "--gate",
        GATE,
        // A fresh release has no rate until two scrapes saw it: only the deadline decides.
        "--failure-threshold",
        "0",
        "--detach",
        "--json",
    ];
    args.extend_from_slice(extra);
    let started = c.cli_json(&args);
    started["id"].as_str().unwrap().to_string()
}

fn wait_end(c: &Cluster, id: &str) -> Value {
    c.wait_rollout(Duration::from_secs(180), "the rollout to end", |s| {
        s.id == id
            && matches!(
                s.phase.as_str(),
                "succeeded" | "rolled_back" | "rollback_failed" | "paused" | "failed"
            )
    });
    c.status_json(id)
}

#[test]
fn a_metric_gate_rolls_back_a_release_that_fails_requests_and_passes_a_healthy_one() {
    if !prometheus_or_skip() {
        return;
    }
    let c = Cluster::start(ClusterOpts::demo(1, 2));
    let services: Vec<(String, SocketAddr)> = ["n1", "n2"]
        .iter()
        .map(|n| (n.to_string(), c.node(n).service.expect("a demo node")))
        .collect();
    let prom = Prometheus::start(&services);
    let traffic = Traffic::start(&services);
    prom.wait_for(
        r#"count(http_requests_total{job="demo",code="200",version="4.2.0"} > 0)"#,
        "both services scraped, with traffic",
        |n| n == 2.0,
    );

    // The coordinators refuse what they cannot query.
    let pkg = c.package_with_errors("4.2.1", 10);
    let pkg = pkg.to_str().unwrap();
    let o = c.cli(&[
        "rollout",
        "4.2.1",
        "--package",
        pkg,
        "--gate-prometheus",
        "https://127.0.0.1:9090",
        "--gate",
        "vector(1)",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("https is not supported yet"),
        "{}",
        stderr(&o)
    );

    // 10% of `/` answered 500 while /health says OK: the gate never passes on n1, whose
    // deadline fails it; every node is rolled back.
    let id = start_gated(
        &c,
        &prom,
        "4.2.1",
        pkg,
        &["--min-healthy-time", "5s", "--healthy-deadline", "20s"],
    );
    let st = wait_end(&c, &id);
    assert_eq!(st["phase"], "rolled_back", "{st:#}");
    let sent = GATE.replace("$node", "n1").replace("$version", "4.2.1");
    let error = node_error(&st, "n1");
    assert!(
        error.contains(&format!("metric gate `{sent}` returned nothing")),
        "n1's error names the query as sent and its value: {error:?}\n{st:#}"
    );
    assert!(
        st["error"]
            .as_str()
            .unwrap_or_default()
            .contains("metric gate"),
        "{st:#}"
    );
    for n in ["n1", "n2"] {
        assert_eq!(
            c.node(n).health().map(|h| h.0).as_deref(),
            Some("4.2.0"),
            "{n}"
        );
    }
    // Prometheus had the new release's 500s while the gate returned nothing: the ratio was
    // over 1% (false), not missing.
    prom.wait_for(
        r#"max_over_time(http_requests_total{node="n1",version="4.2.1",code="500"}[5m])"#,
        "n1's 500s on 4.2.1 scraped",
        |n| n > 0.0,
    );
    // The release did fail requests (what the gate saw), while its health check passed.
    let seen = traffic.reports();
    assert!(
        seen[0]
            .failure_samples
            .iter()
            .any(|f| f.contains("status 500")),
        "n1 served 500s: {:?}",
        seen[0].failure_samples
    );

    // A healthy release with the same gate commits: the gate passes on each node and again in
    // the bake.
    let ok = c.package("4.2.2", false);
    let id = start_gated(
        &c,
        &prom,
        "4.2.2",
        ok.to_str().unwrap(),
        &[
            "--min-healthy-time",
            "4s",
            "--healthy-deadline",
            "60s",
            "--bake",
            "3s",
        ],
    );
    let st = wait_end(&c, &id);
    assert_eq!(st["phase"], "succeeded", "{st:#}");
    let msgs = event_messages(&st);
    for n in ["n1", "n2"] {
        assert!(
            msgs.iter()
                .any(|m| m == &format!("{n}: stayed healthy on 4.2.2 for the bake (3s)")),
            "{msgs:#?}"
        );
        assert_eq!(
            c.node(n).health().map(|h| h.0).as_deref(),
            Some("4.2.2"),
            "{n}"
        );
    }
    // The policy shows the gate, in JSON and in words.
    assert_eq!(st["policy"]["gate_prometheus"], prom.url(), "{st:#}");
    assert_eq!(st["policy"]["gates"], serde_json::json!([GATE]), "{st:#}");
    assert_eq!(st["spec"]["metric_gates"]["queries"][0], GATE, "{st:#}");
    let text = c.cli_ok(&["status", &id]);
    assert!(
        text.contains(&format!("metric gates ({}): `{GATE}`", prom.url())),
        "{text}"
    );
    traffic.stop();
}

#[test]
fn gates_and_their_server_go_together() {
    // Refused by the CLI before anything is contacted: no cluster needed.
    for (args, want) in [
        (
            &["--gate", "vector(1)"][..],
            "--gate needs --gate-prometheus URL",
        ),
        (
            &["--gate-prometheus", "http://127.0.0.1:9"][..],
            "without any --gate 'QUERY'",
        ),
    ] {
        let mut all = vec![
            "rollout",
            "4.2.1",
            "--coordinator",
            "127.0.0.1:9",
            "--insecure",
        ];
        all.extend_from_slice(args);
        let o = orch_tests::run_bounded(orch_tests::orch_cmd(&all), orch_tests::CLI_TIMEOUT);
        assert!(!o.status.success());
        assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
    }
}
