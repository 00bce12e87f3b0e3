//! A rustls server configuration for a daemon's HTTPS endpoint: the same certificate and CAs
//! as its gRPC side, but a client certificate may be optional, because `/metrics` and
//! `/healthz` can be served to anyone (`--http-public-metrics`). Roles are checked per request
//! by the HTTP layer from whatever certificate the client presented.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::{Error, Result, TlsMaterial};

impl TlsMaterial {
    /// The HTTPS server configuration. With `client_cert_optional`, clients without a
    /// certificate are let in (and seen as anonymous); a certificate that is presented must
    /// still chain to the CAs.
    pub fn https_server_config(&self, client_cert_optional: bool) -> Result<Arc<ServerConfig>> {
        let bad = |what: &str, e: &dyn std::fmt::Display| Error::Config(format!("{what}: {e}"));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&self.ca_pem) {
            let cert = cert.map_err(|e| bad("the CA file", &e))?;
            roots.add(cert).map_err(|e| bad("the CA certificate", &e))?;
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
        let verifier = if client_cert_optional {
            verifier.allow_unauthenticated()
        } else {
            verifier
        }
        .build()
        .map_err(|e| bad("the client certificate verifier", &e))?;
        let chain = CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| bad("the certificate file", &e))?;
        let key =
            PrivateKeyDer::from_pem_slice(&self.key_pem).map_err(|e| bad("the key file", &e))?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("TLS versions", &e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| bad("the certificate and key", &e))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}
