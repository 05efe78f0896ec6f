//! `openshell-driver-check`: a conformance checker for compute drivers.
//!
//! It connects to a driver's Unix socket as a gateway would and runs the
//! behaviours of the `openshell.compute.v1.ComputeDriver` contract against
//! it, one named check at a time, then removes everything it created. The
//! catalogue of checks is [`catalog::CHECKS`]; `README.md` in this crate
//! explains each one for driver authors.

pub mod catalog;
pub mod error;
pub mod report;
pub mod runner;
pub mod watch;

pub use error::CheckError;
