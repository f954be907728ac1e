//! `deployer`: blue-green rollouts of BIND nameservers behind dnslb.
//!
//! Not built yet: the rollout engine lands with issue 4. This crate exists so the
//! workspace layout of SPEC §2 is complete and the binary name is reserved.
#![warn(missing_docs)]

/// The version string printed by `deployer --version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
