//! The `WatchSandboxes` feed: one picture of a driver's sandboxes, the
//! changes to it broadcast to every watcher.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use futures::Stream;
use openshell_proto::compute::v1::{
    DriverPlatformEvent, DriverSandbox, WatchSandboxesDeletedEvent, WatchSandboxesEvent,
    WatchSandboxesPlatformEvent, WatchSandboxesSandboxEvent, watch_sandboxes_event::Payload,
};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

/// Events a watcher's connection may hold before its sender waits; beyond
/// that the broadcast buffer fills and the watcher is resynchronised, so a
/// reader that does not read costs a bounded amount of memory.
const WATCHER_BUFFER: usize = 64;

/// A `WatchSandboxesSandboxEvent` for `sandbox`.
pub fn sandbox_event(sandbox: DriverSandbox) -> WatchSandboxesEvent {
    WatchSandboxesEvent {
        payload: Some(Payload::Sandbox(WatchSandboxesSandboxEvent {
            sandbox: Some(sandbox),
        })),
    }
}

/// A `WatchSandboxesDeletedEvent` for `sandbox_id`.
pub fn deleted_event(sandbox_id: String) -> WatchSandboxesEvent {
    WatchSandboxesEvent {
        payload: Some(Payload::Deleted(WatchSandboxesDeletedEvent { sandbox_id })),
    }
}

/// A `WatchSandboxesPlatformEvent` about `sandbox_id`.
pub fn platform_event(sandbox_id: String, event: DriverPlatformEvent) -> WatchSandboxesEvent {
    WatchSandboxesEvent {
        payload: Some(Payload::PlatformEvent(WatchSandboxesPlatformEvent {
            sandbox_id,
            event: Some(event),
        })),
    }
}

struct Picture {
    sandboxes: BTreeMap<String, DriverSandbox>,
    tx: broadcast::Sender<WatchSandboxesEvent>,
}

/// The current sandboxes of a driver and the stream of their changes.
///
/// Every change goes through the feed's one lock, so a new watcher's
/// snapshot and its subscription to later changes are taken atomically:
/// nothing is missed between them and nothing is reordered.
pub struct WatchFeed {
    picture: Mutex<Picture>,
    closed: CancellationToken,
}

impl std::fmt::Debug for WatchFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchFeed")
            .field("sandboxes", &self.len())
            .finish_non_exhaustive()
    }
}

impl WatchFeed {
    /// A feed whose broadcast buffer holds `capacity` events; a watcher
    /// further behind than that is resynchronised.
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        Self {
            picture: Mutex::new(Picture {
                sandboxes: BTreeMap::new(),
                tx,
            }),
            closed: CancellationToken::new(),
        }
    }

    fn picture(&self) -> MutexGuard<'_, Picture> {
        self.picture.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records `sandbox` and tells watchers, unless it is exactly what the
    /// feed already holds. Returns whether anything changed.
    pub fn upsert(&self, sandbox: DriverSandbox) -> bool {
        let mut picture = self.picture();
        if picture.sandboxes.get(&sandbox.id) == Some(&sandbox) {
            return false;
        }
        picture
            .sandboxes
            .insert(sandbox.id.clone(), sandbox.clone());
        // No receivers is not an error: nobody is watching yet.
        let _ = picture.tx.send(sandbox_event(sandbox));
        true
    }

    /// Forgets `id` and tells watchers it is gone. Returns what was held.
    pub fn remove(&self, id: &str) -> Option<DriverSandbox> {
        let mut picture = self.picture();
        let removed = picture.sandboxes.remove(id)?;
        let _ = picture.tx.send(deleted_event(id.to_owned()));
        Some(removed)
    }

    /// Makes the picture exactly `sandboxes`: changed ones are sent,
    /// vanished ones are sent as deleted. Returns how many events it sent.
    pub fn replace_all(&self, sandboxes: impl IntoIterator<Item = DriverSandbox>) -> usize {
        let fresh: BTreeMap<String, DriverSandbox> =
            sandboxes.into_iter().map(|s| (s.id.clone(), s)).collect();
        let mut picture = self.picture();
        let gone: Vec<String> = picture
            .sandboxes
            .keys()
            .filter(|id| !fresh.contains_key(*id))
            .cloned()
            .collect();
        let mut sent = 0;
        for id in gone {
            picture.sandboxes.remove(&id);
            let _ = picture.tx.send(deleted_event(id));
            sent += 1;
        }
        for (id, sandbox) in fresh {
            if picture.sandboxes.get(&id) != Some(&sandbox) {
                picture.sandboxes.insert(id, sandbox.clone());
                let _ = picture.tx.send(sandbox_event(sandbox));
                sent += 1;
            }
        }
        sent
    }

    /// Passes a platform event (image pulled, container started, ...) to
    /// the current watchers; it is not part of the snapshot.
    pub fn publish_platform_event(&self, sandbox_id: &str, event: DriverPlatformEvent) {
        let picture = self.picture();
        let _ = picture
            .tx
            .send(platform_event(sandbox_id.to_owned(), event));
    }

    pub fn get(&self, id: &str) -> Option<DriverSandbox> {
        self.picture().sandboxes.get(id).cloned()
    }

    /// Every sandbox, ordered by id.
    pub fn list(&self) -> Vec<DriverSandbox> {
        self.picture().sandboxes.values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.picture().sandboxes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The current picture and a receiver of every later change, taken
    /// together.
    pub fn subscribe(&self) -> (Vec<DriverSandbox>, broadcast::Receiver<WatchSandboxesEvent>) {
        let picture = self.picture();
        (
            picture.sandboxes.values().cloned().collect(),
            picture.tx.subscribe(),
        )
    }

    /// Ends every open watch stream (driver shutdown). Later watches end at
    /// once after their snapshot.
    pub fn close(&self) {
        self.closed.cancel();
    }

    /// A `WatchSandboxes` stream: the current sandboxes, then every change.
    /// A watcher that falls behind the broadcast buffer gets `deleted` for
    /// what vanished meanwhile and the full picture again. The stream's task
    /// ends when the client goes away or the feed is closed.
    pub fn watch(self: &std::sync::Arc<Self>) -> WatchStream {
        let (out, rx) = mpsc::channel(WATCHER_BUFFER);
        let feed = std::sync::Arc::clone(self);
        tokio::spawn(async move { feed.forward(out).await });
        WatchStream {
            inner: ReceiverStream::new(rx),
        }
    }

    async fn forward(&self, out: mpsc::Sender<Result<WatchSandboxesEvent, tonic::Status>>) {
        let (snapshot, mut rx) = self.subscribe();
        let mut sent: BTreeSet<String> = BTreeSet::new();
        if !send_snapshot(&out, snapshot, &mut sent).await {
            return;
        }
        loop {
            let received = tokio::select! {
                biased;
                () = self.closed.cancelled() => return,
                () = out.closed() => return,
                received = rx.recv() => received,
            };
            match received {
                Ok(event) => {
                    match &event.payload {
                        Some(Payload::Sandbox(s)) => {
                            if let Some(sandbox) = &s.sandbox {
                                sent.insert(sandbox.id.clone());
                            }
                        }
                        Some(Payload::Deleted(d)) => {
                            sent.remove(&d.sandbox_id);
                        }
                        _ => {}
                    }
                    if out.send(Ok(event)).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "a watcher fell behind; resynchronising it");
                    let (snapshot, fresh) = self.subscribe();
                    rx = fresh;
                    let present: BTreeSet<String> = snapshot.iter().map(|s| s.id.clone()).collect();
                    for gone in sent.difference(&present) {
                        if out.send(Ok(deleted_event(gone.clone()))).await.is_err() {
                            return;
                        }
                    }
                    sent.clear();
                    if !send_snapshot(&out, snapshot, &mut sent).await {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}

async fn send_snapshot(
    out: &mpsc::Sender<Result<WatchSandboxesEvent, tonic::Status>>,
    snapshot: Vec<DriverSandbox>,
    sent: &mut BTreeSet<String>,
) -> bool {
    for sandbox in snapshot {
        sent.insert(sandbox.id.clone());
        if out.send(Ok(sandbox_event(sandbox))).await.is_err() {
            return false;
        }
    }
    true
}

/// The stream [`WatchFeed::watch`] returns; usable directly as a tonic
/// server-streaming response body.
#[derive(Debug)]
pub struct WatchStream {
    inner: ReceiverStream<Result<WatchSandboxesEvent, tonic::Status>>,
}

impl Stream for WatchStream {
    type Item = Result<WatchSandboxesEvent, tonic::Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use openshell_proto::compute::v1::DriverSandboxStatus;
    use std::sync::Arc;
    use std::time::Duration;

    fn sandbox(id: &str, state: &str) -> DriverSandbox {
        DriverSandbox {
            id: id.to_owned(),
            name: id.to_owned(),
            status: Some(DriverSandboxStatus {
                instance_id: state.to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn describe(event: &WatchSandboxesEvent) -> String {
        match &event.payload {
            Some(Payload::Sandbox(s)) => {
                let s = s.sandbox.as_ref().expect("sandbox");
                let state = s.status.as_ref().map_or("", |st| st.instance_id.as_str());
                format!("{}={state}", s.id)
            }
            Some(Payload::Deleted(d)) => format!("-{}", d.sandbox_id),
            Some(Payload::PlatformEvent(p)) => format!("!{}", p.sandbox_id),
            None => "?".to_owned(),
        }
    }

    async fn next(stream: &mut WatchStream) -> String {
        let event = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("an event in time")
            .expect("stream open")
            .expect("not an error");
        describe(&event)
    }

    #[tokio::test]
    async fn snapshot_then_changes_in_order() {
        let feed = Arc::new(WatchFeed::new(16));
        feed.upsert(sandbox("a", "1"));
        feed.upsert(sandbox("b", "1"));
        let mut stream = feed.watch();
        assert_eq!(next(&mut stream).await, "a=1");
        assert_eq!(next(&mut stream).await, "b=1");
        assert!(!feed.upsert(sandbox("a", "1")), "no change, no event");
        assert!(feed.upsert(sandbox("a", "2")));
        feed.publish_platform_event("a", DriverPlatformEvent::default());
        assert_eq!(feed.remove("b").map(|s| s.id), Some("b".to_owned()));
        assert_eq!(feed.remove("b"), None, "removing twice sends nothing");
        assert_eq!(next(&mut stream).await, "a=2");
        assert_eq!(next(&mut stream).await, "!a");
        assert_eq!(next(&mut stream).await, "-b");
    }

    #[tokio::test]
    async fn replace_all_sends_the_difference() {
        let feed = Arc::new(WatchFeed::new(16));
        feed.replace_all([sandbox("a", "1"), sandbox("b", "1")]);
        let mut stream = feed.watch();
        next(&mut stream).await;
        next(&mut stream).await;
        assert_eq!(feed.replace_all([sandbox("b", "1"), sandbox("c", "1")]), 2);
        assert_eq!(next(&mut stream).await, "-a");
        assert_eq!(next(&mut stream).await, "c=1");
        assert_eq!(
            feed.list()
                .iter()
                .map(|s| s.id.as_str())
                .collect::<Vec<_>>(),
            ["b", "c"]
        );
    }

    #[tokio::test]
    async fn a_lagging_watcher_is_resynchronised_with_deletions() {
        let feed = Arc::new(WatchFeed::new(2));
        feed.upsert(sandbox("gone", "1"));
        let mut stream = feed.watch();
        assert_eq!(next(&mut stream).await, "gone=1");
        // Far more changes than the broadcast and the connection buffer hold,
        // while the watcher does not read.
        feed.remove("gone");
        for i in 0..(WATCHER_BUFFER + 50) {
            feed.upsert(sandbox("x", &i.to_string()));
        }
        let mut seen = Vec::new();
        loop {
            let event = next(&mut stream).await;
            let done = event == format!("x={}", WATCHER_BUFFER + 49);
            seen.push(event);
            if done {
                break;
            }
        }
        assert!(
            seen.contains(&"-gone".to_owned()),
            "the watcher learns 'gone' vanished: {seen:?}"
        );
        assert!(
            seen.len() < WATCHER_BUFFER + 50,
            "the watcher was resynchronised, not replayed: {} events",
            seen.len()
        );
    }

    #[tokio::test]
    async fn streams_end_when_the_feed_closes_or_the_client_leaves() {
        let feed = Arc::new(WatchFeed::new(4));
        let mut stream = feed.watch();
        feed.close();
        let end = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("ends in time");
        assert!(end.is_none());

        let feed = Arc::new(WatchFeed::new(4));
        let stream = feed.watch();
        drop(stream);
        // The forwarding task notices the dropped client and lets go of its
        // receiver.
        for _ in 0..100 {
            if feed.picture().tx.receiver_count() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the watch task outlived its client");
    }
}
