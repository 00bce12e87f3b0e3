//! Detached Ed25519 package signatures (ring), so that a node trusts a package because an
//! operator's signing key vouches for it, not because a coordinator sent it.
//!
//! What is signed: the domain-separated message `b"orchestrator-package-signature-v1\0"`
//! followed by the 32 raw bytes of the package's SHA-256. Signing the digest (not the bytes)
//! lets every receiver reuse the digest it already computes while streaming or extracting, and
//! the domain prefix keeps these signatures from being valid for anything else.
//!
//! Files (all text):
//! - `signing.key`: the private key, PEM `PRIVATE KEY` (PKCS#8, as `openssl genpkey -algorithm
//!   ed25519` writes it), mode 0600.
//! - `signing.pub`: the public key, PEM `PUBLIC KEY` (SubjectPublicKeyInfo, as `openssl pkey
//!   -pubout` writes it).
//! - `<package>.sig`, beside the package:
//!   ```text
//!   orchestrator-signature v1
//!   key-id 3f9a0c1d2e4b5a69
//!   sha256 <64 hex digits>
//!   signature <base64 of the 64-byte Ed25519 signature>
//!   ```
//!   `key-id` is the first 8 bytes (16 hex digits) of the SHA-256 of the raw 32-byte public
//!   key; it says which trusted key to check with. `sha256` is informational (it lets a refusal
//!   say "modified after signing"): verification always uses the digest of the actual bytes.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use sha2::{Digest, Sha256};

use crate::digest::{hex, normalize_digest};
use crate::error::display_name;
use crate::fsutil::{WriteNewError, write_atomic, write_new};

/// Prefix of every signed message (see the module docs).
pub const DOMAIN: &[u8] = b"orchestrator-package-signature-v1\0";
/// First line of a `.sig` file.
pub const SIG_MAGIC: &str = "orchestrator-signature v1";
/// A `.sig` larger than this is not one of ours (and must not be read into memory whole).
pub const MAX_SIG_BYTES: usize = 4096;
pub const KEY_FILE: &str = "signing.key";
pub const PUB_FILE: &str = "signing.pub";

const PRIVATE_TAG: &str = "PRIVATE KEY";
const PUBLIC_TAG: &str = "PUBLIC KEY";
/// DER prefix of an Ed25519 SubjectPublicKeyInfo: SEQUENCE { SEQUENCE { OID 1.3.101.112 },
/// BIT STRING (0 unused bits) } followed by the 32 key bytes.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// DER of an Ed25519 PKCS#8 v1 private key before its 32-byte seed (RFC 8410).
const PKCS8_V1_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
/// The same for the v2 form ring generates (the public key follows the seed).
const PKCS8_V2_PREFIX: [u8; 16] = [
    0x30, 0x51, 0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No signature accompanies the package.
    #[error("missing: no signature ({hint})")]
    Missing { hint: String },
    /// The signature file is not in the format above.
    #[error("malformed: the signature is unreadable ({0})")]
    Malformed(String),
    /// Signed by a key this party does not trust.
    #[error(
        "unknown key: it is signed by key {key_id}, which is not trusted here (trusted: {trusted})"
    )]
    UnknownKey { key_id: String, trusted: String },
    /// The signature does not verify over the package's digest.
    #[error("invalid: {0}")]
    Invalid(String),
    /// A key file is missing, unreadable or not an Ed25519 key.
    #[error("key file {path}")]
    KeyFile {
        path: PathBuf,
        #[source]
        reason: KeyError,
    },
    /// Key generation never overwrites.
    #[error("{path} already exists; refusing to overwrite a signing key (move it away first)")]
    Exists { path: PathBuf },
    /// The random generator or the key encoding failed while making a key.
    #[error("generating a signing key failed: {0}")]
    KeyGen(&'static str),
    /// Hashing or writing the package file (`sign_file`).
    #[error(transparent)]
    Package(#[from] Box<crate::error::Error>),
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What is wrong with a key file or key bytes.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read it")]
    Read(#[source] io::Error),
    #[error("too large to be a key file")]
    TooLarge,
    #[error("not a PEM file")]
    NotPem(#[source] pem::PemError),
    #[error("expected a PEM \"{expected}\" block, found \"{found}\"{hint}")]
    WrongBlock {
        expected: &'static str,
        found: String,
        hint: &'static str,
    },
    #[error("not an Ed25519 public key")]
    NotEd25519,
    /// ring's reason is a short fixed phrase (and not a `std::error::Error` without its `std`
    /// feature), so it is part of the sentence.
    #[error("not an Ed25519 PKCS#8 key ({0})")]
    NotPkcs8(ring::error::KeyRejected),
}

impl Error {
    /// Which check failed, for refusals: `missing`, `malformed`, `unknown key`, `invalid`;
    /// `None` for key-file and I/O problems (not a verdict on the package).
    pub fn check(&self) -> Option<&'static str> {
        match self {
            Error::Missing { .. } => Some("missing"),
            Error::Malformed(_) => Some("malformed"),
            Error::UnknownKey { .. } => Some("unknown key"),
            Error::Invalid(_) => Some("invalid"),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn key_err(path: &Path) -> impl FnOnce(KeyError) -> Error + '_ {
    move |reason| Error::KeyFile {
        path: path.to_path_buf(),
        reason,
    }
}

/// The short id of a raw 32-byte public key.
pub fn key_id(raw: &[u8]) -> String {
    hex(&Sha256::digest(raw)[..8])
}

fn message(sha256: &[u8; 32]) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + 32);
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(sha256);
    m
}

/// Raw digest bytes from lower- or upper-case hex.
fn digest_bytes(sha256_hex: &str) -> Result<[u8; 32]> {
    let d = normalize_digest(sha256_hex)
        .ok_or_else(|| Error::Malformed(format!("{sha256_hex:?} is not a hex SHA-256")))?;
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&d[2 * i..2 * i + 2], 16)
            .map_err(|_| Error::Malformed(format!("{sha256_hex:?} is not a hex SHA-256")))?;
    }
    Ok(out)
}

/// A trusted Ed25519 public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    raw: [u8; 32],
    id: String,
}

impl PublicKey {
    pub fn from_raw(raw: [u8; 32]) -> PublicKey {
        PublicKey {
            id: key_id(&raw),
            raw,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Parses the PEM `PUBLIC KEY` text of `signing.pub`.
    pub fn from_pem(text: &str) -> std::result::Result<PublicKey, KeyError> {
        let der = pem_block(text, PUBLIC_TAG, "")?;
        if der.len() != SPKI_PREFIX.len() + 32 || der[..SPKI_PREFIX.len()] != SPKI_PREFIX {
            return Err(KeyError::NotEd25519);
        }
        let mut raw = [0u8; 32];
        raw.copy_from_slice(&der[SPKI_PREFIX.len()..]);
        Ok(PublicKey::from_raw(raw))
    }

    pub fn to_pem(&self) -> String {
        let mut der = SPKI_PREFIX.to_vec();
        der.extend_from_slice(&self.raw);
        pem_text(PUBLIC_TAG, der)
    }

    /// Reads a `signing.pub` file.
    pub fn load(path: &Path) -> Result<PublicKey> {
        let text = read_small(path, 16 << 10).map_err(key_err(path))?;
        PublicKey::from_pem(&text).map_err(key_err(path))
    }

    fn verifies(&self, sha256: &[u8; 32], sig: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.raw)
            .verify(&message(sha256), sig)
            .is_ok()
    }
}

/// A private signing key.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    public: PublicKey,
}

impl std::fmt::Debug for SigningKey {
    // Never print key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({})", self.public.id)
    }
}

impl SigningKey {
    /// A fresh key and its PKCS#8 v1 encoding (the form OpenSSL reads and writes).
    pub fn generate() -> Result<(SigningKey, Vec<u8>)> {
        let rng = ring::rand::SystemRandom::new();
        let v2 = Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| Error::KeyGen("the system random generator failed"))?;
        // ring writes v2 (seed plus public key), which OpenSSL 3 refuses; v1 is the bare seed.
        let der = v2.as_ref();
        if der.len() < PKCS8_V2_PREFIX.len() + 32 || der[..PKCS8_V2_PREFIX.len()] != PKCS8_V2_PREFIX
        {
            return Err(Error::KeyGen(
                "the generated key has an unexpected encoding",
            ));
        }
        let mut v1 = PKCS8_V1_PREFIX.to_vec();
        v1.extend_from_slice(&der[PKCS8_V2_PREFIX.len()..PKCS8_V2_PREFIX.len() + 32]);
        let key = SigningKey::from_pkcs8(&v1)
            .map_err(|_| Error::KeyGen("the generated key was rejected"))?;
        Ok((key, v1))
    }

    /// Accepts PKCS#8 v1 (OpenSSL) and v2 (ring) Ed25519 keys.
    pub fn from_pkcs8(der: &[u8]) -> std::result::Result<SigningKey, KeyError> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).map_err(KeyError::NotPkcs8)?;
        let mut raw = [0u8; 32];
        raw.copy_from_slice(pair.public_key().as_ref());
        Ok(SigningKey {
            pair,
            public: PublicKey::from_raw(raw),
        })
    }

    /// Reads a `signing.key` file.
    pub fn load(path: &Path) -> Result<SigningKey> {
        let text = read_small(path, 16 << 10).map_err(key_err(path))?;
        pem_block(&text, PRIVATE_TAG, " (is this signing.pub?)")
            .and_then(|der| SigningKey::from_pkcs8(&der))
            .map_err(key_err(path))
    }

    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    /// Signs a package digest; returns the `.sig` file's text.
    pub fn sign_digest(&self, sha256_hex: &str) -> Result<String> {
        let digest = digest_bytes(sha256_hex)?;
        let sig = self.pair.sign(&message(&digest));
        Ok(Signature {
            key_id: self.public.id.clone(),
            sha256: hex(&digest),
            sig: sig.as_ref().to_vec(),
        }
        .to_text())
    }
}

/// A parsed `.sig` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub key_id: String,
    /// The digest the signer saw (informational).
    pub sha256: String,
    pub sig: Vec<u8>,
}

impl Signature {
    pub fn to_text(&self) -> String {
        format!(
            "{SIG_MAGIC}\nkey-id {}\nsha256 {}\nsignature {}\n",
            self.key_id,
            self.sha256,
            base64::engine::general_purpose::STANDARD.encode(&self.sig)
        )
    }

    /// Parses the text format strictly: the four lines, in order, nothing else.
    pub fn parse(bytes: &[u8]) -> Result<Signature> {
        let m = |s: &str| Error::Malformed(s.to_string());
        if bytes.len() > MAX_SIG_BYTES {
            return Err(m("larger than any signature file"));
        }
        let text = std::str::from_utf8(bytes).map_err(|_| m("not UTF-8 text"))?;
        let mut lines = text.lines().map(|l| l.trim_end_matches('\r'));
        if lines.next() != Some(SIG_MAGIC) {
            return Err(Error::Malformed(format!(
                "the first line is not {SIG_MAGIC:?}"
            )));
        }
        let mut field = |name: &str| -> Result<String> {
            let line = lines
                .next()
                .ok_or_else(|| Error::Malformed(format!("the {name} line is missing")))?;
            line.strip_prefix(name)
                .and_then(|r| r.strip_prefix(' '))
                .map(|v| v.trim().to_string())
                .ok_or_else(|| Error::Malformed(format!("expected a {name} line, got {line:?}")))
        };
        let key_id = field("key-id")?;
        let sha256 = field("sha256")?;
        let sig_b64 = field("signature")?;
        if lines.any(|l| !l.trim().is_empty()) {
            return Err(m("unexpected text after the signature line"));
        }
        if key_id.len() != 16 || !key_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(m("key-id is not 16 hex digits"));
        }
        let sha256 = normalize_digest(&sha256).ok_or_else(|| m("sha256 is not a hex SHA-256"))?;
        let sig = base64::engine::general_purpose::STANDARD
            .decode(sig_b64)
            .map_err(|_| m("the signature is not base64"))?;
        if sig.len() != 64 {
            return Err(Error::Malformed(format!(
                "the signature has {} bytes, an Ed25519 signature has 64",
                sig.len()
            )));
        }
        Ok(Signature {
            key_id: key_id.to_ascii_lowercase(),
            sha256,
            sig,
        })
    }
}

/// The keys a party accepts signatures from. Empty means "signatures are not required".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedKeys {
    keys: Vec<PublicKey>,
}

impl TrustedKeys {
    pub fn new(keys: Vec<PublicKey>) -> TrustedKeys {
        TrustedKeys { keys }
    }

    /// Loads every `--trusted-key` file; any unreadable one is an error (a typo must not
    /// silently drop a key and lock out good packages, or worse, be ignored).
    pub fn load(paths: &[PathBuf]) -> Result<TrustedKeys> {
        let mut keys: Vec<PublicKey> = Vec::new();
        for p in paths {
            let k = PublicKey::load(p)?;
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        Ok(TrustedKeys { keys })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn ids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.id()).collect()
    }

    /// [`TrustedKeys::verify`] for the package `file`, a failure being its refusal
    /// ([`crate::Error::Signature`]).
    pub fn verify_package(
        &self,
        file: &str,
        sig: Option<&[u8]>,
        actual_sha256: &str,
    ) -> crate::Result<String> {
        self.verify(sig, actual_sha256)
            .map_err(|reason| crate::Error::Signature {
                file: file.to_string(),
                reason,
            })
    }

    /// Checks a signature (the `.sig` bytes, if any) over the digest of the actual package
    /// bytes. Returns the id of the key that signed it.
    pub fn verify(&self, sig: Option<&[u8]>, actual_sha256: &str) -> Result<String> {
        let sig = sig.ok_or_else(|| Error::Missing {
            hint: "sign it with `orchestrator package sign FILE --key signing.key`".into(),
        })?;
        let sig = Signature::parse(sig)?;
        let actual = digest_bytes(actual_sha256)?;
        let candidates: Vec<&PublicKey> = self.keys.iter().filter(|k| k.id == sig.key_id).collect();
        if candidates.is_empty() {
            return Err(Error::UnknownKey {
                key_id: sig.key_id,
                trusted: if self.keys.is_empty() {
                    "none".into()
                } else {
                    self.ids().join(", ")
                },
            });
        }
        if let Some(k) = candidates.iter().find(|k| k.verifies(&actual, &sig.sig)) {
            return Ok(k.id.clone());
        }
        let actual_hex = hex(&actual);
        Err(Error::Invalid(if sig.sha256 != actual_hex {
            format!(
                "the signature was made for sha256 {} but the package has {actual_hex} (modified after signing?)",
                sig.sha256
            )
        } else {
            format!("the signature does not verify with key {}", sig.key_id)
        }))
    }
}

/// `<package>.sig`.
pub fn sig_path(package: &Path) -> PathBuf {
    let mut s = package.as_os_str().to_owned();
    s.push(".sig");
    PathBuf::from(s)
}

/// The bytes of `<package>.sig`, if it exists (bounded: a huge file is malformed, not read).
pub fn read_sig(package: &Path) -> Result<Option<Vec<u8>>> {
    let path = sig_path(package);
    match fs::metadata(&path) {
        Ok(m) if m.len() > MAX_SIG_BYTES as u64 => {
            Err(Error::Malformed(format!("{} is too large", path.display())))
        }
        Ok(_) => fs::read(&path).map(Some).map_err(io_err("read", &path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("read", &path)(e)),
    }
}

/// PEM with Unix line endings (the pem crate defaults to CRLF; OpenSSL writes LF).
fn pem_text(tag: &str, der: Vec<u8>) -> String {
    pem::encode_config(
        &pem::Pem::new(tag, der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// The DER contents of the one PEM block in `text`, which must be tagged `tag`.
fn pem_block(text: &str, tag: &'static str, hint: &'static str) -> Result<Vec<u8>, KeyError> {
    let p = pem::parse(text).map_err(KeyError::NotPem)?;
    if p.tag() != tag {
        return Err(KeyError::WrongBlock {
            expected: tag,
            found: p.tag().to_string(),
            hint,
        });
    }
    Ok(p.into_contents())
}

fn read_small(path: &Path, max: u64) -> Result<String, KeyError> {
    let meta = fs::metadata(path).map_err(KeyError::Read)?;
    if meta.len() > max {
        return Err(KeyError::TooLarge);
    }
    fs::read_to_string(path).map_err(KeyError::Read)
}

/// [`write_new`], with an existing file reported as a key that must not be overwritten.
fn write_key_file(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    write_new(path, bytes, mode).map_err(|e| match e {
        WriteNewError::Exists { path } => Error::Exists { path },
        WriteNewError::Write(e) => Error::Package(Box::new(e)),
    })
}

/// `package keygen --out DIR`: writes `DIR/signing.key` (0600) and `DIR/signing.pub`. Refuses
/// if either exists, before writing anything.
pub fn keygen(dir: &Path) -> Result<(PathBuf, PathBuf, String)> {
    fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    let key_path = dir.join(KEY_FILE);
    let pub_path = dir.join(PUB_FILE);
    for p in [&key_path, &pub_path] {
        if fs::symlink_metadata(p).is_ok() {
            return Err(Error::Exists { path: p.clone() });
        }
    }
    let (key, pkcs8) = SigningKey::generate()?;
    let key_pem = pem_text(PRIVATE_TAG, pkcs8);
    write_key_file(&key_path, key_pem.as_bytes(), 0o600)?;
    if let Err(e) = write_key_file(&pub_path, key.public().to_pem().as_bytes(), 0o644) {
        // Leave no half pair: the key we just wrote has never been used.
        let _ = fs::remove_file(&key_path);
        return Err(e);
    }
    Ok((key_path, pub_path, key.public().id().to_string()))
}

/// `package sign FILE --key KEY`: writes `FILE.sig` (replacing an older signature: re-signing
/// with a new key during rotation is the point). Returns the signature path and key id.
pub fn sign_file(package: &Path, key: &SigningKey) -> Result<(PathBuf, String)> {
    let (digest, _) = crate::digest::sha256_file(package).map_err(Box::new)?;
    let text = key.sign_digest(&digest)?;
    let path = sig_path(package);
    write_atomic(&path, text.as_bytes()).map_err(Box::new)?;
    Ok((path, key.public().id().to_string()))
}

/// Checks a package file against its expected digest (explicit, else its `.sha256`) and its
/// `.sig` against `trusted`; returns the verified digest and the id of the key that signed it.
/// A `.sig` that cannot be read is an I/O error, not a verdict on the package.
pub fn check_signature(
    zip: &Path,
    explicit_sha256: Option<&str>,
    trusted: &TrustedKeys,
) -> crate::Result<(String, String)> {
    let (actual, _) = crate::digest::digest_checked(zip, explicit_sha256)?;
    let sig = read_sig(zip).map_err(|e| match e {
        Error::Io { op, path, source } => crate::Error::Io { op, path, source },
        reason => crate::Error::Signature {
            file: display_name(zip),
            reason,
        },
    })?;
    let key = trusted.verify_package(&display_name(zip), sig.as_deref(), &actual)?;
    Ok((actual, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::generate().expect("keygen").0
    }

    const D1: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    const D2: &str = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752";

    #[test]
    fn round_trip() {
        let k = key();
        let sig = k.sign_digest(D1).unwrap();
        let trusted = TrustedKeys::new(vec![k.public().clone()]);
        assert_eq!(
            trusted.verify(Some(sig.as_bytes()), D1).unwrap(),
            k.public().id()
        );
        // Upper-case digests are the same digest.
        assert!(
            trusted
                .verify(Some(sig.as_bytes()), &D1.to_uppercase())
                .is_ok()
        );
        // The key survives its PEM forms.
        let p = PublicKey::from_pem(&k.public().to_pem()).unwrap();
        assert_eq!(&p, k.public());
    }

    #[test]
    fn other_key_and_rotation() {
        let (old, new) = (key(), key());
        let sig = new.sign_digest(D1).unwrap();
        let only_old = TrustedKeys::new(vec![old.public().clone()]);
        let e = only_old.verify(Some(sig.as_bytes()), D1).unwrap_err();
        assert_eq!(e.check(), Some("unknown key"), "{e}");
        assert!(e.to_string().contains(new.public().id()), "{e}");
        // During a rotation both are trusted and either signature passes.
        let both = TrustedKeys::new(vec![old.public().clone(), new.public().clone()]);
        assert!(both.verify(Some(sig.as_bytes()), D1).is_ok());
        let old_sig = old.sign_digest(D1).unwrap();
        assert!(both.verify(Some(old_sig.as_bytes()), D1).is_ok());
    }

    #[test]
    fn modified_bytes() {
        let k = key();
        let sig = k.sign_digest(D1).unwrap();
        let trusted = TrustedKeys::new(vec![k.public().clone()]);
        let e = trusted.verify(Some(sig.as_bytes()), D2).unwrap_err();
        assert_eq!(e.check(), Some("invalid"));
        assert!(e.to_string().contains("modified after signing"), "{e}");
        // A forger who also rewrites the informational digest line gains nothing.
        let forged = sig.replace(D1, D2);
        let e = trusted.verify(Some(forged.as_bytes()), D2).unwrap_err();
        assert_eq!(e.check(), Some("invalid"));
    }

    #[test]
    fn wrong_key_with_same_id_is_invalid() {
        // A signature by another key but claiming a trusted key's id does not verify.
        let (a, b) = (key(), key());
        let sig_b = b.sign_digest(D1).unwrap();
        let claimed = sig_b.replace(b.public().id(), a.public().id());
        let trusted = TrustedKeys::new(vec![a.public().clone()]);
        let e = trusted.verify(Some(claimed.as_bytes()), D1).unwrap_err();
        assert_eq!(e.check(), Some("invalid"), "{e}");
    }

    #[test]
    fn missing_truncated_and_garbage() {
        let k = key();
        let trusted = TrustedKeys::new(vec![k.public().clone()]);
        assert_eq!(
            trusted.verify(None, D1).unwrap_err().check(),
            Some("missing")
        );
        let sig = k.sign_digest(D1).unwrap();
        let cases: Vec<Vec<u8>> = vec![
            Vec::new(),
            sig.as_bytes()[..sig.len() / 2].to_vec(),
            sig.as_bytes()[..sig.len() - 10].to_vec(),
            b"\xff\xfe garbage".to_vec(),
            vec![b'a'; MAX_SIG_BYTES + 1],
            sig.replace("signature ", "signature !!").into_bytes(),
            sig.replace("v1", "v2").into_bytes(),
            format!("{sig}extra line\n").into_bytes(),
        ];
        for c in cases {
            let e = trusted.verify(Some(&c), D1).unwrap_err();
            assert_eq!(
                e.check(),
                Some("malformed"),
                "{:?}: {e}",
                String::from_utf8_lossy(&c)
            );
        }
        // Random bytes never panic and never pass.
        for _ in 0..500 {
            let n = fastrand::usize(0..300);
            let junk: Vec<u8> = (0..n).map(|_| fastrand::u8(..)).collect();
            assert!(trusted.verify(Some(&junk), D1).is_err());
        }
    }

    #[test]
    fn unknown_key_id() {
        let k = key();
        let sig = k.sign_digest(D1).unwrap();
        let other = sig.replace(k.public().id(), "0123456789abcdef");
        let trusted = TrustedKeys::new(vec![k.public().clone()]);
        let e = trusted.verify(Some(other.as_bytes()), D1).unwrap_err();
        assert_eq!(e.check(), Some("unknown key"));
        assert!(e.to_string().contains("0123456789abcdef"));
        // No trusted keys at all: every signature's key is unknown.
        let e = TrustedKeys::default()
            .verify(Some(sig.as_bytes()), D1)
            .unwrap_err();
        assert_eq!(e.check(), Some("unknown key"));
    }

    #[test]
    fn keygen_files_modes_and_no_overwrite() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("keys");
        let (kp, pp, id) = keygen(&out).unwrap();
        assert_eq!(
            fs::metadata(&kp).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let key = SigningKey::load(&kp).unwrap();
        let public = PublicKey::load(&pp).unwrap();
        assert_eq!(key.public(), &public);
        assert_eq!(public.id(), id);
        let before = (fs::read(&kp).unwrap(), fs::read(&pp).unwrap());
        let e = keygen(&out).unwrap_err();
        assert!(matches!(e, Error::Exists { .. }), "{e}");
        assert_eq!(before, (fs::read(&kp).unwrap(), fs::read(&pp).unwrap()));
        // Nothing else (no temp files) was left behind.
        let names: Vec<_> = fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        // Wrong file for the job: a clear error, not a panic.
        assert!(matches!(SigningKey::load(&pp), Err(Error::KeyFile { .. })));
        assert!(matches!(PublicKey::load(&kp), Err(Error::KeyFile { .. })));
    }

    #[test]
    fn keys_are_in_the_openssl_forms() {
        let (k, der) = SigningKey::generate().unwrap();
        assert_eq!(der.len(), 48);
        assert_eq!(der[..16], PKCS8_V1_PREFIX);
        // The SPKI public key is what `openssl pkey -pubout` prints for it.
        let again = SigningKey::from_pkcs8(&der).unwrap();
        assert_eq!(again.public(), k.public());
        let pem = k.public().to_pem();
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\n"), "{pem:?}");
        assert!(!pem.contains('\r'), "{pem:?}");
    }

    #[test]
    fn sign_file_writes_sig_beside_the_package() {
        let dir = tempfile::tempdir().unwrap();
        let pkg = dir.path().join("app-1.0.0.zip");
        fs::write(&pkg, b"not really a zip, but bytes are bytes").unwrap();
        let k = key();
        let (sp, id) = sign_file(&pkg, &k).unwrap();
        assert_eq!(sp, dir.path().join("app-1.0.0.zip.sig"));
        assert_eq!(id, k.public().id());
        let (d, _) = crate::digest::sha256_file(&pkg).unwrap();
        let trusted = TrustedKeys::new(vec![k.public().clone()]);
        let sig = read_sig(&pkg).unwrap();
        assert!(trusted.verify(sig.as_deref(), &d).is_ok());
    }
}
