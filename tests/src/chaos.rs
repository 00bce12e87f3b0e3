//! Seeded chaos with invariants (issue #14).
//!
//! A run is chosen entirely by a seed (a `u64` fed to SplitMix64): a good or a broken package,
//! the canary, the batch size, the failure policy (roll back, or pause and then be rolled back
//! by the runner as an operator would), `--no-permanent` now and then, and a schedule of faults
//! with their start times and durations. The runner starts the rollout, plays the schedule,
//! heals everything, drives the rollout to a terminal phase (promoting a canary, rolling back a
//! paused failure, and sending `rollback` again, up to 3 times, to a rollout that ended
//! `rollback_failed`) and checks the invariants:
//!
//! 1. the rollout reaches a terminal phase within a deadline after healing;
//! 2. every node's versions agree with that phase: `succeeded` all on the target (permanent
//!    unless `--no-permanent`), `rolled_back`/`aborted` all back on the version they ran before,
//!    `rollback_failed` exactly the nodes it names differ;
//! 3. every node's release store is valid: `node versions` reads it, one permanent release, at
//!    most one current, and every listed release's directory exists;
//! 4. no agent accepted a fence older than one it had accepted before (its audit log: the
//!    fences of `ok` lines, in order, by `(term, rollout number, step)`; pushes aside: they
//!    are audited when their last byte arrived, not when they were admitted);
//! 5. the coordinators agree: each one's own replicated copy of the rollout (a stale read of
//!    that coordinator alone) becomes identical to the others' (in the phase the run ended
//!    in), which can only happen when
//!    they applied the same committed entries for it;
//! 6. the package the rollout names is held (its blob file present) by a majority of the
//!    coordinators, so the state never refers to bytes they cannot serve.
//!
//! Two back ends implement [`Backend`]: [`ProcessBackend`] (processes on loopback: kill -9 and
//! restart, SIGSTOP/SIGCONT of coordinators and agents) and [`ContainerBackend`] (the
//! [`crate::containers::Bed`]: kill and start, pause and unpause, disconnect and connect,
//! including the leader cut from its peers but still reaching the agents).
//!
//! A soak reuses one cluster across runs (each a rollout to the next patch version) and starts
//! a fresh cluster only when a run leaves nodes on different versions (`rollback_failed`), after
//! a violation, or every [`RUNS_PER_CLUSTER`] runs (each run leaves a release on every node).

use std::collections::BTreeMap;
use std::fmt;
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster::{Cluster, ClusterOpts};
use crate::containers::{Bed, BedOpts};
use crate::{local, read_or_empty, run_bounded, stderr, stdout};

/// A fresh cluster after this many runs on one (releases pile up on every node).
pub const RUNS_PER_CLUSTER: usize = 30;
/// How long a rollout may take to end once every fault is healed.
pub const SETTLE: Duration = Duration::from_secs(180);
/// How long the coordinators' copies may take to agree once the rollout ended.
const AGREE: Duration = Duration::from_secs(60);
/// The version every fresh cluster runs.
pub const FIRST_VERSION: (u64, u64, u64) = (4, 2, 0);

// ---------------------------------------------------------------------------------------------
// The seed

/// SplitMix64: a tiny, well-mixed generator; the same seed gives the same run plan everywhere.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len() as u64) as usize]
    }
}

/// The seed of run `i` of a soak started with `base` (each run replays alone from its own).
pub fn run_seed(base: u64, i: u64) -> u64 {
    Rng::new(base ^ i.wrapping_mul(0xA24B_AED4_963E_E407)).next_u64()
}

// ---------------------------------------------------------------------------------------------
// Plans

/// What a fault does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    /// SIGKILL (a container: `docker kill`), started again when the fault ends.
    KillCoordinator,
    /// SIGSTOP (a container: `docker pause`) until the fault ends: a hung machine.
    HangCoordinator,
    KillAgent,
    HangAgent,
    /// The leader cut from the other coordinators, still reaching the agents (containers).
    CutLeaderFromPeers,
    /// A coordinator cut from every network (containers).
    PartitionCoordinator,
    /// An agent cut from the network (containers).
    PartitionAgent,
}

impl FaultKind {
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillCoordinator => "kill_coordinator",
            FaultKind::HangCoordinator => "hang_coordinator",
            FaultKind::KillAgent => "kill_agent",
            FaultKind::HangAgent => "hang_agent",
            FaultKind::CutLeaderFromPeers => "cut_leader_from_peers",
            FaultKind::PartitionCoordinator => "partition_coordinator",
            FaultKind::PartitionAgent => "partition_agent",
        }
    }

    fn on_coordinator(self) -> bool {
        matches!(
            self,
            FaultKind::KillCoordinator
                | FaultKind::HangCoordinator
                | FaultKind::CutLeaderFromPeers
                | FaultKind::PartitionCoordinator
        )
    }
}

/// Which party a fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Whoever leads when the fault starts.
    Leader,
    /// Coordinator id (1-based).
    Coordinator(u64),
    /// Node index (1-based: `n1` is 1).
    Node(usize),
}

/// One scheduled fault: it starts `at` after the rollout was accepted and lasts `lasts`.
#[derive(Debug, Clone, Copy)]
pub struct Fault {
    pub kind: FaultKind,
    pub target: Target,
    pub at: Duration,
    pub lasts: Duration,
}

/// Everything a seed decides.
#[derive(Debug, Clone)]
pub struct Plan {
    pub seed: u64,
    pub broken: bool,
    pub canary: u32,
    pub batch_size: u32,
    /// `--on-failure pause` (the runner then rolls back, as an operator would).
    pub pause_on_failure: bool,
    pub permanent: bool,
    pub faults: Vec<Fault>,
}

impl Plan {
    /// The plan of `seed` for a cluster of `coordinators` and `nodes` whose back end can inject
    /// `kinds`. At most one coordinator is faulty at a time (a majority stays), so that a run
    /// can always end; agents may all fail at once.
    pub fn from_seed(seed: u64, kinds: &[FaultKind], coordinators: usize, nodes: usize) -> Plan {
        let mut r = Rng::new(seed);
        let broken = r.chance(30);
        let canary = if r.chance(25) { 1 } else { 0 };
        let batch_size = 1 + r.below(2) as u32;
        let pause_on_failure = r.chance(25);
        let permanent = !r.chance(10);
        let mut faults: Vec<Fault> = Vec::new();
        // Most runs take a few seconds: faults start early enough to land in them.
        let count = if r.chance(10) { 0 } else { 1 + r.below(4) };
        for _ in 0..count {
            let kind = r.pick(kinds);
            let target = if kind == FaultKind::CutLeaderFromPeers {
                Target::Leader
            } else if kind.on_coordinator() {
                if r.chance(50) {
                    Target::Leader
                } else {
                    Target::Coordinator(1 + r.below(coordinators as u64))
                }
            } else {
                Target::Node(1 + r.below(nodes as u64) as usize)
            };
            let at = Duration::from_millis(r.below(4000));
            let lasts = Duration::from_millis(300 + r.below(4000));
            let fault = Fault {
                kind,
                target,
                at,
                lasts,
            };
            // One coordinator fault at a time: a second one overlapping is dropped.
            let overlaps =
                |f: &Fault| f.kind.on_coordinator() && f.at < at + lasts && at < f.at + f.lasts;
            if kind.on_coordinator() && faults.iter().any(overlaps) {
                continue;
            }
            faults.push(fault);
        }
        faults.sort_by_key(|f| f.at);
        Plan {
            seed,
            broken,
            canary,
            batch_size,
            pause_on_failure,
            permanent,
            faults,
        }
    }

    /// The `rollout` arguments (without the version and package).
    fn rollout_args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "--batch-size".into(),
            self.batch_size.to_string(),
            "--canary".into(),
            self.canary.to_string(),
            "--min-healthy-time".into(),
            "1s".into(),
            "--healthy-deadline".into(),
            "15s".into(),
            "--on-failure".into(),
            if self.pause_on_failure {
                "pause"
            } else {
                "rollback"
            }
            .into(),
        ];
        if !self.permanent {
            a.push("--no-permanent".into());
        }
        a
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} package, canary {}, batch {}, on failure {}{}; faults:",
            if self.broken { "broken" } else { "good" },
            self.canary,
            self.batch_size,
            if self.pause_on_failure {
                "pause"
            } else {
                "rollback"
            },
            if self.permanent {
                ""
            } else {
                ", --no-permanent"
            },
        )?;
        if self.faults.is_empty() {
            write!(f, " none")?;
        }
        for x in &self.faults {
            write!(
                f,
                " {}({:?}) at {}ms for {}ms;",
                x.kind.name(),
                x.target,
                x.at.as_millis(),
                x.lasts.as_millis()
            )?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Back ends

/// A fault as injected: what to undo when it ends.
#[derive(Debug, Clone)]
pub struct Injected {
    pub kind: FaultKind,
    /// `c2`, `n1`, ...
    pub who: String,
}

/// A cluster the runner can fault, observe and heal.
pub trait Backend {
    fn name(&self) -> &'static str;
    /// The fault kinds this back end can inject.
    fn kinds(&self) -> &'static [FaultKind];
    fn coordinators(&self) -> usize;
    fn nodes(&self) -> usize;
    /// Replaces the cluster by a fresh one on [`FIRST_VERSION`].
    fn fresh(&mut self);
    /// The package of `version` (a good demo service or a broken one) as the CLI names it.
    fn package(&mut self, version: &str, broken: bool) -> String;
    /// `orchestrator ARGS` against every coordinator.
    fn cli(&self, args: &[&str]) -> Output;
    /// `orchestrator ARGS` against coordinator `id` alone.
    fn cli_via(&self, id: u64, args: &[&str]) -> Output;
    /// Starts a fault on `who` (`c1`, `n2`); false when the fault could not be injected (the
    /// engine refused, say), which is then not counted.
    fn inject(&mut self, kind: FaultKind, who: &str) -> bool;
    /// Ends it.
    fn heal(&mut self, f: &Injected);
    /// `versions --json` of node `i`'s own store, read locally (`None`: unreadable).
    fn versions(&self, node: usize) -> Option<Value>;
    /// Whether `ROOT/REL` exists on node `i`.
    fn node_has(&self, node: usize, rel: &str) -> bool;
    /// Node `i`'s audit log, rotated files first (oldest lines first).
    fn audit(&self, node: usize) -> String;
    /// Whether coordinator `id` holds the blob `sha256`.
    fn holds_blob(&self, id: u64, sha256: &str) -> bool;
    /// The last lines of every party's log, for a failing run.
    fn logs(&self) -> String;
}

fn json_of(o: &Output) -> Option<Value> {
    if !o.status.success() {
        return None;
    }
    serde_json::from_str(stdout(o).trim()).ok()
}

/// `docker ARGS`; whether it succeeded (the engine can refuse under load: "unable to freeze").
fn try_docker(args: &[&str]) -> bool {
    let o = crate::containers::docker(args);
    if !o.status.success() {
        println!("  docker {args:?} failed: {}", stderr(&o).trim());
    }
    o.status.success()
}

/// `docker ARGS` until it succeeds (3 tries): healing must not be skipped by a hiccup.
fn retry_docker(args: &[&str]) {
    for _ in 0..3 {
        if try_docker(args) {
            return;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The leader id as the coordinators report it (0: none answers or none leads).
fn leader_of(b: &dyn Backend) -> u64 {
    json_of(&b.cli(&["cluster", "status", "--json", "--timeout", "3s"]))
        .and_then(|v| v["leader_id"].as_u64())
        .unwrap_or(0)
}

/// Processes on loopback: 3 coordinators and 3 demo nodes.
pub struct ProcessBackend {
    cluster: Option<Cluster>,
    coordinators: usize,
    nodes: usize,
}

impl ProcessBackend {
    pub fn new(coordinators: usize, nodes: usize) -> ProcessBackend {
        ProcessBackend {
            cluster: None,
            coordinators,
            nodes,
        }
    }

    fn c(&self) -> &Cluster {
        self.cluster
            .as_ref()
            .expect("no cluster: call fresh() first")
    }

    fn c_mut(&mut self) -> &mut Cluster {
        self.cluster
            .as_mut()
            .expect("no cluster: call fresh() first")
    }

    fn node_root(&self, i: usize) -> std::path::PathBuf {
        self.c().nodes[i - 1].root.clone()
    }
}

/// Sends `sig` to `pid` (one of our own children).
fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on a child the harness holds (not reaped, so the pid is not reused).
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

fn coord_id(who: &str) -> u64 {
    who.trim_start_matches('c').parse().unwrap_or(0)
}

fn node_index(who: &str) -> usize {
    who.trim_start_matches('n').parse().unwrap_or(0)
}

impl Backend for ProcessBackend {
    fn name(&self) -> &'static str {
        "process"
    }

    fn kinds(&self) -> &'static [FaultKind] {
        &[
            FaultKind::KillCoordinator,
            FaultKind::HangCoordinator,
            FaultKind::KillAgent,
            FaultKind::HangAgent,
        ]
    }

    fn coordinators(&self) -> usize {
        self.coordinators
    }

    fn nodes(&self) -> usize {
        self.nodes
    }

    fn fresh(&mut self) {
        self.cluster = None;
        self.cluster = Some(Cluster::start(ClusterOpts::demo(
            self.coordinators,
            self.nodes,
        )));
    }

    fn package(&mut self, version: &str, broken: bool) -> String {
        self.c().package(version, broken).display().to_string()
    }

    fn cli(&self, args: &[&str]) -> Output {
        self.c().cli(args)
    }

    fn cli_via(&self, id: u64, args: &[&str]) -> Output {
        let c = self.c();
        let addr = c.coords.iter().find(|p| p.id == id).map(|p| p.addr.clone());
        run_bounded(
            c.cli_cmd_via(&[addr.unwrap_or_default()], args),
            crate::CLI_TIMEOUT,
        )
    }

    fn inject(&mut self, kind: FaultKind, who: &str) -> bool {
        let c = self.c_mut();
        match kind {
            FaultKind::KillCoordinator => c.coord(coord_id(who)).kill9(),
            FaultKind::HangCoordinator => {
                if let Some(pid) = c.coord(coord_id(who)).pid() {
                    signal(pid, libc::SIGSTOP);
                }
            }
            FaultKind::KillAgent => c.nodes[node_index(who) - 1].kill_agent(),
            FaultKind::HangAgent => {
                if let Some(a) = &c.nodes[node_index(who) - 1].agent {
                    signal(a.pid(), libc::SIGSTOP);
                }
            }
            other => panic!("the process back end cannot inject {}", other.name()),
        }
        true
    }

    fn heal(&mut self, f: &Injected) {
        let c = self.c_mut();
        match f.kind {
            FaultKind::KillCoordinator => {
                let p = c.coord(coord_id(&f.who));
                if !p.is_running() {
                    p.restart();
                }
            }
            FaultKind::HangCoordinator => {
                if let Some(pid) = c.coord(coord_id(&f.who)).pid() {
                    signal(pid, libc::SIGCONT);
                }
            }
            FaultKind::KillAgent => {
                let n = &mut c.nodes[node_index(&f.who) - 1];
                if n.agent.is_none() {
                    n.restart_agent();
                }
            }
            FaultKind::HangAgent => {
                if let Some(a) = &c.nodes[node_index(&f.who) - 1].agent {
                    signal(a.pid(), libc::SIGCONT);
                }
            }
            _ => {}
        }
    }

    fn versions(&self, node: usize) -> Option<Value> {
        json_of(&local(&self.node_root(node), &["versions", "--json"]))
    }

    fn node_has(&self, node: usize, rel: &str) -> bool {
        self.node_root(node).join(rel).exists()
    }

    fn audit(&self, node: usize) -> String {
        let dir = self.node_root(node).join("agent");
        let mut s = String::new();
        for f in ["audit.log.3", "audit.log.2", "audit.log.1", "audit.log"] {
            s.push_str(&read_or_empty(&dir.join(f)));
        }
        s
    }

    fn holds_blob(&self, id: u64, sha256: &str) -> bool {
        let c = self.c();
        c.coords
            .iter()
            .find(|p| p.id == id)
            .is_some_and(|p| p.data_dir.join("blobs").join(sha256).is_file())
    }

    fn logs(&self) -> String {
        self.cluster.as_ref().map(Cluster::logs).unwrap_or_default()
    }
}

/// The container bed: 3 coordinators and 3 demo nodes on Docker networks.
pub struct ContainerBackend {
    bed: Option<Bed>,
    coordinators: usize,
    nodes: usize,
    /// Versions whose packages were made in the CLI container (`/tmp/pkgs/{ok,broken}`).
    made: Vec<(String, bool)>,
}

impl ContainerBackend {
    pub fn new(coordinators: usize, nodes: usize) -> ContainerBackend {
        ContainerBackend {
            bed: None,
            coordinators,
            nodes,
            made: Vec::new(),
        }
    }

    fn b(&self) -> &Bed {
        self.bed.as_ref().expect("no bed: call fresh() first")
    }
}

impl Backend for ContainerBackend {
    fn name(&self) -> &'static str {
        "containers"
    }

    fn kinds(&self) -> &'static [FaultKind] {
        &[
            FaultKind::KillCoordinator,
            FaultKind::HangCoordinator,
            FaultKind::KillAgent,
            FaultKind::HangAgent,
            FaultKind::CutLeaderFromPeers,
            FaultKind::PartitionCoordinator,
            FaultKind::PartitionAgent,
        ]
    }

    fn coordinators(&self) -> usize {
        self.coordinators
    }

    fn nodes(&self) -> usize {
        self.nodes
    }

    fn fresh(&mut self) {
        self.bed = None;
        self.made.clear();
        self.bed = Some(Bed::start(BedOpts::new(self.coordinators, self.nodes)));
    }

    fn package(&mut self, version: &str, broken: bool) -> String {
        let dir = if broken {
            "/tmp/pkgs/broken"
        } else {
            "/tmp/pkgs/ok"
        };
        let path = format!("{dir}/demo-service-{version}.zip");
        if !self.made.contains(&(version.to_string(), broken)) {
            let mut args = vec!["demo", "package", version, "--out", dir];
            if broken {
                args.push("--broken");
            }
            let o = self.b().cli(&args);
            assert!(
                o.status.success(),
                "demo package {version} in the CLI container: {}{}",
                stdout(&o),
                stderr(&o)
            );
            self.made.push((version.to_string(), broken));
        }
        path
    }

    fn cli(&self, args: &[&str]) -> Output {
        self.b().cli_within(args, Duration::from_secs(60))
    }

    fn cli_via(&self, id: u64, args: &[&str]) -> Output {
        let addr = format!("c{id}:7000");
        let mut a: Vec<&str> = args.to_vec();
        a.extend(["--coordinator", &addr]);
        self.b().cli_within(&a, Duration::from_secs(60))
    }

    fn inject(&mut self, kind: FaultKind, who: &str) -> bool {
        let c = self.b().container(who);
        let net = |which: &str| format!("{}-{which}", self.b().name);
        match kind {
            FaultKind::KillCoordinator | FaultKind::KillAgent => try_docker(&["kill", &c]),
            FaultKind::HangCoordinator | FaultKind::HangAgent => try_docker(&["pause", &c]),
            FaultKind::CutLeaderFromPeers => {
                try_docker(&["network", "disconnect", &net("raft"), &c])
            }
            FaultKind::PartitionCoordinator => {
                // Both or nothing: a half-cut coordinator is another fault.
                try_docker(&["network", "disconnect", &net("raft"), &c])
                    && (try_docker(&["network", "disconnect", &net("nodes"), &c])
                        || !try_docker(&[
                            "network",
                            "connect",
                            "--alias",
                            &format!("{who}-raft"),
                            &net("raft"),
                            &c,
                        ]))
            }
            FaultKind::PartitionAgent => try_docker(&["network", "disconnect", &net("nodes"), &c]),
        }
    }

    fn heal(&mut self, f: &Injected) {
        let c = self.b().container(&f.who);
        let net = |which: &str| format!("{}-{which}", self.b().name);
        let raft_alias = format!("{}-raft", f.who);
        let connect = |which: &str, alias: &str| {
            retry_docker(&["network", "connect", "--alias", alias, &net(which), &c]);
        };
        match f.kind {
            FaultKind::KillCoordinator | FaultKind::KillAgent => retry_docker(&["start", &c]),
            FaultKind::HangCoordinator | FaultKind::HangAgent => retry_docker(&["unpause", &c]),
            FaultKind::CutLeaderFromPeers => connect("raft", &raft_alias),
            FaultKind::PartitionCoordinator => {
                connect("raft", &raft_alias);
                connect("nodes", &f.who);
            }
            FaultKind::PartitionAgent => connect("nodes", &f.who),
        }
    }

    fn versions(&self, node: usize) -> Option<Value> {
        json_of(&self.b().sh(
            &format!("n{node}"),
            "orchestrator node versions --json --root-dir /data",
        ))
    }

    fn node_has(&self, node: usize, rel: &str) -> bool {
        let o = self
            .b()
            .sh(&format!("n{node}"), &format!("[ -e /data/{rel} ]"));
        o.status.success()
    }

    fn audit(&self, node: usize) -> String {
        let short = format!("n{node}");
        let mut s = String::new();
        for f in ["audit.log.3", "audit.log.2", "audit.log.1", "audit.log"] {
            s.push_str(&self.b().read_file(&short, &format!("/data/agent/{f}")));
        }
        s
    }

    fn holds_blob(&self, id: u64, sha256: &str) -> bool {
        let o = self
            .b()
            .sh(&format!("c{id}"), &format!("[ -f /data/blobs/{sha256} ]"));
        o.status.success()
    }

    fn logs(&self) -> String {
        self.bed.as_ref().map(Bed::all_logs).unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------------------------
// One run

/// What one run did and found.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub seed: u64,
    pub plan: String,
    pub rollout: String,
    /// The terminal phase (empty: none reached).
    pub phase: String,
    /// Faults injected, by kind.
    pub faults: Vec<FaultKind>,
    pub violations: Vec<String>,
    /// Every node runs this version after the run (`None`: they differ, or it is unknown).
    pub all_on: Option<String>,
    /// `rollback` commands sent again after `rollback_failed`.
    pub rollback_retries: u32,
    pub took: Duration,
    /// Agents killed (a container: restarted, so its node booted its permanent release), with
    /// the wall-clock ms just before the kill.
    pub agent_kills: Vec<(String, u64)>,
}

/// `4.2.N`.
pub fn version_string(v: (u64, u64, u64)) -> String {
    format!("{}.{}.{}", v.0, v.1, v.2)
}

/// Starts the rollout (retrying while no leader answers); its id.
fn start_rollout(b: &mut dyn Backend, plan: &Plan, to: &str, pkg: &str) -> Result<String, String> {
    let mut args: Vec<String> = vec![
        "rollout".into(),
        to.into(),
        "--package".into(),
        pkg.into(),
        "--detach".into(),
        "--json".into(),
        "--timeout".into(),
        "30s".into(),
    ];
    args.extend(plan.rollout_args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut last = String::new();
    for _ in 0..5 {
        let o = b.cli(&args);
        if let Some(id) = json_of(&o).and_then(|v| v["id"].as_str().map(String::from)) {
            return Ok(id);
        }
        last = format!("{}{}", stdout(&o), stderr(&o));
        std::thread::sleep(Duration::from_secs(2));
    }
    Err(format!("the rollout could not be started: {last}"))
}

/// Plays the schedule from `t0`; returns the faults injected. Every fault is healed before it
/// returns.
fn play(b: &mut dyn Backend, plan: &Plan, t0: Instant, report: &mut RunReport) {
    // (when, start?, index into plan.faults)
    let mut agenda: Vec<(Duration, bool, usize)> = Vec::new();
    for (i, f) in plan.faults.iter().enumerate() {
        agenda.push((f.at, true, i));
        agenda.push((f.at + f.lasts, false, i));
    }
    agenda.sort_by_key(|(t, start, _)| (*t, *start));
    let mut live: BTreeMap<usize, Injected> = BTreeMap::new();
    let mut done = Vec::new();
    for (when, start, i) in agenda {
        if let Some(wait) = when.checked_sub(t0.elapsed()) {
            std::thread::sleep(wait);
        }
        let f = plan.faults[i];
        if !start {
            if let Some(inj) = live.remove(&i) {
                b.heal(&inj);
            }
            continue;
        }
        let who = match f.target {
            Target::Leader => match leader_of(b) {
                0 => continue,
                id => format!("c{id}"),
            },
            Target::Coordinator(id) => format!("c{id}"),
            Target::Node(i) => format!("n{i}"),
        };
        // One fault per party at a time (a later one on the same party is dropped).
        if live.values().any(|x| x.who == who) {
            continue;
        }
        let at_ms = wall_ms();
        if !b.inject(f.kind, &who) {
            println!(
                "  (could not inject {} on {who}: not counted)",
                f.kind.name()
            );
            continue;
        }
        done.push(f.kind);
        if f.kind == FaultKind::KillAgent {
            report.agent_kills.push((who.clone(), at_ms));
        }
        live.insert(i, Injected { kind: f.kind, who });
    }
    for inj in live.values() {
        b.heal(inj);
    }
    report.faults = done;
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// With `--no-permanent`, when node `id` last confirmed the target before the rollout ended
/// (its final check's event), in the coordinators' wall-clock ms.
fn final_check_ms(st: &Value, id: &str, to: &str) -> Option<u64> {
    event_ms(st, &format!("{id}: still runs {to}, healthy"))
}

/// When the rollout's last event with exactly this message was recorded.
fn event_ms(st: &Value, needle: &str) -> Option<u64> {
    st["events"]
        .as_array()?
        .iter()
        .rev()
        .find(|e| e["message"].as_str() == Some(needle))
        .and_then(|e| e["at_ms"].as_u64())
}

/// Polls the rollout until it ends; promotes a waiting canary and rolls back a paused one, as
/// an operator would. The last status seen, and whether it is terminal.
fn settle(b: &dyn Backend, id: &str) -> (Value, bool) {
    let start = Instant::now();
    let mut last = Value::Null;
    while start.elapsed() < SETTLE {
        if let Some(st) = json_of(&b.cli(&["status", id, "--json", "--timeout", "5s"])) {
            let phase = st["phase"].as_str().unwrap_or_default().to_string();
            if matches!(
                phase.as_str(),
                "succeeded" | "rolled_back" | "rollback_failed" | "aborted"
            ) {
                return (st, true);
            }
            if st["awaiting_promotion"] == true {
                let _ = b.cli(&["promote", id, "--json"]);
            } else if phase == "paused" {
                let _ = b.cli(&["rollback", id, "--json"]);
            }
            last = st;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    (last, false)
}

/// Runs one seeded rollout from `from` (every node runs it) to `to` and checks the
/// invariants.
pub fn run_one(b: &mut dyn Backend, seed: u64, from: &str, to: &str) -> RunReport {
    let t = Instant::now();
    let plan = Plan::from_seed(seed, b.kinds(), b.coordinators(), b.nodes());
    let mut report = RunReport {
        seed,
        plan: plan.to_string(),
        rollout: String::new(),
        phase: String::new(),
        faults: Vec::new(),
        violations: Vec::new(),
        all_on: None,
        rollback_retries: 0,
        took: Duration::ZERO,
        agent_kills: Vec::new(),
    };
    let pkg = b.package(to, plan.broken);
    // What each node runs and holds permanent before: a node the rollout never touched, or a
    // `--no-permanent` success, keeps its permanent release.
    let before: Vec<Option<(String, String)>> = (1..=b.nodes())
        .map(|i| b.versions(i).as_ref().and_then(running))
        .collect();
    match start_rollout(b, &plan, to, &pkg) {
        Ok(id) => report.rollout = id,
        Err(e) => {
            report.violations.push(e);
            report.took = t.elapsed();
            return report;
        }
    }
    play(b, &plan, Instant::now(), &mut report);
    let (mut st, mut ended) = settle(b, &report.rollout);
    // Everything is healed: a node that could not be rolled back can be now (`rollback` again,
    // as the operator of a `rollback_failed` rollout would).
    while ended && st["phase"] == "rollback_failed" && report.rollback_retries < 3 {
        report.rollback_retries += 1;
        let _ = b.cli(&["rollback", &report.rollout, "--json"]);
        (st, ended) = settle(b, &report.rollout);
    }
    report.phase = st["phase"].as_str().unwrap_or_default().to_string();
    if !ended {
        report.violations.push(format!(
            "rollout {} did not end within {SETTLE:?} of healing: {st}",
            report.rollout
        ));
    } else {
        check_invariants(b, &plan, &st, (from, to), &before, &mut report);
    }
    report.took = t.elapsed();
    report
}

/// The release a node runs: its `current` one, else its `permanent` one.
fn running(versions: &Value) -> Option<(String, String)> {
    let a = versions.as_array()?;
    let of = |state: &str| {
        a.iter()
            .find(|e| e["state"] == state)
            .and_then(|e| e["version"].as_str().map(String::from))
    };
    let permanent = of("permanent")?;
    Some((
        of("current").unwrap_or_else(|| permanent.clone()),
        permanent,
    ))
}

/// Invariants 2–6 (the rollout ended: invariant 1).
fn check_invariants(
    b: &dyn Backend,
    plan: &Plan,
    st: &Value,
    (from, to): (&str, &str),
    before: &[Option<(String, String)>],
    report: &mut RunReport,
) {
    let v = &mut report.violations;
    let phase = report.phase.as_str();
    let failed_nodes: Vec<String> = st["nodes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|n| n["step"] == "rollback_failed")
                .filter_map(|n| n["id"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    if phase == "rollback_failed" && failed_nodes.is_empty() {
        v.push(format!("rollback_failed names no node: {st}"));
    }
    let mut all_on: Option<String> = None;
    let mut same = true;
    for i in 1..=b.nodes() {
        let id = format!("n{i}");
        let Some(vers) = b.versions(i) else {
            v.push(format!("{id}: its release store cannot be read"));
            same = false;
            continue;
        };
        check_store(b, i, &vers, v);
        let Some((run, perm)) = running(&vers) else {
            v.push(format!("{id}: no permanent release: {vers}"));
            same = false;
            continue;
        };
        match all_on.as_deref() {
            None => all_on = Some(run.clone()),
            Some(x) if x != run => same = false,
            _ => {}
        }
        let named = failed_nodes.contains(&id);
        let perm_before = before
            .get(i - 1)
            .and_then(|x| x.as_ref())
            .map(|(_, p)| p.as_str());
        // A node that ran a release without it being permanent (a `--no-permanent` success
        // before) and whose container restarted during this run boots its permanent release.
        // If the rollout never touched it (nothing undone: no `rolled_back` step), that is
        // where it stays, which is the truth the operator was told.
        let step = st["nodes"]
            .as_array()
            .and_then(|a| a.iter().find(|n| n["id"] == id.as_str()))
            .and_then(|n| n["step"].as_str())
            .unwrap_or_default();
        // Likewise a node restarted after its rollback put it back.
        let back_at = event_ms(st, &format!("{id}: rolled back to {from} and healthy"));
        let rebooted_untouched = report.agent_kills.iter().any(|(who, at)| {
            *who == id
                && (!matches!(step, "rolled_back" | "rollback_failed")
                    || back_at.is_some_and(|t| at + 1_000 >= t))
        }) && Some(run.as_str()) == perm_before
            && perm == run;
        let back = (run == from && (perm == from || Some(perm.as_str()) == perm_before))
            || rebooted_untouched;
        // A `--no-permanent` success promises the target ran on each node at its final check;
        // a node whose agent was killed (its container restarted) after that boots its
        // permanent release, as the operator was told.
        let rebooted_after_check = final_check_ms(st, &id, to).is_some_and(|checked| {
            report
                .agent_kills
                .iter()
                // The time is taken just before `docker kill`, which takes a moment: a
                // check answered in that moment still counts as before the kill.
                .any(|(who, at)| *who == id && at + 1_000 >= checked)
        });
        let ok = match phase {
            "succeeded" if plan.permanent => run == to && perm == to,
            "succeeded" => {
                Some(perm.as_str()) == perm_before
                    && (run == to || (rebooted_after_check && run == perm))
            }
            "rolled_back" | "aborted" => back,
            "rollback_failed" => named != back,
            _ => false,
        };
        if !ok {
            v.push(format!(
                "{id}: runs {run} (permanent {perm}) after the rollout ended {phase} (from {from} to {to}{}): {vers}",
                if named { ", named as failed" } else { "" }
            ));
        }
        check_fences(&id, &b.audit(i), v);
    }
    report.all_on = if same && phase != "rollback_failed" {
        all_on
    } else {
        None
    };
    check_agreement(b, &report.rollout, st, v);
    check_package(b, st, v);
}

/// Invariant 3: one permanent release, at most one current, each listed release on disk.
fn check_store(b: &dyn Backend, i: usize, vers: &Value, v: &mut Vec<String>) {
    let a = vers.as_array().cloned().unwrap_or_default();
    let count = |s: &str| a.iter().filter(|e| e["state"] == s).count();
    if count("permanent") != 1 || count("current") > 1 {
        v.push(format!("n{i}: store states are not valid: {vers}"));
    }
    for e in &a {
        let ver = e["version"].as_str().unwrap_or_default();
        if !b.node_has(i, &format!("releases/{ver}")) {
            v.push(format!("n{i}: lists {ver} but releases/{ver} is missing"));
        }
    }
}

/// The fence key `(term, rollout number, step)` of an audit line that was accepted (`ok`).
pub fn accepted_fence(line: &str) -> Option<(u64, u64, u64)> {
    let mut fields = line.split(" | ");
    let head = fields.next()?;
    // A push is admitted in fence order but runs beside other steps (it only adds a file) and
    // is audited when its last byte arrived: its line's place says nothing about admission.
    if fields.next()?.starts_with("push ") || !fields.next()?.starts_with("ok") {
        return None;
    }
    let field = |k: &str| {
        head.split_whitespace()
            .find_map(|t| t.strip_prefix(k))
            .map(String::from)
    };
    let term = field("term=")?.parse().ok()?;
    let rollout = field("rollout=")?.trim_start_matches('r').parse().ok()?;
    let step = field("step=")?.parse().ok()?;
    Some((term, rollout, step))
}

/// Invariant 4: the accepted fences never go back.
pub fn check_fences(id: &str, audit: &str, v: &mut Vec<String>) {
    let mut highest: Option<((u64, u64, u64), &str)> = None;
    for line in audit.lines() {
        let Some(key) = accepted_fence(line) else {
            continue;
        };
        if let Some((h, hl)) = highest
            && key < h
        {
            v.push(format!(
                "{id} accepted an older fence {key:?} after {h:?}:\n  {hl}\n  {line}"
            ));
            return;
        }
        if highest.is_none_or(|(h, _)| key > h) {
            highest = Some((key, line));
        }
    }
}

/// Invariant 5: every coordinator's own copy of the rollout becomes the same (node liveness
/// included, which the leader may still update after the end: compared with each other, not
/// with the status the run ended on).
fn check_agreement(b: &dyn Backend, id: &str, st: &Value, v: &mut Vec<String>) {
    let start = Instant::now();
    let mut differ: Vec<String> = Vec::new();
    while start.elapsed() < AGREE {
        differ.clear();
        let mut first: Option<Value> = None;
        for c in 1..=b.coordinators() as u64 {
            let o = b.cli_via(c, &["status", id, "--json", "--stale", "--timeout", "3s"]);
            match (json_of(&o).map(replicated), &first) {
                (Some(mine), None) if mine["phase"] == st["phase"] => first = Some(mine),
                (Some(mine), Some(f)) if mine == *f => {}
                (Some(mine), _) => differ.push(format!(
                    "c{c} has phase {} with {} events",
                    mine["phase"],
                    mine["events"].as_array().map_or(0, Vec::len)
                )),
                (None, _) => differ.push(format!("c{c} does not answer: {}", stderr(&o).trim())),
            }
        }
        if differ.is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    v.push(format!(
        "the coordinators' copies of {id} did not agree within {AGREE:?} (ended {}): {}",
        st["phase"],
        differ.join("; ")
    ));
}

/// A status without what is not replicated: `stale` (the CLI marks a follower's answer) and
/// each node's `healthy_since_ms` (the leader's volatile health-gate progress).
fn replicated(mut status: Value) -> Value {
    if let Some(o) = status.as_object_mut() {
        o.remove("stale");
    }
    if let Some(nodes) = status["nodes"].as_array_mut() {
        for n in nodes.iter_mut().filter_map(Value::as_object_mut) {
            n.remove("healthy_since_ms");
        }
    }
    status
}

/// Invariant 6: the rollout's package is held by a majority of the coordinators.
fn check_package(b: &dyn Backend, st: &Value, v: &mut Vec<String>) {
    let Some(sha) = st["spec"]["package"]["sha256"].as_str() else {
        v.push(format!("the rollout names no package: {}", st["spec"]));
        return;
    };
    let n = b.coordinators() as u64;
    let held: Vec<u64> = (1..=n).filter(|c| b.holds_blob(*c, sha)).collect();
    if (held.len() as u64) * 2 <= n {
        v.push(format!(
            "package {sha} is held by coordinators {held:?} only, not a majority of {n}"
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// Many runs

/// Totals of a soak.
#[derive(Debug, Default, Clone)]
pub struct Totals {
    pub runs: u64,
    pub by_phase: BTreeMap<String, u64>,
    pub faults: BTreeMap<&'static str, u64>,
    pub violations: u64,
    /// Seeds of the runs with violations.
    pub failed_seeds: Vec<u64>,
    pub fresh_clusters: u64,
    /// Runs that ended `rollback_failed` and were rolled back by `rollback` again.
    pub rollback_retries: u64,
    pub took: Duration,
}

impl fmt::Display for Totals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let faults: u64 = self.faults.values().sum();
        writeln!(
            f,
            "runs: {}; violations: {} (seeds {:?}); clusters started: {}; time: {:.0?}",
            self.runs, self.violations, self.failed_seeds, self.fresh_clusters, self.took
        )?;
        writeln!(
            f,
            "phases: {:?}; rollbacks retried after rollback_failed: {}",
            self.by_phase, self.rollback_retries
        )?;
        write!(f, "faults injected: {faults} {:?}", self.faults)
    }
}

/// Runs `seeds` one after another on `b`, one cluster reused while it can be; prints each run
/// (its seed first, so a failure can be replayed with `ORCH_CHAOS_SEED`).
pub fn soak(b: &mut dyn Backend, seeds: &[u64]) -> Totals {
    soak_within(b, seeds, None)
}

/// [`soak`], starting no new run once `budget` has passed.
pub fn soak_within(b: &mut dyn Backend, seeds: &[u64], budget: Option<Duration>) -> Totals {
    let t = Instant::now();
    let mut totals = Totals::default();
    let mut on: Option<(u64, u64, u64)> = None;
    let mut next = FIRST_VERSION;
    let mut runs_here = 0;
    for (i, &seed) in seeds.iter().enumerate() {
        if budget.is_some_and(|d| t.elapsed() >= d) {
            println!("chaos[{}]: time budget spent after {i} runs", b.name());
            break;
        }
        if on.is_none() || runs_here >= RUNS_PER_CLUSTER {
            b.fresh();
            totals.fresh_clusters += 1;
            on = Some(FIRST_VERSION);
            next = FIRST_VERSION;
            runs_here = 0;
        }
        let from = on.expect("a cluster runs");
        next.2 += 1;
        let to = next;
        println!(
            "chaos[{}] run {}/{} seed={seed} (replay: ORCH_CHAOS_SEED={seed}): {} -> {}",
            b.name(),
            i + 1,
            seeds.len(),
            version_string(from),
            version_string(to),
        );
        let r = run_one(b, seed, &version_string(from), &version_string(to));
        runs_here += 1;
        totals.runs += 1;
        totals.rollback_retries += u64::from(r.rollback_retries);
        *totals.by_phase.entry(r.phase.clone()).or_default() += 1;
        for k in &r.faults {
            *totals.faults.entry(k.name()).or_default() += 1;
        }
        println!(
            "  {}: {} in {:.1?}; {}",
            r.rollout,
            if r.phase.is_empty() {
                "no end"
            } else {
                &r.phase
            },
            r.took,
            r.plan
        );
        if r.violations.is_empty() {
            on = match r.all_on.as_deref() {
                Some(v) if v == version_string(to) => Some(to),
                Some(v) if v == version_string(from) => Some(from),
                _ => None,
            };
        } else {
            totals.violations += r.violations.len() as u64;
            totals.failed_seeds.push(seed);
            println!("  VIOLATIONS of seed {seed} (replay: ORCH_CHAOS_SEED={seed}):");
            for x in &r.violations {
                println!("  - {x}");
            }
            println!("{}", b.logs());
            on = None;
        }
    }
    totals.took = t.elapsed();
    totals
}

/// The seeds to run: `ORCH_CHAOS_SEED=S` replays exactly S; else `runs` seeds derived from
/// `base`.
pub fn seeds(base: u64, runs: u64) -> Vec<u64> {
    if let Some(s) = std::env::var("ORCH_CHAOS_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
    {
        return vec![s];
    }
    (0..runs).map(|i| run_seed(base, i)).collect()
}
