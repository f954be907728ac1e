//! `deployer`: blue-green rollouts of BIND nameservers behind dnslb load balancers.
//!
//! # Layout
//! - [`config`] — `deployer.toml`, defaults, validation of every problem at once.
//! - [`provider`] — where servers come from: [`provider::local`] (real `named`
//!   processes on this machine) and [`provider::linode`] (Linode API v4).
//! - [`ansible`] — the generated inventory and the `ansible-playbook` run.
//! - [`verify`] — zone files canonicalized by `named-checkzone -D`, checked record by
//!   record over UDP and TCP.
//! - [`lbclient`] — the dnslb admin API client (types shared with dnslb's
//!   [`dnslb::api`]).
//! - [`retry`] — the one retry policy for remote calls.
//! - [`registrar`] — where the parent zone's glue changes (RFC 2136 UPDATE, manual),
//!   and reading what the parent serves.
//! - [`drain`] — when an old load balancer no longer gets traffic (query rate
//!   from its /metrics, window, not before the delegation TTL).
//! - [`bake`] — bake analysis: judging each load balancer's own view of the new
//!   servers (health, timeouts, SERVFAIL).
//! - [`journal`] — the journal of the current rollout and the lock.
//! - [`lbrollout`] — `rollout-lbs`: blue-green of the load balancers through the
//!   parent zone's delegation.
//! - [`rollout`] — the engine: bootstrap, rollout, rollback, plan, status, destroy.
#![warn(missing_docs)]

pub mod ansible;
pub mod bake;
pub mod config;
pub mod drain;
pub mod journal;
pub mod lbclient;
pub mod lbrollout;
pub mod provider;
pub mod registrar;
pub mod retry;
pub mod rollout;
pub mod verify;

pub use config::Config;
pub use rollout::Deployer;

/// The version string printed by `deployer --version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
