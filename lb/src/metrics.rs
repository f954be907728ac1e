//! Prometheus metrics: every metric name as a `pub const`, handles created once (per
//! process or per backend), never per packet. Tests scrape `/metrics` and assert on
//! these same constants.

use std::sync::OnceLock;

use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::packet::Drop;

/// Queries forwarded to a backend (label `backend`).
pub const BACKEND_QUERIES: &str = "dnslb_backend_queries_total";
/// Responses from a backend delivered to clients (labels `backend`, `rcode`).
pub const BACKEND_RESPONSES: &str = "dnslb_backend_responses_total";
/// Queries to a backend that timed out (label `backend`).
pub const BACKEND_TIMEOUTS: &str = "dnslb_backend_timeouts_total";
/// Queries in flight to a backend (label `backend`).
pub const BACKEND_OUTSTANDING: &str = "dnslb_backend_outstanding";
/// 1 when the backend is up or unknown (usable), 0 when down (label `backend`).
pub const BACKEND_UP: &str = "dnslb_backend_up";
/// Seconds from forwarding a query to receiving its answer (label `backend`).
pub const BACKEND_LATENCY: &str = "dnslb_backend_latency_seconds";
/// Messages dropped, by `reason` (see [`Drop::as_str`]) and `transport`.
pub const DROPPED: &str = "dnslb_dropped_total";
/// Queries received from clients, by `transport`.
pub const QUERIES: &str = "dnslb_queries_total";
/// SERVFAIL answers dnslb made itself because no backend was usable, by `transport`.
pub const NO_BACKEND: &str = "dnslb_no_backend_servfail_total";
/// TCP client connections accepted.
pub const TCP_CONNECTIONS: &str = "dnslb_tcp_connections_total";
/// TCP client connections open now.
pub const TCP_CONNECTIONS_OPEN: &str = "dnslb_tcp_connections_open";
/// Generation of the backend set.
pub const GENERATION: &str = "dnslb_backend_set_generation";
/// Health checks run, by `backend` and `result` (pass/fail).
pub const HEALTH_CHECKS: &str = "dnslb_health_checks_total";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (idempotent) and returns the handle
/// that renders `/metrics`. Must run before any handle below is created.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(BACKEND_LATENCY.into()), &buckets)
                .expect("non-empty buckets")
                .build_recorder();
            let handle = recorder.handle();
            // A test binary may have installed a recorder already; then we keep ours
            // for rendering only.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Data-plane counters shared by every worker, one handle per label set.
#[derive(Clone)]
pub struct DataPlane {
    dropped_udp: [Counter; Drop::ALL.len()],
    dropped_tcp: [Counter; Drop::ALL.len()],
    /// UDP queries received.
    pub queries_udp: Counter,
    /// TCP queries received.
    pub queries_tcp: Counter,
    /// Self-made SERVFAILs over UDP.
    pub no_backend_udp: Counter,
    /// Self-made SERVFAILs over TCP.
    pub no_backend_tcp: Counter,
    /// Accepted TCP connections.
    pub tcp_connections: Counter,
    /// Open TCP connections.
    pub tcp_open: Gauge,
}

impl DataPlane {
    /// Registers every handle.
    pub fn new() -> Self {
        let dropped = |t: &'static str| {
            Drop::ALL.map(|d| metrics::counter!(DROPPED, "reason" => d.as_str(), "transport" => t))
        };
        DataPlane {
            dropped_udp: dropped("udp"),
            dropped_tcp: dropped("tcp"),
            queries_udp: metrics::counter!(QUERIES, "transport" => "udp"),
            queries_tcp: metrics::counter!(QUERIES, "transport" => "tcp"),
            no_backend_udp: metrics::counter!(NO_BACKEND, "transport" => "udp"),
            no_backend_tcp: metrics::counter!(NO_BACKEND, "transport" => "tcp"),
            tcp_connections: metrics::counter!(TCP_CONNECTIONS),
            tcp_open: metrics::gauge!(TCP_CONNECTIONS_OPEN),
        }
    }

    /// Counts a UDP drop.
    #[inline]
    pub fn drop_udp(&self, reason: Drop) {
        self.dropped_udp[reason as usize].increment(1);
    }

    /// Counts a TCP drop.
    #[inline]
    pub fn drop_tcp(&self, reason: Drop) {
        self.dropped_tcp[reason as usize].increment(1);
    }
}

impl Default for DataPlane {
    fn default() -> Self {
        Self::new()
    }
}

/// Per-backend handles, created when a backend joins the set.
pub struct Backend {
    /// Forwarded queries.
    pub queries: Counter,
    /// Responses by RCODE 0..=5, then "other".
    responses: [Counter; 7],
    /// Timed-out queries.
    pub timeouts: Counter,
    /// In flight now.
    pub outstanding: Gauge,
    /// 1 usable, 0 down.
    pub up: Gauge,
    /// Round-trip latency.
    pub latency: Histogram,
    /// Health checks passed.
    pub checks_pass: Counter,
    /// Health checks failed.
    pub checks_fail: Counter,
}

const RCODES: [&str; 7] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "other",
];

impl Backend {
    /// Registers the handles of backend `name`.
    pub fn new(name: &str) -> Self {
        let n = name.to_string();
        Backend {
            queries: metrics::counter!(BACKEND_QUERIES, "backend" => n.clone()),
            responses: RCODES.map(
                |r| metrics::counter!(BACKEND_RESPONSES, "backend" => n.clone(), "rcode" => r),
            ),
            timeouts: metrics::counter!(BACKEND_TIMEOUTS, "backend" => n.clone()),
            outstanding: metrics::gauge!(BACKEND_OUTSTANDING, "backend" => n.clone()),
            up: metrics::gauge!(BACKEND_UP, "backend" => n.clone()),
            latency: metrics::histogram!(BACKEND_LATENCY, "backend" => n.clone()),
            checks_pass: metrics::counter!(HEALTH_CHECKS, "backend" => n.clone(), "result" => "pass"),
            checks_fail: metrics::counter!(HEALTH_CHECKS, "backend" => n, "result" => "fail"),
        }
    }

    /// Counts a response by RCODE.
    #[inline]
    pub fn response(&self, rcode: u8) {
        self.responses[usize::from(rcode).min(6)].increment(1);
    }
}
