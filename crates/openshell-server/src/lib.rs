//! The OpenShell gateway.
//!
//! It runs sandboxes through compute drivers: separate processes spoken to
//! over gRPC on Unix sockets (`openshell.compute.v1.ComputeDriver`). The
//! source tree is the map:
//!
//! - [`drivers`]: everything about drivers, in two halves.
//!   - **Acquisition** (getting a driver endpoint): [`drivers::plan`] (what
//!     the operator asked for), [`drivers::managed`] (the one table of
//!     drivers the gateway can run itself), [`drivers::select`] (`--drivers`
//!     and friends turned into plans), [`drivers::acquire`] (spawning a
//!     managed driver or dialling an attached one).
//!   - **Consumption** (using it, whichever way it came):
//!     [`drivers::remote`] (the gRPC client, [`drivers::remote::RemoteComputeDriver`]),
//!     [`drivers::registry`] (named runtimes and their health),
//!     [`drivers::watcher`] (one watch task per driver).
//! - [`gateway`]: the sandbox model: operations, observation and
//!   reconciliation, startup/shutdown sweeps, the public watch.
//! - [`api`]: the public gRPC service, translation to and from driver
//!   messages, request validation, listen addresses.
//! - [`state`]: SQLite persistence; [`phases`]: public phase derivation.
//! - [`config`] (command line and `gateway.toml`), [`settings`] (them
//!   merged, drivers selected), [`server`] (startup and shutdown order),
//!   [`certs`] (`openshell-gateway certs init`), [`error`], [`memory`]
//!   (returning freed heap to the system).

pub mod api;
pub mod certs;
pub mod config;
pub mod drivers;
pub mod error;
pub mod gateway;
pub mod memory;
pub mod phases;
pub mod server;
pub mod settings;
pub mod state;

pub use error::{Error, Result};
