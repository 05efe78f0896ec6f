//! `openshell-driver-vm`: a compute driver that runs each sandbox in its
//! own microVM (libkrun, or QEMU `-M microvm`).
//!
//! The binary serves `openshell.compute.v1.ComputeDriver` (and the optional
//! log service) on a Unix socket through `driver_lifecycle::serve_uds`.
//! Each running sandbox is one VMM child: the same executable re-run as
//! `openshell-driver-vm vmm <launch-file>`, which configures libkrun and
//! hands the process over to the VM. See `architecture/vm-driver.md`.

pub mod config;
pub mod console;
pub mod driver;
pub mod error;
pub mod ids;
pub mod image;
pub mod launch;
pub mod launcher;
pub mod layer;
pub(crate) mod libkrun;
pub mod passt;
pub mod preflight;
pub mod qemu;
pub mod registry;
pub mod service;
pub mod spec;
pub mod state;
pub mod status;
pub mod vmm;

pub use error::{Error, Result};
