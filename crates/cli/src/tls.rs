//! `--tls-dir` / `--ca` / `--cert` / `--key` / `--insecure` into an [`orch_tls::Security`],
//! and `orchestrator certs init|issue`.

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};
use orch_tls::{InitOptions, IssueOptions, Role, Security, Validity};

use serde_json::json;

use crate::args::{CertsCmd, GlobalOpts, TlsArgs};

/// TLS settings a daemon's `--config` file may hold (flags win over them).
#[derive(Debug, Default)]
pub struct FileTls {
    pub tls_dir: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub insecure: Option<bool>,
}

/// The TLS keys of a daemon's `--config` file (agent or coordinator: the same five fields).
#[macro_export]
macro_rules! file_tls {
    ($f:expr) => {
        $crate::tls::FileTls {
            tls_dir: $f.tls_dir.clone(),
            ca: $f.ca.clone(),
            cert: $f.cert.clone(),
            key: $f.key.clone(),
            insecure: $f.insecure,
        }
    };
}

/// A daemon's security: the flags, else the config file's keys; no default folder. Neither TLS
/// files nor `--insecure` is refused, so a daemon never runs plain text by accident.
pub fn daemon_security(t: &TlsArgs, f: FileTls) -> Result<Security> {
    let dir = t.tls_dir.clone().or(f.tls_dir);
    let ca = t.ca.clone().or(f.ca);
    let cert = t.cert.clone().or(f.cert);
    let key = t.key.clone().or(f.key);
    let explicit = dir.is_some() || ca.is_some() || cert.is_some() || key.is_some();
    // A config file's `insecure = true` gives way to TLS files passed as flags.
    let insecure = t.insecure || (f.insecure.unwrap_or(false) && !explicit);
    if !insecure && !explicit {
        bail!(
            "no TLS certificate: pass --tls-dir DIR (a party folder made by `orchestrator certs init`) \
             or --ca, --cert and --key (or tls-dir in --config); --insecure serves plain text on \
             loopback only"
        );
    }
    Ok(Security::resolve(
        insecure,
        dir.as_deref(),
        ca.as_deref(),
        cert.as_deref(),
        key.as_deref(),
    )?)
}

/// A client command's security: the flags, else `$ORCHESTRATOR_TLS_DIR`, else
/// `~/.config/orchestrator/`.
pub fn client_security(t: &TlsArgs) -> Result<Security> {
    let explicit = t.tls_dir.is_some() || t.ca.is_some() || t.cert.is_some() || t.key.is_some();
    if t.insecure || explicit {
        return Ok(Security::resolve(
            t.insecure,
            t.tls_dir.as_deref(),
            t.ca.as_deref(),
            t.cert.as_deref(),
            t.key.as_deref(),
        )?);
    }
    let dir = orch_tls::default_tls_dir().ok_or_else(|| {
        anyhow!(
            "no TLS certificate: pass --tls-dir DIR (a folder made by `orchestrator certs init`), \
             set ORCHESTRATOR_TLS_DIR, or pass --insecure for a plain-text cluster"
        )
    })?;
    if !dir.is_dir() {
        bail!(
            "no TLS certificate: the default folder {} does not exist; pass --tls-dir DIR (a \
             folder made by `orchestrator certs init`, e.g. DIR/operator-NAME), set \
             ORCHESTRATOR_TLS_DIR, or pass --insecure for a plain-text cluster",
            dir.display()
        );
    }
    Ok(Security::resolve(false, Some(&dir), None, None, None)?)
}

pub fn certs(cmd: CertsCmd, g: &GlobalOpts) -> Result<()> {
    match cmd {
        CertsCmd::Init {
            dir,
            coordinators,
            agents,
            operators,
            viewers,
            sans,
            days,
        } => {
            if coordinators == 0 && agents.is_empty() && operators.is_empty() && viewers.is_empty()
            {
                bail!(
                    "nothing to create: give --coordinators N, --agents ID,..., --operators \
                     NAME,... and/or --viewers NAME,..."
                );
            }
            let opts = InitOptions {
                coordinators,
                agents,
                operators,
                viewers,
                node_sans: sans,
                validity: validity(days)?,
                ..InitOptions::default()
            };
            let made = orch_tls::init_with(&dir, &opts)?;
            // The CA folder comes first.
            let (ca, parties) = made
                .split_first()
                .ok_or_else(|| anyhow!("nothing was created"))?;
            if g.json {
                println!("{}", json!({"ca": ca, "parties": parties}));
                return Ok(());
            }
            println!(
                "Created the CA in {} (keep ca-key.pem offline) and {} part{}:",
                ca.display(),
                parties.len(),
                if parties.len() == 1 { "y" } else { "ies" }
            );
            for p in parties {
                println!("  {}", p.display());
            }
            println!("Copy each folder to its party and point it at it with --tls-dir.");
        }
        CertsCmd::Issue {
            dir,
            role,
            name,
            sans,
            out,
            days,
            p12,
            p12_password,
        } => {
            let role: Role = role.parse()?;
            // Checked before the certificate is made, so a missing password leaves no folder.
            let password = match (p12, p12_password) {
                (false, _) => None,
                (true, Some(p)) if !p.is_empty() => Some(p),
                (true, _) => bail!(
                    "--p12 needs a password for the bundle: set ORCH_P12_PASSWORD (or pass --p12-password)"
                ),
            };
            let opts = IssueOptions {
                sans,
                validity: validity(days)?,
                out,
            };
            let made = orch_tls::issue_with(&dir, role, &name, &opts)?;
            let bundle = match &password {
                Some(p) => Some(orch_tls::write_pkcs12(&made, p).with_context(|| {
                    format!(
                        "the certificate is in {}, but its PKCS#12 bundle could not be written",
                        made.display()
                    )
                })?),
                None => None,
            };
            if g.json {
                println!(
                    "{}",
                    json!({"role": role.to_string(), "name": name, "dir": made, "p12": bundle})
                );
            } else {
                println!("Issued {role} {name}: {}", made.display());
                if let Some(b) = &bundle {
                    println!(
                        "PKCS#12 bundle for a browser: {} (import it as a personal certificate, and trust ca.pem)",
                        b.display()
                    );
                }
            }
        }
    }
    Ok(())
}

fn validity(days: u32) -> Result<Validity> {
    if days == 0 {
        bail!("--days must be 1 or more");
    }
    Ok(Validity::days(days))
}
