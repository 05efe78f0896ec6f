//! The crate's error type and its one mapping to gRPC status codes.

use std::path::PathBuf;

/// Everything that can go wrong in the driver, the image cache and the VMM
/// child. Messages say what was wrong and, where there is something to do,
/// what to do; the `source` chain carries the system error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid sandbox id {id:?}: {reason}; a sandbox id must match [A-Za-z0-9._-]{{1,128}}")]
    InvalidId { id: String, reason: &'static str },

    /// A request the driver will never accept as given.
    #[error("{0}")]
    InvalidArgument(String),

    /// A request that could work, but not on this host or in this state.
    #[error("{0}")]
    FailedPrecondition(String),

    #[error("sandbox {0} not found")]
    NotFound(String),

    #[error("sandbox {0} already exists")]
    AlreadyExists(String),

    /// The host cannot run microVMs (see the preflight report).
    #[error("this host cannot run VM sandboxes: {0}")]
    HostUnsupported(String),

    #[error("driver config {path}: {message}")]
    Config { path: PathBuf, message: String },

    /// A registry auth file that cannot be used.
    #[error("registry auth file {path}: {message}")]
    RegistryAuth { path: PathBuf, message: String },

    #[error("invalid setting: {0}")]
    Setting(String),

    #[error("could not {action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        tool: String,
        status: String,
        stderr: String,
    },

    #[error("could not start {program}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A libkrun call returned a negative errno.
    #[error("libkrun {call} failed: {}", std::io::Error::from_raw_os_error(*.errno))]
    Krun { call: &'static str, errno: i32 },

    #[error("corrupt state file {path}: {message}")]
    CorruptState { path: PathBuf, message: String },
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
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for tonic::Status {
    fn from(error: Error) -> Self {
        use tonic::Code;
        let code = match &error {
            Error::InvalidId { .. } | Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::FailedPrecondition(_)
            | Error::HostUnsupported(_)
            | Error::Tool { .. }
            | Error::RegistryAuth { .. } => Code::FailedPrecondition,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::Config { .. }
            | Error::Setting(_)
            | Error::Io { .. }
            | Error::Spawn { .. }
            | Error::Krun { .. }
            | Error::CorruptState { .. } => Code::Internal,
        };
        tonic::Status::new(code, driver_lifecycle::error_chain(&error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_follow_the_contract() {
        let cases = [
            (
                Error::InvalidArgument("x".into()),
                tonic::Code::InvalidArgument,
            ),
            (
                Error::HostUnsupported("pvm".into()),
                tonic::Code::FailedPrecondition,
            ),
            (Error::NotFound("a".into()), tonic::Code::NotFound),
            (Error::AlreadyExists("a".into()), tonic::Code::AlreadyExists),
            (
                Error::io("read", "/x", std::io::Error::other("boom")),
                tonic::Code::Internal,
            ),
        ];
        for (error, code) in cases {
            assert_eq!(tonic::Status::from(error).code(), code);
        }
    }

    #[test]
    fn status_message_carries_the_source_chain() {
        let status = tonic::Status::from(Error::io(
            "read",
            "/state/x",
            std::io::Error::from_raw_os_error(libc::EACCES),
        ));
        assert!(status.message().contains("could not read /state/x"));
        assert!(status.message().contains("Permission denied"));
    }

    #[test]
    fn krun_errors_name_the_call_and_the_errno() {
        let text = Error::Krun {
            call: "krun_set_root",
            errno: libc::ENOENT,
        }
        .to_string();
        assert!(text.contains("krun_set_root"), "{text}");
        assert!(text.contains("No such file"), "{text}");
    }
}
