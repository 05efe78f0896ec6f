//! The in-memory `ComputeDriver` and its log service.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use openshell_driver_kit::{WatchFeed, WatchStream};
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
    ValidateSandboxCreateResponse, WatchSandboxesRequest,
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

/// What the driver keeps about a sandbox besides what watchers see (that
/// lives in the feed).
#[derive(Debug)]
struct Entry {
    phase: Phase,
    /// Bumped on every transition so a delayed "now ready" only applies to
    /// the transition that scheduled it.
    generation: u64,
    logs: VecDeque<String>,
}

/// What log followers hear about.
#[derive(Debug, Clone)]
enum LogUpdate {
    Line { id: String, line: String },
    Gone { id: String },
}

struct Inner {
    behaviour: Behaviour,
    /// Per-sandbox driver state; taken before the feed whenever both are
    /// changed, so changes reach watchers in the order they were made.
    sandboxes: Mutex<BTreeMap<String, Entry>>,
    /// The sandboxes as watchers and readers see them.
    feed: Arc<WatchFeed>,
    logs: broadcast::Sender<LogUpdate>,
    calls: AtomicU64,
}

/// The test driver. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct TestDriver {
    inner: Arc<Inner>,
}

fn condition(kind: &str, status: &str, reason: &str, message: &str) -> DriverCondition {
    DriverCondition {
        r#type: kind.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
        last_transition_time: openshell_wire::time::now_rfc3339(),
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
        let (logs, _) = broadcast::channel(1024);
        let driver = Self {
            inner: Arc::new(Inner {
                behaviour,
                sandboxes: Mutex::new(BTreeMap::new()),
                feed: Arc::new(WatchFeed::new(1024)),
                logs,
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
                    phase,
                    generation: 0,
                    logs: VecDeque::new(),
                },
            );
            self.inner.feed.upsert(sandbox);
        }
    }

    /// Saves the sandboxes; the caller holds the state lock, so saves do
    /// not interleave.
    fn persist(&self, _state: &BTreeMap<String, Entry>) {
        let Some(path) = &self.inner.behaviour.state_file else {
            return;
        };
        let saved = ListSandboxesResponse {
            sandboxes: self.inner.feed.list(),
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

    /// Gives sandbox `id` the status of `phase`; watchers see the change.
    fn set_status(&self, id: &str, phase: Phase, deleting: bool) {
        if let Some(mut sandbox) = self.inner.feed.get(id) {
            sandbox.status = Some(status_for(&sandbox.name, phase, deleting));
            self.inner.feed.upsert(sandbox);
        }
    }

    /// Sends a platform event about `id` when the switch is on.
    fn platform_event(&self, id: &str, kind: &str, reason: &str, message: &str) {
        if !self.inner.behaviour.platform_events {
            return;
        }
        self.inner.feed.publish_platform_event(
            id,
            DriverPlatformEvent {
                timestamp_ms: openshell_wire::time::now_millis(),
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
            },
        );
    }

    fn log(&self, id: &str, entry: &mut Entry, line: String) {
        if entry.logs.len() == MAX_LOG_LINES {
            entry.logs.pop_front();
        }
        entry.logs.push_back(line.clone());
        let _ = self.inner.logs.send(LogUpdate::Line {
            id: id.to_owned(),
            line,
        });
    }

    /// Looks a sandbox up by id, falling back to its name.
    fn find(
        &self,
        state: &BTreeMap<String, Entry>,
        id: &str,
        name: &str,
    ) -> Result<String, Status> {
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
            && let Some(sandbox) = self
                .inner
                .feed
                .list()
                .into_iter()
                .find(|s| s.name == name && state.contains_key(&s.id))
        {
            return Ok(sandbox.id);
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

    /// Moves a sandbox to Provisioning and schedules Ready. `new` is the
    /// sandbox of a create, not in the feed yet.
    fn provision(&self, state: &mut BTreeMap<String, Entry>, id: &str, new: Option<DriverSandbox>) {
        let Some(entry) = state.get_mut(id) else {
            return;
        };
        entry.phase = Phase::Provisioning;
        entry.generation += 1;
        match new {
            Some(mut sandbox) => {
                sandbox.status = Some(status_for(&sandbox.name, Phase::Provisioning, false));
                self.inner.feed.upsert(sandbox);
            }
            None => self.set_status(id, Phase::Provisioning, false),
        }
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
            let Some(sandbox) = driver.inner.feed.get(&id) else {
                return;
            };
            let spec = sandbox.spec.unwrap_or_default();
            let exits = spec
                .template
                .as_ref()
                .is_some_and(|t| t.image.starts_with(EXITING_IMAGE_PREFIX));
            entry.phase = if exits { Phase::Exited } else { Phase::Running };
            let command = spec.command;
            driver.log(&id, entry, format!("$ {}", command.join(" ")));
            if command.first().map(String::as_str) == Some("echo") {
                driver.log(&id, entry, command[1..].join(" "));
            }
            let phase = entry.phase;
            driver.set_status(&id, phase, false);
            driver.platform_event(&id, "Normal", "Started", "sandbox is running");
            driver.persist(&state);
        });
    }

    /// Every sandbox, ordered by name.
    fn snapshot(&self) -> Vec<DriverSandbox> {
        let mut all = self.inner.feed.list();
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
        let key = self.find(&state, &request.sandbox_id, &request.sandbox_name)?;
        Ok(Response::new(GetSandboxResponse {
            sandbox: self.inner.feed.get(&key),
        }))
    }

    async fn list_sandboxes(
        &self,
        _request: Request<ListSandboxesRequest>,
    ) -> Result<Response<ListSandboxesResponse>, Status> {
        self.enter("ListSandboxes", "").await;
        Ok(Response::new(ListSandboxesResponse {
            sandboxes: self.snapshot(),
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
        if self
            .inner
            .feed
            .list()
            .iter()
            .any(|s| s.name == sandbox.name)
        {
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
                phase: Phase::Provisioning,
                generation: 0,
                logs: VecDeque::new(),
            },
        );
        self.provision(&mut state, &id, Some(sandbox));
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
        let key = self.find(&state, &request.sandbox_id, &request.sandbox_name)?;
        if let Some(entry) = state.get_mut(&key)
            && entry.phase != Phase::Stopped
        {
            entry.phase = Phase::Stopped;
            entry.generation += 1;
            self.log(&key, entry, "stopped".to_owned());
            self.set_status(&key, Phase::Stopped, false);
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
        let key = self.find(&state, &request.sandbox_id, &request.sandbox_name)?;
        if state.get(&key).is_some_and(|e| e.phase == Phase::Stopped) {
            self.provision(&mut state, &key, None);
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
        let key = match self.find(&state, &request.sandbox_id, &request.sandbox_name) {
            Ok(key) => key,
            Err(status) if status.code() == tonic::Code::NotFound => {
                return Ok(Response::new(DeleteSandboxResponse { deleted: false }));
            }
            Err(status) => return Err(status),
        };
        if let Some(entry) = state.remove(&key) {
            self.set_status(&key, entry.phase, true);
            self.inner.feed.remove(&key);
            let _ = self.inner.logs.send(LogUpdate::Gone { id: key });
        }
        self.persist(&state);
        Ok(Response::new(DeleteSandboxResponse { deleted: true }))
    }

    type WatchSandboxesStream = WatchStream;

    async fn watch_sandboxes(
        &self,
        _request: Request<WatchSandboxesRequest>,
    ) -> Result<Response<Self::WatchSandboxesStream>, Status> {
        self.enter("WatchSandboxes", "").await;
        Ok(Response::new(self.inner.feed.watch()))
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
        timestamp_ms: openshell_wire::time::now_millis(),
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
        let mut updates = self.inner.logs.subscribe();
        let (id, retained) = {
            let state = self.state();
            let id = self.find(&state, &request.sandbox_id, &request.sandbox_name)?;
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
                    Ok(LogUpdate::Line { id: from, line }) if from == id => {
                        if tx.send(Ok(chunk(&line))).await.is_err() {
                            return;
                        }
                    }
                    Ok(LogUpdate::Gone { id: gone }) if gone == id => return,
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

#[cfg(test)]
mod tests {
    use super::*;
    use openshell_proto::compute::v1::watch_sandboxes_event::Payload;
    use tokio_stream::StreamExt as _;

    #[test]
    fn transition_times_are_rfc3339() {
        let status = status_for("a", Phase::Stopped, false);
        for condition in &status.conditions {
            assert!(
                openshell_wire::time::parse_rfc3339(&condition.last_transition_time).is_some(),
                "{:?}",
                condition.last_transition_time
            );
        }
    }

    async fn next(stream: &mut WatchStream) -> Payload {
        tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("an event in time")
            .expect("stream open")
            .expect("not an error")
            .payload
            .expect("a payload")
    }

    #[tokio::test]
    async fn watchers_see_create_ready_and_delete() {
        let driver = TestDriver::new(Behaviour {
            provision_delay: Duration::from_millis(1),
            ..Behaviour::default()
        });
        let mut watch = driver
            .watch_sandboxes(Request::new(WatchSandboxesRequest {}))
            .await
            .expect("watch")
            .into_inner();
        driver
            .create_sandbox(Request::new(CreateSandboxRequest {
                sandbox: Some(DriverSandbox {
                    id: "s1".into(),
                    name: "one".into(),
                    ..Default::default()
                }),
            }))
            .await
            .expect("create");
        let reason = |payload: Payload| match payload {
            Payload::Sandbox(s) => s
                .sandbox
                .expect("sandbox")
                .status
                .expect("status")
                .conditions[0]
                .reason
                .clone(),
            other => panic!("expected a sandbox event, got {other:?}"),
        };
        assert_eq!(reason(next(&mut watch).await), "Starting");
        assert_eq!(reason(next(&mut watch).await), "Running");
        let deleted = driver
            .delete_sandbox(Request::new(DeleteSandboxRequest {
                sandbox_id: "s1".into(),
                ..Default::default()
            }))
            .await
            .expect("delete")
            .into_inner();
        assert!(deleted.deleted);
        assert_eq!(reason(next(&mut watch).await), "Deleting");
        match next(&mut watch).await {
            Payload::Deleted(d) => assert_eq!(d.sandbox_id, "s1"),
            other => panic!("expected deleted, got {other:?}"),
        }
        assert!(driver.inner.feed.is_empty());
    }
}
