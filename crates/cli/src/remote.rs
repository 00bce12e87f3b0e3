//! `orchestrator node ... --agent ADDR`: the same commands, output and exit codes as the local
//! ones, performed by the node's agent over gRPC (a `--package` is streamed to it first).

use std::io::Read;
use std::path::Path;

use anyhow::{Result, anyhow, bail};
use orch_proto::agent::{self as pb, agent_client::AgentClient};
use orch_release::package;
use orch_tls::{Role, Security, party_domain};
use orch_types::{Version, VersionEntry};
use tonic::transport::Channel;

use crate::args::{NodeCmd, PackageTarget};
use crate::output::{opt_str, print_messages, print_root_dir, print_versions};

const CHUNK: usize = 256 << 10;

/// How long a live agent may take to answer a trivial request.
const RESPONSIVE_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Largest message exchanged with the agent (push chunks are 256 KiB).
const MAX_MESSAGE_BYTES: usize = 16 << 20;

pub fn run(
    addr: &str,
    node_id: Option<&str>,
    security: &Security,
    cmd: NodeCmd,
    json: bool,
) -> Result<()> {
    // Under mutual TLS the agent's certificate must name the node we mean: dial it as
    // `agent-<id>`. Certificates carry no "any agent" name, so the id is required.
    let domain = match (security, node_id) {
        (_, Some(id)) => {
            orch_tls::validate_name(id).map_err(|e| anyhow!("--node-id: {e}"))?;
            party_domain(Role::Agent, id)
        }
        (Security::Insecure, None) => String::new(),
        (Security::Mtls(_), None) => bail!(
            "--agent under mutual TLS needs --node-id ID: the node id the agent's certificate names"
        ),
    };
    let endpoint = security
        .endpoint(addr, &domain)
        .map_err(|e| anyhow!("agent at {addr}: {e}"))?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(run_async(addr, endpoint, cmd, json))
}

/// One line for the operator: the agent's message, without gRPC decoration.
fn status_msg(addr: &str, s: tonic::Status) -> anyhow::Error {
    match s.code() {
        tonic::Code::Unavailable if s.metadata().get("orch-error").is_none() => {
            anyhow!("cannot reach the agent at {addr}: {}", s.message())
        }
        _ => anyhow!("{}", s.message()),
    }
}

async fn run_async(
    addr: &str,
    endpoint: tonic::transport::Endpoint,
    cmd: NodeCmd,
    json: bool,
) -> Result<()> {
    let mut c = connect(addr, endpoint).await?;
    let info = responsive(&mut c, addr).await?;
    let e = |s| status_msg(addr, s);
    match cmd {
        NodeCmd::Versions => {
            let r = c
                .versions(pb::VersionsRequest {})
                .await
                .map_err(e)?
                .into_inner();
            let entries = r
                .versions
                .iter()
                .map(VersionEntry::try_from)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|err| anyhow!("agent at {addr} sent an invalid listing: {err}"))?;
            print_versions(&entries, json)?;
        }
        NodeCmd::RootDir => print_root_dir(&info.root_dir, json),
        NodeCmd::Health { expect } => health(&mut c, addr, expect, json).await?,
        NodeCmd::Rebind { cluster_id } => {
            let r = c
                .rebind(pb::RebindRequest {
                    cluster_id: cluster_id.unwrap_or_default(),
                })
                .await
                .map_err(e)?
                .into_inner();
            if json {
                let v = serde_json::json!({
                    "node_id": info.node_id,
                    "cluster_id": opt_str(&r.cluster_id),
                    "previous_cluster_id": opt_str(&r.previous_cluster_id),
                });
                println!("{v}");
            } else {
                println!("{}", rebind_message(&info.node_id, &r));
            }
        }
        NodeCmd::Prune { keep, force } => {
            crate::prune::remote(&mut c, addr, keep, force.force, json).await?
        }
        step => {
            let (messages, notes) = step_cmd(&mut c, addr, step).await?;
            print_messages(&messages, &notes, json)
        }
    }
    Ok(())
}

/// A channel to the agent, with deadlines that fit its longest legitimate steps.
async fn connect(addr: &str, endpoint: tonic::transport::Endpoint) -> Result<AgentClient<Channel>> {
    let channel = endpoint
        .connect_timeout(std::time::Duration::from_secs(5))
        // A wedged agent must not hang the operator forever; activation may take its 60s.
        .timeout(std::time::Duration::from_secs(150))
        .http2_keep_alive_interval(std::time::Duration::from_secs(10))
        .keep_alive_timeout(std::time::Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| {
            anyhow!(
                "cannot reach the agent at {addr}: {}",
                orch_tls::connect_error(&e)
            )
        })?;
    Ok(AgentClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// The agent's identity, asked first with a short deadline. The per-call deadline is sized for
/// legitimately long steps (a 4 GiB push, a 60 s activation), but a frozen agent still has its
/// connections accepted by the kernel: one that does not answer this is reported within seconds.
async fn responsive(c: &mut AgentClient<Channel>, addr: &str) -> Result<pb::NodeInfoReply> {
    match tokio::time::timeout(RESPONSIVE_WITHIN, c.node_info(pb::NodeInfoRequest {})).await {
        Ok(Ok(info)) => Ok(info.into_inner()),
        Ok(Err(s)) => Err(status_msg(addr, s)),
        Err(_) => bail!(
            "the agent at {addr} accepted the connection but did not answer within {}s: it is stopped, overloaded or hung; check its process and logs",
            RESPONSIVE_WITHIN.as_secs()
        ),
    }
}

/// `node health --agent`: prints the verdict; an unhealthy node is an error.
async fn health(
    c: &mut AgentClient<Channel>,
    addr: &str,
    expect: Option<Version>,
    json: bool,
) -> Result<()> {
    let r = c
        .health(pb::HealthRequest {
            expect_version: expect.map(|v| v.to_string()).unwrap_or_default(),
        })
        .await
        .map_err(|s| status_msg(addr, s))?
        .into_inner();
    let reported = if r.reported_version.is_empty() {
        String::new()
    } else {
        format!(", reports {}", r.reported_version)
    };
    if json {
        let v = serde_json::json!({
            "healthy": r.healthy,
            "check": r.check,
            "reported_version": opt_str(&r.reported_version),
            "detail": r.detail,
        });
        println!("{v}");
    }
    if r.healthy {
        if json {
            return Ok(());
        }
        println!("healthy ({} check{reported}): {}", r.check, r.detail);
        return Ok(());
    }
    bail!("unhealthy ({} check{reported}): {}", r.check, r.detail);
}

/// A step on the node's store (pushing `--package` first); returns its EMQX lines (stdout)
/// and its notes (stderr).
async fn step_cmd(
    c: &mut AgentClient<Channel>,
    addr: &str,
    cmd: NodeCmd,
) -> Result<(Vec<String>, Vec<String>)> {
    let force = cmd.force();
    let reply = match cmd {
        NodeCmd::Unpack(t) => {
            let v = push_if_needed(c, addr, &t).await?;
            c.unpack(pb::UnpackRequest {
                version: v.to_string(),
                fence: None,
                expected_sha256: remote_digest(&t),
                force,
            })
            .await
        }
        NodeCmd::Install(a) | NodeCmd::Upgrade(a) => {
            let v = push_if_needed(c, addr, &a.target).await?;
            c.install(pb::InstallRequest {
                version: v.to_string(),
                permanent: !a.no_permanent,
                fence: None,
                expected_sha256: remote_digest(&a.target),
                force,
            })
            .await
        }
        NodeCmd::Permanent { version, .. } => c.permanent(vreq(version, force)).await,
        NodeCmd::Downgrade { version, .. } => c.downgrade(vreq(version, force)).await,
        NodeCmd::Uninstall { version, .. } => c.uninstall(vreq(version, force)).await,
        NodeCmd::Versions
        | NodeCmd::RootDir
        | NodeCmd::Health { .. }
        | NodeCmd::Rebind { .. }
        | NodeCmd::Prune { .. } => {
            return Ok((Vec::new(), Vec::new()));
        }
    };
    let r = reply.map_err(|s| status_msg(addr, s))?.into_inner();
    Ok((r.messages, r.notes))
}

fn vreq(v: Version, force: bool) -> pb::VersionRequest {
    pb::VersionRequest {
        version: v.to_string(),
        fence: None,
        force,
    }
}

/// What a rebind did, in one line.
fn rebind_message(node: &str, r: &pb::RebindReply) -> String {
    let (old, new) = (r.previous_cluster_id.as_str(), r.cluster_id.as_str());
    match (old.is_empty(), new.is_empty()) {
        _ if old == new && new.is_empty() => format!(
            "Node {node} is not bound to a cluster; nothing to do: the next coordinator cluster to fence it binds it"
        ),
        _ if old == new => format!("Node {node} already belongs to cluster {new}; nothing to do"),
        (false, true) => format!(
            "Node {node} unbound from cluster {old}: the next coordinator cluster to fence it binds it"
        ),
        (true, false) => format!("Node {node} bound to cluster {new} (it was not bound)"),
        _ => format!("Node {node} moved from cluster {old} to cluster {new}"),
    }
}

/// The digest the agent must check: `--sha256` for a package already on the node. A pushed
/// package was checked here and arrived under its digest, so nothing more is asked.
fn remote_digest(t: &PackageTarget) -> String {
    match (&t.package, &t.sha256) {
        (None, Some(d)) => d.clone(),
        _ => String::new(),
    }
}

/// With `--package FILE`, streams it to the agent and returns its version; otherwise the
/// version names a package already in the node's releases directory.
async fn push_if_needed(
    c: &mut AgentClient<Channel>,
    addr: &str,
    t: &PackageTarget,
) -> Result<Version> {
    let Some(path) = &t.package else {
        // The package is in the node's releases/; the agent checks --sha256 against it.
        return t
            .version
            .ok_or_else(|| anyhow!("give a VERSION or --package FILE"));
    };
    // The same checks, in the same order and words, as the local store.
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let (name, version) = package::file_identity(path)?;
    if let Some(v) = t.version
        && v != version
    {
        bail!("version {v} was given but the package {file_name} holds {version}");
    }
    let (digest, size) = package::digest_checked(path, t.sha256.as_deref())?;
    // FILE.sig, when present, travels with the package (agents with trusted keys need it).
    let signature = orch_release::signing::read_sig(path)?.unwrap_or_default();
    let force = t.force.force;
    push(c, path, &name, version, &digest, size, signature, force)
        .await
        .map_err(|s| status_msg(addr, s))?;
    Ok(version)
}

/// Streams a package in chunks read on the blocking pool. The agent may answer before the end
/// (it already holds the package): the reply then comes at once, the request stream is
/// dropped, and the reader stops at its next send.
#[allow(clippy::too_many_arguments)]
pub async fn push(
    c: &mut AgentClient<Channel>,
    path: &Path,
    name: &str,
    version: Version,
    sha256: &str,
    size: u64,
    signature: Vec<u8>,
    force: bool,
) -> Result<pb::PushReply, tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::PackageChunk>(4);
    let header = pb::PackageHeader {
        chunks: Vec::new(),
        sent: Vec::new(),
        peers: Vec::new(),
        name: name.to_string(),
        version: version.to_string(),
        sha256: sha256.to_string(),
        size,
        fence: None,
        signature,
        force,
    };
    let path = path.to_path_buf();
    let reader = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let mut f = std::fs::File::open(&path)?;
        let mut header = Some(header);
        loop {
            let mut buf = vec![0u8; CHUNK];
            let n = f.read(&mut buf)?;
            buf.truncate(n);
            if n == 0 && header.is_none() {
                return Ok(());
            }
            let chunk = pb::PackageChunk {
                header: header.take(),
                data: buf,
            };
            if tx.blocking_send(chunk).is_err() || n == 0 {
                return Ok(());
            }
        }
    });
    let reply = c
        .push_package(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    match reader.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(tonic::Status::internal(format!("reading the package: {e}"))),
        Err(e) => return Err(tonic::Status::internal(format!("reading the package: {e}"))),
    }
    reply.map(|r| r.into_inner())
}
