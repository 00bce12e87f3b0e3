//! How the agent performs a node's steps: the native release store, or an existing tool (the
//! EMQX 4.x `emqx` script). Synchronous: the service calls drivers through `spawn_blocking`.

use orch_release::{PackageSource, Store};
use orch_types::{ReleaseState, Version, VersionEntry};

use crate::error::Result;

/// What a step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepOutcome {
    /// False when the result already held.
    pub changed: bool,
    /// For stdout: EMQX's words.
    pub messages: Vec<String>,
    /// For stderr: anything else (a state-only switch).
    pub notes: Vec<String>,
    /// How long the activation ran, when the step ran one (a hook, or the EMQX script that
    /// switched), for the agent's metrics.
    pub activation: Option<std::time::Duration>,
    /// The hooks the step ran, in order (`pre-switch`, `activate`, `post-switch`): the audit
    /// line names them.
    pub hooks: Vec<&'static str>,
}

/// The node-layer steps. Every step is idempotent: repeating one whose result holds succeeds
/// with `changed == false`. Packages are looked up in `ROOT/releases/`; `sha256` is the digest
/// the operator requires of that package (`--sha256`), checked before anything changes.
pub trait Driver: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn versions(&self) -> Result<Vec<VersionEntry>>;
    fn unpack(&self, v: Version, sha256: Option<&str>) -> Result<StepOutcome>;
    fn install(&self, v: Version, permanent: bool, sha256: Option<&str>) -> Result<StepOutcome>;
    fn permanent(&self, v: Version) -> Result<StepOutcome>;
    fn downgrade(&self, v: Version) -> Result<StepOutcome>;
    fn uninstall(&self, v: Version) -> Result<StepOutcome>;
    /// The service reported running `reported`; a driver that keeps its own state repairs it
    /// (a restarted node runs its permanent release). Returns a note when something changed.
    fn reconcile_running(&self, reported: Version) -> Result<Option<String>>;

    /// The node passed its health gate on `v`: put it back in service if a switch drained it
    /// (the post-step hook). Drivers without drain hooks have nothing to do.
    fn after_gate(&self, v: Version) -> Result<StepOutcome> {
        Ok(StepOutcome {
            changed: false,
            messages: vec![],
            notes: vec![format!(
                "the {} driver runs no drain hooks: nothing to do after the gate on {v}",
                self.name()
            )],
            activation: None,
            hooks: vec![],
        })
    }

    /// True when the driver itself checks package signatures and the `sha256` it is given on
    /// unpack (the native store does, bound to the bytes it extracts); otherwise the agent
    /// checks both before calling it.
    fn checks_signatures(&self) -> bool {
        false
    }

    /// The release the driver says runs: the current one, else the permanent one.
    fn running(&self) -> Result<Option<Version>> {
        let v = self.versions()?;
        let find = |st| v.iter().find(|e| e.state == st).map(|e| e.version);
        Ok(find(ReleaseState::Current).or_else(|| find(ReleaseState::Permanent)))
    }
}

/// The built-in release store (`crates/release`).
pub struct NativeDriver {
    store: Store,
}

impl NativeDriver {
    pub fn new(store: Store) -> Self {
        NativeDriver { store }
    }

    /// The same choice as the local `node` commands: an explicit digest needs the file itself
    /// (the store then checks the very bytes it extracts).
    fn source(&self, v: Version, sha256: Option<&str>) -> Result<PackageSource> {
        Ok(match sha256 {
            Some(d) => PackageSource::File {
                path: self.store.find_package(v)?,
                sha256: Some(d.to_string()),
            },
            None => PackageSource::Lookup(v),
        })
    }
}

fn outcome(o: orch_release::Outcome) -> StepOutcome {
    StepOutcome {
        changed: o.changed,
        activation: o.hook_duration,
        messages: o.messages,
        notes: o.notes,
        hooks: o.hooks,
    }
}

impl Driver for NativeDriver {
    fn name(&self) -> &'static str {
        "native"
    }

    fn versions(&self) -> Result<Vec<VersionEntry>> {
        Ok(self.store.versions()?)
    }

    fn unpack(&self, v: Version, sha256: Option<&str>) -> Result<StepOutcome> {
        Ok(outcome(self.store.unpack(&self.source(v, sha256)?)?))
    }

    fn install(&self, v: Version, permanent: bool, sha256: Option<&str>) -> Result<StepOutcome> {
        Ok(outcome(
            self.store.install(&self.source(v, sha256)?, permanent)?,
        ))
    }

    fn permanent(&self, v: Version) -> Result<StepOutcome> {
        Ok(outcome(self.store.make_permanent(v)?))
    }

    fn downgrade(&self, v: Version) -> Result<StepOutcome> {
        Ok(outcome(self.store.downgrade(v)?))
    }

    fn uninstall(&self, v: Version) -> Result<StepOutcome> {
        Ok(outcome(self.store.uninstall(v)?))
    }

    fn checks_signatures(&self) -> bool {
        true
    }

    fn after_gate(&self, v: Version) -> Result<StepOutcome> {
        Ok(outcome(self.store.after_gate(v)?))
    }

    fn reconcile_running(&self, reported: Version) -> Result<Option<String>> {
        let o = self.store.reconcile_running(reported)?;
        Ok(o.changed.then(|| o.messages.join(" ")))
    }
}
