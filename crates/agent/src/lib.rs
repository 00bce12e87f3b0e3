//! The node agent: serves the `Agent` gRPC API (proto/agent.proto) over one node's releases.
//! Coordinators and operators reach a node only through it. Steps are fenced (the node belongs
//! to one coordinator cluster, and a deposed coordinator cannot act after its successor),
//! idempotent, serialized per node, audited, and run on the blocking pool; health is probed by
//! URL, command, or the store's own view. Reads never change the node: the store is reconciled
//! with a restarted service at start and when the service's process changes (`reconcile`).
//!
//! With `--http-listen` it also serves Prometheus metrics and `/healthz` (`http`, `metrics`).
//!
//! `serve(config, listener, shutdown)` is the whole daemon, so tests run agents in-process.

pub mod audit;
pub mod delta;
pub mod driver;
pub mod emqx;
pub mod error;
pub mod fence;
pub mod health;
mod http;
pub mod metrics;
pub mod push;
pub mod reconcile;
mod register;
pub mod relay;
mod service;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use orch_proto::agent::agent_server::AgentServer;
use orch_release::{Store, StoreConfig};
use orch_tls::{Daemon, Role, Security, ServerLimits};
use orch_types::NodeId;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::Mutex;

pub use error::{Error, Result};
pub use health::HealthConfig;

/// Which implementation performs the node's steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriverKind {
    Native,
    /// An EMQX 4.x installation's `emqx` script.
    Emqx {
        bin: PathBuf,
    },
}

/// Everything the agent daemon needs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node_id: NodeId,
    pub root_dir: PathBuf,
    pub listen: SocketAddr,
    /// The address coordinators should dial (defaults to `listen`).
    pub advertise: Option<String>,
    /// Coordinators to register with (registration arrives with the coordinator work).
    pub coordinators: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub health: HealthConfig,
    pub activate_cmd: Option<Vec<String>>,
    /// `--pre-step-cmd` / `--post-step-cmd`: drain hooks around every switch (override the
    /// release's own `hooks/pre-switch` / `hooks/post-switch`).
    pub pre_step_cmd: Option<Vec<String>>,
    pub post_step_cmd: Option<Vec<String>>,
    pub activate_timeout: Duration,
    pub driver: DriverKind,
    /// Mutual TLS (the default) or the explicitly requested plain text.
    pub security: Security,
    /// Allow `Security::Insecure` on a non-loopback listen address.
    pub insecure_allow_remote: bool,
    pub limits: ServerLimits,
    pub max_package_bytes: u64,
    /// How long a SIGTERM waits for an in-flight step before exiting anyway.
    pub shutdown_grace: Duration,
    /// `signing.pub` files: when any is given, only packages signed by one of them are accepted
    /// (on push and on unpack/install), so a compromised coordinator cannot push its own code.
    pub trusted_keys: Vec<PathBuf>,
    /// `--http-listen`: serve `/metrics` and `/healthz` here too.
    pub http_listen: Option<SocketAddr>,
    /// `--http-public-metrics`: those two without a client certificate.
    pub http_public_metrics: bool,
}

impl AgentConfig {
    pub fn new(node_id: NodeId, root_dir: PathBuf, listen: SocketAddr, security: Security) -> Self {
        AgentConfig {
            node_id,
            root_dir,
            listen,
            advertise: None,
            coordinators: Vec::new(),
            labels: BTreeMap::new(),
            health: HealthConfig {
                url: None,
                cmd: None,
                timeout: Duration::from_secs(2),
            },
            activate_cmd: None,
            pre_step_cmd: None,
            post_step_cmd: None,
            activate_timeout: Duration::from_secs(60),
            driver: DriverKind::Native,
            security,
            insecure_allow_remote: false,
            limits: ServerLimits::default(),
            max_package_bytes: 4 << 30,
            shutdown_grace: Duration::from_secs(90),
            trusted_keys: Vec::new(),
            http_listen: None,
            http_public_metrics: false,
        }
    }
}

/// The `--config FILE` format: the same keys as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct AgentFileConfig {
    pub node_id: Option<String>,
    pub root_dir: Option<PathBuf>,
    pub listen: Option<String>,
    pub advertise: Option<String>,
    #[serde(default)]
    pub coordinator: Vec<String>,
    #[serde(default)]
    pub label: BTreeMap<String, String>,
    pub health_url: Option<String>,
    pub health_cmd: Option<String>,
    pub health_timeout: Option<String>,
    pub activate_cmd: Option<String>,
    pub pre_step_cmd: Option<String>,
    pub post_step_cmd: Option<String>,
    pub activate_timeout: Option<String>,
    pub driver: Option<String>,
    pub emqx_bin: Option<PathBuf>,
    /// A party folder holding ca.pem, cert.pem and key.pem (`orchestrator certs init`).
    pub tls_dir: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub insecure: Option<bool>,
    /// `trusted-key = ["/etc/orchestrator/signing.pub"]`
    #[serde(default)]
    pub trusted_key: Vec<PathBuf>,
    pub insecure_allow_remote: Option<bool>,
    pub http_listen: Option<String>,
    pub http_public_metrics: Option<bool>,
}

impl AgentFileConfig {
    pub fn parse(text: &str) -> std::result::Result<Self, ConfigFileError> {
        toml::from_str(text).map_err(ConfigFileError)
    }
}

/// Why an agent config file was refused: the parser's one-line message (its full form quotes
/// the file over several lines; the error itself keeps the position).
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.message())]
pub struct ConfigFileError(pub toml::de::Error);

/// Largest gRPC message the agent accepts or sends (push chunks are 256 KiB).
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;

/// Binds `config.listen` and serves until `shutdown` resolves.
pub async fn run(config: AgentConfig, shutdown: impl Future<Output = ()> + Send) -> Result<()> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| Error::Listen {
            addr: config.listen,
            source,
        })?;
    serve(config, listener, shutdown).await
}

/// Serves on an already bound listener (port 0 in tests) until `shutdown` resolves; then stops
/// accepting and waits up to `shutdown_grace` for an in-flight step to finish.
pub async fn serve(
    config: AgentConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let local = listener.local_addr().ok();
    let router = config.security.daemon_server(&Daemon {
        role: Role::Agent,
        name: config.node_id.as_str(),
        listen: local.unwrap_or(config.listen),
        allow_remote: config.insecure_allow_remote,
        limits: &config.limits,
        descriptors: orch_proto::FILE_DESCRIPTOR_SET,
        services: &[orch_proto::agent::agent_server::SERVICE_NAME],
        insecure_risk: "act on this node",
    })?;
    let trusted = load_trusted_keys(&config.trusted_keys)?;
    let (shared, _agent_lock) = open_node(&config, trusted)?;
    // Before serving: the first report and the first step see a repaired store.
    let seen = reconcile::at_start(&shared).await;
    let _watcher = AbortOnDrop(
        config
            .health
            .url
            .is_some()
            .then(|| tokio::spawn(reconcile::watch(shared.clone(), seen))),
    );
    let _registration = AbortOnDrop(start_registration(&config, local, &shared));
    let _http = AbortOnDrop(match config.http_listen {
        Some(addr) => Some(
            http::start(
                addr,
                &config.security,
                config.insecure_allow_remote,
                config.http_public_metrics,
                shared.clone(),
            )
            .await?,
        ),
        None => None,
    });
    tracing::info!(node = %config.node_id, addr = ?local, "agent listening");
    // systemd's Type=notify: the store is open and the listener bound (no-op without
    // NOTIFY_SOCKET).
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let router = router.add_service(
        AgentServer::new(service::AgentService {
            shared: shared.clone(),
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES),
    );
    serve_until(
        router,
        listener,
        shutdown,
        &shared.steps,
        config.shutdown_grace,
    )
    .await
}

/// `--trusted-key` files; none means packages need no signature.
fn load_trusted_keys(paths: &[PathBuf]) -> Result<orch_package::TrustedKeys> {
    let trusted = orch_package::TrustedKeys::load(paths).map_err(Error::TrustedKeys)?;
    if trusted.is_empty() {
        tracing::info!("no --trusted-key: packages are accepted without signatures");
    } else {
        tracing::info!(keys = ?trusted.ids(), "only packages signed by a trusted key are accepted");
    }
    Ok(trusted)
}

/// Opens the node under `config.root_dir`: the release store and its driver, the fence files,
/// and the lock that makes this the root's only agent (held until the returned file drops).
fn open_node(
    config: &AgentConfig,
    trusted: orch_package::TrustedKeys,
) -> Result<(Arc<service::Shared>, std::fs::File)> {
    let mut store_cfg = StoreConfig::new(&config.root_dir);
    store_cfg.trusted_keys = trusted.clone();
    store_cfg.activate_cmd = config.activate_cmd.clone();
    store_cfg.pre_switch_cmd = config.pre_step_cmd.clone();
    store_cfg.post_switch_cmd = config.post_step_cmd.clone();
    store_cfg.activate_timeout = config.activate_timeout;
    let store = Store::open(store_cfg)?;
    let releases_dir = store.releases_dir().to_path_buf();
    let driver: Arc<dyn driver::Driver> = match &config.driver {
        DriverKind::Native => Arc::new(driver::NativeDriver::new(store)),
        DriverKind::Emqx { bin } => {
            Arc::new(emqx::EmqxDriver::new(bin.clone(), config.activate_timeout))
        }
    };
    let agent_dir = config.root_dir.join("agent");
    let fences = fence::FenceStore::open(&agent_dir, config.node_id.as_str())?;
    // One agent per root for the daemon's lifetime: two would each trust their own fence.
    let agent_lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(agent_dir.join("agent.lock"))
        .and_then(|f| f.try_lock().map(|()| f).map_err(std::io::Error::other))
        .map_err(|source| Error::AgentLocked {
            root: config.root_dir.clone(),
            source,
        })?;
    // Only once this agent owns the root: another one's upload in progress is not stale.
    clear_stale_uploads(&releases_dir);
    let shared = Arc::new(service::Shared {
        node_id: config.node_id.to_string(),
        auth: config.security.mode(),
        root: config.root_dir.clone(),
        labels: config.labels.clone(),
        driver,
        health: config.health.clone(),
        max_package_bytes: config.max_package_bytes,
        trusted,
        view: std::sync::Mutex::new(fences.view()),
        steps: Arc::new(Mutex::new(fences)),
        stamp: Arc::new(service::Stamp::new()),
        audit: audit::AuditLog::open(&agent_dir, config.node_id.as_str()),
        activate_timeout: config.activate_timeout,
        changed: Arc::new(tokio::sync::Notify::new()),
        contact: Arc::new(register::Contact::new()),
        metrics: Arc::new(metrics::Metrics::new()),
        peers: relay::Peers::new(config.security.clone()),
    });
    Ok((shared, agent_lock))
}

/// Keeps the node registered with `config.coordinators` (none: no registration).
fn start_registration(
    config: &AgentConfig,
    local: Option<SocketAddr>,
    shared: &Arc<service::Shared>,
) -> Option<tokio::task::JoinHandle<()>> {
    if config.coordinators.is_empty() {
        return None;
    }
    let address = config
        .advertise
        .clone()
        .or_else(|| local.map(|a| a.to_string()))
        .unwrap_or_else(|| config.listen.to_string());
    Some(tokio::spawn(register::keep_registered(
        register::Registrant {
            coordinators: config.coordinators.clone(),
            node_id: config.node_id.to_string(),
            address,
            labels: config.labels.clone(),
            activate_timeout: config.activate_timeout,
        },
        shared.driver.clone(),
        shared.stamp.clone(),
        config.security.clone(),
        shared.changed.clone(),
        shared.contact.clone(),
    )))
}

/// Serves `router` until `shutdown`; then stops accepting and waits up to `grace` for the
/// in-flight step (which holds `steps`) to finish.
async fn serve_until(
    router: tonic::transport::server::Router,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    steps: &Mutex<fence::FenceStore>,
    grace: Duration,
) -> Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = router.serve_with_incoming_shutdown(orch_tls::incoming(listener), async {
        let _ = stop_rx.await;
    });
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => return r.map_err(Error::Serve),
        () = shutdown => {}
    }
    tracing::info!("shutting down: no new requests; waiting for an in-flight step");
    let _ = stop_tx.send(());
    let drained = tokio::time::timeout(grace, async {
        let _ = (&mut server).await;
        // The step lock is held by the blocking work itself, so this waits for it to finish.
        let _ = steps.lock().await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            ?grace,
            "an in-flight step did not finish within the grace period"
        );
    }
    Ok(())
}

struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(h) = &self.0 {
            h.abort();
        }
    }
}

/// Uploads interrupted by a previous crash are incomplete by definition.
fn clear_stale_uploads(releases: &std::path::Path) {
    if let Ok(rd) = std::fs::read_dir(releases) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(".incoming-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}
