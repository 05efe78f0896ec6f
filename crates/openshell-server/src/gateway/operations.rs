//! Public operations on sandboxes: create, get, list, stop, start,
//! delete, logs, info.

use std::sync::Arc;

use futures::StreamExt as _;
use openshell_proto::compute::logs::v1::StreamLogsRequest;
use openshell_proto::gateway::v1::{self as gw, SandboxPhase};
use tonic::Status;

use super::{
    CREATE_FAILED, DEFAULT_PAGE_SIZE, Gateway, MAX_PAGE_SIZE, ambiguous, answered,
    apply_snapshot_to, is_not_found, join_error,
};
use crate::api::{translate, validate};
use crate::drivers::registry::{DriverRuntime, Lookup, Registry};
use crate::error::{Error, Result};
use crate::phases::intent_condition;
use crate::state::store::{Inserted, ListQuery, SandboxRow, Updated, now_ms};

fn page_token(name: &str) -> String {
    let mut token = String::from("v1.");
    for byte in name.bytes() {
        token.push_str(&format!("{byte:02x}"));
    }
    token
}

fn parse_page_token(token: &str) -> Result<String> {
    let bad = || {
        Error::InvalidArgument(format!(
            "page_token {token:?} is not one this gateway issued; pass next_page_token from a previous ListSandboxes response"
        ))
    };
    let hex = token.strip_prefix("v1.").ok_or_else(bad)?;
    if hex.len() % 2 != 0 {
        return Err(bad());
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(bad)?;
    String::from_utf8(bytes).map_err(|_| bad())
}

/// Which driver call a [`Transition`] makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DriverCall {
    Stop,
    Start,
}

/// What the current phase means for a [`Transition`].
#[derive(Debug)]
enum Precheck {
    Proceed,
    /// Already there: answer with the sandbox as it is.
    Done,
    Refused(Error),
}

/// A user-requested phase change: stop or start.
#[derive(Debug)]
struct Transition {
    /// Persisted before the driver is called.
    via: SandboxPhase,
    call: DriverCall,
    /// Set after the call succeeds; `None` takes the driver's snapshot.
    settled: Option<SandboxPhase>,
    /// Phases in which there is nothing to do.
    done_in: &'static [SandboxPhase],
    /// Phases in which the change is refused, and why.
    refused_in: &'static [(SandboxPhase, &'static str)],
    /// For the log line: "sandbox stopped".
    done: &'static str,
}

const BEING_DELETED: (SandboxPhase, &str) = (SandboxPhase::Deleting, "is being deleted");

const STOP: Transition = Transition {
    via: SandboxPhase::Stopping,
    call: DriverCall::Stop,
    settled: Some(SandboxPhase::Stopped),
    done_in: &[SandboxPhase::Stopped],
    refused_in: &[BEING_DELETED],
    done: "stopped",
};

const START: Transition = Transition {
    via: SandboxPhase::Starting,
    call: DriverCall::Start,
    settled: None,
    done_in: &[SandboxPhase::Ready, SandboxPhase::Provisioning],
    refused_in: &[
        BEING_DELETED,
        (
            SandboxPhase::Stopping,
            "is still stopping; start it once it is stopped",
        ),
    ],
    done: "started",
};

impl Transition {
    fn check(&self, row: &SandboxRow) -> Precheck {
        if self.done_in.contains(&row.phase) {
            return Precheck::Done;
        }
        match self
            .refused_in
            .iter()
            .find(|(phase, _)| *phase == row.phase)
        {
            Some((_, why)) => Precheck::Refused(Error::FailedPrecondition(format!(
                "sandbox '{}' {why}",
                row.name
            ))),
            None => Precheck::Proceed,
        }
    }
}

impl Gateway {
    /// Looks a sandbox up by name, else by id.
    pub async fn resolve(&self, reference: Option<gw::SandboxRef>) -> Result<SandboxRow> {
        let reference = reference.unwrap_or_default();
        if !reference.name.is_empty() {
            validate::sandbox_name(&reference.name).map_err(Error::InvalidArgument)?;
            let name = reference.name.clone();
            let row = self
                .db(move |s| s.get_by_name(&name))
                .await?
                .ok_or_else(|| {
                    Error::NotFound(format!("sandbox '{}' not found", reference.name))
                })?;
            if !reference.id.is_empty() && reference.id != row.id {
                return Err(Error::NotFound(format!(
                    "sandbox '{}' has id {}, not {}",
                    row.name, row.id, reference.id
                )));
            }
            return Ok(row);
        }
        if !reference.id.is_empty() {
            let id = reference.id.clone();
            return self
                .db(move |s| s.get(&id))
                .await?
                .ok_or_else(|| Error::NotFound(format!("no sandbox has id {}", reference.id)));
        }
        Err(Error::InvalidArgument(
            "say which sandbox: set sandbox.name (or sandbox.id)".to_owned(),
        ))
    }

    pub async fn create(
        self: &Arc<Self>,
        request: gw::CreateSandboxRequest,
    ) -> Result<gw::Sandbox> {
        self.ensure_running()?;
        validate::sandbox_name(&request.name).map_err(Error::InvalidArgument)?;
        let mut spec = request.spec.unwrap_or_default();
        validate::command(&spec.command).map_err(Error::InvalidArgument)?;
        validate::env(&spec.env).map_err(Error::InvalidArgument)?;
        validate::image(&spec.image).map_err(Error::InvalidArgument)?;
        validate::resources(spec.resources.as_ref()).map_err(Error::InvalidArgument)?;
        validate::labels(&request.labels).map_err(Error::InvalidArgument)?;
        let wanted = if request.driver.is_empty() {
            self.registry.default_name().unwrap_or_default().to_owned()
        } else {
            request.driver.to_ascii_lowercase()
        };
        let runtime = match self.registry.lookup(&wanted) {
            Lookup::Ready(runtime) => runtime,
            Lookup::Pending(pending) => return Err(Registry::pending_error(&pending)),
            Lookup::NotConfigured => {
                return Err(Error::NotFound(format!(
                    "driver '{}' is not configured; configured drivers: {}",
                    request.driver,
                    self.registry.names()
                )));
            }
        };
        if !runtime.is_available() {
            return Err(runtime.unavailable());
        }
        let name = request.name.clone();
        if let Some(existing) = self.db(move |s| s.get_by_name(&name)).await?
            && !self.clear_failed_create(&existing).await?
        {
            return Err(Error::AlreadyExists(format!(
                "sandbox '{}' already exists (id {}, driver '{}')",
                existing.name, existing.id, existing.driver
            )));
        }
        if spec.image.is_empty() {
            spec.image.clone_from(&runtime.capabilities.default_image);
        }
        let now = now_ms();
        let row = SandboxRow {
            id: uuid::Uuid::new_v4().to_string(),
            name: request.name,
            driver: runtime.name.clone(),
            spec,
            labels: request.labels.into_iter().collect(),
            phase: SandboxPhase::Provisioning,
            observed: None,
            gateway_condition: None,
            instance_id: String::new(),
            resource_version: 1,
            created_at_ms: now,
            updated_at_ms: now,
        };
        let gateway = Arc::clone(self);
        tokio::spawn(async move { Box::pin(gateway.create_owned(runtime, row)).await })
            .await
            .map_err(|e| join_error(&e))?
    }

    async fn create_owned(
        &self,
        runtime: Arc<DriverRuntime>,
        row: SandboxRow,
    ) -> Result<gw::Sandbox> {
        // Held until the driver has answered, so a delete of the new row waits
        // for the create instead of racing it.
        let _gate = self.gates.lock(&row.id).await;
        let sandbox = translate::driver_sandbox(&row);
        let admitted = runtime.guarded(runtime.confirm_admission()).await;
        self.driver_result(&runtime, admitted)?;
        let validated = runtime
            .guarded(runtime.driver.validate(sandbox.clone()))
            .await;
        self.driver_result(&runtime, validated)?;
        let stored = row.clone();
        match self.db(move |s| s.insert(&stored)).await? {
            Inserted::Ok => {}
            Inserted::NameTaken(id) => {
                return Err(Error::AlreadyExists(format!(
                    "sandbox '{}' already exists (id {id})",
                    row.name
                )));
            }
        }
        self.publish_row(row.clone());
        let created = runtime.guarded(runtime.driver.create(sandbox)).await;
        match self.driver_result(&runtime, created) {
            Ok(()) => {
                tracing::info!(sandbox = %row.name, id = %row.id, driver = %runtime.name, "sandbox created");
                let latest = self.latest(&row.id, row.clone()).await?;
                Ok(self.view(&latest))
            }
            Err(error) => {
                self.create_failed(&runtime, &row, &error).await;
                Err(error)
            }
        }
    }

    /// Cleans up after a failed driver create: the row goes unless the
    /// driver may hold resources that could not be removed, in which case
    /// it stays in Error so the user can see and delete it.
    async fn create_failed(&self, runtime: &DriverRuntime, row: &SandboxRow, error: &Error) {
        let cleaned = if !ambiguous(error) {
            // The driver refused the create: it holds nothing.
            true
        } else if answered(error) {
            match runtime
                .guarded(runtime.driver.delete(&row.id, &row.name))
                .await
            {
                Ok(_) => true,
                Err(cleanup) if is_not_found(&cleanup) => true,
                Err(cleanup) => {
                    tracing::warn!(sandbox = %row.name, driver = %runtime.name, error = %cleanup, "could not clean up after a failed create; keeping the sandbox in Error");
                    false
                }
            }
        } else {
            // A driver that did not answer (it died, froze or timed out
            // under the call) may have made the sandbox, and cannot be
            // asked to clean up now (a second call would double the wait):
            // the row stays in Error, and reconcile follows the driver once
            // it answers again: Ready if it has the sandbox, removed if it
            // confirms it never had it.
            false
        };
        let outcome = if cleaned {
            self.remove_row(&row.id).await.map(drop)
        } else {
            self.mark_error(
                &row.id,
                CREATE_FAILED,
                format!(
                    "create failed ({error}); the driver may still hold resources: delete the sandbox to clean up \
                     (the gateway removes it by itself once the driver confirms it never got it)"
                ),
            )
            .await
        };
        if let Err(store) = outcome {
            tracing::warn!(sandbox = %row.name, error = %store, "could not record a failed create");
        }
    }

    /// A create under a name held by an Error row whose create failed (or
    /// whose sandbox the driver lost): if the driver confirms it has no
    /// such sandbox, the row is removed and the name is free again.
    /// Returns whether it was removed.
    async fn clear_failed_create(&self, existing: &SandboxRow) -> Result<bool> {
        if !super::never_reached_driver(existing) {
            return Ok(false);
        }
        let Some(runtime) = self.registry.get(&existing.driver) else {
            return Ok(false);
        };
        let _gate = self.gates.lock(&existing.id).await;
        let checked = runtime
            .guarded(runtime.driver.get(&existing.id, &existing.name))
            .await;
        if self.driver_result(&runtime, checked)?.is_some() {
            return Ok(false);
        }
        let version = existing.resource_version;
        let id = existing.id.clone();
        let still = self.db(move |s| s.get(&id)).await?;
        if still.is_some_and(|r| r.resource_version == version) {
            tracing::warn!(sandbox = %existing.name, id = %existing.id, driver = %existing.driver, "removing a failed create the driver never got, to create the name again");
            self.remove_row(&existing.id).await?;
            return Ok(true);
        }
        Ok(false)
    }

    pub async fn get(&self, reference: Option<gw::SandboxRef>) -> Result<gw::Sandbox> {
        let row = self.resolve(reference).await?;
        Ok(self.view(&row))
    }

    /// One page of stored sandboxes: at most `page_size` (0: 100, at most
    /// 1000) and at most [`LIST_PAGE_BYTES`] of them encoded (a page holds
    /// at least one sandbox), ordered by name.
    pub async fn list(
        &self,
        request: gw::ListSandboxesRequest,
    ) -> Result<gw::ListSandboxesResponse> {
        use openshell_wire::limits::LIST_PAGE_BYTES;
        use prost::Message as _;

        let limit = match usize::try_from(request.page_size).unwrap_or(MAX_PAGE_SIZE) {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let phase = match request.phase {
            0 => None,
            value => Some(SandboxPhase::try_from(value).map_err(|_| {
                Error::InvalidArgument(format!("phase {value} is not a SandboxPhase"))
            })?),
        };
        validate::driver_name(&request.driver).map_err(Error::InvalidArgument)?;
        validate::label_filter(&request.labels).map_err(Error::InvalidArgument)?;
        let driver = (!request.driver.is_empty()).then(|| request.driver.to_ascii_lowercase());
        if let Some(name) = &driver
            && !self.registry.is_configured(name)
        {
            let probe = name.clone();
            if !self.db(move |s| s.has_driver(&probe)).await? {
                return Err(Error::NotFound(format!(
                    "driver '{name}' is not configured and has no sandboxes; configured drivers: {}",
                    self.registry.names()
                )));
            }
        }
        let after_name = if request.page_token.is_empty() {
            None
        } else {
            // A token names the last sandbox of a page; one naming none
            // (`v1.`) was not issued by a gateway.
            let name = parse_page_token(&request.page_token)
                .ok()
                .filter(|name| !name.is_empty())
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "page_token {} is not one this gateway issued; pass next_page_token \
                         from a previous ListSandboxes response",
                        validate::quote(&request.page_token)
                    ))
                })?;
            Some(name)
        };
        let mut labels: Vec<(String, String)> = request.labels.into_iter().collect();
        labels.sort();
        let query = ListQuery {
            driver,
            phase,
            labels,
            after_name,
            limit,
            max_bytes: LIST_PAGE_BYTES,
            ..ListQuery::default()
        };
        let (rows, mut more) = self.db(move |s| s.list(&query)).await?;
        // The store bounds the page by stored size; the page's bound is on
        // what is sent.
        let mut sandboxes = Vec::with_capacity(rows.len());
        let mut bytes = 0usize;
        for row in &rows {
            let sandbox = self.view(row);
            let size = sandbox.encoded_len() + 8;
            if !sandboxes.is_empty() && bytes + size > LIST_PAGE_BYTES {
                more = true;
                break;
            }
            bytes += size;
            sandboxes.push(sandbox);
        }
        let next_page_token = match sandboxes.last() {
            Some(last) if more => page_token(&last.name),
            _ => String::new(),
        };
        Ok(gw::ListSandboxesResponse {
            sandboxes,
            next_page_token,
        })
    }

    /// Resolves `reference` and runs `op` for it in a task of its own, so a
    /// client that goes away cannot strand the sandbox half way through a
    /// transition.
    async fn in_own_task<T, F, Fut>(
        self: &Arc<Self>,
        reference: Option<gw::SandboxRef>,
        op: F,
    ) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Self>, Arc<DriverRuntime>, String) -> Fut,
        Fut: Future<Output = Result<T>> + Send + 'static,
    {
        self.ensure_running()?;
        let row = self.resolve(reference).await?;
        let runtime = self.runtime_for(&row)?;
        tokio::spawn(op(Arc::clone(self), runtime, row.id))
            .await
            .map_err(|e| join_error(&e))?
    }

    pub async fn stop(self: &Arc<Self>, reference: Option<gw::SandboxRef>) -> Result<gw::Sandbox> {
        self.in_own_task(reference, |gateway, runtime, id| async move {
            gateway.transition(&STOP, runtime, id).await
        })
        .await
    }

    pub async fn start(self: &Arc<Self>, reference: Option<gw::SandboxRef>) -> Result<gw::Sandbox> {
        self.in_own_task(reference, |gateway, runtime, id| async move {
            gateway.transition(&START, runtime, id).await
        })
        .await
    }

    /// The one skeleton of stop and start: under the sandbox's gate, check
    /// the phase, persist the transitional phase, call the driver, then
    /// settle on the final phase or recover from the failure.
    async fn transition(
        &self,
        transition: &Transition,
        runtime: Arc<DriverRuntime>,
        id: String,
    ) -> Result<gw::Sandbox> {
        let _gate = self.gates.lock(&id).await;
        let row = self
            .row(&id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("sandbox {id} was deleted meanwhile")))?;
        match transition.check(&row) {
            Precheck::Proceed => {}
            Precheck::Done => return Ok(self.view(&row)),
            Precheck::Refused(error) => return Err(error),
        }
        if !runtime.is_available() {
            return Err(runtime.unavailable());
        }
        if transition.call == DriverCall::Start {
            let admitted = runtime.guarded(runtime.confirm_admission()).await;
            self.driver_result(&runtime, admitted)?;
        }
        let previous = row.phase;
        self.set_transition(&id, transition.via).await?;
        let called = match transition.call {
            DriverCall::Stop => {
                runtime
                    .guarded(runtime.driver.stop(&row.id, &row.name))
                    .await
            }
            DriverCall::Start => {
                runtime
                    .guarded(runtime.driver.start(&row.id, &row.name))
                    .await
            }
        };
        match self.driver_result(&runtime, called) {
            Ok(()) => {
                match transition.settled {
                    Some(phase) => self.settle(&id, transition.via, phase).await?,
                    // The driver's snapshot says where the sandbox is now.
                    None => {
                        if let Ok(Some(snapshot)) = runtime
                            .guarded(runtime.driver.get(&row.id, &row.name))
                            .await
                        {
                            self.apply_snapshot(&runtime.name, snapshot).await?;
                        }
                    }
                }
                tracing::info!(sandbox = %row.name, id = %row.id, driver = %runtime.name, "sandbox {}", transition.done);
                let latest = self.latest(&id, row).await?;
                Ok(self.view(&latest))
            }
            Err(error) => {
                self.recover(&runtime, &row, transition.via, previous, &error)
                    .await;
                if is_not_found(&error) {
                    return Err(Error::FailedPrecondition(format!(
                        "driver '{}' has no sandbox '{}' (id {}): its create never reached the driver, or the \
                         driver lost it; delete the sandbox and create it again",
                        runtime.name, row.name, row.id
                    )));
                }
                Err(error)
            }
        }
    }

    /// Moves a row from the transitional phase `via` to `settled`, with the
    /// intent condition of `settled`; a row that left `via` meanwhile is
    /// left alone.
    pub(super) async fn settle(
        &self,
        id: &str,
        via: SandboxPhase,
        settled: SandboxPhase,
    ) -> Result<()> {
        self.update(id, move |r| {
            if r.phase != via {
                return false;
            }
            r.phase = settled;
            r.gateway_condition = intent_condition(settled, now_ms());
            true
        })
        .await
        .map(drop)
    }

    /// Persists a transition phase (the intent) before the driver is asked.
    async fn set_transition(&self, id: &str, phase: SandboxPhase) -> Result<()> {
        match self
            .update(id, move |row| {
                if row.phase == phase {
                    return false;
                }
                row.phase = phase;
                row.gateway_condition = intent_condition(phase, now_ms());
                true
            })
            .await?
        {
            Updated::Missing => Err(Error::NotFound(format!(
                "sandbox {id} was deleted meanwhile"
            ))),
            _ => Ok(()),
        }
    }

    /// After a failed stop or start: a sandbox the driver does not have is
    /// an Error; an unclear failure is settled with GetSandbox when the
    /// driver answers it; otherwise the row goes back to how it was.
    async fn recover(
        &self,
        runtime: &DriverRuntime,
        row: &SandboxRow,
        transition: SandboxPhase,
        previous: SandboxPhase,
        error: &Error,
    ) {
        let missing = || {
            format!(
                "driver '{}' has no sandbox with id {}",
                runtime.name, row.id
            )
        };
        let outcome = if is_not_found(error) {
            self.mark_error(&row.id, "ComputeResourceMissing", missing())
                .await
        } else if ambiguous(error) && answered(error) {
            match runtime
                .guarded(runtime.driver.get(&row.id, &row.name))
                .await
            {
                Ok(Some(snapshot)) => {
                    let driver = runtime.name.clone();
                    self.update(&row.id, move |r| {
                        if r.phase != transition {
                            return false;
                        }
                        let mut probe = r.clone();
                        apply_snapshot_to(&mut probe, &driver, &snapshot);
                        if probe.phase == transition {
                            // Nothing confirms the transition: undo it.
                            probe.phase = previous;
                            probe.gateway_condition = intent_condition(previous, now_ms());
                            apply_snapshot_to(&mut probe, &driver, &snapshot);
                        }
                        *r = probe;
                        true
                    })
                    .await
                    .map(drop)
                }
                Ok(None) => {
                    self.mark_error(&row.id, "ComputeResourceMissing", missing())
                        .await
                }
                Err(check) => {
                    // The driver cannot be asked: report the call as failed
                    // and leave the sandbox as it was. If the call did take
                    // effect, the driver's next snapshot says so.
                    tracing::debug!(sandbox = %row.name, driver = %runtime.name, error = %check, "could not check the sandbox after a failed call");
                    self.undo(&row.id, transition, previous).await
                }
            }
        } else {
            self.undo(&row.id, transition, previous).await
        };
        if let Err(store) = outcome {
            tracing::warn!(sandbox = %row.name, error = %store, "could not record the outcome of a failed call");
        }
    }

    /// Puts a row back from `transition` to `previous`.
    async fn undo(&self, id: &str, transition: SandboxPhase, previous: SandboxPhase) -> Result<()> {
        self.settle(id, transition, previous).await
    }

    pub async fn delete(self: &Arc<Self>, reference: Option<gw::SandboxRef>) -> Result<bool> {
        self.in_own_task(reference, |gateway, runtime, id| async move {
            gateway.delete_owned(runtime, id).await
        })
        .await
    }

    async fn delete_owned(&self, runtime: Arc<DriverRuntime>, id: String) -> Result<bool> {
        let _gate = self.gates.lock(&id).await;
        let Some(row) = self.row(&id).await? else {
            // Removed while we waited for the gate.
            return Ok(true);
        };
        if !runtime.is_available() {
            return Err(runtime.unavailable());
        }
        let previous = row.phase;
        self.set_transition(&id, SandboxPhase::Deleting).await?;
        let deleted = runtime
            .guarded(runtime.driver.delete(&row.id, &row.name))
            .await;
        match self.driver_result(&runtime, deleted) {
            Ok(false) => {
                self.remove_row(&id).await?;
            }
            Ok(true) => {
                // Usually gone already; otherwise the watch stream's
                // `deleted` event (or the next reconcile) removes the row.
                if let Ok(None) = runtime
                    .guarded(runtime.driver.get(&row.id, &row.name))
                    .await
                {
                    self.remove_row(&id).await?;
                }
            }
            Err(error) if is_not_found(&error) => {
                self.remove_row(&id).await?;
            }
            Err(error) => {
                let gone = ambiguous(&error)
                    && answered(&error)
                    && matches!(
                        runtime
                            .guarded(runtime.driver.get(&row.id, &row.name))
                            .await,
                        Ok(None)
                    );
                if gone {
                    self.remove_row(&id).await?;
                    return Ok(true);
                }
                self.undo(&id, SandboxPhase::Deleting, previous).await?;
                return Err(error);
            }
        }
        Ok(true)
    }

    pub fn info(&self) -> gw::GatewayInfo {
        gw::GatewayInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            drivers: self.registry.infos(),
            listen: self.listen.clone(),
        }
    }

    /// Streams a sandbox's logs from its driver.
    pub async fn logs(
        &self,
        request: gw::SandboxLogsRequest,
    ) -> Result<
        impl futures::Stream<Item = std::result::Result<gw::LogChunk, Status>> + Send + 'static,
    > {
        self.ensure_running()?;
        let row = self.resolve(request.sandbox).await?;
        let runtime = self.runtime_for(&row)?;
        let no_logs = || {
            Error::FailedPrecondition(format!(
                "driver '{}' keeps no logs for its sandboxes (it does not serve the log service)",
                runtime.name
            ))
        };
        if !runtime.capabilities.logs {
            return Err(no_logs());
        }
        let opened = runtime
            .driver
            .stream_logs(StreamLogsRequest {
                sandbox_id: row.id.clone(),
                sandbox_name: row.name.clone(),
                follow: request.follow,
                tail_lines: request.tail_lines,
            })
            .await;
        let stream = self.driver_result(&runtime, opened)?.ok_or_else(no_logs)?;
        let driver = runtime.driver.clone();
        let stop = self.shutdown.clone().cancelled_owned();
        Ok(stream
            .map(move |item| match item {
                Ok(chunk) => Ok(translate::log_chunk(chunk)),
                Err(status) => Err(Status::from(driver.status_error("StreamLogs", &status))),
            })
            .take_until(stop))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(phase: SandboxPhase) -> SandboxRow {
        SandboxRow {
            id: "id".into(),
            name: "n".into(),
            driver: "vm".into(),
            spec: gw::SandboxSpec::default(),
            labels: std::collections::BTreeMap::new(),
            phase,
            observed: None,
            gateway_condition: None,
            instance_id: String::new(),
            resource_version: 1,
            created_at_ms: 0,
            updated_at_ms: 0,
        }
    }

    #[test]
    fn transition_prechecks() {
        use SandboxPhase as P;
        let check = |t: &Transition, phase| match t.check(&row(phase)) {
            Precheck::Proceed => "proceed".to_owned(),
            Precheck::Done => "done".to_owned(),
            Precheck::Refused(error) => error.to_string(),
        };
        assert_eq!(check(&STOP, P::Ready), "proceed");
        assert_eq!(check(&STOP, P::Error), "proceed");
        assert_eq!(check(&STOP, P::Stopped), "done");
        assert!(check(&STOP, P::Deleting).contains("sandbox 'n' is being deleted"));
        assert_eq!(check(&START, P::Stopped), "proceed");
        assert_eq!(check(&START, P::Ready), "done");
        assert_eq!(check(&START, P::Provisioning), "done");
        assert!(check(&START, P::Stopping).contains("is still stopping"));
        assert!(check(&START, P::Deleting).contains("is being deleted"));
        assert_eq!(STOP.via, P::Stopping);
        assert_eq!(START.via, P::Starting);
    }

    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        for name in ["a", "sandbox-99", ""] {
            assert_eq!(parse_page_token(&page_token(name)).unwrap(), name);
        }
        for bad in ["x", "v1.zz", "v1.abc", "v2.61"] {
            let err = parse_page_token(bad).unwrap_err().to_string();
            assert!(err.contains("next_page_token"), "{bad}: {err}");
        }
    }
}
