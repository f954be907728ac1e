//! Start-up and shutdown (and the SIGHUP entry point), nothing else: the state the
//! running parts share lives in [`crate::shared`], and no module imports this one.
//! [`Server::start`] loads the backend set (state file first, `[[backend]]` as the
//! seed), starts the data plane (`server.workers` UDP threads and `server.tcp_workers`
//! TCP threads, each sleeping in its own epoll loop and owning its sockets), the health
//! checker and the admin API. [`Server::reload`] applies new tunables.
//! [`Server::shutdown`] stops accepting, lets in-flight queries finish within the
//! grace period, then stops the health checker and the admin API.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::{oneshot, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::backends::{BackendSet, Health, Member, SetError};
use crate::config::Config;
use crate::control::Control;
use crate::shared::{Shared, Tunables};
use crate::sockets::Listeners;
use crate::state::{self, StateFile};
use crate::{admin, health, metrics, tcp, udp};

/// Errors that stop the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The state file could not be read or written.
    #[error(transparent)]
    State(#[from] state::StateError),
    /// The seed backends are invalid.
    #[error("backend set: {0}")]
    Set(#[from] SetError),
    /// The admin token file could not be read.
    #[error("admin token file {path}: {source}")]
    Token {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A worker thread could not start.
    #[error("starting worker: {0}")]
    Worker(io::Error),
}

/// A running dnslb.
pub struct Server {
    shared: Arc<Shared>,
    fatal: CancellationToken,
    workers: Vec<(
        std::thread::JoinHandle<()>,
        oneshot::Receiver<io::Result<()>>,
    )>,
    /// Every worker's drain and stop switch, UDP and TCP.
    controls: Vec<Arc<Control>>,
    background: CancellationToken,
    admin: tokio::task::JoinHandle<()>,
    health: tokio::task::JoinHandle<()>,
    grace: Duration,
    admin_addr: SocketAddr,
    /// The configuration the process started with: what restart-only keys compare to.
    started_with: Config,
    config: Mutex<Config>,
}

fn read_token(config: &Config) -> Result<Option<String>, StartError> {
    match &config.admin.token_file {
        None => Ok(None),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| StartError::Token {
                path: path.clone(),
                source,
            })?;
            let token = text.trim().to_string();
            if token.is_empty() {
                return Err(StartError::Token {
                    path: path.clone(),
                    source: io::Error::new(io::ErrorKind::InvalidData, "file is empty"),
                });
            }
            Ok(Some(token))
        }
    }
}

impl Server {
    /// Starts serving on `listeners` (bound by the caller). Must be called within a
    /// tokio runtime, which will host the admin API and health checks.
    pub fn start(config: Config, listeners: Listeners) -> Result<Server, StartError> {
        let prometheus = metrics::install();
        let token = read_token(&config)?;
        let (generation, members) = match state::load(&config.state.path)? {
            Some(s) => {
                tracing::info!(
                    path = %config.state.path.display(),
                    generation = s.generation,
                    backends = s.backends.len(),
                    "backend set restored from the state file"
                );
                (s.generation, s.backends)
            }
            None => {
                let members: Vec<Member> = config
                    .backend
                    .iter()
                    .map(|b| Member {
                        spec: b.clone(),
                        state: Default::default(),
                    })
                    .collect();
                let s = StateFile {
                    generation: 1,
                    backends: members,
                };
                state::save(&config.state.path, &s)?;
                tracing::info!(
                    path = %config.state.path.display(),
                    backends = s.backends.len(),
                    "no state file yet: backend set seeded from the configuration"
                );
                (s.generation, s.backends)
            }
        };
        let dns_addrs = listeners.dns_addrs();
        let admin_addr = listeners.admin_addr();
        let shared = Arc::new(Shared {
            set: BackendSet::new(generation, &members)?,
            tunables: ArcSwap::from_pointee(Tunables::from_config(&config)),
            metrics: metrics::DataPlane::new(),
            tcp_connections: Arc::new(Semaphore::new(config.tcp.max_connections)),
            client_connections: Arc::default(),
            udp_workers: listeners.udp.len(),
            state_path: config.state.path.clone(),
            admin_token: ArcSwap::from_pointee(token),
            started: Instant::now(),
            dns_addrs: dns_addrs.clone(),
            cache: crate::shared::CacheShare::new(
                &config.cache,
                listeners.udp.len(),
                listeners.tcp.len(),
            ),
            cache_flushes: AtomicU64::new(0),
        });
        carry_health(&shared);
        let fatal = CancellationToken::new();
        let mut workers = Vec::new();
        let mut controls = Vec::new();
        let mut udp_count = 0;
        let tcp_count = listeners.tcp.len();
        for (i, udp_sockets) in listeners.udp.into_iter().enumerate() {
            let (tx, rx) = oneshot::channel();
            let control = Control::new().map_err(StartError::Worker)?;
            // The worker's buffers hold raw pointers for the kernel, so it is built on
            // its own thread; start-up waits to hear that it was.
            let (built_tx, built_rx) = std::sync::mpsc::sync_channel(1);
            let handle = {
                let (control, fatal, shared) = (control.clone(), fatal.clone(), shared.clone());
                let buffer = config.server.udp_socket_buffer;
                std::thread::Builder::new()
                    .name(format!("dnslb-udp-{i}"))
                    .spawn(move || {
                        let udp_worker = match udp::UdpWorker::new(shared, udp_sockets, buffer) {
                            Ok(w) => {
                                let _ = built_tx.send(Ok(()));
                                w
                            }
                            Err(e) => {
                                let _ = built_tx.send(Err(e));
                                return;
                            }
                        };
                        let result = udp_worker.run(&control);
                        if let Err(e) = &result {
                            tracing::error!("data-plane worker failing: UDP: {e}");
                            fatal.cancel();
                        }
                        let _ = tx.send(result);
                    })
                    .map_err(StartError::Worker)?
            };
            built_rx
                .recv()
                .unwrap_or_else(|_| Err(io::Error::other("UDP worker thread died")))
                .map_err(StartError::Worker)?;
            workers.push((handle, rx));
            controls.push(control);
            udp_count += 1;
        }
        for (i, tcp) in listeners.tcp.into_iter().enumerate() {
            let (tx, rx) = oneshot::channel();
            let control = Control::new().map_err(StartError::Worker)?;
            let tcp_worker =
                tcp::TcpWorker::new(shared.clone(), tcp).map_err(StartError::Worker)?;
            let handle = {
                let (control, fatal) = (control.clone(), fatal.clone());
                std::thread::Builder::new()
                    .name(format!("dnslb-tcp-{i}"))
                    .spawn(move || {
                        let result = tcp_worker.run(&control, &|| fatal.cancel());
                        if let Err(e) = &result {
                            tracing::error!("data-plane worker failed: TCP: {e}");
                            fatal.cancel();
                        }
                        let _ = tx.send(result);
                    })
                    .map_err(StartError::Worker)?
            };
            workers.push((handle, rx));
            controls.push(control);
        }
        for a in &dns_addrs {
            tracing::info!(
                "listening for UDP and TCP on {a} ({udp_count} UDP and {tcp_count} TCP workers)"
            );
        }
        let background = CancellationToken::new();
        let health = tokio::spawn(health::run(shared.clone(), background.clone()));
        let admin = admin::serve(
            listeners.admin,
            admin::AdminState::new(shared.clone(), prometheus),
            background.clone(),
        );
        tracing::info!("admin API listening on http://{admin_addr}");
        Ok(Server {
            shared,
            fatal,
            workers,
            controls,
            background,
            admin,
            health,
            grace: Duration::from_millis(config.server.shutdown_grace_ms),
            admin_addr,
            started_with: config.clone(),
            config: Mutex::new(config),
        })
    }

    /// State shared with the data plane (for tests and embedding).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Resolves when a data-plane worker failed (its listeners are gone): the process
    /// should shut down and exit non-zero so the service manager restarts it.
    pub async fn failed(&self) {
        self.fatal.cancelled().await
    }

    /// The admin API address actually bound.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Applies the tunables of `new` (SIGHUP); reports settings that need a restart.
    pub fn reload(&self, new: Config) -> Result<(), StartError> {
        let token = read_token(&new)?;
        let mut cur = self.config.lock().unwrap_or_else(|e| e.into_inner());
        let old = &self.started_with;
        let fixed = [
            ("[listen]", old.listen != new.listen),
            ("[state]", old.state != new.state),
            ("[server]", old.server != new.server),
            (
                "tcp.max_connections",
                old.tcp.max_connections != new.tcp.max_connections,
            ),
            ("[cache]", old.cache != new.cache),
        ];
        for (key, changed) in fixed {
            if changed {
                tracing::warn!("reload: {key} differs from the running process; it takes effect only after a restart");
            }
        }
        if cur.backend != new.backend {
            tracing::warn!(
                "reload: [[backend]] changed and is ignored: the live set comes from the state file; change it with the admin API"
            );
        }
        self.shared
            .tunables
            .store(Arc::new(Tunables::from_config(&new)));
        self.shared.admin_token.store(Arc::new(token));
        *cur = new;
        tracing::info!("configuration reloaded");
        Ok(())
    }

    /// Writes every backend's health beside the state file, for the next process
    /// (an upgrade's child, or the one a restart starts). A failure is logged: the
    /// next process then learns health anew.
    pub fn save_health(&self) {
        let snap = self.shared.set.snapshot();
        let backends = snap
            .entries
            .iter()
            .map(|e| state::CarriedHealth {
                name: e.spec.name.clone(),
                address: e.spec.address,
                health: e.runtime.health(),
            })
            .collect();
        if let Err(e) = state::save_health(&self.shared.state_path, backends) {
            tracing::warn!("health not carried to the next process: {e}");
        }
    }

    /// Hands over to an upgrade's child that is ready: the admin API and health
    /// checks stop first (the child answers them now, from the same listener), then
    /// the data plane drains as on SIGTERM.
    pub async fn hand_over(self) -> io::Result<()> {
        self.background.cancel();
        self.shutdown().await
    }

    /// Stops accepting queries, waits up to the grace period for those in flight,
    /// then stops health checks and the admin API. Health is saved first, for the
    /// next process.
    pub async fn shutdown(self) -> io::Result<()> {
        self.save_health();
        for c in &self.controls {
            c.drain();
        }
        let started = Instant::now();
        let mut result = Ok(());
        for (handle, mut rx) in self.workers {
            let left = self.grace.saturating_sub(started.elapsed());
            let r = match tokio::time::timeout(left, &mut rx).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!(
                        "grace period of {:?} ran out; dropping queries still in flight",
                        self.grace
                    );
                    for c in &self.controls {
                        c.hard_stop();
                    }
                    rx.await
                }
            };
            match r {
                Ok(Err(e)) => result = Err(e),
                Err(_) => result = Err(io::Error::other("worker thread panicked")),
                Ok(Ok(())) => {}
            }
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        self.background.cancel();
        let _ = self.health.await;
        let _ = self.admin.await;
        tracing::info!("stopped");
        result
    }
}

/// Health a previous process left beside the state file (fresh, same name and
/// address) is where each backend starts, instead of unknown.
fn carry_health(shared: &Shared) {
    let Some(h) = state::load_health(&shared.state_path) else {
        return;
    };
    let snap = shared.set.snapshot();
    for e in &snap.entries {
        if let Some(c) = h
            .backends
            .iter()
            .find(|c| c.name == e.spec.name && c.address == e.spec.address)
        {
            if c.health != Health::Unknown {
                e.runtime
                    .set_health(c.health, "carried over from the previous dnslb process");
            }
        }
    }
}

/// Runs a server until `shutdown` is cancelled, then shuts it down gracefully.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let server = Server::start(config, listeners)?;
    shutdown.cancelled().await;
    server.shutdown().await?;
    Ok(())
}
