//! Process-level tests of the demo service: real binaries in a temp root, activations run through
//! each release's `hooks/activate` exactly as the release store runs it, loopback only. Every
//! process a test starts (directly, detached, or as a successor) is killed by the `Reaper` when
//! the test ends, also on panic.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use orch_demo_service::fixture::{self, Reaper, patch_version};
use orch_demo_service::http::{self, Health};
use orch_demo_service::load::{Load, LoadConfig};
use orch_demo_service::{Paths, proc};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const BINARY: &str = env!("CARGO_BIN_EXE_demo-service");
const HOOK_TIMEOUT: Duration = Duration::from_secs(90);

/// A root with releases; fields drop in order, so processes die before the directory goes.
struct Env {
    _reaper: Reaper,
    root: PathBuf,
    addr: SocketAddr,
    _tmp: tempfile::TempDir,
}

impl Env {
    /// Releases `1.0.0 ..= 1.0.{n-1}`; those in `broken` are built broken.
    fn new(n: usize, broken: &[usize]) -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(tmp.path()).unwrap();
        let addr = fixture::free_loopback_addr().unwrap();
        let releases: Vec<(String, bool)> = (0..n)
            .map(|i| (patch_version(i), broken.contains(&i)))
            .collect();
        fixture::setup_root(&root, Path::new(BINARY), &releases, addr).unwrap();
        Env {
            _reaper: Reaper::new(&root),
            root,
            addr,
            _tmp: tmp,
        }
    }

    fn paths(&self) -> Paths {
        Paths::new(&self.root)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.paths().log_file()).unwrap_or_default()
    }

    /// Runs the hook `FROM -> TO`, asserting it succeeded; returns its stdout.
    async fn activate(&self, from: &str, to: &str) -> String {
        let out = fixture::run_hook(&self.root, from, to, HOOK_TIMEOUT)
            .await
            .unwrap();
        assert!(
            out.success,
            "activation {from} -> {to} failed ({:?}): {}\nservice log:\n{}",
            out.code,
            out.stderr,
            self.log()
        );
        out.stdout
    }

    async fn health(&self) -> (u16, Health) {
        let resp = http::get(self.addr, "/health", Duration::from_secs(5))
            .await
            .unwrap();
        let health = resp
            .health()
            .unwrap_or_else(|| panic!("health body is not JSON: {:?}", resp.body));
        (resp.status.as_u16(), health)
    }

    /// Runs the binary directly with `args`, bounded.
    async fn run(&self, args: &[&str]) -> std::process::Output {
        let child = tokio::process::Command::new(BINARY)
            .args(args)
            .current_dir(&self.root)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        tokio::time::timeout(HOOK_TIMEOUT, child.wait_with_output())
            .await
            .expect("command timed out")
            .unwrap()
    }
}

/// Polls `cond` until it holds or `timeout` passes; returns whether it held.
async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A hand-written persistent HTTP/1.1 connection, to control exactly when requests are sent.
struct RawConn {
    reader: BufReader<TcpStream>,
}

struct RawResponse {
    status: u16,
    close: bool,
    body: String,
}

impl RawConn {
    async fn open(addr: SocketAddr) -> RawConn {
        RawConn {
            reader: BufReader::new(TcpStream::connect(addr).await.unwrap()),
        }
    }

    async fn get(&mut self, path: &str) -> std::io::Result<RawResponse> {
        let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
        self.reader.get_mut().write_all(req.as_bytes()).await?;
        let mut line = String::new();
        self.reader.read_line(&mut line).await?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
        let (mut len, mut close) = (0usize, false);
        loop {
            let mut h = String::new();
            self.reader.read_line(&mut h).await?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (name, value) = h.split_once(':').unwrap_or((h, ""));
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                len = value.parse().unwrap_or(0);
            } else if name.eq_ignore_ascii_case("connection") {
                close = value.eq_ignore_ascii_case("close");
            }
        }
        let mut body = vec![0; len];
        self.reader.read_exact(&mut body).await?;
        Ok(RawResponse {
            status,
            close,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    /// Whether the server closed the connection (EOF) within `timeout`.
    async fn closed_within(&mut self, timeout: Duration) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(timeout, self.reader.read(&mut byte)).await,
            Ok(Ok(0))
        )
    }
}

#[tokio::test]
async fn first_install_starts_a_detached_service_that_reports_its_version() {
    let env = Env::new(1, &[]);
    let out = env.activate("none", "1.0.0").await;
    assert!(out.contains("demo-service 1.0.0 started"), "{out}");

    let resp = http::get(env.addr, "/health", Duration::from_secs(5))
        .await
        .unwrap();
    let pid = env.paths().read_pid().expect("pid file");
    assert_eq!(resp.status.as_u16(), 200);
    assert_eq!(
        std::str::from_utf8(&resp.body).unwrap(),
        format!("{{\"version\":\"1.0.0\",\"pid\":{pid}}}")
    );
    let root = http::get(env.addr, "/", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(root.status.as_u16(), 200);
    assert_eq!(
        std::str::from_utf8(&root.body).unwrap(),
        format!("demo-service 1.0.0 (pid {pid})\n")
    );
    let missing = http::get(env.addr, "/nope", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(missing.status.as_u16(), 404);

    // Detached: its own session, not a child of the hook that started it.
    let sid = rustix::process::getsid(rustix::process::Pid::from_raw(pid)).unwrap();
    assert_eq!(
        sid.as_raw_nonzero().get(),
        pid,
        "service runs in its own session"
    );
    assert!(env.paths().control_socket().exists());
    assert!(env.log().contains("demo-service serving"));

    let status = env
        .run(&["status", "--root", env.root.to_str().unwrap()])
        .await;
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("\"version\":\"1.0.0\"") && text.contains(&format!("\"pid\":{pid}")),
        "{text}"
    );

    // Activating the version already running is a no-op that still succeeds.
    let again = env.activate("1.0.0", "1.0.0").await;
    assert!(again.contains("already running"), "{again}");
    assert_eq!(env.health().await.1.pid, Some(pid as u32));
}

/// The acceptance test: a client load through 20 consecutive activations, zero failures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swap_under_load_20_activations_loses_no_request() {
    const SWAPS: usize = 20;
    let env = Env::new(SWAPS + 1, &[]);
    env.activate("none", "1.0.0").await;
    let (_, first) = env.health().await;
    let mut pids = vec![first.pid.unwrap()];

    let mut config = LoadConfig::new(env.addr);
    config.keepalive_clients = 4;
    config.fresh_clients = 4;
    config.fresh_pause = Duration::from_millis(2);
    let load = Load::start(config);
    assert!(
        wait_until(Duration::from_secs(30), || load.served_total() >= 100).await,
        "load did not get going: {} served, {} failed",
        load.served_total(),
        load.failures_total()
    );

    let mut served_during_swaps = 0;
    for i in 1..=SWAPS {
        let (from, to) = (patch_version(i - 1), patch_version(i));
        let before = load.served_total();
        env.activate(&from, &to).await;
        let after = load.served_total();
        served_during_swaps += after - before;

        let (status, h) = env.health().await;
        assert_eq!(status, 200);
        assert_eq!(h.version, to, "activation {i} did not change the version");
        let pid = h.pid.unwrap();
        assert!(
            !pids.contains(&pid),
            "activation {i} did not change the pid ({pid})"
        );
        assert_eq!(
            env.paths().read_pid(),
            Some(pid as i32),
            "pid file names the new process"
        );
        pids.push(pid);

        // Requests keep being served by the new release before the next switch.
        assert!(
            wait_until(Duration::from_secs(30), || load.served_total()
                >= after + 50)
            .await,
            "no requests served after activation {i}"
        );
        assert_eq!(
            load.failures_total(),
            0,
            "failures by activation {i}: {:?}",
            load.take_report().failure_samples
        );
    }

    let report = load.stop().await;
    eprintln!(
        "hot swap: served {} (during activations {served_during_swaps}), failures {}, reconnects after Connection: close {}, idle closes {}, p50 {:?}, p99 {:?}",
        report.served,
        report.failures,
        report.reconnects,
        report.idle_closes,
        report.percentile(0.5),
        report.percentile(0.99)
    );
    assert_eq!(
        report.failures, 0,
        "failed requests: {:?}",
        report.failure_samples
    );
    assert!(
        served_during_swaps > 0,
        "nothing was served while activations ran"
    );
    for i in 0..=SWAPS {
        let v = patch_version(i);
        assert!(
            report.by_version.get(&v).copied().unwrap_or(0) > 0,
            "release {v} served no request: {:?}",
            report.by_version
        );
    }
    // Keep-alive clients were told to reconnect by draining processes: the drain path ran.
    assert!(report.reconnects > 0, "{report:?}");
    // Every predecessor finished its drain and exited.
    for pid in &pids[..SWAPS] {
        assert!(
            proc::wait_for_exit(*pid as i32, Duration::from_secs(20)),
            "old process {pid} did not exit after draining"
        );
    }
    assert!(proc::is_alive(pids[SWAPS] as i32));
}

#[tokio::test]
async fn broken_release_activates_but_its_health_fails_naming_the_version() {
    let env = Env::new(2, &[1]);
    env.activate("none", "1.0.0").await;
    let out = env.activate("1.0.0", "1.0.1").await;
    assert!(out.contains("unhealthy"), "{out}");

    let resp = http::get(env.addr, "/health", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(resp.status.as_u16(), 503);
    let body: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
    assert_eq!(body["version"], "1.0.1");
    assert!(body["fault"].as_str().unwrap().contains("broken"), "{body}");
    // It still answers requests: only the health gate catches it.
    let root = http::get(env.addr, "/", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(root.status.as_u16(), 200);

    // A downgrade from the broken release works like any activation.
    env.activate("1.0.1", "1.0.0").await;
    let (status, h) = env.health().await;
    assert_eq!((status, h.version.as_str()), (200, "1.0.0"));

    // A broken first install also activates (and is unhealthy).
    let env = Env::new(2, &[1]);
    env.activate("none", "1.0.1").await;
    assert_eq!(env.health().await.0, 503);
}

#[tokio::test]
async fn idle_keepalive_connection_survives_handover_and_closes_after_its_next_answer() {
    let env = Env::new(2, &[]);
    env.activate("none", "1.0.0").await;
    let old_pid = env.health().await.1.pid.unwrap() as i32;

    let mut conn = RawConn::open(env.addr).await;
    let first = conn.get("/").await.unwrap();
    assert_eq!((first.status, first.close), (200, false));
    assert!(first.body.contains("1.0.0"));

    env.activate("1.0.0", "1.0.1").await;
    // The idle connection was not closed under us (that would race with a request)...
    assert!(!conn.closed_within(Duration::from_millis(300)).await);
    assert!(
        proc::is_alive(old_pid),
        "the old process waits for its idle connection"
    );
    // ...its next request is answered by the old release, with Connection: close...
    let second = conn.get("/").await.unwrap();
    assert_eq!(second.status, 200);
    assert!(second.body.contains("1.0.0"), "{}", second.body);
    assert!(second.close, "a draining process says Connection: close");
    // ...and then it closes, and the old process, drained, exits.
    assert!(conn.closed_within(Duration::from_secs(5)).await);
    assert!(proc::wait_for_exit(old_pid, Duration::from_secs(10)));
    // New connections reach the new release.
    let mut fresh = RawConn::open(env.addr).await;
    assert!(fresh.get("/").await.unwrap().body.contains("1.0.1"));
}

#[tokio::test]
async fn failed_handover_leaves_the_old_release_serving() {
    let env = Env::new(1, &[]);
    let paths = env.paths();
    // Release 1.0.1's binary dies at once; 1.0.2's never becomes ready.
    for (v, script) in [
        (
            "1.0.1",
            "#!/bin/sh\necho 'cannot start: simulated crash' >&2\nexit 3\n",
        ),
        ("1.0.2", "#!/bin/sh\nexec sleep 60\n"),
    ] {
        fixture::setup_root(&env.root, Path::new(BINARY), &[(v.into(), false)], env.addr).unwrap();
        std::fs::write(paths.release_binary(v), script).unwrap();
    }
    // Serve in the foreground with a short ready timeout; its stderr (and the failed
    // successors') goes to the log, as for a detached service.
    std::fs::create_dir_all(paths.log_dir()).unwrap();
    let log = std::fs::File::create(paths.log_file()).unwrap();
    let mut server = tokio::process::Command::new(paths.release_binary("1.0.0"))
        .args([
            "serve",
            "--root",
            env.root.to_str().unwrap(),
            "--version",
            "1.0.0",
        ])
        .args(["--ready-timeout-ms", "1000"])
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = server.id().unwrap();
    assert!(
        wait_until(Duration::from_secs(15), || paths.read_pid()
            == Some(pid as i32))
        .await,
        "server did not start"
    );

    let activate_with_old_binary = |to: &'static str| {
        let root = env.root.to_str().unwrap().to_owned();
        let bin = paths.release_binary("1.0.0");
        async move {
            tokio::process::Command::new(bin)
                .args(["activate", "--root", &root, "--from", "1.0.0", "--to", to])
                .output()
                .await
                .unwrap()
        }
    };
    for (to, why) in [
        ("1.0.1", "stopped before it was ready"),
        ("1.0.2", "was not ready within"),
    ] {
        let out = activate_with_old_binary(to).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "activation of {to} should fail");
        assert!(
            stderr.contains(&format!("handover to {to} failed")) && stderr.contains(why),
            "{stderr}"
        );
        assert_eq!(stderr.trim().lines().count(), 1, "one clear line: {stderr}");
        let (status, h) = env.health().await;
        assert_eq!(
            (status, h.version.as_str(), h.pid),
            (200, "1.0.0", Some(pid))
        );
        // The failed successor is gone: it must not keep a copy of the listening socket.
        let successor: i32 = stderr
            .split("(pid ")
            .nth(2)
            .and_then(|s| s.split(')').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no successor pid in {stderr}"));
        assert_ne!(successor, pid as i32);
        assert!(
            !proc::is_alive(successor),
            "successor {successor} of {to} left running"
        );
    }
    assert!(env.log().contains("simulated crash"), "{}", env.log());
    let _ = server.start_kill();
    let _ = server.wait().await;
}

#[tokio::test]
async fn activation_without_config_fails_with_one_clear_line() {
    let env = Env::new(1, &[]);
    std::fs::remove_file(env.paths().config_file()).unwrap();
    let out = fixture::run_hook(&env.root, "none", "1.0.0", HOOK_TIMEOUT)
        .await
        .unwrap();
    assert!(!out.success);
    assert!(
        out.stderr.contains("demo-service.toml") && out.stderr.contains("listen"),
        "{}",
        out.stderr
    );
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
}

#[tokio::test]
async fn start_and_stop_with_graceful_drain() {
    let env = Env::new(2, &[]);
    let root = env.root.to_str().unwrap();
    let out = env
        .run(&["start", "--root", root, "--version", "1.0.0"])
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pid = env.health().await.1.pid.unwrap() as i32;
    // Idempotent for the same version, refused for another.
    assert!(
        env.run(&["start", "--root", root, "--version", "1.0.0"])
            .await
            .status
            .success()
    );
    let other = env
        .run(&["start", "--root", root, "--version", "1.0.1"])
        .await;
    assert!(!other.status.success());
    assert!(String::from_utf8_lossy(&other.stderr).contains("already running"));

    // An idle keep-alive connection is drained, not cut: stop waits for its next answer.
    let mut conn = RawConn::open(env.addr).await;
    assert_eq!(conn.get("/").await.unwrap().status, 200);
    let stop = tokio::process::Command::new(BINARY)
        .args(["stop", "--root", root])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // SIGTERM closes the listener first: new connections are refused from then on.
    let addr = env.addr;
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect(addr).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "service kept accepting after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(proc::is_alive(pid), "still draining its idle connection");
    let last = conn.get("/").await.unwrap();
    assert_eq!((last.status, last.close), (200, true));
    let out = tokio::time::timeout(HOOK_TIMEOUT, stop.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("stopped"));
    assert!(!proc::is_alive(pid));
    assert!(!env.paths().pid_file().exists());
    assert!(!env.paths().control_socket().exists());

    let again = env.run(&["stop", "--root", root]).await;
    assert!(String::from_utf8_lossy(&again.stdout).contains("not running"));
    // After a stop (or a reboot) activate starts the service again.
    env.activate("1.0.0", "1.0.1").await;
    assert_eq!(env.health().await.1.version, "1.0.1");
}

#[tokio::test]
async fn after_a_crash_activate_starts_the_release_afresh() {
    let env = Env::new(2, &[]);
    env.activate("none", "1.0.0").await;
    let pid = env.health().await.1.pid.unwrap() as i32;
    // A crash (or a node restart) leaves a stale pid file and control socket behind.
    proc::signal(pid, proc::Signal::KILL).unwrap();
    assert!(proc::wait_for_exit(pid, Duration::from_secs(10)));
    assert!(env.paths().control_socket().exists());
    let out = env.activate("1.0.0", "1.0.1").await;
    assert!(out.contains("demo-service 1.0.1 started"), "{out}");
    let (status, h) = env.health().await;
    assert_eq!((status, h.version.as_str()), (200, "1.0.1"));
    assert_ne!(h.pid, Some(pid as u32));
}

#[test]
fn service_binary_is_found_next_to_the_build_output() {
    if std::env::var_os(orch_demo_service::layout::SERVICE_BINARY_ENV).is_some() {
        return;
    }
    let found = orch_demo_service::find_service_binary().unwrap();
    assert_eq!(
        std::fs::canonicalize(found).unwrap(),
        std::fs::canonicalize(BINARY).unwrap()
    );
}
