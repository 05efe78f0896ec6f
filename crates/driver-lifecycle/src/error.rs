//! The one error type of this crate.

use std::fmt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// The last lines a driver wrote to stderr, printed one per line under the
/// error that carries them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StderrTail(pub Vec<String>);

impl fmt::Display for StderrTail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("\n  (the driver wrote nothing to stderr)");
        }
        f.write_str("\n  last stderr lines:")?;
        for line in &self.0 {
            write!(f, "\n    {line}")?;
        }
        Ok(())
    }
}

/// Everything that can go wrong while acquiring, supervising or tearing down
/// a driver endpoint, or while serving one.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error(
        "socket path {path:?} is {len} bytes; Unix socket paths are limited to {max} bytes. \
         Use a shorter run or state directory"
    )]
    SocketPathTooLong {
        path: PathBuf,
        len: usize,
        max: usize,
    },

    #[error("the socket path is empty; give a path such as /run/openshell/driver.sock")]
    EmptySocketPath,

    #[error("{path:?} is a symbolic link; a private run directory must be a real directory")]
    SymlinkedDirectory { path: PathBuf },

    #[error("{path:?} exists but is not a directory")]
    NotADirectory { path: PathBuf },

    #[error(
        "directory {path:?} can be entered by other users (mode {mode:o}); sockets are kept only \
         in a private directory, and an existing one is never changed: use a directory of its \
         own (for example a new subdirectory) or chmod 700 it"
    )]
    DirectoryNotPrivate { path: PathBuf, mode: u32 },

    #[error(
        "directory {path:?} is owned by uid {owner}, not by this process (uid {euid}); \
         remove it or choose another directory"
    )]
    DirectoryNotOwned {
        path: PathBuf,
        owner: u32,
        euid: u32,
    },

    #[error(
        "{path:?} exists and is a {kind}, not a socket; refusing to remove it. Move it away or choose another socket path"
    )]
    NotASocket { path: PathBuf, kind: &'static str },

    #[error(
        "socket {path:?} is owned by uid {owner}, not by this process (uid {euid}); refusing to remove it"
    )]
    SocketNotOwned {
        path: PathBuf,
        owner: u32,
        euid: u32,
    },

    #[error(
        "a server is already listening on {path:?}; stop it first or choose another socket path"
    )]
    LiveListener { path: PathBuf },

    #[error("socket {path:?} is in use: another process holds its lock file {lock:?}")]
    SocketLocked { path: PathBuf, lock: PathBuf },

    #[error("could not {action} {path:?}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("driver program {program:?} could not be started")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("driver '{name}' exited before it became ready ({status}){stderr}")]
    ExitedBeforeReady {
        name: String,
        status: ExitStatus,
        stderr: StderrTail,
    },

    #[error(
        "driver '{name}' did not become ready on {socket:?} within {timeout:?}{last}{stderr}",
        last = last_error.as_deref().map(|e| format!("; last attempt: {e}")).unwrap_or_default()
    )]
    ReadyTimeout {
        name: String,
        socket: PathBuf,
        timeout: Duration,
        last_error: Option<String>,
        stderr: StderrTail,
    },

    #[error("driver '{name}' wrote an unexpected line to its ready fd: {line:?}")]
    BadReadyLine { name: String, line: String },

    #[error("driver '{name}' answered on {socket:?} but GetCapabilities failed: {status}")]
    NotConfirmed {
        name: String,
        socket: PathBuf,
        status: Box<tonic::Status>,
    },

    #[error("could not connect to driver '{name}' at {socket:?} within {timeout:?}: {last_error}")]
    Dial {
        name: String,
        socket: PathBuf,
        timeout: Duration,
        last_error: String,
    },

    #[error(
        "processes of driver '{name}' (process group {pgid}) were still alive after shutdown: pids {pids:?}"
    )]
    Lingered {
        name: String,
        pgid: i32,
        pids: Vec<i32>,
    },

    #[error("driver '{name}' gave up: {reason}")]
    GaveUp { name: String, reason: String },

    #[error("the supervisor of driver '{name}' is gone")]
    SupervisorGone { name: String },

    #[error(
        "--bind-socket needs --expected-peer-pid (set by a gateway that spawns the driver) \
         or --allow-same-uid-peer (to let any process of this user attach)"
    )]
    PeerPolicyMissing,

    /// `--bind-tcp` and its TLS files: a missing flag, an unreadable or
    /// wrong file, an address that cannot be bound.
    #[error("{0}")]
    Tcp(String),

    #[error("the ready fd {fd} is not usable")]
    ReadyFd {
        fd: i32,
        #[source]
        source: std::io::Error,
    },

    #[error("parent process {pid} is already gone")]
    ParentGone { pid: u32 },

    #[error("serving gRPC on {path:?} failed")]
    Serve {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
}

impl LifecycleError {
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

/// Renders an error with its sources, `a: b: c`, skipping a source whose
/// text the message already contains. For one-line error reports.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = inner.source();
    }
    out
}

/// Shorthand for results of this crate.
pub type Result<T, E = LifecycleError> = std::result::Result<T, E>;
