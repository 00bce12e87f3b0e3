//! The caller's identity from its certificate, and role checks.
//!
//! Status messages name roles and the caller's own (validated) name only: never file paths,
//! certificate contents or anything the caller sent.

use tonic::service::Interceptor;
use tonic::{Request, Status};
use x509_parser::extensions::GeneralName;

use crate::{Error, Identity, ROLE_URI_PREFIX, Result, Role, validate_name};

/// Reads the role and name from a certificate (DER): its one `orchestrator://role/<role>/<name>`
/// subject alternative name. Certificates with none, several, or a malformed one are refused.
/// The certificate's signature and validity are *not* checked here: rustls did that during the
/// handshake.
pub fn identity_from_cert_der(der: &[u8]) -> Result<Identity> {
    let refuse = Error::Identity;
    let (rest, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|_| refuse("not a valid X.509 certificate"))?;
    if !rest.is_empty() {
        return Err(refuse("trailing data after the certificate"));
    }
    let san = cert
        .subject_alternative_name()
        .map_err(|_| refuse("malformed subject alternative names"))?
        .ok_or_else(|| refuse("no orchestrator role (no subject alternative names)"))?;
    let scheme = "orchestrator:";
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|g| match g {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .filter(|u| {
            u.get(..scheme.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(scheme))
        })
        .collect();
    let uri = match uris.as_slice() {
        [] => return Err(refuse("no orchestrator role")),
        [one] => *one,
        _ => return Err(refuse("several orchestrator roles")),
    };
    let rest = uri
        .strip_prefix(ROLE_URI_PREFIX)
        .ok_or_else(|| refuse("malformed orchestrator role"))?;
    let (role, name) = rest
        .split_once('/')
        .ok_or_else(|| refuse("malformed orchestrator role"))?;
    let role: Role = role
        .parse()
        .map_err(|_| refuse("unknown orchestrator role"))?;
    validate_name(name).map_err(|_| refuse("invalid party name in the orchestrator role"))?;
    Ok(Identity {
        role,
        name: name.to_string(),
    })
}

/// An identity that another transport of this process verified (the HTTPS endpoint's TLS
/// handshake), attached to a request it builds to call a service in-process. Only code in the
/// process can set request extensions: a remote gRPC caller cannot forge one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedCaller(pub Identity);

/// The caller's identity, from the leaf of the client certificate chain that tonic recorded
/// for this connection. `Unauthenticated` when there is none (plain-text connection, or a
/// server not built with [`crate::server_config`]) or it carries no valid role.
///
/// Only works on connections tonic accepted itself (`Server::serve*` over TCP): that is where
/// [`Request::peer_certs`] comes from.
pub fn identity_of<T>(req: &Request<T>) -> Result<Identity, Status> {
    if let Some(VerifiedCaller(id)) = req.extensions().get::<VerifiedCaller>() {
        return Ok(id.clone());
    }
    let certs = req.peer_certs().ok_or_else(|| {
        Status::unauthenticated("no client certificate: this service requires mutual TLS")
    })?;
    let leaf = certs.first().ok_or_else(|| {
        Status::unauthenticated("no client certificate: this service requires mutual TLS")
    })?;
    identity_from_cert_der(leaf).map_err(|e| match e {
        Error::Identity(reason) => {
            Status::unauthenticated(format!("client certificate refused: {reason}"))
        }
        _ => Status::unauthenticated("client certificate refused"),
    })
}

/// The caller's identity if its role is one of `allowed`; otherwise `PermissionDenied` naming
/// the role(s) required and the caller's role (or `Unauthenticated`, see [`identity_of`]).
pub fn require<T>(req: &Request<T>, allowed: &[Role]) -> Result<Identity, Status> {
    let id = identity_of(req)?;
    id.require(allowed)?;
    Ok(id)
}

/// Like [`require`] with one role, and the certificate must also name `name`: for calls where a
/// party acts as itself (an agent registers only the node id its certificate names).
pub fn require_name<T>(req: &Request<T>, role: Role, name: &str) -> Result<Identity, Status> {
    let id = require(req, &[role])?;
    id.require_name(name)?;
    Ok(id)
}

/// The identity an [`authorize`] interceptor stored in the request's extensions.
pub fn authenticated<T>(req: &Request<T>) -> Option<&Identity> {
    req.extensions().get::<Identity>()
}

impl Identity {
    /// `Ok` if this identity's role is one of `allowed`, else `PermissionDenied` naming them.
    pub fn require(&self, allowed: &[Role]) -> Result<(), Status> {
        if allowed.contains(&self.role) {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "permission denied: requires {}; the caller is {self}",
                describe(allowed)
            )))
        }
    }

    /// `Ok` if this identity's name is `name`, else `PermissionDenied`.
    pub fn require_name(&self, name: &str) -> Result<(), Status> {
        if self.name == name {
            return Ok(());
        }
        // Echo the requested name only when it is a well-formed name (it comes from the caller).
        let asked = if validate_name(name).is_ok() {
            format!("{:?}", name)
        } else {
            "a different name".to_string()
        };
        Err(Status::permission_denied(format!(
            "permission denied: the certificate names {self}; it may not act as {asked}"
        )))
    }
}

fn describe(allowed: &[Role]) -> String {
    match allowed {
        [] => "a role this method does not grant to anyone".to_string(),
        [one] => format!("role {one}"),
        [init @ .., last] => format!(
            "role {} or {last}",
            init.iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Whether a server checks identities (`Mtls`, the default) or runs in the explicitly
/// requested plain-text mode (`Insecure`), where nobody is identified and every check passes.
/// Lets services hold one value and call the same methods in both modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthMode {
    #[default]
    Mtls,
    Insecure,
}

impl AuthMode {
    /// [`require`] under mTLS (`Some(identity)`); `Ok(None)` in insecure mode.
    pub fn require<T>(
        self,
        req: &Request<T>,
        allowed: &[Role],
    ) -> Result<Option<Identity>, Status> {
        match self {
            AuthMode::Mtls => require(req, allowed).map(Some),
            AuthMode::Insecure => Ok(None),
        }
    }

    /// [`require_name`] under mTLS (`Some(identity)`); `Ok(None)` in insecure mode.
    pub fn require_name<T>(
        self,
        req: &Request<T>,
        role: Role,
        name: &str,
    ) -> Result<Option<Identity>, Status> {
        match self {
            AuthMode::Mtls => require_name(req, role, name).map(Some),
            AuthMode::Insecure => Ok(None),
        }
    }

    /// An interceptor admitting only `allowed` roles under mTLS; passing everything through in
    /// insecure mode.
    pub fn interceptor(self, allowed: &'static [Role]) -> RoleInterceptor {
        RoleInterceptor {
            allowed,
            mode: self,
        }
    }
}

/// An interceptor that refuses callers whose role is not in `allowed` for every method of the
/// service it wraps, and stores the caller's [`Identity`] in the request extensions (read it
/// with [`authenticated`]). Use it when a whole service has one policy (for example Raft RPCs:
/// coordinators only); call [`require`] in handlers when methods differ.
///
/// Wrap a service with it, e.g. `RaftPeerServer::with_interceptor(svc, authorize(&[Role::Coordinator]))`.
/// A call that did not come over mutual TLS carries no verified certificate and is refused:
///
/// ```
/// use orch_tls::{Role, authorize};
/// use tonic::service::Interceptor;
///
/// let mut only_coordinators = authorize(&[Role::Coordinator]);
/// let refused = only_coordinators.call(tonic::Request::new(())).unwrap_err();
/// assert_eq!(refused.code(), tonic::Code::Unauthenticated);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct RoleInterceptor {
    allowed: &'static [Role],
    mode: AuthMode,
}

/// An mTLS [`RoleInterceptor`] admitting only `allowed` roles.
pub fn authorize(allowed: &'static [Role]) -> RoleInterceptor {
    AuthMode::Mtls.interceptor(allowed)
}

impl Interceptor for RoleInterceptor {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(id) = self.mode.require(&req, self.allowed)? {
            req.extensions_mut().insert(id);
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::string::Ia5String;
    use rcgen::{CertificateParams, KeyPair, SanType};

    fn cert_with_sans(sans: Vec<SanType>) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = sans;
        p.self_signed(&key).unwrap().der().to_vec()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(Ia5String::try_from(s).unwrap())
    }

    fn reason(der: &[u8]) -> &'static str {
        match identity_from_cert_der(der) {
            Err(Error::Identity(reason)) => reason,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn each_role_parses() {
        for role in Role::ALL {
            let der = cert_with_sans(vec![
                SanType::DnsName(Ia5String::try_from("localhost").unwrap()),
                uri("spiffe://example.org/x"),
                uri(&format!("orchestrator://role/{role}/n-1.a_b")),
            ]);
            let id = identity_from_cert_der(&der).unwrap();
            assert_eq!(id.role, role);
            assert_eq!(id.name, "n-1.a_b");
        }
    }

    #[test]
    fn zero_or_several_roles_are_refused() {
        assert_eq!(
            reason(&cert_with_sans(vec![])),
            "no orchestrator role (no subject alternative names)"
        );
        assert_eq!(
            reason(&cert_with_sans(vec![uri("https://example.org/")])),
            "no orchestrator role"
        );
        assert_eq!(
            reason(&cert_with_sans(vec![
                uri("orchestrator://role/agent/n1"),
                uri("orchestrator://role/agent/n2"),
            ])),
            "several orchestrator roles"
        );
        // The same role twice is still ambiguous, and case games do not hide a second one.
        assert_eq!(
            reason(&cert_with_sans(vec![
                uri("orchestrator://role/agent/n1"),
                uri("ORCHESTRATOR://role/operator/root"),
            ])),
            "several orchestrator roles"
        );
    }

    #[test]
    fn malformed_roles_are_refused() {
        for (u, why) in [
            ("orchestrator://role/admin/x", "unknown orchestrator role"),
            ("orchestrator://role/Agent/n1", "unknown orchestrator role"),
            ("orchestrator://role/agent", "malformed orchestrator role"),
            (
                "orchestrator://role/agent/",
                "invalid party name in the orchestrator role",
            ),
            (
                "orchestrator://role/agent/n1/x",
                "invalid party name in the orchestrator role",
            ),
            (
                "orchestrator://role/agent/../x",
                "invalid party name in the orchestrator role",
            ),
            (
                "orchestrator://other/agent/n1",
                "malformed orchestrator role",
            ),
            ("orchestrator:role/agent/n1", "malformed orchestrator role"),
        ] {
            assert_eq!(reason(&cert_with_sans(vec![uri(u)])), why, "{u}");
        }
        assert_eq!(
            reason(b"not a certificate"),
            "not a valid X.509 certificate"
        );
        let mut der = cert_with_sans(vec![uri("orchestrator://role/agent/n1")]);
        der.push(0);
        assert_eq!(reason(&der), "trailing data after the certificate");
    }

    #[test]
    fn refusals_name_the_required_roles_and_the_caller() {
        let agent = Identity::new(Role::Agent, "n1").unwrap();
        assert!(agent.require(&[Role::Agent]).is_ok());
        let s = agent.require(&[Role::Coordinator]).unwrap_err();
        assert_eq!(s.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            s.message(),
            "permission denied: requires role coordinator; the caller is agent n1"
        );
        let s = agent
            .require(&[Role::Coordinator, Role::Operator])
            .unwrap_err();
        assert!(
            s.message()
                .contains("requires role coordinator or operator")
        );
        let s = agent
            .require(&[Role::Coordinator, Role::Operator, Role::Viewer])
            .unwrap_err();
        assert!(
            s.message()
                .contains("requires role coordinator, operator or viewer"),
            "{}",
            s.message()
        );
        assert_eq!(
            agent.require(&[]).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
    }

    #[test]
    fn acting_as_another_name_is_refused_without_echoing_junk() {
        let agent = Identity::new(Role::Agent, "n2").unwrap();
        assert!(agent.require_name("n2").is_ok());
        let s = agent.require_name("n1").unwrap_err();
        assert_eq!(s.code(), tonic::Code::PermissionDenied);
        assert!(s.message().contains("agent n2") && s.message().contains("\"n1\""));
        let s = agent.require_name("../../etc/passwd\n").unwrap_err();
        assert!(!s.message().contains("passwd"), "{}", s.message());
    }

    #[test]
    fn plain_requests_are_unauthenticated_unless_insecure() {
        let req = Request::new(());
        assert_eq!(
            require(&req, &[Role::Operator]).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            AuthMode::Mtls
                .require(&req, &[Role::Operator])
                .unwrap_err()
                .code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            AuthMode::Insecure.require(&req, &[Role::Operator]).unwrap(),
            None
        );
        let mut i = authorize(&[Role::Operator]);
        assert_eq!(
            i.call(Request::new(())).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let mut i = AuthMode::Insecure.interceptor(&[Role::Operator]);
        let r = i.call(Request::new(())).unwrap();
        assert!(authenticated(&r).is_none());
    }
}
