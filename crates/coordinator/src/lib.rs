//! The coordinator: holds the cluster's state in a Raft log (openraft, persisted in redb),
//! serves the control API to operators and registration to agents, stores package bytes
//! content-addressed, and, on the Raft leader only, drives rollouts through the agents. With
//! `--http-listen` it also serves the web dashboard, a JSON API and Prometheus metrics
//! (`http`, `metrics`).
//!
//! `serve(config, listener, shutdown)` is the whole daemon, so tests can run clusters in-process.
//! Its settings are in `config`, what its services and driver share in `shared`.

pub mod agents;
pub mod blobs;
mod config;
pub mod control;
pub mod driver;
pub mod error;
pub mod history;
mod http;
pub mod metrics;
pub mod raft;
pub mod retention;
mod shared;
pub mod state;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use orch_proto::control::control_server::ControlServer;
use orch_proto::raft::blobs_server::BlobsServer;
use orch_tls::{Role, Security};
use std::net::SocketAddr;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;

use crate::agents::AgentPool;
use crate::blobs::BlobStore;
use crate::raft::{RaftConfig, RaftNode};

pub use config::{CoordinatorConfig, CoordinatorFileConfig, parse_peer};
pub use error::{ConfigError, Error, Result};
pub use shared::Shared;

/// The gRPC services a coordinator serves, as reflection lists them.
pub const SERVICES: [&str; 3] = [
    orch_proto::control::control_server::SERVICE_NAME,
    orch_proto::raft::raft_peer_server::SERVICE_NAME,
    orch_proto::raft::blobs_server::SERVICE_NAME,
];

/// Binds `config.listen` and serves until `shutdown` resolves.
pub async fn run(
    config: CoordinatorConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| Error::io(format!("cannot listen on {}", config.listen), e))?;
    serve(config, listener, shutdown).await
}

/// Serves the control, Raft and blob services on one listener until `shutdown` resolves.
pub async fn serve(
    config: CoordinatorConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let mut server = secure_server(&config, &listener)?;
    check_config(&config)?;
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| Error::io(format!("create {}", config.data_dir.display()), e))?;
    claim_data_dir(&config.data_dir, config.id)?;
    let blobs = BlobStore::open(config.data_dir.join("blobs"), config.max_package_bytes)?
        .with_trusted(load_trusted_keys(&config.trusted_keys)?);
    let history_path = config.data_dir.join(history::HISTORY_FILE);
    let raft = start_raft(&config, history_path.clone()).await?;
    let security = config.security.clone();
    let shared = Arc::new(Shared {
        security: security.clone(),
        raft: raft.clone(),
        blobs: blobs.clone(),
        agents: AgentPool::new(security.clone()).with_relay(config.peer_relay),
        history: history::History::new(history_path),
        metrics: Arc::new(metrics::Metrics::new()),
        gates: agents::GateBoard::default(),
        probes: Default::default(),
    });
    let jobs = Jobs::start(&shared, &config);
    let http = match config.http_listen {
        Some(addr) => Some(start_http(&config, addr, shared.clone(), jobs.stop.clone()).await?),
        None => None,
    };
    tracing::info!(id = config.id, addr = %config.address(), "coordinator listening");
    // systemd's Type=notify: everything is set up and the listener is bound. Without
    // NOTIFY_SOCKET (not under systemd) this does nothing.
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    // Package bytes move between coordinators only: no other role may read or plant them.
    let blobs_svc = InterceptedService::new(
        BlobsServer::new(blobs::BlobsService { store: blobs })
            .max_decoding_message_size(blobs::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(blobs::MAX_MESSAGE_BYTES),
        security.mode().interceptor(&[Role::Coordinator]),
    );
    let router = orch_tls::with_reflection(
        server.add_service(raft.peer_service()),
        orch_proto::FILE_DESCRIPTOR_SET,
        &SERVICES,
    )
    .map_err(|e| Error::Server {
        context: "reflection",
        source: Box::new(e),
    })?;
    let result = router
        .add_service(blobs_svc)
        .add_service(
            ControlServer::new(control::ControlService {
                shared: shared.clone(),
            })
            .max_decoding_message_size(control::MAX_REQUEST_BYTES)
            .max_encoding_message_size(control::MAX_REPLY_BYTES),
        )
        .serve_with_incoming_shutdown(orch_tls::incoming(listener), shutdown)
        .await;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    jobs.stop().await;
    if let Some(http) = http {
        let _ = http.await;
    }
    raft.shutdown().await;
    result.map_err(|e| Error::Server {
        context: "server",
        source: Box::new(e),
    })
}

/// The gRPC server for `listener`, once this coordinator's certificate, listen address and
/// security mode are as they must be.
fn secure_server(
    config: &CoordinatorConfig,
    listener: &TcpListener,
) -> Result<tonic::transport::Server> {
    let security = &config.security;
    let refused = |e: orch_tls::Error| Error::Refused(e.to_string());
    security
        .expect_identity(Role::Coordinator, &config.id.to_string())
        .map_err(refused)?;
    let local = listener.local_addr().unwrap_or(config.listen);
    security
        .check_listen(local, config.insecure_allow_remote)
        .map_err(refused)?;
    let server = security.server(&config.limits).map_err(refused)?;
    if security.is_insecure() {
        tracing::warn!(
            "coordinator serving plain-text gRPC (--insecure): anyone who can reach it can run rollouts"
        );
    }
    Ok(server)
}

/// Refuses settings that cannot work: a peer at this coordinator's own address, or keeping no
/// finished rollout.
fn check_config(config: &CoordinatorConfig) -> Result<()> {
    // A peer at this coordinator's own address would be this coordinator answering Raft
    // messages meant for another member (seen as a Raft core panic): refuse the typo.
    let own = config.address();
    if let Some((id, _)) = config
        .peers
        .iter()
        .find(|(id, addr)| **id != config.id && **addr == own)
    {
        return Err(Error::Refused(format!(
            "--peer {id}={own} is this coordinator's own address (coordinator {}): every coordinator needs its own address; fix the peer list",
            config.id
        )));
    }
    if config.retain_rollouts == 0 {
        return Err(Error::Refused(
            "--retain-rollouts 0 would archive every rollout as soon as it finishes: keep at least 1 (default 100)".to_string(),
        ));
    }
    Ok(())
}

/// Starts Raft on `DATA/raft`, and checks the peer list against the membership once the stored
/// log has been read.
async fn start_raft(config: &CoordinatorConfig, history_path: PathBuf) -> Result<RaftNode> {
    let mut raft_cfg = RaftConfig::new(
        config.id,
        config.address(),
        config.data_dir.join("raft"),
        config.peers.clone(),
        config.bootstrap,
    );
    raft_cfg.security = config.security.clone();
    raft_cfg.history_path = history_path;
    let raft = RaftNode::start(raft_cfg).await.map_err(|e| Error::Raft {
        context: "starting Raft",
        source: Box::new(e),
    })?;
    // The membership is known once the stored log has been read: check in the background.
    let (config, r) = (config.clone(), raft.clone());
    tokio::spawn(async move {
        for _ in 0..100 {
            let m = r.metrics();
            if !m.members.is_empty() {
                warn_on_peer_mismatch(&config, &m);
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    Ok(raft)
}

/// The coordinator's background jobs: the driver whenever this coordinator leads, retention
/// and the blob sweeper.
struct Jobs {
    stop: tokio_util::sync::CancellationToken,
    stop_tx: tokio::sync::watch::Sender<bool>,
    handles: Vec<tokio::task::JoinHandle<()>>,
}

impl Jobs {
    fn start(shared: &Arc<Shared>, config: &CoordinatorConfig) -> Jobs {
        let stop = tokio_util::sync::CancellationToken::new();
        let leadership = tokio::spawn(lead_when_leader(shared.clone(), stop.clone()));
        // The retention jobs take a watch; the driver a cancellation token.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let retention_cfg = retention::RetentionConfig {
            keep: config.retain_rollouts,
            grace: config.gc_grace,
        };
        let retention = tokio::spawn(retention::run(
            shared.clone(),
            retention_cfg,
            stop_rx.clone(),
        ));
        let sweeper = tokio::spawn(retention::sweep_blobs(
            shared.clone(),
            retention_cfg,
            stop_rx,
        ));
        Jobs {
            stop,
            stop_tx,
            handles: vec![leadership, retention, sweeper],
        }
    }

    /// Stops every job and waits until they have.
    async fn stop(self) {
        self.stop.cancel();
        let _ = self.stop_tx.send(true);
        for h in self.handles {
            let _ = h.await;
        }
    }
}

/// Binds `--http-listen` and serves the dashboard, API and metrics until `stop`.
async fn start_http(
    config: &CoordinatorConfig,
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: tokio_util::sync::CancellationToken,
) -> Result<tokio::task::JoinHandle<()>> {
    let refused = |e: orch_tls::Error| Error::Refused(format!("--http-listen {addr}: {e}"));
    config
        .security
        .check_listen(addr, config.insecure_allow_remote)
        .map_err(refused)?;
    let tls = match &config.security {
        Security::Mtls(material) => Some(
            // A client without a certificate gets through the handshake and then a 401 that
            // says how to get one, rather than a bare TLS alert.
            material.https_server_config(true).map_err(refused)?,
        ),
        Security::Insecure => None,
    };
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| Error::io(format!("cannot listen on --http-listen {addr}"), e))?;
    let local = listener.local_addr().unwrap_or(addr);
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(url = %format!("{scheme}://{local}/"), "dashboard and metrics listening");
    let routes = Arc::new(http::CoordinatorRoutes {
        metrics: shared.metrics.clone(),
        shared,
        data_dir: config.data_dir.clone(),
    });
    let cfg = orch_http::HttpConfig {
        tls,
        public_metrics: config.http_public_metrics,
    };
    Ok(tokio::spawn(async move {
        if let Err(e) = orch_http::serve(listener, cfg, routes, stop.cancelled_owned()).await {
            tracing::error!(error = %e, "the HTTP endpoint stopped");
        }
    }))
}

/// The file in a data directory that names the coordinator it belongs to.
pub const DATA_DIR_ID_FILE: &str = "coordinator-id";

/// Records which coordinator a data directory belongs to, and refuses to start another one
/// on it: coordinator 2 serving coordinator 3's log would vote and answer as 3 does.
fn claim_data_dir(dir: &std::path::Path, id: u64) -> Result<()> {
    let path = dir.join(DATA_DIR_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let owner: u64 = text.trim().parse().map_err(|_| {
                Error::Refused(format!(
                    "{} does not hold a coordinator id ({:?}); restore it (it names the coordinator this data directory belongs to)",
                    path.display(),
                    text.chars().take(32).collect::<String>()
                ))
            })?;
            if owner != id {
                return Err(Error::Refused(format!(
                    "data directory {} belongs to coordinator {owner}, not {id}: start it with --id {owner}, or give coordinator {id} its own --data-dir",
                    dir.display()
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            orch_package::fsutil::write_atomic(&path, format!("{id}\n").as_bytes())
                .map_err(|e| Error::io(format!("record {}", path.display()), e))
        }
        Err(e) => Err(Error::io(format!("read {}", path.display()), e)),
    }
}

/// The Raft membership decides who the peers are once the cluster exists; a `--peer` list
/// that says otherwise is ignored, so say so (a typo there is otherwise silent).
fn warn_on_peer_mismatch(config: &CoordinatorConfig, status: &raft::RaftStatus) {
    if status.members.is_empty() {
        return;
    }
    let mut given: BTreeMap<u64, String> = config.peers.clone();
    given.insert(config.id, config.address());
    let actual: BTreeMap<u64, String> = status
        .members
        .iter()
        .map(|m| (m.id, m.addr.clone()))
        .collect();
    if config.peers.is_empty() || given == actual {
        return;
    }
    let show = |m: &BTreeMap<u64, String>| {
        m.iter()
            .map(|(id, a)| format!("{id}={a}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    tracing::warn!(
        "the --peer list ({}) differs from the cluster's Raft membership ({}); the membership wins: change it with `orchestrator cluster add|remove`, or fix --peer",
        show(&given),
        show(&actual)
    );
}

/// Loads `--trusted-key` files; one that cannot be read stops the daemon (a typo must not
/// silently turn signature checks off or lock out good packages).
fn load_trusted_keys(paths: &[PathBuf]) -> Result<orch_package::TrustedKeys> {
    let keys = orch_package::TrustedKeys::load(paths).map_err(|e| {
        Error::Refused(format!(
            "cannot load a --trusted-key: {}; fix the path or the file and restart",
            orch_tls::error_chain(&e)
        ))
    })?;
    if !keys.is_empty() {
        tracing::info!(keys = ?keys.ids(), "package uploads and rollouts need a trusted signature");
    }
    Ok(keys)
}

/// Starts a driver for each term in which this coordinator leads, and stops it (waiting until
/// every task of that term is gone) when the term ends.
async fn lead_when_leader(shared: Arc<Shared>, stop: tokio_util::sync::CancellationToken) {
    let mut leadership = shared.raft.leadership();
    let mut driver: Option<(
        u64,
        tokio_util::sync::CancellationToken,
        tokio::task::JoinHandle<()>,
    )> = None;
    loop {
        let leading = shared.raft.is_leader();
        let term = shared.raft.current_term();
        match &driver {
            Some((t, _, h)) if h.is_finished() || !leading || *t != term => {
                if let Some((_, token, h)) = driver.take() {
                    token.cancel();
                    let _ = h.await;
                }
                continue;
            }
            None if leading => {
                let token = stop.child_token();
                let h = tokio::spawn(driver::run(shared.clone(), term, token.clone()));
                driver = Some((term, token, h));
            }
            _ => {}
        }
        tokio::select! {
            r = leadership.changed() => if r.is_err() { break },
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
    if let Some((_, token, h)) = driver {
        token.cancel();
        let _ = h.await;
    }
}
