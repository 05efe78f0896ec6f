//! The one error type of the gateway crate, and its one mapping to gRPC
//! status codes.

use std::path::PathBuf;
use std::time::Duration;

use driver_lifecycle::LifecycleError;
use tonic::{Code, Status};

/// Everything that can go wrong in the gateway: configuration, startup,
/// drivers, the store, and requests.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration or driver-selection problem. The message names the
    /// offending setting and says how to fix it.
    #[error("{0}")]
    Config(String),

    #[error("could not read config file {path}")]
    ConfigRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("config file {path} is not valid TOML: {message}")]
    ConfigSyntax { path: PathBuf, message: String },

    #[error(
        "no executable for driver '{name}' ({program}); looked at: {looked}. \
         Install it next to openshell-gateway or on PATH, or set \
         [openshell.drivers.{name}] binary = \"/absolute/path\"",
        looked = looked.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    DriverBinaryNotFound {
        name: String,
        program: String,
        looked: Vec<PathBuf>,
    },

    /// Acquiring, supervising or stopping a driver failed.
    #[error("{}", lifecycle_message(driver, source))]
    Lifecycle {
        driver: String,
        #[source]
        source: Box<LifecycleError>,
    },

    #[error(
        "driver '{driver}' at {socket} reports its name as '{actual}', but \
         [openshell.drivers.{driver}] expect_driver_name is '{expected}'; \
         check that the socket belongs to the driver you meant"
    )]
    DriverNameMismatch {
        driver: String,
        socket: PathBuf,
        expected: String,
        actual: String,
    },

    #[error("driver '{driver}' failed {rpc} during startup ({code:?}): {message}")]
    DriverInit {
        driver: String,
        rpc: &'static str,
        code: Code,
        message: String,
    },

    /// A 1.x driver whose negotiation metadata is incompatible with this
    /// gateway. Terminal: retrying cannot help.
    #[error("driver '{driver}' cannot be used: {reason}")]
    DriverIncompatible { driver: String, reason: String },

    /// A driver's admission policy is not the one configured, or changed
    /// since the gateway first read it.
    #[error(
        "driver '{driver}': {reason}; expected {expected:?}, the driver acknowledges {actual:?}"
    )]
    AdmissionMismatch {
        driver: String,
        reason: &'static str,
        expected: String,
        actual: String,
    },

    #[error("could not {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "another gateway is using the state directory {path} (its lock {lock} is held); \
         stop that gateway or choose another --state-dir"
    )]
    StateDirLocked { path: PathBuf, lock: PathBuf },

    #[error("state database: could not {action}")]
    Store {
        action: String,
        #[source]
        source: rusqlite::Error,
    },

    #[error("state database {path}: {message}")]
    StoreSchema { path: PathBuf, message: String },

    // Request errors.
    #[error("{0}")]
    InvalidArgument(String),

    #[error("{0}")]
    NotFound(String),

    #[error("{0}")]
    AlreadyExists(String),

    #[error("{0}")]
    FailedPrecondition(String),

    /// The driver cannot be reached (down, restarting, gave up).
    #[error("driver '{driver}' is unavailable: {reason}")]
    DriverUnavailable { driver: String, reason: String },

    /// The driver answered a call with an error status.
    #[error("driver '{driver}' failed {rpc}: {message}")]
    DriverCall {
        driver: String,
        rpc: &'static str,
        code: Code,
        message: String,
    },

    #[error("driver '{driver}' did not answer {rpc} within {timeout:?}")]
    DriverTimeout {
        driver: String,
        rpc: &'static str,
        timeout: Duration,
    },

    #[error("the gateway is shutting down")]
    ShuttingDown,

    #[error("{0}")]
    Internal(String),
}

fn lifecycle_message(driver: &str, source: &LifecycleError) -> String {
    let text = source.to_string();
    if text.contains(&format!("'{driver}'")) {
        text
    } else {
        format!("driver '{driver}': {text}")
    }
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

    pub fn lifecycle(driver: impl Into<String>, source: LifecycleError) -> Self {
        Self::Lifecycle {
            driver: driver.into(),
            source: Box::new(source),
        }
    }

    pub(crate) fn store(action: impl Into<String>, source: rusqlite::Error) -> Self {
        Self::Store {
            action: action.into(),
            source,
        }
    }

    /// The gRPC code this error is reported with.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument(_) | Self::Config(_) => Code::InvalidArgument,
            Self::NotFound(_) => Code::NotFound,
            Self::AlreadyExists(_) => Code::AlreadyExists,
            Self::FailedPrecondition(_)
            | Self::DriverIncompatible { .. }
            | Self::AdmissionMismatch { .. } => Code::FailedPrecondition,
            Self::DriverUnavailable { .. } | Self::ShuttingDown => Code::Unavailable,
            Self::DriverCall { code, .. } => *code,
            Self::DriverTimeout { .. } => Code::DeadlineExceeded,
            Self::ConfigRead { .. }
            | Self::ConfigSyntax { .. }
            | Self::DriverBinaryNotFound { .. }
            | Self::Lifecycle { .. }
            | Self::DriverNameMismatch { .. }
            | Self::DriverInit { .. }
            | Self::Io { .. }
            | Self::StateDirLocked { .. }
            | Self::Store { .. }
            | Self::StoreSchema { .. }
            | Self::Internal(_) => Code::Internal,
        }
    }

    /// True for configuration errors (reported before anything starts).
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            Self::Config(_) | Self::ConfigRead { .. } | Self::ConfigSyntax { .. }
        )
    }
}

pub use driver_lifecycle::error_chain;

/// The one place where gateway errors become gRPC statuses.
impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let code = error.code();
        if code == Code::Internal {
            tracing::warn!(error = %error_chain(&error), "request failed");
        }
        Status::new(code, error_chain(&error))
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
