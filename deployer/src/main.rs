use clap::Parser;

/// Blue-green rollouts of BIND nameservers behind dnslb (not implemented yet).
#[derive(Parser)]
#[command(version = deployer::VERSION)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    anyhow::bail!("deployer: no commands are implemented yet (see issue 4)")
}
