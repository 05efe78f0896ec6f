//! A driver endpoint and the gRPC client channel to it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tower::service_fn;

use crate::error::{LifecycleError, Result, error_chain};

/// Where a named driver can be reached. The same for managed and attached
/// drivers: after acquisition nothing else distinguishes them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DriverEndpoint {
    /// The configured driver name (e.g. `vm`, `podman`, `external-podman`).
    pub name: String,
    /// The Unix socket the driver serves `ComputeDriver` on.
    pub socket: PathBuf,
}

impl DriverEndpoint {
    pub fn new(name: impl Into<String>, socket: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            socket: socket.into(),
        }
    }
}

/// How long and how often to dial a socket before giving up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DialPolicy {
    /// Give up once this much time has passed since the first attempt.
    pub deadline: Duration,
    /// Wait after the first failed attempt; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for DialPolicy {
    fn default() -> Self {
        Self {
            deadline: Duration::from_secs(10),
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(250),
        }
    }
}

impl DialPolicy {
    /// A single attempt, no retry.
    pub const ONCE: Self = Self {
        deadline: Duration::ZERO,
        initial_backoff: Duration::ZERO,
        max_backoff: Duration::ZERO,
    };
}

/// The URI tonic needs for its HTTP/2 `:authority`; the connector ignores it
/// and dials the socket. Drivers must accept any authority.
const PLACEHOLDER_URI: &str = "http://[::]:50051";

/// Opens one HTTP/2 connection to the socket. The returned channel redials
/// the same socket by itself if the connection is lost later.
async fn dial(socket: &Path) -> std::result::Result<Channel, tonic::transport::Error> {
    let socket = socket.to_owned();
    Endpoint::from_static(PLACEHOLDER_URI)
        .connect_with_connector(service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { UnixStream::connect(socket).await.map(TokioIo::new) }
        }))
        .await
}

/// Connects to `endpoint` with the default [`DialPolicy`].
pub async fn connect(endpoint: &DriverEndpoint) -> Result<Channel> {
    connect_with(endpoint, DialPolicy::default()).await
}

/// Connects to `endpoint`, retrying with backoff until `policy.deadline`.
pub async fn connect_with(endpoint: &DriverEndpoint, policy: DialPolicy) -> Result<Channel> {
    let started = tokio::time::Instant::now();
    let deadline = started + policy.deadline;
    let mut backoff = policy.initial_backoff;
    loop {
        let error = match dial(&endpoint.socket).await {
            Ok(channel) => return Ok(channel),
            Err(error) => error,
        };
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(LifecycleError::Dial {
                name: endpoint.name.clone(),
                socket: endpoint.socket.clone(),
                timeout: policy.deadline,
                last_error: error_chain(&error),
            });
        }
        tokio::time::sleep(backoff.min(deadline - now)).await;
        backoff = (backoff * 2)
            .min(policy.max_backoff)
            .max(Duration::from_millis(1));
    }
}
