//! `orchestrator demo`: a self-contained walk-through on this machine. For now it drives one
//! node's release store through the EMQX hot-upgrade guide with a real activation hook; it grows
//! into the all-local cluster demo as the agent and coordinators land.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, Result};
use orch_release::{PackageSource, Store, StoreConfig, package};
use orch_types::{Version, format_versions};

use crate::args::DemoArgs;

const HOOK: &str = "#!/bin/sh\n# Demo activation: record which release the (pretend) service now runs.\n\
echo \"$2\" > \"$ORCH_ROOT_DIR/running-version\"\n";

pub fn run(args: DemoArgs) -> Result<()> {
    let tmp;
    let base = match args.dir {
        Some(d) => {
            fs::create_dir_all(&d).with_context(|| format!("create {}", d.display()))?;
            d
        }
        None => {
            tmp = std::env::temp_dir().join(format!("orchestrator-demo-{}", std::process::id()));
            fs::create_dir_all(&tmp)?;
            tmp
        }
    };
    let root = base.join("node1");
    let releases = root.join("releases");
    fs::create_dir_all(&releases)?;
    for v in ["4.2.0", "4.2.1"] {
        build_release(&base, v.parse()?, &releases)?;
    }
    let store = Store::open(StoreConfig::new(&root))?;
    println!("Demo node root: {}\n", root.display());

    let v0: Version = "4.2.0".parse()?;
    let v1: Version = "4.2.1".parse()?;
    step(&store, "upgrade 4.2.0", || {
        store.install(&PackageSource::Lookup(v0), true)
    })?;
    step(&store, "upgrade --no-permanent 4.2.1", || {
        store.install(&PackageSource::Lookup(v1), false)
    })?;
    step(&store, "install 4.2.1", || {
        store.install(&PackageSource::Lookup(v1), true)
    })?;
    step(&store, "downgrade 4.2.0", || store.downgrade(v0))?;
    step(&store, "uninstall 4.2.1", || store.uninstall(v1))?;
    let running = fs::read_to_string(root.join("running-version")).unwrap_or_default();
    println!("The service now runs: {}", running.trim());
    println!(
        "\nTry it yourself: orchestrator node versions --root-dir {}",
        root.display()
    );
    Ok(())
}

fn step(
    store: &Store,
    label: &str,
    f: impl FnOnce() -> orch_release::Result<orch_release::Outcome>,
) -> Result<()> {
    println!("$ orchestrator node {label}");
    for line in f()?.messages {
        println!("{line}");
    }
    print!("{}", format_versions(&store.versions()?));
    println!();
    Ok(())
}

fn build_release(base: &Path, v: Version, out: &Path) -> Result<()> {
    let src = base.join(format!("src-{v}"));
    let hooks = src.join("hooks");
    fs::create_dir_all(&hooks)?;
    fs::write(src.join("README"), format!("demo service {v}\n"))?;
    let hook = hooks.join("activate");
    fs::write(&hook, HOOK)?;
    fs::set_permissions(&hook, fs::Permissions::from_mode(0o755))?;
    package::build(&src, "demo", v, out)?;
    fs::remove_dir_all(&src)?;
    Ok(())
}
