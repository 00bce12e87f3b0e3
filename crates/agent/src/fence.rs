//! Fencing: the agent persists the highest `(term, rollout id, step)` it has accepted and
//! refuses older ones, so a deposed coordinator cannot act on this node after its successor.
//! Equal fences are accepted: a retried step carries the same fence and must stay idempotent.

use std::cmp::Ordering;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Fence {
    pub term: u64,
    pub rollout_id: String,
    pub step: u64,
}

impl Fence {
    fn key(&self) -> (u64, &str, u64) {
        (self.term, self.rollout_id.as_str(), self.step)
    }
}

impl PartialOrd for Fence {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Fence {
    fn cmp(&self, other: &Self) -> Ordering {
        self.key().cmp(&other.key())
    }
}

/// A rollout id as a refusal shows it: bounded, because it came off the wire and the refusal
/// travels back in a response header (a 20 KB id made the answer unreadable: HTTP/2 error).
fn shown(id: &str) -> String {
    const MAX: usize = 64;
    if id.chars().count() <= MAX {
        id.to_string()
    } else {
        format!("{}...", id.chars().take(MAX).collect::<String>())
    }
}

/// The persisted highest fence, plus the audit log of calls (fenced or not).
pub struct FenceStore {
    node: String,
    path: PathBuf,
    audit: PathBuf,
    highest: Option<Fence>,
}

impl FenceStore {
    /// Loads `DIR/fence.json`; a missing file means no fence was seen yet.
    pub fn open(dir: &Path, node: &str) -> Result<FenceStore> {
        fs::create_dir_all(dir)
            .map_err(|e| Error::Internal(format!("create {}: {e}", dir.display())))?;
        let path = dir.join("fence.json");
        let highest = match fs::read(&path) {
            Ok(b) => Some(serde_json::from_slice(&b).map_err(|e| {
                Error::Internal(format!(
                    "{} is unreadable ({e}); restore it or remove it only if no coordinator is running",
                    path.display()
                ))
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::Internal(format!("read {}: {e}", path.display()))),
        };
        Ok(FenceStore {
            node: node.to_string(),
            path,
            audit: dir.join("audit.log"),
            highest,
        })
    }

    pub fn highest(&self) -> Option<&Fence> {
        self.highest.as_ref()
    }

    /// Accepts (and durably records) `fence` unless it is older than the highest seen. Calls
    /// without a fence are allowed and recorded in the audit log.
    pub fn admit(&mut self, fence: Option<&Fence>, what: &str) -> Result<()> {
        match fence {
            None => self.audit(&format!("unfenced {what}")),
            Some(f) => {
                if let Some(h) = &self.highest {
                    if f < h {
                        return Err(Error::StaleFence {
                            node: self.node.clone(),
                            got_term: f.term,
                            got_rollout: shown(&f.rollout_id),
                            got_step: f.step,
                            term: h.term,
                            rollout: shown(&h.rollout_id),
                            step: h.step,
                        });
                    }
                    if f == h {
                        return Ok(());
                    }
                }
                let bytes = serde_json::to_vec(f)
                    .map_err(|e| Error::Internal(format!("encode fence: {e}")))?;
                orch_release::fsutil::write_atomic(&self.path, &bytes)?;
                self.highest = Some(f.clone());
                // The rollout id comes off the wire: escaped, so a newline in it cannot forge
                // an audit line.
                self.audit(&format!(
                    "fence term={} rollout={} step={} {what}",
                    f.term,
                    f.rollout_id.escape_debug(),
                    f.step
                ))
            }
        }
    }

    fn audit(&self, line: &str) -> Result<()> {
        tracing::info!(node = %self.node, "{line}");
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        // The audit trail is best effort: losing a line must not fail a step.
        if let Ok(mut f) = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.audit)
        {
            let _ = writeln!(f, "{secs} {line}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(term: u64, r: &str, step: u64) -> Fence {
        Fence {
            term,
            rollout_id: r.into(),
            step,
        }
    }

    #[test]
    fn orders_and_persists_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FenceStore::open(dir.path(), "n1").unwrap();
        s.admit(None, "install 4.2.1").unwrap();
        s.admit(Some(&f(2, "r1", 5)), "install").unwrap();
        s.admit(Some(&f(2, "r1", 5)), "install again").unwrap();
        s.admit(Some(&f(2, "r1", 6)), "permanent").unwrap();
        let err = s.admit(Some(&f(2, "r1", 4)), "late").unwrap_err();
        assert!(matches!(err, Error::StaleFence { .. }));
        assert!(err.to_string().contains("step 6"));
        assert!(s.admit(Some(&f(1, "r9", 99)), "old term").is_err());
        drop(s);
        let mut s = FenceStore::open(dir.path(), "n1").unwrap();
        assert_eq!(s.highest(), Some(&f(2, "r1", 6)));
        assert!(s.admit(Some(&f(2, "r1", 5)), "after restart").is_err());
        s.admit(Some(&f(3, "r0", 0)), "new term").unwrap();
        let audit = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
        assert!(audit.contains("unfenced install 4.2.1"));
    }

    #[test]
    fn a_rollout_id_cannot_forge_audit_lines() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FenceStore::open(dir.path(), "n1").unwrap();
        s.admit(
            Some(&f(1, "r1\n0 unfenced install 6.6.6", 1)),
            "unpack 1.2.3",
        )
        .unwrap();
        let audit = std::fs::read_to_string(dir.path().join("audit.log")).unwrap();
        assert_eq!(audit.lines().count(), 1, "{audit:?}");
        assert!(audit.contains("rollout=r1\\n0 unfenced"), "{audit:?}");
    }
}
