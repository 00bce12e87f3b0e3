//! In-process Raft clusters for tests and the commit benchmark: every node serves its
//! `RaftPeer` service with tonic on 127.0.0.1, each with its own data directory.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use orch_coordinator::raft::{RaftConfig, RaftNode};
use orch_coordinator::state::Command;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Logs to the test output when `RUST_LOG` is set (e.g. `RUST_LOG=openraft=info`).
pub fn init_tracing() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// Polls `cond` every 20 ms until it holds; panics with `what` after `timeout`.
pub async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if cond() {
            return start.elapsed();
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Retries `f` (bounded) until it succeeds; panics with the last error after `timeout`.
pub async fn retry<T, E: std::fmt::Debug, Fut: Future<Output = Result<T, E>>>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Fut,
) -> T {
    let start = Instant::now();
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) if start.elapsed() > timeout => {
                panic!("{what}: still failing after {timeout:?}: {e:?}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// A command that registers agent node `n`.
pub fn register(n: u64) -> Command {
    Command::RegisterNode {
        id: format!("n{n}").parse().unwrap(),
        address: format!("10.0.{}.{}:7000", n / 250, n % 250),
        labels: BTreeMap::new(),
        versions: Vec::new(),
        at_ms: n,
        stamp: None,
        activate_timeout_ms: 0,
    }
}

/// Registered agent nodes in a node's state view.
pub fn registered(node: &RaftNode) -> usize {
    node.state().read().unwrap().nodes.len()
}

struct Server {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

/// One coordinator: its Raft node and the tonic server in front of it.
pub struct TestNode {
    pub id: u64,
    pub addr: String,
    pub dir: PathBuf,
    node: Option<RaftNode>,
    server: Option<Server>,
}

impl TestNode {
    pub fn node(&self) -> &RaftNode {
        self.node
            .as_ref()
            .unwrap_or_else(|| panic!("coordinator {} is not running", self.id))
    }

    pub fn is_running(&self) -> bool {
        self.node.is_some()
    }
}

/// Tunes the configuration of every node a cluster starts.
pub type Tune = fn(&mut RaftConfig);

/// A set of coordinators on loopback. Dropping it (also while unwinding from a panic) shuts
/// every running node down.
pub struct Cluster {
    pub nodes: BTreeMap<u64, TestNode>,
    tune: Tune,
    _tmp: tempfile::TempDir,
}

fn no_tune(_: &mut RaftConfig) {}

impl Cluster {
    /// Reserves `ids` on loopback ports without starting anything.
    pub async fn new(ids: &[u64], tune: Option<Tune>) -> (Cluster, BTreeMap<u64, TcpListener>) {
        init_tracing();
        let tmp = tempfile::tempdir().unwrap();
        let mut nodes = BTreeMap::new();
        let mut listeners = BTreeMap::new();
        for &id in ids {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap().to_string();
            nodes.insert(
                id,
                TestNode {
                    id,
                    addr,
                    dir: tmp.path().join(format!("c{id}")),
                    node: None,
                    server: None,
                },
            );
            listeners.insert(id, l);
        }
        (
            Cluster {
                nodes,
                tune: tune.unwrap_or(no_tune),
                _tmp: tmp,
            },
            listeners,
        )
    }

    /// Starts `ids` as one cluster: every node knows the others as peers; `bootstrap` sets
    /// `--bootstrap` on the first.
    pub async fn start(ids: &[u64], tune: Option<Tune>) -> Cluster {
        let (mut c, mut listeners) = Cluster::new(ids, tune).await;
        let peers: BTreeMap<u64, String> =
            c.nodes.values().map(|n| (n.id, n.addr.clone())).collect();
        for (i, &id) in ids.iter().enumerate() {
            let mut p = peers.clone();
            p.remove(&id);
            let l = listeners.remove(&id).unwrap();
            c.launch(id, p, i == 0, Some(l)).await;
        }
        c
    }

    /// Starts (or restarts from its data directory) coordinator `id`.
    pub async fn launch(
        &mut self,
        id: u64,
        peers: BTreeMap<u64, String>,
        bootstrap: bool,
        listener: Option<TcpListener>,
    ) {
        let tune = self.tune;
        let n = self.nodes.get_mut(&id).expect("unknown coordinator");
        assert!(n.node.is_none(), "coordinator {id} is already running");
        let listener = match listener {
            Some(l) => l,
            None => {
                retry(
                    "rebind the coordinator's port",
                    Duration::from_secs(10),
                    || TcpListener::bind(n.addr.clone()),
                )
                .await
            }
        };
        let mut cfg = RaftConfig::new(id, n.addr.clone(), n.dir.clone(), peers, bootstrap);
        tune(&mut cfg);
        let node = RaftNode::start(cfg).await.expect("start raft node");
        let svc = node.peer_service();
        let (stop, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let incoming = orch_tls::incoming(listener);
            let r = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stop_rx.await;
                })
                .await;
            if let Err(e) = r {
                eprintln!("raft test server: {e}");
            }
        });
        n.node = Some(node);
        n.server = Some(Server { stop, task });
    }

    /// Restarts coordinator `id` from its data directory (same address, no peers, no bootstrap).
    pub async fn restart(&mut self, id: u64) {
        self.launch(id, BTreeMap::new(), false, None).await;
    }

    /// Stops coordinator `id`: Raft shut down, server gone (its port closes).
    pub async fn kill(&mut self, id: u64) {
        let n = self.nodes.get_mut(&id).expect("unknown coordinator");
        if let Some(node) = n.node.take() {
            node.shutdown().await;
        }
        if let Some(s) = n.server.take() {
            let _ = s.stop.send(());
            let mut task = s.task;
            if tokio::time::timeout(Duration::from_secs(5), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
    }

    pub async fn shutdown(&mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.kill(id).await;
        }
    }

    pub fn node(&self, id: u64) -> &RaftNode {
        self.nodes[&id].node()
    }

    pub fn addr(&self, id: u64) -> String {
        self.nodes[&id].addr.clone()
    }

    pub fn running(&self) -> Vec<u64> {
        self.nodes
            .values()
            .filter(|n| n.is_running())
            .map(|n| n.id)
            .collect()
    }

    /// Waits until one running node leads (ready) and every running node knows it.
    pub async fn leader(&self, timeout: Duration) -> u64 {
        let mut found = 0;
        wait_for(
            "a leader known to every running coordinator",
            timeout,
            || {
                let running = self.running();
                let leaders: Vec<u64> = running
                    .iter()
                    .copied()
                    .filter(|&i| self.node(i).is_leader())
                    .collect();
                if leaders.len() != 1 {
                    return false;
                }
                let l = leaders[0];
                let term = self.node(l).current_term();
                let agree = running.iter().all(|&i| {
                    let m = self.node(i).metrics();
                    m.leader.map(|x| x.0) == Some(l) && m.term == term
                });
                if agree {
                    found = l;
                }
                agree
            },
        )
        .await;
        found
    }

    /// Waits until every running node has applied at least `index`.
    pub async fn wait_applied(&self, index: u64, timeout: Duration) {
        wait_for(
            &format!("every running coordinator to apply index {index}"),
            timeout,
            || {
                self.running()
                    .iter()
                    .all(|&i| self.node(i).metrics().last_applied >= index)
            },
        )
        .await;
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let mut nodes = Vec::new();
        for n in self.nodes.values_mut() {
            if let Some(s) = n.server.take() {
                let _ = s.stop.send(());
                s.task.abort();
            }
            if let Some(node) = n.node.take() {
                nodes.push(node);
            }
        }
        if nodes.is_empty() {
            return;
        }
        // Not awaited by the test (it panicked or forgot): shut down on a helper runtime while
        // the test runtime's workers keep running the Raft tasks.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                for n in nodes {
                    let _ = tokio::time::timeout(Duration::from_secs(10), n.shutdown()).await;
                }
            });
        })
        .join();
    }
}
