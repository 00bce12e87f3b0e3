//! Certificate creation, file layout, and loading checks.

use std::fs;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use orch_tls::{
    COORDINATOR_DOMAIN, DEFAULT_CA_DAYS, Error, InitOptions, IssueOptions, Role, TlsFiles,
    Validity, init, init_with, issue, issue_with,
};
use x509_parser::extensions::GeneralName;

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

struct Sans {
    dns: Vec<String>,
    ips: Vec<IpAddr>,
    uris: Vec<String>,
    server_auth: bool,
    client_auth: bool,
}

fn sans_of(cert_pem: &Path) -> Sans {
    let pem = fs::read(cert_pem).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let cert = pem.parse_x509().unwrap();
    let mut s = Sans {
        dns: vec![],
        ips: vec![],
        uris: vec![],
        server_auth: false,
        client_auth: false,
    };
    for g in &cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
    {
        match g {
            GeneralName::DNSName(d) => s.dns.push(d.to_string()),
            GeneralName::URI(u) => s.uris.push(u.to_string()),
            GeneralName::IPAddress(b) => s.ips.push(match b.len() {
                4 => IpAddr::from(<[u8; 4]>::try_from(*b).unwrap()),
                _ => IpAddr::from(<[u8; 16]>::try_from(*b).unwrap()),
            }),
            _ => {}
        }
    }
    if let Some(eku) = cert.extended_key_usage().unwrap() {
        s.server_auth = eku.value.server_auth;
        s.client_auth = eku.value.client_auth;
        assert!(!eku.value.any);
    }
    s
}

#[test]
fn init_writes_one_folder_per_party_with_private_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs");
    let created = init(&dir, 2, &strings(&["n1", "n2"]), &strings(&["alice"])).unwrap();
    let expected = [
        "ca",
        "coordinator-1",
        "coordinator-2",
        "agent-n1",
        "agent-n2",
        "operator-alice",
    ];
    assert_eq!(
        created,
        expected.iter().map(|e| dir.join(e)).collect::<Vec<_>>()
    );
    let mut sorted: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    sorted.sort();
    assert_eq!(names(&dir), sorted, "no temporary files left behind");
    assert_eq!(mode(&dir), 0o700);

    assert_eq!(names(&dir.join("ca")), ["ca-key.pem", "ca.pem"]);
    assert_eq!(mode(&dir.join("ca/ca-key.pem")), 0o600);
    assert_eq!(mode(&dir.join("ca")), 0o700);
    let ca_pem = fs::read(dir.join("ca/ca.pem")).unwrap();

    for party in &expected[1..] {
        let folder = dir.join(party);
        assert_eq!(names(&folder), ["ca.pem", "cert.pem", "key.pem"], "{party}");
        assert_eq!(mode(&folder.join("key.pem")), 0o600, "{party}");
        assert_eq!(mode(&folder), 0o700, "{party}");
        assert_eq!(fs::read(folder.join("ca.pem")).unwrap(), ca_pem);
        let m = TlsFiles::from_dir(&folder).load().unwrap();
        assert_eq!(m.identity().party(), *party);
        assert_eq!(m.ca_count(), 1);
        let left = m
            .not_after()
            .duration_since(SystemTime::now())
            .unwrap()
            .as_secs();
        assert!((364 * 86400..=366 * 86400).contains(&left), "{left}");
    }

    let c1 = sans_of(&dir.join("coordinator-1/cert.pem"));
    assert_eq!(c1.uris, ["orchestrator://role/coordinator/1"]);
    for d in ["localhost", "coordinator-1", COORDINATOR_DOMAIN] {
        assert!(c1.dns.contains(&d.to_string()), "{d} in {:?}", c1.dns);
    }
    assert!(
        !c1.dns.contains(&"1".to_string()),
        "all-digit names are not host names"
    );
    assert!(c1.ips.contains(&"127.0.0.1".parse().unwrap()));
    assert!(c1.server_auth && c1.client_auth);

    let a1 = sans_of(&dir.join("agent-n1/cert.pem"));
    assert_eq!(a1.uris, ["orchestrator://role/agent/n1"]);
    for d in ["localhost", "agent-n1", "n1"] {
        assert!(a1.dns.contains(&d.to_string()), "{d} in {:?}", a1.dns);
    }
    assert!(!a1.dns.contains(&COORDINATOR_DOMAIN.to_string()));
    assert!(a1.server_auth && a1.client_auth);

    let op = sans_of(&dir.join("operator-alice/cert.pem"));
    assert_eq!(op.uris, ["orchestrator://role/operator/alice"]);
    assert!(op.dns.is_empty() && op.ips.is_empty());
    assert!(op.client_auth && !op.server_auth);
}

#[test]
fn issue_adds_parties_signed_by_the_stored_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    init(dir, 1, &[], &[]).unwrap();

    let n3 = issue(
        dir,
        Role::Agent,
        "n3",
        &strings(&["10.0.0.3", "Node3.Example"]),
    )
    .unwrap();
    assert_eq!(n3, dir.join("agent-n3"));
    assert_eq!(mode(&n3.join("key.pem")), 0o600);
    let s = sans_of(&n3.join("cert.pem"));
    assert!(s.ips.contains(&"10.0.0.3".parse().unwrap()));
    assert!(s.dns.contains(&"node3.example".to_string()));
    assert_eq!(
        TlsFiles::from_dir(&n3)
            .load()
            .unwrap()
            .identity()
            .to_string(),
        "agent n3"
    );

    let viewer = issue(dir, Role::Viewer, "grafana", &[]).unwrap();
    let s = sans_of(&viewer.join("cert.pem"));
    assert_eq!(s.uris, ["orchestrator://role/viewer/grafana"]);
    assert!(s.client_auth && !s.server_auth);

    // Rotation: a new certificate for the same party, into a new folder.
    let out = dir.join("agent-n3.2027");
    let rotated = issue_with(
        dir,
        Role::Agent,
        "n3",
        &IssueOptions {
            out: Some(out.clone()),
            ..IssueOptions::default()
        },
    )
    .unwrap();
    assert_eq!(rotated, out);
    assert_ne!(
        fs::read(out.join("key.pem")).unwrap(),
        fs::read(n3.join("key.pem")).unwrap()
    );
    assert_eq!(
        TlsFiles::from_dir(&out).load().unwrap().identity().party(),
        "agent-n3"
    );

    // Client-only roles take no host names; certificates may not outlive the CA.
    let e = issue(dir, Role::Operator, "bob", &strings(&["host"])).unwrap_err();
    assert!(e.to_string().contains("client-only"), "{e}");
    let e = issue_with(
        dir,
        Role::Agent,
        "n9",
        &IssueOptions {
            validity: Validity::days(DEFAULT_CA_DAYS + 30),
            ..IssueOptions::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("outlive the CA"), "{e}");
    let e = issue(dir, Role::Agent, "../n9", &[]).unwrap_err();
    assert!(matches!(e, Error::Invalid { what: "name", .. }), "{e}");
    assert!(!dir.join("agent-n9").exists());
}

#[test]
fn existing_folders_are_never_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    init(dir, 1, &strings(&["n1"]), &[]).unwrap();
    let ca_before = fs::read(dir.join("ca/ca-key.pem")).unwrap();
    let key_before = fs::read(dir.join("agent-n1/key.pem")).unwrap();

    let e = init(dir, 1, &[], &[]).unwrap_err();
    assert!(
        matches!(&e, Error::Exists(p) if p == &dir.join("ca")),
        "{e}"
    );
    assert!(e.to_string().contains("refusing to overwrite"), "{e}");
    let e = issue(dir, Role::Agent, "n1", &[]).unwrap_err();
    assert!(
        matches!(&e, Error::Exists(p) if p == &dir.join("agent-n1")),
        "{e}"
    );
    let e = issue_with(
        dir,
        Role::Agent,
        "n2",
        &IssueOptions {
            out: Some(dir.join("coordinator-1")),
            ..IssueOptions::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e, Error::Exists(_)), "{e}");
    assert_eq!(fs::read(dir.join("ca/ca-key.pem")).unwrap(), ca_before);
    assert_eq!(fs::read(dir.join("agent-n1/key.pem")).unwrap(), key_before);

    // A fresh directory with only a party folder in the way: nothing at all is written.
    let other = tmp.path().join("other");
    fs::create_dir_all(other.join("operator-alice")).unwrap();
    let e = init(&other, 1, &[], &strings(&["alice"])).unwrap_err();
    assert!(
        matches!(&e, Error::Exists(p) if p == &other.join("operator-alice")),
        "{e}"
    );
    assert_eq!(names(&other), ["operator-alice"]);
}

#[test]
fn init_validates_everything_before_writing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs");
    for (agents, operators, sans) in [
        (strings(&["n1", "bad/name"]), vec![], vec![]),
        (strings(&["-n1"]), vec![], vec![]),
        (vec![], strings(&[""]), vec![]),
        (vec![], strings(&[&"a".repeat(65)]), vec![]),
        (strings(&["n1", "n1"]), vec![], vec![]),
        (strings(&["n1"]), vec![], strings(&["*.example.com"])),
    ] {
        let e = init_with(
            &dir,
            &InitOptions {
                coordinators: 1,
                agents: agents.clone(),
                operators: operators.clone(),
                node_sans: sans.clone(),
                ..InitOptions::default()
            },
        )
        .unwrap_err();
        assert!(!e.to_string().is_empty());
        assert!(!dir.exists(), "{agents:?} {operators:?} {sans:?}: {e}");
    }

    let e = init_with(
        &dir,
        &InitOptions {
            validity: Validity::days(30),
            ca_validity: Validity::days(10),
            ..InitOptions::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("outlive the CA"), "{e}");
    assert!(!dir.exists());

    // node_sans go on coordinator and agent certificates, not on operators'.
    init_with(
        &dir,
        &InitOptions {
            coordinators: 1,
            agents: strings(&["n1"]),
            operators: strings(&["alice"]),
            viewers: strings(&["grafana"]),
            node_sans: strings(&["10.1.2.3", "cluster.example"]),
            ..InitOptions::default()
        },
    )
    .unwrap();
    for node in ["coordinator-1", "agent-n1"] {
        let s = sans_of(&dir.join(node).join("cert.pem"));
        assert!(s.ips.contains(&"10.1.2.3".parse().unwrap()), "{node}");
        assert!(s.dns.contains(&"cluster.example".to_string()), "{node}");
    }
    assert!(sans_of(&dir.join("operator-alice/cert.pem")).dns.is_empty());
    assert!(dir.join("viewer-grafana/key.pem").exists());
}

#[test]
fn loading_refuses_broken_or_mismatched_files() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    init(&a, 1, &strings(&["n1"]), &strings(&["alice"])).unwrap();
    init(&b, 1, &[], &[]).unwrap();
    let ok = TlsFiles::from_dir(&a.join("agent-n1"));
    ok.load().unwrap();
    let err = |files: &TlsFiles| files.load().unwrap_err().to_string();

    // A key readable by others.
    let loose = tmp.path().join("loose.pem");
    fs::copy(&ok.key, &loose).unwrap();
    fs::set_permissions(&loose, fs::Permissions::from_mode(0o644)).unwrap();
    let e = err(&TlsFiles {
        key: loose,
        ..ok.clone()
    });
    assert!(e.contains("chmod 600"), "{e}");

    // Another party's key.
    let e = err(&TlsFiles {
        key: a.join("operator-alice/key.pem"),
        ..ok.clone()
    });
    assert!(e.contains("does not belong"), "{e}");

    // A certificate from another CA.
    let e = err(&TlsFiles {
        cert: b.join("coordinator-1/cert.pem"),
        key: b.join("coordinator-1/key.pem"),
        ..ok.clone()
    });
    assert!(e.contains("not signed by any CA"), "{e}");

    // cert.pem given as the CA; a key in a certificate file.
    let e = err(&TlsFiles {
        ca: ok.cert.clone(),
        ..ok.clone()
    });
    assert!(e.contains("not a CA certificate"), "{e}");
    let e = err(&TlsFiles {
        cert: ok.key.clone(),
        ..ok.clone()
    });
    assert!(e.contains("PRIVATE KEY block"), "{e}");
    let e = err(&TlsFiles {
        ca: tmp.path().join("missing.pem"),
        ..ok.clone()
    });
    assert!(e.contains("missing.pem"), "{e}");

    // An expired certificate.
    let now = SystemTime::now();
    let expired = issue_with(
        &a,
        Role::Agent,
        "old",
        &IssueOptions {
            validity: Validity::between(
                now - Duration::from_secs(10 * 86400),
                now - Duration::from_secs(86400),
            ),
            ..IssueOptions::default()
        },
    )
    .unwrap();
    let e = err(&TlsFiles::from_dir(&expired));
    assert!(e.contains("expired"), "{e}");

    // Operators and viewers cannot serve.
    let op = TlsFiles::from_dir(&a.join("operator-alice"));
    let e = orch_tls::server_config(&op).unwrap_err().to_string();
    assert!(e.contains("operator alice"), "{e}");
    orch_tls::client_config(&op, COORDINATOR_DOMAIN).unwrap();
    orch_tls::server_config(&ok).unwrap();

    // A CA bundle (rotation overlap) holds several CAs; either may have signed the cert.
    let bundle = tmp.path().join("bundle.pem");
    let mut pem = fs::read(b.join("ca/ca.pem")).unwrap();
    pem.extend(fs::read(a.join("ca/ca.pem")).unwrap());
    fs::write(&bundle, pem).unwrap();
    let m = TlsFiles {
        ca: bundle,
        ..ok.clone()
    }
    .load()
    .unwrap();
    assert_eq!(m.ca_count(), 2);
    assert!(!format!("{m:?}").contains("PRIVATE"));
}
