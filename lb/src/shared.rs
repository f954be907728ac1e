//! Run-time state shared by every data-plane worker, the health checker and the admin
//! API: the backend set, the tunables SIGHUP may change, metric handles, and where the
//! set is persisted. It sits between the backend set and its users (health, admin,
//! udp, tcp), so none of them imports the start-up code in `server`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;

use crate::backends::{BackendSet, Member, SetError, Snapshot};
use crate::cache::Epoch;
use crate::config::{Config, HealthConfig, Policy};
use crate::metrics;
use crate::state::{self, StateFile};

/// How often a data-plane worker (UDP or TCP) expires timed-out queries and enforces
/// its other timers.
pub(crate) const WORKER_TICK: Duration = Duration::from_millis(50);

/// Settings that SIGHUP may change while traffic flows.
#[derive(Debug, Clone, PartialEq)]
pub struct Tunables {
    /// Selection policy.
    pub policy: Policy,
    /// Per-query timeout.
    pub query_timeout_ms: u64,
    /// Health checks.
    pub health: HealthConfig,
    /// TCP limits (all but `max_connections`, which needs a restart).
    pub tcp: crate::config::Tcp,
    /// Who may query.
    pub acl: crate::edge::Acl,
    /// Response rate limiting (`None`: off); each UDP worker applies it to its own
    /// table.
    pub rate_limit: Option<crate::config::RateLimit>,
}

impl Tunables {
    /// The tunables of a configuration.
    pub fn from_config(c: &Config) -> Self {
        Tunables {
            policy: c.balance.policy,
            query_timeout_ms: c.balance.query_timeout_ms,
            health: c.health.clone(),
            tcp: c.tcp.clone(),
            acl: crate::edge::Acl::new(&c.acl),
            rate_limit: c.rate_limit.clone(),
        }
    }
}

/// State shared by every worker, the health checker and the admin API.
pub struct Shared {
    /// The backend set.
    pub set: BackendSet,
    /// Current tunables; workers look for a new value at every wake-up.
    pub tunables: ArcSwap<Tunables>,
    /// Data-plane metric handles.
    pub metrics: metrics::DataPlane,
    /// Caps TCP client connections over all workers.
    pub tcp_connections: Arc<Semaphore>,
    /// TCP client connections open per client, over all workers.
    pub client_connections: Arc<crate::edge::ClientConns>,
    /// UDP workers running (each applies its share of the rate limit).
    pub udp_workers: usize,
    /// Where the set is persisted.
    pub state_path: PathBuf,
    /// The admin bearer token, if any (reloaded on SIGHUP).
    pub admin_token: ArcSwap<Option<String>>,
    /// When the process started.
    pub started: Instant,
    /// The DNS addresses being served.
    pub dns_addrs: Vec<SocketAddr>,
    /// The packet cache of each worker: its entries (0: off) and their longest life.
    pub cache: CacheShare,
    /// Manual flushes of the packet cache (`DELETE /v1/cache`).
    pub cache_flushes: AtomicU64,
}

/// What each worker's packet cache may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheShare {
    /// Entries per UDP worker; 0 when the cache is off.
    pub udp_entries: usize,
    /// Entries per TCP worker; 0 when the cache is off.
    pub tcp_entries: usize,
    /// An entry's longest life.
    pub max_ttl: Duration,
}

impl CacheShare {
    /// `[cache]` split over the workers so that together they never hold more than
    /// `max_entries` (or one entry each, if that is more): three quarters for the UDP workers, a quarter for the TCP ones
    /// (authoritative traffic is mostly UDP; a TCP client is most often one retrying
    /// a truncated answer, which is never cached), each share split evenly.
    pub fn new(c: &crate::config::CacheConfig, udp_workers: usize, tcp_workers: usize) -> Self {
        // Every worker holds at least one entry when the cache is on.
        let split = |total: usize, workers: usize| match c.max_entries {
            0 => 0,
            _ => (total / workers.max(1)).max(1),
        };
        let tcp_total = c.max_entries / 4;
        CacheShare {
            udp_entries: split(c.max_entries - tcp_total, udp_workers),
            tcp_entries: split(tcp_total, tcp_workers),
            max_ttl: Duration::from_secs(c.max_ttl_s),
        }
    }

    /// Whether the cache is on.
    pub fn enabled(&self) -> bool {
        self.udp_entries > 0
    }
}

impl Shared {
    /// Points a worker's copy of the tunables at the current ones if a reload changed
    /// them: one pointer comparison per wake-up, no atomics per query. A worker calls
    /// it before handling what woke it, so a query read after a reload returned is
    /// handled with the new tunables, on every connection. Returns whether they
    /// changed.
    #[inline]
    pub(crate) fn refresh_tunables(&self, mine: &mut Arc<Tunables>) -> bool {
        let cur = self.tunables.load();
        if !Arc::ptr_eq(&cur, mine) {
            *mine = arc_swap::Guard::into_inner(cur);
            return true;
        }
        false
    }

    /// Flushes every worker's packet cache: a query read after this returns is not
    /// answered from an entry made before it.
    pub fn flush_cache(&self) -> u64 {
        self.cache_flushes.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Manual cache flushes so far.
    #[inline]
    pub fn cache_flushes(&self) -> u64 {
        self.cache_flushes.load(Ordering::Acquire)
    }

    /// The cache epoch of a query that loaded the backend set of `generation`.
    #[inline]
    pub(crate) fn cache_epoch(&self, generation: u64) -> Epoch {
        Epoch {
            generation,
            flushes: self.cache_flushes(),
        }
    }

    /// Changes the backend set under its writer lock, persisting the result before it
    /// becomes visible. Returns the new generation. This blocks on the disk (fsync):
    /// async callers use [`Shared::change_off_runtime`].
    pub fn change(
        &self,
        f: impl FnOnce(&Snapshot) -> Result<Vec<Member>, SetError>,
    ) -> Result<u64, SetError> {
        self.set.update(f, |generation, members| {
            state::save(
                &self.state_path,
                &StateFile {
                    generation,
                    backends: members.to_vec(),
                },
            )
            .map_err(|e| SetError::Rejected(e.to_string()))
        })
    }

    /// [`Shared::change`] on a blocking thread, so that writing the state file never
    /// stalls the runtime that also runs health checks and serves the admin API.
    pub async fn change_off_runtime(
        self: &Arc<Self>,
        f: impl FnOnce(&Snapshot) -> Result<Vec<Member>, SetError> + Send + 'static,
    ) -> Result<u64, SetError> {
        let shared = self.clone();
        tokio::task::spawn_blocking(move || shared.change(f))
            .await
            .unwrap_or_else(|e| Err(SetError::Rejected(format!("changing the set failed: {e}"))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CacheConfig;

    #[test]
    fn the_cache_is_split_within_max_entries_three_quarters_to_udp() {
        let c = |max_entries| CacheConfig {
            max_entries,
            max_ttl_s: 60,
        };
        let s = CacheShare::new(&c(100_000), 2, 4);
        assert_eq!((s.udp_entries, s.tcp_entries), (37_500, 6_250));
        assert!(2 * s.udp_entries + 4 * s.tcp_entries <= 100_000);
        assert!(!CacheShare::new(&c(0), 1, 2).enabled());
        let tiny = CacheShare::new(&c(1), 1, 2);
        assert!(tiny.enabled() && tiny.udp_entries >= 1 && tiny.tcp_entries >= 1);
    }
}
