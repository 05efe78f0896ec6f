//! The public API: the gRPC service ([`service`]), conversion between
//! gateway rows and wire messages ([`translate`]), request checks
//! ([`validate`]) and listen addresses ([`listen`]).

pub mod http2;
pub mod listen;
pub mod service;
pub mod translate;
pub mod validate;
