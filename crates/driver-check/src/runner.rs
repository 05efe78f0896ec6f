//! Runs the checks against one driver socket.

use std::collections::BTreeSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use openshell_driver_kit::contract::{
    self, AdmissionPolicy, Generation, PROTOCOL_MAJOR, condition_time, negotiate, peer_metadata,
};
use openshell_proto::compute::logs::v1::StreamLogsRequest;
use openshell_proto::compute::logs::v1::sandbox_logs_client::SandboxLogsClient;
use openshell_proto::compute::v1::compute_driver_client::ComputeDriverClient;
use openshell_proto::compute::v1::{
    CreateSandboxRequest, DeleteSandboxRequest, DriverResourceRequirements, DriverSandbox,
    DriverSandboxSpec, DriverSandboxTemplate, GetCapabilitiesRequest, GetCapabilitiesResponse,
    GetSandboxRequest, GpuResourceRequirements, ListSandboxesRequest, ResourceRequirements,
    StartSandboxRequest, StopSandboxRequest, ValidateSandboxCreateRequest, WatchSandboxesEvent,
    watch_sandboxes_event,
};
use openshell_proto::extension::v1::ProtocolVersion;
use openshell_wire::limits;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Response, Status};

use crate::CheckError;
use crate::catalog::{self, Requirement, Selection};
use crate::report::{CheckResult, Outcome, Report, Verdict};
use crate::watch::Watcher;

/// The implementation name this checker sends as a 1.x gateway.
pub const GATEWAY_NAME: &str = "openshell/driver-check";

/// Prefix of every sandbox id and name a run creates.
pub const NAME_PREFIX: &str = "conformance-";

/// What to run and how long to wait.
#[derive(Debug, Clone)]
pub struct Options {
    pub socket: PathBuf,
    /// Image for the sandboxes the run creates; empty means the driver's
    /// default.
    pub image: String,
    /// Main process argv for those sandboxes; empty means the driver's
    /// default.
    pub command: Vec<String>,
    pub selection: Selection,
    /// How long a sandbox may take to show a state (Ready, stopped, gone),
    /// and a watch to deliver an event.
    pub ready_timeout: Duration,
    /// How long one unary call may take.
    pub call_timeout: Duration,
    /// Keep running after a required check failed.
    pub keep_going: bool,
    /// The operator says the driver has GPUs (v0.0.111 drivers cannot say
    /// so themselves), so `reject-gpu` does not apply.
    pub driver_has_gpu: bool,
}

/// The name of a status code as the gRPC spec spells it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// "OK", or the code and the driver's message, for reasons.
fn got<T>(result: &Result<T, Status>) -> String {
    match result {
        Ok(_) => "OK".to_owned(),
        Err(status) => describe(status),
    }
}

fn describe(status: &Status) -> String {
    let message = contract::truncate(status.message(), 160);
    if message.is_empty() {
        code_name(status.code()).to_owned()
    } else {
        format!("{} ({message})", code_name(status.code()))
    }
}

fn code_of<T>(result: &Result<T, Status>) -> Code {
    match result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

fn codes_text(codes: &[Code]) -> String {
    codes
        .iter()
        .map(|c| code_name(*c))
        .collect::<Vec<_>>()
        .join(" or ")
}

/// The status of the sandbox's "Ready" condition, if it has one.
pub fn ready_status(sandbox: &DriverSandbox) -> Option<&str> {
    sandbox
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.r#type == "Ready")
        .map(|c| c.status.as_str())
}

fn is_ready(sandbox: &DriverSandbox) -> bool {
    ready_status(sandbox) == Some("True")
}

fn ready_text(sandbox: &DriverSandbox) -> String {
    match ready_status(sandbox) {
        Some(status) => format!("Ready={status}"),
        None => "no Ready condition".to_owned(),
    }
}

/// The ids of the sandboxes a run created, shared with the Ctrl-C handler
/// so it can remove them.
#[derive(Debug, Clone, Default)]
pub struct Tracker(Arc<Mutex<BTreeSet<String>>>);

impl Tracker {
    fn add(&self, id: &str) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.to_owned());
    }

    fn forget(&self, id: &str) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }

    pub fn ids(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }
}

/// Checks that `socket` is there and is a socket, then connects to it.
pub async fn connect(socket: &Path, timeout: Duration) -> Result<Channel, CheckError> {
    use std::os::unix::fs::FileTypeExt as _;
    let meta = std::fs::metadata(socket).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            CheckError::SocketMissing(socket.to_owned())
        } else {
            CheckError::Connect {
                socket: socket.display().to_string(),
                reason: e.to_string(),
            }
        }
    })?;
    if !meta.file_type().is_socket() {
        return Err(CheckError::NotASocket(socket.to_owned()));
    }
    openshell_wire::uds::connect(socket, openshell_wire::DialPolicy::within(timeout))
        .await
        .map_err(|e| CheckError::Connect {
            socket: socket.display().to_string(),
            reason: e.last_error,
        })
}

/// Awaits a unary call for at most `limit`.
async fn bounded<T>(
    limit: Duration,
    call: impl Future<Output = Result<Response<T>, Status>>,
) -> Result<T, Status> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result.map(Response::into_inner),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no answer within the call timeout ({}s)",
            limit.as_secs_f64()
        ))),
    }
}

/// Deletes every sandbox in `tracker`; returns the ids it could not
/// delete, with why.
pub async fn remove_all(
    client: &ComputeDriverClient<Channel>,
    tracker: &Tracker,
    limit: Duration,
) -> Vec<String> {
    let mut problems = Vec::new();
    for id in tracker.ids() {
        let result = bounded(
            limit,
            client.clone().delete_sandbox(DeleteSandboxRequest {
                sandbox_id: id.clone(),
                sandbox_name: String::new(),
            }),
        )
        .await;
        match result {
            Ok(_) => tracker.forget(&id),
            Err(status) => problems.push(format!("{id}: {}", describe(&status))),
        }
    }
    problems
}

/// What a run learned from GetCapabilities.
#[derive(Debug, Default)]
struct Capabilities {
    /// The answer to a 1.x gateway, else to a v0.0.111 gateway.
    answer: Option<GetCapabilitiesResponse>,
    generation: Option<Generation>,
}

pub struct Runner {
    client: ComputeDriverClient<Channel>,
    logs: SandboxLogsClient<Channel>,
    opts: Options,
    run_id: String,
    serial: u32,
    tracker: Tracker,
    report: Report,
    caps: Capabilities,
    /// A required check failed and --keep-going was not given.
    halted: bool,
    /// Why ValidateSandboxCreate refused the well-formed sandbox, if it did.
    good_refused: Option<String>,
}

/// Every check that needs the run's main sandbox.
const NEEDS_SANDBOX: &[&str] = &[
    "create-ready",
    "list-ready",
    "watch-ready",
    "create-duplicate",
    "condition-time",
    "condition-time-both",
    "watch-snapshot",
    "logs-service",
    "stop",
    "stop-twice",
    "start",
    "delete",
    "watch-deleted",
    "watch-concurrent",
];

impl Runner {
    pub fn new(channel: Channel, opts: Options) -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let seed = now.as_nanos() ^ (u128::from(std::process::id()) << 32);
        let run_id = format!("{:08x}", seed & 0xffff_ffff);
        Self {
            // The gateway's limits: a driver's ListSandboxes reply may be
            // as large as gRPC can frame, everything else 16 MiB.
            client: ComputeDriverClient::new(channel.clone())
                .max_decoding_message_size(limits::MAX_DRIVER_LIST_BYTES)
                .max_encoding_message_size(limits::MAX_MESSAGE_BYTES),
            logs: SandboxLogsClient::new(channel)
                .max_decoding_message_size(limits::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(limits::MAX_MESSAGE_BYTES),
            opts,
            run_id,
            serial: 0,
            tracker: Tracker::default(),
            report: Report::default(),
            caps: Capabilities::default(),
            halted: false,
            good_refused: None,
        }
    }

    /// The ids this run created and has not yet removed.
    pub fn tracker(&self) -> Tracker {
        self.tracker.clone()
    }

    pub fn client(&self) -> ComputeDriverClient<Channel> {
        self.client.clone()
    }

    /// The prefix of this run's sandbox ids.
    pub fn run_prefix(&self) -> String {
        format!("{NAME_PREFIX}{}-", self.run_id)
    }

    fn fresh_id(&mut self, what: &str) -> String {
        self.serial += 1;
        format!("{}{what}-{}", self.run_prefix(), self.serial)
    }

    fn c(&self) -> ComputeDriverClient<Channel> {
        self.client.clone()
    }

    fn limit(&self) -> Duration {
        self.opts.call_timeout
    }

    fn required(&self, requirement: Requirement) -> bool {
        match requirement {
            Requirement::Always => true,
            Requirement::OneX => self.caps.generation == Some(Generation::V1),
            Requirement::Optional => false,
        }
    }

    /// Whether to run the check `id`; records a SKIP when the run has
    /// halted.
    fn gate(&mut self, id: &'static str) -> bool {
        if !self.opts.selection.includes(id) {
            return false;
        }
        if self.halted {
            self.record(
                id,
                Instant::now(),
                Verdict::skip(
                    "not run: an earlier required check failed (--keep-going runs the rest)",
                ),
            );
            return false;
        }
        true
    }

    fn record(&mut self, id: &'static str, started: Instant, verdict: Verdict) {
        let Some(check) = catalog::find(id) else {
            return;
        };
        let required = self.required(check.requirement);
        if required && verdict.outcome == Outcome::Fail && !self.opts.keep_going {
            self.halted = true;
        }
        self.report.results.push(CheckResult {
            id: id.to_owned(),
            title: check.title.to_owned(),
            required,
            outcome: verdict.outcome,
            reason: verdict.reason,
            elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        });
    }

    /// Runs the check `id` when selected and records its verdict.
    async fn run_check(&mut self, id: &'static str, check: impl AsyncFnOnce(&mut Self) -> Verdict) {
        if !self.gate(id) {
            return;
        }
        let started = Instant::now();
        let verdict = check(self).await;
        self.record(id, started, verdict);
    }

    fn sandbox(&self, id: &str) -> DriverSandbox {
        DriverSandbox {
            id: id.to_owned(),
            name: id.to_owned(),
            spec: Some(DriverSandboxSpec {
                command: self.opts.command.clone(),
                template: Some(DriverSandboxTemplate {
                    image: self.opts.image.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Runs every selected check, then removes what the run created.
    pub async fn run(mut self) -> Report {
        self.capabilities().await;
        self.validation().await;
        if self.opts.selection.any(NEEDS_SANDBOX) {
            self.lifecycle().await;
        } else {
            self.unknown_ids().await;
        }
        self.cleanup().await;
        self.report
    }

    // ----- capabilities -------------------------------------------------

    async fn get_capabilities(
        &self,
        gateway: Option<openshell_proto::extension::v1::PeerMetadata>,
    ) -> Result<GetCapabilitiesResponse, Status> {
        bounded(
            self.limit(),
            self.c()
                .get_capabilities(GetCapabilitiesRequest { gateway }),
        )
        .await
    }

    fn ours() -> openshell_proto::extension::v1::PeerMetadata {
        peer_metadata(GATEWAY_NAME, env!("CARGO_PKG_VERSION"), &[])
    }

    async fn capabilities(&mut self) {
        let started = Instant::now();
        let v0 = self.get_capabilities(None).await;
        let v1 = self.get_capabilities(Some(Self::ours())).await;
        let answer = v1.as_ref().ok().or(v0.as_ref().ok()).cloned();
        let generation = answer.as_ref().map(|a| {
            if a.extension.is_some() {
                Generation::V1
            } else {
                Generation::V0
            }
        });
        self.caps = Capabilities { answer, generation };
        let verdict = match (&v0, &v1, generation) {
            (Ok(_), Ok(_), Some(generation)) => Verdict::pass(format!(
                "answers both gateway generations; the driver speaks {}{}",
                generation.label(),
                self.driver_label()
            )),
            (Err(status), Ok(_), Some(Generation::V1))
                if status.code() == Code::FailedPrecondition =>
            {
                Verdict::pass(format!(
                    "the driver speaks 1.x{} and refuses v0.0.111 gateways (no metadata) with FAILED_PRECONDITION",
                    self.driver_label()
                ))
            }
            _ => {
                let mut problems = Vec::new();
                if v0.is_err() {
                    problems.push(format!(
                        "without gateway metadata: expected OK, got {}",
                        got(&v0)
                    ));
                }
                if v1.is_err() {
                    problems.push(format!(
                        "with 1.x gateway metadata: expected OK, got {}",
                        got(&v1)
                    ));
                }
                Verdict::fail(problems.join("; "))
            }
        };
        if self.opts.selection.includes("capabilities") {
            self.record("capabilities", started, verdict);
        } else if verdict.outcome == Outcome::Fail && !self.opts.keep_going {
            // Nothing else can be trusted to work either.
            self.halted = true;
        }

        self.run_check("negotiation", async |s: &mut Self| s.negotiation().await)
            .await;
        self.run_check("admission-policy", async |s: &mut Self| {
            s.admission_policy().await
        })
        .await;
        self.run_check("major-mismatch", async |s: &mut Self| {
            s.major_mismatch().await
        })
        .await;
    }

    fn driver_label(&self) -> String {
        match &self.caps.answer {
            Some(a) if !a.driver_name.is_empty() => {
                format!(" (driver {:?} {})", a.driver_name, a.driver_version)
            }
            _ => String::new(),
        }
    }

    /// SKIP for drivers that are not 1.x.
    fn needs_one_x(&self) -> Option<Verdict> {
        match self.caps.generation {
            Some(Generation::V1) => None,
            Some(Generation::V0) => Some(Verdict::skip(
                "the driver speaks v0.0.111 (no extension metadata); this applies to 1.x drivers",
            )),
            None => Some(Verdict::skip(
                "GetCapabilities did not answer, so the generation is unknown",
            )),
        }
    }

    async fn negotiation(&mut self) -> Verdict {
        if let Some(skip) = self.needs_one_x() {
            return skip;
        }
        let extension = self.caps.answer.as_ref().and_then(|a| a.extension.as_ref());
        match negotiate("the driver", &Self::ours(), extension) {
            Ok(done) => Verdict::pass(format!(
                "protocol {}.{}, implementation {:?} {:?}, capabilities {}",
                done.version.0,
                done.version.1,
                done.implementation_name,
                done.implementation_version,
                done.capabilities.join(", ")
            )),
            Err(error) => Verdict::fail(error.to_string()),
        }
    }

    async fn admission_policy(&mut self) -> Verdict {
        if let Some(skip) = self.needs_one_x() {
            return skip;
        }
        let first = self
            .caps
            .answer
            .as_ref()
            .map(|a| a.resource_admission_policy.clone())
            .unwrap_or_default();
        if let Err(error) = AdmissionPolicy::decode(&first) {
            return Verdict::fail(format!(
                "expected \"v1:\" and the policy as JSON, got: {error}"
            ));
        }
        match self.get_capabilities(Some(Self::ours())).await {
            Ok(again) if again.resource_admission_policy == first => {
                Verdict::pass(format!("{first} (identical on a second call)"))
            }
            Ok(again) => Verdict::fail(format!(
                "expected the same bytes on every call (gateways compare them before each create), got {:?} then {:?}",
                contract::truncate(&first, 120),
                contract::truncate(&again.resource_admission_policy, 120)
            )),
            Err(status) => Verdict::fail(format!(
                "second GetCapabilities: expected OK, got {}",
                describe(&status)
            )),
        }
    }

    async fn major_mismatch(&mut self) -> Verdict {
        if let Some(skip) = self.needs_one_x() {
            return skip;
        }
        let mut theirs = Self::ours();
        theirs.protocol_version = Some(ProtocolVersion {
            major: PROTOCOL_MAJOR + 1,
            minor: 0,
        });
        let result = self.get_capabilities(Some(theirs)).await;
        if code_of(&result) == Code::FailedPrecondition {
            Verdict::pass(format!(
                "gateway protocol {}.0 refused: {}",
                PROTOCOL_MAJOR + 1,
                got(&result)
            ))
        } else {
            Verdict::fail(format!(
                "gateway metadata with protocol {}.0: expected FAILED_PRECONDITION, got {}",
                PROTOCOL_MAJOR + 1,
                got(&result)
            ))
        }
    }

    // ----- validation ---------------------------------------------------

    async fn validation(&mut self) {
        if self.halted {
            for check in catalog::CHECKS {
                if check.id == "validate-good" || check.id.starts_with("reject-") {
                    self.gate(check.id);
                }
            }
            return;
        }
        // The bad sandboxes are this one with one thing broken, so whether
        // the driver accepts it decides what their refusals prove.
        let started = Instant::now();
        let id = self.fresh_id("valid");
        let good = bounded(
            self.limit(),
            self.c()
                .validate_sandbox_create(ValidateSandboxCreateRequest {
                    sandbox: Some(self.sandbox(&id)),
                }),
        )
        .await;
        self.good_refused = good.as_ref().err().map(describe);
        if self.gate("validate-good") {
            let verdict = match &self.good_refused {
                None => Verdict::pass("a sandbox with an id, a name and a spec validates OK"),
                Some(got) => Verdict::fail(format!(
                    "expected OK for a well-formed sandbox, got {got}{}",
                    if self.opts.image.is_empty() {
                        "; if the driver needs an image, pass --image"
                    } else {
                        ""
                    }
                )),
            };
            self.record("validate-good", started, verdict);
        }

        const INVALID: &[Code] = &[Code::InvalidArgument];
        self.reject("reject-missing-sandbox", INVALID, |_| None)
            .await;
        self.reject("reject-missing-spec", INVALID, |mut s| {
            s.spec = None;
            Some(s)
        })
        .await;
        self.reject("reject-empty-name", INVALID, |mut s| {
            s.name.clear();
            Some(s)
        })
        .await;
        self.reject("reject-control-name", INVALID, |mut s| {
            s.name.push_str("\tbad\n");
            Some(s)
        })
        .await;
        for (id, cpu, memory) in [
            ("reject-nan-cpu", "NaN", ""),
            ("reject-negative-cpu", "-1", ""),
            ("reject-nan-memory", "", "NaN"),
            ("reject-negative-memory", "", "-1Gi"),
        ] {
            self.reject(id, INVALID, |mut s| {
                if let Some(template) = s.spec.as_mut().and_then(|spec| spec.template.as_mut()) {
                    template.resources = Some(DriverResourceRequirements {
                        cpu_request: cpu.to_owned(),
                        cpu_limit: cpu.to_owned(),
                        memory_request: memory.to_owned(),
                        memory_limit: memory.to_owned(),
                    });
                }
                Some(s)
            })
            .await;
        }
        if let Some(why) = self.gpu_supported() {
            self.run_check("reject-gpu", async move |_: &mut Self| Verdict::skip(why))
                .await;
        } else {
            self.reject(
                "reject-gpu",
                &[Code::InvalidArgument, Code::FailedPrecondition],
                |mut s| {
                    if let Some(spec) = s.spec.as_mut() {
                        spec.resource_requirements = Some(ResourceRequirements {
                            gpu: Some(GpuResourceRequirements { count: Some(1) }),
                        });
                    }
                    Some(s)
                },
            )
            .await;
        }
    }

    /// Why the GPU refusal does not apply, when it does not.
    fn gpu_supported(&self) -> Option<String> {
        if self.opts.driver_has_gpu {
            return Some("--driver-has-gpu: the operator says this driver has GPUs".to_owned());
        }
        let gpu = self
            .caps
            .answer
            .as_ref()
            .and_then(|a| a.resource_capabilities.as_ref())
            .and_then(|r| r.gpu.as_ref())?;
        (gpu.default_selection_supported || gpu.count_selection_supported)
            .then(|| "the driver advertises GPU selection in resource_capabilities".to_owned())
    }

    /// Sends the sandbox `bad` makes from a good one to ValidateSandboxCreate
    /// and CreateSandbox; both must answer one of `expected`.
    async fn reject(
        &mut self,
        id: &'static str,
        expected: &'static [Code],
        bad: impl FnOnce(DriverSandbox) -> Option<DriverSandbox>,
    ) {
        self.run_check(id, async move |s: &mut Self| {
            let sandbox_id = s.fresh_id("invalid");
            let sandbox = bad(s.sandbox(&sandbox_id));
            if sandbox.is_some()
                && let Some(why) = &s.good_refused
            {
                return Verdict::skip(format!(
                    "the well-formed sandbox this one is derived from is refused too ({why}), so a refusal here proves nothing; see validate-good"
                ));
            }
            let validated = bounded(
                s.limit(),
                s.c().validate_sandbox_create(ValidateSandboxCreateRequest {
                    sandbox: sandbox.clone(),
                }),
            )
            .await;
            // Tracked before the call, so an interrupt cannot leave it behind.
            s.tracker.add(&sandbox_id);
            let created = bounded(
                s.limit(),
                s.c().create_sandbox(CreateSandboxRequest { sandbox }),
            )
            .await;
            if created.is_ok() {
                // Accepted by mistake: remove it again.
                let _ = remove_all(&s.c(), &s.tracker, s.limit()).await;
            } else {
                s.tracker.forget(&sandbox_id);
            }
            let mut wrong = Vec::new();
            for (rpc, result) in [
                ("ValidateSandboxCreate", got(&validated)),
                ("CreateSandbox", got(&created)),
            ] {
                let code = if rpc == "CreateSandbox" {
                    code_of(&created)
                } else {
                    code_of(&validated)
                };
                if !expected.contains(&code) {
                    wrong.push(format!(
                        "{rpc}: expected {}, got {result}",
                        codes_text(expected)
                    ));
                }
            }
            if wrong.is_empty() {
                Verdict::pass(format!(
                    "ValidateSandboxCreate and CreateSandbox refused it: {}",
                    got(&validated)
                ))
            } else {
                Verdict::fail(wrong.join("; "))
            }
        })
        .await;
    }

    // ----- lifecycle ----------------------------------------------------

    async fn get(&self, id: &str) -> Result<DriverSandbox, Status> {
        let answer = bounded(
            self.limit(),
            self.c().get_sandbox(GetSandboxRequest {
                sandbox_id: id.to_owned(),
                sandbox_name: String::new(),
            }),
        )
        .await?;
        answer
            .sandbox
            .ok_or_else(|| Status::internal("GetSandbox answered OK without a sandbox"))
    }

    /// Polls GetSandbox until `done` holds or the ready timeout passes.
    /// On timeout the error describes the last answer.
    async fn poll(
        &self,
        id: &str,
        done: impl Fn(&Result<DriverSandbox, Status>) -> bool,
        describe_last: impl Fn(&Result<DriverSandbox, Status>) -> String,
    ) -> Result<Result<DriverSandbox, Status>, String> {
        let deadline = Instant::now() + self.opts.ready_timeout;
        loop {
            let answer = self.get(id).await;
            if done(&answer) {
                return Ok(answer);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "not within the ready timeout ({}s); last GetSandbox: {}",
                    self.opts.ready_timeout.as_secs_f64(),
                    describe_last(&answer)
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn sandbox_state(answer: &Result<DriverSandbox, Status>) -> String {
        match answer {
            Ok(sandbox) => ready_text(sandbox),
            Err(status) => describe(status),
        }
    }

    async fn unknown_ids(&mut self) {
        self.run_check("get-unknown", async |s: &mut Self| {
            let id = s.fresh_id("unknown");
            match s.get(&id).await {
                Err(status) if status.code() == Code::NotFound => {
                    Verdict::pass("GetSandbox of an id never created: NOT_FOUND")
                }
                other => Verdict::fail(format!(
                    "GetSandbox of an id never created: expected NOT_FOUND, got {}",
                    got(&other)
                )),
            }
        })
        .await;
        self.run_check("delete-unknown", async |s: &mut Self| {
            let id = s.fresh_id("unknown");
            let result = bounded(
                s.limit(),
                s.c().delete_sandbox(DeleteSandboxRequest {
                    sandbox_id: id,
                    sandbox_name: String::new(),
                }),
            )
            .await;
            match result {
                Ok(answer) if !answer.deleted => Verdict::pass("OK with deleted=false"),
                Ok(_) => Verdict::fail(
                    "DeleteSandbox of an id never created: expected OK with deleted=false, got OK with deleted=true",
                ),
                Err(status) => Verdict::fail(format!(
                    "DeleteSandbox of an id never created: expected OK with deleted=false, got {}",
                    describe(&status)
                )),
            }
        })
        .await;
    }

    async fn lifecycle(&mut self) {
        if self.halted {
            for id in NEEDS_SANDBOX
                .iter()
                .chain(&["get-unknown", "delete-unknown"])
            {
                self.gate(id);
            }
            return;
        }
        let id = self.fresh_id("main");
        // Opened before the create so it must report the sandbox's changes.
        let mut before = Watcher::open(self.c());

        let started = Instant::now();
        let mut ready = false;
        // Tracked before the call, so an interrupt cannot leave it behind.
        self.tracker.add(&id);
        let created = bounded(
            self.limit(),
            self.c().create_sandbox(CreateSandboxRequest {
                sandbox: Some(self.sandbox(&id)),
            }),
        )
        .await;
        let verdict = match &created {
            Err(status) => Verdict::fail(format!(
                "CreateSandbox of a well-formed sandbox: expected OK, got {}",
                describe(status)
            )),
            Ok(_) => {
                match self
                    .poll(&id, |a| a.as_ref().is_ok_and(is_ready), Self::sandbox_state)
                    .await
                {
                    Ok(Ok(sandbox)) if sandbox.id != id => Verdict::fail(format!(
                        "GetSandbox({id}) answered a sandbox with id {:?}",
                        sandbox.id
                    )),
                    Ok(_) => {
                        ready = true;
                        Verdict::pass("created; GetSandbox shows Ready=True")
                    }
                    Err(why) => Verdict::fail(format!("expected Ready=True in GetSandbox: {why}")),
                }
            }
        };
        if self.gate("create-ready") {
            self.record("create-ready", started, verdict);
        }
        let accepted = created.is_ok();
        let needs = |what: &str| {
            Verdict::skip(format!(
                "needs a Ready sandbox ({what}), and create-ready did not get one"
            ))
        };

        self.run_check("list-ready", async |s: &mut Self| {
            let id = id.clone();
            async move {
                if !ready {
                    return needs("to list");
                }
                match bounded(s.limit(), s.c().list_sandboxes(ListSandboxesRequest {})).await {
                    Ok(list) => match list.sandboxes.iter().find(|x| x.id == id) {
                        Some(x) if is_ready(x) => Verdict::pass(format!(
                            "listed as Ready=True among {} sandboxes",
                            list.sandboxes.len()
                        )),
                        Some(x) => Verdict::fail(format!(
                            "expected Ready=True in ListSandboxes, got {}",
                            ready_text(x)
                        )),
                        None => Verdict::fail(format!(
                            "expected {id} in ListSandboxes, got {} sandboxes without it",
                            list.sandboxes.len()
                        )),
                    },
                    Err(status) => Verdict::fail(format!(
                        "ListSandboxes: expected OK, got {}",
                        describe(&status)
                    )),
                }
            }
            .await
        })
        .await;

        let ready_deadline = |s: &Self| Instant::now() + s.opts.ready_timeout;
        self.run_check("watch-ready", async |s: &mut Self| {
            let id = id.clone();
            let before = &mut before;
            async move {
                if !accepted {
                    return needs("to watch");
                }
                let wanted = |e: &WatchSandboxesEvent| sandbox_in(e, &id).is_some_and(is_ready);
                match before.wait_for(ready_deadline(s), wanted).await {
                    Ok(()) => Verdict::pass("the watch reported the sandbox with Ready=True"),
                    Err(why) => Verdict::fail(format!(
                        "expected a sandbox event for {id} with Ready=True: {why}"
                    )),
                }
            }
            .await
        })
        .await;

        self.run_check("create-duplicate", async |s: &mut Self| {
            let id = id.clone();
            async move {
                if !accepted {
                    return needs("to create twice");
                }
                let again = bounded(
                    s.limit(),
                    s.c().create_sandbox(CreateSandboxRequest {
                        sandbox: Some(s.sandbox(&id)),
                    }),
                )
                .await;
                if code_of(&again) == Code::AlreadyExists {
                    Verdict::pass("second create: ALREADY_EXISTS")
                } else {
                    Verdict::fail(format!(
                        "second create with the same id: expected ALREADY_EXISTS, got {}",
                        got(&again)
                    ))
                }
            }
            .await
        })
        .await;

        self.unknown_ids().await;

        let current = if ready {
            self.get(&id).await.ok()
        } else {
            None
        };
        self.run_check("condition-time", async |_: &mut Self| {
            let current = current.clone();
            async move {
                let Some(sandbox) = current else {
                    return needs("with conditions");
                };
                condition_times(&sandbox)
            }
            .await
        })
        .await;
        self.run_check("condition-time-both", async |s: &mut Self| {
            let current = current.clone();
            async move {
                let Some(sandbox) = current else {
                    return needs("with conditions");
                };
                both_encodings(&sandbox, s.caps.generation == Some(Generation::V1))
            }
            .await
        })
        .await;

        let mut later = None;
        self.run_check("watch-snapshot", async |s: &mut Self| {
            let id = id.clone();
            let later = &mut later;
            async move {
                if !ready {
                    return needs("to be in the snapshot");
                }
                let watcher = later.insert(Watcher::open(s.c()));
                let wanted = |e: &WatchSandboxesEvent| sandbox_in(e, &id).is_some();
                match watcher.wait_for(ready_deadline(s), wanted).await {
                    Ok(()) => Verdict::pass(format!(
                        "the existing sandbox arrived as event {} of the new watch",
                        watcher.seen.len()
                    )),
                    Err(why) => Verdict::fail(format!(
                        "expected the existing sandbox {id} in the new watch's snapshot: {why}"
                    )),
                }
            }
            .await
        })
        .await;

        self.run_check("logs-service", async |s: &mut Self| {
            let id = id.clone();
            async move {
                if !ready {
                    return needs("to read logs of");
                }
                s.logs_service(id).await
            }
            .await
        })
        .await;

        self.stop_start(&id, ready).await;

        let mut deleted = false;
        self.run_check("delete", async |s: &mut Self| {
            let id = id.clone();
            let deleted = &mut deleted;
            async move {
                if !accepted {
                    return needs("to delete");
                }
                let result = bounded(
                    s.limit(),
                    s.c().delete_sandbox(DeleteSandboxRequest {
                        sandbox_id: id.clone(),
                        sandbox_name: String::new(),
                    }),
                )
                .await;
                match result {
                    Ok(answer) if answer.deleted => {}
                    Ok(_) => {
                        return Verdict::fail(
                            "DeleteSandbox of an existing sandbox: expected deleted=true, got deleted=false",
                        );
                    }
                    Err(status) => {
                        return Verdict::fail(format!(
                            "DeleteSandbox of an existing sandbox: expected OK with deleted=true, got {}",
                            describe(&status)
                        ));
                    }
                }
                *deleted = true;
                let gone = |a: &Result<DriverSandbox, Status>| {
                    a.as_ref().is_err_and(|s| s.code() == Code::NotFound)
                };
                match s.poll(&id, gone, Self::sandbox_state).await {
                    Ok(_) => {
                        s.tracker.forget(&id);
                        Verdict::pass("deleted=true, then GetSandbox: NOT_FOUND")
                    }
                    Err(why) => Verdict::fail(format!(
                        "after deleted=true expected NOT_FOUND from GetSandbox: {why}"
                    )),
                }
            }
            .await
        })
        .await;

        let is_deleted = |id: &str| {
            let id = id.to_owned();
            move |e: &WatchSandboxesEvent| matches!(&e.payload, Some(watch_sandboxes_event::Payload::Deleted(d)) if d.sandbox_id == id)
        };
        self.run_check("watch-deleted", async |s: &mut Self| {
            let id = id.clone();
            let before = &mut before;
            async move {
                if !deleted {
                    return Verdict::skip("needs a sandbox deleted by the delete check");
                }
                match before.wait_for(ready_deadline(s), is_deleted(&id)).await {
                    Ok(()) => Verdict::pass("the watch reported a deleted event"),
                    Err(why) => Verdict::fail(format!("expected a deleted event for {id}: {why}")),
                }
            }
            .await
        })
        .await;
        self.run_check("watch-concurrent", async |s: &mut Self| {
            let id = id.clone();
            async move {
                if !deleted {
                    return Verdict::skip("needs a sandbox deleted by the delete check");
                }
                let Some(watcher) = later.as_mut() else {
                    return Verdict::skip("needs the second watch that watch-snapshot opens");
                };
                match watcher.wait_for(ready_deadline(s), is_deleted(&id)).await {
                    Ok(()) => Verdict::pass("the second watcher reported the deletion too"),
                    Err(why) => Verdict::fail(format!(
                        "expected the second watcher to report {id} deleted: {why}"
                    )),
                }
            }
            .await
        })
        .await;
    }

    async fn logs_service(&self, id: String) -> Verdict {
        let opened = bounded(
            self.limit(),
            self.logs.clone().stream_logs(StreamLogsRequest {
                sandbox_id: id,
                sandbox_name: String::new(),
                follow: false,
                tail_lines: 20,
            }),
        )
        .await;
        let mut stream = match opened {
            Ok(stream) => stream,
            Err(status) if status.code() == Code::Unimplemented => {
                return Verdict::skip("not offered (UNIMPLEMENTED): the gateway shows no logs");
            }
            Err(status) => {
                return Verdict::fail(format!(
                    "StreamLogs: expected OK or UNIMPLEMENTED, got {}",
                    describe(&status)
                ));
            }
        };
        let mut chunks = 0_usize;
        loop {
            match tokio::time::timeout(self.limit(), stream.message()).await {
                Ok(Ok(Some(_))) => chunks += 1,
                Ok(Ok(None)) => {
                    return Verdict::pass(format!("offered; {chunks} chunks of retained output"));
                }
                Ok(Err(status)) => {
                    return Verdict::fail(format!(
                        "StreamLogs broke after {chunks} chunks: {}",
                        describe(&status)
                    ));
                }
                Err(_) => {
                    return Verdict::fail(format!(
                        "StreamLogs without follow did not end within the call timeout ({chunks} chunks)"
                    ));
                }
            }
        }
    }

    async fn stop_start(&mut self, id: &str, ready: bool) {
        if !self.opts.selection.any(&["stop", "stop-twice", "start"]) {
            return;
        }
        let started = Instant::now();
        let (verdict, stopped) = if ready {
            self.stop(id).await
        } else {
            (
                Verdict::skip("needs a Ready sandbox to stop, and create-ready did not get one"),
                None,
            )
        };
        if self.gate("stop") {
            self.record("stop", started, verdict);
        }
        let unimplemented = stopped == Some(false);
        self.run_check("stop-twice", async |s: &mut Self| {
            let id = id.to_owned();
            async move {
                match stopped {
                    None => Verdict::skip("needs the stop check to have stopped the sandbox"),
                    Some(false) => Verdict::skip("StopSandbox is not implemented (UNIMPLEMENTED)"),
                    Some(true) => {
                        let again = bounded(
                            s.limit(),
                            s.c().stop_sandbox(StopSandboxRequest {
                                sandbox_id: id,
                                sandbox_name: String::new(),
                            }),
                        )
                        .await;
                        match again {
                            Ok(_) => Verdict::pass("second stop: OK"),
                            Err(status) => Verdict::fail(format!(
                                "second stop of a stopped sandbox: expected OK, got {}",
                                describe(&status)
                            )),
                        }
                    }
                }
            }
            .await
        })
        .await;
        self.run_check("start", async |s: &mut Self| {
            let id = id.to_owned();
            async move {
                if unimplemented {
                    return Verdict::skip("StopSandbox is not implemented (UNIMPLEMENTED), so there is nothing to start");
                }
                if stopped.is_none() {
                    return Verdict::skip("needs the stop check to have stopped the sandbox");
                }
                let result = bounded(
                    s.limit(),
                    s.c().start_sandbox(StartSandboxRequest {
                        sandbox_id: id.clone(),
                        ..Default::default()
                    }),
                )
                .await;
                match result {
                    Ok(_) => {}
                    Err(status) if status.code() == Code::Unimplemented => {
                        return Verdict::skip("StartSandbox is not implemented (UNIMPLEMENTED)");
                    }
                    Err(status) => {
                        return Verdict::fail(format!(
                            "StartSandbox of a stopped sandbox: expected OK, got {}",
                            describe(&status)
                        ));
                    }
                }
                match s
                    .poll(&id, |a| a.as_ref().is_ok_and(is_ready), Self::sandbox_state)
                    .await
                {
                    Ok(_) => Verdict::pass("started; GetSandbox shows Ready=True again"),
                    Err(why) => Verdict::fail(format!("after start expected Ready=True: {why}")),
                }
            }
            .await
        })
        .await;
    }

    /// Stops the sandbox. The flag says whether it stopped (false:
    /// UNIMPLEMENTED); `None` when it failed.
    async fn stop(&self, id: &str) -> (Verdict, Option<bool>) {
        let result = bounded(
            self.limit(),
            self.c().stop_sandbox(StopSandboxRequest {
                sandbox_id: id.to_owned(),
                sandbox_name: String::new(),
            }),
        )
        .await;
        match result {
            Ok(_) => {}
            Err(status) if status.code() == Code::Unimplemented => {
                return (
                    Verdict::skip("StopSandbox is not implemented (UNIMPLEMENTED)"),
                    Some(false),
                );
            }
            Err(status) => {
                return (
                    Verdict::fail(format!(
                        "StopSandbox of a Ready sandbox: expected OK, got {}",
                        describe(&status)
                    )),
                    None,
                );
            }
        }
        let stopped = |a: &Result<DriverSandbox, Status>| {
            a.as_ref()
                .is_ok_and(|s| ready_status(s).is_some_and(|r| r == "False"))
        };
        match self.poll(id, stopped, Self::sandbox_state).await {
            Ok(_) => (
                Verdict::pass("stopped; GetSandbox shows Ready=False"),
                Some(true),
            ),
            Err(why) => (
                Verdict::fail(format!("after stop expected Ready=False: {why}")),
                None,
            ),
        }
    }

    // ----- cleanup ------------------------------------------------------

    async fn cleanup(&mut self) {
        let started = Instant::now();
        let problems = remove_all(&self.client, &self.tracker, self.limit()).await;
        if !self.opts.selection.includes("cleanup") {
            return;
        }
        let prefix = self.run_prefix();
        let verdict = match bounded(
            self.limit(),
            self.c().list_sandboxes(ListSandboxesRequest {}),
        )
        .await
        {
            Ok(list) => {
                let left: Vec<&str> = list
                    .sandboxes
                    .iter()
                    .map(|s| s.id.as_str())
                    .filter(|id| id.starts_with(&prefix))
                    .collect();
                if left.is_empty() && problems.is_empty() {
                    Verdict::pass(format!("no sandbox named {prefix}* is left"))
                } else if left.is_empty() {
                    Verdict::fail(format!("deletes failed: {}", problems.join("; ")))
                } else {
                    Verdict::fail(format!(
                        "expected no sandbox of this run after deleting them, got {}{}",
                        left.join(", "),
                        if problems.is_empty() {
                            String::new()
                        } else {
                            format!(" (deletes failed: {})", problems.join("; "))
                        }
                    ))
                }
            }
            Err(status) => Verdict::fail(format!(
                "ListSandboxes after cleanup: expected OK, got {}",
                describe(&status)
            )),
        };
        // Cleanup runs and is reported even after a halt.
        self.halted = false;
        self.record("cleanup", started, verdict);
    }
}

/// The sandbox an event carries, if it is a sandbox event for `id`.
fn sandbox_in<'a>(event: &'a WatchSandboxesEvent, id: &str) -> Option<&'a DriverSandbox> {
    match event.payload.as_ref()? {
        watch_sandboxes_event::Payload::Sandbox(e) => e.sandbox.as_ref().filter(|s| s.id == id),
        _ => None,
    }
}

/// Every condition has a time a gateway can read; RFC 3339 text, when
/// present, must parse (v0.0.111 gateways read only that).
pub fn condition_times(sandbox: &DriverSandbox) -> Verdict {
    let conditions = sandbox
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    if conditions.is_empty() {
        return Verdict::fail("expected conditions in the sandbox status, got none");
    }
    let mut wrong = Vec::new();
    for c in conditions {
        let text = &c.last_transition_time;
        if !text.is_empty() && openshell_wire::time::parse_rfc3339(text).is_none() {
            wrong.push(format!(
                "condition {}: last_transition_time {:?} is not RFC 3339",
                c.r#type,
                contract::truncate(text, 60)
            ));
        } else if condition_time(c).is_none() {
            wrong.push(format!(
                "condition {}: no parseable time in last_transition_time (5) or transition_time (105)",
                c.r#type
            ));
        }
    }
    if wrong.is_empty() {
        Verdict::pass(format!(
            "{} conditions, each with a parseable time",
            conditions.len()
        ))
    } else {
        Verdict::fail(format!(
            "expected parseable transition times, got: {}",
            wrong.join("; ")
        ))
    }
}

/// Both time encodings present and naming the same instant (to the
/// millisecond, the precision of the text form). Missing encodings FAIL a
/// 1.x driver and SKIP a v0.0.111 one.
pub fn both_encodings(sandbox: &DriverSandbox, one_x: bool) -> Verdict {
    let conditions = sandbox
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let mut missing = Vec::new();
    let mut disagree = Vec::new();
    for c in conditions {
        let text = openshell_wire::time::parse_rfc3339(&c.last_transition_time);
        let stamp = c.transition_time.and_then(|_| condition_time(c));
        match (text, stamp) {
            (Some(a), Some(b)) => {
                let ms = |t: std::time::SystemTime| {
                    t.duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis())
                        .unwrap_or_default()
                };
                if ms(a) != ms(b) {
                    disagree.push(format!(
                        "condition {}: {:?} and the Timestamp differ",
                        c.r#type, c.last_transition_time
                    ));
                }
            }
            (None, Some(_)) => {
                missing.push(format!("condition {}: no RFC 3339 text (5)", c.r#type));
            }
            (Some(_), None) => missing.push(format!("condition {}: no Timestamp (105)", c.r#type)),
            (None, None) => missing.push(format!(
                "condition {}: neither a parseable RFC 3339 text (5) nor a Timestamp (105)",
                c.r#type
            )),
        }
    }
    if conditions.is_empty() {
        missing.push("no conditions".to_owned());
    }
    if !disagree.is_empty() {
        return Verdict::fail(format!(
            "expected one instant in both encodings, got: {}",
            disagree.join("; ")
        ));
    }
    if missing.is_empty() {
        return Verdict::pass("every condition carries fields 5 and 105, naming the same instant");
    }
    let text = missing.join("; ");
    if one_x {
        Verdict::fail(format!(
            "a 1.x driver must send both encodings (v0.0.111 gateways read 5, 1.x gateways 105), got: {text}"
        ))
    } else {
        Verdict::skip(format!(
            "v0.0.111 driver; both encodings are needed only by 1.x drivers: {text}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openshell_proto::compute::v1::{DriverCondition, DriverSandboxStatus};

    fn with(conditions: Vec<DriverCondition>) -> DriverSandbox {
        DriverSandbox {
            status: Some(DriverSandboxStatus {
                conditions,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn at() -> std::time::SystemTime {
        std::time::UNIX_EPOCH + Duration::from_millis(1_795_000_000_250)
    }

    #[test]
    fn epoch_text_is_not_a_condition_time() {
        let mut c = contract::condition("Ready", "True", "Running", "", at());
        c.transition_time = None;
        c.last_transition_time = "1795000000250".to_owned();
        let v = condition_times(&with(vec![c]));
        assert_eq!(v.outcome, Outcome::Fail);
        assert!(
            v.reason.contains("\"1795000000250\" is not RFC 3339"),
            "{}",
            v.reason
        );
    }

    #[test]
    fn either_encoding_is_a_condition_time() {
        let both = contract::condition("Ready", "True", "Running", "", at());
        let mut stamp_only = both.clone();
        stamp_only.last_transition_time.clear();
        let mut text_only = both.clone();
        text_only.transition_time = None;
        for c in [both, stamp_only, text_only] {
            assert_eq!(condition_times(&with(vec![c])).outcome, Outcome::Pass);
        }
        assert_eq!(condition_times(&with(vec![])).outcome, Outcome::Fail);
    }

    #[test]
    fn a_missing_encoding_fails_1x_and_skips_v0() {
        let both = contract::condition("Ready", "True", "Running", "", at());
        assert_eq!(
            both_encodings(&with(vec![both.clone()]), true).outcome,
            Outcome::Pass
        );
        let mut text_only = both.clone();
        text_only.transition_time = None;
        let v = both_encodings(&with(vec![text_only.clone()]), true);
        assert_eq!(v.outcome, Outcome::Fail);
        assert!(v.reason.contains("no Timestamp (105)"), "{}", v.reason);
        assert_eq!(
            both_encodings(&with(vec![text_only]), false).outcome,
            Outcome::Skip
        );
        let mut skewed = both;
        skewed.last_transition_time = openshell_wire::time::rfc3339(at() + Duration::from_secs(1));
        assert_eq!(
            both_encodings(&with(vec![skewed]), false).outcome,
            Outcome::Fail
        );
    }

    #[test]
    fn codes_are_named_as_in_the_grpc_spec() {
        assert_eq!(code_name(Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(
            codes_text(&[Code::InvalidArgument, Code::FailedPrecondition]),
            "INVALID_ARGUMENT or FAILED_PRECONDITION"
        );
        let r: Result<(), Status> = Err(Status::not_found("no such sandbox"));
        assert_eq!(got(&r), "NOT_FOUND (no such sandbox)");
        assert_eq!(got(&Ok::<(), Status>(())), "OK");
    }
}
