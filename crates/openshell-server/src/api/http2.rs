//! The API's HTTP/2 server: hyper, driven here rather than through tonic's
//! `Server`, for one setting tonic does not expose: how much a stream may
//! queue in the HTTP/2 layer while its client does not read. h2 keeps up
//! to 400 KiB a stream by default, and a watch whose client is stopped
//! (its windows still open) fills that: 1000 such watches held the gateway
//! at about 600 MiB. With [`STREAM_SEND_BUFFER`] a watch holds at most that
//! much there, besides its one page in [`crate::gateway::watch`].
//!
//! Everything else is what tonic's server did for us: every connection on
//! its own task, no limit on concurrent streams (`max_watches` bounds the
//! long-lived ones), and on shutdown a GOAWAY to every connection, then a
//! wait for their open requests.

use std::future::Future;

use futures::{Stream, StreamExt as _};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tonic::service::Routes;

/// What one stream may queue in the HTTP/2 layer beyond what the
/// connection has written: one full DATA frame. 64 KiB left 1000 watches
/// of a stopped client at 213 MiB, 16 KiB at 151 MiB (`benches/watches.rs`);
/// a reading client drains it as fast as its socket takes data.
pub const STREAM_SEND_BUFFER: usize = 16 * 1024;

/// The HTTP/2 settings of every API connection.
fn builder() -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_send_buf_size(STREAM_SEND_BUFFER)
        .max_concurrent_streams(None);
    builder
}

/// Serves `routes` on every connection `incoming` yields until `shutdown`
/// completes, then closes the connections gracefully and waits for them.
/// Errors of single accepts or connections are logged; they never end the
/// server.
pub async fn serve<S, IO>(incoming: S, routes: Routes, shutdown: impl Future<Output = ()>)
where
    S: Stream<Item = std::io::Result<IO>>,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let builder = builder();
    let graceful = GracefulShutdown::new();
    let service = TowerToHyperService::new(routes.prepare());
    let incoming = std::pin::pin!(incoming);
    let mut incoming = incoming.fuse();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let io = tokio::select! {
            biased;
            () = &mut shutdown => break,
            next = incoming.next() => match next {
                Some(Ok(io)) => io,
                Some(Err(error)) => {
                    tracing::warn!(%error, "accepting an API connection failed");
                    continue;
                }
                None => break,
            },
        };
        let connection =
            graceful.watch(builder.serve_connection(TokioIo::new(io), service.clone()));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "an API connection ended with an error");
            }
        });
    }
    graceful.shutdown().await;
}
