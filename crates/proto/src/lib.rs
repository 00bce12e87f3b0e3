//! Generated gRPC code for the orchestrator's services, and conversions between wire messages
//! and domain types (prost types stay out of core logic).

pub mod json;
mod watch;

pub mod agent {
    tonic::include_proto!("orchestrator.agent.v1");
}

pub mod control {
    tonic::include_proto!("orchestrator.control.v1");
}

pub mod raft {
    tonic::include_proto!("orchestrator.raft.v1");
}

/// Encoded file descriptor set of every service, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));

use orch_types::{ReleaseState, Version, VersionEntry};

impl From<&VersionEntry> for agent::VersionEntry {
    fn from(e: &VersionEntry) -> Self {
        agent::VersionEntry {
            version: e.version.to_string(),
            state: e.state.to_string(),
        }
    }
}

impl TryFrom<&agent::VersionEntry> for VersionEntry {
    type Error = orch_types::ParseError;

    fn try_from(e: &agent::VersionEntry) -> Result<Self, Self::Error> {
        Ok(VersionEntry {
            version: e.version.parse::<Version>()?,
            state: e.state.parse::<ReleaseState>()?,
        })
    }
}
