//! The public WatchSandboxes stream: the matching rows, `synced`, then
//! changes, with a resync when the watcher lags or a driver's
//! availability changes.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use openshell_proto::gateway::v1::{self as gw};
use tokio::sync::{broadcast, mpsc};
use tonic::Status;

use super::{BusEvent, Gateway, MAX_PAGE_SIZE};
use crate::api::validate;
use crate::error::{Error, Result};
use crate::state::store::{ListQuery, SandboxRow};

impl Gateway {
    /// Every row matching a watch's filters, in pages.
    async fn matching_rows(
        &self,
        driver: Option<String>,
        name: Option<String>,
    ) -> Result<Vec<SandboxRow>> {
        if let Some(name) = name {
            let row = self.db(move |s| s.get_by_name(&name)).await?;
            return Ok(row
                .into_iter()
                .filter(|r| driver.as_ref().is_none_or(|d| *d == r.driver))
                .collect());
        }
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let query = ListQuery {
                driver: driver.clone(),
                after_name: after.take(),
                limit: MAX_PAGE_SIZE,
                ..ListQuery::default()
            };
            let (rows, more) = self.db(move |s| s.list(&query)).await?;
            after = rows.last().map(|r| r.name.clone());
            all.extend(rows);
            if !more {
                return Ok(all);
            }
        }
    }

    /// Starts a public watch: the matching sandboxes, `synced`, then changes.
    pub fn watch(
        self: &Arc<Self>,
        request: gw::WatchSandboxesRequest,
    ) -> Result<mpsc::Receiver<std::result::Result<gw::WatchSandboxesEvent, Status>>> {
        self.ensure_running()?;
        if !request.name.is_empty() {
            validate::sandbox_name(&request.name).map_err(Error::InvalidArgument)?;
        }
        let driver = (!request.driver.is_empty()).then(|| request.driver.to_ascii_lowercase());
        let name = (!request.name.is_empty()).then_some(request.name);
        let (tx, rx) = mpsc::channel(256);
        // Subscribe before reading the initial rows so nothing falls between.
        let bus = self.subscribe();
        let gateway = Arc::clone(self);
        tokio::spawn(async move {
            let watch = PublicWatch {
                gateway: &gateway,
                tx,
                driver,
                name,
                sent: HashMap::new(),
            };
            watch.run(bus).await;
        });
        Ok(rx)
    }
}

/// One public WatchSandboxes stream.
struct PublicWatch<'a> {
    gateway: &'a Arc<Gateway>,
    tx: mpsc::Sender<std::result::Result<gw::WatchSandboxesEvent, Status>>,
    driver: Option<String>,
    name: Option<String>,
    /// Resource version and name last sent, per sandbox id.
    sent: HashMap<String, (u64, String)>,
}

fn event(payload: gw::watch_sandboxes_event::Payload) -> gw::WatchSandboxesEvent {
    gw::WatchSandboxesEvent {
        payload: Some(payload),
    }
}

impl PublicWatch<'_> {
    fn wants(&self, driver: &str, name: &str) -> bool {
        self.driver.as_deref().is_none_or(|d| d == driver)
            && self.name.as_deref().is_none_or(|n| n == name)
    }

    async fn send(&self, payload: gw::watch_sandboxes_event::Payload) -> bool {
        self.tx.send(Ok(event(payload))).await.is_ok()
    }

    async fn send_row(&mut self, row: &SandboxRow) -> bool {
        if self
            .sent
            .get(&row.id)
            .is_some_and(|(version, _)| *version > row.resource_version)
        {
            return true;
        }
        self.sent
            .insert(row.id.clone(), (row.resource_version, row.name.clone()));
        let sandbox = self.gateway.view(row);
        self.send(gw::watch_sandboxes_event::Payload::Sandbox(sandbox))
            .await
    }

    /// Sends the current matching rows, and `deleted` for rows sent before
    /// that are gone. Returns false when the client left.
    async fn resync(&mut self, driver: Option<String>) -> bool {
        let filter = driver.or_else(|| self.driver.clone());
        let rows = match self
            .gateway
            .matching_rows(filter.clone(), self.name.clone())
            .await
        {
            Ok(rows) => rows,
            Err(error) => {
                let _ = self.tx.send(Err(Status::from(error))).await;
                return false;
            }
        };
        let present: HashSet<String> = rows.iter().map(|r| r.id.clone()).collect();
        for row in &rows {
            // A resync re-sends even unchanged rows (their conditions may
            // have changed with their driver's availability).
            self.sent.remove(&row.id);
            if !self.send_row(row).await {
                return false;
            }
        }
        if filter == self.driver {
            let gone: Vec<(String, String)> = self
                .sent
                .iter()
                .filter(|(id, _)| !present.contains(*id))
                .map(|(id, (_, name))| (id.clone(), name.clone()))
                .collect();
            for (id, name) in gone {
                self.sent.remove(&id);
                let deleted = gw::SandboxDeleted { id, name };
                if !self
                    .send(gw::watch_sandboxes_event::Payload::Deleted(deleted))
                    .await
                {
                    return false;
                }
            }
        }
        true
    }

    async fn run(mut self, mut bus: broadcast::Receiver<BusEvent>) {
        if !self.resync(None).await {
            return;
        }
        if !self
            .send(gw::watch_sandboxes_event::Payload::Synced(
                gw::WatchSynced {},
            ))
            .await
        {
            return;
        }
        let stop = self.gateway.shutdown.clone();
        loop {
            let received = tokio::select! {
                () = stop.cancelled() => return,
                () = self.tx.closed() => return,
                received = bus.recv() => received,
            };
            let alive = match received {
                Ok(BusEvent::Changed(row)) => {
                    if self.wants(&row.driver, &row.name) {
                        self.send_row(&row).await
                    } else {
                        true
                    }
                }
                Ok(BusEvent::Deleted { id, name, driver }) => {
                    if self.wants(&driver, &name) {
                        self.sent.remove(&id);
                        self.send(gw::watch_sandboxes_event::Payload::Deleted(
                            gw::SandboxDeleted { id, name },
                        ))
                        .await
                    } else {
                        true
                    }
                }
                Ok(BusEvent::Platform { driver, event }) => {
                    if self.wants(&driver, &event.sandbox_name) {
                        self.send(gw::watch_sandboxes_event::Payload::PlatformEvent(event))
                            .await
                    } else {
                        true
                    }
                }
                Ok(BusEvent::DriverState { driver }) => {
                    if self.driver.as_deref().is_none_or(|d| d == driver) {
                        self.resync(Some(driver)).await
                    } else {
                        true
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(
                        missed,
                        "a watcher fell behind; sending the current state again"
                    );
                    self.resync(None).await
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if !alive {
                return;
            }
        }
    }
}
