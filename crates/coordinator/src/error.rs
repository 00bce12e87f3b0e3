//! The coordinator's error type and its mapping onto gRPC statuses.

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
    #[error("{0}")]
    Io(String),
    #[error(transparent)]
    Package(#[from] orch_package::Error),
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

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
        // The whole chain: a wrapped cause (the I/O error under a failed write) is not part of
        // the top-level message.
        let mut st = Status::new(code, orch_tls::error_chain(&e));
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
