//! The daemons' HTTP endpoints on a real mTLS cluster: who may read and act, the JSON API
//! and dashboard assets, and Prometheus metrics of coordinators and agents scraped by a real
//! Prometheus server (Debian's `prometheus`, skipped loudly when missing) during a rollout,
//! checked with PromQL and `promtool check metrics`; and gRPC reflection (v1 and v1alpha)
//! listing what each daemon serves.

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

/// Each agent's HTTP address, from the line it logs when its endpoint is up (it is up before
/// the agent answers gRPC, which the harness waited for).
fn agent_http_addrs(c: &Cluster) -> Vec<String> {
    c.nodes
        .iter()
        .map(|n| {
            let log = std::fs::read_to_string(&n.agent().log_path).unwrap_or_default();
            let line = log
                .lines()
                .find(|l| l.contains("agent metrics listening"))
                .unwrap_or_else(|| panic!("agent {} serves no metrics:\n{log}", n.id));
            let at = line.find("://").expect("a URL") + 3;
            let rest = &line[at..];
            rest[..rest.find('/').expect("a path")].to_string()
        })
        .collect()
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
        // Each node's health comes from a (shared, at most 5 s old) probe of its agent.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            let (_, body) = get(addr, "/api/v1/nodes", &viewer);
            let nodes = json(&body);
            let details: Vec<&str> = nodes
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|n| n["health_detail"].as_str())
                .collect();
            if details.len() == 2 && details.iter().all(|d| *d != "being probed") {
                assert!(details.iter().all(|d| *d != "not probed"), "{body}");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "never probed: {body}");
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
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
    /// `jobs`: (job name, targets) pairs, all scraped over HTTPS as `who`.
    fn start(jobs: &[(&str, &[String])], who: &Party) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let port = orch_tests::free_port();
        let mut config =
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n".to_string();
        for (job, targets) in jobs {
            let list = targets
                .iter()
                .map(|t| format!("\"{t}\""))
                .collect::<Vec<_>>()
                .join(", ");
            config.push_str(&format!(
                "  - job_name: {job}\n    scheme: https\n    tls_config:\n      ca_file: {ca}\n      cert_file: {cert}\n      key_file: {key}\n    static_configs:\n      - targets: [{list}]\n",
                ca = who.ca.display(),
                cert = who.dir.join("cert.pem").display(),
                key = who.dir.join("key.pem").display(),
            ));
        }
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
            .coordinator_args(&["--http-listen", "127.0.0.1:0"])
            .agent_args(1, &["--http-listen", "127.0.0.1:0"])
            .agent_args(2, &["--http-listen", "127.0.0.1:0"]),
    );
    let addrs = http_addrs(&c);
    let agents = agent_http_addrs(&c);
    let viewer = party(&c, &format!("viewer-{VIEWER}"));

    // The exposition format is valid, on both kinds of daemon.
    let (code, body) = get(&addrs[0], "/metrics", &viewer);
    assert_eq!(code, 200);
    promtool_check(&body);
    let (code, agent_body) = get(&agents[0], "/metrics", &viewer);
    assert_eq!(code, 200, "{agent_body}");
    promtool_check(&agent_body);
    let body = format!("{body}\n{agent_body}");

    // The shipped alert rules are valid and name metrics that exist.
    let rules =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus/alerts.yml");
    let o = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let text = std::fs::read_to_string(&rules).unwrap();
    for name in text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("orchestrator_"))
    {
        let base = name.trim_end_matches("_total");
        assert!(
            body.contains(base),
            "alerts.yml uses {name}, which /metrics does not serve"
        );
    }

    let prom = Prometheus::start(
        &[
            ("orchestrator-coordinators", &addrs),
            ("orchestrator-agents", &agents),
        ],
        &viewer,
    );
    prom.wait_for(
        r#"count(up{job="orchestrator-coordinators"} == 1)"#,
        "all three coordinators scraped",
        |v| v == 3.0,
    );
    prom.wait_for(
        r#"count(up{job="orchestrator-agents"} == 1)"#,
        "both agents scraped",
        |v| v == 2.0,
    );
    prom.wait_for(
        r#"count(orchestrator_agent_release_info{version="4.2.0",permanent="true"})"#,
        "both agents run 4.2.0 before the rollout",
        |v| v == 2.0,
    );
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
    // The agents' side of the same rollout.
    prom.wait_for(
        r#"sum(orchestrator_agent_steps_total{kind="install",result="changed"})"#,
        "both agents counted their install",
        |v| v == 2.0,
    );
    prom.wait_for(
        r#"sum(orchestrator_agent_steps_total{kind="push",result="changed"})"#,
        "both agents counted the package push",
        |v| v >= 2.0,
    );
    prom.wait_for(
        r#"sum(orchestrator_agent_step_duration_seconds_count{kind="install"})"#,
        "install durations observed",
        |v| v == 2.0,
    );
    prom.wait_for(
        "sum(orchestrator_agent_activation_duration_seconds_count)",
        "the demo service's activation hook timed on both nodes",
        |v| v >= 2.0,
    );
    prom.wait_for(
        r#"sum(orchestrator_agent_health_probes_total{result="healthy"})"#,
        "the health gate's probes counted",
        |v| v >= 2.0,
    );
    prom.wait_for(
        r#"count(orchestrator_agent_release_info{version="4.2.1"})"#,
        "both agents report 4.2.1 running",
        |v| v == 2.0,
    );
    prom.wait_for(
        "sum(orchestrator_agent_fence_refusals_total)",
        "no fence refusal in a healthy rollout",
        |v| v == 0.0,
    );
}

#[test]
fn the_agent_endpoint_serves_metrics_to_viewers_or_anyone_when_public() {
    let c = Cluster::start(
        ClusterOpts::state_only(1, 2)
            .mtls()
            .agent_args(1, &["--http-listen", "127.0.0.1:0"])
            .agent_args(
                2,
                &["--http-listen", "127.0.0.1:0", "--http-public-metrics"],
            ),
    );
    let agents = agent_http_addrs(&c);
    let viewer = party(&c, &format!("viewer-{VIEWER}"));
    let other_agent = party(&c, "agent-n2");
    let (private, public) = (&agents[0], &agents[1]);

    let (code, body) = https("GET", private, "/metrics", &viewer.ca, None);
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("--role viewer"), "{body}");
    let (code, body) = get(private, "/metrics", &other_agent);
    assert_eq!(code, 403, "{body}");
    let (code, body) = get(private, "/metrics", &viewer);
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains(r#"orchestrator_agent_release_info{version="4.2.0",permanent="true"} 1"#),
        "{body}"
    );
    let (code, body) = get(private, "/healthz", &viewer);
    assert_eq!((code, json(&body)["node"].clone()), (200, "n1".into()));

    for path in ["/metrics", "/healthz"] {
        let (code, body) = https("GET", public, path, &viewer.ca, None);
        assert_eq!(code, 200, "{path}: {body}");
    }
    let (code, body) = https("GET", public, "/api/v1/nodes", &viewer.ca, None);
    assert_eq!(code, 401, "only /metrics and /healthz are public: {body}");
    let (code, body) = get(public, "/nope", &viewer);
    assert_eq!(code, 404, "{body}");
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

/// The services a reflection endpoint lists, asked over `version` ("v1" or "v1alpha").
async fn reflected(channel: tonic::transport::Channel, version: &str) -> Vec<String> {
    use tokio_stream::StreamExt;
    use tonic_reflection::pb::{v1, v1alpha};
    if version == "v1" {
        use v1::server_reflection_request::MessageRequest;
        use v1::server_reflection_response::MessageResponse;
        let req = v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel);
        let mut replies = client
            .server_reflection_info(tokio_stream::iter([req]))
            .await
            .expect("v1 reflection call")
            .into_inner();
        match replies
            .next()
            .await
            .expect("a reply")
            .expect("v1 reply")
            .message_response
        {
            Some(MessageResponse::ListServicesResponse(l)) => {
                l.service.into_iter().map(|s| s.name).collect()
            }
            other => panic!("v1 reflection answered {other:?}"),
        }
    } else {
        use v1alpha::server_reflection_request::MessageRequest;
        use v1alpha::server_reflection_response::MessageResponse;
        let req = v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
        let mut replies = client
            .server_reflection_info(tokio_stream::iter([req]))
            .await
            .expect("v1alpha reflection call")
            .into_inner();
        match replies
            .next()
            .await
            .expect("a reply")
            .expect("v1alpha reply")
            .message_response
        {
            Some(MessageResponse::ListServicesResponse(l)) => {
                l.service.into_iter().map(|s| s.name).collect()
            }
            other => panic!("v1alpha reflection answered {other:?}"),
        }
    }
}

#[test]
fn grpc_reflection_lists_what_each_daemon_serves_in_v1_and_v1alpha() {
    use orch_tls::Role;
    let c = Cluster::start(ClusterOpts::state_only(1, 1).mtls());
    let certs = c.certs.as_ref().expect("mTLS cluster");
    let viewer = certs.security(Role::Viewer, VIEWER);
    let reflection = [
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let mut coordinator: Vec<String> = [
        "orchestrator.control.v1.Control",
        "orchestrator.raft.v1.RaftPeer",
        "orchestrator.raft.v1.Blobs",
    ]
    .into_iter()
    .chain(reflection)
    .map(String::from)
    .collect();
    coordinator.sort();
    let mut agent: Vec<String> = ["orchestrator.agent.v1.Agent"]
        .into_iter()
        .chain(reflection)
        .map(String::from)
        .collect();
    agent.sort();
    let rt = orch_tests::rt();
    rt.block_on(async {
        let coord_domain = orch_tls::party_domain(Role::Coordinator, "1");
        let agent_domain = orch_tls::party_domain(Role::Agent, "n1");
        for version in ["v1", "v1alpha"] {
            let ch = orch_tests::channel_as(&c.coords[0].addr, &viewer, &coord_domain).await;
            assert_eq!(
                sorted(reflected(ch, version).await),
                coordinator,
                "{version}"
            );
            let ch = orch_tests::channel_as(&c.nodes[0].agent().addr, &viewer, &agent_domain).await;
            assert_eq!(sorted(reflected(ch, version).await), agent, "{version}");
        }
    });
}
