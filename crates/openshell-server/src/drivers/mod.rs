//! Compute drivers, in two halves.
//!
//! **Acquisition** turns configuration into a live endpoint:
//! [`plan`] → [`select`] (with the [`managed`] table) → [`acquire`].
//!
//! **Consumption** uses an acquired endpoint without knowing how it was
//! acquired: [`remote`] (gRPC client) → [`registry`] (runtimes, health) →
//! [`watcher`] (observations into the gateway).

// Acquisition.
pub mod acquire;
pub mod managed;
pub mod plan;
pub mod select;

// Consumption.
pub mod registry;
pub mod remote;
pub mod watcher;
