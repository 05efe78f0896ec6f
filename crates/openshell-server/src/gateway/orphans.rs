//! Orphans: sandboxes a driver reports that the gateway has no row for.
//! They appear when the gateway's state was lost or replaced (a deleted or
//! truncated `gateway.db`), or when another gateway shares the driver.
//! Reconcile records them per driver and logs each new one; ListOrphans
//! shows them, AdoptOrphan records one as the driver reports it, and
//! DeleteOrphan asks the driver to delete one.

use std::collections::HashSet;
use std::sync::{Arc, PoisonError};

use openshell_proto::compute::v1::DriverSandbox;
use openshell_proto::gateway::v1::{self as gw, SandboxPhase};

use super::Gateway;
use crate::api::validate;
use crate::drivers::registry::{DriverRuntime, Lookup, Registry};
use crate::error::{Error, Result};
use crate::phases::converged_phase;
use crate::state::store::{Inserted, SandboxRow, now_ms};

fn orphan_view(driver: &str, sandbox: &DriverSandbox) -> gw::Orphan {
    let phase = sandbox
        .status
        .as_ref()
        .map_or(SandboxPhase::Unknown, |status| {
            converged_phase(SandboxPhase::Unknown, status)
        });
    gw::Orphan {
        driver: driver.to_owned(),
        id: sandbox.id.clone(),
        name: sandbox.name.clone(),
        phase: phase.into(),
        image: sandbox
            .spec
            .as_ref()
            .and_then(|s| s.template.as_ref())
            .map(|t| t.image.clone())
            .unwrap_or_default(),
    }
}

impl Gateway {
    /// Records the sandboxes `runtime` listed that have no row. New ones
    /// are logged; a database with no sandboxes at all while a driver
    /// reports some is logged as an error (lost or replaced state).
    pub(super) async fn record_orphans(
        &self,
        runtime: &DriverRuntime,
        orphans: Vec<DriverSandbox>,
    ) -> Result<()> {
        let known: HashSet<String> = self
            .orphans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&runtime.name)
            .map(|list| list.iter().map(|s| s.id.clone()).collect())
            .unwrap_or_default();
        let fresh: Vec<&DriverSandbox> =
            orphans.iter().filter(|s| !known.contains(&s.id)).collect();
        if !fresh.is_empty() {
            let stored: u64 = self
                .db(|s| s.driver_counts())
                .await?
                .iter()
                .map(|(_, count)| *count)
                .sum();
            if stored == 0 && known.is_empty() {
                tracing::error!(driver = %runtime.name, sandboxes = orphans.len(), "the state database has no sandboxes, but the driver reports some: gateway.db was lost, truncated or replaced; list them with `openshell sandbox list --orphans`, then adopt or delete them");
            }
            for sandbox in &fresh {
                tracing::warn!(driver = %runtime.name, sandbox = %sandbox.name, id = %sandbox.id, "the driver has a sandbox the gateway has no record of; adopt it (`openshell sandbox adopt NAME --driver DRIVER`) or delete it (`openshell sandbox delete --orphan ID --driver DRIVER`)");
            }
        }
        self.orphans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(runtime.name.clone(), orphans);
        Ok(())
    }

    /// The orphans recorded at each driver's last reconcile.
    pub fn list_orphans(&self, driver: &str) -> Result<gw::ListOrphansResponse> {
        let driver = driver.to_ascii_lowercase();
        if !driver.is_empty() && !self.registry.is_configured(&driver) {
            return Err(Error::NotFound(format!(
                "driver '{}' is not configured; configured drivers: {}",
                openshell_driver_kit::contract::truncate(&driver, 64),
                self.registry.names()
            )));
        }
        let recorded = self.orphans.lock().unwrap_or_else(PoisonError::into_inner);
        let mut orphans: Vec<gw::Orphan> = recorded
            .iter()
            .filter(|(name, _)| driver.is_empty() || **name == driver)
            .flat_map(|(name, list)| list.iter().map(|s| orphan_view(name, s)))
            .collect();
        orphans.sort_by(|a, b| (&a.driver, &a.name, &a.id).cmp(&(&b.driver, &b.name, &b.id)));
        Ok(gw::ListOrphansResponse { orphans })
    }

    fn connected(&self, driver: &str) -> Result<Arc<DriverRuntime>> {
        let driver = driver.to_ascii_lowercase();
        if driver.is_empty() {
            return Err(Error::InvalidArgument(
                "say which driver reports the orphan: set driver (see `openshell sandbox list --orphans`)"
                    .to_owned(),
            ));
        }
        match self.registry.lookup(&driver) {
            Lookup::Ready(runtime) if runtime.is_available() => Ok(runtime),
            Lookup::Ready(runtime) => Err(runtime.unavailable()),
            Lookup::Pending(pending) => Err(Registry::pending_error(&pending)),
            Lookup::NotConfigured => Err(Error::NotFound(format!(
                "driver '{}' is not configured; configured drivers: {}",
                openshell_driver_kit::contract::truncate(&driver, 64),
                self.registry.names()
            ))),
        }
    }

    /// The driver's current sandbox called `name` (or with `id`) that has
    /// no row: listed afresh, so an orphan need not wait for a reconcile.
    async fn find_orphan(
        &self,
        runtime: &DriverRuntime,
        name: &str,
        id: &str,
    ) -> Result<DriverSandbox> {
        let listed = runtime.guarded(runtime.driver.list()).await?;
        let wanted = |s: &DriverSandbox| {
            (!id.is_empty() && s.id == id) || (id.is_empty() && !name.is_empty() && s.name == name)
        };
        let Some(found) = listed.into_iter().find(wanted) else {
            return Err(Error::NotFound(format!(
                "driver '{}' reports no sandbox {}; `openshell sandbox list --orphans` shows the orphans",
                runtime.name,
                if id.is_empty() {
                    format!(
                        "named '{}'",
                        openshell_driver_kit::contract::truncate(name, 64)
                    )
                } else {
                    format!(
                        "with id {}",
                        openshell_driver_kit::contract::truncate(id, 64)
                    )
                }
            )));
        };
        let key = found.id.clone();
        if let Some(row) = self.db(move |s| s.get(&key)).await? {
            return Err(Error::FailedPrecondition(format!(
                "driver '{}' sandbox {} is not an orphan: it is sandbox '{}' of this gateway",
                runtime.name, found.id, row.name
            )));
        }
        Ok(found)
    }

    /// Records an orphan as a sandbox of this gateway, as its driver
    /// reports it.
    pub async fn adopt_orphan(&self, request: gw::AdoptOrphanRequest) -> Result<gw::Sandbox> {
        self.ensure_running()?;
        if request.name.is_empty() && request.id.is_empty() {
            return Err(Error::InvalidArgument(
                "say which orphan to adopt: set name (or id)".to_owned(),
            ));
        }
        let runtime = self.connected(&request.driver)?;
        let found = self
            .find_orphan(&runtime, &request.name, &request.id)
            .await?;
        validate::sandbox_name(&found.name).map_err(|e| {
            Error::FailedPrecondition(format!(
                "the orphan's name cannot be adopted ({e}); delete it with `openshell sandbox delete --orphan {} --driver {}`",
                found.id, runtime.name
            ))
        })?;
        if found.id.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "driver '{}' reports sandbox '{}' without an id; it cannot be adopted",
                runtime.name, found.name
            )));
        }
        let spec = found.spec.clone().unwrap_or_default();
        let template = spec.template.clone().unwrap_or_default();
        let status = found.status.clone();
        let now = now_ms();
        let row = SandboxRow {
            id: found.id.clone(),
            name: found.name.clone(),
            driver: runtime.name.clone(),
            spec: gw::SandboxSpec {
                image: template.image,
                command: spec.command,
                env: spec.environment,
                tty: spec.tty,
                resources: None,
            },
            labels: template.labels.into_iter().collect(),
            phase: status.as_ref().map_or(SandboxPhase::Unknown, |s| {
                converged_phase(SandboxPhase::Unknown, s)
            }),
            observed: status.clone(),
            gateway_condition: None,
            instance_id: status.map(|s| s.instance_id).unwrap_or_default(),
            resource_version: 1,
            created_at_ms: now,
            updated_at_ms: now,
        };
        let stored = row.clone();
        match self.db(move |s| s.insert(&stored)).await? {
            Inserted::Ok => {}
            Inserted::NameTaken(id) => {
                return Err(Error::AlreadyExists(format!(
                    "sandbox '{}' already exists in this gateway (id {id}); delete it first, or delete the orphan with `openshell sandbox delete --orphan {} --driver {}`",
                    row.name, row.id, runtime.name
                )));
            }
        }
        self.forget_orphan(&runtime.name, &row.id);
        self.publish_row(row.clone());
        tracing::info!(sandbox = %row.name, id = %row.id, driver = %runtime.name, "orphan adopted");
        Ok(self.view(&row))
    }

    /// Asks the driver to delete an orphan; true when it deleted something.
    pub async fn delete_orphan(&self, request: gw::DeleteOrphanRequest) -> Result<bool> {
        self.ensure_running()?;
        if request.id.is_empty() {
            return Err(Error::InvalidArgument(
                "say which orphan to delete: set id (see `openshell sandbox list --orphans`)"
                    .to_owned(),
            ));
        }
        let runtime = self.connected(&request.driver)?;
        let found = self.find_orphan(&runtime, "", &request.id).await?;
        let deleted = runtime
            .guarded(runtime.driver.delete(&found.id, &found.name))
            .await;
        let deleted = self.driver_result(&runtime, deleted)?;
        self.forget_orphan(&runtime.name, &found.id);
        tracing::info!(sandbox = %found.name, id = %found.id, driver = %runtime.name, "orphan deleted");
        Ok(deleted)
    }

    fn forget_orphan(&self, driver: &str, id: &str) {
        if let Some(list) = self
            .orphans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(driver)
        {
            list.retain(|s| s.id != id);
        }
    }
}
