//! Transport pieces that every process of the compute plane shares and that
//! know nothing about drivers or sandboxes:
//!
//! - [`authority`]: lets stock gRPC clients, which send a percent-encoded
//!   socket path as `:authority`, reach our Unix-socket servers;
//! - [`uds`]: a tonic channel over a Unix socket, with bounded redial;
//! - [`paths`]: the default run directory and the gateway's default socket,
//!   so the gateway and the CLI agree on them by construction;
//! - [`limits`]: message size limits every client and server sets, and
//!   the request limits that keep one sandbox well inside them;
//! - [`tls`]: mutual TLS on TCP (rustls), for the CLI and remote drivers;
//! - [`time`]: the one wire format of timestamps carried in strings
//!   (RFC 3339, UTC).

pub mod authority;
pub mod limits;
pub mod paths;
pub mod time;
pub mod tls;
pub mod uds;

pub use uds::{ConnectionCounter, DialError, DialPolicy};
