//! Starting a rollout: the spec from the operator's request.

use orch_proto::control as pb;
use orch_types::rollout::{OnFailure, PackageRef, RolloutSpec};
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
        let (nodes, package) = self.shared.read(|s| -> Result<_, Status> {
            let nodes: Vec<NodeId> = if r.nodes.is_empty() {
                s.nodes.keys().cloned().collect()
            } else {
                r.nodes
                    .iter()
                    .map(|n| n.parse::<NodeId>().map_err(|e| bad(e.to_string())))
                    .collect::<Result<_, _>>()?
            };
            if nodes.is_empty() {
                return Err(Status::failed_precondition(
                    "no nodes are registered: start agents with --coordinator ADDR",
                ));
            }
            let package = if r.package_sha256.is_empty() {
                None
            } else {
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
                Some(PackageRef {
                    name: p.name.clone(),
                    version: p.version,
                    sha256: p.sha256.clone(),
                    size: p.size,
                })
            };
            Ok((nodes, package))
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
        if !r.on_failure.is_empty() {
            spec.on_failure = r
                .on_failure
                .parse::<OnFailure>()
                .map_err(|e| bad(e.to_string()))?;
        }
        Ok(spec)
    }
}
