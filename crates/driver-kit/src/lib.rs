//! Driver-side pieces shared by every compute driver in this repository.
//!
//! - [`WatchFeed`]: the picture of a driver's sandboxes and the live
//!   `WatchSandboxes` stream built from it (snapshot on connect, then
//!   changes; a watcher that falls behind is resynchronised from a fresh
//!   snapshot, with `deleted` events for what vanished meanwhile);
//! - [`contract`]: the contract rules both peers apply (generation,
//!   1.x negotiation, the admission-policy string, conditions stamped in both
//!   time encodings);
//! - [`KeyLocks`]: one async lock per key (sandbox id), so changes to one
//!   sandbox happen one at a time, in arrival order;
//! - [`registry`]: registry settings checked alike by every driver that
//!   pulls.
//!
//! It depends only on the generated protocol code: nothing here knows how
//! a driver runs sandboxes or how it was started.

pub mod contract;
mod feed;
mod locks;
pub mod registry;

pub use feed::{WatchFeed, WatchStream, deleted_event, platform_event, sandbox_event};
pub use locks::{KeyGuard, KeyLocks};
