//! `rollout --dry-run`: the plan the coordinators compute with a real preflight, printed as a
//! table (or, with `--json`, the shape in docs/cli-json.md). Nothing is started or uploaded.

use anyhow::Result;
use orch_client::control as pb;
use serde_json::{Value, json};

use crate::exit::Exit;
use crate::output::Paint;

/// The plan as `--json` prints it (documented in docs/cli-json.md).
pub fn plan_json(p: &pb::RolloutPlan) -> Value {
    let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
    json!({
        "dry_run": true,
        "version": p.version,
        "acceptable": p.refusal.is_empty(),
        "refusal": opt(&p.refusal),
        "package": (!p.package.is_empty()).then(|| json!({
            "file": p.package,
            "sha256": p.package_sha256,
            "size": p.package_size,
            "signed": p.package_signed,
        })),
        "batch_size": p.batch_size,
        "policy": crate::output::policy_json(p.policy.as_ref()),
        "canary": p.canary,
        "permanent": p.permanent,
        "on_failure": p.on_failure,
        "nodes": p.nodes.iter().map(|n| json!({
            "id": n.id,
            "from": opt(&n.from_version),
            "to": n.to_version,
            "action": n.action,
            "detail": n.detail,
        })).collect::<Vec<_>>(),
        "batches": p.batches.iter().map(|b| json!({
            "canary": b.canary,
            "nodes": b.nodes,
            "wave": opt(&b.wave),
        })).collect::<Vec<_>>(),
    })
}

/// What a node's action means, in a few words, for the table.
fn action_words(action: &str) -> &str {
    match action {
        "stage" => "stage, install, gate",
        "install" => "install, gate (already on disk)",
        "adopt" => "gate (already runs it)",
        "switch_back" => "downgrade to it, gate",
        "skip" => "skip",
        "refused" => "REFUSED",
        other => other,
    }
}

/// The policy lines of the table: waves, metric gates, selector, max unavailable (each only
/// when given).
fn print_policy(x: &pb::RolloutPolicy) {
    if !x.wave_by.is_empty() {
        let waves: Vec<String> = x
            .waves
            .iter()
            .map(|w| format!("{} ({})", w.label_value, w.nodes.len()))
            .collect();
        println!("waves by {}: {}", x.wave_by, waves.join(", then "));
        if x.promote_each_wave {
            println!("  waiting for `orchestrator promote` after each wave but the last");
        }
    }
    if !x.gates.is_empty() {
        println!(
            "{}",
            crate::output::metric_gates_words(&x.gate_prometheus, &x.gates)
        );
    }
    if !x.selector.is_empty() {
        let mut pairs: Vec<String> = x.selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
        pairs.sort();
        println!("selector {}", pairs.join(","));
    }
    if !x.max_unavailable.is_empty() {
        let unhealthy = if x.unhealthy_at_start.is_empty() {
            "none unhealthy now".to_string()
        } else {
            format!("unhealthy now: {}", x.unhealthy_at_start.join(", "))
        };
        println!(
            "at most {} node(s) unavailable at once ({}; {unhealthy})",
            x.max_unavailable_nodes, x.max_unavailable
        );
    }
}

/// The plan as a table on stdout.
fn print_table(p: &pb::RolloutPlan, paint: Paint) {
    let package = if p.package.is_empty() {
        "no package (the nodes must have it)".to_string()
    } else {
        format!(
            "package {} ({} bytes, sha256 {}, {})",
            p.package,
            p.package_size,
            p.package_sha256,
            if p.package_signed {
                "signed"
            } else {
                "unsigned"
            }
        )
    };
    println!(
        "{} {}: {package}",
        paint.bold("Plan for rollout of"),
        p.version
    );
    let batch = p
        .policy
        .as_ref()
        .map_or_else(|| p.batch_size.to_string(), |x| x.batch.clone());
    println!(
        "batch size {batch}, canary {}, {}, on failure {}",
        p.canary,
        if p.permanent {
            "made permanent at the end"
        } else {
            "not made permanent (--no-permanent)"
        },
        p.on_failure
    );
    if let Some(x) = &p.policy {
        print_policy(x);
    }
    println!();
    let width = p.nodes.iter().map(|n| n.id.len()).max().unwrap_or(4).max(4);
    println!(
        "{:width$}  {:7}  {:7}  {:30}  DETAIL",
        "NODE", "FROM", "TO", "ACTION"
    );
    for n in &p.nodes {
        let from = if n.from_version.is_empty() {
            "?"
        } else {
            &n.from_version
        };
        let action = format!("{:30}", action_words(&n.action));
        let action = match n.action.as_str() {
            "refused" => paint.red(&action),
            "skip" => paint.dim(&action),
            _ => action,
        };
        println!(
            "{:width$}  {from:7}  {:7}  {action}  {}",
            n.id, n.to_version, n.detail
        );
    }
    if !p.batches.is_empty() {
        println!();
        println!("Upgrade order:");
        for (i, b) in p.batches.iter().enumerate() {
            let canary = if b.canary { " (canary)" } else { "" };
            let wave = match p.policy.as_ref().map(|x| x.wave_by.as_str()) {
                Some(label) if !b.wave.is_empty() => format!("wave {label}={}: ", b.wave),
                _ => String::new(),
            };
            println!("  batch {}: {wave}{}{canary}", i + 1, b.nodes.join(", "));
        }
        if p.batches.iter().any(|b| b.canary) {
            println!("  then wait for `orchestrator promote` before the rest");
        }
    }
    println!();
    let skipped = p.nodes.iter().filter(|n| n.action == "skip").count();
    if p.refusal.is_empty() {
        println!(
            "{} {} node(s) to upgrade, {skipped} skipped. Nothing was started.",
            paint.green("The rollout would run:"),
            p.nodes.len() - skipped
        );
    } else {
        println!(
            "{} nothing was started.",
            paint.red("The rollout would be refused:")
        );
    }
}

/// Prints the plan; an error (exit 1) when the rollout would be refused, saying why per node.
pub fn show(p: &pb::RolloutPlan, json: bool, paint: Paint) -> Result<()> {
    if json {
        println!("{}", plan_json(p));
    } else {
        print_table(p, paint);
    }
    if p.refusal.is_empty() {
        Ok(())
    } else {
        Err(Exit::new(
            1,
            "refused",
            format!(
                "dry run: the rollout of {} would be refused: {}",
                p.version, p.refusal
            ),
        )
        .into())
    }
}
