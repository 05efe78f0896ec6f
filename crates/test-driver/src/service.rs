//! The in-memory `ComputeDriver` and its log service.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openshell_proto::compute::logs::v1::sandbox_logs_server::SandboxLogs;
use openshell_proto::compute::logs::v1::{LogChunk, LogStream, StreamLogsRequest};
use openshell_proto::compute::v1::compute_driver_server::ComputeDriver;
use openshell_proto::compute::v1::{
    CreateSandboxRequest, CreateSandboxResponse, DeleteSandboxRequest, DeleteSandboxResponse,
    DeleteWorkspaceRequest, DeleteWorkspaceResponse, DriverCondition, DriverPlatformEvent,
    DriverSandbox, DriverSandboxStatus, EnsureWorkspaceRequest, EnsureWorkspaceResponse,
    GetCapabilitiesRequest, GetCapabilitiesResponse, GetGatewayListenerRequirementsRequest,
    GetGatewayListenerRequirementsResponse, GetSandboxRequest, GetSandboxResponse,
    ListSandboxesRequest, ListSandboxesResponse, StartSandboxRequest, StartSandboxResponse,
    StopSandboxRequest, StopSandboxResponse, ValidateSandboxCreateRequest,
    ValidateSandboxCreateResponse, WatchSandboxesDeletedEvent, WatchSandboxesEvent,
    WatchSandboxesPlatformEvent, WatchSandboxesRequest, WatchSandboxesSandboxEvent,
    watch_sandboxes_event,
};
use prost::Message as _;
use tokio::sync::broadcast;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// How the driver behaves, good and bad.
#[derive(Debug, Clone)]
pub struct Behaviour {
    pub driver_name: String,
    pub driver_version: String,
    pub default_image: String,
    pub gateway_manages_lifecycle: bool,
    /// Delay between accepting a create/start and reporting Ready.
    pub provision_delay: Duration,
    /// Abort the process on the call after this many calls.
    pub crash_after_calls: Option<u64>,
    /// RPC names (as in the proto, e.g. `GetSandbox`) that never answer.
    pub stall: BTreeSet<String>,
    /// Answer UNIMPLEMENTED for the optional RPCs, like a minimal
    /// third-party driver.
    pub minimal: bool,
    /// Persist sandboxes here and load them at start.
    pub state_file: Option<PathBuf>,
    /// Send platform events (Scheduled, Started, Stopped) on watch streams.
    pub platform_events: bool,
    /// Append `<Rpc> <sandbox>` for every call received to this file.
    pub call_log: Option<PathBuf>,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            driver_name: "openshell-test-driver".to_owned(),
            driver_version: env!("CARGO_PKG_VERSION").to_owned(),
            default_image: "test/busybox:latest".to_owned(),
            gateway_manages_lifecycle: false,
            provision_delay: Duration::from_millis(20),
            crash_after_calls: None,
            stall: BTreeSet::new(),
            minimal: false,
            state_file: None,
            platform_events: false,
            call_log: None,
        }
    }
}

/// Images whose name starts with this are reported as absent.
pub const MISSING_IMAGE_PREFIX: &str = "missing/";

/// Sandboxes of images whose name starts with this start, and then their
/// main process exits with code 3 (a terminal `ContainerExited`).
pub const EXITING_IMAGE_PREFIX: &str = "exits/";

const MAX_LOG_LINES: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Provisioning,
    Running,
    Stopped,
    /// The main process ended on its own.
    Exited,
}

#[derive(Debug)]
struct Entry {
    sandbox: DriverSandbox,
    phase: Phase,
    /// Bumped on every transition so a delayed "now ready" only applies to
    /// the transition that scheduled it.
    generation: u64,
    logs: VecDeque<String>,
}

#[derive(Debug, Clone)]
enum Update {
    Watch(Box<WatchSandboxesEvent>),
    Log { id: String, line: String },
    Gone { id: String },
}

struct Inner {
    behaviour: Behaviour,
    sandboxes: Mutex<BTreeMap<String, Entry>>,
    updates: broadcast::Sender<Update>,
    calls: AtomicU64,
}

/// The test driver. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct TestDriver {
    inner: Arc<Inner>,
}

fn now_millis_text() -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    format!("{ms}")
}

fn condition(kind: &str, status: &str, reason: &str, message: &str) -> DriverCondition {
    DriverCondition {
        r#type: kind.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
        last_transition_time: now_millis_text(),
    }
}

fn status_for(name: &str, phase: Phase, deleting: bool) -> DriverSandboxStatus {
    let conditions = if deleting {
        vec![condition(
            "Ready",
            "False",
            "Deleting",
            "sandbox is being deleted",
        )]
    } else {
        match phase {
            Phase::Provisioning => vec![condition(
                "Ready",
                "False",
                "Starting",
                "sandbox is starting",
            )],
            Phase::Running => vec![condition("Ready", "True", "Running", "sandbox is running")],
            Phase::Exited => vec![condition(
                "Ready",
                "False",
                "ContainerExited",
                "the main process exited with code 3",
            )],
            Phase::Stopped => vec![
                condition("Ready", "False", "ContainerStopped", "sandbox is stopped"),
                condition(
                    "Suspended",
                    "True",
                    "Stopped",
                    "sandbox is stopped; its state is kept",
                ),
            ],
        }
    };
    DriverSandboxStatus {
        sandbox_name: name.to_owned(),
        instance_id: format!("test-{name}"),
        conditions,
        deleting,
        ..Default::default()
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

fn valid_env_key(key: &str) -> bool {
    let mut bytes = key.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

impl TestDriver {
    pub fn new(behaviour: Behaviour) -> Self {
        let (updates, _) = broadcast::channel(1024);
        let driver = Self {
            inner: Arc::new(Inner {
                behaviour,
                sandboxes: Mutex::new(BTreeMap::new()),
                updates,
                calls: AtomicU64::new(0),
            }),
        };
        driver.load();
        driver
    }

    fn state(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.inner
            .sandboxes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts the call, records it in the call log, and applies the crash
    /// and stall switches. `sandbox` is the id (or name) the call is about.
    async fn enter(&self, method: &str, sandbox: &str) {
        let n = self.inner.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(path) = &self.inner.behaviour.call_log {
            use std::io::Write as _;
            let line = format!("{method} {sandbox}\n");
            let written = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut file| file.write_all(line.as_bytes()));
            if let Err(e) = written {
                eprintln!("test driver: could not append to {}: {e}", path.display());
            }
        }
        if let Some(limit) = self.inner.behaviour.crash_after_calls
            && n > limit
        {
            eprintln!("test driver: crashing on call {n} ({method}) as configured");
            std::process::abort();
        }
        if self.inner.behaviour.stall.contains(method) {
            eprintln!("test driver: stalling {method} as configured");
            std::future::pending::<()>().await;
        }
    }

    fn load(&self) {
        let Some(path) = &self.inner.behaviour.state_file else {
            return;
        };
        let Ok(bytes) = std::fs::read(path) else {
            return;
        };
        let Ok(saved) = ListSandboxesResponse::decode(bytes.as_slice()) else {
            eprintln!(
                "test driver: ignoring undecodable state file {}",
                path.display()
            );
            return;
        };
        let mut state = self.state();
        for sandbox in saved.sandboxes {
            let stopped = sandbox.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.r#type == "Suspended" && c.status == "True")
            });
            let phase = if stopped {
                Phase::Stopped
            } else {
                Phase::Running
            };
            let mut sandbox = sandbox;
            sandbox.status = Some(status_for(&sandbox.name, phase, false));
            state.insert(
                sandbox.id.clone(),
                Entry {
                    sandbox,
                    phase,
                    generation: 0,
                    logs: VecDeque::new(),
                },
            );
        }
    }

    fn persist(&self, state: &BTreeMap<String, Entry>) {
        let Some(path) = &self.inner.behaviour.state_file else {
            return;
        };
        let saved = ListSandboxesResponse {
            sandboxes: state.values().map(|e| e.sandbox.clone()).collect(),
        };
        let tmp = path.with_extension("tmp");
        if let Err(e) =
            std::fs::write(&tmp, saved.encode_to_vec()).and_then(|()| std::fs::rename(&tmp, path))
        {
            eprintln!(
                "test driver: could not save state to {}: {e}",
                path.display()
            );
        }
    }

    fn publish(&self, sandbox: &DriverSandbox) {
        let _ = self
            .inner
            .updates
            .send(Update::Watch(Box::new(sandbox_event(sandbox))));
    }

    /// Sends a platform event about `id` when the switch is on.
    fn platform_event(&self, id: &str, kind: &str, reason: &str, message: &str) {
        if !self.inner.behaviour.platform_events {
            return;
        }
        let timestamp_ms = i64::try_from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis(),
        )
        .unwrap_or(0);
        let event = WatchSandboxesEvent {
            payload: Some(watch_sandboxes_event::Payload::PlatformEvent(
                WatchSandboxesPlatformEvent {
                    sandbox_id: id.to_owned(),
                    event: Some(DriverPlatformEvent {
                        timestamp_ms,
                        source: "test".to_owned(),
                        r#type: kind.to_owned(),
                        reason: reason.to_owned(),
                        message: message.to_owned(),
                        metadata: [(
                            "driver".to_owned(),
                            self.inner.behaviour.driver_name.clone(),
                        )]
                        .into_iter()
                        .collect(),
                    }),
                },
            )),
        };
        let _ = self.inner.updates.send(Update::Watch(Box::new(event)));
    }

    fn log(&self, entry: &mut Entry, line: String) {
        if entry.logs.len() == MAX_LOG_LINES {
            entry.logs.pop_front();
        }
        entry.logs.push_back(line.clone());
        let _ = self.inner.updates.send(Update::Log {
            id: entry.sandbox.id.clone(),
            line,
        });
    }

    /// Looks a sandbox up by id, falling back to its name.
    fn find(state: &BTreeMap<String, Entry>, id: &str, name: &str) -> Result<String, Status> {
        if !id.is_empty() {
            if !valid_id(id) {
                return Err(Status::invalid_argument(format!(
                    "sandbox id {id:?} must match [A-Za-z0-9._-]{{1,128}}"
                )));
            }
            if state.contains_key(id) {
                return Ok(id.to_owned());
            }
        }
        if !name.is_empty()
            && let Some((key, _)) = state.iter().find(|(_, e)| e.sandbox.name == name)
        {
            return Ok(key.clone());
        }
        if id.is_empty() && name.is_empty() {
            return Err(Status::invalid_argument(
                "sandbox_id or sandbox_name is required",
            ));
        }
        Err(Status::not_found(format!(
            "sandbox {} not found",
            if id.is_empty() { name } else { id }
        )))
    }

    fn validate(&self, sandbox: Option<&DriverSandbox>) -> Result<DriverSandbox, Status> {
        let sandbox = sandbox.ok_or_else(|| Status::invalid_argument("sandbox is required"))?;
        if !valid_id(&sandbox.id) {
            return Err(Status::invalid_argument(format!(
                "sandbox id {:?} must match [A-Za-z0-9._-]{{1,128}}",
                sandbox.id
            )));
        }
        if sandbox.name.is_empty() {
            return Err(Status::invalid_argument("sandbox name is required"));
        }
        let mut sandbox = sandbox.clone();
        let spec = sandbox.spec.get_or_insert_with(Default::default);
        let template = spec.template.get_or_insert_with(Default::default);
        if template.image.is_empty() {
            template
                .image
                .clone_from(&self.inner.behaviour.default_image);
        }
        if let Some(missing) = template.image.strip_prefix(MISSING_IMAGE_PREFIX) {
            return Err(Status::failed_precondition(format!(
                "image {}{missing} is not present on this host; load it first",
                MISSING_IMAGE_PREFIX
            )));
        }
        if let Some(index) = spec.command.iter().position(String::is_empty) {
            return Err(Status::invalid_argument(format!(
                "command[{index}] is empty; every argv element must be non-empty"
            )));
        }
        for key in spec.environment.keys().chain(template.environment.keys()) {
            if !valid_env_key(key) {
                return Err(Status::invalid_argument(format!(
                    "environment variable name {key:?} is invalid; use letters, digits and '_', not starting with a digit"
                )));
            }
        }
        Ok(sandbox)
    }

    /// Moves a sandbox to Provisioning and schedules Ready.
    fn provision(&self, state: &mut BTreeMap<String, Entry>, id: &str) {
        let Some(entry) = state.get_mut(id) else {
            return;
        };
        entry.phase = Phase::Provisioning;
        entry.generation += 1;
        entry.sandbox.status = Some(status_for(&entry.sandbox.name, Phase::Provisioning, false));
        self.publish(&entry.sandbox);
        self.platform_event(id, "Normal", "Scheduled", "sandbox accepted; starting it");
        let generation = entry.generation;
        let driver = self.clone();
        let id = id.to_owned();
        let delay = self.inner.behaviour.provision_delay;
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let mut state = driver.state();
            let Some(entry) = state.get_mut(&id) else {
                return;
            };
            if entry.generation != generation || entry.phase != Phase::Provisioning {
                return;
            }
            let exits = entry
                .sandbox
                .spec
                .as_ref()
                .and_then(|s| s.template.as_ref())
                .is_some_and(|t| t.image.starts_with(EXITING_IMAGE_PREFIX));
            entry.phase = if exits { Phase::Exited } else { Phase::Running };
            entry.sandbox.status = Some(status_for(&entry.sandbox.name, entry.phase, false));
            let command = entry
                .sandbox
                .spec
                .as_ref()
                .map(|s| s.command.clone())
                .unwrap_or_default();
            driver.log(entry, format!("$ {}", command.join(" ")));
            if command.first().map(String::as_str) == Some("echo") {
                driver.log(entry, command[1..].join(" "));
            }
            driver.publish(&entry.sandbox);
            driver.platform_event(&id, "Normal", "Started", "sandbox is running");
            driver.persist(&state);
        });
    }

    fn snapshot(state: &BTreeMap<String, Entry>) -> Vec<DriverSandbox> {
        let mut all: Vec<DriverSandbox> = state.values().map(|e| e.sandbox.clone()).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    fn unimplemented_if_minimal(&self, what: &str) -> Result<(), Status> {
        if self.inner.behaviour.minimal {
            return Err(Status::unimplemented(format!(
                "{what} is not implemented by this driver"
            )));
        }
        Ok(())
    }
}

/// What a call is about, for the call log: the id, else the name.
fn target<'a>(id: &'a str, name: &'a str) -> &'a str {
    if id.is_empty() { name } else { id }
}

fn sandbox_event(sandbox: &DriverSandbox) -> WatchSandboxesEvent {
    WatchSandboxesEvent {
        payload: Some(watch_sandboxes_event::Payload::Sandbox(
            WatchSandboxesSandboxEvent {
                sandbox: Some(sandbox.clone()),
            },
        )),
    }
}

#[tonic::async_trait]
impl ComputeDriver for TestDriver {
    async fn get_capabilities(
        &self,
        _request: Request<GetCapabilitiesRequest>,
    ) -> Result<Response<GetCapabilitiesResponse>, Status> {
        self.enter("GetCapabilities", "").await;
        let b = &self.inner.behaviour;
        Ok(Response::new(GetCapabilitiesResponse {
            driver_name: b.driver_name.clone(),
            driver_version: b.driver_version.clone(),
            default_image: b.default_image.clone(),
            gateway_manages_lifecycle: b.gateway_manages_lifecycle,
        }))
    }

    async fn get_gateway_listener_requirements(
        &self,
        _request: Request<GetGatewayListenerRequirementsRequest>,
    ) -> Result<Response<GetGatewayListenerRequirementsResponse>, Status> {
        self.enter("GetGatewayListenerRequirements", "").await;
        self.unimplemented_if_minimal("GetGatewayListenerRequirements")?;
        Ok(Response::new(
            GetGatewayListenerRequirementsResponse::default(),
        ))
    }

    async fn validate_sandbox_create(
        &self,
        request: Request<ValidateSandboxCreateRequest>,
    ) -> Result<Response<ValidateSandboxCreateResponse>, Status> {
        let id = request.get_ref().sandbox.as_ref().map(|s| s.id.as_str());
        self.enter("ValidateSandboxCreate", id.unwrap_or_default())
            .await;
        self.validate(request.get_ref().sandbox.as_ref())?;
        Ok(Response::new(ValidateSandboxCreateResponse {}))
    }

    async fn get_sandbox(
        &self,
        request: Request<GetSandboxRequest>,
    ) -> Result<Response<GetSandboxResponse>, Status> {
        let request = request.into_inner();
        self.enter(
            "GetSandbox",
            target(&request.sandbox_id, &request.sandbox_name),
        )
        .await;
        let state = self.state();
        let key = Self::find(&state, &request.sandbox_id, &request.sandbox_name)?;
        Ok(Response::new(GetSandboxResponse {
            sandbox: state.get(&key).map(|e| e.sandbox.clone()),
        }))
    }

    async fn list_sandboxes(
        &self,
        _request: Request<ListSandboxesRequest>,
    ) -> Result<Response<ListSandboxesResponse>, Status> {
        self.enter("ListSandboxes", "").await;
        Ok(Response::new(ListSandboxesResponse {
            sandboxes: Self::snapshot(&self.state()),
        }))
    }

    async fn create_sandbox(
        &self,
        request: Request<CreateSandboxRequest>,
    ) -> Result<Response<CreateSandboxResponse>, Status> {
        let id = request.get_ref().sandbox.as_ref().map(|s| s.id.as_str());
        self.enter("CreateSandbox", id.unwrap_or_default()).await;
        let mut sandbox = self.validate(request.get_ref().sandbox.as_ref())?;
        let mut state = self.state();
        if state.contains_key(&sandbox.id) {
            return Err(Status::already_exists(format!(
                "sandbox {} already exists",
                sandbox.id
            )));
        }
        if state.values().any(|e| e.sandbox.name == sandbox.name) {
            return Err(Status::already_exists(format!(
                "a sandbox named {} already exists",
                sandbox.name
            )));
        }
        // The token is a secret: keep it out of everything observable.
        if let Some(spec) = sandbox.spec.as_mut() {
            spec.sandbox_token.clear();
        }
        let id = sandbox.id.clone();
        state.insert(
            id.clone(),
            Entry {
                sandbox,
                phase: Phase::Provisioning,
                generation: 0,
                logs: VecDeque::new(),
            },
        );
        self.provision(&mut state, &id);
        self.persist(&state);
        Ok(Response::new(CreateSandboxResponse {}))
    }

    async fn stop_sandbox(
        &self,
        request: Request<StopSandboxRequest>,
    ) -> Result<Response<StopSandboxResponse>, Status> {
        let request = request.into_inner();
        self.enter(
            "StopSandbox",
            target(&request.sandbox_id, &request.sandbox_name),
        )
        .await;
        let mut state = self.state();
        let key = Self::find(&state, &request.sandbox_id, &request.sandbox_name)?;
        if let Some(entry) = state.get_mut(&key)
            && entry.phase != Phase::Stopped
        {
            entry.phase = Phase::Stopped;
            entry.generation += 1;
            entry.sandbox.status = Some(status_for(&entry.sandbox.name, Phase::Stopped, false));
            self.log(entry, "stopped".to_owned());
            self.publish(&entry.sandbox);
            self.platform_event(&key, "Normal", "Stopped", "sandbox stopped; state kept");
        }
        self.persist(&state);
        Ok(Response::new(StopSandboxResponse {}))
    }

    async fn start_sandbox(
        &self,
        request: Request<StartSandboxRequest>,
    ) -> Result<Response<StartSandboxResponse>, Status> {
        let request = request.into_inner();
        self.enter(
            "StartSandbox",
            target(&request.sandbox_id, &request.sandbox_name),
        )
        .await;
        let mut state = self.state();
        let key = Self::find(&state, &request.sandbox_id, &request.sandbox_name)?;
        if state.get(&key).is_some_and(|e| e.phase == Phase::Stopped) {
            self.provision(&mut state, &key);
        }
        self.persist(&state);
        Ok(Response::new(StartSandboxResponse {}))
    }

    async fn delete_sandbox(
        &self,
        request: Request<DeleteSandboxRequest>,
    ) -> Result<Response<DeleteSandboxResponse>, Status> {
        let request = request.into_inner();
        self.enter(
            "DeleteSandbox",
            target(&request.sandbox_id, &request.sandbox_name),
        )
        .await;
        let mut state = self.state();
        let key = match Self::find(&state, &request.sandbox_id, &request.sandbox_name) {
            Ok(key) => key,
            Err(status) if status.code() == tonic::Code::NotFound => {
                return Ok(Response::new(DeleteSandboxResponse { deleted: false }));
            }
            Err(status) => return Err(status),
        };
        if let Some(mut entry) = state.remove(&key) {
            entry.sandbox.status = Some(status_for(&entry.sandbox.name, entry.phase, true));
            self.publish(&entry.sandbox);
            let _ = self
                .inner
                .updates
                .send(Update::Watch(Box::new(WatchSandboxesEvent {
                    payload: Some(watch_sandboxes_event::Payload::Deleted(
                        WatchSandboxesDeletedEvent {
                            sandbox_id: key.clone(),
                        },
                    )),
                })));
            let _ = self.inner.updates.send(Update::Gone { id: key });
        }
        self.persist(&state);
        Ok(Response::new(DeleteSandboxResponse { deleted: true }))
    }

    type WatchSandboxesStream = BoxStream<WatchSandboxesEvent>;

    async fn watch_sandboxes(
        &self,
        _request: Request<WatchSandboxesRequest>,
    ) -> Result<Response<Self::WatchSandboxesStream>, Status> {
        self.enter("WatchSandboxes", "").await;
        // Subscribe before taking the snapshot so nothing falls in between.
        let mut updates = self.inner.updates.subscribe();
        let initial = Self::snapshot(&self.state());
        let driver = self.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            for sandbox in initial {
                if tx.send(Ok(sandbox_event(&sandbox))).await.is_err() {
                    return;
                }
            }
            loop {
                let event = match updates.recv().await {
                    Ok(Update::Watch(event)) => *event,
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Missed events: send the whole picture again.
                        let all = Self::snapshot(&driver.state());
                        for sandbox in all {
                            if tx.send(Ok(sandbox_event(&sandbox))).await.is_err() {
                                return;
                            }
                        }
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn ensure_workspace(
        &self,
        request: Request<EnsureWorkspaceRequest>,
    ) -> Result<Response<EnsureWorkspaceResponse>, Status> {
        self.enter("EnsureWorkspace", &request.get_ref().workspace)
            .await;
        self.unimplemented_if_minimal("EnsureWorkspace")?;
        Ok(Response::new(EnsureWorkspaceResponse {}))
    }

    async fn delete_workspace(
        &self,
        request: Request<DeleteWorkspaceRequest>,
    ) -> Result<Response<DeleteWorkspaceResponse>, Status> {
        self.enter("DeleteWorkspace", &request.get_ref().workspace)
            .await;
        self.unimplemented_if_minimal("DeleteWorkspace")?;
        Ok(Response::new(DeleteWorkspaceResponse {}))
    }
}

fn chunk(line: &str) -> LogChunk {
    LogChunk {
        data: format!("{line}\n").into_bytes(),
        stream: LogStream::Stdout.into(),
        timestamp_ms: i64::try_from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis(),
        )
        .unwrap_or(0),
    }
}

#[tonic::async_trait]
impl SandboxLogs for TestDriver {
    type StreamLogsStream = BoxStream<LogChunk>;

    async fn stream_logs(
        &self,
        request: Request<StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        let request = request.into_inner();
        self.enter(
            "StreamLogs",
            target(&request.sandbox_id, &request.sandbox_name),
        )
        .await;
        let mut updates = self.inner.updates.subscribe();
        let (id, retained) = {
            let state = self.state();
            let id = Self::find(&state, &request.sandbox_id, &request.sandbox_name)?;
            let logs = &state[&id].logs;
            let tail = usize::try_from(request.tail_lines).unwrap_or(usize::MAX);
            let skip = if tail == 0 {
                0
            } else {
                logs.len().saturating_sub(tail)
            };
            (id, logs.iter().skip(skip).cloned().collect::<Vec<_>>())
        };
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            for line in retained {
                if tx.send(Ok(chunk(&line))).await.is_err() {
                    return;
                }
            }
            if !request.follow {
                return;
            }
            loop {
                match updates.recv().await {
                    Ok(Update::Log { id: from, line }) if from == id => {
                        if tx.send(Ok(chunk(&line))).await.is_err() {
                            return;
                        }
                    }
                    Ok(Update::Gone { id: gone }) if gone == id => return,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
