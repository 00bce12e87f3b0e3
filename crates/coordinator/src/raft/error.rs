//! Errors of the Raft layer, worded for the operator who reads them.

use std::path::PathBuf;

/// A failed write (or linearizable read) through Raft.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// This coordinator is not the leader. `leader` is the current leader's `(id, address)`
    /// when known: forward the request there (or redirect the client). `None`: an election is
    /// in progress; retry shortly.
    #[error("{}", not_leader_msg(.leader))]
    NotLeader { leader: Option<(u64, String)> },
    /// Anything else (no quorum, timed out, Raft stopped); the message says what to do.
    #[error("{0}")]
    Other(String),
}

fn not_leader_msg(leader: &Option<(u64, String)>) -> String {
    match leader {
        Some((id, addr)) => {
            format!("this coordinator is not the Raft leader; the leader is coordinator {id} at {addr}")
        }
        None => "this coordinator is not the Raft leader and no leader is known yet (election in progress); retry in a moment".to_string(),
    }
}

/// Errors of starting, running and reconfiguring a Raft node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is unusable.
    #[error("invalid Raft configuration: {0}")]
    Config(String),
    /// The log or state machine files cannot be opened or used. `context` is empty or says
    /// what was being done (`: cannot create the data directory`).
    #[error("Raft storage under {}{context}", dir.display())]
    Storage {
        dir: PathBuf,
        context: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The operation must run on the leader.
    #[error("{}", not_leader_msg(.leader))]
    NotLeader { leader: Option<(u64, String)> },
    /// A membership change was refused or did not complete.
    #[error("membership change failed: {0}")]
    Membership(String),
    /// The Raft node is stopped (shut down, or a fatal storage error).
    #[error(
        "the Raft node is stopped: {0}; check the coordinator log for a storage error, then restart it"
    )]
    Stopped(String),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

impl From<WriteError> for Error {
    fn from(e: WriteError) -> Error {
        match e {
            WriteError::NotLeader { leader } => Error::NotLeader { leader },
            WriteError::Other(m) => Error::Other(m),
        }
    }
}

impl From<WriteError> for crate::error::Error {
    fn from(e: WriteError) -> crate::error::Error {
        match e {
            WriteError::NotLeader { leader } => crate::error::Error::NotLeader { leader },
            WriteError::Other(m) => crate::error::Error::Unavailable(m),
        }
    }
}

impl From<Error> for crate::error::Error {
    fn from(e: Error) -> crate::error::Error {
        match e {
            Error::NotLeader { leader } => crate::error::Error::NotLeader { leader },
            Error::Membership(_) => crate::error::Error::Refused(e.to_string()),
            Error::Config(_) => crate::error::Error::BadRequest(e.to_string()),
            Error::Stopped(_) | Error::Other(_) => crate::error::Error::Unavailable(e.to_string()),
            Error::Storage { .. } => crate::error::Error::Raft {
                context: "the Raft storage failed",
                source: Box::new(e),
            },
        }
    }
}

/// gRPC status of a failed write; `NotLeader` carries the leader in the metadata the
/// coordinator's clients use to redirect (see `crate::error`).
impl From<WriteError> for tonic::Status {
    fn from(e: WriteError) -> tonic::Status {
        crate::error::Error::from(e).into()
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> tonic::Status {
        crate::error::Error::from(e).into()
    }
}
