//! The gateway's state machine, by responsibility:
//!
//! - [`operations`]: public operations on sandboxes (create, get, list,
//!   stop, start, delete, logs), stop and start sharing one transition;
//! - [`observe`]: driver observations applied to stored rows, and
//!   reconciliation against a driver's list;
//! - [`sweeps`]: the startup and shutdown sweeps;
//! - [`watch`]: the public WatchSandboxes stream.
//!
//! This module holds the [`Gateway`] itself and the row helpers they share.
//!
//! Locking: user operations on one sandbox take that sandbox's gate (a
//! [`KeyLocks`] entry per id) and re-read the row under it; driver observations
//! never take gates. Every row change is one read-modify-write transaction
//! in the store, so observations and operations interleave safely. Driver
//! calls are made without any lock held by the store. Mutating operations
//! run in their own task, so a client that goes away cannot strand a
//! transition half done.

pub mod observe;
pub mod operations;
pub mod orphans;
pub mod sweeps;
pub mod watch;

use std::sync::Arc;

use openshell_driver_kit::KeyLocks;
use openshell_proto::compute::v1::DriverSandbox;
use openshell_proto::gateway::v1::{self as gw, SandboxPhase};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tonic::Code;

pub use observe::apply_snapshot_to;

use crate::api::translate;
use crate::config::Timeouts;
use crate::drivers::registry::{DriverRuntime, Lookup, Registry};
use crate::error::{Error, Result};
use crate::phases::ready_false;
use crate::state::store::{SandboxRow, Store, Updated, now_ms};

/// Default and largest page of ListSandboxes.
pub const DEFAULT_PAGE_SIZE: usize = 100;
pub const MAX_PAGE_SIZE: usize = 1000;
/// Parallel driver calls in the startup and shutdown sweeps.
pub const SWEEP_CONCURRENCY: usize = 16;

/// A change inside the gateway, fanned out to public watchers.
#[derive(Debug, Clone)]
pub enum BusEvent {
    Changed(Arc<SandboxRow>),
    Deleted {
        id: String,
        name: String,
        driver: String,
    },
    Platform {
        driver: String,
        event: gw::PlatformEvent,
    },
    /// A driver became available or unavailable; its sandboxes' conditions
    /// changed.
    DriverState {
        driver: String,
    },
}

/// Driver status codes that leave it unclear whether the call took effect.
fn ambiguous(error: &Error) -> bool {
    match error {
        Error::DriverCall { code, .. } => matches!(
            code,
            Code::Unknown
                | Code::Internal
                | Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Cancelled
                | Code::Aborted
                | Code::DataLoss
        ),
        Error::DriverUnavailable { .. } | Error::DriverTimeout { .. } => true,
        _ => false,
    }
}

/// A status the client library makes up when the connection under a call
/// breaks (the driver did not send it).
fn connection_lost(code: Code, message: &str) -> bool {
    code == Code::Cancelled
        || (code == Code::Unknown
            && (message.starts_with("transport error") || message.starts_with("h2 protocol error")))
}

/// Whether the driver answered the failed call (with an error status), as
/// opposed to not answering in time or not being reachable: only then is a
/// follow-up call worth making.
fn answered(error: &Error) -> bool {
    matches!(error, Error::DriverCall { code, message, .. } if !connection_lost(*code, message))
}

/// The gateway condition reasons of Error rows whose sandbox may never have
/// reached the driver (or that the driver lost).
pub(crate) const CREATE_FAILED: &str = "CreateFailed";
pub(crate) const RESOURCE_MISSING: &str = "ComputeResourceMissing";

/// An Error row the gateway marked because its create failed or the
/// driver lost it: one the driver confirming absence may remove.
pub(crate) fn never_reached_driver(row: &SandboxRow) -> bool {
    row.phase == SandboxPhase::Error
        && row
            .gateway_condition
            .as_ref()
            .is_some_and(|c| c.reason == CREATE_FAILED)
}

fn is_not_found(error: &Error) -> bool {
    matches!(
        error,
        Error::DriverCall {
            code: Code::NotFound,
            ..
        }
    )
}

fn join_error(error: &tokio::task::JoinError) -> Error {
    Error::Internal(format!("the operation's task failed: {error}"))
}

/// The gateway.
#[derive(Debug)]
pub struct Gateway {
    pub store: Store,
    pub registry: Registry,
    bus: broadcast::Sender<BusEvent>,
    gates: Arc<KeyLocks>,
    pub timeouts: Timeouts,
    /// The API address, for GetGatewayInfo.
    pub listen: String,
    /// Cancelled when the gateway starts shutting down: long-lived streams
    /// end and new mutations are refused.
    pub shutdown: CancellationToken,
    /// Per driver, the sandboxes its last reconcile listed that have no
    /// row (see [`orphans`]).
    orphans: std::sync::Mutex<std::collections::HashMap<String, Vec<DriverSandbox>>>,
    /// Open public watches and their limit.
    pub watches: watch::WatchLimits,
}

impl Gateway {
    pub fn new(store: Store, registry: Registry, timeouts: Timeouts, listen: String) -> Self {
        let (bus, _) = broadcast::channel(4096);
        Self {
            store,
            registry,
            bus,
            gates: KeyLocks::new(),
            timeouts,
            listen,
            shutdown: CancellationToken::new(),
            orphans: std::sync::Mutex::default(),
            watches: watch::WatchLimits::default(),
        }
    }

    /// Runs a store operation on the blocking pool.
    pub async fn db<T, F>(&self, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T> + Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || op(&store))
            .await
            .map_err(|e| join_error(&e))?
    }

    pub fn subscribe(&self) -> broadcast::Receiver<BusEvent> {
        self.bus.subscribe()
    }

    pub(crate) fn publish(&self, event: BusEvent) {
        // Row changes reach public watches through the store's feed, in
        // commit order; keeping them here too would only hold a copy of
        // every recent row in the bus.
        if matches!(event, BusEvent::Changed(_) | BusEvent::Deleted { .. }) {
            return;
        }
        // No subscribers is fine.
        let _ = self.bus.send(event);
    }

    /// Tells public watchers that a driver's availability changed.
    pub(crate) fn publish_driver_state(&self, driver: &str) {
        self.publish(BusEvent::DriverState {
            driver: driver.to_owned(),
        });
    }

    fn publish_row(&self, row: SandboxRow) {
        self.publish(BusEvent::Changed(Arc::new(row)));
    }

    /// The public view of a row, with the driver's availability condition.
    pub fn view(&self, row: &SandboxRow) -> gw::Sandbox {
        translate::public_sandbox(row, self.registry.condition_for(&row.driver))
    }

    fn ensure_running(&self) -> Result<()> {
        if self.shutdown.is_cancelled() {
            Err(Error::ShuttingDown)
        } else {
            Ok(())
        }
    }

    fn runtime_for(&self, row: &SandboxRow) -> Result<Arc<DriverRuntime>> {
        match self.registry.lookup(&row.driver) {
            Lookup::Ready(runtime) => Ok(runtime),
            Lookup::Pending(pending) => Err(Registry::pending_error(&pending)),
            Lookup::NotConfigured => Err(Error::FailedPrecondition(format!(
                "sandbox '{}' belongs to driver '{}', which is not configured in this gateway \
                 (configured: {}); configure that driver again to manage the sandbox",
                row.name,
                row.driver,
                self.registry.names()
            ))),
        }
    }

    /// Replaces a transport failure with the driver's known state, and wakes
    /// the watch task when a call got through to a driver marked down.
    fn driver_result<T>(&self, runtime: &DriverRuntime, result: Result<T>) -> Result<T> {
        match result {
            Ok(value) => {
                if !runtime.is_available() {
                    runtime.wake.notify_one();
                }
                Ok(value)
            }
            Err(Error::DriverUnavailable { .. }) if !runtime.is_available() => {
                Err(runtime.unavailable())
            }
            // CANCELLED before the deadline, or a transport error: the
            // connection went away under the call (the driver died or was
            // replaced). Say so.
            Err(Error::DriverCall {
                code, message, rpc, ..
            }) if connection_lost(code, &message) => Err(if runtime.is_available() {
                Error::DriverUnavailable {
                    driver: runtime.name.clone(),
                    reason: format!("the connection was lost during {rpc}: {message}"),
                }
            } else {
                runtime.unavailable()
            }),
            Err(error) => Err(error),
        }
    }

    async fn update(
        &self,
        id: &str,
        change: impl FnOnce(&mut SandboxRow) -> bool + Send + 'static,
    ) -> Result<Updated> {
        let id = id.to_owned();
        let updated = self.db(move |s| s.update(&id, change)).await?;
        if let Updated::Changed(row) = &updated {
            self.publish_row(row.clone());
        }
        Ok(updated)
    }

    async fn remove_row(&self, id: &str) -> Result<Option<SandboxRow>> {
        let key = id.to_owned();
        let removed = self.db(move |s| s.remove(&key)).await?;
        if let Some(row) = &removed {
            self.publish(BusEvent::Deleted {
                id: row.id.clone(),
                name: row.name.clone(),
                driver: row.driver.clone(),
            });
            tracing::info!(sandbox = %row.name, id = %row.id, driver = %row.driver, "sandbox deleted");
        }
        Ok(removed)
    }

    /// The stored row of sandbox `id`, if it still exists.
    async fn row(&self, id: &str) -> Result<Option<SandboxRow>> {
        let key = id.to_owned();
        self.db(move |s| s.get(&key)).await
    }

    async fn latest(&self, id: &str, fallback: SandboxRow) -> Result<SandboxRow> {
        Ok(self.row(id).await?.unwrap_or(fallback))
    }

    /// Marks a row Error with a gateway condition.
    async fn mark_error(&self, id: &str, reason: &'static str, message: String) -> Result<()> {
        self.update(id, move |row| {
            if row.phase == SandboxPhase::Error {
                return false;
            }
            row.phase = SandboxPhase::Error;
            row.gateway_condition = Some(ready_false(reason, &message, now_ms()));
            true
        })
        .await
        .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ambiguity() {
        let call = |code| Error::DriverCall {
            driver: "d".into(),
            rpc: "StopSandbox",
            code,
            message: String::new(),
        };
        assert!(ambiguous(&call(Code::Internal)));
        assert!(ambiguous(&call(Code::Unknown)));
        assert!(!ambiguous(&call(Code::FailedPrecondition)));
        assert!(!ambiguous(&call(Code::NotFound)));
        assert!(is_not_found(&call(Code::NotFound)));
        assert!(ambiguous(&Error::DriverUnavailable {
            driver: "d".into(),
            reason: String::new()
        }));
    }
}
