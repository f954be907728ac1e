//! Prometheus metrics: every metric name as a `pub const`, handles created once, never
//! per packet. Process-wide series live in the `metrics` registry; per-backend series
//! are atomics in each backend's runtime, rendered for the backends of the current set
//! only. Tests scrape `/metrics` and assert on these same constants.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Counter, Gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

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
/// UDP queries refused by response rate limiting, by `action`: `drop` (no answer) or
/// `slip` (an empty TC=1 answer). Not in [`DROPPED`].
pub const RATE_LIMITED: &str = "dnslb_rate_limited_total";
/// Client prefixes the rate limiter forgot to make room for new ones
/// (`rate_limit.max_clients` too small for the clients seen).
pub const RATE_LIMIT_EVICTED: &str = "dnslb_rate_limit_evictions_total";
/// Queries answered from the packet cache, by `transport`.
pub const CACHE_HITS: &str = "dnslb_cache_hits_total";
/// Cacheable queries the packet cache could not answer, by `transport`.
pub const CACHE_MISSES: &str = "dnslb_cache_misses_total";
/// Answers in the packet cache now (over all workers).
pub const CACHE_ENTRIES: &str = "dnslb_cache_entries";
/// Unexpired answers the packet cache dropped to make room (`cache.max_entries` too
/// small for the names asked).
pub const CACHE_EVICTIONS: &str = "dnslb_cache_evictions_total";
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
            let recorder = PrometheusBuilder::new().build_recorder();
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
    /// Queries rate limited without an answer.
    pub rate_limited_drop: Counter,
    /// Queries rate limited with a TC=1 answer.
    pub rate_limited_slip: Counter,
    /// Rate-limiter entries evicted.
    pub rate_limit_evicted: Counter,
    /// Cache hits over UDP and TCP.
    pub cache_hits: [Counter; 2],
    /// Cache misses over UDP and TCP.
    pub cache_misses: [Counter; 2],
    /// Cached answers.
    pub cache_entries: Gauge,
    /// Cached answers evicted.
    pub cache_evictions: Counter,
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
            rate_limited_drop: metrics::counter!(RATE_LIMITED, "action" => "drop"),
            rate_limited_slip: metrics::counter!(RATE_LIMITED, "action" => "slip"),
            rate_limit_evicted: metrics::counter!(RATE_LIMIT_EVICTED),
            cache_hits: ["udp", "tcp"].map(|t| metrics::counter!(CACHE_HITS, "transport" => t)),
            cache_misses: ["udp", "tcp"].map(|t| metrics::counter!(CACHE_MISSES, "transport" => t)),
            cache_entries: metrics::gauge!(CACHE_ENTRIES),
            cache_evictions: metrics::counter!(CACHE_EVICTIONS),
        }
    }

    /// Counts a UDP drop.
    #[inline]
    pub fn drop_udp(&self, reason: Drop) {
        self.dropped_udp[reason as usize].increment(1);
    }

    /// Counts `n` UDP drops.
    #[inline]
    pub fn drop_udp_n(&self, reason: Drop, n: u64) {
        self.dropped_udp[reason as usize].increment(n);
    }

    /// Adds a worker's packet-cache counts (`transport`: 0 UDP, 1 TCP).
    pub fn count_cache(
        &self,
        transport: usize,
        hits: u64,
        misses: u64,
        evictions: u64,
        entries: i64,
    ) {
        if hits > 0 {
            self.cache_hits[transport].increment(hits);
        }
        if misses > 0 {
            self.cache_misses[transport].increment(misses);
        }
        if evictions > 0 {
            self.cache_evictions.increment(evictions);
        }
        if entries != 0 {
            self.cache_entries.increment(entries as f64);
        }
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

/// Upper bounds (seconds) of the latency histogram's buckets.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// The per-backend counters the data plane and the health checker update: plain
/// atomics owned by the backend's runtime, not registry handles. `/metrics` renders
/// the series of the backends in the current set from them ([`render_backends`]), so
/// a backend that leaves the set leaves `/metrics` with it, and a name added again
/// starts from zero with its new runtime.
#[derive(Default)]
pub struct Backend {
    /// Responses by RCODE 0..=5, then "other".
    responses: [AtomicU64; 7],
    /// Latency: answers per bucket (not cumulative), the last one above every bound.
    latency: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    /// Latency: sum in nanoseconds.
    latency_ns: AtomicU64,
    /// Health checks passed.
    checks_pass: AtomicU64,
    /// Health checks failed.
    checks_fail: AtomicU64,
}

const RCODES: [&str; 7] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "other",
];

impl Backend {
    /// Counts a response by RCODE, and its round-trip time.
    #[inline]
    pub fn response(&self, rcode: u8, rtt: Duration) {
        self.responses[usize::from(rcode).min(6)].fetch_add(1, Ordering::Relaxed);
        let secs = rtt.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
        self.latency_ns
            .fetch_add(rtt.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Counts a health check.
    pub fn check(&self, passed: bool) {
        let c = if passed {
            &self.checks_pass
        } else {
            &self.checks_fail
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// What `/metrics` shows of one backend: the counters its runtime keeps itself, and
/// its [`Backend`] series.
pub struct BackendSample<'a> {
    /// The `backend` label.
    pub name: &'a str,
    /// Queries forwarded.
    pub queries: u64,
    /// Queries timed out.
    pub timeouts: u64,
    /// Queries in flight.
    pub outstanding: u64,
    /// Usable (up or unknown).
    pub up: bool,
    /// The rest.
    pub series: &'a Backend,
}

/// Appends the per-backend metric families, in Prometheus text format, for `rows`.
pub fn render_backends(out: &mut String, rows: &[BackendSample<'_>]) {
    use std::fmt::Write;
    let family =
        |out: &mut String, name: &str, kind: &str, f: &dyn Fn(&mut String, &BackendSample<'_>)| {
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for r in rows {
                f(out, r);
            }
            out.push('\n');
        };
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    family(out, BACKEND_QUERIES, "counter", &|out, r| {
        let _ = writeln!(
            out,
            "{BACKEND_QUERIES}{{backend=\"{}\"}} {}",
            r.name, r.queries
        );
    });
    family(out, BACKEND_RESPONSES, "counter", &|out, r| {
        for (code, n) in RCODES.iter().zip(&r.series.responses) {
            let _ = writeln!(
                out,
                "{BACKEND_RESPONSES}{{backend=\"{}\",rcode=\"{code}\"}} {}",
                r.name,
                load(n)
            );
        }
    });
    family(out, BACKEND_TIMEOUTS, "counter", &|out, r| {
        let _ = writeln!(
            out,
            "{BACKEND_TIMEOUTS}{{backend=\"{}\"}} {}",
            r.name, r.timeouts
        );
    });
    family(out, BACKEND_OUTSTANDING, "gauge", &|out, r| {
        let _ = writeln!(
            out,
            "{BACKEND_OUTSTANDING}{{backend=\"{}\"}} {}",
            r.name, r.outstanding
        );
    });
    family(out, BACKEND_UP, "gauge", &|out, r| {
        let _ = writeln!(
            out,
            "{BACKEND_UP}{{backend=\"{}\"}} {}",
            r.name,
            u8::from(r.up)
        );
    });
    family(out, BACKEND_LATENCY, "histogram", &|out, r| {
        let mut cumulative = 0;
        for (i, n) in r.series.latency.iter().enumerate() {
            cumulative += load(n);
            let le = LATENCY_BUCKETS
                .get(i)
                .map_or("+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(
                out,
                "{BACKEND_LATENCY}_bucket{{backend=\"{}\",le=\"{le}\"}} {cumulative}",
                r.name
            );
        }
        let sum = load(&r.series.latency_ns) as f64 / 1e9;
        let _ = writeln!(out, "{BACKEND_LATENCY}_sum{{backend=\"{}\"}} {sum}", r.name);
        let _ = writeln!(
            out,
            "{BACKEND_LATENCY}_count{{backend=\"{}\"}} {cumulative}",
            r.name
        );
    });
    family(out, HEALTH_CHECKS, "counter", &|out, r| {
        for (result, n) in [
            ("pass", &r.series.checks_pass),
            ("fail", &r.series.checks_fail),
        ] {
            let _ = writeln!(
                out,
                "{HEALTH_CHECKS}{{backend=\"{}\",result=\"{result}\"}} {}",
                r.name,
                load(n)
            );
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_series_render_as_prometheus_text() {
        let b = Backend::default();
        b.response(0, Duration::from_micros(300));
        b.response(3, Duration::from_secs(9));
        b.check(true);
        let mut out = String::new();
        render_backends(
            &mut out,
            &[BackendSample {
                name: "ns1",
                queries: 3,
                timeouts: 1,
                outstanding: 0,
                up: true,
                series: &b,
            }],
        );
        for line in [
            "# TYPE dnslb_backend_latency_seconds histogram",
            "dnslb_backend_queries_total{backend=\"ns1\"} 3",
            "dnslb_backend_responses_total{backend=\"ns1\",rcode=\"NXDOMAIN\"} 1",
            "dnslb_backend_up{backend=\"ns1\"} 1",
            "dnslb_backend_latency_seconds_bucket{backend=\"ns1\",le=\"0.00025\"} 0",
            "dnslb_backend_latency_seconds_bucket{backend=\"ns1\",le=\"0.0005\"} 1",
            "dnslb_backend_latency_seconds_bucket{backend=\"ns1\",le=\"+Inf\"} 2",
            "dnslb_backend_latency_seconds_count{backend=\"ns1\"} 2",
            "dnslb_health_checks_total{backend=\"ns1\",result=\"pass\"} 1",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} in\n{out}");
        }
        // Nothing to render: only the family headers.
        let mut empty = String::new();
        render_backends(&mut empty, &[]);
        assert!(!empty.contains("ns1"));
    }
}
