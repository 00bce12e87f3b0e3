//! Container test bed: the project's own image (built here by `deploy/image/build.sh`, FROM
//! scratch: nothing is pulled), on private Docker networks, with 3 coordinators and N agents,
//! each with its own address, file system and mutual-TLS identity, each agent running the demo
//! service. Faults go through the engine: kill and start, pause and unpause (a hung machine),
//! disconnect and connect (a partition), a small tmpfs as a node's disk.
//!
//! Two networks, so that a coordinator can be cut from its peers while it still reaches the
//! agents (an asymmetric partition):
//! - `<bed>-raft`: coordinators only, as `c1-raft`, `c2-raft`, ...: the Raft peers' addresses
//!   (and the address each coordinator advertises, so leader redirects name it);
//! - `<bed>-nodes`: coordinators as `c1`, `c2`, ... (what agents register with), agents as
//!   `n1`, `n2`, ... (what coordinators dial), and a long-lived CLI container, which is on both
//!   networks and runs every `orchestrator` command of a test (`docker exec`).
//!
//! Everything a bed creates (containers, networks, volumes) carries its name and is removed
//! when the bed drops, also on panic. A test that needs Docker calls [`docker_or_skip`] first:
//! without Docker it prints a loud, counted SKIPPED line and returns.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{run_bounded, stderr, stdout};

/// The image tag tests use unless `ORCH_TEST_IMAGE` names another (built once per test
/// process): two checkouts testing at once on one engine must not overwrite each other's image.
pub const DEFAULT_IMAGE: &str = "orchestrator:test";
/// How long one `docker` command may take.
const DOCKER_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a CLI command may take (a waiting `rollout` included).
pub const CLI_TIMEOUT: Duration = Duration::from_secs(240);

/// True when Docker Engine answers. Otherwise prints a loud SKIPPED line naming `test` (CI
/// greps and counts them) and returns false: the caller returns at once.
pub fn docker_or_skip(test: &str) -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    // ORCH_SKIP_CONTAINERS=1 lets a developer run the rest of the suite quickly; CI never sets it.
    if std::env::var_os("ORCH_SKIP_CONTAINERS").is_some_and(|v| v == "1") {
        eprintln!("!!!!!!!! SKIPPED container test {test}: ORCH_SKIP_CONTAINERS=1 !!!!!!!!");
        return false;
    }
    let ok = *OK.get_or_init(|| {
        Command::new("docker")
            .args(["info", "--format", "{{.ServerVersion}}"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !ok {
        eprintln!(
            "!!!!!!!! SKIPPED container test {test}: Docker Engine is not available here !!!!!!!!"
        );
    }
    ok
}

/// The image tag: `ORCH_TEST_IMAGE`, else [`DEFAULT_IMAGE`].
pub fn image_tag() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| {
        std::env::var("ORCH_TEST_IMAGE")
            .ok()
            .filter(|t| !t.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_IMAGE.to_string())
    })
}

/// Builds [`image_tag`] from this checkout's debug build, once per process; with
/// `ORCH_TEST_IMAGE_BUILT=1` the image is used as it is (a long soak built it first and may
/// outlive this checkout's build).
pub fn image() -> &'static str {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        if std::env::var_os("ORCH_TEST_IMAGE_BUILT").is_some_and(|v| v == "1") {
            return;
        }
        // The workspace root is this crate's parent (the target dir may be elsewhere:
        // CARGO_TARGET_DIR); build.sh finds the binaries through CARGO_TARGET_DIR too.
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .map(PathBuf::from)
            .expect("workspace root");
        let mut cmd = Command::new(root.join("deploy/image/build.sh"));
        let target = crate::target_dir();
        cmd.env("PROFILE", "dev")
            .env("TAG", image_tag())
            .env("CARGO_TARGET_DIR", target.parent().unwrap_or(&target))
            .current_dir(&root);
        let o = run_bounded(cmd, Duration::from_secs(1200));
        assert!(
            o.status.success(),
            "building the image failed: {}\n{}",
            stdout(&o),
            stderr(&o)
        );
    });
    image_tag()
}

/// Runs `docker ARGS`, bounded; returns its output whatever the exit status.
pub fn docker(args: &[&str]) -> Output {
    let mut cmd = Command::new("docker");
    cmd.args(args);
    run_bounded(cmd, DOCKER_TIMEOUT)
}

/// Runs `docker ARGS`, asserting success; returns stdout.
pub fn docker_ok(args: &[&str]) -> String {
    let o = docker(args);
    assert!(
        o.status.success(),
        "docker {args:?} failed: {}\n{}",
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// What a bed runs.
#[derive(Debug, Clone)]
pub struct BedOpts {
    pub coordinators: usize,
    pub nodes: usize,
    /// A node's root on a tmpfs of this many bytes (a small disk); `None`: a volume.
    pub node_disk_bytes: Option<u64>,
    /// Extra agent flags for every node.
    pub agent_extra: Vec<String>,
}

impl BedOpts {
    pub fn new(coordinators: usize, nodes: usize) -> BedOpts {
        BedOpts {
            coordinators,
            nodes,
            node_disk_bytes: None,
            agent_extra: Vec::new(),
        }
    }
}

/// A running bed; everything is removed on drop.
pub struct Bed {
    pub name: String,
    pub opts: BedOpts,
    /// Container names: `<bed>-c1`, ..., `<bed>-n1`, ..., `<bed>-cli`.
    containers: Vec<String>,
    volumes: Vec<String>,
}

impl Bed {
    /// Starts the networks, the one-shot init (certificates, demo packages), the coordinators
    /// (the first bootstraps), the agents (each installs 4.2.0 and starts the demo service) and
    /// the CLI container; waits until every node is registered and healthy.
    pub fn start(opts: BedOpts) -> Bed {
        let image = image();
        let name = format!("orchbed{}", fastrand::u32(..));
        let mut bed = Bed {
            name: name.clone(),
            opts: opts.clone(),
            containers: Vec::new(),
            volumes: Vec::new(),
        };
        docker_ok(&["network", "create", &bed.net("raft")]);
        docker_ok(&["network", "create", &bed.net("nodes")]);
        for v in ["certs", "pkgs"] {
            bed.volume(v);
        }
        let nodes: Vec<String> = (1..=opts.nodes).map(|i| format!("n{i}")).collect();
        let init = format!("{name}-init");
        docker_ok(&[
            "run",
            "--rm",
            "--name",
            &init,
            "--entrypoint",
            "/bin/sh",
            "-e",
            &format!("NODES={}", nodes.join(",")),
            "-e",
            &format!("COORDINATORS={}", opts.coordinators),
            "-v",
            &format!("{name}-certs:/certs"),
            "-v",
            &format!("{name}-pkgs:/pkgs"),
            image,
            "/usr/local/share/orchestrator/init.sh",
        ]);
        for i in 1..=opts.coordinators {
            bed.run_coordinator(i);
        }
        for (i, n) in nodes.iter().enumerate() {
            bed.run_node(n, i + 1);
        }
        bed.run_cli();
        let want = opts.nodes;
        bed.wait_for(
            Duration::from_secs(120),
            "every node registered and healthy",
            |b| {
                b.nodes_json()
                    .as_array()
                    .is_some_and(|a| a.len() == want && a.iter().all(|n| n["healthy"] == true))
            },
        );
        bed
    }

    fn net(&self, which: &str) -> String {
        format!("{}-{which}", self.name)
    }

    fn volume(&mut self, v: &str) -> String {
        let full = format!("{}-{v}", self.name);
        docker_ok(&["volume", "create", &full]);
        self.volumes.push(full.clone());
        full
    }

    /// `<bed>-<short>`: the container of coordinator `c1`, node `n2`, or `cli`.
    pub fn container(&self, short: &str) -> String {
        format!("{}-{short}", self.name)
    }

    fn run_coordinator(&mut self, i: usize) {
        let short = format!("c{i}");
        let full = self.container(&short);
        let data = self.volume(&format!("{short}-data"));
        let mut args: Vec<String> = vec![
            "run".into(),
            "-d".into(),
            "--init".into(),
            // Slow-link tests shape a coordinator's links with `tc`.
            "--cap-add".into(),
            "NET_ADMIN".into(),
            "--name".into(),
            full.clone(),
            "--network".into(),
            self.net("raft"),
            "--network-alias".into(),
            format!("{short}-raft"),
            "-e".into(),
            "ORCH_LOG=info,openraft=warn".into(),
            "-v".into(),
            format!("{}-certs:/certs:ro", self.name),
            "-v".into(),
            format!("{data}:/data"),
            image_tag().into(),
            "coordinator".into(),
            "--id".into(),
            i.to_string(),
            "--listen".into(),
            "0.0.0.0:7000".into(),
            "--advertise".into(),
            format!("{short}-raft:7000"),
            "--data-dir".into(),
            "/data".into(),
            "--tls-dir".into(),
            format!("/certs/coordinator-{i}"),
        ];
        for j in 1..=self.opts.coordinators {
            if j != i {
                args.push("--peer".into());
                args.push(format!("{j}=c{j}-raft:7000"));
            }
        }
        if i == 1 {
            args.push("--bootstrap".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        docker_ok(&args);
        self.containers.push(full.clone());
        self.connect(&short, "nodes");
    }

    fn run_node(&mut self, short: &str, _index: usize) {
        let full = self.container(short);
        let coordinators: Vec<String> = (1..=self.opts.coordinators)
            .map(|j| format!("c{j}:7000"))
            .collect();
        let mut args: Vec<String> = vec![
            "run".into(),
            "-d".into(),
            "--init".into(),
            "--cap-add".into(),
            "NET_ADMIN".into(),
            "--name".into(),
            full.clone(),
            "--network".into(),
            self.net("nodes"),
            "--network-alias".into(),
            short.to_string(),
            "-e".into(),
            "ORCH_LOG=info".into(),
            "-v".into(),
            format!("{}-certs:/certs:ro", self.name),
            "-v".into(),
            format!("{}-pkgs:/pkgs:ro", self.name),
            "--entrypoint".into(),
            "/bin/sh".into(),
        ];
        match self.opts.node_disk_bytes {
            Some(bytes) => {
                // --tmpfs, not --mount: Docker mounts tmpfs noexec by default and release
                // hooks run from the root dir.
                args.push("--tmpfs".into());
                args.push(format!("/data:rw,exec,size={bytes}"));
            }
            None => {
                let data = self.volume(&format!("{short}-data"));
                args.push("-v".into());
                args.push(format!("{data}:/data"));
            }
        }
        args.extend([
            image_tag().to_string(),
            "/usr/local/share/orchestrator/node.sh".into(),
            "--node-id".into(),
            short.to_string(),
            "--listen".into(),
            "0.0.0.0:7001".into(),
            "--advertise".into(),
            format!("{short}:7001"),
            "--health-url".into(),
            "http://127.0.0.1:8080/health".into(),
            "--tls-dir".into(),
            format!("/certs/agent-{short}"),
        ]);
        for c in coordinators {
            args.push("--coordinator".into());
            args.push(c);
        }
        args.extend(self.opts.agent_extra.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        docker_ok(&args);
        self.containers.push(full);
    }

    /// A container that stays up (a shell reading a stdin that never ends) on both networks,
    /// from which every CLI command runs.
    fn run_cli(&mut self) {
        let full = self.container("cli");
        let coordinators: Vec<String> = (1..=self.opts.coordinators)
            .map(|j| format!("c{j}:7000"))
            .collect();
        docker_ok(&[
            "run",
            "-d",
            "-i",
            "--init",
            "--name",
            &full,
            "--network",
            &self.net("nodes"),
            "-e",
            &format!("ORCHESTRATOR_COORDINATORS={}", coordinators.join(",")),
            "-e",
            "ORCHESTRATOR_TLS_DIR=/certs/operator-admin",
            "-v",
            &format!("{}-certs:/certs:ro", self.name),
            "-v",
            &format!("{}-pkgs:/pkgs:ro", self.name),
            "--entrypoint",
            "/bin/sh",
            image_tag(),
            "-c",
            "read forever",
        ]);
        self.containers.push(full.clone());
        docker_ok(&["network", "connect", &self.net("raft"), &full]);
    }

    // -- faults ---------------------------------------------------------------------------

    /// `docker kill` (SIGKILL: the machine loses power).
    pub fn kill(&self, short: &str) {
        docker_ok(&["kill", &self.container(short)]);
    }

    /// `docker start` a stopped container (it keeps its file system and volumes: a reboot).
    pub fn start_again(&self, short: &str) {
        docker_ok(&["start", &self.container(short)]);
    }

    /// `docker pause`: every process of the container frozen (a hung machine).
    pub fn pause(&self, short: &str) {
        docker_ok(&["pause", &self.container(short)]);
    }

    pub fn unpause(&self, short: &str) {
        docker_ok(&["unpause", &self.container(short)]);
    }

    /// Cuts `short` from network `which` ("raft" or "nodes").
    pub fn disconnect(&self, short: &str, which: &str) {
        docker_ok(&[
            "network",
            "disconnect",
            &self.net(which),
            &self.container(short),
        ]);
    }

    /// Connects `short` to network `which` again, under its alias there.
    pub fn connect(&self, short: &str, which: &str) {
        let alias = if which == "raft" {
            format!("{short}-raft")
        } else {
            short.to_string()
        };
        docker_ok(&[
            "network",
            "connect",
            "--alias",
            &alias,
            &self.net(which),
            &self.container(short),
        ]);
    }

    // -- observing ------------------------------------------------------------------------

    /// Runs `sh -c SCRIPT` in `short`'s container (the image has dash and nothing else).
    pub fn sh(&self, short: &str, script: &str) -> Output {
        let mut cmd = Command::new("docker");
        cmd.args(["exec", &self.container(short), "/bin/sh", "-c", script]);
        run_bounded(cmd, DOCKER_TIMEOUT)
    }

    /// A file of `short`'s container, as text ("" when missing).
    pub fn read_file(&self, short: &str, path: &str) -> String {
        let script = format!(
            "[ -e {path} ] || exit 0; while IFS= read -r l || [ -n \"$l\" ]; do printf '%s\\n' \"$l\"; done < {path}"
        );
        stdout(&self.sh(short, &script))
    }

    /// The agent audit log of node `short`.
    pub fn audit(&self, short: &str) -> String {
        self.read_file(short, "/data/agent/audit.log")
    }

    /// `orchestrator node versions` of node `short`'s own store.
    pub fn versions(&self, short: &str) -> String {
        stdout(&self.sh(short, "orchestrator node versions --root-dir /data"))
    }

    /// The last `lines` lines of a container's output.
    pub fn logs(&self, short: &str, lines: usize) -> String {
        let o = docker(&["logs", "--tail", &lines.to_string(), &self.container(short)]);
        format!("{}{}", stdout(&o), stderr(&o))
    }

    /// Every container's last lines, for failure messages.
    pub fn all_logs(&self) -> String {
        let mut out = String::new();
        for c in &self.containers {
            let short = c.trim_start_matches(&format!("{}-", self.name)).to_string();
            if short == "cli" {
                continue;
            }
            out.push_str(&format!("--- {short}\n{}", self.logs(&short, 25)));
        }
        out
    }

    /// `orchestrator ARGS` in the CLI container, bounded by `timeout`.
    pub fn cli_within(&self, args: &[&str], timeout: Duration) -> Output {
        let mut cmd = Command::new("docker");
        cmd.args(["exec", &self.container("cli"), "orchestrator"])
            .args(args);
        run_bounded(cmd, timeout)
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_within(args, CLI_TIMEOUT)
    }

    /// `orchestrator ARGS` in the background (a waiting `rollout`); killed if dropped unwaited.
    pub fn spawn_cli(&self, args: &[&str]) -> Background {
        Background(Some(
            Command::new("docker")
                .args(["exec", &self.container("cli"), "orchestrator"])
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("docker exec"),
        ))
    }

    pub fn cli_json(&self, args: &[&str]) -> Value {
        let o = self.cli(args);
        serde_json::from_str(stdout(&o).trim()).unwrap_or(Value::Null)
    }

    /// `nodes --json` (Null when no coordinator answers).
    pub fn nodes_json(&self) -> Value {
        self.cli_json(&["nodes", "--json"])
    }

    /// `status [ID] --json` (Null when no coordinator answers).
    pub fn status_json(&self, id: &str) -> Value {
        if id.is_empty() {
            self.cli_json(&["status", "--json"])
        } else {
            self.cli_json(&["status", id, "--json"])
        }
    }

    /// The leader's id as the coordinators report it (0: none).
    pub fn leader(&self) -> u64 {
        self.cli_json(&["cluster", "status", "--json"])["leader_id"]
            .as_u64()
            .unwrap_or(0)
    }

    /// The leader as coordinator `short` sees it (0: none).
    pub fn leader_seen_by(&self, short: &str) -> u64 {
        let addr = format!("{short}:7000");
        self.cli_json(&["cluster", "status", "--json", "--coordinator", &addr])["leader_id"]
            .as_u64()
            .unwrap_or(0)
    }

    /// Polls `f` every half second until it holds; fails the test after `timeout`.
    pub fn wait_for(&self, timeout: Duration, what: &str, mut f: impl FnMut(&Bed) -> bool) {
        let start = Instant::now();
        while !f(self) {
            assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}\n{}",
                self.all_logs()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The per-node step of a status.
    pub fn step<'a>(status: &'a Value, node: &str) -> &'a str {
        status["nodes"]
            .as_array()
            .and_then(|a| a.iter().find(|n| n["id"] == node))
            .and_then(|n| n["step"].as_str())
            .unwrap_or("")
    }
}

/// A background `docker exec`; killed (by pid) when dropped before it was waited for.
pub struct Background(Option<std::process::Child>);

impl Background {
    /// Waits (at most `timeout`, else kills it and fails the test) and returns its output.
    pub fn wait(mut self, timeout: Duration) -> Output {
        let mut child = self.0.take().expect("waited once");
        let start = Instant::now();
        loop {
            if child.try_wait().ok().flatten().is_some() {
                return child.wait_with_output().expect("output");
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                let o = child.wait_with_output().expect("output");
                panic!(
                    "background command did not end within {timeout:?}: {}\n{}",
                    stdout(&o),
                    stderr(&o)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        for c in &self.containers {
            // A paused container cannot be removed before it is resumed.
            let _ = docker(&["unpause", c]);
            let _ = docker(&["rm", "-f", "-v", c]);
        }
        for n in ["raft", "nodes"] {
            let _ = docker(&["network", "rm", &self.net(n)]);
        }
        for v in &self.volumes {
            let _ = docker(&["volume", "rm", "-f", v]);
        }
    }
}
