//! `openshell-driver-podman`: an OpenShell compute driver that runs each
//! sandbox as a Podman container, spoken to over gRPC on a Unix socket.
//!
//! - [`config`]: the `--driver-config` TOML file, flags and defaults.
//! - [`engine`]: finding the Podman API socket (or starting a private
//!   `podman system service` under driver-lifecycle supervision), checking
//!   the engine, and explaining its failures.
//! - [`podman`]: a small libpod REST client over the Unix socket (hyper).
//! - [`image`]: the image pull policy, pulls and their failures.
//! - [`spec`]: create requests → validated plans → libpod spec bodies,
//!   with the ownership labels.
//! - [`status`]: container state → sandbox conditions.
//! - [`watch`]: the event-driven observer behind `WatchSandboxes`.
//! - [`driver`], [`logs`]: the gRPC services.
//! - [`state`]: stop markers, tokens and start failures on disk.

pub mod config;
pub mod core;
pub mod driver;
pub mod engine;
pub mod error;
pub mod image;
pub mod logs;
pub mod podman;
pub mod quantity;
pub mod spec;
pub mod state;
pub mod status;
pub mod watch;

pub use driver::{DRIVER_NAME, PodmanDriver};
pub use error::{Error, Result};

use driver_lifecycle::{CancellationToken, ServeArgs, ServeExit};
use openshell_proto::compute::logs::v1::sandbox_logs_server::SandboxLogsServer;
use openshell_proto::compute::v1::compute_driver_server::ComputeDriverServer;

/// The command line of `openshell-driver-podman`.
#[derive(Debug, clap::Parser)]
#[command(
    name = "openshell-driver-podman",
    version,
    about = "OpenShell compute driver running sandboxes as Podman containers, served over gRPC on a Unix socket"
)]
pub struct Cli {
    #[command(flatten)]
    pub serve: ServeArgs,
    #[command(flatten)]
    pub settings: config::SettingsArgs,
}

/// Runs the driver until a signal, the parent's exit or `cancel`: resolve
/// the settings, connect to (or start) the engine, take the first full
/// list of sandboxes, then bind the socket and serve. A Podman service the
/// driver started is stopped on the way out.
pub async fn run(cli: &Cli, cancel: CancellationToken) -> Result<ServeExit> {
    let mut options = cli.serve.options()?;
    options.socket = config::absolute("--bind-socket", &options.socket)?;
    let managed = cli.serve.expected_peer_pid.is_some();
    let settings = config::Settings::resolve(&cli.settings, managed)?;
    // Work from the state directory: a Podman service started here, and
    // the conmon processes it starts, inherit it, and conmon 2.1 writes
    // its OOM marker file ("oom") into its working directory. That file
    // belongs in our state, not wherever the driver was started.
    state::StateDir::load(&settings.state_dir).await?;
    std::env::set_current_dir(&settings.state_dir)
        .map_err(|e| Error::io("change directory to", &settings.state_dir, e))?;
    let engine = engine::Engine::connect(&settings, &options.socket).await?;
    let served = async {
        let driver = PodmanDriver::open(settings, &engine, cancel.clone()).await?;
        // Requests up to MAX_MESSAGE_BYTES; replies too, except
        // ListSandboxes, which carries the whole inventory.
        let router = tonic::transport::Server::builder()
            .add_service(
                ComputeDriverServer::new(driver.clone())
                    .max_decoding_message_size(openshell_wire::limits::MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(openshell_wire::limits::MAX_DRIVER_LIST_BYTES),
            )
            .add_service(
                SandboxLogsServer::new(driver)
                    .max_decoding_message_size(openshell_wire::limits::MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(openshell_wire::limits::MAX_MESSAGE_BYTES),
            );
        Ok::<_, Error>(driver_lifecycle::serve_uds(options, router, cancel.clone()).await?)
    }
    .await;
    cancel.cancel();
    engine.shutdown().await;
    served
}
