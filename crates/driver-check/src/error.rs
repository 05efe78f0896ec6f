//! The crate's one error type: what stops a run before or outside the
//! checks themselves (a failed check is an outcome, not an error).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(
        "{} does not exist; start the driver first and pass the socket it binds (its --bind-socket)",
        .0.display()
    )]
    SocketMissing(PathBuf),
    #[error(
        "{} is not a Unix socket; pass the path the driver binds (its --bind-socket)",
        .0.display()
    )]
    NotASocket(PathBuf),
    #[error(
        "cannot connect to {socket}: {reason}; check that the driver is running, serving that socket, and accepts this user (e.g. --allow-same-uid-peer)"
    )]
    Connect { socket: String, reason: String },
    #[error("unknown check id {id:?} in {flag}; known ids: {known}")]
    UnknownCheck {
        id: String,
        flag: &'static str,
        known: String,
    },
    #[error("{flag} names no check; give a comma-separated list of ids")]
    EmptySelection { flag: &'static str },
    #[error("--only and --skip leave no check to run")]
    NothingSelected,
    #[error("{flag} must be a positive number of seconds, got {value:?}")]
    BadSeconds { flag: &'static str, value: String },
    #[error("could not write the report: {0}")]
    Output(#[from] std::io::Error),
    #[error("could not encode the report as JSON: {0}")]
    Json(#[from] serde_json::Error),
}

impl CheckError {
    /// Whether the error is the caller's to fix (exit code 2) rather than a
    /// fault while running (exit code 1).
    pub fn is_usage(&self) -> bool {
        !matches!(self, Self::Output(_) | Self::Json(_))
    }
}
