//! Edge protection: what keeps a public dnslb from being abused. Three parts, each
//! owned by whoever uses it:
//!
//! - [`Acl`]: the `[acl]` allow/deny CIDR lists, checked for every UDP datagram and
//!   every TCP connection at accept. Immutable, part of the SIGHUP tunables.
//! - [`RateLimiter`]: response rate limiting (`[rate_limit]`) of UDP answers per
//!   client prefix. Each UDP worker owns one; nothing in it is shared, so the hot
//!   path takes no lock and touches no cache line another worker writes.
//! - [`ClientConns`]: TCP connections open per client, over every TCP worker
//!   (`tcp.max_connections_per_client`). Taken at accept and given back at close, never
//!   per query.
//!
//! # Why per-worker rate limiting with a share of the rate
//! A UDP worker owns one SO_REUSEPORT socket per listen address and the kernel hashes
//! each datagram's 4-tuple, source port included, to one of them. One client socket
//! always lands on the same worker, but a prefix's traffic in general does not: a
//! recursive resolver randomizes its source port for every query (RFC 5452), and so
//! does a spoofed amplification flood. Such traffic spreads evenly over the workers,
//! so each worker gives each prefix `1/workers` of `responses_per_second` and of
//! `burst` (at least one token): the prefix gets the configured rate over all workers,
//! never `workers` times it, without one worker's table being shared. A single client
//! socket that stays on one worker gets that worker's share; `server.workers`
//! defaults to half the CPUs, one on a two-core host, where the share is the whole.
//!
//! # Why queries are limited before they are forwarded
//! Every forwarded query becomes one answer, so dnslb counts the answer when the
//! query arrives and does not forward a query whose answer would be dropped: a flood
//! costs BIND nothing and never fills the in-flight table. (BIND's own RRL accounts at
//! response time and can tell answers apart by name and RCODE; dnslb sees only
//! header and question on its hot path, so it limits all answers of a prefix alike.)

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::config::{mask_ip, parse_cidrs, AclConfig, Cidr, RateLimit};

/// An IP address as one table key: IPv4 as its IPv4-mapped IPv6 form, so both
/// families share one key space without colliding (IPv4-mapped IPv6 sources, from a
/// dual-stack socket, are canonicalized to the IPv4 client they are first).
#[inline]
fn key_of(ip: IpAddr) -> u128 {
    match ip.to_canonical() {
        IpAddr::V4(a) => u128::from(a.to_ipv6_mapped()),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// Networks of both families, as (network, mask) numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Nets {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

impl Nets {
    fn new(cidrs: &[Cidr]) -> Self {
        let mut n = Nets::default();
        for c in cidrs {
            match c.addr {
                IpAddr::V4(a) => {
                    let m = u32::MAX.checked_shl(32 - u32::from(c.len)).unwrap_or(0);
                    n.v4.push((u32::from(a) & m, m));
                }
                IpAddr::V6(a) => {
                    let m = u128::MAX.checked_shl(128 - u32::from(c.len)).unwrap_or(0);
                    n.v6.push((u128::from(a) & m, m));
                }
            }
        }
        n
    }

    /// Whether `ip` (canonical: IPv4-mapped IPv6 is IPv4) is in one of the networks
    /// of its family: one AND and compare per entry (operators' lists are short).
    #[inline]
    fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                self.v4.iter().any(|&(net, m)| a & m == net)
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                self.v6.iter().any(|&(net, m)| a & m == net)
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    fn covers_everyone(&self) -> bool {
        self.v4.iter().any(|&(_, m)| m == 0) && self.v6.iter().any(|&(_, m)| m == 0)
    }
}

/// The `[acl]` lists, ready to check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    allow: Nets,
    deny: Nets,
    /// Allow covers every address and deny is empty (the default): no check at all.
    open: bool,
}

impl Acl {
    /// Builds the lists of a validated configuration (an entry that does not parse,
    /// which `validate()` rules out, is left out).
    pub fn new(c: &AclConfig) -> Self {
        let allow = Nets::new(&parse_cidrs("", &c.allow).unwrap_or_default());
        let deny = Nets::new(&parse_cidrs("", &c.deny).unwrap_or_default());
        let open = deny.is_empty() && allow.covers_everyone();
        Acl { allow, deny, open }
    }

    /// Whether `ip` may query: not denied, and allowed.
    #[inline]
    pub fn allows(&self, ip: IpAddr) -> bool {
        if self.open {
            return true;
        }
        let ip = ip.to_canonical();
        !self.deny.contains(ip) && self.allow.contains(ip)
    }
}

/// What the rate limiter says about one query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Under the limit (or exempt, or limiting is off): answer it.
    Pass,
    /// Limited: no answer.
    Drop,
    /// Limited, and its turn to slip: an empty TC=1 answer.
    Slip,
}

/// One tracked prefix: its bucket and its place in the recency list.
#[derive(Clone, Copy)]
struct Entry {
    key: u128,
    tokens: f64,
    /// Nanoseconds since the limiter's epoch at the last refill.
    last: u64,
    /// Queries limited so far (for `slip`).
    limited: u32,
    prev: u32,
    next: u32,
}

const NIL: u32 = u32::MAX;

/// The settings one worker applies (its share of the configured rate and table).
#[derive(Debug, Clone, PartialEq)]
struct Params {
    /// Tokens per nanosecond.
    per_ns: f64,
    burst: f64,
    v4_prefix: u8,
    v6_prefix: u8,
    slip: u32,
    exempt: Nets,
    capacity: usize,
}

/// One UDP worker's response rate limiter: a bounded table of token buckets keyed by
/// client prefix, with the least recently seen prefix evicted when it is full. Every
/// operation is O(1): one hash lookup (SipHash with a random key, since the keys are
/// the attacker's) and a few index writes to move the entry to the front of the
/// recency list. The table is allocated once, at its full size, when limiting is
/// configured; no query allocates.
pub struct RateLimiter {
    params: Option<Params>,
    /// The configuration the parameters were made from (to notice reloads).
    source: Option<RateLimit>,
    workers: usize,
    index: HashMap<u128, u32, RandomState>,
    entries: Vec<Entry>,
    /// Most recently seen, least recently seen.
    head: u32,
    tail: u32,
    epoch: Instant,
    /// Prefixes forgotten to make room, since the last [`RateLimiter::take_evicted`].
    evicted: u64,
}

impl RateLimiter {
    /// A limiter for one of `workers` UDP workers, configured from `config` (`None`:
    /// off).
    pub fn new(config: Option<&RateLimit>, workers: usize) -> Self {
        let mut r = RateLimiter {
            params: None,
            source: None,
            workers: workers.max(1),
            index: HashMap::default(),
            entries: Vec::new(),
            head: NIL,
            tail: NIL,
            epoch: Instant::now(),
            evicted: 0,
        };
        r.configure(config);
        r
    }

    /// Applies a (reloaded) configuration. Buckets are kept if only the rate, burst,
    /// slip or exemptions changed; a new prefix length or table size starts afresh.
    pub fn configure(&mut self, config: Option<&RateLimit>) {
        if self.source.as_ref() == config {
            return;
        }
        self.source = config.cloned();
        let Some(c) = config else {
            self.params = None;
            self.index = HashMap::default();
            self.entries = Vec::new();
            self.head = NIL;
            self.tail = NIL;
            return;
        };
        let n = self.workers as f64;
        let p = Params {
            per_ns: f64::from(c.responses_per_second) / n / 1e9,
            burst: (f64::from(c.burst) / n).max(1.0),
            v4_prefix: c.ipv4_prefix.min(32),
            v6_prefix: c.ipv6_prefix.min(128),
            slip: c.slip,
            exempt: Nets::new(&parse_cidrs("", &c.exempt).unwrap_or_default()),
            capacity: c.max_clients.div_ceil(self.workers).max(1),
        };
        let same_table = self.params.as_ref().is_some_and(|o| {
            o.v4_prefix == p.v4_prefix && o.v6_prefix == p.v6_prefix && o.capacity == p.capacity
        });
        if !same_table {
            self.index = HashMap::with_capacity(p.capacity);
            self.entries = Vec::with_capacity(p.capacity);
            self.head = NIL;
            self.tail = NIL;
        }
        self.params = Some(p);
    }

    /// Whether limiting is on.
    #[inline]
    pub fn enabled(&self) -> bool {
        self.params.is_some()
    }

    /// Prefixes tracked now.
    pub fn tracked(&self) -> usize {
        self.entries.len()
    }

    /// Prefixes evicted since the last call.
    pub fn take_evicted(&mut self) -> u64 {
        std::mem::take(&mut self.evicted)
    }

    /// Charges one answer to `ip`'s prefix at `now`.
    #[inline]
    pub fn check(&mut self, ip: IpAddr, now: Instant) -> Verdict {
        let Some(p) = &self.params else {
            return Verdict::Pass;
        };
        let ip = ip.to_canonical();
        if p.exempt.contains(ip) {
            return Verdict::Pass;
        }
        let prefix = match ip {
            IpAddr::V4(_) => key_of(mask_ip(ip, p.v4_prefix)),
            IpAddr::V6(_) => key_of(mask_ip(ip, p.v6_prefix)),
        };
        let (per_ns, burst, slip) = (p.per_ns, p.burst, p.slip);
        let capacity = p.capacity;
        let t = now.saturating_duration_since(self.epoch).as_nanos() as u64;
        let i = match self.index.get(&prefix) {
            Some(&i) => {
                self.unlink(i);
                i
            }
            None => self.insert(prefix, burst, t, capacity),
        };
        self.push_front(i);
        let e = &mut self.entries[i as usize];
        e.tokens = (e.tokens + t.saturating_sub(e.last) as f64 * per_ns).min(burst);
        e.last = t;
        if e.tokens >= 1.0 {
            e.tokens -= 1.0;
            return Verdict::Pass;
        }
        e.limited = e.limited.wrapping_add(1);
        if slip != 0 && e.limited.is_multiple_of(slip) {
            Verdict::Slip
        } else {
            Verdict::Drop
        }
    }

    /// A new entry for `key` with a full bucket: a free place while the table has
    /// room, else the least recently seen entry's (unlinked, ready to push).
    fn insert(&mut self, key: u128, burst: f64, t: u64, capacity: usize) -> u32 {
        let fresh = Entry {
            key,
            tokens: burst,
            last: t,
            limited: 0,
            prev: NIL,
            next: NIL,
        };
        let i = if self.entries.len() < capacity {
            self.entries.push(fresh);
            (self.entries.len() - 1) as u32
        } else {
            let i = self.tail;
            self.unlink(i);
            let old = self.entries[i as usize].key;
            self.index.remove(&old);
            self.entries[i as usize] = fresh;
            self.evicted += 1;
            i
        };
        self.index.insert(key, i);
        i
    }

    fn unlink(&mut self, i: u32) {
        let Entry { prev, next, .. } = self.entries[i as usize];
        if prev == NIL {
            self.head = next;
        } else {
            self.entries[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.entries[next as usize].prev = prev;
        }
    }

    fn push_front(&mut self, i: u32) {
        let old = self.head;
        {
            let e = &mut self.entries[i as usize];
            e.prev = NIL;
            e.next = old;
        }
        if old == NIL {
            self.tail = i;
        } else {
            self.entries[old as usize].prev = i;
        }
        self.head = i;
    }
}

/// TCP client connections open per client over all TCP workers. A client is an IPv4
/// address or an IPv6 /64 (what one host usually gets). Connections from one client
/// land on every worker (SO_REUSEPORT hashes the source port too), so the count is
/// shared: in 64 shards chosen by the client's address, each a small mutex taken only
/// at accept and at close, never per query, so workers accepting different clients
/// rarely meet. Each map holds only clients with a connection open, so it is bounded
/// by `tcp.max_connections`.
pub struct ClientConns {
    shards: [Mutex<HashMap<u128, u32>>; SHARDS],
}

const SHARDS: usize = 64;

impl Default for ClientConns {
    fn default() -> Self {
        ClientConns {
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
        }
    }
}

/// One open connection's place in [`ClientConns`]; given back when dropped.
pub struct ClientSlot {
    conns: Arc<ClientConns>,
    key: u128,
}

impl ClientConns {
    fn client_key(ip: IpAddr) -> u128 {
        match ip.to_canonical() {
            v4 @ IpAddr::V4(_) => key_of(v4),
            v6 @ IpAddr::V6(_) => key_of(mask_ip(v6, 64)),
        }
    }

    fn shard(&self, key: u128) -> &Mutex<HashMap<u128, u32>> {
        let h = (key ^ (key >> 64)) as u64;
        &self.shards[(h.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 58) as usize % SHARDS]
    }

    /// Takes a slot for a connection from `ip` if it has fewer than `max` open.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<ClientSlot> {
        let key = Self::client_key(ip);
        let mut m = self.shard(key).lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(key).or_insert(0);
        if *n as usize >= max {
            if *n == 0 {
                m.remove(&key);
            }
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            conns: self.clone(),
            key,
        })
    }

    /// Connections open from `ip`'s client.
    pub fn open(&self, ip: IpAddr) -> u32 {
        let key = Self::client_key(ip);
        let m = self.shard(key).lock().unwrap_or_else(|e| e.into_inner());
        m.get(&key).copied().unwrap_or(0)
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut m = self
            .conns
            .shard(self.key)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn acl(allow: &[&str], deny: &[&str]) -> Acl {
        Acl::new(&AclConfig {
            allow: allow.iter().map(|s| s.to_string()).collect(),
            deny: deny.iter().map(|s| s.to_string()).collect(),
        })
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn acl_denies_first_then_needs_an_allow_for_either_family() {
        let a = acl(&["10.0.0.0/8", "2001:db8::/32"], &["10.1.0.0/16"]);
        assert!(a.allows(ip("10.2.3.4")));
        assert!(!a.allows(ip("10.1.3.4")));
        assert!(!a.allows(ip("11.0.0.1")));
        assert!(a.allows(ip("2001:db8::1")));
        assert!(!a.allows(ip("2001:db9::1")));
        // A v4-mapped source is the IPv4 client.
        assert!(a.allows(ip("::ffff:10.2.3.4")));
        assert!(!a.allows(ip("::ffff:10.1.3.4")));
        let d = Acl::new(&AclConfig::default());
        assert!(d.open && d.allows(ip("1.2.3.4")) && d.allows(ip("::1")));
        // Only IPv4 allowed: IPv6 is refused.
        let v4 = acl(&["0.0.0.0/0"], &[]);
        assert!(!v4.open && v4.allows(ip("8.8.8.8")) && !v4.allows(ip("::1")));
        let host = acl(&["127.0.0.2"], &[]);
        assert!(host.allows(ip("127.0.0.2")) && !host.allows(ip("127.0.0.3")));
    }

    fn rl(rps: u32, burst: u32, slip: u32, max_clients: usize) -> RateLimit {
        RateLimit {
            responses_per_second: rps,
            burst,
            ipv4_prefix: 24,
            ipv6_prefix: 56,
            slip,
            exempt: vec!["192.0.2.1/32".into()],
            max_clients,
        }
    }

    #[test]
    fn a_prefix_gets_its_burst_then_its_rate_and_every_slip_th_is_tc() {
        let mut r = RateLimiter::new(Some(&rl(10, 5, 2, 100)), 1);
        let t0 = Instant::now();
        let verdicts: Vec<Verdict> = (0..9).map(|_| r.check(ip("198.51.100.7"), t0)).collect();
        assert_eq!(&verdicts[..5], &[Verdict::Pass; 5]);
        assert_eq!(
            &verdicts[5..],
            &[Verdict::Drop, Verdict::Slip, Verdict::Drop, Verdict::Slip]
        );
        // Same /24: same bucket. Another /24: its own.
        assert_eq!(r.check(ip("198.51.100.8"), t0), Verdict::Drop);
        assert_eq!(r.check(ip("198.51.101.8"), t0), Verdict::Pass);
        // Exempt, always.
        for _ in 0..100 {
            assert_eq!(r.check(ip("192.0.2.1"), t0), Verdict::Pass);
        }
        // 10/s: after 300 ms, three more.
        let t1 = t0 + Duration::from_millis(300);
        let passed = (0..10)
            .filter(|_| r.check(ip("198.51.100.7"), t1) == Verdict::Pass)
            .count();
        assert_eq!(passed, 3);
        // slip 0: no TC ever.
        let mut d = RateLimiter::new(Some(&rl(1, 1, 0, 10)), 1);
        assert!((0..50)
            .map(|_| d.check(ip("203.0.113.1"), t0))
            .all(|v| v != Verdict::Slip));
    }

    #[test]
    fn workers_share_the_rate_and_the_table_is_bounded_evicting_the_oldest() {
        let mut r = RateLimiter::new(Some(&rl(10, 8, 0, 4)), 2);
        let t0 = Instant::now();
        let passed = (0..20)
            .filter(|_| r.check(ip("198.51.100.7"), t0) == Verdict::Pass)
            .count();
        assert_eq!(passed, 4, "half the burst on each of two workers");
        // Capacity 2 per worker: a third prefix evicts the least recently seen.
        let a = ip("10.0.1.1");
        let b = ip("10.0.2.1");
        r.check(a, t0);
        r.check(b, t0);
        assert_eq!(r.tracked(), 2);
        assert_eq!(r.take_evicted(), 1, "198.51.100.0/24 made room for b");
        let _ = r.check(a, t0); // a is now the most recent: b is evicted next.
        r.check(ip("10.0.3.1"), t0);
        assert_eq!(r.take_evicted(), 1);
        assert!(r.index.contains_key(&key_of(ip("10.0.1.0"))));
        assert!(!r.index.contains_key(&key_of(ip("10.0.2.0"))));
        // Thousands of prefixes never grow it.
        for i in 0..5000u32 {
            r.check(IpAddr::from((i << 8).to_be_bytes()), t0);
        }
        assert_eq!(r.tracked(), 2);
    }

    #[test]
    fn ipv6_clients_are_grouped_by_their_prefix_and_reload_keeps_or_resets() {
        let mut r = RateLimiter::new(Some(&rl(1, 1, 0, 10)), 1);
        let t0 = Instant::now();
        assert_eq!(r.check(ip("2001:db8:0:1::1"), t0), Verdict::Pass);
        assert_eq!(
            r.check(ip("2001:db8:0:2::1"), t0),
            Verdict::Drop,
            "same /56"
        );
        assert_eq!(r.check(ip("2001:db8:1::1"), t0), Verdict::Pass);
        // A new rate keeps the buckets; a new prefix length starts afresh.
        r.configure(Some(&rl(2, 1, 0, 10)));
        assert_eq!(r.check(ip("2001:db8:0:1::1"), t0), Verdict::Drop);
        let mut c = rl(2, 1, 0, 10);
        c.ipv6_prefix = 64;
        r.configure(Some(&c));
        assert_eq!(r.check(ip("2001:db8:0:1::1"), t0), Verdict::Pass);
        r.configure(None);
        assert!(!r.enabled());
        assert_eq!(r.check(ip("2001:db8:0:1::1"), t0), Verdict::Pass);
    }

    #[test]
    fn client_connection_slots_are_capped_per_client_and_given_back() {
        let c = Arc::new(ClientConns::default());
        let a = ip("127.0.0.2");
        let held: Vec<_> = (0..3).filter_map(|_| c.try_acquire(a, 3)).collect();
        assert_eq!(held.len(), 3);
        assert!(c.try_acquire(a, 3).is_none());
        assert!(c.try_acquire(ip("127.0.0.3"), 3).is_some());
        // IPv6: one /64 is one client.
        let _x = c.try_acquire(ip("2001:db8::1"), 1).unwrap();
        assert!(c.try_acquire(ip("2001:db8::2"), 1).is_none());
        drop(held);
        assert_eq!(c.open(a), 0);
        assert!(c.try_acquire(a, 3).is_some());
    }
}
