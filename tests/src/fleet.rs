//! A lightweight fleet: many real gRPC agents in this process (`orch_agent::serve` on port-0
//! loopback listeners, one tokio runtime), each with its own release store in its own
//! directory, so that hundreds of nodes fit on a 2-core machine. The agents register with the
//! given coordinators like any agent process; only the process boundary is missing.

use std::fs;
use std::path::Path;
use std::time::Duration;

use orch_agent::AgentConfig;
use orch_client::{Client, control as pb};
use orch_release::{PackageSource, Store, StoreConfig};
use tokio::runtime::Runtime;

/// Running in-process agents; [`Fleet::stop`] stops them (dropping the runtime does too).
pub struct Fleet {
    stop: tokio::sync::watch::Sender<bool>,
    handles: Vec<tokio::task::JoinHandle<()>>,
    /// Node ids, `n1`.. in order.
    pub ids: Vec<String>,
    /// `127.0.0.1:PORT` of each agent, in the order of `ids`.
    pub addrs: Vec<String>,
}

/// A root with `installed` (a package file) installed permanently, or nothing.
pub fn node_root(root: &Path, installed: Option<&Path>) {
    fs::create_dir_all(root).unwrap();
    let Some(pkg) = installed else {
        return;
    };
    let store = Store::open(StoreConfig::new(root)).unwrap();
    store
        .install(
            &PackageSource::File {
                path: pkg.to_path_buf(),
                sha256: None,
            },
            true,
        )
        .unwrap();
}

impl Fleet {
    /// `n1`, `n2`, ... `n<n>`.
    pub fn ids(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("n{i}")).collect()
    }

    /// Starts an agent per id under `dir/<id>`, plain text, registering with `coordinators`,
    /// each with `installed` installed first.
    pub fn start(
        rt: &Runtime,
        dir: &Path,
        ids: &[String],
        coordinators: &[String],
        installed: Option<&Path>,
    ) -> Fleet {
        let (stop, rx) = tokio::sync::watch::channel(false);
        let mut fleet = Fleet {
            stop,
            handles: Vec::new(),
            ids: Vec::new(),
            addrs: Vec::new(),
        };
        for id in ids {
            let root = dir.join(id);
            node_root(&root, installed);
            let listener = rt
                .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
                .unwrap();
            let local = listener.local_addr().unwrap();
            let mut cfg = AgentConfig::new(
                id.parse().unwrap(),
                root,
                local,
                orch_tls::Security::Insecure,
            );
            cfg.coordinators = coordinators.to_vec();
            cfg.shutdown_grace = Duration::from_secs(2);
            let mut rx = rx.clone();
            let name = id.clone();
            fleet.handles.push(rt.spawn(async move {
                let shutdown = async move {
                    let _ = rx.changed().await;
                };
                if let Err(e) = orch_agent::serve(cfg, listener, shutdown).await {
                    eprintln!("agent {name}: {e}");
                }
            }));
            fleet.ids.push(id.clone());
            fleet.addrs.push(local.to_string());
        }
        fleet
    }

    /// Stops every agent and waits (a few seconds at most each) for them to finish.
    pub fn stop(self, rt: &Runtime) {
        let _ = self.stop.send(true);
        rt.block_on(async {
            for h in self.handles {
                let _ = tokio::time::timeout(Duration::from_secs(5), h).await;
            }
        });
    }
}

/// Uploads the package file `pkg` through `client`; returns its sha256.
pub fn upload(rt: &Runtime, client: &mut Client, pkg: &Path) -> String {
    let info =
        orch_release::package::verify(pkg, None, None, &orch_release::Limits::default()).unwrap();
    rt.block_on(client.upload(
        pkg,
        pb::UploadHeader {
            name: info.name.clone(),
            version: info.version.to_string(),
            sha256: info.sha256.clone(),
            size: info.size,
            signature: Vec::new(),
        },
    ))
    .unwrap();
    info.sha256
}

/// The benchmarks' runtime: 2 worker threads, as many as this machine has cores.
pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A directory for the fleet's roots, on tmpfs when there is one: the agents' fsyncs are their
/// own work, not what a benchmark measures, and on a shared disk they would also slow the
/// coordinators' Raft log (coordinators keep their data on the real disk).
pub fn roots_dir(prefix: &str) -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let b = tempfile::Builder::new().prefix(prefix).clone();
    if shm.is_dir() {
        b.tempdir_in(shm).unwrap()
    } else {
        b.tempdir().unwrap()
    }
}

/// A rollout phase from which nothing moves any more.
pub fn terminal(phase: &str) -> bool {
    matches!(
        phase,
        "succeeded" | "rolled_back" | "rollback_failed" | "aborted"
    )
}
