//! `orchestrator agent`: builds the agent's config from flags and/or a TOML file (flags win)
//! and runs the daemon until SIGTERM or Ctrl-C.

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow, bail};
use orch_agent::{AgentConfig, AgentFileConfig, DriverKind};

use crate::args::{AgentArgs, parse_duration};

pub fn run(a: AgentArgs) -> Result<()> {
    let file = crate::daemon::read_config(a.config.as_deref(), AgentFileConfig::parse)?;
    let cfg = merge(a, file)?;
    if cfg.security.is_insecure() {
        eprintln!(
            "WARNING: agent {} serves plain-text gRPC on {} (--insecure): anyone who can reach it can change this node's releases",
            cfg.node_id, cfg.listen
        );
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async { orch_agent::run(cfg, crate::daemon::shutdown_signal()).await })?;
    Ok(())
}

fn merge(a: AgentArgs, f: AgentFileConfig) -> Result<AgentConfig> {
    let security = crate::tls::daemon_security(&a.serve.tls, crate::file_tls!(f))?;
    let node_id: orch_types::NodeId = a
        .node_id
        .or(f.node_id)
        .ok_or_else(|| anyhow!("no node id: pass --node-id ID (or node-id in --config)"))?
        .parse()
        .map_err(|e| anyhow!("{e}"))?;
    let root: PathBuf = a.root_dir.or(f.root_dir).ok_or_else(|| {
        anyhow!("no root directory: pass --root-dir DIR (or root-dir in --config)")
    })?;
    let listen = crate::daemon::listen_addr(a.listen, f.listen)?;
    // Checked here too (the daemon checks again) so the refusal comes before anything starts.
    security.check_listen(
        listen,
        a.serve.insecure_allow_remote || f.insecure_allow_remote.unwrap_or(false),
    )?;
    security.expect_identity(orch_tls::Role::Agent, node_id.as_str())?;
    let mut cfg = AgentConfig::new(node_id, root, listen, security);
    cfg.insecure_allow_remote =
        a.serve.insecure_allow_remote || f.insecure_allow_remote.unwrap_or(false);
    cfg.advertise = a.advertise.or(f.advertise);
    cfg.coordinators = if a.coordinators.is_empty() {
        f.coordinator
    } else {
        a.coordinators
    };
    cfg.labels = f.label;
    for kv in a.labels {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow!("--label {kv:?} is not K=V"))?;
        cfg.labels.insert(k.to_string(), v.to_string());
    }
    // The coordinators refuse a registration with such labels; say so now, not in a log loop.
    orch_types::check_labels(cfg.labels.iter()).map_err(|e| anyhow!("--label: {e}"))?;
    cfg.health.url = a.health_url.or(f.health_url);
    if let Some(cmd) = a.health_cmd.or(f.health_cmd) {
        cfg.health.cmd = Some(split("--health-cmd", &cmd)?);
    }
    if let Some(t) = a.health_timeout {
        cfg.health.timeout = t;
    } else if let Some(t) = f.health_timeout {
        cfg.health.timeout = parse_duration(&t).map_err(|e| anyhow!("health-timeout: {e}"))?;
    }
    if let Some(cmd) = a.activate_cmd.or(f.activate_cmd) {
        cfg.activate_cmd = Some(split("--activate-cmd", &cmd)?);
    }
    if let Some(cmd) = a.pre_step_cmd.or(f.pre_step_cmd) {
        cfg.pre_step_cmd = Some(split("--pre-step-cmd", &cmd)?);
    }
    if let Some(cmd) = a.post_step_cmd.or(f.post_step_cmd) {
        cfg.post_step_cmd = Some(split("--post-step-cmd", &cmd)?);
    }
    if let Some(t) = a.activate_timeout {
        cfg.activate_timeout = t;
    } else if let Some(t) = f.activate_timeout {
        cfg.activate_timeout = parse_duration(&t).map_err(|e| anyhow!("activate-timeout: {e}"))?;
    }
    cfg.driver = match a.driver.or(f.driver).as_deref().unwrap_or("native") {
        "native" => DriverKind::Native,
        "emqx" => DriverKind::Emqx {
            bin: a
                .emqx_bin
                .or(f.emqx_bin)
                .ok_or_else(|| anyhow!("--driver emqx needs --emqx-bin PATH (the emqx script)"))?,
        },
        other => bail!("unknown --driver {other:?}: use native or emqx"),
    };
    // The EMQX script switches releases itself: there is no switch to drain around.
    if cfg.driver != DriverKind::Native
        && (cfg.pre_step_cmd.is_some() || cfg.post_step_cmd.is_some())
    {
        bail!(
            "--pre-step-cmd and --post-step-cmd need --driver native (the emqx driver runs no drain hooks); drop them or the driver"
        );
    }
    if let Some(h) = a.serve.http_listen.clone().or(f.http_listen.clone()) {
        cfg.http_listen = Some(
            h.parse()
                .map_err(|_| anyhow!("--http-listen {h:?} is not HOST:PORT"))?,
        );
    }
    cfg.http_public_metrics = a.serve.http_public_metrics || f.http_public_metrics.unwrap_or(false);
    cfg.trusted_keys = if a.serve.trusted_keys.is_empty() {
        f.trusted_key
    } else {
        a.serve.trusted_keys
    };
    Ok(cfg)
}

fn split(flag: &str, cmd: &str) -> Result<Vec<String>> {
    let words =
        shell_words::split(cmd).with_context(|| format!("{flag} is not valid shell words"))?;
    if words.is_empty() {
        bail!("{flag} is empty");
    }
    Ok(words)
}
