//! The gateway's state machine: public operations on sandboxes, driver
//! observations applied to stored rows, reconciliation, and the startup
//! and shutdown sweeps.
//!
//! Locking: user operations on one sandbox take that sandbox's gate (an
//! async mutex per id) and re-read the row under it; driver observations
//! never take gates. Every row change is one read-modify-write transaction
//! in the store, so observations and operations interleave safely. Driver
//! calls are made without any lock held by the store. Mutating operations
//! run in their own task, so a client that goes away cannot strand a
//! transition half done.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use futures::StreamExt as _;
use openshell_proto::compute::logs::v1::StreamLogsRequest;
use openshell_proto::compute::v1::watch_sandboxes_event::Payload;
use openshell_proto::compute::v1::{
    DriverSandbox, WatchSandboxesEvent, WatchSandboxesSandboxEvent,
};
use openshell_proto::gateway::v1::{self as gw, SandboxPhase};
use tokio::sync::{OwnedMutexGuard, broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

use crate::api::{translate, validate};
use crate::config::Timeouts;
use crate::drivers::registry::{DriverRuntime, Registry};
use crate::error::{Error, Result};
use crate::phases::{has_running_intent, intent_condition, next_phase, ready_false};
use crate::state::store::{Inserted, ListQuery, SandboxRow, Store, Updated, now_ms};

/// Default and largest page of ListSandboxes.
pub const DEFAULT_PAGE_SIZE: usize = 100;
pub const MAX_PAGE_SIZE: usize = 1000;
/// Parallel driver calls in the startup and shutdown sweeps.
pub const SWEEP_CONCURRENCY: usize = 16;

/// A change inside the gateway, fanned out to public watchers.
#[derive(Debug, Clone)]
pub enum BusEvent {
    Changed(Arc<SandboxRow>),
    Deleted {
        id: String,
        name: String,
        driver: String,
    },
    Platform {
        driver: String,
        event: gw::PlatformEvent,
    },
    /// A driver became available or unavailable; its sandboxes' conditions
    /// changed.
    DriverState {
        driver: String,
    },
}

/// Per-sandbox async mutexes, created on demand and dropped when unused.
#[derive(Debug, Default)]
struct Gates {
    map: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
}

impl Gates {
    async fn lock(&self, id: &str) -> OwnedMutexGuard<()> {
        let gate = {
            let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
            if map.len() > 1024 {
                map.retain(|_, weak| weak.strong_count() > 0);
            }
            match map.get(id).and_then(Weak::upgrade) {
                Some(gate) => gate,
                None => {
                    let gate = Arc::new(tokio::sync::Mutex::new(()));
                    map.insert(id.to_owned(), Arc::downgrade(&gate));
                    gate
                }
            }
        };
        gate.lock_owned().await
    }
}

/// Driver status codes that leave it unclear whether the call took effect.
fn ambiguous(error: &Error) -> bool {
    match error {
        Error::DriverCall { code, .. } => matches!(
            code,
            Code::Unknown
                | Code::Internal
                | Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Cancelled
                | Code::Aborted
                | Code::DataLoss
        ),
        Error::DriverUnavailable { .. } | Error::DriverTimeout { .. } => true,
        _ => false,
    }
}

fn is_not_found(error: &Error) -> bool {
    matches!(
        error,
        Error::DriverCall {
            code: Code::NotFound,
            ..
        }
    )
}

fn join_error(error: &tokio::task::JoinError) -> Error {
    Error::Internal(format!("the operation's task failed: {error}"))
}

/// Applies a driver snapshot to a row; returns whether anything changed.
/// Rows of other drivers, and rows being deleted or in Error, are left
/// alone.
pub fn apply_snapshot_to(row: &mut SandboxRow, driver: &str, sandbox: &DriverSandbox) -> bool {
    if row.driver != driver || matches!(row.phase, SandboxPhase::Deleting | SandboxPhase::Error) {
        return false;
    }
    let Some(status) = &sandbox.status else {
        return false;
    };
    let phase = next_phase(row.phase, Some(status));
    let mut changed = false;
    if row.observed.as_ref() != Some(status) {
        if !status.instance_id.is_empty() {
            row.instance_id.clone_from(&status.instance_id);
        }
        row.observed = Some(status.clone());
        changed = true;
    }
    if phase != row.phase {
        row.phase = phase;
        row.gateway_condition = intent_condition(phase, now_ms());
        changed = true;
    }
    changed
}

fn snapshot_event(sandbox: DriverSandbox) -> WatchSandboxesEvent {
    WatchSandboxesEvent {
        payload: Some(Payload::Sandbox(WatchSandboxesSandboxEvent {
            sandbox: Some(sandbox),
        })),
    }
}

fn page_token(name: &str) -> String {
    let mut token = String::from("v1.");
    for byte in name.bytes() {
        token.push_str(&format!("{byte:02x}"));
    }
    token
}

fn parse_page_token(token: &str) -> Result<String> {
    let bad = || {
        Error::InvalidArgument(format!(
            "page_token {token:?} is not one this gateway issued; pass next_page_token from a previous ListSandboxes response"
        ))
    };
    let hex = token.strip_prefix("v1.").ok_or_else(bad)?;
    if hex.len() % 2 != 0 {
        return Err(bad());
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(bad)?;
    String::from_utf8(bytes).map_err(|_| bad())
}

/// The gateway.
#[derive(Debug)]
pub struct Gateway {
    pub store: Store,
    pub registry: Registry,
    bus: broadcast::Sender<BusEvent>,
    gates: Gates,
    pub timeouts: Timeouts,
    /// The API address, for GetGatewayInfo.
    pub listen: String,
    /// Cancelled when the gateway starts shutting down: long-lived streams
    /// end and new mutations are refused.
    pub shutdown: CancellationToken,
}

impl Gateway {
    pub fn new(store: Store, registry: Registry, timeouts: Timeouts, listen: String) -> Self {
        let (bus, _) = broadcast::channel(4096);
        Self {
            store,
            registry,
            bus,
            gates: Gates::default(),
            timeouts,
            listen,
            shutdown: CancellationToken::new(),
        }
    }

    /// Runs a store operation on the blocking pool.
    pub async fn db<T, F>(&self, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T> + Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || op(&store))
            .await
            .map_err(|e| join_error(&e))?
    }

    pub fn subscribe(&self) -> broadcast::Receiver<BusEvent> {
        self.bus.subscribe()
    }

    pub(crate) fn publish(&self, event: BusEvent) {
        // No subscribers is fine.
        let _ = self.bus.send(event);
    }

    fn publish_row(&self, row: SandboxRow) {
        self.publish(BusEvent::Changed(Arc::new(row)));
    }

    /// The public view of a row, with the driver's availability condition.
    pub fn view(&self, row: &SandboxRow) -> gw::Sandbox {
        translate::public_sandbox(row, self.registry.condition_for(&row.driver))
    }

    fn ensure_running(&self) -> Result<()> {
        if self.shutdown.is_cancelled() {
            Err(Error::ShuttingDown)
        } else {
            Ok(())
        }
    }

    fn runtime_for(&self, row: &SandboxRow) -> Result<Arc<DriverRuntime>> {
        self.registry.get(&row.driver).cloned().ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "sandbox '{}' belongs to driver '{}', which is not configured in this gateway \
                 (configured: {}); configure that driver again to manage the sandbox",
                row.name,
                row.driver,
                self.registry.names()
            ))
        })
    }

    /// Replaces a transport failure with the driver's known state, and wakes
    /// the watch task when a call got through to a driver marked down.
    fn driver_result<T>(&self, runtime: &DriverRuntime, result: Result<T>) -> Result<T> {
        match result {
            Ok(value) => {
                if !runtime.is_available() {
                    runtime.wake.notify_one();
                }
                Ok(value)
            }
            Err(Error::DriverUnavailable { .. }) if !runtime.is_available() => {
                Err(runtime.unavailable())
            }
            Err(error) => Err(error),
        }
    }

    async fn update(
        &self,
        id: &str,
        change: impl FnOnce(&mut SandboxRow) -> bool + Send + 'static,
    ) -> Result<Updated> {
        let id = id.to_owned();
        let updated = self.db(move |s| s.update(&id, change)).await?;
        if let Updated::Changed(row) = &updated {
            self.publish_row(row.clone());
        }
        Ok(updated)
    }

    async fn remove_row(&self, id: &str) -> Result<Option<SandboxRow>> {
        let key = id.to_owned();
        let removed = self.db(move |s| s.remove(&key)).await?;
        if let Some(row) = &removed {
            self.publish(BusEvent::Deleted {
                id: row.id.clone(),
                name: row.name.clone(),
                driver: row.driver.clone(),
            });
            tracing::info!(sandbox = %row.name, id = %row.id, driver = %row.driver, "sandbox deleted");
        }
        Ok(removed)
    }

    /// The stored row of sandbox `id`, if it still exists.
    async fn row(&self, id: &str) -> Result<Option<SandboxRow>> {
        let key = id.to_owned();
        self.db(move |s| s.get(&key)).await
    }

    async fn latest(&self, id: &str, fallback: SandboxRow) -> Result<SandboxRow> {
        Ok(self.row(id).await?.unwrap_or(fallback))
    }

    /// Marks a row Error with a gateway condition.
    async fn mark_error(&self, id: &str, reason: &'static str, message: String) -> Result<()> {
        self.update(id, move |row| {
            if row.phase == SandboxPhase::Error {
                return false;
            }
            row.phase = SandboxPhase::Error;
            row.gateway_condition = Some(ready_false(reason, &message, now_ms()));
            true
        })
        .await
        .map(drop)
    }

    // ---- public operations -------------------------------------------------

    /// Looks a sandbox up by name, else by id.
    pub async fn resolve(&self, reference: Option<gw::SandboxRef>) -> Result<SandboxRow> {
        let reference = reference.unwrap_or_default();
        if !reference.name.is_empty() {
            validate::sandbox_name(&reference.name).map_err(Error::InvalidArgument)?;
            let name = reference.name.clone();
            let row = self
                .db(move |s| s.get_by_name(&name))
                .await?
                .ok_or_else(|| {
                    Error::NotFound(format!("sandbox '{}' not found", reference.name))
                })?;
            if !reference.id.is_empty() && reference.id != row.id {
                return Err(Error::NotFound(format!(
                    "sandbox '{}' has id {}, not {}",
                    row.name, row.id, reference.id
                )));
            }
            return Ok(row);
        }
        if !reference.id.is_empty() {
            let id = reference.id.clone();
            return self
                .db(move |s| s.get(&id))
                .await?
                .ok_or_else(|| Error::NotFound(format!("no sandbox has id {}", reference.id)));
        }
        Err(Error::InvalidArgument(
            "say which sandbox: set sandbox.name (or sandbox.id)".to_owned(),
        ))
    }

    pub async fn create(
        self: &Arc<Self>,
        request: gw::CreateSandboxRequest,
    ) -> Result<gw::Sandbox> {
        self.ensure_running()?;
        validate::sandbox_name(&request.name).map_err(Error::InvalidArgument)?;
        let mut spec = request.spec.unwrap_or_default();
        validate::command(&spec.command).map_err(Error::InvalidArgument)?;
        validate::env(&spec.env).map_err(Error::InvalidArgument)?;
        validate::image(&spec.image).map_err(Error::InvalidArgument)?;
        validate::resources(spec.resources.as_ref()).map_err(Error::InvalidArgument)?;
        validate::labels(&request.labels).map_err(Error::InvalidArgument)?;
        let runtime = if request.driver.is_empty() {
            self.registry.default_driver()
        } else {
            self.registry.get(&request.driver.to_ascii_lowercase())
        }
        .cloned()
        .ok_or_else(|| {
            Error::NotFound(format!(
                "driver '{}' is not configured; configured drivers: {}",
                request.driver,
                self.registry.names()
            ))
        })?;
        if !runtime.is_available() {
            return Err(runtime.unavailable());
        }
        let name = request.name.clone();
        if let Some(existing) = self.db(move |s| s.get_by_name(&name)).await? {
            return Err(Error::AlreadyExists(format!(
                "sandbox '{}' already exists (id {}, driver '{}')",
                existing.name, existing.id, existing.driver
            )));
        }
        if spec.image.is_empty() {
            spec.image.clone_from(&runtime.capabilities.default_image);
        }
        let now = now_ms();
        let row = SandboxRow {
            id: uuid::Uuid::new_v4().to_string(),
            name: request.name,
            driver: runtime.name.clone(),
            spec,
            labels: request.labels.into_iter().collect(),
            phase: SandboxPhase::Provisioning,
            observed: None,
            gateway_condition: None,
            instance_id: String::new(),
            resource_version: 1,
            created_at_ms: now,
            updated_at_ms: now,
        };
        let gateway = Arc::clone(self);
        tokio::spawn(async move { gateway.create_owned(runtime, row).await })
            .await
            .map_err(|e| join_error(&e))?
    }

    async fn create_owned(
        &self,
        runtime: Arc<DriverRuntime>,
        row: SandboxRow,
    ) -> Result<gw::Sandbox> {
        // Held until the driver has answered, so a delete of the new row waits
        // for the create instead of racing it.
        let _gate = self.gates.lock(&row.id).await;
        let sandbox = translate::driver_sandbox(&row);
        let validated = runtime.driver.validate(sandbox.clone()).await;
        self.driver_result(&runtime, validated)?;
        let stored = row.clone();
        match self.db(move |s| s.insert(&stored)).await? {
            Inserted::Ok => {}
            Inserted::NameTaken(id) => {
                return Err(Error::AlreadyExists(format!(
                    "sandbox '{}' already exists (id {id})",
                    row.name
                )));
            }
        }
        self.publish_row(row.clone());
        let created = runtime.driver.create(sandbox).await;
        match self.driver_result(&runtime, created) {
            Ok(()) => {
                tracing::info!(sandbox = %row.name, id = %row.id, driver = %runtime.name, "sandbox created");
                let latest = self.latest(&row.id, row.clone()).await?;
                Ok(self.view(&latest))
            }
            Err(error) => {
                self.create_failed(&runtime, &row, &error).await;
                Err(error)
            }
        }
    }

    /// Cleans up after a failed driver create: the row goes unless the
    /// driver may hold resources that could not be removed, in which case
    /// it stays in Error so the user can see and delete it.
    async fn create_failed(&self, runtime: &DriverRuntime, row: &SandboxRow, error: &Error) {
        let cleaned = if ambiguous(error) {
            match runtime.driver.delete(&row.id, &row.name).await {
                Ok(_) => true,
                Err(cleanup) if is_not_found(&cleanup) => true,
                Err(cleanup) => {
                    tracing::warn!(sandbox = %row.name, driver = %runtime.name, error = %cleanup, "could not clean up after a failed create; keeping the sandbox in Error");
                    false
                }
            }
        } else {
            true
        };
        let outcome = if cleaned {
            self.remove_row(&row.id).await.map(drop)
        } else {
            self.mark_error(
                &row.id,
                "CreateFailed",
                format!(
                    "create failed ({error}); the driver may still hold resources: delete the sandbox to clean up"
                ),
            )
            .await
        };
        if let Err(store) = outcome {
            tracing::warn!(sandbox = %row.name, error = %store, "could not record a failed create");
        }
    }

    pub async fn get(&self, reference: Option<gw::SandboxRef>) -> Result<gw::Sandbox> {
        let row = self.resolve(reference).await?;
        Ok(self.view(&row))
    }

    pub async fn list(
        &self,
        request: gw::ListSandboxesRequest,
    ) -> Result<gw::ListSandboxesResponse> {
        let limit = match usize::try_from(request.page_size).unwrap_or(MAX_PAGE_SIZE) {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let phase = match request.phase {
            0 => None,
            value => Some(SandboxPhase::try_from(value).map_err(|_| {
                Error::InvalidArgument(format!("phase {value} is not a SandboxPhase"))
            })?),
        };
        let driver = (!request.driver.is_empty()).then(|| request.driver.to_ascii_lowercase());
        if let Some(name) = &driver
            && self.registry.get(name).is_none()
        {
            let counts = self.db(|s| s.driver_counts()).await?;
            if !counts.iter().any(|(d, _)| d == name) {
                return Err(Error::NotFound(format!(
                    "driver '{name}' is not configured and has no sandboxes; configured drivers: {}",
                    self.registry.names()
                )));
            }
        }
        let after_name = if request.page_token.is_empty() {
            None
        } else {
            Some(parse_page_token(&request.page_token)?)
        };
        let mut labels: Vec<(String, String)> = request.labels.into_iter().collect();
        labels.sort();
        let query = ListQuery {
            driver,
            phase,
            labels,
            after_name,
            limit,
        };
        let (rows, more) = self.db(move |s| s.list(&query)).await?;
        let next_page_token = match rows.last() {
            Some(last) if more => page_token(&last.name),
            _ => String::new(),
        };
        Ok(gw::ListSandboxesResponse {
            sandboxes: rows.iter().map(|r| self.view(r)).collect(),
            next_page_token,
        })
    }

    /// Resolves `reference` and runs `op` for it in a task of its own, so a
    /// client that goes away cannot strand the sandbox half way through a
    /// transition.
    async fn in_own_task<T, F, Fut>(
        self: &Arc<Self>,
        reference: Option<gw::SandboxRef>,
        op: F,
    ) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Self>, Arc<DriverRuntime>, String) -> Fut,
        Fut: Future<Output = Result<T>> + Send + 'static,
    {
        self.ensure_running()?;
        let row = self.resolve(reference).await?;
        let runtime = self.runtime_for(&row)?;
        tokio::spawn(op(Arc::clone(self), runtime, row.id))
            .await
            .map_err(|e| join_error(&e))?
    }

    pub async fn stop(self: &Arc<Self>, reference: Option<gw::SandboxRef>) -> Result<gw::Sandbox> {
        self.in_own_task(reference, |gateway, runtime, id| async move {
            gateway.stop_owned(runtime, id).await
        })
        .await
    }

    async fn stop_owned(&self, runtime: Arc<DriverRuntime>, id: String) -> Result<gw::Sandbox> {
        let _gate = self.gates.lock(&id).await;
        let row = self
            .row(&id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("sandbox {id} was deleted meanwhile")))?;
        match row.phase {
            SandboxPhase::Stopped => return Ok(self.view(&row)),
            SandboxPhase::Deleting => {
                return Err(Error::FailedPrecondition(format!(
                    "sandbox '{}' is being deleted",
                    row.name
                )));
            }
            _ => {}
        }
        let previous = row.phase;
        self.set_transition(&id, SandboxPhase::Stopping).await?;
        let stopped = runtime.driver.stop(&row.id, &row.name).await;
        match self.driver_result(&runtime, stopped) {
            Ok(()) => {
                self.update(&id, |r| {
                    if r.phase != SandboxPhase::Stopping {
                        return false;
                    }
                    r.phase = SandboxPhase::Stopped;
                    r.gateway_condition = intent_condition(SandboxPhase::Stopped, now_ms());
                    true
                })
                .await?;
                tracing::info!(sandbox = %row.name, id = %row.id, driver = %runtime.name, "sandbox stopped");
                let latest = self.latest(&id, row).await?;
                Ok(self.view(&latest))
            }
            Err(error) => {
                self.recover(&runtime, &row, SandboxPhase::Stopping, previous, &error)
                    .await;
                Err(error)
            }
        }
    }

    pub async fn start(self: &Arc<Self>, reference: Option<gw::SandboxRef>) -> Result<gw::Sandbox> {
        self.in_own_task(reference, |gateway, runtime, id| async move {
            gateway.start_owned(runtime, id).await
        })
        .await
    }

    async fn start_owned(&self, runtime: Arc<DriverRuntime>, id: String) -> Result<gw::Sandbox> {
        let _gate = self.gates.lock(&id).await;
        let row = self
            .row(&id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("sandbox {id} was deleted meanwhile")))?;
        match row.phase {
            SandboxPhase::Ready | SandboxPhase::Provisioning => return Ok(self.view(&row)),
            SandboxPhase::Deleting => {
                return Err(Error::FailedPrecondition(format!(
                    "sandbox '{}' is being deleted",
                    row.name
                )));
            }
            SandboxPhase::Stopping => {
                return Err(Error::FailedPrecondition(format!(
                    "sandbox '{}' is still stopping; start it once it is stopped",
                    row.name
                )));
            }
            _ => {}
        }
        let previous = row.phase;
        self.set_transition(&id, SandboxPhase::Starting).await?;
        let started = runtime.driver.start(&row.id, &row.name).await;
        match self.driver_result(&runtime, started) {
            Ok(()) => {
                if let Ok(Some(snapshot)) = runtime.driver.get(&row.id, &row.name).await {
                    self.apply_snapshot(&runtime.name, snapshot).await?;
                }
                tracing::info!(sandbox = %row.name, id = %row.id, driver = %runtime.name, "sandbox started");
                let latest = self.latest(&id, row).await?;
                Ok(self.view(&latest))
            }
            Err(error) => {
                self.recover(&runtime, &row, SandboxPhase::Starting, previous, &error)
                    .await;
                Err(error)
            }
        }
    }

    /// Persists a transition phase (the intent) before the driver is asked.
    async fn set_transition(&self, id: &str, phase: SandboxPhase) -> Result<()> {
        match self
            .update(id, move |row| {
                if row.phase == phase {
                    return false;
                }
                row.phase = phase;
                row.gateway_condition = intent_condition(phase, now_ms());
                true
            })
            .await?
        {
            Updated::Missing => Err(Error::NotFound(format!(
                "sandbox {id} was deleted meanwhile"
            ))),
            _ => Ok(()),
        }
    }

    /// After a failed stop or start: a sandbox the driver does not have is
    /// an Error; an unclear failure is settled with GetSandbox when the
    /// driver answers it; otherwise the row goes back to how it was.
    async fn recover(
        &self,
        runtime: &DriverRuntime,
        row: &SandboxRow,
        transition: SandboxPhase,
        previous: SandboxPhase,
        error: &Error,
    ) {
        let missing = || {
            format!(
                "driver '{}' has no sandbox with id {}",
                runtime.name, row.id
            )
        };
        let outcome = if is_not_found(error) {
            self.mark_error(&row.id, "ComputeResourceMissing", missing())
                .await
        } else if ambiguous(error) {
            match runtime.driver.get(&row.id, &row.name).await {
                Ok(Some(snapshot)) => {
                    let driver = runtime.name.clone();
                    self.update(&row.id, move |r| {
                        if r.phase != transition {
                            return false;
                        }
                        let mut probe = r.clone();
                        apply_snapshot_to(&mut probe, &driver, &snapshot);
                        if probe.phase == transition {
                            // Nothing confirms the transition: undo it.
                            probe.phase = previous;
                            probe.gateway_condition = intent_condition(previous, now_ms());
                            apply_snapshot_to(&mut probe, &driver, &snapshot);
                        }
                        *r = probe;
                        true
                    })
                    .await
                    .map(drop)
                }
                Ok(None) => {
                    self.mark_error(&row.id, "ComputeResourceMissing", missing())
                        .await
                }
                Err(check) => {
                    // The driver cannot be asked: report the call as failed
                    // and leave the sandbox as it was. If the call did take
                    // effect, the driver's next snapshot says so.
                    tracing::debug!(sandbox = %row.name, driver = %runtime.name, error = %check, "could not check the sandbox after a failed call");
                    self.undo(&row.id, transition, previous).await
                }
            }
        } else {
            self.undo(&row.id, transition, previous).await
        };
        if let Err(store) = outcome {
            tracing::warn!(sandbox = %row.name, error = %store, "could not record the outcome of a failed call");
        }
    }

    /// Puts a row back from `transition` to `previous`.
    async fn undo(&self, id: &str, transition: SandboxPhase, previous: SandboxPhase) -> Result<()> {
        self.update(id, move |r| {
            if r.phase != transition {
                return false;
            }
            r.phase = previous;
            r.gateway_condition = intent_condition(previous, now_ms());
            true
        })
        .await
        .map(drop)
    }

    pub async fn delete(self: &Arc<Self>, reference: Option<gw::SandboxRef>) -> Result<bool> {
        self.in_own_task(reference, |gateway, runtime, id| async move {
            gateway.delete_owned(runtime, id).await
        })
        .await
    }

    async fn delete_owned(&self, runtime: Arc<DriverRuntime>, id: String) -> Result<bool> {
        let _gate = self.gates.lock(&id).await;
        let Some(row) = self.row(&id).await? else {
            // Removed while we waited for the gate.
            return Ok(true);
        };
        let previous = row.phase;
        self.set_transition(&id, SandboxPhase::Deleting).await?;
        let deleted = runtime.driver.delete(&row.id, &row.name).await;
        match self.driver_result(&runtime, deleted) {
            Ok(false) => {
                self.remove_row(&id).await?;
            }
            Ok(true) => {
                // Usually gone already; otherwise the watch stream's
                // `deleted` event (or the next reconcile) removes the row.
                if let Ok(None) = runtime.driver.get(&row.id, &row.name).await {
                    self.remove_row(&id).await?;
                }
            }
            Err(error) if is_not_found(&error) => {
                self.remove_row(&id).await?;
            }
            Err(error) => {
                let gone = ambiguous(&error)
                    && matches!(runtime.driver.get(&row.id, &row.name).await, Ok(None));
                if gone {
                    self.remove_row(&id).await?;
                    return Ok(true);
                }
                self.undo(&id, SandboxPhase::Deleting, previous).await?;
                return Err(error);
            }
        }
        Ok(true)
    }

    pub fn info(&self) -> gw::GatewayInfo {
        gw::GatewayInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            drivers: self.registry.iter().map(|r| r.info()).collect(),
            listen: self.listen.clone(),
        }
    }

    /// Streams a sandbox's logs from its driver.
    pub async fn logs(
        &self,
        request: gw::SandboxLogsRequest,
    ) -> Result<
        impl futures::Stream<Item = std::result::Result<gw::LogChunk, Status>> + Send + 'static,
    > {
        self.ensure_running()?;
        let row = self.resolve(request.sandbox).await?;
        let runtime = self.runtime_for(&row)?;
        let no_logs = || {
            Error::FailedPrecondition(format!(
                "driver '{}' keeps no logs for its sandboxes (it does not serve the log service)",
                runtime.name
            ))
        };
        if !runtime.capabilities.logs {
            return Err(no_logs());
        }
        let opened = runtime
            .driver
            .stream_logs(StreamLogsRequest {
                sandbox_id: row.id.clone(),
                sandbox_name: row.name.clone(),
                follow: request.follow,
                tail_lines: request.tail_lines,
            })
            .await;
        let stream = self.driver_result(&runtime, opened)?.ok_or_else(no_logs)?;
        let driver = runtime.driver.clone();
        let stop = self.shutdown.clone().cancelled_owned();
        Ok(stream
            .map(move |item| match item {
                Ok(chunk) => Ok(translate::log_chunk(chunk)),
                Err(status) => Err(Status::from(driver.status_error("StreamLogs", &status))),
            })
            .take_until(stop))
    }

    /// Every row matching a watch's filters, in pages.
    async fn matching_rows(
        &self,
        driver: Option<String>,
        name: Option<String>,
    ) -> Result<Vec<SandboxRow>> {
        if let Some(name) = name {
            let row = self.db(move |s| s.get_by_name(&name)).await?;
            return Ok(row
                .into_iter()
                .filter(|r| driver.as_ref().is_none_or(|d| *d == r.driver))
                .collect());
        }
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let query = ListQuery {
                driver: driver.clone(),
                after_name: after.take(),
                limit: MAX_PAGE_SIZE,
                ..ListQuery::default()
            };
            let (rows, more) = self.db(move |s| s.list(&query)).await?;
            after = rows.last().map(|r| r.name.clone());
            all.extend(rows);
            if !more {
                return Ok(all);
            }
        }
    }

    /// Starts a public watch: the matching sandboxes, `synced`, then changes.
    pub fn watch(
        self: &Arc<Self>,
        request: gw::WatchSandboxesRequest,
    ) -> Result<mpsc::Receiver<std::result::Result<gw::WatchSandboxesEvent, Status>>> {
        self.ensure_running()?;
        if !request.name.is_empty() {
            validate::sandbox_name(&request.name).map_err(Error::InvalidArgument)?;
        }
        let driver = (!request.driver.is_empty()).then(|| request.driver.to_ascii_lowercase());
        let name = (!request.name.is_empty()).then_some(request.name);
        let (tx, rx) = mpsc::channel(256);
        // Subscribe before reading the initial rows so nothing falls between.
        let bus = self.subscribe();
        let gateway = Arc::clone(self);
        tokio::spawn(async move {
            let watch = PublicWatch {
                gateway: &gateway,
                tx,
                driver,
                name,
                sent: HashMap::new(),
            };
            watch.run(bus).await;
        });
        Ok(rx)
    }

    // ---- driver observations -------------------------------------------------

    /// Applies one driver snapshot to its row.
    pub async fn apply_snapshot(&self, driver: &str, sandbox: DriverSandbox) -> Result<()> {
        self.apply_events(driver, vec![snapshot_event(sandbox)])
            .await
    }

    /// Applies a batch of a driver's watch events in one transaction, then
    /// tells public watchers what changed, in order.
    pub async fn apply_events(&self, driver: &str, events: Vec<WatchSandboxesEvent>) -> Result<()> {
        let name = driver.to_owned();
        let outcomes = self
            .db(move |s| {
                s.write(|tx| {
                    let mut out = Vec::new();
                    for event in events {
                        match event.payload {
                            Some(Payload::Sandbox(update)) => {
                                let Some(sandbox) = update.sandbox else {
                                    continue;
                                };
                                let id = sandbox.id.clone();
                                if let Updated::Changed(row) =
                                    tx.update(&id, |row| apply_snapshot_to(row, &name, &sandbox))?
                                {
                                    out.push(BusEvent::Changed(Arc::new(row)));
                                }
                            }
                            Some(Payload::Deleted(deleted)) => {
                                let ours = tx
                                    .get(&deleted.sandbox_id)?
                                    .is_some_and(|row| row.driver == name);
                                if ours && let Some(row) = tx.remove(&deleted.sandbox_id)? {
                                    out.push(BusEvent::Deleted {
                                        id: row.id,
                                        name: row.name,
                                        driver: row.driver,
                                    });
                                }
                            }
                            Some(Payload::PlatformEvent(platform)) => {
                                let Some(event) = platform.event else {
                                    continue;
                                };
                                if let Some(row) =
                                    tx.get(&platform.sandbox_id)?.filter(|r| r.driver == name)
                                {
                                    out.push(BusEvent::Platform {
                                        driver: name.clone(),
                                        event: translate::platform_event(&row.id, &row.name, event),
                                    });
                                }
                            }
                            None => {}
                        }
                    }
                    Ok(out)
                })
            })
            .await?;
        for outcome in outcomes {
            match &outcome {
                BusEvent::Deleted { id, name, driver } => {
                    tracing::info!(sandbox = %name, id = %id, driver = %driver, "sandbox deleted");
                }
                BusEvent::Changed(row) => {
                    tracing::debug!(sandbox = %row.name, phase = ?row.phase, "applied driver snapshot");
                }
                _ => {}
            }
            self.publish(outcome);
        }
        Ok(())
    }

    /// Brings a driver's rows in line with its list: present sandboxes get
    /// their snapshot; absent ones, once unchanged for the orphan grace and
    /// confirmed absent with GetSandbox, are removed if they were being
    /// deleted and marked Error (ComputeResourceMissing) otherwise.
    pub async fn reconcile(
        &self,
        runtime: &DriverRuntime,
        listed: Vec<DriverSandbox>,
    ) -> Result<()> {
        let name = runtime.name.clone();
        let rows = self.db(move |s| s.rows_of_driver(&name)).await?;
        let mut listed: HashMap<String, DriverSandbox> =
            listed.into_iter().map(|s| (s.id.clone(), s)).collect();
        let grace = i64::try_from(self.timeouts.orphan_grace.as_millis()).unwrap_or(i64::MAX);
        let mut changed = Vec::new();
        let mut absent = Vec::new();
        for row in rows {
            match listed.remove(&row.id) {
                Some(snapshot) => {
                    // Most rows are current; only write the ones that change.
                    let mut probe = row.clone();
                    if apply_snapshot_to(&mut probe, &runtime.name, &snapshot) {
                        changed.push(snapshot_event(snapshot));
                    }
                }
                None => absent.push(row),
            }
        }
        self.apply_events(&runtime.name, changed).await?;
        for row in absent {
            if row.phase == SandboxPhase::Error
                || now_ms().saturating_sub(row.updated_at_ms) < grace
            {
                continue;
            }
            match runtime.driver.get(&row.id, &row.name).await {
                Ok(Some(snapshot)) => self.apply_snapshot(&runtime.name, snapshot).await?,
                Ok(None) => self.missing(runtime, &row).await?,
                Err(error) => {
                    tracing::warn!(driver = %runtime.name, error = %error, "reconcile stopped: the driver did not answer GetSandbox");
                    return Err(error);
                }
            }
        }
        Ok(())
    }

    async fn missing(&self, runtime: &DriverRuntime, seen: &SandboxRow) -> Result<()> {
        let version = seen.resource_version;
        if seen.phase == SandboxPhase::Deleting {
            let id = seen.id.clone();
            let still = self.db(move |s| s.get(&id)).await?;
            if still.is_some_and(|r| r.resource_version == version) {
                self.remove_row(&seen.id).await?;
            }
            return Ok(());
        }
        let message = format!(
            "driver '{}' no longer has this sandbox; delete it, or create it again",
            runtime.name
        );
        let updated = self
            .update(&seen.id, move |row| {
                if row.resource_version != version {
                    return false;
                }
                row.phase = SandboxPhase::Error;
                row.gateway_condition =
                    Some(ready_false("ComputeResourceMissing", &message, now_ms()));
                true
            })
            .await?;
        if let Updated::Changed(row) = updated {
            tracing::warn!(sandbox = %row.name, driver = %runtime.name, "sandbox is missing from its driver; marked Error");
        }
        Ok(())
    }

    // ---- sweeps ---------------------------------------------------------------

    /// Startup recovery for one driver: finish interrupted stops and
    /// deletes, re-drive interrupted starts, and, for drivers whose
    /// lifecycle the gateway manages, start every sandbox with running
    /// intent. Failures are logged and recorded on the rows.
    pub async fn startup_sweep(&self, runtime: &Arc<DriverRuntime>) -> Result<()> {
        let name = runtime.name.clone();
        let rows = self.db(move |s| s.rows_of_driver(&name)).await?;
        let manages = runtime.capabilities.gateway_manages_lifecycle;
        let work: Vec<SandboxRow> = rows
            .into_iter()
            .filter(|r| {
                matches!(
                    r.phase,
                    SandboxPhase::Stopping | SandboxPhase::Deleting | SandboxPhase::Starting
                ) || (manages && has_running_intent(r.phase))
            })
            .collect();
        if work.is_empty() {
            return Ok(());
        }
        tracing::info!(driver = %runtime.name, sandboxes = work.len(), gateway_manages_lifecycle = manages, "resuming sandboxes");
        futures::stream::iter(work)
            .for_each_concurrent(SWEEP_CONCURRENCY, |row| async move {
                if let Err(error) = self.resume(runtime, &row).await {
                    tracing::warn!(sandbox = %row.name, driver = %runtime.name, error = %error, "could not resume sandbox");
                }
            })
            .await;
        Ok(())
    }

    async fn resume(&self, runtime: &DriverRuntime, row: &SandboxRow) -> Result<()> {
        let driver = &runtime.driver;
        match row.phase {
            SandboxPhase::Stopping => {
                driver.stop(&row.id, &row.name).await?;
                self.update(&row.id, |r| {
                    if r.phase != SandboxPhase::Stopping {
                        return false;
                    }
                    r.phase = SandboxPhase::Stopped;
                    r.gateway_condition = intent_condition(SandboxPhase::Stopped, now_ms());
                    true
                })
                .await?;
            }
            SandboxPhase::Deleting => match driver.delete(&row.id, &row.name).await {
                Ok(false) => drop(self.remove_row(&row.id).await?),
                Ok(true) => {}
                Err(error) if is_not_found(&error) => drop(self.remove_row(&row.id).await?),
                Err(error) => return Err(error),
            },
            _ => match driver.start(&row.id, &row.name).await {
                Ok(()) => {}
                Err(error) if is_not_found(&error) => {
                    self.mark_error(
                        &row.id,
                        "BackendResourceMissing",
                        format!(
                            "driver '{}' lost the sandbox while the gateway was offline",
                            runtime.name
                        ),
                    )
                    .await?;
                }
                Err(error) => {
                    if runtime.capabilities.gateway_manages_lifecycle {
                        self.mark_error(
                            &row.id,
                            "StartFailed",
                            format!("start after gateway restart failed: {error}"),
                        )
                        .await?;
                    }
                    return Err(error);
                }
            },
        }
        Ok(())
    }

    /// Shutdown: stops every running-intent sandbox of drivers whose
    /// lifecycle the gateway manages, without changing what is stored (so
    /// they start again with the gateway). Returns the failures.
    pub async fn shutdown_sweep(&self) -> Vec<String> {
        let failures = Mutex::new(Vec::new());
        for runtime in self.registry.iter() {
            if !runtime.capabilities.gateway_manages_lifecycle {
                continue;
            }
            let name = runtime.name.clone();
            let rows = match self.db(move |s| s.rows_of_driver(&name)).await {
                Ok(rows) => rows,
                Err(error) => {
                    failures
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(format!("driver '{}': {error}", runtime.name));
                    continue;
                }
            };
            let running: Vec<SandboxRow> = rows
                .into_iter()
                .filter(|r| has_running_intent(r.phase))
                .collect();
            if running.is_empty() {
                continue;
            }
            tracing::info!(driver = %runtime.name, sandboxes = running.len(), "stopping sandboxes for shutdown");
            futures::stream::iter(running)
                .for_each_concurrent(SWEEP_CONCURRENCY, |row| {
                    let failures = &failures;
                    async move {
                        if let Err(error) = runtime.driver.stop(&row.id, &row.name).await {
                            failures
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .push(format!("sandbox '{}': {error}", row.name));
                        }
                    }
                })
                .await;
        }
        failures
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Warns about stored sandboxes whose driver is not configured.
    pub async fn report_orphaned_drivers(&self) -> Result<()> {
        for (driver, count) in self.db(|s| s.driver_counts()).await? {
            if self.registry.get(&driver).is_none() {
                tracing::warn!(driver = %driver, sandboxes = count, "stored sandboxes belong to a driver that is not configured; they are listed but cannot be changed until it is configured again");
            }
        }
        Ok(())
    }
}

/// One public WatchSandboxes stream.
struct PublicWatch<'a> {
    gateway: &'a Arc<Gateway>,
    tx: mpsc::Sender<std::result::Result<gw::WatchSandboxesEvent, Status>>,
    driver: Option<String>,
    name: Option<String>,
    /// Resource version and name last sent, per sandbox id.
    sent: HashMap<String, (u64, String)>,
}

fn event(payload: gw::watch_sandboxes_event::Payload) -> gw::WatchSandboxesEvent {
    gw::WatchSandboxesEvent {
        payload: Some(payload),
    }
}

impl PublicWatch<'_> {
    fn wants(&self, driver: &str, name: &str) -> bool {
        self.driver.as_deref().is_none_or(|d| d == driver)
            && self.name.as_deref().is_none_or(|n| n == name)
    }

    async fn send(&self, payload: gw::watch_sandboxes_event::Payload) -> bool {
        self.tx.send(Ok(event(payload))).await.is_ok()
    }

    async fn send_row(&mut self, row: &SandboxRow) -> bool {
        if self
            .sent
            .get(&row.id)
            .is_some_and(|(version, _)| *version > row.resource_version)
        {
            return true;
        }
        self.sent
            .insert(row.id.clone(), (row.resource_version, row.name.clone()));
        let sandbox = self.gateway.view(row);
        self.send(gw::watch_sandboxes_event::Payload::Sandbox(sandbox))
            .await
    }

    /// Sends the current matching rows, and `deleted` for rows sent before
    /// that are gone. Returns false when the client left.
    async fn resync(&mut self, driver: Option<String>) -> bool {
        let filter = driver.or_else(|| self.driver.clone());
        let rows = match self
            .gateway
            .matching_rows(filter.clone(), self.name.clone())
            .await
        {
            Ok(rows) => rows,
            Err(error) => {
                let _ = self.tx.send(Err(Status::from(error))).await;
                return false;
            }
        };
        let present: HashSet<String> = rows.iter().map(|r| r.id.clone()).collect();
        for row in &rows {
            // A resync re-sends even unchanged rows (their conditions may
            // have changed with their driver's availability).
            self.sent.remove(&row.id);
            if !self.send_row(row).await {
                return false;
            }
        }
        if filter == self.driver {
            let gone: Vec<(String, String)> = self
                .sent
                .iter()
                .filter(|(id, _)| !present.contains(*id))
                .map(|(id, (_, name))| (id.clone(), name.clone()))
                .collect();
            for (id, name) in gone {
                self.sent.remove(&id);
                let deleted = gw::SandboxDeleted { id, name };
                if !self
                    .send(gw::watch_sandboxes_event::Payload::Deleted(deleted))
                    .await
                {
                    return false;
                }
            }
        }
        true
    }

    async fn run(mut self, mut bus: broadcast::Receiver<BusEvent>) {
        if !self.resync(None).await {
            return;
        }
        if !self
            .send(gw::watch_sandboxes_event::Payload::Synced(
                gw::WatchSynced {},
            ))
            .await
        {
            return;
        }
        let stop = self.gateway.shutdown.clone();
        loop {
            let received = tokio::select! {
                () = stop.cancelled() => return,
                () = self.tx.closed() => return,
                received = bus.recv() => received,
            };
            let alive = match received {
                Ok(BusEvent::Changed(row)) => {
                    if self.wants(&row.driver, &row.name) {
                        self.send_row(&row).await
                    } else {
                        true
                    }
                }
                Ok(BusEvent::Deleted { id, name, driver }) => {
                    if self.wants(&driver, &name) {
                        self.sent.remove(&id);
                        self.send(gw::watch_sandboxes_event::Payload::Deleted(
                            gw::SandboxDeleted { id, name },
                        ))
                        .await
                    } else {
                        true
                    }
                }
                Ok(BusEvent::Platform { driver, event }) => {
                    if self.wants(&driver, &event.sandbox_name) {
                        self.send(gw::watch_sandboxes_event::Payload::PlatformEvent(event))
                            .await
                    } else {
                        true
                    }
                }
                Ok(BusEvent::DriverState { driver }) => {
                    if self.driver.as_deref().is_none_or(|d| d == driver) {
                        self.resync(Some(driver)).await
                    } else {
                        true
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(
                        missed,
                        "a watcher fell behind; sending the current state again"
                    );
                    self.resync(None).await
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if !alive {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openshell_proto::compute::v1::{DriverCondition, DriverSandboxStatus};
    use std::collections::BTreeMap;

    fn row(phase: SandboxPhase) -> SandboxRow {
        SandboxRow {
            id: "id".into(),
            name: "n".into(),
            driver: "vm".into(),
            spec: gw::SandboxSpec::default(),
            labels: BTreeMap::new(),
            phase,
            observed: None,
            gateway_condition: None,
            instance_id: String::new(),
            resource_version: 1,
            created_at_ms: 0,
            updated_at_ms: 0,
        }
    }

    fn snapshot(kind: &str, status: &str, reason: &str) -> DriverSandbox {
        DriverSandbox {
            id: "id".into(),
            status: Some(DriverSandboxStatus {
                instance_id: "c-1".into(),
                conditions: vec![DriverCondition {
                    r#type: kind.into(),
                    status: status.into(),
                    reason: reason.into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn snapshots_update_rows() {
        let mut r = row(SandboxPhase::Provisioning);
        assert!(apply_snapshot_to(
            &mut r,
            "vm",
            &snapshot("Ready", "True", "")
        ));
        assert_eq!(r.phase, SandboxPhase::Ready);
        assert_eq!(r.instance_id, "c-1");
        assert!(r.gateway_condition.is_none());
        assert!(
            !apply_snapshot_to(&mut r, "vm", &snapshot("Ready", "True", "")),
            "same snapshot is no change"
        );
        assert!(
            !apply_snapshot_to(&mut r, "podman", &snapshot("Ready", "False", "Boom")),
            "other driver"
        );

        let mut stopping = row(SandboxPhase::Stopping);
        stopping.gateway_condition = intent_condition(SandboxPhase::Stopping, 1);
        assert!(apply_snapshot_to(
            &mut stopping,
            "vm",
            &snapshot("Suspended", "True", "")
        ));
        assert_eq!(stopping.phase, SandboxPhase::Stopped);
        assert_eq!(stopping.gateway_condition.unwrap().reason, "Stopped");

        let mut deleting = row(SandboxPhase::Deleting);
        assert!(!apply_snapshot_to(
            &mut deleting,
            "vm",
            &snapshot("Ready", "True", "")
        ));
        let mut no_status = row(SandboxPhase::Ready);
        assert!(!apply_snapshot_to(
            &mut no_status,
            "vm",
            &DriverSandbox::default()
        ));
    }

    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        for name in ["a", "sandbox-99", ""] {
            assert_eq!(parse_page_token(&page_token(name)).unwrap(), name);
        }
        for bad in ["x", "v1.zz", "v1.abc", "v2.61"] {
            let err = parse_page_token(bad).unwrap_err().to_string();
            assert!(err.contains("next_page_token"), "{bad}: {err}");
        }
    }

    #[test]
    fn ambiguity() {
        let call = |code| Error::DriverCall {
            driver: "d".into(),
            rpc: "StopSandbox",
            code,
            message: String::new(),
        };
        assert!(ambiguous(&call(Code::Internal)));
        assert!(ambiguous(&call(Code::Unknown)));
        assert!(!ambiguous(&call(Code::FailedPrecondition)));
        assert!(!ambiguous(&call(Code::NotFound)));
        assert!(is_not_found(&call(Code::NotFound)));
        assert!(ambiguous(&Error::DriverUnavailable {
            driver: "d".into(),
            reason: String::new()
        }));
    }
}
