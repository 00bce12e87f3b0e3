//! Mutual TLS for every orchestrator channel: the certificate authority, one certificate per
//! party, the tonic TLS configurations, and the caller's identity and role on every request.
//!
//! This crate provides *identities*. What each role may do is decided by the services that call
//! [`require`] (or install an [`authorize`] interceptor) with the roles they accept; the crate
//! itself grants nothing.
//!
//! It also holds what both daemons do at their gRPC edge: the start of serving
//! ([`Security::daemon_server`]: identity and listen checks, TLS, limits, reflection) and the
//! one-line text of an error with its causes for a status or a log line ([`error_chain`]).
//!
//! # Parties and roles
//!
//! Every party holds a certificate issued by the cluster's own CA. The party's role and name are
//! recorded in the certificate as one subject-alternative-name URI,
//! `orchestrator://role/<role>/<name>` (for example `orchestrator://role/agent/n1`). A
//! certificate with no such URI, or with several, identifies nobody and is refused.
//!
//! | role          | who                                 | key usages                 |
//! |---------------|-------------------------------------|----------------------------|
//! | `coordinator` | a coordinator daemon, named by its numeric id (`1`, `2`, ...) | server + client |
//! | `agent`       | a node agent, named by its node id (`n1`)                      | server + client |
//! | `operator`    | a person or automation that runs rollouts (`alice`)           | client          |
//! | `viewer`      | read-only access to the control API (`grafana`)               | client          |
//!
//! Names use the node-id alphabet: 1 to 64 characters of `[A-Za-z0-9._-]`, starting with a
//! letter or digit.
//!
//! Node certificates (coordinator, agent) carry DNS/IP names for `localhost`, `127.0.0.1`,
//! `::1`, the party folder name (`coordinator-1`, `agent-n1`, see [`party_domain`]), the bare
//! name when it is a valid host name (`n1`), any extra names given when issuing (`--san`), and,
//! for coordinators, the shared name [`COORDINATOR_DOMAIN`]. Clients verify the server's name
//! against one of those, so dial:
//!
//! * a coordinator whose id you do not know (CLI, agent registration) with
//!   `domain = COORDINATOR_DOMAIN`: only coordinator certificates carry it, so an agent's key
//!   cannot impersonate a coordinator;
//! * a known coordinator (Raft peers) with `party_domain(Role::Coordinator, "2")`;
//! * an agent (coordinator -> agent) with `party_domain(Role::Agent, node_id)`: the handshake
//!   then proves the coordinator reached the node it meant to reach.
//!
//! # Creating certificates
//!
//! ```text
//! orchestrator certs init DIR --coordinators 3 --agents n1,n2,n3 --operators alice
//! ```
//!
//! ([`init`] / [`init_with`]) creates:
//!
//! ```text
//! DIR/ca/ca.pem              the CA certificate (public; give it to anyone who must trust the cluster)
//! DIR/ca/ca-key.pem          the CA private key, mode 0600: keep it offline, it can mint any identity
//! DIR/coordinator-1/         ca.pem  cert.pem  key.pem (0600)
//! DIR/coordinator-2/ ...
//! DIR/agent-n1/ ...
//! DIR/operator-alice/ ...
//! ```
//!
//! Each party folder is self-contained: copy it to the machine (or the person) it belongs to and
//! point the daemon or CLI at it with `--tls-dir` (or give `--ca`, `--cert`, `--key`
//! separately). The CLI defaults to `$ORCHESTRATOR_TLS_DIR`, else `~/.config/orchestrator/`
//! ([`default_tls_dir`]). Folders are mode 0700 and keys 0600; a key readable by group or others
//! is refused at load time. Existing CA or party folders are never overwritten.
//!
//! `orchestrator certs issue DIR --role agent --name n4 [--san host.example] [--out FOLDER]`
//! ([`issue`] / [`issue_with`]) adds a party later, signed by `DIR/ca`. Certificates are valid
//! for one year by default, the CA for ten ([`DEFAULT_CERT_DAYS`], [`DEFAULT_CA_DAYS`]); every
//! file is written to a temporary name, fsynced, then renamed into place, and a party folder
//! appears only once complete.
//!
//! # Rotating a party's certificate
//!
//! 1. Issue a new certificate for the same party into a new folder:
//!    `orchestrator certs issue DIR --role agent --name n1 --out DIR/agent-n1.2027`.
//! 2. Copy the folder to the machine, switch the daemon's `--tls-dir` to it, restart the daemon.
//! 3. Delete the old folder. (There is no revocation list: an old certificate stays valid until
//!    it expires, so keep lifetimes short for parties whose keys may leak, and rotate the CA if
//!    a key is known to be compromised.)
//!
//! # Rotating the CA
//!
//! A `ca.pem` may hold several certificates; a party trusts every CA listed in it. So:
//!
//! 1. Create the new CA with fresh party certificates: `orchestrator certs init NEWDIR ...`.
//! 2. Overlap: on every party, replace `ca.pem` with the concatenation of the old and new CA
//!    certificates (`cat OLD/ca/ca.pem NEW/ca/ca.pem > ca.pem`) and restart it. Every party now
//!    accepts peers from both CAs, while still presenting its old certificate.
//! 3. Switch each party to its new folder (whose `ca.pem` you also replace with the
//!    concatenation) and restart it, one at a time.
//! 4. Once no party uses an old certificate, drop the old CA from every `ca.pem` and restart;
//!    destroy the old CA key.
//!
//! # Serving and dialing
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use orch_tls::{TlsFiles, Role, COORDINATOR_DOMAIN};
//! let files = TlsFiles::from_dir("/etc/orchestrator/tls/coordinator-1".as_ref());
//! let server_tls = orch_tls::server_config(&files)?; // requires client certs from ca.pem
//! let client_tls = orch_tls::client_config(&files, COORDINATOR_DOMAIN)?;
//! # let _ = (server_tls, client_tls, Role::Agent); Ok(()) }
//! ```
//!
//! Dial `orch_tls::tls_uri(addr)?`, never an `http://` URI: tonic applies the TLS
//! configuration only to `https` URIs.
//!
//! Daemons and clients carry one [`Security`] value (`Mtls` with the loaded material, or the
//! explicitly requested `Insecure`): [`Security::endpoint`] dials a party by the domain above,
//! [`Security::server`] builds a server with TLS and the shared [`ServerLimits`], and
//! [`Security::mode`] is the [`AuthMode`] handlers check callers with.
//!
//! In a handler, `let who = orch_tls::require(&request, &[Role::Operator])?;` refuses any other
//! caller with `PermissionDenied` naming the required role, and returns the caller's
//! [`Identity`] (for audit trails). The identity is read from the peer certificates tonic
//! records on TCP connections it accepted itself ([`tonic::Request::peer_certs`]).

mod authz;
mod certs;
mod daemon;
mod https;
mod load;
mod p12;
mod security;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

pub use authz::{
    AuthMode, RoleInterceptor, VerifiedCaller, authenticated, authorize, identity_from_cert_der,
    identity_of, require, require_name,
};
pub use certs::{
    DEFAULT_CA_DAYS, DEFAULT_CERT_DAYS, InitOptions, IssueOptions, Validity, init, init_with,
    issue, issue_with,
};
pub use daemon::{Daemon, REFLECTION_SERVICES, with_reflection};
pub use load::{TlsFiles, TlsMaterial, client_config, default_tls_dir, server_config, tls_uri};
pub use p12::{p12_file_name, pkcs12, write_pkcs12};
pub use security::{Security, ServerLimits, connect_error, error_chain, incoming, is_tls_failure};

/// The URI prefix of the subject alternative name that records a party's role and name.
pub const ROLE_URI_PREFIX: &str = "orchestrator://role/";

/// A DNS name every coordinator certificate carries, for clients that dial "any coordinator".
pub const COORDINATOR_DOMAIN: &str = "coordinator.orchestrator";

/// The CA folder inside a certificates directory.
pub const CA_FOLDER: &str = "ca";
/// File names inside a party folder (and `ca.pem` inside the CA folder).
pub const CA_FILE: &str = "ca.pem";
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";
/// The CA's private key, only in the CA folder.
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// What a certificate lets its holder be. Services decide what each role may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Coordinator,
    Agent,
    Operator,
    Viewer,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Coordinator, Role::Agent, Role::Operator, Role::Viewer];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Agent => "agent",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        }
    }

    /// Coordinators and agents serve gRPC as well as call it: their certificates carry both the
    /// server and the client key usage, and host names.
    pub fn is_node(self) -> bool {
        matches!(self, Role::Coordinator | Role::Agent)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                Error::invalid("role", s, "expected coordinator, agent, operator or viewer")
            })
    }
}

/// Who is calling: the role and name from the caller's certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub role: Role,
    /// The party's name: a coordinator id (`"1"`), a node id (`"n1"`), an operator's name.
    /// Always matches the node-id alphabet, so it is safe in logs, paths and error messages.
    pub name: String,
}

impl Identity {
    /// Builds an identity, validating the name.
    pub fn new(role: Role, name: &str) -> Result<Self> {
        validate_name(name)?;
        Ok(Identity {
            role,
            name: name.to_string(),
        })
    }

    /// The SAN URI recording this identity: `orchestrator://role/<role>/<name>`.
    pub fn uri(&self) -> String {
        format!("{ROLE_URI_PREFIX}{}/{}", self.role, self.name)
    }

    /// The party folder / host name for this identity: `<role>-<name>`.
    pub fn party(&self) -> String {
        party_domain(self.role, &self.name)
    }

    /// A coordinator's numeric id, if this is a coordinator named by a number.
    pub fn coordinator_id(&self) -> Option<u64> {
        (self.role == Role::Coordinator)
            .then(|| self.name.parse().ok())
            .flatten()
    }
}

/// `"operator alice"`: the form used in error messages and audit trails.
impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.role, self.name)
    }
}

/// The party folder name and the DNS name its node certificate carries: `<role>-<name>`
/// (`coordinator-1`, `agent-n1`). Use it as the `domain` when dialing a known party.
pub fn party_domain(role: Role, name: &str) -> String {
    format!("{role}-{name}")
}

/// Checks a party name: 1 to 64 characters of `[A-Za-z0-9._-]`, starting with a letter or digit
/// (the node-id alphabet).
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "name",
            name,
            "use 1 to 64 characters of [A-Za-z0-9._-], starting with a letter or digit",
        ))
    }
}

/// Errors of this crate. Messages name local files (they are for the operator running the
/// command or daemon); nothing here ever reaches a remote caller, which only sees the
/// [`tonic::Status`] values of [`identity_of`] and [`require`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid {what} {value:?}: {reason}")]
    Invalid {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("{} already exists: refusing to overwrite it", .0.display())]
    Exists(PathBuf),
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {msg}", path.display())]
    BadFile { path: PathBuf, msg: String },
    #[error("the certificate identifies no party: {0}")]
    Identity(&'static str),
    #[error("certificate generation failed")]
    Generate(#[from] rcgen::Error),
    #[error("{0}")]
    Config(String),
    #[error("gRPC reflection setup")]
    Reflection(#[source] tonic_reflection::server::Error),
}

impl Error {
    pub(crate) fn invalid(what: &'static str, value: &str, reason: &'static str) -> Self {
        Error::Invalid {
            what,
            value: value.chars().take(80).collect(),
            reason,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn bad_file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::BadFile {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_use_the_node_id_alphabet() {
        for ok in ["n1", "1", "node-1.eu_west", "A", &"a".repeat(64)] {
            assert!(validate_name(ok).is_ok(), "{ok:?}");
        }
        for bad in [
            "",
            "-n1",
            ".hidden",
            "_x",
            "a/b",
            "..",
            "a b",
            "é",
            "n1\n",
            &"a".repeat(65),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn roles_round_trip() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
        }
        assert!("admin".parse::<Role>().is_err());
        assert!("Operator".parse::<Role>().is_err());
        assert!(Role::Coordinator.is_node() && Role::Agent.is_node());
        assert!(!Role::Operator.is_node() && !Role::Viewer.is_node());
    }

    #[test]
    fn identity_forms() {
        let id = Identity::new(Role::Coordinator, "2").unwrap();
        assert_eq!(id.uri(), "orchestrator://role/coordinator/2");
        assert_eq!(id.party(), "coordinator-2");
        assert_eq!(id.to_string(), "coordinator 2");
        assert_eq!(id.coordinator_id(), Some(2));
        assert_eq!(
            Identity::new(Role::Agent, "2").unwrap().coordinator_id(),
            None
        );
        assert!(Identity::new(Role::Agent, "../x").is_err());
    }
}
