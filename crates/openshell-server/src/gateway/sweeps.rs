//! The startup and shutdown sweeps, and the check for stored sandboxes
//! whose driver is not configured.

use std::sync::{Arc, Mutex, PoisonError};

use futures::StreamExt as _;
use openshell_proto::gateway::v1::SandboxPhase;

use super::{Gateway, SWEEP_CONCURRENCY, is_not_found};
use crate::drivers::registry::DriverRuntime;
use crate::error::Result;
use crate::phases::has_running_intent;
use crate::state::store::SandboxRow;

impl Gateway {
    /// Startup recovery for one driver: finish interrupted stops and
    /// deletes, re-drive interrupted starts, and, for drivers whose
    /// lifecycle the gateway manages, start every sandbox with running
    /// intent. Failures are logged and recorded on the rows.
    pub async fn startup_sweep(&self, runtime: &Arc<DriverRuntime>) -> Result<()> {
        let name = runtime.name.clone();
        let rows = self.db(move |s| s.rows_of_driver(&name)).await?;
        let manages = runtime.capabilities.gateway_manages_lifecycle;
        let work: Vec<SandboxRow> = rows
            .into_iter()
            .filter(|r| {
                matches!(
                    r.phase,
                    SandboxPhase::Stopping | SandboxPhase::Deleting | SandboxPhase::Starting
                ) || (manages && has_running_intent(r.phase))
            })
            .collect();
        if work.is_empty() {
            return Ok(());
        }
        tracing::info!(driver = %runtime.name, sandboxes = work.len(), gateway_manages_lifecycle = manages, "resuming sandboxes");
        futures::stream::iter(work)
            .for_each_concurrent(SWEEP_CONCURRENCY, |row| async move {
                if let Err(error) = self.resume(runtime, &row).await {
                    tracing::warn!(sandbox = %row.name, driver = %runtime.name, error = %error, "could not resume sandbox");
                }
            })
            .await;
        Ok(())
    }

    async fn resume(&self, runtime: &DriverRuntime, row: &SandboxRow) -> Result<()> {
        let driver = &runtime.driver;
        match row.phase {
            SandboxPhase::Stopping => {
                driver.stop(&row.id, &row.name).await?;
                self.settle(&row.id, SandboxPhase::Stopping, SandboxPhase::Stopped)
                    .await?;
            }
            SandboxPhase::Deleting => match driver.delete(&row.id, &row.name).await {
                Ok(false) => drop(self.remove_row(&row.id).await?),
                Ok(true) => {}
                Err(error) if is_not_found(&error) => drop(self.remove_row(&row.id).await?),
                Err(error) => return Err(error),
            },
            _ => match driver.start(&row.id, &row.name).await {
                Ok(()) => {}
                Err(error) if is_not_found(&error) => {
                    self.mark_error(
                        &row.id,
                        "BackendResourceMissing",
                        format!(
                            "driver '{}' lost the sandbox while the gateway was offline",
                            runtime.name
                        ),
                    )
                    .await?;
                }
                Err(error) => {
                    if runtime.capabilities.gateway_manages_lifecycle {
                        self.mark_error(
                            &row.id,
                            "StartFailed",
                            format!("start after gateway restart failed: {error}"),
                        )
                        .await?;
                    }
                    return Err(error);
                }
            },
        }
        Ok(())
    }

    /// Shutdown: stops every running-intent sandbox of drivers whose
    /// lifecycle the gateway manages, without changing what is stored (so
    /// they start again with the gateway). Returns the failures.
    pub async fn shutdown_sweep(&self) -> Vec<String> {
        let failures = Mutex::new(Vec::new());
        for runtime in self.registry.iter() {
            let runtime = &runtime;
            if !runtime.capabilities.gateway_manages_lifecycle {
                continue;
            }
            let name = runtime.name.clone();
            let rows = match self.db(move |s| s.rows_of_driver(&name)).await {
                Ok(rows) => rows,
                Err(error) => {
                    failures
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(format!("driver '{}': {error}", runtime.name));
                    continue;
                }
            };
            let running: Vec<SandboxRow> = rows
                .into_iter()
                .filter(|r| has_running_intent(r.phase))
                .collect();
            if running.is_empty() {
                continue;
            }
            tracing::info!(driver = %runtime.name, sandboxes = running.len(), "stopping sandboxes for shutdown");
            futures::stream::iter(running)
                .for_each_concurrent(SWEEP_CONCURRENCY, |row| {
                    let failures = &failures;
                    async move {
                        if let Err(error) = runtime.driver.stop(&row.id, &row.name).await {
                            failures
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .push(format!("sandbox '{}': {error}", row.name));
                        }
                    }
                })
                .await;
        }
        failures
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Warns about stored sandboxes whose driver is not configured.
    pub async fn report_orphaned_drivers(&self) -> Result<()> {
        for (driver, count) in self.db(|s| s.driver_counts()).await? {
            if !self.registry.is_configured(&driver) {
                tracing::warn!(driver = %driver, sandboxes = count, "stored sandboxes belong to a driver that is not configured; they are listed but cannot be changed until it is configured again");
            }
        }
        Ok(())
    }
}
