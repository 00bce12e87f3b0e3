//! The runbook's backup and restore of a coordinator (docs/operations.md, "Backup and
//! restore"), done as documented on real processes: stop the coordinator, copy its data
//! directory, start it again; later its machine is lost, and a new process with the same id
//! and configuration is started on a copy of the backup at a new path. It rejoins, catches up
//! on what the cluster decided since the backup, and serves the cluster's state.

use std::path::Path;
use std::time::Duration;

use orch_tests::cluster::{Cluster, ClusterOpts};

const T: Duration = Duration::from_secs(60);

/// `cp -a SRC DST` for a directory of plain files and directories.
fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
}

fn phase_via(c: &Cluster, addr: &str, id: &str) -> Option<String> {
    c.ctl_status_via(addr, id).map(|s| s.phase)
}

#[test]
fn a_coordinator_restored_from_a_backup_into_a_new_data_dir_rejoins_and_catches_up() {
    let mut c = Cluster::start(ClusterOpts::state_only(3, 2));
    let pkg = c.package("4.2.1", false).display().to_string();
    c.cli_ok(&["rollout", "4.2.1", "--package", &pkg]);

    // Back up coordinator 3 as documented: stop it, copy the data directory, start it again.
    let backup = c.dir.path().join("backup-coordinator3");
    let addr3 = c.coord(3).addr.clone();
    c.coord(3).stop();
    copy_dir(&c.coord(3).data_dir.clone(), &backup);
    c.coord(3).restart();
    c.wait_for(T, "coordinator 3 back with r000001", |c| {
        phase_via(c, &addr3, "r000001").as_deref() == Some("succeeded")
    });

    // Its machine is lost (process and disk); the cluster goes on without it.
    c.coord(3).kill9();
    let original = c.coord(3).data_dir.clone();
    std::fs::remove_dir_all(&original).unwrap();
    let pkg2 = c.package("4.2.2", false).display().to_string();
    c.cli_ok(&["rollout", "4.2.2", "--package", &pkg2]);

    // Restore: the backup copied to a new path, the same id and peers, a new process.
    let restored = c.dir.path().join("restored-coordinator3");
    copy_dir(&backup, &restored);
    c.coord(3).set_data_dir(&restored);
    c.coord(3).restart();
    c.wait_for(
        T,
        "the restored coordinator serving both rollouts from its own state",
        |c| {
            phase_via(c, &addr3, "r000001").as_deref() == Some("succeeded")
                && phase_via(c, &addr3, "r000002").as_deref() == Some("succeeded")
        },
    );
    let status = c
        .ctl_cluster_via(&addr3)
        .expect("the restored coordinator answers");
    assert_ne!(status.leader_id, 0, "it knows the leader: {status:?}");
    assert_eq!(status.members.len(), 3, "{status:?}");
    assert!(!original.exists(), "it runs on the restored copy alone");
    // And it counts in the quorum again: with coordinator 3 and one other, a rollout runs.
    let other = c.wait_for_leader(T);
    let down = [1, 2].into_iter().find(|id| *id != other).unwrap();
    c.coord(down).kill9();
    c.wait_for_leader(T);
    let pkg3 = c.package("4.2.3", false).display().to_string();
    c.cli_ok(&["rollout", "4.2.3", "--package", &pkg3]);
    c.wait_for(T, "r000003 on the restored coordinator", |c| {
        phase_via(c, &addr3, "r000003").as_deref() == Some("succeeded")
    });
}
