//! `RemoteComputeDriver`: the one client the gateway uses for every driver,
//! managed or attached. Each unary call carries a deadline; errors come back
//! as [`Error`]s that name the driver and the call.
//!
//! Message limits: every call sends and accepts up to
//! [`MAX_MESSAGE_BYTES`], except `ListSandboxes`, whose reply is the
//! driver's whole inventory in one message and is accepted up to
//! [`MAX_DRIVER_LIST_BYTES`] (see `openshell_wire::limits`).

use std::future::Future;
use std::time::Duration;

use openshell_proto::compute::logs::v1::sandbox_logs_client::SandboxLogsClient;
use openshell_proto::compute::logs::v1::{LogChunk, StreamLogsRequest};
use openshell_proto::compute::v1::compute_driver_client::ComputeDriverClient;
use openshell_proto::compute::v1::{
    CreateSandboxRequest, DeleteSandboxRequest, DriverSandbox, EnsureWorkspaceRequest,
    GatewayListenerRequirement, GetCapabilitiesRequest, GetCapabilitiesResponse,
    GetGatewayListenerRequirementsRequest, GetSandboxRequest, ListSandboxesRequest,
    StartSandboxRequest, StopSandboxRequest, ValidateSandboxCreateRequest, WatchSandboxesEvent,
    WatchSandboxesRequest,
};
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status, Streaming};

use openshell_driver_kit::contract::{self, Generation, Negotiated};
use openshell_proto::extension::v1::PeerMetadata;
use openshell_wire::limits::{MAX_DRIVER_LIST_BYTES, MAX_MESSAGE_BYTES};

use crate::error::{Error, Result};

/// The name this gateway gives itself in 1.x negotiation.
pub const GATEWAY_IMPLEMENTATION: &str = "openshell-compute-plane/gateway";

/// The metadata this gateway sends in every `GetCapabilities`: 1.x drivers
/// refuse a request without it, v0.0.111 drivers ignore it.
pub fn gateway_metadata() -> PeerMetadata {
    contract::peer_metadata(GATEWAY_IMPLEMENTATION, env!("CARGO_PKG_VERSION"), &[])
}

/// What the gateway learned from a driver when it acquired it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    pub driver_name: String,
    pub driver_version: String,
    pub default_image: String,
    pub gateway_manages_lifecycle: bool,
    /// The driver serves the optional log service.
    pub logs: bool,
    /// The contract generation the driver speaks.
    pub generation: Generation,
    /// What 1.x negotiation agreed on (1.x drivers only).
    pub negotiated: Option<Negotiated>,
    /// The admission-policy acknowledgement as first read (1.x; may be
    /// empty for a driver that does no admission).
    pub admission_policy: String,
    /// A 1.x driver's Ready means the workload runs (v0.0.111 drivers are
    /// taken at their word, as that contract has no such flag).
    pub reports_runtime_readiness: bool,
}

impl Default for Capabilities {
    fn default() -> Self {
        Self {
            driver_name: String::new(),
            driver_version: String::new(),
            default_image: String::new(),
            gateway_manages_lifecycle: false,
            logs: false,
            generation: Generation::V0,
            negotiated: None,
            admission_policy: String::new(),
            reports_runtime_readiness: true,
        }
    }
}

impl Capabilities {
    /// The capabilities of `response`, negotiating when the driver speaks
    /// 1.x. `driver` names it in errors.
    pub fn from_response(
        driver: &str,
        response: GetCapabilitiesResponse,
        logs: bool,
    ) -> Result<Self> {
        let (generation, negotiated) = match &response.extension {
            None => (Generation::V0, None),
            Some(extension) => {
                let negotiated = contract::negotiate(
                    &format!("driver '{driver}'"),
                    &gateway_metadata(),
                    Some(extension),
                )
                .map_err(|e| Error::DriverIncompatible {
                    driver: driver.to_owned(),
                    reason: e.to_string(),
                })?;
                (Generation::V1, Some(negotiated))
            }
        };
        Ok(Self {
            reports_runtime_readiness: generation == Generation::V0
                || response.driver_reports_runtime_readiness,
            driver_name: response.driver_name,
            driver_version: response.driver_version,
            default_image: response.default_image,
            gateway_manages_lifecycle: response.gateway_manages_lifecycle,
            logs,
            generation,
            negotiated,
            admission_policy: response.resource_admission_policy,
        })
    }
}

/// A compute driver reached over gRPC.
#[derive(Debug, Clone)]
pub struct RemoteComputeDriver {
    name: String,
    client: ComputeDriverClient<Channel>,
    /// For `ListSandboxes` only: accepts a whole inventory.
    inventory: ComputeDriverClient<Channel>,
    logs: SandboxLogsClient<Channel>,
    call_timeout: Duration,
}

impl RemoteComputeDriver {
    pub fn new(name: impl Into<String>, channel: Channel, call_timeout: Duration) -> Self {
        Self {
            name: name.into(),
            client: ComputeDriverClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            inventory: ComputeDriverClient::new(channel.clone())
                .max_decoding_message_size(MAX_DRIVER_LIST_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            logs: SandboxLogsClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            call_timeout,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.set_timeout(self.call_timeout);
        request
    }

    /// Turns a driver's status into an error naming the driver and call.
    pub fn status_error(&self, rpc: &'static str, status: &Status) -> Error {
        match status.code() {
            Code::Unavailable => Error::DriverUnavailable {
                driver: self.name.clone(),
                reason: format!("{rpc}: {}", status.message()),
            },
            Code::DeadlineExceeded => Error::DriverTimeout {
                driver: self.name.clone(),
                rpc,
                timeout: self.call_timeout,
            },
            code => Error::DriverCall {
                driver: self.name.clone(),
                rpc,
                code,
                message: status.message().to_owned(),
            },
        }
    }

    /// Runs one call under the deadline, mapping failures.
    async fn call<T, F, Fut>(
        &self,
        rpc: &'static str,
        call: F,
    ) -> Result<T, (Error, Option<Status>)>
    where
        F: FnOnce(ComputeDriverClient<Channel>) -> Fut,
        Fut: Future<Output = std::result::Result<Response<T>, Status>>,
    {
        let started = tokio::time::Instant::now();
        let timeout = || Error::DriverTimeout {
            driver: self.name.clone(),
            rpc,
            timeout: self.call_timeout,
        };
        let client = if rpc == "ListSandboxes" {
            self.inventory.clone()
        } else {
            self.client.clone()
        };
        match tokio::time::timeout(self.call_timeout, call(client)).await {
            Err(_) => Err((timeout(), None)),
            Ok(Ok(response)) => Ok(response.into_inner()),
            // A tonic server enforces the grpc-timeout we send and answers
            // CANCELLED when it expires.
            Ok(Err(status))
                if status.code() == Code::Cancelled && started.elapsed() >= self.call_timeout =>
            {
                Err((timeout(), Some(status)))
            }
            Ok(Err(status)) => Err((self.status_error(rpc, &status), Some(status))),
        }
    }

    async fn unary<T, F, Fut>(&self, rpc: &'static str, call: F) -> Result<T>
    where
        F: FnOnce(ComputeDriverClient<Channel>) -> Fut,
        Fut: Future<Output = std::result::Result<Response<T>, Status>>,
    {
        self.call(rpc, call).await.map_err(|(error, _)| error)
    }

    /// Like [`Self::unary`] but `UNIMPLEMENTED` is `Ok(None)`.
    async fn optional<T, F, Fut>(&self, rpc: &'static str, call: F) -> Result<Option<T>>
    where
        F: FnOnce(ComputeDriverClient<Channel>) -> Fut,
        Fut: Future<Output = std::result::Result<Response<T>, Status>>,
    {
        match self.call(rpc, call).await {
            Ok(value) => Ok(Some(value)),
            Err((_, Some(status))) if status.code() == Code::Unimplemented => Ok(None),
            Err((error, _)) => Err(error),
        }
    }

    pub async fn capabilities(&self) -> Result<GetCapabilitiesResponse> {
        let request = self.request(GetCapabilitiesRequest {
            gateway: Some(gateway_metadata()),
        });
        self.unary("GetCapabilities", |mut c| async move {
            c.get_capabilities(request).await
        })
        .await
    }

    /// Listener requirements; a driver without the RPC has none.
    pub async fn listener_requirements(&self) -> Result<Vec<GatewayListenerRequirement>> {
        let request = self.request(GetGatewayListenerRequirementsRequest {});
        Ok(self
            .optional("GetGatewayListenerRequirements", |mut c| async move {
                c.get_gateway_listener_requirements(request).await
            })
            .await?
            .map(|r| r.requirements)
            .unwrap_or_default())
    }

    /// Makes sure the workspace exists; a driver without the RPC needs none.
    pub async fn ensure_workspace(&self, workspace: &str) -> Result<()> {
        let request = self.request(EnsureWorkspaceRequest {
            workspace: workspace.to_owned(),
        });
        self.optional("EnsureWorkspace", |mut c| async move {
            c.ensure_workspace(request).await
        })
        .await
        .map(drop)
    }

    /// Whether the driver serves the optional log service: an empty request
    /// answered with anything but `UNIMPLEMENTED` means it does.
    pub async fn probe_logs(&self) -> Result<bool> {
        let mut client = self.logs.clone();
        let request = self.request(StreamLogsRequest::default());
        match tokio::time::timeout(self.call_timeout, client.stream_logs(request)).await {
            Err(_) => Err(Error::DriverTimeout {
                driver: self.name.clone(),
                rpc: "StreamLogs",
                timeout: self.call_timeout,
            }),
            Ok(Err(status)) if status.code() == Code::Unimplemented => Ok(false),
            Ok(Err(status)) if status.code() == Code::Unavailable => {
                Err(self.status_error("StreamLogs", &status))
            }
            Ok(_) => Ok(true),
        }
    }

    pub async fn validate(&self, sandbox: DriverSandbox) -> Result<()> {
        let request = self.request(ValidateSandboxCreateRequest {
            sandbox: Some(sandbox),
        });
        self.unary("ValidateSandboxCreate", |mut c| async move {
            c.validate_sandbox_create(request).await
        })
        .await
        .map(drop)
    }

    pub async fn create(&self, sandbox: DriverSandbox) -> Result<()> {
        let request = self.request(CreateSandboxRequest {
            sandbox: Some(sandbox),
        });
        self.unary("CreateSandbox", |mut c| async move {
            c.create_sandbox(request).await
        })
        .await
        .map(drop)
    }

    /// The driver's view of one sandbox; `None` when it does not have it
    /// (`NOT_FOUND`, or an answer about a different id).
    pub async fn get(&self, id: &str, name: &str) -> Result<Option<DriverSandbox>> {
        let request = self.request(GetSandboxRequest {
            sandbox_id: id.to_owned(),
            sandbox_name: name.to_owned(),
        });
        match self
            .call(
                "GetSandbox",
                |mut c| async move { c.get_sandbox(request).await },
            )
            .await
        {
            Ok(response) => match response.sandbox {
                Some(sandbox) if sandbox.id == id || id.is_empty() => Ok(Some(sandbox)),
                Some(other) => {
                    tracing::warn!(driver = %self.name, requested = id, answered = %other.id, "driver answered GetSandbox about another sandbox; treating ours as absent");
                    Ok(None)
                }
                None => Ok(None),
            },
            Err((_, Some(status))) if status.code() == Code::NotFound => Ok(None),
            Err((error, _)) => Err(error),
        }
    }

    pub async fn list(&self) -> Result<Vec<DriverSandbox>> {
        let request = self.request(ListSandboxesRequest {});
        self.unary("ListSandboxes", |mut c| async move {
            c.list_sandboxes(request).await
        })
        .await
        .map(|r| r.sandboxes)
    }

    pub async fn stop(&self, id: &str, name: &str) -> Result<()> {
        let request = self.request(StopSandboxRequest {
            sandbox_id: id.to_owned(),
            sandbox_name: name.to_owned(),
        });
        self.unary("StopSandbox", |mut c| async move {
            c.stop_sandbox(request).await
        })
        .await
        .map(drop)
    }

    pub async fn start(&self, id: &str, name: &str) -> Result<()> {
        let request = self.request(StartSandboxRequest {
            sandbox_id: id.to_owned(),
            sandbox_name: name.to_owned(),
            ..StartSandboxRequest::default()
        });
        self.unary("StartSandbox", |mut c| async move {
            c.start_sandbox(request).await
        })
        .await
        .map(drop)
    }

    /// True when the driver deleted something; false when it had nothing.
    pub async fn delete(&self, id: &str, name: &str) -> Result<bool> {
        let request = self.request(DeleteSandboxRequest {
            sandbox_id: id.to_owned(),
            sandbox_name: name.to_owned(),
        });
        self.unary("DeleteSandbox", |mut c| async move {
            c.delete_sandbox(request).await
        })
        .await
        .map(|r| r.deleted)
    }

    /// Opens the driver's watch stream. Neither the open nor the stream has
    /// a deadline: grpc-go, grpcio and others send a stream's response
    /// headers only with its first message, so an idle driver's watch stays
    /// silent, even of headers, until something changes. Whether the driver
    /// is reachable is decided by unary calls, never by this wait.
    pub async fn watch(&self) -> Result<Streaming<WatchSandboxesEvent>> {
        let mut client = self.client.clone();
        client
            .watch_sandboxes(WatchSandboxesRequest {})
            .await
            .map(Response::into_inner)
            .map_err(|status| self.status_error("WatchSandboxes", &status))
    }

    /// Opens a log stream; `None` when the driver has no log service.
    pub async fn stream_logs(
        &self,
        request: StreamLogsRequest,
    ) -> Result<Option<Streaming<LogChunk>>> {
        let mut client = self.logs.clone();
        match tokio::time::timeout(self.call_timeout, client.stream_logs(request)).await {
            Err(_) => Err(Error::DriverTimeout {
                driver: self.name.clone(),
                rpc: "StreamLogs",
                timeout: self.call_timeout,
            }),
            Ok(Ok(response)) => Ok(Some(response.into_inner())),
            Ok(Err(status)) if status.code() == Code::Unimplemented => Ok(None),
            Ok(Err(status)) => Err(self.status_error("StreamLogs", &status)),
        }
    }
}
