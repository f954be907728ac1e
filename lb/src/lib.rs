//! dnslb: a DNS load balancer (UDP and TCP) whose backends live in one atomically
//! swappable snapshot, steered at run time through a local admin API.
//!
//! # Layout
//! - [`config`] — the TOML configuration, its defaults and `validate()`.
//! - [`packet`] — DNS wire-format helpers for the hot path (header, question key,
//!   SERVFAIL); never allocates.
//! - [`backends`] — the backend set (one `ArcSwap<Snapshot>`, serialized writers),
//!   per-backend runtime (health, in-flight counts) and the selection policies.
//! - `udp` — the UDP path: per-worker sockets and the in-flight ID table.
//! - [`batch`] — `recvmmsg`/`sendmmsg` and epoll, the crate's only `unsafe`.
//! - `tcp` — the TCP path (RFC 7766): pipelined client connections, pooled backend
//!   connections.
//! - [`health`] — active health checks.
//! - [`admin`] — the HTTP admin API and `/metrics`.
//! - [`api`] — the admin API's request and response bodies, shared with clients
//!   (the deployer).
//! - [`metrics`] — metric names and handles.
//! - [`state`] — persistence of the backend set.
//! - [`sockets`] — binding listeners (SO_REUSEPORT, one per worker), or taking
//!   passed ones.
//! - [`handover`] — sockets passed between processes: socket activation
//!   (`sd_listen_fds`) and the SIGUSR2 upgrade.
//! - [`server`] — start-up, worker threads, reload and graceful shutdown.
//! - `control` — how the server tells a worker thread to drain or stop.
//! - [`systemd`] — `sd_notify`.
#![warn(missing_docs)]

pub mod admin;
pub mod api;
pub mod backends;
pub mod batch;
pub mod config;
mod control;
pub mod handover;
pub mod health;
pub mod metrics;
pub mod packet;
pub mod server;
pub mod sockets;
pub mod state;
pub mod systemd;
mod tcp;
mod udp;

pub use config::Config;
pub use server::{run, Server};
pub use sockets::{bind, bind_with, Listeners};

/// The version printed by `--version` and `GET /v1/status`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
