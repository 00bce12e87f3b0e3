//! The node layer: one node's release store under a root directory, with the same semantics
//! as Erlang/OTP's release_handler and EMQX 4.x (`unpacked`, `current`, `permanent`, `old`),
//! hot activation through a hook, and package verification (zip structure, limits, extraction)
//! that refuses hostile input.
//!
//! Synchronous on purpose: async callers run it through `spawn_blocking`. The state rules live
//! in [`rules`] (pure); [`store::Store`] is the only place that touches the disk. The package
//! format itself (manifest, digests, signatures, incoming files, atomic writes) is the
//! `orch-package` crate, re-exported here as [`signing`], [`incoming`] and in [`package`].

pub mod activate;
pub mod error;
pub mod fsutil;
pub mod package;
pub mod rules;
pub mod store;

pub use orch_package::{incoming, signing};

pub use activate::Activation;
pub use error::{Error, Result};
pub use orch_package::TrustedKeys;
pub use package::{Limits, PackageInfo};
pub use rules::Releases;
pub use store::{Outcome, PackageSource, Store, StoreConfig};
