//! The registry of named driver runtimes. A runtime is an acquired endpoint
//! turned into a [`RemoteComputeDriver`] with its capabilities snapshot,
//! its health, and the guard that is stopped at the very end.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use driver_lifecycle::{DriverGuard, DriverHealth};
use openshell_driver_kit::contract::{AdmissionPolicy, Generation};
use openshell_proto::gateway::v1::{self as gw, DriverState};
use openshell_wire::ConnectionCounter;
use openshell_wire::time::{now_millis, rfc3339_millis};
use tokio::sync::{Notify, watch};

use crate::api::translate::WORKSPACE;
use crate::drivers::acquire::{self, Acquired};
use crate::drivers::remote::{Capabilities, RemoteComputeDriver};
use crate::error::{Error, Result};

/// What [`DriverRuntime::initialize`] needs besides the acquired endpoint.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    /// The configured name.
    pub name: String,
    /// The `driver_name` the driver must report, when configured.
    pub expect_driver_name: Option<String>,
    /// Deadline of every unary call.
    pub call_timeout: Duration,
    /// Deadline of the periodic responsiveness probe.
    pub probe_timeout: Duration,
    /// Whether creates that name no driver go here.
    pub is_default: bool,
    /// The admission policy a 1.x driver must acknowledge; `None` adopts
    /// what the driver acknowledges at connect.
    pub expected_admission: Option<AdmissionPolicy>,
    /// Take a 1.x driver's Ready at its word even when it leaves runtime
    /// readiness to a supervisor session.
    pub trust_driver_readiness: bool,
}

/// A driver's health as the gateway reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverStatus {
    pub state: DriverState,
    /// Why the driver is not ready, when it is not.
    pub message: String,
    /// Current process of a managed driver.
    pub pid: u32,
    pub restarts: u32,
    /// When `state` last changed, in milliseconds since the Unix epoch.
    pub since_ms: i64,
}

impl DriverStatus {
    fn ready(pid: u32, restarts: u32, since_ms: i64) -> Self {
        Self {
            state: DriverState::Ready,
            message: String::new(),
            pid,
            restarts,
            since_ms,
        }
    }

    /// `self` with `since_ms` kept from `previous` when the state is the
    /// same, and set to `now_ms` when it changed.
    fn since(mut self, previous: &Self, now_ms: i64) -> Self {
        self.since_ms = if self.state == previous.state {
            previous.since_ms
        } else {
            now_ms
        };
        self
    }

    fn from_health(health: &DriverHealth, previous: &Self, now_ms: i64) -> Self {
        let next = match health {
            DriverHealth::Starting { attempt } => Self {
                state: DriverState::Starting,
                message: format!("starting again (attempt {attempt})"),
                pid: 0,
                restarts: previous.restarts,
                since_ms: 0,
            },
            DriverHealth::Ready { pid, incarnation } => {
                Self::ready(*pid, incarnation.saturating_sub(1), 0)
            }
            DriverHealth::Restarting { attempt, reason } => Self {
                state: DriverState::Restarting,
                message: format!("restart attempt {attempt} after: {reason}"),
                pid: 0,
                restarts: previous.restarts,
                since_ms: 0,
            },
            DriverHealth::Failed { reason } => Self {
                state: DriverState::Failed,
                message: reason.clone(),
                pid: 0,
                restarts: previous.restarts,
                since_ms: 0,
            },
        };
        next.since(previous, now_ms)
    }
}

/// One configured driver, ready to take calls.
#[derive(Debug)]
pub struct DriverRuntime {
    pub name: String,
    pub socket: PathBuf,
    pub managed: bool,
    pub is_default: bool,
    pub driver: RemoteComputeDriver,
    /// The same channel with the probe's short deadline.
    probe_driver: RemoteComputeDriver,
    pub capabilities: Capabilities,
    status: watch::Sender<DriverStatus>,
    /// Why the driver counts as unresponsive (its probe timed out), while
    /// it does; overrides a Ready status.
    unresponsive: watch::Sender<Option<String>>,
    health: Option<watch::Receiver<DriverHealth>>,
    guard: Mutex<Option<DriverGuard>>,
    /// Wakes the watch task to reconnect now (a call just got through).
    pub(crate) wake: Notify,
    /// Connections the driver's channel has opened.
    connections: ConnectionCounter,
    /// The connection count when the admission acknowledgement was last
    /// confirmed: while no new connection was opened, the process that
    /// acknowledged it is the one answering.
    admission_confirmed_at: AtomicU64,
    /// The acknowledged policy, parsed (1.x drivers that sent one).
    pub admission: Option<AdmissionPolicy>,
    trust_driver_readiness: bool,
}

impl DriverRuntime {
    /// Asks a freshly acquired driver for its capabilities and the optional
    /// bits, checks `expect_driver_name`, and builds the runtime. On failure
    /// the guard is shut down before the error is returned.
    pub async fn initialize(options: RuntimeOptions, acquired: Acquired) -> Result<Self> {
        let RuntimeOptions {
            name,
            expect_driver_name,
            call_timeout,
            probe_timeout,
            is_default,
            expected_admission,
            trust_driver_readiness,
        } = options;
        let Acquired {
            endpoint,
            guard,
            channel,
            connections,
        } = acquired;
        let driver = RemoteComputeDriver::new(&name, channel.clone(), call_timeout);
        let probe_driver = RemoteComputeDriver::new(&name, channel, probe_timeout);
        let probed = async {
            let capabilities = Self::probe(
                &name,
                expect_driver_name.as_deref(),
                &driver,
                &endpoint.socket,
            )
            .await?;
            let admission = admit(&name, &capabilities, expected_admission.as_ref())?;
            Ok::<_, Error>((capabilities, admission))
        };
        match probed.await {
            Ok((capabilities, admission)) => {
                let managed = guard.is_managed();
                let health = guard.health();
                let status = DriverStatus::ready(guard.pid().unwrap_or(0), 0, now_millis());
                let (status, _) = watch::channel(status);
                tracing::info!(
                    driver = %name,
                    managed,
                    socket = %endpoint.socket.display(),
                    pid = guard.pid(),
                    driver_name = %capabilities.driver_name,
                    driver_version = %capabilities.driver_version,
                    default_image = %capabilities.default_image,
                    gateway_manages_lifecycle = capabilities.gateway_manages_lifecycle,
                    logs = capabilities.logs,
                    contract = capabilities.generation.label(),
                    admission_policy = %capabilities.admission_policy,
                    reports_runtime_readiness = capabilities.reports_runtime_readiness,
                    is_default,
                    "driver ready"
                );
                if !capabilities.reports_runtime_readiness {
                    if trust_driver_readiness {
                        tracing::warn!(driver = %name, "driver leaves runtime readiness to a supervisor session; trust_driver_readiness takes its Ready as the sandbox's");
                    } else {
                        tracing::warn!(driver = %name, "driver leaves runtime readiness to a supervisor session, which this gateway does not have: its sandboxes stay Provisioning (set trust_driver_readiness = true in its table to take its Ready at its word)");
                    }
                }
                let confirmed = connections.get();
                Ok(Self {
                    name,
                    socket: endpoint.socket,
                    managed,
                    is_default,
                    driver,
                    probe_driver,
                    capabilities,
                    status,
                    unresponsive: watch::channel(None).0,
                    health,
                    guard: Mutex::new(Some(guard)),
                    wake: Notify::new(),
                    connections,
                    admission_confirmed_at: AtomicU64::new(confirmed),
                    admission,
                    trust_driver_readiness,
                })
            }
            Err(error) => {
                acquire::release(&name, guard, "initialize").await;
                Err(error)
            }
        }
    }

    async fn probe(
        name: &str,
        expect_driver_name: Option<&str>,
        driver: &RemoteComputeDriver,
        socket: &std::path::Path,
    ) -> Result<Capabilities> {
        let init_error = |rpc: &'static str, error: Error| match error {
            Error::DriverCall { code, message, .. } => Error::DriverInit {
                driver: name.to_owned(),
                rpc,
                code,
                message,
            },
            other => other,
        };
        let response = driver
            .capabilities()
            .await
            .map_err(|e| init_error("GetCapabilities", e))?;
        if let Some(expected) = expect_driver_name
            && expected != response.driver_name
        {
            return Err(Error::DriverNameMismatch {
                driver: name.to_owned(),
                socket: socket.to_owned(),
                expected: expected.to_owned(),
                actual: response.driver_name,
            });
        }
        let requirements = driver
            .listener_requirements()
            .await
            .map_err(|e| init_error("GetGatewayListenerRequirements", e))?;
        for requirement in &requirements {
            tracing::warn!(driver = %name, reason = %requirement.reason, selector = ?requirement.selector, "driver asks for an extra gateway listener; this gateway serves only its own API and ignores it");
        }
        driver
            .ensure_workspace(WORKSPACE)
            .await
            .map_err(|e| init_error("EnsureWorkspace", e))?;
        let logs = driver
            .probe_logs()
            .await
            .map_err(|e| init_error("StreamLogs", e))?;
        Capabilities::from_response(name, response, logs)
    }

    /// Before a call that creates or starts a workload on a 1.x driver:
    /// the driver must still acknowledge the admission policy it
    /// acknowledged at connect, byte for byte. While the channel has opened
    /// no new connection since the last confirmation, the same process
    /// answers and nothing is asked; otherwise one `GetCapabilities`
    /// confirms it.
    pub async fn confirm_admission(&self) -> Result<()> {
        if self.capabilities.generation != Generation::V1 {
            return Ok(());
        }
        let connections = self.connections.get();
        if connections == self.admission_confirmed_at.load(Ordering::SeqCst) {
            return Ok(());
        }
        let response = self.driver.capabilities().await?;
        if response.resource_admission_policy != self.capabilities.admission_policy {
            return Err(Error::AdmissionMismatch {
                driver: self.name.clone(),
                reason: "the driver's admission policy changed since the gateway connected; restart the gateway after configuring matching policies",
                expected: self.capabilities.admission_policy.clone(),
                actual: response.resource_admission_policy,
            });
        }
        self.admission_confirmed_at
            .store(connections, Ordering::SeqCst);
        Ok(())
    }

    /// Whether the driver's Ready may be shown as the sandbox's Ready.
    pub fn ready_means_running(&self) -> bool {
        self.capabilities.reports_runtime_readiness || self.trust_driver_readiness
    }

    /// The driver's status: its process or connection state, shown as
    /// Unavailable while a Ready driver does not answer its probe.
    pub fn status(&self) -> DriverStatus {
        let mut status = self.status.borrow().clone();
        if status.state == DriverState::Ready
            && let Some(reason) = self.unresponsive.borrow().as_ref()
        {
            status.state = DriverState::Unavailable;
            status.message.clone_from(reason);
        }
        status
    }

    pub fn is_available(&self) -> bool {
        self.status().state == DriverState::Ready
    }

    /// Asks the driver GetCapabilities with the probe's short deadline and
    /// records whether it answered in time. An answer of any kind (even an
    /// error status) counts as responsive. Returns `Some(now_responsive)`
    /// when that changed.
    pub async fn probe_responsive(&self) -> Option<bool> {
        let reason = match self.probe_driver.capabilities().await {
            Ok(_) | Err(Error::DriverCall { .. }) => None,
            Err(Error::DriverTimeout { timeout, .. }) => Some(format!(
                "unresponsive: did not answer GetCapabilities within {timeout:?} (frozen or overloaded)"
            )),
            Err(other) => Some(format!("unresponsive: {other}")),
        };
        let responsive = reason.is_none();
        let changed = self.unresponsive.send_if_modified(|current| {
            let changed = current.is_some() != reason.is_some();
            *current = reason;
            changed
        });
        changed.then_some(responsive)
    }

    fn clear_unresponsive(&self) {
        self.unresponsive
            .send_if_modified(|current| current.take().is_some());
    }

    /// Runs a driver call, giving up with UNAVAILABLE as soon as the driver
    /// is found unresponsive, so that no caller waits out a frozen driver.
    pub fn guarded<'a, T: Send + 'a>(
        &'a self,
        call: impl Future<Output = Result<T>> + Send + 'a,
    ) -> Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>> {
        Box::pin(async move {
            if !self.is_available() {
                return Err(self.unavailable());
            }
            let mut unresponsive = self.unresponsive.subscribe();
            tokio::select! {
                result = call => result,
                _ = unresponsive.wait_for(Option::is_some) => Err(self.unavailable()),
            }
        })
    }

    /// The error calls get while the driver is down.
    pub fn unavailable(&self) -> Error {
        let status = self.status();
        let state = match status.state {
            DriverState::Starting => "starting",
            DriverState::Restarting => "restarting",
            DriverState::Failed => "failed",
            _ => "not reachable",
        };
        Error::DriverUnavailable {
            driver: self.name.clone(),
            reason: if status.message.is_empty() {
                state.to_owned()
            } else {
                format!("{state}: {}", status.message)
            },
        }
    }

    /// Health updates of a driver whose process the gateway can see.
    pub fn health(&self) -> Option<watch::Receiver<DriverHealth>> {
        self.health.clone()
    }

    /// Mirrors process health into the reported status (managed drivers).
    pub(crate) fn apply_health(&self, health: &DriverHealth) -> bool {
        if health.is_ready() {
            // A new process that is ready: an earlier unanswered probe was
            // about the old one.
            self.clear_unresponsive();
        }
        self.status.send_if_modified(|status| {
            let next = DriverStatus::from_health(health, status, now_millis());
            let changed = *status != next;
            *status = next;
            changed
        })
    }

    /// Records whether the watch stream is connected (drivers without
    /// process health). Returns whether availability changed.
    pub(crate) fn set_connected(&self, connected: bool, message: &str) -> bool {
        if connected {
            // The driver just answered a list: it is responsive.
            self.clear_unresponsive();
        }
        if self.health.is_some() {
            return false;
        }
        self.status.send_if_modified(|status| {
            let next = if connected {
                DriverStatus::ready(0, 0, 0)
            } else {
                DriverStatus {
                    state: DriverState::Unavailable,
                    message: message.to_owned(),
                    pid: 0,
                    restarts: 0,
                    since_ms: 0,
                }
            }
            .since(status, now_millis());
            let changed = status.state != next.state;
            *status = next;
            changed
        })
    }

    /// Takes the guard for shutdown (once).
    pub fn take_guard(&self) -> Option<DriverGuard> {
        self.guard
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    pub fn info(&self) -> gw::DriverInfo {
        let status = self.status();
        let caps = &self.capabilities;
        gw::DriverInfo {
            name: self.name.clone(),
            managed: self.managed,
            socket: self.socket.display().to_string(),
            capabilities: Some(gw::DriverCapabilities {
                driver_name: caps.driver_name.clone(),
                driver_version: caps.driver_version.clone(),
                default_image: caps.default_image.clone(),
                gateway_manages_lifecycle: caps.gateway_manages_lifecycle,
                logs: caps.logs,
                contract: caps.generation.label().to_owned(),
                implementation: caps
                    .negotiated
                    .as_ref()
                    .map(|n| {
                        format!(
                            "{} {} (protocol {}.{})",
                            n.implementation_name,
                            n.implementation_version,
                            n.version.0,
                            n.version.1
                        )
                    })
                    .unwrap_or_default(),
                extension_capabilities: caps
                    .negotiated
                    .as_ref()
                    .map(|n| n.capabilities.clone())
                    .unwrap_or_default(),
                admission_policy: caps.admission_policy.clone(),
                reports_runtime_readiness: caps.reports_runtime_readiness,
            }),
            state: status.state.into(),
            state_message: status.message,
            pid: status.pid,
            restarts: status.restarts,
            is_default: self.is_default,
        }
    }

    /// The condition shown on this driver's sandboxes while it is down.
    pub fn availability_condition(&self) -> Option<gw::Condition> {
        let status = self.status();
        let reason = match status.state {
            DriverState::Ready => return None,
            DriverState::Starting => "DriverStarting",
            DriverState::Restarting => "DriverRestarting",
            DriverState::Failed => "DriverFailed",
            DriverState::Unavailable | DriverState::Unspecified => "DriverUnavailable",
        };
        Some(gw::Condition {
            r#type: "DriverAvailable".to_owned(),
            status: "False".to_owned(),
            reason: reason.to_owned(),
            message: format!("driver '{}': {}", self.name, status.message),
            last_transition_time: rfc3339_millis(status.since_ms),
        })
    }
}

/// Checks a driver's admission acknowledgement at connect. A v0.0.111
/// driver has none. A 1.x driver's must parse; when the operator configured
/// an expectation (`allow_driver_config` in the driver's table) it must
/// match it as a structure; otherwise it is adopted.
fn admit(
    name: &str,
    capabilities: &Capabilities,
    expected: Option<&AdmissionPolicy>,
) -> Result<Option<AdmissionPolicy>> {
    if capabilities.generation != Generation::V1 {
        return Ok(None);
    }
    let acknowledged = &capabilities.admission_policy;
    if acknowledged.is_empty() {
        return match expected {
            Some(policy) if policy.resource_admission.enabled => Err(Error::AdmissionMismatch {
                driver: name.to_owned(),
                reason: "the driver acknowledges no admission policy but the gateway's enables resource admission",
                expected: policy.encode(),
                actual: String::new(),
            }),
            _ => Ok(None),
        };
    }
    let policy = AdmissionPolicy::decode(acknowledged).map_err(|e| Error::DriverIncompatible {
        driver: name.to_owned(),
        reason: format!("invalid admission acknowledgement: {e}"),
    })?;
    match expected {
        Some(wanted) if *wanted != policy => Err(Error::AdmissionMismatch {
            driver: name.to_owned(),
            reason: "the driver's admission policy differs from the gateway's configuration",
            expected: wanted.encode(),
            actual: acknowledged.clone(),
        }),
        _ => Ok(Some(policy)),
    }
}

/// A configured driver that could not be reached at startup: shown as
/// Unavailable until the background dial connects it.
#[derive(Debug, Clone)]
pub struct PendingDriver {
    pub name: String,
    pub socket: PathBuf,
    pub managed: bool,
    /// Why it is not connected.
    pub reason: String,
    /// Since when, in milliseconds since the Unix epoch.
    pub since_ms: i64,
}

/// One configured driver: connected (a runtime) or still pending.
#[derive(Debug)]
struct Slot {
    name: String,
    is_default: bool,
    runtime: RwLock<Option<Arc<DriverRuntime>>>,
    pending: Mutex<Option<PendingDriver>>,
}

impl Slot {
    fn runtime(&self) -> Option<Arc<DriverRuntime>> {
        self.runtime
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn pending(&self) -> Option<PendingDriver> {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// What a lookup of a driver by name found.
#[derive(Debug)]
pub enum Lookup {
    Ready(Arc<DriverRuntime>),
    /// Configured, but not connected since startup.
    Pending(PendingDriver),
    NotConfigured,
}

/// Every configured driver, in configuration order; the first is the
/// default for creates that name none. Drivers down at startup are kept as
/// pending slots until they connect.
#[derive(Debug)]
pub struct Registry {
    slots: Vec<Slot>,
    /// When this set of drivers was configured (milliseconds since the Unix
    /// epoch): the transition time of "driver not configured".
    configured_ms: i64,
}

impl Registry {
    pub fn new(runtimes: Vec<Arc<DriverRuntime>>) -> Self {
        Self::with_pending(runtimes.into_iter().map(Ok).collect())
    }

    /// Drivers in configuration order, each connected or pending; the first
    /// is the default.
    pub fn with_pending(
        drivers: Vec<std::result::Result<Arc<DriverRuntime>, PendingDriver>>,
    ) -> Self {
        let slots = drivers
            .into_iter()
            .enumerate()
            .map(|(index, driver)| match driver {
                Ok(runtime) => Slot {
                    name: runtime.name.clone(),
                    is_default: index == 0,
                    runtime: RwLock::new(Some(runtime)),
                    pending: Mutex::new(None),
                },
                Err(pending) => Slot {
                    name: pending.name.clone(),
                    is_default: index == 0,
                    runtime: RwLock::new(None),
                    pending: Mutex::new(Some(pending)),
                },
            })
            .collect();
        Self {
            slots,
            configured_ms: now_millis(),
        }
    }

    /// Installs a driver that connected after startup.
    pub fn connect(&self, runtime: Arc<DriverRuntime>) {
        if let Some(slot) = self.slots.iter().find(|s| s.name == runtime.name) {
            *slot.runtime.write().unwrap_or_else(PoisonError::into_inner) = Some(runtime);
            *slot.pending.lock().unwrap_or_else(PoisonError::into_inner) = None;
        }
    }

    /// Updates why a pending driver is not connected yet.
    pub fn set_pending_reason(&self, name: &str, reason: &str) {
        if let Some(slot) = self.slots.iter().find(|s| s.name == name)
            && let Some(pending) = slot
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_mut()
        {
            reason.clone_into(&mut pending.reason);
        }
    }

    /// Whether `name` is a configured driver, connected or not.
    pub fn is_configured(&self, name: &str) -> bool {
        self.slots.iter().any(|s| s.name == name)
    }

    /// The connected driver called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<DriverRuntime>> {
        self.slots
            .iter()
            .find(|s| s.name == name)
            .and_then(Slot::runtime)
    }

    pub fn lookup(&self, name: &str) -> Lookup {
        match self.slots.iter().find(|s| s.name == name) {
            None => Lookup::NotConfigured,
            Some(slot) => match (slot.runtime(), slot.pending()) {
                (Some(runtime), _) => Lookup::Ready(runtime),
                (None, Some(pending)) => Lookup::Pending(pending),
                (None, None) => Lookup::NotConfigured,
            },
        }
    }

    /// The default driver's name.
    pub fn default_name(&self) -> Option<&str> {
        self.slots.first().map(|s| s.name.as_str())
    }

    pub fn default_driver(&self) -> Option<Arc<DriverRuntime>> {
        self.slots.first().and_then(Slot::runtime)
    }

    /// The connected drivers.
    pub fn iter(&self) -> impl Iterator<Item = Arc<DriverRuntime>> {
        self.slots
            .iter()
            .filter_map(Slot::runtime)
            .collect::<Vec<_>>()
            .into_iter()
    }

    /// `a, b, c`, for messages.
    pub fn names(&self) -> String {
        self.slots
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Every configured driver as GetGatewayInfo shows it.
    pub fn infos(&self) -> Vec<gw::DriverInfo> {
        self.slots
            .iter()
            .map(|slot| match (slot.runtime(), slot.pending()) {
                (Some(runtime), _) => runtime.info(),
                (None, pending) => {
                    let pending = pending.unwrap_or_else(|| PendingDriver {
                        name: slot.name.clone(),
                        socket: PathBuf::new(),
                        managed: false,
                        reason: "not connected".to_owned(),
                        since_ms: self.configured_ms,
                    });
                    gw::DriverInfo {
                        name: slot.name.clone(),
                        managed: pending.managed,
                        socket: pending.socket.display().to_string(),
                        capabilities: None,
                        state: DriverState::Unavailable.into(),
                        state_message: pending.reason,
                        pid: 0,
                        restarts: 0,
                        is_default: slot.is_default,
                    }
                }
            })
            .collect()
    }

    /// The error a call for a driver that is configured but pending gets.
    pub fn pending_error(pending: &PendingDriver) -> Error {
        Error::DriverUnavailable {
            driver: pending.name.clone(),
            reason: format!(
                "not connected since the gateway started ({}); the gateway keeps dialling it",
                pending.reason
            ),
        }
    }

    /// The condition for a sandbox whose driver is `name`.
    pub fn condition_for(&self, name: &str) -> Option<gw::Condition> {
        match self.lookup(name) {
            Lookup::Ready(runtime) => runtime.availability_condition(),
            Lookup::Pending(pending) => Some(gw::Condition {
                r#type: "DriverAvailable".to_owned(),
                status: "False".to_owned(),
                reason: "DriverUnavailable".to_owned(),
                message: format!("driver '{}': {}", pending.name, pending.reason),
                last_transition_time: rfc3339_millis(pending.since_ms),
            }),
            Lookup::NotConfigured => Some(gw::Condition {
                r#type: "DriverAvailable".to_owned(),
                status: "False".to_owned(),
                reason: "DriverNotConfigured".to_owned(),
                message: format!(
                    "driver '{name}' is not configured in this gateway (configured: {})",
                    self.names()
                ),
                last_transition_time: rfc3339_millis(self.configured_ms),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_maps_to_status() {
        let previous = DriverStatus::ready(10, 2, 100);
        let s = DriverStatus::from_health(
            &DriverHealth::Ready {
                pid: 7,
                incarnation: 3,
            },
            &previous,
            200,
        );
        assert_eq!((s.state, s.pid, s.restarts), (DriverState::Ready, 7, 2));
        assert_eq!(s.since_ms, 100, "same state keeps its transition time");
        let s = DriverStatus::from_health(
            &DriverHealth::Restarting {
                attempt: 1,
                reason: "exited (signal 9)".into(),
            },
            &previous,
            200,
        );
        assert_eq!(s.state, DriverState::Restarting);
        assert_eq!(s.since_ms, 200, "a new state starts now");
        assert!(s.message.contains("exited (signal 9)"));
        assert_eq!(s.restarts, 2);
        let s = DriverStatus::from_health(
            &DriverHealth::Failed {
                reason: "gave up".into(),
            },
            &previous,
            200,
        );
        assert_eq!(
            (s.state, s.message.as_str()),
            (DriverState::Failed, "gave up")
        );
    }

    #[test]
    fn not_configured_condition_time_is_rfc3339() {
        let registry = Registry::new(Vec::new());
        let condition = registry.condition_for("gone").unwrap();
        assert_eq!(condition.reason, "DriverNotConfigured");
        assert!(
            openshell_wire::time::parse_rfc3339(&condition.last_transition_time).is_some(),
            "{:?}",
            condition.last_transition_time
        );
    }
}
