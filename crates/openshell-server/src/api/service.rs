//! The public gRPC service, `openshell.gateway.v1.Gateway`: a thin layer
//! over [`Gateway`]; errors become statuses through `From<Error>`.
//!
//! Requests are checked for size before anything else (see
//! [`validate`]), messages are limited to
//! [`MAX_MESSAGE_BYTES`] both ways, and every error message is cut to
//! [`MAX_ERROR_MESSAGE_BYTES`]: it travels in an HTTP/2 header, and a
//! client refuses a header much larger than that.
//!
//! [`GatewayRoutes`] is what the gateway serves: the generated server, but
//! WatchSandboxes with a codec that sends a change every watch shares
//! as the bytes encoded once for all of them.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use openshell_driver_kit::contract::truncate;
use openshell_proto::gateway::v1::{self as gw, gateway_server};
use openshell_wire::limits::{MAX_ERROR_MESSAGE_BYTES, MAX_MESSAGE_BYTES};
use tonic::codegen::{Service, http};
use tonic::{Request, Response, Status};

use crate::api::validate;
use crate::error::Error;
use crate::gateway::Gateway;
use crate::gateway::watch::WatchItem;

/// The tonic service.
#[derive(Debug, Clone)]
pub struct GatewayService {
    gateway: Arc<Gateway>,
}

impl GatewayService {
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway }
    }

    /// The service as a server, with the message limits every OpenShell
    /// server sets.
    pub fn server(gateway: Arc<Gateway>) -> gateway_server::GatewayServer<Self> {
        gateway_server::GatewayServer::new(Self::new(gateway))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

fn sandbox(sandbox: gw::Sandbox) -> Response<gw::SandboxResponse> {
    Response::new(gw::SandboxResponse {
        sandbox: Some(sandbox),
    })
}

/// A status whose message fits in a header.
fn bounded(status: Status) -> Status {
    if status.message().len() <= MAX_ERROR_MESSAGE_BYTES {
        return status;
    }
    Status::new(
        status.code(),
        truncate(status.message(), MAX_ERROR_MESSAGE_BYTES),
    )
}

/// A gateway result as the client gets it.
fn answer<T>(result: crate::error::Result<T>) -> Result<T, Status> {
    result.map_err(|e| bounded(Status::from(e)))
}

/// The size checks of a sandbox reference (the name is checked where it is
/// resolved).
fn checked_ref(reference: Option<&gw::SandboxRef>) -> Result<(), Status> {
    match reference {
        Some(r) => answer(validate::sandbox_id(&r.id).map_err(Error::InvalidArgument)),
        None => Ok(()),
    }
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
        let request = request.into_inner();
        answer(validate::create_request(&request).map_err(Error::InvalidArgument))?;
        Ok(sandbox(answer(self.gateway.create(request).await)?))
    }

    async fn get_sandbox(
        &self,
        request: Request<gw::GetSandboxRequest>,
    ) -> Result<Response<gw::SandboxResponse>, Status> {
        let request = request.into_inner();
        checked_ref(request.sandbox.as_ref())?;
        Ok(sandbox(answer(self.gateway.get(request.sandbox).await)?))
    }

    async fn list_sandboxes(
        &self,
        request: Request<gw::ListSandboxesRequest>,
    ) -> Result<Response<gw::ListSandboxesResponse>, Status> {
        Ok(Response::new(answer(
            self.gateway.list(request.into_inner()).await,
        )?))
    }

    async fn delete_sandbox(
        &self,
        request: Request<gw::DeleteSandboxRequest>,
    ) -> Result<Response<gw::DeleteSandboxResponse>, Status> {
        let request = request.into_inner();
        checked_ref(request.sandbox.as_ref())?;
        let deleted = answer(self.gateway.delete(request.sandbox).await)?;
        Ok(Response::new(gw::DeleteSandboxResponse { deleted }))
    }

    async fn stop_sandbox(
        &self,
        request: Request<gw::StopSandboxRequest>,
    ) -> Result<Response<gw::SandboxResponse>, Status> {
        let request = request.into_inner();
        checked_ref(request.sandbox.as_ref())?;
        Ok(sandbox(answer(self.gateway.stop(request.sandbox).await)?))
    }

    async fn start_sandbox(
        &self,
        request: Request<gw::StartSandboxRequest>,
    ) -> Result<Response<gw::SandboxResponse>, Status> {
        let request = request.into_inner();
        checked_ref(request.sandbox.as_ref())?;
        Ok(sandbox(answer(self.gateway.start(request.sandbox).await)?))
    }

    type WatchSandboxesStream = BoxStream<gw::WatchSandboxesEvent>;

    async fn watch_sandboxes(
        &self,
        request: Request<gw::WatchSandboxesRequest>,
    ) -> Result<Response<Self::WatchSandboxesStream>, Status> {
        let events = self
            .gateway
            .watch(request.into_inner())
            .await
            .map_err(bounded)?;
        Ok(Response::new(Box::pin(futures::StreamExt::map(
            events,
            |item| item.and_then(WatchItem::into_event).map_err(bounded),
        ))))
    }

    type SandboxLogsStream = BoxStream<gw::LogChunk>;

    async fn sandbox_logs(
        &self,
        request: Request<gw::SandboxLogsRequest>,
    ) -> Result<Response<Self::SandboxLogsStream>, Status> {
        let request = request.into_inner();
        checked_ref(request.sandbox.as_ref())?;
        let chunks = answer(self.gateway.logs(request).await)?;
        Ok(Response::new(Box::pin(futures::StreamExt::map(
            chunks,
            |chunk| chunk.map_err(bounded),
        ))))
    }

    async fn get_gateway_info(
        &self,
        _request: Request<gw::GetGatewayInfoRequest>,
    ) -> Result<Response<gw::GatewayInfo>, Status> {
        Ok(Response::new(self.gateway.info()))
    }
}

const WATCH_PATH: &str = "/openshell.gateway.v1.Gateway/WatchSandboxes";

/// The gateway's gRPC service as served: every method as the generated
/// server handles it, except WatchSandboxes, whose events go out through
/// [`WatchCodec`] so that a change fanned out to many watches is encoded
/// once rather than once per watch.
#[derive(Debug, Clone)]
pub struct GatewayRoutes {
    generated: gateway_server::GatewayServer<GatewayService>,
    gateway: Arc<Gateway>,
}

impl GatewayRoutes {
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self {
            generated: GatewayService::server(Arc::clone(&gateway)),
            gateway,
        }
    }
}

impl tonic::server::NamedService for GatewayRoutes {
    const NAME: &'static str = gateway_server::SERVICE_NAME;
}

type RouteFuture = Pin<
    Box<
        dyn Future<Output = Result<http::Response<tonic::body::Body>, std::convert::Infallible>>
            + Send,
    >,
>;

impl Service<http::Request<tonic::body::Body>> for GatewayRoutes {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = RouteFuture;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        Service::<http::Request<tonic::body::Body>>::poll_ready(&mut self.generated, cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        if request.uri().path() != WATCH_PATH {
            return self.generated.call(request);
        }
        let method = WatchMethod(Arc::clone(&self.gateway));
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(WatchCodec)
                .apply_max_message_size_config(Some(MAX_MESSAGE_BYTES), Some(MAX_MESSAGE_BYTES));
            Ok(grpc.server_streaming(method, request).await)
        })
    }
}

/// WatchSandboxes, answered with [`WatchItem`]s.
struct WatchMethod(Arc<Gateway>);

impl tonic::server::ServerStreamingService<gw::WatchSandboxesRequest> for WatchMethod {
    type Response = WatchItem;
    type ResponseStream = BoxStream<WatchItem>;
    type Future =
        Pin<Box<dyn Future<Output = Result<Response<Self::ResponseStream>, Status>> + Send>>;

    fn call(&mut self, request: Request<gw::WatchSandboxesRequest>) -> Self::Future {
        let gateway = Arc::clone(&self.0);
        Box::pin(async move {
            let items = gateway.watch(request.into_inner()).await.map_err(bounded)?;
            let items: BoxStream<WatchItem> =
                Box::pin(futures::StreamExt::map(items, |item| item.map_err(bounded)));
            Ok(Response::new(items))
        })
    }
}

/// Decodes WatchSandboxes requests and encodes [`WatchItem`]s: a message
/// as prost would, shared bytes as they are.
#[derive(Debug, Clone, Copy, Default)]
struct WatchCodec;

impl tonic::codec::Codec for WatchCodec {
    type Encode = WatchItem;
    type Decode = gw::WatchSandboxesRequest;
    type Encoder = WatchCodec;
    type Decoder = WatchCodec;

    fn encoder(&mut self) -> Self::Encoder {
        *self
    }

    fn decoder(&mut self) -> Self::Decoder {
        *self
    }
}

impl tonic::codec::Encoder for WatchCodec {
    type Item = WatchItem;
    type Error = Status;

    fn encode(
        &mut self,
        item: WatchItem,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Status> {
        use prost::bytes::BufMut as _;
        match item {
            WatchItem::Event(event) => prost::Message::encode(&*event, dst)
                .map_err(|e| Status::internal(format!("encode a watch event: {e}"))),
            WatchItem::Encoded(bytes) => {
                dst.put_slice(&bytes);
                Ok(())
            }
        }
    }
}

impl tonic::codec::Decoder for WatchCodec {
    type Item = gw::WatchSandboxesRequest;
    type Error = Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Self::Item>, Status> {
        <gw::WatchSandboxesRequest as prost::Message>::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(format!("decode a watch request: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_cut_to_fit_a_header() {
        let long = Status::invalid_argument("x".repeat(100_000));
        let cut = bounded(long);
        assert_eq!(cut.code(), tonic::Code::InvalidArgument);
        assert!(cut.message().len() <= MAX_ERROR_MESSAGE_BYTES + '…'.len_utf8());
        let short = bounded(Status::not_found("sandbox 'a' not found"));
        assert_eq!(short.message(), "sandbox 'a' not found");
    }
}
