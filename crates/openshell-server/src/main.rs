//! `openshell-gateway`: parse the configuration, set up logging, run.
//!
//! Exit status: 0 after a clean stop, 2 for configuration errors (nothing was
//! started), 1 for any other failure.

use std::process::ExitCode;

use openshell_server::config::{self, LogFormat};
use openshell_server::error::error_chain;
use openshell_server::settings::{self, Settings};
use tracing_subscriber::EnvFilter;

fn init_logging(settings: &Settings) -> Result<(), String> {
    let filter = match &settings.log_level {
        Some(level) => EnvFilter::try_new(level)
            .map_err(|e| format!("log level {level:?} is not a valid filter: {e}"))?,
        None => EnvFilter::new("info"),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(|| driver_lifecycle::LogStderr);
    match settings.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(())
}

/// `openshell-gateway certs init DIR ...`: write certificates and exit.
fn certs_main(args: Vec<std::ffi::OsString>) -> ExitCode {
    use clap::Parser as _;
    use openshell_server::certs::{CertsCli, CertsCommand};
    let cli = match CertsCli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    let CertsCommand::Init(init) = cli.command;
    match openshell_server::certs::init(&init) {
        Ok(written) => {
            for path in written {
                println!("wrote {}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {}", error_chain(&error));
            ExitCode::from(2)
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "certs") {
        return certs_main(args.into_iter().skip(1).collect());
    }
    let (cli, sources) = match config::parse_cli(std::env::args_os()) {
        Ok(parsed) => parsed,
        Err(error) => error.exit(),
    };
    let settings = match settings::resolve(&cli, sources) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("error: {}", error_chain(&error));
            return ExitCode::from(2);
        }
    };
    if cli.check_config {
        print!("{}", settings.describe());
        return ExitCode::SUCCESS;
    }
    if let Err(message) = init_logging(&settings) {
        eprintln!("error: {message}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: could not start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(openshell_server::server::run(settings));
    // Driver log pumps and other detached tasks end with the runtime.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", error_chain(&error));
            if error.is_config() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
