//! What every part of the driver shares: settings, the engine client, the
//! effective ulimits and the state directory, plus the lookups by label
//! that keep the driver to its own containers.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt as _;
use openshell_proto::compute::v1::DriverSandbox;

use crate::config::{Settings, Ulimit};
use crate::error::{Error, Result};
use crate::podman::Podman;
use crate::podman::types::{ContainerInspect, ListedContainer};
use crate::spec::{
    LABEL_SANDBOX_ID, LABEL_SANDBOX_NAME, check_sandbox_id, owned_by, ownership_filters,
};
use crate::state::StateDir;
use crate::status::{Facts, observe};

/// How many inspects run at once when listing.
const INSPECT_CONCURRENCY: usize = 8;

#[derive(Debug)]
pub struct Core {
    pub settings: Settings,
    pub client: Podman,
    pub ulimits: BTreeMap<String, Ulimit>,
    pub state: StateDir,
    /// How often the observer lists everything again, as a safety net for
    /// events the engine did not deliver.
    pub resync_every: Duration,
}

/// Full re-list interval while events flow.
pub const RESYNC_EVERY: Duration = Duration::from_secs(60);
/// Full re-list interval for an engine that records no events.
pub const RESYNC_WITHOUT_EVENTS: Duration = Duration::from_secs(2);

impl Core {
    pub fn instance(&self) -> &str {
        &self.settings.name
    }

    fn not_found(&self, what: &str) -> Error {
        Error::NotFound(format!(
            "{what} is not a sandbox of driver '{}'",
            self.settings.name
        ))
    }

    /// Containers of this instance carrying all of `extra` labels too.
    async fn list_owned(&self, extra: &[String]) -> Result<Vec<ListedContainer>> {
        let mut filters = ownership_filters(self.instance());
        filters.extend_from_slice(extra);
        let mut listed = self.client.list(&filters).await?;
        // The engine filtered already; check again so a filter the engine
        // ignored can never make the driver touch a container it does not own.
        listed.retain(|c| owned_by(c.labels.as_ref(), self.instance()));
        Ok(listed)
    }

    /// The container of sandbox `id`, if this instance has one.
    pub async fn find(&self, id: &str) -> Result<Option<ListedContainer>> {
        check_sandbox_id(id)?;
        let mut found = self
            .list_owned(&[format!("{LABEL_SANDBOX_ID}={id}")])
            .await?;
        found.retain(|c| {
            c.labels
                .as_ref()
                .and_then(|l| l.get(LABEL_SANDBOX_ID))
                .is_some_and(|v| v == id)
        });
        match found.len() {
            0 => Ok(None),
            1 => Ok(found.pop()),
            _ => Err(Error::FailedPrecondition(format!(
                "several containers carry sandbox id {id} ({}); remove the extra ones",
                found
                    .iter()
                    .map(|c| c.id.chars().take(12).collect::<String>())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// The container of sandbox `id`, or NOT_FOUND.
    pub async fn require(&self, id: &str) -> Result<ListedContainer> {
        self.find(id)
            .await?
            .ok_or_else(|| self.not_found(&format!("sandbox {id}")))
    }

    /// Lookup by id, or by name when no id is given (only for reads).
    pub async fn require_by_id_or_name(&self, id: &str, name: &str) -> Result<ListedContainer> {
        if !id.is_empty() {
            return self.require(id).await;
        }
        if name.is_empty() {
            return Err(Error::InvalidArgument(
                "give sandbox_id (or at least sandbox_name)".to_owned(),
            ));
        }
        let mut found = self
            .list_owned(&[format!("{LABEL_SANDBOX_NAME}={name}")])
            .await?;
        match found.len() {
            0 => Err(self.not_found(&format!("sandbox named {name:?}"))),
            1 => Ok(found.remove(0)),
            n => Err(Error::FailedPrecondition(format!(
                "{n} sandboxes are named {name:?}; ask by sandbox_id"
            ))),
        }
    }

    /// Builds the observation of an inspected container.
    pub fn observation(&self, inspect: &ContainerInspect) -> Option<DriverSandbox> {
        if !owned_by(inspect.config.labels.as_ref(), self.instance()) {
            return None;
        }
        let id = inspect.label(LABEL_SANDBOX_ID)?;
        let failure = self.state.start_failure(id);
        Some(observe(Facts {
            inspect,
            instance: self.instance(),
            stopped: self.state.is_stopped(id),
            start_failure: failure.as_ref(),
        }))
    }

    /// The current observation of one container; `None` when it is gone or
    /// not ours.
    pub async fn observe_container(&self, container_id: &str) -> Result<Option<DriverSandbox>> {
        Ok(self
            .client
            .inspect(container_id)
            .await?
            .and_then(|inspect| self.observation(&inspect)))
    }

    /// Every sandbox of this instance, observed now.
    pub async fn observe_all(&self) -> Result<Vec<DriverSandbox>> {
        let listed = self.list_owned(&[]).await?;
        let observed: Vec<Result<Option<DriverSandbox>>> = futures::stream::iter(listed)
            .map(|c| async move { self.observe_container(&c.id).await })
            .buffer_unordered(INSPECT_CONCURRENCY)
            .collect()
            .await;
        let mut out = Vec::with_capacity(observed.len());
        for item in observed {
            if let Some(sandbox) = item? {
                out.push(sandbox);
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Waits until Podman no longer reports the container as running or
    /// stopping, so a start right after a stop cannot race a late exit.
    pub async fn wait_stopped(&self, container_id: &str) -> Result<()> {
        let limit = self.settings.stop_timeout + Duration::from_secs(30);
        let deadline = tokio::time::Instant::now() + limit;
        let mut pause = Duration::from_millis(5);
        loop {
            let Some(inspect) = self.client.inspect(container_id).await? else {
                return Ok(());
            };
            if !matches!(
                inspect.state.status.as_str(),
                "running" | "stopping" | "paused"
            ) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!(
                        "stopping container {} (still {})",
                        inspect.short_name(),
                        inspect.state.status
                    ),
                    timeout: limit,
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }
}
