//! The `dnslb` binary: parses the command line, sets up logging, binds the sockets
//! and runs the server from the library; signals map to shutdown (TERM/INT) and
//! reload (HUP).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
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
    match serve(cli.config, config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::from(1)
        }
    }
}

fn serve(path: PathBuf, config: dnslb::Config) -> anyhow::Result<()> {
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
        let listeners = dnslb::bind(&config).context("binding listeners")?;
        let server = dnslb::Server::start(config, listeners).context("starting")?;
        if let Err(e) = dnslb::systemd::notify("READY=1") {
            tracing::warn!("sd_notify READY=1 failed: {e}");
        }
        let mut failure = None;
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = server.failed() => {
                    failure = Some(anyhow::anyhow!("a data-plane worker failed; exiting so the service manager restarts dnslb"));
                    break;
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
        let _ = dnslb::systemd::notify("STOPPING=1");
        server.shutdown().await.context("shutdown")?;
        failure.map_or(Ok(()), Err)
    })
}
