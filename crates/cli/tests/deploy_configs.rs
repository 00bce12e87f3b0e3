//! The example configs in deploy/ parse with the daemons' own config parsers, so the examples
//! cannot drift from the accepted keys.

use std::path::Path;

fn read(rel: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy")
        .join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

#[test]
fn agent_example_parses() {
    let c = orch_agent::AgentFileConfig::parse(&read("config/agent.toml")).expect("agent.toml");
    assert_eq!(c.node_id.as_deref(), Some("n1"));
    assert_eq!(c.coordinator.len(), 3);
    assert_eq!(c.label.get("zone").map(String::as_str), Some("eu-1"));
    // The example runs mutual TLS, not plain text.
    assert!(c.tls_dir.is_some());
    assert_eq!(c.insecure, None);
}

#[test]
fn coordinator_example_parses() {
    let c = orch_coordinator::CoordinatorFileConfig::parse(&read("config/coordinator.toml"))
        .expect("coordinator.toml");
    assert_eq!(c.id, Some(1));
    for p in &c.peer {
        orch_coordinator::parse_peer(p).expect("peer entry");
    }
    assert!(c.tls_dir.is_some());
    assert_eq!(c.insecure, None);
    assert_eq!(c.retain_rollouts, Some(100));
}

#[test]
fn tls_keys_parse() {
    let c = orch_agent::AgentFileConfig::parse(
        "ca = \"/a\"\ncert = \"/b\"\nkey = \"/c\"\ninsecure = true\ninsecure-allow-remote = true\n",
    )
    .unwrap();
    assert_eq!(c.key.as_deref(), Some(std::path::Path::new("/c")));
    assert_eq!(c.insecure_allow_remote, Some(true));
    let c = orch_coordinator::CoordinatorFileConfig::parse("tls-dir = \"/t\"\n").unwrap();
    assert_eq!(c.tls_dir.as_deref(), Some(std::path::Path::new("/t")));
}

#[test]
fn unknown_keys_are_refused() {
    assert!(orch_agent::AgentFileConfig::parse("node-id = \"n1\"\nnode_idd = 1\n").is_err());
    assert!(orch_coordinator::CoordinatorFileConfig::parse("idd = 1\n").is_err());
}
