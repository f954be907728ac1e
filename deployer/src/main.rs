//! The `deployer` binary: parses the command line into a validated config, builds the
//! provider, runs one command of the library and picks the exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use deployer::config::ProviderKind;
use deployer::provider::{linode::Linode, local::Local, AnyProvider};
use deployer::{Config, Deployer};

/// Blue-green rollouts of BIND nameservers behind dnslb.
#[derive(Parser)]
#[command(name = "deployer", version = deployer::VERSION)]
struct Cli {
    /// Configuration file.
    #[arg(long, global = true, default_value = "deployer.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print what a rollout would do now; change nothing.
    Plan,
    /// Create the first nameservers and point the load balancers at them.
    Bootstrap,
    /// Replace every nameserver blue-green; exit 0 only when it completed.
    Rollout,
    /// Replace every load balancer blue-green through the parent zone's delegation.
    RolloutLbs,
    /// Instances, each load balancer's backend set, any unfinished rollout.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Undo an interrupted or failed rollout.
    Rollback {
        /// Restore load balancers even where their set changed since the rollout
        /// swapped them.
        #[arg(long)]
        force: bool,
    },
    /// Delete every instance the deployer manages (for local demos).
    Destroy {
        /// Confirm.
        #[arg(long)]
        yes: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("deployer: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(cli.command, cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("deployer: error: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run(command: Command, cfg: Config) -> Result<(), String> {
    if let Command::Destroy { yes: false } = command {
        return Err("destroy deletes every managed instance; confirm with --yes".into());
    }
    let provider = match cfg.provider.kind {
        ProviderKind::Local => {
            AnyProvider::Local(Local::new(&cfg.provider.state_dir, &cfg.ansible.zones_dir))
        }
        ProviderKind::Linode => AnyProvider::Linode(Box::new(
            Linode::new(&cfg.provider, &cfg.ansible.zones_dir).map_err(|e| e.to_string())?,
        )),
    };
    let d = Deployer::new(cfg, provider).map_err(|e| e.to_string())?;
    let e = |e: deployer::rollout::DeployError| e.to_string();
    match command {
        Command::Plan => {
            for line in d.plan().await.map_err(e)? {
                println!("{line}");
            }
        }
        Command::Bootstrap => {
            let servers = d.bootstrap().await.map_err(e)?;
            for (ns, i) in servers {
                println!(
                    "{ns}: {} ({}) {}",
                    i.label,
                    i.id,
                    i.dns_addr().map(|a| a.to_string()).unwrap_or_default()
                );
            }
        }
        Command::Rollout => {
            let r = d.rollout().await.map_err(e)?;
            println!(
                "rollout {} completed in {:.1}s; {} verification queries; servers: {}",
                r.id,
                r.seconds,
                r.verification_queries,
                r.servers
                    .iter()
                    .map(|(ns, i)| format!("{ns}={} ({})", i.label, i.id))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Command::RolloutLbs => println!("{}", d.rollout_lbs().await.map_err(e)?),
        Command::Status { json } => {
            let s = d.status().await.map_err(e)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s).expect("serializes"));
            } else {
                print!("{s}");
            }
        }
        Command::Rollback { force } => println!("{}", d.rollback(force).await.map_err(e)?),
        Command::Destroy { .. } => {
            let gone = d.destroy().await.map_err(e)?;
            println!(
                "deleted {} instance(s){}",
                gone.len(),
                if gone.is_empty() {
                    String::new()
                } else {
                    format!(": {}", gone.join(", "))
                }
            );
        }
    }
    Ok(())
}
