//! The one error type of this crate, and its one mapping to gRPC statuses.

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong in the driver: bad requests, a Podman engine
/// that is missing or misconfigured, and local state.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request itself is wrong; the message says which field and why.
    #[error("{0}")]
    InvalidArgument(String),

    /// The request is fine but the host is not ready for it (image missing,
    /// a setting of the driver or the engine needs changing).
    #[error("{0}")]
    FailedPrecondition(String),

    #[error("{0}")]
    NotFound(String),

    #[error("{0}")]
    AlreadyExists(String),

    /// No answer from the engine's socket at all.
    #[error("the Podman engine at {socket:?} cannot be reached: {reason}")]
    EngineUnavailable { socket: PathBuf, reason: String },

    /// The engine answered with an error status.
    #[error("Podman could not {action} (HTTP {status}): {message}")]
    Engine {
        action: String,
        status: u16,
        message: String,
    },

    /// The engine answered with something this driver cannot read.
    #[error("Podman answered {action} with something unexpected: {reason}")]
    Protocol { action: String, reason: String },

    #[error("{what} did not finish within {timeout:?}")]
    Timeout { what: String, timeout: Duration },

    /// A setting is invalid (from the driver config file or a flag).
    #[error("{0}")]
    Config(String),

    /// The driver config file could not be read or parsed.
    #[error("driver config {path:?}: {message}")]
    ConfigFile { path: PathBuf, message: String },

    #[error("could not {action} {path:?}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(transparent)]
    Lifecycle(#[from] driver_lifecycle::LifecycleError),

    /// A bug or a crash inside the driver.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }

    /// True when the engine could not be reached at all (as opposed to an
    /// engine that answered with an error).
    pub fn is_engine_unavailable(&self) -> bool {
        matches!(self, Self::EngineUnavailable { .. })
    }

    /// True for an engine answer of 404.
    pub fn is_engine_not_found(&self) -> bool {
        matches!(self, Self::Engine { status: 404, .. })
    }
}

pub use driver_lifecycle::error_chain as chain;

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        let message = chain(&error);
        match error {
            Error::InvalidArgument(_) => Self::invalid_argument(message),
            Error::FailedPrecondition(_) | Error::Config(_) | Error::ConfigFile { .. } => {
                Self::failed_precondition(message)
            }
            Error::NotFound(_) => Self::not_found(message),
            Error::AlreadyExists(_) => Self::already_exists(message),
            Error::EngineUnavailable { .. } => Self::unavailable(message),
            Error::Engine { status: 404, .. } => Self::not_found(message),
            Error::Engine { status: 409, .. } => Self::failed_precondition(message),
            Error::Timeout { .. } => Self::deadline_exceeded(message),
            Error::Engine { .. }
            | Error::Protocol { .. }
            | Error::Io { .. }
            | Error::Lifecycle(_)
            | Error::Internal(_) => Self::internal(message),
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_kind_of_error() {
        let cases = [
            (
                Error::InvalidArgument("x".into()),
                tonic::Code::InvalidArgument,
            ),
            (
                Error::FailedPrecondition("x".into()),
                tonic::Code::FailedPrecondition,
            ),
            (Error::NotFound("x".into()), tonic::Code::NotFound),
            (Error::AlreadyExists("x".into()), tonic::Code::AlreadyExists),
            (
                Error::EngineUnavailable {
                    socket: "/s".into(),
                    reason: "gone".into(),
                },
                tonic::Code::Unavailable,
            ),
            (
                Error::Engine {
                    action: "start".into(),
                    status: 404,
                    message: "no such container".into(),
                },
                tonic::Code::NotFound,
            ),
            (
                Error::Engine {
                    action: "start".into(),
                    status: 500,
                    message: "boom".into(),
                },
                tonic::Code::Internal,
            ),
            (
                Error::Timeout {
                    what: "stop".into(),
                    timeout: Duration::from_secs(1),
                },
                tonic::Code::DeadlineExceeded,
            ),
        ];
        for (error, code) in cases {
            let text = error.to_string();
            let status = tonic::Status::from(error);
            assert_eq!(status.code(), code, "{text}");
            assert_eq!(status.message(), text);
        }
    }

    #[test]
    fn chain_includes_sources_once() {
        let error = Error::io(
            "create directory",
            "/x",
            std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        );
        assert_eq!(
            chain(&error),
            "could not create directory \"/x\": permission denied"
        );
    }
}
