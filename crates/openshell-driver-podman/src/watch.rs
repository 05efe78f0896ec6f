//! One observer per driver keeps the picture of every sandbox current and
//! fans changes out to `WatchSandboxes` streams.
//!
//! A session subscribes to Podman's event stream first, then lists every
//! container of this instance, so no change between the list and the first
//! event is lost. Each relevant event re-inspects its container. When the
//! event stream breaks, the next session starts the same way and the list
//! corrects whatever was missed (vanished sandboxes become `deleted`
//! events). While the engine cannot be reached for longer than
//! `engine_unavailable_after`, the last-known sandboxes are reported with
//! `Ready=False`, reason `EngineUnavailable`.
//!
//! The picture lives in a shared [`WatchFeed`]: a client stream takes the
//! current picture and a subscription under the feed's lock, so it sees
//! every sandbox once and then every change after it.
//!
//! Only the observer's own task changes the picture. The RPCs that change
//! a sandbox ask it to re-inspect (or forget) that sandbox through a
//! channel, so all inspections happen one after another and a later
//! observation can never be overwritten by an earlier one, and a full list
//! is applied without anything interleaving.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use openshell_driver_kit::WatchFeed;
use openshell_proto::compute::v1::{DriverPlatformEvent, DriverSandbox};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::core::Core;
use crate::error::{Error, Result};
use crate::podman::types::Event;
use crate::spec::{LABEL_SANDBOX_ID, owned_by};
use crate::status;

/// Events kept for slow client streams before they must resynchronise.
const CHANNEL_CAPACITY: usize = 1024;
const MAX_RECONNECT_BACKOFF: Duration = Duration::from_secs(2);
/// How long an RPC waits for the observer to take in its change.
const REFRESH_WAIT: Duration = Duration::from_secs(2);

/// The engine's reachability, as the observer last saw it.
#[derive(Debug, Default)]
struct Shared {
    /// When the engine stopped answering (monotonic, and wall clock for
    /// the condition's transition time).
    down_since: Option<(Instant, SystemTime)>,
    down_reason: String,
    unavailable_reported: bool,
}

/// What the RPCs ask the observer to do.
#[derive(Debug)]
pub enum Command {
    /// Inspect this container again, then say so on `done`.
    Refresh {
        sandbox_id: String,
        container_id: String,
        done: oneshot::Sender<()>,
    },
    /// This container was removed.
    Removed {
        sandbox_id: String,
        container_id: String,
    },
}

#[derive(Debug)]
pub struct Observer {
    core: Arc<Core>,
    shared: Mutex<Shared>,
    feed: Arc<WatchFeed>,
    synced: watch::Sender<bool>,
    commands: mpsc::UnboundedSender<Command>,
    /// Sandboxes whose image is being pulled: no container yet, so no
    /// list shows them; every full list gets them added, so a resync does
    /// not report them deleted.
    pulling: Mutex<std::collections::BTreeMap<String, DriverSandbox>>,
}

impl Observer {
    /// The observer and the receiving end of its command channel, for
    /// [`Observer::run`].
    pub fn new(core: Arc<Core>) -> (Arc<Self>, mpsc::UnboundedReceiver<Command>) {
        let (commands, receiver) = mpsc::unbounded_channel();
        let observer = Arc::new(Self {
            core,
            shared: Mutex::new(Shared::default()),
            feed: Arc::new(WatchFeed::new(CHANNEL_CAPACITY)),
            synced: watch::channel(false).0,
            commands,
            pulling: Mutex::new(std::collections::BTreeMap::new()),
        });
        (observer, receiver)
    }

    /// Has the observer inspect a sandbox's container again and waits
    /// (briefly) until it has, so that once an RPC that changed a sandbox
    /// returns, every watch stream opened afterwards starts from the new
    /// state. While the observer is reconnecting to the engine the wait is
    /// cut short; its resync then catches up.
    pub async fn refresh(&self, sandbox_id: &str, container_id: &str) {
        let (done, applied) = oneshot::channel();
        let sent = self.commands.send(Command::Refresh {
            sandbox_id: sandbox_id.to_owned(),
            container_id: container_id.to_owned(),
            done,
        });
        if sent.is_ok() && tokio::time::timeout(REFRESH_WAIT, applied).await.is_err() {
            tracing::debug!(
                sandbox_id,
                "the observer is busy; not waiting for it to see the change"
            );
        }
    }

    /// Tells the observer a sandbox's container was removed.
    pub fn removed(&self, sandbox_id: &str, container_id: &str) {
        let _ = self.commands.send(Command::Removed {
            sandbox_id: sandbox_id.to_owned(),
            container_id: container_id.to_owned(),
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn pulling_lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<String, DriverSandbox>> {
        self.pulling.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Shows `sandbox` (a [`status::pulling`] placeholder) until
    /// [`Observer::pull_finished`].
    pub fn pull_started(&self, sandbox: DriverSandbox) {
        self.pulling_lock()
            .insert(sandbox.id.clone(), sandbox.clone());
        self.feed.upsert(sandbox);
    }

    /// Ends the placeholder of sandbox `id`. With `keep`, the entry stays
    /// in the picture until the container's first observation replaces it;
    /// without, a placeholder still in the picture is removed.
    pub fn pull_finished(&self, id: &str, keep: bool) {
        self.pulling_lock().remove(id);
        if !keep {
            self.forget_placeholder(id);
        }
    }

    /// Removes sandbox `id` from the picture if it is still a placeholder
    /// (no container behind it): a create that failed.
    fn forget_placeholder(&self, id: &str) {
        let placeholder = self
            .feed
            .get(id)
            .is_some_and(|s| s.status.as_ref().is_none_or(|s| s.instance_id.is_empty()));
        if placeholder && !self.pulling_lock().contains_key(id) {
            self.feed.remove(id);
        }
    }

    /// `observed` (a full list) with the sandboxes being pulled that it
    /// does not show.
    pub fn with_pulling(&self, mut observed: Vec<DriverSandbox>) -> Vec<DriverSandbox> {
        let pulling = self.pulling_lock();
        for (id, sandbox) in pulling.iter() {
            if !observed.iter().any(|s| &s.id == id) {
                observed.push(sandbox.clone());
            }
        }
        observed
    }

    /// The placeholder of sandbox `id` while its image is being pulled.
    pub fn pulling(&self, id: &str) -> Option<DriverSandbox> {
        self.pulling_lock().get(id).cloned()
    }

    /// The feed `WatchSandboxes` streams are served from.
    pub fn feed(&self) -> &Arc<WatchFeed> {
        &self.feed
    }

    /// Records that a sandbox is gone. With `container_id`, only when the
    /// known sandbox is that container.
    fn apply_removed(&self, sandbox_id: &str, container_id: Option<&str>) {
        let matches = self.feed.get(sandbox_id).is_some_and(|known| {
            let known_container = known.status.as_ref().map_or("", |s| s.instance_id.as_str());
            container_id.is_none_or(|c| known_container.is_empty() || known_container == c)
        });
        if matches && !self.pulling_lock().contains_key(sandbox_id) {
            self.feed.remove(sandbox_id);
        }
    }

    /// Waits until the first full list has been taken.
    pub async fn wait_synced(&self) {
        let mut rx = self.synced.subscribe();
        let _ = rx.wait_for(|synced| *synced).await;
    }

    /// Re-inspects one container and records what it shows now.
    async fn inspect_again(&self, sandbox_id: &str, container_id: &str) {
        match self.core.observe_container(container_id).await {
            Ok(Some(sandbox)) => {
                self.feed.upsert(sandbox);
            }
            Ok(None) => self.apply_removed(sandbox_id, Some(container_id)),
            Err(error) => {
                tracing::debug!(sandbox_id, error = %error, "could not refresh a sandbox");
            }
        }
    }

    /// The last-known sandboxes marked `EngineUnavailable`, once the engine
    /// has been unreachable for longer than the configured grace period.
    pub fn unavailable_view(&self) -> Option<Vec<DriverSandbox>> {
        let shared = self.lock();
        let (since, wall) = shared.down_since?;
        if since.elapsed() < self.core.settings.engine_unavailable_after {
            return None;
        }
        let message = self.unavailable_message(&shared.down_reason);
        Some(
            self.feed
                .list()
                .iter()
                .map(|sandbox| status::engine_unavailable(sandbox, &message, wall))
                .collect(),
        )
    }

    fn unavailable_message(&self, reason: &str) -> String {
        format!(
            "the Podman engine at {} cannot be reached: {reason}",
            self.core.client.socket().display()
        )
    }

    fn engine_down(&self, error: &Error) {
        let reason = match error {
            Error::EngineUnavailable { reason, .. } => reason.clone(),
            other => other.to_string(),
        };
        let mut shared = self.lock();
        if shared.down_since.is_none() {
            tracing::warn!(socket = %self.core.client.socket().display(), reason = %reason, "podman engine unreachable");
            shared.down_since = Some((Instant::now(), SystemTime::now()));
        }
        shared.down_reason = reason;
        let Some((since, wall)) = shared.down_since else {
            return;
        };
        if shared.unavailable_reported
            || since.elapsed() < self.core.settings.engine_unavailable_after
        {
            return;
        }
        shared.unavailable_reported = true;
        let message = self.unavailable_message(&shared.down_reason);
        drop(shared);
        let known = self.feed.list();
        tracing::warn!(
            sandboxes = known.len(),
            "reporting sandboxes as EngineUnavailable"
        );
        for sandbox in known {
            self.feed
                .upsert(status::engine_unavailable(&sandbox, &message, wall));
        }
    }

    fn engine_up(&self) {
        let mut shared = self.lock();
        if shared.down_since.take().is_some() {
            tracing::info!(socket = %self.core.client.socket().display(), "podman engine reachable again");
        }
        shared.unavailable_reported = false;
        shared.down_reason.clear();
    }

    /// Runs sessions until `cancel` fires, reconnecting with backoff; then
    /// ends every watch stream.
    pub async fn run(
        self: Arc<Self>,
        mut commands: mpsc::UnboundedReceiver<Command>,
        cancel: CancellationToken,
    ) {
        self.observe(&mut commands, &cancel).await;
        self.feed.close();
    }

    async fn observe(
        &self,
        commands: &mut mpsc::UnboundedReceiver<Command>,
        cancel: &CancellationToken,
    ) {
        let mut backoff = Duration::from_millis(20);
        loop {
            let outcome = self.session(commands, cancel).await;
            if cancel.is_cancelled() {
                return;
            }
            match outcome {
                Ok(()) => backoff = Duration::from_millis(20),
                Err(error) => {
                    tracing::debug!(error = %error, "podman event session ended");
                    if error.is_engine_unavailable() {
                        self.engine_down(&error);
                    }
                }
            }
            // A long grace period still gets checked at this pace.
            let pause = backoff.min(
                self.core
                    .settings
                    .engine_unavailable_after
                    .max(Duration::from_millis(20)),
            );
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = cancel.cancelled() => return,
            }
            backoff = (backoff * 2).min(MAX_RECONNECT_BACKOFF);
        }
    }

    /// One session: subscribe, list, then follow events. `Ok` when it
    /// synced and later lost the stream (or was cancelled).
    async fn session(
        &self,
        commands: &mut mpsc::UnboundedReceiver<Command>,
        cancel: &CancellationToken,
    ) -> Result<()> {
        let mut events = self.core.client.events().await?;
        // Whatever was asked before this point is covered by the list.
        while commands.try_recv().is_ok() {}
        let current = self.with_pulling(self.core.observe_all().await?);
        self.engine_up();
        self.feed.replace_all(current);
        self.synced.send_replace(true);
        let mut resync = tokio::time::interval(self.core.resync_every);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resync.tick().await;
        loop {
            let line = tokio::select! {
                line = events.next_line() => line,
                _ = resync.tick() => {
                    // A safety net for events the engine did not deliver.
                    let current = self.with_pulling(self.core.observe_all().await?);
                    self.feed.replace_all(current);
                    continue;
                }
                Some(command) = commands.recv() => {
                    match command {
                        Command::Refresh { sandbox_id, container_id, done } => {
                            self.inspect_again(&sandbox_id, &container_id).await;
                            let _ = done.send(());
                        }
                        Command::Removed { sandbox_id, container_id } => {
                            self.apply_removed(&sandbox_id, Some(&container_id));
                        }
                    }
                    continue;
                }
                () = cancel.cancelled() => return Ok(()),
            };
            match line {
                Ok(Some(line)) => {
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    match serde_json::from_slice::<Event>(&line) {
                        Ok(event) => self.handle(&event).await,
                        Err(error) => {
                            tracing::debug!(error = %error, "skipping an event line that is not JSON");
                        }
                    }
                }
                Ok(None) => {
                    tracing::debug!("podman event stream ended; reconnecting");
                    return Ok(());
                }
                Err(error) => {
                    tracing::debug!(error = %error, "podman event stream failed; reconnecting");
                    return Ok(());
                }
            }
        }
    }

    async fn handle(&self, event: &Event) {
        if event.kind != "container" {
            return;
        }
        let attributes = &event.actor.attributes;
        if !owned_by(Some(attributes), self.core.instance()) {
            return;
        }
        let Some(sandbox_id) = attributes.get(LABEL_SANDBOX_ID) else {
            return;
        };
        tracing::debug!(sandbox_id = %sandbox_id, action = %event.action, "podman event");
        if event.action == "remove" {
            self.apply_removed(sandbox_id, Some(&event.actor.id));
            return;
        }
        self.inspect_again(sandbox_id, &event.actor.id).await;
        if let Some(platform) = platform_event(event, self.core.state.is_stopped(sandbox_id)) {
            self.feed.publish_platform_event(sandbox_id, platform);
        }
    }
}

/// The platform event shown to users for a Podman event, if it is one
/// worth showing.
pub fn platform_event(event: &Event, stopped_on_request: bool) -> Option<DriverPlatformEvent> {
    let exit_code = event
        .actor
        .attributes
        .get("containerExitCode")
        .cloned()
        .unwrap_or_default();
    let (kind, reason, message) = match event.action.as_str() {
        "create" => ("Normal", "ContainerCreated", "container created".to_owned()),
        "start" => ("Normal", "ContainerStarted", "container started".to_owned()),
        "died" if stopped_on_request => (
            "Normal",
            "ContainerStopped",
            format!("container stopped (exit code {exit_code})"),
        ),
        "died" if exit_code == "0" => (
            "Normal",
            "ContainerExited",
            "container exited with code 0".to_owned(),
        ),
        "died" => (
            "Warning",
            "ContainerExited",
            format!("container exited with code {exit_code}"),
        ),
        "oom" => (
            "Warning",
            "OOMKilled",
            "container ran out of memory".to_owned(),
        ),
        "pause" => ("Normal", "ContainerPaused", "container paused".to_owned()),
        "unpause" => (
            "Normal",
            "ContainerUnpaused",
            "container unpaused".to_owned(),
        ),
        "restart" => (
            "Normal",
            "ContainerRestarted",
            "container restarted".to_owned(),
        ),
        _ => return None,
    };
    let mut metadata = std::collections::HashMap::new();
    metadata.insert("container_id".to_owned(), event.actor.id.clone());
    metadata.insert("podman_action".to_owned(), event.action.clone());
    if !exit_code.is_empty() && event.action == "died" {
        metadata.insert("exit_code".to_owned(), exit_code);
    }
    let at = std::time::UNIX_EPOCH
        + Duration::from_millis(u64::try_from(event.timestamp_ms()).unwrap_or(0));
    let platform = DriverPlatformEvent {
        source: "podman".to_owned(),
        r#type: kind.to_owned(),
        reason: reason.to_owned(),
        message,
        metadata,
        ..Default::default()
    };
    Some(openshell_driver_kit::contract::stamp_event(platform, at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::podman::types::Actor;

    fn event(action: &str, exit: &str) -> Event {
        Event {
            kind: "container".into(),
            action: action.into(),
            actor: Actor {
                id: "c1".into(),
                attributes: [("containerExitCode".to_owned(), exit.to_owned())].into(),
            },
            time_nano: 5_000_000,
            time: 0,
        }
    }

    #[test]
    fn platform_events_for_podman_events() {
        let died = platform_event(&event("died", "3"), false).unwrap();
        assert_eq!(died.r#type, "Warning");
        assert_eq!(died.reason, "ContainerExited");
        assert_eq!(died.message, "container exited with code 3");
        assert_eq!(died.metadata["exit_code"], "3");
        assert_eq!(died.timestamp_ms, 5);
        assert_eq!(died.source, "podman");

        let stopped = platform_event(&event("died", "143"), true).unwrap();
        assert_eq!(stopped.r#type, "Normal");
        assert_eq!(stopped.reason, "ContainerStopped");

        assert_eq!(
            platform_event(&event("start", "0"), false).unwrap().reason,
            "ContainerStarted"
        );
        assert!(platform_event(&event("cleanup", "0"), false).is_none());
        assert!(platform_event(&event("init", "0"), false).is_none());
    }
}
