//! `openshell-driver-vm`: a compute driver that runs each sandbox in its
//! own libkrun microVM. See `architecture/vm-driver.md`.

pub mod config;
pub mod error;
pub mod ids;
pub mod image;
pub mod launch;
pub mod layer;
mod libkrun;
pub mod preflight;
pub mod state;
pub mod vmm;

pub use error::{Error, Result};
