//! `openshell-driver-vm`: serve the VM compute driver, check the host,
//! manage the image cache, or (hidden, started by the driver) run one VMM.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use driver_lifecycle::{CancellationToken, ServeArgs};
use openshell_driver_vm::config::ConfigArgs;
use openshell_driver_vm::driver::Driver;
use openshell_driver_vm::image::{ImageCache, disk_usage, human_size};
use openshell_driver_vm::preflight::{HostPaths, HostReport, Platform};
use openshell_driver_vm::service::Service;
use openshell_driver_vm::state::StateDir;
use openshell_proto::compute::logs::v1::sandbox_logs_server::SandboxLogsServer;
use openshell_proto::compute::v1::compute_driver_server::ComputeDriverServer;

#[derive(Debug, Parser)]
#[command(
    name = "openshell-driver-vm",
    version,
    about = "OpenShell compute driver that runs each sandbox in its own libkrun microVM"
)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: Option<ServeArgs>,
    #[command(flatten)]
    config: ConfigArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check whether this host can run VM sandboxes; exit 1 if it cannot.
    Preflight {
        // Boxed: the settings dwarf the other variants.
        #[command(flatten)]
        config: Box<ConfigArgs>,
    },
    /// Inspect and prune the image cache.
    Images {
        #[command(subcommand)]
        action: ImagesAction,
    },
    /// Run one VMM (started by the driver; not for direct use).
    #[command(hide = true)]
    Vmm { launch_file: PathBuf },
}

#[derive(Debug, Subcommand)]
enum ImagesAction {
    /// List cached images and the sandboxes using them.
    List(StateArgs),
    /// Disk usage of the cache and of the sandboxes' writable layers.
    Du(StateArgs),
    /// Remove cached images no sandbox uses.
    Prune(StateArgs),
}

#[derive(Debug, Clone, clap::Args)]
struct StateArgs {
    /// The driver's state directory [default: from --driver-config, else
    /// $XDG_STATE_HOME/openshell/vm-driver].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Driver-config file to take state_dir from.
    #[arg(long, value_name = "PATH")]
    driver_config: Option<PathBuf>,
}

impl StateArgs {
    fn state(&self) -> anyhow::Result<StateDir> {
        let config = ConfigArgs {
            state_dir: self.state_dir.clone(),
            driver_config: self.driver_config.clone(),
            ..ConfigArgs::default()
        }
        .resolve()?;
        Ok(StateDir::new(config.state_dir))
    }
}

fn main() -> ExitCode {
    if let Err(error) = driver_lifecycle::close_inherited_fds() {
        eprintln!("openshell-driver-vm: error: {error}");
        return ExitCode::FAILURE;
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Vmm { launch_file }) => {
            return ExitCode::from(openshell_driver_vm::vmm::run(&launch_file));
        }
        Some(Command::Preflight { config }) => preflight(&config),
        Some(Command::Images { action }) => images(&action),
        None => match cli.serve {
            Some(serve) => serve_driver(&serve, &cli.config),
            None => Err(anyhow::anyhow!(
                "--bind-socket is required to serve (or use a subcommand; see --help)"
            )),
        },
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("openshell-driver-vm: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn preflight(args: &ConfigArgs) -> anyhow::Result<ExitCode> {
    let config = args.resolve()?;
    let report = HostReport::check_platform(
        &HostPaths::system(),
        config.kernel.as_deref(),
        &Platform::from_config(&config),
    );
    for line in report.lines() {
        println!("{line}");
    }
    if let Some(blocker) = report.blocker(config.allow_unsupported_host) {
        println!("result: {blocker}");
        return Ok(ExitCode::FAILURE);
    }
    if report.is_ok() {
        println!("result: this host can run VM sandboxes");
    } else {
        println!(
            "result: allow_unsupported_host is set: sandboxes will be created, and their VMs \
             will fail to boot"
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn images(action: &ImagesAction) -> anyhow::Result<ExitCode> {
    let (ImagesAction::List(args) | ImagesAction::Du(args) | ImagesAction::Prune(args)) = action;
    let state = args.state()?;
    let cache = ImageCache::new(state.images_dir());
    let in_use = Driver::images_in_use(&state)?;
    match action {
        ImagesAction::List(_) => {
            let entries = cache.entries()?;
            if entries.is_empty() {
                println!("no cached images in {}", cache.dir().display());
            }
            for (key, entry) in entries {
                println!(
                    "{key}  {:>10}  {}  {}",
                    human_size(disk_usage(&cache.entry_dir(&key))),
                    if in_use.contains(&key) {
                        "in use"
                    } else {
                        "unused"
                    },
                    entry.source
                );
            }
        }
        ImagesAction::Du(_) => {
            let mut total = 0_u64;
            for (key, _) in cache.entries()? {
                let size = disk_usage(&cache.entry_dir(&key));
                total = total.saturating_add(size);
                println!("{:>10}  {key}", human_size(size));
            }
            println!(
                "{:>10}  total, image cache {}",
                human_size(total),
                cache.dir().display()
            );
            let (dirs, _) = state.scan()?;
            let layers: u64 = dirs
                .iter()
                .map(|d| disk_usage(&d.upper()).saturating_add(disk_usage(&d.rootfs())))
                .sum();
            println!(
                "{:>10}  total, writable layers of {} sandboxes",
                human_size(layers),
                dirs.len()
            );
        }
        ImagesAction::Prune(_) => {
            let removed = cache.prune(&in_use, std::time::Duration::from_secs(30))?;
            let reclaimed: u64 = removed.iter().map(|(_, size)| size).sum();
            for (key, size) in &removed {
                println!("removed {key} ({})", human_size(*size));
            }
            println!(
                "removed {} entries, {} reclaimed; {} in use kept",
                removed.len(),
                human_size(reclaimed),
                in_use.len()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn serve_driver(serve: &ServeArgs, args: &ConfigArgs) -> anyhow::Result<ExitCode> {
    let config = args.resolve()?;
    tracing_subscriber::fmt()
        .with_writer(|| driver_lifecycle::LogStderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .or_else(|_| tracing_subscriber::EnvFilter::try_new(&config.log_level))
                .context("invalid log_level filter")?,
        )
        .init();
    let options = serve.options()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(async move {
        let driver = Driver::new(config, HostPaths::system())?;
        let report = driver.host_report();
        if report.is_ok() {
            tracing::info!(report = %report.lines().join("; "), "host can run VM sandboxes");
        } else {
            tracing::warn!(report = %report.lines().join("; "), "host cannot boot VM sandboxes; creates will fail until it can");
        }
        let relaunched = driver.restore()?;
        tracing::info!(state_dir = %driver.config().state_dir.display(), relaunched, "driver state loaded");
        let cancel = CancellationToken::new();
        let service = Service::new(driver.clone(), cancel.clone());
        // Requests up to MAX_MESSAGE_BYTES; replies too, except
        // ListSandboxes, which carries the whole inventory.
        let router = tonic::transport::Server::builder()
            .add_service(
                ComputeDriverServer::new(service.clone())
                    .max_decoding_message_size(openshell_wire::limits::MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(openshell_wire::limits::MAX_DRIVER_LIST_BYTES),
            )
            .add_service(
                SandboxLogsServer::new(service)
                    .max_decoding_message_size(openshell_wire::limits::MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(openshell_wire::limits::MAX_MESSAGE_BYTES),
            );
        let served = driver_lifecycle::serve_uds(options, router, cancel).await;
        driver.shutdown().await;
        served?;
        Ok(ExitCode::SUCCESS)
    });
    // An image unpack still running in the blocking pool must not hold the
    // exit up for long; its temporary directory is cleaned by prune.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    result
}
