//! Membership changes: adding a coordinator (learner, caught up, then voter) and removing one.

use std::collections::BTreeSet;
use std::time::Duration;

use openraft::async_runtime::WatchReceiver;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers};

use super::{Error, RaftNode, TypeConfig, WriteError};

/// How long `add_member` waits for a new member to catch up before giving up.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a new learner has to confirm the entry that added it before it may become a voter
/// (a live coordinator does so within a heartbeat or a snapshot transfer).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(20);

impl RaftNode {
    /// Adds coordinator `id` at `addr`: first as a learner, waiting until it has caught up,
    /// then as a voter. Must run on the leader; one membership change at a time.
    pub async fn add_member(&self, id: u64, addr: impl Into<String>) -> Result<(), Error> {
        let addr = addr.into();
        let _one_at_a_time = self.inner.membership_lock.lock().await;
        let st = self.metrics();
        let existing = st.members.iter().find(|m| m.id == id);
        if existing.is_some_and(|m| m.voter && m.addr == addr) {
            return Ok(());
        }
        if let Some(other) = existing.map(|m| &m.addr)
            && other != &addr
        {
            return Err(Error::Membership(format!(
                "coordinator {id} is already a member with address {other}; remove it first to change its address"
            )));
        }
        let raft = &self.inner.raft;
        let added = tokio::time::timeout(
            CATCH_UP_TIMEOUT,
            raft.add_learner(id, BasicNode::new(&addr), true),
        )
        .await;
        let added = match added {
            Err(_) => {
                return Err(Error::Membership(format!(
                    "coordinator {id} at {addr} did not catch up within {CATCH_UP_TIMEOUT:?}; is it running and reachable from the leader? It stays a learner: add it again, or remove it"
                )));
            }
            Ok(r) => r.map_err(|e| self.membership_err(e))?,
        };
        // openraft's blocking add_learner may return before the learner ever answered (it
        // counts a short log as caught up). Promoting a silent node would count it towards the
        // quorum and could stall the cluster for good, so wait until it has replicated the entry
        // that added it.
        let target = added.log_id.index;
        let deadline = tokio::time::Instant::now() + CONFIRM_TIMEOUT;
        loop {
            let metrics = raft.metrics();
            let matched = metrics
                .borrow_watched()
                .replication
                .as_ref()
                .and_then(|r| r.get(&id).cloned().flatten())
                .map(|l| l.index);
            if matched.is_some_and(|m| m >= target) {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Membership(format!(
                    "coordinator {id} at {addr} never confirmed the log within {CONFIRM_TIMEOUT:?}; is it running and reachable from the leader? It stays a learner (not counted for quorum): start it and add it again, or remove it"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map_err(|e| self.membership_err(e))?;
        tracing::info!(id, addr, "coordinator added as a voter");
        Ok(())
    }

    /// Removes coordinator `id` (voter or learner) from the cluster. Must run on the leader;
    /// removing the leader itself hands leadership to another voter.
    pub async fn remove_member(&self, id: u64) -> Result<(), Error> {
        let _one_at_a_time = self.inner.membership_lock.lock().await;
        let st = self.metrics();
        let (voters, learners) = (st.voters(), st.learners());
        let change = if voters.contains(&id) {
            if voters.len() == 1 {
                return Err(Error::Membership(format!(
                    "coordinator {id} is the only voter; a cluster cannot remove its last voter"
                )));
            }
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else if learners.contains(&id) {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        } else {
            return Err(Error::Membership(format!(
                "coordinator {id} is not a member (voters: {voters:?}, learners: {learners:?})"
            )));
        };
        self.inner
            .raft
            .change_membership(change, false)
            .await
            .map_err(|e| self.membership_err(e))?;
        tracing::info!(id, "coordinator removed");
        Ok(())
    }

    fn membership_err(&self, e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> Error {
        match self.write_err(e) {
            WriteError::NotLeader { leader } => Error::NotLeader { leader },
            WriteError::Other(m) => Error::Membership(m),
        }
    }
}
