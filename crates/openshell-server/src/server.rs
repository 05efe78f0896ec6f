//! Startup and shutdown ordering.
//!
//! Startup: lock and open the state directory, bind the API listener, acquire
//! every driver (spawn or dial), snapshot capabilities, resume sandboxes,
//! reconcile each driver's list and start its watch, then serve.
//!
//! Shutdown (SIGTERM or SIGINT): stop serving and end open streams, stop
//! the watch tasks, stop running sandboxes of drivers whose lifecycle the
//! gateway manages (16 at a time, intent kept), then stop managed drivers.
//! A second signal skips the sandbox sweep.

use std::fs;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use driver_lifecycle::socket;
use futures::future::join_all;
use nix::fcntl::{Flock, FlockArg};
use openshell_proto::gateway::v1::gateway_server::GatewayServer;
use openshell_wire::authority::AuthorityFix;
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;

use crate::api::listen::ListenAddr;
use crate::api::service::GatewayService;
use crate::drivers::acquire::{self, AcquireContext};
use crate::drivers::registry::{DriverRuntime, Registry, RuntimeOptions};
use crate::drivers::watcher;
use crate::error::{Error, Result};
use crate::gateway::Gateway;
use crate::settings::Settings;
use crate::state::store::Store;

/// How long in-flight requests may run after a stop signal.
const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// Stop requests: the first signal cancels `stop`, the second `force`.
struct Signals {
    stop: CancellationToken,
    force: CancellationToken,
}

impl Signals {
    fn install() -> Result<Self> {
        let mut term = signal(SignalKind::terminate())
            .map_err(|e| Error::io("install a handler for", "SIGTERM", e))?;
        let mut int = signal(SignalKind::interrupt())
            .map_err(|e| Error::io("install a handler for", "SIGINT", e))?;
        let stop = CancellationToken::new();
        let force = CancellationToken::new();
        let (s, f) = (stop.clone(), force.clone());
        tokio::spawn(async move {
            for token in [s, f] {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                token.cancel();
            }
        });
        Ok(Self { stop, force })
    }
}

/// Creates the state directory (0700 when new) and takes its lock.
fn lock_state_dir(dir: &Path) -> Result<Flock<fs::File>> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io("create the state directory", dir, e))?;
    let meta = fs::metadata(dir).map_err(|e| Error::io("inspect", dir, e))?;
    if !meta.is_dir() {
        return Err(Error::Config(format!(
            "state directory {} is not a directory",
            dir.display()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        tracing::warn!(dir = %dir.display(), mode = format!("{:o}", meta.mode() & 0o777), "the state directory is readable by other users; sandbox specs (including env) are stored there");
    }
    let lock = dir.join("gateway.lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .map_err(|e| Error::io("open", &lock, e))?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        if errno == nix::errno::Errno::EWOULDBLOCK {
            Error::StateDirLocked {
                path: dir.to_owned(),
                lock: lock.clone(),
            }
        } else {
            Error::io("lock", &lock, errno.into())
        }
    })
}

/// The bound API listener.
enum Listener {
    Unix(UnixListener, socket::BoundSocket),
    Tcp(TcpListener),
}

impl Listener {
    async fn bind(addr: &ListenAddr) -> Result<Self> {
        match addr {
            ListenAddr::Unix(path) => {
                let (listener, file) =
                    socket::bind_unix_listener_async(path).await.map_err(|e| {
                        Error::Config(format!("cannot listen on {}: {e}", path.display()))
                    })?;
                Ok(Self::Unix(listener, file))
            }
            ListenAddr::Tcp(addr) => TcpListener::bind(addr)
                .await
                .map(Self::Tcp)
                .map_err(|e| Error::io("listen on", addr.to_string(), e)),
        }
    }

    fn address(&self) -> String {
        match self {
            Self::Unix(_, file) => format!("unix://{}", file.path().display()),
            Self::Tcp(listener) => listener
                .local_addr()
                .map_or_else(|_| "tcp://?".to_owned(), |a| format!("tcp://{a}")),
        }
    }
}

/// Acquires and initialises every driver, concurrently. If any fails, the
/// ones that worked are stopped and the first error is returned.
async fn start_drivers(
    settings: &Settings,
    ctx: &AcquireContext,
) -> Result<Vec<Arc<DriverRuntime>>> {
    let attempts = settings
        .drivers
        .iter()
        .enumerate()
        .map(|(index, plan)| async move {
            // Checked when the settings were resolved; a bad value cannot
            // get here.
            let expected_admission = plan.expected_admission().map_err(Error::Config)?;
            let acquired = acquire::acquire(plan, ctx).await?;
            let options = RuntimeOptions {
                name: plan.name.clone(),
                expect_driver_name: plan.expect_driver_name.clone(),
                call_timeout: settings.timeouts.driver_call,
                is_default: index == 0,
                expected_admission,
                trust_driver_readiness: plan.trust_driver_readiness,
            };
            DriverRuntime::initialize(options, acquired).await
        });
    let results = join_all(attempts).await;
    let mut runtimes = Vec::new();
    let mut first_error = None;
    for result in results {
        match result {
            Ok(runtime) => runtimes.push(Arc::new(runtime)),
            Err(error) => {
                if first_error.is_some() {
                    tracing::error!(error = %crate::error::error_chain(&error), "another driver failed to start");
                } else {
                    first_error = Some(error);
                }
            }
        }
    }
    if let Some(error) = first_error {
        stop_drivers(&runtimes).await;
        return Err(error);
    }
    Ok(runtimes)
}

/// Stops every managed driver; returns the failures.
async fn stop_drivers(runtimes: &[Arc<DriverRuntime>]) -> Vec<String> {
    let stops = runtimes.iter().filter_map(|runtime| {
        let guard = runtime.take_guard()?;
        let name = runtime.name.clone();
        Some(async move {
            guard
                .shutdown()
                .await
                .map_err(|e| format!("driver '{name}': {e}"))
        })
    });
    join_all(stops)
        .await
        .into_iter()
        .filter_map(std::result::Result::err)
        .collect()
}

/// Runs the gateway until SIGTERM or SIGINT.
pub async fn run(settings: Settings) -> Result<()> {
    let signals = Signals::install()?;
    for warning in &settings.warnings {
        tracing::warn!("{warning}");
    }
    let _state_lock = lock_state_dir(&settings.state_dir)?;
    let store = Store::open(&settings.state_dir.join("gateway.db"))?;
    if uses_run_dir(&settings) {
        socket::prepare_private_dir(&settings.run_dir)
            .map_err(|e| Error::Config(format!("run directory: {e}")))?;
    }
    let listener = Listener::bind(&settings.listen).await?;
    let address = listener.address();
    if !settings.listen.is_local() {
        tracing::warn!(address = %address, "the API listens on an address other machines can reach, and it has no authentication (--allow-remote)");
    }

    let ctx = AcquireContext::new(
        settings.run_dir.clone(),
        settings.state_dir.clone(),
        settings.timeouts.driver_connect,
    );
    let runtimes = tokio::select! {
        started = start_drivers(&settings, &ctx) => started?,
        () = signals.stop.cancelled() => {
            tracing::info!("stop requested during startup");
            return Ok(());
        }
    };
    let gateway = Arc::new(
        Gateway::new(
            store,
            Registry::new(runtimes.clone()),
            settings.timeouts,
            address.clone(),
        )
        .with_max_watches(settings.max_watches),
    );
    let mut watchers = Watchers::default();
    let started = tokio::select! {
        result = recover_and_watch(&gateway, &runtimes, &mut watchers) => result.map(|()| true),
        () = signals.stop.cancelled() => Ok(false),
    };
    if !matches!(started, Ok(true)) {
        watchers.stop().await;
        for failure in stop_drivers(&runtimes).await {
            tracing::warn!("{failure}");
        }
        return started.map(drop);
    }

    let (served, socket_file) = serve(listener, &gateway, &signals, &address).await;
    watchers.stop().await;
    let mut failures = Vec::new();
    if let Err(error) = served {
        failures.push(crate::error::error_chain(&error));
    }
    let sweep = tokio::select! {
        failed = gateway.shutdown_sweep() => failed,
        () = signals.force.cancelled() => {
            tracing::warn!("second stop signal; skipping the sandbox stop sweep");
            Vec::new()
        }
    };
    failures.extend(sweep_failure(&sweep));
    failures.extend(stop_drivers(&runtimes).await);
    drop(socket_file);
    shutdown_outcome(&failures)
}

/// Whether the run directory must exist: a managed driver's socket or the
/// default API socket lives there.
fn uses_run_dir(settings: &Settings) -> bool {
    settings.drivers.iter().any(|p| p.is_managed())
        || matches!(&settings.listen, ListenAddr::Unix(p) if p.parent() == Some(settings.run_dir.as_path()))
}

/// The per-driver health and watch tasks, and the token that ends them.
#[derive(Default)]
struct Watchers {
    cancel: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
}

impl Watchers {
    async fn stop(&mut self) {
        self.cancel.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Startup after the drivers are up: warn about orphaned rows, follow each
/// driver's health, resume interrupted sandboxes, then watch every driver
/// (a driver that cannot be watched now is retried in the background).
async fn recover_and_watch(
    gateway: &Arc<Gateway>,
    runtimes: &[Arc<DriverRuntime>],
    watchers: &mut Watchers,
) -> Result<()> {
    gateway.report_orphaned_drivers().await?;
    for runtime in runtimes {
        watchers.tasks.spawn(watcher::follow_health(
            Arc::clone(gateway),
            Arc::clone(runtime),
            watchers.cancel.clone(),
        ));
    }
    for runtime in runtimes {
        gateway.startup_sweep(runtime).await?;
    }
    for runtime in runtimes {
        let first = match watcher::connect(gateway, runtime).await {
            Ok(opening) => Some(opening),
            Err(error) => {
                tracing::warn!(driver = %runtime.name, error = %error, "could not watch the driver at startup; retrying in the background");
                None
            }
        };
        watchers.tasks.spawn(watcher::run(
            Arc::clone(gateway),
            Arc::clone(runtime),
            first,
            watchers.cancel.clone(),
        ));
    }
    Ok(())
}

/// Serves the API (and gRPC health) on `listener` until the first stop
/// signal, then drains open requests for up to [`DRAIN_GRACE`]. Hands back
/// the socket file, which is removed when dropped at the very end.
async fn serve(
    listener: Listener,
    gateway: &Arc<Gateway>,
    signals: &Signals,
    address: &str,
) -> (Result<()>, Option<socket::BoundSocket>) {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<GatewayServer<GatewayService>>().await;
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let service = GatewayService::server(Arc::clone(gateway));
    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(service);
    let stopping = {
        let stop = signals.stop.clone();
        let gateway = Arc::clone(gateway);
        async move {
            stop.cancelled().await;
            tracing::info!("stop requested; shutting down");
            health
                .set_not_serving::<GatewayServer<GatewayService>>()
                .await;
            health
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
            gateway.shutdown.cancel();
        }
    };
    tracing::info!(address = %address, drivers = %gateway.registry.names(), "listening");
    let (serving, socket_file) = match listener {
        Listener::Unix(listener, file) => (
            tokio::spawn(
                // Stock gRPC clients send the socket path as :authority;
                // AuthorityFix lets hyper accept their requests.
                router.serve_with_incoming_shutdown(
                    UnixListenerStream::new(listener)
                        .map(|accepted| accepted.map(AuthorityFix::new)),
                    stopping,
                ),
            ),
            Some(file),
        ),
        Listener::Tcp(listener) => (
            tokio::spawn(
                router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), stopping),
            ),
            None,
        ),
    };
    (serve_until_stopped(serving, signals).await, socket_file)
}

/// The shutdown sweep's failures as one line, if any.
fn sweep_failure(sweep: &[String]) -> Option<String> {
    (!sweep.is_empty()).then(|| {
        format!(
            "{} sandbox(es) could not be stopped: {}",
            sweep.len(),
            sweep.join("; ")
        )
    })
}

/// The result of a stop: clean, or every cleanup failure in one error.
fn shutdown_outcome(failures: &[String]) -> Result<()> {
    if failures.is_empty() {
        tracing::info!("stopped");
        Ok(())
    } else {
        Err(Error::Internal(format!(
            "gateway shutdown cleanup failed: {}",
            failures.join("; ")
        )))
    }
}

/// Waits for the server to finish after a stop signal, giving open
/// requests [`DRAIN_GRACE`].
async fn serve_until_stopped(
    mut serve: tokio::task::JoinHandle<std::result::Result<(), tonic::transport::Error>>,
    signals: &Signals,
) -> Result<()> {
    let result = tokio::select! {
        result = &mut serve => result,
        () = async { signals.stop.cancelled().await; tokio::time::sleep(DRAIN_GRACE).await } => {
            tracing::warn!(grace = ?DRAIN_GRACE, "requests still open after the grace period; closing them");
            serve.abort();
            return Ok(());
        }
    };
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(Error::Internal(format!(
            "serving the API failed: {}",
            crate::error::error_chain(&error)
        ))),
        Err(join) => Err(Error::Internal(format!(
            "the API server task failed: {join}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{FileConfig, parse_cli};
    use crate::settings::resolve_with;

    fn settings(args: &[&str]) -> Settings {
        let mut argv = vec![
            "openshell-gateway",
            "--state-dir",
            "/tmp/os-state",
            "--run-dir",
            "/tmp/os-run",
        ];
        argv.extend_from_slice(args);
        let (cli, sources) = parse_cli(argv).unwrap();
        resolve_with(&cli, sources, &FileConfig::default()).unwrap()
    }

    #[test]
    fn run_dir_is_needed_for_managed_drivers_or_the_default_socket() {
        assert!(uses_run_dir(&settings(&["--drivers", "vm"])));
        assert!(uses_run_dir(&settings(&["--drivers", "k@/run/k.sock"])));
        assert!(!uses_run_dir(&settings(&[
            "--drivers",
            "k@/run/k.sock",
            "--listen",
            "unix:///srv/gw.sock"
        ])));
        assert!(!uses_run_dir(&settings(&[
            "--drivers",
            "k@/run/k.sock",
            "--listen",
            "tcp://127.0.0.1:7000"
        ])));
    }

    #[test]
    fn shutdown_failures_are_collected_into_one_error() {
        assert_eq!(sweep_failure(&[]), None);
        assert_eq!(
            sweep_failure(&[
                "sandbox 'a': gone".to_owned(),
                "sandbox 'b': gone".to_owned()
            ])
            .as_deref(),
            Some("2 sandbox(es) could not be stopped: sandbox 'a': gone; sandbox 'b': gone")
        );
        assert!(shutdown_outcome(&[]).is_ok());
        let error = shutdown_outcome(&["x".to_owned(), "y".to_owned()])
            .unwrap_err()
            .to_string();
        assert!(error.contains("cleanup failed: x; y"), "{error}");
    }
}
