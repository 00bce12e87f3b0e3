//! Fencing: which coordinator cluster this node belongs to, the highest fence it has accepted
//! from that cluster, and whether a rollout holds the node.
//!
//! - `ROOT/agent/cluster.json` = `{"cluster_id": .., "bound_at": RFC3339, "by": caller}`: the
//!   cluster this node belongs to (`""` or no file: none yet). The first fenced call accepted
//!   binds it; `Rebind` (an operator) moves it. A fence of another cluster is refused
//!   (`other-cluster`).
//! - `ROOT/agent/fence.json` = `{"cluster_id", "term", "rollout_id", "step", "released",
//!   "accepted_at"}`: the highest fence accepted. It counts only while its cluster is the bound
//!   one, so a rebind is the one atomic write of cluster.json. Fences of one cluster are
//!   ordered by `(term, rollout number, step)`; older ones are refused (`stale-fence`), equal
//!   ones accepted (a retried step carries the same fence and must stay idempotent).
//! - The node is *held* by the rollout of the counting fence until a `Release` of that rollout
//!   (`released`). While held, unfenced (operator) steps are refused (`held`) unless forced.
//!
//! Only coordinators may send fences (`forbidden` otherwise, under mTLS); a fenced step whose
//! deadline has passed is refused (`deadline`) and changes nothing.

use std::cmp::Ordering;
use std::fs;
use std::path::{Path, PathBuf};

use orch_proto::agent as pb;
use orch_types::RolloutId;
use serde::{Deserialize, Serialize};

use crate::audit::{rfc3339_ms, rfc3339_secs};
use crate::error::{Error, Result};

/// Longest cluster id accepted (ids are made by `orchestrator` at bootstrap; far shorter).
pub const MAX_CLUSTER_ID: usize = 128;

/// A validated fence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub cluster_id: String,
    pub term: u64,
    pub rollout: RolloutId,
    pub step: u64,
    /// Ms since the epoch after which the step must not start; 0: none.
    pub deadline_unix_ms: u64,
}

impl Fence {
    /// Checks a fence off the wire: a valid cluster id and a rollout id that parses.
    pub fn from_wire(f: &pb::Fence) -> Result<Fence> {
        validate_cluster_id(&f.cluster_id)
            .map_err(|why| Error::InvalidFence(format!("invalid fence: {why}")))?;
        let rollout = f
            .rollout_id
            .parse::<RolloutId>()
            .map_err(|e| Error::InvalidFence(format!("invalid fence: {e}")))?;
        Ok(Fence {
            cluster_id: f.cluster_id.clone(),
            term: f.term,
            rollout,
            step: f.step,
            deadline_unix_ms: f.deadline_unix_ms,
        })
    }

    /// The order within one cluster.
    fn key(&self) -> (u64, u64, u64) {
        (self.term, self.rollout.0, self.step)
    }

    fn cmp_key(&self, other: &Fence) -> Ordering {
        self.key().cmp(&other.key())
    }

    pub fn to_wire(&self) -> pb::Fence {
        pb::Fence {
            term: self.term,
            rollout_id: self.rollout.to_string(),
            step: self.step,
            cluster_id: self.cluster_id.clone(),
            deadline_unix_ms: self.deadline_unix_ms,
        }
    }
}

/// Why a cluster id is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterIdError {
    #[error("the cluster id is empty (a coordinator's fence names its cluster)")]
    Empty,
    #[error(
        "cluster id {shown:?} is not 1-{MAX_CLUSTER_ID} printable ASCII characters without spaces"
    )]
    Invalid {
        /// The id's first 64 characters.
        shown: String,
    },
}

/// A cluster id must be 1-128 printable ASCII characters without spaces: it is shown in
/// refusals and audit lines as it is.
pub fn validate_cluster_id(id: &str) -> std::result::Result<(), ClusterIdError> {
    if id.is_empty() {
        return Err(ClusterIdError::Empty);
    }
    if id.len() > MAX_CLUSTER_ID || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ClusterIdError::Invalid {
            shown: id.chars().take(64).collect(),
        });
    }
    Ok(())
}

/// The highest accepted fence, as kept in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// Its deadline is not kept (0).
    pub fence: Fence,
    /// A `Release` of its rollout came: the node is no longer held.
    pub released: bool,
    /// When it was first accepted (RFC 3339).
    pub accepted_at: String,
}

/// `fence.json`. Fields added since the first format default, so an old file still loads; an
/// old fence has no cluster and therefore never counts.
#[derive(Debug, Serialize, Deserialize)]
struct FenceFile {
    #[serde(default)]
    cluster_id: String,
    term: u64,
    rollout_id: String,
    step: u64,
    #[serde(default)]
    released: bool,
    #[serde(default)]
    accepted_at: String,
}

/// `cluster.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ClusterFile {
    cluster_id: String,
    bound_at: String,
    by: String,
}

/// A fenced or unfenced call asking to be admitted.
#[derive(Debug)]
pub struct Admission<'a> {
    pub fence: Option<&'a pb::Fence>,
    /// An unfenced step while a rollout holds the node: do it anyway.
    pub force: bool,
    /// The caller may send fences (a coordinator, or anyone under `--insecure`).
    pub may_fence: bool,
    /// How the caller is named in cluster.json when this call binds the node.
    pub caller: &'a str,
    /// The step, for a deadline refusal.
    pub what: &'a str,
    /// The agent's clock, ms since the epoch.
    pub now_ms: u64,
}

/// What NodeInfo reports, readable without the step lock.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    pub cluster_id: String,
    pub last_fence: Option<pb::Fence>,
    pub held_by: String,
}

/// The persisted binding and fence. All writes are atomic; callers serialize calls (the step
/// lock), so each method sees the files as it left them.
pub struct FenceStore {
    node: String,
    fence_path: PathBuf,
    cluster_path: PathBuf,
    cluster: Option<ClusterFile>,
    /// The stored fence, whatever its cluster (`None` also when its rollout id is unreadable).
    stored: Option<Accepted>,
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    match fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|source| Error::StateFile {
                path: path.to_path_buf(),
                source,
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("read", path)(e)),
    }
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<()> {
    let bytes = serde_json::to_vec(v).map_err(|source| Error::Encode {
        path: path.to_path_buf(),
        source,
    })?;
    orch_package::fsutil::write_atomic(path, &bytes)?;
    Ok(())
}

impl FenceStore {
    /// Loads `DIR/cluster.json` and `DIR/fence.json`; missing files mean "not bound" and "no
    /// fence yet".
    pub fn open(dir: &Path, node: &str) -> Result<FenceStore> {
        fs::create_dir_all(dir).map_err(Error::io("create", dir))?;
        let fence_path = dir.join("fence.json");
        let cluster_path = dir.join("cluster.json");
        let cluster = read_json::<ClusterFile>(&cluster_path)?.filter(|c| !c.cluster_id.is_empty());
        let stored = read_json::<FenceFile>(&fence_path)?.and_then(|f| {
            // An id this version cannot read (written before ids were checked) is no fence of
            // any cluster: the next coordinator's fence replaces it.
            let rollout = f.rollout_id.parse::<RolloutId>().ok()?;
            Some(Accepted {
                fence: Fence {
                    cluster_id: f.cluster_id,
                    term: f.term,
                    rollout,
                    step: f.step,
                    deadline_unix_ms: 0,
                },
                released: f.released,
                accepted_at: f.accepted_at,
            })
        });
        Ok(FenceStore {
            node: node.to_string(),
            fence_path,
            cluster_path,
            cluster,
            stored,
        })
    }

    /// The cluster this node is bound to.
    pub fn cluster_id(&self) -> Option<&str> {
        self.cluster.as_ref().map(|c| c.cluster_id.as_str())
    }

    /// The stored fence if it is of `cluster`.
    fn stored_of(&self, cluster: &str) -> Option<&Accepted> {
        self.stored
            .as_ref()
            .filter(|a| !a.fence.cluster_id.is_empty() && a.fence.cluster_id == cluster)
    }

    /// The highest fence of the bound cluster.
    pub fn current(&self) -> Option<&Accepted> {
        self.stored_of(self.cluster_id()?)
    }

    /// The fence whose rollout holds the node, if one does.
    pub fn held_by(&self) -> Option<&Accepted> {
        self.current().filter(|a| !a.released)
    }

    pub fn view(&self) -> View {
        View {
            cluster_id: self.cluster_id().unwrap_or_default().to_string(),
            last_fence: self.current().map(|a| a.fence.to_wire()),
            held_by: self
                .held_by()
                .map(|a| a.fence.rollout.to_string())
                .unwrap_or_default(),
        }
    }

    fn stale(&self, got: &Fence, have: &Fence) -> Error {
        Error::StaleFence {
            node: self.node.clone(),
            got_term: got.term,
            got_rollout: got.rollout.to_string(),
            got_step: got.step,
            term: have.term,
            rollout: have.rollout.to_string(),
            step: have.step,
        }
    }

    fn other_cluster(&self, bound: &str, got: &str) -> Error {
        Error::OtherCluster {
            node: self.node.clone(),
            bound: bound.to_string(),
            got: got.to_string(),
        }
    }

    /// Admits a call or refuses it; an admitted fence is durably recorded (binding the node
    /// first if it is not bound) before this returns. A refusal changes nothing.
    pub fn admit(&mut self, a: &Admission<'_>) -> Result<()> {
        let Some(wire) = a.fence else {
            if let Some(h) = self.held_by()
                && !a.force
            {
                return Err(Error::Held {
                    node: self.node.clone(),
                    rollout: h.fence.rollout.to_string(),
                    cluster: h.fence.cluster_id.clone(),
                    step: h.fence.step,
                    at: h.accepted_at.clone(),
                });
            }
            return Ok(());
        };
        if !a.may_fence {
            return Err(Error::Forbidden {
                caller: a.caller.to_string(),
            });
        }
        let f = Fence::from_wire(wire)?;
        if let Some(bound) = self.cluster_id()
            && bound != f.cluster_id
        {
            return Err(self.other_cluster(bound, &f.cluster_id));
        }
        // Compared as if bound to the fence's cluster (which it is, or is about to be): after
        // an unbind, the same cluster's deposed coordinator is still fenced.
        let newer = match self.stored_of(&f.cluster_id) {
            Some(have) => match f.cmp_key(&have.fence) {
                Ordering::Less => return Err(self.stale(&f, &have.fence)),
                Ordering::Equal => false,
                Ordering::Greater => true,
            },
            None => true,
        };
        if f.deadline_unix_ms != 0 && a.now_ms > f.deadline_unix_ms {
            return Err(Error::Deadline {
                node: self.node.clone(),
                what: a.what.to_string(),
                deadline: rfc3339_ms(f.deadline_unix_ms),
                now: rfc3339_ms(a.now_ms),
            });
        }
        if self.cluster.is_none() {
            self.bind(&f.cluster_id, a.caller, a.now_ms)?;
        }
        if newer {
            self.store(Accepted {
                fence: Fence {
                    deadline_unix_ms: 0,
                    ..f
                },
                released: false,
                accepted_at: rfc3339_secs(a.now_ms),
            })?;
        }
        Ok(())
    }

    /// A `Release`: the node is no longer held if `wire` is of the bound cluster, of the rollout
    /// that holds it, and not older than its fence. `Ok(false)` when it did not hold the node
    /// (already released, another rollout, an older fence, not bound).
    pub fn release(&mut self, wire: &pb::Fence, now_ms: u64) -> Result<bool> {
        let f = Fence::from_wire(wire)?;
        let Some(bound) = self.cluster_id() else {
            return Ok(false);
        };
        if bound != f.cluster_id {
            return Err(self.other_cluster(bound, &f.cluster_id));
        }
        let Some(held) = self.held_by() else {
            return Ok(false);
        };
        if held.fence.rollout != f.rollout || f.cmp_key(&held.fence) == Ordering::Less {
            return Ok(false);
        }
        // A newer fence of the same rollout is also the new highest one.
        let accepted_at = if f.cmp_key(&held.fence) == Ordering::Greater {
            rfc3339_secs(now_ms)
        } else {
            held.accepted_at.clone()
        };
        self.store(Accepted {
            fence: Fence {
                deadline_unix_ms: 0,
                ..f
            },
            released: true,
            accepted_at,
        })?;
        Ok(true)
    }

    /// Binds the node to `cluster_id`, or unbinds it (`""`). Returns (previous, new). The
    /// stored fence stays: it counts again only if the node is bound to its cluster again.
    pub fn rebind(&mut self, cluster_id: &str, by: &str, now_ms: u64) -> Result<(String, String)> {
        if !cluster_id.is_empty() {
            validate_cluster_id(cluster_id).map_err(|e| Error::InvalidFence(e.to_string()))?;
        }
        let previous = self.cluster_id().unwrap_or_default().to_string();
        if previous != cluster_id {
            self.bind(cluster_id, by, now_ms)?;
        }
        Ok((previous, cluster_id.to_string()))
    }

    fn bind(&mut self, cluster_id: &str, by: &str, now_ms: u64) -> Result<()> {
        let file = ClusterFile {
            cluster_id: cluster_id.to_string(),
            bound_at: rfc3339_secs(now_ms),
            by: by.to_string(),
        };
        write_json(&self.cluster_path, &file)?;
        self.cluster = (!cluster_id.is_empty()).then_some(file);
        Ok(())
    }

    fn store(&mut self, a: Accepted) -> Result<()> {
        write_json(
            &self.fence_path,
            &FenceFile {
                cluster_id: a.fence.cluster_id.clone(),
                term: a.fence.term,
                rollout_id: a.fence.rollout.to_string(),
                step: a.fence.step,
                released: a.released,
                accepted_at: a.accepted_at.clone(),
            },
        )?;
        self.stored = Some(a);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: &str = "cluster-a";
    const NOW: u64 = 1_800_000_000_000;

    fn f(term: u64, r: &str, step: u64) -> pb::Fence {
        fc(C, term, r, step)
    }

    fn fc(cluster: &str, term: u64, r: &str, step: u64) -> pb::Fence {
        pb::Fence {
            term,
            rollout_id: r.into(),
            step,
            cluster_id: cluster.into(),
            deadline_unix_ms: 0,
        }
    }

    fn admit(s: &mut FenceStore, fence: Option<&pb::Fence>) -> Result<()> {
        s.admit(&Admission {
            fence,
            force: false,
            may_fence: true,
            caller: "coordinator/1",
            what: "install 4.2.1",
            now_ms: NOW,
        })
    }

    fn unfenced(s: &mut FenceStore, force: bool) -> Result<()> {
        s.admit(&Admission {
            fence: None,
            force,
            may_fence: false,
            caller: "operator/alice",
            what: "install 4.2.1",
            now_ms: NOW,
        })
    }

    #[test]
    fn orders_and_persists_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FenceStore::open(dir.path(), "n1").unwrap();
        unfenced(&mut s, false).unwrap();
        admit(&mut s, Some(&f(2, "r1", 5))).unwrap();
        admit(&mut s, Some(&f(2, "r1", 5))).unwrap();
        admit(&mut s, Some(&f(2, "r1", 6))).unwrap();
        let err = admit(&mut s, Some(&f(2, "r1", 4))).unwrap_err();
        assert!(matches!(err, Error::StaleFence { .. }));
        assert!(err.to_string().contains("step 6"), "{err}");
        assert!(admit(&mut s, Some(&f(1, "r9", 99))).is_err());
        drop(s);
        let mut s = FenceStore::open(dir.path(), "n1").unwrap();
        assert_eq!(s.current().unwrap().fence.to_wire(), f(2, "r000001", 6));
        assert!(admit(&mut s, Some(&f(2, "r1", 5))).is_err());
        admit(&mut s, Some(&f(3, "r0", 0))).unwrap();
        assert_eq!(s.cluster_id(), Some(C));
    }

    /// String order would put r1000000 before r999999.
    #[test]
    fn rollout_ids_order_by_number() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FenceStore::open(dir.path(), "n1").unwrap();
        admit(&mut s, Some(&f(1, "r999999", 3))).unwrap();
        admit(&mut s, Some(&f(1, "r1000000", 0))).unwrap();
        let e = admit(&mut s, Some(&f(1, "r999999", 9))).unwrap_err();
        assert_eq!(e.kind(), "stale-fence");
    }

    #[test]
    fn malformed_fences_are_bad_requests_and_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FenceStore::open(dir.path(), "n1").unwrap();
        for bad in [
            fc("", 1, "r1", 1),
            fc("a b", 1, "r1", 1),
            fc(&"x".repeat(129), 1, "r1", 1),
            fc("a\nb", 1, "r1", 1),
            f(1, "", 1),
            f(1, "r1\n0 unfenced", 1),
            f(1, &"é".repeat(10_000), 1),
            f(1, "r99999999999999999999999", 1),
        ] {
            let e = admit(&mut s, Some(&bad)).unwrap_err();
            assert_eq!(e.kind(), "bad-request", "{bad:?}: {e}");
            assert!(e.to_string().len() < 300, "{e}");
        }
        assert_eq!(s.cluster_id(), None);
        assert!(!dir.path().join("cluster.json").exists());
        assert!(!dir.path().join("fence.json").exists());
    }

    #[test]
    fn binds_to_the_first_cluster_and_refuses_others() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FenceStore::open(dir.path(), "n1").unwrap();
        admit(&mut s, Some(&f(5, "r3", 1))).unwrap();
        let e = admit(&mut s, Some(&fc("cluster-b", 9, "r9", 9))).unwrap_err();
        assert_eq!(e.kind(), "other-cluster");
        let msg = e.to_string();
        assert!(
            msg.contains("cluster-a") && msg.contains("cluster-b"),
            "{msg}"
        );
        assert!(msg.contains("orchestrator node rebind"), "{msg}");
        drop(s);
        let cluster: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.path().join("cluster.json")).unwrap()).unwrap();
        assert_eq!(cluster["cluster_id"], C);
        assert_eq!(cluster["by"], "coordinator/1");
        assert!(cluster["bound_at"].as_str().unwrap().ends_with('Z'));
        // Rebound to cluster-b: its term 1 is accepted, the old fence no longer counts.
        let mut s = FenceStore::open(dir.path(), "n1").unwrap();
        assert_eq!(
            s.rebind("cluster-b", "operator/alice", NOW).unwrap(),
            (C.to_string(), "cluster-b".to_string())
        );
        assert_eq!(s.held_by(), None);
        admit(&mut s, Some(&fc("cluster-b", 1, "r1", 1))).unwrap();
        assert_eq!(
            admit(&mut s, Some(&f(9, "r9", 9))).unwrap_err().kind(),
            "other-cluster"
        );
        // Unbound: the next cluster binds it; the stored fence of that cluster counts again.
        assert_eq!(
            s.rebind("", "operator/alice", NOW).unwrap(),
            ("cluster-b".to_string(), String::new())
        );
        assert_eq!(s.cluster_id(), None);
        assert_eq!(
            admit(&mut s, Some(&fc("cluster-b", 1, "r1", 0)))
                .unwrap_err()
                .kind(),
            "stale-fence"
        );
        admit(&mut s, Some(&f(1, "r1", 0))).unwrap();
        assert_eq!(s.cluster_id(), Some(C));
        assert!(s.rebind("a b", "operator/alice", NOW).is_err());
    }

    #[test]
    fn deadline_forbidden_and_held() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FenceStore::open(dir.path(), "n1").unwrap();
        let mut late = f(1, "r7", 1);
        late.deadline_unix_ms = NOW - 1;
        let e = admit(&mut s, Some(&late)).unwrap_err();
        assert_eq!(e.kind(), "deadline");
        assert!(e.to_string().contains("install 4.2.1"), "{e}");
        assert_eq!(s.cluster_id(), None, "a refused call binds nothing");
        late.deadline_unix_ms = NOW;
        admit(&mut s, Some(&late)).unwrap();
        let e = s
            .admit(&Admission {
                fence: Some(&f(1, "r7", 2)),
                force: true,
                may_fence: false,
                caller: "operator/alice",
                what: "install 4.2.1",
                now_ms: NOW,
            })
            .unwrap_err();
        assert_eq!(e.kind(), "forbidden");
        assert!(e.to_string().contains("operator/alice"), "{e}");
        // Held by r000007 until released.
        let e = unfenced(&mut s, false).unwrap_err();
        assert_eq!(e.kind(), "held");
        assert!(
            e.to_string()
                .contains("rollout r000007 of cluster cluster-a"),
            "{e}"
        );
        unfenced(&mut s, true).unwrap();
        assert!(!s.release(&f(1, "r6", 5), NOW).unwrap(), "another rollout");
        assert!(!s.release(&f(1, "r7", 0), NOW).unwrap(), "an older fence");
        assert_eq!(
            s.release(&fc("b", 1, "r7", 1), NOW).unwrap_err().kind(),
            "other-cluster"
        );
        assert!(s.release(&f(1, "r7", 1), NOW).unwrap());
        assert!(!s.release(&f(1, "r7", 1), NOW).unwrap(), "already released");
        unfenced(&mut s, false).unwrap();
        drop(s);
        let mut s = FenceStore::open(dir.path(), "n1").unwrap();
        assert_eq!(s.held_by(), None, "released survives a restart");
        admit(&mut s, Some(&f(1, "r8", 0))).unwrap();
        assert_eq!(s.view().held_by, "r000008");
    }

    #[test]
    fn a_fence_file_of_the_old_format_does_not_count() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("fence.json"),
            r#"{"term":9,"rollout_id":"r5","step":3}"#,
        )
        .unwrap();
        let mut s = FenceStore::open(dir.path(), "n1").unwrap();
        assert_eq!(s.current(), None);
        unfenced(&mut s, false).unwrap();
        admit(&mut s, Some(&f(1, "r1", 1))).unwrap();
        fs::write(
            dir.path().join("fence.json"),
            r#"{"term":9,"rollout_id":"éé","step":3}"#,
        )
        .unwrap();
        assert!(FenceStore::open(dir.path(), "n1").is_ok());
    }
}
