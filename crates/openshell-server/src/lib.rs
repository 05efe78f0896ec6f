//! The OpenShell gateway.
//!
//! It runs sandboxes through compute drivers: separate processes spoken to
//! over gRPC on Unix sockets (`openshell.compute.v1.ComputeDriver`). Each
//! driver is either spawned by the gateway (managed: `vm`, `podman`) or run
//! by the operator and attached (`NAME@/path/driver.sock`); after
//! acquisition both are used through the same [`driver::RemoteComputeDriver`].
//!
//! - [`config`] and [`selection`]: command line, environment, `gateway.toml`,
//!   and the rules that turn `--drivers` into driver plans;
//! - [`acquire`]: spawning or dialling a driver;
//! - [`registry`]: the named driver runtimes and their health;
//! - [`gateway`]: sandbox operations, driver observations, reconciliation,
//!   startup and shutdown sweeps; [`watcher`]: one watch task per driver;
//! - [`store`]: SQLite persistence; [`phase`]: public phase derivation;
//! - [`service`]: the public gRPC API; [`server`]: startup and shutdown order.

pub mod acquire;
pub mod config;
pub mod driver;
pub mod error;
pub mod gateway;
pub mod listen;
pub mod phase;
pub mod registry;
pub mod selection;
pub mod server;
pub mod service;
pub mod store;
pub mod translate;
pub mod validate;
pub mod watcher;

pub use error::{Error, Result};
