//! Podman's libpod REST API, spoken over its Unix socket.

pub mod client;
pub mod stream;
pub mod types;

pub use client::{Answer, Ping, Podman};
