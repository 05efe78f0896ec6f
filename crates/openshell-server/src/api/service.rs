//! The public gRPC service, `openshell.gateway.v1.Gateway`: a thin layer
//! over [`Gateway`]; errors become statuses through `From<Error>`.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use openshell_proto::gateway::v1::{self as gw, gateway_server};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::gateway::Gateway;

/// The tonic service.
#[derive(Debug, Clone)]
pub struct GatewayService {
    gateway: Arc<Gateway>,
}

impl GatewayService {
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn sandbox(sandbox: gw::Sandbox) -> Response<gw::SandboxResponse> {
    Response::new(gw::SandboxResponse {
        sandbox: Some(sandbox),
    })
}

#[tonic::async_trait]
impl gateway_server::Gateway for GatewayService {
    async fn list_orphans(
        &self,
        request: Request<gw::ListOrphansRequest>,
    ) -> Result<Response<gw::ListOrphansResponse>, Status> {
        Ok(Response::new(
            self.gateway.list_orphans(&request.into_inner().driver)?,
        ))
    }

    async fn adopt_orphan(
        &self,
        request: Request<gw::AdoptOrphanRequest>,
    ) -> Result<Response<gw::SandboxResponse>, Status> {
        Ok(sandbox(
            self.gateway.adopt_orphan(request.into_inner()).await?,
        ))
    }

    async fn delete_orphan(
        &self,
        request: Request<gw::DeleteOrphanRequest>,
    ) -> Result<Response<gw::DeleteOrphanResponse>, Status> {
        let deleted = self.gateway.delete_orphan(request.into_inner()).await?;
        Ok(Response::new(gw::DeleteOrphanResponse { deleted }))
    }

    async fn create_sandbox(
        &self,
        request: Request<gw::CreateSandboxRequest>,
    ) -> Result<Response<gw::SandboxResponse>, Status> {
        Ok(sandbox(self.gateway.create(request.into_inner()).await?))
    }

    async fn get_sandbox(
        &self,
        request: Request<gw::GetSandboxRequest>,
    ) -> Result<Response<gw::SandboxResponse>, Status> {
        Ok(sandbox(
            self.gateway.get(request.into_inner().sandbox).await?,
        ))
    }

    async fn list_sandboxes(
        &self,
        request: Request<gw::ListSandboxesRequest>,
    ) -> Result<Response<gw::ListSandboxesResponse>, Status> {
        Ok(Response::new(
            self.gateway.list(request.into_inner()).await?,
        ))
    }

    async fn delete_sandbox(
        &self,
        request: Request<gw::DeleteSandboxRequest>,
    ) -> Result<Response<gw::DeleteSandboxResponse>, Status> {
        let deleted = self.gateway.delete(request.into_inner().sandbox).await?;
        Ok(Response::new(gw::DeleteSandboxResponse { deleted }))
    }

    async fn stop_sandbox(
        &self,
        request: Request<gw::StopSandboxRequest>,
    ) -> Result<Response<gw::SandboxResponse>, Status> {
        Ok(sandbox(
            self.gateway.stop(request.into_inner().sandbox).await?,
        ))
    }

    async fn start_sandbox(
        &self,
        request: Request<gw::StartSandboxRequest>,
    ) -> Result<Response<gw::SandboxResponse>, Status> {
        Ok(sandbox(
            self.gateway.start(request.into_inner().sandbox).await?,
        ))
    }

    type WatchSandboxesStream = BoxStream<gw::WatchSandboxesEvent>;

    async fn watch_sandboxes(
        &self,
        request: Request<gw::WatchSandboxesRequest>,
    ) -> Result<Response<Self::WatchSandboxesStream>, Status> {
        let events = self.gateway.watch(request.into_inner())?;
        Ok(Response::new(Box::pin(ReceiverStream::new(events))))
    }

    type SandboxLogsStream = BoxStream<gw::LogChunk>;

    async fn sandbox_logs(
        &self,
        request: Request<gw::SandboxLogsRequest>,
    ) -> Result<Response<Self::SandboxLogsStream>, Status> {
        let chunks = self.gateway.logs(request.into_inner()).await?;
        Ok(Response::new(Box::pin(chunks)))
    }

    async fn get_gateway_info(
        &self,
        _request: Request<gw::GetGatewayInfoRequest>,
    ) -> Result<Response<gw::GatewayInfo>, Status> {
        Ok(Response::new(self.gateway.info()))
    }
}
