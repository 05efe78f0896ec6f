//! Acquisition of compute-driver endpoints.
//!
//! A gateway gets every driver endpoint one of two ways and then uses them
//! all the same way:
//!
//! - **managed**: [`ManagedDriverProcess::spawn`] starts the driver binary in
//!   its own process group with an allowlisted environment and a ready fd,
//!   waits for the ready line (or polls the socket for drivers that ignore
//!   the fd), then supervises it: a driver that dies is respawned with capped
//!   exponential backoff and subscribers see [`DriverHealth`] changes.
//! - **attached**: the operator runs the driver; [`DriverGuard::Attached`]
//!   never spawns, signals or unlinks anything.
//!
//! Either way the result is a [`DriverEndpoint`] plus a [`DriverGuard`], and
//! [`connect`] gives a tonic channel over the Unix socket.
//!
//! The driver side uses [`serve_uds`] (flags in [`ServeArgs`]) to bind its
//! socket under the same rules: a private 0700 directory, an exclusive lock
//! next to the socket, stale sockets removed only when nothing listens, a
//! `sun_path` length check, a 0600 socket, and peers filtered by uid (and
//! pid, when the spawner said who it is). With `--bind-tcp` it also serves
//! on TCP, always with mutual TLS (a gateway on another host attaches with
//! `NAME@https://HOST:PORT` and a client certificate the driver trusts).

mod endpoint;
mod error;
mod guard;
pub mod proc;
mod server;
pub mod socket;
mod spawn;
mod sys;

pub use endpoint::{DialPolicy, DriverEndpoint, connect, connect_counting, connect_with};
pub use error::{LifecycleError, Result, StderrTail, error_chain};
pub use guard::{DriverGuard, DriverHealth, ManagedDriverProcess, ShutdownReport};
pub use server::{
    LogStderr, PeerPolicy, ServeArgs, ServeExit, ServeOptions, TcpServe, close_inherited_fds,
    serve_uds, tls_accept_stream,
};
pub use spawn::{
    DEFAULT_ENV_ALLOWLIST, DriverCommand, PARENT_PID_ENV, READY_FD_ENV, READY_LINE_PREFIX,
    READY_PROTOCOL_VERSION, Readiness, RestartPolicy, SpawnOptions, spawn_lock,
};
pub use tokio_util::sync::CancellationToken;

/// Process-exit notification through pidfds, for supervisors that watch
/// children of their own (the VM driver's VMM processes, say).
pub mod pidfd {
    pub use crate::sys::{exit_watch, pidfd_open, register_pidfd};
}
