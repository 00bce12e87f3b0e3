//! The agent's error type and its mapping onto gRPC statuses (see proto/agent.proto).

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] orch_release::Error),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    BadRequest(String),
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
    #[error("driver {driver}: {msg}")]
    Driver { driver: &'static str, msg: String },
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The machine-readable kind carried in the `orch-error` metadata.
    pub fn kind(&self) -> &'static str {
        use orch_release::Error as S;
        match self {
            Error::Store(S::Refused(_)) | Error::Refused(_) => "refused",
            Error::Store(S::BadPackage { .. }) | Error::BadRequest(_) => "bad-package",
            Error::Store(S::Signature { .. }) => "signature",
            Error::Store(S::PackageNotFound { .. }) => "not-found",
            Error::Store(S::Activation { .. }) => "activation",
            Error::Store(S::Locked { .. }) => "busy",
            Error::StaleFence { .. } => "stale-fence",
            Error::Driver { .. } => "activation",
            Error::Store(_) | Error::Internal(_) => "internal",
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let code = match e.kind() {
            "refused" => Code::FailedPrecondition,
            "bad-package" => Code::InvalidArgument,
            // Not the caller's syntax but its authority: this node will not run unsigned code.
            "signature" => Code::PermissionDenied,
            "not-found" => Code::NotFound,
            "stale-fence" => Code::Aborted,
            "busy" => Code::Unavailable,
            _ => Code::Internal,
        };
        let mut st = Status::new(code, e.to_string());
        st.metadata_mut().insert(
            "orch-error",
            tonic::metadata::MetadataValue::from_static(e.kind()),
        );
        st
    }
}
