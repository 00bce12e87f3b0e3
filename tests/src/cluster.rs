//! Harness for cluster scenarios: real `orchestrator coordinator` processes, nodes (a root, a
//! release store on 4.2.0, optionally the hot-swappable demo service) each with a real
//! `orchestrator agent` registered with the coordinators, and the cluster CLI pointed at them.
//!
//! Everything started here is killed when its guard drops, also during a panic: coordinators and
//! agents by pid ([`CoordProc`], [`crate::AgentProc`]), demo services (detached, re-exec'd on every
//! hot swap) by the demo-service crate's [`Reaper`], background CLI runs by [`BgCmd`]. Every wait
//! is a bounded poll.
//!
//! The demo-service binary copied into each demo package is stripped first (into the cluster's
//! temp dir, when `strip` exists): a debug build is ~70 MB, which would make every package,
//! upload, push and unpack slow without testing anything more.

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use orch_client::{Client, control as pb};
use orch_demo_service::fixture::Reaper;
use orch_demo_service::load::{Load, LoadConfig, LoadReport};
use serde_json::Value;

use orch_tls::{Role, Security};

use crate::{
    AgentProc, CLI_TIMEOUT, OPERATOR, PkgSpec, TestCerts, built_bin, free_port, local_ok, orch_cmd,
    read_or_empty, run_bounded, stderr, stdout, tls_flags, wait_child, wait_until,
};

/// The version every node starts on.
pub const V0: &str = "4.2.0";
/// The version rolled out.
pub const V1: &str = "4.2.1";

/// How long a cluster may take to elect a leader and register its agents.
pub const FORM_TIMEOUT: Duration = Duration::from_secs(30);

/// Milliseconds since the epoch (the clock coordinators stamp events with; same machine).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn log_filter() -> &'static str {
    "info,openraft=warn,h2=warn,tower=warn,hyper=warn,tonic=warn"
}

// ---------------------------------------------------------------------------------------------
// Coordinator processes

/// A running `orchestrator coordinator` process; SIGKILLed and reaped on drop. It can be killed
/// and started again with the same arguments and data directory.
pub struct CoordProc {
    pub id: u64,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    pub data_dir: PathBuf,
    /// stdout+stderr of every incarnation, appended.
    pub log_path: PathBuf,
    args: Vec<String>,
    log_filter: String,
    child: Option<Child>,
}

/// Starts `n` coordinators on free loopback ports under `dir` (`coordinatorN/` data, logs
/// `coordinatorN.log`), each with every other as `--peer`, the first with `--bootstrap`.
/// `log_filter` is their `ORCH_LOG`. Does not wait for a leader.
pub fn spawn_coordinators(dir: &Path, n: usize, log_filter: &str) -> Vec<CoordProc> {
    spawn_coordinators_with(dir, n, log_filter, None, &[])
}

/// [`spawn_coordinators`] under mutual TLS (each with its `coordinator-<id>` folder of
/// `certs`) when `certs` is given, else `--insecure`, with `extra` arguments for every
/// coordinator.
pub fn spawn_coordinators_with(
    dir: &Path,
    n: usize,
    log_filter: &str,
    certs: Option<&TestCerts>,
    extra: &[String],
) -> Vec<CoordProc> {
    let addrs: Vec<String> = (0..n)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let mut out = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let id = (i + 1) as u64;
        let data_dir = dir.join(format!("coordinator{id}"));
        let mut args = vec![
            "--id".to_string(),
            id.to_string(),
            "--listen".into(),
            addr.clone(),
            "--data-dir".into(),
            data_dir.display().to_string(),
        ];
        args.extend(tls_flags(certs, Role::Coordinator, &id.to_string()));
        for (j, peer) in addrs.iter().enumerate() {
            if j != i {
                args.push("--peer".into());
                args.push(format!("{}={peer}", j + 1));
            }
        }
        if id == 1 {
            args.push("--bootstrap".into());
        }
        args.extend(extra.iter().cloned());
        let mut p = CoordProc {
            id,
            addr: addr.clone(),
            data_dir,
            log_path: dir.join(format!("coordinator{id}.log")),
            args,
            log_filter: log_filter.to_string(),
            child: None,
        };
        p.launch();
        out.push(p);
    }
    out
}

impl CoordProc {
    fn launch(&mut self) {
        assert!(self.child.is_none(), "coordinator {} already runs", self.id);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        let mut cmd = orch_cmd(&["coordinator"]);
        cmd.args(&self.args)
            .env_remove("ORCHESTRATOR_COORDINATORS")
            .env("ORCH_LOG", &self.log_filter)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.child = Some(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("start coordinator {}: {e}", self.id)),
        );
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => c.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `sig` (e.g. `libc::SIGSTOP` to freeze it, `libc::SIGCONT` to thaw it).
    pub fn signal(&self, sig: libc::c_int) {
        let pid = self.pid().expect("coordinator not running") as libc::pid_t;
        // SAFETY: kill(2) on our own child, not reaped yet (we hold the Child).
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig})");
    }

    /// SIGKILL and reap (no-op when not running).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops it as systemd would: SIGTERM, then waits (bounded) until it has exited, so its
    /// data directory is closed (SIGKILL if it does not stop within 30 s).
    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        // SAFETY: kill(2) on our own child, not reaped yet (we hold the Child).
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while c.try_wait().expect("try_wait").is_none() {
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "coordinator {} did not stop on SIGTERM within 30 s",
                    self.id
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Uses `dir` as its `--data-dir` from the next start on (a restored copy).
    pub fn set_data_dir(&mut self, dir: &Path) {
        let at = self
            .args
            .iter()
            .position(|a| a == "--data-dir")
            .expect("a --data-dir argument");
        self.args[at + 1] = dir.display().to_string();
        self.data_dir = dir.to_path_buf();
    }

    /// Starts it again: the same binary, arguments and data directory.
    pub fn restart(&mut self) {
        self.kill9();
        self.launch();
    }

    pub fn log(&self) -> String {
        read_or_empty(&self.log_path)
    }
}

impl Drop for CoordProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

// ---------------------------------------------------------------------------------------------
// Nodes

/// One node: a root directory with a release store, the demo service (demo nodes) and an agent.
pub struct Node {
    /// `n1`, `n2`, ...
    pub id: String,
    pub root: PathBuf,
    /// Where the demo service listens (demo nodes only).
    pub service: Option<SocketAddr>,
    pub agent: Option<AgentProc>,
    agent_args: Vec<String>,
    certs: Option<TestCerts>,
    // Dropped after the agent: kills every demo-service process of the root.
    _reaper: Option<Reaper>,
}

impl Node {
    /// The agent's audit log (`ROOT/agent/audit.log`: one line per new fence).
    pub fn audit(&self) -> String {
        read_or_empty(&self.root.join("agent").join("audit.log"))
    }

    /// Audit lines containing `what` (e.g. `" install 4.2.1"`).
    pub fn audit_count(&self, what: &str) -> usize {
        self.audit().lines().filter(|l| l.contains(what)).count()
    }

    /// `(version, pid)` from the demo service's `/health` (any status), if it answers.
    pub fn health(&self) -> Option<(String, u32)> {
        health_of(self.service?)
    }

    pub fn agent(&self) -> &AgentProc {
        self.agent.as_ref().expect("the agent is not running")
    }

    /// SIGKILLs the agent.
    pub fn kill_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.kill9();
        }
    }

    /// Starts the agent again with the same arguments (on a new port; it re-registers).
    pub fn restart_agent(&mut self) {
        self.kill_agent();
        let args: Vec<&str> = self.agent_args.iter().map(String::as_str).collect();
        self.agent = Some(AgentProc::start_with(
            &self.id,
            &self.root,
            &args,
            &[("ORCH_LOG", log_filter())],
            self.certs.as_ref(),
        ));
    }
}

/// `GET /health` with a short timeout: `(version, pid)` from its JSON body, whatever the status.
pub fn health_of(addr: SocketAddr) -> Option<(String, u32)> {
    // Generous: a miss must mean the service did not answer, not that the machine is busy.
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf);
    let body = text.split_once("\r\n\r\n")?.1;
    let v: Value = serde_json::from_str(body.trim()).ok()?;
    Some((
        v.get("version")?.as_str()?.to_string(),
        v.get("pid")?.as_u64()? as u32,
    ))
}

// ---------------------------------------------------------------------------------------------
// The cluster

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterOpts {
    pub coordinators: usize,
    pub nodes: usize,
    /// Demo-service nodes (a real hot-swapped service, health by URL); else state-only nodes
    /// (a package without hook: an install only switches the store's state; health from the
    /// store's view).
    pub demo: bool,
    /// Extra agent arguments for node `i` (1-based).
    pub agent_extra: Vec<(usize, Vec<String>)>,
    /// Extra arguments for every coordinator.
    pub coordinator_extra: Vec<String>,
    /// Mutual TLS everywhere (certificates made per cluster; the CLI acts as operator
    /// `alice`); else every party runs `--insecure` on loopback.
    pub mtls: bool,
}

impl ClusterOpts {
    pub fn demo(coordinators: usize, nodes: usize) -> Self {
        ClusterOpts {
            coordinators,
            nodes,
            demo: true,
            agent_extra: Vec::new(),
            coordinator_extra: Vec::new(),
            mtls: false,
        }
    }

    pub fn state_only(coordinators: usize, nodes: usize) -> Self {
        ClusterOpts {
            demo: false,
            ..Self::demo(coordinators, nodes)
        }
    }

    /// The same cluster under mutual TLS.
    pub fn mtls(mut self) -> Self {
        self.mtls = true;
        self
    }

    /// Extra arguments for node `i`'s agent (1-based).
    pub fn agent_args(mut self, i: usize, args: &[&str]) -> Self {
        self.agent_extra
            .push((i, args.iter().map(|s| s.to_string()).collect()));
        self
    }

    /// Extra arguments for every coordinator.
    pub fn coordinator_args(mut self, args: &[&str]) -> Self {
        self.coordinator_extra
            .extend(args.iter().map(|s| s.to_string()));
        self
    }
}

/// A running cluster. Drop order: nodes (agents, then their services), coordinators, the
/// temp dir.
pub struct Cluster {
    pub nodes: Vec<Node>,
    pub coords: Vec<CoordProc>,
    /// Packages built for this cluster.
    pub pkgs: PathBuf,
    demo: bool,
    demo_bin: Option<PathBuf>,
    /// The cluster's certificates under mutual TLS.
    pub certs: Option<TestCerts>,
    pub dir: tempfile::TempDir,
}

impl Cluster {
    /// Builds the 4.2.0 package, sets up every node on 4.2.0 (demo nodes: the install hook
    /// starts the service), starts the coordinators (the first with `--bootstrap`), waits for a
    /// leader, starts the agents and waits until every node is registered.
    pub fn start(opts: ClusterOpts) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("orch-rollout-")
            .tempdir()
            .unwrap();
        let pkgs = dir.path().join("pkgs");
        fs::create_dir_all(&pkgs).unwrap();
        let mut c = Cluster {
            nodes: Vec::new(),
            coords: Vec::new(),
            pkgs,
            demo: opts.demo,
            demo_bin: None,
            certs: None,
            dir,
        };
        if opts.mtls {
            let agents: Vec<String> = (1..=opts.nodes).map(|i| format!("n{i}")).collect();
            let agents: Vec<&str> = agents.iter().map(String::as_str).collect();
            c.certs = Some(TestCerts::init(
                &c.dir.path().join("certs"),
                opts.coordinators as u32,
                &agents,
            ));
        }
        if opts.demo {
            c.demo_bin = Some(stripped_demo_service(c.dir.path()));
        }
        let pkg0 = c.package(V0, false);

        c.coords = spawn_coordinators_with(
            c.dir.path(),
            opts.coordinators,
            log_filter(),
            c.certs.as_ref(),
            &opts.coordinator_extra,
        );
        let addrs = c.addrs();

        // Nodes on 4.2.0 while the coordinators elect a leader.
        for i in 1..=opts.nodes {
            c.add_node(i, opts.demo, &pkg0);
        }
        c.wait_for_leader(FORM_TIMEOUT);

        for i in 1..=opts.nodes {
            c.start_agent(i, &opts, &addrs);
        }
        let n = opts.nodes;
        c.wait_for(FORM_TIMEOUT, "every agent registered on 4.2.0", |c| {
            c.ctl_nodes().is_some_and(|nodes| {
                nodes.len() == n
                    && nodes.iter().all(|e| {
                        e.versions
                            .iter()
                            .any(|v| v.version == V0 && v.state == "permanent")
                    })
            })
        });
        c
    }

    /// Node `i` (1-based): its root with 4.2.0 installed from `pkg0` (a demo node's hook
    /// starts its service on a free port, waited for).
    fn add_node(&mut self, i: usize, demo: bool, pkg0: &Path) {
        let id = format!("n{i}");
        let root = self.dir.path().join(format!("node{i}"));
        fs::create_dir_all(&root).unwrap();
        let mut node = Node {
            id: id.clone(),
            root: root.clone(),
            service: None,
            agent: None,
            agent_args: Vec::new(),
            certs: self.certs.clone(),
            _reaper: None,
        };
        if demo {
            node._reaper = Some(Reaper::new(&root));
            let svc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            fs::write(
                root.join("demo-service.toml"),
                format!("listen = \"{svc}\"\n"),
            )
            .unwrap();
            node.service = Some(svc);
        }
        self.nodes.push(node);
        local_ok(
            &root,
            &["install", "--package", &pkg0.display().to_string()],
        );
        if let Some(svc) = self.nodes[i - 1].service {
            wait_until(Duration::from_secs(15), "the demo service on 4.2.0", || {
                health_of(svc).is_some_and(|(v, _)| v == V0)
            });
        }
    }

    /// Starts node `i`'s agent, registered with the coordinators at `addrs`.
    fn start_agent(&mut self, i: usize, opts: &ClusterOpts, addrs: &[String]) {
        let mut args: Vec<String> = Vec::new();
        for a in addrs {
            args.push("--coordinator".into());
            args.push(a.clone());
        }
        if let Some(svc) = self.nodes[i - 1].service {
            args.push("--health-url".into());
            args.push(format!("http://{svc}/health"));
        }
        for (n, extra) in &opts.agent_extra {
            if *n == i {
                args.extend(extra.iter().cloned());
            }
        }
        self.nodes[i - 1].agent_args = args;
        self.nodes[i - 1].restart_agent();
    }

    /// `DIR/pkgs/{ok,broken}/<name>-VERSION.zip`, built on first use: the demo service
    /// (`orchestrator demo package`, `--broken` on request) for demo clusters, else a package
    /// without hook.
    pub fn package(&self, version: &str, broken: bool) -> PathBuf {
        let out = self.pkgs.join(if broken { "broken" } else { "ok" });
        if self.demo {
            self.demo_package(&out, version, if broken { &["--broken"] } else { &[] })
        } else {
            assert!(!broken, "state-only packages cannot be broken");
            let zip = out.join(format!("app-{version}.zip"));
            if !zip.is_file() {
                PkgSpec {
                    name: "app".into(),
                    version: version.into(),
                    payload: format!("app {version}\n"),
                    hook: None,
                }
                .build(self.dir.path(), &out);
            }
            zip
        }
    }

    /// `DIR/pkgs/errors-P/demo-service-VERSION.zip`: a demo-service release whose `/` answers
    /// 500 for `percent`% of its requests while its health check passes (demo clusters only).
    pub fn package_with_errors(&self, version: &str, percent: u32) -> PathBuf {
        assert!(self.demo, "only demo-service packages can fail requests");
        let out = self.pkgs.join(format!("errors-{percent}"));
        self.demo_package(&out, version, &["--error-percent", &percent.to_string()])
    }

    /// `orchestrator demo package VERSION --out OUT EXTRA...`, unless built already.
    fn demo_package(&self, out: &Path, version: &str, extra: &[&str]) -> PathBuf {
        let zip = out.join(format!("demo-service-{version}.zip"));
        if !zip.is_file() {
            let mut cmd = orch_cmd(&["demo", "package", version, "--out"]);
            cmd.arg(out).args(extra);
            if let Some(bin) = &self.demo_bin {
                cmd.env("ORCH_DEMO_SERVICE_BIN", bin);
            }
            let o = run_bounded(cmd, CLI_TIMEOUT);
            assert!(
                o.status.success() && zip.is_file(),
                "demo package {version} {extra:?} failed: {} {}",
                stdout(&o),
                stderr(&o)
            );
        }
        zip
    }

    /// Every coordinator address (also the dead ones: the CLI must cope).
    pub fn addrs(&self) -> Vec<String> {
        self.coords.iter().map(|c| c.addr.clone()).collect()
    }

    pub fn coord(&mut self, id: u64) -> &mut CoordProc {
        self.coords
            .iter_mut()
            .find(|c| c.id == id)
            .unwrap_or_else(|| panic!("no coordinator {id}"))
    }

    pub fn node(&self, id: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    pub fn node_mut(&mut self, id: &str) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    /// Demo services' addresses, in node order.
    pub fn services(&self) -> Vec<SocketAddr> {
        self.nodes.iter().filter_map(|n| n.service).collect()
    }

    /// Every coordinator's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for c in &self.coords {
            let log = c.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            s.push_str(&format!("--- coordinator {} (last 40 lines)\n", c.id));
            for l in tail.into_iter().rev() {
                s.push_str(l);
                s.push('\n');
            }
        }
        for n in &self.nodes {
            if let Some(a) = &n.agent {
                let log = a.log();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                s.push_str(&format!("--- agent {} (last 15 lines)\n", n.id));
                for l in tail.into_iter().rev() {
                    s.push_str(l);
                    s.push('\n');
                }
            }
        }
        s
    }

    // -- the CLI --------------------------------------------------------------------------

    /// `orchestrator ARGS --coordinator A,B,C --insecure` (or `--tls-dir` the operator's
    /// folder under mTLS).
    pub fn cli_cmd(&self, args: &[&str]) -> Command {
        self.cli_cmd_via(&self.addrs(), args)
    }

    /// `orchestrator ARGS --coordinator ADDRS --insecure`.
    pub fn cli_cmd_via(&self, addrs: &[String], args: &[&str]) -> Command {
        let mut cmd = orch_cmd(args);
        cmd.arg("--coordinator")
            .arg(addrs.join(","))
            .args(tls_flags(self.certs.as_ref(), Role::Operator, OPERATOR))
            .env_remove("ORCHESTRATOR_COORDINATORS")
            .env_remove("ORCHESTRATOR_TLS_DIR");
        cmd
    }

    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        run_bounded(self.cli_cmd(args), CLI_TIMEOUT)
    }

    /// Runs the CLI, asserting exit 0; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "orchestrator {args:?} failed ({}): stdout {:?} stderr {:?}\n{}",
            o.status,
            stdout(&o),
            stderr(&o),
            self.logs()
        );
        stdout(&o)
    }

    /// Runs the CLI (which must print JSON), asserting exit 0.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let out = self.cli_ok(args);
        serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {out:?}"))
    }

    /// `status [ID] --json`.
    pub fn status_json(&self, id: &str) -> Value {
        if id.is_empty() {
            self.cli_json(&["status", "--json"])
        } else {
            self.cli_json(&["status", id, "--json"])
        }
    }

    /// `nodes --json`.
    pub fn nodes_json(&self) -> Value {
        self.cli_json(&["nodes", "--json"])
    }

    /// Starts `orchestrator ARGS --coordinator A,B,C --insecure` in the background.
    pub fn spawn_cli(&self, args: &[&str]) -> BgCmd {
        BgCmd::spawn(self.cli_cmd(args), self.dir.path())
    }

    // -- in-process client, for cheap polling ---------------------------------------------

    fn with_client<T>(
        &self,
        addrs: Vec<String>,
        f: impl AsyncFnOnce(&mut Client) -> orch_client::Result<T>,
    ) -> Option<T> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let security = match &self.certs {
                None => Security::Insecure,
                Some(certs) => certs.security(Role::Operator, OPERATOR),
            };
            let mut c = Client::new(addrs, security);
            c.patience = Duration::from_secs(2);
            tokio::time::timeout(Duration::from_secs(5), f(&mut c))
                .await
                .ok()?
                .ok()
        })
    }

    /// A rollout's status (empty id: the running one, else the latest), through any
    /// coordinator; `None` when none answers.
    pub fn ctl_status(&self, id: &str) -> Option<pb::RolloutStatus> {
        let id = id.to_string();
        self.with_client(self.addrs(), async move |c| c.rollout(&id).await)
    }

    /// The same, answered by one coordinator only, from its own replicated state (a stale
    /// read: also without a leader, and without redirecting to one).
    pub fn ctl_status_via(&self, addr: &str, id: &str) -> Option<pb::RolloutStatus> {
        let id = id.to_string();
        self.with_client(vec![addr.to_string()], async move |c| {
            c.allow_stale(true);
            c.rollout(&id).await
        })
    }

    pub fn ctl_nodes(&self) -> Option<Vec<pb::NodeEntry>> {
        self.with_client(self.addrs(), async |c| c.nodes(false).await)
    }

    /// `ClusterStatus` as one coordinator sees it.
    pub fn ctl_cluster_via(&self, addr: &str) -> Option<pb::ClusterStatusReply> {
        self.with_client(vec![addr.to_string()], async |c| c.cluster_status().await)
    }

    /// The leader id that the running coordinators agree on, if any.
    pub fn leader(&mut self) -> Option<u64> {
        let live: Vec<String> = self
            .coords
            .iter_mut()
            .filter_map(|c| c.is_running().then(|| c.addr.clone()))
            .collect();
        let mut ids = Vec::new();
        for a in &live {
            let s = self.ctl_cluster_via(a)?;
            if s.leader_id == 0 {
                return None;
            }
            ids.push(s.leader_id);
        }
        ids.dedup();
        (ids.len() == 1 && self.coords.iter().any(|c| c.id == ids[0])).then(|| ids[0])
    }

    /// Waits (bounded) until the running coordinators agree on a live leader; returns its id.
    pub fn wait_for_leader(&mut self, timeout: Duration) -> u64 {
        let start = Instant::now();
        loop {
            if let Some(id) = self.leader()
                && self.coord(id).is_running()
            {
                return id;
            }
            assert!(
                start.elapsed() < timeout,
                "no leader within {timeout:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls `f` every 50 ms; panics naming `what` (with the logs) after `timeout`.
    pub fn wait_for(&self, timeout: Duration, what: &str, mut f: impl FnMut(&Cluster) -> bool) {
        let start = Instant::now();
        loop {
            if f(self) {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}\nstatus: {:?}\n{}",
                self.ctl_status(""),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the rollout's status satisfies `pred`; returns that status.
    pub fn wait_rollout(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&pb::RolloutStatus) -> bool,
    ) -> pb::RolloutStatus {
        let mut hit = None;
        self.wait_for(timeout, what, |c| match c.ctl_status("") {
            Some(s) if pred(&s) => {
                hit = Some(s);
                true
            }
            _ => false,
        });
        hit.unwrap()
    }
}

/// The step of `node` in a status.
pub fn step_of<'a>(s: &'a pb::RolloutStatus, node: &str) -> &'a str {
    s.nodes
        .iter()
        .find(|n| n.id == node)
        .map(|n| n.step.as_str())
        .unwrap_or("")
}

/// `status --json`'s `events[].message`.
pub fn event_messages(status: &Value) -> Vec<String> {
    status["events"]
        .as_array()
        .expect("status has events")
        .iter()
        .map(|e| e["message"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// How many event messages contain `needle`.
pub fn count_events(status: &Value, needle: &str) -> usize {
    event_messages(status)
        .iter()
        .filter(|m| m.contains(needle))
        .count()
}

/// Index of the first event containing `needle`.
pub fn event_index(status: &Value, needle: &str) -> Option<usize> {
    event_messages(status)
        .iter()
        .position(|m| m.contains(needle))
}

/// `(version, state)` pairs of one node in `nodes --json`.
pub fn node_versions(nodes: &Value, id: &str) -> Vec<(String, String)> {
    node_entry(nodes, id)["versions"]
        .as_array()
        .expect("versions array")
        .iter()
        .map(|v| {
            (
                v["version"].as_str().unwrap().to_string(),
                v["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

pub fn node_entry<'a>(nodes: &'a Value, id: &str) -> &'a Value {
    nodes
        .as_array()
        .expect("nodes --json is an array")
        .iter()
        .find(|n| n["id"] == id)
        .unwrap_or_else(|| panic!("node {id} missing from {nodes}"))
}

/// The `step` of a node in `status --json`.
pub fn json_step<'a>(status: &'a Value, id: &str) -> &'a str {
    status["nodes"]
        .as_array()
        .expect("status nodes")
        .iter()
        .find(|n| n["id"] == id)
        .and_then(|n| n["step"].as_str())
        .unwrap_or_else(|| panic!("node {id} missing from {status}"))
}

// ---------------------------------------------------------------------------------------------
// Background CLI runs

/// A CLI process running in the background (e.g. a waiting `rollout`), output to files;
/// SIGKILLed on drop.
pub struct BgCmd {
    child: Option<Child>,
    out: PathBuf,
    err: PathBuf,
    pub started: Instant,
}

/// How a background command ended.
#[derive(Debug)]
pub struct BgOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl BgCmd {
    pub fn spawn(mut cmd: Command, dir: &Path) -> BgCmd {
        let n = fastrand::u64(..);
        let out = dir.join(format!("bg-{n}.out"));
        let err = dir.join(format!("bg-{n}.err"));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out).unwrap())
            .stderr(fs::File::create(&err).unwrap())
            .spawn()
            .expect("spawn background CLI");
        BgCmd {
            child: Some(child),
            out,
            err,
            started: Instant::now(),
        }
    }

    pub fn stdout(&self) -> String {
        read_or_empty(&self.out)
    }

    /// Its process id (to signal it).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("already waited").id()
    }

    /// What it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        read_or_empty(&self.err)
    }

    /// Whether it has exited.
    pub fn try_done(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| c.try_wait().ok().flatten().is_some())
    }

    /// Waits at most `timeout` for it to exit; `None` (still running) after that.
    pub fn wait_within(&mut self, timeout: Duration) -> Option<BgOutput> {
        let child = self.child.as_mut().expect("already waited");
        let status = wait_child(child, timeout)?;
        self.child = None;
        Some(BgOutput {
            status,
            stdout: read_or_empty(&self.out),
            stderr: read_or_empty(&self.err),
            elapsed: self.started.elapsed(),
        })
    }

    /// Waits for it to exit (panics after `timeout`, killing it).
    pub fn wait(&mut self, timeout: Duration) -> BgOutput {
        let mut child = self.child.take().expect("already waited");
        let Some(status) = wait_child(&mut child, timeout) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "background command did not finish within {timeout:?}; stdout so far:\n{}\nstderr:\n{}",
                read_or_empty(&self.out),
                read_or_empty(&self.err)
            );
        };
        BgOutput {
            status,
            stdout: read_or_empty(&self.out),
            stderr: read_or_empty(&self.err),
            elapsed: self.started.elapsed(),
        }
    }
}

impl Drop for BgCmd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Watching the services

/// Per service, the distinct `(version, pid)` seen.
type Seen = Vec<Vec<(String, u32)>>;

/// Polls every demo service's `/health` every ~25 ms in a thread and records each
/// `(version, pid)` it has seen, per service, in first-seen order.
pub struct HealthWatch {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
    misses: Arc<Mutex<Vec<u64>>>,
    thread: Option<JoinHandle<()>>,
}

impl HealthWatch {
    pub fn start(services: Vec<SocketAddr>) -> HealthWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(vec![Vec::new(); services.len()]));
        let misses = Arc::new(Mutex::new(vec![0; services.len()]));
        let (s, seen2, miss2) = (stop.clone(), seen.clone(), misses.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                for (i, a) in services.iter().enumerate() {
                    match health_of(*a) {
                        Some(vp) => {
                            let mut g = seen2.lock().unwrap();
                            if !g[i].contains(&vp) {
                                g[i].push(vp);
                            }
                        }
                        None => miss2.lock().unwrap()[i] += 1,
                    }
                }
                std::thread::sleep(Duration::from_millis(25));
            }
        });
        HealthWatch {
            stop,
            seen,
            misses,
            thread: Some(thread),
        }
    }

    /// Stops polling; returns, per service, the distinct `(version, pid)` seen in first-seen
    /// order, and how many probes got no answer.
    pub fn stop(mut self) -> (Seen, Vec<u64>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (
            self.seen.lock().unwrap().clone(),
            self.misses.lock().unwrap().clone(),
        )
    }
}

impl Drop for HealthWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A light client load (orch_demo_service::load) on every service, on its own runtime.
pub struct ServiceLoad {
    rt: tokio::runtime::Runtime,
    loads: Vec<Load>,
}

impl ServiceLoad {
    pub fn start(services: &[SocketAddr]) -> ServiceLoad {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let loads = {
            let _g = rt.enter();
            services
                .iter()
                .map(|a| {
                    let mut cfg = LoadConfig::new(*a);
                    cfg.keepalive_clients = 2;
                    cfg.fresh_clients = 2;
                    cfg.keepalive_pause = Duration::from_millis(5);
                    cfg.fresh_pause = Duration::from_millis(5);
                    Load::start(cfg)
                })
                .collect()
        };
        ServiceLoad { rt, loads }
    }

    /// Stops the clients; one report per service.
    pub fn stop(self) -> Vec<LoadReport> {
        let ServiceLoad { rt, loads } = self;
        rt.block_on(async {
            let mut out = Vec::new();
            for l in loads {
                out.push(l.stop().await);
            }
            out
        })
    }
}

/// A copy of the demo-service binary without symbols (the original when `strip` fails).
fn stripped_demo_service(dir: &Path) -> PathBuf {
    let src = built_bin("demo-service");
    let bin_dir = dir.join("bin");
    fs::create_dir_all(&bin_dir).unwrap();
    let dst = bin_dir.join("demo-service");
    fs::copy(&src, &dst).unwrap();
    let stripped = Command::new("strip")
        .arg(&dst)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if stripped { dst } else { src }
}

/// SIGCONTs a stopped process when dropped (also on panic), so a failing test leaves nothing
/// frozen.
pub struct Thaw(pub i32);

impl Drop for Thaw {
    fn drop(&mut self) {
        // SAFETY: kill(2) with a pid the test stopped; at worst the process is gone (ESRCH).
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// The phase of rollout `id` as the coordinators answer now ("" when none answers).
pub fn rollout_phase(c: &Cluster, id: &str) -> String {
    c.ctl_status(id).map(|s| s.phase).unwrap_or_default()
}
