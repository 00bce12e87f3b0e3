//! Loading a party's files and building tonic's TLS configurations.

use std::fmt;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{KeyPair, PublicKeyData};
use tonic::transport::{Certificate, ClientTlsConfig, ServerTlsConfig};
use x509_parser::pem::Pem;

use crate::certs::unix_secs;
use crate::{CA_FILE, CERT_FILE, Error, Identity, KEY_FILE, Result, identity_from_cert_der};

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a party's CA bundle, certificate and key are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// One or more CA certificates (PEM); peers signed by any of them are trusted.
    pub ca: PathBuf,
    /// This party's certificate (PEM).
    pub cert: PathBuf,
    /// This party's private key (PEM, PKCS#8), mode 0600.
    pub key: PathBuf,
}

impl TlsFiles {
    /// `dir/ca.pem`, `dir/cert.pem`, `dir/key.pem`: a party folder made by `init` or `issue`.
    pub fn from_dir(dir: &Path) -> Self {
        TlsFiles {
            ca: dir.join(CA_FILE),
            cert: dir.join(CERT_FILE),
            key: dir.join(KEY_FILE),
        }
    }

    /// Resolves `--tls-dir` and `--ca` / `--cert` / `--key`: explicit paths win over the
    /// folder's files; without a folder all three are required.
    pub fn resolve(
        dir: Option<&Path>,
        ca: Option<&Path>,
        cert: Option<&Path>,
        key: Option<&Path>,
    ) -> Result<Self> {
        let base = dir.map(TlsFiles::from_dir);
        let pick = |explicit: Option<&Path>, from_dir: Option<&PathBuf>, flag: &str| {
            explicit
                .map(Path::to_path_buf)
                .or_else(|| from_dir.cloned())
                .ok_or_else(|| {
                    Error::Config(format!(
                        "no TLS {flag}: pass --tls-dir (a folder made by `orchestrator certs`) \
                         or --ca, --cert and --key, or --insecure for plain text"
                    ))
                })
        };
        Ok(TlsFiles {
            ca: pick(ca, base.as_ref().map(|b| &b.ca), "CA (--ca)")?,
            cert: pick(cert, base.as_ref().map(|b| &b.cert), "certificate (--cert)")?,
            key: pick(key, base.as_ref().map(|b| &b.key), "key (--key)")?,
        })
    }

    /// Reads and checks the files: the CA bundle holds only CA certificates, the certificate
    /// carries an orchestrator role, is currently valid and is signed by one of the CAs, the key
    /// belongs to the certificate and is not readable by group or others.
    pub fn load(&self) -> Result<TlsMaterial> {
        let ca_pem = fs::read(&self.ca).map_err(|e| Error::io(&self.ca, e))?;
        let cas = pem_certificates(&self.ca, &ca_pem)?;
        let mut ca_keys = Vec::new();
        for (i, der) in cas.iter().enumerate() {
            let (_, c) = x509_parser::parse_x509_certificate(der).map_err(|_| {
                Error::bad_file(
                    &self.ca,
                    format!("certificate {} is not valid X.509", i + 1),
                )
            })?;
            if !c.is_ca() {
                return Err(Error::bad_file(
                    &self.ca,
                    format!(
                        "certificate {} is not a CA certificate (is this a cert.pem?)",
                        i + 1
                    ),
                ));
            }
            ca_keys.push(der);
        }

        let cert_pem = fs::read(&self.cert).map_err(|e| Error::io(&self.cert, e))?;
        let certs = pem_certificates(&self.cert, &cert_pem)?;
        let leaf_der = &certs[0];
        let identity = identity_from_cert_der(leaf_der)
            .map_err(|e| Error::bad_file(&self.cert, e.to_string()))?;
        let (_, leaf) = x509_parser::parse_x509_certificate(leaf_der)
            .map_err(|_| Error::bad_file(&self.cert, "not valid X.509"))?;
        let validity = leaf.validity();
        let now = unix_secs(SystemTime::now());
        if now < validity.not_before.timestamp() {
            return Err(Error::bad_file(
                &self.cert,
                format!(
                    "not valid before {} (check this machine's clock)",
                    validity.not_before
                ),
            ));
        }
        if now > validity.not_after.timestamp() {
            return Err(Error::bad_file(
                &self.cert,
                format!(
                    "expired on {}: issue a new certificate (orchestrator certs issue)",
                    validity.not_after
                ),
            ));
        }
        let signed_by_ca = ca_keys.iter().any(|der| {
            x509_parser::parse_x509_certificate(der)
                .map(|(_, ca)| leaf.verify_signature(Some(ca.public_key())).is_ok())
                .unwrap_or(false)
        });
        if !signed_by_ca {
            return Err(Error::bad_file(
                &self.cert,
                format!("not signed by any CA in {}", self.ca.display()),
            ));
        }
        let not_after =
            SystemTime::UNIX_EPOCH + Duration::from_secs(validity.not_after.timestamp() as u64);

        check_key_mode(&self.key)?;
        let key_pem = fs::read(&self.key).map_err(|e| Error::io(&self.key, e))?;
        let key = std::str::from_utf8(&key_pem)
            .ok()
            .and_then(|s| KeyPair::from_pem(s).ok())
            .ok_or_else(|| {
                Error::bad_file(&self.key, "not a PKCS#8 private key this build can use")
            })?;
        if key.subject_public_key_info().as_slice() != leaf.public_key().raw {
            return Err(Error::bad_file(
                &self.key,
                format!("does not belong to {}", self.cert.display()),
            ));
        }

        Ok(TlsMaterial {
            ca_pem,
            cert_pem,
            key_pem,
            identity,
            not_after,
            ca_count: cas.len(),
        })
    }
}

/// A party's checked TLS files, ready to build tonic configurations from.
#[derive(Clone)]
pub struct TlsMaterial {
    pub(crate) ca_pem: Vec<u8>,
    pub(crate) cert_pem: Vec<u8>,
    pub(crate) key_pem: Vec<u8>,
    identity: Identity,
    not_after: SystemTime,
    ca_count: usize,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("identity", &self.identity)
            .field("not_after", &self.not_after)
            .field("ca_count", &self.ca_count)
            .field("key", &"[elided]")
            .finish()
    }
}

impl TlsMaterial {
    /// Who this party is, from its own certificate. Daemons should check it: a coordinator
    /// started with an agent's certificate, or an agent whose certificate names another node,
    /// should refuse to start.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// When this party's certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// How many CA certificates `ca.pem` holds (more than one during a CA rotation).
    pub fn ca_count(&self) -> usize {
        self.ca_count
    }

    /// A server configuration presenting this party's certificate and *requiring* a client
    /// certificate signed by one of the CAs. Refused for operator and viewer certificates,
    /// which are client-only.
    pub fn server_config(&self) -> Result<ServerTlsConfig> {
        if !self.identity.role.is_node() {
            return Err(Error::Config(format!(
                "this is a certificate for {}: serving needs a coordinator or agent certificate",
                self.identity
            )));
        }
        Ok(ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(
                &self.cert_pem,
                &self.key_pem,
            ))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
            .client_auth_optional(false)
            .timeout(HANDSHAKE_TIMEOUT))
    }

    /// A client configuration presenting this party's certificate, trusting the CAs, and
    /// expecting the server's certificate to carry `domain` (see the crate docs for which
    /// domain to dial each party with).
    pub fn client_config(&self, domain: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(tonic::transport::Identity::from_pem(
                &self.cert_pem,
                &self.key_pem,
            ))
            .domain_name(domain)
            .timeout(HANDSHAKE_TIMEOUT)
    }
}

/// Loads `files` and builds a server configuration that requires client certificates from the
/// CA(s) in `files.ca`. See [`TlsMaterial::server_config`].
pub fn server_config(files: &TlsFiles) -> Result<ServerTlsConfig> {
    files.load()?.server_config()
}

/// Loads `files` and builds a client configuration for a server whose certificate carries
/// `domain`. See [`TlsMaterial::client_config`].
pub fn client_config(files: &TlsFiles, domain: &str) -> Result<ClientTlsConfig> {
    Ok(files.load()?.client_config(domain))
}

/// The URI to dial `addr` with TLS: `HOST:PORT` becomes `https://HOST:PORT`, an `https://` URI
/// is kept, and any other scheme is refused. Use it instead of building `http://` URIs: tonic
/// applies a `ClientTlsConfig` only to `https` URIs and silently talks plain text to `http` ones.
pub fn tls_uri(addr: &str) -> Result<String> {
    match addr.split_once("://") {
        None => Ok(format!("https://{addr}")),
        Some((scheme, _)) if scheme.eq_ignore_ascii_case("https") => Ok(addr.to_string()),
        Some(_) => Err(Error::invalid(
            "address",
            addr,
            "TLS needs HOST:PORT or an https:// URI (http:// would skip TLS)",
        )),
    }
}

/// The CLI's default `--tls-dir`: `$ORCHESTRATOR_TLS_DIR` if set and not empty, else
/// `~/.config/orchestrator/`; `None` if neither can be determined.
pub fn default_tls_dir() -> Option<PathBuf> {
    default_tls_dir_from(
        std::env::var_os("ORCHESTRATOR_TLS_DIR"),
        std::env::var_os("HOME"),
    )
}

fn default_tls_dir_from(
    env: Option<std::ffi::OsString>,
    home: Option<std::ffi::OsString>,
) -> Option<PathBuf> {
    match env {
        Some(d) if !d.is_empty() => Some(PathBuf::from(d)),
        _ => home
            .filter(|h| !h.is_empty())
            .map(|h| PathBuf::from(h).join(".config").join("orchestrator")),
    }
}

/// The DER of every `CERTIFICATE` block in a PEM file; refuses other blocks (a private key in a
/// certificate file is a mistake worth stopping for) and files without any certificate.
pub(crate) fn pem_certificates(path: &Path, pem: &[u8]) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for block in Pem::iter_from_buffer(pem) {
        let block = block.map_err(|_| Error::bad_file(path, "malformed PEM"))?;
        if block.label != "CERTIFICATE" {
            return Err(Error::bad_file(
                path,
                format!("holds a {} block; expected only certificates", block.label),
            ));
        }
        out.push(block.contents);
    }
    if out.is_empty() {
        return Err(Error::bad_file(path, "holds no certificate"));
    }
    Ok(out)
}

/// Refuses a private key that group or others may read (like ssh does).
pub(crate) fn check_key_mode(path: &Path) -> Result<()> {
    let meta = fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::bad_file(
            path,
            format!("private key is accessible by group or others (mode {mode:04o}): chmod 600 it"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_dir_prefers_the_environment() {
        assert_eq!(
            default_tls_dir_from(Some("/etc/o".into()), Some("/home/u".into())),
            Some(PathBuf::from("/etc/o"))
        );
        assert_eq!(
            default_tls_dir_from(Some("".into()), Some("/home/u".into())),
            Some(PathBuf::from("/home/u/.config/orchestrator"))
        );
        assert_eq!(
            default_tls_dir_from(None, Some("/home/u".into())),
            Some(PathBuf::from("/home/u/.config/orchestrator"))
        );
        assert_eq!(default_tls_dir_from(None, None), None);
    }

    #[test]
    fn tls_uris_are_https() {
        assert_eq!(tls_uri("10.0.0.1:7000").unwrap(), "https://10.0.0.1:7000");
        assert_eq!(tls_uri("https://h:1").unwrap(), "https://h:1");
        assert_eq!(tls_uri("HTTPS://h:1").unwrap(), "HTTPS://h:1");
        assert!(tls_uri("http://h:1").is_err());
        assert!(tls_uri("ftp://h:1").is_err());
    }

    #[test]
    fn explicit_paths_override_the_folder() {
        let f = TlsFiles::resolve(Some(Path::new("/d")), None, Some(Path::new("/c.pem")), None)
            .unwrap();
        assert_eq!(f.ca, PathBuf::from("/d/ca.pem"));
        assert_eq!(f.cert, PathBuf::from("/c.pem"));
        assert_eq!(f.key, PathBuf::from("/d/key.pem"));
        let f = TlsFiles::resolve(
            None,
            Some(Path::new("/a")),
            Some(Path::new("/b")),
            Some(Path::new("/c")),
        )
        .unwrap();
        assert_eq!(f.key, PathBuf::from("/c"));
        let e = TlsFiles::resolve(None, Some(Path::new("/a")), None, None).unwrap_err();
        assert!(e.to_string().contains("--cert"), "{e}");
    }
}
