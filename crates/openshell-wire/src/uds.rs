//! A tonic channel over a Unix socket.
//!
//! tonic needs a URI for the HTTP/2 `:authority` of each request; the
//! connector ignores it and dials the socket. Servers must accept any
//! authority.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tower::service_fn;

/// The authority sent on Unix-socket channels.
const PLACEHOLDER_URI: &str = "http://localhost";

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

    /// The default backoff with another deadline.
    pub fn within(deadline: Duration) -> Self {
        Self {
            deadline,
            ..Self::default()
        }
    }
}

/// The last attempt to reach a socket failed and the policy's deadline has
/// passed.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to {} within {timeout:?}: {last_error}", socket.display())]
pub struct DialError {
    pub socket: PathBuf,
    pub timeout: Duration,
    /// The innermost cause of the last attempt ("connection refused",
    /// "permission denied", "no such file or directory").
    pub last_error: String,
    /// The kind of the last attempt's I/O error, when it was one.
    pub kind: Option<std::io::ErrorKind>,
}

/// Opens one HTTP/2 connection to `socket`. The returned channel redials the
/// same socket by itself if the connection is lost later.
pub async fn dial(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    dial_endpoint(Endpoint::from_static(PLACEHOLDER_URI), socket).await
}

/// Like [`dial`], with the caller's endpoint settings (timeouts, window
/// sizes); the endpoint's URI only sets the `:authority`.
pub async fn dial_endpoint(
    endpoint: Endpoint,
    socket: &Path,
) -> Result<Channel, tonic::transport::Error> {
    let socket = socket.to_owned();
    endpoint
        .connect_with_connector(service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { UnixStream::connect(socket).await.map(TokioIo::new) }
        }))
        .await
}

/// Counts the connections a channel has opened: the channel redials by
/// itself after a connection is lost, and a caller can tell from a changed
/// count that the peer it talks to may be a different process now.
#[derive(Debug, Clone, Default)]
pub struct ConnectionCounter(pub(crate) Arc<AtomicU64>);

impl ConnectionCounter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Connections opened so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Like [`dial`], counting every connection the channel opens (the first
/// and every redial) in `counter`.
pub async fn dial_counting(
    socket: &Path,
    counter: ConnectionCounter,
) -> Result<Channel, tonic::transport::Error> {
    let socket = socket.to_owned();
    Endpoint::from_static(PLACEHOLDER_URI)
        .connect_with_connector(service_fn(move |_: Uri| {
            let socket = socket.clone();
            let counter = counter.clone();
            async move {
                let stream = UnixStream::connect(socket).await?;
                counter.0.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
}

/// Connects to `socket`, retrying with backoff until `policy.deadline`.
pub async fn connect(socket: &Path, policy: DialPolicy) -> Result<Channel, DialError> {
    connect_inner(socket, policy, None).await
}

/// [`connect`], counting the channel's connections in `counter`.
pub async fn connect_counting(
    socket: &Path,
    policy: DialPolicy,
    counter: ConnectionCounter,
) -> Result<Channel, DialError> {
    connect_inner(socket, policy, Some(counter)).await
}

async fn connect_inner(
    socket: &Path,
    policy: DialPolicy,
    counter: Option<ConnectionCounter>,
) -> Result<Channel, DialError> {
    let deadline = tokio::time::Instant::now() + policy.deadline;
    let mut backoff = policy.initial_backoff;
    loop {
        let attempt = match &counter {
            Some(counter) => dial_counting(socket, counter.clone()).await,
            None => dial(socket).await,
        };
        let error = match attempt {
            Ok(channel) => return Ok(channel),
            Err(error) => error,
        };
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(DialError {
                socket: socket.to_owned(),
                timeout: policy.deadline,
                last_error: root_cause(&error),
                kind: io_kind(&error),
            });
        }
        tokio::time::sleep(backoff.min(deadline - now)).await;
        backoff = (backoff * 2)
            .min(policy.max_backoff)
            .max(Duration::from_millis(1));
    }
}

/// The innermost cause of an error: what a person can act on.
pub fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

fn io_kind(error: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_missing_socket_fails_after_the_deadline_naming_the_cause() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("absent.sock");
        let error = connect(&socket, DialPolicy::within(Duration::from_millis(30)))
            .await
            .expect_err("nothing listens");
        assert_eq!(error.socket, socket);
        assert_eq!(error.kind, Some(std::io::ErrorKind::NotFound));
        assert!(error.to_string().contains("absent.sock"), "{error}");
    }

    #[tokio::test]
    async fn a_listening_socket_connects() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("up.sock");
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
        let accept = tokio::spawn(async move { listener.accept().await.map(|_| ()) });
        connect(&socket, DialPolicy::ONCE).await.expect("connects");
        accept.await.expect("join").expect("accepted");
    }

    #[tokio::test]
    async fn a_counting_channel_counts_its_connections() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("c.sock");
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
        let accept = tokio::spawn(async move { listener.accept().await.map(drop) });
        let counter = ConnectionCounter::new();
        assert_eq!(counter.get(), 0);
        let _channel = connect_counting(&socket, DialPolicy::ONCE, counter.clone())
            .await
            .expect("connects");
        assert_eq!(counter.get(), 1);
        accept.await.expect("join").expect("accepted");
        // A failed dial is not a connection.
        let missing = dir.path().join("missing.sock");
        let failed = ConnectionCounter::new();
        assert!(
            connect_counting(&missing, DialPolicy::ONCE, failed.clone())
                .await
                .is_err()
        );
        assert_eq!(failed.get(), 0);
    }
}
