//! The TOML configuration of dnslb (SPEC §4): serde structs with explicit defaults,
//! parsing separate from reading the file, and a `validate()` that reports every
//! problem at once, including every unknown key.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Everything that can be wrong with a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file we tried to read.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the schema; every problem is listed.
    #[error("{} problem(s) in the configuration:\n  - {}", .0.len(), .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where DNS and the admin API listen.
    pub listen: Listen,
    /// Admin API access control.
    pub admin: Admin,
    /// Where the live backend set is persisted.
    pub state: State,
    /// How queries are spread over backends.
    pub balance: Balance,
    /// Active health checks.
    pub health: HealthConfig,
    /// TCP limits (RFC 7766 connection management).
    pub tcp: Tcp,
    /// Which clients may query at all.
    pub acl: AclConfig,
    /// Response rate limiting per client prefix (UDP); off when the table is absent.
    pub rate_limit: Option<RateLimit>,
    /// The packet cache.
    pub cache: CacheConfig,
    /// Process-level tunables.
    pub server: Server,
    /// Seeds the backend set when no state file exists yet.
    pub backend: Vec<BackendConfig>,
}

/// `[listen]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// Each address is served over UDP and TCP. Must be a specific IP: replies leave
    /// from the socket the query arrived on, which is what makes them come from the
    /// address the client queried.
    pub dns: Vec<SocketAddr>,
    /// Admin API and `/metrics`; loopback unless a token protects it.
    pub admin: SocketAddr,
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            dns: vec!["127.0.0.1:5353".parse().expect("literal")],
            admin: "127.0.0.1:8053".parse().expect("literal"),
        }
    }
}

/// `[admin]`
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    /// When set, mutating and reading routes (all but /healthz and /metrics) need
    /// `Authorization: Bearer <token>` with the file's content (trimmed).
    pub token_file: Option<PathBuf>,
}

/// `[state]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct State {
    /// The live backend set, rewritten atomically (write, fsync, rename) on every change.
    pub path: PathBuf,
}

impl Default for State {
    fn default() -> Self {
        State {
            path: PathBuf::from("/var/lib/dnslb/state.json"),
        }
    }
}

/// How a backend is chosen for each query.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// The usable backend with the fewest queries in flight per unit of weight.
    #[default]
    LeastOutstanding,
    /// Each usable backend in turn.
    RoundRobin,
    /// A random usable backend, in proportion to its weight.
    WeightedRandom,
    /// The first usable backend in configuration order (primary/standby).
    FirstAvailable,
}

impl FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "least-outstanding" => Ok(Policy::LeastOutstanding),
            "round-robin" => Ok(Policy::RoundRobin),
            "weighted-random" => Ok(Policy::WeightedRandom),
            "first-available" => Ok(Policy::FirstAvailable),
            other => Err(format!("unknown policy {other:?}")),
        }
    }
}

/// `[balance]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Balance {
    /// Selection policy.
    pub policy: Policy,
    /// How long a forwarded query may wait for its answer before its slot is freed
    /// and the backend is charged a timeout.
    pub query_timeout_ms: u64,
}

impl Default for Balance {
    fn default() -> Self {
        Balance {
            policy: Policy::LeastOutstanding,
            query_timeout_ms: 2000,
        }
    }
}

/// `[health]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Time between two checks of one backend.
    pub interval_ms: u64,
    /// How long one check may take.
    pub timeout_ms: u64,
    /// Consecutive passes before a backend that is down is up again.
    pub rise: u32,
    /// Consecutive failures (checks or query timeouts) before a backend is down.
    pub fall: u32,
    /// A name every backend is authoritative for. Required.
    pub query_name: String,
    /// The record type asked, with RD=0. A pass needs NOERROR with AA.
    pub query_type: String,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            interval_ms: 1000,
            timeout_ms: 500,
            rise: 2,
            fall: 3,
            query_name: String::new(),
            query_type: "SOA".into(),
        }
    }
}

/// `[tcp]`: RFC 7766 connection management.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Tcp {
    /// A client connection with no query in flight is closed after this long; a frame
    /// that is half sent for this long closes its connection too.
    pub idle_timeout_ms: u64,
    /// Client connections open at once, over all listeners; more are closed on accept.
    pub max_connections: usize,
    /// Queries in flight on one client connection; reading pauses above it.
    pub max_inflight_per_connection: usize,
    /// A length prefix above this closes the connection (DNS caps messages at 65535).
    pub max_message_size: usize,
    /// Idle connections to a backend are closed after this long (BIND closes at 30 s).
    pub backend_idle_timeout_ms: u64,
    /// Queries pipelined on one backend connection before another one is opened.
    pub backend_pipeline: usize,
    /// Connections to one backend, per worker.
    pub backend_max_connections: usize,
    /// Client connections open at once from one client (an IPv4 address, or an
    /// IPv6 /64), over all listeners and workers; more are closed on accept, so one
    /// client cannot take every slot of `max_connections`.
    pub max_connections_per_client: usize,
    /// A client connection open this long reads no more queries: its answers are
    /// written and it is closed (a client that keeps a slot busy forever gives it
    /// back; RFC 7766 lets a server close when it likes).
    pub max_connection_lifetime_ms: u64,
    /// After this many queries a client connection reads no more; it is closed once
    /// they are answered.
    pub max_queries_per_connection: u64,
}

impl Default for Tcp {
    fn default() -> Self {
        Tcp {
            idle_timeout_ms: 10_000,
            max_connections: 1024,
            max_inflight_per_connection: 100,
            max_message_size: 65535,
            backend_idle_timeout_ms: 20_000,
            backend_pipeline: 64,
            backend_max_connections: 8,
            max_connections_per_client: 20,
            max_connection_lifetime_ms: 120_000,
            max_queries_per_connection: 10_000,
        }
    }
}

/// `[acl]`: which clients may query. A client matching `deny` is refused; otherwise
/// it must match `allow`. Refused UDP queries are dropped, refused TCP connections
/// closed at accept; both are counted (`dnslb_dropped_total{reason="acl"}`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AclConfig {
    /// CIDRs (IPv4 and IPv6) allowed; default everyone.
    pub allow: Vec<String>,
    /// CIDRs refused, checked first.
    pub deny: Vec<String>,
}

impl Default for AclConfig {
    fn default() -> Self {
        AclConfig {
            allow: vec!["0.0.0.0/0".into(), "::/0".into()],
            deny: Vec::new(),
        }
    }
}

/// `[rate_limit]`: response rate limiting (RRL) of UDP answers per client prefix.
/// A token bucket per prefix: `burst` tokens, refilled at `responses_per_second`;
/// a query that finds no token is not forwarded, and every `slip`-th such query gets
/// an empty TC=1 answer so a real client retries over TCP (which is not limited).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimit {
    /// Sustained answers per second to one prefix.
    pub responses_per_second: u32,
    /// Answers one prefix may get at once above the rate (the bucket's size).
    pub burst: u32,
    /// IPv4 clients are grouped by this prefix length.
    pub ipv4_prefix: u8,
    /// IPv6 clients are grouped by this prefix length.
    pub ipv6_prefix: u8,
    /// Every `slip`-th limited query gets an empty TC=1 answer; 0 drops them all.
    pub slip: u32,
    /// CIDRs never limited (monitoring, known resolvers).
    pub exempt: Vec<String>,
    /// Prefixes tracked at once (over all UDP workers); the least recently seen is
    /// forgotten first.
    pub max_clients: usize,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            responses_per_second: 20,
            burst: 40,
            ipv4_prefix: 24,
            ipv6_prefix: 56,
            slip: 2,
            exempt: Vec::new(),
            max_clients: 100_000,
        }
    }
}

/// `[cache]`: the packet cache, off unless `max_entries` > 0. Its entries belong to
/// one generation of the backend set; changing the set flushes it. Needs a restart to
/// change.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Answers kept at most, over all workers (each worker holds its share).
    pub max_entries: usize,
    /// An answer is kept no longer than this (or its smallest TTL, if shorter).
    pub max_ttl_s: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_entries: 0,
            max_ttl_s: 300,
        }
    }
}

/// The most entries `[cache] max_entries` may ask for.
pub const MAX_CACHE_ENTRIES: usize = 100_000_000;

/// An IPv4 or IPv6 network, `addr/len` (a bare address is a host route). Host bits
/// must be zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The network address.
    pub addr: std::net::IpAddr,
    /// The prefix length.
    pub len: u8,
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: std::net::IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IP network (addr/len)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            None => max,
            Some(l) => l
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|&n| n <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?,
        };
        let masked = mask_ip(addr, len);
        if masked != addr {
            return Err(format!(
                "{s:?} has host bits set (did you mean {masked}/{len}?)"
            ));
        }
        Ok(Cidr { addr, len })
    }
}

/// `ip` with all but its first `len` bits cleared.
pub fn mask_ip(ip: std::net::IpAddr, len: u8) -> std::net::IpAddr {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(a) => {
            let m = u32::MAX
                .checked_shl(32 - u32::from(len.min(32)))
                .unwrap_or(0);
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = u128::MAX
                .checked_shl(128 - u32::from(len.min(128)))
                .unwrap_or(0);
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

/// Parses a CIDR list, one problem message per bad entry (prefixed with `what`).
pub fn parse_cidrs(what: &str, list: &[String]) -> Result<Vec<Cidr>, Vec<String>> {
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for s in list {
        match s.parse() {
            Ok(c) => out.push(c),
            Err(e) => bad.push(format!("{what}: {e}")),
        }
    }
    if bad.is_empty() {
        Ok(out)
    } else {
        Err(bad)
    }
}

/// `[server]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    /// UDP worker threads (each owns one SO_REUSEPORT socket per listener); 0 means
    /// half the CPUs, at least one.
    pub workers: usize,
    /// TCP worker threads (each owns one SO_REUSEPORT listener per listen address);
    /// 0 means one per CPU.
    pub tcp_workers: usize,
    /// On SIGTERM, how long in-flight queries may take to finish.
    pub shutdown_grace_ms: u64,
    /// SO_RCVBUF/SO_SNDBUF of every UDP socket.
    pub udp_socket_buffer: usize,
    /// The binary SIGUSR2 starts as the next dnslb; unset: the path this process was
    /// started from (read at start-up, so a package that replaced the file is run).
    pub upgrade_binary: Option<PathBuf>,
    /// How long the next dnslb may take to say it is ready before the upgrade is
    /// given up (the child is killed; this process goes on serving).
    pub upgrade_timeout_ms: u64,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            workers: 0,
            tcp_workers: 0,
            shutdown_grace_ms: 5000,
            udp_socket_buffer: 4 << 20,
            upgrade_binary: None,
            upgrade_timeout_ms: 30_000,
        }
    }
}

/// One `[[backend]]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Unique name, used by the admin API.
    pub name: String,
    /// Where the backend answers DNS (UDP and TCP).
    pub address: SocketAddr,
    /// Relative share for weighted policies.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// Which keys each table accepts: used to list *every* unknown key, since serde stops at
/// the first one.
const SCHEMA: &[(&str, &[&str])] = &[
    (
        "",
        &[
            "listen",
            "admin",
            "state",
            "balance",
            "health",
            "tcp",
            "acl",
            "rate_limit",
            "cache",
            "server",
            "backend",
        ],
    ),
    ("listen", &["dns", "admin"]),
    ("admin", &["token_file"]),
    ("state", &["path"]),
    ("balance", &["policy", "query_timeout_ms"]),
    (
        "health",
        &[
            "interval_ms",
            "timeout_ms",
            "rise",
            "fall",
            "query_name",
            "query_type",
        ],
    ),
    (
        "tcp",
        &[
            "idle_timeout_ms",
            "max_connections",
            "max_inflight_per_connection",
            "max_message_size",
            "backend_idle_timeout_ms",
            "backend_pipeline",
            "backend_max_connections",
            "max_connections_per_client",
            "max_connection_lifetime_ms",
            "max_queries_per_connection",
        ],
    ),
    ("acl", &["allow", "deny"]),
    (
        "rate_limit",
        &[
            "responses_per_second",
            "burst",
            "ipv4_prefix",
            "ipv6_prefix",
            "slip",
            "exempt",
            "max_clients",
        ],
    ),
    ("cache", &["max_entries", "max_ttl_s"]),
    (
        "server",
        &[
            "workers",
            "tcp_workers",
            "shutdown_grace_ms",
            "udp_socket_buffer",
            "upgrade_binary",
            "upgrade_timeout_ms",
        ],
    ),
    ("backend", &["name", "address", "weight"]),
];

/// Lists every unknown key and removes it, so the remaining checks can still run.
fn strip_unknown_keys(table: &mut toml::Table) -> Vec<String> {
    let allowed = |section: &str| {
        SCHEMA
            .iter()
            .find(|(s, _)| *s == section)
            .map(|(_, keys)| *keys)
            .unwrap_or(&[])
    };
    let mut problems = Vec::new();
    table.retain(|key, _| {
        let ok = allowed("").contains(&key);
        if !ok {
            problems.push(format!("unknown key `{key}`"));
        }
        ok
    });
    for (key, value) in table.iter_mut() {
        let mut check = |t: &mut toml::Table, at: String| {
            t.retain(|k, _| {
                let ok = allowed(key).contains(&k);
                if !ok {
                    problems.push(format!("unknown key `{k}` in {at}"));
                }
                ok
            });
        };
        match value {
            toml::Value::Table(t) => check(t, format!("[{key}]")),
            toml::Value::Array(items) => {
                for (i, item) in items.iter_mut().enumerate() {
                    if let toml::Value::Table(t) = item {
                        check(t, format!("[[{key}]] #{}", i + 1));
                    }
                }
            }
            _ => {}
        }
    }
    problems
}

impl Config {
    /// Parses and validates a configuration text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigError::Invalid(vec![e.to_string().trim().to_string()])
        })?;
        let mut problems = strip_unknown_keys(&mut table);
        let config: Config = match Config::deserialize(toml::Value::Table(table)) {
            Ok(c) => c,
            Err(e) => {
                problems.push(e.message().to_string());
                return Err(ConfigError::Invalid(problems));
            }
        };
        if let Err(ConfigError::Invalid(more)) = config.validate() {
            problems.extend(more);
        }
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text)
    }

    /// Checks every semantic rule and reports all violations together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut p = Vec::new();
        if self.listen.dns.is_empty() {
            p.push("listen.dns must name at least one address".to_string());
        }
        let mut seen = HashSet::new();
        for a in &self.listen.dns {
            if a.ip().is_unspecified() {
                p.push(format!(
                    "listen.dns {a}: bind a specific address (replies must leave from the address the client queried)"
                ));
            }
            if !seen.insert(a) {
                p.push(format!("listen.dns {a} is listed twice"));
            }
        }
        if self.balance.query_timeout_ms == 0 {
            p.push("balance.query_timeout_ms must be > 0".into());
        }
        let h = &self.health;
        if h.query_name.is_empty() {
            p.push(
                "health.query_name is required (a name every backend is authoritative for)".into(),
            );
        } else if let Err(e) = hickory_proto::rr::Name::from_ascii(&h.query_name) {
            p.push(format!("health.query_name {:?}: {e}", h.query_name));
        }
        if hickory_proto::rr::RecordType::from_str(&h.query_type.to_ascii_uppercase()).is_err() {
            p.push(format!(
                "health.query_type {:?} is not a record type",
                h.query_type
            ));
        }
        if h.interval_ms == 0 || h.timeout_ms == 0 {
            p.push("health.interval_ms and health.timeout_ms must be > 0".into());
        }
        if h.rise == 0 || h.fall == 0 {
            p.push("health.rise and health.fall must be >= 1".into());
        }
        let t = &self.tcp;
        if t.max_connections == 0
            || t.max_inflight_per_connection == 0
            || t.backend_pipeline == 0
            || t.backend_max_connections == 0
        {
            p.push("tcp limits (max_connections, max_inflight_per_connection, backend_pipeline, backend_max_connections) must be >= 1".into());
        }
        if !(12..=65535).contains(&t.max_message_size) {
            p.push("tcp.max_message_size must be within 12..=65535".into());
        }
        if t.idle_timeout_ms == 0 || t.backend_idle_timeout_ms == 0 {
            p.push("tcp.idle_timeout_ms and tcp.backend_idle_timeout_ms must be > 0".into());
        }
        if t.max_connections_per_client == 0
            || t.max_connection_lifetime_ms == 0
            || t.max_queries_per_connection == 0
        {
            p.push("tcp.max_connections_per_client, tcp.max_connection_lifetime_ms and tcp.max_queries_per_connection must be >= 1".into());
        }
        if let Err(e) = parse_cidrs("acl.allow", &self.acl.allow) {
            p.extend(e);
        }
        if let Err(e) = parse_cidrs("acl.deny", &self.acl.deny) {
            p.extend(e);
        }
        if let Some(r) = &self.rate_limit {
            if r.responses_per_second == 0 || r.burst == 0 {
                p.push("rate_limit.responses_per_second and rate_limit.burst must be >= 1".into());
            }
            if r.ipv4_prefix > 32 || r.ipv6_prefix > 128 {
                p.push(
                    "rate_limit.ipv4_prefix must be <= 32 and rate_limit.ipv6_prefix <= 128".into(),
                );
            }
            if r.max_clients == 0 {
                p.push("rate_limit.max_clients must be >= 1".into());
            }
            if let Err(e) = parse_cidrs("rate_limit.exempt", &r.exempt) {
                p.extend(e);
            }
        }
        if self.cache.max_entries > MAX_CACHE_ENTRIES {
            p.push(format!("cache.max_entries must be <= {MAX_CACHE_ENTRIES}"));
        }
        if self.cache.max_ttl_s == 0 || self.cache.max_ttl_s > 86_400 * 7 {
            p.push("cache.max_ttl_s must be between 1 and 604800 (a week)".into());
        }
        if self.server.workers > 256 {
            p.push("server.workers must be <= 256".into());
        }
        if self.server.tcp_workers > 256 {
            p.push("server.tcp_workers must be <= 256".into());
        }
        if self.server.upgrade_timeout_ms == 0 {
            p.push("server.upgrade_timeout_ms must be > 0".into());
        }
        p.extend(validate_backends(&self.backend));
        if !self.listen.admin.ip().is_loopback() && self.admin.token_file.is_none() {
            p.push(format!(
                "listen.admin {} is not loopback: set admin.token_file to protect it",
                self.listen.admin
            ));
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(p))
        }
    }

    /// How long a forwarded query may wait for its answer.
    pub fn query_timeout(&self) -> Duration {
        Duration::from_millis(self.balance.query_timeout_ms)
    }

    /// UDP worker threads to start.
    pub fn worker_count(&self) -> usize {
        if self.server.workers > 0 {
            self.server.workers
        } else {
            // Each UDP thread batches what arrives while it works, so fewer threads
            // spend less per query. On the 2-core development machine one UDP thread
            // measured cheaper per query and faster at saturation than two
            // (docs/benchmarks.md); half the CPUs leaves the rest to the kernel's
            // packet work, the TCP threads and, on a shared host, the backends.
            cpus().div_ceil(2)
        }
    }

    /// TCP worker threads to start. A TCP thread costs nothing while idle, and TCP
    /// throughput measured higher with one per CPU.
    pub fn tcp_worker_count(&self) -> usize {
        if self.server.tcp_workers > 0 {
            self.server.tcp_workers
        } else {
            cpus()
        }
    }
}

/// CPUs this process may use (affinity and cgroup quota count).
fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Rules shared by the config file and the admin API: names unique and sane, weights
/// positive, addresses with a port. Returns one message per problem.
pub fn validate_backends(backends: &[BackendConfig]) -> Vec<String> {
    let mut p = Vec::new();
    let mut names = HashSet::new();
    for b in backends {
        if b.name.is_empty()
            || b.name.len() > 64
            || !b
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            p.push(format!(
                "backend name {:?}: use 1-64 characters of A-Z a-z 0-9 - _ .",
                b.name
            ));
        }
        if !names.insert(b.name.as_str()) {
            p.push(format!("backend name {:?} is used twice", b.name));
        }
        if b.weight == 0 {
            p.push(format!("backend {:?}: weight must be >= 1", b.name));
        }
        if b.address.port() == 0 || b.address.ip().is_unspecified() {
            p.push(format!(
                "backend {:?}: address {} needs a specific IP and a non-zero port",
                b.name, b.address
            ));
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [listen]
        dns = ["127.0.0.1:5353"]
        admin = "127.0.0.1:8053"
        [health]
        query_name = "example.test."
        [[backend]]
        name = "ns1"
        address = "127.0.0.1:5301"
    "#;

    #[test]
    fn parses_the_spec_example_with_defaults() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.backend[0].weight, 1);
        assert_eq!(c.balance.policy, Policy::LeastOutstanding);
        assert_eq!(c.health.fall, 3);
    }

    #[test]
    fn no_backend_is_valid() {
        let c = Config::parse("[health]\nquery_name = \"example.test.\"\n").unwrap();
        assert!(c.backend.is_empty());
    }

    #[test]
    fn every_unknown_key_is_listed() {
        let text = format!("{GOOD}\nbogus = 1\n[balance]\npolcy = \"x\"\nquery_timeout_ms = 0\n");
        let ConfigError::Invalid(p) = Config::parse(&text).unwrap_err() else {
            panic!()
        };
        // Both unknown keys, and the semantic problem behind them.
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p.iter().any(|m| m.contains("query_timeout_ms")));
        assert!(p.iter().any(|m| m.contains("polcy")));
        assert!(p.iter().any(|m| m.contains("bogus")));
    }

    #[test]
    fn every_semantic_problem_is_listed() {
        let text = r#"
            [listen]
            dns = ["0.0.0.0:53"]
            admin = "10.0.0.1:8053"
            [balance]
            query_timeout_ms = 0
            [health]
            query_name = ""
            rise = 0
            [[backend]]
            name = "a"
            address = "127.0.0.1:0"
            weight = 0
            [[backend]]
            name = "a"
            address = "127.0.0.1:53"
        "#;
        let ConfigError::Invalid(p) = Config::parse(text).unwrap_err() else {
            panic!()
        };
        for needle in [
            "specific address",
            "query_timeout_ms",
            "query_name is required",
            "rise",
            "used twice",
            "weight",
            "non-zero port",
            "not loopback",
        ] {
            assert!(
                p.iter().any(|m| m.contains(needle)),
                "{needle} missing in {p:?}"
            );
        }
    }

    #[test]
    fn udp_and_tcp_worker_counts_are_separate_and_bounded() {
        let c =
            Config::parse(&format!("{GOOD}\n[server]\nworkers = 3\ntcp_workers = 5\n")).unwrap();
        assert_eq!((c.worker_count(), c.tcp_worker_count()), (3, 5));
        let d = Config::parse(GOOD).unwrap();
        assert!(d.worker_count() >= 1 && d.worker_count() <= d.tcp_worker_count());
        let ConfigError::Invalid(p) = Config::parse(&format!(
            "{GOOD}\n[server]\nworkers = 300\ntcp_workers = 257\n"
        ))
        .unwrap_err() else {
            panic!()
        };
        assert!(p.iter().any(|m| m.contains("server.workers")), "{p:?}");
        assert!(p.iter().any(|m| m.contains("server.tcp_workers")), "{p:?}");
    }

    #[test]
    fn the_spec_edge_protection_keys_parse_and_bad_ones_are_all_listed() {
        let c = Config::parse(GOOD).unwrap();
        assert!(c.rate_limit.is_none(), "rate limiting is off when absent");
        assert_eq!(c.acl, AclConfig::default());
        assert_eq!(c.tcp.max_connections_per_client, 20);
        let spec = format!(
            "{GOOD}\n[acl]\nallow = [\"0.0.0.0/0\", \"::/0\"]\ndeny = []\n\
             [rate_limit]\nresponses_per_second = 20\nburst = 40\nipv4_prefix = 24\n\
             ipv6_prefix = 56\nslip = 2\nexempt = [\"127.0.0.1/32\"]\nmax_clients = 100000\n\
             [tcp]\nmax_connections_per_client = 20\nmax_connection_lifetime_ms = 120000\n\
             max_queries_per_connection = 10000\n"
        );
        let c = Config::parse(&spec).unwrap();
        let r = c.rate_limit.unwrap();
        assert_eq!((r.responses_per_second, r.burst, r.slip), (20, 40, 2));
        assert_eq!(r.exempt, vec!["127.0.0.1/32".to_string()]);
        // An empty table turns it on with the defaults.
        let on = Config::parse(&format!("{GOOD}\n[rate_limit]\n")).unwrap();
        assert_eq!(on.rate_limit, Some(RateLimit::default()));
        let bad = format!(
            "{GOOD}\n[acl]\nallow = [\"10.0.0.1/8\", \"nope\"]\ndeny = [\"::/129\"]\n\
             [rate_limit]\nresponses_per_second = 0\nipv4_prefix = 33\nexempt = [\"1.2.3.4/40\"]\n\
             max_clients = 0\nburts = 1\n[tcp]\nmax_connections_per_client = 0\n"
        );
        let ConfigError::Invalid(p) = Config::parse(&bad).unwrap_err() else {
            panic!()
        };
        for needle in [
            "host bits set",
            "\"nope\"",
            "acl.deny",
            "responses_per_second",
            "ipv4_prefix",
            "rate_limit.exempt",
            "max_clients",
            "burts",
            "max_connections_per_client",
        ] {
            assert!(
                p.iter().any(|m| m.contains(needle)),
                "{needle} missing in {p:?}"
            );
        }
    }

    #[test]
    fn the_cache_is_off_by_default_and_its_bad_keys_are_all_listed() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.cache.max_entries, 0, "off unless asked for");
        let on = Config::parse(&format!(
            "{GOOD}\n[cache]\nmax_entries = 1000\nmax_ttl_s = 60\n"
        ))
        .unwrap();
        assert_eq!((on.cache.max_entries, on.cache.max_ttl_s), (1000, 60));
        let bad = format!("{GOOD}\n[cache]\nmax_entries = 1000000000\nmax_ttl_s = 0\nttl = 5\n");
        let ConfigError::Invalid(p) = Config::parse(&bad).unwrap_err() else {
            panic!()
        };
        for needle in ["cache.max_entries", "cache.max_ttl_s", "`ttl`"] {
            assert!(
                p.iter().any(|m| m.contains(needle)),
                "{needle} missing in {p:?}"
            );
        }
    }

    #[test]
    fn cidrs_parse_with_or_without_a_length() {
        let c: Cidr = "192.0.2.0/24".parse().unwrap();
        assert_eq!(c.len, 24);
        let h: Cidr = "2001:db8::1".parse().unwrap();
        assert_eq!(h.len, 128);
        assert!("192.0.2.1/24".parse::<Cidr>().is_err());
        assert!("0.0.0.0/0".parse::<Cidr>().is_ok());
    }

    #[test]
    fn bad_policy_is_an_error() {
        let text = format!("{GOOD}\n[balance]\npolicy = \"fastest\"\n");
        assert!(Config::parse(&text).is_err());
    }
}
