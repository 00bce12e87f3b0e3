//! Preflight: planning each node from its answer (skipped, refused, or one of the [`Route`]s).

use super::*;

/// `4.2.1 current, 4.2.0 permanent, 4.1.9 old`, newest first (as `versions` lists them).
fn describe_releases(releases: &[VersionEntry]) -> String {
    let mut sorted: Vec<&VersionEntry> = releases.iter().collect();
    sorted.sort_by_key(|e| std::cmp::Reverse(e.version));
    sorted
        .iter()
        .map(|e| format!("{} {}", e.version, e.state))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `4.2.0 permanently`, or `4.2.2 (current; 4.2.0 permanent)`.
fn describe_start(start: &Start) -> String {
    match start.current {
        None => format!("{} permanently", start.permanent),
        Some(c) => format!("{c} (current; {} permanent)", start.permanent),
    }
}

/// Why a node's release list does not add up ([`check_releases`]).
#[derive(Debug, thiserror::Error)]
enum BadReleases {
    #[error("{0} is listed twice")]
    Twice(Version),
    #[error("both {0} and {1} are {2}")]
    Both(Version, Version, &'static str),
    #[error("no release is permanent")]
    NoPermanent,
    #[error("it reports {running} running, but its releases say {runs} runs")]
    Disagrees { running: Version, runs: Version },
}

/// Checks that a node's release list is one its store can hold (the invariants of the node
/// layer: at most one `current`, exactly one `permanent`, each version once) and agrees with the
/// version it says runs (the current one, else the permanent one). Planning on a list that does
/// not add up would guess; the caller refuses the node instead.
fn check_releases(running: Version, releases: &[VersionEntry]) -> Result<Start, BadReleases> {
    let mut current = None;
    let mut permanent = None;
    for (k, e) in releases.iter().enumerate() {
        if releases[..k].iter().any(|o| o.version == e.version) {
            return Err(BadReleases::Twice(e.version));
        }
        let slot = match e.state {
            ReleaseState::Current => &mut current,
            ReleaseState::Permanent => &mut permanent,
            ReleaseState::Unpacked | ReleaseState::Old => continue,
        };
        if let Some(other) = slot.replace(e.version) {
            return Err(BadReleases::Both(other, e.version, e.state.as_str()));
        }
    }
    let permanent = permanent.ok_or(BadReleases::NoPermanent)?;
    let runs = current.unwrap_or(permanent);
    if runs != running {
        return Err(BadReleases::Disagrees { running, runs });
    }
    Ok(Start { current, permanent })
}

/// Why a node cannot go from `running` to `target`.
fn hop_refused(running: Version, target: Version) -> String {
    format!(
        "cannot hop from {running} to {target}: only patch-level hot upgrades (same major.minor) are allowed"
    )
}

fn disk_refused(free_disk: u64, need: u64) -> String {
    format!(
        "not enough free disk: {free_disk} bytes free, {need} needed ({DISK_HEADROOM_FACTOR}x the package size)"
    )
}

impl Rollout {
    /// Plans node `i` from its preflight answer: skipped, refused, or one of the [`Route`]s.
    pub(super) fn preflight_answered(
        &mut self,
        i: usize,
        running: Version,
        free_disk: u64,
        releases: &[VersionEntry],
        cx: &mut Ctx<'_>,
    ) {
        let target = self.spec.version;
        let id = self.nodes[i].id().clone();
        self.nodes[i].progress.from_version = Some(running);
        if releases.is_empty() {
            return self.preflight_legacy(i, running, free_disk, cx);
        }
        let start = match check_releases(running, releases) {
            Ok(start) => start,
            Err(why) => {
                return self.preflight_failed(
                    i,
                    format!(
                        "its releases do not add up ({why}: {}); nothing was touched, check `orchestrator node versions --agent {id}`",
                        describe_releases(releases)
                    ),
                    cx,
                );
            }
        };
        let has = describe_start(&start);
        let p = start.permanent;
        if running != target && !running.is_patch_hop(&target) {
            return self.preflight_failed(i, hop_refused(running, target), cx);
        }
        let state = releases
            .iter()
            .find(|e| e.version == target)
            .map(|e| e.state);
        let route = match state {
            Some(ReleaseState::Permanent) if start.current.is_none() => {
                return self.skip(i, start, format!("already runs {target} permanently"), cx);
            }
            Some(ReleaseState::Current) if !self.spec.permanent => {
                return self.skip(
                    i,
                    start,
                    format!(
                        "already runs {target}, not permanently ({p} is permanent), which is where a rollout without making it permanent leaves it"
                    ),
                    cx,
                );
            }
            Some(ReleaseState::Permanent) => Route::SwitchBack,
            Some(ReleaseState::Current) => Route::Adopt,
            Some(ReleaseState::Unpacked | ReleaseState::Old) => Route::Install,
            None => Route::Stage,
        };
        if route == Route::Stage
            && let Some(need) = self.required_free_disk()
            && free_disk < need
        {
            return self.preflight_failed(i, disk_refused(free_disk, need), cx);
        }
        let (step, plan) = self.route_plan(route, state, free_disk);
        let node = &mut self.nodes[i];
        node.start = Some(start);
        node.route = route;
        node.progress.step = step;
        self.record(cx, format!("{id}: preflight ok: runs {has}: {plan}"));
    }

    /// The step a node planned on `route` starts from, and the plan in words. `state`: the
    /// target's state on the node, if it has it.
    fn route_plan(
        &self,
        route: Route,
        state: Option<ReleaseState>,
        free_disk: u64,
    ) -> (NodeStep, String) {
        let target = self.spec.version;
        let commit = if self.spec.permanent {
            ", make permanent"
        } else {
            ""
        };
        match route {
            Route::Stage => (
                NodeStep::PreflightOk,
                format!("{free_disk} bytes free; stage, install, gate{commit} {target}"),
            ),
            Route::Install => (
                NodeStep::Staged,
                format!(
                    "{target} is already on its disk ({}), nothing to stage; install, gate{commit}",
                    state.map_or("unpacked", |s| s.as_str())
                ),
            ),
            Route::Adopt => (
                NodeStep::Installed,
                format!(
                    "it already runs {target}, not permanently; health gate, then make it permanent with the others"
                ),
            ),
            Route::SwitchBack => (
                NodeStep::Staged,
                format!(
                    "{target} is its permanent release; switch back to it with a downgrade (it stays permanent), then health gate"
                ),
            ),
        }
    }

    /// A preflight answer without releases (an older driver): planned from the running version
    /// alone, exactly as before release lists existed, so old logs replay to the same state.
    pub(super) fn preflight_legacy(
        &mut self,
        i: usize,
        running: Version,
        free_disk: u64,
        cx: &mut Ctx<'_>,
    ) {
        let target = self.spec.version;
        let need = self.required_free_disk();
        let node = &mut self.nodes[i];
        let id = node.id().clone();
        if running == target {
            node.progress.step = NodeStep::Skipped;
            self.record(cx, format!("{id}: already runs {target}: skipped"));
        } else if !running.is_patch_hop(&target) {
            self.preflight_failed(i, hop_refused(running, target), cx);
        } else if let Some(need) = need
            && free_disk < need
        {
            self.preflight_failed(i, disk_refused(free_disk, need), cx);
        } else {
            node.progress.step = NodeStep::PreflightOk;
            self.record(
                cx,
                format!("{id}: preflight ok: runs {running}, {free_disk} bytes free"),
            );
        }
    }

    pub(super) fn skip(&mut self, i: usize, start: Start, why: String, cx: &mut Ctx<'_>) {
        let node = &mut self.nodes[i];
        node.start = Some(start);
        node.progress.step = NodeStep::Skipped;
        let id = node.id().clone();
        self.record(cx, format!("{id}: {why}: skipped"));
    }

    pub(super) fn preflight_failed(&mut self, i: usize, msg: String, cx: &mut Ctx<'_>) {
        let node = &mut self.nodes[i];
        node.progress.step = NodeStep::Failed;
        node.progress.error = Some(msg.clone());
        let id = node.id().clone();
        self.record(cx, format!("{id}: {msg}"));
    }
}
