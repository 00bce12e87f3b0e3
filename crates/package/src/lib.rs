//! The package format, shared by every party that handles packages: the node's release store
//! (`orch-release`), the agent and the coordinators. Nothing here knows about zip archives, the
//! release store or its states; the coordinator links this crate and not the store.
//!
//! - [`manifest`]: the `release.toml` at a package's root and the `<name>-<x.y.z>.zip` file name;
//! - [`chunks`]: content-defined chunks of package files, so staging sends only missing bytes;
//! - [`delta`]: a file sent as the chunks the receiver lacks, rebuilt and checked whole;
//! - [`digest`]: SHA-256 digests of package files and their `<file>.sha256` sidecars;
//! - [`signing`]: detached Ed25519 signatures (`<file>.sig`) and the keys that vouch for packages;
//! - [`incoming`]: a file arriving over the network, checked against its announced size and
//!   digest before it becomes visible;
//! - [`verified`]: evidence that a file's digest was checked already, so it is hashed once;
//! - [`fsutil`]: durable file-system primitives (atomic replace, directory fsync).
//!
//! Synchronous and blocking on purpose: async callers run it through `spawn_blocking`.

pub mod chunks;
pub mod delta;
pub mod digest;
pub mod error;
pub mod fsutil;
pub mod incoming;
pub mod manifest;
pub mod signing;
pub mod verified;

pub use error::{Error, Result};
pub use incoming::IncomingFile;
pub use signing::TrustedKeys;
