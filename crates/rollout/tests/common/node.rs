//! A node's release store for the tests, run by the node layer's own rules
//! (`orch_release::rules`): what each action the machine plans does to a node's releases, or the
//! refusal an agent would answer. Using the real rules (not a copy) means a plan the node layer
//! would refuse fails the tests.

use orch_release::rules::{self, Op, Plan, Releases};
use orch_rollout::ActionKind;
use orch_types::{ReleaseState, Version, VersionEntry};

/// The package name staged releases come from.
const PACKAGE: &str = "emqx";

/// What a node runs, boots and has current: `(running, permanent, current)`.
pub type Shape = (Option<Version>, Option<Version>, Option<Version>);

/// The node layer refused an operation (its rules' reason); nothing changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Node {
    pub table: Releases,
}

impl Node {
    /// A node whose store holds exactly `rows` (`(version, state)`).
    pub fn with(rows: &[(&str, &str)]) -> Node {
        let mut table = Releases::default();
        for (ver, st) in rows {
            table.releases.insert(
                ver.parse().expect("a version"),
                rules::Record {
                    state: st.parse().expect("a state"),
                    name: PACKAGE.to_string(),
                },
            );
        }
        table.check_invariants().expect("a reachable table");
        Node { table }
    }

    pub fn running(&self) -> Option<Version> {
        self.table.running()
    }

    pub fn permanent(&self) -> Option<Version> {
        self.table.permanent()
    }

    pub fn current(&self) -> Option<Version> {
        self.table.current()
    }

    pub fn state(&self, v: Version) -> Option<ReleaseState> {
        self.table.state(&v)
    }

    pub fn shape(&self) -> Shape {
        (self.running(), self.permanent(), self.current())
    }

    /// The release list a preflight answer carries.
    pub fn entries(&self) -> Vec<VersionEntry> {
        self.table.entries()
    }

    /// Applies a node-layer operation. `Ok(true)`: changed; `Ok(false)`: already held;
    /// `Err`: refused, nothing changed.
    pub fn op(&mut self, op: Op, package: Option<&str>) -> Result<bool, Refused> {
        match rules::plan(&self.table, op, package).map_err(|e| Refused(e.to_string()))? {
            Plan::Already(_) => Ok(false),
            Plan::Apply(change) => {
                self.table = change.next;
                self.table
                    .check_invariants()
                    .expect("the rules keep the invariants");
                Ok(true)
            }
        }
    }

    /// The node-layer operation the agent performs for `kind`; `None` for the actions that
    /// change nothing (preflight, health gate). An install never brings its own package: the
    /// machine only installs what is already on the node's disk.
    pub fn op_for(kind: &ActionKind) -> Option<(Op, Option<&'static str>)> {
        match kind {
            // A prune is several uninstalls the driver picks: see [`Node::prune`].
            ActionKind::Preflight | ActionKind::HealthGate { .. } | ActionKind::Prune { .. } => {
                None
            }
            ActionKind::Stage { version } => Some((Op::Unpack(*version), Some(PACKAGE))),
            ActionKind::Install { version } => Some((
                Op::Install {
                    version: *version,
                    permanent: false,
                },
                None,
            )),
            ActionKind::Commit { version } => Some((Op::Permanent(*version), None)),
            ActionKind::Downgrade { to } => Some((Op::Downgrade(*to), None)),
        }
    }

    /// Performs `kind` as the agent would (see [`Node::op`]).
    pub fn perform(&mut self, kind: &ActionKind) -> Result<bool, Refused> {
        match Node::op_for(kind) {
            Some((op, package)) => self.op(op, package),
            None => Ok(false),
        }
    }

    /// A prune as the driver performs it: the releases `prune_candidates` picks, each
    /// uninstalled by the node layer's rules (which refuse the current and permanent ones).
    /// Returns what went, or the first refusal.
    pub fn prune(&mut self, keep: u32, protect: &[Version]) -> Result<Vec<Version>, Refused> {
        let gone = orch_rollout::prune_candidates(&self.entries(), keep as usize, protect);
        for v in &gone {
            self.op(Op::Uninstall(*v), None)?;
        }
        Ok(gone)
    }

    /// What performing `kind` would do, leaving the node as it is.
    pub fn try_perform(&self, kind: &ActionKind) -> Result<bool, Refused> {
        self.clone().perform(kind)
    }
}
