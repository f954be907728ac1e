//! dnslb: a DNS load balancer (UDP and TCP) whose backends live in one atomically
//! swappable snapshot, steered at run time through a local admin API.
//!
//! # Layout
//! - [`config`] — the TOML configuration, its defaults and `validate()`.
//! - [`packet`] — DNS wire-format helpers for the hot path (header, question key,
//!   SERVFAIL); never allocates.
//! - [`backends`] — the backend set (one `ArcSwap<Snapshot>`, serialized writers),
//!   per-backend runtime (health, in-flight counts), the one health model (active
//!   checks and the passive signal) and the selection policies.
//! - [`shared`] — run-time state every worker, the health checker and the admin API
//!   share: the backend set, the SIGHUP tunables, where the set is persisted.
//! - [`health`] — active health checks, and the round that applies passive health.
//! - [`admin`] — the HTTP admin API and `/metrics`.
//! - [`api`] — the admin API's request and response bodies, shared with clients
//!   (the deployer).
//! - `udp` — the UDP path: per-worker sockets and the in-flight ID table.
//! - `tcp` — the TCP path (RFC 7766): pipelined client connections, pooled backend
//!   connections.
//! - `batch` — `recvmmsg`/`sendmmsg` and epoll, the crate's only `unsafe`.
//! - `cache` — the packet cache (`[cache]`): one per worker, keyed to the backend
//!   set's generation.
//! - `control` — how the server tells a worker thread to drain or stop.
//! - [`edge`] — edge protection: the `[acl]` lists, the per-worker response rate
//!   limiter (`[rate_limit]`), TCP connections per client.
//! - `fuzz` — the bodies of the fuzz targets in `lb/fuzz/` (query parsing, answer
//!   matching, TCP framing), also run by stable tests; uses `packet` and `tcp`.
//! - [`metrics`] — metric names and handles, and the per-backend series.
//! - [`state`] — persistence of the backend set.
//! - [`sockets`] — binding listeners (SO_REUSEPORT, one per worker), or taking
//!   passed ones.
//! - [`handover`] — sockets passed between processes: socket activation
//!   (`sd_listen_fds`) and the SIGUSR2 upgrade.
//! - [`server`] — start-up (worker threads, health checker, admin API), the SIGHUP
//!   entry point and graceful shutdown; nothing else imports it.
//! - [`systemd`] — `sd_notify`.
//!
//! Modules form a DAG: `config`/`packet` → `metrics`/`edge` → `backends` → `shared` →
//! `health`/`admin` → `cache` → `udp`/`tcp` → `server`; `api` sits beside `backends`,
//! `sockets`/`handover` below `server`, and `fuzz` beside `server` (it drives `packet`
//! and the TCP framing of `tcp`; nothing imports it).
#![warn(missing_docs)]

pub mod admin;
pub mod api;
pub mod backends;
mod batch;
mod cache;
pub mod config;
mod control;
pub mod edge;
#[doc(hidden)]
pub mod fuzz;
pub mod handover;
pub mod health;
pub mod metrics;
pub mod packet;
pub mod server;
pub mod shared;
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
