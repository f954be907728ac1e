//! The `dnslb` binary: parses the command line, sets up logging, binds the sockets
//! (or takes passed ones) and runs the server from the library; signals map to
//! shutdown (TERM/INT), reload (HUP) and hitless upgrade (USR2).

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use dnslb::handover::{self, Inherited};
use tokio::io::AsyncReadExt;
use tokio::signal::unix::{signal, SignalKind};

/// DNS load balancer with an atomically swappable backend set.
#[derive(Parser, Debug)]
#[command(name = "dnslb", version = dnslb::VERSION)]
struct Cli {
    /// Configuration file.
    #[arg(long, default_value = "/etc/dnslb/dnslb.toml")]
    config: PathBuf,
    /// Validate the configuration, print every problem, and exit 0 (valid) or 1.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Both read before any thread starts: the path of this binary (before a package
    // can replace the file) for SIGUSR2, and passed sockets (this edits the
    // environment).
    let exe = std::env::current_exe().ok();
    let inherited = handover::take_listen_fds();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let config = match dnslb::Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dnslb: {}: {e}", cli.config.display());
            return ExitCode::from(1);
        }
    };
    if cli.check {
        println!("{}: configuration is valid", cli.config.display());
        return ExitCode::SUCCESS;
    }
    let inherited = match inherited {
        Ok(v) => v,
        Err(e) => {
            tracing::error!("socket activation: {e}");
            return ExitCode::from(1);
        }
    };
    match serve(cli.config, config, inherited, exe) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::from(1)
        }
    }
}

fn serve(
    path: PathBuf,
    config: dnslb::Config,
    inherited: Vec<Inherited>,
    exe: Option<PathBuf>,
) -> anyhow::Result<()> {
    // One thread for the admin API and health checks; the data plane runs on its own
    // worker threads.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("dnslb-admin")
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        // Handlers first: from READY=1 on, the service manager may send SIGHUP
        // (`systemctl reload`) or SIGTERM at any moment, and before a handler is
        // installed either one would kill the process instead. One that arrives
        // during start-up waits for the loop below.
        let mut term = signal(SignalKind::terminate()).context("installing signal handlers")?;
        let mut int = signal(SignalKind::interrupt()).context("installing signal handlers")?;
        let mut hup = signal(SignalKind::hangup()).context("installing signal handlers")?;
        let mut usr2 =
            signal(SignalKind::user_defined2()).context("installing signal handlers")?;
        let listeners = dnslb::bind_with(&config, inherited).context("binding listeners")?;
        // Copies of every listening socket, for the next dnslb on SIGUSR2.
        let copies = listeners
            .handover_copies()
            .context("copying the listening sockets")?;
        let server = dnslb::Server::start(config, listeners).context("starting")?;
        if let Err(e) = dnslb::systemd::notify("READY=1") {
            tracing::warn!("sd_notify READY=1 failed: {e}");
        }
        handover::report_ready();
        let mut failure = None;
        let mut handed_over = false;
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = server.failed() => {
                    failure = Some(anyhow::anyhow!("a data-plane worker failed; exiting so the service manager restarts dnslb"));
                    break;
                }
                _ = usr2.recv() => {
                    let mut up = match start_upgrade(&path, exe.as_deref(), &copies, &server) {
                        Ok(up) => up,
                        Err(e) => {
                            tracing::error!("upgrade failed, still serving: {e:#}");
                            continue;
                        }
                    };
                    // A stop while the child starts wins: the child is stopped with it.
                    let outcome = tokio::select! {
                        r = up.ready() => Some(r),
                        _ = term.recv() => None,
                        _ = int.recv() => None,
                    };
                    match outcome {
                        Some(Ok(pid)) => {
                            tracing::info!(pid, "upgrade: the next dnslb is ready; handing over");
                            handed_over = true;
                            break;
                        }
                        Some(Err(e)) => tracing::error!("upgrade failed, still serving: {e:#}"),
                        None => {
                            tracing::warn!("stop requested during the upgrade: the next dnslb is stopped too");
                            up.abandon().await;
                            break;
                        }
                    }
                }
                _ = hup.recv() => {
                    let _ = dnslb::systemd::notify("RELOADING=1");
                    match dnslb::Config::load(&path) {
                        Ok(c) => if let Err(e) = server.reload(c) {
                            tracing::error!("reload refused: {e}");
                        },
                        Err(e) => tracing::error!("reload refused, keeping the running configuration: {e}"),
                    }
                    let _ = dnslb::systemd::notify("READY=1");
                }
            }
        }
        tracing::info!("shutting down: no new queries, finishing those in flight");
        if handed_over {
            // No STOPPING=1: the service goes on, in the child (MAINPID).
            server.hand_over().await.context("handing over")?;
        } else {
            let _ = dnslb::systemd::notify("STOPPING=1");
            server.shutdown().await.context("shutdown")?;
        }
        failure.map_or(Ok(()), Err)
    })
}

/// An upgrade in progress: the next dnslb, started, not yet ready.
struct Upgrade {
    child: std::process::Child,
    ready: tokio::net::UnixStream,
    pid: u32,
    bin: PathBuf,
    limit: Duration,
}

/// SIGUSR2: starts the next dnslb with every listening socket (after saving health,
/// which it starts from). On failure nothing runs and this process goes on serving.
fn start_upgrade(
    config_path: &Path,
    exe: Option<&Path>,
    copies: &[(OwnedFd, &'static str)],
    server: &dnslb::Server,
) -> anyhow::Result<Upgrade> {
    let cfg = dnslb::Config::load(config_path)
        .with_context(|| format!("{} is not valid; not upgrading", config_path.display()))?;
    let bin = cfg
        .server
        .upgrade_binary
        .as_deref()
        .or(exe)
        .context("no binary to start: set server.upgrade_binary")?
        .to_path_buf();
    server.save_health();
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let fds: Vec<_> = copies.iter().map(|(fd, n)| (fd.as_raw_fd(), *n)).collect();
    let (child, ready) = handover::spawn_upgrade(&bin, &args, &fds)
        .with_context(|| format!("starting {}", bin.display()))?;
    let pid = child.id();
    tracing::info!(pid, binary = %bin.display(), "upgrade: started the next dnslb, waiting until it is ready");
    ready.set_nonblocking(true)?;
    Ok(Upgrade {
        child,
        ready: tokio::net::UnixStream::from_std(ready)?,
        pid,
        bin,
        limit: Duration::from_millis(cfg.server.upgrade_timeout_ms),
    })
}

impl Upgrade {
    /// Waits until the child says it is ready: its process ID. A child that exits
    /// first, or is not ready within the limit, is reaped (killed) and an error.
    async fn ready(&mut self) -> anyhow::Result<u32> {
        let mut buf = [0u8; 16];
        let pid = self.pid;
        match tokio::time::timeout(self.limit, self.ready.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => Ok(pid),
            Ok(_) => {
                // It closed its end without a word: it is exiting.
                let status = self.reap(false).await?;
                anyhow::bail!(
                    "the next dnslb (pid {pid}, {}) exited before it was ready: {status}",
                    self.bin.display()
                )
            }
            Err(_) => {
                self.reap(true).await?;
                anyhow::bail!(
                    "the next dnslb (pid {pid}) was not ready within {} ms; killed it",
                    self.limit.as_millis()
                )
            }
        }
    }

    /// Stops a child that is not ready yet.
    async fn abandon(mut self) {
        let _ = self.reap(true).await;
    }

    async fn reap(&mut self, kill: bool) -> anyhow::Result<std::process::ExitStatus> {
        if kill {
            let _ = self.child.kill();
        }
        // The child has exited or been killed: the wait is short.
        Ok(tokio::task::block_in_place(|| self.child.wait())?)
    }
}
