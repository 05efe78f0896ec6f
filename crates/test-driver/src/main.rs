//! `openshell-test-driver`: the in-memory compute driver as a process.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use driver_lifecycle::{CancellationToken, ServeArgs};
use openshell_driver_kit::contract::AdmissionPolicy;
use openshell_proto::compute::logs::v1::sandbox_logs_server::SandboxLogsServer;
use openshell_proto::compute::v1::compute_driver_server::ComputeDriverServer;
use openshell_test_driver::{Behaviour, TestDriver};
use openshell_wire::limits;

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
    /// TOML file with the same settings as the flags below (keys spelled with
    /// '_', e.g. `provision_delay_ms = 5`), plus `name` and `state_dir` as a
    /// gateway passes them. Flags given on the command line win.
    #[arg(long, value_name = "PATH")]
    driver_config: Option<PathBuf>,
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

#[derive(Debug, Default, clap::Args, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BehaviourArgs {
    /// The name the gateway configured for this driver (used in log lines).
    #[arg(long)]
    name: Option<String>,
    /// Directory for the driver's own state; sandboxes are kept in
    /// `<state_dir>/sandboxes.pb` unless --state-file says otherwise.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Driver name reported by GetCapabilities [default: openshell-test-driver].
    #[arg(long)]
    driver_name: Option<String>,
    /// Default image reported by GetCapabilities [default: test/busybox:latest].
    #[arg(long)]
    default_image: Option<String>,
    /// Report gateway_manages_lifecycle = true.
    #[arg(long)]
    #[serde(default)]
    gateway_manages_lifecycle: bool,
    /// Milliseconds between accepting a create/start and reporting Ready
    /// [default: 20].
    #[arg(long)]
    provision_delay_ms: Option<u64>,
    /// Answer UNIMPLEMENTED for the optional RPCs and the log service.
    #[arg(long)]
    #[serde(default)]
    minimal: bool,
    /// Keep sandboxes in this file across restarts.
    #[arg(long)]
    state_file: Option<PathBuf>,
    /// Send platform events (Scheduled, Started, Stopped) on the watch stream.
    #[arg(long)]
    #[serde(default)]
    platform_events: bool,
    /// Append one line per RPC received (`<Rpc> <sandbox id or name>`) to
    /// this file, so tests can see what a gateway forwarded.
    #[arg(long, value_name = "PATH")]
    call_log: Option<PathBuf>,
    /// Accept a non-empty `template.driver_config` in create and validate
    /// requests, and acknowledge `allow_driver_config = true` in the
    /// admission policy reported to 1.x gateways.
    #[arg(long)]
    #[serde(default)]
    allow_driver_config: bool,
    /// Answer WatchSandboxes only once its first event exists (headers and
    /// first message together, as grpc-go and grpcio servers do), instead
    /// of at once.
    #[arg(long)]
    #[serde(default)]
    lazy_watch_headers: bool,
    /// Answer as a v0.0.111 driver: no 1.x negotiation metadata, admission
    /// policy or other 1.x capability fields.
    #[arg(long)]
    #[serde(default)]
    legacy_contract: bool,
    /// Report that Ready does not mean the workload runs (1.x
    /// `driver_reports_runtime_readiness = false`).
    #[arg(long)]
    #[serde(default)]
    no_runtime_readiness: bool,
    /// Misbehave: advertise this protocol major version in the 1.x metadata.
    #[arg(long, value_name = "N")]
    protocol_major: Option<u32>,
    /// Start with N running sandboxes, `preload-000000` and on (ids
    /// `00000000-0000-4000-8000-000000000000` and on), for scale tests.
    #[arg(long, value_name = "N")]
    preload: Option<usize>,

    /// Misbehave: write a few stderr lines and exit with this code before
    /// binding.
    #[arg(long, value_name = "CODE")]
    exit_early: Option<u8>,
    /// Misbehave: never bind the socket.
    #[arg(long)]
    #[serde(default)]
    never_ready: bool,
    /// Misbehave: bind and serve but never write the ready line (the fd stays
    /// open, as with a driver that does not know about it).
    #[arg(long)]
    #[serde(default)]
    ignore_ready_fd: bool,
    /// Wait this long before binding.
    #[arg(long)]
    startup_delay_ms: Option<u64>,
    /// Misbehave: abort the process on the call after this many calls.
    #[arg(long, value_name = "N")]
    crash_after_calls: Option<u64>,
    /// Misbehave: this RPC (proto name, e.g. GetSandbox) never answers.
    #[arg(long, value_name = "RPC")]
    #[serde(default)]
    stall: Vec<String>,
    /// Misbehave: do not stop on SIGTERM.
    #[arg(long)]
    #[serde(default)]
    ignore_sigterm: bool,
    /// Start a `sleep` child in the driver's process group.
    #[arg(long)]
    #[serde(default)]
    spawn_grandchild: bool,
    /// Misbehave: exit with code 3 this many milliseconds after becoming ready.
    #[arg(long, value_name = "MS")]
    exit_after_ready_ms: Option<u64>,
    /// Misbehave: if this file exists, exit early with code 4; otherwise
    /// create it and run normally (so only the first start succeeds).
    #[arg(long, value_name = "PATH")]
    only_first_start: Option<PathBuf>,
}

impl BehaviourArgs {
    /// Reads `path`; unknown keys are an error naming the key and the file.
    fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("could not read driver config {}", path.display()))?;
        toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("invalid driver config {}: {e}", path.display()))
    }

    /// Values given on the command line win over the file's.
    fn over(self, file: Self) -> Self {
        Self {
            name: self.name.or(file.name),
            state_dir: self.state_dir.or(file.state_dir),
            driver_name: self.driver_name.or(file.driver_name),
            default_image: self.default_image.or(file.default_image),
            gateway_manages_lifecycle: self.gateway_manages_lifecycle
                || file.gateway_manages_lifecycle,
            provision_delay_ms: self.provision_delay_ms.or(file.provision_delay_ms),
            minimal: self.minimal || file.minimal,
            state_file: self.state_file.or(file.state_file),
            platform_events: self.platform_events || file.platform_events,
            call_log: self.call_log.or(file.call_log),
            allow_driver_config: self.allow_driver_config || file.allow_driver_config,
            lazy_watch_headers: self.lazy_watch_headers || file.lazy_watch_headers,
            legacy_contract: self.legacy_contract || file.legacy_contract,
            no_runtime_readiness: self.no_runtime_readiness || file.no_runtime_readiness,
            protocol_major: self.protocol_major.or(file.protocol_major),
            preload: self.preload.or(file.preload),
            exit_early: self.exit_early.or(file.exit_early),
            never_ready: self.never_ready || file.never_ready,
            ignore_ready_fd: self.ignore_ready_fd || file.ignore_ready_fd,
            startup_delay_ms: self.startup_delay_ms.or(file.startup_delay_ms),
            crash_after_calls: self.crash_after_calls.or(file.crash_after_calls),
            stall: if self.stall.is_empty() {
                file.stall
            } else {
                self.stall
            },
            ignore_sigterm: self.ignore_sigterm || file.ignore_sigterm,
            spawn_grandchild: self.spawn_grandchild || file.spawn_grandchild,
            exit_after_ready_ms: self.exit_after_ready_ms.or(file.exit_after_ready_ms),
            only_first_start: self.only_first_start.or(file.only_first_start),
        }
    }
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
    let behaviour = match &cli.driver_config {
        Some(path) => cli.behaviour.over(BehaviourArgs::from_file(path)?),
        None => cli.behaviour,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cli.command {
        Some(Tool::Probe { socket }) => runtime.block_on(probe(socket)),
        None => {
            let serve = cli.serve.context("--bind-socket is required")?;
            runtime.block_on(serve_driver(&serve, behaviour))
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
        .get_capabilities(openshell_proto::compute::v1::GetCapabilitiesRequest::default())
        .await?
        .into_inner();
    println!("{}", caps.driver_name);
    Ok(())
}

/// Creates `dir` (mode 0700) if needed.
fn ensure_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("could not create state directory {}", dir.display()))
}

#[expect(
    clippy::exit,
    reason = "exiting abruptly is what the misbehaviour switches are for"
)]
async fn serve_driver(serve: &ServeArgs, args: BehaviourArgs) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(|| driver_lifecycle::LogStderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let mut options = serve.options()?;
    let label = args
        .name
        .clone()
        .unwrap_or_else(|| "test driver".to_owned());

    if let Some(marker) = &args.only_first_start {
        if marker.exists() {
            eprintln!(
                "{label}: {} exists; refusing to start again",
                marker.display()
            );
            std::process::exit(4);
        }
        std::fs::write(marker, b"started\n")?;
    }
    if let Some(code) = args.exit_early {
        eprintln!("{label}: starting");
        eprintln!("{label}: configuration looks wrong");
        eprintln!("{label}: exiting early with code {code} as configured");
        std::process::exit(i32::from(code));
    }
    if args.never_ready {
        eprintln!("{label}: never becoming ready, as configured");
        std::future::pending::<()>().await;
    }
    if let Some(ms) = args.startup_delay_ms.filter(|ms| *ms > 0) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if args.spawn_grandchild {
        let child = std::process::Command::new("sleep").arg("3600").spawn()?;
        eprintln!("{label}: grandchild pid {}", child.id());
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
    let state_file = match (&args.state_file, &args.state_dir) {
        (Some(file), _) => Some(file.clone()),
        (None, Some(dir)) => {
            ensure_dir(dir)?;
            Some(dir.join("sandboxes.pb"))
        }
        (None, None) => None,
    };

    let defaults = Behaviour::default();
    let driver = TestDriver::new(Behaviour {
        driver_name: args.driver_name.unwrap_or(defaults.driver_name),
        default_image: args.default_image.unwrap_or(defaults.default_image),
        gateway_manages_lifecycle: args.gateway_manages_lifecycle,
        provision_delay: args
            .provision_delay_ms
            .map_or(defaults.provision_delay, Duration::from_millis),
        crash_after_calls: args.crash_after_calls,
        stall: args.stall.into_iter().collect::<BTreeSet<_>>(),
        minimal: args.minimal,
        state_file,
        platform_events: args.platform_events,
        call_log: args.call_log,
        admission: AdmissionPolicy {
            allow_driver_config: args.allow_driver_config,
            ..AdmissionPolicy::default()
        },
        lazy_watch_headers: args.lazy_watch_headers,
        legacy_contract: args.legacy_contract,
        protocol_major: args.protocol_major,
        no_runtime_readiness: args.no_runtime_readiness,
        preload: args.preload.unwrap_or(0),
        ..defaults
    });

    // The message limits every driver sets: requests up to
    // MAX_MESSAGE_BYTES; replies too, except ListSandboxes, which carries
    // the whole inventory (MAX_DRIVER_LIST_BYTES).
    let compute = ComputeDriverServer::new(driver.clone())
        .max_decoding_message_size(limits::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(limits::MAX_DRIVER_LIST_BYTES);
    let mut builder = tonic::transport::Server::builder();
    let router = if args.minimal {
        builder.add_service(compute)
    } else {
        builder.add_service(compute).add_service(
            SandboxLogsServer::new(driver)
                .max_decoding_message_size(limits::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(limits::MAX_MESSAGE_BYTES),
        )
    };
    let cancel = CancellationToken::new();
    if let Some(ms) = args.exit_after_ready_ms {
        let label = label.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            eprintln!("{label}: exiting {ms} ms after ready, as configured");
            std::process::exit(3);
        });
    }
    let exit = driver_lifecycle::serve_uds(options, router, cancel).await?;
    eprintln!("{label}: stopped ({exit:?})");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_the_file() {
        let file = BehaviourArgs {
            driver_name: Some("from-file".into()),
            provision_delay_ms: Some(7),
            minimal: true,
            stall: vec!["GetSandbox".into()],
            lazy_watch_headers: true,
            ..BehaviourArgs::default()
        };
        let flags = BehaviourArgs {
            driver_name: Some("from-flag".into()),
            ..BehaviourArgs::default()
        };
        let merged = flags.over(file);
        assert_eq!(merged.driver_name.as_deref(), Some("from-flag"));
        assert_eq!(merged.provision_delay_ms, Some(7));
        assert!(merged.minimal);
        assert_eq!(merged.stall, ["GetSandbox"]);
        assert!(merged.lazy_watch_headers);
        assert!(!merged.allow_driver_config);
    }

    #[test]
    fn the_file_names_unknown_keys() {
        let path =
            std::env::temp_dir().join(format!("test-driver-config-{}.toml", std::process::id()));
        std::fs::write(
            &path,
            "name = \"podman\"\nstate_dir = \"/tmp/x\"\nbogus_key = 1\n",
        )
        .unwrap();
        let error = BehaviourArgs::from_file(&path).unwrap_err().to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(error.contains("bogus_key"), "{error}");
        assert!(error.contains(&path.display().to_string()), "{error}");
    }
}
