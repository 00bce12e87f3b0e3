//! Agent registration, and refusing a second live agent under a registered node's id.

use orch_proto::control as pb;
use orch_tls::Role;
use orch_types::{NodeId, VersionEntry};
use tonic::{Request, Response, Status};

use super::{ControlService, Res, bad, check_address, shown};
use crate::driver::now_ms;
use crate::error::Error;
use crate::state::Command;

/// A conflict is written again at most this often while it goes on, and cleared once it has
/// not been seen for [`CONFLICT_FORGET_MS`].
const CONFLICT_REFRESH_MS: u64 = 60_000;
const CONFLICT_FORGET_MS: u64 = 90_000;

impl ControlService {
    /// An agent's registration: recorded unless nothing changed (see below).
    pub(super) async fn register(
        &self,
        req: Request<pb::RegisterNodeRequest>,
    ) -> Res<pb::RegisterNodeReply> {
        // An agent registers itself only: its certificate must name the node id it claims,
        // or a stolen n2 key could redirect n1's steps to a machine of its choosing.
        self.shared
            .security
            .mode()
            .require_name(&req, Role::Agent, &req.get_ref().id)?;
        let r = req.into_inner();
        let id: NodeId =
            r.id.parse()
                .map_err(|e: orch_types::ParseError| bad(e.to_string()))?;
        check_address(&r.address, "registration refused")?;
        let versions: Vec<VersionEntry> = r
            .versions
            .iter()
            .map(|e| {
                Ok(VersionEntry {
                    version: e
                        .version
                        .parse()
                        .map_err(|e: orch_types::ParseError| bad(e.to_string()))?,
                    state: e
                        .state
                        .parse()
                        .map_err(|e: orch_types::ParseError| bad(e.to_string()))?,
                })
            })
            .collect::<Result<_, Status>>()?;
        orch_types::check_labels(r.labels.iter())
            .map_err(|e| bad(format!("registration refused: {e}")))?;
        let labels: std::collections::BTreeMap<String, String> = r.labels.into_iter().collect();
        let stamp = orch_types::VersionStamp::from_wire(r.boot_id, r.state_rev);
        self.refuse_duplicate(&id, &r.address, r.boot_id).await?;
        self.clear_old_conflict(&id, &r.address).await;
        // Nothing to write when address and labels hold and the report either was read before
        // the recorded one or is the recorded one (same versions, same stamp). Equal versions
        // under a newer stamp are written: the stamp must move on with the node, or a delayed
        // report read in between could later pass as newer. The driver records every step's
        // report with its stamp, so that write happens only after changes made outside a
        // rollout (an operator's `node ... --agent`, a restart).
        let unchanged = self.shared.read(|s| {
            s.nodes.get(&id).is_some_and(|n| {
                n.address == r.address
                    && n.labels == labels
                    && n.activate_timeout_ms == r.activate_timeout_ms
                    // A registration proves the agent answers again: recorded.
                    && n.unresponsive.is_none()
                    && (orch_types::stale_report(stamp, n.stamp)
                        || (n.versions == versions && n.stamp == stamp))
            })
        });
        if unchanged {
            // Still confirm we lead, so the agent learns where the leader is.
            if !self.shared.raft.is_leader() {
                return Err(Error::NotLeader {
                    leader: self.shared.raft.leader(),
                }
                .into());
            }
            return Ok(Response::new(pb::RegisterNodeReply { changed: false }));
        }
        self.write(Command::RegisterNode {
            id,
            address: r.address,
            labels,
            versions,
            at_ms: now_ms(),
            stamp,
            activate_timeout_ms: r.activate_timeout_ms,
        })
        .await?;
        Ok(Response::new(pb::RegisterNodeReply { changed: true }))
    }

    /// Refuses a registration of a known node id from another address while the agent on
    /// record there is alive (it answers as that node, as another process than the one
    /// registering): two machines must never share an id (steps would go to either). A node
    /// that really moved takes over as soon as its old agent no longer answers.
    async fn refuse_duplicate(&self, id: &NodeId, address: &str, boot: u64) -> Result<(), Status> {
        let recorded = self.shared.read(|s| {
            s.nodes
                .get(id)
                .map(|n| (n.address.clone(), n.conflict.clone()))
        });
        let Some((old, conflict)) = recorded.filter(|(a, _)| a != address) else {
            return Ok(());
        };
        let Some(live) = self.shared.live_agent(id, &old).await else {
            return Ok(());
        };
        if live == boot && boot != 0 {
            return Ok(());
        }
        let detail = format!(
            "an agent at {} (boot id {boot:x}) tried to register as {id} while the live agent at {old} (boot id {live:x}) has that id",
            shown(address)
        );
        tracing::warn!(node = %id, "registration refused: {detail}");
        let now = now_ms();
        if conflict.is_none_or(|c| now.saturating_sub(c.at_ms) > CONFLICT_REFRESH_MS) {
            let c = crate::state::Conflict { detail, at_ms: now };
            let _ = self
                .shared
                .raft
                .write(Command::NodeConflict {
                    id: id.clone(),
                    conflict: Some(c),
                })
                .await;
        }
        Err(Status::failed_precondition(format!(
            "node id {id} is already taken by a live agent at {old} (boot id {live:x}); this agent at {} is refused: give it its own --node-id, or stop the other agent (this one takes over as soon as the other no longer answers), or run `orchestrator nodes forget {id}` after stopping it",
            shown(address)
        )))
    }

    /// Forgets a conflict that has not been seen for a while (the duplicate stopped trying).
    async fn clear_old_conflict(&self, id: &NodeId, address: &str) {
        let stale = self.shared.read(|s| {
            s.nodes.get(id).is_some_and(|n| {
                n.address == address
                    && n.conflict
                        .as_ref()
                        .is_some_and(|c| now_ms().saturating_sub(c.at_ms) > CONFLICT_FORGET_MS)
            })
        });
        if stale {
            let _ = self
                .shared
                .raft
                .write(Command::NodeConflict {
                    id: id.clone(),
                    conflict: None,
                })
                .await;
        }
    }
}
