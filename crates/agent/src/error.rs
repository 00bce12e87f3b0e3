//! The agent's error type and its mapping onto gRPC statuses (see proto/agent.proto).

use std::path::PathBuf;

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] orch_release::Error),
    #[error("{0}")]
    Refused(String),
    /// A malformed request field (a version, a header): kind `bad-package`, as documented
    /// before `bad-request` existed.
    #[error("{0}")]
    BadRequest(String),
    /// A malformed fence or cluster id: kind `bad-request`.
    #[error("{0}")]
    InvalidFence(String),
    #[error(
        "stale fence: this request carries (term {got_term}, rollout {got_rollout}, step {got_step}) but node {node} already accepted (term {term}, rollout {rollout}, step {step}); a newer coordinator is in charge"
    )]
    StaleFence {
        node: String,
        got_term: u64,
        got_rollout: String,
        got_step: u64,
        term: u64,
        rollout: String,
        step: u64,
    },
    #[error(
        "node {node} belongs to cluster {bound} but this call comes from cluster {got}; if the node really moved to the new cluster, run `orchestrator node rebind --agent ADDR --cluster-id {got}` (operator), else check which coordinators this node's agent talks to"
    )]
    OtherCluster {
        node: String,
        bound: String,
        got: String,
    },
    #[error(
        "node {node} is held by rollout {rollout} of cluster {cluster} (its last step {step} at {at}): wait for it to end or abort it (`orchestrator abort`), or pass --force"
    )]
    Held {
        node: String,
        rollout: String,
        cluster: String,
        step: u64,
        at: String,
    },
    #[error(
        "node {node} refused {what}: its deadline {deadline} passed before the step could start (agent clock {now}); the request waited too long (a stopped or overloaded agent) and was not applied; nothing changed"
    )]
    Deadline {
        node: String,
        what: String,
        deadline: String,
        now: String,
    },
    #[error(
        "only coordinators send fenced steps and releases; the caller is {caller}: an operator's `orchestrator node ... --agent` step is unfenced"
    )]
    Forbidden { caller: String },
    #[error("driver {driver}: {msg}")]
    Driver {
        driver: &'static str,
        msg: String,
        /// The tool could not be run or waited for.
        #[source]
        source: Option<std::io::Error>,
    },
    /// A file of the agent's own state could not be read or written.
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `fence.json` or `cluster.json` does not decode.
    #[error("{path} is unreadable; restore it or remove it only if no coordinator is running")]
    StateFile {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("encode {path}")]
    Encode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The blocking half of a call panicked or was cancelled.
    #[error("{what} failed")]
    Task {
        what: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    /// The request went away while its upload was being written; the upload was discarded.
    #[error("upload abandoned by its request; discarded")]
    Abandoned,
    /// Start-up: the TLS settings do not fit this daemon.
    #[error(transparent)]
    Tls(#[from] orch_tls::Error),
    #[error("cannot load a --trusted-key (fix the path or the file and restart)")]
    TrustedKeys(#[source] orch_package::signing::Error),
    #[error("another agent already serves {root}; stop it first")]
    AgentLocked {
        root: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the gRPC server stopped")]
    Serve(#[source] tonic::transport::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A package-format error is reported as the store reports it (same variants, same kinds).
impl From<orch_package::Error> for Error {
    fn from(e: orch_package::Error) -> Error {
        Error::Store(e.into())
    }
}

impl Error {
    /// The machine-readable kind carried in the `orch-error` metadata.
    pub fn kind(&self) -> &'static str {
        use orch_release::Error as S;
        match self {
            Error::Store(S::Refused(_))
            | Error::Refused(_)
            | Error::Tls(_)
            | Error::TrustedKeys(_)
            | Error::AgentLocked { .. } => "refused",
            Error::Store(S::BadPackage { .. }) | Error::BadRequest(_) => "bad-package",
            Error::InvalidFence(_) => "bad-request",
            Error::Store(S::Signature { .. }) => "signature",
            Error::Store(S::PackageNotFound { .. }) => "not-found",
            Error::Store(S::Activation { .. }) => "activation",
            Error::Store(S::PreSwitch { .. }) => "pre-switch",
            Error::Store(S::PostSwitch { .. }) => "post-switch",
            Error::Store(S::Locked { .. }) => "busy",
            Error::StaleFence { .. } => "stale-fence",
            Error::OtherCluster { .. } => "other-cluster",
            Error::Held { .. } => "held",
            Error::Deadline { .. } => "deadline",
            Error::Forbidden { .. } => "forbidden",
            Error::Driver { .. } => "activation",
            Error::Store(_)
            | Error::Io { .. }
            | Error::StateFile { .. }
            | Error::Encode { .. }
            | Error::Task { .. }
            | Error::Abandoned
            | Error::Listen { .. }
            | Error::Serve(_) => "internal",
        }
    }

    /// True when the step was attempted and broke (an activation, an I/O error), as opposed
    /// to a refusal decided by a rule before anything changed. The audit log says `failed`
    /// for these and `refused` for the rest.
    pub fn is_failure(&self) -> bool {
        matches!(
            self.kind(),
            "activation" | "internal" | "pre-switch" | "post-switch"
        )
    }

    /// The message with every cause, once each: what callers and the audit log see.
    pub fn message(&self) -> String {
        orch_tls::error_chain(self)
    }

    /// An I/O error on `path` while doing `op`, for `map_err`.
    pub(crate) fn io(
        op: &'static str,
        path: &std::path::Path,
    ) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.to_path_buf();
        move |source| Error::Io { op, path, source }
    }

    /// A failed blocking task, for `map_err`.
    pub(crate) fn task(what: &'static str) -> impl FnOnce(tokio::task::JoinError) -> Error {
        move |source| Error::Task { what, source }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let code = match e.kind() {
            // The node could not be drained: its switch was not attempted.
            "refused" | "other-cluster" | "held" | "pre-switch" => Code::FailedPrecondition,
            "bad-package" | "bad-request" => Code::InvalidArgument,
            // Not the caller's syntax but its authority: this node will not run unsigned code.
            "signature" | "forbidden" => Code::PermissionDenied,
            "not-found" => Code::NotFound,
            "stale-fence" => Code::Aborted,
            "deadline" => Code::DeadlineExceeded,
            "busy" => Code::Unavailable,
            _ => Code::Internal,
        };
        let mut st = Status::new(code, e.message());
        st.metadata_mut().insert(
            "orch-error",
            tonic::metadata::MetadataValue::from_static(e.kind()),
        );
        st
    }
}
