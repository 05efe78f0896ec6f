//! `openshell-driver-podman`: see the crate's README for flags, config keys
//! and how to run it next to a gateway.

use std::io::IsTerminal as _;
use std::process::ExitCode;

use clap::Parser as _;
use driver_lifecycle::CancellationToken;
use openshell_driver_podman::Cli;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("openshell-driver-podman: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    driver_lifecycle::close_inherited_fds()?;
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(|| driver_lifecycle::LogStderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let exit = runtime.block_on(openshell_driver_podman::run(&cli, CancellationToken::new()))?;
    tracing::debug!(?exit, "exiting");
    Ok(())
}
