//! The coordinators' HTTP endpoint on a real mTLS cluster: who may read and act, the JSON API
//! and dashboard assets, and Prometheus metrics scraped by a real Prometheus server (Debian's
//! `prometheus`, skipped loudly when missing) during a rollout, checked with PromQL and
//! `promtool check metrics`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use orch_tests::cluster::{Cluster, ClusterOpts};
use orch_tests::http::{http_get, https, query_escape};
use orch_tests::{OPERATOR, VIEWER, stdout};
use serde_json::Value;

/// Each coordinator's HTTP address, from the line it logs when the endpoint is up.
fn http_addrs(c: &Cluster) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let found: Vec<String> = c
            .coords
            .iter()
            .filter_map(|p| {
                let log = p.log();
                let at = log.find("https://")?;
                let rest = &log[at + "https://".len()..];
                Some(rest[..rest.find('/')?].to_string())
            })
            .collect();
        if found.len() == c.coords.len() {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "HTTP endpoints did not come up\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

struct Party {
    ca: PathBuf,
    dir: PathBuf,
}

fn party(c: &Cluster, folder: &str) -> Party {
    let root = &c.certs.as_ref().expect("mTLS cluster").dir;
    Party {
        ca: root.join("ca/ca.pem"),
        dir: root.join(folder),
    }
}

fn get(addr: &str, path: &str, who: &Party) -> (u16, String) {
    https("GET", addr, path, &who.ca, Some(&who.dir))
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[test]
fn the_http_api_serves_viewers_and_operators_and_refuses_the_rest() {
    let c = Cluster::start(
        ClusterOpts::demo(3, 2)
            .mtls()
            .coordinator_args(&["--http-listen", "127.0.0.1:0"]),
    );
    let addrs = http_addrs(&c);
    let viewer = party(&c, &format!("viewer-{VIEWER}"));
    let operator = party(&c, &format!("operator-{OPERATOR}"));
    let agent = party(&c, "agent-n1");

    for addr in &addrs {
        let (code, body) = https("GET", addr, "/api/v1/nodes", &viewer.ca, None);
        assert_eq!(code, 401, "{body}");
        assert!(body.contains("--role viewer"), "{body}");
        let (code, body) = get(addr, "/api/v1/nodes", &agent);
        assert_eq!(code, 403, "{body}");
        let (code, body) = get(addr, "/api/v1/nodes", &viewer);
        assert_eq!(code, 200, "{body}");
        let nodes = json(&body);
        let ids: Vec<&str> = nodes
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|n| n["id"].as_str())
            .collect();
        assert_eq!(ids, ["n1", "n2"], "{body}");
        let (code, body) = get(addr, "/api/v1/cluster", &viewer);
        assert_eq!(code, 200);
        assert_eq!(
            json(&body)["members"].as_array().map(Vec::len),
            Some(3),
            "{body}"
        );
    }
    let addr = &addrs[0];
    let (code, body) = get(addr, "/", &viewer);
    assert_eq!(code, 200);
    assert!(
        body.contains("/api/v1/events") || body.contains("dashboard.js"),
        "{body}"
    );
    let (code, _) = get(addr, "/assets/dashboard.js", &viewer);
    assert_eq!(code, 200);
    let (code, body) = get(addr, "/api/v1/whoami", &operator);
    assert_eq!(
        (code, json(&body)["may_operate"].clone()),
        (200, Value::Bool(true))
    );

    // Start a rollout that waits for promotion after its canary: a viewer may not act on it,
    // an operator may, and the result is the gRPC one.
    let pkg = c.package("4.2.1", false).display().to_string();
    c.cli_ok(&[
        "rollout",
        "4.2.1",
        "--package",
        &pkg,
        "--canary",
        "1",
        "--min-healthy-time",
        "0ms",
        "--detach",
    ]);
    let (code, body) = https(
        "POST",
        addr,
        "/api/v1/rollouts/r000001/abort",
        &viewer.ca,
        Some(&viewer.dir),
    );
    assert_eq!(code, 403, "{body}");
    let (code, body) = https(
        "POST",
        addr,
        "/api/v1/rollouts/r000001/abort",
        &operator.ca,
        Some(&operator.dir),
    );
    assert_eq!(code, 200, "{body}");
    let st = json(&body);
    assert_eq!(st["id"], "r000001", "{body}");
    let (code, body) = get(addr, "/api/v1/rollouts/r000001", &viewer);
    assert_eq!(code, 200);
    let st = json(&body);
    assert_eq!(st["phase"], "aborted", "{body}");
    assert!(
        st["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["by"].as_str().is_some_and(|b| b.contains(OPERATOR))),
        "the abort is recorded under the operator's certificate name: {body}"
    );
    let (code, body) = get(addr, "/api/v1/rollouts/r000042", &viewer);
    assert_eq!(code, 404, "{body}");
    let (code, body) = get(addr, "/api/v1/nope", &viewer);
    assert_eq!(code, 404, "{body}");
}

/// Runs Prometheus on loopback scraping `targets` every second with `who`'s certificate.
struct Prometheus {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn prometheus_or_skip() -> bool {
    let ok = Command::new("prometheus")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
        && Command::new("promtool")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!(
            "!!!!!!!! SKIPPED Prometheus scrape test: prometheus/promtool are not installed (apt-get install prometheus) !!!!!!!!"
        );
    }
    ok
}

impl Prometheus {
    fn start(targets: &[String], who: &Party) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let port = orch_tests::free_port();
        let list = targets
            .iter()
            .map(|t| format!("\"{t}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: orchestrator-coordinators\n    scheme: https\n    tls_config:\n      ca_file: {ca}\n      cert_file: {cert}\n      key_file: {key}\n    static_configs:\n      - targets: [{list}]\n",
            ca = who.ca.display(),
            cert = who.dir.join("cert.pem").display(),
            key = who.dir.join("key.pem").display(),
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
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
            _dir: dir,
        }
    }

    /// The value of an instant PromQL query (the first sample), if any.
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
            assert!(Instant::now() < deadline, "{what}: `{q}` is {v:?}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

#[test]
fn prometheus_scrapes_the_cluster_and_sees_the_rollout() {
    if !prometheus_or_skip() {
        return;
    }
    let c = Cluster::start(
        ClusterOpts::demo(3, 2)
            .mtls()
            .coordinator_args(&["--http-listen", "127.0.0.1:0"]),
    );
    let addrs = http_addrs(&c);
    let viewer = party(&c, &format!("viewer-{VIEWER}"));

    // The exposition format is valid.
    let (code, body) = get(&addrs[0], "/metrics", &viewer);
    assert_eq!(code, 200);
    promtool_check(&body);

    let prom = Prometheus::start(&addrs, &viewer);
    prom.wait_for("count(up == 1)", "all three coordinators scraped", |v| {
        v == 3.0
    });
    prom.wait_for(
        "sum(orchestrator_raft_is_leader)",
        "exactly one leader",
        |v| v == 1.0,
    );
    let pkg = c.package("4.2.1", false).display().to_string();
    let o = c.cli(&[
        "rollout",
        "4.2.1",
        "--package",
        &pkg,
        "--min-healthy-time",
        "0ms",
    ]);
    assert!(o.status.success(), "{}", stdout(&o));
    prom.wait_for(
        r#"min(orchestrator_rollouts_total{outcome="succeeded"})"#,
        "every coordinator counted the succeeded rollout",
        |v| v >= 1.0,
    );
    prom.wait_for(
        r#"max(orchestrator_rollout_nodes{step="committed"})"#,
        "both nodes committed",
        |v| v == 2.0,
    );
    prom.wait_for(
        "max(orchestrator_raft_applied_index)",
        "an applied index",
        |v| v > 0.0,
    );
    prom.wait_for(
        r#"max(orchestrator_package_uploaded_bytes_total)"#,
        "the package upload counted",
        |v| v > 0.0,
    );
}

fn promtool_check(metrics: &str) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.status.success() && out.trim().is_empty(),
        "promtool check metrics:\n{out}\n{metrics}"
    );
}
