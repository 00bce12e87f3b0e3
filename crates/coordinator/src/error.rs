//! The coordinator's error type and its mapping onto gRPC statuses. Variants that wrap a
//! failure keep it as their `source`: a gRPC status carries the whole chain as its message,
//! and the CLI prints a local one with its causes.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Unavailable(String),
    /// This coordinator is not the Raft leader; the client retries at the leader.
    #[error("this coordinator is not the leader{}", match .leader { Some((id, addr)) => format!(" (the leader is coordinator {id} at {addr})"), None => " and no leader is known yet; retry shortly".to_string() })]
    NotLeader { leader: Option<(u64, String)> },
    /// A file or socket of this coordinator could not be used: `context` says which and what
    /// was done with it (`create /var/lib/orch/blobs`).
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(transparent)]
    Package(#[from] orch_package::Error),
    /// Work handed to a blocking thread panicked or was cancelled.
    #[error("{context}")]
    Task {
        context: String,
        #[source]
        source: tokio::task::JoinError,
    },
    /// Raft could not start, or its storage failed.
    #[error("{context}")]
    Raft {
        context: &'static str,
        #[source]
        source: Box<crate::raft::Error>,
    },
    /// The gRPC server failed, or its reflection service could not be built.
    #[error("{context}")]
    Server {
        context: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Error {
    /// An I/O failure of `context` (what was done, on which file).
    pub fn io(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Error {
        Error::Io {
            context: context.into(),
            source: source.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A configuration value (a flag or the `--config` file) that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file is not valid TOML of the expected keys (its message says where and why).
    #[error("{}", .0.message())]
    File(toml::de::Error),
    #[error("--peer {0:?} is not ID=HOST:PORT")]
    PeerSyntax(String),
    #[error("--peer {0:?}: the id must be a number")]
    PeerId(String),
    #[error("--peer {0:?}: the address is empty")]
    PeerAddress(String),
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let code = match &e {
            Error::BadRequest(_) => Code::InvalidArgument,
            Error::Package(orch_package::Error::BadPackage { .. }) => Code::InvalidArgument,
            Error::Package(orch_package::Error::Signature { .. }) => Code::PermissionDenied,
            Error::NotFound(_) => Code::NotFound,
            Error::Refused(_) => Code::FailedPrecondition,
            Error::Unavailable(_) | Error::NotLeader { .. } => Code::Unavailable,
            _ => Code::Internal,
        };
        // The whole chain: a status leaves the process as text, so the causes go with it.
        let mut st = Status::new(code, orch_types::error_chain(&e));
        if let Error::Package(orch_package::Error::Signature { .. }) = &e {
            st.metadata_mut().insert(
                "orch-error",
                tonic::metadata::MetadataValue::from_static("signature"),
            );
        }
        if let Error::NotLeader { leader } = &e {
            let md = st.metadata_mut();
            md.insert(
                "orch-error",
                tonic::metadata::MetadataValue::from_static("not-leader"),
            );
            if let Some((id, addr)) = leader {
                if let Ok(v) = addr.parse() {
                    md.insert("orch-leader", v);
                }
                if let Ok(v) = id.to_string().parse() {
                    md.insert("orch-leader-id", v);
                }
            }
        }
        st
    }
}
