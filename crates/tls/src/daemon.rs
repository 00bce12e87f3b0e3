//! The start every daemon shares (the agent and the coordinator): its certificate must be its
//! own, plain text is refused on an address other machines reach, `--insecure` is announced,
//! and the gRPC server comes with this party's TLS, limits and reflection. The caller adds its
//! services and serves on [`crate::incoming`] until its own shutdown.

use std::net::SocketAddr;

use tonic::transport::server::Router;

use crate::{Error, Result, Role, Security, ServerLimits};

/// Who a daemon is and how it serves, for [`Security::daemon_server`].
#[derive(Debug, Clone, Copy)]
pub struct Daemon<'a> {
    pub role: Role,
    /// Its name in its certificate (the node id, the coordinator's id).
    pub name: &'a str,
    /// The address actually bound (the configured one when the listener cannot say).
    pub listen: SocketAddr,
    /// `--insecure-allow-remote`: plain text on a non-loopback address was asked for.
    pub allow_remote: bool,
    pub limits: &'a ServerLimits,
    /// The encoded file descriptor set served by gRPC reflection.
    pub descriptors: &'static [u8],
    /// The gRPC services this daemon serves (full names): reflection lists only these.
    pub services: &'a [&'a str],
    /// What anyone who reaches a plain-text daemon can do, for the `--insecure` warning
    /// ("act on this node", "run rollouts").
    pub insecure_risk: &'a str,
}

impl Security {
    /// Checks that this daemon may serve as `d` says, and returns its server with reflection
    /// registered: a wrong certificate or plain text on a reachable address is refused before
    /// anything else starts.
    pub fn daemon_server(&self, d: &Daemon<'_>) -> Result<Router> {
        self.expect_identity(d.role, d.name)?;
        self.check_listen(d.listen, d.allow_remote)?;
        if self.is_insecure() {
            tracing::warn!(
                "{} serving plain-text gRPC (--insecure): anyone who can reach it can {}",
                d.role,
                d.insecure_risk
            );
        }
        let router = self.server(d.limits)?.add_routes(Default::default());
        with_reflection(router, d.descriptors, d.services)
    }
}

/// The reflection services' own names, listed beside the daemon's.
pub const REFLECTION_SERVICES: [&str; 2] = [
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Adds gRPC server reflection in both versions, v1 (current grpcurl) and v1alpha (older
/// clients), listing only `services` (and reflection itself): the descriptor set holds every
/// service of the project, most of which this process does not serve.
pub fn with_reflection(
    router: Router,
    descriptors: &'static [u8],
    services: &[&str],
) -> Result<Router> {
    let builder = || {
        services.iter().chain(REFLECTION_SERVICES.iter()).fold(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(descriptors),
            |b, name| b.with_service_name(*name),
        )
    };
    let v1 = builder().build_v1().map_err(Error::Reflection)?;
    let v1alpha = builder().build_v1alpha().map_err(Error::Reflection)?;
    Ok(router.add_service(v1).add_service(v1alpha))
}
