//! The `ComputeDriver` service on top of Podman.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use openshell_driver_kit::contract;
use openshell_driver_kit::{KeyLocks, WatchStream};
use openshell_proto::compute::v1::compute_driver_server::ComputeDriver;
use openshell_proto::compute::v1::{
    AuthenticateSandboxRequest, AuthenticateSandboxResponse, CreateSandboxRequest,
    CreateSandboxResponse, DeleteSandboxRequest, DeleteSandboxResponse, DeleteWorkspaceRequest,
    DeleteWorkspaceResponse, DriverSandbox, EnsureWorkspaceRequest, EnsureWorkspaceResponse,
    GetCapabilitiesRequest, GetCapabilitiesResponse, GetGatewayListenerRequirementsRequest,
    GetGatewayListenerRequirementsResponse, GetSandboxRequest, GetSandboxResponse,
    ListSandboxesRequest, ListSandboxesResponse, StartSandboxRequest, StartSandboxResponse,
    StopSandboxRequest, StopSandboxResponse, ValidateSandboxCreateRequest,
    ValidateSandboxCreateResponse, WatchSandboxesRequest,
};
use openshell_proto::extension::v1::PeerMetadata;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::config::PullPolicy;
use crate::core::Core;
use crate::engine::{Engine, explain_start_failure};
use crate::error::{Error, Result};
use crate::image;
use crate::podman::types::ImageInspect;
use crate::spec::{Plan, check_sandbox_id, create_body, plan};
use crate::state::{StartFailure, StateDir};
use crate::status::reason;
use crate::watch::Observer;

/// Name the driver reports for itself.
pub const DRIVER_NAME: &str = "openshell-driver-podman";

/// The implementation name in the driver's 1.x metadata.
pub const IMPLEMENTATION_NAME: &str = "openshell-compute-plane/podman";

/// The driver's 1.x negotiation metadata.
pub fn metadata() -> PeerMetadata {
    contract::peer_metadata(IMPLEMENTATION_NAME, env!("CARGO_PKG_VERSION"), &[])
}

/// How long the first full list of sandboxes may take at startup.
const FIRST_SYNC_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

pub(crate) type BoxStream<T> =
    Pin<Box<dyn Stream<Item = std::result::Result<T, Status>> + Send + 'static>>;

/// The driver. Cheap to clone; clones share everything.
#[derive(Debug, Clone)]
pub struct PodmanDriver {
    pub(crate) core: Arc<Core>,
    pub(crate) observer: Arc<Observer>,
    pub(crate) cancel: CancellationToken,
    /// One lock per sandbox id, so changes to one sandbox happen one at a
    /// time and in the order they arrived.
    pub(crate) locks: Arc<KeyLocks>,
}

impl PodmanDriver {
    /// Builds the driver on a connected engine and starts observing it.
    /// Returns once the first full list is taken, so a client that connects
    /// afterwards gets a complete picture at once.
    pub async fn open(
        settings: crate::config::Settings,
        engine: &Engine,
        cancel: CancellationToken,
    ) -> Result<Self> {
        let state = StateDir::load(&settings.state_dir).await?;
        let resync_every = if engine.info.host.event_logger == "none" {
            tracing::warn!(
                "the Podman engine records no events (events_logger = \"none\"); sandbox \
                 changes are noticed by polling every {:?}",
                crate::core::RESYNC_WITHOUT_EVENTS
            );
            crate::core::RESYNC_WITHOUT_EVENTS
        } else {
            crate::core::RESYNC_EVERY
        };
        let core = Arc::new(Core {
            settings,
            client: engine.client.clone(),
            ulimits: engine.ulimits.clone(),
            state,
            resync_every,
        });
        let (observer, commands) = Observer::new(Arc::clone(&core));
        tokio::spawn(Arc::clone(&observer).run(commands, cancel.clone()));
        if tokio::time::timeout(FIRST_SYNC_TIMEOUT, observer.wait_synced())
            .await
            .is_err()
        {
            cancel.cancel();
            return Err(Error::Timeout {
                what: format!(
                    "listing the sandboxes of driver '{}' on the Podman engine at {}",
                    core.settings.name,
                    core.client.socket().display()
                ),
                timeout: FIRST_SYNC_TIMEOUT,
            });
        }
        let driver = Self {
            core,
            observer,
            cancel,
            locks: KeyLocks::new(),
        };
        driver.forget_orphaned_state().await;
        Ok(driver)
    }

    /// Removes state kept for sandboxes whose containers are gone (deleted
    /// while the driver was not running).
    async fn forget_orphaned_state(&self) {
        let live: std::collections::BTreeSet<String> = self
            .observer
            .feed()
            .list()
            .into_iter()
            .map(|s| s.id)
            .collect();
        for id in self.core.state.known_ids() {
            if !live.contains(&id)
                && matches!(self.core.find(&id).await, Ok(None))
                && let Err(error) = self.core.state.forget(&id).await
            {
                tracing::warn!(sandbox_id = %id, error = %error, "could not remove leftover sandbox state");
            }
        }
    }

    /// Runs a change to sandbox `id` in its own task, behind the sandbox's
    /// lock: a caller that goes away (a cancelled RPC) cannot leave it half
    /// done, and changes to one sandbox do not interleave.
    async fn owned<T, F, Fut>(&self, id: &str, work: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Self) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T>> + Send + 'static,
    {
        let driver = self.clone();
        let locks = Arc::clone(&self.locks);
        let id = id.to_owned();
        tokio::spawn(async move {
            let _guard = locks.lock(&id).await;
            work(driver).await
        })
        .await
        .map_err(|e| Error::Internal(format!("a sandbox operation task failed: {e}")))?
    }

    /// The capabilities, for a v0.0.111 gateway (`gateway` absent) or a
    /// 1.x gateway whose metadata must negotiate. The 1.x fields are always
    /// filled; v0.0.111 gateways skip them. Cheap and free of side effects:
    /// 1.x gateways ask before every create and start.
    pub fn capabilities(&self, gateway: Option<&PeerMetadata>) -> Result<GetCapabilitiesResponse> {
        let facts = contract::DriverFacts {
            driver_name: DRIVER_NAME.to_owned(),
            driver_version: env!("CARGO_PKG_VERSION").to_owned(),
            default_image: self.core.settings.default_image.clone().unwrap_or_default(),
            gateway_manages_lifecycle: true,
            cpu_limits: true,
            memory_limits: true,
            // Ready=True means the container's main process runs.
            reports_runtime_readiness: true,
            metadata: metadata(),
            admission_policy: self.core.settings.admission.encode(),
        };
        contract::capabilities(gateway, &facts)
            .map_err(|e| Error::FailedPrecondition(e.to_string()))
    }

    /// Everything ValidateSandboxCreate checks, including the engine's
    /// image store (without pulling). `sandbox_token` is used;
    /// `launch_authentication` is accepted and ignored: checking it needs a
    /// supervisor component inside the sandbox, which this project does not
    /// have.
    pub async fn validate(&self, sandbox: Option<&DriverSandbox>) -> Result<Plan> {
        Ok(self.check(sandbox).await?.0)
    }

    /// [`PodmanDriver::validate`], with the effective pull policy and the
    /// image as the local store has it now.
    async fn check(
        &self,
        sandbox: Option<&DriverSandbox>,
    ) -> Result<(Plan, PullPolicy, Option<ImageInspect>)> {
        let caller_config = sandbox
            .and_then(|s| s.spec.as_ref())
            .and_then(|s| s.template.as_ref())
            .and_then(|t| t.driver_config.as_ref())
            .is_some_and(|c| !c.fields.is_empty());
        if caller_config && !self.core.settings.admission.allow_driver_config {
            return Err(Error::FailedPrecondition(
                "caller driver config is disabled; a gateway administrator must enable \
                 allow_driver_config"
                    .to_owned(),
            ));
        }
        let settings = &self.core.settings;
        let plan = plan(sandbox, &settings.name, settings.default_image.as_deref())?;
        let policy = plan.pull_policy.unwrap_or(settings.image_pull_policy);
        let local = self.core.client.image(&plan.image).await?;
        image::check_local(&plan, local.as_ref(), policy, &settings.name)?;
        Ok((plan, policy, local))
    }

    /// Makes sure the image is in the local store as the pull policy says,
    /// pulling it when needed; progress goes out as platform events, and
    /// the sandbox is shown as `Ready=False` ("pulling image …") until
    /// `create` calls [`Observer::pull_finished`] (here, on failure).
    async fn ensure_image(
        &self,
        plan: &Plan,
        policy: PullPolicy,
        local: Option<ImageInspect>,
    ) -> Result<()> {
        if !image::needs_pull(policy, local.is_some()) {
            return Ok(());
        }
        let settings = &self.core.settings;
        let feed = self.observer.feed();
        let insecure = settings.is_insecure_registry(&plan.image);
        tracing::info!(sandbox_id = %plan.id, image = %plan.image, policy = %policy, tls_verify = !insecure, "pulling image");
        let pulling = image::pulling_event(&plan.image, policy);
        self.observer.pull_started(crate::status::pulling(
            &plan.id,
            &plan.name,
            &plan.workspace,
            &settings.name,
            &pulling.message,
            std::time::SystemTime::now(),
        ));
        feed.publish_platform_event(&plan.id, pulling);
        let outcome = image::pull(&self.core.client, plan, policy, insecure, &settings.name)
            .await
            .and_then(|pulled| {
                image::check_default_command(plan, &pulled.image)?;
                Ok(pulled)
            });
        match outcome {
            Ok(pulled) => {
                tracing::info!(sandbox_id = %plan.id, image = %plan.image, digest = %pulled.digest, image_id = %pulled.image.id, "image pulled");
                feed.publish_platform_event(&plan.id, image::pulled_event(&plan.image, &pulled));
                Ok(())
            }
            Err(error) => {
                tracing::warn!(sandbox_id = %plan.id, image = %plan.image, error = %error, "image pull failed");
                feed.publish_platform_event(
                    &plan.id,
                    image::pull_failed_event(&plan.image, &error.to_string()),
                );
                self.observer.pull_finished(&plan.id, false);
                Err(error)
            }
        }
    }

    /// Creates and starts the sandbox; returns its container id, the
    /// runtime identity.
    pub async fn create(&self, sandbox: Option<&DriverSandbox>) -> Result<String> {
        let (plan, policy, local) = self.check(sandbox).await?;
        if self.core.find(&plan.id).await?.is_some() {
            return Err(Error::AlreadyExists(format!(
                "sandbox {} already exists in driver '{}'",
                plan.id, self.core.settings.name
            )));
        }
        self.ensure_image(&plan, policy, local).await?;
        let created = self.create_container(&plan).await;
        // A placeholder shown while the image was pulled gives way to the
        // container's observation, or goes when there is no container.
        self.observer.pull_finished(&plan.id, created.is_ok());
        created
    }

    /// The part of [`PodmanDriver::create`] after the image is there.
    async fn create_container(&self, plan: &Plan) -> Result<String> {
        let state = &self.core.state;
        state.forget(&plan.id).await?;
        let token_file = if plan.token.is_empty() {
            None
        } else {
            Some(state.write_token(&plan.id, &plan.token).await?)
        };
        let body = create_body(
            plan,
            &self.core.settings,
            &self.core.ulimits,
            token_file.as_deref(),
        );
        let created = match self.core.client.create(&body).await {
            Ok(created) => created,
            Err(error) => {
                let _ = state.forget(&plan.id).await;
                return Err(create_error(error, plan));
            }
        };
        for warning in created.warnings.iter().flatten() {
            tracing::warn!(sandbox_id = %plan.id, warning = %warning, "podman warned while creating the container");
        }
        if let Err(error) = self.core.client.start(&created.id).await {
            // Leave nothing behind: the gateway drops its record when the
            // create fails.
            if let Err(cleanup) = self.core.client.remove(&created.id).await {
                tracing::warn!(sandbox_id = %plan.id, error = %cleanup, "could not remove the container of a failed create");
            }
            let _ = state.forget(&plan.id).await;
            let (_, error) = self.start_error(error);
            return Err(error);
        }
        tracing::info!(sandbox_id = %plan.id, sandbox = %plan.name, container = %created.id, image = %plan.image, "sandbox created");
        self.observer.refresh(&plan.id, &created.id).await;
        Ok(created.id)
    }

    /// A start failure as the sandbox condition to record and the error to
    /// return.
    fn start_error(&self, error: Error) -> (StartFailure, Error) {
        if let Error::Engine { message, .. } = &error
            && let Some((reason, text)) = explain_start_failure(message, &self.core.ulimits)
        {
            return (
                StartFailure {
                    reason: reason.to_owned(),
                    message: text.clone(),
                },
                Error::FailedPrecondition(text),
            );
        }
        (
            StartFailure {
                reason: "StartFailed".to_owned(),
                message: error.to_string(),
            },
            error,
        )
    }

    pub async fn stop(&self, id: &str) -> Result<()> {
        check_sandbox_id(id)?;
        let container = self.core.require(id).await?;
        self.core.state.mark_stopped(id).await?;
        self.core.state.clear_start_failure(id).await?;
        let stop = self
            .core
            .client
            .stop(&container.id, self.core.settings.stop_timeout)
            .await;
        match stop {
            Ok(_) => {}
            Err(error) if error.is_engine_not_found() => {
                return Err(Error::NotFound(format!(
                    "sandbox {id} disappeared while stopping"
                )));
            }
            Err(error) => {
                // A paused container has to be unpaused before it can stop.
                let paused = self
                    .core
                    .client
                    .inspect(&container.id)
                    .await
                    .ok()
                    .flatten()
                    .is_some_and(|i| i.state.status == "paused");
                if !paused {
                    return Err(error);
                }
                self.core.client.unpause(&container.id).await?;
                self.core
                    .client
                    .stop(&container.id, self.core.settings.stop_timeout)
                    .await?;
            }
        }
        self.core.wait_stopped(&container.id).await?;
        tracing::info!(sandbox_id = %id, container = %container.id, "sandbox stopped");
        self.observer.refresh(id, &container.id).await;
        Ok(())
    }

    /// Starts the sandbox; returns its container id, the runtime identity.
    pub async fn start(&self, id: &str) -> Result<String> {
        check_sandbox_id(id)?;
        let container = self.core.require(id).await?;
        let status = self
            .core
            .client
            .inspect(&container.id)
            .await?
            .map(|i| i.state.status)
            .unwrap_or_default();
        match status.as_str() {
            "running" => {}
            "paused" => self.core.client.unpause(&container.id).await?,
            _ => {
                if status == "stopping" {
                    self.core.wait_stopped(&container.id).await?;
                }
                if let Err(error) = self.core.client.start(&container.id).await {
                    if error.is_engine_not_found() {
                        return Err(Error::NotFound(format!(
                            "sandbox {id} disappeared while starting"
                        )));
                    }
                    let (failure, error) = self.start_error(error);
                    if let Err(record) = self.core.state.record_start_failure(id, &failure).await {
                        tracing::warn!(sandbox_id = %id, error = %record, "could not record a start failure");
                    }
                    self.observer.refresh(id, &container.id).await;
                    return Err(error);
                }
            }
        }
        self.core.state.clear_stopped(id).await?;
        self.core.state.clear_start_failure(id).await?;
        tracing::info!(sandbox_id = %id, container = %container.id, "sandbox started");
        self.observer.refresh(id, &container.id).await;
        Ok(container.id)
    }

    /// Removes the sandbox; `Ok(false)` when there was nothing to remove.
    pub async fn delete(&self, id: &str) -> Result<bool> {
        check_sandbox_id(id)?;
        let Some(container) = self.core.find(id).await? else {
            self.core.state.forget(id).await?;
            return Ok(false);
        };
        let removed = self.core.client.remove(&container.id).await?;
        self.core.state.forget(id).await?;
        self.observer.removed(id, &container.id);
        tracing::info!(sandbox_id = %id, container = %container.id, "sandbox deleted");
        Ok(removed)
    }

    pub async fn get(&self, id: &str, name: &str) -> Result<DriverSandbox> {
        if !id.is_empty()
            && let Some(pulling) = self.observer.pulling(id)
        {
            return Ok(pulling);
        }
        let found = match self.core.require_by_id_or_name(id, name).await {
            Ok(found) => found,
            Err(error) if error.is_engine_unavailable() => {
                return self.unavailable_get(id, name).ok_or(error);
            }
            Err(error) => return Err(error),
        };
        match self.core.observe_container(&found.id).await {
            Ok(Some(sandbox)) => Ok(sandbox),
            Ok(None) => Err(Error::NotFound(format!(
                "sandbox {} is gone",
                if id.is_empty() { name } else { id }
            ))),
            Err(error) if error.is_engine_unavailable() => {
                self.unavailable_get(id, name).ok_or(error)
            }
            Err(error) => Err(error),
        }
    }

    fn unavailable_get(&self, id: &str, name: &str) -> Option<DriverSandbox> {
        self.observer.unavailable_view()?.into_iter().find(|s| {
            if id.is_empty() {
                s.name == name
            } else {
                s.id == id
            }
        })
    }

    pub async fn list(&self) -> Result<Vec<DriverSandbox>> {
        match self.core.observe_all().await {
            Ok(all) => Ok(self.observer.with_pulling(all)),
            Err(error) if error.is_engine_unavailable() => {
                self.observer.unavailable_view().ok_or(error)
            }
            Err(error) => Err(error),
        }
    }

    /// A `WatchSandboxes` stream. [`PodmanDriver::open`] returned only
    /// after the first full list, so the snapshot is complete.
    pub fn watch(&self) -> WatchStream {
        self.observer.feed().watch()
    }
}

/// A create failure as the error the caller can act on.
fn create_error(error: Error, plan: &Plan) -> Error {
    match &error {
        Error::Engine { message, .. } if message.contains("already in use") => {
            Error::AlreadyExists(format!(
                "a container for sandbox {} ({}) already exists: {message}",
                plan.id, plan.name
            ))
        }
        Error::Engine { message, .. }
            if message.contains("image not known") || message.contains("no such image") =>
        {
            Error::FailedPrecondition(format!(
                "{}: image {:?} is not in the local image store: {message}",
                reason::IMAGE_MISSING,
                plan.image
            ))
        }
        _ => error,
    }
}

fn field<T>(value: Option<T>, name: &str) -> Result<T> {
    value.ok_or_else(|| Error::InvalidArgument(format!("{name} is required")))
}

#[tonic::async_trait]
impl ComputeDriver for PodmanDriver {
    async fn get_capabilities(
        &self,
        request: Request<GetCapabilitiesRequest>,
    ) -> std::result::Result<Response<GetCapabilitiesResponse>, Status> {
        Ok(Response::new(
            self.capabilities(request.get_ref().gateway.as_ref())?,
        ))
    }

    async fn authenticate_sandbox(
        &self,
        _request: Request<AuthenticateSandboxRequest>,
    ) -> std::result::Result<Response<AuthenticateSandboxResponse>, Status> {
        Err(Status::unimplemented(contract::NO_SANDBOX_AUTHENTICATION))
    }

    async fn get_gateway_listener_requirements(
        &self,
        _request: Request<GetGatewayListenerRequirementsRequest>,
    ) -> std::result::Result<Response<GetGatewayListenerRequirementsResponse>, Status> {
        // Sandboxes reach the gateway through its normal listener.
        Ok(Response::new(GetGatewayListenerRequirementsResponse {
            requirements: Vec::new(),
        }))
    }

    async fn validate_sandbox_create(
        &self,
        request: Request<ValidateSandboxCreateRequest>,
    ) -> std::result::Result<Response<ValidateSandboxCreateResponse>, Status> {
        self.validate(request.get_ref().sandbox.as_ref()).await?;
        Ok(Response::new(ValidateSandboxCreateResponse {}))
    }

    async fn get_sandbox(
        &self,
        request: Request<GetSandboxRequest>,
    ) -> std::result::Result<Response<GetSandboxResponse>, Status> {
        let request = request.into_inner();
        let sandbox = self.get(&request.sandbox_id, &request.sandbox_name).await?;
        Ok(Response::new(GetSandboxResponse {
            sandbox: Some(sandbox),
        }))
    }

    async fn list_sandboxes(
        &self,
        _request: Request<ListSandboxesRequest>,
    ) -> std::result::Result<Response<ListSandboxesResponse>, Status> {
        Ok(Response::new(ListSandboxesResponse {
            sandboxes: self.list().await?,
        }))
    }

    async fn create_sandbox(
        &self,
        request: Request<CreateSandboxRequest>,
    ) -> std::result::Result<Response<CreateSandboxResponse>, Status> {
        let sandbox = field(request.into_inner().sandbox, "sandbox")?;
        let id = sandbox.id.clone();
        let runtime_identity = self
            .owned(&id, move |driver| async move {
                driver.create(Some(&sandbox)).await
            })
            .await?;
        Ok(Response::new(CreateSandboxResponse { runtime_identity }))
    }

    async fn stop_sandbox(
        &self,
        request: Request<StopSandboxRequest>,
    ) -> std::result::Result<Response<StopSandboxResponse>, Status> {
        let id = request.into_inner().sandbox_id;
        self.owned(
            &id.clone(),
            move |driver| async move { driver.stop(&id).await },
        )
        .await?;
        Ok(Response::new(StopSandboxResponse {}))
    }

    async fn start_sandbox(
        &self,
        request: Request<StartSandboxRequest>,
    ) -> std::result::Result<Response<StartSandboxResponse>, Status> {
        // launch_authentication, generation_id and
        // expected_runtime_identity are accepted and not used (see
        // `validate`).
        let id = request.into_inner().sandbox_id;
        let runtime_identity = self
            .owned(
                &id.clone(),
                move |driver| async move { driver.start(&id).await },
            )
            .await?;
        Ok(Response::new(StartSandboxResponse { runtime_identity }))
    }

    async fn delete_sandbox(
        &self,
        request: Request<DeleteSandboxRequest>,
    ) -> std::result::Result<Response<DeleteSandboxResponse>, Status> {
        let id = request.into_inner().sandbox_id;
        let deleted = self
            .owned(&id.clone(), move |driver| async move {
                driver.delete(&id).await
            })
            .await?;
        Ok(Response::new(DeleteSandboxResponse { deleted }))
    }

    type WatchSandboxesStream = WatchStream;

    async fn watch_sandboxes(
        &self,
        _request: Request<WatchSandboxesRequest>,
    ) -> std::result::Result<Response<Self::WatchSandboxesStream>, Status> {
        Ok(Response::new(self.watch()))
    }

    /// Podman has no per-workspace resources: nothing to create.
    async fn ensure_workspace(
        &self,
        _request: Request<EnsureWorkspaceRequest>,
    ) -> std::result::Result<Response<EnsureWorkspaceResponse>, Status> {
        Ok(Response::new(EnsureWorkspaceResponse {}))
    }

    /// Podman has no per-workspace resources: nothing to remove.
    async fn delete_workspace(
        &self,
        _request: Request<DeleteWorkspaceRequest>,
    ) -> std::result::Result<Response<DeleteWorkspaceResponse>, Status> {
        Ok(Response::new(DeleteWorkspaceResponse {}))
    }
}
