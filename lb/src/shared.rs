//! Run-time state shared by every data-plane worker, the health checker and the admin
//! API: the backend set, the tunables SIGHUP may change, metric handles, and where the
//! set is persisted. It sits between the backend set and its users (health, admin,
//! udp, tcp), so none of them imports the start-up code in `server`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;

use crate::backends::{BackendSet, Member, SetError, Snapshot};
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
