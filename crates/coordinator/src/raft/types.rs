//! The openraft type configuration and the aliases used across the Raft layer.

use std::fmt;

use openraft::BasicNode;
use serde::{Deserialize, Serialize};

use crate::state::{Command, Response};

/// A [`Command`] as a Raft log payload.
///
/// openraft requires `Display` of its application data (for logging). `Command` itself does not
/// implement it, so it travels wrapped; `serde(transparent)` keeps the stored and wire JSON
/// exactly the JSON of the command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RaftCommand(pub Command);

impl fmt::Display for RaftCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        describe(&self.0, f)
    }
}

fn describe(c: &Command, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    {
        match c {
            Command::RegisterNode { id, address, .. } => {
                write!(f, "register_node({id}, {address})")
            }
            Command::NodeVersions { id, .. } => write!(f, "node_versions({id})"),
            Command::RemoveNode { id } => write!(f, "remove_node({id})"),
            Command::AddPackage(p) => write!(f, "add_package({}-{})", p.name, p.version),
            Command::CreateRollout { spec, .. } => write!(f, "create_rollout({})", spec.version),
            Command::Rollout { id, .. } => write!(f, "rollout({id})"),
            Command::RolloutIfInFlight { id, action, .. } => {
                write!(f, "rollout({id}) if {} in flight", action.seq)
            }
            Command::Batch(cmds) => write!(f, "batch({})", cmds.len()),
            Command::SetClusterId { id } => write!(f, "set_cluster_id({id})"),
            Command::NodeConflict { id, conflict } => {
                write!(f, "node_conflict({id}, {})", conflict.is_some())
            }
            Command::NodeLiveness { id, unresponsive } => {
                write!(f, "node_liveness({id}, {})", unresponsive.is_none())
            }
            Command::Request {
                request_id,
                command,
                ..
            } => {
                write!(f, "request({request_id}, ")?;
                describe(command, f)?;
                f.write_str(")")
            }
            Command::ArchiveRollouts {
                rollouts, packages, ..
            } => write!(
                f,
                "archive({} rollout(s), {} package(s))",
                rollouts.len(),
                packages.len()
            ),
        }
    }
}

openraft::declare_raft_types!(
    /// openraft type configuration of the coordinators' Raft group.
    pub TypeConfig:
        D = RaftCommand,
        R = Response,
        NodeId = u64,
        Node = BasicNode,
);

pub type NodeId = u64;
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
/// Snapshot bytes: the JSON of [`super::state_machine::SnapshotPayload`].
pub type SnapshotData = Vec<u8>;
pub type Snapshot = openraft::type_config::alias::SnapshotOf<TypeConfig, SnapshotData>;
pub type Raft = openraft::Raft<TypeConfig, super::state_machine::StateMachineStore>;
