//! What every gateway bench binary needs: a child process killed on drop,
//! percentiles, and a channel to a socket that is about to be served.

#![allow(dead_code, reason = "each bench binary uses a different part")]

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use openshell_proto::gateway::v1::gateway_client::GatewayClient;
use openshell_proto::gateway::v1::{self as gw, GetGatewayInfoRequest};
use tonic::transport::Channel;

/// A child process, killed and reaped when dropped.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `p`th percentile (0–100) of `samples`, which it sorts.
pub fn percentile(samples: &mut [Duration], p: usize) -> Duration {
    samples.sort_unstable();
    let index = (samples.len().saturating_sub(1) * p) / 100;
    samples[index]
}

pub fn median(samples: &mut [Duration]) -> Duration {
    percentile(samples, 50)
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A channel to `socket`, waiting up to 60 s for something to serve it.
pub async fn channel(socket: &Path) -> Channel {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(channel) =
            openshell_wire::uds::connect(socket, openshell_wire::DialPolicy::ONCE).await
        {
            return channel;
        }
        assert!(
            Instant::now() < deadline,
            "{} never answered",
            socket.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A client of the gateway serving on `socket`, once it answers
/// `GetGatewayInfo` (waiting up to 60 s).
pub async fn gateway_client(socket: &Path) -> GatewayClient<Channel> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut client = GatewayClient::new(channel(socket).await);
        if client
            .get_gateway_info(GetGatewayInfoRequest {})
            .await
            .is_ok()
        {
            return client;
        }
        assert!(Instant::now() < deadline, "the gateway never served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A watch of every sandbox, read past its initial listing (`synced`), so
/// what comes next is changes.
pub async fn synced_watch(
    client: &mut GatewayClient<Channel>,
) -> tonic::Streaming<gw::WatchSandboxesEvent> {
    let mut watch = client
        .watch_sandboxes(gw::WatchSandboxesRequest::default())
        .await
        .expect("watch")
        .into_inner();
    loop {
        let event = watch.message().await.expect("watch").expect("watch open");
        if matches!(
            event.payload,
            Some(gw::watch_sandboxes_event::Payload::Synced(_))
        ) {
            return watch;
        }
    }
}
