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

use crate::api::http2;
use crate::api::listen::ListenAddr;
use crate::api::service::{GatewayRoutes, GatewayService};
use crate::drivers::acquire::{self, AcquireContext};
use crate::drivers::plan::{Acquisition, DriverPlan};
use crate::drivers::registry::{DriverRuntime, PendingDriver, Registry, RuntimeOptions};
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

/// Checks the state directory (created 0700 when new; see
/// [`crate::state::prepare_state_dir`]) and takes its lock, opened without
/// following symlinks.
fn lock_state_dir(dir: &Path) -> Result<Flock<fs::File>> {
    crate::state::prepare_state_dir(dir)?;
    let lock = dir.join("gateway.lock");
    let file = crate::state::open_private_file(&lock, "lock file")?;
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

/// Who may connect to the gateway's Unix socket: the gateway's own uid,
/// and the uids and primary gids the operator listed. Checked on the raw
/// stream, before anything is read from it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct UdsPeers {
    uid: u32,
    allow_uids: Vec<u32>,
    allow_gids: Vec<u32>,
}

impl UdsPeers {
    fn from_settings(settings: &Settings) -> Self {
        Self {
            uid: nix::unistd::geteuid().as_raw(),
            allow_uids: settings.allow_uids.clone(),
            allow_gids: settings.allow_gids.clone(),
        }
    }

    /// Whether a peer with these credentials is let in.
    fn admits(&self, uid: u32, gid: u32) -> bool {
        uid == self.uid || self.allow_uids.contains(&uid) || self.allow_gids.contains(&gid)
    }

    /// Checks `stream`'s peer; a refused peer is logged with its uid, gid
    /// and pid.
    fn check(&self, stream: &tokio::net::UnixStream) -> bool {
        match stream.peer_cred() {
            Ok(cred) if self.admits(cred.uid(), cred.gid()) => true,
            Ok(cred) => {
                tracing::warn!(
                    peer_uid = cred.uid(),
                    peer_gid = cred.gid(),
                    peer_pid = ?cred.pid(),
                    "refused a connection to the gateway socket: this uid/gid is not allowed (--allow-uid, --allow-gid)"
                );
                false
            }
            Err(error) => {
                tracing::warn!(%error, "refused a connection to the gateway socket: peer credentials unavailable");
                false
            }
        }
    }
}

/// The bound API listener.
enum Listener {
    Unix(UnixListener, socket::BoundSocket, UdsPeers),
    /// With its TLS acceptor; `None` only under `--insecure-tcp`.
    Tcp(TcpListener, Option<tokio_rustls::TlsAcceptor>),
}

impl Listener {
    async fn bind(settings: &Settings) -> Result<Self> {
        let addr = &settings.listen;
        if let ListenAddr::Tcp(_) = addr {
            // Read the certificates before binding: a wrong file fails
            // startup, naming it.
            let tls = settings
                .tls
                .as_ref()
                .map(|tls| {
                    tls.acceptor()
                        .map_err(|e| Error::Config(format!("--listen {addr}: {e}")))
                })
                .transpose()?;
            if tls.is_none() && !settings.insecure_tcp {
                return Err(Error::Config(format!(
                    "--listen {addr} has no TLS; see --tls-cert"
                )));
            }
            let listener = Self::bind_inner(addr).await?;
            return Ok(match listener {
                Self::Tcp(listener, _) => Self::Tcp(listener, tls),
                other => other,
            });
        }
        let listener = Self::bind_inner(addr).await?;
        Ok(match listener {
            Self::Unix(listener, file, _) => {
                Self::Unix(listener, file, UdsPeers::from_settings(settings))
            }
            other => other,
        })
    }

    async fn bind_inner(addr: &ListenAddr) -> Result<Self> {
        match addr {
            ListenAddr::Unix(path) => {
                let (listener, file) =
                    socket::bind_unix_listener_async(path).await.map_err(|e| {
                        Error::Config(format!("cannot listen on {}: {e}", path.display()))
                    })?;
                Ok(Self::Unix(
                    listener,
                    file,
                    UdsPeers {
                        uid: nix::unistd::geteuid().as_raw(),
                        allow_uids: Vec::new(),
                        allow_gids: Vec::new(),
                    },
                ))
            }
            ListenAddr::Tcp(addr) => TcpListener::bind(addr)
                .await
                .map(|l| Self::Tcp(l, None))
                .map_err(|e| Error::io("listen on", addr.to_string(), e)),
        }
    }

    fn address(&self) -> String {
        match self {
            Self::Unix(_, file, _) => format!("unix://{}", file.path().display()),
            Self::Tcp(listener, _) => listener
                .local_addr()
                .map_or_else(|_| "tcp://?".to_owned(), |a| format!("tcp://{a}")),
        }
    }
}

/// The options a driver's runtime is built with.
fn runtime_options(settings: &Settings, index: usize, plan: &DriverPlan) -> Result<RuntimeOptions> {
    // Checked when the settings were resolved; a bad value cannot get here.
    let expected_admission = plan.expected_admission().map_err(Error::Config)?;
    Ok(RuntimeOptions {
        name: plan.name.clone(),
        expect_driver_name: plan.expect_driver_name.clone(),
        call_timeout: settings.timeouts.driver_call,
        probe_timeout: settings.timeouts.driver_probe_timeout,
        is_default: index == 0,
        expected_admission,
        trust_driver_readiness: plan.trust_driver_readiness,
    })
}

/// Acquires and initialises one driver.
async fn start_driver(
    settings: &Settings,
    ctx: &AcquireContext,
    index: usize,
    plan: &DriverPlan,
) -> Result<DriverRuntime> {
    let options = runtime_options(settings, index, plan)?;
    let acquired = acquire::acquire(plan, ctx).await?;
    DriverRuntime::initialize(options, acquired).await
}

/// Whether a driver that failed to start may be left for the background
/// dial: an attached driver that is down (cannot be dialled, times out,
/// answers UNAVAILABLE), and not marked required. A refusal (incompatible
/// contract, admission mismatch, wrong driver name, a bad answer) is a
/// configuration error that retrying cannot fix; a managed driver's
/// process is the gateway's own and fails startup as before.
fn may_defer(settings: &Settings, plan: &DriverPlan, error: &Error) -> bool {
    if plan.is_managed() || settings.required_drivers.contains(&plan.name) {
        return false;
    }
    match error {
        Error::Lifecycle { .. } | Error::DriverUnavailable { .. } | Error::DriverTimeout { .. } => {
            true
        }
        Error::DriverInit { code, .. } => {
            matches!(
                code,
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
            )
        }
        _ => false,
    }
}

/// A driver started, or left pending for the background dial.
type Started = std::result::Result<Arc<DriverRuntime>, PendingDriver>;

/// Acquires and initialises every driver, concurrently. An attached driver
/// that is down (and not required) is left pending; any other failure
/// stops the ones that worked and is returned.
async fn start_drivers(settings: &Settings, ctx: &AcquireContext) -> Result<Vec<Started>> {
    let attempts = settings
        .drivers
        .iter()
        .enumerate()
        .map(|(index, plan)| start_driver(settings, ctx, index, plan));
    let results = join_all(attempts).await;
    let mut started = Vec::new();
    let mut first_error = None;
    let mut down = Vec::new();
    for (result, plan) in results.into_iter().zip(&settings.drivers) {
        match result {
            Ok(runtime) => started.push(Ok(Arc::new(runtime))),
            Err(error) if first_error.is_none() && may_defer(settings, plan, &error) => {
                let reason = crate::error::error_chain(&error);
                tracing::error!(driver = %plan.name, error = %reason, "driver is down at startup; dialling it in the background while the other drivers serve (mark it required to refuse to start without it)");
                started.push(Err(PendingDriver {
                    name: plan.name.clone(),
                    socket: plan_socket(plan),
                    managed: false,
                    reason,
                    since_ms: openshell_wire::time::now_millis(),
                }));
                down.push(error);
            }
            Err(error) => {
                if first_error.is_some() {
                    tracing::error!(error = %crate::error::error_chain(&error), "another driver failed to start");
                } else {
                    first_error = Some(error);
                }
            }
        }
    }
    if first_error.is_none() && !started.iter().any(Result::is_ok) {
        // Nothing could be served: a gateway whose every driver is down
        // fails as before, with the first driver's error.
        first_error = down.into_iter().next();
    }
    if let Some(error) = first_error {
        let runtimes: Vec<_> = started.into_iter().filter_map(Result::ok).collect();
        stop_drivers(&runtimes).await;
        return Err(error);
    }
    Ok(started)
}

/// Where a pending driver is reached, for `gateway info` (a remote
/// driver's URL stands where a socket path would).
fn plan_socket(plan: &DriverPlan) -> std::path::PathBuf {
    match &plan.acquisition {
        Acquisition::Attach { socket, .. } => socket.clone(),
        Acquisition::Remote { addr, .. } => std::path::PathBuf::from(addr.to_string()),
        Acquisition::Managed(_) => std::path::PathBuf::new(),
    }
}

/// Keeps dialling a driver that was down at startup; once it answers, it
/// is initialised as at startup, installed, resumed and watched like the
/// others. A refusal (see [`may_defer`]) ends the attempts.
async fn connect_later(
    gateway: Arc<Gateway>,
    settings: Arc<Settings>,
    ctx: Arc<AcquireContext>,
    index: usize,
    cancel: CancellationToken,
) {
    let Some(plan) = settings.drivers.get(index) else {
        return;
    };
    let mut backoff = Duration::from_millis(500);
    let runtime = loop {
        let attempt = tokio::select! {
            () = cancel.cancelled() => return,
            attempt = start_driver(&settings, &ctx, index, plan) => attempt,
        };
        match attempt {
            Ok(runtime) => break Arc::new(runtime),
            Err(error) => {
                let reason = crate::error::error_chain(&error);
                gateway.registry.set_pending_reason(&plan.name, &reason);
                if !may_defer(&settings, plan, &error) {
                    tracing::error!(driver = %plan.name, error = %reason, "driver refused; not dialling it again until the gateway restarts");
                    return;
                }
                tracing::debug!(driver = %plan.name, error = %reason, "driver still down");
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    };
    tracing::info!(driver = %plan.name, "driver connected after startup");
    gateway.registry.connect(Arc::clone(&runtime));
    gateway.publish_driver_state(&runtime.name);
    let health = tokio::spawn(watcher::follow_health(
        Arc::clone(&gateway),
        Arc::clone(&runtime),
        cancel.clone(),
    ));
    let probe = tokio::spawn(watcher::probe(
        Arc::clone(&gateway),
        Arc::clone(&runtime),
        cancel.clone(),
    ));
    if let Err(error) = gateway.startup_sweep(&runtime).await {
        tracing::warn!(driver = %runtime.name, error = %error, "could not resume the driver's sandboxes");
    }
    watcher::run(Arc::clone(&gateway), Arc::clone(&runtime), None, cancel).await;
    let _ = health.await;
    let _ = probe.await;
    if let Some(guard) = runtime.take_guard()
        && let Err(error) = guard.shutdown().await
    {
        tracing::warn!(driver = %runtime.name, error = %error, "could not stop the driver");
    }
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
    let listener = Listener::bind(&settings).await?;
    let address = listener.address();
    if let Listener::Tcp(_, None) = &listener {
        tracing::warn!(address = %address, "INSECURE: --insecure-tcp serves the API over plain TCP without authentication; any local user can create, read and delete every sandbox. Development only");
    } else if !settings.listen.is_local() {
        tracing::warn!(address = %address, "the API listens on an address other machines can reach (--allow-remote); only clients with a certificate from the client CA get in");
    }

    let ctx = AcquireContext::new(
        settings.run_dir.clone(),
        settings.state_dir.clone(),
        settings.timeouts.driver_connect,
    );
    let started = tokio::select! {
        started = start_drivers(&settings, &ctx) => started?,
        () = signals.stop.cancelled() => {
            tracing::info!("stop requested during startup");
            return Ok(());
        }
    };
    let runtimes: Vec<Arc<DriverRuntime>> = started
        .iter()
        .filter_map(|s| s.as_ref().ok().cloned())
        .collect();
    let pending: Vec<usize> = started
        .iter()
        .enumerate()
        .filter_map(|(index, s)| s.is_err().then_some(index))
        .collect();
    let gateway = Arc::new(
        Gateway::new(
            store,
            Registry::with_pending(started),
            settings.timeouts,
            address.clone(),
        )
        .with_max_watches(settings.max_watches)
        .with_watch_coalesce(settings.watch_coalesce),
    );
    let mut watchers = Watchers::default();
    let started = tokio::select! {
        result = recover_and_watch(&gateway, &runtimes, &mut watchers) => result.map(|()| true),
        () = signals.stop.cancelled() => Ok(false),
    };
    if !pending.is_empty() {
        let shared_settings = Arc::new(settings.clone());
        let shared_ctx = Arc::new(ctx.clone());
        for index in pending {
            watchers.tasks.spawn(connect_later(
                Arc::clone(&gateway),
                Arc::clone(&shared_settings),
                Arc::clone(&shared_ctx),
                index,
                watchers.cancel.clone(),
            ));
        }
    }
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
        watchers.tasks.spawn(watcher::probe(
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
    let routes = tonic::service::Routes::new(health_service)
        .add_service(GatewayRoutes::new(Arc::clone(gateway)));
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
        Listener::Unix(listener, file, peers) => (
            // Peer credentials are checked on the raw stream; then, since
            // stock gRPC clients send the socket path as :authority,
            // AuthorityFix lets hyper accept their requests.
            tokio::spawn(http2::serve(
                UnixListenerStream::new(listener).filter_map(move |accepted| match accepted {
                    Ok(stream) => peers.check(&stream).then(|| Ok(AuthorityFix::new(stream))),
                    Err(error) => Some(Err(error)),
                }),
                routes,
                stopping,
            )),
            Some(file),
        ),
        Listener::Tcp(listener, Some(acceptor)) => {
            let handshakes = CancellationToken::new();
            let incoming =
                driver_lifecycle::tls_accept_stream(listener, acceptor, handshakes.clone());
            (
                tokio::spawn(async move {
                    http2::serve(incoming, routes, stopping).await;
                    handshakes.cancel();
                }),
                None,
            )
        }
        Listener::Tcp(listener, None) => (
            tokio::spawn(http2::serve(
                TcpListenerStream::new(listener).map(|accepted| {
                    accepted.inspect(|stream| {
                        let _ = stream.set_nodelay(true);
                    })
                }),
                routes,
                stopping,
            )),
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
    mut serve: tokio::task::JoinHandle<()>,
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
        Ok(()) => Ok(()),
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
            "tcp://127.0.0.1:7000",
            "--insecure-tcp"
        ])));
    }

    #[test]
    fn the_gateway_socket_admits_its_uid_and_the_listed_ones() {
        let peers = UdsPeers {
            uid: 1000,
            allow_uids: vec![1001],
            allow_gids: vec![50],
        };
        assert!(peers.admits(1000, 1000));
        assert!(peers.admits(1001, 7));
        assert!(peers.admits(65534, 50));
        assert!(!peers.admits(65534, 65534));
        assert!(!peers.admits(0, 0));
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
