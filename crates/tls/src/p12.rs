//! A party's certificate, key and CA as one PKCS#12 bundle (`certs issue --p12`): the form a
//! browser imports as a personal certificate, for the dashboard under mutual TLS.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use p12_keystore::{Certificate, KeyStore, KeyStoreEntry, PrivateKey, PrivateKeyChain};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::{CA_FILE, CERT_FILE, Error, KEY_FILE, Result, identity_from_cert_der};

/// The bundle's file name in a party folder: `<role>-<name>.p12`.
pub fn p12_file_name(folder: &Path) -> Result<String> {
    let leaf = leaf_der(&folder.join(CERT_FILE))?;
    let id = identity_from_cert_der(leaf.as_ref())?;
    Ok(format!("{}.p12", id.party()))
}

fn leaf_der(path: &Path) -> Result<CertificateDer<'static>> {
    let mut certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| Error::bad_file(path, format!("cannot read PEM certificates: {e}")))?;
    match certs.next() {
        Some(Ok(c)) => Ok(c),
        _ => Err(Error::bad_file(path, "holds no certificate")),
    }
}

/// The PKCS#12 bytes of the party in `folder` (cert.pem, key.pem, ca.pem): its key with the
/// chain leaf then CA, encrypted and MACed with `password` (AES-256 and HMAC-SHA-256, what
/// current browsers and OpenSSL 3 read).
pub fn pkcs12(folder: &Path, password: &str) -> Result<Vec<u8>> {
    if password.is_empty() {
        return Err(Error::Config(
            "a PKCS#12 bundle needs a password (browsers refuse or mishandle empty ones)".into(),
        ));
    }
    let leaf = leaf_der(&folder.join(CERT_FILE))?;
    let ca = leaf_der(&folder.join(CA_FILE))?;
    let key_path = folder.join(KEY_FILE);
    let key = match PrivateKeyDer::from_pem_file(&key_path) {
        Ok(PrivateKeyDer::Pkcs8(k)) => k.secret_pkcs8_der().to_vec(),
        _ => return Err(Error::bad_file(&key_path, "not a PKCS#8 private key")),
    };
    let bad = |path: &Path, what: &str| {
        let (path, what) = (path.to_path_buf(), what.to_string());
        move |e: p12_keystore::error::Error| Error::bad_file(path, format!("{what}: {e}"))
    };
    let key = PrivateKey::from_der(&key).map_err(bad(&key_path, "unusable private key"))?;
    let leaf_cert = Certificate::from_der(leaf.as_ref())
        .map_err(bad(&folder.join(CERT_FILE), "unusable certificate"))?;
    let ca_cert = Certificate::from_der(ca.as_ref())
        .map_err(bad(&folder.join(CA_FILE), "unusable certificate"))?;
    let id = identity_from_cert_der(leaf.as_ref())?;
    // The key's id ties it to its certificate inside the bundle; the party name is unique.
    let chain = PrivateKeyChain::new(id.party().into_bytes(), key, [leaf_cert, ca_cert]);
    let mut store = KeyStore::new();
    store.add_entry(&id.party(), KeyStoreEntry::PrivateKeyChain(chain));
    store
        .writer(password)
        .write()
        .map_err(|e| Error::Config(format!("cannot encode the PKCS#12 bundle: {e}")))
}

/// Writes [`pkcs12`] of `folder` to `folder/<role>-<name>.p12` (mode 0600, atomically: a
/// temporary file renamed into place). Returns its path.
pub fn write_pkcs12(folder: &Path, password: &str) -> Result<PathBuf> {
    let bytes = pkcs12(folder, password)?;
    let path = folder.join(p12_file_name(folder)?);
    let tmp = folder.join(format!(".{}.tmp", p12_file_name(folder)?));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(&bytes)?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(&path, e));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Role, init_with};

    #[test]
    fn a_bundle_parses_back_with_the_party_key_and_chain() {
        let dir = tempfile::tempdir().unwrap();
        let opts = crate::InitOptions {
            viewers: vec!["alice".into()],
            ..crate::InitOptions::default()
        };
        init_with(dir.path(), &opts).unwrap();
        let folder = dir.path().join(crate::party_domain(Role::Viewer, "alice"));
        let path = write_pkcs12(&folder, "s3cret").unwrap();
        assert_eq!(path.file_name().unwrap(), "viewer-alice.p12");
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let bytes = std::fs::read(&path).unwrap();

        let store = KeyStore::from_pkcs12(&bytes, "s3cret", Default::default()).unwrap();
        let (alias, chain) = store.private_key_chain().expect("a key with its chain");
        assert_eq!(alias, "viewer-alice");
        let leaf = leaf_der(&folder.join(CERT_FILE)).unwrap();
        let ca = leaf_der(&folder.join(CA_FILE)).unwrap();
        let ders: Vec<&[u8]> = chain.certs().iter().map(|c| c.as_der()).collect();
        assert_eq!(ders, [leaf.as_ref(), ca.as_ref()]);
        let key = PrivateKeyDer::from_pem_file(folder.join(KEY_FILE)).unwrap();
        assert_eq!(chain.key().as_der(), key.secret_der());

        assert!(KeyStore::from_pkcs12(&bytes, "wrong", Default::default()).is_err());
        assert!(pkcs12(&folder, "").is_err(), "an empty password is refused");
    }
}
