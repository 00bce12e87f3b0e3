//! Starting a rollout: the spec from the operator's request.

use std::collections::BTreeMap;

use orch_proto::control as pb;
use orch_types::rollout::{
    MetricGates, NodeCount, OnFailure, PackageRef, RolloutSpec, SpecError, Wave,
};
use orch_types::{NodeId, Version};
use tonic::Status;

use super::{ControlService, bad, shown};

impl ControlService {
    /// The spec of a rollout requested with `r`: its target, nodes (every registered one when
    /// none are named) and package as the state knows them, and the options given. With
    /// trusted keys, the package's signature is checked here, before any agent is touched.
    pub(super) async fn rollout_spec(
        &self,
        r: &pb::StartRolloutRequest,
        requested_by: String,
    ) -> Result<RolloutSpec, Status> {
        let version: Version = r
            .version
            .parse()
            .map_err(|e: orch_types::ParseError| bad(e.to_string()))?;
        let selector: BTreeMap<String, String> = r.selector.clone().into_iter().collect();
        orch_types::check_labels(selector.iter())
            .map_err(|e| bad(format!("invalid --selector: {e}")))?;
        let wave_by = (!r.wave_by.is_empty()).then(|| r.wave_by.clone());
        let max_unavailable = if r.max_unavailable.is_empty() {
            None
        } else {
            Some(
                r.max_unavailable
                    .parse::<NodeCount>()
                    .map_err(|e| bad(format!("invalid --max-unavailable: {e}")))?,
            )
        };
        let (nodes, waves, package) = self.shared.read(|s| -> Result<_, Status> {
            let explicit = !r.nodes.is_empty();
            let nodes: Vec<NodeId> = if explicit {
                r.nodes
                    .iter()
                    .map(|n| n.parse::<NodeId>().map_err(|e| bad(e.to_string())))
                    .collect::<Result<_, _>>()?
            } else {
                s.nodes.keys().cloned().collect()
            };
            if nodes.is_empty() {
                return Err(Status::failed_precondition(
                    "no nodes are registered: start agents with --coordinator ADDR",
                ));
            }
            // A node that is not registered has no labels: say so rather than that it lacks one.
            if (wave_by.is_some() || !selector.is_empty())
                && let Some(n) = nodes.iter().find(|n| !s.nodes.contains_key(*n))
            {
                return Err(Status::failed_precondition(format!(
                    "node {n} is not registered"
                )));
            }
            let labels = |n: &NodeId| s.nodes.get(n).map(|rec| &rec.labels);
            let nodes =
                select(nodes, explicit, &selector, labels).map_err(Status::failed_precondition)?;
            let (nodes, waves) = match &wave_by {
                Some(label) => {
                    group_waves(&nodes, label, labels).map_err(Status::failed_precondition)?
                }
                None => (nodes, Vec::new()),
            };
            let package = stored_package(s, r, version)?;
            Ok((nodes, waves, package))
        })?;
        // A package stored before keys were configured (or copied without its signature) is
        // refused here too, before any agent is touched.
        if let Some(p) = &package
            && !self.shared.blobs.trusted().is_empty()
        {
            self.shared.ensure_blob(&p.sha256).await?;
            let sig = self.shared.blobs.signature(&p.sha256)?;
            self.shared.blobs.check_signature(
                &format!("{}-{}.zip", p.name, p.version),
                sig.as_deref(),
                &p.sha256,
            )?;
        }
        let mut spec = RolloutSpec::new("r000000", version, nodes, requested_by);
        spec.package = package;
        apply_options(&mut spec, r)?;
        spec.wave_by = wave_by;
        spec.waves = waves;
        spec.batch_percent = (r.batch_percent > 0).then_some(r.batch_percent);
        spec.selector = selector;
        spec.max_unavailable = max_unavailable;
        spec.promote_each_wave = r.promote_each_wave;
        if max_unavailable.is_some() {
            spec.unhealthy_at_start = self.unhealthy_nodes().await;
        }
        Ok(spec)
    }
}

/// The package `r` names, as the state stores it (`None`: the agents hold it already).
fn stored_package(
    s: &crate::state::ClusterState,
    r: &pb::StartRolloutRequest,
    version: Version,
) -> Result<Option<PackageRef>, Status> {
    if r.package_sha256.is_empty() {
        return Ok(None);
    }
    let p = s.packages.get(&r.package_sha256).ok_or_else(|| {
        Status::failed_precondition(format!(
            "package {} is not stored on the coordinators: upload it first",
            shown(&r.package_sha256)
        ))
    })?;
    if p.version != version {
        return Err(bad(format!(
            "the package holds version {}, not {version}",
            p.version
        )));
    }
    Ok(Some(PackageRef {
        name: p.name.clone(),
        version: p.version,
        sha256: p.sha256.clone(),
        size: p.size,
    }))
}

/// The request's plain options (batch, canary, gates, failure policy, pruning, bake) onto
/// `spec`, which holds the defaults for those not given.
fn apply_options(spec: &mut RolloutSpec, r: &pb::StartRolloutRequest) -> Result<(), Status> {
    if r.batch_size > 0 {
        spec.batch_size = r.batch_size;
    }
    spec.canary = r.canary;
    spec.permanent = !r.no_permanent;
    if let Some(t) = r.min_healthy_time_ms {
        spec.min_healthy_time_ms = t;
    }
    if let Some(t) = r.healthy_deadline_ms {
        spec.healthy_deadline_ms = t;
    }
    if let Some(t) = r.preflight_timeout_ms {
        spec.preflight_timeout_ms = t;
    }
    if let Some(n) = r.failure_threshold {
        spec.failure_threshold = n;
    }
    spec.keep_releases = r.keep_releases;
    spec.bake_ms = r.bake_ms.unwrap_or(0);
    spec.wave_pause_ms = r.wave_pause_ms.unwrap_or(0);
    spec.watch_after_commit_ms = r.watch_after_commit_ms.unwrap_or(0);
    spec.metric_gates = metric_gates(r)?;
    if !r.on_failure.is_empty() {
        spec.on_failure = r
            .on_failure
            .parse::<OnFailure>()
            .map_err(|e| bad(e.to_string()))?;
    }
    Ok(())
}

/// The request's metric gates: both the Prometheus URL and at least one query, or neither
/// (the spec's validation checks the URL and the queries themselves).
fn metric_gates(r: &pb::StartRolloutRequest) -> Result<Option<Box<MetricGates>>, Status> {
    match (r.gate_prometheus.is_empty(), r.gates.is_empty()) {
        (true, true) => Ok(None),
        (true, false) => Err(bad(SpecError::GatesWithoutPrometheus.to_string())),
        (false, true) => Err(bad(SpecError::PrometheusWithoutGates.to_string())),
        (false, false) => Ok(Some(Box::new(MetricGates {
            prometheus: r.gate_prometheus.trim_end_matches('/').to_string(),
            queries: r.gates.clone(),
        }))),
    }
}

impl ControlService {
    /// Every registered node whose health probe fails now (all probed at once, each bounded
    /// by the probe's own timeout), in id order: what `--max-unavailable` counts from the start.
    async fn unhealthy_nodes(&self) -> Vec<NodeId> {
        let nodes: Vec<(NodeId, String)> = self.shared.read(|s| {
            s.nodes
                .values()
                .map(|n| (n.id.clone(), n.address.clone()))
                .collect()
        });
        let probes = nodes.iter().map(|(id, addr)| async move {
            let (healthy, _) = self.shared.probe_node(id.as_str(), addr).await;
            (!healthy).then(|| id.clone())
        });
        futures::future::join_all(probes)
            .await
            .into_iter()
            .flatten()
            .collect()
    }
}

fn pairs(m: &BTreeMap<String, String>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The nodes `selector` chooses. Without a node list: every registered node with all of its
/// labels, refused when there is none. With one: the list as it is, refused when a named node
/// does not match (an operator who names nodes and a selector means both; silently dropping a
/// named node would upgrade fewer nodes than asked).
fn select<'a>(
    nodes: Vec<NodeId>,
    explicit: bool,
    selector: &BTreeMap<String, String>,
    labels: impl Fn(&NodeId) -> Option<&'a BTreeMap<String, String>>,
) -> Result<Vec<NodeId>, String> {
    if selector.is_empty() {
        return Ok(nodes);
    }
    let matches =
        |n: &NodeId| labels(n).is_some_and(|l| selector.iter().all(|(k, v)| l.get(k) == Some(v)));
    if explicit {
        let misfits: Vec<&str> = nodes
            .iter()
            .filter(|n| !matches(n))
            .map(|n| n.as_str())
            .collect();
        if !misfits.is_empty() {
            return Err(format!(
                "node(s) {} named in --nodes do not match --selector {}: drop them from --nodes or change the selector",
                misfits.join(", "),
                pairs(selector)
            ));
        }
        return Ok(nodes);
    }
    let chosen: Vec<NodeId> = nodes.into_iter().filter(|n| matches(n)).collect();
    if chosen.is_empty() {
        return Err(format!(
            "no registered node matches --selector {}: check the labels with `orchestrator nodes --json`",
            pairs(selector)
        ));
    }
    Ok(chosen)
}

/// The nodes grouped into waves by the value of `label`, waves in the order of the values,
/// nodes in their given order within a wave; and the nodes in that wave order. Refused when
/// no node has the label, or when some lack it (naming them): a node without it has no wave.
fn group_waves<'a>(
    nodes: &[NodeId],
    label: &str,
    labels: impl Fn(&NodeId) -> Option<&'a BTreeMap<String, String>>,
) -> Result<(Vec<NodeId>, Vec<Wave>), String> {
    let mut waves: BTreeMap<&str, Vec<NodeId>> = BTreeMap::new();
    let mut unlabelled = Vec::new();
    for n in nodes {
        match labels(n).and_then(|l| l.get(label)) {
            Some(v) => waves.entry(v.as_str()).or_default().push(n.clone()),
            None => unlabelled.push(n.as_str()),
        }
    }
    if waves.is_empty() {
        return Err(format!(
            "--wave-by {label}: no node of the rollout has the label {label:?}; start the agents with --label {label}=VALUE, or check the name with `orchestrator nodes --json`"
        ));
    }
    if !unlabelled.is_empty() {
        return Err(format!(
            "--wave-by {label}: node(s) {} have no label {label:?}, so they belong to no wave: label them (--label {label}=VALUE) or leave them out (--nodes, --selector)",
            unlabelled.join(", ")
        ));
    }
    let waves: Vec<Wave> = waves
        .into_iter()
        .map(|(v, nodes)| Wave {
            label_value: v.to_string(),
            nodes,
        })
        .collect();
    let order = waves.iter().flat_map(|w| w.nodes.iter().cloned()).collect();
    Ok((order, waves))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> NodeId {
        s.parse().unwrap()
    }

    fn registry() -> BTreeMap<NodeId, BTreeMap<String, String>> {
        [
            ("n1", "b", "web"),
            ("n2", "a", "web"),
            ("n3", "b", "db"),
            ("n4", "a", "web"),
            ("n5", "c", "web"),
        ]
        .into_iter()
        .map(|(n, zone, role)| {
            (
                id(n),
                BTreeMap::from([
                    ("zone".to_string(), zone.to_string()),
                    ("role".to_string(), role.to_string()),
                ]),
            )
        })
        .collect()
    }

    fn sel(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_selector_keeps_the_nodes_with_all_its_labels() {
        let reg = registry();
        let all: Vec<NodeId> = reg.keys().cloned().collect();
        let chosen = select(
            all.clone(),
            false,
            &sel(&[("role", "web"), ("zone", "a")]),
            |n| reg.get(n),
        )
        .unwrap();
        assert_eq!(chosen, vec![id("n2"), id("n4")]);
        let none = select(all, false, &sel(&[("zone", "x")]), |n| reg.get(n)).unwrap_err();
        assert!(
            none.contains("no registered node matches --selector zone=x"),
            "{none}"
        );
    }

    #[test]
    fn named_nodes_that_miss_the_selector_are_refused_by_name() {
        let reg = registry();
        let ok = select(
            vec![id("n4"), id("n2")],
            true,
            &sel(&[("zone", "a")]),
            |n| reg.get(n),
        )
        .unwrap();
        assert_eq!(ok, vec![id("n4"), id("n2")], "the named order is kept");
        let e = select(
            vec![id("n2"), id("n3"), id("n5")],
            true,
            &sel(&[("zone", "a")]),
            |n| reg.get(n),
        )
        .unwrap_err();
        assert!(
            e.contains("n3, n5 named in --nodes do not match --selector zone=a"),
            "{e}"
        );
    }

    #[test]
    fn waves_follow_the_label_values_and_keep_the_node_order_inside() {
        let reg = registry();
        let nodes = vec![id("n5"), id("n4"), id("n3"), id("n2"), id("n1")];
        let (order, waves) = group_waves(&nodes, "zone", |n| reg.get(n)).unwrap();
        let values: Vec<&str> = waves.iter().map(|w| w.label_value.as_str()).collect();
        assert_eq!(values, ["a", "b", "c"]);
        assert_eq!(waves[0].nodes, vec![id("n4"), id("n2")]);
        assert_eq!(waves[1].nodes, vec![id("n3"), id("n1")]);
        assert_eq!(
            order,
            vec![id("n4"), id("n2"), id("n3"), id("n1"), id("n5")]
        );
    }

    #[test]
    fn an_unknown_or_missing_wave_label_is_refused_by_name() {
        let mut reg = registry();
        let nodes: Vec<NodeId> = reg.keys().cloned().collect();
        let e = group_waves(&nodes, "rack", |n| reg.get(n)).unwrap_err();
        assert!(
            e.contains("no node of the rollout has the label \"rack\""),
            "{e}"
        );
        reg.get_mut(&id("n3")).unwrap().remove("zone");
        let e = group_waves(&nodes, "zone", |n| reg.get(n)).unwrap_err();
        assert!(e.contains("node(s) n3 have no label \"zone\""), "{e}");
    }
}
