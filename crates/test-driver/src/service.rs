//! The in-memory `ComputeDriver` and its log service.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use openshell_driver_kit::WatchFeed;
use openshell_driver_kit::contract::{self, AdmissionPolicy};
use openshell_proto::compute::logs::v1::sandbox_logs_server::SandboxLogs;
use openshell_proto::compute::logs::v1::{LogChunk, LogStream, StreamLogsRequest};
use openshell_proto::compute::v1::compute_driver_server::ComputeDriver;
use openshell_proto::compute::v1::{
    AuthenticateSandboxRequest, AuthenticateSandboxResponse, CreateSandboxRequest,
    CreateSandboxResponse, DeleteSandboxRequest, DeleteSandboxResponse, DeleteWorkspaceRequest,
    DeleteWorkspaceResponse, DriverCondition, DriverPlatformEvent, DriverSandbox,
    DriverSandboxStatus, EnsureWorkspaceRequest, EnsureWorkspaceResponse, GetCapabilitiesRequest,
    GetCapabilitiesResponse, GetGatewayListenerRequirementsRequest,
    GetGatewayListenerRequirementsResponse, GetSandboxRequest, GetSandboxResponse,
    ListSandboxesRequest, ListSandboxesResponse, StartSandboxRequest, StartSandboxResponse,
    StopSandboxRequest, StopSandboxResponse, ValidateSandboxCreateRequest,
    ValidateSandboxCreateResponse, WatchSandboxesEvent, WatchSandboxesRequest,
};
use openshell_proto::extension::v1::PeerMetadata;
use prost::Message as _;
use tokio::sync::broadcast;
use tokio_stream::{Stream, StreamExt as _};
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
    /// The admission policy acknowledged to 1.x gateways; its
    /// `allow_driver_config` also decides whether create and validate
    /// accept a non-empty `template.driver_config`.
    pub admission: AdmissionPolicy,
    /// Answer WatchSandboxes only once the first event is available, like
    /// gRPC servers that send response headers with the first message.
    pub lazy_watch_headers: bool,
    /// Answer GetCapabilities as a v0.0.111 driver: no 1.x fields at all.
    pub legacy_contract: bool,
    /// Misbehave: advertise this protocol major in the 1.x metadata.
    pub protocol_major: Option<u32>,
    /// Say that Ready does not mean the workload runs (1.x
    /// `driver_reports_runtime_readiness = false`), as drivers that leave
    /// readiness to a supervisor session do.
    pub no_runtime_readiness: bool,
    /// Start with this many running sandboxes (see [`preloaded_id`] and
    /// [`preloaded_name`]), for scale tests.
    pub preload: usize,
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
            admission: AdmissionPolicy::default(),
            lazy_watch_headers: false,
            legacy_contract: false,
            protocol_major: None,
            no_runtime_readiness: false,
            preload: 0,
        }
    }
}

/// The id of the `index`th preloaded sandbox (`--preload`): UUID-shaped,
/// like the ids a gateway gives, so a test can store rows for them.
pub fn preloaded_id(index: usize) -> String {
    format!("00000000-0000-4000-8000-{index:012}")
}

/// The name of the `index`th preloaded sandbox (`--preload`).
pub fn preloaded_name(index: usize) -> String {
    format!("preload-{index:06}")
}

/// The command of every preloaded sandbox.
pub const PRELOADED_COMMAND: [&str; 2] = ["sleep", "infinity"];

/// The implementation name this driver reports in its 1.x metadata.
pub const IMPLEMENTATION_NAME: &str = "openshell-compute-plane/test-driver";

/// Longest sandbox name: a DNS label.
const MAX_NAME_BYTES: usize = 63;

/// How much of a caller's input an error message repeats.
const ECHO_BYTES: usize = 100;

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
    /// The sandbox's name (names are unique, like ids).
    name: String,
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
    /// This driver's 1.x metadata, built once.
    metadata: PeerMetadata,
    /// `behaviour.admission` encoded once, so every answer is byte-identical.
    admission_policy: String,
}

/// The test driver. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct TestDriver {
    inner: Arc<Inner>,
}

/// Now, cut to whole milliseconds (the precision of the RFC 3339 text), so
/// both time encodings denote the same instant.
fn now() -> SystemTime {
    let millis = u64::try_from(openshell_wire::time::now_millis()).unwrap_or(0);
    std::time::UNIX_EPOCH + Duration::from_millis(millis)
}

/// A condition stamped now, in both time encodings.
fn condition(kind: &str, status: &str, reason: &str, message: &str) -> DriverCondition {
    contract::condition(kind, status, reason, message, now())
}

/// The runtime identity of sandbox `id`: stable for the sandbox's life.
fn runtime_identity(id: &str) -> String {
    format!("test-driver/{id}")
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

/// A DNS-label-like name: `[a-z0-9]([a-z0-9-]*[a-z0-9])?`, at most 63
/// bytes. Every name the gateway accepts passes (it also wants a leading
/// letter).
fn check_name(name: &str) -> Result<(), Status> {
    let echo = contract::truncate(name, ECHO_BYTES);
    if name.is_empty() {
        return Err(Status::invalid_argument("sandbox name is required"));
    }
    if name.chars().any(char::is_control) {
        return Err(Status::invalid_argument(format!(
            "sandbox name {echo:?} contains control characters"
        )));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(Status::invalid_argument(format!(
            "sandbox name {echo:?} is {} bytes; at most {MAX_NAME_BYTES} are allowed",
            name.len()
        )));
    }
    let bytes = name.as_bytes();
    let inner_ok = bytes
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
    let ends_ok = |b: Option<&u8>| b.is_some_and(|b| *b != b'-');
    if !inner_ok || !ends_ok(bytes.first()) || !ends_ok(bytes.last()) {
        return Err(Status::invalid_argument(format!(
            "sandbox name {echo:?} must be a DNS label: lowercase letters, digits and '-', \
             starting and ending with a letter or digit"
        )));
    }
    Ok(())
}

/// Whether `text` is a non-negative Kubernetes-style quantity: a decimal
/// number (no sign) with an optional SI, binary or exponent suffix, e.g.
/// `500m`, `2`, `1.5`, `512Mi`, `1e3`.
fn valid_quantity(text: &str) -> bool {
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(end);
    let digits = number.bytes().filter(u8::is_ascii_digit).count();
    if digits == 0 || number.matches('.').count() > 1 {
        return false;
    }
    match suffix {
        "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" => {
            true
        }
        _ => suffix
            .strip_prefix(['e', 'E'])
            .is_some_and(|exp| !exp.is_empty() && exp.bytes().all(|b| b.is_ascii_digit())),
    }
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
        let mut metadata =
            contract::peer_metadata(IMPLEMENTATION_NAME, env!("CARGO_PKG_VERSION"), &[]);
        if let (Some(major), Some(version)) =
            (behaviour.protocol_major, metadata.protocol_version.as_mut())
        {
            version.major = major;
        }
        let admission_policy = behaviour.admission.encode();
        let driver = Self {
            inner: Arc::new(Inner {
                behaviour,
                metadata,
                admission_policy,
                sandboxes: Mutex::new(BTreeMap::new()),
                feed: Arc::new(WatchFeed::new(1024)),
                logs,
                calls: AtomicU64::new(0),
            }),
        };
        driver.load();
        driver.preload();
        driver
    }

    /// Adds the `--preload` sandboxes, running, that are not there yet.
    fn preload(&self) {
        let count = self.inner.behaviour.preload;
        if count == 0 {
            return;
        }
        let mut state = self.state();
        for index in 0..count {
            let id = preloaded_id(index);
            if state.contains_key(&id) {
                continue;
            }
            let name = preloaded_name(index);
            let sandbox = DriverSandbox {
                id: id.clone(),
                name: name.clone(),
                spec: Some(openshell_proto::compute::v1::DriverSandboxSpec {
                    template: Some(openshell_proto::compute::v1::DriverSandboxTemplate {
                        image: self.inner.behaviour.default_image.clone(),
                        ..Default::default()
                    }),
                    command: PRELOADED_COMMAND.map(str::to_owned).to_vec(),
                    ..Default::default()
                }),
                status: Some(status_for(&name, Phase::Running, false)),
                workspace: "default".to_owned(),
                ..Default::default()
            };
            state.insert(
                id,
                Entry {
                    name,
                    phase: Phase::Running,
                    generation: 0,
                    logs: VecDeque::new(),
                },
            );
            self.inner.feed.upsert(sandbox);
        }
        self.persist(&state);
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
                    name: sandbox.name.clone(),
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
        let event = DriverPlatformEvent {
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
            ..Default::default()
        };
        self.inner
            .feed
            .publish_platform_event(id, contract::stamp_event(event, now()));
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
                contract::truncate(&sandbox.id, ECHO_BYTES)
            )));
        }
        check_name(&sandbox.name)?;
        if sandbox.spec.is_none() {
            return Err(Status::invalid_argument(format!(
                "sandbox {:?} has no spec; create and validate requests must carry one",
                sandbox.name
            )));
        }
        let mut sandbox = sandbox.clone();
        let spec = sandbox.spec.get_or_insert_with(Default::default);
        // `sandbox_token` and `launch_authentication` are accepted and never
        // used: checking launch authentication needs a supervisor component
        // inside the sandbox, which this project does not have.
        let template = spec.template.get_or_insert_with(Default::default);
        if let Some(resources) = &template.resources {
            for (field, value) in [
                ("cpu_request", &resources.cpu_request),
                ("cpu_limit", &resources.cpu_limit),
                ("memory_request", &resources.memory_request),
                ("memory_limit", &resources.memory_limit),
            ] {
                if !value.is_empty() && !valid_quantity(value) {
                    return Err(Status::invalid_argument(format!(
                        "template.resources.{field} {:?} is not a quantity; use a non-negative \
                         number with an optional unit, e.g. \"500m\", \"2\" or \"512Mi\"",
                        contract::truncate(value, ECHO_BYTES)
                    )));
                }
            }
        }
        if spec
            .resource_requirements
            .as_ref()
            .is_some_and(|r| r.gpu.is_some())
        {
            return Err(Status::failed_precondition(
                "this sandbox asks for a GPU, but the test driver has none; remove the GPU request",
            ));
        }
        if !self.inner.behaviour.admission.allow_driver_config
            && template
                .driver_config
                .as_ref()
                .is_some_and(|c| !c.fields.is_empty())
        {
            return Err(Status::failed_precondition(
                "caller driver config is disabled; a gateway administrator must enable \
                 allow_driver_config",
            ));
        }
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
                    "environment variable name {:?} is invalid; use letters, digits and '_', not starting with a digit",
                    contract::truncate(key, ECHO_BYTES)
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
        request: Request<GetCapabilitiesRequest>,
    ) -> Result<Response<GetCapabilitiesResponse>, Status> {
        self.enter("GetCapabilities", "").await;
        let b = &self.inner.behaviour;
        if b.legacy_contract {
            // A v0.0.111 driver knows none of the 1.x fields.
            return Ok(Response::new(GetCapabilitiesResponse {
                driver_name: b.driver_name.clone(),
                driver_version: b.driver_version.clone(),
                default_image: b.default_image.clone(),
                gateway_manages_lifecycle: b.gateway_manages_lifecycle,
                ..GetCapabilitiesResponse::default()
            }));
        }
        let facts = contract::DriverFacts {
            driver_name: b.driver_name.clone(),
            driver_version: b.driver_version.clone(),
            default_image: b.default_image.clone(),
            gateway_manages_lifecycle: b.gateway_manages_lifecycle,
            // Limits are checked and kept in the spec; nothing runs that
            // could exceed them.
            cpu_limits: true,
            memory_limits: true,
            // Ready is reported when the (simulated) workload runs.
            reports_runtime_readiness: !b.no_runtime_readiness,
            metadata: self.inner.metadata.clone(),
            admission_policy: self.inner.admission_policy.clone(),
        };
        contract::capabilities(request.get_ref().gateway.as_ref(), &facts)
            .map(Response::new)
            .map_err(|e| Status::failed_precondition(e.to_string()))
    }

    async fn authenticate_sandbox(
        &self,
        _request: Request<AuthenticateSandboxRequest>,
    ) -> Result<Response<AuthenticateSandboxResponse>, Status> {
        self.enter("AuthenticateSandbox", "").await;
        Err(Status::unimplemented(contract::NO_SANDBOX_AUTHENTICATION))
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
        if state.values().any(|entry| entry.name == sandbox.name) {
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
                name: sandbox.name.clone(),
                phase: Phase::Provisioning,
                generation: 0,
                logs: VecDeque::new(),
            },
        );
        self.provision(&mut state, &id, Some(sandbox));
        self.persist(&state);
        Ok(Response::new(CreateSandboxResponse {
            runtime_identity: runtime_identity(&id),
        }))
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
        Ok(Response::new(StartSandboxResponse {
            runtime_identity: runtime_identity(&key),
        }))
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

    type WatchSandboxesStream = BoxStream<WatchSandboxesEvent>;

    async fn watch_sandboxes(
        &self,
        _request: Request<WatchSandboxesRequest>,
    ) -> Result<Response<Self::WatchSandboxesStream>, Status> {
        self.enter("WatchSandboxes", "").await;
        let mut stream = self.inner.feed.watch();
        if !self.inner.behaviour.lazy_watch_headers {
            return Ok(Response::new(Box::pin(stream)));
        }
        // Hold the response (and so its headers) until there is a first
        // event, then send that event first.
        let first = stream.next().await;
        Ok(Response::new(Box::pin(
            tokio_stream::iter(first).chain(stream),
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

    use openshell_proto::compute::v1::{
        DriverResourceRequirements, DriverSandboxSpec, DriverSandboxTemplate,
        GpuResourceRequirements, ResourceRequirements,
    };

    fn sandbox(id: &str, name: &str) -> DriverSandbox {
        DriverSandbox {
            id: id.into(),
            name: name.into(),
            spec: Some(DriverSandboxSpec::default()),
            ..Default::default()
        }
    }

    fn quick() -> TestDriver {
        TestDriver::new(Behaviour {
            provision_delay: Duration::from_millis(1),
            ..Behaviour::default()
        })
    }

    async fn capabilities(
        driver: &TestDriver,
        gateway: Option<PeerMetadata>,
    ) -> Result<GetCapabilitiesResponse, Status> {
        driver
            .get_capabilities(Request::new(GetCapabilitiesRequest { gateway }))
            .await
            .map(Response::into_inner)
    }

    /// Validate's and Create's answer for `sandbox`; both must agree.
    async fn admit(driver: &TestDriver, sandbox: DriverSandbox) -> Result<(), Status> {
        let validated = driver
            .validate_sandbox_create(Request::new(ValidateSandboxCreateRequest {
                sandbox: Some(sandbox.clone()),
            }))
            .await
            .map(|_| ());
        let created = driver
            .create_sandbox(Request::new(CreateSandboxRequest {
                sandbox: Some(sandbox),
            }))
            .await
            .map(|_| ());
        assert_eq!(
            validated.as_ref().map_err(Status::code),
            created.as_ref().map_err(Status::code),
            "validate and create disagree"
        );
        created
    }

    fn with_template(edit: impl FnOnce(&mut DriverSandboxTemplate)) -> DriverSandbox {
        let mut s = sandbox("s1", "one");
        let spec = s.spec.get_or_insert_with(Default::default);
        edit(spec.template.get_or_insert_with(Default::default));
        s
    }

    fn refused(result: Result<(), Status>, code: tonic::Code, needle: &str) -> String {
        let status = result.expect_err("refused");
        assert_eq!(status.code(), code, "{}", status.message());
        assert!(
            status.message().contains(needle),
            "{needle:?} not in {:?}",
            status.message()
        );
        status.message().to_owned()
    }

    #[tokio::test]
    async fn capabilities_answer_both_generations() {
        let driver = quick();
        let legacy = capabilities(&driver, None)
            .await
            .expect("no metadata is fine");
        let extension = legacy.extension.clone().expect("1.x metadata always sent");
        assert_eq!(extension.implementation_name, IMPLEMENTATION_NAME);
        assert_eq!(
            legacy.resource_admission_policy,
            AdmissionPolicy::default().encode()
        );
        assert!(legacy.driver_reports_runtime_readiness);
        assert!(!legacy.supports_sandbox_authentication);
        let gpu = legacy
            .resource_capabilities
            .and_then(|r| r.gpu)
            .expect("gpu capabilities");
        assert!(!gpu.default_selection_supported && !gpu.count_selection_supported);

        let ours = contract::peer_metadata("openshell-compute-plane/gateway", "x", &[]);
        let negotiated = capabilities(&driver, Some(ours))
            .await
            .expect("this project's gateway negotiates");
        assert_eq!(
            negotiated.resource_admission_policy,
            legacy.resource_admission_policy
        );

        let mut future = contract::peer_metadata("openshell-compute-plane/gateway", "x", &[]);
        future.protocol_version =
            Some(openshell_proto::extension::v1::ProtocolVersion { major: 2, minor: 3 });
        let status = capabilities(&driver, Some(future))
            .await
            .expect_err("major 2 is refused");
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        for version in ["2.3", "1.0"] {
            assert!(status.message().contains(version), "{}", status.message());
        }
    }

    #[tokio::test]
    async fn the_admission_policy_follows_the_switch() {
        let driver = TestDriver::new(Behaviour {
            admission: AdmissionPolicy {
                allow_driver_config: true,
                ..AdmissionPolicy::default()
            },
            ..Behaviour::default()
        });
        let policy = capabilities(&driver, None)
            .await
            .expect("caps")
            .resource_admission_policy;
        let decoded = AdmissionPolicy::decode(&policy).expect("our own encoding");
        assert!(decoded.allow_driver_config);
        let config = prost_types::Struct {
            fields: [("x".to_owned(), prost_types::Value::default())]
                .into_iter()
                .collect(),
        };
        admit(&driver, with_template(|t| t.driver_config = Some(config)))
            .await
            .expect("allowed driver config is accepted");
    }

    #[tokio::test]
    async fn driver_config_is_refused_unless_allowed() {
        let config = prost_types::Struct {
            fields: [("x".to_owned(), prost_types::Value::default())]
                .into_iter()
                .collect(),
        };
        refused(
            admit(&quick(), with_template(|t| t.driver_config = Some(config))).await,
            tonic::Code::FailedPrecondition,
            "caller driver config is disabled",
        );
        // An empty Struct is no driver config.
        admit(
            &quick(),
            with_template(|t| t.driver_config = Some(prost_types::Struct::default())),
        )
        .await
        .expect("empty driver config");
    }

    #[tokio::test]
    async fn authenticate_is_unimplemented() {
        let status = quick()
            .authenticate_sandbox(Request::new(AuthenticateSandboxRequest {
                credential: "c".into(),
            }))
            .await
            .expect_err("not offered");
        assert_eq!(status.code(), tonic::Code::Unimplemented);
        assert!(
            status
                .message()
                .contains("supports_sandbox_authentication is false")
        );
    }

    #[tokio::test]
    async fn create_and_start_report_the_same_runtime_identity() {
        let driver = quick();
        let mut s = sandbox("s1", "one");
        if let Some(spec) = s.spec.as_mut() {
            spec.launch_authentication = b"bundle".to_vec();
        }
        let created = driver
            .create_sandbox(Request::new(CreateSandboxRequest { sandbox: Some(s) }))
            .await
            .expect("launch authentication is accepted")
            .into_inner();
        assert!(!created.runtime_identity.is_empty());
        driver
            .stop_sandbox(Request::new(StopSandboxRequest {
                sandbox_id: "s1".into(),
                ..Default::default()
            }))
            .await
            .expect("stop");
        let started = driver
            .start_sandbox(Request::new(StartSandboxRequest {
                sandbox_id: "s1".into(),
                launch_authentication: b"fresh".to_vec(),
                ..Default::default()
            }))
            .await
            .expect("start")
            .into_inner();
        assert_eq!(started.runtime_identity, created.runtime_identity);
        let other = driver
            .create_sandbox(Request::new(CreateSandboxRequest {
                sandbox: Some(sandbox("s2", "two")),
            }))
            .await
            .expect("second")
            .into_inner();
        assert_ne!(other.runtime_identity, created.runtime_identity);
    }

    /// The instant both encodings of a condition's time denote, in ms.
    fn both_times_ms(condition: &DriverCondition) -> (i128, i128) {
        let text = openshell_wire::time::parse_rfc3339(&condition.last_transition_time)
            .expect("RFC 3339 text");
        let text_ms = text
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after the epoch")
            .as_millis();
        let ts = condition.transition_time.expect("Timestamp");
        let ts_ms = i128::from(ts.seconds) * 1000 + i128::from(ts.nanos) / 1_000_000;
        (i128::try_from(text_ms).expect("fits"), ts_ms)
    }

    #[tokio::test]
    async fn conditions_and_events_carry_both_time_encodings() {
        let driver = TestDriver::new(Behaviour {
            provision_delay: Duration::from_millis(1),
            platform_events: true,
            ..Behaviour::default()
        });
        let mut watch = driver
            .watch_sandboxes(Request::new(WatchSandboxesRequest {}))
            .await
            .expect("watch")
            .into_inner();
        driver
            .create_sandbox(Request::new(CreateSandboxRequest {
                sandbox: Some(sandbox("s1", "one")),
            }))
            .await
            .expect("create");
        // Events published before the watch subscribed are not replayed, so
        // wait for Running, then stop: the Stopped event is then certain.
        let mut stopping = false;
        let mut conditions = 0;
        loop {
            match next(&mut watch).await {
                Payload::Sandbox(s) => {
                    let status = s.sandbox.and_then(|s| s.status).expect("status");
                    for condition in &status.conditions {
                        let (text, ts) = both_times_ms(condition);
                        assert_eq!(text, ts, "{condition:?}");
                        assert_eq!(
                            contract::condition_time(condition),
                            openshell_wire::time::parse_rfc3339(&condition.last_transition_time),
                            "{condition:?}"
                        );
                        conditions += 1;
                    }
                    if !stopping && status.conditions.iter().any(|c| c.reason == "Running") {
                        stopping = true;
                        driver
                            .stop_sandbox(Request::new(StopSandboxRequest {
                                sandbox_id: "s1".into(),
                                ..Default::default()
                            }))
                            .await
                            .expect("stop");
                    }
                }
                Payload::PlatformEvent(e) => {
                    let event = e.event.expect("event");
                    let at = event.event_time.expect("event_time");
                    assert_eq!(
                        i128::from(event.timestamp_ms),
                        i128::from(at.seconds) * 1000 + i128::from(at.nanos) / 1_000_000
                    );
                    if event.reason == "Stopped" {
                        break;
                    }
                }
                Payload::Deleted(_) => panic!("nothing was deleted"),
            }
        }
        // Running, then Stopped's two conditions, at least.
        assert!(conditions >= 3, "{conditions}");
    }

    #[tokio::test]
    async fn malformed_sandboxes_are_refused_by_validate_and_create() {
        let driver = quick();
        let mut no_spec = sandbox("s1", "one");
        no_spec.spec = None;
        refused(
            admit(&driver, no_spec).await,
            tonic::Code::InvalidArgument,
            "no spec",
        );
        refused(
            admit(&driver, sandbox("s1", "")).await,
            tonic::Code::InvalidArgument,
            "name is required",
        );
        refused(
            admit(&driver, sandbox("s1", "a\u{1b}[31mb")).await,
            tonic::Code::InvalidArgument,
            "control characters",
        );
        for bad in [
            "Upper",
            "-lead",
            "trail-",
            "dot.ted",
            "under_score",
            "sp ace",
        ] {
            refused(
                admit(&driver, sandbox("s1", bad)).await,
                tonic::Code::InvalidArgument,
                "DNS label",
            );
        }
        let long = "a".repeat(400);
        let message = refused(
            admit(&driver, sandbox("s1", &long)).await,
            tonic::Code::InvalidArgument,
            "400 bytes",
        );
        assert!(message.len() < 250, "input echoed in full: {message}");
        for good in ["a", "0", "a-b", "sandbox-1", &"a".repeat(63)] {
            let fresh = quick();
            admit(&fresh, sandbox("s1", good))
                .await
                .unwrap_or_else(|e| panic!("{good}: {e}"));
        }
    }

    #[tokio::test]
    async fn malformed_quantities_are_refused() {
        let driver = quick();
        let huge = format!("1{}", "x".repeat(300));
        for (field, bad) in [
            ("cpu_limit", "NaN"),
            ("cpu_request", "-1"),
            ("memory_limit", "lots"),
            ("memory_request", "1.2.3Gi"),
            ("cpu_limit", "1e"),
            ("memory_limit", huge.as_str()),
        ] {
            let mut resources = DriverResourceRequirements::default();
            match field {
                "cpu_limit" => resources.cpu_limit = bad.into(),
                "cpu_request" => resources.cpu_request = bad.into(),
                "memory_limit" => resources.memory_limit = bad.into(),
                _ => resources.memory_request = bad.into(),
            }
            let message = refused(
                admit(&driver, with_template(|t| t.resources = Some(resources))).await,
                tonic::Code::InvalidArgument,
                field,
            );
            assert!(message.len() < 300, "input echoed in full: {message}");
        }
        let good = DriverResourceRequirements {
            cpu_request: "500m".into(),
            cpu_limit: "1.5".into(),
            memory_request: "512Mi".into(),
            memory_limit: "1e9".into(),
        };
        admit(&driver, with_template(|t| t.resources = Some(good)))
            .await
            .expect("well-formed quantities");
    }

    #[tokio::test]
    async fn gpu_requests_are_a_failed_precondition() {
        let mut s = sandbox("s1", "one");
        if let Some(spec) = s.spec.as_mut() {
            spec.resource_requirements = Some(ResourceRequirements {
                gpu: Some(GpuResourceRequirements { count: Some(1) }),
            });
        }
        refused(
            admit(&quick(), s).await,
            tonic::Code::FailedPrecondition,
            "GPU",
        );
    }

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

    async fn next(stream: &mut BoxStream<WatchSandboxesEvent>) -> Payload {
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
                sandbox: Some(sandbox("s1", "one")),
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
