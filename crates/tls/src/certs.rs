//! Creating the CA and party certificates (rcgen), and writing them atomically.

use std::collections::BTreeSet;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use time::OffsetDateTime;

use crate::{
    CA_FILE, CA_FOLDER, CA_KEY_FILE, CERT_FILE, COORDINATOR_DOMAIN, Error, Identity, KEY_FILE,
    Result, Role,
};

/// Default lifetime of a party certificate, in days.
pub const DEFAULT_CERT_DAYS: u32 = 365;
/// Default lifetime of the CA certificate, in days.
pub const DEFAULT_CA_DAYS: u32 = 3650;

/// Certificates are backdated this much so a peer whose clock is slightly behind accepts them.
const BACKDATE: Duration = Duration::from_secs(5 * 60);
const DAY: u64 = 24 * 60 * 60;

/// When a certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// Valid from a few minutes ago (clock skew) for `days` days.
    pub fn days(days: u32) -> Self {
        let now = SystemTime::now();
        Validity {
            not_before: now - BACKDATE,
            not_after: now + Duration::from_secs(u64::from(days) * DAY),
        }
    }

    /// An explicit window (may lie in the past: tests use that for expired certificates).
    pub fn between(not_before: SystemTime, not_after: SystemTime) -> Self {
        Validity {
            not_before,
            not_after,
        }
    }

    fn check(&self) -> Result<()> {
        if self.not_after <= self.not_before {
            return Err(Error::Config(
                "invalid validity: the certificate would expire before it starts".into(),
            ));
        }
        Ok(())
    }
}

/// Options of [`issue_with`].
#[derive(Debug, Clone)]
pub struct IssueOptions {
    /// Extra DNS names or IP addresses (coordinator and agent certificates only), for example
    /// the host names clients dial.
    pub sans: Vec<String>,
    pub validity: Validity,
    /// The folder to create instead of `DIR/<role>-<name>` (for rotation: a new certificate for
    /// the same party next to the old one). Must not exist.
    pub out: Option<PathBuf>,
}

impl Default for IssueOptions {
    fn default() -> Self {
        IssueOptions {
            sans: Vec::new(),
            validity: Validity::days(DEFAULT_CERT_DAYS),
            out: None,
        }
    }
}

/// Options of [`init_with`].
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Coordinators `1..=coordinators`.
    pub coordinators: u32,
    /// Agents, by node id.
    pub agents: Vec<String>,
    pub operators: Vec<String>,
    pub viewers: Vec<String>,
    /// Extra DNS names or IP addresses put on every coordinator and agent certificate.
    pub node_sans: Vec<String>,
    /// Validity of the party certificates.
    pub validity: Validity,
    /// Validity of the CA certificate.
    pub ca_validity: Validity,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            coordinators: 0,
            agents: Vec::new(),
            operators: Vec::new(),
            viewers: Vec::new(),
            node_sans: Vec::new(),
            validity: Validity::days(DEFAULT_CERT_DAYS),
            ca_validity: Validity::days(DEFAULT_CA_DAYS),
        }
    }
}

/// Creates a CA in `dir/ca/` and one folder per party (`dir/coordinator-1/`, ...,
/// `dir/agent-<id>/`, `dir/operator-<name>/`) with default validity. See [`init_with`].
pub fn init(
    dir: &Path,
    coordinators: u32,
    agents: &[String],
    operators: &[String],
) -> Result<Vec<PathBuf>> {
    init_with(
        dir,
        &InitOptions {
            coordinators,
            agents: agents.to_vec(),
            operators: operators.to_vec(),
            ..InitOptions::default()
        },
    )
}

/// Creates a CA in `dir/ca/` (`ca.pem`, `ca-key.pem` mode 0600) and one folder per party, each
/// holding `ca.pem`, `cert.pem` and `key.pem` (mode 0600). Returns the folders created, the CA
/// folder first.
///
/// Everything is validated (names, duplicates, extra names, existing folders) before anything
/// is written; an existing CA or party folder is never overwritten. `dir` is created (mode
/// 0700) if missing.
pub fn init_with(dir: &Path, opts: &InitOptions) -> Result<Vec<PathBuf>> {
    opts.validity.check()?;
    opts.ca_validity.check()?;
    if opts.validity.not_after > opts.ca_validity.not_after {
        return Err(Error::Config(
            "the certificates would outlive the CA: shorten their validity or lengthen the CA's"
                .into(),
        ));
    }
    let node_sans = parse_sans(&opts.node_sans)?;

    let mut parties = Vec::new();
    for i in 1..=opts.coordinators {
        parties.push(Identity::new(Role::Coordinator, &i.to_string())?);
    }
    for (role, names) in [
        (Role::Agent, &opts.agents),
        (Role::Operator, &opts.operators),
        (Role::Viewer, &opts.viewers),
    ] {
        for name in names {
            parties.push(Identity::new(role, name)?);
        }
    }
    let mut seen = BTreeSet::new();
    for p in &parties {
        if !seen.insert(p.party()) {
            return Err(Error::Config(format!("{} is listed twice", p)));
        }
    }

    let ca_dir = dir.join(CA_FOLDER);
    refuse_existing(&ca_dir)?;
    for p in &parties {
        refuse_existing(&dir.join(p.party()))?;
    }

    if !dir.exists() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| Error::io(dir, e))?;
    }

    let ca_key = KeyPair::generate()?;
    let ca_params = ca_params(&ca_key, opts.ca_validity);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca_pem = ca_cert.pem();
    let ca_key_pem = ca_key.serialize_pem();
    let mut created = vec![create_folder(
        &ca_dir,
        &[
            (CA_FILE, ca_pem.as_bytes(), 0o644),
            (CA_KEY_FILE, ca_key_pem.as_bytes(), 0o600),
        ],
    )?];

    let issuer = Issuer::new(ca_params, ca_key);
    for p in &parties {
        let folder = dir.join(p.party());
        let sans = if p.role.is_node() {
            node_sans.as_slice()
        } else {
            &[]
        };
        created.push(write_party(
            &folder,
            p,
            sans,
            opts.validity,
            &issuer,
            ca_pem.as_bytes(),
        )?);
    }
    Ok(created)
}

/// Issues a certificate for one more party, signed by the CA in `dir/ca/`, into
/// `dir/<role>-<name>/`, with default validity. See [`issue_with`].
pub fn issue(dir: &Path, role: Role, name: &str, sans: &[String]) -> Result<PathBuf> {
    issue_with(
        dir,
        role,
        name,
        &IssueOptions {
            sans: sans.to_vec(),
            ..IssueOptions::default()
        },
    )
}

/// Issues a certificate for one party, signed by the CA in `dir/ca/`, into
/// `dir/<role>-<name>/` (or `opts.out`), holding `ca.pem` (a copy of `dir/ca/ca.pem`),
/// `cert.pem` and `key.pem`. Refuses an existing folder, extra names on operator/viewer
/// certificates, and a validity that outlives the CA.
pub fn issue_with(dir: &Path, role: Role, name: &str, opts: &IssueOptions) -> Result<PathBuf> {
    let id = Identity::new(role, name)?;
    opts.validity.check()?;
    if !role.is_node() && !opts.sans.is_empty() {
        return Err(Error::Config(format!(
            "{role} certificates are client-only: extra DNS names or addresses do not apply"
        )));
    }
    let sans = parse_sans(&opts.sans)?;
    let folder = opts.out.clone().unwrap_or_else(|| dir.join(id.party()));
    refuse_existing(&folder)?;

    let ca_dir = dir.join(CA_FOLDER);
    let ca_path = ca_dir.join(CA_FILE);
    let key_path = ca_dir.join(CA_KEY_FILE);
    let ca_pem = fs::read(&ca_path).map_err(|e| Error::io(&ca_path, e))?;
    crate::load::check_key_mode(&key_path)?;
    let key_pem = fs::read_to_string(&key_path).map_err(|e| Error::io(&key_path, e))?;
    let ca_key = KeyPair::from_pem(&key_pem)
        .map_err(|_| Error::bad_file(&key_path, "not a private key this build can use"))?;

    let blocks = crate::load::pem_certificates(&ca_path, &ca_pem)?;
    let ca_der = match blocks.as_slice() {
        [one] => one,
        _ => {
            return Err(Error::bad_file(
                &ca_path,
                "expected exactly one CA certificate",
            ));
        }
    };
    let (_, ca_x509) = x509_parser::parse_x509_certificate(ca_der)
        .map_err(|_| Error::bad_file(&ca_path, "not a valid X.509 certificate"))?;
    if !ca_x509.is_ca() {
        return Err(Error::bad_file(&ca_path, "not a CA certificate"));
    }
    if ca_x509.public_key().raw != ca_key.subject_public_key_info().as_slice() {
        return Err(Error::bad_file(
            &key_path,
            format!("does not belong to the certificate in {CA_FILE}"),
        ));
    }
    let ca_not_after = ca_x509.validity().not_after;
    if unix_secs(opts.validity.not_after) > ca_not_after.timestamp() {
        return Err(Error::Config(format!(
            "the certificate would outlive the CA, which expires {ca_not_after}: shorten its validity or rotate the CA"
        )));
    }
    let issuer = Issuer::from_ca_cert_der(&ca_der.clone().into(), ca_key)?;
    write_party(&folder, &id, &sans, opts.validity, &issuer, &ca_pem)
}

fn ca_params(key: &KeyPair, validity: Validity) -> CertificateParams {
    // A distinct subject per CA, so that during a CA rotation (two CAs trusted at once) chain
    // building never confuses them.
    let raw = key.public_key_raw();
    let tag: String = raw
        .iter()
        .skip(1)
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "orchestrator");
    dn.push(DnType::CommonName, format!("orchestrator CA {tag}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = to_offset(validity.not_before);
    params.not_after = to_offset(validity.not_after);
    params
}

fn leaf_params(id: &Identity, extra: &[SanType], validity: Validity) -> Result<CertificateParams> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "orchestrator");
    dn.push(DnType::CommonName, id.party());
    params.distinguished_name = dn;
    params.not_before = to_offset(validity.not_before);
    params.not_after = to_offset(validity.not_after);
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];

    let mut sans = vec![SanType::URI(ia5(&id.uri())?)];
    if id.role.is_node() {
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let mut dns = vec!["localhost".to_string(), id.party()];
        if valid_hostname(&id.name) {
            dns.push(id.name.to_ascii_lowercase());
        }
        if id.role == Role::Coordinator {
            dns.push(COORDINATOR_DOMAIN.to_string());
        }
        for d in dns {
            push_unique(&mut sans, SanType::DnsName(ia5(&d.to_ascii_lowercase())?));
        }
        push_unique(
            &mut sans,
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        );
        push_unique(
            &mut sans,
            SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        );
        for s in extra {
            push_unique(&mut sans, s.clone());
        }
    } else {
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    }
    params.subject_alt_names = sans;
    Ok(params)
}

fn push_unique(sans: &mut Vec<SanType>, s: SanType) {
    if !sans.contains(&s) {
        sans.push(s);
    }
}

fn write_party(
    folder: &Path,
    id: &Identity,
    extra: &[SanType],
    validity: Validity,
    issuer: &Issuer<'_, KeyPair>,
    ca_pem: &[u8],
) -> Result<PathBuf> {
    let key = KeyPair::generate()?;
    let cert = leaf_params(id, extra, validity)?.signed_by(&key, issuer)?;
    let cert_pem = cert.pem();
    let key_pem = key.serialize_pem();
    create_folder(
        folder,
        &[
            (CA_FILE, ca_pem, 0o644),
            (CERT_FILE, cert_pem.as_bytes(), 0o644),
            (KEY_FILE, key_pem.as_bytes(), 0o600),
        ],
    )
}

fn ia5(s: &str) -> Result<Ia5String> {
    Ia5String::try_from(s.to_string()).map_err(|_| Error::invalid("name", s, "not ASCII"))
}

/// Extra subject alternative names: IP addresses, else host names (letters, digits, hyphens,
/// dots; no wildcards).
fn parse_sans(sans: &[String]) -> Result<Vec<SanType>> {
    sans.iter()
        .map(|s| {
            if let Ok(ip) = s.parse::<IpAddr>() {
                Ok(SanType::IpAddress(ip))
            } else if valid_hostname(s) {
                ia5(&s.to_ascii_lowercase()).map(SanType::DnsName)
            } else {
                Err(Error::invalid(
                    "extra name",
                    s,
                    "expected an IP address or a host name (letters, digits, '-' and '.')",
                ))
            }
        })
        .collect()
}

/// A host name a TLS client can verify: labels of 1-63 letters, digits and hyphens (not at
/// either end), at most 253 characters, and a last label that is not all digits.
pub(crate) fn valid_hostname(s: &str) -> bool {
    if s.is_empty() || s.len() > 253 {
        return false;
    }
    let labels: Vec<&str> = s.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    labels.iter().all(label_ok)
        && !labels
            .last()
            .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
}

fn to_offset(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

pub(crate) fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

fn refuse_existing(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(_) => Err(Error::Exists(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Creates `folder` (mode 0700) holding `files`, atomically: everything is written into a
/// temporary sibling folder, each file through a temporary name, fsynced and renamed, then the
/// folder is renamed into place without ever replacing an existing one.
fn create_folder(folder: &Path, files: &[(&str, &[u8], u32)]) -> Result<PathBuf> {
    let parent = match folder.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let base = folder
        .file_name()
        .ok_or_else(|| Error::Config(format!("{} is not a folder name", folder.display())))?
        .to_string_lossy()
        .into_owned();
    refuse_existing(folder)?;
    let tmp = parent.join(format!(".{base}.tmp-{}-{}", std::process::id(), nanos()));
    DirBuilder::new()
        .mode(0o700)
        .create(&tmp)
        .map_err(|e| Error::io(&tmp, e))?;
    let result = (|| {
        for (name, data, mode) in files {
            write_file_atomic(&tmp, name, data, *mode)?;
        }
        sync_dir(&tmp)?;
        rename_noreplace(&tmp, folder).map_err(|e| {
            let errno = e.raw_os_error().map(rustix::io::Errno::from_raw_os_error);
            if matches!(
                errno,
                Some(rustix::io::Errno::EXIST | rustix::io::Errno::NOTEMPTY)
            ) || e.kind() == io::ErrorKind::AlreadyExists
            {
                Error::Exists(folder.to_path_buf())
            } else {
                Error::io(folder, e)
            }
        })?;
        sync_dir(parent)
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result.map(|()| folder.to_path_buf())
}

/// Writes `dir/name` through a temporary file: create exclusively with `mode`, write, fsync,
/// rename over the final name. The caller fsyncs `dir`.
fn write_file_atomic(dir: &Path, name: &str, data: &[u8], mode: u32) -> Result<()> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp-{}-{}", std::process::id(), nanos()));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask can only clear bits; set them exactly anyway.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, &path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(dir, e))
}

fn nanos() -> u128 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// `rename` that fails instead of replacing an existing target (`renameat2(RENAME_NOREPLACE)`
/// on Linux; where the file system lacks it, check then rename).
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    use rustix::io::Errno;
    match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
        Ok(()) => return Ok(()),
        Err(Errno::INVAL | Errno::NOSYS) => {}
        Err(e) => return Err(e.into()),
    }
    if fs::symlink_metadata(to).is_ok() {
        return Err(io::Error::from(io::ErrorKind::AlreadyExists));
    }
    fs::rename(from, to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names() {
        for ok in ["localhost", "a.example.com", "agent-n1", "n1", "x-1.y"] {
            assert!(valid_hostname(ok), "{ok:?}");
        }
        for bad in [
            "",
            "1",
            "10.0.0.300",
            "-a",
            "a-",
            "a..b",
            "*.example.com",
            "a_b",
            "a b",
            "é",
            &"a".repeat(64),
        ] {
            assert!(!valid_hostname(bad), "{bad:?} must be refused");
        }
    }

    #[test]
    fn extra_names_parse_as_ip_or_dns() {
        let sans = parse_sans(&["10.0.0.5".into(), "::1".into(), "Node1.Example".into()]).unwrap();
        assert_eq!(sans[0], SanType::IpAddress("10.0.0.5".parse().unwrap()));
        assert_eq!(sans[1], SanType::IpAddress("::1".parse().unwrap()));
        assert_eq!(
            sans[2],
            SanType::DnsName(Ia5String::try_from("node1.example").unwrap())
        );
        for bad in ["a/b", "*.x", "", "http://x"] {
            assert!(parse_sans(&[bad.to_string()]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn validity_must_not_be_empty() {
        let now = SystemTime::now();
        assert!(Validity::between(now, now).check().is_err());
        assert!(Validity::days(1).check().is_ok());
    }
}
