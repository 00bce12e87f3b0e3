//! `orchestrator node ...`: the EMQX-style commands on a local release store.

use anyhow::{Context, Result, bail};
use orch_release::{Limits, PackageSource, Store, StoreConfig};
use orch_types::parse_package_file_name;

use crate::args::{GlobalOpts, NodeArgs, NodeCmd, PackageTarget};
use crate::output::{print_messages, print_root_dir, print_versions};

pub fn run(args: NodeArgs, g: &GlobalOpts) -> Result<()> {
    if let Some(addr) = &args.agent {
        // Store settings belong to the agent's own configuration; dropping them silently
        // would let an operator believe a limit applied that did not.
        let local_only: Vec<&str> = [
            ("--activate-cmd", args.activate_cmd.is_some()),
            ("--activate-timeout", args.activate_timeout.is_some()),
            ("--lock-timeout", args.lock_timeout.is_some()),
            ("--max-unpacked-bytes", args.max_unpacked_bytes.is_some()),
            ("--max-entries", args.max_entries.is_some()),
            ("--trusted-key", !args.trusted_keys.is_empty()),
        ]
        .into_iter()
        .filter_map(|(flag, given)| given.then_some(flag))
        .collect();
        if !local_only.is_empty() {
            bail!(
                "{} configure{} a local store; with --agent they do not apply: configure the agent instead (its command line or config file), or drop --agent to act on --root-dir",
                local_only.join(", "),
                if local_only.len() == 1 { "s" } else { "" }
            );
        }
        let security = crate::tls::client_security(&args.tls)?;
        return crate::remote::run(addr, args.node_id.as_deref(), &security, args.cmd, g.json);
    }
    if let NodeCmd::Rebind { .. } = args.cmd {
        bail!(
            "rebind moves a node's agent to another coordinator cluster: pass --agent ADDR (a local root directory has no agent)"
        );
    }
    // Holds are the agent's: a local step never checks them, so a --force here would claim
    // an override that does not happen.
    if args.cmd.force() {
        bail!(
            "--force overrides a rollout's hold on a node, which only its agent knows: pass --agent ADDR, or drop --force (a local --root-dir step is not checked against holds)"
        );
    }
    let Some(root) = args.root_dir.clone() else {
        bail!("no root directory: pass --root-dir DIR (or set ORCH_ROOT_DIR) or --agent ADDR");
    };
    if let NodeCmd::RootDir = args.cmd {
        print_root_dir(&root.display().to_string(), g.json);
        return Ok(());
    }
    let mut cfg = StoreConfig::new(root);
    // Unset flags keep the store's defaults (which the flags' help texts quote).
    if let Some(t) = args.activate_timeout {
        cfg.activate_timeout = t;
    }
    if let Some(t) = args.lock_timeout {
        cfg.lock_timeout = t;
    }
    if !args.trusted_keys.is_empty() {
        cfg.trusted_keys = orch_release::TrustedKeys::load(&args.trusted_keys)?;
    }
    let defaults = Limits::default();
    cfg.limits = Limits {
        max_total_bytes: args.max_unpacked_bytes.unwrap_or(defaults.max_total_bytes),
        max_entries: args.max_entries.unwrap_or(defaults.max_entries),
    };
    if let Some(cmd) = &args.activate_cmd {
        let words = shell_words::split(cmd).context("--activate-cmd is not valid shell words")?;
        if words.is_empty() {
            bail!("--activate-cmd is empty");
        }
        cfg.activate_cmd = Some(words);
    }
    let store = Store::open(cfg)?;
    let outcome = match args.cmd {
        NodeCmd::Versions => {
            print_versions(&store.versions()?, g.json)?;
            return Ok(());
        }
        NodeCmd::RootDir | NodeCmd::Rebind { .. } => unreachable!("handled above"),
        NodeCmd::Health { .. } => {
            bail!("health checks run through the node's agent: pass --agent ADDR")
        }
        NodeCmd::Unpack(t) => store.unpack(&source(&store, t)?)?,
        NodeCmd::Install(a) | NodeCmd::Upgrade(a) => {
            store.install(&source(&store, a.target)?, !a.no_permanent)?
        }
        NodeCmd::Permanent { version, .. } => store.make_permanent(version)?,
        NodeCmd::Downgrade { version, .. } => store.downgrade(version)?,
        NodeCmd::Uninstall { version, .. } => store.uninstall(version)?,
        NodeCmd::Prune { keep, .. } => return crate::prune::local(&store, keep, g.json),
    };
    print_messages(&outcome.messages, &outcome.notes, g.json);
    Ok(())
}

/// Turns `VERSION` / `--package FILE` / `--sha256` into a package source.
fn source(store: &Store, t: PackageTarget) -> Result<PackageSource> {
    match (t.version, t.package) {
        (None, None) => bail!("give a VERSION or --package FILE"),
        (version, Some(path)) => {
            let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if let (Some(v), Some((_, pv))) = (version, parse_package_file_name(file_name))
                && v != pv
            {
                bail!("version {v} was given but the package {file_name} holds {pv}");
            }
            Ok(PackageSource::File {
                path,
                sha256: t.sha256,
            })
        }
        (Some(v), None) => Ok(match t.sha256 {
            // An explicit digest needs the file itself.
            Some(d) => PackageSource::File {
                path: store.find_package(v)?,
                sha256: Some(d),
            },
            None => PackageSource::Lookup(v),
        }),
    }
}
