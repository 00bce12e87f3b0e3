//! Harness for process-level tests: locating the built binaries, starting real `orchestrator
//! agent` processes on loopback with a kill-on-drop guard, running the CLI with a bound,
//! building packages, a scripted HTTP health endpoint, and bounded polling.
//!
//! Every wait here is a bounded poll: a test that would hang fails with a message instead.
//!
//! The binaries are not built by `cargo test -p orch-tests` (a test crate cannot depend on
//! another crate's binary); build them first with `cargo build --bins` (`cargo test
//! --workspace` does it too, because crates/cli has integration tests).

pub mod chaos;
pub mod cluster;
pub mod containers;
pub mod fleet;
pub mod http;
pub mod pty;

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use orch_proto::agent::agent_client::AgentClient;
use orch_proto::agent::{self as pb};
use orch_tls::{Role, Security};
use tonic::transport::Channel;

pub use orch_proto::agent as proto;

/// How long a CLI command may run before the harness kills it and fails the test.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an agent may take to start serving.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Binaries and fixtures

/// `target/<profile>/`, derived from the test executable (`target/<profile>/deps/<test>-<hash>`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe
        .parent()
        .expect("test executable has a parent directory");
    let dir = if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().expect("deps has a parent")
    } else {
        deps
    };
    dir.to_path_buf()
}

/// A binary built by another crate of the workspace, or a panic saying how to build it.
pub fn built_bin(name: &str) -> PathBuf {
    let path = target_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --bins` first (`cargo test --workspace` builds it too)",
        path.display()
    );
    path
}

/// The `orchestrator` binary.
pub fn orchestrator() -> PathBuf {
    built_bin("orchestrator")
}

/// The `demo-service` binary (crates/demo-service).
pub fn demo_service() -> PathBuf {
    built_bin("demo-service")
}

/// A file under `tests/fixtures/`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// Writes an executable file (a script).
pub fn write_script(path: &Path, text: &str) {
    if let Some(p) = path.parent() {
        fs::create_dir_all(p).unwrap();
    }
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Bounded waiting

/// SIGSTOPs process `pid` and waits until the kernel shows every one of its threads stopped:
/// the signal is delivered asynchronously, and a request sent right after `kill` returns could
/// still be served by a thread that has not stopped yet.
pub fn freeze(pid: u32) {
    // SAFETY: kill(2) on a process the test started.
    assert_eq!(
        unsafe { libc::kill(pid as i32, libc::SIGSTOP) },
        0,
        "SIGSTOP {pid}"
    );
    wait_until(Duration::from_secs(10), "the process to stop", || {
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            return false;
        };
        tasks.flatten().all(|t| {
            fs::read_to_string(t.path().join("stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .map(|(_, rest)| rest.trim_start().starts_with('T'))
                })
                .unwrap_or(false)
        })
    });
}

/// Polls `f` every 20 ms until it returns true; panics naming `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    loop {
        if f() {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for a child to exit, at most `timeout`; `None` when it is still running.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return Some(st);
        }
        if start.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------------
// Running the CLI

/// Runs `cmd` with piped output, killing it and panicking after `timeout`.
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> Output {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    let out = drain(child.stdout.take().expect("stdout"));
    let err = drain(child.stderr.take().expect("stderr"));
    let Some(status) = wait_child(&mut child, timeout) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{shown} did not finish within {timeout:?}");
    };
    Output {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

fn drain(mut r: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

/// `orchestrator ARGS`, with a clean environment for the variables it reads.
pub fn orch_cmd<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Command {
    let mut c = Command::new(orchestrator());
    c.args(args)
        .env_remove("ORCH_LOG")
        .env_remove("ORCH_ROOT_DIR")
        .env_remove("RUST_LOG");
    c
}

/// Runs `orchestrator ARGS` (bounded by [`CLI_TIMEOUT`]).
pub fn orch<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    run_bounded(orch_cmd(args), CLI_TIMEOUT)
}

/// Runs `orchestrator ARGS`, bounded by `timeout`.
pub fn orch_within<S: AsRef<std::ffi::OsStr>>(args: &[S], timeout: Duration) -> Output {
    run_bounded(orch_cmd(args), timeout)
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs `orchestrator ARGS`, asserts exit 0 and returns stdout.
pub fn orch_ok<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(args: &[S]) -> String {
    let o = orch(args);
    assert!(
        o.status.success(),
        "{args:?} failed ({}): stdout {:?} stderr {:?}",
        o.status,
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// Asserts the CLI refusal contract: exit 1, nothing on stdout, one stderr line containing
/// `needle`. Returns that line.
pub fn assert_refused(o: &Output, needle: &str) -> String {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "expected a refusal (exit 1), got {}: stdout {:?} stderr {err:?}",
        o.status,
        stdout(o)
    );
    assert!(
        o.stdout.is_empty(),
        "a refusal prints nothing on stdout: {:?}",
        stdout(o)
    );
    assert_eq!(err.lines().count(), 1, "one stderr line expected: {err:?}");
    assert!(err.contains(needle), "{err:?} should contain {needle:?}");
    err
}

// ---------------------------------------------------------------------------------------------
// Packages

/// What goes into a test package.
#[derive(Debug, Clone)]
pub struct PkgSpec {
    pub name: String,
    pub version: String,
    /// Written to `payload.txt`.
    pub payload: String,
    /// `hooks/activate` body; `None` ships no hook.
    pub hook: Option<String>,
}

/// The default activation hook: appends `FROM -> TO` to `$ORCH_ROOT_DIR/activations`.
pub const RECORDING_HOOK: &str = "#!/bin/sh\necho \"$1 -> $2\" >> \"$ORCH_ROOT_DIR/activations\"\n";

impl PkgSpec {
    /// `emqx-<version>` with a payload naming the version and the recording hook.
    pub fn emqx(version: &str) -> PkgSpec {
        PkgSpec {
            name: "emqx".into(),
            version: version.into(),
            payload: format!("release {version}\n"),
            hook: Some(RECORDING_HOOK.into()),
        }
    }

    pub fn payload(mut self, p: &str) -> Self {
        self.payload = p.into();
        self
    }

    pub fn hook(mut self, h: Option<&str>) -> Self {
        self.hook = h.map(str::to_string);
        self
    }

    /// Builds `OUT/<name>-<version>.zip` (and its `.sha256`) with `orchestrator package build`,
    /// from a source tree made under `work`. Returns the zip's path.
    pub fn build(&self, work: &Path, out: &Path) -> PathBuf {
        let src = work.join(format!(
            "src-{}-{}-{}",
            self.name,
            self.version,
            fastrand::u64(..)
        ));
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("payload.txt"), &self.payload).unwrap();
        if let Some(h) = &self.hook {
            write_script(&src.join("hooks/activate"), h);
        }
        let o = orch_ok(&[
            "package".to_string(),
            "build".to_string(),
            src.display().to_string(),
            "--name".to_string(),
            self.name.clone(),
            "--version".to_string(),
            self.version.clone(),
            "--out".to_string(),
            out.display().to_string(),
        ]);
        let zip = out.join(format!("{}-{}.zip", self.name, self.version));
        assert!(
            o.contains(&zip.display().to_string()),
            "package build said {o:?}"
        );
        zip
    }
}

/// Builds `emqx-V.zip` for each version into `out` (with the recording hook).
pub fn build_emqx(work: &Path, out: &Path, versions: &[&str]) -> Vec<PathBuf> {
    versions
        .iter()
        .map(|v| PkgSpec::emqx(v).build(work, out))
        .collect()
}

/// Hex SHA-256 of a byte string (through the release crate, which hashes files).
pub fn sha256_hex(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("blob");
    fs::write(&p, bytes).unwrap();
    orch_release::package::sha256_file(&p).unwrap().0
}

/// Names in a directory, sorted (empty when it does not exist).
pub fn list_dir(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// Reads a file, or "" when it does not exist.
pub fn read_or_empty(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Ports, runtimes, gRPC clients

/// A port on 127.0.0.1 that was free a moment ago, never the same twice in one test process.
///
/// Not `bind :0`: the kernel hands a just-released ephemeral port out again, so two daemons of
/// one cluster could get the same port (seen: a coordinator dialing itself as a peer), and an
/// outgoing connection's ephemeral port could take it before the daemon binds. Ports come from
/// 20000-32767, below Linux's ephemeral range (32768-60999), picked at random so concurrent
/// test processes rarely meet, and are checked bindable.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    for _ in 0..10_000 {
        let port = fastrand::u16(20_000..32_768);
        if given.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    panic!("no free port in 20000-32767 on 127.0.0.1");
}

/// A current-thread tokio runtime for driving the gRPC client from a synchronous test.
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

// ---------------------------------------------------------------------------------------------
// Certificates

/// Certificates for one test, made like `orchestrator certs init DIR --coordinators N
/// --agents ... --operators alice --viewers grafana`: one folder per party under `dir`.
#[derive(Debug, Clone)]
pub struct TestCerts {
    pub dir: PathBuf,
}

/// The operator every mTLS test acts as.
pub const OPERATOR: &str = "alice";
/// The viewer that exists in every test CA.
pub const VIEWER: &str = "grafana";

impl TestCerts {
    /// A new CA under `dir` with coordinators `1..=coordinators`, `agents`, operator
    /// [`OPERATOR`] and viewer [`VIEWER`].
    pub fn init(dir: &Path, coordinators: u32, agents: &[&str]) -> TestCerts {
        let opts = orch_tls::InitOptions {
            coordinators,
            agents: agents.iter().map(|s| s.to_string()).collect(),
            operators: vec![OPERATOR.into()],
            viewers: vec![VIEWER.into()],
            ..orch_tls::InitOptions::default()
        };
        orch_tls::init_with(dir, &opts).expect("create test certificates");
        TestCerts {
            dir: dir.to_path_buf(),
        }
    }

    /// `DIR/<role>-<name>`.
    pub fn folder(&self, role: Role, name: &str) -> PathBuf {
        self.dir.join(orch_tls::party_domain(role, name))
    }

    /// The operator's folder (what the CLI gets as `--tls-dir`).
    pub fn operator(&self) -> PathBuf {
        self.folder(Role::Operator, OPERATOR)
    }

    /// A party's loaded TLS material.
    pub fn security(&self, role: Role, name: &str) -> Security {
        Security::resolve(false, Some(&self.folder(role, name)), None, None, None)
            .unwrap_or_else(|e| panic!("load {role} {name}: {e}"))
    }
}

/// `--insecure`, or `--tls-dir FOLDER`: the CLI/daemon flags for a party.
pub fn tls_flags(certs: Option<&TestCerts>, role: Role, name: &str) -> Vec<String> {
    match certs {
        None => vec!["--insecure".into()],
        Some(c) => vec![
            "--tls-dir".into(),
            c.folder(role, name).display().to_string(),
        ],
    }
}

/// A connected gRPC channel to a daemon (agent or coordinator) at `addr` (HOST:PORT), for raw
/// clients, in plain text (`--insecure` daemons). The one place tests dial a daemon directly
/// without certificates, so transport settings live here.
pub async fn channel(addr: &str) -> Channel {
    channel_as(addr, &Security::Insecure, "").await
}

/// [`channel`] dialed with `security`; under mTLS the server must present `domain`'s certificate.
pub async fn channel_as(addr: &str, security: &Security, domain: &str) -> Channel {
    security
        .endpoint(addr, domain)
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
}

/// A connected raw client for the agent at `addr` (HOST:PORT).
pub async fn connect(addr: &str) -> AgentClient<Channel> {
    AgentClient::new(channel(addr).await)
}

/// A connected raw client for agent `node` at `addr`, dialed with `security` (as
/// `agent-<node>` under mTLS).
pub async fn connect_as(addr: &str, security: &Security, node: &str) -> AgentClient<Channel> {
    AgentClient::new(channel_as(addr, security, &orch_tls::party_domain(Role::Agent, node)).await)
}

/// The `orch-error` metadata kind of a status ("" when absent).
pub fn error_kind(s: &tonic::Status) -> String {
    s.metadata()
        .get("orch-error")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// The cluster id test fences carry.
pub const TEST_CLUSTER: &str = "test-cluster";

/// A fence for raw requests (cluster [`TEST_CLUSTER`], no deadline).
pub fn fence(term: u64, rollout: &str, step: u64) -> Option<pb::Fence> {
    Some(pb::Fence {
        term,
        rollout_id: rollout.into(),
        step,
        cluster_id: TEST_CLUSTER.into(),
        deadline_unix_ms: 0,
    })
}

/// A push header announcing `data` as `<name>-<version>.zip` (its true digest and size).
pub fn header_for(
    name: &str,
    version: &str,
    data: &[u8],
    fence: Option<pb::Fence>,
) -> pb::PackageHeader {
    pb::PackageHeader {
        chunks: Vec::new(),
        sent: Vec::new(),
        peers: Vec::new(),
        name: name.into(),
        version: version.into(),
        sha256: sha256_hex(data),
        size: data.len() as u64,
        fence,
        signature: Vec::new(),
        force: false,
    }
}

/// The chunks of a push: the header in the first, `data` split into `chunk`-byte pieces.
pub fn chunks_of(
    header: Option<pb::PackageHeader>,
    data: &[u8],
    chunk: usize,
) -> Vec<pb::PackageChunk> {
    let mut header = header;
    let mut out: Vec<pb::PackageChunk> = data
        .chunks(chunk.max(1))
        .map(|part| pb::PackageChunk {
            header: header.take(),
            data: part.to_vec(),
        })
        .collect();
    if out.is_empty() {
        out.push(pb::PackageChunk {
            header,
            data: Vec::new(),
        });
    }
    out
}

/// Streams `chunks` as one PushPackage call.
pub async fn push_chunks(
    c: &mut AgentClient<Channel>,
    chunks: Vec<pb::PackageChunk>,
) -> Result<pb::PushReply, tonic::Status> {
    c.push_package(tonic::codegen::tokio_stream::iter(chunks))
        .await
        .map(|r| r.into_inner())
}

/// Pushes a package file under its own name (`<name>-<version>.zip`), honestly announced.
pub async fn push_file(
    c: &mut AgentClient<Channel>,
    zip: &Path,
    fence: Option<pb::Fence>,
) -> Result<pb::PushReply, tonic::Status> {
    let file_name = zip.file_name().unwrap().to_str().unwrap();
    let (name, version) =
        orch_types::parse_package_file_name(file_name).expect("a <name>-<x.y.z>.zip file name");
    let data = fs::read(zip).unwrap();
    let h = header_for(&name, &version.to_string(), &data, fence);
    push_chunks(c, chunks_of(Some(h), &data, 64 << 10)).await
}

/// `(version, state)` pairs of a reply's listing, newest first.
pub fn states(v: &[pb::VersionEntry]) -> Vec<(String, String)> {
    v.iter()
        .map(|e| (e.version.clone(), e.state.clone()))
        .collect()
}

/// Asks the agent at `addr` who it is (one bounded attempt), as the operator under mTLS.
fn probe_node_info(
    addr: SocketAddr,
    certs: Option<&TestCerts>,
    node: &str,
) -> Result<pb::NodeInfoReply, String> {
    let security = match certs {
        None => Security::Insecure,
        Some(c) => c.security(Role::Operator, OPERATOR),
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            rt().block_on(async {
                let fut = async {
                    let ch = security
                        .endpoint(
                            &addr.to_string(),
                            &orch_tls::party_domain(Role::Agent, node),
                        )
                        .map_err(|e| e.to_string())?
                        .connect_timeout(Duration::from_millis(500))
                        .connect()
                        .await
                        .map_err(|e| e.to_string())?;
                    AgentClient::new(ch)
                        .node_info(pb::NodeInfoRequest {})
                        .await
                        .map(|r| r.into_inner())
                        .map_err(|e| e.to_string())
                };
                tokio::time::timeout(Duration::from_secs(2), fut)
                    .await
                    .map_err(|_| "no answer within 2s".to_string())?
            })
        })
        .join()
        .expect("probe thread")
    })
}

// ---------------------------------------------------------------------------------------------
// Agent processes

static LOG_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A running `orchestrator agent` process. Dropping it SIGKILLs and reaps the process, so a
/// failing test leaves nothing behind.
pub struct AgentProc {
    child: Option<Child>,
    /// `127.0.0.1:PORT`, for `--agent` and the raw client.
    pub addr: String,
    pub node_id: String,
    pub root: PathBuf,
    /// The agent's stderr.
    pub log_path: PathBuf,
    /// The test's certificates when the agent runs mutual TLS (`None`: `--insecure`).
    pub certs: Option<TestCerts>,
}

impl AgentProc {
    /// Starts `orchestrator agent --node-id ID --root-dir ROOT --listen 127.0.0.1:PORT
    /// --insecure EXTRA...` and waits (bounded) until it answers NodeInfo as `node_id`. Its
    /// stderr goes to a log file beside the root.
    pub fn start(node_id: &str, root: &Path, extra_args: &[&str]) -> AgentProc {
        Self::start_env(node_id, root, extra_args, &[])
    }

    /// [`AgentProc::start`] with extra environment variables for the agent process.
    pub fn start_env(
        node_id: &str,
        root: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> AgentProc {
        Self::start_with(node_id, root, extra_args, env, None)
    }

    /// [`AgentProc::start_env`] under mutual TLS with `certs` (the agent's own folder) when
    /// given, else `--insecure`.
    pub fn start_with(
        node_id: &str,
        root: &Path,
        extra_args: &[&str],
        env: &[(&str, &str)],
        certs: Option<&TestCerts>,
    ) -> AgentProc {
        let mut last = String::new();
        // A port found free can be taken by another test before the agent binds it: retry.
        for _ in 0..5 {
            let port = free_port();
            let mut args: Vec<String> = vec![
                "--node-id".into(),
                node_id.into(),
                "--root-dir".into(),
                root.display().to_string(),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
            ];
            args.extend(tls_flags(certs, Role::Agent, node_id));
            args.extend(extra_args.iter().map(|s| s.to_string()));
            match Self::launch_with(&args, env, port, root, Some(node_id), certs) {
                Ok(a) => return a,
                Err(log) if log.contains("in use") => last = log,
                Err(log) => panic!("agent {node_id} did not start: {log}"),
            }
        }
        panic!("agent {node_id} could not bind a free port: {last}")
    }

    /// Spawns `orchestrator agent ARGS` (which must make it listen on 127.0.0.1:`port`) and
    /// waits until it serves. `Err` carries its log when it exits or does not answer in time.
    pub fn launch(
        args: &[String],
        env: &[(&str, &str)],
        port: u16,
        root: &Path,
        expect_node: Option<&str>,
    ) -> Result<AgentProc, String> {
        Self::launch_with(args, env, port, root, expect_node, None)
    }

    /// [`AgentProc::launch`], probing with the operator's certificate of `certs` when given.
    pub fn launch_with(
        args: &[String],
        env: &[(&str, &str)],
        port: u16,
        root: &Path,
        expect_node: Option<&str>,
        certs: Option<&TestCerts>,
    ) -> Result<AgentProc, String> {
        let log_dir = root
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(std::env::temp_dir);
        fs::create_dir_all(&log_dir).unwrap();
        let log_path = log_dir.join(format!(
            "agent-{}-{}.log",
            expect_node.unwrap_or("x"),
            LOG_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let log = fs::File::create(&log_path).unwrap();
        let mut cmd = orch_cmd(&["agent"]);
        cmd.args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = cmd.spawn().map_err(|e| format!("spawn agent: {e}"))?;
        let mut me = AgentProc {
            child: Some(child),
            addr: format!("127.0.0.1:{port}"),
            node_id: expect_node.unwrap_or_default().to_string(),
            root: root.to_path_buf(),
            log_path,
            certs: certs.cloned(),
        };
        let sock: SocketAddr = me.addr.parse().unwrap();
        let start = Instant::now();
        loop {
            if let Some(st) = me.child_mut().try_wait().expect("try_wait") {
                me.child = None;
                return Err(format!(
                    "exited with {st} before serving; log:\n{}",
                    me.log()
                ));
            }
            // Cheap check first: the port accepts connections.
            if TcpStream::connect_timeout(&sock, Duration::from_millis(200)).is_ok() {
                match probe_node_info(sock, certs, expect_node.unwrap_or("")) {
                    Ok(info) => {
                        if let Some(id) = expect_node
                            && info.node_id != id
                        {
                            return Err(format!(
                                "another agent ({}) answers on {sock}: port in use",
                                info.node_id
                            ));
                        }
                        if expect_node.is_none() {
                            me.node_id = info.node_id;
                        }
                        return Ok(me);
                    }
                    Err(_) if start.elapsed() < START_TIMEOUT => {}
                    Err(e) => return Err(format!("NodeInfo failed: {e}; log:\n{}", me.log())),
                }
            }
            if start.elapsed() >= START_TIMEOUT {
                return Err(format!(
                    "not serving on {sock} within {START_TIMEOUT:?}; log:\n{}",
                    me.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("agent process already reaped")
    }

    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .expect("agent process already reaped")
            .id()
    }

    /// "running", or how the process ended (for failure messages). Does not reap it.
    pub fn liveness(&self) -> String {
        let pid = match &self.child {
            Some(c) => c.id() as libc::id_t,
            None => return "reaped".into(),
        };
        // SAFETY: waitid(2) with WNOWAIT only peeks at our own child's state (it stays
        // unreaped, so the pid cannot be recycled under the guard); `info` is ours.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let rc = libc::waitid(
                libc::P_PID,
                pid,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            );
            if rc != 0 {
                return "unknown".into();
            }
            if info.si_pid() == 0 {
                return "running".into();
            }
            match info.si_code {
                libc::CLD_EXITED => format!("exited with {}", info.si_status()),
                _ => format!("killed by signal {}", info.si_status()),
            }
        }
    }

    /// The agent's stderr so far.
    pub fn log(&self) -> String {
        read_or_empty(&self.log_path)
    }

    /// Sends SIGTERM without waiting.
    pub fn send_term(&self) {
        // SAFETY: kill(2) on our own child's pid, which is not reaped yet (we hold the Child).
        let rc = unsafe { libc::kill(self.pid() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM)");
    }

    /// Waits for the process to exit on its own, at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let st = wait_child(self.child_mut(), timeout)?;
        self.child = None;
        Some(st)
    }

    /// SIGTERM, then waits (bounded) for a graceful exit; returns the exit status.
    pub fn stop_term(&mut self) -> ExitStatus {
        self.stop_term_within(Duration::from_secs(15))
    }

    pub fn stop_term_within(&mut self, timeout: Duration) -> ExitStatus {
        self.send_term();
        match self.wait_exit(timeout) {
            Some(st) => st,
            None => panic!(
                "agent {} did not exit within {timeout:?} of SIGTERM; log:\n{}",
                self.node_id,
                self.log()
            ),
        }
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `orchestrator node ARGS --agent ADDR`.
    pub fn node(&self, args: &[&str]) -> Output {
        let mut a: Vec<String> = vec!["node".into()];
        a.extend(args.iter().map(|s| s.to_string()));
        a.push("--agent".into());
        a.push(self.addr.clone());
        match &self.certs {
            None => a.push("--insecure".into()),
            Some(c) => {
                a.push("--tls-dir".into());
                a.push(c.operator().display().to_string());
                a.push("--node-id".into());
                a.push(self.node_id.clone());
            }
        }
        let o = orch(&a);
        if stderr(&o).contains("cannot reach the agent") {
            let live = self.liveness();
            assert_eq!(
                live,
                "running",
                "agent {} is gone during `node {args:?}`; log:\n{}",
                self.node_id,
                self.log()
            );
        }
        o
    }

    /// `node ARGS --agent ADDR`, asserting success; returns stdout.
    pub fn node_ok(&self, args: &[&str]) -> String {
        let o = self.node(args);
        assert!(
            o.status.success(),
            "node {args:?} --agent {} failed ({}): {}\nagent process: {}\nagent log:\n{}",
            self.addr,
            o.status,
            stderr(&o),
            self.liveness(),
            self.log()
        );
        stdout(&o)
    }

    /// A raw gRPC client for this agent.
    pub async fn client(&self) -> AgentClient<Channel> {
        match &self.certs {
            None => connect(&self.addr).await,
            Some(c) => {
                connect_as(
                    &self.addr,
                    &c.security(Role::Operator, OPERATOR),
                    &self.node_id,
                )
                .await
            }
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `orchestrator node ARGS --root-dir ROOT` (the local store).
pub fn local(root: &Path, args: &[&str]) -> Output {
    let mut a: Vec<String> = vec!["node".into()];
    a.extend(args.iter().map(|s| s.to_string()));
    a.push("--root-dir".into());
    a.push(root.display().to_string());
    orch(&a)
}

/// `local`, asserting success; returns stdout.
pub fn local_ok(root: &Path, args: &[&str]) -> String {
    let o = local(root, args);
    assert!(
        o.status.success(),
        "node {args:?} --root-dir {} failed: {}",
        root.display(),
        stderr(&o)
    );
    stdout(&o)
}

// ---------------------------------------------------------------------------------------------
// A scripted HTTP health endpoint

/// What the endpoint answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpReply {
    /// This status code with this body (`Content-Type: application/json`).
    Status(u16, String),
    /// Reads the request and never answers (until the server is dropped).
    Hang,
}

impl HttpReply {
    /// `200 {"version":"V"}`.
    pub fn version(v: &str) -> HttpReply {
        HttpReply::Status(200, format!("{{\"version\":\"{v}\"}}"))
    }
}

/// A tiny HTTP/1.1 server on 127.0.0.1 (std only), one thread per connection, that answers
/// every request with the current [`HttpReply`] and closes the connection.
pub struct HttpServer {
    pub addr: SocketAddr,
    reply: Arc<Mutex<HttpReply>>,
    stop: Arc<AtomicBool>,
    hits: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    pub fn start(reply: HttpReply) -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let reply = Arc::new(Mutex::new(reply));
        let stop = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(AtomicUsize::new(0));
        let (r, s, h) = (reply.clone(), stop.clone(), hits.clone());
        let thread = std::thread::spawn(move || {
            let mut conns = Vec::new();
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (r, s, h) = (r.clone(), s.clone(), h.clone());
                        conns.push(std::thread::spawn(move || serve_one(stream, &r, &s, &h)));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => break,
                }
            }
            for c in conns {
                let _ = c.join();
            }
        });
        HttpServer {
            addr,
            reply,
            stop,
            hits,
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT/health`.
    pub fn url(&self) -> String {
        format!("http://{}/health", self.addr)
    }

    pub fn set(&self, reply: HttpReply) {
        *self.reply.lock().unwrap() = reply;
    }

    /// Requests received so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::Relaxed)
    }
}

fn serve_one(
    mut stream: TcpStream,
    reply: &Mutex<HttpReply>,
    stop: &AtomicBool,
    hits: &AtomicUsize,
) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
    let start = Instant::now();
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        if stop.load(Ordering::Relaxed) || start.elapsed() > Duration::from_secs(10) {
            return;
        }
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => req.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
    hits.fetch_add(1, Ordering::Relaxed);
    let r = reply.lock().unwrap().clone();
    match r {
        HttpReply::Status(code, body) => {
            let reason = match code {
                200 => "OK",
                503 => "Service Unavailable",
                _ => "Status",
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.flush();
        }
        HttpReply::Hang => {
            // Hold the connection open without answering, until the server stops (bounded).
            while !stop.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(60) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
