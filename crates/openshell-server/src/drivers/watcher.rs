//! One watch task per driver: consume the driver's WatchSandboxes stream,
//! reconnect with backoff when it breaks, re-list and reconcile after every
//! (re)connect and periodically, and follow a managed driver's restarts.
//!
//! A driver whose process the gateway supervises is available while its
//! process is ready; the task waits for readiness before reconnecting and
//! drops the stream as soon as the process is replaced. An attached
//! driver is available while its unary calls get through and its watch has
//! not failed.
//!
//! Opening a watch has no deadline and does not decide reachability:
//! grpc-go, grpcio and other servers send a stream's response headers only
//! with its first message, so an idle driver's watch is silent, headers
//! included, until something changes. The task lists right after asking
//! for the watch; the list's answer says the driver is reachable.

use std::sync::Arc;
use std::time::Duration;

use driver_lifecycle::DriverHealth;
use futures::FutureExt as _;
use openshell_proto::compute::v1::WatchSandboxesEvent;
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;

use crate::drivers::registry::DriverRuntime;
use crate::error::Result;
use crate::gateway::{BusEvent, Gateway};

const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A watch being opened: the call runs on its own task, because a driver
/// may answer it only when it has a first event to send. Dropping the
/// handle abandons the call.
#[derive(Debug)]
pub struct Opening(tokio::task::JoinHandle<Result<Streaming<WatchSandboxesEvent>>>);

impl Opening {
    fn start(runtime: &DriverRuntime) -> Self {
        let driver = runtime.driver.clone();
        Self(tokio::spawn(async move { driver.watch().await }))
    }

    /// Waits for the driver to answer the watch call (no deadline).
    async fn opened(&mut self) -> std::result::Result<Streaming<WatchSandboxesEvent>, String> {
        match (&mut self.0).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(error)) => Err(format!("watch failed: {error}")),
            Err(error) => Err(format!("watch task failed: {error}")),
        }
    }
}

impl Drop for Opening {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Asks for the driver's watch stream, then lists and reconciles, so that
/// nothing that happens between the two is missed (the watch starts with
/// the driver's full picture, which covers whatever the list predates).
/// Succeeds when the list does: that is what says the driver is reachable.
pub async fn connect(gateway: &Gateway, runtime: &DriverRuntime) -> Result<Opening> {
    let opening = Opening::start(runtime);
    let listed = runtime.driver.list().await?;
    gateway.reconcile(runtime, listed).await?;
    Ok(opening)
}

/// The stream's next message, or never while it is still being opened.
async fn next_message(
    stream: &mut Option<Streaming<WatchSandboxesEvent>>,
) -> std::result::Result<Option<WatchSandboxesEvent>, tonic::Status> {
    match stream {
        Some(stream) => stream.message().await,
        None => std::future::pending().await,
    }
}

/// The opened stream, or never once it is open.
async fn next_opened(
    opening: &mut Option<Opening>,
) -> std::result::Result<Streaming<WatchSandboxesEvent>, String> {
    match opening {
        Some(opening) => opening.opened().await,
        None => std::future::pending().await,
    }
}

fn mark(gateway: &Gateway, runtime: &DriverRuntime, connected: bool, message: &str) {
    if runtime.set_connected(connected, message) {
        if connected {
            tracing::info!(driver = %runtime.name, "driver reachable again");
        } else {
            tracing::warn!(driver = %runtime.name, reason = %message, "driver unreachable; reconnecting");
        }
        gateway.publish(BusEvent::DriverState {
            driver: runtime.name.clone(),
        });
    }
}

/// Most events one transaction applies.
const MAX_BATCH: usize = 512;

/// Applies `first` and every event already buffered behind it as one batch.
/// Returns why the stream ended, if it did while draining.
async fn apply_buffered(
    gateway: &Gateway,
    runtime: &DriverRuntime,
    stream: &mut Streaming<WatchSandboxesEvent>,
    first: WatchSandboxesEvent,
) -> Option<String> {
    let mut batch = vec![first];
    let mut ended = None;
    while batch.len() < MAX_BATCH {
        match stream.message().now_or_never() {
            Some(Ok(Some(event))) => batch.push(event),
            Some(Ok(None)) => {
                ended = Some("the driver ended its watch stream".to_owned());
                break;
            }
            Some(Err(status)) => {
                ended = Some(format!("watch stream failed: {}", status.message()));
                break;
            }
            None => break,
        }
    }
    if let Err(error) = gateway.apply_events(&runtime.name, batch).await {
        tracing::warn!(driver = %runtime.name, error = %error, "could not apply driver events");
    }
    ended
}

/// Waits until a supervised driver's process is ready; false if cancelled.
async fn wait_ready(
    health: &mut watch::Receiver<DriverHealth>,
    cancel: &CancellationToken,
) -> bool {
    tokio::select! {
        () = cancel.cancelled() => false,
        ready = health.wait_for(DriverHealth::is_ready) => ready.is_ok(),
    }
}

fn incarnation(health: &DriverHealth) -> Option<u32> {
    match health {
        DriverHealth::Ready { incarnation, .. } => Some(*incarnation),
        _ => None,
    }
}

/// Mirrors a supervised driver's health into its status until cancelled.
pub async fn follow_health(
    gateway: Arc<Gateway>,
    runtime: Arc<DriverRuntime>,
    cancel: CancellationToken,
) {
    let Some(mut health) = runtime.health() else {
        return;
    };
    loop {
        let current = health.borrow_and_update().clone();
        let was_available = runtime.is_available();
        if runtime.apply_health(&current) {
            if runtime.is_available() != was_available {
                gateway.publish(BusEvent::DriverState {
                    driver: runtime.name.clone(),
                });
            }
            match &current {
                DriverHealth::Ready { pid, .. } => {
                    tracing::info!(driver = %runtime.name, pid, "driver ready again");
                }
                other => {
                    tracing::warn!(driver = %runtime.name, health = ?other, "driver not ready");
                }
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            changed = health.changed() => if changed.is_err() { return },
        }
    }
}

/// Probes the driver every `driver_probe_interval` with a short deadline,
/// so that a frozen driver (SIGSTOP, a hung event loop) shows as
/// Unavailable and calls fail fast instead of each waiting out its
/// deadline. Runs until cancelled.
pub async fn probe(gateway: Arc<Gateway>, runtime: Arc<DriverRuntime>, cancel: CancellationToken) {
    let mut ticks = tokio::time::interval(gateway.timeouts.driver_probe_interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let changed = tokio::select! {
            () = cancel.cancelled() => return,
            changed = runtime.probe_responsive() => changed,
        };
        match changed {
            Some(true) => {
                tracing::info!(driver = %runtime.name, "driver responsive again");
                runtime.wake.notify_one();
                gateway.publish_driver_state(&runtime.name);
            }
            Some(false) => {
                tracing::warn!(driver = %runtime.name, reason = %runtime.status().message, "driver is unresponsive; its calls fail with UNAVAILABLE until it answers again");
                gateway.publish_driver_state(&runtime.name);
            }
            None => {}
        }
    }
}

/// The watch loop of one driver. `first` is the watch asked for during
/// startup, if the driver answered the list then.
pub async fn run(
    gateway: Arc<Gateway>,
    runtime: Arc<DriverRuntime>,
    first: Option<Opening>,
    cancel: CancellationToken,
) {
    let mut health = runtime.health();
    let mut pending = first;
    let mut backoff = INITIAL_BACKOFF;
    let mut reconcile = tokio::time::interval(gateway.timeouts.reconcile_interval);
    reconcile.set_missed_tick_behavior(MissedTickBehavior::Delay);
    reconcile.tick().await;
    loop {
        if let Some(health) = health.as_mut()
            && !wait_ready(health, &cancel).await
        {
            return;
        }
        let connected_to = health.as_ref().and_then(|h| incarnation(&h.borrow()));
        let connected = match pending.take() {
            Some(opening) => Ok(opening),
            None => tokio::select! {
                () = cancel.cancelled() => return,
                opened = connect(&gateway, &runtime) => opened,
            },
        };
        let mut opening = match connected {
            Ok(opening) => Some(opening),
            Err(error) => {
                mark(&gateway, &runtime, false, &error.to_string());
                tracing::debug!(driver = %runtime.name, error = %error, backoff = ?backoff, "watch connect failed");
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                    () = runtime.wake.notified() => {}
                    () = restarted(health.as_mut(), connected_to) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        mark(&gateway, &runtime, true, "");
        backoff = INITIAL_BACKOFF;
        reconcile.reset();
        let mut stream: Option<Streaming<WatchSandboxesEvent>> = None;
        let reason = loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                opened = next_opened(&mut opening) => match opened {
                    Ok(open) => {
                        opening = None;
                        stream = Some(open);
                    }
                    Err(reason) => break reason,
                },
                message = next_message(&mut stream) => match message {
                    Ok(Some(event)) => {
                        let Some(open) = stream.as_mut() else { continue };
                        if let Some(reason) = apply_buffered(&gateway, &runtime, open, event).await {
                            break reason;
                        }
                    }
                    Ok(None) => break "the driver ended its watch stream".to_owned(),
                    Err(status) => break format!("watch stream failed: {}", status.message()),
                },
                _ = reconcile.tick() => {
                    match runtime.driver.list().await {
                        Ok(listed) => {
                            if let Err(error) = gateway.reconcile(&runtime, listed).await {
                                tracing::warn!(driver = %runtime.name, error = %error, "periodic reconcile failed");
                            }
                        }
                        Err(error) => tracing::warn!(driver = %runtime.name, error = %error, "periodic list failed"),
                    }
                }
                () = restarted(health.as_mut(), connected_to) => break "the driver process was replaced".to_owned(),
            }
        };
        mark(&gateway, &runtime, false, &reason);
        tracing::debug!(driver = %runtime.name, reason = %reason, "watch stream lost");
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
            () = runtime.wake.notified() => {}
            () = restarted(health.as_mut(), connected_to) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Resolves when a supervised driver is no longer the process that was
/// ready at `connected_to` (it died, or a new one is up). Never resolves
/// for drivers without process health.
async fn restarted(health: Option<&mut watch::Receiver<DriverHealth>>, connected_to: Option<u32>) {
    let Some(health) = health else {
        return std::future::pending().await;
    };
    if health
        .wait_for(|h| incarnation(h) != connected_to)
        .await
        .is_err()
    {
        std::future::pending::<()>().await;
    }
}
