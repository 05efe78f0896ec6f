//! A driver endpoint and the gRPC client channel to it.

use std::path::PathBuf;

use tonic::transport::Channel;

use crate::error::{LifecycleError, Result};

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

pub use openshell_wire::DialPolicy;

/// Connects to `endpoint` with the default [`DialPolicy`].
pub async fn connect(endpoint: &DriverEndpoint) -> Result<Channel> {
    connect_with(endpoint, DialPolicy::default()).await
}

/// Connects to `endpoint`, retrying with backoff until `policy.deadline`.
pub async fn connect_with(endpoint: &DriverEndpoint, policy: DialPolicy) -> Result<Channel> {
    openshell_wire::uds::connect(&endpoint.socket, policy)
        .await
        .map_err(|error| dial_error(endpoint, error))
}

/// [`connect_with`], counting every connection the channel opens (its
/// redials too) in `counter`.
pub async fn connect_counting(
    endpoint: &DriverEndpoint,
    policy: DialPolicy,
    counter: openshell_wire::ConnectionCounter,
) -> Result<Channel> {
    openshell_wire::uds::connect_counting(&endpoint.socket, policy, counter)
        .await
        .map_err(|error| dial_error(endpoint, error))
}

fn dial_error(endpoint: &DriverEndpoint, error: openshell_wire::DialError) -> LifecycleError {
    LifecycleError::Dial {
        name: endpoint.name.clone(),
        socket: error.socket,
        timeout: error.timeout,
        last_error: error.last_error,
    }
}
