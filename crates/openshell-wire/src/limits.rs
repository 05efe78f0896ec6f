//! Message size limits, set deliberately on every gRPC client and server of
//! the compute plane (the gateway's public server and its clients to
//! drivers, the CLI, the drivers' servers) instead of tonic's defaults
//! (4 MiB to receive, unbounded to send), which differ from peer to peer.
//!
//! What bounds a message:
//!
//! - one sandbox: the gateway's request limits (argv, environment, labels,
//!   image, resources; at most [`MAX_SANDBOX_REQUEST_BYTES`] in all) plus
//!   what its driver reports about it;
//! - a public `ListSandboxes` page: at most 1000 sandboxes and
//!   [`LIST_PAGE_BYTES`], always at least one sandbox;
//! - a public watch event: one sandbox;
//! - a driver's `ListSandboxes` reply: the contract has no paging, so it is
//!   the driver's whole inventory in one message, bounded only by
//!   [`MAX_DRIVER_LIST_BYTES`].

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

/// Every message a client or server of the public API or of the compute
/// contract sends or accepts, in either direction, except a driver's
/// `ListSandboxes` reply.
pub const MAX_MESSAGE_BYTES: usize = 16 * MIB;

/// A driver's `ListSandboxes` reply, which a driver sends and a gateway
/// accepts: the largest message gRPC can frame (its length prefix is 32
/// bits). The contract lists a driver's every sandbox in one unpaged
/// message, and a gateway that refused it could never reconcile that
/// driver again; at about 400 bytes per ordinary sandbox that is some ten
/// million sandboxes, or about 7000 of the largest the gateway admits.
pub const MAX_DRIVER_LIST_BYTES: usize = 4 * 1024 * MIB - 1;

/// What one page of the public `ListSandboxes` may hold, in encoded bytes of
/// sandboxes: a page ends early once the next sandbox would pass it (a page
/// holds at least one sandbox). Half of the 4 MiB that stock gRPC clients
/// accept by default, so they can page through any gateway.
pub const LIST_PAGE_BYTES: usize = 2 * MIB;

/// The whole of one sandbox's request (spec and labels, encoded), so that a
/// sandbox always fits in a message with room for its status.
pub const MAX_SANDBOX_REQUEST_BYTES: usize = 512 * KIB;

/// `spec.command`: the argv bytes (each argument plus its terminating NUL).
pub const MAX_COMMAND_BYTES: usize = 256 * KIB;

/// `spec.command`: how many arguments.
pub const MAX_COMMAND_ARGS: usize = 4096;

/// `spec.env`: the environment's bytes (each `NAME=value` plus its NUL).
pub const MAX_ENV_BYTES: usize = 256 * KIB;

/// `spec.env`: how many variables.
pub const MAX_ENV_VARS: usize = 4096;

/// How many labels one sandbox may carry.
pub const MAX_LABELS: usize = 64;

/// How much of a caller's input an error message repeats.
pub const ECHO_BYTES: usize = 100;

/// The longest error message a gateway sends: a status message travels in
/// an HTTP/2 header, which clients refuse past a few KiB.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 4 * KIB;

const _: () = assert!(4 * MAX_SANDBOX_REQUEST_BYTES <= LIST_PAGE_BYTES);
const _: () = assert!(2 * LIST_PAGE_BYTES <= MAX_MESSAGE_BYTES);
const _: () = assert!(MAX_MESSAGE_BYTES < MAX_DRIVER_LIST_BYTES);
