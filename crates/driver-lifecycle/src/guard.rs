//! The lifecycle guard: what the gateway holds for each acquired endpoint.
//!
//! A managed driver's guard owns the process (through a supervisor task that
//! respawns it when it dies); an attached driver's guard owns nothing and
//! never signals or unlinks anything.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::endpoint::DriverEndpoint;
use crate::error::{LifecycleError, Result};
use crate::socket::{self, SocketLock};
use crate::spawn::{self, DriverCommand, Running, SpawnOptions, signal_group};

/// What subscribers learn about a managed driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriverHealth {
    /// A process was started and is not ready yet.
    Starting { attempt: u32 },
    /// The driver serves its socket. `incarnation` counts starts, from 1, so
    /// a subscriber that missed the restart itself still sees that the
    /// process changed.
    Ready { pid: u32, incarnation: u32 },
    /// The driver died; a new one starts after a backoff.
    Restarting { attempt: u32, reason: String },
    /// The driver died and the restart bound was reached; nothing will
    /// restart it.
    Failed { reason: String },
}

impl DriverHealth {
    pub fn is_ready(&self) -> bool {
        matches!(self, Self::Ready { .. })
    }
}

/// How a guard's shutdown went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Exit status of the driver process, when there was one to reap.
    pub exit_status: Option<ExitStatus>,
    /// SIGKILL was needed because the grace period ran out.
    pub forced: bool,
    pub elapsed: Duration,
}

/// The guard for one acquired endpoint.
#[derive(Debug)]
pub enum DriverGuard {
    /// The gateway spawned this driver and owns its process group.
    Managed(ManagedDriverProcess),
    /// The operator runs this driver; the guard does nothing at all.
    Attached,
}

impl DriverGuard {
    pub fn is_managed(&self) -> bool {
        matches!(self, Self::Managed(_))
    }

    /// Health updates of a managed driver; `None` for an attached one, whose
    /// process the gateway cannot see.
    pub fn health(&self) -> Option<watch::Receiver<DriverHealth>> {
        match self {
            Self::Managed(process) => Some(process.health()),
            Self::Attached => None,
        }
    }

    /// Pid of the current driver process, if managed and running.
    pub fn pid(&self) -> Option<u32> {
        match self {
            Self::Managed(process) => process.pid(),
            Self::Attached => None,
        }
    }

    /// Stops a managed driver (see [`ManagedDriverProcess::shutdown`]); for an
    /// attached driver this returns at once and touches nothing.
    pub async fn shutdown(self) -> Result<ShutdownReport> {
        match self {
            Self::Managed(process) => process.shutdown().await,
            Self::Attached => Ok(ShutdownReport {
                exit_status: None,
                forced: false,
                elapsed: Duration::ZERO,
            }),
        }
    }
}

struct ShutdownRequest {
    reply: oneshot::Sender<Result<ShutdownReport>>,
}

/// A driver process the gateway spawned, with its supervisor.
#[derive(Debug)]
pub struct ManagedDriverProcess {
    name: String,
    socket: PathBuf,
    requests: mpsc::Sender<ShutdownRequest>,
    health: watch::Receiver<DriverHealth>,
    /// Process group of the current incarnation (0 when none runs).
    pgid: Arc<AtomicI32>,
    supervisor: Option<JoinHandle<()>>,
}

impl ManagedDriverProcess {
    /// Spawns the driver for `endpoint` and returns once it is ready.
    ///
    /// The socket's directory is made private (0700, ours, not a symlink),
    /// the path length is checked, and whatever is at the path must be absent
    /// or a stale socket of ours (removed); a live listener or any other file
    /// is an error. The driver binds the socket itself.
    pub async fn spawn(
        endpoint: &DriverEndpoint,
        command: DriverCommand,
        options: SpawnOptions,
    ) -> Result<Self> {
        let socket_path = endpoint.socket.clone();
        socket::check_socket_path(&socket_path)?;
        if let Some(parent) = socket_path.parent().filter(|p| !p.as_os_str().is_empty()) {
            socket::prepare_private_dir(parent)?;
        }
        {
            // Holding the lock while clearing keeps a concurrently starting
            // server from being mistaken for a stale one.
            let _lock = SocketLock::acquire(&socket_path)?;
            socket::clear_stale_socket(&socket_path)?;
        }

        let pgid = Arc::new(AtomicI32::new(0));
        let record_pgid = {
            let pgid = Arc::clone(&pgid);
            move |pid: u32| pgid.store(i32::try_from(pid).unwrap_or(0), Ordering::SeqCst)
        };
        let started = Instant::now();
        let running = spawn::start(
            &endpoint.name,
            &socket_path,
            &command,
            &options,
            &record_pgid,
        )
        .await?;
        tracing::info!(
            driver = %endpoint.name,
            pid = running.pid,
            socket = %socket_path.display(),
            elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
            "managed driver ready"
        );

        let (health_tx, health) = watch::channel(DriverHealth::Ready {
            pid: running.pid,
            incarnation: 1,
        });
        let (requests, request_rx) = mpsc::channel(1);
        let supervisor = Supervisor {
            name: endpoint.name.clone(),
            socket: socket_path.clone(),
            command,
            options,
            pgid: Arc::clone(&pgid),
            health: health_tx,
            requests: request_rx,
            incarnation: 1,
        };
        let task = tokio::spawn(supervisor.run(running));
        Ok(Self {
            name: endpoint.name.clone(),
            socket: socket_path,
            requests,
            health,
            pgid,
            supervisor: Some(task),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn health(&self) -> watch::Receiver<DriverHealth> {
        self.health.clone()
    }

    pub fn pid(&self) -> Option<u32> {
        match *self.health.borrow() {
            DriverHealth::Ready { pid, .. } => Some(pid),
            _ => u32::try_from(self.pgid.load(Ordering::SeqCst))
                .ok()
                .filter(|p| *p > 0),
        }
    }

    /// Stops the driver: SIGTERM to its process group, up to the grace
    /// period for the whole group to exit, then SIGKILL, then a bounded wait
    /// for the group to vanish. Removes the socket if no other process holds
    /// its lock. Members still running at the end are reported as
    /// [`LifecycleError::Lingered`].
    pub async fn shutdown(mut self) -> Result<ShutdownReport> {
        let (reply, response) = oneshot::channel();
        let gone = || LifecycleError::SupervisorGone {
            name: self.name.clone(),
        };
        if self.requests.send(ShutdownRequest { reply }).await.is_err() {
            return Err(gone());
        }
        let result = response.await.map_err(|_| gone())?;
        if let Some(task) = self.supervisor.take() {
            let _ = task.await;
        }
        result
    }
}

impl Drop for ManagedDriverProcess {
    /// Best effort when `shutdown` was not called: stop the supervisor so it
    /// cannot respawn, SIGKILL the group, and remove the socket if it is
    /// still ours.
    fn drop(&mut self) {
        let Some(task) = self.supervisor.take() else {
            return;
        };
        task.abort();
        let pgid = self.pgid.swap(0, Ordering::SeqCst);
        signal_group(pgid, Signal::SIGKILL);
        remove_socket_if_ours(&self.socket);
    }
}

/// Removes the socket unless another process holds its lock (a server that
/// is not ours took the path over). Never waits: used from `Drop`.
fn remove_socket_if_ours(socket: &Path) {
    if let Ok(_lock) = SocketLock::acquire(socket) {
        socket::remove_socket_if_socket(socket);
    }
}

/// [`remove_socket_if_ours`] after a reap: `wait` covers our own driver's
/// lock still being released just after it was reaped, waited for on the
/// timer so the supervisor's runtime thread stays free.
async fn remove_socket_if_ours_after_reap(socket: &Path, wait: Duration) {
    if let Ok(_lock) = SocketLock::acquire_waiting_async(socket, wait).await {
        socket::remove_socket_if_socket(socket);
    }
}

/// How long teardown waits for a reaped driver's socket lock to go away.
const REMOVE_WAIT: Duration = Duration::from_millis(250);

struct Supervisor {
    name: String,
    socket: PathBuf,
    command: DriverCommand,
    options: SpawnOptions,
    pgid: Arc<AtomicI32>,
    health: watch::Sender<DriverHealth>,
    requests: mpsc::Receiver<ShutdownRequest>,
    incarnation: u32,
}

/// What ended a wait in the supervisor.
enum Interrupt {
    Shutdown(ShutdownRequest),
    /// The guard was dropped without shutdown; `Drop` already killed the group.
    GuardDropped,
}

impl Supervisor {
    async fn run(mut self, first: Running) {
        let mut running = first;
        let mut attempt = 0_u32;
        loop {
            let up_since = Instant::now();
            let exit = tokio::select! {
                status = running.child.wait() => status,
                request = self.requests.recv() => {
                    if let Some(request) = request {
                        let result = self.terminate(running).await;
                        let _ = request.reply.send(result);
                    }
                    return;
                }
            };
            let stderr = running.drain_stderr().await;
            let reason = match &exit {
                Ok(status) => format!("driver process {} exited ({status}){stderr}", running.pid),
                Err(e) => format!("could not wait for driver process {}: {e}", running.pid),
            };
            // Whatever the leader left behind in its group goes with it.
            signal_group(running.pgid(), Signal::SIGKILL);
            self.pgid.store(0, Ordering::SeqCst);
            tracing::warn!(driver = %self.name, pid = running.pid, reason = %reason, "managed driver died");
            if up_since.elapsed() >= self.options.restart.stable_after {
                attempt = 0;
            }

            let mut last_reason = reason;
            running = loop {
                attempt += 1;
                if attempt > self.options.restart.max_attempts {
                    let reason = format!(
                        "gave up after {} restart attempt(s); last failure: {last_reason}",
                        attempt - 1
                    );
                    tracing::error!(driver = %self.name, reason = %reason, "managed driver failed");
                    self.health.send_replace(DriverHealth::Failed {
                        reason: reason.clone(),
                    });
                    remove_socket_if_ours_after_reap(&self.socket, REMOVE_WAIT).await;
                    if let Interrupt::Shutdown(request) = self.next_request().await {
                        let _ = request.reply.send(Err(LifecycleError::GaveUp {
                            name: self.name.clone(),
                            reason,
                        }));
                    }
                    return;
                }
                tracing::info!(driver = %self.name, attempt, "restarting managed driver");
                self.health.send_replace(DriverHealth::Restarting {
                    attempt,
                    reason: last_reason.clone(),
                });
                let backoff = self.options.restart.backoff(attempt);
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    interrupt = self.next_request() => {
                        self.finish_without_process(interrupt).await;
                        return;
                    }
                }
                self.health.send_replace(DriverHealth::Starting { attempt });
                match self.start_once().await {
                    Ok(Some(next)) => break next,
                    Ok(None) => return,
                    Err(error) => {
                        tracing::warn!(driver = %self.name, attempt, error = %error, "driver restart failed");
                        last_reason = error.to_string();
                    }
                }
            };
            self.incarnation += 1;
            tracing::info!(driver = %self.name, pid = running.pid, incarnation = self.incarnation, "managed driver ready again");
            self.health.send_replace(DriverHealth::Ready {
                pid: running.pid,
                incarnation: self.incarnation,
            });
        }
    }

    async fn next_request(&mut self) -> Interrupt {
        next_request(&mut self.requests).await
    }

    /// Answers a shutdown that arrived while no process was running.
    async fn finish_without_process(&self, interrupt: Interrupt) {
        if let Interrupt::Shutdown(request) = interrupt {
            remove_socket_if_ours_after_reap(&self.socket, REMOVE_WAIT).await;
            let _ = request.reply.send(Ok(ShutdownReport {
                exit_status: None,
                forced: false,
                elapsed: Duration::ZERO,
            }));
        }
    }

    /// One start attempt that a shutdown request can interrupt. `Ok(None)`
    /// means the supervisor was told to stop meanwhile and has answered.
    async fn start_once(&mut self) -> Result<Option<Running>> {
        let pgid = Arc::clone(&self.pgid);
        let record = move |pid: u32| pgid.store(i32::try_from(pid).unwrap_or(0), Ordering::SeqCst);
        let start = spawn::start(
            &self.name,
            &self.socket,
            &self.command,
            &self.options,
            &record,
        );
        tokio::select! {
            result = start => result.map(Some),
            interrupt = next_request(&mut self.requests) => {
                // The half-started process is dropped with the future; make
                // sure its whole group goes too.
                signal_group(self.pgid.swap(0, Ordering::SeqCst), Signal::SIGKILL);
                self.finish_without_process(interrupt).await;
                Ok(None)
            }
        }
    }

    async fn terminate(&self, mut running: Running) -> Result<ShutdownReport> {
        let started = Instant::now();
        let pgid = running.pgid();
        tracing::info!(driver = %self.name, pid = running.pid, "stopping managed driver");
        signal_group(pgid, Signal::SIGTERM);

        let mut forced = false;
        let mut status = None;
        let graceful = tokio::time::timeout(self.options.shutdown_grace, async {
            let exit = running.child.wait().await;
            wait_group_empty(pgid).await;
            exit
        })
        .await;
        match graceful {
            Ok(exit) => status = exit.ok(),
            Err(_) => {
                forced = true;
                tracing::warn!(driver = %self.name, pid = running.pid, grace = ?self.options.shutdown_grace, "driver ignored SIGTERM; sending SIGKILL");
                signal_group(pgid, Signal::SIGKILL);
                if let Ok(exit) =
                    tokio::time::timeout(self.options.reap_timeout, running.child.wait()).await
                {
                    status = exit.ok();
                }
                let _ =
                    tokio::time::timeout(self.options.reap_timeout, wait_group_empty(pgid)).await;
            }
        }
        self.pgid.store(0, Ordering::SeqCst);

        let mut lingering = crate::proc::live_group_members(pgid);
        if status.is_none() && crate::proc::stat(pgid).is_some_and(|p| p.state != 'Z') {
            lingering.push(pgid);
        }
        lingering.sort_unstable();
        lingering.dedup();
        remove_socket_if_ours_after_reap(&self.socket, REMOVE_WAIT).await;
        if !lingering.is_empty() {
            return Err(LifecycleError::Lingered {
                name: self.name.clone(),
                pgid,
                pids: lingering,
            });
        }
        let report = ShutdownReport {
            exit_status: status,
            forced,
            elapsed: started.elapsed(),
        };
        tracing::info!(driver = %self.name, forced, elapsed_ms = report.elapsed.as_secs_f64() * 1000.0, "managed driver stopped");
        Ok(report)
    }
}

async fn next_request(requests: &mut mpsc::Receiver<ShutdownRequest>) -> Interrupt {
    match requests.recv().await {
        Some(request) => Interrupt::Shutdown(request),
        None => Interrupt::GuardDropped,
    }
}

/// Polls `/proc` until no live process is left in the group.
async fn wait_group_empty(pgid: i32) {
    let mut interval = Duration::from_millis(1);
    while !crate::proc::live_group_members(pgid).is_empty() {
        tokio::time::sleep(interval).await;
        interval = (interval * 2).min(Duration::from_millis(50));
    }
}
