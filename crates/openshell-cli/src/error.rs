//! The CLI's error type and its exit codes.

/// Everything that ends a command unsuccessfully. Each variant maps to one
/// documented exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A bad command-line value that clap could not catch.
    #[error("{0}")]
    Usage(String),

    #[error(
        "cannot reach the gateway at {address}: {reason}\n  \
         is openshell-gateway running? Point at it with --gateway or OPENSHELL_GATEWAY"
    )]
    Unreachable { address: String, reason: String },

    /// The gateway answered with an error status.
    #[error("{message} ({})", code_name(*code))]
    Request { code: tonic::Code, message: String },

    #[error("sandbox '{name}' failed: {reason}")]
    SandboxFailed { name: String, reason: String },

    #[error(
        "timed out after {secs} s waiting for sandbox '{name}' ({waiting_for}); last phase: {phase}"
    )]
    Timeout {
        name: String,
        secs: u64,
        waiting_for: &'static str,
        phase: String,
    },

    #[error("could not write output")]
    Output(#[from] std::io::Error),
}

impl From<tonic::Status> for CliError {
    fn from(status: tonic::Status) -> Self {
        // A TLS refusal that only shows on the first call (TLS 1.3: the
        // server checks our certificate after our side finished) comes as
        // a bare "transport error"; say what it was.
        let transport = std::error::Error::source(&status)
            .map(openshell_wire::uds::root_cause)
            .map(|cause| {
                let reason = openshell_wire::tls::explain(&cause);
                if reason.starts_with("TLS:") {
                    reason
                } else {
                    format!(
                        "the gateway closed the connection ({cause}); with an https:// \
                         gateway this means it refused our client certificate: check that \
                         --tls-cert is signed by the gateway's client CA"
                    )
                }
            });
        let message = if let Some(reason) = transport {
            reason
        } else if status.message().is_empty() {
            status.code().description().to_owned()
        } else {
            status.message().to_owned()
        };
        Self::Request {
            code: status.code(),
            message,
        }
    }
}

impl CliError {
    /// Exit codes: 1 the gateway refused the request, 2 bad usage, 3 the
    /// gateway cannot be reached, 4 the sandbox ended up failed, 5 waiting
    /// timed out.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Request { .. } | Self::Output(_) => 1,
            Self::Usage(_) => 2,
            Self::Unreachable { .. } => 3,
            Self::SandboxFailed { .. } => 4,
            Self::Timeout { .. } => 5,
        }
    }
}

/// The canonical gRPC name of a status code, as operators see it in logs.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_becomes_one_line_with_the_code() {
        let err = CliError::from(tonic::Status::already_exists(
            "sandbox 'web' already exists",
        ));
        assert_eq!(
            err.to_string(),
            "sandbox 'web' already exists (ALREADY_EXISTS)"
        );
        assert_eq!(err.exit_code(), 1);
    }

    #[test]
    fn empty_status_message_falls_back_to_the_code_description() {
        let err = CliError::from(tonic::Status::new(tonic::Code::Unavailable, ""));
        assert!(err.to_string().ends_with("(UNAVAILABLE)"), "{err}");
        assert!(err.to_string().len() > "(UNAVAILABLE)".len());
    }

    #[test]
    fn exit_codes_are_distinct_per_kind() {
        let codes = [
            CliError::Usage(String::new()).exit_code(),
            CliError::Unreachable {
                address: String::new(),
                reason: String::new(),
            }
            .exit_code(),
            CliError::SandboxFailed {
                name: String::new(),
                reason: String::new(),
            }
            .exit_code(),
            CliError::Timeout {
                name: String::new(),
                secs: 1,
                waiting_for: "",
                phase: String::new(),
            }
            .exit_code(),
        ];
        assert_eq!(codes, [2, 3, 4, 5]);
    }
}
