//! The gRPC services: `openshell.compute.v1.ComputeDriver` and the optional
//! `openshell.compute.logs.v1.SandboxLogs`, both thin layers over
//! [`Driver`].
//!
//! `ComputeDriver` answers both contract generations on the same socket: a
//! v0.0.111 gateway sends no metadata in GetCapabilities and ignores the
//! 1.x fields of the answers; a 1.x gateway sends its metadata, which is
//! checked here, and reads the 1.x fields (extension, admission policy,
//! runtime identities, Timestamp times).

use std::pin::Pin;

use futures::StreamExt as _;

use openshell_driver_kit::contract;
use openshell_proto::compute::logs::v1::sandbox_logs_server::SandboxLogs;
use openshell_proto::compute::logs::v1::{LogChunk, LogStream, StreamLogsRequest};
use openshell_proto::compute::v1::compute_driver_server::ComputeDriver;
use openshell_proto::compute::v1::{
    AuthenticateSandboxRequest, AuthenticateSandboxResponse, CreateSandboxRequest,
    CreateSandboxResponse, DeleteSandboxRequest, DeleteSandboxResponse, DeleteWorkspaceRequest,
    DeleteWorkspaceResponse, EnsureWorkspaceRequest, EnsureWorkspaceResponse,
    GetCapabilitiesRequest, GetCapabilitiesResponse, GetGatewayListenerRequirementsRequest,
    GetGatewayListenerRequirementsResponse, GetSandboxRequest, GetSandboxResponse,
    ListSandboxesRequest, ListSandboxesResponse, StartSandboxRequest, StartSandboxResponse,
    StopSandboxRequest, StopSandboxResponse, ValidateSandboxCreateRequest,
    ValidateSandboxCreateResponse, WatchSandboxesEvent, WatchSandboxesRequest,
};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::console::LiveOutput;
use crate::driver::Driver;

/// Name reported in `GetCapabilities`.
pub const DRIVER_NAME: &str = "openshell-driver-vm";
/// Implementation name in the driver's 1.x negotiation metadata.
pub const IMPLEMENTATION_NAME: &str = "openshell-compute-plane/vm";
/// The AuthenticateSandbox answer: this driver has no credential to check.
pub use openshell_driver_kit::contract::NO_SANDBOX_AUTHENTICATION;
/// Bytes per log chunk sent for retained output.
const HISTORY_CHUNK: usize = 64 << 10;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Both services over one [`Driver`]. `stop` ends long-lived streams when
/// the server shuts down.
#[derive(Clone)]
pub struct Service {
    driver: Driver,
    stop: CancellationToken,
}

impl Service {
    pub fn new(driver: Driver, stop: CancellationToken) -> Self {
        Self { driver, stop }
    }
}

#[tonic::async_trait]
impl ComputeDriver for Service {
    /// Cheap and free of side effects: 1.x gateways call it before every
    /// validate, create and start.
    async fn get_capabilities(
        &self,
        request: Request<GetCapabilitiesRequest>,
    ) -> Result<Response<GetCapabilitiesResponse>, Status> {
        let config = self.driver.config();
        let facts = contract::DriverFacts {
            driver_name: DRIVER_NAME.to_owned(),
            // The backend and network this host runs sandboxes with, e.g.
            // "0.1.0 (qemu-tcg, network passt)".
            driver_version: format!(
                "{} ({})",
                env!("CARGO_PKG_VERSION"),
                self.driver.host_report().platform_label()
            ),
            default_image: config.default_image.clone().unwrap_or_default(),
            gateway_manages_lifecycle: true,
            // cpu_limit and memory_limit size the VM (vCPUs, guest memory).
            cpu_limits: true,
            memory_limits: true,
            // Ready=True means the guest booted into its command; there is
            // no supervisor session to wait for.
            reports_runtime_readiness: true,
            metadata: contract::peer_metadata(IMPLEMENTATION_NAME, env!("CARGO_PKG_VERSION"), &[]),
            admission_policy: config.admission.encode(),
        };
        contract::capabilities(request.get_ref().gateway.as_ref(), &facts)
            .map(Response::new)
            .map_err(|e| Status::failed_precondition(e.to_string()))
    }

    async fn authenticate_sandbox(
        &self,
        _request: Request<AuthenticateSandboxRequest>,
    ) -> Result<Response<AuthenticateSandboxResponse>, Status> {
        Err(Status::unimplemented(NO_SANDBOX_AUTHENTICATION))
    }

    async fn get_gateway_listener_requirements(
        &self,
        _request: Request<GetGatewayListenerRequirementsRequest>,
    ) -> Result<Response<GetGatewayListenerRequirementsResponse>, Status> {
        Ok(Response::new(GetGatewayListenerRequirementsResponse {
            requirements: Vec::new(),
        }))
    }

    async fn validate_sandbox_create(
        &self,
        request: Request<ValidateSandboxCreateRequest>,
    ) -> Result<Response<ValidateSandboxCreateResponse>, Status> {
        self.driver
            .validate(request.get_ref().sandbox.as_ref())
            .await?;
        Ok(Response::new(ValidateSandboxCreateResponse {}))
    }

    async fn get_sandbox(
        &self,
        request: Request<GetSandboxRequest>,
    ) -> Result<Response<GetSandboxResponse>, Status> {
        let request = request.into_inner();
        let sandbox = self
            .driver
            .get(&request.sandbox_id, &request.sandbox_name)?;
        Ok(Response::new(GetSandboxResponse {
            sandbox: Some(sandbox),
        }))
    }

    async fn list_sandboxes(
        &self,
        _request: Request<ListSandboxesRequest>,
    ) -> Result<Response<ListSandboxesResponse>, Status> {
        Ok(Response::new(ListSandboxesResponse {
            sandboxes: self.driver.list(),
        }))
    }

    async fn create_sandbox(
        &self,
        request: Request<CreateSandboxRequest>,
    ) -> Result<Response<CreateSandboxResponse>, Status> {
        // A 1.x gateway may put a launch credential bundle in
        // spec.launch_authentication; handing it to the workload needs a
        // supervisor component this driver does not have, so it is
        // accepted and left unused (like sandbox_token, which does reach
        // the guest).
        let runtime_identity = self.driver.create(request.into_inner().sandbox).await?;
        Ok(Response::new(CreateSandboxResponse { runtime_identity }))
    }

    async fn stop_sandbox(
        &self,
        request: Request<StopSandboxRequest>,
    ) -> Result<Response<StopSandboxResponse>, Status> {
        let request = request.into_inner();
        // Run to completion even if the caller goes away: a stop must not
        // be left half done.
        let driver = self.driver.clone();
        tokio::spawn(async move {
            driver
                .stop(&request.sandbox_id, &request.sandbox_name)
                .await
        })
        .await
        .map_err(|e| Status::internal(format!("stop task failed: {e}")))??;
        Ok(Response::new(StopSandboxResponse {}))
    }

    async fn start_sandbox(
        &self,
        request: Request<StartSandboxRequest>,
    ) -> Result<Response<StartSandboxResponse>, Status> {
        // launch_authentication and generation_id are accepted and unused,
        // as in create.
        let request = request.into_inner();
        let driver = self.driver.clone();
        let runtime_identity = tokio::spawn(async move {
            driver
                .start(
                    &request.sandbox_id,
                    &request.sandbox_name,
                    &request.expected_runtime_identity,
                )
                .await
        })
        .await
        .map_err(|e| Status::internal(format!("start task failed: {e}")))??;
        Ok(Response::new(StartSandboxResponse { runtime_identity }))
    }

    async fn delete_sandbox(
        &self,
        request: Request<DeleteSandboxRequest>,
    ) -> Result<Response<DeleteSandboxResponse>, Status> {
        let request = request.into_inner();
        let driver = self.driver.clone();
        let deleted = tokio::spawn(async move {
            driver
                .delete(&request.sandbox_id, &request.sandbox_name)
                .await
        })
        .await
        .map_err(|e| Status::internal(format!("delete task failed: {e}")))??;
        Ok(Response::new(DeleteSandboxResponse { deleted }))
    }

    type WatchSandboxesStream = BoxStream<WatchSandboxesEvent>;

    async fn watch_sandboxes(
        &self,
        _request: Request<WatchSandboxesRequest>,
    ) -> Result<Response<Self::WatchSandboxesStream>, Status> {
        // The feed serves snapshot, changes and resync; the stream also
        // ends when the server shuts down.
        let stream = self
            .driver
            .feed()
            .watch()
            .take_until(self.stop.clone().cancelled_owned());
        Ok(Response::new(Box::pin(stream)))
    }

    async fn ensure_workspace(
        &self,
        _request: Request<EnsureWorkspaceRequest>,
    ) -> Result<Response<EnsureWorkspaceResponse>, Status> {
        Ok(Response::new(EnsureWorkspaceResponse {}))
    }

    async fn delete_workspace(
        &self,
        _request: Request<DeleteWorkspaceRequest>,
    ) -> Result<Response<DeleteWorkspaceResponse>, Status> {
        Ok(Response::new(DeleteWorkspaceResponse {}))
    }
}

fn chunk(data: Vec<u8>, at_ms: i64) -> LogChunk {
    LogChunk {
        data,
        stream: LogStream::Console.into(),
        timestamp_ms: at_ms,
    }
}

#[tonic::async_trait]
impl SandboxLogs for Service {
    type StreamLogsStream = BoxStream<LogChunk>;

    async fn stream_logs(
        &self,
        request: Request<StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        let request = request.into_inner();
        let console = self
            .driver
            .console(&request.sandbox_id, &request.sandbox_name)?;
        let subscription = console.subscribe(request.tail_lines, request.follow)?;
        let (tx, rx) = mpsc::channel(64);
        let stop = self.stop.clone();
        tokio::spawn(async move {
            for piece in subscription.history.chunks(HISTORY_CHUNK) {
                if tx.send(Ok(chunk(piece.to_vec(), 0))).await.is_err() {
                    return;
                }
            }
            let Some(mut live) = subscription.live else {
                return;
            };
            loop {
                let next = tokio::select! {
                    next = live.recv() => next,
                    () = stop.cancelled() => return,
                    () = tx.closed() => return,
                };
                let item = match next {
                    Ok(LiveOutput::Chunk { data, at_ms }) => chunk(data, at_ms),
                    Ok(LiveOutput::End) | Err(broadcast::error::RecvError::Closed) => return,
                    Err(broadcast::error::RecvError::Lagged(missed)) => chunk(
                        format!(
                            "\n[openshell: this reader fell behind and skipped {missed} chunks; \
                             console.log has all of it]\n"
                        )
                        .into_bytes(),
                        openshell_wire::time::now_millis(),
                    ),
                };
                if tx.send(Ok(item)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
