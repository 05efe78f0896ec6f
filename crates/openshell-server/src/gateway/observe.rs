//! Driver observations applied to stored rows: snapshots, watch events,
//! reconciliation against a driver's list, and sandboxes gone missing.

use std::collections::HashMap;
use std::sync::Arc;

use openshell_proto::compute::v1::watch_sandboxes_event::Payload;
use openshell_proto::compute::v1::{
    DriverSandbox, WatchSandboxesEvent, WatchSandboxesSandboxEvent,
};
use openshell_proto::gateway::v1::SandboxPhase;

use super::{BusEvent, Gateway};
use crate::api::translate;
use crate::drivers::registry::DriverRuntime;
use crate::error::Result;
use crate::phases::{converged_phase, intent_condition, next_phase, ready_false};
use crate::state::store::{SandboxRow, Updated, now_ms};

/// Makes a driver's observation read the same whichever contract
/// generation sent it: condition times in RFC 3339 text (1.x drivers may
/// send only the Timestamp), and, for a driver whose Ready does not mean
/// the workload runs (1.x `driver_reports_runtime_readiness = false`), a
/// Ready=True turned into "waiting for a supervisor session": this gateway
/// has no supervisor sessions, so it does not pretend the sandbox is ready.
pub fn normalize(sandbox: &mut DriverSandbox, ready_means_running: bool) {
    let Some(status) = &mut sandbox.status else {
        return;
    };
    for condition in &mut status.conditions {
        if condition.last_transition_time.is_empty()
            && let Some(at) = openshell_driver_kit::contract::condition_time(condition)
        {
            condition.last_transition_time = openshell_wire::time::rfc3339(at);
        }
        if !ready_means_running
            && condition.r#type == "Ready"
            && condition.status.eq_ignore_ascii_case("true")
        {
            condition.status = "False".to_owned();
            condition.reason = "SupervisorNotConnected".to_owned();
            condition.message = "the driver reports the backend ready but leaves runtime \
                readiness to a supervisor session, which this gateway does not have; set \
                trust_driver_readiness = true in the driver's table to take its Ready as the \
                sandbox's"
                .to_owned();
        }
    }
}

/// Applies a driver snapshot to a row; returns whether anything changed.
/// Rows of other drivers, and rows being deleted or in Error, are left
/// alone.
pub fn apply_snapshot_to(row: &mut SandboxRow, driver: &str, sandbox: &DriverSandbox) -> bool {
    if row.driver != driver || matches!(row.phase, SandboxPhase::Deleting | SandboxPhase::Error) {
        return false;
    }
    let Some(status) = &sandbox.status else {
        return false;
    };
    let phase = next_phase(row.phase, Some(status));
    let mut changed = false;
    if row.observed.as_ref() != Some(status) {
        if !status.instance_id.is_empty() {
            row.instance_id.clone_from(&status.instance_id);
        }
        row.observed = Some(status.clone());
        changed = true;
    }
    if phase != row.phase {
        row.phase = phase;
        row.gateway_condition = intent_condition(phase, now_ms());
        changed = true;
    }
    changed
}

fn snapshot_event(sandbox: DriverSandbox) -> WatchSandboxesEvent {
    WatchSandboxesEvent {
        payload: Some(Payload::Sandbox(WatchSandboxesSandboxEvent {
            sandbox: Some(sandbox),
        })),
    }
}

impl Gateway {
    /// Applies one driver snapshot to its row.
    pub async fn apply_snapshot(&self, driver: &str, sandbox: DriverSandbox) -> Result<()> {
        self.apply_events(driver, vec![snapshot_event(sandbox)])
            .await
    }

    /// Applies a batch of a driver's watch events in one transaction, then
    /// tells public watchers what changed, in order.
    pub async fn apply_events(
        &self,
        driver: &str,
        mut events: Vec<WatchSandboxesEvent>,
    ) -> Result<()> {
        let ready_means_running = self
            .registry
            .get(driver)
            .is_none_or(|r| r.ready_means_running());
        for event in &mut events {
            if let Some(Payload::Sandbox(update)) = &mut event.payload
                && let Some(sandbox) = &mut update.sandbox
            {
                normalize(sandbox, ready_means_running);
            }
        }
        let name = driver.to_owned();
        let outcomes = self
            .db(move |s| {
                s.write(|tx| {
                    let mut out = Vec::new();
                    for event in events {
                        match event.payload {
                            Some(Payload::Sandbox(update)) => {
                                let Some(sandbox) = update.sandbox else {
                                    continue;
                                };
                                let id = sandbox.id.clone();
                                if let Updated::Changed(row) =
                                    tx.update(&id, |row| apply_snapshot_to(row, &name, &sandbox))?
                                {
                                    out.push(BusEvent::Changed(Arc::new(row)));
                                }
                            }
                            Some(Payload::Deleted(deleted)) => {
                                let ours = tx
                                    .get(&deleted.sandbox_id)?
                                    .is_some_and(|row| row.driver == name);
                                if ours && let Some(row) = tx.remove(&deleted.sandbox_id)? {
                                    out.push(BusEvent::Deleted {
                                        id: row.id,
                                        name: row.name,
                                        driver: row.driver,
                                    });
                                }
                            }
                            Some(Payload::PlatformEvent(platform)) => {
                                let Some(event) = platform.event else {
                                    continue;
                                };
                                if let Some(row) =
                                    tx.get(&platform.sandbox_id)?.filter(|r| r.driver == name)
                                {
                                    out.push(BusEvent::Platform {
                                        driver: name.clone(),
                                        event: translate::platform_event(&row.id, &row.name, event),
                                    });
                                }
                            }
                            None => {}
                        }
                    }
                    Ok(out)
                })
            })
            .await?;
        for outcome in outcomes {
            match &outcome {
                BusEvent::Deleted { id, name, driver } => {
                    tracing::info!(sandbox = %name, id = %id, driver = %driver, "sandbox deleted");
                }
                BusEvent::Changed(row) => {
                    tracing::debug!(sandbox = %row.name, phase = ?row.phase, "applied driver snapshot");
                }
                _ => {}
            }
            self.publish(outcome);
        }
        Ok(())
    }

    /// Brings a driver's rows in line with its list. The driver is the
    /// authority on what exists and in which state:
    ///
    /// - a listed sandbox's row gets its snapshot; a row that has not
    ///   changed for the orphan grace and still disagrees with the driver
    ///   (a start that timed out but happened late, a stop the gateway
    ///   missed, a failed create the driver did make) is converged to the
    ///   phase the driver reports, whatever its phase; a row being deleted
    ///   has its delete sent again;
    /// - an absent row, once unchanged for the orphan grace and confirmed
    ///   absent with GetSandbox, is removed if it was being deleted, if its
    ///   create failed, or if the driver never reported it (its create
    ///   never reached the driver); otherwise it is marked Error
    ///   (ComputeResourceMissing);
    /// - a listed sandbox without a row is an orphan: logged, kept for
    ///   ListOrphans, adoptable or deletable.
    pub async fn reconcile(
        &self,
        runtime: &DriverRuntime,
        listed: Vec<DriverSandbox>,
    ) -> Result<()> {
        let name = runtime.name.clone();
        let rows = self.db(move |s| s.rows_of_driver(&name)).await?;
        let ready_means_running = runtime.ready_means_running();
        let mut listed: HashMap<String, DriverSandbox> = listed
            .into_iter()
            .map(|mut s| {
                normalize(&mut s, ready_means_running);
                (s.id.clone(), s)
            })
            .collect();
        let grace = i64::try_from(self.timeouts.orphan_grace.as_millis()).unwrap_or(i64::MAX);
        let stale = |row: &SandboxRow| now_ms().saturating_sub(row.updated_at_ms) >= grace;
        let mut changed = Vec::new();
        let mut converge = Vec::new();
        let mut redelete = Vec::new();
        let mut absent = Vec::new();
        for row in rows {
            match listed.remove(&row.id) {
                Some(snapshot) => {
                    // Most rows are current; only write the ones that change.
                    let mut probe = row.clone();
                    if apply_snapshot_to(&mut probe, &runtime.name, &snapshot) {
                        changed.push(snapshot_event(snapshot.clone()));
                    }
                    if !stale(&row) {
                        continue;
                    }
                    if row.phase == SandboxPhase::Deleting {
                        redelete.push(row);
                    } else if let Some(status) = &snapshot.status
                        && converged_phase(probe.phase, status) != probe.phase
                    {
                        converge.push((row, snapshot));
                    }
                }
                None => absent.push(row),
            }
        }
        self.apply_events(&runtime.name, changed).await?;
        for (row, snapshot) in converge {
            self.converge(runtime, &row, snapshot).await?;
        }
        for row in redelete {
            self.redelete(runtime, &row).await?;
        }
        self.record_orphans(runtime, listed.into_values().collect())
            .await?;
        for row in absent {
            let removable = super::never_reached_driver(&row);
            if (row.phase == SandboxPhase::Error && !removable) || !stale(&row) {
                continue;
            }
            match runtime.driver.get(&row.id, &row.name).await {
                Ok(Some(snapshot)) => self.apply_snapshot(&runtime.name, snapshot).await?,
                Ok(None) => self.missing(runtime, &row).await?,
                Err(error) => {
                    tracing::warn!(driver = %runtime.name, error = %error, "reconcile stopped: the driver did not answer GetSandbox");
                    return Err(error);
                }
            }
        }
        Ok(())
    }

    /// Sets a row to the phase its driver reports (see [`converged_phase`]).
    async fn converge(
        &self,
        runtime: &DriverRuntime,
        seen: &SandboxRow,
        snapshot: DriverSandbox,
    ) -> Result<()> {
        let version = seen.resource_version;
        let Some(status) = snapshot.status else {
            return Ok(());
        };
        let updated = self
            .update(&seen.id, move |row| {
                if row.resource_version != version {
                    return false;
                }
                let phase = converged_phase(row.phase, &status);
                if phase == row.phase {
                    return false;
                }
                row.phase = phase;
                row.gateway_condition = intent_condition(phase, now_ms());
                if !status.instance_id.is_empty() {
                    row.instance_id.clone_from(&status.instance_id);
                }
                row.observed = Some(status);
                true
            })
            .await?;
        if let Updated::Changed(row) = updated {
            tracing::warn!(sandbox = %row.name, id = %row.id, driver = %runtime.name, was = ?seen.phase, now = ?row.phase, "sandbox was out of step with its driver; following the driver");
        }
        Ok(())
    }

    /// Sends the delete of a row still being deleted again.
    async fn redelete(&self, runtime: &DriverRuntime, row: &SandboxRow) -> Result<()> {
        let _gate = self.gates.lock(&row.id).await;
        match runtime.driver.delete(&row.id, &row.name).await {
            Ok(false) => drop(self.remove_row(&row.id).await?),
            Ok(true) => {
                tracing::info!(sandbox = %row.name, driver = %runtime.name, "sent an unfinished delete again");
            }
            Err(error) if super::is_not_found(&error) => drop(self.remove_row(&row.id).await?),
            Err(error) => {
                tracing::warn!(sandbox = %row.name, driver = %runtime.name, error = %error, "could not send an unfinished delete again");
            }
        }
        Ok(())
    }

    async fn missing(&self, runtime: &DriverRuntime, seen: &SandboxRow) -> Result<()> {
        let never_reached = super::never_reached_driver(seen)
            || (seen.phase == SandboxPhase::Provisioning && seen.observed.is_none());
        if never_reached {
            // Under the gate: a create still in flight holds it, and changes
            // the row (its version) when it finishes.
            let _gate = self.gates.lock(&seen.id).await;
            let version = seen.resource_version;
            let id = seen.id.clone();
            let still = self.db(move |s| s.get(&id)).await?;
            if still.is_some_and(|r| r.resource_version == version) {
                tracing::warn!(sandbox = %seen.name, id = %seen.id, driver = %runtime.name, phase = ?seen.phase, "removing a sandbox whose create never reached its driver; create it again");
                self.remove_row(&seen.id).await?;
            }
            return Ok(());
        }
        let version = seen.resource_version;
        if seen.phase == SandboxPhase::Deleting {
            let id = seen.id.clone();
            let still = self.db(move |s| s.get(&id)).await?;
            if still.is_some_and(|r| r.resource_version == version) {
                self.remove_row(&seen.id).await?;
            }
            return Ok(());
        }
        let message = format!(
            "driver '{}' no longer has this sandbox; delete it, or create it again",
            runtime.name
        );
        let updated = self
            .update(&seen.id, move |row| {
                if row.resource_version != version {
                    return false;
                }
                row.phase = SandboxPhase::Error;
                row.gateway_condition =
                    Some(ready_false(super::RESOURCE_MISSING, &message, now_ms()));
                true
            })
            .await?;
        if let Updated::Changed(row) = updated {
            tracing::warn!(sandbox = %row.name, driver = %runtime.name, "sandbox is missing from its driver; marked Error");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openshell_proto::compute::v1::{DriverCondition, DriverSandboxStatus};
    use openshell_proto::gateway::v1 as gw;
    use std::collections::BTreeMap;

    fn row(phase: SandboxPhase) -> SandboxRow {
        SandboxRow {
            id: "id".into(),
            name: "n".into(),
            driver: "vm".into(),
            spec: gw::SandboxSpec::default(),
            labels: BTreeMap::new(),
            phase,
            observed: None,
            gateway_condition: None,
            instance_id: String::new(),
            resource_version: 1,
            created_at_ms: 0,
            updated_at_ms: 0,
        }
    }

    fn snapshot(kind: &str, status: &str, reason: &str) -> DriverSandbox {
        DriverSandbox {
            id: "id".into(),
            status: Some(DriverSandboxStatus {
                instance_id: "c-1".into(),
                conditions: vec![DriverCondition {
                    r#type: kind.into(),
                    status: status.into(),
                    reason: reason.into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn snapshots_update_rows() {
        let mut r = row(SandboxPhase::Provisioning);
        assert!(apply_snapshot_to(
            &mut r,
            "vm",
            &snapshot("Ready", "True", "")
        ));
        assert_eq!(r.phase, SandboxPhase::Ready);
        assert_eq!(r.instance_id, "c-1");
        assert!(r.gateway_condition.is_none());
        assert!(
            !apply_snapshot_to(&mut r, "vm", &snapshot("Ready", "True", "")),
            "same snapshot is no change"
        );
        assert!(
            !apply_snapshot_to(&mut r, "podman", &snapshot("Ready", "False", "Boom")),
            "other driver"
        );

        let mut stopping = row(SandboxPhase::Stopping);
        stopping.gateway_condition = intent_condition(SandboxPhase::Stopping, 1);
        assert!(apply_snapshot_to(
            &mut stopping,
            "vm",
            &snapshot("Suspended", "True", "")
        ));
        assert_eq!(stopping.phase, SandboxPhase::Stopped);
        assert_eq!(stopping.gateway_condition.unwrap().reason, "Stopped");

        let mut deleting = row(SandboxPhase::Deleting);
        assert!(!apply_snapshot_to(
            &mut deleting,
            "vm",
            &snapshot("Ready", "True", "")
        ));
        let mut no_status = row(SandboxPhase::Ready);
        assert!(!apply_snapshot_to(
            &mut no_status,
            "vm",
            &DriverSandbox::default()
        ));
    }
}
