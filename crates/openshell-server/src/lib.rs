//! The OpenShell gateway.
//!
//! It runs sandboxes through compute drivers: separate processes spoken to
//! over gRPC on Unix sockets (`openshell.compute.v1.ComputeDriver`). Each
//! driver is either spawned by the gateway (managed: `vm`, `podman`) or run
//! by the operator and attached (`NAME@/path/driver.sock`); after
//! acquisition both are used through the same client.
//!
//! - [`config`] and [`selection`]: command line, environment, `gateway.toml`,
//!   and the rules that turn `--drivers` into driver plans;
//! - [`store`]: SQLite persistence; [`phase`]: public phase derivation.

pub mod config;
pub mod error;
pub mod listen;
pub mod phase;
pub mod selection;
pub mod store;
pub mod translate;
pub mod validate;

pub use error::{Error, Result};
