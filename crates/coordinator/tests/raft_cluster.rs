//! In-process coordinator clusters on loopback: replication, redirects, failover, restarts,
//! catch-up by snapshot, membership changes.

mod raft_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use orch_coordinator::raft::{RaftConfig, Role, WriteError};
use orch_coordinator::state::Response;
use raft_support::{Cluster, register, registered, retry, wait_for};

const T: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_three_nodes_replicate_redirect_fail_over_and_restart() {
    let mut c = Cluster::start(&[1, 2, 3], None).await;
    let leader = c.leader(T).await;

    // Writes through the leader reach every state view.
    for n in 0..20 {
        assert_eq!(
            c.node(leader).write(register(n)).await.unwrap(),
            Response::Ok
        );
    }
    wait_for("20 registrations on every coordinator", T, || {
        c.running().iter().all(|&i| registered(c.node(i)) == 20)
    })
    .await;
    // The applied watch moved with them.
    let applied = *c.node(leader).applied().borrow();
    assert!(applied >= 20, "applied index {applied}");

    // A follower refuses writes and names the leader.
    let follower = *c.running().iter().find(|&&i| i != leader).unwrap();
    match c.node(follower).write(register(100)).await {
        Err(WriteError::NotLeader {
            leader: Some((id, addr)),
        }) => {
            assert_eq!(id, leader);
            assert_eq!(addr, c.addr(leader));
        }
        other => panic!("expected NotLeader from coordinator {follower}, got {other:?}"),
    }
    assert!(matches!(
        c.node(follower).ensure_linearizable().await,
        Err(WriteError::NotLeader { leader: Some(_) })
    ));
    c.node(leader).ensure_linearizable().await.unwrap();
    assert_eq!(c.node(follower).leader().map(|l| l.0), Some(leader));
    let st = c.node(follower).metrics();
    assert_eq!(st.voters().len(), 3);
    assert_eq!(st.role, Role::Follower);

    // Kill the leader: another takes over, and writes continue.
    let old_term = c.node(leader).current_term();
    let mut watch = c.node(follower).leadership();
    let killed = Instant::now();
    c.kill(leader).await;
    let new_leader = c.leader(T).await;
    let failover = killed.elapsed();
    println!(
        "RAFT FAILOVER: leader {leader} killed -> coordinator {new_leader} leads after {failover:?}"
    );
    assert_ne!(new_leader, leader);
    assert!(
        failover < Duration::from_secs(5),
        "failover took {failover:?}"
    );
    assert!(c.node(new_leader).current_term() > old_term);
    // The leadership watch of the survivors saw the new term.
    wait_for("leadership watch to show the new term", T, || {
        let l = *watch.borrow_and_update();
        l.term > old_term && l.leader == Some(new_leader)
    })
    .await;
    if new_leader == follower {
        assert!(c.node(follower).leadership().borrow().is_leader);
    }
    for n in 20..40 {
        c.node(new_leader).write(register(n)).await.unwrap();
    }

    // The killed coordinator restarts from its data directory, rejoins and catches up.
    c.restart(leader).await;
    wait_for("the restarted coordinator to catch up", T, || {
        registered(c.node(leader)) == 40
    })
    .await;
    assert!(!c.node(leader).is_leader() || c.node(leader).current_term() > old_term);

    // Restart all three from disk: state intact, no re-initialisation.
    let membership_before = c.node(new_leader).metrics().members;
    let last_before = c.node(new_leader).metrics().last_applied;
    c.shutdown().await;
    let peers: BTreeMap<u64, String> = [1, 2, 3].iter().map(|&i| (i, c.addr(i))).collect();
    for id in [1, 2, 3] {
        let mut p = peers.clone();
        p.remove(&id);
        // The original bootstrap node gets --bootstrap again: it must not re-initialise.
        c.launch(id, p, id == 1, None).await;
        assert_eq!(
            registered(c.node(id)),
            40,
            "state of coordinator {id} right after restart"
        );
        // Its log is the old one (initialising would have started a new, empty log).
        wait_for("the restarted log to be the old one", T, || {
            c.node(id).metrics().last_log_index >= last_before
        })
        .await;
    }
    let l = c.leader(T).await;
    assert_eq!(c.node(l).metrics().members, membership_before);
    c.node(l).write(register(40)).await.unwrap();
    c.wait_applied(last_before + 1, T).await;
    wait_for("41 registrations everywhere", T, || {
        c.running().iter().all(|&i| registered(c.node(i)) == 41)
    })
    .await;
    c.shutdown().await;
}

fn small_snapshots(cfg: &mut RaftConfig) {
    cfg.snapshot_every = 20;
    cfg.logs_to_keep = 5;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_lagging_node_catches_up_by_snapshot() {
    let mut c = Cluster::start(&[1, 2, 3], Some(small_snapshots)).await;
    let leader = c.leader(T).await;
    let lagging = *c.running().iter().find(|&&i| i != leader).unwrap();
    c.node(leader).write(register(0)).await.unwrap();
    wait_for("first write everywhere", T, || {
        c.running().iter().all(|&i| registered(c.node(i)) == 1)
    })
    .await;
    let lagging_last = c.node(lagging).metrics().last_log_index;
    c.kill(lagging).await;

    for n in 1..150 {
        c.node(leader).write(register(n)).await.unwrap();
    }
    // The leader snapshotted and purged past what the lagging node has.
    let purged = wait_for("the leader to purge its log", T, || {
        c.node(leader)
            .metrics()
            .purged
            .is_some_and(|p| p > lagging_last + 1)
    })
    .await;
    let st = c.node(leader).metrics();
    println!(
        "leader {leader}: snapshot at {:?}, purged to {:?} ({purged:?}); lagging node had {lagging_last}",
        st.snapshot, st.purged
    );

    c.restart(lagging).await;
    wait_for("the lagging node to catch up", T, || {
        registered(c.node(lagging)) == 150
    })
    .await;
    // It got there by installing a snapshot: its log starts after a purge point.
    let st = c.node(lagging).metrics();
    assert!(
        st.snapshot.is_some(),
        "lagging node has no snapshot: {st:?}"
    );
    assert!(
        st.purged.is_some_and(|p| p > lagging_last),
        "lagging node did not skip the purged log: {st:?}"
    );
    assert_eq!(
        c.node(lagging).state().read().unwrap().nodes,
        c.node(leader).state().read().unwrap().nodes
    );

    // And it restarts from its own snapshot + log.
    c.kill(lagging).await;
    c.restart(lagging).await;
    assert_eq!(registered(c.node(lagging)), 150);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_single_node_bootstrap_is_a_complete_cluster() {
    let mut c = Cluster::start(&[7], None).await;
    let l = c.leader(T).await;
    assert_eq!(l, 7);
    for n in 0..10 {
        c.node(7).write(register(n)).await.unwrap();
    }
    assert_eq!(registered(c.node(7)), 10);
    c.node(7).ensure_linearizable().await.unwrap();
    let st = c.node(7).metrics();
    assert_eq!(st.role, Role::Leader);
    assert_eq!(st.leader, Some((7, c.addr(7))));
    assert_eq!(st.voters().into_iter().collect::<Vec<_>>(), vec![7]);

    // Restart with --bootstrap again: no re-initialisation, state intact, writable.
    c.kill(7).await;
    c.launch(7, BTreeMap::new(), true, None).await;
    assert_eq!(registered(c.node(7)), 10);
    c.leader(T).await;
    c.node(7).write(register(10)).await.unwrap();
    assert_eq!(registered(c.node(7)), 11);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_add_and_remove_members_on_a_running_cluster() {
    let (mut c, mut listeners) = Cluster::new(&[1, 2, 3], None).await;
    // Coordinator 1 alone, bootstrapped; 2 and 3 start empty, knowing nobody.
    c.launch(1, BTreeMap::new(), true, listeners.remove(&1))
        .await;
    c.leader(T).await;
    for n in 0..5 {
        c.node(1).write(register(n)).await.unwrap();
    }
    c.launch(2, BTreeMap::new(), false, listeners.remove(&2))
        .await;
    c.launch(3, BTreeMap::new(), false, listeners.remove(&3))
        .await;

    c.node(1).add_member(2, c.addr(2)).await.unwrap();
    c.node(1).add_member(3, c.addr(3)).await.unwrap();
    let st = c.node(1).metrics();
    assert_eq!(
        st.voters().into_iter().collect::<Vec<_>>(),
        vec![1, 2, 3],
        "{st:?}"
    );
    assert!(!st.joint);
    wait_for("new members to catch up", T, || {
        registered(c.node(2)) == 5 && registered(c.node(3)) == 5
    })
    .await;
    // Adding an existing voter again is a no-op; a follower refuses membership changes.
    c.node(1).add_member(3, c.addr(3)).await.unwrap();
    assert!(matches!(
        c.node(2).add_member(9, "127.0.0.1:1").await,
        Err(orch_coordinator::raft::Error::NotLeader {
            leader: Some((1, _))
        })
    ));

    c.node(1).remove_member(3).await.unwrap();
    let st = c.node(1).metrics();
    assert_eq!(st.voters().into_iter().collect::<Vec<_>>(), vec![1, 2]);
    assert!(st.learners().is_empty());
    c.kill(3).await;
    c.node(1).write(register(5)).await.unwrap();
    wait_for("coordinator 2 to apply", T, || registered(c.node(2)) == 6).await;

    // Removing the leader hands leadership to the remaining voter.
    retry("remove the leader", T, || c.node(1).remove_member(1)).await;
    wait_for("coordinator 2 to lead", T, || c.node(2).is_leader()).await;
    c.node(2).write(register(6)).await.unwrap();
    assert_eq!(registered(c.node(2)), 7);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_no_quorum_no_commit_then_recovers() {
    fn short_writes(cfg: &mut RaftConfig) {
        cfg.write_timeout_ms = 1_500;
    }
    let mut c = Cluster::start(&[1, 2, 3], Some(short_writes)).await;
    let leader = c.leader(T).await;
    c.node(leader).write(register(0)).await.unwrap();
    let others: Vec<u64> = c.running().into_iter().filter(|&i| i != leader).collect();
    for &o in &others {
        c.kill(o).await;
    }
    // 2 of 3 down: nothing commits.
    let r = c.node(leader).write(register(1)).await;
    assert!(
        matches!(
            r,
            Err(WriteError::Other(_)) | Err(WriteError::NotLeader { .. })
        ),
        "{r:?}"
    );
    assert_eq!(registered(c.node(leader)), 1);
    // One returns: the cluster makes progress again (the pending write may land too).
    c.restart(others[0]).await;
    let l = c.leader(T).await;
    retry("write after a quorum is back", T, || {
        c.node(l).write(register(2))
    })
    .await;
    wait_for("the write to apply", T, || registered(c.node(l)) >= 2).await;
    c.shutdown().await;
}
