//! `openshell-test-driver`: the in-memory compute driver as a process.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use driver_lifecycle::{CancellationToken, ServeArgs};
use openshell_proto::compute::logs::v1::sandbox_logs_server::SandboxLogsServer;
use openshell_proto::compute::v1::compute_driver_server::ComputeDriverServer;
use openshell_test_driver::{Behaviour, TestDriver};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "In-memory ComputeDriver for tests, with switches to misbehave"
)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Tool>,
    #[command(flatten)]
    serve: Option<ServeArgs>,
    #[command(flatten)]
    behaviour: BehaviourArgs,
}

#[derive(Debug, Subcommand)]
enum Tool {
    /// Call GetCapabilities on a driver socket; exit 0 and print the driver
    /// name on success, exit 1 otherwise.
    Probe {
        #[arg(long)]
        socket: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct BehaviourArgs {
    #[arg(long, default_value = "openshell-test-driver")]
    driver_name: String,
    #[arg(long, default_value = "test/busybox:latest")]
    default_image: String,
    /// Report gateway_manages_lifecycle = true.
    #[arg(long)]
    gateway_manages_lifecycle: bool,
    /// Milliseconds between accepting a create/start and reporting Ready.
    #[arg(long, default_value_t = 20)]
    provision_delay_ms: u64,
    /// Answer UNIMPLEMENTED for the optional RPCs and the log service.
    #[arg(long)]
    minimal: bool,
    /// Keep sandboxes in this file across restarts.
    #[arg(long)]
    state_file: Option<PathBuf>,

    /// Misbehave: write a few stderr lines and exit with this code before
    /// binding.
    #[arg(long, value_name = "CODE")]
    exit_early: Option<u8>,
    /// Misbehave: never bind the socket.
    #[arg(long)]
    never_ready: bool,
    /// Misbehave: bind and serve but never write the ready line (the fd stays
    /// open, as with a driver that does not know about it).
    #[arg(long)]
    ignore_ready_fd: bool,
    /// Wait this long before binding.
    #[arg(long, default_value_t = 0)]
    startup_delay_ms: u64,
    /// Misbehave: abort the process on the call after this many calls.
    #[arg(long, value_name = "N")]
    crash_after_calls: Option<u64>,
    /// Misbehave: this RPC (proto name, e.g. GetSandbox) never answers.
    #[arg(long, value_name = "RPC")]
    stall: Vec<String>,
    /// Misbehave: do not stop on SIGTERM.
    #[arg(long)]
    ignore_sigterm: bool,
    /// Start a `sleep` child in the driver's process group.
    #[arg(long)]
    spawn_grandchild: bool,
    /// Misbehave: exit with code 3 this many milliseconds after becoming ready.
    #[arg(long, value_name = "MS")]
    exit_after_ready_ms: Option<u64>,
    /// Misbehave: if this file exists, exit early with code 4; otherwise
    /// create it and run normally (so only the first start succeeds).
    #[arg(long, value_name = "PATH")]
    only_first_start: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("openshell-test-driver: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    driver_lifecycle::close_inherited_fds()?;
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cli.command {
        Some(Tool::Probe { socket }) => runtime.block_on(probe(socket)),
        None => {
            let serve = cli.serve.context("--bind-socket is required")?;
            runtime.block_on(serve_driver(&serve, cli.behaviour))
        }
    }
}

async fn probe(socket: PathBuf) -> anyhow::Result<()> {
    let endpoint = driver_lifecycle::DriverEndpoint::new("probe", socket);
    let channel =
        driver_lifecycle::connect_with(&endpoint, driver_lifecycle::DialPolicy::ONCE).await?;
    let mut client =
        openshell_proto::compute::v1::compute_driver_client::ComputeDriverClient::new(channel);
    let caps = client
        .get_capabilities(openshell_proto::compute::v1::GetCapabilitiesRequest {})
        .await?
        .into_inner();
    println!("{}", caps.driver_name);
    Ok(())
}

// Exiting abruptly is the point of the misbehaviour switches.
#[allow(clippy::exit)]
async fn serve_driver(serve: &ServeArgs, args: BehaviourArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let mut options = serve.options()?;

    if let Some(marker) = &args.only_first_start {
        if marker.exists() {
            eprintln!(
                "test driver: {} exists; refusing to start again",
                marker.display()
            );
            std::process::exit(4);
        }
        std::fs::write(marker, b"started\n")?;
    }
    if let Some(code) = args.exit_early {
        eprintln!("test driver: starting");
        eprintln!("test driver: configuration looks wrong");
        eprintln!("test driver: exiting early with code {code} as configured");
        std::process::exit(i32::from(code));
    }
    if args.never_ready {
        eprintln!("test driver: never becoming ready, as configured");
        std::future::pending::<()>().await;
    }
    if args.startup_delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(args.startup_delay_ms)).await;
    }
    if args.spawn_grandchild {
        let child = std::process::Command::new("sleep").arg("3600").spawn()?;
        eprintln!("test driver: grandchild pid {}", child.id());
    }
    if args.ignore_ready_fd {
        options.ready_fd = None;
    }
    let mut _sigterm = None;
    if args.ignore_sigterm {
        options.handle_signals = false;
        // Registering a handler replaces the default action (exit); the
        // signals are then simply never acted on.
        _sigterm = Some(tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        )?);
    }

    let driver = TestDriver::new(Behaviour {
        driver_name: args.driver_name,
        default_image: args.default_image,
        gateway_manages_lifecycle: args.gateway_manages_lifecycle,
        provision_delay: Duration::from_millis(args.provision_delay_ms),
        crash_after_calls: args.crash_after_calls,
        stall: args.stall.into_iter().collect::<BTreeSet<_>>(),
        minimal: args.minimal,
        state_file: args.state_file,
        ..Behaviour::default()
    });

    let mut builder = tonic::transport::Server::builder();
    let router = if args.minimal {
        builder.add_service(ComputeDriverServer::new(driver.clone()))
    } else {
        builder
            .add_service(ComputeDriverServer::new(driver.clone()))
            .add_service(SandboxLogsServer::new(driver))
    };
    let cancel = CancellationToken::new();
    if let Some(ms) = args.exit_after_ready_ms {
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            eprintln!("test driver: exiting {ms} ms after ready, as configured");
            std::process::exit(3);
        });
    }
    let exit = driver_lifecycle::serve_uds(options, router, cancel).await?;
    eprintln!("test driver: stopped ({exit:?})");
    Ok(())
}
