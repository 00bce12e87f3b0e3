//! Bounded state: rollout retention and package garbage collection, after Nomad's core
//! scheduler (a threshold, a batch, a log line per batch).
//!
//! - **Retention** (leader only, for the term it leads): keeps the newest `retain_rollouts`
//!   *finished* rollouts in the replicated state. Whenever more are finished (checked after
//!   every applied entry, so right after a rollout ends, and on a timer), it proposes
//!   [`Command::ArchiveRollouts`] with the oldest surplus ones, at most [`MAX_BATCH`] per entry.
//!   Unfinished rollouts are never touched and do not count. Every coordinator's state machine
//!   writes the archived rollouts to its history file, then drops them; only the leader's
//!   setting counts, so the result is the same everywhere. The same command drops package
//!   records that no rollout left in the state names, once their grace period after upload is
//!   over.
//! - **Blob sweep** (every coordinator): deletes `DATA/blobs/<sha256>` files (and their
//!   signatures) that no package record names and that were not written or re-uploaded within
//!   the grace period. Uploads in progress live under temp names and are never swept; a
//!   re-upload of stored bytes refreshes the file's time (see [`crate::blobs`]).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::Shared;
use crate::driver::now_ms;
use crate::state::{ClusterState, Command, Response};

/// Rollouts archived (and package records dropped) per Raft entry at most: each entry's history
/// lines are written and fsynced by every coordinator while it applies it.
pub const MAX_BATCH: usize = 50;

/// Default number of finished rollouts kept in the replicated state.
pub const DEFAULT_RETAIN_ROLLOUTS: usize = 100;

/// Default grace period of package records and blob files after their upload.
pub const DEFAULT_GC_GRACE: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Copy)]
pub struct RetentionConfig {
    /// Finished rollouts kept in the replicated state (at least 1).
    pub keep: usize,
    /// Package records and blob files younger than this are kept even when unreferenced.
    pub grace: Duration,
}

impl RetentionConfig {
    /// How often the jobs look again without being woken: often enough that a grace period
    /// is not overrun by much.
    fn period(&self) -> Duration {
        (self.grace / 2).clamp(Duration::from_millis(50), Duration::from_secs(60))
    }
}

/// Whether more than `keep` rollouts are finished: cheap (at most one rollout is unfinished,
/// and it is the newest while it runs), so it can run after every applied entry.
pub fn over_limit(s: &ClusterState, keep: usize) -> bool {
    let unfinished = usize::from(s.active().is_some());
    s.rollouts.len().saturating_sub(unfinished) > keep.max(1)
}

/// What retention would propose now, if anything: the oldest finished rollouts beyond the
/// newest `keep` finished ones (at most [`MAX_BATCH`]), and package records that no remaining
/// rollout names and that were uploaded at least `grace_ms` before `now_ms`.
pub fn plan(s: &ClusterState, keep: usize, grace_ms: u64, now_ms: u64) -> Option<Command> {
    let finished: Vec<_> = s
        .rollouts
        .iter()
        .filter(|(_, r)| r.is_finished())
        .map(|(id, _)| *id)
        .collect();
    let surplus = finished.len().saturating_sub(keep.max(1));
    let rollouts: Vec<_> = finished.into_iter().take(surplus.min(MAX_BATCH)).collect();
    let leaving: BTreeSet<_> = rollouts.iter().copied().collect();
    let in_use: BTreeSet<&str> = s
        .rollouts
        .iter()
        .filter(|(id, _)| !leaving.contains(id))
        .filter_map(|(_, r)| r.spec().package.as_ref().map(|p| p.sha256.as_str()))
        .collect();
    let packages: Vec<String> = s
        .packages
        .values()
        .filter(|p| !in_use.contains(p.sha256.as_str()))
        .filter(|p| now_ms.saturating_sub(p.uploaded_at_ms) >= grace_ms)
        .take(MAX_BATCH)
        .map(|p| p.sha256.clone())
        .collect();
    if rollouts.is_empty() && packages.is_empty() {
        return None;
    }
    Some(Command::ArchiveRollouts {
        rollouts,
        packages,
        grace_ms,
        at_ms: now_ms,
    })
}

/// Runs retention while this coordinator leads; each term's job stops when the term ends.
/// Returns when `stop` fires.
pub async fn run(shared: Arc<Shared>, cfg: RetentionConfig, mut stop: watch::Receiver<bool>) {
    let mut leadership = shared.raft.leadership();
    loop {
        if *stop.borrow() {
            return;
        }
        let l = *leadership.borrow_and_update();
        if l.is_leader {
            let term = l.term;
            let mut watch_term = leadership.clone();
            let term_over = async move {
                loop {
                    if watch_term.changed().await.is_err() {
                        return;
                    }
                    let now = *watch_term.borrow();
                    if !now.is_leader || now.term != term {
                        return;
                    }
                }
            };
            // Dropping the job (term over, stop) cancels whatever it awaits; a write it had
            // proposed may still commit, which is harmless (apply checks every item again).
            let ended_by_itself = tokio::select! {
                _ = lead(&shared, cfg, term) => true,
                _ = term_over => false,
                _ = stop.changed() => return,
            };
            if ended_by_itself {
                // A failed write: look again shortly rather than spin.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.changed() => return,
                }
            }
            continue;
        }
        tokio::select! {
            r = leadership.changed() => if r.is_err() { return },
            _ = stop.changed() => return,
        }
    }
}

/// One term's retention job; returns only when a write fails.
async fn lead(shared: &Shared, cfg: RetentionConfig, term: u64) {
    tracing::info!(
        term,
        keep = cfg.keep,
        grace = ?cfg.grace,
        "rollout retention and package GC running (this coordinator leads)"
    );
    let grace_ms = cfg.grace.as_millis() as u64;
    let mut applied = shared.raft.applied();
    let mut tick = tokio::time::interval(cfg.period());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // After an applied entry only the cheap check runs (a rollout may just have finished);
    // unreferenced packages and grace periods are looked at on the timer, and with every
    // archive (which is what leaves packages unreferenced).
    let mut full = true;
    loop {
        let cmd = shared.read(|s| {
            if full || over_limit(s, cfg.keep) {
                plan(s, cfg.keep, grace_ms, now_ms())
            } else {
                None
            }
        });
        if let Some(cmd) = cmd {
            match shared.raft.write(cmd).await {
                Ok(Response::Archived { rollouts, packages }) => {
                    if !rollouts.is_empty() || !packages.is_empty() {
                        tracing::info!(
                            term,
                            archived = rollouts.len(),
                            first = rollouts.first().map(String::as_str).unwrap_or("-"),
                            last = rollouts.last().map(String::as_str).unwrap_or("-"),
                            packages_dropped = packages.len(),
                            keep = cfg.keep,
                            "retention: archived rollouts to the history file, dropped unreferenced package records"
                        );
                        // More may be due (batches are bounded): plan again at once.
                        continue;
                    }
                }
                Ok(other) => {
                    tracing::warn!(term, "retention: unexpected answer {other:?}");
                }
                Err(e) => {
                    tracing::warn!(
                        term,
                        "retention: cannot archive finished rollouts: {e}; retrying shortly"
                    );
                    return;
                }
            }
        }
        full = tokio::select! {
            r = applied.changed() => if r.is_err() { return } else { false },
            _ = tick.tick() => true,
        };
    }
}

/// Deletes blob files no package record names, on this coordinator, every so often, until
/// `stop` fires.
pub async fn sweep_blobs(
    shared: Arc<Shared>,
    cfg: RetentionConfig,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(cfg.period());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let named: BTreeSet<String> = shared.read(|s| s.packages.keys().cloned().collect());
        let blobs = shared.blobs.clone();
        let grace = cfg.grace;
        match tokio::task::spawn_blocking(move || blobs.sweep(&named, grace)).await {
            Ok(Ok(r)) if r.deleted > 0 => tracing::info!(
                deleted = r.deleted,
                bytes = r.bytes,
                kept = r.kept,
                dir = %shared.blobs.dir().display(),
                "package GC: deleted blobs no package record names"
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!("package GC: {e}"),
            Err(e) => tracing::warn!("package GC task failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use orch_rollout::{Command as Op, Event, LogEntry};
    use orch_types::RolloutId;
    use orch_types::rollout::{PackageRef, RolloutSpec};

    use super::*;
    use crate::state::PackageRecord;

    fn pkg(i: u64, at: u64) -> PackageRecord {
        PackageRecord {
            name: "app".into(),
            version: format!("4.2.{i}").parse().unwrap(),
            sha256: format!("{i:064x}"),
            size: 1,
            holders: BTreeSet::from([1]),
            uploaded_at_ms: at,
        }
    }

    fn apply_ok(s: &mut ClusterState, c: Command) -> Response {
        let r = s.apply(&c);
        assert!(!matches!(r, Response::Rejected(_)), "{c:?}: {r:?}");
        r
    }

    /// A state with `n` rollouts of 4.2.1..4.2.n (rollout i uses package i, uploaded at i),
    /// each aborted (finished) except the last when `last_active`.
    fn cluster(n: u64, last_active: bool) -> ClusterState {
        let mut s = ClusterState::default();
        apply_ok(
            &mut s,
            Command::RegisterNode {
                id: "n1".parse().unwrap(),
                address: "127.0.0.1:1".into(),
                labels: BTreeMap::new(),
                versions: Vec::new(),
                at_ms: 0,
                stamp: None,
                activate_timeout_ms: 0,
            },
        );
        for i in 1..=n {
            let p = pkg(i, i);
            apply_ok(&mut s, Command::AddPackage(p.clone()));
            let mut spec = RolloutSpec::new("r0", p.version, vec!["n1".parse().unwrap()], "alice");
            spec.package = Some(PackageRef {
                name: p.name,
                version: p.version,
                sha256: p.sha256,
                size: 1,
            });
            apply_ok(&mut s, Command::CreateRollout { spec, at_ms: i });
            if i < n || !last_active {
                apply_ok(
                    &mut s,
                    Command::Rollout {
                        id: RolloutId(i),
                        entry: LogEntry {
                            event: Event::Command(Op::Abort),
                            at_ms: i,
                            by: "alice".into(),
                        },
                        term: 0,
                    },
                );
            }
        }
        s
    }

    fn ids(s: &ClusterState) -> Vec<u64> {
        s.rollouts.keys().map(|id| id.0).collect()
    }

    #[test]
    fn keeps_the_newest_finished_rollouts_and_never_an_active_one() {
        let mut s = cluster(6, true);
        assert!(over_limit(&s, 2) && !over_limit(&s, 5));
        // 5 finished (r1..r5) + active r6; keep 2 finished: r1..r3 go.
        let cmd = plan(&s, 2, 0, 100).expect("something to archive");
        let Command::ArchiveRollouts { rollouts, .. } = &cmd else {
            panic!("{cmd:?}")
        };
        assert_eq!(
            rollouts,
            &vec![RolloutId(1), RolloutId(2), RolloutId(3)],
            "oldest surplus first"
        );
        let r = apply_ok(&mut s, cmd);
        assert!(
            matches!(&r, Response::Archived { rollouts, .. } if rollouts == &["r000001", "r000002", "r000003"]),
            "{r:?}"
        );
        assert_eq!(ids(&s), vec![4, 5, 6]);
        assert!(!s.created_at.contains_key(&RolloutId(1)));
        assert_eq!(s.active().map(|(id, _)| id), Some(RolloutId(6)));
        assert!(!over_limit(&s, 2));
        // Nothing left to do; an active rollout is never archived, even named explicitly.
        assert!(plan(&s, 2, 0, 100).is_none());
        let before = s.clone();
        let r = apply_ok(
            &mut s,
            Command::ArchiveRollouts {
                rollouts: vec![RolloutId(6), RolloutId(42)],
                packages: Vec::new(),
                grace_ms: 0,
                at_ms: 100,
            },
        );
        assert_eq!(
            r,
            Response::Archived {
                rollouts: vec![],
                packages: vec![]
            }
        );
        assert_eq!(s, before);
        // Ids keep counting after archiving.
        assert_eq!(s.rollout_seq, 6);
    }

    #[test]
    fn archives_in_bounded_batches() {
        let s = cluster(MAX_BATCH as u64 + 10, false);
        let Some(Command::ArchiveRollouts { rollouts, .. }) = plan(&s, 1, 0, 0) else {
            panic!("nothing planned")
        };
        assert_eq!(rollouts.len(), MAX_BATCH);
        assert_eq!(rollouts[0], RolloutId(1));
    }

    #[test]
    fn drops_unreferenced_package_records_only_after_the_grace_period() {
        let mut s = cluster(4, false);
        // An upload not used by any rollout yet, at t=50.
        apply_ok(&mut s, Command::AddPackage(pkg(9, 50)));
        // keep 2: r1, r2 go; their packages (uploaded at 1 and 2) are past a grace of 10 at
        // t=59, the fresh upload (t=50) is not.
        let cmd = plan(&s, 2, 10, 59).unwrap();
        let r = apply_ok(&mut s, cmd);
        let Response::Archived { packages, .. } = r else {
            panic!("{r:?}")
        };
        assert_eq!(packages, vec![pkg(1, 0).sha256, pkg(2, 0).sha256]);
        let left: Vec<_> = s.packages.values().map(|p| p.version.patch).collect();
        assert_eq!(left, vec![3, 4, 9], "packages of retained rollouts stay");
        // Past its grace period, the unused upload goes too.
        let cmd = plan(&s, 2, 10, 60).unwrap();
        let r = apply_ok(&mut s, cmd);
        assert!(
            matches!(&r, Response::Archived { rollouts, packages } if rollouts.is_empty() && packages == &[pkg(9, 0).sha256]),
            "{r:?}"
        );
    }

    #[test]
    fn a_re_upload_after_planning_keeps_the_record() {
        let mut s = cluster(3, false);
        let cmd = plan(&s, 1, 10, 100).unwrap();
        // The package of r1 is uploaded again (for a new rollout) before the command applies.
        let mut again = pkg(1, 95);
        again.holders = BTreeSet::from([2]);
        apply_ok(&mut s, Command::AddPackage(again));
        assert_eq!(s.packages[&pkg(1, 0).sha256].uploaded_at_ms, 95);
        assert_eq!(
            s.packages[&pkg(1, 0).sha256].holders,
            BTreeSet::from([1, 2])
        );
        let r = apply_ok(&mut s, cmd);
        let Response::Archived { rollouts, packages } = r else {
            panic!("{r:?}")
        };
        assert_eq!(rollouts, vec!["r000001", "r000002"]);
        assert_eq!(
            packages,
            vec![pkg(2, 0).sha256],
            "r1's package was re-uploaded"
        );
        // An older upload time never moves the record's time back.
        apply_ok(&mut s, Command::AddPackage(pkg(1, 3)));
        assert_eq!(s.packages[&pkg(1, 0).sha256].uploaded_at_ms, 95);
    }

    #[test]
    fn applying_the_same_commands_gives_the_same_state_everywhere() {
        let mut a = cluster(5, true);
        let mut b = a.clone();
        let cmd = plan(&a, 1, 0, 10).unwrap();
        let ra = a.apply(&cmd);
        let rb = b.apply(&cmd);
        assert_eq!(ra, rb);
        assert_eq!(a, b);
        // A repeated command (a retry, a re-applied entry) changes nothing.
        let again = a.apply(&cmd);
        assert_eq!(
            again,
            Response::Archived {
                rollouts: vec![],
                packages: vec![]
            }
        );
        assert_eq!(a, b);
        // Round trip through JSON (the log and snapshots) keeps the state.
        let json = serde_json::to_string(&a).unwrap();
        let back: ClusterState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, a);
    }

    #[test]
    fn archiving_is_refused_inside_a_batch() {
        let mut s = cluster(3, false);
        let cmd = plan(&s, 1, 0, 10).unwrap();
        let before = s.clone();
        let r = s.apply(&Command::Batch(vec![cmd]));
        assert_eq!(
            r,
            Response::Batch(vec![Response::Rejected("archiving is not batched".into())])
        );
        assert_eq!(s, before);
    }

    #[test]
    fn package_records_of_older_versions_load_with_upload_time_zero() {
        let json = r#"{"name":"app","version":"4.2.1","sha256":"ab","size":1,"holders":[1]}"#;
        let p: PackageRecord = serde_json::from_str(json).unwrap();
        assert_eq!(p.uploaded_at_ms, 0);
    }
}
